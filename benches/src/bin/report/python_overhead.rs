//! Scenario 7, the overhead of the Python bindings: one pandas session snapshot resumed through
//! the Rust API and through the `dormant` Python module (in a Python process started with
//! `--python`), timed to the handle and to the first `run_code` result; the Rust samples are
//! taken half before and half after the Python ones.

use std::time::{Duration, Instant};

use dormant::{Sandbox, SandboxSpec};

use crate::Res;
use crate::aims;
use crate::ctx::Ctx;
use crate::stats::{Stats, fmt};
use crate::workloads::{SMALL_SESSION, python_numbers, run_ok};

const PY_SIDE: &str = r#"
import statistics, sys, time
import dormant
store, snap, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
resume, first = [], []
for _ in range(n):
    t = time.perf_counter()
    sb = dormant.Sandbox.resume(snap, store=store, idle_standby=None)
    resume.append(time.perf_counter() - t)
    out = sb.run_code("print(len(df))").stdout
    first.append(time.perf_counter() - t)
    assert out == "200000\n", out
    sb.kill()
print(statistics.median(resume), statistics.median(first))
"#;

/// One new Python process: `import dormant`, then the first resume (the runtime starts in it)
/// until the first `run_code` answered; prints both times in seconds.
const NEW_PROCESS: &str = r#"
import sys, time
t0 = time.perf_counter()
import dormant
t1 = time.perf_counter()
sb = dormant.Sandbox.resume(sys.argv[2], store=sys.argv[1], idle_standby=None)
out = sb.run_code("print(len(df))").stdout
t2 = time.perf_counter()
assert out == "200000\n", out
sb.kill()
print(t1 - t0, t2 - t1)
"#;

pub fn run(cx: &mut Ctx) -> Res<()> {
    cx.report.section(
        "7. Overhead of the Python bindings",
        "The same pandas session snapshot resumed through the Rust API (`WasiRuntime::resume`, \
         then `run_code`) and through the Python module (`dormant.Sandbox.resume`, then \
         `run_code`, in a Python process that imported dormant beforehand): time to the \
         handle, and to the first `run_code` result. Medians, side by side in one run.",
    );
    let Some(py) = &cx.opts.python else {
        cx.report.note(
            "Skipped: no Python with the dormant module (`--python`; scripts/bench.sh sets it up).",
        );
        return Ok(());
    };
    let mut sb = cx.rt.create(cx.store.clone(), SandboxSpec::python())?;
    run_ok(&mut sb, SMALL_SESSION)?;
    let snap = sb.standby()?;
    let n = if cx.opts.quick { 10 } else { 30 };
    let (mut resume, mut first) = (Vec::new(), Vec::new());
    let mut rust_side = |k: usize| -> Res<()> {
        for _ in 0..k {
            let t = Instant::now();
            let mut sb = cx.rt.resume(cx.store.clone(), &snap)?;
            resume.push(t.elapsed());
            assert_eq!(run_ok(&mut sb, "print(len(df))")?, "200000\n");
            first.push(t.elapsed());
            sb.kill()?;
        }
        Ok(())
    };
    // Half of the Rust samples before the Python run and half after, so that neither side
    // alone enjoys a warmer machine.
    rust_side(n / 2)?;
    let (store, snap_id) = (cx.opts.store.display().to_string(), snap.to_string());
    let py_side = python_numbers(
        py,
        PY_SIDE,
        &[&store, &snap_id, &n.to_string()],
        2,
        "python side",
    );
    rust_side(n - n / 2)?;
    let py_side = py_side?;
    let (py_resume, py_first) = (
        Duration::from_secs_f64(py_side[0]),
        Duration::from_secs_f64(py_side[1]),
    );
    let (resume, first) = (Stats::of(resume), Stats::of(first));
    let over =
        |p: Duration, r: Duration| format!("{:+.2} ms", (p.as_secs_f64() - r.as_secs_f64()) * 1e3);
    cx.report.table(
        &["", "Rust API", "Python module", "Python − Rust"],
        &[
            vec![
                "resume → handle".into(),
                resume.cell(),
                fmt(py_resume),
                over(py_resume, resume.median()),
            ],
            vec![
                "resume → first run_code result".into(),
                first.cell(),
                fmt(py_first),
                over(py_first, first.median()),
            ],
        ],
    );
    cx.report.aim(
        aims::WASI_FIRST_RUN_CODE_PY,
        0,
        fmt(py_first),
        py_first <= Duration::from_millis(1),
    );
    // New processes, one after another, each importing dormant and resuming the snapshot.
    let (mut import, mut answer) = (Vec::new(), Vec::new());
    for _ in 0..if cx.opts.quick { 3 } else { 7 } {
        let v = python_numbers(py, NEW_PROCESS, &[&store, &snap_id], 2, "new process")?;
        import.push(Duration::from_secs_f64(v[0]));
        answer.push(Duration::from_secs_f64(v[1]));
    }
    let (import, answer) = (Stats::of(import), Stats::of(answer));
    cx.report.note(
        "In a new Python process each time (medians of processes started one after another): \
         `import dormant`, then `dormant.Sandbox.resume` of the same snapshot (which starts the \
         WASI runtime in that process: engine, compiled interpreter mapped) until the first \
         `run_code` answered.",
    );
    cx.report.table(
        &["new Python process", "time"],
        &[
            vec!["`import dormant`".into(), import.cell()],
            vec![
                "resume → first run_code result (runtime start included)".into(),
                answer.cell(),
            ],
        ],
    );
    cx.report.aim(
        aims::WASI_NEW_PROCESS,
        0,
        fmt(import.median()),
        import.median() <= Duration::from_millis(20),
    );
    cx.report.aim(
        aims::WASI_NEW_PROCESS,
        1,
        fmt(answer.median()),
        answer.median() <= Duration::from_millis(15),
    );
    cx.report.headline(
        "resume → first run_code, Rust vs Python",
        format!("{} vs {}", fmt(first.median()), fmt(py_first)),
        "scenario 7",
    );
    Ok(())
}
