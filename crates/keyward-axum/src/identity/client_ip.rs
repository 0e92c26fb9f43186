//! The client's IP address: the TCP peer, or — only behind proxies you declare — the address they forwarded.
//!
//! **The one decision to know:** `X-Forwarded-For` and `Forwarded` are written by whoever sends the request,
//! so they are ignored unless you say which proxies you trust ([`TrustedProxies`]). With trusted proxies,
//! the forwarding chain (the header's entries followed by the TCP peer) is walked from the right, where the
//! entries nearest to us are, and the first address that is not a trusted proxy is the client. Entries a
//! client invents can only stand to the left of the ones our proxies append, so they are never reached
//! while a trusted proxy is in the way.
//!
//! Only one header is read, the one your proxies write ([`ProxyHeader`], `X-Forwarded-For` by default): a
//! proxy that writes `X-Forwarded-For` passes a client's own `Forwarded` through untouched, so reading both
//! would let the client choose.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use axum::extract::ConnectInfo;
use axum::extract::connect_info::MockConnectInfo;
use http::HeaderMap;
use http::request::Parts;
use ipnet::IpNet;

use crate::Error;

/// The forwarding header your trusted proxies write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ProxyHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2` (the de facto standard; nginx, HAProxy, most load
    /// balancers). Entries may carry a port (`192.0.2.1:4711`, `[2001:db8::1]:4711`).
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=192.0.2.60;proto=https, for="[2001:db8:cafe::17]:4711"`; only the `for`
    /// parameter is read.
    Forwarded,
}

impl ProxyHeader {
    fn name(self) -> &'static str {
        match self {
            ProxyHeader::XForwardedFor => "x-forwarded-for",
            ProxyHeader::Forwarded => "forwarded",
        }
    }
}

/// An IP network in CIDR notation (`10.0.0.0/8`, `2001:db8::/32`), or one address (`192.0.2.7`).
///
/// Host bits below the prefix are ignored (`10.1.2.3/8` is `10.0.0.0/8`). IPv4-mapped IPv6 addresses
/// (`::ffff:10.0.0.1`) are matched as the IPv4 address they carry. Parsing and matching are the `ipnet`
/// crate's.
///
/// ```
/// use keyward_axum::IpNetwork;
/// let net: IpNetwork = "10.0.0.0/8".parse()?;
/// assert!(net.contains("10.20.30.40".parse()?));
/// assert!(!net.contains("11.0.0.1".parse()?));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNetwork(IpNet);

impl IpNetwork {
    /// The network of `addr` with `prefix` leading bits; `None` if `prefix` is longer than the address.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<IpNetwork> {
        IpNet::new(addr.to_canonical(), prefix)
            .ok()
            .map(|net| IpNetwork(net.trunc()))
    }

    /// The first address of the network.
    pub fn addr(&self) -> IpAddr {
        self.0.network()
    }

    /// The number of leading bits that are fixed.
    pub fn prefix(&self) -> u8 {
        self.0.prefix_len()
    }

    /// Whether `ip` is in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip.to_canonical())
    }
}

impl FromStr for IpNetwork {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        let parsed = match text.parse::<IpNet>() {
            Ok(net) => Some((net.addr(), net.prefix_len())),
            // One address: the network of just that address.
            Err(_) => text
                .parse::<IpAddr>()
                .ok()
                .map(|addr| (addr, max_prefix(addr.to_canonical()))),
        };
        // `ipnet` checks the prefix against the address as written; an IPv4-mapped address is an IPv4 one
        // here, so `new` checks it again.
        let reason = match parsed {
            Some((addr, prefix)) => match IpNetwork::new(addr, prefix) {
                Some(net) => return Ok(net),
                None => "the prefix length is longer than the address",
            },
            None => match text.split_once('/') {
                Some((addr, prefix)) if addr.parse::<IpAddr>().is_ok() => {
                    if prefix.parse::<u8>().is_ok() {
                        "the prefix length is longer than the address"
                    } else {
                        "the prefix length is not a number"
                    }
                }
                _ => "not an IPv4 or IPv6 address",
            },
        };
        Err(Error::InvalidNetwork {
            input: s.to_owned(),
            reason: reason.to_owned(),
        })
    }
}

impl fmt::Display for IpNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

fn max_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

/// Which proxies in front of the service may tell us the client's address.
///
/// - [`none`](Self::none) (the default): the TCP peer is the client; forwarding headers are ignored.
///   Right when clients connect directly.
/// - [`networks`](Self::networks): peers and forwarding entries inside these networks are proxies. The
///   safe choice behind proxies: a client that bypasses them is not trusted, whatever it sends.
/// - [`hops`](Self::hops): exactly `n` proxies stand in front of the service. Only safe when nothing can
///   reach the service without passing all `n` of them: a client that connects directly can put any
///   address in the header.
///
/// The peer address comes from axum's `ConnectInfo<SocketAddr>` (serve with
/// `into_make_service_with_connect_info::<SocketAddr>()`), or from `MockConnectInfo` in tests.
///
/// ```
/// use keyward_axum::{ProxyHeader, TrustedProxies};
/// let behind_lb = TrustedProxies::networks(["10.0.0.0/8", "fd00::/8"])?;
/// let behind_cdn = TrustedProxies::hops(2).header(ProxyHeader::Forwarded);
/// # Ok::<(), keyward_axum::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    trust: Trust,
    header: ProxyHeader,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum Trust {
    #[default]
    None,
    Networks(Vec<IpNetwork>),
    Hops(usize),
}

/// One entry of a forwarding chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    Ip(IpAddr),
    /// `unknown`, an obfuscated identifier (`_hidden`), or something that does not parse.
    Opaque,
}

impl TrustedProxies {
    /// No proxy is trusted: the client is the TCP peer, and forwarding headers are ignored.
    pub fn none() -> TrustedProxies {
        TrustedProxies::default()
    }

    /// Proxies are the addresses inside these networks (CIDR such as `10.0.0.0/8`, or single addresses).
    ///
    /// # Errors
    /// [`Error::InvalidNetwork`] for an entry that is not an address or a network.
    pub fn networks<I, S>(networks: I) -> Result<TrustedProxies, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let nets = networks
            .into_iter()
            .map(|s| s.as_ref().parse())
            .collect::<Result<Vec<IpNetwork>, _>>()?;
        Ok(TrustedProxies::from_networks(nets))
    }

    /// Proxies are the addresses inside these networks.
    pub fn from_networks(networks: impl IntoIterator<Item = IpNetwork>) -> TrustedProxies {
        TrustedProxies {
            trust: Trust::Networks(networks.into_iter().collect()),
            header: ProxyHeader::default(),
        }
    }

    /// Exactly `hops` proxies stand in front of the service, the TCP peer being the nearest; each appends
    /// the address it received the request from. `hops(0)` is [`none`](Self::none).
    pub fn hops(hops: usize) -> TrustedProxies {
        TrustedProxies {
            trust: if hops == 0 {
                Trust::None
            } else {
                Trust::Hops(hops)
            },
            header: ProxyHeader::default(),
        }
    }

    /// The header the trusted proxies write (default [`ProxyHeader::XForwardedFor`]); the other one is
    /// ignored.
    #[must_use]
    pub fn header(mut self, header: ProxyHeader) -> TrustedProxies {
        self.header = header;
        self
    }

    /// Whether any proxy is trusted (forwarding headers are read at all).
    pub fn is_none(&self) -> bool {
        self.trust == Trust::None
    }

    /// The client's address for this request; `None` only when the peer address is unknown (no
    /// `ConnectInfo<SocketAddr>` or `MockConnectInfo<SocketAddr>` in the extensions).
    ///
    /// Walking the chain from the right, an entry that is not an address (`unknown`, `_hidden`, garbage)
    /// ends the walk: the proxy that wrote it could not say more, so the answer is that proxy's address.
    /// When every entry is a trusted proxy, the leftmost is the answer.
    pub fn client_ip(&self, parts: &Parts) -> Option<IpAddr> {
        let peer = peer_addr(parts)?.ip().to_canonical();
        if self.trust == Trust::None {
            return Some(peer);
        }
        let mut chain = match self.header {
            ProxyHeader::XForwardedFor => x_forwarded_for(&parts.headers),
            ProxyHeader::Forwarded => forwarded(&parts.headers),
        };
        chain.push(Node::Ip(peer));
        Some(self.walk(&chain, peer))
    }

    /// The client in `chain` (header entries, then the peer, which is an address).
    fn walk(&self, chain: &[Node], peer: IpAddr) -> IpAddr {
        match &self.trust {
            Trust::None => peer,
            Trust::Networks(nets) => {
                let mut nearest_trusted = peer;
                for node in chain.iter().rev() {
                    match *node {
                        Node::Ip(ip) if nets.iter().any(|n| n.contains(ip)) => nearest_trusted = ip,
                        Node::Ip(ip) => return ip,
                        Node::Opaque => return nearest_trusted,
                    }
                }
                nearest_trusted
            }
            Trust::Hops(hops) => {
                // The peer is the first trusted hop; the client is `hops` entries to the left of it. A
                // shorter chain did not pass every proxy: take its leftmost entry.
                let index = chain.len().saturating_sub(1).saturating_sub(*hops);
                // An opaque entry: the nearest address to its right (the proxy that wrote it).
                chain[index..]
                    .iter()
                    .find_map(|n| match n {
                        Node::Ip(ip) => Some(*ip),
                        Node::Opaque => None,
                    })
                    .unwrap_or(peer)
            }
        }
    }

    pub(crate) fn describe(&self) -> String {
        match &self.trust {
            Trust::None => "the client's IP address".to_owned(),
            _ => format!(
                "the client's IP address (from `{}` behind trusted proxies)",
                self.header.name()
            ),
        }
    }
}

/// The TCP peer, from axum's connection info (or its test stand-in).
fn peer_addr(parts: &Parts) -> Option<SocketAddr> {
    if let Some(ConnectInfo(addr)) = parts.extensions.get::<ConnectInfo<SocketAddr>>() {
        return Some(*addr);
    }
    parts
        .extensions
        .get::<MockConnectInfo<SocketAddr>>()
        .map(|MockConnectInfo(addr)| *addr)
}

/// The entries of every `X-Forwarded-For` line, in order; empty entries are skipped (RFC 9110 list rules).
fn x_forwarded_for(headers: &HeaderMap) -> Vec<Node> {
    let mut nodes = Vec::new();
    for line in headers.get_all("x-forwarded-for") {
        let Ok(line) = line.to_str() else {
            nodes.push(Node::Opaque);
            continue;
        };
        for entry in line.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            nodes.push(parse_node(entry));
        }
    }
    nodes
}

/// The `for=` node of every `Forwarded` element, in order. Each field line is parsed on its own, so a
/// malformed line a client sent (an unterminated quote, say) cannot swallow the line a proxy added.
fn forwarded(headers: &HeaderMap) -> Vec<Node> {
    let mut nodes = Vec::new();
    for line in headers.get_all("forwarded") {
        match line.to_str() {
            Ok(line) => parse_forwarded_line(line, &mut nodes),
            Err(_) => nodes.push(Node::Opaque),
        }
    }
    nodes
}

/// Parses one `Forwarded` field line (RFC 7239 §4): elements separated by `,`, each a `;`-separated list
/// of `name=value` pairs, values being tokens or quoted strings.
fn parse_forwarded_line(line: &str, nodes: &mut Vec<Node>) {
    let mut element_for: Option<Node> = None;
    let mut element_seen = false;
    let mut chars = line.chars().peekable();
    loop {
        // One pair: name.
        let mut name = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ';' || c == ',' {
                break;
            }
            name.push(c);
            chars.next();
        }
        let name = name.trim().to_ascii_lowercase();
        let mut value: Option<String> = None;
        let mut malformed = false;
        if chars.peek() == Some(&'=') {
            chars.next();
            while chars.peek().is_some_and(|c| *c == ' ' || *c == '\t') {
                chars.next();
            }
            let mut v = String::new();
            if chars.peek() == Some(&'"') {
                chars.next();
                let mut closed = false;
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => match chars.next() {
                            Some(escaped) => v.push(escaped),
                            None => break,
                        },
                        '"' => {
                            closed = true;
                            break;
                        }
                        c => v.push(c),
                    }
                }
                malformed = !closed;
                // Anything between the closing quote and the next delimiter makes the pair malformed.
                while let Some(&c) = chars.peek() {
                    if c == ';' || c == ',' {
                        break;
                    }
                    if c != ' ' && c != '\t' {
                        malformed = true;
                    }
                    chars.next();
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ';' || c == ',' {
                        break;
                    }
                    v.push(c);
                    chars.next();
                }
                v = v.trim().to_owned();
            }
            value = Some(v);
        }
        if !name.is_empty() || value.is_some() {
            element_seen = true;
        }
        if name == "for" && element_for.is_none() {
            element_for = Some(match value {
                Some(v) if !malformed => parse_node(&v),
                _ => Node::Opaque,
            });
        } else if malformed {
            // A broken pair elsewhere in the element: do not trust its `for` either.
            element_for = Some(Node::Opaque);
        }
        // The loops above stop only at `;`, `,` or the end of the line.
        if chars.next() == Some(';') {
            continue;
        }
        if element_seen {
            // An element without `for` says nothing about the client.
            nodes.push(element_for.take().unwrap_or(Node::Opaque));
        }
        element_for = None;
        element_seen = false;
        if chars.peek().is_none() {
            return;
        }
    }
}

/// One node: `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1`, `[2001:db8::1]`, `[2001:db8::1]:4711`;
/// anything else (`unknown`, `_hidden`) is opaque.
fn parse_node(text: &str) -> Node {
    let text = text.trim();
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Node::Ip(ip.to_canonical());
    }
    if let Some(rest) = text.strip_prefix('[') {
        let Some((inside, after)) = rest.split_once(']') else {
            return Node::Opaque;
        };
        let port_ok = after.is_empty()
            || after.strip_prefix(':').is_some_and(|p| {
                !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            });
        return match (inside.parse::<Ipv6Addr>(), port_ok) {
            (Ok(v6), true) => Node::Ip(IpAddr::V6(v6).to_canonical()),
            _ => Node::Opaque,
        };
    }
    if let Some((host, port)) = text.split_once(':')
        && let Ok(v4) = host.parse::<Ipv4Addr>()
        && !port.is_empty()
        && port.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Node::Ip(IpAddr::V4(v4));
    }
    Node::Opaque
}

/// `ip` reduced to its network of `v4_prefix` / `v6_prefix` bits, as used in keys.
pub(crate) fn key_of(ip: IpAddr, v4_prefix: u8, v6_prefix: u8) -> String {
    let prefix = if ip.is_ipv4() { v4_prefix } else { v6_prefix };
    match IpNet::new(ip, prefix) {
        Ok(net) if prefix < max_prefix(ip) => net.trunc().to_string(),
        // A full-length (or, never from the extractors, overlong) prefix: the address itself.
        _ => ip.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(peer: &str, headers: &[(&str, &str)]) -> Parts {
        let mut builder = http::Request::builder().uri("/");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let (mut parts, ()) = builder.body(()).unwrap().into_parts();
        if !peer.is_empty() {
            let addr: SocketAddr = peer.parse().unwrap();
            parts.extensions.insert(ConnectInfo(addr));
        }
        parts
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn client(trusted: &TrustedProxies, peer: &str, headers: &[(&str, &str)]) -> IpAddr {
        trusted
            .client_ip(&parts(peer, headers))
            .expect("peer known")
    }

    fn lan() -> TrustedProxies {
        TrustedProxies::networks(["10.0.0.0/8", "fd00::/8"]).unwrap()
    }

    #[test]
    fn networks_parse_and_match() {
        let net: IpNetwork = "10.1.2.3/8".parse().unwrap();
        assert_eq!(net.to_string(), "10.0.0.0/8");
        assert!(net.contains(ip("10.255.0.1")));
        assert!(
            net.contains(ip("::ffff:10.0.0.1")),
            "IPv4-mapped matches as IPv4"
        );
        assert!(!net.contains(ip("11.0.0.1")));
        assert!(
            !net.contains(ip("::a00:1")),
            "an IPv6 address never matches an IPv4 network"
        );

        let one: IpNetwork = "192.0.2.7".parse().unwrap();
        assert_eq!(one.prefix(), 32);
        assert!(one.contains(ip("192.0.2.7")) && !one.contains(ip("192.0.2.8")));

        let v6: IpNetwork = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        let all: IpNetwork = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("203.0.113.9")));

        for bad in [
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "example.com",
            "10.0.0.0/x",
            "",
        ] {
            assert!(bad.parse::<IpNetwork>().is_err(), "{bad}");
        }
        let err = TrustedProxies::networks(["10.0.0.0/8", "nope"]).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        let reason = |bad: &str| match bad.parse::<IpNetwork>() {
            Err(Error::InvalidNetwork { reason, .. }) => reason,
            other => panic!("{bad}: {other:?}"),
        };
        assert_eq!(
            reason("10.0.0.0/33"),
            "the prefix length is longer than the address"
        );
        assert_eq!(
            reason("::ffff:10.0.0.0/104"),
            "the prefix length is longer than the address"
        );
        assert_eq!(reason("10.0.0.0/x"), "the prefix length is not a number");
        assert_eq!(reason("10.0.0/8"), "not an IPv4 or IPv6 address");

        // Surrounding whitespace, host bits, an IPv4-mapped network and an IPv6 one written short.
        let mapped: IpNetwork = " ::ffff:192.0.2.9/24 ".parse().unwrap();
        assert_eq!(mapped.to_string(), "192.0.2.0/24");
        assert_eq!(mapped.addr(), ip("192.0.2.0"));
        assert!(mapped.contains(ip("192.0.2.200")) && !mapped.contains(ip("192.0.3.1")));
        let v6: IpNetwork = "fd00::1/8".parse().unwrap();
        assert_eq!((v6.addr(), v6.prefix()), (ip("fd00::"), 8));
        assert!(v6.contains(ip("fdff:ffff::1")) && !v6.contains(ip("fe00::1")));
        assert!(
            !v6.contains(ip("10.0.0.1")),
            "an IPv4 address never matches an IPv6 network"
        );
        assert_eq!(IpNetwork::new(ip("10.9.9.9"), 33), None);
        assert_eq!(
            IpNetwork::new(ip("10.9.9.9"), 16),
            Some("10.9.0.0/16".parse().unwrap())
        );
    }

    #[test]
    fn without_trusted_proxies_headers_are_ignored() {
        let none = TrustedProxies::none();
        let spoof = [
            ("x-forwarded-for", "1.2.3.4"),
            ("forwarded", "for=1.2.3.4"),
            ("x-real-ip", "1.2.3.4"),
        ];
        assert_eq!(
            client(&none, "198.51.100.9:5000", &spoof),
            ip("198.51.100.9")
        );
        assert_eq!(
            client(&TrustedProxies::hops(0), "198.51.100.9:5000", &spoof),
            ip("198.51.100.9")
        );
        // Dual-stack sockets report IPv4 peers as IPv4-mapped IPv6.
        assert_eq!(
            client(&none, "[::ffff:198.51.100.9]:5000", &[]),
            ip("198.51.100.9")
        );
    }

    #[test]
    fn unknown_peer_is_none() {
        assert_eq!(TrustedProxies::none().client_ip(&parts("", &[])), None);
        assert_eq!(
            lan().client_ip(&parts("", &[("x-forwarded-for", "1.2.3.4")])),
            None,
            "headers alone never identify a client: the peer must be known"
        );
    }

    #[test]
    fn mock_connect_info_is_a_peer() {
        let mut p = parts("", &[]);
        p.extensions.insert(MockConnectInfo(
            "192.0.2.5:1".parse::<SocketAddr>().unwrap(),
        ));
        assert_eq!(TrustedProxies::none().client_ip(&p), Some(ip("192.0.2.5")));
    }

    #[test]
    fn xff_walks_right_to_left_past_trusted_proxies() {
        let t = lan();
        // One proxy appended the real client.
        assert_eq!(
            client(&t, "10.0.0.5:1", &[("x-forwarded-for", "203.0.113.7")]),
            ip("203.0.113.7")
        );
        // Two proxies.
        assert_eq!(
            client(
                &t,
                "10.0.0.5:1",
                &[("x-forwarded-for", "203.0.113.7, 10.0.0.9")]
            ),
            ip("203.0.113.7")
        );
        // Several header lines are one list, in order.
        assert_eq!(
            client(
                &t,
                "10.0.0.5:1",
                &[
                    ("x-forwarded-for", "6.6.6.6"),
                    ("x-forwarded-for", "203.0.113.7, 10.1.1.1")
                ]
            ),
            ip("203.0.113.7")
        );
        // Ports and brackets, as some load balancers write them.
        assert_eq!(
            client(&t, "10.0.0.5:1", &[("x-forwarded-for", "203.0.113.7:4711")]),
            ip("203.0.113.7")
        );
        assert_eq!(
            client(
                &t,
                "10.0.0.5:1",
                &[("x-forwarded-for", "[2001:db8::1]:4711")]
            ),
            ip("2001:db8::1")
        );
        assert_eq!(
            client(&t, "[fd00::2]:1", &[("x-forwarded-for", "2001:db8::1")]),
            ip("2001:db8::1")
        );
        // Empty entries are skipped.
        assert_eq!(
            client(&t, "10.0.0.5:1", &[("x-forwarded-for", " ,203.0.113.7,, ")]),
            ip("203.0.113.7")
        );
        // No header: the peer, even a trusted one.
        assert_eq!(client(&t, "10.0.0.5:1", &[]), ip("10.0.0.5"));
        // Only proxies in the chain: the leftmost.
        assert_eq!(
            client(
                &t,
                "10.0.0.5:1",
                &[("x-forwarded-for", "10.9.9.9, 10.0.0.8")]
            ),
            ip("10.9.9.9")
        );
    }

    #[test]
    fn xff_spoofing_attempts_fail() {
        let t = lan();
        // A client prepends a fake address: the proxy's entry is reached first.
        assert_eq!(
            client(
                &t,
                "10.0.0.5:1",
                &[("x-forwarded-for", "1.1.1.1, 203.0.113.7")]
            ),
            ip("203.0.113.7")
        );
        // A client claims to be one of our proxies: the real address the proxy appended comes first.
        assert_eq!(
            client(
                &t,
                "10.0.0.5:1",
                &[("x-forwarded-for", "10.0.0.1, 203.0.113.7")]
            ),
            ip("203.0.113.7")
        );
        // A client connects directly, bypassing the proxies: its header is not read at all.
        assert_eq!(
            client(&t, "203.0.113.66:1", &[("x-forwarded-for", "1.1.1.1")]),
            ip("203.0.113.66")
        );
        assert_eq!(
            client(&t, "203.0.113.66:1", &[("x-forwarded-for", "10.0.0.1")]),
            ip("203.0.113.66")
        );
        // Garbage where the proxy's entry should be: the proxy itself, never something further left.
        assert_eq!(
            client(
                &t,
                "10.0.0.5:1",
                &[("x-forwarded-for", "1.1.1.1, not-an-ip")]
            ),
            ip("10.0.0.5")
        );
        assert_eq!(
            client(
                &t,
                "10.0.0.5:1",
                &[("x-forwarded-for", "1.1.1.1, unknown, 10.0.0.9")]
            ),
            ip("10.0.0.9")
        );
        // A client sends `Forwarded` while the proxies write `X-Forwarded-For`: ignored.
        assert_eq!(
            client(
                &t,
                "10.0.0.5:1",
                &[
                    ("forwarded", "for=1.1.1.1"),
                    ("x-forwarded-for", "203.0.113.7")
                ]
            ),
            ip("203.0.113.7")
        );
    }

    #[test]
    fn hops_count_from_the_peer() {
        let one = TrustedProxies::hops(1);
        assert_eq!(
            client(
                &one,
                "10.0.0.5:1",
                &[("x-forwarded-for", "1.1.1.1, 203.0.113.7")]
            ),
            ip("203.0.113.7")
        );
        let two = TrustedProxies::hops(2);
        assert_eq!(
            client(
                &two,
                "10.0.0.5:1",
                &[("x-forwarded-for", "1.1.1.1, 203.0.113.7, 172.16.0.1")]
            ),
            ip("203.0.113.7")
        );
        // Shorter chain than declared: the leftmost entry.
        assert_eq!(
            client(&two, "10.0.0.5:1", &[("x-forwarded-for", "203.0.113.7")]),
            ip("203.0.113.7")
        );
        assert_eq!(client(&two, "10.0.0.5:1", &[]), ip("10.0.0.5"));
        // An opaque entry at the client's position: the proxy to its right.
        assert_eq!(
            client(
                &one,
                "10.0.0.5:1",
                &[("x-forwarded-for", "1.1.1.1, unknown")]
            ),
            ip("10.0.0.5")
        );
    }

    #[test]
    fn forwarded_header_rfc7239() {
        let t = lan().header(ProxyHeader::Forwarded);
        let c = |value: &str| client(&t, "10.0.0.5:1", &[("forwarded", value)]);
        assert_eq!(
            c("for=192.0.2.60;proto=http;by=203.0.113.43"),
            ip("192.0.2.60")
        );
        assert_eq!(c("For=\"192.0.2.60:4711\""), ip("192.0.2.60"));
        assert_eq!(
            c("for=\"[2001:db8:cafe::17]:4711\""),
            ip("2001:db8:cafe::17")
        );
        assert_eq!(c("for=\"[2001:db8:cafe::17]\""), ip("2001:db8:cafe::17"));
        assert_eq!(
            c("proto=https; for=192.0.2.60 ;by=10.0.0.5"),
            ip("192.0.2.60")
        );
        // Several elements: right to left past trusted proxies.
        assert_eq!(
            c("for=192.0.2.43, for=198.51.100.17;by=10.0.0.9, for=10.0.0.9"),
            ip("198.51.100.17")
        );
        // Quoted commas and semicolons do not split elements.
        assert_eq!(
            c("for=192.0.2.43;x=\"a,b;c\", for=198.51.100.17"),
            ip("198.51.100.17")
        );
        // Escapes inside quoted strings.
        assert_eq!(
            c("x=\"\\\"q\\\\\";for=\"198.51.100.17\""),
            ip("198.51.100.17")
        );
        // Opaque nodes stop the walk at the proxy that wrote them.
        assert_eq!(c("for=unknown"), ip("10.0.0.5"));
        assert_eq!(c("for=_hidden, for=\"_SEVKISEK\""), ip("10.0.0.5"));
        // An element without `for`.
        assert_eq!(c("for=192.0.2.43, proto=https"), ip("10.0.0.5"));
        // Lenient about unquoted forms some proxies write.
        assert_eq!(c("for=[2001:db8::1]:80"), ip("2001:db8::1"));
        assert_eq!(c("for=2001:db8::1"), ip("2001:db8::1"));
    }

    #[test]
    fn forwarded_spoofing_attempts_fail() {
        let t = lan().header(ProxyHeader::Forwarded);
        let c = |values: &[&str]| {
            let headers: Vec<(&str, &str)> = values.iter().map(|v| ("forwarded", *v)).collect();
            client(&t, "10.0.0.5:1", &headers)
        };
        // A client-sent element before the proxy's.
        assert_eq!(c(&["for=1.1.1.1, for=203.0.113.7"]), ip("203.0.113.7"));
        assert_eq!(c(&["for=1.1.1.1", "for=203.0.113.7"]), ip("203.0.113.7"));
        // An unterminated quote in the client's line cannot swallow the proxy's line.
        assert_eq!(c(&["for=\"1.1.1.1", "for=203.0.113.7"]), ip("203.0.113.7"));
        // ... and within one line it poisons only that element, which the walk never reaches.
        assert_eq!(c(&["for=\"1.1.1.1, for=203.0.113.7"]), ip("10.0.0.5"));
        // A second `for` in the proxy's element does not override the first.
        assert_eq!(c(&["for=203.0.113.7;for=1.1.1.1"]), ip("203.0.113.7"));
        // Junk after a quoted value.
        assert_eq!(c(&["for=\"203.0.113.7\"x"]), ip("10.0.0.5"));
        // `X-Forwarded-For` is ignored when the proxies write `Forwarded`.
        assert_eq!(
            client(
                &t,
                "10.0.0.5:1",
                &[
                    ("x-forwarded-for", "1.1.1.1"),
                    ("forwarded", "for=203.0.113.7")
                ]
            ),
            ip("203.0.113.7")
        );
        // A direct client's header is never read.
        assert_eq!(
            client(&t, "203.0.113.66:1", &[("forwarded", "for=1.1.1.1")]),
            ip("203.0.113.66")
        );
    }

    #[test]
    fn node_parsing() {
        for (text, want) in [
            ("192.0.2.1", Some("192.0.2.1")),
            ("192.0.2.1:80", Some("192.0.2.1")),
            ("2001:db8::1", Some("2001:db8::1")),
            ("[2001:db8::1]", Some("2001:db8::1")),
            ("[2001:db8::1]:80", Some("2001:db8::1")),
            ("[::ffff:192.0.2.1]", Some("192.0.2.1")),
            ("[2001:db8::1]x", None),
            ("[2001:db8::1", None),
            ("192.0.2.1:", None),
            ("192.0.2", None),
            ("unknown", None),
            ("_hidden", None),
            ("", None),
        ] {
            let got = match parse_node(text) {
                Node::Ip(ip) => Some(ip),
                Node::Opaque => None,
            };
            assert_eq!(got, want.map(ip), "{text:?}");
        }
    }

    #[test]
    fn keys_group_by_prefix() {
        assert_eq!(key_of(ip("203.0.113.7"), 32, 128), "203.0.113.7");
        assert_eq!(key_of(ip("2001:db8::1"), 32, 128), "2001:db8::1");
        assert_eq!(
            key_of(ip("2001:db8:1:2:3:4:5:6"), 32, 64),
            "2001:db8:1:2::/64"
        );
        assert_eq!(key_of(ip("203.0.113.7"), 24, 64), "203.0.113.0/24");
    }
}
