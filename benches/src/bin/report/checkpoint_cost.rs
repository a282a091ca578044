//! Scenario 4, checkpoint cost vs dirtied memory: after N MiB are written again, `checkpoint()`
//! is timed from the call to the durable snapshot id (fsync included), with the bytes that
//! incremental snapshot stored; WASI (a module with 257 MiB touched) always, a 128 MiB Linux
//! guest (N MiB written into its tmpfs) in a full run.

use std::sync::Arc;
use std::time::Duration;

use dormant::kvm::KvmSandbox;
use dormant::{Durability, LocalStore, Sandbox, Val};

use crate::Res;
use crate::aims;
use crate::ctx::Ctx;
use crate::probe::stored_bytes;
use crate::stats::{Stats, fmt, mib, time};
use crate::workloads::{linux_spec, sh};

pub fn run(cx: &mut Ctx) -> Res<()> {
    cx.report.section(
        "4. Checkpoint cost vs dirtied memory",
        "WASI: a module with 257 MiB of touched memory, checkpointed once; then N MiB are \
         written again (a new value in every 4 KiB page) and `checkpoint()` is timed from the \
         call to the durable snapshot id (fsync included); bytes = what that incremental \
         snapshot stored. KVM (full run only): a 128 MiB Linux guest writes N MiB (`dd if=/dev/zero`) into its \
         tmpfs, then `checkpoint()` (vCPU and devices quiesced, dirty pages and disk blocks \
         written, guest resumed); bytes = RAM + disk delta; and the 1 MiB case once more \
         without fsync (`Durability::ProcessCrash`: survives a crash of the process, not of \
         the machine).",
    );
    let sizes: &[u32] = if cx.opts.quick {
        &[1, 16]
    } else {
        &[1, 4, 16, 64, 256]
    };
    let reps = if cx.opts.quick { 3 } else { 5 };
    let mut sb = cx.touch_sandbox()?;
    sb.call("touch", &[Val::I32(257 * 256), Val::I32(1)])?;
    sb.checkpoint()?;
    let mut rows = Vec::new();
    let mut value = 2;
    for &m in sizes {
        let (mut times, mut bytes) = (Vec::new(), 0);
        for _ in 0..reps {
            value = value % 250 + 2;
            sb.call("touch", &[Val::I32((m * 256) as i32), Val::I32(value)])?;
            let (id, t) = time(|| sb.checkpoint());
            let id = id?;
            times.push(t);
            bytes = stored_bytes(&cx.store, &id)?;
        }
        rows.push(vec![
            format!("WASI, {m} MiB dirtied"),
            Stats::of(times).cell(),
            mib(bytes),
        ]);
    }
    sb.kill()?;
    let mut linux_1mib = None;
    if !cx.opts.quick && dormant::kvm::detect() != dormant::kvm::HostKvm::Unavailable {
        // The 128 MiB base snapshot of scenario 3: no extra boot.
        match KvmSandbox::create(cx.kvm_store.clone(), linux_spec(128)) {
            Ok(mut sb) => {
                sb.checkpoint()?;
                for m in [1u32, 4, 16] {
                    let (times, bytes) = linux_rounds(&mut sb, &cx.kvm_store, m)?;
                    rows.push(vec![
                        format!("KVM Linux, {m} MiB dirtied"),
                        times.cell(),
                        mib(bytes),
                    ]);
                    if m == 1 {
                        linux_1mib = Some(times.median());
                    }
                }
                // The same 1 MiB without fsync: the guest resumed through a handle on the same
                // store with `Durability::ProcessCrash`.
                let id = sb.checkpoint()?;
                sb.kill()?;
                let fast = Arc::new(
                    LocalStore::open(cx.kvm_store.root())?
                        .with_durability(Durability::ProcessCrash),
                );
                let mut sb = KvmSandbox::from_snapshot(fast.clone(), &id)?;
                sb.checkpoint()?;
                let (times, bytes) = linux_rounds(&mut sb, &fast, 1)?;
                sb.kill()?;
                rows.push(vec![
                    "KVM Linux, 1 MiB dirtied, no fsync (`Durability::ProcessCrash`)".into(),
                    times.cell(),
                    mib(bytes),
                ]);
                if let Some(synced) = linux_1mib {
                    cx.report.aim(
                        aims::LINUX_CHECKPOINT_1MIB,
                        0,
                        format!("{} (no fsync: {})", fmt(synced), fmt(times.median())),
                        synced <= Duration::from_millis(5),
                    );
                }
            }
            Err(e) => cx.report.note(&format!("Linux guest skipped: {e}")),
        }
    }
    cx.report
        .table(&["dirtied", "checkpoint", "bytes stored"], &rows);
    if let Some(first) = rows.first() {
        cx.report.headline(
            "incremental checkpoint after 1 MiB dirtied (WASI)",
            format!("{}, {}", first[1], first[2]),
            "scenario 4",
        );
    }
    Ok(())
}

/// Three rounds of: the guest writes `mib` MiB into its tmpfs, `checkpoint()` is timed, the
/// file is removed. The checkpoints' times, and the bytes the last one stored in `store`.
fn linux_rounds(sb: &mut KvmSandbox, store: &LocalStore, mib: u32) -> Res<(Stats, u64)> {
    let (mut times, mut bytes) = (Vec::new(), 0);
    for i in 0..3 {
        sh(
            sb,
            &format!("dd if=/dev/zero of=/tmp/d{i} bs=1M count={mib} 2>/dev/null"),
        )?;
        let (id, t) = time(|| sb.checkpoint());
        times.push(t);
        bytes = stored_bytes(store, &id?)?;
        sh(sb, &format!("rm /tmp/d{i}"))?;
    }
    Ok((Stats::of(times), bytes))
}
