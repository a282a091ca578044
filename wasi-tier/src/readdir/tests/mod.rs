//! The cookie protocol against wasmtime-wasi's own `fd_readdir`: a guest linked with
//! wasmtime-wasi alone and one linked with this module read the same directories through
//! the same calls, and get the same bytes.

mod guest;

use std::sync::OnceLock;

use proptest::prelude::*;
use wasmtime_wasi::p1::types::Errno;

use self::guest::*;
use crate::readdir::cache::Budget;

#[test]
fn every_cookie_and_buffer_size_gets_wasmtime_wasis_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    fill(&tmp.path().join("one"), 1);
    fill(&tmp.path().join("empty"), 0);
    fill(&tmp.path().join("many"), 150);
    // Listings of "many" (about 23 KB) are read once (default), read twice (over a small
    // first read) or not kept at all (over the cap: every call goes to wasmtime-wasi).
    let two_reads = Budget {
        first_read: 4096,
        ..Budget::DEFAULT
    };
    let not_kept = Budget {
        first_read: 100,
        max_listing: 2_000,
        max_kept: 1,
        max_kept_bytes: 2_000,
    };
    for (dir, count) in [("empty", 2), ("one", 3), ("many", 152)] {
        for budget in [Budget::DEFAULT, two_reads, not_kept] {
            let mut calls = Vec::new();
            for len in LENS {
                calls.extend(cookies(count).into_iter().map(|c| (len, c)));
            }
            same_answers(tmp.path(), dir, budget, &calls);
        }
    }
}

#[test]
fn a_walk_lists_every_entry_once_with_its_type() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    fill(&dir, 200);
    let mut p = Pair::new(tmp.path(), Budget::DEFAULT);
    let fd = p.open("d", true);
    // 64 bytes cannot hold the longest entries: the walk grows its buffer like wasi-libc.
    for len in [4096, 64] {
        let walked = p.walk(fd, len);
        assert_eq!(walked.len(), 202);
        assert_eq!(names(&walked), host_names(&dir));
        for (i, e) in walked.iter().enumerate() {
            assert_eq!(e.d_next, i as u64 + 1);
            let want = match e.name.as_slice() {
                b"." | b".." => 3,
                n => {
                    let t = std::fs::symlink_metadata(dir.join(std::str::from_utf8(n).unwrap()))
                        .unwrap()
                        .file_type();
                    if t.is_symlink() {
                        7
                    } else if t.is_dir() {
                        3
                    } else {
                        4
                    }
                }
            };
            assert_eq!(e.d_type, want, "{:?}", String::from_utf8_lossy(&e.name));
        }
        assert_eq!(p.ours.kept(), 0, "a listing read to its end is dropped");
    }
}

#[test]
fn a_listing_in_progress_is_a_snapshot_and_cookie_zero_sees_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    fill(&dir, 400);
    let before = host_names(&dir);
    let mut g = Guest::new(tmp.path(), Some(Budget::DEFAULT));
    let fd = g.open("d", true).unwrap();
    let first = g.readdir(fd, 4096, 0);
    let (mut seen, _) = decode(&first.region[..first.used.unwrap() as usize]);
    assert_eq!(g.kept(), 1);
    // Entries already returned and entries still to come disappear, new ones appear.
    let mut victims: Vec<Vec<u8>> = seen
        .iter()
        .skip(2)
        .take(5)
        .map(|e| e.name.clone())
        .collect();
    victims.extend(before.iter().rev().take(5).cloned());
    for v in &victims {
        let p = dir.join(std::str::from_utf8(v).unwrap());
        if p.is_dir() && !p.is_symlink() {
            std::fs::remove_dir(&p).unwrap();
        } else {
            std::fs::remove_file(&p).unwrap();
        }
    }
    for i in 0..50 {
        std::fs::write(dir.join(format!("new-{i}")), b"").unwrap();
    }
    let mut cookie = seen.last().unwrap().d_next;
    loop {
        let c = g.readdir(fd, 4096, cookie);
        let used = c.used.unwrap_or(0);
        let (more, _) = decode(&c.region[..used as usize]);
        cookie = more.last().map_or(cookie, |e| e.d_next);
        seen.extend(more);
        if used < 4096 {
            break;
        }
    }
    assert_eq!(seen.len(), before.len(), "no entry repeated or lost");
    assert_eq!(names(&seen), before);
    // Starting again at cookie 0 lists the directory as it is now.
    let now = g.walk(fd, 4096);
    assert_eq!(names(&now), host_names(&dir));
    assert_eq!(now.len(), before.len() - victims.len() + 50);

    // So does a rewind in the middle of a listing (wasi-libc's `rewinddir`).
    let mut theirs = Guest::new(tmp.path(), None);
    assert_eq!(theirs.open("d", true), Ok(fd));
    g.readdir(fd, 4096, 0);
    g.readdir(fd, 4096, 9);
    assert_eq!(g.kept(), 1);
    for i in 0..20 {
        std::fs::write(dir.join(format!("newer-{i}")), b"").unwrap();
    }
    assert_eq!(g.readdir(fd, 4096, 0), theirs.readdir(fd, 4096, 0));
    let again = g.walk(fd, 4096);
    assert_eq!(names(&again), host_names(&dir));
    assert_eq!(again.len(), now.len() + 20);
}

#[test]
fn closing_or_renumbering_a_descriptor_drops_its_listing() {
    let tmp = tempfile::tempdir().unwrap();
    fill(&tmp.path().join("a"), 300);
    fill(&tmp.path().join("b"), 250);
    let mut p = Pair::new(tmp.path(), Budget::DEFAULT);

    // `a` read partly, closed; `b` opened gets the same number and is read from cookie 7.
    let fa = p.open("a", true);
    p.readdir(fa, 4096, 0);
    assert_eq!(p.ours.kept(), 1);
    p.close(fa);
    assert_eq!(p.ours.kept(), 0);
    let fb = p.open("b", true);
    assert_eq!(fb, fa, "the lowest free descriptor is reused");
    let b7 = p.readdir(fb, 4096, 7);
    let (entries, _) = decode(&b7.region[..b7.used.unwrap() as usize]);
    assert!(!entries.is_empty());
    assert!(
        entries.iter().all(|e| e.name.starts_with(b"b-")),
        "{entries:?}"
    );

    // `a` again, read partly; renumbered over `b`: reads of the old number fail, reads of
    // the new one list `a`.
    let fa = p.open("a", true);
    p.readdir(fa, 4096, 0);
    p.readdir(fb, 4096, 0);
    assert_eq!(p.ours.kept(), 2);
    p.renumber(fa, fb);
    assert_eq!(p.ours.kept(), 0);
    assert_eq!(p.readdir(fa, 4096, 5).errno, Errno::Badf as i32);
    p.readdir(fb, 4096, 5);
    p.walk(fb, 4096);
}

#[test]
fn bad_descriptors_and_bad_pointers_fail_as_in_wasmtime_wasi() {
    let tmp = tempfile::tempdir().unwrap();
    fill(&tmp.path().join("d"), 30);
    std::fs::write(tmp.path().join("f"), b"data").unwrap();
    let mut theirs = Guest::new(tmp.path(), None);
    let mut ours = Guest::new(tmp.path(), Some(Budget::DEFAULT));
    let file = ours.open("f", false).unwrap();
    assert_eq!(theirs.open("f", false), Ok(file));
    for fd in [file, 0, 1, 99, -1] {
        for cookie in [0, 3] {
            let o = ours.readdir(fd, 4096, cookie);
            assert_ne!(o.errno, 0, "fd {fd}");
            assert_eq!(o, theirs.readdir(fd, 4096, cookie), "fd {fd}");
        }
    }
    let fd = ours.open("d", true).unwrap();
    assert_eq!(theirs.open("d", true), Ok(fd));
    // A buffer past the end of memory, a byte count out of bounds or misaligned: a trap
    // (an empty buffer past the end is never written to: no trap, in both).
    for (buf, len, used_at, traps) in [
        (MEM - 10, 4096, USED, true),
        (MEM + 10, 0, USED, false),
        (BUF, 100, MEM - 2, true),
        (BUF, 100, USED + 1, true),
    ] {
        for cookie in [0, 2, 0] {
            let o = ours.try_readdir_at(fd, buf, len, cookie, used_at);
            let t = theirs.try_readdir_at(fd, buf, len, cookie, used_at);
            let what = format!("buffer {buf}+{len}, count at {used_at}, cookie {cookie}");
            assert_eq!(o.is_err(), traps, "{what}: {o:?}");
            assert_eq!(t.is_err(), traps, "{what}: {t:?}");
            if !traps {
                assert_eq!(o.unwrap(), t.unwrap(), "{what}");
            }
            // A trap ends the instance's call, not the instance: start over for the next.
            ours = Guest::new(tmp.path(), Some(Budget::DEFAULT));
            theirs = Guest::new(tmp.path(), None);
            assert_eq!(ours.open("f", false), Ok(file));
            assert_eq!(theirs.open("f", false), Ok(file));
            assert_eq!(ours.open("d", true), Ok(fd));
            assert_eq!(theirs.open("d", true), Ok(fd));
        }
    }
}

#[test]
fn kept_listings_stay_within_the_budget() {
    let tmp = tempfile::tempdir().unwrap();
    // Listings of about 3 KB, and one of about 18 KB.
    for d in ["a", "b", "c", "d"] {
        fill(&tmp.path().join(d), 20);
    }
    fill(&tmp.path().join("big"), 120);
    let budget = Budget {
        first_read: 512,
        max_listing: 8 << 10,
        max_kept: 2,
        max_kept_bytes: 7 << 10,
    };
    let mut p = Pair::new(tmp.path(), budget);
    let fds: Vec<i32> = ["a", "b", "c", "d", "big"]
        .into_iter()
        .map(|d| p.open(d, true))
        .collect();
    // Every listing started, then each continued: evicted ones are read again.
    for round in 0..3u64 {
        for &fd in &fds {
            let cookie = round * 9;
            p.readdir(fd, 200, cookie);
            assert!(p.ours.kept() <= 2);
            let bytes: usize = p
                .ours
                .store
                .data()
                .listings
                .kept
                .iter()
                .map(|k| k.listing.size())
                .sum();
            assert!(bytes <= budget.max_kept_bytes, "{bytes} bytes kept");
        }
    }
    // `big` (over `max_listing`) is served call by call and never kept.
    let big = *fds.last().unwrap();
    p.walk(big, 300);
    assert!(
        !p.ours
            .store
            .data()
            .listings
            .kept
            .iter()
            .any(|k| k.fd == big as u32)
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Any sequence of calls (any cookie, any buffer size), under any budget, gets
    /// wasmtime-wasi's answers.
    #[test]
    fn any_call_sequence_gets_wasmtime_wasis_answers(
        calls in prop::collection::vec(
            (prop_oneof![0u32..64, 0u32..2_000, Just(4096u32)],
             prop_oneof![0u64..50, Just(0u64), any::<u64>()]),
            1..24),
        first_read in 1usize..4_000,
        max_listing in 1usize..8_000,
        max_kept in 1usize..4,
        max_kept_bytes in 1usize..8_000,
    ) {
        static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
        let tmp = DIR.get_or_init(|| {
            let tmp = tempfile::tempdir().unwrap();
            fill(&tmp.path().join("d"), 30);
            tmp
        });
        let budgets = [
            Budget::DEFAULT,
            Budget { first_read, max_listing, max_kept, max_kept_bytes },
        ];
        for budget in budgets {
            same_answers(tmp.path(), "d", budget, &calls);
        }
    }
}
