//! End-to-end check of a daemon binary built elsewhere (e.g. for ARM, run
//! under qemu-user through a wrapper script): starts the stand-in environment
//! (private D-Bus, auth service, deviceconnect server), runs
//! `<daemon> --config F --fallback-config X -d daemon`, waits for it to
//! connect, optionally stays idle, then opens a shell session the way
//! deviceconnect does, runs a command, stops the session and the daemon
//! (SIGTERM, clean exit expected).
//!
//! ```text
//! cargo run --example shell_check -- --daemon WRAPPER [--tls] [--idle-secs N] [--timeout-secs N]
//! ```
//!
//! `--tls`: the server speaks TLS with a throw-away CA, which the daemon
//! trusts through `SSL_CERT_FILE` (what a device does: wss:// to the server).
//!
//! Exit status 0 and a line `shell_check: OK ...` on success; 1 and the
//! daemon's log on failure. Used by `packaging/cross/test-qemu.sh`.

use mender_connect::wire::codec::{PROTO_CONTROL, PROTO_SHELL, ProtoMsg, Value};
use mender_connect::wire::control::Open;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use testbed::{AuthService, ConnHandle, Daemon, DbusDaemon, Server, TlsCert};

const SID: &str = "c0ffee00-6c2b-4d5e-9a57-000000000042";

struct Args {
    daemon: PathBuf,
    tls: bool,
    idle: Duration,
    timeout: Duration,
}

fn usage() -> ! {
    eprintln!("usage: shell_check --daemon PATH [--tls] [--idle-secs N] [--timeout-secs N]");
    std::process::exit(2);
}

fn parse_args() -> Args {
    let mut daemon = None;
    let mut tls = false;
    let mut idle = 0.0;
    let mut timeout = 60.0;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        let mut secs = || value().parse::<f64>().unwrap_or_else(|_| usage());
        match a.as_str() {
            "--daemon" => daemon = Some(PathBuf::from(value())),
            "--tls" => tls = true,
            "--idle-secs" => idle = secs(),
            "--timeout-secs" => timeout = secs(),
            _ => usage(),
        }
    }
    Args {
        daemon: daemon.unwrap_or_else(|| usage()),
        tls,
        idle: Duration::from_secs_f64(idle),
        timeout: Duration::from_secs_f64(timeout),
    }
}

fn shell_msg(typ: &str) -> ProtoMsg {
    ProtoMsg::new(PROTO_SHELL, typ, SID).with_prop("user_id", Value::Str("check".into()))
}

/// The first message matching `pred` within `timeout`.
fn wait_msg(
    conn: &ConnHandle,
    timeout: Duration,
    pred: impl Fn(&ProtoMsg) -> bool,
) -> Result<ProtoMsg, String> {
    conn.recv_msg_matching(timeout, pred)
        .ok_or_else(|| "timed out".to_string())
}

fn wait_output(conn: &ConnHandle, timeout: Duration, needle: &str) -> Result<(), String> {
    let mut acc = String::new();
    let found = conn.recv_msg_matching(timeout, |m| {
        if m.hdr.proto == PROTO_SHELL && m.hdr.typ == "shell" {
            acc.push_str(&String::from_utf8_lossy(
                m.body.as_deref().unwrap_or_default(),
            ));
        }
        acc.contains(needle)
    });
    match found {
        Some(_) => Ok(()),
        None => Err(format!("no {needle:?} in the shell output {acc:?}")),
    }
}

fn session(conn: &ConnHandle, t: Duration) -> Result<(), String> {
    conn.send_msg(
        &ProtoMsg::new(PROTO_CONTROL, "open", SID).with_body(Open { versions: vec![1] }.encode()),
    );
    wait_msg(conn, t, |m| {
        m.hdr.proto == PROTO_CONTROL && m.hdr.typ == "accept"
    })
    .map_err(|e| format!("control accept: {e}"))?;
    conn.send_msg(&shell_msg("new"));
    let r = wait_msg(conn, t, |m| {
        m.hdr.proto == PROTO_SHELL && m.hdr.typ == "new"
    })
    .map_err(|e| format!("shell new: {e}"))?;
    if r.prop("status").and_then(Value::as_i64) != Some(1) {
        return Err(format!("shell new failed: {r:?}"));
    }
    // the marker appears only once the shell has expanded it, not in the echo
    conn.send_msg(&shell_msg("shell").with_body(b"echo ok-$((40+2))\n".to_vec()));
    wait_output(conn, t, "ok-42")?;
    conn.send_msg(&shell_msg("stop"));
    wait_msg(conn, t, |m| {
        m.hdr.proto == PROTO_SHELL && m.hdr.typ == "stop"
    })
    .map_err(|e| format!("shell stop: {e}"))?;
    Ok(())
}

fn run(args: &Args, daemon: &mut Daemon, server: &Server) -> Result<String, String> {
    let t0 = Instant::now();
    let conn = server
        .wait_connection(args.timeout)
        .ok_or("the daemon never connected")?;
    let connected = t0.elapsed();
    // a measurement pause (guest RSS while connected and idle), not a synchronisation
    std::thread::sleep(args.idle);
    if daemon.try_status().is_some() {
        return Err("the daemon exited while idle".into());
    }
    let t1 = Instant::now();
    session(&conn, args.timeout)?;
    let shell = t1.elapsed();
    daemon.signal(libc::SIGTERM);
    match daemon.wait_exit(args.timeout) {
        Some(s) if s.success() => {}
        Some(s) => return Err(format!("daemon exited with {s} on SIGTERM")),
        None => return Err("daemon did not exit on SIGTERM".into()),
    }
    Ok(format!(
        "connected after {:.1} s, shell session (open, echo, stop) {:.1} s, clean exit on SIGTERM",
        connected.as_secs_f64(),
        shell.as_secs_f64()
    ))
}

fn main() {
    let args = parse_args();
    let bus = DbusDaemon::start();
    let cert = args.tls.then(TlsCert::generate);
    let server = match &cert {
        Some(c) => Server::start_tls(c),
        None => Server::start_plain(),
    };
    let auth = AuthService::start(bus.address(), "check-token", &server.url());
    let mut cfg: serde_json::Value =
        serde_json::from_str(&testbed::default_config()).expect("config");
    // dash rejects the default `--login`
    cfg["ShellArguments"] = serde_json::json!([]);
    let env: Vec<(&str, &str)> = cert.iter().map(TlsCert::env).collect();
    let mut daemon =
        Daemon::spawn_with_binary(&args.daemon, &cfg.to_string(), bus.address(), &env, true);
    let result = run(&args, &mut daemon, &server);
    let code = match result {
        Ok(what) => {
            let over = if args.tls { "wss" } else { "ws" };
            println!("shell_check: OK {} ({over}): {what}", args.daemon.display());
            0
        }
        Err(e) => {
            daemon.dump_log();
            eprintln!("shell_check: FAIL {}: {e}", args.daemon.display());
            1
        }
    };
    drop(daemon);
    drop(auth);
    drop(server);
    drop(bus);
    drop(cert);
    std::process::exit(code);
}
