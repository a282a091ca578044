//! Scenario 6, density: many forks of one small pandas session, each of which changed a variable
//! and went to standby with its handle kept. Measured: the disk blocks they added under the
//! store, this process's RSS growth (in all, per additional sandbox, and what dropping the
//! handles frees), and the time to resume one picked at random until its first answer.

use std::time::Instant;

use dormant::{Sandbox, SandboxSpec, SnapshotId, WasiSandbox};

use crate::Res;
use crate::aims;
use crate::ctx::Ctx;
use crate::probe::{disk_usage, rss_bytes};
use crate::stats::{Stats, fmt, mib, time};
use crate::workloads::{SMALL_SESSION, run_ok};

pub fn run(cx: &mut Ctx) -> Res<()> {
    let n: usize = if cx.opts.quick { 100 } else { 1000 };
    cx.report.section(
        "6. Density",
        &format!(
            "{n} Python sandboxes in standby: forks of one small pandas session, each of which \
             changed a variable and went to standby (its handle kept in this process). Bytes \
             on disk = blocks allocated under the store by them (their snapshots, layered on \
             the parent's); resident memory = this process's RSS with all {n} in standby minus \
             its RSS before they existed, and per sandbox the growth from the first half of \
             them to all (what each more standby costs, without the one-off rise of the heap \
             while the first forks ran); resume = `WasiRuntime::resume` of one of them picked \
             at random, until its first `run_code` answered."
        ),
    );
    let mut parent = cx.rt.create(cx.store.clone(), SandboxSpec::python())?;
    run_ok(&mut parent, SMALL_SESSION)?;
    parent.checkpoint()?;
    let disk_before = disk_usage(&cx.opts.store);
    let rss_before = rss_bytes();
    // Forks in batches of up to 100, the first half of the sandboxes in whole batches.
    let batch = 100.min(n / 2);
    let mut rss_half = None;
    let (kids, t_all) = time(|| -> Res<Vec<(WasiSandbox, SnapshotId)>> {
        let mut out = Vec::new();
        while out.len() < n {
            let k = batch.min(n - out.len());
            for mut c in parent.fork(k)? {
                run_ok(&mut c, &format!("state['turn'] = {}", out.len()))?;
                let id = c.standby()?;
                out.push((c, id));
            }
            if rss_half.is_none() && out.len() >= n / 2 {
                rss_half = Some((out.len(), rss_bytes()));
            }
        }
        Ok(out)
    });
    let kids = kids?;
    let rss_after = rss_bytes();
    let (half, rss_half) = rss_half.unwrap_or((0, rss_before));
    let per_more = rss_after.saturating_sub(rss_half) / (n - half).max(1) as u64;
    let disk = disk_usage(&cx.opts.store).saturating_sub(disk_before);
    let mut resumes = Vec::new();
    for _ in 0..if cx.opts.quick { 10 } else { 30 } {
        let (_, id) = &kids[rand_index(kids.len())];
        let (v, t) = time(|| -> Res<String> {
            let mut sb = cx.rt.resume(cx.store.clone(), id)?;
            run_ok(&mut sb, "print(state['turn'] >= 0)")
        });
        assert_eq!(v?, "True\n");
        resumes.push(t);
    }
    let resumes = Stats::of(resumes);
    // What of the growth the standby handles themselves hold (rather than heap the allocator
    // kept after the children's live instances were freed): RSS once they are dropped too.
    for (mut k, _) in kids {
        let _ = k.kill();
    }
    let rss_dropped = rss_bytes();
    let per_held = rss_after.saturating_sub(rss_dropped) / n as u64;
    let each = disk / n as u64;
    cx.report.aim(
        aims::DISK_PER_IDLE_SESSION,
        0,
        format!("{:.0} KiB", each as f64 / 1024.0),
        each <= 100 << 10,
    );
    cx.report.table(
        &[
            "sandboxes in standby",
            "made in",
            "bytes on disk (per sandbox)",
            "host RSS growth",
            "per sandbox (growth from the first half to all)",
            "RSS freed by dropping the handles (per sandbox)",
            "resume one at random → answer",
        ],
        &[vec![
            n.to_string(),
            fmt(t_all),
            format!("{} ({})", mib(disk), mib(disk / n as u64)),
            mib(rss_after.saturating_sub(rss_before)),
            format!("{} KiB", per_more / 1024),
            format!(
                "{} ({} KiB)",
                mib(rss_after.saturating_sub(rss_dropped)),
                per_held / 1024
            ),
            resumes.cell(),
        ]],
    );
    cx.report.headline(
        &format!("density: {n} sandboxes in standby"),
        format!(
            "{} on disk each; host RSS +{} KiB each ({} in all), {} KiB each freed by dropping \
             the handles; resume one at random {}",
            mib(disk / n as u64),
            per_more / 1024,
            mib(rss_after.saturating_sub(rss_before)),
            per_held / 1024,
            fmt(resumes.median())
        ),
        "scenario 6",
    );
    parent.kill()?;
    Ok(())
}

fn rand_index(len: usize) -> usize {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    (h.finish() % len as u64) as usize
}
