//! The generic virtio device shell: everything a device needs besides its request handling.
//!
//! A [`Device`] owns the MMIO transport (registers, virtqueues, the interrupt), one eventfd per
//! queue (registered as ioeventfds by the machine), a wake eventfd for host-side activity, and a
//! worker thread that serves the queues with pause and stop. A device model implements
//! [`DeviceLogic`]: it only says how to serve one chain (and, for devices that send on their
//! own, when to take a buffer), and the shell hands it chains through [`Queues::serve`].
//!
//! The guest is hostile, so every guest-controlled size is capped here, before a device sees
//! it (the models for this split are cloud-hypervisor's `VirtioCommon` and Firecracker's
//! `devices/virtio/device.rs`):
//!
//! - **Descriptors per chain**: at most [`MAX_CHAIN_DESCRIPTORS`], read once into a reused
//!   buffer. virtio-queue already ends a chain after `queue size` descriptors (or, inside an
//!   indirect table, after the table's length, at most 65535) and after 4 GiB in total, so a
//!   descriptor loop always ends; the cap makes the bound small, and reading the chain once
//!   means a guest that rewrites its descriptors meanwhile cannot make the device see other
//!   lengths than the ones checked.
//! - **Bytes per chain**: each device states the largest readable and writable parts it
//!   serves ([`DeviceLogic::MAX_READABLE`], [`DeviceLogic::MAX_WRITABLE`]); a chain over either
//!   reaches it as [`Chain::OverCaps`], to be refused (with an error status where the device
//!   has one), never served. A chain with a descriptor outside guest memory, or a readable
//!   descriptor after a writable one, is returned to the guest unserved (used length 0) and
//!   the device never sees it.
//! - **Chains per wakeup**: at most [`CHAINS_PER_ROUND`] from each queue before the worker
//!   drops its lock and checks pause and stop again, so a guest that keeps its avail ring full
//!   cannot starve a checkpoint, a shutdown or the host side of a device.
//!
//! Devices copy between the chain and their backing store in bounded pieces (or straight from
//! one mapping to the other, see [`ChainReader::copy_to`]); none allocates a buffer sized by a
//! guest-controlled length above [`GUEST_ALLOCATION_BOUND`]. The property tests
//! (`tests/virtio_chains.rs`) feed random chains to every device and check that bound with a
//! counting allocator.

mod chain;
mod queues;
#[cfg(test)]
mod tests;

use std::os::fd::AsRawFd;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex, MutexGuard};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::mmio::{Interrupt, MmioTransport, TransportState, VirtioDevice};
use crate::vm::GuestMemory;

pub use chain::{Chain, ChainReader, ChainWriter, MAX_CHAIN_DESCRIPTORS, Request};
pub use queues::{CHAINS_PER_ROUND, Queues};

use chain::Desc;

/// No device allocates a buffer sized by what the guest claims (a chain's lengths, a length
/// field in a request) above this many bytes in one piece, whatever it claims: the largest are
/// virtio-fs's request and reply (see [`crate::volume::MAX_IO`]) and a vsock connection's
/// receive buffer. The volume server's tables, which grow with what the guest opens, have caps
/// of their own ([`crate::volume::MAX_NODES`], [`crate::volume::MAX_HANDLES`],
/// [`crate::volume::MAX_CACHED_ENTRIES`]).
pub const GUEST_ALLOCATION_BOUND: usize = 512 << 10;

/// A device model's request handling, on top of its registers ([`VirtioDevice`]).
pub trait DeviceLogic: VirtioDevice + 'static {
    /// The largest readable part of a chain the device serves, in bytes.
    const MAX_READABLE: usize;
    /// The largest writable part of a chain the device serves, in bytes.
    const MAX_WRITABLE: usize;

    /// One round of work, run by the worker thread with the device locked, after a queue
    /// notification, a wake, or a resume: serve chains with [`Queues::serve`] until it returns
    /// `false` (the queue is empty or this round's share is used up; the shell then comes back
    /// soon by itself).
    fn process(&mut self, queues: &mut Queues<'_>);
}

/// The shell's state behind its lock: the transport (with the device model inside) and the
/// worker's flags. Dereferences to the device model.
#[derive(Debug)]
pub struct Inner<D: VirtioDevice> {
    /// The registers and queues, with the device model inside.
    pub t: MmioTransport<D>,
    /// Serving is suspended (for a consistent checkpoint).
    pub paused: bool,
    /// The device is being dropped; the worker ends.
    pub stopped: bool,
    /// Chains returned unserved or over the device's caps since the device was created.
    pub refused: u64,
    descs: Vec<Desc>,
    served: Vec<usize>,
}

impl<D: VirtioDevice> std::ops::Deref for Inner<D> {
    type Target = D;
    fn deref(&self) -> &D {
        &self.t.device
    }
}

impl<D: VirtioDevice> std::ops::DerefMut for Inner<D> {
    fn deref_mut(&mut self) -> &mut D {
        &mut self.t.device
    }
}

impl<D: DeviceLogic> Inner<D> {
    /// One round of work; returns whether a queue has chains left for another round.
    fn round(&mut self) -> bool {
        self.served.fill(0);
        let Inner {
            t, descs, served, ..
        } = self;
        let MmioTransport {
            device,
            queues,
            mem,
            interrupt,
            ..
        } = t;
        let mut q = Queues {
            queues,
            mem,
            descs,
            served,
            max_readable: D::MAX_READABLE,
            max_writable: D::MAX_WRITABLE,
            used: false,
            more: false,
            refused: 0,
        };
        device.process(&mut q);
        let (used, more, refused) = (q.used, q.more, q.refused);
        if used {
            interrupt.signal_used();
        }
        self.refused += refused;
        more
    }
}

/// What the worker thread and the host side share.
#[derive(Debug)]
pub struct Shared<D: VirtioDevice> {
    /// The device, its transport and the worker's flags.
    pub inner: Mutex<Inner<D>>,
    /// Notified after every round of work (host-side waiters of a device).
    pub cv: Condvar,
    /// Wakes the worker for host-side activity.
    pub wake: EventFd,
}

/// A virtio device: the transport with the device model, its queue eventfds and interrupt, and
/// the worker thread serving it.
pub struct Device<D: DeviceLogic> {
    shared: Arc<Shared<D>>,
    queue_evts: Vec<EventFd>,
    interrupt: Interrupt,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl<D: DeviceLogic> std::fmt::Debug for Device<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("queues", &self.queue_evts.len())
            .finish_non_exhaustive()
    }
}

impl<D: DeviceLogic> Device<D> {
    /// Starts `device` for a guest with memory `mem`, raising `irq`, its worker thread named
    /// `name`; `transport` restores the registers of a snapshot (then chains the guest queued
    /// before the checkpoint are served at once, and a pending interrupt is raised again).
    ///
    /// Errors: eventfds or the thread could not be created, or `transport` does not fit the
    /// device (`InvalidData`).
    pub fn new(
        name: String,
        device: D,
        mem: GuestMemory,
        irq: EventFd,
        transport: Option<&TransportState>,
    ) -> std::io::Result<Device<D>> {
        let interrupt = Interrupt::new(irq);
        let mut t = MmioTransport::new(device, mem, interrupt.clone());
        if let Some(s) = transport {
            t.restore(s)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        }
        let n = t.queues.len();
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                t,
                paused: false,
                stopped: false,
                refused: 0,
                descs: Vec::with_capacity(MAX_CHAIN_DESCRIPTORS),
                served: vec![0; n],
            }),
            cv: Condvar::new(),
            wake: EventFd::new(EFD_NONBLOCK)?,
        });
        let queue_evts = (0..n)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        let worker = {
            let shared = shared.clone();
            let evts = queue_evts
                .iter()
                .map(EventFd::try_clone)
                .collect::<std::io::Result<Vec<_>>>()?;
            std::thread::Builder::new()
                .name(name)
                .spawn(move || worker(&shared, &evts))?
        };
        if transport.is_some_and(|s| s.interrupt_status != 0) {
            interrupt.signal_used();
        }
        // Chains the guest queued before a checkpoint are served now.
        let _ = shared.wake.write(1);
        Ok(Device {
            shared,
            queue_evts,
            interrupt,
            worker: Some(worker),
        })
    }

    /// The eventfd guest notifications of queue `i` should signal (registered as an ioeventfd
    /// by the machine), one per queue.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The eventfd of the device's interrupt line (registered as an irqfd).
    pub fn irq_fd(&self) -> &EventFd {
        self.interrupt.irq_fd()
    }

    /// A register read from the vCPU.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        self.shared.inner.lock().t.read(offset, data);
    }

    /// A register write from the vCPU (a queue notification written here rather than through
    /// an ioeventfd wakes the worker too).
    pub fn mmio_write(&self, offset: u64, data: &[u8]) {
        let notified = self.shared.inner.lock().t.write(offset, data);
        if let Some(q) = notified {
            let evt = self.queue_evts.get(q as usize).unwrap_or(&self.shared.wake);
            let _ = evt.write(1);
        }
    }

    /// Stops touching guest memory (for a consistent checkpoint) or starts again. Returns once
    /// the worker is between rounds, which are bounded by [`CHAINS_PER_ROUND`].
    pub fn set_paused(&self, paused: bool) {
        self.shared.inner.lock().paused = paused;
        if !paused {
            let _ = self.shared.wake.write(1);
        }
    }

    /// The transport's registers (pause first for a consistent snapshot).
    pub fn transport_state(&self) -> TransportState {
        self.shared.inner.lock().t.state()
    }

    /// The device behind its lock.
    pub fn lock(&self) -> MutexGuard<'_, Inner<D>> {
        self.shared.inner.lock()
    }

    /// What the worker shares with the host side of the device.
    pub fn shared(&self) -> &Arc<Shared<D>> {
        &self.shared
    }
}

impl<D: DeviceLogic> Drop for Device<D> {
    fn drop(&mut self) {
        self.shared.inner.lock().stopped = true;
        self.shared.cv.notify_all();
        let _ = self.shared.wake.write(1);
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

fn worker<D: DeviceLogic>(shared: &Shared<D>, queue_evts: &[EventFd]) {
    let evts: Vec<&EventFd> = queue_evts
        .iter()
        .chain(std::iter::once(&shared.wake))
        .collect();
    let mut fds: Vec<libc::pollfd> = evts
        .iter()
        .map(|e| libc::pollfd {
            fd: e.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `fds` is a valid array of pollfd of the given length, for the whole call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
        if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
        for e in &evts {
            let _ = e.read();
        }
        for f in &mut fds {
            f.revents = 0;
        }
        let mut g = shared.inner.lock();
        if g.stopped {
            return;
        }
        if g.paused || !g.t.is_active() {
            continue;
        }
        let more = g.round();
        drop(g);
        shared.cv.notify_all();
        if more {
            // Come back at once, after pause and stop were looked at again.
            let _ = shared.wake.write(1);
        }
    }
}
