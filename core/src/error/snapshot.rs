//! Why a snapshot could not be read: [`SnapshotError`], the `source` of
//! [`Error::Snapshot`](super::Error::Snapshot).
//!
//! It names nothing else of the crate, so that the plain ids of [`crate::ids`] (a
//! [`SnapshotId`](crate::ids::SnapshotId) that does not parse fails with it) can use it while
//! [`Error`](super::Error) names those ids.

use std::path::PathBuf;

/// Why a snapshot could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The file does not start with the snapshot magic.
    #[error("not a dormant snapshot (bad magic)")]
    BadMagic,
    /// The file was written by a format version this build cannot read.
    #[error("unsupported snapshot format version {found} (this build reads version {supported})")]
    UnsupportedVersion { found: u16, supported: u16 },
    /// A tier's or device's own state in the snapshot has a version this build cannot read
    /// (written by a newer build, or damaged). A state without a version is version 1.
    #[error("unsupported {what} version {found} (this build reads version(s) {supported:?})")]
    UnsupportedStateVersion {
        what: &'static str,
        found: u64,
        supported: &'static [u32],
    },
    /// The file ends before its declared content.
    #[error("truncated: {what}")]
    Truncated { what: String },
    /// A checksum does not match the content.
    #[error("checksum mismatch in {what}")]
    Checksum { what: String },
    /// A declared size is above the decoder's cap.
    #[error("{what} is {size} bytes, above the limit of {limit} bytes")]
    TooLarge { what: String, size: u64, limit: u64 },
    /// The content is structurally invalid.
    #[error("malformed: {0}")]
    Malformed(String),
    /// The snapshot was taken by another tier or for another workload.
    #[error("incompatible: {0}")]
    Incompatible(String),
    /// A file of the snapshot could not be read.
    #[error("cannot read {file}")]
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
