//! `Sandbox::metrics` on real WASI sandboxes: CPU time of guest calls, linear memory in use,
//! bytes written to files, and a managed sandbox read in standby without waking it.

#![allow(clippy::unwrap_used)] // helpers outside #[test] functions unwrap too

mod common;

use std::time::Duration;

use common::{Env, python};
use dormant_core::{Managed, Sandbox, State};

#[test]
fn cpu_time_grows_with_a_busy_cell() {
    let env = Env::new();
    let mut sb = python(&env);
    let before = sb.metrics().unwrap().cpu_time;
    // A fixed amount of interpreter work (millions of bytecodes: far over a millisecond).
    let ex = sb
        .run_code("print(sum(i * i for i in range(2_000_000)) > 0)")
        .unwrap();
    assert_eq!(ex.stdout, "True\n");
    let after = sb.metrics().unwrap().cpu_time;
    assert!(
        after >= before + Duration::from_millis(1),
        "{before:?} -> {after:?}"
    );
    // Reading metrics runs nothing.
    assert_eq!(sb.metrics().unwrap().cpu_time, after);
}

#[test]
fn memory_grows_with_a_big_list_and_stays_under_the_cap() {
    let env = Env::new();
    let mut sb = python(&env);
    let m0 = sb.metrics().unwrap();
    assert!(m0.memory_bytes > 0, "a live instance has linear memory");
    assert_eq!(m0.memory_limit_bytes, sb.spec().memory_limit);
    sb.run_code("big = list(range(8_000_000))").unwrap();
    let m1 = sb.metrics().unwrap();
    // 8 M list slots alone are 64 MB.
    assert!(
        m1.memory_bytes >= m0.memory_bytes + (60 << 20),
        "{} -> {}",
        m0.memory_bytes,
        m1.memory_bytes
    );
    assert!(m1.memory_bytes <= m1.memory_limit_bytes);
}

#[test]
fn disk_bytes_written_counts_what_a_cell_writes_to_files() {
    let env = Env::new();
    let mut sb = python(&env);
    let before = sb.metrics().unwrap().disk_bytes_written;
    // Output to stdout is not a file write.
    sb.run_code("print('x' * 100_000)").unwrap();
    let after_print = sb.metrics().unwrap().disk_bytes_written;
    assert!(after_print - before < 100_000, "{before} -> {after_print}");
    sb.run_code(
        "with open('/tmp/blob', 'wb') as f:\n    for _ in range(10):\n        f.write(b'a' * 100_000)",
    )
    .unwrap();
    let after = sb.metrics().unwrap().disk_bytes_written;
    assert!(after >= after_print + 1_000_000, "{after_print} -> {after}");
    // The files API's writes count too.
    sb.write_file("/tmp/other", &[7u8; 5000]).unwrap();
    assert!(sb.metrics().unwrap().disk_bytes_written >= after + 5000);
}

#[test]
fn a_standby_managed_sandbox_reports_zero_memory_and_its_counters_without_waking() {
    let env = Env::new();
    let mut sb = python(&env);
    sb.run_code("with open('/tmp/f', 'wb') as f:\n    f.write(b'z' * 300_000)")
        .unwrap();
    let m = Managed::new(sb, None);
    let running = m.metrics().unwrap();
    assert!(running.memory_bytes > 0);
    m.standby().unwrap();
    let asleep = m.metrics().unwrap();
    assert_eq!(
        m.state(),
        State::Standby,
        "reading metrics does not wake it"
    );
    assert_eq!(m.stats().wakes, 0);
    assert_eq!(asleep.memory_bytes, 0);
    assert_eq!(asleep.memory_limit_bytes, running.memory_limit_bytes);
    assert!(asleep.cpu_time >= running.cpu_time);
    assert!(asleep.disk_bytes_written >= 300_000);
    // Woken, it goes on counting from what it kept.
    m.run_code("x = 1").unwrap();
    let woken = m.metrics().unwrap();
    assert!(woken.memory_bytes > 0);
    assert!(woken.cpu_time >= asleep.cpu_time);
    assert!(woken.disk_bytes_written >= asleep.disk_bytes_written);
}
