//! virtio-vsock, emulated in the VMM (there is no vhost-vsock here): the host↔guest channel.
//!
//! The host side lives in this process: [`VsockHost::connect`] opens a stream connection to a
//! port the guest listens on (the agent's), and the returned [`VsockStream`] is a blocking
//! `Read + Write` byte stream. Connections the guest opens towards the host are refused (reset):
//! dormant's protocol is host-initiated.
//!
//! A worker thread serves the queues: guest notifications arrive on ioeventfds, host activity on
//! a wake eventfd, and used buffers are signalled through an irqfd. Flow control follows the
//! virtio spec (`buf_alloc` / `fwd_cnt` credit on both sides).
//!
//! Snapshots: an *idle* connection (nothing buffered either way) survives a checkpoint: its
//! ports and credit counters are part of the device state, and after a restore the host takes it
//! back with [`VsockHost::adopt`], so the guest sees nothing happen. Connections with data in
//! flight, and idle ones nobody adopts ([`VsockHost::reset_unadopted`]), are reset: the guest's
//! sockets close and the host reconnects.
//!
//! No host wait is unbounded unless asked: a stream's reads *and* writes honour its timeouts
//! and its deadline ([`VsockStream::set_deadline`]; a guest that never answers or never grants
//! credit cannot hang a caller past them) and a cancel flag raised from another thread
//! ([`VsockStream::set_cancel`], then [`VsockWaker::wake`]), which `connect` honours too.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::MutexGuard;
use vmm_sys_util::eventfd::EventFd;

use super::device::{Chain, ChainReader, ChainWriter, Device, DeviceLogic, Queues};
use super::mmio::{TransportState, VirtioDevice};
use crate::vm::GuestMemory;

const HOST_CID: u64 = 2;
/// The guest's context id.
pub const GUEST_CID: u64 = 3;
const QUEUE_SIZES: [u16; 3] = [256, 256, 64];
const RX: usize = 0;
const TX: usize = 1;
const HDR: usize = 44;
/// Receive buffer the host advertises per connection.
const HOST_BUF: u32 = 256 * 1024;
/// Host→guest bytes buffered per connection before writers block.
const OUT_MAX: usize = 256 * 1024;
/// Largest payload accepted in one guest packet (Linux sends at most 64 KiB).
const MAX_PKT: u32 = 64 * 1024;
/// Most refusals (resets of packets that belong to no connection) waiting for the guest to
/// post receive buffers; more are dropped (see [`ControlQueue::push_refusal`]).
const CONTROL_MAX: usize = 256;
/// First local port of host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const SHUTDOWN_SEND: u32 = 2;
const SHUTDOWN_BOTH: u32 = 3;

#[derive(Debug, Clone, Copy, Default)]
struct Header {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Header {
    fn parse(b: &[u8; HDR]) -> Header {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap_or_default());
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    fn bytes(&self) -> [u8; HDR] {
        let mut b = [0u8; HDR];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// The device model: the guest's context id, the host's connections and the control packets
/// waiting for the guest.
#[derive(Debug)]
pub struct Vsock {
    cid: u64,
    conns: HashMap<u32, Conn>,
    control: ControlQueue,
    next_port: u32,
    /// A guest packet's payload, reused ([`MAX_PKT`] bytes).
    packet: Vec<u8>,
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK
    }
    fn features(&self) -> u64 {
        0
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, _: u64, _: &[u8]) {}
    fn reset(&mut self) {}
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    Connecting,
    Connected,
    /// Reset by the guest or refused.
    Reset,
}

#[derive(Debug)]
struct Conn {
    peer_port: u32,
    state: ConnState,
    inbound: VecDeque<u8>,
    outbound: VecDeque<u8>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    tx_cnt: u32,
    fwd_cnt: u32,
    credit_sent: u32,
    /// The guest will send nothing more (reads see end of file).
    peer_done: bool,
    /// The host dropped its stream.
    host_closed: bool,
    shutdown_sent: bool,
    /// Restored from a snapshot and not yet taken by a host stream.
    adoptable: bool,
}

impl Conn {
    /// A host-initiated connection to guest port `peer`, waiting for the guest's answer.
    fn connecting(peer: u32) -> Conn {
        Conn {
            peer_port: peer,
            state: ConnState::Connecting,
            inbound: VecDeque::new(),
            outbound: VecDeque::new(),
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            credit_sent: 0,
            peer_done: false,
            host_closed: false,
            shutdown_sent: false,
            adoptable: false,
        }
    }

    fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Control {
    local: u32,
    peer: u32,
    op: u16,
    flags: u32,
}

/// Control packets waiting for a guest receive buffer, in order. Bounded whatever the guest
/// does: a connection's own packets are queued at most once each (an identical one already
/// waiting is enough, and a credit update carries the counters of when it is sent), so they
/// are bounded by the connections the host opened; refusals of stray guest packets are capped
/// at [`CONTROL_MAX`].
#[derive(Debug, Default)]
struct ControlQueue {
    q: VecDeque<Control>,
}

impl ControlQueue {
    /// Queues a packet of one of the host's connections, unless the same one is waiting.
    fn push_back(&mut self, ctl: Control) {
        if !self.q.contains(&ctl) {
            self.q.push_back(ctl);
        }
    }

    /// Queues the reset that refuses a guest packet belonging to no connection, unless the
    /// same one is waiting or [`CONTROL_MAX`] packets are. A guest that sends without posting
    /// receive buffers therefore cannot grow host memory. Dropping such a reset loses nothing
    /// the guest may rely on: its packet named no connection of ours, and a connection the
    /// guest tried to open (dormant never accepts one) then times out in the guest instead of
    /// being refused at once.
    fn push_refusal(&mut self, ctl: Control) {
        if self.q.len() < CONTROL_MAX {
            self.push_back(ctl);
        }
    }

    fn front(&self) -> Option<&Control> {
        self.q.front()
    }

    fn pop_front(&mut self) -> Option<Control> {
        self.q.pop_front()
    }
}

/// Most connections (open and live together) a vsock state may hold: far more than a sandbox
/// keeps (one agent connection, a few forwarded ports), few enough that restoring them (and the
/// resets sent for open ones) stays small. Decoding and restoring refuse more.
pub const MAX_SNAPSHOT_CONNS: usize = 4096;

/// What the worker and the host's streams share.
type Shared = super::device::Shared<Vsock>;
/// The device behind its lock (the shell's state, dereferencing to [`Vsock`]).
type Inner = super::device::Inner<Vsock>;

/// The vsock device's state in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockState {
    pub cid: u64,
    pub next_port: u32,
    pub transport: TransportState,
    /// (host port, guest port) of connections with data in flight at the checkpoint: reset
    /// after restore.
    #[serde(deserialize_with = "dormant_core::snapshot::bounded_vec::<_, _, MAX_SNAPSHOT_CONNS>")]
    pub open: Vec<(u32, u32)>,
    /// Idle connections, restored as they were.
    #[serde(
        default,
        deserialize_with = "dormant_core::snapshot::bounded_vec::<_, _, MAX_SNAPSHOT_CONNS>"
    )]
    pub live: Vec<LiveConn>,
}

impl VsockState {
    /// What restoring requires of a (untrusted) state: a guest context id a guest can have
    /// (3 to 2^32 - 2), host ports where host-initiated connections live (from 2^30), each
    /// connection once, at most [`MAX_SNAPSHOT_CONNS`] of them.
    pub fn check(&self) -> Result<(), String> {
        if !(3..u32::MAX as u64).contains(&self.cid) {
            return Err(format!("guest context id {} is not a guest's", self.cid));
        }
        if self.next_port < FIRST_LOCAL_PORT {
            return Err(format!(
                "next host port {} below {FIRST_LOCAL_PORT}",
                self.next_port
            ));
        }
        let n = self.open.len() + self.live.len();
        if n > MAX_SNAPSHOT_CONNS {
            return Err(format!("{n} connections (at most {MAX_SNAPSHOT_CONNS})"));
        }
        let mut ports = std::collections::HashSet::with_capacity(n);
        for local in self
            .open
            .iter()
            .map(|o| o.0)
            .chain(self.live.iter().map(|c| c.local))
        {
            if local < FIRST_LOCAL_PORT || !ports.insert(local) {
                return Err(format!(
                    "host port {local} repeated or not a host-initiated one"
                ));
            }
        }
        Ok(())
    }
}

/// An idle connection in a snapshot: its ports and flow-control counters.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LiveConn {
    pub local: u32,
    pub peer: u32,
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    pub tx_cnt: u32,
    pub fwd_cnt: u32,
    pub credit_sent: u32,
}

/// The device and its worker thread.
pub struct VsockDevice {
    dev: Device<Vsock>,
}

impl std::fmt::Debug for VsockDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockDevice").finish_non_exhaustive()
    }
}

/// The host's handle for opening connections.
#[derive(Clone)]
pub struct VsockHost {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for VsockHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockHost").finish_non_exhaustive()
    }
}

impl VsockDevice {
    /// A device for guest context `cid` over `mem`, raising `irq`; `state` restores a snapshot.
    pub fn new(
        mem: GuestMemory,
        irq: EventFd,
        state: Option<&VsockState>,
    ) -> std::io::Result<VsockDevice> {
        if let Some(s) = state {
            s.check()
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        }
        let cid = state.map_or(GUEST_CID, |s| s.cid);
        let mut control = ControlQueue::default();
        let mut next_port = FIRST_LOCAL_PORT;
        let mut conns = HashMap::new();
        if let Some(s) = state {
            for c in &s.live {
                conns.insert(
                    c.local,
                    Conn {
                        state: ConnState::Connected,
                        peer_buf_alloc: c.peer_buf_alloc,
                        peer_fwd_cnt: c.peer_fwd_cnt,
                        tx_cnt: c.tx_cnt,
                        fwd_cnt: c.fwd_cnt,
                        credit_sent: c.credit_sent,
                        adoptable: true,
                        ..Conn::connecting(c.peer)
                    },
                );
            }
            next_port = s.next_port;
            for &(local, peer) in &s.open {
                control.push_back(Control {
                    local,
                    peer,
                    op: OP_RST,
                    flags: 0,
                });
            }
        }
        let vsock = Vsock {
            cid,
            conns,
            control,
            next_port,
            packet: vec![0; MAX_PKT as usize],
        };
        let dev = Device::new(
            "dormant-vsock".into(),
            vsock,
            mem,
            irq,
            state.map(|s| &s.transport),
        )?;
        Ok(VsockDevice { dev })
    }

    /// The eventfd the guest's notifications of queue `i` should signal (registered as an
    /// ioeventfd by the VM owner).
    pub fn queue_evts(&self) -> &[EventFd] {
        self.dev.queue_evts()
    }

    /// The eventfd of the device's interrupt line (registered as an irqfd).
    pub fn irq_fd(&self) -> &EventFd {
        self.dev.irq_fd()
    }

    /// The host's handle for opening (and adopting) connections to the guest.
    pub fn host(&self) -> VsockHost {
        VsockHost {
            shared: self.dev.shared().clone(),
        }
    }

    /// An MMIO read from the vCPU.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        self.dev.mmio_read(offset, data);
    }

    /// An MMIO write from the vCPU.
    pub fn mmio_write(&self, offset: u64, data: &[u8]) {
        self.dev.mmio_write(offset, data);
    }

    /// Stops touching guest memory (for a consistent checkpoint) or starts again.
    pub fn set_paused(&self, paused: bool) {
        self.dev.set_paused(paused);
    }

    /// The guest is gone (its vCPU crashed, or it reset itself): every connection is reset and
    /// the host's streams and connects waiting on them return at once, not at their deadlines.
    pub fn guest_gone(&self) {
        {
            let mut g = self.dev.lock();
            g.stopped = true;
            for c in g.conns.values_mut() {
                c.state = ConnState::Reset;
            }
        }
        self.dev.shared().cv.notify_all();
    }

    /// The device state (pause first for a consistent snapshot).
    pub fn state(&self) -> VsockState {
        let g = self.dev.lock();
        let mut open = Vec::new();
        let mut live = Vec::new();
        for (&local, c) in &g.conns {
            if c.state == ConnState::Reset {
                continue;
            }
            let idle = c.state == ConnState::Connected
                && c.inbound.is_empty()
                && c.outbound.is_empty()
                && !c.host_closed
                && !c.peer_done;
            if idle {
                live.push(LiveConn {
                    local,
                    peer: c.peer_port,
                    peer_buf_alloc: c.peer_buf_alloc,
                    peer_fwd_cnt: c.peer_fwd_cnt,
                    tx_cnt: c.tx_cnt,
                    fwd_cnt: c.fwd_cnt,
                    credit_sent: c.credit_sent,
                });
            } else {
                open.push((local, c.peer_port));
            }
        }
        open.sort_unstable();
        live.sort_unstable_by_key(|c| c.local);
        VsockState {
            cid: g.cid,
            next_port: g.next_port,
            transport: g.t.state(),
            open,
            live,
        }
    }
}

impl Drop for VsockDevice {
    fn drop(&mut self) {
        // The shell then stops the worker and wakes the host's streams, which see the resets.
        let mut g: parking_lot::MutexGuard<'_, Inner> = self.dev.lock();
        g.stopped = true;
        for c in g.conns.values_mut() {
            c.state = ConnState::Reset;
        }
    }
}

impl DeviceLogic for Vsock {
    /// A packet's header and payload; a longer chain is dropped.
    const MAX_READABLE: usize = HDR + MAX_PKT as usize;
    /// A receive buffer (Linux posts 4 KiB ones); a larger one is returned unused.
    const MAX_WRITABLE: usize = HDR + MAX_PKT as usize;

    fn process(&mut self, queues: &mut Queues<'_>) {
        self.process_tx(queues);
        self.process_rx(queues);
    }
}

/// A guest packet's header, its payload read into `payload`; `None` for a malformed one.
fn read_packet(r: &mut ChainReader<'_>, payload: &mut [u8]) -> Option<Header> {
    let mut hdr = [0u8; HDR];
    r.read_exact(&mut hdr).ok()?;
    let h = Header::parse(&hdr);
    if h.len > MAX_PKT {
        return None;
    }
    r.read_exact(payload.get_mut(..h.len as usize)?).ok()?;
    Some(h)
}

enum Next {
    Control(Control),
    Data(u32),
}

impl Vsock {
    /// Takes the guest's packets.
    fn process_tx(&mut self, queues: &mut Queues<'_>) {
        loop {
            let mut packet = None;
            let buf = &mut self.packet;
            if !queues.serve(TX, |c| {
                if let Chain::Request(req) = c {
                    packet = read_packet(&mut req.reader, buf);
                }
                0
            }) {
                break;
            }
            if let Some(h) = packet {
                let data = std::mem::take(&mut self.packet);
                self.handle_packet(h, data.get(..h.len as usize).unwrap_or_default());
                self.packet = data;
            }
        }
    }

    fn handle_packet(&mut self, h: Header, data: &[u8]) {
        // Anything but an answer on one of our connections is refused with a reset (never a
        // reset answered with a reset).
        let refuse = |control: &mut ControlQueue| {
            if h.op != OP_RST {
                control.push_refusal(Control {
                    local: h.dst_port,
                    peer: h.src_port,
                    op: OP_RST,
                    flags: 0,
                });
            }
        };
        if h.dst_cid != HOST_CID || h.src_cid != self.cid || h.type_ != TYPE_STREAM {
            refuse(&mut self.control);
            return;
        }
        let Some(c) = self
            .conns
            .get_mut(&h.dst_port)
            .filter(|c| c.peer_port == h.src_port)
        else {
            // No such connection (or a guest-initiated one).
            refuse(&mut self.control);
            return;
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            OP_RESPONSE if c.state == ConnState::Connecting => c.state = ConnState::Connected,
            OP_RW if c.state == ConnState::Connected => {
                // The guest honours our credit; anything beyond it is dropped rather than
                // buffered.
                let room = (HOST_BUF as usize).saturating_sub(c.inbound.len());
                c.inbound.extend(&data[..data.len().min(room)]);
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => self.control.push_back(Control {
                local: h.dst_port,
                peer: h.src_port,
                op: OP_CREDIT_UPDATE,
                flags: 0,
            }),
            OP_SHUTDOWN => {
                if h.flags & SHUTDOWN_SEND != 0 {
                    c.peer_done = true;
                }
                if h.flags & SHUTDOWN_BOTH == SHUTDOWN_BOTH && c.host_closed {
                    self.conns.remove(&h.dst_port);
                    self.control.push_back(Control {
                        local: h.dst_port,
                        peer: h.src_port,
                        op: OP_RST,
                        flags: 0,
                    });
                }
            }
            OP_RST => {
                if c.host_closed {
                    self.conns.remove(&h.dst_port);
                } else {
                    c.state = ConnState::Reset;
                }
            }
            _ => {}
        }
    }

    /// Fills the guest's receive buffers with control packets and connection data.
    fn process_rx(&mut self, queues: &mut Queues<'_>) {
        // Connections the host closed send their shutdown once their data is out.
        for (&local, c) in self.conns.iter_mut() {
            if c.host_closed && !c.shutdown_sent && c.outbound.is_empty() {
                c.shutdown_sent = true;
                self.control.push_back(Control {
                    local,
                    peer: c.peer_port,
                    op: OP_SHUTDOWN,
                    flags: SHUTDOWN_BOTH,
                });
            }
        }
        self.conns
            .retain(|_, c| !(c.host_closed && c.state == ConnState::Reset));
        loop {
            let next = if let Some(ctl) = self.control.front() {
                Next::Control(*ctl)
            } else if let Some((&local, _)) = self.conns.iter().find(|(_, c)| {
                c.state == ConnState::Connected && !c.outbound.is_empty() && c.credit() > 0
            }) {
                Next::Data(local)
            } else {
                break;
            };
            let served = queues.serve(RX, |c| match c {
                Chain::Request(req) => self.fill(next, &mut req.writer),
                Chain::OverCaps(_) => 0,
            });
            if !served {
                break;
            }
        }
    }

    /// Writes the next packet into one receive buffer; returns the bytes written.
    fn fill(&mut self, next: Next, w: &mut ChainWriter<'_>) -> u32 {
        let room = w.available().saturating_sub(HDR);
        let cid = self.cid;
        match next {
            Next::Control(ctl) => {
                self.control.pop_front();
                let fwd = self.conns.get_mut(&ctl.local).map_or(0, |c| {
                    c.credit_sent = c.fwd_cnt;
                    c.fwd_cnt
                });
                let h = Header {
                    src_cid: HOST_CID,
                    dst_cid: cid,
                    src_port: ctl.local,
                    dst_port: ctl.peer,
                    type_: TYPE_STREAM,
                    op: ctl.op,
                    flags: ctl.flags,
                    buf_alloc: HOST_BUF,
                    fwd_cnt: fwd,
                    len: 0,
                };
                w.write_all(&h.bytes()).map_or(0, |_| HDR as u32)
            }
            Next::Data(local) => {
                let Some(c) = self.conns.get_mut(&local) else {
                    // Unreachable: chosen above under the same lock.
                    return 0;
                };
                let n = c.outbound.len().min(c.credit() as usize).min(room);
                c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                c.credit_sent = c.fwd_cnt;
                let h = Header {
                    src_cid: HOST_CID,
                    dst_cid: cid,
                    src_port: local,
                    dst_port: c.peer_port,
                    type_: TYPE_STREAM,
                    op: OP_RW,
                    flags: 0,
                    buf_alloc: HOST_BUF,
                    fwd_cnt: c.fwd_cnt,
                    len: n as u32,
                };
                let (a, b) = c.outbound.as_slices();
                let from_a = n.min(a.len());
                let sent = w
                    .write_all(&h.bytes())
                    .and_then(|_| w.write_all(&a[..from_a]))
                    .and_then(|_| w.write_all(&b[..n - from_a]));
                c.outbound.drain(..n);
                sent.map_or(0, |_| (HDR + n) as u32)
            }
        }
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

impl Write for VsockStream {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_headers_round_trip_in_the_wire_layout() {
        let h = Header {
            src_cid: 2,
            dst_cid: 3,
            src_port: 1 << 30,
            dst_port: 1024,
            len: 7,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: SHUTDOWN_BOTH,
            buf_alloc: HOST_BUF,
            fwd_cnt: 99,
        };
        let b = h.bytes();
        assert_eq!(b.len(), 44);
        assert_eq!(&b[20..24], &1024u32.to_le_bytes(), "dst_port at offset 20");
        assert_eq!(&b[30..32], &OP_RW.to_le_bytes(), "op at offset 30");
        let p = Header::parse(&b);
        assert_eq!(p.bytes(), b);
    }

    /// A device without a driver (nothing ever answers) holding one idle connection restored
    /// from a snapshot, to guest port 1024, that grants no credit; and the host's stream of it.
    fn silent_guest() -> (VsockDevice, VsockStream) {
        let ram = crate::vm::GuestRam::anonymous(1 << 20).unwrap();
        let fresh = VsockDevice::new(ram.memory().clone(), EventFd::new(0).unwrap(), None).unwrap();
        let mut state = fresh.state();
        state.live.push(LiveConn {
            local: FIRST_LOCAL_PORT,
            peer: 1024,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            credit_sent: 0,
        });
        let dev =
            VsockDevice::new(ram.memory().clone(), EventFd::new(0).unwrap(), Some(&state)).unwrap();
        let stream = dev.host().adopt(1024).unwrap();
        (dev, stream)
    }

    /// Runs `f` on another thread; its result, or `None` if it has not returned within a
    /// minute (a hang).
    fn within_a_minute<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(60)).ok()
    }

    #[test]
    fn reads_and_writes_stop_at_the_deadline_when_the_guest_never_answers() {
        let (_dev, mut stream) = silent_guest();
        stream.set_deadline(Some(Instant::now() + Duration::from_millis(100)));
        let read = within_a_minute(move || {
            let r = stream.read(&mut [0u8; 16]);
            (r, stream)
        });
        let (r, mut stream) = read.expect("the read hung");
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::TimedOut);

        // No credit, ever: the write fills the host's buffer, then waits for the guest.
        stream.set_deadline(Some(Instant::now() + Duration::from_millis(100)));
        let written = within_a_minute(move || {
            let r = stream.write_all(&vec![7u8; 2 * OUT_MAX]);
            (r, stream)
        });
        let (r, mut stream) = written.expect("the write hung");
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::TimedOut);

        // The same with a timeout on the wait for room instead of a deadline.
        stream.set_deadline(None);
        stream.set_write_timeout(Some(Duration::from_millis(100)));
        let written = within_a_minute(move || stream.write_all(b"more"));
        let r = written.expect("the write hung");
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::TimedOut);
    }

    #[test]
    fn a_raised_cancel_flag_stops_a_waiting_read_a_write_and_a_connect() {
        let (dev, mut stream) = silent_guest();
        let host = dev.host();
        let flag = Arc::new(AtomicBool::new(false));
        stream.set_cancel(Some(flag.clone()));
        // No deadline: only the flag can end these waits.
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let _ = tx.send(stream.read(&mut [0u8; 16]));
            stream
        });
        // The read has not returned on its own.
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        flag.store(true, Ordering::SeqCst);
        host.waker().wake();
        let r = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the read hung");
        assert!(Cancelled::is_cause_of(&r.unwrap_err()));
        let mut stream = reader.join().unwrap();
        // Still raised: a write fails at once, even with room to buffer.
        let e = stream.write(b"x").unwrap_err();
        assert!(Cancelled::is_cause_of(&e));
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionAborted);
        // A connect the guest never answers gives up too.
        let cancel = flag.clone();
        let connected = within_a_minute(move || {
            host.connect_with(1024, Duration::from_secs(3600), Some(&cancel))
                .map(|_| ())
        });
        let e = connected.expect("the connect hung").unwrap_err();
        assert!(Cancelled::is_cause_of(&e));
        stream.abort();
    }

    #[test]
    fn credit_accounts_for_bytes_in_flight() {
        let c = Conn {
            state: ConnState::Connected,
            peer_buf_alloc: 1000,
            peer_fwd_cnt: u32::MAX - 10,
            tx_cnt: 100,
            ..Conn::connecting(1024)
        };
        // 111 bytes in flight across the counter wrap.
        assert_eq!(c.credit(), 889);
    }

    #[test]
    fn control_packets_stay_bounded_whatever_the_guest_sends() {
        let mut v = Vsock {
            cid: GUEST_CID,
            conns: HashMap::new(),
            control: ControlQueue::default(),
            next_port: FIRST_LOCAL_PORT,
            packet: Vec::new(),
        };
        v.conns.insert(
            FIRST_LOCAL_PORT,
            Conn {
                state: ConnState::Connected,
                ..Conn::connecting(1024)
            },
        );
        let from_guest = |src_port: u32, dst_port: u32, op: u16| Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            ..Header::default()
        };
        // Stray packets (guest connection requests, unknown ports, foreign types): refused,
        // at most CONTROL_MAX refusals held, the same one once.
        for port in 0..10_000 {
            v.handle_packet(from_guest(port, 7, OP_REQUEST), &[]);
            v.handle_packet(from_guest(5, 7, OP_RW), &[1, 2, 3]);
        }
        assert_eq!(v.control.q.len(), CONTROL_MAX);
        // Credit requests on a live connection: one update waits, even past the cap.
        for _ in 0..10_000 {
            v.handle_packet(from_guest(1024, FIRST_LOCAL_PORT, OP_CREDIT_REQUEST), &[]);
        }
        assert_eq!(v.control.q.len(), CONTROL_MAX + 1);
        let last = v.control.q.back().copied();
        assert_eq!(
            last.map(|c| (c.local, c.peer, c.op)),
            Some((FIRST_LOCAL_PORT, 1024, OP_CREDIT_UPDATE))
        );
        // A reset is never answered.
        v.control.q.clear();
        v.handle_packet(from_guest(9, 9, OP_RST), &[]);
        assert!(v.control.q.is_empty());
    }
}
