//! Test support (feature `testing`): a small filesystem of its own for a store that runs out of
//! space, and the sweep that makes a checkpoint fail with `ENOSPC` at each of its stages.
//!
//! Real faults, not mocks: the filesystem is a real ext4 image on a loop device or a real
//! size-limited tmpfs, mounted for the test (root only), and filled with a real file.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::Error;
use crate::snapshot::SnapshotId;

/// Which kind of filesystem a [`SmallFs`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    /// ext4 in an image file on a loop device (no reserved blocks, no hashed directories, so
    /// that a full directory needs a new block for one more entry).
    Ext4,
    /// A size-limited tmpfs (memory-backed: reading a hole of a mapped file allocates).
    Tmpfs,
}

/// A filesystem mounted for one test, unmounted when dropped.
#[derive(Debug)]
pub struct SmallFs {
    kind: FsKind,
    mount: PathBuf,
    /// Holds the mount point and the ext4 image.
    _dir: tempfile::TempDir,
    filler: Option<File>,
}

fn run(cmd: &mut Command) -> io::Result<()> {
    let out = cmd.output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

impl SmallFs {
    /// Mounts a fresh filesystem of `size` bytes with at most `inodes` inodes under `parent`.
    pub fn mount(kind: FsKind, size: u64, inodes: u64, parent: &Path) -> io::Result<SmallFs> {
        let dir = tempfile::Builder::new()
            .prefix("smallfs-")
            .tempdir_in(parent)?;
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount)?;
        match kind {
            FsKind::Ext4 => {
                let image = dir.path().join("fs.img");
                File::create(&image)?.set_len(size)?;
                run(Command::new("mkfs.ext4")
                    .args([
                        "-q",
                        "-F",
                        "-b",
                        "4096",
                        "-m",
                        "0",
                        "-O",
                        "^dir_index,^has_journal",
                    ])
                    .arg("-N")
                    .arg(inodes.to_string())
                    .arg(&image))?;
                run(Command::new("mount")
                    .args(["-o", "loop"])
                    .arg(&image)
                    .arg(&mount))?;
            }
            FsKind::Tmpfs => {
                run(Command::new("mount")
                    .args(["-t", "tmpfs", "-o"])
                    .arg(format!("size={size},nr_inodes={inodes}"))
                    .arg("tmpfs")
                    .arg(&mount))?;
            }
        }
        Ok(SmallFs {
            kind,
            mount,
            _dir: dir,
            filler: None,
        })
    }

    pub fn kind(&self) -> FsKind {
        self.kind
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mount
    }

    /// Bytes and inodes the filesystem still has free.
    pub fn free(&self) -> io::Result<(u64, u64)> {
        let st = rustix::fs::statvfs(&self.mount)?;
        Ok((st.f_bfree * st.f_frsize, st.f_ffree))
    }

    fn filler(&mut self) -> io::Result<&File> {
        if self.filler.is_none() {
            let f = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(self.mount.join("filler"))?;
            self.filler = Some(f);
        }
        self.filler
            .as_ref()
            .ok_or_else(|| io::Error::other("no filler"))
    }

    /// Grows or shrinks the filler file so that about `bytes` stay free (to the block).
    ///
    /// The filesystem is flushed first (`syncfs`): data written but not yet allocated (ext4
    /// allocates at writeback: a sandbox's own files, left-overs being freed) would otherwise
    /// take or give back blocks after the free count was read, by a block or two at random
    /// moments, enough to skip the one size at which only a commit's directory entry fails.
    pub fn leave_free(&mut self, bytes: u64) -> io::Result<()> {
        rustix::fs::syncfs(File::open(&self.mount)?)?;
        let (free, _) = self.free()?;
        let f = self.filler()?.try_clone()?;
        let f = &f;
        let have = f.metadata()?.len();
        let want = (have + free).saturating_sub(bytes);
        if want < have {
            f.set_len(want)?;
        } else if want > have {
            match rustix::fs::fallocate(f, rustix::fs::FallocateFlags::empty(), have, want - have) {
                Ok(()) => {}
                // Metadata took a little more than the estimate: take what is left.
                Err(rustix::io::Errno::NOSPC) => {
                    let (free, _) = self.free()?;
                    if free > bytes {
                        let _ = rustix::fs::fallocate(
                            f,
                            rustix::fs::FallocateFlags::empty(),
                            have,
                            free - bytes,
                        );
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Takes every free inode but `left` (with empty files), or gives inodes back.
    pub fn leave_inodes(&mut self, left: u64) -> io::Result<()> {
        let dir = self.mount.join("inodes");
        std::fs::create_dir_all(&dir)?;
        let mut n = std::fs::read_dir(&dir)?.count() as u64;
        loop {
            let (_, free) = self.free()?;
            if free > left {
                File::create(dir.join(n.to_string()))?;
                n += 1;
            } else if free < left && n > 0 {
                n -= 1;
                std::fs::remove_file(dir.join(n.to_string()))?;
            } else {
                return Ok(());
            }
        }
    }

    /// Gives all space and inodes back.
    pub fn release(&mut self) -> io::Result<()> {
        if let Some(f) = self.filler.take() {
            f.set_len(0)?;
        }
        let dir = self.mount.join("inodes");
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        Ok(())
    }

    /// Fills `dir`'s last block with entries (named like snapshot ids, so that they take the
    /// room one would, and never parse as one), so that one more entry in it needs a new
    /// block. ext4 only (tmpfs directories take no blocks).
    pub fn fill_directory(&self, dir: &Path) -> io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let size = |d: &Path| std::fs::metadata(d).map(|m| m.size());
        let name = |i: usize| format!("x-pad{i:012}-{:032x}", 0u128);
        let mut i = 0;
        // Grow the directory twice, counting how many entries fit in one whole block.
        let mut growths = Vec::new();
        let mut last = size(dir)?;
        while growths.len() < 2 {
            File::create(dir.join(name(i)))?;
            i += 1;
            let now = size(dir)?;
            if now != last {
                growths.push(i);
                last = now;
            }
        }
        let per_block = growths[1] - growths[0];
        // The newest block holds one entry: fill it.
        for _ in 1..per_block {
            File::create(dir.join(name(i)))?;
            i += 1;
        }
        if size(dir)? != last {
            return Err(io::Error::other("the directory grew while being filled"));
        }
        Ok(())
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        self.filler = None;
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

/// The stage of a checkpoint at which the store ran out of space, from its error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Creating the snapshot's directory under `tmp/`.
    Begin,
    /// The disk layer (KVM).
    Disk,
    /// The memory layer.
    Memory,
    /// The filesystem archive (WASI).
    Files,
    /// The manifest.
    Manifest,
    /// Publishing the snapshot (the rename into `snapshots/`, and its flush).
    Commit,
}

/// Which stage a `StoreFull` error comes from; `None` for any other error.
pub fn stage_of(e: &Error) -> Option<Stage> {
    let Error::StoreFull { op, path, .. } = e else {
        return None;
    };
    let file = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Some(match *op {
        "commit" | "sync directory" => Stage::Commit,
        "write memory of" => Stage::Memory,
        "archive" => Stage::Files,
        _ if file.starts_with("disk.") => Stage::Disk,
        _ if file.starts_with("memory.") => Stage::Memory,
        _ if file.starts_with("fs.") => Stage::Files,
        _ if file == "manifest.dsnp" => Stage::Manifest,
        "create" => Stage::Begin,
        _ => Stage::Commit,
    })
}

/// Makes `checkpoint` fail for want of space at every stage it can, checking after each
/// failure that the sandbox still answers (`alive`):
///
/// 1. for want of inodes, one more file each time (the snapshot's directory, each data file,
///    the manifest);
/// 2. for want of bytes, from none free upwards in coarse steps, while what the sandbox wrote
///    since its last snapshot is large (a data write fails half way), until a checkpoint
///    succeeds;
/// 3. again in 4 KiB steps on the small deltas that follow, with (on ext4) a full `snapshots/`
///    directory, so that the manifest and then the commit (one more directory entry) fail.
///
/// Returns the stages seen. Every `checkpoint` that succeeds is a complete snapshot of the
/// sandbox at that moment (the caller checks what the last one holds).
pub fn sweep_full_store<S>(
    fs: &mut SmallFs,
    store_root: &Path,
    sandbox: &mut S,
    mut checkpoint: impl FnMut(&mut S) -> Result<SnapshotId, Error>,
    mut alive: impl FnMut(&mut S),
) -> io::Result<BTreeSet<Stage>> {
    let mut seen = BTreeSet::new();
    let mut attempt = |sb: &mut S, seen: &mut BTreeSet<Stage>| match checkpoint(sb) {
        Ok(_) => true,
        Err(e) => {
            let stage = stage_of(&e).unwrap_or_else(|| panic!("not a full-store error: {e}"));
            assert!(
                e.to_string().contains("store is full"),
                "the message says so: {e}"
            );
            seen.insert(stage);
            false
        }
    };
    for left in 0..4 {
        fs.leave_inodes(left)?;
        if !attempt(sandbox, &mut seen) {
            alive(sandbox);
        }
    }
    fs.release()?;
    for step in [256u64 << 10, 4096] {
        if fs.kind() == FsKind::Ext4 {
            fs.fill_directory(&store_root.join("snapshots"))?;
        }
        let mut leave = 0;
        let mut done = false;
        for _ in 0..4000 {
            fs.leave_free(leave)?;
            if attempt(sandbox, &mut seen) {
                done = true;
                break;
            }
            alive(sandbox);
            leave += step;
        }
        fs.release()?;
        if !done {
            return Err(io::Error::other(format!(
                "no checkpoint succeeded with up to {leave} bytes free"
            )));
        }
    }
    Ok(seen)
}
