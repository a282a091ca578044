//! Progress of long operations: a WASI template build and a compaction call the callback with
//! `done` never decreasing, within `total`, and a final event last.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use dormant::progress::Unit;
use dormant::{LocalStore, ProgressEvent, Sandbox, Template, Tier};

/// Checks what an operation reported: increasing `done`, within `total`, one final event,
/// last, with `done == total`.
fn check(events: &[ProgressEvent], unit: Unit) {
    assert!(!events.is_empty());
    for w in events.windows(2) {
        assert!(w[0].done <= w[1].done, "{events:#?}");
    }
    for e in events {
        assert_eq!(e.unit, unit);
        let total = e.total.unwrap();
        assert!(e.done <= total, "{e:?}");
    }
    let last = events.last().unwrap();
    assert!(last.finished && last.total == Some(last.done), "{last:?}");
    assert_eq!(events.iter().filter(|e| e.finished).count(), 1);
}

#[test]
fn a_template_build_reports_each_step_then_a_final_event() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::open(tmp.path()).unwrap());
    let template = Template::new("progress", Tier::Wasi)
        .file("/data/a.txt", "a")
        .run("x = 1")
        .run("y = x + 1");
    let events = Mutex::new(Vec::new());
    let record = |e: &ProgressEvent| events.lock().unwrap().push(e.clone());
    assert!(
        template
            .build_with_progress(store.clone(), &record)
            .unwrap()
            .built
    );
    let events = events.into_inner().unwrap();
    check(&events, Unit::Steps);
    let stages: Vec<&str> = events.iter().map(|e| e.stage.as_str()).collect();
    assert_eq!(
        stages,
        [
            "create the wasi sandbox",
            "write /data/a.txt",
            "run step 1: x = 1",
            "run step 2: y = x + 1",
            "checkpoint",
            "built"
        ]
    );
    assert_eq!(events.last().unwrap().done, 5);

    // Up to date: just the final event.
    let again = Mutex::new(Vec::new());
    let record = |e: &ProgressEvent| again.lock().unwrap().push(e.clone());
    assert!(!template.build_with_progress(store, &record).unwrap().built);
    let again = again.into_inner().unwrap();
    check(&again, Unit::Steps);
    assert_eq!(again.len(), 1);
}

#[test]
fn a_compaction_reports_chunks_done_of_total_then_a_final_event() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::open(tmp.path()).unwrap());
    let mut sb = dormant::runtime(Tier::Wasi)
        .unwrap()
        .create(store.clone(), dormant::SandboxSpec::python())
        .unwrap();
    sb.run_code("data = bytes(range(256)) * 20_000").unwrap();
    let snap = sb.standby().unwrap();
    let events = Mutex::new(Vec::new());
    let record = |e: &ProgressEvent| events.lock().unwrap().push(e.clone());
    let report = store.compact_with_progress(&snap, &record).unwrap();
    let events = events.into_inner().unwrap();
    check(&events, Unit::Chunks);
    assert!(events.len() > 2, "{} events", events.len());
    let total = events.last().unwrap().done;
    assert!(total >= report.chunks, "{total} of {report:?}");
    assert!(events.iter().any(|e| e.stage == "compact memory"));
}
