//! The agent protocol's frames are untrusted input on both ends (a hostile guest answers the
//! host; the agent reads whatever arrives on its port): property tests of the decoder. Random
//! and mutated byte streams never panic, never make the reader allocate more than a stated
//! bound whatever lengths they claim, and either decode or give a typed error; valid frames
//! round-trip.

#![allow(clippy::unwrap_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use dormant_agent::proto::{
    FrameError, MAX_DATA, MAX_JSON, Request, Response, read_frame, write_frame,
};
use proptest::prelude::*;

/// Records the largest single allocation made by the current thread while `TRACK` is set.
struct Counting;

thread_local! {
    static TRACK: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards every call to the system allocator unchanged; the bookkeeping only reads
// and writes thread-locals of plain integers (no allocation inside the allocator).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: the caller's contract for `realloc` is passed on as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn note(size: usize) {
    let _ = TRACK.try_with(|t| {
        if t.get() {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
        }
    });
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The largest single allocation `f` makes on this thread.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    TRACK.with(|t| t.set(true));
    let r = f();
    TRACK.with(|t| t.set(false));
    (r, LARGEST.with(Cell::get))
}

/// What a reader may allocate for one frame beyond what the peer actually sent: the
/// read-ahead cap of each of the two parts, and headroom for parsing.
const BOUND: usize = 1 << 20;

fn frame(json_len: u32, data_len: u32, rest: &[u8]) -> Vec<u8> {
    let mut v = json_len.to_le_bytes().to_vec();
    v.extend_from_slice(&data_len.to_le_bytes());
    v.extend_from_slice(rest);
    v
}

#[test]
fn claimed_lengths_do_not_make_the_reader_allocate_them() {
    for (j, d) in [
        (MAX_JSON as u32, MAX_DATA as u32),
        (u32::MAX, 0),
        (0, u32::MAX),
        (10, MAX_DATA as u32),
    ] {
        let bytes = frame(j, d, b"{}");
        let (r, largest) =
            largest_allocation(|| read_frame::<_, Request>(&mut bytes.as_slice()).map(|_| ()));
        assert!(
            r.is_err(),
            "a frame claiming {j}+{d} bytes and sending 2 is refused"
        );
        assert!(
            largest <= BOUND,
            "{largest} bytes allocated for a {j}+{d} claim"
        );
    }
}

#[test]
fn lengths_over_the_caps_are_typed_errors() {
    let bytes = frame(MAX_JSON as u32 + 1, 0, &[]);
    assert!(matches!(
        read_frame::<_, Request>(&mut bytes.as_slice()),
        Err(FrameError::TooLarge { what: "json", .. })
    ));
    let bytes = frame(2, MAX_DATA as u32 + 1, b"{}");
    assert!(matches!(
        read_frame::<_, Response>(&mut bytes.as_slice()),
        Err(FrameError::TooLarge { what: "data", .. })
    ));
    assert!(matches!(
        read_frame::<_, Request>(&mut [].as_slice()),
        Err(FrameError::Closed)
    ));
}

fn requests() -> impl Strategy<Value = Request> {
    prop_oneof![
        any::<u32>().prop_map(|version| Request::Hello { version }),
        ".{0,40}".prop_map(|path| Request::ReadFile { path }),
        (any::<u32>(), proptest::option::of(any::<u64>()))
            .prop_map(|(pid, timeout_ms)| Request::Wait { pid, timeout_ms }),
        (
            proptest::collection::vec(".{0,12}", 0..4),
            proptest::option::of(".{0,12}"),
            proptest::option::of(any::<u64>()),
            any::<bool>()
        )
            .prop_map(|(argv, cwd, timeout_ms, shell)| Request::Exec {
                argv,
                env: vec![("K".into(), "V".into())],
                cwd,
                timeout_ms,
                shell,
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, .. ProptestConfig::default() })]

    /// Any bytes at all: a typed result, no panic, a bounded allocation.
    #[test]
    fn random_streams_never_panic_or_allocate_what_they_claim(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        for _ in 0..2 {
            let (_, largest) = largest_allocation(|| {
                let mut r = bytes.as_slice();
                let a = read_frame::<_, Request>(&mut r).map(|_| ());
                let mut r = bytes.as_slice();
                let b = read_frame::<_, Response>(&mut r).map(|_| ());
                (a, b)
            });
            prop_assert!(largest <= BOUND + bytes.len(), "{} bytes allocated", largest);
        }
    }

    /// A valid frame round-trips; every mutation of one byte of it decodes or fails typed.
    #[test]
    fn valid_frames_round_trip_and_mutations_fail_cleanly(
        req in requests(),
        data in proptest::collection::vec(any::<u8>(), 0..300),
        at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let mut bytes = Vec::new();
        write_frame(&mut bytes, &req, &data).unwrap();
        let (back, d): (Request, Vec<u8>) = read_frame(&mut bytes.as_slice()).unwrap();
        prop_assert_eq!(back, req);
        prop_assert_eq!(d, data);
        let i = at.index(bytes.len());
        bytes[i] ^= flip;
        let (_, largest) = largest_allocation(|| {
            read_frame::<_, Request>(&mut bytes.as_slice()).map(|_| ())
        });
        prop_assert!(largest <= BOUND + bytes.len());
    }
}
