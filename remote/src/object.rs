//! A snapshot as an object of the bucket: `snapshots/<id>`, immutable once written.
//!
//! It holds the snapshot's local manifest (`manifest.dsnp`, byte for byte) and, for every other
//! file of its directory (memory and disk layers, the filesystem archive, chunk indexes), the
//! file's name, its length, and its chunk index: one 32-byte blake3 hash per 64 KiB chunk of
//! its content, all zeros for a chunk of zeros (never stored), each chunk an object
//! `chunks/<64 hex>` (zstd-compressed; the compact form's chunks, see
//! [`dormant_core::snapshot::chunks`]). Pulling it rebuilds the directory byte for byte.
//!
//! The object is the manifest container of [`format`] (magic, version, per-section and
//! whole-file CRC-32), with three sections:
//!
//! ```text
//! RSNP   JSON: {"version": 1, "id", "parent" (or null), "sandbox_id",
//!               "files": [{"name", "len"}]}
//! MNFT   the local manifest, manifest.dsnp, as the snapshot's directory holds it
//! CIDX   the files' chunk indexes, concatenated in the order of "files"
//!        (⌈len / 64 KiB⌉ entries of 32 bytes each)
//! ```
//!
//! Everything in it is untrusted (whoever can write the bucket can write it):
//! [`SnapshotObject::decode`] checks the container, caps every count and length before it
//! allocates, checks file names (plain names, no `manifest.dsnp`, no duplicates), that the
//! index lengths add up, and that the manifest inside decodes and names the same snapshot,
//! parent and sandbox. Chunks are checked against their hash when fetched.

use dormant_core::snapshot::chunks::{CHUNK, HASH_LEN};
use dormant_core::snapshot::format::{self, Tag};
use dormant_core::snapshot::{Manifest, SnapshotId};
use serde::{Deserialize, Serialize};

const META: Tag = *b"RSNP";
const MANIFEST: Tag = *b"MNFT";
const INDEX: Tag = *b"CIDX";
/// The version of the `RSNP` section this build writes and reads.
pub const OBJECT_VERSION: u32 = 1;
/// Most files a snapshot object may list (a snapshot directory has a manifest, one memory
/// layer, at most one filesystem file and the tier's disk layer).
pub const MAX_FILES: usize = 16;
/// Longest file name in a snapshot object.
pub const MAX_NAME_LEN: usize = 64;
/// Largest file a snapshot object may describe: 1 TiB (a 16 M-entry index).
pub const MAX_FILE_LEN: u64 = 1 << 40;
/// Largest snapshot object: its indexes plus a manifest (a 1 TiB file's index is 512 MiB;
/// real objects are KiB to MiB: 32 bytes per 64 KiB of content).
pub const MAX_OBJECT_LEN: u64 = 1 << 30;

/// The name of the local manifest file in a snapshot directory.
pub const MANIFEST_FILE: &str = "manifest.dsnp";

/// A data file of a snapshot object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectFile {
    /// Its name in the snapshot directory.
    pub name: String,
    /// Its length in bytes.
    pub len: u64,
}

impl ObjectFile {
    /// Entries of its chunk index: ⌈len / 64 KiB⌉.
    pub fn chunk_count(&self) -> usize {
        self.len.div_ceil(CHUNK as u64) as usize
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    version: u32,
    id: SnapshotId,
    parent: Option<SnapshotId>,
    sandbox_id: String,
    files: Vec<ObjectFile>,
}

/// A snapshot object, decoded and checked (or about to be encoded).
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotObject {
    /// The snapshot's local manifest, decoded.
    pub manifest: Manifest,
    /// Its bytes, as `manifest.dsnp` holds them.
    pub manifest_bytes: Vec<u8>,
    /// The data files, each with its chunk index (`chunk_count() × 32` bytes).
    pub files: Vec<(ObjectFile, Vec<u8>)>,
}

/// Why a snapshot object cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectError(pub String);

impl std::fmt::Display for ObjectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ObjectError {}

fn bad<T>(what: impl Into<String>) -> Result<T, ObjectError> {
    Err(ObjectError(what.into()))
}

/// Whether `name` may name a data file in a snapshot directory: 1 to [`MAX_NAME_LEN`] ASCII
/// letters, digits, `.`, `_`, `-`, not starting with `.`, and not the manifest.
pub fn valid_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name != MANIFEST_FILE
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl SnapshotObject {
    /// The snapshot's id.
    pub fn id(&self) -> &SnapshotId {
        &self.manifest.id
    }

    /// Encodes the object (as [`decode`](Self::decode) reads it).
    pub fn encode(&self) -> Vec<u8> {
        let meta = Meta {
            version: OBJECT_VERSION,
            id: self.manifest.id.clone(),
            parent: self.manifest.parent.clone(),
            sandbox_id: self.manifest.sandbox_id.clone(),
            files: self.files.iter().map(|(f, _)| f.clone()).collect(),
        };
        let meta = serde_json::to_vec(&meta).expect("the object's metadata serialises");
        let mut index = Vec::with_capacity(self.files.iter().map(|(_, i)| i.len()).sum());
        for (_, i) in &self.files {
            index.extend_from_slice(i);
        }
        format::encode(&[
            (META, &meta),
            (MANIFEST, &self.manifest_bytes),
            (INDEX, &index),
        ])
    }

    /// Decodes and checks an object read from the bucket (see the module's documentation for
    /// what is checked). `expected`: the id it was fetched as.
    pub fn decode(bytes: &[u8], expected: &SnapshotId) -> Result<SnapshotObject, ObjectError> {
        let sections =
            format::decode(bytes, MAX_OBJECT_LEN).map_err(|e| ObjectError(e.to_string()))?;
        let find = |tag: Tag| -> Result<&[u8], ObjectError> {
            let mut it = sections.iter().filter(|(t, _)| *t == tag);
            match (it.next(), it.next()) {
                (Some((_, p)), None) => Ok(p),
                (None, _) => bad(format!("no {} section", String::from_utf8_lossy(&tag))),
                (Some(_), Some(_)) => {
                    bad(format!("two {} sections", String::from_utf8_lossy(&tag)))
                }
            }
        };
        let meta_bytes = find(META)?;
        if meta_bytes.len() > 64 * 1024 {
            return bad("metadata section over 64 KiB");
        }
        let meta: Meta = serde_json::from_slice(meta_bytes)
            .map_err(|e| ObjectError(format!("metadata: {e}")))?;
        if meta.version != OBJECT_VERSION {
            return bad(format!(
                "object version {} (this build reads {OBJECT_VERSION})",
                meta.version
            ));
        }
        if &meta.id != expected {
            return bad(format!("object names snapshot {}", meta.id));
        }
        if meta.files.len() > MAX_FILES {
            return bad(format!("{} files (at most {MAX_FILES})", meta.files.len()));
        }
        let index = find(INDEX)?;
        let mut at = 0usize;
        let mut files = Vec::with_capacity(meta.files.len());
        for (i, f) in meta.files.iter().enumerate() {
            if !valid_file_name(&f.name) {
                return bad(format!("bad file name {:?}", f.name));
            }
            if meta.files[..i].iter().any(|g| g.name == f.name) {
                return bad(format!("file {:?} listed twice", f.name));
            }
            if f.len > MAX_FILE_LEN {
                return bad(format!("file {:?} of {} bytes", f.name, f.len));
            }
            let n = f.chunk_count() * HASH_LEN;
            let Some(idx) = index.get(at..at + n) else {
                return bad("chunk indexes shorter than the files' lengths");
            };
            files.push((f.clone(), idx.to_vec()));
            at += n;
        }
        if at != index.len() {
            return bad("chunk indexes longer than the files' lengths");
        }
        let manifest_bytes = find(MANIFEST)?;
        let manifest = Manifest::decode(manifest_bytes)
            .map_err(|e| ObjectError(format!("its manifest: {e}")))?;
        if manifest.id != meta.id
            || manifest.parent != meta.parent
            || manifest.sandbox_id != meta.sandbox_id
        {
            return bad("its manifest names another snapshot, parent or sandbox");
        }
        Ok(SnapshotObject {
            manifest,
            manifest_bytes: manifest_bytes.to_vec(),
            files,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dormant_core::snapshot::{FileRecord, LayerKind, MemoryRecord};
    use dormant_core::{SandboxSpec, Tier};
    use proptest::prelude::*;

    fn manifest() -> Manifest {
        Manifest {
            id: SnapshotId::parse("s-0000018f00000000-0123456789abcdef0123456789abcdef").unwrap(),
            parent: None,
            sandbox_id: "sb-test".into(),
            tier: Tier::Wasi,
            created_unix_ms: 1_764_000_000_000,
            spec: SandboxSpec::python(),
            memory: MemoryRecord {
                size: 65536,
                kind: LayerKind::Full,
                file: FileRecord {
                    name: "memory.img".into(),
                    len: 65536,
                    crc32: 0,
                    stored: 0,
                },
                depth: 0,
            },
            fs: None,
            fs_compact_len: None,
            tier_state: serde_json::from_str("{}").unwrap(),
            delta_pages: Vec::new(),
        }
    }

    fn object() -> SnapshotObject {
        let m = manifest();
        SnapshotObject {
            manifest_bytes: m.encode(),
            manifest: m,
            files: vec![
                (
                    ObjectFile {
                        name: "memory.img".into(),
                        len: 3 * CHUNK as u64 + 1,
                    },
                    (0..4 * HASH_LEN).map(|i| i as u8).collect(),
                ),
                (
                    ObjectFile {
                        name: "fs.tar".into(),
                        len: 0,
                    },
                    Vec::new(),
                ),
            ],
        }
    }

    #[test]
    fn round_trip() {
        let o = object();
        let back = SnapshotObject::decode(&o.encode(), o.id()).unwrap();
        assert_eq!(back, o);
    }

    #[test]
    fn refuses_what_does_not_add_up() {
        let o = object();
        let other =
            SnapshotId::parse("s-0000018f00000001-0123456789abcdef0123456789abcdef").unwrap();
        assert!(
            SnapshotObject::decode(&o.encode(), &other).is_err(),
            "fetched as another id"
        );
        for name in [
            "",
            ".verified",
            "a/b",
            "manifest.dsnp",
            "../x",
            &"x".repeat(65),
        ] {
            let mut o2 = o.clone();
            o2.files[1].0.name = name.into();
            assert!(
                SnapshotObject::decode(&o2.encode(), o.id()).is_err(),
                "name {name:?}"
            );
        }
        let mut dup = o.clone();
        dup.files[1].0.name = "memory.img".into();
        assert!(SnapshotObject::decode(&dup.encode(), o.id()).is_err());
        let mut short = o.clone();
        short.files[0].0.len += CHUNK as u64;
        assert!(SnapshotObject::decode(&short.encode(), o.id()).is_err());
        let mut long = o.clone();
        long.files[0].1.extend_from_slice(&[1; HASH_LEN]);
        assert!(SnapshotObject::decode(&long.encode(), o.id()).is_err());
        let mut huge = o.clone();
        huge.files[1].0.len = MAX_FILE_LEN + 1;
        assert!(SnapshotObject::decode(&huge.encode(), o.id()).is_err());
        let mut lying = o.clone();
        lying.manifest.sandbox_id = "sb-other".into();
        assert!(SnapshotObject::decode(&lying.encode(), o.id()).is_err());
    }

    proptest! {
        /// Arbitrary bytes, and arbitrary damage to a valid object, never panic and are
        /// refused or decode to a checked object.
        #[test]
        fn decoding_untrusted_bytes_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..4096),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
            cut in any::<usize>(),
        ) {
            let o = object();
            let _ = SnapshotObject::decode(&bytes, o.id());
            let mut enc = o.encode();
            for (at, x) in flips {
                let n = enc.len();
                enc[at % n] ^= x;
            }
            let n = enc.len();
            enc.truncate(cut % (n + 1));
            if let Ok(back) = SnapshotObject::decode(&enc, o.id()) {
                let mut sum = 0;
                for (f, idx) in &back.files {
                    prop_assert!(valid_file_name(&f.name));
                    prop_assert_eq!(idx.len(), f.chunk_count() * HASH_LEN);
                    sum += idx.len();
                }
                prop_assert!(sum <= enc.len());
            }
        }

        /// Objects with arbitrary files and indexes round-trip.
        #[test]
        fn arbitrary_objects_round_trip(
            lens in proptest::collection::vec(0u64..(20 * CHUNK as u64), 0..MAX_FILES),
            seed in any::<u8>(),
        ) {
            let mut o = object();
            o.files = lens
                .iter()
                .enumerate()
                .map(|(i, &len)| {
                    let f = ObjectFile { name: format!("f{i}.img"), len };
                    let idx = vec![seed.wrapping_add(i as u8); f.chunk_count() * HASH_LEN];
                    (f, idx)
                })
                .collect();
            let back = SnapshotObject::decode(&o.encode(), o.id()).unwrap();
            prop_assert_eq!(back, o);
        }
    }
}
