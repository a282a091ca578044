//! Tells the tests what this machine offers, so that a test that cannot run here is reported as
//! *ignored, with the reason*, in libtest's own summary (`#[cfg_attr(not_root, ignore = "...")]`)
//! instead of passing without doing anything.
//!
//! - `not_root`: the tests that mount a small filesystem of their own (a full store) need root.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(not_root)");
    println!("cargo::rerun-if-changed=build.rs");
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
