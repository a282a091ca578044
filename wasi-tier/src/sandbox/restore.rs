//! Restore: loading a snapshot into a handle (resume, resume_with, fork). Open this file first
//! to follow a WASI resume; the path, in the order it runs:
//!
//! 1. **Entry.** [`WasiRuntime::resume`] (no grants) and [`WasiRuntime::resume_with`] (at the
//!    top of this file; the contract's `Runtime::resume` in mod.rs boxes the latter) call
//!    [`WasiSandbox::from_snapshot`] for a new handle. `Sandbox::resume_with` on an existing
//!    handle (mod.rs) forwards to [`WasiSandbox::do_resume_with`], which checks the lifecycle
//!    and passes [`WasiSandbox::current`] (the module it runs, to reuse). `Sandbox::fork`
//!    (mod.rs, through `dormant_core::lifecycle::fork`) writes a checkpoint (`do_checkpoint`,
//!    checkpoint.rs), then [`WasiSandbox::children`] calls `from_snapshot` once per child;
//!    the contract's `Runtime::fork` calls `children` on a stored snapshot.
//! 2. **Load, without touching the handle.** [`WasiSandbox::load`] builds every live part
//!    first, so a failed resume leaves the handle as it was:
//!    - `LocalStore::chain_for` reads and checks the manifests from the snapshot down to its
//!      full image and refuses another tier's snapshot; the leaf's tier state is decoded as a
//!      `WasiState` (state.rs);
//!    - the spec is validated and its mount points resolved against the caller's `Grants`
//!      (never the snapshot's paths); [`WasiSandbox::granted_module`] finds a module
//!      workload's file (or `WasiRuntime::workload_module` loads Python); the module and
//!      stdlib hashes must match the state's;
//!    - `attached` (dirs.rs) gives the mounts as the guest sees them; a new live directory
//!      becomes the root, removed again by a `DirGuard` (dirs.rs) if anything below fails;
//!    - `LocalStore::fs_archive` opens the filesystem archive, kept as a `PendingFs`: it is
//!      not extracted yet;
//!    - `instantiate` (create.rs) makes a fresh instance with the clock at the snapshot's
//!      time; its memory is grown to the snapshot's size; `LocalStore::memory_layer` opens
//!      each layer of the chain and `map_layers` (memory.rs) maps them copy-on-write over the
//!      memory, oldest first; the mutable globals are set from the state (`global_val`);
//!    - the instance records its layer (the next checkpoint writes a delta on it) and is
//!      marked to reseed.
//! 3. **Swap in.** `from_snapshot` wraps the parts in a new [`WasiSandbox`];
//!    `do_resume_with` releases the old instance and root, then takes the new ones. Either
//!    way the snapshot becomes the handle's last good one.
//! 4. **First call after resume.** `guarded` (live.rs, under every call) and `fs` (the files
//!    API) run [`WasiSandbox::materialize`], which extracts the pending archive into the root;
//!    a checkpoint that comes first links the untouched archive into its snapshot instead
//!    (checkpoint.rs). `run_code` (live.rs) prefixes the first cell with the reseed
//!    (`python::cell`): fresh PRNG seeds, and file objects whose descriptors did not survive
//!    closed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use dormant_core::snapshot::store::LayerFile;
use dormant_core::{
    Error, GrantError, Grants, Lifecycle, LocalStore, Operation, Result, SandboxFs, SandboxSpec,
    SnapshotError, SnapshotId, Tier, Workload, fsarchive,
};

use super::dirs::scopeguard;
use super::state::{WASI_STATE_VERSIONS, WasiState, global_val};
use super::{Layer, Live, PendingFs, WasiSandbox, runtime_err};
use crate::memory::map_layers;
use crate::runtime::{Loaded, WasiRuntime};

const WASM_PAGE: u64 = 65536;

impl WasiRuntime {
    /// Resumes a snapshot into a new sandbox handle (in this process or any other), granting
    /// it no host access: for a snapshot with mount points or a module workload, use
    /// [`resume_with`](Self::resume_with).
    pub fn resume(&self, store: Arc<LocalStore>, id: &SnapshotId) -> Result<WasiSandbox> {
        self.resume_with(store, id, &Grants::new())
    }

    /// Resumes a snapshot into a new sandbox handle with `grants` as its host access: the host
    /// directories for the snapshot's mount points and, for a `Workload::Module` snapshot, the
    /// module file (checked against the module hash the snapshot recorded). Nothing in the
    /// snapshot grants host access; grants that do not fit it are
    /// [`Error::Grant`] (see [`Grants`]).
    pub fn resume_with(
        &self,
        store: Arc<LocalStore>,
        id: &SnapshotId,
        grants: &Grants,
    ) -> Result<WasiSandbox> {
        WasiSandbox::from_snapshot(self.clone(), store, id, grants, None)
    }
}

impl WasiSandbox {
    /// Resumes `id` into this handle (see
    /// [`Sandbox::resume_with`](dormant_core::Sandbox::resume_with)): loads it beside the
    /// running instance, which is released only once the load succeeded.
    pub(super) fn do_resume_with(&mut self, id: &SnapshotId, grants: &Grants) -> Result<()> {
        self.lifecycle.check(Operation::Resume)?;
        let r = Self::load(&self.rt, &self.store, id, grants, self.current())?;
        self.release();
        self.id = r.sandbox_id;
        self.spec = r.spec;
        self.grants = r.grants;
        self.module = r.module;
        self.live = r.live;
        self.workdir = Some(r.workdir);
        self.fs = Some(r.fs);
        self.pending_fs = r.pending_fs;
        self.resumed_cold = r.cold;
        self.lifecycle.set_last_good(id.clone());
        self.lifecycle.complete(Operation::Resume)
    }

    /// Resumes snapshot `id` `n` times into new handles, each with an id of its own: the
    /// children of [`Sandbox::fork`](dormant_core::Sandbox::fork) (a checkpoint, then this)
    /// and of the runtime's `fork`; `current` as in [`from_snapshot`](Self::from_snapshot). On
    /// an error the children made so far are released.
    pub(crate) fn children(
        rt: &WasiRuntime,
        store: &Arc<LocalStore>,
        id: &SnapshotId,
        grants: &Grants,
        current: Option<Current<'_>>,
        n: usize,
    ) -> Result<Vec<WasiSandbox>> {
        (0..n)
            .map(|_| {
                let mut child =
                    Self::from_snapshot(rt.clone(), store.clone(), id, grants, current)?;
                child.id = Self::new_id();
                Ok(child)
            })
            .collect()
    }

    /// The module this handle runs, for a resume to reuse (see [`Current`]).
    pub(super) fn current(&self) -> Option<Current<'_>> {
        self.module.as_ref().map(|module| Current {
            module,
            path: self.grants.module.as_deref(),
        })
    }

    pub(crate) fn from_snapshot(
        rt: WasiRuntime,
        store: Arc<LocalStore>,
        id: &SnapshotId,
        grants: &Grants,
        current: Option<Current<'_>>,
    ) -> Result<WasiSandbox> {
        let r = Self::load(&rt, &store, id, grants, current)?;
        let mut lifecycle = Lifecycle::new();
        lifecycle.set_last_good(id.clone());
        Ok(WasiSandbox {
            rt,
            store,
            id: r.sandbox_id,
            spec: r.spec,
            grants: r.grants,
            lifecycle,
            module: r.module,
            live: r.live,
            workdir: Some(r.workdir),
            fs: Some(r.fs),
            pending_fs: r.pending_fs,
            resumed_cold: r.cold,
            interrupt: Arc::default(),
            used: Default::default(),
        })
    }

    /// Builds the live parts (instance, workdir, fs) from a snapshot, without touching `self`.
    /// Host access comes from `grants` (and `current`, the module the handle runs), never
    /// from the snapshot.
    fn load(
        rt: &WasiRuntime,
        store: &LocalStore,
        id: &SnapshotId,
        grants: &Grants,
        current: Option<Current<'_>>,
    ) -> Result<Restored> {
        let chain = store.chain_for(id, Tier::Wasi)?;
        let leaf = chain.last().expect("chain is never empty");
        let bad = |m: String| Error::snapshot(id, SnapshotError::Malformed(m));
        let state: WasiState = leaf
            .tier_state
            .decode("WASI state", WASI_STATE_VERSIONS)
            .map_err(|e| Error::snapshot(id, e))?;
        let mut spec = leaf.spec.clone();
        // The snapshot's mount points are checked by `Grants::resolve`; the rest here.
        let recorded = std::mem::take(&mut spec.mounts);
        spec.validate()
            .map_err(|e| Error::snapshot(id, SnapshotError::Incompatible(e.to_string())))?;
        spec.mounts = grants.resolve(id, &recorded)?;
        let mut effective = grants.clone();
        let module = match &spec.workload {
            Workload::Module { .. } => {
                let want = state
                    .module_hash
                    .as_deref()
                    .ok_or_else(|| bad("a module workload without a module hash".into()))?;
                let (module, path) = Self::granted_module(rt, id, want, grants, current)?;
                spec.workload = Workload::Module { path: path.clone() };
                effective.module = Some(path);
                Some(module)
            }
            other => rt.workload_module(other)?,
        };
        if module.as_ref().map(|m| &m.hash) != state.module_hash.as_ref() {
            return Err(Error::snapshot(
                id,
                SnapshotError::Incompatible(
                    "taken with another version of the workload module".into(),
                ),
            ));
        }
        if module
            .as_ref()
            .and_then(|m| m.python_lib.as_ref())
            .map(|(_, h)| h)
            != state.stdlib_hash.as_ref()
        {
            return Err(Error::snapshot(
                id,
                SnapshotError::Incompatible("taken with another Python standard library".into()),
            ));
        }
        let mounts = Self::attached(store, &spec.mounts)?;
        let workdir = store.new_live_dir()?;
        let cleanup = scopeguard(workdir.clone());
        let root = workdir.clone();
        let mut cold = false;
        let pending_fs = match store.fs_archive(leaf)? {
            Some((archive, rebuilt)) => {
                cold |= rebuilt;
                // A compact archive is rebuilt as a plain tar: the next snapshot gets its own.
                let record = leaf.fs.clone().filter(|_| leaf.fs_compact_len.is_none());
                Some(PendingFs {
                    snapshot: id.clone(),
                    record,
                    archive,
                })
            }
            None => None,
        };
        let fs = SandboxFs::open(&root, &mounts)?;
        let live = match &module {
            None => None,
            Some(module) => {
                let mut live =
                    Self::instantiate(rt, &spec, &mounts, module, &root, state.clock_ns)?;
                let size = leaf.memory.size;
                if size % WASM_PAGE != 0
                    || size > spec.memory_limit.max(size.min(4 << 30))
                    || size > 4 << 30
                {
                    return Err(bad(format!(
                        "memory size {size} is not a valid linear memory size"
                    )));
                }
                let cur = live.memory.data_size(&live.store) as u64;
                if size < cur {
                    return Err(bad("memory smaller than the module's initial memory".into()));
                }
                if size > cur {
                    live.memory
                        .grow(&mut live.store, (size - cur) / WASM_PAGE)
                        .map_err(runtime_err("grow memory"))?;
                }
                let files = chain
                    .iter()
                    .map(|m| store.memory_layer(m))
                    .collect::<Result<Vec<_>>>()?;
                cold |= files.iter().any(|f| f.cold());
                let layers: Vec<&LayerFile> = files.iter().collect();
                if chain.iter().any(|m| m.memory.size > size) {
                    return Err(bad(
                        "a parent layer is larger than the snapshot's memory".into()
                    ));
                }
                live.mapped_runs = map_layers(&mut live.store, &live.memory, &layers)
                    .map_err(|e| Error::store("map memory of", store.snapshot_dir(id), e))?;
                let want: Vec<&str> = live.globals.iter().map(|(n, _)| n.as_str()).collect();
                let have: Vec<&str> = state.globals.iter().map(|g| g.name.as_str()).collect();
                if want != have {
                    return Err(bad("the snapshot's globals do not match the module".into()));
                }
                for ((_, g), v) in live.globals.iter().zip(&state.globals) {
                    let val = global_val(v).ok_or_else(|| {
                        bad(format!("global {} has unknown type {}", v.name, v.ty))
                    })?;
                    g.set(&mut live.store, val)
                        .map_err(|e| bad(format!("global {}: {e:#}", v.name)))?;
                }
                live.layer = Some(Layer {
                    id: id.clone(),
                    depth: leaf.memory.depth,
                });
                live.reseed = true;
                Some(live)
            }
        };
        cleanup.defuse();
        Ok(Restored {
            pending_fs,
            cold,
            sandbox_id: leaf.sandbox_id.clone(),
            spec,
            grants: effective,
            module,
            live,
            workdir,
            fs,
        })
    }

    /// The module of a `Workload::Module` snapshot whose module hashes to `want`: the one this
    /// handle already runs (`current`, which its caller named) when it is that module and the
    /// grants name no other file, else the file the grants name, checked by content. The path
    /// the snapshot recorded is never opened. Returns the module and the file it came from.
    fn granted_module(
        rt: &WasiRuntime,
        id: &SnapshotId,
        want: &str,
        grants: &Grants,
        current: Option<Current<'_>>,
    ) -> Result<(Arc<Loaded>, PathBuf)> {
        if let Some(c) = current.filter(|c| {
            c.module.hash == want
                && c.module.python_lib.is_none()
                && grants.module.as_deref().is_none_or(|p| Some(p) == c.path)
        }) {
            let path = c.path.map(Path::to_path_buf).unwrap_or_default();
            return Ok((c.module.clone(), path));
        }
        let grant = |source| Error::Grant {
            id: id.clone(),
            source,
        };
        let path = grants.module.clone().ok_or_else(|| {
            grant(GrantError::ModuleMissing {
                hash: want.to_owned(),
            })
        })?;
        let bytes = std::fs::read(&path).map_err(|e| Error::File {
            op: "read the module",
            path: path.display().to_string(),
            source: e,
        })?;
        let found = blake3::hash(&bytes).to_hex().to_string();
        if found != want {
            return Err(grant(GrantError::ModuleMismatch {
                path,
                found,
                expected: want.to_owned(),
            }));
        }
        Ok((rt.module_from_bytes(&bytes, true)?, path))
    }

    /// Extracts a resumed snapshot's filesystem if that has not happened yet. All or nothing:
    /// if extraction fails (a full store, an I/O error) the root is emptied again and the
    /// archive kept, so that a later call starts over instead of using a partial tree.
    pub(super) fn materialize(&mut self) -> Result<()> {
        let Some(p) = &self.pending_fs else {
            return Ok(());
        };
        let root = self.root()?;
        if let Err(e) = fsarchive::unpack(&p.archive, &root) {
            if let Err(c) = fsarchive::clear(&root) {
                tracing::warn!(error = %c, root = %root.display(), "could not empty a partly extracted sandbox root");
            }
            return Err(Error::store(
                "extract the filesystem of",
                self.store.snapshot_dir(&p.snapshot),
                e,
            ));
        }
        self.pending_fs = None;
        Ok(())
    }
}

struct Restored {
    sandbox_id: String,
    spec: SandboxSpec,
    grants: Grants,
    module: Option<Arc<Loaded>>,
    live: Option<Live>,
    workdir: PathBuf,
    fs: SandboxFs,
    pending_fs: Option<PendingFs>,
    cold: bool,
}

/// The module a handle runs and the file its caller named for it: a resume of a snapshot of
/// the same module reuses it.
#[derive(Clone, Copy)]
pub(crate) struct Current<'a> {
    module: &'a Arc<Loaded>,
    path: Option<&'a Path>,
}
