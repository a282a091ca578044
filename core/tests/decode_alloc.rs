//! Decoding untrusted snapshot bytes allocates in proportion to the bytes actually there,
//! never to what they claim: a manifest whose section claims 4 GiB, a page list of millions of
//! entries, JSON shaped to be small on disk and large in memory, and random mutations of a
//! real manifest all stay under [`dormant_core::snapshot::MAX_DECODE_ALLOC_FACTOR`] times the
//! manifest's length (plus a small constant), measured with a counting allocator.

#![allow(clippy::unwrap_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use dormant_core::snapshot::{
    FileRecord, LayerKind, MAX_DECODE_ALLOC_FACTOR, Manifest, MemoryRecord, SnapshotId, format,
};
use dormant_core::{SandboxSpec, SnapshotError, Tier};
use proptest::prelude::*;

/// Counts this thread's live heap bytes and their peak (per thread, so that tests running in
/// parallel do not disturb each other's measurements).
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn account(delta: isize) {
    let _ = LIVE.try_with(|l| {
        let v = l.get() + delta;
        l.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged; the bookkeeping only
// touches const-initialised thread-locals without destructors, and never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            account(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        account(-(layout.size() as isize));
        // SAFETY: forwarded: `ptr` was allocated by `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's arguments.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // While moving, the old and the new block may both be live.
            account(new_size as isize);
            account(-(layout.size() as isize));
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The peak of extra heap bytes live on this thread while `f` runs.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(start));
    let r = f();
    let peak = PEAK.with(Cell::get) - start;
    (r, peak.max(0) as usize)
}

/// The stated bound, for a manifest of `len` bytes.
fn bound(len: usize) -> usize {
    MAX_DECODE_ALLOC_FACTOR * len + (64 << 10)
}

fn decode_within_bound(bytes: &[u8]) -> Result<Manifest, SnapshotError> {
    let (r, peak) = peak_during(|| Manifest::decode(bytes));
    assert!(
        peak <= bound(bytes.len()),
        "decoding {} bytes allocated {peak} bytes ({:?})",
        bytes.len(),
        r.as_ref().err()
    );
    r
}

fn manifest() -> Manifest {
    Manifest {
        id: SnapshotId::parse("s-0000019a00000000-0123456789abcdef0123456789abcdef").unwrap(),
        parent: None,
        sandbox_id: "sb-alloc".into(),
        tier: Tier::Kvm,
        created_unix_ms: 1,
        spec: SandboxSpec::new(Tier::Kvm, dormant_core::Workload::Files),
        memory: MemoryRecord {
            size: 64 * 4096,
            kind: LayerKind::Full,
            file: FileRecord {
                name: "memory.img".into(),
                len: 64 * 4096,
                crc32: 0,
                stored: 0,
            },
            depth: 0,
        },
        fs: None,
        fs_compact_len: None,
        tier_state: serde_json::from_str(r#"{"version":1}"#).unwrap(),
        delta_pages: Vec::new(),
    }
}

/// A container with a valid whole-file CRC around a first section header claiming `len` bytes.
fn lying_section(len: u64, count: u32) -> Vec<u8> {
    let mut img = Vec::new();
    img.extend_from_slice(&format::MAGIC);
    img.extend_from_slice(&format::FORMAT_VERSION.to_le_bytes());
    img.extend_from_slice(&0u16.to_le_bytes());
    img.extend_from_slice(&count.to_le_bytes());
    img.extend_from_slice(b"META");
    img.extend_from_slice(&len.to_le_bytes());
    img.extend_from_slice(&0u32.to_le_bytes());
    let crc = crc32(&img);
    img.extend_from_slice(b"DEND");
    img.extend_from_slice(&crc.to_le_bytes());
    img
}

fn crc32(b: &[u8]) -> u32 {
    // The container's CRC (IEEE), computed here without a dependency.
    let mut crc = !0u32;
    for &x in b {
        crc ^= x as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A manifest whose META section is `meta` (valid CRCs) and PAGE section `pages`.
fn with_sections(meta: &[u8], pages: &[u8]) -> Vec<u8> {
    format::encode(&[(*b"META", meta), (*b"PAGE", pages)])
}

#[test]
fn sections_claiming_gigabytes_allocate_nothing_of_the_sort() {
    for (len, count) in [(4 << 30, 1), (u64::MAX, 1), (16, u32::MAX), (16, 64)] {
        let img = lying_section(len, count);
        assert!(decode_within_bound(&img).is_err());
        let (r, peak) = peak_during(|| format::decode(&img, 1 << 20));
        assert!(r.is_err());
        assert!(peak < 16 << 10, "{peak} bytes for a claim of {len} bytes");
    }
}

#[test]
fn a_huge_page_list_costs_what_it_weighs() {
    let mut m = manifest();
    m.parent = Some(m.id.clone());
    m.memory.kind = LayerKind::Delta;
    m.memory.depth = 1;
    m.memory.size = 1 << 34;
    m.delta_pages = (0..2_000_000).map(|p| p * 2).collect();
    m.memory.file.len = m.delta_pages.len() as u64 * 4096;
    let img = m.encode();
    assert_eq!(
        decode_within_bound(&img).unwrap().delta_pages.len(),
        2_000_000
    );
}

#[test]
fn json_shaped_to_grow_in_memory_stays_within_the_bound() {
    let base = serde_json::to_value(manifest()).unwrap();
    let n = 200_000;
    let shapes: Vec<(&str, serde_json::Value)> = vec![
        ("env", serde_json::json!(vec![["", ""]; n])),
        (
            "mounts",
            serde_json::json!(vec![
                serde_json::json!({"host": "", "guest": "", "read_only": false});
                n / 4
            ]),
        ),
        (
            "tier_state",
            serde_json::json!({"irqchips": vec![Vec::<u8>::new(); n]}),
        ),
        (
            "tier_state",
            serde_json::json!(vec![serde_json::json!([]); n]),
        ),
        ("sandbox_id", serde_json::json!("x".repeat(n))),
    ];
    for (field, value) in shapes {
        let mut meta = base.clone();
        if field == "env" || field == "mounts" {
            meta["spec"][field] = value;
        } else {
            meta[field] = value;
        }
        let img = with_sections(&serde_json::to_vec(&meta).unwrap(), &[]);
        let (r, peak) = peak_during(|| decode_within_bound(&img));
        eprintln!(
            "{field}: {} bytes allocated {peak} while decoding ({:.1}x): {:?}",
            img.len(),
            peak as f64 / img.len() as f64,
            r.as_ref().err()
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Random bytes after a valid header, and random mutations of a real manifest's META text
    /// (re-wrapped with valid CRCs), decode or fail with a typed error, within the bound.
    #[test]
    fn random_and_mutated_manifests_stay_within_the_bound(
        noise in prop::collection::vec(any::<u8>(), 0..4096),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        pages in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let _ = decode_within_bound(&noise);
        let mut meta = serde_json::to_vec(&manifest()).unwrap();
        for (at, b) in edits {
            let i = at.index(meta.len());
            meta[i] = b;
        }
        let _ = decode_within_bound(&with_sections(&meta, &pages));
    }
}
