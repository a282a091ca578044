//! Tiny hand-written guests. Every one runs in long mode set up by `write_long_mode_tables` and
//! `enter_long_mode` (`tests/tiny.rs`, `tests/golden.rs`, and the guests here). `Guest` builds
//! the ones that drive a real [`Machine`]'s virtio devices through their MMIO registers, as a
//! guest driver would (`tests/hostile.rs`, `tests/inflight.rs`): a few dozen bytes of code
//! interpret a script of stores, waits and prints; the test lays out descriptor tables, rings
//! and buffers in guest RAM before the guest runs.

#![allow(dead_code, clippy::unwrap_used)] // each test binary uses a part of it

use dormant_kvm::machine::Machine;
use dormant_kvm::virtio::fs::VolumeAttach;
use dormant_kvm::vm::{GuestMemory, GuestRam, MicroVm};
use kvm_bindings::{kvm_regs, kvm_segment};
use virtio_bindings::virtio_mmio::*;
use vm_memory::{Bytes, GuestAddress};

pub const RAM: u64 = 8 << 20;
pub const GDT: u64 = 0x500;
pub const PML4: u64 = 0x1000;
pub const CODE: u64 = 0x10000;
pub const SCRIPT: u64 = 0x11000;
/// Bytes the script prints.
pub const TEXT: u64 = 0x20000;
/// Queue `n`'s descriptor table, avail ring and used ring: `QUEUES + n * 0x10000` (+0, +0x1000,
/// +0x2000).
pub const QUEUES: u64 = 0x100000;
/// Request buffers.
pub const BUFS: u64 = 0x200000;
pub const QSIZE: u16 = 16;

/// The script interpreter: reads 32-byte entries `(op, a, b, c)` from `SCRIPT` and runs them:
/// 1 `mov dword [a], b`; 2 `mov word [a], b`; 3 wait until `word [a] == b`; 4 `out 0x3f8,
/// byte [a] + b`; 5 forever `word [a] = word [b] + c`; anything else halts.
///
/// ```text
///  0: mov rsi, 0x11000          33: hlt / jmp 33              46: mov al, [rdi]
///  7: mov rax, [rsi]            36: mov [rdi], edx / jmp 7        add al, dl
///     mov rdi, [rsi+8]          3a: mov [rdi], dx / jmp 7         mov dx, 0x3f8
///     mov rdx, [rsi+16]         3f: cmp [rdi], dx / jne 3f        out dx, al / jmp 7
///     mov rcx, [rsi+24]             jmp 7                     51: mov ax, [rdx]
///     add rsi, 32                                                 add ax, cx
///     cmp eax, 1..5 / je …                                        mov [rdi], ax / jmp 51
/// ```
pub const INTERP: &[u8] = &[
    0x48, 0xc7, 0xc6, 0x00, 0x10, 0x01, 0x00, 0x48, 0x8b, 0x06, 0x48, 0x8b, 0x7e, 0x08, 0x48, 0x8b,
    0x56, 0x10, 0x48, 0x8b, 0x4e, 0x18, 0x48, 0x83, 0xc6, 0x20, 0x83, 0xf8, 0x01, 0x74, 0x17, 0x83,
    0xf8, 0x02, 0x74, 0x16, 0x83, 0xf8, 0x03, 0x74, 0x16, 0x83, 0xf8, 0x04, 0x74, 0x18, 0x83, 0xf8,
    0x05, 0x74, 0x1e, 0xf4, 0xeb, 0xfd, 0x89, 0x17, 0xeb, 0xcd, 0x66, 0x89, 0x17, 0xeb, 0xc8, 0x66,
    0x39, 0x17, 0x75, 0xfb, 0xeb, 0xc1, 0x8a, 0x07, 0x00, 0xd0, 0x66, 0xba, 0xf8, 0x03, 0xee, 0xeb,
    0xb6, 0x66, 0x8b, 0x02, 0x66, 0x01, 0xc8, 0x66, 0x89, 0x07, 0xeb, 0xf5,
];

pub const NEXT: u16 = 1;
pub const WRITE: u16 = 2;

/// A tiny guest being put together: its RAM (written before it runs, as if the guest had
/// prepared it) and its script.
pub struct Guest {
    pub ram: GuestRam,
    pub ops: Vec<[u64; 4]>,
    pub text: u64,
}

impl Guest {
    pub fn new() -> Guest {
        Guest {
            ram: GuestRam::anonymous(RAM as usize).unwrap(),
            ops: Vec::new(),
            text: TEXT,
        }
    }

    pub fn mem(&self) -> &GuestMemory {
        self.ram.memory()
    }

    pub fn bytes(&self, at: u64, b: &[u8]) {
        self.mem().write_slice(b, GuestAddress(at)).unwrap();
    }

    pub fn store32(&mut self, at: u64, v: u32) {
        self.ops.push([1, at, u64::from(v), 0]);
    }

    pub fn store16(&mut self, at: u64, v: u16) {
        self.ops.push([2, at, u64::from(v), 0]);
    }

    pub fn wait16(&mut self, at: u64, v: u16) {
        self.ops.push([3, at, u64::from(v), 0]);
    }

    /// Prints the byte at `at` plus `add`.
    pub fn putc(&mut self, at: u64, add: u8) {
        self.ops.push([4, at, u64::from(add), 0]);
    }

    pub fn print(&mut self, s: &str) {
        for b in s.bytes() {
            self.bytes(self.text, &[b]);
            self.putc(self.text, 0);
            self.text += 1;
        }
    }

    /// Forever: the avail index of queue `q` = its used index + `ahead` (keeps the ring full).
    pub fn flood(&mut self, q: u64, ahead: u16) {
        let base = QUEUES + q * 0x10000;
        self.ops
            .push([5, base + 0x1000 + 2, base + 0x2000 + 2, u64::from(ahead)]);
    }

    /// Brings the device at MMIO `base` up, as a driver does, with queues `qs` (device queue
    /// index, our queue slot), each of `QSIZE` entries.
    pub fn bring_up(&mut self, base: u64, qs: &[(u32, u64)]) {
        let r = |off: u32| base + u64::from(off);
        self.store32(r(VIRTIO_MMIO_STATUS), 0);
        self.store32(r(VIRTIO_MMIO_STATUS), 1 | 2);
        self.store32(r(VIRTIO_MMIO_DRIVER_FEATURES_SEL), 1);
        self.store32(r(VIRTIO_MMIO_DRIVER_FEATURES), 1);
        self.store32(r(VIRTIO_MMIO_DRIVER_FEATURES_SEL), 0);
        self.store32(r(VIRTIO_MMIO_DRIVER_FEATURES), 0);
        self.store32(r(VIRTIO_MMIO_STATUS), 1 | 2 | 8);
        for &(q, slot) in qs {
            let qb = QUEUES + slot * 0x10000;
            self.store32(r(VIRTIO_MMIO_QUEUE_SEL), q);
            self.store32(r(VIRTIO_MMIO_QUEUE_NUM), u32::from(QSIZE));
            self.store32(r(VIRTIO_MMIO_QUEUE_DESC_LOW), qb as u32);
            self.store32(r(VIRTIO_MMIO_QUEUE_AVAIL_LOW), (qb + 0x1000) as u32);
            self.store32(r(VIRTIO_MMIO_QUEUE_USED_LOW), (qb + 0x2000) as u32);
            self.store32(r(VIRTIO_MMIO_QUEUE_READY), 1);
        }
        self.store32(r(VIRTIO_MMIO_STATUS), 1 | 2 | 8 | 4);
    }

    /// Descriptor `i` of `table`.
    pub fn desc_at(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = table + 16 * u64::from(i);
        let mem = self.mem();
        mem.write_obj(addr, GuestAddress(at)).unwrap();
        mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    pub fn desc(&self, slot: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.desc_at(QUEUES + slot * 0x10000, i, addr, len, flags, next);
    }

    /// Puts `heads` in the avail ring of queue `slot` from entry `from` on (not yet published).
    pub fn ring(&self, slot: u64, from: u16, heads: &[u16]) {
        let avail = QUEUES + slot * 0x10000 + 0x1000;
        for (i, &h) in heads.iter().enumerate() {
            let at = avail + 4 + 2 * u64::from((from + i as u16) % QSIZE);
            self.mem().write_obj(h, GuestAddress(at)).unwrap();
        }
    }

    /// Publishes avail index `idx` of queue `slot` and notifies queue `q` of the device at
    /// `base`.
    pub fn publish(&mut self, base: u64, q: u32, slot: u64, idx: u16) {
        self.store16(avail_idx(slot), idx);
        self.store32(base + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY), q);
    }

    /// Waits until the device used `idx` chains of queue `slot`.
    pub fn wait_used(&mut self, slot: u64, idx: u16) {
        self.wait16(used_idx(slot), idx);
    }

    /// An indirect table at `table` of `n` descriptors: a header of `hdr_len` bytes at `hdr`,
    /// then `n - 1` descriptors of the whole RAM with `flags` (a chain of gigabytes).
    pub fn huge_table(&self, table: u64, n: u16, hdr: u64, hdr_len: u32, flags: u16) {
        self.desc_at(table, 0, hdr, hdr_len, NEXT, 1);
        for i in 1..n {
            let more = if i + 1 < n { NEXT } else { 0 };
            self.desc_at(table, i, 0, RAM as u32, flags | more, i + 1);
        }
    }

    /// Loads the interpreter, the script and long-mode page tables (identity, first GiB and
    /// the fourth, where the MMIO windows are) and starts a machine with fresh devices: a
    /// virtio-blk disk over `disk` if given, and the volume slots `volumes`.
    pub fn start(mut self, disk: Option<GuestRam>, volumes: &[VolumeAttach]) -> Machine {
        self.ops.push([0; 4]);
        {
            let m = self.ram.as_mut_slice();
            write_long_mode_tables(m, true);
            m[CODE as usize..CODE as usize + INTERP.len()].copy_from_slice(INTERP);
            for (i, op) in self.ops.iter().enumerate() {
                for (k, v) in op.iter().enumerate() {
                    put(m, SCRIPT + i as u64 * 32 + k as u64 * 8, *v);
                }
            }
        }
        assert!(
            SCRIPT + self.ops.len() as u64 * 32 <= TEXT,
            "the script fits"
        );
        let vm = MicroVm::new(self.ram, false).unwrap();
        enter_long_mode(&vm);
        Machine::start_loaded(vm, disk, volumes.len(), volumes, false).unwrap()
    }
}

fn put(m: &mut [u8], at: u64, v: u64) {
    m[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes());
}

/// Writes a flat GDT (null, 64-bit code at 0x08, data at 0x10) at `GDT` and long-mode page
/// tables at `PML4` into guest RAM `m`: 2 MiB pages mapping the first GiB to itself and, with
/// `mmio`, the fourth GiB too (where the MMIO windows are).
pub fn write_long_mode_tables(m: &mut [u8], mmio: bool) {
    for (i, e) in [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff]
        .into_iter()
        .enumerate()
    {
        put(m, GDT + i as u64 * 8, e);
    }
    put(m, PML4, 0x2000 | 3);
    put(m, 0x2000, 0x3000 | 3);
    for j in 0..512u64 {
        put(m, 0x3000 + j * 8, (j << 21) | 0x83);
    }
    if mmio {
        put(m, 0x2000 + 3 * 8, 0x4000 | 3);
        for j in 0..512u64 {
            put(m, 0x4000 + j * 8, ((3 << 30) + (j << 21)) | 0x83);
        }
    }
}

/// Puts the vCPU of `vm` in 64-bit long mode with flat segments, paging on the tables of
/// [`write_long_mode_tables`] and no IDT (an exception triple-faults), to run from `CODE`
/// with its stack below 0x8000.
pub fn enter_long_mode(vm: &MicroVm) {
    let mut s = vm.vcpu().get_sregs().unwrap();
    let seg = |selector: u16, type_: u8, l: u8, db: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s: 1,
        l,
        g: 1,
        ..Default::default()
    };
    let ds = seg(0x10, 3, 0, 1);
    s.cs = seg(0x08, 11, 1, 0);
    (s.ds, s.es, s.fs, s.gs, s.ss) = (ds, ds, ds, ds, ds);
    s.tr = kvm_segment {
        limit: 103,
        type_: 11,
        present: 1,
        ..Default::default()
    };
    s.gdt.base = GDT;
    s.gdt.limit = 23;
    s.idt.base = 0;
    s.idt.limit = 0;
    s.cr0 = 0x8005_0033;
    s.cr3 = PML4;
    s.cr4 = 0x20 | 0x200 | 0x400;
    s.efer = 0xd01;
    vm.vcpu().set_sregs(&s).unwrap();
    vm.vcpu()
        .set_regs(&kvm_regs {
            rip: CODE,
            rsp: 0x8000,
            rflags: 2,
            ..Default::default()
        })
        .unwrap();
}

/// A guest→host vsock packet header (`type_` 1 is a stream), with 64 KiB of buffer space.
pub fn packet(src_port: u32, dst_port: u32, type_: u16, op: u16) -> [u8; 44] {
    let mut b = [0u8; 44];
    b[0..8].copy_from_slice(&3u64.to_le_bytes());
    b[8..16].copy_from_slice(&2u64.to_le_bytes());
    b[16..20].copy_from_slice(&src_port.to_le_bytes());
    b[20..24].copy_from_slice(&dst_port.to_le_bytes());
    b[28..30].copy_from_slice(&type_.to_le_bytes());
    b[30..32].copy_from_slice(&op.to_le_bytes());
    b[36..40].copy_from_slice(&65536u32.to_le_bytes());
    b
}

/// A FUSE request header claiming `len` bytes in all.
pub fn fuse_header(len: u32, opcode: u32, unique: u64, nodeid: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(40);
    b.extend_from_slice(&len.to_le_bytes());
    b.extend_from_slice(&opcode.to_le_bytes());
    b.extend_from_slice(&unique.to_le_bytes());
    b.extend_from_slice(&nodeid.to_le_bytes());
    b.extend_from_slice(&[0u8; 16]);
    b
}

/// Where queue `slot`'s avail index lives.
pub fn avail_idx(slot: u64) -> u64 {
    QUEUES + slot * 0x10000 + 0x1000 + 2
}

/// Where queue `slot`'s used index lives.
pub fn used_idx(slot: u64) -> u64 {
    QUEUES + slot * 0x10000 + 0x2000 + 2
}

/// The used index of queue `slot`.
pub fn used(mem: &GuestMemory, slot: u64) -> u16 {
    mem.read_obj(GuestAddress(used_idx(slot))).unwrap()
}

/// Used entry `i` of queue `slot`: (head, length written).
pub fn used_entry(mem: &GuestMemory, slot: u64, i: u16) -> (u32, u32) {
    let at = QUEUES + slot * 0x10000 + 0x2000 + 4 + 8 * u64::from(i % QSIZE);
    (
        mem.read_obj(GuestAddress(at)).unwrap(),
        mem.read_obj(GuestAddress(at + 4)).unwrap(),
    )
}
