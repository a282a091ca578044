//! [`VolumeServer`]: the FUSE server of one volume. [`VolumeServer::handle`] takes one request's
//! raw bytes and writes the reply's; it frames the reply (header, error) and dispatches on the
//! opcode to the operations, grouped by family in the child modules: [`entries`] (the
//! namespace: lookup, create, link, rename, remove), [`attrs`] (attributes, links' targets,
//! filesystem statistics) and [`handles`] (open handles: open, read, write, list, release).
//! This module also holds the host access they share: every path resolved beneath the root,
//! every handle's descriptor reopened by path after a restore.

mod attrs;
mod entries;
mod handles;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, Stat};
use rustix::io::Errno;
use zerocopy::{FromBytes, IntoBytes};

use super::Res;
use super::abi::{
    self, BatchForgetIn, ForgetIn, ForgetOne, InHeader, InitIn, InitOut, OutHeader, take,
};
use super::nodes::Table;
use super::paths::{beneath, component, join, os, split};
use super::state::VolumeState;

/// Largest `read`/`write` payload the server accepts (also announced as `max_write`).
pub const MAX_IO: u32 = 128 << 10;

/// The FUSE server of one volume.
#[derive(Debug)]
pub struct VolumeServer {
    root: OwnedFd,
    root_path: PathBuf,
    read_only: bool,
    pub(super) table: Table,
}

impl VolumeServer {
    /// Serves the directory `root`; `state` is what a snapshot kept of this volume (ignored
    /// if it belongs to another directory).
    pub fn open(
        root: &Path,
        read_only: bool,
        state: Option<&VolumeState>,
    ) -> std::io::Result<VolumeServer> {
        if let Some(st) = state {
            st.check().map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("volume state of {}: {e}", st.root.display()),
                )
            })?;
        }
        let fd = rustix::fs::open(
            root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            std::io::Error::new(
                std::io::Error::from(e).kind(),
                format!("volume {}: {e}", root.display()),
            )
        })?;
        let table = match state.filter(|st| st.root == root) {
            Some(st) => Table::restore(st, read_only),
            None => Table::new(),
        };
        Ok(VolumeServer {
            root: fd,
            root_path: root.to_path_buf(),
            read_only,
            table,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root_path
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// What the guest holds of this volume, for a snapshot.
    pub fn state(&self) -> VolumeState {
        self.table.save(&self.root_path)
    }

    /// Serves one request (`req`: header and arguments) and puts the reply in `reply`
    /// (emptied first; left empty for requests that have none, such as `FORGET`).
    ///
    /// This is the whole of the guest's reach into a volume, and it needs nothing of the VMM:
    /// it is the entry to fuzz. Any bytes are a valid `req` (a short or lying one gets an error
    /// reply or none); a reply is never longer than an [`OutHeader`] and [`MAX_IO`] bytes.
    pub fn handle(&mut self, req: &[u8], reply: &mut Vec<u8>) {
        reply.clear();
        let Ok((h, body)) = InHeader::read_from_prefix(req) else {
            return;
        };
        let body = body
            .get(..(h.len as usize).saturating_sub(size_of::<InHeader>()))
            .unwrap_or(body);
        match h.opcode {
            abi::FORGET => {
                if let Ok((f, _)) = take::<ForgetIn>(body) {
                    self.table.forget(h.nodeid, f.nlookup);
                }
                return;
            }
            abi::BATCH_FORGET => {
                if let Ok((b, mut rest)) = take::<BatchForgetIn>(body) {
                    for _ in 0..b.count {
                        let Ok((one, r)) = take::<ForgetOne>(rest) else {
                            break;
                        };
                        self.table.forget(one.nodeid, one.nlookup);
                        rest = r;
                    }
                }
                return;
            }
            _ => {}
        }
        reply.extend_from_slice(
            OutHeader {
                len: 0,
                error: 0,
                unique: h.unique,
            }
            .as_bytes(),
        );
        if let Err(e) = self.dispatch(&h, body, reply) {
            reply.truncate(size_of::<OutHeader>());
            let err = -e.raw_os_error();
            reply[4..8].copy_from_slice(&err.to_ne_bytes());
        }
        let len = reply.len() as u32;
        reply[0..4].copy_from_slice(&len.to_ne_bytes());
    }

    fn dispatch(&mut self, h: &InHeader, body: &[u8], out: &mut Vec<u8>) -> Res<()> {
        let id = h.nodeid;
        match h.opcode {
            abi::INIT => self.init(body, out),
            abi::DESTROY | abi::FLUSH => Ok(()),
            abi::LOOKUP => self.lookup(id, body, out),
            abi::GETATTR => self.getattr(id, body, out),
            abi::SETATTR => self.setattr(id, body, out),
            abi::READLINK => self.readlink(id, out),
            abi::SYMLINK => self.symlink(id, body, out),
            abi::MKNOD => self.mknod(id, body, out),
            abi::MKDIR => self.mkdir(id, body, out),
            abi::UNLINK => self.remove(id, body, false),
            abi::RMDIR => self.remove(id, body, true),
            abi::RENAME => self.rename(id, body, false),
            abi::RENAME2 => self.rename(id, body, true),
            abi::LINK => self.link(id, body, out),
            abi::OPEN => self.open_handle(id, body, false, out),
            abi::OPENDIR => self.open_handle(id, body, true, out),
            abi::CREATE => self.create(id, body, out),
            abi::READ => self.read(body, out),
            abi::WRITE => self.write(body, out),
            abi::RELEASE | abi::RELEASEDIR => self.release(body),
            abi::FSYNC | abi::FSYNCDIR => self.fsync(body),
            abi::READDIR => self.readdir(body, out),
            abi::STATFS => self.statfs(out),
            _ => Err(Errno::NOSYS),
        }
    }

    /// `INIT`: the protocol version and limits this server speaks.
    fn init(&mut self, body: &[u8], out: &mut Vec<u8>) -> Res<()> {
        let (init, _) = take::<InitIn>(body)?;
        if init.major != abi::FUSE_MAJOR {
            return Err(Errno::PROTO);
        }
        let reply = InitOut {
            major: abi::FUSE_MAJOR,
            minor: abi::FUSE_MINOR.min(init.minor),
            max_readahead: init.max_readahead,
            flags: init.flags & (abi::FUSE_BIG_WRITES | abi::FUSE_MAX_PAGES),
            max_background: 16,
            congestion_threshold: 12,
            max_write: MAX_IO,
            time_gran: 1,
            max_pages: (MAX_IO / 4096) as u16,
            map_alignment: 0,
            flags2: 0,
            unused: [0; 7],
        };
        out.extend_from_slice(reply.as_bytes());
        Ok(())
    }

    fn writable(&self) -> Res<()> {
        if self.read_only {
            Err(Errno::ROFS)
        } else {
            Ok(())
        }
    }

    /// The path of entry `name` in directory node `parent`, and that directory (resolved
    /// beneath the root), for making or removing the entry.
    fn child(&self, parent: u64, name: &[u8]) -> Res<(Vec<u8>, OwnedFd)> {
        let path = join(self.table.path(parent)?, component(name)?);
        let dir = self.open_dir(split(&path).0)?;
        Ok((path, dir))
    }

    /// The directory at `rel` (`O_PATH`), resolved beneath the root.
    fn open_dir(&self, rel: &[u8]) -> Res<OwnedFd> {
        rustix::fs::openat2(
            &self.root,
            os(rel),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            beneath(),
        )
    }

    /// `lstat` of `rel`: the parent resolved beneath the root, the leaf not followed.
    fn lstat(&self, rel: &[u8]) -> Res<Stat> {
        if rel.is_empty() {
            return rustix::fs::fstat(&self.root);
        }
        let (parent, name) = split(rel);
        let dir = self.open_dir(parent)?;
        rustix::fs::statat(&dir, os(name), AtFlags::SYMLINK_NOFOLLOW)
    }

    fn reopen(&self, rel: &[u8], flags: u32, dir: bool) -> Res<OwnedFd> {
        // Non-blocking: opening a FIFO (a guest can make one) must not wait for its other end,
        // which would hang the device's worker; regular files and directories are unaffected.
        let mut f =
            OFlags::from_bits_retain(flags) | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK;
        if dir {
            f |= OFlags::DIRECTORY;
        }
        rustix::fs::openat2(&self.root, os(rel), f, Mode::empty(), beneath())
    }

    /// An open handle's descriptor, reopened by path after a restore.
    fn handle_fd(&mut self, fh: u64) -> Res<&OwnedFd> {
        let h = self.table.handles.get(&fh).ok_or(Errno::BADF)?;
        if h.fd.is_none() {
            let fd = self
                .reopen(&h.path, h.flags, h.dir)
                .map_err(|_| Errno::IO)?;
            if let Some(h) = self.table.handles.get_mut(&fh) {
                h.fd = Some(fd);
            }
        }
        self.table
            .handles
            .get(&fh)
            .and_then(|h| h.fd.as_ref())
            .ok_or(Errno::BADF)
    }
}
