//! The call types of the sandbox contract: what `run_code` and `exec` take and give.
//!
//! It names only [`crate::results`] (which names only a reader of `crate::snapshot`), so the contract ([`crate::sandbox`]) and the
//! capability traits ([`crate::capability`]) can both name it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::results::RichResult;

/// An exception raised by code run in an interpreter session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutionError {
    /// The exception's type name, e.g. `ZeroDivisionError`.
    pub name: String,
    /// Its message (`str(exc)`).
    pub value: String,
    /// The formatted traceback.
    pub traceback: String,
}

/// What one `run_code` produced.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Execution {
    /// What the cell printed; a final expression's `repr` is printed too, as a notebook shows it.
    pub stdout: String,
    pub stderr: String,
    /// `None` when the code ran to completion.
    pub error: Option<ExecutionError>,
    /// The cell's rich results, in the order they were made: each matplotlib figure shown with
    /// `plt.show()` as it was called, then the final expression's value (the one with
    /// `is_main_result`, when the value is not `None`), then each figure left open at the end
    /// (figures are closed after the cell, also when it raised). Empty when the interpreter
    /// predates rich results (a session snapshotted by an older dormant). Left out of the
    /// serde form when empty, so encodings without results keep their bytes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub results: Vec<RichResult>,
}

/// A command for `exec`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Command {
    /// `argv[0]` names the program (for the WASI tier: a `.wasm` command module in the sandbox).
    pub argv: Vec<String>,
    /// Extra environment variables for this command (after the sandbox's own).
    pub env: Vec<(String, String)>,
    /// Bytes fed to standard input.
    pub stdin: Vec<u8>,
    /// Deadline for this command; the sandbox's call timeout when `None`.
    pub timeout: Option<Duration>,
    /// Working directory (absolute guest path); the tier's default when `None`. The WASI tier
    /// refuses it (`Error::Unsupported`).
    pub cwd: Option<String>,
    /// `argv` is one shell script, run by the guest's shell: `bash -c` where the image has
    /// bash, else `sh -c` (see [`Command::shell`]). The WASI tier has no shell and refuses it
    /// (`Error::Unsupported`).
    pub shell: bool,
}

impl Command {
    pub fn new<I, S>(argv: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Command {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }

    /// A shell command line (`git clone … && cd app`), run by the guest's shell: `/bin/bash
    /// -c` where the image has bash (the Debian images), else `/bin/sh -c` (busybox).
    pub fn shell(script: impl Into<String>) -> Command {
        Command {
            argv: vec![script.into()],
            shell: true,
            ..Default::default()
        }
    }

    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.stdin = data.into();
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn cwd(mut self, dir: impl Into<String>) -> Self {
        self.cwd = Some(dir.into());
        self
    }
}

/// What `exec` produced. A non-zero exit code is a result, not an error.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: i32,
}
