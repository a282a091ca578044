//! # dormant-remote: snapshots in an S3-compatible object store
//!
//! A [`RemoteStore`] keeps sandboxes' snapshots in a bucket (`s3://bucket/prefix`, through the
//! [`object_store`] crate), so that any host can resume any sandbox and a snapshot outlives the
//! loss of a host's disk. The host's [`LocalStore`] stays where sandboxes run from: it is the
//! remote store's cache. A checkpoint commits locally first (as always), then uploads; a resume
//! on a host whose cache lacks the snapshot fetches it first.
//!
//! ## Layout of the bucket (under the prefix)
//!
//! ```text
//! chunks/<64 hex>        a 64 KiB chunk of a snapshot's file, zstd-compressed, named by the
//!                        blake3 hash of its content; written only if absent, shared by every
//!                        snapshot (and host) that has the same content
//! snapshots/<id>         a snapshot: its manifest and its files' chunk indexes, immutable
//!                        (see [`object`])
//! heads/<sandbox id>     the sandbox's latest durable snapshot, and its lease (see [`head`]),
//!                        changed only by compare-and-swap
//! ```
//!
//! An upload writes the chunks, then the snapshot object (of each snapshot of the chain not yet
//! in the bucket, base first), then moves the head: a head never names a snapshot whose
//! objects are not all there, whatever the moment a host dies.
//!
//! ## Leases
//!
//! One host at a time runs a sandbox: creating or resuming one takes its lease (the head's
//! holder), renewed in the background while the sandbox lives, released when it goes to
//! standby, is killed or dropped. Another host's resume meanwhile fails with
//! [`Error::SandboxBusy`] naming the holder; once the lease expires (its holder died or hung)
//! the other host takes the sandbox over, and the old holder is fenced: its next checkpoint is
//! refused with [`Error::LeaseLost`], and its uploads never move the head.
//!
//! ## Durability
//!
//! [`RemoteStore::upload`] queues a snapshot for upload and returns; uploads run in order on a
//! background thread. [`RemoteStore::wait_durable`] waits until one is in the bucket (and
//! retries one that failed). A failed upload loses nothing: its snapshot stays in the local
//! store and is uploaded again by the next wait or [`RemoteStore::sync`].

mod gc;
pub mod head;
pub mod object;
mod sandbox;
pub mod testing;
mod transfer;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak, mpsc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use dormant_core::snapshot::SnapshotId;
use dormant_core::{Error, LocalStore, Result};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{
    ClientOptions, ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    RetryConfig, UpdateVersion,
};
use parking_lot::{Condvar, Mutex};

pub use gc::{DEFAULT_GC_GRACE, RemoteGcReport, VerifyReport};
pub use head::{Head, Holder};
pub use object::SnapshotObject;
pub use sandbox::RemoteSandbox;
pub use transfer::{PullReport, PushReport};

/// Settings of a [`RemoteStore`].
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// The S3 endpoint, e.g. `http://127.0.0.1:8333` (default: AWS, or `$AWS_ENDPOINT_URL`).
    pub endpoint: Option<String>,
    /// The region (default `$AWS_REGION`, else `us-east-1`).
    pub region: Option<String>,
    /// How long a lease lasts unless renewed (default 30 s). A host that dies holding a
    /// sandbox blocks its resume elsewhere for at most this long; the holder renews once a
    /// third of it has passed.
    pub lease_ttl: Duration,
    /// Time limit of one request, and how long a request is retried (default 30 s).
    pub request_timeout: Duration,
    /// Retries of a failed request (default 3).
    pub retries: usize,
    /// Requests in flight at once during an upload or download (default 32).
    pub parallelism: usize,
    /// An upload that finds a chunk already in the bucket but written longer ago than this
    /// (default 1 day) writes it again, refreshing its age, so that a [`gc`](RemoteStore::gc)
    /// with a longer grace period ([`DEFAULT_GC_GRACE`], 7 days) never removes a chunk an
    /// upload in flight is about to reference.
    pub freshen_after: Duration,
    /// Unsigned requests, for a bucket open to anonymous access (default: no; credentials come
    /// from the usual `AWS_*` variables, the shared profile, or the instance's role).
    pub anonymous: bool,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            endpoint: None,
            region: None,
            lease_ttl: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
            retries: 3,
            parallelism: 32,
            freshen_after: Duration::from_secs(24 * 3600),
            anonymous: false,
        }
    }
}

/// Every lease of this process that is still referenced, by token, across all stores: what
/// tells a lease whose sandbox handle was dropped (a new acquisition here waits for its queued
/// uploads and release) from one a live sandbox holds.
static LIVE_LEASES: std::sync::LazyLock<Mutex<HashMap<String, Weak<Lease>>>> =
    std::sync::LazyLock::new(|| Mutex::new(HashMap::new()));

/// Tokens of this process's acquisitions under way (see [`Shared::acquire`]).
static ACQUIRING: std::sync::LazyLock<Mutex<HashSet<String>>> =
    std::sync::LazyLock::new(|| Mutex::new(HashSet::new()));

/// This process's random token in the holders it writes ([`Holder::process`]).
static PROCESS: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("{:016x}", rand::random::<u64>()));

/// What a lease's holder is to this process ([`Shared::held_here`]).
enum Here {
    No,
    Live,
    Dropped(Arc<Lease>),
    Gone,
}

/// Unix time in milliseconds.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(crate) fn remote_err(
    op: &'static str,
    key: impl Into<String>,
    e: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
) -> Error {
    Error::Remote {
        op,
        key: key.into(),
        source: e.into(),
    }
}

/// An object-store snapshot store, with a [`LocalStore`] as its cache. Cheap to clone (one
/// store shared).
#[derive(Debug, Clone)]
pub struct RemoteStore {
    shared: Arc<Shared>,
    /// Uploads to the background thread; the thread ends when the last clone is dropped.
    jobs: Arc<Mutex<mpsc::Sender<Job>>>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    url: String,
    prefix: ObjectPath,
    pub(crate) os: Arc<dyn ObjectStore>,
    pub(crate) rt: tokio::runtime::Runtime,
    pub(crate) cache: Arc<LocalStore>,
    pub(crate) opts: RemoteOptions,
    host: String,
    /// Chunks known to be in the bucket (uploaded or seen by this process), and when this
    /// process learned it: trusted for half of [`RemoteOptions::freshen_after`].
    pub(crate) present: Mutex<HashMap<[u8; 32], std::time::Instant>>,
    /// Snapshot objects known to be in the bucket.
    pub(crate) pushed: Mutex<HashSet<SnapshotId>>,
    uploads: Mutex<HashMap<SnapshotId, Upload>>,
    uploads_changed: Condvar,
    leases: Mutex<Vec<Weak<Lease>>>,
    stop: AtomicBool,
    /// Background renewal paused ([`RemoteStore::pause_renewal`], a test hook).
    renewal_paused: AtomicBool,
    /// Snapshots being imported into the cache by a pull, and its signal when one is done.
    pub(crate) importing: Mutex<HashSet<SnapshotId>>,
    pub(crate) imported: Condvar,
}

/// The state of one snapshot's upload.
#[derive(Debug, Clone)]
enum Upload {
    Queued,
    Done,
    /// Failed, with the lease it was uploaded under (for [`RemoteStore::sync`]).
    Failed(String, Weak<Lease>),
}

#[derive(Debug)]
enum Job {
    Push {
        id: SnapshotId,
        lease: Arc<Lease>,
    },
    Release(Arc<Lease>),
    /// Answered once every job queued before it has run.
    Barrier(mpsc::Sender<()>),
}

/// This host's lease on a sandbox (see the crate's documentation): held from creation or
/// resume, renewed in the background, released at standby, kill or drop.
#[derive(Debug)]
pub struct Lease {
    sandbox_id: String,
    token: String,
    /// Its sandbox handle was dropped: what remains is its queued uploads and release.
    dropped: AtomicBool,
    state: Mutex<LeaseState>,
}

#[derive(Debug)]
struct LeaseState {
    /// The head's version as this host last wrote or read it.
    version: UpdateVersion,
    head: Head,
    /// This host holds the lease (it may still expire if renewal falls behind).
    held: bool,
    /// Another host took the sandbox over: who.
    lost_to: Option<String>,
    /// Release the lease once the queued uploads are in.
    release_when_done: bool,
    /// Uploads of this sandbox queued and not yet done.
    queued: usize,
    /// The order of this lease's uploads: the number each snapshot got when queued (a later
    /// upload, a higher number), so that a late retry never moves the head back.
    order: HashMap<SnapshotId, u64>,
    /// An upload of this lease failed after the one its head names: not released until a
    /// newer one is in.
    failed_since_head: bool,
    /// The last number given, and the number of the snapshot this lease last moved the head to.
    last_order: u64,
    head_order: u64,
}

impl Lease {
    /// The sandbox this lease is on.
    pub fn sandbox_id(&self) -> &str {
        &self.sandbox_id
    }

    /// The sandbox's latest durable snapshot, as this host last saw its head.
    pub fn durable_snapshot(&self) -> Option<SnapshotId> {
        self.state.lock().head.snapshot.clone()
    }

    /// Whether the head says the sandbox was killed (and not checkpointed since).
    pub fn killed(&self) -> bool {
        self.state.lock().head.killed_unix_ms.is_some()
    }
}

impl RemoteStore {
    /// Opens `url` (`s3://bucket` or `s3://bucket/prefix`) with `cache` as the local store.
    /// Credentials come from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (and the other
    /// usual `AWS_*` variables, the profile, the instance's role); requests are unsigned only
    /// with [`RemoteOptions::anonymous`]. Checks that the bucket exists (dormant never creates
    /// one) and that the server honours conditional writes (`If-None-Match`, `If-Match`: the
    /// leases rest on them), writing and removing a probe object under `probes/`.
    ///
    /// Errors: [`Error::InvalidArgument`] for a URL that is not `s3://…`; [`Error::Remote`]
    /// when the bucket cannot be reached or does not exist.
    pub fn open(url: &str, cache: Arc<LocalStore>, opts: RemoteOptions) -> Result<RemoteStore> {
        if opts.lease_ttl < Duration::from_secs(1)
            || opts.request_timeout.is_zero()
            || opts.parallelism == 0
            || opts.freshen_after.is_zero()
        {
            return Err(Error::InvalidArgument(format!(
                "object store options: lease_ttl must be at least 1 s (not {:?}), and \
                 request_timeout, parallelism and freshen_after above zero",
                opts.lease_ttl
            )));
        }
        let Some(rest) = url.strip_prefix("s3://") else {
            return Err(Error::InvalidArgument(format!(
                "{url:?} is not an object-store URL (expected s3://bucket/prefix)"
            )));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(Error::InvalidArgument(format!("{url:?} names no bucket")));
        }
        let prefix = prefix.trim_matches('/');
        let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
        let endpoint = opts
            .endpoint
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok());
        if let Some(ep) = &endpoint {
            b = b
                .with_endpoint(ep.trim_end_matches('/'))
                .with_allow_http(ep.starts_with("http://"))
                .with_virtual_hosted_style_request(false);
        }
        let region = opts
            .region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok())
            .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
            .unwrap_or_else(|| "us-east-1".into());
        b = b.with_region(region);
        if opts.anonymous {
            b = b.with_skip_signature(true);
        }
        let retry = RetryConfig {
            max_retries: opts.retries,
            retry_timeout: opts.request_timeout,
            ..RetryConfig::default()
        };
        let client = ClientOptions::new()
            .with_timeout(opts.request_timeout)
            .with_connect_timeout(Duration::from_secs(5).min(opts.request_timeout))
            .with_allow_http(
                endpoint
                    .as_deref()
                    .is_some_and(|e| e.starts_with("http://")),
            );
        let os = b
            .with_retry(retry)
            .with_client_options(client)
            .build()
            .map_err(|e| remote_err("configure", url, e))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("dormant-remote")
            .enable_all()
            .build()
            .map_err(|e| Error::runtime("start the object-store client", e))?;
        let host = rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned();
        let shared = Arc::new(Shared {
            url: url.to_owned(),
            prefix: ObjectPath::from(prefix),
            os: Arc::new(os),
            rt,
            cache,
            opts,
            host,
            present: Mutex::new(HashMap::new()),
            pushed: Mutex::new(HashSet::new()),
            uploads: Mutex::new(HashMap::new()),
            uploads_changed: Condvar::new(),
            leases: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            renewal_paused: AtomicBool::new(false),
            importing: Mutex::new(HashSet::new()),
            imported: Condvar::new(),
        });
        shared.check_bucket(bucket)?;
        shared.check_conditional_writes()?;
        let (tx, rx) = mpsc::channel();
        let worker = shared.clone();
        std::thread::Builder::new()
            .name("dormant-upload".into())
            .spawn(move || worker.upload_loop(rx))
            .map_err(|e| Error::runtime("start the upload thread", e))?;
        let weak = Arc::downgrade(&shared);
        let period = (shared.opts.lease_ttl / 6).max(Duration::from_millis(50));
        std::thread::Builder::new()
            .name("dormant-lease".into())
            .spawn(move || renew_loop(weak, period))
            .map_err(|e| Error::runtime("start the lease thread", e))?;
        Ok(RemoteStore {
            shared,
            jobs: Arc::new(Mutex::new(tx)),
        })
    }

    /// The URL it was opened with.
    pub fn url(&self) -> &str {
        &self.shared.url
    }

    /// The local store it caches snapshots in (where sandboxes run from).
    pub fn cache(&self) -> &Arc<LocalStore> {
        &self.shared.cache
    }

    /// The lease's time to live.
    pub fn lease_ttl(&self) -> Duration {
        self.shared.opts.lease_ttl
    }

    /// Uploads snapshot `id` of the cache, with the chain it is layered on, unless already in
    /// the bucket; moves no head. Blocks until done.
    pub fn push(&self, id: &SnapshotId) -> Result<PushReport> {
        self.shared.push_chain(id)
    }

    /// Fetches snapshot `id`, with the chain it is layered on, into the cache, unless already
    /// there: the snapshot objects, then the missing chunks, in parallel. Blocks until done.
    pub fn pull(&self, id: &SnapshotId) -> Result<PullReport> {
        self.shared.pull_chain(id)
    }

    /// Reads the head of `sandbox_id`: `None` when the bucket has none.
    pub fn head(&self, sandbox_id: &str) -> Result<Option<Head>> {
        Ok(self.shared.get_head(sandbox_id)?.map(|(h, _)| h))
    }

    /// The ids of every snapshot object in the bucket.
    pub fn list_snapshot_ids(&self) -> Result<Vec<SnapshotId>> {
        self.shared.list_snapshot_ids()
    }

    /// A snapshot object of the bucket, checked.
    pub fn snapshot_object(&self, id: &SnapshotId) -> Result<SnapshotObject> {
        self.shared.get_object(id)
    }

    /// Every object under the prefix: `(key relative to the prefix, bytes)`.
    pub fn list_objects(&self) -> Result<Vec<(String, u64)>> {
        self.shared.list_all()
    }

    /// Test hook: stops (`true`) or resumes (`false`) renewing this store's leases in the
    /// background, as on a host that hangs. [`check`](Self::check) still renews a lease whose
    /// renewal fell behind.
    #[doc(hidden)]
    pub fn pause_renewal(&self, paused: bool) {
        self.shared.renewal_paused.store(paused, Ordering::Relaxed);
    }

    /// Takes the lease of `sandbox_id`. `create`: the sandbox is new (its head must not
    /// exist yet), else the head must exist unless `allow_absent`.
    ///
    /// Errors: [`Error::SandboxBusy`] while another host holds it; [`Error::SandboxNotFound`]
    /// when it has no head and may not be created; [`Error::Remote`].
    pub fn acquire(
        &self,
        sandbox_id: &str,
        create: bool,
        allow_absent: bool,
    ) -> Result<Arc<Lease>> {
        let lease = self.shared.acquire(sandbox_id, create, allow_absent)?;
        let mut leases = self.shared.leases.lock();
        leases.retain(|w| w.strong_count() > 0);
        leases.push(Arc::downgrade(&lease));
        Ok(lease)
    }

    /// Overwrites any object `key` (relative to the prefix) with `bytes`: a test hook, for
    /// tests that damage the bucket on purpose.
    #[doc(hidden)]
    pub fn overwrite_object(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        let k = self.shared.key(key);
        self.shared
            .rt
            .block_on(self.shared.os.put(&k, PutPayload::from(bytes)))
            .map_err(|e| remote_err("write", k.to_string(), e))?;
        Ok(())
    }

    /// Writes a small record object `records/<kind>/<name>` (a template's record), replacing
    /// it. `kind` and `name`: 1 to 64 of `[A-Za-z0-9._-]`, not starting with `.`.
    pub fn put_record(&self, kind: &str, name: &str, bytes: Vec<u8>) -> Result<()> {
        let key = self.shared.record_key(kind, name)?;
        self.shared
            .rt
            .block_on(self.shared.os.put(&key, PutPayload::from(bytes)))
            .map_err(|e| remote_err("write", key.to_string(), e))?;
        Ok(())
    }

    /// Reads record object `records/<kind>/<name>` (at most `cap` bytes): `None` when absent.
    pub fn get_record(&self, kind: &str, name: &str, cap: u64) -> Result<Option<Vec<u8>>> {
        let key = self.shared.record_key(kind, name)?;
        let s = &self.shared;
        match s.rt.block_on(s.get_capped(&key, cap)) {
            Ok(Ok((_, b))) => Ok(Some(b.to_vec())),
            Ok(Err(size)) => Err(remote_err(
                "read",
                key.to_string(),
                format!("{size} bytes, more than {cap}"),
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(remote_err("read", key.to_string(), e)),
        }
    }

    /// This process's newest live lease on `sandbox_id`, if it holds one (released or not):
    /// taken right after creating or resuming a sandbox, the lease that sandbox holds.
    pub fn lease_of(&self, sandbox_id: &str) -> Option<Arc<Lease>> {
        // The newest first: right after an acquisition, the one it took.
        self.shared
            .leases
            .lock()
            .iter()
            .rev()
            .filter_map(Weak::upgrade)
            .find(|l| l.sandbox_id == sandbox_id)
    }

    /// Takes `lease` again after it was released (a sandbox woken from standby in the process
    /// that put it there); nothing to do while it is still held. Cancels a release still
    /// waiting for uploads.
    pub fn reacquire(&self, lease: &Arc<Lease>) -> Result<()> {
        self.shared.reacquire(lease)
    }

    /// Refuses, with [`Error::LeaseLost`], when another host has taken `lease`'s sandbox over;
    /// what a checkpoint checks first. Reads the head when the lease's renewal has fallen
    /// behind (this process was stopped or starved).
    pub fn check(&self, lease: &Lease) -> Result<()> {
        self.shared.check(lease)
    }

    /// Queues snapshot `id` of `lease`'s sandbox for upload; the head moves to it once it is
    /// in the bucket. With `release`, the lease is released after (a standby).
    pub fn upload(&self, lease: &Arc<Lease>, id: &SnapshotId, release: bool) {
        {
            let mut st = lease.state.lock();
            st.queued += 1;
            st.release_when_done = release;
            st.last_order += 1;
            let n = st.last_order;
            st.order.insert(id.clone(), n);
        }
        self.shared
            .uploads
            .lock()
            .insert(id.clone(), Upload::Queued);
        let sent = self.jobs.lock().send(Job::Push {
            id: id.clone(),
            lease: lease.clone(),
        });
        if sent.is_err() {
            lease.state.lock().queued -= 1;
            self.shared.uploads.lock().insert(
                id.clone(),
                Upload::Failed(
                    "the upload thread has stopped".into(),
                    Arc::downgrade(lease),
                ),
            );
            self.shared.uploads_changed.notify_all();
        }
    }

    /// Waits until snapshot `id`'s upload is done and the head names it (or a newer one); an
    /// upload that failed is run again now. Errors: [`Error::InvalidArgument`] for a snapshot
    /// this lease did not queue ([`upload`](Self::upload)); what the upload met
    /// ([`Error::Remote`], [`Error::LeaseLost`]); the snapshot stays in the local store either
    /// way.
    pub fn wait_durable(&self, lease: &Arc<Lease>, id: &SnapshotId) -> Result<()> {
        if !lease.state.lock().order.contains_key(id) {
            return Err(Error::InvalidArgument(format!(
                "snapshot {id} is not an upload of sandbox {:?} under this lease",
                lease.sandbox_id
            )));
        }
        let mut uploads = self.shared.uploads.lock();
        loop {
            match uploads.get(id) {
                Some(Upload::Done) => return Ok(()),
                Some(Upload::Queued) => self.shared.uploads_changed.wait(&mut uploads),
                Some(Upload::Failed(..)) | None => {
                    drop(uploads);
                    let release = lease.state.lock().release_when_done;
                    return self.shared.push_and_commit(lease, id, release, false);
                }
            }
        }
    }

    /// Records in the head that `lease`'s sandbox was killed, and releases the lease: a
    /// resume by id on any host then finds nothing ([`Error::SandboxNotFound`]), and uploads
    /// still queued of snapshots taken before the kill no longer move the head. A snapshot
    /// taken after it (of a resume by snapshot id) brings the sandbox back, as in a local store.
    pub fn kill(&self, lease: &Arc<Lease>) -> Result<()> {
        let mut st = lease.state.lock();
        st.release_when_done = true;
        let now = now_ms();
        self.shared.update_head(lease, &mut st, |h| {
            h.killed_unix_ms = Some(now);
            h.holder = None;
            h.expires_unix_ms = 0;
        })?;
        st.held = false;
        Ok(())
    }

    /// Releases `lease`: at once when none of its uploads is queued, else once they are done
    /// (in order).
    pub fn release(&self, lease: &Arc<Lease>) {
        let mut st = lease.state.lock();
        st.release_when_done = true;
        if st.failed_since_head {
            // A snapshot it took is only local: kept (renewed while its handle lives, else
            // expiring), never released onto an older head.
            return;
        }
        if st.queued == 0 {
            // Nothing to wait for: released now, so that another host (or another handle of
            // this process) can take the sandbox as soon as this returns.
            if let Err(e) = self.shared.release_now(lease, &mut st) {
                tracing::warn!(sandbox = %lease.sandbox_id, error = %e, "lease release failed; it expires by itself");
            }
            return;
        }
        drop(st);
        let _ = self.jobs.lock().send(Job::Release(lease.clone()));
    }

    /// Releases `lease` on the upload thread, after its queued uploads, without waiting (what
    /// dropping a [`RemoteSandbox`] does: no network request on the dropping thread).
    pub fn release_later(&self, lease: &Arc<Lease>) {
        lease.dropped.store(true, Ordering::Relaxed);
        lease.state.lock().release_when_done = true;
        let _ = self.jobs.lock().send(Job::Release(lease.clone()));
    }

    /// Waits until every upload and release queued so far is done (or failed); returns the
    /// failed uploads.
    pub fn flush(&self) -> Vec<(SnapshotId, String)> {
        // Every job queued so far, releases included, then the uploads' outcomes.
        let (tx, rx) = mpsc::channel();
        if self.jobs.lock().send(Job::Barrier(tx)).is_ok() {
            let _ = rx.recv();
        }
        let mut uploads = self.shared.uploads.lock();
        while uploads.values().any(|u| matches!(u, Upload::Queued)) {
            self.shared.uploads_changed.wait(&mut uploads);
        }
        uploads
            .iter()
            .filter_map(|(id, u)| match u {
                Upload::Failed(e, _) => Some((id.clone(), e.clone())),
                _ => None,
            })
            .collect()
    }

    /// Retries every failed upload of this process, waiting for each: `Ok` when all are in
    /// and their sandboxes' heads moved (as [`wait_durable`](Self::wait_durable)), else the
    /// first error met (the others are still tried).
    pub fn sync(&self) -> Result<()> {
        self.flush();
        let mut failed: Vec<(SnapshotId, Weak<Lease>)> = self
            .shared
            .uploads
            .lock()
            .iter()
            .filter_map(|(id, u)| match u {
                Upload::Failed(_, lease) => Some((id.clone(), lease.clone())),
                _ => None,
            })
            .collect();
        // Oldest first (ids sort by creation time).
        failed.sort_by(|a, b| a.0.cmp(&b.0));
        let mut first_err = None;
        for (id, lease) in failed {
            let r = match lease.upgrade() {
                Some(lease) => {
                    let release = lease.state.lock().release_when_done;
                    self.shared.push_and_commit(&lease, &id, release, false)
                }
                // The sandbox is gone with its lease: its objects go in, no head moves.
                None => self.shared.push_chain(&id).map(|_| {
                    self.shared.uploads.lock().insert(id, Upload::Done);
                }),
            };
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for RemoteStore {
    fn drop(&mut self) {
        if Arc::strong_count(&self.jobs) == 1 {
            self.shared.stop.store(true, Ordering::Relaxed);
        }
    }
}

/// The key of a sandbox's head. A sandbox id is 1 to 128 of `[A-Za-z0-9._-]`, not starting
/// with `.` (what dormant makes); anything else names no sandbox
/// ([`Error::SandboxNotFound`]).
fn head_key(s: &Shared, sandbox_id: &str) -> Result<ObjectPath> {
    let ok = dormant_core::sandbox_dirs::valid_sandbox_id(sandbox_id);
    if !ok {
        return Err(Error::SandboxNotFound(sandbox_id.to_owned()));
    }
    Ok(s.key(&format!("heads/{sandbox_id}")))
}

fn renew_loop(shared: Weak<Shared>, period: Duration) {
    loop {
        std::thread::sleep(period);
        let Some(s) = shared.upgrade() else { return };
        if s.stop.load(Ordering::Relaxed) {
            return;
        }
        if s.renewal_paused.load(Ordering::Relaxed) {
            continue;
        }
        let leases: Vec<Arc<Lease>> = s.leases.lock().iter().filter_map(Weak::upgrade).collect();
        for l in leases {
            if let Err(e) = s.renew(&l) {
                tracing::warn!(sandbox = %l.sandbox_id, error = %e, "lease renewal failed");
            }
        }
    }
}

impl Shared {
    pub(crate) fn key(&self, rel: &str) -> ObjectPath {
        let mut parts: Vec<object_store::path::PathPart<'_>> = self.prefix.parts().collect();
        for p in rel.split('/') {
            parts.push(object_store::path::PathPart::from(p));
        }
        ObjectPath::from_iter(parts)
    }

    /// GETs object `key` whole if it is at most `cap` bytes: `Ok(Err(size))` for a larger one,
    /// which is not read (a hostile bucket's). Errors as `object_store` reports them
    /// (`NotFound` for no such object).
    pub(crate) async fn get_capped(
        &self,
        key: &ObjectPath,
        cap: u64,
    ) -> object_store::Result<std::result::Result<(ObjectMeta, Bytes), u64>> {
        let got = self.os.get(key).await?;
        if got.meta.size > cap {
            return Ok(Err(got.meta.size));
        }
        let meta = got.meta.clone();
        got.bytes().await.map(|b| Ok((meta, b)))
    }

    fn record_key(&self, kind: &str, name: &str) -> Result<ObjectPath> {
        let ok = dormant_core::sandbox_dirs::valid_name;
        if !ok(kind) || !ok(name) {
            return Err(Error::InvalidArgument(format!(
                "{kind:?}/{name:?} cannot name a record object"
            )));
        }
        Ok(self.key(&format!("records/{kind}/{name}")))
    }

    /// Refuses a server that ignores conditional writes: a create of an existing object, and
    /// an update on a stale ETag, must both fail.
    fn check_conditional_writes(&self) -> Result<()> {
        let key = self.key(&format!("probes/{:016x}", rand::random::<u64>()));
        let put = |mode: PutMode, body: &'static [u8]| {
            let opts = PutOptions {
                mode,
                ..PutOptions::default()
            };
            self.rt
                .block_on(self.os.put_opts(&key, PutPayload::from_static(body), opts))
        };
        let result = (|| {
            let first =
                put(PutMode::Create, b"1").map_err(|e| remote_err("probe", key.to_string(), e))?;
            let stale = UpdateVersion {
                e_tag: Some("\"0000000000000000\"".into()),
                version: None,
            };
            let again = put(PutMode::Create, b"2");
            let stale_update = put(PutMode::Update(stale), b"3");
            drop(first);
            match (again, stale_update) {
                (
                    Err(object_store::Error::AlreadyExists { .. }),
                    Err(object_store::Error::Precondition { .. }),
                ) => Ok(()),
                (Err(e @ object_store::Error::Generic { .. }), _)
                | (_, Err(e @ object_store::Error::Generic { .. })) => {
                    Err(remote_err("probe", key.to_string(), e))
                }
                _ => Err(remote_err(
                    "probe",
                    key.to_string(),
                    "the server does not honour conditional writes (If-None-Match / If-Match), \
                     on which one host at a time per sandbox rests: use a server that does \
                     (AWS S3, MinIO, SeaweedFS 4.48, ...)",
                )),
            }
        })();
        let _ = self.rt.block_on(self.os.delete(&key));
        result
    }

    fn check_bucket(&self, bucket: &str) -> Result<()> {
        let r = self
            .rt
            .block_on(self.os.list_with_delimiter(Some(&self.key("heads"))));
        match r {
            Ok(_) => Ok(()),
            Err(e) => {
                let text = format!("{e:?}");
                let hint = if text.contains("NoSuchBucket")
                    || matches!(e, object_store::Error::NotFound { .. })
                {
                    format!(
                        "bucket {bucket:?} does not exist (dormant does not create buckets: create it first): {e}"
                    )
                } else {
                    e.to_string()
                };
                Err(remote_err("open", &self.url, hint))
            }
        }
    }

    fn get_head(&self, sandbox_id: &str) -> Result<Option<(Head, UpdateVersion)>> {
        let key = head_key(self, sandbox_id)?;
        let r = self
            .rt
            .block_on(self.get_capped(&key, head::MAX_HEAD_LEN as u64));
        match r {
            Ok(Ok((meta, bytes))) => {
                let version = UpdateVersion {
                    e_tag: meta.e_tag,
                    version: meta.version,
                };
                Head::decode(&bytes, sandbox_id)
                    .map(|h| Some((h, version)))
                    .map_err(|bad| remote_err("read head", key.to_string(), bad))
            }
            Ok(Err(size)) => Err(remote_err(
                "read head",
                key.to_string(),
                format!("head of {size} bytes"),
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(remote_err("read head", key.to_string(), e)),
        }
    }

    /// Writes a head with `mode`; `Ok(None)` when the precondition failed.
    fn put_head(&self, head: &Head, mode: PutMode) -> Result<Option<UpdateVersion>> {
        let key = head_key(self, &head.sandbox_id)?;
        let opts = PutOptions {
            mode,
            ..PutOptions::default()
        };
        let r = self.rt.block_on(
            self.os
                .put_opts(&key, PutPayload::from(head.encode()), opts),
        );
        match r {
            Ok(res) => Ok(Some(UpdateVersion {
                e_tag: res.e_tag,
                version: res.version,
            })),
            Err(
                object_store::Error::Precondition { .. }
                | object_store::Error::AlreadyExists { .. },
            ) => Ok(None),
            Err(e) => Err(remote_err("write head", key.to_string(), e)),
        }
    }

    fn holder(&self, token: &str) -> Holder {
        Holder {
            host: self.host.clone(),
            pid: std::process::id(),
            token: token.to_owned(),
            process: PROCESS.clone(),
        }
    }

    fn busy(&self, h: &Head, holder: &Holder) -> Error {
        Error::SandboxBusy {
            sandbox_id: h.sandbox_id.clone(),
            holder: holder.to_string(),
            expires_in: Duration::from_millis(h.expires_unix_ms.saturating_sub(now_ms())),
        }
    }

    fn acquire(&self, sandbox_id: &str, create: bool, allow_absent: bool) -> Result<Arc<Lease>> {
        let token = format!("{:016x}", rand::random::<u64>());
        // Live from its first write on: another acquisition in this process that reads the
        // head between this one's write and its lease's registration must see it held.
        ACQUIRING.lock().insert(token.clone());
        let r = self.acquire_as(sandbox_id, create, allow_absent, &token);
        ACQUIRING.lock().remove(&token);
        r
    }

    fn acquire_as(
        &self,
        sandbox_id: &str,
        create: bool,
        allow_absent: bool,
        token: &str,
    ) -> Result<Arc<Lease>> {
        let token = token.to_owned();
        for _ in 0..8 {
            let now = now_ms();
            let ttl = self.opts.lease_ttl.as_millis() as u64;
            match self.get_head(sandbox_id)? {
                None => {
                    if !create && !allow_absent {
                        return Err(Error::SandboxNotFound(sandbox_id.to_owned()));
                    }
                    let head = Head {
                        version: head::HEAD_VERSION,
                        sandbox_id: sandbox_id.to_owned(),
                        snapshot: None,
                        generation: 1,
                        holder: Some(self.holder(&token)),
                        expires_unix_ms: now + ttl,
                        updated_unix_ms: now,
                        killed_unix_ms: None,
                    };
                    if let Some(version) = self.put_head(&head, PutMode::Create)? {
                        return Ok(self.new_lease(head, version, token));
                    }
                }
                Some((h, version)) => {
                    if create {
                        return Err(Error::InvalidArgument(format!(
                            "sandbox {sandbox_id:?} already has a head in {}",
                            self.url
                        )));
                    }
                    if let Some(other) = h.other_live_holder(&token, now) {
                        match self.held_here(other) {
                            // Not this process's, or a live sandbox of it holds it.
                            Here::No | Here::Live => return Err(self.busy(&h, other)),
                            // A sandbox handle of this process dropped it: its uploads and
                            // release are queued; once they are in, it is free.
                            Here::Dropped(old) => {
                                self.wait_released(&old);
                                continue;
                            }
                            // A lease of this process that nothing holds any more (its release
                            // done meanwhile, or failed): taken over below.
                            Here::Gone => {}
                        }
                    }
                    let head = Head {
                        generation: h.generation.saturating_add(1),
                        holder: Some(self.holder(&token)),
                        expires_unix_ms: now + ttl,
                        updated_unix_ms: now,
                        ..h
                    };
                    if let Some(version) = self.put_head(&head, PutMode::Update(version))? {
                        return Ok(self.new_lease(head, version, token));
                    }
                }
            }
        }
        // Lost every race: someone else holds it now.
        match self.get_head(sandbox_id)? {
            Some((h, _)) if h.holder.is_some() => {
                let holder = h.holder.clone().expect("checked");
                Err(self.busy(&h, &holder))
            }
            _ => Err(remote_err(
                "take the lease of",
                sandbox_id,
                "the head kept changing under this host",
            )),
        }
    }

    /// What `holder` is to this process: another process's lease, one of its live
    /// sandboxes', one whose sandbox handle was dropped (its queued uploads and release still
    /// to run on the upload thread), or one nothing here holds any more.
    fn held_here(&self, holder: &Holder) -> Here {
        if holder.process != *PROCESS {
            return Here::No;
        }
        if ACQUIRING.lock().contains(&holder.token) {
            return Here::Live;
        }
        match LIVE_LEASES
            .lock()
            .get(&holder.token)
            .and_then(Weak::upgrade)
        {
            None => Here::Gone,
            Some(l) if l.dropped.load(Ordering::Relaxed) => Here::Dropped(l),
            Some(_) => Here::Live,
        }
    }

    /// Waits (bounded by the requests' own time limits) until a dropped lease of this process
    /// is released or lost.
    fn wait_released(&self, lease: &Lease) {
        let limit = self.opts.request_timeout * (self.opts.retries as u32 + 1) * 2;
        let t0 = std::time::Instant::now();
        while t0.elapsed() < limit {
            {
                let st = lease.state.lock();
                if !st.held || st.lost_to.is_some() {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn new_lease(&self, head: Head, version: UpdateVersion, token: String) -> Arc<Lease> {
        let lease = Arc::new(Lease {
            sandbox_id: head.sandbox_id.clone(),
            token,
            dropped: AtomicBool::new(false),
            state: Mutex::new(LeaseState {
                version,
                head,
                held: true,
                lost_to: None,
                release_when_done: false,
                queued: 0,
                order: HashMap::new(),
                failed_since_head: false,
                last_order: 0,
                head_order: 0,
            }),
        });
        let mut live = LIVE_LEASES.lock();
        live.retain(|_, w| w.strong_count() > 0);
        live.insert(lease.token.clone(), Arc::downgrade(&lease));
        lease
    }

    /// Writes `change` of the head under `lease`, held, by compare-and-swap; on a conflict
    /// re-reads the head: still this host's (its renewal raced) → retried; another host's →
    /// the lease is lost ([`Error::LeaseLost`]).
    fn update_head(
        &self,
        lease: &Lease,
        st: &mut LeaseState,
        change: impl Fn(&mut Head),
    ) -> Result<()> {
        if let Some(who) = &st.lost_to {
            return Err(self.lost(lease, who));
        }
        for _ in 0..8 {
            let mut head = st.head.clone();
            change(&mut head);
            head.updated_unix_ms = now_ms();
            if let Some(v) = self.put_head(&head, PutMode::Update(st.version.clone()))? {
                st.version = v;
                st.head = head;
                return Ok(());
            }
            match self.get_head(&lease.sandbox_id)? {
                Some((h, v))
                    if h.generation == st.head.generation
                        && h.holder.as_ref().is_some_and(|x| x.token == lease.token) =>
                {
                    st.head = h;
                    st.version = v;
                }
                Some((h, _)) => {
                    let who = h
                        .holder
                        .as_ref()
                        .map_or_else(|| "another host".to_owned(), |x| x.to_string());
                    st.lost_to = Some(who.clone());
                    st.held = false;
                    return Err(self.lost(lease, &who));
                }
                None => {
                    st.lost_to = Some("nobody (its head was removed)".into());
                    st.held = false;
                    return Err(self.lost(lease, "nobody (its head was removed)"));
                }
            }
        }
        Err(remote_err(
            "update the head of",
            lease.sandbox_id.clone(),
            "the head kept changing under this host",
        ))
    }

    fn lost(&self, lease: &Lease, who: &str) -> Error {
        Error::LeaseLost {
            sandbox_id: lease.sandbox_id.clone(),
            holder: who.to_owned(),
        }
    }

    fn renew(&self, lease: &Lease) -> Result<()> {
        let mut st = lease.state.lock();
        if !st.held || st.lost_to.is_some() {
            return Ok(());
        }
        let ttl = self.opts.lease_ttl.as_millis() as u64;
        if st.head.expires_unix_ms > now_ms() + ttl * 2 / 3 {
            return Ok(());
        }
        self.update_head(lease, &mut st, |h| h.expires_unix_ms = now_ms() + ttl)
    }

    fn check(&self, lease: &Lease) -> Result<()> {
        let mut st = lease.state.lock();
        if let Some(who) = &st.lost_to {
            return Err(self.lost(lease, who));
        }
        if !st.held {
            return Err(Error::InvalidArgument(format!(
                "this host released its lease on sandbox {:?}",
                lease.sandbox_id
            )));
        }
        self.extend_if_behind(lease, &mut st)
    }

    /// Extends a held lease by a write to its head when its renewal fell behind (this process
    /// stalled or was starved: under a third of its time to live left), which also finds out
    /// whether another host took it over meanwhile ([`Error::LeaseLost`]).
    fn extend_if_behind(&self, lease: &Lease, st: &mut LeaseState) -> Result<()> {
        let ttl = self.opts.lease_ttl.as_millis() as u64;
        if st.head.expires_unix_ms <= now_ms() + ttl / 3 {
            self.update_head(lease, st, |h| h.expires_unix_ms = now_ms() + ttl)?;
        }
        Ok(())
    }

    fn reacquire(&self, lease: &Lease) -> Result<()> {
        let mut st = lease.state.lock();
        st.release_when_done = false;
        if let Some(who) = &st.lost_to {
            return Err(self.lost(lease, who));
        }
        if st.held {
            return self.extend_if_behind(lease, &mut st);
        }
        let (h, version) = self
            .get_head(&lease.sandbox_id)?
            .ok_or_else(|| Error::SandboxNotFound(lease.sandbox_id.clone()))?;
        let now = now_ms();
        if let Some(other) = h.other_live_holder(&lease.token, now) {
            return Err(self.busy(&h, other));
        }
        let head = Head {
            generation: h.generation.saturating_add(1),
            holder: Some(self.holder(&lease.token)),
            expires_unix_ms: now + self.opts.lease_ttl.as_millis() as u64,
            updated_unix_ms: now,
            ..h
        };
        match self.put_head(&head, PutMode::Update(version))? {
            Some(v) => {
                st.head = head;
                st.version = v;
                st.held = true;
                Ok(())
            }
            None => {
                let (h, _) = self
                    .get_head(&lease.sandbox_id)?
                    .ok_or_else(|| Error::SandboxNotFound(lease.sandbox_id.clone()))?;
                let holder = h.holder.clone().unwrap_or_else(|| self.holder("?"));
                Err(self.busy(&h, &holder))
            }
        }
    }

    /// Releases the lease if held (the head keeps its snapshot; its holder is cleared).
    fn release_now(&self, lease: &Lease, st: &mut LeaseState) -> Result<()> {
        if !st.held || st.lost_to.is_some() {
            return Ok(());
        }
        self.update_head(lease, st, |h| {
            h.holder = None;
            h.expires_unix_ms = 0;
        })?;
        st.held = false;
        Ok(())
    }

    /// Uploads `id` and moves the head of `lease`'s sandbox to it; with `release`, also
    /// releases the lease (in the same write) if no later upload of it is queued. `queued`: a
    /// job of the queue (counted in the lease's `queued`; the upload thread lowers the count).
    fn push_and_commit(
        &self,
        lease: &Arc<Lease>,
        id: &SnapshotId,
        release: bool,
        queued: bool,
    ) -> Result<()> {
        let r = (|| {
            if let Some(who) = &lease.state.lock().lost_to {
                return Err(self.lost(lease, who));
            }
            // Only this lease's own uploads move its head (never another sandbox's snapshot,
            // nor one this lease did not take).
            let Some(order) = lease.state.lock().order.get(id).copied() else {
                return Err(Error::InvalidArgument(format!(
                    "snapshot {id} is not an upload of sandbox {:?} under this lease",
                    lease.sandbox_id
                )));
            };
            self.push_chain(id)?;
            let mut st = lease.state.lock();
            // The last upload still to run (a retry outside the queue counts none).
            let last = st.queued <= usize::from(queued);
            let held = st.held;
            // A retry of an upload older than the one the head names leaves the head there;
            // so does a snapshot taken before the sandbox was killed.
            let before_kill = match st.head.killed_unix_ms {
                Some(k) => self.cache.manifest(id)?.created_unix_ms <= k,
                None => false,
            };
            let newer = order >= st.head_order && !before_kill;
            // Released only if nothing it took is left only local: a newer head covers an
            // older failed upload (its chain holds it).
            let covered = newer || !st.failed_since_head;
            let release = release && st.release_when_done && last && covered;
            if newer || release {
                self.update_head(lease, &mut st, |h| {
                    if newer {
                        h.snapshot = Some(id.clone());
                        h.killed_unix_ms = None;
                    }
                    if release {
                        h.holder = None;
                        h.expires_unix_ms = 0;
                    }
                })?;
            }
            if newer {
                st.head_order = order;
                st.failed_since_head = false;
            }
            if release && held {
                st.held = false;
            }
            Ok(())
        })();
        if r.is_err() {
            // Not released while a snapshot it took after its head's is only local: the head
            // would name an older state for the next holder. If its handle goes, the lease
            // expires instead.
            let mut st = lease.state.lock();
            if st.order.get(id).is_some_and(|&n| n > st.head_order) {
                st.failed_since_head = true;
            }
        }
        let mut uploads = self.uploads.lock();
        uploads.insert(
            id.clone(),
            match &r {
                Ok(()) => Upload::Done,
                Err(e) => Upload::Failed(e.to_string(), Arc::downgrade(lease)),
            },
        );
        self.uploads_changed.notify_all();
        r
    }

    fn upload_loop(self: Arc<Self>, rx: mpsc::Receiver<Job>) {
        while let Ok(job) = rx.recv() {
            match job {
                Job::Push { id, lease } => {
                    let release = lease.state.lock().release_when_done;
                    // A failed request is retried twice, after 1 and 3 s (the server restarting,
                    // a network blip); then the upload waits for `wait_durable` or `sync`.
                    let mut tries = 0;
                    let r = loop {
                        let attempt =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                self.push_and_commit(&lease, &id, release, true)
                            }))
                            .unwrap_or_else(|_| {
                                let e = Error::runtime("upload a snapshot", "the upload panicked");
                                self.uploads.lock().insert(
                                    id.clone(),
                                    Upload::Failed(e.to_string(), Arc::downgrade(&lease)),
                                );
                                self.uploads_changed.notify_all();
                                Err(e)
                            });
                        match attempt {
                            Err(Error::Remote { .. }) if tries < 2 => {
                                tries += 1;
                                // Still under way for those who wait for it.
                                self.uploads.lock().insert(id.clone(), Upload::Queued);
                                std::thread::sleep(Duration::from_secs(2 * tries - 1));
                            }
                            r => break r,
                        }
                    };
                    {
                        let mut st = lease.state.lock();
                        st.queued = st.queued.saturating_sub(1);
                    }
                    if let Err(e) = r {
                        tracing::warn!(snapshot = %id, error = %e, "upload failed; the snapshot stays in the local store");
                    }
                }
                Job::Barrier(done) => {
                    let _ = done.send(());
                }
                Job::Release(lease) => {
                    let mut st = lease.state.lock();
                    if st.release_when_done
                        && st.queued == 0
                        && !st.failed_since_head
                        && let Err(e) = self.release_now(&lease, &mut st)
                    {
                        tracing::warn!(sandbox = %lease.sandbox_id, error = %e, "lease release failed; it expires by itself");
                    }
                }
            }
        }
    }
}
