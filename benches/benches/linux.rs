//! KVM tier with the real Linux guest: plain timed scenarios (a boot takes tens of seconds on
//! PVM hosts, too long for criterion's sampling). Prints a Markdown table.
//!
//! - `cold boot → first exec`: `KvmSandbox::boot` (new VM, kernel + initramfs loaded, Linux
//!   boots, init runs, the agent answers) until `exec("echo ok")` returned. One sample per RAM
//!   size.
//! - `resume → first exec`: `KvmSandbox::from_snapshot` of the booted guest's snapshot (new VM,
//!   RAM and disk mapped copy-on-write, vCPU/VM/device state restored, vsock reconnect, agent
//!   hello, entropy reseed) until `exec("echo ok")` returned. Median of 10.
//! - `resume → first file op`: the same until `exists("/root")` returned (a guest round trip
//!   without a fork+exec, which costs ~0.3–0.6 s where guest kernel code is emulated). Median
//!   of 10.
//! - `resume (VMM restore)`: the same up to a restored, running VM (`load_machine` +
//!   `Machine::restore`), before any guest round trip. Median of 10.
//! - `checkpoint after dirtying N MiB` (1, 4, 16): `checkpoint()` after a guest command wrote
//!   N MiB into tmpfs; time and bytes stored for the delta (RAM + disk). Median of 5.
//!
//! `DORMANT_BENCH_LINUX_RAM=128,512,2048` picks the RAM sizes (default `128,512`). Base
//! snapshots are kept in `target/dormant-bench-linux-store` so reruns skip the boots.
//! Skipped with a message where /dev/kvm or the guest image is missing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dormant::kvm::{GuestImage, KvmOptions, KvmSandbox};
use dormant::{Command, LocalStore, Sandbox, SandboxSpec};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn echo(sb: &mut KvmSandbox) {
    let out = sb.exec(&Command::new(["echo", "ok"])).expect("exec");
    assert_eq!(out.stdout, b"ok\n");
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if dormant::kvm::detect() == dormant::kvm::HostKvm::Unavailable {
        eprintln!("SKIPPED: /dev/kvm is not available; Linux guest benchmarks did not run");
        return;
    }
    let image = match GuestImage::locate() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("SKIPPED: {e}");
            return;
        }
    };
    let sizes: Vec<u64> = std::env::var("DORMANT_BENCH_LINUX_RAM")
        .unwrap_or_else(|_| "128,512".into())
        .split(',')
        .map(|s| s.trim().parse().expect("RAM sizes in MiB"))
        .collect();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/dormant-bench-linux-store");
    let store = Arc::new(LocalStore::open(&root).expect("store"));
    println!(
        "| guest RAM | cold boot → first exec | resume → first exec | resume → first file op | VMM restore only |"
    );
    println!("|---|---|---|---|---|");
    let mut first_snapshot = None;
    for mib in &sizes {
        let spec = SandboxSpec::linux()
            .image("minimal")
            .memory_limit(mib << 20);
        let t = Instant::now();
        let mut booted =
            KvmSandbox::boot(store.clone(), &image, spec.clone(), KvmOptions::default())
                .expect("boot");
        echo(&mut booted);
        let cold = t.elapsed();
        let id = booted.checkpoint().expect("checkpoint");
        drop(booted);
        let mut resume = Vec::new();
        let mut file_op = Vec::new();
        let mut restore = Vec::new();
        for _ in 0..10 {
            let t = Instant::now();
            let mut sb = KvmSandbox::from_snapshot(store.clone(), &id).expect("resume");
            assert!(sb.exists("/root").expect("exists"));
            file_op.push(t.elapsed());
            drop(sb);
            let t = Instant::now();
            let mut sb = KvmSandbox::from_snapshot(store.clone(), &id).expect("resume");
            echo(&mut sb);
            resume.push(t.elapsed());
            drop(sb);
            let t = Instant::now();
            let loaded = dormant_kvm::snapshot::load_machine(&store, &id).expect("load");
            let devices = loaded.devices.expect("devices");
            let m = dormant_kvm::machine::Machine::restore(
                loaded.vm,
                &devices,
                loaded.disk,
                false,
                &[],
            )
            .expect("restore");
            restore.push(t.elapsed());
            drop(m);
            std::thread::sleep(Duration::from_millis(50));
        }
        println!(
            "| {mib} MiB | {:.1} s | {} | {} | {} |",
            cold.as_secs_f64(),
            ms(median(resume)),
            ms(median(file_op)),
            ms(median(restore))
        );
        if first_snapshot.is_none() {
            first_snapshot = Some(id);
        }
    }

    let Some(id) = first_snapshot else { return };
    println!();
    println!("| dirtied in the guest | checkpoint time | bytes stored (RAM + disk delta) |");
    println!("|---|---|---|");
    for mib in [1u64, 4, 16] {
        let mut times = Vec::new();
        let mut bytes = 0;
        for _ in 0..5 {
            let mut sb = KvmSandbox::from_snapshot(store.clone(), &id).expect("resume");
            let mut dd = Command::new([
                "dd",
                "if=/dev/zero",
                "of=/tmp/dirty",
                "bs=1048576",
                &format!("count={mib}"),
            ]);
            // Page allocation is guest kernel work: slow where it is emulated.
            dd.timeout = Some(Duration::from_secs(600));
            let out = sb.exec(&dd).expect("dd");
            assert_eq!(out.exit_code, 0);
            let t = Instant::now();
            let snap = sb.checkpoint().expect("checkpoint");
            times.push(t.elapsed());
            let dir = store.snapshot_dir(&snap);
            bytes = ["memory.delta", "disk.delta"]
                .iter()
                .map(|f| std::fs::metadata(dir.join(f)).map_or(0, |m| m.len()))
                .sum::<u64>();
        }
        println!(
            "| {mib} MiB | {} | {:.1} MiB |",
            ms(median(times)),
            bytes as f64 / (1 << 20) as f64
        );
    }
}
