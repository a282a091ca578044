//! Terminals: `pty_open`, `pty_resize` and `pty_attach`.
//!
//! `pty_open` opens a pseudo-terminal pair (`/dev/ptmx`, mounting a `devpts` instance on
//! `/dev/pts` first where the guest has none), starts the program with the slave side as its
//! stdin, stdout, stderr and controlling terminal (`setsid` + `TIOCSCTTY`, see
//! [`ProcessTable::start_terminal`]) and keeps the master. A reader thread per terminal reads
//! the master all the time, so the program never blocks on its output while nobody is
//! attached: the bytes go to the attached connection, or, with none, into a backlog that
//! keeps the newest [`TERMINAL_BACKLOG`] bytes.
//!
//! `pty_attach` turns its connection into a byte pipe to the terminal: the backlog first,
//! then live output (the reader thread writes it to the connection, blocking: a host that
//! does not read holds the program's output back, as a slow terminal would); the connection
//! thread writes what the host sends to the master. One attachment at a time: a new one shuts
//! the previous connection down first. A host that goes away (its connection reset, as at
//! standby) detaches; output from then on goes to the backlog again. Once the master reports
//! the end (every holder of the slave side has closed it), the attachment gets end of file
//! and the connection closes.
//!
//! Bounds: at most [`MAX_TERMINALS`] terminals are kept; when a new one would exceed it,
//! those whose output has ended are forgotten first.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;

use super::capture::Ring;
use super::reply::{Failure, OpResult, ok, unknown_pid};
use super::table::{ProcessTable, SpawnSpec, killpg, login_shell};
use super::{CHUNK, lock};
use crate::proto::{MAX_TERMINAL_CELLS, Response, TERMINAL_BACKLOG, error_kind};

/// Most terminals the agent keeps at once.
pub const MAX_TERMINALS: usize = 64;

/// Where a terminal's output goes.
#[derive(Debug, Default)]
struct Out {
    /// The output nobody has received yet: the newest [`TERMINAL_BACKLOG`] bytes.
    backlog: Ring,
    /// The attached connection (a descriptor of its own).
    sink: Option<Arc<File>>,
    /// The master reported the end: nothing more will come.
    ended: bool,
}

/// One terminal.
#[derive(Debug)]
struct Term {
    /// The master side: input is written to it, the size set on it.
    master: File,
    out: Mutex<Out>,
    /// The attached connection again, to shut it down without waiting for `out` (which a
    /// reader blocked on a full connection holds). Lock order: `out`, then `attached`.
    attached: Mutex<Option<Arc<File>>>,
}

fn terminals() -> &'static Mutex<BTreeMap<u32, Arc<Term>>> {
    static TERMS: OnceLock<Mutex<BTreeMap<u32, Arc<Term>>>> = OnceLock::new();
    TERMS.get_or_init(Mutex::default)
}

fn check_size(cols: u16, rows: u16) -> Result<libc::winsize, Failure> {
    let range = 1..=MAX_TERMINAL_CELLS;
    if !range.contains(&cols) || !range.contains(&rows) {
        return Err(Failure::reply(
            error_kind::INVALID,
            format!(
                "terminal size {cols}x{rows}: columns and rows must be from 1 to \
                 {MAX_TERMINAL_CELLS}"
            ),
        ));
    }
    Ok(libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    })
}

fn set_size(fd: RawFd, size: &libc::winsize) -> io::Result<()> {
    // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer; `fd` is open.
    if unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, size as *const libc::winsize) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Mounts a `devpts` instance on `/dev/pts` unless one is there (the guest's `/dev` is a
/// bare devtmpfs): `/dev/ptmx` opens its terminals.
fn ensure_devpts() -> io::Result<()> {
    if std::path::Path::new("/dev/pts/ptmx").exists() {
        return Ok(());
    }
    std::fs::create_dir_all("/dev/pts")?;
    let (src, target, fstype) = (c"devpts", c"/dev/pts", c"devpts");
    let opts = c"newinstance,ptmxmode=0666,mode=0620";
    // SAFETY: every pointer is a NUL-terminated string that lives across the call.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NOEXEC,
            opts.as_ptr().cast(),
        )
    };
    if r == -1 {
        let e = io::Error::last_os_error();
        // Mounted meanwhile by another connection.
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(e);
        }
    }
    Ok(())
}

/// Opens a pseudo-terminal pair: (master, slave), both close-on-exec, the slave not made
/// anybody's controlling terminal yet.
fn open_pair() -> io::Result<(File, OwnedFd)> {
    ensure_devpts()?;
    let master = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open("/dev/ptmx")?;
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int from a valid pointer; `master` is open.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) } == -1 {
        return Err(io::Error::last_os_error());
    }
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: TIOCGPTPEER takes the open flags by value and returns a new descriptor.
    let slave = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags) };
    if slave == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `slave` is a fresh descriptor that nothing else owns.
    Ok((master, unsafe { OwnedFd::from_raw_fd(slave) }))
}

/// `pty_open`: starts `argv` (empty: the guest's shell) on a new terminal of `cols`×`rows`.
pub(super) fn open(
    table: &ProcessTable,
    argv: &[String],
    env: &[(String, String)],
    cwd: Option<&str>,
    cols: u16,
    rows: u16,
) -> OpResult {
    let size = check_size(cols, rows)?;
    {
        let mut terms = lock(terminals());
        if terms.len() >= MAX_TERMINALS {
            terms.retain(|_, t| !lock(&t.out).ended);
        }
        if terms.len() >= MAX_TERMINALS {
            return Err(Failure::reply(
                error_kind::INVALID,
                format!(
                    "{MAX_TERMINALS} terminals are open already, the most the agent keeps: \
                     end one first"
                ),
            ));
        }
    }
    let shell = [login_shell().to_string()];
    let argv = if argv.is_empty() { &shell[..] } else { argv };
    let mut full_env = vec![("TERM".to_string(), "xterm-256color".to_string())];
    full_env.extend_from_slice(env);
    let home = std::fs::read_dir("/root").is_ok().then_some("/root");
    let spec = SpawnSpec {
        argv,
        env: &full_env,
        cwd: cwd.or(home),
        shell: false,
    };
    let (master, slave) = open_pair().map_err(|e| Failure::io("opening a pseudo-terminal", &e))?;
    set_size(master.as_raw_fd(), &size).map_err(|e| Failure::io("setting its size", &e))?;
    let reader = master
        .try_clone()
        .map_err(|e| Failure::io("duplicating the terminal", &e))?;
    let pid = table.start_terminal(&spec, &slave)?;
    // Only the program holds the slave side now: its end is the master's end of file.
    drop(slave);
    let term = Arc::new(Term {
        master,
        out: Mutex::default(),
        attached: Mutex::default(),
    });
    let reading = term.clone();
    let spawned = thread::Builder::new()
        .name(format!("pty-{pid}"))
        .stack_size(256 << 10)
        .spawn(move || read_loop(reader, &reading));
    if let Err(e) = spawned {
        let _ = killpg(pid, libc::SIGKILL);
        return Err(Failure::io("starting the terminal's reader thread", &e));
    }
    lock(terminals()).insert(pid, term);
    ok(Response::Spawned { pid })
}

fn find(pid: u32) -> Result<Arc<Term>, Failure> {
    lock(terminals())
        .get(&pid)
        .cloned()
        .ok_or_else(|| Failure::reply(error_kind::NOT_FOUND, format!("no terminal {pid}")))
}

/// `pty_resize`.
pub(super) fn resize(pid: u32, cols: u16, rows: u16) -> OpResult {
    let size = check_size(cols, rows)?;
    let term = find(pid)?;
    set_size(term.master.as_raw_fd(), &size)
        .map_err(|e| Failure::io(&format!("resizing terminal {pid}"), &e))?;
    ok(Response::Ok {})
}

/// The terminal `pty_attach` asks for, checked before the agent answers `ok`. `hangup` is the
/// request's connection, which must be a socket.
pub(super) fn attachable(pid: u32, hangup: Option<RawFd>) -> Result<u32, Failure> {
    if hangup.is_none() {
        return Err(Failure::reply(
            error_kind::UNSUPPORTED,
            "pty_attach needs a socket connection",
        ));
    }
    find(pid).map(|_| pid).map_err(|_| unknown_pid(pid))
}

fn shut(f: &File, how: libc::c_int) {
    // SAFETY: shutdown(2) on an open descriptor, no pointers. Failing (not a socket any more
    // connected) leaves nothing to end.
    unsafe { libc::shutdown(f.as_raw_fd(), how) };
}

/// Reads the master until its end, passing the output on (see the module docs).
fn read_loop(mut master: File, term: &Term) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match master.read(&mut buf) {
            // EIO: every holder of the slave side closed it.
            Ok(0) => break,
            Ok(n) => deliver(term, &buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let mut out = lock(&term.out);
    out.ended = true;
    if let Some(sink) = out.sink.take() {
        shut(&sink, libc::SHUT_RDWR);
    }
    *lock(&term.attached) = None;
}

/// Writes `data` to the attached connection, or keeps it in the backlog with none (or when
/// that connection broke: it is detached).
fn deliver(term: &Term, data: &[u8]) {
    let mut out = lock(&term.out);
    if let Some(sink) = out.sink.clone() {
        if (&*sink).write_all(data).is_ok() {
            return;
        }
        out.sink = None;
        let mut attached = lock(&term.attached);
        if attached.as_ref().is_some_and(|a| Arc::ptr_eq(a, &sink)) {
            *attached = None;
        }
    }
    out.backlog.push_within(data, TERMINAL_BACKLOG);
}

/// Serves an attachment on the connection `conn` (owned by the caller for the whole call)
/// until the host or the terminal ends it.
pub(super) fn attach(pid: u32, conn: RawFd) -> io::Result<()> {
    let Ok(term) = find(pid) else {
        return Ok(());
    };
    // SAFETY: `conn` is the descriptor of the stream that `serve` owns and keeps open until
    // after this call returns; it is only borrowed to duplicate it.
    let sock = Arc::new(File::from(
        unsafe { BorrowedFd::borrow_raw(conn) }.try_clone_to_owned()?,
    ));
    // Take over: the previous attachment's connection ends (a reader blocked writing to it
    // fails and lets go of `out`).
    if let Some(old) = lock(&term.attached).take() {
        shut(&old, libc::SHUT_RDWR);
    }
    {
        let mut out = lock(&term.out);
        let (front, back) = out.backlog.buf.as_slices();
        (&*sock).write_all(front)?;
        (&*sock).write_all(back)?;
        out.backlog.buf.clear();
        if out.ended {
            shut(&sock, libc::SHUT_RDWR);
            return Ok(());
        }
        out.sink = Some(sock.clone());
        *lock(&term.attached) = Some(sock.clone());
    }
    // Input: what the host sends is typed into the terminal.
    let mut buf = vec![0u8; CHUNK];
    let mut master = &term.master;
    loop {
        match (&*sock).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if master.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    // Detach, unless another attachment took over already.
    let mut out = lock(&term.out);
    if out.sink.as_ref().is_some_and(|s| Arc::ptr_eq(s, &sock)) {
        out.sink = None;
    }
    let mut attached = lock(&term.attached);
    if attached.as_ref().is_some_and(|a| Arc::ptr_eq(a, &sock)) {
        *attached = None;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_out_of_range_are_refused() {
        for (c, r) in [
            (0, 24),
            (80, 0),
            (MAX_TERMINAL_CELLS + 1, 24),
            (80, u16::MAX),
        ] {
            match check_size(c, r) {
                Err(Failure::Reply { kind, message }) => {
                    assert_eq!(kind, error_kind::INVALID);
                    assert!(message.contains("from 1 to"), "{message}");
                }
                other => panic!("{c}x{r}: {other:?}"),
            }
        }
        let ws = check_size(80, 24).unwrap();
        assert_eq!((ws.ws_col, ws.ws_row), (80, 24));
    }
}
