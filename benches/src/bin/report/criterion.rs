//! The criterion micro-benchmarks that `scripts/bench.sh` ran just before the report: every
//! estimate found under `--criterion` as one table row (median and 95% interval), and the
//! `kvm_resume_tiny` 128 MiB vs 2 GiB headline. Nothing is measured here; the results are read
//! from criterion's `estimates.json` files.

use std::path::Path;
use std::time::Duration;

use crate::aims;
use crate::ctx::Ctx;
use crate::stats::fmt;

/// `(benchmark id, median, 95% interval)` of every criterion estimate under `dir`.
pub fn criterion_results(dir: &Path) -> Vec<(String, f64, f64, f64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n == "new") {
                    let est = p.join("estimates.json");
                    let Ok(text) = std::fs::read_to_string(&est) else {
                        continue;
                    };
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
                        continue;
                    };
                    let m = &v["median"];
                    let id = p
                        .parent()
                        .and_then(|b| b.strip_prefix(dir).ok())
                        .map(|b| b.display().to_string())
                        .unwrap_or_default();
                    let f = |k: &str| m[k].as_f64().unwrap_or(f64::NAN);
                    let ci = &m["confidence_interval"];
                    let g = |k: &str| ci[k].as_f64().unwrap_or(f64::NAN);
                    out.push((id, f("point_estimate"), g("lower_bound"), g("upper_bound")));
                } else if p.file_name().is_none_or(|n| n != "report") {
                    stack.push(p);
                }
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The `kvm_resume_tiny` headline (when both sizes ran) and the section of all the estimates.
pub fn run(cx: &mut Ctx) {
    let crit = criterion_results(&cx.opts.criterion);
    let median = |id: &str| {
        crit.iter()
            .find(|c| c.0 == id)
            .map(|c| Duration::from_secs_f64(c.1 / 1e9))
    };
    let ms = Duration::from_millis;
    if let (Some(lo), Some(hi)) = (
        median("kvm_resume_tiny/128MiB"),
        median("kvm_resume_tiny/2048MiB"),
    ) {
        cx.report.aim(
            aims::KVM_TINY_RESUME,
            0,
            format!("{} → {}", fmt(lo), fmt(hi)),
            hi <= ms(1),
        );
        cx.report.headline(
            "KVM tiny-guest resume (new VM + restore + first exit), 128 MiB vs 2 GiB RAM",
            format!("{} vs {}", fmt(lo), fmt(hi)),
            "criterion `kvm_resume_tiny`",
        );
    }
    if let Some(d) = median("resume_in_process/python_pandas") {
        cx.report.aim(
            aims::WASI_RESUME_HANDLE,
            0,
            fmt(d),
            d <= Duration::from_micros(50),
        );
    }
    if let (Some(crash), Some(sync)) = (
        median("checkpoint_incremental/python_small_call_process_crash"),
        median("checkpoint_incremental/python_small_call_sync"),
    ) {
        cx.report.aim(
            aims::WASI_CHECKPOINT_SMALL_CELL,
            0,
            format!("{} (fsync: {})", fmt(crash), fmt(sync)),
            crash <= ms(1),
        );
    }
    if let Some(d) = median("fork_python_pandas/100") {
        cx.report.aim(aims::FORK_100, 0, fmt(d), d <= ms(50));
    }
    cx.report.section(
        "Criterion micro-benchmarks",
        "Medians with their 95% confidence interval, from the criterion groups \
         `scripts/bench.sh` ran just before this report (what each measures: the header of \
         `benches/benches/<group>.rs` and `benches/README.md`).",
    );
    if crit.is_empty() {
        cx.report.note("None found (run through scripts/bench.sh).");
    } else {
        let rows: Vec<Vec<String>> = crit
            .iter()
            .map(|(id, m, lo, hi)| {
                let d = |ns: f64| fmt(Duration::from_secs_f64(ns / 1e9));
                vec![format!("`{id}`"), d(*m), format!("{} – {}", d(*lo), d(*hi))]
            })
            .collect();
        cx.report
            .table(&["benchmark", "median", "95% interval"], &rows);
    }
}
