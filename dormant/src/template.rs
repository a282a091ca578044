//! Templates: an environment prepared once (files written, setup steps run, a server started
//! and ready) and kept as a snapshot that every sandbox created from it resumes under an id of
//! its own.
//!
//! A [`Template`] is a recipe: the sandbox to create (tier, image, memory, environment,
//! volumes), the [`files`](Template::files) to write, the [`run`](Template::run) steps (shell
//! commands on the KVM tier, code cells on the WASI tier), a [`start`](Template::start)
//! command left running in the background (KVM tier) and when it is [`Ready`].
//! [`Template::build`] follows it and checkpoints the result; [`create_from_template`] gives
//! a new sandbox from that snapshot.
//!
//! # Cache
//!
//! A build is keyed by a hash of the whole recipe (tier, spec, the files' bytes, the steps, the
//! start command, the readiness check, the mount points and a listing of each mounted host
//! directory: relative names, sizes and modification times, not contents) and of what the
//! tier's runtime starts from ([`Runtime::fingerprint`]: the WASI tier's Python build and
//! engine, the KVM tier's guest image). A build whose key matches the recorded one, and whose
//! snapshot is still in the store, returns at once with that snapshot. Builds of one name are
//! serialised by a lock file, so concurrent builds (threads or processes) build once.
//!
//! # Store layout
//!
//! ```text
//! <store>/templates/<name>.json   the record: name, key, snapshot id, tier, creation time
//! <store>/templates/<name>.lock   held while a build of <name> runs
//! ```
//!
//! A record is written atomically, and only after every step succeeded: a failed build
//! records nothing, and its sandbox is killed. A rebuild with another key replaces the record
//! and **keeps** the old snapshot: sandboxes created from it layer their checkpoints on it, and
//! the store cannot tell whether one is still running in some process. Delete it with
//! [`LocalStore::delete`] (CLI: `dormant delete ID`) once none is.
//!
//! # Volumes
//!
//! Volumes mounted while building are mount points in the template's snapshot, and like every
//! snapshot it grants no host access (see [`Grants`]): a sandbox created from the template
//! gets a host directory only where its caller grants one again; its other mount points are
//! detached (an empty read-only directory).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dormant_core::error::TEMPLATE_OUTPUT_TAIL;
use dormant_core::fsutil::{FileLock, write_atomic};
use serde::{Deserialize, Serialize};

use crate::progress::Unit;
use crate::{
    Command, Error, Grants, LocalStore, NoProgress, Progress, ProgressEvent, Result, Runtime,
    Sandbox, SandboxSpec, SnapshotId, TemplateStepError, Tier,
};

/// When a template's [`start`](Template::start) command is ready for use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ready {
    /// Something in the guest accepts TCP connections on `127.0.0.1:port`.
    Port(u16),
    /// This shell command exits 0 (run again until it does).
    Command(String),
}

/// A recipe for an environment prepared once and resumed by every sandbox created from it
/// (see the [module docs](self)). Build it with [`Template::new`] and its builder methods, or
/// fill the fields; [`build`](Template::build) follows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// The template's name: 1–64 characters of `[A-Za-z0-9._-]`, not starting with a dot.
    pub name: String,
    /// The sandbox a build creates, and so the spec of the sandboxes made from it: its tier
    /// (`spec.tier`), image, memory, call deadline and environment, and the host directories
    /// mounted while building (in the template only as mount points, see the
    /// [module docs](self#volumes)). Default: [`SandboxSpec::default_for`] the tier.
    pub spec: SandboxSpec,
    /// Files written first, in order: `(absolute guest path, contents)`; parents are created.
    pub files: Vec<(String, Vec<u8>)>,
    /// Setup steps run in order after the files: shell commands on the KVM tier (bash where the
    /// image has it, else sh; a non-zero exit fails the build), code cells on the WASI tier
    /// (an exception fails the build; variables and imports stay in the template).
    pub run: Vec<String>,
    /// A shell command started in the background after the steps and left running in the
    /// template (KVM tier only). Without [`ready`](Template::ready), the template is
    /// checkpointed as soon as it is started.
    pub start: Option<String>,
    /// When the started command (or the guest, without one) is ready: the build waits for it,
    /// up to [`ready_timeout`](Template::ready_timeout), before checkpointing. KVM tier only.
    pub ready: Option<Ready>,
    /// Longest wait for [`ready`](Template::ready). Default: 300 s.
    pub ready_timeout: Duration,
    /// Deadline of each `run` step (and of each readiness command). Default: 600 s.
    pub step_timeout: Duration,
}

/// What [`Template::build`] gives: the template's record, and whether it was built now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    /// The record, as [`templates`] lists it.
    pub record: TemplateRecord,
    /// `true` when this call built it; `false` when the recorded build had the same key and
    /// was reused.
    pub built: bool,
}

/// A built template, as recorded in the store (`<store>/templates/<name>.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateRecord {
    /// The template's name.
    pub name: String,
    /// The hash of its recipe and runtime (64 hex digits).
    pub key: String,
    /// The snapshot sandboxes created from it resume.
    pub snapshot: SnapshotId,
    /// The tier of that snapshot.
    pub tier: Tier,
    /// When it was built, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
}

/// Bumped when what a build does for the same recipe changes (the key then changes too).
const RECIPE_VERSION: u32 = 1;
/// Most entries of a mounted host directory listed into the key; beyond them, a change is not
/// seen.
const MAX_LISTED: usize = 100_000;
/// Largest record file read (in the store, or in a bucket).
pub(crate) const MAX_RECORD: u64 = 64 << 10;

impl Template {
    /// Default of [`ready_timeout`](Template::ready_timeout).
    pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(300);
    /// Default of [`step_timeout`](Template::step_timeout).
    pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(600);

    /// An empty recipe named `name` for `tier`, with the documented defaults.
    pub fn new(name: impl Into<String>, tier: Tier) -> Template {
        Template {
            name: name.into(),
            spec: SandboxSpec::default_for(tier),
            files: Vec::new(),
            run: Vec::new(),
            start: None,
            ready: None,
            ready_timeout: Self::DEFAULT_READY_TIMEOUT,
            step_timeout: Self::DEFAULT_STEP_TIMEOUT,
        }
    }

    /// The tier its sandboxes run on (`spec.tier`).
    pub fn tier(&self) -> Tier {
        self.spec.tier
    }

    /// Sets the spec's [`image`](SandboxSpec::image).
    pub fn image(mut self, image: impl Into<String>) -> Self {
        self.spec = self.spec.image(image);
        self
    }

    /// Sets the spec's [`memory_limit`](SandboxSpec::memory_limit), in bytes.
    pub fn memory_limit(mut self, bytes: u64) -> Self {
        self.spec = self.spec.memory_limit(bytes);
        self
    }

    /// Sets the spec's [`call_timeout`](SandboxSpec::call_timeout).
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.spec = self.spec.call_timeout(timeout);
        self
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.spec = self.spec.env(key, value);
        self
    }

    /// Mounts host directory `host` at `guest` while building (see the
    /// [module docs](self#volumes)).
    pub fn mount(
        mut self,
        host: impl Into<PathBuf>,
        guest: impl Into<String>,
        read_only: bool,
    ) -> Self {
        self.spec = self.spec.mount(host, guest, read_only);
        self
    }

    /// Adds a file to write at guest path `path`.
    pub fn file(mut self, path: impl Into<String>, data: impl Into<Vec<u8>>) -> Self {
        self.files.push((path.into(), data.into()));
        self
    }

    /// Adds a setup step (see [`run`](Template::run)).
    pub fn run(mut self, step: impl Into<String>) -> Self {
        self.run.push(step.into());
        self
    }

    /// Sets the background command (see [`start`](Template::start)).
    pub fn start(mut self, command: impl Into<String>) -> Self {
        self.start = Some(command.into());
        self
    }

    /// Sets the readiness check (see [`ready`](Template::ready)).
    pub fn ready(mut self, ready: Ready) -> Self {
        self.ready = Some(ready);
        self
    }

    /// Sets [`ready_timeout`](Template::ready_timeout).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// Sets [`step_timeout`](Template::step_timeout).
    pub fn step_timeout(mut self, timeout: Duration) -> Self {
        self.step_timeout = timeout;
        self
    }

    /// Checks what can be checked without a sandbox: the name, the spec, the files' paths, and
    /// that a WASI template asks for nothing that tier lacks.
    fn check(&self, spec: &SandboxSpec) -> Result<()> {
        check_name(&self.name)?;
        spec.validate()?;
        for (path, _) in &self.files {
            if !path.starts_with('/') {
                return Err(Error::InvalidArgument(format!(
                    "template {:?}: file path {path:?} is not absolute (guest paths start with \
                     '/')",
                    self.name
                )));
            }
        }
        if self.spec.tier == Tier::Wasi && (self.start.is_some() || self.ready.is_some()) {
            return Err(Error::Unsupported {
                op: "a template's start command and readiness check",
                what: "the WASI tier (its code runs to completion; build a KVM template, with \
                       an image, for a background server)"
                    .into(),
            });
        }
        if self.ready_timeout.is_zero() || self.step_timeout.is_zero() {
            return Err(Error::InvalidArgument(format!(
                "template {:?}: ready_timeout and step_timeout must be positive",
                self.name
            )));
        }
        Ok(())
    }

    /// The cache key: a hash of the recipe and of what `runtime` starts from (see the
    /// [module docs](self#cache)), 64 hex digits.
    pub fn key(&self, runtime: &dyn Runtime) -> Result<String> {
        self.check(&self.spec)?;
        self.key_of(runtime, &self.spec)
    }

    fn key_of(&self, runtime: &dyn Runtime, spec: &SandboxSpec) -> Result<String> {
        #[derive(Serialize)]
        struct Recipe<'a> {
            version: u32,
            runtime: String,
            /// Mount points only: a host directory is never serialized.
            spec: &'a SandboxSpec,
            files: Vec<(&'a str, String)>,
            run: &'a [String],
            start: &'a Option<String>,
            ready: &'a Option<Ready>,
            volumes: Vec<String>,
        }
        let mut volumes = Vec::with_capacity(spec.mounts.len());
        for m in &spec.mounts {
            volumes.push(listing_hash(&m.host)?);
        }
        let recipe = Recipe {
            version: RECIPE_VERSION,
            runtime: runtime.fingerprint(spec)?,
            spec,
            files: self
                .files
                .iter()
                .map(|(p, d)| (p.as_str(), blake3::hash(d).to_hex().to_string()))
                .collect(),
            run: &self.run,
            start: &self.start,
            ready: &self.ready,
            volumes,
        };
        let bytes = serde_json::to_vec(&recipe)
            .map_err(|e| Error::runtime("serialize a template's recipe", e))?;
        Ok(blake3::hash(&bytes).to_hex().to_string())
    }

    /// Builds the template into `store`, or reuses the recorded build when its key is the same
    /// and its snapshot is still there (then it returns at once, `built: false`).
    ///
    /// A build creates a sandbox from [`spec`](Template::spec) with the tier's shared
    /// [`runtime`](crate::runtime), writes the files, runs the steps, starts the background
    /// command and waits until it is ready, then checkpoints and records the snapshot. While it
    /// runs it holds the template's lock: a concurrent build of the same name waits, then
    /// reuses this one.
    ///
    /// Errors: a bad name ([`Error::InvalidArgument`]) or spec ([`Error::InvalidSpec`]); a
    /// start command or readiness check on the WASI tier ([`Error::Unsupported`]); a step that
    /// failed ([`Error::TemplateStep`], with the step and the end of its output); anything the
    /// sandbox reports. On an error nothing is recorded and the build's sandbox is killed.
    pub fn build(&self, store: Arc<LocalStore>) -> Result<Built> {
        self.build_with_progress(store, &NoProgress)
    }

    /// [`build`](Template::build), reporting progress in steps: creating the sandbox, each
    /// file, each `run` step, the start command, the readiness wait and the checkpoint, each
    /// event naming the step about to run (`done` of them done so far); a final event when the
    /// template is built or found up to date. Nothing after an error.
    pub fn build_with_progress(
        &self,
        store: Arc<LocalStore>,
        progress: &dyn Progress,
    ) -> Result<Built> {
        let spec = self.spec.clone();
        self.check(&spec)?;
        let rt = crate::runtime(spec.tier)?;
        let key = self.key_of(&*rt, &spec)?;
        let dir = templates_dir(&store);
        std::fs::create_dir_all(&dir).map_err(|e| Error::store("create", &dir, e))?;
        let lock_path = dir.join(format!("{}.lock", self.name));
        let _lock =
            FileLock::acquire(&lock_path, true).map_err(|e| Error::store("lock", &lock_path, e))?;
        let total = self.steps();
        if let Some(rec) = read_record(&store, &self.name)?
            && rec.key == key
            && store.manifest(&rec.snapshot).is_ok()
        {
            progress.report(&ProgressEvent::finished("up to date", total, Unit::Steps));
            return Ok(Built {
                record: rec,
                built: false,
            });
        }
        let mut report = Steps {
            progress,
            done: 0,
            total,
        };
        report.next(format!("create the {} sandbox", self.spec.tier));
        let mut sb = rt.create(store.clone(), spec)?;
        let snapshot = self.prepare(&mut sb, &mut report).and_then(|()| {
            report.next("checkpoint".into());
            sb.checkpoint()
        });
        // The build's sandbox has served its purpose (its snapshot stays in the store) and is
        // no sandbox of the store's listing.
        if let Err(e) = sb.kill().and_then(|()| store.retire_sandbox(sb.id())) {
            tracing::debug!(template = %self.name, error = %e, "killing the build's sandbox failed");
        }
        let record = TemplateRecord {
            name: self.name.clone(),
            key,
            snapshot: snapshot?,
            tier: self.spec.tier,
            created_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        };
        let path = record_path(&store, &self.name);
        let json = record_bytes(&record)?;
        write_atomic(&path, &json).map_err(|e| Error::store("record template", &path, e))?;
        progress.report(&ProgressEvent::finished("built", total, Unit::Steps));
        Ok(Built {
            record,
            built: true,
        })
    }

    /// The steps a build reports: creating the sandbox, the files, the `run` steps, the start
    /// command and the readiness wait (where there are), the checkpoint.
    fn steps(&self) -> u64 {
        (2 + self.files.len()
            + self.run.len()
            + usize::from(self.start.is_some())
            + usize::from(self.ready.is_some())) as u64
    }

    /// Files, steps, start command, readiness: everything before the checkpoint.
    fn prepare(&self, sb: &mut dyn Sandbox, report: &mut Steps<'_>) -> Result<()> {
        for (path, data) in &self.files {
            report.next(format!("write {path}"));
            sb.write_file(path, data)?;
        }
        for (i, step) in self.run.iter().enumerate() {
            report.next(format!("run step {}: {}", i + 1, first_line(step)));
            self.run_step(sb, i, step)?;
        }
        let pid = match &self.start {
            Some(cmd) => {
                report.next(format!("start: {}", first_line(cmd)));
                Some(sb.processes()?.spawn(&Command::shell(cmd.as_str()))?)
            }
            None => None,
        };
        match &self.ready {
            Some(ready) => {
                report.next("wait until ready".into());
                self.wait_ready(sb, ready, pid)
            }
            None => Ok(()),
        }
    }

    /// A step failure of this template.
    fn failure(
        &self,
        stage: &'static str,
        index: Option<usize>,
        step: &str,
        exit_code: Option<i32>,
        reason: String,
        output: String,
    ) -> Error {
        Error::TemplateStep(Box::new(TemplateStepError {
            template: self.name.clone(),
            stage,
            index,
            step: step.to_owned(),
            exit_code,
            reason,
            output,
        }))
    }

    /// Runs `run` step `i`: a shell command (KVM) or a code cell (WASI).
    fn run_step(&self, sb: &mut dyn Sandbox, i: usize, step: &str) -> Result<()> {
        let deadline = |e: Error| match e {
            Error::Deadline { limit, .. } => self.failure(
                "run",
                Some(i),
                step,
                None,
                format!("ran past its deadline of {} s", limit.as_secs()),
                String::new(),
            ),
            other => other,
        };
        match self.spec.tier {
            Tier::Kvm => {
                let mut cmd = Command::shell(step);
                cmd.timeout = Some(self.step_timeout);
                let out = sb.exec(&cmd).map_err(deadline)?;
                if out.exit_code != 0 {
                    return Err(self.failure(
                        "run",
                        Some(i),
                        step,
                        Some(out.exit_code),
                        format!("exited with code {}", out.exit_code),
                        output_tail(&[&out.stdout, &out.stderr]),
                    ));
                }
            }
            Tier::Wasi => {
                let ex = sb
                    .run_code_with_timeout(step, Some(self.step_timeout))
                    .map_err(deadline)?;
                if let Some(err) = ex.error {
                    return Err(self.failure(
                        "run",
                        Some(i),
                        step,
                        None,
                        format!("raised {}: {}", err.name, err.value),
                        output_tail(&[
                            ex.stdout.as_bytes(),
                            ex.stderr.as_bytes(),
                            err.traceback.as_bytes(),
                        ]),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Polls `ready` until it holds, the started process `pid` fails, or the ready timeout
    /// passes.
    fn wait_ready(&self, sb: &mut dyn Sandbox, ready: &Ready, pid: Option<u32>) -> Result<()> {
        let end = Instant::now() + self.ready_timeout;
        let mut pause = Duration::from_millis(100);
        let mut last_code = None;
        let start = self.start.as_deref().unwrap_or_default();
        // The started process's output so far, for an error.
        let output = |sb: &mut dyn Sandbox| -> String {
            match pid.map(|p| sb.processes().and_then(|ps| ps.output(p))) {
                Some(Ok((out, err, _))) => output_tail(&[&out, &err]),
                _ => String::new(),
            }
        };
        loop {
            if let Some(p) = pid
                && let Some(code) = sb.processes()?.wait(p, Some(Duration::ZERO))?
                && code != 0
            {
                // Exiting 0 is allowed: a server that forks into the background does.
                return Err(self.failure(
                    "start",
                    None,
                    start,
                    Some(code),
                    format!("exited with code {code} before it was ready"),
                    output(sb),
                ));
            }
            let ok = match ready {
                Ready::Port(port) => sb.processes()?.listening(*port)?,
                Ready::Command(check) => {
                    let mut cmd = Command::shell(check.as_str());
                    let left = end.saturating_duration_since(Instant::now());
                    cmd.timeout = Some(left.clamp(Duration::from_secs(1), self.step_timeout));
                    match sb.exec(&cmd) {
                        Ok(out) => {
                            last_code = Some(out.exit_code);
                            out.exit_code == 0
                        }
                        Err(Error::Deadline { .. }) => false,
                        Err(e) => return Err(e),
                    }
                }
            };
            if ok {
                return Ok(());
            }
            if Instant::now() >= end {
                let secs = self.ready_timeout.as_secs();
                let (step, reason) = match ready {
                    Ready::Port(port) => (
                        format!("port {port}"),
                        format!("was not open after {secs} s"),
                    ),
                    Ready::Command(check) => (
                        check.clone(),
                        match last_code {
                            Some(c) => format!("did not exit 0 within {secs} s (last: {c})"),
                            None => format!("did not finish within {secs} s"),
                        },
                    ),
                };
                return Err(self.failure("ready", None, &step, None, reason, output(sb)));
            }
            std::thread::sleep(pause.min(end.saturating_duration_since(Instant::now())));
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }
}

/// Refuses a template name that is not 1–64 characters of `[A-Za-z0-9._-]` not starting with
/// a dot.
fn check_name(name: &str) -> Result<()> {
    if dormant_core::sandbox_dirs::valid_name(name) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{name:?} is not a valid template name: use 1-64 characters of letters, digits, \
             '.', '_' and '-', not starting with '.'"
        )))
    }
}

fn templates_dir(store: &LocalStore) -> PathBuf {
    store.root().join("templates")
}

fn record_path(store: &LocalStore, name: &str) -> PathBuf {
    templates_dir(store).join(format!("{name}.json"))
}

/// The record of template `name`, `None` when there is none (or it cannot be read: a build
/// then replaces it).
fn read_record(store: &LocalStore, name: &str) -> Result<Option<TemplateRecord>> {
    let path = record_path(store, name);
    let bytes = match std::fs::File::open(&path) {
        Ok(f) => {
            use std::io::Read;
            let mut buf = Vec::new();
            f.take(MAX_RECORD)
                .read_to_end(&mut buf)
                .map_err(|e| Error::store("read template record", &path, e))?;
            buf
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::store("read template record", &path, e)),
    };
    match serde_json::from_slice::<TemplateRecord>(&bytes) {
        Ok(rec) if rec.name == name => Ok(Some(rec)),
        Ok(_) | Err(_) => {
            tracing::warn!(path = %path.display(), "unreadable template record ignored");
            Ok(None)
        }
    }
}

/// The record of template `name` in `store`. Errors: no such template
/// ([`Error::InvalidArgument`], saying how to build one) or a bad name.
pub fn template(store: &LocalStore, name: &str) -> Result<TemplateRecord> {
    check_name(name)?;
    read_record(store, name)?.ok_or_else(|| {
        Error::InvalidArgument(format!(
            "no template named {name:?} in the store at {}; build it first (Template::build; \
             Python: dormant.Template(...).build(); CLI: dormant template build FILE)",
            store.root().display()
        ))
    })
}

/// The record of template `name` as JSON bytes (what `<store>/templates/<name>.json` holds),
/// for publishing it elsewhere (an object store: [`Store`](crate::Store)).
pub fn record_bytes(rec: &TemplateRecord) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(rec).map_err(|e| Error::runtime("serialize a template record", e))
}

/// Records template `rec` in `store` from a record read elsewhere (an object store), checked:
/// at most 64 KiB, valid JSON naming `name`, a valid name. Its snapshot must already be in
/// `store`. Returns the record.
pub fn import_record(store: &LocalStore, name: &str, bytes: &[u8]) -> Result<TemplateRecord> {
    check_name(name)?;
    let bad = |why: String| Error::InvalidArgument(format!("template record of {name:?}: {why}"));
    if bytes.len() as u64 > MAX_RECORD {
        return Err(bad(format!("{} bytes", bytes.len())));
    }
    let rec: TemplateRecord = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    if rec.name != name {
        return Err(bad(format!("it names {:?}", rec.name)));
    }
    if !store.contains(&rec.snapshot) {
        return Err(Error::SnapshotNotFound(rec.snapshot.clone()));
    }
    let dir = templates_dir(store);
    std::fs::create_dir_all(&dir).map_err(|e| Error::store("create", &dir, e))?;
    let path = record_path(store, name);
    write_atomic(&path, &record_bytes(&rec)?)
        .map_err(|e| Error::store("record template", &path, e))?;
    Ok(rec)
}

/// The templates recorded in `store`, by name. Unreadable records are left out (and logged).
pub fn templates(store: &LocalStore) -> Result<Vec<TemplateRecord>> {
    let dir = templates_dir(store);
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::store("list templates", &dir, e)),
    };
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| Error::store("list templates", &dir, e))?;
        let file = ent.file_name().to_string_lossy().into_owned();
        if let Some(name) = file.strip_suffix(".json")
            && dormant_core::sandbox_dirs::valid_name(name)
            && let Some(rec) = read_record(store, name)?
        {
            out.push(rec);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// A new sandbox from template `name`: its snapshot resumed under a new id (as
/// [`Runtime::fork`] does), independent of every other sandbox made from it. `grants` gives
/// host directories for the template's mount points; those it leaves out are detached (see
/// the [module docs](self#volumes)). Errors: no such template ([`Error::InvalidArgument`]), its
/// snapshot deleted ([`Error::SnapshotNotFound`]: build it again), grants that do not fit
/// ([`Error::Grant`]).
pub fn create_from_template(
    store: Arc<LocalStore>,
    name: &str,
    grants: &Grants,
) -> Result<Box<dyn Sandbox>> {
    let rec = template(&store, name)?;
    let grants = grants.clone().detach_missing(true);
    let mut children = crate::runtime(rec.tier)?.fork(store, &rec.snapshot, &grants, 1)?;
    children
        .pop()
        .ok_or_else(|| Error::runtime("create a sandbox from a template", "no sandbox was made"))
}

/// A hash of a host directory's listing: every entry's relative name, type, size and
/// modification time (not contents), symlinks not followed, at most [`MAX_LISTED`] entries.
fn listing_hash(root: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let mut h = blake3::Hasher::new();
    let mut stack = vec![PathBuf::new()];
    let mut listed = 0usize;
    let err = |p: &Path, e| Error::File {
        op: "list",
        path: p.display().to_string(),
        source: e,
    };
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let mut entries = std::fs::read_dir(&dir)
            .map_err(|e| err(&dir, e))?
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| err(&dir, e))?;
        entries.sort_by_key(|e| e.file_name());
        for ent in entries {
            if listed == MAX_LISTED {
                h.update(b"\0truncated");
                return Ok(h.finalize().to_hex().to_string());
            }
            listed += 1;
            let md = ent.metadata().map_err(|e| err(&ent.path(), e))?;
            let name = rel.join(ent.file_name());
            h.update(name.as_os_str().as_encoded_bytes());
            h.update(&[0, u8::from(md.is_dir()), u8::from(md.is_symlink())]);
            h.update(&md.size().to_le_bytes());
            h.update(&md.mtime().to_le_bytes());
            h.update(&md.mtime_nsec().to_le_bytes());
            if md.is_dir() {
                stack.push(name);
            }
        }
    }
    Ok(h.finalize().to_hex().to_string())
}

/// The end of each non-empty stream (at most [`TEMPLATE_OUTPUT_TAIL`] bytes of each), as text,
/// one after the other.
fn output_tail(streams: &[&[u8]]) -> String {
    let mut out = String::new();
    for s in streams.iter().filter(|s| !s.trim_ascii().is_empty()) {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        if s.len() > TEMPLATE_OUTPUT_TAIL {
            out.push_str("...");
            out.push_str(&String::from_utf8_lossy(
                &s[s.len() - TEMPLATE_OUTPUT_TAIL..],
            ));
        } else {
            out.push_str(&String::from_utf8_lossy(s));
        }
    }
    out
}

/// A build's progress: one step at a time.
struct Steps<'a> {
    progress: &'a dyn Progress,
    done: u64,
    total: u64,
}

impl Steps<'_> {
    /// Reports that step `stage` starts (the steps before it are done).
    fn next(&mut self, stage: String) {
        self.progress.report(&ProgressEvent::new(
            stage,
            self.done,
            Some(self.total),
            Unit::Steps,
        ));
        self.done += 1;
    }
}

/// A step's first line, at most 60 characters, for a progress line.
fn first_line(step: &str) -> String {
    let line = step.lines().next().unwrap_or_default();
    match line.char_indices().nth(60) {
        Some((at, _)) => format!("{}…", &line[..at]),
        None => line.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_tail_keeps_the_end_of_each_stream() {
        assert_eq!(output_tail(&[b"out\n", b"", b"err"]), "out\nerr");
        let long = vec![b'x'; TEMPLATE_OUTPUT_TAIL + 10];
        let t = output_tail(&[&long, b"end"]);
        assert!(t.starts_with("...x"), "{t}");
        assert_eq!(t.len(), 3 + TEMPLATE_OUTPUT_TAIL + 1 + 3);
    }

    #[test]
    fn names_are_checked() {
        for ok in ["a", "shop-api", "v1.2_x", &"n".repeat(64)] {
            check_name(ok).unwrap();
        }
        for bad in ["", ".hidden", "a/b", "a b", "ü", &"n".repeat(65), ".."] {
            assert!(
                matches!(check_name(bad), Err(Error::InvalidArgument(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_listing_changes_with_names_and_sizes() {
        let tmp = tempfile::tempdir().unwrap();
        let a = listing_hash(tmp.path()).unwrap();
        std::fs::create_dir(tmp.path().join("sub")).unwrap();
        std::fs::write(tmp.path().join("sub/w.whl"), b"1").unwrap();
        let b = listing_hash(tmp.path()).unwrap();
        assert_ne!(a, b);
        assert_eq!(b, listing_hash(tmp.path()).unwrap());
        std::fs::write(tmp.path().join("sub/w.whl"), b"12").unwrap();
        assert_ne!(b, listing_hash(tmp.path()).unwrap());
    }
}
