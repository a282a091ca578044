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
