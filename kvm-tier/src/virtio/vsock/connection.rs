//! The host's connections and the control packets waiting for the guest: a connection's
//! state, buffers and flow-control counters (virtio's `buf_alloc` / `fwd_cnt` credit), and the
//! bounded queue of control packets (requests, resets, shutdowns, credit updates).

use std::collections::VecDeque;

/// Receive buffer the host advertises per connection.
pub(super) const HOST_BUF: u32 = 256 * 1024;
/// Host→guest bytes buffered per connection before writers block.
pub(super) const OUT_MAX: usize = 256 * 1024;
/// Most refusals (resets of packets that belong to no connection) waiting for the guest to
/// post receive buffers; more are dropped (see [`ControlQueue::push_refusal`]).
pub(super) const CONTROL_MAX: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ConnState {
    Connecting,
    Connected,
    /// Reset by the guest or refused.
    Reset,
}

#[derive(Debug)]
pub(super) struct Conn {
    pub(super) peer_port: u32,
    pub(super) state: ConnState,
    pub(super) inbound: VecDeque<u8>,
    pub(super) outbound: VecDeque<u8>,
    pub(super) peer_buf_alloc: u32,
    pub(super) peer_fwd_cnt: u32,
    pub(super) tx_cnt: u32,
    pub(super) fwd_cnt: u32,
    pub(super) credit_sent: u32,
    /// The guest will send nothing more (reads see end of file).
    pub(super) peer_done: bool,
    /// The host dropped its stream.
    pub(super) host_closed: bool,
    pub(super) shutdown_sent: bool,
    /// The host will send nothing more ([`super::VsockStream::shutdown_write`]): a shutdown
    /// of the guest's receiving side follows the buffered bytes.
    pub(super) host_write_done: bool,
    pub(super) write_shutdown_sent: bool,
    /// Never kept by a snapshot: a restore resets it ([`super::VsockStream::set_transient`]).
    pub(super) transient: bool,
    /// Restored from a snapshot and not yet taken by a host stream.
    pub(super) adoptable: bool,
}

impl Conn {
    /// A host-initiated connection to guest port `peer`, waiting for the guest's answer.
    pub(super) fn connecting(peer: u32) -> Conn {
        Conn {
            peer_port: peer,
            state: ConnState::Connecting,
            inbound: VecDeque::new(),
            outbound: VecDeque::new(),
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            credit_sent: 0,
            peer_done: false,
            host_closed: false,
            shutdown_sent: false,
            host_write_done: false,
            write_shutdown_sent: false,
            transient: false,
            adoptable: false,
        }
    }

    pub(super) fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Control {
    pub(super) local: u32,
    pub(super) peer: u32,
    pub(super) op: u16,
    pub(super) flags: u32,
}

/// Control packets waiting for a guest receive buffer, in order. Bounded whatever the guest
/// does: a connection's own packets are queued at most once each (an identical one already
/// waiting is enough, and a credit update carries the counters of when it is sent), so they
/// are bounded by the connections the host opened; refusals of stray guest packets are capped
/// at [`CONTROL_MAX`].
#[derive(Debug, Default)]
pub(super) struct ControlQueue {
    pub(super) q: VecDeque<Control>,
}

impl ControlQueue {
    /// Queues a packet of one of the host's connections, unless the same one is waiting.
    pub(super) fn push_back(&mut self, ctl: Control) {
        if !self.q.contains(&ctl) {
            self.q.push_back(ctl);
        }
    }

    /// Queues the reset that refuses a guest packet belonging to no connection, unless the
    /// same one is waiting or [`CONTROL_MAX`] packets are. A guest that sends without posting
    /// receive buffers therefore cannot grow host memory. Dropping such a reset loses nothing
    /// the guest may rely on: its packet named no connection of ours, and a connection the
    /// guest tried to open (dormant never accepts one) then times out in the guest instead of
    /// being refused at once.
    pub(super) fn push_refusal(&mut self, ctl: Control) {
        if self.q.len() < CONTROL_MAX {
            self.push_back(ctl);
        }
    }

    pub(super) fn front(&self) -> Option<&Control> {
        self.q.front()
    }

    pub(super) fn pop_front(&mut self) -> Option<Control> {
        self.q.pop_front()
    }
}
