//! Attributes: `GETATTR`, `SETATTR` (mode, size, times; ownership only to the guest's root),
//! `READLINK` and `STATFS`, and how a host `stat` becomes the guest's [`Attr`]: no caching
//! (valid for 0 s) and everything owned by the guest's root.

use std::os::fd::AsRawFd;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat, Timespec, Timestamps};
use rustix::io::Errno;
use zerocopy::IntoBytes;

use super::super::Res;
use super::super::abi::{
    Attr, AttrOut, EntryOut, FATTR_ATIME, FATTR_ATIME_NOW, FATTR_FH, FATTR_GID, FATTR_MODE,
    FATTR_MTIME, FATTR_MTIME_NOW, FATTR_SIZE, FATTR_UID, FUSE_GETATTR_FH, GetattrIn, SetattrIn,
    StatfsOut, take,
};
use super::super::paths::{beneath, os, split};
use super::VolumeServer;

pub(super) fn attr(st: &Stat) -> Attr {
    Attr {
        ino: st.st_ino,
        size: st.st_size.max(0) as u64,
        blocks: st.st_blocks.max(0) as u64,
        atime: st.st_atime.max(0) as u64,
        mtime: st.st_mtime.max(0) as u64,
        ctime: st.st_ctime.max(0) as u64,
        atimensec: st.st_atime_nsec as u32,
        mtimensec: st.st_mtime_nsec as u32,
        ctimensec: st.st_ctime_nsec as u32,
        mode: st.st_mode,
        nlink: st.st_nlink.min(u32::MAX as u64) as u32,
        // The guest's root user owns everything in a volume; host ownership stays on the host.
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

pub(super) fn entry_out(nodeid: u64, st: &Stat) -> EntryOut {
    EntryOut {
        nodeid,
        generation: 0,
        entry_valid: 0,
        attr_valid: 0,
        entry_valid_nsec: 0,
        attr_valid_nsec: 0,
        attr: attr(st),
    }
}

fn attr_out(out: &mut Vec<u8>, st: &Stat) {
    out.extend_from_slice(
        AttrOut {
            attr_valid: 0,
            attr_valid_nsec: 0,
            dummy: 0,
            attr: attr(st),
        }
        .as_bytes(),
    );
}

impl VolumeServer {
    pub(super) fn getattr(&mut self, id: u64, body: &[u8], out: &mut Vec<u8>) -> Res<()> {
        let (g, _) = take::<GetattrIn>(body)?;
        let st = if g.flags & FUSE_GETATTR_FH != 0 {
            let fd = self.handle_fd(g.fh)?;
            rustix::fs::fstat(fd)?
        } else {
            let path = self.table.path(id)?.to_vec();
            self.lstat(&path)?
        };
        attr_out(out, &st);
        Ok(())
    }

    pub(super) fn setattr(&mut self, id: u64, body: &[u8], out: &mut Vec<u8>) -> Res<()> {
        let (s, _) = take::<SetattrIn>(body)?;
        let st = self.set(id, &s)?;
        attr_out(out, &st);
        Ok(())
    }

    pub(super) fn readlink(&mut self, id: u64, out: &mut Vec<u8>) -> Res<()> {
        let path = self.table.path(id)?.to_vec();
        let (parent, name) = split(&path);
        let dir = self.open_dir(parent)?;
        let target = rustix::fs::readlinkat(&dir, os(name), Vec::new())?;
        out.extend_from_slice(target.as_bytes());
        Ok(())
    }

    pub(super) fn statfs(&mut self, out: &mut Vec<u8>) -> Res<()> {
        let s = rustix::fs::fstatvfs(&self.root)?;
        out.extend_from_slice(
            StatfsOut {
                blocks: s.f_blocks,
                bfree: s.f_bfree,
                bavail: s.f_bavail,
                files: s.f_files,
                ffree: s.f_ffree,
                bsize: s.f_bsize as u32,
                namelen: s.f_namemax as u32,
                frsize: s.f_frsize as u32,
                padding: 0,
                spare: [0; 6],
            }
            .as_bytes(),
        );
        Ok(())
    }

    /// Applies the `SETATTR` `s` to node `id`; the node's attributes after.
    fn set(&mut self, id: u64, s: &SetattrIn) -> Res<Stat> {
        let path = self.table.path(id)?.to_vec();
        let v = s.valid;
        if v & (FATTR_MODE | FATTR_SIZE | FATTR_ATIME | FATTR_MTIME | FATTR_UID | FATTR_GID) != 0 {
            self.writable()?;
        }
        if v & (FATTR_UID | FATTR_GID) != 0 {
            // Everything in a volume belongs to the guest's root (see `attr`); nothing else can.
            if (v & FATTR_UID != 0 && s.uid != 0) || (v & FATTR_GID != 0 && s.gid != 0) {
                return Err(Errno::PERM);
            }
        }
        if v & FATTR_MODE != 0 {
            // The node itself (never a symlink's target), then chmod through its /proc link,
            // which names exactly that inode.
            let fd = rustix::fs::openat2(
                &self.root,
                os(&path),
                OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
                beneath(),
            )?;
            if FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode) == FileType::Symlink {
                return Err(Errno::OPNOTSUPP);
            }
            let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
            rustix::fs::chmod(link.as_str(), Mode::from_bits_truncate(s.mode & 0o7777))?;
        }
        if v & FATTR_SIZE != 0 {
            let writable_handle = v & FATTR_FH != 0
                && self.table.handles.get(&s.fh).is_some_and(|h| {
                    let f = OFlags::from_bits_retain(h.flags) & OFlags::RWMODE;
                    f == OFlags::WRONLY || f == OFlags::RDWR
                });
            if writable_handle {
                rustix::fs::ftruncate(self.handle_fd(s.fh)?, s.size)?;
            } else {
                let fd = rustix::fs::openat2(
                    &self.root,
                    os(&path),
                    OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                    Mode::empty(),
                    beneath(),
                )?;
                rustix::fs::ftruncate(&fd, s.size)?;
            }
        }
        if v & (FATTR_ATIME | FATTR_MTIME) != 0 {
            let ts = |set: bool, now: bool, sec: u64, nsec: u32| Timespec {
                tv_sec: if set && !now { sec as i64 } else { 0 },
                tv_nsec: if !set {
                    rustix::fs::UTIME_OMIT
                } else if now {
                    rustix::fs::UTIME_NOW
                } else {
                    nsec as _
                },
            };
            let times = Timestamps {
                last_access: ts(
                    v & FATTR_ATIME != 0,
                    v & FATTR_ATIME_NOW != 0,
                    s.atime,
                    s.atimensec,
                ),
                last_modification: ts(
                    v & FATTR_MTIME != 0,
                    v & FATTR_MTIME_NOW != 0,
                    s.mtime,
                    s.mtimensec,
                ),
            };
            if path.is_empty() {
                rustix::fs::utimensat(&self.root, ".", &times, AtFlags::empty())?;
            } else {
                let (parent, name) = split(&path);
                let dir = self.open_dir(parent)?;
                rustix::fs::utimensat(&dir, os(name), &times, AtFlags::SYMLINK_NOFOLLOW)?;
            }
        }
        self.lstat(&path)
    }
}
