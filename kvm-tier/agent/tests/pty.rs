#![allow(clippy::unwrap_used)]
//! Terminals (`pty_open`, `pty_resize`, `pty_attach`) on the agent's server, in-process, over
//! `UnixStream::pair` (an attachment needs a socket, so these use `serve_socket`).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use dormant_agent::client::{Client, ClientError};
use dormant_agent::proto::{MAX_TERMINAL_CELLS, TERMINAL_BACKLOG};

fn connect() -> Client<UnixStream> {
    common::connect_socket(Duration::from_secs(60))
}

fn agent_kind(e: &ClientError) -> &str {
    e.agent_kind()
        .unwrap_or_else(|| panic!("expected an agent error, got {e:?}"))
}

/// The prompt of the shells these tests type into (dash takes `PS1` from its environment).
const PROMPT: &str = "ready> ";

/// Where `want` first occurs in `seen` at or after `from`: the offset just past it.
fn find(seen: &[u8], from: usize, want: &str) -> Option<usize> {
    let want = want.as_bytes();
    seen.get(from..)?
        .windows(want.len())
        .position(|w| w == want)
        .map(|at| from + at + want.len())
}

/// Reads from an attachment until `seen` holds `want` (after `from`), at most a minute;
/// returns the offset just past it.
fn read_until(pipe: &mut UnixStream, seen: &mut Vec<u8>, from: usize, want: &str) -> usize {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = find(seen, from, want) {
            return end;
        }
        assert!(
            Instant::now() < deadline,
            "no {want:?} in {:?}",
            String::from_utf8_lossy(seen)
        );
        let n = pipe.read(&mut buf).unwrap_or_else(|e| {
            panic!(
                "{e} waiting for {want:?} in {:?}",
                String::from_utf8_lossy(seen)
            )
        });
        assert!(
            n > 0,
            "end of file before {want:?}: {:?}",
            String::from_utf8_lossy(seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn stty_size_follows_resize_and_typed_input_echoes() {
    let mut c = connect();
    let pid = c
        .pty_open(&["sh"], &[("PS1", PROMPT)], None, 80, 24)
        .unwrap();
    let mut pipe = connect().pty_attach(pid).unwrap();
    let mut seen = Vec::new();
    pipe.write_all(b"stty size; echo \"term=$TERM\"\n").unwrap();
    read_until(&mut pipe, &mut seen, 0, "24 80");
    read_until(&mut pipe, &mut seen, 0, "term=xterm-256color");
    c.pty_resize(pid, 132, 43).unwrap();
    let mark = seen.len();
    pipe.write_all(b"stty size\n").unwrap();
    let answered = read_until(&mut pipe, &mut seen, mark, "43 132");
    // The terminal echoes what is typed, before the command runs. Typed once the shell waits
    // for input (its prompt after that answer): typed ahead, the echo and the prompt may
    // interleave, as on any terminal.
    read_until(&mut pipe, &mut seen, answered, PROMPT);
    let mark = seen.len();
    pipe.write_all(b"echo typed-$((40+2))\n").unwrap();
    read_until(&mut pipe, &mut seen, mark, "echo typed-$((40+2))");
    read_until(&mut pipe, &mut seen, mark, "typed-42");
    // `exit` ends the program: the attachment reads to end of file, `wait` has its code.
    pipe.write_all(b"exit 7\n").unwrap();
    let mut rest = Vec::new();
    pipe.read_to_end(&mut rest).unwrap();
    let exit = c.wait(pid, Some(Duration::from_secs(60))).unwrap().unwrap();
    assert_eq!(exit.code, Some(7));
}

#[test]
fn a_program_never_blocks_unattached_and_a_later_attach_gets_the_backlog() {
    let mut c = connect();
    // Far more output than a terminal's buffer, with nobody attached.
    let script = "i=0; while [ $i -lt 20000 ]; do echo line-$i; i=$((i+1)); done; echo all-done";
    let pid = c
        .pty_open(&["sh", "-c", script], &[], None, 80, 24)
        .unwrap();
    let exit = c
        .wait(pid, Some(Duration::from_secs(120)))
        .unwrap()
        .unwrap();
    assert_eq!(exit.code, Some(0));
    // The newest bytes (the backlog, then what the reader still drains from the terminal's
    // own buffer), then end of file (the program ended).
    let total: usize = (0..20000).map(|i| format!("line-{i}\r\n").len()).sum();
    let mut pipe = connect().pty_attach(pid).unwrap();
    let mut got = Vec::new();
    pipe.read_to_end(&mut got).unwrap();
    assert!(got.len() >= TERMINAL_BACKLOG, "{}", got.len());
    assert!(got.len() < total / 2, "{} of {total}", got.len());
    let text = String::from_utf8_lossy(&got);
    assert!(text.ends_with("line-19999\r\nall-done\r\n"), "{text:?}");
    // Delivered once: a second attach finds nothing more.
    let mut pipe = connect().pty_attach(pid).unwrap();
    let mut again = Vec::new();
    pipe.read_to_end(&mut again).unwrap();
    assert!(again.is_empty(), "{again:?}");
}

#[test]
fn a_reattach_finds_the_same_shell_and_takes_over_from_the_previous_one() {
    let mut c = connect();
    let pid = c
        .pty_open(&[], &[("GREETING", "hi")], None, 80, 24)
        .unwrap();
    let mut first = connect().pty_attach(pid).unwrap();
    let mut seen = Vec::new();
    first
        .write_all(b"KEPT=value-$GREETING; echo set-$KEPT\n")
        .unwrap();
    read_until(&mut first, &mut seen, 0, "set-value-hi");
    // Detached by closing: the shell runs on. Output meanwhile waits in the backlog.
    drop(first);
    let mut second = connect().pty_attach(pid).unwrap();
    let mut seen = Vec::new();
    second.write_all(b"echo still-$KEPT\n").unwrap();
    read_until(&mut second, &mut seen, 0, "still-value-hi");
    // A third attach ends the second: its reads see end of file.
    let mut third = connect().pty_attach(pid).unwrap();
    let mut rest = Vec::new();
    second.read_to_end(&mut rest).unwrap();
    let mut seen = Vec::new();
    third.write_all(b"echo third-$KEPT\n").unwrap();
    read_until(&mut third, &mut seen, 0, "third-value-hi");
    // The process is a background process: listed, signalled, waited for.
    assert!(
        c.processes()
            .unwrap()
            .iter()
            .any(|p| p.pid == pid && p.running)
    );
    c.signal(pid, libc::SIGKILL).unwrap();
    let exit = c.wait(pid, Some(Duration::from_secs(60))).unwrap().unwrap();
    assert_eq!(exit.signal, Some(libc::SIGKILL));
    let mut rest = Vec::new();
    third.read_to_end(&mut rest).unwrap();
}

#[test]
fn bad_sizes_and_unknown_terminals_are_clear_errors() {
    let mut c = connect();
    for (cols, rows) in [(0, 24), (80, 0), (MAX_TERMINAL_CELLS + 1, 24)] {
        let e = c.pty_open(&["sh"], &[], None, cols, rows).unwrap_err();
        assert_eq!(agent_kind(&e), "invalid", "{e}");
        assert!(e.to_string().contains("from 1 to"), "{e}");
    }
    let e = c.pty_resize(999_999, 80, 24).unwrap_err();
    assert_eq!(agent_kind(&e), "not_found", "{e}");
    let e = connect().pty_attach(999_999).unwrap_err();
    assert_eq!(agent_kind(&e), "not_found", "{e}");
    let e = c
        .pty_open(&["/nonexistent/program"], &[], None, 80, 24)
        .unwrap_err();
    assert_eq!(agent_kind(&e), "not_found", "{e}");
    // The connection stays usable after each.
    assert!(c.hello().is_ok());
    let pid = c.pty_open(&["sh"], &[], None, 80, 24).unwrap();
    let e = c.pty_resize(pid, 80, 0).unwrap_err();
    assert_eq!(agent_kind(&e), "invalid", "{e}");
    c.signal(pid, libc::SIGKILL).unwrap();
    c.wait(pid, Some(Duration::from_secs(60))).unwrap().unwrap();
}
