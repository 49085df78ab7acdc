//! systemd integration (issue 12): a unix datagram socket plays systemd's
//! notification socket. READY=1 comes once configuration and D-Bus are up,
//! before any server answers; STATUS= lines follow the connection; WATCHDOG=1
//! flows only while the connection thread makes progress.

use std::net::TcpListener;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

use testbed::{AuthService, Daemon, DbusDaemon, Server, TIMEOUT, TempDir, default_config};

/// The socket systemd would listen on, and what arrived on it.
struct FakeSystemd {
    sock: UnixDatagram,
    /// (arrival, datagram)
    got: Vec<(Instant, String)>,
}

impl FakeSystemd {
    fn new(sock: UnixDatagram) -> FakeSystemd {
        FakeSystemd {
            sock,
            got: Vec::new(),
        }
    }

    /// Receives until `pred` holds for a datagram; returns it.
    fn wait_for(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        if let Some((_, m)) = self.got.iter().find(|(_, m)| pred(m)) {
            return Some(m.clone());
        }
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 4096];
        let (sock, got) = (&self.sock, &mut self.got);
        // The next datagram, recorded; None at the deadline (a failed recv
        // is its timeout or EINTR: try again until then).
        let next = |_| loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            sock.set_read_timeout(Some(left)).expect("timeout");
            if let Ok(n) = sock.recv(&mut buf) {
                let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                got.push((Instant::now(), m.clone()));
                return Some(m);
            }
        };
        testbed::next_matching(timeout, next, |m: &String| pred(m))
    }

    /// Everything that arrives for `d` (the window itself is the measurement).
    fn collect_for(&mut self, d: Duration) {
        let _ = self.wait_for(d, |_| false);
    }

    fn watchdogs_since(&self, t: Instant) -> Vec<Instant> {
        self.got
            .iter()
            .filter(|(at, m)| *at >= t && m.lines().any(|l| l == "WATCHDOG=1"))
            .map(|(at, _)| *at)
            .collect()
    }
}

fn dead_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    format!("http://127.0.0.1:{}", l.local_addr().expect("addr").port())
}

#[test]
fn ready_comes_before_any_server_and_status_lines_follow_the_connection() {
    let name = format!("mc-test-notify-{}", std::process::id());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract");
    let mut systemd = FakeSystemd::new(UnixDatagram::bind_addr(&addr).expect("bind"));
    let bus = DbusDaemon::start();
    let dead = dead_url();
    let auth = AuthService::start(bus.address(), "t", &dead);
    let notify = format!("@{name}");
    let mut daemon = Daemon::spawn(
        &default_config(),
        bus.address(),
        &[("NOTIFY_SOCKET", notify.as_str())],
    );
    let ready = systemd
        .wait_for(TIMEOUT, |m| m.lines().any(|l| l == "READY=1"))
        .expect("READY=1 while the server is unreachable");
    assert!(
        ready.contains("STATUS=waiting for authorization"),
        "{ready}"
    );
    let retry = systemd
        .wait_for(TIMEOUT, |m| m.starts_with("STATUS=reconnecting in "))
        .expect("a reconnecting status");
    assert!(
        retry.contains(&format!(
            "s: connecting to {}: ",
            dead.trim_start_matches("http://")
        )),
        "{retry}"
    );

    let server = Server::start_plain();
    auth.set("t", &server.url());
    let want = format!("STATUS=connected to {}", server.ws_url());
    assert!(
        systemd.wait_for(TIMEOUT, |m| m == want).is_some(),
        "no {want:?} in {:?}",
        systemd.got
    );
    auth.set("", "");
    let withdrawn = systemd.got.len();
    assert!(
        testbed::wait_until(TIMEOUT, || {
            systemd.collect_for(Duration::from_millis(100));
            systemd.got[withdrawn..]
                .iter()
                .any(|(_, m)| m == "STATUS=waiting for authorization")
        }),
        "no waiting status after the token was withdrawn"
    );
    daemon.signal(libc::SIGTERM);
    assert!(
        systemd
            .wait_for(TIMEOUT, |m| m.lines().any(|l| l == "STOPPING=1"))
            .is_some()
    );
    assert!(daemon.wait_exit(TIMEOUT).is_some_and(|s| s.success()));
    // no watchdog was asked for, so none is sent
    assert!(
        systemd
            .watchdogs_since(Instant::now() - Duration::from_secs(3600))
            .is_empty()
    );
}

/// Finds the thread named `comm` in process `pid`.
fn thread_named(pid: u32, comm: &str) -> Option<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
        .find_map(|e| {
            let tid = e.file_name().to_str()?.parse::<i32>().ok()?;
            let name = std::fs::read_to_string(e.path().join("comm")).ok()?;
            (name.trim() == comm).then_some(tid)
        })
}

#[test]
fn watchdog_pings_flow_while_the_connection_thread_lives_and_stop_when_it_is_stuck() {
    let dir = TempDir::new("sdnotify");
    let path = dir.join("notify");
    let mut systemd = FakeSystemd::new(UnixDatagram::bind(&path).expect("bind"));
    let bus = DbusDaemon::start();
    let server = Server::start_plain();
    let _auth = AuthService::start(bus.address(), "t", &server.url());
    // pings every 0.5 s; the link's ping period 1.8 s, so a thread silent
    // for 3.6 s is stuck
    let daemon = Daemon::spawn(
        &default_config(),
        bus.address(),
        &[
            ("NOTIFY_SOCKET", path.to_str().expect("utf-8")),
            ("WATCHDOG_USEC", "1000000"),
            ("MENDER_CONNECT_PONG_WAIT_MS", "2000"),
        ],
    );
    server.wait_connection(TIMEOUT).expect("connected");
    let t0 = Instant::now();
    assert!(
        testbed::wait_until(TIMEOUT, || {
            systemd.collect_for(Duration::from_millis(200));
            systemd.watchdogs_since(t0).len() >= 4
        }),
        "no steady WATCHDOG=1"
    );

    // Freeze only the connection thread: ptrace stops one thread, the rest
    // of the daemon (the supervisor) runs on.
    let pid = daemon.pid();
    let tid = thread_named(pid, "conn").expect("conn thread");
    // SAFETY: plain ptrace requests on a thread of our child process.
    let seized = unsafe { libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0) };
    if seized != 0 {
        eprintln!(
            "SKIPPED: ptrace: {} (needs root or ptrace_scope 0)",
            std::io::Error::last_os_error()
        );
        return;
    }
    // SAFETY: as above; waitpid reaps nothing here, it only reports the stop.
    unsafe {
        assert_eq!(libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0), 0);
        let mut status = 0;
        assert_eq!(libc::waitpid(tid, &mut status, libc::__WALL), tid);
    }
    let frozen = Instant::now();
    systemd.collect_for(Duration::from_secs(7));
    let pings = systemd.watchdogs_since(frozen);
    let last = pings.last().map(|t| t.duration_since(frozen));
    eprintln!(
        "watchdog pings after the freeze: {} (last at {last:?})",
        pings.len()
    );
    // stuck bound 3.6 s + one ping interval + slack
    assert!(
        last.is_none_or(|d| d < Duration::from_millis(5000)),
        "pings went on for {last:?} after the connection thread froze"
    );
    assert!(
        systemd
            .watchdogs_since(frozen + Duration::from_millis(5000))
            .is_empty(),
        "pings resumed while frozen"
    );
    assert!(daemon.log().contains("connection thread is stuck"));

    // SAFETY: detaching resumes the thread.
    unsafe { libc::ptrace(libc::PTRACE_DETACH, tid, 0, 0) };
    let thawed = Instant::now();
    assert!(
        testbed::wait_until(TIMEOUT, || {
            systemd.collect_for(Duration::from_millis(200));
            !systemd.watchdogs_since(thawed).is_empty()
        }),
        "pings did not resume once the thread ran again"
    );
}
