//! Tells the tests whether this machine can run the KVM tier, so that a test that cannot run
//! here is reported as *ignored, with the reason* (`#[cfg_attr(no_kvm, ignore = "...")]`), as
//! in `kvm-tier/build.rs`.
//!
//! - `no_kvm`: `/dev/kvm` cannot be opened read-write by the user building (and so running)
//!   the tests.

use std::fs::OpenOptions;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(no_kvm)");
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
}
