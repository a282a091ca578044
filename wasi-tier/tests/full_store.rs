//! A store on a real filesystem that fills up (issue 11, faults 1 and 10): checkpoints of a
//! Python session fail for want of space at every stage, the session runs on (touching fresh
//! memory included, which on a full tmpfs used to end the process with SIGBUS), and the first
//! checkpoint after space is freed holds everything, checked by a resume in a new process.
//!
//! Mounting the small filesystems needs root (CI runs as root); elsewhere these tests are
//! reported as ignored.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::{out, runtime};
use dormant_core::testing::{FsKind, SmallFs, Stage, sweep_full_store};
use dormant_core::{LocalStore, Sandbox, SandboxSpec, SnapshotId, State};

const CHILD_ENV: &str = "DORMANT_TEST_FULL_STORE_CHILD";

/// Helper process: resumes the snapshot named in the environment (`store|id|code`) and prints
/// what the code prints between `CHILD-OUT:` and `CHILD-END`.
#[test]
#[ignore = "child-process helper of the full-store tests"]
fn helper_resume_and_run() {
    let arg = std::env::var(CHILD_ENV).expect("started by the parent test");
    let mut parts = arg.splitn(3, '|');
    let (dir, id, code) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let store = Arc::new(LocalStore::open(dir).unwrap());
    let mut sb = runtime()
        .resume(store, &SnapshotId::parse(id).unwrap())
        .unwrap();
    print!("CHILD-OUT:{}CHILD-END", out(&mut sb, code));
}

fn in_new_process(store: &LocalStore, id: &SnapshotId, code: &str) -> String {
    let o = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_resume_and_run",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            CHILD_ENV,
            format!("{}|{}|{}", store.root().display(), id, code),
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let at = stdout.find("CHILD-OUT:").unwrap() + "CHILD-OUT:".len();
    let len = stdout[at..].find("CHILD-END").unwrap();
    stdout[at..at + len].to_string()
}

/// Data in memory and in the sandbox's files, and a line of their hashes.
fn write(sb: &mut dormant_wasi::WasiSandbox, name: &str, seed: u32) {
    out(
        sb,
        &format!(
            "import hashlib, random\n\
             r = random.Random({seed})\n\
             {name} = bytes(r.getrandbits(8) for _ in range(1_500_000))\n\
             with open('/tmp/{name}.bin', 'wb') as f: f.write({name}[::-1])\n"
        ),
    );
}

const CHECK: &str = "import hashlib\n\
    print(*(hashlib.sha256(x).hexdigest()[:16] for x in (a, b, open('/tmp/a.bin','rb').read(), \
    open('/tmp/b.bin','rb').read())))";

fn a_full_store_loses_nothing(kind: FsKind) {
    let tmp = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let mut fs = SmallFs::mount(kind, 384 << 20, 4096, tmp).unwrap();
    let store = Arc::new(LocalStore::open(fs.path().join("store")).unwrap());
    let mut sb = runtime()
        .create(store.clone(), SandboxSpec::python())
        .unwrap();
    write(&mut sb, "a", 1);
    // The live memory is now a mapping of this snapshot's image, on the small filesystem.
    sb.checkpoint().unwrap();
    write(&mut sb, "b", 2);

    // Fault 10: with the filesystem full, the session touches fresh memory (pages that are
    // holes of the mapped image) and keeps running.
    fs.leave_free(0).unwrap();
    out(
        &mut sb,
        "fresh = bytearray(range(256)) * 40000\nassert fresh[255] == 255",
    );
    assert_eq!(sb.state(), State::Running);
    fs.release().unwrap();

    let stages = sweep_full_store(
        &mut fs,
        store.root(),
        &mut sb,
        |sb| sb.checkpoint(),
        |sb| {
            assert_eq!(sb.state(), State::Running);
            assert_eq!(out(sb, "print(len(a) + len(b))"), "3000000\n");
        },
    )
    .unwrap();
    let mut want = vec![Stage::Begin, Stage::Memory, Stage::Files, Stage::Manifest];
    if kind == FsKind::Ext4 {
        want.push(Stage::Commit);
    }
    for s in want {
        assert!(stages.contains(&s), "no failure at stage {s:?}: {stages:?}");
    }
    // Space is back: change more, checkpoint, resume in a new process.
    out(&mut sb, "a = a[::-1]\nb = b + b'tail'");
    let sums = out(&mut sb, CHECK);
    let id = sb.checkpoint().unwrap();
    drop(sb);
    assert_eq!(in_new_process(&store, &id, CHECK), sums);
}

#[test]
#[cfg_attr(
    not_root,
    ignore = "needs root (mounts a small filesystem for the store)"
)]
fn a_full_ext4_store_fails_checkpoints_cleanly_and_loses_nothing() {
    a_full_store_loses_nothing(FsKind::Ext4);
}

#[test]
#[cfg_attr(
    not_root,
    ignore = "needs root (mounts a small filesystem for the store)"
)]
fn a_full_tmpfs_store_fails_checkpoints_cleanly_and_loses_nothing() {
    a_full_store_loses_nothing(FsKind::Tmpfs);
}
