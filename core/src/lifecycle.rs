//! The sandbox lifecycle as an explicit state machine.
//!
//! ```text
//!            checkpoint / calls
//!              ┌──────┐
//!   create ──► Running ──standby──► Standby ──resume──► Running
//!              │  ▲  └──trap──► Poisoned ──resume──┘
//!              │  └────────────resume (any snapshot)
//!              └──kill──► Killed (final; reachable from every state)
//! ```
//!
//! Every operation is checked against the current state before it runs; an operation the state
//! does not allow is an [`crate::Error::IllegalTransition`], never a
//! surprise further down.
//!
//! [`State`] and [`Operation`] themselves are plain types of [`crate::ids`] (errors name them);
//! the rules that tie them together are here.

use crate::error::{Error, Result};
use crate::ids::SnapshotId;

pub use crate::ids::{Operation, State};

impl State {
    /// Whether `op` may run in this state.
    pub fn allows(self, op: Operation) -> bool {
        use Operation::*;
        match self {
            State::Running => true,
            State::Standby | State::Poisoned => matches!(op, Resume | Kill),
            State::Killed => false,
        }
    }

    /// Checks that `op` may run in this state.
    pub fn check(self, op: Operation) -> Result<()> {
        if self.allows(op) {
            Ok(())
        } else {
            Err(Error::IllegalTransition { op, state: self })
        }
    }

    /// The state after `op` succeeded, or the typed error if `op` is not allowed.
    pub fn after(self, op: Operation) -> Result<State> {
        self.check(op)?;
        Ok(match op {
            Operation::Standby => State::Standby,
            Operation::Resume => State::Running,
            Operation::Kill => State::Killed,
            _ => self,
        })
    }
}

/// Lifecycle bookkeeping a tier keeps per sandbox: the state and the last good snapshot.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    state: State,
    last_good: Option<SnapshotId>,
    poison_reason: Option<String>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self::new()
    }
}

impl Lifecycle {
    /// A sandbox that was just created (running, no snapshot yet).
    pub fn new() -> Self {
        Lifecycle {
            state: State::Running,
            last_good: None,
            poison_reason: None,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// The newest snapshot this sandbox's state is known to equal or follow.
    pub fn last_good(&self) -> Option<&SnapshotId> {
        self.last_good.as_ref()
    }

    /// Checks `op` against the state; for a poisoned sandbox the error says how to recover.
    pub fn check(&self, op: Operation) -> Result<()> {
        if self.state == State::Poisoned && !self.state.allows(op) {
            return Err(Error::Poisoned {
                reason: self.poison_reason.clone().unwrap_or_default(),
                last_good: self.last_good.clone(),
            });
        }
        self.state.check(op)
    }

    /// Moves the state after `op` succeeded.
    pub fn complete(&mut self, op: Operation) -> Result<()> {
        self.state = self.state.after(op)?;
        if op == Operation::Resume {
            self.poison_reason = None;
        }
        Ok(())
    }

    /// Records a snapshot that captures the current state.
    pub fn set_last_good(&mut self, id: SnapshotId) {
        self.last_good = Some(id);
    }

    /// Marks the live instance as lost.
    pub fn poison(&mut self, reason: impl Into<String>) {
        if self.state != State::Killed {
            self.state = State::Poisoned;
            self.poison_reason = Some(reason.into());
        }
    }
}

/// The steps a tier's sandbox is made of, from which [`standby`], [`kill`] and [`fork`] build
/// the contract's sequences once for every tier (the tier's `Sandbox` impl calls them).
pub trait Steps: Sized {
    /// The sandbox's state machine.
    fn lifecycle(&mut self) -> &mut Lifecycle;
    /// Writes a durable snapshot of the running sandbox (checking
    /// [`Operation::Checkpoint`] itself); the sandbox keeps running.
    fn write_checkpoint(&mut self) -> Result<SnapshotId>;
    /// Releases the sandbox's compute and memory (its instance or VM, its live files); what
    /// it keeps is its identity, spec, grants and snapshots. Idempotent.
    fn release(&mut self);
    /// `n` new sandboxes from snapshot `base`, each with an id of its own and this sandbox's
    /// grants.
    fn children(&mut self, base: &SnapshotId, n: usize) -> Result<Vec<Self>>;
}

/// Checkpoints, then releases all compute and memory: `Sandbox::standby`.
pub fn standby<S: Steps>(sb: &mut S) -> Result<SnapshotId> {
    sb.lifecycle().check(Operation::Standby)?;
    let id = sb.write_checkpoint()?;
    sb.release();
    sb.lifecycle().complete(Operation::Standby)?;
    Ok(id)
}

/// Ends the sandbox for good, releasing everything but its snapshots: `Sandbox::kill`.
pub fn kill<S: Steps>(sb: &mut S) -> Result<()> {
    sb.lifecycle().check(Operation::Kill)?;
    sb.release();
    sb.lifecycle().complete(Operation::Kill)
}

/// A checkpoint, then `n` children of it: `Sandbox::fork`.
pub fn fork<S: Steps>(sb: &mut S, n: usize) -> Result<Vec<S>> {
    let base = sb.write_checkpoint()?;
    sb.children(&base, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_allows_everything() {
        for op in [
            Operation::RunCode,
            Operation::Exec,
            Operation::Files,
            Operation::Checkpoint,
            Operation::Standby,
            Operation::Resume,
            Operation::Kill,
        ] {
            assert!(State::Running.allows(op), "{op}");
        }
    }

    #[test]
    fn standby_allows_only_resume_and_kill() {
        assert!(matches!(
            State::Standby.check(Operation::RunCode),
            Err(Error::IllegalTransition {
                op: Operation::RunCode,
                state: State::Standby
            })
        ));
        assert!(State::Standby.check(Operation::Checkpoint).is_err());
        assert_eq!(
            State::Standby.after(Operation::Resume).ok(),
            Some(State::Running)
        );
        assert_eq!(
            State::Standby.after(Operation::Kill).ok(),
            Some(State::Killed)
        );
    }

    #[test]
    fn killed_is_final() {
        for op in [Operation::Resume, Operation::Kill, Operation::RunCode] {
            assert!(State::Killed.check(op).is_err());
        }
    }

    #[test]
    fn poisoned_names_last_good_snapshot() {
        let mut lc = Lifecycle::new();
        let id = SnapshotId::parse("s-0000000000000001-00000000000000000000000000000001").unwrap();
        lc.set_last_good(id.clone());
        lc.poison("deadline");
        match lc.check(Operation::RunCode) {
            Err(Error::Poisoned { last_good, reason }) => {
                assert_eq!(last_good, Some(id));
                assert_eq!(reason, "deadline");
            }
            other => panic!("unexpected {other:?}"),
        }
        lc.complete(Operation::Resume).unwrap();
        assert_eq!(lc.state(), State::Running);
    }
}
