//! Hostile tiny guests against the virtio devices of a real [`Machine`]: a few dozen bytes of
//! long-mode code run a script that drives the devices through their MMIO registers, as a
//! guest driver would, and posts malicious chains (lengths of gigabytes, descriptor loops,
//! addresses outside guest memory, unknown request types) on the disk, vsock and a volume slot.
//! The host process survives, each device still answers a good request afterwards, and another
//! VM in the same process keeps working. Skipped, with a message, where /dev/kvm is missing.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use dormant_kvm::machine::{BLK_MMIO_BASE, FS_MMIO_BASE, Machine, VSOCK_MMIO_BASE};
use dormant_kvm::virtio::fs::VolumeAttach;
use dormant_kvm::vm::{GuestRam, MicroVm};
use kvm_bindings::{kvm_regs, kvm_segment};
use virtio_bindings::virtio_mmio::*;
use vm_memory::{Bytes, GuestAddress};

const RAM: u64 = 8 << 20;
const GDT: u64 = 0x500;
const PML4: u64 = 0x1000;
const CODE: u64 = 0x10000;
const SCRIPT: u64 = 0x11000;
/// Bytes the script prints.
const TEXT: u64 = 0x20000;
/// Queue `n`'s descriptor table, avail ring and used ring: `QUEUES + n * 0x10000` (+0, +0x1000,
/// +0x2000).
const QUEUES: u64 = 0x100000;
/// Request buffers.
const BUFS: u64 = 0x200000;
/// Indirect descriptor tables.
const TABLES: u64 = 0x300000;
const QSIZE: u16 = 16;

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
const INTERP: &[u8] = &[
    0x48, 0xc7, 0xc6, 0x00, 0x10, 0x01, 0x00, 0x48, 0x8b, 0x06, 0x48, 0x8b, 0x7e, 0x08, 0x48, 0x8b,
    0x56, 0x10, 0x48, 0x8b, 0x4e, 0x18, 0x48, 0x83, 0xc6, 0x20, 0x83, 0xf8, 0x01, 0x74, 0x17, 0x83,
    0xf8, 0x02, 0x74, 0x16, 0x83, 0xf8, 0x03, 0x74, 0x16, 0x83, 0xf8, 0x04, 0x74, 0x18, 0x83, 0xf8,
    0x05, 0x74, 0x1e, 0xf4, 0xeb, 0xfd, 0x89, 0x17, 0xeb, 0xcd, 0x66, 0x89, 0x17, 0xeb, 0xc8, 0x66,
    0x39, 0x17, 0x75, 0xfb, 0xeb, 0xc1, 0x8a, 0x07, 0x00, 0xd0, 0x66, 0xba, 0xf8, 0x03, 0xee, 0xeb,
    0xb6, 0x66, 0x8b, 0x02, 0x66, 0x01, 0xc8, 0x66, 0x89, 0x07, 0xeb, 0xf5,
];

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;

/// A tiny guest being put together: its RAM (written before it runs, as if the guest had
/// prepared it) and its script.
struct Guest {
    ram: GuestRam,
    ops: Vec<[u64; 4]>,
    text: u64,
}

impl Guest {
    fn new() -> Guest {
        Guest {
            ram: GuestRam::anonymous(RAM as usize).unwrap(),
            ops: Vec::new(),
            text: TEXT,
        }
    }

    fn mem(&self) -> &dormant_kvm::vm::GuestMemory {
        self.ram.memory()
    }

    fn bytes(&self, at: u64, b: &[u8]) {
        self.mem().write_slice(b, GuestAddress(at)).unwrap();
    }

    fn store32(&mut self, at: u64, v: u32) {
        self.ops.push([1, at, u64::from(v), 0]);
    }

    fn store16(&mut self, at: u64, v: u16) {
        self.ops.push([2, at, u64::from(v), 0]);
    }

    fn wait16(&mut self, at: u64, v: u16) {
        self.ops.push([3, at, u64::from(v), 0]);
    }

    /// Prints the byte at `at` plus `add`.
    fn putc(&mut self, at: u64, add: u8) {
        self.ops.push([4, at, u64::from(add), 0]);
    }

    fn print(&mut self, s: &str) {
        for b in s.bytes() {
            self.bytes(self.text, &[b]);
            self.putc(self.text, 0);
            self.text += 1;
        }
    }

    /// Forever: the avail index of queue `q` = its used index + `ahead` (keeps the ring full).
    fn flood(&mut self, q: u64, ahead: u16) {
        let base = QUEUES + q * 0x10000;
        self.ops
            .push([5, base + 0x1000 + 2, base + 0x2000 + 2, u64::from(ahead)]);
    }

    /// Brings the device at MMIO `base` up, as a driver does, with queues `qs` (device queue
    /// index, our queue slot), each of `QSIZE` entries.
    fn bring_up(&mut self, base: u64, qs: &[(u32, u64)]) {
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
    fn desc_at(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = table + 16 * u64::from(i);
        let mem = self.mem();
        mem.write_obj(addr, GuestAddress(at)).unwrap();
        mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    fn desc(&self, slot: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.desc_at(QUEUES + slot * 0x10000, i, addr, len, flags, next);
    }

    /// Puts `heads` in the avail ring of queue `slot` from entry `from` on (not yet published).
    fn ring(&self, slot: u64, from: u16, heads: &[u16]) {
        let avail = QUEUES + slot * 0x10000 + 0x1000;
        for (i, &h) in heads.iter().enumerate() {
            let at = avail + 4 + 2 * u64::from((from + i as u16) % QSIZE);
            self.mem().write_obj(h, GuestAddress(at)).unwrap();
        }
    }

    /// Publishes avail index `idx` of queue `slot` and notifies queue `q` of the device at
    /// `base`.
    fn publish(&mut self, base: u64, q: u32, slot: u64, idx: u16) {
        self.store16(QUEUES + slot * 0x10000 + 0x1000 + 2, idx);
        self.store32(base + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY), q);
    }

    /// Waits until the device used `idx` chains of queue `slot`.
    fn wait_used(&mut self, slot: u64, idx: u16) {
        self.wait16(QUEUES + slot * 0x10000 + 0x2000 + 2, idx);
    }

    /// An indirect table at `table` of `n` descriptors: a header of `hdr_len` bytes at `hdr`,
    /// then `n - 1` descriptors of the whole RAM with `flags` (a chain of gigabytes).
    fn huge_table(&self, table: u64, n: u16, hdr: u64, hdr_len: u32, flags: u16) {
        self.desc_at(table, 0, hdr, hdr_len, NEXT, 1);
        for i in 1..n {
            let more = if i + 1 < n { NEXT } else { 0 };
            self.desc_at(table, i, 0, RAM as u32, flags | more, i + 1);
        }
    }

    /// Loads the interpreter, the script and long-mode page tables (identity, first GiB and
    /// the fourth, where the MMIO windows are) and starts a machine with fresh devices.
    fn start(mut self, disk: bool, volumes: &[VolumeAttach]) -> Machine {
        self.ops.push([0; 4]);
        {
            let m = self.ram.as_mut_slice();
            let put = |m: &mut [u8], at: u64, v: u64| {
                m[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes())
            };
            for (i, e) in [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff]
                .into_iter()
                .enumerate()
            {
                put(m, GDT + i as u64 * 8, e);
            }
            put(m, PML4, 0x2000 | 3);
            put(m, 0x2000, 0x3000 | 3);
            put(m, 0x2000 + 3 * 8, 0x4000 | 3);
            for j in 0..512u64 {
                put(m, 0x3000 + j * 8, (j << 21) | 0x83);
                put(m, 0x4000 + j * 8, ((3 << 30) + (j << 21)) | 0x83);
            }
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
        let disk = disk.then(|| GuestRam::anonymous(1 << 20).unwrap());
        Machine::start_loaded(vm, disk, volumes.len(), volumes, false).unwrap()
    }
}

/// A guest→host vsock packet header.
fn packet(src_port: u32, dst_port: u32, type_: u16, op: u16) -> [u8; 44] {
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

/// A FUSE request header.
fn fuse(len: u32, opcode: u32, unique: u64, nodeid: u64) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&len.to_le_bytes());
    b.extend_from_slice(&opcode.to_le_bytes());
    b.extend_from_slice(&unique.to_le_bytes());
    b.extend_from_slice(&nodeid.to_le_bytes());
    b.extend_from_slice(&[0u8; 16]);
    b
}

const OP_RST: u16 = 3;

/// The hostile guest: on each device, malicious chains, then a good request whose answer it
/// prints: `B` status and first ID byte of a `GET_ID` (`B0d`), `V` the ops of two replies
/// (`V33`), `F` the error of a `GETATTR` (`F0`), then `!`.
fn hostile() -> Guest {
    let mut g = Guest::new();
    // virtio-blk, queue slot 0.
    let hdr = |kind: u32| {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h
    };
    g.bytes(BUFS, &hdr(99));
    g.bytes(BUFS + 0x100, &hdr(8));
    g.bytes(BUFS + 0x200, &hdr(0));
    // 0: an unknown request type with 510 writable descriptors of all RAM: 4080 MiB.
    g.huge_table(TABLES, 511, BUFS, 16, WRITE);
    g.desc(0, 0, TABLES, 511 * 16, INDIRECT, 0);
    // 1: a descriptor that loops onto itself.
    g.desc(0, 1, BUFS + 0x200, 16, NEXT, 1);
    // 2: outside guest memory.
    g.desc(0, 2, 1 << 40, 16, NEXT, 3);
    g.desc(0, 3, BUFS + 0x300, 1, WRITE, 0);
    // 4: GET_ID with 16 MiB of room.
    g.desc(0, 4, BUFS + 0x100, 16, NEXT, 5);
    g.desc(0, 5, 0, RAM as u32, WRITE | NEXT, 6);
    g.desc(0, 6, 0, RAM as u32, WRITE, 0);
    // 7: a good GET_ID.
    g.desc(0, 7, BUFS + 0x100, 16, NEXT, 8);
    g.desc(0, 8, BUFS + 0x400, 21, WRITE, 0);
    g.bring_up(BLK_MMIO_BASE, &[(0, 0)]);
    g.ring(0, 0, &[0, 1, 2, 4, 7]);
    g.publish(BLK_MMIO_BASE, 0, 0, 4);
    g.wait_used(0, 4);
    g.publish(BLK_MMIO_BASE, 0, 0, 5);
    g.wait_used(0, 5);
    g.print("B");
    g.putc(BUFS + 0x400 + 20, b'0');
    g.putc(BUFS + 0x400, 0);

    // virtio-vsock: RX in slot 1, TX in slot 2.
    let v = BUFS + 0x10000;
    g.bytes(v, &packet(70, 80, 1, OP_RST));
    g.bytes(v + 0x100, &packet(71, 81, 9, 99));
    g.bytes(v + 0x200, &packet(77, 88, 1, 1));
    // 0: 4080 MiB to read; 1: a loop; 2: outside memory; 3: an unknown type and op (refused
    // with a reset); 4: a good connection request (refused with a reset).
    g.huge_table(TABLES + 0x10000, 511, v, 44, 0);
    g.desc(2, 0, TABLES + 0x10000, 511 * 16, INDIRECT, 0);
    g.desc(2, 1, v, 44, NEXT, 1);
    g.desc(2, 2, 1 << 40, 44, 0, 0);
    g.desc(2, 3, v + 0x100, 44, 0, 0);
    g.desc(2, 4, v + 0x200, 44, 0, 0);
    // Two receive buffers.
    g.desc(1, 0, v + 0x1000, 44 + 4096, WRITE, 0);
    g.desc(1, 1, v + 0x3000, 44 + 4096, WRITE, 0);
    g.bring_up(VSOCK_MMIO_BASE, &[(0, 1), (1, 2)]);
    g.ring(1, 0, &[0, 1]);
    g.ring(2, 0, &[0, 1, 2, 3, 4]);
    g.publish(VSOCK_MMIO_BASE, 0, 1, 2);
    g.publish(VSOCK_MMIO_BASE, 1, 2, 5);
    g.wait_used(2, 5);
    g.wait_used(1, 2);
    g.print("V");
    // The replies' ops (resets: `3`).
    g.putc(v + 0x1000 + 30, b'0');
    g.putc(v + 0x3000 + 30, b'0');

    // virtio-fs slot 0: hiprio in slot 3, requests in slot 4.
    let f = BUFS + 0x20000;
    g.bytes(f, &fuse(u32::MAX, 16, 5, 1));
    g.bytes(f + 0x100, &fuse(40, 999, 6, 1));
    let mut getattr = fuse(56, 3, 7, 1);
    getattr.extend_from_slice(&[0u8; 16]);
    g.bytes(f + 0x200, &getattr);
    // 0: 4080 MiB of request; 1: a loop; 2: outside memory; 3: an unknown opcode; 4: GETATTR.
    g.huge_table(TABLES + 0x20000, 511, f, 40, 0);
    g.desc(4, 0, TABLES + 0x20000, 511 * 16, INDIRECT, 0);
    g.desc(4, 1, f, 40, NEXT, 1);
    g.desc(4, 2, 1 << 40, 40, NEXT, 5);
    g.desc(4, 5, f + 0x1000, 4096, WRITE, 0);
    g.desc(4, 3, f + 0x100, 40, NEXT, 6);
    g.desc(4, 6, f + 0x2000, 4096, WRITE, 0);
    g.desc(4, 4, f + 0x200, 56, NEXT, 7);
    g.desc(4, 7, f + 0x3000, 4096, WRITE, 0);
    g.bring_up(FS_MMIO_BASE, &[(0, 3), (1, 4)]);
    g.ring(4, 0, &[0, 1, 2, 3, 4]);
    g.publish(FS_MMIO_BASE, 1, 4, 5);
    g.wait_used(4, 5);
    g.print("F");
    // The reply's error (0) is the low byte of the i32 at offset 4.
    g.putc(f + 0x3000 + 4, b'0');
    g.print("!");
    g
}

/// The well-behaved guest: posts a receive buffer, waits for the host's connection request
/// on guest port 1234, accepts it and prints `b`, the request's op (`1`), then `!`.
fn friendly() -> Guest {
    let mut g = Guest::new();
    let v = BUFS;
    // The host's first connection comes from its port 1 << 30.
    g.bytes(v + 0x100, &packet(1234, 1 << 30, 1, 2));
    g.desc(1, 0, v + 0x1000, 44 + 4096, WRITE, 0);
    g.desc(2, 0, v + 0x100, 44, 0, 0);
    g.bring_up(VSOCK_MMIO_BASE, &[(0, 1), (1, 2)]);
    g.ring(1, 0, &[0]);
    g.ring(2, 0, &[0]);
    g.publish(VSOCK_MMIO_BASE, 0, 1, 1);
    g.print("b");
    g.wait_used(1, 1);
    g.putc(v + 0x1000 + 30, b'0');
    g.publish(VSOCK_MMIO_BASE, 1, 2, 1);
    g.wait_used(2, 1);
    g.print("!");
    g
}

const CHILD: &str = "DORMANT_HOSTILE_TEST_CHILD";
const MINUTES: Duration = Duration::from_secs(300);

/// The scenario, in a child process whose address space is capped 2 GiB above what it uses
/// (as under a container's or a user's memory limit): an allocation sized by the guest's
/// claims (4 GiB here) fails there, and Rust aborts the process.
fn child() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let vm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let cap = (vm_kib << 10) + (2 << 30);
    let limit = libc::rlimit {
        rlim_cur: cap,
        rlim_max: cap,
    };
    // SAFETY: setrlimit reads the struct passed; it lowers this process's own limit only.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) }, 0);

    let dir = tempfile::tempdir().unwrap();
    let friendly = friendly().start(false, &[]);
    assert!(
        friendly.console().wait_for("b", MINUTES),
        "the friendly guest runs"
    );
    let volume = VolumeAttach {
        host: dir.path().to_path_buf(),
        read_only: false,
    };
    let hostile = hostile().start(true, &[volume]);
    assert!(
        hostile.console().wait_for("!", MINUTES),
        "the hostile guest got its answers: {:?}",
        hostile.console().text()
    );
    assert_eq!(hostile.console().text(), "B0dV33F0!");
    // The other VM of this process still works: it accepts a connection from the host.
    let stream = friendly
        .vsock()
        .connect(1234, MINUTES)
        .expect("the friendly guest accepts a connection");
    assert!(friendly.console().wait_for("b1!", MINUTES));
    drop(stream);
    assert!(hostile.is_running() && friendly.is_running());
    println!("SURVIVED");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn hostile_chains_on_every_device_leave_the_host_and_another_vm_working() {
    if std::env::var_os(CHILD).is_some() {
        child();
        return;
    }
    let o = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "hostile_chains_on_every_device_leave_the_host_and_another_vm_working",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && out.contains("SURVIVED"),
        "the host process running the hostile guest ended with {}\n{out}\n{err}",
        o.status
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn a_guest_that_keeps_its_queue_full_is_still_reachable_checkpointed_and_stopped() {
    let mut g = Guest::new();
    // Every entry of the TX ring is one connection request; the guest keeps the ring full and
    // never posts a receive buffer.
    g.bytes(BUFS, &packet(5, 6, 1, 1));
    g.desc(2, 0, BUFS, 44, 0, 0);
    g.bring_up(VSOCK_MMIO_BASE, &[(0, 1), (1, 2)]);
    g.ring(2, 0, &[0; QSIZE as usize]);
    g.print("f");
    g.publish(VSOCK_MMIO_BASE, 1, 2, QSIZE);
    g.flood(2, QSIZE);
    let mut m = g.start(false, &[]);
    assert!(m.console().wait_for("f", MINUTES));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // The host side of the device gets its turn: the guest never answers, so this times out.
        let r = m.vsock().connect(99, Duration::from_secs(2));
        assert!(r.is_err());
        let (vm, _, devices) = m.quiesce().unwrap();
        assert!(devices.vsock.transport.queues[1].ready);
        m.unquiesce(vm).unwrap();
        assert!(m.is_running());
        drop(m);
        tx.send(()).unwrap();
    });
    rx.recv_timeout(MINUTES)
        .expect("connect, checkpoint and stop got through within five minutes");
}
