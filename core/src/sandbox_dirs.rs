//! The store's directories that hold no snapshot: named volumes (`<store>/volumes/<name>`),
//! the working directories of live sandboxes (`<store>/live/<pid>-<nonce>`, removed by
//! [`LocalStore::open`] once their process is gone), and the empty directory that detached
//! mount points show (`<store>/detached`).
//!
//! They live beside the [snapshot store](crate::snapshot::store) under its root, but are the
//! sandboxes' host directories, not part of any snapshot.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::snapshot::store::LocalStore;

/// Whether `name` may name something the store keeps in a file or directory of its own (a
/// volume, a template): 1–64 characters of `[A-Za-z0-9._-]`, not starting with a dot.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Longest sandbox id ([`valid_sandbox_id`]).
pub const MAX_SANDBOX_ID_LEN: usize = 128;

/// Whether `id` may be a sandbox id, and so name a file or an object key of its own (the
/// store's `killed/<id>`, a remote store's `heads/<id>`): 1–128 characters of
/// `[A-Za-z0-9._-]`, not starting with a dot. Ids dormant makes look like
/// `sb-0123456789abcdef`.
pub fn valid_sandbox_id(id: &str) -> bool {
    (1..=MAX_SANDBOX_ID_LEN).contains(&id.len())
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl LocalStore {
    /// The host directory of the named volume, created if it does not exist yet. Volumes hold
    /// files that outlive every sandbox and snapshot: mount one with
    /// [`SandboxSpec::mount`](crate::SandboxSpec::mount). Names are 1–64 characters of
    /// `[A-Za-z0-9._-]`, not starting with a dot.
    pub fn volume(&self, name: &str) -> Result<PathBuf> {
        if !valid_name(name) {
            return Err(Error::InvalidArgument(format!(
                "{name:?} is not a valid volume name"
            )));
        }
        let dir = self.root().join("volumes").join(name);
        fs::create_dir_all(&dir).map_err(|e| Error::store("create volume", &dir, e))?;
        Ok(dir)
    }

    /// The names of the store's volumes.
    pub fn volumes(&self) -> Result<Vec<String>> {
        let dir = self.root().join("volumes");
        let mut out = Vec::new();
        match fs::read_dir(&dir) {
            Ok(rd) => {
                for ent in rd {
                    let ent = ent.map_err(|e| Error::store("list volumes", &dir, e))?;
                    out.push(ent.file_name().to_string_lossy().into_owned());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::store("list volumes", &dir, e)),
        }
        out.sort();
        Ok(out)
    }

    /// Deletes a volume and everything in it. Sandboxes that mount it see it vanish.
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        let dir = self.volume(name)?;
        fs::remove_dir_all(&dir).map_err(|e| Error::store("delete volume", &dir, e))
    }

    /// An empty working directory for a live sandbox, removed by the store if this process
    /// dies: one that a sandbox of this process released
    /// ([`release_live_dir`](Self::release_live_dir)) when there is one, else a new one (a
    /// `mkdir`: tens of µs on ext4, a third of a WASI resume).
    pub fn new_live_dir(&self) -> Result<PathBuf> {
        if let Some(dir) = self.spare_live.lock().pop() {
            return Ok(dir);
        }
        let dir = self.root().join("live").join(format!(
            "{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        fs::create_dir(&dir).map_err(|e| Error::store("create", &dir, e))?;
        Ok(dir)
    }

    /// Gives back a live directory that no sandbox uses any more (one that
    /// [`new_live_dir`](Self::new_live_dir) gave): its contents are removed and the empty
    /// directory is kept for the next `new_live_dir`, or removed when [`SPARE_LIVE_DIRS`] are
    /// kept already or emptying it failed. A path that is not one of this process's live
    /// directories of this store is left alone.
    pub fn release_live_dir(&self, dir: PathBuf) {
        let prefix = format!("{}-", std::process::id());
        let ours = dir.parent() == Some(self.root().join("live").as_path())
            && dir
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix));
        if !ours {
            return;
        }
        if empty_dir(&dir).is_ok() {
            let mut spare = self.spare_live.lock();
            if spare.len() < SPARE_LIVE_DIRS {
                spare.push(dir);
                return;
            }
        }
        let _ = fs::remove_dir_all(dir);
    }
}

/// Most empty live directories a store keeps for reuse.
pub const SPARE_LIVE_DIRS: usize = 16;

/// Removes everything inside `dir` (symbolic links themselves, never what they point to),
/// leaving it empty.
fn empty_dir(dir: &Path) -> io::Result<()> {
    for ent in fs::read_dir(dir)? {
        let ent = ent?;
        if ent.file_type()?.is_dir() {
            fs::remove_dir_all(ent.path())?;
        } else {
            fs::remove_file(ent.path())?;
        }
    }
    Ok(())
}

/// Name of the store's directory that detached mount points show.
const DETACHED_DIR: &str = "detached";

/// The directory a detached mount point shows: `<store>/detached`, empty, always attached
/// read-only. Created on first use; refused if something put files in it.
pub fn detached_dir(store: &LocalStore) -> Result<PathBuf> {
    let dir = store.root().join(DETACHED_DIR);
    std::fs::create_dir_all(&dir).map_err(|e| Error::store("create", &dir, e))?;
    let mut entries = std::fs::read_dir(&dir).map_err(|e| Error::store("list", &dir, e))?;
    if entries.next().is_some() {
        return Err(Error::store(
            "use as the empty directory of detached mounts",
            &dir,
            std::io::Error::new(std::io::ErrorKind::DirectoryNotEmpty, "not empty"),
        ));
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_live_dirs_are_emptied_and_handed_out_again() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("keep"), b"k").unwrap();
        let store = LocalStore::open(tmp.path().join("store")).unwrap();
        let dir = store.new_live_dir().unwrap();
        fs::create_dir_all(dir.join("a/b")).unwrap();
        fs::write(dir.join("a/b/f"), b"x").unwrap();
        fs::write(dir.join("g"), b"y").unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("link")).unwrap();
        store.release_live_dir(dir.clone());
        // Empty, kept, and what a link pointed to untouched.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
        assert_eq!(fs::read(outside.join("keep")).unwrap(), b"k");
        assert_eq!(store.new_live_dir().unwrap(), dir);
        // Beyond the spare count, released directories are removed.
        let dirs: Vec<_> = (0..SPARE_LIVE_DIRS + 2)
            .map(|_| store.new_live_dir().unwrap())
            .collect();
        for d in &dirs {
            store.release_live_dir(d.clone());
        }
        let kept = dirs.iter().filter(|d| d.exists()).count();
        assert_eq!(kept, SPARE_LIVE_DIRS);
        // A path that is not one of its live directories is left alone.
        store.release_live_dir(outside.clone());
        assert!(outside.join("keep").exists());
        // The first one, released again with the spares full: removed.
        store.release_live_dir(dir.clone());
        assert!(!dir.exists());
        // Dropping the store removes the spare ones.
        drop(store);
        assert!(dirs.iter().all(|d| !d.exists()));
    }

    #[test]
    fn the_store_directory_of_detached_mounts_is_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalStore::open(tmp.path()).unwrap();
        let d = detached_dir(&store).unwrap();
        assert!(d.is_dir() && d.starts_with(store.root()));
        assert_eq!(detached_dir(&store).unwrap(), d);
        std::fs::write(d.join("planted"), b"x").unwrap();
        assert!(detached_dir(&store).is_err(), "never shows planted files");
    }
}
