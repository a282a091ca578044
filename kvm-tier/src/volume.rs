//! Volumes: host directories shared live with the guest, served over virtio-fs.
//!
//! [`VolumeServer`] is the host side of one volume: a FUSE server (the protocol the guest's
//! `virtiofs` driver speaks) over a host directory. It is built to be safe against a hostile
//! guest and to survive checkpoints:
//!
//! - **Confinement.** Every host path is resolved with `openat2(RESOLVE_BENEATH |
//!   RESOLVE_NO_MAGICLINKS)` from the volume's root, and the last component of a path is acted
//!   on relative to its parent without following symlinks. A symlink (made by the guest, by
//!   another sandbox, or on the host) can never lead a request outside the directory.
//! - **No stale guest caches.** Entries and attributes are valid for 0 s and every file is
//!   opened `FOPEN_DIRECT_IO`, so the guest's page cache never holds volume data: after a
//!   resume (or while another sandbox or the host writes the directory) the guest reads what
//!   is on the host now.
//! - **State that survives a checkpoint.** The guest kernel refers to files by node ids and
//!   open handles. The server keeps each as a path relative to the root (never a host file
//!   descriptor), so [`VolumeServer::state`] goes into a snapshot and a restored server —
//!   in any process — reopens files lazily by path. A file deleted on the host while the
//!   sandbox slept answers `ESTALE` (its node) or `EIO` (an open handle).
//!
//! The volume's contents are not part of any snapshot: they are the host directory, shared by
//! every sandbox that mounts it and outliving all of them.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{
    AtFlags, Dir, FileType, Mode, OFlags, RenameFlags, ResolveFlags, Stat, Timespec, Timestamps,
};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Most directory entries the listings cached for open handles hold together (besides the one
/// being read).
pub const MAX_CACHED_ENTRIES: usize = 1 << 14;

/// The root directory's node id.
pub const ROOT_ID: u64 = 1;
/// Largest `read`/`write` payload the server accepts (also announced as `max_write`).
pub const MAX_IO: u32 = 128 << 10;
/// Most handles a guest may hold open on one volume (each can hold a host descriptor): past
/// it, opens fail with `ENFILE` rather than exhausting the host process's descriptors.
pub const MAX_HANDLES: usize = 1024;
/// Most node ids a guest may hold on one volume (its kernel forgets unused ones): past it,
/// lookups fail with `ENOMEM` rather than growing host memory without bound.
pub const MAX_NODES: usize = 1 << 18;
/// FUSE protocol version answered to `INIT` (7.31: what Linux 5.4+ speaks, with no features
/// this server does not implement).
const FUSE_MAJOR: u32 = 7;
const FUSE_MINOR: u32 = 31;

// Opcodes (include/uapi/linux/fuse.h).
const LOOKUP: u32 = 1;
pub(crate) const FORGET: u32 = 2;
const GETATTR: u32 = 3;
const SETATTR: u32 = 4;
const READLINK: u32 = 5;
const SYMLINK: u32 = 6;
const MKNOD: u32 = 8;
const MKDIR: u32 = 9;
const UNLINK: u32 = 10;
const RMDIR: u32 = 11;
const RENAME: u32 = 12;
const LINK: u32 = 13;
const OPEN: u32 = 14;
const READ: u32 = 15;
const WRITE: u32 = 16;
const STATFS: u32 = 17;
const RELEASE: u32 = 18;
const FSYNC: u32 = 20;
const FLUSH: u32 = 25;
const INIT: u32 = 26;
const OPENDIR: u32 = 27;
const READDIR: u32 = 28;
const RELEASEDIR: u32 = 29;
const FSYNCDIR: u32 = 30;
const CREATE: u32 = 35;
const DESTROY: u32 = 38;
pub(crate) const BATCH_FORGET: u32 = 42;
const RENAME2: u32 = 45;

// INIT flags.
const FUSE_BIG_WRITES: u32 = 1 << 5;
const FUSE_MAX_PAGES: u32 = 1 << 22;
// GETATTR flags.
const FUSE_GETATTR_FH: u32 = 1;
// SETATTR `valid` bits.
const FATTR_MODE: u32 = 1 << 0;
const FATTR_UID: u32 = 1 << 1;
const FATTR_GID: u32 = 1 << 2;
const FATTR_SIZE: u32 = 1 << 3;
const FATTR_ATIME: u32 = 1 << 4;
const FATTR_MTIME: u32 = 1 << 5;
const FATTR_FH: u32 = 1 << 6;
const FATTR_ATIME_NOW: u32 = 1 << 7;
const FATTR_MTIME_NOW: u32 = 1 << 8;
// OPEN reply flags.
const FOPEN_DIRECT_IO: u32 = 1 << 0;

/// The header of every request.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    pub padding: u32,
}

/// The header of every reply.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct OutHeader {
    pub len: u32,
    pub error: i32,
    pub unique: u64,
}

#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: u64,
    pub mtime: u64,
    pub ctime: u64,
    pub atimensec: u32,
    pub mtimensec: u32,
    pub ctimensec: u32,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
    pub flags: u32,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct EntryOut {
    pub nodeid: u64,
    pub generation: u64,
    pub entry_valid: u64,
    pub attr_valid: u64,
    pub entry_valid_nsec: u32,
    pub attr_valid_nsec: u32,
    pub attr: Attr,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
struct AttrOut {
    attr_valid: u64,
    attr_valid_nsec: u32,
    dummy: u32,
    attr: Attr,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
struct InitIn {
    major: u32,
    minor: u32,
    max_readahead: u32,
    flags: u32,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
struct InitOut {
    major: u32,
    minor: u32,
    max_readahead: u32,
    flags: u32,
    max_background: u16,
    congestion_threshold: u16,
    max_write: u32,
    time_gran: u32,
    max_pages: u16,
    map_alignment: u16,
    flags2: u32,
    unused: [u32; 7],
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
struct ForgetIn {
    nlookup: u64,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
struct BatchForgetIn {
    count: u32,
    dummy: u32,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
struct ForgetOne {
    nodeid: u64,
    nlookup: u64,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
struct GetattrIn {
    flags: u32,
    dummy: u32,
    fh: u64,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
struct SetattrIn {
    valid: u32,
    padding: u32,
    fh: u64,
    size: u64,
    lock_owner: u64,
    atime: u64,
    mtime: u64,
    ctime: u64,
    atimensec: u32,
    mtimensec: u32,
    ctimensec: u32,
    mode: u32,
    unused4: u32,
    uid: u32,
    gid: u32,
    unused5: u32,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
struct MknodIn {
    mode: u32,
    rdev: u32,
    umask: u32,
    padding: u32,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
struct MkdirIn {
    mode: u32,
    umask: u32,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
struct RenameIn {
    newdir: u64,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
struct Rename2In {
    newdir: u64,
    flags: u32,
    padding: u32,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
struct LinkIn {
    oldnodeid: u64,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
struct OpenIn {
    flags: u32,
    open_flags: u32,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
struct OpenOut {
    fh: u64,
    open_flags: u32,
    padding: u32,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
struct CreateIn {
    flags: u32,
    mode: u32,
    umask: u32,
    open_flags: u32,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
struct ReadIn {
    fh: u64,
    offset: u64,
    size: u32,
    read_flags: u32,
    lock_owner: u64,
    flags: u32,
    padding: u32,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
struct WriteIn {
    fh: u64,
    offset: u64,
    size: u32,
    write_flags: u32,
    lock_owner: u64,
    flags: u32,
    padding: u32,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
struct WriteOut {
    size: u32,
    padding: u32,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
struct ReleaseIn {
    fh: u64,
    flags: u32,
    release_flags: u32,
    lock_owner: u64,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
struct FsyncIn {
    fh: u64,
    fsync_flags: u32,
    padding: u32,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
struct Dirent {
    ino: u64,
    off: u64,
    namelen: u32,
    kind: u32,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
struct StatfsOut {
    blocks: u64,
    bfree: u64,
    bavail: u64,
    files: u64,
    ffree: u64,
    bsize: u32,
    namelen: u32,
    frsize: u32,
    padding: u32,
    spare: [u32; 6],
}

/// Longest path a volume state may hold (Linux's `PATH_MAX`).
const MAX_PATH: usize = 4096;
/// Ids (nodes and handles) a restored volume may go on allocating from: below it, a guest making
/// a million lookups a second would need 140,000 years to overflow.
const MAX_NEXT_ID: u64 = 1 << 62;

/// A node (a path the guest looked up) in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSnap {
    pub id: u64,
    /// Path relative to the volume root, as raw bytes.
    #[serde(deserialize_with = "dormant_core::snapshot::bounded_vec::<_, _, MAX_PATH>")]
    pub path: Vec<u8>,
    pub lookups: u64,
}

/// An open file or directory handle in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandleSnap {
    pub fh: u64,
    #[serde(deserialize_with = "dormant_core::snapshot::bounded_vec::<_, _, MAX_PATH>")]
    pub path: Vec<u8>,
    /// `open(2)` flags to reopen it with (never `O_CREAT`/`O_TRUNC`/`O_EXCL`).
    pub flags: u32,
    pub dir: bool,
}

/// What the guest kernel holds of a volume, in a snapshot: its node ids and open handles.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct VolumeState {
    /// The host directory this state refers to.
    pub root: PathBuf,
    /// At most [`MAX_NODES`] (decoding refuses more).
    #[serde(deserialize_with = "dormant_core::snapshot::bounded_vec::<_, _, MAX_NODES>")]
    pub nodes: Vec<NodeSnap>,
    /// At most [`MAX_HANDLES`] (decoding refuses more).
    #[serde(deserialize_with = "dormant_core::snapshot::bounded_vec::<_, _, MAX_HANDLES>")]
    pub handles: Vec<HandleSnap>,
    pub next_id: u64,
}

/// Whether `path` is a relative path of valid components (`a/b/c`: no empty, `.` or `..`
/// component, no NUL, no leading `/`), the root being the empty path.
fn valid_relative(path: &[u8]) -> bool {
    path.len() <= MAX_PATH
        && !path.contains(&0)
        && (path.is_empty() || path.split(|&b| b == b'/').all(|c| component(c).is_ok()))
}

impl VolumeState {
    /// What restoring requires of a (untrusted) state, so that the server rebuilt from it is
    /// one a guest could have built: at most [`MAX_NODES`] nodes and [`MAX_HANDLES`] handles;
    /// node ids above the root's, each once, each node a distinct relative path below the root
    /// (no absolute path, no `..`); handles each once, with the flags an `OPEN` keeps (never
    /// `O_CREAT`, `O_TRUNC`, `O_EXCL`; read-only for directories); every id below `next_id`,
    /// which leaves room to allocate.
    pub fn check(&self) -> Result<(), String> {
        if self.nodes.len() >= MAX_NODES || self.handles.len() > MAX_HANDLES {
            return Err(format!(
                "{} nodes and {} handles (at most {} and {MAX_HANDLES})",
                self.nodes.len(),
                self.handles.len(),
                MAX_NODES - 1
            ));
        }
        if self.next_id <= ROOT_ID || self.next_id > MAX_NEXT_ID {
            return Err(format!("next id {}", self.next_id));
        }
        let mut ids = std::collections::HashSet::with_capacity(self.nodes.len());
        let mut paths = std::collections::HashSet::with_capacity(self.nodes.len());
        for n in &self.nodes {
            if n.id <= ROOT_ID || n.id >= self.next_id || !ids.insert(n.id) {
                return Err(format!("node id {} repeated or out of range", n.id));
            }
            if n.path.is_empty() || !valid_relative(&n.path) || !paths.insert(&n.path[..]) {
                return Err(format!(
                    "node {} has a repeated or invalid path {:?}",
                    n.id,
                    String::from_utf8_lossy(&n.path)
                ));
            }
        }
        let mut fhs = std::collections::HashSet::with_capacity(self.handles.len());
        for h in &self.handles {
            if h.fh <= ROOT_ID || h.fh >= self.next_id || !fhs.insert(h.fh) {
                return Err(format!("handle {} repeated or out of range", h.fh));
            }
            if !valid_relative(&h.path) {
                return Err(format!(
                    "handle {} has an invalid path {:?}",
                    h.fh,
                    String::from_utf8_lossy(&h.path)
                ));
            }
            let flags_ok = if h.dir {
                h.flags == OFlags::RDONLY.bits()
            } else {
                h.flags == allowed_open_flags(h.flags).bits()
            };
            if !flags_ok {
                return Err(format!("handle {} has open flags {:#o}", h.fh, h.flags));
            }
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Node {
    path: Vec<u8>,
    lookups: u64,
}

#[derive(Debug)]
struct Handle {
    path: Vec<u8>,
    flags: u32,
    dir: bool,
    /// Opened lazily (a restored handle reopens on first use).
    fd: Option<OwnedFd>,
    /// A directory's entries as read at offset 0: `(ino, d_type, name)`.
    entries: Option<Vec<(u64, u32, Vec<u8>)>>,
}

/// The FUSE server of one volume.
#[derive(Debug)]
pub struct VolumeServer {
    root: OwnedFd,
    root_path: PathBuf,
    read_only: bool,
    nodes: HashMap<u64, Node>,
    by_path: HashMap<Vec<u8>, u64>,
    handles: HashMap<u64, Handle>,
    next_id: u64,
}

type Res<T> = std::result::Result<T, Errno>;

/// The resolution every host path goes through.
fn beneath() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS
}

/// The `open(2)` flags a guest may pass on to the host (access mode and write behaviour).
fn allowed_open_flags(flags: u32) -> OFlags {
    let f = OFlags::from_bits_retain(flags);
    f & (OFlags::RWMODE | OFlags::APPEND | OFlags::SYNC | OFlags::DSYNC | OFlags::NOATIME)
}

/// The flags a handle from a snapshot is reopened with. They are snapshot bytes: keep only what
/// `OPEN` would have kept (never create or truncate), and on a volume the caller granted
/// read-only, open for reading only whatever the snapshot says.
fn restored_open_flags(flags: u32, dir: bool, read_only: bool) -> u32 {
    if dir {
        return OFlags::RDONLY.bits();
    }
    let f = allowed_open_flags(flags);
    if read_only {
        (f & !(OFlags::RWMODE | OFlags::APPEND)).bits()
    } else {
        f.bits()
    }
}

fn is_write(flags: u32) -> bool {
    let f = OFlags::from_bits_retain(flags);
    f.intersects(OFlags::WRONLY | OFlags::RDWR | OFlags::TRUNC | OFlags::APPEND)
}

/// A single path component from the guest: no `/`, not `.` or `..`, not empty.
fn component(name: &[u8]) -> Res<&[u8]> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(Errno::INVAL);
    }
    if name.len() > 255 {
        return Err(Errno::NAMETOOLONG);
    }
    Ok(name)
}

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
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
fn split(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

/// The last component of a non-root relative path.
fn leaf(path: &[u8]) -> &[u8] {
    split(path).1
}

fn os(path: &[u8]) -> &OsStr {
    if path.is_empty() {
        OsStr::new(".")
    } else {
        OsStr::from_bytes(path)
    }
}

/// Whether `path` is `prefix` or below it.
fn under(path: &[u8], prefix: &[u8]) -> bool {
    path == prefix
        || (path.len() > prefix.len() && path.starts_with(prefix) && path[prefix.len()] == b'/')
}

fn attr(st: &Stat) -> Attr {
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

/// Reads a `T` at the front of `body`.
fn take<T: FromBytes>(body: &[u8]) -> Res<(T, &[u8])> {
    T::read_from_prefix(body).map_err(|_| Errno::INVAL)
}

/// A NUL-terminated string at the front of `body`.
fn cstr(body: &[u8]) -> Res<(&[u8], &[u8])> {
    let end = body.iter().position(|&b| b == 0).ok_or(Errno::INVAL)?;
    Ok((&body[..end], &body[end + 1..]))
}

fn entry_out(nodeid: u64, st: &Stat) -> EntryOut {
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
        let mut s = VolumeServer {
            root: fd,
            root_path: root.to_path_buf(),
            read_only,
            nodes: HashMap::new(),
            by_path: HashMap::new(),
            handles: HashMap::new(),
            next_id: ROOT_ID + 1,
        };
        s.nodes.insert(
            ROOT_ID,
            Node {
                path: Vec::new(),
                lookups: 1,
            },
        );
        s.by_path.insert(Vec::new(), ROOT_ID);
        if let Some(st) = state.filter(|st| st.root == root) {
            for n in &st.nodes {
                if n.id != ROOT_ID {
                    s.by_path.insert(n.path.clone(), n.id);
                    s.nodes.insert(
                        n.id,
                        Node {
                            path: n.path.clone(),
                            lookups: n.lookups,
                        },
                    );
                }
            }
            for h in &st.handles {
                s.handles.insert(
                    h.fh,
                    Handle {
                        path: h.path.clone(),
                        flags: restored_open_flags(h.flags, h.dir, read_only),
                        dir: h.dir,
                        fd: None,
                        entries: None,
                    },
                );
            }
            s.next_id = st.next_id.max(ROOT_ID + 1);
        }
        Ok(s)
    }

    pub fn root(&self) -> &Path {
        &self.root_path
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// What the guest holds of this volume, for a snapshot.
    pub fn state(&self) -> VolumeState {
        let mut nodes: Vec<NodeSnap> = self
            .nodes
            .iter()
            .filter(|(id, _)| **id != ROOT_ID)
            .map(|(&id, n)| NodeSnap {
                id,
                path: n.path.clone(),
                lookups: n.lookups,
            })
            .collect();
        nodes.sort_by_key(|n| n.id);
        let mut handles: Vec<HandleSnap> = self
            .handles
            .iter()
            .map(|(&fh, h)| HandleSnap {
                fh,
                path: h.path.clone(),
                flags: h.flags,
                dir: h.dir,
            })
            .collect();
        handles.sort_by_key(|h| h.fh);
        VolumeState {
            root: self.root_path.clone(),
            nodes,
            handles,
            next_id: self.next_id,
        }
    }

    /// Serves one request (`req`: header and arguments) and puts the reply in `reply`
    /// (emptied first; left empty for requests that have none, such as `FORGET`).
    pub fn handle(&mut self, req: &[u8], reply: &mut Vec<u8>) {
        reply.clear();
        let Ok((h, body)) = InHeader::read_from_prefix(req) else {
            return;
        };
        let body = body
            .get(..(h.len as usize).saturating_sub(size_of::<InHeader>()))
            .unwrap_or(body);
        match h.opcode {
            FORGET => {
                if let Ok((f, _)) = take::<ForgetIn>(body) {
                    self.forget(h.nodeid, f.nlookup);
                }
                return;
            }
            BATCH_FORGET => {
                if let Ok((b, mut rest)) = take::<BatchForgetIn>(body) {
                    for _ in 0..b.count {
                        let Ok((one, r)) = take::<ForgetOne>(rest) else {
                            break;
                        };
                        self.forget(one.nodeid, one.nlookup);
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
            INIT => {
                let (init, _) = take::<InitIn>(body)?;
                if init.major != FUSE_MAJOR {
                    return Err(Errno::PROTO);
                }
                let reply = InitOut {
                    major: FUSE_MAJOR,
                    minor: FUSE_MINOR.min(init.minor),
                    max_readahead: init.max_readahead,
                    flags: init.flags & (FUSE_BIG_WRITES | FUSE_MAX_PAGES),
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
            }
            DESTROY => {}
            LOOKUP => {
                let (name, _) = cstr(body)?;
                let path = join(self.path(id)?, component(name)?);
                let st = self.lstat(&path)?;
                let nodeid = self.remember(path)?;
                out.extend_from_slice(entry_out(nodeid, &st).as_bytes());
            }
            GETATTR => {
                let (g, _) = take::<GetattrIn>(body)?;
                let st = if g.flags & FUSE_GETATTR_FH != 0 {
                    let fd = self.handle_fd(g.fh)?;
                    rustix::fs::fstat(fd)?
                } else {
                    let path = self.path(id)?.to_vec();
                    self.lstat(&path)?
                };
                self.attr_out(out, &st);
            }
            SETATTR => {
                let (s, _) = take::<SetattrIn>(body)?;
                let st = self.setattr(id, &s)?;
                self.attr_out(out, &st);
            }
            READLINK => {
                let path = self.path(id)?.to_vec();
                let (parent, name) = split(&path);
                let dir = self.open_dir(parent)?;
                let target = rustix::fs::readlinkat(&dir, os(name), Vec::new())?;
                out.extend_from_slice(target.as_bytes());
            }
            SYMLINK => {
                self.writable()?;
                let (name, rest) = cstr(body)?;
                let (target, _) = cstr(rest)?;
                let (path, dir) = self.child(id, name)?;
                rustix::fs::symlinkat(OsStr::from_bytes(target), &dir, os(leaf(&path)))?;
                self.entry(out, path)?;
            }
            MKNOD => {
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
                self.entry(out, path)?;
            }
            MKDIR => {
                self.writable()?;
                let (m, rest) = take::<MkdirIn>(body)?;
                let (name, _) = cstr(rest)?;
                let (path, dir) = self.child(id, name)?;
                let mode = Mode::from_bits_truncate(m.mode & 0o7777);
                rustix::fs::mkdirat(&dir, os(leaf(&path)), mode)?;
                self.entry(out, path)?;
            }
            UNLINK | RMDIR => {
                self.writable()?;
                let (name, _) = cstr(body)?;
                let (path, dir) = self.child(id, name)?;
                let flags = if h.opcode == RMDIR {
                    AtFlags::REMOVEDIR
                } else {
                    AtFlags::empty()
                };
                rustix::fs::unlinkat(&dir, os(leaf(&path)), flags)?;
                // A new file at this path is a new node.
                self.by_path.remove(&path);
            }
            RENAME => {
                let (r, rest) = take::<RenameIn>(body)?;
                self.rename(id, r.newdir, 0, rest)?;
            }
            RENAME2 => {
                let (r, rest) = take::<Rename2In>(body)?;
                self.rename(id, r.newdir, r.flags, rest)?;
            }
            LINK => {
                self.writable()?;
                let (l, rest) = take::<LinkIn>(body)?;
                let (name, _) = cstr(rest)?;
                let old = self.path(l.oldnodeid)?.to_vec();
                if old.is_empty() {
                    return Err(Errno::PERM);
                }
                let (path, nd) = self.child(id, name)?;
                let od = self.open_dir(split(&old).0)?;
                rustix::fs::linkat(&od, os(leaf(&old)), &nd, os(leaf(&path)), AtFlags::empty())?;
                self.entry(out, path)?;
            }
            OPEN | OPENDIR => {
                let (o, _) = take::<OpenIn>(body)?;
                let dir = h.opcode == OPENDIR;
                if !dir && is_write(o.flags) {
                    self.writable()?;
                }
                self.handle_room()?;
                let path = self.path(id)?.to_vec();
                let flags = if dir {
                    OFlags::RDONLY.bits()
                } else {
                    allowed_open_flags(o.flags).bits()
                };
                let fd = self.reopen(&path, flags, dir)?;
                let fh = self.new_id();
                self.handles.insert(
                    fh,
                    Handle {
                        path,
                        flags,
                        dir,
                        fd: Some(fd),
                        entries: None,
                    },
                );
                let open_flags = if dir { 0 } else { FOPEN_DIRECT_IO };
                out.extend_from_slice(
                    OpenOut {
                        fh,
                        open_flags,
                        padding: 0,
                    }
                    .as_bytes(),
                );
            }
            CREATE => {
                self.writable()?;
                let (c, rest) = take::<CreateIn>(body)?;
                self.handle_room()?;
                let (name, _) = cstr(rest)?;
                let (path, dir) = self.child(id, name)?;
                let keep = allowed_open_flags(c.flags);
                let create = OFlags::from_bits_retain(c.flags) & (OFlags::EXCL | OFlags::TRUNC);
                // Non-blocking, as in `reopen`: the name may be an existing FIFO.
                let fd = rustix::fs::openat2(
                    &dir,
                    os(leaf(&path)),
                    keep | create
                        | OFlags::CREATE
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC
                        | OFlags::NONBLOCK,
                    Mode::from_bits_truncate(c.mode & 0o7777),
                    beneath(),
                )?;
                let st = rustix::fs::fstat(&fd)?;
                let nodeid = self.remember(path.clone())?;
                let fh = self.new_id();
                self.handles.insert(
                    fh,
                    Handle {
                        path,
                        flags: keep.bits(),
                        dir: false,
                        fd: Some(fd),
                        entries: None,
                    },
                );
                out.extend_from_slice(entry_out(nodeid, &st).as_bytes());
                out.extend_from_slice(
                    OpenOut {
                        fh,
                        open_flags: FOPEN_DIRECT_IO,
                        padding: 0,
                    }
                    .as_bytes(),
                );
            }
            READ => {
                let (r, _) = take::<ReadIn>(body)?;
                let size = r.size.min(MAX_IO) as usize;
                let fd = self.handle_fd(r.fh)?;
                let start = out.len();
                out.resize(start + size, 0);
                let mut done = 0;
                while done < size {
                    match rustix::io::pread(fd, &mut out[start + done..], r.offset + done as u64) {
                        Ok(0) => break,
                        Ok(n) => done += n,
                        Err(Errno::INTR) => {}
                        Err(e) => return Err(e),
                    }
                }
                out.truncate(start + done);
            }
            WRITE => {
                self.writable()?;
                let (w, data) = take::<WriteIn>(body)?;
                let data = data.get(..w.size as usize).ok_or(Errno::INVAL)?;
                let append = self
                    .handles
                    .get(&w.fh)
                    .is_some_and(|h| OFlags::from_bits_retain(h.flags).contains(OFlags::APPEND));
                let fd = self.handle_fd(w.fh)?;
                let mut done = 0;
                while done < data.len() {
                    // An O_APPEND descriptor appends whatever the offset.
                    let r = if append {
                        rustix::io::write(fd, &data[done..])
                    } else {
                        rustix::io::pwrite(fd, &data[done..], w.offset + done as u64)
                    };
                    match r {
                        Ok(0) => break,
                        Ok(n) => done += n,
                        Err(Errno::INTR) => {}
                        Err(e) if done == 0 => return Err(e),
                        Err(_) => break,
                    }
                }
                out.extend_from_slice(
                    WriteOut {
                        size: done as u32,
                        padding: 0,
                    }
                    .as_bytes(),
                );
            }
            FLUSH => {}
            RELEASE | RELEASEDIR => {
                let (r, _) = take::<ReleaseIn>(body)?;
                self.handles.remove(&r.fh);
            }
            FSYNC | FSYNCDIR => {
                let (f, _) = take::<FsyncIn>(body)?;
                let fd = self.handle_fd(f.fh)?;
                // A read-only descriptor of a directory may refuse fsync: nothing to flush.
                match rustix::fs::fsync(fd) {
                    Ok(()) | Err(Errno::BADF | Errno::INVAL) => {}
                    Err(e) => return Err(e),
                }
            }
            READDIR => {
                let (r, _) = take::<ReadIn>(body)?;
                self.readdir(&r, out)?;
            }
            STATFS => {
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
            }
            _ => return Err(Errno::NOSYS),
        }
        Ok(())
    }

    fn writable(&self) -> Res<()> {
        if self.read_only {
            Err(Errno::ROFS)
        } else {
            Ok(())
        }
    }

    fn new_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn path(&self, id: u64) -> Res<&[u8]> {
        self.nodes
            .get(&id)
            .map(|n| n.path.as_slice())
            .ok_or(Errno::STALE)
    }

    /// The node for `path`, one more lookup of it.
    fn remember(&mut self, path: Vec<u8>) -> Res<u64> {
        if let Some(&id) = self.by_path.get(&path)
            && let Some(n) = self.nodes.get_mut(&id)
        {
            n.lookups += 1;
            return Ok(id);
        }
        if self.nodes.len() >= MAX_NODES {
            return Err(Errno::NOMEM);
        }
        let id = self.new_id();
        self.by_path.insert(path.clone(), id);
        self.nodes.insert(id, Node { path, lookups: 1 });
        Ok(id)
    }

    /// Refuses a new handle past [`MAX_HANDLES`].
    fn handle_room(&self) -> Res<()> {
        if self.handles.len() >= MAX_HANDLES {
            Err(Errno::NFILE)
        } else {
            Ok(())
        }
    }

    fn forget(&mut self, id: u64, n: u64) {
        if id == ROOT_ID {
            return;
        }
        if let Some(node) = self.nodes.get_mut(&id) {
            node.lookups = node.lookups.saturating_sub(n);
            if node.lookups == 0 {
                let path = std::mem::take(&mut node.path);
                self.nodes.remove(&id);
                if self.by_path.get(&path) == Some(&id) {
                    self.by_path.remove(&path);
                }
            }
        }
    }

    /// The path of entry `name` in directory node `parent`, and that directory (resolved
    /// beneath the root), for making or removing the entry.
    fn child(&self, parent: u64, name: &[u8]) -> Res<(Vec<u8>, OwnedFd)> {
        let path = join(self.path(parent)?, component(name)?);
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
        let h = self.handles.get(&fh).ok_or(Errno::BADF)?;
        if h.fd.is_none() {
            let fd = self
                .reopen(&h.path, h.flags, h.dir)
                .map_err(|_| Errno::IO)?;
            if let Some(h) = self.handles.get_mut(&fh) {
                h.fd = Some(fd);
            }
        }
        self.handles
            .get(&fh)
            .and_then(|h| h.fd.as_ref())
            .ok_or(Errno::BADF)
    }

    fn attr_out(&self, out: &mut Vec<u8>, st: &Stat) {
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

    /// Replies with the entry of a path just created.
    fn entry(&mut self, out: &mut Vec<u8>, path: Vec<u8>) -> Res<()> {
        let st = self.lstat(&path)?;
        let nodeid = self.remember(path)?;
        out.extend_from_slice(entry_out(nodeid, &st).as_bytes());
        Ok(())
    }

    fn setattr(&mut self, id: u64, s: &SetattrIn) -> Res<Stat> {
        let path = self.path(id)?.to_vec();
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
                && self.handles.get(&s.fh).is_some_and(|h| {
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

    fn rename(&mut self, olddir: u64, newdir: u64, flags: u32, names: &[u8]) -> Res<()> {
        self.writable()?;
        let (oldname, rest) = cstr(names)?;
        let (newname, _) = cstr(rest)?;
        let (old, od) = self.child(olddir, oldname)?;
        let (new, nd) = self.child(newdir, newname)?;
        let flags = RenameFlags::from_bits(flags).ok_or(Errno::INVAL)?;
        rustix::fs::renameat_with(&od, os(leaf(&old)), &nd, os(leaf(&new)), flags)?;
        let exchange = flags.contains(RenameFlags::EXCHANGE);
        if !exchange {
            // Whatever was at the destination is gone.
            self.by_path.retain(|p, _| !under(p, &new));
        }
        let swap = |p: &mut Vec<u8>| {
            let (from, to) = if under(p, &old) {
                (&old, &new)
            } else if exchange && under(p, &new) {
                (&new, &old)
            } else {
                return;
            };
            let mut q = to.clone();
            q.extend_from_slice(&p[from.len()..]);
            *p = q;
        };
        let mut by_path = HashMap::with_capacity(self.nodes.len());
        for (&id, n) in self.nodes.iter_mut() {
            let was_live = self.by_path.get(&n.path) == Some(&id);
            swap(&mut n.path);
            if was_live {
                by_path.insert(n.path.clone(), id);
            }
        }
        self.by_path = by_path;
        for h in self.handles.values_mut() {
            swap(&mut h.path);
        }
        Ok(())
    }

    fn readdir(&mut self, r: &ReadIn, out: &mut Vec<u8>) -> Res<()> {
        let fresh = r.offset == 0 || self.handles.get(&r.fh).is_none_or(|h| h.entries.is_none());
        if fresh {
            let fd = self.handle_fd(r.fh)?;
            let mut entries = Vec::new();
            for e in Dir::read_from(fd)? {
                let e = e?;
                let kind = FileType::as_raw_mode(e.file_type()) >> 12;
                entries.push((e.ino(), kind, e.file_name().to_bytes().to_vec()));
            }
            entries.sort_by(|a, b| a.2.cmp(&b.2));
            // The listings cached for other handles make room: a guest holding many handles
            // on a large directory cannot multiply it in host memory. An evicted handle reads
            // its directory again at its next READDIR.
            let cached: usize = (self.handles.iter())
                .filter(|&(&fh, _)| fh != r.fh)
                .filter_map(|(_, h)| h.entries.as_ref().map(Vec::len))
                .sum();
            if cached + entries.len() > MAX_CACHED_ENTRIES {
                for h in self.handles.values_mut() {
                    h.entries = None;
                }
            }
            if let Some(h) = self.handles.get_mut(&r.fh) {
                h.entries = Some(entries);
            }
        }
        let h = self.handles.get(&r.fh).ok_or(Errno::BADF)?;
        let entries = h.entries.as_deref().unwrap_or_default();
        // The guest's size is capped like a READ's: a listing never makes a larger reply.
        let limit = out.len() + r.size.min(MAX_IO) as usize;
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(r.offset as usize) {
            let rec = size_of::<Dirent>() + name.len();
            let padded = rec.next_multiple_of(8);
            if out.len() + padded > limit {
                break;
            }
            let d = Dirent {
                ino: *ino,
                off: i as u64 + 1,
                namelen: name.len() as u32,
                kind: *kind,
            };
            out.extend_from_slice(d.as_bytes());
            out.extend_from_slice(name);
            out.resize(out.len() + (padded - rec), 0);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use zerocopy::FromZeros;

    struct Guest {
        s: VolumeServer,
        unique: u64,
    }

    impl Guest {
        fn new(root: &Path, read_only: bool) -> Guest {
            Guest {
                s: VolumeServer::open(root, read_only, None).unwrap(),
                unique: 0,
            }
        }

        /// The bytes of a request: header, then `body`.
        fn request(&self, opcode: u32, nodeid: u64, body: &[u8]) -> Vec<u8> {
            let h = InHeader {
                len: (size_of::<InHeader>() + body.len()) as u32,
                opcode,
                unique: self.unique,
                nodeid,
                uid: 0,
                gid: 0,
                pid: 1,
                padding: 0,
            };
            let mut req = h.as_bytes().to_vec();
            req.extend_from_slice(body);
            req
        }

        /// One request; the reply's body, or the errno.
        fn call(
            &mut self,
            opcode: u32,
            nodeid: u64,
            body: &[u8],
        ) -> std::result::Result<Vec<u8>, i32> {
            self.unique += 1;
            let req = self.request(opcode, nodeid, body);
            let mut reply = Vec::new();
            self.s.handle(&req, &mut reply);
            let (out, rest) = OutHeader::read_from_prefix(&reply).unwrap();
            assert_eq!(out.unique, self.unique);
            assert_eq!(out.len as usize, reply.len());
            if out.error != 0 {
                assert!(rest.is_empty());
                Err(-out.error)
            } else {
                Ok(rest.to_vec())
            }
        }

        fn lookup(&mut self, parent: u64, name: &str) -> std::result::Result<EntryOut, i32> {
            let body = self.call(LOOKUP, parent, &cstring(name))?;
            Ok(EntryOut::read_from_prefix(&body).unwrap().0)
        }

        fn open(&mut self, node: u64, flags: i32) -> std::result::Result<u64, i32> {
            let o = OpenIn {
                flags: flags as u32,
                open_flags: 0,
            };
            let body = self.call(OPEN, node, o.as_bytes())?;
            let out = OpenOut::read_from_prefix(&body).unwrap().0;
            assert_eq!(out.open_flags & FOPEN_DIRECT_IO, FOPEN_DIRECT_IO);
            Ok(out.fh)
        }

        fn read(&mut self, node: u64, fh: u64, size: u32) -> std::result::Result<Vec<u8>, i32> {
            let r = ReadIn {
                fh,
                offset: 0,
                size,
                read_flags: 0,
                lock_owner: 0,
                flags: 0,
                padding: 0,
            };
            self.call(READ, node, r.as_bytes())
        }

        fn write(
            &mut self,
            node: u64,
            fh: u64,
            offset: u64,
            data: &[u8],
        ) -> std::result::Result<u32, i32> {
            let w = WriteIn {
                fh,
                offset,
                size: data.len() as u32,
                write_flags: 0,
                lock_owner: 0,
                flags: 0,
                padding: 0,
            };
            let mut body = w.as_bytes().to_vec();
            body.extend_from_slice(data);
            let out = self.call(WRITE, node, &body)?;
            Ok(WriteOut::read_from_prefix(&out).unwrap().0.size)
        }

        fn create(&mut self, parent: u64, name: &str) -> std::result::Result<(u64, u64), i32> {
            let c = CreateIn {
                flags: (libc::O_RDWR | libc::O_CREAT) as u32,
                mode: 0o644,
                umask: 0,
                open_flags: 0,
            };
            let mut body = c.as_bytes().to_vec();
            body.extend_from_slice(&cstring(name));
            let out = self.call(CREATE, parent, &body)?;
            let (e, rest) = EntryOut::read_from_prefix(&out).unwrap();
            let o = OpenOut::read_from_prefix(rest).unwrap().0;
            Ok((e.nodeid, o.fh))
        }

        fn getattr(&mut self, node: u64) -> std::result::Result<Attr, i32> {
            let g = GetattrIn {
                flags: 0,
                dummy: 0,
                fh: 0,
            };
            let out = self.call(GETATTR, node, g.as_bytes())?;
            Ok(AttrOut::read_from_prefix(&out).unwrap().0.attr)
        }
    }

    fn cstring(s: &str) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    }

    fn init(g: &mut Guest) {
        let i = InitIn {
            major: 7,
            minor: 36,
            max_readahead: 1 << 20,
            flags: FUSE_BIG_WRITES | FUSE_MAX_PAGES | (1 << 0),
        };
        let out = g.call(INIT, 0, i.as_bytes()).unwrap();
        let o = InitOut::read_from_prefix(&out).unwrap().0;
        assert_eq!((o.major, o.minor), (7, FUSE_MINOR));
        assert_eq!(o.max_write, MAX_IO);
        assert_eq!(o.flags, FUSE_BIG_WRITES | FUSE_MAX_PAGES);
    }

    #[test]
    fn reads_host_files_and_writes_new_ones() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), b"from the host").unwrap();
        let mut g = Guest::new(dir.path(), false);
        init(&mut g);
        let e = g.lookup(ROOT_ID, "a.txt").unwrap();
        assert_eq!(e.attr.size, 13);
        assert_eq!((e.entry_valid, e.attr_valid), (0, 0), "no guest caching");
        let fh = g.open(e.nodeid, libc::O_RDONLY).unwrap();
        assert_eq!(g.read(e.nodeid, fh, 4096).unwrap(), b"from the host");
        assert_eq!(g.lookup(ROOT_ID, "missing").unwrap_err(), libc::ENOENT);

        let (node, fh) = g.create(ROOT_ID, "new.txt").unwrap();
        assert_eq!(g.write(node, fh, 0, b"hello ").unwrap(), 6);
        assert_eq!(g.write(node, fh, 6, b"volume").unwrap(), 6);
        assert_eq!(
            std::fs::read(dir.path().join("new.txt")).unwrap(),
            b"hello volume"
        );
        assert_eq!(g.getattr(node).unwrap().size, 12);

        // mkdir, readdir, rename, unlink.
        let mut m = MkdirIn {
            mode: 0o755,
            umask: 0,
        }
        .as_bytes()
        .to_vec();
        m.extend_from_slice(&cstring("sub"));
        let sub = EntryOut::read_from_prefix(&g.call(MKDIR, ROOT_ID, &m).unwrap())
            .unwrap()
            .0;
        assert!(dir.path().join("sub").is_dir());
        let o = OpenIn {
            flags: 0,
            open_flags: 0,
        };
        let dfh = OpenOut::read_from_prefix(&g.call(OPENDIR, ROOT_ID, o.as_bytes()).unwrap())
            .unwrap()
            .0
            .fh;
        let r = ReadIn {
            fh: dfh,
            offset: 0,
            size: 4096,
            read_flags: 0,
            lock_owner: 0,
            flags: 0,
            padding: 0,
        };
        let listing = g.call(READDIR, ROOT_ID, r.as_bytes()).unwrap();
        let mut names = Vec::new();
        let mut rest = &listing[..];
        while let Ok((d, tail)) = Dirent::read_from_prefix(rest) {
            names.push(String::from_utf8(tail[..d.namelen as usize].to_vec()).unwrap());
            let rec = (size_of::<Dirent>() + d.namelen as usize).next_multiple_of(8);
            rest = &rest[rec.min(rest.len())..];
        }
        assert_eq!(names, [".", "..", "a.txt", "new.txt", "sub"]);

        let mut rn = RenameIn { newdir: sub.nodeid }.as_bytes().to_vec();
        rn.extend_from_slice(&cstring("new.txt"));
        rn.extend_from_slice(&cstring("moved.txt"));
        g.call(RENAME, ROOT_ID, &rn).unwrap();
        assert!(dir.path().join("sub/moved.txt").is_file());
        // The node follows its file, and so does the open handle.
        assert_eq!(g.getattr(node).unwrap().size, 12);
        assert_eq!(
            g.s.state()
                .handles
                .iter()
                .find(|h| h.fh == fh)
                .unwrap()
                .path,
            b"sub/moved.txt"
        );
        g.call(UNLINK, sub.nodeid, &cstring("moved.txt")).unwrap();
        assert!(!dir.path().join("sub/moved.txt").exists());
    }

    #[test]
    fn nothing_outside_the_directory_is_reachable() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"host secret").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("out")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("s")).unwrap();
        std::os::unix::fs::symlink("../../../../../../../..", dir.path().join("up")).unwrap();
        let secret_mode = || {
            std::fs::metadata(outside.path().join("secret"))
                .unwrap()
                .permissions()
                .mode()
        };
        let mode_before = secret_mode();
        let mut g = Guest::new(dir.path(), false);
        init(&mut g);

        // Names are single components.
        for bad in ["..", ".", "a/b", "../x", ""] {
            assert_eq!(g.lookup(ROOT_ID, bad).unwrap_err(), libc::EINVAL, "{bad:?}");
        }
        // A symlink is reported as one (the guest resolves it in its own namespace) ...
        let out = g.lookup(ROOT_ID, "out").unwrap();
        assert_eq!(FileType::from_raw_mode(out.attr.mode), FileType::Symlink);
        let s = g.lookup(ROOT_ID, "s").unwrap();
        let up = g.lookup(ROOT_ID, "up").unwrap();
        // ... but a hostile guest treating it as a directory or file gets nowhere.
        assert!(g.lookup(out.nodeid, "secret").is_err());
        assert!(g.lookup(up.nodeid, "etc").is_err());
        assert!(g.open(s.nodeid, libc::O_RDONLY).is_err());
        assert!(g.open(out.nodeid, libc::O_RDONLY).is_err());
        let c = CreateIn {
            flags: (libc::O_RDWR | libc::O_CREAT) as u32,
            mode: 0o644,
            umask: 0,
            open_flags: 0,
        };
        let mut body = c.as_bytes().to_vec();
        body.extend_from_slice(&cstring("planted"));
        assert!(g.call(CREATE, out.nodeid, &body).is_err());
        // chmod and truncate of the symlink never reach its target.
        let mut sa = SetattrIn::new_zeroed();
        sa.valid = FATTR_MODE;
        sa.mode = 0o777;
        assert!(g.call(SETATTR, s.nodeid, sa.as_bytes()).is_err());
        sa.valid = FATTR_SIZE;
        sa.size = 0;
        assert!(g.call(SETATTR, s.nodeid, sa.as_bytes()).is_err());
        assert_eq!(
            std::fs::read(outside.path().join("secret")).unwrap(),
            b"host secret"
        );
        assert_eq!(secret_mode(), mode_before);
        assert!(!outside.path().join("planted").exists());
        // Unknown node ids and handles are refused.
        assert_eq!(g.getattr(999).unwrap_err(), libc::ESTALE);
        assert_eq!(g.read(ROOT_ID, 999, 10).unwrap_err(), libc::EBADF);
    }

    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_read_only_volume_refuses_every_change() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"keep").unwrap();
        let mut g = Guest::new(dir.path(), true);
        init(&mut g);
        let a = g.lookup(ROOT_ID, "a").unwrap();
        assert_eq!(g.open(a.nodeid, libc::O_RDWR).unwrap_err(), libc::EROFS);
        assert_eq!(
            g.open(a.nodeid, libc::O_WRONLY | libc::O_TRUNC)
                .unwrap_err(),
            libc::EROFS
        );
        let fh = g.open(a.nodeid, libc::O_RDONLY).unwrap();
        assert_eq!(g.write(a.nodeid, fh, 0, b"x").unwrap_err(), libc::EROFS);
        assert_eq!(g.create(ROOT_ID, "b").unwrap_err(), libc::EROFS);
        assert_eq!(
            g.call(UNLINK, ROOT_ID, &cstring("a")).unwrap_err(),
            libc::EROFS
        );
        let mut sa = SetattrIn::new_zeroed();
        sa.valid = FATTR_SIZE;
        assert_eq!(
            g.call(SETATTR, a.nodeid, sa.as_bytes()).unwrap_err(),
            libc::EROFS
        );
        assert_eq!(g.read(a.nodeid, fh, 100).unwrap(), b"keep");
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), b"keep");
    }

    #[test]
    fn node_ids_and_open_handles_survive_a_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/f"), b"version 1").unwrap();
        std::fs::write(dir.path().join("gone"), b"x").unwrap();
        let mut g = Guest::new(dir.path(), false);
        init(&mut g);
        let d = g.lookup(ROOT_ID, "d").unwrap();
        let f = g.lookup(d.nodeid, "f").unwrap();
        let fh = g.open(f.nodeid, libc::O_RDWR).unwrap();
        let gone = g.lookup(ROOT_ID, "gone").unwrap();
        let gone_fh = g.open(gone.nodeid, libc::O_RDONLY).unwrap();
        let state = g.s.state();
        let json = serde_json::to_vec(&state).unwrap();
        drop(g);

        // While the sandbox sleeps, the host changes the directory.
        std::fs::write(dir.path().join("d/f"), b"version 2, longer").unwrap();
        std::fs::remove_file(dir.path().join("gone")).unwrap();

        let state: VolumeState = serde_json::from_slice(&json).unwrap();
        let mut g = Guest {
            s: VolumeServer::open(dir.path(), false, Some(&state)).unwrap(),
            unique: 100,
        };
        assert_eq!(g.getattr(f.nodeid).unwrap().size, 17);
        assert_eq!(g.read(f.nodeid, fh, 100).unwrap(), b"version 2, longer");
        assert_eq!(g.write(f.nodeid, fh, 0, b"V").unwrap(), 1);
        assert_eq!(
            std::fs::read(dir.path().join("d/f")).unwrap(),
            b"Version 2, longer"
        );
        assert_eq!(g.getattr(gone.nodeid).unwrap_err(), libc::ENOENT);
        assert_eq!(g.read(gone.nodeid, gone_fh, 10).unwrap_err(), libc::EIO);
        // New ids never collide with restored ones.
        let (n, h) = g.create(d.nodeid, "new").unwrap();
        assert!(n >= state.next_id && h >= state.next_id && n != h);
        // A state from another directory is not applied.
        let other = tempfile::tempdir().unwrap();
        let mut g = Guest {
            s: VolumeServer::open(other.path(), false, Some(&state)).unwrap(),
            unique: 0,
        };
        assert_eq!(g.getattr(f.nodeid).unwrap_err(), libc::ESTALE);
    }

    /// A snapshot's handle table is untrusted: a handle recorded with flags `OPEN` never keeps
    /// (create, truncate) is refused with the whole state, and on a volume granted read-only a
    /// handle recorded for writing is reopened for reading only.
    #[test]
    fn restored_handles_never_write_what_the_snapshot_says() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"keep me").unwrap();
        let state = |flags: u32| VolumeState {
            root: dir.path().to_path_buf(),
            nodes: vec![NodeSnap {
                id: 2,
                path: b"f".to_vec(),
                lookups: 1,
            }],
            handles: vec![HandleSnap {
                fh: 3,
                path: b"f".to_vec(),
                flags,
                dir: false,
            }],
            next_id: 10,
        };
        let truncating = (libc::O_WRONLY | libc::O_TRUNC | libc::O_CREAT | libc::O_APPEND) as u32;
        for read_only in [true, false] {
            let e =
                VolumeServer::open(dir.path(), read_only, Some(&state(truncating))).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
        }
        assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"keep me");
        let appending = state((libc::O_WRONLY | libc::O_APPEND) as u32);
        let mut g = Guest {
            s: VolumeServer::open(dir.path(), true, Some(&appending)).unwrap(),
            unique: 0,
        };
        assert_eq!(g.read(2, 3, 100).unwrap(), b"keep me", "opened for reading");
        assert_eq!(g.write(2, 3, 0, b"x").unwrap_err(), libc::EROFS);
        assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"keep me");
        // Writable volume: the write mode stays.
        let mut g = Guest {
            s: VolumeServer::open(dir.path(), false, Some(&appending)).unwrap(),
            unique: 0,
        };
        assert_eq!(g.write(2, 3, 0, b"K").unwrap(), 1);
        assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"keep meK");
    }

    #[test]
    fn links_special_files_attributes_and_renames() {
        use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let host = |p: &str| dir.path().join(p);
        std::fs::write(host("a"), b"0123456789").unwrap();
        std::fs::write(host("b"), b"bee").unwrap();
        let mut g = Guest::new(dir.path(), false);
        init(&mut g);
        let a = g.lookup(ROOT_ID, "a").unwrap();

        // Symlink and readlink (the target is stored as given, never resolved by the host).
        let mut body = cstring("ln");
        body.extend_from_slice(&cstring("a"));
        let ln = EntryOut::read_from_prefix(&g.call(SYMLINK, ROOT_ID, &body).unwrap())
            .unwrap()
            .0;
        assert_eq!(g.call(READLINK, ln.nodeid, &[]).unwrap(), b"a");
        assert_eq!(std::fs::read_link(host("ln")).unwrap(), Path::new("a"));

        // A hard link.
        let mut body = LinkIn {
            oldnodeid: a.nodeid,
        }
        .as_bytes()
        .to_vec();
        body.extend_from_slice(&cstring("hard"));
        g.call(LINK, ROOT_ID, &body).unwrap();
        assert_eq!(
            std::fs::metadata(host("hard")).unwrap().ino(),
            std::fs::metadata(host("a")).unwrap().ino()
        );

        // mknod: regular files and FIFOs, no devices.
        let mknod = |g: &mut Guest, name: &str, mode: u32| {
            let mut body = MknodIn {
                mode,
                rdev: 0,
                umask: 0,
                padding: 0,
            }
            .as_bytes()
            .to_vec();
            body.extend_from_slice(&cstring(name));
            g.call(MKNOD, ROOT_ID, &body)
        };
        mknod(&mut g, "reg", libc::S_IFREG | 0o600).unwrap();
        mknod(&mut g, "fifo", libc::S_IFIFO | 0o600).unwrap();
        assert_eq!(
            mknod(&mut g, "dev", libc::S_IFCHR | 0o600).unwrap_err(),
            libc::EPERM
        );
        assert!(host("reg").is_file());
        assert!(
            std::fs::metadata(host("fifo"))
                .unwrap()
                .file_type()
                .is_fifo()
        );
        assert!(!host("dev").exists());

        // setattr: mode, size, times; chown only to the guest's root.
        let mut sa = SetattrIn::new_zeroed();
        sa.valid = FATTR_MODE | FATTR_SIZE | FATTR_MTIME;
        sa.mode = 0o640;
        sa.size = 4;
        sa.mtime = 1_000_000_000;
        let attr = AttrOut::read_from_prefix(&g.call(SETATTR, a.nodeid, sa.as_bytes()).unwrap())
            .unwrap()
            .0
            .attr;
        assert_eq!(
            (attr.size, attr.mode & 0o777, attr.mtime),
            (4, 0o640, 1_000_000_000)
        );
        let m = std::fs::metadata(host("a")).unwrap();
        assert_eq!((m.len(), m.permissions().mode() & 0o777), (4, 0o640));
        sa.valid = FATTR_UID;
        sa.uid = 1000;
        assert_eq!(
            g.call(SETATTR, a.nodeid, sa.as_bytes()).unwrap_err(),
            libc::EPERM
        );
        sa.uid = 0;
        g.call(SETATTR, a.nodeid, sa.as_bytes()).unwrap();

        // statfs answers from the host filesystem.
        let st = StatfsOut::read_from_prefix(&g.call(STATFS, ROOT_ID, &[]).unwrap())
            .unwrap()
            .0;
        assert!(st.bsize > 0 && st.blocks > 0);

        // rename2: no-replace refuses an existing target; exchange swaps, and nodes follow.
        let b = g.lookup(ROOT_ID, "b").unwrap();
        let rename2 = |g: &mut Guest, flags: u32| {
            let mut body = Rename2In {
                newdir: ROOT_ID,
                flags,
                padding: 0,
            }
            .as_bytes()
            .to_vec();
            body.extend_from_slice(&cstring("a"));
            body.extend_from_slice(&cstring("b"));
            g.call(RENAME2, ROOT_ID, &body)
        };
        assert_eq!(
            rename2(&mut g, libc::RENAME_NOREPLACE).unwrap_err(),
            libc::EEXIST
        );
        rename2(&mut g, libc::RENAME_EXCHANGE).unwrap();
        assert_eq!(std::fs::read(host("a")).unwrap(), b"bee");
        assert_eq!(std::fs::read(host("b")).unwrap(), b"0123");
        assert_eq!(g.getattr(a.nodeid).unwrap().size, 4, "node a now names b");
        assert_eq!(g.getattr(b.nodeid).unwrap().size, 3);

        // rmdir of a non-empty directory fails, of an empty one works.
        let mut m = MkdirIn {
            mode: 0o755,
            umask: 0,
        }
        .as_bytes()
        .to_vec();
        m.extend_from_slice(&cstring("d"));
        let d = EntryOut::read_from_prefix(&g.call(MKDIR, ROOT_ID, &m).unwrap())
            .unwrap()
            .0;
        g.create(d.nodeid, "f").unwrap();
        assert_eq!(
            g.call(RMDIR, ROOT_ID, &cstring("d")).unwrap_err(),
            libc::ENOTEMPTY
        );
        g.call(UNLINK, d.nodeid, &cstring("f")).unwrap();
        g.call(RMDIR, ROOT_ID, &cstring("d")).unwrap();
        assert!(!host("d").exists());
    }

    #[test]
    fn a_guest_cannot_hold_unbounded_host_descriptors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"x").unwrap();
        let mut g = Guest::new(dir.path(), false);
        init(&mut g);
        let a = g.lookup(ROOT_ID, "a").unwrap();
        let fhs: Vec<u64> = (0..MAX_HANDLES)
            .map(|_| g.open(a.nodeid, libc::O_RDONLY).unwrap())
            .collect();
        assert_eq!(g.open(a.nodeid, libc::O_RDONLY).unwrap_err(), libc::ENFILE);
        assert_eq!(g.create(ROOT_ID, "b").unwrap_err(), libc::ENFILE);
        let r = ReleaseIn {
            fh: fhs[0],
            flags: 0,
            release_flags: 0,
            lock_owner: 0,
        };
        g.call(RELEASE, a.nodeid, r.as_bytes()).unwrap();
        assert!(g.open(a.nodeid, libc::O_RDONLY).is_ok());
    }

    #[test]
    fn malformed_requests_get_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"data").unwrap();
        let mut g = Guest::new(dir.path(), false);
        init(&mut g);
        // Truncated bodies for every opcode.
        for op in 1..=50 {
            if op == FORGET || op == BATCH_FORGET {
                continue;
            }
            for len in [0usize, 3, 9] {
                let _ = g.call(op, ROOT_ID, &vec![0xa5; len]);
            }
        }
        // Short or garbage buffers, lying lengths, huge counts.
        let mut reply = Vec::new();
        for req in [vec![], vec![1u8; 10], vec![0xffu8; 200]] {
            g.s.handle(&req, &mut reply);
        }
        let mut bf = BatchForgetIn {
            count: u32::MAX,
            dummy: 0,
        }
        .as_bytes()
        .to_vec();
        bf.extend_from_slice(&[7u8; 20]);
        assert_eq!(g.call_no_reply(BATCH_FORGET, &bf), 0);
        let mut seed = 0x1234_5678_u64;
        for _ in 0..2000 {
            let mut req = Vec::new();
            for _ in 0..(seed % 120) {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                req.push((seed >> 33) as u8);
            }
            if req.len() >= 8 {
                // Mostly opcodes the server knows.
                req[4] = (seed % 48) as u8;
                req[5..8].fill(0);
            }
            g.s.handle(&req, &mut reply);
        }
        // Still serving.
        let a = g.lookup(ROOT_ID, "a").unwrap();
        assert_eq!(a.attr.size, 4);
    }

    impl Guest {
        fn call_no_reply(&mut self, opcode: u32, body: &[u8]) -> usize {
            let req = self.request(opcode, 0, body);
            let mut reply = Vec::new();
            self.s.handle(&req, &mut reply);
            reply.len()
        }
    }

    /// Runs `f` on another thread: its result, or `None` if it has not returned within two
    /// minutes (a hang).
    fn within_minutes<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(120)).ok()
    }

    /// A guest can make a FIFO; opening it (for reading, for writing, or by creating its name
    /// again) must not wait for the FIFO's other end, which would hang the device's worker.
    #[test]
    fn opening_a_fifo_never_waits_for_its_other_end() {
        let dir = tempfile::tempdir().unwrap();
        let mut g = Guest::new(dir.path(), false);
        init(&mut g);
        let mut body = MknodIn {
            mode: libc::S_IFIFO | 0o600,
            rdev: 0,
            umask: 0,
            padding: 0,
        }
        .as_bytes()
        .to_vec();
        body.extend_from_slice(&cstring("fifo"));
        g.call(MKNOD, ROOT_ID, &body).unwrap();
        let node = g.lookup(ROOT_ID, "fifo").unwrap().nodeid;
        let opened = within_minutes(move || {
            let r = g.open(node, libc::O_RDONLY);
            let w = g.open(node, libc::O_WRONLY);
            let c = g.create(ROOT_ID, "fifo").map(|_| ());
            (r.map(|_| ()), w.map(|_| ()), c)
        });
        let (r, w, c) = opened.expect("an open of a FIFO returned");
        // Whatever the answers, they came; a reader's end is there for the writer.
        assert_eq!((r, w, c), (Ok(()), Ok(()), Ok(())));
    }

    /// A `READDIR` asks for up to 4 GiB of entries: the reply stays within what a `READ` may
    /// return, however large the directory.
    #[test]
    fn a_listing_never_makes_a_reply_larger_than_a_read() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..3000 {
            std::fs::write(dir.path().join(format!("{i:0>100}")), b"").unwrap();
        }
        let mut g = Guest::new(dir.path(), false);
        init(&mut g);
        let o = OpenIn {
            flags: libc::O_RDONLY as u32,
            open_flags: 0,
        };
        let out = g.call(OPENDIR, ROOT_ID, o.as_bytes()).unwrap();
        let fh = OpenOut::read_from_prefix(&out).unwrap().0.fh;
        let r = ReadIn {
            fh,
            offset: 0,
            size: u32::MAX,
            read_flags: 0,
            lock_owner: 0,
            flags: 0,
            padding: 0,
        };
        let entries = g.call(READDIR, ROOT_ID, r.as_bytes()).unwrap();
        assert!(
            !entries.is_empty() && entries.len() <= MAX_IO as usize,
            "{} bytes of entries",
            entries.len()
        );
    }

    mod random {
        use super::*;
        use proptest::prelude::*;

        /// Opcodes the server knows (most requests), or anything.
        fn opcode() -> impl Strategy<Value = u32> {
            let known = [
                LOOKUP,
                FORGET,
                GETATTR,
                SETATTR,
                READLINK,
                SYMLINK,
                MKNOD,
                MKDIR,
                UNLINK,
                RMDIR,
                RENAME,
                LINK,
                OPEN,
                READ,
                WRITE,
                STATFS,
                RELEASE,
                FSYNC,
                FLUSH,
                INIT,
                OPENDIR,
                READDIR,
                RELEASEDIR,
                FSYNCDIR,
                CREATE,
                DESTROY,
                BATCH_FORGET,
                RENAME2,
            ];
            prop_oneof![9 => prop::sample::select(known.to_vec()), 1 => any::<u32>()]
        }

        /// A request: a header (its length usually right), fixed-size arguments of random
        /// bytes, names from a small set (some invalid), random trailing bytes.
        fn request() -> impl Strategy<Value = (u32, u64, Option<u32>, Vec<u8>)> {
            let names = prop::collection::vec(
                prop::sample::select(vec!["a", "b", "sub", "fifo", "..", ".", "x/y", ""]),
                0..3,
            );
            let node = prop_oneof![Just(ROOT_ID), 0u64..12, any::<u64>()];
            let len = prop::option::weighted(0.2, any::<u32>());
            (
                opcode(),
                node,
                len,
                prop::collection::vec(any::<u8>(), 0..96),
                names,
                prop::collection::vec(any::<u8>(), 0..8),
            )
                .prop_map(|(op, node, len, args, names, tail)| {
                    let mut body = args;
                    for n in names {
                        body.extend_from_slice(&cstring(n));
                    }
                    body.extend(tail);
                    (op, node, len, body)
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig {
                cases: 64,
                failure_persistence: None,
                ..ProptestConfig::default()
            })]

            /// Random request sequences: every reply is an error or an answer to its request
            /// (its header's length and id right), never longer than a `READ` may be, and the
            /// server still serves afterwards. Run on another thread, so a hang fails the test.
            #[test]
            fn random_requests_get_bounded_answers(
                reqs in prop::collection::vec(request(), 1..60),
            ) {
                let served = within_minutes(move || {
                    let dir = tempfile::tempdir().unwrap();
                    std::fs::write(dir.path().join("a"), b"data").unwrap();
                    std::fs::create_dir(dir.path().join("sub")).unwrap();
                    let mut g = Guest::new(dir.path(), false);
                    let mut reply = Vec::new();
                    for (i, (op, node, len, body)) in reqs.into_iter().enumerate() {
                        g.unique = 1000 + i as u64;
                        let mut req = g.request(op, node, &body);
                        if let Some(len) = len {
                            req[0..4].copy_from_slice(&len.to_ne_bytes());
                        }
                        g.s.handle(&req, &mut reply);
                        if reply.is_empty() {
                            continue;
                        }
                        let (out, _) = OutHeader::read_from_prefix(&reply).unwrap();
                        assert_eq!(out.len as usize, reply.len());
                        assert_eq!(out.unique, g.unique);
                        assert!(reply.len() <= size_of::<OutHeader>() + MAX_IO as usize);
                    }
                    g.getattr(ROOT_ID).map(|a| a.mode & libc::S_IFMT)
                });
                let root = served.expect("the requests were served in time");
                prop_assert_eq!(root, Ok(libc::S_IFDIR));
            }
        }
    }

    /// Listings are cached per open directory handle; together they stay bounded, and a handle
    /// whose listing made room reads its directory again.
    #[test]
    fn cached_listings_stay_bounded_across_handles() {
        let dir = tempfile::tempdir().unwrap();
        let n = MAX_CACHED_ENTRIES / 2 + 1000;
        for i in 0..n {
            std::fs::File::create(dir.path().join(format!("{i:08}"))).unwrap();
        }
        let mut g = Guest::new(dir.path(), false);
        init(&mut g);
        let readdir = |g: &mut Guest, fh: u64, offset: u64| {
            let r = ReadIn {
                fh,
                offset,
                size: 4096,
                read_flags: 0,
                lock_owner: 0,
                flags: 0,
                padding: 0,
            };
            let out = g.call(READDIR, ROOT_ID, r.as_bytes()).unwrap();
            let (d, rest) = Dirent::read_from_prefix(&out).unwrap();
            (d.off, rest[..d.namelen as usize].to_vec())
        };
        let o = OpenIn {
            flags: libc::O_RDONLY as u32,
            open_flags: 0,
        };
        let mut fhs = Vec::new();
        for _ in 0..3 {
            let out = g.call(OPENDIR, ROOT_ID, o.as_bytes()).unwrap();
            let fh = OpenOut::read_from_prefix(&out).unwrap().0.fh;
            assert_eq!(readdir(&mut g, fh, 2), (3, b"00000000".to_vec()));
            fhs.push(fh);
            let cached: usize =
                g.s.handles
                    .values()
                    .filter_map(|h| h.entries.as_ref().map(Vec::len))
                    .sum();
            assert!(cached <= MAX_CACHED_ENTRIES, "{cached} entries cached");
        }
        // The first handle's listing was dropped; it goes on where it was.
        assert!(g.s.handles[&fhs[0]].entries.is_none());
        assert_eq!(readdir(&mut g, fhs[0], 502), (503, b"00000500".to_vec()));
    }
}
