//! Garbage collection of the bucket, and checking that a snapshot is whole in it.
//!
//! [`RemoteStore::gc`] removes chunks that no snapshot object references and that are older
//! than a grace period (at least twice
//! [`RemoteOptions::freshen_after`](crate::RemoteOptions::freshen_after): a shorter one is
//! refused), each looked up again just before it goes (one written again meanwhile stays). It
//! is safe while other hosts upload: an upload writes its chunks before
//! the snapshot object that references them, so a chunk is unreferenced for a while; and one
//! that reuses a chunk already in the bucket uploads it again (refreshing its age) when it is
//! older than [`RemoteOptions::freshen_after`](crate::RemoteOptions::freshen_after), which is
//! far below the grace period: a chunk an upload in flight is about to reference is never old
//! enough to be collected. Snapshot objects and heads are never removed by GC: nothing a head
//! or a snapshot object references goes.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use dormant_core::snapshot::SnapshotId;
use dormant_core::snapshot::chunks::{self, HASH_LEN};
use dormant_core::{Error, Result, SnapshotError};
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;

use crate::{RemoteStore, remote_err};

/// The default grace period of [`RemoteStore::gc`]: 7 days.
pub const DEFAULT_GC_GRACE: Duration = Duration::from_secs(7 * 24 * 3600);

/// What [`RemoteStore::gc`] found and removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteGcReport {
    /// Snapshot objects read (every one in the bucket).
    pub snapshots: u64,
    /// Chunks in the bucket before.
    pub chunks: u64,
    /// Chunks no snapshot references but younger than the grace period (kept).
    pub unreferenced_kept: u64,
    /// Chunks removed, and their bytes.
    pub chunks_removed: u64,
    pub bytes_freed: u64,
}

/// What [`RemoteStore::verify`] checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Snapshot objects of the chain.
    pub snapshots: u64,
    /// Distinct chunks they reference, all present.
    pub chunks: u64,
}

impl RemoteStore {
    /// Removes the chunks no snapshot object references that were written more than `grace`
    /// ago ([`DEFAULT_GC_GRACE`]; see the module's documentation for why this is safe while
    /// other hosts upload). An unreadable snapshot object stops GC before anything is removed.
    pub fn gc(&self, grace: Duration) -> Result<RemoteGcReport> {
        let s = &self.shared;
        let t0 = Instant::now();
        let least = s.opts.freshen_after * 2;
        if grace < least {
            return Err(Error::InvalidArgument(format!(
                "a grace period of {:.0} s is too short: an upload under way may reference a \
                 chunk written up to freshen_after ({:.0} s) before it; use at least {:.0} s",
                grace.as_secs_f64(),
                s.opts.freshen_after.as_secs_f64(),
                least.as_secs_f64()
            )));
        }
        // Chunks first, then the objects: a chunk listed here whose snapshot object is written
        // after the listing below is young, hence kept.
        let chunks_prefix = s.key("chunks");
        let chunks: Vec<object_store::ObjectMeta> =
            s.rt.block_on(s.os.list(Some(&chunks_prefix)).try_collect())
                .map_err(|e| remote_err("list", chunks_prefix.to_string(), e))?;
        let mut report = RemoteGcReport {
            chunks: chunks.len() as u64,
            ..Default::default()
        };
        let mut referenced: HashSet<[u8; HASH_LEN]> = HashSet::new();
        for id in s.list_snapshot_ids()? {
            let obj = s.get_object(&id)?;
            for (_, index) in &obj.files {
                referenced.extend(chunks::referenced(index));
            }
            report.snapshots += 1;
        }
        let cutoff = chrono_cutoff(grace);
        let mut doomed = Vec::new();
        for m in chunks {
            let Some(hash) = m.location.filename().and_then(chunks::parse_hex) else {
                continue;
            };
            if referenced.contains(&hash) {
                continue;
            }
            if m.last_modified.timestamp_millis() > cutoff {
                report.unreferenced_kept += 1;
                continue;
            }
            doomed.push((hash, m.location, m.size, m.last_modified));
        }
        let parallelism = s.opts.parallelism.max(1);
        let removed: Vec<u64> = s.rt.block_on(
            futures::stream::iter(doomed)
                .map(|(hash, key, size, listed)| async move {
                    // Written again since the listing (an upload reusing it refreshed it): kept.
                    match s.os.head(&key).await {
                        Ok(m) if m.last_modified > listed => return Ok(0),
                        Err(object_store::Error::NotFound { .. }) => return Ok(0),
                        Ok(_) => {}
                        Err(e) => return Err(remote_err("look up", key.to_string(), e)),
                    }
                    match s.os.delete(&key).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => {
                            s.present.lock().remove(&hash);
                            Ok(size)
                        }
                        Err(e) => Err(remote_err("remove", key.to_string(), e)),
                    }
                })
                .buffer_unordered(parallelism)
                .try_collect(),
        )?;
        report.chunks_removed = removed.iter().filter(|&&n| n > 0).count() as u64;
        report.bytes_freed = removed.iter().sum();
        tracing::info!(
            ?report,
            seconds = t0.elapsed().as_secs_f64(),
            "object-store gc"
        );
        Ok(report)
    }

    /// Checks that snapshot `id` is whole in the bucket: its object and those of its chain,
    /// and every chunk they reference. Errors: [`Error::SnapshotNotFound`], or
    /// [`Error::Snapshot`] naming what is missing.
    pub fn verify(&self, id: &SnapshotId) -> Result<VerifyReport> {
        let s = &self.shared;
        let mut report = VerifyReport::default();
        let mut hashes: HashSet<[u8; HASH_LEN]> = HashSet::new();
        let mut next = Some(id.clone());
        while let Some(cur) = next.take() {
            if report.snapshots >= crate::transfer::MAX_CHAIN as u64 {
                return Err(Error::snapshot(
                    id,
                    SnapshotError::Malformed("inconsistent layer chain in the bucket".into()),
                ));
            }
            let obj = match s.get_object(&cur) {
                Err(Error::SnapshotNotFound(_)) if cur != *id => {
                    return Err(Error::snapshot(
                        id,
                        SnapshotError::Malformed(format!(
                            "snapshot {cur} of its chain is missing from the bucket"
                        )),
                    ));
                }
                r => r?,
            };
            for (_, index) in &obj.files {
                hashes.extend(chunks::referenced(index));
            }
            report.snapshots += 1;
            if obj.manifest.memory.depth > 0 {
                next = obj.manifest.parent.clone();
            }
        }
        report.chunks = hashes.len() as u64;
        let parallelism = s.opts.parallelism.max(1);
        s.rt.block_on(
            futures::stream::iter(hashes)
                .map(|hash| async move {
                    let key = s.chunk_key(&hash);
                    match s.os.head(&key).await {
                        Ok(_) => Ok(()),
                        Err(object_store::Error::NotFound { .. }) => Err(Error::snapshot(
                            id,
                            SnapshotError::Malformed(format!(
                                "chunk {key} is missing from the bucket"
                            )),
                        )),
                        Err(e) => Err(remote_err("look up", key.to_string(), e)),
                    }
                })
                .buffer_unordered(parallelism)
                .try_collect::<Vec<()>>(),
        )?;
        Ok(report)
    }
}

/// Unix milliseconds `grace` ago.
fn chrono_cutoff(grace: Duration) -> i64 {
    crate::now_ms() as i64 - grace.as_millis().min(i64::MAX as u128) as i64
}
