//! The store's sandboxes: the snapshots grouped by the sandbox they were taken of (each
//! manifest records its `sandbox_id`), so that a sandbox can be named by its id, listed, and
//! resumed from its latest snapshot in any process ([`LocalStore::sandboxes`],
//! [`LocalStore::sandbox`]).
//!
//! Killing a sandbox ends it for good, but its snapshots stay (they may be the base of other
//! snapshots, of templates, or be resumed by snapshot id on purpose). So that a killed sandbox
//! leaves the listing, and a lookup by id no longer finds it, the killer records it:
//! [`LocalStore::retire_sandbox`] writes `<root>/killed/<sandbox id>`, holding the time of the
//! kill (Unix milliseconds, decimal). A retired sandbox stays out of the listing until a
//! snapshot newer than the kill is taken of it (its identity lives on in its snapshots: one
//! resumed by snapshot id and checkpointed again is that sandbox, alive again).

use std::collections::BTreeMap;
use std::fs;
use std::io;

use super::{LocalStore, SnapshotInfo, read_capped};
use crate::error::{Error, Result};
use crate::snapshot::SnapshotId;
use crate::spec::Tier;

/// Cap on a `killed/` file: a decimal `u64` and a newline, with room to spare.
const MAX_KILLED_LEN: u64 = 64;

/// A sandbox of the store, as [`LocalStore::sandboxes`] reports it: the snapshots taken of one
/// sandbox id, summarised by the latest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxInfo {
    /// The sandbox's id (`sb-…`), kept across checkpoint, standby and resume.
    pub sandbox_id: String,
    /// The tier of its latest snapshot.
    pub tier: Tier,
    /// Its latest snapshot: what resuming the sandbox by id resumes.
    pub latest: SnapshotId,
    /// When the latest snapshot was taken, in Unix milliseconds.
    pub latest_created_unix_ms: u64,
    /// How many of the store's snapshots were taken of it (since it was last retired, if it
    /// was).
    pub snapshots: usize,
}

/// Checks a sandbox id before it names a file: 1 to 128 ASCII letters, digits, `.`, `_` and
/// `-`, not starting with `.`.
fn check_sandbox_id(sandbox_id: &str) -> Result<()> {
    let ok = crate::sandbox_dirs::valid_sandbox_id(sandbox_id);
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{sandbox_id:?} is not a sandbox id (ids look like \"sb-0123456789abcdef\")"
        )))
    }
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl LocalStore {
    fn killed_dir(&self) -> std::path::PathBuf {
        self.root.join("killed")
    }

    /// When `sandbox_id` was last retired (Unix ms), if it was. An unreadable record counts
    /// as a kill at time 0 (hides what came before it, nothing after).
    fn retired_at(&self, sandbox_id: &str) -> Option<u64> {
        if check_sandbox_id(sandbox_id).is_err() {
            return None;
        }
        let path = self.killed_dir().join(sandbox_id);
        match read_capped(&path, MAX_KILLED_LEN) {
            Ok(Ok(bytes)) => Some(
                std::str::from_utf8(&bytes)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0),
            ),
            Ok(Err(_)) => Some(0),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(_) => Some(0),
        }
    }

    /// Records that `sandbox_id` was killed: it leaves [`sandboxes`](LocalStore::sandboxes)
    /// and [`sandbox`](LocalStore::sandbox) no longer finds it, until a snapshot is taken of
    /// it after this call. Its snapshots stay in the store (resumable by snapshot id). Retiring
    /// an id with no snapshots (a sandbox never checkpointed) is allowed and harmless.
    ///
    /// Errors: [`Error::InvalidArgument`] for an id that is not 1-128 characters of ASCII
    /// letters, digits, `.`, `_` and `-` (or starts with `.`); [`Error::Store`] when the
    /// record cannot be written.
    pub fn retire_sandbox(&self, sandbox_id: &str) -> Result<()> {
        check_sandbox_id(sandbox_id)?;
        let dir = self.killed_dir();
        fs::create_dir_all(&dir).map_err(|e| Error::store("create", &dir, e))?;
        let path = dir.join(sandbox_id);
        let tmp = dir.join(format!(
            ".{sandbox_id}.{}-{:x}.tmp",
            std::process::id(),
            rand::random::<u32>()
        ));
        // Strictly after every snapshot taken so far (a checkpoint in the same millisecond
        // as the kill belongs to the killed sandbox).
        let at = now_unix_ms();
        fs::write(&tmp, format!("{at}\n"))
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(|e| {
                let _ = fs::remove_file(&tmp);
                Error::store("retire sandbox", &path, e)
            })
    }

    /// The store's sandboxes, by sandbox id: every sandbox id with a snapshot in the store,
    /// except retired ones with no snapshot since ([`retire_sandbox`](LocalStore::retire_sandbox)).
    /// Reads every manifest (as [`list`](LocalStore::list) does).
    pub fn sandboxes(&self) -> Result<Vec<SandboxInfo>> {
        Ok(self.group(self.list()?, None))
    }

    /// The sandbox `sandbox_id` of the store (its latest snapshot, for a resume), or `None`
    /// when it has no snapshot here or was retired with none since.
    ///
    /// Errors: as [`list`](LocalStore::list).
    pub fn sandbox(&self, sandbox_id: &str) -> Result<Option<SandboxInfo>> {
        Ok(self.group(self.list()?, Some(sandbox_id)).pop())
    }

    /// Groups snapshots by sandbox id (only `only`'s when given), leaving out snapshots taken
    /// before their sandbox was retired.
    fn group(&self, snapshots: Vec<SnapshotInfo>, only: Option<&str>) -> Vec<SandboxInfo> {
        let mut by_id: BTreeMap<String, (Option<u64>, Vec<SnapshotInfo>)> = BTreeMap::new();
        for s in snapshots {
            if only.is_some_and(|id| id != s.sandbox_id) {
                continue;
            }
            let entry = by_id
                .entry(s.sandbox_id.clone())
                .or_insert_with(|| (self.retired_at(&s.sandbox_id), Vec::new()));
            if entry.0.is_none_or(|killed| s.created_unix_ms > killed) {
                entry.1.push(s);
            }
        }
        by_id
            .into_iter()
            .filter_map(|(sandbox_id, (_, snaps))| {
                let count = snaps.len();
                let latest = snaps
                    .into_iter()
                    .max_by(|a, b| (a.created_unix_ms, &a.id).cmp(&(b.created_unix_ms, &b.id)))?;
                Some(SandboxInfo {
                    sandbox_id,
                    tier: latest.tier,
                    latest: latest.id,
                    latest_created_unix_ms: latest.created_unix_ms,
                    snapshots: count,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_ids_that_could_leave_the_directory_are_refused() {
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            ".hidden",
            "a b",
            "é",
            &"x".repeat(129),
        ] {
            assert!(
                matches!(check_sandbox_id(bad), Err(Error::InvalidArgument(_))),
                "{bad:?}"
            );
        }
        for good in ["sb-0123456789abcdef", "a", "A.b_c-9", &"x".repeat(128)] {
            check_sandbox_id(good).unwrap();
        }
    }

    #[test]
    fn a_retired_id_without_snapshots_is_recorded_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        assert_eq!(store.retired_at("sb-1"), None);
        store.retire_sandbox("sb-1").unwrap();
        let at = store.retired_at("sb-1").unwrap();
        assert!(at > 0 && at <= now_unix_ms());
        assert!(matches!(
            store.retire_sandbox("../sb-1"),
            Err(Error::InvalidArgument(_))
        ));
        // An oversized or garbled record hides everything before time 0: nothing.
        fs::write(store.killed_dir().join("sb-2"), "not a number").unwrap();
        assert_eq!(store.retired_at("sb-2"), Some(0));
        fs::write(store.killed_dir().join("sb-3"), "1".repeat(100)).unwrap();
        assert_eq!(store.retired_at("sb-3"), Some(0));
        assert!(store.sandboxes().unwrap().is_empty());
    }
}
