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
