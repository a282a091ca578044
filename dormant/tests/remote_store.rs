//! `dormant::Store` with an object store (a real SeaweedFS on 127.0.0.1): two hosts, each a
//! `RemoteStore` with its own cache, hand sandboxes to each other through the bucket.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use dormant::{
    Error, Grants, LocalStore, RemoteOptions, RemoteStore, SandboxSpec, Store, Template, Tier,
};
use dormant_remote::testing::SeaweedFs;

fn host(s3: &SeaweedFs, prefix: &str, cache: &std::path::Path) -> Store {
    let opts = RemoteOptions {
        lease_ttl: Duration::from_secs(5),
        ..s3.options()
    };
    let cache = Arc::new(LocalStore::open(cache).unwrap());
    Store::Remote(RemoteStore::open(&s3.url(prefix), cache, opts).unwrap())
}

#[test]
fn a_python_session_moves_between_hosts_with_one_holder_at_a_time() {
    let s3 = SeaweedFs::start();
    let tmp = tempfile::tempdir().unwrap();
    let a = host(&s3, "move", &tmp.path().join("a"));
    let b = host(&s3, "move", &tmp.path().join("b"));

    let mut sb = a.create(Tier::Wasi, SandboxSpec::python()).unwrap();
    sb.run_code("x = 41").unwrap();
    let snap = sb.checkpoint().unwrap();
    a.wait_durable(&*sb, &snap).unwrap();
    // A holds it: B's connect is refused, naming A.
    match b.connect(sb.id(), &Grants::new()) {
        Err(Error::SandboxBusy { holder, .. }) => assert!(holder.contains("pid")),
        Err(e) => panic!("expected SandboxBusy, got {e}"),
        Ok(_) => panic!("two hosts held one sandbox"),
    }
    sb.run_code("x += 1").unwrap();
    let snap = sb.standby().unwrap();
    a.wait_durable(&*sb, &snap).unwrap();
    let id = sb.id().to_owned();
    // Standby released the lease once uploaded: B resumes the latest state.
    let (mut on_b, resumed) = b.connect_at(&id, &Grants::new()).unwrap();
    assert_eq!(resumed, snap);
    assert_eq!(on_b.run_code("print(x)").unwrap().stdout, "42\n");
    // Now A's handle cannot resume it (B holds it).
    assert!(matches!(sb.resume(&snap), Err(Error::SandboxBusy { .. })));
    // Forks of B's sandbox are new sandboxes, each with its own lease.
    let children = on_b.fork_boxed(2).unwrap();
    for c in &children {
        let head = b
            .remote()
            .unwrap()
            .head(c.id())
            .unwrap()
            .expect("a child's head");
        assert!(head.holder.is_some());
    }
}

#[test]
fn a_template_published_on_one_host_serves_another() {
    let s3 = SeaweedFs::start();
    let tmp = tempfile::tempdir().unwrap();
    let a = host(&s3, "tpl", &tmp.path().join("a"));
    let b = host(&s3, "tpl", &tmp.path().join("b"));
    Template::new("prepared", Tier::Wasi)
        .run("prepared = 'on A'")
        .build(a.local().clone())
        .unwrap();
    assert!(b.template("prepared").is_err(), "not published yet");
    a.publish_template("prepared").unwrap();
    let mut sb = b.create_from_template("prepared", &Grants::new()).unwrap();
    assert_eq!(sb.run_code("print(prepared)").unwrap().stdout, "on A\n");
}

#[test]
fn hosts_resume_one_snapshot_in_turn_after_dropping_it() {
    let s3 = SeaweedFs::start();
    let tmp = tempfile::tempdir().unwrap();
    let a = host(&s3, "turns", &tmp.path().join("a"));
    let mut sb = Store::Local(a.local().clone())
        .create(Tier::Wasi, SandboxSpec::python())
        .unwrap();
    sb.run_code("x = 1").unwrap();
    let snap = sb.standby().unwrap();
    drop(sb);
    a.remote().unwrap().push(&snap).unwrap();
    // New hosts one after another, each dropping the sandbox when done (its release queued).
    for i in 0..3 {
        let h = host(&s3, "turns", &tmp.path().join(format!("h{i}")));
        let mut sb = h.resume(&snap, &Grants::new()).unwrap();
        assert_eq!(sb.run_code("print(x)").unwrap().stdout, "1\n");
    }
    // One host resuming it again and again.
    let warm = host(&s3, "turns", &tmp.path().join("warm"));
    for _ in 0..3 {
        let mut sb = warm.resume(&snap, &Grants::new()).unwrap();
        assert_eq!(sb.run_code("print(x)").unwrap().stdout, "1\n");
    }
}

#[test]
fn only_a_sandbox_s_own_uploads_move_its_head() {
    let s3 = SeaweedFs::start();
    let tmp = tempfile::tempdir().unwrap();
    let a = host(&s3, "own", &tmp.path().join("a"));
    let mut one = a.create(Tier::Wasi, SandboxSpec::python()).unwrap();
    let mut two = a.create(Tier::Wasi, SandboxSpec::python()).unwrap();
    let snap_two = two.checkpoint().unwrap();
    a.wait_durable(&*two, &snap_two).unwrap();
    let snap_one = one.checkpoint().unwrap();
    a.wait_durable(&*one, &snap_one).unwrap();
    // Another sandbox's snapshot is not an upload of this one's.
    assert!(matches!(
        a.wait_durable(&*one, &snap_two),
        Err(Error::InvalidArgument(_))
    ));
    let head = a.remote().unwrap().head(one.id()).unwrap().unwrap();
    assert_eq!(head.snapshot, Some(snap_one));
}
