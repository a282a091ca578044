//! `dormant demo coding`: a coding agent's session in a Linux microVM on the `coding` image.
//!
//! The app is a small Python web service kept in a git repository inside the sandbox, served by
//! a background process. Three ways to the first answer, timed side by side:
//! 1. cold: a new sandbox on the `coding` image, the agent writes the app, commits it, starts the
//!    server, waits for it, and the host fetches a page through `expose` (the server listens on
//!    the guest's 127.0.0.1; the sandbox has no outbound network);
//! 2. from the template `dormant-demo-shop` (the same steps, prepared once and cached by
//!    content hash): a new sandbox from it, and the page;
//! 3. the sandbox of (1) after standby, resumed **in a new host process**, and the page.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dormant::{
    Command, Error, Grants, LocalStore, Ready, Result, Sandbox, SandboxSpec, SnapshotId, Template,
    Tier,
};

const APP: &str = r#"import http.server, json, subprocess

HEAD = subprocess.run(["git", "-C", "/root/app", "log", "-1", "--format=%h %s"],
                      capture_output=True, text=True).stdout.strip()

class Shop(http.server.BaseHTTPRequestHandler):
    hits = 0
    def do_GET(self):
        Shop.hits += 1
        body = json.dumps({"service": "shop-api", "hits": Shop.hits, "commit": HEAD}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", 8000), Shop).serve_forever()
"#;
const SETUP: &str = "cd /root/app && git init -q && git add -A && \
     git -c user.name=agent -c user.email=agent@example.com commit -qm 'shop-api: first version'";
const START: &str = "exec python3 /root/app/main.py";
const WAIT: &str = "for i in $(seq 600); do curl -sf -o /dev/null http://127.0.0.1:8000/ && exit 0; sleep 0.2; done; exit 1";
/// Guest RAM of the demo's sandboxes.
const RAM: u64 = 512 << 20;
/// Generous: guest kernel code is emulated on PVM hosts.
const TIMEOUT: Duration = Duration::from_secs(600);

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

/// The page, fetched by this host process from the guest's port 8000 exposed on the host's
/// loopback (`expose` gives the address it has, or exposes it: after a resume the port is
/// exposed again from the snapshot).
fn fetch(sb: &mut dyn Sandbox) -> Result<String> {
    use std::io::{Read, Write};
    let addr = sb.ports()?.expose(8000, 0)?;
    let failed = |e: std::io::Error| {
        Error::runtime_at(
            "fetch the page through the exposed port",
            format!("GET http://{addr}/"),
            e,
        )
    };
    let mut conn = std::net::TcpStream::connect(addr).map_err(failed)?;
    conn.set_read_timeout(Some(TIMEOUT)).map_err(failed)?;
    write!(conn, "GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(failed)?;
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).map_err(failed)?;
    let answer = String::from_utf8_lossy(&answer);
    match answer.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.0 200") => Ok(body.trim().to_string()),
        _ => Err(Error::runtime(
            "fetch the page through the exposed port",
            format!("GET http://{addr}/ answered: {answer}"),
        )),
    }
}

fn shell(sb: &mut dyn Sandbox, script: &str) -> Result<String> {
    let mut cmd = Command::shell(script);
    cmd.timeout = Some(TIMEOUT);
    let out = sb.exec(&cmd)?;
    if out.exit_code != 0 {
        return Err(Error::runtime(
            "run a command in the demo sandbox",
            format!(
                "{script}: exit {}: {}{}",
                out.exit_code,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs the story; skipped (with the reason printed) where the KVM tier cannot run or the
/// `coding` image cannot be built (not root).
pub fn run() -> Result<()> {
    if matches!(dormant::kvm::detect(), dormant::kvm::HostKvm::Unavailable) {
        println!("dormant demo coding: skipped: no usable /dev/kvm on this host");
        return Ok(());
    }
    let store = Arc::new(LocalStore::open_default()?);
    println!(
        "dormant demo coding: a coding agent's dev server in a Linux microVM (image \"coding\") · store {}",
        store.root().display()
    );
    let spec = SandboxSpec::linux()
        .image("coding")
        .memory_limit(RAM)
        .call_timeout(TIMEOUT);

    println!("\ntemplate dormant-demo-shop (the app written, committed, its server started, once)");
    let t = Instant::now();
    let tpl = Template::new("dormant-demo-shop", Tier::Kvm)
        .image("coding")
        .memory_limit(RAM)
        .call_timeout(TIMEOUT)
        .file("/root/app/main.py", APP)
        .run(SETUP)
        .start(START)
        .ready(Ready::Port(8000));
    let built = match tpl.build(store.clone()) {
        Err(e @ Error::RuntimeMissing { .. }) => {
            println!("  skipped: the coding image cannot be built here: {e}");
            return Ok(());
        }
        r => r?,
    };
    let t_template = secs(t);
    println!(
        "  {} in {t_template:.1} s (snapshot {})",
        if built.built {
            "built (booting the image the first time)"
        } else {
            "reused from the store"
        },
        built.record.snapshot
    );

    println!(
        "\nrequest 1, cold: new sandbox, write the app, commit it, start the server, first page"
    );
    let t_cold = Instant::now();
    let t = Instant::now();
    let bar = crate::progress_bar::Bar::new();
    let sb = dormant::runtime(Tier::Kvm)?.create_with_progress(store.clone(), spec, &bar);
    bar.finish();
    let mut sb = sb?;
    let t_create = secs(t);
    let t = Instant::now();
    sb.write_file("/root/app/main.py", APP.as_bytes())?;
    shell(&mut *sb, SETUP)?;
    let mut start = Command::shell(START);
    start.timeout = Some(TIMEOUT);
    sb.processes()?.spawn(&start)?;
    shell(&mut *sb, WAIT)?;
    let t_work = secs(t);
    let t = Instant::now();
    let page = fetch(&mut *sb)?;
    let t_page = secs(t);
    let cold = secs(t_cold);
    println!("  {page}");
    println!(
        "  create {t_create:.2} s + app, commit, server up {t_work:.1} s + page {t_page:.1} s = {cold:.1} s"
    );

    println!("\nrequest 1 from the template: a new sandbox from dormant-demo-shop, first page");
    let t = Instant::now();
    let mut from_tpl = dormant::create_from_template(store.clone(), &tpl.name, &Grants::new())?;
    let t_fork = secs(t);
    let t = Instant::now();
    let page = fetch(&mut *from_tpl)?;
    let t_tpl_page = secs(t);
    println!("  {page}");
    println!("  create from template {t_fork:.2} s + page {t_tpl_page:.1} s");
    from_tpl.kill()?;

    let t = Instant::now();
    let snap = sb.standby()?;
    println!(
        "\nstandby of the cold sandbox: snapshot {snap} in {:.2} s; VM released",
        secs(t)
    );

    println!("\nrequest 2: a new host process resumes the sandbox and fetches the page again");
    let t = Instant::now();
    let resumed = crate::resume_in_child("demo-coding-resume", &snap, &store, "RESUME_TO_PAGE_S ")?;
    let child_wall = secs(t);

    println!("\nsummary (one run; medians are in the benchmarks)");
    let row = |what: &str, s: f64| println!("  {what:<66} {s:>8.2} s");
    row(
        "cold: new sandbox + app + commit + server + first page",
        cold,
    );
    row(
        "from the template: create + first page",
        t_fork + t_tpl_page,
    );
    row(
        "new process: resume + page (inside the child process)",
        resumed,
    );
    row(
        "new process: spawn to exit, as the parent saw it",
        child_wall,
    );
    println!(
        "  cold / new-process resume: {:.1}x; cold / from the template: {:.1}x",
        cold / resumed,
        cold / (t_fork + t_tpl_page)
    );
    store.delete(&snap)?;
    Ok(())
}

/// The child process of request 2: resumes `id` and fetches the page.
pub fn resume(id: &str) -> Result<()> {
    let t0 = Instant::now();
    let id = SnapshotId::parse(id).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let store = Arc::new(LocalStore::open_default()?);
    let t = Instant::now();
    let mut sb = dormant::resume(store, &id, &Grants::new())?;
    let t_resume = secs(t);
    let t = Instant::now();
    let page = fetch(&mut *sb)?;
    let t_page = secs(t);
    println!("  {page}");
    println!(
        "  resume {:.1} ms + page {t_page:.2} s (the server kept running: hits counted on, same commit)",
        t_resume * 1e3
    );
    println!("RESUME_TO_PAGE_S {:.4}", secs(t0));
    sb.kill()?;
    Ok(())
}
