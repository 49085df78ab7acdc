//! The on-device audit trail: every operator action and every refusal by a
//! configured rule leaves one `audit=true` info line in the daemon's log,
//! with the server's `user_id`, the session id and the action's metadata.

use std::collections::HashMap;
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use mender_connect::wire::codec::{
    PROTO_MENDERCLIENT, PROTO_PORTFORWARD, PROTO_SHELL, ProtoMsg, Value,
};
use mender_connect::wire::control::encode_map;
use testbed::target::TcpTarget;
use testbed::{Daemon, TIMEOUT, TempDir, default_config, drive};

/// The drivers in `testbed::drive` send this `user_id`.
const DRIVER_USER: &str = "bench-user";

type Fields = HashMap<String, String>;

/// The fields of one logrus line (`time`, `level`, `msg` included).
fn parse_line(line: &str) -> Fields {
    let mut out = HashMap::new();
    let mut rest = line.trim_end();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let (value, tail) = if let Some(quoted) = after.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, e)) = chars.next() {
                            v.push(match e {
                                'n' => '\n',
                                't' => '\t',
                                other => other,
                            });
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => v.push(c),
                }
            }
            (v, &quoted[end..])
        } else {
            let end = after.find(' ').unwrap_or(after.len());
            (after[..end].to_string(), &after[end..])
        };
        out.insert(key.trim().to_string(), value);
        rest = tail.trim_start();
    }
    out
}

/// Every audit line of `action` (its `msg`) logged so far.
fn audit_lines(d: &Daemon, action: &str) -> Vec<Fields> {
    d.log()
        .lines()
        .filter(|l| l.contains(" audit=true"))
        .map(parse_line)
        .filter(|f| f.get("msg").map(String::as_str) == Some(action))
        .collect()
}

/// Waits for an audit line of `action` for which `pred` holds.
fn wait_audit(d: &Daemon, action: &str, pred: impl Fn(&Fields) -> bool) -> Fields {
    let mut found = None;
    testbed::wait_until(TIMEOUT, || {
        found = audit_lines(d, action).into_iter().find(|f| pred(f));
        found.is_some()
    });
    found.unwrap_or_else(|| {
        d.dump_log();
        panic!("no audit line {action:?} matching the test's condition")
    })
}

fn get<'a>(f: &'a Fields, k: &str) -> &'a str {
    f.get(k)
        .map(String::as_str)
        .unwrap_or_else(|| panic!("field {k} missing in {f:?}"))
}

fn num(f: &Fields, k: &str) -> u64 {
    get(f, k)
        .parse()
        .unwrap_or_else(|_| panic!("field {k} is not a number in {f:?}"))
}

/// The common part of every audit line.
fn assert_who(f: &Fields, user: &str, sid: &str, result: &str) {
    assert_eq!(get(f, "level"), "info", "{f:?}");
    assert_eq!(get(f, "audit"), "true");
    assert_eq!(get(f, "user_id"), user, "{f:?}");
    assert_eq!(get(f, "session_id"), sid, "{f:?}");
    assert_eq!(get(f, "result"), result, "{f:?}");
}

fn shell_config(extra: serde_json::Value) -> String {
    let mut cfg: serde_json::Value = serde_json::from_str(&default_config()).expect("config");
    // dash (/bin/sh here) rejects the default `--login`
    cfg["ShellArguments"] = serde_json::json!([]);
    if let (Some(c), Some(e)) = (cfg.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            c.insert(k.clone(), v.clone());
        }
    }
    cfg.to_string()
}

fn shell_msg(typ: &str, sid: &str) -> ProtoMsg {
    ProtoMsg::new(PROTO_SHELL, typ, sid).with_prop("user_id", Value::Str(DRIVER_USER.into()))
}

fn sid(n: usize) -> String {
    format!("a0d17000-0000-4000-8000-{n:012}")
}

// ------------------------------------------------------------------ shell

#[test]
fn shell_lines_name_user_pid_size_bytes_status_and_who_stopped_it() {
    let c = testbed::env::connected(&shell_config(serde_json::json!({})), &[], "token-a1");
    let (conn, mut daemon) = (c.conn, c.daemon);
    let me = testbed::daemon::current_user();

    // opened with a size, fed one line, stopped by the operator
    let s1 = sid(1);
    conn.send_msg(
        &shell_msg("new", &s1)
            .with_prop("terminal_height", Value::Int(30))
            .with_prop("terminal_width", Value::Int(100)),
    );
    let open = wait_audit(&daemon, "shell open", |f| f.get("session_id") == Some(&s1));
    assert_who(&open, DRIVER_USER, &s1, "ok");
    assert_eq!(get(&open, "run_as"), me);
    assert_eq!((num(&open, "rows"), num(&open, "cols")), (30, 100));
    let pid = num(&open, "pid");
    assert!(
        testbed::process_exists(pid as u32),
        "pid {pid} is not the shell"
    );
    let line = "echo audit-marker-$((6*7))\n";
    let (out, _) = drive::shell_run_until(&conn, &s1, line, b"audit-marker-42", TIMEOUT)
        .expect("shell output");
    drive::shell_stop(&conn, &s1, TIMEOUT).expect("stop");
    let close = wait_audit(&daemon, "shell close", |f| f.get("session_id") == Some(&s1));
    assert_who(&close, DRIVER_USER, &s1, "ok");
    assert_eq!(get(&close, "stopped_by"), "operator");
    assert_eq!(num(&close, "pid"), pid);
    assert_eq!(num(&close, "rx_bytes"), line.len() as u64);
    assert!(
        num(&close, "tx_bytes") >= out as u64,
        "{close:?} vs {out} bytes seen"
    );
    assert!(get(&close, "status").starts_with("signal: "), "{close:?}");
    assert!(get(&close, "duration").ends_with('s'), "{close:?}");

    // the shell exits by itself with a status
    let s2 = sid(2);
    drive::shell_open(&conn, &s2, TIMEOUT).expect("shell 2");
    conn.send_msg(&shell_msg("shell", &s2).with_body(b"exit 3\n".to_vec()));
    let close = wait_audit(&daemon, "shell close", |f| f.get("session_id") == Some(&s2));
    assert_eq!(get(&close, "stopped_by"), "exit");
    assert_eq!(get(&close, "status"), "exit status 3");
    let open = wait_audit(&daemon, "shell open", |f| f.get("session_id") == Some(&s2));
    assert_eq!((num(&open, "rows"), num(&open, "cols")), (40, 80));

    // Sessions.MaxPerUser (default 1) refuses a second shell of the user
    let (s3, s4) = (sid(3), sid(4));
    drive::shell_open(&conn, &s3, TIMEOUT).expect("shell 3");
    assert!(drive::shell_open(&conn, &s4, TIMEOUT).is_err());
    let refused = wait_audit(&daemon, "shell open", |f| f.get("session_id") == Some(&s4));
    assert_who(&refused, DRIVER_USER, &s4, "refused");
    assert_eq!(get(&refused, "rule"), "Sessions.MaxPerUser");
    assert_eq!(get(&refused, "err"), "user has too many open sessions");

    // deviceconnect's stop when the operator's browser went away
    conn.send_msg(
        &shell_msg("stop", &s3)
            .with_prop("status", Value::Int(2))
            .with_body(b"user disconnected".to_vec()),
    );
    let close = wait_audit(&daemon, "shell close", |f| f.get("session_id") == Some(&s3));
    assert_eq!(get(&close, "stopped_by"), "disconnect");

    // daemon shutdown ends the last one
    let s5 = sid(5);
    drive::shell_open(&conn, &s5, TIMEOUT).expect("shell 5");
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(TIMEOUT).is_some(), "daemon did not stop");
    let close = wait_audit(&daemon, "shell close", |f| f.get("session_id") == Some(&s5));
    assert_eq!(get(&close, "stopped_by"), "shutdown");
    // one line per action: every shell opened once and closed once
    assert_eq!(audit_lines(&daemon, "shell close").len(), 4);
}

#[test]
fn an_expired_shell_is_logged_as_stopped_by_expiry() {
    let cfg = shell_config(serde_json::json!({"Sessions": {"ExpireAfter": 1}}));
    let c = testbed::env::connected(&cfg, &[], "token-a2");
    let s = sid(10);
    drive::shell_open(&c.conn, &s, TIMEOUT).expect("shell");
    let close = wait_audit(&c.daemon, "shell close", |f| {
        f.get("session_id") == Some(&s)
    });
    assert_who(&close, DRIVER_USER, &s, "ok");
    assert_eq!(get(&close, "stopped_by"), "expiry");
}

#[test]
fn a_shell_whose_pings_go_unanswered_is_logged_as_stopped_by_the_health_check() {
    let cfg = shell_config(serde_json::json!({}));
    let c = testbed::env::connected(&cfg, &[("MENDER_CONNECT_SHELL_PING_MS", "300")], "token-a3");
    let s = sid(11);
    drive::shell_open(&c.conn, &s, TIMEOUT).expect("shell");
    let close = wait_audit(&c.daemon, "shell close", |f| {
        f.get("session_id") == Some(&s)
    });
    assert_eq!(get(&close, "stopped_by"), "health-check");
}

// ---------------------------------------------------------- file transfer

#[test]
fn transfers_log_requested_and_resolved_path_size_mode_owner_and_result() {
    let dir = TempDir::new("audit-ft");
    let real = std::fs::canonicalize(dir.path()).expect("canonical");
    std::fs::write(real.join("real.txt"), b"0123456789").expect("file");
    std::os::unix::fs::symlink(real.join("real.txt"), real.join("link.txt")).expect("link");
    let c = testbed::env::connected(&default_config(), &[], "token-a4");

    let s = sid(20);
    let got = drive::ft_download(&c.conn, &s, &real.join("link.txt"), TIMEOUT).expect("download");
    assert_eq!(got, b"0123456789");
    let d = wait_audit(&c.daemon, "file download", |f| {
        f.get("session_id") == Some(&s)
    });
    assert_who(&d, DRIVER_USER, &s, "ok");
    assert_eq!(get(&d, "path"), real.join("link.txt").display().to_string());
    assert_eq!(
        get(&d, "resolved"),
        real.join("real.txt").display().to_string()
    );
    assert_eq!(num(&d, "size"), 10);

    let s = sid(21);
    let data = testbed::random_bytes(10_000, 3);
    drive::ft_upload(&c.conn, &s, &real.join("up.bin"), &data, TIMEOUT).expect("upload");
    let u = wait_audit(&c.daemon, "file upload", |f| {
        f.get("session_id") == Some(&s)
    });
    assert_who(&u, DRIVER_USER, &s, "ok");
    assert_eq!(get(&u, "path"), real.join("up.bin").display().to_string());
    assert_eq!(
        get(&u, "resolved"),
        real.join("up.bin").display().to_string()
    );
    assert_eq!(num(&u, "size"), 10_000);
    assert_eq!(get(&u, "mode"), "644");
    // SAFETY: geteuid/getegid cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    assert_eq!((num(&u, "uid"), num(&u, "gid")), (uid.into(), gid.into()));
    // no file contents in the log
    let log = c.daemon.log();
    assert!(!log.contains("0123456789"), "file contents were logged");

    // a failure that is no rule's doing is an error, not a refusal
    let s = sid(22);
    assert!(drive::ft_download(&c.conn, &s, &real.join("missing"), TIMEOUT).is_err());
    let e = wait_audit(&c.daemon, "file download", |f| {
        f.get("session_id") == Some(&s)
    });
    assert_who(&e, DRIVER_USER, &s, "error");
    assert!(
        get(&e, "err").contains("no such file or directory"),
        "{e:?}"
    );
    assert!(!e.contains_key("rule"), "{e:?}");
}

#[test]
fn every_limits_refusal_names_the_rule() {
    let dir = TempDir::new("audit-limits");
    let jail = std::fs::canonicalize(dir.path()).expect("canonical");
    std::fs::write(jail.join("big"), vec![b'x'; 200]).expect("big");
    std::fs::write(jail.join("existing"), b"old").expect("existing");
    let mut cfg: serde_json::Value = serde_json::from_str(&default_config()).expect("config");
    cfg["Limits"] = serde_json::json!({
        "Enabled": true,
        "FileTransfer": {"Chroot": jail.display().to_string(), "MaxFileSize": 100}
    });
    let c = testbed::env::connected(&cfg.to_string(), &[], "token-a5");
    let cases: [(&str, &Path, &str, &str); 3] = [
        (
            "file download",
            &jail.join("big"),
            "Limits.FileTransfer.MaxFileSize",
            "access denied: the file size is over the limit",
        ),
        (
            "file download",
            Path::new("/etc/passwd"),
            "Limits.FileTransfer.Chroot",
            "access denied: the target file path is outside chroot",
        ),
        (
            "file upload",
            &jail.join("existing"),
            "Limits.FileTransfer.AllowOverwrite",
            "access denied: forbidden to overwrite the file",
        ),
    ];
    for (n, (action, path, rule, err)) in cases.into_iter().enumerate() {
        let s = sid(30 + n);
        let r = if action == "file upload" {
            drive::ft_upload(&c.conn, &s, path, b"new", TIMEOUT).map(|_| ())
        } else {
            drive::ft_download(&c.conn, &s, path, TIMEOUT).map(|_| ())
        };
        assert!(r.is_err(), "{action} {} was allowed", path.display());
        let f = wait_audit(&c.daemon, action, |f| f.get("session_id") == Some(&s));
        assert_who(&f, DRIVER_USER, &s, "refused");
        assert_eq!(get(&f, "rule"), rule, "{f:?}");
        assert_eq!(get(&f, "err"), err, "{f:?}");
        assert_eq!(get(&f, "path"), path.display().to_string());
    }
    assert_eq!(std::fs::read(jail.join("existing")).expect("kept"), b"old");
}

// ----------------------------------------------------------- port forward

fn pf_new(conn: &testbed::ConnHandle, sid: &str, cid: &str, host: &str, port: u16) {
    let body = drive::pf_new_body(host, port, "tcp");
    conn.send_msg(
        &ProtoMsg::new(PROTO_PORTFORWARD, "new", sid)
            .with_prop("connection_id", Value::Str(cid.into()))
            .with_prop("user_id", Value::Str(DRIVER_USER.into()))
            .with_body(body),
    );
}

#[test]
fn port_forwards_log_target_bytes_each_way_duration_errors_and_caps() {
    let c = testbed::env::connected(
        &default_config(),
        &[("MENDER_CONNECT_PF_MAX_PER_SESSION", "1")],
        "token-a6",
    );
    let sink = TcpTarget::start(|mut s| {
        let mut buf = [0u8; 4096];
        while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
    });
    let target = format!("127.0.0.1:{}", sink.addr.port());

    // operator -> target, stopped by the operator
    let s = sid(40);
    drive::pf_new(&c.conn, &s, "c1", sink.addr, TIMEOUT).expect("new");
    let open = wait_audit(&c.daemon, "port forward open", |f| {
        f.get("session_id") == Some(&s)
    });
    assert_who(&open, DRIVER_USER, &s, "ok");
    assert_eq!(get(&open, "protocol"), "tcp");
    assert_eq!(get(&open, "target"), target);
    assert_eq!(get(&open, "connection_id"), "c1");
    assert!(
        get(&open, "peer").ends_with(&format!("->{target}")),
        "{open:?}"
    );
    drive::pf_send(&c.conn, &s, "c1", 1000, 300, TIMEOUT).expect("send");

    // the per-session cap refuses a second connection
    pf_new(&c.conn, &s, "c2", "127.0.0.1", sink.addr.port());
    let capped = wait_audit(&c.daemon, "port forward open", |f| {
        f.get("connection_id").map(String::as_str) == Some("c2")
    });
    assert_who(&capped, DRIVER_USER, &s, "refused");
    assert_eq!(get(&capped, "rule"), "connections per session cap");
    assert_eq!(get(&capped, "err"), "too many port-forward connections");

    let reply = drive::recv_for(&c.conn, &s, TIMEOUT).expect("reply to c2");
    assert_eq!(reply.hdr.typ, "error", "{reply:?}");
    drive::pf_stop(&c.conn, &s, "c1", TIMEOUT).expect("stop");
    let close = wait_audit(&c.daemon, "port forward close", |f| {
        f.get("session_id") == Some(&s)
    });
    assert_who(&close, DRIVER_USER, &s, "ok");
    assert_eq!(get(&close, "target"), target);
    assert_eq!(
        (num(&close, "rx_bytes"), num(&close, "tx_bytes")),
        (1000, 0)
    );
    assert_eq!(get(&close, "stopped_by"), "operator");
    assert!(get(&close, "duration").ends_with('s'));

    // target -> operator, ended by the target
    let source = TcpListener::bind("127.0.0.1:0").expect("bind");
    let src_addr = source.local_addr().expect("addr");
    let feeder = drive::pf_source(source, 5000);
    let s = sid(41);
    drive::pf_new(&c.conn, &s, "c3", src_addr, TIMEOUT).expect("new");
    let (got, _) = drive::pf_receive(&c.conn, &s, "c3", TIMEOUT).expect("receive");
    assert_eq!(got, 5000);
    let _ = feeder.join();
    let close = wait_audit(&c.daemon, "port forward close", |f| {
        f.get("session_id") == Some(&s)
    });
    assert_eq!(
        (num(&close, "rx_bytes"), num(&close, "tx_bytes")),
        (0, 5000)
    );
    assert_eq!(get(&close, "stopped_by"), "EOF");

    // a dial error
    let closed = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let s = sid(42);
    pf_new(&c.conn, &s, "c4", "127.0.0.1", closed);
    let err = wait_audit(&c.daemon, "port forward open", |f| {
        f.get("session_id") == Some(&s)
    });
    assert_who(&err, DRIVER_USER, &s, "error");
    assert_eq!(
        get(&err, "err"),
        format!("dial tcp 127.0.0.1:{closed}: connect: connection refused")
    );

    // a `new` that does not parse
    let s = sid(43);
    let body = encode_map(&[
        ("remote_host", Value::Str("127.0.0.1".into())),
        ("remote_port", Value::U16(22)),
        ("protocol", Value::Str("sctp".into())),
    ]);
    c.conn.send_msg(
        &ProtoMsg::new(PROTO_PORTFORWARD, "new", &s)
            .with_prop("connection_id", Value::Str("c5".into()))
            .with_prop("user_id", Value::Str(DRIVER_USER.into()))
            .with_body(body),
    );
    let bad = wait_audit(&c.daemon, "port forward open", |f| {
        f.get("session_id") == Some(&s)
    });
    assert_who(&bad, DRIVER_USER, &s, "error");
    assert_eq!(get(&bad, "err"), "unknown protocol: sctp");
    assert_eq!(get(&bad, "connection_id"), "c5");
}

// ---------------------------------------------------------- mender client

#[test]
fn mender_client_triggers_log_which_and_the_exit_status_and_the_queue_cap() {
    let dir = TempDir::new("audit-mc");
    let hold = dir.join("hold");
    let bin = dir.join("mender-update");
    std::fs::write(
        &bin,
        format!(
            "#!/bin/sh\nwhile [ -e '{}' ]; do sleep 0.05; done\n\
             case \"$1\" in check-update) exit 0;; *) exit 3;; esac\n",
            hold.display()
        ),
    )
    .expect("script");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let paths = bin.display().to_string();
    let c = testbed::env::connected(
        &default_config(),
        &[("MENDER_CONNECT_CLIENT_PATHS", &paths)],
        "token-a7",
    );
    let trigger = |typ: &str, user: &str| {
        ProtoMsg::new(PROTO_MENDERCLIENT, typ, "").with_prop("user_id", Value::Str(user.into()))
    };
    c.conn.send_msg(&trigger("check-update", "u-ok"));
    let ok = wait_audit(&c.daemon, "mender-client trigger", |f| {
        f.get("user_id").map(String::as_str) == Some("u-ok")
    });
    assert_who(&ok, "u-ok", "", "ok");
    assert_eq!(get(&ok, "trigger"), "check-update");
    assert_eq!(get(&ok, "status"), "exit status 0");

    c.conn.send_msg(&trigger("send-inventory", "u-fail"));
    let failed = wait_audit(&c.daemon, "mender-client trigger", |f| {
        f.get("user_id").map(String::as_str) == Some("u-fail")
    });
    assert_who(&failed, "u-fail", "", "error");
    assert_eq!(get(&failed, "trigger"), "send-inventory");
    assert_eq!(get(&failed, "status"), "exit status 3");

    // one running plus eight queued: the tenth is refused by the cap
    std::fs::write(&hold, b"").expect("hold");
    for _ in 0..10 {
        c.conn.send_msg(&trigger("check-update", "u-many"));
    }
    let refused = wait_audit(&c.daemon, "mender-client trigger", |f| {
        f.get("result").map(String::as_str) == Some("refused")
    });
    assert_who(&refused, "u-many", "", "refused");
    assert_eq!(get(&refused, "rule"), "pending requests cap");
    assert_eq!(get(&refused, "trigger"), "check-update");
    std::fs::remove_file(&hold).expect("release");
    let done = testbed::wait_until(TIMEOUT, || {
        audit_lines(&c.daemon, "mender-client trigger")
            .iter()
            .filter(|f| f.get("user_id").map(String::as_str) == Some("u-many"))
            .count()
            == 10
    });
    assert!(done, "every trigger leaves exactly one line");
}

#[test]
fn audit_lines_parse_as_logrus_fields() {
    let f = parse_line(
        "time=\"2026-01-01T00:00:00Z\" level=info msg=\"shell open\" audit=true \
         err=\"a \\\"b\\\"\" pid=42 session_id=s user_id=\"\"",
    );
    assert_eq!(f["msg"], "shell open");
    assert_eq!(f["err"], "a \"b\"");
    assert_eq!(f["pid"], "42");
    assert_eq!(f["user_id"], "");
}
