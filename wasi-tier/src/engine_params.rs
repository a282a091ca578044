//! The fixed parameters the engine configuration and the sandboxes agree on: the address space
//! each linear memory reserves, and the tick of call deadlines. Plain constants that name
//! nothing else of the crate, so that the memory mapping and the sandbox read them without
//! depending on the runtime (which re-exports them from their old paths).

use std::time::Duration;

/// Granularity of call deadlines.
pub(crate) const TICK: Duration = Duration::from_millis(10);

/// Address space reserved for each linear memory (a wasm32 memory never grows past it, so the
/// whole range belongs to one instance).
pub(crate) const MEMORY_RESERVATION: usize = 4 << 30;
