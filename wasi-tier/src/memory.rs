//! Mapping snapshot layers over a live instance's linear memory (the only `unsafe` of this
//! crate besides loading compiled modules).
//!
//! Engine configuration makes this sound: memories never move (`memory_may_move(false)` with a
//! 4 GiB reservation) and instances are allocated on demand, never from a pool, so an overlay
//! dies with its instance's mapping. Mapping happens only between calls, when no wasm code runs
//! and no other reference into the memory exists (the sandbox is borrowed mutably).

use dormant_core::memimage;
use dormant_core::snapshot::store::LayerFile;
use wasmtime::{Memory, Store};

use crate::host::Host;

/// Maps checked snapshot `layers` in order (oldest first) over `memory`, then keeps the memory
/// out of forked children (see `memimage::dont_fork`: a fork must not hide written pages from
/// the next incremental checkpoint). Returns the number of mappings made. A layer larger than
/// the memory is refused (`InvalidInput`) before it is mapped.
pub(crate) fn map_layers(
    store: &mut Store<Host>,
    memory: &Memory,
    layers: &[&LayerFile],
) -> std::io::Result<usize> {
    let size = memory.data_size(&*store);
    let base = memory.data_ptr(&*store);
    let mut n = 0;
    for l in layers {
        // SAFETY: `base..base+size` is the instance's accessible linear memory, which is
        // page-aligned, owned by this store, never moved, and not in use: no wasm frame is
        // active while the sandbox is mutably borrowed. `map_layer` maps only inside it.
        n += unsafe { memimage::map_layer(base, size, l)? };
    }
    // The whole reservation: pages the guest grows into later are covered too.
    memimage::dont_fork(base, crate::engine_params::MEMORY_RESERVATION)?;
    Ok(n)
}
