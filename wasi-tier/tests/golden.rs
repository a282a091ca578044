//! A whole snapshot written by format version 1 (manifest, sparse memory image, filesystem
//! archive, WASI state) is checked into `tests/golden/`: it must keep resuming to the same
//! state. A change that breaks it needs a format version bump and a reader for version 1.
//! Regenerate only then, with `DORMANT_BLESS=1`.

#![allow(clippy::unwrap_used)] // helpers outside #[test] functions unwrap too

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{TOY, runtime};
use dormant_core::{Grants, LocalStore, Sandbox, SandboxSpec, SnapshotId, Tier, Workload};
use dormant_wasi::Val;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/snapshots")
}

/// The module path recorded in the golden snapshot's spec: a fixed place the test recreates.
fn toy_module() -> PathBuf {
    let p = PathBuf::from("/tmp/dormant-golden-toy-v1.wasm");
    std::fs::write(&p, wat::parse_str(TOY).unwrap()).unwrap();
    p
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

#[test]
fn golden_v1_snapshot_still_resumes() {
    let module = toy_module();
    if std::env::var_os("DORMANT_BLESS").is_some() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::open(tmp.path()).unwrap());
        let spec = SandboxSpec::new(
            Tier::Wasi,
            Workload::Module {
                path: module.clone(),
            },
        );
        let mut sb = runtime().create(store.clone(), spec).unwrap();
        sb.call("poke", &[Val::I32(7), Val::I32(0x5eed)]).unwrap();
        sb.call("set_marker", &[Val::I32(41)]).unwrap();
        sb.call("bump", &[]).unwrap();
        sb.write_file("/golden.txt", b"format version 1").unwrap();
        let id = sb.standby().unwrap();
        let _ = std::fs::remove_dir_all(golden_dir());
        copy_dir(&store.snapshot_dir(&id), &golden_dir().join(id.as_str()));
    }
    let id = std::fs::read_dir(golden_dir())
        .expect("golden snapshot present")
        .flatten()
        .next()
        .unwrap();
    let id = SnapshotId::parse(&id.file_name().to_string_lossy()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::open(tmp.path()).unwrap());
    copy_dir(&golden_dir().join(id.as_str()), &store.snapshot_dir(&id));
    let mut sb = runtime()
        .resume_with(store, &id, &Grants::new().module(module))
        .unwrap();
    assert_eq!(
        sb.call("peek", &[Val::I32(7)]).unwrap()[0].unwrap_i32(),
        0x5eed
    );
    assert_eq!(sb.call("marker", &[]).unwrap()[0].unwrap_i32(), 41);
    assert_eq!(sb.call("bump", &[]).unwrap()[0].unwrap_i64(), 2);
    assert_eq!(sb.read_file("/golden.txt").unwrap(), b"format version 1");
}

#[test]
fn a_state_from_a_newer_build_is_refused_with_its_version() {
    // The state is decoded before the module is looked at: no module needed (and the other
    // test's module file is not rewritten under it).
    let id = std::fs::read_dir(golden_dir())
        .expect("golden snapshot present")
        .flatten()
        .next()
        .unwrap();
    let id = SnapshotId::parse(&id.file_name().to_string_lossy()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::open(tmp.path()).unwrap());
    copy_dir(&golden_dir().join(id.as_str()), &store.snapshot_dir(&id));
    let path = store.snapshot_dir(&id).join("manifest.dsnp");
    let mut m = dormant_core::Manifest::decode(&std::fs::read(&path).unwrap()).unwrap();
    let mut state = m.tier_state.to_value();
    state["version"] = 2.into();
    m.tier_state = dormant_core::snapshot::TierState::encode(&state).unwrap();
    std::fs::write(&path, m.encode()).unwrap();
    match runtime().resume(store, &id) {
        Err(dormant_core::Error::Snapshot {
            id: got,
            source:
                dormant_core::SnapshotError::UnsupportedStateVersion {
                    what: "WASI state",
                    found: 2,
                    ..
                },
        }) => assert_eq!(got, id),
        other => panic!("expected an unsupported version, got {:?}", other.err()),
    }
}
