//! `connect_tcp`: the host's exposed ports. The agent connects to a TCP port on the guest's
//! loopback, answers `ok`, and from then on the connection is a byte pipe spliced both ways
//! with that socket, one thread per direction:
//!
//! - back-pressure: each direction moves at most [`PIPE_CHUNK`] bytes at a time with blocking
//!   writes, so a side that stops reading stops the other side's sender (no buffer grows);
//! - half-close: end of file one way shuts down the writing half of the other socket, so a
//!   client that closes its sending side still gets the server's answer;
//! - failure: a read error (a reset, the host going away) shuts both sockets down completely,
//!   which ends the other direction too; nothing is left hanging. A write error stops only
//!   its own direction (it stops reading): the socket it could not write to is broken, so
//!   the other direction reads what that socket still holds (a server's answer written
//!   before it closed with the upload unread), passes it on, then gets the error and ends
//!   both.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv6Addr, Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::time::Duration;

use super::reply::Failure;
use crate::proto::error_kind;

/// Bytes each direction of a pipe moves at a time (its whole buffer).
pub const PIPE_CHUNK: usize = 64 << 10;
/// Longest the connection to the guest port may take (a loopback refusal is immediate).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to `port` on `127.0.0.1`, else on `[::1]` when the first refuses. `hangup` is the
/// request's connection, which must be a socket to be spliced.
pub(super) fn connect(port: u16, hangup: Option<RawFd>) -> Result<TcpStream, Failure> {
    if hangup.is_none() {
        return Err(Failure::reply(
            error_kind::UNSUPPORTED,
            "connect_tcp needs a socket connection to splice",
        ));
    }
    if port == 0 {
        return Err(Failure::reply(error_kind::INVALID, "TCP port 0"));
    }
    let v4 = SocketAddr::from(([127, 0, 0, 1], port));
    let tcp = match TcpStream::connect_timeout(&v4, CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
            TcpStream::connect_timeout(&v6, CONNECT_TIMEOUT).map_err(|_| {
                Failure::reply(
                    error_kind::REFUSED,
                    format!(
                        "nothing accepts TCP connections on 127.0.0.1:{port} or [::1]:{port} \
                         in the guest"
                    ),
                )
            })?
        }
        Err(e) => return Err(Failure::io(&format!("connect to 127.0.0.1:{port}"), &e)),
    };
    // Small requests and answers go out at once (latency over packet count).
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// A connection's socket, by a descriptor of its own (any socket family: vsock in a VM, a
/// unix socket in tests).
struct Sock(File);

/// A socket one direction of the pipe reads from or writes to.
trait Half: Read + Write {
    fn shut(&self, how: Shutdown);
}

impl Half for TcpStream {
    fn shut(&self, how: Shutdown) {
        // Already shut down or reset: nothing more to end.
        let _ = self.shutdown(how);
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Half for Sock {
    fn shut(&self, how: Shutdown) {
        let how = match how {
            Shutdown::Read => libc::SHUT_RD,
            Shutdown::Write => libc::SHUT_WR,
            Shutdown::Both => libc::SHUT_RDWR,
        };
        // SAFETY: shutdown(2) on a descriptor this value owns; no pointers. Its failure (not
        // connected any more) leaves nothing to end.
        unsafe { libc::shutdown(self.0.as_raw_fd(), how) };
    }
}

/// Moves bytes from `from` to `to` until end of file (then shuts down `to`'s writing half), a
/// read error (then shuts both down completely, which ends the other direction too) or a
/// write error (then stops reading `from`: see the module docs).
fn pump(mut from: impl Half, mut to: impl Half) {
    let mut buf = vec![0u8; PIPE_CHUNK];
    loop {
        match from.read(&mut buf) {
            Ok(0) => {
                to.shut(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    from.shut(Shutdown::Read);
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                from.shut(Shutdown::Both);
                to.shut(Shutdown::Both);
                return;
            }
        }
    }
}

/// Splices the connection (descriptor `hangup`, owned by the caller for the whole call) with
/// `tcp` both ways; returns when both directions have ended.
pub(super) fn splice(hangup: Option<RawFd>, tcp: TcpStream) -> io::Result<()> {
    let Some(fd) = hangup else {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "connect_tcp needs a socket connection",
        ));
    };
    // SAFETY: `fd` is the descriptor of the stream that `serve` owns and keeps open until
    // after this call returns; it is only borrowed to duplicate it.
    let conn = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?;
    let conn = File::from(conn);
    let up = (tcp.try_clone()?, Sock(conn.try_clone()?));
    let back = std::thread::Builder::new()
        .name("pipe".into())
        .stack_size(256 << 10)
        .spawn(move || pump(up.0, up.1));
    let back = match back {
        Ok(h) => h,
        Err(e) => {
            tcp.shut(Shutdown::Both);
            Sock(conn).shut(Shutdown::Both);
            return Err(e);
        }
    };
    pump(Sock(conn), tcp);
    let _ = back.join();
    Ok(())
}
