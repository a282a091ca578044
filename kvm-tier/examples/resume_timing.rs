//! Where the time of a Linux guest's resume goes: `cargo run --release -p dormant-kvm --example
//! resume_timing -- STORE_DIR [SNAPSHOT_ID|-] [ROUNDS]`. Without a snapshot id (or with `-`)
//! it boots the `minimal` image (128 MiB), puts it in standby and prints the snapshot's id
//! first.
//!
//! Each round resumes the snapshot in a new handle and prints the resume's phases
//! ([`ResumeTimings`](dormant_kvm::sandbox::ResumeTimings)), the first and a later file
//! operation and `exec`, and the vCPU's CPU time over one idle second after them (how much of
//! a core the guest uses while nothing is asked of it).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use dormant_core::{Command, LocalStore, Sandbox, SandboxSpec};
use dormant_kvm::sandbox::KvmSandbox;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let store = Arc::new(LocalStore::open(&args[1]).unwrap());
    let id = match args.get(2) {
        Some(id) if id != "-" => id.parse().unwrap(),
        _ => {
            let spec = SandboxSpec::linux()
                .image("minimal")
                .memory_limit(128 << 20)
                .call_timeout(Duration::from_secs(600));
            let t = Instant::now();
            let mut sb = KvmSandbox::create(store.clone(), spec).unwrap();
            let created = t.elapsed();
            let id = sb.standby().unwrap();
            println!("snapshot {id} (created in {created:.2?})");
            id
        }
    };
    let rounds: usize = args.get(3).map_or(3, |s| s.parse().unwrap());
    for _ in 0..rounds {
        let t = Instant::now();
        let mut sb = KvmSandbox::from_snapshot(store.clone(), &id).unwrap();
        let resumed = t.elapsed();
        let p = sb.resume_timings().unwrap();
        let timed = |sb: &mut KvmSandbox, f: &dyn Fn(&mut KvmSandbox)| {
            let t = Instant::now();
            f(sb);
            t.elapsed()
        };
        let file_op = |sb: &mut KvmSandbox| assert!(sb.exists("/root").unwrap());
        let exec = |sb: &mut KvmSandbox| {
            assert_eq!(sb.exec(&Command::new(["true"])).unwrap().exit_code, 0);
        };
        let first_file_op = timed(&mut sb, &file_op);
        let first_exec = timed(&mut sb, &exec);
        let second_exec = timed(&mut sb, &exec);
        let later_file_op = timed(&mut sb, &file_op);
        let before = sb.metrics().unwrap().cpu_time;
        std::thread::sleep(Duration::from_secs(1));
        let idle_cpu = sb.metrics().unwrap().cpu_time - before;
        println!(
            "from_snapshot {resumed:.2?} (map {:.2?}, restore {:.2?}, connect {:.2?}, first reply \
             {:.2?}) | file op {first_file_op:.2?}, later {later_file_op:.2?} | exec `true` \
             {first_exec:.2?}, later {second_exec:.2?} | vCPU CPU over 1 s idle {idle_cpu:.2?}",
            p.map, p.restore, p.connect, p.first_reply
        );
    }
}
