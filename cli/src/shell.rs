//! `dormant shell SNAPSHOT_OR_SANDBOX`: an interactive terminal on a sandbox.
//!
//! Resumes the snapshot (or the latest snapshot of the sandbox with that id in the store),
//! starts the sandbox's shell on a terminal the size of this one, and attaches to it: the local terminal goes into raw mode (every key, Ctrl-C included, goes to
//! the sandbox's shell; restored on every way out: the shell's end, an error, a panic, SIGTERM,
//! SIGHUP), a resize of the local window resizes the sandbox's terminal (`SIGWINCH`). When the
//! shell ends (`exit`, Ctrl-D) the sandbox goes to standby and the new snapshot's id is printed
//! (`snapshot ID` on stdout), so the next `dormant shell` (with that id, or the sandbox's)
//! continues from there.
//!
//! With stdin not a terminal (a script, a test), nothing is put in raw mode: input is copied
//! as it comes, and end of input stops copying (the shell goes on until it exits).

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::sync::Arc;

use dormant::{
    Error, Grants, LocalStore, Managed, Result, Sandbox, SnapshotId, TerminalLink, TerminalSize,
};
use rustix::termios::{self, OptionalActions, Termios};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGWINCH};
use signal_hook::iterator::Signals;

/// The size of a window that says none (stdout not a terminal).
const DEFAULT_SIZE: TerminalSize = TerminalSize { cols: 80, rows: 24 };

/// The local terminal in raw mode; dropping it restores the settings it found.
struct RawMode {
    saved: Termios,
}

impl RawMode {
    /// Puts stdin's terminal in raw mode; `None` when stdin is not a terminal.
    fn enter() -> io::Result<Option<RawMode>> {
        let stdin = io::stdin();
        if !termios::isatty(stdin.as_fd()) {
            return Ok(None);
        }
        let saved = termios::tcgetattr(stdin.as_fd())?;
        let mut raw = saved.clone();
        raw.make_raw();
        termios::tcsetattr(stdin.as_fd(), OptionalActions::Now, &raw)?;
        Ok(Some(RawMode { saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // Nothing more can be done if the terminal went away meanwhile.
        let _ = termios::tcsetattr(io::stdin().as_fd(), OptionalActions::Now, &self.saved);
    }
}

/// The local window's size (stdout's terminal), if it has one that fits.
fn window_size() -> Option<TerminalSize> {
    let ws = termios::tcgetwinsize(io::stdout().as_fd()).ok()?;
    TerminalSize::new(ws.ws_col.into(), ws.ws_row.into()).ok()
}

/// The snapshot `dormant shell TARGET` resumes: TARGET itself when it is a snapshot id, else
/// the latest snapshot of the sandbox with that id in the store (`Error::SandboxNotFound` when
/// the store has none, or the sandbox was killed).
fn snapshot_of(store: &LocalStore, target: &str) -> Result<SnapshotId> {
    if let Ok(id) = SnapshotId::parse(target) {
        return Ok(id);
    }
    match store.sandbox(target)? {
        Some(sandbox) => Ok(sandbox.latest),
        None => Err(Error::SandboxNotFound(target.to_owned())),
    }
}

/// Runs `dormant shell TARGET` (a snapshot id or a sandbox id).
pub fn run(target: &str) -> Result<()> {
    let store = Arc::new(LocalStore::open_default()?);
    let id = snapshot_of(&store, target)?;
    eprintln!("dormant shell: resuming {id}");
    let sb = dormant::resume(store, &id, &Grants::new())?;
    let m = Managed::new(sb, None);
    let r = session(&m);
    // Whatever happened to the session, the sandbox keeps what it did: standby.
    let snap = m.standby();
    match (r, snap) {
        (Ok(code), Ok(snap)) => {
            eprintln!(
                "dormant shell: the shell ended{}; the sandbox is in standby",
                code.map(|c| format!(" (exit code {c})"))
                    .unwrap_or_default()
            );
            println!("snapshot {snap}");
            Ok(())
        }
        (Err(e), Ok(snap)) => {
            eprintln!("dormant shell: the sandbox is in standby: snapshot {snap}");
            Err(e)
        }
        (_, Err(e)) => Err(e),
    }
}

/// Opens the terminal and serves it until the shell ends; its exit code when known.
fn session(m: &Managed<Box<dyn Sandbox>>) -> Result<Option<i32>> {
    let pid = m.open_terminal(&[], window_size().unwrap_or(DEFAULT_SIZE))?;
    let link = m.attach_terminal(pid)?;
    eprintln!("dormant shell: terminal {pid} (exit or Ctrl-D ends it)");
    // Handled by a thread of their own from now on (no default action any more).
    let mut signals = Signals::new([SIGWINCH, SIGTERM, SIGHUP, SIGINT])
        .map_err(|e| Error::runtime("watch for signals", e))?;
    let handle = signals.handle();
    let raw = RawMode::enter().map_err(|e| Error::runtime("put the terminal in raw mode", e))?;
    {
        let (m, link) = (m.clone(), link.clone());
        std::thread::spawn(move || {
            for sig in signals.forever() {
                if sig == SIGWINCH {
                    if let Some(size) = window_size() {
                        // The terminal may have ended meanwhile: nothing to resize.
                        let _ = m.resize_terminal(pid, size);
                    }
                } else {
                    link.close();
                }
            }
        });
    }
    {
        // Input: stdin to the terminal until either ends (the thread then stays blocked in
        // a read of stdin at most until the process exits).
        let link = link.clone();
        std::thread::spawn(move || copy_input(&*link));
    }
    let out = copy_output(&*link);
    drop(raw);
    handle.close();
    out.map_err(|e| Error::runtime("write the terminal's output", e))?;
    // Ended by the shell (or a signal's close): its status, if it has one yet.
    Ok(m.wait(pid, Some(std::time::Duration::from_secs(2)))
        .ok()
        .flatten())
}

fn copy_input(link: &dyn TerminalLink) {
    let mut buf = [0u8; 4096];
    let mut stdin = io::stdin().lock();
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if link.write(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

fn copy_output(link: &dyn TerminalLink) -> io::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    let mut stdout = io::stdout().lock();
    loop {
        let n = link.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        stdout.write_all(&buf[..n])?;
        stdout.flush()?;
    }
}
