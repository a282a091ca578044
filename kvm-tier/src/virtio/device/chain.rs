//! A descriptor chain as the device shell hands it to a device: its descriptors read once from
//! guest memory and checked (count, bounds, readable before writable, the device's byte caps),
//! then a [`ChainReader`] over the readable part and a [`ChainWriter`] over the writable part,
//! which copy in bounded pieces and never allocate by a guest-controlled length.

use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::vm::GuestMemory;

/// The most descriptors a chain may have, indirect ones included (the largest queue any of our
/// devices offers; Linux's chains for them have a few dozen at most).
pub const MAX_CHAIN_DESCRIPTORS: usize = 256;

/// A zeroed block to fill guest buffers from without allocating.
static ZEROS: [u8; 4096] = [0; 4096];

/// One descriptor of a chain, as read once from guest memory.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Desc {
    pub(super) addr: u64,
    pub(super) len: u32,
}

/// Why a chain was returned to the guest unserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refused {
    TooManyDescriptors,
    OutsideMemory,
    ReadableAfterWritable,
}

/// A chain's descriptors as read: how many are readable (they come first), and whether their
/// lengths are over the device's caps.
#[derive(Debug, Clone, Copy)]
pub(super) struct Collected {
    pub(super) readable: usize,
    pub(super) over_caps: bool,
}

/// Reads the chain's descriptors into `descs` (at most [`MAX_CHAIN_DESCRIPTORS`]) and checks
/// them.
pub(super) fn collect<M>(
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
pub(super) struct Cursor<'a> {
    pub(super) mem: &'a GuestMemory,
    pub(super) descs: &'a [Desc],
    /// Index of the current descriptor and offset in it.
    pub(super) idx: usize,
    pub(super) off: u32,
    pub(super) left: usize,
    pub(super) done: usize,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(mem: &'a GuestMemory, descs: &'a [Desc]) -> Cursor<'a> {
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

pub(super) fn short() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "the descriptor chain is shorter",
    )
}

pub(super) fn memory_error(e: impl std::error::Error + Send + Sync + 'static) -> std::io::Error {
    std::io::Error::other(e)
}

/// The readable part of a chain (what the guest sent), read front to back.
#[derive(Debug)]
pub struct ChainReader<'a>(pub(super) Cursor<'a>);

/// The writable part of a chain (room for the device's answer), written front to back.
#[derive(Debug)]
pub struct ChainWriter<'a>(pub(super) Cursor<'a>);

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
