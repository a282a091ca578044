//! virtio devices over MMIO.

pub mod mmio;
pub mod vsock;
