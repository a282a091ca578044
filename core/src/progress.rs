//! Progress of long operations (image and template builds, a base's first boot, compaction):
//! the operation calls a [`Progress`] with a [`ProgressEvent`] as it moves, so that a caller
//! (the CLI's progress bar, a Python callback) can show where it is.
//!
//! Events of one operation come in order, from the thread that runs it. For each stage `done`
//! never decreases; a stage's last event has `done == total` when the total is known. An
//! operation that finishes sends a final event ([`ProgressEvent::finished`]) last.

/// What a stage counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Steps of a recipe (a template's files, run steps, start, readiness, checkpoint) or
    /// stages of a boot.
    Steps,
    /// Bytes.
    Bytes,
    /// 64 KiB chunks of a compaction.
    Chunks,
}

impl Unit {
    /// The unit's name, as the Python API gives it: `"steps"`, `"bytes"`, `"chunks"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Steps => "steps",
            Unit::Bytes => "bytes",
            Unit::Chunks => "chunks",
        }
    }
}

/// Where a long operation is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgressEvent {
    /// What it is doing now, in a few words (`"run step 2: pip install …"`, `"compact
    /// memory"`, `"boot: kernel"`).
    pub stage: String,
    /// How much of the whole operation is done, in `unit`s.
    pub done: u64,
    /// How much there is in all, when known.
    pub total: Option<u64>,
    pub unit: Unit,
    /// Whether this is the operation's last event (it has finished).
    pub finished: bool,
}

impl ProgressEvent {
    /// An event of a running operation.
    pub fn new(stage: impl Into<String>, done: u64, total: Option<u64>, unit: Unit) -> Self {
        ProgressEvent {
            stage: stage.into(),
            done,
            total,
            unit,
            finished: false,
        }
    }

    /// The last event of an operation that finished: `done == total`.
    pub fn finished(stage: impl Into<String>, total: u64, unit: Unit) -> Self {
        ProgressEvent {
            stage: stage.into(),
            done: total,
            total: Some(total),
            unit,
            finished: true,
        }
    }
}

/// Receives a long operation's [`ProgressEvent`]s. Any `Fn(&ProgressEvent) + Sync` is one;
/// [`NoProgress`] ignores them. Called on the operation's thread: keep it quick.
pub trait Progress: Sync {
    fn report(&self, event: &ProgressEvent);
}

impl<F: Fn(&ProgressEvent) + Sync> Progress for F {
    fn report(&self, event: &ProgressEvent) {
        self(event)
    }
}

/// A [`Progress`] that ignores every event (what the calls without one use).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn report(&self, _: &ProgressEvent) {}
}
