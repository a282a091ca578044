//! The performance aims of issue 16, each beside the value this run measured: the scenarios
//! and the criterion section fill them in ([`Report::aim`](crate::markdown::Report::aim)),
//! `main` writes the table after the summary. An aim no scenario of this run measured (a
//! `--quick` run, a machine without KVM, `--scenario`) says so instead of a number.

/// One aim: what is measured, its value in the report the issue started from
/// (benches/REPORT.md of 2026-11-29), the aim, and how many values it has (two for "WASI /
/// Linux" rows, each filled by the scenario that measures it).
pub struct Aim {
    pub what: &'static str,
    pub then: &'static str,
    pub aim: &'static str,
    pub parts: usize,
}

pub const LINUX_FIRST_REPLY: usize = 0;
pub const LINUX_FIRST_EXEC: usize = 1;
pub const CODING_SECOND_REQUEST: usize = 2;
pub const KVM_TINY_RESUME: usize = 3;
pub const LINUX_CHECKPOINT_1MIB: usize = 4;
pub const WASI_RESUME_HANDLE: usize = 5;
pub const WASI_FIRST_RUN_CODE_PY: usize = 6;
pub const WASI_NEW_PROCESS: usize = 7;
pub const WASI_CHECKPOINT_SMALL_CELL: usize = 8;
pub const DISK_PER_IDLE_SESSION: usize = 9;
pub const FORK_100: usize = 10;

pub const AIMS: [Aim; 11] = [
    Aim {
        what: "Linux guest (128 MiB): resume → first agent reply (`exists`, scenario 3)",
        then: "181 ms",
        aim: "≤ 10 ms",
        parts: 1,
    },
    Aim {
        what: "Linux guest (128 MiB): resume → first command's exit code (`sh -c true`, \
               scenario 3)",
        then: "1.60 s",
        aim: "≤ 150 ms",
        parts: 1,
    },
    Aim {
        what: "coding agent second request: resume + page from the dev server (scenario 2)",
        then: "4.61 s",
        aim: "≤ 100 ms, ≥ 200x faster than cold",
        parts: 1,
    },
    Aim {
        what: "KVM tiny guest: new VM + state restore + first exit, 128 MiB → 2 GiB \
               (criterion `kvm_resume_tiny`)",
        then: "1.22 → 2.18 ms",
        aim: "≤ 1 ms, flat in RAM size",
        parts: 1,
    },
    Aim {
        what: "Linux guest checkpoint after 1 MiB dirtied, fsync included (without beside) \
               (scenario 4)",
        then: "13.5 ms",
        aim: "≤ 5 ms",
        parts: 1,
    },
    Aim {
        what: "WASI resume to handle, pandas session (criterion \
               `resume_in_process/python_pandas`)",
        then: "0.14 ms",
        aim: "≤ 0.05 ms",
        parts: 1,
    },
    Aim {
        what: "WASI resume → first `run_code` answer, Python API, in process (scenario 7)",
        then: "5.1 ms",
        aim: "≤ 1 ms",
        parts: 1,
    },
    Aim {
        what: "WASI new Python process: `import dormant` / resume → first answer (scenario 7)",
        then: "58 ms / 33 ms",
        aim: "≤ 20 ms / ≤ 15 ms",
        parts: 2,
    },
    Aim {
        what: "WASI incremental checkpoint after a small cell, no fsync (fsync beside) \
               (criterion `checkpoint_incremental`)",
        then: "~5 ms",
        aim: "≤ 1 ms",
        parts: 1,
    },
    Aim {
        what: "disk per idle Python session in standby, beyond the session it came from \
               (scenario 6)",
        then: "1.1 MiB",
        aim: "≤ 100 KiB",
        parts: 1,
    },
    Aim {
        what: "fork a running sandbox into 100 children, to all ready: WASI (criterion \
               `fork_python_pandas/100`) / Linux (scenario 5)",
        then: "56 ms / not measured",
        aim: "≤ 50 ms / ≤ 200 ms",
        parts: 2,
    },
];
