//! Server URL → websocket endpoint (protocol.md §1.2).

use std::fmt;

/// The fixed deviceconnect path; any path in the server URL is dropped.
pub const CONNECT_PATH: &str = "/api/devices/v1/deviceconnect/connect";

/// Where to dial, taken apart once so the dialer needs no URL parser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `true` for `wss` (TLS).
    pub tls: bool,
    /// Host name or IP literal, without brackets (used for SNI and resolving).
    pub host: String,
    /// TCP port (default 80 / 443).
    pub port: u16,
    /// `ws[s]://authority/api/devices/v1/deviceconnect/connect`.
    pub url: String,
}

/// Why a server URL cannot be dialed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlError {
    /// No `scheme://` prefix.
    NoScheme(String),
    /// A scheme other than http(s)/ws(s).
    UnsupportedScheme(String),
    /// Empty or malformed host or port.
    BadAuthority(String),
}

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UrlError::NoScheme(u) => write!(f, "server URL {u:?} has no scheme"),
            UrlError::UnsupportedScheme(s) => write!(f, "unsupported server URL scheme {s:?}"),
            UrlError::BadAuthority(u) => write!(f, "server URL {u:?} has no valid host[:port]"),
        }
    }
}

impl std::error::Error for UrlError {}

/// Maps `http`→`ws`, `https`→`wss`, keeps host and port, replaces the path.
pub fn endpoint(server_url: &str) -> Result<Endpoint, UrlError> {
    let (scheme, rest) = server_url
        .split_once("://")
        .ok_or_else(|| UrlError::NoScheme(server_url.to_string()))?;
    let tls = match scheme.to_ascii_lowercase().as_str() {
        "https" | "wss" => true,
        "http" | "ws" => false,
        other => return Err(UrlError::UnsupportedScheme(other.to_string())),
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    // user-info is dropped like the reference does
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let bad = || UrlError::BadAuthority(server_url.to_string());
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(bad)?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(bad()),
        };
        (h, port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(bad());
    }
    let port = match port {
        Some(p) => p.parse::<u16>().map_err(|_| bad())?,
        None if tls => 443,
        None => 80,
    };
    let ws = if tls { "wss" } else { "ws" };
    Ok(Endpoint {
        tls,
        host: host.to_string(),
        port,
        url: format!("{ws}://{authority}{CONNECT_PATH}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_scheme_and_replaces_path() {
        let e = endpoint("https://hosted.mender.io").expect("ok");
        assert_eq!(
            e.url,
            "wss://hosted.mender.io/api/devices/v1/deviceconnect/connect"
        );
        assert!(e.tls);
        assert_eq!((e.host.as_str(), e.port), ("hosted.mender.io", 443));

        let e = endpoint("http://127.0.0.1:33489/").expect("ok");
        assert_eq!(
            e.url,
            "ws://127.0.0.1:33489/api/devices/v1/deviceconnect/connect"
        );
        assert_eq!(
            (e.host.as_str(), e.port, e.tls),
            ("127.0.0.1", 33489, false)
        );

        let e = endpoint("https://example.com/prefix?x=1").expect("ok");
        assert_eq!(
            e.url,
            "wss://example.com/api/devices/v1/deviceconnect/connect"
        );
        let e = endpoint("http://user:pw@[::1]:8080/x").expect("ok");
        assert_eq!((e.host.as_str(), e.port), ("::1", 8080));
        assert_eq!(
            e.url,
            "ws://[::1]:8080/api/devices/v1/deviceconnect/connect"
        );
        assert!(endpoint("ws://h").is_ok_and(|e| !e.tls && e.port == 80));
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(
            endpoint("hosted.mender.io"),
            Err(UrlError::NoScheme(_))
        ));
        assert!(matches!(
            endpoint("ftp://x"),
            Err(UrlError::UnsupportedScheme(_))
        ));
        assert!(matches!(
            endpoint("http://"),
            Err(UrlError::BadAuthority(_))
        ));
        assert!(matches!(
            endpoint("http://h:99999"),
            Err(UrlError::BadAuthority(_))
        ));
        assert!(matches!(
            endpoint("http://[::1"),
            Err(UrlError::BadAuthority(_))
        ));
    }
}
