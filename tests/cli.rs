//! The real binary's command line: output, exit codes, fatal start-up errors.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use testbed::{AuthService, DbusDaemon, Server, TIMEOUT, TempDir, default_config};

const BIN: &str = env!("CARGO_BIN_EXE_mender-connect");

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run mender-connect")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn version_spellings_print_one_tab_separated_line() {
    for args in [
        &["--version"][..],
        &["-v"],
        &["version"],
        &["-version"],
        &["version", "x"],
    ] {
        let out = run(args, &[]);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        let s = text(&out.stdout);
        assert_eq!(s.lines().count(), 1, "{args:?}: {s:?}");
        let (version, runtime) = s.trim_end().split_once('\t').expect("a TAB");
        assert!(version.contains(env!("CARGO_PKG_VERSION")), "{s:?}");
        assert!(runtime.starts_with("runtime: "), "{s:?}");
        assert!(!s.starts_with("mender-connect version"), "{s:?}");
    }
}

#[test]
fn help_and_no_command_exit_0() {
    for args in [
        &[][..],
        &["help"],
        &["h"],
        &["--help"],
        &["-h"],
        &["help", "daemon"],
    ] {
        let out = run(args, &[]);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(!out.stdout.is_empty(), "{args:?}");
    }
    let out = run(&[], &[]);
    assert!(text(&out.stdout).contains("manage and start the Mender Connect service."));
}

#[test]
fn unknown_command_and_help_topic_exit_3() {
    for args in [&["foo"][..], &["help", "foo"]] {
        let out = run(args, &[]);
        assert_eq!(out.status.code(), Some(3), "{args:?}");
        assert_eq!(text(&out.stderr), "No help topic for 'foo'\n");
    }
}

#[test]
fn unknown_flags_exit_1() {
    let out = run(&["-bogus", "daemon"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).starts_with("Incorrect Usage. flag provided but not defined: -bogus")
    );
    let out = run(&["daemon", "-config", "x"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).starts_with("Incorrect Usage: flag provided but not defined: -config")
    );
}

fn config_dir(json: &str) -> (TempDir, String) {
    let dir = TempDir::new("cli");
    let file = dir.join("mender-connect.conf");
    std::fs::write(&file, json).expect("write config");
    let path = file.to_string_lossy().into_owned();
    (dir, path)
}

#[test]
fn invalid_config_exits_1_naming_file_and_key() {
    let (dir, file) = config_dir(r#"{"User": "root", "Terminal": {"Width": -1}}"#);
    let fallback = dir.join("none.conf");
    let out = run(
        &["-c", &file, "-b", &fallback.to_string_lossy(), "daemon"],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains(&file), "{err}");
    assert!(err.contains("Terminal.Width"), "{err}");
    assert!(err.contains("level=error"), "{err}");

    let (_d2, file) = config_dir(r#"{"User": "root", "ShellCommand": "bin/sh"}"#);
    let flag = format!("--config={file}");
    let out = run(&[&flag, "daemon"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("given shell (bin/sh) is not an absolute path"));

    let (_d3, file) = config_dir("{");
    let out = run(&["-c", &file, "daemon"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("unexpected end of JSON input"));
}

#[test]
fn unreachable_system_bus_exits_1() {
    let (_dir, file) = config_dir(&default_config());
    let out = run(
        &["-c", &file, "daemon"],
        &[("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/bus")],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("mender-connect dbus failed to connect"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn debug_and_trace_flags_set_the_level() {
    let bus = DbusDaemon::start();
    let server = Server::start_plain();
    let _auth = AuthService::start(bus.address(), "t", &server.url());
    let (_dir, file) = config_dir(&default_config());
    for (flag, expect_debug, expect_trace) in [
        ("-d", true, false),
        ("--debug", true, false),
        ("-dd", true, true),
        ("--trace", true, true),
        ("-trace", true, true),
        ("-debug=false", false, false),
    ] {
        let child = Command::new(BIN)
            .args([flag, "-c", &file, "daemon"])
            .env("DBUS_SYSTEM_BUS_ADDRESS", bus.address())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let conn = server.wait_connection(TIMEOUT).expect("connected");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let out = child.wait_with_output().expect("wait");
        assert_eq!(out.status.code(), Some(0), "{flag}");
        assert!(conn.wait_closed(Duration::from_secs(2)));
        let log = text(&out.stderr);
        assert_eq!(log.contains("level=debug"), expect_debug, "{flag}: {log}");
        assert_eq!(log.contains("level=trace"), expect_trace, "{flag}: {log}");
    }
}

#[test]
fn sigterm_works_even_when_the_parent_blocked_it() {
    use std::os::unix::process::CommandExt;
    let bus = DbusDaemon::start();
    let server = Server::start_plain();
    let _auth = AuthService::start(bus.address(), "t", &server.url());
    let (_dir, file) = config_dir(&default_config());
    let mut cmd = Command::new(BIN);
    cmd.args(["-c", &file, "daemon"])
        .env("DBUS_SYSTEM_BUS_ADDRESS", bus.address())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: only async-signal-safe libc calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn");
    let conn = server.wait_connection(TIMEOUT).expect("connected");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let ok = testbed::wait_until(Duration::from_secs(2), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !ok {
        let _ = child.kill();
        let _ = child.wait();
        panic!("SIGTERM ignored when inherited blocked");
    }
    assert_eq!(child.wait().ok().and_then(|s| s.code()), Some(0));
    assert!(conn.wait_closed(TIMEOUT));
}
