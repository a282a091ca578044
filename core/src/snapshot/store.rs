//! The local-directory snapshot store, dormant's embedded default.
//!
//! ```text
//! <root>/snapshots/<id>/manifest.dsnp   committed snapshots: the only place `list` looks
//! <root>/tmp/<pid>-<id>/                snapshots being written (removed if their writer died)
//! <root>/trash/                         snapshots being deleted
//! <root>/live/<pid>-<nonce>/            working directories of live sandboxes
//! ```
//!
//! A snapshot is written whole into `tmp/`, its files are flushed (with
//! [`Durability::Sync`], the default: `fsync` of every file and of both directories), then the
//! directory is renamed into `snapshots/`. The rename is the commit: a crash at any point leaves
//! either the complete snapshot or nothing under `snapshots/`.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use crate::error::{Error, Result, SnapshotError};
use crate::fsutil::{FileLock, write_atomic, write_synced};
use crate::snapshot::chunks::{self, Chunks};
use crate::snapshot::layer::Layer;
pub use crate::snapshot::layer::LayerFile;
use crate::snapshot::{FileRecord, LayerKind, Manifest, MemoryRecord, SnapshotId};

/// How hard a commit pushes data to stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `fsync` files and directories before and after the commit rename: a committed snapshot
    /// survives a crash of the host process and a power loss.
    Sync,
    /// Rely on the page cache: a committed snapshot survives a crash of the host process, but
    /// not a power loss or kernel crash. Faster checkpoints.
    ProcessCrash,
}

/// A summary of one snapshot, as `list` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotInfo {
    pub id: SnapshotId,
    pub parent: Option<SnapshotId>,
    pub sandbox_id: String,
    pub created_unix_ms: u64,
    /// Logical memory size.
    pub memory_size: u64,
    /// Bytes stored by this snapshot's own files.
    pub stored_bytes: u64,
}

/// Names of the layer files the store and the WASI tier write; GC removes those a manifest no
/// longer references, and nothing else.
const LAYER_FILES: [&str; 5] = [
    "memory.img",
    "memory.delta",
    "memory.cidx",
    "fs.tar",
    "fs.cidx",
];

/// Snapshots in a directory on local disk.
#[derive(Debug)]
pub struct LocalStore {
    root: PathBuf,
    durability: Durability,
    /// Data files whose CRC was checked by this process (a resume after the first is free).
    verified: Mutex<HashSet<(SnapshotId, String)>>,
    verify_data: bool,
}

const MANIFEST: &str = "manifest.dsnp";
/// Longest parent chain followed before the store reports a malformed snapshot.
const MAX_CHAIN: usize = 4096;

fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Removes `<pid>-…` entries of dead processes under `dir`.
fn reap_dead(dir: &Path) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for ent in rd.flatten() {
        let name = ent.file_name();
        let name = name.to_string_lossy();
        let pid = name.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_none_or(|p| !pid_alive(p)) {
            let _ = fs::remove_dir_all(ent.path());
        }
    }
}

fn sync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::store("sync directory", path, e))
}

impl LocalStore {
    /// Environment variable naming the default store directory.
    pub const ENV: &'static str = "DORMANT_STORE";

    /// `$DORMANT_STORE`, else `<user data dir>/dormant/store` (`~/.local/share/dormant/store`).
    pub fn default_root() -> PathBuf {
        if let Some(p) = std::env::var_os(Self::ENV).filter(|p| !p.is_empty()) {
            return PathBuf::from(p);
        }
        dirs::data_dir()
            .unwrap_or_else(|| std::env::temp_dir().join("dormant-data"))
            .join("dormant")
            .join("store")
    }

    /// Opens the store at [`LocalStore::default_root`].
    pub fn open_default() -> Result<LocalStore> {
        Self::open(Self::default_root())
    }

    /// Opens (creating if needed) a store at `root`, removing what dead writers left behind.
    pub fn open(root: impl Into<PathBuf>) -> Result<LocalStore> {
        let root = root.into();
        for sub in ["snapshots", "tmp", "trash", "live", "chunks", "rehydrated"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(|e| Error::store("create", &p, e))?;
        }
        reap_dead(&root.join("tmp"));
        reap_dead(&root.join("live"));
        if let Ok(rd) = fs::read_dir(root.join("trash")) {
            for ent in rd.flatten() {
                let _ = fs::remove_dir_all(ent.path());
            }
        }
        Ok(LocalStore {
            root,
            durability: Durability::Sync,
            verified: Mutex::new(HashSet::new()),
            verify_data: true,
        })
    }

    /// Sets how commits are flushed (default [`Durability::Sync`]).
    pub fn with_durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Whether data files (memory images, filesystem archives) are checked against their CRC
    /// the first time this process opens them (default: yes). Turning it off saves reading the
    /// whole memory image on the first resume in a process (about 3 ms per 16 MiB here); lengths
    /// and the manifest (with its checksums) are still checked on every open.
    pub fn with_data_verification(mut self, verify: bool) -> Self {
        self.verify_data = verify;
        self
    }

    pub fn durability(&self) -> Durability {
        self.durability
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of a committed snapshot.
    pub fn snapshot_dir(&self, id: &SnapshotId) -> PathBuf {
        self.root.join("snapshots").join(id.as_str())
    }

    /// Starts writing a snapshot. Nothing is visible until [`SnapshotWriter::commit`].
    pub fn begin(&self, id: &SnapshotId) -> Result<SnapshotWriter<'_>> {
        let dir = self
            .root
            .join("tmp")
            .join(format!("{}-{}", std::process::id(), id));
        fs::create_dir(&dir).map_err(|e| Error::store("create", &dir, e))?;
        Ok(SnapshotWriter {
            store: self,
            id: id.clone(),
            dir,
            files: Vec::new(),
            committed: false,
        })
    }

    /// Whether a committed snapshot with this id exists.
    pub fn contains(&self, id: &SnapshotId) -> bool {
        self.snapshot_dir(id).join(MANIFEST).is_file()
    }

    /// Reads and checks a snapshot's manifest.
    pub fn manifest(&self, id: &SnapshotId) -> Result<Manifest> {
        let path = self.snapshot_dir(id).join(MANIFEST);
        let limit = crate::snapshot::MAX_MANIFEST_LEN;
        let bytes = match read_capped(&path, limit) {
            Ok(Ok(b)) => b,
            Ok(Err(size)) => {
                return Err(Error::snapshot(
                    id,
                    SnapshotError::TooLarge {
                        what: "manifest".into(),
                        size,
                        limit,
                    },
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::SnapshotNotFound(id.clone()));
            }
            Err(e) => {
                return Err(Error::snapshot(
                    id,
                    SnapshotError::Io {
                        file: path,
                        source: e,
                    },
                ));
            }
        };
        let m = Manifest::decode(&bytes).map_err(|e| Error::snapshot(id, e))?;
        if &m.id != id {
            return Err(Error::snapshot(
                id,
                SnapshotError::Malformed(format!("manifest names snapshot {}", m.id)),
            ));
        }
        Ok(m)
    }

    /// The manifests from the nearest full memory image up to `id` (root first).
    pub fn chain(&self, id: &SnapshotId) -> Result<Vec<Manifest>> {
        let mut out = vec![self.manifest(id)?];
        loop {
            let last = out.last().expect("non-empty");
            if last.memory.depth == 0 {
                break;
            }
            let Some(parent) = last.parent.clone() else {
                return Err(Error::snapshot(
                    id,
                    SnapshotError::Malformed("delta layer without a parent".into()),
                ));
            };
            let pm = match self.manifest(&parent) {
                Ok(m) => m,
                Err(Error::SnapshotNotFound(p)) => {
                    return Err(Error::snapshot(
                        id,
                        SnapshotError::Malformed(format!("parent snapshot {p} is missing")),
                    ));
                }
                Err(e) => return Err(e),
            };
            // Depth strictly decreases towards the base (a compacted parent becomes depth 0).
            if pm.memory.depth >= last.memory.depth || out.len() > MAX_CHAIN {
                return Err(Error::snapshot(
                    id,
                    SnapshotError::Malformed("inconsistent layer chain".into()),
                ));
            }
            out.push(pm);
        }
        out.reverse();
        Ok(out)
    }

    /// Opens a data file of a snapshot, checking its length always and its CRC once per
    /// process when `verify` is set.
    pub fn open_file(&self, id: &SnapshotId, rec: &FileRecord, verify: bool) -> Result<File> {
        let path = self.snapshot_dir(id).join(&rec.name);
        let bad = |source: SnapshotError| Error::snapshot(id, source);
        if rec.name.contains('/') || rec.name.starts_with('.') {
            return Err(bad(SnapshotError::Malformed(format!(
                "bad file name {:?}",
                rec.name
            ))));
        }
        let f = File::open(&path).map_err(|e| {
            bad(SnapshotError::Io {
                file: path.clone(),
                source: e,
            })
        })?;
        let len = f
            .metadata()
            .map_err(|e| {
                bad(SnapshotError::Io {
                    file: path.clone(),
                    source: e,
                })
            })?
            .len();
        if len != rec.len {
            return Err(bad(SnapshotError::Truncated {
                what: format!("{} is {len} bytes, expected {}", rec.name, rec.len),
            }));
        }
        if verify && self.verify_data {
            let key = (id.clone(), rec.name.clone());
            if !self.verified.lock().contains(&key) {
                let ok = crate::memimage::verify_file(&f, rec.len, rec.crc32).map_err(|e| {
                    bad(SnapshotError::Io {
                        file: path.clone(),
                        source: e,
                    })
                })?;
                if !ok {
                    return Err(bad(SnapshotError::Checksum {
                        what: rec.name.clone(),
                    }));
                }
                self.verified.lock().insert(key);
            }
        }
        Ok(f)
    }

    /// Every committed snapshot, oldest first. A snapshot whose manifest cannot be read is left
    /// out (and logged); it can still be deleted by id.
    pub fn list(&self) -> Result<Vec<SnapshotInfo>> {
        let dir = self.root.join("snapshots");
        let rd = fs::read_dir(&dir).map_err(|e| Error::store("list", &dir, e))?;
        let mut out = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| Error::store("list", &dir, e))?;
            let Ok(id) = SnapshotId::parse(&ent.file_name().to_string_lossy()) else {
                continue;
            };
            match self.manifest(&id) {
                Ok(m) => out.push(SnapshotInfo {
                    stored_bytes: m.memory.file.stored + m.fs.as_ref().map_or(0, |f| f.stored),
                    id: m.id,
                    parent: m.parent,
                    sandbox_id: m.sandbox_id,
                    created_unix_ms: m.created_unix_ms,
                    memory_size: m.memory.size,
                }),
                Err(e) => {
                    tracing::warn!(snapshot = %id, error = %e, "unreadable snapshot left out of the listing")
                }
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Refuses (with [`Error::SnapshotInUse`]) when other snapshots are layered on `id`.
    fn ensure_no_children(&self, id: &SnapshotId) -> Result<()> {
        let children = self
            .list()?
            .iter()
            .filter(|s| s.parent.as_ref() == Some(id))
            .count();
        if children > 0 {
            return Err(Error::SnapshotInUse {
                id: id.clone(),
                children,
            });
        }
        Ok(())
    }

    /// Deletes a snapshot. Refused while incremental snapshots are layered on it.
    pub fn delete(&self, id: &SnapshotId) -> Result<()> {
        let dir = self.snapshot_dir(id);
        let _lock = self.store_lock()?;
        if !dir.exists() {
            return Err(Error::SnapshotNotFound(id.clone()));
        }
        self.ensure_no_children(id)?;
        let trash = self
            .root
            .join("trash")
            .join(format!("{}-{}", id, rand::random::<u64>()));
        fs::rename(&dir, &trash).map_err(|e| Error::store("delete", &dir, e))?;
        self.verified.lock().retain(|(s, _)| s != id);
        for ext in ["img", "tar"] {
            let _ = fs::remove_file(self.rehydrated_path(id, ext));
        }
        fs::remove_dir_all(&trash).map_err(|e| Error::store("delete", &trash, e))
    }

    /// Held while a commit checks its parent or a delete checks for children, so that a
    /// snapshot is never committed on top of a parent being deleted.
    fn store_lock(&self) -> Result<FileLock> {
        let path = self.root.join("lock");
        FileLock::acquire(&path, true).map_err(|e| Error::store("lock", &path, e))
    }

    /// Serialises chunk writers (shared) against garbage collection (exclusive).
    fn chunk_lock(&self, exclusive: bool) -> Result<FileLock> {
        let path = self.root.join("chunks.lock");
        FileLock::acquire(&path, exclusive).map_err(|e| Error::store("lock", &path, e))
    }

    fn chunks(&self) -> Chunks {
        Chunks::new(self.root.join("chunks"))
    }

    fn rehydrated_path(&self, id: &SnapshotId, ext: &str) -> PathBuf {
        self.root.join("rehydrated").join(format!("{id}.{ext}"))
    }

    /// Rebuilds (once; then cached under `rehydrated/`) the logical content of a compact file.
    /// Returns the file and whether it had to be built now.
    fn rehydrate(
        &self,
        id: &SnapshotId,
        index: &FileRecord,
        len: u64,
        ext: &str,
    ) -> Result<(File, bool)> {
        let path = self.rehydrated_path(id, ext);
        if let Ok(f) = File::open(&path)
            && f.metadata().is_ok_and(|m| m.len() == len)
        {
            return Ok((f, false));
        }
        let idx = self.read_index(id, index)?;
        let tmp = path.with_extension(format!(
            "{ext}.{}-{:x}.tmp",
            std::process::id(),
            rand::random::<u32>()
        ));
        let r = (|| {
            let f = File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            self.chunks().rehydrate(&idx, len, &f)?;
            fs::rename(&tmp, &path)?;
            Ok::<File, io::Error>(f)
        })();
        match r {
            Ok(f) => Ok((f, true)),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(Error::snapshot(
                    id,
                    SnapshotError::Io {
                        file: path,
                        source: e,
                    },
                ))
            }
        }
    }

    fn read_index(&self, id: &SnapshotId, rec: &FileRecord) -> Result<Vec<u8>> {
        use std::io::Read;
        let mut f = self.open_file(id, rec, true)?;
        let mut idx = Vec::with_capacity(rec.len as usize);
        f.read_to_end(&mut idx).map_err(|e| {
            Error::snapshot(
                id,
                SnapshotError::Io {
                    file: self.snapshot_dir(id).join(&rec.name),
                    source: e,
                },
            )
        })?;
        Ok(idx)
    }

    /// The file to map for a snapshot's memory layer, with the layer checked: its own file or,
    /// for a compact layer, a full image rebuilt from its chunks (`cold` tells whether that
    /// happened now).
    pub fn memory_layer(&self, m: &Manifest) -> Result<LayerFile> {
        let bad = |e| Error::snapshot(&m.id, e);
        let layer = m.memory_layer().map_err(bad)?;
        match layer.kind() {
            LayerKind::Compact => {
                let (file, cold) = self.rehydrate(&m.id, &m.memory.file, m.memory.size, "img")?;
                LayerFile::rehydrated(layer, file, cold).map_err(bad)
            }
            _ => self.open_layer(&m.id, layer),
        }
    }

    /// Opens the data file of a full or delta layer that a tier keeps in snapshot `id` (a KVM
    /// disk), checking its length always and its CRC once per process.
    pub fn open_layer(&self, id: &SnapshotId, layer: Layer) -> Result<LayerFile> {
        let f = self.open_file(id, layer.file(), true)?;
        LayerFile::new(layer, f).map_err(|e| Error::snapshot(id, e))
    }

    /// The snapshot's filesystem archive (rebuilt from chunks for a compact snapshot).
    pub fn fs_archive(&self, m: &Manifest) -> Result<Option<(File, bool)>> {
        match (&m.fs, m.fs_compact_len) {
            (None, _) => Ok(None),
            (Some(rec), None) => Ok(Some((self.open_file(&m.id, rec, true)?, false))),
            (Some(rec), Some(len)) => self.rehydrate(&m.id, rec, len, "tar").map(Some),
        }
    }

    /// Converts a snapshot to the compact form for long-lived standby: its memory (the whole
    /// chain it is layered on, resolved) and filesystem become indexes of zstd-compressed,
    /// content-addressed 64 KiB chunks, shared with every other snapshot that contains the same
    /// chunk; zero chunks are not stored. The fast-form files are then removed. Refused while
    /// other snapshots are layered on this one.
    pub fn compact(&self, id: &SnapshotId) -> Result<CompactReport> {
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
        let (mem_index, mst) = chunks
            .compact(&img, m.memory.size)
            .map_err(io("compact memory of"))?;
        let (fs_rec, fs_len, fst) = match self.fs_archive(&m)? {
            None => (None, None, chunks::CompactStats::default()),
            Some((f, _)) => {
                let len = m.fs.as_ref().map_or(0, |r| r.len);
                let (idx, st) = chunks
                    .compact(&f, len)
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
        Ok(CompactReport {
            logical: m.memory.size,
            fast_bytes: before,
            new_chunk_bytes: mst.new_bytes + fst.new_bytes,
            chunks: mst.chunks + fst.chunks,
            reused_chunks: mst.reused + fst.reused,
        })
    }

    /// Removes data no snapshot references: chunks of deleted compact snapshots, rebuilt images
    /// of deleted snapshots, and files a snapshot no longer uses. Safe to run while other
    /// threads or processes checkpoint and compact.
    pub fn gc(&self) -> Result<GcReport> {
        let _chunk_lock = self.chunk_lock(true)?;
        let mut referenced = std::collections::HashSet::new();
        let mut live_ids = std::collections::HashSet::new();
        let dir = self.root.join("snapshots");
        let rd = fs::read_dir(&dir).map_err(|e| Error::store("list", &dir, e))?;
        let mut report = GcReport::default();
        for ent in rd.flatten() {
            let Ok(id) = SnapshotId::parse(&ent.file_name().to_string_lossy()) else {
                continue;
            };
            // A snapshot deleted while GC runs simply drops out; one that is unreadable for
            // another reason stops GC: nothing is removed on a guess.
            let gone = |e: Error| match e {
                Error::SnapshotNotFound(_) => None,
                _ if !self.snapshot_dir(&id).exists() => None,
                e => Some(e),
            };
            let m = match self.manifest(&id) {
                Ok(m) => m,
                Err(e) => match gone(e) {
                    None => continue,
                    Some(_) => {
                        return Err(Error::snapshot(
                            &id,
                            SnapshotError::Malformed(
                                "unreadable during GC; delete it or fix it first".into(),
                            ),
                        ));
                    }
                },
            };
            let mut refs = Vec::new();
            let mut indexes = Vec::new();
            if m.memory.kind == LayerKind::Compact {
                indexes.push(&m.memory.file);
            }
            if let (Some(f), Some(_)) = (&m.fs, m.fs_compact_len) {
                indexes.push(f);
            }
            let mut vanished = false;
            for rec in indexes {
                match self.read_index(&id, rec) {
                    Ok(idx) => refs.extend(chunks::referenced(&idx)),
                    Err(e) => match gone(e) {
                        None => vanished = true,
                        Some(e) => return Err(e),
                    },
                }
            }
            if vanished {
                continue;
            }
            referenced.extend(refs);
            live_ids.insert(id.clone());
            let mut keep: Vec<&str> = vec![MANIFEST, &m.memory.file.name];
            if let Some(f) = &m.fs {
                keep.push(&f.name);
            }
            for f in fs::read_dir(ent.path()).into_iter().flatten().flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                // Only the store's own layer files are candidates (a compacted snapshot's old
                // fast form); files a tier keeps beside them (a KVM disk) are the tier's.
                if LAYER_FILES.contains(&name.as_str()) && !keep.contains(&name.as_str()) {
                    report.bytes_freed += f.metadata().map_or(0, |m| m.len());
                    let _ = fs::remove_file(f.path());
                }
            }
        }
        for (hash, size) in self
            .chunks()
            .list()
            .map_err(|e| Error::store("list", self.root.join("chunks"), e))?
        {
            if !referenced.contains(&hash) {
                let p = self.chunks().path(&hash);
                if fs::remove_file(&p).is_ok() {
                    report.chunks_removed += 1;
                    report.bytes_freed += size;
                }
            }
        }
        for f in fs::read_dir(self.root.join("rehydrated"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = f.file_name().to_string_lossy().into_owned();
            let id = name
                .split('.')
                .next()
                .and_then(|s| SnapshotId::parse(s).ok());
            if id.is_none_or(|id| !live_ids.contains(&id)) && !name.ends_with(".tmp") {
                report.bytes_freed += f.metadata().map_or(0, |m| m.len());
                let _ = fs::remove_file(f.path());
            }
        }
        Ok(report)
    }

    /// Per snapshot: logical memory size, bytes stored for it, and how many of those bytes
    /// are shared with other snapshots (chunks that other compact snapshots also reference).
    pub fn usage(&self) -> Result<Vec<SnapshotUsage>> {
        let sizes: std::collections::HashMap<_, _> = self
            .chunks()
            .list()
            .map_err(|e| Error::store("list", self.root.join("chunks"), e))?
            .into_iter()
            .collect();
        let mut per: Vec<(
            SnapshotInfo,
            Option<std::collections::HashSet<[u8; chunks::HASH_LEN]>>,
        )> = Vec::new();
        let mut refcount: std::collections::HashMap<[u8; chunks::HASH_LEN], u32> =
            std::collections::HashMap::new();
        for info in self.list()? {
            let m = self.manifest(&info.id)?;
            if m.memory.kind != LayerKind::Compact {
                per.push((info, None));
                continue;
            }
            let mut set: std::collections::HashSet<_> =
                chunks::referenced(&self.read_index(&m.id, &m.memory.file)?).collect();
            if let (Some(f), Some(_)) = (&m.fs, m.fs_compact_len) {
                set.extend(chunks::referenced(&self.read_index(&m.id, f)?));
            }
            for h in &set {
                *refcount.entry(*h).or_default() += 1;
            }
            per.push((info, Some(set)));
        }
        Ok(per
            .into_iter()
            .map(|(info, set)| match set {
                None => SnapshotUsage {
                    id: info.id,
                    memory_size: info.memory_size,
                    stored_bytes: info.stored_bytes,
                    shared_bytes: 0,
                    compact: false,
                },
                Some(set) => {
                    let size = |h: &[u8; chunks::HASH_LEN]| sizes.get(h).copied().unwrap_or(0);
                    SnapshotUsage {
                        id: info.id,
                        memory_size: info.memory_size,
                        stored_bytes: set.iter().map(size).sum(),
                        shared_bytes: set.iter().filter(|h| refcount[*h] > 1).map(size).sum(),
                        compact: true,
                    }
                }
            })
            .collect())
    }

    /// The host directory of the named volume, created if it does not exist yet. Volumes hold
    /// files that outlive every sandbox and snapshot: mount one with
    /// [`SandboxSpec::mount`](crate::SandboxSpec::mount). Names are 1–64 characters of
    /// `[A-Za-z0-9._-]`, not starting with a dot.
    pub fn volume(&self, name: &str) -> Result<PathBuf> {
        let ok = (1..=64).contains(&name.len())
            && !name.starts_with('.')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !ok {
            return Err(Error::InvalidArgument(format!(
                "{name:?} is not a valid volume name"
            )));
        }
        let dir = self.root.join("volumes").join(name);
        fs::create_dir_all(&dir).map_err(|e| Error::store("create volume", &dir, e))?;
        Ok(dir)
    }

    /// The names of the store's volumes.
    pub fn volumes(&self) -> Result<Vec<String>> {
        let dir = self.root.join("volumes");
        let mut out = Vec::new();
        match fs::read_dir(&dir) {
            Ok(rd) => {
                for ent in rd {
                    let ent = ent.map_err(|e| Error::store("list volumes", &dir, e))?;
                    out.push(ent.file_name().to_string_lossy().into_owned());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::store("list volumes", &dir, e)),
        }
        out.sort();
        Ok(out)
    }

    /// Deletes a volume and everything in it. Sandboxes that mount it see it vanish.
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        let dir = self.volume(name)?;
        fs::remove_dir_all(&dir).map_err(|e| Error::store("delete volume", &dir, e))
    }

    /// A fresh working directory for a live sandbox, removed by the store if this process dies.
    pub fn new_live_dir(&self) -> Result<PathBuf> {
        let dir = self.root.join("live").join(format!(
            "{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        fs::create_dir(&dir).map_err(|e| Error::store("create", &dir, e))?;
        Ok(dir)
    }
}

/// Reads a whole file of at most `cap` bytes; `Ok(Err(len))` when it is larger.
fn read_capped(path: &Path, cap: u64) -> io::Result<Result<Vec<u8>, u64>> {
    use std::io::Read;
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    if len > cap {
        return Ok(Err(len));
    }
    let mut buf = Vec::with_capacity(len as usize);
    f.take(cap + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > cap {
        return Ok(Err(buf.len() as u64));
    }
    Ok(Ok(buf))
}

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

/// What [`LocalStore::gc`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub chunks_removed: u64,
    pub bytes_freed: u64,
}

/// Storage accounting of one snapshot, as [`LocalStore::usage`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotUsage {
    pub id: SnapshotId,
    /// Logical memory size.
    pub memory_size: u64,
    /// Bytes stored for this snapshot (compact: the compressed size of the chunks it uses).
    pub stored_bytes: u64,
    /// Part of `stored_bytes` in chunks other snapshots use too.
    pub shared_bytes: u64,
    pub compact: bool,
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
    let page = crate::memimage::PAGE;
    let mut buf = Vec::new();
    let mut off = 0u64;
    for run in crate::memimage::runs(pages) {
        let len = run.count as usize * page;
        buf.resize(len, 0);
        delta.read_exact_at(&mut buf, off)?;
        dst.write_all_at(&buf, run.first as u64 * page as u64)?;
        off += len as u64;
    }
    Ok(())
}

/// A snapshot being written. Dropped without [`commit`](Self::commit), it leaves nothing.
#[derive(Debug)]
pub struct SnapshotWriter<'a> {
    store: &'a LocalStore,
    id: SnapshotId,
    dir: PathBuf,
    files: Vec<PathBuf>,
    committed: bool,
}

impl SnapshotWriter<'_> {
    pub fn id(&self) -> &SnapshotId {
        &self.id
    }

    /// Creates a data file of the snapshot (read-write, so it can be mapped back).
    pub fn create(&mut self, name: &str) -> Result<File> {
        let path = self.dir.join(name);
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::store("create", &path, e))?;
        self.files.push(path);
        Ok(f)
    }

    /// Hard-links a data file from another committed snapshot (content known to be identical).
    pub fn link_from(&mut self, other: &SnapshotId, name: &str) -> Result<()> {
        let src = self.store.snapshot_dir(other).join(name);
        let dst = self.dir.join(name);
        fs::hard_link(&src, &dst).map_err(|e| Error::store("link", &dst, e))?;
        Ok(())
    }

    /// Path of a file in the snapshot being written.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Writes the manifest, flushes, and atomically publishes the snapshot.
    pub fn commit(mut self, manifest: &Manifest) -> Result<()> {
        assert_eq!(manifest.id, self.id, "manifest of another snapshot");
        let path = self.dir.join(MANIFEST);
        let bytes = manifest.encode();
        let sync = self.store.durability == Durability::Sync;
        {
            use std::io::Write;
            let mut f = File::create(&path).map_err(|e| Error::store("create", &path, e))?;
            f.write_all(&bytes)
                .map_err(|e| Error::store("write", &path, e))?;
            if sync {
                f.sync_all().map_err(|e| Error::store("sync", &path, e))?;
            }
        }
        if sync {
            for p in &self.files {
                File::open(p)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| Error::store("sync", p, e))?;
            }
            sync_dir(&self.dir)?;
        }
        let dst = self.store.snapshot_dir(&self.id);
        let lock = self.store.store_lock()?;
        if let Some(parent) = &manifest.parent
            && !self.store.contains(parent)
        {
            return Err(Error::SnapshotNotFound(parent.clone()));
        }
        fs::rename(&self.dir, &dst).map_err(|e| Error::store("commit", &dst, e))?;
        drop(lock);
        self.committed = true;
        if sync {
            sync_dir(&self.store.root.join("snapshots"))?;
        }
        Ok(())
    }
}

impl Drop for SnapshotWriter<'_> {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
