//! virtio-blk: the guest's writable disk, backed by a copy-on-write overlay on the host.
//!
//! The disk's bytes are a private mapping ([`GuestRam`] reused as a disk image): a fresh disk
//! is anonymous zeroed memory, a restored one maps its snapshot's image and deltas
//! `MAP_PRIVATE`, so the guest's writes land in host memory and the snapshot files are never
//! written. Every write marks its 4 KiB blocks in the mapping's bitmap; a checkpoint stores just
//! those blocks as a delta layer (or the whole sparse image), consistently with guest RAM
//! because vCPU and devices are quiesced together.

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use vmm_sys_util::eventfd::EventFd;

use super::device::{Chain, Device, DeviceLogic, Queues, Request};
use super::mmio::{TransportState, VirtioDevice};
use crate::persist::Persist;
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
/// A request's header: type, reserved, sector.
const HEADER: usize = 16;

/// The device model: the disk's size and its contents.
#[derive(Debug)]
pub struct Blk {
    sectors: u64,
    disk: GuestMemory,
    disk_size: u64,
    /// Bytes of the `WRITE` requests served (shared with [`BlockDevice::bytes_written`]).
    written: Arc<AtomicU64>,
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

impl DeviceLogic for Blk {
    /// A header and the data of a `WRITE`.
    const MAX_READABLE: usize = HEADER + MAX_REQUEST;
    /// The data of a `READ` and the status byte.
    const MAX_WRITABLE: usize = MAX_REQUEST + 1;

    fn process(&mut self, queues: &mut Queues<'_>) {
        while queues.serve(0, |c| match c {
            Chain::Request(req) => self.serve(req).unwrap_or(0),
            Chain::OverCaps(req) => refuse(req),
        }) {}
    }
}

/// The block device's state in a snapshot (its contents are a separate layer).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockState {
    pub transport: TransportState,
}

/// The device and its worker thread.
pub struct BlockDevice {
    dev: Device<Blk>,
    disk: GuestRam,
    written: Arc<AtomicU64>,
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
        let written = Arc::new(AtomicU64::new(0));
        let blk = Blk {
            sectors: disk_size / SECTOR,
            disk: disk.memory().clone(),
            disk_size,
            written: written.clone(),
        };
        let dev = Device::new(
            "dormant-blk".into(),
            blk,
            mem,
            irq,
            state.map(|s| &s.transport),
        )?;
        Ok(BlockDevice { dev, disk, written })
    }

    /// The eventfd of the request queue's notifications (registered as an ioeventfd).
    pub fn queue_evt(&self) -> &EventFd {
        &self.dev.queue_evts()[0]
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

    /// Stops (or restarts) serving requests, for a consistent checkpoint.
    pub fn set_paused(&self, paused: bool) {
        self.dev.set_paused(paused);
    }

    /// The device's state (pause first for a consistent snapshot).
    pub fn state(&self) -> BlockState {
        BlockState {
            transport: self.dev.transport_state(),
        }
    }

    /// Bytes the guest has written to the disk through this device (the data of its
    /// successful `WRITE` requests; a restored device starts at zero).
    pub fn bytes_written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// The disk's contents (read them while paused).
    pub fn disk(&self) -> &GuestRam {
        &self.disk
    }
}

/// A request longer than the device serves: `IOERR` in its status byte, the last of its
/// writable part, which is skipped to (not zeroed); the used length counts the whole part, as
/// for any answer.
fn refuse(req: &mut Request<'_>) -> u32 {
    let w = &mut req.writer;
    let room = w.available();
    if room == 0 || w.skip(room - 1).is_err() || w.write_all(&[S_IOERR]).is_err() {
        return 0;
    }
    u32::try_from(room).unwrap_or(u32::MAX)
}

impl Blk {
    /// One request; returns the bytes written into guest buffers (data + status). Data goes
    /// straight between the guest's buffers and the disk mapping: nothing is allocated.
    fn serve(&self, req: &mut Request<'_>) -> Option<u32> {
        let Request {
            reader: r,
            writer: w,
        } = req;
        let mut hdr = [0u8; HEADER];
        r.read_exact(&mut hdr).ok()?;
        let kind = u32::from_le_bytes(hdr[0..4].try_into().ok()?);
        let sector = u64::from_le_bytes(hdr[8..16].try_into().ok()?);
        let in_range = |len: usize| {
            sector
                .checked_mul(SECTOR)
                .and_then(|off| off.checked_add(len as u64).map(|end| (off, end)))
                .filter(|&(_, end)| end <= self.disk_size && len <= MAX_REQUEST)
                .map(|(off, _)| off)
        };
        let (status, data_len) = match kind {
            T_IN => {
                let len = w.available().saturating_sub(1);
                match in_range(len) {
                    Some(off) if w.copy_from(&self.disk, off, len).is_ok() => (S_OK, len),
                    _ => (S_IOERR, 0),
                }
            }
            T_OUT => {
                let len = r.available();
                match in_range(len) {
                    Some(off) if r.copy_to(&self.disk, off, len).is_ok() => {
                        self.written.fetch_add(len as u64, Ordering::Relaxed);
                        (S_OK, 0)
                    }
                    _ => (S_IOERR, 0),
                }
            }
            // Writes land in host memory at once and reach disk only in a checkpoint.
            T_FLUSH => (S_OK, 0),
            T_GET_ID => {
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
                id[..12].copy_from_slice(b"dormant-disk");
                let n = w.available().saturating_sub(1).min(id.len());
                if w.write_all(&id[..n]).is_ok() {
                    (S_OK, n)
                } else {
                    (S_IOERR, 0)
                }
            }
            _ => (S_UNSUPP, 0),
        };
        // The status byte is the last byte of the writable part: zero whatever precedes it
        // (at most MAX_REQUEST bytes, the shell's cap), from a static block.
        let pad = w.available().saturating_sub(1);
        let _ = w.write_zeros(pad);
        w.write_all(&[status]).ok()?;
        Some((data_len + pad + 1) as u32)
    }
}
/// The disk device's transport ([`BlockState`]; the disk's contents are a snapshot layer of
/// their own); restoring needs the new guest's memory, the restored disk and the interrupt line.
impl Persist for BlockDevice {
    type State = BlockState;
    type Context<'a> = (GuestMemory, GuestRam, EventFd);
    type Error = std::io::Error;

    fn save(&self) -> std::io::Result<BlockState> {
        Ok(self.state())
    }

    fn restore(
        (mem, disk, irq): (GuestMemory, GuestRam, EventFd),
        state: &BlockState,
    ) -> std::io::Result<Self> {
        BlockDevice::new(mem, disk, irq, Some(state))
    }
}
