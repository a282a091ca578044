//! `dormant::runtime` and `dormant::resume`: a tier's runtime by name, shared by the process,
//! and a snapshot resumed on the tier it was taken on, without the caller naming it.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use dormant::{Grants, LocalStore, Sandbox, SandboxSpec, Tier};

#[test]
fn the_process_shares_one_runtime_per_tier() {
    let a = dormant::runtime(Tier::Wasi).unwrap();
    let b = dormant::runtime(Tier::Wasi).unwrap();
    assert!(Arc::ptr_eq(&a, &b), "one WASI engine per process");
    assert_eq!(a.tier(), Tier::Wasi);
    let k = dormant::runtime(Tier::Kvm).unwrap();
    assert_eq!(k.tier(), Tier::Kvm);
    assert!(Arc::ptr_eq(&k, &dormant::runtime(Tier::Kvm).unwrap()));
}

#[test]
fn resume_finds_the_snapshots_tier() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::open(tmp.path()).unwrap());
    let tier: Tier = "wasi".parse().unwrap();
    let mut sb = dormant::runtime(tier)
        .unwrap()
        .create(store.clone(), SandboxSpec::default_for(tier))
        .unwrap();
    sb.write_file("/note.txt", b"kept").unwrap();
    let snap = sb.standby().unwrap();
    drop(sb);

    let mut back = dormant::resume(store.clone(), &snap, &Grants::new()).unwrap();
    assert_eq!(back.tier(), Tier::Wasi);
    assert_eq!(back.read_file("/note.txt").unwrap(), b"kept");

    let missing = "s-0000000000000000-00000000000000000000000000000000"
        .parse()
        .unwrap();
    let r = dormant::resume(store, &missing, &Grants::new());
    assert!(
        matches!(r, Err(dormant::Error::SnapshotNotFound(_))),
        "{r:?}"
    );
}
