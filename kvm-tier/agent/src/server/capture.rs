//! The output a background process keeps: one capture thread per pipe reads it into a
//! [`Ring`] per stream (the last [`OUTPUT_BUFFER`] bytes, and how many were dropped), which
//! `output` drains.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{CHUNK, OUTPUT_BUFFER, lock, wait_while_until};

/// The last [`OUTPUT_BUFFER`] bytes of one stream, and how many were dropped before them.
#[derive(Debug, Default)]
pub(super) struct Ring {
    pub(super) buf: VecDeque<u8>,
    pub(super) dropped: u64,
}

impl Ring {
    fn push(&mut self, data: &[u8]) {
        let data = if data.len() > OUTPUT_BUFFER {
            let skip = data.len() - OUTPUT_BUFFER;
            self.dropped += skip as u64;
            &data[skip..]
        } else {
            data
        };
        let excess = (self.buf.len() + data.len()).saturating_sub(OUTPUT_BUFFER);
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
}
