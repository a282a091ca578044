//! Calls to the live guest. Every call is a request to the guest agent over virtio-vsock:
//! this file holds that connection (opened, reopened after a call that broke it, bounded by
//! the host-side deadlines of the module docs), what stops a running call
//! ([`KvmInterrupter`]), how a failed request becomes dormant's error (and when it poisons
//! the sandbox), the checks on guest paths, and [`KvmSandbox::exec_streaming`], which `exec`
//! uses.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dormant_agent::client::{Client, ClientError};
use dormant_core::lifecycle::{Operation, State};
use dormant_core::{Command, Error, Result};

use super::{AGENT_PORT, EXEC_GRACE, KvmSandbox, REQUEST_CAP};
use crate::machine::Machine;
use crate::virtio::vsock::{Cancelled, VsockStream, VsockWaker};

/// What stops a running call: shared by a sandbox and its [`KvmInterrupter`]s.
#[derive(Debug, Default)]
pub(super) struct CallControl {
    /// Raised to stop the running call; every agent stream of the sandbox watches it.
    pub(super) flag: Arc<AtomicBool>,
    /// Wakes the waits on the current machine's vsock device.
    pub(super) waker: parking_lot::Mutex<Option<VsockWaker>>,
}

impl CallControl {
    /// A call starts: an interrupt requested before it does not stop it.
    pub(super) fn begin(&self) {
        self.flag.store(false, Ordering::SeqCst);
    }
}

/// Stops a [`KvmSandbox`]'s running call from another thread (see [`KvmSandbox::interrupter`]).
#[derive(Debug, Clone)]
pub struct KvmInterrupter(Arc<CallControl>);

impl KvmInterrupter {
    /// Interrupts the call running now, if any: it fails with [`Error::Interrupted`] within
    /// moments. A call that starts later is not affected.
    pub fn interrupt(&self) {
        self.0.flag.store(true, Ordering::SeqCst);
        if let Some(w) = self.0.waker.lock().as_ref() {
            w.wake();
        }
    }
}

impl dormant_core::Interrupt for KvmInterrupter {
    fn interrupt(&self) {
        KvmInterrupter::interrupt(self);
    }

    /// An interrupted `exec` kills the guest command; the sandbox stays running.
    fn stops_commands(&self) -> bool {
        true
    }
}

impl KvmSandbox {
    /// A handle that stops this sandbox's running call from another thread: a call that
    /// talks to the guest agent (`exec`, `spawn`, `wait`, files, connecting during a resume)
    /// fails with [`Error::Interrupted`] within moments, the command an `exec` ran is killed
    /// in the guest, and the sandbox stays running (see the module docs). A checkpoint's own
    /// work is not interrupted. Valid across resumes of this handle.
    pub fn interrupter(&self) -> KvmInterrupter {
        KvmInterrupter(self.calls.clone())
    }

    /// Opens the agent connection, retrying until the guest's agent listens or `timeout`
    /// (the interrupter stops it too: `Error::Interrupted`).
    pub(super) fn connect(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let machine = self.machine.as_ref().ok_or(Error::IllegalTransition {
            op: Operation::Exec,
            state: State::Standby,
        })?;
        let host = machine.vsock();
        *self.calls.waker.lock() = Some(host.waker());
        let flag = self.calls.flag.clone();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = host
                .connect_with(AGENT_PORT, left.min(Duration::from_secs(5)), Some(&flag))
                .map_err(ClientError::Io)
                .and_then(|mut s| {
                    s.set_cancel(Some(flag.clone()));
                    // The handshake waits no longer than the connection may take.
                    s.set_deadline(Some(deadline));
                    let mut c = Client::new(s);
                    c.hello().map(|_| c)
                });
            match attempt {
                Ok(mut c) => {
                    c.get_mut().set_deadline(None);
                    self.agent = Some(c);
                    return Ok(());
                }
                Err(ClientError::Io(e)) if Cancelled::is_cause_of(&e) => {
                    return Err(Error::Interrupted {
                        last_good: self.lifecycle.last_good().cloned(),
                    });
                }
                Err(e) => {
                    if !machine.is_running() {
                        let t = machine.console().text();
                        let tail: Vec<&str> = t.lines().rev().take(10).collect();
                        let tail: Vec<&str> = tail.into_iter().rev().collect();
                        return Err(Error::runtime(
                            "start the guest",
                            format!(
                                "the VM stopped before its agent answered; console:\n{}",
                                tail.join("\n")
                            ),
                        ));
                    }
                    if Instant::now() >= deadline {
                        return Err(Error::runtime_at(
                            "reach the guest agent",
                            format!("no answer on vsock port {AGENT_PORT} in {timeout:?}"),
                            e,
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// The agent client for a call `op` that starts now, reconnecting if the previous
    /// connection broke; its requests have the default deadline (see [`Self::live_agent`]).
    pub(super) fn agent(&mut self, op: Operation) -> Result<&mut Client<VsockStream>> {
        self.lifecycle.check(op)?;
        self.check_memory()?;
        self.calls.begin();
        self.live_agent()
    }

    /// The agent client of a live machine, whatever the lifecycle says (resume uses it before
    /// the sandbox counts as running), with the host-side bounds of a request (see
    /// [`KvmOptions::request_timeout`]) and the interrupter attached.
    ///
    /// When the previous connection broke it connects anew; if the agent does not accept within
    /// the connect timeout, a running sandbox is poisoned ([`Error::Poisoned`]).
    pub(super) fn live_agent(&mut self) -> Result<&mut Client<VsockStream>> {
        let machine = self.machine.as_ref().ok_or(Error::IllegalTransition {
            op: Operation::Exec,
            state: State::Standby,
        })?;
        *self.calls.waker.lock() = Some(machine.vsock().waker());
        if self.agent.as_ref().is_none_or(|c| c.is_broken()) {
            if let Some(old) = self.agent.take() {
                old.into_inner().abort();
            }
            match self.connect(self.opts.connect_timeout) {
                Ok(()) => {}
                Err(e @ Error::Interrupted { .. }) => return Err(e),
                Err(e) if self.lifecycle.state() == State::Running => {
                    let reason = format!("the guest agent stopped answering ({e})");
                    self.lifecycle.poison(reason.clone());
                    return Err(Error::Poisoned {
                        reason,
                        last_good: self.lifecycle.last_good().cloned(),
                    });
                }
                Err(e) => return Err(e),
            }
        }
        let silence = self.opts.request_timeout;
        let deadline = Instant::now().checked_add(silence.saturating_mul(REQUEST_CAP));
        let flag = self.calls.flag.clone();
        let client = self
            .agent
            .as_mut()
            .ok_or_else(|| Error::runtime("reach the guest agent", "no connection"))?;
        let stream = client.get_mut();
        stream.set_cancel(Some(flag));
        stream.set_read_timeout(Some(silence));
        stream.set_write_timeout(Some(silence));
        stream.set_deadline(deadline);
        Ok(client)
    }

    /// Poisons the sandbox if a page of its RAM or disk could not be read from the snapshot
    /// files (see `dormant_core::memguard`): its memory no longer matches any snapshot.
    pub(super) fn check_memory(&mut self) -> Result<()> {
        let Some(addr) = self.machine.as_ref().and_then(Machine::memory_fault) else {
            return Ok(());
        };
        let err = Error::Trap {
            message: dormant_core::memguard::GuardedMemory::fault_message(addr),
            last_good: self.lifecycle.last_good().cloned(),
        };
        self.release();
        self.lifecycle.poison(err.to_string());
        Err(err)
    }

    /// The error of a failed agent request (`op` on `path`): [`Error::Interrupted`] when the
    /// interrupter stopped it, [`Error::Deadline`] (with `limit`) when the host-side deadline
    /// passed, else the agent's error. A connection left mid-response is reset, so that the
    /// agent stops the work it did for it; the next call connects anew.
    pub(super) fn failed(
        &mut self,
        e: ClientError,
        limit: Duration,
        op: &'static str,
        path: &str,
    ) -> Error {
        let last_good = self.lifecycle.last_good().cloned();
        let stopped = match &e {
            ClientError::Io(io) if Cancelled::is_cause_of(io) => {
                Some(Error::Interrupted { last_good })
            }
            ClientError::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => {
                Some(Error::Deadline { limit, last_good })
            }
            _ => None,
        };
        if self.agent.as_ref().is_some_and(|c| c.is_broken())
            && let Some(c) = self.agent.take()
        {
            c.into_inner().abort();
        }
        // A guest that can no longer run (or whose memory faulted) explains the failure better
        // than the broken connection, and poisons the sandbox now rather than at its next call.
        if let Err(gone) = self.check_memory() {
            return gone;
        }
        if self.machine.as_ref().is_some_and(|m| !m.is_running()) {
            let why = self
                .machine
                .take()
                .and_then(|m| self.shut_down(m))
                .map_or_else(|| "the guest stopped".to_string(), |e| e.to_string());
            self.release();
            self.lifecycle.poison(why.clone());
            return Error::Trap {
                message: why,
                last_good: self.lifecycle.last_good().cloned(),
            };
        }
        stopped.unwrap_or_else(|| agent_error(op, path, e))
    }

    /// Runs `cmd` with streamed output: chunks go to `on_stdout` / `on_stderr` as they come.
    ///
    /// Bounded on every side: the agent kills the command at its timeout (`cmd.timeout`, else
    /// the spec's `call_timeout`: [`Error::Deadline`]); the host gives up [`EXEC_GRACE`] later
    /// if the agent has not reported (plus the bound of a request to send a non-empty stdin,
    /// whose transfer may not stall for longer than
    /// [`KvmOptions::request_timeout`](super::KvmOptions::request_timeout)); at most the
    /// spec's `output_limit` bytes per stream are delivered, past it the command is killed and
    /// the call fails with [`Error::OutputLimit`]; the interrupter stops it
    /// ([`Error::Interrupted`], the command killed). The sandbox stays running in each case.
    pub fn exec_streaming(
        &mut self,
        cmd: &Command,
        on_stdout: &mut dyn FnMut(&[u8]),
        on_stderr: &mut dyn FnMut(&[u8]),
    ) -> Result<i32> {
        let limit = cmd.timeout.unwrap_or(self.spec.call_timeout);
        let req = self.request_for(cmd, Some(limit))?;
        let mut bound = limit.saturating_add(EXEC_GRACE);
        if !cmd.stdin.is_empty() {
            bound = bound.saturating_add(self.opts.request_timeout.saturating_mul(REQUEST_CAP));
        }
        let output_limit = self.spec.output_limit;
        // Past the output limit, the stream is stopped through the call's cancel flag: the
        // next read fails and the connection is reset, which kills the command.
        let stop = self.calls.flag.clone();
        let over: std::cell::Cell<Option<&'static str>> = std::cell::Cell::new(None);
        let (mut out_len, mut err_len) = (0usize, 0usize);
        let capped = |stream: &'static str, len: &mut usize, d: &[u8], f: &mut dyn FnMut(&[u8])| {
            if over.get().is_some() {
                return;
            }
            if len.saturating_add(d.len()) > output_limit {
                over.set(Some(stream));
                stop.store(true, Ordering::SeqCst);
            } else {
                *len += d.len();
                f(d);
            }
        };
        let client = self.agent(Operation::Exec)?;
        let stream = client.get_mut();
        // A silent command is fine until its timeout; a guest that takes no stdin is not.
        stream.set_read_timeout(None);
        stream.set_deadline(Instant::now().checked_add(bound));
        let r = client.exec_request(
            &req,
            &cmd.stdin,
            &mut |d| capped("stdout", &mut out_len, d, on_stdout),
            &mut |d| capped("stderr", &mut err_len, d, on_stderr),
        );
        let r = r.map_err(|e| self.failed(e, limit, "exec", &cmd.argv[0]));
        if let Some(stream) = over.get() {
            return Err(Error::OutputLimit {
                stream,
                limit: output_limit,
            });
        }
        let st = r?;
        if st.timed_out {
            return Err(Error::Deadline {
                limit,
                last_good: self.lifecycle.last_good().cloned(),
            });
        }
        Ok(exit_code(st.code, st.signal))
    }

    /// The agent request that runs `cmd`: an `exec` with this `timeout`, or with `None` a
    /// `spawn`. Its environment is the spec's, then the command's.
    pub(super) fn request_for(
        &self,
        cmd: &Command,
        timeout: Option<Duration>,
    ) -> Result<dormant_agent::proto::Request> {
        use dormant_agent::proto::Request;
        let what = if timeout.is_some() { "exec" } else { "spawn" };
        match cmd.argv.first() {
            None => {
                return Err(Error::InvalidArgument(format!(
                    "{what} needs a non-empty argv"
                )));
            }
            Some(_) if cmd.shell && cmd.argv.len() != 1 => {
                return Err(Error::InvalidArgument(format!(
                    "a shell {what} takes one script, not {} arguments",
                    cmd.argv.len()
                )));
            }
            Some(_) => {}
        }
        let mut env = self.spec.env.clone();
        env.extend(cmd.env.iter().cloned());
        let (argv, cwd, shell) = (cmd.argv.clone(), cmd.cwd.clone(), cmd.shell);
        Ok(match timeout {
            Some(t) => Request::Exec {
                argv,
                env,
                cwd,
                timeout_ms: Some(u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
                shell,
            },
            None => Request::Spawn {
                argv,
                env,
                cwd,
                shell,
            },
        })
    }

    /// Refuses a files-API change under a read-only or detached volume (the guest's mount
    /// refuses it too, with `EROFS`; this names it `Error::ReadOnly` like the other tier).
    pub(super) fn check_writable(&self, path: &str) -> Result<()> {
        let g = dormant_core::paths::GuestPath::parse(path)?;
        let g = g.as_str();
        for m in self
            .spec
            .mounts
            .iter()
            .filter(|m| m.read_only || m.is_detached())
        {
            let mp = dormant_core::paths::GuestPath::parse(&m.guest)?;
            let mp = mp.as_str();
            if g == mp || g.strip_prefix(mp).is_some_and(|r| r.starts_with('/')) {
                return Err(Error::ReadOnly { path: path.into() });
            }
        }
        Ok(())
    }
}

pub(super) fn check_path(path: &str) -> Result<&str> {
    if !path.starts_with('/') || path.contains('\0') {
        return Err(Error::InvalidPath {
            path: path.into(),
            reason: "guest paths are absolute and contain no NUL",
        });
    }
    Ok(path)
}

/// Maps an agent failure to dormant's error, naming the operation and path.
pub(super) fn agent_error(op: &'static str, path: &str, e: ClientError) -> Error {
    use std::io::ErrorKind;
    match e {
        ClientError::Agent { kind, message } => {
            let k = match kind.as_str() {
                "not_found" => ErrorKind::NotFound,
                "permission" => ErrorKind::PermissionDenied,
                "invalid" | "unsupported" => ErrorKind::InvalidInput,
                _ => ErrorKind::Other,
            };
            Error::File {
                op,
                path: path.to_string(),
                source: std::io::Error::new(k, message),
            }
        }
        other => Error::runtime_at("talk to the guest agent", format!("{op} {path}"), other),
    }
}

pub(super) fn exit_code(code: Option<i32>, signal: Option<i32>) -> i32 {
    code.unwrap_or_else(|| 128 + signal.unwrap_or(0))
}
