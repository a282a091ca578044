//! Scenario 5, fork fan-out: a checkpointed pandas session forked into N children, timed from
//! the `fork(N)` call to all N children returned and ready; then each child changes one variable
//! and checkpoints, and the bytes those child snapshots stored are averaged.

use std::time::{Duration, Instant};

use dormant::kvm::KvmSandbox;
use dormant::{Sandbox, SandboxSpec};

use crate::Res;
use crate::aims;
use crate::ctx::Ctx;
use crate::probe::stored_bytes;
use crate::stats::{fmt, mib, time};
use crate::workloads::{SMALL_SESSION, linux_spec, run_ok};

pub fn run(cx: &mut Ctx) -> Res<()> {
    cx.report.section(
        "5. Fork fan-out",
        "A pandas session (200,000-row DataFrame, checkpointed once) is forked into N \
         children: time from the `fork(N)` call (which takes an incremental checkpoint of the \
         parent) to all N children returned, ready to run. Then each child changes one variable and checkpoints; bytes per child = the mean \
         of what those child snapshots stored.",
    );
    let mut parent = cx.rt.create(cx.store.clone(), SandboxSpec::python())?;
    run_ok(&mut parent, SMALL_SESSION)?;
    // The first checkpoint of a session writes its whole image: not part of a fork's cost.
    parent.checkpoint()?;
    let fan: &[usize] = if cx.opts.quick {
        &[1, 10]
    } else {
        &[1, 10, 100]
    };
    let mut rows = Vec::new();
    for &n in fan {
        let (kids, t) = time(|| parent.fork(n));
        let mut kids = kids?;
        let mut bytes = 0;
        for (i, k) in kids.iter_mut().enumerate() {
            run_ok(k, &format!("state['turn'] = {i}"))?;
            let id = k.checkpoint()?;
            bytes += stored_bytes(&cx.store, &id)?;
        }
        rows.push(vec![format!("{n}"), fmt(t), mib(bytes / n as u64)]);
        for mut k in kids {
            k.kill()?;
        }
    }
    cx.report
        .table(&["children", "fork → all ready", "bytes per child"], &rows);
    cx.report.headline(
        "fork fan-out to all ready",
        rows.iter()
            .map(|r| format!("{}: {}", r[0], r[1]))
            .collect::<Vec<_>>()
            .join(", "),
        "scenario 5",
    );
    parent.kill()?;
    if !cx.opts.quick && dormant::kvm::detect() != dormant::kvm::HostKvm::Unavailable {
        linux(cx)?;
    }
    Ok(())
}

/// A running 128 MiB Linux guest (the base snapshot of scenario 3: no extra boot) forked into N
/// children: to all returned (each child's VM restored and its agent's first reply in), and to
/// each having answered a first request (`exists`, one child after another).
fn linux(cx: &mut Ctx) -> Res<()> {
    let mut parent = match KvmSandbox::create(cx.kvm_store.clone(), linux_spec(128)) {
        Ok(sb) => sb,
        Err(e) => {
            cx.report.note(&format!("Linux guest skipped: {e}"));
            return Ok(());
        }
    };
    cx.report.note(
        "Linux: a running 128 MiB guest forked into N children, timed from the `fork(N)` call \
         (an incremental checkpoint of the parent, then N resumes of it, a few at a time, one \
         per host CPU) to all N returned (each child's VM restored and its agent's first reply \
         in), and on to each of them having answered a first request (`exists`, one child \
         after another).",
    );
    let mut rows = Vec::new();
    for n in [1usize, 10, 100] {
        let t = Instant::now();
        let mut kids = parent.fork(n)?;
        let ready = t.elapsed();
        for k in &mut kids {
            assert!(k.exists("/root")?);
        }
        let answered = t.elapsed();
        for mut k in kids {
            k.kill()?;
        }
        if n == 100 {
            cx.report.aim(
                aims::FORK_100,
                1,
                fmt(ready),
                ready <= Duration::from_millis(200),
            );
        }
        rows.push(vec![format!("KVM Linux, {n}"), fmt(ready), fmt(answered)]);
    }
    parent.kill()?;
    cx.report.table(
        &[
            "children",
            "fork → all ready",
            "→ each answered a first request",
        ],
        &rows,
    );
    Ok(())
}
