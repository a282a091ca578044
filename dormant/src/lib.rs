//! # dormant
//!
//! Persistent sandboxes for AI agents, as a library: a sandbox keeps its filesystem and memory
//! between an agent's invocations, sleeps to a snapshot on disk when idle, and wakes in
//! milliseconds, in this process or another.
//!
//! This crate is the public face: it re-exports the contract from `dormant-core` (the
//! [`Sandbox`] trait, its call types and capabilities, [`Runtime`], [`Managed`], snapshots and
//! the [`LocalStore`]), the WASI tier ([`WasiRuntime`], [`WasiSandbox`]) and the KVM tier
//! ([`kvm`]), and gives each tier's shared [`runtime`] and a [`resume`] that finds a snapshot's
//! tier. [`Template`]s (in [`template`](mod@template)) prepare an environment once and give new sandboxes
//! from it ([`create_from_template`]).
//!
//! With a tier named:
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
//!
//! Without naming one (a front end, an agent adapter): a `Box<dyn Sandbox>`, and the calls a
//! tier may lack through [`Managed`], each [`Error::Unsupported`] where the tier has not:
//!
//! ```no_run
//! use std::sync::Arc;
//! use dormant::{Command, Grants, LocalStore, Managed, SandboxSpec, Tier};
//!
//! let tier: Tier = "kvm".parse()?;
//! let store = Arc::new(LocalStore::open_default()?);
//! let sb = dormant::runtime(tier)?.create(store.clone(), SandboxSpec::default_for(tier))?;
//! let sb = Managed::new(sb, Some(dormant::DEFAULT_IDLE_STANDBY));
//! let pid = sb.spawn(&Command::new(["sleep", "60"]))?; // Unsupported on the WASI tier
//! let snap = sb.standby()?;
//! let back = dormant::resume(store, &snap, &Grants::new())?; // on the tier it was taken on
//! # let _ = (pid, back);
//! # Ok::<(), dormant::Error>(())
//! ```

use std::sync::{Arc, OnceLock};

pub mod store;
pub mod template;
pub use store::{RemoteOptions, RemoteSandbox, RemoteStore, Store};
pub use template::{
    Built, Ready, Template, TemplateRecord, create_from_template, template, templates,
};

pub use dormant_core::{
    Command, CompactReport, DEFAULT_IDLE_STANDBY, DirEntry, Durability, Egress, Error, ExecOutput,
    Execution, ExecutionError, GcReport, GrantError, Grants, HOST_ALIAS, Interrupt, IpNet,
    LocalStore, Managed, ManagedStats, Manifest, Metrics, Mount, NetworkPolicy, NoProgress,
    Operation, PortMapping, PortWake, Ports, Processes, Progress, ProgressEvent, Result, Rule,
    Runtime, Sandbox, SandboxInfo, SandboxSpec, SandboxUsage, SnapshotError, SnapshotId,
    SnapshotInfo, SnapshotUsage, State, StoreUsage, StreamingExec, TemplateStepError, TerminalLink,
    TerminalSize, Terminals, Tier, Workload,
};
pub use dormant_wasi::{Interrupter, RuntimeConfig, Val, WasiRuntime, WasiSandbox};

/// The KVM tier: Linux microVMs ([`KvmSandbox`](kvm::KvmSandbox)), their options, their
/// [`Runtime`] ([`KvmRuntime`](kvm::KvmRuntime)), and host detection. The VMM underneath is
/// private to `dormant-kvm`.
pub mod kvm {
    pub use dormant_kvm::{
        BOOT_STEPS, BUILTIN_IMAGES, DEFAULT_IMAGE, FORWARD_CHUNK, GuestImage, HostKvm,
        IMAGE_BUILD_STEPS, ImageSource, KvmInterrupter, KvmOptions, KvmRuntime, KvmSandbox,
        MAX_EXPOSED_PORTS, MAX_FORWARDED_CONNECTIONS, RootDisk, build_image,
        build_image_with_progress, detect, list_images,
    };
}

/// This process's [`Runtime`] of `tier`, with default settings, made on first use and shared
/// from then on (the WASI tier's holds the process's one wasmtime engine). To choose settings,
/// build a runtime yourself ([`WasiRuntime::with_config`], [`kvm::KvmRuntime::new`]).
///
/// Errors: the WASI engine could not be made ([`Error::RuntimeMissing`] and kin); a later call
/// tries again. The KVM runtime is always made; its sandboxes need `/dev/kvm`
/// ([`kvm::detect`]).
pub fn runtime(tier: Tier) -> Result<Arc<dyn Runtime>> {
    static WASI: OnceLock<Arc<dyn Runtime>> = OnceLock::new();
    static KVM: OnceLock<Arc<dyn Runtime>> = OnceLock::new();
    Ok(match tier {
        Tier::Wasi => match WASI.get() {
            Some(rt) => rt.clone(),
            // Two first calls may both make an engine; one is kept.
            None => {
                let made = WasiRuntime::new()?;
                WASI.get_or_init(|| Arc::new(made)).clone()
            }
        },
        Tier::Kvm => KVM
            .get_or_init(|| Arc::new(kvm::KvmRuntime::default()))
            .clone(),
    })
}

/// Resumes snapshot `id` of `store` with the runtime of the tier it was taken on
/// ([`runtime`]) and `grants` as its host access (see [`Runtime::resume`]); the way to resume a
/// snapshot whose tier the caller does not know.
pub fn resume(
    store: Arc<LocalStore>,
    id: &SnapshotId,
    grants: &Grants,
) -> Result<Box<dyn Sandbox>> {
    let tier = store.manifest(id)?.spec.tier;
    runtime(tier)?.resume(store, id, grants)
}

/// Memory-image helpers shared by the tiers.
pub use dormant_core::memimage;
pub use dormant_core::progress;
