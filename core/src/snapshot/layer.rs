//! Layers: the memory (or disk) contents of a snapshot, one checked type for both.
//!
//! A layer is what a resume maps copy-on-write over guest memory (or over a disk): a full
//! image, or the pages written since the parent snapshot, packed. Its page list, sizes and file
//! length come from snapshot files, which are untrusted input: a page list out of order or out
//! of bounds would map a file over host memory outside the guest's region, a file shorter than
//! its pages would raise SIGBUS on first touch. So the only way to map a layer is through the
//! two types of this module:
//!
//! - [`Layer`]: the structure, checked when it is built (every constructor and every decoder
//!   goes through [`Layer::new`]): page-aligned size, strictly increasing pages inside it, a
//!   file length that matches (`pages × 4096` for a delta, the size for a full image), a depth
//!   that fits the kind.
//! - [`LayerFile`]: a checked layer with its open file, whose real length was checked against
//!   the layer. The mapping functions ([`crate::memimage::map_layer`] and the tiers' wrappers)
//!   take only this type.
//!
//! Where layers sit among a snapshot's files, and their rules in short: [`super::format`].

use std::fs::File;

use crate::error::SnapshotError;
use crate::snapshot::chunks;
use crate::snapshot::format::PAGE;
use crate::snapshot::{FileRecord, LayerKind, MemoryRecord};

/// Most pages a layer may have: page indices are `u32`, and a run of pages must not reach
/// `u32::MAX + 1`.
pub const MAX_LAYER_PAGES: u64 = u32::MAX as u64;

fn malformed(what: String) -> SnapshotError {
    SnapshotError::Malformed(what)
}

/// Checks the structure of a layer (see [`Layer::new`]), without copying it.
pub(crate) fn check(
    size: u64,
    kind: LayerKind,
    file: &FileRecord,
    depth: u32,
    pages: &[u32],
) -> Result<(), SnapshotError> {
    let page = PAGE as u64;
    if !size.is_multiple_of(page) {
        return Err(malformed(format!("layer size {size} is not page-aligned")));
    }
    let npages = size / page;
    if npages > MAX_LAYER_PAGES {
        return Err(SnapshotError::TooLarge {
            what: "layer".into(),
            size,
            limit: MAX_LAYER_PAGES * page,
        });
    }
    if file.name.is_empty() || file.name.contains('/') || file.name.starts_with('.') {
        return Err(malformed(format!("bad layer file name {:?}", file.name)));
    }
    match kind {
        LayerKind::Full => {
            if !pages.is_empty() || depth != 0 || file.len != size {
                return Err(malformed(format!(
                    "inconsistent full layer: {} pages listed, depth {depth}, file of {} bytes \
                     for {size} bytes",
                    pages.len(),
                    file.len
                )));
            }
        }
        LayerKind::Compact => {
            let index = size.div_ceil(chunks::CHUNK as u64) * chunks::HASH_LEN as u64;
            if !pages.is_empty() || depth != 0 || file.len != index {
                return Err(malformed(format!(
                    "inconsistent compact layer: {} pages listed, depth {depth}, index of {} \
                     bytes for {size} bytes",
                    pages.len(),
                    file.len
                )));
            }
        }
        LayerKind::Delta => {
            if depth == 0 {
                return Err(malformed("delta layer at depth 0".into()));
            }
            if let Some(w) = pages.windows(2).find(|w| w[0] >= w[1]) {
                return Err(malformed(format!(
                    "delta page list is not strictly increasing ({} then {})",
                    w[0], w[1]
                )));
            }
            if let Some(&last) = pages.last()
                && last as u64 >= npages
            {
                return Err(malformed(format!(
                    "delta page {last} beyond the layer's {npages} pages"
                )));
            }
            if Some(file.len) != (pages.len() as u64).checked_mul(page) {
                return Err(malformed(format!(
                    "delta file of {} bytes for {} pages",
                    file.len,
                    pages.len()
                )));
            }
        }
    }
    Ok(())
}

/// A memory or disk layer whose structure has been checked (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    size: u64,
    kind: LayerKind,
    file: FileRecord,
    depth: u32,
    pages: Vec<u32>,
}

impl Layer {
    /// Checks and builds a layer: `size` bytes of content (a multiple of 4096, at most
    /// [`MAX_LAYER_PAGES`] pages) in `file`, `depth` delta layers above the nearest full image,
    /// and for a delta the indices of its pages, packed in `file` in that order.
    ///
    /// Errors: [`SnapshotError::Malformed`] when the size is not page-aligned, the file name is
    /// not a plain name, a full or compact layer lists pages or has a depth, a delta has depth 0,
    /// pages that are not strictly increasing or not below `size / 4096`, or the file length
    /// does not match (`size` for a full image, `pages × 4096` for a delta, one chunk hash per
    /// 64 KiB for a compact index); [`SnapshotError::TooLarge`] for a size past the page limit.
    pub fn new(
        size: u64,
        kind: LayerKind,
        file: FileRecord,
        depth: u32,
        pages: Vec<u32>,
    ) -> Result<Layer, SnapshotError> {
        check(size, kind, &file, depth, &pages)?;
        Ok(Layer {
            size,
            kind,
            file,
            depth,
            pages,
        })
    }

    /// The memory layer a manifest records (its record and page list), checked.
    pub fn of_memory(record: &MemoryRecord, pages: &[u32]) -> Result<Layer, SnapshotError> {
        Layer::new(
            record.size,
            record.kind,
            record.file.clone(),
            record.depth,
            pages.to_vec(),
        )
    }

    /// Logical size in bytes (a multiple of 4096).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Full image, delta or compact index.
    pub fn kind(&self) -> LayerKind {
        self.kind
    }

    /// The data file, as the snapshot records it.
    pub fn file(&self) -> &FileRecord {
        &self.file
    }

    /// Delta layers between this one and the nearest full image (0 for a full or compact one).
    pub fn depth(&self) -> u32 {
        self.depth
    }

    /// A delta's page indices, strictly increasing, each below `size / 4096` (empty otherwise).
    pub fn pages(&self) -> &[u32] {
        &self.pages
    }

    /// The manifest record of this layer (everything but the page list).
    pub fn record(&self) -> MemoryRecord {
        MemoryRecord {
            size: self.size,
            kind: self.kind,
            file: self.file.clone(),
            depth: self.depth,
        }
    }

    /// The record and the page list.
    pub fn into_parts(self) -> (MemoryRecord, Vec<u32>) {
        (
            MemoryRecord {
                size: self.size,
                kind: self.kind,
                file: self.file,
                depth: self.depth,
            },
            self.pages,
        )
    }
}

/// A checked [`Layer`] with the file that holds its content, whose length matches the layer:
/// what the mapping functions take. `full` layers (a full image, or a compact one rebuilt into
/// a full image) hold page `i` at offset `i × 4096`; deltas hold their pages packed.
#[derive(Debug)]
pub struct LayerFile {
    layer: Layer,
    file: File,
    full: bool,
    cold: bool,
}

impl LayerFile {
    /// Pairs a full or delta layer with its open data file, checking the file's length against
    /// the layer's record (`fstat`; the content is not read).
    ///
    /// Errors: [`SnapshotError::Io`] if the file cannot be inspected,
    /// [`SnapshotError::Truncated`] if its length differs, [`SnapshotError::Malformed`] for a
    /// compact layer (its index is not mappable: the store rebuilds it first).
    pub fn new(layer: Layer, file: File) -> Result<LayerFile, SnapshotError> {
        if layer.kind == LayerKind::Compact {
            return Err(malformed(
                "a compact layer is mapped through the full image rebuilt from it".into(),
            ));
        }
        let want = layer.file.len;
        let full = layer.kind == LayerKind::Full;
        Self::checked(layer, file, want, full, false)
    }

    /// A compact layer rebuilt into a full image `file` (`cold`: rebuilt just now).
    pub(crate) fn rehydrated(
        layer: Layer,
        file: File,
        cold: bool,
    ) -> Result<LayerFile, SnapshotError> {
        let want = layer.size;
        Self::checked(layer, file, want, true, cold)
    }

    fn checked(
        layer: Layer,
        file: File,
        want: u64,
        full: bool,
        cold: bool,
    ) -> Result<LayerFile, SnapshotError> {
        let len = file
            .metadata()
            .map_err(|source| SnapshotError::Io {
                file: layer.file.name.clone().into(),
                source,
            })?
            .len();
        if len != want {
            return Err(SnapshotError::Truncated {
                what: format!("{} is {len} bytes, expected {want}", layer.file.name),
            });
        }
        Ok(LayerFile {
            layer,
            file,
            full,
            cold,
        })
    }

    /// The checked layer (for a rebuilt compact layer: the compact one it was rebuilt from).
    pub fn layer(&self) -> &Layer {
        &self.layer
    }

    /// The open data file (read it, do not truncate it while it is mapped).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Whether the file is a full image (page `i` at offset `i × 4096`); else a packed delta.
    pub fn is_full(&self) -> bool {
        self.full
    }

    /// Whether the file was rebuilt from compact chunks just now (a cold resume).
    pub fn cold(&self) -> bool {
        self.cold
    }

    /// Logical size of the content in bytes.
    pub fn size(&self) -> u64 {
        self.layer.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rec(len: u64) -> FileRecord {
        FileRecord {
            name: "memory.delta".into(),
            len,
            crc32: 0,
            stored: len,
        }
    }

    #[test]
    fn hostile_page_lists_are_refused() {
        let p = PAGE as u64;
        let delta =
            |pages: Vec<u32>, len: u64| Layer::new(16 * p, LayerKind::Delta, rec(len), 1, pages);
        assert!(delta(vec![3, 9], 2 * p).is_ok());
        assert!(delta(vec![9, 3], 2 * p).is_err(), "unsorted");
        assert!(delta(vec![3, 3], 2 * p).is_err(), "repeated");
        assert!(delta(vec![3, 16], 2 * p).is_err(), "beyond the size");
        assert!(
            delta(vec![u32::MAX, 0], 2 * p).is_err(),
            "far beyond, unsorted"
        );
        assert!(delta(vec![3, 9], p).is_err(), "file shorter than its pages");
        assert!(
            delta(vec![3, 9], 3 * p).is_err(),
            "file longer than its pages"
        );
        assert!(
            Layer::new(16 * p, LayerKind::Delta, rec(2 * p), 0, vec![3, 9]).is_err(),
            "a delta at depth 0"
        );
        assert!(
            Layer::new(16 * p, LayerKind::Full, rec(15 * p), 0, vec![]).is_err(),
            "a full image shorter than its size"
        );
        assert!(Layer::new(16 * p, LayerKind::Full, rec(16 * p), 0, vec![1]).is_err());
        assert!(Layer::new(16 * p, LayerKind::Full, rec(16 * p), 2, vec![]).is_err());
        assert!(Layer::new(16 * p + 1, LayerKind::Full, rec(16 * p + 1), 0, vec![]).is_err());
        let mut bad_name = rec(16 * p);
        bad_name.name = "../memory.img".into();
        assert!(Layer::new(16 * p, LayerKind::Full, bad_name, 0, vec![]).is_err());
    }

    #[test]
    fn a_file_of_another_length_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("memory.delta");
        std::fs::write(&path, vec![1u8; PAGE]).unwrap();
        let p = PAGE as u64;
        let layer = Layer::new(16 * p, LayerKind::Delta, rec(2 * p), 1, vec![3, 9]).unwrap();
        assert!(matches!(
            LayerFile::new(layer.clone(), File::open(&path).unwrap()),
            Err(SnapshotError::Truncated { .. })
        ));
        std::fs::write(&path, vec![1u8; 2 * PAGE]).unwrap();
        let lf = LayerFile::new(layer, File::open(&path).unwrap()).unwrap();
        assert!(!lf.is_full());
        assert_eq!(lf.layer().pages(), &[3, 9]);
    }

    /// The model the checked constructor must agree with.
    fn valid(size: u64, kind: LayerKind, len: u64, depth: u32, pages: &[u32]) -> bool {
        let p = PAGE as u64;
        size.is_multiple_of(p)
            && size / p <= MAX_LAYER_PAGES
            && match kind {
                LayerKind::Full => pages.is_empty() && depth == 0 && len == size,
                LayerKind::Compact => {
                    pages.is_empty()
                        && depth == 0
                        && len == size.div_ceil(chunks::CHUNK as u64) * chunks::HASH_LEN as u64
                }
                LayerKind::Delta => {
                    depth > 0
                        && pages.windows(2).all(|w| w[0] < w[1])
                        && pages.iter().all(|&x| (x as u64) < size / p)
                        && len == pages.len() as u64 * p
                }
            }
    }

    fn kind() -> impl Strategy<Value = LayerKind> {
        prop_oneof![
            Just(LayerKind::Full),
            Just(LayerKind::Delta),
            Just(LayerKind::Compact)
        ]
    }

    proptest! {
        /// Random layers (sizes, lengths and page lists near the edges) are accepted exactly
        /// when they are consistent, and never panic.
        #[test]
        fn layers_are_accepted_exactly_when_consistent(
            npages in prop_oneof![0u64..64, Just(MAX_LAYER_PAGES), Just(MAX_LAYER_PAGES + 1)],
            odd in prop_oneof![Just(0u64), 1u64..4096],
            kind in kind(),
            depth in prop_oneof![Just(0u32), Just(1u32), any::<u32>()],
            pages in prop::collection::vec(prop_oneof![0u32..80, any::<u32>()], 0..12),
            sorted in any::<bool>(),
            len_from in 0u8..4,
            len_noise in any::<u64>(),
        ) {
            let p = PAGE as u64;
            let size = npages.saturating_mul(p).saturating_add(odd);
            let mut pages = pages;
            if sorted {
                pages.sort_unstable();
                pages.dedup();
            }
            let len = match len_from {
                0 => size,
                1 => pages.len() as u64 * p,
                2 => size.div_ceil(chunks::CHUNK as u64) * chunks::HASH_LEN as u64,
                _ => len_noise,
            };
            let r = Layer::new(size, kind, rec(len), depth, pages.clone());
            prop_assert_eq!(r.is_ok(), valid(size, kind, len, depth, &pages), "{:?}", r);
        }
    }
}
