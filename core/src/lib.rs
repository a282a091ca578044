//! # dormant-core
//!
//! The tier-independent half of dormant: the [`Sandbox`] contract both tiers implement, the
//! [`SandboxSpec`] a sandbox is created from, its explicit [lifecycle] (illegal transitions are
//! typed errors), the typed [`Error`]s, and snapshots: a versioned, self-checking on-disk
//! format, a crash-safe local store, and the [memory image](memimage) machinery that lets a
//! resume map memory copy-on-write and an incremental checkpoint store only the pages written
//! since the last one.
//!
//! Start with [`Sandbox`], [`Runtime`] and [`LocalStore`]. What a snapshot is on disk (the files of a
//! snapshot directory, the manifest's fields and version, layer and chunk files, checksums) is
//! in one file: [`snapshot::format`].
//!
//! The modules:
//!
//! - [`sandbox`]: the [`Sandbox`] trait, which `Box<dyn Sandbox>` implements too; [`command`]:
//!   its call types ([`Command`], [`Execution`], ...), with [`results`]: a cell's rich results
//!   ([`RichResult`]) and the checked decoding of the guest's record of them; [`capability`]:
//!   what a tier may lack ([`Processes`], [`StreamingExec`], [`Interrupt`]); [`terminal`]:
//!   programs on pseudo-terminals ([`Terminals`], a capability too); [`runtime`]: [`Runtime`], a tier's
//!   create, resume and fork, giving `Box<dyn Sandbox>`; [`managed`]: [`Managed`], the
//!   auto-standby handle around any sandbox, with every call of the contract and its
//!   capabilities.
//! - [`spec`]: [`SandboxSpec`], [`Tier`], [`Workload`], [`Mount`]; [`grants`]: the host access a
//!   caller passes to a resume ([`Grants`]), never taken from a snapshot.
//! - [`lifecycle`]: the state machine ([`Lifecycle`]) and the contract's standby, kill and fork
//!   sequences, written once over a tier's [`Steps`](lifecycle::Steps); [`ids`]: the plain ids
//!   and states every module names ([`SnapshotId`], [`State`], [`Operation`]).
//! - [`error`]: [`Error`] and the causes it carries ([`SnapshotError`], [`GrantError`]).
//! - [`paths`]: guest paths ([`GuestPath`]) and the confined view of a sandbox's files
//!   ([`SandboxFs`]).
//! - [`snapshot`]: the [`Manifest`] and tier-state helpers; [`snapshot::format`]: the on-disk
//!   format and the manifest's container; [`snapshot::layer`]: checked memory and disk layers;
//!   [`snapshot::chunks`]: the compact form's chunks; [`snapshot::store`]: [`LocalStore`]
//!   (commit, read, delete; compaction, GC and usage in its own files).
//! - [`sandbox_dirs`]: the store's directories that hold no snapshot (volumes, live working
//!   directories, the directory detached mount points show); [`default_dirs`]: where the store
//!   and the cache are when the caller names no directory.
//! - [`memimage`]: finding written pages and mapping layers copy-on-write; its leaf `file.rs`
//!   writes and checks the bytes of layer files (the store writes every layer through it, in
//!   [`SnapshotWriter::write_layer`](snapshot::store::SnapshotWriter::write_layer));
//!   [`memguard`]: a memory fault becomes an error of one sandbox, not the process's end;
//!   [`fsarchive`]: the sandbox's own filesystem as a tar archive; [`fsutil`]: atomic writes
//!   and lock files; `testing` (feature `testing`): a store that runs out of space, for tests.
//!
//! There is no import cycle between modules. At the bottom, `error/snapshot.rs`
//! ([`SnapshotError`]) names nothing of the crate, [`ids`] names only it, and [`error`] only
//! `ids`: every other module can name them. Likewise [`command`] (the call types) and
//! `memimage/file.rs` (layer file bytes) are leaves but for [`results`] (a cell's rich results,
//! which names only `snapshot::bounded_vec`), so the contract and the store can name them
//! without naming what names them.

pub mod capability;
pub mod command;
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
pub mod metrics;
pub mod network;
pub mod paths;
pub mod progress;
pub mod results;
pub mod runtime;
pub mod sandbox;
pub mod sandbox_dirs;
pub mod snapshot;
pub mod spec;
pub mod terminal;
#[cfg(feature = "testing")]
pub mod testing;

pub use error::{Error, GrantError, Result, RuntimeContext, SnapshotError, TemplateStepError};
pub use grants::Grants;
pub use lifecycle::{Lifecycle, Operation, State};
pub use managed::{DEFAULT_IDLE_STANDBY, Managed, ManagedStats};
pub use metrics::Metrics;
pub use network::{Egress, HOST_ALIAS, IpNet, NetworkPolicy, PortMapping, PortWake, Ports, Rule};
pub use paths::{DirEntry, GuestPath, SandboxFs};
pub use progress::{NoProgress, Progress, ProgressEvent};
pub use results::RichResult;
pub use runtime::Runtime;
pub use sandbox::{
    Command, ExecOutput, Execution, ExecutionError, Interrupt, Processes, Sandbox, StreamingExec,
};
pub use snapshot::store::{
    CompactReport, Durability, GcReport, LocalStore, SandboxInfo, SandboxUsage, SnapshotInfo,
    SnapshotUsage, StoreUsage,
};
pub use snapshot::{Manifest, SnapshotId};
pub use spec::{Mount, SandboxSpec, Tier, Workload};
pub use terminal::{MAX_TERMINAL_CELLS, TerminalLink, TerminalSize, Terminals};
