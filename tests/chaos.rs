//! Chaos tests (issue 7): the daemon must ride out a server restart, a network
//! blackhole and a slow, lossy link without a restart and without losing data.
//!
//! - Server restart runs on loopback (no privileges needed).
//! - Blackhole and lossy link run the daemon in its own network namespace,
//!   joined to the server's namespace by an emulated link
//!   (`testbed/src/netlab.rs`); they skip with a message unless root.
//!
//! Default run ≈ 2–3 min. `CHAOS_FULL=1` makes the blackhole last 60 s (the
//! issue's figure) instead of 20 s.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use testbed::drive;
use testbed::hold;
use testbed::netlab::{Impair, NetLab};
use testbed::{
    AuthService, ConnHandle, Daemon, DbusDaemon, Server, TIMEOUT, TempDir, default_config,
};

/// Transfer size over the lossy link.
const LOSSY_BYTES: usize = 10 << 20;
/// Per-message wait over the lossy link: TCP's retransmission back-off after
/// a run of losses can take several seconds.
const LOSSY_WAIT: Duration = Duration::from_secs(90);

fn config() -> String {
    let mut cfg: serde_json::Value = serde_json::from_str(&default_config()).expect("config");
    cfg["ShellArguments"] = serde_json::json!([]);
    // a shell whose stop was lost with a cut link still counts
    cfg["Sessions"] = serde_json::json!({ "MaxPerUser": 8 });
    cfg.to_string()
}

/// Opens session `sid` with a shell and runs one command through it.
fn shell_works(conn: &ConnHandle, sid: &str, wait: Duration) -> Result<(), String> {
    drive::open_session(conn, sid, wait)?;
    drive::shell_open(conn, sid, wait)?;
    drive::shell_run_until(conn, sid, "echo OK$((40+2))\n", b"OK42", wait)?;
    drive::shell_stop(conn, sid, wait)?;
    drive::close_session(conn, sid);
    Ok(())
}

fn skip(why: &str) {
    eprintln!("SKIPPED: {why}");
}

#[test]
fn server_restart_reconnects_within_the_backoff_bound() {
    let bus = DbusDaemon::start();
    let mut server = Server::start_plain();
    let port = server.port();
    let _auth = AuthService::start(bus.address(), "chaos", &server.url());
    let mut daemon = Daemon::spawn(&config(), bus.address(), &[]);
    let pid = daemon.pid();
    server.wait_connection(TIMEOUT).expect("first connection");

    // An immediate restart: the first retry comes within the base interval
    // (ReconnectIntervalSeconds = 1 → at most 1 s), plus handshake slack.
    server.stop();
    let t = Instant::now();
    server = Server::start_plain_on(port);
    let conn = server
        .wait_connection(Duration::from_secs(3))
        .expect("reconnected within 1 s back-off + slack");
    eprintln!("immediate restart: reconnected in {:?}", t.elapsed());
    shell_works(&conn, "c0000000-0000-4000-8000-000000000001", TIMEOUT).expect("shell");

    // Down for 5 s: retries at ≤ 1, 2, 4, 8 s intervals (equal jitter), so the
    // attempt in flight when the server returns waits at most 8 s.
    server.stop();
    hold(Duration::from_secs(5));
    let t = Instant::now();
    server = Server::start_plain_on(port);
    let conn = server
        .wait_connection(Duration::from_secs(10))
        .expect("reconnected within the back-off ceiling");
    eprintln!(
        "5 s outage: reconnected {:?} after the restart",
        t.elapsed()
    );
    shell_works(&conn, "c0000000-0000-4000-8000-000000000002", TIMEOUT).expect("shell");
    assert!(daemon.try_status().is_none(), "daemon exited");
    assert_eq!(daemon.pid(), pid);
}

/// The daemon in the lab's device namespace, connected through the link.
struct LabBed {
    lab: NetLab,
    server: Server,
    daemon: Daemon,
    _auth: AuthService,
    _bus: DbusDaemon,
}

impl LabBed {
    fn start() -> Option<LabBed> {
        let bin = testbed::daemon::binary().expect("binary under test");
        LabBed::start_with(Path::new(bin))
    }

    /// The lab with daemon binary `bin` (ours, or the Go one for a bench).
    fn start_with(bin: &Path) -> Option<LabBed> {
        let lab = match NetLab::new() {
            Ok(l) => l,
            Err(e) => {
                skip(&e);
                return None;
            }
        };
        let bus = DbusDaemon::start();
        let server = Server::start_plain();
        let url = lab.forward_to(server.port());
        let auth = AuthService::start(bus.address(), "chaos", &url);
        let daemon =
            Daemon::spawn_with_binary(&lab.dev_wrapper(bin), &config(), bus.address(), &[], true);
        Some(LabBed {
            lab,
            server,
            daemon,
            _auth: auth,
            _bus: bus,
        })
    }
}

impl LabBed {
    /// Runs a shell on whichever connection is newest (the old one if it
    /// survived, or the daemon's reconnection) until one works or
    /// `deadline`; session ids start with `tag`. Each try is short so a
    /// dead link is abandoned.
    fn shell_on_newest_connection(&self, tag: char, deadline: Instant) -> Result<(), String> {
        let mut n = 0;
        let mut last_err = String::new();
        loop {
            if Instant::now() >= deadline {
                return Err(format!(
                    "connections: {}; last error: {last_err}",
                    self.server.connection_count()
                ));
            }
            let count = self.server.connection_count();
            if let Some(conn) = count.checked_sub(1).and_then(|i| self.server.connection(i)) {
                n += 1;
                let sid = format!("{tag}0000000-0000-4000-8000-{n:012}");
                let left = deadline.saturating_duration_since(Instant::now());
                match shell_works(&conn, &sid, left.min(Duration::from_secs(5))) {
                    Ok(()) => return Ok(()),
                    Err(e) => last_err = e,
                }
            }
            // a new connection may be on its way; wait for one or the next try
            self.server
                .wait_connection_count(count + 1, Duration::from_millis(500));
        }
    }
}

impl LabBed {
    /// After an outage of `outage`, a working shell by `deadline`.
    fn shell_after_link_up(&self, outage: Duration, deadline: Instant) -> Result<(), String> {
        // past the 60 s pong wait the daemon has given the old link up, so
        // the shell must come over its reconnection (trying the dead one
        // first would only measure the test's own timeout)
        if outage > Duration::from_secs(60) {
            let left = deadline.saturating_duration_since(Instant::now());
            if !self.server.wait_connection_count(2, left) {
                return Err("no reconnection".to_string());
            }
        }
        self.shell_on_newest_connection('b', deadline)
    }
}

/// upstream's `test_in_poor_network_environment` outage; `CHAOS_OUTAGE_S`
/// shortens it for a quick local run.
fn link_outage() -> Duration {
    let s = std::env::var("CHAOS_OUTAGE_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128);
    Duration::from_secs(s)
}

// The two long tests (this one and the lossy link) are named to sort first:
// libtest starts tests in name order, so with two test threads both start at
// once and the short ones follow on whichever thread frees up first.
#[test]
fn a_128s_link_outage_then_a_shell_works_within_5s_of_link_up_without_restart() {
    let Some(bed) = LabBed::start() else {
        return;
    };
    let outage = link_outage();
    let conn = bed.server.wait_connection(TIMEOUT).expect("connected");
    shell_works(&conn, "a0000000-0000-4000-8000-000000000001", TIMEOUT).expect("shell before");
    let pid = bed.daemon.pid();

    bed.lab.set_dev_link(false).expect("link down");
    hold(outage);
    bed.lab.set_dev_link(true).expect("link up");
    let up = Instant::now();
    let result = bed.shell_after_link_up(outage, up + Duration::from_secs(20));
    let took = up.elapsed();
    eprintln!(
        "{outage:?} link outage: shell works {took:?} after link-up (connections: {})",
        bed.server.connection_count()
    );
    result.expect("a working shell after link-up");
    assert!(
        took <= Duration::from_secs(5),
        "shell took {took:?} after link-up (bound 5 s)"
    );
    assert!(bed.daemon.log().contains("network change"));
    let mut bed = bed;
    assert!(bed.daemon.try_status().is_none(), "daemon exited");
    assert_eq!(bed.daemon.pid(), pid, "daemon restarted");
}

/// Link down for the outage, up again: how long until a shell works.
fn outage_recovery(bin: &Path, outage: Duration) -> Result<Duration, String> {
    let bed = LabBed::start_with(bin).ok_or("no lab")?;
    // the Go daemon waits about 10 s before its first connection
    let conn = bed
        .server
        .wait_connection(Duration::from_secs(60))
        .ok_or("never connected")?;
    shell_works(&conn, "a0000000-0000-4000-8000-000000000001", TIMEOUT)?;
    bed.lab.set_dev_link(false)?;
    hold(outage);
    bed.lab.set_dev_link(true)?;
    let up = Instant::now();
    bed.shell_after_link_up(outage, up + Duration::from_secs(180))?;
    Ok(up.elapsed())
}

/// A bench, not a timed test: with `CHAOS_BENCH_GO=<Go mender-connect 2.1.0
/// binary>` it prints the time from link-up to a working shell after the
/// outage for ours and the Go daemon, each in its own lab, side by side.
#[test]
fn bench_link_outage_recovery_ours_and_go_side_by_side() {
    let Some(go) = std::env::var_os("CHAOS_BENCH_GO") else {
        return skip("bench: set CHAOS_BENCH_GO=<path of Go mender-connect> to run it");
    };
    let outage = link_outage();
    let ours = std::path::PathBuf::from(testbed::daemon::binary().expect("binary under test"));
    let runs = [("ours", ours), ("Go 2.1.0", std::path::PathBuf::from(go))].map(|(name, bin)| {
        (
            name,
            std::thread::spawn(move || outage_recovery(&bin, outage)),
        )
    });
    for (name, run) in runs {
        match run.join().expect("bench thread") {
            Ok(d) => {
                eprintln!("BENCH {outage:?} link outage, link-up -> working shell: {name}: {d:?}")
            }
            Err(e) => eprintln!("BENCH {outage:?} link outage: {name}: failed: {e}"),
        }
    }
}

#[test]
fn blackhole_then_a_shell_works_within_30s_without_restart() {
    let Some(mut bed) = LabBed::start() else {
        return;
    };
    let outage = if std::env::var("CHAOS_FULL").is_ok_and(|v| v == "1") {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(20)
    };
    let conn = bed.server.wait_connection(TIMEOUT).expect("connected");
    shell_works(&conn, "d0000000-0000-4000-8000-000000000001", TIMEOUT).expect("shell before");
    let pid = bed.daemon.pid();

    bed.lab.blackhole(true);
    hold(outage);
    bed.lab.blackhole(false);
    let lifted = Instant::now();

    if let Err(e) = bed.shell_on_newest_connection('d', lifted + Duration::from_secs(30)) {
        panic!("no working shell 30 s after a {outage:?} blackhole lifted: {e}");
    }
    eprintln!(
        "{outage:?} blackhole: shell works {:?} after it lifted (connections: {})",
        lifted.elapsed(),
        bed.server.connection_count()
    );
    assert!(bed.daemon.try_status().is_none(), "daemon exited");
    assert_eq!(bed.daemon.pid(), pid, "daemon restarted");
}

/// integration's `test_in_poor_network_environment`: an operator's working
/// shell (start, prompt, `ls /`) through the management stand-in before and
/// after the device's traffic is dropped — upstream drops it 128 s
/// (`CHAOS_FULL=1`; 20 s by default) and then restarts the daemon; here the
/// same daemon must recover on its own.
#[test]
fn test_in_poor_network_environment() {
    use testbed::operator::{Operator, STATUS_NORMAL, prompt, status};
    let Some(mut bed) = LabBed::start() else {
        return;
    };
    let outage = if std::env::var("CHAOS_FULL").is_ok_and(|v| v == "1") {
        Duration::from_secs(128)
    } else {
        Duration::from_secs(20)
    };
    let mgmt = testbed::Management::start(&bed.server);
    let receive = Duration::from_secs(16);
    let working_shell = || -> Result<(), String> {
        let mut ws = Operator::connect(&mgmt)?;
        let m = ws.request("new", receive)?;
        if status(&m) != Some(STATUS_NORMAL) || m.body.as_deref() != Some(&b"Shell started"[..]) {
            return Err(format!("shell not started: {m:?}"));
        }
        ws.output_until(receive, prompt)?;
        ws.send("shell", b"ls /\n")?;
        ws.output_until(receive, |o| o.contains("usr") && o.contains("etc"))?;
        ws.request("stop", receive).map(|_| ())
    };
    // upstream retries the whole sequence every 5 s, 48 times
    let retry = |what: &str, limit: Duration| {
        let deadline = Instant::now() + limit;
        let mut last = String::new();
        while Instant::now() < deadline {
            match working_shell() {
                Ok(()) => return,
                Err(e) => last = e,
            }
            mgmt.wait_device(Duration::from_secs(1));
        }
        panic!("no working shell {what} within {limit:?}: {last}");
    };
    assert!(mgmt.wait_device(TIMEOUT), "daemon never connected");
    retry("before the outage", TIMEOUT);
    let pid = bed.daemon.pid();
    bed.lab.blackhole(true);
    hold(outage);
    bed.lab.blackhole(false);
    retry("after the outage", Duration::from_secs(60));
    assert!(bed.daemon.try_status().is_none(), "daemon exited");
    assert_eq!(bed.daemon.pid(), pid, "daemon restarted");
}

#[test]
fn a_lossy_link_still_transfers_complete_and_intact() {
    let Some(bed) = LabBed::start() else {
        return;
    };
    let conn = bed.server.wait_connection(TIMEOUT).expect("connected");
    // netem "delay 100ms 50ms loss 5%" on both directions
    let bad = Impair {
        delay: Duration::from_millis(100),
        jitter: Duration::from_millis(50),
        loss: 0.05,
    };
    bed.lab.impair(bad, bad);

    // port forward, target (in the device namespace) → client
    let t = Instant::now();
    let sid = "e0000000-0000-4000-8000-000000000001";
    drive::open_session(&conn, sid, LOSSY_WAIT).expect("open");
    let l = bed.lab.dev_listener();
    let addr: SocketAddr = l.local_addr().expect("addr");
    let src = drive::pf_source(l, LOSSY_BYTES);
    drive::pf_new(&conn, sid, "lossy", addr, LOSSY_WAIT).expect("new");
    let (got, msgs) = drive::pf_receive(&conn, sid, "lossy", LOSSY_WAIT).expect("port forward");
    assert_eq!(got, LOSSY_BYTES, "port-forward bytes");
    src.join().expect("source");
    drive::close_session(&conn, sid);
    eprintln!(
        "port forward 10 MiB intact in {:?} ({msgs} forwards)",
        t.elapsed()
    );

    // file download and upload
    let dir = TempDir::new("chaos-ft");
    let src = dir.join("src.bin");
    let data = drive::pattern(0, LOSSY_BYTES);
    std::fs::write(&src, &data).expect("write");
    let t = Instant::now();
    let sid = "e0000000-0000-4000-8000-000000000002";
    drive::open_session(&conn, sid, LOSSY_WAIT).expect("open");
    let got = drive::ft_download(&conn, sid, &src, LOSSY_WAIT).expect("download");
    assert!(got == data, "download differs ({} bytes)", got.len());
    drive::close_session(&conn, sid);
    eprintln!("file download 10 MiB intact in {:?}", t.elapsed());

    let t = Instant::now();
    let sid = "e0000000-0000-4000-8000-000000000003";
    let dst = dir.join("dst.bin");
    drive::open_session(&conn, sid, LOSSY_WAIT).expect("open");
    drive::ft_upload(&conn, sid, &dst, &data, LOSSY_WAIT).expect("upload");
    drive::close_session(&conn, sid);
    assert!(
        std::fs::read(&dst).is_ok_and(|d| d == data),
        "upload differs"
    );
    eprintln!("file upload 10 MiB intact in {:?}", t.elapsed());
    let (dropped, passed) = bed.lab.counters();
    eprintln!("link: {dropped} packets dropped, {passed} passed");
    assert!(conn.is_open(), "the connection survived the lossy link");
}
