//! Checkpoints of the live machine: the machine is quiesced (vCPU and devices paused, their
//! state saved), the RAM and disk pages written since the parent snapshot (or full images,
//! past [`MAX_DEPTH`] layers) are stored with that state, and the guest runs on. Failure-atomic:
//! a checkpoint that fails leaves the guest running and its unsaved pages for the next one.

use dormant_core::lifecycle::{Operation, State};
use dormant_core::snapshot::SnapshotId;
use dormant_core::{Error, Result};

use super::KvmSandbox;
use crate::machine::Machine;
use crate::snapshot;

/// Deepest chain of incremental snapshots before a checkpoint writes a full image again.
const MAX_DEPTH: u32 = 16;

impl KvmSandbox {
    /// Checkpoints the live machine. Failure-atomic: whatever step fails (capturing the state,
    /// a full store, an I/O error, a parent snapshot deleted meanwhile), the guest runs on with
    /// its state intact and what it wrote since the last committed snapshot stays in
    /// `self.unsaved`, so the next checkpoint that succeeds is complete. Only a guest that has
    /// crashed (nothing left to run) poisons the sandbox.
    pub(super) fn do_checkpoint(&mut self) -> Result<SnapshotId> {
        self.lifecycle.check(Operation::Checkpoint)?;
        self.check_memory()?;
        // The agent connection is idle between calls: it is part of the snapshot and a resume
        // adopts it (a broken one is dropped first so that it is not).
        if self.agent.as_ref().is_some_and(|c| c.is_broken()) {
            self.agent = None;
        }
        let machine = self.machine.as_mut().ok_or(Error::IllegalTransition {
            op: Operation::Checkpoint,
            state: State::Standby,
        })?;
        let quiesced = machine.quiesce();
        let running = machine.is_running();
        let (vm, state, devices) = match quiesced {
            Ok(q) => q,
            Err(e) => {
                if running {
                    // Only capturing the state failed; the guest was let go again.
                    return Err(Error::runtime("capture the guest's state", e));
                }
                let msg = e.to_string();
                self.lifecycle.poison(msg.clone());
                return Err(Error::Trap {
                    message: msg,
                    last_good: self.lifecycle.last_good().cloned(),
                });
            }
        };
        // From here on the VM is out of its thread: nothing may return before it is given back.
        self.unsaved
            .collect(&vm, self.machine.as_ref().and_then(Machine::disk));
        let saved = self.save_quiesced(&vm, &state, &devices);
        let resumed = match self.machine.as_mut() {
            Some(m) => m.unquiesce(vm),
            None => Err(crate::machine::MachineError::GuestStopped {
                reason: "the machine vanished during a checkpoint".into(),
            }),
        };
        if let Err(e) = resumed {
            let msg = e.to_string();
            self.lifecycle.poison(msg.clone());
            return Err(Error::Trap {
                message: msg,
                last_good: self.lifecycle.last_good().cloned(),
            });
        }
        self.check_memory()?;
        let id = saved?;
        self.unsaved.clear();
        self.parent = Some(id.clone());
        self.lifecycle.set_last_good(id.clone());
        self.lifecycle.complete(Operation::Checkpoint)?;
        Ok(id)
    }

    /// Writes the snapshot of a quiesced machine: a delta on `self.parent` when that snapshot
    /// is still in the store and its chain is short enough, else full images.
    fn save_quiesced(
        &self,
        vm: &crate::vm::MicroVm,
        state: &crate::vm::VmState,
        devices: &crate::machine::DevicesState,
    ) -> Result<SnapshotId> {
        let parent = match &self.parent {
            Some(p) => match self.store.manifest(p) {
                Ok(m) if m.memory.depth < MAX_DEPTH => Some(m),
                Ok(_) => None,
                // Deleted (or damaged) under the running sandbox: start a new chain.
                Err(Error::SnapshotNotFound(_) | Error::Snapshot { .. }) => None,
                Err(e) => return Err(e),
            },
            None => None,
        };
        let disk = self.machine.as_ref().and_then(Machine::disk);
        snapshot::save_machine(
            &self.store,
            vm,
            state,
            Some(devices),
            disk,
            parent.as_ref(),
            &self.unsaved,
            &self.id,
            &self.spec,
        )
    }
}
