//! virtio devices over MMIO.

pub mod block;
pub mod device;
pub mod fs;
pub mod mmio;
pub mod vsock;
