//! The node and handle tables: what the guest kernel holds of a volume. A node is a path the
//! guest looked up (with its lookup count, until the guest forgets it); a handle is a file or
//! directory the guest opened. Both are kept as paths relative to the root, never as host
//! descriptors alone, so that they survive a checkpoint (see [`super::state`]); both tables are
//! capped, so that a guest cannot grow host memory or descriptors without bound.

use std::collections::HashMap;
use std::os::fd::OwnedFd;

use rustix::fs::OFlags;
use rustix::io::Errno;

use super::Res;
use super::paths::under;

/// Most directory entries the listings cached for open handles hold together (besides the one
/// being read).
pub const MAX_CACHED_ENTRIES: usize = 1 << 14;
/// The root directory's node id.
pub const ROOT_ID: u64 = 1;
/// Most handles a guest may hold open on one volume (each can hold a host descriptor): past
/// it, opens fail with `ENFILE` rather than exhausting the host process's descriptors.
pub const MAX_HANDLES: usize = 1024;
/// Most node ids a guest may hold on one volume (its kernel forgets unused ones): past it,
/// lookups fail with `ENOMEM` rather than growing host memory without bound.
pub const MAX_NODES: usize = 1 << 18;

#[derive(Debug)]
pub(super) struct Node {
    pub(super) path: Vec<u8>,
    pub(super) lookups: u64,
}

#[derive(Debug)]
pub(super) struct Handle {
    pub(super) path: Vec<u8>,
    pub(super) flags: u32,
    pub(super) dir: bool,
    /// Opened lazily (a restored handle reopens on first use).
    pub(super) fd: Option<OwnedFd>,
    /// A directory's entries as read at offset 0: `(ino, d_type, name)`.
    pub(super) entries: Option<Vec<(u64, u32, Vec<u8>)>>,
}

/// The `open(2)` flags a guest may pass on to the host (access mode and write behaviour).
pub(super) fn allowed_open_flags(flags: u32) -> OFlags {
    let f = OFlags::from_bits_retain(flags);
    f & (OFlags::RWMODE | OFlags::APPEND | OFlags::SYNC | OFlags::DSYNC | OFlags::NOATIME)
}

/// The flags a handle from a snapshot is reopened with. They are snapshot bytes: keep only what
/// `OPEN` would have kept (never create or truncate), and on a volume the caller granted
/// read-only, open for reading only whatever the snapshot says.
pub(super) fn restored_open_flags(flags: u32, dir: bool, read_only: bool) -> u32 {
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

pub(super) fn is_write(flags: u32) -> bool {
    let f = OFlags::from_bits_retain(flags);
    f.intersects(OFlags::WRONLY | OFlags::RDWR | OFlags::TRUNC | OFlags::APPEND)
}

/// The nodes and handles of one volume, and the next id to give (nodes and handles share one
/// sequence).
#[derive(Debug)]
pub(super) struct Table {
    pub(super) nodes: HashMap<u64, Node>,
    /// The live node of each path (a path unlinked and made again is a new node).
    pub(super) by_path: HashMap<Vec<u8>, u64>,
    pub(super) handles: HashMap<u64, Handle>,
    pub(super) next_id: u64,
}

impl Table {
    /// A table holding only the root.
    pub(super) fn new() -> Table {
        let mut t = Table {
            nodes: HashMap::new(),
            by_path: HashMap::new(),
            handles: HashMap::new(),
            next_id: ROOT_ID + 1,
        };
        t.nodes.insert(
            ROOT_ID,
            Node {
                path: Vec::new(),
                lookups: 1,
            },
        );
        t.by_path.insert(Vec::new(), ROOT_ID);
        t
    }

    pub(super) fn new_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// The path of node `id` (`ESTALE` if the guest holds no such node).
    pub(super) fn path(&self, id: u64) -> Res<&[u8]> {
        self.nodes
            .get(&id)
            .map(|n| n.path.as_slice())
            .ok_or(Errno::STALE)
    }

    /// The node for `path`, one more lookup of it.
    pub(super) fn remember(&mut self, path: Vec<u8>) -> Res<u64> {
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

    pub(super) fn forget(&mut self, id: u64, n: u64) {
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

    /// Refuses a new handle past [`MAX_HANDLES`].
    pub(super) fn handle_room(&self) -> Res<()> {
        if self.handles.len() >= MAX_HANDLES {
            Err(Errno::NFILE)
        } else {
            Ok(())
        }
    }

    /// Registers a handle just opened on the host; its id.
    pub(super) fn add_handle(&mut self, path: Vec<u8>, flags: u32, dir: bool, fd: OwnedFd) -> u64 {
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
        fh
    }

    /// `path` was removed on the host: a new file there will be a new node.
    pub(super) fn unlinked(&mut self, path: &[u8]) {
        self.by_path.remove(path);
    }

    /// `old` was renamed to `new` (or swapped with it, `exchange`): nodes and handles below
    /// either follow their files.
    pub(super) fn renamed(&mut self, old: &[u8], new: &[u8], exchange: bool) {
        if !exchange {
            // Whatever was at the destination is gone.
            self.by_path.retain(|p, _| !under(p, new));
        }
        let swap = |p: &mut Vec<u8>| {
            let (from, to) = if under(p, old) {
                (old, new)
            } else if exchange && under(p, new) {
                (new, old)
            } else {
                return;
            };
            let mut q = to.to_vec();
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
    }
}
