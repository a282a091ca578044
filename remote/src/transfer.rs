//! Moving snapshots between the local store and the bucket: [`Shared::push_chain`] (chunks,
//! then snapshot objects, base first) and [`Shared::pull_chain`] (snapshot objects, then the
//! missing chunks, in parallel, into a snapshot committed in the local store).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use bytes::Bytes;
use dormant_core::snapshot::SnapshotId;
use dormant_core::snapshot::chunks::{CHUNK, HASH_LEN, ZERO, hex};
use dormant_core::{Error, Result, SnapshotError};
use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::object::{self, ObjectFile, SnapshotObject};
use crate::{Shared, remote_err};

/// What a push did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PushReport {
    /// Snapshot objects written (the snapshot and those of its chain not yet in the bucket).
    pub snapshots: u64,
    /// Non-zero chunks of the files pushed.
    pub chunks: u64,
    /// Of those, chunks the bucket already had (deduplicated).
    pub reused_chunks: u64,
    /// Logical bytes of the files pushed (holes and zero chunks included).
    pub logical_bytes: u64,
    /// Compressed bytes written to the bucket (chunks and snapshot objects).
    pub uploaded_bytes: u64,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// What a pull did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PullReport {
    /// Snapshot objects fetched (0: the cache had the snapshot).
    pub snapshots: u64,
    /// Chunks fetched (each distinct chunk of a file once).
    pub chunks: u64,
    /// Compressed bytes downloaded (chunks and snapshot objects).
    pub downloaded_bytes: u64,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// Longest chain of snapshot objects followed (as the local store's chains).
pub(crate) const MAX_CHAIN: usize = 4096;
const ZSTD_LEVEL: i32 = 3;
/// Largest chunk object read: zstd's bound for 64 KiB of input, with room to spare.
const MAX_COMPRESSED_CHUNK: u64 = CHUNK as u64 + 4096;

/// The 64 KiB chunks of `f` (of `len` bytes) that hold data, by index: the file's data extents
/// (core's `data_extents`), so that the holes of a sparse image are not read.
fn data_chunks(f: &File, len: u64) -> std::io::Result<Vec<bool>> {
    let n = len.div_ceil(CHUNK as u64) as usize;
    let mut has = vec![false; n];
    for (start, ext_len) in dormant_core::memimage::data_extents(f, len)? {
        // Chunks are whole pages: an extent rounded to pages covers the same chunks.
        let first = (start / CHUNK as u64) as usize;
        let last = ((start + ext_len).saturating_sub(1) / CHUNK as u64) as usize;
        for h in &mut has[first..=last.min(n - 1)] {
            *h = true;
        }
    }
    Ok(has)
}

impl Shared {
    pub(crate) fn object_key(&self, id: &SnapshotId) -> object_store::path::Path {
        self.key(&format!("snapshots/{id}"))
    }

    pub(crate) fn chunk_key(&self, hash: &[u8; HASH_LEN]) -> object_store::path::Path {
        self.key(&format!("chunks/{}", hex(hash)))
    }

    /// Whether the bucket has snapshot object `id`.
    fn has_object(&self, id: &SnapshotId) -> Result<bool> {
        if self.pushed.lock().contains(id) {
            return Ok(true);
        }
        let key = self.object_key(id);
        match self.rt.block_on(self.os.head(&key)) {
            Ok(_) => {
                self.pushed.lock().insert(id.clone());
                Ok(true)
            }
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(remote_err("look up", key.to_string(), e)),
        }
    }

    pub(crate) fn push_chain(&self, leaf: &SnapshotId) -> Result<crate::PushReport> {
        let t0 = Instant::now();
        let chain = self.cache.chain(leaf)?;
        let mut report = PushReport::default();
        // Base first: a snapshot object is written only once everything below it is in.
        for m in &chain {
            if self.has_object(&m.id)? {
                continue;
            }
            self.push_one(&m.id, &mut report)?;
        }
        report.seconds = t0.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Uploads one snapshot's chunks, then its object.
    fn push_one(&self, id: &SnapshotId, report: &mut PushReport) -> Result<()> {
        let dir = self.cache.snapshot_dir(id);
        let io = |what: &'static str, path: &std::path::Path| {
            let path = path.to_owned();
            move |e: std::io::Error| Error::store(what, path, e)
        };
        let manifest_path = dir.join(object::MANIFEST_FILE);
        let manifest_bytes = std::fs::read(&manifest_path).map_err(io("read", &manifest_path))?;
        let manifest = self.cache.manifest(id)?;
        if manifest.memory.kind == dormant_core::snapshot::LayerKind::Compact
            || manifest.fs_compact_len.is_some()
        {
            // Its files are indexes of the local store's own chunks.
            return Err(Error::Unsupported {
                op: "uploading a compacted snapshot",
                what: format!("{id} (resume it and checkpoint again, then upload that)"),
            });
        }
        let mut names = Vec::new();
        for ent in std::fs::read_dir(&dir).map_err(io("list", &dir))? {
            let ent = ent.map_err(io("list", &dir))?;
            let name = ent.file_name().to_string_lossy().into_owned();
            if ent.file_type().map_err(io("list", &dir))?.is_file()
                && object::valid_file_name(&name)
            {
                names.push(name);
            }
        }
        names.sort();
        if names.len() > object::MAX_FILES {
            return Err(Error::snapshot(
                id,
                SnapshotError::Malformed(format!("{} files in its directory", names.len())),
            ));
        }
        let mut files = Vec::with_capacity(names.len());
        for name in names {
            let path = dir.join(&name);
            let f = File::open(&path).map_err(io("open", &path))?;
            let len = f.metadata().map_err(io("stat", &path))?.len();
            let index = self.push_file(&f, len, &path, report)?;
            report.logical_bytes += len;
            files.push((ObjectFile { name, len }, index));
        }
        let obj = SnapshotObject {
            manifest,
            manifest_bytes,
            files,
        };
        let bytes = obj.encode();
        report.uploaded_bytes += bytes.len() as u64;
        let key = self.object_key(id);
        let opts = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match self
            .rt
            .block_on(self.os.put_opts(&key, PutPayload::from(bytes), opts))
        {
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => {}
            Err(e) => return Err(remote_err("upload", key.to_string(), e)),
        }
        self.pushed.lock().insert(id.clone());
        report.snapshots += 1;
        Ok(())
    }

    /// Uploads the chunks of one file not yet in the bucket; returns its index.
    fn push_file(
        &self,
        f: &File,
        len: u64,
        path: &std::path::Path,
        report: &mut PushReport,
    ) -> Result<Vec<u8>> {
        let has = data_chunks(f, len).map_err(|e| Error::store("read", path, e))?;
        let mut index = vec![0u8; has.len() * HASH_LEN];
        // First the index: every data chunk read and hashed, in order. A content repeated in
        // the file (a page pattern, say) is uploaded once below, not raced against itself.
        let mut distinct: HashMap<[u8; HASH_LEN], usize> = HashMap::new();
        let mut buf = vec![0u8; CHUNK];
        for (i, _) in has.iter().enumerate().filter(|(_, d)| **d) {
            let at = (i * CHUNK) as u64;
            let take = ((len - at) as usize).min(CHUNK);
            f.read_exact_at(&mut buf[..take], at)
                .map_err(|e| Error::store("read", path, e))?;
            if buf[..take].iter().all(|&b| b == 0) {
                continue;
            }
            let hash: [u8; HASH_LEN] = *blake3::hash(&buf[..take]).as_bytes();
            index[i * HASH_LEN..(i + 1) * HASH_LEN].copy_from_slice(&hash);
            report.chunks += 1;
            match distinct.entry(hash) {
                std::collections::hash_map::Entry::Occupied(_) => report.reused_chunks += 1,
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(i);
                }
            }
        }
        let fresh = self.opts.freshen_after;
        let distinct_count = distinct.len();
        let work: Vec<([u8; HASH_LEN], usize)> = {
            let present = self.present.lock();
            distinct
                .into_iter()
                .filter(|(h, _)| present.get(h).is_none_or(|t| t.elapsed() >= fresh / 2))
                .collect()
        };
        // Known to be in the bucket already.
        report.reused_chunks += (distinct_count - work.len()) as u64;
        // Then the chunks the bucket may lack, in parallel.
        let results: Vec<(bool, u64)> = self.rt.block_on(
            futures::stream::iter(work)
                .map(|(hash, i)| async move {
                    let key = self.chunk_key(&hash);
                    // In the bucket and written recently enough: reused. Written long ago:
                    // written again (refreshing its age, see `gc`).
                    let mode = match self.os.head(&key).await {
                        Ok(meta) => {
                            let age_ms =
                                crate::now_ms() as i64 - meta.last_modified.timestamp_millis();
                            if age_ms < fresh.as_millis() as i64 {
                                self.present.lock().insert(hash, Instant::now());
                                return Ok((true, 0));
                            }
                            PutMode::Overwrite
                        }
                        Err(object_store::Error::NotFound { .. }) => PutMode::Create,
                        Err(e) => return Err(remote_err("look up", key.to_string(), e)),
                    };
                    let at = (i * CHUNK) as u64;
                    let take = ((len - at) as usize).min(CHUNK);
                    let mut data = vec![0u8; take];
                    f.read_exact_at(&mut data, at)
                        .map_err(|e| Error::store("read", path, e))?;
                    let compressed = zstd::bulk::compress(&data, ZSTD_LEVEL)
                        .map_err(|e| Error::store("compress", path, e))?;
                    let written = compressed.len() as u64;
                    let opts = PutOptions {
                        mode,
                        ..PutOptions::default()
                    };
                    let reused = match self
                        .os
                        .put_opts(&key, PutPayload::from(Bytes::from(compressed)), opts)
                        .await
                    {
                        Ok(_) => false,
                        Err(object_store::Error::AlreadyExists { .. }) => true,
                        Err(e) => return Err(remote_err("upload", key.to_string(), e)),
                    };
                    self.present.lock().insert(hash, Instant::now());
                    Ok::<_, Error>((reused, if reused { 0 } else { written }))
                })
                .buffer_unordered(self.opts.parallelism.max(1))
                .try_collect(),
        )?;
        for (reused, written) in results {
            if reused {
                report.reused_chunks += 1;
            }
            report.uploaded_bytes += written;
        }
        Ok(index)
    }

    /// Reads and checks snapshot object `id`.
    pub(crate) fn get_object(&self, id: &SnapshotId) -> Result<SnapshotObject> {
        let key = self.object_key(id);
        let bytes = match self
            .rt
            .block_on(self.get_capped(&key, object::MAX_OBJECT_LEN))
        {
            Ok(Ok((_, b))) => b,
            Ok(Err(size)) => {
                return Err(Error::snapshot(
                    id,
                    SnapshotError::TooLarge {
                        what: "snapshot object".into(),
                        size,
                        limit: object::MAX_OBJECT_LEN,
                    },
                ));
            }
            Err(object_store::Error::NotFound { .. }) => {
                return Err(Error::SnapshotNotFound(id.clone()));
            }
            Err(e) => return Err(remote_err("download", key.to_string(), e)),
        };
        SnapshotObject::decode(&bytes, id).map_err(|e| {
            Error::snapshot(id, SnapshotError::Malformed(format!("in the bucket: {e}")))
        })
    }

    pub(crate) fn pull_chain(&self, leaf: &SnapshotId) -> Result<crate::PullReport> {
        let t0 = Instant::now();
        let mut report = PullReport::default();
        let mut objects: Vec<SnapshotObject> = Vec::new();
        let mut id = leaf.clone();
        while !self.cache.contains(&id) {
            if objects.len() >= MAX_CHAIN {
                return Err(Error::snapshot(
                    leaf,
                    SnapshotError::Malformed("inconsistent layer chain in the bucket".into()),
                ));
            }
            let obj = self.get_object(&id)?;
            report.downloaded_bytes += obj.manifest_bytes.len() as u64
                + obj.files.iter().map(|(_, i)| i.len() as u64).sum::<u64>();
            // Depth strictly decreases towards the base (as the local store's chains): no
            // cycle, at most depth + 1 objects.
            if let Some(last) = objects.last()
                && obj.manifest.memory.depth >= last.manifest.memory.depth
            {
                return Err(Error::snapshot(
                    leaf,
                    SnapshotError::Malformed("inconsistent layer chain in the bucket".into()),
                ));
            }
            let next = match (obj.manifest.memory.depth, &obj.manifest.parent) {
                (0, _) => None,
                (_, Some(p)) => Some(p.clone()),
                (_, None) => {
                    return Err(Error::snapshot(
                        &id,
                        SnapshotError::Malformed("delta layer without a parent".into()),
                    ));
                }
            };
            objects.push(obj);
            match next {
                Some(p) => id = p,
                None => break,
            }
        }
        for obj in objects.iter().rev() {
            if self.import_once(obj, &mut report)? {
                report.snapshots += 1;
            }
        }
        report.seconds = t0.elapsed().as_secs_f64();
        Ok(report)
    }

    /// [`import`](Self::import) unless the cache has the snapshot, one thread at a time per
    /// snapshot: two pulls of chains that share snapshots (sandboxes forked from one parent)
    /// would otherwise both write it (into the same directory of the store's `tmp/`). `false`
    /// when another pull brought it.
    fn import_once(&self, obj: &SnapshotObject, report: &mut PullReport) -> Result<bool> {
        let id = obj.id();
        {
            let mut importing = self.importing.lock();
            while importing.contains(id) {
                self.imported.wait(&mut importing);
            }
            if self.cache.contains(id) {
                return Ok(false);
            }
            importing.insert(id.clone());
        }
        let r = match self.import(obj, report) {
            // Another process sharing this cache committed it first: as good.
            Err(_) if self.cache.contains(id) => Ok(()),
            r => r,
        };
        self.importing.lock().remove(id);
        self.imported.notify_all();
        r.map(|()| true)
    }

    /// Rebuilds one snapshot's directory from its object and chunks, committed in the cache.
    fn import(&self, obj: &SnapshotObject, report: &mut PullReport) -> Result<()> {
        let id = obj.id();
        let mut w = self.cache.begin(id)?;
        let mut crcs = Vec::with_capacity(obj.files.len());
        let zero_chunk = {
            let mut h = crc32fast::Hasher::new();
            h.update(&[0u8; CHUNK]);
            h
        };
        for (file, index) in &obj.files {
            let f = w.create(&file.name)?;
            let path = w.path(&file.name);
            f.set_len(file.len)
                .map_err(|e| Error::store("size", &path, e))?;
            // Each distinct chunk fetched once, written wherever the file holds it.
            let mut groups: HashMap<[u8; HASH_LEN], Vec<usize>> = HashMap::new();
            for (i, h) in index.chunks_exact(HASH_LEN).enumerate() {
                if h != ZERO {
                    let h = <[u8; HASH_LEN]>::try_from(h).expect("HASH_LEN bytes");
                    groups.entry(h).or_default().push(i);
                }
            }
            let (f, path) = (&f, &path);
            let got: Vec<(Vec<usize>, u64, crc32fast::Hasher)> = self.rt.block_on(
                futures::stream::iter(groups)
                    .map(|(hash, at_chunks)| async move {
                        let key = self.chunk_key(&hash);
                        let take_at =
                            |i: usize| ((file.len - (i * CHUNK) as u64) as usize).min(CHUNK);
                        let take = take_at(at_chunks[0]);
                        let malformed = |what: String| {
                            Error::snapshot(
                                id,
                                SnapshotError::Malformed(format!(
                                    "chunk {} of {} {what}",
                                    hex(&hash),
                                    file.name
                                )),
                            )
                        };
                        // A compressed 64 KiB chunk is never larger than this: a bigger
                        // object is not read (a hostile bucket).
                        let bytes = match self.get_capped(&key, MAX_COMPRESSED_CHUNK).await {
                            Ok(Ok((_, b))) => b,
                            Ok(Err(size)) => return Err(malformed(format!("is {size} bytes"))),
                            Err(object_store::Error::NotFound { .. }) => {
                                return Err(malformed("is missing from the bucket".to_owned()));
                            }
                            Err(e) => return Err(remote_err("download", key.to_string(), e)),
                        };
                        let mut buf = vec![0u8; take];
                        let ok = zstd::bulk::decompress_to_buffer(&bytes, &mut buf)
                            .is_ok_and(|n| n == take)
                            && blake3::hash(&buf).as_bytes() == &hash;
                        if !ok {
                            return Err(malformed("is corrupt".to_owned()));
                        }
                        for &i in &at_chunks {
                            // One content, one length: a shorter tail chunk has another hash.
                            if take_at(i) != take {
                                return Err(malformed("at two lengths".to_owned()));
                            }
                            f.write_all_at(&buf, (i * CHUNK) as u64)
                                .map_err(|e| Error::store("write", path, e))?;
                        }
                        let mut crc = crc32fast::Hasher::new();
                        crc.update(&buf);
                        Ok::<_, Error>((at_chunks, bytes.len() as u64, crc))
                    })
                    .buffer_unordered(self.opts.parallelism.max(1))
                    .try_collect(),
            )?;
            report.chunks += got.len() as u64;
            report.downloaded_bytes += got.iter().map(|(_, n, _)| n).sum::<u64>();
            // The file's CRC from its chunks' (zero chunks included), in order: what the
            // first open compares with the manifest instead of reading the file again.
            let mut by_index: Vec<Option<crc32fast::Hasher>> = vec![None; file.chunk_count()];
            for (at_chunks, _, crc) in got {
                for i in at_chunks {
                    by_index[i] = Some(crc.clone());
                }
            }
            let mut whole = crc32fast::Hasher::new();
            for (i, crc) in by_index.into_iter().enumerate() {
                match crc {
                    Some(c) => whole.combine(&c),
                    None => {
                        let take = ((file.len - (i * CHUNK) as u64) as usize).min(CHUNK);
                        if take == CHUNK {
                            whole.combine(&zero_chunk);
                        } else {
                            let mut z = crc32fast::Hasher::new();
                            z.update(&vec![0u8; take]);
                            whole.combine(&z);
                        }
                    }
                }
            }
            crcs.push((file.name.as_str(), whole.finalize()));
        }
        w.commit_imported(&obj.manifest, &crcs)
    }

    pub(crate) fn list_snapshot_ids(&self) -> Result<Vec<SnapshotId>> {
        let prefix = self.key("snapshots");
        let metas: Vec<object_store::ObjectMeta> = self
            .rt
            .block_on(self.os.list(Some(&prefix)).try_collect())
            .map_err(|e| remote_err("list", prefix.to_string(), e))?;
        let mut ids: Vec<SnapshotId> = metas
            .iter()
            .filter_map(|m| {
                m.location
                    .filename()
                    .and_then(|n| SnapshotId::parse(n).ok())
            })
            .collect();
        ids.sort();
        Ok(ids)
    }

    pub(crate) fn list_all(&self) -> Result<Vec<(String, u64)>> {
        let prefix = self.prefix.clone();
        let metas: Vec<object_store::ObjectMeta> = self
            .rt
            .block_on(self.os.list(Some(&prefix)).try_collect())
            .map_err(|e| remote_err("list", prefix.to_string(), e))?;
        let skip = prefix.parts().count();
        Ok(metas
            .into_iter()
            .map(|m| {
                let rel: Vec<String> = m
                    .location
                    .parts()
                    .skip(skip)
                    .map(|p| p.as_ref().to_owned())
                    .collect();
                (rel.join("/"), m.size)
            })
            .collect())
    }
}
