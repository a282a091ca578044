//! `exec`: a command run with its stdin given and its output streamed to the connection as
//! `stdout`/`stderr` frames, then its exit. Its deadline kills the process group; on a socket,
//! a host that closes or resets the connection kills it at once (see the module docs of
//! `server`).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::Stdio;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::reply::{Failure, OpResult, ok};
use super::table::{ExitInfo, ProcessTable, SpawnSpec, killpg};
use super::{CHUNK, EXIT_GRACE, KILL_GRACE};
use crate::proto::{self, Response};

/// Runs a command, streaming its output to `stream`, and returns its `exit`. When `hangup`
/// (the connection's descriptor) reports that the host closed or reset the connection, the
/// command's group is killed (by the guard) and the connection ends.
pub(super) fn exec<S: Write>(
    stream: &mut S,
    hangup: Option<RawFd>,
    table: &ProcessTable,
    spec: &SpawnSpec<'_>,
    timeout_ms: Option<u64>,
    stdin_data: Vec<u8>,
) -> OpResult {
    // SAFETY: plain syscall without pointers.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if efd < 0 {
        return Err(Failure::io("eventfd", &io::Error::last_os_error()));
    }
    // SAFETY: `efd` is a fresh descriptor that nothing else owns.
    let efd = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
    let stdin = if stdin_data.is_empty() {
        Some(Stdio::null())
    } else {
        None
    };
    let started = table.start(spec, stdin, false, Some(efd.clone()))?;
    let pid = started.pid;
    let mut guard = ExecGuard {
        table,
        pid,
        done: false,
    };
    if let Some(mut w) = started.stdin {
        // A child that does not read its stdin must not block the output loop.
        let spawned = thread::Builder::new()
            .name("exec-stdin".into())
            .spawn(move || {
                let _ = w.write_all(&stdin_data);
            });
        if let Err(e) = spawned {
            return Err(Failure::io("starting the stdin thread", &e));
        }
    }

    // A deadline too far to represent is none (never a panic on a huge `timeout_ms`).
    let deadline = timeout_ms.and_then(|ms| Instant::now().checked_add(Duration::from_millis(ms)));
    let mut pipes: [Option<File>; 2] = [Some(started.stdout), Some(started.stderr)];
    let mut timed_out = false;
    let mut killed_at: Option<Instant> = None;
    let mut exited_at: Option<Instant> = None;
    let mut buf = vec![0u8; CHUNK];
    let kill = |timed_out: &mut bool, killed_at: &mut Option<Instant>| {
        let _ = killpg(pid, libc::SIGKILL);
        *timed_out = true;
        *killed_at = Some(Instant::now());
    };

    while pipes.iter().any(Option::is_some) {
        let now = Instant::now();
        // When to stop waiting for the pipes: grace after kill, grace after exit, timeout.
        let mut until: Option<Instant> = None;
        let mut earliest = |t: Instant| until = Some(until.map_or(t, |u| u.min(t)));
        if let Some(k) = killed_at {
            earliest(k + KILL_GRACE);
        }
        if let Some(e) = exited_at {
            earliest(e + EXIT_GRACE);
        }
        if !timed_out && let Some(d) = deadline {
            earliest(d);
        }
        if let Some(u) = until
            && now >= u
        {
            if !timed_out && deadline.is_some_and(|d| now >= d) && exited_at.is_none() {
                kill(&mut timed_out, &mut killed_at);
                continue;
            }
            break;
        }
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(3);
        let mut which: Vec<usize> = Vec::with_capacity(3);
        for (i, p) in pipes.iter().enumerate() {
            if let Some(f) = p {
                fds.push(libc::pollfd {
                    fd: f.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                which.push(i);
            }
        }
        if exited_at.is_none() {
            fds.push(libc::pollfd {
                fd: efd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            which.push(2);
        }
        if let Some(h) = hangup {
            // Only the peer's close or reset (POLLHUP and POLLERR are always reported).
            fds.push(libc::pollfd {
                fd: h,
                events: libc::POLLRDHUP,
                revents: 0,
            });
            which.push(3);
        }
        if !poll_until(&mut fds, until)? {
            continue;
        }
        for (pfd, &i) in fds.iter().zip(&which) {
            if pfd.revents == 0 {
                continue;
            }
            if i == 3 {
                return Err(hung_up());
            }
            if i == 2 {
                exited_at = Some(Instant::now());
                continue;
            }
            let Some(f) = pipes[i].as_mut() else { continue };
            match f.read(&mut buf) {
                Ok(0) => pipes[i] = None,
                Ok(k) => {
                    let header = if i == 0 {
                        Response::Stdout {}
                    } else {
                        Response::Stderr {}
                    };
                    proto::write_frame(stream, &header, &buf[..k]).map_err(Failure::Connection)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => pipes[i] = None,
            }
        }
    }
    drop(pipes);

    // The pipes are closed (or abandoned); now the status.
    let mut exit = table.exit_of(pid);
    if exit.is_none() {
        let limit = if timed_out {
            killed_at.map(|k| k + KILL_GRACE)
        } else {
            deadline
        };
        exit = wait_exit_watching(table, pid, &efd, hangup, limit)?;
        if exit.is_none() && !timed_out {
            // The deadline passed with the pipes closed and the process still running.
            kill(&mut timed_out, &mut killed_at);
            exit = wait_exit_watching(table, pid, &efd, hangup, killed_at.map(|k| k + KILL_GRACE))?;
        }
    }
    guard.done = true;
    let exit = exit.unwrap_or(ExitInfo {
        code: None,
        signal: Some(libc::SIGKILL),
    });
    ok(Response::Exit {
        code: exit.code,
        signal: exit.signal,
        timed_out,
    })
}

/// Waits until `pid` (an `exec` whose exit `efd` signals) has an exit status, at most until
/// `limit` (`None`: for ever), watching `hangup` like the output loop does.
fn wait_exit_watching(
    table: &ProcessTable,
    pid: u32,
    efd: &OwnedFd,
    hangup: Option<RawFd>,
    limit: Option<Instant>,
) -> Result<Option<ExitInfo>, Failure> {
    let Some(h) = hangup else {
        return Ok(table.wait_exit(pid, limit).ok().flatten());
    };
    loop {
        // The reaper records the status before it signals `efd`: once `efd` is readable
        // (it stays so), this sees the status.
        if let Some(exit) = table.exit_of(pid) {
            return Ok(Some(exit));
        }
        if limit.is_some_and(|l| Instant::now() >= l) {
            return Ok(None);
        }
        let mut fds = [
            libc::pollfd {
                fd: efd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: h,
                events: libc::POLLRDHUP,
                revents: 0,
            },
        ];
        if !poll_until(&mut fds, limit)? {
            continue;
        }
        if fds[1].revents != 0 {
            return Err(hung_up());
        }
    }
}

/// Waits in `poll(2)` until one of `fds` is ready or `until` passes (`None`: no limit).
/// `Ok(false)`: a signal interrupted the wait; the caller looks again and calls again.
fn poll_until(fds: &mut [libc::pollfd], until: Option<Instant>) -> Result<bool, Failure> {
    let timeout_ms: libc::c_int = match until {
        None => -1,
        Some(u) => {
            let ms = u
                .saturating_duration_since(Instant::now())
                .as_millis()
                .saturating_add(1);
            libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
        }
    };
    // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(Failure::io("poll", &e));
    }
    Ok(true)
}

/// Removes an `exec` process from the table when the request ends; kills its group if the
/// request did not complete (host gone).
struct ExecGuard<'a> {
    table: &'a ProcessTable,
    pid: u32,
    done: bool,
}

impl Drop for ExecGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = killpg(self.pid, libc::SIGKILL);
        }
        self.table.forget(self.pid);
    }
}

/// The host closed or reset the connection of a running `exec`.
fn hung_up() -> Failure {
    Failure::Connection(io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "the host closed the connection during exec; its command was killed",
    ))
}
