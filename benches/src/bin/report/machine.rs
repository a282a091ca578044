//! The machine table at the top of the report: date, host, CPU and cores, memory, KVM support,
//! rustc, and the versions of dormant and its main dependencies (read from `Cargo.lock`).

use std::collections::BTreeMap;
use std::path::Path;

pub fn machine() -> BTreeMap<&'static str, String> {
    let cmd = |c: &str, a: &[&str]| {
        std::process::Command::new(c)
            .args(a)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| format!("{:.1} GiB", kb as f64 / (1 << 20) as f64))
        .unwrap_or_default();
    let lock = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock"))
        .unwrap_or_default();
    let version = |name: &str| {
        let key = format!("name = \"{name}\"\nversion = \"");
        lock.find(&key)
            .map(|i| {
                lock[i + key.len()..]
                    .split('"')
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
            .unwrap_or_else(|| "?".into())
    };
    let mut m = BTreeMap::new();
    m.insert("date (UTC)", cmd("date", &["-u", "+%Y-%m-%d %H:%M"]));
    m.insert("host", cmd("uname", &["-srm"]));
    m.insert(
        "CPU",
        format!(
            "{cpu}, {} cores",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        ),
    );
    m.insert("memory", mem);
    m.insert("KVM", format!("{:?}", dormant::kvm::detect()));
    m.insert("rustc", cmd("rustc", &["--version"]));
    m.insert(
        "versions",
        format!(
            "dormant {}, wasmtime {}, kvm-ioctls {}, pyo3 {}",
            env!("CARGO_PKG_VERSION"),
            version("wasmtime"),
            version("kvm-ioctls"),
            version("pyo3")
        ),
    );
    m
}
