//! Mender-client triggers (protocol 4) through the daemon, sent the way
//! deviceconnect sends them: no sid, a `user_id` prop, no body.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mender_connect::wire::codec::{self, PROTO_CONTROL, PROTO_MENDERCLIENT, ProtoMsg, Value};
use mender_connect::wire::control::{Accept, ControlError, Open};
use testbed::{
    AuthService, ConnHandle, Daemon, DbusDaemon, Server, TIMEOUT, TempDir, default_config,
};

const USER_ID: &str = "b3f0c9a4-1d2e-4f50-8a61-7c8d9e0f1a2b";

struct Bed {
    conn: ConnHandle,
    daemon: Daemon,
    _server: Server,
    _auth: AuthService,
    _bus: DbusDaemon,
}

fn bed_with(config: &str, env: &[(&str, &str)]) -> Bed {
    let c = testbed::env::connected(config, env, "token-mc");
    Bed {
        conn: c.conn,
        daemon: c.daemon,
        _server: c.server,
        _auth: c.auth,
        _bus: c.bus,
    }
}

/// A stand-in client binary that appends its arguments to `log` and exits
/// with `code` (after `sleep` seconds, when given).
fn script(dir: &Path, name: &str, log: &Path, code: i32, sleep: Option<u32>) -> PathBuf {
    let path = dir.join(name);
    let pause = sleep.map_or(String::new(), |s| format!("sleep {s}\n"));
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\n{pause}echo \"$0 $*\" >> '{}'\nexit {code}\n",
            log.display()
        ),
    )
    .expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

fn trigger(typ: &str) -> ProtoMsg {
    ProtoMsg::new(PROTO_MENDERCLIENT, typ, "").with_prop("user_id", Value::Str(USER_ID.into()))
}

fn recv_reply(conn: &ConnHandle, timeout: Duration) -> ProtoMsg {
    let m = conn.recv_msg(timeout).expect("a reply");
    assert_eq!(m.hdr.proto, PROTO_MENDERCLIENT, "got {m:?}");
    m
}

fn paths_env(paths: &[&Path]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":")
}

#[test]
fn triggers_run_the_first_existing_binary_and_reply_like_the_reference() {
    let dir = TempDir::new("mc-bin");
    let log = dir.join("args");
    let ok = script(dir.path(), "mender-update", &log, 0, None);
    let other = script(dir.path(), "mender", &log, 0, None);
    let missing = dir.join("not-there");
    let env = paths_env(&[&missing, &ok, &other]);
    let bed = bed_with(&default_config(), &[("MENDER_CONNECT_CLIENT_PATHS", &env)]);

    bed.conn.send_msg(&trigger("check-update"));
    let frame = bed.conn.recv_frame(TIMEOUT).expect("reply");
    // byte-exact: menderclient_check_update_ok_device
    assert_eq!(
        testbed::hex(&frame.data, 200).replace(' ', ""),
        "81a368647283a570726f746fcd0004a3747970ac636865636b2d757064617465a570726f707381a673746174757301"
    );
    bed.conn.send_msg(&trigger("send-inventory"));
    let m = recv_reply(&bed.conn, TIMEOUT);
    assert_eq!(m.hdr.typ, "send-inventory");
    assert_eq!(m.prop("status").and_then(Value::as_i64), Some(1));
    assert!(m.hdr.sid.is_empty() && m.body.is_none());
    let args = std::fs::read_to_string(&log).expect("script ran");
    assert_eq!(
        args,
        format!("{0} check-update\n{0} send-inventory\n", ok.display())
    );
}

#[test]
fn a_failing_client_gives_status_2_and_the_exit_status() {
    let dir = TempDir::new("mc-fail");
    let log = dir.join("args");
    let bad = script(dir.path(), "mender-update", &log, 1, None);
    let env = paths_env(&[&bad]);
    let bed = bed_with(&default_config(), &[("MENDER_CONNECT_CLIENT_PATHS", &env)]);
    bed.conn.send_msg(&trigger("send-inventory"));
    let frame = bed.conn.recv_frame(TIMEOUT).expect("reply");
    let m = codec::decode(&frame.data).expect("decodes");
    assert_eq!(m.prop("status").and_then(Value::as_i64), Some(2));
    assert_eq!(m.body.as_deref(), Some(&b"exit status 1"[..]));
    // byte-exact: menderclient_send_inventory_error_device
    assert_eq!(
        frame.data,
        codec::encode(
            &ProtoMsg::new(PROTO_MENDERCLIENT, "send-inventory", "")
                .with_prop("status", Value::Int(2))
                .with_body(b"exit status 1".to_vec())
        )
    );
}

#[test]
fn a_missing_binary_gives_the_reference_error() {
    let dir = TempDir::new("mc-missing");
    let (a, b) = (dir.join("mender-update"), dir.join("mender"));
    let env = paths_env(&[&a, &b]);
    let bed = bed_with(&default_config(), &[("MENDER_CONNECT_CLIENT_PATHS", &env)]);
    bed.conn.send_msg(&trigger("check-update"));
    let m = recv_reply(&bed.conn, TIMEOUT);
    assert_eq!(m.prop("status").and_then(Value::as_i64), Some(2));
    let want = format!(
        "Cannot find Mender client binary, tried [{} {}]",
        a.display(),
        b.display()
    );
    assert_eq!(m.body.as_deref(), Some(want.as_bytes()));
}

#[test]
fn the_default_paths_are_named_in_the_error_when_absent() {
    let defaults = ["/usr/bin/mender-update", "/usr/bin/mender"];
    if defaults.iter().any(|p| Path::new(p).exists()) {
        eprintln!("skipped: a Mender client is installed here");
        return;
    }
    let bed = bed_with(&default_config(), &[]);
    bed.conn.send_msg(&trigger("check-update"));
    let m = recv_reply(&bed.conn, TIMEOUT);
    assert_eq!(
        m.body.as_deref(),
        Some(
            &b"Cannot find Mender client binary, tried [/usr/bin/mender-update /usr/bin/mender]"[..]
        )
    );
}

#[test]
fn an_unknown_type_gets_status_2() {
    let bed = bed_with(&default_config(), &[]);
    bed.conn.send_msg(&trigger("reboot"));
    let frame = bed.conn.recv_frame(TIMEOUT).expect("reply");
    // byte-exact: menderclient_unknown_type_device
    assert_eq!(
        frame.data,
        codec::encode(
            &ProtoMsg::new(PROTO_MENDERCLIENT, "reboot", "")
                .with_prop("status", Value::Int(2))
                .with_body(b"unknown message type".to_vec())
        )
    );
}

#[test]
fn a_hanging_client_is_killed_at_the_timeout_without_blocking_other_sessions() {
    let dir = TempDir::new("mc-slow");
    let log = dir.join("args");
    let slow = script(dir.path(), "mender-update", &log, 0, Some(30));
    let env = paths_env(&[&slow]);
    let bed = bed_with(
        &default_config(),
        &[
            ("MENDER_CONNECT_CLIENT_PATHS", &env),
            ("MENDER_CONNECT_CLIENT_TIMEOUT_MS", "1500"),
        ],
    );
    let started = Instant::now();
    bed.conn.send_msg(&trigger("check-update"));
    // meanwhile another session answers at once
    bed.conn
        .send_msg(&ProtoMsg::new(PROTO_CONTROL, "ping", "other-session"));
    let pong = bed.conn.recv_msg(TIMEOUT).expect("pong");
    assert_eq!(pong.hdr.typ, "pong");
    assert!(started.elapsed() < Duration::from_millis(500));
    let m = recv_reply(&bed.conn, TIMEOUT);
    let took = started.elapsed();
    assert_eq!(m.prop("status").and_then(Value::as_i64), Some(2));
    assert_eq!(m.body.as_deref(), Some(&b"timed out after 1.5s"[..]));
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(8),
        "{took:?}"
    );
    // the script (and its sleep) was killed before it could log anything
    assert!(!log.exists(), "the stand-in ran to completion");
}

#[test]
fn mender_client_disable_removes_protocol_4() {
    let mut cfg: serde_json::Value = serde_json::from_str(&default_config()).unwrap();
    cfg["MenderClient"] = serde_json::json!({"Disable": true});
    let mut bed = bed_with(&cfg.to_string(), &[]);
    let open =
        ProtoMsg::new(PROTO_CONTROL, "open", "s1").with_body(Open { versions: vec![1] }.encode());
    bed.conn.send_msg(&open);
    let accept = bed.conn.recv_msg(TIMEOUT).expect("accept");
    let accept = Accept::decode(accept.body.as_deref().unwrap_or_default()).expect("accept body");
    assert!(!accept.protocols.contains(&PROTO_MENDERCLIENT));
    bed.conn.send_msg(&trigger("check-update"));
    let err = bed.conn.recv_msg(TIMEOUT).expect("control error");
    assert_eq!(err.hdr.proto, PROTO_CONTROL);
    let e = ControlError::decode(err.body.as_deref().unwrap_or_default()).expect("error body");
    assert_eq!(e.err, "no handler registered for protocol: 0x0004");
    assert!(bed.daemon.try_status().is_none());
}
