//! virtio-blk: the guest's writable disk, backed by a copy-on-write overlay on the host.
//!
//! The disk's bytes are a private mapping ([`GuestRam`] reused as a disk image): a fresh disk
//! is anonymous zeroed memory, a restored one maps its snapshot's image and deltas
//! `MAP_PRIVATE`, so the guest's writes land in host memory and the snapshot files are never
//! written. Every write marks its 4 KiB blocks in the mapping's bitmap; a checkpoint stores just
//! those blocks as a delta layer (or the whole sparse image), consistently with guest RAM
//! because vCPU and devices are quiesced together.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use parking_lot::Mutex;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::mmio::{Interrupt, MmioTransport, TransportState, VirtioDevice};
use crate::vm::{GuestMemory, GuestRam};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH as T_FLUSH, VIRTIO_BLK_T_GET_ID as T_GET_ID,
    VIRTIO_BLK_T_IN as T_IN, VIRTIO_BLK_T_OUT as T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;

const QUEUE_SIZES: [u16; 1] = [256];
const SECTOR: u64 = 512;
const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
/// Largest single request the device serves (Linux splits larger ones).
const MAX_REQUEST: usize = 4 << 20;

/// The device as the transport sees it.
#[derive(Debug)]
pub struct Blk {
    sectors: u64,
}

impl VirtioDevice for Blk {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }
    fn features(&self) -> u64 {
        1 << VIRTIO_BLK_F_FLUSH
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Only `capacity` (u64, in 512-byte sectors) is offered.
        let cfg = self.sectors.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, _: u64, _: &[u8]) {}
    fn reset(&mut self) {}
}

/// The block device's state in a snapshot (its contents are a separate layer).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockState {
    pub transport: TransportState,
}

struct Inner {
    t: MmioTransport<Blk>,
    disk: GuestMemory,
    disk_size: u64,
    paused: bool,
    stopped: bool,
}

/// The device and its worker thread.
pub struct BlockDevice {
    inner: Arc<Mutex<Inner>>,
    queue_evt: EventFd,
    wake: Arc<EventFd>,
    disk: GuestRam,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for BlockDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockDevice")
            .field("size", &self.disk.size())
            .finish_non_exhaustive()
    }
}

impl BlockDevice {
    /// A disk over `disk` (whose size is a multiple of 4 KiB) for a guest with memory `mem`.
    pub fn new(
        mem: GuestMemory,
        disk: GuestRam,
        irq: EventFd,
        state: Option<&BlockState>,
    ) -> std::io::Result<BlockDevice> {
        let disk_size = disk.size() as u64;
        let mut t = MmioTransport::new(
            Blk {
                sectors: disk_size / SECTOR,
            },
            mem,
            Interrupt::new(irq),
        );
        if let Some(s) = state {
            t.restore(&s.transport)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        }
        let pending_irq = state.is_some_and(|s| s.transport.interrupt_status != 0);
        let inner = Arc::new(Mutex::new(Inner {
            t,
            disk: disk.memory().clone(),
            disk_size,
            paused: false,
            stopped: false,
        }));
        let queue_evt = EventFd::new(EFD_NONBLOCK)?;
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let worker = {
            let inner = inner.clone();
            let q = queue_evt.try_clone()?;
            let wake = wake.clone();
            std::thread::Builder::new()
                .name("dormant-blk".into())
                .spawn(move || worker(&inner, &q, &wake))?
        };
        if pending_irq {
            inner.lock().t.interrupt.signal_used();
        }
        // Requests the guest queued before a checkpoint are served now.
        let _ = queue_evt.write(1);
        Ok(BlockDevice {
            inner,
            queue_evt,
            wake,
            disk,
            worker: Some(worker),
        })
    }

    pub fn queue_evt(&self) -> &EventFd {
        &self.queue_evt
    }

    pub fn irq_fd(&self) -> EventFd {
        self.inner
            .lock()
            .t
            .interrupt
            .irq_fd()
            .try_clone()
            .expect("duplicate an eventfd")
    }

    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        self.inner.lock().t.read(offset, data);
    }

    pub fn mmio_write(&self, offset: u64, data: &[u8]) {
        if self.inner.lock().t.write(offset, data).is_some() {
            let _ = self.queue_evt.write(1);
        }
    }

    /// Stops (or restarts) serving requests, for a consistent checkpoint.
    pub fn set_paused(&self, paused: bool) {
        self.inner.lock().paused = paused;
        if !paused {
            let _ = self.queue_evt.write(1);
        }
    }

    pub fn state(&self) -> BlockState {
        BlockState {
            transport: self.inner.lock().t.state(),
        }
    }

    /// The disk's contents (read them while paused).
    pub fn disk(&self) -> &GuestRam {
        &self.disk
    }
}

impl Drop for BlockDevice {
    fn drop(&mut self) {
        self.inner.lock().stopped = true;
        let _ = self.wake.write(1);
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

fn worker(inner: &Mutex<Inner>, queue_evt: &EventFd, wake: &EventFd) {
    let mut fds = [
        libc::pollfd {
            fd: queue_evt.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd for the whole call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
        if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
        let _ = queue_evt.read();
        let _ = wake.read();
        let mut g = inner.lock();
        if g.stopped {
            return;
        }
        if g.paused || !g.t.is_active() {
            continue;
        }
        if process(&mut g) {
            g.t.interrupt.signal_used();
        }
    }
}

/// Serves every queued request. Returns whether buffers were used.
fn process(g: &mut Inner) -> bool {
    let mem = g.t.mem.clone();
    let mut used = false;
    while let Some(chain) = g.t.queues[0].pop_descriptor_chain(&mem) {
        let head = chain.head_index();
        let written = serve(g, &mem, chain).unwrap_or(0);
        let _ = g.t.queues[0].add_used(&mem, head, written);
        used = true;
    }
    used
}

/// One request; returns the bytes written into guest buffers (data + status).
fn serve(
    g: &Inner,
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
) -> Option<u32> {
    let mut r = chain.clone().reader(mem).ok()?;
    let mut w = chain.writer(mem).ok()?;
    let mut hdr = [0u8; 16];
    r.read_exact(&mut hdr).ok()?;
    let kind = u32::from_le_bytes(hdr[0..4].try_into().ok()?);
    let sector = u64::from_le_bytes(hdr[8..16].try_into().ok()?);
    let in_range = |len: usize| {
        sector
            .checked_mul(SECTOR)
            .and_then(|off| off.checked_add(len as u64).map(|end| (off, end)))
            .filter(|&(_, end)| end <= g.disk_size && len <= MAX_REQUEST)
            .map(|(off, _)| off)
    };
    let (status, data_len) = match kind {
        T_IN => {
            let len = w.available_bytes().saturating_sub(1);
            match in_range(len) {
                Some(off) => {
                    let mut buf = vec![0u8; len];
                    if g.disk.read_slice(&mut buf, GuestAddress(off)).is_ok()
                        && w.write_all(&buf).is_ok()
                    {
                        (S_OK, len)
                    } else {
                        (S_IOERR, 0)
                    }
                }
                None => (S_IOERR, 0),
            }
        }
        T_OUT => {
            let len = r.available_bytes();
            match in_range(len) {
                Some(off) => {
                    let mut buf = vec![0u8; len];
                    if r.read_exact(&mut buf).is_ok()
                        && g.disk.write_slice(&buf, GuestAddress(off)).is_ok()
                    {
                        (S_OK, 0)
                    } else {
                        (S_IOERR, 0)
                    }
                }
                None => (S_IOERR, 0),
            }
        }
        // Writes land in host memory at once and reach disk only in a checkpoint.
        T_FLUSH => (S_OK, 0),
        T_GET_ID => {
            let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
            id[..12].copy_from_slice(b"dormant-disk");
            let n = w.available_bytes().saturating_sub(1).min(id.len());
            if w.write_all(&id[..n]).is_ok() {
                (S_OK, n)
            } else {
                (S_IOERR, 0)
            }
        }
        _ => (S_UNSUPP, 0),
    };
    // The status byte is the last byte of the writable part: skip whatever precedes it.
    let pad = w.available_bytes().saturating_sub(1);
    if pad > 0 {
        let _ = w.write_all(&vec![0u8; pad]);
    }
    w.write_all(&[status]).ok()?;
    Some((data_len + pad + 1) as u32)
}
