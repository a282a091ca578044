//! KVM-tier benchmarks (VMM core, tiny guest).
//!
//! - `kvm_resume_tiny/{128,512,2048}MiB`: from "create a VM over the RAM image mapped
//!   copy-on-write" to the restored guest's first exit (VM + memory slot + irqchip + PIT +
//!   vCPU + CPUID, full state restore, one KVM_RUN). Tearing the VM down (tens of ms with an
//!   irqchip) happens outside the clock. The aim is a flat line over RAM size.
//!
//! Skipped with a message where /dev/kvm is missing.

use std::time::{Duration, Instant};

use criterion::Criterion;
use dormant_kvm::persist::SavedState;
use dormant_kvm::vm::{GuestRam, MicroVm};

const CODE: usize = 0x10000;
/// `mov rdi, 0x200000; 1: inc qword [rdi]; mov rax, [rdi]; out 0x10, eax; jmp 1b`
const COUNT_LOOP: &[u8] = &[
    0x48, 0xc7, 0xc7, 0x00, 0x00, 0x20, 0x00, 0x48, 0xff, 0x07, 0x48, 0x8b, 0x07, 0xe7, 0x10, 0xeb,
    0xf6,
];

fn boot(ram_size: usize) -> MicroVm {
    let mut ram = GuestRam::anonymous(ram_size).expect("ram");
    let m = ram.as_mut_slice();
    let put = |m: &mut [u8], at: usize, v: u64| m[at..at + 8].copy_from_slice(&v.to_le_bytes());
    for (i, e) in [0u64, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff]
        .iter()
        .enumerate()
    {
        put(m, 0x500 + i * 8, *e);
    }
    put(m, 0x1000, 0x2000 | 3);
    put(m, 0x2000, 0x3000 | 3);
    for j in 0..512u64 {
        put(m, 0x3000 + j as usize * 8, (j << 21) | 0x83);
    }
    m[CODE..CODE + COUNT_LOOP.len()].copy_from_slice(COUNT_LOOP);
    let vm = MicroVm::new(ram, false).expect("vm");
    let mut s = vm.vcpu().get_sregs().expect("sregs");
    let cs = kvm_bindings::kvm_segment {
        limit: 0xffff_ffff,
        selector: 0x08,
        type_: 11,
        present: 1,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let ds = kvm_bindings::kvm_segment {
        limit: 0xffff_ffff,
        selector: 0x10,
        type_: 3,
        present: 1,
        db: 1,
        s: 1,
        g: 1,
        ..Default::default()
    };
    (s.cs, s.ds, s.es, s.fs, s.gs, s.ss) = (cs, ds, ds, ds, ds, ds);
    s.tr = kvm_bindings::kvm_segment {
        limit: 103,
        type_: 11,
        present: 1,
        ..Default::default()
    };
    s.gdt.base = 0x500;
    s.gdt.limit = 23;
    s.cr0 = 0x8005_0033;
    s.cr3 = 0x1000;
    s.cr4 = 0x20 | 0x200 | 0x400;
    s.efer = 0xd01;
    vm.vcpu().set_sregs(&s).expect("set sregs");
    vm.vcpu()
        .set_regs(&kvm_bindings::kvm_regs {
            rip: CODE as u64,
            rsp: 0x8000,
            rflags: 2,
            ..Default::default()
        })
        .expect("set regs");
    vm
}

fn main() {
    if dormant::kvm::detect() == dormant::kvm::HostKvm::Unavailable {
        println!("SKIPPED: /dev/kvm is not available; KVM benchmarks did not run");
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = c.benchmark_group("kvm_resume_tiny");
    g.sample_size(20);
    for mib in [128usize, 512, 2048] {
        let size = mib << 20;
        let mut vm = boot(size);
        for _ in 0..10 {
            vm.run(Duration::from_secs(10)).expect("run");
        }
        let state = SavedState::from_state(&vm.save_state().expect("save"));
        let path = tmp.path().join(format!("ram-{mib}.img"));
        let image = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("image");
        dormant::memimage::write_full(&image, vm.ram().as_slice()).expect("write image");
        drop(vm);
        let state = state.to_state().expect("state");
        g.bench_function(format!("{mib}MiB"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    let mut vm =
                        MicroVm::new(GuestRam::from_image(&image, size).expect("map"), false)
                            .expect("vm");
                    vm.restore_state(&state).expect("restore");
                    vm.run(Duration::from_secs(10)).expect("first exit");
                    total += t.elapsed();
                    drop(vm);
                }
                total
            })
        });
    }
    g.finish();
    c.final_summary();
}
