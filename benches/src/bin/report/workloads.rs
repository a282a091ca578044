//! The workloads several scenarios share and the calls that drive them: the `touch` module
//! (memory of a chosen size, scenarios 3 and 4), the small pandas session (fork fan-out,
//! density, Python overhead), the Linux guest's spec, and `run_ok` / `sh`, which run code or a
//! shell script and turn a failure inside the sandbox into an error.

use std::path::Path;
use std::time::Duration;

use dormant::kvm::KvmSandbox;
use dormant::{Command, Sandbox, SandboxSpec, WasiSandbox};

use crate::Res;

/// A module whose `touch(pages, value)` grows memory as needed and writes `value` into the
/// first byte of `pages` 4 KiB pages; `peek()` reads the first one back.
pub const TOUCH: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "touch") (param $pages i32) (param $v i32) (local $i i32) (local $need i32)
    (local.set $need (i32.sub (i32.add (i32.div_u (local.get $pages) (i32.const 16)) (i32.const 1))
                              (memory.size)))
    (if (i32.gt_s (local.get $need) (i32.const 0))
      (then (drop (memory.grow (local.get $need)))))
    (loop $l
      (i32.store8 (i32.mul (local.get $i) (i32.const 4096)) (local.get $v))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (local.get $pages)))))
  (func (export "peek") (result i32) (i32.load8_u (i32.const 0))))"#;

/// A small session for fork fan-out and density.
pub const SMALL_SESSION: &str = "import numpy as np, pandas as pd
df = pd.DataFrame({'x': np.arange(200_000)})
state = {'turn': 0}";

pub fn run_ok(sb: &mut WasiSandbox, code: &str) -> Res<String> {
    let ex = sb.run_code(code)?;
    if let Some(e) = ex.error {
        return Err(format!("{}: {}\n{}", e.name, e.value, e.traceback).into());
    }
    Ok(ex.stdout)
}

pub fn sh(sb: &mut KvmSandbox, script: &str) -> Res<String> {
    let out = sb.exec(&Command::new(["sh", "-c", script]))?;
    if out.exit_code != 0 {
        return Err(format!(
            "`{script}` exited {}: {}",
            out.exit_code,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn linux_spec(mib: u64) -> SandboxSpec {
    SandboxSpec::linux()
        .image("minimal")
        .memory_limit(mib << 20)
        .call_timeout(Duration::from_secs(600))
}

/// Runs `py -c script args…` to its end and returns the first `n` whitespace-separated numbers
/// it printed (the Python sides of scenarios 7 and 11 print their timings so). A failed run is
/// an error with its stderr, fewer numbers one with what it printed; `what` names it in both.
pub fn python_numbers(
    py: &Path,
    script: &str,
    args: &[&str],
    n: usize,
    what: &str,
) -> Res<Vec<f64>> {
    let out = std::process::Command::new(py)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()?;
    if !out.status.success() {
        return Err(format!("{what}: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<f64> = text
        .split_whitespace()
        .take(n)
        .map_while(|s| s.parse().ok())
        .collect();
    if v.len() < n {
        return Err(format!("{what}: the Python side printed {text:?}").into());
    }
    Ok(v)
}
