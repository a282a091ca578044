//! A template on the KVM tier, with the real Linux guest (the minimal busybox image): files,
//! shell steps and a background server waited for on its port; built once; a sandbox made
//! from it has the files and the server answers; a failing step or start command is a clear
//! error. One test, so that the guest boots once (its base snapshot) for all of it.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use dormant::{Command, Error, Grants, LocalStore, Ready, Sandbox, Template, Tier};

/// Guest RAM (boot time grows with it where the guest kernel is emulated).
const RAM: u64 = 128 << 20;

fn kvm_template(name: &str) -> Template {
    Template::new(name, Tier::Kvm)
        .image("minimal")
        .memory_limit(RAM)
        // Generous: tests check behaviour, and guest kernel code may be emulated on a busy host.
        .call_timeout(Duration::from_secs(300))
}

fn failure(r: dormant::Result<dormant::Built>) -> Box<dormant::TemplateStepError> {
    match r {
        Err(Error::TemplateStep(f)) => f,
        other => panic!("want TemplateStep, got {other:?}"),
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn a_kvm_template_is_built_once_and_serves_from_every_sandbox_made_from_it() {
    // Under target/ (cargo clean removes it); earlier runs' stores go first.
    let tmp = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    for old in std::fs::read_dir(tmp).into_iter().flatten().flatten() {
        if old
            .file_name()
            .to_string_lossy()
            .starts_with("template-kvm-")
        {
            let _ = std::fs::remove_dir_all(old.path());
        }
    }
    let dir = tmp.join(format!("template-kvm-{}", std::process::id()));
    let store = Arc::new(LocalStore::open(&dir).unwrap());

    let www = kvm_template("www")
        .file("/www/index.html", "hello from the template\n")
        .run("mkdir -p /www/sub && echo deep > /www/sub/x.txt")
        .run("test -f /www/index.html && echo checked")
        .start("httpd -f -p 8080 -h /www")
        .ready(Ready::Port(8080));
    let first = www.build(store.clone()).unwrap();
    assert!(first.built);
    assert_eq!(first.record.tier, Tier::Kvm);
    let again = www.build(store.clone()).unwrap();
    assert!(!again.built, "the same recipe is reused");
    assert_eq!(again.record, first.record);

    let mut sb = dormant::create_from_template(store.clone(), "www", &Grants::new()).unwrap();
    let mut other = dormant::create_from_template(store.clone(), "www", &Grants::new()).unwrap();
    assert_ne!(sb.id(), other.id());
    assert_eq!(sb.read_file("/www/sub/x.txt").unwrap(), b"deep\n");
    let fetch = Command::shell("wget -qO- http://127.0.0.1:8080/");
    let out = sb.exec(&fetch).unwrap();
    assert_eq!(out.exit_code, 0, "{out:?}");
    assert_eq!(out.stdout, b"hello from the template\n");
    // Independent: a change in one is not in the other, whose server still answers.
    sb.write_file("/www/index.html", b"changed\n").unwrap();
    assert_eq!(sb.exec(&fetch).unwrap().stdout, b"changed\n");
    assert_eq!(
        other.exec(&fetch).unwrap().stdout,
        b"hello from the template\n"
    );
    sb.kill().unwrap();
    other.kill().unwrap();

    let f = failure(
        kvm_template("www-broken")
            .run("echo fine")
            .run("echo before; echo oops >&2; exit 3")
            .build(store.clone()),
    );
    assert_eq!((f.stage, f.index, f.exit_code), ("run", Some(1), Some(3)));
    assert_eq!(f.step, "echo before; echo oops >&2; exit 3");
    assert!(
        f.output.contains("before") && f.output.contains("oops"),
        "{f:?}"
    );
    assert!(f.to_string().contains("exited with code 3"), "{f}");

    let f = failure(
        kvm_template("www-no-start")
            .start("echo cannot start >&2; exit 5")
            .ready(Ready::Port(8081))
            .build(store.clone()),
    );
    assert_eq!((f.stage, f.exit_code), ("start", Some(5)));
    assert!(f.output.contains("cannot start"), "{f:?}");
    let names: Vec<String> = dormant::templates(&store)
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, ["www"], "failed builds record nothing");
}
