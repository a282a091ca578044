//! `dormant shell` driven through a real pseudo-terminal, as a person at a terminal would: the
//! terminal's size reaches the sandbox (and its changes, with `SIGWINCH`), typing works in raw
//! mode, `exit` ends the session with the sandbox in standby and a snapshot id printed, the
//! local terminal's settings come back, and the next session, named by the sandbox's id,
//! continues from that snapshot.
//! Skipped with a message where /dev/kvm is missing (the busybox `minimal` image boots once).

#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use dormant::{LocalStore, SandboxSpec, Tier};
use rustix::process::{Pid, Signal, kill_process};
use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
use rustix::termios::{self, Winsize};

/// Generous: guest kernel code may be emulated on a busy host.
const PATIENCE: Duration = Duration::from_secs(180);

/// One `dormant shell` session on a pseudo-terminal of this test.
struct Session {
    master: File,
    /// The slave side, kept open here too: to read its settings once the command has ended.
    slave: OwnedFd,
    child: Child,
    seen: Arc<(Mutex<Vec<u8>>, Condvar)>,
}

impl Session {
    fn start(store: &std::path::Path, snapshot: &str, cols: u16, rows: u16) -> Session {
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).unwrap();
        grantpt(&master).unwrap();
        unlockpt(&master).unwrap();
        let name = ptsname(&master, Vec::new()).unwrap();
        let slave: OwnedFd = File::options()
            .read(true)
            .write(true)
            .open(name.to_str().unwrap())
            .unwrap()
            .into();
        resize(&master, cols, rows);
        let child = Command::new(env!("CARGO_BIN_EXE_dormant"))
            .args(["shell", snapshot])
            .env("DORMANT_STORE", store)
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave.try_clone().unwrap()))
            .spawn()
            .unwrap();
        let master = File::from(master);
        let seen: Arc<(Mutex<Vec<u8>>, Condvar)> = Arc::default();
        let (mut r, s) = (master.try_clone().unwrap(), seen.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends with EIO once every holder of the slave side closed it.
            while let Ok(n @ 1..) = r.read(&mut buf) {
                s.0.lock().unwrap().extend_from_slice(&buf[..n]);
                s.1.notify_all();
            }
        });
        Session {
            master,
            slave,
            child,
            seen,
        }
    }

    fn mark(&self) -> usize {
        self.seen.0.lock().unwrap().len()
    }

    fn wait_for(&self, after: usize, want: &str) {
        self.wait_any(after, &[want]);
    }

    /// Waits until the output after byte `after` holds one of `wants`; which one.
    fn wait_any(&self, after: usize, wants: &[&str]) -> usize {
        let deadline = Instant::now() + PATIENCE;
        let mut g = self.seen.0.lock().unwrap();
        loop {
            let text = String::from_utf8_lossy(&g[after.min(g.len())..]).into_owned();
            if let Some(i) = wants.iter().position(|w| text.contains(w)) {
                return i;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "none of {wants:?} in {:?}",
                String::from_utf8_lossy(&g)
            );
            g = self.seen.1.wait_timeout(g, left).unwrap().0;
        }
    }

    /// Types `line` and Enter (a carriage return, as a terminal in raw mode sends it).
    fn type_line(&mut self, line: &str) {
        self.master.write_all(line.as_bytes()).unwrap();
        self.master.write_all(b"\r").unwrap();
    }

    /// Waits for the command to exit; its output.
    fn finish(mut self) -> (String, OwnedFd) {
        let deadline = Instant::now() + PATIENCE;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "dormant shell did not exit");
            std::thread::sleep(Duration::from_millis(50));
        };
        let out = String::from_utf8_lossy(&self.seen.0.lock().unwrap()).into_owned();
        assert!(status.success(), "{status}: {out}");
        (out, self.slave)
    }
}

fn resize(master: &impl std::os::fd::AsFd, cols: u16, rows: u16) {
    termios::tcsetwinsize(
        master,
        Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        },
    )
    .unwrap();
}

#[test]
fn dormant_shell_is_an_interactive_terminal_that_ends_in_standby() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::open(tmp.path()).unwrap());
    let spec = SandboxSpec::linux()
        .image("minimal")
        .memory_limit(128 << 20)
        .call_timeout(PATIENCE);
    let mut sb = dormant::runtime(Tier::Kvm)
        .unwrap()
        .create(store.clone(), spec)
        .unwrap();
    let first = sb.standby().unwrap();
    let sandbox_id = sb.id().to_owned();
    drop(sb);

    let mut s = Session::start(tmp.path(), first.as_str(), 100, 30);
    let before = termios::tcgetattr(&s.slave).unwrap();
    s.wait_for(0, "exit or Ctrl-D ends it");
    // The local window's size is the sandbox terminal's.
    let mark = s.mark();
    s.type_line("stty size");
    s.wait_for(mark, "30 100");
    // Raw mode: the local terminal neither echoes nor waits for lines (the sandbox echoes).
    let raw = termios::tcgetattr(&s.slave).unwrap();
    assert!(!raw.local_modes.contains(termios::LocalModes::ECHO));
    assert!(!raw.local_modes.contains(termios::LocalModes::ICANON));
    // A resize of the window (SIGWINCH) resizes the sandbox's terminal.
    resize(&s.master, 120, 40);
    kill_process(Pid::from_child(&s.child), Signal::WINCH).unwrap();
    // The resize arrives when the signal has been handled: ask until the new size shows.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mark = s.mark();
        s.type_line("stty size");
        if s.wait_any(mark, &["30 100", "40 120"]) == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the resize never arrived");
    }
    let mark = s.mark();
    s.type_line("echo from-the-shell > /tmp/marker; echo typed-$((6*7))");
    s.wait_for(mark, "typed-42");
    s.type_line("exit");
    let (out, slave) = s.finish();
    // The local terminal is as it was.
    let after = termios::tcgetattr(&slave).unwrap();
    assert_eq!(after.local_modes, before.local_modes);
    assert_eq!(after.input_modes, before.input_modes);
    assert_eq!(after.output_modes, before.output_modes);
    let snap = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("snapshot "))
        .unwrap_or_else(|| panic!("no snapshot id in {out:?}"))
        .to_string();
    assert_ne!(snap, first.as_str());

    // The next session, named by the sandbox's id, continues from its latest snapshot: the
    // one just printed.
    let mut s = Session::start(tmp.path(), &sandbox_id, 80, 24);
    let mark = s.mark();
    s.type_line("cat /tmp/marker");
    s.wait_for(mark, "from-the-shell");
    // Ctrl-D at the shell's next prompt (busybox's `~ # `) ends it too.
    let answered = {
        let g = s.seen.0.lock().unwrap();
        mark + g[mark..]
            .windows(b"from-the-shell".len())
            .position(|w| w == b"from-the-shell")
            .unwrap()
    };
    s.wait_for(answered, "# ");
    s.master.write_all(&[4]).unwrap();
    let (out, _) = s.finish();
    assert!(out.contains("snapshot "), "{out}");
}

#[test]
fn dormant_shell_names_a_sandbox_the_store_does_not_have() {
    let tmp = tempfile::tempdir().unwrap();
    LocalStore::open(tmp.path()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dormant"))
        .args(["shell", "sb-no-such-sandbox"])
        .env("DORMANT_STORE", tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sb-no-such-sandbox"), "{err}");
}
