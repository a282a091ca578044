//! Scenario 1, the data-analysis agent (WASI tier): a Python sandbox builds a pandas DataFrame
//! and answers; the follow-up question is then timed three ways: **cold** (create and redo it
//! all in a fresh sandbox), **dormant in process** (`WasiRuntime::resume` of the standby
//! snapshot) and **dormant in a new process** (this binary spawned as `child-wasi`, which
//! resumes the snapshot and answers; timed from spawn to exit).

use std::sync::Arc;

use dormant::{LocalStore, Sandbox, SandboxSpec, WasiRuntime, WasiSandbox};

use crate::Res;
use crate::ctx::Ctx;
use crate::stats::{Stats, fmt, ratio, time};
use crate::workloads::run_ok;

/// Scenario 1's first request: a 1,000,000-row table (`{rows}`), derived features, an answer.
const ANALYSIS: &str = "import numpy as np, pandas as pd
rng = np.random.default_rng(7)
n = {rows}
df = pd.DataFrame({'customer': rng.integers(0, 20000, n), 'amount': rng.gamma(2.0, 30.0, n), 'day': rng.integers(0, 365, n)})
df['weekday'] = df.day % 7
df['weekend'] = df.weekday >= 5
features = df.groupby('customer').agg(total=('amount', 'sum'), visits=('amount', 'size'), weekend_share=('weekend', 'mean'))
print(features.total.nlargest(5).index.tolist())";
/// Scenario 1's follow-up question.
const FOLLOW_UP: &str =
    "print(round(float(features[features.visits > 40].weekend_share.mean()), 4))";

pub fn run(cx: &mut Ctx) -> Res<()> {
    let rows = if cx.opts.quick { 100_000 } else { 1_000_000 };
    let (cold_n, warm_n) = if cx.opts.quick { (1, 3) } else { (3, 10) };
    cx.report.section(
        "1. Data-analysis agent (WASI tier)",
        &format!(
            "First request: `create` a Python sandbox, build a {rows}-row DataFrame, derive \
             per-customer features, answer (from the create call to the answer returned). \
             Second request, a follow-up question: **cold** = all of that again in a fresh \
             sandbox, then the follow-up; **dormant, in process** = `WasiRuntime::resume` of \
             the standby snapshot, then the follow-up; **dormant, new process** = spawning a \
             fresh host process that resumes the snapshot and answers the follow-up, timed \
             from spawn to its exit (process start and runtime start-up included)."
        ),
    );
    let analysis = ANALYSIS.replace("{rows}", &rows.to_string());
    let first = || -> Res<WasiSandbox> {
        let mut sb = cx.rt.create(cx.store.clone(), SandboxSpec::python())?;
        run_ok(&mut sb, &analysis)?;
        Ok(sb)
    };
    let (sb, first_t) = time(first);
    let mut sb = sb?;
    let expected = run_ok(&mut sb, FOLLOW_UP)?;
    let snap = sb.standby()?;
    let mut cold = Vec::new();
    for _ in 0..cold_n {
        let (v, t) = time(|| -> Res<String> {
            let mut sb = first()?;
            let a = run_ok(&mut sb, FOLLOW_UP)?;
            sb.kill()?;
            Ok(a)
        });
        assert_eq!(v?, expected);
        cold.push(t);
    }
    let mut warm = Vec::new();
    for _ in 0..warm_n {
        let (v, t) = time(|| -> Res<String> {
            let mut sb = cx.rt.resume(cx.store.clone(), &snap)?;
            run_ok(&mut sb, FOLLOW_UP)
        });
        assert_eq!(v?, expected);
        warm.push(t);
    }
    let exe = std::env::current_exe()?;
    let mut fresh = Vec::new();
    for _ in 0..warm_n.min(5) {
        let (out, t) = time(|| {
            std::process::Command::new(&exe)
                .args([
                    "child-wasi",
                    &cx.opts.store.display().to_string(),
                    &snap.to_string(),
                ])
                .output()
        });
        let out = out?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned().into());
        }
        assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
        fresh.push(t);
    }
    let (cold, warm, fresh) = (Stats::of(cold), Stats::of(warm), Stats::of(fresh));
    cx.report.table(
        &["request", "time", "cold ÷ this"],
        &[
            vec![
                "first request (create + build + answer)".into(),
                fmt(first_t),
                "".into(),
            ],
            vec!["second request, cold".into(), cold.cell(), "1x".into()],
            vec![
                "second request, dormant, in process".into(),
                warm.cell(),
                ratio(cold.median(), warm.median()),
            ],
            vec![
                "second request, dormant, new process".into(),
                fresh.cell(),
                ratio(cold.median(), fresh.median()),
            ],
        ],
    );
    cx.report.headline(
        "data-analysis follow-up: cold / resume in process / resume in new process",
        format!(
            "{} / {} / {} ({} and {} faster than cold)",
            fmt(cold.median()),
            fmt(warm.median()),
            fmt(fresh.median()),
            ratio(cold.median(), warm.median()),
            ratio(cold.median(), fresh.median())
        ),
        &format!("{rows} rows; scenario 1"),
    );
    Ok(())
}

/// The `child-wasi STORE ID` mode of this binary: the new process of the "dormant, new process"
/// request, which resumes the snapshot and prints its answer to the follow-up.
pub fn child_wasi(store: &str, id: &str) -> Res<()> {
    let rt = WasiRuntime::new()?;
    let store = Arc::new(LocalStore::open(store)?);
    let mut sb = rt.resume(store, &id.parse()?)?;
    print!("{}", run_ok(&mut sb, FOLLOW_UP)?);
    Ok(())
}
