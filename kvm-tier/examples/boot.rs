//! Boots the guest image and prints its console: `cargo run --release -p dormant-kvm --example
//! boot -- VMLINUX INITRAMFS [MEM_MIB] [SECONDS]`.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use dormant_kvm::boot::base_cmdline;
use dormant_kvm::machine::{Machine, MachineConfig};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mem: usize = args.get(3).map_or(256, |s| s.parse().unwrap());
    let secs: u64 = args.get(4).map_or(60, |s| s.parse().unwrap());
    let cfg = MachineConfig {
        kernel: args[1].clone().into(),
        initramfs: Some(args[2].clone().into()),
        mem_size: mem << 20,
        cmdline: base_cmdline(dormant_kvm::detect().is_slow()).replace(
            " quiet",
            if std::env::var_os("VERBOSE").is_some() {
                ""
            } else {
                " quiet"
            },
        ) + &std::env::var("EXTRA").unwrap_or_default(),
        console_echo: true,
        disk_image: None,
        volume_slots: 0,
        volumes: Vec::new(),
    };
    let t = Instant::now();
    let m = Machine::boot(&cfg).unwrap();
    let ok = m
        .console()
        .wait_for("dormant-agent ready", Duration::from_secs(secs));
    eprintln!("\n[host] ready={ok} after {:?}", t.elapsed());
    if let (Some(e), _) = m.shutdown() {
        eprintln!("[host] {e}");
    }
}
