//! `mendersoftware/integration` `tests/tests/test_mender_connect.py`, one
//! test per upstream test and named after it: an operator's websocket to the
//! management stand-in (`…/devices/:id/connect`, as the UI and upstream's
//! `ProtoShell` helper use it) drives the real daemon. Upstream reads output
//! until a 16 s silence; here each read waits for what it expects, with a
//! deadline. `test_in_poor_network_environment` lives in `tests/chaos.rs`
//! (it needs the network namespace lab).

use std::time::{Duration, Instant};

use mender_connect::wire::codec::{PROTO_SHELL, ProtoMsg};
use testbed::operator::{Operator, STATUS_ERROR, STATUS_NORMAL, prompt, status};
use testbed::{Managed, Management, Server, default_config};

/// Upstream's `receive_timeout_s`.
const RECEIVE: Duration = Duration::from_secs(16);

/// The daemon behind the management stand-in.
type Bed = Managed;

fn bed() -> Bed {
    let mut cfg: serde_json::Value = serde_json::from_str(&default_config()).expect("config");
    // an interactive shell prints its prompt, as on upstream's device
    cfg["ShellArguments"] = serde_json::json!(["-i"]);
    Managed::start(&cfg.to_string(), "device-token")
}

/// Upstream's `devconnect.get_websocket()`.
fn operator(mgmt: &Management) -> Operator {
    Operator::connect(mgmt).expect("operator websocket")
}

fn request(ws: &mut Operator, typ: &str) -> ProtoMsg {
    ws.request(typ, RECEIVE).expect("reply")
}

fn output_until(ws: &mut Operator, done: impl Fn(&str) -> bool) -> String {
    ws.output_until(RECEIVE, done).expect("output")
}

fn send(ws: &mut Operator, input: &[u8]) {
    ws.send("shell", input).expect("send");
}

fn body(m: &ProtoMsg) -> Option<&[u8]> {
    m.body.as_deref()
}

#[test]
fn test_regular_protocol_commands() {
    let b = bed();
    let mut ws = operator(&b.mgmt);
    let m = request(&mut ws, "new");
    assert_eq!(status(&m), Some(STATUS_NORMAL));
    assert_eq!(body(&m), Some(&b"Shell started"[..]));
    output_until(&mut ws, prompt);

    // a second start is refused (MEN-4240) and starts nothing
    let m = request(&mut ws, "new");
    assert_eq!(status(&m), Some(STATUS_ERROR));
    assert_eq!(
        body(&m),
        Some(&b"failed to start shell: shell is already running"[..])
    );
    // nothing came from a new shell: the next bytes are our command's echo
    send(&mut ws, b"echo MARK$((6*7))\n");
    let out = output_until(&mut ws, |o| o.contains("MARK42\r\n"));
    assert!(out.starts_with("echo MARK$((6*7))"), "{out:?}");

    send(&mut ws, b"ls /\n");
    let out = output_until(&mut ws, |o| {
        o.contains("usr") && o.contains("etc") && prompt(o)
    });
    assert!(out.contains("usr") && out.contains("etc"));

    let m = request(&mut ws, "stop");
    assert_eq!(status(&m), Some(STATUS_NORMAL));
    assert_eq!(body(&m), None);

    let m = request(&mut ws, "stop");
    assert_eq!(status(&m), Some(STATUS_ERROR));
    let text = String::from_utf8_lossy(body(&m).unwrap_or_default()).into_owned();
    assert!(text.contains("session not found"), "{text}");

    // input to the stopped shell: an error, no output
    send(&mut ws, b"ls /\n");
    let m = ws.recv(Instant::now() + RECEIVE).expect("a reply");
    assert_eq!(m.hdr.typ, "shell");
    assert_eq!(status(&m), Some(STATUS_ERROR));
    let text = String::from_utf8_lossy(body(&m).unwrap_or_default()).into_owned();
    assert!(text.contains("session not found"), "{text}");
    assert!(!text.contains("usr") && !text.contains("etc"), "{text}");

    let m = request(&mut ws, "new");
    assert_eq!(status(&m), Some(STATUS_NORMAL));
    output_until(&mut ws, prompt);
    drop(b.daemon);
}

#[test]
fn test_websocket_reconnect() {
    let mut b = bed();
    drop(operator(&b.mgmt));
    // restart deviceconnect on the same port
    let port = b.server.port();
    b.server.stop();
    let server = Server::start_plain_on(port);
    let mgmt = Management::start(&server);
    b.mgmt = mgmt;
    b.server = server;
    // until the device is back, /connect is 404; poll the whole connect
    let ok = testbed::wait_until(Duration::from_secs(60), || {
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
    let mut ws = operator(&b.mgmt);
    ws.send("bogusmessage", b"").expect("send");
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
    let mut ws = operator(&b.mgmt);
    let m = request(&mut ws, "new");
    assert_eq!(status(&m), Some(STATUS_NORMAL));
    assert_eq!(body(&m), Some(&b"Shell started"[..]));
    assert!(!m.hdr.sid.is_empty());
    let mut session = output_until(&mut ws, prompt);

    send(&mut ws, b"echo 'now you see me'\n");
    session += &output_until(&mut ws, |o| {
        o.matches("now you see me").count() >= 2 && prompt(o)
    });
    send(&mut ws, b"stty -echo\n");
    send(&mut ws, b"echo \"echo disabled $?\"\n");
    session += &output_until(&mut ws, |o| o.contains("echo disabled 0") && prompt(o));
    send(&mut ws, b"echo \"now you don't\" > /dev/null\n");
    send(&mut ws, b"# Invisible comment\n");
    send(&mut ws, b"stty echo\n");
    send(&mut ws, b"echo \"echo enabled $?\"\n");
    session += &output_until(&mut ws, |o| o.contains("echo enabled 0") && prompt(o));
    send(&mut ws, b"echo 'and now echo is back on'\n");
    session += &output_until(&mut ws, |o| {
        o.matches("and now echo is back on").count() >= 2
    });

    let m = request(&mut ws, "stop");
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
