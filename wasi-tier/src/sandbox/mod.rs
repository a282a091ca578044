//! A WASI sandbox: a live wasmtime instance (or none, in standby) over its own root directory.
//!
//! This file holds the handle ([`WasiSandbox`]), the state it keeps between calls (the live
//! instance, the memory layer under it, a filesystem archive not yet extracted), the
//! [`Interrupter`], the [`Sandbox`] implementation (standby, kill and fork made of
//! `dormant_core::lifecycle`'s steps) and the contract's `Runtime` for [`WasiRuntime`]. They
//! forward to the rooms below, each named after what it holds:
//!
//! - `create`: a new sandbox, and the fresh instance of its module that create and restore
//!   both start from;
//! - `live`: the calls a live sandbox answers (`run_code`, `call`, `exec`, the files API),
//!   each under the call deadline;
//! - `checkpoint`: the checkpoint that checkpoint, standby and fork write (memory layer,
//!   filesystem archive, manifest);
//! - `restore`: resume and fork, which load a snapshot into a handle (open it first: it
//!   walks the restore path in the order it runs);
//! - `state`: the tier state a WASI snapshot records (module hashes, clock, globals);
//! - `dirs`: the sandbox's root directory and the mounts the guest sees.

mod checkpoint;
mod create;
mod dirs;
mod live;
mod restore;
mod state;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dormant_core::lifecycle;
use dormant_core::memguard::GuardedMemory;
use dormant_core::snapshot::FileRecord;
use dormant_core::{
    Command, DirEntry, Error, ExecOutput, Execution, Grants, Lifecycle, LocalStore, Metrics,
    Operation, Result, Runtime, Sandbox, SandboxFs, SandboxSpec, SnapshotId, State, Tier,
};
use wasmtime::{Global, Instance, Memory, Store, TypedFunc};

use crate::capture::Capture;
use crate::host::{Clock, Host};
use crate::runtime::{Loaded, WasiRuntime};

/// The exports `turn` needs.
struct PyFuncs {
    alloc: TypedFunc<i32, i32>,
    turn: TypedFunc<(i32, i32), i32>,
}

/// Where the live memory's file-backed pages come from.
#[derive(Debug, Clone)]
struct Layer {
    id: SnapshotId,
    depth: u32,
}

/// A running instance.
struct Live {
    /// SIGBUS in the memory (a snapshot file that cannot supply a page) becomes a recorded
    /// fault of this sandbox. First field: unregistered before the memory goes away.
    guard: GuardedMemory,
    store: Store<Host>,
    instance: Instance,
    memory: Memory,
    globals: Vec<(String, Global)>,
    py: Option<PyFuncs>,
    out: Capture,
    err: Capture,
    clock: Clock,
    layer: Option<Layer>,
    mapped_runs: usize,
    /// Before the next cell, reseed the interpreter's PRNGs and close file objects whose
    /// descriptors did not survive (set after a resume).
    reseed: bool,
}

/// A sandbox of the WASI tier.
pub struct WasiSandbox {
    rt: WasiRuntime,
    store: Arc<LocalStore>,
    id: String,
    spec: SandboxSpec,
    /// The host access its caller granted (create's spec, or the last resume's grants).
    grants: Grants,
    lifecycle: Lifecycle,
    module: Option<Arc<Loaded>>,
    live: Option<Live>,
    /// The live working directory, which is the sandbox's root (absent in standby).
    workdir: Option<PathBuf>,
    fs: Option<SandboxFs>,
    /// Whether the last resume of this handle rebuilt memory or files from the compact form.
    resumed_cold: bool,
    /// Raised by an [`Interrupter`] to stop the running call.
    interrupt: Arc<AtomicBool>,
    /// What this handle has used so far (see [`Sandbox::metrics`]): the CPU time of guest
    /// calls and the bytes written to files, kept across standby and resume.
    used: Used,
    /// The snapshot's filesystem archive, not yet extracted into the root (done before the
    /// first use, so that a resume does not pay for files it may never touch).
    pending_fs: Option<PendingFs>,
}

/// The counters behind [`WasiSandbox`]'s metrics.
#[derive(Debug, Clone, Copy, Default)]
struct Used {
    /// Thread CPU time spent in calls into the guest (cells, export calls, commands).
    cpu_time: Duration,
    /// Bytes written to files: the guest's writes (harvested from its store after each call)
    /// and the files API's.
    written: u64,
}

/// Stops a sandbox's running call from another thread (see [`WasiSandbox::interrupter`]).
#[derive(Debug, Clone)]
pub struct Interrupter(Arc<AtomicBool>);

impl Interrupter {
    /// Interrupts the call running now, if any (a call that starts later is not affected).
    pub fn interrupt(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl dormant_core::Interrupt for Interrupter {
    fn interrupt(&self) {
        Interrupter::interrupt(self);
    }
}

/// A verified filesystem archive waiting to be extracted.
struct PendingFs {
    snapshot: SnapshotId,
    /// The archive's record in its snapshot when it can be hard-linked into the next one
    /// (`None` for an archive rebuilt from compact chunks).
    record: Option<FileRecord>,
    archive: std::fs::File,
}

impl std::fmt::Debug for WasiSandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasiSandbox")
            .field("id", &self.id)
            .field("state", &self.lifecycle.state())
            .field("workload", &self.spec.workload)
            .finish_non_exhaustive()
    }
}

fn runtime_err(op: &'static str) -> impl FnOnce(wasmtime::Error) -> Error {
    move |e| Error::runtime(op, e)
}

impl WasiSandbox {
    fn live_mut(&mut self) -> Result<&mut Live> {
        let state = self.lifecycle.state();
        self.live.as_mut().ok_or(Error::IllegalTransition {
            op: Operation::RunCode,
            state,
        })
    }

    /// The snapshot the live memory is currently layered on, if any.
    pub fn last_snapshot(&self) -> Option<&SnapshotId> {
        self.lifecycle.last_good()
    }

    /// Whether this handle's last resume was *cold*: it had to rebuild memory or files from a
    /// snapshot's compact form (see `LocalStore::compact`) instead of mapping them directly.
    pub fn resumed_cold(&self) -> bool {
        self.resumed_cold
    }

    /// The spec the sandbox was created from, or its snapshot's after a resume, with the
    /// mounts attached now: the caller's directories, in the snapshot's order (a detached mount
    /// point has an empty `host`).
    pub fn spec(&self) -> &SandboxSpec {
        &self.spec
    }

    fn release(&mut self) {
        self.live = None;
        self.fs = None;
        self.pending_fs = None;
        if let Some(w) = self.workdir.take() {
            // Emptied and kept for this process's next sandbox (saves a resume its mkdir).
            self.store.release_live_dir(w);
        }
    }

    /// The host access this sandbox holds (see [`Sandbox::grants`]).
    pub fn grants(&self) -> &Grants {
        &self.grants
    }

    /// A handle that stops this sandbox's running `run_code` (or export call) from another
    /// thread: the call fails with [`Error::Interrupted`] within a tick (10 ms) and the sandbox
    /// is poisoned, like after a trap. It stays valid across resumes of this handle.
    pub fn interrupter(&self) -> Interrupter {
        Interrupter(self.interrupt.clone())
    }

    fn new_id() -> String {
        format!("sb-{:016x}", rand::random::<u64>())
    }
}

impl Sandbox for WasiSandbox {
    fn id(&self) -> &str {
        &self.id
    }

    fn tier(&self) -> Tier {
        Tier::Wasi
    }

    fn state(&self) -> State {
        self.lifecycle.state()
    }

    fn run_code(&mut self, code: &str) -> Result<Execution> {
        self.run_code_with_timeout(code, None)
    }

    fn run_code_with_timeout(
        &mut self,
        code: &str,
        timeout: Option<Duration>,
    ) -> Result<Execution> {
        WasiSandbox::run_code_with_timeout(self, code, timeout)
    }

    fn exec(&mut self, cmd: &Command) -> Result<ExecOutput> {
        self.do_exec(cmd)
    }

    fn read_file(&mut self, path: &str) -> Result<Vec<u8>> {
        self.fs(Operation::Files)?.read(path)
    }

    fn write_file(&mut self, path: &str, data: &[u8]) -> Result<()> {
        self.fs(Operation::Files)?.write(path, data)?;
        self.used.written += data.len() as u64;
        Ok(())
    }

    fn list_dir(&mut self, path: &str) -> Result<Vec<DirEntry>> {
        self.fs(Operation::Files)?.list(path)
    }

    fn remove(&mut self, path: &str) -> Result<()> {
        self.fs(Operation::Files)?.remove(path)
    }

    fn exists(&mut self, path: &str) -> Result<bool> {
        self.fs(Operation::Files)?.exists(path)
    }

    fn checkpoint(&mut self) -> Result<SnapshotId> {
        self.do_checkpoint()
    }

    fn standby(&mut self) -> Result<SnapshotId> {
        lifecycle::standby(self)
    }

    fn grants(&self) -> &Grants {
        &self.grants
    }

    fn resume_with(&mut self, id: &SnapshotId, grants: &Grants) -> Result<()> {
        self.do_resume_with(id, grants)
    }

    fn fork(&mut self, n: usize) -> Result<Vec<WasiSandbox>> {
        lifecycle::fork(self, n)
    }

    fn fork_boxed(&mut self, n: usize) -> Result<Vec<Box<dyn Sandbox>>> {
        self.fork(n).map(dormant_core::sandbox::boxed)
    }

    fn kill(&mut self) -> Result<()> {
        lifecycle::kill(self)
    }

    /// CPU time of the calls into the guest, the linear memory's size (zero without a live
    /// instance: in standby, after kill) under the memory cap, and the bytes written to files.
    fn metrics(&mut self) -> Result<Metrics> {
        Ok(Metrics {
            cpu_time: self.used.cpu_time,
            memory_bytes: self
                .live
                .as_ref()
                .map_or(0, |l| l.memory.data_size(&l.store) as u64),
            memory_limit_bytes: self.spec.memory_limit,
            disk_bytes_written: self.used.written,
        })
    }

    fn interrupter(&self) -> Option<Arc<dyn dormant_core::Interrupt>> {
        Some(Arc::new(WasiSandbox::interrupter(self)))
    }

    /// Unsupported: a WASI command runs to completion within its call.
    fn processes(&mut self) -> Result<&mut dyn dormant_core::Processes> {
        Err(Error::Unsupported {
            op: "background commands",
            what: "the WASI tier (its commands run to completion; use tier=\"kvm\" for \
                   background processes)"
                .into(),
        })
    }
}

/// The steps the contract's standby, kill and fork are made of ([`lifecycle`]).
impl lifecycle::Steps for WasiSandbox {
    fn lifecycle(&mut self) -> &mut Lifecycle {
        &mut self.lifecycle
    }

    fn write_checkpoint(&mut self) -> Result<SnapshotId> {
        self.do_checkpoint()
    }

    fn release(&mut self) {
        WasiSandbox::release(self);
    }

    fn children(&mut self, base: &SnapshotId, n: usize) -> Result<Vec<WasiSandbox>> {
        WasiSandbox::children(&self.rt, &self.store, base, &self.grants, self.current(), n)
    }
}

/// The WASI tier under dormant's tier-independent contract: what [`WasiRuntime::create`] and
/// [`WasiRuntime::resume_with`] give, boxed, and the children of a stored snapshot, as
/// [`fork`](Sandbox::fork) makes them.
impl Runtime for WasiRuntime {
    fn tier(&self) -> Tier {
        Tier::Wasi
    }

    fn fingerprint(&self, spec: &SandboxSpec) -> Result<String> {
        WasiRuntime::fingerprint(self, &spec.workload)
    }

    fn create(&self, store: Arc<LocalStore>, spec: SandboxSpec) -> Result<Box<dyn Sandbox>> {
        Ok(Box::new(WasiRuntime::create(self, store, spec)?))
    }

    fn resume(
        &self,
        store: Arc<LocalStore>,
        id: &SnapshotId,
        grants: &Grants,
    ) -> Result<Box<dyn Sandbox>> {
        Ok(Box::new(self.resume_with(store, id, grants)?))
    }

    fn fork(
        &self,
        store: Arc<LocalStore>,
        id: &SnapshotId,
        grants: &Grants,
        n: usize,
    ) -> Result<Vec<Box<dyn Sandbox>>> {
        WasiSandbox::children(self, &store, id, grants, None, n).map(dormant_core::sandbox::boxed)
    }
}

impl Drop for WasiSandbox {
    fn drop(&mut self) {
        self.release();
    }
}
