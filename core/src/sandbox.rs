//! The sandbox contract every tier implements.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::grants::Grants;
use crate::lifecycle::State;
use crate::paths::DirEntry;
use crate::snapshot::SnapshotId;
use crate::spec::Tier;

/// An exception raised by code run in an interpreter session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutionError {
    /// The exception's type name, e.g. `ZeroDivisionError`.
    pub name: String,
    /// Its message (`str(exc)`).
    pub value: String,
    /// The formatted traceback.
    pub traceback: String,
}

/// What one `run_code` produced.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Execution {
    pub stdout: String,
    pub stderr: String,
    /// `None` when the code ran to completion.
    pub error: Option<ExecutionError>,
}

/// A command for `exec`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Command {
    /// `argv[0]` names the program (for the WASI tier: a `.wasm` command module in the sandbox).
    pub argv: Vec<String>,
    /// Extra environment variables for this command (after the sandbox's own).
    pub env: Vec<(String, String)>,
    /// Bytes fed to standard input.
    pub stdin: Vec<u8>,
    /// Deadline for this command; the sandbox's call timeout when `None`.
    pub timeout: Option<Duration>,
    /// Working directory (absolute guest path); the tier's default when `None`. The WASI tier
    /// refuses it (`Error::Unsupported`).
    pub cwd: Option<String>,
}

impl Command {
    pub fn new<I, S>(argv: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Command {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }

    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.stdin = data.into();
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn cwd(mut self, dir: impl Into<String>) -> Self {
        self.cwd = Some(dir.into());
        self
    }
}

/// What `exec` produced. A non-zero exit code is a result, not an error.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: i32,
}

/// Stops a sandbox's running call from another thread (what [`Sandbox::interrupter`] gives).
pub trait Interrupt: Send + Sync + std::fmt::Debug {
    /// Interrupts the call running now, if any: it fails promptly with
    /// [`Error::Interrupted`](crate::Error::Interrupted). A call that starts later is not
    /// affected. What the sandbox is afterwards depends on the tier (the WASI tier poisons it,
    /// the KVM tier kills the guest command and stays running).
    fn interrupt(&self);
}

/// The contract shared by the WASI and KVM tiers.
///
/// Calls are synchronous and take `&mut self`: a checkpoint can only happen between calls, when
/// the guest is quiescent. Resuming a snapshot in another process is the tier runtime's job
/// (e.g. `WasiRuntime::resume_with`); `resume` here reloads this handle from any snapshot.
/// Host access (mounted directories, a module file) always comes from the caller, never from a
/// snapshot: see [`Grants`].
pub trait Sandbox: Send {
    /// The sandbox's identity (stable across checkpoint and resume).
    fn id(&self) -> &str;
    fn tier(&self) -> Tier;
    fn state(&self) -> State;

    /// Runs code in the sandbox's interpreter session; state persists between calls.
    fn run_code(&mut self, code: &str) -> Result<Execution>;
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
    /// the snapshot are [`Error::Grant`](crate::Error::Grant) and leave the handle as it was.
    fn resume_with(&mut self, id: &SnapshotId, grants: &Grants) -> Result<()>;
    /// Turns this sandbox into a parent of `n` independent children: a checkpoint, then `n`
    /// resumes of it, each with its own id, freshly seeded randomness and the parent's grants. Children share the
    /// snapshot's memory pages copy-on-write (nothing is copied per child) and diverge
    /// independently; their own checkpoints store only what they changed.
    fn fork(&mut self, n: usize) -> Result<Vec<Self>>
    where
        Self: Sized;
    /// Ends the sandbox for good, releasing everything but its snapshots.
    fn kill(&mut self) -> Result<()>;

    /// A handle that interrupts this sandbox's running call from another thread (while the
    /// call holds `&mut self`), valid across resumes of this handle; `None` for a sandbox that
    /// cannot be interrupted.
    fn interrupter(&self) -> Option<Arc<dyn Interrupt>> {
        None
    }
}
