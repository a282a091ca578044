//! The host calls: `fd_readdir` served from the kept listings (a whole listing is read once,
//! through wasmtime-wasi's own `fd_readdir` at cookie 0), `fd_close` and `fd_renumber` that
//! also drop the listings of the descriptors they close, and [`add_to_linker`], which puts the
//! three over wasmtime-wasi's in a linker.

use wasmtime::{AsContextMut, Caller, Extern, Linker};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p1::wasi_snapshot_preview1::{self as p1, WasiSnapshotPreview1};
use wasmtime_wasi::runtime::in_tokio;
use wiggle::{GuestMemory, GuestPtr};

use super::cache::{Budget, Listings};
use super::dirents::Listing;

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

/// Runs `f` with the guest's memory and the store's data, as wiggle's generated imports do,
/// including the hand-over of the store's hostcall fuel to the WASI context (`wasi` finds it
/// in the store's data): wasmtime-wasi checks what a call copies out of the guest (a write's
/// iovecs and buffers, a path) against that fuel and answers ENOMEM past it, and a context
/// that never got any (a fresh one, as after a resume) has none. Every shadowing import goes
/// through here, so none can call wasmtime-wasi without it.
pub(crate) fn with_memory<T, R>(
    caller: &mut Caller<'_, T>,
    wasi: impl FnOnce(&mut T) -> &mut WasiP1Ctx,
    f: impl FnOnce(&mut GuestMemory<'_>, &mut T) -> wasmtime::Result<R>,
) -> wasmtime::Result<R> {
    let fuel = caller.as_context_mut().hostcall_fuel();
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => {
            let (mem, data) = m.data_and_store_mut(&mut *caller);
            wasi(data).set_hostcall_fuel(fuel);
            f(&mut GuestMemory::Unshared(mem), data)
        }
        Some(Extern::SharedMemory(m)) => {
            let data = caller.data_mut();
            wasi(data).set_hostcall_fuel(fuel);
            f(&mut GuestMemory::Shared(m.data()), data)
        }
        _ => Err(wasmtime::Error::msg("missing required memory export")),
    }
}

/// [`with_memory`] for the imports below: `f` gets the guest's memory and the store data's
/// WASI context and listings, as `get` gives them.
fn with_listings<T, R>(
    caller: &mut Caller<'_, T>,
    get: fn(&mut T) -> (&mut WasiP1Ctx, &mut Listings),
    f: impl FnOnce(&mut GuestMemory<'_>, &mut WasiP1Ctx, &mut Listings) -> wasmtime::Result<R>,
) -> wasmtime::Result<R> {
    with_memory(
        caller,
        |d| get(d).0,
        |mem, data| {
            let (wasi, listings) = get(data);
            f(mem, wasi, listings)
        },
    )
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
            with_listings(&mut caller, get, |mem, wasi, listings| {
                fd_readdir(wasi, listings, mem, fd, buf, buf_len, cookie, bufused)
            })
        },
    )?;
    linker.func_wrap(
        M,
        "fd_close",
        move |mut caller: Caller<'_, T>, fd: i32| -> wasmtime::Result<i32> {
            with_listings(&mut caller, get, |mem, wasi, listings| {
                listings.forget(fd as u32);
                in_tokio(p1::fd_close(wasi, mem, fd))
            })
        },
    )?;
    linker.func_wrap(
        M,
        "fd_renumber",
        move |mut caller: Caller<'_, T>, from: i32, to: i32| -> wasmtime::Result<i32> {
            with_listings(&mut caller, get, |mem, wasi, listings| {
                listings.forget(from as u32);
                listings.forget(to as u32);
                in_tokio(p1::fd_renumber(wasi, mem, from, to))
            })
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}
