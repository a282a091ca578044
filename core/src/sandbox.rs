//! The sandbox contract every tier implements: [`Sandbox`], with its call types (from
//! [`crate::command`]) and the capabilities a tier may lack (from [`crate::capability`]).
//!
//! `Box<dyn Sandbox>` is a sandbox too: what a [`Runtime`](crate::Runtime) gives, and what a
//! front end holds when it must not name a tier.

use std::sync::Arc;
use std::time::Duration;

pub use crate::capability::{Interrupt, Processes, StreamingExec};
pub use crate::command::{Command, ExecOutput, Execution, ExecutionError};
use crate::error::{Error, Result};
use crate::grants::Grants;
use crate::lifecycle::State;
use crate::metrics::Metrics;
use crate::network::{Egress, Ports};
use crate::paths::DirEntry;
use crate::snapshot::SnapshotId;
use crate::spec::Tier;
use crate::terminal::Terminals;

/// The contract shared by the WASI and KVM tiers.
///
/// Calls are synchronous and take `&mut self`: a checkpoint can only happen between calls, when
/// the guest is quiescent. Creating a sandbox and resuming a snapshot in another process is
/// the tier's [`Runtime`](crate::Runtime)'s job; `resume` here reloads this handle from any
/// snapshot. Calls a tier may not have are capabilities ([`processes`](Sandbox::processes),
/// [`streaming`](Sandbox::streaming), [`interrupter`](Sandbox::interrupter)) that answer
/// [`Error::Unsupported`] or `None` where it has not.
/// Host access (mounted directories, a module file) always comes from the caller, never from a
/// snapshot: see [`Grants`].
pub trait Sandbox: Send {
    /// The sandbox's identity (stable across checkpoint and resume).
    fn id(&self) -> &str;
    fn tier(&self) -> Tier;
    fn state(&self) -> State;

    /// Runs code in the sandbox's interpreter session; state persists between calls.
    fn run_code(&mut self, code: &str) -> Result<Execution>;
    /// Runs code like [`run_code`](Sandbox::run_code) with `timeout` as its deadline instead
    /// of the sandbox's call timeout (`None`: the call timeout). A tier that cannot take a
    /// deadline per call answers a `Some` timeout with [`Error::Unsupported`] (the default).
    fn run_code_with_timeout(
        &mut self,
        code: &str,
        timeout: Option<Duration>,
    ) -> Result<Execution> {
        match timeout {
            None => self.run_code(code),
            Some(_) => Err(Error::Unsupported {
                op: "run_code with a timeout of its own",
                what: format!("the {} tier", self.tier()),
            }),
        }
    }
    /// Runs a command to completion.
    fn exec(&mut self, cmd: &Command) -> Result<ExecOutput>;

    fn read_file(&mut self, path: &str) -> Result<Vec<u8>>;
    fn write_file(&mut self, path: &str, data: &[u8]) -> Result<()>;
    fn list_dir(&mut self, path: &str) -> Result<Vec<DirEntry>>;
    fn remove(&mut self, path: &str) -> Result<()>;
    fn exists(&mut self, path: &str) -> Result<bool>;

    /// Writes a durable snapshot; the sandbox keeps running.
    fn checkpoint(&mut self) -> Result<SnapshotId>;
    /// Checkpoints, then releases all compute and memory.
    fn standby(&mut self) -> Result<SnapshotId>;
    /// The host access this handle holds: the grants of its create, or of its last
    /// [`resume_with`](Sandbox::resume_with). What resumes on the caller's behalf (auto-standby's
    /// wake, [`fork`](Sandbox::fork)) passes them along.
    fn grants(&self) -> &Grants;
    /// Replaces this handle's state with the snapshot's, with the host access this handle holds
    /// ([`grants`](Sandbox::grants)): a snapshot never grants any. Errors as
    /// [`resume_with`](Sandbox::resume_with).
    fn resume(&mut self, id: &SnapshotId) -> Result<()> {
        let grants = self.grants().clone();
        self.resume_with(id, &grants)
    }
    /// Replaces this handle's state with the snapshot's, with `grants` as its host access: the
    /// host directories for the snapshot's mount points and, for a module workload, the module
    /// file (see [`Grants`]). The handle keeps them for later resumes. Grants that do not fit
    /// the snapshot are [`Error::Grant`] and leave the handle as it was.
    fn resume_with(&mut self, id: &SnapshotId, grants: &Grants) -> Result<()>;
    /// Turns this sandbox into a parent of `n` independent children: a checkpoint, then `n`
    /// resumes of it, each with its own id, freshly seeded randomness and the parent's grants. Children share the
    /// snapshot's memory pages copy-on-write (nothing is copied per child) and diverge
    /// independently; their own checkpoints store only what they changed.
    fn fork(&mut self, n: usize) -> Result<Vec<Self>>
    where
        Self: Sized;
    /// [`fork`](Sandbox::fork) for a caller that holds `dyn Sandbox`: the same children, boxed.
    fn fork_boxed(&mut self, n: usize) -> Result<Vec<Box<dyn Sandbox>>>;
    /// Ends the sandbox for good, releasing everything but its snapshots.
    fn kill(&mut self) -> Result<()>;

    /// What this handle has used since it was created or resumed (CPU time, disk bytes
    /// written) and the guest memory it holds now (see [`Metrics`] for units). Never wakes
    /// or runs the guest: a sandbox in standby reports zero memory and the counters it kept,
    /// a killed one what it had used.
    fn metrics(&mut self) -> Result<Metrics>;

    /// A handle that interrupts this sandbox's running call from another thread (while the
    /// call holds `&mut self`), valid across resumes of this handle; `None` for a sandbox that
    /// cannot be interrupted.
    fn interrupter(&self) -> Option<Arc<dyn Interrupt>> {
        None
    }

    /// Background processes ([`Processes`]), or [`Error::Unsupported`] from a tier whose
    /// commands run to completion (the default).
    fn processes(&mut self) -> Result<&mut dyn Processes> {
        Err(Error::Unsupported {
            op: "background commands",
            what: format!("the {} tier", self.tier()),
        })
    }

    /// Guest ports reachable from the host ([`Ports`]), or [`Error::Unsupported`] from a tier
    /// without networking (the default; the WASI tier).
    fn ports(&mut self) -> Result<&mut dyn Ports> {
        Err(Error::Unsupported {
            op: "exposing a port",
            what: format!("the {} tier: WASI preview 1 has no sockets", self.tier()),
        })
    }

    /// The egress policy of the running sandbox ([`Egress`]), or [`Error::Unsupported`] from a
    /// tier without networking (the default; the WASI tier).
    fn egress(&mut self) -> Result<&mut dyn Egress> {
        Err(Error::Unsupported {
            op: "setting the network policy",
            what: format!("the {} tier: WASI preview 1 has no sockets", self.tier()),
        })
    }

    /// Programs on pseudo-terminals ([`Terminals`]), or [`Error::Unsupported`] from a tier
    /// without them (the default; the WASI tier).
    fn terminals(&mut self) -> Result<&mut dyn Terminals> {
        Err(Error::Unsupported {
            op: "a terminal",
            what: format!("the {} tier: it has no pseudo-terminals", self.tier()),
        })
    }

    /// `exec` with output as it comes ([`StreamingExec`]); `None` for a tier that gives a
    /// command's output only when it ends (the default).
    fn streaming(&mut self) -> Option<&mut dyn StreamingExec> {
        None
    }
}

/// `sandboxes`, each boxed: what a tier's [`fork_boxed`](Sandbox::fork_boxed) and
/// [`Runtime::fork`](crate::Runtime::fork) give.
pub fn boxed<S: Sandbox + 'static>(sandboxes: Vec<S>) -> Vec<Box<dyn Sandbox>> {
    sandboxes
        .into_iter()
        .map(|s| Box::new(s) as Box<dyn Sandbox>)
        .collect()
}

/// A sandbox of any tier prints its tier, id and state.
impl std::fmt::Debug for dyn Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("tier", &self.tier())
            .field("id", &self.id())
            .field("state", &self.state())
            .finish()
    }
}

/// Any sandbox, boxed: every call goes to the sandbox inside, and [`fork`](Sandbox::fork)
/// gives boxed children.
impl Sandbox for Box<dyn Sandbox> {
    fn id(&self) -> &str {
        (**self).id()
    }
    fn tier(&self) -> Tier {
        (**self).tier()
    }
    fn state(&self) -> State {
        (**self).state()
    }
    fn run_code(&mut self, code: &str) -> Result<Execution> {
        (**self).run_code(code)
    }
    fn run_code_with_timeout(
        &mut self,
        code: &str,
        timeout: Option<Duration>,
    ) -> Result<Execution> {
        (**self).run_code_with_timeout(code, timeout)
    }
    fn exec(&mut self, cmd: &Command) -> Result<ExecOutput> {
        (**self).exec(cmd)
    }
    fn read_file(&mut self, path: &str) -> Result<Vec<u8>> {
        (**self).read_file(path)
    }
    fn write_file(&mut self, path: &str, data: &[u8]) -> Result<()> {
        (**self).write_file(path, data)
    }
    fn list_dir(&mut self, path: &str) -> Result<Vec<DirEntry>> {
        (**self).list_dir(path)
    }
    fn remove(&mut self, path: &str) -> Result<()> {
        (**self).remove(path)
    }
    fn exists(&mut self, path: &str) -> Result<bool> {
        (**self).exists(path)
    }
    fn checkpoint(&mut self) -> Result<SnapshotId> {
        (**self).checkpoint()
    }
    fn standby(&mut self) -> Result<SnapshotId> {
        (**self).standby()
    }
    fn grants(&self) -> &Grants {
        (**self).grants()
    }
    fn resume(&mut self, id: &SnapshotId) -> Result<()> {
        (**self).resume(id)
    }
    fn resume_with(&mut self, id: &SnapshotId, grants: &Grants) -> Result<()> {
        (**self).resume_with(id, grants)
    }
    fn fork(&mut self, n: usize) -> Result<Vec<Self>> {
        (**self).fork_boxed(n)
    }
    fn fork_boxed(&mut self, n: usize) -> Result<Vec<Box<dyn Sandbox>>> {
        (**self).fork_boxed(n)
    }
    fn kill(&mut self) -> Result<()> {
        (**self).kill()
    }
    fn metrics(&mut self) -> Result<Metrics> {
        (**self).metrics()
    }
    fn interrupter(&self) -> Option<Arc<dyn Interrupt>> {
        (**self).interrupter()
    }
    fn processes(&mut self) -> Result<&mut dyn Processes> {
        (**self).processes()
    }
    fn ports(&mut self) -> Result<&mut dyn Ports> {
        (**self).ports()
    }
    fn egress(&mut self) -> Result<&mut dyn Egress> {
        (**self).egress()
    }
    fn terminals(&mut self) -> Result<&mut dyn Terminals> {
        (**self).terminals()
    }
    fn streaming(&mut self) -> Option<&mut dyn StreamingExec> {
        (**self).streaming()
    }
}
