//! `dormant-bench-report`: dormant's end-to-end benchmark scenarios, timed through the public
//! API, written as one Markdown report. `scripts/bench.sh` runs it (after the criterion
//! micro-benchmarks, whose results it folds in); see `benches/README.md` for what every number
//! measures.
//!
//! ```text
//! dormant-bench-report [--quick] [--out FILE] [--store DIR] [--python PATH] [--criterion DIR]
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dormant::kvm::{GuestImage, KvmOptions, KvmSandbox};
use dormant::{
    Command, Grants, LocalStore, Sandbox, SandboxSpec, SnapshotId, Tier, Val, WasiRuntime,
    WasiSandbox, Workload,
};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// A module whose `touch(pages, value)` grows memory as needed and writes `value` into the
/// first byte of `pages` 4 KiB pages; `peek()` reads the first one back.
const TOUCH: &str = r#"(module
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

/// Scenario 1's first request: a 1,000,000-row table (`{rows}`), derived features, an answer.
const ANALYSIS: &str = "import numpy as np, pandas as pd
rng = np.random.default_rng(7)
n = {rows}
df = pd.DataFrame({'customer': rng.integers(0, 20000, n), 'amount': rng.gamma(2.0, 30.0, n), 'day': rng.integers(0, 365, n)})
df['weekday'] = df.day % 7
df['weekend'] = df.weekday >= 5
features = df.groupby('customer').agg(total=('amount', 'sum'), visits=('amount', 'size'), weekend_share=('weekend', 'mean'))
print(features.total.nlargest(5).index.tolist())";
/// Scenario 1's follow-up question.
const FOLLOW_UP: &str =
    "print(round(float(features[features.visits > 40].weekend_share.mean()), 4))";
/// A small session for fork fan-out and density.
const SMALL_SESSION: &str = "import numpy as np, pandas as pd
df = pd.DataFrame({'x': np.arange(200_000)})
state = {'turn': 0}";

struct Opts {
    quick: bool,
    out: PathBuf,
    store: PathBuf,
    python: Option<PathBuf>,
    criterion: PathBuf,
}

/// Timings of one measurement: median always, p90 from 10 samples, p99 from 100.
struct Stats(Vec<Duration>);

impl Stats {
    fn of(mut v: Vec<Duration>) -> Stats {
        v.sort();
        Stats(v)
    }
    fn pct(&self, p: f64) -> Duration {
        let i = ((self.0.len() as f64 - 1.0) * p).round() as usize;
        self.0[i.min(self.0.len() - 1)]
    }
    fn median(&self) -> Duration {
        self.pct(0.5)
    }
    fn cell(&self) -> String {
        let mut s = fmt(self.median());
        if self.0.len() >= 10 {
            let _ = write!(s, " (p90 {}", fmt(self.pct(0.9)));
            if self.0.len() >= 100 {
                let _ = write!(s, ", p99 {}", fmt(self.pct(0.99)));
            }
            s.push(')');
        }
        let _ = write!(s, " n={}", self.0.len());
        s
    }
}

fn fmt(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 1e-3 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{:.0} µs", s * 1e6)
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

fn ratio(a: Duration, b: Duration) -> String {
    format!("{:.0}x", a.as_secs_f64() / b.as_secs_f64().max(1e-9))
}

fn time<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let v = f();
    (v, t.elapsed())
}

/// The report being written: sections in order, and the summary table's rows.
#[derive(Default)]
struct Report {
    body: String,
    summary: Vec<[String; 3]>,
}

impl Report {
    fn section(&mut self, title: &str, method: &str) {
        let _ = write!(self.body, "\n## {title}\n\n{method}\n\n");
        eprintln!("==> {title}");
    }
    fn table(&mut self, head: &[&str], rows: &[Vec<String>]) {
        let _ = writeln!(self.body, "| {} |", head.join(" | "));
        let _ = writeln!(
            self.body,
            "|{}",
            head.iter().map(|_| "---|").collect::<String>()
        );
        for r in rows {
            let _ = writeln!(self.body, "| {} |", r.join(" | "));
        }
        self.body.push('\n');
    }
    fn note(&mut self, text: &str) {
        let _ = writeln!(self.body, "{text}\n");
        eprintln!("    {text}");
    }
    fn headline(&mut self, what: &str, value: String, how: &str) {
        eprintln!("    {what}: {value}");
        self.summary.push([what.into(), value, how.into()]);
    }
}

fn stored_bytes(store: &LocalStore, id: &SnapshotId) -> Res<u64> {
    Ok(store
        .list()?
        .into_iter()
        .find(|s| &s.id == id)
        .map(|s| s.stored_bytes)
        .unwrap_or(0))
}

/// Bytes the files under `dir` occupy on disk (allocated blocks, so sparse files count what
/// they hold).
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.blocks() * 512;
            }
        }
    }
    total
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

fn run_ok(sb: &mut WasiSandbox, code: &str) -> Res<String> {
    let ex = sb.run_code(code)?;
    if let Some(e) = ex.error {
        return Err(format!("{}: {}\n{}", e.name, e.value, e.traceback).into());
    }
    Ok(ex.stdout)
}

// ---------------------------------------------------------------------------------------
// Scenario 1: the data-analysis agent.

fn scenario_analysis(
    o: &Opts,
    rt: &WasiRuntime,
    store: &Arc<LocalStore>,
    r: &mut Report,
) -> Res<()> {
    let rows = if o.quick { 100_000 } else { 1_000_000 };
    let (cold_n, warm_n) = if o.quick { (1, 3) } else { (3, 10) };
    r.section(
        "1. Data-analysis agent (WASI tier)",
        &format!(
            "First request: `create` a Python sandbox, build a {rows}-row DataFrame, derive \
             per-customer features, answer (from the create call to the answer returned). \
             Second request, a follow-up question: **cold** = all of that again in a fresh \
             sandbox, then the follow-up; **dormant, in process** = `WasiRuntime::resume` of \
             the standby snapshot, then the follow-up; **dormant, new process** = spawning a \
             fresh host process that resumes the snapshot and answers the follow-up, timed \
             from spawn to its exit (process start and runtime start-up included)."
        ),
    );
    let analysis = ANALYSIS.replace("{rows}", &rows.to_string());
    let first = |rt: &WasiRuntime| -> Res<WasiSandbox> {
        let mut sb = rt.create(store.clone(), SandboxSpec::python())?;
        run_ok(&mut sb, &analysis)?;
        Ok(sb)
    };
    let (sb, first_t) = time(|| first(rt));
    let mut sb = sb?;
    let expected = run_ok(&mut sb, FOLLOW_UP)?;
    let snap = sb.standby()?;
    let mut cold = Vec::new();
    for _ in 0..cold_n {
        let (v, t) = time(|| -> Res<String> {
            let mut sb = first(rt)?;
            let a = run_ok(&mut sb, FOLLOW_UP)?;
            sb.kill()?;
            Ok(a)
        });
        assert_eq!(v?, expected);
        cold.push(t);
    }
    let mut warm = Vec::new();
    for _ in 0..warm_n {
        let (v, t) = time(|| -> Res<String> {
            let mut sb = rt.resume(store.clone(), &snap)?;
            run_ok(&mut sb, FOLLOW_UP)
        });
        assert_eq!(v?, expected);
        warm.push(t);
    }
    let exe = std::env::current_exe()?;
    let mut fresh = Vec::new();
    for _ in 0..warm_n.min(5) {
        let (out, t) = time(|| {
            std::process::Command::new(&exe)
                .args([
                    "child-wasi",
                    &o.store.display().to_string(),
                    &snap.to_string(),
                ])
                .output()
        });
        let out = out?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned().into());
        }
        assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
        fresh.push(t);
    }
    let (cold, warm, fresh) = (Stats::of(cold), Stats::of(warm), Stats::of(fresh));
    r.table(
        &["request", "time", "cold ÷ this"],
        &[
            vec![
                "first request (create + build + answer)".into(),
                fmt(first_t),
                "".into(),
            ],
            vec!["second request, cold".into(), cold.cell(), "1x".into()],
            vec![
                "second request, dormant, in process".into(),
                warm.cell(),
                ratio(cold.median(), warm.median()),
            ],
            vec![
                "second request, dormant, new process".into(),
                fresh.cell(),
                ratio(cold.median(), fresh.median()),
            ],
        ],
    );
    r.headline(
        "data-analysis follow-up: cold / resume in process / resume in new process",
        format!(
            "{} / {} / {} ({} and {} faster than cold)",
            fmt(cold.median()),
            fmt(warm.median()),
            fmt(fresh.median()),
            ratio(cold.median(), warm.median()),
            ratio(cold.median(), fresh.median())
        ),
        &format!("{rows} rows; scenario 1"),
    );
    Ok(())
}

fn child_wasi(store: &str, id: &str) -> Res<()> {
    let rt = WasiRuntime::new()?;
    let store = Arc::new(LocalStore::open(store)?);
    let mut sb = rt.resume(store, &id.parse()?)?;
    print!("{}", run_ok(&mut sb, FOLLOW_UP)?);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Scenario 2: the coding agent.

const PROJECT: &str = "mkdir -p /root/proj/www && cd /root/proj && \
for m in 0 1 2 3 4 5 6 7 8 9; do mkdir -p src/mod$m; \
for f in 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29; do \
echo \"// module $m file $f\" > src/mod$m/f$f.rs; done; done; \
echo '<h1>dormant dev server</h1>' > www/index.html; ls -R src | grep -c '\\.rs$'";
const FETCH: &str = "for i in $(seq 1 100); do wget -qO- http://127.0.0.1:8080/index.html 2>/dev/null && exit 0; sleep 0.2; done; exit 1";

fn sh(sb: &mut KvmSandbox, script: &str) -> Res<String> {
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

fn linux_spec(mib: u64) -> SandboxSpec {
    SandboxSpec::linux()
        .memory_limit(mib << 20)
        .call_timeout(Duration::from_secs(600))
}

fn scenario_coding(o: &Opts, store: &Arc<LocalStore>, r: &mut Report) -> Res<()> {
    r.section(
        "2. Coding agent (KVM tier, Linux guest)",
        "First request: boot the Linux guest (`KvmSandbox::boot`: new VM, kernel and initramfs, \
         Linux boots, the agent answers), write a project of 300 source files, start a dev \
         server (busybox `httpd`) and fetch a page from it inside the guest (from the boot call \
         to the page returned). Second request, fetch the page again: **cold** = boot and redo \
         everything; **dormant** = `KvmSandbox::from_snapshot` of the standby snapshot (new VM, \
         RAM and disk mapped copy-on-write, devices restored, agent connection adopted) until \
         the page came back from the still-running server.",
    );
    if o.quick {
        r.note("Skipped in `--quick`: a cold boot of the Linux guest takes 1–3 minutes here.");
        return Ok(());
    }
    let image = match GuestImage::locate() {
        Ok(i) => i,
        Err(e) => {
            r.note(&format!("Skipped: {e}"));
            return Ok(());
        }
    };
    let first = || -> Res<(KvmSandbox, String)> {
        let mut sb = KvmSandbox::boot(
            store.clone(),
            &image,
            linux_spec(128),
            KvmOptions::default(),
        )?;
        let files = sh(&mut sb, PROJECT)?;
        sb.spawn(&Command::new([
            "httpd",
            "-f",
            "-p",
            "8080",
            "-h",
            "/root/proj/www",
        ]))?;
        let page = sh(&mut sb, FETCH)?;
        Ok((sb, format!("{} files; {page}", files.trim())))
    };
    let (v, first_t) = time(first);
    let (mut sb, page) = v?;
    let snap = sb.standby()?;
    let (v, cold_t) = time(|| -> Res<String> {
        let (mut sb, p) = first()?;
        sb.kill()?;
        Ok(p)
    });
    assert_eq!(v?, page);
    let mut warm = Vec::new();
    for _ in 0..5 {
        let (v, t) = time(|| -> Res<String> {
            let mut sb = KvmSandbox::from_snapshot(store.clone(), &snap)?;
            let p = sh(&mut sb, FETCH)?;
            sb.kill()?;
            Ok(p)
        });
        assert!(page.ends_with(&v?));
        warm.push(t);
    }
    let warm = Stats::of(warm);
    r.table(
        &["request", "time", "cold ÷ this"],
        &[
            vec![
                "first request (boot + 300 files + dev server + fetch)".into(),
                fmt(first_t),
                "".into(),
            ],
            vec![
                "second request, cold (boot and redo)".into(),
                fmt(cold_t),
                "1x".into(),
            ],
            vec![
                "second request, dormant (resume + fetch)".into(),
                warm.cell(),
                ratio(cold_t, warm.median()),
            ],
        ],
    );
    r.headline(
        "coding-agent second request: cold boot / resume",
        format!(
            "{} / {} ({} faster)",
            fmt(cold_t),
            fmt(warm.median()),
            ratio(cold_t, warm.median())
        ),
        "128 MiB guest; scenario 2",
    );
    drop(sb);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Scenarios 3 and 4 (WASI side): resume vs touched memory, checkpoint vs dirtied memory.

fn touch_sandbox(rt: &WasiRuntime, store: &Arc<LocalStore>, module: &Path) -> Res<WasiSandbox> {
    Ok(rt.create(
        store.clone(),
        SandboxSpec::new(
            Tier::Wasi,
            Workload::Module {
                path: module.to_path_buf(),
            },
        ),
    )?)
}

fn scenario_resume_vs_memory(
    o: &Opts,
    rt: &WasiRuntime,
    store: &Arc<LocalStore>,
    kvm_store: &Arc<LocalStore>,
    module: &Path,
    r: &mut Report,
) -> Res<()> {
    r.section(
        "3. Resume latency vs memory size",
        "WASI: a module that wrote one byte into every 4 KiB page of N MiB of linear memory, \
         checkpointed; **resume** = `WasiRuntime::resume_with` (granting the module file) \
         called until the handle returned; \
         **resume → first call** = until its first export call (reading memory) returned. \
         KVM, tiny guest: criterion group `kvm_resume_tiny` below (new VM over the RAM image \
         mapped copy-on-write, full state restore, first guest exit). KVM, Linux guest (full \
         run only): `KvmSandbox::from_snapshot` until the first file operation \
         (`exists(\"/root\")`, one agent round trip) returned, and until the first `exec` \
         returned (a guest fork+exec, slow where guest kernel code is emulated).",
    );
    let sizes: &[u32] = if o.quick {
        &[16, 64]
    } else {
        &[16, 64, 256, 1024]
    };
    let n = if o.quick { 10 } else { 30 };
    let mut rows = Vec::new();
    let mut medians = Vec::new();
    for &m in sizes {
        let mut sb = touch_sandbox(rt, store, module)?;
        sb.call("touch", &[Val::I32((m * 256) as i32), Val::I32(7)])?;
        let snap = sb.standby()?;
        let grants = Grants::new().module(module);
        let (mut resume, mut first) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let t = Instant::now();
            let mut sb = rt.resume_with(store.clone(), &snap, &grants)?;
            resume.push(t.elapsed());
            let v = sb.call("peek", &[])?;
            first.push(t.elapsed());
            assert!(matches!(v.first(), Some(Val::I32(7))));
        }
        let (resume, first) = (Stats::of(resume), Stats::of(first));
        medians.push(resume.median());
        rows.push(vec![
            format!("WASI, {m} MiB touched"),
            resume.cell(),
            first.cell(),
        ]);
    }
    if !o.quick && dormant::kvm::detect() != dormant::kvm::HostKvm::Unavailable {
        for ram in [128u64, 512, 2048] {
            let mut sb = match KvmSandbox::create(kvm_store.clone(), linux_spec(ram)) {
                Ok(sb) => sb,
                Err(e) => {
                    r.note(&format!("Linux guest skipped: {e}"));
                    break;
                }
            };
            let snap = sb.standby()?;
            let (mut file_op, mut exec) = (Vec::new(), Vec::new());
            for _ in 0..5 {
                let t = Instant::now();
                let mut sb = KvmSandbox::from_snapshot(kvm_store.clone(), &snap)?;
                assert!(sb.exists("/root")?);
                file_op.push(t.elapsed());
                sh(&mut sb, "true")?;
                exec.push(t.elapsed());
                sb.kill()?;
            }
            rows.push(vec![
                format!("KVM Linux, {ram} MiB guest RAM"),
                format!("to first file op {}", Stats::of(file_op).cell()),
                format!("to first exec {}", Stats::of(exec).cell()),
            ]);
        }
    }
    r.table(&["sandbox", "resume", "resume → first call"], &rows);
    if let (Some(lo), Some(hi)) = (medians.first(), medians.last()) {
        r.headline(
            "WASI resume, smallest vs largest memory",
            format!(
                "{} at {} MiB vs {} at {} MiB",
                fmt(*lo),
                sizes[0],
                fmt(*hi),
                sizes[sizes.len() - 1]
            ),
            "scenario 3 (flat is the aim)",
        );
    }
    Ok(())
}

fn scenario_checkpoint_cost(
    o: &Opts,
    rt: &WasiRuntime,
    store: &Arc<LocalStore>,
    kvm_store: &Arc<LocalStore>,
    module: &Path,
    r: &mut Report,
) -> Res<()> {
    r.section(
        "4. Checkpoint cost vs dirtied memory",
        "WASI: a module with 257 MiB of touched memory, checkpointed once; then N MiB are \
         written again (a new value in every 4 KiB page) and `checkpoint()` is timed from the \
         call to the durable snapshot id (fsync included); bytes = what that incremental \
         snapshot stored. KVM (full run only): a 128 MiB Linux guest writes N MiB (`dd if=/dev/zero`) into its \
         tmpfs, then `checkpoint()` (vCPU and devices quiesced, dirty pages and disk blocks \
         written, guest resumed); bytes = RAM + disk delta.",
    );
    let sizes: &[u32] = if o.quick {
        &[1, 16]
    } else {
        &[1, 4, 16, 64, 256]
    };
    let reps = if o.quick { 3 } else { 5 };
    let mut sb = touch_sandbox(rt, store, module)?;
    sb.call("touch", &[Val::I32(257 * 256), Val::I32(1)])?;
    sb.checkpoint()?;
    let mut rows = Vec::new();
    let mut value = 2;
    for &m in sizes {
        let (mut times, mut bytes) = (Vec::new(), 0);
        for _ in 0..reps {
            value = value % 250 + 2;
            sb.call("touch", &[Val::I32((m * 256) as i32), Val::I32(value)])?;
            let (id, t) = time(|| sb.checkpoint());
            let id = id?;
            times.push(t);
            bytes = stored_bytes(store, &id)?;
        }
        rows.push(vec![
            format!("WASI, {m} MiB dirtied"),
            Stats::of(times).cell(),
            mib(bytes),
        ]);
    }
    sb.kill()?;
    if !o.quick && dormant::kvm::detect() != dormant::kvm::HostKvm::Unavailable {
        // The 128 MiB base snapshot of scenario 3: no extra boot.
        match KvmSandbox::create(kvm_store.clone(), linux_spec(128)) {
            Ok(mut sb) => {
                sb.checkpoint()?;
                for m in [1u32, 4, 16] {
                    let mut times = Vec::new();
                    let mut bytes = 0;
                    for i in 0..3 {
                        sh(
                            &mut sb,
                            &format!("dd if=/dev/zero of=/tmp/d{i} bs=1M count={m} 2>/dev/null"),
                        )?;
                        let (id, t) = time(|| sb.checkpoint());
                        times.push(t);
                        bytes = stored_bytes(kvm_store, &id?)?;
                        sh(&mut sb, &format!("rm /tmp/d{i}"))?;
                    }
                    rows.push(vec![
                        format!("KVM Linux, {m} MiB dirtied"),
                        Stats::of(times).cell(),
                        mib(bytes),
                    ]);
                }
                sb.kill()?;
            }
            Err(e) => r.note(&format!("Linux guest skipped: {e}")),
        }
    }
    r.table(&["dirtied", "checkpoint", "bytes stored"], &rows);
    if let Some(first) = rows.first() {
        r.headline(
            "incremental checkpoint after 1 MiB dirtied (WASI)",
            format!("{}, {}", first[1], first[2]),
            "scenario 4",
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Scenarios 5 and 6: fork fan-out, density.

fn scenario_fork(o: &Opts, rt: &WasiRuntime, store: &Arc<LocalStore>, r: &mut Report) -> Res<()> {
    r.section(
        "5. Fork fan-out",
        "A pandas session (200,000-row DataFrame, checkpointed once) is forked into N \
         children: time from the `fork(N)` call (which takes an incremental checkpoint of the \
         parent) to all N children returned, ready to run. Then each child changes one variable and checkpoints; bytes per child = the mean \
         of what those child snapshots stored.",
    );
    let mut parent = rt.create(store.clone(), SandboxSpec::python())?;
    run_ok(&mut parent, SMALL_SESSION)?;
    // The first checkpoint of a session writes its whole image: not part of a fork's cost.
    parent.checkpoint()?;
    let fan: &[usize] = if o.quick { &[1, 10] } else { &[1, 10, 100] };
    let mut rows = Vec::new();
    for &n in fan {
        let (kids, t) = time(|| parent.fork(n));
        let mut kids = kids?;
        let mut bytes = 0;
        for (i, k) in kids.iter_mut().enumerate() {
            run_ok(k, &format!("state['turn'] = {i}"))?;
            let id = k.checkpoint()?;
            bytes += stored_bytes(store, &id)?;
        }
        rows.push(vec![format!("{n}"), fmt(t), mib(bytes / n as u64)]);
        for mut k in kids {
            k.kill()?;
        }
    }
    r.table(&["children", "fork → all ready", "bytes per child"], &rows);
    r.headline(
        "fork fan-out to all ready",
        rows.iter()
            .map(|r| format!("{}: {}", r[0], r[1]))
            .collect::<Vec<_>>()
            .join(", "),
        "scenario 5",
    );
    parent.kill()?;
    Ok(())
}

fn scenario_density(
    o: &Opts,
    rt: &WasiRuntime,
    store: &Arc<LocalStore>,
    r: &mut Report,
) -> Res<()> {
    let n: usize = if o.quick { 100 } else { 1000 };
    r.section(
        "6. Density",
        &format!(
            "{n} Python sandboxes in standby: forks of one small pandas session, each of which \
             changed a variable and went to standby (its handle kept in this process). Bytes \
             on disk = blocks allocated under the store by them (their snapshots, layered on \
             the parent's); resident memory = this process's RSS with all {n} in standby minus \
             its RSS before they existed, and per sandbox the growth from the first half of \
             them to all (what each more standby costs, without the one-off rise of the heap \
             while the first forks ran); resume = `WasiRuntime::resume` of one of them picked \
             at random, until its first `run_code` answered."
        ),
    );
    let mut parent = rt.create(store.clone(), SandboxSpec::python())?;
    run_ok(&mut parent, SMALL_SESSION)?;
    parent.checkpoint()?;
    let disk_before = disk_usage(&o.store);
    let rss_before = rss_bytes();
    // Forks in batches of up to 100, the first half of the sandboxes in whole batches.
    let batch = 100.min(n / 2);
    let mut rss_half = None;
    let (kids, t_all) = time(|| -> Res<Vec<(WasiSandbox, SnapshotId)>> {
        let mut out = Vec::new();
        while out.len() < n {
            let k = batch.min(n - out.len());
            for mut c in parent.fork(k)? {
                run_ok(&mut c, &format!("state['turn'] = {}", out.len()))?;
                let id = c.standby()?;
                out.push((c, id));
            }
            if rss_half.is_none() && out.len() >= n / 2 {
                rss_half = Some((out.len(), rss_bytes()));
            }
        }
        Ok(out)
    });
    let kids = kids?;
    let rss_after = rss_bytes();
    let (half, rss_half) = rss_half.unwrap_or((0, rss_before));
    let per_more = rss_after.saturating_sub(rss_half) / (n - half).max(1) as u64;
    let disk = disk_usage(&o.store).saturating_sub(disk_before);
    let mut resumes = Vec::new();
    for _ in 0..if o.quick { 10 } else { 30 } {
        let (_, id) = &kids[rand_index(kids.len())];
        let (v, t) = time(|| -> Res<String> {
            let mut sb = rt.resume(store.clone(), id)?;
            run_ok(&mut sb, "print(state['turn'] >= 0)")
        });
        assert_eq!(v?, "True\n");
        resumes.push(t);
    }
    let resumes = Stats::of(resumes);
    // What of the growth the standby handles themselves hold (rather than heap the allocator
    // kept after the children's live instances were freed): RSS once they are dropped too.
    for (mut k, _) in kids {
        let _ = k.kill();
    }
    let rss_dropped = rss_bytes();
    let per_held = rss_after.saturating_sub(rss_dropped) / n as u64;
    r.table(
        &[
            "sandboxes in standby",
            "made in",
            "bytes on disk (per sandbox)",
            "host RSS growth",
            "per sandbox (growth from the first half to all)",
            "RSS freed by dropping the handles (per sandbox)",
            "resume one at random → answer",
        ],
        &[vec![
            n.to_string(),
            fmt(t_all),
            format!("{} ({})", mib(disk), mib(disk / n as u64)),
            mib(rss_after.saturating_sub(rss_before)),
            format!("{} KiB", per_more / 1024),
            format!(
                "{} ({} KiB)",
                mib(rss_after.saturating_sub(rss_dropped)),
                per_held / 1024
            ),
            resumes.cell(),
        ]],
    );
    r.headline(
        &format!("density: {n} sandboxes in standby"),
        format!(
            "{} on disk each; host RSS +{} KiB each ({} in all), {} KiB each freed by dropping \
             the handles; resume one at random {}",
            mib(disk / n as u64),
            per_more / 1024,
            mib(rss_after.saturating_sub(rss_before)),
            per_held / 1024,
            fmt(resumes.median())
        ),
        "scenario 6",
    );
    parent.kill()?;
    Ok(())
}

fn rand_index(len: usize) -> usize {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    (h.finish() % len as u64) as usize
}

// ---------------------------------------------------------------------------------------
// Scenario 7: the Python bindings' overhead.

const PY_SIDE: &str = r#"
import statistics, sys, time
import dormant
store, snap, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
resume, first = [], []
for _ in range(n):
    t = time.perf_counter()
    sb = dormant.Sandbox.resume(snap, store=store, idle_standby=None)
    resume.append(time.perf_counter() - t)
    out = sb.run_code("print(len(df))").stdout
    first.append(time.perf_counter() - t)
    assert out == "200000\n", out
    sb.kill()
print(statistics.median(resume), statistics.median(first))
"#;

fn scenario_python(o: &Opts, rt: &WasiRuntime, store: &Arc<LocalStore>, r: &mut Report) -> Res<()> {
    r.section(
        "7. Overhead of the Python bindings",
        "The same pandas session snapshot resumed through the Rust API (`WasiRuntime::resume`, \
         then `run_code`) and through the Python module (`dormant.Sandbox.resume`, then \
         `run_code`, in a Python process that imported dormant beforehand): time to the \
         handle, and to the first `run_code` result. Medians, side by side in one run.",
    );
    let Some(py) = &o.python else {
        r.note(
            "Skipped: no Python with the dormant module (`--python`; scripts/bench.sh sets it up).",
        );
        return Ok(());
    };
    let mut sb = rt.create(store.clone(), SandboxSpec::python())?;
    run_ok(&mut sb, SMALL_SESSION)?;
    let snap = sb.standby()?;
    let n = if o.quick { 10 } else { 30 };
    let (mut resume, mut first) = (Vec::new(), Vec::new());
    let mut rust_side = |k: usize| -> Res<()> {
        for _ in 0..k {
            let t = Instant::now();
            let mut sb = rt.resume(store.clone(), &snap)?;
            resume.push(t.elapsed());
            assert_eq!(run_ok(&mut sb, "print(len(df))")?, "200000\n");
            first.push(t.elapsed());
            sb.kill()?;
        }
        Ok(())
    };
    // Half of the Rust samples before the Python run and half after, so that neither side
    // alone enjoys a warmer machine.
    rust_side(n / 2)?;
    let out = std::process::Command::new(py)
        .args([
            "-c",
            PY_SIDE,
            &o.store.display().to_string(),
            &snap.to_string(),
            &n.to_string(),
        ])
        .output()?;
    rust_side(n - n / 2)?;
    if !out.status.success() {
        return Err(format!("python side: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace().map(|s| s.parse::<f64>());
    let (Some(Ok(py_resume)), Some(Ok(py_first))) = (it.next(), it.next()) else {
        return Err(format!("python side printed {text:?}").into());
    };
    let (py_resume, py_first) = (
        Duration::from_secs_f64(py_resume),
        Duration::from_secs_f64(py_first),
    );
    let (resume, first) = (Stats::of(resume), Stats::of(first));
    let over =
        |p: Duration, r: Duration| format!("{:+.2} ms", (p.as_secs_f64() - r.as_secs_f64()) * 1e3);
    r.table(
        &["", "Rust API", "Python module", "Python − Rust"],
        &[
            vec![
                "resume → handle".into(),
                resume.cell(),
                fmt(py_resume),
                over(py_resume, resume.median()),
            ],
            vec![
                "resume → first run_code result".into(),
                first.cell(),
                fmt(py_first),
                over(py_first, first.median()),
            ],
        ],
    );
    r.headline(
        "resume → first run_code, Rust vs Python",
        format!("{} vs {}", fmt(first.median()), fmt(py_first)),
        "scenario 7",
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Criterion results and the report's frame.

/// `(benchmark id, median, 95% interval)` of every criterion estimate under `dir`.
fn criterion_results(dir: &Path) -> Vec<(String, f64, f64, f64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n == "new") {
                    let est = p.join("estimates.json");
                    let Ok(text) = std::fs::read_to_string(&est) else {
                        continue;
                    };
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
                        continue;
                    };
                    let m = &v["median"];
                    let id = p
                        .parent()
                        .and_then(|b| b.strip_prefix(dir).ok())
                        .map(|b| b.display().to_string())
                        .unwrap_or_default();
                    let f = |k: &str| m[k].as_f64().unwrap_or(f64::NAN);
                    let ci = &m["confidence_interval"];
                    let g = |k: &str| ci[k].as_f64().unwrap_or(f64::NAN);
                    out.push((id, f("point_estimate"), g("lower_bound"), g("upper_bound")));
                } else if p.file_name().is_none_or(|n| n != "report") {
                    stack.push(p);
                }
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn machine() -> BTreeMap<&'static str, String> {
    let cmd = |c: &str, a: &[&str]| {
        std::process::Command::new(c)
            .args(a)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| format!("{:.1} GiB", kb as f64 / (1 << 20) as f64))
        .unwrap_or_default();
    let lock = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock"))
        .unwrap_or_default();
    let version = |name: &str| {
        let key = format!("name = \"{name}\"\nversion = \"");
        lock.find(&key)
            .map(|i| {
                lock[i + key.len()..]
                    .split('"')
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
            .unwrap_or_else(|| "?".into())
    };
    let mut m = BTreeMap::new();
    m.insert("date (UTC)", cmd("date", &["-u", "+%Y-%m-%d %H:%M"]));
    m.insert("host", cmd("uname", &["-srm"]));
    m.insert(
        "CPU",
        format!(
            "{cpu}, {} cores",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        ),
    );
    m.insert("memory", mem);
    m.insert("KVM", format!("{:?}", dormant::kvm::detect()));
    m.insert("rustc", cmd("rustc", &["--version"]));
    m.insert(
        "versions",
        format!(
            "dormant {}, wasmtime {}, kvm-ioctls {}, pyo3 {}",
            env!("CARGO_PKG_VERSION"),
            version("wasmtime"),
            version("kvm-ioctls"),
            version("pyo3")
        ),
    );
    m
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("child-wasi") {
        if let Err(e) = child_wasi(&args[2], &args[3]) {
            eprintln!("child: {e}");
            std::process::exit(1);
        }
        return;
    }
    let mut o = Opts {
        quick: false,
        out: PathBuf::from("target/bench-report.md"),
        store: PathBuf::from("target/dormant-bench-store"),
        python: None,
        criterion: PathBuf::from("target/criterion"),
    };
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let mut val = || {
            it.next().cloned().unwrap_or_else(|| {
                eprintln!("{a} needs a value");
                std::process::exit(2)
            })
        };
        match a.as_str() {
            "--quick" => o.quick = true,
            "--out" => o.out = val().into(),
            "--store" => o.store = val().into(),
            "--python" => o.python = Some(val().into()),
            "--criterion" => o.criterion = val().into(),
            _ => {
                eprintln!(
                    "usage: dormant-bench-report [--quick] [--out FILE] [--store DIR] [--python PATH] [--criterion DIR]"
                );
                std::process::exit(2);
            }
        }
    }
    if let Err(e) = run(&o) {
        eprintln!("dormant-bench-report: {e}");
        std::process::exit(1);
    }
}

fn run(o: &Opts) -> Res<()> {
    let started = Instant::now();
    // WASI scenarios use a fresh store each run; Linux base snapshots live beside it and are
    // kept, so that reruns skip the boots (scenario 2 always boots: that is what it measures).
    let _ = std::fs::remove_dir_all(&o.store);
    let store = Arc::new(LocalStore::open(&o.store)?);
    let rt = WasiRuntime::new()?;
    rt.prepare_python()?;
    let tmp = tempfile::tempdir()?;
    let module = tmp.path().join("touch.wasm");
    std::fs::write(&module, wat::parse_str(TOUCH)?)?;
    let mut r = Report::default();
    scenario_analysis(o, &rt, &store, &mut r)?;
    let kvm_store = Arc::new(LocalStore::open(o.store.with_extension("linux"))?);
    if dormant::kvm::detect() == dormant::kvm::HostKvm::Unavailable {
        r.section("2. Coding agent (KVM tier, Linux guest)", "");
        r.note("Skipped: /dev/kvm is not available on this machine.");
    } else {
        scenario_coding(o, &kvm_store, &mut r)?;
    }
    scenario_resume_vs_memory(o, &rt, &store, &kvm_store, &module, &mut r)?;
    scenario_checkpoint_cost(o, &rt, &store, &kvm_store, &module, &mut r)?;
    scenario_fork(o, &rt, &store, &mut r)?;
    scenario_density(o, &rt, &store, &mut r)?;
    scenario_python(o, &rt, &store, &mut r)?;

    let crit = criterion_results(&o.criterion);
    let tiny = |mib: &str| {
        crit.iter()
            .find(|c| c.0 == format!("kvm_resume_tiny/{mib}MiB"))
            .map(|c| fmt(Duration::from_secs_f64(c.1 / 1e9)))
    };
    if let (Some(lo), Some(hi)) = (tiny("128"), tiny("2048")) {
        r.headline(
            "KVM tiny-guest resume (new VM + restore + first exit), 128 MiB vs 2 GiB RAM",
            format!("{lo} vs {hi}"),
            "criterion `kvm_resume_tiny`",
        );
    }
    r.section(
        "Criterion micro-benchmarks",
        "Medians with their 95% confidence interval, from the criterion groups \
         `scripts/bench.sh` ran just before this report (what each measures: the header of \
         `benches/benches/<group>.rs` and `benches/README.md`).",
    );
    if crit.is_empty() {
        r.note("None found (run through scripts/bench.sh).");
    } else {
        let rows: Vec<Vec<String>> = crit
            .iter()
            .map(|(id, m, lo, hi)| {
                let d = |ns: f64| fmt(Duration::from_secs_f64(ns / 1e9));
                vec![format!("`{id}`"), d(*m), format!("{} – {}", d(*lo), d(*hi))]
            })
            .collect();
        r.table(&["benchmark", "median", "95% interval"], &rows);
    }

    let mut doc = String::new();
    let _ = writeln!(
        doc,
        "# dormant benchmark report{}\n",
        if o.quick { " (--quick smoke run)" } else { "" }
    );
    let _ = writeln!(
        doc,
        "Generated by `scripts/bench.sh{}` in {:.0} s. Every comparison below is measured side by \
         side in this run; each section says from which call to which event its times run. \
         Times are medians (p90 from 10 samples, p99 from 100; `n` = samples).\n",
        if o.quick { " --quick" } else { "" },
        started.elapsed().as_secs_f64()
    );
    let _ = writeln!(doc, "| machine | |\n|---|---|");
    for (k, v) in machine() {
        let _ = writeln!(doc, "| {k} | {v} |");
    }
    let _ = writeln!(
        doc,
        "\n## Summary\n\n| what | dormant | notes |\n|---|---|---|"
    );
    for [a, b, c] in &r.summary {
        let _ = writeln!(doc, "| {a} | {b} | {c} |");
    }
    let _ = writeln!(
        doc,
        "\nPublished figures of other systems, for orientation only (not measured here): \
         Blaxel resumes in < 25 ms, E2B in ~1 s (their product pages), Firecracker restores a \
         snapshot in ~4 ms (Firecracker's snapshotting documentation)."
    );
    doc.push_str(&r.body);
    if let Some(parent) = o.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&o.out, &doc)?;
    eprintln!(
        "==> report written to {} ({:.0} s)",
        o.out.display(),
        started.elapsed().as_secs_f64()
    );
    println!("{doc}");
    Ok(())
}
