//! Opening the target socket (transfer.md §4.2 step 5) and the Go-style
//! error texts the server relays to users (`dial tcp 127.0.0.1:1: connect:
//! connection refused`).

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use crate::config::allow::{AllowList, Verdict};
use crate::sys::errno::go_text;
pub use crate::wire::types::portforward::Net;

/// Where a `new` asks to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Transport.
    pub net: Net,
    /// Host as sent (name or literal; IPv6 literals bracketed by the client).
    pub host: String,
    /// Port.
    pub port: u16,
}

/// Why a dial failed; displays as Go's `net.OpError` does.
#[derive(Debug)]
pub enum DialError {
    /// Name resolution failed or gave no address.
    Lookup {
        /// Transport.
        net: Net,
        /// The `host:port` string that was resolved.
        addr: String,
        /// Resolver text.
        text: String,
    },
    /// `PortForward.AllowedTargets` does not allow the target; nothing was
    /// dialled.
    NotAllowed {
        /// The `host:port` as requested.
        addr: String,
    },
    /// Every resolved address failed; this is the first failure.
    Connect {
        /// Transport.
        net: Net,
        /// The address tried.
        addr: SocketAddr,
        /// OS text (`connection refused`, `i/o timeout`).
        text: String,
    },
}

impl fmt::Display for DialError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DialError::Lookup { net, addr, text } => {
                write!(f, "dial {}: lookup {addr}: {text}", net.name())
            }
            DialError::NotAllowed { addr } => write!(f, "port forward to {addr} is not allowed"),
            // Go names the failing syscall, except for its own deadline
            DialError::Connect { net, addr, text } if text == "i/o timeout" => {
                write!(f, "dial {} {addr}: {text}", net.name())
            }
            DialError::Connect { net, addr, text } => {
                write!(f, "dial {} {addr}: connect: {text}", net.name())
            }
        }
    }
}

impl std::error::Error for DialError {}

/// The open target socket, non-blocking once `dial` returns.
#[derive(Debug)]
pub enum Sock {
    /// TCP stream.
    Tcp(TcpStream),
    /// Connected UDP socket.
    Udp(UdpSocket),
}

impl Sock {
    /// Reads one chunk (TCP) or one datagram (UDP). For UDP the returned
    /// length is the datagram's real length, which exceeds `buf.len()` when
    /// the kernel had to truncate it.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(buf),
            Sock::Udp(s) => crate::sys::socket::recv_datagram(s, buf),
        }
    }

    /// Writes some of `data` (TCP) or all of it as one datagram (UDP).
    pub fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write(data),
            Sock::Udp(s) => s.send(data),
        }
    }

    /// The raw fd, for poll.
    pub fn fd(&self) -> RawFd {
        match self {
            Sock::Tcp(s) => s.as_raw_fd(),
            Sock::Udp(s) => s.as_raw_fd(),
        }
    }

    /// `local->peer`, as Go writes it in read/write errors.
    pub fn endpoints(&self) -> String {
        let (l, p) = match self {
            Sock::Tcp(s) => (s.local_addr(), s.peer_addr()),
            Sock::Udp(s) => (s.local_addr(), s.peer_addr()),
        };
        let show =
            |a: io::Result<SocketAddr>| a.map_or_else(|_| "?".to_string(), |a| a.to_string());
        format!("{}->{}", show(l), show(p))
    }
}

/// Resolves once, checks the target against `allow`, and connects only to
/// the addresses checked, trying each in turn within `timeout` overall.
/// Runs on the connection's own thread: it may block that long.
pub fn dial(target: &Target, allow: &AllowList, timeout: Duration) -> Result<Sock, DialError> {
    let deadline = Instant::now() + timeout;
    // Go concatenates host and port; a client brackets IPv6 literals itself.
    let addr = format!("{}:{}", target.host, target.port);
    let verdict = allow.verdict(target.net, &target.host, target.port);
    if verdict == Verdict::Denied {
        return Err(DialError::NotAllowed { addr });
    }
    let addrs: Vec<SocketAddr> = match addr.to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(_) if verdict == Verdict::CheckAddresses => {
            // nothing resolved, so nothing can be shown to be inside the list
            return Err(DialError::NotAllowed { addr });
        }
        Err(e) => {
            return Err(DialError::Lookup {
                net: target.net,
                addr,
                text: go_text(&e),
            });
        }
    };
    if verdict == Verdict::CheckAddresses {
        let ips: Vec<std::net::IpAddr> = addrs.iter().map(SocketAddr::ip).collect();
        if !allow.covers(target.net, target.port, &ips) {
            return Err(DialError::NotAllowed { addr });
        }
    }
    let mut first: Option<DialError> = None;
    for a in &addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        let result = if left.is_zero() {
            Err(io::Error::from(io::ErrorKind::TimedOut))
        } else {
            connect_one(target.net, *a, left)
        };
        match result {
            Ok(s) => return Ok(s),
            Err(e) => {
                first.get_or_insert(DialError::Connect {
                    net: target.net,
                    addr: *a,
                    text: go_text(&e),
                });
            }
        }
    }
    Err(first.unwrap_or(DialError::Lookup {
        net: target.net,
        addr,
        text: "no such host".to_string(),
    }))
}

fn connect_one(net: Net, addr: SocketAddr, timeout: Duration) -> io::Result<Sock> {
    match net {
        Net::Tcp => {
            let s = TcpStream::connect_timeout(&addr, timeout)?;
            // Go's default, and interactive protocols (ssh) need it.
            s.set_nodelay(true)?;
            s.set_nonblocking(true)?;
            Ok(Sock::Tcp(s))
        }
        Net::Udp => {
            let local: SocketAddr = if addr.is_ipv4() {
                (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let s = UdpSocket::bind(local)?;
            s.connect(addr)?;
            s.set_nonblocking(true)?;
            Ok(Sock::Udp(s))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errors_read_like_go() {
        let refused = io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(go_text(&refused), "connection refused");
        assert_eq!(
            go_text(&io::Error::from(io::ErrorKind::TimedOut)),
            "i/o timeout"
        );
    }

    #[test]
    fn a_denied_target_is_refused_without_a_connection_attempt() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.set_nonblocking(true).expect("nonblocking");
        let port = l.local_addr().expect("addr").port();
        let target = Target {
            net: Net::Tcp,
            host: "127.0.0.1".to_string(),
            port,
        };
        let deny = AllowList::parse(&["127.0.0.2:*", "udp/127.0.0.1:*"]).expect("list");
        let e = dial(&target, &deny, Duration::from_secs(5)).expect_err("denied");
        assert_eq!(
            e.to_string(),
            format!("port forward to 127.0.0.1:{port} is not allowed")
        );
        let none = l.accept().map(|_| ()).expect_err("nobody connected");
        assert_eq!(none.kind(), io::ErrorKind::WouldBlock);
        // a name that does not resolve proves nothing against address entries
        let nx = Target {
            host: "no-such-host.invalid".to_string(),
            ..target.clone()
        };
        let e = dial(&nx, &deny, Duration::from_secs(5)).expect_err("denied");
        assert!(matches!(e, DialError::NotAllowed { .. }), "{e}");

        let allow = AllowList::parse(&["127.0.0.0/8:*"]).expect("list");
        dial(&target, &allow, Duration::from_secs(5)).expect("allowed");
        // connect returned, so the handshake is done and accept is ready
        l.accept().expect("the allowed dial connected");
    }

    #[test]
    fn a_closed_port_gives_the_reference_text() {
        let target = Target {
            net: Net::Tcp,
            host: "127.0.0.1".to_string(),
            port: 1,
        };
        let e = dial(&target, &AllowList::default(), Duration::from_secs(5))
            .expect_err("port 1 is closed");
        assert_eq!(
            e.to_string(),
            "dial tcp 127.0.0.1:1: connect: connection refused"
        );
    }
}
