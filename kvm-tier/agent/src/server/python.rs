//! `run_code`: cells of Python in one persistent interpreter per agent.
//!
//! The first `run_code` starts `python3` (or `$DORMANT_AGENT_PYTHON`) in its own process group,
//! stdin `/dev/null`, in `/root` where the agent may enter it (else `/`), with the agent's
//! environment, running the driver `python/repl.py`. The driver and the agent talk over two
//! pipes of their own (see `python/pipe.rs`), never over the interpreter's descriptors 1 and 2:
//! those are pipes too, read all the time by a pump thread into the current cell's stdout and
//! stderr (capped per cell; output written between cells is dropped). So `print`,
//! `os.write(1, ...)` and subprocesses all reach the cell's output, and nothing a cell writes
//! can break the framing. When the driver's reply comes, the pump first takes what is left in
//! the output pipes (the driver wrote it before replying), so a cell's output is complete.
//!
//! One cell runs at a time (a mutex; another connection's `run_code` waits). At the cell's
//! timeout, or when the host closes the connection, the agent sends SIGINT to the
//! interpreter's group once: the driver raises `KeyboardInterrupt` in the cell, which ends
//! like any exception, and the session goes on. A cell that does not stop within
//! [`INTERRUPT_GRACE`] is killed with its group; an interpreter that exits, is killed, or
//! breaks its reply pipe ends the session (`lost`), and the next `run_code` starts a fresh one.
//!
//! The interpreter is registered in the [`ProcessTable`] (not as a background process), whose
//! reaper records its exit and signals an eventfd that the pump watches.

mod pipe;

pub use pipe::{DriverReply, MAX_REPLY, PipeError, ReplyDecoder};

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::reply::{Failure, OpResult};
use super::table::{ProcessTable, SpawnSpec, killpg};
use super::{CHUNK, KILL_GRACE, lock, wait_while_until};
use crate::proto::{CellError, MAX_DATA, RUN_CODE_OUTPUT_MAX, Response, error_kind};

/// Environment variable naming the agent's Python interpreter (a path, or a name looked up in
/// `PATH`); default `python3`.
pub const ENV_PYTHON: &str = "DORMANT_AGENT_PYTHON";
/// How long an interrupted cell has to stop before the interpreter is killed.
pub const INTERRUPT_GRACE: Duration = Duration::from_secs(3);
/// The driver, sent to the interpreter's bootstrap at start.
const DRIVER: &str = include_str!("python/repl.py");
/// How often a waiting cell looks at its deadline and its connection.
const SLICE: Duration = Duration::from_millis(50);
/// When the driver's reply pipe breaks, how long to wait for the interpreter's exit status.
const EXIT_WAIT: Duration = Duration::from_secs(1);
/// After a reply, how long the pump keeps taking output that is already in the pipes.
const DRAIN_LIMIT: Duration = Duration::from_millis(100);
/// The agent shortens a cell error's value to its first this many bytes ...
const MAX_ERROR_VALUE: usize = 16 << 10;
/// ... and its traceback to its last this many, so the answer's header stays small.
const MAX_TRACEBACK: usize = 64 << 10;

/// The agent's interpreter, when one is running; the lock is what lets one cell run at a time.
static SESSION: Mutex<Option<Interpreter>> = Mutex::new(None);

/// A `run_code` request's settings (see [`crate::proto::Request::RunCode`]).
pub(super) struct Cell {
    pub(super) timeout_ms: Option<u64>,
    pub(super) output_limit: Option<u64>,
    pub(super) reseed: bool,
}

/// Runs `code` as one cell (see the module docs).
pub(super) fn run_code(
    table: &ProcessTable,
    hangup: Option<RawFd>,
    code: Vec<u8>,
    cell: &Cell,
) -> OpResult {
    let Ok(code) = String::from_utf8(code) else {
        return Err(Failure::reply(
            error_kind::INVALID,
            "run_code's code is not valid UTF-8",
        ));
    };
    let Some(message) = pipe::request(&code, cell.reseed) else {
        return Err(Failure::reply(
            error_kind::INVALID,
            "run_code's code is too long",
        ));
    };
    let limit = cell.output_limit.map_or(RUN_CODE_OUTPUT_MAX, |l| {
        usize::try_from(l).map_or(RUN_CODE_OUTPUT_MAX, |l| l.min(RUN_CODE_OUTPUT_MAX))
    });
    let mut session = lock(&SESSION);
    if let Some(old) = session.take_if(|s| s.ended(table)) {
        old.retire(table);
    }
    let interp = match session.take() {
        Some(i) => i,
        None => Interpreter::start(table)?,
    };
    let interp = session.insert(interp);
    {
        let mut st = lock(&interp.shared.state);
        st.stdout.reset(limit);
        st.stderr.reset(limit);
        st.reply = None;
    }
    let requests = interp.requests.clone();
    let spawned = thread::Builder::new()
        .name("run-code-input".into())
        .spawn(move || {
            // A driver that died is noticed by the pump.
            let _ = (&*requests).write_all(&message);
        });
    if let Err(e) = spawned {
        return Err(Failure::io("starting the run_code input thread", &e));
    }
    // A timeout too far to represent is none.
    let deadline = cell
        .timeout_ms
        .and_then(|ms| Instant::now().checked_add(Duration::from_millis(ms)));
    let ended = interp.wait(table, hangup, deadline);
    let (stdout, stderr) = {
        let mut st = lock(&interp.shared.state);
        (st.stdout.take(), st.stderr.take())
    };
    let (error, results, lost) = match ended.outcome {
        Outcome::Replied(reply) => (reply.error.map(clamp), reply.results, false),
        Outcome::Lost(why) => (
            Some(CellError {
                name: "SessionLost".into(),
                value: format!(
                    "{why}; its variables are gone, and the next run_code starts a fresh \
                     interpreter"
                ),
                traceback: String::new(),
            }),
            None,
            true,
        ),
    };
    if lost && let Some(old) = session.take() {
        old.retire(table);
    }
    drop(session);
    if ended.hung_up {
        return Err(Failure::Connection(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "the host closed the connection during run_code; its cell was interrupted",
        )));
    }
    let stdout_len = stdout.data.len();
    let mut data = stdout.data;
    data.extend_from_slice(&stderr.data);
    // The results record goes last, when it fits in the frame beside the output.
    let record = results.as_ref().map_or(&[][..], |r| r.get().as_bytes());
    let results_over = record.len() > MAX_DATA - data.len();
    let results_len = if results_over { 0 } else { record.len() };
    data.extend_from_slice(&record[..results_len]);
    Ok((
        Response::Executed {
            error,
            // At most RUN_CODE_OUTPUT_MAX.
            stdout_len: stdout_len as u32,
            stdout_over: stdout.over,
            stderr_over: stderr.over,
            timed_out: ended.timed_out,
            lost,
            // At most MAX_DATA.
            results_len: results_len as u32,
            results_over,
        },
        data,
    ))
}

/// Shortens a cell error's long fields (see [`CellError`]).
fn clamp(mut e: CellError) -> CellError {
    truncate_head(&mut e.name, 256);
    truncate_head(&mut e.value, MAX_ERROR_VALUE);
    if e.traceback.len() > MAX_TRACEBACK {
        let mut cut = e.traceback.len() - MAX_TRACEBACK;
        while !e.traceback.is_char_boundary(cut) {
            cut += 1;
        }
        e.traceback = format!("...{}", &e.traceback[cut..]);
    }
    e
}

fn truncate_head(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
}

/// One stream of the current cell: at most `limit` bytes kept, `over` once more came.
#[derive(Debug, Default)]
struct Sink {
    data: Vec<u8>,
    limit: usize,
    over: bool,
}

impl Sink {
    fn push(&mut self, bytes: &[u8]) {
        let room = self.limit.saturating_sub(self.data.len());
        if bytes.len() > room {
            self.over = true;
        }
        self.data.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn reset(&mut self, limit: usize) {
        *self = Sink {
            data: Vec::new(),
            limit,
            over: false,
        };
    }

    fn take(&mut self) -> Sink {
        let limit = self.limit;
        std::mem::replace(
            self,
            Sink {
                data: Vec::new(),
                limit,
                over: false,
            },
        )
    }
}

/// What the pump thread hands to the waiting cell.
#[derive(Debug, Default)]
struct Pumped {
    stdout: Sink,
    stderr: Sink,
    /// The driver's reply to the current cell, or why its reply pipe broke.
    reply: Option<Result<DriverReply, String>>,
    /// The interpreter has ended (its exit status is in the table); the pump has stopped.
    exited: bool,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<Pumped>,
    changed: Condvar,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut Pumped)) {
        f(&mut lock(&self.state));
        self.changed.notify_all();
    }
}

/// A running interpreter.
#[derive(Debug)]
struct Interpreter {
    pid: u32,
    /// The write end of the driver's request pipe.
    requests: Arc<File>,
    shared: Arc<Shared>,
}

/// How a cell ended.
enum Outcome {
    Replied(DriverReply),
    /// The session ended, for this reason.
    Lost(String),
}

struct Ended {
    outcome: Outcome,
    timed_out: bool,
    hung_up: bool,
}

impl Interpreter {
    fn start(table: &ProcessTable) -> Result<Interpreter, Failure> {
        let program = std::env::var(ENV_PYTHON)
            .ok()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "python3".into());
        let Some(path) = find_program(&program) else {
            return Err(Failure::reply(
                error_kind::NOT_FOUND,
                format!(
                    "run_code needs a Python interpreter in the guest, and there is no \
                     {program:?} here (use an image with python3)"
                ),
            ));
        };
        let (req_read, req_write) = pipe().map_err(|e| Failure::io("pipe", &e))?;
        let (rep_read, rep_write) = pipe().map_err(|e| Failure::io("pipe", &e))?;
        // SAFETY: plain syscall without pointers.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(Failure::io("eventfd", &io::Error::last_os_error()));
        }
        // SAFETY: `efd` is a fresh descriptor that nothing else owns.
        let efd = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
        let (r, w) = (req_read.as_raw_fd(), rep_write.as_raw_fd());
        let bootstrap = format!(
            "import os\n_R,_W={r},{w}\nb=b''\nwhile len(b)<{n}:\n c=os.read(_R,{n}-len(b))\n \
             if not c:raise SystemExit(70)\n b+=c\nexec(compile(b,'<dormant-driver>','exec'))\n",
            n = DRIVER.len()
        );
        let argv = [path, "-u".into(), "-c".into(), bootstrap];
        let cwd = std::fs::read_dir("/root").is_ok().then_some("/root");
        let spec = SpawnSpec {
            argv: &argv,
            env: &[],
            cwd,
            shell: false,
        };
        let started = table.start_with(
            &spec,
            Some(Stdio::null()),
            false,
            Some(efd.clone()),
            &mut |cmd| {
                // SAFETY: the closure runs in the child between fork and exec and only calls
                // fcntl(2), which is async-signal-safe, on two descriptors the parent holds open
                // (as the child does) until the spawn has returned.
                unsafe {
                    cmd.pre_exec(move || {
                        // The two pipe ends stay open across exec in this child only (they are
                        // close-on-exec everywhere else).
                        for fd in [r, w] {
                            if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                                return Err(io::Error::last_os_error());
                            }
                        }
                        Ok(())
                    })
                };
            },
        );
        let started = started.map_err(|f| match f {
            Failure::Reply { kind, message } => Failure::Reply {
                kind,
                message: format!("run_code cannot start its Python interpreter: {message}"),
            },
            other => other,
        })?;
        drop((req_read, rep_write));
        let pid = started.pid;
        let requests = Arc::new(File::from(req_write));
        // The driver fits the pipe's buffer: this does not block.
        if let Err(e) = (&*requests).write_all(DRIVER.as_bytes()) {
            let _ = killpg(pid, libc::SIGKILL);
            table.forget(pid);
            return Err(Failure::io("sending the Python driver", &e));
        }
        let shared = Arc::new(Shared::default());
        let pumped = shared.clone();
        let (out, err, replies) = (started.stdout, started.stderr, File::from(rep_read));
        let spawned = thread::Builder::new()
            .name(format!("python-{pid}"))
            .spawn(move || pump([out, err, replies], &efd, &pumped));
        if let Err(e) = spawned {
            let _ = killpg(pid, libc::SIGKILL);
            table.forget(pid);
            return Err(Failure::io("starting the run_code pump thread", &e));
        }
        Ok(Interpreter {
            pid,
            requests,
            shared,
        })
    }

    /// Whether the interpreter has ended (between cells: killed from outside, or a thread of
    /// a cell ended it).
    fn ended(&self, table: &ProcessTable) -> bool {
        lock(&self.shared.state).exited || table.exit_of(self.pid).is_some()
    }

    /// Kills what is left of the interpreter's group and forgets it.
    fn retire(self, table: &ProcessTable) {
        let _ = killpg(self.pid, libc::SIGKILL);
        table.forget(self.pid);
    }

    /// Waits for the current cell to end: the driver's reply, or the end of the session.
    /// Interrupts it at `deadline` or when `hangup` reports that the host went away, and kills
    /// it [`INTERRUPT_GRACE`] later.
    fn wait(
        &self,
        table: &ProcessTable,
        hangup: Option<RawFd>,
        deadline: Option<Instant>,
    ) -> Ended {
        let mut interrupted: Option<Instant> = None;
        let mut killed: Option<Instant> = None;
        let (mut timed_out, mut hung_up) = (false, false);
        let outcome = loop {
            let st = lock(&self.shared.state);
            let mut st = wait_while_until(
                &self.shared.changed,
                st,
                Some(Instant::now() + SLICE),
                |s| s.reply.is_none() && !s.exited,
            );
            match st.reply.take() {
                Some(Ok(reply)) => break Outcome::Replied(reply),
                Some(Err(why)) => {
                    // Usually the interpreter is ending (its pipe closes first): say how.
                    let until = Instant::now() + EXIT_WAIT;
                    let st = wait_while_until(&self.shared.changed, st, Some(until), |s| !s.exited);
                    let exited = st.exited;
                    drop(st);
                    break Outcome::Lost(if exited {
                        self.exit_reason(table, killed.is_some())
                    } else {
                        format!("the Python driver failed ({why})")
                    });
                }
                None => {}
            }
            if st.exited {
                drop(st);
                break Outcome::Lost(self.exit_reason(table, killed.is_some()));
            }
            drop(st);
            let now = Instant::now();
            match (interrupted, killed) {
                (None, _) => {
                    if deadline.is_some_and(|d| now >= d) {
                        timed_out = true;
                    } else if hangup.is_some_and(peer_gone) {
                        hung_up = true;
                    }
                    if timed_out || hung_up {
                        let _ = killpg(self.pid, libc::SIGINT);
                        interrupted = Some(now);
                    }
                }
                (Some(at), None) if now >= at + INTERRUPT_GRACE => {
                    let _ = killpg(self.pid, libc::SIGKILL);
                    killed = Some(now);
                }
                (_, Some(at)) if now >= at + KILL_GRACE => {
                    break Outcome::Lost(format!(
                        "the Python interpreter (pid {}) did not end after SIGKILL",
                        self.pid
                    ));
                }
                _ => {}
            }
        };
        Ended {
            outcome,
            timed_out,
            hung_up,
        }
    }

    fn exit_reason(&self, table: &ProcessTable, killed: bool) -> String {
        if killed {
            return format!(
                "the cell did not stop within {} s of its interrupt, so the Python interpreter \
                 was killed",
                INTERRUPT_GRACE.as_secs()
            );
        }
        match table.exit_of(self.pid) {
            Some(e) if e.code.is_some() => format!(
                "the Python interpreter exited with code {}",
                e.code.unwrap_or_default()
            ),
            Some(e) if e.signal.is_some() => format!(
                "the Python interpreter was killed by signal {}",
                e.signal.unwrap_or_default()
            ),
            _ => "the Python interpreter ended".into(),
        }
    }
}

/// The pump thread of one interpreter: reads its stdout and stderr into the cell's sinks and
/// its replies into the decoder until it ends (`efd`, signalled by the reaper).
fn pump(files: [File; 3], efd: &OwnedFd, shared: &Shared) {
    let mut files = files.map(Some);
    let mut decoder = ReplyDecoder::default();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(4);
        let mut which: Vec<usize> = Vec::with_capacity(4);
        for (i, f) in files.iter().enumerate() {
            if let Some(f) = f {
                fds.push(pollin(f.as_raw_fd()));
                which.push(i);
            }
        }
        fds.push(pollin(efd.as_raw_fd()));
        which.push(3);
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // Cannot wait: give the session up (the cell sees it as lost).
            shared.update(|s| s.exited = true);
            return;
        }
        let ready = |i: usize| {
            fds.iter()
                .zip(&which)
                .any(|(p, &w)| w == i && p.revents != 0)
        };
        // Output before the reply, so that a reply is published after the output it follows.
        for i in 0..2 {
            if ready(i) {
                read_output(&mut files, i, &mut buf, shared);
            }
        }
        if ready(2) {
            read_reply(&mut files, &mut decoder, &mut buf, shared);
        }
        if ready(3) {
            drain_output(&mut files, &mut buf, shared);
            shared.update(|s| s.exited = true);
            return;
        }
    }
}

fn pollin(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Reads one chunk of stdout (`i == 0`) or stderr (`1`) into its sink; EOF closes it.
fn read_output(files: &mut [Option<File>; 3], i: usize, buf: &mut [u8], shared: &Shared) {
    let Some(f) = files[i].as_mut() else { return };
    match f.read(buf) {
        Ok(0) => files[i] = None,
        Ok(n) => shared.update(|s| {
            let sink = if i == 0 { &mut s.stdout } else { &mut s.stderr };
            sink.push(&buf[..n]);
        }),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
        Err(_) => files[i] = None,
    }
}

/// Takes the output already in the pipes (for at most [`DRAIN_LIMIT`]).
fn drain_output(files: &mut [Option<File>; 3], buf: &mut [u8], shared: &Shared) {
    let until = Instant::now() + DRAIN_LIMIT;
    while Instant::now() < until {
        let mut any = false;
        for i in 0..2 {
            let Some(f) = files[i].as_ref() else { continue };
            let mut p = [pollin(f.as_raw_fd())];
            // SAFETY: `p` is a valid array of one pollfd.
            let n = unsafe { libc::poll(p.as_mut_ptr(), 1, 0) };
            if n > 0 && p[0].revents != 0 {
                any = true;
                read_output(files, i, buf, shared);
            }
        }
        if !any {
            return;
        }
    }
}

/// Reads what the driver's reply needs next; publishes the reply (after the output already
/// written) or why the pipe is broken.
fn read_reply(
    files: &mut [Option<File>; 3],
    decoder: &mut ReplyDecoder,
    buf: &mut [u8],
    shared: &Shared,
) {
    let Some(f) = files[2].as_mut() else { return };
    let want = decoder.wanted().min(buf.len());
    let broken = match f.read(&mut buf[..want]) {
        Ok(0) => "it closed its reply pipe".to_string(),
        Ok(n) => match decoder.feed(&buf[..n]) {
            Ok(None) => return,
            Ok(Some(reply)) => {
                drain_output(files, buf, shared);
                shared.update(|s| s.reply = Some(Ok(reply)));
                return;
            }
            Err(e) => e.to_string(),
        },
        Err(e) if e.kind() == io::ErrorKind::Interrupted => return,
        Err(e) => format!("reading its reply: {e}"),
    };
    files[2] = None;
    shared.update(|s| s.reply = Some(Err(broken)));
}

/// Whether the peer of a connected socket closed or reset it.
fn peer_gone(fd: RawFd) -> bool {
    let mut p = [libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    }];
    // SAFETY: `p` is a valid array of one pollfd.
    let n = unsafe { libc::poll(p.as_mut_ptr(), 1, 0) };
    n > 0 && p[0].revents != 0
}

/// A pipe, both ends close-on-exec: `(read, write)`.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: both are fresh descriptors that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `program` if it names a file (it has a `/`), else its first executable match in `PATH`.
fn find_program(program: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let runnable = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        return runnable(std::path::Path::new(program)).then(|| program.to_string());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| runnable(p))
        .map(|p| p.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_driver_fits_a_pipe_buffer() {
        // Interpreter::start writes it before anyone reads.
        assert!(DRIVER.len() < 60 << 10);
    }

    #[test]
    fn long_errors_are_shortened_on_char_boundaries() {
        let e = clamp(CellError {
            name: "E".into(),
            value: "é".repeat(MAX_ERROR_VALUE),
            traceback: "ü".repeat(MAX_TRACEBACK),
        });
        assert!(e.value.len() <= MAX_ERROR_VALUE + 3 && e.value.ends_with("..."));
        assert!(e.traceback.len() <= MAX_TRACEBACK + 3 && e.traceback.starts_with("..."));
    }

    #[test]
    fn sinks_keep_their_limit_and_flag_the_rest() {
        let mut s = Sink::default();
        s.reset(4);
        s.push(b"abc");
        s.push(b"de");
        assert_eq!((s.data.as_slice(), s.over), (&b"abcd"[..], true));
        let t = s.take();
        assert_eq!(t.data, b"abcd");
        assert!(s.data.is_empty() && !s.over && s.limit == 4);
    }
}
