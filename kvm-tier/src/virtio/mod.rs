//! virtio devices over MMIO: the transport ([`mmio`]), the generic device shell every device
//! runs in ([`device`]: queue eventfds, interrupt, worker thread with pause and stop, and the
//! caps on what a guest's descriptor chains may claim), and the device models, which supply
//! only their request handling ([`block`], [`vsock`], [`fs`], [`net`]).

pub mod block;
pub mod device;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod vsock;
