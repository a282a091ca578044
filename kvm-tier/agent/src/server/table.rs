//! The agent's [`ProcessTable`]: every process it started (background ones and running
//! `exec`s), the reaper thread that collects every child's exit status (see the module docs
//! of `server`), spawning a command into its own process group, and `killpg`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use super::capture::{Capture, Captured};
use super::reply::Failure;
use super::{MAX_EXITED_KEPT, lock, wait_while_until};
use crate::proto::error_kind;

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

#[derive(Debug)]
pub(super) struct Proc {
    pub(super) argv: Vec<String>,
    pub(super) background: bool,
    seq: u64,
    pub(super) exit: Option<ExitInfo>,
    pub(super) stdin: Arc<Mutex<Option<ChildStdin>>>,
    capture: Arc<Capture>,
    /// `exec`: an eventfd the reaper signals when the exit status is recorded.
    notify: Option<Arc<OwnedFd>>,
}

#[derive(Debug, Default)]
pub(super) struct State {
    pub(super) procs: BTreeMap<u32, Proc>,
    /// Bumped at every registration (wakes an idle reaper).
    generation: u64,
    seq: u64,
}

/// The agent's processes: shared by all connections, alive as long as the agent (the host
/// reconnects after a snapshot/restore and finds its processes again).
#[derive(Debug)]
pub struct ProcessTable {
    pub(super) state: Mutex<State>,
    /// Signalled when an exit status is recorded.
    exited: Condvar,
    /// Signalled when a child is registered (the reaper idles when there are no children).
    kick: Condvar,
    /// Read: spawning + registering; write: the reaper reaping one child.
    gate: RwLock<()>,
}

pub(super) struct Started {
    pub(super) pid: u32,
    pub(super) stdout: File,
    pub(super) stderr: File,
    pub(super) stdin: Option<ChildStdin>,
}

/// What to spawn.
pub(super) struct SpawnSpec<'a> {
    pub(super) argv: &'a [String],
    pub(super) env: &'a [(String, String)],
    pub(super) cwd: Option<&'a str>,
    /// `argv` is `[script]` for [`login_shell`].
    pub(super) shell: bool,
}

/// The shell a `shell` request's script runs in: `/bin/bash` where the root filesystem has it
/// (the Debian images), else `/bin/sh` (busybox). Looked up once, after the root is mounted.
pub(super) fn login_shell() -> &'static str {
    static SHELL: OnceLock<&'static str> = OnceLock::new();
    SHELL.get_or_init(|| {
        if std::path::Path::new("/bin/bash").exists() {
            "/bin/bash"
        } else {
            "/bin/sh"
        }
    })
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
                        // No children: sleep until one is registered. Every spawn registers
                        // (`launch`), and an orphan reparented to this process (PID 1 in the
                        // guest) descends from a child, so none appears while there is none.
                        // No timeout: an idle guest's only timer wake-up from the agent was
                        // this thread's, once a second, each a timer interrupt and a wait(2)
                        // of emulated kernel code on PVM hosts.
                        let state = lock(&self.state);
                        drop(wait_while_until(&self.kick, state, None, |s| {
                            s.generation == generation
                        }));
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
    pub(super) fn start(
        &self,
        spec: &SpawnSpec<'_>,
        stdin: Option<Stdio>,
        background: bool,
        notify: Option<Arc<OwnedFd>>,
    ) -> Result<Started, Failure> {
        self.start_with(spec, stdin, background, notify, &mut |_| {})
    }

    /// [`Self::start`], with `configure` given the command before it is spawned (e.g. to keep
    /// more descriptors open in the child).
    pub(super) fn start_with(
        &self,
        spec: &SpawnSpec<'_>,
        stdin: Option<Stdio>,
        background: bool,
        notify: Option<Arc<OwnedFd>>,
        configure: &mut dyn FnMut(&mut Command),
    ) -> Result<Started, Failure> {
        let mut cmd = command(spec)?;
        cmd.stdin(stdin.unwrap_or_else(Stdio::piped))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        configure(&mut cmd);
        let open = if background { 2 } else { 0 };
        let mut child = self.launch(&mut cmd, spec, background, open, notify)?;
        let pid = child.id();
        let (Some(out), Some(err)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(Failure::reply(error_kind::IO, "child pipes missing"));
        };
        let mut child_stdin = child.stdin.take();
        if background {
            // A background process's stdin is the table's (the `stdin` request writes it).
            if let Some(p) = lock(&self.state).procs.get(&pid) {
                *lock(&p.stdin) = child_stdin.take();
            }
        }
        Ok(Started {
            pid,
            stdout: File::from(OwnedFd::from(out)),
            stderr: File::from(OwnedFd::from(err)),
            stdin: child_stdin,
        })
    }

    /// Spawns `spec` on a terminal: `slave` (a pseudo-terminal's slave side) becomes its
    /// stdin, stdout and stderr, and its controlling terminal, in a session of its own
    /// (`setsid`: its pid is also its session and process-group id). Registered as a
    /// background process without captured output (the terminal's master carries it).
    pub(super) fn start_terminal(
        &self,
        spec: &SpawnSpec<'_>,
        slave: &OwnedFd,
    ) -> Result<u32, Failure> {
        let mut cmd = command(spec)?;
        let stdio = || {
            slave
                .try_clone()
                .map(Stdio::from)
                .map_err(|e| Failure::io("duplicating the terminal", &e))
        };
        cmd.stdin(stdio()?).stdout(stdio()?).stderr(stdio()?);
        // SAFETY: the closure runs in the child between fork and exec and only calls setsid(2)
        // and ioctl(2), both async-signal-safe, on descriptor 0 (the terminal, set up before
        // the closure runs); no memory is allocated or shared.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() == -1 {
                    return Err(io::Error::last_os_error());
                }
                if libc::ioctl(0, libc::TIOCSCTTY, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            })
        };
        let child = self.launch(&mut cmd, spec, true, 0, None)?;
        Ok(child.id())
    }

    /// Spawns `cmd` (built from `spec`) and registers it; `open` is how many capture threads
    /// will read its output. Dropping the returned child does not wait for it (the reaper
    /// does).
    fn launch(
        &self,
        cmd: &mut Command,
        spec: &SpawnSpec<'_>,
        background: bool,
        open: u8,
        notify: Option<Arc<OwnedFd>>,
    ) -> Result<std::process::Child, Failure> {
        let program = spec.argv.first().map(String::as_str).unwrap_or_default();
        let mut attempt = 0;
        let (child, _spawning) = loop {
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
                stdin: Arc::new(Mutex::new(None)),
                capture: Arc::new(Capture {
                    state: Mutex::new(Captured {
                        open,
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
        Ok(child)
    }

    pub(super) fn forget(&self, pid: u32) {
        lock(&self.state).procs.remove(&pid);
    }

    pub(super) fn exit_of(&self, pid: u32) -> Option<ExitInfo> {
        lock(&self.state).procs.get(&pid).and_then(|p| p.exit)
    }

    /// Waits until `pid` has an exit status, at most until `deadline` (`None`: forever).
    /// `Err` when the pid is not tracked.
    pub(super) fn wait_exit(
        &self,
        pid: u32,
        deadline: Option<Instant>,
    ) -> Result<Option<ExitInfo>, ()> {
        let running = |s: &mut State| s.procs.get(&pid).is_some_and(|p| p.exit.is_none());
        let state = wait_while_until(&self.exited, lock(&self.state), deadline, running);
        // Not tracked (`Err`), exited, or still running at the deadline.
        Ok(state.procs.get(&pid).ok_or(())?.exit)
    }

    pub(super) fn capture_of(&self, pid: u32) -> Option<(Arc<Capture>, Option<ExitInfo>)> {
        lock(&self.state)
            .procs
            .get(&pid)
            .map(|p| (p.capture.clone(), p.exit))
    }
}

/// `program` as `execvp` would find it on the `PATH` (the command's own, else the agent's):
/// the first `dir/program` that is a file this process may execute (`access(X_OK)`, which
/// also refuses `noexec` mounts). A name with a `/`, one found nowhere, and a file that is
/// neither ELF nor `#!` (which `execvp` runs with `/bin/sh`) are given back as they are, for
/// `execvp` to handle as it always did.
///
/// So the kernel is asked to exec once: every miss of `execvp`'s own search is a whole
/// `execve` in the guest kernel, which allocates a new address space and copies the arguments
/// and environment before it finds no file (~22 k emulated instructions each on PVM hosts,
/// five of them for `true` on the Debian images' `PATH`), where `stat` of a candidate is a path
/// walk. An absolute program also keeps a command whose environment sets `PATH` on
/// `posix_spawn` (a `vfork`) rather than a `fork` of the agent.
fn on_path<'a>(program: &'a str, env: &[(String, String)]) -> std::borrow::Cow<'a, str> {
    if program.contains('/') {
        return program.into();
    }
    let own = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone());
    let Some(path) = own.or_else(|| std::env::var("PATH").ok()) else {
        return program.into();
    };
    for dir in path.split(':') {
        // An empty entry is the working directory, for `execvp` too: leave those to it.
        if dir.is_empty() {
            return program.into();
        }
        let candidate = format!("{dir}/{program}");
        if !std::fs::metadata(&candidate).is_ok_and(|m| m.is_file()) {
            continue;
        }
        let Ok(c) = std::ffi::CString::new(candidate.as_str()) else {
            return program.into();
        };
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        if unsafe { libc::access(c.as_ptr(), libc::X_OK) } != 0 {
            continue;
        }
        let mut magic = [0u8; 4];
        let direct = std::fs::File::open(&candidate)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
            .is_ok_and(|()| magic == *b"\x7fELF" || magic.starts_with(b"#!"));
        return if direct {
            candidate.into()
        } else {
            program.into()
        };
    }
    program.into()
}

/// The command `spec` names: its program and arguments (or its script for the shell), its
/// environment and working directory; stdio and the process group are the caller's.
fn command(spec: &SpawnSpec<'_>) -> Result<Command, Failure> {
    let Some(program) = spec.argv.first() else {
        return Err(Failure::reply(error_kind::INVALID, "empty argv"));
    };
    if program.is_empty() {
        return Err(Failure::reply(error_kind::INVALID, "empty program name"));
    }
    let mut cmd = if spec.shell {
        if spec.argv.len() != 1 {
            return Err(Failure::reply(
                error_kind::INVALID,
                "a shell request's argv is one script",
            ));
        }
        let mut c = Command::new(login_shell());
        c.arg("-c").arg(program);
        c
    } else {
        let mut c = Command::new(&*on_path(program, spec.env));
        c.args(&spec.argv[1..]);
        c
    };
    cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));
    if let Some(cwd) = spec.cwd {
        cmd.current_dir(cwd);
    }
    Ok(cmd)
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

pub(super) fn killpg(pid: u32, signal: i32) -> io::Result<()> {
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
