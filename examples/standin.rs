//! Stand-in environment for demos: a private D-Bus with a stand-in Mender
//! auth service and a stand-in deviceconnect server, optionally running the
//! daemon against them, logging every frame the device sends.
//!
//! ```text
//! cargo run --example standin                          # print the environment, wait
//! cargo build && cargo run --example standin -- \
//!     --daemon target/debug/mender-connect --config my.conf
//! ```
//!
//! Options: `--daemon PATH` (binary to run), `--config FILE` (its config;
//! default: a valid config for the current user), `--token TOKEN` (default
//! `demo-token`). Stops on Ctrl-C, SIGTERM or end of stdin.

#[path = "../tests/common/mod.rs"]
mod common;

use common::{AuthService, Daemon, DbusDaemon, Event, Server};
use std::io::Read;
use std::path::PathBuf;

struct Args {
    daemon: Option<PathBuf>,
    config: Option<PathBuf>,
    token: String,
}

fn usage() -> ! {
    eprintln!("usage: standin [--daemon PATH] [--config FILE] [--token TOKEN]");
    std::process::exit(2);
}

fn parse_args() -> Args {
    let mut args = Args {
        daemon: None,
        config: None,
        token: "demo-token".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--daemon" => args.daemon = Some(value().into()),
            "--config" => args.config = Some(value().into()),
            "--token" => args.token = value(),
            _ => usage(),
        }
    }
    args
}

/// Blocks SIGINT/SIGTERM in every thread and turns them into a message from
/// a dedicated `sigwait` thread. Must run before any other thread starts.
fn signal_channel() -> crossbeam_channel::Receiver<i32> {
    // SAFETY: plain libc calls on a local, initialised sigset.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::Builder::new()
        .name("sigwait".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: `set` is a valid sigset; sig is a valid out pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                let _ = tx.send(sig);
            }
        })
        .expect("spawn sigwait");
    rx
}

fn stdin_eof_channel() -> crossbeam_channel::Receiver<()> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::Builder::new()
        .name("stdin-eof".into())
        .spawn(move || {
            let mut buf = [0u8; 4096];
            let mut stdin = std::io::stdin();
            while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
            let _ = tx.send(());
        })
        .expect("spawn stdin-eof");
    rx
}

fn describe_frame(data: &[u8]) -> String {
    match mender_connect::conn::codec::decode(data) {
        Ok(m) => format!(
            "proto={:#x} typ={:?} sid={:?} props={:?} body={}",
            m.hdr.proto,
            m.hdr.typ,
            m.hdr.sid,
            m.hdr.props,
            match &m.body {
                None => "none".to_string(),
                Some(b) => describe_body(m.hdr.proto, b),
            }
        ),
        Err(e) => format!("undecodable: {e}"),
    }
}

/// Control bodies are nested msgpack documents; show them decoded.
fn describe_body(proto: u16, b: &[u8]) -> String {
    if proto == mender_connect::conn::codec::PROTO_CONTROL
        && let Ok(fields) = mender_connect::conn::control::decode_map(b)
    {
        return format!("{fields:?}");
    }
    match std::str::from_utf8(b) {
        Ok(s) if s.len() <= 120 => format!("{s:?}"),
        _ => format!("{} bytes", b.len()),
    }
}

/// Does what deviceconnect and mender-cli do first on a session: the
/// handshake, so the demo shows which protocols the device offers.
fn send_handshake(server: &Server, conn: usize) {
    use mender_connect::conn::codec::{PROTO_CONTROL, ProtoMsg};
    use mender_connect::conn::control::Open;
    if let Some(c) = server.connection(conn) {
        let open = ProtoMsg::new(PROTO_CONTROL, "open", "demo-session")
            .with_body(Open { versions: vec![1] }.encode());
        println!("[conn {conn}] -> open {{versions: [1]}} sid=\"demo-session\"");
        c.send_msg(&open);
    }
}

fn print_event(ev: &Event) {
    match ev {
        Event::Upgrade { conn, request } => match conn {
            Some(c) => println!(
                "[conn {c}] upgrade accepted: {} Authorization={:?}",
                request.uri,
                request.header("authorization").unwrap_or("")
            ),
            None => println!("upgrade rejected with {}: {}", request.status, request.uri),
        },
        Event::Frame { conn, frame } => {
            println!(
                "[conn {conn}] <- {} {} bytes (0x{:x}): {}",
                if frame.text { "text" } else { "binary" },
                frame.data.len(),
                frame.data.len(),
                common::hex(&frame.data, 48)
            );
            println!("[conn {conn}]    {}", describe_frame(&frame.data));
        }
        Event::Ping { conn, payload } => {
            println!(
                "[conn {conn}] <- ping {:?}",
                String::from_utf8_lossy(payload)
            )
        }
        Event::Pong { conn, payload } => {
            println!(
                "[conn {conn}] <- pong {:?}",
                String::from_utf8_lossy(payload)
            )
        }
        Event::Close { conn, code, reason } => {
            println!("[conn {conn}] <- close {code} {reason:?}")
        }
        Event::Closed { conn, error } => match error {
            Some(e) => println!("[conn {conn}] closed: {e}"),
            None => println!("[conn {conn}] closed"),
        },
    }
}

fn main() {
    let args = parse_args();
    let signals = signal_channel();
    let eof = stdin_eof_channel();

    let bus = DbusDaemon::start();
    let server = Server::start_plain();
    let events = server.subscribe();
    let auth = AuthService::start(bus.address(), &args.token, &server.url());
    println!("DBUS_SYSTEM_BUS_ADDRESS={}", bus.address());
    println!("SERVER_URL={}", server.url());
    println!("TOKEN={}", args.token);

    let mut daemon = args.daemon.as_ref().map(|bin| {
        let config = match &args.config {
            Some(p) => std::fs::read_to_string(p)
                .unwrap_or_else(|e| panic!("reading {}: {e}", p.display())),
            None => common::default_config(),
        };
        let d = Daemon::spawn_with_binary(bin, &config, bus.address(), &[], true);
        println!("daemon pid {} (log: {})", d.pid(), d.log_file().display());
        d
    });
    println!("Ctrl-C or end of stdin to stop.");

    loop {
        crossbeam_channel::select! {
            recv(events) -> ev => match ev {
                Ok(ev) => {
                    print_event(&ev);
                    if let Event::Upgrade { conn: Some(c), .. } = ev {
                        send_handshake(&server, c);
                    }
                }
                Err(_) => break,
            },
            recv(signals) -> sig => {
                println!("signal {}, stopping", sig.unwrap_or(0));
                break;
            }
            recv(eof) -> _ => {
                println!("end of stdin, stopping");
                break;
            }
        }
    }

    if let Some(d) = daemon.as_mut() {
        d.signal(libc::SIGTERM);
        match d.wait_exit(common::TIMEOUT) {
            Some(s) => println!("daemon exited: {s}"),
            None => println!("daemon did not exit on SIGTERM; killing it"),
        }
    }
    drop(daemon);
    drop(auth);
    drop(server);
    drop(bus);
}
