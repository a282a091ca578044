//! # dormant-core
//!
//! The tier-independent half of dormant: the [`Sandbox`] contract both tiers implement, the
//! [`SandboxSpec`] a sandbox is created from, its explicit [lifecycle] (illegal
//! transitions are typed errors), the typed [`Error`]s, and snapshots: a versioned,
//! self-checking [format](snapshot::format), a crash-safe [local store](snapshot::store), and the
//! [memory image](memimage) machinery that lets a resume map memory copy-on-write and an
//! incremental checkpoint store only the pages written since the last one.
//!
//! Start with [`Sandbox`] and [`snapshot::store::LocalStore`].

pub mod default_dirs;
pub mod error;
pub mod fsarchive;
pub mod fsutil;
pub mod grants;
pub mod ids;
pub mod lifecycle;
pub mod managed;
pub mod memguard;
pub mod memimage;
pub mod paths;
pub mod sandbox;
pub mod sandbox_dirs;
pub mod snapshot;
pub mod spec;
#[cfg(feature = "testing")]
pub mod testing;

pub use error::{Error, GrantError, Result, RuntimeContext, SnapshotError};
pub use grants::Grants;
pub use lifecycle::{Lifecycle, Operation, State};
pub use managed::{DEFAULT_IDLE_STANDBY, Managed, ManagedStats};
pub use paths::{DirEntry, GuestPath, SandboxFs};
pub use sandbox::{Command, ExecOutput, Execution, ExecutionError, Interrupt, Sandbox};
pub use snapshot::store::{
    CompactReport, Durability, GcReport, LocalStore, SnapshotInfo, SnapshotUsage,
};
pub use snapshot::{Manifest, SnapshotId};
pub use spec::{Mount, SandboxSpec, Tier, Workload};
