//! The background-process operations: `spawn` (its output captured for later), `output`,
//! `wait`, `signal`, `stdin` and `processes`.

use std::io::Write;
use std::thread;
use std::time::{Duration, Instant};

use super::capture::{capture_loop, wait_captured};
use super::reply::{Failure, OpResult, ok, unknown_pid};
use super::table::{ProcessTable, SpawnSpec, killpg};
use super::{EXIT_GRACE, lock};
use crate::proto::{ProcessInfo, Response, error_kind};

pub(super) fn spawn(table: &ProcessTable, spec: &SpawnSpec<'_>) -> OpResult {
    let started = table.start(spec, None, true, None)?;
    let pid = started.pid;
    let Some((capture, _)) = table.capture_of(pid) else {
        return Err(Failure::reply(error_kind::IO, "process vanished"));
    };
    for (file, is_stdout) in [(started.stdout, true), (started.stderr, false)] {
        let capture = capture.clone();
        let spawned = thread::Builder::new()
            .name(format!("capture-{pid}"))
            .spawn(move || capture_loop(file, &capture, is_stdout));
        if let Err(e) = spawned {
            let _ = killpg(pid, libc::SIGKILL);
            return Err(Failure::io("starting a capture thread", &e));
        }
    }
    ok(Response::Spawned { pid })
}

pub(super) fn output(table: &ProcessTable, pid: u32) -> OpResult {
    let Some((capture, exit)) = table.capture_of(pid) else {
        return Err(unknown_pid(pid));
    };
    if exit.is_some() {
        wait_captured(&capture, EXIT_GRACE);
    }
    let mut c = lock(&capture.state);
    let stdout_len = c.stdout.buf.len();
    let mut data = Vec::with_capacity(stdout_len + c.stderr.buf.len());
    data.extend(c.stdout.buf.drain(..));
    data.extend(c.stderr.buf.drain(..));
    ok(Response::Output {
        running: exit.is_none(),
        dropped_stdout: c.stdout.dropped,
        dropped_stderr: c.stderr.dropped,
        // At most OUTPUT_BUFFER.
        stdout_len: stdout_len as u32,
    })
    .map(|(resp, _)| (resp, data))
}

pub(super) fn wait(table: &ProcessTable, pid: u32, timeout_ms: Option<u64>) -> OpResult {
    // A deadline too far to represent is none (never a panic on a huge `timeout_ms`).
    let deadline = timeout_ms.and_then(|ms| Instant::now().checked_add(Duration::from_millis(ms)));
    match table.wait_exit(pid, deadline) {
        Err(()) => Err(unknown_pid(pid)),
        Ok(None) => ok(Response::Running { pid }),
        Ok(Some(exit)) => {
            // Let the capture threads take the last output, so that an `output`
            // after `exit` sees all of it.
            if let Some((capture, _)) = table.capture_of(pid) {
                wait_captured(&capture, EXIT_GRACE);
            }
            ok(Response::Exit {
                code: exit.code,
                signal: exit.signal,
                timed_out: false,
            })
        }
    }
}

pub(super) fn signal(table: &ProcessTable, pid: u32, signal: i32) -> OpResult {
    if !lock(&table.state).procs.contains_key(&pid) {
        return Err(unknown_pid(pid));
    }
    match killpg(pid, signal) {
        Ok(()) => ok(Response::Ok {}),
        // The group is gone already.
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => ok(Response::Ok {}),
        Err(e) => Err(Failure::io(&format!("signal {signal} to {pid}"), &e)),
    }
}

pub(super) fn stdin(table: &ProcessTable, pid: u32, close: bool, data: &[u8]) -> OpResult {
    let stdin = lock(&table.state).procs.get(&pid).map(|p| p.stdin.clone());
    let Some(stdin) = stdin else {
        return Err(unknown_pid(pid));
    };
    let mut stdin = lock(&stdin);
    if !data.is_empty() {
        let Some(w) = stdin.as_mut() else {
            return Err(Failure::reply(
                error_kind::INVALID,
                format!("stdin of {pid} is closed"),
            ));
        };
        if let Err(e) = w.write_all(data) {
            *stdin = None;
            return Err(Failure::io(&format!("writing stdin of {pid}"), &e));
        }
    }
    if close {
        *stdin = None;
    }
    ok(Response::Ok {})
}

pub(super) fn list(table: &ProcessTable) -> OpResult {
    let state = lock(&table.state);
    let list = state
        .procs
        .iter()
        .filter(|(_, p)| p.background)
        .map(|(pid, p)| ProcessInfo {
            pid: *pid,
            argv: p.argv.clone(),
            running: p.exit.is_none(),
            code: p.exit.and_then(|e| e.code),
            signal: p.exit.and_then(|e| e.signal),
        })
        .collect();
    ok(Response::Processes { list })
}
