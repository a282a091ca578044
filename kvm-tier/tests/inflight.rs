//! Requests in flight across a checkpoint: tiny hand-written guests drive the disk, vsock and a
//! volume slot of a real [`Machine`] through their MMIO registers (as in `tests/hostile.rs`);
//! at the checkpoint, chains sit in a virtqueue's avail ring that the device has not served
//! yet. (The guest's avail-index store is made by the test into the quiesced guest's RAM, on
//! its driver's behalf: with the vCPU stopped and the devices paused, that is the one moment
//! where a published chain is certain not to have been served, without racing the device's
//! worker.)
//! The machine is written to a real store (`snapshot::save_machine`), stopped, loaded into a
//! brand-new VM (`snapshot::load_machine`) and rebuilt (`Machine::restore`). Each pending
//! chain must then complete exactly once, with the right answer, and nothing served before the
//! checkpoint may be served again: used-ring indices, used entries and `next_avail` are
//! checked along with the answers. Skipped, with a message, where /dev/kvm is missing.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;
use dormant_core::{LocalStore, SandboxSpec, SnapshotId, Tier, Workload};
use dormant_kvm::machine::{BLK_MMIO_BASE, DevicesState, FS_MMIO_BASE, Machine, VSOCK_MMIO_BASE};
use dormant_kvm::snapshot::{self, Unsaved};
use dormant_kvm::virtio::fs::VolumeAttach;
use dormant_kvm::vm::{GuestMemory, GuestRam};
use vm_memory::{Bytes, GuestAddress};

/// Generous: the tiny guests answer in milliseconds, but the host may be loaded.
const DEADLINE: Duration = Duration::from_secs(180);

/// The guest's driver publishes avail index `idx` of queue `slot` (no notification: the device
/// is paused anyway).
fn publish(mem: &GuestMemory, slot: u64, idx: u16) {
    mem.write_obj(idx, GuestAddress(avail_idx(slot))).unwrap();
}

fn read(mem: &GuestMemory, at: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(at)).unwrap();
    v
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn spec() -> SandboxSpec {
    SandboxSpec::new(Tier::Kvm, Workload::Files)
}

/// The checkpoint: quiesces `m` (vCPU stopped, devices paused); `pending` then writes into the
/// paused guest's RAM what its driver published in the avail rings just before (so the device
/// never saw it); the whole machine is written to `store` as a full snapshot, and `m` is
/// stopped. Returns the snapshot and the device state it holds.
fn checkpoint(
    mut m: Machine,
    store: &LocalStore,
    pending: impl FnOnce(&GuestMemory),
) -> (SnapshotId, DevicesState) {
    let (vm, state, devices) = m.quiesce().unwrap();
    pending(vm.ram().memory());
    let id = snapshot::save_machine(
        store,
        &vm,
        &state,
        Some(&devices),
        m.disk(),
        None,
        &Unsaved::default(),
        "inflight",
        &spec(),
    )
    .unwrap();
    drop(vm);
    drop(m);
    (id, devices)
}

/// The snapshot `id` loaded into a brand-new VM and rebuilt into a running machine, `volumes`
/// attached to its first volume slots.
fn restore(store: &LocalStore, id: &SnapshotId, volumes: &[VolumeAttach]) -> Machine {
    let l = snapshot::load_machine(store, id).unwrap();
    let devices = l.devices.expect("the snapshot has device state");
    Machine::restore(l.vm, &devices, l.disk, false, volumes).unwrap()
}

/// Waits for the guest to print `text`; if it does not, says where the used indices of the
/// queues in `slots` stand (its script waits for exact values: a device that serves a chain
/// twice, or loses one, makes it wait forever).
fn wait_print(m: &mut Machine, text: &str, slots: &[u64]) {
    if m.console().wait_for(text, DEADLINE) {
        return;
    }
    let printed = m.console().text();
    let used: Vec<(u64, u16)> = match m.quiesce() {
        Ok((vm, _, _)) => slots
            .iter()
            .map(|&s| (s, used(vm.ram().memory(), s)))
            .collect(),
        Err(_) => Vec::new(),
    };
    panic!(
        "the guest printed {printed:?}, not {text:?}, within {DEADLINE:?}; used indices (queue \
         slot, index): {used:?}"
    );
}

const SECTOR: u64 = 512;
const BLK_OUT: u32 = 1;
const BLK_IN: u32 = 0;

/// A 4 KiB block of pattern `seed`.
fn block(seed: u8) -> Vec<u8> {
    (0..4096u32)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn disk_requests_pending_at_a_checkpoint_complete_once_after_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let store = LocalStore::open(tmp.path()).unwrap();
    // The disk as the guest found it: a block at sector 8.
    let disk = GuestRam::anonymous(1 << 20).unwrap();
    disk.memory()
        .write_slice(&block(1), GuestAddress(8 * SECTOR))
        .unwrap();
    let (w1, w2) = (block(2), block(3));

    // Chain k (head 3k): header at BUFS + 0x100k, 4 KiB of data at BUFS + 0x10000 + 0x1000k,
    // status at BUFS + 0x800 + 0x10k.
    let mut g = Guest::new();
    let data = |k: u16| BUFS + 0x10000 + 0x1000 * u64::from(k);
    let status = |k: u16| BUFS + 0x800 + 0x10 * u64::from(k);
    let chain = |g: &Guest, k: u16, kind: u32, sector: u64| {
        let hdr = BUFS + 0x100 * u64::from(k);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        g.bytes(hdr, &h);
        g.bytes(status(k), &[0xee]);
        let dflags = if kind == BLK_IN { WRITE } else { 0 };
        g.desc(0, 3 * k, hdr, 16, NEXT, 3 * k + 1);
        g.desc(0, 3 * k + 1, data(k), 4096, dflags | NEXT, 3 * k + 2);
        g.desc(0, 3 * k + 2, status(k), 1, WRITE, 0);
    };
    // 0: served before the checkpoint: writes w1 at sector 16.
    g.bytes(data(0), &w1);
    chain(&g, 0, BLK_OUT, 16);
    // Pending at the checkpoint: 1 reads sector 16 (w1, from the snapshot's disk), 2 reads
    // sector 8 (the disk as it was at boot), 3 writes w2 at sector 32.
    chain(&g, 1, BLK_IN, 16);
    chain(&g, 2, BLK_IN, 8);
    g.bytes(data(3), &w2);
    chain(&g, 3, BLK_OUT, 32);
    g.ring(0, 0, &[0, 3, 6, 9]);
    g.bring_up(BLK_MMIO_BASE, &[(0, 0)]);
    g.publish(BLK_MMIO_BASE, 0, 0, 1);
    g.wait_used(0, 1);
    g.print("w");
    g.wait_used(0, 4);
    g.print("!");
    let mut m = g.start(Some(disk), &[]);
    wait_print(&mut m, "w", &[0]);

    let (id, at_checkpoint) = checkpoint(m, &store, |mem| {
        assert_eq!(used(mem, 0), 1, "only the first chain was served");
        publish(mem, 0, 4);
    });
    let q = &at_checkpoint.block.as_ref().unwrap().transport.queues[0];
    assert_eq!((q.next_avail, q.next_used), (1, 1));

    let mut m = restore(&store, &id, &[]);
    wait_print(&mut m, "!", &[0]);
    let (vm, state, devices) = m.quiesce().unwrap();
    let mem = vm.ram().memory();
    assert_eq!(used(mem, 0), 4, "each pending chain used once, none twice");
    let entries: Vec<_> = (0..4).map(|i| used_entry(mem, 0, i)).collect();
    assert_eq!(
        entries,
        [(0, 1), (3, 4097), (6, 4097), (9, 1)],
        "used entries (head, length): the pending chains in order after the one served before"
    );
    for k in 0..4 {
        assert_eq!(read(mem, status(k), 1), [0], "chain {k}'s status is OK");
    }
    assert_eq!(
        read(mem, data(1), 4096),
        w1,
        "the read of sector 16 gives the block written before the checkpoint"
    );
    assert_eq!(
        read(mem, data(2), 4096),
        block(1),
        "the read of sector 8 gives the disk's block from boot"
    );
    let q = &devices.block.as_ref().unwrap().transport.queues[0];
    assert_eq!((q.next_avail, q.next_used), (4, 4));
    let disk = m.disk().unwrap().memory();
    assert_eq!(
        read(disk, 32 * SECTOR, 4096),
        w2,
        "the write reached the disk"
    );
    assert_eq!(read(disk, 16 * SECTOR, 4096), w1);

    // The write is in the next checkpoint, an incremental one on the first.
    let mut unsaved = Unsaved::default();
    unsaved.collect(&vm, m.disk());
    let next = snapshot::save_machine(
        &store,
        &vm,
        &state,
        Some(&devices),
        m.disk(),
        Some(&store.manifest(&id).unwrap()),
        &unsaved,
        "inflight",
        &spec(),
    )
    .unwrap();
    assert_eq!(store.manifest(&next).unwrap().parent.as_ref(), Some(&id));
    drop(vm);
    drop(m);
    let l = snapshot::load_machine(&store, &next).unwrap();
    let disk = l.disk.as_ref().unwrap().memory();
    assert_eq!(
        read(disk, 32 * SECTOR, 4096),
        w2,
        "the write is in the next checkpoint"
    );
    assert_eq!(read(disk, 16 * SECTOR, 4096), w1);
    assert_eq!(read(disk, 8 * SECTOR, 4096), block(1));
}

const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_RW: u16 = 5;
/// The host's first connection's port (the next ones count up).
const HOST_PORT: u32 = 1 << 30;

/// A host→guest packet's header fields: (src port, dst port, len, type, op), after checking
/// the context ids.
fn host_packet(b: &[u8]) -> (u32, u32, u32, u16, u16) {
    assert_eq!((u64_at(b, 0), u64_at(b, 8)), (2, 3), "host to guest");
    (
        u32_at(b, 16),
        u32_at(b, 20),
        u32_at(b, 24),
        u16::from_le_bytes([b[28], b[29]]),
        u16::from_le_bytes([b[30], b[31]]),
    )
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn vsock_buffers_and_packets_pending_at_a_checkpoint_are_used_once_after_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let store = LocalStore::open(tmp.path()).unwrap();
    let v = BUFS;
    let rx = |i: u16| v + 0x10000 + 0x2000 * u64::from(i);
    const RX_LEN: u32 = 44 + 4096;
    let mut g = Guest::new();
    // RX (queue 0) in slot 1: five receive buffers, two posted before the checkpoint.
    for i in 0..5 {
        g.desc(1, i, rx(i), RX_LEN, WRITE, 0);
    }
    g.ring(1, 0, &[0, 1, 2, 3, 4]);
    // TX (queue 1) in slot 2: accepting the host's two connections before the checkpoint;
    // pending at the checkpoint, a connection request to the host (refused with a reset).
    g.bytes(v, &packet(1234, HOST_PORT, 1, OP_RESPONSE));
    g.bytes(v + 0x100, &packet(1235, HOST_PORT + 1, 1, OP_RESPONSE));
    g.bytes(v + 0x200, &packet(77, 88, 1, OP_REQUEST));
    for i in 0..3u16 {
        g.desc(2, i, v + 0x100 * u64::from(i), 44, 0, 0);
    }
    g.ring(2, 0, &[0, 1, 2]);
    g.bring_up(VSOCK_MMIO_BASE, &[(0, 1), (1, 2)]);
    g.publish(VSOCK_MMIO_BASE, 0, 1, 2);
    g.wait_used(1, 1);
    g.publish(VSOCK_MMIO_BASE, 1, 2, 1);
    g.wait_used(2, 1);
    g.wait_used(1, 2);
    g.publish(VSOCK_MMIO_BASE, 1, 2, 2);
    g.wait_used(2, 2);
    g.print("c");
    g.wait_used(1, 5);
    g.wait_used(2, 3);
    g.print("!");
    let mut m = g.start(None, &[]);
    let idle = m.vsock().connect(1234, DEADLINE).unwrap();
    let mut busy = m.vsock().connect(1235, DEADLINE).unwrap();
    wait_print(&mut m, "c", &[1, 2]);
    // No receive buffer is left: these bytes are still in the host's buffer at the checkpoint.
    busy.write_all(b"in flight").unwrap();

    let (id, at_checkpoint) = checkpoint(m, &store, |mem| {
        assert_eq!((used(mem, 1), used(mem, 2)), (2, 2));
        // Three more receive buffers and the connection request.
        publish(mem, 1, 5);
        publish(mem, 2, 3);
    });
    drop((idle, busy));
    let vs = &at_checkpoint.vsock;
    assert_eq!(
        vs.open,
        [(HOST_PORT + 1, 1235)],
        "the busy connection is reset"
    );
    assert_eq!(
        vs.live
            .iter()
            .map(|c| (c.local, c.peer))
            .collect::<Vec<_>>(),
        [(HOST_PORT, 1234)],
        "the idle connection survives"
    );
    let qs = &vs.transport.queues;
    assert_eq!((qs[0].next_avail, qs[1].next_avail), (2, 2));

    let mut m = restore(&store, &id, &[]);
    let mut idle = m.vsock().adopt(1234).expect("the idle connection is back");
    idle.write_all(b"after restore").unwrap();
    wait_print(&mut m, "!", &[1, 2]);
    let (vm, _, devices) = m.quiesce().unwrap();
    let mem = vm.ram().memory();
    assert_eq!(
        (used(mem, 1), used(mem, 2)),
        (5, 3),
        "each pending buffer and packet used once, none twice"
    );
    assert_eq!(
        (2..5).map(|i| used_entry(mem, 1, i)).collect::<Vec<_>>(),
        [(2, 44), (3, 44), (4, 44 + 13)],
        "the receive buffers posted at the checkpoint, in order"
    );
    assert_eq!(used_entry(mem, 2, 2), (2, 0), "the pending packet consumed");
    assert_eq!(
        host_packet(&read(mem, rx(2), 44)),
        (HOST_PORT + 1, 1235, 0, 1, OP_RST),
        "the reset of the connection that had data in flight"
    );
    assert_eq!(
        host_packet(&read(mem, rx(3), 44)),
        (88, 77, 0, 1, OP_RST),
        "the refusal of the connection request pending at the checkpoint"
    );
    assert_eq!(
        host_packet(&read(mem, rx(4), 44)),
        (HOST_PORT, 1234, 13, 1, OP_RW),
        "the adopted connection's data"
    );
    assert_eq!(read(mem, rx(4) + 44, 13), b"after restore");
    let qs = &devices.vsock.transport.queues;
    assert_eq!(
        (
            qs[0].next_avail,
            qs[0].next_used,
            qs[1].next_avail,
            qs[1].next_used
        ),
        (5, 5, 3, 3)
    );
}

const FUSE_LOOKUP: u32 = 1;
const FUSE_GETATTR: u32 = 3;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;

/// A FUSE request: its header and `body`.
fn fuse(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let mut b = fuse_header(40 + body.len() as u32, opcode, unique, nodeid);
    b.extend_from_slice(body);
    b
}

/// A FUSE reply's header (len, error, unique) and its body.
fn fuse_reply(mem: &GuestMemory, at: u64) -> (u32, i32, u64, Vec<u8>) {
    let h = read(mem, at, 16);
    let len = u32_at(&h, 0);
    let body = read(mem, at + 16, (len as usize).saturating_sub(16).min(4080));
    (len, u32_at(&h, 4) as i32, u64_at(&h, 8), body)
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn fuse_requests_pending_at_a_checkpoint_are_answered_once_after_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let store = LocalStore::open(tmp.path().join("store")).unwrap();
    let dir = tmp.path().join("volume");
    std::fs::create_dir(&dir).unwrap();
    const CONTENT: &[u8] = b"hello from the volume\n";
    std::fs::write(dir.join("hello.txt"), CONTENT).unwrap();
    let volumes = [VolumeAttach {
        host: dir.clone(),
        read_only: false,
    }];
    // Request queue (queue 1) in slot 4, hiprio (queue 0) in slot 3. Chain k (head 2k): the
    // request at BUFS + 0x100k, 4 KiB of room for the reply at BUFS + 0x1000 + 0x1000k.
    let req = |k: u16| BUFS + 0x100 * u64::from(k);
    let reply = |k: u16| BUFS + 0x1000 + 0x1000 * u64::from(k);
    let chain = |mem: &GuestMemory, k: u16, request: &[u8]| {
        mem.write_slice(request, GuestAddress(req(k))).unwrap();
        let at = QUEUES + 4 * 0x10000 + 32 * u64::from(k);
        for (i, (addr, len, flags, next)) in [
            (req(k), request.len() as u32, NEXT, 2 * k + 1),
            (reply(k), 4096, WRITE, 0),
        ]
        .into_iter()
        .enumerate()
        {
            let d = at + 16 * i as u64;
            mem.write_obj(addr, GuestAddress(d)).unwrap();
            mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            mem.write_obj(next, GuestAddress(d + 14)).unwrap();
        }
    };
    let mut g = Guest::new();
    chain(g.mem(), 0, &fuse(FUSE_LOOKUP, 1, 1, b"hello.txt\0"));
    g.ring(4, 0, &[0, 2, 4, 6]);
    g.bring_up(FS_MMIO_BASE, &[(0, 3), (1, 4)]);
    g.publish(FS_MMIO_BASE, 1, 4, 1);
    g.wait_used(4, 1);
    g.print("l");
    g.wait_used(4, 2);
    g.print("o");
    g.wait_used(4, 4);
    g.print("!");
    let mut m = g.start(None, &volumes);
    wait_print(&mut m, "l", &[4]);

    // The driver opens the file it looked up (published while paused, served after).
    let (vm, _, _) = m.quiesce().unwrap();
    let mem = vm.ram().memory();
    let (len, err, unique, entry) = fuse_reply(mem, reply(0));
    assert_eq!((len, err, unique), (16 + 128, 0, 1), "LOOKUP answered");
    let node = u64_at(&entry, 0);
    assert_eq!(u64_at(&entry, 48), CONTENT.len() as u64, "the file's size");
    chain(mem, 1, &fuse(FUSE_OPEN, 2, node, &[0u8; 8]));
    publish(mem, 4, 2);
    m.unquiesce(vm).unwrap();
    wait_print(&mut m, "o", &[4]);

    let (id, at_checkpoint) = checkpoint(m, &store, |mem| {
        assert_eq!(used(mem, 4), 2);
        let (len, err, unique, open) = fuse_reply(mem, reply(1));
        assert_eq!((len, err, unique), (32, 0, 2), "OPEN answered");
        let fh = u64_at(&open, 0);
        // Pending: a READ of the opened file and a GETATTR of its node.
        let mut read_in = Vec::new();
        read_in.extend_from_slice(&fh.to_le_bytes());
        read_in.extend_from_slice(&0u64.to_le_bytes());
        read_in.extend_from_slice(&4096u32.to_le_bytes());
        read_in.extend_from_slice(&[0u8; 20]);
        chain(mem, 2, &fuse(FUSE_READ, 3, node, &read_in));
        chain(mem, 3, &fuse(FUSE_GETATTR, 4, node, &[0u8; 16]));
        publish(mem, 4, 4);
    });
    let fs = &at_checkpoint.fs[0];
    assert_eq!(fs.transport.queues[1].next_avail, 2);
    let volume = fs.volume.as_ref().expect("the volume's state is saved");
    assert_eq!(volume.handles.len(), 1, "the open file is in the snapshot");

    let mut m = restore(&store, &id, &volumes);
    wait_print(&mut m, "!", &[4]);
    let (vm, _, devices) = m.quiesce().unwrap();
    let mem = vm.ram().memory();
    assert_eq!(
        used(mem, 4),
        4,
        "each pending request answered once, none twice"
    );
    let (len, err, unique, data) = fuse_reply(mem, reply(2));
    assert_eq!((err, unique), (0, 3), "READ answered");
    assert_eq!(len, 16 + CONTENT.len() as u32);
    assert_eq!(
        data, CONTENT,
        "the file's bytes through the re-attached volume"
    );
    let (attr_len, err, unique, attr) = fuse_reply(mem, reply(3));
    assert_eq!((err, unique), (0, 4), "GETATTR answered");
    assert_eq!(u64_at(&attr, 16 + 8), CONTENT.len() as u64, "attr.size");
    assert_eq!(
        (2..4).map(|i| used_entry(mem, 4, i)).collect::<Vec<_>>(),
        [(4, len), (6, attr_len)],
        "used entries (head, length) of the pending requests"
    );
    let volume = devices.fs[0].volume.as_ref().unwrap();
    assert_eq!(
        volume.handles.len(),
        1,
        "the OPEN served before the checkpoint is not served again"
    );
    let q = &devices.fs[0].transport.queues[1];
    assert_eq!((q.next_avail, q.next_used), (4, 4));
}
