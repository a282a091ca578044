//! Shared helpers of the WASI tier's integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use dormant_core::{Grants, LocalStore, SandboxSpec, Tier, Workload};
use dormant_wasi::WasiRuntime;

/// A reactor with state in memory and in non-exported mutable globals.
pub const TOY: &str = r#"
(module
  (memory (export "memory") 2)
  (global $counter (mut i64) (i64.const 0))
  (global $marker (mut i32) (i32.const 7))
  ;; counter += 1; returns it
  (func (export "bump") (result i64)
    (global.set $counter (i64.add (global.get $counter) (i64.const 1)))
    (global.get $counter))
  (func (export "marker") (result i32) (global.get $marker))
  (func (export "set_marker") (param i32) (global.set $marker (local.get 0)))
  ;; stores val at the start of 4 KiB page `page`
  (func (export "poke") (param $page i32) (param $val i32)
    (i32.store (i32.mul (local.get $page) (i32.const 4096)) (local.get $val)))
  (func (export "peek") (param $page i32) (result i32)
    (i32.load (i32.mul (local.get $page) (i32.const 4096))))
  (func (export "grow") (param i32) (result i32) (memory.grow (local.get 0)))
  ;; writes val into every 4 KiB page and sets $marker = val
  (func (export "fill") (param $val i32)
    (local $p i32) (local $n i32)
    (local.set $n (i32.mul (memory.size) (i32.const 16)))
    (block $done (loop $l
      (br_if $done (i32.ge_u (local.get $p) (local.get $n)))
      (i32.store (i32.mul (local.get $p) (i32.const 4096)) (local.get $val))
      (local.set $p (i32.add (local.get $p) (i32.const 1)))
      (br $l)))
    (global.set $marker (local.get $val)))
  ;; 1 when every page starts with $marker
  (func (export "consistent") (result i32)
    (local $p i32) (local $n i32)
    (local.set $n (i32.mul (memory.size) (i32.const 16)))
    (block $bad (loop $l
      (if (i32.ge_u (local.get $p) (local.get $n)) (then (return (i32.const 1))))
      (br_if $bad (i32.ne (i32.load (i32.mul (local.get $p) (i32.const 4096))) (global.get $marker)))
      (local.set $p (i32.add (local.get $p) (i32.const 1)))
      (br $l)))
    (i32.const 0))
  (func (export "spin") (loop $l (br $l)))
  ;; grows memory until refused, then aborts like a C program would
  (func (export "hog")
    (loop $l
      (if (i32.eq (memory.grow (i32.const 16)) (i32.const -1)) (then unreachable))
      (br $l)))
)
"#;

/// A WASI command: copies stdin to stdout and to `/out.txt`, writes a line to stderr, and exits
/// with status argc.
pub const CMD: &str = r#"
(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 200) "out.txt")
  (data (i32.const 300) "to stderr\n")
  (func (export "_start")
    ;; iovec at 0 -> buffer 1024..2024; bytes read at 16
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (i32.const 1000))
    (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 16)))
    ;; iovec at 32 -> the bytes read
    (i32.store (i32.const 32) (i32.const 1024))
    (i32.store (i32.const 36) (i32.load (i32.const 16)))
    (drop (call $fd_write (i32.const 1) (i32.const 32) (i32.const 1) (i32.const 48)))
    ;; iovec at 64 -> "to stderr\n"
    (i32.store (i32.const 64) (i32.const 300))
    (i32.store (i32.const 68) (i32.const 10))
    (drop (call $fd_write (i32.const 2) (i32.const 64) (i32.const 1) (i32.const 48)))
    ;; out.txt in the first preopen (the sandbox root), created and truncated
    (if (i32.eqz (call $path_open (i32.const 3) (i32.const 0) (i32.const 200) (i32.const 7) (i32.const 9)
                   (i64.const 0x1FFFFFFF) (i64.const 0x1FFFFFFF) (i32.const 0) (i32.const 80)))
      (then (drop (call $fd_write (i32.load (i32.const 80)) (i32.const 32) (i32.const 1) (i32.const 48)))))
    (drop (call $args_sizes_get (i32.const 96) (i32.const 100)))
    (call $proc_exit (i32.load (i32.const 96))))
)
"#;

pub fn runtime() -> &'static WasiRuntime {
    static RT: OnceLock<WasiRuntime> = OnceLock::new();
    RT.get_or_init(|| WasiRuntime::new().expect("wasmtime runtime"))
}

pub struct Env {
    pub tmp: tempfile::TempDir,
    pub store: Arc<LocalStore>,
}

impl Env {
    pub fn new() -> Env {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(LocalStore::open(tmp.path().join("store")).expect("store"));
        Env { tmp, store }
    }

    pub fn toy_path(&self) -> PathBuf {
        let p = self.tmp.path().join("toy.wasm");
        if !p.exists() {
            std::fs::write(&p, wat::parse_str(TOY).expect("toy wat")).expect("write toy");
        }
        p
    }

    pub fn toy_spec(&self) -> SandboxSpec {
        SandboxSpec::new(
            Tier::Wasi,
            Workload::Module {
                path: self.toy_path(),
            },
        )
    }

    /// What a resume of a toy snapshot must be granted: its module file (a snapshot never
    /// names the module that runs).
    pub fn toy_grants(&self) -> Grants {
        Grants::new().module(self.toy_path())
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }
}

pub fn snapshot_dir(store: &LocalStore, id: &dormant_core::SnapshotId) -> PathBuf {
    store.snapshot_dir(id)
}

pub fn flip_byte(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x5a;
    f.write_all_at(&b, at).unwrap();
}

/// The host directory that is the root of the live sandbox holding the file `marker`.
pub fn live_root_with(store: &LocalStore, marker: &str) -> PathBuf {
    std::fs::read_dir(store.root().join("live"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|root| root.join(marker).exists())
        .expect("a live sandbox root holding the marker")
}

/// A Python sandbox with the default spec.
pub fn python(env: &Env) -> dormant_wasi::WasiSandbox {
    runtime()
        .create(env.store.clone(), SandboxSpec::python())
        .expect("create a Python sandbox")
}

/// Runs a cell that must succeed; returns its stdout.
pub fn out(sb: &mut dormant_wasi::WasiSandbox, code: &str) -> String {
    use dormant_core::Sandbox;
    let ex = sb.run_code(code).unwrap_or_else(|e| panic!("{code}: {e}"));
    assert!(ex.error.is_none(), "{code}: {:?}", ex.error);
    ex.stdout
}
