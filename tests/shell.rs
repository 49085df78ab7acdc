//! The remote terminal against the stand-in server: real PTYs, real shells.

use std::time::{Duration, Instant};

use mender_connect::wire::codec::{PROTO_CONTROL, PROTO_SHELL, ProtoMsg, Value};
use testbed::{AuthService, ConnHandle, Daemon, DbusDaemon, Server, TIMEOUT, default_config};

const EXIT_TEXT: &str = "read /dev/ptmx: input/output error";

struct Bed {
    // field order = drop order: daemon first, then its peers
    daemon: Daemon,
    link: Link,
    server: Server,
    _auth: AuthService,
    _bus: DbusDaemon,
}

/// The server side of the device link, keeping messages not yet asked for.
struct Link {
    conn: ConnHandle,
    seen: Vec<ProtoMsg>,
}

fn bed(tweak: impl FnOnce(&mut serde_json::Value), env: &[(&str, &str)]) -> Bed {
    let mut cfg: serde_json::Value = serde_json::from_str(&default_config()).expect("config");
    // dash (/bin/sh here) rejects the default `--login`
    cfg["ShellArguments"] = serde_json::json!([]);
    tweak(&mut cfg);
    let c = testbed::env::connected(&cfg.to_string(), env, "token-1");
    Bed {
        daemon: c.daemon,
        link: Link {
            conn: c.conn,
            seen: Vec::new(),
        },
        server: c.server,
        _auth: c.auth,
        _bus: c.bus,
    }
}

fn sid(n: usize) -> String {
    format!("8d4f5d62-6c2b-4d5e-9a57-{n:012}")
}

fn shell_msg(typ: &str, sid: &str, user: &str) -> ProtoMsg {
    ProtoMsg::new(PROTO_SHELL, typ, sid).with_prop("user_id", Value::Str(user.into()))
}

fn status(m: &ProtoMsg) -> Option<i64> {
    m.prop("status").and_then(Value::as_i64)
}

fn body(m: &ProtoMsg) -> String {
    String::from_utf8_lossy(m.body.as_deref().unwrap_or_default()).into_owned()
}

impl Link {
    /// The first message (buffered or new) matching `pred`, removed.
    fn next(&mut self, timeout: Duration, pred: impl Fn(&ProtoMsg) -> bool) -> Option<ProtoMsg> {
        if let Some(i) = self.seen.iter().position(&pred) {
            return Some(self.seen.remove(i));
        }
        let seen = &mut self.seen;
        self.conn.recv_msg_matching(timeout, |m| {
            assert!(
                !(m.hdr.proto == PROTO_SHELL && m.hdr.sid.is_empty()),
                "shell message without sid: {m:?}"
            );
            if pred(m) {
                return true;
            }
            seen.push(m.clone());
            false
        })
    }

    fn reply(&mut self, sid: &str, typ: &str) -> ProtoMsg {
        self.next(TIMEOUT, |m| {
            m.hdr.proto == PROTO_SHELL
                && m.hdr.sid == sid
                && m.hdr.typ == typ
                && (typ != "shell" || status(m) == Some(2))
        })
        .unwrap_or_else(|| panic!("no {typ} reply for {sid}; seen {:?}", self.seen))
    }

    fn send(&self, m: &ProtoMsg) {
        self.conn.send_msg(m);
    }

    fn open(&mut self, sid: &str, user: &str) -> ProtoMsg {
        self.send(&shell_msg("new", sid, user));
        self.reply(sid, "new")
    }

    fn open_ok(&mut self, sid: &str, user: &str) {
        let r = self.open(sid, user);
        assert_eq!(
            (status(&r), body(&r).as_str()),
            (Some(1), "Shell started"),
            "{r:?}"
        );
    }

    fn type_in(&self, sid: &str, text: &str) {
        self.send(&shell_msg("shell", sid, "u").with_body(text.as_bytes().to_vec()));
    }

    /// Shell output of `sid` up to and including `needle` (None on timeout).
    fn output_until(&mut self, sid: &str, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut acc = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = self.next(left, |m| {
                m.hdr.proto == PROTO_SHELL
                    && m.hdr.sid == sid
                    && m.hdr.typ == "shell"
                    && status(m) == Some(1)
            });
            let Some(m) = m else {
                eprintln!("output so far: {acc:?}");
                return None;
            };
            let b = m.body.as_deref().unwrap_or_default();
            assert!(b.len() <= 4096, "output chunk of {} bytes", b.len());
            acc.push_str(&String::from_utf8_lossy(b));
            if acc.contains(needle) {
                return Some(acc);
            }
        }
    }

    /// Runs `cmd` and returns what it printed before the marker.
    fn run(&mut self, sid: &str, cmd: &str) -> String {
        // the marker only appears in the output once the shell has expanded it
        self.type_in(sid, &format!("{cmd}; echo END$((40+2))END\n"));
        let out = self
            .output_until(sid, "END42END", TIMEOUT)
            .unwrap_or_else(|| panic!("no output for {cmd:?}"));
        let end = out.rfind("END42END").unwrap_or(0);
        let text = &out[..end];
        // drop the echoed command line
        let start = text.find("END\r\n").map_or(0, |i| i + 5);
        text[start..].to_string()
    }

    /// Starts `sleep 1000 &` in shell `sid`; returns its pid.
    fn start_background_sleep(&mut self, sid: &str) -> i32 {
        let out = self.run(sid, "sleep 1000 & echo PID=$!=");
        out.rsplit("PID=")
            .next()
            .and_then(|r| r.split('=').next())
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("no pid in {out:?}"))
    }

    fn stop(&mut self, sid: &str) -> ProtoMsg {
        self.send(&shell_msg("stop", sid, "u"));
        self.reply(sid, "stop")
    }
}

fn proc_state(pid: i32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit(')').next()?.trim_start().chars().next()
}

/// Gone or a zombie of someone else's (pid 1 of a container may not reap).
fn dead(pid: i32) -> bool {
    matches!(proc_state(pid), None | Some('Z') | Some('X'))
}

fn count_dir(path: String) -> usize {
    std::fs::read_dir(path).map(|d| d.count()).unwrap_or(0)
}

/// Threads of `pid` named `shell-*`.
fn shell_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("shell-"))
        })
        .count()
}

#[test]
fn spawn_echo_exit_sends_stop_and_frees_the_slot() {
    let mut b = bed(|_| {}, &[]);
    let l = &mut b.link;
    l.open_ok(&sid(1), "alice");
    assert!(
        b.daemon
            .wait_log("starting shell command passing process, pid:", TIMEOUT)
    );
    // MaxPerUser defaults to 1
    let r = l.open(&sid(2), "alice");
    assert_eq!(
        (status(&r), body(&r).as_str()),
        (Some(2), "user has too many open sessions")
    );
    assert_eq!(r.hdr.props.len(), 1);
    // echo round trip
    assert!(l.run(&sid(1), "echo hel''lo").contains("hello"));
    // environment as specified
    let env = l.run(&sid(1), "echo \"[$TERM][$HOME][$USER][$LOGNAME][$SHELL]\"");
    assert!(env.contains("[xterm-256color]["), "{env}");
    assert!(env.contains("][/bin/sh]"), "{env}");
    // exit: device stop with the reference text, slot free at once
    l.type_in(&sid(1), "exit\n");
    let stop = l.reply(&sid(1), "stop");
    assert_eq!((status(&stop), body(&stop).as_str()), (Some(2), EXIT_TEXT));
    l.open_ok(&sid(3), "alice");
    // the server's confirming stop for the ended shell succeeds
    let r = l.stop(&sid(1));
    assert_eq!((status(&r), r.body.as_deref()), (Some(1), None));
    // unknown sessions and types
    l.type_in(&sid(9), "ls\n");
    let r = l.reply(&sid(9), "shell");
    assert_eq!(body(&r), "session not found");
    let r = l.stop(&sid(9));
    assert_eq!(
        body(&r),
        format!(
            "routeMessage: StopShellMessage: session not found for id {}",
            sid(9)
        )
    );
    l.send(&shell_msg("ping", &sid(3), "alice"));
    let r = l.reply(&sid(3), "ping");
    assert_eq!(
        (status(&r), body(&r).as_str()),
        (Some(2), "unknown message protocol and type: 1/ping")
    );
    let r = l.stop(&sid(3));
    assert_eq!((status(&r), r.body.as_deref()), (Some(1), None));
}

#[test]
fn resize_changes_stty_size_and_spawn_size_is_used() {
    let mut b = bed(|_| {}, &[]);
    let l = &mut b.link;
    let s = sid(1);
    l.send(
        &shell_msg("new", &s, "u")
            .with_prop("terminal_height", Value::I8(33))
            .with_prop("terminal_width", Value::U8(99)),
    );
    assert_eq!(status(&l.reply(&s, "new")), Some(1));
    assert!(l.run(&s, "stty size").contains("33 99"));
    l.send(
        &shell_msg("resize", &s, "u")
            .with_prop("terminal_height", Value::I8(50))
            .with_prop("terminal_width", Value::U8(132)),
    );
    assert!(l.run(&s, "stty size").contains("50 132"));
    // an invalid resize is ignored without a reply
    l.send(&shell_msg("resize", &s, "u").with_prop("terminal_height", Value::I8(10)));
    assert!(l.run(&s, "stty size").contains("50 132"));
    l.stop(&s);
}

#[test]
fn stop_kills_the_whole_terminal_session() {
    stop_kills_jobs_of(|_| {});
}

#[test]
fn stop_kills_the_jobs_of_a_bash_login_shell() {
    stop_kills_jobs_of(|c| {
        c["ShellCommand"] = "/bin/bash".into();
        c["ShellArguments"] = serde_json::json!(["--login"]);
    });
}

fn stop_kills_jobs_of(tweak: impl FnOnce(&mut serde_json::Value)) {
    let mut b = bed(tweak, &[]);
    let l = &mut b.link;
    let s = sid(1);
    l.open_ok(&s, "u");
    let pid = l.start_background_sleep(&s);
    assert!(!dead(pid));
    let shell_pids: Vec<i32> = testbed::children(b.daemon.pid())
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(shell_pids.len(), 1);
    let t = Instant::now();
    let r = l.stop(&s);
    assert_eq!((status(&r), r.body.as_deref()), (Some(1), None));
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "stop took {:?}",
        t.elapsed()
    );
    assert!(
        testbed::wait_until(TIMEOUT, || dead(pid)),
        "background job survived"
    );
    assert!(
        testbed::children(b.daemon.pid()).is_empty(),
        "shell not reaped"
    );
    l.open_ok(&sid(2), "u");
}

#[test]
fn runs_as_user_with_its_groups_when_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: switching users needs root");
        return;
    }
    let mut b = bed(|c| c["User"] = "nobody".into(), &[]);
    let l = &mut b.link;
    let s = sid(1);
    l.open_ok(&s, "u");
    let out = l.run(&s, "echo U=$(id -u)=G=$(id -G)=D=$(pwd)=");
    // SAFETY: getpwnam returns static data or null; read at once.
    let (uid, gid) = unsafe {
        let pw = libc::getpwnam(c"nobody".as_ptr());
        assert!(!pw.is_null());
        ((*pw).pw_uid, (*pw).pw_gid)
    };
    let mut groups = vec![0 as libc::gid_t; 64];
    let mut n = groups.len() as libc::c_int;
    // SAFETY: groups has n entries.
    unsafe { libc::getgrouplist(c"nobody".as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
    groups.truncate(n.max(0) as usize);
    assert!(out.contains(&format!("U={uid}=")), "{out}");
    let got = out
        .split("G=")
        .nth(1)
        .and_then(|r| r.split('=').next())
        .unwrap_or("");
    let mut got: Vec<u32> = got
        .split_whitespace()
        .filter_map(|g| g.parse().ok())
        .collect();
    got.sort_unstable();
    groups.sort_unstable();
    groups.dedup();
    assert_eq!(got, groups, "{out}");
    // nobody's home does not exist: the shell starts in /
    assert!(out.contains("D=/="), "{out}");
    l.stop(&s);
}

#[test]
fn per_user_and_global_limits() {
    let mut b = bed(
        |c| c["Sessions"] = serde_json::json!({"MaxPerUser": 2}),
        &[],
    );
    let l = &mut b.link;
    l.open_ok(&sid(1), "a");
    l.open_ok(&sid(2), "a");
    let r = l.open(&sid(3), "a");
    assert_eq!(body(&r), "user has too many open sessions");
    let r = l.open(&sid(1), "b");
    assert_eq!(body(&r), "failed to start shell: shell is already running");
    for i in 0..14 {
        l.open_ok(&sid(10 + i), &format!("user{i}"));
    }
    let r = l.open(&sid(40), "z");
    assert_eq!(
        (status(&r), body(&r).as_str()),
        (Some(2), "too many shells spawned")
    );
    // an operator that went away: the server's stop frees the slot at once
    l.send(
        &shell_msg("stop", &sid(2), "a")
            .with_prop("status", Value::I8(2))
            .with_body(b"user disconnected".to_vec()),
    );
    assert_eq!(status(&l.reply(&sid(2), "stop")), Some(1));
    l.open_ok(&sid(41), "a");
    // stop by user id without sid: no reply (it would carry no sid), shells end
    let daemon_pid = b.daemon.pid();
    let before = testbed::children(daemon_pid).len();
    l.send(&ProtoMsg::new(PROTO_SHELL, "stop", "").with_prop("user_id", Value::Str("a".into())));
    assert!(testbed::wait_until(TIMEOUT, || testbed::children(
        daemon_pid
    )
    .len()
        == before - 2));
    l.open_ok(&sid(42), "a");
    l.open_ok(&sid(43), "a");
}

#[test]
fn idle_shell_expires_on_time() {
    let mut b = bed(
        |c| c["Sessions"] = serde_json::json!({"StopExpired": true, "ExpireAfterIdle": 2}),
        &[],
    );
    let l = &mut b.link;
    let s = sid(1);
    l.open_ok(&s, "u");
    // input keeps it alive
    let t = Instant::now();
    for _ in 0..3 {
        l.run(&s, "sleep 1");
    }
    assert!(t.elapsed() > Duration::from_secs(2));
    let idle_from = Instant::now();
    l.type_in(&s, "\n");
    let stop = l
        .next(Duration::from_secs(6), |m| {
            m.hdr.sid == s && m.hdr.typ == "stop"
        })
        .expect("expired shell stopped");
    let took = idle_from.elapsed();
    assert!(
        took >= Duration::from_millis(1800) && took < Duration::from_millis(3500),
        "expired after {took:?}"
    );
    assert_eq!(status(&stop), Some(2));
    assert!(testbed::children(b.daemon.pid()).is_empty());
    l.open_ok(&sid(2), "u");
}

#[test]
fn missing_pong_ends_the_shell_and_late_pongs_are_harmless() {
    // 1 s (pong wait 1.08 s): the test thread must answer within it even on a
    // loaded 2-core machine
    let mut b = bed(|_| {}, &[("MENDER_CONNECT_SHELL_PING_MS", "1000")]);
    let l = &mut b.link;
    let (alive, dying) = (sid(1), sid(2));
    l.open_ok(&alive, "a");
    l.open_ok(&dying, "b");
    let t = Instant::now();
    // answer the pings of one shell only, for a while
    let mut pings = 0;
    while pings < 4 {
        let p = l
            .next(TIMEOUT, |m| m.hdr.typ == "ping" && m.hdr.sid == alive)
            .expect("ping");
        assert_eq!(status(&p), Some(3));
        assert!(p.prop("timeout").and_then(Value::as_i64).is_some());
        assert!(p.body.is_none());
        l.send(&shell_msg("pong", &alive, "a"));
        pings += 1;
    }
    assert!(t.elapsed() >= Duration::from_millis(2000));
    let stop = l
        .next(TIMEOUT, |m| m.hdr.typ == "stop" && m.hdr.sid == dying)
        .expect("unanswered shell stopped");
    assert_eq!(status(&stop), Some(2));
    assert!(b.daemon.wait_log("health check failed", TIMEOUT));
    // late pongs for the ended shell and pongs for unknown ones: nothing hangs
    for _ in 0..50 {
        l.send(&shell_msg("pong", &dying, "b"));
        l.send(&shell_msg("pong", &sid(77), "b"));
    }
    l.send(&shell_msg("pong", &alive, "a"));
    assert!(l.run(&alive, "echo ok").contains("ok"));
    l.open_ok(&sid(3), "b");
    l.send(&ProtoMsg::new(PROTO_CONTROL, "ping", "ctl"));
    assert!(
        l.next(TIMEOUT, |m| m.hdr.proto == PROTO_CONTROL
            && m.hdr.typ == "pong")
            .is_some()
    );
}

#[test]
fn two_hundred_shells_leave_no_trace() {
    let mut b = bed(|_| {}, &[]);
    let pid = b.daemon.pid();
    let l = &mut b.link;
    // warm up once so lazily created resources are part of the baseline
    l.open_ok(&sid(0), "u");
    l.stop(&sid(0));
    let fds = || count_dir(format!("/proc/{pid}/fd"));
    let threads = || count_dir(format!("/proc/{pid}/task"));
    assert!(testbed::wait_until(TIMEOUT, || testbed::children(pid)
        .is_empty()
        && shell_threads(pid) == 0));
    let (fd0, th0) = (fds(), threads());
    for i in 1..=200 {
        let s = sid(i);
        l.open_ok(&s, "u");
        if i % 2 == 0 {
            l.type_in(&s, "exit\n");
            let r = l.reply(&s, "stop");
            assert_eq!(status(&r), Some(2));
        } else {
            let r = l.stop(&s);
            assert_eq!(status(&r), Some(1));
        }
        l.seen.clear();
    }
    assert!(
        testbed::wait_until(TIMEOUT, || fds() == fd0 && threads() == th0),
        "fds {} (was {fd0}), threads {} (was {th0})",
        fds(),
        threads()
    );
    assert!(
        testbed::children(pid).is_empty(),
        "left over: {:?}",
        testbed::children(pid)
    );
}

#[test]
fn shells_survive_a_reconnect_and_output_arrives_afterwards() {
    let mut b = bed(|_| {}, &[]);
    let s = sid(1);
    b.link.open_ok(&s, "u");
    assert!(b.link.run(&s, "echo one").contains("one"));
    // produce output while the link is down (and stays down: the server
    // refuses the device until the shell is done)
    let dir = testbed::TempDir::new("shell-relink");
    let flag = dir.join("done");
    b.server.set_reject(Some(503));
    b.link.type_in(
        &s,
        &format!(
            "sleep 1; i=0; while [ $i -lt 3000 ]; do echo line$i; i=$((i+1)); done; \
             echo DONE$((6*7)); touch {}\n",
            flag.display()
        ),
    );
    let _ = b.link.output_until(&s, "\n", TIMEOUT);
    b.link.conn.drop_tcp();
    assert!(b.link.conn.wait_closed(TIMEOUT));
    assert!(
        testbed::wait_until(TIMEOUT, || flag.exists()),
        "shell never finished"
    );
    b.server.set_reject(None);
    let Some(conn) = b.server.wait_connection(Duration::from_secs(30)) else {
        b.daemon.dump_log();
        panic!("no reconnect");
    };
    b.link = Link {
        conn,
        seen: Vec::new(),
    };
    let out = b
        .link
        .output_until(&s, "DONE42", TIMEOUT)
        .expect("output made while disconnected");
    assert!(out.contains("line2999"), "{}", &out[..out.len().min(300)]);
    // same session keeps working
    assert!(b.link.run(&s, "echo two").contains("two"));
    let r = b.link.stop(&s);
    assert_eq!(status(&r), Some(1));
}

#[test]
fn sigterm_stops_all_shells_quickly() {
    let mut b = bed(
        |c| c["Sessions"] = serde_json::json!({"MaxPerUser": 8}),
        &[],
    );
    for i in 0..6 {
        b.link.open_ok(&sid(i), "u");
    }
    let pid = b.daemon.pid();
    let shells: Vec<i32> = testbed::children(pid).iter().map(|c| c.0).collect();
    assert_eq!(shells.len(), 6);
    let t = Instant::now();
    b.daemon.signal(libc::SIGTERM);
    assert!(b.daemon.wait_exit(Duration::from_secs(3)).is_some());
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "took {:?}",
        t.elapsed()
    );
    assert!(shells.iter().all(|&p| dead(p)));
}

#[test]
fn disabled_terminal_refuses_new() {
    let mut b = bed(
        |c| c["Terminal"] = serde_json::json!({"Disable": true}),
        &[],
    );
    let r = b.link.open(&sid(1), "u");
    assert_eq!(
        (status(&r), body(&r).as_str()),
        (Some(2), "unknown message protocol and type: 1/new")
    );
}

#[test]
fn exit_with_a_job_still_on_the_terminal_hangs_it_up_and_stops_at_once() {
    let mut b = bed(|_| {}, &[]);
    let l = &mut b.link;
    let s = sid(1);
    l.open_ok(&s, "u");
    let pid = l.start_background_sleep(&s);
    // the job keeps the terminal open, so there is no EOF: the shell's own
    // exit must still end the session
    l.type_in(&s, "exit\n");
    let stop = l.reply(&s, "stop");
    assert_eq!((status(&stop), body(&stop).as_str()), (Some(2), EXIT_TEXT));
    assert!(
        testbed::wait_until(TIMEOUT, || dead(pid)),
        "job not hung up"
    );
    assert!(testbed::children(b.daemon.pid()).is_empty());
    l.open_ok(&sid(2), "u");
}

#[test]
fn sigusr1_dumps_the_live_shells() {
    let mut b = bed(|_| {}, &[]);
    b.link.open_ok(&sid(7), "dora");
    b.daemon.signal(libc::SIGUSR1);
    assert!(b.daemon.wait_log("shells: 1/16", TIMEOUT), "no status dump");
    assert!(b.daemon.log().contains(&format!("id:{} user:dora", sid(7))));
    b.link.stop(&sid(7));
}
