//! [`KvmSandbox`]: a Linux microVM behind dormant's sandbox contract.
//!
//! The guest runs dormant's agent as PID 1 (`kvm-tier/agent`); every operation is a request to
//! it over virtio-vsock. A checkpoint quiesces vCPU and devices, stores RAM (full, or the pages
//! written since the parent snapshot) with the vCPU/VM/device state, and lets the guest go on.
//! A resume builds a brand-new VM with RAM mapped copy-on-write from the snapshot and reconnects
//! to the agent, which still knows its processes.
//!
//! A fresh sandbox does not boot Linux every time: the first creation for a given guest image
//! and RAM size boots it once and keeps a *base snapshot* in the store (`bases/` under its
//! root); later creations resume that snapshot under a new sandbox id (milliseconds instead of
//! a boot).
//!
//! Guest randomness: every resumed copy (fork, base) gets fresh entropy from the host mixed
//! into the guest's pool, so siblings do not share random streams.
//!
//! # No call waits for ever
//!
//! The guest is not trusted to answer. Every wait on the agent connection has a host-side
//! deadline, for reads and for writes (a guest that never grants vsock credit): `exec` and
//! `run_code` get their timeout plus [`EXEC_GRACE`] (the agent kills the command, or
//! interrupts the cell, at the timeout and reports), the other requests [`KvmOptions::request_timeout`] of silence at most (they move
//! at most 16 MiB), `wait` asks the agent in slices of at most [`WAIT_SLICE`], connecting gets
//! [`KvmOptions::connect_timeout`]; a checkpoint's quiesce is bounded by the vCPU thread's
//! reply timeout. [`KvmSandbox::interrupter`] stops a running call from another thread.
//!
//! A call stopped by its deadline ([`Error::Deadline`]) or by the interrupter
//! ([`Error::Interrupted`]) resets its agent connection: the agent kills the command of an
//! `exec` whose connection goes away. The sandbox stays `running` and the next call connects
//! anew; only when the agent does not accept that connection within the connect timeout (the
//! guest hangs, or its VM stopped) is the sandbox poisoned, and resuming a snapshot (the error
//! names the last good one) recovers it.
//!
//! # Layout
//!
//! This file holds the handle: [`KvmSandbox`], its accessors, its [`Sandbox`] implementation
//! and its `lifecycle::Steps` (from which dormant-core builds standby, kill and fork). Their
//! methods are a few lines each over the rooms below: the file calls and `exec` over `live`,
//! `run_code` over `code`, the checkpoint over `checkpoint`, `resume_with` and the children of a fork over `restore`.
//! The rest lives in rooms named after what they hold:
//!
//! - `image`: the guest image ([`GuestImage`]) and the tier's options ([`KvmOptions`]).
//! - `create`: a new sandbox, resumed from the base snapshot of its image (booted once), and
//!   [`KvmSandbox::boot`].
//! - `live`: the connection to the guest agent with its deadlines and the interrupter
//!   ([`KvmInterrupter`]), how a failed call ends, and `exec`.
//! - `code`: `run_code`, a cell in the guest agent's persistent Python interpreter.
//! - `processes`: background processes (spawn, wait, signal, output).
//! - `egress`: the network policy ([`Egress`]), kept in the spec.
//! - `checkpoint`: the failure-atomic checkpoint of the live machine.
//! - `restore`: resuming a snapshot into a new VM, the restore path in the order it runs.
//! - `ports`: exposed guest ports, host listeners forwarded over vsock ([`Ports`]).
//! - `terminal`: programs on pseudo-terminals in the guest and attachments to them over vsock
//!   ([`Terminals`]).

mod checkpoint;
mod code;
mod create;
mod egress;
mod image;
mod live;
mod ports;
mod processes;
mod restore;
mod terminal;

use std::sync::Arc;
use std::time::Duration;

use dormant_agent::client::Client;
use dormant_core::lifecycle::{self, Lifecycle, Operation, State};
use dormant_core::paths::DirEntry;
use dormant_core::snapshot::SnapshotId;
use dormant_core::snapshot::store::LocalStore;
use dormant_core::{
    Command, Egress, Error, ExecOutput, Execution, Grants, Metrics, PortMapping, PortWake, Ports,
    Processes, Result, Sandbox, SandboxSpec, StreamingExec, Terminals, Tier,
};

use crate::HostKvm;
use crate::machine::{Machine, MachineUsage};
use crate::snapshot;
use crate::virtio::vsock::VsockStream;

pub use create::BOOT_STEPS;
pub use image::{
    BUILTIN_IMAGES, DEFAULT_IMAGE, GuestImage, IMAGE_BUILD_STEPS, ImageSource, KvmOptions,
    RootDisk, build_image, build_image_with_progress, list_images,
};
pub use live::KvmInterrupter;
use live::{CallControl, check_path};
pub use ports::{CHUNK as FORWARD_CHUNK, MAX_EXPOSED_PORTS, MAX_FORWARDED_CONNECTIONS};

/// The agent's vsock port.
pub const AGENT_PORT: u32 = dormant_agent::proto::DEFAULT_PORT;
/// How long past a command's timeout the host waits for the agent's report (the agent kills
/// the command's process group at the timeout, then drains its pipes for up to 2 s; a
/// `run_code` cell is interrupted at its timeout and killed 3 s later): the host-side deadline
/// of `exec` and `run_code` is their timeout plus this.
pub const EXEC_GRACE: Duration = Duration::from_secs(10);
/// `wait` asks the agent for at most this long at a time, so that each request has a
/// host-side deadline even when the caller waits for ever.
pub const WAIT_SLICE: Duration = Duration::from_secs(10);
/// A request's host-side deadline in all, in units of [`KvmOptions::request_timeout`] (its
/// bound on silence).
const REQUEST_CAP: u32 = 10;

/// A Linux microVM sandbox.
pub struct KvmSandbox {
    store: Arc<LocalStore>,
    id: String,
    /// Its spec; `spec.mounts` are its mount points in volume-slot order, attached to the
    /// granted host directories (or detached).
    spec: SandboxSpec,
    /// The host access its caller granted (create's spec, or the last resume's grants).
    grants: Grants,
    lifecycle: Lifecycle,
    machine: Option<Machine>,
    agent: Option<Client<VsockStream>>,
    /// The snapshot the live RAM is layered on (what the next checkpoint's delta is against).
    parent: Option<SnapshotId>,
    /// What the guest wrote since `parent` that no committed snapshot holds yet.
    unsaved: snapshot::Unsaved,
    opts: KvmOptions,
    /// What [`KvmSandbox::interrupter`] raises.
    calls: Arc<CallControl>,
    /// The next `run_code` reseeds the guest interpreter's PRNGs (set by every resume).
    reseed: bool,
    /// The exposed ports' listeners and connections (`spec.ports` says which).
    ports: ports::Forwarder,
    /// The terminal attachments open now (they end with the machine).
    terminals: terminal::Attachments,
    /// What the machines this handle ran before its current one used (see
    /// [`Sandbox::metrics`]): added up as each is shut down (standby, resume, kill).
    used: MachineUsage,
    /// Where the last resume's time went (see [`KvmSandbox::resume_timings`]).
    resume_timings: Option<ResumeTimings>,
}

/// Where the time of a resume went, phase by phase, in the order they run (see
/// `sandbox/restore.rs`): from reading the snapshot to the resumed guest's first reply.
/// Wall-clock durations measured with `Instant` on the resuming thread; they add up to the
/// time spent in `load` (the caller's own work before it, such as reading the manifest, is
/// not in them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResumeTimings {
    /// Reading and checking the layer chain and mapping RAM and disk copy-on-write
    /// (`snapshot::load_machine`).
    pub map: Duration,
    /// A new VM with the saved vCPU and VM state, the devices restored and the vCPU started
    /// (`Machine::restore`), and the previous machine of the handle let go.
    pub restore: Duration,
    /// Taking back the agent connection of the checkpoint (or connecting anew).
    pub connect: Duration,
    /// The first agent round trip of the resumed guest (entropy and wall clock refreshed):
    /// the guest kernel's first work after the resume, where guest kernel code is emulated
    /// most of a resume's time.
    pub first_reply: Duration,
}

impl ResumeTimings {
    /// All phases together.
    pub fn total(&self) -> Duration {
        self.map + self.restore + self.connect + self.first_reply
    }
}

impl std::fmt::Debug for KvmSandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmSandbox")
            .field("id", &self.id)
            .field("state", &self.lifecycle.state())
            .finish_non_exhaustive()
    }
}

fn new_id() -> String {
    format!("kvm-{}", SnapshotId::generate())
}

fn runtime(op: &'static str) -> impl FnOnce(crate::machine::MachineError) -> Error {
    move |e| Error::runtime(op, e)
}

impl KvmSandbox {
    fn handle(
        store: Arc<LocalStore>,
        id: String,
        spec: SandboxSpec,
        grants: Grants,
        opts: KvmOptions,
    ) -> KvmSandbox {
        KvmSandbox {
            store,
            id,
            spec,
            grants,
            lifecycle: Lifecycle::new(),
            machine: None,
            agent: None,
            parent: None,
            unsaved: snapshot::Unsaved::default(),
            opts,
            calls: Arc::default(),
            reseed: false,
            ports: ports::Forwarder::new(),
            terminals: terminal::Attachments::default(),
            used: MachineUsage::default(),
            resume_timings: None,
        }
    }

    /// Where the time of this handle's last resume (or the resume of its image's base snapshot
    /// that `create` made) went, phase by phase; `None` before any. See [`ResumeTimings`].
    pub fn resume_timings(&self) -> Option<ResumeTimings> {
        self.resume_timings
    }

    /// The guest's serial console output so far (kernel log, agent messages).
    pub fn console(&self) -> String {
        self.machine
            .as_ref()
            .map(|m| m.console().text())
            .unwrap_or_default()
    }

    /// The spec the sandbox was created from, or its snapshot's after a resume, with the
    /// mounts attached now (slot order; a detached mount point has an empty `host`).
    pub fn spec(&self) -> &SandboxSpec {
        &self.spec
    }

    pub fn last_snapshot(&self) -> Option<&SnapshotId> {
        self.lifecycle.last_good()
    }

    /// The host access this sandbox holds (see [`Sandbox::grants`]).
    pub fn grants(&self) -> &Grants {
        &self.grants
    }

    fn release(&mut self) {
        self.ports.detach();
        self.terminals.end_all();
        self.agent = None;
        *self.calls.waker.lock() = None;
        if let Some(m) = self.machine.take() {
            let _ = self.shut_down(m);
        }
    }

    /// Shuts `m` down for good, adding what it used to the handle's counters; returns why
    /// it had stopped if it had crashed.
    fn shut_down(&mut self, m: Machine) -> Option<crate::machine::MachineError> {
        let (crashed, used) = m.shutdown();
        self.used.cpu_time += used.cpu_time;
        self.used.disk_bytes_written += used.disk_bytes_written;
        crashed
    }
}

fn require_kvm() -> Result<()> {
    match crate::detect() {
        HostKvm::Unavailable => Err(Error::RuntimeMissing {
            what: "/dev/kvm",
            hint: "the KVM tier needs a Linux host with KVM enabled and read/write access to \
                   /dev/kvm (add the user to the kvm group); the WASI tier works without it"
                .into(),
        }),
        _ => Ok(()),
    }
}

impl Sandbox for KvmSandbox {
    fn id(&self) -> &str {
        &self.id
    }

    fn tier(&self) -> Tier {
        Tier::Kvm
    }

    fn state(&self) -> State {
        self.lifecycle.state()
    }

    /// Runs `code` in the guest's persistent Python interpreter (`python3`, started by the
    /// first call, one per sandbox): its variables live in the guest, so they survive
    /// checkpoint, standby and resume (in another process too), and every fork has its own.
    /// The cell's output is what the interpreter and its children write to stdout and stderr
    /// (`print`, `os.system`, subprocesses), at most the spec's `output_limit` per stream
    /// (and at most 8 MiB here; more: [`Error::OutputLimit`], the cell having run on).
    ///
    /// At the timeout the cell is interrupted (`KeyboardInterrupt`) and the call fails with
    /// [`Error::Deadline`]; the session keeps its variables, unless the cell did not stop
    /// within 3 s, when the interpreter is killed and the next call starts a fresh one. An
    /// interpreter that ends during a cell (`os._exit`, killed) gives an [`Execution`] whose
    /// `error` is `SessionLost` with the reason; the next call starts a fresh one. The
    /// interrupter stops a cell the same way ([`Error::Interrupted`]). The sandbox stays
    /// running in each case. An image without `python3` (the default `"minimal"`):
    /// [`Error::Unsupported`], naming the `"coding"` image.
    fn run_code(&mut self, code: &str) -> Result<Execution> {
        self.run_cell(code, None)
    }

    /// [`Sandbox::run_code`] with `timeout` as the cell's deadline (`None`: the spec's
    /// `call_timeout`).
    fn run_code_with_timeout(
        &mut self,
        code: &str,
        timeout: Option<Duration>,
    ) -> Result<Execution> {
        self.run_cell(code, timeout)
    }

    fn exec(&mut self, cmd: &Command) -> Result<ExecOutput> {
        // `exec_streaming` enforces the output limit.
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let code = self.exec_streaming(cmd, &mut |d| stdout.extend_from_slice(d), &mut |d| {
            stderr.extend_from_slice(d)
        })?;
        Ok(ExecOutput {
            stdout,
            stderr,
            exit_code: code,
        })
    }

    fn read_file(&mut self, path: &str) -> Result<Vec<u8>> {
        let p = check_path(path)?;
        let r = self.agent(Operation::Files)?.read_file(p);
        r.map_err(|e| self.failed(e, self.opts.request_timeout, "read", path))
    }

    fn write_file(&mut self, path: &str, data: &[u8]) -> Result<()> {
        let p = check_path(path)?;
        self.check_writable(p)?;
        let r = self
            .agent(Operation::Files)?
            .write_file(p, data, None, false);
        r.map_err(|e| self.failed(e, self.opts.request_timeout, "write", path))
    }

    fn list_dir(&mut self, path: &str) -> Result<Vec<DirEntry>> {
        let p = check_path(path)?;
        let r = self.agent(Operation::Files)?.list(p);
        let entries = r.map_err(|e| self.failed(e, self.opts.request_timeout, "list", path))?;
        Ok(entries
            .into_iter()
            .map(|e| DirEntry {
                name: e.name,
                is_dir: e.is_dir,
                size: e.size,
            })
            .collect())
    }

    fn remove(&mut self, path: &str) -> Result<()> {
        let p = check_path(path)?;
        self.check_writable(p)?;
        let r = self.agent(Operation::Files)?.remove(p, true);
        r.map_err(|e| self.failed(e, self.opts.request_timeout, "remove", path))
    }

    fn exists(&mut self, path: &str) -> Result<bool> {
        let p = check_path(path)?;
        let r = self.agent(Operation::Files)?.exists(p);
        r.map_err(|e| self.failed(e, self.opts.request_timeout, "stat", path))
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
        self.lifecycle.check(Operation::Resume)?;
        self.calls.begin();
        let manifest = self.store.manifest(id)?;
        let mounts = grants.resolve(id, &manifest.spec.mounts)?;
        // The snapshot's policy from the first instruction the guest runs.
        self.load(id, &mounts, &manifest.spec.network)?;
        self.id = manifest.sandbox_id;
        self.spec = manifest.spec;
        self.spec.mounts = mounts;
        self.sync_ports();
        self.grants = grants.clone();
        self.lifecycle.complete(Operation::Resume)
    }

    fn fork(&mut self, n: usize) -> Result<Vec<KvmSandbox>> {
        lifecycle::fork(self, n)
    }

    fn fork_boxed(&mut self, n: usize) -> Result<Vec<Box<dyn Sandbox>>> {
        self.fork(n).map(dormant_core::sandbox::boxed)
    }

    /// CPU time of the vCPU threads, guest RAM resident in this process (pages the guest
    /// touched since boot or resume; zero without a machine: in standby, after kill) out of
    /// the RAM size, and the bytes written through the block device.
    fn metrics(&mut self) -> Result<Metrics> {
        let (now, resident, ram) = match &self.machine {
            Some(m) => (
                m.usage(),
                m.resident_bytes()
                    .map_err(|e| Error::runtime("read the guest RAM's resident size", e))?,
                m.mem_size() as u64,
            ),
            None => (MachineUsage::default(), 0, self.spec.memory_limit),
        };
        Ok(Metrics {
            cpu_time: self.used.cpu_time + now.cpu_time,
            memory_bytes: resident.min(ram),
            memory_limit_bytes: ram,
            disk_bytes_written: self.used.disk_bytes_written + now.disk_bytes_written,
        })
    }

    fn kill(&mut self) -> Result<()> {
        let r = lifecycle::kill(self);
        // With wake hooks the listeners outlive a release: not a kill.
        self.ports.close_all();
        r
    }

    fn interrupter(&self) -> Option<Arc<dyn dormant_core::Interrupt>> {
        Some(Arc::new(KvmSandbox::interrupter(self)))
    }

    fn processes(&mut self) -> Result<&mut dyn Processes> {
        Ok(self)
    }

    /// The egress policy (see `egress`: [`Egress`] for this sandbox).
    fn egress(&mut self) -> Result<&mut dyn Egress> {
        Ok(self)
    }

    fn streaming(&mut self) -> Option<&mut dyn StreamingExec> {
        Some(self)
    }

    fn ports(&mut self) -> Result<&mut dyn Ports> {
        Ok(self)
    }

    /// Programs on pseudo-terminals in the guest (see `terminal.rs`).
    fn terminals(&mut self) -> Result<&mut dyn Terminals> {
        Ok(self)
    }
}

/// Guest TCP ports on the host's loopback, carried over vsock (see `ports.rs` for the
/// forwarding, its bounds and what standby does to it). The exposed ports are part of the
/// sandbox's description (`spec.ports`, kept by every checkpoint): a resume exposes them
/// again, on the same host ports when they are free, else on new ones ([`Ports::exposed`]
/// says which); the children of a fork expose nothing. Open connections end (end of file or a
/// reset for the host's client) when the machine goes away: standby, kill, a resume.
impl Ports for KvmSandbox {
    /// See [`Ports::expose`]. Errors also: the sandbox is not running
    /// ([`Error::IllegalTransition`]); more than [`MAX_EXPOSED_PORTS`] ports
    /// ([`Error::InvalidArgument`]); an exposed port asked for on another host port
    /// ([`Error::InvalidArgument`]: unexpose it first).
    fn expose(&mut self, guest_port: u16, host_port: u16) -> Result<std::net::SocketAddr> {
        self.lifecycle.check(Operation::Ports)?;
        let port = self.ports.listen(guest_port, host_port)?;
        let mapping = PortMapping {
            guest_port,
            host_port: port,
        };
        match self
            .spec
            .ports
            .iter_mut()
            .find(|m| m.guest_port == guest_port)
        {
            Some(m) => *m = mapping,
            None => self.spec.ports.push(mapping),
        }
        Ok(mapping.host_addr())
    }

    fn unexpose(&mut self, guest_port: u16) -> Result<()> {
        self.lifecycle.check(Operation::Ports)?;
        self.ports.close(guest_port);
        self.spec.ports.retain(|m| m.guest_port != guest_port);
        Ok(())
    }

    /// The exposed ports by guest port, from the sandbox's description: in standby without
    /// wake hooks their listeners are closed, and the next resume opens them (on these host
    /// ports when free).
    fn exposed(&self) -> Vec<PortMapping> {
        let mut v = self.spec.ports.clone();
        v.sort_by_key(|m| m.guest_port);
        v
    }

    fn set_wake(&mut self, wake: Option<Arc<dyn PortWake>>) {
        let none = wake.is_none();
        self.ports.set_wake(wake);
        if none && self.machine.is_none() {
            // Asleep without hooks: nothing may keep listening.
            self.ports.detach();
        }
    }

    fn open_connections(&self) -> usize {
        self.ports.open_connections()
    }
}

impl KvmSandbox {
    /// Makes the listeners match `spec.ports` after a resume or a create: closes those of
    /// ports the spec does not have, opens the missing ones on their recorded host port when
    /// it is free (else on a free one) and records the ports they got. A port that cannot be
    /// listened on at all (over the cap, no free port) is dropped from the spec, with a
    /// warning.
    fn sync_ports(&mut self) {
        for m in self.ports.mappings() {
            if !self.spec.ports.iter().any(|p| p.guest_port == m.guest_port) {
                self.ports.close(m.guest_port);
            }
        }
        let mut kept: Vec<PortMapping> = Vec::with_capacity(self.spec.ports.len());
        for m in std::mem::take(&mut self.spec.ports) {
            if kept.iter().any(|k| k.guest_port == m.guest_port) {
                continue;
            }
            let port = match self.ports.host_port(m.guest_port) {
                Some(p) => Ok(p),
                None => self
                    .ports
                    .listen(m.guest_port, m.host_port)
                    .or_else(|_| self.ports.listen(m.guest_port, 0)),
            };
            match port {
                Ok(host_port) => kept.push(PortMapping {
                    guest_port: m.guest_port,
                    host_port,
                }),
                Err(e) => tracing::warn!(
                    sandbox = %self.id,
                    guest_port = m.guest_port,
                    error = %e,
                    "an exposed port could not be listened on again; it is no longer exposed"
                ),
            }
        }
        self.spec.ports = kept;
    }
}

/// The steps the contract's standby, kill and fork are made of ([`lifecycle`]).
impl lifecycle::Steps for KvmSandbox {
    fn lifecycle(&mut self) -> &mut Lifecycle {
        &mut self.lifecycle
    }

    fn write_checkpoint(&mut self) -> Result<SnapshotId> {
        self.do_checkpoint()
    }

    fn release(&mut self) {
        KvmSandbox::release(self);
    }

    fn children(&mut self, base: &SnapshotId, n: usize) -> Result<Vec<KvmSandbox>> {
        KvmSandbox::children(&self.store, base, &self.grants, &self.opts, n)
    }
}

impl Drop for KvmSandbox {
    fn drop(&mut self) {
        self.release();
    }
}
