//! A whole KVM snapshot chain written by an earlier build is checked into `tests/golden/`: a
//! full snapshot and an incremental one on it, of a tiny long-mode guest (256 KiB of RAM) with
//! a disk and device state. It was written before the KVM tier state carried a version (as the
//! snapshots already on users' disks were), so it also proves that such states still load as
//! version 1. It must keep resuming to the same state: a change that breaks it needs a new state
//! version and a reader for this one. Regenerate only then, with `DORMANT_BLESS=1`.

#![allow(clippy::unwrap_used)] // helpers outside #[test] functions unwrap too

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use dormant_core::{LocalStore, SandboxSpec, SnapshotId, Tier, Workload};
use dormant_kvm::machine::{DEVICES_VERSION, DevicesState};
use dormant_kvm::serial::UartState;
use dormant_kvm::snapshot;
use dormant_kvm::virtio::block::BlockState;
use dormant_kvm::virtio::fs::FsState;
use dormant_kvm::virtio::mmio::{QueueSnap, TransportState};
use dormant_kvm::virtio::vsock::{LiveConn, VsockState};
use dormant_kvm::vm::{Exit, GuestRam, MicroVm};
use dormant_kvm::volume::{HandleSnap, NodeSnap, VolumeState};
use vm_memory::{Bytes, GuestAddress};

const RAM: usize = 256 << 10;
const DISK: usize = 64 << 10;
const CODE: usize = common::CODE as usize;
/// `mov rdi, 0x20000; 1: inc qword [rdi]; mov rax, [rdi]; out 0x10, eax; jmp 1b`
const COUNT_LOOP: &[u8] = &[
    0x48, 0xc7, 0xc7, 0x00, 0x00, 0x02, 0x00, 0x48, 0xff, 0x07, 0x48, 0x8b, 0x07, 0xe7, 0x10, 0xeb,
    0xf6,
];

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/snapshots")
}

/// Identity-mapped long mode with a flat 64-bit code segment, starting at `CODE`.
fn boot() -> MicroVm {
    let mut ram = GuestRam::anonymous(RAM).unwrap();
    let m = ram.as_mut_slice();
    common::write_long_mode_tables(m, false);
    m[CODE..CODE + COUNT_LOOP.len()].copy_from_slice(COUNT_LOOP);
    let vm = MicroVm::new(ram, true).unwrap();
    common::enter_long_mode(&vm);
    vm
}

fn next_count(vm: &mut MicroVm) -> u32 {
    match vm.run(Duration::from_secs(60)).unwrap() {
        Exit::IoOut(0x10, d) => u32::from_le_bytes(d[..4].try_into().unwrap()),
        other => panic!("unexpected exit {other:?}"),
    }
}

/// A transport with `sizes` queues, the first one set up by a driver inside the guest's RAM.
fn transport(sizes: &[u16]) -> TransportState {
    TransportState {
        device_features_sel: 1,
        driver_features: 1 << 32,
        driver_features_sel: 1,
        queue_sel: 0,
        status: 0xf,
        interrupt_status: 0,
        config_generation: 0,
        queues: sizes
            .iter()
            .enumerate()
            .map(|(i, &max)| {
                let base = 0x30000 + i as u64 * 0x3000;
                QueueSnap {
                    size: max.min(64),
                    ready: i == 0,
                    desc: base,
                    avail: base + 0x1000,
                    used: base + 0x2000,
                    next_avail: 7,
                    next_used: 7,
                }
            })
            .collect(),
    }
}

/// The device state recorded in the golden snapshots (every kind of device, with content).
fn golden_devices() -> DevicesState {
    DevicesState {
        version: DEVICES_VERSION,
        uart: UartState {
            baud_divisor_low: 1,
            baud_divisor_high: 0,
            interrupt_enable: 0x02,
            interrupt_identification: 0xc1,
            line_control: 0x03,
            line_status: 0x61,
            modem_control: 0x0b,
            modem_status: 0xb0,
            scratch: 0x5a,
            in_buffer: b"ok\n".to_vec(),
        },
        vsock: VsockState {
            cid: 3,
            next_port: (1 << 30) + 5,
            transport: transport(&[256, 256, 64]),
            open: vec![((1 << 30) + 3, 52)],
            live: vec![LiveConn {
                local: (1 << 30) + 4,
                peer: 52,
                peer_buf_alloc: 262_144,
                peer_fwd_cnt: 1000,
                tx_cnt: 1200,
                fwd_cnt: 300,
                credit_sent: 300,
            }],
        },
        block: Some(BlockState {
            transport: transport(&[256]),
        }),
        fs: vec![
            FsState {
                transport: transport(&[128, 256]),
                volume: Some(VolumeState {
                    root: PathBuf::from("/golden/volume"),
                    nodes: vec![
                        NodeSnap {
                            id: 2,
                            path: b"dir".to_vec(),
                            lookups: 3,
                        },
                        NodeSnap {
                            id: 3,
                            path: b"dir/file.txt".to_vec(),
                            lookups: 1,
                        },
                    ],
                    handles: vec![HandleSnap {
                        fh: 1,
                        path: b"dir/file.txt".to_vec(),
                        flags: 2,
                        dir: false,
                    }],
                    next_id: 4,
                }),
            },
            FsState {
                transport: transport(&[128, 256]),
                volume: None,
            },
        ],
        // Written before machines had a network device: restored without one.
        net: None,
    }
}

fn spec() -> SandboxSpec {
    SandboxSpec::new(Tier::Kvm, Workload::Files)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Writes the golden chain: 42 counts, a full snapshot; 8 more counts and a disk write, an
/// incremental one.
fn bless() {
    let tmp = tempfile::tempdir().unwrap();
    let store = LocalStore::open(tmp.path()).unwrap();
    let mut vm = boot();
    for _ in 0..42 {
        next_count(&mut vm);
    }
    let disk = GuestRam::anonymous(DISK).unwrap();
    disk.memory()
        .write_slice(b"golden disk v1, block 0", GuestAddress(0))
        .unwrap();
    disk.memory()
        .write_slice(b"golden disk v1, block 5", GuestAddress(5 * 4096))
        .unwrap();
    let devices = golden_devices();
    let mut unsaved = snapshot::Unsaved::default();
    unsaved.collect(&vm, Some(&disk));
    let full = snapshot::save_machine(
        &store,
        &vm,
        &vm.save_state().unwrap(),
        Some(&devices),
        Some(&disk),
        None,
        &unsaved,
        "kvm-golden",
        &spec(),
    )
    .unwrap();
    unsaved.clear();
    for _ in 0..8 {
        next_count(&mut vm);
    }
    disk.memory()
        .write_slice(
            b"written after the full snapshot",
            GuestAddress(3 * 4096 + 100),
        )
        .unwrap();
    unsaved.collect(&vm, Some(&disk));
    let delta = snapshot::save_machine(
        &store,
        &vm,
        &vm.save_state().unwrap(),
        Some(&devices),
        Some(&disk),
        Some(&store.manifest(&full).unwrap()),
        &unsaved,
        "kvm-golden",
        &spec(),
    )
    .unwrap();
    let _ = std::fs::remove_dir_all(golden_dir());
    for id in [&full, &delta] {
        copy_dir(&store.snapshot_dir(id), &golden_dir().join(id.as_str()));
    }
}

/// The golden chain's (full, incremental) ids, oldest first.
fn golden_ids() -> (SnapshotId, SnapshotId) {
    let mut ids: Vec<SnapshotId> = std::fs::read_dir(golden_dir())
        .expect("golden snapshots present")
        .flatten()
        .map(|e| SnapshotId::parse(&e.file_name().to_string_lossy()).unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids.len(), 2, "a full and an incremental golden snapshot");
    (ids[0].clone(), ids[1].clone())
}

fn golden_store() -> (tempfile::TempDir, LocalStore, SnapshotId, SnapshotId) {
    let (full, delta) = golden_ids();
    let tmp = tempfile::tempdir().unwrap();
    let store = LocalStore::open(tmp.path()).unwrap();
    for id in [&full, &delta] {
        copy_dir(&golden_dir().join(id.as_str()), &store.snapshot_dir(id));
    }
    (tmp, store, full, delta)
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn golden_v1_kvm_snapshots_still_resume() {
    if std::env::var_os("DORMANT_BLESS").is_some() {
        bless();
    }
    let (_tmp, store, full, delta) = golden_store();
    let mut read = [0u8; 31];

    let mut l = snapshot::load_machine(&store, &delta).unwrap();
    assert_eq!(l.devices.as_ref(), Some(&golden_devices()));
    assert_eq!(next_count(&mut l.vm), 51, "the guest continues after 50");
    let disk = l.disk.as_ref().expect("the snapshot has a disk");
    assert_eq!(disk.size(), DISK);
    disk.memory()
        .read_slice(&mut read, GuestAddress(3 * 4096 + 100))
        .unwrap();
    assert_eq!(&read, b"written after the full snapshot");
    disk.memory()
        .read_slice(&mut read[..23], GuestAddress(0))
        .unwrap();
    assert_eq!(&read[..23], b"golden disk v1, block 0");
    disk.memory()
        .read_slice(&mut read[..23], GuestAddress(5 * 4096))
        .unwrap();
    assert_eq!(&read[..23], b"golden disk v1, block 5");

    let mut l = snapshot::load_machine(&store, &full).unwrap();
    assert_eq!(
        next_count(&mut l.vm),
        43,
        "the full snapshot continues after 42"
    );
    let disk = l.disk.as_ref().expect("the snapshot has a disk");
    disk.memory()
        .read_slice(&mut read, GuestAddress(3 * 4096 + 100))
        .unwrap();
    assert_eq!(
        read, [0u8; 31],
        "the delta's write is not in the full snapshot"
    );
}
