//! The calls a live sandbox answers: Python cells (`run_code`), export calls, WASI commands
//! (`exec`) and the files API. Each guest call runs under the call deadline and the interrupt
//! (`guarded`); a trap, a deadline, an interrupt or a lost memory page poisons the sandbox
//! and names its last good snapshot (`classify`).

use std::sync::atomic::Ordering;
use std::time::Duration;

use dormant_core::memguard::GuardedMemory;
use dormant_core::metrics::CpuClock;
use dormant_core::{
    Command, Error, ExecOutput, Execution, ExecutionError, Operation, Result, SandboxFs, SnapshotId,
};
use wasmtime::{Store, Trap, Val};

use super::{Live, WasiSandbox, runtime_err};
use crate::capture::Capture;
use crate::engine_params::TICK;
use crate::host::{Clock, CtxParams, Host, Limits, build_ctx};
use crate::python;

impl WasiSandbox {
    /// Runs `f` on the live instance under the call deadline. A trap discards the instance and
    /// poisons the sandbox (its last checkpoint is named in the error).
    pub(super) fn guarded<T>(
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
        let mut cpu = Duration::ZERO;
        let r = {
            let _active = ticker.active();
            CpuClock::count(&mut cpu, || f(&mut *live))
        };
        live.store.set_epoch_deadline(u64::MAX / 2);
        let written = std::mem::take(&mut live.store.data_mut().written);
        let fault = live.guard.fault();
        let memory_hit = live.store.data().limits.memory_hit;
        self.used.cpu_time += cpu;
        self.used.written += written;
        if let Some(addr) = fault {
            // Whatever the call returned, it ran on memory that is not the snapshot's.
            return Err(self.lose_memory(addr));
        }
        match r {
            Ok(v) => Ok(v),
            Err(e) => {
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
    pub(super) fn lose_memory(&mut self, addr: usize) -> Error {
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
        let (stderr, mut error, results) = python::split_records(&String::from_utf8_lossy(&err))?;
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
            results,
        })
    }

    pub(super) fn fs(&mut self, op: Operation) -> Result<&SandboxFs> {
        self.lifecycle.check(op)?;
        self.materialize()?;
        self.fs.as_ref().ok_or(Error::IllegalTransition {
            op,
            state: self.lifecycle.state(),
        })
    }

    /// Runs a WASI command module found in the sandbox's filesystem (see
    /// [`Sandbox::exec`](dormant_core::Sandbox::exec)).
    pub(super) fn do_exec(&mut self, cmd: &Command) -> Result<ExecOutput> {
        self.lifecycle.check(Operation::Exec)?;
        if cmd.cwd.is_some() {
            return Err(Error::Unsupported {
                op: "a working directory for exec",
                what: "the WASI tier (commands run from the sandbox root)".into(),
            });
        }
        if cmd.shell {
            return Err(Error::Unsupported {
                op: "a shell command",
                what: "the WASI tier (it has no shell: give the argv of a .wasm command module)"
                    .into(),
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
            mpl_data: None,
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
                written: 0,
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
            CpuClock::count(&mut self.used.cpu_time, || start.call(&mut store, ()))
        };
        self.used.written += store.data().written;
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
}

/// Feeds `code` to the interpreter's `turn` export.
pub(super) fn turn(live: &mut Live, code: &str) -> wasmtime::Result<i32> {
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
