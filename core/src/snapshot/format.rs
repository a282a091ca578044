//! # The on-disk snapshot format
//!
//! Everything a snapshot is on disk, in one place: the files of a snapshot directory, the
//! manifest (its container, sections, fields and version), the layer and chunk files, and the
//! checksums that guard them. Each part links to the code that writes and checks it; the code
//! of the manifest's container is this module's own.
//!
//! Everything read back is untrusted input (whoever can write the store's files can write a
//! snapshot): nothing is interpreted before it is checked, every length is capped before it is
//! allocated, and only checked layers can be mapped.
//!
//! ## A snapshot directory
//!
//! A committed snapshot is the directory `<store>/snapshots/<id>/` (the store's own layout, and
//! how a snapshot is committed atomically, are in [`store`](super::store)); its id is a
//! [`SnapshotId`](super::SnapshotId), `s-<creation ms, 16 hex>-<random, 32 hex>`.
//!
//! ```text
//! manifest.dsnp          the manifest: what the snapshot is, its parent, the tier's state, and
//!                        the name, length and CRC of every file below (the container below)
//! memory.img             memory layer, full: the whole memory, page i at offset i × 4096,
//!                        zero pages left as holes (a sparse file)
//! memory.delta           memory layer, delta: only the pages written since the parent, packed
//!                        in page order; their indices are the manifest's PAGE section
//! memory.cidx            memory layer, compact: a chunk index (see Chunks below)
//! fs.tar                 the sandbox's own filesystem (WASI tier): a tar archive of its root
//!                        directory (crate::fsarchive)
//! fs.cidx                the same archive in compact form: a chunk index
//! disk.img, disk.delta   the KVM tier's guest disk: a full or delta layer like the memory's,
//!                        recorded in the tier state, not in the fields below
//! ```
//!
//! A snapshot has exactly one memory layer file and at most one filesystem file; which one is
//! in the manifest. Other files beside them are the tier's (a KVM disk), recorded in its state.
//!
//! ## The manifest container: `manifest.dsnp`
//!
//! ```text
//! offset 0   magic    8 bytes  "DRMNTSNP"
//!        8   version  u16 LE   FORMAT_VERSION
//!       10   flags    u16 LE   0
//!       12   count    u32 LE   number of sections (≤ MAX_SECTIONS)
//!       16   sections, each:   tag [u8; 4], len u64 LE, crc32 u32 LE, `len` payload bytes
//!       end  trailer  "DEND", crc32 u32 LE of every byte before the trailer
//! ```
//!
//! Decoding ([`decode`]) checks, in order: the file size against the caller's cap, the magic,
//! the version, the whole-file CRC, then each section's length and CRC. Nothing is interpreted
//! before it is checked. Large memory data lives beside this file (page-aligned, mappable);
//! this file records their lengths and checksums. [`encode`] writes it.
//!
//! ## The manifest's sections
//!
//! [`Manifest::encode`](super::Manifest::encode) writes two sections and
//! [`Manifest::decode`](super::Manifest::decode) reads and checks them (the file at most
//! [`MAX_MANIFEST_LEN`](super::MAX_MANIFEST_LEN); decoding allocates at most
//! [`MAX_DECODE_ALLOC_FACTOR`](super::MAX_DECODE_ALLOC_FACTOR) times its length):
//!
//! - `META`: the [`Manifest`](super::Manifest) as JSON, an object with the fields
//!   - `id`, `parent` (the snapshot a delta layer is layered on, or `null`), `sandbox_id`,
//!     `tier` (`"wasi"` or `"kvm"`), `created_unix_ms`;
//!   - `spec`: the [`SandboxSpec`](crate::SandboxSpec) the sandbox was created from; its mounts
//!     keep only mount points (guest path, read-only flag), never a host directory;
//!   - `memory`: the [`MemoryRecord`](super::MemoryRecord): logical `size` in bytes, `kind`
//!     (`"full"`, `"delta"` or `"compact"`, see [`LayerKind`](super::LayerKind)), `file`, and
//!     `depth` (delta layers down to the nearest full or compact image);
//!   - `fs`: the filesystem file, or `null`; `fs_compact_len` (present only when `fs` is a
//!     chunk index): the length of the archive the index rebuilds;
//!   - `tier_state`: the tier's own JSON object (WASI: globals, clock, module identity; KVM:
//!     vCPU, devices, disk layer), decoded by the tier into its own versioned struct
//!     ([`TierState`](super::TierState)).
//!
//!   Every file is named by a [`FileRecord`](super::FileRecord): `name` (a plain file name in
//!   the snapshot directory), `len` (logical length), `crc32` (CRC-32 of the logical content,
//!   holes read as zeros) and `stored` (bytes actually stored: the non-zero pages of a sparse
//!   image).
//! - `PAGE`: a delta layer's page indices, `u32` LE each, strictly increasing (empty for a full
//!   or compact layer).
//!
//! ## Versions
//!
//! The container's [`FORMAT_VERSION`] (1) covers the container and the manifest's sections and
//! fields: a build reads only its own version ([`SnapshotError::UnsupportedVersion`]). The
//! golden file `core/tests/golden/manifest-v1.dsnp` pins the encoding (the manifest's test
//! `golden_v1_still_loads_and_encodes_identically`): a change of it needs a version bump and a
//! decoder for the old version. Tier states, and the vCPU and device states inside the KVM
//! tier's, carry their own `version` field (absent: version 1, see
//! [`unversioned`](super::unversioned)), checked by [`TierState::decode`](super::TierState::decode)
//! ([`SnapshotError::UnsupportedStateVersion`]).
//!
//! ## Layers and chains
//!
//! A memory (or KVM disk) layer is full, delta or compact ([`LayerKind`](super::LayerKind)).
//! Its structure is checked before it is used, by [`Layer::new`](super::layer::Layer::new):
//! a size that is a multiple of [`PAGE`] (at most
//! [`MAX_LAYER_PAGES`](super::layer::MAX_LAYER_PAGES) pages); for a delta, pages strictly
//! increasing and below `size / 4096`, a file of `pages × 4096` bytes and a depth above 0; for
//! a full image a file of `size` bytes, for a compact index one of `⌈size / 64 KiB⌉ × 32`
//! bytes, both at depth 0. A delta's `parent` is the snapshot below it;
//! [`LocalStore::chain`](super::store::LocalStore::chain) follows parents down to depth 0
//! (depth strictly decreasing), and a resume maps the chain from its base up. Only a checked
//! layer with its open, length-checked file ([`LayerFile`](super::layer::LayerFile)) can be
//! mapped ([`memimage::map_layer`](crate::memimage::map_layer)).
//!
//! ## Chunks: the compact form
//!
//! A compact file (`memory.cidx`, `fs.cidx`) is an index: one 32-byte blake3 hash per 64 KiB
//! chunk of its logical content, all zeros for a chunk of zeros (never stored). Each chunk is
//! stored once per store, zstd-compressed, at `<store>/chunks/<2 hex>/<62 hex>` of its hash,
//! and shared by every snapshot that contains it. A resume rebuilds the full file once into
//! `<store>/rehydrated/<id>.img` (or `.tar`). See [`chunks`](super::chunks);
//! [`LocalStore::compact`](super::store::LocalStore::compact) converts a snapshot.
//!
//! ## Checksums, and when they are checked
//!
//! - The manifest: its whole-file CRC-32 and each section's, on every read, before anything
//!   in it is interpreted ([`decode`]).
//! - Data files: the length on every open; the CRC-32 of the logical content (`crc32` of its
//!   [`FileRecord`](super::FileRecord)) once: the writer's own CRC counts, else the first open
//!   reads the file, and `.verified` beside the files records it with each file's identity,
//!   so neither this process nor another reads it again while the file is unchanged
//!   ([`LocalStore::open_file`](super::store::LocalStore::open_file); a store opened
//!   [`with_data_verification(false)`](super::store::LocalStore::with_data_verification)
//!   skips the check).
//! - Chunks: a chunk's name is the blake3 hash of its content, checked on every read
//!   ([`Chunks::get`](super::chunks::Chunks::get)).

use crate::error::SnapshotError;

/// Size of a page of a memory layer, in bytes: the host page size (x86-64 Linux), so that a
/// layer is mapped page by page. Page `i` of a full image is at offset `i * PAGE`.
pub const PAGE: usize = 4096;

/// First bytes of every snapshot manifest.
pub const MAGIC: [u8; 8] = *b"DRMNTSNP";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Most sections a manifest may declare.
pub const MAX_SECTIONS: u32 = 64;
const TRAILER: [u8; 4] = *b"DEND";
const HEADER_LEN: usize = 16;
const SECTION_HEADER_LEN: usize = 16;

/// A section tag.
pub type Tag = [u8; 4];

/// Encodes sections into a manifest file image.
pub fn encode(sections: &[(Tag, &[u8])]) -> Vec<u8> {
    let total: usize = HEADER_LEN
        + sections
            .iter()
            .map(|(_, p)| SECTION_HEADER_LEN + p.len())
            .sum::<usize>()
        + 8;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(sections.len() as u32).to_le_bytes());
    for (tag, payload) in sections {
        out.extend_from_slice(tag);
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        out.extend_from_slice(payload);
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&TRAILER);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn truncated(what: impl Into<String>) -> SnapshotError {
    SnapshotError::Truncated { what: what.into() }
}

fn tag_name(tag: &Tag) -> String {
    String::from_utf8_lossy(tag).into_owned()
}

/// Decodes and checks a manifest image; returns its sections in file order.
pub fn decode(bytes: &[u8], max_len: u64) -> Result<Vec<(Tag, &[u8])>, SnapshotError> {
    if bytes.len() as u64 > max_len {
        return Err(SnapshotError::TooLarge {
            what: "manifest".into(),
            size: bytes.len() as u64,
            limit: max_len,
        });
    }
    if bytes.len() < MAGIC.len() {
        return Err(if MAGIC.starts_with(bytes) {
            truncated("header")
        } else {
            SnapshotError::BadMagic
        });
    }
    if bytes[..8] != MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    if bytes.len() < HEADER_LEN + 8 {
        return Err(truncated("header"));
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version != FORMAT_VERSION {
        return Err(SnapshotError::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let body_end = bytes.len() - 8;
    if bytes[body_end..body_end + 4] != TRAILER {
        return Err(truncated("trailer"));
    }
    let want = u32::from_le_bytes(bytes[body_end + 4..].try_into().expect("4 bytes"));
    if crc32fast::hash(&bytes[..body_end]) != want {
        return Err(SnapshotError::Checksum {
            what: "manifest".into(),
        });
    }
    let count = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
    if count > MAX_SECTIONS {
        return Err(SnapshotError::Malformed(format!(
            "{count} sections (at most {MAX_SECTIONS})"
        )));
    }
    let body = &bytes[..body_end];
    let mut at = HEADER_LEN;
    let mut out = Vec::with_capacity(count as usize);
    for i in 0..count {
        if body.len() - at < SECTION_HEADER_LEN {
            return Err(truncated(format!("section {i} header")));
        }
        let tag: Tag = body[at..at + 4].try_into().expect("4 bytes");
        let len = u64::from_le_bytes(body[at + 4..at + 12].try_into().expect("8 bytes"));
        let crc = u32::from_le_bytes(body[at + 12..at + 16].try_into().expect("4 bytes"));
        at += SECTION_HEADER_LEN;
        if len > (body.len() - at) as u64 {
            return Err(truncated(format!("section {}", tag_name(&tag))));
        }
        let payload = &body[at..at + len as usize];
        if crc32fast::hash(payload) != crc {
            return Err(SnapshotError::Checksum {
                what: format!("section {}", tag_name(&tag)),
            });
        }
        out.push((tag, payload));
        at += len as usize;
    }
    if at != body.len() {
        return Err(SnapshotError::Malformed(format!(
            "{} trailing bytes",
            body.len() - at
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Vec<u8> {
        encode(&[
            (*b"META", b"{\"a\":1}"),
            (*b"PAGE", &[1, 0, 0, 0, 7, 0, 0, 0]),
        ])
    }

    #[test]
    fn round_trip() {
        let img = sample();
        let s = decode(&img, 1 << 20).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(&s[0].0, b"META");
        assert_eq!(s[0].1, b"{\"a\":1}");
        assert_eq!(s[1].1, &[1, 0, 0, 0, 7, 0, 0, 0]);
    }

    #[test]
    fn bad_magic() {
        let mut img = sample();
        img[0] = b'X';
        assert!(matches!(
            decode(&img, 1 << 20),
            Err(SnapshotError::BadMagic)
        ));
        assert!(matches!(
            decode(b"hello world, not a snapshot", 1 << 20),
            Err(SnapshotError::BadMagic)
        ));
    }

    #[test]
    fn bad_version() {
        let mut img = sample();
        img[8] = 99;
        assert!(matches!(
            decode(&img, 1 << 20),
            Err(SnapshotError::UnsupportedVersion {
                found: 99,
                supported: FORMAT_VERSION
            })
        ));
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let img = sample();
        for i in 0..img.len() {
            for bit in 0..8 {
                let mut bad = img.clone();
                bad[i] ^= 1 << bit;
                assert!(
                    decode(&bad, 1 << 20).is_err(),
                    "flip of bit {bit} in byte {i} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn every_truncation_is_detected() {
        let img = sample();
        for n in 0..img.len() {
            assert!(
                decode(&img[..n], 1 << 20).is_err(),
                "truncation to {n} bytes went unnoticed"
            );
        }
    }

    #[test]
    fn size_cap() {
        let img = sample();
        assert!(matches!(
            decode(&img, 10),
            Err(SnapshotError::TooLarge { .. })
        ));
    }

    fn sections() -> impl Strategy<Value = Vec<(Tag, Vec<u8>)>> {
        prop::collection::vec(
            (any::<Tag>(), prop::collection::vec(any::<u8>(), 0..64)),
            0..6,
        )
    }

    proptest! {
        /// Random bytes, with or without a valid header in front, are refused (or decoded)
        /// without a panic.
        #[test]
        fn random_bytes_never_panic(
            body in prop::collection::vec(any::<u8>(), 0..512),
            header in any::<bool>(),
            count in any::<u32>(),
        ) {
            let mut img = Vec::new();
            if header {
                img.extend_from_slice(&MAGIC);
                img.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
                img.extend_from_slice(&0u16.to_le_bytes());
                img.extend_from_slice(&count.to_le_bytes());
            }
            img.extend_from_slice(&body);
            let _ = decode(&img, 1 << 20);
        }

        /// Any sections round-trip, and every single-byte change of their encoding, and every
        /// truncation, is caught.
        #[test]
        fn single_byte_mutations_and_truncations_are_caught(
            sections in sections(),
            at in any::<prop::sample::Index>(),
            flip in 1u8..=255,
            cut in any::<prop::sample::Index>(),
        ) {
            let refs: Vec<(Tag, &[u8])> = sections.iter().map(|(t, p)| (*t, &p[..])).collect();
            let img = encode(&refs);
            prop_assert_eq!(decode(&img, 1 << 20).unwrap(), refs);
            let mut bad = img.clone();
            bad[at.index(img.len())] ^= flip;
            prop_assert!(decode(&bad, 1 << 20).is_err());
            prop_assert!(decode(&img[..cut.index(img.len())], 1 << 20).is_err());
        }
    }

    #[test]
    fn section_length_beyond_file_is_refused_before_reading() {
        // A valid whole-file CRC around a section header that lies about its length.
        let mut img = Vec::new();
        img.extend_from_slice(&MAGIC);
        img.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        img.extend_from_slice(&0u16.to_le_bytes());
        img.extend_from_slice(&1u32.to_le_bytes());
        img.extend_from_slice(b"META");
        img.extend_from_slice(&u64::MAX.to_le_bytes());
        img.extend_from_slice(&0u32.to_le_bytes());
        let crc = crc32fast::hash(&img);
        img.extend_from_slice(b"DEND");
        img.extend_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            decode(&img, 1 << 20),
            Err(SnapshotError::Truncated { .. })
        ));
    }
}
