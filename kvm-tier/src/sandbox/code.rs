//! `run_code` in the microVM: a cell in the guest agent's persistent Python interpreter (the
//! agent's `run_code` request, `kvm-tier/agent/PROTOCOL.md`), with the same [`Execution`] as the
//! WASI tier and the host-side bounds of `exec`.

use std::time::{Duration, Instant};

use dormant_agent::client::ClientError;
use dormant_agent::proto::{MAX_DATA, RUN_CODE_OUTPUT_MAX, Request, error_kind};
use dormant_core::lifecycle::Operation;
use dormant_core::{Error, Execution, ExecutionError, Result, RichResult};

use super::{EXEC_GRACE, KvmSandbox, REQUEST_CAP};

/// Code longer than this may take a request's bound to send (the guest grants vsock credit
/// as it reads); shorter code goes out at once.
const LARGE_CODE: usize = 64 << 10;
/// The image a sandbox runs when its spec names none.
const DEFAULT_IMAGE: &str = "minimal";

impl KvmSandbox {
    /// Runs `code` as one cell in the guest's Python session (see [`Sandbox::run_code`] for
    /// the contract and `KvmSandbox`'s implementation for what is particular to this tier).
    ///
    /// [`Sandbox::run_code`]: dormant_core::Sandbox::run_code
    pub(super) fn run_cell(&mut self, code: &str, timeout: Option<Duration>) -> Result<Execution> {
        self.lifecycle.check(Operation::RunCode)?;
        if code.len() > MAX_DATA {
            return Err(Error::InvalidArgument(format!(
                "run_code takes at most {MAX_DATA} bytes of code on the KVM tier, not {}",
                code.len()
            )));
        }
        let limit = timeout.unwrap_or(self.spec.call_timeout);
        let output_limit = self.spec.output_limit.min(RUN_CODE_OUTPUT_MAX);
        // As for `exec`: the agent interrupts the cell at `limit` and answers; the host gives it
        // EXEC_GRACE more, plus, for code larger than one vsock credit window, the bound of a
        // request to send it (as `exec` does for its stdin).
        let mut bound = limit.saturating_add(EXEC_GRACE);
        if code.len() > LARGE_CODE {
            bound = bound.saturating_add(self.opts.request_timeout.saturating_mul(REQUEST_CAP));
        }
        let req = Request::RunCode {
            timeout_ms: Some(u64::try_from(limit.as_millis()).unwrap_or(u64::MAX)),
            output_limit: Some(u64::try_from(output_limit).unwrap_or(u64::MAX)),
            reseed: self.reseed,
        };
        let client = self.agent(Operation::RunCode)?;
        let stream = client.get_mut();
        // A quiet cell is fine until its timeout.
        stream.set_read_timeout(None);
        stream.set_deadline(Instant::now().checked_add(bound));
        let r = client.run_code_request(&req, code);
        let out = match r {
            Ok(out) => {
                // The agent ran the cell, so it reseeded if asked.
                self.reseed = false;
                out
            }
            Err(e) if e.is_not_found() => return Err(self.no_python()),
            Err(e) if e.agent_kind() == Some(error_kind::UNSUPPORTED) => {
                return Err(Error::Unsupported {
                    op: "run_code",
                    what: "this sandbox's guest agent, which predates run_code (create the \
                           sandbox anew from an image built with this version)"
                        .into(),
                });
            }
            Err(ClientError::Agent { kind, message }) => {
                return Err(Error::runtime(
                    "run code in the guest",
                    format!("the guest agent answered {kind}: {message}"),
                ));
            }
            Err(e) => return Err(self.failed(e, limit, "run_code", "python3")),
        };
        if out.timed_out {
            return Err(Error::Deadline {
                limit,
                last_good: self.lifecycle.last_good().cloned(),
            });
        }
        for (over, stream) in [(out.stdout_over, "stdout"), (out.stderr_over, "stderr")] {
            if over {
                return Err(Error::OutputLimit {
                    stream,
                    limit: output_limit,
                });
            }
        }
        if out.results_over {
            return Err(Error::OutputLimit {
                stream: "rich results",
                limit: MAX_DATA,
            });
        }
        // The record comes from the guest: decoded under its caps.
        let results = if out.results.is_empty() {
            Vec::new()
        } else {
            RichResult::decode_list(&out.results)
                .map_err(|e| Error::runtime("read the cell's rich results", e))?
        };
        Ok(Execution {
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            error: out.error.map(|e| ExecutionError {
                name: e.name,
                value: e.value,
                traceback: e.traceback,
            }),
            results,
        })
    }

    /// `run_code` on an image without `python3`.
    fn no_python(&self) -> Error {
        let image = self.spec.image.as_deref().unwrap_or(DEFAULT_IMAGE);
        Error::Unsupported {
            op: "run_code",
            what: format!(
                "the {image:?} image: this image has no python3; create the sandbox with \
                 image=\"coding\" (or any image with python3)"
            ),
        }
    }
}
