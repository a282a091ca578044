//! Networking, as far as the contract goes: which destinations a sandbox may reach
//! ([`NetworkPolicy`], its egress policy), which guest ports the host reaches ([`PortMapping`]),
//! and the two capabilities a tier with networking implements: [`Ports`] (expose a guest port on
//! the host) and [`Egress`] (change the policy while running).
//!
//! The KVM tier has both (a virtio-net device backed by a userspace TCP/IP stack doing NAT to
//! host sockets, and ports carried over virtio-vsock); the WASI tier has neither: WASI preview 1
//! has no sockets, so a spec asking for networking there is refused with
//! [`Error::Unsupported`].
//!
//! # Policy entries
//!
//! A policy is two lists of entries, `allow` and `deny`; a destination is reachable when an
//! `allow` entry matches it and no `deny` entry does. Default: nothing is allowed (networking
//! off). Each entry, written as a string:
//!
//! | entry | matches |
//! |---|---|
//! | `*` | every destination ([`Rule::Any`]) except the host's own loopback |
//! | `host` | the host's loopback, which the guest reaches as [`HOST_ALIAS`] ([`Rule::Host`]) |
//! | `pypi.org` | that name ([`Rule::Domain`]), case-insensitive, trailing dot ignored |
//! | `*.github.com` | every name under `github.com`, not `github.com` itself |
//! | `10.1.2.3`, `::1` | that address ([`Rule::Net`] with a full prefix) |
//! | `10.0.0.0/8` | that CIDR block |
//!
//! Names are matched when the guest resolves them (the tier answers the guest's DNS itself);
//! the addresses an allowed name resolved to are then reachable too, unless a `deny` CIDR
//! covers them. Enforcement is on the destination address, so a guest that skips DNS reaches
//! only the addresses and blocks the policy names.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

/// The name under which the guest reaches the host's loopback (`127.0.0.1` of the machine
/// running dormant) when the policy allows `host`.
pub const HOST_ALIAS: &str = "host.dormant.internal";

/// At most this many entries in `allow` and in `deny` each.
pub const MAX_POLICY_RULES: usize = 256;

/// The longest DNS name an entry may hold (RFC 1035: 253 characters as text).
pub const MAX_NAME_LEN: usize = 253;

/// An address block: `addr/prefix` (a single address has the full prefix, 32 or 128).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// The block of `addr` with `prefix` leading bits; the host bits are cleared.
    /// Errors: a prefix longer than the address ([`Error::InvalidArgument`]).
    pub fn new(addr: IpAddr, prefix: u8) -> Result<IpNet> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(Error::InvalidArgument(format!(
                "prefix /{prefix} is longer than the address {addr} ({max} bits)"
            )));
        }
        let addr = match addr {
            IpAddr::V4(a) => {
                let bits = u32::from(a) & mask32(prefix);
                IpAddr::V4(bits.into())
            }
            IpAddr::V6(a) => {
                let bits = u128::from(a) & mask128(prefix);
                IpAddr::V6(bits.into())
            }
        };
        Ok(IpNet { addr, prefix })
    }

    /// The first address of the block.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is in the block (an IPv4 address is never in an IPv6 block, and the
    /// other way round; an IPv4-mapped IPv6 address counts as its IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => u32::from(a) & mask32(self.prefix) == u32::from(n),
            (IpAddr::V6(n), IpAddr::V6(a)) => u128::from(a) & mask128(self.prefix) == u128::from(n),
            _ => false,
        }
    }
}

fn mask32(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

fn mask128(prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(prefix))
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let full = if self.addr.is_ipv4() { 32 } else { 128 };
        if self.prefix == full {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}/{}", self.addr, self.prefix)
        }
    }
}

/// One entry of a [`NetworkPolicy`] (see the module docs for the strings each is written as).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Rule {
    /// `*`: every destination except the host's loopback.
    Any,
    /// `host`: the host's loopback, reached as [`HOST_ALIAS`].
    Host,
    /// A DNS name, lowercase without a trailing dot; `*.example.com` matches the names under
    /// `example.com` (any depth), not `example.com` itself.
    Domain(String),
    /// An address or a CIDR block.
    Net(IpNet),
}

impl Rule {
    /// Whether this entry matches the DNS name `name` (any case, a trailing dot ignored).
    /// [`HOST_ALIAS`] is matched by [`Rule::Host`] alone.
    pub fn matches_name(&self, name: &str) -> bool {
        let name = normalize_name(name);
        if name == HOST_ALIAS {
            return matches!(self, Rule::Host);
        }
        match self {
            Rule::Any => true,
            Rule::Host | Rule::Net(_) => false,
            Rule::Domain(d) => match d.strip_prefix("*.") {
                Some(parent) => name
                    .strip_suffix(parent)
                    .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
                None => name == *d,
            },
        }
    }

    /// Whether this entry matches the address `ip` by itself (a [`Rule::Net`] containing it,
    /// or [`Rule::Any`]); addresses pinned from names are the enforcer's business.
    pub fn matches_addr(&self, ip: IpAddr) -> bool {
        match self {
            Rule::Any => true,
            Rule::Net(n) => n.contains(ip),
            Rule::Host | Rule::Domain(_) => false,
        }
    }
}

fn normalize_name(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

impl FromStr for Rule {
    type Err = Error;

    /// Parses one entry. Errors ([`Error::InvalidArgument`], naming the entry): empty, too
    /// long, a bad CIDR, or a name with characters outside letters, digits, `-`, `_` and `.`
    /// (or a `*` anywhere but a leading `*.`).
    fn from_str(s: &str) -> Result<Rule> {
        let t = s.trim();
        let bad = |why: &str| {
            Error::InvalidArgument(format!(
                "network policy entry {s:?}: {why} (entries are \"*\", \"host\", a domain such as \
                 \"pypi.org\" or \"*.github.com\", an IP address or a CIDR block such as \"10.0.0.0/8\")"
            ))
        };
        if t.is_empty() {
            return Err(bad("empty"));
        }
        if t == "*" {
            return Ok(Rule::Any);
        }
        if t.eq_ignore_ascii_case("host") {
            return Ok(Rule::Host);
        }
        if let Some((addr, prefix)) = t.split_once('/') {
            let addr: IpAddr = addr
                .parse()
                .map_err(|_| bad("not an IP address before '/'"))?;
            let prefix: u8 = prefix
                .parse()
                .map_err(|_| bad("not a prefix length after '/'"))?;
            return IpNet::new(addr, prefix)
                .map(Rule::Net)
                .map_err(|_| bad("prefix longer than the address"));
        }
        if let Ok(addr) = t.parse::<IpAddr>() {
            let full = if addr.is_ipv4() { 32 } else { 128 };
            return Ok(Rule::Net(IpNet::new(addr, full)?));
        }
        let name = normalize_name(t);
        if name.len() > MAX_NAME_LEN {
            return Err(bad("longer than 253 characters"));
        }
        let body = name.strip_prefix("*.").unwrap_or(&name);
        if body.is_empty()
            || body.split('.').any(|label| {
                label.is_empty()
                    || label.len() > 63
                    || !label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            })
        {
            return Err(bad("not a domain name"));
        }
        if name == HOST_ALIAS {
            return Ok(Rule::Host);
        }
        Ok(Rule::Domain(name))
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Any => f.write_str("*"),
            Rule::Host => f.write_str("host"),
            Rule::Domain(d) => f.write_str(d),
            Rule::Net(n) => n.fmt(f),
        }
    }
}

impl Serialize for Rule {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Rule, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Which destinations a sandbox's guest may reach (see the module docs). `Default` is
/// [`NetworkPolicy::off`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkPolicy {
    /// Entries a destination must match one of.
    #[serde(default)]
    pub allow: Vec<Rule>,
    /// Entries a destination must match none of; they win over `allow`.
    #[serde(default)]
    pub deny: Vec<Rule>,
}

impl NetworkPolicy {
    /// Nothing is reachable (the default).
    pub fn off() -> NetworkPolicy {
        NetworkPolicy::default()
    }

    /// Every destination but the host's loopback (`allow = ["*"]`).
    pub fn open() -> NetworkPolicy {
        NetworkPolicy {
            allow: vec![Rule::Any],
            deny: Vec::new(),
        }
    }

    /// A policy from entry strings (see the module docs).
    /// Errors ([`Error::InvalidArgument`]): an entry that does not parse, or more than
    /// [`MAX_POLICY_RULES`] entries in a list.
    pub fn parse<A, D>(allow: A, deny: D) -> Result<NetworkPolicy>
    where
        A: IntoIterator,
        A::Item: AsRef<str>,
        D: IntoIterator,
        D::Item: AsRef<str>,
    {
        let policy = NetworkPolicy {
            allow: parse_rules(allow)?,
            deny: parse_rules(deny)?,
        };
        policy.validate()?;
        Ok(policy)
    }

    /// Checks the list lengths (a deserialized policy has not been through [`Self::parse`]).
    pub fn validate(&self) -> Result<()> {
        for (what, list) in [("allow", &self.allow), ("deny", &self.deny)] {
            if list.len() > MAX_POLICY_RULES {
                return Err(Error::InvalidArgument(format!(
                    "network policy: {} {what} entries, at most {MAX_POLICY_RULES}",
                    list.len()
                )));
            }
        }
        Ok(())
    }

    /// Whether the policy allows nothing at all.
    pub fn is_off(&self) -> bool {
        self.allow.is_empty()
    }

    /// Whether the guest may resolve, and then reach, the DNS name `name`.
    pub fn allows_name(&self, name: &str) -> bool {
        self.allow.iter().any(|r| r.matches_name(name))
            && !self.deny.iter().any(|r| r.matches_name(name))
    }

    /// Whether the guest may reach the address `ip` by the address entries alone (`*` or a
    /// CIDR); the addresses of allowed names are for the enforcer to pin, and
    /// [`Self::denies_addr`] still applies to them.
    pub fn allows_addr(&self, ip: IpAddr) -> bool {
        self.allow.iter().any(|r| r.matches_addr(ip)) && !self.denies_addr(ip)
    }

    /// Whether a `deny` entry (`*` or a CIDR) covers `ip`: such an address is unreachable even
    /// when an allowed name resolved to it.
    pub fn denies_addr(&self, ip: IpAddr) -> bool {
        self.deny.iter().any(|r| r.matches_addr(ip))
    }

    /// Whether the guest may reach the host's loopback as [`HOST_ALIAS`].
    pub fn allows_host(&self) -> bool {
        self.allow.contains(&Rule::Host) && !self.deny.contains(&Rule::Host)
    }
}

fn parse_rules<I>(entries: I) -> Result<Vec<Rule>>
where
    I: IntoIterator,
    I::Item: AsRef<str>,
{
    let mut out = Vec::new();
    for e in entries {
        if out.len() == MAX_POLICY_RULES {
            return Err(Error::InvalidArgument(format!(
                "network policy: more than {MAX_POLICY_RULES} entries in a list"
            )));
        }
        let rule: Rule = e.as_ref().parse()?;
        if !out.contains(&rule) {
            out.push(rule);
        }
    }
    Ok(out)
}

/// A guest TCP port exposed on the host: connections to `127.0.0.1:host_port` reach
/// `127.0.0.1:guest_port` inside the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortMapping {
    /// The port inside the guest.
    pub guest_port: u16,
    /// The host port on 127.0.0.1 (the one it had last; a resume takes it again when free).
    pub host_port: u16,
}

impl PortMapping {
    /// The host address to connect to: `127.0.0.1:host_port`.
    pub fn host_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.host_port))
    }
}

/// What a sandbox with exposed ports asks of whoever manages its sleep ([`crate::Managed`]):
/// to wake it when a connection arrives while it sleeps, and to count connections as activity.
pub trait PortWake: Send + Sync {
    /// A connection arrived on an exposed port and the sandbox is in standby: resume it (and
    /// return once it runs) so the connection can be served. An error refuses the connection.
    fn wake(&self) -> Result<()>;
    /// A forwarded connection opened, moved data or closed: activity for an idle timer.
    fn activity(&self);
}

/// Guest ports reachable from the host: [`Sandbox::ports`](crate::Sandbox::ports).
pub trait Ports {
    /// Exposes guest TCP port `guest_port` (a server on the guest's `127.0.0.1` or on all
    /// addresses) on the host's `127.0.0.1:host_port` (`0`: a free port), and returns that host
    /// address. Exposing an exposed port again returns its address when `host_port` is `0` or
    /// its port. Errors: port 0 ([`Error::InvalidArgument`]); `host_port` in use
    /// ([`Error::Runtime`] with the OS error); too many exposed ports.
    fn expose(&mut self, guest_port: u16, host_port: u16) -> Result<SocketAddr>;
    /// Stops exposing `guest_port`: its listener closes and its open connections end. Not
    /// exposed: `Ok` (nothing to do).
    fn unexpose(&mut self, guest_port: u16) -> Result<()>;
    /// The exposed ports, by guest port.
    fn exposed(&self) -> Vec<PortMapping>;
    /// Installs (or removes, `None`) the hooks that wake the sandbox when a connection arrives
    /// while it sleeps. Without them the listeners close at standby and open again at resume.
    fn set_wake(&mut self, wake: Option<Arc<dyn PortWake>>);
    /// Forwarded connections open now (an idle timer leaves a sandbox with some running).
    fn open_connections(&self) -> usize;
}

/// The egress policy of a running sandbox: [`Sandbox::egress`](crate::Sandbox::egress).
pub trait Egress {
    /// Replaces the policy; connections it no longer allows are reset, new ones follow it.
    /// The policy is part of the sandbox's description (kept by checkpoints and forks).
    fn set_network(&mut self, policy: NetworkPolicy) -> Result<()>;
    /// The policy in force.
    fn network(&self) -> &NetworkPolicy;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(allow: &[&str], deny: &[&str]) -> NetworkPolicy {
        NetworkPolicy::parse(allow, deny).unwrap()
    }

    #[test]
    fn entries_parse_print_and_round_trip() {
        for (s, shown) in [
            ("*", "*"),
            ("host", "host"),
            ("HOST", "host"),
            ("host.dormant.internal", "host"),
            ("PyPI.org.", "pypi.org"),
            ("*.github.com", "*.github.com"),
            ("10.1.2.3", "10.1.2.3"),
            ("10.1.2.3/8", "10.0.0.0/8"),
            ("::1", "::1"),
            ("fd00::/8", "fd00::/8"),
        ] {
            let r: Rule = s.parse().unwrap();
            assert_eq!(r.to_string(), shown, "{s}");
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<Rule>(&json).unwrap(), r);
        }
        for bad in [
            "",
            " ",
            "10.0.0.0/33",
            "::/129",
            "a..b",
            "x*.com",
            "a b.com",
            "*.",
        ] {
            match bad.parse::<Rule>() {
                Err(Error::InvalidArgument(m)) => assert!(m.contains("entry"), "{m}"),
                other => panic!("{bad:?} parsed as {other:?}"),
            }
        }
        assert!("a".repeat(254).parse::<Rule>().is_err());
    }

    #[test]
    fn names_match_exactly_or_under_a_wildcard_and_deny_wins() {
        let pol = p(&["pypi.org", "*.github.com"], &["evil.github.com"]);
        assert!(pol.allows_name("pypi.org"));
        assert!(pol.allows_name("PYPI.ORG."));
        assert!(!pol.allows_name("files.pypi.org"));
        assert!(pol.allows_name("api.github.com"));
        assert!(pol.allows_name("a.b.github.com"));
        assert!(!pol.allows_name("github.com"));
        assert!(!pol.allows_name("notgithub.com"));
        assert!(!pol.allows_name("evil.github.com"));
        assert!(!pol.allows_name(HOST_ALIAS));
        assert!(!pol.allows_host());
    }

    #[test]
    fn the_host_is_reached_only_when_named() {
        assert!(!NetworkPolicy::open().allows_host());
        assert!(!NetworkPolicy::open().allows_name(HOST_ALIAS));
        assert!(NetworkPolicy::open().allows_name("example.com"));
        let pol = p(&["host"], &[]);
        assert!(pol.allows_host() && pol.allows_name(HOST_ALIAS));
        assert!(!pol.allows_name("example.com"));
        assert!(!p(&["*", "host"], &["host"]).allows_host());
    }

    #[test]
    fn addresses_match_cidrs_and_deny_cidrs_win() {
        let pol = p(&["10.0.0.0/8", "192.168.1.7"], &["10.9.0.0/16"]);
        assert!(pol.allows_addr("10.1.2.3".parse().unwrap()));
        assert!(pol.allows_addr("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!pol.allows_addr("10.9.1.1".parse().unwrap()));
        assert!(pol.denies_addr("10.9.1.1".parse().unwrap()));
        assert!(pol.allows_addr("192.168.1.7".parse().unwrap()));
        assert!(!pol.allows_addr("192.168.1.8".parse().unwrap()));
        assert!(!NetworkPolicy::off().allows_addr("1.1.1.1".parse().unwrap()));
        assert!(NetworkPolicy::open().allows_addr("1.1.1.1".parse().unwrap()));
        assert!(NetworkPolicy::off().is_off() && !pol.is_off());
    }

    #[test]
    fn policies_serialize_as_strings_and_lists_are_capped() {
        let pol = p(&["*.github.com", "10.0.0.0/8", "host"], &["1.2.3.4"]);
        let json = serde_json::to_string(&pol).unwrap();
        assert_eq!(
            json,
            r#"{"allow":["*.github.com","10.0.0.0/8","host"],"deny":["1.2.3.4"]}"#
        );
        assert_eq!(serde_json::from_str::<NetworkPolicy>(&json).unwrap(), pol);
        assert!(serde_json::from_str::<NetworkPolicy>(r#"{"allow":["a b"]}"#).is_err());
        let many: Vec<String> = (0..=MAX_POLICY_RULES)
            .map(|i| format!("h{i}.com"))
            .collect();
        assert!(NetworkPolicy::parse(&many, [""; 0]).is_err());
        assert_eq!(p(&["a.com", "A.com"], &[]).allow.len(), 1);
    }
}
