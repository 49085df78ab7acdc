//! Leaks: many open/close cycles across shell, file transfer and port
//! forward, with abrupt server disconnects (`drop_tcp`) in between that
//! orphan open sessions, must bring the daemon's fds, threads and RSS back
//! to where they were after a warm-up, with no zombie children.
//!
//! 1,000 measured cycles after 50 warm-up cycles (about 25 s in a debug
//! build); `LEAKS_CYCLES=N` picks another count.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use mender_connect::wire::codec::{
    PROTO_CONTROL, PROTO_FILETRANSFER, PROTO_PORTFORWARD, PROTO_SHELL, ProtoMsg, Value,
};
use mender_connect::wire::control::{Open, encode_map};
use testbed::{
    AuthService, ConnHandle, Daemon, DbusDaemon, Server, TIMEOUT, TempDir, default_config,
};

const USER: &str = "b3f0c9a4-1d2e-4f50-8a61-7c8d9e0f1a2b";
const WARMUP: usize = 50;
/// Warm-up cycles that all end in a disconnect (see the test).
const WARMUP_BURST: usize = 8;
/// Every this many cycles the server drops the TCP connection mid-cycle.
const DROP_EVERY: usize = 10;
/// Orphaned router sessions end after this idle time (and one unanswered ping).
const SESSION_IDLE_MS: &str = "600";
const RSS_SLACK_KIB: u64 = 256;

struct Bed {
    // field order = drop order: daemon first, then its peers
    daemon: Daemon,
    conn: ConnHandle,
    server: Server,
    auth: AuthService,
    _bus: DbusDaemon,
    echo: testbed::target::TcpTarget,
    dir: TempDir,
    /// Messages received but not asked for yet.
    seen: Vec<ProtoMsg>,
    /// Sessions whose idle pings are answered; orphans are left to time out.
    live: HashSet<String>,
}

fn bed() -> Bed {
    let mut cfg: serde_json::Value = serde_json::from_str(&default_config()).expect("config");
    // dash (/bin/sh here) rejects the default `--login`
    cfg["ShellArguments"] = serde_json::json!([]);
    let bus = DbusDaemon::start();
    let server = Server::start_plain();
    let auth = AuthService::start(bus.address(), "token-leaks", &server.url());
    // no -d: debug logging of every message would dominate a debug build
    let bin = testbed::daemon::binary().expect("integration test binary");
    let daemon = Daemon::spawn_with_binary(
        std::path::Path::new(bin),
        &cfg.to_string(),
        bus.address(),
        &[("MENDER_CONNECT_SESSION_IDLE_MS", SESSION_IDLE_MS)],
        false,
    );
    let Some(conn) = server.wait_connection(TIMEOUT) else {
        daemon.dump_log();
        panic!("daemon never connected");
    };
    let dir = TempDir::new("leaks");
    std::fs::write(dir.join("src.bin"), pattern(3000)).expect("source file");
    Bed {
        daemon,
        conn,
        server,
        auth,
        _bus: bus,
        echo: testbed::target::TcpTarget::echo(),
        dir,
        seen: Vec::new(),
        live: HashSet::new(),
    }
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + 3) as u8).collect()
}

fn new_sid(kind: u8, n: usize) -> String {
    format!("{:08x}-0000-4000-80{kind:02x}-{n:012x}", std::process::id())
}

fn with_user(m: ProtoMsg) -> ProtoMsg {
    m.with_prop("user_id", Value::Str(USER.into()))
}

fn path_body(p: &std::path::Path) -> Vec<u8> {
    encode_map(&[("path", Value::Str(p.display().to_string()))])
}

impl Bed {
    fn send(&self, m: &ProtoMsg) {
        self.conn.send_msg(m);
    }

    /// The first message (buffered or new) matching `pred`, answering the
    /// idle pings of live sessions on the way.
    fn next(&mut self, what: &str, pred: impl Fn(&ProtoMsg) -> bool) -> ProtoMsg {
        if let Some(i) = self.seen.iter().position(&pred) {
            return self.seen.remove(i);
        }
        let (conn, live, seen) = (&self.conn, &self.live, &mut self.seen);
        let found = conn.recv_msg_matching(TIMEOUT, |m| {
            if m.hdr.proto == PROTO_CONTROL && m.hdr.typ == "ping" {
                if live.contains(&m.hdr.sid) {
                    conn.send_msg(&ProtoMsg::new(PROTO_CONTROL, "pong", &m.hdr.sid));
                }
                return false;
            }
            if pred(m) {
                return true;
            }
            if live.contains(&m.hdr.sid) {
                seen.push(m.clone());
            }
            false
        });
        found.unwrap_or_else(|| {
            self.daemon.dump_log();
            panic!("no {what}; unclaimed: {:?}", self.seen);
        })
    }

    fn reply(&mut self, proto: u16, sid: &str, typ: &str) -> ProtoMsg {
        self.next(&format!("{proto}/{typ} for {sid}"), |m| {
            m.hdr.proto == proto && m.hdr.sid == sid && m.hdr.typ == typ
        })
    }

    /// Control handshake of a router session.
    fn open(&mut self, sid: &str) {
        self.live.insert(sid.to_string());
        let open = Open { versions: vec![1] };
        self.send(&with_user(
            ProtoMsg::new(PROTO_CONTROL, "open", sid).with_body(open.encode()),
        ));
        self.reply(PROTO_CONTROL, sid, "accept");
    }

    fn close(&mut self, sid: &str) {
        self.send(&ProtoMsg::new(PROTO_CONTROL, "close", sid));
        self.forget(sid);
    }

    fn forget(&mut self, sid: &str) {
        self.live.remove(sid);
        self.seen.retain(|m| m.hdr.sid != sid);
    }

    fn shell_open(&mut self, sid: &str) {
        self.live.insert(sid.to_string());
        self.send(&with_user(ProtoMsg::new(PROTO_SHELL, "new", sid)));
        let r = self.reply(PROTO_SHELL, sid, "new");
        assert_eq!(r.prop("status").and_then(Value::as_i64), Some(1), "{r:?}");
    }

    /// Ends the shell by `stop`, or by typing `exit` (the shell's own end).
    fn shell_end(&mut self, sid: &str, by_exit: bool) {
        if by_exit {
            self.send(&with_user(
                ProtoMsg::new(PROTO_SHELL, "shell", sid).with_body(b"exit\n".to_vec()),
            ));
        } else {
            self.send(&with_user(ProtoMsg::new(PROTO_SHELL, "stop", sid)));
        }
        self.reply(PROTO_SHELL, sid, "stop");
        if by_exit {
            // the user closes the terminal: the daemon confirms the stop of
            // a shell that ended by itself and forgets its sid (a bounded
            // tombstone that would otherwise count as growth here)
            self.send(&with_user(ProtoMsg::new(PROTO_SHELL, "stop", sid)));
            let r = self.reply(PROTO_SHELL, sid, "stop");
            assert_eq!(r.prop("status").and_then(Value::as_i64), Some(1), "{r:?}");
        }
        self.forget(sid);
    }

    fn ft(&self, typ: &str, sid: &str) -> ProtoMsg {
        with_user(ProtoMsg::new(PROTO_FILETRANSFER, typ, sid))
    }

    fn stat(&mut self, sid: &str) {
        let src = self.dir.join("src.bin");
        self.send(&self.ft("stat", sid).with_body(path_body(&src)));
        self.reply(PROTO_FILETRANSFER, sid, "file_info");
    }

    fn get(&mut self, sid: &str) {
        let src = self.dir.join("src.bin");
        self.send(&self.ft("get_file", sid).with_body(path_body(&src)));
        let mut got = 0usize;
        loop {
            let m = self.next("file_chunk", |m| {
                m.hdr.sid == sid && (m.hdr.typ == "file_chunk" || m.hdr.typ == "error")
            });
            assert_eq!(m.hdr.typ, "file_chunk", "{m:?}");
            match m.body {
                Some(b) => got += b.len(),
                None => break,
            }
        }
        assert_eq!(got, 3000);
        self.send(
            &self
                .ft("ack", sid)
                .with_prop("offset", Value::I64(got as i64)),
        );
    }

    fn put(&mut self, sid: &str) {
        let dst = self.dir.join("dst.bin");
        let data = pattern(1000);
        self.send(&self.ft("put_file", sid).with_body(path_body(&dst)));
        let first = self.next("put ack", |m| {
            m.hdr.sid == sid && (m.hdr.typ == "ack" || m.hdr.typ == "error")
        });
        assert_eq!(first.hdr.typ, "ack", "{first:?}");
        let chunk = |off: usize| {
            self.ft("file_chunk", sid)
                .with_prop("offset", Value::I64(off as i64))
        };
        self.send(&chunk(0).with_body(data.clone()));
        self.send(&chunk(data.len()));
        loop {
            let m = self.next("upload ack", |m| {
                m.hdr.sid == sid && (m.hdr.typ == "ack" || m.hdr.typ == "error")
            });
            assert_eq!(m.hdr.typ, "ack", "{m:?}");
            if m.prop("offset").and_then(Value::as_i64) >= Some(data.len() as i64) {
                break;
            }
        }
    }

    fn pf(&self, typ: &str, sid: &str, cid: &str) -> ProtoMsg {
        with_user(ProtoMsg::new(PROTO_PORTFORWARD, typ, sid))
            .with_prop("connection_id", Value::Str(cid.into()))
    }

    fn pf_reply(&mut self, sid: &str, cid: &str, typ: &str) -> ProtoMsg {
        let m = self.next(&format!("pf {typ}"), |m| {
            m.hdr.sid == sid
                && m.prop_str("connection_id") == Some(cid)
                && (m.hdr.typ == typ || m.hdr.typ == "error")
        });
        assert_eq!(m.hdr.typ, typ, "{m:?}");
        m
    }

    /// Opens a forwarded connection to the echo server and round-trips once.
    fn pf_open(&mut self, sid: &str, cid: &str) {
        let body = encode_map(&[
            ("remote_host", Value::Str(self.echo.addr.ip().to_string())),
            ("remote_port", Value::U16(self.echo.addr.port())),
            ("protocol", Value::Str("tcp".into())),
        ]);
        self.send(&self.pf("new", sid, cid).with_body(body));
        self.pf_reply(sid, cid, "new");
        self.send(&self.pf("forward", sid, cid).with_body(b"ping".to_vec()));
        self.pf_reply(sid, cid, "ack");
        let back = self.pf_reply(sid, cid, "forward");
        assert_eq!(back.body.as_deref(), Some(&b"ping"[..]));
        self.send(&self.pf("ack", sid, cid));
    }

    fn pf_stop(&mut self, sid: &str, cid: &str) {
        self.send(&self.pf("stop", sid, cid));
        self.pf_reply(sid, cid, "stop");
    }

    /// Drops the TCP connection and waits for the daemon to come back.
    fn drop_and_reconnect(&mut self) {
        self.conn.drop_tcp();
        assert!(self.conn.wait_closed(TIMEOUT));
        let n = self.server.connection_count();
        // Links that live under a minute make the back-off grow (1, 2, 4 …
        // 60 s); a new token restarts it, as after an outage that made the
        // device re-authenticate, so the test needs no minutes of waiting.
        self.auth
            .set(&format!("token-leaks-{n}"), &self.server.url());
        let Some(conn) = self.server.wait_connection(TIMEOUT) else {
            self.daemon.dump_log();
            panic!("no reconnect after drop {n}");
        };
        self.conn = conn;
        self.seen.clear();
    }

    /// One cycle: a shell, file-transfer sessions (stat and get, put) and a
    /// port-forward session, all open at once, then all closed. With
    /// `drop_link` the server drops the link while they are open: the shell
    /// is stopped over the new link, the router sessions are orphaned.
    fn cycle(&mut self, n: usize, drop_link: bool) {
        let (sh, ft, pf) = (new_sid(1, n), new_sid(2, n), new_sid(3, n));
        let (cid, put) = (new_sid(4, n), new_sid(5, n));
        self.shell_open(&sh);
        self.open(&ft);
        self.stat(&ft);
        self.get(&ft);
        // deviceconnect runs each transfer in a session of its own
        self.open(&put);
        self.put(&put);
        self.close(&put);
        self.open(&pf);
        self.pf_open(&pf, &cid);
        if drop_link {
            self.drop_and_reconnect();
            self.forget(&ft);
            self.forget(&pf);
            self.shell_end(&sh, false);
        } else {
            self.pf_stop(&pf, &cid);
            self.close(&pf);
            self.close(&ft);
            self.shell_end(&sh, n.is_multiple_of(2));
        }
    }
}

fn count_dir(path: String) -> usize {
    std::fs::read_dir(path).map(|d| d.count()).unwrap_or(0)
}

/// Threads of a session (router, shell, file transfer, port forward).
fn session_threads(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .filter(|c| {
            ["sess-", "shell-", "ft-", "pf-", "mc-"]
                .iter()
                .any(|p| c.starts_with(p))
        })
        .collect()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Usage {
    fds: usize,
    threads: usize,
    rss_kib: u64,
}

fn usage(pid: u32) -> Usage {
    Usage {
        fds: count_dir(format!("/proc/{pid}/fd")),
        threads: count_dir(format!("/proc/{pid}/task")),
        rss_kib: rss_kib(pid),
    }
}

/// Waits until every session is over and no child is left.
fn wait_quiet(b: &Bed) -> bool {
    let pid = b.daemon.pid();
    testbed::wait_until(Duration::from_secs(15), || {
        session_threads(pid).is_empty() && testbed::children(pid).is_empty()
    })
}

fn cycles() -> usize {
    std::env::var("LEAKS_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

#[test]
fn open_close_cycles_and_disconnects_leave_no_trace() {
    let mut b = bed();
    let pid = b.daemon.pid();
    let started = Instant::now();
    // Warm-up: lazily made resources become part of the baseline. glibc
    // keeps the stacks of ended threads for reuse, resident, as many as were
    // ever alive at once; orphaned sessions live on until their idle timeout,
    // so a burst of back-to-back disconnects first sets that high-water mark
    // above anything the spaced disconnects below reach.
    for n in 0..WARMUP {
        b.cycle(n, n < WARMUP_BURST || n % DROP_EVERY == DROP_EVERY / 2);
    }
    assert!(
        wait_quiet(&b),
        "warm-up left {:?} / {:?}",
        session_threads(pid),
        testbed::children(pid)
    );
    let base = usage(pid);
    let warm = started.elapsed();
    let total = cycles();
    for n in WARMUP..WARMUP + total {
        b.cycle(n, n % DROP_EVERY == DROP_EVERY / 2);
    }
    let run = started.elapsed() - warm;
    let quiet = wait_quiet(&b);
    let mut now = usage(pid);
    // RSS is allowed a moment: freed pages go back when the allocator trims
    testbed::wait_until(Duration::from_secs(5), || {
        now = usage(pid);
        now.fds == base.fds
            && now.threads == base.threads
            && now.rss_kib <= base.rss_kib + RSS_SLACK_KIB
    });
    eprintln!(
        "leaks: {total} cycles ({} disconnects) in {run:?} after a {WARMUP}-cycle warm-up \
         ({warm:?}); baseline {base:?}, after {now:?}",
        total / DROP_EVERY
    );
    let zombies: Vec<_> = testbed::children(pid)
        .into_iter()
        .filter(|c| c.1 == 'Z')
        .collect();
    assert!(zombies.is_empty(), "zombie children: {zombies:?}");
    assert!(
        quiet,
        "sessions left: {:?}, children {:?}",
        session_threads(pid),
        testbed::children(pid)
    );
    assert_eq!(now.fds, base.fds, "fd count: {base:?} -> {now:?}");
    assert_eq!(
        now.threads, base.threads,
        "thread count: {base:?} -> {now:?}"
    );
    assert!(
        now.rss_kib <= base.rss_kib + RSS_SLACK_KIB,
        "RSS grew by {} KiB: {base:?} -> {now:?}",
        now.rss_kib.saturating_sub(base.rss_kib)
    );
}
