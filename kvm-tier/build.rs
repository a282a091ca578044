//! Tells the tests what this machine offers, so that a test that cannot run here is reported as
//! *ignored, with the reason*, in libtest's own summary (`#[cfg_attr(no_kvm, ignore = "...")]`)
//! instead of passing without doing anything.
//!
//! - `no_kvm`: `/dev/kvm` cannot be opened read-write by the user building (and so running)
//!   the tests.
//! - `not_root`: the tests that mount a small filesystem of their own (a full store) need root.

use std::fs::OpenOptions;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(no_kvm)");
    println!("cargo::rustc-check-cfg=cfg(not_root)");
    // Re-checked when /dev/kvm appears or goes (a missing path always re-runs the script).
    println!("cargo::rerun-if-changed=/dev/kvm");
    let kvm = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !kvm {
        println!("cargo::rustc-cfg=no_kvm");
    }
    if !is_root() {
        println!("cargo::rustc-cfg=not_root");
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}
