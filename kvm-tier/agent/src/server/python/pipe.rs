//! The pipes between the agent and its Python driver (`repl.py`), in both directions a
//! length-prefixed message:
//!
//! ```text
//! agent → driver (a cell):   u32 LE len | u8 flags | len bytes of Python source (UTF-8)
//! driver → agent (its end):  u32 LE len | len bytes of JSON {"error": null | {name, value, traceback}, "results"?: [...]}
//! ```
//!
//! `flags` bit 0 ([`RESEED`]): reseed the interpreter's PRNGs before the cell. Before the first cell the agent also sends the driver itself, unframed (the interpreter's
//! bootstrap reads exactly its length). The driver is code in the guest that the guest's user
//! can change (it runs in the same interpreter as their cells), so what it sends is untrusted:
//! a reply longer than [`MAX_REPLY`] is refused before anything is allocated for it, and
//! [`ReplyDecoder`] only ever holds the bytes that arrived.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::proto::{CellError, MAX_DATA};

/// Longest reply accepted from the driver (17 MiB: a results record as large as a frame's
/// payload, and the rest; the driver shortens long exception texts to a few KiB).
pub const MAX_REPLY: usize = MAX_DATA + (1 << 20);

/// What the driver says about a finished cell.
#[derive(Debug, Clone, Deserialize)]
pub struct DriverReply {
    /// The exception the cell raised, if any.
    pub error: Option<CellError>,
    /// The cell's rich results record (a JSON list), passed to the host as it came: the host
    /// decodes it with its caps. Absent when there are none, and from drivers older than it.
    #[serde(default)]
    pub results: Option<Box<RawValue>>,
}

/// Why the driver's reply pipe can no longer be read.
#[derive(Debug, thiserror::Error)]
pub enum PipeError {
    /// The length prefix is over [`MAX_REPLY`].
    #[error("the Python driver's reply claims {len} bytes, more than {MAX_REPLY}")]
    TooLarge {
        /// The claimed length.
        len: u64,
    },
    /// The reply is not the JSON the driver sends.
    #[error("the Python driver's reply is not valid: {0}")]
    Json(#[from] serde_json::Error),
    /// The caller fed more bytes than [`ReplyDecoder::wanted`].
    #[error("fed {got} bytes to a reply that needs only {wanted} more")]
    Overfed {
        /// Bytes given.
        got: usize,
        /// Bytes the reply still needed.
        wanted: usize,
    },
}

/// Decodes the driver's replies from bytes as they arrive: read at most
/// [`wanted`](Self::wanted) bytes from the pipe and [`feed`](Self::feed) them. Memory held is
/// at most what arrived of the current reply (never its claimed length). After an error the
/// pipe's framing is lost: the caller gives up on that driver.
#[derive(Debug, Default)]
pub struct ReplyDecoder {
    head: [u8; 4],
    head_len: usize,
    /// The body's length, once the prefix is complete.
    len: Option<usize>,
    body: Vec<u8>,
}

impl ReplyDecoder {
    /// How many more bytes the current reply needs (at least 1).
    pub fn wanted(&self) -> usize {
        match self.len {
            None => self.head.len() - self.head_len,
            // Never 0: a complete reply resets the decoder at once.
            Some(len) => len - self.body.len(),
        }
    }

    /// Takes the next bytes of the pipe, at most [`wanted`](Self::wanted) of them; returns the
    /// reply once it is complete (the decoder then waits for the next one).
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<Option<DriverReply>, PipeError> {
        let wanted = self.wanted();
        if bytes.len() > wanted {
            return Err(PipeError::Overfed {
                got: bytes.len(),
                wanted,
            });
        }
        if self.len.is_none() {
            let take = bytes.len().min(self.head.len() - self.head_len);
            self.head[self.head_len..self.head_len + take].copy_from_slice(&bytes[..take]);
            self.head_len += take;
            bytes = &bytes[take..];
            if self.head_len < self.head.len() {
                return Ok(None);
            }
            let len = u32::from_le_bytes(self.head);
            if len as usize > MAX_REPLY {
                return Err(PipeError::TooLarge { len: len.into() });
            }
            self.len = Some(len as usize);
        }
        self.body.extend_from_slice(bytes);
        if self.len.is_some_and(|len| self.body.len() < len) {
            return Ok(None);
        }
        let body = std::mem::take(&mut self.body);
        *self = ReplyDecoder::default();
        Ok(Some(serde_json::from_slice(&body)?))
    }
}

/// The request flag that has the driver reseed `random` (and numpy's) before the cell.
const RESEED: u8 = 1;

/// The message that hands `code` to the driver (`reseed`: see [`RESEED`]). `None` when it is
/// longer than a `u32` can say (the agent's frames cap it far lower).
pub(crate) fn request(code: &str, reseed: bool) -> Option<Vec<u8>> {
    let len = u32::try_from(code.len()).ok()?;
    let mut msg = Vec::with_capacity(5 + code.len());
    msg.extend_from_slice(&len.to_le_bytes());
    msg.push(if reseed { RESEED } else { 0 });
    msg.extend_from_slice(code.as_bytes());
    Some(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(json: &str) -> Vec<u8> {
        let mut v = (json.len() as u32).to_le_bytes().to_vec();
        v.extend_from_slice(json.as_bytes());
        v
    }

    #[test]
    fn replies_decode_byte_by_byte_and_whole() {
        let bytes = framed(r#"{"error":{"name":"E","value":"v","traceback":"t"}}"#);
        let mut d = ReplyDecoder::default();
        let mut got = None;
        for b in &bytes {
            assert!(got.is_none());
            got = d.feed(std::slice::from_ref(b)).unwrap();
        }
        let got = got.unwrap();
        assert_eq!(got.error.unwrap().name, "E");
        assert!(
            got.results.is_none(),
            "an older driver's reply has no results"
        );
        let bytes = framed(r#"{"error":null,"results":[{"text":"1"}]}"#);
        assert!(d.feed(&bytes[..4]).unwrap().is_none());
        let got = d.feed(&bytes[4..]).unwrap().unwrap();
        assert!(got.error.is_none());
        assert_eq!(got.results.unwrap().get(), r#"[{"text":"1"}]"#);
    }

    #[test]
    fn oversized_and_overfed_replies_are_refused() {
        let mut d = ReplyDecoder::default();
        let e = d.feed(&u32::MAX.to_le_bytes()).unwrap_err();
        assert!(matches!(e, PipeError::TooLarge { .. }), "{e}");
        let mut d = ReplyDecoder::default();
        assert!(matches!(
            d.feed(&[0; 5]),
            Err(PipeError::Overfed { got: 5, wanted: 4 })
        ));
    }

    #[test]
    fn requests_carry_their_length() {
        let r = request("print(1)", false).unwrap();
        assert_eq!(&r[..4], &8u32.to_le_bytes());
        assert_eq!(r[4], 0);
        assert_eq!(&r[5..], b"print(1)");
        assert_eq!(request("", true).unwrap(), [0, 0, 0, 0, RESEED]);
    }
}
