//! Storage accounting per sandbox and for the whole store (`LocalStore::sandbox_usage`,
//! `LocalStore::store_usage`) on real WASI snapshots: a template and a sandbox created from it.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use dormant::{Grants, LocalStore, Sandbox, SnapshotId, Template, Tier};

/// Bytes the files of snapshot `id`'s directory take on disk.
fn dir_bytes(store: &LocalStore, id: &SnapshotId) -> u64 {
    std::fs::read_dir(store.snapshot_dir(id))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap())
        .filter(|m| m.is_file())
        .map(|m| m.blocks() * 512)
        .sum()
}

#[test]
fn a_template_childs_shared_bytes_include_the_templates_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::open(tmp.path()).unwrap());
    let built = Template::new("usage", Tier::Wasi)
        .run("base = list(range(200_000))")
        .build(store.clone())
        .unwrap();
    let template = built.record.snapshot;
    let template_sandbox = store.manifest(&template).unwrap().sandbox_id;
    let template_bytes = dir_bytes(&store, &template);
    assert!(template_bytes > 0);

    let mut child = dormant::create_from_template(store.clone(), "usage", &Grants::new()).unwrap();
    child.run_code("mine = bytes(3_000_000)").unwrap();
    let snap = child.checkpoint().unwrap();
    assert_eq!(
        store.manifest(&snap).unwrap().parent.as_ref(),
        Some(&template),
        "the child's checkpoint is layered on the template"
    );

    let u = store.sandbox_usage(child.id()).unwrap();
    assert_eq!(u.snapshots, 1);
    assert!(
        u.shared_bytes >= template_bytes,
        "{u:?} shares the template's {template_bytes} bytes"
    );
    assert!(u.stored_bytes > 0, "{u:?}: its own checkpoint");
    assert!(u.stored_bytes <= dir_bytes(&store, &snap), "{u:?}");

    // The template's bytes are needed by both: shared for the template's sandbox too.
    let t = store.sandbox_usage(&template_sandbox).unwrap();
    assert_eq!(t.snapshots, 1);
    assert_eq!(t.shared_bytes, template_bytes, "{t:?}");
    assert_eq!(t.stored_bytes, 0, "{t:?}");

    assert_eq!(
        store.sandbox_usage("sb-never-checkpointed").unwrap(),
        dormant::SandboxUsage::default()
    );

    let all = store.store_usage().unwrap();
    assert_eq!(all.snapshots, 2);
    assert_eq!(all.sandboxes, 2);
    assert!(
        all.bytes_on_disk >= u.stored_bytes + u.shared_bytes,
        "{all:?}"
    );
    assert!(all.logical_bytes >= 2 * store.manifest(&template).unwrap().memory.size);
    assert_eq!(all.chunks, 0, "nothing compacted yet");

    // Compacted, the child's snapshot is chunks of its own.
    child.kill().unwrap();
    store.compact(&snap).unwrap();
    let all = store.store_usage().unwrap();
    assert!(all.chunks > 0 && all.chunk_bytes > 0, "{all:?}");
    let u = store.sandbox_usage(child.id()).unwrap();
    assert!(u.stored_bytes > 0, "{u:?}");
}
