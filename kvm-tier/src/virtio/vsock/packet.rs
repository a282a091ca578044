//! The virtio-vsock wire format: the 44-byte packet header (`struct virtio_vsock_hdr`), its
//! operations and shutdown flags, and reading one packet from a guest's descriptor chain. Plain
//! data with no device state, so the muxer and the host's streams share it.

use std::io::Read;

use crate::virtio::device::ChainReader;

pub(super) const HOST_CID: u64 = 2;
/// The guest's context id.
pub const GUEST_CID: u64 = 3;
pub(super) const HDR: usize = 44;
/// Largest payload accepted in one guest packet (Linux sends at most 64 KiB).
pub(super) const MAX_PKT: u32 = 64 * 1024;

pub(super) const TYPE_STREAM: u16 = 1;
pub(super) const OP_REQUEST: u16 = 1;
pub(super) const OP_RESPONSE: u16 = 2;
pub(super) const OP_RST: u16 = 3;
pub(super) const OP_SHUTDOWN: u16 = 4;
pub(super) const OP_RW: u16 = 5;
pub(super) const OP_CREDIT_UPDATE: u16 = 6;
pub(super) const OP_CREDIT_REQUEST: u16 = 7;
pub(super) const SHUTDOWN_SEND: u32 = 2;
pub(super) const SHUTDOWN_BOTH: u32 = 3;

#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Header {
    pub(super) src_cid: u64,
    pub(super) dst_cid: u64,
    pub(super) src_port: u32,
    pub(super) dst_port: u32,
    pub(super) len: u32,
    pub(super) type_: u16,
    pub(super) op: u16,
    pub(super) flags: u32,
    pub(super) buf_alloc: u32,
    pub(super) fwd_cnt: u32,
}

impl Header {
    pub(super) fn parse(b: &[u8; HDR]) -> Header {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap_or_default());
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub(super) fn bytes(&self) -> [u8; HDR] {
        let mut b = [0u8; HDR];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// A guest packet's header, its payload read into `payload`; `None` for a malformed one.
pub(super) fn read_packet(r: &mut ChainReader<'_>, payload: &mut [u8]) -> Option<Header> {
    let mut hdr = [0u8; HDR];
    r.read_exact(&mut hdr).ok()?;
    let h = Header::parse(&hdr);
    if h.len > MAX_PKT {
        return None;
    }
    r.read_exact(payload.get_mut(..h.len as usize)?).ok()?;
    Some(h)
}
