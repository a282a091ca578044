//! The sandbox's directories: its root on the host (the live working directory), the mounts as
//! the guest sees them, and the guard that removes a root built for a restore that failed.

use std::path::PathBuf;

use dormant_core::{Error, LocalStore, Mount, Operation, Result, grants};

use super::WasiSandbox;

impl WasiSandbox {
    /// The sandbox's root directory on the host (its live working directory).
    pub(super) fn root(&self) -> Result<PathBuf> {
        self.workdir.clone().ok_or(Error::IllegalTransition {
            op: Operation::Files,
            state: self.lifecycle.state(),
        })
    }

    /// `mounts` as the guest and the files API see them: a detached mount point shows the
    /// store's empty directory, read-only.
    pub(super) fn attached(store: &LocalStore, mounts: &[Mount]) -> Result<Vec<Mount>> {
        if mounts.iter().any(Mount::is_detached) {
            Ok(grants::attachable(mounts, &grants::detached_dir(store)?))
        } else {
            Ok(mounts.to_vec())
        }
    }
}

/// Removes a directory on drop unless defused.
pub(super) struct DirGuard(Option<PathBuf>);
pub(super) fn scopeguard(p: PathBuf) -> DirGuard {
    DirGuard(Some(p))
}
impl DirGuard {
    pub(super) fn defuse(mut self) {
        self.0 = None;
    }
}
impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}
