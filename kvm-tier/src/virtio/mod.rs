//! virtio devices over MMIO.

pub mod block;
pub mod mmio;
pub mod vsock;
