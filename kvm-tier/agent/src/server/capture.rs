//! The output a background process keeps: one capture thread per pipe reads it into a
//! [`Ring`] per stream (the last [`OUTPUT_BUFFER`] bytes, and how many were dropped), which
//! `output` drains. A terminal's backlog is a [`Ring`] too.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{CHUNK, OUTPUT_BUFFER, lock, wait_while_until};

/// The last bytes of one stream ([`OUTPUT_BUFFER`] of them for a background process's), and how
/// many were dropped before them.
#[derive(Debug, Default)]
pub(super) struct Ring {
    pub(super) buf: VecDeque<u8>,
    pub(super) dropped: u64,
}

impl Ring {
    fn push(&mut self, data: &[u8]) {
        self.push_within(data, OUTPUT_BUFFER);
    }

    /// Appends `data`, keeping the last `cap` bytes (the older ones counted in `dropped`).
    pub(super) fn push_within(&mut self, data: &[u8], cap: usize) {
        let data = if data.len() > cap {
            let skip = data.len() - cap;
            self.dropped += skip as u64;
            &data[skip..]
        } else {
            data
        };
        let excess = (self.buf.len() + data.len()).saturating_sub(cap);
        if excess > 0 {
            self.buf.drain(..excess);
            self.dropped += excess as u64;
        }
        self.buf.extend(data);
    }
}

#[derive(Debug, Default)]
pub(super) struct Captured {
    pub(super) stdout: Ring,
    pub(super) stderr: Ring,
    /// Capture threads still reading (2 → 0).
    pub(super) open: u8,
}

#[derive(Debug, Default)]
pub(super) struct Capture {
    pub(super) state: Mutex<Captured>,
    pub(super) closed: Condvar,
}

pub(super) fn capture_loop(mut file: File, capture: &Capture, is_stdout: bool) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let mut c = lock(&capture.state);
                let ring = if is_stdout {
                    &mut c.stdout
                } else {
                    &mut c.stderr
                };
                ring.push(&buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let mut c = lock(&capture.state);
    c.open = c.open.saturating_sub(1);
    capture.closed.notify_all();
}

/// Waits (at most `limit`) until both capture threads have reached EOF.
pub(super) fn wait_captured(capture: &Capture, limit: Duration) {
    let deadline = Instant::now() + limit;
    let c = lock(&capture.state);
    drop(wait_while_until(&capture.closed, c, Some(deadline), |c| {
        c.open > 0
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_tail() {
        let mut r = Ring::default();
        r.push(&vec![1u8; OUTPUT_BUFFER - 10]);
        r.push(&[2u8; 20]);
        assert_eq!(r.buf.len(), OUTPUT_BUFFER);
        assert_eq!(r.dropped, 10);
        assert_eq!(r.buf.back(), Some(&2));
        r.push(&vec![3u8; OUTPUT_BUFFER + 5]);
        assert_eq!(r.buf.len(), OUTPUT_BUFFER);
        assert_eq!(r.dropped, 10 + OUTPUT_BUFFER as u64 + 5);
        assert!(r.buf.iter().all(|&b| b == 3));
    }

    proptest::proptest! {
        /// Whatever the pushes, the ring holds the newest `cap` bytes of everything pushed and
        /// counts the rest as dropped.
        #[test]
        fn a_ring_holds_the_newest_bytes_and_counts_the_rest(
            cap in 1usize..64,
            pushes in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..100), 0..20),
        ) {
            let mut r = Ring::default();
            let mut all = Vec::new();
            for p in &pushes {
                r.push_within(p, cap);
                all.extend_from_slice(p);
            }
            let kept = all.len().min(cap);
            proptest::prop_assert_eq!(r.buf.iter().copied().collect::<Vec<u8>>(), all[all.len() - kept..].to_vec());
            proptest::prop_assert_eq!(r.dropped, (all.len() - kept) as u64);
        }
    }
}
