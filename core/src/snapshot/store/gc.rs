//! Garbage collection and storage accounting: [`LocalStore::gc`] removes what no snapshot
//! references (chunks, rebuilt files, a compacted snapshot's old files) and
//! [`LocalStore::usage`] says how many bytes each snapshot stores and shares,
//! [`LocalStore::sandbox_usage`] the same for a sandbox, [`LocalStore::store_usage`] for the whole
//! store.

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

/// What the store holds for one sandbox, as [`LocalStore::sandbox_usage`] reports it. The two
/// byte counts are disjoint; their sum is what the sandbox's snapshots need on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxUsage {
    /// The snapshots whose manifest names this sandbox (its checkpoints and standbys).
    pub snapshots: u64,
    /// Bytes on disk that its snapshots (with the snapshots they are layered on) need and no
    /// other sandbox's do: files (allocated blocks, each hard-linked file once) and chunks
    /// of compact snapshots.
    pub stored_bytes: u64,
    /// Bytes on disk its snapshots need that are stored once for it and other sandboxes:
    /// snapshots of other sandboxes in its parent chain (a template, a fork's parent), its
    /// own snapshots that other sandboxes are layered on, files hard-linked between them, and
    /// chunks other sandboxes' compact snapshots reference too.
    pub shared_bytes: u64,
}

/// A summary of the whole store, as [`LocalStore::store_usage`] reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreUsage {
    /// Committed snapshots.
    pub snapshots: u64,
    /// Distinct sandbox ids among them.
    pub sandboxes: u64,
    /// Bytes the snapshots take on disk: their files (allocated blocks, each hard-linked file
    /// once), the chunks of compact snapshots, and compact files rebuilt into the cache.
    pub bytes_on_disk: u64,
    /// Bytes the snapshots describe: each one's memory size plus its filesystem archive's
    /// length, as if nothing were shared, sparse or compressed.
    pub logical_bytes: u64,
    /// Stored chunks (compact snapshots' content-addressed pieces), referenced or not.
    pub chunks: u64,
    /// Compressed bytes of those chunks.
    pub chunk_bytes: u64,
}

/// Something stored once that snapshots use: a file (by device and inode, so hard links are
/// one) or a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Item {
    File(u64, u64),
    Chunk([u8; chunks::HASH_LEN]),
}

/// One snapshot as the accounting sees it.
struct Scanned {
    sandbox_id: String,
    parent: Option<SnapshotId>,
    logical: u64,
    /// Items it uses directly (its own files and chunks, not its parent's).
    items: Vec<Item>,
}

/// Every snapshot's items, and the bytes of each item.
struct Scan {
    snapshots: std::collections::HashMap<SnapshotId, Scanned>,
    sizes: std::collections::HashMap<Item, u64>,
    /// Every stored chunk, referenced or not, with its compressed size.
    chunk_list: Vec<([u8; chunks::HASH_LEN], u64)>,
}

impl Scan {
    /// Snapshot `id` and the ancestors it is layered on (those still in the store), each
    /// once.
    fn chain(&self, id: &SnapshotId) -> Vec<&Scanned> {
        let mut out: Vec<&Scanned> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut at = Some(id);
        while let Some(id) = at
            && seen.insert(id)
            && let Some(s) = self.snapshots.get(id)
        {
            out.push(s);
            at = s.parent.as_ref();
        }
        out
    }
}

impl LocalStore {
    /// Reads every committed snapshot's files and chunk indexes. A snapshot deleted meanwhile
    /// drops out; chunks not stored (any more) count zero bytes.
    fn scan(&self) -> Result<Scan> {
        use std::os::unix::fs::MetadataExt;
        let chunk_list = self
            .chunks()
            .list()
            .map_err(|e| Error::store("list", self.root.join("chunks"), e))?;
        let chunk_sizes: std::collections::HashMap<_, _> = chunk_list.iter().copied().collect();
        let mut scan = Scan {
            snapshots: Default::default(),
            sizes: Default::default(),
            chunk_list,
        };
        for info in self.list()? {
            let gone = |e: Error| -> Result<()> {
                if self.snapshot_dir(&info.id).exists() {
                    Err(e)
                } else {
                    Ok(())
                }
            };
            let m = match self.manifest(&info.id) {
                Ok(m) => m,
                Err(e) => {
                    gone(e)?;
                    continue;
                }
            };
            let mut items = Vec::new();
            let mut indexes = Vec::new();
            if m.memory.kind == LayerKind::Compact {
                indexes.push(&m.memory.file);
            }
            if let (Some(f), Some(_)) = (&m.fs, m.fs_compact_len) {
                indexes.push(f);
            }
            for rec in indexes {
                match self.read_index(&m.id, rec) {
                    Ok(idx) => {
                        for h in chunks::referenced(&idx) {
                            let item = Item::Chunk(h);
                            scan.sizes
                                .insert(item, chunk_sizes.get(&h).copied().unwrap_or(0));
                            items.push(item);
                        }
                    }
                    Err(e) => gone(e)?,
                }
            }
            let dir = self.snapshot_dir(&info.id);
            for f in fs::read_dir(&dir).into_iter().flatten().flatten() {
                let Ok(md) = f.metadata() else { continue };
                if md.is_file() {
                    let item = Item::File(md.dev(), md.ino());
                    scan.sizes.insert(item, md.blocks() * 512);
                    items.push(item);
                }
            }
            items.sort_unstable_by_key(|i| match i {
                Item::File(d, n) => (0, *d, *n, [0; chunks::HASH_LEN]),
                Item::Chunk(h) => (1, 0, 0, *h),
            });
            items.dedup();
            scan.snapshots.insert(
                info.id,
                Scanned {
                    sandbox_id: m.sandbox_id,
                    parent: m.parent,
                    logical: m.memory.size + m.fs.as_ref().map_or(0, |f| f.len),
                    items,
                },
            );
        }
        Ok(scan)
    }

    /// What the store holds for sandbox `sandbox_id`: its snapshots, the bytes only they use
    /// and the bytes they share with other sandboxes (see [`SandboxUsage`]). A sandbox with no
    /// snapshot in the store (never checkpointed, or not this store's) gets zeros.
    pub fn sandbox_usage(&self, sandbox_id: &str) -> Result<SandboxUsage> {
        let scan = self.scan()?;
        // Which sandboxes need each item: those with a snapshot that holds it or is layered
        // on one that does.
        let mut users: std::collections::HashMap<Item, std::collections::HashSet<&str>> =
            std::collections::HashMap::new();
        let mut ours = std::collections::HashSet::new();
        let mut usage = SandboxUsage::default();
        for (id, s) in &scan.snapshots {
            let mine = s.sandbox_id == sandbox_id;
            if mine {
                usage.snapshots += 1;
            }
            for layer in scan.chain(id) {
                for item in &layer.items {
                    users.entry(*item).or_default().insert(&s.sandbox_id);
                    if mine {
                        ours.insert(*item);
                    }
                }
            }
        }
        for item in ours {
            let bytes = scan.sizes.get(&item).copied().unwrap_or(0);
            if users.get(&item).is_some_and(|u| u.len() > 1) {
                usage.shared_bytes += bytes;
            } else {
                usage.stored_bytes += bytes;
            }
        }
        Ok(usage)
    }

    /// A summary of the whole store: snapshots, sandboxes, bytes on disk, logical bytes and
    /// chunks (see [`StoreUsage`]).
    pub fn store_usage(&self) -> Result<StoreUsage> {
        let scan = self.scan()?;
        let chunk_bytes: u64 = scan.chunk_list.iter().map(|(_, n)| n).sum();
        let file_bytes: u64 = scan
            .sizes
            .iter()
            .filter(|(i, _)| matches!(i, Item::File(..)))
            .map(|(_, n)| n)
            .sum();
        let cache_bytes: u64 = fs::read_dir(self.root.join("rehydrated"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|f| f.metadata().ok())
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
            .sum();
        let sandboxes: std::collections::HashSet<&str> = scan
            .snapshots
            .values()
            .map(|s| s.sandbox_id.as_str())
            .collect();
        Ok(StoreUsage {
            snapshots: scan.snapshots.len() as u64,
            sandboxes: sandboxes.len() as u64,
            bytes_on_disk: file_bytes + chunk_bytes + cache_bytes,
            logical_bytes: scan.snapshots.values().map(|s| s.logical).sum(),
            chunks: scan.chunk_list.len() as u64,
            chunk_bytes,
        })
    }
}
