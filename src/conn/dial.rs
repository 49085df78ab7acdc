//! Opening the websocket: TCP, TLS only for `wss`, and the HTTP upgrade with
//! the device's Bearer token (protocol.md §1.3–1.4).

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::{Duration, Instant};

use tungstenite::WebSocket;
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::HandshakeError;
use tungstenite::http::HeaderValue;
use tungstenite::protocol::WebSocketConfig;

use super::reframe::Reframer;
use super::sock::Sock;
use super::url::Endpoint;

/// The whole dial (resolve, connect, TLS, upgrade) must finish within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(45);
/// Inbound messages up to 16 MiB are accepted: twice deviceconnect's own
/// 8 MiB message limit, so nothing the server relays is refused (the Go
/// daemon drops the link above 8 KiB), and the Autobahn 16 MiB cases pass.
/// tungstenite allocates as bytes arrive, so the cap costs nothing idle; a
/// large message reaches it in fragments (`reframe`) and, past the mmap
/// threshold set in `main`, is unmapped when dropped.
pub const MAX_INBOUND_MESSAGE: usize = 16 << 20;

/// The socket under the websocket: plain TCP or TLS over TCP. Reads pass
/// through a [`Reframer`], which splits large inbound frames.
#[derive(Debug)]
pub struct Stream {
    io: Io,
    reframe: Reframer,
}

#[derive(Debug)]
enum Io {
    /// `ws://`: no TLS state is ever created.
    Plain(Sock),
    /// `wss://` via the system OpenSSL.
    Tls(Box<native_tls::TlsStream<Sock>>),
}

impl Stream {
    fn new(io: Io) -> Stream {
        Stream {
            io,
            reframe: Reframer::new(),
        }
    }

    fn tcp(&self) -> &TcpStream {
        match &self.io {
            Io::Plain(s) => s.tcp(),
            Io::Tls(s) => s.get_ref().tcp(),
        }
    }

    /// Switches the TCP socket to non-blocking for the poll loop.
    pub fn set_nonblocking(&mut self, on: bool) -> io::Result<()> {
        match &mut self.io {
            Io::Plain(s) => s.set_nonblocking(on),
            Io::Tls(s) => s.get_mut().set_nonblocking(on),
        }
    }

    /// Closes the TCP connection in both directions.
    pub fn shutdown(&self) {
        let _ = self.tcp().shutdown(std::net::Shutdown::Both);
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        self.tcp().as_raw_fd()
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.tcp().as_fd()
    }
}

impl Read for Io {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Io::Plain(s) => s.read(buf),
            Io::Tls(s) => s.read(buf),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reframe.read(&mut self.io, buf)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.io {
            Io::Plain(s) => s.write(buf),
            Io::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.io {
            Io::Plain(s) => s.flush(),
            Io::Tls(s) => s.flush(),
        }
    }
}

/// Why a dial failed; every variant means "back off and retry".
#[derive(Debug)]
pub enum DialError {
    /// Name resolution failed or gave no address.
    Resolve(String, io::Error),
    /// No address accepted the TCP connection in time.
    Connect(String, io::Error),
    /// TLS setup or handshake failed (certificate, protocol).
    Tls(String),
    /// The server answered the upgrade with something other than 101.
    Status(u16),
    /// Any other handshake failure (I/O, malformed response, timeout).
    Handshake(String),
    /// The `*_PROXY` setting or the proxy's `CONNECT` failed.
    Proxy(super::proxy::ProxyError),
}

impl fmt::Display for DialError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DialError::Resolve(h, e) => write!(f, "resolving {h}: {e}"),
            DialError::Connect(a, e) => write!(f, "connecting to {a}: {e}"),
            DialError::Tls(e) => write!(f, "TLS: {e}"),
            DialError::Status(s) => write!(f, "websocket upgrade refused with HTTP {s}"),
            DialError::Handshake(e) => write!(f, "websocket handshake: {e}"),
            DialError::Proxy(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for DialError {}

/// TCP keepalive on the websocket's socket: idle 30 s, then a probe every
/// 10 s, dead after 3 unanswered (a dead path is noticed in ~60 s even when
/// neither side has anything to send between websocket pings).
pub const KEEPALIVE: (libc::c_int, libc::c_int, libc::c_int) = (30, 10, 3);

/// Turns on TCP keepalive with [`KEEPALIVE`]'s idle, interval and count.
pub fn set_keepalive(tcp: &TcpStream) -> io::Result<()> {
    let (idle, interval, count) = KEEPALIVE;
    for (level, name, value) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, idle),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, interval),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, count),
    ] {
        crate::sys::sockopt::set_int(tcp.as_fd(), level, name, value)?;
    }
    Ok(())
}

/// Small buffers: the device moves at most a few KiB per message, and RAM is
/// what the target boards lack.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(16 * 1024)
        .max_write_buffer_size(128 * 1024)
        .max_message_size(Some(MAX_INBOUND_MESSAGE))
        .max_frame_size(Some(MAX_INBOUND_MESSAGE))
}

/// Dials `ep` with `token`, through the proxy `proxies` choose for it; the
/// returned socket is still blocking.
pub fn dial(
    ep: &Endpoint,
    token: &str,
    proxies: &super::proxy::Settings,
) -> Result<WebSocket<Stream>, DialError> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let tcp = match proxies.for_endpoint(ep).map_err(DialError::Proxy)? {
        Some(p) => super::proxy::open(&p, ep, deadline).map_err(DialError::Proxy)?,
        None => connect_tcp(ep, deadline)?,
    };
    let _ = tcp.set_nodelay(true);
    if let Err(e) = set_keepalive(&tcp) {
        log::debug!("TCP keepalive not set: {e}");
    }
    let remaining = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    tcp.set_read_timeout(Some(remaining))
        .and_then(|_| tcp.set_write_timeout(Some(remaining)))
        .map_err(|e| DialError::Connect(ep.host.clone(), e))?;
    let stream = if ep.tls {
        // Built per dial, and only for wss, so a plain ws link never loads
        // libssl's CA store (design.md "TLS").
        let connector =
            native_tls::TlsConnector::new().map_err(|e| DialError::Tls(e.to_string()))?;
        let tls = connector
            .connect(&ep.host, Sock::new(tcp))
            .map_err(|e| match e {
                native_tls::HandshakeError::Failure(e) => DialError::Tls(e.to_string()),
                native_tls::HandshakeError::WouldBlock(_) => {
                    DialError::Tls("handshake timed out".to_string())
                }
            })?;
        Stream::new(Io::Tls(Box::new(tls)))
    } else {
        Stream::new(Io::Plain(Sock::new(tcp)))
    };
    let mut request = ep
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| DialError::Handshake(e.to_string()))?;
    let bearer = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| DialError::Handshake("token is not a valid header value".to_string()))?;
    request.headers_mut().insert("Authorization", bearer);
    match tungstenite::client::client_with_config(request, stream, Some(ws_config())) {
        Ok((ws, _response)) => {
            ws.get_ref().tcp().set_read_timeout(None).ok();
            ws.get_ref().tcp().set_write_timeout(None).ok();
            Ok(ws)
        }
        Err(HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            Err(DialError::Status(resp.status().as_u16()))
        }
        Err(HandshakeError::Failure(e)) => Err(DialError::Handshake(e.to_string())),
        Err(HandshakeError::Interrupted(_)) => Err(DialError::Handshake("timed out".to_string())),
    }
}

/// Resolves `ep.host` and connects to the first address that accepts.
pub(super) fn connect_tcp(ep: &Endpoint, deadline: Instant) -> Result<TcpStream, DialError> {
    let addrs: Vec<SocketAddr> = (ep.host.as_str(), ep.port)
        .to_socket_addrs()
        .map_err(|e| DialError::Resolve(ep.host.clone(), e))?
        .collect();
    connect_any(&addrs, deadline)
        .map_err(|e| DialError::Connect(format!("{}:{}", ep.host, ep.port), e))
}

/// Tries every resolved address in order (`localhost` is often `::1` and
/// `127.0.0.1`, with the server on one only); each gets an equal share of
/// the time left, so one black-holed address cannot use up the deadline.
fn connect_any(addrs: &[SocketAddr], deadline: Instant) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for (i, addr) in addrs.iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
        }
        let share = left / (addrs.len() - i) as u32;
        match TcpStream::connect_timeout(addr, share.max(Duration::from_millis(1))) {
            Ok(s) => return Ok(s),
            Err(e) => {
                log::debug!("connecting to {addr}: {e}");
                last = e;
            }
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn every_resolved_address_is_tried_until_one_answers() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        // ::1 first, as getaddrinfo orders localhost; nothing listens there
        let addrs: Vec<SocketAddr> = vec![
            format!("[::1]:{port}").parse().expect("v6"),
            format!("127.0.0.1:{port}").parse().expect("v4"),
        ];
        let s = connect_any(&addrs, Instant::now() + Duration::from_secs(10)).expect("connects");
        assert_eq!(s.peer_addr().expect("peer"), addrs[1]);
        let e = connect_any(&addrs[..1], Instant::now() + Duration::from_secs(10))
            .expect_err("nothing on ::1");
        assert_ne!(e.kind(), io::ErrorKind::NotFound);
    }
}
