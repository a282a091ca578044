//! Scenario 9, the guest's network through the NAT (KVM tier, Linux guest, policy
//! `allow=["host"]`, busybox tools on the `minimal` image, servers on the host's 127.0.0.1
//! reached as `10.0.2.2`): guest→host throughput (`nc` sends 4 MiB, timed by the host server
//! from its first byte to the last), host→guest throughput (`wget` of 4 MiB, timed by the host
//! server from the request to the guest's close), and new connections (one `wget` fetching a
//! tiny file from 20 URLs in turn, each over a new connection: the host server's time between
//! consecutive accepts, i.e. connection setup through the NAT plus one small request and
//! answer). Skipped in `--quick` and without `/dev/kvm`.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dormant::NetworkPolicy;
use dormant::kvm::KvmSandbox;

use crate::Res;
use crate::ctx::Ctx;
use crate::stats::{Stats, fmt};
use crate::workloads::{linux_spec, sh};

const TITLE: &str = "10. Guest network through the NAT (KVM tier, Linux guest)";
/// Bytes moved each way per run.
const BULK: usize = 4 << 20;
/// New connections per `wget` run.
const FETCHES: usize = 20;

pub fn run(cx: &mut Ctx) -> Res<()> {
    cx.report.section(
        TITLE,
        "A sandbox with `network=NetworkPolicy(allow=[\"host\"])` talks to servers on the host's \
         127.0.0.1 through the VMM's virtio-net device and userspace NAT (`10.0.2.2` in the \
         guest). **guest→host**: busybox `nc` sends 4 MiB of zeros; the host server times it \
         from its first byte to the last. **host→guest**: busybox `wget -O /dev/null` of \
         4 MiB; the host server times it from the request to the guest's close. **new \
         connection + small fetch**: one `wget` given 20 URLs fetches a 31-byte file over a new \
         connection each; the host server's time between consecutive accepts (connection \
         setup through the NAT, one request and its answer, wget's own per-URL work). Guest \
         kernel code is emulated on PVM hosts: these numbers are the guest's TCP stack at that \
         speed, not the NAT's ceiling.",
    );
    if dormant::kvm::detect() == dormant::kvm::HostKvm::Unavailable {
        cx.report
            .note("Skipped: /dev/kvm is not available on this machine.");
        return Ok(());
    }
    if cx.opts.quick {
        cx.report.note("Skipped in `--quick`.");
        return Ok(());
    }
    let policy = NetworkPolicy::parse(["host"], [""; 0])?;
    let mut sb = KvmSandbox::create(cx.kvm_store.clone(), linux_spec(128).network(policy))?;

    let (mut up, mut down, mut conn) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        let (port, took) = upload_server()?;
        sh(
            &mut sb,
            &format!("head -c {BULK} /dev/zero | nc 10.0.2.2 {port} >/dev/null"),
        )?;
        up.push(took.recv_timeout(Duration::from_secs(600))??);

        let (port, took) = download_server()?;
        sh(
            &mut sb,
            &format!("wget -q -O /dev/null http://10.0.2.2:{port}/big"),
        )?;
        down.push(took.recv_timeout(Duration::from_secs(600))??);

        let (port, accepts) = small_server()?;
        let urls: Vec<String> = (0..FETCHES)
            .map(|i| format!("http://10.0.2.2:{port}/f{i}"))
            .collect();
        sh(&mut sb, &format!("wget -q -O /dev/null {}", urls.join(" ")))?;
        let mut times = Vec::new();
        while times.len() < FETCHES {
            times.push(accepts.recv_timeout(Duration::from_secs(600))?);
        }
        conn.extend(times.windows(2).map(|w| w[1] - w[0]));
    }
    drop(sb);
    let rate = |d: Duration| {
        format!(
            "{:.1} MiB/s",
            BULK as f64 / (1 << 20) as f64 / d.as_secs_f64()
        )
    };
    let (up, down, conn) = (Stats::of(up), Stats::of(down), Stats::of(conn));
    cx.report.table(
        &["what", "time", "throughput"],
        &[
            vec![
                "guest→host, 4 MiB (`nc`)".into(),
                up.cell(),
                rate(up.median()),
            ],
            vec![
                "host→guest, 4 MiB (`wget`)".into(),
                down.cell(),
                rate(down.median()),
            ],
            vec![
                "new connection + small fetch, per fetch".into(),
                conn.cell(),
                String::new(),
            ],
        ],
    );
    cx.report.headline(
        "guest network through the NAT: guest→host / host→guest; per new connection",
        format!(
            "{} / {}; {}",
            rate(up.median()),
            rate(down.median()),
            fmt(conn.median())
        ),
        "128 MiB guest, busybox nc/wget; scenario 10",
    );
    Ok(())
}

type Took = mpsc::Receiver<std::io::Result<Duration>>;

fn listen() -> Res<(TcpListener, u16)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    Ok((l, port))
}

/// Takes one connection and times its [`BULK`] bytes from the first to the last.
fn upload_server() -> Res<(u16, Took)> {
    let (l, port) = listen()?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = (|| {
            let (mut c, _) = l.accept()?;
            let mut buf = vec![0u8; 256 << 10];
            let mut got = c.read(&mut buf)?;
            let start = Instant::now();
            while got < BULK {
                match c.read(&mut buf)? {
                    0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                    n => got += n,
                }
            }
            Ok(start.elapsed())
        })();
        let _ = tx.send(r);
    });
    Ok((port, rx))
}

/// Answers one HTTP request with [`BULK`] bytes; times it from the request to the client's
/// close.
fn download_server() -> Res<(u16, Took)> {
    let (l, port) = listen()?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = (|| {
            let (mut c, _) = l.accept()?;
            read_request(&mut c)?;
            let start = Instant::now();
            c.write_all(format!("HTTP/1.0 200 OK\r\nContent-Length: {BULK}\r\n\r\n").as_bytes())?;
            let chunk = vec![b'x'; 256 << 10];
            for _ in 0..BULK / chunk.len() {
                c.write_all(&chunk)?;
            }
            // wget closes once it has the whole body.
            let mut rest = [0u8; 64];
            while c.read(&mut rest)? > 0 {}
            Ok(start.elapsed())
        })();
        let _ = tx.send(r);
    });
    Ok((port, rx))
}

/// Answers [`FETCHES`] requests with a 31-byte file, one connection each; sends the instant of
/// each accept.
fn small_server() -> Res<(u16, mpsc::Receiver<Instant>)> {
    let (l, port) = listen()?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for _ in 0..FETCHES {
            let Ok((mut c, _)) = l.accept() else { return };
            let _ = tx.send(Instant::now());
            if read_request(&mut c).is_ok() {
                let _ = c.write_all(
                    b"HTTP/1.0 200 OK\r\nContent-Length: 31\r\n\r\nhello from the host's loopback\n",
                );
            }
        }
    });
    Ok((port, rx))
}

fn read_request(c: &mut std::net::TcpStream) -> std::io::Result<()> {
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match c.read(&mut buf)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => req.extend_from_slice(&buf[..n]),
        }
        if req.len() > 16 << 10 {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
    }
    Ok(())
}
