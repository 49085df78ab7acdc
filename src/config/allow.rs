//! `PortForward.AllowedTargets`: which targets a `new` may reach. Pure: the
//! caller resolves the name once and passes the addresses in, then connects
//! only to those (so a DNS answer cannot change between check and dial).
//!
//! Entry grammar: `[udp/|tcp/]HOST:PORT`; HOST is `*`, an IP (IPv6 in
//! brackets), a CIDR (`10.0.0.0/8`, `[fd00::/8]`) or a host name; PORT is
//! `*`, a number or a range `8000-8100`. Without a prefix an entry is TCP.
//! A target is allowed when a `*` or name entry matches the requested name,
//! or when every address the name resolves to lies in some IP/CIDR entry
//! for that transport and port. An empty list allows everything.

use std::fmt;
use std::net::IpAddr;

use crate::wire::types::portforward::Net;

/// The config key, as named in errors and audit lines.
pub const KEY: &str = "PortForward.AllowedTargets";

/// Why an entry is not valid; `Display` names the key and the entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryError {
    /// The entry as configured.
    pub entry: String,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for EntryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{KEY}: invalid entry {:?}: {}", self.entry, self.reason)
    }
}

impl std::error::Error for EntryError {}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Host {
    Any,
    /// Lower case, without a trailing dot.
    Name(String),
    /// Network address (host bits cleared) and prefix length.
    Net(IpAddr, u8),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    net: Net,
    host: Host,
    ports: (u16, u16),
}

/// The parsed allow-list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AllowList {
    entries: Vec<Entry>,
    deny_all: bool,
}

/// What the list says before any name resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed by name (or the list is empty): dial as usual.
    Allowed,
    /// No entry can match: refuse without resolving or dialling.
    Denied,
    /// Only address entries can match: resolve, then [`AllowList::covers`].
    CheckAddresses,
}

impl AllowList {
    /// Parses the configured entries; the first bad one is the error.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<AllowList, EntryError> {
        let entries = entries
            .iter()
            .map(|e| parse_entry(e.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(AllowList {
            entries,
            deny_all: false,
        })
    }

    /// A list that allows nothing (the fail-closed fallback).
    pub fn deny_all() -> AllowList {
        AllowList {
            entries: Vec::new(),
            deny_all: true,
        }
    }

    /// True when every target is allowed (no entries configured).
    pub fn allows_everything(&self) -> bool {
        self.entries.is_empty() && !self.deny_all
    }

    /// Decides what it can from the requested `host` (as sent, IPv6 maybe
    /// bracketed) alone. An IP literal is its own only address.
    pub fn verdict(&self, net: Net, host: &str, port: u16) -> Verdict {
        if self.allows_everything() {
            return Verdict::Allowed;
        }
        let literal = literal_ip(host);
        let name = normalize_name(host);
        let mut addr_entries = false;
        for e in self.for_target(net, port) {
            match &e.host {
                Host::Any => return Verdict::Allowed,
                Host::Name(n) if literal.is_none() && *n == name => return Verdict::Allowed,
                Host::Name(_) => {}
                Host::Net(..) => addr_entries = true,
            }
        }
        match literal {
            Some(ip) if self.covers(net, port, &[ip]) => Verdict::Allowed,
            Some(_) => Verdict::Denied,
            None if addr_entries => Verdict::CheckAddresses,
            None => Verdict::Denied,
        }
    }

    /// True when `addrs` is not empty and every address lies in an IP/CIDR
    /// entry for `net` and `port`.
    pub fn covers(&self, net: Net, port: u16, addrs: &[IpAddr]) -> bool {
        !addrs.is_empty()
            && addrs.iter().all(|a| {
                let a = a.to_canonical();
                self.for_target(net, port).any(|e| match e.host {
                    Host::Any => true,
                    Host::Net(n, bits) => in_net(a, n, bits),
                    Host::Name(_) => false,
                })
            })
    }

    fn for_target(&self, net: Net, port: u16) -> impl Iterator<Item = &Entry> {
        self.entries
            .iter()
            .filter(move |e| e.net == net && e.ports.0 <= port && port <= e.ports.1)
    }
}

impl fmt::Display for AllowList {
    /// The canonical entries, comma-separated (round-trips through `parse`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.entries.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.net == Net::Udp {
            f.write_str("udp/")?;
        }
        match &self.host {
            Host::Any => f.write_str("*")?,
            Host::Name(n) => f.write_str(n)?,
            Host::Net(IpAddr::V4(a), bits) => write!(f, "{a}/{bits}")?,
            Host::Net(IpAddr::V6(a), bits) => write!(f, "[{a}/{bits}]")?,
        }
        match self.ports {
            (1, u16::MAX) => f.write_str(":*"),
            (a, b) if a == b => write!(f, ":{a}"),
            (a, b) => write!(f, ":{a}-{b}"),
        }
    }
}

fn parse_entry(raw: &str) -> Result<Entry, EntryError> {
    let err = |reason: &str| EntryError {
        entry: raw.to_string(),
        reason: reason.to_string(),
    };
    let (net, rest) = if let Some(r) = raw.strip_prefix("udp/") {
        (Net::Udp, r)
    } else if let Some(r) = raw.strip_prefix("tcp/") {
        (Net::Tcp, r)
    } else {
        (Net::Tcp, raw)
    };
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Err(err("expected HOST:PORT"));
    };
    let ports = parse_ports(port).map_err(err)?;
    let host = parse_host(host).map_err(err)?;
    Ok(Entry { net, host, ports })
}

fn parse_ports(p: &str) -> Result<(u16, u16), &'static str> {
    const BAD: &str = "port must be *, a number from 1 to 65535 or a range LOW-HIGH";
    let num = |s: &str| -> Result<u16, &'static str> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(BAD);
        }
        match s.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(BAD),
        }
    };
    if p == "*" {
        return Ok((1, u16::MAX));
    }
    match p.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (num(a)?, num(b)?);
            if a > b {
                return Err("port range is reversed");
            }
            Ok((a, b))
        }
        None => num(p).map(|n| (n, n)),
    }
}

fn parse_host(h: &str) -> Result<Host, &'static str> {
    if h == "*" {
        return Ok(Host::Any);
    }
    if let Some(inner) = h.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
        let net = parse_net(inner)?;
        if !matches!(net, Host::Net(IpAddr::V6(_), _)) {
            return Err("brackets are for IPv6 addresses only");
        }
        return Ok(net);
    }
    if h.contains(':') {
        return Err("an IPv6 host must be in brackets: [ADDR]:PORT");
    }
    if h.contains('/') || h.parse::<IpAddr>().is_ok() {
        return parse_net(h);
    }
    let name = normalize_name(h);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err("host must be *, an IP address, a CIDR or a host name");
    }
    // `1.2.3.4.`, `127.1` or `0x7f.1` would be a name entry that matches
    // only that exact request text while the resolver reads it as an
    // address (RFC 1123: a top label is never numeric)
    let top = name.rsplit('.').next().unwrap_or_default();
    if top.bytes().all(|b| b.is_ascii_digit()) || top.starts_with("0x") {
        return Err("looks like an IP address but is not one: write it as a.b.c.d or in brackets");
    }
    Ok(Host::Name(name))
}

fn parse_net(s: &str) -> Result<Host, &'static str> {
    const BAD: &str = "not a valid IP address or CIDR";
    let (addr, bits) = match s.split_once('/') {
        Some((a, b)) => (a, Some(b)),
        None => (s, None),
    };
    let ip: IpAddr = addr.parse().map_err(|_| BAD)?;
    let ip = ip.to_canonical();
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let bits = match bits {
        None => max,
        Some(b) if !b.is_empty() && b.bytes().all(|c| c.is_ascii_digit()) && b.len() <= 3 => {
            match b.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err("CIDR prefix length out of range"),
            }
        }
        Some(_) => return Err(BAD),
    };
    Ok(Host::Net(mask(ip, bits), bits))
}

fn mask(ip: IpAddr, bits: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

fn in_net(a: IpAddr, net: IpAddr, bits: u8) -> bool {
    a.is_ipv4() == net.is_ipv4() && mask(a, bits) == net
}

/// An IP literal as a client sends it (`10.0.0.1`, `[::1]`, `::1`).
fn literal_ip(host: &str) -> Option<IpAddr> {
    let h = host
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(host);
    h.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

fn normalize_name(h: &str) -> String {
    h.strip_suffix('.').unwrap_or(h).to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(e: &[&str]) -> AllowList {
        AllowList::parse(e).expect("valid list")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn an_empty_list_allows_everything() {
        let l = list(&[]);
        assert!(l.allows_everything());
        assert_eq!(l.verdict(Net::Udp, "any.host", 1), Verdict::Allowed);
        assert!(!AllowList::deny_all().allows_everything());
        assert_eq!(
            AllowList::deny_all().verdict(Net::Tcp, "h", 1),
            Verdict::Denied
        );
    }

    #[test]
    fn entries_are_tcp_unless_prefixed_udp() {
        let l = list(&["127.0.0.1:22", "udp/127.0.0.1:53"]);
        assert_eq!(l.verdict(Net::Tcp, "127.0.0.1", 22), Verdict::Allowed);
        assert_eq!(l.verdict(Net::Udp, "127.0.0.1", 22), Verdict::Denied);
        assert_eq!(l.verdict(Net::Udp, "127.0.0.1", 53), Verdict::Allowed);
        assert_eq!(l.verdict(Net::Tcp, "127.0.0.1", 53), Verdict::Denied);
        assert_eq!(
            list(&["tcp/h:1"]).verdict(Net::Tcp, "h", 1),
            Verdict::Allowed
        );
    }

    #[test]
    fn port_ranges_and_star_ports() {
        let l = list(&["10.0.0.1:8000-8100", "10.0.0.2:*"]);
        for (p, want) in [(7999, false), (8000, true), (8100, true), (8101, false)] {
            let v = l.verdict(Net::Tcp, "10.0.0.1", p);
            assert_eq!(v == Verdict::Allowed, want, "port {p}");
        }
        assert_eq!(l.verdict(Net::Tcp, "10.0.0.2", 1), Verdict::Allowed);
        assert_eq!(l.verdict(Net::Tcp, "10.0.0.2", 65535), Verdict::Allowed);
    }

    #[test]
    fn cidr_entries_cover_literals_and_resolved_addresses() {
        let l = list(&["192.168.1.0/24:22", "[fd00::/8]:22"]);
        assert_eq!(l.verdict(Net::Tcp, "192.168.1.77", 22), Verdict::Allowed);
        assert_eq!(l.verdict(Net::Tcp, "192.168.2.1", 22), Verdict::Denied);
        assert_eq!(l.verdict(Net::Tcp, "[fd12::1]", 22), Verdict::Allowed);
        assert_eq!(l.verdict(Net::Tcp, "fd12::1", 22), Verdict::Allowed);
        assert_eq!(l.verdict(Net::Tcp, "[fe80::1]", 22), Verdict::Denied);
        // a v4-mapped v6 address is the v4 address
        assert_eq!(
            l.verdict(Net::Tcp, "[::ffff:192.168.1.5]", 22),
            Verdict::Allowed
        );
        assert_eq!(l.verdict(Net::Tcp, "db.lan", 22), Verdict::CheckAddresses);
        assert!(l.covers(Net::Tcp, 22, &[ip("192.168.1.5"), ip("fd00::5")]));
        assert!(l.covers(Net::Tcp, 22, &[ip("::ffff:192.168.1.5")]));
    }

    #[test]
    fn a_name_resolving_to_one_allowed_and_one_other_address_is_denied() {
        let l = list(&["10.0.0.0/8:80"]);
        assert!(l.covers(Net::Tcp, 80, &[ip("10.1.2.3")]));
        assert!(!l.covers(Net::Tcp, 80, &[ip("10.1.2.3"), ip("192.168.0.1")]));
        assert!(!l.covers(Net::Tcp, 80, &[]), "no address proves nothing");
        assert!(!l.covers(Net::Tcp, 81, &[ip("10.1.2.3")]));
        assert!(!l.covers(Net::Udp, 80, &[ip("10.1.2.3")]));
    }

    #[test]
    fn name_entries_match_the_requested_name_only() {
        let l = list(&["Printer.LAN:631"]);
        assert_eq!(l.verdict(Net::Tcp, "printer.lan", 631), Verdict::Allowed);
        assert_eq!(l.verdict(Net::Tcp, "PRINTER.lan.", 631), Verdict::Allowed);
        assert_eq!(l.verdict(Net::Tcp, "printer.lan", 632), Verdict::Denied);
        assert_eq!(l.verdict(Net::Tcp, "other.lan", 631), Verdict::Denied);
        // the address a name entry's name has is no licence for the address
        assert_eq!(l.verdict(Net::Tcp, "10.0.0.9", 631), Verdict::Denied);
        assert!(!l.covers(Net::Tcp, 631, &[ip("10.0.0.9")]));
    }

    #[test]
    fn a_star_host_matches_names_and_addresses() {
        let l = list(&["*:443", "udp/*:*"]);
        assert_eq!(l.verdict(Net::Tcp, "example.com", 443), Verdict::Allowed);
        assert_eq!(l.verdict(Net::Tcp, "10.9.9.9", 443), Verdict::Allowed);
        assert_eq!(l.verdict(Net::Tcp, "10.9.9.9", 80), Verdict::Denied);
        assert_eq!(l.verdict(Net::Udp, "x", 5), Verdict::Allowed);
    }

    #[test]
    fn bad_entries_are_named_with_the_reason() {
        for (bad, why) in [
            ("", "expected HOST:PORT"),
            ("host", "expected HOST:PORT"),
            ("host:0", "port must be"),
            ("host:65536", "port must be"),
            ("host:+5", "port must be"),
            ("host:9-3", "reversed"),
            ("host:1-", "port must be"),
            (":22", "host must be"),
            ("a b:22", "host must be"),
            ("*.example.com:22", "host must be"),
            ("::1:22", "brackets"),
            ("[10.0.0.1]:22", "IPv6 addresses only"),
            ("10.0.0.0/33:22", "prefix length"),
            ("10.0.0.0/:22", "not a valid IP"),
            ("10.0.0.300/8:22", "not a valid IP"),
            ("udp/:1", "host must be"),
            ("UDP/h:1", "not a valid IP"),
            ("1.2.3.4.:1", "looks like an IP address"),
            ("127.1:22", "looks like an IP address"),
            ("2130706433:22", "looks like an IP address"),
            ("0x7f.1:22", "looks like an IP address"),
        ] {
            let e = AllowList::parse(&["ok:1", bad]).expect_err(bad);
            assert_eq!(e.entry, bad);
            assert!(e.reason.contains(why), "{bad}: {}", e.reason);
            assert!(
                e.to_string().starts_with(&format!(
                    "PortForward.AllowedTargets: invalid entry {bad:?}: "
                )),
                "{e}"
            );
        }
    }

    #[test]
    fn the_canonical_form_round_trips() {
        let l = list(&[
            "udp/10.1.2.3/8:53",
            "[::1]:1-2",
            "Host.Name.:*",
            "*:7",
            "1.2.3.4:9",
        ]);
        let shown = l.to_string();
        assert_eq!(
            shown,
            "udp/10.0.0.0/8:53,[::1/128]:1-2,host.name:*,*:7,1.2.3.4/32:9"
        );
        let again: Vec<&str> = shown.split(',').collect();
        assert_eq!(list(&again), l);
    }
}
