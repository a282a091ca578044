//! The NAT stack driven by a second smoltcp interface playing the guest (10.0.2.15) over the
//! same frame queues the device uses: real host sockets on 127.0.0.1, no VM.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dormant_core::NetworkPolicy;
use parking_lot::Mutex;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::nat::CONNECT_TIMEOUT;
use super::*;

#[test]
fn the_agent_configures_the_addresses_the_stack_serves() {
    use dormant_agent::netcfg;
    assert_eq!(netcfg::GUEST_ADDR, GUEST_ADDR);
    assert_eq!(netcfg::PREFIX, GUEST_PREFIX);
    assert_eq!(netcfg::GATEWAY, GATEWAY_ADDR);
    assert_eq!(netcfg::DNS_SERVER, DNS_ADDR);
}

/// The guest's side of the link: frames for the guest are taken from `to_guest`, its frames
/// pushed to `from_guest` (the stack woken), as the virtio device does.
struct GuestPhy {
    frames: Arc<Mutex<Frames>>,
    wake: EventFd,
    /// ICMP port-unreachable messages received.
    port_unreachable: usize,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a GuestPhy);

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0u8; len];
        let r = f(&mut frame);
        self.0.frames.lock().from_guest.push_back(frame);
        let _ = self.0.wake.write(1);
        r
    }
}

impl phy::Device for GuestPhy {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;
    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(Rx, Tx<'_>)> {
        let f = self.frames.lock().to_guest.pop_front()?;
        // ICMP type 3 (destination unreachable), code 3 (port), after Ethernet and IPv4.
        if f.len() > 35 && f[12..14] == [0x08, 0x00] && f[23] == 1 && f[34..36] == [3, 3] {
            self.port_unreachable += 1;
        }
        // Room freed for the stack.
        let _ = self.wake.write(1);
        Some((Rx(f), Tx(self)))
    }
    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Tx<'_>> {
        Some(Tx(self))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        caps
    }
}

struct Guest {
    nat: Nat,
    phy: GuestPhy,
    iface: Interface,
    sockets: SocketSet<'static>,
    epoch: Instant,
}

impl Guest {
    fn new(policy: NetworkPolicy) -> Guest {
        let frames = Arc::new(Mutex::new(Frames::default()));
        let wake = EventFd::new(EFD_NONBLOCK).unwrap();
        let device_wake = EventFd::new(EFD_NONBLOCK).unwrap();
        let nat = Nat::start(frames.clone(), wake.try_clone().unwrap(), device_wake).unwrap();
        nat.handle().set_policy(policy);
        let mut phy = GuestPhy {
            frames,
            wake,
            port_unreachable: 0,
        };
        let epoch = Instant::now();
        let mut iface = Interface::new(
            Config::new(HardwareAddress::Ethernet(EthernetAddress(GUEST_MAC))),
            &mut phy,
            smoltcp::time::Instant::from_millis(0),
        );
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::Ipv4(GUEST_ADDR), GUEST_PREFIX))
                .unwrap();
        });
        iface
            .routes_mut()
            .add_default_ipv4_route(GATEWAY_ADDR)
            .unwrap();
        Guest {
            nat,
            phy,
            iface,
            sockets: SocketSet::new(Vec::new()),
            epoch,
        }
    }

    fn now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    fn poll(&mut self) {
        let now = self.now();
        self.iface.poll(now, &mut self.phy, &mut self.sockets);
    }

    /// Polls (for up to 30 s) until `done` holds.
    fn until(&mut self, what: &str, mut done: impl FnMut(&mut Guest) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.poll();
            if done(self) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn connect(&mut self, to: (std::net::Ipv4Addr, u16), local_port: u16) -> SocketHandle {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 16 << 10]),
            tcp::SocketBuffer::new(vec![0; 16 << 10]),
        );
        s.connect(
            self.iface.context(),
            (IpAddress::Ipv4(to.0), to.1),
            local_port,
        )
        .unwrap();
        self.sockets.add(s)
    }

    fn sock(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }

    /// Sends `data` on connection `h` as the window allows while collecting what arrives,
    /// until `done` holds for the socket (waiting as [`Guest::until`]); returns what arrived.
    fn upload(
        &mut self,
        h: SocketHandle,
        data: &[u8],
        what: &str,
        mut done: impl FnMut(&tcp::Socket<'static>) -> bool,
    ) -> Vec<u8> {
        let mut sent = 0;
        let mut answer = Vec::new();
        self.until(what, |g| {
            let s = g.sock(h);
            if sent < data.len() && s.can_send() {
                sent += s.send_slice(&data[sent..]).unwrap();
            }
            if s.can_recv() {
                s.recv(|b| {
                    answer.extend_from_slice(b);
                    (b.len(), ())
                })
                .unwrap();
            }
            done(s)
        });
        answer
    }
}

/// A host listener on 127.0.0.1 whose backlog holds every connection a test opens.
fn listener() -> (TcpListener, u16) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
    s.listen(1024).unwrap();
    let l: TcpListener = s.into();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

fn host_policy() -> NetworkPolicy {
    NetworkPolicy::parse(["host"], [""; 0]).unwrap()
}

#[test]
fn a_guest_connection_to_the_gateway_reaches_the_hosts_loopback_both_ways() {
    let (l, port) = listener();
    let mut g = Guest::new(host_policy());
    let h = g.connect((GATEWAY_ADDR, port), 40000);
    g.until("the connection", |g| g.sock(h).may_send());
    let (mut host, peer) = l.accept().unwrap();
    assert!(matches!(peer, SocketAddr::V4(a) if a.ip().is_loopback()));
    host.write_all(b"hello from the host").unwrap();
    let mut got = Vec::new();
    g.until("the host's bytes", |g| {
        let s = g.sock(h);
        if s.can_recv() {
            s.recv(|b| {
                got.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
        got.len() == 19
    });
    assert_eq!(got, b"hello from the host");
    // A larger transfer guest to host, through the bounded buffers.
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        host.read_to_end(&mut all).unwrap();
        (host, all)
    });
    let mut sent = 0;
    g.until("the guest's bytes sent", |g| {
        let s = g.sock(h);
        if sent < data.len() && s.can_send() {
            sent += s.send_slice(&data[sent..]).unwrap();
        }
        if sent == data.len() && s.state() == tcp::State::Established {
            s.close();
        }
        sent == data.len() && s.send_queue() == 0
    });
    let (_host, all) = reader.join().unwrap();
    assert_eq!(all.len(), data.len());
    assert!(all == data);
    // The host closed (dropped): the guest sees the FIN, the stack forgets the connection.
    drop(_host);
    g.until("the host's FIN", |g| {
        matches!(
            g.sock(h).state(),
            tcp::State::TimeWait | tcp::State::Closed
        )
    });
    g.until("the stack forgets it", |g| g.nat.handle().stats().open == 0);
    assert_eq!(g.nat.handle().stats().accepted, 1);
}

#[test]
fn refused_destinations_are_reset_at_once() {
    let (_l, port) = listener();
    // Off: the host's loopback is refused, and so is any other address.
    let mut g = Guest::new(NetworkPolicy::off());
    let a = g.connect((GATEWAY_ADDR, port), 40001);
    let b = g.connect((std::net::Ipv4Addr::new(192, 0, 2, 1), 80), 40002);
    let started = Instant::now();
    g.until("the resets", |g| {
        g.sock(a).state() == tcp::State::Closed && g.sock(b).state() == tcp::State::Closed
    });
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(g.nat.handle().stats().refused, 2);
    // `*` does not include the host's loopback.
    g.nat.handle().set_policy(NetworkPolicy::open());
    let c = g.connect((GATEWAY_ADDR, port), 40003);
    g.until("the reset", |g| g.sock(c).state() == tcp::State::Closed);
    // A host port nobody listens on: the host refuses, so the guest is reset.
    let (l2, dead_port) = listener();
    drop(l2);
    g.nat.handle().set_policy(host_policy());
    let d = g.connect((GATEWAY_ADDR, dead_port), 40004);
    g.until("the reset", |g| g.sock(d).state() == tcp::State::Closed);
    assert_eq!(g.nat.handle().stats().accepted, 0);
}

#[test]
fn a_policy_change_resets_the_connections_it_no_longer_allows() {
    let (l, port) = listener();
    let mut g = Guest::new(host_policy());
    let h = g.connect((GATEWAY_ADDR, port), 40010);
    g.until("the connection", |g| g.sock(h).may_send());
    let (mut host, _) = l.accept().unwrap();
    g.nat.handle().set_policy(NetworkPolicy::off());
    assert_eq!(g.nat.handle().policy(), NetworkPolicy::off());
    g.until("the reset", |g| g.sock(h).state() == tcp::State::Closed);
    host.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = [0u8; 8];
    // The host's end sees the connection end too.
    assert!(matches!(host.read(&mut buf), Ok(0) | Err(_)));
}

#[test]
fn connections_beyond_the_cap_are_refused_and_the_stack_keeps_working() {
    let (l, port) = listener();
    let mut g = Guest::new(host_policy());
    let n = MAX_CONNECTIONS + 40;
    let handles: Vec<SocketHandle> = (0..n)
        .map(|i| g.connect((GATEWAY_ADDR, port), 20000 + i as u16))
        .collect();
    g.until("every connection answered", |g| {
        handles.iter().all(|&h| {
            let s = g.sock(h);
            s.may_send() || s.state() == tcp::State::Closed
        })
    });
    let open = handles.iter().filter(|&&h| g.sock(h).may_send()).count();
    assert_eq!(open, MAX_CONNECTIONS);
    assert_eq!(g.nat.handle().stats().refused, 40);
    // Closing them frees the slots: a new one is relayed.
    for &h in &handles {
        g.sock(h).abort();
    }
    g.until("the stack forgets them", |g| g.nat.handle().stats().open == 0);
    let h = g.connect((GATEWAY_ADDR, port), 30000);
    g.until("a new connection", |g| g.sock(h).may_send());
    drop(l);
}

/// A raw guest SYN from `src_port` to `dst`, as a flooding guest sends it (no socket behind
/// it: the SYN-ACK is never answered).
fn syn_frame(src_port: u16, dst: (std::net::Ipv4Addr, u16)) -> Vec<u8> {
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        EthernetFrame, EthernetProtocol, EthernetRepr, IpProtocol, Ipv4Packet, Ipv4Repr,
        TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
    };
    let tcp = TcpRepr {
        src_port,
        dst_port: dst.1,
        control: TcpControl::Syn,
        seq_number: TcpSeqNumber(1000),
        ack_number: None,
        window_len: 64240,
        window_scale: None,
        max_seg_size: Some(1460),
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let ip = Ipv4Repr {
        src_addr: GUEST_ADDR,
        dst_addr: dst.0,
        next_header: IpProtocol::Tcp,
        payload_len: tcp.buffer_len(),
        hop_limit: 64,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(GUEST_MAC),
        dst_addr: EthernetAddress(GATEWAY_MAC),
        ethertype: EthernetProtocol::Ipv4,
    };
    let mut f = vec![0u8; 14 + 20 + tcp.buffer_len()];
    eth.emit(&mut EthernetFrame::new_unchecked(&mut f[..]));
    ip.emit(
        &mut Ipv4Packet::new_unchecked(&mut f[14..34]),
        &ChecksumCapabilities::default(),
    );
    tcp.emit(
        &mut TcpPacket::new_unchecked(&mut f[34..]),
        &IpAddress::Ipv4(GUEST_ADDR),
        &IpAddress::Ipv4(dst.0),
        &ChecksumCapabilities::default(),
    );
    f
}

/// Whether a frame for the guest is a TCP reset.
fn is_rst(frame: &[u8]) -> bool {
    use smoltcp::wire::{EthernetFrame, Ipv4Packet, TcpPacket};
    EthernetFrame::new_checked(frame)
        .ok()
        .and_then(|e| {
            let ip = Ipv4Packet::new_checked(e.payload()).ok()?;
            let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
            Some(tcp.rst())
        })
        .unwrap_or(false)
}

#[test]
fn a_syn_flood_gets_resets_beyond_the_cap_and_its_slots_come_back() {
    let (l, port) = listener();
    let frames = Arc::new(Mutex::new(Frames::default()));
    let wake = EventFd::new(EFD_NONBLOCK).unwrap();
    let nat = Nat::start(
        frames.clone(),
        wake.try_clone().unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    )
    .unwrap();
    let net = nat.handle();
    net.set_policy(host_policy());
    // The guest's ARP request for the gateway first: the stack learns its MAC from it.
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&GUEST_MAC);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&GUEST_MAC);
    arp.extend_from_slice(&GUEST_ADDR.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&GATEWAY_ADDR.octets());
    frames.lock().from_guest.push_back(arp);
    let total = 3000u16;
    let mut resets = 0;
    let drain = |resets: &mut usize| {
        let mut f = frames.lock();
        *resets += f.to_guest.iter().filter(|fr| is_rst(fr)).count();
        f.to_guest.clear();
        drop(f);
        let _ = wake.write(1);
    };
    for batch in (1..=total).collect::<Vec<_>>().chunks(200) {
        frames
            .lock()
            .from_guest
            .extend(batch.iter().map(|&p| syn_frame(p, (GATEWAY_ADDR, port))));
        let _ = wake.write(1);
        std::thread::sleep(Duration::from_millis(5));
        drain(&mut resets);
        assert!(net.stats().open <= MAX_CONNECTIONS);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while net.stats().accepted + net.stats().refused < u64::from(total) {
        assert!(Instant::now() < deadline, "every SYN answered: {:?}", net.stats());
        drain(&mut resets);
        std::thread::sleep(Duration::from_millis(2));
    }
    let s = net.stats();
    assert_eq!(s.accepted, MAX_CONNECTIONS as u64, "{s:?}");
    assert_eq!(s.refused, u64::from(total) - MAX_CONNECTIONS as u64, "{s:?}");
    // Resets the stack sent while the queue to the guest was full were dropped, as a link
    // drops (the guest's SYN retransmit gets another); sent one at a time, each is answered.
    assert!(resets > 0);
    for p in 0..50 {
        let before = resets;
        frames
            .lock()
            .from_guest
            .push_back(syn_frame(50000 + p, (GATEWAY_ADDR, port)));
        let _ = wake.write(1);
        let deadline = Instant::now() + Duration::from_secs(30);
        while resets == before {
            assert!(Instant::now() < deadline, "a reset for SYN {p}");
            drain(&mut resets);
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    assert!(net.stats().open <= MAX_CONNECTIONS);
    // The flood never completes a handshake: after the connect timeout its slots are free,
    // and a new SYN is relayed again.
    let deadline = Instant::now() + CONNECT_TIMEOUT + Duration::from_secs(30);
    while net.stats().open > 0 {
        assert!(Instant::now() < deadline, "slots freed: {:?}", net.stats());
        drain(&mut resets);
        std::thread::sleep(Duration::from_millis(20));
    }
    frames
        .lock()
        .from_guest
        .push_back(syn_frame(60000, (GATEWAY_ADDR, port)));
    let _ = wake.write(1);
    let deadline = Instant::now() + Duration::from_secs(30);
    while net.stats().accepted == MAX_CONNECTIONS as u64 {
        assert!(Instant::now() < deadline, "a new connection relayed");
        std::thread::sleep(Duration::from_millis(2));
    }
    drop(l);
}

#[test]
fn dns_queries_to_the_vmm_are_answered_under_the_policy_and_other_udp_is_refused() {
    use simple_dns::rdata::RData;
    use simple_dns::{CLASS, Name, Packet, QCLASS, QTYPE, Question, RCODE, TYPE};
    use smoltcp::socket::udp;
    let mut g = Guest::new(host_policy());
    let mut s = udp::Socket::new(
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 4], vec![0; 4096]),
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 4], vec![0; 4096]),
    );
    s.bind(5353).unwrap();
    let h = g.sockets.add(s);
    let ask = |g: &mut Guest, id: u16, name: &str| -> (RCODE, Vec<std::net::Ipv4Addr>) {
        let mut q = Packet::new_query(id);
        q.questions.push(Question::new(
            Name::new_unchecked(name),
            QTYPE::TYPE(TYPE::A),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        let q = q.build_bytes_vec().unwrap();
        g.sockets
            .get_mut::<udp::Socket>(h)
            .send_slice(&q, (IpAddress::Ipv4(DNS_ADDR), 53))
            .unwrap();
        let mut reply = Vec::new();
        g.until("the DNS reply", |g| {
            if let Ok((r, _)) = g.sockets.get_mut::<udp::Socket>(h).recv() {
                reply = r.to_vec();
            }
            !reply.is_empty()
        });
        let p = Packet::parse(&reply).unwrap();
        assert_eq!(p.id(), id);
        let addrs = p
            .answers
            .iter()
            .filter_map(|rr| match &rr.rdata {
                RData::A(a) => Some(std::net::Ipv4Addr::from(a.address)),
                _ => None,
            })
            .collect();
        (p.rcode(), addrs)
    };
    assert_eq!(
        ask(&mut g, 1, "host.dormant.internal"),
        (RCODE::NoError, vec![GATEWAY_ADDR])
    );
    assert_eq!(ask(&mut g, 2, "example.com").0, RCODE::NameError);
    g.nat.handle().set_policy(NetworkPolicy::off());
    assert_eq!(ask(&mut g, 3, "host.dormant.internal").0, RCODE::NameError);
    // A datagram to any other port or address is refused at once with an ICMP port
    // unreachable; nothing is relayed.
    for to in [
        (IpAddress::Ipv4(DNS_ADDR), 54),
        (IpAddress::Ipv4(std::net::Ipv4Addr::new(192, 0, 2, 1)), 53),
    ] {
        let before = g.phy.port_unreachable;
        g.sockets
            .get_mut::<udp::Socket>(h)
            .send_slice(b"x", to)
            .unwrap();
        g.until("the port unreachable", |g| g.phy.port_unreachable > before);
    }
    assert!(g.sockets.get_mut::<udp::Socket>(h).recv().is_err());
}

#[test]
fn a_fresh_stack_answers_the_guests_first_frame_without_asking_for_its_address() {
    // As after a resume: the guest has the gateway's MAC cached and sends at once; the stack's
    // answer is its first frame (no ARP request first, which would cost the answer).
    let frames = Arc::new(Mutex::new(Frames::default()));
    let wake = EventFd::new(EFD_NONBLOCK).unwrap();
    let _nat = Nat::start(
        frames.clone(),
        wake.try_clone().unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    )
    .unwrap();
    frames
        .lock()
        .from_guest
        .push_back(syn_frame(40000, (GATEWAY_ADDR, 9)));
    let _ = wake.write(1);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(first) = frames.lock().to_guest.front() {
            assert!(is_rst(first), "the first frame is the reset: {first:02x?}");
            break;
        }
        assert!(Instant::now() < deadline, "an answer");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn an_upload_then_an_answer_and_a_half_close_reach_the_guest_in_order() {
    let (l, port) = listener();
    let mut g = Guest::new(host_policy());
    let h = g.connect((GATEWAY_ADDR, port), 40020);
    let n = 2 << 20;
    let server = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut buf = vec![0u8; 64 << 10];
        let mut got = 0;
        while got < n {
            got += c.read(&mut buf).unwrap();
        }
        c.write_all(b"HTTP/1.0 200 OK\r\n\r\n").unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        while c.read(&mut buf).unwrap() > 0 {}
    });
    g.until("the connection", |g| g.sock(h).may_send());
    let answer = g.upload(h, &vec![7u8; n], "the answer and the FIN", |s| {
        assert_ne!(s.state(), tcp::State::Closed, "reset");
        !s.may_recv() && s.state() == tcp::State::CloseWait
    });
    assert_eq!(answer, b"HTTP/1.0 200 OK\r\n\r\n");
    g.sock(h).close();
    g.until("closed", |g| {
        matches!(g.sock(h).state(), tcp::State::Closed | tcp::State::TimeWait)
    });
    server.join().unwrap();
}

/// A host server that answers before it has read the whole upload and closes (its kernel
/// resets the connection, the rest of the upload unread): the guest still gets the answer,
/// then the reset, as it would from the server directly (an HTTP server refusing a large
/// POST does this).
#[test]
fn an_answer_sent_before_the_host_resets_reaches_the_guest_before_the_reset() {
    let (l, port) = listener();
    let mut g = Guest::new(host_policy());
    let h = g.connect((GATEWAY_ADDR, port), 40030);
    let n = 2 << 20;
    let answer_text = b"HTTP/1.0 413 Payload Too Large\r\n\r\ntoo large\n";
    let server = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut buf = vec![0u8; 4 << 10];
        let mut got = 0;
        while got < 64 << 10 {
            got += c.read(&mut buf).unwrap();
        }
        c.write_all(answer_text).unwrap();
        // Closed with unread bytes: the host's kernel sends a reset.
        drop(c);
    });
    g.until("the connection", |g| g.sock(h).may_send());
    let answer = g.upload(h, &vec![7u8; n], "the answer, then the end", |s| {
        matches!(s.state(), tcp::State::Closed | tcp::State::CloseWait)
    });
    assert_eq!(answer, answer_text, "{}", String::from_utf8_lossy(&answer));
    server.join().unwrap();
}
