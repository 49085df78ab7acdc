//! Self-tests of the integration-test bed (the `testbed` crate): each piece works
//! on its own and cleans up after itself. None of these run the daemon.

use dbus::blocking::Connection;
use dbus::message::MatchRule;
use mender_connect::wire::codec::{self, PROTO_SHELL, ProtoMsg};
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use testbed::auth::{AUTH_IFACE, AUTH_NAME, AUTH_PATH, SIGNAL};
use testbed::{AuthService, DbusDaemon, Server, TIMEOUT, TlsCert};
use tungstenite::client::IntoClientRequest;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

const SHORT: Duration = Duration::from_millis(300);

type Client = WebSocket<MaybeTlsStream<TcpStream>>;

fn client_plain(server: &Server, token: &str) -> Client {
    let mut req = server.ws_url().into_client_request().unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    let (ws, resp) = tungstenite::connect(req).expect("connect");
    assert_eq!(resp.status(), 101);
    ws
}

fn client_tls(server: &Server, cert: &TlsCert, token: &str) -> Client {
    let mut req = server.ws_url().into_client_request().unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    let tcp = TcpStream::connect(("127.0.0.1", server.port())).unwrap();
    let (ws, resp) = tungstenite::client_tls_with_config(
        req,
        tcp,
        None,
        Some(tungstenite::Connector::NativeTls(cert.connector())),
    )
    .expect("TLS connect");
    assert_eq!(resp.status(), 101);
    ws
}

fn set_read_timeout(ws: &Client, t: Duration) {
    match ws.get_ref() {
        MaybeTlsStream::Plain(s) => s.set_read_timeout(Some(t)).unwrap(),
        MaybeTlsStream::NativeTls(s) => s.get_ref().set_read_timeout(Some(t)).unwrap(),
        _ => unreachable!(),
    }
}

/// Next data/ping/pong/close message, or None on read timeout / error.
fn client_read(ws: &mut Client) -> Option<Message> {
    set_read_timeout(ws, TIMEOUT);
    ws.read().ok()
}

#[test]
fn dbus_daemon_starts_and_stops_without_leftovers() {
    let bus = DbusDaemon::start();
    let pid = bus.pid();
    let dir = bus.dir().to_path_buf();
    assert!(bus.address().starts_with("unix:path="), "{}", bus.address());
    assert!(testbed::process_exists(pid));
    assert!(dir.exists());
    // The bus answers.
    let c = Connection::new_address(bus.address()).expect("connect to private bus");
    assert!(c.unique_name().starts_with(':'));
    drop(c);
    drop(bus);
    assert!(
        !testbed::process_exists(pid),
        "dbus-daemon {pid} still exists"
    );
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[test]
fn auth_service_serves_token_and_signals_changes() {
    let bus = DbusDaemon::start();
    let auth = AuthService::start(bus.address(), "tok-1", "http://127.0.0.1:1");
    let c = Connection::new_address(bus.address()).unwrap();
    let proxy = c.with_proxy(AUTH_NAME, AUTH_PATH, Duration::from_secs(5));

    let (token, url): (String, String) = proxy.method_call(AUTH_IFACE, "GetJwtToken", ()).unwrap();
    assert_eq!(
        (token.as_str(), url.as_str()),
        ("tok-1", "http://127.0.0.1:1")
    );
    assert_eq!(auth.get_calls(), 1);
    let (ok,): (bool,) = proxy.method_call(AUTH_IFACE, "FetchJwtToken", ()).unwrap();
    assert!(ok);
    assert_eq!(auth.fetch_calls(), 1);

    // Signal, filtered on the well-known name like a real client would.
    let (tx, rx) = crossbeam_channel::unbounded();
    let rule = MatchRule::new_signal(AUTH_IFACE, SIGNAL)
        .with_sender(AUTH_NAME)
        .with_path(AUTH_PATH);
    c.add_match(rule, move |(t, u): (String, String), _, _| {
        let _ = tx.send((t, u));
        true
    })
    .unwrap();
    auth.set("tok-2", "https://example.com");
    let deadline = Instant::now() + TIMEOUT;
    let got = loop {
        c.process(Duration::from_millis(200)).unwrap();
        if let Ok(v) = rx.try_recv() {
            break Some(v);
        }
        if Instant::now() > deadline {
            break None;
        }
    };
    assert_eq!(
        got,
        Some(("tok-2".to_string(), "https://example.com".to_string()))
    );
    let (token, url): (String, String) = proxy.method_call(AUTH_IFACE, "GetJwtToken", ()).unwrap();
    assert_eq!(
        (token.as_str(), url.as_str()),
        ("tok-2", "https://example.com")
    );
    assert!(auth.wait_get_calls(2, TIMEOUT));

    // Failing mode.
    auth.set_fail_get(true);
    let r: Result<(String, String), _> = proxy.method_call(AUTH_IFACE, "GetJwtToken", ());
    assert!(r.is_err());

    // Dropping the service releases the name.
    drop(auth);
    let r: Result<(String, String), _> = proxy.method_call(AUTH_IFACE, "GetJwtToken", ());
    assert!(r.is_err());
}

#[test]
fn plain_server_records_upgrade_and_exchanges_frames() {
    let server = Server::start_plain();
    assert!(server.url().starts_with("http://127.0.0.1:"));
    let events = server.subscribe();
    let mut ws = client_plain(&server, "abc");
    let conn = server.wait_connection(TIMEOUT).expect("connection");
    assert_eq!(conn.authorization(), Some("Bearer abc"));
    assert_eq!(conn.request().path, testbed::CONNECT_PATH);
    assert_eq!(server.connection_count(), 1);

    // device -> server
    ws.send(Message::binary(vec![0x81, 0xa1, 0x78])).unwrap();
    assert_eq!(conn.recv(TIMEOUT), Some(vec![0x81, 0xa1, 0x78]));
    ws.send(Message::text("hi")).unwrap();
    let f = conn.recv_frame(TIMEOUT).unwrap();
    assert!(f.text);
    assert_eq!(f.data, b"hi");
    assert_eq!(conn.recv(SHORT), None);

    // server -> device
    conn.send(&[1, 2, 3]);
    assert_eq!(client_read(&mut ws), Some(Message::binary(vec![1, 2, 3])));
    conn.send_text("txt");
    assert_eq!(client_read(&mut ws), Some(Message::text("txt")));

    // device ping is answered and recorded
    ws.send(Message::Ping(b"60".to_vec().into())).unwrap();
    assert!(conn.wait_pings(1, TIMEOUT));
    assert_eq!(conn.pings(), vec![b"60".to_vec()]);
    assert_eq!(
        client_read(&mut ws),
        Some(Message::Pong(b"60".to_vec().into()))
    );

    // server ping; the client's automatic pong is recorded
    conn.send_ping(b"srv");
    assert_eq!(
        client_read(&mut ws),
        Some(Message::Ping(b"srv".to_vec().into()))
    );
    ws.flush().unwrap();
    assert!(conn.wait_pongs(1, TIMEOUT));
    assert_eq!(conn.pongs(), vec![b"srv".to_vec()]);

    // The event feed saw it all in order.
    let kinds: Vec<&'static str> = events
        .try_iter()
        .map(|e| match e {
            testbed::Event::Upgrade { .. } => "upgrade",
            testbed::Event::Frame { .. } => "frame",
            testbed::Event::Ping { .. } => "ping",
            testbed::Event::Pong { .. } => "pong",
            testbed::Event::Close { .. } => "close",
            testbed::Event::Closed { .. } => "closed",
        })
        .collect();
    assert_eq!(kinds, ["upgrade", "frame", "frame", "ping", "pong"]);

    // Device closes: close frame recorded, connection gone.
    ws.close(None).unwrap();
    assert!(conn.wait_closed(TIMEOUT));
    assert_eq!(conn.close_frame(), Some((1005, String::new())));
    assert!(!conn.is_open());
}

#[test]
fn server_rejects_wrong_path_and_configured_status() {
    let server = Server::start_plain();
    let bad = format!("ws://127.0.0.1:{}/api/devices/v1/wrong", server.port());
    match tungstenite::connect(bad) {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), 404),
        other => panic!("expected 404, got {other:?}"),
    }
    server.set_reject(Some(401));
    match tungstenite::connect(server.ws_url()) {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), 401),
        other => panic!("expected 401, got {other:?}"),
    }
    assert!(server.wait_attempts(2, TIMEOUT));
    let statuses: Vec<u16> = server.attempts().iter().map(|a| a.status).collect();
    assert_eq!(statuses, [404, 401]);
    assert_eq!(server.connection_count(), 0);
    // A rejected request gets the status and then EOF.
    server.set_reject_with_body(
        500,
        r#"{"error":"failed to allocate internal device channel"}"#,
    );
    let mut tcp = TcpStream::connect(("127.0.0.1", server.port())).unwrap();
    tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
    write!(
        tcp,
        "GET {} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        testbed::CONNECT_PATH
    )
    .unwrap();
    let mut resp = String::new();
    tcp.read_to_string(&mut resp).expect("response then EOF");
    assert!(resp.starts_with("HTTP/1.1 500"), "{resp}");
    assert!(
        resp.ends_with(r#"{"error":"failed to allocate internal device channel"}"#),
        "{resp}"
    );

    server.set_reject(None);
    let _ws = client_plain(&server, "ok");
    assert!(server.wait_connection(TIMEOUT).is_some());
}

#[test]
fn tls_server_works_with_generated_ca() {
    let cert = TlsCert::generate();
    let ca_file = cert.ca_file().to_path_buf();
    assert!(
        std::fs::read_to_string(&ca_file)
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    let server = Server::start_tls(&cert);
    assert!(server.url().starts_with("https://localhost:"));
    let mut ws = client_tls(&server, &cert, "tls-token");
    let conn = server.wait_connection(TIMEOUT).expect("connection");
    assert_eq!(conn.authorization(), Some("Bearer tls-token"));
    ws.send(Message::binary(vec![9; 10_000])).unwrap();
    assert_eq!(conn.recv(TIMEOUT), Some(vec![9; 10_000]));
    conn.send(&[7; 5000]);
    assert_eq!(client_read(&mut ws), Some(Message::binary(vec![7; 5000])));
    ws.send(Message::Ping(b"60".to_vec().into())).unwrap();
    assert_eq!(
        client_read(&mut ws),
        Some(Message::Pong(b"60".to_vec().into()))
    );
    assert_eq!(conn.pings(), vec![b"60".to_vec()]);

    // A client without the CA is refused.
    let tcp = TcpStream::connect(("127.0.0.1", server.port())).unwrap();
    let r = tungstenite::client_tls_with_config(server.ws_url(), tcp, None, None);
    assert!(r.is_err(), "handshake without the CA must fail");
    drop(server);
    drop(cert);
    assert!(!ca_file.exists());
}

#[test]
fn server_can_stop_answering_pings() {
    let server = Server::start_plain();
    let mut ws = client_plain(&server, "t");
    let conn = server.wait_connection(TIMEOUT).unwrap();
    server.set_answer_pings(false);
    ws.send(Message::Ping(b"60".to_vec().into())).unwrap();
    assert!(conn.wait_pings(1, TIMEOUT));
    // Any pong would go out with (before or after) "a", so it would be read
    // before "b".
    conn.send(b"a");
    conn.send(b"b");
    assert_eq!(client_read(&mut ws), Some(Message::binary(b"a".to_vec())));
    assert_eq!(client_read(&mut ws), Some(Message::binary(b"b".to_vec())));
    // Answering again.
    server.set_answer_pings(true);
    ws.send(Message::Ping(b"x".to_vec().into())).unwrap();
    assert_eq!(
        client_read(&mut ws),
        Some(Message::Pong(b"x".to_vec().into()))
    );
}

#[test]
fn server_keepalive_pings_when_asked() {
    let server = Server::start_plain();
    server.set_ping_interval(Some(Duration::from_millis(100)));
    let mut ws = client_plain(&server, "t");
    let _conn = server.wait_connection(TIMEOUT).unwrap();
    assert_eq!(
        client_read(&mut ws),
        Some(Message::Ping(b"60".to_vec().into()))
    );
}

#[test]
fn server_close_and_drop_tcp() {
    let server = Server::start_plain();
    let mut ws1 = client_plain(&server, "t");
    let c1 = server.wait_connection(TIMEOUT).unwrap();
    c1.close_with(1011, "connection closed by the server");
    match client_read(&mut ws1) {
        Some(Message::Close(Some(cf))) => {
            assert_eq!(u16::from(cf.code), 1011);
            assert_eq!(cf.reason.as_str(), "connection closed by the server");
        }
        other => panic!("expected close, got {other:?}"),
    }
    let _ = ws1.flush(); // the client's close reply
    assert!(c1.wait_closed(TIMEOUT));
    // ...after which the server closes the TCP connection.
    assert!(client_read(&mut ws1).is_none());

    let mut ws2 = client_plain(&server, "t");
    let c2 = server.wait_connection(TIMEOUT).unwrap();
    assert_eq!(c2.id(), 1);
    c2.drop_tcp();
    assert!(c2.wait_closed(TIMEOUT));
    assert!(
        client_read(&mut ws2).is_none(),
        "read after drop_tcp must fail"
    );
    assert_eq!(c2.close_frame(), None);
    // Sending to a closed connection is a no-op.
    c2.send(b"ignored");
}

#[test]
fn server_restarts_on_the_same_port() {
    let mut server = Server::start_plain();
    let port = server.port();
    let mut ws = client_plain(&server, "one");
    let conn = server.wait_connection(TIMEOUT).unwrap();
    server.stop();
    assert!(!conn.is_open());
    assert!(client_read(&mut ws).is_none());
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "listener still open"
    );

    let server2 = Server::start_plain_on(port);
    assert_eq!(server2.port(), port);
    let _ws = client_plain(&server2, "two");
    let conn2 = server2.wait_connection(TIMEOUT).unwrap();
    assert_eq!(conn2.authorization(), Some("Bearer two"));
    assert_eq!(conn2.id(), 0);
}

#[test]
fn recorded_frames_offer_decoding() {
    // Independent of the codec implementation: only checks the plumbing.
    let server = Server::start_plain();
    let mut ws = client_plain(&server, "t");
    let conn = server.wait_connection(TIMEOUT).unwrap();
    ws.send(Message::binary(vec![0xc1])).unwrap(); // never valid msgpack
    let f = conn.recv_frame(TIMEOUT).unwrap();
    assert_eq!(conn.frames(), vec![f.clone()]);
    let r = std::panic::catch_unwind(|| f.decoded());
    // Either the codec rejects it, or it is still a stub that panics.
    assert!(!matches!(r, Ok(Ok(_))));
}

#[test]
fn next_matching_consumes_what_it_skips_and_looks_at_buffered_items_after_its_deadline() {
    let mut queue: VecDeque<u32> = [1, 2, 3, 4].into();
    let mut skipped = Vec::new();
    let got = testbed::next_matching(
        TIMEOUT,
        |_| queue.pop_front(),
        |n| {
            if *n != 3 {
                skipped.push(*n);
            }
            *n == 3
        },
    );
    assert_eq!((got, skipped), (Some(3), vec![1, 2]));
    assert_eq!(queue, [4]);

    // past the deadline the source is still asked, with no time left
    let mut queue: VecDeque<u32> = [5, 6].into();
    let mut lefts = Vec::new();
    let got = testbed::next_matching(
        Duration::ZERO,
        |left| {
            lefts.push(left);
            queue.pop_front()
        },
        |n| *n == 6,
    );
    assert_eq!(got, Some(6));
    assert_eq!(lefts, [Duration::ZERO, Duration::ZERO]);

    // a source that gives nothing (timed out, closed) ends the wait
    assert_eq!(
        testbed::next_matching(TIMEOUT, |_| None::<u32>, |_| true),
        None
    );
}

#[test]
fn connection_returns_the_next_matching_message_and_drops_the_ones_before() {
    let server = Server::start_plain();
    let mut ws = client_plain(&server, "t");
    let conn = server.wait_connection(TIMEOUT).unwrap();
    for typ in ["a", "b", "c"] {
        let m = ProtoMsg::new(PROTO_SHELL, typ, "s");
        ws.send(Message::binary(codec::encode(&m))).unwrap();
    }
    let got = conn.recv_msg_matching(TIMEOUT, |m| m.hdr.typ == "b");
    assert_eq!(got.map(|m| m.hdr.typ), Some("b".to_string()));
    assert_eq!(
        conn.recv_msg(TIMEOUT).map(|m| m.hdr.typ),
        Some("c".to_string())
    );
    assert!(conn.recv_msg_matching(SHORT, |_| true).is_none());
}

#[test]
fn the_daemon_binary_found_at_run_time_is_the_one_cargo_built_for_this_test() {
    // The test bed is a library: cargo gives it no CARGO_BIN_EXE_*.
    assert_eq!(
        testbed::daemon::binary(),
        Some(env!("CARGO_BIN_EXE_mender-connect"))
    );
}

#[test]
fn default_config_is_valid_json_for_current_user() {
    let v: serde_json::Value = serde_json::from_str(&testbed::default_config()).unwrap();
    assert_eq!(v["ShellCommand"], "/bin/sh");
    assert_eq!(v["ReconnectIntervalSeconds"], 1);
    assert_eq!(v["User"], testbed::daemon::current_user());
    assert!(!testbed::daemon::current_user().is_empty());
}

#[test]
fn daemon_helper_runs_a_process_and_cleans_up() {
    // Exercise the process plumbing with /bin/sh instead of the daemon.
    let bus = DbusDaemon::start();
    let mut d = testbed::Daemon::spawn_with_binary(
        std::path::Path::new("/bin/sh"),
        "{}",
        bus.address(),
        &[("TESTBED_X", "y")],
        true,
    );
    // sh treats "--config" as an invalid option and exits with an error.
    let status = d.wait_exit(TIMEOUT).expect("exit");
    assert!(!status.success());
    assert!(d.wait_log("--", TIMEOUT) || !d.log().is_empty());
    let dir = d.dir().to_path_buf();
    assert!(d.config_file().exists());
    drop(d);
    assert!(!dir.exists());
}

#[test]
fn is_pattern_accepts_the_pattern_at_any_offset_and_rejects_any_changed_byte() {
    use testbed::drive::{is_pattern, pattern};
    for (from, len) in [
        (0, 0),
        (0, 1),
        (250, 3),
        (7, 4096),
        (1 << 20, 40_000),
        (3, 251 * 64),
    ] {
        let mut data = pattern(from, len);
        assert!(is_pattern(from, &data), "offset {from}, {len} bytes");
        if len == 0 {
            continue;
        }
        assert!(!is_pattern(from + 1, &data), "offset {from}+1, {len} bytes");
        for at in [0, len / 2, len - 1] {
            data[at] ^= 0x80;
            assert!(!is_pattern(from, &data), "byte {at} of {len} changed");
            data[at] ^= 0x80;
        }
    }
}

#[test]
fn ideal_relay_acks_each_forward_writes_its_body_and_a_drop_mid_run_ends_it() {
    use testbed::drive::{self, CHUNK};
    use testbed::relay::{self, Relay};
    let server = Server::start_plain();
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let total = 8 * CHUNK;
    let sink = drive::pf_sink(l, total);
    let sid = "rrrrrrrr-0000-4000-8000-000000000001";
    let r = Relay::start(server.port(), addr, relay::ack_frame(sid, "c"), CHUNK);
    let conn = server.wait_connection(TIMEOUT).expect("relay connected");
    for i in 0..8 {
        let m = ProtoMsg::new(codec::PROTO_PORTFORWARD, "forward", sid)
            .with_prop("connection_id", codec::Value::Str("c".into()))
            .with_body(drive::pattern(i * CHUNK, CHUNK));
        conn.send_msg(&m);
        let a = drive::recv_for(&conn, sid, TIMEOUT).expect("an ack");
        assert_eq!(a.hdr.typ, "ack");
        assert_eq!(a.prop_str("connection_id"), Some("c"));
    }
    let (n, intact, _sock) = sink.join().expect("sink");
    assert!(n == total && intact, "{n} bytes, intact {intact}");
    // a bench that fails drops the relay while the server still holds the
    // connection: the drop must end the relay's blocked read, not hang
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(r);
        let _ = done_tx.send(());
    });
    assert!(
        done_rx.recv_timeout(TIMEOUT).is_ok(),
        "dropping the relay hung"
    );
    drop(server);
}
