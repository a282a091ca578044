#![allow(clippy::unwrap_used)]
//! The agent's server, in-process, over `UnixStream::pair`.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::{Duration, Instant};

use dormant_agent::client::{Client, ClientError};
use dormant_agent::proto::{self, Request, Response};
use dormant_agent::server::{ProcessTable, serve_connection, serve_socket};

/// A client connected to a fresh in-process server thread.
fn connect() -> Client<UnixStream> {
    let (ours, theirs) = UnixStream::pair().unwrap();
    thread::spawn(move || {
        let _ = serve_connection(theirs, ProcessTable::global());
    });
    ours.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    Client::new(ours)
}

fn raw_connection() -> (UnixStream, thread::JoinHandle<std::io::Result<()>>) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let h = thread::spawn(move || serve_connection(theirs, ProcessTable::global()));
    ours.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    (ours, h)
}

fn agent_kind(e: &ClientError) -> &str {
    e.agent_kind()
        .unwrap_or_else(|| panic!("expected an agent error, got {e:?}"))
}

#[test]
fn hello_and_version_mismatch() {
    let mut c = connect();
    let info = c.hello().unwrap();
    assert_eq!(info.version, 1);
    assert_eq!(info.agent, env!("CARGO_PKG_VERSION"));
    assert_eq!(info.pid, std::process::id());
    let err = c.request(&Request::Hello { version: 2 }, &[]).unwrap_err();
    assert_eq!(agent_kind(&err), "unsupported");
    // Still usable.
    assert!(c.hello().is_ok());
}

#[test]
fn exec_basics() {
    let mut c = connect();
    let out = c
        .exec_collect(&["echo", "hello"], &[], None, b"", None)
        .unwrap();
    assert_eq!(out.stdout, b"hello\n");
    assert!(out.stderr.is_empty());
    assert_eq!(out.status.code, Some(0));
    assert!(out.status.success());
    assert!(!out.status.timed_out);

    let out = c
        .exec_collect(&["sh", "-c", "exit 3"], &[], None, b"", None)
        .unwrap();
    assert_eq!(out.status.code, Some(3));
    assert_eq!(out.status.signal, None);

    let out = c
        .exec_collect(
            &["sh", "-c", "echo out; echo err >&2; echo $FOO; pwd"],
            &[("FOO", "bar")],
            Some("/tmp"),
            b"",
            None,
        )
        .unwrap();
    assert_eq!(out.stdout, b"out\nbar\n/tmp\n");
    assert_eq!(out.stderr, b"err\n");

    let out = c
        .exec_collect(&["sh", "-c", "kill -9 $$"], &[], None, b"", None)
        .unwrap();
    assert_eq!(out.status.code, None);
    assert_eq!(out.status.signal, Some(9));
}

#[test]
fn exec_stdin() {
    let mut c = connect();
    let out = c
        .exec_collect(&["cat"], &[], None, b"piped input\n", None)
        .unwrap();
    assert_eq!(out.stdout, b"piped input\n");
    // Empty stdin: EOF at once.
    let out = c.exec_collect(&["cat"], &[], None, b"", None).unwrap();
    assert!(out.stdout.is_empty());
    assert_eq!(out.status.code, Some(0));
    // Large stdin through a child that echoes it back (needs the stdin writer not to block
    // the output loop).
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let out = c.exec_collect(&["cat"], &[], None, &big, None).unwrap();
    assert_eq!(out.stdout.len(), big.len());
    assert!(out.stdout == big);
    // A child that ignores its stdin.
    let out = c.exec_collect(&["true"], &[], None, &big, None).unwrap();
    assert_eq!(out.status.code, Some(0));
}

#[test]
fn exec_large_output_streams_in_chunks() {
    let mut c = connect();
    let mut chunks = 0usize;
    let mut total = 0usize;
    let mut all_zero = true;
    let status = c
        .exec(
            &["head", "-c", "5242880", "/dev/zero"],
            &[],
            None,
            b"",
            None,
            &mut |d| {
                chunks += 1;
                total += d.len();
                all_zero &= d.iter().all(|&b| b == 0);
            },
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(status.code, Some(0));
    assert_eq!(total, 5 << 20);
    assert!(all_zero);
    assert!(chunks >= 5 << 4, "{chunks} chunks"); // chunks are at most 64 KiB
}

#[test]
fn exec_timeout_kills_the_group() {
    let mut c = connect();
    let t = Instant::now();
    let out = c
        .exec_collect(
            &["sh", "-c", "sleep 10 & sleep 10; echo never"],
            &[],
            None,
            b"",
            Some(Duration::from_millis(300)),
        )
        .unwrap();
    let took = t.elapsed();
    assert!(out.status.timed_out);
    assert_eq!(out.status.signal, Some(9));
    assert_eq!(out.status.code, None);
    assert!(out.stdout.is_empty());
    assert!(took < Duration::from_secs(5), "{took:?}");

    let out = c
        .exec_collect(
            &["sleep", "10"],
            &[],
            None,
            b"",
            Some(Duration::from_millis(300)),
        )
        .unwrap();
    assert!(out.status.timed_out);
}

/// Whether any process of group `pgid` is left (the in-process reaper reaps every child).
fn group_alive(pgid: i32) -> bool {
    // SAFETY: plain syscall without pointers.
    unsafe { libc::kill(-pgid, 0) == 0 }
}

#[test]
fn exec_is_killed_when_the_host_closes_the_connection() {
    // With its pipes open, and with both closed (then the agent waits for the exit status).
    for script in [
        "echo $$; exec sleep 600",
        "echo $$; exec >&- 2>&-; exec sleep 600",
    ] {
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || serve_socket(theirs, ProcessTable::global()));
        ours.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let req = Request::Exec {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            env: vec![],
            cwd: None,
            timeout_ms: None,
            shell: false,
        };
        proto::write_frame(&mut ours, &req, b"").unwrap();
        let (resp, data) = proto::read_frame::<_, Response>(&mut ours).unwrap();
        assert!(matches!(resp, Response::Stdout {}), "{resp:?}");
        let pid: i32 = String::from_utf8(data).unwrap().trim().parse().unwrap();
        assert!(group_alive(pid));
        // The host goes away (an interrupted call) while the command runs.
        drop(ours);
        let deadline = Instant::now() + Duration::from_secs(60);
        while group_alive(pid) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !group_alive(pid),
            "{script:?}: the command outlived its connection"
        );
        assert!(server.join().unwrap().is_err(), "the connection ends");
    }
}

#[test]
fn exec_returns_when_a_grandchild_keeps_the_pipes() {
    let mut c = connect();
    let t = Instant::now();
    let out = c
        .exec_collect(
            &["sh", "-c", "echo start; sleep 5 & exit 0"],
            &[],
            None,
            b"",
            None,
        )
        .unwrap();
    assert_eq!(out.status.code, Some(0));
    assert_eq!(out.stdout, b"start\n");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

#[test]
fn exec_errors() {
    let mut c = connect();
    let err = c
        .exec_collect(&["definitely-not-a-command-xyz"], &[], None, b"", None)
        .unwrap_err();
    assert_eq!(agent_kind(&err), "not_found");
    assert!(err.is_not_found());
    let err = c.exec_collect(&[], &[], None, b"", None).unwrap_err();
    assert_eq!(agent_kind(&err), "invalid");
    let err = c
        .exec_collect(&["true"], &[], Some("/no/such/dir"), b"", None)
        .unwrap_err();
    assert_eq!(agent_kind(&err), "not_found");
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("noexec.sh");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    let err = c
        .exec_collect(&[script.to_str().unwrap()], &[], None, b"", None)
        .unwrap_err();
    assert_eq!(agent_kind(&err), "permission");
    // The connection is still fine.
    let out = c.exec_collect(&["true"], &[], None, b"", None).unwrap();
    assert!(out.status.success());
}

#[test]
fn background_process_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ticks");
    let file_s = file.to_str().unwrap().to_string();
    let script = "i=0; while true; do echo line$i; echo tick$i >&2; echo $i >> \"$TICKS\"; \
                  i=$((i+1)); sleep 0.05; done";
    let mut c = connect();
    let pid = c
        .spawn(&["sh", "-c", script], &[("TICKS", &file_s)], None)
        .unwrap();
    assert!(pid > 1);

    // It runs: the file grows and output accumulates.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(&file).map_or(0, |s| s.lines().count()) < 3 {
        assert!(Instant::now() < deadline, "the loop did not run");
        thread::sleep(Duration::from_millis(20));
    }
    let out = c.output(pid).unwrap();
    assert!(out.running);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.starts_with("line0\nline1\n"), "{stdout:?}");
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .starts_with("tick0\n")
    );
    assert_eq!(out.dropped_stdout, 0);
    // `output` drains: the next call starts where this one ended.
    thread::sleep(Duration::from_millis(200));
    let out2 = c.output(pid).unwrap();
    let stdout2 = String::from_utf8(out2.stdout).unwrap();
    assert!(!stdout2.starts_with("line0\n"), "{stdout2:?}");

    // Visible from another connection too.
    let mut c2 = connect();
    let list = c2.processes().unwrap();
    let me = list.iter().find(|p| p.pid == pid).unwrap();
    assert!(me.running);
    assert_eq!(me.argv[0], "sh");

    assert_eq!(c.wait(pid, Some(Duration::from_millis(100))).unwrap(), None);
    c.signal(pid, libc::SIGTERM).unwrap();
    let status = c.wait(pid, Some(Duration::from_secs(10))).unwrap().unwrap();
    assert_eq!(status.signal, Some(libc::SIGTERM));
    assert_eq!(status.code, None);
    // Waiting again answers at once; the table remembers.
    let again = c2.wait(pid, None).unwrap().unwrap();
    assert_eq!(again, status);
    let list = c2.processes().unwrap();
    let me = list.iter().find(|p| p.pid == pid).unwrap();
    assert!(!me.running);
    assert_eq!(me.signal, Some(libc::SIGTERM));
    assert!(!c.output(pid).unwrap().running);
    // Signalling an ended (but known) process is fine.
    c.signal(pid, libc::SIGTERM).unwrap();

    // Unknown pids.
    let bogus = 0x7fff_fff0;
    assert_eq!(agent_kind(&c.signal(bogus, 15).unwrap_err()), "not_found");
    assert_eq!(agent_kind(&c.output(bogus).unwrap_err()), "not_found");
    assert_eq!(agent_kind(&c.wait(bogus, None).unwrap_err()), "not_found");
    assert_eq!(
        agent_kind(&c.stdin(bogus, b"x", false).unwrap_err()),
        "not_found"
    );
    assert_eq!(
        agent_kind(&c.spawn(&["no-such-program-xyz"], &[], None).unwrap_err()),
        "not_found"
    );
}

#[test]
fn background_stdin_and_exit_code() {
    let mut c = connect();
    let pid = c.spawn(&["sh", "-c", "cat; exit 7"], &[], None).unwrap();
    c.stdin(pid, b"first ", false).unwrap();
    c.stdin(pid, b"second\n", true).unwrap();
    let status = c.wait(pid, Some(Duration::from_secs(10))).unwrap().unwrap();
    assert_eq!(status.code, Some(7));
    let out = c.output(pid).unwrap();
    assert!(!out.running);
    assert_eq!(out.stdout, b"first second\n");
    // Stdin is closed now.
    assert_eq!(
        agent_kind(&c.stdin(pid, b"more", false).unwrap_err()),
        "invalid"
    );
}

#[test]
fn background_output_is_bounded() {
    let mut c = connect();
    let n: u64 = 3_000_000;
    let pid = c
        .spawn(
            &["sh", "-c", &format!("head -c {n} /dev/zero; echo done >&2")],
            &[],
            None,
        )
        .unwrap();
    let status = c.wait(pid, Some(Duration::from_secs(20))).unwrap().unwrap();
    assert_eq!(status.code, Some(0));
    let out = c.output(pid).unwrap();
    assert_eq!(out.stdout.len(), 1 << 20);
    assert_eq!(out.dropped_stdout, n - (1 << 20));
    assert_eq!(out.stderr, b"done\n");
    assert_eq!(out.dropped_stderr, 0);
    let out = c.output(pid).unwrap();
    assert!(out.stdout.is_empty());
}

#[test]
fn port_open_tells_whether_a_local_server_listens() {
    let mut c = connect();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    assert!(c.port_open(port).unwrap());
    drop(listener);
    assert!(!c.port_open(port).unwrap());
    // The connection is still usable.
    assert!(c.hello().is_ok());
}

#[test]
fn files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap().to_string();
    let mut c = connect();

    let f = format!("{root}/a/b/c.txt");
    c.write_file(&f, b"hello", None, false).unwrap();
    assert_eq!(c.read_file(&f).unwrap(), b"hello");
    c.write_file(&f, b" world", None, true).unwrap();
    assert_eq!(c.read_file(&f).unwrap(), b"hello world");
    c.write_file(&f, b"replaced", None, false).unwrap();
    assert_eq!(c.read_file(&f).unwrap(), b"replaced");
    // No temp files left behind.
    let names: Vec<String> = c
        .list(&format!("{root}/a/b"))
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, vec!["c.txt"]);

    // Modes: set, then kept on replace.
    let x = format!("{root}/run.sh");
    c.write_file(&x, b"#!/bin/sh\necho ran\n", Some(0o755), false)
        .unwrap();
    let mode = std::fs::metadata(&x).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o755);
    c.write_file(&x, b"#!/bin/sh\necho ran again\n", None, false)
        .unwrap();
    let mode = std::fs::metadata(&x).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o755);
    let out = c.exec_collect(&[&x], &[], None, b"", None).unwrap();
    assert_eq!(out.stdout, b"ran again\n");

    // Empty file, binary content.
    let e = format!("{root}/empty");
    c.write_file(&e, b"", None, false).unwrap();
    assert_eq!(c.read_file(&e).unwrap(), b"");
    let bin: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    let b = format!("{root}/bin");
    c.write_file(&b, &bin, None, false).unwrap();
    assert_eq!(c.read_file(&b).unwrap(), bin);

    c.mkdir(&format!("{root}/d1/d2/d3")).unwrap();
    c.mkdir(&format!("{root}/d1/d2/d3")).unwrap(); // -p: fine twice
    let list = c.list(&root).unwrap();
    let names: Vec<&str> = list.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, vec!["a", "bin", "d1", "empty", "run.sh"]);
    assert!(list[0].is_dir);
    assert!(!list[1].is_dir);
    assert_eq!(list[1].size, 100_000);

    assert!(c.exists(&f).unwrap());
    assert!(c.exists(&format!("{root}/d1")).unwrap());
    assert!(!c.exists(&format!("{root}/nope")).unwrap());

    // Non-recursive removal of a non-empty directory fails; recursive works.
    let err = c.remove(&format!("{root}/a"), false).unwrap_err();
    assert!(err.agent_kind().is_some());
    c.remove(&format!("{root}/a"), true).unwrap();
    assert!(!c.exists(&f).unwrap());
    c.remove(&e, false).unwrap();
    assert!(!c.exists(&e).unwrap());
    c.remove(&format!("{root}/d1/d2/d3"), false).unwrap();

    // Errors for missing paths.
    let missing = format!("{root}/missing");
    assert_eq!(agent_kind(&c.read_file(&missing).unwrap_err()), "not_found");
    assert_eq!(agent_kind(&c.list(&missing).unwrap_err()), "not_found");
    assert_eq!(
        agent_kind(&c.remove(&missing, false).unwrap_err()),
        "not_found"
    );
    assert_eq!(agent_kind(&c.read_file("").unwrap_err()), "invalid");
    assert_eq!(agent_kind(&c.read_file(&root).unwrap_err()), "invalid");
    // Writing under a file (parent is not a directory).
    assert!(c.write_file(&format!("{b}/x"), b"1", None, false).is_err());

    c.sync().unwrap();
    // After all those errors the connection is still usable.
    assert!(c.hello().is_ok());
}

#[test]
fn oversized_frame_closes_only_that_connection() {
    let (mut s, h) = raw_connection();
    // Claims a 4 GiB header.
    s.write_all(&u32::MAX.to_le_bytes()).unwrap();
    s.write_all(&0u32.to_le_bytes()).unwrap();
    // The server answers an error (best effort) and closes.
    let (resp, _) = proto::read_frame::<_, Response>(&mut s).unwrap();
    assert!(matches!(resp, Response::Error { ref kind, .. } if kind == "invalid"));
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert!(h.join().unwrap().is_err());

    // Oversized payload claim.
    let (mut s, h) = raw_connection();
    s.write_all(&2u32.to_le_bytes()).unwrap();
    s.write_all(&(17u32 << 20).to_le_bytes()).unwrap();
    s.write_all(b"{}").unwrap();
    // The server closes with our bytes unread: an error frame, EOF or a reset.
    match proto::read_frame::<_, Response>(&mut s) {
        Ok((Response::Error { kind, .. }, _)) => assert_eq!(kind, "invalid"),
        Ok(other) => panic!("{other:?}"),
        Err(proto::FrameError::Closed | proto::FrameError::Io(_)) => {}
        Err(e) => panic!("{e:?}"),
    }
    assert!(h.join().unwrap().is_err());

    // Other connections are fine.
    let mut c = connect();
    assert!(c.hello().is_ok());
}

#[test]
fn garbage_json_closes_the_connection() {
    let (mut s, h) = raw_connection();
    proto::write_raw_frame(&mut s, b"this is not json", b"").unwrap();
    let (resp, _) = proto::read_frame::<_, Response>(&mut s).unwrap();
    assert!(matches!(resp, Response::Error { ref kind, .. } if kind == "invalid"));
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert!(h.join().unwrap().is_err());

    // A truncated frame (peer goes away mid-frame) ends the connection with an error.
    let (mut s, h) = raw_connection();
    s.write_all(&100u32.to_le_bytes()).unwrap();
    s.write_all(&0u32.to_le_bytes()).unwrap();
    s.write_all(b"{\"op\":").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(h.join().unwrap().is_err());

    // Well-formed JSON with an unknown op or bad fields: an error answer, connection kept.
    let (mut s, h) = raw_connection();
    proto::write_raw_frame(&mut s, br#"{"op":"teleport"}"#, b"").unwrap();
    let (resp, _) = proto::read_frame::<_, Response>(&mut s).unwrap();
    assert!(matches!(resp, Response::Error { ref kind, .. } if kind == "unsupported"));
    proto::write_raw_frame(&mut s, br#"{"op":"read_file","path":7}"#, b"").unwrap();
    let (resp, _) = proto::read_frame::<_, Response>(&mut s).unwrap();
    assert!(matches!(resp, Response::Error { ref kind, .. } if kind == "invalid"));
    proto::write_frame(&mut s, &Request::Hello { version: 1 }, b"").unwrap();
    let (resp, _) = proto::read_frame::<_, Response>(&mut s).unwrap();
    assert!(matches!(resp, Response::Hello { version: 1, .. }));
    drop(s);
    assert!(h.join().unwrap().is_ok());

    let mut c = connect();
    assert!(c.hello().is_ok());
}

#[test]
fn concurrent_connections() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("f");
    std::fs::write(&f, b"contents").unwrap();

    let long = thread::spawn(|| {
        let mut c = connect();
        let out = c
            .exec_collect(&["sh", "-c", "sleep 3; echo slept"], &[], None, b"", None)
            .unwrap();
        assert_eq!(out.stdout, b"slept\n");
    });
    thread::sleep(Duration::from_millis(100));
    let mut c = connect();
    assert_eq!(c.read_file(f.to_str().unwrap()).unwrap(), b"contents");
    let out = c
        .exec_collect(&["echo", "quick"], &[], None, b"", None)
        .unwrap();
    assert_eq!(out.stdout, b"quick\n");
    // Served while the long exec is still running.
    assert!(!long.is_finished());
    long.join().unwrap();
}

#[test]
fn many_parallel_execs() {
    let handles: Vec<_> = (0..8)
        .map(|i| {
            thread::spawn(move || {
                let mut c = connect();
                for j in 0..10 {
                    let msg = format!("{i}-{j}");
                    let out = c
                        .exec_collect(
                            &["sh", "-c", "echo $0; exit $1", &msg, "5"],
                            &[],
                            None,
                            b"",
                            None,
                        )
                        .unwrap();
                    assert_eq!(out.stdout, format!("{msg}\n").as_bytes());
                    assert_eq!(out.status.code, Some(5));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn client_rejects_oversized_payload_without_sending() {
    let mut c = connect();
    let big = vec![0u8; proto::MAX_DATA + 1];
    let err = c.write_file("/tmp/never", &big, None, false).unwrap_err();
    assert!(matches!(err, ClientError::Io(ref e) if e.kind() == std::io::ErrorKind::InvalidInput));
    assert!(!c.is_broken());
    assert!(c.hello().is_ok());
}

#[test]
fn frames_roundtrip() {
    let mut buf = Vec::new();
    proto::write_frame(&mut buf, &Request::Exists { path: "/x".into() }, b"payload").unwrap();
    assert_eq!(&buf[4..8], &7u32.to_le_bytes());
    let (req, data): (Request, Vec<u8>) = proto::read_frame(&mut buf.as_slice()).unwrap();
    assert_eq!(req, Request::Exists { path: "/x".into() });
    assert_eq!(data, b"payload");
    // Wire names.
    let v = serde_json::to_value(Request::ReadFile { path: "/p".into() }).unwrap();
    assert_eq!(v, serde_json::json!({"op": "read_file", "path": "/p"}));
    let v = serde_json::to_value(Response::Exit {
        code: Some(0),
        signal: None,
        timed_out: false,
    })
    .unwrap();
    assert_eq!(
        v,
        serde_json::json!({"type": "exit", "code": 0, "signal": null, "timed_out": false})
    );
    let v = serde_json::to_value(Request::Processes {}).unwrap();
    assert_eq!(v, serde_json::json!({"op": "processes"}));
    // Optional fields may be omitted by the host.
    let r: Request = serde_json::from_str(r#"{"op":"exec","argv":["true"]}"#).unwrap();
    assert_eq!(
        r,
        Request::Exec {
            argv: vec!["true".into()],
            env: vec![],
            cwd: None,
            timeout_ms: None,
            shell: false
        }
    );
    // A truncated frame is an error, an empty stream is Closed.
    let r = proto::read_frame::<_, Request>(&mut &buf[..buf.len() - 1]);
    assert!(matches!(r, Err(proto::FrameError::Io(_))));
    let r = proto::read_frame::<_, Request>(&mut &[][..]);
    assert!(matches!(r, Err(proto::FrameError::Closed)));
}

#[test]
fn pipelined_requests_answer_in_order_and_errors_stay_per_request() {
    let mut c = connect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.txt").to_string_lossy().into_owned();
    let missing = dir.path().join("missing").to_string_lossy().into_owned();
    let answers = c
        .pipeline(&[
            (
                Request::WriteFile {
                    path: file.clone(),
                    mode: None,
                    append: false,
                },
                b"pipelined",
            ),
            (Request::ReadFile { path: missing }, b""),
            (Request::ReadFile { path: file }, b""),
        ])
        .unwrap();
    assert_eq!(answers.len(), 3);
    assert!(matches!(answers[0], Ok((Response::Ok {}, _))));
    assert_eq!(agent_kind(answers[1].as_ref().unwrap_err()), "not_found");
    match &answers[2] {
        Ok((_, data)) => assert_eq!(data, b"pipelined"),
        other => panic!("{other:?}"),
    }
    // Exec cannot be pipelined; the connection stays usable.
    assert!(
        c.pipeline(&[(
            Request::Exec {
                argv: vec!["true".into()],
                env: vec![],
                cwd: None,
                timeout_ms: None,
                shell: false
            },
            b""
        )])
        .is_err()
    );
    assert!(c.hello().is_ok());
}

#[test]
fn a_shell_request_runs_its_script_in_bash_where_it_exists() {
    let mut c = connect();
    let exec = |shell: bool, argv: &[&str]| Request::Exec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![("WHO".into(), "world".into())],
        cwd: None,
        timeout_ms: None,
        shell,
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let script = "echo \"hello $WHO\" && echo ${BASH_VERSION:+bash}";
    let status = c
        .exec_request(
            &exec(true, &[script]),
            b"",
            &mut |d| out.extend_from_slice(d),
            &mut |d| err.extend_from_slice(d),
        )
        .unwrap();
    assert!(
        status.success(),
        "{status:?} {}",
        String::from_utf8_lossy(&err)
    );
    let want = if std::path::Path::new("/bin/bash").exists() {
        "hello world\nbash\n"
    } else {
        "hello world\n\n"
    };
    assert_eq!(String::from_utf8_lossy(&out), want);
    // A shell request is one script; more arguments are refused, and the connection goes on.
    let e = c
        .exec_request(&exec(true, &["true", "x"]), b"", &mut |_| {}, &mut |_| {})
        .unwrap_err();
    assert_eq!(agent_kind(&e), "invalid");
    let pid = c
        .spawn_request(&Request::Spawn {
            argv: vec!["exit 7".into()],
            env: vec![],
            cwd: None,
            shell: true,
        })
        .unwrap();
    let code = c.wait(pid, Some(Duration::from_secs(30))).unwrap();
    assert!(format!("{code:?}").contains('7'), "{code:?}");
}

#[test]
fn a_timeout_too_far_to_represent_is_no_timeout() {
    let mut c = connect();
    let req = Request::Exec {
        argv: vec!["echo".into(), "fine".into()],
        env: vec![],
        cwd: None,
        timeout_ms: Some(u64::MAX),
        shell: false,
    };
    let mut out = Vec::new();
    let status = c
        .exec_request(&req, b"", &mut |d| out.extend_from_slice(d), &mut |_| {})
        .unwrap();
    assert!(status.success() && out == b"fine\n", "{status:?}");
    let pid = c.spawn(&["true"], &[], None).unwrap();
    let r = c.request(
        &Request::Wait {
            pid,
            timeout_ms: Some(u64::MAX),
        },
        &[],
    );
    assert!(
        matches!(r, Ok((Response::Exit { code: Some(0), .. }, _))),
        "{r:?}"
    );
    // The connection is still served.
    assert!(c.hello().is_ok());
}

/// A client on a socket connection (`serve_socket`), as the VM's vsock connections are.
fn connect_socket() -> Client<UnixStream> {
    common::connect_socket(Duration::from_secs(30))
}

#[test]
fn connect_tcp_pipes_both_ways_with_back_pressure_and_half_close() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // An echo server that ends its answer when the client ends its request.
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut r = s.try_clone().unwrap();
        std::io::copy(&mut r, &mut s).unwrap();
        s.write_all(b"bye").unwrap();
    });
    let pipe = connect_socket().connect_tcp(port).unwrap();
    // More than every buffer on the way: the writer only progresses as the reader reads.
    let sent: Vec<u8> = (0..6_000_000u32).map(|i| (i % 253) as u8).collect();
    let mut w = pipe.try_clone().unwrap();
    let body = sent.clone();
    let writer = thread::spawn(move || {
        w.write_all(&body).unwrap();
        // Half-close: the server sees end of file and still answers.
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut got = Vec::new();
    (&pipe).read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    server.join().unwrap();
    assert_eq!(got.len(), sent.len() + 3);
    assert!(got[..sent.len()] == sent[..]);
    assert_eq!(&got[sent.len()..], b"bye");
}

#[test]
fn connect_tcp_refused_answers_an_error_and_the_connection_stays_usable() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut c = connect_socket();
    let err = c.request(&Request::ConnectTcp { port }, &[]).unwrap_err();
    assert_eq!(agent_kind(&err), "refused");
    assert!(c.hello().is_ok());
    let err = c
        .request(&Request::ConnectTcp { port: 0 }, &[])
        .unwrap_err();
    assert_eq!(agent_kind(&err), "invalid");
    // Without a socket to splice (a connection served by `serve_connection`): unsupported.
    let err = connect().connect_tcp(port).unwrap_err();
    assert_eq!(agent_kind(&err), "unsupported");
}

/// A guest server that answers before it has read the whole upload and closes (its kernel
/// resets the connection, the rest unread): the host still gets the answer, then the end,
/// as it would from the server directly (an HTTP server refusing a large POST does this).
#[test]
fn connect_tcp_an_answer_sent_before_a_reset_reaches_the_host() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let answer = b"HTTP/1.0 413 Payload Too Large\r\n\r\ntoo large\n";
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 4 << 10];
        let mut got = 0;
        while got < 64 << 10 {
            got += s.read(&mut buf).unwrap();
        }
        s.write_all(answer).unwrap();
        // Closed with unread bytes: the kernel resets the connection.
    });
    let pipe = connect_socket().connect_tcp(port).unwrap();
    let mut w = pipe.try_clone().unwrap();
    let writer = thread::spawn(move || {
        let chunk = vec![7u8; 64 << 10];
        // Until the pipe refuses more: the upload is cut short.
        for _ in 0..256 {
            if w.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    pipe.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match (&pipe).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => {
                assert_ne!(e.kind(), std::io::ErrorKind::WouldBlock, "hung: {e}");
                break;
            }
        }
    }
    server.join().unwrap();
    drop(pipe);
    writer.join().unwrap();
    assert_eq!(got, answer, "{}", String::from_utf8_lossy(&got));
}

#[test]
fn connect_tcp_either_side_closing_ends_the_other() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // The host goes away: the guest server's socket sees end of file.
    let pipe = connect_socket().connect_tcp(port).unwrap();
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    (&pipe).write_all(b"hi").unwrap();
    drop(pipe);
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"hi");
    // The guest server goes away (without reading): the host's side ends too.
    let pipe = connect_socket().connect_tcp(port).unwrap();
    let (s, _) = listener.accept().unwrap();
    drop(s);
    let mut got = Vec::new();
    match (&pipe).read_to_end(&mut got) {
        Ok(_) => assert!(got.is_empty()),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
}

#[test]
fn refresh_refuses_an_oversized_seed_before_touching_anything() {
    // (A valid `refresh` would set this host's clock: the guest tests cover it.)
    let mut c = connect();
    let seed = vec![7u8; proto::MAX_REFRESH_SEED + 1];
    let err = c.refresh(&seed, std::time::SystemTime::now()).unwrap_err();
    assert_eq!(agent_kind(&err), "invalid");
    assert!(err.to_string().contains("at most 4096"), "{err}");
    // The connection goes on.
    assert!(c.hello().is_ok());
}

#[test]
fn programs_are_found_on_the_path_as_execvp_finds_them() {
    // The agent looks a bare program name up on the PATH itself (one execve instead of one per
    // PATH entry); what runs must be what execvp would have run.
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let write = |path: &std::path::Path, text: &str, mode: u32| {
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    // In the first directory: not executable, and a directory of the name; in the second: the
    // scripts that run.
    write(&a.join("tool"), "#!/bin/sh\necho wrong\n", 0o644);
    std::fs::create_dir(a.join("dir-named")).unwrap();
    write(&b.join("tool"), "#!/bin/sh\necho right \"$@\"\n", 0o755);
    write(&b.join("dir-named"), "#!/bin/sh\necho file\n", 0o755);
    // No #! line: execvp runs it with /bin/sh.
    write(&b.join("plain"), "echo plain script\n", 0o755);
    let path = format!("{}:{}:/usr/bin:/bin", a.display(), b.display());
    let mut c = connect();
    let run = |c: &mut Client<UnixStream>, argv: &[&str]| {
        let out = c
            .exec_collect(argv, &[("PATH", &path)], None, b"", None)
            .unwrap();
        (String::from_utf8(out.stdout).unwrap(), out.status.code)
    };
    assert_eq!(run(&mut c, &["tool", "x"]), ("right x\n".into(), Some(0)));
    assert_eq!(run(&mut c, &["dir-named"]), ("file\n".into(), Some(0)));
    assert_eq!(run(&mut c, &["plain"]), ("plain script\n".into(), Some(0)));
    // Programs of the system directories later on that PATH too.
    assert_eq!(run(&mut c, &["echo", "sys"]), ("sys\n".into(), Some(0)));
    // Found nowhere: the spawn's error names the program.
    let err = c
        .exec_collect(&["no-such-tool"], &[("PATH", &path)], None, b"", None)
        .unwrap_err();
    assert!(err.to_string().contains("no-such-tool"), "{err}");
}
