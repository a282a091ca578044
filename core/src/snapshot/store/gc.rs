//! Garbage collection and storage accounting: [`LocalStore::gc`] removes what no snapshot
//! references (chunks, rebuilt files, a compacted snapshot's old files) and
//! [`LocalStore::usage`] says how many bytes each snapshot stores and shares.

use std::fs;

use super::{LocalStore, MANIFEST, SnapshotInfo};
use crate::error::{Error, Result, SnapshotError};
use crate::snapshot::chunks;
use crate::snapshot::{LayerKind, SnapshotId};

/// Names of the layer files the store and the WASI tier write; GC removes those a manifest no
/// longer references, and nothing else.
const LAYER_FILES: [&str; 5] = [
    "memory.img",
    "memory.delta",
    "memory.cidx",
    "fs.tar",
    "fs.cidx",
];

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

impl LocalStore {
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
}
