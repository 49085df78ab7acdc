//! HTTP proxies from the environment (issue 12): the websocket goes through
//! a real `tinyproxy`'s `CONNECT` tunnel to a server name only the proxy can
//! resolve, TLS runs inside the tunnel, a refusing proxy is a clear error
//! with back-off, and loopback and `NO_PROXY` hosts are dialed directly.
//!
//! The parts that need a private `/etc/hosts` (a mount namespace) print
//! SKIPPED without root.

use std::net::TcpListener;

use testbed::tinyproxy::TinyProxy;
use testbed::{
    AuthService, ConnHandle, Daemon, DbusDaemon, Server, TIMEOUT, TempDir, TlsCert, drive,
};

/// Resolvable only inside tinyproxy's (or a test daemon's) mount namespace;
/// `.test` never resolves in public DNS (RFC 6761).
const HIDDEN_NAME: &str = "mender.proxy.test";

fn skip(why: &str) {
    eprintln!("SKIPPED: {why}");
}

fn config() -> String {
    let mut cfg: serde_json::Value =
        serde_json::from_str(&testbed::default_config()).expect("config");
    cfg["ShellArguments"] = serde_json::json!([]);
    cfg.to_string()
}

/// Opens session `sid` with a shell and runs one command through it.
fn shell_works(conn: &ConnHandle, sid: &str) -> Result<(), String> {
    drive::open_session(conn, sid, TIMEOUT)?;
    drive::shell_open(conn, sid, TIMEOUT)?;
    drive::shell_run_until(conn, sid, "echo OK$((40+2))\n", b"OK42", TIMEOUT)?;
    drive::shell_stop(conn, sid, TIMEOUT)?;
    drive::close_session(conn, sid);
    Ok(())
}

/// A loopback port nobody listens on (a dead proxy).
fn dead_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn wss_runs_through_the_proxy_tunnel_with_credentials_to_a_name_only_the_proxy_resolves() {
    let creds = ("fleet", "s3cret");
    let proxy = match TinyProxy::start(&[(HIDDEN_NAME, "127.0.0.1")], Some(creds)) {
        Ok(p) => p,
        Err(e) => return skip(&e),
    };
    let cert = TlsCert::generate_for(&[HIDDEN_NAME]);
    let server = Server::start_tls(&cert);
    let url = format!("https://{HIDDEN_NAME}:{}", server.port());
    let bus = DbusDaemon::start();
    let _auth = AuthService::start(bus.address(), "proxied-token", &url);
    let https_proxy = proxy.url(Some(creds));
    let daemon = Daemon::spawn(
        &config(),
        bus.address(),
        &[
            cert.env(),
            ("HTTPS_PROXY", https_proxy.as_str()),
            // must not be used for an https URL
            ("HTTP_PROXY", "http://127.0.0.1:1"),
        ],
    );
    let conn = server
        .wait_connection(TIMEOUT)
        .expect("connected through the proxy");
    assert_eq!(conn.authorization(), Some("Bearer proxied-token"));
    shell_works(&conn, "f0000000-0000-4000-8000-000000000001").expect("shell over the tunnel");
    assert!(
        proxy
            .log()
            .contains(&format!("{HIDDEN_NAME}:{}", server.port())),
        "tinyproxy did not log the CONNECT"
    );
    drop(daemon);
}

#[test]
fn a_proxy_refusing_the_tunnel_is_logged_with_its_name_and_status_and_retried() {
    let proxy = match TinyProxy::start(&[(HIDDEN_NAME, "127.0.0.1")], Some(("u", "right"))) {
        Ok(p) => p,
        Err(e) => return skip(&e),
    };
    let server = Server::start_plain();
    let url = format!("http://{HIDDEN_NAME}:{}", server.port());
    let bus = DbusDaemon::start();
    let _auth = AuthService::start(bus.address(), "t", &url);
    let http_proxy = proxy.url(Some(("u", "wrong")));
    let mut daemon = Daemon::spawn(
        &config(),
        bus.address(),
        &[("http_proxy", http_proxy.as_str())],
    );
    // tinyproxy answers a CONNECT with bad credentials 401 (plain requests 407)
    let expected = format!(
        "proxy http://127.0.0.1:{} refused CONNECT {HIDDEN_NAME}:{}: HTTP 401 Unauthorized",
        proxy.port(),
        server.port()
    );
    assert!(daemon.wait_log(&expected, TIMEOUT), "no refusal line");
    // ReconnectIntervalSeconds 1: the second try comes within ~1 s
    assert!(
        testbed::wait_until(TIMEOUT, || daemon.log_count(&expected) >= 2),
        "not retried"
    );
    assert!(
        !daemon.log().contains("wrong"),
        "password leaked to the log"
    );
    assert_eq!(server.attempt_count(), 0);
    assert!(daemon.try_status().is_none(), "daemon exited");
}

#[test]
fn loopback_servers_bypass_the_proxy() {
    let server = Server::start_plain();
    let bus = DbusDaemon::start();
    let _auth = AuthService::start(bus.address(), "t", &server.url());
    let dead = format!("http://127.0.0.1:{}", dead_port());
    let _daemon = Daemon::spawn(
        &config(),
        bus.address(),
        &[
            ("HTTP_PROXY", dead.as_str()),
            ("HTTPS_PROXY", dead.as_str()),
        ],
    );
    server
        .wait_connection(TIMEOUT)
        .expect("dialed 127.0.0.1 directly despite HTTP_PROXY");
}

#[test]
fn no_proxy_suffix_sends_the_daemon_direct_and_without_it_the_proxy_is_used() {
    if !is_root() {
        return skip("needs root (a mount namespace for the daemon's /etc/hosts)");
    }
    let dir = TempDir::new("noproxy");
    let wrapper = testbed::hosts::daemon_wrapper(
        &dir,
        &format!("127.0.0.1 localhost\n127.0.0.1 {HIDDEN_NAME}\n"),
    );
    let server = Server::start_plain();
    let url = format!("http://{HIDDEN_NAME}:{}", server.port());
    let bus = DbusDaemon::start();
    let _auth = AuthService::start(bus.address(), "t", &url);
    let dead_port = dead_port();
    let dead = format!("http://127.0.0.1:{dead_port}");

    // control: the name is not loopback, so the (dead) proxy is used
    let mut daemon = Daemon::spawn_with_binary(
        &wrapper,
        &config(),
        bus.address(),
        &[("HTTP_PROXY", dead.as_str())],
        true,
    );
    assert!(
        daemon.wait_log(
            &format!("connecting to proxy http://127.0.0.1:{dead_port}"),
            TIMEOUT
        ),
        "the proxy was not tried"
    );
    assert_eq!(server.attempt_count(), 0);
    drop(daemon);

    // `.proxy.test` in NO_PROXY: direct
    let _daemon = Daemon::spawn_with_binary(
        &wrapper,
        &config(),
        bus.address(),
        &[
            ("HTTP_PROXY", dead.as_str()),
            ("no_proxy", "example.com, .proxy.test"),
        ],
        true,
    );
    server
        .wait_connection(TIMEOUT)
        .expect("dialed directly because of NO_PROXY");
}
