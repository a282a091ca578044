//! Auto-standby and transparent wake (`dormant_core::Managed`) on real WASI sandboxes.

#![allow(clippy::unwrap_used)] // helpers outside #[test] functions unwrap too

mod common;

use std::time::Duration;

use common::{Env, runtime};
use dormant_core::{Managed, Sandbox, SandboxSpec, State};
use dormant_wasi::{Val, WasiSandbox};

fn bump(m: &Managed<WasiSandbox>) -> i64 {
    m.with(|sb| sb.call("bump", &[])).unwrap()[0].unwrap_i64()
}

#[test]
fn an_idle_sandbox_goes_to_standby_and_the_next_call_wakes_it() {
    let env = Env::new();
    let mut sb = runtime()
        .create(env.store.clone(), SandboxSpec::python())
        .unwrap();
    sb.run_code("data = list(range(1000))").unwrap();
    let m = Managed::new(sb, Some(Duration::from_millis(200)));
    assert_eq!(m.state(), State::Running);
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(m.state(), State::Standby, "idle past its standby time");
    assert_eq!(m.stats().auto_standbys, 1);
    let ex = m.run_code("print(sum(data))").unwrap();
    assert_eq!(
        ex.stdout, "499500\n",
        "the state it had, without the caller resuming anything"
    );
    assert_eq!(m.state(), State::Running);
    assert_eq!(m.stats().wakes, 1);
}

#[test]
fn disabled_auto_standby_never_sleeps() {
    let env = Env::new();
    let m = Managed::new(
        runtime().create(env.store.clone(), env.toy_spec()).unwrap(),
        None,
    );
    bump(&m);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(m.state(), State::Running);
    assert_eq!(m.stats().auto_standbys, 0);
}

#[test]
fn idle_detection_does_not_fire_during_a_running_call() {
    let env = Env::new();
    let mut sb = runtime()
        .create(env.store.clone(), SandboxSpec::python())
        .unwrap();
    sb.run_code("import time").unwrap();
    let m = Managed::new(sb, Some(Duration::from_millis(50)));
    let ex = m.run_code("time.sleep(0.5)\nprint('done')").unwrap();
    assert_eq!(ex.stdout, "done\n");
    assert_eq!(m.stats().auto_standbys, 0, "no standby while the call ran");
    assert_eq!(m.stats().wakes, 0);
}

#[test]
fn calls_racing_with_auto_standby_are_neither_lost_nor_repeated() {
    let env = Env::new();
    let sb = runtime().create(env.store.clone(), env.toy_spec()).unwrap();
    let m = Managed::new(sb, Some(Duration::from_millis(3)));
    // Phase 1, one caller: pauses from 0 to 8 ms around the 3 ms idle time, so that calls land
    // before, during and after standbys.
    let mut all: Vec<i64> = (0..60u64)
        .map(|i| {
            std::thread::sleep(Duration::from_micros((i * 7919) % 8000));
            bump(&m)
        })
        .collect();
    // Phase 2, several callers at once, racing each other and the timer.
    let threads: Vec<_> = (0..3u64)
        .map(|t| {
            let m = m.clone();
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                for i in 0..40u64 {
                    std::thread::sleep(Duration::from_micros((i * 7919 + t * 104_729) % 6000));
                    seen.push(bump(&m));
                }
                seen
            })
        })
        .collect();
    all.extend(threads.into_iter().flat_map(|t| t.join().unwrap()));
    all.sort_unstable();
    assert_eq!(
        all,
        (1..=180).collect::<Vec<_>>(),
        "every call ran exactly once, in a consistent state"
    );
    let stats = m.stats();
    assert!(
        stats.auto_standbys > 0 && stats.wakes > 0,
        "the race was exercised: {stats:?}"
    );
    assert_eq!(
        m.with(|sb| sb.call("bump", &[])).unwrap()[0].unwrap_i64(),
        181
    );
}

#[test]
fn manual_standby_and_kill_through_the_handle() {
    let env = Env::new();
    let m = Managed::new(
        runtime().create(env.store.clone(), env.toy_spec()).unwrap(),
        Some(Duration::from_secs(60)),
    );
    m.with(|sb| sb.call("poke", &[Val::I32(1), Val::I32(9)]))
        .unwrap();
    let id = m.standby().unwrap();
    assert_eq!(
        m.standby().unwrap(),
        id,
        "standby of a sleeping sandbox is a no-op"
    );
    assert_eq!(m.state(), State::Standby);
    assert_eq!(
        m.with(|sb| sb.call("peek", &[Val::I32(1)])).unwrap()[0].unwrap_i32(),
        9
    );
    assert_eq!(m.stats().wakes, 1);
    m.kill().unwrap();
    assert_eq!(m.state(), State::Killed);
    assert!(m.read_file("/x").is_err());
}

#[test]
fn the_wasi_tier_has_no_network_policy_to_set_or_read() {
    let env = Env::new();
    let sb = runtime()
        .create(env.store.clone(), SandboxSpec::python())
        .unwrap();
    let m = Managed::new(sb, Some(Duration::from_millis(200)));
    let policy = dormant_core::NetworkPolicy::parse(["host"], [""; 0]).unwrap();
    for r in [m.set_network(policy).map(|_| ()), m.network().map(|_| ())] {
        match r {
            Err(dormant_core::Error::Unsupported { op, what }) => {
                assert!(what.contains("no sockets"), "{op}: {what}");
            }
            other => panic!("expected Unsupported, got {other:?}"),
        }
    }
    // A spec asking for networking on this tier is refused before anything is created.
    let spec = SandboxSpec::python().network(dormant_core::NetworkPolicy::open());
    let r = runtime().create(env.store.clone(), spec);
    assert!(
        matches!(r, Err(dormant_core::Error::Unsupported { .. })),
        "{r:?}"
    );
}
