//! What a tier is to a caller that does not name it: a [`Runtime`] creates sandboxes, resumes
//! snapshots and forks them, and gives each as a `Box<dyn Sandbox>`.
//!
//! Each tier has one (`dormant_wasi::WasiRuntime`, `dormant_kvm::KvmRuntime`); the `dormant`
//! crate gives the process's runtime of a tier (`dormant::runtime`) and resumes a snapshot with
//! the runtime of the tier it was taken on (`dormant::resume`). Front ends (the Python module,
//! agent adapters) hold the `Box<dyn Sandbox>` in a [`Managed`](crate::Managed) handle and reach
//! the calls a tier may lack through the [capabilities](crate::capability).

use std::sync::Arc;

use crate::error::Result;
use crate::grants::Grants;
use crate::progress::{Progress, ProgressEvent, Unit};
use crate::sandbox::Sandbox;
use crate::snapshot::SnapshotId;
use crate::snapshot::store::LocalStore;
use crate::spec::{SandboxSpec, Tier};

/// One tier's entry points. Implementations are cheap to share (`Arc<dyn Runtime>`) and safe to
/// call from any thread.
pub trait Runtime: Send + Sync + std::fmt::Debug {
    /// The tier this runtime runs.
    fn tier(&self) -> Tier;

    /// What a sandbox of `spec` starts from, as a short string that changes whenever that
    /// does: the WASI tier's Python build (or module) and engine, the KVM tier's guest image
    /// and boot parameters (the key of its base snapshot). Templates put it in their cache key,
    /// so that a new runtime rebuilds them. Errors: what [`create`](Runtime::create) would
    /// report about a missing runtime component ([`Error::RuntimeMissing`](crate::Error::RuntimeMissing)).
    fn fingerprint(&self, spec: &SandboxSpec) -> Result<String>;

    /// A new sandbox from `spec`, keeping its snapshots in `store`. Errors: a spec that does not
    /// validate, or whose `tier` is not [`tier`](Runtime::tier), is
    /// [`Error::InvalidSpec`](crate::Error::InvalidSpec); a host without what the tier needs is
    /// [`Error::RuntimeMissing`](crate::Error::RuntimeMissing).
    fn create(&self, store: Arc<LocalStore>, spec: SandboxSpec) -> Result<Box<dyn Sandbox>>;

    /// [`create`](Runtime::create), reporting its progress to `progress` (see
    /// [`crate::progress`]). A tier whose create can take long reports its stages (the KVM
    /// tier: a base's first boot, in [`Unit::Steps`]); the others, and this default, report one
    /// final event, `"sandbox ready"` (1 of 1 steps), once the sandbox is made. Errors as
    /// [`create`](Runtime::create)'s; a create that fails sends no final event.
    fn create_with_progress(
        &self,
        store: Arc<LocalStore>,
        spec: SandboxSpec,
        progress: &dyn Progress,
    ) -> Result<Box<dyn Sandbox>> {
        let sb = self.create(store, spec)?;
        progress.report(&ProgressEvent::finished("sandbox ready", 1, Unit::Steps));
        Ok(sb)
    }

    /// The sandbox of snapshot `id`, as it was when the snapshot was taken (its id included),
    /// with `grants` as its host access: a snapshot grants none by itself (see [`Grants`]).
    /// Errors: [`Error::SnapshotNotFound`](crate::Error::SnapshotNotFound), a snapshot that
    /// fails its checks or was taken on another tier ([`Error::Snapshot`](crate::Error::Snapshot)),
    /// grants that do not fit it
    /// ([`Error::Grant`](crate::Error::Grant)).
    fn resume(
        &self,
        store: Arc<LocalStore>,
        id: &SnapshotId,
        grants: &Grants,
    ) -> Result<Box<dyn Sandbox>>;

    /// `n` new sandboxes from snapshot `id`: each resumes it as [`resume`](Runtime::resume)
    /// does, but with an id of its own and freshly seeded randomness. They share the
    /// snapshot's memory pages copy-on-write and diverge independently; the snapshot and its
    /// sandbox are untouched. [`Sandbox::fork`] is a checkpoint followed by this. Errors as
    /// [`resume`](Runtime::resume); on an error no child is left running.
    fn fork(
        &self,
        store: Arc<LocalStore>,
        id: &SnapshotId,
        grants: &Grants,
        n: usize,
    ) -> Result<Vec<Box<dyn Sandbox>>>;
}
