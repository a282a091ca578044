//! `dormant._native`: the Rust half of dormant's Python module.
//!
//! A thin layer over the `dormant` crate: every sandbox is a [`Managed`] `Box<dyn Sandbox>`
//! (auto-standby included) made by its tier's [`Runtime`](dormant::Runtime), so nothing here
//! names a tier: calls a tier lacks answer `Error::Unsupported` from the tier itself. Every
//! call releases the GIL, and every error becomes an exception of the hierarchy in
//! `dormant/_errors.py` (built there by `_from_native`, from a kind this module names). The
//! public Python API is the pure-Python package around it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, mpsc};
use std::time::Duration;

use dormant::{
    Command, Error, Grants, Interrupt, LocalStore, Managed, NetworkPolicy, Ready, Sandbox,
    SandboxSpec, SnapshotId, Template, TerminalLink, TerminalSize, Tier,
};
use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

/// Open stores, one per root, shared by every sandbox of this process.
static STORES: LazyLock<Mutex<HashMap<PathBuf, Arc<LocalStore>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));
/// How often a waiting call looks for a pending signal (Ctrl-C).
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// Remote stores opened by this process: each `dormant.Store(...)` under its own key,
/// `<url>#<n>` (so that two stores of one URL with other caches or endpoints stay apart), and
/// stores named by a plain `s3://` URL under that URL.
static REMOTES: LazyLock<Mutex<HashMap<String, dormant::RemoteStore>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// The store `root` names: a key of `open_remote`, a plain `s3://` URL (opened once with the
/// default settings and cache), or a local directory.
fn dstore(root: PathBuf) -> Result<dormant::Store, Error> {
    let text = root.to_string_lossy();
    if text.starts_with("s3://") {
        let key = text.into_owned();
        if let Some(r) = REMOTES.lock().get(&key) {
            return Ok(dormant::Store::Remote(r.clone()));
        }
        if key.contains('#') {
            return Err(Error::InvalidArgument(format!(
                "store {key:?} is not open in this process (pass its dormant.Store)"
            )));
        }
        let cache = store(LocalStore::default_root())?;
        let r = dormant::RemoteStore::open(&key, cache, dormant::RemoteOptions::default())?;
        REMOTES.lock().insert(key, r.clone());
        return Ok(dormant::Store::Remote(r));
    }
    Ok(dormant::Store::Local(store(root)?))
}

/// The local store of `root`: the directory, or a remote store's cache.
fn store(root: PathBuf) -> Result<Arc<LocalStore>, Error> {
    if root.to_string_lossy().starts_with("s3://") {
        return Ok(dstore(root)?.local().clone());
    }
    let mut stores = STORES.lock();
    if let Some(s) = stores.get(&root) {
        return Ok(s.clone());
    }
    let s = Arc::new(LocalStore::open(&root)?);
    stores.insert(root, s.clone());
    Ok(s)
}

/// The exception kind `_errors._from_native` turns into a class, with errno and path for
/// I/O failures.
fn kind(e: &Error) -> (&'static str, Option<i32>, Option<String>) {
    let io = |source: &std::io::Error| {
        use std::io::ErrorKind as K;
        source.raw_os_error().or(match source.kind() {
            K::NotFound => Some(libc_errno::ENOENT),
            K::PermissionDenied => Some(libc_errno::EACCES),
            K::AlreadyExists => Some(libc_errno::EEXIST),
            K::IsADirectory => Some(libc_errno::EISDIR),
            K::NotADirectory => Some(libc_errno::ENOTDIR),
            K::DirectoryNotEmpty => Some(libc_errno::ENOTEMPTY),
            K::InvalidInput => Some(libc_errno::EINVAL),
            _ => None,
        })
    };
    match e {
        Error::SnapshotNotFound(_) => ("snapshot_not_found", None, None),
        Error::SandboxNotFound(_) => ("sandbox_not_found", None, None),
        Error::SandboxBusy { .. } => ("sandbox_busy", None, None),
        Error::LeaseLost { .. } => ("lease_lost", None, None),
        Error::Remote { .. } => ("remote", None, None),
        Error::Snapshot { .. } => ("snapshot_corrupt", None, None),
        Error::SnapshotInUse { .. } | Error::IllegalTransition { .. } | Error::Poisoned { .. } => {
            ("invalid_state", None, None)
        }
        Error::MemoryLimit { .. } | Error::OutputLimit { .. } => ("limit_exceeded", None, None),
        Error::TemplateStep(_) => ("template_step", None, None),
        Error::Deadline { .. } => ("timeout", None, None),
        Error::Interrupted { .. } => ("interrupted", None, None),
        Error::Unsupported { .. } => ("unsupported", None, None),
        Error::InvalidSpec(_)
        | Error::InvalidArgument(_)
        | Error::InvalidPath { .. }
        | Error::Grant { .. } => ("invalid_argument", None, None),
        Error::PathEscape { path } => ("path_escape", None, Some(path.clone())),
        Error::ReadOnly { path } => ("read_only", None, Some(path.clone())),
        Error::File { path, source, .. } => ("io", io(source), Some(path.clone())),
        Error::Store { path, source, .. } => ("io", io(source), Some(path.display().to_string())),
        Error::StoreFull { path, .. } => ("store_full", None, Some(path.display().to_string())),
        Error::RuntimeMissing { what, .. } if *what == "/dev/kvm" => {
            ("kvm_unavailable", None, None)
        }
        Error::RuntimeMissing { .. } => ("runtime_missing", None, None),
        _ => ("error", None, None),
    }
}

/// Errno values (Linux) for I/O errors that carry no OS code.
mod libc_errno {
    pub const ENOENT: i32 = 2;
    pub const EACCES: i32 = 13;
    pub const EEXIST: i32 = 17;
    pub const ENOTDIR: i32 = 20;
    pub const EISDIR: i32 = 21;
    pub const EINVAL: i32 = 22;
    pub const ENOTEMPTY: i32 = 39;
}

/// The error's message with its sources ("read \"/x\" failed: No such file or directory").
fn message(e: &Error) -> String {
    let mut m = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        let mut s_text = s.to_string();
        // io::Error's "(os error N)": the exception's errno says it already.
        if let Some(i) = s_text.find(" (os error ") {
            s_text.truncate(i);
        }
        if !m.contains(&s_text) {
            m.push_str(": ");
            m.push_str(&s_text);
        }
        src = s.source();
    }
    m
}

/// The Python exception for `e`.
fn to_py(py: Python<'_>, e: Error) -> PyErr {
    let (kind, errno, path) = kind(&e);
    exception(py, kind, message(&e), errno, path)
}

/// The exception `_errors._from_native` builds for `kind`.
fn exception(
    py: Python<'_>,
    kind: &str,
    message: String,
    errno: Option<i32>,
    path: Option<String>,
) -> PyErr {
    let built = py
        .import("dormant._errors")
        .and_then(|m| m.getattr("_from_native"))
        .and_then(|f| f.call1((kind, message, errno, path)));
    match built {
        Ok(exc) => PyErr::from_value(exc),
        Err(err) => err,
    }
}

fn seconds(what: &str, s: Option<f64>) -> PyResult<Option<Duration>> {
    s.map(|s| {
        Duration::try_from_secs_f64(s).map_err(|_| {
            invalid(&format!(
                "{what} must be a non-negative number of seconds, not {s}"
            ))
        })
    })
    .transpose()
}

fn invalid(msg: &str) -> PyErr {
    Python::attach(|py| to_py(py, Error::InvalidArgument(msg.to_string())))
}

/// A snapshot id; a string that cannot be one names no snapshot.
fn snapshot_id(py: Python<'_>, id: &str) -> PyResult<SnapshotId> {
    id.parse::<SnapshotId>().map_err(|_| {
        exception(
            py,
            "snapshot_not_found",
            format!("no snapshot {id:?}: that is not a snapshot id (they look like s-…)"),
            None,
            None,
        )
    })
}

/// One rich result of `run_code`: `(text, html, markdown, png, svg, json, is_main_result)`,
/// `json` as JSON text.
type ResultTuple<'py> = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<Bound<'py, PyBytes>>,
    Option<String>,
    Option<String>,
    bool,
);

/// `(stdout, stderr, error, results)` of `run_code`, `error` being `(name, value, traceback)`.
type ExecutionTuple<'py> = (
    String,
    String,
    Option<(String, String, String)>,
    Vec<ResultTuple<'py>>,
);

/// A managed sandbox of any tier.
type Inner = Managed<Box<dyn Sandbox>>;

/// Runs `f` off the calling thread with the GIL released, looking for Ctrl-C meanwhile. On a
/// signal, the running call is interrupted when the tier can (`interrupter`) and waited for
/// (an interrupted call returns within moments and releases the sandbox); otherwise it is
/// left to finish in the background. The signal's exception is raised.
fn interruptible<T: Send + 'static>(
    py: Python<'_>,
    interrupter: Option<&Arc<dyn Interrupt>>,
    f: impl FnOnce() -> T + Send + 'static,
) -> PyResult<T> {
    let (tx, mut rx) = mpsc::channel();
    // A receiver cannot be shared with the detached closure, only moved in and back out.
    let recv = |rx: &mut mpsc::Receiver<T>| {
        let owned = std::mem::replace(rx, mpsc::channel().1);
        let (r, owned) = py.detach(move || (owned.recv_timeout(SIGNAL_POLL), owned));
        *rx = owned;
        r
    };
    std::thread::Builder::new()
        .name("dormant-call".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(PyErr::from)?;
    loop {
        match recv(&mut rx) {
            Ok(v) => return Ok(v),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(pyo3::exceptions::PyRuntimeError::new_err(
                    "dormant: the call's thread ended without an answer",
                ));
            }
        }
        if let Err(signal) = py.check_signals() {
            if let Some(i) = interrupter {
                // Repeat until the call has stopped: the first request may precede it.
                loop {
                    i.interrupt();
                    match recv(&mut rx) {
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        _ => break,
                    }
                }
            }
            return Err(signal);
        }
    }
}

/// A sandbox, as the Python package sees it.
#[pyclass(frozen, module = "dormant._native")]
struct NativeSandbox {
    inner: Inner,
    /// The store it was created in or resumed from: `kill` records the kill there.
    store: Arc<LocalStore>,
    /// The remote store it belongs to, if any: durable checkpoints wait for its uploads.
    remote: Option<(dormant::RemoteStore, Option<Arc<dormant::store::Lease>>)>,
    /// Stops the running call (Ctrl-C), reachable while the call holds the sandbox.
    interrupter: Option<Arc<dyn Interrupt>>,
}

impl NativeSandbox {
    /// `sb`, just made or resumed through `store`.
    fn new(sb: Box<dyn Sandbox>, idle: Option<Duration>, store: &dormant::Store) -> NativeSandbox {
        Self::from_managed(
            Managed::new(sb, idle),
            store.local().clone(),
            store.remote(),
        )
    }

    /// With a remote store, the sandbox's lease is the one it just took (the store's newest
    /// of its id).
    fn from_managed(
        inner: Inner,
        store: Arc<LocalStore>,
        remote: Option<&dormant::RemoteStore>,
    ) -> NativeSandbox {
        let interrupter = inner.interrupter();
        let remote = remote.map(|r| (r.clone(), r.lease_of(&inner.id())));
        NativeSandbox {
            inner,
            store,
            remote,
            interrupter,
        }
    }

    /// With a remote store, waits until snapshot `id` is in the bucket.
    fn wait_durable_for(&self, id: &SnapshotId) -> Result<(), Error> {
        match &self.remote {
            Some((r, Some(lease))) => r.wait_durable(lease, id),
            Some((r, None)) => Err(Error::InvalidArgument(format!(
                "sandbox {:?} holds no lease in {}",
                self.inner.id(),
                r.url()
            ))),
            None => Ok(()),
        }
    }

    /// A call with the GIL released, its error raised as dormant's exception.
    fn call<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut dyn Sandbox) -> Result<T, Error> + Send,
    ) -> PyResult<T> {
        let inner = &self.inner;
        py.detach(|| inner.with(|s| f(s))).map_err(|e| to_py(py, e))
    }
}

fn command(
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: Option<String>,
    timeout: Option<Duration>,
    shell: bool,
) -> Command {
    Command {
        argv,
        env,
        stdin: Vec::new(),
        timeout,
        cwd,
        shell,
    }
}

#[pymethods]
impl NativeSandbox {
    #[staticmethod]
    #[pyo3(signature = (tier, store_root, memory_mib, timeout, idle_standby, env, volumes, output_limit=None, image=None, network=None, progress=None))]
    #[allow(clippy::too_many_arguments)]
    fn create(
        py: Python<'_>,
        tier: &str,
        store_root: PathBuf,
        memory_mib: Option<u64>,
        timeout: Option<f64>,
        idle_standby: Option<f64>,
        env: Vec<(String, String)>,
        volumes: Vec<(PathBuf, String, bool)>,
        output_limit: Option<usize>,
        image: Option<String>,
        network: Option<PolicyLists>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<NativeSandbox> {
        let tier: Tier = tier.parse().map_err(|e| to_py(py, e))?;
        let mut spec = SandboxSpec::default_for(tier);
        spec.image = image;
        if let Some(lists) = network {
            spec.network = policy(py, lists)?;
        }
        if let Some(mib) = memory_mib {
            spec = spec.memory_limit(mebibytes(mib)?);
        }
        if let Some(t) = seconds("timeout", timeout)? {
            spec = spec.call_timeout(t);
        }
        if let Some(bytes) = output_limit {
            spec = spec.output_limit(bytes);
        }
        let idle = seconds("idle_standby", idle_standby)?;
        spec.env = env;
        for (host, guest, read_only) in volumes {
            spec = spec.mount(host, guest, read_only);
        }
        let progress = PyProgress::new(progress);
        let made = py.detach(|| -> Result<NativeSandbox, Error> {
            let store = dstore(store_root)?;
            let sb = store.create_with_progress(tier, spec, &progress)?;
            Ok(NativeSandbox::new(sb, idle, &store))
        });
        if let Err(raised) = progress.raise() {
            // The callback failed the create: the sandbox it made goes.
            if let Ok(sb) = made {
                let _ = sb.kill(py);
            }
            return Err(raised);
        }
        made.map_err(|e| to_py(py, e))
    }

    /// Resumes a snapshot with the host directories `volumes` (`(host, guest, read_only)`)
    /// for its mount points: a snapshot grants none by itself.
    #[staticmethod]
    #[pyo3(signature = (snapshot_id, store_root, idle_standby, volumes, detach_missing))]
    fn resume(
        py: Python<'_>,
        snapshot_id: &str,
        store_root: PathBuf,
        idle_standby: Option<f64>,
        volumes: Vec<(PathBuf, String, bool)>,
        detach_missing: bool,
    ) -> PyResult<NativeSandbox> {
        let id = self::snapshot_id(py, snapshot_id)?;
        let idle = seconds("idle_standby", idle_standby)?;
        let grants = grants(volumes, detach_missing);
        let made = py.detach(move || -> Result<NativeSandbox, Error> {
            let store = dstore(store_root)?;
            let sb = store.resume(&id, &grants)?;
            Ok(NativeSandbox::new(sb, idle, &store))
        });
        made.map_err(|e| to_py(py, e))
    }

    /// Resumes sandbox `sandbox_id` from its latest snapshot (in a remote store: under its
    /// lease, the latest durable one its head names), with `volumes` as `resume` takes them;
    /// returns it with the snapshot's id.
    #[staticmethod]
    #[pyo3(signature = (sandbox_id, store_root, idle_standby, volumes, detach_missing))]
    fn connect(
        py: Python<'_>,
        sandbox_id: &str,
        store_root: PathBuf,
        idle_standby: Option<f64>,
        volumes: Vec<(PathBuf, String, bool)>,
        detach_missing: bool,
    ) -> PyResult<(NativeSandbox, String)> {
        let idle = seconds("idle_standby", idle_standby)?;
        let grants = grants(volumes, detach_missing);
        let made = py.detach(move || -> Result<(NativeSandbox, String), Error> {
            let store = dstore(store_root)?;
            let (sb, id) = store.connect_at(sandbox_id, &grants)?;
            Ok((NativeSandbox::new(sb, idle, &store), id.to_string()))
        });
        made.map_err(|e| to_py(py, e))
    }

    /// A new sandbox from template `name` (its snapshot resumed under a new id), with
    /// `volumes` for the template's mount points (those left out are detached). `tier`, when
    /// given, must be the template's.
    #[staticmethod]
    #[pyo3(signature = (name, store_root, idle_standby, volumes, tier=None))]
    fn from_template(
        py: Python<'_>,
        name: &str,
        store_root: PathBuf,
        idle_standby: Option<f64>,
        volumes: Vec<(PathBuf, String, bool)>,
        tier: Option<&str>,
    ) -> PyResult<NativeSandbox> {
        let tier: Option<Tier> = tier.map(str::parse).transpose().map_err(|e| to_py(py, e))?;
        let idle = seconds("idle_standby", idle_standby)?;
        let grants = grants(volumes, false);
        let made = py.detach(move || -> Result<NativeSandbox, Error> {
            let store = dstore(store_root)?;
            let rec = store.template(name)?;
            if let Some(t) = tier
                && t != rec.tier
            {
                return Err(Error::InvalidArgument(format!(
                    "template {name:?} runs on the {} tier, not {t}; leave tier= out",
                    rec.tier
                )));
            }
            let sb = store.create_from_template(name, &grants)?;
            Ok(NativeSandbox::new(sb, idle, &store))
        });
        made.map_err(|e| to_py(py, e))
    }

    #[getter]
    fn id(&self) -> String {
        self.inner.id()
    }

    #[getter]
    fn tier(&self) -> &'static str {
        self.inner.tier().as_str()
    }

    #[getter]
    fn state(&self, py: Python<'_>) -> String {
        py.detach(|| self.inner.state()).to_string()
    }

    /// `(stdout, stderr, error, results)`, `error` being `(name, value, traceback)` or `None`,
    /// each result `(text, html, markdown, png, svg, json, is_main_result)` with `json` as
    /// JSON text.
    #[pyo3(signature = (code, timeout=None))]
    fn run_code<'py>(
        &self,
        py: Python<'py>,
        code: String,
        timeout: Option<f64>,
    ) -> PyResult<ExecutionTuple<'py>> {
        let timeout = seconds("timeout", timeout)?;
        let inner = self.inner.clone();
        let r = interruptible(py, self.interrupter.as_ref(), move || {
            inner.run_code_with_timeout(&code, timeout)
        })?;
        let ex = r.map_err(|e| to_py(py, e))?;
        Ok((
            ex.stdout,
            ex.stderr,
            ex.error.map(|e| (e.name, e.value, e.traceback)),
            ex.results
                .into_iter()
                .map(|r| {
                    (
                        r.text,
                        r.html,
                        r.markdown,
                        r.png.map(|b| PyBytes::new(py, &b)),
                        r.svg,
                        r.json.map(|j| j.to_string()),
                        r.is_main_result,
                    )
                })
                .collect(),
        ))
    }

    /// `(stdout, stderr, exit_code)`; output chunks also go to the callbacks as they come
    /// (each stream whole at the end where the tier does not stream).
    #[pyo3(signature = (argv, env, cwd, timeout, on_stdout, on_stderr, shell=false))]
    #[allow(clippy::too_many_arguments)]
    fn exec<'py>(
        &self,
        py: Python<'py>,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: Option<String>,
        timeout: Option<f64>,
        on_stdout: Option<Py<PyAny>>,
        on_stderr: Option<Py<PyAny>>,
        shell: bool,
    ) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>, i32)> {
        let cmd = command(argv, env, cwd, seconds("timeout", timeout)?, shell);
        let inner = self.inner.clone();
        // The first exception a callback raised, re-raised after the command.
        let failed: Arc<Mutex<Option<PyErr>>> = Arc::default();
        let failed2 = failed.clone();
        // Ctrl-C stops a command where that leaves the sandbox usable (a KVM command is killed
        // in the guest); elsewhere (WASI, whose interrupt poisons) it runs on to its deadline.
        let interrupter = self.interrupter.as_ref().filter(|i| i.stops_commands());
        let r = interruptible(py, interrupter, move || {
            let deliver = |cb: &Option<Py<PyAny>>, chunk: &[u8]| {
                if let Some(cb) = cb
                    && !chunk.is_empty()
                {
                    Python::attach(|py| {
                        if let Err(e) = cb.call1(py, (PyBytes::new(py, chunk),)) {
                            failed2.lock().get_or_insert(e);
                        }
                    });
                }
            };
            // At most the spec's output_limit per stream: the tier stops the command past it
            // (`Error::OutputLimit`).
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let code = inner.exec_streaming(
                &cmd,
                &mut |c| {
                    out.extend_from_slice(c);
                    deliver(&on_stdout, c);
                },
                &mut |c| {
                    err.extend_from_slice(c);
                    deliver(&on_stderr, c);
                },
            )?;
            Ok((out, err, code))
        })?;
        if let Some(e) = failed.lock().take() {
            return Err(e);
        }
        let (out, err, code) = r.map_err(|e| to_py(py, e))?;
        Ok((PyBytes::new(py, &out), PyBytes::new(py, &err), code))
    }

    /// Starts a background process (where the tier has them); returns its pid.
    #[pyo3(signature = (argv, env, cwd, shell=false))]
    fn spawn(
        &self,
        py: Python<'_>,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: Option<String>,
        shell: bool,
    ) -> PyResult<u32> {
        let cmd = command(argv, env, cwd, None, shell);
        py.detach(|| self.inner.spawn(&cmd))
            .map_err(|e| to_py(py, e))
    }

    /// Waits for a background process: its exit code, or `None` if it still runs.
    #[pyo3(signature = (pid, timeout))]
    fn wait(&self, py: Python<'_>, pid: u32, timeout: Option<f64>) -> PyResult<Option<i32>> {
        let timeout = seconds("timeout", timeout)?;
        let m = self.inner.clone();
        interruptible(py, self.interrupter.as_ref(), move || m.wait(pid, timeout))?
            .map_err(|e| to_py(py, e))
    }

    /// A background process's output since the last call: `(stdout, stderr, running)`.
    fn output<'py>(
        &self,
        py: Python<'py>,
        pid: u32,
    ) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>, bool)> {
        let (o, e, running) = py
            .detach(|| self.inner.output(pid))
            .map_err(|e| to_py(py, e))?;
        Ok((PyBytes::new(py, &o), PyBytes::new(py, &e), running))
    }

    fn signal(&self, py: Python<'_>, pid: u32, signal: i32) -> PyResult<()> {
        py.detach(|| self.inner.signal(pid, signal))
            .map_err(|e| to_py(py, e))
    }

    fn read<'py>(&self, py: Python<'py>, path: String) -> PyResult<Bound<'py, PyBytes>> {
        let data = self.call(py, |s| s.read_file(&path))?;
        Ok(PyBytes::new(py, &data))
    }

    fn write(&self, py: Python<'_>, path: String, data: Vec<u8>) -> PyResult<()> {
        self.call(py, |s| s.write_file(&path, &data))
    }

    /// `[(name, is_dir, size)]`, sorted by name.
    fn list(&self, py: Python<'_>, path: String) -> PyResult<Vec<(String, bool, u64)>> {
        let entries = self.call(py, |s| s.list_dir(&path))?;
        Ok(entries
            .into_iter()
            .map(|e| (e.name, e.is_dir, e.size))
            .collect())
    }

    fn remove(&self, py: Python<'_>, path: String) -> PyResult<()> {
        self.call(py, |s| s.remove(&path))
    }

    fn exists(&self, py: Python<'_>, path: String) -> PyResult<bool> {
        self.call(py, |s| s.exists(&path))
    }

    /// `(cpu_time_s, memory_bytes, memory_limit_bytes, disk_bytes_written)` of this handle
    /// (see `dormant_core::Metrics`), read without waking a sandbox in standby.
    fn metrics(&self, py: Python<'_>) -> PyResult<(f64, u64, u64, u64)> {
        let m = py
            .detach(|| self.inner.metrics())
            .map_err(|e| to_py(py, e))?;
        Ok((
            m.cpu_time.as_secs_f64(),
            m.memory_bytes,
            m.memory_limit_bytes,
            m.disk_bytes_written,
        ))
    }

    fn checkpoint(&self, py: Python<'_>) -> PyResult<String> {
        Ok(self.call(py, |s| s.checkpoint())?.to_string())
    }

    fn standby(&self, py: Python<'_>) -> PyResult<String> {
        let r = py.detach(|| self.inner.standby());
        Ok(r.map_err(|e| to_py(py, e))?.to_string())
    }

    /// With a remote store, waits until snapshot `snapshot_id` of this sandbox is in the
    /// bucket and its head names it, uploading it again if its upload failed; at once with a
    /// local store.
    fn wait_durable(&self, py: Python<'_>, snapshot_id: &str) -> PyResult<()> {
        let id = self::snapshot_id(py, snapshot_id)?;
        let r = py.detach(|| self.wait_durable_for(&id));
        r.map_err(|e| to_py(py, e))
    }

    /// Replaces this sandbox's state with a snapshot's (after a failed call, say), with the
    /// host directories this sandbox holds.
    fn restore(&self, py: Python<'_>, snapshot_id: &str) -> PyResult<()> {
        let id = self::snapshot_id(py, snapshot_id)?;
        let r = py.detach(|| self.inner.resume(&id));
        r.map_err(|e| to_py(py, e))
    }

    /// Replaces the egress policy (`(allow, deny)` entry lists), waking the sandbox if it
    /// sleeps.
    fn set_network(&self, py: Python<'_>, allow: Vec<String>, deny: Vec<String>) -> PyResult<()> {
        let policy = policy(py, (allow, deny))?;
        let r = py.detach(|| self.inner.set_network(policy));
        r.map_err(|e| to_py(py, e))
    }

    /// The egress policy as `(allow, deny)` entry lists, read without waking the sandbox.
    fn network(&self, py: Python<'_>) -> PyResult<PolicyLists> {
        let r = py.detach(|| self.inner.network());
        r.map(policy_lists).map_err(|e| to_py(py, e))
    }

    fn fork(&self, py: Python<'_>, n: usize) -> PyResult<Vec<NativeSandbox>> {
        let r = py.detach(|| -> Result<Vec<NativeSandbox>, Error> {
            let children = self.inner.fork(n)?;
            Ok(children
                .into_iter()
                .map(|c| {
                    NativeSandbox::from_managed(
                        c,
                        self.store.clone(),
                        self.remote.as_ref().map(|(r, _)| r),
                    )
                })
                .collect())
        });
        r.map_err(|e| to_py(py, e))
    }

    /// Kills the sandbox and retires its id in its store (it leaves `list_sandboxes` and
    /// `latest_snapshot` no longer finds it; its snapshots stay).
    fn kill(&self, py: Python<'_>) -> PyResult<()> {
        let r = py.detach(|| {
            self.inner.kill()?;
            self.store.retire_sandbox(&self.inner.id())
        });
        r.map_err(|e| to_py(py, e))
    }

    /// Exposes guest TCP port `port` on the host's `127.0.0.1:host_port` (`0`: a free port),
    /// waking the sandbox first; returns the host address, `"127.0.0.1:N"`.
    fn expose(&self, py: Python<'_>, port: u16, host_port: u16) -> PyResult<String> {
        let r = py.detach(|| self.inner.expose(port, host_port));
        Ok(r.map_err(|e| to_py(py, e))?.to_string())
    }

    /// Stops exposing guest port `port` (not exposed: nothing to do).
    fn unexpose(&self, py: Python<'_>, port: u16) -> PyResult<()> {
        let r = py.detach(|| self.inner.unexpose(port));
        r.map_err(|e| to_py(py, e))
    }

    /// Starts `argv` (empty: the sandbox's shell) on a new terminal of `cols`×`rows` cells,
    /// waking the sandbox first; returns its pid.
    fn pty_open(&self, py: Python<'_>, argv: Vec<String>, cols: u32, rows: u32) -> PyResult<u32> {
        let size = TerminalSize::new(cols, rows).map_err(|e| to_py(py, e))?;
        let r = py.detach(|| self.inner.open_terminal(&argv, size));
        r.map_err(|e| to_py(py, e))
    }

    /// Sets terminal `pid`'s size.
    fn pty_resize(&self, py: Python<'_>, pid: u32, cols: u32, rows: u32) -> PyResult<()> {
        let size = TerminalSize::new(cols, rows).map_err(|e| to_py(py, e))?;
        let r = py.detach(|| self.inner.resize_terminal(pid, size));
        r.map_err(|e| to_py(py, e))
    }

    /// Attaches to terminal `pid` (the output nobody received yet comes first).
    fn pty_attach(&self, py: Python<'_>, pid: u32) -> PyResult<NativeTerminal> {
        let r = py.detach(|| self.inner.attach_terminal(pid));
        Ok(NativeTerminal {
            link: r.map_err(|e| to_py(py, e))?,
        })
    }

    /// The exposed ports: `[(guest_port, host_port)]` by guest port.
    fn exposed(&self, py: Python<'_>) -> PyResult<Vec<(u16, u16)>> {
        let r = py.detach(|| self.inner.exposed());
        Ok(r.map_err(|e| to_py(py, e))?
            .into_iter()
            .map(|m| (m.guest_port, m.host_port))
            .collect())
    }
}

/// Most bytes one [`NativeTerminal::read`] returns.
const TERMINAL_READ_MAX: usize = 64 << 10;

/// An attachment to a terminal: read by the Python package's reader thread, written by any
/// thread; each call releases the GIL.
#[pyclass(frozen, module = "dormant._native")]
struct NativeTerminal {
    link: Arc<dyn TerminalLink>,
}

#[pymethods]
impl NativeTerminal {
    /// The next output (at most `max` bytes, at most 64 KiB), waiting for it; `b""` once the
    /// attachment has ended.
    fn read<'py>(&self, py: Python<'py>, max: usize) -> PyResult<Bound<'py, PyBytes>> {
        let mut buf = vec![0u8; max.clamp(1, TERMINAL_READ_MAX)];
        let link = self.link.clone();
        let n = py.detach(|| link.read(&mut buf)).map_err(PyErr::from)?;
        Ok(PyBytes::new(py, &buf[..n]))
    }

    /// Types `data` into the terminal. Raises `OSError` once the attachment has ended.
    fn write(&self, py: Python<'_>, data: Vec<u8>) -> PyResult<()> {
        let link = self.link.clone();
        py.detach(|| link.write(&data)).map_err(PyErr::from)
    }

    /// Detaches; the program runs on.
    fn close(&self, py: Python<'_>) {
        let link = self.link.clone();
        py.detach(|| link.close());
    }
}

/// A network policy as Python passes it: `(allow, deny)` entry strings.
type PolicyLists = (Vec<String>, Vec<String>);

/// Parses a policy's entries (see `dormant::NetworkPolicy`).
fn policy(py: Python<'_>, (allow, deny): PolicyLists) -> PyResult<NetworkPolicy> {
    NetworkPolicy::parse(allow, deny).map_err(|e| to_py(py, e))
}

/// A policy's entries in their canonical spelling.
fn policy_lists(p: NetworkPolicy) -> PolicyLists {
    let show = |rules: Vec<dormant::Rule>| rules.iter().map(ToString::to_string).collect();
    (show(p.allow), show(p.deny))
}

/// Checks network policy entries and returns them in their canonical spelling (lowercase
/// names, CIDRs with their host bits cleared, duplicates dropped): `(allow, deny)`.
#[pyfunction]
fn parse_network_policy(
    py: Python<'_>,
    allow: Vec<String>,
    deny: Vec<String>,
) -> PyResult<PolicyLists> {
    policy(py, (allow, deny)).map(policy_lists)
}

/// `memory_mib` in bytes.
fn mebibytes(mib: u64) -> PyResult<u64> {
    mib.checked_mul(1 << 20)
        .ok_or_else(|| invalid("memory_mib is too large"))
}

/// Host access for a resume: `volumes` as `(host, guest, read_only)`.
fn grants(volumes: Vec<(PathBuf, String, bool)>, detach_missing: bool) -> Grants {
    volumes.into_iter().fold(
        Grants::new().detach_missing(detach_missing),
        |g, (host, guest, ro)| g.mount(host, guest, ro),
    )
}

/// Builds (or reuses) a template; returns `(snapshot_id, built_now)`. Ctrl-C returns at once
/// (the build goes on in the background, holding the template's lock, and records it or not).
#[pyfunction]
#[pyo3(signature = (name, tier, store_root, image, memory_mib, env, volumes, files, run, start, ready_port, ready_cmd, network=None, progress=None))]
#[allow(clippy::too_many_arguments)]
fn build_template(
    py: Python<'_>,
    name: String,
    tier: &str,
    store_root: PathBuf,
    image: Option<String>,
    memory_mib: Option<u64>,
    env: Vec<(String, String)>,
    volumes: Vec<(PathBuf, String, bool)>,
    files: Vec<(String, Vec<u8>)>,
    run: Vec<String>,
    start: Option<String>,
    ready_port: Option<u16>,
    ready_cmd: Option<String>,
    network: Option<PolicyLists>,
    progress: Option<Py<PyAny>>,
) -> PyResult<(String, bool)> {
    let tier: Tier = tier.parse().map_err(|e| to_py(py, e))?;
    let mut t = Template::new(name, tier);
    t.spec.image = image;
    if let Some(lists) = network {
        t.spec.network = policy(py, lists)?;
    }
    if let Some(mib) = memory_mib {
        t.spec.memory_limit = mebibytes(mib)?;
    }
    t.spec.env = env;
    for (host, guest, read_only) in volumes {
        t = t.mount(host, guest, read_only);
    }
    t.files = files;
    t.run = run;
    t.start = start;
    t.ready = match (ready_port, ready_cmd) {
        (Some(_), Some(_)) => return Err(invalid("give ready_port or ready_cmd, not both")),
        (Some(port), None) => Some(Ready::Port(port)),
        (None, Some(cmd)) => Some(Ready::Command(cmd)),
        (None, None) => None,
    };
    let progress = Arc::new(PyProgress::new(progress));
    let theirs = progress.clone();
    let r = interruptible(py, None, move || -> Result<_, Error> {
        let st = dstore(store_root)?;
        let b = t.build_with_progress(st.local().clone(), &*theirs)?;
        st.publish_template(&b.record.name)?;
        Ok((b.record.snapshot.to_string(), b.built))
    })?;
    progress.raise()?;
    r.map_err(|e| to_py(py, e))
}

/// A Python callable as a [`dormant::Progress`]: called with `(stage, done, total, unit,
/// finished)`; its first exception is kept and raised when the operation returns.
struct PyProgress {
    callback: Option<Py<PyAny>>,
    failed: Mutex<Option<PyErr>>,
}

impl PyProgress {
    fn new(callback: Option<Py<PyAny>>) -> PyProgress {
        PyProgress {
            callback,
            failed: Mutex::new(None),
        }
    }

    /// The callback's first exception, if it raised one.
    fn raise(&self) -> PyResult<()> {
        self.failed.lock().take().map_or(Ok(()), Err)
    }
}

impl dormant::Progress for PyProgress {
    fn report(&self, e: &dormant::ProgressEvent) {
        let Some(cb) = &self.callback else { return };
        if self.failed.lock().is_some() {
            return;
        }
        Python::attach(|py| {
            let args = (
                e.stage.as_str(),
                e.done,
                e.total,
                e.unit.as_str(),
                e.finished,
            );
            if let Err(err) = cb.call1(py, args) {
                self.failed.lock().get_or_insert(err);
            }
        });
    }
}

/// `[(name, tier, snapshot_id, created_unix_ms)]` of the store's templates, by name.
#[pyfunction]
fn list_templates(
    py: Python<'_>,
    store_root: PathBuf,
) -> PyResult<Vec<(String, String, String, u64)>> {
    let r = py.detach(|| -> Result<_, Error> {
        Ok(dormant::templates(&*store(store_root)?)?
            .into_iter()
            .map(|r| {
                (
                    r.name,
                    r.tier.to_string(),
                    r.snapshot.to_string(),
                    r.created_unix_ms,
                )
            })
            .collect())
    });
    r.map_err(|e| to_py(py, e))
}

/// `[(id, tier, created_unix_ms, bytes_stored)]` of every snapshot in the store, oldest first.
#[pyfunction]
fn list_snapshots(
    py: Python<'_>,
    store_root: PathBuf,
) -> PyResult<Vec<(String, String, u64, u64)>> {
    let r = py.detach(|| -> Result<_, Error> {
        if let dormant::Store::Remote(r) = dstore(store_root.clone())? {
            return remote_snapshots(&r);
        }
        let store = store(store_root)?;
        let mut out = Vec::new();
        for info in store.list()? {
            // A snapshot deleted meanwhile is skipped.
            let Ok(m) = store.manifest(&info.id) else {
                continue;
            };
            out.push((
                info.id.to_string(),
                m.spec.tier.to_string(),
                info.created_unix_ms,
                info.stored_bytes,
            ));
        }
        out.sort_by_key(|s| (s.2, s.0.clone()));
        Ok(out)
    });
    r.map_err(|e| to_py(py, e))
}

/// `list_snapshots` of a remote store: the bucket's snapshot objects, each read for its
/// manifest (bytes stored: what its manifest records for its own files, uncompressed).
fn remote_snapshots(r: &dormant::RemoteStore) -> Result<Vec<(String, String, u64, u64)>, Error> {
    let mut out = Vec::new();
    for id in r.list_snapshot_ids()? {
        let Ok(o) = r.snapshot_object(&id) else {
            continue;
        };
        let m = &o.manifest;
        out.push((
            id.to_string(),
            m.spec.tier.to_string(),
            m.created_unix_ms,
            m.memory.file.stored + m.fs.as_ref().map_or(0, |f| f.stored),
        ));
    }
    out.sort_by_key(|s| (s.2, s.0.clone()));
    Ok(out)
}

/// Opens the remote store at `url`, with `cache_dir` as its local store; returns the key that
/// names it as `store_root` in the other calls (`<url>#<n>`).
#[pyfunction]
#[pyo3(signature = (url, cache_dir, endpoint=None, region=None, lease_ttl=None, request_timeout=None, retries=None, freshen_after=None, anonymous=false))]
#[allow(clippy::too_many_arguments)]
fn open_remote(
    py: Python<'_>,
    url: String,
    cache_dir: PathBuf,
    endpoint: Option<String>,
    region: Option<String>,
    lease_ttl: Option<f64>,
    request_timeout: Option<f64>,
    retries: Option<usize>,
    freshen_after: Option<f64>,
    anonymous: bool,
) -> PyResult<String> {
    let mut opts = dormant::RemoteOptions {
        endpoint,
        region,
        anonymous,
        ..Default::default()
    };
    if let Some(t) = seconds("freshen_after", freshen_after)? {
        opts.freshen_after = t;
    }
    if let Some(t) = seconds("lease_ttl", lease_ttl)? {
        opts.lease_ttl = t;
    }
    if let Some(t) = seconds("request_timeout", request_timeout)? {
        opts.request_timeout = t;
    }
    if let Some(n) = retries {
        opts.retries = n;
    }
    let r = py.detach(|| -> Result<String, Error> {
        static OPENED: AtomicU64 = AtomicU64::new(0);
        let cache = store(cache_dir)?;
        let r = dormant::RemoteStore::open(&url, cache, opts)?;
        let key = format!("{url}#{}", OPENED.fetch_add(1, Ordering::Relaxed));
        REMOTES.lock().insert(key.clone(), r);
        Ok(key)
    });
    r.map_err(|e| to_py(py, e))
}

fn remote(py: Python<'_>, url: &str) -> PyResult<dormant::RemoteStore> {
    match dstore(PathBuf::from(url)) {
        Ok(dormant::Store::Remote(r)) => Ok(r),
        Ok(dormant::Store::Local(_)) => Err(to_py(
            py,
            Error::InvalidArgument(format!("{url:?} is not an s3:// URL")),
        )),
        Err(e) => Err(to_py(py, e)),
    }
}

/// Waits until every upload this process queued to `url` is done; returns the failed ones,
/// `[(snapshot_id, error)]`.
#[pyfunction]
fn flush_remote(py: Python<'_>, url: &str) -> PyResult<Vec<(String, String)>> {
    let r = remote(py, url)?;
    Ok(py
        .detach(|| r.flush())
        .into_iter()
        .map(|(id, e)| (id.to_string(), e))
        .collect())
}

/// Waits for every upload and lease release queued to every remote store this process opened
/// (what the module does at exit); returns the failed uploads, `[(url, snapshot_id, error)]`.
#[pyfunction]
fn flush_all_remotes(py: Python<'_>) -> Vec<(String, String, String)> {
    let stores: Vec<dormant::RemoteStore> = REMOTES.lock().values().cloned().collect();
    py.detach(|| {
        stores
            .iter()
            .flat_map(|r| {
                r.flush()
                    .into_iter()
                    .map(|(id, e)| (r.url().to_owned(), id.to_string(), e))
            })
            .collect()
    })
}

/// Uploads again every upload of this process to `url` that failed.
#[pyfunction]
fn sync_remote(py: Python<'_>, url: &str) -> PyResult<()> {
    let r = remote(py, url)?;
    py.detach(|| r.sync()).map_err(|e| to_py(py, e))
}

/// `[(key, bytes)]` of every object of the remote store `url`, keys relative to its prefix.
#[pyfunction]
fn remote_objects(py: Python<'_>, url: &str) -> PyResult<Vec<(String, u64)>> {
    let r = remote(py, url)?;
    py.detach(|| r.list_objects()).map_err(|e| to_py(py, e))
}

/// Garbage collection of the remote store `url` (unreferenced chunks older than `grace`
/// seconds, default 7 days): `(snapshots, chunks, unreferenced_kept, chunks_removed,
/// bytes_freed)`.
#[pyfunction]
#[pyo3(signature = (url, grace=None))]
fn remote_gc(py: Python<'_>, url: &str, grace: Option<f64>) -> PyResult<(u64, u64, u64, u64, u64)> {
    let r = remote(py, url)?;
    let grace = seconds("grace", grace)?.unwrap_or(dormant::store::DEFAULT_GC_GRACE);
    let rep = py.detach(|| r.gc(grace)).map_err(|e| to_py(py, e))?;
    Ok((
        rep.snapshots,
        rep.chunks,
        rep.unreferenced_kept,
        rep.chunks_removed,
        rep.bytes_freed,
    ))
}

/// Checks that snapshot `snapshot_id` is whole in the remote store `url`: `(snapshots,
/// chunks)` of its chain, all present.
#[pyfunction]
fn remote_verify(py: Python<'_>, url: &str, snapshot_id: &str) -> PyResult<(u64, u64)> {
    let r = remote(py, url)?;
    let id = self::snapshot_id(py, snapshot_id)?;
    let rep = py.detach(|| r.verify(&id)).map_err(|e| to_py(py, e))?;
    Ok((rep.snapshots, rep.chunks))
}

/// The head of sandbox `sandbox_id` in the remote store `url`, as JSON text, or `None`.
#[pyfunction]
fn remote_head(py: Python<'_>, url: &str, sandbox_id: &str) -> PyResult<Option<String>> {
    let r = remote(py, url)?;
    let h = py.detach(|| r.head(sandbox_id)).map_err(|e| to_py(py, e))?;
    Ok(h.map(|h| String::from_utf8_lossy(&h.encode()).into_owned()))
}

/// A sandbox of a store as Python gets it: `(sandbox_id, tier, latest_snapshot_id,
/// latest_created_unix_ms, snapshots)`.
type SandboxRow = (String, String, String, u64, usize);

/// The store's sandboxes (killed ones left out), by sandbox id.
#[pyfunction]
fn list_sandboxes(py: Python<'_>, store_root: PathBuf) -> PyResult<Vec<SandboxRow>> {
    let r = py.detach(|| -> Result<_, Error> {
        Ok(store(store_root)?
            .sandboxes()?
            .into_iter()
            .map(|s| {
                (
                    s.sandbox_id,
                    s.tier.to_string(),
                    s.latest.to_string(),
                    s.latest_created_unix_ms,
                    s.snapshots,
                )
            })
            .collect())
    });
    r.map_err(|e| to_py(py, e))
}

/// The latest snapshot of sandbox `sandbox_id` in the store; `SandboxNotFound` when it has
/// none there or was killed.
#[pyfunction]
fn latest_snapshot(py: Python<'_>, sandbox_id: &str, store_root: PathBuf) -> PyResult<String> {
    let r = py.detach(|| -> Result<_, Error> {
        Ok(dstore(store_root)?.latest_snapshot(sandbox_id)?.to_string())
    });
    r.map_err(|e| to_py(py, e))
}

/// Retires sandbox `sandbox_id` in the store (as a kill does): it leaves `list_sandboxes`
/// until a snapshot is taken of it again.
#[pyfunction]
fn retire_sandbox(py: Python<'_>, sandbox_id: &str, store_root: PathBuf) -> PyResult<()> {
    let r = py.detach(|| store(store_root)?.retire_sandbox(sandbox_id));
    r.map_err(|e| to_py(py, e))
}

/// `(snapshots, stored_bytes, shared_bytes)` the store holds for sandbox `sandbox_id` (see
/// `LocalStore::sandbox_usage`).
#[pyfunction]
fn sandbox_usage(
    py: Python<'_>,
    sandbox_id: String,
    store_root: PathBuf,
) -> PyResult<(u64, u64, u64)> {
    let r = py.detach(|| store(store_root)?.sandbox_usage(&sandbox_id));
    let u = r.map_err(|e| to_py(py, e))?;
    Ok((u.snapshots, u.stored_bytes, u.shared_bytes))
}

/// `(snapshots, sandboxes, bytes_on_disk, logical_bytes, chunks, chunk_bytes)` of the whole
/// store (see `LocalStore::store_usage`).
#[pyfunction]
fn store_usage(py: Python<'_>, store_root: PathBuf) -> PyResult<(u64, u64, u64, u64, u64, u64)> {
    let r = py.detach(|| store(store_root)?.store_usage());
    let u = r.map_err(|e| to_py(py, e))?;
    Ok((
        u.snapshots,
        u.sandboxes,
        u.bytes_on_disk,
        u.logical_bytes,
        u.chunks,
        u.chunk_bytes,
    ))
}

#[pyfunction]
fn delete_snapshot(py: Python<'_>, snapshot_id: &str, store_root: PathBuf) -> PyResult<()> {
    let id = self::snapshot_id(py, snapshot_id)?;
    let r = py.detach(|| store(store_root)?.delete(&id));
    r.map_err(|e| to_py(py, e))
}

/// Builds (or finds in the cache) the root filesystem image `name`: `(name, path,
/// fingerprint)`. `packages` and `rootfs` exclude each other; neither is a built-in image.
/// `progress` is called with `(stage, done, total, unit, finished)` as the build moves.
#[pyfunction]
#[pyo3(signature = (name, packages=None, rootfs=None, progress=None))]
fn build_image(
    py: Python<'_>,
    name: String,
    packages: Option<Vec<String>>,
    rootfs: Option<PathBuf>,
    progress: Option<Py<PyAny>>,
) -> PyResult<(String, String, String)> {
    use dormant::kvm::ImageSource;
    let source = match (packages, rootfs) {
        (None, None) => ImageSource::Builtin,
        (Some(p), None) => ImageSource::Packages(p),
        (None, Some(r)) => ImageSource::Rootfs(r),
        (Some(_), Some(_)) => {
            return Err(to_py(
                py,
                Error::InvalidArgument("give packages or rootfs, not both".into()),
            ));
        }
    };
    let progress = PyProgress::new(progress);
    let r = py.detach(|| dormant::kvm::build_image_with_progress(&name, &source, &progress));
    progress.raise()?;
    let d = r.map_err(|e| to_py(py, e))?;
    Ok((d.name, d.path.display().to_string(), d.fingerprint))
}

/// The root filesystem images built into the cache: `(name, path, fingerprint)` each.
#[pyfunction]
fn list_images(py: Python<'_>) -> PyResult<Vec<(String, String, String)>> {
    let r = py.detach(dormant::kvm::list_images);
    Ok(r.map_err(|e| to_py(py, e))?
        .into_iter()
        .map(|d| (d.name, d.path.display().to_string(), d.fingerprint))
        .collect())
}

/// Whether this host can run the KVM tier, and if not why: `(ok, reason)`.
#[pyfunction]
fn kvm_status() -> (bool, String) {
    match dormant::kvm::detect() {
        dormant::kvm::HostKvm::Unavailable => (
            false,
            "/dev/kvm is not available (a Linux host with KVM and access to /dev/kvm is needed)"
                .into(),
        ),
        dormant::kvm::HostKvm::Hardware => (true, "hardware virtualization".into()),
        dormant::kvm::HostKvm::Pvm => (true, "PVM (guest kernel emulated, slow)".into()),
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeSandbox>()?;
    m.add_class::<NativeTerminal>()?;
    m.add_function(wrap_pyfunction!(list_snapshots, m)?)?;
    m.add_function(wrap_pyfunction!(open_remote, m)?)?;
    m.add_function(wrap_pyfunction!(flush_remote, m)?)?;
    m.add_function(wrap_pyfunction!(flush_all_remotes, m)?)?;
    m.add_function(wrap_pyfunction!(sync_remote, m)?)?;
    m.add_function(wrap_pyfunction!(remote_objects, m)?)?;
    m.add_function(wrap_pyfunction!(remote_head, m)?)?;
    m.add_function(wrap_pyfunction!(remote_gc, m)?)?;
    m.add_function(wrap_pyfunction!(remote_verify, m)?)?;
    m.add_function(wrap_pyfunction!(delete_snapshot, m)?)?;
    m.add_function(wrap_pyfunction!(list_sandboxes, m)?)?;
    m.add_function(wrap_pyfunction!(latest_snapshot, m)?)?;
    m.add_function(wrap_pyfunction!(retire_sandbox, m)?)?;
    m.add_function(wrap_pyfunction!(sandbox_usage, m)?)?;
    m.add_function(wrap_pyfunction!(store_usage, m)?)?;
    m.add_function(wrap_pyfunction!(kvm_status, m)?)?;
    m.add_function(wrap_pyfunction!(build_template, m)?)?;
    m.add_function(wrap_pyfunction!(list_templates, m)?)?;
    m.add_function(wrap_pyfunction!(build_image, m)?)?;
    m.add_function(wrap_pyfunction!(list_images, m)?)?;
    m.add_function(wrap_pyfunction!(parse_network_policy, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
