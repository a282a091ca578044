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
use dormant_agent::server::python::{MAX_REPLY, PipeError, ReplyDecoder};
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

/// Feeds `bytes` to a reply decoder in chunks of the given sizes (each at most what it
/// wants), until an error or the bytes run out; returns how many replies it decoded.
fn decode_replies(bytes: &[u8], chunks: &[usize]) -> Result<usize, PipeError> {
    let mut d = ReplyDecoder::default();
    let (mut at, mut replies) = (0, 0);
    for &size in chunks.iter().cycle() {
        if at == bytes.len() {
            break;
        }
        let n = size.clamp(1, d.wanted()).min(bytes.len() - at);
        if d.feed(&bytes[at..at + n])?.is_some() {
            replies += 1;
        }
        at += n;
    }
    Ok(replies)
}

#[test]
fn a_driver_reply_claiming_much_does_not_make_the_agent_allocate_it() {
    for claim in [MAX_REPLY as u32, u32::MAX] {
        let mut bytes = claim.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        let (r, largest) = largest_allocation(|| decode_replies(&bytes, &[1 << 16]));
        if claim as usize > MAX_REPLY {
            assert!(matches!(r, Err(PipeError::TooLarge { .. })), "{r:?}");
        } else {
            assert_eq!(r.unwrap(), 0, "an incomplete reply is not one");
        }
        assert!(
            largest <= 4096,
            "{largest} bytes allocated for a {claim} claim"
        );
    }
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

    /// What the Python driver's pipe may carry (the guest controls it): any bytes, in any
    /// chunks, give replies or a typed error, never a panic, and the decoder holds no more than
    /// what arrived.
    #[test]
    fn driver_replies_never_panic_or_allocate_what_they_claim(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
        chunks in proptest::collection::vec(1usize..64, 1..8),
        reply in proptest::option::of(".{0,40}"),
    ) {
        let (_, largest) = largest_allocation(|| decode_replies(&bytes, &chunks));
        prop_assert!(largest <= BOUND + 2 * bytes.len(), "{} bytes allocated", largest);
        // A valid reply, then the random bytes: the reply decodes first.
        let json = match &reply {
            Some(v) => serde_json::json!({"error": {"name": "E", "value": v, "traceback": ""}}),
            None => serde_json::json!({"error": null}),
        };
        let body = serde_json::to_vec(&json).unwrap();
        let mut framed = (body.len() as u32).to_le_bytes().to_vec();
        framed.extend_from_slice(&body);
        let prefix = framed.len();
        framed.extend_from_slice(&bytes);
        prop_assert_eq!(decode_replies(&framed[..prefix], &chunks).unwrap(), 1);
        let _ = decode_replies(&framed, &chunks);
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
