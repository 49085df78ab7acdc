//! gdb on the device: attach to a running daemon that has an open shell
//! session and check that the backtraces are readable — every thread named,
//! the daemon's own functions resolved — with the symbols coming from a
//! separate debug file, as on a device (stripped binary + `-dbgsym`/`-dbg`).
//!
//! The binary is the test build (`cargo test`, debug info) split the way
//! `packaging/cross/build.sh` and dh_strip do it: `objcopy --only-keep-debug`
//! into `mender-connect.debug`, then `--strip-all --add-gnu-debuglink`. gdb
//! finds the debug file next to the executable through the debuglink.
//! Skips (passes with a message) when gdb or objcopy is not installed.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use mender_connect::wire::codec::{
    PROTO_CONTROL, PROTO_FILETRANSFER, PROTO_SHELL, ProtoMsg, Value,
};
use mender_connect::wire::control::{Open, encode_map};
use testbed::{AuthService, ConnHandle, Daemon, DbusDaemon, Server, TIMEOUT, TempDir};

/// gdb reads a ~100 MB debug file on a shared 2-core machine: be generous.
const GDB_TIMEOUT: Duration = Duration::from_secs(180);
const SID: &str = "5e1f0a2b-6c2b-4d5e-9a57-000000000001";

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The stripped binary (with a debuglink) and its debug file, in `dir`.
fn split_binary(dir: &Path) -> std::path::PathBuf {
    let src = testbed::daemon::binary().expect("integration test binary");
    let bin = dir.join("mender-connect");
    let dbg = dir.join("mender-connect.debug");
    run_ok(
        Command::new("objcopy")
            .arg("--only-keep-debug")
            .arg(src)
            .arg(&dbg),
    );
    // the debuglink records the file name only; gdb looks for it beside the binary
    run_ok(
        Command::new("objcopy")
            .arg("--strip-all")
            .arg(format!("--add-gnu-debuglink={}", dbg.display()))
            .arg(src)
            .arg(&bin),
    );
    let sections = Command::new("readelf")
        .arg("-S")
        .arg(&bin)
        .output()
        .expect("readelf");
    let sections = String::from_utf8_lossy(&sections.stdout);
    assert!(
        !sections.contains(".symtab") && !sections.contains(".debug_info"),
        "{} is not stripped:\n{sections}",
        bin.display()
    );
    bin
}

/// Messages of one protocol/sid/type from the server side of the link.
fn wait_msg(conn: &ConnHandle, pred: impl Fn(&ProtoMsg) -> bool) -> ProtoMsg {
    conn.recv_msg_matching(TIMEOUT, pred)
        .expect("the expected message did not arrive")
}

fn shell_msg(typ: &str) -> ProtoMsg {
    ProtoMsg::new(PROTO_SHELL, typ, SID).with_prop("user_id", Value::Str("u".into()))
}

/// Waits until the shell's output contains `needle`.
fn wait_output(conn: &ConnHandle, needle: &str) {
    let mut acc = String::new();
    let found = conn.recv_msg_matching(TIMEOUT, |m| {
        if m.hdr.proto == PROTO_SHELL && m.hdr.typ == "shell" {
            acc.push_str(&String::from_utf8_lossy(
                m.body.as_deref().unwrap_or_default(),
            ));
        }
        acc.contains(needle)
    });
    assert!(found.is_some(), "no {needle:?} in the shell output {acc:?}");
}

/// `gdb -batch -p PID -ex 'info threads' -ex 'thread apply all bt'`, with a deadline.
fn gdb_attach(pid: u32, dir: &TempDir) -> String {
    let out_file = dir.join("gdb.out");
    let out = std::fs::File::create(&out_file).expect("gdb output file");
    let mut child = Command::new("gdb")
        .args(["-nx", "-batch"])
        // never ask a debuginfod server: the symbols must come from our file
        .args(["-iex", "set debuginfod enabled off"])
        .args(["-p", &pid.to_string()])
        .args(["-ex", "info threads", "-ex", "thread apply all bt"])
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup"))
        .stderr(out)
        .spawn()
        .expect("spawn gdb");
    let done = testbed::wait_until(GDB_TIMEOUT, || child.try_wait().ok().flatten().is_some());
    if !done {
        let _ = child.kill();
    }
    let _ = child.wait();
    let text = std::fs::read_to_string(&out_file).unwrap_or_default();
    assert!(done, "gdb did not finish in {GDB_TIMEOUT:?}:\n{text}");
    text
}

#[test]
fn gdb_shows_thread_names_and_daemon_functions_from_the_debug_file() {
    if !have("gdb") || !have("objcopy") {
        eprintln!("SKIPPED: gdb or objcopy (binutils) not installed; scripts/deps.sh installs gdb");
        return;
    }
    let dir = TempDir::new("gdb");
    let bin = split_binary(dir.path());

    let mut cfg: serde_json::Value =
        serde_json::from_str(&testbed::default_config()).expect("config");
    cfg["ShellArguments"] = serde_json::json!([]);
    let bus = DbusDaemon::start();
    let server = Server::start_plain();
    let _auth = AuthService::start(bus.address(), "token-1", &server.url());
    let daemon = Daemon::spawn_with_binary(&bin, &cfg.to_string(), bus.address(), &[], true);
    let Some(conn) = server.wait_connection(TIMEOUT) else {
        daemon.dump_log();
        panic!("daemon never connected");
    };

    // what deviceconnect does: open the session, then a shell (the shell's
    // thread is the session's only one)
    conn.send_msg(
        &ProtoMsg::new(PROTO_CONTROL, "open", SID).with_body(Open { versions: vec![1] }.encode()),
    );
    wait_msg(&conn, |m| {
        m.hdr.proto == PROTO_CONTROL && m.hdr.typ == "accept"
    });
    conn.send_msg(&shell_msg("new"));
    let r = wait_msg(&conn, |m| m.hdr.proto == PROTO_SHELL && m.hdr.typ == "new");
    assert_eq!(r.prop("status").and_then(Value::as_i64), Some(1), "{r:?}");
    conn.send_msg(&shell_msg("shell").with_body(b"echo up-$((20+22))\n".to_vec()));
    wait_output(&conn, "up-42");
    // a file transfer message starts the router session's thread sess-<sid8>
    let path = encode_map(&[("path", Value::Str("/".into()))]);
    conn.send_msg(
        &ProtoMsg::new(PROTO_FILETRANSFER, "stat", SID)
            .with_prop("user_id", Value::Str("gdb-user".into()))
            .with_body(path),
    );
    wait_msg(&conn, |m| m.hdr.proto == PROTO_FILETRANSFER);

    let text = gdb_attach(daemon.pid(), &dir);
    let report = || format!("----- gdb output -----\n{text}----- end -----");
    // the binary has neither symbols nor DWARF (checked above): source lines
    // in the backtraces can only come from the separate debug file
    assert!(
        text.contains("src/conn/link/"),
        "no source lines: gdb did not load the separate debug file\n{}",
        report()
    );
    let sid8 = &SID[..8];
    for name in [
        "\"conn\"".to_string(),
        "\"dbus\"".to_string(),
        "\"signals\"".to_string(),
        format!("\"shell-{sid8}\""),
        format!("\"sess-{sid8}\""),
    ] {
        assert!(
            text.contains(&name),
            "thread {name} missing in gdb's output\n{}",
            report()
        );
    }
    for func in [
        "mender_connect::conn::link::",
        "mender_connect::sessions::shell::",
        "mender_connect::daemon::",
        "main",
    ] {
        assert!(
            text.contains(func),
            "function {func} not in the backtraces\n{}",
            report()
        );
    }
    assert!(
        !text.contains("No symbol table is loaded"),
        "gdb found no symbols\n{}",
        report()
    );

    // gdb detached cleanly: the session still works
    conn.send_msg(&shell_msg("shell").with_body(b"echo still-$((40+2))\n".to_vec()));
    wait_output(&conn, "still-42");
    conn.send_msg(&shell_msg("stop"));
    wait_msg(&conn, |m| m.hdr.proto == PROTO_SHELL && m.hdr.typ == "stop");
}
