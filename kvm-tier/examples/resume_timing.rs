//! Where the time of a Linux guest's resume goes: `cargo run --release -p dormant-kvm --example
//! resume_timing -- STORE_DIR SNAPSHOT_ID`.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Instant;

use dormant_core::{Command, LocalStore, Sandbox};
use dormant_kvm::sandbox::KvmSandbox;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let store = Arc::new(LocalStore::open(&args[1]).unwrap());
    let id = args[2].parse().unwrap();
    for _ in 0..3 {
        let t = Instant::now();
        let mut sb = KvmSandbox::from_snapshot(store.clone(), &id).unwrap();
        let resumed = t.elapsed();
        let t = Instant::now();
        sb.exec(&Command::new(["true"])).unwrap();
        let first = t.elapsed();
        let t = Instant::now();
        sb.exec(&Command::new(["true"])).unwrap();
        let second = t.elapsed();
        let t = Instant::now();
        sb.exists("/root").unwrap();
        let file_op = t.elapsed();
        println!(
            "from_snapshot {resumed:?} | first exec {first:?} | second exec {second:?} | exists {file_op:?}"
        );
    }
}
