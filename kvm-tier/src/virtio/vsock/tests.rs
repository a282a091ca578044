//! The vsock device's unit tests: the wire layout, deadlines and cancels of host streams
//! against a guest that never answers, credit, and the bound on control packets.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::connection::{CONTROL_MAX, Conn, ConnState, ControlQueue, HOST_BUF, OUT_MAX};
use super::muxer::{FIRST_LOCAL_PORT, Vsock};
use super::packet::*;
use super::*;

#[test]
fn packet_headers_round_trip_in_the_wire_layout() {
    let h = Header {
        src_cid: 2,
        dst_cid: 3,
        src_port: 1 << 30,
        dst_port: 1024,
        len: 7,
        type_: TYPE_STREAM,
        op: OP_RW,
        flags: SHUTDOWN_BOTH,
        buf_alloc: HOST_BUF,
        fwd_cnt: 99,
    };
    let b = h.bytes();
    assert_eq!(b.len(), 44);
    assert_eq!(&b[20..24], &1024u32.to_le_bytes(), "dst_port at offset 20");
    assert_eq!(&b[30..32], &OP_RW.to_le_bytes(), "op at offset 30");
    let p = Header::parse(&b);
    assert_eq!(p.bytes(), b);
}

/// A device without a driver (nothing ever answers) holding one idle connection restored
/// from a snapshot, to guest port 1024, that grants no credit; and the host's stream of it.
fn silent_guest() -> (VsockDevice, VsockStream) {
    let ram = crate::vm::GuestRam::anonymous(1 << 20).unwrap();
    let fresh = VsockDevice::new(ram.memory().clone(), EventFd::new(0).unwrap(), None).unwrap();
    let mut state = fresh.state();
    state.live.push(LiveConn {
        local: FIRST_LOCAL_PORT,
        peer: 1024,
        peer_buf_alloc: 0,
        peer_fwd_cnt: 0,
        tx_cnt: 0,
        fwd_cnt: 0,
        credit_sent: 0,
    });
    let dev =
        VsockDevice::new(ram.memory().clone(), EventFd::new(0).unwrap(), Some(&state)).unwrap();
    let stream = dev.host().adopt(1024).unwrap();
    (dev, stream)
}

/// Runs `f` on another thread; its result, or `None` if it has not returned within a
/// minute (a hang).
fn within_a_minute<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(60)).ok()
}

#[test]
fn reads_and_writes_stop_at_the_deadline_when_the_guest_never_answers() {
    let (_dev, mut stream) = silent_guest();
    stream.set_deadline(Some(Instant::now() + Duration::from_millis(100)));
    let read = within_a_minute(move || {
        let r = stream.read(&mut [0u8; 16]);
        (r, stream)
    });
    let (r, mut stream) = read.expect("the read hung");
    assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::TimedOut);

    // No credit, ever: the write fills the host's buffer, then waits for the guest.
    stream.set_deadline(Some(Instant::now() + Duration::from_millis(100)));
    let written = within_a_minute(move || {
        let r = stream.write_all(&vec![7u8; 2 * OUT_MAX]);
        (r, stream)
    });
    let (r, mut stream) = written.expect("the write hung");
    assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::TimedOut);

    // The same with a timeout on the wait for room instead of a deadline.
    stream.set_deadline(None);
    stream.set_write_timeout(Some(Duration::from_millis(100)));
    let written = within_a_minute(move || stream.write_all(b"more"));
    let r = written.expect("the write hung");
    assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::TimedOut);
}

#[test]
fn a_raised_cancel_flag_stops_a_waiting_read_a_write_and_a_connect() {
    let (dev, mut stream) = silent_guest();
    let host = dev.host();
    let flag = Arc::new(AtomicBool::new(false));
    stream.set_cancel(Some(flag.clone()));
    // No deadline: only the flag can end these waits.
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let _ = tx.send(stream.read(&mut [0u8; 16]));
        stream
    });
    // The read has not returned on its own.
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
    flag.store(true, Ordering::SeqCst);
    host.waker().wake();
    let r = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the read hung");
    assert!(Cancelled::is_cause_of(&r.unwrap_err()));
    let mut stream = reader.join().unwrap();
    // Still raised: a write fails at once, even with room to buffer.
    let e = stream.write(b"x").unwrap_err();
    assert!(Cancelled::is_cause_of(&e));
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionAborted);
    // A connect the guest never answers gives up too.
    let cancel = flag.clone();
    let connected = within_a_minute(move || {
        host.connect_with(1024, Duration::from_secs(3600), Some(&cancel))
            .map(|_| ())
    });
    let e = connected.expect("the connect hung").unwrap_err();
    assert!(Cancelled::is_cause_of(&e));
    stream.abort();
}

#[test]
fn credit_accounts_for_bytes_in_flight() {
    let c = Conn {
        state: ConnState::Connected,
        peer_buf_alloc: 1000,
        peer_fwd_cnt: u32::MAX - 10,
        tx_cnt: 100,
        ..Conn::connecting(1024)
    };
    // 111 bytes in flight across the counter wrap.
    assert_eq!(c.credit(), 889);
}

#[test]
fn control_packets_stay_bounded_whatever_the_guest_sends() {
    let mut v = Vsock {
        cid: GUEST_CID,
        conns: HashMap::new(),
        control: ControlQueue::default(),
        next_port: FIRST_LOCAL_PORT,
        packet: Vec::new(),
    };
    v.conns.insert(
        FIRST_LOCAL_PORT,
        Conn {
            state: ConnState::Connected,
            ..Conn::connecting(1024)
        },
    );
    let from_guest = |src_port: u32, dst_port: u32, op: u16| Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        type_: TYPE_STREAM,
        op,
        ..Header::default()
    };
    // Stray packets (guest connection requests, unknown ports, foreign types): refused,
    // at most CONTROL_MAX refusals held, the same one once.
    for port in 0..10_000 {
        v.handle_packet(from_guest(port, 7, OP_REQUEST), &[]);
        v.handle_packet(from_guest(5, 7, OP_RW), &[1, 2, 3]);
    }
    assert_eq!(v.control.q.len(), CONTROL_MAX);
    // Credit requests on a live connection: one update waits, even past the cap.
    for _ in 0..10_000 {
        v.handle_packet(from_guest(1024, FIRST_LOCAL_PORT, OP_CREDIT_REQUEST), &[]);
    }
    assert_eq!(v.control.q.len(), CONTROL_MAX + 1);
    let last = v.control.q.back().copied();
    assert_eq!(
        last.map(|c| (c.local, c.peer, c.op)),
        Some((FIRST_LOCAL_PORT, 1024, OP_CREDIT_UPDATE))
    );
    // A reset is never answered.
    v.control.q.clear();
    v.handle_packet(from_guest(9, 9, OP_RST), &[]);
    assert!(v.control.q.is_empty());
}

#[test]
fn a_shared_stream_reads_and_writes_from_two_threads_and_transient_ones_are_not_kept() {
    let (dev, stream) = silent_guest();
    let stream = Arc::new(stream);
    // A reader waits on one thread while another writes: the write does not wait for it.
    let r = stream.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let _ = tx.send((&*r).read(&mut [0u8; 16]).map_err(|e| e.kind()));
    });
    (&*stream).write_all(b"request").unwrap();
    assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
    // The guest going away ends the waiting read.
    dev.guest_gone();
    let r = rx.recv_timeout(Duration::from_secs(60)).expect("the read hung");
    assert_eq!(r, Err(std::io::ErrorKind::ConnectionReset));
    reader.join().unwrap();

    // Idle and ordinary, a connection is kept by a snapshot; transient, it is not.
    let (dev, stream) = silent_guest();
    assert_eq!(dev.state().live.len(), 1);
    stream.set_transient();
    let s = dev.state();
    assert!(s.live.is_empty());
    assert_eq!(s.open, vec![(FIRST_LOCAL_PORT, 1024)]);
    // Shut down for writing: further writes fail.
    stream.shutdown_write();
    let e = (&stream).write(b"x").unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe);
}
