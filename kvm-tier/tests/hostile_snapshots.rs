//! Snapshots are untrusted input: hand-crafted KVM snapshots whose checksums are all valid but
//! whose layers lie (block lists out of order or out of bounds, files shorter than their
//! blocks, sizes that do not match, depths that do not chain) are refused with
//! `Error::Snapshot` before anything is mapped. Each starts from the golden chain in
//! `tests/golden/` (a full snapshot and an incremental one with a 64 KiB disk) and rewrites one
//! thing, re-encoding the manifest and rewriting data files so that every CRC and length the
//! store checks is right.
//!
//! Refusal happens before a VM is created, so these tests need no `/dev/kvm`.

#![allow(clippy::unwrap_used)] // helpers outside #[test] functions unwrap too

use std::path::{Path, PathBuf};

use dormant_core::memimage;
use dormant_core::snapshot::Manifest;
use dormant_core::{Error, LocalStore, SnapshotId};
use dormant_kvm::snapshot;
use serde_json::json;

const DISK: usize = 64 << 10;
const PAGE: usize = 4096;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/snapshots")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// A store holding a copy of the golden chain: (store, full, incremental).
fn golden_store() -> (tempfile::TempDir, LocalStore, SnapshotId, SnapshotId) {
    let mut ids: Vec<SnapshotId> = std::fs::read_dir(golden_dir())
        .expect("golden snapshots present")
        .flatten()
        .map(|e| SnapshotId::parse(&e.file_name().to_string_lossy()).unwrap())
        .collect();
    ids.sort();
    let tmp = tempfile::tempdir().unwrap();
    let store = LocalStore::open(tmp.path()).unwrap();
    for id in &ids {
        copy_dir(&golden_dir().join(id.as_str()), &store.snapshot_dir(id));
    }
    (tmp, store, ids[0].clone(), ids[1].clone())
}

/// Rewrites snapshot `id`'s manifest: `edit` changes its KVM state (as JSON) and may change
/// the manifest itself; the manifest is re-encoded, so its CRCs are valid.
fn tamper(
    store: &LocalStore,
    id: &SnapshotId,
    edit: impl FnOnce(&mut serde_json::Value, &mut Manifest),
) {
    let path = store.snapshot_dir(id).join("manifest.dsnp");
    let mut m = Manifest::decode(&std::fs::read(&path).unwrap()).unwrap();
    let mut state = serde_json::to_value(&m.tier_state).unwrap();
    edit(&mut state, &mut m);
    m.tier_state = serde_json::from_str(&state.to_string()).unwrap();
    std::fs::write(&path, m.encode()).unwrap();
}

/// Writes `pages` of a disk whose page `i` is filled with byte `i`, packed in the order given,
/// as snapshot `id`'s `disk.delta`; returns its file record (valid length and CRC).
fn write_disk_delta(store: &LocalStore, id: &SnapshotId, pages: &[u32]) -> serde_json::Value {
    let mut disk = vec![0u8; DISK * 4];
    for (i, page) in disk.chunks_mut(PAGE).enumerate() {
        page.fill(i as u8);
    }
    let path = store.snapshot_dir(id).join("disk.delta");
    let f = std::fs::File::create(&path).unwrap();
    let w = memimage::write_delta(&f, &disk, pages).unwrap();
    json!({"name": "disk.delta", "len": w.len, "crc32": w.crc32, "stored": w.stored})
}

/// Loading `id` is refused as an unusable snapshot (not mapped, not a store or VM error).
fn assert_refused(store: &LocalStore, id: &SnapshotId, why: &str) {
    match snapshot::load_machine(store, id) {
        Err(Error::Snapshot { id: got, source }) => {
            assert_eq!(&got, id);
            eprintln!("{why}: refused: {source}");
        }
        Err(e) => panic!("{why}: expected Error::Snapshot, got {e:?}"),
        Ok(_) => panic!("{why}: the hostile snapshot was loaded"),
    }
}

/// Replaces the incremental snapshot's disk layer with a delta of `blocks` (its file written
/// packed in that order, with a matching record) at `depth`.
fn hostile_disk_delta(blocks: &[u32], file_pages: &[u32], depth: u32, why: &str) {
    let (_tmp, store, _full, delta) = golden_store();
    let file = write_disk_delta(&store, &delta, file_pages);
    tamper(&store, &delta, |st, _| {
        st["disk"]["blocks"] = json!(blocks);
        st["disk"]["file"] = file;
        st["disk"]["depth"] = json!(depth);
    });
    assert_refused(&store, &delta, why);
}

#[test]
fn unsorted_disk_blocks_are_refused() {
    hostile_disk_delta(&[5, 3], &[5, 3], 1, "blocks out of order");
}

#[test]
fn repeated_disk_blocks_are_refused() {
    hostile_disk_delta(&[3, 3], &[3, 3], 1, "a block twice");
}

#[test]
fn an_unsorted_block_far_beyond_the_disk_is_refused() {
    // Only the last block is in bounds: mapping the first would land 4 GiB past the disk's
    // mapping, over host memory.
    hostile_disk_delta(&[1 << 20, 3], &[3, 4], 1, "a block far beyond the disk");
}

#[test]
fn a_block_past_the_end_of_the_disk_is_refused() {
    hostile_disk_delta(&[3, 16], &[3, 4], 1, "a block past the end");
}

#[test]
fn a_delta_file_shorter_than_its_blocks_is_refused() {
    // Two blocks, one page of file (whose record is right): the second block would map past
    // the file's end, and reading it would raise SIGBUS.
    hostile_disk_delta(&[3, 5], &[3], 1, "a short delta file");
}

#[test]
fn a_disk_delta_at_the_wrong_depth_is_refused() {
    hostile_disk_delta(&[3], &[3], 4, "a disk delta at depth 4 on a full image");
}

#[test]
fn a_full_disk_image_shorter_than_the_disk_is_refused() {
    // The full snapshot's disk claims twice the size its 64 KiB image holds: mapping it would
    // map past the file's end.
    let (_tmp, store, full, _delta) = golden_store();
    tamper(&store, &full, |st, _| {
        st["disk"]["size"] = json!(2 * DISK);
    });
    assert_refused(&store, &full, "a full disk image of the wrong size");
}

#[test]
fn a_disk_delta_of_another_size_than_its_base_is_refused() {
    let (_tmp, store, _full, delta) = golden_store();
    tamper(&store, &delta, |st, _| {
        st["disk"]["size"] = json!(2 * DISK);
    });
    assert_refused(&store, &delta, "a disk delta larger than its base");
}

#[test]
fn a_compact_disk_layer_is_refused() {
    let (_tmp, store, full, _delta) = golden_store();
    tamper(&store, &full, |st, _| {
        st["disk"]["kind"] = json!("compact");
        st["disk"]["file"]["len"] = json!(32);
    });
    assert_refused(&store, &full, "a compact disk layer");
}

#[test]
fn unsorted_memory_pages_are_refused() {
    let (_tmp, store, _full, delta) = golden_store();
    tamper(&store, &delta, |_, m| {
        m.delta_pages.reverse();
        m.delta_pages.insert(0, u32::MAX);
        m.memory.file.len = m.delta_pages.len() as u64 * PAGE as u64;
    });
    match store.manifest(&delta) {
        Err(Error::Snapshot { .. }) => {}
        other => panic!("expected Error::Snapshot, got {:?}", other.map(|_| ())),
    }
    assert_refused(&store, &delta, "memory pages out of order");
}
