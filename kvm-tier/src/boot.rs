//! Direct boot of a Linux `vmlinux` (ELF) in 64-bit mode: the kernel loaded at its physical
//! address (linux-loader), an uncompressed initramfs at the top of low memory, the command line,
//! the zero page with its e820 map, identity page tables and a GDT, and the vCPU registers set as
//! the x86-64 boot protocol asks (`rsi` = zero page).

use std::fs::File;
use std::path::Path;

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::{KernelLoader, load_cmdline};
use vm_memory::{Bytes, GuestAddress};

use crate::vm::{MicroVm, VmError};

const GDT_ADDR: u64 = 0x500;
const ZERO_PAGE: u64 = 0x7000;
const BOOT_STACK: u64 = 0x8ff0;
const PML4: u64 = 0x9000;
const PDPT: u64 = 0xa000;
const PD: u64 = 0xb000;
const CMDLINE_ADDR: u64 = 0x20000;
const CMDLINE_MAX: usize = 4096;
const HIMEM_START: u64 = 0x10_0000;
/// Low memory ends where the EBDA starts.
const EBDA_START: u64 = 0x9fc00;
/// The kernel reads the initramfs below this address (it must be directly mapped early).
const INITRD_MAX: u64 = 896 << 20;

/// Errors while loading a guest for boot.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BootError {
    #[error("cannot read {what} {path}")]
    Read {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a loadable x86-64 vmlinux ELF (a bzImage will not do): {message}")]
    Kernel { path: String, message: String },
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    #[error("the initramfs ({size} bytes) does not fit in guest RAM below the kernel's limit")]
    InitrdTooLarge { size: u64 },
    #[error("writing boot data into guest memory failed: {0}")]
    Memory(String),
    #[error(transparent)]
    Vm(#[from] VmError),
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct BootSpec<'a> {
    pub kernel: &'a Path,
    pub initramfs: Option<&'a Path>,
    pub cmdline: &'a str,
}

/// Loads kernel, initramfs and command line into `vm`'s RAM and sets the vCPU up to enter the
/// kernel's 64-bit entry point.
pub fn load(vm: &mut MicroVm, spec: &BootSpec<'_>) -> Result<(), BootError> {
    let mem = vm.ram().memory().clone();
    let ram_size = vm.ram().size() as u64;
    let kernel_path = spec.kernel.display().to_string();
    let mut kernel = File::open(spec.kernel).map_err(|source| BootError::Read {
        what: "guest kernel",
        path: kernel_path.clone(),
        source,
    })?;
    let loaded =
        Elf::load(&mem, None, &mut kernel, Some(GuestAddress(HIMEM_START))).map_err(|e| {
            BootError::Kernel {
                path: kernel_path.clone(),
                message: e.to_string(),
            }
        })?;

    let mut cmdline = Cmdline::new(CMDLINE_MAX).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cmdline
        .insert_str(spec.cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(&mem, GuestAddress(CMDLINE_ADDR), &cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(|e| BootError::Cmdline(e.to_string()))?
        .as_bytes()
        .len();

    let (initrd_addr, initrd_size) = match spec.initramfs {
        Some(path) => {
            let bytes = std::fs::read(path).map_err(|source| BootError::Read {
                what: "initramfs",
                path: path.display().to_string(),
                source,
            })?;
            let size = bytes.len() as u64;
            let top = ram_size.min(INITRD_MAX);
            let addr = top
                .checked_sub(size)
                .map(|a| a & !0xfff)
                .filter(|&a| a >= loaded.kernel_end)
                .ok_or(BootError::InitrdTooLarge { size })?;
            mem.write_slice(&bytes, GuestAddress(addr))
                .map_err(|e| BootError::Memory(e.to_string()))?;
            (addr, size)
        }
        None => (0, 0),
    };

    let mut params = boot_params::default();
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.version = 0x020f;
    params.hdr.type_of_loader = 0xff;
    params.hdr.loadflags = 0x01; // LOADED_HIGH
    params.hdr.kernel_alignment = 0x100_0000;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.ramdisk_image = initrd_addr as u32;
    params.hdr.ramdisk_size = initrd_size as u32;
    let e820 = [(0, EBDA_START), (HIMEM_START, ram_size - HIMEM_START)];
    for (i, (addr, size)) in e820.iter().enumerate() {
        params.e820_table[i].addr = *addr;
        params.e820_table[i].size = *size;
        params.e820_table[i].r#type = 1; // usable RAM
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams::<vm_memory::GuestMemoryMmap<_>>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE)),
        &mem,
    )
    .map_err(|e| BootError::Memory(e.to_string()))?;

    write_page_tables_and_gdt(&mem)?;
    set_boot_registers(vm, loaded.kernel_load.0)?;
    Ok(())
}

fn write_page_tables_and_gdt(mem: &crate::vm::GuestMemory) -> Result<(), BootError> {
    let w = |v: u64, at: u64| {
        mem.write_obj(v, GuestAddress(at))
            .map_err(|e| BootError::Memory(e.to_string()))
    };
    // Flat 64-bit code and data segments, and a TSS descriptor (KVM wants one).
    let gdt = [
        0,
        0x00af_9b00_0000_ffff_u64,
        0x00cf_9300_0000_ffff,
        0x008f_8b00_0000_ffff,
    ];
    for (i, d) in gdt.iter().enumerate() {
        w(*d, GDT_ADDR + 8 * i as u64)?;
    }
    // Identity map of the first GiB with 2 MiB pages: enough for the kernel's early entry,
    // which builds its own tables.
    w(PDPT | 3, PML4)?;
    w(PD | 3, PDPT)?;
    for i in 0..512u64 {
        w((i << 21) | 0x83, PD + 8 * i)?;
    }
    Ok(())
}

fn set_boot_registers(vm: &MicroVm, entry: u64) -> Result<(), BootError> {
    let vcpu = vm.vcpu();
    let map = |op| move |source| VmError::Kvm { op, source };
    let mut sregs = vcpu.get_sregs().map_err(map("get sregs"))?;
    let code = kvm_segment {
        base: 0,
        limit: 0xfffff,
        selector: 0x08,
        type_: 11,
        present: 1,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment {
        selector: 0x10,
        type_: 3,
        l: 0,
        db: 1,
        ..code
    };
    let tss = kvm_segment {
        selector: 0x18,
        type_: 11,
        s: 0,
        l: 0,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = 4 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = 0x8000_0011; // PG | ET | PE
    sregs.cr3 = PML4;
    sregs.cr4 = 0x20; // PAE
    sregs.efer = 0x500; // LMA | LME
    vcpu.set_sregs(&sregs).map_err(map("set sregs"))?;
    let regs = kvm_regs {
        rip: entry,
        rsi: ZERO_PAGE,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(map("set regs"))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(map("set FPU"))?;
    // LAPIC: LINT0 delivers ExtINT (the PIC), LINT1 NMI, as on a PC.
    let mut lapic = vcpu.get_lapic().map_err(map("get LAPIC"))?;
    let reg = |lapic: &mut kvm_bindings::kvm_lapic_state, off: usize, mode: u32| {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = lapic.regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | mode;
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *x as _;
        }
    };
    reg(&mut lapic, 0x350, 0x700);
    reg(&mut lapic, 0x360, 0x400);
    vcpu.set_lapic(&lapic).map_err(map("set LAPIC"))?;
    Ok(())
}

/// glibc's tunables for every process of a guest on a PVM host (the kernel hands unknown
/// `NAME=value` parameters to init's environment, and the agent's commands inherit it).
///
/// There the guest kernel must run with `noxsave`, so it switches tasks' vector registers with
/// FXSAVE, which covers only x87 and XMM0-15; but user code sees the host's CPUID and XCR0 (PVM
/// exposes both, and does not load the guest's XCR0), so glibc would pick its AVX2 and AVX-512
/// routines, whose registers (YMM/ZMM upper halves, XMM16-31, opmasks) every process of the
/// guest would then share. Beyond that, guest vector registers were measured zeroed in the
/// middle of glibc's copies on our PVM hosts (issue 11, fault 12: 64-byte runs of NULs with
/// AVX-512 `memcpy`, 16-byte runs with SSE2 `memcpy`, in a freshly booted guest as well as a
/// resumed one, more under host load), which no guest-side setting explains: so `memcpy` and
/// `memset` use `rep movsb`/`rep stosb` (`Prefer_ERMS`, `Prefer_FSRM`), which need no vector
/// register at all, and AVX is off. Programs that choose vector code on their own are not
/// covered (see the README).
pub const PVM_GLIBC_TUNABLES: &str = "GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX512F,-AVX512VL,\
-AVX512BW,-AVX512DQ,-AVX512CD,-AVX512_VNNI,-AVX512_BF16,-AVX512_FP16,-AVX2,-AVX,-FMA,-AVX_VNNI,\
Prefer_ERMS,Prefer_FSRM";

/// The kernel command line dormant boots with. On PVM hosts it hides the CPU features the
/// emulated guest kernel cannot execute (see ENVIRONMENT.md) and keeps glibc off vector
/// registers that guest cannot preserve ([`PVM_GLIBC_TUNABLES`]); devices are appended by the
/// caller.
///
/// The guest has a local APIC in virtual-wire mode (the VMM writes no MP table; `noapic`: no
/// I/O APIC, device interrupts come from the PIC through LINT0, set to ExtINT in
/// `set_boot_registers`), so its clock events come from the LAPIC's TSC-deadline timer and an idle
/// kernel sleeps until its next timer. Without it (`nolapic`, as before) the only clock event
/// device was the PIT, whose 16-bit counter cannot reach past ~27.5 ms: an idle guest woke ~36
/// times a second (`perf`: 106 k emulated instructions per idle second against 11.5 k now;
/// vCPU CPU time 0.05 s per idle second against ~0.01 s, `resume_timing` example), and a
/// hundred idle forks of one sandbox kept more than two host cores busy.
///
/// `no-kvmapf`: KVM's asynchronous page faults stay off. While the guest ran without a local
/// APIC their "page ready" notices could not be taken: KVM kept the vCPU runnable, every `hlt`
/// of the idle loop returned at once, and an idle guest kept a host core busy (0.93-1.0 s of
/// vCPU time per idle second). With the APIC they could be delivered, but nothing measured here
/// gains from them (the guest's RAM is a mapping of the snapshot's files).
///
/// `clocksource=kvm-clock` on PVM hosts: there the guest reads the host's TSC unoffset (the
/// TSC restored with the vCPU's MSRs reads back as the host's), so with the `tsc` clocksource
/// the guest's monotonic clock counted the time its snapshot slept, and a resumed kernel caught
/// up on it one second per loop turn in its timekeeping (~110 emulated instructions per second
/// slept: about 4 s of guest time per day in standby) and fired every timer that fell due. The
/// KVM clock is restored from the snapshot, so the monotonic clock continues where it stopped;
/// the wall clock is set after the resume. Its vDSO path stays (0.02 us per `clock_gettime`
/// either way, measured in the guest).
pub fn base_cmdline(pvm: bool) -> String {
    let mut c = String::from(
        "console=ttyS0 reboot=k panic=-1 tsc=reliable no_timer_check random.trust_cpu=1 \
         mitigations=off quiet noapic no-kvmapf rdinit=/init",
    );
    if pvm {
        c.push_str(
            " clocksource=kvm-clock noxsave clearcpuid=cx16,popcnt,smap,smep,rdtscp,rdpid,invpcid,pcid,movbe,sse4_2,aes,pclmulqdq",
        );
        c.push(' ');
        c.push_str(PVM_GLIBC_TUNABLES);
    }
    c
}
