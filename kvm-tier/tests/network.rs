//! The guest's network end to end with the real Linux guest (busybox `wget` on the `minimal`
//! image): HTTP servers this test runs on the host's 127.0.0.1 are fetched through the VMM's
//! NAT when the sandbox's policy allows `host`, and refused at once when it does not; the
//! guest keeps its address and listening sockets across checkpoint, resume and fork, and a
//! fresh fetch works after each. Skipped with a message where /dev/kvm is missing.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dormant_core::{Command, LocalStore, NetworkPolicy, Sandbox, SandboxSpec};
use dormant_kvm::sandbox::KvmSandbox;

/// Guest RAM for the tests (boot time grows with it on PVM hosts).
const RAM: u64 = 128 << 20;
/// The file the host's HTTP server serves at `/file`.
const FILE: &str = "hello from the host's loopback\n";

/// The store shared by this run's sandboxes (its base snapshot is booted once).
fn store() -> &'static Arc<LocalStore> {
    static STORE: OnceLock<Arc<LocalStore>> = OnceLock::new();
    STORE.get_or_init(|| {
        let tmp = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
        for old in std::fs::read_dir(tmp).into_iter().flatten().flatten() {
            if old
                .file_name()
                .to_string_lossy()
                .starts_with("network-tests-")
            {
                let _ = std::fs::remove_dir_all(old.path());
            }
        }
        let dir = tmp.join(format!("network-tests-{}", std::process::id()));
        Arc::new(LocalStore::open(&dir).unwrap())
    })
}

fn create(policy: NetworkPolicy) -> KvmSandbox {
    // Generous deadlines: guest kernel code may be emulated on a busy host.
    let spec = SandboxSpec::linux()
        .image("minimal")
        .memory_limit(RAM)
        .call_timeout(Duration::from_secs(300))
        .network(policy);
    KvmSandbox::create(store().clone(), spec).unwrap_or_else(|e| panic!("create: {e}"))
}

fn sh(sb: &mut KvmSandbox, script: &str) -> (String, i32) {
    let out = sb.exec(&Command::new(["sh", "-c", script])).unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (text, out.exit_code)
}

/// A tiny HTTP/1.0 server on the host's 127.0.0.1: `/file` is [`FILE`], `/big/N` is N bytes.
/// Returns its port.
fn http_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            std::thread::spawn(move || {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16 << 10 {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&req);
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                let body: Vec<u8> = if path == "/file" {
                    FILE.as_bytes().to_vec()
                } else if let Some(n) = path.strip_prefix("/big/") {
                    let n: usize = n.parse().unwrap_or(0);
                    (0..n).map(|i| b'a' + (i % 26) as u8).collect()
                } else {
                    let _ = c.write_all(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n");
                    return;
                };
                let head = format!(
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n",
                    body.len()
                );
                let _ = c.write_all(head.as_bytes());
                let _ = c.write_all(&body);
            });
        }
    });
    port
}

/// `wget` of `url` in the guest, killed after 20 s (busybox wget's own `-T` crashes here):
/// (its output, its exit code).
fn wget(sb: &mut KvmSandbox, url: &str) -> (String, i32) {
    sh(sb, &format!("timeout 20 wget -q -O - {url} 2>&1"))
}

fn allow(entries: &[&str]) -> NetworkPolicy {
    NetworkPolicy::parse(entries, [""; 0]).unwrap()
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn the_guest_reaches_the_host_only_when_its_policy_allows_it() {
    let port = http_server();
    let url = format!("http://10.0.2.2:{port}/file");

    let mut open = create(allow(&["host"]));
    let (out, rc) = wget(&mut open, &url);
    assert_eq!((out.as_str(), rc), (FILE, 0));
    // A few MiB through the NAT, checked byte for byte by the guest.
    let n = 4 << 20;
    let (out, rc) = sh(
        &mut open,
        &format!("timeout 120 wget -q -O - http://10.0.2.2:{port}/big/{n} | wc -c"),
    );
    assert_eq!((out.trim(), rc), (n.to_string().as_str(), 0), "{out}");

    // Off (the default) and a policy without `host`: refused at once (a reset, not a
    // timeout), never a hang.
    for policy in [NetworkPolicy::off(), allow(&["192.0.2.1", "*"])] {
        let mut closed = create(policy.clone());
        let (out, rc) = wget(&mut closed, &url);
        assert_ne!(rc, 0, "{policy:?}: {out}");
        assert!(
            out.to_lowercase().contains("refused"),
            "{policy:?}: the fetch fails with a connection error: {out}"
        );
    }
    // The allowed one still works after them, by name too (the VMM answers the guest's DNS),
    // while a name the policy does not allow does not resolve.
    assert_eq!(wget(&mut open, &url).0, FILE);
    let by_name = format!("http://host.dormant.internal:{port}/file");
    assert_eq!(wget(&mut open, &by_name), (FILE.to_string(), 0));
    let (out, rc) = sh(&mut open, "nslookup example.com 2>&1");
    assert_ne!(rc, 0, "a denied name does not resolve: {out}");

    // The policy changes while the guest runs: refused at once, then allowed again.
    open.egress()
        .unwrap()
        .set_network(NetworkPolicy::off())
        .unwrap();
    let (out, rc) = wget(&mut open, &url);
    assert!(rc != 0 && out.to_lowercase().contains("refused"), "{out}");
    open.egress()
        .unwrap()
        .set_network(allow(&["host"]))
        .unwrap();
    assert_eq!(wget(&mut open, &url).0, FILE);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn the_guest_keeps_its_network_across_checkpoint_resume_and_fork() {
    let port = http_server();
    let url = format!("http://10.0.2.2:{port}/file");
    let mut sb = create(allow(&["host"]));
    let (addr, _) = sh(&mut sb, "ip -4 addr show eth0; ip route");
    assert!(addr.contains("10.0.2.15/24"), "{addr}");
    assert!(addr.contains("mtu 16384"), "the device's MTU: {addr}");
    assert!(addr.contains("default via 10.0.2.2"), "{addr}");
    assert_eq!(
        sb.read_file("/etc/resolv.conf").unwrap(),
        b"nameserver 10.0.2.3\n"
    );
    // A listening socket in the guest (port 7777 = 0x1E61) and a fetch before the checkpoint.
    sh(
        &mut sb,
        "nc -l -p 7777 >/dev/null 2>&1 </dev/null & sleep 1",
    );
    assert_eq!(wget(&mut sb, &url).0, FILE);
    let snap = sb.checkpoint().unwrap();
    drop(sb);

    let listening = |sb: &mut KvmSandbox| sh(sb, "cat /proc/net/tcp").0.contains(":1E61");
    let mut resumed = KvmSandbox::from_snapshot(store().clone(), &snap).unwrap();
    let (addr, _) = sh(&mut resumed, "ip -4 addr show eth0");
    assert!(addr.contains("10.0.2.15/24"), "{addr}");
    assert!(listening(&mut resumed), "the listening socket survived");
    assert_eq!(wget(&mut resumed, &url).0, FILE);

    // Each fork has its own NAT, under the same policy.
    let mut kids = resumed.fork(2).unwrap();
    for kid in &mut kids {
        assert!(listening(kid));
        assert_eq!(wget(kid, &url).0, FILE);
    }
    assert_eq!(wget(&mut resumed, &url).0, FILE);
}
