//! The NAT stack: one thread per sandbox driving a `smoltcp` interface over the network
//! device's frame queues ([`Frames`]), relaying the guest's TCP connections to host sockets and
//! its DNS queries to [`EgressState::answer_dns`].
//!
//! The interface owns the gateway ([`GATEWAY_ADDR`]) and the DNS server ([`DNS_ADDR`]) and
//! accepts packets to any other address too (smoltcp's "any IP" mode, with a default route
//! through the gateway), so it terminates every TCP connection the guest opens:
//!
//! 1. A guest SYN to a destination with no connection yet is looked at before the stack sees it:
//!    [`EgressState::tcp_target`] says where it goes on the host. Refused (or
//!    [`MAX_CONNECTIONS`] reached): the SYN goes to the stack with no socket for it, which
//!    answers with a reset at once (the guest's `connect` fails with "connection refused").
//!    Allowed: the SYN is held while a non-blocking host socket connects to the target; once
//!    connected, a smoltcp socket listening on exactly that destination is made and the SYN
//!    released to it, so the guest's handshake completes only when the host's did. A host
//!    connection that fails (or takes longer than [`CONNECT_TIMEOUT`]) releases the SYN
//!    with no socket: a reset.
//! 2. Established connections are relayed both ways through the smoltcp socket's buffers
//!    ([`CONN_BUFFER`] each way): host bytes are read only into free room of the socket's
//!    send buffer, guest bytes leave its receive buffer only as the host socket takes them, so
//!    a slow side slows the other (TCP windows), never grows a buffer. A FIN either way is
//!    passed on as a half close. A reset from the guest resets the host socket. A failed host
//!    socket (a server that closed with the upload unread resets it) resets the guest's side
//!    only once the guest has acknowledged what the host sent before the failure: an answer
//!    written before the close is not lost.
//! 3. UDP: datagrams to [`DNS_ADDR`]`:53` are DNS queries, answered by the egress state
//!    ([`EgressState::dns_plan`] at once; a name the host must resolve is resolved on a thread
//!    of its own, at most [`MAX_DNS_IN_FLIGHT`] at once, more are dropped, then
//!    [`EgressState::dns_finish`]); any other datagram gets an ICMP port
//!    unreachable from the stack at once. ICMP to addresses other than the gateway and the DNS
//!    server is dropped (so a ping elsewhere does not seem to work).
//!
//! The thread sleeps in `poll(2)` on its wake eventfd (frames from the guest, room freed for
//! frames to it, a policy change, a DNS answer, stop) and the host sockets it waits on, with
//! the stack's own timer (`poll_delay`: retransmits, delayed ACKs) as the timeout.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dormant_core::NetworkPolicy;
use parking_lot::Mutex;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, HardwareAddress, IpAddress, IpCidr,
    IpEndpoint, IpListenEndpoint, IpProtocol, Ipv4Packet, TcpPacket,
};
use vmm_sys_util::eventfd::EventFd;

use super::egress::{DnsLookup, DnsPlan, HostAnswer};
use super::{
    CONN_BUFFER, DNS_ADDR, EgressState, FRAME_QUEUE, Frames, GATEWAY_ADDR, GATEWAY_MAC,
    GUEST_ADDR, GUEST_MAC, GUEST_PREFIX, MAX_CONNECTIONS, MAX_DNS_IN_FLIGHT, MAX_FRAME,
};

/// How long a guest connection waits for its host connection before it is reset.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Seconds a connection with unacknowledged data waits for the guest before it is reset.
const IDLE_PEER_TIMEOUT: u64 = 120;
/// The longest DNS datagram taken from or sent to the guest (one unfragmented datagram).
const MAX_DNS: usize = 1472;
/// The longest the thread sleeps without a reason (the stack's own timers are shorter).
const MAX_SLEEP: Duration = Duration::from_secs(1);

/// What the stack and its handles share.
#[derive(Debug)]
struct Shared {
    egress: Mutex<EgressState>,
    /// Bumped by every policy change; the thread re-checks its connections when it moved.
    policy_gen: AtomicU64,
    wake: EventFd,
    stop: AtomicBool,
    open: AtomicUsize,
    refused: AtomicU64,
    accepted: AtomicU64,
    dns_dropped: AtomicU64,
}

/// Counters of one sandbox's NAT, since its machine started (or was restored).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// TCP connections open now (relayed, or waiting for their host connection).
    pub open: usize,
    /// Guest TCP connections refused (by the policy, the connection cap, or a failed host
    /// connection).
    pub refused: u64,
    /// Guest TCP connections relayed to a host socket.
    pub accepted: u64,
    /// DNS queries dropped (too many in flight, or not answerable).
    pub dns_dropped: u64,
}

/// A handle to a sandbox's NAT: its policy and counters. Cheap to clone.
#[derive(Clone)]
pub struct NetHandle(Arc<Shared>);

impl std::fmt::Debug for NetHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetHandle").finish_non_exhaustive()
    }
}

impl NetHandle {
    /// Replaces the egress policy: new connections follow it at once, and open connections
    /// it no longer allows are reset (both sides) by the stack's thread right after.
    pub fn set_policy(&self, policy: NetworkPolicy) {
        self.0.egress.lock().set_policy(policy);
        self.0.policy_gen.fetch_add(1, Ordering::SeqCst);
        let _ = self.0.wake.write(1);
    }

    /// The policy in force.
    pub fn policy(&self) -> NetworkPolicy {
        self.0.egress.lock().policy().clone()
    }

    /// The NAT's counters.
    pub fn stats(&self) -> NetStats {
        NetStats {
            open: self.0.open.load(Ordering::Relaxed),
            refused: self.0.refused.load(Ordering::Relaxed),
            accepted: self.0.accepted.load(Ordering::Relaxed),
            dns_dropped: self.0.dns_dropped.load(Ordering::Relaxed),
        }
    }
}

/// The NAT stack's thread; dropping it stops the thread and closes every host socket.
pub struct Nat {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Nat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nat").finish_non_exhaustive()
    }
}

impl Nat {
    /// Starts the stack over `frames`: `wake` is signalled by the device when it moved frames,
    /// `device_wake` wakes the device when frames for the guest are queued (or room freed).
    /// The policy is off until [`NetHandle::set_policy`].
    ///
    /// Errors: the thread could not be started.
    pub fn start(
        frames: Arc<Mutex<Frames>>,
        wake: EventFd,
        device_wake: EventFd,
    ) -> std::io::Result<Nat> {
        let shared = Arc::new(Shared {
            egress: Mutex::new(EgressState::new(NetworkPolicy::off())),
            policy_gen: AtomicU64::new(0),
            wake,
            stop: AtomicBool::new(false),
            open: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            dns_dropped: AtomicU64::new(0),
        });
        let stack = Stack::new(shared.clone(), frames, device_wake);
        let thread = std::thread::Builder::new()
            .name("dormant-nat".into())
            .spawn(move || stack.run())?;
        Ok(Nat {
            shared,
            thread: Some(thread),
        })
    }

    /// A handle to the stack's policy and counters.
    pub fn handle(&self) -> NetHandle {
        NetHandle(self.shared.clone())
    }
}

impl Drop for Nat {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = self.shared.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The stack's view of the device: frames from the guest taken into `inbound` (in order,
/// SYNs held back meanwhile), frames to the guest pushed straight into the shared queue.
struct Phy {
    inbound: VecDeque<Vec<u8>>,
    frames: Arc<Mutex<Frames>>,
    /// Frames queued for the guest since the device was last woken.
    sent: bool,
}

struct RxToken(Vec<u8>);

struct TxToken<'a> {
    frames: &'a Mutex<Frames>,
    sent: &'a mut bool,
}

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        // `len` is at most the MTU the stack was given (MAX_FRAME).
        let mut frame = vec![0u8; len.min(MAX_FRAME)];
        let r = f(&mut frame);
        let mut q = self.frames.lock();
        // A reply token (an ARP answer, a reset) may find the queue full: dropped, as a
        // link would.
        if q.to_guest.len() < FRAME_QUEUE {
            q.to_guest.push_back(frame);
            *self.sent = true;
        }
        r
    }
}

impl phy::Device for Phy {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(
        &mut self,
        _: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let frame = self.inbound.pop_front()?;
        Some((
            RxToken(frame),
            TxToken {
                frames: &self.frames,
                sent: &mut self.sent,
            },
        ))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        if self.frames.lock().to_guest.len() >= FRAME_QUEUE {
            return None;
        }
        Some(TxToken {
            frames: &self.frames,
            sent: &mut self.sent,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        caps
    }
}

/// A guest TCP connection: (guest address, guest port, destination address, port).
type Tuple = (Ipv4Addr, u16, Ipv4Addr, u16);

/// A guest SYN held while its host connection is made.
struct Pending {
    syn: Vec<u8>,
    host: socket2::Socket,
    since: Instant,
}

/// A relayed connection.
struct Conn {
    tuple: Tuple,
    host: TcpStream,
    /// The host may have bytes to read (its last poll said so, and no read would block since).
    readable: bool,
    /// The host sent its FIN (or failed): nothing more to read.
    host_eof: bool,
    /// The guest's FIN was passed on (host write side shut).
    guest_eof: bool,
    /// The host connection failed (a write or read error, e.g. the server closed with the
    /// upload unread and its kernel reset): what the guest sends is dropped, what the host
    /// sent before the failure is still delivered, then the guest's side is reset.
    host_failed: bool,
    since: Instant,
}

/// A DNS query the host resolved: who asked, the lookup, the host's answer.
type Resolved = (IpEndpoint, DnsLookup, HostAnswer);

/// What to do with a frame from the guest.
enum Verdict {
    /// To the stack.
    Pass,
    /// Dropped.
    Drop,
    /// A SYN held until its host connection is made.
    Held,
}

struct Stack {
    shared: Arc<Shared>,
    device_wake: EventFd,
    phy: Phy,
    iface: Interface,
    sockets: SocketSet<'static>,
    pending: HashMap<Tuple, Pending>,
    conns: HashMap<SocketHandle, Conn>,
    by_tuple: HashMap<Tuple, SocketHandle>,
    dns: SocketHandle,
    dns_in_flight: usize,
    dns_done: mpsc::Receiver<Resolved>,
    dns_done_tx: mpsc::Sender<Resolved>,
    policy_gen: u64,
    epoch: Instant,
    /// When the guest's address was last put in the stack's neighbor cache.
    seeded: Option<Instant>,
}

fn stack_now(epoch: Instant) -> smoltcp::time::Instant {
    smoltcp::time::Instant::from_micros(epoch.elapsed().as_micros() as i64)
}

impl Stack {
    fn new(shared: Arc<Shared>, frames: Arc<Mutex<Frames>>, device_wake: EventFd) -> Stack {
        let epoch = Instant::now();
        let mut phy = Phy {
            inbound: VecDeque::new(),
            frames,
            sent: false,
        };
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(GATEWAY_MAC)));
        config.random_seed = rand::random();
        let mut iface = Interface::new(config, &mut phy, stack_now(epoch));
        iface.update_ip_addrs(|addrs| {
            for a in [GATEWAY_ADDR, DNS_ADDR] {
                // Room for two addresses is smoltcp's default.
                let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(a), GUEST_PREFIX));
            }
        });
        iface.set_any_ip(true);
        // Any IP mode takes packets to addresses routed through one of the interface's own.
        let _ = iface.routes_mut().add_default_ipv4_route(GATEWAY_ADDR);
        let mut sockets = SocketSet::new(Vec::new());
        let mut dns = udp::Socket::new(
            udp::PacketBuffer::new(
                vec![udp::PacketMetadata::EMPTY; MAX_DNS_IN_FLIGHT],
                vec![0; MAX_DNS_IN_FLIGHT * MAX_DNS],
            ),
            udp::PacketBuffer::new(
                vec![udp::PacketMetadata::EMPTY; MAX_DNS_IN_FLIGHT],
                vec![0; MAX_DNS_IN_FLIGHT * MAX_DNS],
            ),
        );
        let _ = dns.bind(IpListenEndpoint {
            addr: Some(IpAddress::Ipv4(DNS_ADDR)),
            port: 53,
        });
        let dns = sockets.add(dns);
        let (dns_done_tx, dns_done) = mpsc::channel();
        let policy_gen = shared.policy_gen.load(Ordering::SeqCst);
        Stack {
            shared,
            device_wake,
            phy,
            iface,
            sockets,
            pending: HashMap::new(),
            conns: HashMap::new(),
            by_tuple: HashMap::new(),
            dns,
            dns_in_flight: 0,
            dns_done,
            dns_done_tx,
            policy_gen,
            epoch,
            seeded: None,
        }
    }

    /// Keeps the guest's fixed address in the stack's neighbor cache (whose entries live 60 s):
    /// without it, the stack's first frame to a guest that has the gateway cached (after a
    /// resume, or a quiet minute) would be an ARP request, the frame itself dropped — a lost
    /// DNS answer costs the guest's resolver a 5 s retry. An ARP reply from the guest's
    /// address to the gateway fills the cache and is answered with nothing.
    fn seed_neighbor(&mut self) {
        if self
            .seeded
            .is_some_and(|t| t.elapsed() < Duration::from_secs(30))
        {
            return;
        }
        self.seeded = Some(Instant::now());
        let mut f = Vec::with_capacity(42);
        f.extend_from_slice(&GATEWAY_MAC);
        f.extend_from_slice(&GUEST_MAC);
        // ARP, Ethernet/IPv4, reply.
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&GUEST_ADDR.octets());
        f.extend_from_slice(&GATEWAY_MAC);
        f.extend_from_slice(&GATEWAY_ADDR.octets());
        self.phy.inbound.push_back(f);
    }

    fn run(mut self) {
        let mut fds: Vec<libc::pollfd> = Vec::new();
        // What each pollfd after the first is: a pending SYN's or a connection's host socket.
        let mut owners: Vec<Owner> = Vec::new();
        loop {
            if self.shared.stop.load(Ordering::SeqCst) {
                return;
            }
            let _ = self.shared.wake.read();
            self.seed_neighbor();
            self.take_frames();
            self.check_policy();
            self.finish_pending(&fds, &owners);
            self.mark_readable(&fds, &owners);
            self.take_dns_answers();
            // Rounds of stack work and relaying until neither moves anything.
            for _ in 0..16 {
                self.iface.poll(
                    stack_now(self.epoch),
                    &mut self.phy,
                    &mut self.sockets,
                );
                self.serve_dns();
                if !self.relay() {
                    break;
                }
            }
            self.reap();
            self.shared.open.store(
                self.conns.len() + self.pending.len(),
                Ordering::Relaxed,
            );
            if std::mem::take(&mut self.phy.sent) {
                let _ = self.device_wake.write(1);
            }
            let delay = self
                .iface
                .poll_delay(stack_now(self.epoch), &self.sockets)
                .map_or(MAX_SLEEP, |d| Duration::from_micros(d.total_micros()))
                .min(MAX_SLEEP);
            self.poll_fds(&mut fds, &mut owners);
            let ms = delay.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: `fds` is a valid array of pollfd of the given length for the whole call.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
            if r < 0 && std::io::Error::last_os_error().kind() != ErrorKind::Interrupted {
                // Nothing sensible to do but wait a bit and try again.
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Takes the guest's frames from the device, holding back new SYNs.
    fn take_frames(&mut self) {
        let (frames, was_full) = {
            let mut f = self.phy.frames.lock();
            let full = f.from_guest.len() >= FRAME_QUEUE;
            (std::mem::take(&mut f.from_guest), full)
        };
        if was_full && !frames.is_empty() {
            // The device left transmit chains in their ring while the queue was full.
            let _ = self.device_wake.write(1);
        }
        for frame in frames {
            match self.classify(&frame) {
                Verdict::Pass => self.phy.inbound.push_back(frame),
                Verdict::Drop => {}
                Verdict::Held => {
                    if let Some(tuple) = syn_tuple(&frame)
                        && let Some(p) = self.pending.get_mut(&tuple)
                    {
                        p.syn = frame;
                    }
                }
            }
        }
    }

    fn classify(&mut self, frame: &[u8]) -> Verdict {
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            return Verdict::Drop;
        };
        if eth.ethertype() != EthernetProtocol::Ipv4 {
            // ARP to the stack; IPv6 and the rest are dropped by it.
            return Verdict::Pass;
        }
        let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
            return Verdict::Drop;
        };
        let dst = ip.dst_addr();
        match ip.next_header() {
            IpProtocol::Icmp if dst != GATEWAY_ADDR && dst != DNS_ADDR => Verdict::Drop,
            IpProtocol::Tcp => {
                let Some(tuple) = syn_tuple(frame) else {
                    return Verdict::Pass;
                };
                if self.pending.contains_key(&tuple) {
                    // A retransmitted SYN: the first one is still held.
                    return Verdict::Drop;
                }
                if self.by_tuple.contains_key(&tuple) {
                    return Verdict::Pass;
                }
                self.open_host(tuple)
            }
            _ => Verdict::Pass,
        }
    }

    /// A new guest connection: starts its host connection and holds its SYN, or lets the
    /// stack refuse it.
    fn open_host(&mut self, tuple: Tuple) -> Verdict {
        let refuse = |s: &Shared| {
            s.refused.fetch_add(1, Ordering::Relaxed);
            Verdict::Pass
        };
        if self.pending.len() + self.conns.len() >= MAX_CONNECTIONS {
            return refuse(&self.shared);
        }
        let dst = SocketAddrV4::new(tuple.2, tuple.3);
        let Some(target) = self.shared.egress.lock().tcp_target(dst) else {
            return refuse(&self.shared);
        };
        let Ok(host) = connect_nonblocking(target) else {
            return refuse(&self.shared);
        };
        self.pending.insert(
            tuple,
            Pending {
                syn: Vec::new(),
                host,
                since: Instant::now(),
            },
        );
        Verdict::Held
    }

    /// Connections the policy no longer allows are reset.
    fn check_policy(&mut self) {
        let g = self.shared.policy_gen.load(Ordering::SeqCst);
        if g == self.policy_gen {
            return;
        }
        self.policy_gen = g;
        let egress = self.shared.egress.lock();
        let denied =
            |t: &Tuple| egress.tcp_target(SocketAddrV4::new(t.2, t.3)).is_none();
        let refused: Vec<Tuple> = self.pending.keys().filter(|t| denied(t)).copied().collect();
        for (&h, c) in &self.conns {
            if denied(&c.tuple) {
                self.sockets.get_mut::<tcp::Socket>(h).abort();
            }
        }
        drop(egress);
        for t in refused {
            if let Some(p) = self.pending.remove(&t) {
                self.release_refused(p.syn);
            }
        }
    }

    /// A held SYN whose host connection failed goes to the stack, which has no socket for it
    /// and resets it.
    fn release_refused(&mut self, syn: Vec<u8>) {
        self.shared.refused.fetch_add(1, Ordering::Relaxed);
        if !syn.is_empty() {
            self.phy.inbound.push_back(syn);
        }
    }

    /// Host connections that completed (or failed, or took too long) since the last poll.
    fn finish_pending(&mut self, fds: &[libc::pollfd], owners: &[Owner]) {
        let mut done: Vec<(Tuple, bool)> = Vec::new();
        for (fd, owner) in fds.iter().skip(1).zip(owners) {
            if let Owner::Pending(t) = owner
                && fd.revents != 0
                && let Some(p) = self.pending.get(t)
                // Not a newer attempt of the same connection, made since the poll.
                && p.host.as_raw_fd() == fd.fd
            {
                let ok = fd.revents & (libc::POLLERR | libc::POLLHUP) == 0
                    && matches!(p.host.take_error(), Ok(None))
                    && p.host.peer_addr().is_ok();
                done.push((*t, ok));
            }
        }
        let now = Instant::now();
        for (t, p) in &self.pending {
            if now.duration_since(p.since) > CONNECT_TIMEOUT {
                done.push((*t, false));
            }
        }
        for (t, ok) in done {
            let Some(p) = self.pending.remove(&t) else {
                continue;
            };
            if !ok || p.syn.is_empty() {
                self.release_refused(p.syn);
                continue;
            }
            let host: TcpStream = p.host.into();
            let _ = host.set_nodelay(true);
            let mut sock = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; CONN_BUFFER]),
                tcp::SocketBuffer::new(vec![0; CONN_BUFFER]),
            );
            sock.set_nagle_enabled(false);
            // A guest that stops answering (data unacknowledged this long) is reset.
            sock.set_timeout(Some(smoltcp::time::Duration::from_secs(IDLE_PEER_TIMEOUT)));
            if sock
                .listen(IpListenEndpoint {
                    addr: Some(IpAddress::Ipv4(t.2)),
                    port: t.3,
                })
                .is_err()
            {
                self.release_refused(p.syn);
                continue;
            }
            let h = self.sockets.add(sock);
            self.by_tuple.insert(t, h);
            self.conns.insert(
                h,
                Conn {
                    tuple: t,
                    host,
                    readable: false,
                    host_eof: false,
                    guest_eof: false,
                    host_failed: false,
                    since: now,
                },
            );
            self.shared.accepted.fetch_add(1, Ordering::Relaxed);
            // This SYN reaches its own listener before another for the same destination is
            // released (two listeners on one endpoint take SYNs in set order).
            self.phy.inbound.push_back(p.syn);
            self.iface
                .poll(stack_now(self.epoch), &mut self.phy, &mut self.sockets);
        }
    }

    fn mark_readable(&mut self, fds: &[libc::pollfd], owners: &[Owner]) {
        for (fd, owner) in fds.iter().skip(1).zip(owners) {
            if let Owner::Conn(h) = owner
                && fd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
                && let Some(c) = self.conns.get_mut(h)
            {
                c.readable = true;
            }
        }
    }

    /// Moves bytes between each connection's smoltcp socket and its host socket; returns
    /// whether anything moved (the stack then has segments to send).
    fn relay(&mut self) -> bool {
        let mut moved = false;
        for (&h, c) in self.conns.iter_mut() {
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            // Guest to host; after a host failure, into the void (nobody reads it).
            while s.can_recv() {
                let r = s.recv(|buf| {
                    if c.host_failed {
                        return (buf.len(), Ok(buf.len()));
                    }
                    match c.host.write(buf) {
                        Ok(n) => (n, Ok(n)),
                        Err(e) => (0, Err(e)),
                    }
                });
                match r {
                    Ok(Ok(n)) if n > 0 => moved = true,
                    Ok(Err(e)) if e.kind() == ErrorKind::WouldBlock => break,
                    Ok(Err(e)) if e.kind() == ErrorKind::Interrupted => {}
                    Ok(Err(_)) | Ok(Ok(_)) => {
                        // What the host sent before it failed is still read and delivered
                        // below; the reset follows it.
                        c.host_failed = true;
                        c.readable = true;
                        moved = true;
                    }
                    Err(_) => break,
                }
            }
            // The guest's FIN, once its bytes are out: a half close of the host socket.
            if !c.guest_eof
                && s.recv_queue() == 0
                && matches!(
                    s.state(),
                    tcp::State::CloseWait
                        | tcp::State::LastAck
                        | tcp::State::Closing
                        | tcp::State::TimeWait
                )
            {
                c.guest_eof = true;
                let _ = c.host.shutdown(std::net::Shutdown::Write);
            }
            // Host to guest, into free room only.
            while c.readable && !c.host_eof && s.can_send() {
                let r = s.send(|buf| match c.host.read(buf) {
                    Ok(n) => (n, Ok(n)),
                    Err(e) => (0, Err(e)),
                });
                match r {
                    Ok(Ok(0)) => {
                        c.host_eof = true;
                        s.close();
                        moved = true;
                    }
                    Ok(Ok(_)) => moved = true,
                    Ok(Err(e)) if e.kind() == ErrorKind::WouldBlock => c.readable = false,
                    Ok(Err(e)) if e.kind() == ErrorKind::Interrupted => {}
                    Ok(Err(_)) => {
                        c.host_eof = true;
                        c.host_failed = true;
                        moved = true;
                    }
                    Err(_) => break,
                }
            }
            // A failed host connection: once the guest has what the host sent before the
            // failure (acknowledged), its side is reset, as the server's kernel reset ours.
            if c.host_failed && c.host_eof && s.send_queue() == 0 && s.is_open() {
                s.abort();
                moved = true;
            }
        }
        moved
    }

    /// Drops the connections that ended (the socket closed or in TIME-WAIT), and those whose
    /// guest handshake did not complete within [`CONNECT_TIMEOUT`] (a listener whose SYN
    /// never came, a SYN flood that never answers the SYN-ACK): their slots are free again.
    fn reap(&mut self) {
        let now = Instant::now();
        let mut gone = Vec::new();
        for (&h, c) in &self.conns {
            let state = self.sockets.get::<tcp::Socket>(h).state();
            let ended = matches!(state, tcp::State::Closed | tcp::State::TimeWait)
                || (matches!(state, tcp::State::Listen | tcp::State::SynReceived)
                    && now.duration_since(c.since) > CONNECT_TIMEOUT);
            if ended {
                gone.push(h);
            }
        }
        for h in gone {
            if let Some(c) = self.conns.remove(&h) {
                self.by_tuple.remove(&c.tuple);
                // Closing a host socket the guest reset (or never used) resets it too.
                let _ = c.host.shutdown(std::net::Shutdown::Both);
            }
            self.sockets.remove(h);
        }
    }

    /// Answers the guest's DNS queries: at once when the policy or the cache decides, else
    /// on a resolver thread (bounded).
    fn serve_dns(&mut self) {
        loop {
            let s = self.sockets.get_mut::<udp::Socket>(self.dns);
            let Ok((query, meta)) = s.recv() else {
                return;
            };
            let from = meta.endpoint;
            // Never blocks: the state is locked only to decide.
            let plan = self.shared.egress.lock().dns_plan(query);
            let lookup = match plan {
                DnsPlan::Drop => {
                    self.shared.dns_dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                DnsPlan::Reply(reply) => {
                    self.send_dns(from, &reply);
                    continue;
                }
                DnsPlan::Resolve(lookup) => lookup,
            };
            if self.dns_in_flight >= MAX_DNS_IN_FLIGHT {
                self.shared.dns_dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let shared = self.shared.clone();
            let done = self.dns_done_tx.clone();
            let spawned = std::thread::Builder::new()
                .name("dormant-dns".into())
                .spawn(move || {
                    let answer = lookup.resolve();
                    let _ = done.send((from, lookup, answer));
                    let _ = shared.wake.write(1);
                });
            match spawned {
                Ok(_) => self.dns_in_flight += 1,
                Err(_) => {
                    self.shared.dns_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn take_dns_answers(&mut self) {
        while let Ok((to, lookup, answer)) = self.dns_done.try_recv() {
            self.dns_in_flight = self.dns_in_flight.saturating_sub(1);
            let reply = self.shared.egress.lock().dns_finish(lookup, answer);
            self.send_dns(to, &reply);
        }
    }

    fn send_dns(&mut self, to: IpEndpoint, reply: &[u8]) {
        let s = self.sockets.get_mut::<udp::Socket>(self.dns);
        if reply.len() > MAX_DNS || s.send_slice(reply, to).is_err() {
            self.shared.dns_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The pollfds of the next sleep: the wake eventfd, then each pending host connection
    /// (writable = connected) and each connection's host socket when it is waited on.
    fn poll_fds(&self, fds: &mut Vec<libc::pollfd>, owners: &mut Vec<Owner>) {
        fds.clear();
        owners.clear();
        let pfd = |fd: RawFd, events: libc::c_short| libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        fds.push(pfd(self.shared.wake.as_raw_fd(), libc::POLLIN));
        for (t, p) in &self.pending {
            fds.push(pfd(p.host.as_raw_fd(), libc::POLLOUT));
            owners.push(Owner::Pending(*t));
        }
        for (&h, c) in &self.conns {
            let s = self.sockets.get::<tcp::Socket>(h);
            let mut events = 0;
            if !c.host_eof && !c.readable && s.can_send() {
                events |= libc::POLLIN;
            }
            if s.recv_queue() > 0 {
                events |= libc::POLLOUT;
            }
            if events != 0 {
                fds.push(pfd(c.host.as_raw_fd(), events));
                owners.push(Owner::Conn(h));
            }
        }
    }
}

/// What a pollfd after the wake eventfd watches (the pollfd holds its descriptor too).
#[derive(Debug, Clone, Copy)]
enum Owner {
    Pending(Tuple),
    Conn(SocketHandle),
}

/// The connection a frame opens, when it is an IPv4 TCP SYN (without ACK).
fn syn_tuple(frame: &[u8]) -> Option<Tuple> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    if ip.next_header() != IpProtocol::Tcp {
        return None;
    }
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    (tcp.syn() && !tcp.ack() && !tcp.rst()).then(|| {
        (
            ip.src_addr(),
            tcp.src_port(),
            ip.dst_addr(),
            tcp.dst_port(),
        )
    })
}

/// A non-blocking connect to `addr` under way.
fn connect_nonblocking(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    sock.set_nonblocking(true)?;
    match sock.connect(&addr.into()) {
        Ok(()) => Ok(sock),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(sock),
        Err(e) => Err(e),
    }
}
