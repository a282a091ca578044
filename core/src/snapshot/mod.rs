//! Snapshots: the manifest that describes one, the checked layers a resume maps, the compact
//! form's chunks, and the store that keeps them.
//!
//! The on-disk format, all of it (files of a snapshot directory, manifest fields and version,
//! layer and chunk files, checksums), is documented in one place: [`format`](mod@format). This
//! module holds the manifest's types ([`Manifest`], [`FileRecord`], [`MemoryRecord`],
//! [`LayerKind`]) and the helpers tiers use for their own state ([`TierState`],
//! [`bounded_vec`]); [`layer`] the checked layers, [`chunks`] the compact form, [`store`] the
//! local store.
//!
//! Everything read back from a snapshot is untrusted input (whoever can write the store's files
//! can write it): the container checks itself ([`format`](mod@format)), the manifest checks its
//! structure ([`Manifest::decode`]), layers are mapped only once checked ([`layer`]), and tiers
//! decode their own state into typed, versioned structs ([`TierState::decode`]) whose sequences
//! are bounded ([`bounded_vec`]).

pub mod chunks;
pub mod format;
pub mod layer;
pub mod store;

use std::fmt;
use std::marker::PhantomData;

use serde::de::{DeserializeOwned, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::SnapshotError;
use crate::spec::{SandboxSpec, Tier};

pub use crate::ids::SnapshotId;

/// A data file of a snapshot, as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// File name inside the snapshot directory.
    pub name: String,
    /// Logical length in bytes.
    pub len: u64,
    /// CRC-32 of the logical content (holes read as zeros).
    pub crc32: u32,
    /// Bytes actually stored (non-zero pages for sparse images).
    pub stored: u64,
}

/// How a memory layer relates to its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerKind {
    /// `memory.img`: the whole memory, zero pages as holes. Page `i` is at offset `i * 4096`.
    Full,
    /// `memory.delta`: only the pages written since the parent, packed in page-index order; the
    /// indices are in the manifest's `PAGE` section.
    Delta,
    /// `memory.cidx`: the compact form, an index of content-addressed compressed chunks (see
    /// [`chunks`]). A base like a full image; resuming it first rebuilds a full image (a cold
    /// resume).
    Compact,
}

/// The memory part of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRecord {
    /// Logical memory size in bytes at checkpoint time.
    pub size: u64,
    pub kind: LayerKind,
    pub file: FileRecord,
    /// Number of delta layers between this one and the nearest full image (0 for a full image).
    pub depth: u32,
}

/// A tier's own state in a manifest (WASI: globals, clock, module identity; KVM: vCPU, devices,
/// disk layer): the JSON text as written, decoded by the tier into its own typed, versioned
/// struct with [`TierState::decode`]. It is never parsed into a generic JSON tree, which would
/// cost tens of bytes of memory per byte of a hostile file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TierState(Box<RawValue>);

impl PartialEq for TierState {
    fn eq(&self, other: &TierState) -> bool {
        self.0.get() == other.0.get()
    }
}

/// The version of a state that does not say: states written before they carried a version
/// (still in snapshots on users' disks) are version 1. For `#[serde(default = ...)]`.
pub fn unversioned() -> u32 {
    1
}

#[derive(Deserialize)]
struct VersionProbe {
    #[serde(default = "unversioned_u64")]
    version: u64,
}

fn unversioned_u64() -> u64 {
    unversioned() as u64
}

/// Refuses a state version this build does not read, with a typed error naming the state.
pub fn check_version(
    what: &'static str,
    found: u64,
    supported: &'static [u32],
) -> Result<(), SnapshotError> {
    if supported.iter().any(|&v| v as u64 == found) {
        Ok(())
    } else {
        Err(SnapshotError::UnsupportedStateVersion {
            what,
            found,
            supported,
        })
    }
}

impl TierState {
    /// Encodes a tier's state.
    ///
    /// Errors: [`SnapshotError::Malformed`] if `state` does not serialize to JSON (a map with
    /// non-string keys; dormant's state types never do).
    pub fn encode<T: Serialize>(state: &T) -> Result<TierState, SnapshotError> {
        serde_json::to_string(state)
            .and_then(RawValue::from_string)
            .map(TierState)
            .map_err(|e| SnapshotError::Malformed(format!("tier state does not encode: {e}")))
    }

    /// The JSON text.
    pub fn as_json(&self) -> &str {
        self.0.get()
    }

    /// The state as a generic JSON tree (for tests and tools; decoding uses the typed struct).
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::from_str(self.0.get()).unwrap_or(serde_json::Value::Null)
    }

    /// Decodes the state into `T` once its top-level `version` field (absent: version 1, see
    /// [`unversioned`]) is one of `supported`.
    ///
    /// Errors: [`SnapshotError::UnsupportedStateVersion`] for another version,
    /// [`SnapshotError::Malformed`] (naming `what`) when the JSON does not decode into `T`.
    pub fn decode<T: DeserializeOwned>(
        &self,
        what: &'static str,
        supported: &'static [u32],
    ) -> Result<T, SnapshotError> {
        let probe: VersionProbe = self.decode_unversioned(what)?;
        check_version(what, probe.version, supported)?;
        self.decode_unversioned(what)
    }

    /// Decodes the state (or a probe of some of its fields) into `T` without a version check.
    pub fn decode_unversioned<T: DeserializeOwned>(
        &self,
        what: &'static str,
    ) -> Result<T, SnapshotError> {
        serde_json::from_str(self.0.get())
            .map_err(|e| SnapshotError::Malformed(format!("{what}: {e}")))
    }
}

/// Deserializes a sequence of at most `N` elements, refusing a longer one as soon as its
/// `N + 1`-th element is read: for fields of untrusted states whose elements take little room
/// in JSON but much in memory (`[[],[],…]` into `Vec<Vec<u8>>` is 3 bytes to 24), so that
/// decoding stays bounded by the caps, not by the file's length. Use as
/// `#[serde(deserialize_with = "bounded_vec::<_, _, N>")]`.
pub fn bounded_vec<'de, D, T, const N: usize>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Bounded<T, const N: usize>(PhantomData<T>);
    impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for Bounded<T, N> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a sequence of at most {N} elements")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut out = Vec::new();
            while let Some(x) = seq.next_element()? {
                if out.len() == N {
                    return Err(serde::de::Error::invalid_length(N + 1, &self));
                }
                out.push(x);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(Bounded::<T, N>(PhantomData))
}

/// Everything a snapshot is, apart from its bulk data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub id: SnapshotId,
    /// The snapshot this one is layered on (for a delta memory layer).
    pub parent: Option<SnapshotId>,
    /// The sandbox the snapshot was taken of.
    pub sandbox_id: String,
    pub tier: Tier,
    pub created_unix_ms: u64,
    pub spec: SandboxSpec,
    pub memory: MemoryRecord,
    /// The sandbox's own filesystem: a tar archive, or its chunk index when `fs_compact_len`
    /// is set.
    pub fs: Option<FileRecord>,
    /// Length of the filesystem archive when it is stored in compact form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs_compact_len: Option<u64>,
    /// Tier-specific state (WASI: globals, clock, module identity; KVM: vCPU, devices, disk).
    pub tier_state: TierState,
    /// Page indices of a delta layer (stored in the `PAGE` section, not in JSON).
    #[serde(skip)]
    pub delta_pages: Vec<u32>,
}

const TAG_META: format::Tag = *b"META";
const TAG_PAGE: format::Tag = *b"PAGE";

/// Cap on a manifest file: the page list of a 16 GiB memory plus metadata.
pub const MAX_MANIFEST_LEN: u64 = 64 << 20;
/// Decoding a manifest ([`Manifest::decode`]) allocates at most this many times the manifest's
/// length, plus 64 KiB, whatever its bytes claim (a section claiming 4 GiB allocates nothing of
/// the sort): sections are slices of the file, the tier state stays text (one copy), the page
/// list takes 4 bytes per 4 bytes of file. The worst case is metadata JSON shaped to grow:
/// a spec's environment of empty pairs (`["",""],`, 8 bytes of file, 48 of memory, plus
/// vector growth) measured 11.8 times its length. Tested by `tests/decode_alloc.rs` with a
/// counting allocator.
pub const MAX_DECODE_ALLOC_FACTOR: usize = 16;

impl Manifest {
    /// Encodes the manifest into the container format.
    pub fn encode(&self) -> Vec<u8> {
        let meta = serde_json::to_vec(self).expect("manifest serializes");
        let mut pages = Vec::with_capacity(self.delta_pages.len() * 4);
        for p in &self.delta_pages {
            pages.extend_from_slice(&p.to_le_bytes());
        }
        format::encode(&[(TAG_META, &meta), (TAG_PAGE, &pages)])
    }

    /// Decodes and checks a manifest image.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, SnapshotError> {
        let sections = format::decode(bytes, MAX_MANIFEST_LEN)?;
        let find = |tag: format::Tag| {
            sections
                .iter()
                .find(|(t, _)| *t == tag)
                .map(|(_, p)| *p)
                .ok_or_else(|| {
                    SnapshotError::Malformed(format!(
                        "no {} section",
                        String::from_utf8_lossy(&tag)
                    ))
                })
        };
        let mut m: Manifest = serde_json::from_slice(find(TAG_META)?)
            .map_err(|e| SnapshotError::Malformed(format!("metadata: {e}")))?;
        let pages = find(TAG_PAGE)?;
        if pages.len() % 4 != 0 {
            return Err(SnapshotError::Malformed(
                "page list length is not a multiple of 4".into(),
            ));
        }
        m.delta_pages = pages
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        m.check()?;
        Ok(m)
    }

    /// Structural checks that do not need the data files: the memory layer's (the same
    /// checks as every [`layer::Layer`]), and a parent for a delta.
    fn check(&self) -> Result<(), SnapshotError> {
        let mem = &self.memory;
        if mem.kind == LayerKind::Delta && self.parent.is_none() {
            return Err(SnapshotError::Malformed(
                "delta layer without a parent".into(),
            ));
        }
        layer::check(mem.size, mem.kind, &mem.file, mem.depth, &self.delta_pages).map_err(|e| {
            match e {
                SnapshotError::Malformed(m) => SnapshotError::Malformed(format!("memory: {m}")),
                e => e,
            }
        })
    }

    /// The memory layer, checked (fields of a decoded manifest were checked by
    /// [`Manifest::decode`], but they are public and may have changed since).
    pub fn memory_layer(&self) -> Result<layer::Layer, SnapshotError> {
        layer::Layer::of_memory(&self.memory, &self.delta_pages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Workload;
    use proptest::prelude::*;

    /// A manifest with fixed content, for the golden file.
    pub(crate) fn golden_manifest() -> Manifest {
        Manifest {
            id: SnapshotId::parse("s-0000019a00000000-0123456789abcdef0123456789abcdef").unwrap(),
            parent: Some(
                SnapshotId::parse("s-0000019900000000-fedcba9876543210fedcba9876543210").unwrap(),
            ),
            sandbox_id: "sb-golden".into(),
            tier: Tier::Wasi,
            created_unix_ms: 1_764_000_000_000,
            spec: SandboxSpec::python().env("A", "1"),
            memory: MemoryRecord {
                size: 16 * 4096,
                kind: LayerKind::Delta,
                file: FileRecord {
                    name: "memory.delta".into(),
                    len: 2 * 4096,
                    crc32: 0x1234_5678,
                    stored: 2 * 4096,
                },
                depth: 1,
            },
            fs: Some(FileRecord {
                name: "fs.tar".into(),
                len: 10240,
                crc32: 0x9abc_def0,
                stored: 10240,
            }),
            fs_compact_len: None,
            tier_state: serde_json::from_str(
                r#"{"clock_ns":42,"globals":[["__wizer_global_0","i32",65536]]}"#,
            )
            .unwrap(),
            delta_pages: vec![3, 9],
        }
    }

    #[test]
    fn ids() {
        let id = SnapshotId::generate();
        assert_eq!(SnapshotId::parse(id.as_str()).unwrap(), id);
        for bad in [
            "",
            "s-",
            "../../etc",
            "s-0000019a00000000-0123456789ABCDEF0123456789abcdef",
            "s-0000019a00000000/0123456789abcdef0123456789abcdef",
        ] {
            assert!(SnapshotId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn manifest_round_trip() {
        let m = golden_manifest();
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn manifest_checks_structure() {
        let mut m = golden_manifest();
        m.delta_pages = vec![9, 3];
        assert!(Manifest::decode(&m.encode()).is_err());
        let mut m = golden_manifest();
        m.delta_pages = vec![3, 99];
        assert!(Manifest::decode(&m.encode()).is_err());
        let _ = Workload::Python;
    }

    fn arb_manifest() -> impl Strategy<Value = Manifest> {
        let page = crate::snapshot::format::PAGE as u64;
        (
            any::<bool>(),
            prop_oneof![
                Just(LayerKind::Full),
                Just(LayerKind::Delta),
                Just(LayerKind::Compact)
            ],
            (0u64..64, prop_oneof![4 => Just(0u64), 1 => 1u64..4096]),
            prop_oneof![Just(0u32), Just(1), Just(2), any::<u32>()],
            prop::collection::vec(prop_oneof![4 => 0u32..80, 1 => any::<u32>()], 0..10),
            any::<bool>(),
            0u8..4,
            any::<u64>(),
            prop_oneof![
                Just("{}".to_string()),
                Just(r#"{"version":1,"x":[1,2,3]}"#.to_string()),
                "[a-z]{0,8}".prop_map(|s| format!("{s:?}")),
            ],
        )
            .prop_map(
                move |(
                    parent,
                    kind,
                    (npages, odd),
                    depth,
                    mut pages,
                    sorted,
                    len_from,
                    noise,
                    state,
                )| {
                    if sorted {
                        pages.sort_unstable();
                        pages.dedup();
                    }
                    let size = npages * page + odd;
                    let len = match len_from {
                        0 => size,
                        1 => pages.len() as u64 * page,
                        2 => size.div_ceil(chunks::CHUNK as u64) * chunks::HASH_LEN as u64,
                        _ => noise,
                    };
                    let mut m = golden_manifest();
                    if !parent {
                        m.parent = None;
                    }
                    m.memory = MemoryRecord {
                        size,
                        kind,
                        file: FileRecord {
                            name: "memory.x".into(),
                            len,
                            crc32: 0,
                            stored: len,
                        },
                        depth,
                    };
                    m.delta_pages = pages;
                    m.tier_state = serde_json::from_str(&state).unwrap();
                    m
                },
            )
    }

    proptest! {
        /// A manifest decodes back to itself exactly when its memory layer is consistent (the
        /// checks every layer gets) and a delta has a parent; otherwise it is a typed error.
        #[test]
        fn manifests_decode_exactly_when_consistent(m in arb_manifest()) {
            let ok = layer::check(
                m.memory.size,
                m.memory.kind,
                &m.memory.file,
                m.memory.depth,
                &m.delta_pages,
            )
            .is_ok()
                && (m.memory.kind != LayerKind::Delta || m.parent.is_some());
            match Manifest::decode(&m.encode()) {
                Ok(d) => {
                    prop_assert!(ok);
                    prop_assert!(d.memory_layer().is_ok());
                    prop_assert_eq!(d, m);
                }
                Err(e) => prop_assert!(
                    !ok && matches!(e, SnapshotError::Malformed(_) | SnapshotError::TooLarge { .. }),
                    "{e:?}"
                ),
            }
        }

        /// Every single-byte change of a manifest is caught by its checksums.
        #[test]
        fn single_byte_mutations_are_caught(
            at in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let img = golden_manifest().encode();
            let mut bad = img.clone();
            bad[at.index(img.len())] ^= flip;
            prop_assert!(Manifest::decode(&bad).is_err());
        }

        /// Metadata changed under valid checksums (random byte edits of its JSON, a random page
        /// section) decodes or is refused with a typed error, never a panic; what decodes has a
        /// consistent memory layer.
        #[test]
        fn hostile_metadata_under_valid_checksums_never_panics(
            edits in prop::collection::vec(
                (any::<prop::sample::Index>(), any::<u8>()),
                0..6,
            ),
            pages in prop::collection::vec(any::<u8>(), 0..40),
        ) {
            let mut meta = serde_json::to_vec(&golden_manifest()).unwrap();
            for (at, b) in edits {
                let i = at.index(meta.len());
                meta[i] = b;
            }
            let img = format::encode(&[(TAG_META, &meta), (TAG_PAGE, &pages)]);
            if let Ok(m) = Manifest::decode(&img) {
                prop_assert!(m.memory_layer().is_ok());
            }
        }
    }

    /// The golden file pins format version 1: a change of the encoding (field order, names,
    /// section layout) fails here. Regenerate with DORMANT_BLESS=1 only together with a format
    /// version bump and a decoder for the old version.
    #[test]
    fn golden_v1_still_loads_and_encodes_identically() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/manifest-v1.dsnp");
        let m = golden_manifest();
        if std::env::var_os("DORMANT_BLESS").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, m.encode()).unwrap();
        }
        let golden = std::fs::read(&path).expect("golden file present");
        assert_eq!(
            Manifest::decode(&golden).unwrap(),
            m,
            "golden manifest decodes to the known value"
        );
        assert_eq!(
            m.encode(),
            golden,
            "encoding changed: bump FORMAT_VERSION and keep a decoder for v1"
        );
    }
}
