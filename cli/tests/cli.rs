//! The `dormant` command end to end: the README's main job (the demo) and the store commands.

#![allow(clippy::unwrap_used)]

use std::process::Command;

fn dormant(store: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dormant"))
        .args(args)
        .env("DORMANT_STORE", store)
        .output()
        .unwrap()
}

#[test]
fn the_demo_runs_an_agent_session_across_two_processes() {
    let tmp = tempfile::tempdir().unwrap();
    let o = dormant(tmp.path(), &["demo", "--rows", "5000"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("5,000 rows"), "{out}");
    // The answer from the new process and from this one are the same.
    let answers: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("weekend top spenders"))
        .collect();
    assert_eq!(answers.len(), 2, "{out}");
    assert_eq!(answers[0], answers[1]);
    assert!(
        out.contains("cold path / new-process resume-to-answer"),
        "{out}"
    );
}

#[test]
fn store_commands() {
    let tmp = tempfile::tempdir().unwrap();
    let o = dormant(tmp.path(), &["snapshots"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("snapshot"));
    let o = dormant(tmp.path(), &["gc"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("removed 0 chunks"));
    let o = dormant(tmp.path(), &["compact", "not-an-id"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a snapshot id"));
    let o = dormant(
        tmp.path(),
        &[
            "delete",
            "s-0000000000000000-00000000000000000000000000000000",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not found"));
    let o = dormant(tmp.path(), &["frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn template_build_and_list_from_a_toml_file() {
    let store = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("sales.csv"), "day,amount\n1,10\n2,32\n").unwrap();
    let file = dir.path().join("sales.toml");
    std::fs::write(
        &file,
        r#"
name = "sales"
run = [
    "rows = open('/data/sales.csv').read().splitlines()[1:]",
    "total = sum(int(r.split(',')[1]) for r in rows)",
    "assert open('/notes.txt').read() == 'inline'",
]

[files]
"/data/sales.csv" = { path = "sales.csv" }
"/notes.txt" = "inline"
"#,
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let o = dormant(store.path(), &["template", "build", path]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.starts_with("built template sales"), "{out}");
    let o = dormant(store.path(), &["template", "build", path]);
    let again = String::from_utf8_lossy(&o.stdout);
    assert!(again.starts_with("template sales is up to date"), "{again}");
    let snapshot = out.trim().rsplit(' ').next().unwrap();
    assert!(again.trim().ends_with(snapshot), "{out}{again}");
    let o = dormant(store.path(), &["template", "list"]);
    let list = String::from_utf8_lossy(&o.stdout);
    let row = list.lines().find(|l| l.starts_with("sales ")).unwrap();
    assert!(row.contains(" wasi ") && row.contains(snapshot), "{list}");

    // A failing step: the step and its exception, and no record.
    std::fs::write(&file, "name = \"broken\"\nrun = [\"x = 1\", \"1 / 0\"]\n").unwrap();
    let o = dormant(store.path(), &["template", "build", path]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("run[1] \"1 / 0\"") && err.contains("ZeroDivisionError"),
        "{err}"
    );
    let o = dormant(store.path(), &["template", "list"]);
    assert!(!String::from_utf8_lossy(&o.stdout).contains("broken"));
    // A misspelt field is refused, naming it.
    std::fs::write(&file, "name = \"x\"\nrun_steps = [\"x = 1\"]\n").unwrap();
    let o = dormant(store.path(), &["template", "build", path]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("run_steps"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = dormant(store.path(), &["template", "frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
}
