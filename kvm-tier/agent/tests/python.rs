#![allow(clippy::unwrap_used)]
//! `run_code`: the agent's persistent Python interpreter, with the agent in-process over
//! `UnixStream::pair` and the host's `python3`. (Its own test binary: the interpreter is one
//! per process, and these tests end it on purpose; a lock runs them one at a time.)

mod common;

use std::os::unix::net::UnixStream;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::Duration;

use dormant_agent::client::{CellOutput, Client};
use dormant_agent::proto::{self, RUN_CODE_OUTPUT_MAX, Request};
use dormant_agent::server::{ProcessTable, serve_connection, serve_socket};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

fn connect() -> Client<UnixStream> {
    common::connect_socket(Duration::from_secs(60))
}

fn run(c: &mut Client<UnixStream>, code: &str) -> CellOutput {
    c.run_code(code, Some(Duration::from_secs(30)), None)
        .unwrap()
}

/// Waits (generously) until a cell has created `path`.
fn wait_for(path: &std::path::Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{path:?} never appeared"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

fn stdout(out: &CellOutput) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &CellOutput) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

#[test]
fn state_persists_and_a_final_expression_is_printed() {
    let _s = serial();
    let mut c = connect();
    let out = run(
        &mut c,
        "persist_a = 40\nimport sys\nprint('out')\nprint('err', file=sys.stderr)",
    );
    assert_eq!(out.error, None);
    assert_eq!(stdout(&out), "out\n");
    assert_eq!(stderr(&out), "err\n");
    assert!(!out.lost && !out.timed_out && !out.stdout_over && !out.stderr_over);
    // Another connection, the same interpreter.
    let mut c2 = connect();
    assert_eq!(stdout(&run(&mut c2, "persist_a + 2")), "42\n");
    assert_eq!(stdout(&run(&mut c2, "None")), "");
    assert_eq!(stdout(&run(&mut c2, "'a' + 'b'")), "'ab'\n");
    // Not a final expression: nothing printed.
    assert_eq!(stdout(&run(&mut c2, "persist_b = persist_a")), "");
    // Non-ASCII output and code.
    assert_eq!(stdout(&run(&mut c2, "print('é ✓ 😀')")), "é ✓ 😀\n");
}

#[test]
fn an_exception_is_the_cells_error_and_the_session_goes_on() {
    let _s = serial();
    let mut c = connect();
    run(&mut c, "exc_x = 1");
    let out = run(&mut c, "print('before')\n1 / 0");
    let err = out.error.clone().unwrap();
    assert_eq!(err.name, "ZeroDivisionError");
    assert_eq!(err.value, "division by zero");
    assert!(err.traceback.contains("ZeroDivisionError"), "{err:?}");
    assert!(err.traceback.contains("<cell>"), "{err:?}");
    assert_eq!(stdout(&out), "before\n");
    assert!(stderr(&out).contains("ZeroDivisionError: division by zero"));
    assert!(!out.lost);
    let out = run(&mut c, "raise SystemExit(4)");
    assert_eq!(out.error.unwrap().name, "SystemExit");
    let out = run(&mut c, "def f(:\n  pass");
    assert_eq!(out.error.unwrap().name, "SyntaxError");
    assert_eq!(stdout(&run(&mut c, "exc_x + 1")), "2\n");
}

#[test]
fn descriptor_level_output_and_subprocesses_reach_the_cell_without_breaking_it() {
    let _s = serial();
    let mut c = connect();
    let out = run(
        &mut c,
        "import os, subprocess\nprint('a')\nos.write(1, b'x')\nos.write(2, b'y')\n\
         os.system('echo hi; echo there >&2')\n\
         subprocess.run(['sh', '-c', 'echo sub'])\nprint('z')",
    );
    assert_eq!(out.error, None);
    assert_eq!(stdout(&out), "a\nxhi\nsub\nz\n");
    assert_eq!(stderr(&out), "ythere\n");
    // Bytes that look like the agent's framing change nothing.
    let out = run(
        &mut c,
        "os.write(1, (8).to_bytes(4, 'little') + b'\\x00' * 12)\nos.write(3, b'') if False else 7",
    );
    assert_eq!(out.stdout.len(), 16 + 2, "{:?}", out.stdout);
    assert!(out.stdout.ends_with(b"7\n"));
    assert_eq!(stdout(&run(&mut c, "6 * 7")), "42\n");
}

#[test]
fn output_over_the_limit_is_dropped_and_flagged() {
    let _s = serial();
    let mut c = connect();
    let out = c
        .run_code(
            "import sys\nprint('x' * 5000)\nprint('y' * 10, file=sys.stderr)\nover_v = 1",
            None,
            Some(1000),
        )
        .unwrap();
    assert_eq!(out.error, None);
    assert!(out.stdout_over && !out.stderr_over);
    assert_eq!(out.stdout, vec![b'x'; 1000]);
    assert_eq!(stderr(&out), format!("{}\n", "y".repeat(10)));
    // The cell ran to its end, and the session goes on.
    assert_eq!(stdout(&run(&mut c, "over_v")), "1\n");
    // A limit above the agent's cap is lowered to it; a timeout past any clock is none.
    let out = c
        .run_code("print('ok')", Some(Duration::MAX), Some(usize::MAX))
        .unwrap();
    assert_eq!(stdout(&out), "ok\n");
    const { assert!(RUN_CODE_OUTPUT_MAX <= 8 << 20) };
}

#[test]
fn a_timeout_interrupts_the_cell_and_keeps_the_session() {
    let _s = serial();
    let mut c = connect();
    run(&mut c, "timeout_v = 5");
    let out = c
        .run_code("while True: pass", Some(Duration::from_millis(300)), None)
        .unwrap();
    assert!(out.timed_out && !out.lost, "{out:?}");
    assert_eq!(out.error.clone().unwrap().name, "KeyboardInterrupt");
    assert_eq!(stdout(&run(&mut c, "timeout_v")), "5\n");
    // A cell in a child process: the interrupt goes to the whole group.
    let out = c
        .run_code(
            "import os\nos.system('sleep 60')\n'after'",
            Some(Duration::from_millis(300)),
            None,
        )
        .unwrap();
    assert!(out.timed_out && !out.lost, "{out:?}");
    assert_eq!(stdout(&run(&mut c, "timeout_v")), "5\n");
}

#[test]
fn a_cell_that_ignores_its_interrupt_is_killed_and_the_next_starts_afresh() {
    let _s = serial();
    let mut c = connect();
    run(
        &mut c,
        "ignore_v = 1\nimport signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)",
    );
    let out = c
        .run_code("while True: pass", Some(Duration::from_millis(200)), None)
        .unwrap();
    assert!(out.timed_out && out.lost, "{out:?}");
    let err = out.error.unwrap();
    assert_eq!(err.name, "SessionLost");
    assert!(err.value.contains("killed"), "{err:?}");
    let out = run(&mut c, "ignore_v");
    assert_eq!(out.error.unwrap().name, "NameError");
    assert_eq!(stdout(&run(&mut c, "1 + 1")), "2\n");
}

#[test]
fn an_interpreter_that_exits_loses_the_session_and_the_next_cell_starts_afresh() {
    let _s = serial();
    let mut c = connect();
    run(&mut c, "exit_v = 1");
    let out = run(&mut c, "import os\nprint('bye', flush=True)\nos._exit(3)");
    assert!(out.lost && !out.timed_out, "{out:?}");
    let err = out.error.clone().unwrap();
    assert_eq!(err.name, "SessionLost");
    assert!(err.value.contains("exited with code 3"), "{err:?}");
    assert_eq!(stdout(&out), "bye\n");
    let out = run(&mut c, "exit_v");
    assert_eq!(out.error.unwrap().name, "NameError");
    // A cell that closes the driver's pipes (they are the only pipes above 2) loses the
    // session too.
    let out = run(
        &mut c,
        "import os\nexit_w = 2\nfor fd in os.listdir('/proc/self/fd'):\n    \
         try: pipe = os.readlink('/proc/self/fd/' + fd).startswith('pipe:')\n    \
         except OSError: continue\n    \
         if int(fd) > 2 and pipe: os.close(int(fd))",
    );
    assert!(out.lost, "{out:?}");
    assert_eq!(out.error.unwrap().name, "SessionLost");
    assert_eq!(stdout(&run(&mut c, "'exit_w' in globals()")), "False\n");
}

#[test]
fn a_host_that_goes_away_interrupts_its_cell() {
    let _s = serial();
    let mut c = connect();
    run(&mut c, "hang_v = 9");
    drop(c);
    let (mut raw, theirs) = UnixStream::pair().unwrap();
    thread::spawn(move || serve_socket(theirs, ProcessTable::global()));
    let req = Request::RunCode {
        timeout_ms: None,
        output_limit: None,
        reseed: false,
    };
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("running");
    let code = format!("hang_v = 10\nopen({marker:?}, 'w').close()\nwhile True: pass");
    proto::write_frame(&mut raw, &req, code.as_bytes()).unwrap();
    wait_for(&marker);
    drop(raw);
    // The next connection's cell waits for the interrupted one, then sees the session.
    let mut c = connect();
    assert_eq!(stdout(&run(&mut c, "hang_v")), "10\n");
}

#[test]
fn bad_code_is_refused_and_cells_wait_their_turn() {
    let _s = serial();
    let mut c = connect();
    let err = c
        .request(
            &Request::RunCode {
                timeout_ms: None,
                output_limit: None,
                reseed: false,
            },
            b"\xff\xfe",
        )
        .unwrap_err();
    assert_eq!(err.agent_kind(), Some("invalid"));
    // Two connections at once: the second cell waits for the first.
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("running");
    let code =
        format!("import time\nopen({marker:?}, 'w').close()\ntime.sleep(0.5)\nturn_v = 'first'");
    let t = thread::spawn(move || {
        let mut c = connect();
        run(&mut c, &code)
    });
    wait_for(&marker);
    let out = run(&mut c, "turn_v");
    assert_eq!(t.join().unwrap().error, None);
    assert_eq!(stdout(&out), "'first'\n");
    // serve_connection (no hangup watch) serves run_code too.
    let (ours, theirs) = UnixStream::pair().unwrap();
    thread::spawn(move || serve_connection(theirs, ProcessTable::global()));
    let mut c = Client::new(ours);
    assert_eq!(stdout(&run(&mut c, "turn_v")), "'first'\n");
}

#[test]
fn a_reseeding_cell_gets_fresh_random_streams() {
    let _s = serial();
    let mut c = connect();
    let draw = |c: &mut Client<UnixStream>, reseed: bool| {
        run(c, "import random\nrandom.seed(7)");
        let req = Request::RunCode {
            timeout_ms: None,
            output_limit: None,
            reseed,
        };
        let out = c.run_code_request(&req, "random.random()").unwrap();
        assert_eq!(out.error, None);
        stdout(&out)
    };
    let seeded = draw(&mut c, false);
    assert_eq!(
        draw(&mut c, false),
        seeded,
        "the same seed, the same stream"
    );
    assert_ne!(draw(&mut c, true), seeded, "reseeded from the entropy pool");
    // Not a run_code request: refused without sending.
    assert!(c.run_code_request(&Request::Sync {}, "1").is_err());
    assert_eq!(stdout(&run(&mut c, "1")), "1\n");
}
