//! The microVM core: one VM with its guest RAM and one vCPU, run until an exit the caller
//! handles, with its full state captured and restored through KVM ioctls.
//!
//! Memory is registered before the in-kernel irqchip is created (adding a slot afterwards costs
//! ~7 ms here). Restoring maps a RAM image `MAP_PRIVATE` as the new VM's memory, so resume time
//! does not grow with guest RAM and the image is never written.

use std::fs::File;

use dormant_core::snapshot::store::LayerFile;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dormant_core::memguard::GuardedMemory;
use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY, Msrs, kvm_clock_data,
    kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_config, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_userspace_memory_region,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestRegionMmap, MmapRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

/// Errors of the VMM core.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VmError {
    /// A KVM ioctl failed.
    #[error("KVM {op} failed")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be mapped.
    #[error("mapping {size} bytes of guest memory failed: {message}")]
    MapMemory { size: usize, message: String },
    /// The guest triple-faulted (or otherwise shut the VM down).
    #[error("the guest shut down (triple fault)")]
    TripleFault,
    /// KVM could not emulate a guest instruction (common on PVM hosts, see ENVIRONMENT.md).
    #[error("KVM could not emulate a guest instruction (internal error, suberror {suberror})")]
    EmulationFailure { suberror: u32 },
    /// The vCPU ran past its deadline and was kicked out.
    #[error("the guest ran past its deadline of {0:?}")]
    Deadline(Duration),
    /// VM entry failed.
    #[error("VM entry failed (hardware reason {0:#x})")]
    FailEntry(u64),
    /// An exit the VMM does not handle.
    #[error("unhandled VM exit: {0}")]
    UnhandledExit(String),
}

type Result<T> = std::result::Result<T, VmError>;

const PAGE_SIZE: std::num::NonZeroUsize = match std::num::NonZeroUsize::new(4096) {
    Some(p) => p,
    None => unreachable!(),
};

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

/// An exit the device model handles, borrowing the vCPU's `kvm_run` page: reads are answered
/// by filling `data` before the next `KVM_RUN`.
#[derive(Debug)]
pub enum ExitRef<'a> {
    IoOut {
        port: u16,
        data: &'a [u8],
    },
    IoIn {
        port: u16,
        data: &'a mut [u8],
    },
    MmioWrite {
        addr: u64,
        data: &'a [u8],
    },
    MmioRead {
        addr: u64,
        data: &'a mut [u8],
    },
    /// The guest halted (only without an in-kernel LAPIC timer to wake it).
    Hlt,
}

/// What stopped a run of [`MicroVm::run`] (owned; port and MMIO reads read as all ones).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// `out` to a port: (port, data).
    IoOut(u16, Vec<u8>),
    /// An MMIO write: (address, data).
    MmioWrite(u64, Vec<u8>),
    /// The guest halted.
    Hlt,
}

/// The whole architectural state of the vCPU and of the VM's in-kernel devices.
pub struct VmState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: kvm_fpu,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub msrs: Vec<kvm_msr_entry>,
    pub lapic: kvm_lapic_state,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    pub debugregs: kvm_debugregs,
    pub irqchips: [kvm_irqchip; 3],
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("rip", &self.regs.rip)
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

/// Guest memory as the devices see it: one region at guest physical address 0, with a bitmap
/// that records every page a device writes (KVM's dirty log only sees the vCPU's writes).
pub type GuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Guest RAM: one region at guest physical address 0.
#[derive(Debug)]
pub struct GuestRam {
    /// A page the snapshot files cannot supply (`SIGBUS` in a device thread or while writing
    /// a checkpoint) becomes a recorded fault instead of the end of the process. First field:
    /// unregistered before the mapping can go away.
    guard: GuardedMemory,
    mem: GuestMemory,
    size: usize,
}

fn map_error(size: usize) -> impl FnOnce(vm_memory::mmap::MmapRegionError) -> VmError {
    move |e| VmError::MapMemory {
        size,
        message: e.to_string(),
    }
}

impl GuestRam {
    fn from_region(region: MmapRegion<AtomicBitmap>) -> Result<GuestRam> {
        let size = region.size();
        let region = GuestRegionMmap::new(region, GuestAddress(0)).ok_or(VmError::MapMemory {
            size,
            message: "region overflows the guest address space".into(),
        })?;
        let mem = GuestMemory::from_regions(vec![region]).map_err(|e| VmError::MapMemory {
            size,
            message: e.to_string(),
        })?;
        let mut ram = GuestRam {
            guard: GuardedMemory::new(std::ptr::null(), 0),
            mem,
            size,
        };
        ram.guard = GuardedMemory::new(ram.as_ptr(), size);
        ram.keep_from_children()?;
        Ok(ram)
    }

    /// Keeps the RAM out of children the host process forks (`MADV_DONTFORK`, as QEMU does):
    /// pages shared copy-on-write with a child would be write-protected under KVM and copied
    /// on the guest's next write, and a child has no business with guest memory.
    fn keep_from_children(&self) -> Result<()> {
        dormant_core::memimage::dont_fork(self.as_ptr(), self.size).map_err(|e| {
            VmError::MapMemory {
                size: self.size,
                message: format!("madvise(MADV_DONTFORK): {e}"),
            }
        })
    }

    /// The first host address of this RAM the snapshot files could not supply, if any (its
    /// page now reads as zeros: the machine no longer matches any snapshot).
    pub fn fault(&self) -> Option<usize> {
        self.guard.fault()
    }

    /// Reads [`Self::fault`] from elsewhere (the RAM lives on the vCPU thread while it runs).
    pub fn fault_probe(&self) -> dormant_core::memguard::FaultProbe {
        self.guard.probe()
    }

    fn bitmap(size: usize) -> AtomicBitmap {
        AtomicBitmap::new(size, PAGE_SIZE)
    }

    /// Fresh zeroed RAM.
    pub fn anonymous(size: usize) -> Result<GuestRam> {
        let region = MmapRegionBuilder::new_with_bitmap(size, Self::bitmap(size))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
            .build()
            .map_err(map_error(size))?;
        Self::from_region(region)
    }

    /// RAM mapped copy-on-write from an image file: the guest sees the image, its writes stay
    /// private to this VM. On a filesystem whose holes allocate when read (tmpfs), only the
    /// image's data is mapped from the file and its holes are anonymous zero pages (see
    /// `dormant_core::memimage::map_image`).
    pub fn from_image(image: &File, size: usize) -> Result<GuestRam> {
        let err = |e: std::io::Error| VmError::MapMemory {
            size,
            message: e.to_string(),
        };
        if dormant_core::memimage::holes_allocate(image).map_err(err)? {
            let ram = Self::anonymous(size)?;
            // SAFETY: the range is exactly the fresh anonymous region `ram` owns, page-aligned,
            // not yet given to a VM or a device (nothing else can touch it).
            unsafe { dormant_core::memimage::map_image(ram.as_ptr(), size, image) }.map_err(err)?;
            ram.keep_from_children()?;
            // The bitmap starts clean: loading the image is not a device write.
            let _ = ram.take_device_dirty_pages();
            return Ok(ram);
        }
        let file = image.try_clone().map_err(err)?;
        let region = MmapRegionBuilder::new_with_bitmap(size, Self::bitmap(size))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .with_file_offset(FileOffset::new(file, 0))
            .build()
            .map_err(map_error(size))?;
        Self::from_region(region)
    }

    fn region(&self) -> &GuestRegionMmap<AtomicBitmap> {
        self.mem
            .iter()
            .next()
            .expect("guest RAM always has its one region")
    }

    fn as_ptr(&self) -> *mut u8 {
        self.region().as_ptr()
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// The host address range of the mapping (`start..start + size`), for accounting (see
    /// [`resident_bytes`]); never dereferenced through this.
    pub fn host_range(&self) -> std::ops::Range<usize> {
        let start = self.as_ptr() as usize;
        start..start + self.size
    }

    /// The memory as devices access it (clones share the mapping).
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// RAM (or a disk) mapped copy-on-write from a snapshot's full image: `layer.size()` bytes,
    /// which the file was checked to hold when the [`LayerFile`] was built.
    pub fn from_layer(layer: &LayerFile) -> Result<GuestRam> {
        let size = layer.size() as usize;
        if !layer.is_full() {
            return Err(VmError::MapMemory {
                size,
                message: "the base layer is not a full image".into(),
            });
        }
        Self::from_image(layer.file(), size)
    }

    /// Maps a checked snapshot layer (see `dormant_core::snapshot::layer`: a delta's packed
    /// pages, or a full image) over this RAM, copy-on-write. Only before the RAM is given to a
    /// VM.
    ///
    /// Errors: `InvalidInput` (nothing mapped) when the layer is not of this RAM's size; the
    /// mmap error otherwise.
    pub fn map_layer(&mut self, layer: &LayerFile) -> std::io::Result<()> {
        if layer.size() != self.size() as u64 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "a layer of {} bytes over {} bytes of guest memory",
                    layer.size(),
                    self.size()
                ),
            ));
        }
        // SAFETY: the region is `self.size()` bytes that `&mut self` owns exclusively; no VM or
        // device uses it yet (MicroVm::new takes the RAM by value and devices get their handle
        // from the VM). `map_layer` maps only inside it (the layer's pages were checked to lie
        // within its size, which equals the region's).
        unsafe { dormant_core::memimage::map_layer(self.as_ptr(), self.size(), layer) }?;
        // The new mappings do not inherit MADV_DONTFORK.
        dormant_core::memimage::dont_fork(self.as_ptr(), self.size)
    }

    /// Pages written by devices (through [`Self::memory`]) since the last call.
    pub fn take_device_dirty_pages(&self) -> Vec<u32> {
        bitmap_pages(&self.region().bitmap().get_and_reset())
    }

    /// The RAM as bytes (for writing images and loading guests).
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the region is a live private mapping of `size` bytes owned by `self`; the
        // vCPU is not running while a `&self` method of the VM hands this out (runs need
        // `&mut self`), and devices are quiesced before images are written.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.size) }
    }

    /// The RAM as mutable bytes.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` excludes any other access.
        unsafe { std::slice::from_raw_parts_mut(self.as_ptr(), self.size) }
    }
}

/// Page indices of the set bits of a little-endian bitmap of u64 words.
fn bitmap_pages(bitmap: &[u64]) -> Vec<u32> {
    let mut out = Vec::new();
    for (w, word) in bitmap.iter().enumerate() {
        let mut bits = *word;
        while bits != 0 {
            let b = bits.trailing_zeros();
            out.push((w * 64) as u32 + b);
            bits &= bits - 1;
        }
    }
    out
}

/// A VM with one vCPU.
pub struct MicroVm {
    _kvm: Kvm,
    vm: VmFd,
    vcpu: VcpuFd,
    ram: GuestRam,
    msr_indices: Vec<u32>,
}

/// What KVM reports about the host once per process (it does not change while we run).
struct HostInfo {
    cpuid: kvm_bindings::CpuId,
    msr_indices: Vec<u32>,
}

fn host_info(kvm_sys: &Kvm) -> Result<&'static HostInfo> {
    static INFO: std::sync::OnceLock<HostInfo> = std::sync::OnceLock::new();
    if let Some(i) = INFO.get() {
        return Ok(i);
    }
    let cpuid = kvm_sys
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("get supported CPUID"))?;
    let msr_indices = kvm_sys
        .get_msr_index_list()
        .map_err(kvm("get MSR index list"))?
        .as_slice()
        .to_vec();
    Ok(INFO.get_or_init(|| HostInfo { cpuid, msr_indices }))
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

pub(crate) fn install_kick_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // A no-op handler: the signal only interrupts KVM_RUN (EINTR).
        let _ = register_signal_handler(SIGRTMIN(), kick_handler);
    });
}

impl MicroVm {
    /// A VM over `ram`, with in-kernel irqchip and PIT and one vCPU given the host's supported
    /// CPUID. `dirty_log` enables dirty-page tracking of the RAM slot.
    pub fn new(ram: GuestRam, dirty_log: bool) -> Result<MicroVm> {
        install_kick_handler();
        let kvm_sys = Kvm::new().map_err(kvm("open /dev/kvm"))?;
        let vm = kvm_sys.create_vm().map_err(kvm("create VM"))?;
        vm.set_tss_address(0xfffb_d000)
            .map_err(kvm("set TSS address"))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: if dirty_log {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: 0,
            memory_size: ram.size() as u64,
            userspace_addr: ram.as_ptr() as u64,
        };
        // SAFETY: the region maps memory owned by `ram`, which the returned MicroVm keeps alive
        // for as long as the VM exists; the slot is registered once.
        unsafe { vm.set_user_memory_region(region) }.map_err(kvm("register guest memory"))?;
        vm.create_irq_chip().map_err(kvm("create irqchip"))?;
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm("create PIT"))?;
        let vcpu = vm.create_vcpu(0).map_err(kvm("create vCPU"))?;
        let host = host_info(&kvm_sys)?;
        vcpu.set_cpuid2(&host.cpuid).map_err(kvm("set CPUID"))?;
        let msr_indices = host.msr_indices.clone();
        Ok(MicroVm {
            _kvm: kvm_sys,
            vm,
            vcpu,
            ram,
            msr_indices,
        })
    }

    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    pub fn ram_mut(&mut self) -> &mut GuestRam {
        &mut self.ram
    }

    pub fn vcpu(&self) -> &VcpuFd {
        &self.vcpu
    }

    /// Runs the vCPU until an exit the caller must handle, or until `deadline` passes (then
    /// the vCPU is kicked out with `immediate_exit` and a signal, and the VM stays usable).
    ///
    /// The vCPU runs on the calling thread; a watchdog thread per call does the kick (about
    /// 50 µs per call). The device model of the Linux guest will run the vCPU on its own
    /// long-lived thread behind a handle instead.
    pub fn run(&mut self, deadline: Duration) -> Result<Exit> {
        let fired = Arc::new(AtomicBool::new(false));
        let done = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let immediate_exit =
            std::ptr::addr_of_mut!(self.vcpu.get_kvm_run().immediate_exit) as usize;
        let target = std::thread::current();
        // SAFETY: pthread_self of the running thread is always valid.
        let tid = unsafe { libc::pthread_self() };
        let watchdog = {
            let fired = fired.clone();
            let done = done.clone();
            std::thread::spawn(move || {
                let (lock, cv) = &*done;
                let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
                let (guard, timeout) = cv
                    .wait_timeout_while(guard, deadline, |d| !*d)
                    .unwrap_or_else(|e| e.into_inner());
                if timeout.timed_out() && !*guard {
                    fired.store(true, Ordering::SeqCst);
                    // SAFETY: `immediate_exit` points into the vCPU's kvm_run mapping, which
                    // lives until `run` returns; `run` joins this thread before returning.
                    unsafe { std::ptr::write_volatile(immediate_exit as *mut u8, 1) };
                    // SAFETY: `tid` is the thread blocked in `run`, alive until it joins us.
                    unsafe { libc::pthread_kill(tid, SIGRTMIN()) };
                }
                drop(target);
            })
        };
        let r = self.run_loop(&fired, deadline);
        {
            let (lock, cv) = &*done;
            *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
            cv.notify_all();
        }
        let _ = watchdog.join();
        self.vcpu.set_kvm_immediate_exit(0);
        r
    }

    fn run_loop(&mut self, fired: &AtomicBool, deadline: Duration) -> Result<Exit> {
        loop {
            if let Some(exit) = self.run_once()? {
                return Ok(exit);
            }
            if fired.load(Ordering::SeqCst) {
                return Err(VmError::Deadline(deadline));
            }
        }
    }

    /// One `KVM_RUN`, reads of ports and MMIO answered with all ones: `Some(exit)` for an exit
    /// the caller must see, `None` when the vCPU was kicked out (a signal, or `immediate_exit`).
    pub fn run_once(&mut self) -> Result<Option<Exit>> {
        Ok(match self.run_exit()? {
            Some(ExitRef::IoOut { port, data }) => Some(Exit::IoOut(port, data.to_vec())),
            Some(ExitRef::MmioWrite { addr, data }) => Some(Exit::MmioWrite(addr, data.to_vec())),
            Some(ExitRef::IoIn { data, .. }) | Some(ExitRef::MmioRead { data, .. }) => {
                data.fill(0xff);
                None
            }
            Some(ExitRef::Hlt) => Some(Exit::Hlt),
            None => None,
        })
    }

    /// One `KVM_RUN`, the exit borrowed for a device model: `None` when the vCPU was kicked out.
    pub fn run_exit(&mut self) -> Result<Option<ExitRef<'_>>> {
        let kvm_run: *const kvm_bindings::kvm_run = self.vcpu.get_kvm_run();
        match self.vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => Ok(Some(ExitRef::IoOut { port, data })),
            Ok(VcpuExit::IoIn(port, data)) => Ok(Some(ExitRef::IoIn { port, data })),
            Ok(VcpuExit::MmioWrite(addr, data)) => Ok(Some(ExitRef::MmioWrite { addr, data })),
            Ok(VcpuExit::MmioRead(addr, data)) => Ok(Some(ExitRef::MmioRead { addr, data })),
            Ok(VcpuExit::Hlt) => Ok(Some(ExitRef::Hlt)),
            Ok(VcpuExit::Shutdown) => Err(VmError::TripleFault),
            Ok(VcpuExit::InternalError) => {
                // SAFETY: `kvm_run` points to the vCPU's kvm_run mapping, alive as long as
                // `self.vcpu`; after a KVM_EXIT_INTERNAL_ERROR exit, KVM fills the `internal`
                // member of the exit union, and nothing else borrows the page in this arm.
                let suberror = unsafe { (*kvm_run).__bindgen_anon_1.internal.suberror };
                Err(VmError::EmulationFailure { suberror })
            }
            Ok(VcpuExit::FailEntry(reason, _)) => Err(VmError::FailEntry(reason)),
            Ok(VcpuExit::Intr) => Ok(None),
            Ok(other) => Err(VmError::UnhandledExit(format!("{other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(None),
            Err(e) => Err(VmError::Kvm {
                op: "run vCPU",
                source: e,
            }),
        }
    }

    /// Routes writes of `fd` to the guest interrupt line `gsi` (irqfd).
    pub fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.vm
            .register_irqfd(fd, gsi)
            .map_err(kvm("register irqfd"))
    }

    /// Makes a 4-byte guest write of `value` at MMIO `addr` signal `fd` without a VM exit
    /// (ioeventfd).
    pub fn register_mmio_ioeventfd(&self, fd: &EventFd, addr: u64, value: u32) -> Result<()> {
        self.vm
            .register_ioevent(fd, &kvm_ioctls::IoEventAddress::Mmio(addr), value)
            .map_err(kvm("register ioeventfd"))
    }

    /// Completes an exit's pending port or MMIO operation (a read's data reaches the guest's
    /// registers only on the next `KVM_RUN`) without running guest code: a `KVM_RUN` with
    /// `immediate_exit` set. Needed before the state is captured.
    pub fn complete_pending_io(&mut self) {
        self.vcpu.set_kvm_immediate_exit(1);
        let _ = self.vcpu.run();
        self.vcpu.set_kvm_immediate_exit(0);
    }

    /// Where KVM reads `immediate_exit` (written by a kicker on another thread).
    pub(crate) fn immediate_exit_ptr(&mut self) -> *mut u8 {
        std::ptr::addr_of_mut!(self.vcpu.get_kvm_run().immediate_exit)
    }

    pub(crate) fn set_immediate_exit(&mut self, on: bool) {
        self.vcpu.set_kvm_immediate_exit(on as u8);
    }

    /// Captures the vCPU and VM state (the vCPU must not be running: runs take `&mut self`).
    pub fn save_state(&self) -> Result<VmState> {
        let v = &self.vcpu;
        let mut msrs = Msrs::from_entries(
            &self
                .msr_indices
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect::<Vec<_>>(),
        )
        .map_err(|_| VmError::UnhandledExit("too many MSRs".into()))?;
        let n = v.get_msrs(&mut msrs).map_err(kvm("get MSRs"))?;
        let mut irqchips = [
            kvm_irqchip::default(),
            kvm_irqchip::default(),
            kvm_irqchip::default(),
        ];
        for (i, chip) in irqchips.iter_mut().enumerate() {
            chip.chip_id = i as u32;
            self.vm.get_irqchip(chip).map_err(kvm("get irqchip"))?;
        }
        Ok(VmState {
            regs: v.get_regs().map_err(kvm("get regs"))?,
            sregs: v.get_sregs().map_err(kvm("get sregs"))?,
            fpu: v.get_fpu().map_err(kvm("get FPU"))?,
            xsave: v.get_xsave().map_err(kvm("get XSAVE"))?,
            xcrs: v.get_xcrs().map_err(kvm("get XCRs"))?,
            msrs: msrs.as_slice()[..n].to_vec(),
            lapic: v.get_lapic().map_err(kvm("get LAPIC"))?,
            events: v.get_vcpu_events().map_err(kvm("get vCPU events"))?,
            mp_state: v.get_mp_state().map_err(kvm("get MP state"))?,
            debugregs: v.get_debug_regs().map_err(kvm("get debug registers"))?,
            irqchips,
            pit: self.vm.get_pit2().map_err(kvm("get PIT"))?,
            clock: self.vm.get_clock().map_err(kvm("get clock"))?,
        })
    }

    /// Loads a captured state into this (fresh) VM.
    pub fn restore_state(&self, s: &VmState) -> Result<()> {
        let v = &self.vcpu;
        self.vm.set_pit2(&s.pit).map_err(kvm("set PIT"))?;
        let mut clock = s.clock;
        clock.flags = 0;
        self.vm.set_clock(&clock).map_err(kvm("set clock"))?;
        for chip in &s.irqchips {
            self.vm.set_irqchip(chip).map_err(kvm("set irqchip"))?;
        }
        v.set_mp_state(s.mp_state).map_err(kvm("set MP state"))?;
        v.set_regs(&s.regs).map_err(kvm("set regs"))?;
        v.set_sregs(&s.sregs).map_err(kvm("set sregs"))?;
        // SAFETY: the buffer is a kvm_xsave read back from KVM_GET_XSAVE on this host.
        unsafe { v.set_xsave(&s.xsave) }.map_err(kvm("set XSAVE"))?;
        v.set_xcrs(&s.xcrs).map_err(kvm("set XCRs"))?;
        v.set_debug_regs(&s.debugregs)
            .map_err(kvm("set debug registers"))?;
        v.set_lapic(&s.lapic).map_err(kvm("set LAPIC"))?;
        let msrs = Msrs::from_entries(&s.msrs)
            .map_err(|_| VmError::UnhandledExit("too many MSRs".into()))?;
        v.set_msrs(&msrs).map_err(kvm("set MSRs"))?;
        v.set_vcpu_events(&s.events)
            .map_err(kvm("set vCPU events"))?;
        Ok(())
    }

    /// Pages written since the last call (or since dirty logging started), by the vCPU (KVM's
    /// dirty log) or by a device, as sorted page indices.
    pub fn dirty_pages(&self) -> Result<Vec<u32>> {
        let bitmap = self
            .vm
            .get_dirty_log(0, self.ram.size())
            .map_err(kvm("get dirty log"))?;
        let mut out = bitmap_pages(&bitmap);
        let devices = self.ram.take_device_dirty_pages();
        if !devices.is_empty() {
            out.extend(devices);
            out.sort_unstable();
            out.dedup();
        }
        Ok(out)
    }
}

impl std::fmt::Debug for MicroVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MicroVm")
            .field("ram", &self.ram.size())
            .finish_non_exhaustive()
    }
}

/// Bytes of this process's memory resident in `range` (the `Rss` of every mapping inside it in
/// `/proc/self/smaps`): the guest RAM pages touched since boot or resume. A range mapped
/// copy-on-write from snapshot files counts only the pages this process faulted in, not the
/// page cache behind them (which `mincore` would report). A range split into several
/// mappings (a layered resume maps each delta run on its own) adds them all.
pub fn resident_bytes(range: std::ops::Range<usize>) -> std::io::Result<u64> {
    use std::io::BufRead;
    let smaps = std::io::BufReader::new(std::fs::File::open("/proc/self/smaps")?);
    let mut inside = false;
    let mut kib = 0u64;
    for line in smaps.lines() {
        let line = line?;
        let first = line.split_ascii_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-')
            && let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
        {
            inside = a >= range.start && b <= range.end && a < b;
        } else if inside && let Some(rest) = line.strip_prefix("Rss:") {
            let n = rest.trim().trim_end_matches("kB").trim();
            kib += n.parse::<u64>().unwrap_or(0);
        }
    }
    Ok(kib * 1024)
}
