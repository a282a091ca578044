//! Snapshots: ids, the manifest that describes one, its file format and the store that keeps
//! them.
//!
//! A snapshot is a directory in the store holding `manifest.dsnp` (this module's format: what
//! the snapshot is, its parent, tier state, and the length and CRC of every other file), a
//! memory layer (`memory.img`, a sparse page-aligned full image, or `memory.delta`, the pages
//! written since the parent, packed and page-aligned) and optionally `fs.tar`, the sandbox's own
//! filesystem.

pub mod chunks;
pub mod format;
pub mod store;

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::SnapshotError;
use crate::spec::{SandboxSpec, Tier};

/// Identifies a snapshot: `s-<creation ms, hex>-<random, hex>`. Sorts by creation time.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SnapshotId(String);

impl SnapshotId {
    /// A fresh id.
    pub fn generate() -> SnapshotId {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        SnapshotId(format!("s-{ms:016x}-{:032x}", rand::random::<u128>()))
    }

    /// Parses an id; anything but the exact shape is refused (ids name directories).
    pub fn parse(s: &str) -> Result<SnapshotId, SnapshotError> {
        let ok = s.len() == 2 + 16 + 1 + 32
            && s.starts_with("s-")
            && s.as_bytes()[18] == b'-'
            && s[2..18]
                .bytes()
                .chain(s[19..].bytes())
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
        if ok {
            Ok(SnapshotId(s.to_owned()))
        } else {
            Err(SnapshotError::Malformed(format!(
                "{s:?} is not a snapshot id"
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for SnapshotId {
    type Error = SnapshotError;
    fn try_from(s: String) -> Result<Self, SnapshotError> {
        SnapshotId::parse(&s)
    }
}

impl From<SnapshotId> for String {
    fn from(id: SnapshotId) -> String {
        id.0
    }
}

impl std::str::FromStr for SnapshotId {
    type Err = SnapshotError;
    fn from_str(s: &str) -> Result<Self, SnapshotError> {
        SnapshotId::parse(s)
    }
}

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
    /// Tier-specific state (WASI: globals, clock, module identity).
    pub tier_state: serde_json::Value,
    /// Page indices of a delta layer (stored in the `PAGE` section, not in JSON).
    #[serde(skip)]
    pub delta_pages: Vec<u32>,
}

const TAG_META: format::Tag = *b"META";
const TAG_PAGE: format::Tag = *b"PAGE";

/// Cap on a manifest file: the page list of a 16 GiB memory plus metadata.
pub const MAX_MANIFEST_LEN: u64 = 64 << 20;

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

    /// Structural checks that do not need the data files.
    fn check(&self) -> Result<(), SnapshotError> {
        let page = crate::memimage::PAGE as u64;
        let mem = &self.memory;
        if !mem.size.is_multiple_of(page) {
            return Err(SnapshotError::Malformed(
                "memory size is not page-aligned".into(),
            ));
        }
        let npages = mem.size / page;
        match mem.kind {
            LayerKind::Full => {
                if !self.delta_pages.is_empty() || mem.depth != 0 || mem.file.len != mem.size {
                    return Err(SnapshotError::Malformed(
                        "inconsistent full memory layer".into(),
                    ));
                }
            }
            LayerKind::Compact => {
                let chunks = mem.size.div_ceil(chunks::CHUNK as u64);
                if !self.delta_pages.is_empty()
                    || mem.depth != 0
                    || mem.file.len != chunks * chunks::HASH_LEN as u64
                {
                    return Err(SnapshotError::Malformed(
                        "inconsistent compact memory layer".into(),
                    ));
                }
            }
            LayerKind::Delta => {
                if self.parent.is_none() || mem.depth == 0 {
                    return Err(SnapshotError::Malformed(
                        "delta layer without a parent".into(),
                    ));
                }
                if !self.delta_pages.windows(2).all(|w| w[0] < w[1]) {
                    return Err(SnapshotError::Malformed(
                        "delta page list is not strictly increasing".into(),
                    ));
                }
                if self.delta_pages.last().is_some_and(|&p| p as u64 >= npages) {
                    return Err(SnapshotError::Malformed(
                        "delta page beyond memory size".into(),
                    ));
                }
                if mem.file.len != self.delta_pages.len() as u64 * page {
                    return Err(SnapshotError::Malformed(
                        "delta file length does not match its page list".into(),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Workload;

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
            tier_state: serde_json::json!({"clock_ns": 42, "globals": [["__wizer_global_0", "i32", 65536]]}),
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
