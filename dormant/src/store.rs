//! Where snapshots live: a [`Store`], the local directory ([`LocalStore`], the embedded
//! default) or an S3-compatible bucket ([`RemoteStore`], with a local store as its cache).
//!
//! Sandboxes always run from a local store; with a remote one, each is a [`RemoteSandbox`]:
//! it holds the sandbox's lease while it runs, uploads its checkpoints in the background
//! (durably on request), and a resume on any host fetches what its cache lacks. See
//! [`dormant_remote`] for the bucket's layout and the lease.
//!
//! ```no_run
//! use dormant::{Grants, SandboxSpec, Store, Tier};
//!
//! // Host A
//! let store = Store::open("s3://sandboxes/team")?; // $AWS_ENDPOINT_URL, $AWS_ACCESS_KEY_ID, …
//! let mut sb = store.create(Tier::Wasi, SandboxSpec::python())?;
//! sb.run_code("x = 41")?;
//! let snap = sb.standby()?;
//! store.wait_durable(&*sb, &snap)?; // in the bucket, lease released
//! let id = sb.id().to_owned();
//! drop(sb);
//!
//! // Host B (another process, another cache)
//! let store = Store::open("s3://sandboxes/team")?;
//! let mut sb = store.connect(&id, &Grants::new())?; // SandboxBusy while A holds it
//! assert_eq!(sb.run_code("x + 1")?.stdout, "42\n");
//! # Ok::<(), dormant::Error>(())
//! ```

use std::path::PathBuf;
use std::sync::Arc;

use dormant_core::{
    Error, Grants, LocalStore, NoProgress, Progress, Result, Sandbox, SandboxSpec, SnapshotId, Tier,
};
pub use dormant_remote::{
    DEFAULT_GC_GRACE, Head, Holder, Lease, PullReport, PushReport, RemoteGcReport, RemoteOptions,
    RemoteSandbox, RemoteStore, VerifyReport,
};

/// A snapshot store: local, or remote with a local cache. Cheap to clone.
#[derive(Debug, Clone)]
pub enum Store {
    /// Snapshots in a directory on this host.
    Local(Arc<LocalStore>),
    /// Snapshots in an S3-compatible bucket; sandboxes run from its cache.
    Remote(RemoteStore),
}

impl Store {
    /// Opens `location`: `s3://bucket/prefix` is a [`RemoteStore`] with the default settings
    /// (its endpoint from `$AWS_ENDPOINT_URL`) and the default local store
    /// ([`LocalStore::default_root`]) as its cache; anything else is a local store's directory.
    pub fn open(location: &str) -> Result<Store> {
        if location.starts_with("s3://") {
            let cache = Arc::new(LocalStore::open_default()?);
            Ok(Store::Remote(RemoteStore::open(
                location,
                cache,
                RemoteOptions::default(),
            )?))
        } else {
            Ok(Store::Local(Arc::new(LocalStore::open(PathBuf::from(
                location,
            ))?)))
        }
    }

    /// `$DORMANT_STORE` (a directory or an `s3://` URL), else the default local store.
    pub fn open_default() -> Result<Store> {
        match std::env::var(LocalStore::ENV) {
            Ok(v) if v.starts_with("s3://") => Store::open(&v),
            _ => Ok(Store::Local(Arc::new(LocalStore::open_default()?))),
        }
    }

    /// The local store sandboxes run from: the store itself, or the remote store's cache.
    pub fn local(&self) -> &Arc<LocalStore> {
        match self {
            Store::Local(s) => s,
            Store::Remote(r) => r.cache(),
        }
    }

    /// The remote store, if this is one.
    pub fn remote(&self) -> Option<&RemoteStore> {
        match self {
            Store::Local(_) => None,
            Store::Remote(r) => Some(r),
        }
    }

    /// A new sandbox of `tier` ([`Runtime::create`](dormant_core::Runtime::create)); with a
    /// remote store, holding its lease.
    pub fn create(&self, tier: Tier, spec: SandboxSpec) -> Result<Box<dyn Sandbox>> {
        self.create_with_progress(tier, spec, &NoProgress)
    }

    /// [`create`](Self::create), reporting progress.
    pub fn create_with_progress(
        &self,
        tier: Tier,
        spec: SandboxSpec,
        progress: &dyn Progress,
    ) -> Result<Box<dyn Sandbox>> {
        let sb =
            crate::runtime(tier)?.create_with_progress(self.local().clone(), spec, progress)?;
        self.adopt(sb)
    }

    /// A new sandbox from template `name` ([`create_from_template`](crate::create_from_template));
    /// with a remote store, holding its lease.
    ///
    /// With a remote store, a template this host's cache lacks is fetched from the bucket
    /// (published there by [`publish_template`](Self::publish_template)).
    pub fn create_from_template(&self, name: &str, grants: &Grants) -> Result<Box<dyn Sandbox>> {
        self.template(name)?;
        let sb = crate::create_from_template(self.local().clone(), name, grants)?;
        self.adopt(sb)
    }

    /// The record of template `name` ([`crate::template()`]); with a remote store, fetched
    /// from the bucket first when this host's cache lacks it.
    pub fn template(&self, name: &str) -> Result<crate::TemplateRecord> {
        if let Store::Remote(r) = self
            && crate::template::template(r.cache(), name).is_err()
        {
            self.fetch_template(r, name)?;
        }
        crate::template::template(self.local(), name)
    }

    /// Publishes template `name` of the local store (the cache) to the bucket: its snapshot
    /// (with its chain) and its record (`records/template/<name>`), so that any host's
    /// [`create_from_template`](Self::create_from_template) finds it. Nothing to do in a local
    /// store.
    pub fn publish_template(&self, name: &str) -> Result<()> {
        let Store::Remote(r) = self else {
            return Ok(());
        };
        let rec = crate::template::template(r.cache(), name)?;
        r.push(&rec.snapshot)?;
        r.put_record("template", name, crate::template::record_bytes(&rec)?)
    }

    /// The record of template `name` in the bucket, its snapshot pulled into the cache and
    /// the record written there.
    fn fetch_template(&self, r: &RemoteStore, name: &str) -> Result<()> {
        let Some(bytes) = r.get_record("template", name, crate::template::MAX_RECORD)? else {
            return Ok(()); // the local lookup's error says there is none
        };
        let rec: crate::TemplateRecord = serde_json::from_slice(&bytes).map_err(|e| {
            Error::InvalidArgument(format!("template record of {name:?} in the bucket: {e}"))
        })?;
        r.pull(&rec.snapshot)?;
        crate::template::import_record(r.cache(), name, &bytes)?;
        Ok(())
    }

    /// Resumes snapshot `id` ([`crate::resume`]). With a remote store: takes the lease of the
    /// sandbox it was taken of ([`Error::SandboxBusy`] while another host holds it), then
    /// fetches the snapshot if the cache lacks it.
    pub fn resume(&self, id: &SnapshotId, grants: &Grants) -> Result<Box<dyn Sandbox>> {
        let Store::Remote(r) = self else {
            return crate::resume(self.local().clone(), id, grants);
        };
        let sandbox_id = if r.cache().contains(id) {
            r.cache().manifest(id)?.sandbox_id
        } else {
            r.snapshot_object(id)?.manifest.sandbox_id
        };
        let lease = r.acquire(&sandbox_id, false, true)?;
        self.resume_leased(r, lease, id, grants)
    }

    /// Resumes sandbox `sandbox_id` from its latest snapshot: in a local store the latest one
    /// it holds ([`LocalStore::sandbox`]); in a remote one the latest durable one its head
    /// names, under its lease ([`Error::SandboxBusy`] while another host holds it).
    /// [`Error::SandboxNotFound`] when it has none.
    pub fn connect(&self, sandbox_id: &str, grants: &Grants) -> Result<Box<dyn Sandbox>> {
        Ok(self.connect_at(sandbox_id, grants)?.0)
    }

    /// [`connect`](Self::connect), also returning the snapshot it resumed.
    pub fn connect_at(
        &self,
        sandbox_id: &str,
        grants: &Grants,
    ) -> Result<(Box<dyn Sandbox>, SnapshotId)> {
        match self {
            Store::Local(s) => {
                let info = s
                    .sandbox(sandbox_id)?
                    .ok_or_else(|| Error::SandboxNotFound(sandbox_id.to_owned()))?;
                Ok((crate::resume(s.clone(), &info.latest, grants)?, info.latest))
            }
            Store::Remote(r) => {
                let lease = r.acquire(sandbox_id, false, false)?;
                let Some(id) = lease.durable_snapshot().filter(|_| !lease.killed()) else {
                    r.release(&lease);
                    return Err(Error::SandboxNotFound(sandbox_id.to_owned()));
                };
                Ok((self.resume_leased(r, lease, &id, grants)?, id))
            }
        }
    }

    /// The latest snapshot of sandbox `sandbox_id`: see [`connect`](Self::connect).
    pub fn latest_snapshot(&self, sandbox_id: &str) -> Result<SnapshotId> {
        let found = match self {
            Store::Local(s) => s.sandbox(sandbox_id)?.map(|i| i.latest),
            Store::Remote(r) => r
                .head(sandbox_id)?
                .filter(|h| h.killed_unix_ms.is_none())
                .and_then(|h| h.snapshot),
        };
        found.ok_or_else(|| Error::SandboxNotFound(sandbox_id.to_owned()))
    }

    /// Waits until snapshot `id` of `sandbox` is durable: in a local store it is once taken;
    /// in a remote one once uploaded and named by the sandbox's head
    /// ([`RemoteSandbox::wait_durable`]). `sandbox` must be one this store gave.
    pub fn wait_durable(&self, sandbox: &dyn Sandbox, id: &SnapshotId) -> Result<()> {
        let Store::Remote(r) = self else {
            return Ok(());
        };
        let lease = r.lease_of(sandbox.id()).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "sandbox {:?} is not one of this process's sandboxes of {}",
                sandbox.id(),
                r.url()
            ))
        })?;
        r.wait_durable(&lease, id)
    }

    fn resume_leased(
        &self,
        r: &RemoteStore,
        lease: Arc<Lease>,
        id: &SnapshotId,
        grants: &Grants,
    ) -> Result<Box<dyn Sandbox>> {
        let resumed = r
            .pull(id)
            .and_then(|_| crate::resume(r.cache().clone(), id, grants));
        match resumed {
            Ok(sb) => Ok(Box::new(RemoteSandbox::new(sb, r.clone(), lease))),
            Err(e) => {
                r.release(&lease);
                Err(e)
            }
        }
    }

    /// Wraps a sandbox just made in the local store: with a remote store, takes its lease (its
    /// id is new to the bucket).
    fn adopt(&self, mut sb: Box<dyn Sandbox>) -> Result<Box<dyn Sandbox>> {
        let Store::Remote(r) = self else {
            return Ok(sb);
        };
        match r.acquire(sb.id(), true, false) {
            Ok(lease) => Ok(Box::new(RemoteSandbox::new(sb, r.clone(), lease))),
            Err(e) => {
                let _ = sb.kill();
                Err(e)
            }
        }
    }
}
