//! The host side: a blocking client over any `Read + Write` byte stream (a Unix socket to
//! the VMM's vsock device, a `UnixStream::pair` in tests).
//!
//! One request at a time: each method sends a request and reads its response(s). An
//! [`ClientError::Agent`] error leaves the connection usable; after an
//! [`ClientError::Io`] or [`ClientError::Protocol`] error while reading a response the
//! stream's framing may be lost, so the client refuses further calls (see
//! [`Client::is_broken`]): open a new connection. Timeouts are the stream's business
//! (e.g. `UnixStream::set_read_timeout`); `exec` and `wait` can legitimately take long.

use std::io::{self, Read, Write};
use std::time::Duration;

use crate::proto::{
    self, CellError, Entry, FrameError, MAX_DATA, PROTOCOL_VERSION, ProcessInfo, Request, Response,
};

/// A failed client call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The stream failed (or the request was too large to send: `InvalidInput`).
    #[error("agent connection i/o: {0}")]
    Io(#[from] io::Error),
    /// The agent answered something this client does not understand.
    #[error("agent protocol error: {0}")]
    Protocol(String),
    /// The agent reported a failure. `kind` is one of [`proto::error_kind`].
    #[error("agent error ({kind}): {message}")]
    Agent {
        /// `not_found`, `permission`, `invalid`, `unsupported` or `io`.
        kind: String,
        /// Detail from the agent.
        message: String,
    },
}

impl ClientError {
    /// The agent's error kind, for [`ClientError::Agent`].
    pub fn agent_kind(&self) -> Option<&str> {
        match self {
            ClientError::Agent { kind, .. } => Some(kind),
            _ => None,
        }
    }

    /// Whether the agent said `not_found`.
    pub fn is_not_found(&self) -> bool {
        self.agent_kind() == Some(proto::error_kind::NOT_FOUND)
    }
}

impl From<FrameError> for ClientError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Io(e) => ClientError::Io(e),
            FrameError::Closed => ClientError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "agent closed the connection",
            )),
            other => ClientError::Protocol(other.to_string()),
        }
    }
}

/// What `hello` returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    /// Protocol version.
    pub version: u32,
    /// The agent's crate version.
    pub agent: String,
    /// The agent's pid (1 inside a VM).
    pub pid: u32,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// Terminating signal, when killed by one.
    pub signal: Option<i32>,
    /// `exec` only: the timeout fired and the process group was killed.
    pub timed_out: bool,
}

impl ExitStatus {
    /// Exited with code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// A finished `exec` with its collected output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// How it ended.
    pub status: ExitStatus,
    /// All of stdout.
    pub stdout: Vec<u8>,
    /// All of stderr.
    pub stderr: Vec<u8>,
}

/// What `output` returns: the output captured since the previous call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessOutput {
    /// The process has not ended yet.
    pub running: bool,
    /// Stdout bytes (the newest, at most 1 MiB).
    pub stdout: Vec<u8>,
    /// Stderr bytes.
    pub stderr: Vec<u8>,
    /// Stdout bytes dropped so far (buffer overflow), cumulative.
    pub dropped_stdout: u64,
    /// Stderr bytes dropped so far, cumulative.
    pub dropped_stderr: u64,
}

/// What `run_code` returns: one cell's output and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellOutput {
    /// The exception the cell raised (with `lost`: why the session ended), or `None`.
    pub error: Option<CellError>,
    /// The cell's stdout (at most the request's output limit).
    pub stdout: Vec<u8>,
    /// Its stderr.
    pub stderr: Vec<u8>,
    /// More stdout than the limit was written; the rest was dropped.
    pub stdout_over: bool,
    /// More stderr than the limit was written.
    pub stderr_over: bool,
    /// The cell ran past its timeout and was interrupted (or, with `lost`, killed).
    pub timed_out: bool,
    /// The interpreter ended during the cell: its variables are gone, the next `run_code`
    /// starts a fresh one.
    pub lost: bool,
    /// The cell's rich results record (a JSON list, untrusted: decode it with caps, e.g.
    /// `dormant_core::RichResult::decode_list`); empty when it had none.
    pub results: Vec<u8>,
    /// The results did not fit in the answer beside the output and were dropped.
    pub results_over: bool,
}

/// A blocking protocol-v1 client.
#[derive(Debug)]
pub struct Client<S> {
    stream: S,
    broken: bool,
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_string()).collect()
}

fn env_pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect()
}

/// `time` as the protocol's `unix_ns`: nanoseconds since the Unix epoch (0 before it, saturated
/// past `u64`).
pub fn unix_ns(time: std::time::SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl<S: Read + Write> Client<S> {
    /// Wraps a connected stream. Call [`Client::hello`] first to check the version.
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            broken: false,
        }
    }

    /// The stream.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The stream, mutably (e.g. to set timeouts).
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Gives the stream back.
    pub fn into_inner(self) -> S {
        self.stream
    }

    /// An I/O or protocol error happened mid-response: the connection is unusable.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    fn send(&mut self, req: &Request, data: &[u8]) -> Result<(), ClientError> {
        if self.broken {
            return Err(ClientError::Protocol(
                "connection unusable after an earlier error".into(),
            ));
        }
        if data.len() > MAX_DATA {
            // Nothing sent: the connection stays usable.
            return Err(ClientError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("payload of {} bytes exceeds {MAX_DATA}", data.len()),
            )));
        }
        proto::write_frame(&mut self.stream, req, data).map_err(|e| {
            if e.kind() != io::ErrorKind::InvalidInput {
                self.broken = true;
            }
            ClientError::Io(e)
        })
    }

    fn recv(&mut self) -> Result<(Response, Vec<u8>), ClientError> {
        match proto::read_frame::<_, Response>(&mut self.stream) {
            Ok((Response::Error { kind, message }, _)) => Err(ClientError::Agent { kind, message }),
            Ok(frame) => Ok(frame),
            Err(e) => {
                self.broken = true;
                Err(e.into())
            }
        }
    }

    fn unexpected(&mut self, op: &str, resp: &Response) -> ClientError {
        self.broken = true;
        ClientError::Protocol(format!("unexpected response to {op}: {resp:?}"))
    }

    /// Sends any single-response request and returns the response (an `error` response
    /// becomes [`ClientError::Agent`]). Not for `exec`, which streams: use [`Client::exec`].
    pub fn request(
        &mut self,
        req: &Request,
        data: &[u8],
    ) -> Result<(Response, Vec<u8>), ClientError> {
        if matches!(req, Request::Exec { .. }) {
            return Err(ClientError::Protocol(
                "exec streams its output: use Client::exec".into(),
            ));
        }
        self.send(req, data)?;
        self.recv()
    }

    /// Sends several single-response requests at once, then reads their responses in order:
    /// one round trip instead of one each. Each answer is `Ok` or its `Agent` error; a broken
    /// stream fails the whole call. Not for `exec`.
    #[allow(clippy::type_complexity)]
    pub fn pipeline(
        &mut self,
        reqs: &[(Request, &[u8])],
    ) -> Result<Vec<Result<(Response, Vec<u8>), ClientError>>, ClientError> {
        if reqs.iter().any(|(r, _)| matches!(r, Request::Exec { .. })) {
            return Err(ClientError::Protocol(
                "exec streams its output: use Client::exec".into(),
            ));
        }
        for (req, data) in reqs {
            self.send(req, data)?;
        }
        let mut out = Vec::with_capacity(reqs.len());
        for _ in reqs {
            match self.recv() {
                Ok(frame) => out.push(Ok(frame)),
                Err(e @ ClientError::Agent { .. }) => out.push(Err(e)),
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Splits an answer's payload: `stdout_len` bytes of stdout, then stderr.
    fn split_streams(
        &mut self,
        op: &str,
        stdout_len: u32,
        mut data: Vec<u8>,
    ) -> Result<(Vec<u8>, Vec<u8>), ClientError> {
        let split = stdout_len as usize;
        if split > data.len() {
            self.broken = true;
            return Err(ClientError::Protocol(format!(
                "the answer to {op} claims {split} bytes of stdout in a payload of {}",
                data.len()
            )));
        }
        let stderr = data.split_off(split);
        Ok((data, stderr))
    }

    fn expect_ok(&mut self, op: &str, req: &Request, data: &[u8]) -> Result<(), ClientError> {
        match self.request(req, data)? {
            (Response::Ok {}, _) => Ok(()),
            (other, _) => Err(self.unexpected(op, &other)),
        }
    }

    /// Version handshake; fails with `Agent{kind:"unsupported"}` on a version mismatch.
    pub fn hello(&mut self) -> Result<AgentInfo, ClientError> {
        match self.request(
            &Request::Hello {
                version: PROTOCOL_VERSION,
            },
            &[],
        )? {
            (
                Response::Hello {
                    version,
                    agent,
                    pid,
                },
                _,
            ) => Ok(AgentInfo {
                version,
                agent,
                pid,
            }),
            (other, _) => Err(self.unexpected("hello", &other)),
        }
    }

    /// Runs a command to completion. `stdin` is its whole input (empty: EOF at once; at most
    /// 16 MiB). Output chunks are handed to `on_stdout` / `on_stderr` as they arrive. On
    /// `timeout` the agent kills the process group (`timed_out` in the status). A program
    /// that cannot be started is `Agent{kind:"not_found"}` (or `permission`, …).
    #[allow(clippy::too_many_arguments)]
    pub fn exec(
        &mut self,
        argv: &[&str],
        env: &[(&str, &str)],
        cwd: Option<&str>,
        stdin: &[u8],
        timeout: Option<Duration>,
        on_stdout: &mut dyn FnMut(&[u8]),
        on_stderr: &mut dyn FnMut(&[u8]),
    ) -> Result<ExitStatus, ClientError> {
        let req = Request::Exec {
            argv: strings(argv),
            env: env_pairs(env),
            cwd: cwd.map(str::to_string),
            timeout_ms: timeout.map(millis),
            shell: false,
        };
        self.exec_request(&req, stdin, on_stdout, on_stderr)
    }

    /// [`Client::exec`] of a request built by the caller (a [`Request::Exec`], e.g. with
    /// `shell` set).
    pub fn exec_request(
        &mut self,
        req: &Request,
        stdin: &[u8],
        on_stdout: &mut dyn FnMut(&[u8]),
        on_stderr: &mut dyn FnMut(&[u8]),
    ) -> Result<ExitStatus, ClientError> {
        if !matches!(req, Request::Exec { .. }) {
            return Err(ClientError::Protocol(format!(
                "exec_request takes an exec request, not {req:?}"
            )));
        }
        self.send(req, stdin)?;
        loop {
            match self.recv()? {
                (Response::Stdout {}, data) => on_stdout(&data),
                (Response::Stderr {}, data) => on_stderr(&data),
                (
                    Response::Exit {
                        code,
                        signal,
                        timed_out,
                    },
                    _,
                ) => {
                    return Ok(ExitStatus {
                        code,
                        signal,
                        timed_out,
                    });
                }
                (other, _) => return Err(self.unexpected("exec", &other)),
            }
        }
    }

    /// [`Client::exec`] collecting the output in memory.
    pub fn exec_collect(
        &mut self,
        argv: &[&str],
        env: &[(&str, &str)],
        cwd: Option<&str>,
        stdin: &[u8],
        timeout: Option<Duration>,
    ) -> Result<ExecOutput, ClientError> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let status = self.exec(
            argv,
            env,
            cwd,
            stdin,
            timeout,
            &mut |d| stdout.extend_from_slice(d),
            &mut |d| stderr.extend_from_slice(d),
        )?;
        Ok(ExecOutput {
            status,
            stdout,
            stderr,
        })
    }

    /// Runs `code` (Python) as one cell in the agent's persistent interpreter (see
    /// [`Request::RunCode`]). `timeout` interrupts it; `output_limit` caps each stream (at
    /// most, and by default, [`proto::RUN_CODE_OUTPUT_MAX`]). A guest without the interpreter
    /// is `Agent{kind:"not_found"}`.
    pub fn run_code(
        &mut self,
        code: &str,
        timeout: Option<Duration>,
        output_limit: Option<usize>,
    ) -> Result<CellOutput, ClientError> {
        let req = Request::RunCode {
            timeout_ms: timeout.map(millis),
            output_limit: output_limit.map(|l| u64::try_from(l).unwrap_or(u64::MAX)),
            reseed: false,
        };
        self.run_code_request(&req, code)
    }

    /// [`Client::run_code`] of a request built by the caller (a [`Request::RunCode`], e.g. with
    /// `reseed` set).
    pub fn run_code_request(
        &mut self,
        req: &Request,
        code: &str,
    ) -> Result<CellOutput, ClientError> {
        if !matches!(req, Request::RunCode { .. }) {
            return Err(ClientError::Protocol(format!(
                "run_code_request takes a run_code request, not {req:?}"
            )));
        }
        match self.request(req, code.as_bytes())? {
            (
                Response::Executed {
                    error,
                    stdout_len,
                    stdout_over,
                    stderr_over,
                    timed_out,
                    lost,
                    results_len,
                    results_over,
                },
                mut data,
            ) => {
                let Some(split) = data.len().checked_sub(results_len as usize) else {
                    self.broken = true;
                    return Err(ClientError::Protocol(format!(
                        "the answer to run_code claims {results_len} bytes of results in a \
                         payload of {}",
                        data.len()
                    )));
                };
                let results = data.split_off(split);
                let (stdout, stderr) = self.split_streams("run_code", stdout_len, data)?;
                Ok(CellOutput {
                    error,
                    stdout,
                    stderr,
                    stdout_over,
                    stderr_over,
                    timed_out,
                    lost,
                    results,
                    results_over,
                })
            }
            (other, _) => Err(self.unexpected("run_code", &other)),
        }
    }

    /// Starts a background process (own process group, stdin a pipe, output captured in
    /// bounded buffers) and returns its pid.
    pub fn spawn(
        &mut self,
        argv: &[&str],
        env: &[(&str, &str)],
        cwd: Option<&str>,
    ) -> Result<u32, ClientError> {
        self.spawn_request(&Request::Spawn {
            argv: strings(argv),
            env: env_pairs(env),
            cwd: cwd.map(str::to_string),
            shell: false,
        })
    }

    /// [`Client::spawn`] of a request built by the caller (a [`Request::Spawn`]).
    pub fn spawn_request(&mut self, req: &Request) -> Result<u32, ClientError> {
        match self.request(req, &[])? {
            (Response::Spawned { pid }, _) => Ok(pid),
            (other, _) => Err(self.unexpected("spawn", &other)),
        }
    }

    /// Takes the output a background process produced since the previous call.
    pub fn output(&mut self, pid: u32) -> Result<ProcessOutput, ClientError> {
        match self.request(&Request::Output { pid }, &[])? {
            (
                Response::Output {
                    running,
                    dropped_stdout,
                    dropped_stderr,
                    stdout_len,
                },
                data,
            ) => {
                let (stdout, stderr) = self.split_streams("output", stdout_len, data)?;
                Ok(ProcessOutput {
                    running,
                    stdout,
                    stderr,
                    dropped_stdout,
                    dropped_stderr,
                })
            }
            (other, _) => Err(self.unexpected("output", &other)),
        }
    }

    /// Waits for a process to end: `Some(status)` once it has (possibly long ago), `None`
    /// when `timeout` passed first. `timeout: None` waits as long as it takes.
    pub fn wait(
        &mut self,
        pid: u32,
        timeout: Option<Duration>,
    ) -> Result<Option<ExitStatus>, ClientError> {
        let req = Request::Wait {
            pid,
            timeout_ms: timeout.map(millis),
        };
        match self.request(&req, &[])? {
            (
                Response::Exit {
                    code,
                    signal,
                    timed_out,
                },
                _,
            ) => Ok(Some(ExitStatus {
                code,
                signal,
                timed_out,
            })),
            (Response::Running { .. }, _) => Ok(None),
            (other, _) => Err(self.unexpected("wait", &other)),
        }
    }

    /// Sends `signal` to the process group of `pid`.
    pub fn signal(&mut self, pid: u32, signal: i32) -> Result<(), ClientError> {
        self.expect_ok("signal", &Request::Signal { pid, signal }, &[])
    }

    /// Writes `data` to a background process's stdin, then closes it if `close`.
    pub fn stdin(&mut self, pid: u32, data: &[u8], close: bool) -> Result<(), ClientError> {
        self.expect_ok("stdin", &Request::Stdin { pid, close }, data)
    }

    /// The background processes (running and recently ended), by pid.
    pub fn processes(&mut self) -> Result<Vec<ProcessInfo>, ClientError> {
        match self.request(&Request::Processes {}, &[])? {
            (Response::Processes { list }, _) => Ok(list),
            (other, _) => Err(self.unexpected("processes", &other)),
        }
    }

    /// Reads a whole file (at most 16 MiB).
    pub fn read_file(&mut self, path: &str) -> Result<Vec<u8>, ClientError> {
        let req = Request::ReadFile {
            path: path.to_string(),
        };
        match self.request(&req, &[])? {
            (Response::Data {}, data) => Ok(data),
            (other, _) => Err(self.unexpected("read_file", &other)),
        }
    }

    /// Writes a file (parents created). Replaces it atomically (temp file + rename) unless
    /// `append`. `mode` sets the permission bits (default: an existing file's, else 0644).
    pub fn write_file(
        &mut self,
        path: &str,
        data: &[u8],
        mode: Option<u32>,
        append: bool,
    ) -> Result<(), ClientError> {
        let req = Request::WriteFile {
            path: path.to_string(),
            mode,
            append,
        };
        self.expect_ok("write_file", &req, data)
    }

    /// Lists a directory, sorted by name.
    pub fn list(&mut self, path: &str) -> Result<Vec<Entry>, ClientError> {
        let req = Request::List {
            path: path.to_string(),
        };
        match self.request(&req, &[])? {
            (Response::Entries { list }, _) => Ok(list),
            (other, _) => Err(self.unexpected("list", &other)),
        }
    }

    /// Removes a file, or a directory (`recursive` for a non-empty one).
    pub fn remove(&mut self, path: &str, recursive: bool) -> Result<(), ClientError> {
        let req = Request::Remove {
            path: path.to_string(),
            recursive,
        };
        self.expect_ok("remove", &req, &[])
    }

    /// Whether a path exists (symlinks followed).
    pub fn exists(&mut self, path: &str) -> Result<bool, ClientError> {
        let req = Request::Exists {
            path: path.to_string(),
        };
        match self.request(&req, &[])? {
            (Response::Exists { value }, _) => Ok(value),
            (other, _) => Err(self.unexpected("exists", &other)),
        }
    }

    /// Whether something in the guest accepts TCP connections on `127.0.0.1:port`.
    pub fn port_open(&mut self, port: u16) -> Result<bool, ClientError> {
        match self.request(&Request::PortOpen { port }, &[])? {
            (Response::Exists { value }, _) => Ok(value),
            (other, _) => Err(self.unexpected("port_open", &other)),
        }
    }

    /// Turns this connection into a byte pipe to TCP `port` on the guest's loopback
    /// (`connect_tcp`) and gives the stream back: from then on it carries that TCP connection's
    /// bytes both ways, and shutting down its writing half ends the guest socket's input.
    /// Errors: [`ClientError::Agent`] with kind `refused` when nothing listens there (the
    /// client, and its connection, are dropped either way).
    pub fn connect_tcp(mut self, port: u16) -> Result<S, ClientError> {
        self.expect_ok("connect_tcp", &Request::ConnectTcp { port }, &[])?;
        Ok(self.stream)
    }

    /// Starts `argv` (empty: the guest's shell) on a new pseudo-terminal of `cols`×`rows`
    /// character cells (`pty_open`); returns its pid, a background process for
    /// [`Client::wait`] and [`Client::signal`]. Errors: a size out of 1 to
    /// [`MAX_TERMINAL_CELLS`](proto::MAX_TERMINAL_CELLS) is `invalid`; an agent from before
    /// terminals answers `unsupported`.
    pub fn pty_open(
        &mut self,
        argv: &[&str],
        env: &[(&str, &str)],
        cwd: Option<&str>,
        cols: u16,
        rows: u16,
    ) -> Result<u32, ClientError> {
        let req = Request::PtyOpen {
            argv: strings(argv),
            env: env_pairs(env),
            cwd: cwd.map(str::to_string),
            cols,
            rows,
        };
        self.spawn_request(&req)
    }

    /// Sets terminal `pid`'s size (`pty_resize`); an unknown pid is `not_found`.
    pub fn pty_resize(&mut self, pid: u32, cols: u16, rows: u16) -> Result<(), ClientError> {
        self.expect_ok("pty_resize", &Request::PtyResize { pid, cols, rows }, &[])
    }

    /// Attaches to terminal `pid` (`pty_attach`) and gives the stream back: from then on it
    /// carries the terminal's output (first what nobody received yet) and takes its input;
    /// end of file means the terminal ended. Errors: an unknown pid is `not_found` (the client,
    /// and its connection, are dropped either way).
    pub fn pty_attach(mut self, pid: u32) -> Result<S, ClientError> {
        self.expect_ok("pty_attach", &Request::PtyAttach { pid }, &[])?;
        Ok(self.stream)
    }

    /// `mkdir -p`.
    pub fn mkdir(&mut self, path: &str) -> Result<(), ClientError> {
        let req = Request::Mkdir {
            path: path.to_string(),
        };
        self.expect_ok("mkdir", &req, &[])
    }

    /// `sync(2)` in the guest: call before a checkpoint.
    pub fn sync(&mut self) -> Result<(), ClientError> {
        self.expect_ok("sync", &Request::Sync {}, &[])
    }

    /// Sets the guest's wall clock (the host calls it after a resume).
    pub fn set_time(&mut self, time: std::time::SystemTime) -> Result<(), ClientError> {
        let unix_ns = unix_ns(time);
        self.expect_ok("set_time", &Request::SetTime { unix_ns }, &[])
    }

    /// After a resume, in one round trip: `seed` (at most
    /// [`MAX_REFRESH_SEED`](crate::proto::MAX_REFRESH_SEED) bytes of host entropy) mixed into
    /// the guest's entropy pool, its CRNG reseeded, and its wall clock set to `time`. An agent
    /// from before this request answers [`ClientError::Agent`] of kind `unsupported`.
    pub fn refresh(&mut self, seed: &[u8], time: std::time::SystemTime) -> Result<(), ClientError> {
        let unix_ns = unix_ns(time);
        self.expect_ok("refresh", &Request::Refresh { unix_ns }, seed)
    }

    /// Mounts `source` (of type `fstype`) at `target` in the guest, creating `target` first.
    pub fn mount(
        &mut self,
        source: &str,
        target: &str,
        fstype: &str,
        read_only: bool,
    ) -> Result<(), ClientError> {
        let req = Request::Mount {
            source: source.into(),
            target: target.into(),
            fstype: fstype.into(),
            read_only,
        };
        self.expect_ok("mount", &req, &[])
    }
}
