//! virtio-fs: a volume slot. The guest's `virtiofs` driver sends FUSE requests on the request
//! queue (and `FORGET`s on the high-priority queue); the device's worker thread answers them
//! from the [`VolumeServer`] attached to the slot.
//!
//! A machine has a fixed number of slots, present from boot (the guest learns its devices only
//! then), each with the tag `dormant<N>`. A sandbox attaches host directories to slots when it
//! is created or resumed; an unattached slot answers every request with `ENODEV`.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use parking_lot::Mutex;
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::mmio::{Interrupt, MmioTransport, TransportState, VirtioDevice};
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

/// The device as the transport sees it.
#[derive(Debug)]
pub struct Fs {
    tag: [u8; TAG_LEN],
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

struct Inner {
    t: MmioTransport<Fs>,
    server: Option<VolumeServer>,
    paused: bool,
    stopped: bool,
    request: Vec<u8>,
    reply: Vec<u8>,
}

/// The device and its worker thread.
pub struct FsDevice {
    inner: Arc<Mutex<Inner>>,
    queue_evts: [EventFd; 2],
    wake: Arc<EventFd>,
    worker: Option<std::thread::JoinHandle<()>>,
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
        let mut t = MmioTransport::new(Fs { tag: tag_bytes }, mem, Interrupt::new(irq));
        if let Some(s) = state {
            t.restore(&s.transport)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        }
        let server = volume
            .map(|v| {
                VolumeServer::open(&v.host, v.read_only, state.and_then(|s| s.volume.as_ref()))
            })
            .transpose()?;
        let pending_irq = state.is_some_and(|s| s.transport.interrupt_status != 0);
        let inner = Arc::new(Mutex::new(Inner {
            t,
            server,
            paused: false,
            stopped: false,
            request: Vec::new(),
            reply: Vec::new(),
        }));
        let queue_evts = [EventFd::new(EFD_NONBLOCK)?, EventFd::new(EFD_NONBLOCK)?];
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let worker = {
            let inner = inner.clone();
            let q = [queue_evts[0].try_clone()?, queue_evts[1].try_clone()?];
            let wake = wake.clone();
            std::thread::Builder::new()
                .name(format!("dormant-fs{n}"))
                .spawn(move || worker(&inner, &q, &wake))?
        };
        if pending_irq {
            inner.lock().t.interrupt.signal_used();
        }
        // Requests the guest queued before a checkpoint are served now.
        let _ = queue_evts[1].write(1);
        Ok(FsDevice {
            inner,
            queue_evts,
            wake,
            worker: Some(worker),
        })
    }

    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
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
            let _ = self.queue_evts[1].write(1);
        }
    }

    /// Stops (or restarts) serving requests, for a consistent checkpoint.
    pub fn set_paused(&self, paused: bool) {
        self.inner.lock().paused = paused;
        if !paused {
            let _ = self.queue_evts[1].write(1);
        }
    }

    pub fn state(&self) -> FsState {
        let g = self.inner.lock();
        FsState {
            transport: g.t.state(),
            volume: g.server.as_ref().map(VolumeServer::state),
        }
    }
}

impl Drop for FsDevice {
    fn drop(&mut self) {
        self.inner.lock().stopped = true;
        let _ = self.wake.write(1);
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

fn worker(inner: &Mutex<Inner>, queue_evts: &[EventFd; 2], wake: &EventFd) {
    let pollfd = |fd: i32| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let mut fds = [
        pollfd(queue_evts[0].as_raw_fd()),
        pollfd(queue_evts[1].as_raw_fd()),
        pollfd(wake.as_raw_fd()),
    ];
    loop {
        // SAFETY: `fds` is a valid array of three pollfd for the whole call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
        if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
        for e in queue_evts {
            let _ = e.read();
        }
        let _ = wake.read();
        let mut g = inner.lock();
        if g.stopped {
            return;
        }
        if g.paused || !g.t.is_active() {
            continue;
        }
        let used = process(&mut g, 0) | process(&mut g, 1);
        if used {
            g.t.interrupt.signal_used();
        }
    }
}

/// Serves every request queued on queue `q`. Returns whether buffers were used.
fn process(g: &mut Inner, q: usize) -> bool {
    let mem = g.t.mem.clone();
    let mut used = false;
    while let Some(chain) = g.t.queues[q].pop_descriptor_chain(&mem) {
        let head = chain.head_index();
        let written = serve(g, &mem, chain).unwrap_or(0);
        let _ = g.t.queues[q].add_used(&mem, head, written);
        used = true;
    }
    used
}

/// One FUSE request; returns the bytes written into the guest's buffers.
fn serve(
    g: &mut Inner,
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
) -> Option<u32> {
    let mut r = chain.clone().reader(mem).ok()?;
    let mut w = chain.writer(mem).ok()?;
    let len = r.available_bytes();
    let Inner {
        server,
        request,
        reply,
        ..
    } = g;
    reply.clear();
    if len > MAX_REQUEST {
        // Never allocate what a hostile guest claims; answer from the header alone.
        let mut hdr = [0u8; size_of::<InHeader>()];
        r.read_exact(&mut hdr).ok()?;
        error_reply(&hdr, libc::E2BIG, reply);
    } else {
        request.resize(len, 0);
        r.read_exact(request).ok()?;
        match server {
            Some(s) => s.handle(request, reply),
            None => error_reply(request, libc::ENODEV, reply),
        }
    }
    if reply.is_empty() {
        return Some(0);
    }
    if reply.len() > w.available_bytes() {
        // The guest left no room for the answer: say so in the header, if that fits.
        let hdr = reply[..size_of::<OutHeader>()].to_vec();
        error_reply_from_out(&hdr, libc::EOVERFLOW, reply);
        if reply.len() > w.available_bytes() {
            return Some(0);
        }
    }
    w.write_all(reply).ok()?;
    Some(reply.len() as u32)
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
