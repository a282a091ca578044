//! Hostile descriptor chains fed to the virtio devices (blk, vsock, fs, net) through their registers
//! and queues, over real guest memory, as a guest driver would post them: huge lengths,
//! descriptor loops, addresses outside guest memory, indirect tables, unknown request types,
//! random header bytes. The host never panics, every device still answers a good request after
//! each hostile one, and no single allocation while serving exceeds
//! [`GUEST_ALLOCATION_BOUND`] (a counting global allocator in this test binary records the
//! largest one, so a buffer sized by a guest-claimed length fails the test). No KVM needed.

#![allow(clippy::unwrap_used)]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dormant_kvm::virtio::block::BlockDevice;
use dormant_kvm::virtio::device::GUEST_ALLOCATION_BOUND;
use dormant_kvm::virtio::fs::{FsDevice, VolumeAttach};
use dormant_kvm::virtio::net::{NET_HDR, NetDevice};
use dormant_kvm::virtio::vsock::VsockDevice;
use dormant_kvm::vm::{GuestMemory, GuestRam};
use proptest::prelude::*;
use virtio_bindings::virtio_mmio::*;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// The system allocator, recording the largest single allocation (or reallocation) made by
/// each device's worker thread (named by the shell): what the host allocates while serving
/// guest chains, apart from what the test itself and proptest allocate meanwhile.
struct Counting;

/// The devices' worker threads, by name.
/// The network device's frames also go through its NAT stack's thread (`dormant-nat`).
const WORKERS: [&[u8]; 5] = [
    b"dormant-blk",
    b"dormant-vsock",
    b"dormant-fs",
    b"dormant-net",
    b"dormant-nat",
];
static LARGEST: [AtomicUsize; 5] = [const { AtomicUsize::new(0) }; 5];

fn record(size: usize) {
    thread_local!(static WORKER: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) });
    let worker = WORKER.with(|w| {
        if let Some(i) = w.get() {
            return i;
        }
        let mut name = [0u8; 16];
        // SAFETY: `name` is a writable buffer of the length passed, for the whole call; for
        // the calling thread glibc reads the name with prctl, allocating nothing.
        let r = unsafe {
            libc::pthread_getname_np(libc::pthread_self(), name.as_mut_ptr().cast(), name.len())
        };
        let i = WORKERS
            .iter()
            .position(|p| r == 0 && name.starts_with(p))
            .unwrap_or(usize::MAX);
        w.set(Some(i));
        i
    });
    if let Some(l) = LARGEST.get(worker) {
        l.fetch_max(size, Ordering::Relaxed);
    }
}

// SAFETY: every method forwards to the system allocator with the caller's arguments, so the
// `GlobalAlloc` contract holds exactly as it does for `System`; recording a size touches no
// memory handed out and allocates nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: forwarded with the caller's layout, which meets `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator (that is, from `System`) with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        // SAFETY: `ptr` came from `System` with `layout`; `new_size` is the caller's, valid
        // under `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const RAM: usize = 8 << 20;
/// Queue `q`'s descriptor table, avail ring and used ring live at `QUEUES * (q + 1)` (+0,
/// +0x1000, +0x2000).
const QUEUES: u64 = 0x1_0000;
/// An indirect table (up to 4096 descriptors).
const TABLE: u64 = 0x8_0000;
/// The good requests' buffers.
const GOOD: u64 = 0xe_0000;
/// Hostile chains' buffers: from here to the end of RAM (so a hostile writable buffer never
/// overwrites a ring or a good request).
const BUFS: u64 = 1 << 20;

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;

/// How a test writes a device's registers.
trait Mmio {
    fn write_reg(&self, off: u64, data: &[u8]);
}

impl Mmio for BlockDevice {
    fn write_reg(&self, off: u64, data: &[u8]) {
        self.mmio_write(off, data);
    }
}

impl Mmio for VsockDevice {
    fn write_reg(&self, off: u64, data: &[u8]) {
        self.mmio_write(off, data);
    }
}

impl Mmio for NetDevice {
    fn write_reg(&self, off: u64, data: &[u8]) {
        self.mmio_write(off, data);
    }
}

impl Mmio for FsDevice {
    fn write_reg(&self, off: u64, data: &[u8]) {
        self.mmio_write(off, data);
    }
}

fn reg(dev: &dyn Mmio, off: u32, v: u32) {
    dev.write_reg(u64::from(off), &v.to_le_bytes());
}

/// A virtio driver over guest memory, as the guest kernel's would be.
struct Driver {
    mem: GuestMemory,
    sizes: Vec<u16>,
    avail_idx: Vec<u16>,
    used_seen: Vec<u16>,
}

impl Driver {
    /// Negotiates features and brings every queue up (at its full size) through the registers.
    fn new(mem: &GuestMemory, dev: &dyn Mmio, sizes: &[u16]) -> Driver {
        reg(dev, VIRTIO_MMIO_STATUS, 0);
        reg(dev, VIRTIO_MMIO_STATUS, 1 | 2);
        reg(dev, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        reg(dev, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        reg(dev, VIRTIO_MMIO_STATUS, 1 | 2 | 8);
        for (q, &size) in sizes.iter().enumerate() {
            let base = QUEUES * (q as u64 + 1);
            reg(dev, VIRTIO_MMIO_QUEUE_SEL, q as u32);
            reg(dev, VIRTIO_MMIO_QUEUE_NUM, u32::from(size));
            reg(dev, VIRTIO_MMIO_QUEUE_DESC_LOW, base as u32);
            reg(dev, VIRTIO_MMIO_QUEUE_AVAIL_LOW, (base + 0x1000) as u32);
            reg(dev, VIRTIO_MMIO_QUEUE_USED_LOW, (base + 0x2000) as u32);
            reg(dev, VIRTIO_MMIO_QUEUE_READY, 1);
        }
        reg(dev, VIRTIO_MMIO_STATUS, 1 | 2 | 8 | 4);
        Driver {
            mem: mem.clone(),
            sizes: sizes.to_vec(),
            avail_idx: vec![0; sizes.len()],
            used_seen: vec![0; sizes.len()],
        }
    }

    fn base(q: usize) -> u64 {
        QUEUES * (q as u64 + 1)
    }

    /// Writes descriptor `i` of `table` (a queue's table, or an indirect one).
    fn desc_at(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = table + 16 * u64::from(i);
        self.mem.write_obj(addr, GuestAddress(at)).unwrap();
        self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    fn desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.desc_at(Self::base(q), i, addr, len, flags, next);
    }

    /// Makes the chain at `head` available (without notifying).
    fn post(&mut self, q: usize, head: u16) {
        let avail = Self::base(q) + 0x1000;
        let i = self.avail_idx[q];
        let slot = avail + 4 + 2 * u64::from(i % self.sizes[q]);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx[q] = i.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx[q], GuestAddress(avail + 2))
            .unwrap();
    }

    fn notify(&self, dev: &dyn Mmio, q: usize) {
        reg(dev, VIRTIO_MMIO_QUEUE_NOTIFY, q as u32);
    }

    /// The used entries (head, length) the device returned since the last call.
    fn take_used(&mut self, q: usize) -> Vec<(u32, u32)> {
        let used = Self::base(q) + 0x2000;
        let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen[q] != idx {
            let at = used + 4 + 8 * u64::from(self.used_seen[q] % self.sizes[q]);
            out.push((
                self.mem.read_obj(GuestAddress(at)).unwrap(),
                self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
            ));
            self.used_seen[q] = self.used_seen[q].wrapping_add(1);
        }
        out
    }

    /// Waits (two minutes at most: the machine may be busy) until the device returns `head`
    /// on queue `q`; returns its used length. Entries of other heads are skipped.
    fn wait_used(&mut self, q: usize, head: u16) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(&(_, len)) = self
                .take_used(q)
                .iter()
                .find(|&&(id, _)| id == u32::from(head))
            {
                return len;
            }
            assert!(
                Instant::now() < deadline,
                "the device returned chain {head} of queue {q}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Where a hostile descriptor points.
#[derive(Debug, Clone)]
enum Addr {
    /// Into the hostile buffers, at this offset.
    Buf(u32),
    /// At the indirect table.
    Table,
    /// Anywhere, most likely outside guest memory.
    Far(u64),
}

#[derive(Debug, Clone)]
struct Desc {
    addr: Addr,
    len: u32,
    flags: u16,
    next: u16,
}

/// A hostile chain: descriptors at indices 0.. of the queue's table, a possible indirect
/// table, the head to post, and the bytes at the start of the hostile buffers.
#[derive(Debug, Clone)]
struct Chain {
    descs: Vec<Desc>,
    table: Vec<Desc>,
    head: u16,
    bytes: Vec<u8>,
}

fn length() -> impl Strategy<Value = u32> {
    prop_oneof![
        4 => 0u32..64,
        2 => Just(16u32),
        2 => Just(44u32),
        2 => Just(4096u32),
        3 => 0u32..(2 << 20),
        2 => Just((RAM as u64 - BUFS) as u32),
        1 => Just(RAM as u32),
        1 => Just(u32::MAX),
        1 => any::<u32>(),
    ]
}

fn desc(next_max: u16) -> impl Strategy<Value = Desc> {
    let addr = prop_oneof![
        6 => (0u32..(RAM as u32 - BUFS as u32)).prop_map(Addr::Buf),
        3 => Just(Addr::Buf(0)),
        1 => Just(Addr::Table),
        1 => any::<u64>().prop_map(Addr::Far),
    ];
    let flags = prop_oneof![
        4 => Just(NEXT),
        3 => Just(NEXT | WRITE),
        2 => Just(0u16),
        2 => Just(WRITE),
        1 => Just(INDIRECT),
        1 => any::<u16>(),
    ];
    (addr, length(), flags, 0..next_max).prop_map(|(addr, len, flags, next)| Desc {
        addr,
        len,
        flags,
        next,
    })
}

/// Chains for a queue of `size` descriptors; heads and `next`s stay below `size - 2` (the
/// good request's descriptors) or go past the queue.
fn chain(size: u16, header: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Chain> {
    let n = 1..24usize;
    (
        prop::collection::vec(desc(size + 4), n),
        prop::collection::vec(desc(300), 0..300),
        prop_oneof![8 => Just(0u16), 1 => 0..size - 2, 1 => size..u16::MAX],
        header,
    )
        .prop_map(move |(mut descs, table, head, bytes)| {
            for d in &mut descs {
                if d.next >= size - 2 && d.next < size {
                    d.next = 0;
                }
            }
            Chain {
                descs,
                table,
                head,
                bytes,
            }
        })
}

impl Driver {
    /// Writes `c` into queue `q`'s table and posts it.
    fn post_chain(&mut self, q: usize, c: &Chain) {
        let place = |d: &Desc, table_len: usize| -> (u64, u32) {
            match d.addr {
                Addr::Buf(off) => (BUFS + u64::from(off), d.len),
                Addr::Table => (TABLE, (table_len * 16) as u32),
                Addr::Far(a) => (a, d.len),
            }
        };
        self.mem.write_slice(&c.bytes, GuestAddress(BUFS)).unwrap();
        for (i, d) in c.table.iter().enumerate() {
            let (addr, len) = place(d, c.table.len());
            self.desc_at(TABLE, i as u16, addr, len, d.flags, d.next);
        }
        for (i, d) in c.descs.iter().enumerate() {
            let (addr, len) = place(d, c.table.len());
            self.desc(q, i as u16, addr, len, d.flags, d.next);
        }
        self.post(q, c.head);
    }
}

/// Device kinds, as indices of [`WORKERS`].
const BLK: usize = 0;
const VSOCK: usize = 1;
const FS: usize = 2;
const NET: usize = 3;
const NAT: usize = 4;

/// Checks the bound on the allocations device `worker` made while `f` ran.
fn bounded<T>(worker: usize, f: impl FnOnce() -> T) -> T {
    bounded_all(&[worker], f)
}

/// Checks the bound on the allocations each of `workers` made while `f` ran.
fn bounded_all<T>(workers: &[usize], f: impl FnOnce() -> T) -> T {
    for &w in workers {
        LARGEST[w].store(0, Ordering::SeqCst);
    }
    let r = f();
    for &w in workers {
        let largest = LARGEST[w].load(Ordering::SeqCst);
        assert!(
            largest <= GUEST_ALLOCATION_BOUND,
            "a single allocation of {largest} bytes while serving hostile chains (bound {GUEST_ALLOCATION_BOUND})"
        );
    }
    r
}

fn irq() -> EventFd {
    EventFd::new(EFD_NONBLOCK).unwrap()
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 200,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// virtio-blk

struct Blk {
    _ram: GuestRam,
    dev: BlockDevice,
    drv: Driver,
}

const BLK_SIZE: u16 = 256;

fn blk() -> Blk {
    let ram = GuestRam::anonymous(RAM).unwrap();
    let disk = GuestRam::anonymous(1 << 20).unwrap();
    let dev = BlockDevice::new(ram.memory().clone(), disk, irq(), None).unwrap();
    let drv = Driver::new(ram.memory(), &dev, &[BLK_SIZE]);
    Blk {
        _ram: ram,
        dev,
        drv,
    }
}

impl Blk {
    /// Posts `c`, then a good `GET_ID` request; returns that request's status and ID.
    fn attack(&mut self, c: &Chain) -> (u8, [u8; 12]) {
        let d = &mut self.drv;
        d.post_chain(0, c);
        let (hdr, id) = (GOOD, GOOD + 0x100);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&8u32.to_le_bytes());
        d.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        d.mem.write_slice(&[0xee; 21], GuestAddress(id)).unwrap();
        d.desc(0, BLK_SIZE - 2, hdr, 16, NEXT, BLK_SIZE - 1);
        d.desc(0, BLK_SIZE - 1, id, 21, WRITE, 0);
        d.post(0, BLK_SIZE - 2);
        d.notify(&self.dev, 0);
        assert_eq!(d.wait_used(0, BLK_SIZE - 2), 21);
        let mut out = [0u8; 21];
        d.mem.read_slice(&mut out, GuestAddress(id)).unwrap();
        (out[20], out[..12].try_into().unwrap())
    }
}

fn blk_header() -> impl Strategy<Value = Vec<u8>> {
    let kind = prop_oneof![Just(0u32), Just(1u32), Just(4u32), Just(8u32), any::<u32>()];
    let sector = prop_oneof![0u64..4096, any::<u64>()];
    (kind, sector, prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(k, s, tail)| {
        let mut b = vec![0u8; 16];
        b[0..4].copy_from_slice(&k.to_le_bytes());
        b[8..16].copy_from_slice(&s.to_le_bytes());
        b.extend(tail);
        b
    })
}

fn blk_chain() -> impl Strategy<Value = Chain> {
    chain(BLK_SIZE, blk_header())
}

fn one(addr: u64, len: u32, flags: u16, next: u16) -> Desc {
    Desc {
        addr: if addr >= BUFS {
            Addr::Buf((addr - BUFS) as u32)
        } else {
            Addr::Far(addr)
        },
        len,
        flags,
        next,
    }
}

/// The chains that matter most, whatever the random ones hit: a request header, then
/// writable parts far larger than any request (a read, an unknown type, `GET_ID`), a write
/// larger than any request, a descriptor loop and an indirect table of the whole RAM.
fn blk_worst() -> Vec<Chain> {
    let hdr = |kind: u32| {
        let mut b = vec![0u8; 16];
        b[0..4].copy_from_slice(&kind.to_le_bytes());
        b
    };
    let whole = (RAM as u64 - BUFS - 4096) as u32;
    let mut out = Vec::new();
    for kind in [0u32, 99, 8] {
        out.push(Chain {
            descs: vec![
                one(BUFS, 16, NEXT, 1),
                one(BUFS + 4096, whole, NEXT | WRITE, 2),
                one(BUFS + 4096, whole, WRITE, 0),
            ],
            table: vec![],
            head: 0,
            bytes: hdr(kind),
        });
    }
    out.push(Chain {
        descs: vec![
            one(BUFS, 16, NEXT, 1),
            one(BUFS + 4096, whole, NEXT, 2),
            one(BUFS + 4096, 1, WRITE, 0),
        ],
        table: vec![],
        head: 0,
        bytes: hdr(1),
    });
    out.push(Chain {
        descs: vec![
            one(BUFS, 16, NEXT, 1),
            one(BUFS + 4096, 3 << 20, NEXT | WRITE, 1),
        ],
        table: vec![],
        head: 0,
        bytes: hdr(0),
    });
    let mut table = vec![one(BUFS, 16, NEXT, 1)];
    for i in 1..255u16 {
        table.push(one(BUFS + 4096, whole, NEXT | WRITE, i + 1));
    }
    table.push(one(BUFS + 4096, 1, WRITE, 0));
    out.push(Chain {
        descs: vec![Desc {
            addr: Addr::Table,
            len: 0,
            flags: INDIRECT,
            next: 0,
        }],
        table,
        head: 0,
        bytes: hdr(99),
    });
    out
}

#[test]
fn blk_survives_the_worst_chains_without_large_allocations() {
    let mut b = blk();
    let whole = RAM as u64 - BUFS - 4096;
    let last = BUFS + 4096 + whole - 1;
    for (i, c) in blk_worst().into_iter().enumerate() {
        b.drv.mem.write_obj(0xeeu8, GuestAddress(last)).unwrap();
        let (status, id) = bounded(BLK, || b.attack(&c));
        assert_eq!((status, &id), (0, b"dormant-disk"), "after {c:?}");
        if i < 3 {
            // A read, an unknown type, GET_ID, each with more room than any request: refused
            // with IOERR in the status byte, where the guest looks for it.
            let s: u8 = b.drv.mem.read_obj(GuestAddress(last)).unwrap();
            assert_eq!(s, 1, "the status of {c:?}");
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn blk_serves_random_chains_without_large_allocations(c in blk_chain()) {
        thread_local!(static DEV: std::cell::RefCell<Option<Blk>> = const { std::cell::RefCell::new(None) });
        DEV.with(|d| {
            let mut d = d.borrow_mut();
            let b = d.get_or_insert_with(blk);
            let (status, id) = bounded(BLK, || b.attack(&c));
            assert_eq!((status, &id), (0, b"dormant-disk"));
        });
    }
}

// ---------------------------------------------------------------------------------------------
// virtio-vsock

const RX: usize = 0;
const TX: usize = 1;
const VSOCK_SIZES: [u16; 3] = [256, 256, 64];
const HDR: usize = 44;
const OP_REQUEST: u16 = 1;
const OP_RST: u16 = 3;

struct Vsock {
    _ram: GuestRam,
    dev: VsockDevice,
    drv: Driver,
    port: u32,
}

fn vsock() -> Vsock {
    let ram = GuestRam::anonymous(RAM).unwrap();
    let dev = VsockDevice::new(ram.memory().clone(), irq(), None).unwrap();
    let drv = Driver::new(ram.memory(), &dev, &VSOCK_SIZES);
    Vsock {
        _ram: ram,
        dev,
        drv,
        port: 5000,
    }
}

/// A guest→host packet header.
fn packet(src_port: u32, dst_port: u32, op: u16, len: u32) -> [u8; HDR] {
    let mut b = [0u8; HDR];
    b[0..8].copy_from_slice(&3u64.to_le_bytes());
    b[8..16].copy_from_slice(&2u64.to_le_bytes());
    b[16..20].copy_from_slice(&src_port.to_le_bytes());
    b[20..24].copy_from_slice(&dst_port.to_le_bytes());
    b[24..28].copy_from_slice(&len.to_le_bytes());
    b[28..30].copy_from_slice(&1u16.to_le_bytes());
    b[30..32].copy_from_slice(&op.to_le_bytes());
    b[36..40].copy_from_slice(&65536u32.to_le_bytes());
    b
}

fn op_of(mem: &GuestMemory, at: u64) -> u16 {
    mem.read_obj(GuestAddress(at + 30)).unwrap()
}

impl Vsock {
    /// Posts `rx` as a receive buffer and `tx` as a packet, then two connection requests the
    /// device refuses and a good receive buffer; returns the op of what the device put there.
    fn attack(&mut self, tx: &Chain, rx: &Chain) -> u16 {
        let d = &mut self.drv;
        // The hostile receive buffer first (its table is the RX queue's), then a good one.
        d.post_chain(RX, rx);
        let good_rx = GOOD + 0x1000;
        let size = VSOCK_SIZES[RX];
        d.desc(RX, size - 1, good_rx, (HDR + 4096) as u32, WRITE, 0);
        d.post(RX, size - 1);
        d.post_chain(TX, tx);
        let size = VSOCK_SIZES[TX];
        for (i, head) in [size - 2, size - 1].into_iter().enumerate() {
            let at = GOOD + 0x100 * i as u64;
            self.port += 1;
            d.mem
                .write_slice(&packet(self.port, 1234, OP_REQUEST, 0), GuestAddress(at))
                .unwrap();
            d.desc(TX, head, at, HDR as u32, 0, 0);
            d.post(TX, head);
        }
        d.notify(&self.dev, TX);
        d.notify(&self.dev, RX);
        d.wait_used(TX, size - 1);
        assert_eq!(d.wait_used(RX, VSOCK_SIZES[RX] - 1), HDR as u32);
        op_of(&d.mem, good_rx)
    }
}

fn vsock_header() -> impl Strategy<Value = Vec<u8>> {
    let op = prop_oneof![0u16..9, any::<u16>()];
    let len = prop_oneof![
        0u32..100,
        Just(64 * 1024),
        Just(64 * 1024 + 1),
        any::<u32>()
    ];
    (
        any::<u32>(),
        any::<u32>(),
        op,
        len,
        any::<bool>(),
        prop::collection::vec(any::<u8>(), 0..128),
    )
        .prop_map(|(src, dst, op, len, garble, tail)| {
            let mut b = packet(src, dst, op, len).to_vec();
            if garble {
                b[0] ^= 0x5a;
            }
            b.extend(tail);
            b
        })
}

fn vsock_chain(q: usize) -> impl Strategy<Value = Chain> {
    chain(VSOCK_SIZES[q], vsock_header())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn vsock_serves_random_chains_without_large_allocations(
        tx in vsock_chain(TX),
        rx in vsock_chain(RX),
    ) {
        thread_local!(static DEV: std::cell::RefCell<Option<Vsock>> = const { std::cell::RefCell::new(None) });
        DEV.with(|d| {
            let mut d = d.borrow_mut();
            let v = d.get_or_insert_with(vsock);
            let op = bounded(VSOCK, || v.attack(&tx, &rx));
            assert_eq!(op, OP_RST, "the device refuses the guest's connections");
        });
    }
}

#[test]
fn refusals_for_a_guest_that_posts_no_receive_buffers_are_bounded() {
    let mut v = vsock();
    let d = &mut v.drv;
    // 3000 connection requests from distinct ports, none answered for lack of buffers.
    let mut port = 10_000;
    for _ in 0..24 {
        for i in 0..125u16 {
            let at = BUFS + u64::from(i) * 0x100;
            port += 1;
            d.mem
                .write_slice(&packet(port, 1234, OP_REQUEST, 0), GuestAddress(at))
                .unwrap();
            d.desc(TX, i, at, HDR as u32, 0, 0);
            d.post(TX, i);
        }
        d.notify(&v.dev, TX);
        d.wait_used(TX, 124);
    }
    // The host opens a connection: its request queues behind the refusals still held.
    let host = v.dev.host();
    let connect = std::thread::spawn(move || host.connect(1234, Duration::from_secs(300)));
    let mut refusals = 0usize;
    let deadline = Instant::now() + Duration::from_secs(120);
    'posting: loop {
        for i in 0..128u16 {
            v.drv
                .desc(RX, i, BUFS + u64::from(i) * 0x100, 0x100, WRITE, 0);
            v.drv.post(RX, i);
        }
        v.drv.notify(&v.dev, RX);
        let mut got = 0;
        while got < 128 {
            for (id, len) in v.drv.take_used(RX) {
                got += 1;
                assert_eq!(len, HDR as u32);
                match op_of(&v.drv.mem, BUFS + u64::from(id) * 0x100) {
                    OP_RST => refusals += 1,
                    OP_REQUEST => break 'posting,
                    other => panic!("unexpected op {other}"),
                }
            }
            assert!(
                Instant::now() < deadline,
                "the host's request reached the guest"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    assert!(
        (1..=256).contains(&refusals),
        "{refusals} refusals were held for the guest (bound: 256)"
    );
    drop(v);
    assert!(connect.join().unwrap().is_err(), "nobody accepted");
}

// ---------------------------------------------------------------------------------------------
// virtio-fs

const FS_SIZES: [u16; 2] = [128, 256];
const REQUESTS: usize = 1;
const GETATTR: u32 = 3;

struct Fs {
    _ram: GuestRam,
    _dir: tempfile::TempDir,
    dev: FsDevice,
    drv: Driver,
    unique: u64,
}

fn fs() -> Fs {
    let ram = GuestRam::anonymous(RAM).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a"), b"data").unwrap();
    let attach = VolumeAttach {
        host: dir.path().to_path_buf(),
        read_only: false,
    };
    let dev = FsDevice::new(0, ram.memory().clone(), irq(), Some(&attach), None).unwrap();
    let drv = Driver::new(ram.memory(), &dev, &FS_SIZES);
    Fs {
        _ram: ram,
        _dir: dir,
        dev,
        drv,
        unique: 1 << 40,
    }
}

impl Fs {
    /// Posts `c` on queue `q`, then a good `GETATTR` of the root; returns its reply's error
    /// and whether the reply answers that request.
    fn attack(&mut self, q: usize, c: &Chain) -> (i32, bool) {
        let d = &mut self.drv;
        d.post_chain(q, c);
        self.unique += 1;
        let (req, reply) = (GOOD, GOOD + 0x1000);
        let mut r = common::fuse_header(56, GETATTR, self.unique, 1);
        r.extend_from_slice(&[0u8; 16]);
        d.mem.write_slice(&r, GuestAddress(req)).unwrap();
        let size = FS_SIZES[REQUESTS];
        d.desc(REQUESTS, size - 2, req, 56, NEXT, size - 1);
        d.desc(REQUESTS, size - 1, reply, 4096, WRITE, 0);
        d.post(REQUESTS, size - 2);
        d.notify(&self.dev, q);
        d.notify(&self.dev, REQUESTS);
        let len = d.wait_used(REQUESTS, size - 2);
        assert!(len >= 16, "a reply ({len} bytes)");
        let error: i32 = d.mem.read_obj(GuestAddress(reply + 4)).unwrap();
        let unique: u64 = d.mem.read_obj(GuestAddress(reply + 8)).unwrap();
        (error, unique == self.unique)
    }
}

fn fuse_header() -> impl Strategy<Value = Vec<u8>> {
    let opcode = prop_oneof![8 => 1u32..50, 1 => any::<u32>()];
    let len = prop_oneof![40u32..200, any::<u32>()];
    let node = prop_oneof![Just(1u64), 0u64..8, any::<u64>()];
    (
        len,
        opcode,
        node,
        prop::collection::vec(any::<u8>(), 0..160),
    )
        .prop_map(|(len, op, node, body)| {
            let mut b = common::fuse_header(len, op, 7, node);
            b.extend(body);
            b
        })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fs_serves_random_chains_without_large_allocations(
        (q, c) in prop_oneof![
            chain(FS_SIZES[0], fuse_header()).prop_map(|c| (0, c)),
            chain(FS_SIZES[REQUESTS], fuse_header()).prop_map(|c| (REQUESTS, c)),
        ],
    ) {
        thread_local!(static DEV: std::cell::RefCell<Option<Fs>> = const { std::cell::RefCell::new(None) });
        DEV.with(|d| {
            let mut d = d.borrow_mut();
            let f = d.get_or_insert_with(fs);
            let (error, answers) = bounded(FS, || f.attack(q, &c));
            assert_eq!((error, answers), (0, true));
        });
    }
}

#[test]
fn fs_refuses_requests_larger_than_it_serves_without_allocating_them() {
    let mut f = fs();
    let whole = (RAM as u64 - BUFS - 4096) as u32;
    let c = Chain {
        descs: vec![
            one(BUFS, 4096, NEXT, 1),
            one(BUFS + 4096, whole, NEXT, 2),
            one(BUFS + 4096, whole, WRITE, 0),
        ],
        table: vec![],
        head: 0,
        bytes: common::fuse_header(u32::MAX, 16, 9, 1),
    };
    let (error, answers) = bounded(FS, || f.attack(REQUESTS, &c));
    assert_eq!((error, answers), (0, true));
    // The long request itself got E2BIG, answered from its header.
    let reply = BUFS + 4096;
    let error: i32 = f.drv.mem.read_obj(GuestAddress(reply + 4)).unwrap();
    let unique: u64 = f.drv.mem.read_obj(GuestAddress(reply + 8)).unwrap();
    assert_eq!((error, unique), (-libc::E2BIG, 9));
}

// ---------------------------------------------------------------------------------------------
// virtio-net (with its NAT stack behind it)

const NET_SIZES: [u16; 2] = [256, 256];
const NET_RX: usize = 0;
const NET_TX: usize = 1;

struct Net {
    _ram: GuestRam,
    dev: NetDevice,
    drv: Driver,
}

fn net() -> Net {
    let ram = GuestRam::anonymous(RAM).unwrap();
    let dev = NetDevice::new(ram.memory().clone(), irq(), None).unwrap();
    let drv = Driver::new(ram.memory(), &dev, &NET_SIZES);
    Net {
        _ram: ram,
        dev,
        drv,
    }
}

/// A virtio-net header and the guest's ARP request for the gateway.
fn arp_request() -> Vec<u8> {
    let mut f = vec![0u8; NET_HDR];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&dormant_kvm::net::GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&dormant_kvm::net::GUEST_MAC);
    f.extend_from_slice(&dormant_kvm::net::GUEST_ADDR.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&dormant_kvm::net::GATEWAY_ADDR.octets());
    f
}

impl Net {
    /// Posts `rx` as a receive buffer and `tx` as a frame, then two ARP requests for the
    /// gateway and a good receive buffer; returns the frame the device put there (its
    /// virtio-net header stripped). The hostile receive buffer takes at most one answer.
    fn attack(&mut self, tx: &Chain, rx: &Chain) -> Vec<u8> {
        let d = &mut self.drv;
        d.post_chain(NET_RX, rx);
        let good_rx = GOOD + 0x1000;
        let size = NET_SIZES[NET_RX];
        d.desc(NET_RX, size - 1, good_rx, 2048, WRITE, 0);
        d.post(NET_RX, size - 1);
        d.post_chain(NET_TX, tx);
        let size = NET_SIZES[NET_TX];
        let arp = arp_request();
        for (i, head) in [size - 2, size - 1].into_iter().enumerate() {
            let at = GOOD + 0x100 * i as u64;
            d.mem.write_slice(&arp, GuestAddress(at)).unwrap();
            d.desc(NET_TX, head, at, arp.len() as u32, 0, 0);
            d.post(NET_TX, head);
        }
        d.notify(&self.dev, NET_TX);
        d.notify(&self.dev, NET_RX);
        d.wait_used(NET_TX, size - 1);
        let len = d.wait_used(NET_RX, NET_SIZES[NET_RX] - 1) as usize;
        assert!(len > NET_HDR, "a frame ({len} bytes)");
        let mut out = vec![0u8; len - NET_HDR];
        d.mem
            .read_slice(&mut out, GuestAddress(good_rx + NET_HDR as u64))
            .unwrap();
        out
    }
}

/// An ARP reply from the gateway to the guest.
fn is_arp_reply(frame: &[u8]) -> bool {
    frame.len() >= 42
        && frame[0..6] == dormant_kvm::net::GUEST_MAC
        && frame[12..14] == [0x08, 0x06]
        && frame[20..22] == [0, 2]
        && frame[28..32] == dormant_kvm::net::GATEWAY_ADDR.octets()
}

/// Frame bytes: a virtio-net header (random or zero), then random Ethernet, IPv4 and TCP/UDP
/// looking bytes.
fn net_header() -> impl Strategy<Value = Vec<u8>> {
    let ethertype = prop_oneof![Just([0x08u8, 0x00]), Just([0x08, 0x06]), any::<[u8; 2]>()];
    (
        any::<bool>(),
        ethertype,
        prop::collection::vec(any::<u8>(), 0..200),
    )
        .prop_map(|(zero_hdr, ethertype, tail)| {
            let mut b = if zero_hdr {
                vec![0u8; NET_HDR]
            } else {
                vec![0x5a; NET_HDR]
            };
            b.extend_from_slice(&[0xff; 6]);
            b.extend_from_slice(&dormant_kvm::net::GUEST_MAC);
            b.extend_from_slice(&ethertype);
            if ethertype == [0x08, 0x00] {
                // An IPv4 header's first byte, so the stack parses further.
                b.push(0x45);
            }
            b.extend(tail);
            b
        })
}

fn net_chain(q: usize) -> impl Strategy<Value = Chain> {
    chain(NET_SIZES[q], net_header())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn net_serves_random_chains_without_large_allocations(
        tx in net_chain(NET_TX),
        rx in net_chain(NET_RX),
    ) {
        thread_local!(static DEV: std::cell::RefCell<Option<Net>> = const { std::cell::RefCell::new(None) });
        DEV.with(|d| {
            let mut d = d.borrow_mut();
            let n = d.get_or_insert_with(net);
            let frame = bounded_all(&[NET, NAT], || n.attack(&tx, &rx));
            assert!(is_arp_reply(&frame), "the gateway answers ARP: {frame:02x?}");
        });
    }
}

#[test]
fn net_drops_runt_and_oversized_frames_and_counts_them() {
    let mut n = net();
    let d = &mut n.drv;
    let size = NET_SIZES[NET_TX];
    // Shorter than a header and an Ethernet header; one byte over the largest frame; one
    // byte over the device's readable cap.
    let lens = [
        NET_HDR as u32 + 13,
        (NET_HDR + dormant_kvm::net::MAX_FRAME + 1) as u32,
        64 << 10,
    ];
    for (i, len) in lens.into_iter().enumerate() {
        d.desc(NET_TX, i as u16, BUFS, len, 0, 0);
        d.post(NET_TX, i as u16);
    }
    let frame = arp_request();
    d.mem.write_slice(&frame, GuestAddress(GOOD)).unwrap();
    d.desc(NET_TX, size - 1, GOOD, frame.len() as u32, 0, 0);
    d.post(NET_TX, size - 1);
    d.desc(NET_RX, 0, GOOD + 0x1000, 2048, WRITE, 0);
    d.post(NET_RX, 0);
    d.notify(&n.dev, NET_TX);
    d.notify(&n.dev, NET_RX);
    d.wait_used(NET_TX, size - 1);
    let len = d.wait_used(NET_RX, 0) as usize;
    let mut out = vec![0u8; len - NET_HDR];
    d.mem
        .read_slice(&mut out, GuestAddress(GOOD + 0x1000 + NET_HDR as u64))
        .unwrap();
    assert!(is_arp_reply(&out), "{out:02x?}");
    assert_eq!(n.dev.dropped(), 3);
}
