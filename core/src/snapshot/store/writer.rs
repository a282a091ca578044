//! Writing a snapshot: [`LocalStore::begin`] opens a [`SnapshotWriter`] in `tmp/`, the tier
//! creates the snapshot's files in it, and [`SnapshotWriter::commit`] writes the manifest,
//! flushes and renames the directory into `snapshots/` (the commit; see the
//! [store](super)).

use std::fs::{self, File};
use std::path::PathBuf;

use super::{Durability, LocalStore, MANIFEST, sync_dir};
use crate::error::{Error, Result};
use crate::memimage::file::{self as image, Written};
use crate::snapshot::{FileRecord, LayerKind, Manifest, MemoryRecord, SnapshotId};

/// How [`SnapshotWriter::write_layer`] writes a layer: all of the image, or only some pages
/// of it over a parent layer.
#[derive(Debug, Clone, Copy)]
pub enum LayerWrite<'p> {
    /// A full image, `<stem>.img` (zero pages stay holes), at depth 0.
    Full,
    /// `pages` (strictly increasing page numbers) over a parent layer of depth `parent_depth`,
    /// `<stem>.delta`, at depth `parent_depth + 1`.
    Delta { pages: &'p [u32], parent_depth: u32 },
}

impl LocalStore {
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

    /// Writes `image` (its size a multiple of [`PAGE`](crate::snapshot::format::PAGE)) as a
    /// layer of this snapshot named after `stem` (`"memory"`, `"disk"`), the one way every
    /// layer is written (file names and record fields in [`format`](crate::snapshot::format)). Returns the layer's
    /// record and its file, for a caller that maps it back. Errors: [`Error::Store`] or
    /// [`Error::StoreFull`] naming the file.
    pub fn write_layer(
        &mut self,
        stem: &str,
        image: &[u8],
        how: LayerWrite<'_>,
    ) -> Result<(MemoryRecord, File)> {
        let (name, kind, depth) = match how {
            LayerWrite::Full => (format!("{stem}.img"), LayerKind::Full, 0),
            LayerWrite::Delta { parent_depth, .. } => {
                (format!("{stem}.delta"), LayerKind::Delta, parent_depth + 1)
            }
        };
        let f = self.create(&name)?;
        let written = match how {
            LayerWrite::Full => image::write_full(&f, image),
            LayerWrite::Delta { pages, .. } => image::write_delta(&f, image, pages),
        };
        let Written { len, stored, crc32 } =
            written.map_err(|e| Error::store("write", self.dir.join(&name), e))?;
        let record = MemoryRecord {
            size: image.len() as u64,
            kind,
            file: FileRecord {
                name,
                len,
                crc32,
                stored,
            },
            depth,
        };
        Ok((record, f))
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
    pub fn commit(self, manifest: &Manifest) -> Result<()> {
        self.commit_with(manifest, None)
    }

    /// [`commit`](Self::commit) for a snapshot this process did not take (fetched from an
    /// object store). `crcs`: the CRC-32 of each file's content as the importer wrote it,
    /// computed from that content, never read from the manifest: recorded as checked, so that
    /// a first open compares it with the manifest's CRC instead of reading the file again (a
    /// mismatch is then a [`SnapshotError::Checksum`](crate::SnapshotError::Checksum), as for
    /// a damaged file).
    pub fn commit_imported(self, manifest: &Manifest, crcs: &[(&str, u32)]) -> Result<()> {
        self.commit_with(manifest, Some(crcs))
    }

    fn commit_with(mut self, manifest: &Manifest, imported: Option<&[(&str, u32)]>) -> Result<()> {
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
        // What it wrote matches the CRCs it computed while writing: a resume in another
        // process need not read the files again (see `verified`).
        match imported {
            Some(crcs) => super::verified::record(&self.dir, crcs),
            None => {
                let records: Vec<(&str, u32)> = std::iter::once(&manifest.memory.file)
                    .chain(&manifest.fs)
                    .map(|r| (r.name.as_str(), r.crc32))
                    .collect();
                super::verified::record(&self.dir, &records);
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
