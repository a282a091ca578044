//! The harness of the tests: a guest module that makes the preview-1 calls, instantiated linked
//! with wasmtime-wasi alone or with this module over it ([`Guest`]), two of them driven alike
//! ([`Pair`]), a decoder of the dirents they return, and directories to list.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::OnceLock;

use wasmtime::{Engine, Linker, Module, Store, TypedFunc};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

use crate::readdir::cache::{Budget, Listings};
use crate::readdir::calls::add_to_linker;
use crate::readdir::dirents::DIRENT_HEADER;

const GUEST: &str = r#"
    (module
      (import "wasi_snapshot_preview1" "fd_readdir"
        (func $readdir (param i32 i32 i32 i64 i32) (result i32)))
      (import "wasi_snapshot_preview1" "fd_close" (func $close (param i32) (result i32)))
      (import "wasi_snapshot_preview1" "fd_renumber" (func $renumber (param i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "path_open"
        (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
      (memory (export "memory") 8)
      (func (export "readdir") (param i32 i32 i32 i64 i32) (result i32)
        (call $readdir (local.get 0) (local.get 1) (local.get 2) (local.get 3) (local.get 4)))
      (func (export "close") (param i32) (result i32) (call $close (local.get 0)))
      (func (export "renumber") (param i32 i32) (result i32)
        (call $renumber (local.get 0) (local.get 1)))
      ;; opens the path at [ptr, ptr + len) under the root preopen (fd 3), as a directory (and
      ;; without the write right) when `dir` is 1; the new descriptor goes to address 0
      (func (export "open") (param $ptr i32) (param $len i32) (param $dir i32) (result i32)
        (call $open (i32.const 3) (i32.const 0) (local.get $ptr) (local.get $len)
          (select (i32.const 2) (i32.const 0) (local.get $dir))
          (select (i64.const 0x1FFFFFBF) (i64.const 0x1FFFFFFF) (local.get $dir))
          (i64.const 0x1FFFFFFF) (i32.const 0) (i32.const 0)))
    )"#;

/// Guest addresses: the byte count, a path, the buffer (up to the end of 8 pages).
pub(super) const USED: u32 = 8;
const PATH: u32 = 1024;
pub(super) const BUF: u32 = 4096;
pub(super) const MEM: u32 = 8 << 16;

pub(super) struct Data {
    wasi: WasiP1Ctx,
    pub(super) listings: Listings,
}

fn engine_and_module() -> &'static (Engine, Module) {
    static EM: OnceLock<(Engine, Module)> = OnceLock::new();
    EM.get_or_init(|| {
        let engine = Engine::default();
        let module = Module::new(&engine, GUEST).unwrap();
        (engine, module)
    })
}

/// One instance of `GUEST` with `root` preopened at `/`: linked with wasmtime-wasi alone
/// (`budget` None) or with this module over it.
pub(super) struct Guest {
    pub(super) store: Store<Data>,
    memory: wasmtime::Memory,
    readdir: TypedFunc<(i32, i32, i32, i64, i32), i32>,
    close: TypedFunc<i32, i32>,
    renumber: TypedFunc<(i32, i32), i32>,
    open: TypedFunc<(i32, i32, i32), i32>,
}

/// What one `fd_readdir` call did: its errno, the byte count it reported (None when not
/// written), and the bytes of its buffer (and 16 more) after the call.
#[derive(PartialEq, Eq)]
pub(super) struct Call {
    pub(super) errno: i32,
    pub(super) used: Option<u32>,
    pub(super) region: Vec<u8>,
}

impl std::fmt::Debug for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let used = self.used.unwrap_or(0) as usize;
        let (entries, cut) = decode(&self.region[..used.min(self.region.len())]);
        let first: Vec<_> = entries
            .iter()
            .take(3)
            .map(|e| {
                (
                    e.d_next,
                    String::from_utf8_lossy(&e.name[..e.name.len().min(12)]),
                )
            })
            .collect();
        f.debug_struct("Call")
            .field("errno", &self.errno)
            .field("used", &self.used)
            .field("entries", &entries.len())
            .field("cut", &cut)
            .field("first", &first)
            .field(
                "region_hash",
                &blake3::hash(&self.region).to_hex()[..16].to_owned(),
            )
            .finish()
    }
}

impl Guest {
    pub(super) fn new(root: &Path, budget: Option<Budget>) -> Guest {
        let (engine, module) = engine_and_module();
        let mut linker = Linker::new(engine);
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |d: &mut Data| &mut d.wasi).unwrap();
        if budget.is_some() {
            add_to_linker(&mut linker, |d: &mut Data| (&mut d.wasi, &mut d.listings)).unwrap();
        }
        let mut b = WasiCtxBuilder::new();
        b.preopened_dir(root, "/", FsPerms::ReadWrite).unwrap();
        let data = Data {
            wasi: b.build_p1(),
            listings: Listings::with_budget(budget.unwrap_or(Budget::DEFAULT)),
        };
        let mut store = Store::new(engine, data);
        let inst = linker.instantiate(&mut store, module).unwrap();
        Guest {
            memory: inst.get_memory(&mut store, "memory").unwrap(),
            readdir: inst.get_typed_func(&mut store, "readdir").unwrap(),
            close: inst.get_typed_func(&mut store, "close").unwrap(),
            renumber: inst.get_typed_func(&mut store, "renumber").unwrap(),
            open: inst.get_typed_func(&mut store, "open").unwrap(),
            store,
        }
    }

    pub(super) fn kept(&self) -> usize {
        self.store.data().listings.len()
    }

    /// `fd_readdir(fd, BUF, len, cookie, USED)`; `Err` when it trapped.
    pub(super) fn try_readdir_at(
        &mut self,
        fd: i32,
        buf: u32,
        len: u32,
        cookie: u64,
        used_at: u32,
    ) -> wasmtime::Result<Call> {
        let region_end = (buf as usize + len as usize + 16).min(MEM as usize);
        let mem = self.memory.data_mut(&mut self.store);
        mem[..BUF as usize].fill(0);
        mem[BUF as usize..].fill(0xa5);
        let errno = self.readdir.call(
            &mut self.store,
            (fd, buf as i32, len as i32, cookie as i64, used_at as i32),
        )?;
        let mem = self.memory.data(&self.store);
        let used = u32::from_le_bytes(mem[USED as usize..USED as usize + 4].try_into()?);
        Ok(Call {
            errno,
            used: (used_at == USED && used != 0).then_some(used),
            region: mem[(buf as usize).min(region_end)..region_end].to_vec(),
        })
    }

    pub(super) fn readdir(&mut self, fd: i32, len: u32, cookie: u64) -> Call {
        self.try_readdir_at(fd, BUF, len, cookie, USED).unwrap()
    }

    /// Opens `path` (relative to the root) and returns the new descriptor, or the errno.
    pub(super) fn open(&mut self, path: &str, dir: bool) -> Result<i32, i32> {
        let mem = self.memory.data_mut(&mut self.store);
        mem[PATH as usize..PATH as usize + path.len()].copy_from_slice(path.as_bytes());
        let errno = self
            .open
            .call(
                &mut self.store,
                (PATH as i32, path.len() as i32, i32::from(dir)),
            )
            .unwrap();
        if errno != 0 {
            return Err(errno);
        }
        let mem = self.memory.data(&self.store);
        Ok(i32::from_le_bytes(mem[0..4].try_into().unwrap()))
    }

    pub(super) fn close(&mut self, fd: i32) -> i32 {
        self.close.call(&mut self.store, fd).unwrap()
    }

    pub(super) fn renumber(&mut self, from: i32, to: i32) -> i32 {
        self.renumber.call(&mut self.store, (from, to)).unwrap()
    }

    /// Reads a whole listing the way wasi-libc's `readdir` does: from cookie 0, resuming
    /// at the `d_next` of the last whole entry, doubling the buffer when not even one entry
    /// fits, until a call fills less than its buffer.
    pub(super) fn walk(&mut self, fd: i32, mut len: u32) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut cookie = 0;
        loop {
            let call = self.readdir(fd, len, cookie);
            assert_eq!(call.errno, 0);
            let used = call.used.unwrap_or(0);
            let (entries, _) = decode(&call.region[..used as usize]);
            if entries.is_empty() && used == len {
                len *= 2;
                continue;
            }
            if let Some(last) = entries.last() {
                cookie = last.d_next;
            }
            out.extend(entries);
            if used < len {
                return out;
            }
        }
    }
}

/// A guest linked with wasmtime-wasi alone and one linked with this module, driven alike;
/// every call checks that both answer the same.
pub(super) struct Pair {
    pub(super) theirs: Guest,
    pub(super) ours: Guest,
}

impl Pair {
    pub(super) fn new(root: &Path, budget: Budget) -> Pair {
        Pair {
            theirs: Guest::new(root, None),
            ours: Guest::new(root, Some(budget)),
        }
    }

    pub(super) fn readdir(&mut self, fd: i32, len: u32, cookie: u64) -> Call {
        let o = self.ours.readdir(fd, len, cookie);
        let t = self.theirs.readdir(fd, len, cookie);
        assert_eq!(
            o, t,
            "fd_readdir of fd {fd} with {len} bytes at cookie {cookie}"
        );
        o
    }

    pub(super) fn open(&mut self, path: &str, dir: bool) -> i32 {
        let fd = self.ours.open(path, dir).unwrap();
        assert_eq!(self.theirs.open(path, dir), Ok(fd), "open {path}");
        fd
    }

    pub(super) fn close(&mut self, fd: i32) {
        assert_eq!(self.ours.close(fd), 0);
        assert_eq!(self.theirs.close(fd), 0);
    }

    pub(super) fn renumber(&mut self, from: i32, to: i32) {
        assert_eq!(self.ours.renumber(from, to), 0);
        assert_eq!(self.theirs.renumber(from, to), 0);
    }

    pub(super) fn walk(&mut self, fd: i32, len: u32) -> Vec<Entry> {
        let o = self.ours.walk(fd, len);
        assert_eq!(
            o,
            self.theirs.walk(fd, len),
            "a walk of fd {fd} with {len} bytes"
        );
        o
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Entry {
    pub(super) name: Vec<u8>,
    pub(super) d_next: u64,
    d_ino: u64,
    pub(super) d_type: u8,
}

/// The whole dirents in `bytes`, and whether a cut one follows them.
pub(super) fn decode(bytes: &[u8]) -> (Vec<Entry>, bool) {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        if bytes.len() - at < DIRENT_HEADER {
            return (out, true);
        }
        let h = &bytes[at..at + DIRENT_HEADER];
        let namlen = u32::from_le_bytes(h[16..20].try_into().unwrap()) as usize;
        if bytes.len() - at - DIRENT_HEADER < namlen {
            return (out, true);
        }
        out.push(Entry {
            d_next: u64::from_le_bytes(h[0..8].try_into().unwrap()),
            d_ino: u64::from_le_bytes(h[8..16].try_into().unwrap()),
            d_type: h[20],
            name: bytes[at + DIRENT_HEADER..at + DIRENT_HEADER + namlen].to_vec(),
        });
        at += DIRENT_HEADER + namlen;
    }
    (out, false)
}

/// A name of `len` bytes (up to 255), unique for `i`.
pub(super) fn name(i: usize, len: usize) -> String {
    let mut n = format!("{i:04}-");
    if i % 5 == 2 {
        n.push('ü');
    }
    while n.len() < len {
        n.push(char::from(b'a' + (n.len() % 26) as u8));
    }
    n
}

/// Makes `n` entries in `dir` (files, directories and symlinks, names of up to 255 bytes
/// that start with the directory's own name and `-`).
pub(super) fn fill(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let tag = dir.file_name().unwrap().to_str().unwrap();
    for i in 0..n {
        let len = (5 + (i * 53) % 251).saturating_sub(tag.len() + 1);
        let p = dir.join(format!("{tag}-{}", name(i, len)));
        match i % 9 {
            3 => std::fs::create_dir(&p).unwrap(),
            6 => std::os::unix::fs::symlink("elsewhere", &p).unwrap(),
            _ => std::fs::write(&p, b"").unwrap(),
        }
    }
}

/// The names of `dir` on the host, with `.` and `..`.
pub(super) fn host_names(dir: &Path) -> BTreeSet<Vec<u8>> {
    let mut names: BTreeSet<Vec<u8>> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_encoded_bytes())
        .collect();
    names.insert(b".".to_vec());
    names.insert(b"..".to_vec());
    names
}

pub(super) fn names(entries: &[Entry]) -> BTreeSet<Vec<u8>> {
    entries.iter().map(|e| e.name.clone()).collect()
}

/// Buffer sizes that end inside a header, right after one, inside a name, and fit all.
pub(super) const LENS: [u32; 10] = [0, 1, 23, 24, 25, 30, 48, 4096, 65_536, MEM - BUF];

pub(super) fn cookies(entries: usize) -> Vec<u64> {
    let n = entries as u64;
    let mut c = vec![0, 1, 2, 3, 4, 57, n / 2, n - 1, n, n + 1, n + 7, u64::MAX];
    c.retain(|&c| c <= n + 7 || c == u64::MAX);
    c.sort();
    c.dedup();
    c
}

/// Checks that every call of `calls` on `dir` gets wasmtime-wasi's answer.
pub(super) fn same_answers(root: &Path, dir: &str, budget: Budget, calls: &[(u32, u64)]) {
    let mut p = Pair::new(root, budget);
    let fd = p.open(dir, true);
    for &(len, cookie) in calls {
        p.readdir(fd, len, cookie);
    }
    assert!(p.ours.kept() <= budget.max_kept);
}
