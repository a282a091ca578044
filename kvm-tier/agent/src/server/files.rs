//! The file operations: `read_file` (at most one frame's payload), `write_file` (atomic by a
//! rename unless appending), `list`, `remove`, `exists`, `mkdir`.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use super::reply::{Failure, OpResult, ok};
use crate::proto::{Entry, MAX_DATA, Response, error_kind};

pub(super) fn check_path(path: &str) -> Result<(), Failure> {
    if path.is_empty() {
        return Err(Failure::reply(error_kind::INVALID, "empty path"));
    }
    if path.contains('\0') {
        return Err(Failure::reply(error_kind::INVALID, "path contains NUL"));
    }
    Ok(())
}

pub(super) fn read_file(path: &str) -> OpResult {
    check_path(path)?;
    let file = File::open(path).map_err(|e| Failure::io(path, &e))?;
    let meta = file.metadata().map_err(|e| Failure::io(path, &e))?;
    if meta.is_dir() {
        return Err(Failure::reply(
            error_kind::INVALID,
            format!("{path}: is a directory"),
        ));
    }
    let too_large = || {
        Failure::reply(
            error_kind::INVALID,
            format!("{path}: larger than {MAX_DATA} bytes (the frame cap)"),
        )
    };
    if meta.len() > MAX_DATA as u64 {
        return Err(too_large());
    }
    let mut data = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_DATA as u64 + 1)
        .read_to_end(&mut data)
        .map_err(|e| Failure::io(path, &e))?;
    if data.len() > MAX_DATA {
        return Err(too_large());
    }
    Ok((Response::Data {}, data))
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

pub(super) fn write_file(path: &str, mode: Option<u32>, append: bool, data: &[u8]) -> OpResult {
    check_path(path)?;
    let target = Path::new(path);
    if let Some(parent) = target.parent()
        && !parent.as_os_str().is_empty()
    {
        fs::create_dir_all(parent).map_err(|e| Failure::io(path, &e))?;
    }
    if append {
        let mut file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(mode.unwrap_or(0o644))
            .open(target)
            .map_err(|e| Failure::io(path, &e))?;
        if let Some(m) = mode {
            file.set_permissions(Permissions::from_mode(m))
                .map_err(|e| Failure::io(path, &e))?;
        }
        file.write_all(data).map_err(|e| Failure::io(path, &e))?;
        if matches!(path, "/dev/urandom" | "/dev/random") {
            reseed_crng(&file);
        }
        return ok(Response::Ok {});
    }
    let Some(name) = target.file_name() else {
        return Err(Failure::reply(
            error_kind::INVALID,
            format!("{path}: not a file path"),
        ));
    };
    // Keep an existing file's permissions unless told otherwise.
    let mode = mode.or_else(|| fs::metadata(target).ok().map(|m| m.permissions().mode()));
    let tmp_name = format!(
        ".{}.agent-tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let tmp = target.with_file_name(tmp_name);
    let result = (|| -> io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        if let Some(m) = mode {
            file.set_permissions(Permissions::from_mode(m))?;
        }
        file.write_all(data)?;
        drop(file);
        fs::rename(&tmp, target)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(Failure::io(path, &e));
    }
    ok(Response::Ok {})
}

pub(super) fn list(path: &str) -> OpResult {
    check_path(path)?;
    let mut list = Vec::new();
    for entry in fs::read_dir(path).map_err(|e| Failure::io(path, &e))? {
        let entry = entry.map_err(|e| Failure::io(path, &e))?;
        // Follow symlinks; a dangling one is described by the link itself.
        let meta = fs::metadata(entry.path()).or_else(|_| entry.metadata());
        let (is_dir, size) = meta.map_or((false, 0), |m| (m.is_dir(), m.len()));
        list.push(Entry {
            name: entry.file_name().to_string_lossy().into_owned(),
            is_dir,
            size,
        });
    }
    list.sort_by(|a, b| a.name.cmp(&b.name));
    ok(Response::Entries { list })
}

pub(super) fn remove(path: &str, recursive: bool) -> OpResult {
    check_path(path)?;
    let meta = fs::symlink_metadata(path).map_err(|e| Failure::io(path, &e))?;
    let result = if meta.is_dir() {
        if recursive {
            fs::remove_dir_all(path)
        } else {
            fs::remove_dir(path)
        }
    } else {
        fs::remove_file(path)
    };
    result.map_err(|e| Failure::io(path, &e))?;
    ok(Response::Ok {})
}

pub(super) fn exists(path: &str) -> OpResult {
    check_path(path)?;
    match Path::new(path).try_exists() {
        Ok(value) => ok(Response::Exists { value }),
        Err(e) => Err(Failure::io(path, &e)),
    }
}

pub(super) fn mkdir(path: &str) -> OpResult {
    check_path(path)?;
    fs::create_dir_all(path).map_err(|e| Failure::io(path, &e))?;
    ok(Response::Ok {})
}

/// `seed` written to `/dev/urandom` (mixed into the pool, no entropy credited), then the
/// CRNG reseeded from the pool.
pub(super) fn mix_entropy(seed: &[u8]) -> Result<(), Failure> {
    const DEV: &str = "/dev/urandom";
    let mut file = OpenOptions::new()
        .write(true)
        .open(DEV)
        .map_err(|e| Failure::io(DEV, &e))?;
    file.write_all(seed).map_err(|e| Failure::io(DEV, &e))?;
    reseed_crng(&file);
    Ok(())
}

/// Has the kernel reseed its CRNG from the input pool now (`ioctl(RNDRESEEDCRNG)`), so that
/// bytes just written to the random device change the very next reads: a write only mixes
/// them into the pool, which the CRNG takes in on its own schedule (up to a minute later), and
/// the host writes fresh entropy after every resume precisely so that forks of one snapshot
/// stop sharing random streams at once. Failure (an older kernel, no `CAP_SYS_ADMIN`) leaves
/// the schedule as it was.
fn reseed_crng(file: &File) {
    /// `_IO('R', 0x07)` of `linux/random.h`.
    const RNDRESEEDCRNG: u32 = 0x5207;
    // SAFETY: an ioctl that takes no argument, on a descriptor `file` keeps open.
    unsafe { libc::ioctl(file.as_raw_fd(), RNDRESEEDCRNG as _) };
}
