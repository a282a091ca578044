//! Background processes in the guest: [`KvmSandbox::spawn`], [`KvmSandbox::wait`] (asked in
//! slices of at most [`WAIT_SLICE`], each under its own host-side deadline),
//! [`KvmSandbox::signal`] and [`KvmSandbox::output`]; [`KvmSandbox::listening`] tells when a
//! server among them accepts connections. The guest agent keeps them in its
//! process table, which snapshots keep: a resumed sandbox still knows them.

use std::time::{Duration, Instant};

use dormant_core::lifecycle::Operation;
use dormant_core::{Command, Result};

use super::live::exit_code;
use super::{KvmSandbox, WAIT_SLICE};

impl KvmSandbox {
    /// Starts a background process; returns its guest pid.
    pub fn spawn(&mut self, cmd: &Command) -> Result<u32> {
        let req = self.request_for(cmd, None)?;
        let r = self.agent(Operation::Exec)?.spawn_request(&req);
        r.map_err(|e| self.failed(e, self.opts.request_timeout, "spawn", &cmd.argv[0]))
    }

    /// Waits up to `timeout` (`None`: as long as it takes) for a background process: its exit
    /// code (128 + signal when killed), or `None` while it runs. The agent is asked in slices
    /// of at most [`WAIT_SLICE`], each under its own host-side deadline; the interrupter stops
    /// the wait.
    pub fn wait(&mut self, pid: u32, timeout: Option<Duration>) -> Result<Option<i32>> {
        let end = timeout.map(|t| Instant::now() + t);
        let what = pid.to_string();
        // One call however many slices: an interrupt between two slices stops the next.
        self.lifecycle.check(Operation::Exec)?;
        self.check_memory()?;
        self.calls.begin();
        loop {
            let slice = end.map_or(WAIT_SLICE, |e| {
                e.saturating_duration_since(Instant::now()).min(WAIT_SLICE)
            });
            let bound = slice + self.opts.request_timeout;
            let client = self.live_agent()?;
            client.get_mut().set_read_timeout(Some(bound));
            let r = client.wait(pid, Some(slice));
            match r.map_err(|e| self.failed(e, bound, "wait for", &what))? {
                Some(s) => return Ok(Some(exit_code(s.code, s.signal))),
                None if end.is_some_and(|e| Instant::now() >= e) => return Ok(None),
                None => {}
            }
        }
    }

    /// Sends `signal` to a background process's group.
    pub fn signal(&mut self, pid: u32, signal: i32) -> Result<()> {
        let r = self.agent(Operation::Exec)?.signal(pid, signal);
        r.map_err(|e| self.failed(e, self.opts.request_timeout, "signal", &pid.to_string()))
    }

    /// Whether something in the guest accepts TCP connections on `127.0.0.1:port` (one
    /// connection attempt by the agent, closed at once).
    pub fn listening(&mut self, port: u16) -> Result<bool> {
        let r = self.agent(Operation::Exec)?.port_open(port);
        r.map_err(|e| {
            self.failed(
                e,
                self.opts.request_timeout,
                "probe port",
                &port.to_string(),
            )
        })
    }

    /// Takes a background process's output since the previous call: (stdout, stderr, running).
    pub fn output(&mut self, pid: u32) -> Result<(Vec<u8>, Vec<u8>, bool)> {
        let r = self.agent(Operation::Exec)?.output(pid);
        let o = r.map_err(|e| {
            self.failed(
                e,
                self.opts.request_timeout,
                "read output of",
                &pid.to_string(),
            )
        })?;
        Ok((o.stdout, o.stderr, o.running))
    }
}
