//! The microVM core: one VM with its guest RAM and one vCPU, run until an exit the caller
//! handles, with its full state captured and restored through KVM ioctls.
//!
//! Memory is registered before the in-kernel irqchip is created (adding a slot afterwards costs
//! ~7 ms here). Restoring maps a RAM image `MAP_PRIVATE` as the new VM's memory, so resume time
//! does not grow with guest RAM and the image is never written.

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY, Msrs, kvm_clock_data,
    kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_config, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_userspace_memory_region,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{FileOffset, MmapRegion};
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

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

/// What stopped a run that the caller must handle.
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

/// Guest RAM: one region at guest physical address 0.
#[derive(Debug)]
pub struct GuestRam {
    region: MmapRegion<()>,
}

impl GuestRam {
    /// Fresh zeroed RAM.
    pub fn anonymous(size: usize) -> Result<GuestRam> {
        let region = MmapRegion::new(size).map_err(|e| VmError::MapMemory {
            size,
            message: e.to_string(),
        })?;
        Ok(GuestRam { region })
    }

    /// RAM mapped copy-on-write from an image file: the guest sees the image, its writes stay
    /// private to this VM.
    pub fn from_image(image: &File, size: usize) -> Result<GuestRam> {
        let file = image.try_clone().map_err(|e| VmError::MapMemory {
            size,
            message: e.to_string(),
        })?;
        let region = vm_memory::mmap::MmapRegionBuilder::new(size)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .with_file_offset(FileOffset::new(file, 0))
            .build()
            .map_err(|e| VmError::MapMemory {
                size,
                message: e.to_string(),
            })?;
        Ok(GuestRam { region })
    }

    pub fn size(&self) -> usize {
        self.region.size()
    }

    /// Maps a delta layer (packed pages of `file`, see `dormant_core::memimage`) over this RAM,
    /// copy-on-write. Only before the RAM is given to a VM.
    pub fn map_delta(&mut self, file: &File, pages: &[u32]) -> std::io::Result<()> {
        if pages
            .last()
            .is_some_and(|&p| (p as usize + 1) * dormant_core::memimage::PAGE > self.size())
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "delta page beyond guest RAM",
            ));
        }
        // SAFETY: every page lies inside this region (checked above), which `&mut self` owns
        // exclusively; no VM uses it yet (MicroVm::new takes the RAM by value).
        unsafe { dormant_core::memimage::map_delta(self.region.as_ptr(), file, pages) }.map(|_| ())
    }

    /// The RAM as bytes (for writing images and loading guests).
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the region is a live private mapping of `size` bytes owned by `self`; the
        // vCPU is not running while a `&self` method of the VM hands this out (runs need
        // `&mut self`).
        unsafe { std::slice::from_raw_parts(self.region.as_ptr(), self.region.size()) }
    }

    /// The RAM as mutable bytes.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` excludes any other access.
        unsafe { std::slice::from_raw_parts_mut(self.region.as_ptr(), self.region.size()) }
    }
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
            userspace_addr: ram.region.as_ptr() as u64,
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

    /// One `KVM_RUN`: `Some(exit)` for an exit the device model must see, `None` when the
    /// vCPU was kicked out (a signal, or `immediate_exit`). Port and MMIO reads of unmapped
    /// addresses read as all ones.
    pub fn run_once(&mut self) -> Result<Option<Exit>> {
        match self.vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => Ok(Some(Exit::IoOut(port, data.to_vec()))),
            Ok(VcpuExit::IoIn(_, data)) => {
                data.fill(0xff);
                Ok(None)
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => Ok(Some(Exit::MmioWrite(addr, data.to_vec()))),
            Ok(VcpuExit::MmioRead(_, data)) => {
                data.fill(0xff);
                Ok(None)
            }
            Ok(VcpuExit::Hlt) => Ok(Some(Exit::Hlt)),
            Ok(VcpuExit::Shutdown) => Err(VmError::TripleFault),
            Ok(VcpuExit::InternalError) => {
                // SAFETY: after a KVM_EXIT_INTERNAL_ERROR exit, KVM fills the `internal` member
                // of the exit union.
                let suberror =
                    unsafe { self.vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
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

    /// Pages written since the last call (or since dirty logging started), as page indices.
    pub fn dirty_pages(&self) -> Result<Vec<u32>> {
        let bitmap = self
            .vm
            .get_dirty_log(0, self.ram.size())
            .map_err(kvm("get dirty log"))?;
        let mut out = Vec::new();
        for (w, word) in bitmap.iter().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let b = bits.trailing_zeros();
                out.push((w * 64) as u32 + b);
                bits &= bits - 1;
            }
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
