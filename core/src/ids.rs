//! Plain ids and states that every part of the contract names: a snapshot's [`SnapshotId`], a
//! sandbox's lifecycle [`State`] and the [`Operation`]s checked against it.
//!
//! They live here, apart from the modules that give them meaning (the state machine in
//! [`lifecycle`](crate::lifecycle), snapshots in [`snapshot`](crate::snapshot)), because
//! [`Error`](crate::Error) names them too: this module uses nothing of the crate but the
//! snapshot decoding error, so `error` can depend on it without depending on the modules that
//! return errors. Each is re-exported where it belongs (`snapshot::SnapshotId`,
//! `lifecycle::{State, Operation}`).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::snapshot::SnapshotError;

/// Identifies a snapshot: `s-<creation ms, hex>-<random, hex>`. Sorts by creation time.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SnapshotId(String);

impl SnapshotId {
    /// A fresh id.
    pub fn generate() -> SnapshotId {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        SnapshotId(format!("s-{ms:016x}-{:032x}", rand::random::<u128>()))
    }

    /// Parses an id; anything but the exact shape is refused (ids name directories).
    pub fn parse(s: &str) -> Result<SnapshotId, SnapshotError> {
        let ok = s.len() == 2 + 16 + 1 + 32
            && s.starts_with("s-")
            && s.as_bytes()[18] == b'-'
            && s[2..18]
                .bytes()
                .chain(s[19..].bytes())
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
        if ok {
            Ok(SnapshotId(s.to_owned()))
        } else {
            Err(SnapshotError::Malformed(format!(
                "{s:?} is not a snapshot id"
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for SnapshotId {
    type Error = SnapshotError;
    fn try_from(s: String) -> Result<Self, SnapshotError> {
        SnapshotId::parse(&s)
    }
}

impl From<SnapshotId> for String {
    fn from(id: SnapshotId) -> String {
        id.0
    }
}

impl std::str::FromStr for SnapshotId {
    type Err = SnapshotError;
    fn from_str(s: &str) -> Result<Self, SnapshotError> {
        SnapshotId::parse(s)
    }
}

/// Where a sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// A live instance holds memory and answers calls.
    Running,
    /// Only a snapshot on disk; no compute and no memory held. `resume` brings it back.
    Standby,
    /// A call failed in a way that left the live instance unusable (trap, deadline, memory cap).
    /// The instance is gone; only `resume` (or `kill`) is allowed.
    Poisoned,
    /// Final. Nothing is allowed.
    Killed,
}

impl State {
    /// The lower-case name used in messages and in the Python bindings.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Standby => "standby",
            State::Poisoned => "poisoned",
            State::Killed => "killed",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The operations of the sandbox contract, as far as the lifecycle is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    RunCode,
    Exec,
    Files,
    Checkpoint,
    Standby,
    Resume,
    Kill,
    /// Exposing or unexposing guest ports ([`Ports`](crate::network::Ports)).
    Ports,
    /// Changing the running sandbox's network policy ([`crate::network::Egress`]).
    Network,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operation::RunCode => "run code in",
            Operation::Exec => "exec in",
            Operation::Files => "access files of",
            Operation::Checkpoint => "checkpoint",
            Operation::Standby => "put in standby",
            Operation::Resume => "resume",
            Operation::Kill => "kill",
            Operation::Ports => "expose ports of",
            Operation::Network => "change the network policy of",
        })
    }
}
