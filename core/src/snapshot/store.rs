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
use crate::snapshot::{FileRecord, Manifest, SnapshotId};

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
        for sub in ["snapshots", "tmp", "trash", "live"] {
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
            if pm.memory.depth + 1 != last.memory.depth || out.len() > MAX_CHAIN {
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

    /// Deletes a snapshot. Refused while incremental snapshots are layered on it.
    pub fn delete(&self, id: &SnapshotId) -> Result<()> {
        let dir = self.snapshot_dir(id);
        let _lock = StoreLock::acquire(&self.root)?;
        if !dir.exists() {
            return Err(Error::SnapshotNotFound(id.clone()));
        }
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
        let trash = self
            .root
            .join("trash")
            .join(format!("{}-{}", id, rand::random::<u64>()));
        fs::rename(&dir, &trash).map_err(|e| Error::store("delete", &dir, e))?;
        self.verified.lock().retain(|(s, _)| s != id);
        fs::remove_dir_all(&trash).map_err(|e| Error::store("delete", &trash, e))
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

/// An exclusive advisory lock on the store (in this process and across processes), held
/// while a commit checks its parent or a delete checks for children, so that a snapshot is
/// never committed on top of a parent being deleted.
struct StoreLock(File);

impl StoreLock {
    fn acquire(root: &Path) -> Result<StoreLock> {
        let path = root.join("lock");
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::store("open", &path, e))?;
        rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| Error::store("lock", &path, e.into()))?;
        Ok(StoreLock(f))
    }
}

impl Drop for StoreLock {
    fn drop(&mut self) {
        let _ = rustix::fs::flock(&self.0, rustix::fs::FlockOperation::Unlock);
    }
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
        let lock = StoreLock::acquire(&self.store.root)?;
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
