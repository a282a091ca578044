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

use std::os::fd::AsRawFd;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex, MutexGuard};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::mmio::{Interrupt, MmioTransport, TransportState, VirtioDevice};
use crate::vm::GuestMemory;

/// The most descriptors a chain may have, indirect ones included (the largest queue any of our
/// devices offers; Linux's chains for them have a few dozen at most).
pub const MAX_CHAIN_DESCRIPTORS: usize = 256;
/// The most chains served from one queue per wakeup of the worker before it checks pause and
/// stop again.
pub const CHAINS_PER_ROUND: usize = 64;
/// No device allocates a buffer sized by what the guest claims (a chain's lengths, a length
/// field in a request) above this many bytes in one piece, whatever it claims: the largest are
/// virtio-fs's request and reply (see [`crate::volume::MAX_IO`]) and a vsock connection's
/// receive buffer. The volume server's tables, which grow with what the guest opens, have caps
/// of their own ([`crate::volume::MAX_NODES`], [`crate::volume::MAX_HANDLES`],
/// [`crate::volume::MAX_CACHED_ENTRIES`]).
pub const GUEST_ALLOCATION_BOUND: usize = 512 << 10;

/// A zeroed block to fill guest buffers from without allocating.
static ZEROS: [u8; 4096] = [0; 4096];

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

/// One descriptor of a chain, as read once from guest memory.
#[derive(Debug, Clone, Copy, Default)]
struct Desc {
    addr: u64,
    len: u32,
}

/// Why a chain was returned to the guest unserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    TooManyDescriptors,
    OutsideMemory,
    ReadableAfterWritable,
}

/// A chain's descriptors as read: how many are readable (they come first), and whether their
/// lengths are over the device's caps.
#[derive(Debug, Clone, Copy)]
struct Collected {
    readable: usize,
    over_caps: bool,
}

/// Reads the chain's descriptors into `descs` (at most [`MAX_CHAIN_DESCRIPTORS`]) and checks
/// them.
fn collect<M>(
    chain: virtio_queue::DescriptorChain<M>,
    mem: &GuestMemory,
    descs: &mut Vec<Desc>,
    max_readable: usize,
    max_writable: usize,
) -> Result<Collected, Refused>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    descs.clear();
    let (mut readable, mut writable) = (0u64, 0u64);
    let mut n_readable = 0;
    // virtio-queue ends the iteration after `queue size` descriptors (an indirect table's
    // length inside one), so even a loop ends; `take` makes it end at our cap.
    for d in chain.take(MAX_CHAIN_DESCRIPTORS + 1) {
        if descs.len() == MAX_CHAIN_DESCRIPTORS {
            return Err(Refused::TooManyDescriptors);
        }
        if !GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize) {
            return Err(Refused::OutsideMemory);
        }
        if d.is_write_only() {
            writable += u64::from(d.len());
        } else {
            if descs.len() > n_readable {
                return Err(Refused::ReadableAfterWritable);
            }
            readable += u64::from(d.len());
            n_readable += 1;
        }
        descs.push(Desc {
            addr: d.addr().0,
            len: d.len(),
        });
    }
    Ok(Collected {
        readable: n_readable,
        over_caps: readable > max_readable as u64 || writable > max_writable as u64,
    })
}

/// A position in a list of descriptors.
#[derive(Debug)]
struct Cursor<'a> {
    mem: &'a GuestMemory,
    descs: &'a [Desc],
    /// Index of the current descriptor and offset in it.
    idx: usize,
    off: u32,
    left: usize,
    done: usize,
}

impl<'a> Cursor<'a> {
    fn new(mem: &'a GuestMemory, descs: &'a [Desc]) -> Cursor<'a> {
        Cursor {
            mem,
            descs,
            idx: 0,
            off: 0,
            left: descs.iter().map(|d| d.len as usize).sum(),
            done: 0,
        }
    }

    /// The next contiguous piece of at most `max` bytes (guest address, length), consumed.
    fn next_piece(&mut self, max: usize) -> Option<(GuestAddress, usize)> {
        while let Some(d) = self.descs.get(self.idx) {
            let rest = (d.len - self.off) as usize;
            if rest == 0 {
                self.idx += 1;
                self.off = 0;
                continue;
            }
            let n = rest.min(max);
            if n == 0 {
                return None;
            }
            let at = GuestAddress(d.addr + u64::from(self.off));
            // `n <= rest <= u32::MAX`.
            self.off += n as u32;
            self.left -= n;
            self.done += n;
            return Some((at, n));
        }
        None
    }

    /// Moves `n` bytes on without touching them; fails if fewer are left.
    fn skip(&mut self, mut n: usize) -> std::io::Result<()> {
        if n > self.left {
            return Err(short());
        }
        while n > 0 {
            let Some((_, k)) = self.next_piece(n) else {
                return Err(short());
            };
            n -= k;
        }
        Ok(())
    }
}

fn short() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "the descriptor chain is shorter",
    )
}

fn memory_error(e: impl std::error::Error + Send + Sync + 'static) -> std::io::Error {
    std::io::Error::other(e)
}

/// The readable part of a chain (what the guest sent), read front to back.
#[derive(Debug)]
pub struct ChainReader<'a>(Cursor<'a>);

/// The writable part of a chain (room for the device's answer), written front to back.
#[derive(Debug)]
pub struct ChainWriter<'a>(Cursor<'a>);

impl ChainReader<'_> {
    /// Bytes not read yet.
    pub fn available(&self) -> usize {
        self.0.left
    }

    /// Copies the next `len` bytes straight into `dst` at `at` (another mapping, such as a
    /// disk), piece by piece, without a buffer; `dst`'s dirty bitmap records the write.
    pub fn copy_to(&mut self, dst: &GuestMemory, at: u64, len: usize) -> std::io::Result<()> {
        if len > self.available() {
            return Err(short());
        }
        let mut done = 0u64;
        while let Some((src, n)) = self.0.next_piece(len - done as usize) {
            let s = self.0.mem.get_slice(src, n).map_err(memory_error)?;
            let d = dst
                .get_slice(GuestAddress(at + done), n)
                .map_err(memory_error)?;
            s.copy_to_volatile_slice(d);
            done += n as u64;
        }
        Ok(())
    }
}

impl std::io::Read for ChainReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            let Some((at, n)) = self.0.next_piece(buf.len() - done) else {
                break;
            };
            vm_memory::Bytes::read_slice(self.0.mem, &mut buf[done..done + n], at)
                .map_err(memory_error)?;
            done += n;
        }
        Ok(done)
    }
}

impl ChainWriter<'_> {
    /// Room left, in bytes.
    pub fn available(&self) -> usize {
        self.0.left
    }

    /// Bytes written (or skipped) so far.
    pub fn written(&self) -> usize {
        self.0.done
    }

    /// Writes `n` zero bytes, in bounded pieces.
    pub fn write_zeros(&mut self, mut n: usize) -> std::io::Result<()> {
        use std::io::Write;
        while n > 0 {
            let k = n.min(ZEROS.len());
            self.write_all(&ZEROS[..k])?;
            n -= k;
        }
        Ok(())
    }

    /// Moves `n` bytes on without writing them.
    pub fn skip(&mut self, n: usize) -> std::io::Result<()> {
        self.0.skip(n)
    }

    /// Copies `len` bytes from `src` at `at` (another mapping, such as a disk) straight into
    /// the chain, piece by piece, without a buffer; guest memory's dirty bitmap records it.
    pub fn copy_from(&mut self, src: &GuestMemory, at: u64, len: usize) -> std::io::Result<()> {
        if len > self.available() {
            return Err(short());
        }
        let mut done = 0u64;
        while let Some((dst, n)) = self.0.next_piece(len - done as usize) {
            let d = self.0.mem.get_slice(dst, n).map_err(memory_error)?;
            let s = src
                .get_slice(GuestAddress(at + done), n)
                .map_err(memory_error)?;
            s.copy_to_volatile_slice(d);
            done += n as u64;
        }
        Ok(())
    }
}

impl std::io::Write for ChainWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            let Some((at, n)) = self.0.next_piece(buf.len() - done) else {
                break;
            };
            vm_memory::Bytes::write_slice(self.0.mem, &buf[done..done + n], at)
                .map_err(memory_error)?;
            done += n;
        }
        Ok(done)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One chain, its descriptors checked by the shell: what the guest sent and the room for the
/// answer.
#[derive(Debug)]
pub struct Request<'a> {
    /// The readable part: what the guest sent.
    pub reader: ChainReader<'a>,
    /// The writable part: room for the answer.
    pub writer: ChainWriter<'a>,
}

/// A chain the shell hands a device.
#[derive(Debug)]
pub enum Chain<'r, 'a> {
    /// Within the device's caps: serve it.
    Request(&'r mut Request<'a>),
    /// Sound descriptors, but longer than the device's caps: not to be served. The device may
    /// still answer it in a few bytes (an error status where the guest looks for one), reading
    /// no more than a request's header.
    OverCaps(&'r mut Request<'a>),
}

/// The device's queues during one round of work (see [`DeviceLogic::process`]).
#[derive(Debug)]
pub struct Queues<'a> {
    queues: &'a mut [Queue],
    mem: &'a GuestMemory,
    descs: &'a mut Vec<Desc>,
    served: &'a mut [usize],
    max_readable: usize,
    max_writable: usize,
    used: bool,
    more: bool,
    refused: u64,
}

impl Queues<'_> {
    /// Takes the next chain of queue `q` and lets `serve` answer it (`serve` returns the bytes
    /// it wrote into the guest's buffers); the chain then goes back to the guest as used. A
    /// chain whose descriptors are unsound (too many, outside guest memory, readable after
    /// writable) goes back unserved, `serve` not called; one longer than the device's caps
    /// comes as [`Chain::OverCaps`]. Returns `false` when there is no chain, or this round's
    /// share of `q` is used up.
    pub fn serve(&mut self, q: usize, serve: impl FnOnce(Chain<'_, '_>) -> u32) -> bool {
        let (Some(queue), Some(served)) = (self.queues.get_mut(q), self.served.get_mut(q)) else {
            return false;
        };
        if *served >= CHAINS_PER_ROUND {
            self.more = true;
            return false;
        }
        let mem = self.mem;
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            return false;
        };
        *served += 1;
        let head = chain.head_index();
        let written = match collect(chain, mem, self.descs, self.max_readable, self.max_writable) {
            Ok(c) => {
                let (r, w) = self.descs.split_at(c.readable);
                let mut req = Request {
                    reader: ChainReader(Cursor::new(mem, r)),
                    writer: ChainWriter(Cursor::new(mem, w)),
                };
                if c.over_caps {
                    self.refused += 1;
                    tracing::debug!(queue = q, "virtio chain over the device's caps");
                    serve(Chain::OverCaps(&mut req))
                } else {
                    serve(Chain::Request(&mut req))
                }
            }
            Err(why) => {
                self.refused += 1;
                tracing::debug!(?why, queue = q, "virtio chain returned unserved");
                0
            }
        };
        // A head index outside the queue is refused by virtio-queue; nothing to give back.
        let _ = queue.add_used(mem, head, written);
        self.used = true;
        true
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::GuestRam;
    use std::io::{Read, Write};
    use virtio_bindings::virtio_mmio::*;
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use vm_memory::{Address, Bytes};

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
    const SIZE: u16 = 16;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const TABLE: u64 = 0x4000;
    const BUF: u64 = 0x10_0000;

    /// Records what it was handed, answers with a marker byte, and (as a guest that keeps its
    /// avail ring full would) puts every chain it serves back on the ring.
    #[derive(Debug, Default)]
    struct Probe {
        seen: Vec<(usize, usize, Vec<u8>)>,
        over_caps: Vec<(usize, usize)>,
        refill: Option<GuestMemory>,
    }

    impl VirtioDevice for Probe {
        fn device_type(&self) -> u32 {
            42
        }
        fn features(&self) -> u64 {
            0
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[SIZE]
        }
        fn read_config(&self, _: u64, _: &mut [u8]) {}
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn reset(&mut self) {}
    }

    impl DeviceLogic for Probe {
        const MAX_READABLE: usize = 4096;
        const MAX_WRITABLE: usize = 8192;
        fn process(&mut self, queues: &mut Queues<'_>) {
            while queues.serve(0, |c| {
                let req = match c {
                    Chain::Request(req) => req,
                    Chain::OverCaps(req) => {
                        let lens = (req.reader.available(), req.writer.available());
                        self.over_caps.push(lens);
                        return 0;
                    }
                };
                let (r, w) = (req.reader.available(), req.writer.available());
                let mut head = vec![0u8; r.min(8)];
                req.reader.read_exact(&mut head).unwrap();
                self.seen.push((r, w, head));
                if w > 0 {
                    req.writer.write_all(&[0xab]).unwrap();
                }
                if let Some(mem) = &self.refill {
                    let idx: u16 = mem.read_obj(GuestAddress(AVAIL + 2)).unwrap();
                    mem.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * u64::from(idx % SIZE)))
                        .unwrap();
                    mem.write_obj(idx.wrapping_add(1), GuestAddress(AVAIL + 2))
                        .unwrap();
                }
                w.min(1) as u32
            }) {}
        }
    }

    fn desc(mem: &GuestMemory, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(table + 16 * u64::from(i));
        mem.write_obj(addr, at).unwrap();
        mem.write_obj(len, at.unchecked_add(8)).unwrap();
        mem.write_obj(flags, at.unchecked_add(12)).unwrap();
        mem.write_obj(next, at.unchecked_add(14)).unwrap();
    }

    /// Makes chain `head` available.
    fn publish(mem: &GuestMemory, head: u16) {
        let idx: u16 = mem.read_obj(GuestAddress(AVAIL + 2)).unwrap();
        mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * u64::from(idx % SIZE)))
            .unwrap();
        mem.write_obj(idx.wrapping_add(1), GuestAddress(AVAIL + 2))
            .unwrap();
    }

    fn used(mem: &GuestMemory) -> Vec<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        (0..idx)
            .map(|i| {
                let at = USED + 4 + 8 * u64::from(i % SIZE);
                (
                    mem.read_obj(GuestAddress(at)).unwrap(),
                    mem.read_obj(GuestAddress(at + 4)).unwrap(),
                )
            })
            .collect()
    }

    fn reg(write: &mut dyn FnMut(u64, &[u8]), off: u32, v: u32) {
        write(u64::from(off), &v.to_le_bytes());
    }

    /// What a driver does to bring queue 0 up, through the registers.
    fn bring_up(write: &mut dyn FnMut(u64, &[u8])) {
        reg(write, VIRTIO_MMIO_STATUS, 1 | 2);
        reg(write, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        reg(write, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        reg(write, VIRTIO_MMIO_STATUS, 1 | 2 | 8);
        reg(write, VIRTIO_MMIO_QUEUE_SEL, 0);
        reg(write, VIRTIO_MMIO_QUEUE_NUM, u32::from(SIZE));
        reg(write, VIRTIO_MMIO_QUEUE_DESC_LOW, DESC as u32);
        reg(write, VIRTIO_MMIO_QUEUE_AVAIL_LOW, AVAIL as u32);
        reg(write, VIRTIO_MMIO_QUEUE_USED_LOW, USED as u32);
        reg(write, VIRTIO_MMIO_QUEUE_READY, 1);
        reg(write, VIRTIO_MMIO_STATUS, 1 | 2 | 8 | 4);
    }

    /// A device without its worker: rounds are run by the test.
    fn inner(ram: &GuestRam, probe: Probe) -> Inner<Probe> {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut t = MmioTransport::new(probe, ram.memory().clone(), Interrupt::new(irq));
        bring_up(&mut |off, data| {
            t.write(off, data);
        });
        assert!(t.is_active());
        Inner {
            t,
            paused: false,
            stopped: false,
            refused: 0,
            descs: Vec::new(),
            served: vec![0],
        }
    }

    #[test]
    fn chains_reach_the_device_read_once_and_within_its_caps() {
        let ram = GuestRam::anonymous(4 << 20).unwrap();
        let mem = ram.memory();
        let mut d = inner(&ram, Probe::default());
        mem.write_slice(b"headers!", GuestAddress(BUF)).unwrap();
        // 0: a plain request, 8 readable bytes and 100 writable.
        desc(mem, DESC, 0, BUF, 8, NEXT, 1);
        desc(mem, DESC, 1, BUF + 0x1000, 100, WRITE, 0);
        publish(mem, 0);
        // 2: a descriptor that loops onto itself: virtio-queue ends it after `SIZE`.
        desc(mem, DESC, 2, BUF, 8, NEXT, 2);
        publish(mem, 2);
        // 3: a loop that would be over the readable cap (16 * 512 > 4096): refused.
        desc(mem, DESC, 3, BUF, 512, NEXT, 3);
        publish(mem, 3);
        // 4: outside guest memory.
        desc(mem, DESC, 4, 1 << 40, 8, 0, 0);
        publish(mem, 4);
        // 5: readable after writable.
        desc(mem, DESC, 5, BUF, 8, NEXT | WRITE, 6);
        desc(mem, DESC, 6, BUF, 8, 0, 0);
        publish(mem, 5);
        // 7: an indirect table longer than the cap (it may hold 65535 descriptors).
        let n = MAX_CHAIN_DESCRIPTORS as u16 + 1;
        for i in 0..n {
            desc(
                mem,
                TABLE,
                i,
                BUF,
                1,
                if i + 1 < n { NEXT } else { 0 },
                i + 1,
            );
        }
        desc(mem, DESC, 7, TABLE, u32::from(n) * 16, INDIRECT, 0);
        publish(mem, 7);
        // 8: an indirect table at the cap, writable, each descriptor 32 bytes: served.
        let n = MAX_CHAIN_DESCRIPTORS as u16;
        for i in 0..n {
            let f = WRITE | if i + 1 < n { NEXT } else { 0 };
            desc(mem, TABLE + 0x2000, i, BUF, 32, f, i + 1);
        }
        desc(mem, DESC, 8, TABLE + 0x2000, u32::from(n) * 16, INDIRECT, 0);
        publish(mem, 8);
        // 9: writable part over the cap (two descriptors of 8 KiB).
        desc(mem, DESC, 9, BUF, 8192, WRITE | NEXT, 10);
        desc(mem, DESC, 10, BUF, 8192, WRITE, 0);
        publish(mem, 9);

        assert!(!d.round(), "fewer chains than a round's share");
        assert_eq!(
            d.seen,
            vec![
                (8, 100, b"headers!".to_vec()),
                (8 * SIZE as usize, 0, b"headers!".to_vec()),
                (0, 32 * MAX_CHAIN_DESCRIPTORS, vec![]),
            ]
        );
        // The chains over the caps reach the device as such, whole.
        assert_eq!(d.over_caps, vec![(16 * 512, 0), (0, 16384)]);
        assert_eq!(d.refused, 5);
        // Every chain went back to the guest, the refused ones with nothing written.
        assert_eq!(
            used(mem),
            vec![
                (0, 1),
                (2, 0),
                (3, 0),
                (4, 0),
                (5, 0),
                (7, 0),
                (8, 1),
                (9, 0)
            ]
        );
        let mut b = [0u8; 1];
        mem.read_slice(&mut b, GuestAddress(BUF + 0x1000)).unwrap();
        assert_eq!(b, [0xab]);
        // The device's write is in guest memory's dirty bitmap (a checkpoint stores it).
        assert!(
            ram.take_device_dirty_pages()
                .contains(&(((BUF + 0x1000) / 4096) as u32))
        );
    }

    #[test]
    fn a_round_serves_a_bounded_share_of_a_queue_the_guest_keeps_full() {
        let ram = GuestRam::anonymous(4 << 20).unwrap();
        let mem = ram.memory();
        let mut d = inner(
            &ram,
            Probe {
                refill: Some(mem.clone()),
                ..Probe::default()
            },
        );
        desc(mem, DESC, 0, BUF, 8, 0, 0);
        publish(mem, 0);
        assert!(d.round(), "more is left");
        assert_eq!(d.seen.len(), CHAINS_PER_ROUND);
        assert!(d.round());
        assert_eq!(d.seen.len(), 2 * CHAINS_PER_ROUND);
    }

    #[test]
    fn pause_and_stop_are_not_starved_by_a_guest_that_keeps_its_queue_full() {
        let ram = GuestRam::anonymous(4 << 20).unwrap();
        let mem = ram.memory().clone();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let probe = Probe {
            refill: Some(mem.clone()),
            ..Probe::default()
        };
        let dev = Device::new("probe".into(), probe, mem.clone(), irq, None).unwrap();
        bring_up(&mut |off, data| dev.mmio_write(off, data));
        desc(&mem, DESC, 0, BUF, 8, 0, 0);
        publish(&mem, 0);
        reg(
            &mut |off, data| dev.mmio_write(off, data),
            VIRTIO_MMIO_QUEUE_NOTIFY,
            0,
        );
        // The worker now serves forever; pause and drop must still get through.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
            while dev.lock().seen.len() < 3 * CHAINS_PER_ROUND {
                assert!(std::time::Instant::now() < deadline, "the worker serves");
                std::thread::yield_now();
            }
            dev.set_paused(true);
            let n = dev.lock().seen.len();
            dev.set_paused(true);
            assert_eq!(dev.lock().seen.len(), n, "nothing is served while paused");
            dev.set_paused(false);
            drop(dev);
            tx.send(()).unwrap();
        });
        rx.recv_timeout(std::time::Duration::from_secs(120))
            .expect("pause and stop got through within two minutes");
    }
}
