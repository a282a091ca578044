//! The virtio-over-MMIO transport (virtio 1.x, register layout version 2) for one device.
//!
//! The vCPU thread reads and writes registers through [`MmioTransport::read`] /
//! [`MmioTransport::write`]; queue notifications arrive on ioeventfds and are served by the
//! device's worker thread; interrupts go out through an irqfd.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::vm::GuestMemory;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK as STATUS_DRIVER_OK, VIRTIO_CONFIG_S_FAILED as STATUS_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK as STATUS_FEATURES_OK,
};
use virtio_bindings::virtio_mmio::*;

pub const MMIO_SIZE: u64 = 0x1000;
/// Offset of QueueNotify (the ioeventfd address).
pub const QUEUE_NOTIFY: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;
const MAGIC: u32 = 0x7472_6976; // "virt"
const VENDOR: u32 = 0x4d52_4f44; // "DORM"
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// Interrupt status bit: a used buffer was returned.
pub const INT_VRING: u32 = VIRTIO_MMIO_INT_VRING;

/// What a device behind the transport provides.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Feature bits offered (VIRTIO_F_VERSION_1 is added by the transport).
    fn features(&self) -> u64;
    fn queue_max_sizes(&self) -> &[u16];
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver reset the device.
    fn reset(&mut self);
}

/// One virtqueue's registers and ring positions, in a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSnap {
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub next_avail: u16,
    pub next_used: u16,
}

/// Most virtqueues a transport state may hold (decoding refuses more; devices have 1 to 3).
pub const MAX_QUEUES: usize = 8;

/// The transport's registers in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    pub device_features_sel: u32,
    pub driver_features: u64,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub status: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    #[serde(deserialize_with = "dormant_core::snapshot::bounded_vec::<_, _, MAX_QUEUES>")]
    pub queues: Vec<QueueSnap>,
}

/// The interrupt side of a transport, shared with the worker thread.
#[derive(Debug, Clone)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    irq: Arc<EventFd>,
}

impl Interrupt {
    pub fn new(irq: EventFd) -> Interrupt {
        Interrupt {
            status: Arc::new(AtomicU32::new(0)),
            irq: Arc::new(irq),
        }
    }

    /// Raises the used-buffer interrupt.
    pub fn signal_used(&self) {
        self.status.fetch_or(INT_VRING, Ordering::SeqCst);
        let _ = self.irq.write(1);
    }

    pub fn irq_fd(&self) -> &EventFd {
        &self.irq
    }
}

/// The transport with its device.
pub struct MmioTransport<D: VirtioDevice> {
    pub device: D,
    pub queues: Vec<Queue>,
    pub mem: GuestMemory,
    pub interrupt: Interrupt,
    device_features_sel: u32,
    driver_features: u64,
    driver_features_sel: u32,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
}

impl<D: VirtioDevice> std::fmt::Debug for MmioTransport<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

fn new_queues(sizes: &[u16]) -> Vec<Queue> {
    sizes
        .iter()
        .map(|&s| Queue::new(s).expect("queue sizes are powers of two"))
        .collect()
}

impl<D: VirtioDevice> MmioTransport<D> {
    pub fn new(device: D, mem: GuestMemory, interrupt: Interrupt) -> MmioTransport<D> {
        let queues = new_queues(device.queue_max_sizes());
        MmioTransport {
            device,
            queues,
            mem,
            interrupt,
            device_features_sel: 0,
            driver_features: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
        }
    }

    fn features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    /// Whether the driver finished setting the device up (queues may be used).
    pub fn is_active(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_FAILED == 0
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// A 4-byte (or config-space) register read.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        let config = VIRTIO_MMIO_CONFIG as u64;
        if offset >= config {
            self.device.read_config(offset - config, data);
            return;
        }
        let v: u32 = match offset as u32 {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => 2,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.features() as u32,
                1 => (self.features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected().map_or(0, |q| q.max_size() as u32),
            VIRTIO_MMIO_QUEUE_READY => self.selected().map_or(0, |q| q.ready() as u32),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status.load(Ordering::SeqCst),
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        let b = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&b[..n]);
    }

    /// A register write. Returns true when the write was a queue notification (only when no
    /// ioeventfd took it).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Option<u16> {
        let config = VIRTIO_MMIO_CONFIG as u64;
        if offset >= config {
            self.device.write_config(offset - config, data);
            return None;
        }
        if data.len() != 4 {
            return None;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let lo = |q: &mut Queue, f: fn(&mut Queue, Option<u32>, Option<u32>)| f(q, Some(v), None);
        let hi = |q: &mut Queue, f: fn(&mut Queue, Option<u32>, Option<u32>)| f(q, None, Some(v));
        let configurable = self.status & STATUS_DRIVER_OK == 0;
        match offset as u32 {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES if self.status & STATUS_FEATURES_OK == 0 => match self
                .driver_features_sel
            {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v as u64,
                1 => {
                    self.driver_features = (self.driver_features & 0xffff_ffff) | ((v as u64) << 32)
                }
                _ => {}
            },
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM if configurable => {
                if let Some(q) = self.selected() {
                    q.set_size(v as u16);
                }
            }
            VIRTIO_MMIO_QUEUE_READY if configurable => {
                if let Some(q) = self.selected() {
                    q.set_ready(v == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => return Some(v as u16),
            VIRTIO_MMIO_INTERRUPT_ACK => {
                self.interrupt.status.fetch_and(!v, Ordering::SeqCst);
            }
            VIRTIO_MMIO_STATUS => self.set_status(v),
            VIRTIO_MMIO_QUEUE_DESC_LOW if configurable => {
                if let Some(q) = self.selected() {
                    lo(q, Queue::set_desc_table_address)
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH if configurable => {
                if let Some(q) = self.selected() {
                    hi(q, Queue::set_desc_table_address)
                }
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW if configurable => {
                if let Some(q) = self.selected() {
                    lo(q, Queue::set_avail_ring_address)
                }
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH if configurable => {
                if let Some(q) = self.selected() {
                    hi(q, Queue::set_avail_ring_address)
                }
            }
            VIRTIO_MMIO_QUEUE_USED_LOW if configurable => {
                if let Some(q) = self.selected() {
                    lo(q, Queue::set_used_ring_address)
                }
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH if configurable => {
                if let Some(q) = self.selected() {
                    hi(q, Queue::set_used_ring_address)
                }
            }
            _ => {}
        }
        None
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            // Device reset.
            self.status = 0;
            self.driver_features = 0;
            self.device_features_sel = 0;
            self.driver_features_sel = 0;
            self.queue_sel = 0;
            self.interrupt.status.store(0, Ordering::SeqCst);
            self.queues = new_queues(self.device.queue_max_sizes());
            self.device.reset();
            return;
        }
        let mut v = v;
        if v & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            // Accept only features we offered, and insist on a modern driver.
            let ok = self.driver_features & !self.features() == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                v &= !STATUS_FEATURES_OK;
            }
        }
        if v & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0 {
            let valid = self
                .queues
                .iter()
                .filter(|q| q.ready())
                .all(|q| q.is_valid(&self.mem));
            if !valid {
                v |= STATUS_FAILED;
            }
        }
        self.status = v;
    }

    pub fn state(&self) -> TransportState {
        TransportState {
            device_features_sel: self.device_features_sel,
            driver_features: self.driver_features,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt.status.load(Ordering::SeqCst),
            config_generation: self.config_generation,
            queues: self
                .queues
                .iter()
                .map(|q| QueueSnap {
                    size: q.size(),
                    ready: q.ready(),
                    desc: q.desc_table(),
                    avail: q.avail_ring(),
                    used: q.used_ring(),
                    next_avail: q.next_avail(),
                    next_used: q.next_used(),
                })
                .collect(),
        }
    }

    /// Restores the registers of a snapshot (the device's own state is restored by its owner).
    /// The snapshot is untrusted: it is refused, and nothing restored, unless it has the
    /// device's number of queues, each of a size the device allows (a power of two), with
    /// aligned ring addresses, the rings of a ready queue inside guest memory (what the
    /// transport requires of a driver before `DRIVER_OK`), and, once `FEATURES_OK`, driver
    /// features the device offers.
    pub fn restore(&mut self, s: &TransportState) -> Result<(), String> {
        if s.queues.len() != self.queues.len() {
            return Err(format!(
                "the snapshot has {} virtqueues, the device {}",
                s.queues.len(),
                self.queues.len()
            ));
        }
        if s.status & STATUS_FEATURES_OK != 0 && s.driver_features & !self.features() != 0 {
            return Err(format!(
                "driver features {:#x} beyond the device's {:#x}",
                s.driver_features,
                self.features()
            ));
        }
        let mut restored = Vec::with_capacity(self.queues.len());
        for (i, (q, snap)) in self.queues.iter().zip(&s.queues).enumerate() {
            let max = q.max_size();
            let mut n = Queue::new(max).map_err(|e| format!("virtqueue {i}: {e:?}"))?;
            n.try_set_size(snap.size)
                .map_err(|e| format!("virtqueue {i} size {}: {e:?}", snap.size))?;
            n.try_set_desc_table_address(vm_memory::GuestAddress(snap.desc))
                .and_then(|_| n.try_set_avail_ring_address(vm_memory::GuestAddress(snap.avail)))
                .and_then(|_| n.try_set_used_ring_address(vm_memory::GuestAddress(snap.used)))
                .map_err(|e| format!("virtqueue {i}: {e:?}"))?;
            n.set_next_avail(snap.next_avail);
            n.set_next_used(snap.next_used);
            n.set_ready(snap.ready);
            if snap.ready && !n.is_valid(&self.mem) {
                return Err(format!("virtqueue {i}: rings outside guest memory"));
            }
            restored.push(n);
        }
        self.queues = restored;
        self.device_features_sel = s.device_features_sel;
        self.driver_features = s.driver_features;
        self.driver_features_sel = s.driver_features_sel;
        self.queue_sel = s.queue_sel;
        self.status = s.status;
        self.interrupt
            .status
            .store(s.interrupt_status, Ordering::SeqCst);
        self.config_generation = s.config_generation;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::GuestRam;
    use vmm_sys_util::eventfd::EventFd;

    struct Dummy;
    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn features(&self) -> u64 {
            1 << 3
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8 + 1);
        }
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn reset(&mut self) {}
    }

    fn transport() -> MmioTransport<Dummy> {
        let ram = GuestRam::anonymous(1 << 20).unwrap();
        MmioTransport::new(
            Dummy,
            ram.memory().clone(),
            Interrupt::new(EventFd::new(0).unwrap()),
        )
    }

    fn read(t: &mut MmioTransport<Dummy>, off: u32) -> u32 {
        let mut b = [0u8; 4];
        t.read(off as u64, &mut b);
        u32::from_le_bytes(b)
    }

    fn write(t: &mut MmioTransport<Dummy>, off: u32, v: u32) -> Option<u16> {
        t.write(off as u64, &v.to_le_bytes())
    }

    #[test]
    fn identifies_itself_and_its_features() {
        let mut t = transport();
        assert_eq!(read(&mut t, VIRTIO_MMIO_MAGIC_VALUE), MAGIC);
        assert_eq!(read(&mut t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(read(&mut t, VIRTIO_MMIO_DEVICE_ID), 42);
        assert_eq!(read(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 1 << 3);
        write(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(read(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 1, "VERSION_1");
        assert_eq!(read(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
        let mut cfg = [0u8; 2];
        t.read(VIRTIO_MMIO_CONFIG as u64 + 4, &mut cfg);
        assert_eq!(cfg, [5, 5]);
    }

    #[test]
    fn refuses_features_it_did_not_offer_and_resets_on_status_zero() {
        let mut t = transport();
        // A driver asking for an unoffered feature does not get FEATURES_OK.
        write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, (1 << 3) | (1 << 5));
        write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        write(&mut t, VIRTIO_MMIO_STATUS, 1 | 2 | STATUS_FEATURES_OK);
        assert_eq!(read(&mut t, VIRTIO_MMIO_STATUS) & STATUS_FEATURES_OK, 0);
        // Reset, then a correct negotiation.
        write(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(read(&mut t, VIRTIO_MMIO_STATUS), 0);
        write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1 << 3);
        write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        write(&mut t, VIRTIO_MMIO_STATUS, 1 | 2 | STATUS_FEATURES_OK);
        assert_ne!(read(&mut t, VIRTIO_MMIO_STATUS) & STATUS_FEATURES_OK, 0);
        // A queue notification written to the register is reported (no ioeventfd here).
        assert_eq!(write(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0), Some(0));
    }

    #[test]
    fn queue_registers_round_trip_through_a_snapshot() {
        let mut t = transport();
        write(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        write(&mut t, VIRTIO_MMIO_QUEUE_NUM, 8);
        write(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000);
        write(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x2000);
        write(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, 0x3000);
        write(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        let s = t.state();
        let json = serde_json::to_string(&s).unwrap();
        let mut u = transport();
        u.restore(&serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(u.state(), s);
        assert_eq!(s.queues[0].size, 8);
        assert_eq!(s.queues[0].used, 0x3000);
        // A snapshot with another queue count is refused.
        let mut bad = s.clone();
        bad.queues.push(bad.queues[0]);
        assert!(transport().restore(&bad).is_err());
    }
}
