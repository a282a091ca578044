//! Terminals end to end with the real Linux guest (the busybox `minimal` image): a shell on a
//! pseudo-terminal, resized, typed into, kept across standby and resume, reattached. One
//! sandbox for the whole test (a boot is minutes on an emulated guest kernel). Skipped with a
//! message where /dev/kvm is missing.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use dormant_core::{
    Error, LocalStore, Managed, SandboxSpec, State, TerminalLink, TerminalSize, Terminals,
};
use dormant_kvm::sandbox::KvmSandbox;

/// Generous: guest kernel code may be emulated on a busy host.
const PATIENCE: Duration = Duration::from_secs(180);

/// What a link's reader thread has received, and whether the link ended.
#[derive(Default)]
struct Screen {
    seen: Mutex<(Vec<u8>, bool)>,
    changed: Condvar,
}

impl Screen {
    /// Reads `link` on a thread of its own until it ends.
    fn follow(link: Arc<dyn TerminalLink>) -> Arc<Screen> {
        let screen = Arc::new(Screen::default());
        let s = screen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let n = link.read(&mut buf).unwrap_or(0);
                let mut g = s.seen.lock().unwrap();
                if n == 0 {
                    g.1 = true;
                } else {
                    g.0.extend_from_slice(&buf[..n]);
                }
                s.changed.notify_all();
                if n == 0 {
                    return;
                }
            }
        });
        screen
    }

    fn len(&self) -> usize {
        self.seen.lock().unwrap().0.len()
    }

    /// Waits until the output after byte `from` holds `want`; returns the offset just past it.
    fn wait_for(&self, from: usize, want: &str) -> usize {
        let deadline = Instant::now() + PATIENCE;
        let want_bytes = want.as_bytes();
        let mut g = self.seen.lock().unwrap();
        loop {
            let found = g.0.get(from..).and_then(|after| {
                after
                    .windows(want_bytes.len())
                    .position(|w| w == want_bytes)
            });
            if let Some(at) = found {
                return from + at + want_bytes.len();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero() && !g.1,
                "no {want:?} (ended: {}) in {:?}",
                g.1,
                String::from_utf8_lossy(&g.0)
            );
            g = self.changed.wait_timeout(g, left).unwrap().0;
        }
    }

    /// Waits until the link has ended.
    fn wait_end(&self) {
        let deadline = Instant::now() + PATIENCE;
        let mut g = self.seen.lock().unwrap();
        while !g.1 {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "the attachment did not end");
            g = self.changed.wait_timeout(g, left).unwrap().0;
        }
    }
}

fn wait_state(m: &Managed<KvmSandbox>, want: State) {
    let deadline = Instant::now() + PATIENCE;
    while m.state() != want {
        assert!(Instant::now() < deadline, "never {want:?}: {:?}", m.state());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_shell_on_a_terminal_resizes_echoes_and_outlives_standby() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::open(dir.path()).unwrap());
    let spec = SandboxSpec::linux()
        .image("minimal")
        .memory_limit(128 << 20)
        .call_timeout(PATIENCE);
    let sb = KvmSandbox::create(store, spec).unwrap_or_else(|e| panic!("boot the guest: {e}"));
    let idle = Duration::from_secs(2);
    let m = Managed::new(sb, Some(idle));

    let pid = m
        .open_terminal(&[], TerminalSize::new(80, 24).unwrap())
        .unwrap();
    let link = m.attach_terminal(pid).unwrap();
    let screen = Screen::follow(link.clone());
    link.write(b"stty size; echo \"term=$TERM\"\n").unwrap();
    screen.wait_for(0, "24 80");
    screen.wait_for(0, "term=xterm-256color");
    m.resize_terminal(pid, TerminalSize::new(132, 43).unwrap())
        .unwrap();
    let mark = screen.len();
    link.write(b"stty size\n").unwrap();
    let answered = screen.wait_for(mark, "43 132");
    // Typed input echoes (the command line itself), then the command answers. Typed once the
    // shell waits for input (its prompt, `~ # `, after that answer): typed ahead, the echo and
    // the prompt may interleave, as on any terminal.
    screen.wait_for(answered, "# ");
    let mark = screen.len();
    link.write(b"KEPT=kept-$((6*7)); echo typed-$KEPT\n")
        .unwrap();
    screen.wait_for(mark, "KEPT=kept-$((6*7)); echo typed-$KEPT");
    screen.wait_for(mark, "typed-kept-42");

    // Attached, the sandbox is at work: the idle timer leaves it running.
    std::thread::sleep(idle * 3);
    assert_eq!(m.state(), State::Running);
    assert_eq!(m.stats().auto_standbys, 0);

    // Standby ends the attachment; the shell sleeps in the snapshot.
    m.standby().unwrap();
    screen.wait_end();
    assert!(link.write(b"echo lost\n").is_err());

    // Attaching wakes the sandbox: the same shell, with its variable.
    let link = m.attach_terminal(pid).unwrap();
    assert_eq!(m.stats().wakes, 1);
    let screen = Screen::follow(link.clone());
    link.write(b"echo again-$KEPT\n").unwrap();
    screen.wait_for(0, "again-kept-42");

    // Detached, it goes idle and the timer puts it in standby.
    link.close();
    screen.wait_end();
    wait_state(&m, State::Standby);
    assert_eq!(m.stats().auto_standbys, 1);

    // Unknown terminals are clear errors; the shell is a background process to end.
    match m.resize_terminal(pid + 100_000, TerminalSize::new(80, 24).unwrap()) {
        Err(Error::InvalidArgument(msg)) => assert!(msg.contains("no terminal"), "{msg}"),
        other => panic!("{other:?}"),
    }
    match m.attach_terminal(pid + 100_000) {
        Err(Error::InvalidArgument(msg)) => assert!(msg.contains("no terminal"), "{msg}"),
        other => panic!("{other:?}"),
    }
    m.signal(pid, 9).unwrap();
    assert_eq!(m.wait(pid, Some(PATIENCE)).unwrap(), Some(128 + 9));
    m.with(|sb| {
        assert_eq!(sb.attached_terminals(), 0);
        Ok(())
    })
    .unwrap();
    m.kill().unwrap();
}
