//! What the scenarios read off the store and the host rather than time: bytes a snapshot stored,
//! disk blocks under a directory, this process's resident memory.

use std::path::Path;

use dormant::{LocalStore, SnapshotId};

use crate::Res;

pub fn stored_bytes(store: &LocalStore, id: &SnapshotId) -> Res<u64> {
    Ok(store
        .list()?
        .into_iter()
        .find(|s| &s.id == id)
        .map(|s| s.stored_bytes)
        .unwrap_or(0))
}

/// Bytes the files under `dir` occupy on disk (allocated blocks, so sparse files count what
/// they hold).
pub fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.blocks() * 512;
            }
        }
    }
    total
}

pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}
