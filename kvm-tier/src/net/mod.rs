//! The guest's network: a virtio-net device backed by a userspace TCP/IP stack doing NAT to
//! host sockets, under the sandbox's egress policy (`egress`).
//!
//! The guest sees a fixed, documented network (the same in every sandbox, so a checkpoint
//! resumes anywhere): its own address [`GUEST_ADDR`]/[`GUEST_PREFIX`], a gateway at
//! [`GATEWAY_ADDR`] that stands for the host's `127.0.0.1` (reachable only when the policy
//! allows `host`, under the name [`HOST_ALIAS`](dormant_core::network::HOST_ALIAS)), and a DNS
//! server at [`DNS_ADDR`] answered by the VMM itself.

use std::net::Ipv4Addr;

pub mod egress;

/// The guest's IPv4 address.
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

/// The prefix length of the guest's network (`10.0.2.0/24`).
pub const GUEST_PREFIX: u8 = 24;

/// The gateway: the guest's default route, and the host's `127.0.0.1` for TCP when the policy
/// allows `host` (the DNS name `host.dormant.internal` resolves to it).
pub const GATEWAY_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

/// The DNS server the guest is given (UDP port 53), answered by the VMM under the policy.
pub const DNS_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
