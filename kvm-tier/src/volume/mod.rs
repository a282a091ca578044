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
//!
//! # Layout
//!
//! The volume stands on its own: it uses only std and crates, nothing of the VMM, so that the
//! server can be tested and fuzzed alone (the virtio-fs device in `crate::virtio::fs` carries
//! its requests and replies).
//!
//! - [`abi`]: the FUSE wire format (headers, opcodes, argument structs).
//! - `server`: [`VolumeServer`], whose [`VolumeServer::handle`] takes one request's raw bytes
//!   and writes the reply (the entry to fuzz), and the operations by family.
//! - `nodes`: the node and handle tables and their caps ([`MAX_NODES`], [`MAX_HANDLES`],
//!   [`MAX_CACHED_ENTRIES`]).
//! - `state`: [`VolumeState`], what a snapshot keeps, and its save/restore seam.
//! - `paths`: relative paths and the confinement every host path goes through.

pub mod abi;
mod nodes;
mod paths;
mod server;
mod state;

#[cfg(test)]
mod tests;

pub use abi::{Attr, BATCH_FORGET, EntryOut, FORGET, InHeader, OutHeader};
pub use nodes::{MAX_CACHED_ENTRIES, MAX_HANDLES, MAX_NODES, ROOT_ID};
pub use server::{MAX_IO, VolumeServer};
pub use state::{HandleSnap, NodeSnap, VolumeState};

/// What an operation answers the guest on failure: the errno of its FUSE reply.
type Res<T> = std::result::Result<T, rustix::io::Errno>;
