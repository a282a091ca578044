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

/// The KVM tier: Linux microVMs ([`KvmSandbox`](kvm::KvmSandbox)), host detection and the VMM
/// underneath.
pub mod kvm {
    pub use dormant_kvm::persist::SavedState;
    pub use dormant_kvm::sandbox::{GuestImage, KvmInterrupter, KvmOptions, KvmSandbox};
    pub use dormant_kvm::vm::{Exit, GuestRam, MicroVm, VmError, VmState};
    pub use dormant_kvm::{HostKvm, detect, machine, sandbox, snapshot};
}

/// Memory-image helpers shared by the tiers.
pub use dormant_core::memimage;
