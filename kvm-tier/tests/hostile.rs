//! Hostile tiny guests against the virtio devices of a real [`Machine`]: a few dozen bytes of
//! long-mode code run a script that drives the devices through their MMIO registers, as a
//! guest driver would, and posts malicious chains (lengths of gigabytes, descriptor loops,
//! addresses outside guest memory, unknown request types) on the disk, vsock and a volume slot.
//! The host process survives, each device still answers a good request afterwards, and another
//! VM in the same process keeps working. Skipped, with a message, where /dev/kvm is missing.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use dormant_kvm::machine::{BLK_MMIO_BASE, FS_MMIO_BASE, VSOCK_MMIO_BASE};
use dormant_kvm::virtio::fs::VolumeAttach;
use dormant_kvm::vm::GuestRam;

/// Indirect descriptor tables.
const TABLES: u64 = 0x300000;
const INDIRECT: u16 = 4;

const OP_RST: u16 = 3;

/// The hostile guest: on each device, malicious chains, then a good request whose answer it
/// prints: `B` status and first ID byte of a `GET_ID` (`B0d`), `V` the ops of two replies
/// (`V33`), `F` the error of a `GETATTR` (`F0`), then `!`.
fn hostile() -> Guest {
    let mut g = Guest::new();
    // virtio-blk, queue slot 0.
    let hdr = |kind: u32| {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h
    };
    g.bytes(BUFS, &hdr(99));
    g.bytes(BUFS + 0x100, &hdr(8));
    g.bytes(BUFS + 0x200, &hdr(0));
    // 0: an unknown request type with 510 writable descriptors of all RAM: 4080 MiB.
    g.huge_table(TABLES, 511, BUFS, 16, WRITE);
    g.desc(0, 0, TABLES, 511 * 16, INDIRECT, 0);
    // 1: a descriptor that loops onto itself.
    g.desc(0, 1, BUFS + 0x200, 16, NEXT, 1);
    // 2: outside guest memory.
    g.desc(0, 2, 1 << 40, 16, NEXT, 3);
    g.desc(0, 3, BUFS + 0x300, 1, WRITE, 0);
    // 4: GET_ID with 16 MiB of room.
    g.desc(0, 4, BUFS + 0x100, 16, NEXT, 5);
    g.desc(0, 5, 0, RAM as u32, WRITE | NEXT, 6);
    g.desc(0, 6, 0, RAM as u32, WRITE, 0);
    // 7: a good GET_ID.
    g.desc(0, 7, BUFS + 0x100, 16, NEXT, 8);
    g.desc(0, 8, BUFS + 0x400, 21, WRITE, 0);
    g.bring_up(BLK_MMIO_BASE, &[(0, 0)]);
    g.ring(0, 0, &[0, 1, 2, 4, 7]);
    g.publish(BLK_MMIO_BASE, 0, 0, 4);
    g.wait_used(0, 4);
    g.publish(BLK_MMIO_BASE, 0, 0, 5);
    g.wait_used(0, 5);
    g.print("B");
    g.putc(BUFS + 0x400 + 20, b'0');
    g.putc(BUFS + 0x400, 0);

    // virtio-vsock: RX in slot 1, TX in slot 2.
    let v = BUFS + 0x10000;
    g.bytes(v, &packet(70, 80, 1, OP_RST));
    g.bytes(v + 0x100, &packet(71, 81, 9, 99));
    g.bytes(v + 0x200, &packet(77, 88, 1, 1));
    // 0: 4080 MiB to read; 1: a loop; 2: outside memory; 3: an unknown type and op (refused
    // with a reset); 4: a good connection request (refused with a reset).
    g.huge_table(TABLES + 0x10000, 511, v, 44, 0);
    g.desc(2, 0, TABLES + 0x10000, 511 * 16, INDIRECT, 0);
    g.desc(2, 1, v, 44, NEXT, 1);
    g.desc(2, 2, 1 << 40, 44, 0, 0);
    g.desc(2, 3, v + 0x100, 44, 0, 0);
    g.desc(2, 4, v + 0x200, 44, 0, 0);
    // Two receive buffers.
    g.desc(1, 0, v + 0x1000, 44 + 4096, WRITE, 0);
    g.desc(1, 1, v + 0x3000, 44 + 4096, WRITE, 0);
    g.bring_up(VSOCK_MMIO_BASE, &[(0, 1), (1, 2)]);
    g.ring(1, 0, &[0, 1]);
    g.ring(2, 0, &[0, 1, 2, 3, 4]);
    g.publish(VSOCK_MMIO_BASE, 0, 1, 2);
    g.publish(VSOCK_MMIO_BASE, 1, 2, 5);
    g.wait_used(2, 5);
    g.wait_used(1, 2);
    g.print("V");
    // The replies' ops (resets: `3`).
    g.putc(v + 0x1000 + 30, b'0');
    g.putc(v + 0x3000 + 30, b'0');

    // virtio-fs slot 0: hiprio in slot 3, requests in slot 4.
    let f = BUFS + 0x20000;
    g.bytes(f, &fuse_header(u32::MAX, 16, 5, 1));
    g.bytes(f + 0x100, &fuse_header(40, 999, 6, 1));
    let mut getattr = fuse_header(56, 3, 7, 1);
    getattr.extend_from_slice(&[0u8; 16]);
    g.bytes(f + 0x200, &getattr);
    // 0: 4080 MiB of request; 1: a loop; 2: outside memory; 3: an unknown opcode; 4: GETATTR.
    g.huge_table(TABLES + 0x20000, 511, f, 40, 0);
    g.desc(4, 0, TABLES + 0x20000, 511 * 16, INDIRECT, 0);
    g.desc(4, 1, f, 40, NEXT, 1);
    g.desc(4, 2, 1 << 40, 40, NEXT, 5);
    g.desc(4, 5, f + 0x1000, 4096, WRITE, 0);
    g.desc(4, 3, f + 0x100, 40, NEXT, 6);
    g.desc(4, 6, f + 0x2000, 4096, WRITE, 0);
    g.desc(4, 4, f + 0x200, 56, NEXT, 7);
    g.desc(4, 7, f + 0x3000, 4096, WRITE, 0);
    g.bring_up(FS_MMIO_BASE, &[(0, 3), (1, 4)]);
    g.ring(4, 0, &[0, 1, 2, 3, 4]);
    g.publish(FS_MMIO_BASE, 1, 4, 5);
    g.wait_used(4, 5);
    g.print("F");
    // The reply's error (0) is the low byte of the i32 at offset 4.
    g.putc(f + 0x3000 + 4, b'0');
    g.print("!");
    g
}

/// The well-behaved guest: posts a receive buffer, waits for the host's connection request
/// on guest port 1234, accepts it and prints `b`, the request's op (`1`), then `!`.
fn friendly() -> Guest {
    let mut g = Guest::new();
    let v = BUFS;
    // The host's first connection comes from its port 1 << 30.
    g.bytes(v + 0x100, &packet(1234, 1 << 30, 1, 2));
    g.desc(1, 0, v + 0x1000, 44 + 4096, WRITE, 0);
    g.desc(2, 0, v + 0x100, 44, 0, 0);
    g.bring_up(VSOCK_MMIO_BASE, &[(0, 1), (1, 2)]);
    g.ring(1, 0, &[0]);
    g.ring(2, 0, &[0]);
    g.publish(VSOCK_MMIO_BASE, 0, 1, 1);
    g.print("b");
    g.wait_used(1, 1);
    g.putc(v + 0x1000 + 30, b'0');
    g.publish(VSOCK_MMIO_BASE, 1, 2, 1);
    g.wait_used(2, 1);
    g.print("!");
    g
}

const CHILD: &str = "DORMANT_HOSTILE_TEST_CHILD";
const MINUTES: Duration = Duration::from_secs(300);

/// The scenario, in a child process whose address space is capped 2 GiB above what it uses
/// (as under a container's or a user's memory limit): an allocation sized by the guest's
/// claims (4 GiB here) fails there, and Rust aborts the process.
fn child() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let vm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let cap = (vm_kib << 10) + (2 << 30);
    let limit = libc::rlimit {
        rlim_cur: cap,
        rlim_max: cap,
    };
    // SAFETY: setrlimit reads the struct passed; it lowers this process's own limit only.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) }, 0);

    let dir = tempfile::tempdir().unwrap();
    let friendly = friendly().start(None, &[]);
    assert!(
        friendly.console().wait_for("b", MINUTES),
        "the friendly guest runs"
    );
    let volume = VolumeAttach {
        host: dir.path().to_path_buf(),
        read_only: false,
    };
    let hostile = hostile().start(Some(GuestRam::anonymous(1 << 20).unwrap()), &[volume]);
    assert!(
        hostile.console().wait_for("!", MINUTES),
        "the hostile guest got its answers: {:?}",
        hostile.console().text()
    );
    assert_eq!(hostile.console().text(), "B0dV33F0!");
    // The other VM of this process still works: it accepts a connection from the host.
    let stream = friendly
        .vsock()
        .connect(1234, MINUTES)
        .expect("the friendly guest accepts a connection");
    assert!(friendly.console().wait_for("b1!", MINUTES));
    drop(stream);
    assert!(hostile.is_running() && friendly.is_running());
    println!("SURVIVED");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn hostile_chains_on_every_device_leave_the_host_and_another_vm_working() {
    if std::env::var_os(CHILD).is_some() {
        child();
        return;
    }
    let o = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "hostile_chains_on_every_device_leave_the_host_and_another_vm_working",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && out.contains("SURVIVED"),
        "the host process running the hostile guest ended with {}\n{out}\n{err}",
        o.status
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn a_guest_that_keeps_its_queue_full_is_still_reachable_checkpointed_and_stopped() {
    let mut g = Guest::new();
    // Every entry of the TX ring is one connection request; the guest keeps the ring full and
    // never posts a receive buffer.
    g.bytes(BUFS, &packet(5, 6, 1, 1));
    g.desc(2, 0, BUFS, 44, 0, 0);
    g.bring_up(VSOCK_MMIO_BASE, &[(0, 1), (1, 2)]);
    g.ring(2, 0, &[0; QSIZE as usize]);
    g.print("f");
    g.publish(VSOCK_MMIO_BASE, 1, 2, QSIZE);
    g.flood(2, QSIZE);
    let mut m = g.start(None, &[]);
    assert!(m.console().wait_for("f", MINUTES));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // The host side of the device gets its turn: the guest never answers, so this times out.
        let r = m.vsock().connect(99, Duration::from_secs(2));
        assert!(r.is_err());
        let (vm, _, devices) = m.quiesce().unwrap();
        assert!(devices.vsock.transport.queues[1].ready);
        m.unquiesce(vm).unwrap();
        assert!(m.is_running());
        drop(m);
        tx.send(()).unwrap();
    });
    rx.recv_timeout(MINUTES)
        .expect("connect, checkpoint and stop got through within five minutes");
}
