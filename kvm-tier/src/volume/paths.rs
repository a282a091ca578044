//! Paths as the volume keeps them: relative to the volume's root, as raw bytes (`a/b/c`, the
//! root being the empty path), built only from single components a guest named. Every host
//! path is resolved from the root with [`beneath`], so none of these can lead outside it.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use rustix::fs::ResolveFlags;
use rustix::io::Errno;

use super::Res;

/// Longest path a volume state may hold (Linux's `PATH_MAX`).
pub(super) const MAX_PATH: usize = 4096;

/// The resolution every host path goes through.
pub(super) fn beneath() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS
}

/// Whether `path` is a relative path of valid components (`a/b/c`: no empty, `.` or `..`
/// component, no NUL, no leading `/`), the root being the empty path.
pub(super) fn valid_relative(path: &[u8]) -> bool {
    path.len() <= MAX_PATH
        && !path.contains(&0)
        && (path.is_empty() || path.split(|&b| b == b'/').all(|c| component(c).is_ok()))
}

/// A single path component from the guest: no `/`, not `.` or `..`, not empty.
pub(super) fn component(name: &[u8]) -> Res<&[u8]> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(Errno::INVAL);
    }
    if name.len() > 255 {
        return Err(Errno::NAMETOOLONG);
    }
    Ok(name)
}

pub(super) fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent.is_empty() {
        name.to_vec()
    } else {
        let mut p = Vec::with_capacity(parent.len() + 1 + name.len());
        p.extend_from_slice(parent);
        p.push(b'/');
        p.extend_from_slice(name);
        p
    }
}

/// `(parent, name)` of a non-root relative path.
pub(super) fn split(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

/// The last component of a non-root relative path.
pub(super) fn leaf(path: &[u8]) -> &[u8] {
    split(path).1
}

pub(super) fn os(path: &[u8]) -> &OsStr {
    if path.is_empty() {
        OsStr::new(".")
    } else {
        OsStr::from_bytes(path)
    }
}

/// Whether `path` is `prefix` or below it.
pub(super) fn under(path: &[u8], prefix: &[u8]) -> bool {
    path == prefix
        || (path.len() > prefix.len() && path.starts_with(prefix) && path[prefix.len()] == b'/')
}
