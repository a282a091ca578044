//! virtio-net: the guest's `eth0`, its frames carried to and from the NAT stack
//! ([`crate::net::nat`]) running on a thread of its own.
//!
//! Features offered: `VIRTIO_NET_F_MAC` (the fixed [`GUEST_MAC`]), `VIRTIO_NET_F_MTU` ([`MTU`],
//! so Linux posts receive buffers of several pages) and `VERSION_1`; no checksum or
//! segmentation offloads, no mergeable receive buffers, so every frame is one Ethernet frame
//! of at most [`MAX_FRAME`] bytes behind a 12-byte `virtio_net_hdr_v1`, in one chain. A guest
//! frame shorter than an Ethernet header, longer than [`MAX_FRAME`], or in a chain over the
//! caps is dropped and counted ([`NetDevice::dropped`]), as is a frame for the guest that
//! does not fit the receive buffer it posted.
//!
//! Queues: receive (0) and transmit (1). Between the device and the stack, [`Frames`] holds at
//! most [`FRAME_QUEUE`] frames each way: when the stack's inbound queue is full the device
//! leaves the guest's transmit chains in their ring (back-pressure), and when the outbound one
//! is full the stack holds its segments (TCP retransmits them).
//!
//! Snapshots keep the transport (queue positions) only: the NAT's connections are host
//! sockets, which no snapshot holds. A restored device starts a fresh stack; the guest keeps
//! its address, routes and listening sockets, and its NAT'd connections are reset when they
//! next send.

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::device::{Chain, ChainReader, ChainWriter, Device, DeviceLogic, Queues};
use super::mmio::{TransportState, VirtioDevice};
use crate::net::{FRAME_QUEUE, Frames, GUEST_MAC, MAX_FRAME, MIN_FRAME, MTU, Nat, NetHandle};
use crate::persist::Persist;
use crate::vm::GuestMemory;

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU};

const QUEUE_SIZES: [u16; 2] = [256, 256];
const RX: usize = 0;
const TX: usize = 1;
/// `struct virtio_net_hdr_v1`: flags, gso type, header length, gso size, checksum start and
/// offset, number of buffers.
pub const NET_HDR: usize = 12;
/// The largest receive buffer used as one (Linux posts [`MTU`] rounded up to pages, plus a
/// page for the header); a larger one is returned unused.
const MAX_RX_BUFFER: usize = 128 << 10;

/// The device model: the frame queues it shares with the stack.
#[derive(Debug)]
pub struct Net {
    frames: Arc<Mutex<Frames>>,
    /// Wakes the stack (frames arrived, or room freed).
    stack: Arc<EventFd>,
    dropped: Arc<AtomicU64>,
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }
    fn features(&self) -> u64 {
        (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_MTU)
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // `mac`, `status` and `max_virtqueue_pairs` (zero: not offered), `mtu`.
        let mut cfg = [0u8; 12];
        cfg[..6].copy_from_slice(&GUEST_MAC);
        cfg[10..].copy_from_slice(&(MTU as u16).to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or_default();
        }
    }
    fn write_config(&mut self, _: u64, _: &[u8]) {}
    fn reset(&mut self) {
        let mut f = self.frames.lock();
        f.to_guest.clear();
        f.from_guest.clear();
    }
}

impl DeviceLogic for Net {
    /// A header and one frame.
    const MAX_READABLE: usize = NET_HDR + MAX_FRAME;
    const MAX_WRITABLE: usize = MAX_RX_BUFFER;

    fn process(&mut self, queues: &mut Queues<'_>) {
        let mut f = self.frames.lock();
        let mut moved = false;
        // Guest to stack, while the stack has room (else the chains wait in their ring).
        while f.from_guest.len() < FRAME_QUEUE {
            let mut frame = None;
            let served = queues.serve(TX, |c| {
                if let Chain::Request(req) = c {
                    frame = read_frame(&mut req.reader);
                }
                0
            });
            if !served {
                break;
            }
            match frame {
                Some(fr) => {
                    f.from_guest.push_back(fr);
                    moved = true;
                }
                None => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        // Stack to guest, while the guest has receive buffers.
        while let Some(frame) = f.to_guest.front() {
            let mut fits = true;
            let served = queues.serve(RX, |c| match c {
                Chain::Request(req) => write_frame(&mut req.writer, frame).unwrap_or_else(|| {
                    fits = false;
                    0
                }),
                Chain::OverCaps(_) => {
                    fits = false;
                    0
                }
            });
            if !served {
                break;
            }
            if !fits {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            f.to_guest.pop_front();
            moved = true;
        }
        drop(f);
        if moved {
            let _ = self.stack.write(1);
        }
    }
}

/// The Ethernet frame of one transmit chain (its header skipped): `None` when the chain is
/// shorter than a header and an Ethernet header, or longer than a header and [`MAX_FRAME`].
/// Allocates at most [`MAX_FRAME`] bytes.
pub fn read_frame(r: &mut ChainReader<'_>) -> Option<Vec<u8>> {
    let len = r.available().checked_sub(NET_HDR)?;
    if !(MIN_FRAME..=MAX_FRAME).contains(&len) {
        return None;
    }
    let mut hdr = [0u8; NET_HDR];
    r.read_exact(&mut hdr).ok()?;
    let mut frame = vec![0u8; len];
    r.read_exact(&mut frame).ok()?;
    Some(frame)
}

/// Writes `frame` behind a zeroed header (one buffer) into a receive chain; returns the bytes
/// written, or `None` when the chain is too short for it.
pub fn write_frame(w: &mut ChainWriter<'_>, frame: &[u8]) -> Option<u32> {
    let len = NET_HDR + frame.len();
    if w.available() < len {
        return None;
    }
    let mut hdr = [0u8; NET_HDR];
    // num_buffers = 1.
    hdr[10] = 1;
    w.write_all(&hdr).ok()?;
    w.write_all(frame).ok()?;
    u32::try_from(len).ok()
}

/// The network device's state in a snapshot: its transport (the NAT state is not kept).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetState {
    pub transport: TransportState,
}

/// The device, its worker thread and its NAT stack.
pub struct NetDevice {
    dev: Device<Net>,
    nat: Nat,
    dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for NetDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetDevice").finish_non_exhaustive()
    }
}

impl NetDevice {
    /// A network device for a guest with memory `mem`, raising `irq`, with a fresh NAT stack
    /// whose policy is off (nothing reachable) until [`NetHandle::set_policy`]; `state`
    /// restores a snapshot's transport.
    pub fn new(
        mem: GuestMemory,
        irq: EventFd,
        state: Option<&NetState>,
    ) -> std::io::Result<NetDevice> {
        let frames = Arc::new(Mutex::new(Frames::default()));
        let stack_wake = EventFd::new(EFD_NONBLOCK)?;
        let dropped = Arc::new(AtomicU64::new(0));
        let net = Net {
            frames: frames.clone(),
            stack: Arc::new(stack_wake.try_clone()?),
            dropped: dropped.clone(),
        };
        let dev = Device::new(
            "dormant-net".into(),
            net,
            mem,
            irq,
            state.map(|s| &s.transport),
        )?;
        let device_wake = dev.shared().wake.try_clone()?;
        let nat = Nat::start(frames, stack_wake, device_wake)?;
        Ok(NetDevice { dev, nat, dropped })
    }

    /// The eventfds of the queues' notifications (registered as ioeventfds), receive first.
    pub fn queue_evts(&self) -> &[EventFd] {
        self.dev.queue_evts()
    }

    /// The eventfd of the device's interrupt line (registered as an irqfd).
    pub fn irq_fd(&self) -> &EventFd {
        self.dev.irq_fd()
    }

    /// A register read from the vCPU (`offset` within the device's MMIO window).
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        self.dev.mmio_read(offset, data);
    }

    /// A register write from the vCPU (`offset` within the device's MMIO window).
    pub fn mmio_write(&self, offset: u64, data: &[u8]) {
        self.dev.mmio_write(offset, data);
    }

    /// Stops (or restarts) touching guest memory, for a consistent checkpoint (the stack
    /// goes on with its host sockets meanwhile).
    pub fn set_paused(&self, paused: bool) {
        self.dev.set_paused(paused);
    }

    /// The device's state (pause first for a consistent snapshot).
    pub fn state(&self) -> NetState {
        NetState {
            transport: self.dev.transport_state(),
        }
    }

    /// The handle to the NAT stack: its policy and counters.
    pub fn handle(&self) -> NetHandle {
        self.nat.handle()
    }

    /// Guest frames dropped (malformed, oversized, over the caps) and frames for the guest
    /// that did not fit its receive buffer, since the device was created.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The network device's transport ([`NetState`]); restoring needs the new guest's memory and
/// the interrupt line, and starts a fresh NAT stack (policy off until set).
impl Persist for NetDevice {
    type State = NetState;
    type Context<'a> = (GuestMemory, EventFd);
    type Error = std::io::Error;

    fn save(&self) -> std::io::Result<NetState> {
        Ok(self.state())
    }

    fn restore((mem, irq): (GuestMemory, EventFd), state: &NetState) -> std::io::Result<Self> {
        NetDevice::new(mem, irq, Some(state))
    }
}
