//! What a snapshot keeps of a volume: the guest kernel's node ids and open handles, as plain
//! data ([`VolumeState`]), with the one save/restore seam between it and the live tables
//! ([`Table::save`], [`Table::restore`]). The serialized form is part of the snapshot format:
//! its fields and their order stay as they are, so that older snapshots restore.
//!
//! A state read from a snapshot is untrusted; [`VolumeState::check`] is what restoring requires
//! of it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use rustix::fs::OFlags;
use serde::{Deserialize, Serialize};

use super::nodes::{
    Handle, MAX_HANDLES, MAX_NODES, Node, ROOT_ID, Table, allowed_open_flags, restored_open_flags,
};
use super::paths::{MAX_PATH, valid_relative};

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
        let mut ids = HashSet::with_capacity(self.nodes.len());
        let mut paths = HashSet::with_capacity(self.nodes.len());
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
        let mut fhs = HashSet::with_capacity(self.handles.len());
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

impl Table {
    /// The state of the volume at `root` for a snapshot (nodes and handles in id order).
    pub(super) fn save(&self, root: &Path) -> VolumeState {
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
            root: root.to_path_buf(),
            nodes,
            handles,
            next_id: self.next_id,
        }
    }

    /// The tables `state` describes (already [checked](VolumeState::check)): handles reopen
    /// lazily, with the flags [`restored_open_flags`] allows on a volume `read_only` or not.
    pub(super) fn restore(state: &VolumeState, read_only: bool) -> Table {
        let mut t = Table::new();
        for n in &state.nodes {
            if n.id != ROOT_ID {
                t.by_path.insert(n.path.clone(), n.id);
                t.nodes.insert(
                    n.id,
                    Node {
                        path: n.path.clone(),
                        lookups: n.lookups,
                    },
                );
            }
        }
        for h in &state.handles {
            t.handles.insert(
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
        t.next_id = state.next_id.max(ROOT_ID + 1);
        t
    }
}
