//! A whole microVM: the VM and its vCPU thread, the serial console, virtio-vsock, the disk, the
//! volume slots and the network device, wired together (irqfds for interrupts, an ioeventfd per virtqueue), booted from a kernel or
//! rebuilt from a snapshot.
//!
//! Guest physical layout: RAM from 0; the virtio-mmio windows of vsock at
//! [`VSOCK_MMIO_BASE`] (IRQ [`VSOCK_IRQ`]), of the disk at [`BLK_MMIO_BASE`] (IRQ [`BLK_IRQ`])
//! of the volume slots from [`FS_MMIO_BASE`] (IRQs [`FS_IRQS`]) and of the network device at
//! [`NET_MMIO_BASE`] (IRQ [`NET_IRQ`]); COM1 at port 0x3f8
//! (IRQ 4). The guest learns about the virtio devices from the kernel command line
//! (`virtio_mmio.device=`), so every device, volume slots included, exists from boot.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::boot::{self, BootError, BootSpec};
use crate::persist::Persist;
use crate::serial::{COM1, COM1_IRQ, ConsoleLog, IrqLine, Uart, UartState};
use crate::vcpu::{Action, Ended, ExitHandler, VcpuThread};
use crate::virtio::block::{BlockDevice, BlockState};
use crate::virtio::fs::{FsDevice, FsState, VolumeAttach};
use crate::virtio::mmio::{MMIO_SIZE, QUEUE_NOTIFY};
use crate::virtio::net::{NetDevice, NetState};
use crate::virtio::vsock::{VsockDevice, VsockHost, VsockState};
use crate::net::NetHandle;
use crate::vm::{ExitRef, GuestRam, MicroVm, VmError, VmState};

/// Guest physical address of the vsock device's virtio-mmio registers.
pub const VSOCK_MMIO_BASE: u64 = 0xd000_0000;
/// Its interrupt line.
pub const VSOCK_IRQ: u32 = 5;
/// Guest physical address of the disk's virtio-mmio registers.
pub const BLK_MMIO_BASE: u64 = 0xd000_1000;
/// Its interrupt line.
pub const BLK_IRQ: u32 = 6;
/// Guest physical address of the first volume slot's virtio-mmio registers (the next ones
/// follow, 4 KiB apart).
pub const FS_MMIO_BASE: u64 = 0xd000_2000;
/// The volume slots' interrupt lines: at most this many slots.
pub const FS_IRQS: [u32; 4] = [7, 9, 10, 11];
/// Guest physical address of the network device's virtio-mmio registers (after the last
/// volume slot).
pub const NET_MMIO_BASE: u64 = FS_MMIO_BASE + FS_IRQS.len() as u64 * MMIO_SIZE;
/// Its interrupt line.
pub const NET_IRQ: u32 = 12;
/// Version of [`DevicesState`]'s layout, which covers every device state it holds (UART,
/// vsock, block, fs slots with their transports and volumes): those are only ever stored inside
/// it, so a change to any of them is a new version of it.
pub const DEVICES_VERSION: u32 = 1;
/// The versions of [`DevicesState`] this build reads.
pub const DEVICES_VERSIONS: &[u32] = &[DEVICES_VERSION];

/// Errors of a machine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MachineError {
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("device {device}: {message}")]
    Device {
        device: &'static str,
        message: String,
    },
    /// The guest crashed or reset; the console's tail says why.
    #[error("the guest stopped: {reason}")]
    GuestStopped { reason: String },
}

type Result<T> = std::result::Result<T, MachineError>;

fn device(device: &'static str) -> impl FnOnce(std::io::Error) -> MachineError {
    move |e| MachineError::Device {
        device,
        message: e.to_string(),
    }
}

/// The device models' state in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    pub version: u32,
    pub uart: UartState,
    pub vsock: VsockState,
    /// The disk's device state (its contents are a separate snapshot layer).
    #[serde(default)]
    pub block: Option<BlockState>,
    /// The volume slots (their contents are host directories, in no snapshot); at most one per
    /// line of [`FS_IRQS`].
    #[serde(
        default,
        deserialize_with = "dormant_core::snapshot::bounded_vec::<_, _, { FS_IRQS.len() }>"
    )]
    pub fs: Vec<FsState>,
    /// The network device's state (absent in snapshots of machines without one, which are
    /// restored without one). Written only when there is one, so a state without a network
    /// device keeps version 1's bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<NetState>,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    /// Guest RAM in bytes.
    pub mem_size: usize,
    /// The kernel command line without devices ([`boot::base_cmdline`] by default).
    pub cmdline: String,
    /// Copy the guest console to the host's stderr.
    pub console_echo: bool,
    /// The disk (`/dev/vda`): an image file mapped copy-on-write (never written); none if
    /// `None`. Its size must be a multiple of 4 KiB.
    pub disk_image: Option<PathBuf>,
    /// Volume slots to give the guest (at most [`FS_IRQS`]`.len()`); `volumes` are attached
    /// to the first ones.
    pub volume_slots: usize,
    pub volumes: Vec<VolumeAttach>,
}

struct Devices {
    uart: Mutex<Uart>,
    vsock: VsockDevice,
    block: Option<BlockDevice>,
    fs: Vec<FsDevice>,
    net: Option<NetDevice>,
    /// The guest asked for a reset (its way to power off).
    reset: AtomicBool,
}

struct DeviceModel(Arc<Devices>);

impl ExitHandler for DeviceModel {
    fn ended(&mut self) {
        // Calls waiting on the guest's agent fail now rather than at their deadlines.
        self.0.vsock.guest_gone();
    }

    fn handle(&mut self, exit: ExitRef<'_>) -> Action {
        let d = &self.0;
        match exit {
            ExitRef::IoOut { port, data } if (COM1..COM1 + 8).contains(&port) => {
                if let Some(&b) = data.first() {
                    let _ = d.uart.lock().write((port - COM1) as u8, b);
                }
            }
            ExitRef::IoIn { port, data } if (COM1..COM1 + 8).contains(&port) => {
                let v = d.uart.lock().read((port - COM1) as u8);
                data.fill(0);
                if let Some(b) = data.first_mut() {
                    *b = v;
                }
            }
            // The i8042 reset line: Linux's `reboot=k` (and its panic reboot) ends up here.
            ExitRef::IoOut { port: 0x64, data } if data.first() == Some(&0xfe) => {
                d.reset.store(true, Ordering::SeqCst);
                return Action::Stop;
            }
            ExitRef::MmioRead { addr, data }
                if (VSOCK_MMIO_BASE..VSOCK_MMIO_BASE + MMIO_SIZE).contains(&addr) =>
            {
                d.vsock.mmio_read(addr - VSOCK_MMIO_BASE, data);
            }
            ExitRef::MmioWrite { addr, data }
                if (VSOCK_MMIO_BASE..VSOCK_MMIO_BASE + MMIO_SIZE).contains(&addr) =>
            {
                d.vsock.mmio_write(addr - VSOCK_MMIO_BASE, data);
            }
            ExitRef::MmioRead { addr, data }
                if (BLK_MMIO_BASE..BLK_MMIO_BASE + MMIO_SIZE).contains(&addr)
                    && d.block.is_some() =>
            {
                if let Some(b) = &d.block {
                    b.mmio_read(addr - BLK_MMIO_BASE, data);
                }
            }
            ExitRef::MmioWrite { addr, data }
                if (BLK_MMIO_BASE..BLK_MMIO_BASE + MMIO_SIZE).contains(&addr) =>
            {
                if let Some(b) = &d.block {
                    b.mmio_write(addr - BLK_MMIO_BASE, data);
                }
            }
            ExitRef::MmioRead { addr, data } if fs_slot(addr, d.fs.len()).is_some() => {
                if let Some((i, off)) = fs_slot(addr, d.fs.len()) {
                    d.fs[i].mmio_read(off, data);
                }
            }
            ExitRef::MmioWrite { addr, data } if fs_slot(addr, d.fs.len()).is_some() => {
                if let Some((i, off)) = fs_slot(addr, d.fs.len()) {
                    d.fs[i].mmio_write(off, data);
                }
            }
            ExitRef::MmioRead { addr, data }
                if (NET_MMIO_BASE..NET_MMIO_BASE + MMIO_SIZE).contains(&addr)
                    && d.net.is_some() =>
            {
                if let Some(n) = &d.net {
                    n.mmio_read(addr - NET_MMIO_BASE, data);
                }
            }
            ExitRef::MmioWrite { addr, data }
                if (NET_MMIO_BASE..NET_MMIO_BASE + MMIO_SIZE).contains(&addr) =>
            {
                if let Some(n) = &d.net {
                    n.mmio_write(addr - NET_MMIO_BASE, data);
                }
            }
            ExitRef::IoIn { data, .. } | ExitRef::MmioRead { data, .. } => data.fill(0xff),
            ExitRef::IoOut { .. } | ExitRef::MmioWrite { .. } | ExitRef::Hlt => {}
        }
        Action::Continue
    }
}

/// A running (or quiesced) microVM with its devices.
pub struct Machine {
    vcpu: Option<VcpuThread>,
    /// Faults of guest RAM that its snapshot files could not supply (see `memguard`).
    ram_fault: dormant_core::memguard::FaultProbe,
    devices: Arc<Devices>,
    console: ConsoleLog,
    mem_size: usize,
    /// Guest RAM's host address range (for [`Machine::resident_bytes`]).
    ram: std::ops::Range<usize>,
    /// CPU time of the vCPU threads that have ended (each quiesce ends one).
    cpu_done: std::time::Duration,
}

/// What a machine has used since it started (see [`Machine::usage`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MachineUsage {
    /// CPU time of its vCPU threads (guest code and the exits they serve).
    pub cpu_time: std::time::Duration,
    /// Bytes the guest wrote through the block device.
    pub disk_bytes_written: u64,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("mem_size", &self.mem_size)
            .field("running", &self.vcpu.is_some())
            .finish_non_exhaustive()
    }
}

/// The volume slot and register offset an MMIO address falls in.
fn fs_slot(addr: u64, slots: usize) -> Option<(usize, u64)> {
    let off = addr.checked_sub(FS_MMIO_BASE)?;
    let i = (off / MMIO_SIZE) as usize;
    (i < slots).then_some((i, off % MMIO_SIZE))
}

/// The kernel command line's device part (every machine booted has the network device).
pub fn device_cmdline(disk: bool, volume_slots: usize) -> String {
    let mut c = format!("virtio_mmio.device=4K@{VSOCK_MMIO_BASE:#x}:{VSOCK_IRQ}");
    if disk {
        c.push_str(&format!(
            " virtio_mmio.device=4K@{BLK_MMIO_BASE:#x}:{BLK_IRQ}"
        ));
    }
    for (i, irq) in FS_IRQS.iter().take(volume_slots).enumerate() {
        let base = FS_MMIO_BASE + i as u64 * MMIO_SIZE;
        c.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{irq}"));
    }
    c.push_str(&format!(
        " virtio_mmio.device=4K@{NET_MMIO_BASE:#x}:{NET_IRQ}"
    ));
    c
}

/// The volume slots' devices: `slots` of them, `volumes` attached to the first ones, with
/// their snapshot state when restoring.
fn volume_devices(
    vm: &MicroVm,
    slots: usize,
    volumes: &[VolumeAttach],
    states: Option<&[FsState]>,
) -> Result<Vec<FsDevice>> {
    if slots > FS_IRQS.len() || volumes.len() > slots {
        return Err(MachineError::Device {
            device: "fs",
            message: format!(
                "{} volumes for a guest with {slots} volume slots (at most {})",
                volumes.len(),
                FS_IRQS.len()
            ),
        });
    }
    (0..slots)
        .map(|i| {
            let irq = EventFd::new(EFD_NONBLOCK).map_err(device("fs"))?;
            let mem = vm.ram().memory().clone();
            match states.and_then(|s| s.get(i)) {
                Some(state) => FsDevice::restore((i, mem, irq, volumes.get(i)), state),
                None => FsDevice::new(i, mem, irq, volumes.get(i), None),
            }
            .map_err(device("fs"))
        })
        .collect()
}

impl Machine {
    /// Boots `cfg.kernel` in a fresh VM.
    pub fn boot(cfg: &MachineConfig) -> Result<Machine> {
        let ram = GuestRam::anonymous(cfg.mem_size)?;
        let mut vm = MicroVm::new(ram, true)?;
        let cmdline = format!(
            "{} {}",
            cfg.cmdline,
            device_cmdline(cfg.disk_image.is_some(), cfg.volume_slots)
        );
        boot::load(
            &mut vm,
            &BootSpec {
                kernel: &cfg.kernel,
                initramfs: cfg.initramfs.as_deref(),
                cmdline: &cmdline,
            },
        )?;
        let disk = match &cfg.disk_image {
            Some(path) => {
                let file = std::fs::File::open(path).map_err(device("block"))?;
                let size = file.metadata().map_err(device("block"))?.len() as usize;
                if size == 0 || !size.is_multiple_of(4096) {
                    return Err(MachineError::Device {
                        device: "block",
                        message: format!(
                            "{}: {size} bytes is not a positive multiple of 4 KiB",
                            path.display()
                        ),
                    });
                }
                Some(GuestRam::from_image(&file, size)?)
            }
            None => None,
        };
        Self::start_loaded(vm, disk, cfg.volume_slots, &cfg.volumes, cfg.console_echo)
    }

    /// Starts a machine around `vm`, whose memory and vCPU registers the caller has loaded (a
    /// kernel, as [`Self::boot`] does, or any other guest code, such as the tiny hand-written
    /// guests of the tests): fresh devices (vsock, the disk over `disk` if given,
    /// `volume_slots` volume slots with `volumes` attached to the first ones, and the network
    /// device with its policy off) are wired to
    /// their MMIO windows and interrupt lines (see the module's layout), then the vCPU starts.
    ///
    /// Errors: a device could not be created (`volumes` longer than the slots, more slots
    /// than [`FS_IRQS`], a volume that cannot be opened) or registered with KVM.
    pub fn start_loaded(
        vm: MicroVm,
        disk: Option<GuestRam>,
        volume_slots: usize,
        volumes: &[VolumeAttach],
        console_echo: bool,
    ) -> Result<Machine> {
        let console = ConsoleLog::new(console_echo);
        let uart_irq = EventFd::new(EFD_NONBLOCK).map_err(device("serial"))?;
        vm.register_irqfd(&uart_irq, COM1_IRQ)?;
        let uart = Uart::new(IrqLine(uart_irq), console.clone());
        let vsock_irq = EventFd::new(EFD_NONBLOCK).map_err(device("vsock"))?;
        let vsock = VsockDevice::new(vm.ram().memory().clone(), vsock_irq, None)
            .map_err(device("vsock"))?;
        let block = match disk {
            Some(disk) => {
                let irq = EventFd::new(EFD_NONBLOCK).map_err(device("block"))?;
                Some(
                    BlockDevice::new(vm.ram().memory().clone(), disk, irq, None)
                        .map_err(device("block"))?,
                )
            }
            None => None,
        };
        let fs = volume_devices(&vm, volume_slots, volumes, None)?;
        let net_irq = EventFd::new(EFD_NONBLOCK).map_err(device("net"))?;
        let net = NetDevice::new(vm.ram().memory().clone(), net_irq, None).map_err(device("net"))?;
        Self::start(vm, uart, vsock, block, fs, Some(net), console)
    }

    /// Rebuilds a machine around a VM restored from a snapshot (see `snapshot::load_machine`),
    /// with the disk's restored contents when the snapshot has a disk, and `volumes` attached
    /// to its first volume slots.
    pub fn restore(
        vm: MicroVm,
        state: &DevicesState,
        disk: Option<GuestRam>,
        console_echo: bool,
        volumes: &[VolumeAttach],
    ) -> Result<Machine> {
        if state.version != DEVICES_VERSION {
            return Err(MachineError::Device {
                device: "all",
                message: format!(
                    "device state version {} (this build reads {DEVICES_VERSION})",
                    state.version
                ),
            });
        }
        let console = ConsoleLog::new(console_echo);
        let uart_irq = EventFd::new(EFD_NONBLOCK).map_err(device("serial"))?;
        vm.register_irqfd(&uart_irq, COM1_IRQ)?;
        let uart = Uart::restore((IrqLine(uart_irq), console.clone()), &state.uart).map_err(
            |message| MachineError::Device {
                device: "serial",
                message,
            },
        )?;
        let vsock_irq = EventFd::new(EFD_NONBLOCK).map_err(device("vsock"))?;
        let vsock = VsockDevice::restore((vm.ram().memory().clone(), vsock_irq), &state.vsock)
            .map_err(device("vsock"))?;
        let block = match (disk, &state.block) {
            (Some(disk), Some(bs)) => {
                let irq = EventFd::new(EFD_NONBLOCK).map_err(device("block"))?;
                Some(
                    BlockDevice::restore((vm.ram().memory().clone(), disk, irq), bs)
                        .map_err(device("block"))?,
                )
            }
            (None, None) => None,
            _ => {
                return Err(MachineError::Device {
                    device: "block",
                    message: "the snapshot's disk contents and disk device state disagree".into(),
                });
            }
        };
        let fs = volume_devices(&vm, state.fs.len(), volumes, Some(&state.fs))?;
        let net = match &state.net {
            Some(ns) => {
                let irq = EventFd::new(EFD_NONBLOCK).map_err(device("net"))?;
                Some(
                    NetDevice::restore((vm.ram().memory().clone(), irq), ns)
                        .map_err(device("net"))?,
                )
            }
            None => None,
        };
        Self::start(vm, uart, vsock, block, fs, net, console)
    }

    fn start(
        vm: MicroVm,
        uart: Uart,
        vsock: VsockDevice,
        block: Option<BlockDevice>,
        fs: Vec<FsDevice>,
        net: Option<NetDevice>,
        console: ConsoleLog,
    ) -> Result<Machine> {
        vm.register_irqfd(vsock.irq_fd(), VSOCK_IRQ)?;
        for (i, evt) in vsock.queue_evts().iter().enumerate() {
            vm.register_mmio_ioeventfd(evt, VSOCK_MMIO_BASE + QUEUE_NOTIFY, i as u32)?;
        }
        if let Some(b) = &block {
            vm.register_irqfd(b.irq_fd(), BLK_IRQ)?;
            vm.register_mmio_ioeventfd(b.queue_evt(), BLK_MMIO_BASE + QUEUE_NOTIFY, 0)?;
        }
        for (i, f) in fs.iter().enumerate() {
            let base = FS_MMIO_BASE + i as u64 * MMIO_SIZE;
            vm.register_irqfd(f.irq_fd(), FS_IRQS[i])?;
            for (q, evt) in f.queue_evts().iter().enumerate() {
                vm.register_mmio_ioeventfd(evt, base + QUEUE_NOTIFY, q as u32)?;
            }
        }
        if let Some(n) = &net {
            vm.register_irqfd(n.irq_fd(), NET_IRQ)?;
            for (q, evt) in n.queue_evts().iter().enumerate() {
                vm.register_mmio_ioeventfd(evt, NET_MMIO_BASE + QUEUE_NOTIFY, q as u32)?;
            }
        }
        let mem_size = vm.ram().size();
        let ram = vm.ram().host_range();
        let ram_fault = vm.ram().fault_probe();
        let devices = Arc::new(Devices {
            uart: Mutex::new(uart),
            vsock,
            block,
            fs,
            net,
            reset: AtomicBool::new(false),
        });
        let vcpu = VcpuThread::start(vm, DeviceModel(devices.clone())).map_err(|e| {
            MachineError::Device {
                device: "vcpu",
                message: format!("start the vCPU thread: {e}"),
            }
        })?;
        Ok(Machine {
            vcpu: Some(vcpu),
            ram_fault,
            devices,
            console,
            mem_size,
            ram,
            cpu_done: std::time::Duration::ZERO,
        })
    }

    /// CPU time and disk writes since the machine started (booted or restored).
    pub fn usage(&self) -> MachineUsage {
        MachineUsage {
            cpu_time: self.cpu_done + self.vcpu.as_ref().map_or_else(Default::default, VcpuThread::cpu_time),
            disk_bytes_written: self.devices.block.as_ref().map_or(0, BlockDevice::bytes_written),
        }
    }

    /// Bytes of guest RAM resident in this process now: the pages the guest touched since the
    /// machine started (see [`crate::vm::resident_bytes`]).
    pub fn resident_bytes(&self) -> std::io::Result<u64> {
        crate::vm::resident_bytes(self.ram.clone())
    }

    pub fn console(&self) -> &ConsoleLog {
        &self.console
    }

    pub fn vsock(&self) -> VsockHost {
        self.devices.vsock.host()
    }

    pub fn mem_size(&self) -> usize {
        self.mem_size
    }

    /// The network's handle (its egress policy and counters); `None` for a machine restored
    /// from a snapshot taken without a network device.
    pub fn net(&self) -> Option<NetHandle> {
        self.devices.net.as_ref().map(NetDevice::handle)
    }

    /// Frames the network device dropped (malformed, oversized, over its caps); 0 without one.
    pub fn net_dropped(&self) -> u64 {
        self.devices.net.as_ref().map_or(0, NetDevice::dropped)
    }

    /// The disk's contents (consistent while quiesced).
    pub fn disk(&self) -> Option<&GuestRam> {
        self.devices.block.as_ref().map(BlockDevice::disk)
    }

    /// The first host address of guest RAM or of the disk that its snapshot files could not
    /// supply (a `SIGBUS` caught by `memguard`): the machine's memory no longer matches any
    /// snapshot.
    pub fn memory_fault(&self) -> Option<usize> {
        self.ram_fault
            .fault()
            .or_else(|| self.disk().and_then(GuestRam::fault))
    }

    /// Whether the vCPU still runs (false after a crash or a guest reset).
    pub fn is_running(&self) -> bool {
        self.vcpu.as_ref().is_some_and(|v| !v.is_finished())
    }

    fn stopped_reason(&self, ended: Ended) -> MachineError {
        let tail: String = {
            let t = self.console.text();
            let lines: Vec<&str> = t.lines().rev().take(8).collect();
            lines.into_iter().rev().collect::<Vec<_>>().join("\n")
        };
        let why = match ended {
            Ended::Failed(e) => e.to_string(),
            Ended::Stopped if self.devices.reset.load(Ordering::SeqCst) => {
                "the guest reset itself (kernel panic or reboot)".into()
            }
            Ended::Stopped => "stopped".into(),
        };
        MachineError::GuestStopped {
            reason: format!("{why}; last console lines:\n{tail}"),
        }
    }

    /// Stops the guest (vCPU and devices) and hands out the VM with its captured state, for a
    /// consistent checkpoint. [`Self::unquiesce`] lets it run again.
    ///
    /// On error the machine is as before the call: running again if only capturing the state
    /// failed, stopped for good if the guest had crashed ([`Self::is_running`] tells which).
    pub fn quiesce(&mut self) -> Result<(MicroVm, VmState, DevicesState)> {
        let vcpu = self.vcpu.take().ok_or(MachineError::GuestStopped {
            reason: "the machine is already quiesced".into(),
        })?;
        let crashed = vcpu.is_finished();
        let (vm, ended, cpu) = vcpu.stop_counted();
        self.cpu_done += cpu;
        if crashed || self.devices.reset.load(Ordering::SeqCst) {
            let why = self.stopped_reason(ended);
            close_off_thread(vm);
            return Err(why);
        }
        self.pause_devices(true);
        match vm.save().map_err(MachineError::from).and_then(|state| {
            let devices = self.save_devices()?;
            Ok((state, devices))
        }) {
            Ok((state, devices)) => Ok((vm, state, devices)),
            Err(e) => {
                self.unquiesce(vm)?;
                Err(e)
            }
        }
    }

    /// Every device's state, each through its [`Persist`] seam (the devices paused).
    fn save_devices(&self) -> Result<DevicesState> {
        let io = |device: &'static str| self::device(device);
        Ok(DevicesState {
            version: DEVICES_VERSION,
            uart: self
                .devices
                .uart
                .lock()
                .save()
                .map_err(|message| MachineError::Device {
                    device: "serial",
                    message,
                })?,
            vsock: self.devices.vsock.save().map_err(io("vsock"))?,
            block: match &self.devices.block {
                Some(b) => Some(b.save().map_err(io("block"))?),
                None => None,
            },
            fs: self
                .devices
                .fs
                .iter()
                .map(|f| f.save().map_err(io("fs")))
                .collect::<Result<_>>()?,
            net: match &self.devices.net {
                Some(n) => Some(n.save().map_err(io("net"))?),
                None => None,
            },
        })
    }

    fn pause_devices(&self, paused: bool) {
        self.devices.vsock.set_paused(paused);
        if let Some(b) = &self.devices.block {
            b.set_paused(paused);
        }
        for f in &self.devices.fs {
            f.set_paused(paused);
        }
        if let Some(n) = &self.devices.net {
            n.set_paused(paused);
        }
    }

    /// Lets a quiesced guest run again. Fails only when the vCPU thread cannot be started (the
    /// VM is then gone: the machine is stopped).
    pub fn unquiesce(&mut self, vm: MicroVm) -> Result<()> {
        self.pause_devices(false);
        let vcpu = VcpuThread::start(vm, DeviceModel(self.devices.clone())).map_err(|e| {
            MachineError::GuestStopped {
                reason: format!("the vCPU thread could not be started: {e}"),
            }
        })?;
        self.vcpu = Some(vcpu);
        Ok(())
    }

    /// Stops the guest for good; returns why it had stopped if it had crashed, and what it
    /// used in all.
    pub fn shutdown(mut self) -> (Option<MachineError>, MachineUsage) {
        let Some(vcpu) = self.vcpu.take() else {
            return (None, self.usage());
        };
        let crashed = vcpu.is_finished();
        let (vm, ended, cpu) = vcpu.stop_counted();
        self.cpu_done += cpu;
        close_off_thread(vm);
        (crashed.then(|| self.stopped_reason(ended)), self.usage())
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if let Some(vcpu) = self.vcpu.take() {
            let (vm, _) = vcpu.stop();
            close_off_thread(vm);
        }
    }
}

/// Closes a VM on a thread of its own: closing a VM with an in-kernel irqchip takes 16-24 ms
/// here, which the caller should not wait for (if no thread can be started, it closes here).
fn close_off_thread(vm: MicroVm) {
    let slot = std::sync::Arc::new(parking_lot::Mutex::new(Some(vm)));
    let theirs = slot.clone();
    let spawned = std::thread::Builder::new()
        .name("dormant-vm-close".into())
        .spawn(move || drop(theirs.lock().take()));
    if spawned.is_err() {
        drop(slot.lock().take());
    }
}
