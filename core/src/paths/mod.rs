//! Guest paths and the confined host-side view of a sandbox's files.
//!
//! The files API takes guest paths (`/data/x.csv`, `notes.txt`): relative paths are relative to
//! the guest root. A path is normalised lexically first (`..` above the root is refused as an
//! escape), then opened through cap-std, which refuses any symlink that would lead outside the
//! directory it was opened on. Host paths never appear: `/etc/passwd` names the sandbox's own
//! `/etc/passwd`, not the host's.

use std::io::{self, ErrorKind};
use std::path::Path;

use cap_std::ambient_authority;
use cap_std::fs::Dir;

use crate::error::{Error, Result};
use crate::spec::Mount;

pub(crate) mod guest;

pub use guest::GuestPath;

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DirEntry {
    pub name: String,
    pub is_dir: bool,
    pub size: u64,
}

/// The host-side view of a sandbox's files: its root directory and its mounts.
#[derive(Debug)]
pub struct SandboxFs {
    root: Dir,
    mounts: Vec<(GuestPath, Dir, bool)>,
}

fn map_io(op: &'static str, path: &str, e: io::Error) -> Error {
    // cap-std reports a symlink or `..` leading outside the opened directory as PermissionDenied
    // with this message.
    if e.kind() == ErrorKind::PermissionDenied
        && e.to_string().contains("outside of the filesystem")
    {
        Error::PathEscape { path: path.into() }
    } else {
        Error::File {
            op,
            path: path.into(),
            source: e,
        }
    }
}

impl SandboxFs {
    /// Opens the sandbox root and its mounts (longest mount point wins when resolving).
    pub fn open(root: &Path, mounts: &[Mount]) -> Result<SandboxFs> {
        let open = |p: &Path| {
            Dir::open_ambient_dir(p, ambient_authority())
                .map_err(|e| Error::store("open sandbox directory", p, e))
        };
        let mut ms = Vec::with_capacity(mounts.len());
        for m in mounts {
            ms.push((GuestPath::parse(&m.guest)?, open(&m.host)?, m.read_only));
        }
        ms.sort_by_key(|(g, _, _)| std::cmp::Reverse(g.as_str().len()));
        Ok(SandboxFs {
            root: open(root)?,
            mounts: ms,
        })
    }

    fn resolve<'a>(&'a self, path: &'a GuestPath) -> (&'a Dir, &'a str, bool) {
        for (prefix, dir, ro) in &self.mounts {
            if let Some(rest) = path.strip(prefix) {
                return (dir, rest, *ro);
            }
        }
        (&self.root, &path.as_str()[1..], false)
    }

    /// Resolves a path that is about to be changed: not on a read-only mount, and not a root
    /// or mount point itself (`root_reason` says why that is refused).
    fn resolve_writable<'a>(
        &'a self,
        g: &'a GuestPath,
        path: &str,
        root_reason: &'static str,
    ) -> Result<(&'a Dir, &'a str)> {
        let (dir, rest, ro) = self.resolve(g);
        if ro {
            return Err(Error::ReadOnly { path: path.into() });
        }
        if rest.is_empty() {
            return Err(Error::InvalidPath {
                path: path.into(),
                reason: root_reason,
            });
        }
        Ok((dir, rest))
    }

    fn rel(rest: &str) -> &str {
        if rest.is_empty() { "." } else { rest }
    }

    pub fn read(&self, path: &str) -> Result<Vec<u8>> {
        let g = GuestPath::parse(path)?;
        let (dir, rest, _) = self.resolve(&g);
        dir.read(Self::rel(rest))
            .map_err(|e| map_io("read", path, e))
    }

    /// Writes `data` to `path`, creating missing parent directories.
    pub fn write(&self, path: &str, data: &[u8]) -> Result<()> {
        let g = GuestPath::parse(path)?;
        let (dir, rest) = self.resolve_writable(&g, path, "is a directory")?;
        if let Some((parent, _)) = rest.rsplit_once('/') {
            // Stat first (following links, so an escaping link is refused) and create only what
            // is missing.
            match dir.metadata(parent) {
                Ok(md) if md.is_dir() => {}
                Ok(_) => {
                    return Err(Error::InvalidPath {
                        path: path.into(),
                        reason: "a parent is not a directory",
                    });
                }
                Err(e) if e.kind() == ErrorKind::NotFound => dir
                    .create_dir_all(parent)
                    .map_err(|e| map_io("create directory for", path, e))?,
                Err(e) => return Err(map_io("write", path, e)),
            }
        }
        dir.write(rest, data).map_err(|e| map_io("write", path, e))
    }

    pub fn list(&self, path: &str) -> Result<Vec<DirEntry>> {
        let g = GuestPath::parse(path)?;
        let (dir, rest, _) = self.resolve(&g);
        let rd = dir
            .read_dir(Self::rel(rest))
            .map_err(|e| map_io("list", path, e))?;
        let mut out = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| map_io("list", path, e))?;
            let md = ent.metadata().map_err(|e| map_io("list", path, e))?;
            out.push(DirEntry {
                name: ent.file_name().to_string_lossy().into_owned(),
                is_dir: md.is_dir(),
                size: md.len(),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Removes a file, a symlink, or a directory with everything in it.
    pub fn remove(&self, path: &str) -> Result<()> {
        let g = GuestPath::parse(path)?;
        let (dir, rest) = self.resolve_writable(&g, path, "cannot remove a root or mount point")?;
        let md = dir
            .symlink_metadata(rest)
            .map_err(|e| map_io("remove", path, e))?;
        if md.is_dir() {
            dir.remove_dir_all(rest)
        } else {
            dir.remove_file(rest)
        }
        .map_err(|e| map_io("remove", path, e))
    }

    /// Whether `path` names an existing file or directory. An escaping path is an error, not
    /// `false`.
    pub fn exists(&self, path: &str) -> Result<bool> {
        let g = GuestPath::parse(path)?;
        let (dir, rest, _) = self.resolve(&g);
        match dir.metadata(Self::rel(rest)) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(map_io("stat", path, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(tmp.path().join("secret"), b"host secret").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("secret"), root.join("abs-link")).unwrap();
        std::os::unix::fs::symlink("../secret", root.join("rel-link")).unwrap();
        std::os::unix::fs::symlink(tmp.path(), root.join("dir-link")).unwrap();
        let fs = SandboxFs::open(&root, &[]).unwrap();
        for p in ["abs-link", "rel-link", "dir-link/secret"] {
            match fs.read(p) {
                Err(Error::PathEscape { .. }) => {}
                other => panic!("{p}: expected PathEscape, got {other:?}"),
            }
        }
        assert!(matches!(
            fs.read("../secret"),
            Err(Error::PathEscape { .. })
        ));
        let r = fs.write("dir-link/x", b"1");
        assert!(matches!(r, Err(Error::PathEscape { .. })), "{r:?}");
        // An absolute host path names the sandbox's own file, which does not exist.
        let host_file = tmp.path().join("secret");
        assert!(matches!(
            fs.read(host_file.to_str().unwrap()),
            Err(Error::File { .. })
        ));
        assert!(!fs.exists(host_file.to_str().unwrap()).unwrap());
    }

    #[test]
    fn files_round_trip_and_mounts() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let vol = tmp.path().join("vol");
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir(&vol).unwrap();
        std::fs::write(vol.join("in.txt"), b"volume").unwrap();
        let mounts = vec![Mount {
            host: vol.clone(),
            guest: "/data".into(),
            read_only: true,
        }];
        let fs = SandboxFs::open(&root, &mounts).unwrap();
        fs.write("/a/b/c.txt", b"hello").unwrap();
        assert_eq!(fs.read("a/b/c.txt").unwrap(), b"hello");
        assert!(fs.exists("/a/b").unwrap());
        let l = fs.list("/a/b").unwrap();
        assert_eq!(
            l,
            vec![DirEntry {
                name: "c.txt".into(),
                is_dir: false,
                size: 5
            }]
        );
        assert_eq!(fs.read("/data/in.txt").unwrap(), b"volume");
        assert!(matches!(
            fs.write("/data/x", b"1"),
            Err(Error::ReadOnly { .. })
        ));
        fs.remove("/a").unwrap();
        assert!(!fs.exists("/a/b/c.txt").unwrap());
    }
}
