//! The guest system's state that the host sets or asks about: the wall clock and the entropy
//! pool (`set_time`, `refresh`, after a resume), mounts (`mount`, the virtio-fs volumes),
//! `sync`, and whether a local TCP port is open (`port_open`, a started server's readiness).

use std::fs;
use std::io;

use super::files::check_path;
use super::reply::{Failure, OpResult, ok};
use crate::proto::{MAX_REFRESH_SEED, Response, error_kind};

pub(super) fn sync() -> OpResult {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    ok(Response::Ok {})
}

pub(super) fn set_time(unix_ns: u64) -> OpResult {
    let ts = libc::timespec {
        tv_sec: (unix_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (unix_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `ts` is a valid timespec for the duration of the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        let e = io::Error::last_os_error();
        return Err(Failure::io("CLOCK_REALTIME", &e));
    }
    ok(Response::Ok {})
}

/// After a resume: `seed` mixed into the entropy pool (the CRNG reseeded from it), then the
/// wall clock set: `write_file` of `/dev/urandom` and `set_time` in one request.
pub(super) fn refresh(unix_ns: u64, seed: &[u8]) -> OpResult {
    if seed.len() > MAX_REFRESH_SEED {
        return Err(Failure::reply(
            error_kind::INVALID,
            format!(
                "{} bytes of entropy to mix; at most {MAX_REFRESH_SEED}",
                seed.len()
            ),
        ));
    }
    super::files::mix_entropy(seed)?;
    set_time(unix_ns)
}

/// Longest a `port_open` connection attempt waits.
const PORT_PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

pub(super) fn port_open(port: u16) -> OpResult {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    // Refused, unreachable or too slow to accept: not open (yet).
    let value = std::net::TcpStream::connect_timeout(&addr, PORT_PROBE_TIMEOUT).is_ok();
    ok(Response::Exists { value })
}

pub(super) fn mount(source: &str, target: &str, fstype: &str, read_only: bool) -> OpResult {
    check_path(target)?;
    fs::create_dir_all(target).map_err(|e| Failure::io(target, &e))?;
    sys_mount(source, target, fstype, read_only).map_err(|e| Failure::io(target, &e))?;
    ok(Response::Ok {})
}

/// `mount(2)`, `nosuid,nodev`, read-only if asked.
fn sys_mount(source: &str, target: &str, fstype: &str, read_only: bool) -> io::Result<()> {
    let c = |s: &str| {
        std::ffi::CString::new(s)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in an argument"))
    };
    let (source, target, fstype) = (c(source)?, c(target)?, c(fstype)?);
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
    if read_only {
        flags |= libc::MS_RDONLY;
    }
    // SAFETY: the three strings are valid NUL-terminated C strings for the whole call, and a
    // null `data` is allowed.
    let r = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
