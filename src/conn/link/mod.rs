//! The connection thread: the only owner of the websocket. It `poll()`s the
//! socket and a wake fd, routes inbound frames, drains the outbound queue and
//! keeps the link alive with pings (protocol.md §1.5–1.6, design.md).

mod close;
mod end;
mod pump;
mod state;

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use self::close::close_gracefully;
pub use self::close::end_after_read;
pub use self::end::LinkEnd;
use super::dial;
use super::outbound::OutboundRx;
use super::proxy::Settings as ProxySettings;
use super::timing::Timing;
use super::url::Endpoint;
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
        /// Why it ended.
        end: LinkEnd,
        /// How long it was up; `None` when the dial failed.
        lived: Option<Duration>,
    },
}

/// What every link of the daemon shares: where frames come from and go,
/// the timers, the proxies and where to report.
#[derive(Clone)]
pub struct LinkSetup {
    /// The outbound queue the connection thread drains.
    pub out: OutboundRx,
    /// Where inbound frames go (the router).
    pub inbound: Arc<dyn Inbound>,
    /// Keepalive timers.
    pub timing: Timing,
    /// Proxy settings for the dial.
    pub proxies: Arc<ProxySettings>,
    /// Where the thread reports `Connected` and `Ended`.
    pub events: Sender<LinkEvent>,
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

    /// Runs once per round after the round's attempt to write the queued
    /// frames (they may still wait for a full socket), and once more when
    /// the link ends: for work that should follow the replies out (a write
    /// the early `ack` acknowledges, so the client's next step overlaps it).
    fn after_write(&self) {}
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
    pub fn start(id: usize, ep: Endpoint, token: String, setup: &LinkSetup) -> io::Result<Link> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let live = Arc::new(Liveness::new());
        let thread_live = Arc::clone(&live);
        let out = setup.out.clone();
        let thread_setup = setup.clone();
        let join = crate::threads::spawn("conn".to_string(), LINK_STACK, move || {
            let s = thread_setup;
            let (end, lived) = run(id, &ep, &token, &s, &thread_stop, &thread_live);
            let _ = s.events.send(LinkEvent::Ended { id, end, lived });
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
        if let Some(j) = self.join.take() {
            crate::threads::join_within(j, wait);
        }
    }
}

/// Dials and runs the link; returns why it ended and how long it was up.
fn run(
    id: usize,
    ep: &Endpoint,
    token: &str,
    setup: &LinkSetup,
    stop: &AtomicBool,
    live: &Liveness,
) -> (LinkEnd, Option<Duration>) {
    // The supervisor logs a dial failure with the server URL as D-Bus gave it.
    let mut ws = match dial::dial(ep, token, &setup.proxies) {
        Ok(ws) => ws,
        Err(e) => return (LinkEnd::Dial(e), None),
    };
    if let Err(e) = ws.get_mut().set_nonblocking(true) {
        return (LinkEnd::Setup(e), None);
    }
    if stop.load(Ordering::Acquire) {
        // replaced while dialing (token change): still say goodbye properly
        close_gracefully(&mut ws);
        return (LinkEnd::Stopped, None);
    }
    live.beat();
    live.dialing.store(false, Ordering::Release);
    let up = Instant::now();
    setup.out.set_connected(id, true);
    let _ = setup.events.send(LinkEvent::Connected { id });
    log::debug!("websocket up: {}", ep.url);
    let end = pump::pump(
        &mut ws,
        &setup.out,
        setup.inbound.as_ref(),
        setup.timing,
        stop,
        live,
    );
    setup.out.set_connected(id, false);
    match end {
        LinkEnd::Stopped => close_gracefully(&mut ws),
        _ => ws.get_ref().shutdown(),
    }
    (end, Some(up.elapsed()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;
    use std::os::fd::AsFd;
    use tungstenite::Message;
    use tungstenite::protocol::frame::coding::CloseCode;

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

    fn sockopt(ws: &tungstenite::WebSocket<dial::Stream>, level: i32, name: i32) -> i32 {
        crate::sys::sockopt::get_int(ws.get_ref().as_fd(), level, name).expect("getsockopt")
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
        assert_eq!(sockopt(&ws, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        assert_eq!(sockopt(&ws, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE), 30);
        assert_eq!(sockopt(&ws, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL), 10);
        assert_eq!(sockopt(&ws, libc::IPPROTO_TCP, libc::TCP_KEEPCNT), 3);
        close_gracefully(&mut ws);
        let _ = server.join();
    }

    /// Records what the pump hands over, in order.
    #[derive(Default)]
    struct Events(std::sync::Mutex<Vec<&'static str>>);

    impl Inbound for Events {
        fn frame(&self, _frame: Vec<u8>) {
            self.0.lock().expect("events").push("frame");
        }
        fn after_write(&self) {
            self.0.lock().expect("events").push("after");
        }
    }

    #[test]
    fn work_left_for_after_the_write_runs_when_the_link_ends_in_the_same_round() {
        // a data message and the server's close in one segment: the pump
        // returns from the round that read the message
        let raw = vec![0x82, 0x03, 1, 2, 3, 0x88, 0x02, 0x03, 0xe8];
        let (port, server) = server_seeing_close(raw);
        let mut ws = dial_local(port);
        ws.get_mut().set_nonblocking(true).expect("nonblocking");
        let wake = Arc::new(crate::sys::wake::Wake::new().expect("eventfd"));
        let (_out, rx) = crate::conn::outbound::queue(wake);
        let events = Events::default();
        let end = pump::pump(
            &mut ws,
            &rx,
            &events,
            Timing::default(),
            &AtomicBool::new(false),
            &Liveness::new(),
        );
        assert!(matches!(end, LinkEnd::ClosedByServer(_)), "{end}");
        let ev = events.0.lock().expect("events");
        let last_frame = ev.iter().rposition(|e| *e == "frame").expect("a frame");
        assert_eq!(&ev[last_frame + 1..], ["after"], "{ev:?}");
        drop(ev);
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
