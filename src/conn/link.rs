//! The connection thread: the only owner of the websocket. It `poll()`s the
//! socket and a wake fd, routes inbound frames, drains the outbound queue and
//! keeps the link alive with pings (protocol.md §1.5–1.6, design.md).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

use super::dial::{self, Stream};
use super::outbound::OutboundRx;
use super::proxy::Settings as ProxySettings;
use super::timing::Timing;
use super::url::Endpoint;
use crate::sys::poll::{PollFd, poll, poll_one};

/// Inbound messages handled per round before outbound frames get a turn.
const READ_BURST: usize = 64;
/// How long a graceful close may take before the socket is just dropped.
const CLOSE_GRACE: Duration = Duration::from_millis(500);
/// The connection thread's stack: tungstenite's buffers live on the heap.
const LINK_STACK: usize = 256 * 1024;

/// What the connection thread tells the supervisor.
#[derive(Debug)]
pub enum LinkEvent {
    /// Link `id` completed the websocket upgrade.
    Connected {
        /// Which link.
        id: usize,
    },
    /// Link `id` is gone (or never came up).
    Ended {
        /// Which link.
        id: usize,
        /// Why it ended; `None` when asked to stop.
        error: Option<String>,
        /// How long it was up; `None` when the dial failed.
        lived: Option<Duration>,
        /// The dial was refused with HTTP 401.
        unauthorized: bool,
    },
}

/// Slack on top of the dial's own deadline: name resolution is bounded by
/// the resolver's settings, not by us.
const DIAL_SLACK: Duration = Duration::from_secs(30);

/// Proof of life from a connection thread: the last time it came round its
/// loop (or started dialing), for the supervisor's watchdog decision.
#[derive(Debug)]
pub struct Liveness {
    epoch: Instant,
    /// Milliseconds since `epoch`, modulo 2^32: ARMv5 has no 64-bit
    /// atomics, and a gap is read with wrapping arithmetic (exact below 49
    /// days, far beyond any bound here).
    beat_ms: AtomicU32,
    dialing: AtomicBool,
}

impl Liveness {
    fn new() -> Liveness {
        Liveness {
            epoch: Instant::now(),
            beat_ms: AtomicU32::new(0),
            dialing: AtomicBool::new(true),
        }
    }

    fn now_ms(&self) -> u32 {
        // truncation intended: see `beat_ms`
        self.epoch.elapsed().as_millis() as u32
    }

    fn beat(&self) {
        self.beat_ms.store(self.now_ms(), Ordering::Release);
    }

    /// Whether the thread came round in time: within the dial's deadline
    /// (plus resolver slack) while dialing, within two ping periods after
    /// (the poll wakes at least once per ping period).
    pub fn is_alive(&self, timing: Timing) -> bool {
        let since = self
            .now_ms()
            .wrapping_sub(self.beat_ms.load(Ordering::Acquire));
        let bound = if self.dialing.load(Ordering::Acquire) {
            dial::HANDSHAKE_TIMEOUT + DIAL_SLACK
        } else {
            timing.ping_period * 2
        };
        Duration::from_millis(u64::from(since)) <= bound
    }
}

/// Where the connection thread hands inbound data frames (the router). It
/// runs on that thread, so it must never block.
pub trait Inbound: Send + Sync {
    /// One websocket data frame, as read.
    fn frame(&self, frame: Vec<u8>);

    /// When [`tick`](Self::tick) next wants to run, for timers kept on the
    /// connection thread (`None`: no timer).
    fn next_deadline(&self) -> Option<Instant> {
        None
    }

    /// Runs the timers due at `now`; replies it queues go out this round.
    fn tick(&self, _now: Instant) {}
}

/// The supervisor's handle on one connection thread.
pub struct Link {
    id: usize,
    live: Arc<Liveness>,
    stop: Arc<AtomicBool>,
    out: OutboundRx,
    join: Option<JoinHandle<()>>,
}

impl Link {
    /// Starts connection thread number `id` dialing `ep` with `token`.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        id: usize,
        ep: Endpoint,
        token: String,
        out: OutboundRx,
        inbound: Arc<dyn Inbound>,
        timing: Timing,
        proxies: Arc<ProxySettings>,
        events: Sender<LinkEvent>,
    ) -> io::Result<Link> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let live = Arc::new(Liveness::new());
        let thread_live = Arc::clone(&live);
        let thread_out = out.clone();
        let join = std::thread::Builder::new()
            .name("conn".to_string())
            .stack_size(LINK_STACK)
            .spawn(move || {
                let ev = run(
                    id,
                    &ep,
                    &token,
                    &proxies,
                    &thread_out,
                    inbound.as_ref(),
                    timing,
                    &thread_stop,
                    &thread_live,
                    &events,
                );
                let _ = events.send(ev);
            })?;
        Ok(Link {
            id,
            live,
            stop,
            out,
            join: Some(join),
        })
    }

    /// Which link this is.
    pub fn id(&self) -> usize {
        self.id
    }

    /// Whether it is still dialing, and since when.
    pub fn dialing_since(&self) -> Option<Instant> {
        self.live
            .dialing
            .load(Ordering::Acquire)
            .then_some(self.live.epoch)
    }

    /// Whether its thread (and the router, which runs on it) is making
    /// progress.
    pub fn is_alive(&self, timing: Timing) -> bool {
        self.live.is_alive(timing)
    }

    /// Asks the thread to close the websocket (close frame) and end.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.out.wake.wake();
    }

    /// Stops and waits for the thread, at most about `CLOSE_GRACE` once it is
    /// past the dial. A thread stuck dialing is left to finish on its own.
    pub fn stop_and_join(mut self, wait: Duration) {
        self.stop();
        let deadline = Instant::now() + wait;
        if let Some(j) = self.join.take() {
            while !j.is_finished() && Instant::now() < deadline {
                std::thread::park_timeout(Duration::from_millis(5));
            }
            if j.is_finished() {
                let _ = j.join();
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run(
    id: usize,
    ep: &Endpoint,
    token: &str,
    proxies: &ProxySettings,
    out: &OutboundRx,
    inbound: &dyn Inbound,
    timing: Timing,
    stop: &AtomicBool,
    live: &Liveness,
    events: &Sender<LinkEvent>,
) -> LinkEvent {
    let ended =
        |error: Option<String>, lived: Option<Duration>, unauthorized: bool| LinkEvent::Ended {
            id,
            error,
            lived,
            unauthorized,
        };
    let mut ws = match dial::dial(ep, token, proxies) {
        Ok(ws) => ws,
        Err(e) => {
            let unauthorized = matches!(e, dial::DialError::Status(401));
            // The supervisor logs it with the server URL as D-Bus gave it.
            return ended(Some(e.to_string()), None, unauthorized);
        }
    };
    if let Err(e) = ws.get_ref().set_nonblocking(true) {
        return ended(Some(format!("socket setup: {e}")), None, false);
    }
    if stop.load(Ordering::Acquire) {
        // replaced while dialing (token change): still say goodbye properly
        close_gracefully(&mut ws);
        return ended(None, None, false);
    }
    live.beat();
    live.dialing.store(false, Ordering::Release);
    let up = Instant::now();
    out.set_connected(id, true);
    let _ = events.send(LinkEvent::Connected { id });
    log::debug!("websocket up: {}", ep.url);
    let result = pump(&mut ws, out, inbound, timing, stop, live);
    out.set_connected(id, false);
    let lived = Some(up.elapsed());
    match result {
        Ok(()) => {
            close_gracefully(&mut ws);
            ended(None, lived, false)
        }
        Err(e) => {
            ws.get_ref().shutdown();
            ended(Some(e), lived, false)
        }
    }
}

fn is_would_block(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io) if io.kind() == io::ErrorKind::WouldBlock)
}

/// Moves frames both ways until the link fails (`Err`) or stop is asked (`Ok`).
fn pump(
    ws: &mut WebSocket<Stream>,
    out: &OutboundRx,
    inbound: &dyn Inbound,
    timing: Timing,
    stop: &AtomicBool,
    live: &Liveness,
) -> Result<(), String> {
    let sock = ws.get_ref().as_raw_fd();
    let wake = out.wake.as_raw_fd();
    let mut last_heard = Instant::now();
    let mut next_ping = last_heard + timing.ping_period;
    let mut write_blocked = false;
    loop {
        live.beat();
        if stop.load(Ordering::Acquire) {
            return Ok(());
        }
        // Read until WouldBlock: with TLS, decrypted bytes buffered inside the
        // SSL object do not make the fd readable again. At most READ_BURST
        // messages per round, so a fast sender cannot starve our writes and
        // the keepalive; `more_to_read` then skips the poll's wait.
        let mut more_to_read = true;
        for _ in 0..READ_BURST {
            match ws.read() {
                Ok(Message::Binary(b)) => inbound.frame(b.into()),
                Ok(Message::Text(t)) => inbound.frame(t.as_bytes().to_vec()),
                Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => last_heard = Instant::now(),
                Ok(Message::Close(frame)) => {
                    end_after_read(ws, None);
                    return Err(match frame {
                        Some(f) => format!("closed by the server: {} {}", f.code, f.reason),
                        None => "closed by the server".to_string(),
                    });
                }
                Ok(Message::Frame(_)) => {}
                Err(e) if is_would_block(&e) => {
                    more_to_read = false;
                    break;
                }
                Err(e) => {
                    end_after_read(ws, Some(&e));
                    return Err(format!("read: {e}"));
                }
            }
        }
        let now = Instant::now();
        if inbound.next_deadline().is_some_and(|d| now >= d) {
            inbound.tick(now);
        }
        // Drained every round (even while blocked) so a readable wake fd
        // cannot spin poll(); queued frames are picked up once unblocked.
        out.wake.drain();
        if !write_blocked {
            while let Some(frame) = out.pop() {
                match ws.write(Message::Binary(frame.into())) {
                    Ok(()) => {}
                    // the frame is buffered; the flush below finds the socket
                    // full and we wait for POLLOUT before taking more
                    Err(e) if is_would_block(&e) => break,
                    Err(e) => return Err(format!("write: {e}")),
                }
            }
        }
        let now = Instant::now();
        if now >= next_ping {
            next_ping = now + timing.ping_period;
            match ws.write(Message::Ping(timing.ping_payload().into())) {
                Ok(()) => {}
                Err(e) if is_would_block(&e) => {}
                Err(e) => return Err(format!("ping: {e}")),
            }
        }
        match ws.flush() {
            Ok(()) => write_blocked = false,
            Err(e) if is_would_block(&e) => write_blocked = true,
            Err(e) => return Err(format!("write: {e}")),
        }
        let dead_at = last_heard + timing.pong_wait;
        if now >= dead_at {
            return Err(format!(
                "no ping or pong from the server for {:?}",
                timing.pong_wait
            ));
        }
        let until = next_ping.min(dead_at);
        let until = inbound.next_deadline().map_or(until, |d| until.min(d));
        let timeout_ms = if more_to_read {
            0
        } else {
            until
                .saturating_duration_since(Instant::now())
                .as_millis()
                .clamp(1, i32::MAX as u128) as i32
        };
        let mut sock_events = libc::POLLIN;
        if write_blocked {
            sock_events |= libc::POLLOUT;
        }
        let mut fds = [
            PollFd::new(sock, sock_events),
            PollFd::new(wake, libc::POLLIN),
        ];
        poll(&mut fds, timeout_ms).map_err(|e| format!("poll: {e}"))?;
        if fds[0].revents() & (libc::POLLERR | libc::POLLNVAL) != 0 {
            return Err("socket error".to_string());
        }
    }
}

/// Ends the link after `ws.read()` returned the server's close (`error` is
/// `None`) or failed with `error`. Public so the Autobahn conformance client
/// (`examples/wsclient.rs`) ends its links through this very code.
pub fn end_after_read(ws: &mut WebSocket<Stream>, error: Option<&tungstenite::Error>) {
    match error.and_then(failure_code) {
        // RFC 6455 §7.1.7: a failed connection SHOULD get a close frame with
        // the reason first; tungstenite leaves that to us.
        Some(code) => close_with(ws, code),
        None => {
            // tungstenite queued the reply to the server's close
            let _ = ws.flush();
            ws.get_ref().shutdown();
        }
    }
}

/// The close code for a read error that fails the connection (§7.4.1), or
/// `None` when the transport itself is gone.
fn failure_code(e: &tungstenite::Error) -> Option<CloseCode> {
    match e {
        // over MAX_INBOUND_MESSAGE
        tungstenite::Error::Capacity(_) => Some(CloseCode::Size),
        tungstenite::Error::Utf8(_) => Some(CloseCode::Invalid),
        tungstenite::Error::Protocol(_) => Some(CloseCode::Protocol),
        _ => None,
    }
}

fn close_gracefully(ws: &mut WebSocket<Stream>) {
    close_with(ws, CloseCode::Normal);
}

/// Sends a close frame with `code`, gives it `CLOSE_GRACE` to leave, then
/// closes the TCP connection.
fn close_with(ws: &mut WebSocket<Stream>, code: CloseCode) {
    let _ = ws.close(Some(CloseFrame {
        code,
        reason: "".into(),
    }));
    let deadline = Instant::now() + CLOSE_GRACE;
    let sock = ws.get_ref().as_raw_fd();
    loop {
        match ws.flush() {
            Ok(()) => break,
            Err(e) if is_would_block(&e) => {}
            Err(_) => break,
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let _ = poll_one(sock, libc::POLLOUT, left.as_millis().max(1) as i32);
    }
    ws.get_ref().shutdown();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;

    /// A one-shot websocket server that sends `raw` bytes after the upgrade
    /// and returns the close frame it then receives from the device.
    fn server_seeing_close(raw: Vec<u8>) -> (u16, std::thread::JoinHandle<Option<CloseCode>>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let join = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().expect("accept");
            tcp.set_read_timeout(Some(Duration::from_secs(10))).ok();
            let mut ws = tungstenite::accept(tcp).expect("upgrade");
            ws.get_mut().write_all(&raw).expect("raw frame");
            loop {
                match ws.read() {
                    Ok(Message::Close(f)) => return f.map(|f| f.code),
                    Ok(_) => {}
                    Err(_) => return None,
                }
            }
        });
        (port, join)
    }

    /// The device's websocket to the test server on loopback `port`.
    fn dial_local(port: u16) -> tungstenite::WebSocket<dial::Stream> {
        let ep = Endpoint {
            tls: false,
            host: "127.0.0.1".to_string(),
            port,
            url: format!("ws://127.0.0.1:{port}/connect"),
        };
        dial::dial(&ep, "token", &ProxySettings::default()).expect("dial")
    }

    fn device_reads_until_failure(port: u16) {
        let mut ws = dial_local(port);
        let err = loop {
            match ws.read() {
                Ok(_) => {}
                Err(e) => break e,
            }
        };
        end_after_read(&mut ws, Some(&err));
    }

    fn sockopt(fd: i32, level: i32, name: i32) -> i32 {
        let mut v: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt into a c_int we own.
        let r = unsafe {
            libc::getsockopt(
                fd,
                level,
                name,
                &mut v as *mut _ as *mut libc::c_void,
                &mut len,
            )
        };
        assert_eq!(r, 0);
        v
    }

    #[test]
    fn liveness_allows_a_dial_its_deadline_and_a_running_link_two_ping_periods() {
        let timing = Timing::default();
        let Some(long_ago) = Instant::now().checked_sub(Duration::from_secs(100)) else {
            return; // a machine up for less than 100 s
        };
        let live = Liveness {
            epoch: long_ago,
            beat_ms: AtomicU32::new(0),
            dialing: AtomicBool::new(true),
        };
        // dialing since 100 s: past 45 s + 30 s slack
        assert!(!live.is_alive(timing));
        // running, last round 100 s ago: within 2 × 54 s
        live.dialing.store(false, Ordering::Release);
        assert!(live.is_alive(timing));
        let fast = Timing {
            ping_period: Duration::from_secs(10),
            ..timing
        };
        assert!(!live.is_alive(fast));
        live.beat();
        assert!(live.is_alive(fast));
    }

    #[test]
    fn the_websocket_socket_has_tcp_keepalive_30s_idle_10s_interval_3_probes() {
        let (port, server) = server_seeing_close(Vec::new());
        let mut ws = dial_local(port);
        let fd = ws.get_ref().as_raw_fd();
        assert_eq!(sockopt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        assert_eq!(sockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE), 30);
        assert_eq!(sockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL), 10);
        assert_eq!(sockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT), 3);
        close_gracefully(&mut ws);
        let _ = server.join();
    }

    #[test]
    fn an_oversized_message_fails_the_link_with_1009() {
        // binary frame header announcing 32 MiB: over MAX_INBOUND_MESSAGE
        let mut raw = vec![0x82, 127];
        raw.extend_from_slice(&(32u64 << 20).to_be_bytes());
        raw.extend_from_slice(&[0; 64]);
        let (port, server) = server_seeing_close(raw);
        device_reads_until_failure(port);
        assert_eq!(server.join().expect("server"), Some(CloseCode::Size));
    }

    #[test]
    fn a_protocol_violation_fails_the_link_with_1002() {
        // RSV1 set without a negotiated extension
        let (port, server) = server_seeing_close(vec![0xc2, 0x01, 0x00]);
        device_reads_until_failure(port);
        assert_eq!(server.join().expect("server"), Some(CloseCode::Protocol));
    }
}
