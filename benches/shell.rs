//! Remote-terminal numbers (printed, not asserted): bulk output throughput
//! through the stand-in server, and daemon memory per open shell.
//!
//! `cargo bench --bench shell [-- --bin PATH]` (release profile; the daemon
//! binary under test is the bench build's `mender-connect` unless given). Each
//! shell gets its own session (control `open` first, as deviceconnect does);
//! the memory line is followed by where that memory lives (new thread
//! stacks, grown mappings).

use std::time::{Duration, Instant};

use testbed::{
    AuthService, ConnHandle, Daemon, DbusDaemon, Server, TIMEOUT, default_config, drive,
};

/// Raw bytes fed to base64; its output is 4/3 of this plus newlines ≈ 20 MiB.
const RAW_BYTES: usize = 15 * 1024 * 1024;
const SHELLS_FOR_RSS: usize = 10;

fn open(conn: &ConnHandle, sid: &str) {
    // as deviceconnect does (and the compare bench): control open first
    drive::open_session(conn, sid, TIMEOUT).expect("session opened");
    drive::shell_open(conn, sid, TIMEOUT).expect("shell opened");
}

fn run_until(conn: &ConnHandle, sid: &str, line: &str, marker: &[u8]) -> (usize, usize) {
    drive::shell_run_until(conn, sid, line, marker, Duration::from_secs(120)).expect("shell output")
}

fn rollup(pid: u32) -> (u64, u64, u64) {
    let field = |name: &str| drive::proc_kib(pid, "smaps_rollup", name).unwrap_or(0);
    (field("Rss:"), field("Pss:"), field("Anonymous:"))
}

/// (start address, size KiB, Rss KiB, name) of every mapping.
fn maps(pid: u32) -> Vec<(String, u64, u64, String)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut out: Vec<(String, u64, u64, String)> = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.first()
            .is_some_and(|a| a.contains('-') && !a.ends_with(':'))
        {
            let start = f[0].split('-').next().unwrap_or("").to_string();
            out.push((start, 0, 0, f.get(5).unwrap_or(&"").to_string()));
        } else if let (Some(last), Some(&k), Some(v)) = (out.last_mut(), f.first(), f.get(1)) {
            let v = v.parse().unwrap_or(0);
            match k {
                "Size:" => last.1 = v,
                "Rss:" => last.2 = v,
                _ => {}
            }
        }
    }
    out
}

/// Where the Rss that came with the shells lives: new anonymous mappings
/// (thread stacks) by size, and growth of the mappings that were there.
fn breakdown(before: &[(String, u64, u64, String)], after: &[(String, u64, u64, String)]) {
    use std::collections::BTreeMap;
    let old: BTreeMap<&str, u64> = before.iter().map(|m| (m.0.as_str(), m.2)).collect();
    let mut new_by_size: BTreeMap<(u64, String), (u64, u64)> = BTreeMap::new();
    let mut grown: BTreeMap<String, i64> = BTreeMap::new();
    for m in after {
        match old.get(m.0.as_str()) {
            None => {
                let e = new_by_size.entry((m.1, m.3.clone())).or_default();
                e.0 += 1;
                e.1 += m.2;
            }
            Some(&r) if r != m.2 => {
                *grown.entry(format!("{} ({} KiB)", m.3, m.1)).or_default() += m.2 as i64 - r as i64
            }
            _ => {}
        }
    }
    for ((size, name), (n, rss)) in new_by_size {
        println!("  new mappings of {size} KiB {name:?}: {n}, Rss {rss} KiB");
    }
    for (name, d) in grown {
        println!("  grown: {name:?} {d:+} KiB");
    }
}

fn main() {
    // `--bin PATH` runs another daemon binary; cargo's `--bench` is ignored
    let mut bin = testbed::daemon::binary().map(std::path::PathBuf::from);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--bin" {
            bin = args.next().map(std::path::PathBuf::from);
        }
    }
    let bin = bin.expect("bench binary");
    let mut cfg: serde_json::Value = serde_json::from_str(&default_config()).expect("config");
    cfg["ShellArguments"] = serde_json::json!([]);
    cfg["Sessions"] = serde_json::json!({ "MaxPerUser": 16 });
    let bus = DbusDaemon::start();
    let server = Server::start_plain();
    let _auth = AuthService::start(bus.address(), "bench", &server.url());
    let daemon = Daemon::spawn_with_binary(&bin, &cfg.to_string(), bus.address(), &[], false);
    let conn = server.wait_connection(TIMEOUT).expect("daemon connected");
    let pid = daemon.pid();

    // --- throughput ---
    let sid = "bench-bulk-0000";
    open(&conn, sid);
    run_until(&conn, sid, "stty -echo; echo W$((1+1))W\n", b"W2W");
    let t = Instant::now();
    let (bytes, msgs) = run_until(
        &conn,
        sid,
        &format!("head -c {RAW_BYTES} /dev/urandom | base64; echo '@@'$((2+3))'@@'\n"),
        b"@@5@@",
    );
    let secs = t.elapsed().as_secs_f64();
    println!(
        "shell bulk output: {:.1} MiB in {secs:.2} s = {:.1} MiB/s, {msgs} messages, {:.0} bytes/message",
        bytes as f64 / 1048576.0,
        bytes as f64 / 1048576.0 / secs,
        bytes as f64 / msgs as f64
    );
    let _ = drive::shell_stop(&conn, sid, TIMEOUT);

    // --- memory per shell ---
    // one shell opened and closed first, so lazily built state is in the baseline
    open(&conn, "bench-warm");
    run_until(&conn, "bench-warm", "echo R$((1+1))R\n", b"R2R");
    if std::env::var_os("SHELL_BENCH_STOP_WARM").is_some() {
        let _ = drive::shell_stop(&conn, "bench-warm", TIMEOUT);
    }
    let threads = || drive::thread_count(pid);
    let base_threads = {
        let mut last = threads();
        // settle: wait until the stopped shells' threads are gone
        testbed::wait_until(TIMEOUT, || {
            let now = threads();
            let settled = now == last
                && !std::fs::read_dir(format!("/proc/{pid}/task"))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .any(|t| {
                        std::fs::read_to_string(t.path().join("comm"))
                            .is_ok_and(|c| c.starts_with("shell-"))
                    });
            last = now;
            settled
        });
        last
    };
    let (rss0, pss0, anon0) = rollup(pid);
    let maps0 = maps(pid);
    for i in 0..SHELLS_FOR_RSS {
        let sid = format!("bench-rss-{i:04}");
        open(&conn, &sid);
        run_until(&conn, &sid, "echo R$((1+1))R\n", b"R2R");
    }
    let (rss1, pss1, anon1) = rollup(pid);
    let maps1 = maps(pid);
    let n = SHELLS_FOR_RSS as u64;
    println!(
        "daemon memory with {SHELLS_FOR_RSS} shells open (shell processes excluded): \
         Rss +{} KiB ({} KiB/shell), Pss +{} KiB ({} KiB/shell), Anonymous +{} KiB ({} KiB/shell); \
         threads {} -> {}",
        rss1.saturating_sub(rss0),
        rss1.saturating_sub(rss0) / n,
        pss1.saturating_sub(pss0),
        pss1.saturating_sub(pss0) / n,
        anon1.saturating_sub(anon0),
        anon1.saturating_sub(anon0) / n,
        base_threads,
        threads()
    );
    println!("daemon totals: Rss {rss1} KiB, Pss {pss1} KiB, Anonymous {anon1} KiB");
    breakdown(&maps0, &maps1);
    for i in 0..SHELLS_FOR_RSS {
        let _ = drive::shell_stop(&conn, &format!("bench-rss-{i:04}"), TIMEOUT);
    }
}
