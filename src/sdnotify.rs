//! systemd's notification protocol (`sd_notify(3)`), written out: one
//! datagram per message to the unix socket named by `NOTIFY_SOCKET` (a path,
//! or `@name` in the abstract namespace). Without `NOTIFY_SOCKET` nothing is
//! sent and nothing changes.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Where `NOTIFY_SOCKET` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A filesystem socket.
    Path(String),
    /// An abstract socket (`@name`; the name without the `@`).
    Abstract(Vec<u8>),
}

/// `STATUS=<text>` as one assignment: error texts quote peers (a close
/// reason, a proxy's status line), and a newline there would be a second
/// assignment to systemd (`WATCHDOG=trigger`, `MAINPID=`…).
pub fn status(text: &str) -> String {
    format!("STATUS={}", text.replace(|c: char| c.is_control(), " "))
}

/// Parses `NOTIFY_SOCKET`; `None` for empty or unsupported values (e.g.
/// `vsock:`, which a device does not use).
pub fn parse_target(value: &str) -> Option<Target> {
    if value.starts_with('/') {
        Some(Target::Path(value.to_string()))
    } else {
        value
            .strip_prefix('@')
            .filter(|n| !n.is_empty())
            .map(|n| Target::Abstract(n.as_bytes().to_vec()))
    }
}

/// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC` (as systemd
/// recommends), or `None` when there is no watchdog or it is meant for
/// another process (`WATCHDOG_PID`).
pub fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, my_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(my_pid)
    {
        return None;
    }
    let usec = usec?.trim().parse::<u64>().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}

/// A connection to systemd's notification socket.
#[derive(Debug)]
pub struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`; `None` when
    /// not started by systemd as `Type=notify` (or the socket is unusable,
    /// which is logged).
    pub fn from_env() -> Option<Notifier> {
        let value = std::env::var("NOTIFY_SOCKET").ok()?;
        let Some(target) = parse_target(&value) else {
            log::warn!("ignoring NOTIFY_SOCKET={value:?}: not a unix socket path or @name");
            return None;
        };
        let watchdog = watchdog_interval(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        );
        match Notifier::open(&target, watchdog) {
            Ok(n) => Some(n),
            Err(e) => {
                log::warn!("cannot use NOTIFY_SOCKET={value:?}: {e}");
                None
            }
        }
    }

    /// A notifier sending to `target`, pinging every `watchdog`.
    pub fn open(target: &Target, watchdog: Option<Duration>) -> io::Result<Notifier> {
        let addr = match target {
            Target::Path(p) => SocketAddr::from_pathname(p)?,
            Target::Abstract(n) => SocketAddr::from_abstract_name(n)?,
        };
        let sock = UnixDatagram::unbound()?;
        // a full socket queue must never block the supervisor
        sock.set_nonblocking(true)?;
        Ok(Notifier {
            sock,
            addr,
            watchdog,
        })
    }

    /// How often the supervisor should send `WATCHDOG=1`, if at all.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends `state` (newline-separated `KEY=value` lines); failures are
    /// logged at debug level only: systemd may be gone while we shut down.
    pub fn send(&self, state: &str) {
        if let Err(e) = self.sock.send_to_addr(state.as_bytes(), &self.addr) {
            log::debug!("sd_notify {state:?}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_text_cannot_smuggle_a_second_assignment() {
        assert_eq!(
            status("reconnecting in 8 s: closed by the server: 1000 x\nWATCHDOG=trigger\r"),
            "STATUS=reconnecting in 8 s: closed by the server: 1000 x WATCHDOG=trigger "
        );
    }

    #[test]
    fn notify_socket_values_parse_as_path_or_abstract_name() {
        assert_eq!(
            parse_target("/run/systemd/notify"),
            Some(Target::Path("/run/systemd/notify".into()))
        );
        assert_eq!(
            parse_target("@/org/freedesktop/systemd1/notify/123"),
            Some(Target::Abstract(
                b"/org/freedesktop/systemd1/notify/123".to_vec()
            ))
        );
        assert_eq!(parse_target(""), None);
        assert_eq!(parse_target("@"), None);
        assert_eq!(parse_target("vsock:2:1234"), None);
        assert_eq!(parse_target("relative/path"), None);
    }

    #[test]
    fn watchdog_pings_at_half_the_timeout_and_only_for_our_pid() {
        assert_eq!(
            watchdog_interval(Some("120000000"), None, 7),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            watchdog_interval(Some("2000000"), Some("7"), 7),
            Some(Duration::from_secs(1))
        );
        assert_eq!(watchdog_interval(Some("2000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(None, None, 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("soon"), None, 7), None);
    }

    #[test]
    fn messages_arrive_as_one_datagram_each_on_an_abstract_socket() {
        let name = format!("mender-connect-sdnotify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let rx = UnixDatagram::bind_addr(&addr).expect("bind");
        let n = Notifier::open(&Target::Abstract(name.into_bytes()), None).expect("open");
        n.send("READY=1\nSTATUS=hello");
        n.send("WATCHDOG=1");
        let mut buf = [0u8; 256];
        let len = rx.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=hello");
        let len = rx.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..len], b"WATCHDOG=1");
    }
}
