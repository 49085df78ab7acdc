//! Port forwarding (protocol 3) through the daemon, driven like deviceconnect
//! relays mender-cli: one `forward` in flight per connection, every device
//! `forward` acked, server messages with a UUID sid and a `user_id` prop.

use testbed::target::TcpTarget;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use mender_connect::testing::CHUNK_MAX;
use mender_connect::wire::codec::{PROTO_CONTROL, PROTO_PORTFORWARD, ProtoMsg, Value};
use mender_connect::wire::control::{Accept, ControlError, encode_map};
use testbed::{
    AuthService, ConnHandle, Daemon, DbusDaemon, Server, TIMEOUT, default_config, drive,
};

const USER_ID: &str = "b3f0c9a4-1d2e-4f50-8a61-7c8d9e0f1a2b";

// ---------------------------------------------------------------------------
// Test bed: daemon + stand-in server + a demultiplexer of device messages
// ---------------------------------------------------------------------------

type Routes = Arc<Mutex<HashMap<(String, String), Sender<ProtoMsg>>>>;

/// Reads every device message and hands it to the channel registered for
/// its (sid, connection_id); the rest (control, errors without an id) go to
/// `other`.
struct Mux {
    conn: ConnHandle,
    routes: Routes,
    other: Receiver<ProtoMsg>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Mux {
    fn start(conn: ConnHandle) -> Mux {
        let routes: Routes = Arc::default();
        let (other_tx, other) = crossbeam_channel::unbounded();
        let stop = Arc::new(AtomicBool::new(false));
        let (c, r, s) = (conn.clone(), routes.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Acquire) {
                let Some(msg) = c.recv_msg(Duration::from_millis(100)) else {
                    if !c.is_open() {
                        return;
                    }
                    continue;
                };
                let key = (
                    msg.hdr.sid.clone(),
                    msg.prop_str("connection_id")
                        .unwrap_or_default()
                        .to_string(),
                );
                let tx = r.lock().unwrap().get(&key).cloned();
                let _ = tx.unwrap_or_else(|| other_tx.clone()).send(msg);
            }
        });
        Mux {
            conn,
            routes,
            other,
            stop,
            thread: Some(thread),
        }
    }

    fn link(&self, sid: &str, cid: &str) -> Link {
        let (tx, rx) = crossbeam_channel::unbounded();
        self.routes
            .lock()
            .unwrap()
            .insert((sid.to_string(), cid.to_string()), tx);
        Link {
            conn: self.conn.clone(),
            sid: sid.to_string(),
            cid: cid.to_string(),
            rx,
            got_new: false,
        }
    }

    fn recv_other(&self, timeout: Duration) -> ProtoMsg {
        self.other
            .recv_timeout(timeout)
            .expect("expected a message without a registered connection id")
    }
}

impl Drop for Mux {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Bed {
    // field order = drop order: the reader, the daemon, then its peers
    mux: Mux,
    daemon: Daemon,
    _server: Server,
    _auth: AuthService,
    _bus: DbusDaemon,
}

fn bed_with(config: &str, env: &[(&str, &str)]) -> Bed {
    let c = testbed::env::connected(config, env, "token-pf");
    Bed {
        mux: Mux::start(c.conn),
        daemon: c.daemon,
        _server: c.server,
        _auth: c.auth,
        _bus: c.bus,
    }
}

fn bed() -> Bed {
    bed_with(&default_config(), &[])
}

fn uuid(n: usize) -> String {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let s = SEQ.fetch_add(1, Ordering::Relaxed);
    format!(
        "{:08x}-{:04x}-4a7b-8c9d-{:012x}",
        std::process::id(),
        n & 0xffff,
        s
    )
}

fn error_text(msg: &ProtoMsg) -> (String, String) {
    assert_eq!(msg.hdr.typ, "error", "not an error: {msg:?}");
    let body = drive::error_body(msg);
    assert_eq!(body.len(), 2, "error body is exactly {{err, msgtype}}");
    (
        drive::str_field(&body, "err"),
        drive::str_field(&body, "msgtype"),
    )
}

/// One forwarded connection as mender-cli drives it.
struct Link {
    conn: ConnHandle,
    sid: String,
    cid: String,
    rx: Receiver<ProtoMsg>,
    got_new: bool,
}

impl Link {
    fn send(&self, typ: &str, body: Option<Vec<u8>>) {
        let mut m = ProtoMsg::new(PROTO_PORTFORWARD, typ, self.sid.as_str())
            .with_prop("connection_id", Value::Str(self.cid.clone()))
            .with_prop("user_id", Value::Str(USER_ID.into()));
        m.body = body;
        self.conn.send_msg(&m);
    }

    fn send_new(&self, host: &str, port: u16, proto: &str) {
        self.send("new", Some(drive::pf_new_body(host, port, proto)));
    }

    fn recv(&mut self, timeout: Duration) -> ProtoMsg {
        let m = self
            .rx
            .recv_timeout(timeout)
            .unwrap_or_else(|_| panic!("connection {}: nothing within {timeout:?}", self.cid));
        assert_eq!(m.hdr.proto, PROTO_PORTFORWARD);
        if m.hdr.typ != "error" {
            // replies carry exactly {connection_id}
            assert_eq!(m.hdr.props.len(), 1, "props of {m:?}");
        }
        if m.hdr.typ == "new" {
            assert!(m.body.is_none());
            self.got_new = true;
        }
        if m.hdr.typ == "forward" {
            assert!(self.got_new, "a forward came before the new reply");
        }
        m
    }

    fn expect(&mut self, typ: &str) -> ProtoMsg {
        let m = self.recv(TIMEOUT);
        assert_eq!(m.hdr.typ, typ, "got {m:?}");
        m
    }

    fn open(&mut self, addr: SocketAddr, proto: &str) {
        self.send_new(&addr.ip().to_string(), addr.port(), proto);
        self.expect("new");
    }

    /// Sends `data` in `chunk`-sized forwards, one in flight, acking every
    /// device forward, until `expect` bytes came back (or a device stop).
    /// Returns the bytes and the largest forward body seen.
    fn transfer(&mut self, data: &[u8], expect: usize, chunk: usize) -> (Vec<u8>, usize) {
        let (mut sent, mut in_flight, mut got, mut largest) = (0, false, Vec::new(), 0);
        loop {
            if !in_flight && sent < data.len() {
                let end = (sent + chunk).min(data.len());
                self.send("forward", Some(data[sent..end].to_vec()));
                sent = end;
                in_flight = true;
            }
            if got.len() >= expect && !in_flight && sent == data.len() {
                return (got, largest);
            }
            let m = self.recv(TIMEOUT);
            match m.hdr.typ.as_str() {
                "ack" => {
                    assert!(in_flight, "an ack with nothing in flight");
                    in_flight = false;
                }
                "forward" => {
                    let body = m.body.unwrap_or_default();
                    largest = largest.max(body.len());
                    got.extend_from_slice(&body);
                    self.send("ack", None);
                }
                "stop" => return (got, largest),
                other => panic!("unexpected {other}: {m:?}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Targets: echo, HTTP, recording, UDP echo, and a port whose SYNs are dropped
// ---------------------------------------------------------------------------

/// A listener whose accept queue is full, so further SYNs are dropped and
/// a connect hangs (a stand-in for an unreachable host).
struct Blackhole {
    addr: SocketAddr,
    _listener: TcpListener,
    _queued: Vec<TcpStream>,
}

impl Blackhole {
    fn start() -> Blackhole {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        // SAFETY: listen on our own socket; only shrinks its backlog.
        assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
        let addr = l.local_addr().expect("addr");
        let mut queued = Vec::new();
        let full = testbed::wait_until(TIMEOUT, || {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(s) => {
                    queued.push(s);
                    false
                }
                Err(_) => true,
            }
        });
        assert!(full, "could not fill the accept queue");
        Blackhole {
            addr,
            _listener: l,
            _queued: queued,
        }
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn ten_mib_of_random_bytes_come_back_identical_through_an_echo_server() {
    let bed = bed();
    let echo = TcpTarget::echo();
    let mut link = bed.mux.link(&uuid(1), &uuid(2));
    link.open(echo.addr, "tcp");
    let data = testbed::random_bytes(10 << 20, 0x5eed);
    let (got, largest) = link.transfer(&data, data.len(), 4096);
    assert_eq!(got.len(), data.len());
    assert!(got == data, "echoed bytes differ");
    assert!(largest <= CHUNK_MAX, "forward of {largest} bytes");
    link.send("stop", None);
    link.expect("stop");
}

#[test]
fn large_reads_are_used_when_the_target_sends_in_bulk() {
    let bed = bed();
    let source = TcpTarget::start(|mut s| {
        let _ = s.write_all(&testbed::random_bytes(1 << 20, 7));
    });
    let mut link = bed.mux.link(&uuid(1), &uuid(2));
    link.open(source.addr, "tcp");
    let (got, largest) = link.transfer(&[], usize::MAX, 4096);
    assert_eq!(got, testbed::random_bytes(1 << 20, 7));
    assert!(largest > 4096 && largest <= CHUNK_MAX, "largest {largest}");
}

#[test]
fn an_http_get_through_a_forwarded_port_works() {
    let bed = bed();
    let http = TcpTarget::start(|mut s| {
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
        let ok = req.starts_with(b"GET /hello HTTP/1.1\r\n");
        let body = if ok { "hello, world" } else { "bad request" };
        let _ = write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    });
    let mut link = bed.mux.link(&uuid(1), &uuid(2));
    link.open(http.addr, "tcp");
    let req = b"GET /hello HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    // the server closes after answering: the device then sends its own stop
    let (got, _) = link.transfer(req, usize::MAX, 4096);
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(text.ends_with("\r\n\r\nhello, world"), "{text}");
}

#[test]
fn a_closed_port_gives_the_go_dial_error_and_queued_data_unknown_connection() {
    let bed = bed();
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mut link = bed.mux.link(&uuid(1), &uuid(2));
    link.send_new("127.0.0.1", port, "tcp");
    link.send("forward", Some(b"data".to_vec()));
    let (err, typ) = error_text(&link.expect("error"));
    assert_eq!(
        err,
        format!("dial tcp 127.0.0.1:{port}: connect: connection refused")
    );
    assert_eq!(typ, "new");
    let (err, typ) = error_text(&link.expect("error"));
    assert_eq!(
        (err.as_str(), typ.as_str()),
        ("unknown connection", "forward")
    );
}

#[test]
fn a_hanging_dial_delays_no_other_session_and_times_out() {
    let bed = bed_with(&default_config(), &[("MENDER_CONNECT_PF_DIAL_MS", "2000")]);
    let hole = Blackhole::start();
    let echo = TcpTarget::echo();
    let mut other = bed.mux.link(&uuid(1), &uuid(2));
    other.open(echo.addr, "tcp");

    let mut hung = bed.mux.link(&uuid(3), &uuid(4));
    let started = Instant::now();
    hung.send_new(&hole.addr.ip().to_string(), hole.addr.port(), "tcp");
    hung.send("forward", Some(b"queued".to_vec()));
    // a second message on the hanging session's protocol must not wedge it
    hung.send("ack", None);
    let mut worst = Duration::ZERO;
    let mut rounds = 0;
    while started.elapsed() < Duration::from_millis(1500) {
        let t = Instant::now();
        let (got, _) = other.transfer(b"ping", 4, 4096);
        worst = worst.max(t.elapsed());
        assert_eq!(got, b"ping");
        rounds += 1;
    }
    assert!(rounds > 5, "only {rounds} round trips");
    assert!(
        worst < Duration::from_millis(100),
        "another session waited {worst:?}"
    );
    let (err, typ) = error_text(&hung.expect("error"));
    let took = started.elapsed();
    assert_eq!(
        (err.as_str(), typ.as_str()),
        (
            format!("dial tcp {}: i/o timeout", hole.addr).as_str(),
            "new"
        )
    );
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(6),
        "dial error after {took:?}"
    );
    let (err, typ) = error_text(&hung.expect("error"));
    assert_eq!(
        (err.as_str(), typ.as_str()),
        ("unknown connection", "forward")
    );
}

#[test]
fn data_sent_right_after_new_arrives_in_order_and_the_new_reply_comes_first() {
    let bed = bed();
    // talks first, like an ssh server, then echoes
    let banner = TcpTarget::start(|mut s| {
        if s.write_all(b"SSH-2.0-banner\r\n").is_err() {
            return;
        }
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 || s.write_all(&buf[..n]).is_err() {
                return;
            }
        }
    });
    for round in 0..5 {
        let mut link = bed.mux.link(&uuid(round), &uuid(round + 100));
        link.send_new("127.0.0.1", banner.addr.port(), "tcp");
        for part in [&b"one,"[..], b"two,", b"three"] {
            link.send("forward", Some(part.to_vec()));
        }
        let want = b"SSH-2.0-banner\r\none,two,three";
        let mut got = Vec::new();
        let mut acks = 0;
        while got.len() < want.len() || acks < 3 {
            let m = link.recv(TIMEOUT);
            match m.hdr.typ.as_str() {
                "new" => {}
                "ack" => acks += 1,
                "forward" => {
                    got.extend(m.body.unwrap_or_default());
                    link.send("ack", None);
                }
                _ => panic!("unexpected {m:?}"),
            }
        }
        assert_eq!(acks, 3, "one ack per forward");
        assert_eq!(got, want);
        link.send("stop", None);
        link.expect("stop");
    }
}

#[test]
fn a_hundred_concurrent_connections_in_one_session_carry_their_own_bytes() {
    let bed = bed();
    let echo = TcpTarget::echo();
    let sid = uuid(0);
    let mut links: Vec<Link> = (0..100).map(|i| bed.mux.link(&sid, &uuid(i + 1))).collect();
    for l in &links {
        l.send_new("127.0.0.1", echo.addr.port(), "tcp");
    }
    std::thread::scope(|s| {
        for (i, mut l) in links.drain(..).enumerate() {
            s.spawn(move || {
                l.expect("new");
                let data = testbed::random_bytes(40_000 + i * 97, i as u64 + 1);
                let (got, _) = l.transfer(&data, data.len(), 4096);
                assert!(got == data, "connection {i}: bytes differ");
                l.send("stop", None);
                l.expect("stop");
            });
        }
    });
}

#[test]
fn connection_caps_per_session_and_in_total_are_enforced() {
    let bed = bed_with(
        &default_config(),
        &[
            ("MENDER_CONNECT_PF_MAX_PER_SESSION", "2"),
            ("MENDER_CONNECT_PF_MAX_TOTAL", "3"),
        ],
    );
    let echo = TcpTarget::echo();
    let (a, b) = (uuid(1), uuid(2));
    let mut a1 = bed.mux.link(&a, &uuid(10));
    let mut a2 = bed.mux.link(&a, &uuid(11));
    let mut a3 = bed.mux.link(&a, &uuid(12));
    a1.open(echo.addr, "tcp");
    a2.open(echo.addr, "tcp");
    a3.send_new("127.0.0.1", echo.addr.port(), "tcp");
    let (err, typ) = error_text(&a3.expect("error"));
    assert_eq!(
        (err.as_str(), typ.as_str()),
        ("too many port-forward connections", "new")
    );
    let mut b1 = bed.mux.link(&b, &uuid(20));
    let mut b2 = bed.mux.link(&b, &uuid(21));
    b1.open(echo.addr, "tcp");
    b2.send_new("127.0.0.1", echo.addr.port(), "tcp");
    let (err, _) = error_text(&b2.expect("error"));
    assert_eq!(err, "too many port-forward connections");
    // the refused ones did not disturb the live ones
    assert_eq!(a1.transfer(b"still here", 10, 4096).0, b"still here");
    // a stop frees a slot
    a1.send("stop", None);
    a1.expect("stop");
    b2.open(echo.addr, "tcp");
    assert_eq!(b2.transfer(b"ok", 2, 4096).0, b"ok");
}

#[test]
fn udp_round_trips_and_oversized_datagrams_are_reported_not_truncated() {
    let bed = bed();
    let udp = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    let addr = udp.local_addr().expect("addr");
    let echo = std::thread::spawn(move || {
        let mut buf = vec![0; 70_000];
        udp.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            if &buf[..n] == b"quit" {
                return;
            }
            let _ = udp.send_to(&buf[..n], from);
        }
    });
    let mut link = bed.mux.link(&uuid(1), &uuid(2));
    link.open(addr, "udp");
    assert_eq!(link.transfer(b"hello", 5, 4096).0, b"hello");
    // the largest IPv4 UDP payload comes back as one whole forward
    let big = testbed::random_bytes(65_507, 3);
    let (got, largest) = link.transfer(&big, big.len(), big.len());
    assert_eq!(largest, big.len(), "datagram split or cut");
    assert!(got == big);
    // one byte more cannot be sent as one datagram: ack, then an error
    link.send("forward", Some(vec![0; 65_508]));
    link.expect("ack");
    let (err, typ) = error_text(&link.expect("error"));
    assert!(err.starts_with("write udp "), "{err}");
    assert!(err.ends_with(": write: message too long"), "{err}");
    assert_eq!(typ, "forward");
    // and the connection goes on
    assert_eq!(link.transfer(b"again", 5, 4096).0, b"again");
    link.transfer(b"quit", 0, 4096);
    echo.join().expect("udp echo");
    link.send("stop", None);
    link.expect("stop");
}

#[test]
fn udp_to_a_closed_port_ends_with_a_device_stop() {
    let bed = bed();
    let port = {
        let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
        s.local_addr().expect("addr").port()
    };
    let mut link = bed.mux.link(&uuid(1), &uuid(2));
    link.send_new("127.0.0.1", port, "udp");
    link.expect("new");
    link.send("forward", Some(b"anyone?".to_vec()));
    link.expect("ack");
    link.expect("stop");
}

#[test]
fn duplicate_and_unsolicited_acks_are_ignored_and_the_connection_goes_on() {
    let mut bed = bed();
    let echo = TcpTarget::echo();
    let mut link = bed.mux.link(&uuid(1), &uuid(2));
    link.open(echo.addr, "tcp");
    link.send("ack", None); // unsolicited
    assert_eq!(link.transfer(b"one", 3, 4096).0, b"one");
    link.send("ack", None); // duplicate of the ack transfer() sent
    link.send("ack", None);
    assert_eq!(link.transfer(b"two", 3, 4096).0, b"two");
    // an ack for an id nobody opened
    let mut ghost = bed.mux.link(&link.sid.clone(), &uuid(3));
    ghost.send("ack", None);
    let (err, typ) = error_text(&ghost.expect("error"));
    assert_eq!((err.as_str(), typ.as_str()), ("unknown connection", "ack"));
    assert!(bed.daemon.try_status().is_none(), "daemon died");
    assert!(
        bed.daemon
            .wait_log("ack with nothing in flight ignored", TIMEOUT)
    );
}

#[test]
fn bad_messages_get_the_reference_errors() {
    let bed = bed();
    let echo = TcpTarget::echo();
    let sid = uuid(1);
    let mut link = bed.mux.link(&sid, &uuid(2));
    link.send("dummy", None);
    let (err, typ) = error_text(&link.expect("error"));
    assert_eq!(
        (err.as_str(), typ.as_str()),
        ("unknown message type", "dummy")
    );
    link.send("forward", Some(b"x".to_vec()));
    assert_eq!(error_text(&link.expect("error")).0, "unknown connection");
    link.send("stop", None);
    assert_eq!(error_text(&link.expect("error")).0, "unknown connection");
    link.send_new("127.0.0.1", echo.addr.port(), "dummy");
    assert_eq!(
        error_text(&link.expect("error")).0,
        "unknown protocol: dummy"
    );
    link.send_new("127.0.0.1", 0, "tcp");
    let invalid = "invalid port-forward message: missing connection_id, remote_port or protocol";
    assert_eq!(error_text(&link.expect("error")).0, invalid);
    link.send(
        "new",
        Some(encode_map(&[("remote_host", Value::Str("h".into()))])),
    );
    assert_eq!(error_text(&link.expect("error")).0, invalid);
    link.send("new", Some(b"C".to_vec()));
    assert!(error_text(&link.expect("error")).0.starts_with("msgpack:"));
    // no connection id at all: the error has no props, as in the reference
    let anon = ProtoMsg::new(PROTO_PORTFORWARD, "new", sid.as_str()).with_body(drive::pf_new_body(
        "127.0.0.1",
        echo.addr.port(),
        "tcp",
    ));
    link.conn.send_msg(&anon);
    let m = bed.mux.recv_other(TIMEOUT);
    assert!(m.hdr.props.is_empty());
    assert_eq!(error_text(&m), (invalid.to_string(), "new".to_string()));
    // a stop twice: echo, then unknown connection
    link.open(echo.addr, "tcp");
    link.send("stop", None);
    link.expect("stop");
    link.send("stop", None);
    assert_eq!(error_text(&link.expect("error")).0, "unknown connection");
}

/// Accepts connections and reports, per connection, when the device closed it.
fn closing_target() -> (TcpTarget, Receiver<()>) {
    let (tx, rx) = crossbeam_channel::unbounded::<()>();
    let t = TcpTarget::start(move |mut s| {
        let mut buf = [0u8; 1024];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
        let _ = s.shutdown(Shutdown::Both);
        let _ = tx.send(());
    });
    (t, rx)
}

#[test]
fn a_reused_connection_id_closes_the_old_socket_and_session_close_closes_all_silently() {
    let bed = bed();
    let (target, closed) = closing_target();
    let sid = uuid(1);
    let cid = uuid(2);
    let mut link = bed.mux.link(&sid, &cid);
    link.open(target.addr, "tcp");
    link.open(target.addr, "tcp");
    closed
        .recv_timeout(TIMEOUT)
        .expect("old socket closed on reuse");
    let mut second = bed.mux.link(&sid, &uuid(3));
    second.open(target.addr, "tcp");
    // control close ends the session: both sockets close, no stop is sent
    bed.mux
        .conn
        .send_msg(&ProtoMsg::new(PROTO_CONTROL, "close", sid.as_str()));
    for _ in 0..2 {
        closed
            .recv_timeout(TIMEOUT)
            .expect("socket closed at session end");
    }
    assert!(link.rx.try_recv().is_err(), "a message after close");
    assert!(second.rx.try_recv().is_err(), "a message after close");
}

#[test]
fn an_idle_connection_is_stopped_by_the_device() {
    let bed = bed_with(&default_config(), &[("MENDER_CONNECT_PF_IDLE_MS", "600")]);
    let (target, closed) = closing_target();
    let mut link = bed.mux.link(&uuid(1), &uuid(2));
    link.open(target.addr, "tcp");
    let t = Instant::now();
    link.send("forward", Some(b"x".to_vec()));
    link.expect("ack");
    let m = link.recv(Duration::from_secs(5));
    assert_eq!(m.hdr.typ, "stop");
    assert!(
        t.elapsed() >= Duration::from_millis(550),
        "{:?}",
        t.elapsed()
    );
    closed.recv_timeout(TIMEOUT).expect("socket closed");
}

#[test]
fn port_forward_disable_removes_protocol_3() {
    let mut cfg: serde_json::Value = serde_json::from_str(&default_config()).unwrap();
    cfg["PortForward"] = serde_json::json!({"Disable": true});
    let bed = bed_with(&cfg.to_string(), &[]);
    let sid = uuid(1);
    let open = ProtoMsg::new(PROTO_CONTROL, "open", sid.as_str())
        .with_body(mender_connect::wire::control::Open { versions: vec![1] }.encode());
    bed.mux.conn.send_msg(&open);
    let accept = bed.mux.recv_other(TIMEOUT);
    assert_eq!(accept.hdr.typ, "accept");
    let accept = Accept::decode(accept.body.as_deref().unwrap_or_default()).expect("accept");
    assert!(!accept.protocols.contains(&PROTO_PORTFORWARD));
    assert!(accept.protocols.contains(&4));
    let link = bed.mux.link(&sid, &uuid(2));
    link.send_new("127.0.0.1", 1, "tcp");
    let err = bed.mux.recv_other(TIMEOUT);
    assert_eq!(err.hdr.proto, PROTO_CONTROL);
    let e = ControlError::decode(err.body.as_deref().unwrap_or_default()).expect("error");
    assert_eq!(e.err, "no handler registered for protocol: 0x0003");
    assert!(!e.close);
}

#[test]
fn a_client_ignoring_flow_control_gets_an_error_and_a_stop() {
    let bed = bed_with(&default_config(), &[("MENDER_CONNECT_PF_DIAL_MS", "3000")]);
    let hole = Blackhole::start();
    let mut link = bed.mux.link(&uuid(1), &uuid(2));
    link.send_new(&hole.addr.ip().to_string(), hole.addr.port(), "tcp");
    // the dial hangs, so nothing is acked; a well-behaved client waits
    for _ in 0..20 {
        link.send("forward", Some(b"flood".to_vec()));
    }
    let (err, typ) = error_text(&link.expect("error"));
    assert_eq!(typ, "forward");
    assert!(err.contains("flow control"), "{err}");
    link.expect("stop");
    // the connection is gone for good: later messages are unknown
    link.send("forward", Some(b"late".to_vec()));
    let mut unknown = 0;
    while unknown == 0 {
        let (err, _) = error_text(&link.expect("error"));
        if err == "unknown connection" {
            unknown += 1;
        }
    }
}

#[test]
fn a_stalled_target_stops_the_acks_after_a_bounded_buffer_stalls_no_other_session_and_gets_every_byte()
 {
    let bed = bed();
    // the target holds its socket unread until released
    let (held_tx, held_rx) = crossbeam_channel::unbounded::<TcpStream>();
    let stalled = TcpTarget::start(move |s| {
        let _ = held_tx.send(s);
    });
    let mut slow = bed.mux.link(&uuid(1), &uuid(2));
    slow.open(stalled.addr, "tcp");
    let mut target = held_rx.recv_timeout(TIMEOUT).expect("target connected");
    // 4 KiB forwards, one in flight, until one is not acked: acks early
    // (into the per-connection buffer) must end once the socket buffers and
    // that buffer are full.
    let chunk = 4096;
    let mut sent = 0;
    loop {
        slow.send("forward", Some(testbed::drive::pattern(sent, chunk)));
        sent += chunk;
        match slow.rx.recv_timeout(Duration::from_secs(1)) {
            Ok(m) => assert_eq!(m.hdr.typ, "ack", "{m:?}"),
            Err(_) => break,
        }
        assert!(
            sent < 64 << 20,
            "still acked after {sent} bytes to a stalled target"
        );
    }
    // another session moves data while that forward waits
    let echo = TcpTarget::echo();
    let mut other = bed.mux.link(&uuid(3), &uuid(4));
    other.open(echo.addr, "tcp");
    let data = testbed::random_bytes(1 << 20, 3);
    assert!(other.transfer(&data, data.len(), 4096).0 == data);
    // released, the target gets every byte sent, in order, and the last
    // forward is acked
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0; 64 * 1024];
        let mut got = 0;
        let mut intact = true;
        while got < sent {
            match target.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    intact &= testbed::drive::is_pattern(got, &buf[..n]);
                    got += n;
                }
            }
        }
        (got, intact, target)
    });
    slow.expect("ack");
    let (got, intact, _target) = reader.join().expect("reader");
    assert_eq!(got, sent);
    assert!(intact, "bytes at the target differ");
    slow.send("stop", None);
    slow.expect("stop");
}

#[test]
fn a_target_reset_with_acked_data_still_buffered_ends_the_connection_with_a_stop() {
    let bed = bed();
    let (held_tx, held_rx) = crossbeam_channel::unbounded::<TcpStream>();
    let stalled = TcpTarget::start(move |s| {
        let _ = held_tx.send(s);
    });
    let mut link = bed.mux.link(&uuid(1), &uuid(2));
    link.open(stalled.addr, "tcp");
    let target = held_rx.recv_timeout(TIMEOUT).expect("target connected");
    // fill the socket buffers and the early-ack buffer
    let mut sent = 0;
    loop {
        link.send("forward", Some(vec![0x42; 4096]));
        sent += 4096;
        match link.rx.recv_timeout(Duration::from_secs(1)) {
            Ok(m) => assert_eq!(m.hdr.typ, "ack", "{m:?}"),
            Err(_) => break,
        }
        assert!(sent < 64 << 20, "still acked after {sent} bytes");
    }
    // reset (linger 0): the bytes acked but not yet written cannot arrive
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on our own socket with a valid linger struct.
    let rc = unsafe {
        libc::setsockopt(
            target.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    drop(target);
    // the client hears of it: a device stop (errors, the last ack, may
    // come first), and the connection is gone
    loop {
        let m = link.recv(TIMEOUT);
        match m.hdr.typ.as_str() {
            "stop" => break,
            "error" | "ack" => {}
            other => panic!("unexpected {other}: {m:?}"),
        }
    }
    link.send("forward", Some(b"late".to_vec()));
    loop {
        let m = link.recv(TIMEOUT);
        if m.hdr.typ == "error" && error_text(&m).0 == "unknown connection" {
            break;
        }
    }
}

#[test]
fn a_session_whose_messages_all_take_the_connection_threads_path_never_idles_out() {
    // forwards and acks of an established connection are handled on the
    // connection thread; the session's idle timer must count them
    let bed = bed_with(
        &default_config(),
        &[("MENDER_CONNECT_SESSION_IDLE_MS", "1000")],
    );
    let echo = TcpTarget::echo();
    let sid = uuid(1);
    let mut link = bed.mux.link(&sid, &uuid(2));
    link.open(echo.addr, "tcp");
    let data = testbed::random_bytes(64 * 1024, 5);
    let until = Instant::now() + Duration::from_millis(2500);
    let mut rounds = 0;
    while Instant::now() < until {
        assert!(link.transfer(&data, data.len(), 4096).0 == data);
        rounds += 1;
    }
    while let Ok(m) = bed.mux.other.try_recv() {
        assert!(
            m.hdr.sid != sid,
            "after {rounds} busy rounds the session was treated as idle: {m:?}"
        );
    }
    link.send("stop", None);
    link.expect("stop");
}
