//! Where the time of a Python session's first call after a resume goes: `cargo run --release
//! -p dormant-wasi --example first_call -- [ROUNDS]`. Builds a pandas session (200,000 rows),
//! puts it in standby, then each round resumes it in process and times the handle, the first
//! trivial cell (`len(df)`) and a second one (their page faults beside), after 20 times as
//! many resumes released at once; then incremental checkpoints after a small cell, with and
//! without fsync.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use dormant_core::snapshot::store::Durability;
use dormant_core::{LocalStore, Sandbox, SandboxSpec};
use dormant_wasi::WasiRuntime;

const DATA: &str = "import numpy as np, pandas as pd\n\
rng = np.random.default_rng(7)\n\
df = pd.DataFrame({'customer': rng.integers(0, 5000, 200_000), 'amount': rng.gamma(2.0, 30.0, 200_000), 'day': rng.integers(0, 365, 200_000)})\n\
df['weekday'] = df.day % 7\n\
features = df.groupby('customer').amount.agg(['sum', 'size'])";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        // A new process: resume the snapshot, answer, print the two times (µs).
        let t = Instant::now();
        let store = Arc::new(LocalStore::open(&args[2]).unwrap());
        let rt = WasiRuntime::new().unwrap();
        let mut sb = rt.resume(store, &args[3].parse().unwrap()).unwrap();
        let resumed = t.elapsed();
        assert_eq!(sb.run_code("len(df)").unwrap().stdout, "200000\n");
        println!("{} {}", resumed.as_micros(), t.elapsed().as_micros());
        return;
    }
    let rounds: usize = args.get(1).map_or(10, |s| s.parse().unwrap());
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::open(tmp.path().join("store")).unwrap());
    let rt = WasiRuntime::new().unwrap();
    rt.prepare_python().unwrap();
    let mut py = rt.create(store.clone(), SandboxSpec::python()).unwrap();
    assert!(py.run_code(DATA).unwrap().error.is_none());
    let snap = py.standby().unwrap();
    // Resume and release alone, many times: what a process that wakes sessions all day pays.
    let (mut resume_only, mut release) = (Vec::new(), Vec::new());
    for _ in 0..rounds * 20 {
        let t = Instant::now();
        let sb = rt.resume(store.clone(), &snap).unwrap();
        resume_only.push(t.elapsed());
        let t = Instant::now();
        drop(sb);
        release.push(t.elapsed());
    }
    let (mut handle, mut first, mut second) = (Vec::new(), Vec::new(), Vec::new());
    let (mut faults_first, mut faults_second) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        let mut sb = rt.resume(store.clone(), &snap).unwrap();
        handle.push(t.elapsed());
        let r0 = rollup();
        let (t, f) = (Instant::now(), minor_faults());
        assert_eq!(sb.run_code("len(df)").unwrap().stdout, "200000\n");
        first.push(t.elapsed());
        let r1 = rollup();
        if std::env::var_os("XROLL").is_some() {
            eprintln!("rss +{} KiB, anonymous +{} KiB", r1.0 - r0.0, r1.1 - r0.1);
        }
        faults_first.push(minor_faults() - f);
        let (t, f) = (Instant::now(), minor_faults());
        assert_eq!(sb.run_code("len(df)").unwrap().stdout, "200000\n");
        second.push(t.elapsed());
        faults_second.push(minor_faults() - f);
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    println!(
        "resume to handle alone {:.3?}, its release {:.3?} (medians of {})",
        median(&mut resume_only),
        median(&mut release),
        rounds * 20
    );
    // An incremental checkpoint after a small cell, with and without fsync.
    for durability in [Durability::Sync, Durability::ProcessCrash] {
        let store = Arc::new(
            LocalStore::open(tmp.path().join("store"))
                .unwrap()
                .with_durability(durability),
        );
        let mut sb = rt.resume(store.clone(), &snap).unwrap();
        let mut ckpt = Vec::new();
        for i in 0..rounds {
            sb.run_code(&format!("turn = {i}")).unwrap();
            let t = Instant::now();
            sb.checkpoint().unwrap();
            ckpt.push(t.elapsed());
        }
        println!(
            "checkpoint after a small cell, {durability:?}: {:.3?} (median of {rounds})",
            median(&mut ckpt)
        );
    }
    // A new process each time: runtime start, resume, answer.
    let (mut child_resume, mut child_answer, mut child_total) =
        (Vec::new(), Vec::new(), Vec::new());
    let exe = std::env::current_exe().unwrap();
    let store_dir = tmp.path().join("store");
    for _ in 0..rounds.min(10) {
        let t = Instant::now();
        let out = std::process::Command::new(&exe)
            .args(["--child", store_dir.to_str().unwrap(), &snap.to_string()])
            .output()
            .unwrap();
        child_total.push(t.elapsed());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let mut it = text
            .split_whitespace()
            .map(|v| Duration::from_micros(v.parse().unwrap()));
        child_resume.push(it.next().unwrap());
        child_answer.push(it.next().unwrap());
    }
    println!(
        "new process: runtime + resume {:.3?}, + answer {:.3?}, whole process {:.3?} (medians of {})",
        median(&mut child_resume),
        median(&mut child_answer),
        median(&mut child_total),
        rounds.min(10)
    );
    faults_first.sort();
    faults_second.sort();
    println!(
        "resume to handle {:.3?} | first len(df) {:.3?}, {} page faults | second {:.3?}, {} \
         page faults (medians of {rounds})",
        median(&mut handle),
        median(&mut first),
        faults_first[rounds / 2],
        median(&mut second),
        faults_second[rounds / 2],
    );
}

fn rollup() -> (i64, i64) {
    let t = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap();
    let get = |k: &str| {
        t.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap()
            .parse::<i64>()
            .unwrap()
    };
    (get("Rss:"), get("Anonymous:"))
}

/// This process's minor page faults so far.
fn minor_faults() -> i64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one rusage into the valid pointer it is given.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) };
    // SAFETY: zero-initialised, then filled by getrusage.
    unsafe { ru.assume_init() }.ru_minflt
}
