use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use proptest::prelude::*;
use simple_dns::rdata::RData;
use simple_dns::{CLASS, Label, Name, OPCODE, Packet, PacketFlag, QCLASS, QTYPE, Question, RCODE, TYPE};

use super::*;

fn pol(allow: &[&str], deny: &[&str]) -> NetworkPolicy {
    NetworkPolicy::parse(allow, deny).expect("test policy parses")
}

fn query_of(id: u16, name: &str, qtype: TYPE) -> Vec<u8> {
    let mut p = Packet::new_query(id);
    p.set_flags(PacketFlag::RECURSION_DESIRED);
    p.questions.push(Question::new(
        Name::new_unchecked(name),
        QTYPE::TYPE(qtype),
        QCLASS::CLASS(CLASS::IN),
        false,
    ));
    p.build_bytes_vec().expect("query builds")
}

/// The reply's id, rcode and A addresses, after checking it is a reply echoing the question.
fn read_reply(reply: &[u8]) -> (u16, RCODE, Vec<Ipv4Addr>) {
    assert!(reply.len() <= 512, "reply of {} bytes", reply.len());
    let p = Packet::parse(reply).expect("reply parses");
    assert!(p.has_flags(PacketFlag::RESPONSE));
    let addrs = p
        .answers
        .iter()
        .map(|rr| match &rr.rdata {
            RData::A(a) => Ipv4Addr::from(a.address),
            other => panic!("unexpected record {other:?}"),
        })
        .collect();
    (p.id(), p.rcode(), addrs)
}

fn plan_reply(st: &mut EgressState, q: &[u8]) -> (u16, RCODE, Vec<Ipv4Addr>) {
    match st.dns_plan(q) {
        DnsPlan::Reply(r) => read_reply(&r),
        other => panic!("expected an immediate reply, got {other:?}"),
    }
}

fn v4(s: &str) -> Ipv4Addr {
    s.parse().expect("test address")
}

fn dst(s: &str, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(v4(s), port)
}

#[test]
fn the_host_alias_resolves_and_connects_only_when_host_is_allowed() {
    for (policy, allowed) in [
        (NetworkPolicy::off(), false),
        (NetworkPolicy::open(), false),
        (pol(&["*", "host"], &["host"]), false),
        (pol(&["host"], &[]), true),
        (pol(&["pypi.org", "host"], &["*.github.com"]), true),
    ] {
        let mut st = EgressState::new(policy.clone());
        let (id, rcode, addrs) = plan_reply(&mut st, &query_of(7, "Host.Dormant.Internal.", TYPE::A));
        assert_eq!(id, 7);
        if allowed {
            assert_eq!((rcode, addrs), (RCODE::NoError, vec![GATEWAY_ADDR]), "{policy:?}");
            let (_, rcode, addrs) = plan_reply(&mut st, &query_of(8, HOST_ALIAS, TYPE::AAAA));
            assert_eq!((rcode, addrs.len()), (RCODE::NoError, 0));
        } else {
            assert_eq!(rcode, RCODE::NameError, "{policy:?}");
        }
        let target = st.tcp_target(SocketAddrV4::new(GATEWAY_ADDR, 8080));
        let expected = allowed.then(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
        assert_eq!(target, expected, "{policy:?}");
        // Other names under dormant.internal never resolve, and the loopback is never reached
        // by its own address.
        for other in ["x.dormant.internal", "dormant.internal", "a.host.dormant.internal"] {
            let (_, rcode, _) = plan_reply(&mut st, &query_of(9, other, TYPE::A));
            assert_eq!(rcode, RCODE::NameError, "{other}");
        }
        assert_eq!(st.tcp_target(dst("127.0.0.1", 8080)), None);
    }
}

#[test]
fn allowed_names_are_resolved_pinned_and_cached_denied_ones_are_nxdomain() {
    let mut st = EgressState::new(pol(&["pypi.org", "*.github.com"], &["evil.github.com"]));
    for denied in ["example.com", "evil.github.com", "github.com", "files.pypi.org"] {
        let (_, rcode, _) = plan_reply(&mut st, &query_of(1, denied, TYPE::A));
        assert_eq!(rcode, RCODE::NameError, "{denied}");
    }
    // Not a host name: NXDOMAIN whatever the policy.
    let mut open = EgressState::new(NetworkPolicy::open());
    let odd: [&[&[u8]]; 4] = [
        &[b"a b", b"com"],
        &[b"x\xc3\xa9", b"com"],
        &[b"a.b", b"com"],
        &[],
    ];
    for labels in odd {
        let mut p = Packet::new_query(1);
        let labels: Vec<Label<'_>> = labels.iter().map(|l| Label::new_unchecked(*l)).collect();
        p.questions.push(Question::new(
            Name::new_with_labels(&labels),
            QTYPE::TYPE(TYPE::A),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        let q = p.build_bytes_vec().expect("query builds");
        let (_, rcode, _) = plan_reply(&mut open, &q);
        assert_eq!(rcode, RCODE::NameError, "{labels:?}");
    }

    // Other types of an allowed name: no records.
    let (_, rcode, addrs) = plan_reply(&mut st, &query_of(2, "pypi.org", TYPE::AAAA));
    assert_eq!((rcode, addrs.len()), (RCODE::NoError, 0));

    let lookup = match st.dns_plan(&query_of(3, "PyPI.org", TYPE::A)) {
        DnsPlan::Resolve(l) => l,
        other => panic!("expected a lookup, got {other:?}"),
    };
    assert_eq!(lookup.name(), "pypi.org");
    assert_eq!(st.tcp_target(dst("203.0.113.80", 443)), None, "not pinned yet");
    let found = ["203.0.113.80", "127.0.0.1", "169.254.169.254", "10.0.2.9", "203.0.113.80", "0.1.2.3"];
    let reply = st.dns_finish(
        lookup,
        HostAnswer::Addrs(found.iter().map(|s| v4(s)).collect()),
    );
    let (id, rcode, addrs) = read_reply(&reply);
    assert_eq!((id, rcode, addrs), (3, RCODE::NoError, vec![v4("203.0.113.80")]));
    assert_eq!(
        st.tcp_target(dst("203.0.113.80", 443)),
        Some(SocketAddr::from(([203, 0, 113, 80], 443)))
    );
    assert_eq!(st.tcp_target(dst("203.0.113.81", 443)), None);
    assert!(!st.is_pinned(v4("169.254.169.254")) && !st.is_pinned(v4("127.0.0.1")));
    assert_eq!(st.pinned_count(), 1);

    // The cache answers at once; a name the host does not know is NXDOMAIN, cached too.
    let (_, rcode, addrs) = plan_reply(&mut st, &query_of(4, "pypi.org", TYPE::A));
    assert_eq!((rcode, addrs), (RCODE::NoError, vec![v4("203.0.113.80")]));
    let DnsPlan::Resolve(lookup) = st.dns_plan(&query_of(5, "nope.github.com", TYPE::A)) else {
        panic!("expected a lookup");
    };
    let (_, rcode, _) = read_reply(&st.dns_finish(lookup, HostAnswer::NoSuchName));
    assert_eq!(rcode, RCODE::NameError);
    let (_, rcode, _) = plan_reply(&mut st, &query_of(6, "nope.github.com", TYPE::A));
    assert_eq!(rcode, RCODE::NameError);
    // A failing resolver is SERVFAIL, not cached.
    let DnsPlan::Resolve(lookup) = st.dns_plan(&query_of(7, "api.github.com", TYPE::A)) else {
        panic!("expected a lookup");
    };
    let (_, rcode, _) = read_reply(&st.dns_finish(lookup, HostAnswer::Failed));
    assert_eq!(rcode, RCODE::ServerFailure);
    assert!(matches!(
        st.dns_plan(&query_of(8, "api.github.com", TYPE::A)),
        DnsPlan::Resolve(_)
    ));
}

#[test]
fn a_new_policy_drops_the_pins_and_answers_of_names_it_no_longer_allows() {
    let mut st = EgressState::new(pol(&["pypi.org", "crates.io"], &[]));
    for (name, addr) in [("pypi.org", "203.0.113.80"), ("crates.io", "198.51.100.7")] {
        let DnsPlan::Resolve(l) = st.dns_plan(&query_of(1, name, TYPE::A)) else {
            panic!("expected a lookup");
        };
        st.dns_finish(l, HostAnswer::Addrs(vec![v4(addr)]));
    }
    assert!(st.tcp_target(dst("203.0.113.80", 443)).is_some());
    assert!(st.tcp_target(dst("198.51.100.7", 443)).is_some());

    st.set_policy(pol(&["crates.io"], &[]));
    assert_eq!(st.policy(), &pol(&["crates.io"], &[]));
    assert_eq!(st.tcp_target(dst("203.0.113.80", 443)), None);
    assert!(!st.is_pinned(v4("203.0.113.80")));
    assert!(st.tcp_target(dst("198.51.100.7", 443)).is_some());
    let (_, rcode, _) = plan_reply(&mut st, &query_of(2, "pypi.org", TYPE::A));
    assert_eq!(rcode, RCODE::NameError);

    // A lookup planned under the old policy and finished under a new one that denies the
    // name is NXDOMAIN and pins nothing.
    let mut st = EgressState::new(pol(&["pypi.org"], &[]));
    let DnsPlan::Resolve(l) = st.dns_plan(&query_of(4, "pypi.org", TYPE::A)) else {
        panic!("expected a lookup");
    };
    st.set_policy(NetworkPolicy::off());
    let (_, rcode, _) = read_reply(&st.dns_finish(l, HostAnswer::Addrs(vec![v4("203.0.113.80")])));
    assert_eq!(rcode, RCODE::NameError);
    assert_eq!(st.pinned_count(), 0);
}

#[test]
fn deny_entries_win_over_names_and_addresses() {
    let mut st = EgressState::new(pol(&["pypi.org", "203.0.0.0/8"], &["203.0.113.0/24"]));
    let DnsPlan::Resolve(l) = st.dns_plan(&query_of(1, "pypi.org", TYPE::A)) else {
        panic!("expected a lookup");
    };
    let reply = st.dns_finish(l, HostAnswer::Addrs(vec![v4("203.0.113.80"), v4("203.0.114.1")]));
    let (_, rcode, addrs) = read_reply(&reply);
    assert_eq!((rcode, addrs), (RCODE::NoError, vec![v4("203.0.114.1")]));
    assert_eq!(st.tcp_target(dst("203.0.113.80", 443)), None);
    assert!(st.tcp_target(dst("203.0.114.1", 443)).is_some());
    assert!(st.tcp_target(dst("203.9.9.9", 443)).is_some());
}

#[test]
fn special_addresses_are_never_reached_and_link_local_only_when_named() {
    for policy in [
        NetworkPolicy::open(),
        pol(&["*", "127.0.0.0/8", "0.0.0.0/0", "10.0.2.0/24", "host"], &[]),
    ] {
        let st = EgressState::new(policy);
        for never in [
            "127.0.0.1",
            "127.1.2.3",
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "10.0.2.3",
            "10.0.2.15",
            "10.0.2.255",
        ] {
            assert_eq!(st.tcp_target(dst(never, 80)), None, "{never}");
        }
        assert!(st.tcp_target(dst("10.0.3.1", 80)).is_some());
        assert_eq!(st.tcp_target(dst("1.1.1.1", 0)), None, "port 0");
    }
    let open = EgressState::new(NetworkPolicy::open());
    assert_eq!(open.tcp_target(dst("169.254.169.254", 80)), None);
    let named = EgressState::new(pol(&["169.254.169.254"], &[]));
    assert!(named.tcp_target(dst("169.254.169.254", 80)).is_some());
    let cidr = EgressState::new(pol(&["169.254.0.0/16"], &["169.254.169.254"]));
    assert!(cidr.tcp_target(dst("169.254.1.1", 80)).is_some());
    assert_eq!(cidr.tcp_target(dst("169.254.169.254", 80)), None);
}

#[test]
fn malformed_queries_are_dropped_or_answered_with_an_error() {
    let mut st = EgressState::new(NetworkPolicy::open());
    let good = query_of(0x1234, "pypi.org", TYPE::A);
    // Too short, too long, a response: dropped.
    assert!(matches!(st.dns_plan(&good[..11]), DnsPlan::Drop));
    let mut long = good.clone();
    long.resize(MAX_QUERY_LEN + 1, 0);
    assert!(matches!(st.dns_plan(&long), DnsPlan::Drop));
    let mut response = good.clone();
    response[2] |= 0x80;
    assert!(matches!(st.dns_plan(&response), DnsPlan::Drop));

    let header_only = |st: &mut EgressState, q: &[u8]| match st.dns_plan(q) {
        DnsPlan::Reply(r) => {
            assert_eq!(r.len(), 12);
            assert_eq!(&r[..2], &q[..2], "id echoed");
            assert!(r[2] & 0x80 != 0, "a response");
            assert!(r[2] & 0x01 != 0, "RD echoed");
            r[3] & 0x0f
        }
        other => panic!("expected an error reply, got {other:?}"),
    };
    // Two questions, an answer section, a truncated question: FORMERR (1).
    let mut two = good.clone();
    two[5] = 2;
    assert_eq!(header_only(&mut st, &two), 1);
    let mut answers = good.clone();
    answers[7] = 1;
    assert_eq!(header_only(&mut st, &answers), 1);
    assert_eq!(header_only(&mut st, &good[..good.len() - 3]), 1);
    // Another opcode, another class, an unknown type: NOTIMP (4).
    let mut status = good.clone();
    status[2] |= (OPCODE::ServerStatusRequest as u8) << 3;
    assert_eq!(header_only(&mut st, &status), 4);
    let mut chaos = good.clone();
    let n = chaos.len();
    chaos[n - 1] = 3;
    assert_eq!(header_only(&mut st, &chaos), 4);
    let mut unknown = good.clone();
    unknown[n - 4..n - 2].copy_from_slice(&0xfff0u16.to_be_bytes());
    assert_eq!(header_only(&mut st, &unknown), 4);
    // A compression pointer to itself ends the parse (pointers must point back).
    let mut pointer = good[..12].to_vec();
    pointer.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
    assert_eq!(header_only(&mut st, &pointer), 1);
    // The well-formed query is still fine after all that.
    assert!(matches!(st.dns_plan(&good), DnsPlan::Resolve(_)));
}

#[test]
fn pins_and_the_cache_stay_within_their_bounds() {
    let mut st = EgressState::new(pol(&["*.example.com"], &[]));
    let names = MAX_PINNED_ADDRS / MAX_ANSWER_ADDRS + 10;
    let mut last = Vec::new();
    for i in 0..names {
        let name = format!("n{i}.example.com");
        let DnsPlan::Resolve(l) = st.dns_plan(&query_of(1, &name, TYPE::A)) else {
            panic!("expected a lookup for {name}");
        };
        // Eight addresses per name, and more than eight offered.
        last = (0..MAX_ANSWER_ADDRS as u32 + 3)
            .map(|k| Ipv4Addr::from(0x0b00_0000 + (i as u32) * 16 + k))
            .collect();
        let (_, _, addrs) = read_reply(&st.dns_finish(l, HostAnswer::Addrs(last.clone())));
        assert_eq!(addrs.len(), MAX_ANSWER_ADDRS);
        assert!(st.pinned_count() <= MAX_PINNED_ADDRS);
        assert!(st.cache.len() <= MAX_CACHED_NAMES);
        assert_eq!(st.pins.order.len(), st.pinned_count());
    }
    assert_eq!(st.pinned_count(), MAX_PINNED_ADDRS);
    assert!(st.tcp_target(SocketAddrV4::new(last[0], 80)).is_some());
    assert!(!st.is_pinned(Ipv4Addr::from(0x0b00_0000)), "the oldest went first");
    assert_eq!(st.cache.len(), MAX_CACHED_NAMES.min(names));

    // One address shared by many names remembers the last few.
    let mut st = EgressState::new(pol(&["*.cdn.test"], &[]));
    for i in 0..MAX_NAMES_PER_ADDR + 3 {
        let DnsPlan::Resolve(l) = st.dns_plan(&query_of(1, &format!("s{i}.cdn.test"), TYPE::A)) else {
            panic!("expected a lookup");
        };
        st.dns_finish(l, HostAnswer::Addrs(vec![v4("198.51.100.1")]));
    }
    assert_eq!(st.pins.names(v4("198.51.100.1")).len(), MAX_NAMES_PER_ADDR);
    assert_eq!(st.pinned_count(), 1);
}

#[test]
fn the_host_resolver_answers_and_loopback_addresses_are_left_out() {
    let mut st = EgressState::new(NetworkPolicy::open());
    // The hosts file maps localhost to 127.0.0.1, which the guest is never given.
    let DnsPlan::Resolve(l) = st.dns_plan(&query_of(1, "localhost", TYPE::A)) else {
        panic!("expected a lookup");
    };
    match l.resolve() {
        HostAnswer::Addrs(a) => assert!(a.contains(&Ipv4Addr::LOCALHOST), "{a:?}"),
        other => panic!("localhost: {other:?}"),
    }
    let (_, rcode, addrs) = read_reply(&st.answer_dns(&query_of(1, "localhost", TYPE::A)).expect("reply"));
    assert_eq!((rcode, addrs.len()), (RCODE::NoError, 0));
    // `.invalid` never exists (RFC 6761).
    let reply = st.answer_dns(&query_of(2, "nothing.invalid", TYPE::A)).expect("reply");
    assert_eq!(read_reply(&reply).1, RCODE::NameError);
}

fn entry() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("*".to_string()),
        Just("host".to_string()),
        Just("pypi.org".to_string()),
        Just("*.example.com".to_string()),
        (any::<[u8; 4]>(), 0u8..=32).prop_map(|(a, p)| format!("{}/{p}", Ipv4Addr::from(a))),
        any::<[u8; 4]>().prop_map(|a| Ipv4Addr::from(a).to_string()),
    ]
}

fn policy() -> impl Strategy<Value = NetworkPolicy> {
    (
        proptest::collection::vec(entry(), 0..5),
        proptest::collection::vec(entry(), 0..3),
    )
        .prop_map(|(a, d)| NetworkPolicy::parse(a, d).expect("generated entries parse"))
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(HOST_ALIAS.to_string()),
        Just("pypi.org".to_string()),
        "[a-z0-9]{1,8}\\.example\\.com",
        "[a-zA-Z0-9_.-]{0,70}",
        "\\PC{0,20}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any datagram: no panic; a reply is at most 512 bytes, a response with the query's id;
    /// a lookup only for a name the policy allows.
    #[test]
    fn any_datagram_gets_a_bounded_answer_or_none(
        pol in policy(),
        bytes in proptest::collection::vec(any::<u8>(), 0..700),
    ) {
        let mut st = EgressState::new(pol.clone());
        match st.dns_plan(&bytes) {
            DnsPlan::Drop => {}
            DnsPlan::Reply(r) => {
                prop_assert!(r.len() >= 12 && r.len() <= 512);
                prop_assert_eq!(&r[..2], &bytes[..2]);
                prop_assert!(r[2] & 0x80 != 0);
            }
            DnsPlan::Resolve(l) => {
                prop_assert!(pol.allows_name(l.name()));
                let r = st.dns_finish(l, HostAnswer::Addrs(vec![Ipv4Addr::new(198, 51, 100, 1)]));
                prop_assert!(r.len() <= 512);
            }
        }
    }

    /// Well-formed queries of any name and type, with host answers of any addresses: the
    /// reply parses, is at most 512 bytes, holds only addresses the guest may then reach.
    #[test]
    fn queries_get_replies_with_reachable_addresses_only(
        pol in policy(),
        id in any::<u16>(),
        qname in name(),
        qtype in prop_oneof![Just(TYPE::A), Just(TYPE::AAAA), Just(TYPE::MX), Just(TYPE::TXT)],
        found in proptest::collection::vec(any::<[u8; 4]>(), 0..20),
    ) {
        let Some(q) = checked_query(id, &qname, qtype) else {
            return Ok(());
        };
        let mut st = EgressState::new(pol.clone());
        let reply = match st.dns_plan(&q) {
            DnsPlan::Drop => return Err(TestCaseError::fail("a well-formed query was dropped")),
            DnsPlan::Reply(r) => r,
            DnsPlan::Resolve(l) => {
                prop_assert!(pol.allows_name(l.name()) && qtype == TYPE::A);
                st.dns_finish(l, HostAnswer::Addrs(found.iter().map(|a| Ipv4Addr::from(*a)).collect()))
            }
        };
        let (rid, rcode, addrs) = read_reply(&reply);
        prop_assert_eq!(rid, id);
        prop_assert!(addrs.len() <= MAX_ANSWER_ADDRS);
        if !addrs.is_empty() {
            prop_assert_eq!(rcode, RCODE::NoError);
        }
        for a in addrs {
            let target = st.tcp_target(SocketAddrV4::new(a, 443));
            if a == GATEWAY_ADDR {
                prop_assert!(pol.allows_host());
                prop_assert_eq!(target, Some(SocketAddr::from(([127, 0, 0, 1], 443))));
            } else {
                prop_assert_eq!(target, Some(SocketAddr::V4(SocketAddrV4::new(a, 443))));
            }
        }
    }

    /// The connection decision: deny entries always win, the host's loopback only through
    /// the gateway with `host`, a target is the destination itself otherwise.
    #[test]
    fn tcp_targets_follow_the_policy(
        pol in policy(),
        ip in any::<[u8; 4]>(),
        port in 1u16..,
    ) {
        let ip = Ipv4Addr::from(ip);
        let st = EgressState::new(pol.clone());
        let target = st.tcp_target(SocketAddrV4::new(ip, port));
        if ip == GATEWAY_ADDR {
            prop_assert_eq!(target.is_some(), pol.allows_host());
            prop_assert_eq!(pol.allows_host(), pol.allow.contains(&Rule::Host) && !pol.deny.contains(&Rule::Host));
        } else if let Some(t) = target {
            prop_assert_eq!(t, SocketAddr::V4(SocketAddrV4::new(ip, port)));
            prop_assert!(!pol.denies_addr(IpAddr::V4(ip)));
            prop_assert!(!pol.deny.contains(&Rule::Any));
            prop_assert!(!ip.is_loopback() && !ip.is_unspecified() && !ip.is_multicast());
            prop_assert!(pol.allows_addr(IpAddr::V4(ip)));
        }
        if pol.deny.contains(&Rule::Any) {
            prop_assert!(ip == GATEWAY_ADDR || target.is_none());
        }
    }
}

/// A one-question query for `name` when it is a valid DNS name and the query fits.
fn checked_query(id: u16, name: &str, qtype: TYPE) -> Option<Vec<u8>> {
    let mut p = Packet::new_query(id);
    p.set_flags(PacketFlag::RECURSION_DESIRED);
    p.questions.push(Question::new(
        Name::new(name).ok()?,
        QTYPE::TYPE(qtype),
        QCLASS::CLASS(CLASS::IN),
        false,
    ));
    p.build_bytes_vec().ok().filter(|b| b.len() <= MAX_QUERY_LEN)
}
