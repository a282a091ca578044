//! `dormant-agent`: the guest agent binary. See the library docs and `PROTOCOL.md`.
//!
//! ```text
//! dormant-agent [--vsock PORT]   listen on AF_VSOCK (any CID), default port 1024
//! dormant-agent --unix PATH      listen on a Unix socket (host-side tests)
//! ```

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::time::Duration;

use dormant_agent::proto::DEFAULT_PORT;
use dormant_agent::server::{ProcessTable, serve_socket};

const USAGE: &str = "usage: dormant-agent [--vsock PORT | --unix PATH]";

#[derive(Debug, Clone)]
enum Mode {
    Vsock(u32),
    Unix(String),
}

fn parse_args() -> Result<Mode, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => Ok(Mode::Vsock(DEFAULT_PORT)),
        [flag, port] if flag == "--vsock" => port
            .parse()
            .map(Mode::Vsock)
            .map_err(|_| format!("bad vsock port {port:?}\n{USAGE}")),
        [flag, path] if flag == "--unix" => Ok(Mode::Unix(path.clone())),
        [flag] if flag == "--version" => {
            println!("dormant-agent {}", env!("CARGO_PKG_VERSION"));
            std::process::exit(0);
        }
        _ => Err(USAGE.to_string()),
    }
}

/// A listening AF_VSOCK stream socket.
#[derive(Debug)]
struct VsockListener {
    fd: OwnedFd,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl VsockListener {
    fn bind(port: u32) -> io::Result<Self> {
        // SAFETY: plain syscall without pointers.
        let raw = cvt(unsafe {
            libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0)
        })?;
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_port = port;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        // SAFETY: `addr` is a valid sockaddr_vm and its exact size is passed.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        })?;
        // SAFETY: plain syscall on a descriptor we own.
        cvt(unsafe { libc::listen(fd.as_raw_fd(), 64) })?;
        Ok(Self { fd })
    }

    fn accept(&self) -> io::Result<File> {
        loop {
            // SAFETY: null address pointers are allowed (peer address not wanted).
            let r = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            match cvt(r) {
                // SAFETY: accept4 returned a fresh descriptor that nothing else owns.
                Ok(fd) => return Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) })),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

fn serve<S, F>(mut accept: F, table: &'static ProcessTable)
where
    S: io::Read + io::Write + std::os::fd::AsFd + Send + 'static,
    F: FnMut() -> io::Result<S>,
{
    loop {
        match accept() {
            Ok(stream) => {
                let spawned = std::thread::Builder::new()
                    .name("conn".into())
                    .spawn(move || {
                        if let Err(e) = serve_socket(stream, table) {
                            eprintln!("dormant-agent: connection ended: {e}");
                        }
                    });
                if let Err(e) = spawned {
                    eprintln!("dormant-agent: cannot start a connection thread: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("dormant-agent: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn listen_and_serve(mode: &Mode, table: &'static ProcessTable) -> io::Result<()> {
    match mode {
        Mode::Vsock(port) => {
            let listener = VsockListener::bind(*port)?;
            eprintln!("dormant-agent ready on vsock port {port}");
            serve(|| listener.accept(), table);
        }
        Mode::Unix(path) => {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            let listener = UnixListener::bind(path)?;
            eprintln!("dormant-agent ready on unix socket {path}");
            serve(|| listener.accept().map(|(s, _)| s), table);
        }
    }
    Ok(())
}

fn main() {
    let mode = match parse_args() {
        Ok(mode) => mode,
        Err(msg) => {
            eprintln!("{msg}");
            std::process::exit(2);
        }
    };
    let pid1 = std::process::id() == 1;
    // The environment children inherit (requests' `env` adds to it): a login environment.
    for (key, value) in [
        (
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        ),
        ("HOME", "/root"),
        ("LANG", "C.UTF-8"),
    ] {
        if pid1 || std::env::var_os(key).is_none() {
            // SAFETY: no other thread exists yet (the reaper and connection threads start
            // below), so nothing reads the environment concurrently.
            unsafe { std::env::set_var(key, value) };
        }
    }
    if pid1 && std::env::set_current_dir("/root").is_err() {
        let _ = std::env::set_current_dir("/");
    }
    if pid1 && let Err(e) = dormant_agent::netcfg::configure() {
        eprintln!("dormant-agent: network set-up: {e}");
    }
    let table = ProcessTable::global();
    loop {
        if let Err(e) = listen_and_serve(&mode, table) {
            eprintln!("dormant-agent: cannot listen on {mode:?}: {e}");
            if !pid1 {
                std::process::exit(1);
            }
            // PID 1 must not exit (the kernel would panic): retry.
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}
