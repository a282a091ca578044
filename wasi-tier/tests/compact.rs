//! Compact durable snapshots: chunked, deduplicated, compressed; cold resume; usage; GC.

#![allow(clippy::unwrap_used)] // helpers outside #[test] functions unwrap too

mod common;

use common::{Env, out, runtime};
use dormant_core::{Error, Sandbox, SandboxSpec, SnapshotId};
use dormant_wasi::Val;

const CHECK: &str = "print(len(df), int(df.k.sum()), note, open('/tmp/f.txt').read())";

#[test]
fn a_compact_snapshot_resumes_with_identical_state() {
    let env = Env::new();
    let mut sb = runtime()
        .create(env.store.clone(), SandboxSpec::python())
        .unwrap();
    out(
        &mut sb,
        "import pandas as pd\ndf = pd.DataFrame({'k': range(200_000)})\nnote = 'hello'\nopen('/tmp/f.txt', 'w').write('file')",
    );
    out(&mut sb, "note = note + '!'");
    let base = sb.checkpoint().unwrap();
    out(&mut sb, "note = note + '?'");
    let id = sb.standby().unwrap();
    let want = "200000 19999900000 hello!? file\n";

    // The leaf is a delta on `base`: its parent cannot be compacted, the leaf can.
    assert!(matches!(
        env.store.compact(&base),
        Err(Error::SnapshotInUse { .. })
    ));
    let fast = env
        .store
        .usage()
        .unwrap()
        .into_iter()
        .find(|u| u.id == id)
        .unwrap();
    let report = env.store.compact(&id).unwrap();
    let m = env.store.manifest(&id).unwrap();
    assert_eq!(m.parent, None, "a compact snapshot stands alone");
    let compact = env
        .store
        .usage()
        .unwrap()
        .into_iter()
        .find(|u| u.id == id)
        .unwrap();
    assert!(compact.compact && !fast.compact);
    assert_eq!(compact.memory_size, fast.memory_size);
    let full_image = env
        .store
        .usage()
        .unwrap()
        .into_iter()
        .find(|u| u.id == base)
        .unwrap()
        .stored_bytes;
    assert!(
        compact.stored_bytes * 2 < full_image,
        "compact {} vs full image {full_image}",
        compact.stored_bytes
    );
    assert_eq!(report.logical, m.memory.size);

    // The base can go now; the compact snapshot does not need it.
    env.store.delete(&base).unwrap();
    let mut r = runtime().resume(env.store.clone(), &id).unwrap();
    assert!(r.resumed_cold(), "the first resume rebuilds from chunks");
    assert_eq!(out(&mut r, CHECK), want);
    let mut r2 = runtime().resume(env.store.clone(), &id).unwrap();
    assert!(!r2.resumed_cold(), "later resumes map the rebuilt image");
    assert_eq!(out(&mut r2, CHECK), want);
    // A sandbox resumed from a compact snapshot checkpoints on top of it as usual.
    out(&mut r2, "note = 'changed'");
    let next = r2.checkpoint().unwrap();
    assert_eq!(
        env.store.manifest(&next).unwrap().parent.as_ref(),
        Some(&id)
    );
    let mut r3 = runtime().resume(env.store.clone(), &next).unwrap();
    assert_eq!(
        out(&mut r3, "print(note, len(df), open('/tmp/f.txt').read())"),
        "changed 200000 file\n"
    );
}

#[test]
fn forks_share_chunks_and_gc_reclaims_only_unshared_bytes() {
    let env = Env::new();
    let mut parent = runtime()
        .create(env.store.clone(), SandboxSpec::python())
        .unwrap();
    out(
        &mut parent,
        "import numpy as np\nbig = np.arange(2_000_000)",
    );
    let children = parent.fork(4).unwrap();
    let mut snaps: Vec<SnapshotId> = Vec::new();
    for (i, mut c) in children.into_iter().enumerate() {
        out(&mut c, &format!("mine = {i}\nbig[:10] = {i}"));
        snaps.push(c.standby().unwrap());
    }
    for s in &snaps {
        env.store.compact(s).unwrap();
    }
    let usage = env.store.usage().unwrap();
    let of = |id: &SnapshotId| usage.iter().find(|u| &u.id == id).unwrap().clone();
    let total_chunk_bytes: u64 = {
        let dir = env.store.root().join("chunks");
        walk_size(&dir)
    };
    for s in &snaps {
        let u = of(s);
        assert!(
            u.shared_bytes * 10 > u.stored_bytes * 9,
            "most of a fork's bytes are shared: {u:?}"
        );
    }
    let sum: u64 = snaps.iter().map(|s| of(s).stored_bytes).sum();
    assert!(
        total_chunk_bytes * 3 < sum,
        "deduplicated: {total_chunk_bytes} on disk for {sum} referenced"
    );

    // Delete two; GC reclaims what only they used, and every remaining snapshot resumes.
    let unshared: u64 = snaps[..2]
        .iter()
        .map(|s| of(s).stored_bytes - of(s).shared_bytes)
        .sum();
    for s in &snaps[..2] {
        env.store.delete(s).unwrap();
    }
    let gc = env.store.gc().unwrap();
    assert!(
        gc.chunks_removed > 0 && gc.bytes_freed >= unshared,
        "{gc:?}, unshared {unshared}"
    );
    let again = env.store.gc().unwrap();
    assert_eq!(again.chunks_removed, 0, "nothing left to collect");
    for (i, s) in snaps.iter().enumerate().skip(2) {
        let mut r = runtime().resume(env.store.clone(), s).unwrap();
        assert_eq!(
            out(
                &mut r,
                "print(mine, int(big[:10].sum()), int(big[10:].sum(dtype='int64')))"
            ),
            format!("{i} {} {}\n", i * 10, (10..2_000_000u64).sum::<u64>())
        );
    }
    for info in env.store.list().unwrap() {
        runtime().resume(env.store.clone(), &info.id).unwrap();
    }
}

fn walk_size(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let md = e.metadata().unwrap();
        total += if md.is_dir() {
            walk_size(&e.path())
        } else {
            md.len()
        };
    }
    total
}

#[test]
fn gc_keeps_fast_snapshots_and_removes_leftovers() {
    let env = Env::new();
    let mut sb = runtime().create(env.store.clone(), env.toy_spec()).unwrap();
    sb.call("poke", &[Val::I32(3), Val::I32(33)]).unwrap();
    let id = sb.checkpoint().unwrap();
    let stray = env.store.snapshot_dir(&id).join("memory.delta");
    std::fs::write(&stray, b"left over by an interrupted compaction").unwrap();
    let gc = env.store.gc().unwrap();
    assert!(!stray.exists());
    assert!(gc.bytes_freed > 0);
    let mut r = runtime()
        .resume_with(env.store.clone(), &id, &env.toy_grants())
        .unwrap();
    assert_eq!(r.call("peek", &[Val::I32(3)]).unwrap()[0].unwrap_i32(), 33);
}

#[test]
fn gc_runs_safely_beside_checkpoints_and_compactions() {
    let env = Env::new();
    let mut base = runtime().create(env.store.clone(), env.toy_spec()).unwrap();
    base.call("grow", &[Val::I32(30)]).unwrap();
    base.call("fill", &[Val::I32(5)]).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Collector: GC in a loop.
    let gc = {
        let store = env.store.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                store.gc().unwrap();
                runs += 1;
            }
            runs
        })
    };
    // Meanwhile: forks checkpoint, compact their snapshots (sharing most chunks), and some of
    // those snapshots are deleted so that their chunks become garbage.
    let mut kept: Vec<(SnapshotId, i32)> = Vec::new();
    for round in 0..12 {
        let mut children = base.fork(2).unwrap();
        for (k, c) in children.iter_mut().enumerate() {
            let v = round * 10 + k as i32;
            c.call("poke", &[Val::I32(7), Val::I32(v)]).unwrap();
            c.call("set_marker", &[Val::I32(5)]).unwrap();
            let id = c.standby().unwrap();
            env.store.compact(&id).unwrap();
            if k == 0 {
                env.store.delete(&id).unwrap();
            } else {
                kept.push((id, v));
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(gc.join().unwrap() > 0);
    env.store.gc().unwrap();
    for (id, v) in &kept {
        let mut r = runtime()
            .resume_with(env.store.clone(), id, &env.toy_grants())
            .unwrap();
        assert_eq!(
            r.call("peek", &[Val::I32(7)]).unwrap()[0].unwrap_i32(),
            *v,
            "snapshot {id}"
        );
        assert_eq!(r.call("peek", &[Val::I32(100)]).unwrap()[0].unwrap_i32(), 5);
    }
}
