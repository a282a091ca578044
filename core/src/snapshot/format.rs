//! The snapshot container format: one self-checking file per snapshot (`manifest.dsnp`).
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
//! Decoding checks, in order: the file size against the caller's cap, the magic, the version,
//! the whole-file CRC, then each section's length and CRC. Nothing is interpreted before it is
//! checked. Large memory data lives beside this file (page-aligned, mappable); this file records
//! their lengths and checksums.

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
