//! The device shell's unit tests: chains handed to a probe device (caps, unsound chains,
//! indirect tables), the per-round share of a queue, and pause and stop under a full ring.

use super::*;
use crate::vm::GuestRam;
use std::io::{Read, Write};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Address, Bytes, GuestAddress};

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
