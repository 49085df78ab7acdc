//! HTTP proxies from the environment, read the way Go's
//! `http.ProxyFromEnvironment` (which the Go daemon's websocket dialer uses)
//! reads them, and the `CONNECT` tunnel the websocket then runs through.
//!
//! `HTTPS_PROXY`/`https_proxy` serve `wss` endpoints, `HTTP_PROXY`/`http_proxy`
//! serve `ws` ones (the upper-case name wins when both are set and non-empty);
//! `NO_PROXY`/`no_proxy` lists exceptions. Loopback hosts are never proxied.
//! TLS to the server runs inside the tunnel, so the proxy sees only the
//! `CONNECT host:port` line.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpStream};
use std::time::Instant;

use super::url::Endpoint;

/// The longest proxy response head we read before giving up on it.
const MAX_RESPONSE_HEAD: usize = 8 * 1024;

/// A proxy to tunnel through: `http://[user:password@]host[:port]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    /// Host name or IP literal, without brackets.
    pub host: String,
    /// TCP port (default 80, like Go's dialer).
    pub port: u16,
    /// `user:password` (percent-decoded), sent as `Proxy-Authorization: Basic`.
    pub credentials: Option<(String, String)>,
}

impl Proxy {
    /// `http://host:port`, never the credentials (for logs and errors).
    pub fn name(&self) -> String {
        if self.host.contains(':') {
            format!("http://[{}]:{}", self.host, self.port)
        } else {
            format!("http://{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // credentials stay out of debug logs
        write!(f, "Proxy({})", self.name())
    }
}

/// Why the proxy could not be used.
#[derive(Debug)]
pub enum ProxyError {
    /// The `*_PROXY` value is not a usable proxy URL.
    BadUrl {
        /// Which variable.
        var: &'static str,
        /// Why.
        reason: String,
    },
    /// The TCP connection to the proxy failed.
    Connect(String, io::Error),
    /// Writing `CONNECT` or reading the answer failed.
    Io(String, io::Error),
    /// The proxy answered something that is not an HTTP response.
    BadResponse(String, String),
    /// The proxy answered `CONNECT` with a status other than 2xx.
    Refused {
        /// The proxy, as [`Proxy::name`].
        proxy: String,
        /// `host:port` we asked for.
        target: String,
        /// Status code.
        status: u16,
        /// Reason phrase as sent.
        reason: String,
    },
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyError::BadUrl { var, reason } => write!(f, "invalid {var}: {reason}"),
            ProxyError::Connect(p, e) => write!(f, "connecting to proxy {p}: {e}"),
            ProxyError::Io(p, e) => write!(f, "proxy {p}: {e}"),
            ProxyError::BadResponse(p, why) => write!(f, "proxy {p}: bad response: {why}"),
            ProxyError::Refused {
                proxy,
                target,
                status,
                reason,
            } => write!(
                f,
                "proxy {proxy} refused CONNECT {target}: HTTP {status} {reason}"
            ),
        }
    }
}

impl std::error::Error for ProxyError {}

/// The proxy settings, as read from the environment once.
#[derive(Debug, Default, Clone)]
pub struct Settings {
    http: Option<Result<Proxy, BadProxy>>,
    https: Option<Result<Proxy, BadProxy>>,
    no_proxy: NoProxy,
}

/// A `BadUrl` kept in the settings (cloneable, unlike `io::Error`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct BadProxy {
    var: &'static str,
    reason: String,
}

impl Settings {
    /// Reads `HTTP_PROXY`, `HTTPS_PROXY`, `NO_PROXY` (and lower-case forms)
    /// through `get`; `REQUEST_METHOD` (a CGI environment) disables
    /// `HTTP_PROXY`, as in Go.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Settings {
        let any = |names: [&'static str; 2]| {
            names
                .into_iter()
                .find_map(|n| get(n).filter(|v| !v.is_empty()).map(|v| (n, v)))
        };
        let cgi = get("REQUEST_METHOD").is_some_and(|v| !v.is_empty());
        let parse = |(var, v): (&'static str, String)| {
            parse_proxy(&v).map_err(|reason| BadProxy { var, reason })
        };
        Settings {
            http: if cgi {
                None
            } else {
                any(["HTTP_PROXY", "http_proxy"]).map(parse)
            },
            https: any(["HTTPS_PROXY", "https_proxy"]).map(parse),
            no_proxy: NoProxy::parse(&any(["NO_PROXY", "no_proxy"]).map_or(String::new(), |v| v.1)),
        }
    }

    /// The proxy for `ep`, `None` to dial it directly.
    pub fn for_endpoint(&self, ep: &Endpoint) -> Result<Option<Proxy>, ProxyError> {
        let chosen = if ep.tls { &self.https } else { &self.http };
        let Some(chosen) = chosen else {
            return Ok(None);
        };
        if !self.no_proxy.use_proxy(&ep.host, ep.port) {
            return Ok(None);
        }
        match chosen {
            Ok(p) => Ok(Some(p.clone())),
            Err(e) => Err(ProxyError::BadUrl {
                var: e.var,
                reason: e.reason.clone(),
            }),
        }
    }
}

/// Parses a proxy URL; a value without a scheme is taken as `http://value`,
/// as Go does.
pub fn parse_proxy(value: &str) -> Result<Proxy, String> {
    let value = value.trim();
    let (scheme, rest) = match value.split_once("://") {
        Some((s, r)) => (s.to_ascii_lowercase(), r),
        None => ("http".to_string(), value),
    };
    if scheme != "http" {
        return Err(format!(
            "proxy scheme {scheme:?} is not supported (only http)"
        ));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    // names the host part only: the userinfo may hold a password, and this
    // text reaches the journal and `systemctl status`
    let bad = || format!("{hostport:?} is not a valid proxy host[:port]");
    let (host, port) = split_host_port(hostport).ok_or_else(bad)?;
    if host.is_empty() {
        return Err(bad());
    }
    let port = match port {
        Some(p) => p.parse::<u16>().map_err(|_| bad())?,
        None => 80,
    };
    // Go's dialer sends credentials only when a password is present
    let credentials = userinfo.and_then(|u| {
        let (user, pass) = u.split_once(':')?;
        Some((percent_decode(user), percent_decode(pass)))
    });
    Ok(Proxy {
        host: host.to_string(),
        port,
        credentials,
    })
}

/// `host[:port]` or `[v6][:port]` → (host, port text).
fn split_host_port(s: &str) -> Option<(&str, Option<&str>)> {
    if let Some(v6) = s.strip_prefix('[') {
        let (h, after) = v6.split_once(']')?;
        match after.strip_prefix(':') {
            Some(p) => Some((h, Some(p))),
            None if after.is_empty() => Some((h, None)),
            None => None,
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, _)) if h.contains(':') => Some((s, None)), // bare IPv6
            Some((h, p)) => Some((h, Some(p))),
            None => Some((s, None)),
        }
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// One `NO_PROXY` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Rule {
    /// `*`: nothing is proxied.
    All,
    /// An IP/prefix network.
    Cidr(IpAddr, u8),
    /// One IP, optionally only on one port.
    Ip(IpAddr, Option<u16>),
    /// `.suffix` (with the dot); `exact` also matches the suffix without it.
    Domain {
        suffix: String,
        exact: bool,
        port: Option<u16>,
    },
}

/// The parsed `NO_PROXY` list (Go's `httpproxy.Config.useProxy`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NoProxy(Vec<Rule>);

impl NoProxy {
    /// Parses a comma-separated `NO_PROXY`; malformed entries are ignored.
    pub fn parse(list: &str) -> NoProxy {
        let mut rules = Vec::new();
        for p in list.split(',') {
            let p = p.trim().to_ascii_lowercase();
            if p.is_empty() {
                continue;
            }
            if p == "*" {
                return NoProxy(vec![Rule::All]);
            }
            if let Some((ip, bits)) = p.split_once('/') {
                if let (Ok(ip), Ok(bits)) = (ip.parse::<IpAddr>(), bits.parse::<u8>()) {
                    let max = if ip.is_ipv4() { 32 } else { 128 };
                    if bits <= max {
                        rules.push(Rule::Cidr(ip, bits));
                    }
                }
                continue;
            }
            let (host, port) = if let Ok(ip) = p.parse::<IpAddr>() {
                (ip.to_string(), None)
            } else {
                match split_host_port(&p) {
                    Some((h, Some(port))) => match port.parse::<u16>() {
                        Ok(port) => (h.to_string(), Some(port)),
                        Err(_) => continue,
                    },
                    Some((h, None)) => (h.to_string(), None),
                    None => continue,
                }
            };
            if host.is_empty() {
                continue;
            }
            if let Ok(ip) = host.parse::<IpAddr>() {
                rules.push(Rule::Ip(ip, port));
                continue;
            }
            let host = host.strip_prefix('*').unwrap_or(&host).to_string();
            let (suffix, exact) = if host.starts_with('.') {
                (host, false)
            } else {
                (format!(".{host}"), true)
            };
            if suffix.len() > 1 {
                rules.push(Rule::Domain {
                    suffix,
                    exact,
                    port,
                });
            }
        }
        NoProxy(rules)
    }

    /// Whether `host:port` goes through the proxy.
    pub fn use_proxy(&self, host: &str, port: u16) -> bool {
        let host = host.trim().to_ascii_lowercase();
        let host = host.trim_end_matches('.');
        if host == "localhost" {
            return false;
        }
        let ip = host.parse::<IpAddr>().ok();
        if ip.is_some_and(|ip| is_loopback(&ip)) {
            return false;
        }
        let port_ok = |p: &Option<u16>| p.is_none_or(|p| p == port);
        !self.0.iter().any(|r| match r {
            Rule::All => true,
            Rule::Cidr(net, bits) => ip.is_some_and(|ip| in_network(&ip, net, *bits)),
            Rule::Ip(rip, p) => ip.is_some_and(|ip| same_ip(&ip, rip)) && port_ok(p),
            Rule::Domain {
                suffix,
                exact,
                port: p,
            } => {
                (host.ends_with(suffix.as_str()) || (*exact && host == &suffix[1..])) && port_ok(p)
            }
        })
    }
}

fn is_loopback(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Go's `IP.Equal`: an IPv4 address equals its IPv4-mapped IPv6 form.
fn same_ip(a: &IpAddr, b: &IpAddr) -> bool {
    canonical(a) == canonical(b)
}

fn canonical(ip: &IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(*ip, IpAddr::V4),
        v4 => *v4,
    }
}

fn in_network(ip: &IpAddr, net: &IpAddr, bits: u8) -> bool {
    let mask = |len: u32, bits: u8| -> u128 {
        if bits == 0 {
            0
        } else {
            (!0u128 << (len - bits as u32)) & (!0u128 >> (128 - len))
        }
    };
    match (canonical(ip), net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let m = mask(32, bits);
            (u32::from(a) as u128 & m) == (u32::from(*n) as u128 & m)
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let m = mask(128, bits);
            (u128::from(a) & m) == (u128::from(*n) & m)
        }
        _ => false,
    }
}

/// The `CONNECT` request for `ep` (RFC 9110 §9.3.6).
pub fn connect_request(proxy: &Proxy, ep: &Endpoint) -> String {
    let target = target(ep);
    let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some((user, pass)) = &proxy.credentials {
        req.push_str("Proxy-Authorization: Basic ");
        req.push_str(&base64(format!("{user}:{pass}").as_bytes()));
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req
}

fn target(ep: &Endpoint) -> String {
    if ep.host.contains(':') {
        format!("[{}]:{}", ep.host, ep.port)
    } else {
        format!("{}:{}", ep.host, ep.port)
    }
}

/// Asks the proxy on `tcp` for a tunnel to `ep`; on success the stream is
/// the tunnel. Reads byte by byte so nothing after the response head is
/// consumed (a proxy may send the server's first bytes right after it).
fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "no complete response in time")
}

/// The whole exchange ends by `deadline`, however slowly the proxy drips.
pub fn tunnel(
    proxy: &Proxy,
    ep: &Endpoint,
    tcp: &mut TcpStream,
    deadline: Instant,
) -> Result<(), ProxyError> {
    let name = proxy.name();
    let io_err = |e| ProxyError::Io(name.clone(), e);
    tcp.write_all(connect_request(proxy, ep).as_bytes())
        .map_err(io_err)?;
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_RESPONSE_HEAD {
            return Err(ProxyError::BadResponse(
                name,
                format!("response head over {MAX_RESPONSE_HEAD} bytes"),
            ));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io_err(timed_out()));
        }
        tcp.set_read_timeout(Some(left)).map_err(io_err)?;
        match tcp.read(&mut byte) {
            Ok(0) => {
                return Err(ProxyError::BadResponse(
                    name,
                    "connection closed before the response".to_string(),
                ));
            }
            Ok(_) => head.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // the read timeout is the time left
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(io_err(timed_out()));
            }
            Err(e) => return Err(io_err(e)),
        }
    }
    let (status, reason) =
        parse_status(&head).map_err(|why| ProxyError::BadResponse(name.clone(), why))?;
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(ProxyError::Refused {
            proxy: name,
            target: target(ep),
            status,
            reason,
        })
    }
}

/// `HTTP/1.x NNN reason` → (NNN, reason).
fn parse_status(head: &[u8]) -> Result<(u16, String), String> {
    let line_end = head.iter().position(|&b| b == b'\r').unwrap_or(head.len());
    let line = String::from_utf8_lossy(&head[..line_end]);
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1 status line: {:?}", truncate(&line)));
    }
    let status = parts
        .next()
        .and_then(|s| (s.len() == 3).then_some(s))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("no status code in {:?}", truncate(&line)))?;
    Ok((
        status,
        truncate(parts.next().unwrap_or("").trim()).to_string(),
    ))
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(120) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Standard base64 with padding (RFC 4648 §4), for the Basic credentials.
fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Deadline-bound connect to the proxy, then the tunnel.
pub fn open(proxy: &Proxy, ep: &Endpoint, deadline: Instant) -> Result<TcpStream, ProxyError> {
    let proxy_ep = Endpoint {
        tls: false,
        host: proxy.host.clone(),
        port: proxy.port,
        url: proxy.name(),
    };
    let mut tcp = super::dial::connect_tcp(&proxy_ep, deadline).map_err(|e| match e {
        super::dial::DialError::Resolve(_, e) | super::dial::DialError::Connect(_, e) => {
            ProxyError::Connect(proxy.name(), e)
        }
        other => ProxyError::Connect(proxy.name(), io::Error::other(other.to_string())),
    })?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(std::time::Duration::from_millis(1));
    tcp.set_read_timeout(Some(left))
        .and_then(|_| tcp.set_write_timeout(Some(left)))
        .map_err(|e| ProxyError::Io(proxy.name(), e))?;
    tunnel(proxy, ep, &mut tcp, deadline)?;
    Ok(tcp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(vars: &[(&str, &str)]) -> Settings {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_lookup(|n| m.get(n).cloned())
    }

    fn ep(url: &str) -> Endpoint {
        super::super::url::endpoint(url).expect("url")
    }

    fn proxied(s: &Settings, url: &str) -> Option<String> {
        s.for_endpoint(&ep(url)).expect("valid").map(|p| p.name())
    }

    #[test]
    fn https_urls_use_https_proxy_and_http_urls_use_http_proxy() {
        let s = settings(&[
            ("HTTPS_PROXY", "http://secure:3128"),
            ("HTTP_PROXY", "plain:8080"),
        ]);
        assert_eq!(
            proxied(&s, "https://mender.example.com").as_deref(),
            Some("http://secure:3128")
        );
        assert_eq!(
            proxied(&s, "http://mender.example.com").as_deref(),
            Some("http://plain:8080")
        );
        let only_http = settings(&[("http_proxy", "http://p")]);
        assert_eq!(proxied(&only_http, "https://m.example.com"), None);
        assert_eq!(
            proxied(&only_http, "http://m.example.com").as_deref(),
            Some("http://p:80")
        );
    }

    #[test]
    fn upper_case_wins_and_empty_values_fall_through_to_lower_case() {
        let s = settings(&[
            ("HTTPS_PROXY", "http://up:1"),
            ("https_proxy", "http://low:2"),
        ]);
        assert_eq!(proxied(&s, "https://m.io").as_deref(), Some("http://up:1"));
        let s = settings(&[("HTTPS_PROXY", ""), ("https_proxy", "http://low:2")]);
        assert_eq!(proxied(&s, "https://m.io").as_deref(), Some("http://low:2"));
        let s = settings(&[
            ("HTTPS_PROXY", "http://p:1"),
            ("NO_PROXY", ""),
            ("no_proxy", "m.io"),
        ]);
        assert_eq!(proxied(&s, "https://m.io"), None);
    }

    #[test]
    fn cgi_environment_ignores_http_proxy_only() {
        let s = settings(&[
            ("HTTP_PROXY", "http://p:1"),
            ("HTTPS_PROXY", "http://p:2"),
            ("REQUEST_METHOD", "GET"),
        ]);
        assert_eq!(proxied(&s, "http://m.io"), None);
        assert_eq!(proxied(&s, "https://m.io").as_deref(), Some("http://p:2"));
    }

    #[test]
    fn loopback_hosts_are_never_proxied() {
        let s = settings(&[("HTTP_PROXY", "http://p:1"), ("HTTPS_PROXY", "http://p:1")]);
        for url in [
            "http://localhost:8080",
            "https://LOCALHOST",
            "http://127.0.0.1:1",
            "http://127.200.3.4",
            "http://[::1]:80",
            "https://[::ffff:127.0.0.1]",
        ] {
            assert_eq!(proxied(&s, url), None, "{url}");
        }
        assert!(proxied(&s, "http://10.0.0.1").is_some());
        assert!(proxied(&s, "http://localhost.example.com").is_some());
    }

    #[test]
    fn no_proxy_matches_names_suffixes_ips_cidrs_and_ports_like_go() {
        let s = settings(&[
            ("HTTPS_PROXY", "http://p:1"),
            (
                "NO_PROXY",
                " Example.com, .corp.internal,*.wild.org ,10.1.2.3, 192.168.0.0/16, \
                 fd00::/8, only.port:8443, [2001:db8::1]:443, 172.16.0.5:9999, bad/x,:80",
            ),
        ]);
        let direct = [
            "https://example.com",
            "https://sub.example.com",
            "https://a.corp.internal",
            "https://x.wild.org",
            "https://10.1.2.3",
            "https://192.168.44.1",
            "https://[fd12::1]",
            "https://only.port:8443",
            "https://[2001:db8::1]",
        ];
        for url in direct {
            assert_eq!(proxied(&s, url), None, "{url} should bypass");
        }
        let via = [
            "https://notexample.com",
            "https://corp.internal", // `.corp.internal` matches subdomains only
            "https://10.1.2.4",
            "https://192.169.0.1",
            "https://only.port",  // port 443 ≠ 8443
            "https://172.16.0.5", // port 443 ≠ 9999
            "https://[2001:db8::2]",
        ];
        for url in via {
            assert!(proxied(&s, url).is_some(), "{url} should use the proxy");
        }
        // `wild.org` itself: Go strips `*` and keeps the leading dot, so no
        assert!(proxied(&s, "https://wild.org").is_some());
    }

    #[test]
    fn star_disables_the_proxy_for_everything() {
        let s = settings(&[("HTTPS_PROXY", "http://p:1"), ("no_proxy", "foo, *")]);
        assert_eq!(proxied(&s, "https://anything.example"), None);
    }

    #[test]
    fn proxy_urls_parse_with_credentials_default_port_and_ipv6() {
        let p = parse_proxy("http://us%40er:p%3Ass@proxy.corp:3128/").expect("ok");
        assert_eq!((p.host.as_str(), p.port), ("proxy.corp", 3128));
        assert_eq!(
            p.credentials,
            Some(("us@er".to_string(), "p:ss".to_string()))
        );
        assert_eq!(format!("{p:?}"), "Proxy(http://proxy.corp:3128)");
        let p = parse_proxy("user@proxy").expect("ok");
        assert_eq!((p.port, p.credentials), (80, None));
        let p = parse_proxy("http://[fe80::1]:8080").expect("ok");
        assert_eq!(p.name(), "http://[fe80::1]:8080");
        assert!(parse_proxy("socks5://p:1080").is_err());
        assert!(parse_proxy("http://:1").is_err());
        assert!(parse_proxy("http://p:99999").is_err());
    }

    #[test]
    fn a_bad_proxy_url_is_an_error_naming_the_variable() {
        let s = settings(&[("https_proxy", "ftp://p")]);
        let e = s.for_endpoint(&ep("https://m.io")).expect_err("bad");
        assert!(e.to_string().starts_with("invalid https_proxy:"), "{e}");
    }

    #[test]
    fn connect_request_carries_basic_credentials() {
        let p = parse_proxy("http://Aladdin:open%20sesame@p:1").expect("ok");
        let req = connect_request(&p, &ep("https://mender.io"));
        assert_eq!(
            req,
            "CONNECT mender.io:443 HTTP/1.1\r\nHost: mender.io:443\r\n\
             Proxy-Authorization: Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==\r\n\r\n"
        );
        let p = parse_proxy("http://p:1").expect("ok");
        let req = connect_request(&p, &ep("http://[2001:db8::1]:80"));
        assert_eq!(
            req,
            "CONNECT [2001:db8::1]:80 HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n"
        );
    }

    #[test]
    fn base64_pads_like_rfc4648() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn status_lines_parse_and_garbage_is_rejected() {
        assert_eq!(
            parse_status(b"HTTP/1.0 200 Connection established\r\n\r\n"),
            Ok((200, "Connection established".to_string()))
        );
        assert_eq!(
            parse_status(b"HTTP/1.1 407\r\n\r\n"),
            Ok((407, String::new()))
        );
        assert!(parse_status(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_status(b"HTTP/1.1 20x OK\r\n\r\n").is_err());
    }

    /// A one-shot proxy on loopback answering `answer` to whatever it is sent.
    fn fake_proxy(answer: &'static [u8]) -> (Proxy, std::thread::JoinHandle<Vec<u8>>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let j = std::thread::spawn(move || {
            let (mut s, _) = l.accept().expect("accept");
            let mut got = Vec::new();
            let mut buf = [0u8; 512];
            while !got.ends_with(b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            let _ = s.write_all(answer);
            got
        });
        let p = parse_proxy(&format!("http://u:pw@127.0.0.1:{port}")).expect("proxy");
        (p, j)
    }

    #[test]
    fn a_refusing_proxy_is_an_error_naming_it_and_its_status() {
        let (p, j) = fake_proxy(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n");
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        let e = open(&p, &ep("https://mender.example.com"), deadline).expect_err("refused");
        let sent = j.join().expect("proxy");
        assert!(sent.starts_with(b"CONNECT mender.example.com:443 HTTP/1.1\r\n"));
        assert_eq!(
            e.to_string(),
            format!(
                "proxy {} refused CONNECT mender.example.com:443: HTTP 407 Proxy Authentication Required",
                p.name()
            )
        );
        assert!(!e.to_string().contains("pw"), "no password in errors");
    }

    #[test]
    fn a_proxy_that_hangs_up_is_an_error_not_a_tunnel() {
        let (p, j) = fake_proxy(b"");
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        let e = open(&p, &ep("http://m.example.com"), deadline).expect_err("closed");
        j.join().expect("proxy");
        assert!(e.to_string().contains("connection closed"), "{e}");
    }

    #[test]
    fn a_proxy_dripping_its_answer_is_cut_off_at_the_dial_deadline() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let j = std::thread::spawn(move || {
            let (mut s, _) = l.accept().expect("accept");
            // one byte of a status line every 100 ms, each well within a
            // per-read timeout, never a complete head
            while stop_rx
                .recv_timeout(std::time::Duration::from_millis(100))
                .is_err()
            {
                if s.write_all(b"H").is_err() {
                    break;
                }
            }
        });
        let p = parse_proxy(&format!("http://127.0.0.1:{port}")).expect("proxy");
        let started = Instant::now();
        let deadline = started + std::time::Duration::from_secs(1);
        let e = open(&p, &ep("http://m.example.com"), deadline).expect_err("cut off");
        let took = started.elapsed();
        drop(stop_tx);
        j.join().expect("proxy");
        assert!(
            e.to_string().contains("no complete response in time"),
            "{e}"
        );
        assert!(took < std::time::Duration::from_secs(3), "{took:?}");
    }
}
