//! Wire protocol v1 between the host (VMM) and the guest agent.
//!
//! A connection is a byte stream (virtio-vsock in the guest, any `Read + Write` on the host).
//! Every message is a *frame*:
//!
//! ```text
//! u32 LE json_len | u32 LE data_len | json_len bytes of JSON (the header) | data_len bytes of payload
//! ```
//!
//! The header is a [`Request`] (host → agent, tagged by `"op"`) or a [`Response`]
//! (agent → host, tagged by `"type"`); the payload carries raw bytes (stdin, file contents,
//! output chunks). `json_len` is at most [`MAX_JSON`] (1 MiB) and `data_len` at most
//! [`MAX_DATA`] (16 MiB); a frame over a cap is a protocol error and the reader never
//! allocates the claimed size.
//!
//! One request at a time per connection: the host sends a request frame and reads response
//! frames until the request's final response (for `exec`: any number of `stdout`/`stderr`
//! frames, then `exit` or `error`; for every other request exactly one frame). The connection
//! can then carry the next request. See `kvm-tier/agent/PROTOCOL.md` for the full table.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// The protocol version spoken by this crate (sent in `hello`).
pub const PROTOCOL_VERSION: u32 = 1;
/// The vsock port the agent listens on by default.
pub const DEFAULT_PORT: u32 = 1024;
/// Largest JSON header accepted in a frame (1 MiB).
pub const MAX_JSON: usize = 1 << 20;
/// Largest payload accepted in a frame (16 MiB).
pub const MAX_DATA: usize = 16 << 20;
/// Most bytes of host entropy a [`Request::Refresh`] carries.
pub const MAX_REFRESH_SEED: usize = 4096;
/// Most bytes of each stream (stdout, stderr) a `run_code` answer carries (8 MiB): both fit in
/// one frame's payload. A request's `output_limit` above it is lowered to it.
pub const RUN_CODE_OUTPUT_MAX: usize = MAX_DATA / 2;
/// Largest terminal width or height (`pty_open`, `pty_resize`), in character cells.
pub const MAX_TERMINAL_CELLS: u16 = 4096;
/// Output a terminal keeps while nobody is attached (64 KiB, the newest bytes): what the next
/// `pty_attach` receives first.
pub const TERMINAL_BACKLOG: usize = 64 << 10;

/// A request header (host → agent). The frame's payload is the stdin for `exec`, the bytes
/// to write for `write_file` and `stdin`, the code for `run_code`, and empty otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Version handshake. Answered by [`Response::Hello`], or `error{kind:"unsupported"}`
    /// when `version` is not [`PROTOCOL_VERSION`].
    Hello {
        /// The protocol version the host speaks.
        version: u32,
    },
    /// Run a command to completion, streaming its output (`stdout`/`stderr` frames), then
    /// [`Response::Exit`]. The payload is the whole stdin (empty: EOF at once).
    Exec {
        /// Program and arguments; `argv[0]` is looked up in `PATH`.
        argv: Vec<String>,
        /// Added to (overriding) the agent's environment.
        #[serde(default)]
        env: Vec<(String, String)>,
        /// Working directory (default: the agent's, `/`).
        #[serde(default)]
        cwd: Option<String>,
        /// Kill the process group with SIGKILL after this long.
        #[serde(default)]
        timeout_ms: Option<u64>,
        /// `argv` is one shell script, run as `SHELL -c script` by the guest's shell
        /// (`/bin/bash` where it exists, else `/bin/sh`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        shell: bool,
    },
    /// Start a background process; answered by [`Response::Spawned`].
    Spawn {
        /// Program and arguments.
        argv: Vec<String>,
        /// Added to (overriding) the agent's environment.
        #[serde(default)]
        env: Vec<(String, String)>,
        /// Working directory.
        #[serde(default)]
        cwd: Option<String>,
        /// As for `exec`: `argv` is one script for the guest's shell.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        shell: bool,
    },
    /// Drain the captured output of a background process; answered by [`Response::Output`].
    Output {
        /// The process, as returned by `spawn`.
        pid: u32,
    },
    /// Wait for a process to end: [`Response::Exit`], or [`Response::Running`] on timeout.
    Wait {
        /// The process.
        pid: u32,
        /// How long to wait; `None` waits as long as it takes.
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// Send a signal to the process group of a tracked process; answered by `ok`.
    Signal {
        /// The process (also its process-group id).
        pid: u32,
        /// Signal number (e.g. 15 for SIGTERM).
        signal: i32,
    },
    /// Write the payload to a background process's stdin, then close it if `close`.
    Stdin {
        /// The process.
        pid: u32,
        /// Close the pipe after writing.
        #[serde(default)]
        close: bool,
    },
    /// List the background processes; answered by [`Response::Processes`].
    Processes {},
    /// Read a whole file; answered by [`Response::Data`] with the contents as payload.
    ReadFile {
        /// Path in the guest.
        path: String,
    },
    /// Write the payload to a file (parents created; atomic temp file + rename unless
    /// `append`); answered by `ok`.
    WriteFile {
        /// Path in the guest.
        path: String,
        /// Permission bits for the file (default: keep an existing file's, else 0644).
        #[serde(default)]
        mode: Option<u32>,
        /// Append instead of replacing.
        #[serde(default)]
        append: bool,
    },
    /// List a directory, sorted by name; answered by [`Response::Entries`].
    List {
        /// Directory path in the guest.
        path: String,
    },
    /// Remove a file or directory (`recursive` for a non-empty directory); answered by `ok`.
    Remove {
        /// Path in the guest.
        path: String,
        /// Remove a directory tree.
        #[serde(default)]
        recursive: bool,
    },
    /// Whether a path exists; answered by [`Response::Exists`].
    Exists {
        /// Path in the guest.
        path: String,
    },
    /// `mkdir -p`; answered by `ok`.
    Mkdir {
        /// Path in the guest.
        path: String,
    },
    /// Flush the guest's page cache to its disks (`sync(2)`); answered by `ok`. The host
    /// sends it before a checkpoint.
    Sync {},
    /// Set the guest's wall clock (`CLOCK_REALTIME`) to `unix_ns` nanoseconds since the Unix
    /// epoch; answered by `ok`. The host sends it after a resume (the guest's clock stood still
    /// while it slept).
    SetTime { unix_ns: u64 },
    /// After a resume, in one request: the payload (host entropy, at most
    /// [`MAX_REFRESH_SEED`] bytes) mixed into the guest's entropy pool and its CRNG reseeded
    /// from it (as a `write_file` appending to `/dev/urandom` does), then `CLOCK_REALTIME` set
    /// to `unix_ns` (as `set_time`); answered by `ok`. An agent that answers it `unsupported`
    /// (from before it existed) takes the two requests instead.
    Refresh { unix_ns: u64 },
    /// Whether something in the guest accepts TCP connections on `127.0.0.1:port`: one
    /// connection attempt (at most 1 s), closed at once; answered by [`Response::Exists`].
    PortOpen {
        /// The TCP port.
        port: u16,
    },
    /// Connect to TCP `port` on the guest's loopback (`127.0.0.1`, else `[::1]` when that
    /// refuses) and turn this connection into a byte pipe to it: answered by `ok`, after which
    /// no more frames flow; every byte the host sends goes to the TCP socket and every byte it
    /// answers comes back, with half-closes passed on (end of file one way shuts down that
    /// direction of the other socket) until both directions end or one side fails. A port that
    /// refuses: `error{kind:"refused"}`, the connection staying usable. The host's exposed
    /// ports (`expose`) are carried this way, one connection each.
    ConnectTcp {
        /// The TCP port in the guest.
        port: u16,
    },
    /// Start a program on a new pseudo-terminal (its stdin, stdout, stderr and controlling
    /// terminal, in a session of its own, `TERM=xterm-256color`); answered by
    /// [`Response::Spawned`]. The process is a background process (`wait`, `signal`,
    /// `processes`); its output is read all the time into a backlog of the last
    /// [`TERMINAL_BACKLOG`] bytes that `pty_attach` delivers.
    PtyOpen {
        /// Program and arguments; empty: the guest's shell (`/bin/bash` where it exists, else
        /// `/bin/sh`).
        #[serde(default)]
        argv: Vec<String>,
        /// Added to (overriding) the agent's environment and `TERM`.
        #[serde(default)]
        env: Vec<(String, String)>,
        /// Working directory (default: `/root` where it exists, else `/`).
        #[serde(default)]
        cwd: Option<String>,
        /// Width in character cells, 1 to [`MAX_TERMINAL_CELLS`].
        cols: u16,
        /// Height in character cells, 1 to [`MAX_TERMINAL_CELLS`].
        rows: u16,
    },
    /// Set a terminal's size (the kernel sends `SIGWINCH` to its foreground process group);
    /// answered by `ok`.
    PtyResize {
        /// The terminal's process, as `pty_open` returned it.
        pid: u32,
        /// Width in character cells, 1 to [`MAX_TERMINAL_CELLS`].
        cols: u16,
        /// Height in character cells, 1 to [`MAX_TERMINAL_CELLS`].
        rows: u16,
    },
    /// Attach to a terminal: answered by `ok`, after which the connection is a raw byte pipe
    /// to it (no more frames either way): first the backlog (output nobody received yet),
    /// then its output as it comes; every byte the host sends is typed into it. One
    /// attachment at a time: a new one ends the previous. When the terminal's program and
    /// every other holder of the terminal have ended, the agent sends what is left and closes
    /// the connection; the host closing it detaches (the program runs on).
    PtyAttach {
        /// The terminal's process.
        pid: u32,
    },
    /// Mount a filesystem at `target` (created first, like `mkdir -p`); answered by `ok`.
    /// The host mounts its volumes (`fstype` `virtiofs`, `source` the slot's tag) this way.
    Mount {
        /// What to mount (a device, or a virtiofs tag).
        source: String,
        /// Absolute path of the mount point.
        target: String,
        /// Filesystem type, e.g. `virtiofs`.
        fstype: String,
        /// Mount read-only.
        #[serde(default)]
        read_only: bool,
    },
    /// Run the payload (Python source, UTF-8) as one cell in the agent's persistent `python3`
    /// interpreter (started on the first `run_code`, restarted if it died); answered by
    /// [`Response::Executed`], or `error{kind:"not_found"}` when the guest has no `python3`.
    /// One cell runs at a time: another connection's `run_code` waits for it.
    RunCode {
        /// Interrupt the cell (SIGINT to the interpreter's process group: a
        /// `KeyboardInterrupt`) after this long; one that does not stop within 3 s more is
        /// killed with its group, and the session is lost.
        #[serde(default)]
        timeout_ms: Option<u64>,
        /// Most bytes of stdout (and, separately, of stderr) to keep; more is dropped and
        /// flagged. At most (and by default) [`RUN_CODE_OUTPUT_MAX`].
        #[serde(default)]
        output_limit: Option<u64>,
        /// Before the cell, reseed the interpreter's `random` (and numpy's, if imported) from
        /// the guest's entropy pool: the host sets it on the first cell after a resume, so
        /// that forks and repeated resumes of one snapshot do not share random streams.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        reseed: bool,
    },
}

/// A response header (agent → host).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// Answer to `hello`.
    Hello {
        /// The protocol version the agent speaks.
        version: u32,
        /// The agent's crate version.
        agent: String,
        /// The agent's pid (1 in a VM).
        pid: u32,
    },
    /// A chunk of an `exec`'s stdout (payload).
    Stdout {},
    /// A chunk of an `exec`'s stderr (payload).
    Stderr {},
    /// A process ended (final response of `exec`, or of `wait`).
    Exit {
        /// Exit code, when it exited normally.
        code: Option<i32>,
        /// Terminating signal, when killed by one.
        signal: Option<i32>,
        /// `exec` only: the timeout fired and the process group was killed.
        #[serde(default)]
        timed_out: bool,
    },
    /// Answer to `spawn`.
    Spawned {
        /// The new process's pid (also its process-group id).
        pid: u32,
    },
    /// Answer to `output`: payload = `stdout_len` bytes of stdout, then stderr.
    Output {
        /// The process has not ended yet.
        running: bool,
        /// Stdout bytes dropped so far because the buffer (last 1 MiB) was full.
        dropped_stdout: u64,
        /// Stderr bytes dropped so far.
        dropped_stderr: u64,
        /// How many payload bytes are stdout; the rest is stderr.
        stdout_len: u32,
    },
    /// Answer to `wait` when the timeout passed first.
    Running {
        /// The process.
        pid: u32,
    },
    /// Success without a value.
    Ok {},
    /// Answer to `processes`.
    Processes {
        /// The background processes, by pid.
        list: Vec<ProcessInfo>,
    },
    /// Answer to `read_file`: the payload is the contents.
    Data {},
    /// Answer to `list`.
    Entries {
        /// Directory entries, sorted by name.
        list: Vec<Entry>,
    },
    /// Answer to `exists` and `port_open`.
    Exists {
        /// Whether the path exists (the port is open).
        value: bool,
    },
    /// Answer to `run_code`: payload = `stdout_len` bytes of the cell's stdout, then its
    /// stderr (both as the interpreter and its children wrote them to their descriptors 1 and
    /// 2 during the cell), then `results_len` bytes of its rich results record (a JSON list,
    /// as the guest's driver wrote it: untrusted, the host decodes it with its caps).
    Executed {
        /// The exception the cell raised (`KeyboardInterrupt` when it was interrupted), or
        /// with `lost`, why the session ended. `None`: the cell ran to completion.
        error: Option<CellError>,
        /// How many payload bytes are stdout; the rest is stderr.
        stdout_len: u32,
        /// The cell wrote more stdout than the request's `output_limit`: the rest was dropped.
        #[serde(default)]
        stdout_over: bool,
        /// The same for stderr.
        #[serde(default)]
        stderr_over: bool,
        /// The cell ran past the request's `timeout_ms` and was interrupted (or, with `lost`,
        /// killed).
        #[serde(default)]
        timed_out: bool,
        /// The interpreter ended during the cell (it exited, was killed, or broke its pipe to
        /// the agent): its variables are gone, and the next `run_code` starts a fresh one.
        #[serde(default)]
        lost: bool,
        /// Bytes of the results record at the payload's end (0, and absent from the header,
        /// when the cell had none or the agent predates rich results).
        #[serde(default, skip_serializing_if = "is_zero")]
        results_len: u32,
        /// The cell's results did not fit in the frame beside its output and were dropped.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        results_over: bool,
    },
    /// A request failed; this is its final response and the connection stays usable (unless
    /// the failure was a protocol error, after which the agent closes the connection).
    Error {
        /// One of [`error_kind`]'s constants.
        kind: String,
        /// Human-readable detail.
        message: String,
    },
}

/// The `kind` strings of [`Response::Error`].
pub mod error_kind {
    /// A path, process or program does not exist.
    pub const NOT_FOUND: &str = "not_found";
    /// Permission denied.
    pub const PERMISSION: &str = "permission";
    /// The request is malformed or its arguments are invalid.
    pub const INVALID: &str = "invalid";
    /// Unknown operation or protocol version.
    pub const UNSUPPORTED: &str = "unsupported";
    /// Any other I/O failure.
    pub const IO: &str = "io";
    /// Nothing accepts connections on the TCP port (`connect_tcp`).
    pub const REFUSED: &str = "refused";
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The exception a `run_code` cell raised ([`Response::Executed`]). The agent shortens long
/// fields (the value to its first 16 KiB, the traceback to its last 64 KiB) so that the
/// answer's header stays far below [`MAX_JSON`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellError {
    /// The exception's type name, e.g. `ZeroDivisionError`.
    pub name: String,
    /// Its message (`str(exc)`).
    pub value: String,
    /// The formatted traceback (also written to the cell's stderr).
    pub traceback: String,
}

/// One directory entry of [`Response::Entries`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// File name (lossy UTF-8).
    pub name: String,
    /// Whether it is a directory (symlinks are followed).
    pub is_dir: bool,
    /// Size in bytes.
    pub size: u64,
}

/// One background process of [`Response::Processes`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// Pid (also the process-group id).
    pub pid: u32,
    /// The argv it was spawned with.
    pub argv: Vec<String>,
    /// Has not ended yet.
    pub running: bool,
    /// Exit code once ended normally.
    pub code: Option<i32>,
    /// Terminating signal once killed by one.
    pub signal: Option<i32>,
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the connection cleanly, before the first byte of a frame.
    #[error("connection closed")]
    Closed,
    /// A length over the caps ([`MAX_JSON`], [`MAX_DATA`]).
    #[error("frame too large: {what} length {len} exceeds {max}")]
    TooLarge {
        /// `"json"` or `"data"`.
        what: &'static str,
        /// The claimed length.
        len: u64,
        /// The cap.
        max: usize,
    },
    /// The header is not valid JSON for the expected type.
    #[error("bad frame header: {0}")]
    Json(#[from] serde_json::Error),
    /// Reading failed (including EOF in the middle of a frame).
    #[error("i/o error reading a frame: {0}")]
    Io(#[from] io::Error),
}

/// Serializes `header` and writes one frame with `data` as payload, then flushes.
///
/// Nothing is written when the header or the payload exceeds the caps (an
/// `InvalidInput` error), so the stream stays usable.
pub fn write_frame<W: Write + ?Sized, T: Serialize>(
    w: &mut W,
    header: &T,
    data: &[u8],
) -> io::Result<()> {
    let json = serde_json::to_vec(header).map_err(io::Error::other)?;
    write_raw_frame(w, &json, data)
}

/// Writes one frame from an already serialized header.
pub fn write_raw_frame<W: Write + ?Sized>(w: &mut W, json: &[u8], data: &[u8]) -> io::Result<()> {
    if json.len() > MAX_JSON {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("frame header of {} bytes exceeds {MAX_JSON}", json.len()),
        ));
    }
    if data.len() > MAX_DATA {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("frame payload of {} bytes exceeds {MAX_DATA}", data.len()),
        ));
    }
    // Both fit in u32: checked against the caps above.
    let mut head = Vec::with_capacity(8 + json.len());
    head.extend_from_slice(&(json.len() as u32).to_le_bytes());
    head.extend_from_slice(&(data.len() as u32).to_le_bytes());
    head.extend_from_slice(json);
    // One vectored write of header and payload: the payload is never copied in this process.
    // (In a guest on a PVM host, copying it here with glibc's vector memcpy was where output
    // got damaged: see PVM_GLIBC_TUNABLES in dormant-kvm's boot.rs.)
    write_all_vectored(w, &mut [io::IoSlice::new(&head), io::IoSlice::new(data)])?;
    w.flush()
}

/// `Write::write_all` for several buffers (`write_all_vectored` is not stable yet).
fn write_all_vectored<W: Write + ?Sized>(
    w: &mut W,
    mut bufs: &mut [io::IoSlice<'_>],
) -> io::Result<()> {
    io::IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads one frame and returns its raw JSON header and payload.
pub fn read_raw_frame<R: Read + ?Sized>(r: &mut R) -> Result<(Vec<u8>, Vec<u8>), FrameError> {
    let mut lens = [0u8; 8];
    // Distinguish a clean close (no byte of a new frame) from a truncated frame.
    let mut got = 0;
    while got < lens.len() {
        match r.read(&mut lens[got..]) {
            Ok(0) if got == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(FrameError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    let json_len = u32::from_le_bytes([lens[0], lens[1], lens[2], lens[3]]);
    let data_len = u32::from_le_bytes([lens[4], lens[5], lens[6], lens[7]]);
    if json_len as usize > MAX_JSON {
        return Err(FrameError::TooLarge {
            what: "json",
            len: json_len.into(),
            max: MAX_JSON,
        });
    }
    if data_len as usize > MAX_DATA {
        return Err(FrameError::TooLarge {
            what: "data",
            len: data_len.into(),
            max: MAX_DATA,
        });
    }
    let json = read_exact_vec(r, json_len as usize)?;
    let data = read_exact_vec(r, data_len as usize)?;
    Ok((json, data))
}

/// Reads one frame and parses its header as `T`.
pub fn read_frame<R: Read + ?Sized, T: DeserializeOwned>(
    r: &mut R,
) -> Result<(T, Vec<u8>), FrameError> {
    let (json, data) = read_raw_frame(r)?;
    let header = serde_json::from_slice(&json)?;
    Ok((header, data))
}

/// Reads exactly `len` bytes, growing the buffer as bytes arrive (a peer that claims a
/// large length and sends nothing does not make us allocate it).
fn read_exact_vec<R: Read + ?Sized>(r: &mut R, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len.min(256 << 10));
    let n = r.take(len as u64).read_to_end(&mut buf)?;
    if n != len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(buf)
}
