//! The VMM core with tiny hand-written long-mode guests (a few dozen bytes of machine code):
//! run, pause, capture, restore into a brand-new VM, copy-on-write isolation, dirty logging,
//! and guests that crash or never stop. Skipped, with a message, where /dev/kvm is missing.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use dormant_core::memimage;
use dormant_kvm::vm::{Exit, GuestRam, MicroVm, VmError};

const RAM: usize = 8 << 20;
const CODE: usize = common::CODE as usize;
const COUNTER: usize = 0x20_0000;

/// `mov rdi, 0x200000; 1: inc qword [rdi]; mov rax, [rdi]; out 0x10, eax; jmp 1b`
const COUNT_LOOP: &[u8] = &[
    0x48, 0xc7, 0xc7, 0x00, 0x00, 0x20, 0x00, 0x48, 0xff, 0x07, 0x48, 0x8b, 0x07, 0xe7, 0x10, 0xeb,
    0xf6,
];
/// `ud2` with no IDT: #UD → #DF → triple fault.
const CRASH: &[u8] = &[0x0f, 0x0b];
/// `jmp $`
const SPIN: &[u8] = &[0xeb, 0xfe];
/// `mov rdi, 0x200000; mov byte [rdi + 0x3000], 1; out 0x11, al; jmp $-…` writes two pages then
/// reports: writes 0x200000 and 0x203000, then `out 0x11`, then spins on `out 0x11`.
const TOUCH_TWO: &[u8] = &[
    0x48, 0xc7, 0xc7, 0x00, 0x00, 0x20, 0x00, // mov rdi, 0x200000
    0xc6, 0x07, 0x01, // mov byte [rdi], 1
    0xc6, 0x87, 0x00, 0x30, 0x00, 0x00, 0x01, // mov byte [rdi + 0x3000], 1
    0xe6, 0x11, // out 0x11, al
    0xeb, 0xfc, // jmp back to the out
];

/// Identity-mapped long mode with a flat 64-bit code segment, starting at `CODE`.
fn boot(code: &[u8], dirty_log: bool) -> MicroVm {
    let mut ram = GuestRam::anonymous(RAM).unwrap();
    let m = ram.as_mut_slice();
    common::write_long_mode_tables(m, false);
    m[CODE..CODE + code.len()].copy_from_slice(code);
    let vm = MicroVm::new(ram, dirty_log).unwrap();
    common::enter_long_mode(&vm);
    vm
}

fn next_count(vm: &mut MicroVm) -> u32 {
    match vm.run(Duration::from_secs(10)).unwrap() {
        Exit::IoOut(0x10, d) => u32::from_le_bytes(d[..4].try_into().unwrap()),
        other => panic!("unexpected exit {other:?}"),
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn a_guest_is_paused_captured_and_continues_in_a_brand_new_vm() {
    let mut vm = boot(COUNT_LOOP, false);
    for i in 1..=100 {
        assert_eq!(next_count(&mut vm), i);
    }
    let state = vm.save_state().unwrap();
    assert!(!state.msrs.is_empty());
    let tmp = tempfile::tempdir().unwrap();
    let image = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp.path().join("ram.img"))
        .unwrap();
    let w = memimage::write_full(&image, vm.ram().as_slice()).unwrap();
    assert!(
        w.stored < 64 * 1024,
        "only non-zero pages are stored ({} bytes)",
        w.stored
    );
    drop(vm);

    // Two independent VMs from the one image.
    let mut a = MicroVm::new(GuestRam::from_image(&image, RAM).unwrap(), false).unwrap();
    a.restore_state(&state).unwrap();
    let mut b = MicroVm::new(GuestRam::from_image(&image, RAM).unwrap(), false).unwrap();
    b.restore_state(&state).unwrap();
    for i in 101..=150 {
        assert_eq!(
            next_count(&mut a),
            i,
            "the restored guest continues where it stopped"
        );
    }
    assert_eq!(
        next_count(&mut b),
        101,
        "a second restore starts from the snapshot, not from the first"
    );
    // Copy-on-write: the image still holds the snapshot's counter.
    use std::os::unix::fs::FileExt;
    let mut v = [0u8; 8];
    image.read_exact_at(&mut v, COUNTER as u64).unwrap();
    assert_eq!(u64::from_le_bytes(v), 100);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn dirty_logging_reports_only_written_pages() {
    let mut vm = boot(TOUCH_TWO, true);
    // Loading the guest wrote pages from the host side, which KVM does not log; clear the log.
    vm.dirty_pages().unwrap();
    match vm.run(Duration::from_secs(10)).unwrap() {
        Exit::IoOut(0x11, _) => {}
        other => panic!("unexpected exit {other:?}"),
    }
    let dirty = vm.dirty_pages().unwrap();
    let want = [(COUNTER / 4096) as u32, (COUNTER / 4096 + 3) as u32];
    for p in want {
        assert!(
            dirty.contains(&p),
            "page {p} written by the guest is reported: {dirty:?}"
        );
    }
    // The delta of a checkpoint now would store only those pages (plus page-table pages the
    // CPU marks accessed), not the 8 MiB of RAM.
    assert!(dirty.len() <= 8, "{dirty:?}");
    let tmp = tempfile::tempdir().unwrap();
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp.path().join("d"))
        .unwrap();
    let w = memimage::write_delta(&f, vm.ram().as_slice(), &dirty).unwrap();
    assert!(w.stored <= 8 * 4096);
    assert!(
        vm.dirty_pages().unwrap().is_empty(),
        "the log was cleared by reading it"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn a_triple_fault_is_a_clear_error_and_the_host_survives() {
    let mut vm = boot(CRASH, false);
    match vm.run(Duration::from_secs(10)) {
        Err(VmError::TripleFault) | Err(VmError::EmulationFailure { .. }) => {}
        other => panic!("expected a triple fault, got {other:?}"),
    }
    let mut other = boot(COUNT_LOOP, false);
    assert_eq!(next_count(&mut other), 1, "another VM runs fine afterwards");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn a_guest_that_never_exits_hits_the_deadline() {
    let mut vm = boot(SPIN, false);
    let t = std::time::Instant::now();
    match vm.run(Duration::from_millis(200)) {
        Err(VmError::Deadline(d)) => assert_eq!(d, Duration::from_millis(200)),
        other => panic!("expected the deadline, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(10));
    // The VM can be captured after the kick, and another one runs.
    vm.save_state().unwrap();
    let mut other = boot(COUNT_LOOP, false);
    assert_eq!(next_count(&mut other), 1);
}

const CHILD_ENV: &str = "DORMANT_KVM_TEST_CHILD";

/// Helper process for `a_saved_guest_continues_in_a_new_process`: restores the state and RAM
/// image named in the environment into a new VM and prints the next counter value. Ignored on
/// its own; the parent test runs it in a child process (`--ignored --exact`).
#[test]
#[ignore = "child-process helper of a_saved_guest_continues_in_a_new_process"]
fn helper_restore_child() {
    let dir = std::env::var_os(CHILD_ENV).expect("started by the parent test");
    let dir = std::path::PathBuf::from(dir);
    let saved: dormant_kvm::persist::SavedState =
        serde_json::from_slice(&std::fs::read(dir.join("state.json")).unwrap()).unwrap();
    let image = std::fs::File::open(dir.join("ram.img")).unwrap();
    let mut vm = MicroVm::new(GuestRam::from_image(&image, RAM).unwrap(), false).unwrap();
    vm.restore_state(&saved.to_state().unwrap()).unwrap();
    println!("NEXT {}", next_count(&mut vm));
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn a_saved_guest_continues_in_a_new_process() {
    let mut vm = boot(COUNT_LOOP, false);
    for _ in 0..42 {
        next_count(&mut vm);
    }
    let saved = dormant_kvm::persist::SavedState::from_state(&vm.save_state().unwrap());
    // The saved form round-trips exactly.
    let again = dormant_kvm::persist::SavedState::from_state(&saved.to_state().unwrap());
    assert_eq!(again, saved);
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("state.json"),
        serde_json::to_vec(&saved).unwrap(),
    )
    .unwrap();
    let image = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp.path().join("ram.img"))
        .unwrap();
    memimage::write_full(&image, vm.ram().as_slice()).unwrap();
    drop(vm);
    let o = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_restore_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, tmp.path())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("NEXT 43\n"), "{out}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn damaged_saved_state_is_refused() {
    let vm = boot(COUNT_LOOP, false);
    let mut saved = dormant_kvm::persist::SavedState::from_state(&vm.save_state().unwrap());
    saved.sregs.pop();
    assert!(saved.to_state().is_err());
    let mut saved = dormant_kvm::persist::SavedState::from_state(&vm.save_state().unwrap());
    saved.version = 99;
    assert!(saved.to_state().is_err());
}

mod threaded {
    use super::*;
    use dormant_kvm::vcpu::{Action, Ended, VcpuThread};
    use dormant_kvm::vm::ExitRef;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn counting(vm: MicroVm) -> (VcpuThread, Arc<AtomicU64>) {
        let last = Arc::new(AtomicU64::new(0));
        let seen = last.clone();
        let t = VcpuThread::start(vm, move |exit: ExitRef<'_>| {
            if let ExitRef::IoOut {
                port: 0x10,
                data: d,
            } = exit
            {
                seen.store(
                    u32::from_le_bytes(d[..4].try_into().unwrap()) as u64,
                    Ordering::SeqCst,
                );
            }
            Action::Continue
        })
        .unwrap();
        (t, last)
    }

    #[test]
    #[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
    fn pause_stops_the_guest_and_its_state_continues_elsewhere() {
        let (t, last) = counting(boot(COUNT_LOOP, false));
        std::thread::sleep(Duration::from_millis(50));
        t.pause().unwrap();
        let c1 = last.load(Ordering::SeqCst);
        assert!(c1 > 0, "the guest ran");
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            last.load(Ordering::SeqCst),
            c1,
            "a paused guest does not run"
        );
        let state = t.save_state().unwrap();
        // The RAM image, written while the guest is still paused, matches the state.
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("ram");
        let p2 = path.clone();
        t.with_paused_vm(move |vm| {
            let f = std::fs::File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&p2)
                .unwrap();
            memimage::write_full(&f, vm.ram().as_slice()).unwrap();
        })
        .unwrap();
        t.resume().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            last.load(Ordering::SeqCst) > c1,
            "a resumed guest runs again"
        );
        let (_vm, ended) = t.stop();
        assert!(matches!(ended, Ended::Stopped));

        // The state captured while paused continues in a brand-new VM: the next value reported
        // is the one after the last the handler saw.
        let image = std::fs::File::open(&path).unwrap();
        let mut fresh = MicroVm::new(GuestRam::from_image(&image, RAM).unwrap(), false).unwrap();
        fresh.restore_state(&state).unwrap();
        assert_eq!(next_count(&mut fresh) as u64, c1 + 1);
    }

    #[test]
    #[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
    fn a_spinning_guest_can_be_paused_many_times() {
        let t = VcpuThread::start(boot(SPIN, false), |_: ExitRef<'_>| Action::Continue).unwrap();
        for _ in 0..20 {
            t.pause().unwrap();
            t.save_state().unwrap();
            t.resume().unwrap();
        }
        t.pause().unwrap();
        let (_vm, ended) = t.stop();
        assert!(matches!(ended, Ended::Stopped));
    }

    #[test]
    #[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
    fn saving_a_running_vcpu_is_refused() {
        let t = VcpuThread::start(boot(SPIN, false), |_: ExitRef<'_>| Action::Continue).unwrap();
        let start = std::time::Instant::now();
        assert!(t.save_state().is_err());
        assert!(t.with_paused_vm(|_| {}).is_err());
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "refused at once, not after a timeout"
        );
        drop(t); // joins the thread
    }

    #[test]
    #[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
    fn a_crashing_guest_ends_its_thread_with_the_reason() {
        let t = VcpuThread::start(boot(CRASH, false), |_: ExitRef<'_>| Action::Continue).unwrap();
        let start = std::time::Instant::now();
        while !t.is_finished() {
            assert!(start.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            t.pause().is_err(),
            "a dead vCPU thread answers with an error"
        );
        let (_vm, ended) = t.stop();
        assert!(
            matches!(
                ended,
                Ended::Failed(VmError::TripleFault | VmError::EmulationFailure { .. })
            ),
            "{ended:?}"
        );
    }
}

mod stored {
    use super::*;
    use dormant_core::{LocalStore, SandboxSpec, Tier, Workload};
    use dormant_kvm::snapshot;

    fn spec() -> SandboxSpec {
        SandboxSpec::new(Tier::Kvm, Workload::Files)
    }

    #[test]
    #[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
    fn checkpoints_go_through_the_store_and_later_ones_store_only_dirtied_pages() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalStore::open(tmp.path()).unwrap();
        let mut vm = boot(COUNT_LOOP, true);
        for _ in 0..10 {
            next_count(&mut vm);
        }
        let full = snapshot::save(
            &store,
            &vm,
            &vm.save_state().unwrap(),
            None,
            "vm-1",
            &spec(),
        )
        .unwrap();
        for _ in 0..50 {
            next_count(&mut vm);
        }
        let delta = snapshot::save(
            &store,
            &vm,
            &vm.save_state().unwrap(),
            Some(&full),
            "vm-1",
            &spec(),
        )
        .unwrap();
        let mf = store.manifest(&full).unwrap();
        let md = store.manifest(&delta).unwrap();
        assert!(
            mf.memory.file.stored >= 4 * 4096,
            "the full image holds code, tables and data"
        );
        assert!(
            md.memory.file.stored <= 3 * 4096,
            "the delta holds the counter page (and at most page-table pages): {}",
            md.memory.file.stored
        );
        assert!(md.delta_pages.contains(&((COUNTER / 4096) as u32)));
        drop(vm);

        // A brand-new VM from the delta continues where the guest stopped; another from the
        // full image continues from there.
        let mut a = snapshot::load(&store, &delta).unwrap();
        assert_eq!(next_count(&mut a), 61);
        let mut b = snapshot::load(&store, &full).unwrap();
        assert_eq!(next_count(&mut b), 11);
        // A loaded VM checkpoints incrementally on the snapshot it came from.
        for _ in 0..4 {
            next_count(&mut a);
        }
        let deeper = snapshot::save(
            &store,
            &a,
            &a.save_state().unwrap(),
            Some(&delta),
            "vm-1",
            &spec(),
        )
        .unwrap();
        assert_eq!(store.manifest(&deeper).unwrap().memory.depth, 2);
        let mut c = snapshot::load(&store, &deeper).unwrap();
        assert_eq!(next_count(&mut c), 66);

        // A damaged manifest is refused with the snapshot's id; the others still load.
        let m = store.snapshot_dir(&deeper).join("manifest.dsnp");
        let mut bytes = std::fs::read(&m).unwrap();
        bytes[30] ^= 0x40;
        std::fs::write(&m, bytes).unwrap();
        match snapshot::load(&store, &deeper) {
            Err(dormant_core::Error::Snapshot { id, .. }) => assert_eq!(id, deeper),
            other => panic!("expected a snapshot error, got {:?}", other.map(|_| ())),
        }
        assert_eq!(next_count(&mut snapshot::load(&store, &delta).unwrap()), 61);
    }
}
