//! Templates on the WASI tier: built once and reused, new independent sandboxes from one,
//! failing steps, rebuilds when the recipe changes, concurrent builds, names.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use dormant::{Error, Grants, LocalStore, Ready, Sandbox, Template, Tier};

fn store() -> (tempfile::TempDir, Arc<LocalStore>) {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::open(tmp.path()).unwrap());
    (tmp, store)
}

fn sales() -> Template {
    Template::new("sales", Tier::Wasi)
        .file("/data/sales.csv", "day,amount\n1,10\n2,32\n")
        .run("rows = open('/data/sales.csv').read().splitlines()[1:]")
        .run("total = sum(int(r.split(',')[1]) for r in rows)")
}

#[test]
fn a_template_built_twice_is_built_once_and_sandboxes_from_it_are_independent() {
    let (_tmp, store) = store();
    let first = sales().build(store.clone()).unwrap();
    assert!(first.built);
    assert_eq!(first.record.name, "sales");
    assert_eq!(first.record.tier, Tier::Wasi);
    let again = sales().build(store.clone()).unwrap();
    assert!(!again.built, "the same recipe is reused");
    assert_eq!(again.record, first.record);
    assert_eq!(
        dormant::templates(&store).unwrap(),
        vec![first.record.clone()]
    );

    let template_sandbox = store.manifest(&first.record.snapshot).unwrap().sandbox_id;
    let mut a = dormant::create_from_template(store.clone(), "sales", &Grants::new()).unwrap();
    let mut b = dormant::create_from_template(store.clone(), "sales", &Grants::new()).unwrap();
    assert_ne!(a.id(), b.id());
    assert_ne!(a.id(), template_sandbox);
    assert_ne!(b.id(), template_sandbox);
    // Both start where the steps left the template.
    assert_eq!(a.run_code("total").unwrap().stdout, "42\n");
    assert_eq!(b.run_code("total").unwrap().stdout, "42\n");
    a.run_code("total = -1").unwrap();
    a.write_file("/data/sales.csv", b"gone").unwrap();
    assert_eq!(b.run_code("total").unwrap().stdout, "42\n");
    assert_eq!(
        b.read_file("/data/sales.csv").unwrap(),
        b"day,amount\n1,10\n2,32\n"
    );
    // A checkpoint of one, resumed, keeps its own state; the template is untouched.
    let snap = a.standby().unwrap();
    // The store's sandboxes: the one that checkpointed, not the template's build sandbox.
    let listed: Vec<String> = store
        .sandboxes()
        .unwrap()
        .into_iter()
        .map(|s| s.sandbox_id)
        .collect();
    assert_eq!(listed, vec![a.id().to_string()]);
    let mut a2 = dormant::resume(store.clone(), &snap, &Grants::new()).unwrap();
    assert_eq!(a2.run_code("total").unwrap().stdout, "-1\n");
    let mut c = dormant::create_from_template(store.clone(), "sales", &Grants::new()).unwrap();
    assert_eq!(c.run_code("total").unwrap().stdout, "42\n");
    assert!(!sales().build(store).unwrap().built);
}

#[test]
fn a_failing_step_names_the_step_and_its_exception_and_records_nothing() {
    let (_tmp, store) = store();
    let t = Template::new("broken", Tier::Wasi)
        .run("x = 1")
        .run("print('working on it'); 1 / 0");
    match t.build(store.clone()) {
        Err(Error::TemplateStep(f)) => {
            assert_eq!(f.template, "broken");
            assert_eq!(f.stage, "run");
            assert_eq!(f.index, Some(1));
            assert_eq!(f.step, "print('working on it'); 1 / 0");
            assert_eq!(f.exit_code, None);
            assert!(f.reason.contains("ZeroDivisionError"), "{f:?}");
            assert!(f.output.contains("working on it"), "{f:?}");
        }
        other => panic!("want TemplateStep, got {other:?}"),
    }
    let e = t.build(store.clone()).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("run[1]") && msg.contains("1 / 0") && msg.contains("ZeroDivisionError"),
        "{msg}"
    );
    assert!(dormant::templates(&store).unwrap().is_empty());
    let e = dormant::create_from_template(store.clone(), "broken", &Grants::new()).unwrap_err();
    assert!(
        matches!(&e, Error::InvalidArgument(m) if m.contains("no template named \"broken\"")),
        "{e:?}"
    );
    // The build's sandbox left no snapshot behind.
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn a_changed_recipe_rebuilds_and_replaces_the_record() {
    let (_tmp, store) = store();
    let first = sales().build(store.clone()).unwrap();
    let changed = sales().run("total *= 2");
    let second = changed.build(store.clone()).unwrap();
    assert!(second.built);
    assert_ne!(second.record.key, first.record.key);
    assert_ne!(second.record.snapshot, first.record.snapshot);
    assert_eq!(
        dormant::template(&store, "sales").unwrap(),
        second.record.clone()
    );
    let mut sb = dormant::create_from_template(store.clone(), "sales", &Grants::new()).unwrap();
    assert_eq!(sb.run_code("total").unwrap().stdout, "84\n");
    // The old snapshot is kept (sandboxes made from it may still need it).
    assert!(store.contains(&first.record.snapshot));
    // A file's bytes are part of the key.
    let other_file = sales()
        .run("total *= 2")
        .file("/data/more.txt", "x".as_bytes());
    assert!(other_file.build(store.clone()).unwrap().built);
    // So is a mounted directory's listing (not its contents' bytes).
    let wheels = tempfile::tempdir().unwrap();
    let mounted = || sales().mount(wheels.path(), "/mnt/wheels", true);
    assert!(mounted().build(store.clone()).unwrap().built);
    assert!(!mounted().build(store.clone()).unwrap().built);
    std::fs::write(wheels.path().join("new-1.0-py3-none-any.whl"), b"wheel").unwrap();
    assert!(mounted().build(store.clone()).unwrap().built);
    // A sandbox from it gets the mount point detached unless the caller grants it again.
    let mut sb = dormant::create_from_template(store.clone(), "sales", &Grants::new()).unwrap();
    assert!(sb.list_dir("/mnt/wheels").unwrap().is_empty());
    let mut sb = dormant::create_from_template(
        store.clone(),
        "sales",
        &Grants::new().mount(wheels.path(), "/mnt/wheels", true),
    )
    .unwrap();
    assert!(sb.exists("/mnt/wheels/new-1.0-py3-none-any.whl").unwrap());
}

#[test]
fn concurrent_builds_of_one_template_build_once() {
    let (_tmp, store) = store();
    let builds: Vec<_> = (0..3)
        .map(|_| {
            let store = store.clone();
            std::thread::spawn(move || sales().build(store).unwrap())
        })
        .collect();
    let results: Vec<_> = builds.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(results.iter().filter(|b| b.built).count(), 1, "{results:?}");
    assert!(results.iter().all(|b| b.record == results[0].record));
    assert_eq!(store.list().unwrap().len(), 1, "one snapshot was taken");
}

#[test]
fn bad_names_and_what_the_wasi_tier_lacks_are_refused() {
    let (_tmp, store) = store();
    for bad in ["", "a/b", "../x", ".hidden", "sp ace", &"n".repeat(65)] {
        let e = Template::new(bad, Tier::Wasi)
            .build(store.clone())
            .unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("template name")),
            "{bad:?}: {e:?}"
        );
        let e = dormant::create_from_template(store.clone(), bad, &Grants::new()).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{bad:?}: {e:?}");
    }
    let e = Template::new("server", Tier::Wasi)
        .start("python -m http.server")
        .ready(Ready::Port(8000))
        .build(store.clone())
        .unwrap_err();
    assert!(
        matches!(&e, Error::Unsupported { what, .. } if what.contains("KVM")),
        "{e:?}"
    );
    let e = Template::new("img", Tier::Wasi)
        .image("coding")
        .build(store.clone())
        .unwrap_err();
    assert!(matches!(e, Error::InvalidSpec(_)), "{e:?}");
    assert!(store.list().unwrap().is_empty());
    assert!(dormant::templates(&store).unwrap().is_empty());
}
