//! Side-by-side benchmark: our daemon against the Go `mender-connect` 2.1.0,
//! one after the other, several rounds, each against a fresh private D-Bus,
//! stand-in auth service and stand-in deviceconnect server on loopback, both
//! driven identically (deviceconnect-like file transfer, mender-cli-like port
//! forward: 4096-byte client chunks, one forward in flight).
//!
//! Run through `benches/compare.sh` (builds, installs the Go daemon, runs this):
//! `cargo bench --bench compare -- --ours PATH --theirs PATH [--rounds N]`.
//! Prints every round, then a table of medians and ours/theirs ratios.

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use mender_connect::wire::codec::{self, PROTO_CONTROL, PROTO_PORTFORWARD, ProtoMsg, Value};
use testbed::bench::median;
use testbed::drive::{self, cpu_ms, proc_kib, sched_ms};
use testbed::relay::{self, Relay};
use testbed::server::Exchange;
use testbed::{AuthService, ConnHandle, Daemon, DbusDaemon, Server, TempDir, default_config};
use tungstenite::Bytes;

const MIB: usize = 1 << 20;
/// Size of each port-forward and file-transfer run.
const BULK: usize = 50 * MIB;
/// Raw bytes fed to base64 in the terminal run (≈ 20 MiB of output).
const SHELL_RAW: usize = 15 * MIB;
const SHELLS_FOR_RSS: usize = 10;
const IDLE: Duration = Duration::from_secs(10);
/// Window, right after the idle memory sample, over which idle context
/// switches are counted.
const IDLE_WAKEUPS: Duration = Duration::from_secs(20);
/// Generous: the Go daemon waits about 10 s before its first connection.
const CONNECT_WAIT: Duration = Duration::from_secs(60);
const WAIT: Duration = Duration::from_secs(60);

/// One figure: its label, unit, and whether smaller is better.
struct Figure {
    label: &'static str,
    unit: &'static str,
    lower_better: bool,
}

const FIGURES: &[Figure] = &[
    Figure {
        label: "start -> connected",
        unit: "ms",
        lower_better: true,
    },
    Figure {
        label: "reconnect after server restart",
        unit: "ms",
        lower_better: true,
    },
    Figure {
        label: "idle peak RSS (VmHWM) after 10 s",
        unit: "KiB",
        lower_better: true,
    },
    Figure {
        label: "idle RssAnon after 10 s",
        unit: "KiB",
        lower_better: true,
    },
    Figure {
        label: "idle Pss after 10 s",
        unit: "KiB",
        lower_better: true,
    },
    Figure {
        label: "idle wakeups (context switches)",
        unit: "/min",
        lower_better: true,
    },
    Figure {
        label: "daemon RSS per open shell",
        unit: "KiB",
        lower_better: true,
    },
    Figure {
        label: "port-forward device->client",
        unit: "MiB/s",
        lower_better: false,
    },
    Figure {
        label: "  CPU per MiB",
        unit: "ms/MiB",
        lower_better: true,
    },
    Figure {
        label: "port-forward client->device",
        unit: "MiB/s",
        lower_better: false,
    },
    Figure {
        label: "  CPU per MiB",
        unit: "ms/MiB",
        lower_better: true,
    },
    Figure {
        label: "file download",
        unit: "MiB/s",
        lower_better: false,
    },
    Figure {
        label: "  CPU per MiB",
        unit: "ms/MiB",
        lower_better: true,
    },
    Figure {
        label: "file upload",
        unit: "MiB/s",
        lower_better: false,
    },
    Figure {
        label: "  CPU per MiB",
        unit: "ms/MiB",
        lower_better: true,
    },
    Figure {
        label: "bulk terminal output",
        unit: "MiB/s",
        lower_better: false,
    },
    Figure {
        label: "peak RSS at the end (VmHWM)",
        unit: "KiB",
        lower_better: true,
    },
    Figure {
        label: "stripped binary size",
        unit: "KiB",
        lower_better: true,
    },
];

fn stripped_kib(bin: &Path) -> f64 {
    let dir = TempDir::new("cmp-strip");
    let out = dir.join("stripped");
    let ok = Command::new("strip")
        .arg("-o")
        .arg(&out)
        .arg(bin)
        .status()
        .is_ok_and(|s| s.success());
    let p = if ok { out.as_path() } else { bin };
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0) as f64 / 1024.0
}

fn park(d: Duration) {
    let until = Instant::now() + d;
    while Instant::now() < until {
        std::thread::park_timeout(until - Instant::now());
    }
}

/// (MiB/s, CPU ms per MiB) of `f`, which moves `bytes`.
fn timed(pid: u32, bytes: usize, f: impl FnOnce() -> Result<(), String>) -> (f64, f64) {
    let cpu0 = cpu_ms(pid);
    let t = Instant::now();
    if let Err(e) = f() {
        panic!("{e}");
    }
    let secs = t.elapsed().as_secs_f64();
    let mib = bytes as f64 / MIB as f64;
    (mib / secs, (cpu_ms(pid) - cpu0) / mib)
}

/// Context switches (voluntary + nonvoluntary) of every thread of `pid`,
/// from /proc/PID/task/*/status: each is a wakeup of the daemon.
fn ctx_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .map(|t| {
            std::fs::read_to_string(t.path().join("status"))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

fn sid(n: u32) -> String {
    format!("bbbbbbbb-0000-4000-8000-{n:012}")
}

fn terminal(conn: &ConnHandle, pid: u32) -> (f64, f64) {
    let s = sid(1);
    drive::open_session(conn, &s, WAIT).expect("open");
    drive::shell_open(conn, &s, WAIT).expect("shell");
    drive::shell_run_until(conn, &s, "stty -echo; echo W$((1+1))W\n", b"W2W", WAIT)
        .expect("shell ready");
    let t = Instant::now();
    let line = format!("head -c {SHELL_RAW} /dev/urandom | base64; echo '@@'$((2+3))'@@'\n");
    let (bytes, _) =
        drive::shell_run_until(conn, &s, &line, b"@@5@@", Duration::from_secs(300)).expect("bulk");
    let mibs = bytes as f64 / MIB as f64 / t.elapsed().as_secs_f64();
    drive::shell_stop(conn, &s, WAIT).expect("stop");
    drive::close_session(conn, &s);

    // memory per shell: one shell opened and closed first so lazily built
    // state is in the baseline
    let rss = |pid| proc_kib(pid, "smaps_rollup", "Rss:").unwrap_or(0) as f64;
    let w = sid(2);
    drive::open_session(conn, &w, WAIT).expect("open");
    drive::shell_open(conn, &w, WAIT).expect("shell");
    drive::shell_run_until(conn, &w, "echo R$((1+1))R\n", b"R2R", WAIT).expect("warm shell");
    let rss0 = rss(pid);
    let sids: Vec<String> = (0..SHELLS_FOR_RSS as u32).map(|i| sid(100 + i)).collect();
    for s in &sids {
        drive::open_session(conn, s, WAIT).expect("open");
        drive::shell_open(conn, s, WAIT).expect("shell");
        drive::shell_run_until(conn, s, "echo R$((1+1))R\n", b"R2R", WAIT).expect("shell");
    }
    let per_shell = (rss(pid) - rss0) / SHELLS_FOR_RSS as f64;
    for s in sids.iter().chain([&w]) {
        drive::shell_stop(conn, s, WAIT).expect("stop");
        drive::close_session(conn, s);
    }
    (mibs, per_shell)
}

fn port_forward(conn: &ConnHandle, pid: u32) -> [(f64, f64); 2] {
    let s = sid(3);
    drive::open_session(conn, &s, WAIT).expect("open");

    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let src = drive::pf_source(l, BULK);
    drive::pf_new(conn, &s, "down", addr, WAIT).expect("new");
    let down = timed(pid, BULK, || {
        let (n, _) = drive::pf_receive(conn, &s, "down", WAIT)?;
        if n == BULK {
            Ok(())
        } else {
            Err(format!("received {n} bytes"))
        }
    });
    src.join().expect("source");

    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let sink = drive::pf_sink(l, BULK);
    drive::pf_new(conn, &s, "up", addr, WAIT).expect("new");
    let mut got = None;
    // encoded before the clock starts: the client only moves bytes
    let frames = forwards(&s, "up", &drive::pattern(0, BULK));
    let up = timed(pid, BULK, || {
        pf_send_fast(conn, &s, frames)?;
        got = Some(sink.join().map_err(|_| "sink panicked")?);
        Ok(())
    });
    let (n, intact, sock) = got.expect("sink result");
    assert!(
        n == BULK && intact,
        "port-forward upload: {n} bytes, intact {intact}"
    );
    drive::pf_stop(conn, &s, "up", WAIT).expect("stop");
    drop(sock);
    drive::close_session(conn, &s);
    [down, up]
}

/// The ceiling of port forward client→device on this machine: the same
/// client, frames and sink, with a relay that does no work
/// ([`testbed::relay`]) in place of a daemon. Returns (MiB/s, the relay
/// thread's CPU in ms/MiB).
fn ideal_up() -> (f64, f64) {
    let mut server = Server::start_plain();
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let sink = drive::pf_sink(l, BULK);
    let s = sid(3);
    let relay_thread = Relay::start(
        server.port(),
        addr,
        relay::ack_frame(&s, "up"),
        drive::CHUNK,
    );
    let conn = server.wait_connection(WAIT).expect("the relay connected");
    let frames = forwards(&s, "up", &drive::pattern(0, BULK));
    let me = std::process::id();
    let cpu0 = sched_ms(me, Some(relay::THREAD));
    let t = Instant::now();
    pf_send_fast(&conn, &s, frames).expect("relay leg");
    let (n, intact, _sock) = sink.join().expect("sink");
    let secs = t.elapsed().as_secs_f64();
    let cpu = sched_ms(me, Some(relay::THREAD)) - cpu0;
    assert!(n == BULK && intact, "relay leg: {n} bytes, intact {intact}");
    assert!(cpu > 0.0, "no CPU time found for thread {}", relay::THREAD);
    server.stop();
    let wrote = relay_thread.join().expect("relay");
    assert_eq!(wrote, BULK as u64, "bytes the relay wrote");
    let mib = BULK as f64 / MIB as f64;
    (mib / secs, cpu / mib)
}

/// `data` as mender-cli's `forward`s (`CHUNK` bytes each), encoded.
fn forwards(sid: &str, cid: &str, data: &[u8]) -> Vec<Bytes> {
    data.chunks(drive::CHUNK)
        .map(|chunk| {
            let msg = ProtoMsg::new(PROTO_PORTFORWARD, "forward", sid)
                .with_prop("connection_id", Value::Str(cid.to_string()))
                .with_prop("user_id", Value::Str("bench-user".into()))
                .with_body(chunk.to_vec());
            codec::encode(&msg).into()
        })
        .collect()
}

/// mender-cli's way of sending (`forward`s one in flight), driven from the
/// stand-in server's own connection thread so the client adds no thread
/// hand-off to each round trip (both daemons alike).
fn pf_send_fast(conn: &ConnHandle, sid: &str, frames: Vec<Bytes>) -> Result<(), String> {
    let sid = sid.to_string();
    let run = move |x: &mut Exchange<'_>| -> Result<(), String> {
        let deadline = Instant::now() + WAIT;
        for (i, frame) in frames.into_iter().enumerate() {
            x.send_encoded(frame, deadline)?;
            loop {
                let m = x.recv_msg(deadline)?;
                if m.hdr.sid != sid || m.hdr.proto == PROTO_CONTROL {
                    continue;
                }
                if m.hdr.typ == "ack" {
                    break;
                }
                return Err(format!("port-forward send, chunk {i}: {m:?}"));
            }
        }
        Ok(())
    };
    conn.exchange(run)
        .unwrap_or_else(|| Err("connection gone".to_string()))
}

fn file_transfer(conn: &ConnHandle, pid: u32) -> [(f64, f64); 2] {
    let dir = TempDir::new("cmp-ft");
    let src = dir.join("src.bin");
    let data = drive::pattern(0, BULK);
    std::fs::write(&src, &data).expect("write source");
    let s = sid(4);
    drive::open_session(conn, &s, WAIT).expect("open");
    let down = timed(pid, BULK, || {
        let got = drive::ft_download(conn, &s, &src, WAIT)?;
        if got == data {
            Ok(())
        } else {
            Err("download differs".into())
        }
    });
    drive::close_session(conn, &s);
    let s = sid(5);
    drive::open_session(conn, &s, WAIT).expect("open");
    let dst = dir.join("dst.bin");
    let up = timed(pid, BULK, || drive::ft_upload(conn, &s, &dst, &data, WAIT));
    drive::close_session(conn, &s);
    // the Go daemon acks before it renames (transfer.md §2.4)
    testbed::wait_until(WAIT, || std::fs::read(&dst).is_ok_and(|d| d == data));
    assert!(
        std::fs::read(&dst).is_ok_and(|d| d == data),
        "upload differs"
    );
    [down, up]
}

/// One full run of one daemon; returns the figures in FIGURES order (the
/// binary size is filled in by the caller).
fn run(bin: &Path) -> Vec<f64> {
    let mut cfg: serde_json::Value = serde_json::from_str(&default_config()).expect("config");
    cfg["ShellArguments"] = serde_json::json!([]);
    cfg["Sessions"] = serde_json::json!({ "MaxPerUser": 32 });
    let bus = DbusDaemon::start();
    let mut server = Server::start_plain();
    let port = server.port();
    let _auth = AuthService::start(bus.address(), "bench-token", &server.url());
    let t = Instant::now();
    let daemon = Daemon::spawn_with_binary(bin, &cfg.to_string(), bus.address(), &[], false);
    let conn = server.wait_connection(CONNECT_WAIT);
    let connect_ms = t.elapsed().as_secs_f64() * 1000.0;
    if conn.is_none() {
        daemon.dump_log();
        panic!("{} did not connect", bin.display());
    }
    let pid = daemon.pid();

    park(IDLE);
    let hwm_idle = proc_kib(pid, "status", "VmHWM:").unwrap_or(0) as f64;
    let anon_idle = proc_kib(pid, "status", "RssAnon:").unwrap_or(0) as f64;
    let pss_idle = proc_kib(pid, "smaps_rollup", "Pss:").unwrap_or(0) as f64;
    // threads that exit in the window take their counts with them; none
    // should come or go while idle
    let cs0 = ctx_switches(pid);
    park(IDLE_WAKEUPS);
    let wakeups =
        (ctx_switches(pid).saturating_sub(cs0)) as f64 * 60.0 / IDLE_WAKEUPS.as_secs_f64();

    // server restart: cut every connection, listen again on the same port
    server.stop();
    let t = Instant::now();
    server = Server::start_plain_on(port);
    let conn = server.wait_connection(CONNECT_WAIT);
    let reconnect_ms = t.elapsed().as_secs_f64() * 1000.0;
    let Some(conn) = conn else {
        daemon.dump_log();
        panic!("{} did not reconnect", bin.display());
    };

    let (shell_mibs, rss_per_shell) = terminal(&conn, pid);
    let [pf_down, pf_up] = port_forward(&conn, pid);
    let [ft_down, ft_up] = file_transfer(&conn, pid);
    let hwm_end = proc_kib(pid, "status", "VmHWM:").unwrap_or(0) as f64;
    drop(server);
    vec![
        connect_ms,
        reconnect_ms,
        hwm_idle,
        anon_idle,
        pss_idle,
        wakeups,
        rss_per_shell,
        pf_down.0,
        pf_down.1,
        pf_up.0,
        pf_up.1,
        ft_down.0,
        ft_down.1,
        ft_up.0,
        ft_up.1,
        shell_mibs,
        hwm_end,
        0.0,
    ]
}

/// [`run`], once more if it fails: one flaky round (a shell of the Go
/// daemon once gave no output within a minute) should not cost the other
/// rounds. The daemon, bus and files are cleaned up by their guards as the
/// panic unwinds; a second failure ends the bench. Every rerun is kept in
/// `reruns` with its reason, which the summary prints: a failure, data
/// corruption included, is never hidden by the rerun.
fn run_retrying(bin: &Path, name: &str, reruns: &mut Vec<String>) -> Vec<f64> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(bin))) {
        Ok(r) => r,
        Err(e) => {
            let why = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "(no message)".into());
            eprintln!("  {name}: round failed (above); running it once more");
            reruns.push(format!("{name}: {why}"));
            run(bin)
        }
    }
}

fn fmt(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn spread(v: &[f64]) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{}–{}", fmt(lo), fmt(hi))
}

fn main() {
    let a = testbed::bench::pair_args();
    let names = ["ours", "Go 2.1.0"];
    let bins = [a.ours.clone(), a.theirs.clone()];
    for b in &bins {
        assert!(b.exists(), "{} not found", b.display());
    }
    let sizes = [stripped_kib(&bins[0]), stripped_kib(&bins[1])];
    let mut results: [Vec<Vec<f64>>; 2] = [Vec::new(), Vec::new()];
    let mut ideal = Vec::new();
    let mut reruns = Vec::new();
    for round in 0..a.rounds {
        let (mibs, cpu) = ideal_up();
        eprintln!(
            "round {}/{}: zero-work relay: port-forward client->device={} MiB/s; CPU per MiB={} ms/MiB",
            round + 1,
            a.rounds,
            fmt(mibs),
            fmt(cpu)
        );
        ideal.push((mibs, cpu));
        // alternate the order so neither always runs on a warmer machine
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            eprintln!(
                "round {}/{}: {} ({})",
                round + 1,
                a.rounds,
                names[i],
                bins[i].display()
            );
            let mut r = run_retrying(&bins[i], names[i], &mut reruns);
            let last = r.len() - 1;
            r[last] = sizes[i];
            eprintln!(
                "  {}",
                FIGURES
                    .iter()
                    .zip(&r)
                    .map(|(f, v)| format!("{}={} {}", f.label.trim(), fmt(*v), f.unit))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            results[i].push(r);
        }
    }

    let col = |i: usize, f: usize| results[i].iter().map(|r| r[f]).collect::<Vec<f64>>();
    println!();
    println!(
        "Medians of {} rounds (min–max in brackets); ratio = ours / Go; \"better\" = which way is better",
        a.rounds
    );
    println!(
        "| {:<34} | {:>8} | {:>22} | {:>22} | {:>7} | {:<6} |",
        "figure", "unit", "ours", "Go 2.1.0", "ratio", "better"
    );
    println!(
        "|{:-<36}|{:-<10}|{:-<24}|{:-<24}|{:-<9}|{:-<8}|",
        "", "", "", "", "", ""
    );
    for (f, fig) in FIGURES.iter().enumerate() {
        let (o, g) = (col(0, f), col(1, f));
        let (mo, mg) = (median(&o), median(&g));
        let ratio = if mg > 0.0 {
            format!("{:.2}", mo / mg)
        } else {
            "-".into()
        };
        println!(
            "| {:<34} | {:>8} | {:>22} | {:>22} | {:>7} | {:<6} |",
            fig.label,
            fig.unit,
            format!("{} ({})", fmt(mo), spread(&o)),
            format!("{} ({})", fmt(mg), spread(&g)),
            ratio,
            if fig.lower_better { "lower" } else { "higher" }
        );
    }
    let up = FIGURES
        .iter()
        .position(|f| f.label == "port-forward client->device")
        .expect("the client->device figure");
    let relay_mibs: Vec<f64> = ideal.iter().map(|r| r.0).collect();
    let relay_cpu: Vec<f64> = ideal.iter().map(|r| r.1).collect();
    let (mr, mo, mg) = (
        median(&relay_mibs),
        median(&col(0, up)),
        median(&col(1, up)),
    );
    println!();
    println!(
        "Ceiling of port-forward client->device here: a relay that does no work (testbed::relay: \
         the websocket and the syscalls, no daemon), same client and sink: {} MiB/s ({}) at {} ms/MiB, \
         {:.2}x Go's median: about the most any daemon can show on this machine; ours reaches {:.2} of it, Go {:.2}.",
        fmt(mr),
        spread(&relay_mibs),
        fmt(median(&relay_cpu)),
        mr / mg,
        mo / mr,
        mg / mr
    );
    if !reruns.is_empty() {
        println!();
        println!("Rounds run again after a failure ({}):", reruns.len());
        for r in &reruns {
            println!("- {r}");
        }
    }
}
