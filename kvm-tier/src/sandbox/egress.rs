//! The sandbox's egress policy ([`Egress`]): part of its spec, so every checkpoint records it
//! and a resume or a fork starts under it, and in force in the running machine's network
//! device (`net::egress` enforces it).

use dormant_core::Result;
use dormant_core::lifecycle::Operation;
use dormant_core::network::{Egress, NetworkPolicy};

use super::KvmSandbox;
use crate::machine::Machine;

impl Egress for KvmSandbox {
    /// Replaces the policy of the running sandbox: new connections and DNS answers follow it
    /// at once, open connections it no longer allows are reset, and the next checkpoint
    /// records it. Errors: a policy with too many entries
    /// ([`Error::InvalidArgument`](dormant_core::Error::InvalidArgument)); a sandbox that is
    /// not running ([`Error::IllegalTransition`](dormant_core::Error::IllegalTransition):
    /// resume it first, or let [`Managed`](dormant_core::Managed) wake it).
    fn set_network(&mut self, policy: NetworkPolicy) -> Result<()> {
        policy.validate()?;
        self.lifecycle.check(Operation::Network)?;
        // The NAT resets the open connections the new policy does not allow.
        if let Some(net) = self.machine.as_ref().and_then(Machine::net) {
            net.set_policy(policy.clone());
        }
        self.spec.network = policy;
        Ok(())
    }

    fn network(&self) -> &NetworkPolicy {
        &self.spec.network
    }
}
