//! Capturing a guest's stdout/stderr per call, with a size cap.
//!
//! Unlike wasmtime-wasi's `MemoryOutputPipe`, the buffer is taken (emptied) after every call,
//! and writes past the cap are dropped and flagged instead of failing the guest's write: the
//! guest carries on, and the host reports [`Error::OutputLimit`](dormant_core::Error) for the
//! call.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use parking_lot::Mutex;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

#[derive(Debug, Default)]
struct Buf {
    data: Vec<u8>,
    limit: usize,
    overflowed: bool,
}

impl Buf {
    fn push(&mut self, bytes: &[u8]) {
        let room = self.limit.saturating_sub(self.data.len());
        if bytes.len() > room {
            self.overflowed = true;
        }
        self.data.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }
}

/// A capped capture buffer shared between the host and a guest's output stream.
#[derive(Debug, Clone)]
pub struct Capture(Arc<Mutex<Buf>>);

impl Capture {
    pub fn new(limit: usize) -> Capture {
        Capture(Arc::new(Mutex::new(Buf {
            data: Vec::new(),
            limit,
            overflowed: false,
        })))
    }

    /// Takes what was written since the last take; the flag says whether some was dropped.
    pub fn take(&self) -> (Vec<u8>, bool) {
        let mut b = self.0.lock();
        let overflowed = std::mem::take(&mut b.overflowed);
        (std::mem::take(&mut b.data), overflowed)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for Capture {
    async fn ready(&mut self) {}
}

impl OutputStream for Capture {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.0.lock().push(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(1 << 20)
    }
}

impl tokio::io::AsyncWrite for Capture {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.0.lock().push(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl IsTerminal for Capture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Capture {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_and_flags() {
        let c = Capture::new(5);
        let mut s = c.clone();
        s.write(Bytes::from_static(b"abc")).unwrap();
        s.write(Bytes::from_static(b"defg")).unwrap();
        assert_eq!(c.take(), (b"abcde".to_vec(), true));
        s.write(Bytes::from_static(b"xy")).unwrap();
        assert_eq!(c.take(), (b"xy".to_vec(), false));
    }
}
