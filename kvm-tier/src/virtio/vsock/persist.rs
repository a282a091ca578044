//! The vsock device's saved form ([`VsockState`]): the guest's context id, the next host port,
//! the transport, and the connections: idle ones ([`LiveConn`]) are kept as they were, ones with
//! data in flight are reset after restore. Saving reads the muxer; restoring checks the
//! (untrusted) state and rebuilds the muxer from it.

use std::collections::HashMap;

use super::connection::{Conn, ConnState, Control, ControlQueue};
use super::muxer::{FIRST_LOCAL_PORT, Vsock};
use super::packet::{GUEST_CID, MAX_PKT, OP_RST};
use crate::virtio::mmio::TransportState;

/// Most connections (open and live together) a vsock state may hold: far more than a sandbox
/// keeps (one agent connection, a few forwarded ports), few enough that restoring them (and the
/// resets sent for open ones) stays small. Decoding and restoring refuse more.
pub const MAX_SNAPSHOT_CONNS: usize = 4096;

/// The vsock device's state in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockState {
    pub cid: u64,
    pub next_port: u32,
    pub transport: TransportState,
    /// (host port, guest port) of connections with data in flight at the checkpoint: reset
    /// after restore.
    #[serde(deserialize_with = "dormant_core::snapshot::bounded_vec::<_, _, MAX_SNAPSHOT_CONNS>")]
    pub open: Vec<(u32, u32)>,
    /// Idle connections, restored as they were.
    #[serde(
        default,
        deserialize_with = "dormant_core::snapshot::bounded_vec::<_, _, MAX_SNAPSHOT_CONNS>"
    )]
    pub live: Vec<LiveConn>,
}

impl VsockState {
    /// What restoring requires of a (untrusted) state: a guest context id a guest can have
    /// (3 to 2^32 - 2), host ports where host-initiated connections live (from 2^30), each
    /// connection once, at most [`MAX_SNAPSHOT_CONNS`] of them.
    pub fn check(&self) -> Result<(), String> {
        if !(3..u32::MAX as u64).contains(&self.cid) {
            return Err(format!("guest context id {} is not a guest's", self.cid));
        }
        if self.next_port < FIRST_LOCAL_PORT {
            return Err(format!(
                "next host port {} below {FIRST_LOCAL_PORT}",
                self.next_port
            ));
        }
        let n = self.open.len() + self.live.len();
        if n > MAX_SNAPSHOT_CONNS {
            return Err(format!("{n} connections (at most {MAX_SNAPSHOT_CONNS})"));
        }
        let mut ports = std::collections::HashSet::with_capacity(n);
        for local in self
            .open
            .iter()
            .map(|o| o.0)
            .chain(self.live.iter().map(|c| c.local))
        {
            if local < FIRST_LOCAL_PORT || !ports.insert(local) {
                return Err(format!(
                    "host port {local} repeated or not a host-initiated one"
                ));
            }
        }
        Ok(())
    }
}

/// An idle connection in a snapshot: its ports and flow-control counters.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LiveConn {
    pub local: u32,
    pub peer: u32,
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    pub tx_cnt: u32,
    pub fwd_cnt: u32,
    pub credit_sent: u32,
}

impl Vsock {
    /// A muxer restoring `state` (already checked), or a fresh one for [`GUEST_CID`].
    pub(super) fn restored(state: Option<&VsockState>) -> Vsock {
        let cid = state.map_or(GUEST_CID, |s| s.cid);
        let mut control = ControlQueue::default();
        let mut next_port = FIRST_LOCAL_PORT;
        let mut conns = HashMap::new();
        if let Some(s) = state {
            for c in &s.live {
                conns.insert(
                    c.local,
                    Conn {
                        state: ConnState::Connected,
                        peer_buf_alloc: c.peer_buf_alloc,
                        peer_fwd_cnt: c.peer_fwd_cnt,
                        tx_cnt: c.tx_cnt,
                        fwd_cnt: c.fwd_cnt,
                        credit_sent: c.credit_sent,
                        adoptable: true,
                        ..Conn::connecting(c.peer)
                    },
                );
            }
            next_port = s.next_port;
            for &(local, peer) in &s.open {
                control.push_back(Control {
                    local,
                    peer,
                    op: OP_RST,
                    flags: 0,
                });
            }
        }
        Vsock {
            cid,
            conns,
            control,
            next_port,
            packet: vec![0; MAX_PKT as usize],
        }
    }

    /// The muxer's saved form with `transport` (the device paused).
    pub(super) fn saved(&self, transport: TransportState) -> VsockState {
        let mut open = Vec::new();
        let mut live = Vec::new();
        for (&local, c) in &self.conns {
            if c.state == ConnState::Reset {
                continue;
            }
            let idle = c.state == ConnState::Connected
                && c.inbound.is_empty()
                && c.outbound.is_empty()
                && !c.host_closed
                && !c.host_write_done
                && !c.transient
                && !c.peer_done;
            if idle {
                live.push(LiveConn {
                    local,
                    peer: c.peer_port,
                    peer_buf_alloc: c.peer_buf_alloc,
                    peer_fwd_cnt: c.peer_fwd_cnt,
                    tx_cnt: c.tx_cnt,
                    fwd_cnt: c.fwd_cnt,
                    credit_sent: c.credit_sent,
                });
            } else {
                open.push((local, c.peer_port));
            }
        }
        open.sort_unstable();
        live.sort_unstable_by_key(|c| c.local);
        VsockState {
            cid: self.cid,
            next_port: self.next_port,
            transport,
            open,
            live,
        }
    }
}
