//! Terminals in the guest ([`Terminals`]): the agent runs the program on a pseudo-terminal
//! (`pty_open`) and keeps reading its output into a backlog; an attachment is a vsock
//! connection of its own that the agent turns into a byte pipe to the terminal (`pty_attach`,
//! the way `connect_tcp` carries an exposed port).
//!
//! An attachment cannot go on in a restored guest (a snapshot does not keep it: the stream is
//! transient), and it ends when the machine goes away: [`Attachments::end_all`] runs at every
//! release (standby, kill, a resume into a new machine), raising each link's cancel flag, so
//! a reader sees the end at once and a writer fails. The program runs on in the guest, and in
//! the snapshot; attach again after the resume.
//!
//! A guest agent from before terminals (a sandbox resumed from an old snapshot keeps its old
//! agent) answers the requests `unsupported`: [`Error::Unsupported`], saying so.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use dormant_agent::client::{Client, ClientError};
use dormant_agent::proto::error_kind;
use dormant_core::lifecycle::{Operation, State};
use dormant_core::{Error, Result, TerminalLink, TerminalSize, Terminals};
use parking_lot::Mutex;

use super::{AGENT_PORT, KvmSandbox};
use crate::virtio::vsock::{VsockStream, VsockWaker};

/// The attachments open now, by id: what ends them when the machine goes away.
#[derive(Debug, Default)]
pub(super) struct Attachments {
    open: Arc<Mutex<Open>>,
}

#[derive(Default)]
struct Open {
    links: HashMap<u64, (Arc<AtomicBool>, VsockWaker)>,
    next: u64,
}

impl std::fmt::Debug for Open {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Open")
            .field("links", &self.links.len())
            .finish()
    }
}

impl Attachments {
    /// Ends every attachment now (the machine goes away).
    pub(super) fn end_all(&self) {
        let mut open = self.open.lock();
        for (_, (cancel, waker)) in open.links.drain() {
            cancel.store(true, Ordering::SeqCst);
            waker.wake();
        }
    }

    fn count(&self) -> usize {
        self.open.lock().links.len()
    }
}

/// One attachment: the vsock connection the agent pipes to the terminal.
struct Link {
    stream: VsockStream,
    cancel: Arc<AtomicBool>,
    waker: VsockWaker,
    id: u64,
    open: Arc<Mutex<Open>>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmTerminalLink")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Link {
    fn forget(&self) {
        self.open.lock().links.remove(&self.id);
    }
}

impl TerminalLink for Link {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match (&self.stream).read(buf) {
                Ok(0) => break,
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Cancelled (closed, the machine went away) or reset by the guest: ended.
                Err(_) => break,
            }
        }
        self.forget();
        Ok(0)
    }

    fn write(&self, data: &[u8]) -> io::Result<()> {
        if self.cancel.load(Ordering::SeqCst) {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the terminal attachment has ended: attach again",
            ));
        }
        (&self.stream).write_all(data)
    }

    fn close(&self) {
        // The agent sees end of file and detaches; this side stops at once.
        self.stream.shutdown_write();
        self.cancel.store(true, Ordering::SeqCst);
        self.waker.wake();
        self.forget();
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.forget();
    }
}

/// The error of a failed terminal request: an agent from before terminals, bad arguments, an
/// unknown terminal; anything else as the other agent calls.
fn terminal_error(e: ClientError, pid: Option<u32>) -> std::result::Result<Error, ClientError> {
    match &e {
        ClientError::Agent { kind, message } => Ok(match kind.as_str() {
            error_kind::UNSUPPORTED => Error::Unsupported {
                op: "a terminal",
                what: "this sandbox's guest agent, which predates terminals (the sandbox was \
                       resumed from a snapshot taken before dormant had them): create a new \
                       sandbox"
                    .into(),
            },
            error_kind::NOT_FOUND if pid.is_some() => Error::InvalidArgument(format!(
                "no terminal {} in this sandbox (its pid is the one create gave)",
                pid.unwrap_or_default()
            )),
            error_kind::INVALID => Error::InvalidArgument(message.clone()),
            _ => return Err(e),
        }),
        _ => Err(e),
    }
}

impl KvmSandbox {
    /// Maps a failed terminal request (see [`terminal_error`]), else as [`KvmSandbox::failed`].
    fn terminal_failed(&mut self, e: ClientError, op: &'static str, pid: Option<u32>) -> Error {
        match terminal_error(e, pid) {
            Ok(err) => err,
            Err(e) => {
                let what = pid.map(|p| p.to_string()).unwrap_or_default();
                self.failed(e, self.opts.request_timeout, op, &what)
            }
        }
    }
}

/// Programs on pseudo-terminals in the guest (see the module docs): the terminal's program is
/// a background process ([`KvmSandbox::wait`], [`KvmSandbox::signal`]) that checkpoints,
/// standby and resume keep; attachments end when the machine goes away.
impl Terminals for KvmSandbox {
    /// See [`Terminals::open_terminal`]. Errors also: the sandbox is not running
    /// ([`Error::IllegalTransition`]); an agent from before terminals ([`Error::Unsupported`]).
    fn open_terminal(&mut self, argv: &[String], size: TerminalSize) -> Result<u32> {
        let args: Vec<&str> = argv.iter().map(String::as_str).collect();
        let r = self
            .agent(Operation::Exec)?
            .pty_open(&args, &[], None, size.cols, size.rows);
        r.map_err(|e| self.terminal_failed(e, "open a terminal for", None))
    }

    fn resize_terminal(&mut self, pid: u32, size: TerminalSize) -> Result<()> {
        let r = self
            .agent(Operation::Exec)?
            .pty_resize(pid, size.cols, size.rows);
        r.map_err(|e| self.terminal_failed(e, "resize terminal", Some(pid)))
    }

    /// See [`Terminals::attach_terminal`]: a vsock connection of its own, which the link
    /// reads and writes without this sandbox (no call waits for it, nor it for a call).
    fn attach_terminal(&mut self, pid: u32) -> Result<Arc<dyn TerminalLink>> {
        self.lifecycle.check(Operation::Exec)?;
        self.check_memory()?;
        let host = self
            .machine
            .as_ref()
            .ok_or(Error::IllegalTransition {
                op: Operation::Exec,
                state: State::Standby,
            })?
            .vsock();
        let cancel = Arc::new(AtomicBool::new(false));
        let mut stream = host
            .connect_with(AGENT_PORT, self.opts.connect_timeout, Some(&cancel))
            .map_err(|e| Error::runtime("attach to a terminal", e))?;
        // A snapshot does not keep it: a restored guest sees it reset.
        stream.set_transient();
        stream.set_cancel(Some(cancel.clone()));
        stream.set_deadline(Instant::now().checked_add(self.opts.request_timeout));
        let r = Client::new(stream).pty_attach(pid);
        let mut stream = r.map_err(|e| self.terminal_failed(e, "attach to terminal", Some(pid)))?;
        stream.set_deadline(None);
        let open = self.terminals.open.clone();
        let id = {
            let mut o = open.lock();
            let id = o.next;
            o.next += 1;
            o.links.insert(id, (cancel.clone(), host.waker()));
            id
        };
        Ok(Arc::new(Link {
            stream,
            cancel,
            waker: host.waker(),
            id,
            open,
        }))
    }

    fn attached_terminals(&self) -> usize {
        self.terminals.count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(kind: &str) -> ClientError {
        ClientError::Agent {
            kind: kind.into(),
            message: format!("the agent said {kind}"),
        }
    }

    #[test]
    fn an_agent_from_before_terminals_is_unsupported_and_says_what_to_do() {
        match terminal_error(agent("unsupported"), None) {
            Ok(Error::Unsupported { op, what }) => {
                assert_eq!(op, "a terminal");
                assert!(what.contains("create a new sandbox"), "{what}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_arguments_and_unknown_terminals_are_invalid_arguments() {
        match terminal_error(agent("invalid"), None) {
            Ok(Error::InvalidArgument(m)) => assert_eq!(m, "the agent said invalid"),
            other => panic!("{other:?}"),
        }
        match terminal_error(agent("not_found"), Some(42)) {
            Ok(Error::InvalidArgument(m)) => assert!(m.contains("no terminal 42"), "{m}"),
            other => panic!("{other:?}"),
        }
        // A program that is not there stays the agent's error, as for other commands.
        assert!(terminal_error(agent("not_found"), None).is_err());
        assert!(terminal_error(agent("io"), Some(1)).is_err());
    }
}
