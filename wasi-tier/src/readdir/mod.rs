//! `fd_readdir` in time linear in the size of the directory.
//!
//! wasmtime-wasi's preview-1 `fd_readdir` (48.0.8, and unchanged on upstream main at
//! 49.0.0-dev) serves every call by reading the whole directory again, hashing the metadata of
//! every entry (one `fstatat` each) and skipping the first `cookie` entries. wasi-libc's
//! `readdir` asks for 4 KiB at a time, so a listing of n entries costs about n²/100 stats:
//! `os.listdir` of 20,000 files took ~170 s in a Python session.
//!
//! dormant shadows `wasi_snapshot_preview1.fd_readdir`: a call at cookie 0 (or one for a
//! descriptor with nothing kept) asks wasmtime-wasi's own `fd_readdir` for the whole listing
//! once, at cookie 0, into a host buffer, through the descriptor the guest holds (so cap-std's
//! confinement and the descriptor's checks stay wasmtime-wasi's); later cookies are served from
//! that listing. The bytes are wasmtime-wasi's, so entries, `d_next`, `d_ino`, `d_type`, `.` and
//! `..` are unchanged, and a buffer that ends inside an entry gets the same truncated prefix.
//!
//! A kept listing is a snapshot taken at its cookie-0 call: entries added or removed later show
//! up at the next cookie-0 call (POSIX leaves unspecified whether they show up before a
//! `rewinddir`), and a listing in progress neither repeats nor loses an entry when the
//! directory changes under it. A listing is dropped when the guest has read its end, starts
//! again at cookie 0, or closes or renumbers the descriptor. Host memory stays bounded whatever
//! the guest does (see [`Budget::DEFAULT`]): a listing over its cap is not kept (such a directory
//! is served by wasmtime-wasi call by call, as before), and a store keeps a bounded number of
//! listings and bytes, dropping the least recently used.
//!
//! A read of a listing costs what one wasmtime-wasi call costs (a `readdir` and two stats per
//! entry); a first read into a small buffer serves most directories, and a directory whose
//! listing does not fit is read a second time into one of the cap's size.

use wasmtime::{Caller, Extern, Linker};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p1::types::Errno;
use wasmtime_wasi::p1::wasi_snapshot_preview1 as p1;
use wasmtime_wasi::runtime::in_tokio;
use wiggle::{GuestMemory, GuestPtr};

/// Size of a preview-1 `dirent` header: `d_next` u64, `d_ino` u64, `d_namlen` u32, `d_type`
/// u8, three bytes of padding.
const DIRENT_HEADER: usize = 24;

/// Bounds on the host memory a store's listings take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Budget {
    /// Bytes of the first read of a listing.
    pub first_read: usize,
    /// The largest listing kept, in bytes of preview-1 dirents.
    pub max_listing: usize,
    /// How many listings a store keeps at most (one per descriptor being read).
    pub max_kept: usize,
    /// How many bytes of listings (dirents and index) a store keeps at most.
    pub max_kept_bytes: usize,
}

impl Budget {
    /// 128 KiB first reads (about 3,000 entries with 20-byte names); listings of up to 32 MiB
    /// (about 400,000 entries with 60-byte names), at most 8 of them and 48 MiB in all.
    pub const DEFAULT: Budget = Budget {
        first_read: 128 << 10,
        max_listing: 32 << 20,
        max_kept: 8,
        max_kept_bytes: 48 << 20,
    };
}

/// One directory listing as wasmtime-wasi wrote it at cookie 0: preview-1 dirents back to back.
#[derive(Debug)]
struct Listing {
    bytes: Vec<u8>,
    /// Offset in `bytes` of entry i, which cookie i resumes at (entry i's `d_next` is i + 1).
    starts: Vec<u32>,
}

impl Listing {
    /// Indexes the dirents in `bytes`; `None` when they do not parse (a header or a name cut
    /// short, which a complete listing never has).
    fn parse(bytes: Vec<u8>) -> Option<Listing> {
        let mut starts = Vec::new();
        let mut at = 0usize;
        while at < bytes.len() {
            let header = bytes.get(at..at.checked_add(DIRENT_HEADER)?)?;
            let namlen = u32::from_le_bytes(header[16..20].try_into().ok()?) as usize;
            let next = at.checked_add(DIRENT_HEADER)?.checked_add(namlen)?;
            if next > bytes.len() {
                return None;
            }
            starts.push(u32::try_from(at).ok()?);
            at = next;
        }
        Some(Listing { bytes, starts })
    }

    /// The dirents from cookie `cookie` on (empty past the end), as wasmtime-wasi would write
    /// them before cutting them to the guest's buffer.
    fn after_cookie(&self, cookie: u64) -> Result<&[u8], Errno> {
        let i = usize::try_from(cookie).map_err(|_| Errno::Overflow)?;
        let start = self.starts.get(i).map_or(self.bytes.len(), |&s| s as usize);
        Ok(&self.bytes[start..])
    }

    fn size(&self) -> usize {
        self.bytes.len() + self.starts.len() * size_of::<u32>()
    }
}

/// The listings a store keeps, by guest descriptor.
#[derive(Debug)]
pub struct Listings {
    kept: Vec<Kept>,
    /// Counts uses, to find the least recently used listing.
    clock: u64,
    budget: Budget,
}

impl Default for Listings {
    fn default() -> Listings {
        Listings::with_budget(Budget::DEFAULT)
    }
}

#[derive(Debug)]
struct Kept {
    fd: u32,
    listing: Listing,
    used: u64,
}

impl Listings {
    pub(crate) fn with_budget(budget: Budget) -> Listings {
        Listings {
            kept: Vec::new(),
            clock: 0,
            budget,
        }
    }

    /// Takes the listing kept for `fd` out (`keep` puts it back).
    fn take(&mut self, fd: u32) -> Option<Listing> {
        let i = self.kept.iter().position(|k| k.fd == fd)?;
        Some(self.kept.swap_remove(i).listing)
    }

    fn forget(&mut self, fd: u32) {
        self.kept.retain(|k| k.fd != fd);
    }

    fn keep(&mut self, fd: u32, mut listing: Listing) {
        self.forget(fd);
        listing.bytes.shrink_to_fit();
        let size = listing.size();
        if size > self.budget.max_kept_bytes {
            return;
        }
        while self.kept.len() >= self.budget.max_kept
            || self.kept.iter().map(|k| k.listing.size()).sum::<usize>() + size
                > self.budget.max_kept_bytes
        {
            let Some(oldest) = self
                .kept
                .iter()
                .enumerate()
                .min_by_key(|(_, k)| k.used)
                .map(|(i, _)| i)
            else {
                break;
            };
            self.kept.swap_remove(oldest);
        }
        self.clock += 1;
        self.kept.push(Kept {
            fd,
            listing,
            used: self.clock,
        });
    }

    /// Number of listings kept (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.kept.len()
    }
}

/// What reading a whole listing gave.
enum Read {
    Listing(Listing),
    /// wasmtime-wasi refused the call with this errno (a bad or non-directory descriptor...).
    Errno(i32),
    /// Over the budget's `max_listing` bytes, or unparsable: serve the call through
    /// wasmtime-wasi.
    NotKept,
}

/// Asks wasmtime-wasi for the whole listing of guest descriptor `fd` at cookie 0, into host
/// memory: a first small read, then one of `max_listing` bytes if that was not enough. That
/// buffer is allocated zeroed, which glibc (like most allocators) serves at this size from
/// fresh zero pages: only the pages written take memory.
fn read_listing(wasi: &mut WasiP1Ctx, budget: Budget, fd: i32) -> wasmtime::Result<Read> {
    let first = budget.first_read.min(budget.max_listing);
    let caps: &[usize] = if first < budget.max_listing {
        &[first, budget.max_listing]
    } else {
        &[first]
    };
    for &cap in caps {
        // The listing at 0..cap, the byte count wasmtime-wasi returns (aligned) after it.
        let at = cap.next_multiple_of(4);
        let (Ok(len), Ok(used_at)) = (i32::try_from(cap), i32::try_from(at)) else {
            break;
        };
        let mut buf = vec![0u8; at + 4];
        let errno = {
            let mut mem = GuestMemory::Unshared(&mut buf);
            in_tokio(p1::fd_readdir(wasi, &mut mem, fd, 0, len, 0, used_at))?
        };
        if errno != 0 {
            return Ok(Read::Errno(errno));
        }
        let used = u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
        let used = used as usize;
        if used < cap {
            buf.truncate(used);
            return Ok(match Listing::parse(buf) {
                Some(l) => Read::Listing(l),
                None => Read::NotKept,
            });
        }
    }
    Ok(Read::NotKept)
}

/// `fd_readdir(fd, buf, buf_len, cookie, bufused) -> errno`, served from kept listings.
#[allow(clippy::too_many_arguments)] // the preview-1 signature, plus the context
fn fd_readdir(
    wasi: &mut WasiP1Ctx,
    listings: &mut Listings,
    mem: &mut GuestMemory<'_>,
    fd: i32,
    buf: i32,
    buf_len: i32,
    cookie: i64,
    bufused: i32,
) -> wasmtime::Result<i32> {
    let key = fd as u32;
    let kept = listings.take(key).filter(|_| cookie != 0);
    let listing = match kept {
        Some(l) => l,
        None => match read_listing(wasi, listings.budget, fd)? {
            Read::Listing(l) => l,
            Read::Errno(e) => return Ok(e),
            Read::NotKept => {
                return in_tokio(p1::fd_readdir(wasi, mem, fd, buf, buf_len, cookie, bufused));
            }
        },
    };
    let rest = match listing.after_cookie(cookie as u64) {
        Ok(r) => r,
        Err(e) => return Ok(e as i32),
    };
    let cap = buf_len as u32 as usize;
    let n = cap.min(rest.len());
    let wrote = n as u32;
    // Out-of-bounds or misaligned pointers trap, as in wasmtime-wasi.
    mem.copy_from_slice(&rest[..n], GuestPtr::<u8>::new(buf as u32).as_array(wrote))
        .map_err(wasmtime::Error::new)?;
    mem.write(GuestPtr::<u32>::new(bufused as u32), wrote)
        .map_err(wasmtime::Error::new)?;
    // A full buffer tells the guest to read on; a short one that it has seen the end (it then
    // starts again at cookie 0, if ever), so only then is the listing dropped.
    if n == cap {
        listings.keep(key, listing);
    }
    Ok(0)
}

/// Runs `f` with the guest's memory and the store's data, like wiggle's generated imports.
fn with_memory<T, R>(
    caller: &mut Caller<'_, T>,
    f: impl FnOnce(&mut GuestMemory<'_>, &mut T) -> wasmtime::Result<R>,
) -> wasmtime::Result<R> {
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => {
            let (mem, data) = m.data_and_store_mut(&mut *caller);
            f(&mut GuestMemory::Unshared(mem), data)
        }
        Some(Extern::SharedMemory(m)) => f(&mut GuestMemory::Shared(m.data()), caller.data_mut()),
        _ => Err(wasmtime::Error::msg("missing required memory export")),
    }
}

/// Replaces wasmtime-wasi's `fd_readdir` in `linker` (which must already hold the preview-1
/// imports) with the linear one above, and its `fd_close` and `fd_renumber` with versions that
/// also drop the listing kept for the descriptors they close. `get` gives the store data's
/// WASI context and listings.
pub(crate) fn add_to_linker<T: 'static>(
    linker: &mut Linker<T>,
    get: fn(&mut T) -> (&mut WasiP1Ctx, &mut Listings),
) -> wasmtime::Result<()> {
    const M: &str = "wasi_snapshot_preview1";
    linker.allow_shadowing(true);
    linker.func_wrap(
        M,
        "fd_readdir",
        move |mut caller: Caller<'_, T>,
              fd: i32,
              buf: i32,
              buf_len: i32,
              cookie: i64,
              bufused: i32|
              -> wasmtime::Result<i32> {
            with_memory(&mut caller, |mem, data| {
                let (wasi, listings) = get(data);
                fd_readdir(wasi, listings, mem, fd, buf, buf_len, cookie, bufused)
            })
        },
    )?;
    linker.func_wrap(
        M,
        "fd_close",
        move |mut caller: Caller<'_, T>, fd: i32| -> wasmtime::Result<i32> {
            with_memory(&mut caller, |mem, data| {
                let (wasi, listings) = get(data);
                listings.forget(fd as u32);
                in_tokio(p1::fd_close(wasi, mem, fd))
            })
        },
    )?;
    linker.func_wrap(
        M,
        "fd_renumber",
        move |mut caller: Caller<'_, T>, from: i32, to: i32| -> wasmtime::Result<i32> {
            with_memory(&mut caller, |mem, data| {
                let (wasi, listings) = get(data);
                listings.forget(from as u32);
                listings.forget(to as u32);
                in_tokio(p1::fd_renumber(wasi, mem, from, to))
            })
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    //! The cookie protocol against wasmtime-wasi's own `fd_readdir`: a guest linked with
    //! wasmtime-wasi alone and one linked with this module read the same directories through
    //! the same calls, and get the same bytes.

    use std::collections::BTreeSet;
    use std::path::Path;
    use std::sync::OnceLock;

    use proptest::prelude::*;
    use wasmtime::{Engine, Module, Store, TypedFunc};
    use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

    use super::*;

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
    const USED: u32 = 8;
    const PATH: u32 = 1024;
    const BUF: u32 = 4096;
    const MEM: u32 = 8 << 16;

    struct Data {
        wasi: WasiP1Ctx,
        listings: Listings,
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
    struct Guest {
        store: Store<Data>,
        memory: wasmtime::Memory,
        readdir: TypedFunc<(i32, i32, i32, i64, i32), i32>,
        close: TypedFunc<i32, i32>,
        renumber: TypedFunc<(i32, i32), i32>,
        open: TypedFunc<(i32, i32, i32), i32>,
    }

    /// What one `fd_readdir` call did: its errno, the byte count it reported (None when not
    /// written), and the bytes of its buffer (and 16 more) after the call.
    #[derive(PartialEq, Eq)]
    struct Call {
        errno: i32,
        used: Option<u32>,
        region: Vec<u8>,
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
        fn new(root: &Path, budget: Option<Budget>) -> Guest {
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

        fn kept(&self) -> usize {
            self.store.data().listings.len()
        }

        /// `fd_readdir(fd, BUF, len, cookie, USED)`; `Err` when it trapped.
        fn try_readdir_at(
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

        fn readdir(&mut self, fd: i32, len: u32, cookie: u64) -> Call {
            self.try_readdir_at(fd, BUF, len, cookie, USED).unwrap()
        }

        /// Opens `path` (relative to the root) and returns the new descriptor, or the errno.
        fn open(&mut self, path: &str, dir: bool) -> Result<i32, i32> {
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

        fn close(&mut self, fd: i32) -> i32 {
            self.close.call(&mut self.store, fd).unwrap()
        }

        fn renumber(&mut self, from: i32, to: i32) -> i32 {
            self.renumber.call(&mut self.store, (from, to)).unwrap()
        }

        /// Reads a whole listing the way wasi-libc's `readdir` does: from cookie 0, resuming
        /// at the `d_next` of the last whole entry, doubling the buffer when not even one entry
        /// fits, until a call fills less than its buffer.
        fn walk(&mut self, fd: i32, mut len: u32) -> Vec<Entry> {
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
    struct Pair {
        theirs: Guest,
        ours: Guest,
    }

    impl Pair {
        fn new(root: &Path, budget: Budget) -> Pair {
            Pair {
                theirs: Guest::new(root, None),
                ours: Guest::new(root, Some(budget)),
            }
        }

        fn readdir(&mut self, fd: i32, len: u32, cookie: u64) -> Call {
            let o = self.ours.readdir(fd, len, cookie);
            let t = self.theirs.readdir(fd, len, cookie);
            assert_eq!(
                o, t,
                "fd_readdir of fd {fd} with {len} bytes at cookie {cookie}"
            );
            o
        }

        fn open(&mut self, path: &str, dir: bool) -> i32 {
            let fd = self.ours.open(path, dir).unwrap();
            assert_eq!(self.theirs.open(path, dir), Ok(fd), "open {path}");
            fd
        }

        fn close(&mut self, fd: i32) {
            assert_eq!(self.ours.close(fd), 0);
            assert_eq!(self.theirs.close(fd), 0);
        }

        fn renumber(&mut self, from: i32, to: i32) {
            assert_eq!(self.ours.renumber(from, to), 0);
            assert_eq!(self.theirs.renumber(from, to), 0);
        }

        fn walk(&mut self, fd: i32, len: u32) -> Vec<Entry> {
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
    struct Entry {
        name: Vec<u8>,
        d_next: u64,
        d_ino: u64,
        d_type: u8,
    }

    /// The whole dirents in `bytes`, and whether a cut one follows them.
    fn decode(bytes: &[u8]) -> (Vec<Entry>, bool) {
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
    fn name(i: usize, len: usize) -> String {
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
    fn fill(dir: &Path, n: usize) {
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
    fn host_names(dir: &Path) -> BTreeSet<Vec<u8>> {
        let mut names: BTreeSet<Vec<u8>> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_encoded_bytes())
            .collect();
        names.insert(b".".to_vec());
        names.insert(b"..".to_vec());
        names
    }

    fn names(entries: &[Entry]) -> BTreeSet<Vec<u8>> {
        entries.iter().map(|e| e.name.clone()).collect()
    }

    /// Buffer sizes that end inside a header, right after one, inside a name, and fit all.
    const LENS: [u32; 10] = [0, 1, 23, 24, 25, 30, 48, 4096, 65_536, MEM - BUF];

    fn cookies(entries: usize) -> Vec<u64> {
        let n = entries as u64;
        let mut c = vec![0, 1, 2, 3, 4, 57, n / 2, n - 1, n, n + 1, n + 7, u64::MAX];
        c.retain(|&c| c <= n + 7 || c == u64::MAX);
        c.sort();
        c.dedup();
        c
    }

    /// Checks that every call of `calls` on `dir` gets wasmtime-wasi's answer.
    fn same_answers(root: &Path, dir: &str, budget: Budget, calls: &[(u32, u64)]) {
        let mut p = Pair::new(root, budget);
        let fd = p.open(dir, true);
        for &(len, cookie) in calls {
            p.readdir(fd, len, cookie);
        }
        assert!(p.ours.kept() <= budget.max_kept);
    }

    #[test]
    fn every_cookie_and_buffer_size_gets_wasmtime_wasis_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        fill(&tmp.path().join("one"), 1);
        fill(&tmp.path().join("empty"), 0);
        fill(&tmp.path().join("many"), 150);
        // Listings of "many" (about 23 KB) are read once (default), read twice (over a small
        // first read) or not kept at all (over the cap: every call goes to wasmtime-wasi).
        let two_reads = Budget {
            first_read: 4096,
            ..Budget::DEFAULT
        };
        let not_kept = Budget {
            first_read: 100,
            max_listing: 2_000,
            max_kept: 1,
            max_kept_bytes: 2_000,
        };
        for (dir, count) in [("empty", 2), ("one", 3), ("many", 152)] {
            for budget in [Budget::DEFAULT, two_reads, not_kept] {
                let mut calls = Vec::new();
                for len in LENS {
                    calls.extend(cookies(count).into_iter().map(|c| (len, c)));
                }
                same_answers(tmp.path(), dir, budget, &calls);
            }
        }
    }

    #[test]
    fn a_walk_lists_every_entry_once_with_its_type() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        fill(&dir, 200);
        let mut p = Pair::new(tmp.path(), Budget::DEFAULT);
        let fd = p.open("d", true);
        // 64 bytes cannot hold the longest entries: the walk grows its buffer like wasi-libc.
        for len in [4096, 64] {
            let walked = p.walk(fd, len);
            assert_eq!(walked.len(), 202);
            assert_eq!(names(&walked), host_names(&dir));
            for (i, e) in walked.iter().enumerate() {
                assert_eq!(e.d_next, i as u64 + 1);
                let want = match e.name.as_slice() {
                    b"." | b".." => 3,
                    n => {
                        let t =
                            std::fs::symlink_metadata(dir.join(std::str::from_utf8(n).unwrap()))
                                .unwrap()
                                .file_type();
                        if t.is_symlink() {
                            7
                        } else if t.is_dir() {
                            3
                        } else {
                            4
                        }
                    }
                };
                assert_eq!(e.d_type, want, "{:?}", String::from_utf8_lossy(&e.name));
            }
            assert_eq!(p.ours.kept(), 0, "a listing read to its end is dropped");
        }
    }

    #[test]
    fn a_listing_in_progress_is_a_snapshot_and_cookie_zero_sees_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        fill(&dir, 400);
        let before = host_names(&dir);
        let mut g = Guest::new(tmp.path(), Some(Budget::DEFAULT));
        let fd = g.open("d", true).unwrap();
        let first = g.readdir(fd, 4096, 0);
        let (mut seen, _) = decode(&first.region[..first.used.unwrap() as usize]);
        assert_eq!(g.kept(), 1);
        // Entries already returned and entries still to come disappear, new ones appear.
        let mut victims: Vec<Vec<u8>> = seen
            .iter()
            .skip(2)
            .take(5)
            .map(|e| e.name.clone())
            .collect();
        victims.extend(before.iter().rev().take(5).cloned());
        for v in &victims {
            let p = dir.join(std::str::from_utf8(v).unwrap());
            if p.is_dir() && !p.is_symlink() {
                std::fs::remove_dir(&p).unwrap();
            } else {
                std::fs::remove_file(&p).unwrap();
            }
        }
        for i in 0..50 {
            std::fs::write(dir.join(format!("new-{i}")), b"").unwrap();
        }
        let mut cookie = seen.last().unwrap().d_next;
        loop {
            let c = g.readdir(fd, 4096, cookie);
            let used = c.used.unwrap_or(0);
            let (more, _) = decode(&c.region[..used as usize]);
            cookie = more.last().map_or(cookie, |e| e.d_next);
            seen.extend(more);
            if used < 4096 {
                break;
            }
        }
        assert_eq!(seen.len(), before.len(), "no entry repeated or lost");
        assert_eq!(names(&seen), before);
        // Starting again at cookie 0 lists the directory as it is now.
        let now = g.walk(fd, 4096);
        assert_eq!(names(&now), host_names(&dir));
        assert_eq!(now.len(), before.len() - victims.len() + 50);

        // So does a rewind in the middle of a listing (wasi-libc's `rewinddir`).
        let mut theirs = Guest::new(tmp.path(), None);
        assert_eq!(theirs.open("d", true), Ok(fd));
        g.readdir(fd, 4096, 0);
        g.readdir(fd, 4096, 9);
        assert_eq!(g.kept(), 1);
        for i in 0..20 {
            std::fs::write(dir.join(format!("newer-{i}")), b"").unwrap();
        }
        assert_eq!(g.readdir(fd, 4096, 0), theirs.readdir(fd, 4096, 0));
        let again = g.walk(fd, 4096);
        assert_eq!(names(&again), host_names(&dir));
        assert_eq!(again.len(), now.len() + 20);
    }

    #[test]
    fn closing_or_renumbering_a_descriptor_drops_its_listing() {
        let tmp = tempfile::tempdir().unwrap();
        fill(&tmp.path().join("a"), 300);
        fill(&tmp.path().join("b"), 250);
        let mut p = Pair::new(tmp.path(), Budget::DEFAULT);

        // `a` read partly, closed; `b` opened gets the same number and is read from cookie 7.
        let fa = p.open("a", true);
        p.readdir(fa, 4096, 0);
        assert_eq!(p.ours.kept(), 1);
        p.close(fa);
        assert_eq!(p.ours.kept(), 0);
        let fb = p.open("b", true);
        assert_eq!(fb, fa, "the lowest free descriptor is reused");
        let b7 = p.readdir(fb, 4096, 7);
        let (entries, _) = decode(&b7.region[..b7.used.unwrap() as usize]);
        assert!(!entries.is_empty());
        assert!(
            entries.iter().all(|e| e.name.starts_with(b"b-")),
            "{entries:?}"
        );

        // `a` again, read partly; renumbered over `b`: reads of the old number fail, reads of
        // the new one list `a`.
        let fa = p.open("a", true);
        p.readdir(fa, 4096, 0);
        p.readdir(fb, 4096, 0);
        assert_eq!(p.ours.kept(), 2);
        p.renumber(fa, fb);
        assert_eq!(p.ours.kept(), 0);
        assert_eq!(p.readdir(fa, 4096, 5).errno, Errno::Badf as i32);
        p.readdir(fb, 4096, 5);
        p.walk(fb, 4096);
    }

    #[test]
    fn bad_descriptors_and_bad_pointers_fail_as_in_wasmtime_wasi() {
        let tmp = tempfile::tempdir().unwrap();
        fill(&tmp.path().join("d"), 30);
        std::fs::write(tmp.path().join("f"), b"data").unwrap();
        let mut theirs = Guest::new(tmp.path(), None);
        let mut ours = Guest::new(tmp.path(), Some(Budget::DEFAULT));
        let file = ours.open("f", false).unwrap();
        assert_eq!(theirs.open("f", false), Ok(file));
        for fd in [file, 0, 1, 99, -1] {
            for cookie in [0, 3] {
                let o = ours.readdir(fd, 4096, cookie);
                assert_ne!(o.errno, 0, "fd {fd}");
                assert_eq!(o, theirs.readdir(fd, 4096, cookie), "fd {fd}");
            }
        }
        let fd = ours.open("d", true).unwrap();
        assert_eq!(theirs.open("d", true), Ok(fd));
        // A buffer past the end of memory, a byte count out of bounds or misaligned: a trap
        // (an empty buffer past the end is never written to: no trap, in both).
        for (buf, len, used_at, traps) in [
            (MEM - 10, 4096, USED, true),
            (MEM + 10, 0, USED, false),
            (BUF, 100, MEM - 2, true),
            (BUF, 100, USED + 1, true),
        ] {
            for cookie in [0, 2, 0] {
                let o = ours.try_readdir_at(fd, buf, len, cookie, used_at);
                let t = theirs.try_readdir_at(fd, buf, len, cookie, used_at);
                let what = format!("buffer {buf}+{len}, count at {used_at}, cookie {cookie}");
                assert_eq!(o.is_err(), traps, "{what}: {o:?}");
                assert_eq!(t.is_err(), traps, "{what}: {t:?}");
                if !traps {
                    assert_eq!(o.unwrap(), t.unwrap(), "{what}");
                }
                // A trap ends the instance's call, not the instance: start over for the next.
                ours = Guest::new(tmp.path(), Some(Budget::DEFAULT));
                theirs = Guest::new(tmp.path(), None);
                assert_eq!(ours.open("f", false), Ok(file));
                assert_eq!(theirs.open("f", false), Ok(file));
                assert_eq!(ours.open("d", true), Ok(fd));
                assert_eq!(theirs.open("d", true), Ok(fd));
            }
        }
    }

    #[test]
    fn kept_listings_stay_within_the_budget() {
        let tmp = tempfile::tempdir().unwrap();
        // Listings of about 3 KB, and one of about 18 KB.
        for d in ["a", "b", "c", "d"] {
            fill(&tmp.path().join(d), 20);
        }
        fill(&tmp.path().join("big"), 120);
        let budget = Budget {
            first_read: 512,
            max_listing: 8 << 10,
            max_kept: 2,
            max_kept_bytes: 7 << 10,
        };
        let mut p = Pair::new(tmp.path(), budget);
        let fds: Vec<i32> = ["a", "b", "c", "d", "big"]
            .into_iter()
            .map(|d| p.open(d, true))
            .collect();
        // Every listing started, then each continued: evicted ones are read again.
        for round in 0..3u64 {
            for &fd in &fds {
                let cookie = round * 9;
                p.readdir(fd, 200, cookie);
                assert!(p.ours.kept() <= 2);
                let bytes: usize = p
                    .ours
                    .store
                    .data()
                    .listings
                    .kept
                    .iter()
                    .map(|k| k.listing.size())
                    .sum();
                assert!(bytes <= budget.max_kept_bytes, "{bytes} bytes kept");
            }
        }
        // `big` (over `max_listing`) is served call by call and never kept.
        let big = *fds.last().unwrap();
        p.walk(big, 300);
        assert!(
            !p.ours
                .store
                .data()
                .listings
                .kept
                .iter()
                .any(|k| k.fd == big as u32)
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Any sequence of calls (any cookie, any buffer size), under any budget, gets
        /// wasmtime-wasi's answers.
        #[test]
        fn any_call_sequence_gets_wasmtime_wasis_answers(
            calls in prop::collection::vec(
                (prop_oneof![0u32..64, 0u32..2_000, Just(4096u32)],
                 prop_oneof![0u64..50, Just(0u64), any::<u64>()]),
                1..24),
            first_read in 1usize..4_000,
            max_listing in 1usize..8_000,
            max_kept in 1usize..4,
            max_kept_bytes in 1usize..8_000,
        ) {
            static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
            let tmp = DIR.get_or_init(|| {
                let tmp = tempfile::tempdir().unwrap();
                fill(&tmp.path().join("d"), 30);
                tmp
            });
            let budgets = [
                Budget::DEFAULT,
                Budget { first_read, max_listing, max_kept, max_kept_bytes },
            ];
            for budget in budgets {
                same_answers(tmp.path(), "d", budget, &calls);
            }
        }
    }
}
