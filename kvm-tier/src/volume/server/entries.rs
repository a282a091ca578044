//! The namespace: `LOOKUP`, and the operations that make, link, rename or remove an entry
//! (`SYMLINK`, `MKNOD`, `MKDIR`, `LINK`, `RENAME`/`RENAME2`, `UNLINK`/`RMDIR`). Each acts on
//! the entry's name relative to its parent directory (resolved beneath the root), never
//! following a symlink in the last component; nodes and handles follow renames.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags};
use rustix::io::Errno;
use zerocopy::IntoBytes;

use super::super::Res;
use super::super::abi::{LinkIn, MkdirIn, MknodIn, Rename2In, RenameIn, cstr, take};
use super::super::paths::{beneath, component, join, leaf, os, split};
use super::VolumeServer;
use super::attrs::entry_out;

impl VolumeServer {
    pub(super) fn lookup(&mut self, id: u64, body: &[u8], out: &mut Vec<u8>) -> Res<()> {
        let (name, _) = cstr(body)?;
        let path = join(self.table.path(id)?, component(name)?);
        let st = self.lstat(&path)?;
        let nodeid = self.table.remember(path)?;
        out.extend_from_slice(entry_out(nodeid, &st).as_bytes());
        Ok(())
    }

    pub(super) fn symlink(&mut self, id: u64, body: &[u8], out: &mut Vec<u8>) -> Res<()> {
        self.writable()?;
        let (name, rest) = cstr(body)?;
        let (target, _) = cstr(rest)?;
        let (path, dir) = self.child(id, name)?;
        rustix::fs::symlinkat(OsStr::from_bytes(target), &dir, os(leaf(&path)))?;
        self.entry(out, path)
    }

    pub(super) fn mknod(&mut self, id: u64, body: &[u8], out: &mut Vec<u8>) -> Res<()> {
        self.writable()?;
        let (m, rest) = take::<MknodIn>(body)?;
        let (name, _) = cstr(rest)?;
        let (path, dir) = self.child(id, name)?;
        let name = leaf(&path);
        let perm = Mode::from_bits_truncate(m.mode & 0o7777);
        match FileType::from_raw_mode(m.mode) {
            FileType::RegularFile => {
                rustix::fs::openat2(
                    &dir,
                    os(name),
                    OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC,
                    perm,
                    beneath(),
                )?;
            }
            FileType::Fifo => {
                rustix::fs::mknodat(&dir, os(name), FileType::Fifo, perm, 0)?;
            }
            // No device nodes or sockets on the host on the guest's behalf.
            _ => return Err(Errno::PERM),
        }
        self.entry(out, path)
    }

    pub(super) fn mkdir(&mut self, id: u64, body: &[u8], out: &mut Vec<u8>) -> Res<()> {
        self.writable()?;
        let (m, rest) = take::<MkdirIn>(body)?;
        let (name, _) = cstr(rest)?;
        let (path, dir) = self.child(id, name)?;
        let mode = Mode::from_bits_truncate(m.mode & 0o7777);
        rustix::fs::mkdirat(&dir, os(leaf(&path)), mode)?;
        self.entry(out, path)
    }

    /// `UNLINK`, or `RMDIR` when `dir`.
    pub(super) fn remove(&mut self, id: u64, body: &[u8], dir: bool) -> Res<()> {
        self.writable()?;
        let (name, _) = cstr(body)?;
        let (path, parent) = self.child(id, name)?;
        let flags = if dir {
            AtFlags::REMOVEDIR
        } else {
            AtFlags::empty()
        };
        rustix::fs::unlinkat(&parent, os(leaf(&path)), flags)?;
        self.table.unlinked(&path);
        Ok(())
    }

    pub(super) fn link(&mut self, id: u64, body: &[u8], out: &mut Vec<u8>) -> Res<()> {
        self.writable()?;
        let (l, rest) = take::<LinkIn>(body)?;
        let (name, _) = cstr(rest)?;
        let old = self.table.path(l.oldnodeid)?.to_vec();
        if old.is_empty() {
            return Err(Errno::PERM);
        }
        let (path, nd) = self.child(id, name)?;
        let od = self.open_dir(split(&old).0)?;
        rustix::fs::linkat(&od, os(leaf(&old)), &nd, os(leaf(&path)), AtFlags::empty())?;
        self.entry(out, path)
    }

    /// `RENAME`, or `RENAME2` (with flags) when `two`.
    pub(super) fn rename(&mut self, olddir: u64, body: &[u8], two: bool) -> Res<()> {
        let (newdir, flags, names) = if two {
            let (r, rest) = take::<Rename2In>(body)?;
            (r.newdir, r.flags, rest)
        } else {
            let (r, rest) = take::<RenameIn>(body)?;
            (r.newdir, 0, rest)
        };
        self.writable()?;
        let (oldname, rest) = cstr(names)?;
        let (newname, _) = cstr(rest)?;
        let (old, od) = self.child(olddir, oldname)?;
        let (new, nd) = self.child(newdir, newname)?;
        let flags = RenameFlags::from_bits(flags).ok_or(Errno::INVAL)?;
        rustix::fs::renameat_with(&od, os(leaf(&old)), &nd, os(leaf(&new)), flags)?;
        self.table
            .renamed(&old, &new, flags.contains(RenameFlags::EXCHANGE));
        Ok(())
    }

    /// Replies with the entry of a path just created.
    pub(super) fn entry(&mut self, out: &mut Vec<u8>, path: Vec<u8>) -> Res<()> {
        let st = self.lstat(&path)?;
        let nodeid = self.table.remember(path)?;
        out.extend_from_slice(entry_out(nodeid, &st).as_bytes());
        Ok(())
    }
}
