//! Volumes: directories that outlive sandboxes and snapshots, mounted read-write or read-only.

#![allow(clippy::unwrap_used)] // helpers outside #[test] functions unwrap too

mod common;

use common::{Env, out, runtime};
use dormant_core::{Error, Sandbox, SandboxSpec};

#[test]
fn volume_contents_outlive_snapshots_and_are_shared() {
    let env = Env::new();
    let vol = env.store.volume("datasets").unwrap();
    assert_eq!(env.store.volumes().unwrap(), vec!["datasets".to_owned()]);
    let spec = SandboxSpec::python().mount(&vol, "/data", false);
    let mut a = runtime().create(env.store.clone(), spec).unwrap();
    out(&mut a, "open('/tmp/own.txt', 'w').write('own v1')");
    let older = a.checkpoint().unwrap();
    out(
        &mut a,
        "open('/data/result.csv', 'w').write('a,b\\n1,2\\n')\nopen('/tmp/own.txt', 'w').write('own v2')",
    );

    // Resuming the older snapshot rolls back the sandbox's own files, not the volume.
    a.resume(&older).unwrap();
    assert_eq!(
        out(&mut a, "print(open('/tmp/own.txt').read())"),
        "own v1\n"
    );
    assert_eq!(
        out(&mut a, "print(open('/data/result.csv').read(), end='')"),
        "a,b\n1,2\n"
    );

    // Another sandbox mounting the same volume read-only sees the file and cannot write.
    let mut b = runtime()
        .create(
            env.store.clone(),
            SandboxSpec::python().mount(&vol, "/shared", true),
        )
        .unwrap();
    assert_eq!(
        out(&mut b, "print(open('/shared/result.csv').read(), end='')"),
        "a,b\n1,2\n"
    );
    let ex = b
        .run_code("open('/shared/evil.txt', 'w').write('x')")
        .unwrap();
    let e = ex
        .error
        .expect("a write to a read-only mount fails in the guest");
    assert!(e.name.contains("Error"), "{e:?}");
    assert!(!vol.join("evil.txt").exists());
    match b.write_file("/shared/evil.txt", b"x") {
        Err(Error::ReadOnly { path }) => assert_eq!(path, "/shared/evil.txt"),
        other => panic!("expected a read-only error, got {other:?}"),
    }
    assert!(matches!(
        b.remove("/shared/result.csv"),
        Err(Error::ReadOnly { .. })
    ));
    assert_eq!(b.read_file("/shared/result.csv").unwrap(), b"a,b\n1,2\n");

    // The volume outlives both sandboxes.
    drop(a);
    drop(b);
    assert_eq!(
        std::fs::read(vol.join("result.csv")).unwrap(),
        b"a,b\n1,2\n"
    );
    env.store.delete_volume("datasets").unwrap();
    assert!(env.store.volumes().unwrap().is_empty());
}

#[test]
fn bad_volume_names_are_refused() {
    let env = Env::new();
    for bad in ["", "../x", "a/b", ".hidden", &"x".repeat(65)] {
        assert!(
            matches!(env.store.volume(bad), Err(Error::InvalidArgument(_))),
            "{bad:?}"
        );
    }
}
