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

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use crate::proto::{
    self, Entry, FrameError, MAX_DATA, PROTOCOL_VERSION, ProcessInfo, Request, Response, error_kind,
};

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
    "mount",
];

/// Once a process has exited, how long to keep reading output that grandchildren holding its
/// pipes may still write.
const EXIT_GRACE: Duration = Duration::from_millis(200);
/// After a timeout's SIGKILL, how long to keep draining the pipes and to wait for the status.
const KILL_GRACE: Duration = Duration::from_secs(2);
const CHUNK: usize = 64 << 10;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// Terminating signal, when killed by one.
    pub signal: Option<i32>,
}

impl ExitInfo {
    fn from_wait_status(status: libc::c_int) -> Self {
        if libc::WIFEXITED(status) {
            Self {
                code: Some(libc::WEXITSTATUS(status)),
                signal: None,
            }
        } else if libc::WIFSIGNALED(status) {
            Self {
                code: None,
                signal: Some(libc::WTERMSIG(status)),
            }
        } else {
            Self {
                code: None,
                signal: None,
            }
        }
    }
}

/// The last [`OUTPUT_BUFFER`] bytes of one stream, and how many were dropped before them.
#[derive(Debug, Default)]
struct Ring {
    buf: VecDeque<u8>,
    dropped: u64,
}

impl Ring {
    fn push(&mut self, data: &[u8]) {
        let data = if data.len() > OUTPUT_BUFFER {
            let skip = data.len() - OUTPUT_BUFFER;
            self.dropped += skip as u64;
            &data[skip..]
        } else {
            data
        };
        let excess = (self.buf.len() + data.len()).saturating_sub(OUTPUT_BUFFER);
        if excess > 0 {
            self.buf.drain(..excess);
            self.dropped += excess as u64;
        }
        self.buf.extend(data);
    }
}

#[derive(Debug, Default)]
struct Captured {
    stdout: Ring,
    stderr: Ring,
    /// Capture threads still reading (2 → 0).
    open: u8,
}

#[derive(Debug, Default)]
struct Capture {
    state: Mutex<Captured>,
    closed: Condvar,
}

#[derive(Debug)]
struct Proc {
    argv: Vec<String>,
    background: bool,
    seq: u64,
    exit: Option<ExitInfo>,
    stdin: Arc<Mutex<Option<ChildStdin>>>,
    capture: Arc<Capture>,
    /// `exec`: an eventfd the reaper signals when the exit status is recorded.
    notify: Option<Arc<OwnedFd>>,
}

#[derive(Debug, Default)]
struct State {
    procs: BTreeMap<u32, Proc>,
    /// Bumped at every registration (wakes an idle reaper).
    generation: u64,
    seq: u64,
}

/// The agent's processes: shared by all connections, alive as long as the agent (the host
/// reconnects after a snapshot/restore and finds its processes again).
#[derive(Debug)]
pub struct ProcessTable {
    state: Mutex<State>,
    /// Signalled when an exit status is recorded.
    exited: Condvar,
    /// Signalled when a child is registered (the reaper idles when there are no children).
    kick: Condvar,
    /// Read: spawning + registering; write: the reaper reaping one child.
    gate: RwLock<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A request failed: either answer `error{kind, message}` or, for `Connection`, close.
#[derive(Debug)]
enum Failure {
    Reply { kind: &'static str, message: String },
    Connection(io::Error),
}

impl Failure {
    fn reply(kind: &'static str, message: impl Into<String>) -> Self {
        Failure::Reply {
            kind,
            message: message.into(),
        }
    }

    fn io(context: &str, e: &io::Error) -> Self {
        let kind = match e.kind() {
            io::ErrorKind::NotFound => error_kind::NOT_FOUND,
            io::ErrorKind::PermissionDenied => error_kind::PERMISSION,
            io::ErrorKind::InvalidInput | io::ErrorKind::InvalidFilename => error_kind::INVALID,
            io::ErrorKind::Unsupported => error_kind::UNSUPPORTED,
            _ => error_kind::IO,
        };
        Failure::reply(kind, format!("{context}: {e}"))
    }
}

type OpResult = Result<(Response, Vec<u8>), Failure>;

fn ok(resp: Response) -> OpResult {
    Ok((resp, Vec::new()))
}

struct Started {
    pid: u32,
    stdout: File,
    stderr: File,
    stdin: Option<ChildStdin>,
}

/// What to spawn.
struct SpawnSpec<'a> {
    argv: &'a [String],
    env: &'a [(String, String)],
    cwd: Option<&'a str>,
}

impl ProcessTable {
    /// The process-wide table; the first call starts the reaper thread. From then on the
    /// reaper reaps every child of this process (see the module docs).
    pub fn global() -> &'static ProcessTable {
        static TABLE: OnceLock<ProcessTable> = OnceLock::new();
        static REAPER: OnceLock<()> = OnceLock::new();
        let table = TABLE.get_or_init(|| ProcessTable {
            state: Mutex::new(State::default()),
            exited: Condvar::new(),
            kick: Condvar::new(),
            gate: RwLock::new(()),
        });
        REAPER.get_or_init(|| {
            if let Err(e) = thread::Builder::new()
                .name("reaper".into())
                .spawn(move || table.reap_forever())
            {
                eprintln!("dormant-agent: cannot start the reaper thread: {e}");
            }
        });
        table
    }

    fn reap_forever(&self) {
        loop {
            let generation = lock(&self.state).generation;
            // SAFETY: siginfo_t is plain old data; all-zero is a valid value.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: `info` is a valid, writable siginfo_t; WNOWAIT leaves the child waitable.
            let r =
                unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
            if r == -1 {
                match io::Error::last_os_error().raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::ECHILD) => {
                        // No children: sleep until one is registered (or a second passes).
                        let mut state = lock(&self.state);
                        while state.generation == generation {
                            let (s, timeout) = self
                                .kick
                                .wait_timeout(state, Duration::from_secs(1))
                                .unwrap_or_else(PoisonError::into_inner);
                            state = s;
                            if timeout.timed_out() {
                                break;
                            }
                        }
                    }
                    _ => thread::sleep(Duration::from_millis(100)),
                }
                continue;
            }
            // SAFETY: waitid succeeded with WEXITED, so the child fields of `info` are set.
            let pid = unsafe { info.si_pid() };
            if pid <= 0 {
                continue;
            }
            // No spawn is between fork and registration while we hold this.
            let _exclusive = self.gate.write().unwrap_or_else(PoisonError::into_inner);
            let mut status: libc::c_int = 0;
            // SAFETY: `status` is a valid, writable int.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if r == pid {
                self.record(pid as u32, ExitInfo::from_wait_status(status));
            }
        }
    }

    fn record(&self, pid: u32, exit: ExitInfo) {
        let mut state = lock(&self.state);
        if let Some(p) = state.procs.get_mut(&pid) {
            p.exit = Some(exit);
            if let Some(fd) = &p.notify {
                let one: u64 = 1;
                // SAFETY: writes 8 bytes from a valid u64 to an eventfd we own.
                unsafe {
                    libc::write(fd.as_raw_fd(), (&raw const one).cast(), 8);
                }
            }
            self.exited.notify_all();
        }
    }

    /// Spawns `spec` in its own process group and registers it.
    fn start(
        &self,
        spec: &SpawnSpec<'_>,
        stdin: Option<Stdio>,
        background: bool,
        notify: Option<Arc<OwnedFd>>,
    ) -> Result<Started, Failure> {
        let Some(program) = spec.argv.first() else {
            return Err(Failure::reply(error_kind::INVALID, "empty argv"));
        };
        if program.is_empty() {
            return Err(Failure::reply(error_kind::INVALID, "empty program name"));
        }
        let mut cmd = Command::new(program);
        cmd.args(&spec.argv[1..])
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(stdin.unwrap_or_else(Stdio::piped))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(cwd) = spec.cwd {
            cmd.current_dir(cwd);
        }

        let mut attempt = 0;
        let (mut child, _spawning) = loop {
            let spawning = self.gate.read().unwrap_or_else(PoisonError::into_inner);
            match cmd.spawn() {
                Ok(child) => break (child, spawning),
                // A file just written (write_file) may still be open in a child forked
                // concurrently by another connection, until that child execs.
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempt < 8 => {
                    drop(spawning);
                    attempt += 1;
                    thread::sleep(Duration::from_millis(10 << attempt.min(5)));
                }
                Err(e) => {
                    let what = match spec.cwd {
                        Some(cwd) => format!("cannot start {program:?} in {cwd:?}"),
                        None => format!("cannot start {program:?}"),
                    };
                    return Err(Failure::io(&what, &e));
                }
            }
        };
        let pid = child.id();
        let (Some(out), Some(err)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(Failure::reply(error_kind::IO, "child pipes missing"));
        };
        let child_stdin = child.stdin.take();
        // Dropping `child` does not wait for it; the reaper will.
        drop(child);
        let (stdin_keep, stdin_ret) = if background {
            (child_stdin, None)
        } else {
            (None, child_stdin)
        };
        let mut state = lock(&self.state);
        state.seq += 1;
        let seq = state.seq;
        state.procs.insert(
            pid,
            Proc {
                argv: spec.argv.to_vec(),
                background,
                seq,
                exit: None,
                stdin: Arc::new(Mutex::new(stdin_keep)),
                capture: Arc::new(Capture {
                    state: Mutex::new(Captured {
                        open: if background { 2 } else { 0 },
                        ..Captured::default()
                    }),
                    closed: Condvar::new(),
                }),
                notify,
            },
        );
        state.generation += 1;
        if background {
            prune_exited(&mut state);
        }
        self.kick.notify_all();
        Ok(Started {
            pid,
            stdout: File::from(OwnedFd::from(out)),
            stderr: File::from(OwnedFd::from(err)),
            stdin: stdin_ret,
        })
    }

    fn forget(&self, pid: u32) {
        lock(&self.state).procs.remove(&pid);
    }

    fn exit_of(&self, pid: u32) -> Option<ExitInfo> {
        lock(&self.state).procs.get(&pid).and_then(|p| p.exit)
    }

    /// Waits until `pid` has an exit status, at most until `deadline` (`None`: forever).
    /// `Err` when the pid is not tracked.
    fn wait_exit(&self, pid: u32, deadline: Option<Instant>) -> Result<Option<ExitInfo>, ()> {
        let mut state = lock(&self.state);
        loop {
            let p = state.procs.get(&pid).ok_or(())?;
            if let Some(exit) = p.exit {
                return Ok(Some(exit));
            }
            match deadline {
                None => {
                    state = self
                        .exited
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner)
                }
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Ok(None);
                    }
                    state = self
                        .exited
                        .wait_timeout(state, d - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
            }
        }
    }

    fn capture_of(&self, pid: u32) -> Option<(Arc<Capture>, Option<ExitInfo>)> {
        lock(&self.state)
            .procs
            .get(&pid)
            .map(|p| (p.capture.clone(), p.exit))
    }
}

fn prune_exited(state: &mut State) {
    let mut exited: Vec<(u64, u32)> = state
        .procs
        .iter()
        .filter(|(_, p)| p.background && p.exit.is_some())
        .map(|(pid, p)| (p.seq, *pid))
        .collect();
    if exited.len() > MAX_EXITED_KEPT {
        exited.sort_unstable();
        for (_, pid) in &exited[..exited.len() - MAX_EXITED_KEPT] {
            state.procs.remove(pid);
        }
    }
}

fn killpg(pid: u32, signal: i32) -> io::Result<()> {
    let Ok(pgid) = libc::pid_t::try_from(pid) else {
        return Err(io::ErrorKind::InvalidInput.into());
    };
    if pgid <= 1 {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    // SAFETY: plain syscall without pointers.
    if unsafe { libc::killpg(pgid, signal) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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
            } => exec(
                &mut stream,
                hangup,
                table,
                &SpawnSpec {
                    argv: &argv,
                    env: &env,
                    cwd: cwd.as_deref(),
                },
                timeout_ms,
                data,
            ),
            other => handle(table, other, data),
        };
        match result {
            Ok((resp, payload)) => proto::write_frame(&mut stream, &resp, &payload)?,
            Err(Failure::Reply { kind, message }) => send_error(&mut stream, kind, &message)?,
            Err(Failure::Connection(e)) => return Err(e),
        }
    }
}

fn send_error<W: Write>(w: &mut W, kind: &str, message: &str) -> io::Result<()> {
    proto::write_frame(
        w,
        &Response::Error {
            kind: kind.to_string(),
            message: message.to_string(),
        },
        &[],
    )
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
        Request::Spawn { argv, env, cwd } => spawn(
            table,
            &SpawnSpec {
                argv: &argv,
                env: &env,
                cwd: cwd.as_deref(),
            },
        ),
        Request::Output { pid } => output(table, pid),
        Request::Wait { pid, timeout_ms } => {
            let deadline = timeout_ms.map(|ms| Instant::now() + Duration::from_millis(ms));
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
        Request::Signal { pid, signal } => {
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
        Request::Stdin { pid, close } => {
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
                if let Err(e) = w.write_all(&data) {
                    *stdin = None;
                    return Err(Failure::io(&format!("writing stdin of {pid}"), &e));
                }
            }
            if close {
                *stdin = None;
            }
            ok(Response::Ok {})
        }
        Request::Processes {} => {
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
        Request::ReadFile { path } => read_file(&path),
        Request::WriteFile { path, mode, append } => write_file(&path, mode, append, &data),
        Request::List { path } => list(&path),
        Request::Remove { path, recursive } => remove(&path, recursive),
        Request::Exists { path } => {
            check_path(&path)?;
            match Path::new(&path).try_exists() {
                Ok(value) => ok(Response::Exists { value }),
                Err(e) => Err(Failure::io(&path, &e)),
            }
        }
        Request::Mkdir { path } => {
            check_path(&path)?;
            fs::create_dir_all(&path).map_err(|e| Failure::io(&path, &e))?;
            ok(Response::Ok {})
        }
        Request::Sync {} => {
            // SAFETY: sync(2) takes no arguments and cannot fail.
            unsafe { libc::sync() };
            ok(Response::Ok {})
        }
        Request::SetTime { unix_ns } => {
            let ts = libc::timespec {
                tv_sec: (unix_ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (unix_ns % 1_000_000_000) as libc::c_long,
            };
            // SAFETY: `ts` is a valid timespec for the duration of the call.
            if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
                let e = io::Error::last_os_error();
                return Err(Failure::io("CLOCK_REALTIME", &e));
            }
            ok(Response::Ok {})
        }
        Request::Mount {
            source,
            target,
            fstype,
            read_only,
        } => {
            check_path(&target)?;
            fs::create_dir_all(&target).map_err(|e| Failure::io(&target, &e))?;
            mount(&source, &target, &fstype, read_only).map_err(|e| Failure::io(&target, &e))?;
            ok(Response::Ok {})
        }
    }
}

/// `mount(2)`, `nosuid,nodev`, read-only if asked.
fn mount(source: &str, target: &str, fstype: &str, read_only: bool) -> io::Result<()> {
    let c = |s: &str| {
        std::ffi::CString::new(s)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in an argument"))
    };
    let (source, target, fstype) = (c(source)?, c(target)?, c(fstype)?);
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
    if read_only {
        flags |= libc::MS_RDONLY;
    }
    // SAFETY: the three strings are valid NUL-terminated C strings for the whole call, and a
    // null `data` is allowed.
    let r = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn unknown_pid(pid: u32) -> Failure {
    Failure::reply(error_kind::NOT_FOUND, format!("no process {pid}"))
}

/// The host closed or reset the connection of a running `exec`.
fn hung_up() -> Failure {
    Failure::Connection(io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "the host closed the connection during exec; its command was killed",
    ))
}

/// Runs a command, streaming its output to `stream`, and returns its `exit`. When `hangup`
/// (the connection's descriptor) reports that the host closed or reset the connection, the
/// command's group is killed (by the guard) and the connection ends.
fn exec<S: Write>(
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

    let deadline = timeout_ms.map(|ms| Instant::now() + Duration::from_millis(ms));
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
        let timeout_ms: libc::c_int = match until {
            None => -1,
            Some(u) => {
                let ms = (u - now).as_millis().saturating_add(1);
                libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
            }
        };

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
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Failure::io("poll", &e));
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
        let now = Instant::now();
        let timeout_ms: libc::c_int = match limit {
            None => -1,
            Some(l) if now >= l => return Ok(None),
            Some(l) => {
                let ms = (l - now).as_millis().saturating_add(1);
                libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
            }
        };
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
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Failure::io("poll", &e));
        }
        if fds[1].revents != 0 {
            return Err(hung_up());
        }
    }
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

fn spawn(table: &ProcessTable, spec: &SpawnSpec<'_>) -> OpResult {
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

fn capture_loop(mut file: File, capture: &Capture, is_stdout: bool) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let mut c = lock(&capture.state);
                let ring = if is_stdout {
                    &mut c.stdout
                } else {
                    &mut c.stderr
                };
                ring.push(&buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let mut c = lock(&capture.state);
    c.open = c.open.saturating_sub(1);
    capture.closed.notify_all();
}

/// Waits (at most `limit`) until both capture threads have reached EOF.
fn wait_captured(capture: &Capture, limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut c = lock(&capture.state);
    while c.open > 0 {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        c = capture
            .closed
            .wait_timeout(c, deadline - now)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
}

fn output(table: &ProcessTable, pid: u32) -> OpResult {
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

fn check_path(path: &str) -> Result<(), Failure> {
    if path.is_empty() {
        return Err(Failure::reply(error_kind::INVALID, "empty path"));
    }
    if path.contains('\0') {
        return Err(Failure::reply(error_kind::INVALID, "path contains NUL"));
    }
    Ok(())
}

fn read_file(path: &str) -> OpResult {
    check_path(path)?;
    let file = File::open(path).map_err(|e| Failure::io(path, &e))?;
    let meta = file.metadata().map_err(|e| Failure::io(path, &e))?;
    if meta.is_dir() {
        return Err(Failure::reply(
            error_kind::INVALID,
            format!("{path}: is a directory"),
        ));
    }
    let too_large = || {
        Failure::reply(
            error_kind::INVALID,
            format!("{path}: larger than {MAX_DATA} bytes (the frame cap)"),
        )
    };
    if meta.len() > MAX_DATA as u64 {
        return Err(too_large());
    }
    let mut data = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_DATA as u64 + 1)
        .read_to_end(&mut data)
        .map_err(|e| Failure::io(path, &e))?;
    if data.len() > MAX_DATA {
        return Err(too_large());
    }
    Ok((Response::Data {}, data))
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn write_file(path: &str, mode: Option<u32>, append: bool, data: &[u8]) -> OpResult {
    check_path(path)?;
    let target = Path::new(path);
    if let Some(parent) = target.parent()
        && !parent.as_os_str().is_empty()
    {
        fs::create_dir_all(parent).map_err(|e| Failure::io(path, &e))?;
    }
    if append {
        let mut file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(mode.unwrap_or(0o644))
            .open(target)
            .map_err(|e| Failure::io(path, &e))?;
        if let Some(m) = mode {
            file.set_permissions(Permissions::from_mode(m))
                .map_err(|e| Failure::io(path, &e))?;
        }
        file.write_all(data).map_err(|e| Failure::io(path, &e))?;
        return ok(Response::Ok {});
    }
    let Some(name) = target.file_name() else {
        return Err(Failure::reply(
            error_kind::INVALID,
            format!("{path}: not a file path"),
        ));
    };
    // Keep an existing file's permissions unless told otherwise.
    let mode = mode.or_else(|| fs::metadata(target).ok().map(|m| m.permissions().mode()));
    let tmp_name = format!(
        ".{}.agent-tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let tmp = target.with_file_name(tmp_name);
    let result = (|| -> io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        if let Some(m) = mode {
            file.set_permissions(Permissions::from_mode(m))?;
        }
        file.write_all(data)?;
        drop(file);
        fs::rename(&tmp, target)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(Failure::io(path, &e));
    }
    ok(Response::Ok {})
}

fn list(path: &str) -> OpResult {
    check_path(path)?;
    let mut list = Vec::new();
    for entry in fs::read_dir(path).map_err(|e| Failure::io(path, &e))? {
        let entry = entry.map_err(|e| Failure::io(path, &e))?;
        // Follow symlinks; a dangling one is described by the link itself.
        let meta = fs::metadata(entry.path()).or_else(|_| entry.metadata());
        let (is_dir, size) = meta.map_or((false, 0), |m| (m.is_dir(), m.len()));
        list.push(Entry {
            name: entry.file_name().to_string_lossy().into_owned(),
            is_dir,
            size,
        });
    }
    list.sort_by(|a, b| a.name.cmp(&b.name));
    ok(Response::Entries { list })
}

fn remove(path: &str, recursive: bool) -> OpResult {
    check_path(path)?;
    let meta = fs::symlink_metadata(path).map_err(|e| Failure::io(path, &e))?;
    let result = if meta.is_dir() {
        if recursive {
            fs::remove_dir_all(path)
        } else {
            fs::remove_dir(path)
        }
    } else {
        fs::remove_file(path)
    };
    result.map_err(|e| Failure::io(path, &e))?;
    ok(Response::Ok {})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_tail() {
        let mut r = Ring::default();
        r.push(&vec![1u8; OUTPUT_BUFFER - 10]);
        r.push(&[2u8; 20]);
        assert_eq!(r.buf.len(), OUTPUT_BUFFER);
        assert_eq!(r.dropped, 10);
        assert_eq!(r.buf.back(), Some(&2));
        r.push(&vec![3u8; OUTPUT_BUFFER + 5]);
        assert_eq!(r.buf.len(), OUTPUT_BUFFER);
        assert_eq!(r.dropped, 10 + OUTPUT_BUFFER as u64 + 5);
        assert!(r.buf.iter().all(|&b| b == 3));
    }

    #[test]
    fn known_ops_match_the_request_enum() {
        let samples = vec![
            Request::Hello { version: 1 },
            Request::Exec {
                argv: vec![],
                env: vec![],
                cwd: None,
                timeout_ms: None,
            },
            Request::Spawn {
                argv: vec![],
                env: vec![],
                cwd: None,
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
            Request::Mount {
                source: "x".into(),
                target: "/x".into(),
                fstype: "virtiofs".into(),
                read_only: false,
            },
        ];
        assert_eq!(samples.len(), KNOWN_OPS.len());
        for s in samples {
            let v = serde_json::to_value(&s).unwrap();
            let op = v["op"].as_str().unwrap().to_string();
            assert!(KNOWN_OPS.contains(&op.as_str()), "{op}");
        }
    }
}
