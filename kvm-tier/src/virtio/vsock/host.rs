//! The host's side of the connections: [`VsockHost`] opens (or adopts) a connection to a guest
//! port, [`VsockStream`] is its blocking `Read + Write` byte stream with timeouts, a deadline
//! and a cancel flag, [`VsockWaker`] wakes waiting streams from another thread.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::connection::{Conn, ConnState, Control, HOST_BUF, OUT_MAX};
use parking_lot::MutexGuard;

use super::muxer::{FIRST_LOCAL_PORT, Inner, Shared};
use super::packet::{OP_CREDIT_UPDATE, OP_REQUEST, OP_RST};

/// The host's handle for opening connections.
#[derive(Clone)]
pub struct VsockHost {
    pub(super) shared: Arc<Shared>,
}

impl std::fmt::Debug for VsockHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockHost").finish_non_exhaustive()
    }
}

impl VsockHost {
    /// Takes back an idle connection to guest port `port` restored from a snapshot, if there is
    /// one: the guest's end never noticed the checkpoint.
    pub fn adopt(&self, port: u32) -> Option<VsockStream> {
        let mut g = self.shared.inner.lock();
        let (&local, c) = g
            .conns
            .iter_mut()
            .find(|(_, c)| c.adoptable && c.peer_port == port)?;
        c.adoptable = false;
        Some(VsockStream::new(self.shared.clone(), local))
    }

    /// Resets the restored connections nobody adopted.
    pub fn reset_unadopted(&self) {
        let mut g = self.shared.inner.lock();
        let orphans: Vec<(u32, u32)> = g
            .conns
            .iter()
            .filter(|(_, c)| c.adoptable)
            .map(|(&l, c)| (l, c.peer_port))
            .collect();
        for (local, peer) in orphans {
            g.conns.remove(&local);
            g.control.push_back(Control {
                local,
                peer,
                op: OP_RST,
                flags: 0,
            });
        }
        drop(g);
        let _ = self.shared.wake.write(1);
    }

    /// Opens a connection to guest port `port`, waiting up to `timeout` for the guest to accept.
    pub fn connect(&self, port: u32, timeout: Duration) -> std::io::Result<VsockStream> {
        self.connect_with(port, timeout, None)
    }

    /// [`VsockHost::connect`] that also gives up, with a [`Cancelled`] error, once `cancel` is
    /// raised (and the device's waiters woken with [`VsockWaker::wake`]).
    pub fn connect_with(
        &self,
        port: u32,
        timeout: Duration,
        cancel: Option<&AtomicBool>,
    ) -> std::io::Result<VsockStream> {
        let deadline = Instant::now() + timeout;
        let mut g = self.shared.inner.lock();
        if g.stopped {
            return Err(std::io::ErrorKind::NotConnected.into());
        }
        let local = g.next_port;
        g.next_port = g.next_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
        g.conns.insert(local, Conn::connecting(port));
        g.control.push_back(Control {
            local,
            peer: port,
            op: OP_REQUEST,
            flags: 0,
        });
        let _ = self.shared.wake.write(1);
        loop {
            match g.conns.get(&local).map(|c| c.state) {
                Some(ConnState::Connected) => {
                    return Ok(VsockStream::new(self.shared.clone(), local));
                }
                Some(ConnState::Connecting) => {}
                _ => {
                    g.conns.remove(&local);
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionRefused,
                        format!("the guest refused a connection to vsock port {port}"),
                    ));
                }
            }
            if cancel.is_some_and(|c| c.load(Ordering::SeqCst)) {
                // Forget it; a late answer is reset as unknown.
                g.conns.remove(&local);
                return Err(cancelled());
            }
            if g.stopped || self.shared.cv.wait_until(&mut g, deadline).timed_out() {
                // Forget it; a late answer is reset as unknown.
                g.conns.remove(&local);
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the guest did not accept a connection to vsock port {port} in {timeout:?}"
                    ),
                ));
            }
        }
    }

    /// A handle that wakes this device's waiting streams from any thread (see
    /// [`VsockStream::set_cancel`]). It does not keep the device alive.
    pub fn waker(&self) -> VsockWaker {
        VsockWaker(Arc::downgrade(&self.shared))
    }
}

/// Wakes the blocked waits of one device's streams (and of `connect_with`), so that they look
/// at their cancel flags again. Usable from any thread; a no-op once the device is gone.
#[derive(Clone)]
pub struct VsockWaker(Weak<Shared>);

impl std::fmt::Debug for VsockWaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockWaker").finish_non_exhaustive()
    }
}

impl VsockWaker {
    /// Wakes every waiter of the device.
    pub fn wake(&self) {
        if let Some(shared) = self.0.upgrade() {
            // Taking the lock orders this wake after any waiter's look at its flag: a waiter
            // either sees the raised flag or is already waiting and gets the notification.
            drop(shared.inner.lock());
            shared.cv.notify_all();
        }
    }
}

/// The error of a stream call (or `connect_with`) stopped by its raised cancel flag: the call
/// was interrupted on request. Carried inside an `io::Error` of kind `ConnectionAborted`
/// (not `Interrupted`, which `read_exact` and `write_all` would retry); see
/// [`Cancelled::is_cause_of`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the call was interrupted")]
pub struct Cancelled;

impl Cancelled {
    /// Whether `e` is a stream failure caused by a raised cancel flag.
    pub fn is_cause_of(e: &std::io::Error) -> bool {
        e.get_ref().is_some_and(|inner| inner.is::<Cancelled>())
    }
}

fn cancelled() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionAborted, Cancelled)
}

fn timed_out() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "no answer from the guest in time",
    )
}

/// A host-side stream connection to a guest port.
pub struct VsockStream {
    shared: Arc<Shared>,
    local: u32,
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
    /// Reads and writes fail with `TimedOut` from then on.
    deadline: Option<Instant>,
    /// Once raised, reads and writes fail with [`Cancelled`].
    cancel: Option<Arc<AtomicBool>>,
}

impl std::fmt::Debug for VsockStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockStream")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl VsockStream {
    fn new(shared: Arc<Shared>, local: u32) -> VsockStream {
        VsockStream {
            shared,
            local,
            read_timeout: None,
            write_timeout: None,
            deadline: None,
            cancel: None,
        }
    }

    /// Reads fail with `TimedOut` after waiting this long (`None`: wait forever).
    pub fn set_read_timeout(&mut self, t: Option<Duration>) {
        self.read_timeout = t;
    }

    /// Writes fail with `TimedOut` after waiting this long for room (the guest grants credit
    /// as it reads; `None`: wait forever).
    pub fn set_write_timeout(&mut self, t: Option<Duration>) {
        self.write_timeout = t;
    }

    /// From `deadline` on, reads *and* writes fail with `TimedOut`, whether they would wait
    /// (for guest data, for guest credit) or not (`None`: no deadline). A guest that keeps
    /// sending cannot stretch a call past it either.
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }

    /// A flag that stops this stream from another thread: once it is raised (then the
    /// device's waiters woken with [`VsockWaker::wake`]), every read and write fails with
    /// [`Cancelled`] until it is lowered again.
    pub fn set_cancel(&mut self, flag: Option<Arc<AtomicBool>>) {
        self.cancel = flag;
    }

    /// Resets the connection now, dropping what is buffered either way: for a call abandoned
    /// midway (the guest's end sees a reset, and the agent stops the work it did for it).
    /// Unlike a plain drop, it does not wait for the guest to take buffered bytes.
    pub fn abort(self) {
        let mut g = self.shared.inner.lock();
        if let Some(c) = g.conns.remove(&self.local)
            && c.state != ConnState::Reset
        {
            g.control.push_back(Control {
                local: self.local,
                peer: c.peer_port,
                op: OP_RST,
                flags: 0,
            });
        }
        drop(g);
        // `Drop` finds the connection gone and only wakes the worker.
    }

    /// Shuts down the writing half: once the bytes written so far are out, the guest's reads
    /// see end of file, while its writes still reach this stream's reads. Later writes fail
    /// with `BrokenPipe`.
    pub fn shutdown_write(&self) {
        let mut g = self.shared.inner.lock();
        if let Some(c) = g.conns.get_mut(&self.local) {
            c.host_write_done = true;
        }
        drop(g);
        let _ = self.shared.wake.write(1);
    }

    /// Marks the connection as one a snapshot does not keep: a checkpoint taken while it is
    /// open records it as open, so the restored guest sees it reset (and
    /// [`VsockHost::adopt`] never hands it out). For connections that carry something the
    /// host cannot take back after a restore, such as a forwarded TCP connection.
    pub fn set_transient(&self) {
        if let Some(c) = self.shared.inner.lock().conns.get_mut(&self.local) {
            c.transient = true;
        }
    }

    /// Fails when the call must stop: cancelled, or past its deadline.
    fn check(&self) -> std::io::Result<()> {
        if self
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::SeqCst))
        {
            return Err(cancelled());
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(timed_out());
        }
        Ok(())
    }

    /// Waits for the device's next change, at most until the earlier of `until` and the
    /// stream's deadline: `Err(TimedOut)` when that passed.
    fn wait(&self, g: &mut MutexGuard<'_, Inner>, until: Option<Instant>) -> std::io::Result<()> {
        let until = match (until, self.deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match until {
            Some(d) => {
                if self.shared.cv.wait_until(g, d).timed_out() {
                    return Err(timed_out());
                }
            }
            None => self.shared.cv.wait(g),
        }
        Ok(())
    }
}

fn gone() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "the guest closed the vsock connection",
    )
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (&*self).write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Reading through a shared reference, as `&TcpStream` does: one thread may read while another
/// writes (a forwarded port splices both ways at once). Timeouts, deadline and cancel flag are
/// the stream's.
impl Read for &VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let until = self.read_timeout.map(|t| Instant::now() + t);
        let mut g = self.shared.inner.lock();
        loop {
            self.check()?;
            let Some(c) = g.conns.get_mut(&self.local) else {
                return Err(gone());
            };
            if !c.inbound.is_empty() {
                let n = buf.len().min(c.inbound.len());
                for (dst, src) in buf.iter_mut().zip(c.inbound.drain(..n)) {
                    *dst = src;
                }
                c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                if c.fwd_cnt.wrapping_sub(c.credit_sent) >= HOST_BUF / 2 {
                    let peer = c.peer_port;
                    g.control.push_back(Control {
                        local: self.local,
                        peer,
                        op: OP_CREDIT_UPDATE,
                        flags: 0,
                    });
                    let _ = self.shared.wake.write(1);
                }
                return Ok(n);
            }
            if c.peer_done {
                return Ok(0);
            }
            if c.state == ConnState::Reset || g.stopped {
                return Err(gone());
            }
            self.wait(&mut g, until)?;
        }
    }
}

/// Writing through a shared reference (see `Read for &VsockStream`).
impl Write for &VsockStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let until = self.write_timeout.map(|t| Instant::now() + t);
        let mut g = self.shared.inner.lock();
        loop {
            self.check()?;
            let stopped = g.stopped;
            let Some(c) = g.conns.get_mut(&self.local) else {
                return Err(gone());
            };
            if c.state == ConnState::Reset || stopped {
                return Err(gone());
            }
            if c.host_write_done {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::BrokenPipe,
                    "the vsock connection's writing half is shut down",
                ));
            }
            let room = OUT_MAX.saturating_sub(c.outbound.len());
            if room > 0 {
                let n = room.min(buf.len());
                c.outbound.extend(&buf[..n]);
                let _ = self.shared.wake.write(1);
                return Ok(n);
            }
            // Full: wait for the guest to take bytes (it grants credit as it reads).
            let _ = self.shared.wake.write(1);
            self.wait(&mut g, until)?;
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for VsockStream {
    fn drop(&mut self) {
        let mut g = self.shared.inner.lock();
        let local = self.local;
        let remove = match g.conns.get_mut(&local) {
            Some(c) => {
                c.host_closed = true;
                if c.state == ConnState::Reset {
                    true
                } else if c.peer_done && c.outbound.is_empty() {
                    let peer = c.peer_port;
                    g.control.push_back(Control {
                        local,
                        peer,
                        op: OP_RST,
                        flags: 0,
                    });
                    true
                } else {
                    false
                }
            }
            None => false,
        };
        if remove {
            g.conns.remove(&local);
        }
        let _ = self.shared.wake.write(1);
    }
}
