//! Creating a sandbox ([`WasiRuntime::create`]): its root directory and, for a module or
//! Python workload, a fresh instance of the module, initialized (and for Python,
//! bootstrapped). `instantiate` is also where every restore starts: it builds the fresh
//! instance a snapshot's memory is mapped over.

use std::path::Path;
use std::sync::Arc;

use dormant_core::memguard::GuardedMemory;
use dormant_core::{
    Error, Grants, Lifecycle, LocalStore, Mount, Result, SandboxFs, SandboxSpec, Tier,
};
use wasmtime::{Global, Store};

use super::live::turn;
use super::{Live, PyFuncs, WasiSandbox, runtime_err};
use crate::capture::Capture;
use crate::host::{Clock, CtxParams, Host, Limits, build_ctx};
use crate::python;
use crate::runtime::{Loaded, WasiRuntime};

impl WasiRuntime {
    /// Creates a sandbox from `spec` (WASI tier).
    pub fn create(&self, store: Arc<LocalStore>, spec: SandboxSpec) -> Result<WasiSandbox> {
        spec.validate()?;
        if spec.tier != Tier::Wasi {
            return Err(Error::InvalidSpec(format!(
                "the WASI runtime cannot create a {} sandbox",
                spec.tier
            )));
        }
        WasiSandbox::create(self.clone(), store, spec)
    }
}

/// The stdlib directory of a Python module.
fn lib_of(module: Option<&Arc<Loaded>>) -> Option<&Path> {
    module
        .and_then(|m| m.python_lib.as_ref())
        .map(|(p, _)| p.as_path())
}

impl WasiSandbox {
    pub(super) fn guest_env(spec: &SandboxSpec, python: bool) -> Vec<(String, String)> {
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
    pub(super) fn instantiate(
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
            mpl_data: module.mpl_data.as_deref(),
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
                written: 0,
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
        let guard = GuardedMemory::new(
            memory.data_ptr(&store),
            crate::engine_params::MEMORY_RESERVATION,
        );
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
            used: Default::default(),
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
}
