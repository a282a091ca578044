//! Compaction: converting a snapshot to the compact form for long-lived standby
//! ([`LocalStore::compact`]), its memory chain resolved into one image and that image and the
//! filesystem archive stored as indexes of shared, compressed chunks (see
//! [`crate::snapshot::chunks`]). Reading a compact snapshot back (rebuilding it) is the store's
//! ordinary read path; removing chunks no snapshot uses is garbage collection.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use super::{LocalStore, MANIFEST, sync_dir};
use crate::error::{Error, Result};
use crate::fsutil::{write_atomic, write_synced};
use crate::progress::{NoProgress, Progress, ProgressEvent, Unit};
use crate::snapshot::chunks;
use crate::snapshot::{FileRecord, LayerKind, MemoryRecord, SnapshotId};

/// What [`LocalStore::compact`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactReport {
    pub logical: u64,
    /// Bytes the fast form stored.
    pub fast_bytes: u64,
    /// Compressed bytes of chunks written for this snapshot (the rest were already stored).
    pub new_chunk_bytes: u64,
    pub chunks: u64,
    pub reused_chunks: u64,
}

impl LocalStore {
    /// Converts a snapshot to the compact form for long-lived standby: its memory (the whole
    /// chain it is layered on, resolved) and filesystem become indexes of zstd-compressed,
    /// content-addressed 64 KiB chunks, shared with every other snapshot that contains the same
    /// chunk; zero chunks are not stored. The fast-form files are then removed. Refused while
    /// other snapshots are layered on this one.
    pub fn compact(&self, id: &SnapshotId) -> Result<CompactReport> {
        self.compact_with_progress(id, &NoProgress)
    }

    /// [`compact`](Self::compact), reporting progress in 64 KiB chunks (`done` of `total`,
    /// memory then filesystem), and a final event when done.
    pub fn compact_with_progress(
        &self,
        id: &SnapshotId,
        progress: &dyn Progress,
    ) -> Result<CompactReport> {
        let _chunk_lock = self.chunk_lock(false)?;
        let m = self.manifest(id)?;
        if m.tier == crate::spec::Tier::Kvm {
            return Err(Error::Unsupported {
                op: "compaction",
                what: "KVM snapshots yet (their disk layers stay in the fast form)".into(),
            });
        }
        let before = m.memory.file.stored + m.fs.as_ref().map_or(0, |f| f.stored);
        if m.memory.kind == LayerKind::Compact {
            progress.report(&ProgressEvent::finished("already compact", 0, Unit::Chunks));
            return Ok(CompactReport {
                logical: m.memory.size,
                fast_bytes: before,
                new_chunk_bytes: 0,
                chunks: 0,
                reused_chunks: 0,
            });
        }
        self.ensure_no_children(id)?;
        let chain = self.chain(id)?;
        let dir = self.snapshot_dir(id);
        let work = self
            .root
            .join("tmp")
            .join(format!("{}-compact-{id}", std::process::id()));
        fs::create_dir(&work).map_err(|e| Error::store("create", &work, e))?;
        let _cleanup = RemoveOnDrop(work.clone());
        let dir_ref = &dir;
        let io = |what: &'static str| move |e: io::Error| Error::store(what, dir_ref, e);
        // The logical memory of the chain, as one sparse image.
        let img_path = work.join("memory.img");
        let img = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&img_path)
            .map_err(io("create"))?;
        img.set_len(m.memory.size).map_err(io("size"))?;
        for layer in &chain {
            let lf = self.memory_layer(layer)?;
            if lf.is_full() {
                copy_nonzero(lf.file(), &img, lf.size()).map_err(io("read memory of"))?;
            } else {
                apply_delta(lf.file(), &img, lf.layer().pages()).map_err(io("read memory of"))?;
            }
        }
        let chunks = self.chunks();
        let fs_len = m.fs.as_ref().map_or(0, |r| r.len);
        let total =
            (m.memory.size.div_ceil(chunks::CHUNK as u64)) + fs_len.div_ceil(chunks::CHUNK as u64);
        let mut done = 0u64;
        // One event per 1/256 of the work at most (and the last chunk of each stage).
        let step = (total / 256).max(1);
        let mut tick = |stage: &'static str, last: u64| {
            done += 1;
            if done.is_multiple_of(step) || done == last {
                progress.report(&ProgressEvent::new(stage, done, Some(total), Unit::Chunks));
            }
        };
        let mem_chunks = m.memory.size.div_ceil(chunks::CHUNK as u64);
        let (mem_index, mst) = chunks
            .compact_with(&img, m.memory.size, &mut || {
                tick("compact memory", mem_chunks)
            })
            .map_err(io("compact memory of"))?;
        let (fs_rec, fs_len, fst) = match self.fs_archive(&m)? {
            None => (None, None, chunks::CompactStats::default()),
            Some((f, _)) => {
                let len = fs_len;
                let (idx, st) = chunks
                    .compact_with(&f, len, &mut || tick("compact filesystem", total))
                    .map_err(io("compact filesystem of"))?;
                (Some(write_index(&dir, "fs.cidx", &idx)?), Some(len), st)
            }
        };
        let mem_rec = write_index(&dir, "memory.cidx", &mem_index)?;
        let mut m2 = m.clone();
        m2.parent = None;
        m2.memory = MemoryRecord {
            size: m.memory.size,
            kind: LayerKind::Compact,
            file: mem_rec,
            depth: 0,
        };
        m2.delta_pages = Vec::new();
        m2.fs = fs_rec;
        m2.fs_compact_len = fs_len;
        // Publish the new manifest atomically, then drop the fast form.
        write_atomic(&dir.join(MANIFEST), &m2.encode()).map_err(io("commit manifest of"))?;
        sync_dir(&dir)?;
        for f in [
            &m.memory.file.name,
            m.fs.as_ref().map_or(&m.memory.file.name, |f| &f.name),
        ] {
            if f != &m2.memory.file.name && m2.fs.as_ref().is_none_or(|r| &r.name != f) {
                let _ = fs::remove_file(dir.join(f));
            }
        }
        self.verified.lock().retain(|(s, _)| s != id);
        progress.report(&ProgressEvent::finished("compacted", total, Unit::Chunks));
        Ok(CompactReport {
            logical: m.memory.size,
            fast_bytes: before,
            new_chunk_bytes: mst.new_bytes + fst.new_bytes,
            chunks: mst.chunks + fst.chunks,
            reused_chunks: mst.reused + fst.reused,
        })
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Writes a chunk index into a snapshot directory and returns its record.
fn write_index(dir: &Path, name: &str, index: &[u8]) -> Result<FileRecord> {
    let path = dir.join(name);
    write_synced(&path, index).map_err(|e| Error::store("write", &path, e))?;
    Ok(FileRecord {
        name: name.into(),
        len: index.len() as u64,
        crc32: crc32fast::hash(index),
        stored: index.len() as u64,
    })
}

/// Copies the non-zero 64 KiB blocks of the first `len` bytes of `src` into `dst`.
fn copy_nonzero(src: &File, dst: &File, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; chunks::CHUNK];
    let mut at = 0u64;
    while at < len {
        let n = ((len - at) as usize).min(buf.len());
        src.read_exact_at(&mut buf[..n], at)?;
        if buf[..n].iter().any(|&b| b != 0) {
            dst.write_all_at(&buf[..n], at)?;
        }
        at += n as u64;
    }
    Ok(())
}

/// Applies a packed delta layer onto a full image file.
fn apply_delta(delta: &File, dst: &File, pages: &[u32]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let page = crate::snapshot::format::PAGE;
    let mut buf = Vec::new();
    let mut off = 0u64;
    for run in crate::memimage::file::runs(pages) {
        let len = run.count as usize * page;
        buf.resize(len, 0);
        delta.read_exact_at(&mut buf, off)?;
        dst.write_all_at(&buf, run.first as u64 * page as u64)?;
        off += len as u64;
    }
    Ok(())
}
