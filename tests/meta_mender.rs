//! meta-mender's acceptance flow (`tests/acceptance/test_mender-connect.py`),
//! which drives the daemon with D-Bus signals and greps its journal for Go's
//! exact lines. Here the journal is the daemon's stderr; the auth service,
//! the two servers on `localhost:<port>` and the bus are the test bed's.

use std::path::Path;
use std::time::Duration;

use testbed::{AuthService, Daemon, DbusDaemon, Server, TIMEOUT, TempDir, default_config};

/// How long one step may take (upstream waits 30 s; a loaded machine needs
/// far less, the daemon reconnects at once on a signal).
const STEP: Duration = Duration::from_secs(20);

fn localhost(server: &Server) -> String {
    format!("http://localhost:{}", server.port())
}

/// Waits for one more occurrence of `line` than there were in `before`.
fn wait_new(daemon: &mut Daemon, line: &str, before: usize, timeout: Duration) {
    let ok = testbed::wait_until(timeout, || daemon.log_count(line) > before);
    if !ok {
        daemon.dump_log();
        panic!("no new {line:?} within {timeout:?}");
    }
}

/// Sets the token and URL and emits the signal, then waits for the exact
/// `eventLoop: Connection established with <url>` line, and checks the
/// server saw the new token.
fn signal_and_expect_connected(
    daemon: &mut Daemon,
    auth: &AuthService,
    server: &Server,
    token: &str,
) {
    let url = localhost(server);
    let line = format!("eventLoop: Connection established with {url}");
    let before = daemon.log_count(&line);
    let conns = server.connection_count();
    auth.set(token, &url);
    wait_new(daemon, &line, before, STEP);
    assert!(server.wait_connection_count(conns + 1, TIMEOUT));
    let conn = server.connection(conns).expect("the new connection");
    assert_eq!(
        conn.authorization(),
        Some(format!("Bearer {token}").as_str())
    );
}

#[test]
fn test_mender_connect_auth_changes() {
    let bus = DbusDaemon::start();
    let five = Server::start_plain();
    let six = Server::start_plain();
    let auth = AuthService::start(bus.address(), "token1", &localhost(&five));
    let mut daemon = Daemon::spawn(&default_config(), bus.address(), &[]);
    let first = format!(
        "eventLoop: Connection established with {}",
        localhost(&five)
    );
    wait_new(&mut daemon, &first, 0, STEP);
    // 1. token, 2. URL, 3. both
    signal_and_expect_connected(&mut daemon, &auth, &five, "token2");
    signal_and_expect_connected(&mut daemon, &auth, &six, "token2");
    signal_and_expect_connected(&mut daemon, &auth, &five, "token3");
    // 4. unauthorize, then re-authorize
    let terminated = "dbusEventLoop terminated 0 sessions, 0 shells";
    auth.set("", "");
    wait_new(&mut daemon, terminated, 0, STEP);
    signal_and_expect_connected(&mut daemon, &auth, &six, "token4");
}

#[test]
fn test_mender_connect_reconnect() {
    let bus = DbusDaemon::start();
    let five = Server::start_plain();
    let mut six = Server::start_plain();
    // a port where nothing listens: bind, note, close
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let dead = format!("http://localhost:{dead_port}");
    let auth = AuthService::start(bus.address(), "badtoken", &dead);
    let mut daemon = Daemon::spawn(&default_config(), bus.address(), &[]);
    // upstream allows 300 s; we retry from 1 s, so a few seconds must do
    let failed = format!(
        "connection manager failed to connect to {dead}{}: ",
        testbed::CONNECT_PATH
    );
    wait_new(&mut daemon, &failed, 0, Duration::from_secs(5));
    let log = daemon.log();
    let line = log.lines().find(|l| l.contains(&failed)).expect("line");
    assert!(line.contains("; len(token)=8\""), "{line}");
    assert!(daemon.log_count("eventLoop: error reconnecting: ") >= 1);
    // a good token on a live server connects
    signal_and_expect_connected(&mut daemon, &auth, &six, "goodtoken");
    // empty credentials without a signal, then the server dies: the
    // reconnect finds nothing to connect with and says so
    auth.set_quietly("", "");
    let before = daemon.log_count("error reconnecting:");
    six.stop();
    wait_new(&mut daemon, "error reconnecting:", before, STEP);
    // a signal naming the other server connects there
    signal_and_expect_connected(&mut daemon, &auth, &five, "goodtoken");
}

#[test]
fn unauthorizing_with_a_shell_open_reports_it_terminated() {
    // Debian's /bin/sh (dash) refuses the default `--login` and exits at
    // once; the shell must still be open when the token goes
    let mut cfg: serde_json::Value = serde_json::from_str(&default_config()).expect("config");
    cfg["ShellArguments"] = serde_json::json!([]);
    let c = testbed::env::connected(&cfg.to_string(), &[], "token-sh");
    let mut daemon = c.daemon;
    let sid = "6f1c0d2e-0000-4000-8000-00000000d00d";
    testbed::drive::shell_open(&c.conn, sid, TIMEOUT).expect("shell");
    c.auth.set("", "");
    wait_new(
        &mut daemon,
        "dbusEventLoop terminated 1 sessions, 1 shells",
        0,
        STEP,
    );
}

#[test]
fn localhost_connects_when_it_resolves_to_v6_first_and_the_server_listens_on_v4_only() {
    if !testbed::hosts::can_unshare_mounts() {
        eprintln!("SKIPPED: needs root and unshare -m");
        return;
    }
    let dir = TempDir::new("dualstack");
    // localhost names ::1 first and 127.0.0.1 second
    let wrapper = testbed::hosts::daemon_wrapper(&dir, "::1 localhost\n127.0.0.1 localhost\n");
    let bus = DbusDaemon::start();
    let server = Server::start_plain(); // 127.0.0.1 only
    let url = localhost(&server);
    let _auth = AuthService::start(bus.address(), "token-v4", &url);
    let mut daemon = Daemon::spawn_with_binary(
        Path::new(&wrapper),
        &default_config(),
        bus.address(),
        &[],
        true,
    );
    let line = format!("eventLoop: Connection established with {url}");
    wait_new(&mut daemon, &line, 0, STEP);
    assert!(server.wait_connection(TIMEOUT).is_some());
    // ::1 was tried first and refused: the fallback is what connected
    assert!(
        daemon.log_count(&format!("connecting to [::1]:{}: ", server.port())) >= 1,
        "::1 was never tried"
    );
}
