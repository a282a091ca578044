//! # dormant
//!
//! Persistent sandboxes for AI agents, as a library: a sandbox keeps its filesystem and memory
//! between an agent's invocations, sleeps to a snapshot on disk when idle, and wakes in
//! milliseconds, in this process or another.
//!
//! This crate is the public face: it re-exports the contract from `dormant-core` and the tiers.
//!
//! ```no_run
//! use std::sync::Arc;
//! use dormant::{LocalStore, Sandbox, SandboxSpec, WasiRuntime};
//!
//! let rt = WasiRuntime::new()?;
//! let store = Arc::new(LocalStore::open_default()?);
//! let mut sb = rt.create(store.clone(), SandboxSpec::python())?;
//! sb.run_code("x = 41")?;
//! let snap = sb.standby()?;
//! let mut sb = rt.resume(store, &snap)?;
//! assert_eq!(sb.run_code("x + 1")?.stdout, "42\n");
//! # Ok::<(), dormant::Error>(())
//! ```

pub use dormant_core::{
    Command, CompactReport, DEFAULT_IDLE_STANDBY, DirEntry, Durability, Error, ExecOutput,
    Execution, ExecutionError, GcReport, GrantError, Grants, Interrupt, LocalStore, Managed,
    ManagedStats, Manifest, Mount, Operation, Result, Sandbox, SandboxSpec, SnapshotError,
    SnapshotId, SnapshotInfo, SnapshotUsage, State, Tier, Workload,
};
pub use dormant_wasi::{Interrupter, RuntimeConfig, Val, WasiRuntime, WasiSandbox};

/// The KVM tier: Linux microVMs ([`KvmSandbox`](kvm::KvmSandbox)), their options, and host
/// detection. The VMM underneath is private to `dormant-kvm`.
pub mod kvm {
    pub use dormant_kvm::{GuestImage, HostKvm, KvmInterrupter, KvmOptions, KvmSandbox, detect};
}

/// Memory-image helpers shared by the tiers.
pub use dormant_core::memimage;
