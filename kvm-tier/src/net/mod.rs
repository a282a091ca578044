//! The guest's network: a virtio-net device (`virtio::net`) whose frames a userspace TCP/IP
//! stack ([`nat`], the `smoltcp` crate) terminates in this process, relaying each guest TCP
//! connection to a host socket (NAT) and answering the guest's DNS, under the sandbox's egress
//! policy (the policy decision and the DNS answers live in [`egress`]).
//!
//! No root, no TAP device, no host firewall: the guest's packets never reach the host's network
//! stack as packets, only as the payload of sockets this process opens.
//!
//! # The guest's view (fixed, documented in the README)
//!
//! | what | value |
//! |---|---|
//! | guest address | [`GUEST_ADDR`]`/`[`GUEST_PREFIX`] (`10.0.2.15/24`) on `eth0`, MAC [`GUEST_MAC`] |
//! | gateway | [`GATEWAY_ADDR`] (`10.0.2.2`): the host's `127.0.0.1` as `host.dormant.internal`, when the policy allows `host` |
//! | DNS server | [`DNS_ADDR`] (`10.0.2.3`), port 53, UDP, answered by the VMM |
//! | MTU | [`MTU`] (16384: a virtual link, so larger frames cost nothing; the guest's per-packet work, emulated on PVM hosts, is what a 1500-byte MTU would multiply) |
//!
//! The guest agent configures `eth0` with these at start (and writes `/etc/resolv.conf`).
//!
//! # Bounds
//!
//! Per sandbox: at most [`MAX_CONNECTIONS`] NAT'd TCP connections (open or being connected; a
//! SYN beyond that is refused with a reset), each with [`CONN_BUFFER`] bytes of buffer each
//! way, at most [`MAX_DNS_IN_FLIGHT`] DNS queries being answered (more are dropped; the guest's
//! resolver retries), and [`FRAME_QUEUE`] frames of at most [`MAX_FRAME`] bytes queued in each
//! direction between the device and the stack. So the network's memory is bounded by about
//! `MAX_CONNECTIONS × 2 × CONN_BUFFER + 2 × FRAME_QUEUE × MAX_FRAME` (32 MiB + 8 MiB),
//! whatever the guest sends.

pub mod egress;
pub mod nat;

use std::collections::VecDeque;
use std::net::Ipv4Addr;

pub use egress::EgressState;
pub use nat::{Nat, NetHandle, NetStats};

/// The guest's address on `eth0`.
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The prefix length of the guest's network (`10.0.2.0/24`).
pub const GUEST_PREFIX: u8 = 24;
/// The guest's default gateway; TCP to it reaches the host's loopback (`127.0.0.1`) when the
/// policy allows `host` (the guest resolves `host.dormant.internal` to it).
pub const GATEWAY_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The guest's DNS server (UDP port 53), answered by the VMM.
pub const DNS_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// The guest's MAC address (a locally administered one).
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// The MAC address the gateway and the DNS server answer from.
pub const GATEWAY_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x02];
/// The IP MTU of the guest's link (offered to the guest with `VIRTIO_NET_F_MTU`).
pub const MTU: usize = 16384;
/// The largest Ethernet frame either side sends (MTU plus the 14-byte Ethernet header; no
/// VLAN tags, no offloads). A longer guest frame is dropped and counted.
pub const MAX_FRAME: usize = MTU + 14;
/// The smallest frame worth looking at (an Ethernet header).
pub const MIN_FRAME: usize = 14;
/// Frames queued in each direction between the device and the stack.
pub const FRAME_QUEUE: usize = 256;
/// NAT'd TCP connections per sandbox (established or being connected).
pub const MAX_CONNECTIONS: usize = 256;
/// Bytes buffered per NAT'd connection in each direction.
pub const CONN_BUFFER: usize = 64 << 10;
/// DNS queries being answered at once per sandbox.
pub const MAX_DNS_IN_FLIGHT: usize = 16;

/// The frames between the virtio device (guest side) and the stack (host side), each way at
/// most [`FRAME_QUEUE`] frames of at most [`MAX_FRAME`] bytes (Ethernet frames, no virtio
/// header).
#[derive(Debug, Default)]
pub struct Frames {
    /// Frames for the guest, filled by the stack, taken by the device.
    pub to_guest: VecDeque<Vec<u8>>,
    /// Frames from the guest, filled by the device, taken by the stack.
    pub from_guest: VecDeque<Vec<u8>>,
}

#[cfg(test)]
mod tests;
