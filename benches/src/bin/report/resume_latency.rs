//! Scenario 3, resume latency vs memory size: a WASI module that touched N MiB, resumed until
//! the handle returned and until its first export call returned; in a full run also Linux
//! guests of 128, 512 and 2048 MiB RAM, resumed until the first file operation and the first
//! `exec`. (The KVM tiny-guest figures come from criterion's `kvm_resume_tiny`.)

use std::time::{Duration, Instant};

use dormant::kvm::KvmSandbox;
use dormant::{Grants, Sandbox, Val};

use crate::Res;
use crate::aims;
use crate::ctx::Ctx;
use crate::stats::{Stats, fmt};
use crate::workloads::{linux_spec, sh};

pub fn run(cx: &mut Ctx) -> Res<()> {
    cx.report.section(
        "3. Resume latency vs memory size",
        "WASI: a module that wrote one byte into every 4 KiB page of N MiB of linear memory, \
         checkpointed; **resume** = `WasiRuntime::resume_with` (granting the module file) \
         called until the handle returned; \
         **resume → first call** = until its first export call (reading memory) returned. \
         KVM, tiny guest: criterion group `kvm_resume_tiny` below (new VM over the RAM image \
         mapped copy-on-write, full state restore, first guest exit). KVM, Linux guest (full \
         run only): `KvmSandbox::from_snapshot` until the first file operation \
         (`exists(\"/root\")`, one agent round trip) returned, and until the first `exec` \
         returned (a guest fork+exec, slow where guest kernel code is emulated); beside the first, \
         medians of the resume's phases (`KvmSandbox::resume_timings`): the host's own work \
         (mapping the snapshot, the new VM and its devices, the agent connection) and the \
         guest's first reply after it.",
    );
    let sizes: &[u32] = if cx.opts.quick {
        &[16, 64]
    } else {
        &[16, 64, 256, 1024]
    };
    let n = if cx.opts.quick { 10 } else { 30 };
    let mut rows = Vec::new();
    let mut medians = Vec::new();
    for &m in sizes {
        let mut sb = cx.touch_sandbox()?;
        sb.call("touch", &[Val::I32((m * 256) as i32), Val::I32(7)])?;
        let snap = sb.standby()?;
        let grants = Grants::new().module(&cx.module);
        let (mut resume, mut first) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let t = Instant::now();
            let mut sb = cx.rt.resume_with(cx.store.clone(), &snap, &grants)?;
            resume.push(t.elapsed());
            let v = sb.call("peek", &[])?;
            first.push(t.elapsed());
            assert!(matches!(v.first(), Some(Val::I32(7))));
        }
        let (resume, first) = (Stats::of(resume), Stats::of(first));
        medians.push(resume.median());
        rows.push(vec![
            format!("WASI, {m} MiB touched"),
            resume.cell(),
            first.cell(),
        ]);
    }
    if !cx.opts.quick && dormant::kvm::detect() != dormant::kvm::HostKvm::Unavailable {
        for ram in [128u64, 512, 2048] {
            let mut sb = match KvmSandbox::create(cx.kvm_store.clone(), linux_spec(ram)) {
                Ok(sb) => sb,
                Err(e) => {
                    cx.report.note(&format!("Linux guest skipped: {e}"));
                    break;
                }
            };
            let snap = sb.standby()?;
            let (mut file_op, mut exec) = (Vec::new(), Vec::new());
            let (mut host, mut first_reply) = (Vec::new(), Vec::new());
            for _ in 0..5 {
                let t = Instant::now();
                let mut sb = KvmSandbox::from_snapshot(cx.kvm_store.clone(), &snap)?;
                if let Some(p) = sb.resume_timings() {
                    host.push(p.map + p.restore + p.connect);
                    first_reply.push(p.first_reply);
                }
                assert!(sb.exists("/root")?);
                file_op.push(t.elapsed());
                sh(&mut sb, "true")?;
                exec.push(t.elapsed());
                sb.kill()?;
            }
            let (file_op, exec) = (Stats::of(file_op), Stats::of(exec));
            if ram == 128 {
                let (f, e) = (file_op.median(), exec.median());
                cx.report.aim(
                    aims::LINUX_FIRST_REPLY,
                    0,
                    fmt(f),
                    f <= Duration::from_millis(10),
                );
                cx.report.aim(
                    aims::LINUX_FIRST_EXEC,
                    0,
                    fmt(e),
                    e <= Duration::from_millis(150),
                );
            }
            rows.push(vec![
                format!("KVM Linux, {ram} MiB guest RAM"),
                format!(
                    "to first file op {} (host: map + restore + connect {}; the guest's first \
                     reply {})",
                    file_op.cell(),
                    fmt(Stats::of(host).median()),
                    fmt(Stats::of(first_reply).median())
                ),
                format!("to first exec {}", exec.cell()),
            ]);
        }
    }
    cx.report
        .table(&["sandbox", "resume", "resume → first call"], &rows);
    if let (Some(lo), Some(hi)) = (medians.first(), medians.last()) {
        cx.report.headline(
            "WASI resume, smallest vs largest memory",
            format!(
                "{} at {} MiB vs {} at {} MiB",
                fmt(*lo),
                sizes[0],
                fmt(*hi),
                sizes[sizes.len() - 1]
            ),
            "scenario 3 (flat is the aim)",
        );
    }
    Ok(())
}
