//! Port-forward ack latency, client → device, the way mender-cli drives it:
//! 4096-byte `forward`s, one in flight. For each `forward` it records the
//! round trip as the client (the stand-in server's side of the websocket)
//! sees it, from the frame queued to the `ack` received; and, interleaved,
//! the round trip of a websocket ping, which the daemon's connection thread
//! answers by itself. The difference of the two is the daemon's share: from
//! the `forward` read off the websocket to its `ack` written (plus what
//! encoding and decoding a 4 KiB frame costs the stand-in). Prints p50/p99
//! of each and the daemon's CPU per forward (utime+stime from /proc).
//!
//! `--ideal` runs no daemon: a relay that does no work
//! ([`testbed::relay`]) answers the exchange client, which gives this
//! machine's floor for the round trip (its CPU figures are the relay
//! thread's); compare it with a daemon's `--exchange` run. It ignores
//! `--bin`, `--restart`, `--shell-first` and `--tls`.
//!
//! `--tls` puts the stand-in server behind TLS (a throwaway certificate the
//! daemon trusts), as on a real device's link; not with `--restart`.
//!
//! Run: `cargo bench --bench pf_ack [-- --bin PATH] [--n N] [--restart] [--tls]`
//! (`--restart`: restart the stand-in server first, as the compare bench
//! does, so the forwards go over the daemon's second websocket;
//! `--exchange`: drive the forwards and pings from the stand-in's own
//! connection thread, as the compare bench's client→device leg does, so
//! the client adds no thread hand-off to each round trip) (PATH defaults
//! to this crate's release daemon; the Go daemon works too, it connects
//! after about 10 s).

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mender_connect::wire::codec::{self, PROTO_PORTFORWARD, ProtoMsg, Value};
use testbed::drive::{self, CHUNK, cpu_ms, sched_ms};
use testbed::relay::{self, Relay};
use testbed::server::Exchange;
use testbed::{AuthService, Daemon, DbusDaemon, Server, default_config};
use tungstenite::Bytes;

const WAIT: Duration = Duration::from_secs(60);
const SID: &str = "cccccccc-0000-4000-8000-000000000001";

/// Minor page faults of the process so far (field 10 of /proc/PID/stat).
fn minflt(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat
        .rfind(')')
        .and_then(|i| stat.get(i + 2..))
        .unwrap_or("");
    rest.split_whitespace()
        .nth(7)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// mender-cli's `forward` of the pattern's `CHUNK` bytes from `off`.
fn fwd(off: usize) -> ProtoMsg {
    ProtoMsg::new(PROTO_PORTFORWARD, "forward", SID)
        .with_prop("connection_id", Value::Str("lat".into()))
        .with_prop("user_id", Value::Str("bench-user".into()))
        .with_body(drive::pattern(off, CHUNK))
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Prints the title, then the forward and ping round trips (the rate counts
/// the measured forwards over `secs`); returns their p50/p99 in µs.
fn print_round_trips(title: &str, rtt: &mut [f64], ping: &mut [f64], secs: f64) -> [f64; 4] {
    let fwds = rtt.len() as f64;
    let (r50, r99) = (pct(rtt, 0.5), pct(rtt, 0.99));
    let (p50, p99) = (pct(ping, 0.5), pct(ping, 0.99));
    println!("{title}");
    println!(
        "  forward->ack round trip (client): p50 {r50:.1} us, p99 {r99:.1} us ({} forwards, {:.1} MiB/s incl. pings)",
        rtt.len(),
        fwds * CHUNK as f64 / (1 << 20) as f64 / secs
    );
    println!("  ws ping->pong round trip:         p50 {p50:.1} us, p99 {p99:.1} us");
    [r50, r99, p50, p99]
}

/// The measured loop on the stand-in's connection thread: round trips of
/// each `forward` to its ack and, every 16th, of a websocket ping (µs).
fn exchanged(x: &mut Exchange<'_>, frames: Vec<Bytes>) -> Result<(Vec<f64>, Vec<f64>), String> {
    let deadline = Instant::now() + WAIT;
    let mut rtt = Vec::with_capacity(frames.len());
    let mut ping = Vec::with_capacity(frames.len() / 16);
    for (i, m) in frames.into_iter().enumerate() {
        let t = Instant::now();
        x.send_encoded(m, deadline)?;
        loop {
            let a = x.recv_msg(deadline)?;
            if a.hdr.sid != SID || a.hdr.typ == "ping" {
                continue;
            }
            if a.hdr.typ != "ack" {
                return Err(format!("expected an ack: {a:?}"));
            }
            break;
        }
        rtt.push(t.elapsed().as_secs_f64() * 1e6);
        if i % 16 == 0 {
            let t = Instant::now();
            x.ping(b"lat", deadline)?;
            ping.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok((rtt, ping))
}

fn main() {
    let mut bin = testbed::daemon::binary().map(PathBuf::from);
    let mut n = 20_000usize;
    let mut restart = false;
    let mut shell_first = false;
    let mut exchange = false;
    let mut ideal = false;
    let mut tls = false;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--bin" => bin = it.next().map(PathBuf::from),
            "--n" => n = it.next().and_then(|v| v.parse().ok()).unwrap_or(n),
            "--restart" => restart = true,
            "--shell-first" => shell_first = true,
            "--exchange" => exchange = true,
            "--ideal" => ideal = true,
            "--tls" => tls = true,
            _ => {}
        }
    }
    assert!(
        !(tls && restart),
        "--restart restarts a plain server: not with --tls"
    );
    if ideal {
        return ideal_relay(n);
    }
    let bin = bin.expect("--bin PATH");
    let mut cfg: serde_json::Value = serde_json::from_str(&default_config()).expect("config");
    cfg["ShellArguments"] = serde_json::json!([]);
    cfg["Sessions"] = serde_json::json!({ "MaxPerUser": 32 });
    let bus = DbusDaemon::start();
    let cert = tls.then(testbed::TlsCert::generate);
    let mut server = match &cert {
        Some(c) => Server::start_tls(c),
        None => Server::start_plain(),
    };
    let _auth = AuthService::start(bus.address(), "bench-token", &server.url());
    let env: Vec<_> = cert.iter().map(testbed::TlsCert::env).collect();
    let daemon = Daemon::spawn_with_binary(&bin, &cfg.to_string(), bus.address(), &env, false);
    let mut conn = server.wait_connection(WAIT).expect("daemon connected");
    if restart {
        // as the compare bench does before its transfers
        let port = server.port();
        server.stop();
        server = Server::start_plain_on(port);
        conn = server.wait_connection(WAIT).expect("daemon reconnected");
    }
    let pid = daemon.pid();

    if shell_first {
        // as the compare bench does before its port forward: bulk terminal
        // output, then ten shells open at once
        let sid = |i: u32| format!("dddddddd-0000-4000-8000-{i:012}");
        drive::open_session(&conn, &sid(0), WAIT).expect("open");
        drive::shell_open(&conn, &sid(0), WAIT).expect("shell");
        let line = "head -c 15000000 /dev/urandom | base64; echo '@@'$((2+3))'@@'\n";
        drive::shell_run_until(&conn, &sid(0), line, b"@@5@@", WAIT).expect("bulk");
        drive::shell_stop(&conn, &sid(0), WAIT).expect("stop");
        drive::close_session(&conn, &sid(0));
        for i in 1..=10 {
            drive::open_session(&conn, &sid(i), WAIT).expect("open");
            drive::shell_open(&conn, &sid(i), WAIT).expect("shell");
            drive::shell_run_until(&conn, &sid(i), "echo R$((1+1))R\n", b"R2R", WAIT)
                .expect("shell");
        }
        for i in 1..=10 {
            drive::shell_stop(&conn, &sid(i), WAIT).expect("stop");
            drive::close_session(&conn, &sid(i));
        }
    }
    drive::open_session(&conn, SID, WAIT).expect("open");
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let total = n * CHUNK;
    let sink = drive::pf_sink(l, total);
    drive::pf_new(&conn, SID, "lat", addr, WAIT).expect("new");
    // warm-up: 256 forwards (1 MiB), not counted
    let warm = 256;
    for i in 0..warm {
        conn.send_msg(&fwd(i * CHUNK));
        let m = drive::recv_for(&conn, SID, WAIT).expect("ack");
        assert_eq!(m.hdr.typ, "ack", "{m:?}");
    }
    let frames: Vec<Bytes> = if exchange {
        (warm..n)
            .map(|i| codec::encode(&fwd(i * CHUNK)).into())
            .collect()
    } else {
        Vec::new()
    };
    let cpu0 = cpu_ms(pid);
    let sch0 = sched_ms(pid, None);
    let flt0 = minflt(pid);
    let t0 = Instant::now();
    let (mut rtt, mut ping) = if exchange {
        conn.exchange(move |x| exchanged(x, frames))
            .expect("connection")
            .expect("exchange")
    } else {
        let mut rtt = Vec::with_capacity(n);
        let mut ping = Vec::with_capacity(n / 16);
        let mut pongs = 0;
        for i in warm..n {
            // frames are built before the clock starts
            let m = fwd(i * CHUNK);
            let t = Instant::now();
            conn.send_msg(&m);
            let a = drive::recv_for(&conn, SID, WAIT).expect("ack");
            rtt.push(t.elapsed().as_secs_f64() * 1e6);
            assert_eq!(a.hdr.typ, "ack", "{a:?}");
            if i % 16 == 0 {
                let t = Instant::now();
                conn.send_ping(b"lat");
                pongs += 1;
                assert!(conn.wait_pongs(pongs, WAIT), "no pong");
                ping.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        (rtt, ping)
    };
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_ms(pid) - cpu0;
    let sch = sched_ms(pid, None) - sch0;
    let faults = minflt(pid) - flt0;
    let (got, intact, sock) = sink.join().expect("sink");
    assert!(got == total && intact, "{got} bytes, intact {intact}");
    drive::pf_stop(&conn, SID, "lat", WAIT).expect("stop");
    drop(sock);
    let fwds = (n - warm) as f64;
    let [r50, r99, p50, p99] =
        print_round_trips(&bin.display().to_string(), &mut rtt, &mut ping, secs);
    println!(
        "  daemon share (forward - ping):    p50 {:.1} us, p99 {:.1} us",
        r50 - p50,
        r99 - p99
    );
    println!(
        "  daemon CPU: {:.1} us per forward = {:.1} ms/MiB",
        cpu * 1000.0 / fwds,
        cpu / (fwds * CHUNK as f64 / (1 << 20) as f64)
    );
    println!(
        "  daemon CPU (schedstat): {:.1} us per forward = {:.1} ms/MiB",
        sch * 1000.0 / fwds,
        sch / (fwds * CHUNK as f64 / (1 << 20) as f64)
    );
    println!(
        "  daemon minor page faults: {:.2} per forward",
        faults as f64 / fwds
    );
}

/// `--ideal`: the same client and sink with a relay that does no work in
/// place of the daemon.
fn ideal_relay(n: usize) {
    let warm = 256;
    assert!(n > warm, "--n must exceed the {warm} warm-up forwards");
    let mut server = Server::start_plain();
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let total = n * CHUNK;
    let sink = drive::pf_sink(l, total);
    let relay_thread = Relay::start(server.port(), addr, relay::ack_frame(SID, "lat"), CHUNK);
    let conn = server.wait_connection(WAIT).expect("relay connected");
    let frames: Vec<Bytes> = (0..n)
        .map(|i| codec::encode(&fwd(i * CHUNK)).into())
        .collect();
    let (warm_frames, frames) = {
        let mut f = frames;
        let rest = f.split_off(warm);
        (f, rest)
    };
    conn.exchange(move |x| exchanged(x, warm_frames))
        .expect("connection")
        .expect("warm-up");
    let pid = std::process::id();
    let sch0 = sched_ms(pid, Some(relay::THREAD));
    let t0 = Instant::now();
    let (mut rtt, mut ping) = conn
        .exchange(move |x| exchanged(x, frames))
        .expect("connection")
        .expect("exchange");
    let secs = t0.elapsed().as_secs_f64();
    let sch = sched_ms(pid, Some(relay::THREAD)) - sch0;
    let (got, intact, _sock) = sink.join().expect("sink");
    assert!(got == total && intact, "{got} bytes, intact {intact}");
    assert!(sch > 0.0, "no CPU time found for thread {}", relay::THREAD);
    server.stop();
    let wrote = relay_thread.join().expect("relay");
    assert_eq!(wrote, total as u64, "bytes the relay wrote");
    let fwds = (n - warm) as f64;
    print_round_trips(
        "ideal relay (no daemon: websocket and syscalls only)",
        &mut rtt,
        &mut ping,
        secs,
    );
    println!(
        "  relay CPU (schedstat): {:.1} us per forward = {:.1} ms/MiB",
        sch * 1000.0 / fwds,
        sch / (fwds * CHUNK as f64 / (1 << 20) as f64)
    );
}
