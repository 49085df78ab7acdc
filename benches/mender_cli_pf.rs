//! End to end, as an operator pushes a file onto a device: 20 MiB through
//! the real `mender-cli port-forward` (Debian's, 1.9.0: 4096-byte
//! `forward`s, one in flight) via the stand-in management API and
//! deviceconnect, into a sink on the device side. Ours against another
//! daemon (the Go 2.1.0 one), alternating, several rounds; prints MiB/s and
//! the daemon's CPU (utime+stime) per MiB of each run and the medians.
//!
//! Run: `cargo bench --bench mender_cli_pf -- --theirs PATH [--ours PATH]
//! [--rounds N]` (needs `mender-cli` on PATH; the Go daemon takes ~10 s to
//! connect).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use testbed::bench::median;

use testbed::drive::cpu_ms;
use testbed::{AuthService, Daemon, DbusDaemon, Management, Server, TempDir, default_config};

const TOTAL: usize = 20 << 20;
const TOKEN: &str = "token-mender-cli";
const WAIT: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind")
        .port()
}

/// (MiB/s, daemon CPU ms per MiB) of one 20 MiB push.
fn run(bin: &Path, cli: &Path) -> (f64, f64) {
    let mut cfg: serde_json::Value = serde_json::from_str(&default_config()).expect("config");
    cfg["ShellArguments"] = serde_json::json!([]);
    let bus = DbusDaemon::start();
    let server = Server::start_plain();
    let mgmt = Management::start(&server);
    let _auth = AuthService::start(bus.address(), TOKEN, &server.url());
    let daemon = Daemon::spawn_with_binary(bin, &cfg.to_string(), bus.address(), &[], false);
    assert!(mgmt.wait_device(WAIT), "{} never connected", bin.display());
    let pid = daemon.pid();

    let sink = TcpListener::bind("127.0.0.1:0").expect("bind sink");
    let sink_port = sink.local_addr().expect("addr").port();
    let (done_tx, done_rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let Ok((mut s, _)) = sink.accept() else {
            return;
        };
        let mut buf = vec![0u8; 256 * 1024];
        let mut n = 0;
        while n < TOTAL {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
        }
        let _ = done_tx.send((n, Instant::now()));
    });
    let home = TempDir::new("cli-pf-home");
    let local = free_port();
    let mut child = Command::new(cli)
        .arg("--server")
        .arg(mgmt.url())
        .arg("--token-value")
        .arg(TOKEN)
        .args([
            "port-forward",
            mgmt.device_id(),
            &format!("{local}:127.0.0.1:{sink_port}"),
        ])
        .env("HOME", home.path())
        .env_remove("XDG_CONFIG_HOME")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mender-cli port-forward");
    let mut conn = None;
    assert!(
        testbed::wait_until(WAIT, || {
            conn = TcpStream::connect(("127.0.0.1", local)).ok();
            conn.is_some()
        }),
        "mender-cli never listened"
    );
    let mut s = conn.expect("connected");
    let data = vec![0x5au8; TOTAL];
    let cpu0 = cpu_ms(pid);
    let t = Instant::now();
    s.write_all(&data).expect("write 20 MiB");
    let (n, end) = done_rx
        .recv_timeout(Duration::from_secs(600))
        .expect("sink");
    let secs = end.duration_since(t).as_secs_f64();
    let cpu = cpu_ms(pid) - cpu0;
    assert_eq!(n, TOTAL, "sink got {n} bytes");
    drop(s);
    let _ = child.kill();
    let _ = child.wait();
    let mib = TOTAL as f64 / (1 << 20) as f64;
    (mib / secs, cpu / mib)
}

fn main() {
    let pair = testbed::bench::pair_args();
    let rounds = pair.rounds;
    let bins = [pair.ours, pair.theirs];
    let cli = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("mender-cli"))
        .find(|p| p.is_file())
        .expect("mender-cli on PATH");
    let mut res: [Vec<(f64, f64)>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let r = run(&bins[i], &cli);
            eprintln!(
                "round {}: {}: {:.1} MiB/s, {:.1} ms CPU/MiB",
                round + 1,
                bins[i].display(),
                r.0,
                r.1
            );
            res[i].push(r);
        }
    }
    for (i, name) in ["ours", "theirs"].iter().enumerate() {
        let mibs: Vec<f64> = res[i].iter().map(|r| r.0).collect();
        let cpu: Vec<f64> = res[i].iter().map(|r| r.1).collect();
        println!(
            "{name} ({}): median {:.1} MiB/s, {:.1} ms daemon CPU per MiB (MiB/s {:?}; CPU {:?})",
            bins[i].display(),
            median(&mibs),
            median(&cpu),
            mibs.iter()
                .map(|v| (v * 10.0).round() / 10.0)
                .collect::<Vec<_>>(),
            cpu.iter()
                .map(|v| (v * 10.0).round() / 10.0)
                .collect::<Vec<_>>()
        );
    }
}
