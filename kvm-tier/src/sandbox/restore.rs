//! Resuming a snapshot: the KVM restore path, in the order it runs. Open this file first to
//! see how a checkpointed guest comes back; `kvm-tier/src/lib.rs` keeps the short list.
//!
//! 1. **Entry.** [`KvmSandbox::from_snapshot`] (no host access) →
//!    [`KvmSandbox::from_snapshot_with`] (options) → [`KvmSandbox::from_snapshot_granted`]:
//!    checks for `/dev/kvm`, reads the snapshot's manifest from the store, resolves the
//!    caller's grants against its mount points (`Grants::resolve`: one host directory per
//!    volume slot, or detached) and makes a handle with the snapshot's sandbox id and spec.
//!    `KvmRuntime::resume` (`runtime.rs`) comes this way, and so do forks: `Sandbox::fork`
//!    (`dormant_core::lifecycle::fork`: a checkpoint, then the children) and
//!    `KvmRuntime::fork` both end in `KvmSandbox::children` (below), which resumes the
//!    snapshot once per child under a new id. Two ways in join at step 2 with a handle of
//!    their own: `Sandbox::resume_with` (in `mod.rs`) resumes into an existing handle, and
//!    `create` (in `create.rs`) resumes the base snapshot of its image under a new id.
//! 2. **`KvmSandbox::load`** (below) drives the rest: it asks the snapshot module for the
//!    machine (3 and 4), refuses a bare VM snapshot without device state, and turns the mounts
//!    into the host directories of the volume slots (a detached one gets the store's empty
//!    directory, read-only).
//! 3. **`snapshot::load_machine`** (`snapshot.rs`): reads the chain of layers (base first) and
//!    checks it: a KVM snapshot, a state version this build reads (`kvm_state`), one RAM size
//!    throughout, a full image at the base; decodes the vCPU/VM state
//!    (`SavedState::to_state`); maps the RAM copy-on-write, the base image
//!    (`GuestRam::from_layer`) with each delta on top (`map_layer`), and the disk the same way
//!    (`disk_layers`, `map_disk`). Nothing is read eagerly: pages fault in from the snapshot
//!    files as the guest touches them.
//! 4. **`MicroVm::restore`** (`persist.rs`, the VM's `Persist` seam): a brand-new VM over that
//!    RAM (`MicroVm::new`), then `restore_state` gives it the PIT, the KVM clock, the
//!    irqchips and the vCPU (registers, XSAVE, LAPIC, MSRs, pending events).
//! 5. **`Machine::restore`** (`machine.rs`): checks the devices' state version, then restores
//!    every device from its own state through `Persist::restore`: the UART, vsock (with its
//!    connections, marked adoptable), the block device over the mapped disk, the virtio-fs
//!    volume slots with this resume's directories attached. `Machine::start` then wires their
//!    interrupt lines and doorbells (irqfds, ioeventfds) and starts the vCPU on its thread:
//!    the guest runs from the instruction where the checkpoint stopped it.
//! 6. **Back in `load`:** the previous machine of the handle (if any) is shut down; the
//!    snapshot becomes the parent of the next checkpoint and the last good snapshot, with
//!    nothing unsaved. `VsockHost::adopt` takes back the agent connection that was idle at the
//!    checkpoint (the guest's end never noticed), `reset_unadopted` resets the other restored
//!    connections, and without an adoptable one `connect` (in `live.rs`) opens a new one
//!    within [`KvmOptions::connect_timeout`].
//! 7. **`refresh_guest`**, in one round trip to the agent (one `refresh` request; an agent
//!    from before it gets `write_file` of `/dev/urandom` and `set_time`, pipelined): host
//!    entropy mixed into the guest's pool (forks and repeated resumes of one snapshot must not
//!    share random streams) and the wall clock set (it stood still while the snapshot slept;
//!    the monotonic clock continues); the next `run_code` reseeds the guest's Python PRNGs
//!    from that pool.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use dormant_agent::client::{Client, ClientError};
use dormant_core::snapshot::SnapshotId;
use dormant_core::snapshot::store::LocalStore;
use dormant_core::{Error, Grants, Mount, NetworkPolicy, Result};

use super::create::volumes;
use super::live::agent_error;
use super::{AGENT_PORT, KvmOptions, KvmSandbox, ResumeTimings, require_kvm, runtime};
use crate::machine::Machine;
use crate::snapshot;

impl KvmSandbox {
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
    /// [`Error::Grant`] (see [`Grants`]).
    pub fn from_snapshot_granted(
        store: Arc<LocalStore>,
        id: &SnapshotId,
        grants: &Grants,
        opts: KvmOptions,
    ) -> Result<KvmSandbox> {
        let mut sb = Self::resumed(store, id, grants, opts)?;
        // Its exposed ports come back with it.
        sb.sync_ports();
        Ok(sb)
    }

    /// [`from_snapshot_granted`](Self::from_snapshot_granted) without listening on the
    /// snapshot's exposed ports (they stay in `spec.ports`).
    fn resumed(
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
        let network = spec.network.clone();
        let mut sb = KvmSandbox::handle(store, manifest.sandbox_id, spec, grants.clone(), opts);
        sb.load(id, &mounts, &network)?;
        Ok(sb)
    }

    /// `n` new sandboxes from snapshot `id`, each with an id of its own: the children of
    /// [`fork`](dormant_core::Sandbox::fork) and of [`KvmRuntime::fork`](crate::KvmRuntime).
    /// A child exposes no ports (its parent's stay the parent's) until asked. On an error the
    /// children made so far are released, and no more are started.
    ///
    /// The children resume a few at a time, one per host CPU: most of a resume is the guest's
    /// first reply, the vCPU's work (emulated guest kernel code on PVM hosts), which one
    /// thread waiting for it after another would leave the other CPUs without.
    pub(crate) fn children(
        store: &Arc<LocalStore>,
        id: &SnapshotId,
        grants: &Grants,
        opts: &KvmOptions,
        n: usize,
    ) -> Result<Vec<KvmSandbox>> {
        let child = || -> Result<KvmSandbox> {
            let mut child = Self::resumed(store.clone(), id, grants, opts.clone())?;
            child.id = super::new_id();
            child.spec.ports.clear();
            Ok(child)
        };
        let workers = std::thread::available_parallelism()
            .map_or(1, std::num::NonZeroUsize::get)
            .min(n);
        if workers <= 1 {
            return (0..n).map(|_| child()).collect();
        }
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let slots: Vec<Mutex<Option<Result<KvmSandbox>>>> =
            (0..n).map(|_| Mutex::new(None)).collect();
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| {
                    while !failed.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(slot) = slots.get(i) else { break };
                        let made = child();
                        if made.is_err() {
                            failed.store(true, Ordering::Relaxed);
                        }
                        *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(made);
                    }
                });
            }
        });
        // In order; the first error wins, and every child made is dropped (released) with it.
        let mut kids = Vec::with_capacity(n);
        let mut error = None;
        for slot in slots {
            match slot.into_inner().unwrap_or_else(PoisonError::into_inner) {
                Some(Ok(kid)) => kids.push(kid),
                Some(Err(e)) => {
                    error.get_or_insert(e);
                }
                None => {}
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(kids),
        }
    }

    /// Restores snapshot `id` into a new VM, `mounts` attached to its volume slots in order,
    /// its network under `network` (the spec the sandbox will have: the snapshot's, or a new
    /// sandbox's).
    pub(super) fn load(
        &mut self,
        id: &SnapshotId,
        mounts: &[Mount],
        network: &NetworkPolicy,
    ) -> Result<()> {
        let start = Instant::now();
        let snapshot::Loaded { vm, devices, disk } = snapshot::load_machine(&self.store, id)?;
        let mapped = Instant::now();
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
        let restored = Instant::now();
        self.ports.attach(machine.vsock());
        // A fresh NAT (the checkpoint's connections are gone) under the sandbox's policy.
        if let Some(net) = machine.net() {
            net.set_policy(network.clone());
        }
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
        let connected = Instant::now();
        self.refresh_guest()?;
        self.resume_timings = Some(ResumeTimings {
            map: mapped - start,
            restore: restored - mapped,
            connect: connected - restored,
            first_reply: connected.elapsed(),
        });
        Ok(())
    }

    /// After a resume, in one round trip: mixes host entropy into the guest's pool (forks and
    /// repeated resumes must not share random streams) and sets its wall clock (it stood still
    /// while the guest slept; the monotonic clock simply continues). The next `run_code` then
    /// reseeds the guest's Python PRNGs from that pool.
    fn refresh_guest(&mut self) -> Result<()> {
        use dormant_agent::proto::Request;
        let seed: [u8; 64] = rand::random();
        let now = std::time::SystemTime::now();
        let agent = self.live_agent()?;
        match agent.refresh(&seed, now) {
            Ok(()) => {}
            // An agent from before `refresh`: the two requests it stands for, pipelined.
            Err(ClientError::Agent { kind, .. }) if kind == "unsupported" => {
                let unix_ns = dormant_agent::client::unix_ns(now);
                let answers = agent
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
                        Err(ClientError::Agent { kind, .. }) if i == 1 && kind == "unsupported" => {
                        }
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
            }
            Err(e) => {
                return Err(agent_error(
                    "refresh the resumed guest",
                    "/dev/urandom and CLOCK_REALTIME",
                    e,
                ));
            }
        }
        // The Python session's PRNGs were seeded before the snapshot: the next cell reseeds
        // them from the pool just refreshed.
        self.reseed = true;
        Ok(())
    }
}
