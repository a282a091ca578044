//! What the agent's integration tests share.

use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Duration;

use dormant_agent::client::Client;
use dormant_agent::server::{ProcessTable, serve_socket};

/// A client on a socket connection (`serve_socket`, as the VM's vsock connections are) to a
/// fresh in-process server thread, its reads bounded by `read_timeout`.
pub fn connect_socket(read_timeout: Duration) -> Client<UnixStream> {
    let (ours, theirs) = UnixStream::pair().unwrap();
    thread::spawn(move || {
        let _ = serve_socket(theirs, ProcessTable::global());
    });
    ours.set_read_timeout(Some(read_timeout)).unwrap();
    Client::new(ours)
}
