//! The WASI tier through dormant's tier-independent contract: its [`Runtime`] giving
//! `Box<dyn Sandbox>`, and a [`Managed`] `Box<dyn Sandbox>` reaching the capabilities, as the
//! Python module and agent adapters hold a sandbox without naming its tier.

#![allow(clippy::unwrap_used)] // helpers outside #[test] functions unwrap too

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{CMD, Env, runtime};
use dormant_core::{
    Command, Error, Grants, Managed, Runtime, Sandbox, SandboxSpec, State, Tier, Workload,
};

fn printed(sb: &mut dyn Sandbox, code: &str) -> String {
    let ex = sb.run_code(code).unwrap();
    assert!(ex.error.is_none(), "{code:?} failed: {:?}", ex.error);
    ex.stdout
}

#[test]
fn runtime_creates_resumes_and_forks_boxed_sandboxes() {
    let env = Env::new();
    let rt: &dyn Runtime = runtime();
    assert_eq!(rt.tier(), Tier::Wasi);
    let mut sb = rt.create(env.store.clone(), SandboxSpec::python()).unwrap();
    assert_eq!(sb.tier(), Tier::Wasi);
    printed(sb.as_mut(), "x = 41");
    let snap = sb.standby().unwrap();
    assert_eq!(sb.state(), State::Standby);

    let mut resumed = rt.resume(env.store.clone(), &snap, &Grants::new()).unwrap();
    assert_eq!(resumed.id(), sb.id(), "a resume is the same sandbox");
    assert_eq!(printed(resumed.as_mut(), "print(x + 1)"), "42\n");

    // Children of the stored snapshot: their own ids, the snapshot's state, diverging apart.
    let mut kids = rt
        .fork(env.store.clone(), &snap, &Grants::new(), 2)
        .unwrap();
    let ids: HashSet<&str> = kids.iter().map(|k| k.id()).chain([sb.id()]).collect();
    assert_eq!(ids.len(), 3, "every child has an id of its own");
    printed(kids[0].as_mut(), "x = 0");
    assert_eq!(printed(kids[0].as_mut(), "print(x)"), "0\n");
    assert_eq!(printed(kids[1].as_mut(), "print(x)"), "41\n");
    assert_eq!(printed(resumed.as_mut(), "print(x)"), "41\n");

    // A deadline of the call's own, through the box.
    let r = resumed.run_code_with_timeout("while True: pass", Some(Duration::from_millis(300)));
    assert!(matches!(r, Err(Error::Deadline { .. })), "{r:?}");
}

#[test]
fn runtime_refuses_a_spec_of_another_tier() {
    let env = Env::new();
    let rt: &dyn Runtime = runtime();
    let r = rt.create(env.store.clone(), SandboxSpec::linux());
    assert!(matches!(r, Err(Error::InvalidSpec(_))), "{r:?}");
}

#[test]
fn managed_box_answers_what_the_tier_lacks() {
    let env = Env::new();
    let rt: &dyn Runtime = runtime();
    let sb = rt
        .create(
            env.store.clone(),
            SandboxSpec::new(Tier::Wasi, Workload::Files),
        )
        .unwrap();
    let m = Managed::new(sb, None);
    assert_eq!(m.tier(), Tier::Wasi);
    m.write_file("/bin/copy.wasm", &wat::parse_str(CMD).unwrap())
        .unwrap();

    // No streaming here: each stream comes whole, once, when the command has ended.
    let (mut outs, mut errs) = (Vec::new(), Vec::new());
    let code = m
        .exec_streaming(
            &Command::new(["/bin/copy.wasm", "a"]).stdin(b"hi".to_vec()),
            &mut |c| outs.push(c.to_vec()),
            &mut |c| errs.push(c.to_vec()),
        )
        .unwrap();
    assert_eq!(code, 2, "exit status is argc");
    assert_eq!(outs, vec![b"hi".to_vec()]);
    assert_eq!(errs, vec![b"to stderr\n".to_vec()]);

    // No background processes: every process call is Unsupported, naming why.
    for r in [
        m.spawn(&Command::new(["/bin/copy.wasm"])).map(drop),
        m.wait(1, None).map(drop),
        m.output(1).map(drop),
        m.signal(1, 15),
    ] {
        match r {
            Err(e @ Error::Unsupported { .. }) => {
                assert!(e.to_string().contains("background"), "{e}")
            }
            other => panic!("want Unsupported, got {other:?}"),
        }
    }

    // A sandbox in standby is not woken for a call its tier cannot answer.
    m.standby().unwrap();
    let r = m.spawn(&Command::new(["/bin/copy.wasm"]));
    assert!(matches!(r, Err(Error::Unsupported { .. })), "{r:?}");
    assert_eq!((m.state(), m.stats().wakes), (State::Standby, 0));

    // Its interrupt poisons, so it does not stop commands.
    assert!(!m.interrupter().unwrap().stops_commands());

    // A managed box forks into managed boxes.
    let kids = m.fork(2).unwrap();
    assert_eq!(kids.len(), 2);
    for k in &kids {
        assert_eq!(k.read_file("/out.txt").unwrap(), b"hi");
        assert_ne!(k.id(), m.id());
    }
}
