//! virtio-vsock, emulated in the VMM (there is no vhost-vsock here): the host↔guest channel.
//!
//! The host side lives in this process: [`VsockHost::connect`] opens a stream connection to a
//! port the guest listens on (the agent's), and the returned [`VsockStream`] is a blocking
//! `Read + Write` byte stream. Connections the guest opens towards the host are refused (reset):
//! dormant's protocol is host-initiated.
//!
//! A worker thread serves the queues: guest notifications arrive on ioeventfds, host activity on
//! a wake eventfd, and used buffers are signalled through an irqfd. Flow control follows the
//! virtio spec (`buf_alloc` / `fwd_cnt` credit on both sides).
//!
//! Snapshots: an *idle* connection (nothing buffered either way) survives a checkpoint: its
//! ports and credit counters are part of the device state, and after a restore the host takes it
//! back with [`VsockHost::adopt`], so the guest sees nothing happen. Connections with data in
//! flight, and idle ones nobody adopts ([`VsockHost::reset_unadopted`]), are reset: the guest's
//! sockets close and the host reconnects.
//!
//! No host wait is unbounded unless asked: a stream's reads *and* writes honour its timeouts
//! and its deadline ([`VsockStream::set_deadline`]; a guest that never answers or never grants
//! credit cannot hang a caller past them) and a cancel flag raised from another thread
//! ([`VsockStream::set_cancel`], then [`VsockWaker::wake`]), which `connect` honours too.

mod connection;
mod host;
mod muxer;
mod packet;
mod persist;
#[cfg(test)]
mod tests;

use vmm_sys_util::eventfd::EventFd;

pub use host::{Cancelled, VsockHost, VsockStream, VsockWaker};
pub use muxer::Vsock;
pub use packet::GUEST_CID;
pub use persist::{LiveConn, MAX_SNAPSHOT_CONNS, VsockState};

use super::device::Device;
use crate::persist::Persist;
use crate::vm::GuestMemory;
use connection::ConnState;
use muxer::Inner;

/// The device and its worker thread.
pub struct VsockDevice {
    dev: Device<Vsock>,
}

impl std::fmt::Debug for VsockDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockDevice").finish_non_exhaustive()
    }
}

impl VsockDevice {
    /// A device for guest context `cid` over `mem`, raising `irq`; `state` restores a snapshot.
    pub fn new(
        mem: GuestMemory,
        irq: EventFd,
        state: Option<&VsockState>,
    ) -> std::io::Result<VsockDevice> {
        if let Some(s) = state {
            s.check()
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        }
        let dev = Device::new(
            "dormant-vsock".into(),
            Vsock::restored(state),
            mem,
            irq,
            state.map(|s| &s.transport),
        )?;
        Ok(VsockDevice { dev })
    }

    /// The eventfd the guest's notifications of queue `i` should signal (registered as an
    /// ioeventfd by the VM owner).
    pub fn queue_evts(&self) -> &[EventFd] {
        self.dev.queue_evts()
    }

    /// The eventfd of the device's interrupt line (registered as an irqfd).
    pub fn irq_fd(&self) -> &EventFd {
        self.dev.irq_fd()
    }

    /// The host's handle for opening (and adopting) connections to the guest.
    pub fn host(&self) -> VsockHost {
        VsockHost {
            shared: self.dev.shared().clone(),
        }
    }

    /// An MMIO read from the vCPU.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        self.dev.mmio_read(offset, data);
    }

    /// An MMIO write from the vCPU.
    pub fn mmio_write(&self, offset: u64, data: &[u8]) {
        self.dev.mmio_write(offset, data);
    }

    /// Stops touching guest memory (for a consistent checkpoint) or starts again.
    pub fn set_paused(&self, paused: bool) {
        self.dev.set_paused(paused);
    }

    /// The guest is gone (its vCPU crashed, or it reset itself): every connection is reset and
    /// the host's streams and connects waiting on them return at once, not at their deadlines.
    pub fn guest_gone(&self) {
        {
            let mut g = self.dev.lock();
            g.stopped = true;
            for c in g.conns.values_mut() {
                c.state = ConnState::Reset;
            }
        }
        self.dev.shared().cv.notify_all();
    }

    /// The device state (pause first for a consistent snapshot).
    pub fn state(&self) -> VsockState {
        let g = self.dev.lock();
        g.saved(g.t.state())
    }
}

impl Drop for VsockDevice {
    fn drop(&mut self) {
        // The shell then stops the worker and wakes the host's streams, which see the resets.
        let mut g: parking_lot::MutexGuard<'_, Inner> = self.dev.lock();
        g.stopped = true;
        for c in g.conns.values_mut() {
            c.state = ConnState::Reset;
        }
    }
}

/// The device's muxer and transport ([`VsockState`]); restoring needs the new guest's memory and
/// the device's interrupt line.
impl Persist for VsockDevice {
    type State = VsockState;
    type Context<'a> = (GuestMemory, EventFd);
    type Error = std::io::Error;

    fn save(&self) -> std::io::Result<VsockState> {
        Ok(self.state())
    }

    fn restore((mem, irq): (GuestMemory, EventFd), state: &VsockState) -> std::io::Result<Self> {
        VsockDevice::new(mem, irq, Some(state))
    }
}
