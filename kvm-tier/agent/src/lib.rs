//! dormant's guest agent for the KVM tier.
//!
//! The `dormant-agent` binary runs inside the Linux microVM as PID 1 (exec'd by the
//! initramfs's `/init` script once `/proc`, `/sys`, `/dev` and `/tmp` are mounted) and
//! serves the host over virtio-vsock (port [`proto::DEFAULT_PORT`], 1024): command execution
//! with streamed output, background processes, file operations, `sync`, and Python cells in a
//! persistent interpreter (`run_code`, where the guest has `python3`). It reaps every
//! child (orphans included), runs each connection on its own thread and keeps its process
//! table across connections, so the host can reconnect after a snapshot/restore.
//!
//! This library holds:
//! - [`proto`]: the wire protocol v1 (frames, [`proto::Request`], [`proto::Response`]);
//!   the full description is in `kvm-tier/agent/PROTOCOL.md`;
//! - [`client`]: the host-side [`client::Client`] over any `Read + Write` stream;
//! - [`server`]: the agent's side (used by the binary, and by tests in-process), in
//!   `server/`: the request loop and its dispatch, the process table with its reaper, and one
//!   module per family of operations (background processes, `exec`, files, the guest system,
//!   `run_code` in a persistent Python interpreter).
//!
//! Binary usage: `dormant-agent [--vsock PORT | --unix PATH]` (default `--vsock 1024`).
//! It prints `dormant-agent ready on vsock port N` (or `... on unix socket PATH`) to stderr
//! once listening.

pub mod client;
pub mod netcfg;
pub mod proto;
pub mod server;

pub use client::{
    AgentInfo, CellOutput, Client, ClientError, ExecOutput, ExitStatus, ProcessOutput,
};
pub use proto::{CellError, DEFAULT_PORT, Entry, PROTOCOL_VERSION, ProcessInfo, Request, Response};
