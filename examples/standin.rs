//! Stand-in environment for demos: a private D-Bus with a stand-in Mender
//! auth service and a stand-in deviceconnect server (device endpoint and
//! management API, so Debian's `mender-cli` can talk to it), optionally
//! running the daemon against them.
//!
//! ```text
//! cargo run --example standin                          # print the environment, wait
//! cargo build && cargo run --example standin -- \
//!     --daemon target/debug/mender-connect --config my.conf
//! ```
//!
//! With `--daemon`, `mender-cli` installed and stdin/stdout on a terminal,
//! it opens a real remote shell on the local daemon with `mender-cli
//! terminal` (Ctrl-] or `exit` ends it, and the demo with it). Otherwise it
//! logs every frame the device sends and prints the mender-cli command lines
//! to use from another terminal.
//!
//! Options: `--daemon PATH` (binary to run), `--config FILE` (its config;
//! default: a valid config for the current user, with `/bin/bash --login`
//! as the shell when bash exists), `--token TOKEN` (default `demo-token`),
//! `--no-terminal` (log frames even on a terminal). Stops on Ctrl-C, SIGTERM
//! or end of stdin (logging mode).

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use testbed::{AuthService, Daemon, DbusDaemon, Event, Management, Server};

struct Args {
    daemon: Option<PathBuf>,
    config: Option<PathBuf>,
    token: String,
    no_terminal: bool,
}

fn usage() -> ! {
    eprintln!("usage: standin [--daemon PATH] [--config FILE] [--token TOKEN] [--no-terminal]");
    std::process::exit(2);
}

fn parse_args() -> Args {
    let mut args = Args {
        daemon: None,
        config: None,
        token: "demo-token".into(),
        no_terminal: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--daemon" => args.daemon = Some(value().into()),
            "--config" => args.config = Some(value().into()),
            "--token" => args.token = value(),
            "--no-terminal" => args.no_terminal = true,
            _ => usage(),
        }
    }
    args
}

/// The installed mender-cli, if any.
fn mender_cli() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("mender-cli"))
        .find(|p| p.is_file())
}

/// The demo's default daemon config: the test bed's, with a login bash
/// when there is one (dash, the usual /bin/sh, refuses `--login`).
fn demo_config() -> String {
    let mut cfg: serde_json::Value =
        serde_json::from_str(&testbed::default_config()).expect("default config");
    if Path::new("/bin/bash").exists() {
        cfg["ShellCommand"] = "/bin/bash".into();
        cfg["ShellArguments"] = serde_json::json!(["--login"]);
    } else {
        cfg["ShellArguments"] = serde_json::json!(["-i"]);
    }
    cfg.to_string()
}

/// Runs `mender-cli … terminal DEVICE` on our terminal until it exits or a
/// signal arrives (then it is killed).
fn run_terminal(
    cli: &Path,
    args: &[String],
    signals: &crossbeam_channel::Receiver<i32>,
) -> Option<ExitStatus> {
    let mut cmd = Command::new(cli);
    cmd.args(args);
    // SAFETY: only sigprocmask (async-signal-safe) between fork and exec:
    // the child must not inherit our blocked SIGINT/SIGTERM.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot run {}: {e}", cli.display());
            return None;
        }
    };
    let pid = child.id();
    let (tx, rx) = crossbeam_channel::bounded(1);
    let waiter = std::thread::Builder::new()
        .name("cli-wait".into())
        .spawn(move || {
            let _ = tx.send(child.wait());
        })
        .expect("spawn cli-wait");
    let status = crossbeam_channel::select! {
        recv(rx) -> st => st.ok().and_then(Result::ok),
        recv(signals) -> _ => {
            // SAFETY: our own child, not reaped yet (the waiter has not sent).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
            rx.recv().ok().and_then(Result::ok)
        }
    };
    let _ = waiter.join();
    status
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
    match mender_connect::wire::codec::decode(data) {
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
    if proto == mender_connect::wire::codec::PROTO_CONTROL
        && let Ok(fields) = mender_connect::wire::control::decode_map(b)
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
    use mender_connect::wire::codec::{PROTO_CONTROL, ProtoMsg};
    use mender_connect::wire::control::Open;
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
                testbed::hex(&frame.data, 48)
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

    let bus = DbusDaemon::start();
    let server = Server::start_plain();
    let mgmt = Management::start(&server);
    let events = server.subscribe();
    let auth = AuthService::start(bus.address(), &args.token, &server.url());
    println!("DBUS_SYSTEM_BUS_ADDRESS={}", bus.address());
    println!("SERVER_URL={}", server.url());
    println!("TOKEN={}", args.token);
    println!("DEVICE_ID={}", mgmt.device_id());

    let mut daemon = args.daemon.as_ref().map(|bin| {
        let config = match &args.config {
            Some(p) => std::fs::read_to_string(p)
                .unwrap_or_else(|e| panic!("reading {}: {e}", p.display())),
            None => demo_config(),
        };
        let d = Daemon::spawn_with_binary(bin, &config, bus.address(), &[], true);
        println!("daemon pid {} (log: {})", d.pid(), d.log_file().display());
        d
    });

    let cli_base = |sub: &[&str]| -> Vec<String> {
        ["--server", mgmt.url(), "--token-value", args.token.as_str()]
            .iter()
            .chain(sub)
            .map(|s| s.to_string())
            .collect()
    };
    let terminal_args = cli_base(&["terminal", mgmt.device_id()]);
    let show = |a: &[String]| format!("mender-cli {}", a.join(" "));
    // SAFETY: isatty only inspects the descriptors.
    let on_tty = unsafe { libc::isatty(0) == 1 && libc::isatty(1) == 1 };
    let cli = mender_cli();

    if let (Some(cli), Some(_), true, false) = (&cli, &daemon, on_tty, args.no_terminal) {
        // Nobody reads the frame log in this mode.
        drop(events);
        if !mgmt.wait_device(testbed::TIMEOUT) {
            eprintln!("the daemon did not connect; see its log");
        } else {
            println!("Remote terminal on the local daemon (Ctrl-] or `exit` ends it):");
            println!("  {}", show(&terminal_args));
            match run_terminal(cli, &terminal_args, &signals) {
                Some(st) => println!("mender-cli exited: {st}"),
                None => println!("mender-cli did not run"),
            }
        }
    } else {
        if daemon.is_some() {
            println!("With mender-cli, from another terminal:");
            println!("  {}", show(&terminal_args));
            println!(
                "  {}",
                show(&cli_base(&["port-forward", mgmt.device_id(), "8080:80"]))
            );
            println!(
                "  {}",
                show(&cli_base(&[
                    "cp",
                    &format!("{}:/etc/hostname", mgmt.device_id()),
                    "./hostname"
                ]))
            );
            if cli.is_none() {
                println!("(mender-cli is not installed: apt-get install mender-cli)");
            }
        }
        log_until_stopped(&server, &events, &signals);
    }

    if let Some(d) = daemon.as_mut() {
        d.signal(libc::SIGTERM);
        match d.wait_exit(testbed::TIMEOUT) {
            Some(s) => println!("daemon exited: {s}"),
            None => println!("daemon did not exit on SIGTERM; killing it"),
        }
    }
    drop(daemon);
    drop(auth);
    drop(mgmt);
    drop(server);
    drop(bus);
}

/// Logging mode: every server event, until a signal or end of stdin.
fn log_until_stopped(
    server: &Server,
    events: &crossbeam_channel::Receiver<Event>,
    signals: &crossbeam_channel::Receiver<i32>,
) {
    let eof = stdin_eof_channel();
    println!("Ctrl-C or end of stdin to stop.");
    loop {
        crossbeam_channel::select! {
            recv(events) -> ev => match ev {
                Ok(ev) => {
                    print_event(&ev);
                    if let Event::Upgrade { conn: Some(c), .. } = ev {
                        send_handshake(server, c);
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
}
