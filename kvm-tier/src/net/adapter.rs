//! A stand-in for the egress decision (`net::egress`, written alongside): the same interface,
//! deciding on addresses alone and answering no DNS. Replaced when `egress` lands.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use dormant_core::NetworkPolicy;

use super::GATEWAY_ADDR;

/// A sandbox's egress state: its policy.
#[derive(Debug, Clone, Default)]
pub struct EgressState {
    policy: NetworkPolicy,
}

impl EgressState {
    /// The state for `policy`.
    pub fn new(policy: NetworkPolicy) -> Self {
        EgressState { policy }
    }

    /// Replaces the policy.
    pub fn set_policy(&mut self, policy: NetworkPolicy) {
        self.policy = policy;
    }

    /// The policy in force.
    pub fn policy(&self) -> &NetworkPolicy {
        &self.policy
    }

    /// Where a guest TCP connection to `dst` goes on the host (`None`: refused).
    pub fn tcp_target(&self, dst: SocketAddrV4) -> Option<SocketAddr> {
        if *dst.ip() == GATEWAY_ADDR {
            return self
                .policy
                .allows_host()
                .then(|| SocketAddr::from((Ipv4Addr::LOCALHOST, dst.port())));
        }
        let ip = IpAddr::V4(*dst.ip());
        (!ip.is_loopback() && self.policy.allows_addr(ip)).then_some(SocketAddr::V4(dst))
    }

    /// Answers one DNS query datagram (`None`: dropped).
    pub fn answer_dns(&mut self, _query: &[u8]) -> Option<Vec<u8>> {
        None
    }
}
