//! Fork: one running sandbox into n independent children sharing its pages copy-on-write.

#![allow(clippy::unwrap_used)] // helpers outside #[test] functions unwrap too

mod common;

use std::collections::HashSet;

use common::{Env, out, runtime};
use dormant_core::{Sandbox, SandboxSpec};

#[test]
fn ten_forks_diverge_independently_and_share_pages() {
    let env = Env::new();
    let mut parent = runtime()
        .create(env.store.clone(), SandboxSpec::python())
        .unwrap();
    out(
        &mut parent,
        "import numpy as np, pandas as pd, random\n\
         df = pd.DataFrame({'k': np.arange(300_000), 'v': np.ones(300_000)})",
    );
    let mut children = parent.fork(10).unwrap();
    let base = parent.last_snapshot().cloned().unwrap();
    let parent_bytes = env.store.manifest(&base).unwrap().memory.file.stored;

    let ids: HashSet<String> = children
        .iter()
        .map(|c| c.id().to_owned())
        .chain([parent.id().to_owned()])
        .collect();
    assert_eq!(ids.len(), 11, "every child has its own identity");

    // Random values drawn right after the fork differ between children.
    let draws: HashSet<String> = children
        .iter_mut()
        .map(|c| out(c, "print(random.random(), np.random.random())"))
        .collect();
    assert_eq!(draws.len(), 10, "{draws:?}");

    for (i, c) in children.iter_mut().enumerate() {
        out(c, &format!("df['v'] = df.v * {}\nmine = {i}", i + 2));
    }
    for (i, c) in children.iter_mut().enumerate() {
        let want = format!("{} {i}\n", 300_000 * (i + 2));
        assert_eq!(
            out(c, "print(int(df.v.sum()), mine)"),
            want,
            "child {i} sees only its own change"
        );
    }
    assert_eq!(
        out(&mut parent, "print(int(df.v.sum()), 'mine' in dir())"),
        "300000 False\n",
        "the parent is unchanged"
    );

    // Each child checkpoints only what it changed, on top of the shared parent snapshot.
    let mut children_bytes = 0;
    for c in children.iter_mut() {
        let id = c.checkpoint().unwrap();
        let m = env.store.manifest(&id).unwrap();
        assert_eq!(m.parent.as_ref(), Some(&base));
        children_bytes += m.memory.file.stored + m.fs.as_ref().map_or(0, |f| f.stored);
    }
    assert!(
        children_bytes * 5 < parent_bytes * 10,
        "ten children stored {children_bytes} bytes, not far below ten full copies ({})",
        parent_bytes * 10
    );
    eprintln!("parent snapshot {parent_bytes} bytes; ten children {children_bytes} bytes");
    // Children resume from their own snapshots independently.
    let last = children[9].last_snapshot().cloned().unwrap();
    let mut r = runtime().resume(env.store.clone(), &last).unwrap();
    assert_eq!(out(&mut r, "print(int(df.v.sum()), mine)"), "3300000 9\n");
}
