//! Mapping snapshot layers over a live instance's linear memory (the only `unsafe` of this
//! crate besides loading compiled modules).
//!
//! Engine configuration makes this sound: memories never move (`memory_may_move(false)` with a
//! 4 GiB reservation) and instances are allocated on demand, never from a pool, so an overlay
//! dies with its instance's mapping. Mapping happens only between calls, when no wasm code runs
//! and no other reference into the memory exists (the sandbox is borrowed mutably).

use std::fs::File;

use dormant_core::memimage;
use wasmtime::{Memory, Store};

use crate::host::Host;

/// One memory layer to map, oldest first.
pub(crate) enum LayerMap<'a> {
    Full { file: &'a File, len: usize },
    Delta { file: &'a File, pages: &'a [u32] },
}

/// Maps `layers` in order over `memory`, then keeps the memory out of forked children (see
/// `memimage::dont_fork`: a fork must not hide written pages from the next incremental
/// checkpoint). Returns the number of mappings made.
pub(crate) fn map_layers(
    store: &mut Store<Host>,
    memory: &Memory,
    layers: &[LayerMap<'_>],
) -> std::io::Result<usize> {
    let size = memory.data_size(&*store);
    let base = memory.data_ptr(&*store);
    let mut n = 0;
    for l in layers {
        match *l {
            LayerMap::Full { file, len } => {
                assert!(
                    len <= size && len % memimage::PAGE == 0,
                    "layer larger than memory"
                );
                // SAFETY: `base..base+len` lies inside the instance's accessible linear memory
                // (len <= data_size), which is page-aligned, owned by this store, never moved,
                // and not in use: no wasm frame is active while the sandbox is mutably borrowed.
                n += unsafe { memimage::map_image(base, len, file)? };
            }
            LayerMap::Delta { file, pages } => {
                assert!(
                    pages
                        .last()
                        .is_none_or(|&p| (p as usize + 1) * memimage::PAGE <= size),
                    "delta page beyond memory"
                );
                // SAFETY: as above; every page index was checked to lie inside the memory.
                n += unsafe { memimage::map_delta(base, file, pages)? };
            }
        }
    }
    // The whole reservation: pages the guest grows into later are covered too.
    memimage::dont_fork(base, crate::runtime::MEMORY_RESERVATION)?;
    Ok(n)
}
