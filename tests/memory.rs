//! Memory after bursts (issue 17): large inbound messages, a fast port
//! forward, a file download and a flood of shell output must leave the
//! daemon's RSS within `SLACK_KIB` of its idle figure within `SETTLE` of the
//! burst's end; rounds of large messages must not make it grow, and hold at
//! most two at once while the client waits for acks (one per stage of the
//! inbound path when it does not).
//!
//! Each test prints `memory:` lines with its figures (idle, peak = VmHWM
//! during the burst, after). `MEMORY_BINARY=path` measures another build of
//! the daemon (a release build, or an older one for comparison).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mender_connect::wire::codec::{PROTO_PORTFORWARD, ProtoMsg, Value};
use testbed::drive;
use testbed::target::TcpTarget;
use testbed::{AuthService, ConnHandle, Daemon, DbusDaemon, Server, TIMEOUT, TempDir};

/// 1 KiB under the 16 MiB inbound message limit, so header and props fit.
const LARGE: usize = (16 << 20) - 1024;
const LARGE_KIB: u64 = (LARGE / 1024) as u64;
const SLACK_KIB: u64 = 512;
/// Allowed growth of the settled RSS from the first round to the last.
const GROWTH_KIB: u64 = 128;
const SETTLE: Duration = Duration::from_secs(5);
/// For whole bursts on a loaded machine (debug build).
const LONG: Duration = Duration::from_secs(120);
const FIFTY_MIB: usize = 50 << 20;

fn rss_kib(pid: u32) -> u64 {
    drive::proc_kib(pid, "status", "VmRSS:").unwrap_or(0)
}

/// Session threads of the daemon (router, shell, file transfer, forward).
fn session_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .filter(|c| {
            ["sess-", "shell-", "ft-", "pf-"]
                .iter()
                .any(|p| c.starts_with(p))
        })
        .count()
}

struct Bed {
    conn: ConnHandle,
    daemon: Daemon,
    _server: Server,
    _auth: AuthService,
    _bus: DbusDaemon,
    /// A port-forward target that reads and drops everything.
    sink: TcpTarget,
    dir: TempDir,
    idle: u64,
}

/// What one burst did to the daemon's RSS.
struct Figures {
    peak: u64,
    after: u64,
}

fn binary() -> PathBuf {
    std::env::var_os("MEMORY_BINARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(testbed::daemon::binary().expect("integration test binary"))
        })
}

/// A connected daemon that has served one small instance of everything the
/// tests run, so lazily made state and thread stacks count as idle.
fn bed() -> Bed {
    let mut cfg: serde_json::Value =
        serde_json::from_str(&testbed::default_config()).expect("config");
    // dash (/bin/sh here) rejects the default `--login`
    cfg["ShellArguments"] = serde_json::json!([]);
    let bus = DbusDaemon::start();
    let server = Server::start_plain();
    let auth = AuthService::start(bus.address(), "token-memory", &server.url());
    // no -d: a debug line per message would be part of what is measured
    let daemon = Daemon::spawn_with_binary(&binary(), &cfg.to_string(), bus.address(), &[], false);
    let Some(conn) = server.wait_connection(TIMEOUT) else {
        daemon.dump_log();
        panic!("daemon never connected");
    };
    let sink = TcpTarget::start(|mut s| {
        let mut buf = vec![0; 256 * 1024];
        while let Ok(n) = std::io::Read::read(&mut s, &mut buf) {
            if n == 0 {
                return;
            }
        }
    });
    let mut b = Bed {
        conn,
        daemon,
        _server: server,
        _auth: auth,
        _bus: bus,
        sink,
        dir: TempDir::new("memory"),
        idle: 0,
    };
    b.pf_to_sink("warm-pf", "c0");
    drive::pf_send(&b.conn, "warm-pf", "c0", 4096, 4096, TIMEOUT).expect("warm forward");
    drive::pf_stop(&b.conn, "warm-pf", "c0", TIMEOUT).expect("warm stop");
    drive::close_session(&b.conn, "warm-pf");
    let src = b.dir.join("warm.bin");
    std::fs::write(&src, drive::pattern(0, 100_000)).expect("warm file");
    drive::open_session(&b.conn, "warm-ft", TIMEOUT).expect("ft session");
    drive::ft_download(&b.conn, "warm-ft", &src, TIMEOUT).expect("warm download");
    drive::close_session(&b.conn, "warm-ft");
    drive::shell_open(&b.conn, "warm-sh", TIMEOUT).expect("warm shell");
    drive::shell_run_until(&b.conn, "warm-sh", "echo W$((1+1))W\n", b"W2W", TIMEOUT)
        .expect("warm output");
    drive::shell_stop(&b.conn, "warm-sh", TIMEOUT).expect("warm shell stop");
    let pid = b.pid();
    let mut idle = rss_kib(pid);
    let quiet = testbed::wait_until(TIMEOUT, || {
        let before = idle;
        idle = rss_kib(pid);
        session_threads(pid) == 0 && idle == before
    });
    assert!(quiet, "warm-up sessions still running");
    b.idle = idle;
    eprintln!("memory: idle {idle} KiB ({})", binary().display());
    b
}

impl Bed {
    fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    /// Runs `burst`, then waits up to `SETTLE` for RSS to come back within
    /// `SLACK_KIB` of idle and asserts it did. The peak is VmHWM, reset
    /// before the burst where the kernel lets us.
    fn burst(&mut self, what: &str, burst: impl FnOnce(&mut Bed)) -> Figures {
        let pid = self.pid();
        // "5" resets the peak RSS to the current RSS
        let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
        burst(self);
        let ended = Instant::now();
        let peak = drive::proc_kib(pid, "status", "VmHWM:").unwrap_or(0);
        let mut after = rss_kib(pid);
        let settled = testbed::wait_until(SETTLE, || {
            after = rss_kib(pid);
            after <= self.idle + SLACK_KIB
        });
        eprintln!(
            "memory: {what:<44} idle {:>6} KiB, peak {:>6} KiB (+{:>6}), after {:>6} KiB ({:+}) in {:?}",
            self.idle,
            peak,
            peak.saturating_sub(self.idle),
            after,
            after as i64 - self.idle as i64,
            ended.elapsed()
        );
        assert!(
            settled,
            "{what}: RSS {after} KiB is still {} KiB over idle ({} KiB) {SETTLE:?} after the burst",
            after.saturating_sub(self.idle),
            self.idle
        );
        Figures { peak, after }
    }

    /// Port-forward connection `cid` on a new session `sid` to the sink.
    fn pf_to_sink(&self, sid: &str, cid: &str) {
        self.pf_to(sid, cid, self.sink.addr);
    }

    fn pf_to(&self, sid: &str, cid: &str, addr: std::net::SocketAddr) {
        drive::open_session(&self.conn, sid, TIMEOUT).expect("pf session");
        drive::pf_new(&self.conn, sid, cid, addr, TIMEOUT).expect("pf new");
    }

    /// Sends `n` large forwards without waiting for acks, then waits for
    /// `answers` answers (an ack, or an error once the daemon gave up on the
    /// connection).
    fn large_forwards_back_to_back(&self, sid: &str, cid: &str, n: usize, answers: usize) {
        let body = drive::pattern(0, LARGE);
        let msg = ProtoMsg::new(PROTO_PORTFORWARD, "forward", sid)
            .with_prop("connection_id", Value::Str(cid.into()))
            .with_prop("user_id", Value::Str("memory".into()))
            .with_body(body);
        for _ in 0..n {
            self.conn.send_msg(&msg);
        }
        let mut seen = 0;
        while seen < answers {
            let m = drive::recv_for(&self.conn, sid, LONG).expect("answer to a forward");
            if m.hdr.typ == "ack" || m.hdr.typ == "error" {
                seen += 1;
            }
        }
    }
}

#[test]
fn rounds_of_large_inbound_messages_return_rss_to_idle_without_growth() {
    let mut b = bed();
    b.pf_to_sink("large-pf", "c1");
    let mut settled = Vec::new();
    for round in 0..3 {
        let f = b.burst(
            &format!("20 x 16 MiB forwards (acked), round {round}"),
            |b| {
                for _ in 0..20 {
                    drive::pf_send(&b.conn, "large-pf", "c1", LARGE, LARGE, LONG)
                        .expect("large forward");
                }
            },
        );
        // one message in the connection thread, at most one more on its way
        assert!(
            f.peak <= b.idle + 2 * LARGE_KIB + SLACK_KIB,
            "peak {} KiB over idle {} KiB",
            f.peak,
            b.idle
        );
        settled.push(f.after);
    }
    assert!(
        settled[2] <= settled[0] + GROWTH_KIB,
        "RSS after each round grew: {settled:?} KiB"
    );
    drive::pf_stop(&b.conn, "large-pf", "c1", TIMEOUT).expect("stop");
}

#[test]
fn large_messages_back_to_back_hold_at_most_one_per_stage_and_rss_returns_to_idle() {
    let mut b = bed();
    b.pf_to_sink("burst-pf", "c2");
    let fast = b.burst("20 x 16 MiB forwards back to back", |b| {
        b.large_forwards_back_to_back("burst-pf", "c2", 20, 20)
    });
    // A target that reads nothing: the first forward stays unwritten (and
    // unacked), the next one breaks flow control and ends the connection,
    // the rest are answered `unknown connection`.
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = Arc::clone(&held);
    let stalled = TcpTarget::start(move |s| keep.lock().unwrap().push(s));
    b.pf_to("stall-pf", "c3", stalled.addr);
    let stall = b.burst("20 x 16 MiB back to back, target stalled", |b| {
        b.large_forwards_back_to_back("stall-pf", "c3", 20, 19)
    });
    held.lock().unwrap().clear();
    // A client that ignores acks can have one message at each stage: read
    // by the connection thread, queued for the session, handled by it, and
    // written to the target (typically 1.5 to 2.2 messages are seen).
    for (what, f) in [("fast target", fast), ("stalled target", stall)] {
        assert!(
            f.peak <= b.idle + 4 * LARGE_KIB + SLACK_KIB,
            "{what}: peak {} KiB, over four messages above idle {} KiB",
            f.peak,
            b.idle
        );
    }
}

#[test]
fn a_fast_50_mib_port_forward_each_way_returns_rss_to_idle() {
    let mut b = bed();
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let src = drive::pf_source(l, FIFTY_MIB);
    drive::open_session(&b.conn, "down-pf", TIMEOUT).expect("session");
    b.burst("50 MiB port forward target -> client", |b| {
        drive::pf_new(&b.conn, "down-pf", "d", addr, TIMEOUT).expect("new");
        let (got, _) = drive::pf_receive(&b.conn, "down-pf", "d", LONG).expect("receive");
        assert_eq!(got, FIFTY_MIB);
    });
    src.join().expect("source");
    b.pf_to_sink("up-pf", "u");
    b.burst("50 MiB port forward client -> target", |b| {
        drive::pf_send(&b.conn, "up-pf", "u", FIFTY_MIB, 64 << 10, LONG).expect("send");
    });
    drive::pf_stop(&b.conn, "up-pf", "u", TIMEOUT).expect("stop");
}

#[test]
fn a_50_mib_download_returns_rss_to_idle() {
    let mut b = bed();
    let file = b.dir.join("50m.bin");
    std::fs::write(&file, drive::pattern(0, FIFTY_MIB)).expect("file");
    drive::open_session(&b.conn, "ft", TIMEOUT).expect("session");
    b.burst("50 MiB file download", |b| {
        let got = drive::ft_download(&b.conn, "ft", Path::new(&file), LONG).expect("download");
        assert_eq!(got.len(), FIFTY_MIB);
    });
}

#[test]
fn a_flood_of_shell_output_returns_rss_to_idle() {
    let mut b = bed();
    drive::shell_open(&b.conn, "flood", TIMEOUT).expect("shell");
    b.burst("shell output flood (20 MiB)", |b| {
        drive::shell_run_until(
            &b.conn,
            "flood",
            "head -c 15000000 /dev/urandom | base64; echo '@@'$((2+3))'@@'\n",
            b"@@5@@",
            LONG,
        )
        .expect("flood");
        drive::shell_stop(&b.conn, "flood", TIMEOUT).expect("stop");
    });
}
