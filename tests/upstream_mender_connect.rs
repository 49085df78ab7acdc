//! `mendersoftware/integration` `tests/tests/test_mender_connect.py`, one
//! test per upstream test and named after it: an operator's websocket to the
//! management stand-in (`…/devices/:id/connect`, as the UI and upstream's
//! `ProtoShell` helper use it) drives the real daemon. Upstream reads output
//! until a 16 s silence; here each read waits for what it expects, with a
//! deadline. `test_in_poor_network_environment` lives in `tests/chaos.rs`
//! (it needs the network namespace lab).

mod common;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::management::DEVICES_PATH;
use common::{AuthService, Daemon, DbusDaemon, Management, Server, TIMEOUT, default_config};
use mender_connect::conn::codec::{self, PROTO_SHELL, ProtoMsg, Value};
use tungstenite::client::IntoClientRequest;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// Upstream's `receive_timeout_s`.
const RECEIVE: Duration = Duration::from_secs(16);
const STATUS_NORMAL: i64 = 1;
const STATUS_ERROR: i64 = 2;

struct Bed {
    // field order = drop order: daemon first, then its peers
    daemon: Daemon,
    mgmt: Management,
    server: Server,
    _auth: AuthService,
    _bus: DbusDaemon,
}

fn bed() -> Bed {
    let mut cfg: serde_json::Value = serde_json::from_str(&default_config()).expect("config");
    // an interactive shell prints its prompt, as on upstream's device
    cfg["ShellArguments"] = serde_json::json!(["-i"]);
    let bus = DbusDaemon::start();
    let server = Server::start_plain();
    let mgmt = Management::start(&server);
    let auth = AuthService::start(bus.address(), "device-token", &server.url());
    let daemon = Daemon::spawn(&cfg.to_string(), bus.address(), &[]);
    if !mgmt.wait_device(TIMEOUT) {
        daemon.dump_log();
        panic!("daemon never connected");
    }
    Bed {
        daemon,
        mgmt,
        server,
        _auth: auth,
        _bus: bus,
    }
}

/// An operator's websocket (upstream's `devconnect.get_websocket()`).
struct Operator {
    ws: WebSocket<MaybeTlsStream<TcpStream>>,
}

impl Operator {
    fn connect(mgmt: &Management) -> Result<Operator, tungstenite::Error> {
        let url = format!(
            "{}{DEVICES_PATH}{}/connect",
            mgmt.url().replacen("http://", "ws://", 1),
            mgmt.device_id()
        );
        let mut req = url.into_client_request()?;
        req.headers_mut().insert(
            "Authorization",
            "Bearer user-token".parse().expect("header"),
        );
        let (ws, _) = tungstenite::connect(req)?;
        Ok(Operator { ws })
    }

    fn send(&mut self, typ: &str, body: &[u8]) {
        let msg = ProtoMsg::new(PROTO_SHELL, typ, "").with_body(body.to_vec());
        self.ws
            .send(Message::binary(codec::encode(&msg)))
            .expect("send");
    }

    /// The next message before `deadline`.
    fn recv(&mut self, deadline: Instant) -> Option<ProtoMsg> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            if let MaybeTlsStream::Plain(s) = self.ws.get_ref() {
                s.set_read_timeout(Some(left.min(Duration::from_millis(500))))
                    .expect("timeout");
            }
            match self.ws.read() {
                Ok(Message::Binary(b)) => return Some(codec::decode(&b).expect("decodes")),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("operator websocket: {e}"),
            }
        }
    }

    /// `ProtoShell.startShell` / `stopShell`: the reply of type `typ`.
    fn request(&mut self, typ: &str) -> ProtoMsg {
        self.send(typ, b"");
        let m = self.recv(Instant::now() + RECEIVE).expect("a reply");
        assert_eq!(m.hdr.proto, PROTO_SHELL);
        assert_eq!(m.hdr.typ, typ, "{m:?}");
        m
    }

    /// Shell output until `done(output so far)`, all with status normal.
    fn output_until(&mut self, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + RECEIVE;
        let mut out = Vec::new();
        loop {
            let s = String::from_utf8_lossy(&out).into_owned();
            if done(&s) {
                return s;
            }
            let Some(m) = self.recv(deadline) else {
                panic!("waited {RECEIVE:?} for output; got {s:?}");
            };
            assert_eq!(m.hdr.typ, "shell", "not shell output: {m:?}");
            assert_eq!(status(&m), Some(STATUS_NORMAL), "{m:?}");
            out.extend_from_slice(m.body.as_deref().unwrap_or_default());
        }
    }
}

fn status(m: &ProtoMsg) -> Option<i64> {
    m.prop("status").and_then(Value::as_i64)
}

fn body(m: &ProtoMsg) -> Option<&[u8]> {
    m.body.as_deref()
}

fn prompt(out: &str) -> bool {
    out.ends_with("# ") || out.ends_with("$ ")
}

#[test]
fn test_regular_protocol_commands() {
    let b = bed();
    let mut ws = Operator::connect(&b.mgmt).expect("operator websocket");
    let m = ws.request("new");
    assert_eq!(status(&m), Some(STATUS_NORMAL));
    assert_eq!(body(&m), Some(&b"Shell started"[..]));
    ws.output_until(prompt);

    // a second start is refused (MEN-4240) and starts nothing
    let m = ws.request("new");
    assert_eq!(status(&m), Some(STATUS_ERROR));
    assert_eq!(
        body(&m),
        Some(&b"failed to start shell: shell is already running"[..])
    );
    // nothing came from a new shell: the next bytes are our command's echo
    ws.send("shell", b"echo MARK$((6*7))\n");
    let out = ws.output_until(|o| o.contains("MARK42\r\n"));
    assert!(out.starts_with("echo MARK$((6*7))"), "{out:?}");

    ws.send("shell", b"ls /\n");
    let out = ws.output_until(|o| o.contains("usr") && o.contains("etc") && prompt(o));
    assert!(out.contains("usr") && out.contains("etc"));

    let m = ws.request("stop");
    assert_eq!(status(&m), Some(STATUS_NORMAL));
    assert_eq!(body(&m), None);

    let m = ws.request("stop");
    assert_eq!(status(&m), Some(STATUS_ERROR));
    let text = String::from_utf8_lossy(body(&m).unwrap_or_default()).into_owned();
    assert!(text.contains("session not found"), "{text}");

    // input to the stopped shell: an error, no output
    ws.send("shell", b"ls /\n");
    let m = ws.recv(Instant::now() + RECEIVE).expect("a reply");
    assert_eq!(m.hdr.typ, "shell");
    assert_eq!(status(&m), Some(STATUS_ERROR));
    let text = String::from_utf8_lossy(body(&m).unwrap_or_default()).into_owned();
    assert!(text.contains("session not found"), "{text}");
    assert!(!text.contains("usr") && !text.contains("etc"), "{text}");

    let m = ws.request("new");
    assert_eq!(status(&m), Some(STATUS_NORMAL));
    ws.output_until(prompt);
    drop(b.daemon);
}

#[test]
fn test_websocket_reconnect() {
    let mut b = bed();
    drop(Operator::connect(&b.mgmt).expect("operator websocket"));
    // restart deviceconnect on the same port
    let port = b.server.port();
    b.server.stop();
    let server = Server::start_plain_on(port);
    let mgmt = Management::start(&server);
    b.mgmt = mgmt;
    b.server = server;
    // until the device is back, /connect is 404; poll the whole connect
    let ok = common::wait_until(Duration::from_secs(60), || {
        Operator::connect(&b.mgmt).is_ok()
    });
    if !ok {
        b.daemon.dump_log();
    }
    assert!(ok, "no operator websocket after the restart");
}

#[test]
fn test_bogus_shell_message() {
    let b = bed();
    let mut ws = Operator::connect(&b.mgmt).expect("operator websocket");
    ws.send("bogusmessage", b"");
    let m = ws.recv(Instant::now() + RECEIVE).expect("a reply");
    assert_eq!(status(&m), Some(STATUS_ERROR));
    assert_eq!(m.hdr.proto, PROTO_SHELL);
    assert_eq!(m.hdr.typ, "bogusmessage");
    drop(b.daemon);
}

/// The device side of upstream's recording test: what the device sends is
/// what deviceconnect records, so echo-off input must never be in it.
#[test]
fn test_session_recording() {
    let b = bed();
    let mut ws = Operator::connect(&b.mgmt).expect("operator websocket");
    let m = ws.request("new");
    assert_eq!(status(&m), Some(STATUS_NORMAL));
    assert_eq!(body(&m), Some(&b"Shell started"[..]));
    assert!(!m.hdr.sid.is_empty());
    let mut session = ws.output_until(prompt);

    ws.send("shell", b"echo 'now you see me'\n");
    session += &ws.output_until(|o| o.matches("now you see me").count() >= 2 && prompt(o));
    ws.send("shell", b"stty -echo\n");
    ws.send("shell", b"echo \"echo disabled $?\"\n");
    session += &ws.output_until(|o| o.contains("echo disabled 0") && prompt(o));
    ws.send("shell", b"echo \"now you don't\" > /dev/null\n");
    ws.send("shell", b"# Invisible comment\n");
    ws.send("shell", b"stty echo\n");
    ws.send("shell", b"echo \"echo enabled $?\"\n");
    session += &ws.output_until(|o| o.contains("echo enabled 0") && prompt(o));
    ws.send("shell", b"echo 'and now echo is back on'\n");
    session += &ws.output_until(|o| o.matches("and now echo is back on").count() >= 2);

    let m = ws.request("stop");
    assert_eq!(status(&m), Some(STATUS_NORMAL), "{m:?}");
    assert_eq!(body(&m), None);

    assert!(session.contains("now you see me"));
    assert!(session.contains("echo 'now you see me'"));
    assert!(!session.contains("# Invisible comment"), "{session:?}");
    assert!(
        !session.contains("echo \"now you don't\" > /dev/null"),
        "{session:?}"
    );
    assert!(session.contains("echo 'and now echo is back on'"));
    drop(b.daemon);
}
