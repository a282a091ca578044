//! The egress policy of one sandbox, enforced: which guest TCP connections the NAT may open
//! on the host, and the DNS answers the guest gets from the VMM.
//!
//! Enforcement is on the destination address. The guest's only DNS server is the VMM
//! ([`DNS_ADDR`](super::DNS_ADDR)); it answers allowed names alone and *pins* each address an allowed name
//! resolved to, so that [`EgressState::tcp_target`] lets a connection through when its
//! destination is
//!
//! - the gateway [`GATEWAY_ADDR`] and the policy allows `host`: it goes to the host's
//!   `127.0.0.1` on the same port;
//! - covered by an address entry of the policy (`*`, an IP, a CIDR), or
//! - pinned from a name the policy still allows,
//!
//! and no `deny` address entry covers it. Some addresses are never reached through `*` or a
//! name: loopback, `0.0.0.0/8`, multicast and reserved blocks, the broadcast address and the
//! guest's own network `10.0.2.0/24` are refused whatever the policy says (the host's loopback
//! is reached through the gateway alone), and link-local `169.254.0.0/16` (cloud metadata
//! services live there) only through an explicit IP or CIDR entry. A name resolving to such an
//! address is answered without it.
//!
//! # DNS
//!
//! A query is answered as follows (one question; anything else is refused as below):
//!
//! | query | answer |
//! |---|---|
//! | `A` of an allowed name | its IPv4 addresses from the host's resolver (at most [`MAX_ANSWER_ADDRS`], TTL [`ANSWER_TTL`]), each pinned; `NXDOMAIN` when the host says the name does not exist, `SERVFAIL` when the host's resolver fails or takes longer than [`RESOLVE_TIMEOUT`] |
//! | `A` of `host.dormant.internal` when `host` is allowed | [`GATEWAY_ADDR`] |
//! | any other type of an allowed name (`AAAA`, `MX`, ...) | no records (`NOERROR`): the guest network is IPv4 only |
//! | a name the policy does not allow, a name with characters other than letters, digits, `-` and `_`, or any other name under `dormant.internal` | `NXDOMAIN` |
//! | a message that does not parse, or with other than one question | `FORMERR` |
//! | an opcode other than `QUERY`, a class other than `IN`, a query type unknown to the parser | `NOTIMP` |
//! | a response, a datagram shorter than a DNS header or longer than [`MAX_QUERY_LEN`] | dropped (no answer) |
//!
//! Replies carry no EDNS record and stay under 512 bytes.
//!
//! # Blocking, and who calls what
//!
//! Resolving a name asks the host's resolver (`getaddrinfo`), which blocks; the state must
//! not be locked meanwhile. So answering is three steps:
//!
//! 1. [`EgressState::dns_plan`] (`&mut self`, never blocks): parses the query and gives a
//!    [`DnsPlan`]: drop it, send a reply now (the policy decided, or the name was cached), or
//!    resolve a name first ([`DnsLookup`]).
//! 2. [`DnsLookup::resolve`] (no state, blocks up to [`RESOLVE_TIMEOUT`]): on a thread other
//!    than the device's.
//! 3. [`EgressState::dns_finish`] (`&mut self`, never blocks): checks the policy again (it may
//!    have changed meanwhile), pins the addresses, caches them and gives the reply.
//!
//! [`EgressState::answer_dns`] does all three at once, holding `&mut self` while it blocks: for
//! tests and callers with nothing else to do.
//!
//! # Bounds
//!
//! Per sandbox: at most [`MAX_PINNED_ADDRS`] pinned addresses (least recently resolved go
//! first), each remembering at most [`MAX_NAMES_PER_ADDR`] names, and at most
//! [`MAX_CACHED_NAMES`] cached names, each with at most [`MAX_ANSWER_ADDRS`] addresses; names
//! are at most 253 bytes. Process-wide: at most [`MAX_LOOKUPS_IN_FLIGHT`] host lookups run at
//! once (a lookup past its deadline still holds its slot until the host resolver returns);
//! more are answered `SERVFAIL` at once.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dormant_core::network::{HOST_ALIAS, MAX_NAME_LEN, NetworkPolicy, Rule};
use simple_dns::rdata::{A, RData};
use simple_dns::{CLASS, Packet, PacketFlag, QCLASS, QTYPE, Question, RCODE, ResourceRecord, TYPE};

use super::{GATEWAY_ADDR, GUEST_ADDR, GUEST_PREFIX};

/// The most addresses pinned per sandbox; past it the least recently resolved is unpinned.
pub const MAX_PINNED_ADDRS: usize = 4096;

/// The most names one pinned address remembers (an address shared by many names, such as a
/// CDN's, keeps the most recently resolved ones).
pub const MAX_NAMES_PER_ADDR: usize = 4;

/// The most names whose host answers are cached per sandbox.
pub const MAX_CACHED_NAMES: usize = 1024;

/// The most addresses in one answer (and kept per cached name).
pub const MAX_ANSWER_ADDRS: usize = 8;

/// The longest DNS query datagram answered, in bytes (the classic UDP limit; a query is far
/// shorter).
pub const MAX_QUERY_LEN: usize = 512;

/// How long the guest may cache an answer, and the VMM caches the host's: 60 s.
pub const ANSWER_TTL: Duration = Duration::from_secs(60);

/// How long a name the host says does not exist is remembered as such: 10 s.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(10);

/// How long [`DnsLookup::resolve`] waits for the host's resolver: 4 s (the guest's resolver
/// retries after 5 s).
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(4);

/// The most host lookups running at once in the process, all sandboxes together.
pub const MAX_LOOKUPS_IN_FLIGHT: usize = 32;

const DNS_HEADER_LEN: usize = 12;

/// The egress state of one sandbox: its policy, the addresses pinned from the names it
/// allowed, and the host's recent DNS answers. See the module docs.
#[derive(Debug)]
pub struct EgressState {
    policy: NetworkPolicy,
    pins: Pins,
    cache: HashMap<Arc<str>, Cached>,
}

impl EgressState {
    /// State under `policy`, nothing pinned.
    pub fn new(policy: NetworkPolicy) -> EgressState {
        EgressState {
            policy,
            pins: Pins::default(),
            cache: HashMap::new(),
        }
    }

    /// Replaces the policy. Pins of names it no longer allows are dropped, so those addresses
    /// are refused from now on (unless an address entry allows them), and the cached answers
    /// are forgotten (the next lookups ask the host again, under the new `deny` entries).
    /// Connections already open are the caller's to reset ([`Self::tcp_target`] says which
    /// destinations are still allowed).
    pub fn set_policy(&mut self, policy: NetworkPolicy) {
        self.policy = policy;
        let policy = &self.policy;
        self.pins.retain_names(|name| policy.allows_name(name));
        self.cache.clear();
    }

    /// The policy in force.
    pub fn policy(&self) -> &NetworkPolicy {
        &self.policy
    }

    /// Where a guest TCP connection to `dst` goes on the host: `Some(address)` to connect to
    /// when the policy allows it (the gateway's port `p` is the host's `127.0.0.1:p` when
    /// `host` is allowed; any other allowed destination is itself), `None` to refuse it (the
    /// NAT answers with a reset). See the module docs for the rules.
    pub fn tcp_target(&self, dst: SocketAddrV4) -> Option<SocketAddr> {
        let ip = *dst.ip();
        if dst.port() == 0 {
            return None;
        }
        if ip == GATEWAY_ADDR {
            return self
                .policy
                .allows_host()
                .then(|| SocketAddr::from((Ipv4Addr::LOCALHOST, dst.port())));
        }
        self.addr_allowed(ip)
            .then_some(SocketAddr::V4(SocketAddrV4::new(ip, dst.port())))
    }

    /// Whether the guest may reach `ip` (not the gateway) under the policy and the pins.
    fn addr_allowed(&self, ip: Ipv4Addr) -> bool {
        let any = IpAddr::V4(ip);
        match reach(ip) {
            Reach::Never => false,
            _ if self.policy.denies_addr(any) => false,
            Reach::ExplicitOnly => self
                .policy
                .allow
                .iter()
                .any(|r| matches!(r, Rule::Net(n) if n.contains(any))),
            Reach::Normal => {
                self.policy.allows_addr(any)
                    || self
                        .pins
                        .names(ip)
                        .iter()
                        .any(|name| self.policy.allows_name(name))
            }
        }
    }

    /// Whether `ip` is pinned from a name (whether or not the policy still allows that name).
    pub fn is_pinned(&self, ip: Ipv4Addr) -> bool {
        !self.pins.names(ip).is_empty()
    }

    /// How many addresses are pinned now (at most [`MAX_PINNED_ADDRS`]).
    pub fn pinned_count(&self) -> usize {
        self.pins.by_addr.len()
    }

    /// Step 1 of answering a DNS query datagram from the guest (see the module docs): never
    /// blocks. A name in the cache is answered (and its addresses pinned again) at once.
    pub fn dns_plan(&mut self, query: &[u8]) -> DnsPlan {
        let query = match parse_query(query) {
            Ok(q) => q,
            Err(Some(reply)) => return DnsPlan::Reply(reply),
            Err(None) => return DnsPlan::Drop,
        };
        let Some(name) = query.name.clone() else {
            return DnsPlan::Reply(query.reply(RCODE::NameError, &[], 0));
        };
        if name.as_ref() == HOST_ALIAS || is_internal(&name) {
            let allowed = name.as_ref() == HOST_ALIAS && self.policy.allows_host();
            return DnsPlan::Reply(match (allowed, query.wants_a) {
                (false, _) => query.reply(RCODE::NameError, &[], 0),
                (true, true) => query.reply(RCODE::NoError, &[GATEWAY_ADDR], ttl_secs(ANSWER_TTL)),
                (true, false) => query.reply(RCODE::NoError, &[], ttl_secs(ANSWER_TTL)),
            });
        }
        if !self.policy.allows_name(&name) {
            return DnsPlan::Reply(query.reply(RCODE::NameError, &[], 0));
        }
        if !query.wants_a {
            return DnsPlan::Reply(query.reply(RCODE::NoError, &[], ttl_secs(ANSWER_TTL)));
        }
        let now = Instant::now();
        if let Some(cached) = self.cache.get(&name).filter(|c| c.expires > now) {
            let ttl = ttl_secs(cached.expires - now);
            let reply = match &cached.addrs {
                Some(addrs) => {
                    let addrs = addrs.clone();
                    for &a in &addrs {
                        self.pins.pin(a, &name);
                    }
                    query.reply(RCODE::NoError, &addrs, ttl)
                }
                None => query.reply(RCODE::NameError, &[], ttl),
            };
            return DnsPlan::Reply(reply);
        }
        DnsPlan::Resolve(DnsLookup { name, query })
    }

    /// Step 3 of answering a DNS query (see the module docs): never blocks. Gives the reply to
    /// `lookup` from the host's `answer`, pinning and caching the addresses the guest may
    /// reach; a name the policy stopped allowing since [`Self::dns_plan`] gets `NXDOMAIN`.
    pub fn dns_finish(&mut self, lookup: DnsLookup, answer: HostAnswer) -> Vec<u8> {
        let DnsLookup { name, query } = lookup;
        if !self.policy.allows_name(&name) {
            return query.reply(RCODE::NameError, &[], 0);
        }
        let addrs = match answer {
            HostAnswer::Failed => return query.reply(RCODE::ServerFailure, &[], 0),
            HostAnswer::NoSuchName => None,
            HostAnswer::Addrs(found) => {
                let mut addrs: Vec<Ipv4Addr> = Vec::new();
                for a in found {
                    if reach(a) == Reach::Normal
                        && !self.policy.denies_addr(IpAddr::V4(a))
                        && !addrs.contains(&a)
                        && addrs.len() < MAX_ANSWER_ADDRS
                    {
                        addrs.push(a);
                    }
                }
                Some(addrs)
            }
        };
        let ttl = if addrs.is_some() {
            ANSWER_TTL
        } else {
            NEGATIVE_TTL
        };
        for &a in addrs.iter().flatten() {
            self.pins.pin(a, &name);
        }
        let reply = match &addrs {
            Some(a) => query.reply(RCODE::NoError, a, ttl_secs(ttl)),
            None => query.reply(RCODE::NameError, &[], ttl_secs(ttl)),
        };
        self.cache_insert(name, addrs, Instant::now() + ttl);
        reply
    }

    /// Answers one DNS query datagram from the guest: [`Self::dns_plan`], then
    /// [`DnsLookup::resolve`] and [`Self::dns_finish`] when the name must be resolved.
    /// `None`: no answer (the datagram is dropped). Blocks up to [`RESOLVE_TIMEOUT`] while
    /// holding `&mut self`; a device should use the three steps instead.
    pub fn answer_dns(&mut self, query: &[u8]) -> Option<Vec<u8>> {
        match self.dns_plan(query) {
            DnsPlan::Drop => None,
            DnsPlan::Reply(r) => Some(r),
            DnsPlan::Resolve(lookup) => {
                let answer = lookup.resolve();
                Some(self.dns_finish(lookup, answer))
            }
        }
    }

    fn cache_insert(&mut self, name: Arc<str>, addrs: Option<Vec<Ipv4Addr>>, expires: Instant) {
        if self.cache.len() >= MAX_CACHED_NAMES && !self.cache.contains_key(&name) {
            let now = Instant::now();
            self.cache.retain(|_, c| c.expires > now);
            if self.cache.len() >= MAX_CACHED_NAMES {
                let oldest = self
                    .cache
                    .iter()
                    .min_by_key(|(_, c)| c.expires)
                    .map(|(n, _)| n.clone());
                if let Some(oldest) = oldest {
                    self.cache.remove(&oldest);
                }
            }
        }
        self.cache.insert(name, Cached { addrs, expires });
    }
}

/// What to do with a DNS query datagram: [`EgressState::dns_plan`].
#[derive(Debug)]
pub enum DnsPlan {
    /// Send nothing back (not a query, or not DNS).
    Drop,
    /// Send this reply datagram back to the guest.
    Reply(Vec<u8>),
    /// Resolve a name on the host first ([`DnsLookup::resolve`], off the device thread), then
    /// [`EgressState::dns_finish`] gives the reply.
    Resolve(DnsLookup),
}

/// A query waiting for the host's resolver: from [`EgressState::dns_plan`], for
/// [`EgressState::dns_finish`]. Holds no reference to the state (it can move to another
/// thread).
#[derive(Debug)]
pub struct DnsLookup {
    name: Arc<str>,
    query: Query,
}

impl DnsLookup {
    /// The name to resolve: lowercase, no trailing dot.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Asks the host's resolver for the name's IPv4 addresses, as the host's own programs
    /// would (its hosts file and search domains included). Blocks up to [`RESOLVE_TIMEOUT`]; past it, or with
    /// [`MAX_LOOKUPS_IN_FLIGHT`] lookups already running, gives [`HostAnswer::Failed`].
    pub fn resolve(&self) -> HostAnswer {
        resolve_v4(&self.name, RESOLVE_TIMEOUT)
    }
}

/// What the host's resolver said about a name: [`DnsLookup::resolve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostAnswer {
    /// The name's IPv4 addresses (possibly none: the name has only other records).
    Addrs(Vec<Ipv4Addr>),
    /// The name does not exist.
    NoSuchName,
    /// The resolver failed or took too long.
    Failed,
}

#[derive(Debug)]
struct Cached {
    /// `None`: the name does not exist.
    addrs: Option<Vec<Ipv4Addr>>,
    expires: Instant,
}

fn ttl_secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX).max(1)
}

/// Whether `name` is under `dormant.internal`, whose names the VMM alone answers.
fn is_internal(name: &str) -> bool {
    name == "dormant.internal" || name.ends_with(".dormant.internal")
}

/// How an address may be reached at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// Never (loopback, unspecified, multicast, reserved, broadcast, the guest's network).
    Never,
    /// Only through an explicit IP or CIDR entry (link-local).
    ExplicitOnly,
    /// Through `*`, an IP or CIDR entry, or a pinned name.
    Normal,
}

fn reach(ip: Ipv4Addr) -> Reach {
    let guest_net = u32::from(GUEST_ADDR) >> (32 - u32::from(GUEST_PREFIX));
    if ip.is_loopback()
        || ip.octets()[0] == 0
        || ip.is_multicast()
        || ip.octets()[0] >= 240
        || u32::from(ip) >> (32 - u32::from(GUEST_PREFIX)) == guest_net
    {
        Reach::Never
    } else if ip.is_link_local() {
        Reach::ExplicitOnly
    } else {
        Reach::Normal
    }
}

/// Addresses pinned from names, least recently resolved first out.
#[derive(Debug, Default)]
struct Pins {
    by_addr: HashMap<Ipv4Addr, Pin>,
    /// `stamp -> address`, oldest first.
    order: BTreeMap<u64, Ipv4Addr>,
    clock: u64,
}

#[derive(Debug)]
struct Pin {
    names: Vec<Arc<str>>,
    stamp: u64,
}

impl Pins {
    fn names(&self, ip: Ipv4Addr) -> &[Arc<str>] {
        self.by_addr.get(&ip).map_or(&[], |p| &p.names)
    }

    fn pin(&mut self, ip: Ipv4Addr, name: &Arc<str>) {
        self.clock += 1;
        let stamp = self.clock;
        if let Some(pin) = self.by_addr.get_mut(&ip) {
            self.order.remove(&pin.stamp);
            pin.stamp = stamp;
            pin.names.retain(|n| n != name);
            if pin.names.len() == MAX_NAMES_PER_ADDR {
                pin.names.remove(0);
            }
            pin.names.push(name.clone());
        } else {
            if self.by_addr.len() >= MAX_PINNED_ADDRS
                && let Some((_, oldest)) = self.order.pop_first()
            {
                self.by_addr.remove(&oldest);
            }
            self.by_addr.insert(
                ip,
                Pin {
                    names: vec![name.clone()],
                    stamp,
                },
            );
        }
        self.order.insert(stamp, ip);
    }

    fn retain_names(&mut self, keep: impl Fn(&str) -> bool) {
        let order = &mut self.order;
        self.by_addr.retain(|_, pin| {
            pin.names.retain(|n| keep(n));
            if pin.names.is_empty() {
                order.remove(&pin.stamp);
            }
            !pin.names.is_empty()
        });
    }
}

/// A parsed query: what a reply needs.
#[derive(Debug)]
struct Query {
    id: u16,
    recursion_desired: bool,
    question: Question<'static>,
    /// The name as policy text (lowercase, no trailing dot); `None` when it is not a host
    /// name (empty, or characters other than letters, digits, `-`, `_`, or too long).
    name: Option<Arc<str>>,
    /// An `A` query (else another type, answered without records).
    wants_a: bool,
}

impl Query {
    /// The reply with `rcode` and an `A` record for each of `addrs`.
    fn reply(&self, rcode: RCODE, addrs: &[Ipv4Addr], ttl: u32) -> Vec<u8> {
        let mut p = Packet::new_reply(self.id);
        let mut flags = PacketFlag::RECURSION_AVAILABLE;
        if self.recursion_desired {
            flags |= PacketFlag::RECURSION_DESIRED;
        }
        p.set_flags(flags);
        *p.rcode_mut() = rcode;
        p.questions.push(self.question.clone());
        for &a in addrs.iter().take(MAX_ANSWER_ADDRS) {
            p.answers.push(ResourceRecord::new(
                self.question.qname.clone(),
                CLASS::IN,
                ttl,
                RData::A(A { address: a.into() }),
            ));
        }
        // A question of at most 255 + 4 bytes and 8 compressed A records stay under 512
        // bytes; writing to a Vec cannot fail, but should it, a bare SERVFAIL says so.
        p.build_bytes_vec_compressed()
            .unwrap_or_else(|_| header_reply(self.id, 0, self.recursion_desired, RCODE::ServerFailure))
    }
}

/// Parses a query datagram. `Err(Some(reply))`: answer with that error reply; `Err(None)`:
/// drop it.
fn parse_query(bytes: &[u8]) -> Result<Query, Option<Vec<u8>>> {
    if bytes.len() < DNS_HEADER_LEN || bytes.len() > MAX_QUERY_LEN {
        return Err(None);
    }
    let id = u16::from_be_bytes([bytes[0], bytes[1]]);
    let flags = u16::from_be_bytes([bytes[2], bytes[3]]);
    let count = |i: usize| u16::from_be_bytes([bytes[i], bytes[i + 1]]);
    if flags & 0x8000 != 0 {
        return Err(None); // a response: never answer one (no reflection loops)
    }
    let opcode = (flags >> 11) & 0xf;
    let rd = flags & 0x0100 != 0;
    if opcode != 0 {
        return Err(Some(header_reply(id, opcode, rd, RCODE::NotImplemented)));
    }
    // Checked before the parser sizes its sections by these counts.
    if count(4) != 1 || count(6) != 0 || count(8) != 0 || count(10) > 1 {
        return Err(Some(header_reply(id, 0, rd, RCODE::FormatError)));
    }
    let packet = match Packet::parse(bytes) {
        Ok(p) => p,
        Err(
            simple_dns::SimpleDnsError::InvalidQType(_) | simple_dns::SimpleDnsError::InvalidQClass(_),
        ) => return Err(Some(header_reply(id, 0, rd, RCODE::NotImplemented))),
        Err(_) => return Err(Some(header_reply(id, 0, rd, RCODE::FormatError))),
    };
    let Some(question) = packet.questions.into_iter().next() else {
        return Err(Some(header_reply(id, 0, rd, RCODE::FormatError)));
    };
    if question.qclass != QCLASS::CLASS(CLASS::IN) || question.unicast_response {
        return Err(Some(header_reply(id, 0, rd, RCODE::NotImplemented)));
    }
    let name = host_name(&question);
    let wants_a = question.qtype == QTYPE::TYPE(TYPE::A);
    Ok(Query {
        id,
        recursion_desired: rd,
        question: question.into_owned(),
        name,
        wants_a,
    })
}

/// The question's name as policy text, when it is a host name.
fn host_name(q: &Question<'_>) -> Option<Arc<str>> {
    let labels = q.qname.get_labels();
    if labels.is_empty() {
        return None;
    }
    let mut name = String::new();
    for label in labels {
        let bytes: &[u8] = label.as_ref();
        if bytes.is_empty()
            || !bytes
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return None;
        }
        if !name.is_empty() {
            name.push('.');
        }
        name.extend(bytes.iter().map(|&b| char::from(b.to_ascii_lowercase())));
    }
    (name.len() <= MAX_NAME_LEN).then(|| Arc::from(name))
}

/// A reply of a header alone (no question echoed): for queries whose question is unusable.
fn header_reply(id: u16, opcode: u16, rd: bool, rcode: RCODE) -> Vec<u8> {
    let mut flags = 0x8000 | (opcode & 0xf) << 11 | 0x0080 | (rcode as u16 & 0xf);
    if rd {
        flags |= 0x0100;
    }
    let mut out = vec![0u8; DNS_HEADER_LEN];
    out[0..2].copy_from_slice(&id.to_be_bytes());
    out[2..4].copy_from_slice(&flags.to_be_bytes());
    out
}

/// Host lookups running now, process-wide.
static LOOKUPS_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Frees a lookup slot when the lookup's thread ends.
struct LookupSlot;

impl Drop for LookupSlot {
    fn drop(&mut self) {
        LOOKUPS_IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Resolves `name` (policy text) to IPv4 addresses on a thread of its own, waiting at most
/// `timeout`.
fn resolve_v4(name: &str, timeout: Duration) -> HostAnswer {
    if LOOKUPS_IN_FLIGHT
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < MAX_LOOKUPS_IN_FLIGHT).then_some(n + 1)
        })
        .is_err()
    {
        return HostAnswer::Failed;
    }
    let slot = LookupSlot;
    let Ok(cname) = CString::new(name) else {
        return HostAnswer::NoSuchName;
    };
    let (tx, rx) = mpsc::sync_channel(1);
    let spawned = std::thread::Builder::new()
        .name("dormant-dns".into())
        .spawn(move || {
            let _slot = slot;
            let _ = tx.send(getaddrinfo_v4(&cname));
        });
    if spawned.is_err() {
        return HostAnswer::Failed;
    }
    rx.recv_timeout(timeout).unwrap_or(HostAnswer::Failed)
}

/// `getaddrinfo(name, AF_INET)`, blocking.
fn getaddrinfo_v4(name: &CString) -> HostAnswer {
    // SAFETY: `addrinfo` is plain data; all-zero is a valid value (null pointers, no flags).
    let mut hints: libc::addrinfo = unsafe { std::mem::zeroed() };
    hints.ai_family = libc::AF_INET;
    hints.ai_socktype = libc::SOCK_STREAM;
    let mut list: *mut libc::addrinfo = std::ptr::null_mut();
    // SAFETY: `name` is a NUL-terminated string and `hints` a valid addrinfo, both alive for
    // the call; `list` receives a list that we free below with `freeaddrinfo`.
    let rc = unsafe { libc::getaddrinfo(name.as_ptr(), std::ptr::null(), &hints, &mut list) };
    match rc {
        0 => {}
        libc::EAI_NONAME => return HostAnswer::NoSuchName,
        libc::EAI_NODATA => return HostAnswer::Addrs(Vec::new()),
        _ => return HostAnswer::Failed,
    }
    let mut addrs = Vec::new();
    let mut node = list;
    while !node.is_null() {
        // SAFETY: `node` is an element of the list getaddrinfo returned, not yet freed.
        let ai = unsafe { &*node };
        if ai.ai_family == libc::AF_INET
            && !ai.ai_addr.is_null()
            && ai.ai_addrlen as usize >= std::mem::size_of::<libc::sockaddr_in>()
        {
            // SAFETY: an AF_INET entry's `ai_addr` points to a `sockaddr_in` of `ai_addrlen`
            // bytes (checked above); read unaligned to make no assumption on its alignment.
            let sin = unsafe { std::ptr::read_unaligned(ai.ai_addr.cast::<libc::sockaddr_in>()) };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            if !addrs.contains(&ip) && addrs.len() < MAX_ANSWER_ADDRS * 4 {
                addrs.push(ip);
            }
        }
        node = ai.ai_next;
    }
    if !list.is_null() {
        // SAFETY: `list` came from a successful getaddrinfo and is freed once.
        unsafe { libc::freeaddrinfo(list) };
    }
    HostAnswer::Addrs(addrs)
}

#[cfg(test)]
mod tests;
