//! virtio-fs: a volume slot. The guest's `virtiofs` driver sends FUSE requests on the request
//! queue (and `FORGET`s on the high-priority queue); the device's worker thread answers them
//! from the [`VolumeServer`] attached to the slot.
//!
//! A machine has a fixed number of slots, present from boot (the guest learns its devices only
//! then), each with the tag `dormant<N>`. A sandbox attaches host directories to slots when it
//! is created or resumed; an unattached slot answers every request with `ENODEV`.

use std::io::{Read, Write};

use vmm_sys_util::eventfd::EventFd;

use super::device::{Chain, Device, DeviceLogic, Queues, Request};
use super::mmio::{TransportState, VirtioDevice};
use crate::persist::Persist;
use crate::vm::GuestMemory;
use crate::volume::{BATCH_FORGET, FORGET, InHeader, MAX_IO, OutHeader, VolumeServer, VolumeState};

/// The virtio device id of a file system device.
const VIRTIO_ID_FS: u32 = 26;
/// High-priority queue, then one request queue.
const QUEUE_SIZES: [u16; 2] = [128, 256];
/// Longest tag in the config space.
const TAG_LEN: usize = 36;
/// Largest request accepted (a `WRITE` of [`MAX_IO`] plus its headers).
const MAX_REQUEST: usize = MAX_IO as usize + 4096;

/// The tag of slot `n`, which the guest mounts (`mount -t virtiofs dormant0 /mnt`).
pub fn tag(n: usize) -> String {
    format!("dormant{n}")
}

/// The device model: the slot's tag and the volume attached to it.
#[derive(Debug)]
pub struct Fs {
    tag: [u8; TAG_LEN],
    server: Option<VolumeServer>,
    /// Reused request and reply buffers (at most [`MAX_REQUEST`] bytes each).
    request: Vec<u8>,
    reply: Vec<u8>,
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }
    fn features(&self) -> u64 {
        0
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_fs_config { u8 tag[36]; le32 num_request_queues; }
        let mut cfg = [0u8; TAG_LEN + 4];
        cfg[..TAG_LEN].copy_from_slice(&self.tag);
        cfg[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, _: u64, _: &[u8]) {}
    fn reset(&mut self) {}
}

impl DeviceLogic for Fs {
    /// A request (Linux sends at most a `WRITE` of [`MAX_IO`] with its headers); a longer one
    /// is answered `E2BIG` from its header alone.
    const MAX_READABLE: usize = MAX_REQUEST;
    /// Room for a reply (at most a `READ` of [`MAX_IO`] with its header).
    const MAX_WRITABLE: usize = MAX_REQUEST;

    fn process(&mut self, queues: &mut Queues<'_>) {
        for q in 0..QUEUE_SIZES.len() {
            while queues.serve(q, |c| match c {
                Chain::Request(req) => self.serve(req).unwrap_or(0),
                Chain::OverCaps(req) => self.refuse(req).unwrap_or(0),
            }) {}
        }
    }
}

/// A volume slot's state in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FsState {
    pub transport: TransportState,
    /// What the guest held of the attached volume, if one was attached.
    #[serde(default)]
    pub volume: Option<VolumeState>,
}

/// A host directory to attach to a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeAttach {
    pub host: std::path::PathBuf,
    pub read_only: bool,
}

/// The device and its worker thread.
pub struct FsDevice {
    dev: Device<Fs>,
}

impl std::fmt::Debug for FsDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsDevice").finish_non_exhaustive()
    }
}

impl FsDevice {
    /// Slot `n` for a guest with memory `mem`, serving `volume` if given. `state` is the
    /// slot's state in a snapshot being restored.
    pub fn new(
        n: usize,
        mem: GuestMemory,
        irq: EventFd,
        volume: Option<&VolumeAttach>,
        state: Option<&FsState>,
    ) -> std::io::Result<FsDevice> {
        let mut tag_bytes = [0u8; TAG_LEN];
        let t = tag(n);
        tag_bytes[..t.len()].copy_from_slice(t.as_bytes());
        let server = volume
            .map(|v| {
                VolumeServer::open(&v.host, v.read_only, state.and_then(|s| s.volume.as_ref()))
            })
            .transpose()?;
        let fs = Fs {
            tag: tag_bytes,
            server,
            request: Vec::new(),
            reply: Vec::new(),
        };
        let dev = Device::new(
            format!("dormant-fs{n}"),
            fs,
            mem,
            irq,
            state.map(|s| &s.transport),
        )?;
        Ok(FsDevice { dev })
    }

    /// The eventfds of the queues' notifications (registered as ioeventfds).
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

    /// Stops (or restarts) serving requests, for a consistent checkpoint.
    pub fn set_paused(&self, paused: bool) {
        self.dev.set_paused(paused);
    }

    /// The slot's state (pause first for a consistent snapshot).
    pub fn state(&self) -> FsState {
        let g = self.dev.lock();
        FsState {
            transport: g.t.state(),
            volume: g.server.as_ref().map(VolumeServer::state),
        }
    }
}

impl Fs {
    /// A request longer than the device serves: never read whole, answered `E2BIG` from its
    /// header, if the guest left room for that.
    fn refuse(&mut self, req: &mut Request<'_>) -> Option<u32> {
        let Request {
            reader: r,
            writer: w,
        } = req;
        let mut hdr = [0u8; size_of::<InHeader>()];
        r.read_exact(&mut hdr).ok()?;
        error_reply(&hdr, libc::E2BIG, &mut self.reply);
        if self.reply.is_empty() || self.reply.len() > w.available() {
            return Some(0);
        }
        w.write_all(&self.reply).ok()?;
        Some(self.reply.len() as u32)
    }

    /// One FUSE request (the shell keeps it within [`MAX_REQUEST`]); returns the bytes written
    /// into the guest's buffers.
    fn serve(&mut self, req: &mut Request<'_>) -> Option<u32> {
        let Request {
            reader: r,
            writer: w,
        } = req;
        let Fs {
            server,
            request,
            reply,
            ..
        } = self;
        reply.clear();
        request.resize(r.available().min(MAX_REQUEST), 0);
        r.read_exact(request).ok()?;
        match server {
            Some(s) => s.handle(request, reply),
            None => error_reply(request, libc::ENODEV, reply),
        }
        if reply.is_empty() {
            return Some(0);
        }
        if reply.len() > w.available() {
            // The guest left no room for the answer: say so in the header, if that fits.
            let mut hdr = [0u8; size_of::<OutHeader>()];
            hdr.copy_from_slice(reply.get(..size_of::<OutHeader>())?);
            error_reply_from_out(&hdr, libc::EOVERFLOW, reply);
            if reply.len() > w.available() {
                return Some(0);
            }
        }
        w.write_all(reply).ok()?;
        Some(reply.len() as u32)
    }
}

/// An error reply to the request whose header starts `req` (none for `FORGET`s).
fn error_reply(req: &[u8], errno: i32, reply: &mut Vec<u8>) {
    use zerocopy::FromBytes;
    reply.clear();
    let Ok((h, _)) = InHeader::read_from_prefix(req) else {
        return;
    };
    // Forgets have no reply.
    if h.opcode == FORGET || h.opcode == BATCH_FORGET {
        return;
    }
    push_error(h.unique, errno, reply);
}

fn error_reply_from_out(out: &[u8], errno: i32, reply: &mut Vec<u8>) {
    use zerocopy::FromBytes;
    reply.clear();
    if let Ok((h, _)) = OutHeader::read_from_prefix(out) {
        push_error(h.unique, errno, reply);
    }
}

fn push_error(unique: u64, errno: i32, reply: &mut Vec<u8>) {
    use zerocopy::IntoBytes;
    reply.extend_from_slice(
        OutHeader {
            len: size_of::<OutHeader>() as u32,
            error: -errno,
            unique,
        }
        .as_bytes(),
    );
}
/// A volume slot's transport and its volume server's state ([`FsState`]; the volume's files
/// are host directories in no snapshot); restoring needs the slot's number, the new guest's
/// memory, the interrupt line, and the volume granted to the slot (if any).
impl Persist for FsDevice {
    type State = FsState;
    type Context<'a> = (usize, GuestMemory, EventFd, Option<&'a VolumeAttach>);
    type Error = std::io::Error;

    fn save(&self) -> std::io::Result<FsState> {
        Ok(self.state())
    }

    fn restore((n, mem, irq, volume): Self::Context<'_>, state: &FsState) -> std::io::Result<Self> {
        FsDevice::new(n, mem, irq, volume, Some(state))
    }
}
