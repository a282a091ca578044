//! Capabilities a tier has or answers with [`Error::Unsupported`](crate::Error::Unsupported),
//! kept apart from the [`Sandbox`](crate::Sandbox) contract every tier implements (as
//! cloud-hypervisor keeps `Pausable` apart from `Snapshottable`).
//!
//! A caller holding any sandbox, `&mut dyn Sandbox` or `Box<dyn Sandbox>`, reaches them through
//! the contract: [`Sandbox::processes`](crate::Sandbox::processes) (background processes),
//! [`Sandbox::streaming`](crate::Sandbox::streaming) (output as it comes) and
//! [`Sandbox::interrupter`](crate::Sandbox::interrupter) (stop the running call from another
//! thread). [`Managed`](crate::Managed) offers each of them as a call of its own, so a front end
//! (the Python module, an agent adapter) never names a tier.
//!
//! Which tier has what today: the KVM tier has all three; the WASI tier has an interrupter
//! (which poisons the sandbox, so it [does not stop commands](Interrupt::stops_commands)) and
//! neither background processes (its commands run to completion) nor streaming.

use std::time::Duration;

use crate::command::Command;
use crate::error::Result;

/// Stops a sandbox's running call from another thread (what
/// [`Sandbox::interrupter`](crate::Sandbox::interrupter) gives).
pub trait Interrupt: Send + Sync + std::fmt::Debug {
    /// Interrupts the call running now, if any: it fails promptly with
    /// [`Error::Interrupted`](crate::Error::Interrupted). A call that starts later is not
    /// affected. What the sandbox is afterwards depends on the tier (the WASI tier poisons it,
    /// the KVM tier kills the guest command and stays running).
    fn interrupt(&self);

    /// Whether interrupting a running `exec` stops the command and leaves the sandbox usable
    /// (the KVM tier kills the guest command). When `false` (the default; the WASI tier, whose
    /// interrupt poisons the sandbox), a front end lets commands run on to their deadline and
    /// interrupts only `run_code` and waits.
    fn stops_commands(&self) -> bool {
        false
    }
}

/// Background processes: start a command and come back for it later, across calls, checkpoints
/// and resumes. A process's pid is the guest's.
pub trait Processes {
    /// Starts `cmd` in the background (its `stdin` and `timeout` are not used); returns its pid.
    /// Errors: an empty `argv` is [`Error::InvalidArgument`](crate::Error::InvalidArgument); a
    /// program that cannot be started is the guest's error.
    fn spawn(&mut self, cmd: &Command) -> Result<u32>;
    /// Waits up to `timeout` (`None`: as long as it takes) for process `pid` to end: its exit
    /// code (128 + signal number when a signal ended it), or `None` while it runs. The
    /// sandbox's interrupter stops the wait.
    fn wait(&mut self, pid: u32, timeout: Option<Duration>) -> Result<Option<i32>>;
    /// Takes the output process `pid` wrote since the previous call:
    /// `(stdout, stderr, still_running)`.
    fn output(&mut self, pid: u32) -> Result<(Vec<u8>, Vec<u8>, bool)>;
    /// Sends `signal` (a Linux signal number, e.g. 15 for SIGTERM) to process `pid`'s group.
    fn signal(&mut self, pid: u32, signal: i32) -> Result<()>;
    /// Whether something in the guest accepts TCP connections on `127.0.0.1:port` now (a
    /// server started in the background is ready): one connection attempt, closed at once.
    /// A tier that cannot tell answers [`Error::Unsupported`](crate::Error::Unsupported) (the
    /// default).
    fn listening(&mut self, port: u16) -> Result<bool> {
        let _ = port;
        Err(crate::error::Error::Unsupported {
            op: "asking whether a guest port is open",
            what: "this sandbox's background processes".into(),
        })
    }
}

/// `exec` with its output delivered in chunks as the command writes it.
pub trait StreamingExec {
    /// Runs `cmd` to completion, giving each chunk of its standard output and error to the
    /// callbacks as it arrives; returns the exit code. Past the sandbox's output limit on a
    /// stream the command is stopped and the call fails with
    /// [`Error::OutputLimit`](crate::Error::OutputLimit).
    fn exec_streaming(
        &mut self,
        cmd: &Command,
        on_stdout: &mut dyn FnMut(&[u8]),
        on_stderr: &mut dyn FnMut(&[u8]),
    ) -> Result<i32>;
}
