//! Counting the bytes the guest writes to files, for `Sandbox::metrics`: dormant shadows
//! `wasi_snapshot_preview1.fd_write` and `fd_pwrite` with versions that call wasmtime-wasi's
//! own and add the byte count it returned to the store's [`Host::written`] when the
//! descriptor is past stdio (0-2 are the captured streams, not files).

use wasmtime::{Caller, Linker};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p1::wasi_snapshot_preview1 as p1;
use wasmtime_wasi::runtime::in_tokio;
use wiggle::{GuestMemory, GuestPtr};

use crate::host::Host;
use crate::readdir::with_memory;

/// The first descriptor that is not stdin, stdout or stderr.
const FIRST_FILE_FD: i32 = 3;

/// Adds the count wasmtime-wasi wrote at `nwritten` to `written`, if the call succeeded on a
/// file descriptor. A pointer the guest made invalid is not counted (the call already
/// returned; the guest sees its own error).
fn count(mem: &GuestMemory<'_>, written: &mut u64, fd: i32, errno: i32, nwritten: i32) {
    if errno == 0
        && fd >= FIRST_FILE_FD
        && let Ok(n) = mem.read(GuestPtr::<u32>::new(nwritten as u32))
    {
        *written += u64::from(n);
    }
}

/// Runs wasmtime-wasi's write `call` on the guest's memory (through [`with_memory`], which
/// hands the context its hostcall fuel) and counts what it wrote at `nwritten` to descriptor
/// `fd`: the one body of both shadows.
fn counted(
    caller: &mut Caller<'_, Host>,
    fd: i32,
    nwritten: i32,
    call: impl FnOnce(&mut WasiP1Ctx, &mut GuestMemory<'_>) -> wasmtime::Result<i32>,
) -> wasmtime::Result<i32> {
    with_memory(
        caller,
        |h: &mut Host| &mut h.wasi,
        |mem, h: &mut Host| {
            let errno = call(&mut h.wasi, mem)?;
            count(mem, &mut h.written, fd, errno, nwritten);
            Ok(errno)
        },
    )
}

/// Replaces wasmtime-wasi's `fd_write` and `fd_pwrite` in `linker` (which must already hold
/// the preview-1 imports) with versions that count what they wrote to files.
pub(crate) fn add_to_linker(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    const M: &str = "wasi_snapshot_preview1";
    linker.allow_shadowing(true);
    linker.func_wrap(
        M,
        "fd_write",
        |mut caller: Caller<'_, Host>,
         fd: i32,
         iovs: i32,
         iovs_len: i32,
         nwritten: i32|
         -> wasmtime::Result<i32> {
            counted(&mut caller, fd, nwritten, |wasi, mem| {
                in_tokio(p1::fd_write(wasi, mem, fd, iovs, iovs_len, nwritten))
            })
        },
    )?;
    linker.func_wrap(
        M,
        "fd_pwrite",
        |mut caller: Caller<'_, Host>,
         fd: i32,
         iovs: i32,
         iovs_len: i32,
         offset: i64,
         nwritten: i32|
         -> wasmtime::Result<i32> {
            counted(&mut caller, fd, nwritten, |wasi, mem| {
                in_tokio(p1::fd_pwrite(
                    wasi, mem, fd, iovs, iovs_len, offset, nwritten,
                ))
            })
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}
