//! `PortForward.AllowedTargets` through the daemon: allowed targets connect,
//! any other gets `port forward to <host>:<port> is not allowed` and never
//! sees a connection attempt (a listening socket records none).

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use mender_connect::wire::codec::{PROTO_PORTFORWARD, ProtoMsg, Value};
use testbed::target::TcpTarget;
use testbed::{AuthService, ConnHandle, Daemon, DbusDaemon, Server, TIMEOUT, TempDir, drive};

const USER: &str = "allow-list-user";

fn config(targets: &[String]) -> String {
    let mut cfg: serde_json::Value =
        serde_json::from_str(&testbed::default_config()).expect("config");
    cfg["PortForward"] = serde_json::json!({"AllowedTargets": targets});
    cfg.to_string()
}

fn pf(typ: &str, sid: &str, cid: &str) -> ProtoMsg {
    ProtoMsg::new(PROTO_PORTFORWARD, typ, sid)
        .with_prop("connection_id", Value::Str(cid.into()))
        .with_prop("user_id", Value::Str(USER.into()))
}

/// Sends `new` and returns the device's answer: Ok on `new`, the error text otherwise.
fn open(conn: &ConnHandle, sid: &str, host: &str, port: u16, proto: &str) -> Result<(), String> {
    let body = drive::pf_new_body(host, port, proto);
    conn.send_msg(&pf("new", sid, "c").with_body(body));
    let m = drive::recv_for(conn, sid, TIMEOUT).expect("an answer to new");
    match m.hdr.typ.as_str() {
        "new" => Ok(()),
        "error" => {
            let body = drive::error_body(&m);
            assert_eq!(drive::str_field(&body, "msgtype"), "new");
            Err(drive::str_field(&body, "err"))
        }
        other => panic!("unexpected {other}: {m:?}"),
    }
}

/// One round trip through an open forward: the bytes come back.
fn echo_through(conn: &ConnHandle, sid: &str, data: &[u8]) {
    conn.send_msg(&pf("forward", sid, "c").with_body(data.to_vec()));
    let (mut acked, mut got) = (false, Vec::new());
    while !acked || got.len() < data.len() {
        let m = drive::recv_for(conn, sid, TIMEOUT).expect("echo traffic");
        match m.hdr.typ.as_str() {
            "ack" => acked = true,
            "forward" => {
                got.extend_from_slice(m.body.as_deref().unwrap_or_default());
                conn.send_msg(&pf("ack", sid, "c"));
            }
            other => panic!("unexpected {other}: {m:?}"),
        }
    }
    assert_eq!(got, data);
}

fn not_allowed(host: &str, port: u16) -> String {
    format!("port forward to {host}:{port} is not allowed")
}

/// A TCP listener that only records whether anyone connected.
struct Recorder(TcpListener);

impl Recorder {
    fn on(ip: &str) -> Recorder {
        let l = TcpListener::bind((ip, 0)).expect("bind");
        l.set_nonblocking(true).expect("nonblocking");
        Recorder(l)
    }

    fn port(&self) -> u16 {
        self.0.local_addr().expect("addr").port()
    }

    /// True when a connection is waiting. A connect completes in the
    /// kernel before the dialler goes on, and the device sends its error
    /// only after deciding not to dial, so checking after the error is enough.
    fn was_contacted(&self) -> bool {
        self.0.accept().is_ok()
    }
}

/// A UDP echo on 127.0.0.1; drop stops it.
struct UdpEcho {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEcho {
    fn start() -> UdpEcho {
        let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
        s.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let addr = s.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !st.load(Ordering::Acquire) {
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(&buf[..n], from);
                }
            }
        });
        UdpEcho {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn sid(n: usize) -> String {
    format!("a11040ed-0000-4000-8000-{n:012}")
}

#[test]
fn allowed_tcp_and_udp_targets_connect_and_others_are_refused_untouched() {
    let cidr_echo = TcpTarget::echo();
    let range_echo = TcpTarget::echo();
    let star_echo = TcpTarget::echo();
    let udp_echo = UdpEcho::start();
    let (pr, pb, pc) = (
        cidr_echo.addr.port(),
        range_echo.addr.port(),
        star_echo.addr.port(),
    );
    let range = (pb.saturating_sub(2).max(1), pb);
    // a recorder outside every entry (ports are random: retry on a clash)
    let recorder = (0..50)
        .map(|_| Recorder::on("127.0.0.1"))
        .find(|r| {
            let p = r.port();
            ![pr, pc, udp_echo.addr.port()].contains(&p) && !(range.0..=range.1).contains(&p)
        })
        .expect("a free port outside the entries");
    let udp_denied = UdpSocket::bind("127.0.0.1:0").expect("bind");
    udp_denied.set_nonblocking(true).expect("nonblocking");
    let pd = udp_denied.local_addr().expect("addr").port();

    let targets = vec![
        format!("127.0.0.0/8:{pr}"),
        format!("127.0.0.1:{}-{}", range.0, range.1),
        format!("*:{pc}"),
        format!("udp/127.0.0.1:{}", udp_echo.addr.port()),
        // a TCP entry for the UDP port that must stay closed
        format!("127.0.0.1:{pd}"),
    ];
    let c = testbed::env::connected(&config(&targets), &[], "token-allow");
    let conn = &c.conn;

    // allowed: CIDR, port range, `*` host (by name), UDP
    for (n, (host, port, proto)) in [
        ("127.0.0.1", pr, "tcp"),
        ("127.0.0.1", pb, "tcp"),
        ("localhost", pc, "tcp"),
        ("127.0.0.1", udp_echo.addr.port(), "udp"),
    ]
    .into_iter()
    .enumerate()
    {
        let s = sid(n);
        open(conn, &s, host, port, proto)
            .unwrap_or_else(|e| panic!("{proto} {host}:{port} refused: {e}"));
        echo_through(conn, &s, format!("hello {n}").as_bytes());
    }

    // denied: a TCP port in no entry, a UDP target with only a TCP entry,
    // a TCP target with only a UDP entry
    let rp = recorder.port();
    let e = open(conn, &sid(10), "127.0.0.1", rp, "tcp").expect_err("denied");
    assert_eq!(e, not_allowed("127.0.0.1", rp));
    assert!(
        !recorder.was_contacted(),
        "a denied target saw a connection"
    );
    let e = open(conn, &sid(11), "127.0.0.1", pd, "udp").expect_err("denied");
    assert_eq!(e, not_allowed("127.0.0.1", pd));
    let up = udp_echo.addr.port();
    let e = open(conn, &sid(12), "127.0.0.1", up, "tcp").expect_err("denied");
    assert_eq!(e, not_allowed("127.0.0.1", up));
    // data queued behind a refused `new` finds no connection, and no datagram
    // reaches the UDP target
    conn.send_msg(&pf("forward", &sid(11), "c").with_body(b"x".to_vec()));
    let m = drive::recv_for(conn, &sid(11), TIMEOUT).expect("reply");
    assert_eq!(m.hdr.typ, "error");
    let mut buf = [0u8; 16];
    assert!(
        udp_denied.recv(&mut buf).is_err(),
        "a denied UDP target got a datagram"
    );

    let refusals: Vec<String> = c
        .daemon
        .log()
        .lines()
        .filter(|l| l.contains(" audit=true") && l.contains(" result=refused"))
        .map(str::to_string)
        .collect();
    assert_eq!(refusals.len(), 3, "{refusals:#?}");
    let line = refusals
        .iter()
        .find(|l| l.contains(&format!("session_id={}", sid(10))))
        .expect("audit line of the TCP refusal");
    for field in [
        "msg=\"port forward open\"".to_string(),
        "rule=PortForward.AllowedTargets".to_string(),
        format!("target=\"127.0.0.1:{rp}\""),
        "protocol=tcp".to_string(),
        format!("user_id={USER}"),
        format!("err=\"{}\"", not_allowed("127.0.0.1", rp)),
    ] {
        assert!(line.contains(&field), "{field} missing in {line}");
    }
}

#[test]
fn a_name_is_allowed_by_address_only_when_every_address_it_resolves_to_is_inside() {
    if !testbed::hosts::can_unshare_mounts() {
        eprintln!("SKIPPED: needs root and unshare -m");
        return;
    }
    let v4 = Recorder::on("127.0.0.1");
    let p = v4.port();
    // the second address of mixed.test; same port, so only the list decides
    let other = TcpListener::bind(("127.0.0.2", p)).ok();
    if let Some(o) = &other {
        o.set_nonblocking(true).expect("nonblocking");
    }
    let alias = Recorder::on("127.0.0.2");
    let pa = alias.port();
    let dir = TempDir::new("allow-hosts");
    let wrapper = testbed::hosts::daemon_wrapper(
        &dir,
        "127.0.0.1 good.test\n127.0.0.1 mixed.test\n127.0.0.2 mixed.test\n127.0.0.2 alias.test\n",
    );
    let targets = vec![format!("127.0.0.1/32:{p}"), format!("alias.test:{pa}")];
    let bus = DbusDaemon::start();
    let server = Server::start_plain();
    let _auth = AuthService::start(bus.address(), "token-hosts", &server.url());
    let daemon = Daemon::spawn_with_binary(
        Path::new(&wrapper),
        &config(&targets),
        bus.address(),
        &[],
        true,
    );
    let Some(conn) = server.wait_connection(TIMEOUT) else {
        daemon.dump_log();
        panic!("daemon never connected");
    };

    // one address inside, one outside: denied, and neither sees a connection
    let e = open(&conn, &sid(20), "mixed.test", p, "tcp").expect_err("mixed denied");
    assert_eq!(e, not_allowed("mixed.test", p));
    assert!(!v4.was_contacted(), "127.0.0.1 was dialled");
    if let Some(o) = &other {
        assert!(o.accept().is_err(), "127.0.0.2 was dialled");
    }
    // every address inside: allowed, and dialled
    open(&conn, &sid(21), "good.test", p, "tcp").expect("good.test allowed");
    assert!(
        testbed::wait_until(TIMEOUT, || v4.was_contacted()),
        "good.test was not dialled"
    );
    // a name entry matches the requested name, whatever it resolves to
    open(&conn, &sid(22), "alias.test", pa, "tcp").expect("alias.test allowed");
    assert!(testbed::wait_until(TIMEOUT, || alias.was_contacted()));
    // ... and only that name: its address is not licensed by it
    let e = open(&conn, &sid(23), "127.0.0.2", pa, "tcp").expect_err("address denied");
    assert_eq!(e, not_allowed("127.0.0.2", pa));
    drop(conn);
}

#[test]
fn a_bad_entry_stops_the_daemon_at_start_naming_key_and_entry() {
    let cfg = config(&["127.0.0.1:22".to_string(), "10.0.0.1:99999".to_string()]);
    let mut daemon = Daemon::spawn(&cfg, "unix:path=/nonexistent/bus", &[]);
    let status = daemon.wait_exit(TIMEOUT).expect("the daemon exits");
    assert_eq!(status.code(), Some(1));
    let log = daemon.log();
    let line = log
        .lines()
        .find(|l| l.contains("level=error"))
        .unwrap_or_else(|| panic!("no error line in {log}"));
    assert!(
        line.contains(
            "msg=\"PortForward.AllowedTargets: invalid entry \\\"10.0.0.1:99999\\\": \
             port must be *, a number from 1 to 65535 or a range LOW-HIGH\""
        ),
        "{line}"
    );
}

#[test]
fn an_absent_or_empty_list_allows_every_target() {
    let echo = TcpTarget::echo();
    for cfg in [testbed::default_config(), config(&[])] {
        let c = testbed::env::connected(&cfg, &[], "token-open");
        open(&c.conn, &sid(30), "127.0.0.1", echo.addr.port(), "tcp").expect("allowed");
        echo_through(&c.conn, &sid(30), b"open");
    }
}
