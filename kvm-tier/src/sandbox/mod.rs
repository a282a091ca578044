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
//! deadline, for reads and for writes (a guest that never grants vsock credit): `exec` gets its
//! command's timeout plus [`EXEC_GRACE`] (the agent kills the command at the timeout and
//! reports), the other requests [`KvmOptions::request_timeout`] of silence at most (they move
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

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dormant_agent::client::{Client, ClientError};
use dormant_core::lifecycle::{Lifecycle, Operation, State};
use dormant_core::paths::DirEntry;
use dormant_core::snapshot::SnapshotId;
use dormant_core::snapshot::store::LocalStore;
use dormant_core::{
    Command, Error, ExecOutput, Execution, Grants, Mount, Result, Sandbox, SandboxSpec, Tier,
    Workload, grants,
};

use crate::HostKvm;
use crate::machine::{FS_IRQS, Machine, MachineConfig};
use crate::snapshot;
use crate::virtio::fs::VolumeAttach;
use crate::virtio::vsock::{Cancelled, VsockStream, VsockWaker};

/// The agent's vsock port.
pub const AGENT_PORT: u32 = dormant_agent::proto::DEFAULT_PORT;
/// Deepest chain of incremental snapshots before a checkpoint writes a full image again.
const MAX_DEPTH: u32 = 16;
/// How long past a command's timeout the host waits for the agent's report (the agent kills
/// the command's process group at the timeout, then drains its pipes for up to 2 s): `exec`'s
/// host-side deadline is the command's timeout plus this.
pub const EXEC_GRACE: Duration = Duration::from_secs(10);
/// `wait` asks the agent for at most this long at a time, so that each request has a
/// host-side deadline even when the caller waits for ever.
pub const WAIT_SLICE: Duration = Duration::from_secs(10);
/// A request's host-side deadline in all, in units of [`KvmOptions::request_timeout`] (its
/// bound on silence).
const REQUEST_CAP: u32 = 10;

/// The guest kernel and initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

impl GuestImage {
    /// The image `kvm-tier/guest/build.sh` built: `$DORMANT_GUEST_KERNEL` and
    /// `$DORMANT_GUEST_INITRAMFS` when set, else `<cache>/guest/current/`, the cache being
    /// [`default_dirs::cache_dir`](dormant_core::default_dirs::cache_dir) (`$DORMANT_CACHE` when
    /// set and not empty, as build.sh reads it, else `~/.cache/dormant`).
    pub fn locate() -> Result<GuestImage> {
        let current = dormant_core::default_dirs::cache_dir().join("guest/current");
        let pick = |var: &str, name: &str| {
            std::env::var_os(var)
                .map(PathBuf::from)
                .unwrap_or_else(|| current.join(name))
        };
        let image = GuestImage {
            kernel: pick("DORMANT_GUEST_KERNEL", "vmlinux"),
            initramfs: pick("DORMANT_GUEST_INITRAMFS", "initramfs.cpio"),
        };
        for p in [&image.kernel, &image.initramfs] {
            if !p.is_file() {
                return Err(Error::RuntimeMissing {
                    what: "the Linux guest image",
                    hint: format!(
                        "{} is missing; build it with kvm-tier/guest/build.sh (scripts/setup.sh \
                         runs it) or set DORMANT_GUEST_KERNEL / DORMANT_GUEST_INITRAMFS",
                        p.display()
                    ),
                });
            }
        }
        Ok(image)
    }

    /// A short hash identifying the image's contents (for base snapshots).
    fn fingerprint(&self) -> Result<String> {
        let mut h = blake3::Hasher::new();
        for p in [&self.kernel, &self.initramfs] {
            h.update_mmap(p).map_err(|e| Error::File {
                op: "hash",
                path: p.display().to_string(),
                source: e,
            })?;
        }
        Ok(h.finalize().to_hex()[..16].to_string())
    }
}

fn runtime(op: &'static str) -> impl FnOnce(crate::machine::MachineError) -> Error {
    move |e| Error::runtime(op, e)
}

/// Options of the KVM tier that are not part of the portable spec.
#[derive(Debug, Clone)]
pub struct KvmOptions {
    /// Copy the guest's serial console to stderr (also `DORMANT_GUEST_CONSOLE=1`).
    pub console_echo: bool,
    /// Longest wait for a booting guest's agent. Default: 180 s on PVM hosts, 30 s otherwise.
    pub boot_timeout: Duration,
    /// Longest wait for a resumed guest's agent, and for a new connection after a call was
    /// stopped (past it the sandbox is poisoned). Default: 30 s.
    pub connect_timeout: Duration,
    /// Host-side bound of every agent request but `exec` (files, `spawn`, `signal`,
    /// `output`, one slice of `wait`, mounts; each moves at most 16 MiB): the longest the
    /// guest may keep the request waiting without moving a byte either way, and ten times
    /// that in all (a guest that trickles bytes). Past it the call fails with
    /// [`Error::Deadline`]. Default: 120 s on PVM hosts (guest kernel code is emulated; a
    /// 16 MiB file took over 2 min on a busy 2-core host), 30 s otherwise.
    pub request_timeout: Duration,
    /// Size of the sandbox's disk (`/dev/vda`, an ext2 filesystem mounted at `/data`), a
    /// multiple of 4 KiB. Sparse: only written blocks cost memory and snapshot bytes.
    /// Default: 512 MiB.
    pub disk_size: usize,
}

impl Default for KvmOptions {
    fn default() -> Self {
        let slow = crate::detect().is_slow();
        KvmOptions {
            console_echo: std::env::var_os("DORMANT_GUEST_CONSOLE").is_some_and(|v| v == "1"),
            boot_timeout: Duration::from_secs(if slow { 180 } else { 30 }),
            connect_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(if slow { 120 } else { 30 }),
            disk_size: 512 << 20,
        }
    }
}

/// What stops a running call: shared by a sandbox and its [`KvmInterrupter`]s.
#[derive(Debug, Default)]
struct CallControl {
    /// Raised to stop the running call; every agent stream of the sandbox watches it.
    flag: Arc<AtomicBool>,
    /// Wakes the waits on the current machine's vsock device.
    waker: parking_lot::Mutex<Option<VsockWaker>>,
}

impl CallControl {
    /// A call starts: an interrupt requested before it does not stop it.
    fn begin(&self) {
        self.flag.store(false, Ordering::SeqCst);
    }
}

/// Stops a [`KvmSandbox`]'s running call from another thread (see [`KvmSandbox::interrupter`]).
#[derive(Debug, Clone)]
pub struct KvmInterrupter(Arc<CallControl>);

impl KvmInterrupter {
    /// Interrupts the call running now, if any: it fails with [`Error::Interrupted`] within
    /// moments. A call that starts later is not affected.
    pub fn interrupt(&self) {
        self.0.flag.store(true, Ordering::SeqCst);
        if let Some(w) = self.0.waker.lock().as_ref() {
            w.wake();
        }
    }
}

impl dormant_core::Interrupt for KvmInterrupter {
    fn interrupt(&self) {
        KvmInterrupter::interrupt(self);
    }
}

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

impl KvmSandbox {
    /// A new Linux sandbox (`spec.tier` must be [`Tier::Kvm`]); its guest RAM is
    /// `spec.memory_limit`.
    pub fn create(store: Arc<LocalStore>, spec: SandboxSpec) -> Result<KvmSandbox> {
        Self::create_with(store, spec, KvmOptions::default())
    }

    pub fn create_with(
        store: Arc<LocalStore>,
        spec: SandboxSpec,
        opts: KvmOptions,
    ) -> Result<KvmSandbox> {
        spec.validate()?;
        if spec.tier != Tier::Kvm || spec.workload != Workload::Linux {
            return Err(Error::InvalidSpec(
                "the KVM tier runs Linux workloads (SandboxSpec::linux())".into(),
            ));
        }
        if spec.mounts.len() > FS_IRQS.len() {
            return Err(Error::InvalidSpec(format!(
                "{} mounts: a Linux sandbox has at most {} volumes",
                spec.mounts.len(),
                FS_IRQS.len()
            )));
        }
        require_kvm()?;
        let image = GuestImage::locate()?;
        let base = Self::base_snapshot(&store, &image, &spec, &opts)?;
        let grants = Grants::of_spec(&spec);
        let mut merged = store.manifest(&base)?.spec;
        merged.env = spec.env;
        merged.call_timeout = spec.call_timeout;
        merged.output_limit = spec.output_limit;
        // The base snapshot has no mount points: the spec's volumes take the first slots and
        // are mounted in the guest now.
        merged.mounts = spec.mounts;
        let mounts = merged.mounts.clone();
        let mut sb = KvmSandbox::handle(store, new_id(), merged, grants, opts);
        sb.load(&base, &mounts)?;
        sb.mount_volumes()?;
        Ok(sb)
    }

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
        }
    }

    /// Refuses a files-API change under a read-only or detached volume (the guest's mount
    /// refuses it too, with `EROFS`; this names it `Error::ReadOnly` like the other tier).
    fn check_writable(&self, path: &str) -> Result<()> {
        let g = dormant_core::paths::GuestPath::parse(path)?;
        let g = g.as_str();
        for m in self
            .spec
            .mounts
            .iter()
            .filter(|m| m.read_only || m.is_detached())
        {
            let mp = dormant_core::paths::GuestPath::parse(&m.guest)?;
            let mp = mp.as_str();
            if g == mp || g.strip_prefix(mp).is_some_and(|r| r.starts_with('/')) {
                return Err(Error::ReadOnly { path: path.into() });
            }
        }
        Ok(())
    }

    /// Mounts every volume in the guest (slot `i` at `spec.mounts[i].guest`), in one round
    /// trip. A new sandbox does it once; the mounts are guest state that snapshots keep.
    fn mount_volumes(&mut self) -> Result<()> {
        use dormant_agent::proto::Request;
        if self.spec.mounts.is_empty() {
            return Ok(());
        }
        let requests: Vec<(Request, &[u8])> = self
            .spec
            .mounts
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let r = Request::Mount {
                    source: crate::virtio::fs::tag(i),
                    target: m.guest.clone(),
                    fstype: "virtiofs".into(),
                    read_only: m.read_only,
                };
                (r, &[][..])
            })
            .collect();
        let mounts = self.spec.mounts.clone();
        let answers = self
            .live_agent()?
            .pipeline(&requests)
            .map_err(|e| agent_error("mount a volume", "", e))?;
        for (a, m) in answers.into_iter().zip(&mounts) {
            a.map_err(|e| agent_error("mount a volume", &m.guest, e))?;
        }
        Ok(())
    }

    /// Boots the image once per (image, RAM size) and keeps the booted guest as a snapshot.
    fn base_snapshot(
        store: &Arc<LocalStore>,
        image: &GuestImage,
        spec: &SandboxSpec,
        opts: &KvmOptions,
    ) -> Result<SnapshotId> {
        // The command line is part of what was booted (a base booted with another one, e.g.
        // before a workaround was added to it, is not this base).
        let cmdline = crate::boot::base_cmdline(crate::detect().is_slow());
        let key = format!(
            "kvm-{}-{}m-{}d-{}v-{}",
            image.fingerprint()?,
            spec.memory_limit >> 20,
            opts.disk_size >> 20,
            FS_IRQS.len(),
            &blake3::hash(cmdline.as_bytes()).to_hex()[..8]
        );
        let dir = store.root().join("bases");
        let record = dir.join(&key);
        let _lock = {
            std::fs::create_dir_all(&dir).map_err(|e| Error::store("create", &dir, e))?;
            dormant_core::fsutil::FileLock::acquire(&dir.join(format!("{key}.lock")), true)
        }
        .map_err(|e| Error::store("lock", &dir, e))?;
        if let Ok(text) = std::fs::read_to_string(&record)
            && let Ok(id) = text.trim().parse::<SnapshotId>()
            && store.manifest(&id).is_ok()
        {
            return Ok(id);
        }
        let mut base_spec = spec.clone();
        base_spec.mounts.clear();
        let mut booted = Self::boot(store.clone(), image, base_spec, opts.clone())?;
        let id = booted.checkpoint()?;
        booted.release();
        dormant_core::fsutil::write_atomic(&record, id.to_string().as_bytes())
            .map_err(|e| Error::store("record base snapshot", &record, e))?;
        Ok(id)
    }

    /// Boots the guest image in a fresh VM (with every volume slot, `spec.mounts` attached and
    /// mounted) and waits for its agent.
    pub fn boot(
        store: Arc<LocalStore>,
        image: &GuestImage,
        spec: SandboxSpec,
        opts: KvmOptions,
    ) -> Result<KvmSandbox> {
        require_kvm()?;
        let mem_size = usize::try_from(spec.memory_limit)
            .map_err(|_| Error::InvalidSpec("memory_limit does not fit this host".into()))?;
        let cfg = MachineConfig {
            kernel: image.kernel.clone(),
            initramfs: Some(image.initramfs.clone()),
            mem_size,
            cmdline: crate::boot::base_cmdline(crate::detect().is_slow()),
            console_echo: opts.console_echo,
            disk_image: Some(format_disk(&store, opts.disk_size)?),
            volume_slots: FS_IRQS.len(),
            volumes: volumes(&store, &spec.mounts)?,
        };
        let booted = Machine::boot(&cfg).map_err(runtime("boot the guest"));
        if let Some(p) = &cfg.disk_image {
            // The VM maps it; the name is no longer needed.
            let _ = std::fs::remove_file(p);
        }
        let machine = booted?;
        let grants = Grants::of_spec(&spec);
        let mut sb = KvmSandbox::handle(store, new_id(), spec, grants, opts);
        sb.machine = Some(machine);
        sb.connect(sb.opts.boot_timeout)?;
        sb.mount_volumes()?;
        Ok(sb)
    }

    /// Resumes a snapshot as a new handle (the sandbox keeps the snapshot's id), granting it
    /// no host access: for a snapshot with mount points use
    /// [`from_snapshot_granted`](Self::from_snapshot_granted).
    pub fn from_snapshot(store: Arc<LocalStore>, id: &SnapshotId) -> Result<KvmSandbox> {
        Self::from_snapshot_with(store, id, KvmOptions::default())
    }

    /// [`from_snapshot`](Self::from_snapshot) with options.
    pub fn from_snapshot_with(
        store: Arc<LocalStore>,
        id: &SnapshotId,
        opts: KvmOptions,
    ) -> Result<KvmSandbox> {
        Self::from_snapshot_granted(store, id, &Grants::new(), opts)
    }

    /// Resumes a snapshot as a new handle with `grants` as its host access: the host
    /// directories for the snapshot's mount points (its volume slots). Nothing in the snapshot
    /// grants host access; grants that do not fit it are
    /// [`Error::Grant`](dormant_core::Error::Grant) (see [`Grants`]).
    pub fn from_snapshot_granted(
        store: Arc<LocalStore>,
        id: &SnapshotId,
        grants: &Grants,
        opts: KvmOptions,
    ) -> Result<KvmSandbox> {
        require_kvm()?;
        let manifest = store.manifest(id)?;
        let mounts = grants.resolve(id, &manifest.spec.mounts)?;
        let mut spec = manifest.spec;
        spec.mounts = mounts.clone();
        let mut sb = KvmSandbox::handle(store, manifest.sandbox_id, spec, grants.clone(), opts);
        sb.load(id, &mounts)?;
        Ok(sb)
    }

    /// The host access this sandbox holds (see [`Sandbox::grants`]).
    pub fn grants(&self) -> &Grants {
        &self.grants
    }

    /// Restores snapshot `id` into a new VM, `mounts` attached to its volume slots in order.
    fn load(&mut self, id: &SnapshotId, mounts: &[Mount]) -> Result<()> {
        let snapshot::Loaded { vm, devices, disk } = snapshot::load_machine(&self.store, id)?;
        let devices = devices.ok_or_else(|| {
            Error::snapshot(
                id,
                dormant_core::SnapshotError::Incompatible(
                    "a bare VM snapshot without devices, not a Linux sandbox".into(),
                ),
            )
        })?;
        let volumes = volumes(&self.store, mounts)?;
        let machine = Machine::restore(vm, &devices, disk, self.opts.console_echo, &volumes)
            .map_err(runtime("restore the guest's devices"))?;
        self.release();
        self.machine = Some(machine);
        self.parent = Some(id.clone());
        // A fresh VM: its dirty log and the devices' bitmaps start empty on `id`.
        self.unsaved.clear();
        self.lifecycle.set_last_good(id.clone());
        // The agent connection of the checkpoint, idle then, continues as it was; without one
        // (or after a crash of the host side) connect anew.
        let host = self.machine.as_ref().map(Machine::vsock);
        if let Some(stream) = host.as_ref().and_then(|h| h.adopt(AGENT_PORT)) {
            self.agent = Some(Client::new(stream));
        }
        if let Some(h) = &host {
            h.reset_unadopted();
        }
        if self.agent.is_none() {
            self.connect(self.opts.connect_timeout)?;
        }
        self.refresh_guest()?;
        Ok(())
    }

    /// After a resume, in one round trip: mixes host entropy into the guest's pool (forks and
    /// repeated resumes must not share random streams) and sets its wall clock (it stood still
    /// while the guest slept; the monotonic clock simply continues).
    fn refresh_guest(&mut self) -> Result<()> {
        use dormant_agent::proto::Request;
        let seed: [u8; 64] = rand::random();
        let unix_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let answers = self
            .live_agent()?
            .pipeline(&[
                (
                    Request::WriteFile {
                        path: "/dev/urandom".into(),
                        mode: None,
                        append: true,
                    },
                    &seed,
                ),
                (Request::SetTime { unix_ns }, &[]),
            ])
            .map_err(|e| agent_error("refresh the resumed guest", "/dev/urandom", e))?;
        for (i, a) in answers.into_iter().enumerate() {
            match a {
                Ok(_) => {}
                // An agent from before set_time: its clock stays as it was.
                Err(ClientError::Agent { kind, .. }) if i == 1 && kind == "unsupported" => {}
                Err(e) => {
                    let what = if i == 0 {
                        "/dev/urandom"
                    } else {
                        "CLOCK_REALTIME"
                    };
                    return Err(agent_error("refresh the resumed guest", what, e));
                }
            }
        }
        Ok(())
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

    /// Opens the agent connection, retrying until the guest's agent listens or `timeout`
    /// (the interrupter stops it too: `Error::Interrupted`).
    fn connect(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let machine = self.machine.as_ref().ok_or(Error::IllegalTransition {
            op: Operation::Exec,
            state: State::Standby,
        })?;
        let host = machine.vsock();
        *self.calls.waker.lock() = Some(host.waker());
        let flag = self.calls.flag.clone();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = host
                .connect_with(AGENT_PORT, left.min(Duration::from_secs(5)), Some(&flag))
                .map_err(ClientError::Io)
                .and_then(|mut s| {
                    s.set_cancel(Some(flag.clone()));
                    // The handshake waits no longer than the connection may take.
                    s.set_deadline(Some(deadline));
                    let mut c = Client::new(s);
                    c.hello().map(|_| c)
                });
            match attempt {
                Ok(mut c) => {
                    c.get_mut().set_deadline(None);
                    self.agent = Some(c);
                    return Ok(());
                }
                Err(ClientError::Io(e)) if Cancelled::is_cause_of(&e) => {
                    return Err(Error::Interrupted {
                        last_good: self.lifecycle.last_good().cloned(),
                    });
                }
                Err(e) => {
                    if !machine.is_running() {
                        let t = machine.console().text();
                        let tail: Vec<&str> = t.lines().rev().take(10).collect();
                        let tail: Vec<&str> = tail.into_iter().rev().collect();
                        return Err(Error::runtime(
                            "start the guest",
                            format!(
                                "the VM stopped before its agent answered; console:\n{}",
                                tail.join("\n")
                            ),
                        ));
                    }
                    if Instant::now() >= deadline {
                        return Err(Error::runtime_at(
                            "reach the guest agent",
                            format!("no answer on vsock port {AGENT_PORT} in {timeout:?}"),
                            e,
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// The agent client for a call `op` that starts now, reconnecting if the previous
    /// connection broke; its requests have the default deadline (see [`Self::live_agent`]).
    fn agent(&mut self, op: Operation) -> Result<&mut Client<VsockStream>> {
        self.lifecycle.check(op)?;
        self.check_memory()?;
        self.calls.begin();
        self.live_agent()
    }

    /// Poisons the sandbox if a page of its RAM or disk could not be read from the snapshot
    /// files (see `dormant_core::memguard`): its memory no longer matches any snapshot.
    fn check_memory(&mut self) -> Result<()> {
        let Some(addr) = self.machine.as_ref().and_then(Machine::memory_fault) else {
            return Ok(());
        };
        let err = Error::Trap {
            message: dormant_core::memguard::GuardedMemory::fault_message(addr),
            last_good: self.lifecycle.last_good().cloned(),
        };
        self.release();
        self.lifecycle.poison(err.to_string());
        Err(err)
    }

    /// The agent client of a live machine, whatever the lifecycle says (resume uses it before
    /// the sandbox counts as running), with the host-side bounds of a request (see
    /// [`KvmOptions::request_timeout`]) and the interrupter attached.
    ///
    /// When the previous connection broke it connects anew; if the agent does not accept within
    /// the connect timeout, a running sandbox is poisoned ([`Error::Poisoned`]).
    fn live_agent(&mut self) -> Result<&mut Client<VsockStream>> {
        let machine = self.machine.as_ref().ok_or(Error::IllegalTransition {
            op: Operation::Exec,
            state: State::Standby,
        })?;
        *self.calls.waker.lock() = Some(machine.vsock().waker());
        if self.agent.as_ref().is_none_or(|c| c.is_broken()) {
            if let Some(old) = self.agent.take() {
                old.into_inner().abort();
            }
            match self.connect(self.opts.connect_timeout) {
                Ok(()) => {}
                Err(e @ Error::Interrupted { .. }) => return Err(e),
                Err(e) if self.lifecycle.state() == State::Running => {
                    let reason = format!("the guest agent stopped answering ({e})");
                    self.lifecycle.poison(reason.clone());
                    return Err(Error::Poisoned {
                        reason,
                        last_good: self.lifecycle.last_good().cloned(),
                    });
                }
                Err(e) => return Err(e),
            }
        }
        let silence = self.opts.request_timeout;
        let deadline = Instant::now().checked_add(silence.saturating_mul(REQUEST_CAP));
        let flag = self.calls.flag.clone();
        let client = self
            .agent
            .as_mut()
            .ok_or_else(|| Error::runtime("reach the guest agent", "no connection"))?;
        let stream = client.get_mut();
        stream.set_cancel(Some(flag));
        stream.set_read_timeout(Some(silence));
        stream.set_write_timeout(Some(silence));
        stream.set_deadline(deadline);
        Ok(client)
    }

    /// The error of a failed agent request (`op` on `path`): [`Error::Interrupted`] when the
    /// interrupter stopped it, [`Error::Deadline`] (with `limit`) when the host-side deadline
    /// passed, else the agent's error. A connection left mid-response is reset, so that the
    /// agent stops the work it did for it; the next call connects anew.
    fn failed(&mut self, e: ClientError, limit: Duration, op: &'static str, path: &str) -> Error {
        let last_good = self.lifecycle.last_good().cloned();
        let stopped = match &e {
            ClientError::Io(io) if Cancelled::is_cause_of(io) => {
                Some(Error::Interrupted { last_good })
            }
            ClientError::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => {
                Some(Error::Deadline { limit, last_good })
            }
            _ => None,
        };
        if self.agent.as_ref().is_some_and(|c| c.is_broken())
            && let Some(c) = self.agent.take()
        {
            c.into_inner().abort();
        }
        // A guest that can no longer run (or whose memory faulted) explains the failure better
        // than the broken connection, and poisons the sandbox now rather than at its next call.
        if let Err(gone) = self.check_memory() {
            return gone;
        }
        if self.machine.as_ref().is_some_and(|m| !m.is_running()) {
            let why = self
                .machine
                .take()
                .and_then(Machine::shutdown)
                .map_or_else(|| "the guest stopped".to_string(), |e| e.to_string());
            self.release();
            self.lifecycle.poison(why.clone());
            return Error::Trap {
                message: why,
                last_good: self.lifecycle.last_good().cloned(),
            };
        }
        stopped.unwrap_or_else(|| agent_error(op, path, e))
    }

    /// A handle that stops this sandbox's running call from another thread: a call that
    /// talks to the guest agent (`exec`, `spawn`, `wait`, files, connecting during a resume)
    /// fails with [`Error::Interrupted`] within moments, the command an `exec` ran is killed
    /// in the guest, and the sandbox stays running (see the module docs). A checkpoint's own
    /// work is not interrupted. Valid across resumes of this handle.
    pub fn interrupter(&self) -> KvmInterrupter {
        KvmInterrupter(self.calls.clone())
    }

    fn release(&mut self) {
        self.agent = None;
        *self.calls.waker.lock() = None;
        if let Some(m) = self.machine.take() {
            let _ = m.shutdown();
        }
    }

    /// Checkpoints the live machine. Failure-atomic: whatever step fails (capturing the state,
    /// a full store, an I/O error, a parent snapshot deleted meanwhile), the guest runs on with
    /// its state intact and what it wrote since the last committed snapshot stays in
    /// `self.unsaved`, so the next checkpoint that succeeds is complete. Only a guest that has
    /// crashed (nothing left to run) poisons the sandbox.
    fn do_checkpoint(&mut self) -> Result<SnapshotId> {
        self.lifecycle.check(Operation::Checkpoint)?;
        self.check_memory()?;
        // The agent connection is idle between calls: it is part of the snapshot and a resume
        // adopts it (a broken one is dropped first so that it is not).
        if self.agent.as_ref().is_some_and(|c| c.is_broken()) {
            self.agent = None;
        }
        let machine = self.machine.as_mut().ok_or(Error::IllegalTransition {
            op: Operation::Checkpoint,
            state: State::Standby,
        })?;
        let quiesced = machine.quiesce();
        let running = machine.is_running();
        let (vm, state, devices) = match quiesced {
            Ok(q) => q,
            Err(e) => {
                if running {
                    // Only capturing the state failed; the guest was let go again.
                    return Err(Error::runtime("capture the guest's state", e));
                }
                let msg = e.to_string();
                self.lifecycle.poison(msg.clone());
                return Err(Error::Trap {
                    message: msg,
                    last_good: self.lifecycle.last_good().cloned(),
                });
            }
        };
        // From here on the VM is out of its thread: nothing may return before it is given back.
        self.unsaved
            .collect(&vm, self.machine.as_ref().and_then(Machine::disk));
        let saved = self.save_quiesced(&vm, &state, &devices);
        let resumed = match self.machine.as_mut() {
            Some(m) => m.unquiesce(vm),
            None => Err(crate::machine::MachineError::GuestStopped {
                reason: "the machine vanished during a checkpoint".into(),
            }),
        };
        if let Err(e) = resumed {
            let msg = e.to_string();
            self.lifecycle.poison(msg.clone());
            return Err(Error::Trap {
                message: msg,
                last_good: self.lifecycle.last_good().cloned(),
            });
        }
        self.check_memory()?;
        let id = saved?;
        self.unsaved.clear();
        self.parent = Some(id.clone());
        self.lifecycle.set_last_good(id.clone());
        self.lifecycle.complete(Operation::Checkpoint)?;
        Ok(id)
    }

    /// Writes the snapshot of a quiesced machine: a delta on `self.parent` when that snapshot
    /// is still in the store and its chain is short enough, else full images.
    fn save_quiesced(
        &self,
        vm: &crate::vm::MicroVm,
        state: &crate::vm::VmState,
        devices: &crate::machine::DevicesState,
    ) -> Result<SnapshotId> {
        let parent = match &self.parent {
            Some(p) => match self.store.manifest(p) {
                Ok(m) if m.memory.depth < MAX_DEPTH => Some(m),
                Ok(_) => None,
                // Deleted (or damaged) under the running sandbox: start a new chain.
                Err(Error::SnapshotNotFound(_) | Error::Snapshot { .. }) => None,
                Err(e) => return Err(e),
            },
            None => None,
        };
        let disk = self.machine.as_ref().and_then(Machine::disk);
        snapshot::save_machine(
            &self.store,
            vm,
            state,
            Some(devices),
            disk,
            parent.as_ref(),
            &self.unsaved,
            &self.id,
            &self.spec,
        )
    }

    /// Starts a background process; returns its guest pid.
    pub fn spawn(&mut self, cmd: &Command) -> Result<u32> {
        let argv: Vec<&str> = cmd.argv.iter().map(String::as_str).collect();
        if argv.is_empty() {
            return Err(Error::InvalidArgument(
                "spawn needs a non-empty argv".into(),
            ));
        }
        let env = self.env_for(cmd);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let r = self
            .agent(Operation::Exec)?
            .spawn(&argv, &env, cmd.cwd.as_deref());
        r.map_err(|e| self.failed(e, self.opts.request_timeout, "spawn", &cmd.argv[0]))
    }

    /// Waits up to `timeout` (`None`: as long as it takes) for a background process: its exit
    /// code (128 + signal when killed), or `None` while it runs. The agent is asked in slices
    /// of at most [`WAIT_SLICE`], each under its own host-side deadline; the interrupter stops
    /// the wait.
    pub fn wait(&mut self, pid: u32, timeout: Option<Duration>) -> Result<Option<i32>> {
        let end = timeout.map(|t| Instant::now() + t);
        let what = pid.to_string();
        // One call however many slices: an interrupt between two slices stops the next.
        self.lifecycle.check(Operation::Exec)?;
        self.check_memory()?;
        self.calls.begin();
        loop {
            let slice = end.map_or(WAIT_SLICE, |e| {
                e.saturating_duration_since(Instant::now()).min(WAIT_SLICE)
            });
            let bound = slice + self.opts.request_timeout;
            let client = self.live_agent()?;
            client.get_mut().set_read_timeout(Some(bound));
            let r = client.wait(pid, Some(slice));
            match r.map_err(|e| self.failed(e, bound, "wait for", &what))? {
                Some(s) => return Ok(Some(exit_code(s.code, s.signal))),
                None if end.is_some_and(|e| Instant::now() >= e) => return Ok(None),
                None => {}
            }
        }
    }

    /// Sends `signal` to a background process's group.
    pub fn signal(&mut self, pid: u32, signal: i32) -> Result<()> {
        let r = self.agent(Operation::Exec)?.signal(pid, signal);
        r.map_err(|e| self.failed(e, self.opts.request_timeout, "signal", &pid.to_string()))
    }

    /// Takes a background process's output since the previous call: (stdout, stderr, running).
    pub fn output(&mut self, pid: u32) -> Result<(Vec<u8>, Vec<u8>, bool)> {
        let r = self.agent(Operation::Exec)?.output(pid);
        let o = r.map_err(|e| {
            self.failed(
                e,
                self.opts.request_timeout,
                "read output of",
                &pid.to_string(),
            )
        })?;
        Ok((o.stdout, o.stderr, o.running))
    }

    /// Runs `cmd` with streamed output: chunks go to `on_stdout` / `on_stderr` as they come.
    ///
    /// Bounded on every side: the agent kills the command at its timeout (`cmd.timeout`, else
    /// the spec's `call_timeout`: [`Error::Deadline`]); the host gives up [`EXEC_GRACE`] later
    /// if the agent has not reported (plus the bound of a request to send a non-empty stdin,
    /// whose transfer may not stall for longer than [`KvmOptions::request_timeout`]); at most
    /// the spec's `output_limit` bytes per stream are delivered, past it the command is killed
    /// and the call fails with [`Error::OutputLimit`]; the interrupter stops it
    /// ([`Error::Interrupted`], the command killed). The sandbox stays running in each case.
    pub fn exec_streaming(
        &mut self,
        cmd: &Command,
        on_stdout: &mut dyn FnMut(&[u8]),
        on_stderr: &mut dyn FnMut(&[u8]),
    ) -> Result<i32> {
        let argv: Vec<&str> = cmd.argv.iter().map(String::as_str).collect();
        if argv.is_empty() {
            return Err(Error::InvalidArgument("exec needs a non-empty argv".into()));
        }
        let env = self.env_for(cmd);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let limit = cmd.timeout.unwrap_or(self.spec.call_timeout);
        let mut bound = limit.saturating_add(EXEC_GRACE);
        if !cmd.stdin.is_empty() {
            bound = bound.saturating_add(self.opts.request_timeout.saturating_mul(REQUEST_CAP));
        }
        let output_limit = self.spec.output_limit;
        // Past the output limit, the stream is stopped through the call's cancel flag: the
        // next read fails and the connection is reset, which kills the command.
        let stop = self.calls.flag.clone();
        let over: std::cell::Cell<Option<&'static str>> = std::cell::Cell::new(None);
        let (mut out_len, mut err_len) = (0usize, 0usize);
        let capped = |stream: &'static str, len: &mut usize, d: &[u8], f: &mut dyn FnMut(&[u8])| {
            if over.get().is_some() {
                return;
            }
            if len.saturating_add(d.len()) > output_limit {
                over.set(Some(stream));
                stop.store(true, Ordering::SeqCst);
            } else {
                *len += d.len();
                f(d);
            }
        };
        let client = self.agent(Operation::Exec)?;
        let stream = client.get_mut();
        // A silent command is fine until its timeout; a guest that takes no stdin is not.
        stream.set_read_timeout(None);
        stream.set_deadline(Instant::now().checked_add(bound));
        let r = client.exec(
            &argv,
            &env,
            cmd.cwd.as_deref(),
            &cmd.stdin,
            Some(limit),
            &mut |d| capped("stdout", &mut out_len, d, on_stdout),
            &mut |d| capped("stderr", &mut err_len, d, on_stderr),
        );
        let r = r.map_err(|e| self.failed(e, limit, "exec", &cmd.argv[0]));
        if let Some(stream) = over.get() {
            return Err(Error::OutputLimit {
                stream,
                limit: output_limit,
            });
        }
        let st = r?;
        if st.timed_out {
            return Err(Error::Deadline {
                limit,
                last_good: self.lifecycle.last_good().cloned(),
            });
        }
        Ok(exit_code(st.code, st.signal))
    }

    fn env_for(&self, cmd: &Command) -> Vec<(String, String)> {
        let mut env = self.spec.env.clone();
        env.extend(cmd.env.iter().cloned());
        env
    }
}

/// A fresh ext2 filesystem image of `size` bytes (sparse) in the store's scratch space, made by
/// the host's `mke2fs` (formatting inside the guest is slow where its kernel is emulated).
fn format_disk(store: &LocalStore, size: usize) -> Result<PathBuf> {
    if size < (8 << 20) || !size.is_multiple_of(4096) {
        return Err(Error::InvalidArgument(format!(
            "disk size {size} is not a multiple of 4 KiB of at least 8 MiB"
        )));
    }
    let dir = store.root().join("tmp");
    std::fs::create_dir_all(&dir).map_err(|e| Error::store("create", &dir, e))?;
    let path = dir.join(format!("{}-disk-{}.img", std::process::id(), new_id()));
    let out = std::process::Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext2", "-b", "4096", "-m", "0"])
        .arg(&path)
        .arg(format!("{}k", size / 1024))
        .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
        .output();
    match out {
        Ok(o) if o.status.success() => Ok(path),
        Ok(o) => {
            let _ = std::fs::remove_file(&path);
            Err(Error::runtime(
                "format the sandbox's disk",
                String::from_utf8_lossy(&o.stderr).into_owned(),
            ))
        }
        Err(e) => Err(Error::RuntimeMissing {
            what: "mke2fs",
            hint: format!("the KVM tier formats its disk with mke2fs ({e}); install e2fsprogs"),
        }),
    }
}

/// The host directories of `mounts`, in volume-slot order: a detached mount point gets the
/// store's empty directory, read-only.
fn volumes(store: &LocalStore, mounts: &[Mount]) -> Result<Vec<VolumeAttach>> {
    let attached = if mounts.iter().any(Mount::is_detached) {
        grants::attachable(mounts, &grants::detached_dir(store)?)
    } else {
        mounts.to_vec()
    };
    Ok(attached
        .into_iter()
        .map(|m| VolumeAttach {
            host: m.host,
            read_only: m.read_only,
        })
        .collect())
}

fn exit_code(code: Option<i32>, signal: Option<i32>) -> i32 {
    code.unwrap_or_else(|| 128 + signal.unwrap_or(0))
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

/// Maps an agent failure to dormant's error, naming the operation and path.
fn agent_error(op: &'static str, path: &str, e: ClientError) -> Error {
    use std::io::ErrorKind;
    match e {
        ClientError::Agent { kind, message } => {
            let k = match kind.as_str() {
                "not_found" => ErrorKind::NotFound,
                "permission" => ErrorKind::PermissionDenied,
                "invalid" | "unsupported" => ErrorKind::InvalidInput,
                _ => ErrorKind::Other,
            };
            Error::File {
                op,
                path: path.to_string(),
                source: std::io::Error::new(k, message),
            }
        }
        other => Error::runtime_at("talk to the guest agent", format!("{op} {path}"), other),
    }
}

fn check_path(path: &str) -> Result<&str> {
    if !path.starts_with('/') || path.contains('\0') {
        return Err(Error::InvalidPath {
            path: path.into(),
            reason: "guest paths are absolute and contain no NUL",
        });
    }
    Ok(path)
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

    fn run_code(&mut self, _code: &str) -> Result<Execution> {
        self.lifecycle.check(Operation::RunCode)?;
        Err(Error::Unsupported {
            op: "run_code",
            what: "the KVM tier's guest image (it has no language interpreter; use exec, e.g. \
                   [\"sh\", \"-c\", code])"
                .into(),
        })
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
        self.lifecycle.check(Operation::Standby)?;
        let id = self.do_checkpoint()?;
        self.release();
        self.lifecycle.complete(Operation::Standby)?;
        Ok(id)
    }

    fn grants(&self) -> &Grants {
        &self.grants
    }

    fn resume_with(&mut self, id: &SnapshotId, grants: &Grants) -> Result<()> {
        self.lifecycle.check(Operation::Resume)?;
        self.calls.begin();
        let manifest = self.store.manifest(id)?;
        let mounts = grants.resolve(id, &manifest.spec.mounts)?;
        self.load(id, &mounts)?;
        self.id = manifest.sandbox_id;
        self.spec = manifest.spec;
        self.spec.mounts = mounts;
        self.grants = grants.clone();
        self.lifecycle.complete(Operation::Resume)
    }

    fn fork(&mut self, n: usize) -> Result<Vec<KvmSandbox>> {
        let base = self.do_checkpoint()?;
        (0..n)
            .map(|_| {
                let mut child = Self::from_snapshot_granted(
                    self.store.clone(),
                    &base,
                    &self.grants,
                    self.opts.clone(),
                )?;
                child.id = new_id();
                Ok(child)
            })
            .collect()
    }

    fn kill(&mut self) -> Result<()> {
        self.lifecycle.check(Operation::Kill)?;
        self.release();
        self.lifecycle.complete(Operation::Kill)
    }

    fn interrupter(&self) -> Option<Arc<dyn dormant_core::Interrupt>> {
        Some(Arc::new(KvmSandbox::interrupter(self)))
    }
}

impl Drop for KvmSandbox {
    fn drop(&mut self) {
        self.release();
    }
}
