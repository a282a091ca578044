//! A sandbox's head: `heads/<sandbox id>`, the one mutable object per sandbox.
//!
//! It names the sandbox's latest durable snapshot and is its **lease**: the host running the
//! sandbox is its `holder` until `expires_unix_ms`, renewing it while it runs. Every change is
//! a compare-and-swap: a conditional PUT on the ETag the writer read (`If-Match`), or on the
//! object's absence for a new sandbox (`If-None-Match: *`), so two hosts never both take a
//! sandbox's lease, and a host whose lease was taken over cannot move the head (it is fenced:
//! its next checkpoint is refused). A host that stalled past its lease's expiry may still run
//! the sandbox's code until it next writes the head (a checkpoint, a renewal, a wake from
//! standby): only writes are fenced.
//!
//! ```text
//! {"version": 1, "sandbox_id": "sb-…", "snapshot": "s-…" or null,
//!  "generation": 7,                    one more at every takeover (a fencing token)
//!  "holder": {"host": "…", "pid": 1234, "token": "…", "process": "…"} or null,
//!  "expires_unix_ms": 1764…,           when the holder's lease ends unless renewed
//!  "updated_unix_ms": 1764…,
//!  "killed_unix_ms": 1764…}            only once killed: a resume by id finds nothing
//! ```
//!
//! Expiry compares the holder's clock (it wrote `expires_unix_ms`) with the reader's: hosts
//! are assumed to agree on the time to well within a lease's time to live (NTP does).

use dormant_core::snapshot::SnapshotId;
use serde::{Deserialize, Serialize};

/// Largest head object read: a head is ~300 bytes.
pub const MAX_HEAD_LEN: usize = 64 * 1024;
/// The version of the head this build writes and reads.
pub const HEAD_VERSION: u32 = 1;

/// Who holds a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The holder's host name.
    pub host: String,
    /// Its process id.
    pub pid: u32,
    /// A random token of this lease (unique per acquisition in a process).
    pub token: String,
    /// A random token of the holder's process: host name and pid alone do not tell two
    /// processes apart (containers with one host name, each its pid 1).
    #[serde(default)]
    pub process: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} pid {}", self.host, self.pid)
    }
}

/// A sandbox's head, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub version: u32,
    pub sandbox_id: String,
    /// The latest durable snapshot (none before the sandbox's first durable checkpoint).
    pub snapshot: Option<SnapshotId>,
    /// Incremented at every change of holder: the fencing token of a lease.
    pub generation: u64,
    pub holder: Option<Holder>,
    /// When the holder's lease ends unless renewed (Unix ms, the holder's clock).
    pub expires_unix_ms: u64,
    pub updated_unix_ms: u64,
    /// When the sandbox was killed (Unix ms), if it was: resuming it by id then finds nothing,
    /// until a snapshot taken after the kill (of a resume by snapshot id) is uploaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub killed_unix_ms: Option<u64>,
}

impl Head {
    /// Decodes and checks a head read from the bucket: size, JSON, version, and that it is the
    /// head of `sandbox_id`.
    pub fn decode(bytes: &[u8], sandbox_id: &str) -> Result<Head, String> {
        if bytes.len() > MAX_HEAD_LEN {
            return Err(format!("head of {} bytes", bytes.len()));
        }
        let h: Head = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if h.version != HEAD_VERSION {
            return Err(format!(
                "head version {} (this build reads {HEAD_VERSION})",
                h.version
            ));
        }
        if h.sandbox_id != sandbox_id {
            return Err(format!(
                "the head of {:?} is named {:?}",
                sandbox_id, h.sandbox_id
            ));
        }
        if let Some(holder) = &h.holder
            && (holder.host.len() > 256 || holder.token.len() > 64 || holder.process.len() > 64)
        {
            return Err("holder fields too long".into());
        }
        Ok(h)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a head serialises")
    }

    /// The live holder at `now_ms`, other than `token`: whoever would make this host's
    /// acquisition a [`SandboxBusy`](dormant_core::Error::SandboxBusy).
    pub fn other_live_holder(&self, token: &str, now_ms: u64) -> Option<&Holder> {
        self.holder
            .as_ref()
            .filter(|h| h.token != token && self.expires_unix_ms > now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn head() -> Head {
        Head {
            version: 1,
            sandbox_id: "sb-1".into(),
            snapshot: None,
            generation: 3,
            holder: Some(Holder {
                host: "h".into(),
                pid: 7,
                token: "t".into(),
                process: "p".into(),
            }),
            expires_unix_ms: 1000,
            updated_unix_ms: 900,
            killed_unix_ms: None,
        }
    }

    #[test]
    fn round_trip_and_checks() {
        let h = head();
        assert_eq!(Head::decode(&h.encode(), "sb-1").unwrap(), h);
        assert!(Head::decode(&h.encode(), "sb-2").is_err());
        let mut v2 = h.clone();
        v2.version = 2;
        assert!(Head::decode(&v2.encode(), "sb-1").is_err());
        assert!(h.other_live_holder("t", 0).is_none(), "its own lease");
        assert!(h.other_live_holder("u", 999).is_some());
        assert!(h.other_live_holder("u", 1000).is_none(), "expired");
    }

    proptest! {
        #[test]
        fn decoding_untrusted_bytes_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..1024),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        ) {
            let _ = Head::decode(&bytes, "sb-1");
            let mut enc = head().encode();
            for (at, x) in flips {
                let n = enc.len();
                enc[at % n] ^= x;
            }
            if let Ok(h) = Head::decode(&enc, "sb-1") {
                prop_assert_eq!(h.sandbox_id, "sb-1");
            }
        }
    }
}
