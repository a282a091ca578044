//! The store's directories that hold no snapshot: named volumes (`<store>/volumes/<name>`),
//! the working directories of live sandboxes (`<store>/live/<pid>-<nonce>`, removed by
//! [`LocalStore::open`] once their process is gone), and the empty directory that detached
//! mount points show (`<store>/detached`).
//!
//! They live beside the [snapshot store](crate::snapshot::store) under its root, but are the
//! sandboxes' host directories, not part of any snapshot.

use std::fs;
use std::io;
use std::path::PathBuf;

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

    /// A fresh working directory for a live sandbox, removed by the store if this process dies.
    pub fn new_live_dir(&self) -> Result<PathBuf> {
        let dir = self.root().join("live").join(format!(
            "{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        fs::create_dir(&dir).map_err(|e| Error::store("create", &dir, e))?;
        Ok(dir)
    }
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
