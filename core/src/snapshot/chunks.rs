//! The compact form of snapshots: content-addressed, compressed chunks.
//!
//! A file in compact form is an *index*: one 32-byte blake3 hash per 64 KiB chunk of its
//! logical content, all zeros for a chunk that is all zeros (never stored). Each non-zero chunk
//! is stored once in the store, zstd-compressed, at `chunks/<2 hex>/<62 hex>`, whatever the
//! number of snapshots (or forks) that contain it: identical chunks across snapshots are
//! deduplicated. A chunk's name is the hash of its uncompressed content and is checked when it
//! is read back.
//!
//! Chunks are written atomically (temp file + rename) under a shared lock; garbage collection
//! takes the lock exclusively, so it never removes a chunk that a compaction in progress has
//! just written or decided to reuse.
//!
//! Where compact files sit among a snapshot's files: [`super::format`].

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Size of a chunk of logical content.
pub const CHUNK: usize = 64 * 1024;
/// Length of one index entry.
pub const HASH_LEN: usize = 32;
const ZSTD_LEVEL: i32 = 3;

/// A zero entry: the chunk is all zeros and is not stored.
pub const ZERO: [u8; HASH_LEN] = [0; HASH_LEN];

/// The chunk directory of a store.
#[derive(Debug, Clone)]
pub struct Chunks {
    dir: PathBuf,
}

/// What compacting one file produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactStats {
    /// Non-zero chunks in the file.
    pub chunks: u64,
    /// Chunks that were already in the store (deduplicated).
    pub reused: u64,
    /// Compressed bytes newly written.
    pub new_bytes: u64,
}

/// Lower-case hex of a hash (a chunk's name).
pub fn hex(h: &[u8]) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

impl Chunks {
    pub fn new(dir: PathBuf) -> Chunks {
        Chunks { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the chunk with this hash lives.
    pub fn path(&self, hash: &[u8; HASH_LEN]) -> PathBuf {
        let h = hex(hash);
        self.dir.join(&h[..2]).join(&h[2..])
    }

    /// Stores `data` (one chunk) unless an identical chunk is already stored. Returns its hash
    /// and the compressed bytes written (0 when deduplicated).
    pub fn put(&self, data: &[u8]) -> io::Result<([u8; HASH_LEN], u64)> {
        let hash: [u8; HASH_LEN] = *blake3::hash(data).as_bytes();
        let path = self.path(&hash);
        if path.exists() {
            return Ok((hash, 0));
        }
        let compressed = zstd::bulk::compress(data, ZSTD_LEVEL)?;
        fs::create_dir_all(path.parent().expect("chunk paths have a parent"))?;
        crate::fsutil::write_atomic(&path, &compressed)?;
        Ok((hash, compressed.len() as u64))
    }

    /// Reads a chunk into `out` (exactly `out.len()` bytes of content), checking its hash.
    pub fn get(&self, hash: &[u8; HASH_LEN], out: &mut [u8]) -> io::Result<()> {
        let compressed = fs::read(self.path(hash))?;
        let n = zstd::bulk::decompress_to_buffer(&compressed, out)?;
        if n != out.len() || blake3::hash(out).as_bytes() != hash {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("chunk {} is corrupt", hex(hash)),
            ));
        }
        Ok(())
    }

    /// Compacts the first `len` bytes of `src` into chunks; returns the index.
    pub fn compact(&self, src: &File, len: u64) -> io::Result<(Vec<u8>, CompactStats)> {
        self.compact_with(src, len, &mut || {})
    }

    /// [`compact`](Self::compact), calling `on_chunk` after each 64 KiB chunk of `src` (zero
    /// chunks included: `len.div_ceil(CHUNK)` calls in all).
    pub fn compact_with(
        &self,
        src: &File,
        len: u64,
        on_chunk: &mut dyn FnMut(),
    ) -> io::Result<(Vec<u8>, CompactStats)> {
        let n = (len as usize).div_ceil(CHUNK);
        let mut index = Vec::with_capacity(n * HASH_LEN);
        let mut stats = CompactStats::default();
        let mut buf = vec![0u8; CHUNK];
        for i in 0..n {
            let at = (i * CHUNK) as u64;
            let take = ((len - at) as usize).min(CHUNK);
            src.read_exact_at(&mut buf[..take], at)?;
            let data = &buf[..take];
            if data.iter().all(|&b| b == 0) {
                index.extend_from_slice(&ZERO);
                on_chunk();
                continue;
            }
            let (hash, written) = self.put(data)?;
            on_chunk();
            stats.chunks += 1;
            if written == 0 {
                stats.reused += 1;
            }
            stats.new_bytes += written;
            index.extend_from_slice(&hash);
        }
        Ok((index, stats))
    }

    /// Rebuilds `len` bytes of content from `index` into `dst` (zero chunks left as holes).
    pub fn rehydrate(&self, index: &[u8], len: u64, dst: &File) -> io::Result<()> {
        if !index.len().is_multiple_of(HASH_LEN)
            || index.len() / HASH_LEN != (len as usize).div_ceil(CHUNK)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "chunk index does not match the content length",
            ));
        }
        dst.set_len(len)?;
        let mut buf = vec![0u8; CHUNK];
        for (i, h) in index.chunks_exact(HASH_LEN).enumerate() {
            let h: &[u8; HASH_LEN] = h.try_into().expect("HASH_LEN bytes");
            if *h == ZERO {
                continue;
            }
            let at = (i * CHUNK) as u64;
            let take = ((len - at) as usize).min(CHUNK);
            self.get(h, &mut buf[..take])?;
            dst.write_all_at(&buf[..take], at)?;
        }
        Ok(())
    }

    /// Every stored chunk's hash with its compressed size.
    pub fn list(&self) -> io::Result<Vec<([u8; HASH_LEN], u64)>> {
        let mut out = Vec::new();
        let rd = match fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for sub in rd {
            let sub = sub?;
            let prefix = sub.file_name().to_string_lossy().into_owned();
            if prefix.len() != 2 || !sub.file_type()?.is_dir() {
                continue;
            }
            for ent in fs::read_dir(sub.path())? {
                let ent = ent?;
                let name = format!("{prefix}{}", ent.file_name().to_string_lossy());
                if let Some(h) = parse_hex(&name) {
                    out.push((h, ent.metadata()?.len()));
                }
            }
        }
        Ok(out)
    }
}

/// The hash a chunk's name (64 hex digits) stands for.
pub fn parse_hex(s: &str) -> Option<[u8; HASH_LEN]> {
    if s.len() != HASH_LEN * 2 {
        return None;
    }
    let mut out = [0u8; HASH_LEN];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The distinct non-zero hashes of an index.
pub fn referenced(index: &[u8]) -> impl Iterator<Item = [u8; HASH_LEN]> + '_ {
    index
        .chunks_exact(HASH_LEN)
        .map(|h| <[u8; HASH_LEN]>::try_from(h).expect("HASH_LEN bytes"))
        .filter(|h| *h != ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_dedup_and_zero_chunks() {
        let tmp = tempfile::tempdir().unwrap();
        let chunks = Chunks::new(tmp.path().join("chunks"));
        let len = 5 * CHUNK as u64 + 100;
        let mut content = vec![0u8; len as usize];
        content[10] = 1; // chunk 0
        content.copy_within(..CHUNK, 2 * CHUNK); // chunk 2 = chunk 0
        content[5 * CHUNK + 50] = 9; // the short tail chunk
        let src = tmp.path().join("src");
        std::fs::write(&src, &content).unwrap();
        let (index, stats) = chunks.compact(&File::open(&src).unwrap(), len).unwrap();
        assert_eq!(index.len(), 6 * HASH_LEN);
        assert_eq!(stats.chunks, 3);
        assert_eq!(stats.reused, 1, "chunk 2 deduplicated against chunk 0");
        assert_eq!(chunks.list().unwrap().len(), 2);
        assert_eq!(&index[HASH_LEN..2 * HASH_LEN], &ZERO);
        let dst = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(tmp.path().join("dst"))
            .unwrap();
        chunks.rehydrate(&index, len, &dst).unwrap();
        assert_eq!(std::fs::read(tmp.path().join("dst")).unwrap(), content);
        // A corrupted chunk is detected.
        let h: [u8; HASH_LEN] = index[..HASH_LEN].try_into().unwrap();
        std::fs::write(
            chunks.path(&h),
            zstd::bulk::compress(&[7u8; CHUNK], 3).unwrap(),
        )
        .unwrap();
        assert!(chunks.rehydrate(&index, len, &dst).is_err());
    }
}
