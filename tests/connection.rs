//! The daemon against the stand-in server and auth: connect, keepalive,
//! reconnect, bad frames, TLS, shutdown.

use std::time::{Duration, Instant};

use mender_connect::wire::codec::{PROTO_CONTROL, ProtoMsg};
use mender_connect::wire::control::{Accept, ControlError, Open};
use testbed::{AuthService, Daemon, DbusDaemon, Server, TIMEOUT, TlsCert, default_config};

struct Bed {
    // field order = drop order: daemon first, then its peers
    daemon: Daemon,
    server: Server,
    auth: AuthService,
    _bus: DbusDaemon,
}

fn bed_with(env: &[(&str, &str)]) -> Bed {
    let bus = DbusDaemon::start();
    let server = Server::start_plain();
    let auth = AuthService::start(bus.address(), "token-1", &server.url());
    let daemon = Daemon::spawn(&default_config(), bus.address(), env);
    Bed {
        daemon,
        server,
        auth,
        _bus: bus,
    }
}

#[test]
fn connects_within_half_a_second_with_the_bearer_token() {
    let bus = DbusDaemon::start();
    let server = Server::start_plain();
    let _auth = AuthService::start(bus.address(), "token-1", &server.url());
    let started = Instant::now();
    let mut daemon = Daemon::spawn(&default_config(), bus.address(), &[]);
    let conn = server.wait_connection(TIMEOUT);
    let took = started.elapsed();
    let Some(conn) = conn else {
        daemon.dump_log();
        panic!("daemon never connected");
    };
    assert!(
        took <= Duration::from_millis(500),
        "connected after {took:?}"
    );
    assert_eq!(conn.authorization(), Some("Bearer token-1"));
    assert_eq!(conn.request().path, testbed::CONNECT_PATH);
    assert!(conn.header("Sec-WebSocket-Protocol").is_none());
    assert!(conn.header("Sec-WebSocket-Extensions").is_none());
    assert!(daemon.wait_log("Connection established with", TIMEOUT));
}

#[test]
fn connects_over_tls_trusting_the_system_store() {
    let cert = TlsCert::generate();
    let bus = DbusDaemon::start();
    let server = Server::start_tls(&cert);
    let _auth = AuthService::start(bus.address(), "token-tls", &server.url());
    let daemon = Daemon::spawn(&default_config(), bus.address(), &[cert.env()]);
    let Some(conn) = server.wait_connection(TIMEOUT) else {
        daemon.dump_log();
        panic!("no TLS connection");
    };
    assert_eq!(conn.authorization(), Some("Bearer token-tls"));
    // and it works: a control ping is answered
    conn.send_msg(&ProtoMsg::new(PROTO_CONTROL, "ping", "tls-sid"));
    let pong = conn.recv_msg(TIMEOUT).expect("pong over TLS");
    assert_eq!(pong, ProtoMsg::new(PROTO_CONTROL, "pong", "tls-sid"));
}

#[test]
fn untrusted_certificate_is_refused() {
    let cert = TlsCert::generate();
    let bus = DbusDaemon::start();
    let server = Server::start_tls(&cert);
    let _auth = AuthService::start(bus.address(), "t", &server.url());
    // no SSL_CERT_FILE: the throwaway CA is not trusted
    let mut daemon = Daemon::spawn(&default_config(), bus.address(), &[]);
    assert!(daemon.wait_log("TLS", TIMEOUT), "no TLS error logged");
    assert_eq!(server.connection_count(), 0);
}

#[test]
fn reconnects_after_the_server_restarts_within_the_backoff_bound() {
    let mut bed = bed_with(&[]);
    let first = bed
        .server
        .wait_connection(TIMEOUT)
        .expect("first connection");
    let port = bed.server.port();
    bed.server.stop();
    assert!(first.wait_closed(TIMEOUT));
    // ReconnectIntervalSeconds = 1: failures wait ≤1 s, ≤2 s, ≤4 s ...; the
    // server is back after ~1.5 s, so the daemon must be in within ~1+2+4 s.
    let down = Instant::now();
    let wait_until = down + Duration::from_millis(1500);
    while Instant::now() < wait_until {
        std::thread::park_timeout(wait_until - Instant::now());
    }
    let server = Server::start_plain_on(port);
    let got = server.wait_connection(Duration::from_secs(8));
    if got.is_none() {
        bed.daemon.dump_log();
    }
    let conn = got.expect("reconnected");
    assert!(
        down.elapsed() <= Duration::from_secs(8),
        "took {:?}",
        down.elapsed()
    );
    assert!(
        bed.auth.get_calls() >= 2,
        "token not re-read before reconnecting"
    );
    assert_eq!(conn.authorization(), Some("Bearer token-1"));
}

#[test]
fn token_change_reconnects_with_the_new_token_at_once() {
    let bed = bed_with(&[]);
    let first = bed
        .server
        .wait_connection(TIMEOUT)
        .expect("first connection");
    let t = Instant::now();
    bed.auth.set("token-2", &bed.server.url());
    let second = bed.server.wait_connection(TIMEOUT).expect("reconnected");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(second.authorization(), Some("Bearer token-2"));
    assert!(first.wait_closed(TIMEOUT), "old connection left open");
    // The old link was closed properly, with a close frame.
    assert_eq!(first.close_frame().map(|c| c.0), Some(1000));
}

#[test]
fn empty_token_disconnects_and_a_new_token_connects_again() {
    let bed = bed_with(&[]);
    let first = bed
        .server
        .wait_connection(TIMEOUT)
        .expect("first connection");
    bed.auth.set("", "");
    assert!(
        first.wait_closed(TIMEOUT),
        "still connected without a token"
    );
    // stays disconnected: no new connection while unauthorized
    assert!(
        bed.server
            .wait_connection(Duration::from_millis(1500))
            .is_none()
    );
    // regaining authorization with the same token reconnects (behavior.md §3.2)
    bed.auth.set("token-1", &bed.server.url());
    let again = bed.server.wait_connection(TIMEOUT).expect("reconnected");
    assert_eq!(again.authorization(), Some("Bearer token-1"));
}

#[test]
fn unanswered_pings_are_detected_within_the_pong_wait() {
    let bed = bed_with(&[("MENDER_CONNECT_PONG_WAIT_MS", "1500")]);
    let first = bed
        .server
        .wait_connection(TIMEOUT)
        .expect("first connection");
    // the device pings with the pong wait in seconds as payload
    assert!(first.wait_pings(1, Duration::from_secs(3)), "no ping");
    assert_eq!(first.pings()[0], b"1".to_vec());
    first.set_answer_pings(false);
    let t = Instant::now();
    assert!(
        first.wait_closed(Duration::from_secs(5)),
        "dead link not detected"
    );
    assert!(
        t.elapsed() <= Duration::from_millis(3200),
        "took {:?}",
        t.elapsed()
    );
    let second = bed.server.wait_connection(Duration::from_secs(5));
    if second.is_none() {
        bed.daemon.dump_log();
    }
    assert!(second.is_some(), "did not reconnect");
}

#[test]
fn answered_pings_keep_the_link_up() {
    let bed = bed_with(&[("MENDER_CONNECT_PONG_WAIT_MS", "1000")]);
    let conn = bed.server.wait_connection(TIMEOUT).expect("connection");
    assert!(conn.wait_pings(4, Duration::from_secs(6)), "pings stopped");
    assert!(conn.is_open());
    assert_eq!(bed.server.connection_count(), 1);
}

#[test]
fn server_pings_are_answered_with_the_same_payload() {
    let bed = bed_with(&[]);
    let conn = bed.server.wait_connection(TIMEOUT).expect("connection");
    conn.send_ping(b"60");
    assert!(conn.wait_pongs(1, TIMEOUT));
    assert_eq!(conn.pongs()[0], b"60".to_vec());
}

#[test]
fn garbage_frame_gets_an_error_reply_and_the_link_stays_up() {
    let bed = bed_with(&[]);
    let conn = bed.server.wait_connection(TIMEOUT).expect("connection");
    for garbage in [
        &b"\xc1\xc1"[..],
        b"\x01",
        b"\x82\xa3hdr\xdb\xff\xff\xff\xff",
    ] {
        conn.send(garbage);
        let reply = conn.recv_msg(TIMEOUT).expect("error reply");
        assert_eq!(reply.hdr.proto, PROTO_CONTROL);
        assert_eq!(reply.hdr.typ, "error");
        assert_eq!(reply.hdr.sid, "");
        let e = ControlError::decode(reply.body.as_deref().unwrap_or_default()).expect("body");
        assert!(e.err.starts_with("failed to decode message: "), "{}", e.err);
        assert!(!e.close);
    }
    conn.send_text("not msgpack at all");
    assert!(conn.recv_msg(TIMEOUT).is_some());
    conn.send_msg(&ProtoMsg::new(PROTO_CONTROL, "ping", "s1"));
    assert_eq!(
        conn.recv_msg(TIMEOUT),
        Some(ProtoMsg::new(PROTO_CONTROL, "pong", "s1"))
    );
    assert!(conn.is_open());
    assert_eq!(bed.server.connection_count(), 1);
}

#[test]
fn large_inbound_message_does_not_drop_the_connection() {
    let bed = bed_with(&[]);
    let conn = bed.server.wait_connection(TIMEOUT).expect("connection");
    // 64 KiB body: the reference drops the link above 8 KiB
    let big = ProtoMsg::new(PROTO_CONTROL, "ping", "big").with_body(vec![b'x'; 64 * 1024]);
    conn.send_msg(&big);
    assert_eq!(
        conn.recv_msg(TIMEOUT),
        Some(ProtoMsg::new(PROTO_CONTROL, "pong", "big"))
    );
    assert!(conn.is_open());
}

#[test]
fn handshake_lists_enabled_protocols_and_unknown_protocols_get_an_error() {
    let bed = bed_with(&[]);
    let conn = bed.server.wait_connection(TIMEOUT).expect("connection");
    let open =
        ProtoMsg::new(PROTO_CONTROL, "open", "h1").with_body(Open { versions: vec![1] }.encode());
    conn.send_msg(&open);
    let accept = conn.recv_msg(TIMEOUT).expect("accept");
    assert_eq!(
        (accept.hdr.typ.as_str(), accept.hdr.sid.as_str()),
        ("accept", "h1")
    );
    let a = Accept::decode(accept.body.as_deref().unwrap_or_default()).expect("accept body");
    assert_eq!(a.version, 1);
    let mut sorted = a.protocols.clone();
    sorted.sort_unstable();
    assert_eq!(a.protocols, sorted, "protocols not ascending");

    let unknown = ProtoMsg::new(9, "whatever", "h1").with_prop(
        "msgid",
        mender_connect::wire::codec::Value::Str("m-1".to_string()),
    );
    conn.send_msg(&unknown);
    let reply = conn.recv_msg(TIMEOUT).expect("error reply");
    let e = ControlError::decode(reply.body.as_deref().unwrap_or_default()).expect("body");
    assert_eq!(e.err, "no handler registered for protocol: 0x0009");
    assert_eq!(
        (e.msgproto, e.msgtype.as_str(), e.msgid.as_str()),
        (9, "whatever", "m-1")
    );
    assert!(!e.close);
}

#[test]
fn idle_router_session_is_pinged_then_timed_out() {
    let bed = bed_with(&[("MENDER_CONNECT_SESSION_IDLE_MS", "1000")]);
    let conn = bed.server.wait_connection(TIMEOUT).expect("connection");
    conn.send_msg(&ProtoMsg::new(PROTO_CONTROL, "pong", "idle"));
    let t = Instant::now();
    let ping = conn.recv_msg(TIMEOUT).expect("idle ping");
    assert_eq!(ping, ProtoMsg::new(PROTO_CONTROL, "ping", "idle"));
    let at_ping = t.elapsed();
    let err = conn.recv_msg(TIMEOUT).expect("timeout error");
    let at_err = t.elapsed();
    assert_eq!(err.hdr.typ, "error");
    let e = ControlError::decode(err.body.as_deref().unwrap_or_default()).expect("body");
    assert_eq!(e.err, "session timeout");
    assert!(e.close);
    assert!(
        at_ping >= Duration::from_millis(700),
        "ping after {at_ping:?}"
    );
    assert!(
        at_err >= Duration::from_millis(950),
        "error after {at_err:?}"
    );
}

#[test]
fn a_session_without_a_thread_times_out_while_the_link_is_down_and_stays_quiet_after() {
    let mut bed = bed_with(&[("MENDER_CONNECT_SESSION_IDLE_MS", "1000")]);
    let conn = bed.server.wait_connection(TIMEOUT).expect("connection");
    // a control message alone opens a session without a thread of its own;
    // its reply proves the daemon has it before the link goes down
    conn.send_msg(&ProtoMsg::new(PROTO_CONTROL, "ping", "quiet"));
    let pong = conn
        .recv_msg_matching(TIMEOUT, |m| m.hdr.sid == "quiet")
        .expect("pong");
    assert_eq!(pong, ProtoMsg::new(PROTO_CONTROL, "pong", "quiet"));
    let port = bed.server.port();
    bed.server.stop();
    assert!(conn.wait_closed(TIMEOUT));
    // on time, as a session thread would, although no link runs its timers
    let down = Instant::now();
    assert!(
        bed.daemon
            .wait_log("session quiet: timed out", Duration::from_secs(5)),
        "the session did not time out while the link was down"
    );
    assert!(
        down.elapsed() < Duration::from_secs(3),
        "{:?}",
        down.elapsed()
    );
    let server = Server::start_plain_on(port);
    let conn = server
        .wait_connection(Duration::from_secs(10))
        .expect("reconnected");
    conn.send_msg(&ProtoMsg::new(PROTO_CONTROL, "ping", "probe"));
    // replies leave in order: a late timeout error would come first
    let first = conn.recv_msg(TIMEOUT).expect("a reply");
    assert_eq!(first, ProtoMsg::new(PROTO_CONTROL, "pong", "probe"));
}

#[test]
fn sigterm_closes_the_websocket_and_exits_0_within_2_seconds() {
    let mut bed = bed_with(&[]);
    let conn = bed.server.wait_connection(TIMEOUT).expect("connection");
    // a live router session must not hold shutdown up
    conn.send_msg(&ProtoMsg::new(PROTO_CONTROL, "ping", "busy"));
    assert!(conn.recv_msg(TIMEOUT).is_some());
    let t = Instant::now();
    bed.daemon.signal(libc::SIGTERM);
    let status = bed.daemon.wait_exit(Duration::from_secs(2));
    let took = t.elapsed();
    if status.is_none() {
        bed.daemon.dump_log();
    }
    let status = status.expect("still running 2 s after SIGTERM");
    assert_eq!(status.code(), Some(0), "{status:?} after {took:?}");
    assert!(conn.wait_closed(TIMEOUT));
    assert_eq!(conn.close_frame().map(|c| c.0), Some(1000));
}

#[test]
fn sigint_also_exits_0() {
    let mut bed = bed_with(&[]);
    bed.server.wait_connection(TIMEOUT).expect("connection");
    bed.daemon.signal(libc::SIGINT);
    let status = bed
        .daemon
        .wait_exit(Duration::from_secs(2))
        .expect("exited");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn a_session_id_with_a_nul_byte_does_not_abort_the_daemon() {
    let bed = bed_with(&[]);
    let conn = bed
        .server
        .wait_connection(TIMEOUT)
        .expect("first connection");
    // the sid names the session thread; a NUL there used to panic (= abort)
    conn.send_msg(&ProtoMsg::new(PROTO_CONTROL, "ping", "a\0b"));
    assert_eq!(
        conn.recv_msg(TIMEOUT),
        Some(ProtoMsg::new(PROTO_CONTROL, "pong", "a\0b"))
    );
    assert!(conn.is_open());
}

fn config_with_interval(seconds: u64) -> String {
    let mut cfg: serde_json::Value = serde_json::from_str(&default_config()).expect("config");
    cfg["ReconnectIntervalSeconds"] = serde_json::json!(seconds);
    cfg.to_string()
}

#[test]
fn a_401_fetches_a_new_token_and_the_signalled_one_connects_before_the_backoff_step() {
    let bus = DbusDaemon::start();
    let server = Server::start_plain();
    server.set_reject(Some(401));
    let auth = AuthService::start(bus.address(), "expired", &server.url());
    // a 30 s back-off step: only the signalled token can connect promptly
    let mut daemon = Daemon::spawn(&config_with_interval(30), bus.address(), &[]);
    assert!(server.wait_attempts(1, TIMEOUT), "never dialed");
    assert!(
        auth.wait_fetch_calls(1, TIMEOUT),
        "no FetchJwtToken after the 401"
    );
    server.set_reject(None);
    let t = Instant::now();
    auth.set("renewed", &server.url());
    let conn = server
        .wait_connection(TIMEOUT)
        .expect("connected with the renewed token");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(conn.authorization(), Some("Bearer renewed"));
    assert_eq!(auth.fetch_calls(), 1);
    assert!(daemon.wait_log("FetchJwtToken", TIMEOUT));
}

#[test]
fn a_server_that_keeps_refusing_gets_at_most_one_fetch_per_backoff_step() {
    let bus = DbusDaemon::start();
    let server = Server::start_plain();
    server.set_reject(Some(401));
    let auth = AuthService::start(bus.address(), "t0", &server.url());
    let _daemon = Daemon::spawn(&config_with_interval(1), bus.address(), &[]);
    // An auth daemon that hands out a new token on every fetch, which the
    // server refuses too: without a per-step limit this loops at full speed.
    let window = Duration::from_secs(8);
    let end = Instant::now() + window;
    let mut n = 0;
    while Instant::now() < end {
        if auth.wait_fetch_calls(n + 1, end.saturating_duration_since(Instant::now())) {
            n += 1;
            auth.set(&format!("t{n}"), &server.url());
        }
    }
    let (fetches, attempts) = (auth.fetch_calls(), server.attempt_count());
    eprintln!("{window:?} of 401s: {fetches} FetchJwtToken calls, {attempts} attempts");
    // steps of at most 1, 2, 4 s (at least half that with jitter) from t=0:
    // ≤ 5 steps in 8 s, each with one attempt plus one with the new token
    assert!(fetches >= 2, "the token is re-fetched in later steps");
    assert!(fetches <= 6, "{fetches} fetches in {window:?}");
    assert!(attempts <= 12, "{attempts} attempts in {window:?}");
}
