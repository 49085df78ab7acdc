//! Prints the release binary's stripped size and the daemon's memory after
//! connecting over plain ws and idling 10 s (issue: the spine's bench).
//! Run: `cargo bench --bench idle`.

use std::process::Command;
use std::time::{Duration, Instant};

use testbed::{AuthService, Daemon, DbusDaemon, Server, TIMEOUT, TempDir, default_config};

fn main() {
    let bin = env!("CARGO_BIN_EXE_mender-connect");
    let dir = TempDir::new("bench-idle");
    let stripped = dir.join("mender-connect.stripped");
    let ok = Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(bin)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let size = std::fs::metadata(if ok { stripped.as_path() } else { bin.as_ref() })
        .map(|m| m.len())
        .unwrap_or(0);

    let idle_secs: u64 = std::env::var("IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let bus = DbusDaemon::start();
    let server = Server::start_plain();
    let _auth = AuthService::start(bus.address(), "bench-token", &server.url());
    let started = Instant::now();
    let daemon =
        Daemon::spawn_with_binary(bin.as_ref(), &default_config(), bus.address(), &[], false);
    let conn = server.wait_connection(TIMEOUT).expect("daemon connected");
    let connect_ms = started.elapsed().as_secs_f64() * 1000.0;
    let until = Instant::now() + Duration::from_secs(idle_secs);
    while Instant::now() < until {
        std::thread::park_timeout(until - Instant::now());
    }
    assert!(conn.is_open(), "connection dropped while idling");
    let pid = daemon.pid();
    let pss = testbed::drive::proc_kib(pid, "smaps_rollup", "Pss:").unwrap_or(0);
    let rss = testbed::drive::proc_kib(pid, "smaps_rollup", "Rss:").unwrap_or(0);
    let anon = testbed::drive::proc_kib(pid, "status", "RssAnon:").unwrap_or(0);
    let hwm = testbed::drive::proc_kib(pid, "status", "VmHWM:").unwrap_or(0);
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0);
    println!("mender-connect idle bench (plain ws, {idle_secs} s idle)");
    println!(
        "  stripped binary size : {size} bytes ({:.2} MiB)",
        size as f64 / 1048576.0
    );
    println!("  start -> connected   : {connect_ms:.0} ms");
    println!("  Pss                  : {pss} KiB");
    println!("  Rss                  : {rss} KiB");
    println!("  RssAnon              : {anon} KiB");
    println!("  VmHWM                : {hwm} KiB");
    println!("  threads              : {threads}");
}
