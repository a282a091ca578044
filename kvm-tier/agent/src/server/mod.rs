//! The agent side: the process table (with its reaper) and the per-connection request loop.
//!
//! [`serve_connection`] serves one connection until the peer closes it or a protocol error
//! happens; the binary runs one per accepted connection ([`serve_socket`]), each on its own
//! thread, all sharing [`ProcessTable::global`].
//!
//! # A host that goes away during `exec`
//!
//! On a socket ([`serve_socket`]) an `exec` watches its connection while the command runs: when
//! the host closes or resets it (an interrupted or timed-out call, a host process that died),
//! the command's process group is killed at once rather than at its timeout, and the
//! connection ends.
//!
//! # Children and their exit statuses
//!
//! The agent never waits on a [`std::process::Child`]. One reaper thread (started with the
//! table) reaps *every* child of the process (`waitid(P_ALL, WEXITED | WNOWAIT)` to learn a
//! pid, then `waitpid(pid)`), records the statuses of tracked pids in the table and wakes their
//! waiters; others (orphans re-parented to PID 1) are reaped and forgotten. Spawning and
//! registering a child happen under a read lock that the reaper takes for writing before it
//! reaps, so a child that exits before it is registered is not lost, and the status that
//! `std::process::Command::spawn` itself collects when `exec` fails is not stolen.
//! Consequence: a process that uses this module must not wait for its children any other way.
//!
//! Every child runs in its own process group (`pgid == pid`): timeouts and `signal` act on
//! the whole group.
//!
//! # Layout
//!
//! This file holds the request loop and the dispatch of each request to the room that serves
//! it:
//!
//! - `reply`: how an operation answers (`OpResult`) or fails (`Failure`: an `error` frame,
//!   or the connection closed).
//! - `table`: the [`ProcessTable`] and its reaper, spawning into it, process groups.
//! - `capture`: the output a background process keeps for `output` (a ring per stream).
//! - `processes`: the background-process operations (`spawn`, `output`, `wait`, `signal`,
//!   `stdin`, `processes`).
//! - `exec`: a command run with its output streamed on the connection, watching for the host
//!   to go away.
//! - `files`: the file operations (`read_file`, `write_file`, `list`, `remove`, `exists`,
//!   `mkdir`).
//! - `system`: the guest's clock, mounts, `sync`, and whether a local TCP port is open.
//! - `pipe`: `connect_tcp`, a connection turned into a byte pipe to a guest TCP port (the
//!   host's exposed ports).
//! - `pty`: terminals (`pty_open`, `pty_resize`, `pty_attach`): a program on a
//!   pseudo-terminal whose output the agent reads all the time, and a connection turned into a
//!   byte pipe to it.
//! - `python`: `run_code`, cells in the agent's persistent Python interpreter (with its driver,
//!   `python/repl.py`, and the pipe protocol to it, `python/pipe.rs`).

mod capture;
mod exec;
mod files;
mod pipe;
mod processes;
mod pty;
pub mod python;
mod reply;
mod system;
mod table;

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::proto::{self, FrameError, PROTOCOL_VERSION, Request, Response, error_kind};

use reply::{Failure, OpResult, ok, send_error};
use table::SpawnSpec;
pub use table::{ExitInfo, ProcessTable};

/// Bytes of stdout (and, separately, of stderr) kept per background process.
pub const OUTPUT_BUFFER: usize = 1 << 20;
/// Exited background processes kept in the table (the oldest beyond are forgotten).
pub const MAX_EXITED_KEPT: usize = 128;
/// Operations of [`Request`] (their `op` tags): a well-formed request with another `op` is
/// answered `unsupported`, one of these with bad fields `invalid`.
pub const KNOWN_OPS: &[&str] = &[
    "hello",
    "exec",
    "spawn",
    "output",
    "wait",
    "signal",
    "stdin",
    "processes",
    "read_file",
    "write_file",
    "list",
    "remove",
    "exists",
    "mkdir",
    "sync",
    "set_time",
    "refresh",
    "mount",
    "port_open",
    "run_code",
    "connect_tcp",
    "pty_open",
    "pty_resize",
    "pty_attach",
];

/// Once a process has exited, how long to keep reading output that grandchildren holding its
/// pipes may still write.
const EXIT_GRACE: Duration = Duration::from_millis(200);
/// After a timeout's SIGKILL, how long to keep draining the pipes and to wait for the status.
const KILL_GRACE: Duration = Duration::from_secs(2);
const CHUNK: usize = 64 << 10;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Waits on `cv` while `waiting` holds, at most until `deadline` (`None`: for ever), and
/// gives the guard back: `waiting` is false then unless the deadline passed.
fn wait_while_until<'a, T>(
    cv: &Condvar,
    guard: MutexGuard<'a, T>,
    deadline: Option<Instant>,
    waiting: impl FnMut(&mut T) -> bool,
) -> MutexGuard<'a, T> {
    match deadline {
        None => cv
            .wait_while(guard, waiting)
            .unwrap_or_else(PoisonError::into_inner),
        Some(d) => {
            cv.wait_timeout_while(guard, d.saturating_duration_since(Instant::now()), waiting)
                .unwrap_or_else(PoisonError::into_inner)
                .0
        }
    }
}

/// Serves one connection: reads requests, answers them, until the peer closes the connection
/// (`Ok`) or a protocol or I/O error (`Err`; the connection should then be dropped).
pub fn serve_connection<S: Read + Write>(stream: S, table: &ProcessTable) -> io::Result<()> {
    serve(stream, table, None)
}

/// [`serve_connection`] for a socket: an `exec` also watches the connection and kills its
/// command as soon as the host closes or resets it (see the module docs).
pub fn serve_socket<S: Read + Write + AsFd>(stream: S, table: &ProcessTable) -> io::Result<()> {
    // Valid as long as `stream`, which `serve` owns until it returns.
    let fd = stream.as_fd().as_raw_fd();
    serve(stream, table, Some(fd))
}

/// The request loop; `hangup` is the connection's descriptor, watched during `exec`.
fn serve<S: Read + Write>(
    mut stream: S,
    table: &ProcessTable,
    hangup: Option<RawFd>,
) -> io::Result<()> {
    loop {
        let (json, data) = match proto::read_raw_frame(&mut stream) {
            Ok(frame) => frame,
            Err(FrameError::Closed) => return Ok(()),
            Err(FrameError::Io(e)) => return Err(e),
            Err(e) => {
                let _ = send_error(&mut stream, error_kind::INVALID, &e.to_string());
                return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string()));
            }
        };
        let req: Request = match serde_json::from_slice(&json) {
            Ok(req) => req,
            Err(e) => {
                // A well-formed header with an unknown op, or a known op with bad fields,
                // leaves the stream in sync: answer and go on. Anything else closes.
                let value = serde_json::from_slice::<serde_json::Value>(&json).ok();
                let op = value
                    .as_ref()
                    .and_then(|v| v.get("op"))
                    .and_then(|v| v.as_str());
                match op {
                    Some(op) if KNOWN_OPS.contains(&op) => {
                        send_error(
                            &mut stream,
                            error_kind::INVALID,
                            &format!("bad {op:?} request: {e}"),
                        )?;
                        continue;
                    }
                    Some(op) => {
                        send_error(
                            &mut stream,
                            error_kind::UNSUPPORTED,
                            &format!("unknown op {op:?}"),
                        )?;
                        continue;
                    }
                    None => {
                        let message = format!("malformed request header: {e}");
                        let _ = send_error(&mut stream, error_kind::INVALID, &message);
                        return Err(io::Error::new(io::ErrorKind::InvalidData, message));
                    }
                }
            }
        };
        let result = match req {
            Request::Exec {
                argv,
                env,
                cwd,
                timeout_ms,
                shell,
            } => exec::exec(
                &mut stream,
                hangup,
                table,
                &SpawnSpec {
                    argv: &argv,
                    env: &env,
                    cwd: cwd.as_deref(),
                    shell,
                },
                timeout_ms,
                data,
            ),
            Request::RunCode {
                timeout_ms,
                output_limit,
                reseed,
            } => python::run_code(
                table,
                hangup,
                data,
                &python::Cell {
                    timeout_ms,
                    output_limit,
                    reseed,
                },
            ),
            Request::ConnectTcp { port } => match pipe::connect(port, hangup) {
                Ok(tcp) => {
                    proto::write_frame(&mut stream, &Response::Ok {}, &[])?;
                    // From here on the connection is a byte pipe; it ends with the splice.
                    return pipe::splice(hangup, tcp);
                }
                Err(f) => Err(f),
            },
            Request::PtyAttach { pid } => match pty::attachable(pid, hangup) {
                Ok(pid) => {
                    proto::write_frame(&mut stream, &Response::Ok {}, &[])?;
                    // From here on the connection is a byte pipe to the terminal.
                    let Some(fd) = hangup else {
                        return Ok(());
                    };
                    return pty::attach(pid, fd);
                }
                Err(f) => Err(f),
            },
            other => handle(table, other, data),
        };
        match result {
            Ok((resp, payload)) => proto::write_frame(&mut stream, &resp, &payload)?,
            Err(Failure::Reply { kind, message }) => send_error(&mut stream, kind, &message)?,
            Err(Failure::Connection(e)) => return Err(e),
        }
    }
}

fn handle(table: &ProcessTable, req: Request, data: Vec<u8>) -> OpResult {
    match req {
        Request::Hello { version } => {
            if version != PROTOCOL_VERSION {
                return Err(Failure::reply(
                    error_kind::UNSUPPORTED,
                    format!("agent speaks protocol {PROTOCOL_VERSION}, host asked for {version}"),
                ));
            }
            ok(Response::Hello {
                version: PROTOCOL_VERSION,
                agent: env!("CARGO_PKG_VERSION").to_string(),
                pid: std::process::id(),
            })
        }
        // Served by `serve_connection` (it streams).
        Request::Exec { .. } => Err(Failure::reply(error_kind::INVALID, "exec not here")),
        Request::RunCode { .. } => Err(Failure::reply(error_kind::INVALID, "run_code not here")),
        Request::ConnectTcp { .. } => {
            Err(Failure::reply(error_kind::INVALID, "connect_tcp not here"))
        }
        Request::PtyAttach { .. } => {
            Err(Failure::reply(error_kind::INVALID, "pty_attach not here"))
        }
        Request::PtyOpen {
            argv,
            env,
            cwd,
            cols,
            rows,
        } => pty::open(table, &argv, &env, cwd.as_deref(), cols, rows),
        Request::PtyResize { pid, cols, rows } => pty::resize(pid, cols, rows),
        Request::Spawn {
            argv,
            env,
            cwd,
            shell,
        } => processes::spawn(
            table,
            &SpawnSpec {
                argv: &argv,
                env: &env,
                cwd: cwd.as_deref(),
                shell,
            },
        ),
        Request::Output { pid } => processes::output(table, pid),
        Request::Wait { pid, timeout_ms } => processes::wait(table, pid, timeout_ms),
        Request::Signal { pid, signal } => processes::signal(table, pid, signal),
        Request::Stdin { pid, close } => processes::stdin(table, pid, close, &data),
        Request::Processes {} => processes::list(table),
        Request::ReadFile { path } => files::read_file(&path),
        Request::WriteFile { path, mode, append } => files::write_file(&path, mode, append, &data),
        Request::List { path } => files::list(&path),
        Request::Remove { path, recursive } => files::remove(&path, recursive),
        Request::Exists { path } => files::exists(&path),
        Request::Mkdir { path } => files::mkdir(&path),
        Request::Sync {} => system::sync(),
        Request::SetTime { unix_ns } => system::set_time(unix_ns),
        Request::Refresh { unix_ns } => system::refresh(unix_ns, &data),
        Request::PortOpen { port } => system::port_open(port),
        Request::Mount {
            source,
            target,
            fstype,
            read_only,
        } => system::mount(&source, &target, &fstype, read_only),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_ops_match_the_request_enum() {
        let samples = vec![
            Request::Hello { version: 1 },
            Request::Exec {
                argv: vec![],
                env: vec![],
                cwd: None,
                timeout_ms: None,
                shell: false,
            },
            Request::Spawn {
                argv: vec![],
                env: vec![],
                cwd: None,
                shell: false,
            },
            Request::Output { pid: 1 },
            Request::Wait {
                pid: 1,
                timeout_ms: None,
            },
            Request::Signal { pid: 1, signal: 1 },
            Request::Stdin {
                pid: 1,
                close: false,
            },
            Request::Processes {},
            Request::ReadFile { path: "x".into() },
            Request::WriteFile {
                path: "x".into(),
                mode: None,
                append: false,
            },
            Request::List { path: "x".into() },
            Request::Remove {
                path: "x".into(),
                recursive: false,
            },
            Request::Exists { path: "x".into() },
            Request::Mkdir { path: "x".into() },
            Request::Sync {},
            Request::SetTime { unix_ns: 0 },
            Request::Refresh { unix_ns: 0 },
            Request::Mount {
                source: "x".into(),
                target: "/x".into(),
                fstype: "virtiofs".into(),
                read_only: false,
            },
            Request::PortOpen { port: 1 },
            Request::RunCode {
                timeout_ms: None,
                output_limit: None,
                reseed: false,
            },
            Request::ConnectTcp { port: 1 },
            Request::PtyOpen {
                argv: vec![],
                env: vec![],
                cwd: None,
                cols: 80,
                rows: 24,
            },
            Request::PtyResize {
                pid: 1,
                cols: 80,
                rows: 24,
            },
            Request::PtyAttach { pid: 1 },
        ];
        assert_eq!(samples.len(), KNOWN_OPS.len());
        for s in samples {
            let v = serde_json::to_value(&s).unwrap();
            let op = v["op"].as_str().unwrap().to_string();
            assert!(KNOWN_OPS.contains(&op.as_str()), "{op}");
        }
    }
}
