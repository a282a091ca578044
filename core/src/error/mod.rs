//! Typed errors of the sandbox contract.
//!
//! Every fallible operation of dormant returns [`Error`]. Variants name what failed and carry the
//! context a caller needs (the snapshot id, the path, the limit); the underlying cause, when there
//! is one, is kept as `source` and not repeated in the message.

pub(crate) mod snapshot;

use std::path::PathBuf;
use std::time::Duration;

use crate::ids::{Operation, SnapshotId, State};

pub use snapshot::SnapshotError;

/// Result alias used throughout dormant.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why the host access a caller passed to a resume does not fit the snapshot (see
/// [`Grants`](crate::grants::Grants)).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GrantError {
    /// The snapshot has a mount point the caller granted no host directory for.
    #[error(
        "no host directory granted for its mount point {guest} ({}): a snapshot never grants \
         host access; pass the directory again (Grants::mount; Python: volumes=), or resume \
         without it (Grants::detach_missing; Python: detach_missing=True)",
        if *read_only { "read-only" } else { "read-write" }
    )]
    MountMissing { guest: String, read_only: bool },
    /// The caller granted a directory for a mount point the snapshot does not have.
    #[error(
        "it has no mount point {guest} (its mount points: {}); a resume re-grants the \
         snapshot's own mount points only (create a new sandbox for another)",
        if recorded.is_empty() { "none".to_owned() } else { recorded.join(", ") }
    )]
    MountNotInSnapshot {
        guest: String,
        recorded: Vec<String>,
    },
    /// The caller granted write access to a mount point the snapshot had read-only.
    #[error(
        "its mount point {guest} is read-only and a resume never makes it writable; grant it \
         read-only"
    )]
    MountWidened { guest: String },
    /// The snapshot runs a WebAssembly module and the caller named none.
    #[error(
        "it runs a WebAssembly module (blake3 {hash}); name the module file \
         (Grants::module): the path a snapshot records is never opened"
    )]
    ModuleMissing { hash: String },
    /// The module file the caller named is not the snapshot's module.
    #[error("module {path:?} (blake3 {found}) is not its module (blake3 {expected})")]
    ModuleMismatch {
        path: PathBuf,
        found: String,
        expected: String,
    },
}

/// The error type of dormant.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The sandbox spec is invalid.
    #[error("invalid sandbox spec: {0}")]
    InvalidSpec(String),
    /// The operation is not allowed in the sandbox's current lifecycle state.
    #[error("cannot {op} a sandbox that is {state}")]
    IllegalTransition { op: Operation, state: State },
    /// A previous call trapped; the live instance was discarded and the sandbox must be resumed
    /// from a snapshot (the last good one is named when there is one).
    #[error("the sandbox's last call failed ({reason}); resume it from a snapshot{}", last_good.as_ref().map(|s| format!(" (last good: {s})")).unwrap_or_default())]
    Poisoned {
        reason: String,
        last_good: Option<SnapshotId>,
    },
    /// An argument of a call is invalid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The operation is not supported by this sandbox's tier or workload.
    #[error("{op} is not supported by {what}")]
    Unsupported { op: &'static str, what: String },
    /// A path would leave the sandbox (`..` above the root, or a symlink pointing outside).
    #[error("path {path:?} escapes the sandbox")]
    PathEscape { path: String },
    /// A path is not valid inside a sandbox.
    #[error("invalid sandbox path {path:?}: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    /// A write was attempted on a read-only mount.
    #[error("path {path:?} is on a read-only mount")]
    ReadOnly { path: String },
    /// A file operation inside the sandbox failed.
    #[error("{op} {path:?} failed")]
    File {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The guest tried to grow its memory beyond the sandbox's cap.
    #[error("the guest exceeded its memory limit of {limit} bytes")]
    MemoryLimit {
        limit: u64,
        last_good: Option<SnapshotId>,
    },
    /// A call ran past its wall-time deadline and was interrupted.
    #[error("the call exceeded its deadline of {limit:?} and was interrupted")]
    Deadline {
        limit: Duration,
        last_good: Option<SnapshotId>,
    },
    /// The call was interrupted on request (`Sandbox::interrupter`, Ctrl-C in the Python
    /// module). On the WASI tier, like a trap, it leaves the sandbox poisoned; on the KVM tier
    /// the guest command is killed and the sandbox stays running.
    #[error("the call was interrupted")]
    Interrupted { last_good: Option<SnapshotId> },
    /// The guest wrote more output than the sandbox allows per call.
    #[error("the call wrote more than {limit} bytes to {stream}")]
    OutputLimit { stream: &'static str, limit: usize },
    /// The guest trapped (a crash inside the sandbox, not of the host).
    #[error("the guest trapped: {message}")]
    Trap {
        message: String,
        last_good: Option<SnapshotId>,
    },
    /// No snapshot with this id is in the store.
    #[error("snapshot {0} not found")]
    SnapshotNotFound(SnapshotId),
    /// No sandbox with this id is in the store: none of its snapshots is there, or it was
    /// killed ([`LocalStore::retire_sandbox`](crate::LocalStore::retire_sandbox)) and has no
    /// snapshot taken since.
    #[error("sandbox {0:?} not found in the store (never checkpointed, or killed)")]
    SandboxNotFound(String),
    /// Another host holds the sandbox's lease in the object store: one host at a time runs a
    /// sandbox (a resume keeps its id; `fork` gives independent copies). The lease ends when
    /// its holder puts the sandbox in standby, kills or drops it, or stops renewing it (a host
    /// that died): then it expires after its time to live.
    #[error(
        "sandbox {sandbox_id:?} is running on another host ({holder}); its lease expires in \
         {:.1} s unless renewed: resume it after that, or fork it for an independent copy",
        expires_in.as_secs_f64()
    )]
    SandboxBusy {
        sandbox_id: String,
        /// Who holds the lease: `host pid N`.
        holder: String,
        /// How long until the lease expires if its holder does not renew it.
        expires_in: Duration,
    },
    /// This host's lease on the sandbox was lost (it expired, and another host took the sandbox
    /// over): the sandbox's checkpoints are refused here, so that they never overwrite the new
    /// holder's. Its last durable snapshot is the new holder's starting point.
    #[error(
        "sandbox {sandbox_id:?} is no longer held by this host: its lease expired and {holder} \
         took it over; its checkpoints here are refused (fork it for an independent copy)"
    )]
    LeaseLost { sandbox_id: String, holder: String },
    /// A request to the object store failed (network, credentials, a missing bucket); the
    /// message names the request. Nothing local was lost: a failed upload leaves its snapshot
    /// in the local store, and a later durable checkpoint or `RemoteStore::sync` retries it.
    #[error("object store: {op} {key} failed")]
    Remote {
        op: &'static str,
        key: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// The snapshot exists but cannot be used.
    #[error("snapshot {id} is unusable")]
    Snapshot {
        id: SnapshotId,
        #[source]
        source: SnapshotError,
    },
    /// The host access passed to a resume does not fit the snapshot: a mount point without a
    /// grant, a grant for a mount point it lacks, a widened mount, a missing or wrong module.
    #[error("cannot resume snapshot {id} with the host access granted")]
    Grant {
        id: SnapshotId,
        #[source]
        source: GrantError,
    },
    /// The snapshot cannot be deleted while others are layered on it.
    #[error(
        "snapshot {id} has {children} incremental snapshot(s) layered on it; delete those first"
    )]
    SnapshotInUse { id: SnapshotId, children: usize },
    /// The snapshot store's filesystem is full (`ENOSPC`, or `EDQUOT`: a quota). Nothing was
    /// lost: a failed checkpoint leaves the sandbox running with its state intact, and the next
    /// checkpoint after space is freed stores everything.
    #[error(
        "the snapshot store is full: {op} {path:?} failed; free space on its filesystem and retry"
    )]
    StoreFull {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The snapshot store failed an I/O operation.
    #[error("snapshot store: {op} {path:?} failed")]
    Store {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A step of a template's build failed: a `run` step (a command that exited non-zero, code
    /// that raised), the `start` command, or the wait for it to be ready. The build recorded
    /// nothing and killed its sandbox. The details (boxed: they carry output) say which step
    /// and how.
    #[error("{0}")]
    TemplateStep(Box<TemplateStepError>),
    /// A runtime component the sandbox needs is not installed; the message says how to get it.
    #[error("{what} not found: {hint}")]
    RuntimeMissing { what: &'static str, hint: String },
    /// The sandbox runtime (engine, compiler, VMM, guest agent) failed; `source` is the cause,
    /// typed (a `wasmtime::Error`, the VMM's `MachineError`, the agent client's error, an I/O
    /// error, or a [`RuntimeContext`] naming what it concerns), so callers can downcast it.
    #[error("{op} failed")]
    Runtime {
        op: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

/// Most bytes of each output stream a [`Error::TemplateStep`] keeps (its end).
pub const TEMPLATE_OUTPUT_TAIL: usize = 4096;

/// Which step of a template's build failed, and how (the details of
/// [`Error::TemplateStep`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateStepError {
    /// The template's name.
    pub template: String,
    /// Which part of the recipe: `"run"`, `"start"` or `"ready"`.
    pub stage: &'static str,
    /// The failing `run` step's position in the recipe (0-based); `None` for the others.
    pub index: Option<usize>,
    /// The step as the recipe gives it (a shell command, code, the start command, or the
    /// readiness check).
    pub step: String,
    /// The exit code of a command that exited non-zero.
    pub exit_code: Option<i32>,
    /// What went wrong, as a phrase: `exited with code 3`, `raised ZeroDivisionError:
    /// division by zero`, `was not open after 300 s`.
    pub reason: String,
    /// The end of the step's output (standard output, then standard error), at most
    /// [`TEMPLATE_OUTPUT_TAIL`] bytes of each.
    pub output: String,
}

impl std::fmt::Display for TemplateStepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = match self.index {
            Some(i) => format!("{}[{i}]", self.stage),
            None => self.stage.to_owned(),
        };
        write!(
            f,
            "building template {:?} failed: {at} {:?} {}",
            self.template, self.step, self.reason
        )?;
        if self.output.trim().is_empty() {
            f.write_str(" (no output)")?;
        } else {
            write!(f, "; its output ends with:\n{}", self.output.trim_end())?;
        }
        f.write_str("\nNothing was recorded; fix the step and build again.")
    }
}

/// A cause together with what it concerns (a path, a request), as the `source` of an
/// [`Error::Runtime`].
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct RuntimeContext {
    pub what: String,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync + 'static>,
}

impl Error {
    /// A failure of the runtime doing `op`, keeping `cause` as the typed source (a plain
    /// message, `String` or `&str`, becomes one too).
    pub fn runtime(
        op: &'static str,
        cause: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        Error::Runtime {
            op,
            source: cause.into(),
        }
    }

    /// [`Error::runtime`] with what the cause concerns (a path, a request).
    pub fn runtime_at(
        op: &'static str,
        what: impl Into<String>,
        cause: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        Error::Runtime {
            op,
            source: Box::new(RuntimeContext {
                what: what.into(),
                source: cause.into(),
            }),
        }
    }

    /// Wraps a snapshot decoding error with the snapshot's id.
    pub fn snapshot(id: &SnapshotId, source: SnapshotError) -> Self {
        Error::Snapshot {
            id: id.clone(),
            source,
        }
    }

    /// Builds a [`Error::Store`] from an I/O error ([`Error::StoreFull`] when the filesystem
    /// is out of space or quota).
    pub fn store(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let full = matches!(
            source.raw_os_error(),
            Some(code) if code == rustix::io::Errno::NOSPC.raw_os_error()
                || code == rustix::io::Errno::DQUOT.raw_os_error()
        ) || source.kind() == std::io::ErrorKind::StorageFull;
        if full {
            Error::StoreFull {
                op,
                path: path.into(),
                source,
            }
        } else {
            Error::Store {
                op,
                path: path.into(),
                source,
            }
        }
    }
}
