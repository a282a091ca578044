//! Host access on resume comes from the caller (`Grants`), never from the snapshot: a forged
//! manifest cannot mount a host directory or pick the module file that runs.

#![allow(clippy::unwrap_used)] // helpers outside #[test] functions unwrap too

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{CMD, Env, runtime};
use dormant_core::snapshot::format;
use dormant_core::{
    Error, GrantError, Grants, LocalStore, Managed, Sandbox, SandboxSpec, SnapshotId, State, Tier,
    Workload,
};
use dormant_wasi::Val;

/// A files-only sandbox spec (no interpreter: fast).
fn files() -> SandboxSpec {
    SandboxSpec::new(Tier::Wasi, Workload::Files)
}

fn dir_with(env: &Env, name: &str, files: &[(&str, &str)]) -> PathBuf {
    let d = env.path(name);
    std::fs::create_dir_all(&d).unwrap();
    for (f, text) in files {
        std::fs::write(d.join(f), text).unwrap();
    }
    d
}

/// Rewrites snapshot `id`'s manifest as a forger (or a build from before grants) would: the
/// mount point `mount.0` names host directory `mount.1`, the module path is `module`;
/// re-encoded with valid checksums.
fn forge(store: &LocalStore, id: &SnapshotId, mount: Option<(&str, &Path)>, module: Option<&Path>) {
    let path = store.snapshot_dir(id).join("manifest.dsnp");
    let bytes = std::fs::read(&path).unwrap();
    let sections = format::decode(&bytes, 1 << 26).unwrap();
    assert_eq!(&sections[0].0, b"META");
    let mut meta: serde_json::Value = serde_json::from_slice(sections[0].1).unwrap();
    let mut named = Vec::new();
    if let Some((guest, host)) = mount {
        let host = host.display().to_string();
        for m in meta["spec"]["mounts"].as_array_mut().unwrap() {
            if m["guest"] == guest {
                m["host"] = host.clone().into();
            }
        }
        named.push(host);
    }
    if let Some(module) = module {
        let module = module.display().to_string();
        meta["spec"]["workload"]["module"]["path"] = module.clone().into();
        named.push(module);
    }
    let meta = serde_json::to_vec(&meta).unwrap();
    let mut out: Vec<(format::Tag, &[u8])> = vec![(*b"META", &meta)];
    out.extend(sections[1..].iter().copied());
    std::fs::write(&path, format::encode(&out)).unwrap();
    // The store reads it as a valid snapshot naming those host paths.
    let text = String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned();
    for n in named {
        assert!(text.contains(&n), "{n} forged into the manifest");
    }
    store.manifest(id).unwrap();
}

fn names(sb: &mut impl Sandbox, dir: &str) -> Vec<String> {
    sb.list_dir(dir)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect()
}

fn grant_error(r: dormant_core::Result<impl std::fmt::Debug>) -> GrantError {
    match r {
        Err(Error::Grant { source, .. }) => source,
        other => panic!("expected a grant error, got {other:?}"),
    }
}

#[test]
fn a_snapshot_never_grants_a_host_directory() {
    let env = Env::new();
    let granted = dir_with(&env, "granted", &[("own.txt", "granted dir")]);
    let secret = dir_with(&env, "secret", &[("secret.txt", "top secret")]);
    let mut sb = runtime()
        .create(env.store.clone(), files().mount(&granted, "/data", false))
        .unwrap();
    sb.write_file("/home.txt", b"the sandbox's own").unwrap();
    let id = sb.standby().unwrap();
    let manifest = std::fs::read(env.store.snapshot_dir(&id).join("manifest.dsnp")).unwrap();
    let granted_text = granted.display().to_string();
    assert!(
        !String::from_utf8_lossy(&manifest).contains(&granted_text),
        "the snapshot records mount points, not host directories"
    );

    // Forged: the manifest names the secret directory for /data.
    forge(&env.store, &id, Some(("/data", &secret)), None);

    // Without a grant: an error naming the mount point, nothing mounted.
    let e = grant_error(runtime().resume(env.store.clone(), &id));
    assert!(
        matches!(&e, GrantError::MountMissing { guest, read_only: false } if guest == "/data"),
        "{e:?}"
    );
    // Detached: /data is empty and read-only; the sandbox's own files are there.
    let mut r = runtime()
        .resume_with(env.store.clone(), &id, &Grants::new().detach_missing(true))
        .unwrap();
    assert!(!r.exists("/data/secret.txt").unwrap());
    assert!(names(&mut r, "/data").is_empty());
    assert!(matches!(
        r.write_file("/data/planted.txt", b"x"),
        Err(Error::ReadOnly { .. })
    ));
    assert_eq!(r.read_file("/home.txt").unwrap(), b"the sandbox's own");
    // Its snapshots keep the mount point: granted again, it is attached again.
    let detached = r.standby().unwrap();
    let mut r = runtime()
        .resume_with(
            env.store.clone(),
            &detached,
            &Grants::new().mount(&granted, "/data", false),
        )
        .unwrap();
    assert_eq!(r.read_file("/data/own.txt").unwrap(), b"granted dir");
    r.write_file("/data/new.txt", b"written").unwrap();
    assert_eq!(std::fs::read(granted.join("new.txt")).unwrap(), b"written");

    // The original handle resumes the forged snapshot with its own grant.
    sb.resume(&id).unwrap();
    assert_eq!(sb.read_file("/data/own.txt").unwrap(), b"granted dir");
    assert!(!sb.exists("/data/secret.txt").unwrap());
    let mut left: Vec<_> = std::fs::read_dir(&secret)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["secret.txt"],
        "the secret directory was never touched"
    );
}

#[test]
fn a_resume_grants_only_the_snapshots_mount_points_and_never_widens_them() {
    let env = Env::new();
    let work = dir_with(&env, "work", &[("w.txt", "work")]);
    let reference = dir_with(&env, "ref", &[("r.txt", "reference")]);
    let mut sb = runtime()
        .create(
            env.store.clone(),
            files()
                .mount(&work, "/work", false)
                .mount(&reference, "/ref", true),
        )
        .unwrap();
    let id = sb.checkpoint().unwrap();
    let both = Grants::new()
        .mount(&reference, "/ref", true)
        .mount(&work, "/work/", false);

    // A mount point the snapshot did not have.
    let e = grant_error(runtime().resume_with(
        env.store.clone(),
        &id,
        &both.clone().mount(&work, "/extra", false),
    ));
    assert!(
        matches!(&e, GrantError::MountNotInSnapshot { guest, .. } if guest == "/extra"),
        "{e:?}"
    );
    // A read-only mount point granted writable.
    let e = grant_error(
        runtime().resume_with(
            env.store.clone(),
            &id,
            &Grants::new()
                .mount(&reference, "/ref", false)
                .mount(&work, "/work", false),
        ),
    );
    assert!(matches!(&e, GrantError::MountWidened { guest } if guest == "/ref"));
    // A writable one granted read-only stays read-only.
    let mut r = runtime()
        .resume_with(
            env.store.clone(),
            &id,
            &Grants::new()
                .mount(&reference, "/ref", true)
                .mount(&work, "/work", true),
        )
        .unwrap();
    assert_eq!(r.read_file("/work/w.txt").unwrap(), b"work");
    assert!(matches!(
        r.write_file("/work/x.txt", b"x"),
        Err(Error::ReadOnly { .. })
    ));
    assert!(!work.join("x.txt").exists());
    // Grants in any order and spelling fit the snapshot's mount points.
    let mut r = runtime()
        .resume_with(env.store.clone(), &id, &both)
        .unwrap();
    r.write_file("/work/x.txt", b"x").unwrap();
    assert_eq!(r.read_file("/ref/r.txt").unwrap(), b"reference");
    assert_eq!(r.grants(), &both);
}

#[test]
fn the_module_that_runs_comes_from_the_caller() {
    let env = Env::new();
    let mut sb = runtime().create(env.store.clone(), env.toy_spec()).unwrap();
    sb.call("poke", &[Val::I32(2), Val::I32(4242)]).unwrap();
    let id = sb.standby().unwrap();
    // The recorded path holds the right module, yet a resume that names none is refused.
    let e = grant_error(runtime().resume(env.store.clone(), &id));
    assert!(matches!(&e, GrantError::ModuleMissing { .. }), "{e:?}");
    // Another module under the caller's name is refused by content.
    let cmd = env.path("cmd.wasm");
    std::fs::write(&cmd, wat::parse_str(CMD).unwrap()).unwrap();
    let e = grant_error(runtime().resume_with(env.store.clone(), &id, &Grants::new().module(&cmd)));
    assert!(matches!(&e, GrantError::ModuleMismatch { path, .. } if path == &cmd));
    // The snapshot's module under another name runs; the recorded path is not needed.
    let copy = env.path("copy.wasm");
    std::fs::copy(env.toy_path(), &copy).unwrap();
    std::fs::remove_file(env.toy_path()).unwrap();
    forge(&env.store, &id, None, Some(&cmd));
    let mut r = runtime()
        .resume_with(env.store.clone(), &id, &Grants::new().module(&copy))
        .unwrap();
    assert_eq!(
        r.call("peek", &[Val::I32(2)]).unwrap()[0].unwrap_i32(),
        4242
    );
    assert_eq!(r.spec().workload, Workload::Module { path: copy.clone() });
    // A handle resumes a snapshot of the module it runs without reading any file, unless its
    // caller names another file: that one is checked.
    std::fs::remove_file(&copy).unwrap();
    let e = grant_error(sb.resume_with(&id, &Grants::new().module(&cmd)));
    assert!(matches!(&e, GrantError::ModuleMismatch { .. }), "{e:?}");
    assert_eq!(
        sb.state(),
        State::Standby,
        "a refused resume leaves the handle as it was"
    );
    sb.resume(&id).unwrap();
    assert_eq!(
        sb.call("peek", &[Val::I32(2)]).unwrap()[0].unwrap_i32(),
        4242
    );
}

/// Waits (a minute at most) until the managed sandbox went to standby by itself.
fn until_standby<S: Sandbox>(m: &Managed<S>) {
    let t = Instant::now();
    while m.state() != State::Standby {
        assert!(t.elapsed() < Duration::from_secs(60), "never went idle");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn auto_standby_wakes_and_forks_keep_the_callers_grants() {
    let env = Env::new();
    let first = dir_with(&env, "first", &[("f.txt", "first")]);
    let second = dir_with(&env, "second", &[("f.txt", "second")]);
    let sb = runtime()
        .create(env.store.clone(), files().mount(&first, "/data", false))
        .unwrap();
    let m = Managed::new(sb, Some(Duration::from_millis(100)));
    m.write_file("/data/before.txt", b"1").unwrap();
    until_standby(&m);
    // The wake resumes a snapshot that names no directory: the sandbox's grant is used.
    assert_eq!(m.read_file("/data/f.txt").unwrap(), b"first");
    assert_eq!(m.stats().wakes, 1);

    // A resume with other grants: later wakes keep those.
    let id = m.checkpoint().unwrap();
    m.resume_with(&id, &Grants::new().mount(&second, "/data", true))
        .unwrap();
    until_standby(&m);
    assert_eq!(m.read_file("/data/f.txt").unwrap(), b"second");
    assert!(matches!(
        m.write_file("/data/x.txt", b"x"),
        Err(Error::ReadOnly { .. })
    ));
    assert_eq!(m.stats().wakes, 2);

    // Children of a fork have their parent's grants.
    let kids = m.fork(2).unwrap();
    for (i, k) in kids.iter().enumerate() {
        assert_eq!(k.read_file("/data/f.txt").unwrap(), b"second", "child {i}");
        assert!(k.with(|s| Ok(s.grants().clone())).unwrap().mounts[0].read_only);
    }
}
