//! Scenario 9, exposed ports (KVM tier): a busybox `httpd` on the guest's loopback, reached
//! from the host through `expose`. Request latency (a small page, a new connection per request:
//! busybox `httpd` closes after each answer) and throughput (an 8 MiB file) through the
//! forwarded port; then connect-to-first-byte of a request to a `Managed` sandbox asleep after
//! its idle time (the connection wakes it) beside the same request to it running. Skipped in
//! `--quick` and without `/dev/kvm`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use dormant::kvm::KvmSandbox;
use dormant::{Command, Managed, Ports, Sandbox, State};

use crate::Res;
use crate::ctx::Ctx;
use crate::stats::{Stats, fmt, ratio, time};
use crate::workloads::linux_spec;

const TITLE: &str = "9. Exposed ports: host → guest TCP (KVM tier)";
const PAGE: &[u8] = b"<html><body>hello from the guest</body></html>\n";
const BIG_MIB: usize = 8;
const IDLE: Duration = Duration::from_secs(1);

/// A GET of `path` on a new connection: the time to the first byte of the answer and to its
/// end, and the bytes of the body.
pub fn get(addr: SocketAddr, path: &str) -> Res<(Duration, Duration, Vec<u8>)> {
    let t = Instant::now();
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: guest\r\n\r\n")?;
    let mut first = [0u8; 1];
    s.read_exact(&mut first)?;
    let t_first = t.elapsed();
    let mut out = first.to_vec();
    s.read_to_end(&mut out)?;
    let t_end = t.elapsed();
    let at = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("an answer without headers")?;
    Ok((t_first, t_end, out.split_off(at + 4)))
}

pub fn run(cx: &mut Ctx) -> Res<()> {
    cx.report.section(
        TITLE,
        "A 128 MiB `minimal` guest runs busybox `httpd` on its `127.0.0.1:8080`; `expose(8080)` \
         gives a host port. **Request**: a GET of a 48-byte page from the host, connect to the \
         end of the answer, a new connection each time (busybox `httpd` closes after each \
         answer; each connection is a new vsock connection and a `connect_tcp` in the guest). \
         **Throughput**: a GET of an 8 MiB file, connect to the last byte. Beside each, the same \
         bytes read with `read_file` (one agent request over vsock, no TCP): what the guest and \
         the channel cost by themselves. **Wake on traffic**: \
         the same sandbox under `Managed` with a 1 s idle time: connect to the first byte of a \
         small GET sent while it is in standby (the connection resumes it), beside the same \
         request to it running.",
    );
    if dormant::kvm::detect() == dormant::kvm::HostKvm::Unavailable {
        cx.report
            .note("Skipped: /dev/kvm is not available on this machine.");
        return Ok(());
    }
    if cx.opts.quick {
        cx.report
            .note("Skipped in `--quick`: it needs the Linux guest's base boot (minutes here).");
        return Ok(());
    }
    let mut sb = KvmSandbox::create(cx.kvm_store.clone(), linux_spec(128))?;
    sb.write_file("/var/www/index.html", PAGE)?;
    // Written from the host: generating it in the guest is slow where guest kernel code is
    // emulated.
    let big_file: Vec<u8> = (0..BIG_MIB << 20).map(|i| (i * 7 % 251) as u8).collect();
    sb.write_file("/var/www/big.bin", &big_file)?;
    sb.spawn(&Command::new([
        "httpd",
        "-f",
        "-p",
        "127.0.0.1:8080",
        "-h",
        "/var/www",
    ]))?;
    let t = Instant::now();
    while !sb.listening(8080)? {
        if t.elapsed() > Duration::from_secs(300) {
            return Err("httpd did not start in the guest".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let addr = sb.expose(8080, 0)?;

    // Small requests, then the large file.
    // Beside each, the same bytes read with the files API (one agent request over vsock, no
    // TCP): what the guest and the vsock channel cost by themselves.
    let (mut small, mut small_api) = (Vec::new(), Vec::new());
    for _ in 0..30 {
        let (_, end, body) = get(addr, "/index.html")?;
        if body != PAGE {
            return Err("the page came back different".into());
        }
        small.push(end);
        let (r, t) = time(|| sb.read_file("/var/www/index.html"));
        if r? != PAGE {
            return Err("read_file gave another page".into());
        }
        small_api.push(t);
    }
    let (small, small_api) = (Stats::of(small), Stats::of(small_api));
    let (mut big, mut big_api) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let (_, end, body) = get(addr, "/big.bin")?;
        if body != big_file {
            return Err("the large file came back different".into());
        }
        big.push(end);
        let (r, t) = time(|| sb.read_file("/var/www/big.bin"));
        if r? != big_file {
            return Err("read_file gave another large file".into());
        }
        big_api.push(t);
    }
    let (big, big_api) = (Stats::of(big), Stats::of(big_api));
    let mib_s = |d: Duration| BIG_MIB as f64 / d.as_secs_f64();

    // Wake on traffic, beside the running sandbox (interleaved samples).
    let m = Managed::new(sb, Some(IDLE));
    let (mut asleep, mut awake) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let (first, _, _) = get(addr, "/index.html")?;
        awake.push(first);
        let t = Instant::now();
        while m.state() != State::Standby {
            if t.elapsed() > Duration::from_secs(300) {
                return Err("the managed sandbox did not go to standby".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let wakes = m.stats().wakes;
        let (first, _, body) = get(addr, "/index.html")?;
        if body != PAGE || m.stats().wakes != wakes + 1 {
            return Err("the request did not wake the sandbox".into());
        }
        asleep.push(first);
    }
    let (asleep, awake) = (Stats::of(asleep), Stats::of(awake));
    m.kill()?;

    cx.report.table(
        &["what", "time", "notes"],
        &[
            vec![
                "small GET through expose (connect to end of answer)".into(),
                small.cell(),
                "48-byte page, new connection".into(),
            ],
            vec![
                "the same page with read_file (one agent request, no TCP)".into(),
                small_api.cell(),
                "".into(),
            ],
            vec![
                format!("{BIG_MIB} MiB GET through expose"),
                big.cell(),
                format!("{:.2} MiB/s", mib_s(big.median())),
            ],
            vec![
                "the same file with read_file (one agent request, no TCP)".into(),
                big_api.cell(),
                format!("{:.2} MiB/s", mib_s(big_api.median())),
            ],
            vec![
                "connect to first byte, sandbox running".into(),
                awake.cell(),
                "1x".into(),
            ],
            vec![
                "connect to first byte, sandbox in standby (woken by the connection)".into(),
                asleep.cell(),
                format!(
                    "{} the running case",
                    ratio(asleep.median(), awake.median())
                ),
            ],
        ],
    );
    cx.report.headline(
        "exposed port: small request / throughput / first byte after standby",
        format!(
            "{} / {:.2} MiB/s / {}",
            fmt(small.median()),
            mib_s(big.median()),
            fmt(asleep.median())
        ),
        "128 MiB guest; scenario 9",
    );
    Ok(())
}
