//! virtio devices over MMIO.

pub mod block;
pub mod fs;
pub mod mmio;
pub mod vsock;
