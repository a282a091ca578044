//! Scenario 2, the coding agent (KVM tier, Linux guest): boot the guest, write a 300-file
//! project, start a dev server and get a page from it through `expose`, from the host; the
//! second request (the page again) is timed **cold** (boot and redo it all) against **dormant**
//! (`KvmSandbox::from_snapshot` of the standby snapshot until the page came back from the
//! still-running server through the exposed port; and, beside it, fetched inside the guest).
//! Skipped in `--quick` and without `/dev/kvm`.

use dormant::kvm::{GuestImage, KvmOptions, KvmSandbox};
use dormant::{Command, Sandbox};

use crate::Res;
use crate::aims;
use crate::ctx::Ctx;
use crate::ports::get;
use crate::stats::{Stats, fmt, ratio, time};
use crate::workloads::{linux_spec, sh};

const PROJECT: &str = "mkdir -p /root/proj/www && cd /root/proj && \
for m in 0 1 2 3 4 5 6 7 8 9; do mkdir -p src/mod$m; \
for f in 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29; do \
echo \"// module $m file $f\" > src/mod$m/f$f.rs; done; done; \
echo '<h1>dormant dev server</h1>' > www/index.html; ls -R src | grep -c '\\.rs$'";
const FETCH: &str = "for i in $(seq 1 100); do wget -qO- http://127.0.0.1:8080/index.html 2>/dev/null && exit 0; sleep 0.2; done; exit 1";

const TITLE: &str = "2. Coding agent (KVM tier, Linux guest)";

pub fn run(cx: &mut Ctx) -> Res<()> {
    if dormant::kvm::detect() == dormant::kvm::HostKvm::Unavailable {
        cx.report.section(TITLE, "");
        cx.report
            .note("Skipped: /dev/kvm is not available on this machine.");
        return Ok(());
    }
    cx.report.section(
        TITLE,
        "First request: boot the Linux guest (`KvmSandbox::boot`: new VM, kernel and initramfs, \
         Linux boots, the agent answers), write a project of 300 source files, start a dev \
         server (busybox `httpd`), wait until it answers inside the guest, and get a page from \
         it as the user opens it: from the host, through `expose(8080)` (from the boot call to \
         the page returned). Second request, get the page again: **cold** = boot and redo \
         everything; **dormant** = `KvmSandbox::from_snapshot` of the standby snapshot (new VM, \
         RAM and disk mapped copy-on-write, devices restored, agent connection adopted, the \
         exposed port listened on again) until the page came back from the still-running \
         server through the exposed port; beside it, the page fetched inside the guest with \
         `wget` after the same resume (a fork+exec in the guest).",
    );
    if cx.opts.quick {
        cx.report
            .note("Skipped in `--quick`: a cold boot of the Linux guest takes 1–3 minutes here.");
        return Ok(());
    }
    let image = match GuestImage::locate() {
        Ok(i) => i,
        Err(e) => {
            cx.report.note(&format!("Skipped: {e}"));
            return Ok(());
        }
    };
    let first = || -> Res<(KvmSandbox, String)> {
        let mut sb = KvmSandbox::boot(
            cx.kvm_store.clone(),
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
        // In the guest until the server answers (it has just started), then as the user
        // opens it: from the host, through the port `expose` gives.
        let inside = sh(&mut sb, FETCH)?;
        let addr = sb.ports()?.expose(8080, 0)?;
        let (_, _, page) = get(addr, "/index.html")
            .map_err(|e| format!("the page through expose, first request: {e}"))?;
        if page != inside.as_bytes() {
            return Err("the page through expose differs from the one fetched inside".into());
        }
        Ok((sb, format!("{} files; {inside}", files.trim())))
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
    // Dormant, alternately: the page through the exposed port (which the resumed sandbox
    // listens on again), and fetched inside the guest with wget.
    let (mut exposed, mut inside) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let (v, t) = time(|| -> Res<Vec<u8>> {
            let mut sb = KvmSandbox::from_snapshot(cx.kvm_store.clone(), &snap)?;
            let addr = sb
                .ports()?
                .exposed()
                .iter()
                .find(|m| m.guest_port == 8080)
                .map(|m| std::net::SocketAddr::from(([127, 0, 0, 1], m.host_port)))
                .ok_or("the resumed sandbox does not expose 8080")?;
            let (_, _, body) = get(addr, "/index.html")
                .map_err(|e| format!("the page through expose after a resume: {e}"))?;
            sb.kill()?;
            Ok(body)
        });
        assert!(page.ends_with(std::str::from_utf8(&v?)?));
        exposed.push(t);
        let (v, t) = time(|| -> Res<String> {
            let mut sb = KvmSandbox::from_snapshot(cx.kvm_store.clone(), &snap)?;
            let p = sh(&mut sb, FETCH)?;
            sb.kill()?;
            Ok(p)
        });
        assert!(page.ends_with(&v?));
        inside.push(t);
    }
    let (warm, inside) = (Stats::of(exposed), Stats::of(inside));
    let speedup = cold_t.as_secs_f64() / warm.median().as_secs_f64().max(1e-9);
    cx.report.aim(
        aims::CODING_SECOND_REQUEST,
        0,
        format!("{} ({speedup:.0}x faster than cold)", fmt(warm.median())),
        warm.median() <= std::time::Duration::from_millis(100) && speedup >= 200.0,
    );
    cx.report.table(
        &["request", "time", "cold ÷ this"],
        &[
            vec![
                "first request (boot + 300 files + dev server + page through expose)".into(),
                fmt(first_t),
                "".into(),
            ],
            vec![
                "second request, cold (boot and redo)".into(),
                fmt(cold_t),
                "1x".into(),
            ],
            vec![
                "second request, dormant (resume + page through expose)".into(),
                warm.cell(),
                ratio(cold_t, warm.median()),
            ],
            vec![
                "the same, the page fetched inside the guest (resume + wget)".into(),
                inside.cell(),
                ratio(cold_t, inside.median()),
            ],
        ],
    );
    cx.report.headline(
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
