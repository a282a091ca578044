//! The device model (`Vsock`): the guest's context id, the host's connections by local port and
//! the control packets waiting. The worker calls it with the queues: it takes the guest's
//! packets (answers, data, credit, shutdowns, resets; anything else is refused with a reset) and
//! fills the guest's receive buffers with control packets and connection data, within credit.

use std::collections::HashMap;
use std::io::Write;

use super::connection::{Conn, ConnState, Control, ControlQueue, HOST_BUF};
use super::packet::{
    HDR, HOST_CID, Header, MAX_PKT, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_RESPONSE, OP_RST,
    OP_RW, OP_SHUTDOWN, SHUTDOWN_BOTH, SHUTDOWN_SEND, TYPE_STREAM, read_packet,
};
use crate::virtio::device::{Chain, ChainWriter, DeviceLogic, Queues};
use crate::virtio::mmio::VirtioDevice;

pub(super) const QUEUE_SIZES: [u16; 3] = [256, 256, 64];
pub(super) const RX: usize = 0;
pub(super) const TX: usize = 1;
/// First local port of host-initiated connections.
pub(super) const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// What the worker and the host's streams share.
pub(super) type Shared = crate::virtio::device::Shared<Vsock>;
/// The device behind its lock (the shell's state, dereferencing to [`Vsock`]).
pub(super) type Inner = crate::virtio::device::Inner<Vsock>;

/// The device model: the guest's context id, the host's connections and the control packets
/// waiting for the guest.
#[derive(Debug)]
pub struct Vsock {
    pub(super) cid: u64,
    pub(super) conns: HashMap<u32, Conn>,
    pub(super) control: ControlQueue,
    pub(super) next_port: u32,
    /// A guest packet's payload, reused ([`MAX_PKT`] bytes).
    pub(super) packet: Vec<u8>,
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK
    }
    fn features(&self) -> u64 {
        0
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, _: u64, _: &[u8]) {}
    fn reset(&mut self) {}
}

impl DeviceLogic for Vsock {
    /// A packet's header and payload; a longer chain is dropped.
    const MAX_READABLE: usize = HDR + MAX_PKT as usize;
    /// A receive buffer (Linux posts 4 KiB ones); a larger one is returned unused.
    const MAX_WRITABLE: usize = HDR + MAX_PKT as usize;

    fn process(&mut self, queues: &mut Queues<'_>) {
        self.process_tx(queues);
        self.process_rx(queues);
    }
}

pub(super) enum Next {
    Control(Control),
    Data(u32),
}

impl Vsock {
    /// Takes the guest's packets.
    pub(super) fn process_tx(&mut self, queues: &mut Queues<'_>) {
        loop {
            let mut packet = None;
            let buf = &mut self.packet;
            if !queues.serve(TX, |c| {
                if let Chain::Request(req) = c {
                    packet = read_packet(&mut req.reader, buf);
                }
                0
            }) {
                break;
            }
            if let Some(h) = packet {
                let data = std::mem::take(&mut self.packet);
                self.handle_packet(h, data.get(..h.len as usize).unwrap_or_default());
                self.packet = data;
            }
        }
    }

    pub(super) fn handle_packet(&mut self, h: Header, data: &[u8]) {
        // Anything but an answer on one of our connections is refused with a reset (never a
        // reset answered with a reset).
        let refuse = |control: &mut ControlQueue| {
            if h.op != OP_RST {
                control.push_refusal(Control {
                    local: h.dst_port,
                    peer: h.src_port,
                    op: OP_RST,
                    flags: 0,
                });
            }
        };
        if h.dst_cid != HOST_CID || h.src_cid != self.cid || h.type_ != TYPE_STREAM {
            refuse(&mut self.control);
            return;
        }
        let Some(c) = self
            .conns
            .get_mut(&h.dst_port)
            .filter(|c| c.peer_port == h.src_port)
        else {
            // No such connection (or a guest-initiated one).
            refuse(&mut self.control);
            return;
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            OP_RESPONSE if c.state == ConnState::Connecting => c.state = ConnState::Connected,
            OP_RW if c.state == ConnState::Connected => {
                // The guest honours our credit; anything beyond it is dropped rather than
                // buffered.
                let room = (HOST_BUF as usize).saturating_sub(c.inbound.len());
                c.inbound.extend(&data[..data.len().min(room)]);
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => self.control.push_back(Control {
                local: h.dst_port,
                peer: h.src_port,
                op: OP_CREDIT_UPDATE,
                flags: 0,
            }),
            OP_SHUTDOWN => {
                if h.flags & SHUTDOWN_SEND != 0 {
                    c.peer_done = true;
                }
                if h.flags & SHUTDOWN_BOTH == SHUTDOWN_BOTH && c.host_closed {
                    self.conns.remove(&h.dst_port);
                    self.control.push_back(Control {
                        local: h.dst_port,
                        peer: h.src_port,
                        op: OP_RST,
                        flags: 0,
                    });
                }
            }
            OP_RST => {
                if c.host_closed {
                    self.conns.remove(&h.dst_port);
                } else {
                    c.state = ConnState::Reset;
                }
            }
            _ => {}
        }
    }

    /// Fills the guest's receive buffers with control packets and connection data.
    pub(super) fn process_rx(&mut self, queues: &mut Queues<'_>) {
        // Connections the host closed (or stopped writing to) send their shutdown once their
        // data is out.
        for (&local, c) in self.conns.iter_mut() {
            if c.host_closed && !c.shutdown_sent && c.outbound.is_empty() {
                c.shutdown_sent = true;
                self.control.push_back(Control {
                    local,
                    peer: c.peer_port,
                    op: OP_SHUTDOWN,
                    flags: SHUTDOWN_BOTH,
                });
            } else if c.host_write_done
                && !c.host_closed
                && !c.write_shutdown_sent
                && c.state == ConnState::Connected
                && c.outbound.is_empty()
            {
                // Half-close: the guest's reads see end of file, its writes still arrive.
                c.write_shutdown_sent = true;
                self.control.push_back(Control {
                    local,
                    peer: c.peer_port,
                    op: OP_SHUTDOWN,
                    flags: SHUTDOWN_SEND,
                });
            }
        }
        self.conns
            .retain(|_, c| !(c.host_closed && c.state == ConnState::Reset));
        loop {
            let next = if let Some(ctl) = self.control.front() {
                Next::Control(*ctl)
            } else if let Some((&local, _)) = self.conns.iter().find(|(_, c)| {
                c.state == ConnState::Connected && !c.outbound.is_empty() && c.credit() > 0
            }) {
                Next::Data(local)
            } else {
                break;
            };
            let served = queues.serve(RX, |c| match c {
                Chain::Request(req) => self.fill(next, &mut req.writer),
                Chain::OverCaps(_) => 0,
            });
            if !served {
                break;
            }
        }
    }

    /// Writes the next packet into one receive buffer; returns the bytes written.
    pub(super) fn fill(&mut self, next: Next, w: &mut ChainWriter<'_>) -> u32 {
        let room = w.available().saturating_sub(HDR);
        let cid = self.cid;
        match next {
            Next::Control(ctl) => {
                self.control.pop_front();
                let fwd = self.conns.get_mut(&ctl.local).map_or(0, |c| {
                    c.credit_sent = c.fwd_cnt;
                    c.fwd_cnt
                });
                let h = Header {
                    src_cid: HOST_CID,
                    dst_cid: cid,
                    src_port: ctl.local,
                    dst_port: ctl.peer,
                    type_: TYPE_STREAM,
                    op: ctl.op,
                    flags: ctl.flags,
                    buf_alloc: HOST_BUF,
                    fwd_cnt: fwd,
                    len: 0,
                };
                w.write_all(&h.bytes()).map_or(0, |_| HDR as u32)
            }
            Next::Data(local) => {
                let Some(c) = self.conns.get_mut(&local) else {
                    // Unreachable: chosen above under the same lock.
                    return 0;
                };
                let n = c.outbound.len().min(c.credit() as usize).min(room);
                c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                c.credit_sent = c.fwd_cnt;
                let h = Header {
                    src_cid: HOST_CID,
                    dst_cid: cid,
                    src_port: local,
                    dst_port: c.peer_port,
                    type_: TYPE_STREAM,
                    op: OP_RW,
                    flags: 0,
                    buf_alloc: HOST_BUF,
                    fwd_cnt: c.fwd_cnt,
                    len: n as u32,
                };
                let (a, b) = c.outbound.as_slices();
                let from_a = n.min(a.len());
                let sent = w
                    .write_all(&h.bytes())
                    .and_then(|_| w.write_all(&a[..from_a]))
                    .and_then(|_| w.write_all(&b[..n - from_a]));
                c.outbound.drain(..n);
                sent.map_or(0, |_| (HDR + n) as u32)
            }
        }
    }
}
