//! Exposed ports: host TCP listeners whose connections reach a TCP port on the guest's
//! loopback, carried over virtio-vsock.
//!
//! A sandbox's [`Forwarder`] holds, per exposed guest port, a listener on the host's
//! `127.0.0.1` with an accept thread. Each accepted connection gets a thread of its own that
//! opens a *new* vsock connection to the guest agent, asks it to `connect_tcp` to the guest
//! port, and from then on splices the two both ways (a second thread for the host → guest
//! direction): at most [`CHUNK`] bytes at a time per direction with blocking writes, so a
//! slow reader on either side holds back the sender (back-pressure, bounded memory); an end of
//! file one way is passed on as a half-close; an error either way ends both.
//!
//! The forwarder reaches the guest through the *current* machine's vsock device, which the
//! sandbox attaches after every resume and detaches when the machine goes away (standby,
//! kill, a resume into another machine). Detaching closes every forwarded connection at once
//! (the host side sees end of file or a reset, never a hang; the guest side sees its vsock
//! connection reset). Without wake hooks it also closes the listeners (the sandbox opens them
//! again at the next resume); with hooks ([`Ports::set_wake`](dormant_core::Ports::set_wake))
//! the listeners stay open while the sandbox sleeps, and a connection that arrives then calls
//! [`PortWake::wake`] from its own thread, holding no lock of the forwarder, before it is
//! served.
//!
//! Bounds: at most [`MAX_EXPOSED_PORTS`] listeners and [`MAX_FORWARDED_CONNECTIONS`]
//! connections at once per sandbox (one over the cap is accepted and closed at once), two
//! threads and two [`CHUNK`] buffers per connection.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dormant_agent::client::Client;
use dormant_core::{Error, PortMapping, PortWake, Result};
use parking_lot::Mutex;

use super::AGENT_PORT;
use crate::virtio::vsock::{VsockHost, VsockStream, VsockWaker};

/// Most guest ports a sandbox exposes at once.
pub const MAX_EXPOSED_PORTS: usize = 64;
/// Most forwarded connections open at once per sandbox; more are closed as they arrive.
pub const MAX_FORWARDED_CONNECTIONS: usize = 256;
/// Bytes each direction of a forwarded connection moves at a time (its whole buffer).
pub const CHUNK: usize = 64 << 10;
/// Longest a forwarded connection may take to reach the guest port (the vsock connection to
/// the agent, and the agent's connection inside the guest).
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Stack of the forwarding threads (their buffers are on the heap).
const THREAD_STACK: usize = 256 << 10;

/// A sandbox's exposed ports (see the module docs). Dropping it closes everything.
pub(super) struct Forwarder {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The vsock device of the machine running now; `None` while there is none.
    host: Option<VsockHost>,
    wake: Option<Arc<dyn PortWake>>,
    listeners: BTreeMap<u16, Listener>,
    conns: HashMap<u64, Open>,
    next_conn: u64,
}

struct Listener {
    host_port: u16,
    socket: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
}

impl Listener {
    /// Stops the accept thread and frees the port now: shutting down a listening socket ends
    /// its listening state (so the port can be bound again) and wakes the blocked `accept`.
    fn close(&self) {
        self.stop.store(true, Ordering::SeqCst);
        // Failing (already shut down) leaves nothing to do.
        let _ = rustix::net::shutdown(&*self.socket, rustix::net::Shutdown::Both);
    }
}

/// One forwarded connection, as seen by whoever must end it.
struct Open {
    guest_port: u16,
    /// It reaches the guest through the machine attached when it started (a connection still
    /// waiting for the sandbox to wake is not bound to any, and a detach leaves it alone).
    bound: bool,
    /// A handle of the host-side socket, to shut it down from outside.
    tcp: TcpStream,
    /// Raised to stop the connection's vsock stream (then `waker` woken).
    cancel: Arc<AtomicBool>,
    waker: Option<VsockWaker>,
}

impl Open {
    fn close(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        let _ = self.tcp.shutdown(Shutdown::Both);
        if let Some(w) = &self.waker {
            w.wake();
        }
    }
}

impl Forwarder {
    pub(super) fn new() -> Forwarder {
        Forwarder {
            shared: Arc::default(),
        }
    }

    /// Listens on `127.0.0.1:host_port` (`0`: a free port) for guest port `guest_port`, unless
    /// it is exposed already; returns the host port.
    pub(super) fn listen(&self, guest_port: u16, host_port: u16) -> Result<u16> {
        if guest_port == 0 {
            return Err(Error::InvalidArgument(
                "guest port 0: expose a TCP port from 1 to 65535".into(),
            ));
        }
        let mut st = self.shared.state.lock();
        if let Some(l) = st.listeners.get(&guest_port) {
            if host_port == 0 || host_port == l.host_port {
                return Ok(l.host_port);
            }
            return Err(Error::InvalidArgument(format!(
                "guest port {guest_port} is exposed on host port {} already: unexpose it \
                 first to move it to {host_port}",
                l.host_port
            )));
        }
        if st.listeners.len() >= MAX_EXPOSED_PORTS {
            return Err(Error::InvalidArgument(format!(
                "{MAX_EXPOSED_PORTS} ports are exposed already, the most a sandbox has: \
                 unexpose one first"
            )));
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], host_port));
        let socket = TcpListener::bind(addr).map_err(|e| {
            Error::runtime_at("expose a guest port", format!("listen on {addr}"), e)
        })?;
        let bound = socket
            .local_addr()
            .map_err(|e| Error::runtime("expose a guest port", e))?
            .port();
        let socket = Arc::new(socket);
        let stop = Arc::new(AtomicBool::new(false));
        let (fwd, sock, flag) = (self.shared.clone(), socket.clone(), stop.clone());
        std::thread::Builder::new()
            .name(format!("expose-{guest_port}"))
            .stack_size(THREAD_STACK)
            .spawn(move || accept_loop(&fwd, guest_port, &sock, &flag))
            .map_err(|e| Error::runtime("start a port's accept thread", e))?;
        st.listeners.insert(
            guest_port,
            Listener {
                host_port: bound,
                socket,
                stop,
            },
        );
        Ok(bound)
    }

    /// Stops exposing `guest_port`: its listener closes and its connections end.
    pub(super) fn close(&self, guest_port: u16) {
        let mut st = self.shared.state.lock();
        if let Some(l) = st.listeners.remove(&guest_port) {
            l.close();
        }
        for c in st.conns.values().filter(|c| c.guest_port == guest_port) {
            c.close();
        }
    }

    /// The exposed ports, by guest port.
    pub(super) fn mappings(&self) -> Vec<PortMapping> {
        let st = self.shared.state.lock();
        st.listeners
            .iter()
            .map(|(&guest_port, l)| PortMapping {
                guest_port,
                host_port: l.host_port,
            })
            .collect()
    }

    /// The host port guest port `guest_port` listens on, if it does.
    pub(super) fn host_port(&self, guest_port: u16) -> Option<u16> {
        let st = self.shared.state.lock();
        st.listeners.get(&guest_port).map(|l| l.host_port)
    }

    pub(super) fn set_wake(&self, wake: Option<Arc<dyn PortWake>>) {
        self.shared.state.lock().wake = wake;
    }

    pub(super) fn open_connections(&self) -> usize {
        self.shared.state.lock().conns.len()
    }

    /// The machine that runs now: new connections reach the guest through `host`.
    pub(super) fn attach(&self, host: VsockHost) {
        self.shared.state.lock().host = Some(host);
    }

    /// The machine goes away: every connection forwarded through it ends now, and without
    /// wake hooks every listener closes too (the sandbox opens them again when it runs).
    /// Connections waiting for a wake are left to it.
    pub(super) fn detach(&self) {
        let mut st = self.shared.state.lock();
        st.host = None;
        for c in st.conns.values().filter(|c| c.bound) {
            c.close();
        }
        if st.wake.is_none() {
            for (_, l) in std::mem::take(&mut st.listeners) {
                l.close();
            }
        }
    }

    /// Closes every listener and connection (kill; the sandbox handle dropped).
    pub(super) fn close_all(&self) {
        let mut st = self.shared.state.lock();
        st.host = None;
        st.wake = None;
        for c in st.conns.values() {
            c.close();
        }
        for (_, l) in std::mem::take(&mut st.listeners) {
            l.close();
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.close_all();
    }
}

/// A listener's accept thread: until the listener is closed, each connection gets a thread
/// that forwards it.
fn accept_loop(fwd: &Arc<Shared>, guest_port: u16, socket: &TcpListener, stop: &AtomicBool) {
    loop {
        let accepted = socket.accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        match accepted {
            Ok((tcp, _)) => start(fwd, guest_port, tcp),
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => return,
            // Out of descriptors, a connection reset before it was accepted: go on shortly.
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Registers an accepted connection (or closes it, over the cap) and starts its thread.
fn start(fwd: &Arc<Shared>, guest_port: u16, tcp: TcpStream) {
    let cancel = Arc::new(AtomicBool::new(false));
    let (id, hooks) = {
        let mut st = fwd.state.lock();
        if st.conns.len() >= MAX_FORWARDED_CONNECTIONS {
            // Dropped: closed at once.
            return;
        }
        let Ok(handle) = tcp.try_clone() else {
            return;
        };
        let id = st.next_conn;
        st.next_conn += 1;
        st.conns.insert(
            id,
            Open {
                guest_port,
                bound: false,
                tcp: handle,
                cancel: cancel.clone(),
                waker: None,
            },
        );
        (id, st.wake.clone())
    };
    if let Some(h) = &hooks {
        h.activity();
    }
    let shared = fwd.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("forward-{guest_port}"))
        .stack_size(THREAD_STACK)
        .spawn(move || {
            forward(&shared, id, guest_port, tcp, &cancel);
            let hooks = {
                let mut st = shared.state.lock();
                st.conns.remove(&id);
                st.wake.clone()
            };
            if let Some(h) = hooks {
                h.activity();
            }
        });
    if spawned.is_err() {
        fwd.state.lock().conns.remove(&id);
    }
}

/// The vsock device connection `id` reaches the guest through: the running machine's, else
/// (with wake hooks) the one the sandbox runs on once woken; the connection is bound to it.
/// `None`: the connection is refused (no machine, or it was closed meanwhile).
fn machine(fwd: &Shared, id: u64) -> Option<VsockHost> {
    let bind = |st: &mut State| -> Option<VsockHost> {
        let host = st.host.clone()?;
        st.conns.get_mut(&id)?.bound = true;
        Some(host)
    };
    let hooks = {
        let mut st = fwd.state.lock();
        if st.host.is_some() {
            return bind(&mut st);
        }
        st.wake.clone()
    };
    // No lock held: waking resumes the sandbox, which attaches its new machine here.
    hooks?.wake().ok()?;
    bind(&mut fwd.state.lock())
}

/// Serves one accepted connection to its end.
fn forward(fwd: &Shared, id: u64, guest_port: u16, tcp: TcpStream, cancel: &Arc<AtomicBool>) {
    let _ = tcp.set_nodelay(true);
    let Some(host) = machine(fwd, id) else {
        return;
    };
    let Ok(mut stream) = host.connect_with(AGENT_PORT, SETUP_TIMEOUT, Some(cancel)) else {
        return;
    };
    // A forwarded connection cannot go on in a restored guest: a snapshot does not keep it.
    stream.set_transient();
    stream.set_cancel(Some(cancel.clone()));
    {
        let mut st = fwd.state.lock();
        match st.conns.get_mut(&id) {
            Some(c) => c.waker = Some(host.waker()),
            None => return,
        }
    }
    stream.set_deadline(Some(Instant::now() + SETUP_TIMEOUT));
    let Ok(mut stream) = Client::new(stream).connect_tcp(guest_port) else {
        // Nothing listens on the guest port (or the guest went away): closed at once.
        return;
    };
    stream.set_deadline(None);
    if splice(&stream, &tcp, cancel, &host.waker()) {
        drop(stream);
    } else {
        stream.abort();
    }
}

/// Splices `tcp` and `stream` both ways until both directions end (`true`) or one fails
/// (`false`). A read error stops both directions at once; a write error stops only its own:
/// the socket it could not write to is broken, so the other direction reads what that socket
/// still holds (an answer the guest's server wrote before it closed with the upload unread),
/// passes it on, then gets the error or the end and finishes.
fn splice(stream: &VsockStream, tcp: &TcpStream, cancel: &AtomicBool, waker: &VsockWaker) -> bool {
    let stop = || {
        cancel.store(true, Ordering::SeqCst);
        waker.wake();
        let _ = tcp.shutdown(Shutdown::Both);
    };
    std::thread::scope(|s| {
        // Host → guest on a thread of its own.
        let up = std::thread::Builder::new()
            .name("forward-up".into())
            .stack_size(THREAD_STACK)
            .spawn_scoped(s, || {
                let ended = pump(tcp, stream, || stream.shutdown_write());
                if ended == Ended::ReadFailed {
                    stop();
                }
                ended == Ended::Eof
            });
        let Ok(up) = up else {
            stop();
            return false;
        };
        let down = pump(stream, tcp, || {
            let _ = tcp.shutdown(Shutdown::Write);
        });
        if down == Ended::ReadFailed {
            stop();
        }
        let up = up.join().unwrap_or(false);
        up && down == Ended::Eof
    })
}

/// How one direction of a spliced connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// End of file from the source (passed on with `eof`).
    Eof,
    /// The source failed (a reset, a cancel).
    ReadFailed,
    /// The destination refused bytes (it is broken).
    WriteFailed,
}

/// Moves bytes from `from` to `to` until end of file (then `eof`) or an error.
fn pump<R, W>(mut from: R, mut to: W, eof: impl FnOnce()) -> Ended
where
    R: Read,
    W: Write,
{
    let mut buf = vec![0u8; CHUNK];
    loop {
        match from.read(&mut buf) {
            Ok(0) => {
                eof();
                return Ended::Eof;
            }
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return Ended::WriteFailed;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Ended::ReadFailed,
        }
    }
}
