//! The local-directory snapshot store, dormant's embedded default: committing, reading and
//! deleting snapshots.
//!
//! ```text
//! <root>/snapshots/<id>/manifest.dsnp   committed snapshots: the only place `list` looks
//! <root>/tmp/<pid>-<id>/                snapshots being written (removed if their writer died)
//! <root>/trash/                         snapshots being deleted
//! <root>/chunks/<2 hex>/<62 hex>        compressed chunks of compact snapshots
//! <root>/rehydrated/<id>.{img,tar}      compact files rebuilt into their full form (a cache)
//! <root>/lock, <root>/chunks.lock       commit/delete lock; chunk writers/GC lock
//! <root>/live/<pid>-<nonce>/            working directories of live sandboxes
//! <root>/volumes/<name>/                named volumes
//! <root>/detached/                      the empty directory detached mount points show
//! <root>/killed/<sandbox id>             when a sandbox was killed (see `sandboxes.rs`)
//! ```
//!
//! A snapshot is written whole into `tmp/`, its files are flushed (with
//! [`Durability::Sync`], the default: `fsync` of every file and of both directories), then the
//! directory is renamed into `snapshots/`. The rename is the commit: a crash at any point leaves
//! either the complete snapshot or nothing under `snapshots/`.
//!
//! This file is the store proper: opening it, reading manifests, layer chains and data files
//! (rebuilding compact ones), listing and deleting. Writing a snapshot and its commit are in
//! `writer.rs` ([`LocalStore::begin`], [`SnapshotWriter`]), compaction in `compact.rs`
//! ([`LocalStore::compact`]), garbage collection and storage accounting in `gc.rs`
//! ([`LocalStore::gc`], [`LocalStore::usage`]), the store's sandboxes (snapshots grouped by sandbox
//! id, and killed sandboxes) in `sandboxes.rs` ([`LocalStore::sandboxes`]). `live/`, `volumes/` and `detached/` hold no
//! snapshots: their helpers are in [`crate::sandbox_dirs`]. What the files of a snapshot
//! directory hold is documented in [`crate::snapshot::format`].

mod compact;
mod gc;
mod sandboxes;
mod verified;
mod writer;

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use crate::default_dirs;
use crate::error::{Error, Result, SnapshotError};
use crate::fsutil::FileLock;
use crate::snapshot::chunks::Chunks;
use crate::snapshot::layer::Layer;
pub use crate::snapshot::layer::LayerFile;
use crate::snapshot::{FileRecord, LayerKind, Manifest, SnapshotId};
use crate::spec::Tier;

pub use compact::CompactReport;
pub use gc::{GcReport, SandboxUsage, SnapshotUsage, StoreUsage};
pub use sandboxes::SandboxInfo;
pub use writer::{LayerWrite, SnapshotWriter};

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
    /// The tier of the sandbox the snapshot was taken of.
    pub tier: Tier,
    pub created_unix_ms: u64,
    /// Logical memory size.
    pub memory_size: u64,
    /// Bytes stored by this snapshot's own files.
    pub stored_bytes: u64,
}

/// Snapshots in a directory on local disk.
#[derive(Debug)]
pub struct LocalStore {
    root: PathBuf,
    durability: Durability,
    /// Data files whose CRC was checked by this process (a resume after the first is free).
    verified: Mutex<HashSet<(SnapshotId, String)>>,
    verify_data: bool,
    /// Empty live directories this process released, for the next sandbox (see
    /// [`LocalStore::new_live_dir`]); removed when the store is dropped.
    pub(crate) spare_live: Mutex<Vec<PathBuf>>,
}

impl Drop for LocalStore {
    fn drop(&mut self) {
        for dir in self.spare_live.get_mut().drain(..) {
            let _ = fs::remove_dir(dir);
        }
    }
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
    pub const ENV: &'static str = default_dirs::STORE_ENV;

    /// `$DORMANT_STORE`, else `<user data dir>/dormant/store` (`~/.local/share/dormant/store`):
    /// [`default_dirs::store_root`].
    pub fn default_root() -> PathBuf {
        default_dirs::store_root()
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
            spare_live: Mutex::new(Vec::new()),
        })
    }

    /// Sets how commits are flushed (default [`Durability::Sync`]).
    pub fn with_durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Whether data files (memory images, filesystem archives) are checked against their CRC
    /// (default: yes), once per file: see [`open_file`](Self::open_file). Turning it off saves
    /// reading a whole file the writer did not record as checked (about 3 ms per 16 MiB here);
    /// lengths and the manifest (with its checksums) are still checked on every open.
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

    /// The chain of `id` (as [`chain`](Self::chain)) for a resume on `tier`: where every
    /// tier's restore starts. A snapshot taken on another tier is [`Error::Snapshot`]
    /// ([`SnapshotError::Incompatible`]).
    pub fn chain_for(&self, id: &SnapshotId, tier: Tier) -> Result<Vec<Manifest>> {
        let chain = self.chain(id)?;
        let leaf = chain.last().expect("chain is never empty");
        if leaf.tier != tier {
            return Err(Error::snapshot(
                id,
                SnapshotError::Incompatible(format!("a {} snapshot", leaf.tier)),
            ));
        }
        Ok(chain)
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

    /// Opens a data file of a snapshot, checking its length always and, when `verify` is set,
    /// its CRC: once, then neither again in this process nor in another one while the file is
    /// unchanged (the writer's own CRC counts as a check; see `verified.rs`).
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
        let md = f.metadata().map_err(|e| {
            bad(SnapshotError::Io {
                file: path.clone(),
                source: e,
            })
        })?;
        let len = md.len();
        if len != rec.len {
            return Err(bad(SnapshotError::Truncated {
                what: format!("{} is {len} bytes, expected {}", rec.name, rec.len),
            }));
        }
        if verify && self.verify_data {
            let key = (id.clone(), rec.name.clone());
            let dir = self.snapshot_dir(id);
            if !self.verified.lock().contains(&key)
                && !verified::matches(&dir, &rec.name, &md, rec.crc32)
            {
                let ok =
                    crate::memimage::file::verify_file(&f, rec.len, rec.crc32).map_err(|e| {
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
                verified::record(&dir, &[(&rec.name, rec.crc32)]);
            }
            self.verified.lock().insert(key);
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
                    tier: m.tier,
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
