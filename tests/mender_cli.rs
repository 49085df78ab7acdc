//! Compatibility with a client nobody here wrote: Debian's `mender-cli`
//! (`apt-get install mender-cli`, 1.9.0) drives the daemon end to end through
//! the stand-in deviceconnect (server device endpoint + management API):
//! a terminal on a pseudo-terminal, port forwarding, `cp` both ways, and the
//! error texts a user sees. Every test is skipped, with a message, when
//! `mender-cli` is not installed.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use mender_connect::wire::codec::{PROTO_SHELL, ProtoMsg, Value};
use testbed::{
    AuthService, Daemon, DbusDaemon, Managed, Management, Server, TIMEOUT, TempDir, default_config,
};

const TOKEN: &str = "token-mender-cli";
/// Deadline for one mender-cli command (they finish in well under a second
/// locally; CI machines can be slow).
const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// The installed mender-cli, or `None` (the caller then skips).
fn mender_cli() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("mender-cli"))
        .find(|p| p.is_file())
}

macro_rules! require_mender_cli {
    () => {
        match mender_cli() {
            Some(p) => p,
            None => {
                eprintln!(
                    "SKIPPED: mender-cli is not installed (apt-get install mender-cli, \
                     or ./scripts/deps.sh); this test needs the real client"
                );
                return;
            }
        }
    };
}

struct Bed {
    // field order = drop order: daemon first, then its peers
    daemon: Daemon,
    mgmt: Management,
    server: Server,
    _auth: AuthService,
    _bus: DbusDaemon,
    cli: PathBuf,
    home: TempDir,
}

fn bed(cli: PathBuf, edit: impl FnOnce(&mut serde_json::Value)) -> Bed {
    let mut cfg: serde_json::Value = serde_json::from_str(&default_config()).expect("config");
    // The default `--login` is refused by dash; a plain shell keeps the
    // user's profile out of the test.
    if Path::new("/bin/bash").exists() {
        cfg["ShellCommand"] = "/bin/bash".into();
        cfg["ShellArguments"] = serde_json::json!(["--noprofile", "--norc"]);
    } else {
        cfg["ShellArguments"] = serde_json::json!(["-i"]);
    }
    edit(&mut cfg);
    let Managed {
        daemon,
        mgmt,
        server,
        auth,
        bus,
    } = Managed::start(&cfg.to_string(), TOKEN);
    Bed {
        daemon,
        mgmt,
        server,
        _auth: auth,
        _bus: bus,
        cli,
        home: TempDir::new("mcli-home"),
    }
}

impl Bed {
    /// `mender-cli --server URL --token-value TOKEN <args>`, with a private
    /// HOME (no user configuration leaks in) and stdin from /dev/null.
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.cli);
        c.arg("--server")
            .arg(self.mgmt.url())
            .arg("--token-value")
            .arg(TOKEN)
            .args(args)
            .env("HOME", self.home.path())
            .env_remove("XDG_CONFIG_HOME")
            .stdin(Stdio::null());
        c
    }

    /// Runs a mender-cli command to completion (killed after CLI_TIMEOUT).
    fn run(&self, args: &[&str]) -> Output {
        let child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mender-cli");
        self.finish(child, args)
    }

    /// Waits for mender-cli `args` (`child`) to exit and collects its output;
    /// after CLI_TIMEOUT kills it and fails with what it printed.
    fn finish(&self, child: Child, args: &[&str]) -> Output {
        let pid = child.id();
        let (tx, rx) = crossbeam_channel::bounded(1);
        let waiter = std::thread::Builder::new()
            .name("cli-wait".into())
            .spawn(move || {
                let _ = tx.send(child.wait_with_output());
            })
            .expect("spawn cli-wait");
        let out = match rx.recv_timeout(CLI_TIMEOUT) {
            Ok(out) => out,
            Err(_) => {
                // SAFETY: signalling our own child, not yet reaped (the
                // waiter has not returned).
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                let out = rx.recv().expect("waiter").expect("wait");
                self.daemon.dump_log();
                panic!(
                    "mender-cli {args:?} did not finish in {CLI_TIMEOUT:?}\nstdout: {}\nstderr: {}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        };
        let _ = waiter.join();
        out.expect("wait mender-cli")
    }

    /// `mender-cli cp <from> <to>`; returns (success, stdout + stderr).
    fn cp(&self, from: &str, to: &str) -> (bool, String) {
        let out = self.run(&["cp", from, to]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// `DEVICE_ID:path`.
    fn remote(&self, p: &Path) -> String {
        format!("{}:{}", self.mgmt.device_id(), p.display())
    }
}

fn assert_same(a: &[u8], b: &[u8], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: length differs");
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        panic!("{what}: first difference at byte {i}");
    }
}

// ---------------------------------------------------------------------------
// cp

#[test]
fn cp_upload_and_download_round_trip() {
    let cli = require_mender_cli!();
    let b = bed(cli, |_| {});
    let dir = TempDir::new("mcli-cp");
    for (name, len) in [
        ("empty", 0usize),
        ("five-mib", 5 << 20),
        ("odd", 4096 * 3 + 17),
    ] {
        let data = testbed::random_bytes(len, len as u64 + 7);
        let local = dir.join(&format!("{name}.local"));
        std::fs::write(&local, &data).expect("write local");
        let remote = dir.join(&format!("{name}.remote"));
        let (ok, text) = b.cp(&local.display().to_string(), &b.remote(&remote));
        assert!(ok, "upload of {name} failed: {text}");
        // deviceconnect answers 201 once every chunk is acked; for an empty
        // file that is at once (nothing to ack), before the device has even
        // seen the EOF chunk, so the file may land a moment after the 201.
        assert!(
            testbed::wait_until(TIMEOUT, || remote.exists()),
            "{name} not uploaded"
        );
        let got = std::fs::read(&remote).expect("read uploaded");
        assert_same(&got, &data, &format!("upload of {name}"));

        let back = dir.join(&format!("{name}.back"));
        let (ok, text) = b.cp(&b.remote(&remote), &back.display().to_string());
        assert!(ok, "download of {name} failed: {text}");
        let got = std::fs::read(&back).unwrap_or_else(|e| panic!("{name} not downloaded: {e}"));
        assert_same(&got, &data, &format!("download of {name}"));
    }
}

/// mender-cli's own `test_filetransfer_cli`: 40 MiB up and down intact;
/// an upload into a missing directory and a missing local file fail with
/// exit code 1 and upstream's texts.
#[test]
fn test_filetransfer_cli() {
    let cli = require_mender_cli!();
    let b = bed(cli, |_| {});
    let dir = TempDir::new("mcli-ft-cli");
    let local = dir.join("random.local");
    let data = testbed::random_bytes(40 << 20, 4040);
    std::fs::write(&local, &data).expect("write");
    let remote = dir.join("random.bin");
    let out = b.run(&["cp", &local.display().to_string(), &b.remote(&remote)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let back = dir.join("random.bin.download");
    let out = b.run(&["cp", &b.remote(&remote), &back.display().to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same(&std::fs::read(&back).expect("downloaded"), &data, "40 MiB");

    let missing_dir = b.remote(&dir.join("path-does-not-exist/random.bin"));
    let out = b.run(&["cp", &local.display().to_string(), &missing_dir]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("failed to create target file"), "{stderr}");

    for to in [missing_dir, b.remote(&dir.join("test.bin"))] {
        let out = b.run(&["cp", "/this/file/does/not/exist", &to]);
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("no such file or directory"), "{stderr}");
    }
}

/// mender-cli's own `test_remote_terminal`: `terminal` with commands piped
/// on stdin (no tty) runs them and exits 0.
#[test]
fn test_remote_terminal() {
    let cli = require_mender_cli!();
    let b = bed(cli, |_| {});
    let dir = TempDir::new("mcli-term-pipe");
    std::fs::write(dir.join("mender.conf"), b"{}").expect("write");
    let args = ["terminal", b.mgmt.device_id()];
    let mut child = b
        .command(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mender-cli terminal");
    let input = format!("ls {}\nexit\n", dir.path().display());
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write commands");
    let out = b.finish(child, &args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("mender.conf"), "{stdout}");
}

#[test]
fn cp_missing_file_fails_with_the_device_message() {
    let cli = require_mender_cli!();
    let b = bed(cli, |_| {});
    let dir = TempDir::new("mcli-missing");
    let missing = dir.join("does-not-exist");
    let local = dir.join("local");
    let (ok, text) = b.cp(&b.remote(&missing), &local.display().to_string());
    assert!(!ok, "download of a missing file succeeded: {text}");
    assert!(
        text.contains("failed to retrieve file info: error received from device")
            && text.contains(&format!(
                "failed to get file info from path '{}'",
                missing.display()
            ))
            && text.contains("no such file or directory"),
        "unexpected message: {text}"
    );
    assert!(!local.exists(), "a local file was created");

    // Upload into a directory that does not exist: the device's text too.
    std::fs::write(&local, b"x").expect("write");
    let target = dir.join("no-such-dir/file");
    let (ok, text) = b.cp(&local.display().to_string(), &b.remote(&target));
    assert!(!ok, "upload into a missing directory succeeded: {text}");
    assert!(
        text.contains("no such file or directory"),
        "unexpected message: {text}"
    );
}

#[test]
fn cp_denied_by_limits_fails_with_a_clear_message() {
    let cli = require_mender_cli!();
    let base = TempDir::new("mcli-chroot");
    let root = base.join("chroot");
    std::fs::create_dir_all(&root).expect("mkdir");
    std::fs::write(root.join("inside.txt"), b"inside").expect("write");
    std::fs::write(base.join("secret"), b"SECRET").expect("write");
    let chroot = root.display().to_string();
    let b = bed(cli, move |c| {
        c["Limits"] = serde_json::json!({"Enabled": true, "FileTransfer": {"Chroot": chroot}});
    });
    let local = base.join("local");
    std::fs::write(&local, b"payload").expect("write");

    // Upload outside the chroot.
    let outside = base.join("uploaded");
    let (ok, text) = b.cp(&local.display().to_string(), &b.remote(&outside));
    assert!(!ok, "upload outside the chroot succeeded: {text}");
    assert!(
        text.contains("access denied: the target file path is outside chroot"),
        "unexpected message: {text}"
    );
    assert!(!outside.exists());

    // Download from outside the chroot.
    let back = base.join("back");
    let (ok, text) = b.cp(&b.remote(&base.join("secret")), &back.display().to_string());
    assert!(!ok, "download outside the chroot succeeded: {text}");
    assert!(
        text.contains("access denied: the target file path is outside chroot"),
        "unexpected message: {text}"
    );
    assert!(!back.exists());

    // Inside still works.
    let (ok, text) = b.cp(
        &b.remote(&root.join("inside.txt")),
        &back.display().to_string(),
    );
    assert!(ok, "download inside the chroot failed: {text}");
    assert_eq!(std::fs::read(&back).expect("read"), b"inside");
}

// ---------------------------------------------------------------------------
// terminal

/// Output of a process on a PTY, collected by a reader thread.
struct PtyOutput {
    buf: Mutex<Vec<u8>>,
    cond: Condvar,
}

impl PtyOutput {
    /// Waits until `needle` appears after byte `from`; returns the end of
    /// its first occurrence.
    fn wait_for(&self, needle: &str, from: usize, timeout: Duration) -> Option<usize> {
        let deadline = Instant::now() + timeout;
        let mut g = self.buf.lock().unwrap();
        loop {
            if let Some(i) = g
                .get(from..)
                .and_then(|s| s.windows(needle.len()).position(|w| w == needle.as_bytes()))
            {
                return Some(from + i + needle.len());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            g = self.cond.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes()).into_owned()
    }

    fn bytes(&self) -> Vec<u8> {
        self.buf.lock().unwrap().clone()
    }
}

/// mender-cli running on a pseudo-terminal we hold the master side of.
struct PtyCli {
    child: Child,
    master: OwnedFd,
    out: Arc<PtyOutput>,
    reader: Option<std::thread::JoinHandle<()>>,
}

fn winsize(rows: u16, cols: u16) -> libc::winsize {
    libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

impl PtyCli {
    fn spawn(mut cmd: Command, rows: u16, cols: u16) -> PtyCli {
        let (mut m, mut s) = (0, 0);
        let ws = winsize(rows, cols);
        // SAFETY: openpty writes two descriptors; termios NULL = defaults.
        let r =
            unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
        assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: fresh descriptors we own.
        let (master, slave) = unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
        let dup = |fd: &OwnedFd| Stdio::from(fd.try_clone().expect("dup pty"));
        cmd.stdin(dup(&slave))
            .stdout(dup(&slave))
            .stderr(dup(&slave));
        // SAFETY: only async-signal-safe calls between fork and exec: a new
        // session whose controlling terminal is the PTY (stdin), so the
        // kernel sends it SIGWINCH when the window size changes.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn mender-cli on a pty");
        drop(slave);
        let out = Arc::new(PtyOutput {
            buf: Mutex::new(Vec::new()),
            cond: Condvar::new(),
        });
        let mut file = std::fs::File::from(master.try_clone().expect("dup master"));
        let o = out.clone();
        let reader = std::thread::Builder::new()
            .name("pty-reader".into())
            .spawn(move || {
                let mut buf = vec![0u8; 16 * 1024];
                // EIO once every slave descriptor is closed (mender-cli exited).
                while let Ok(n) = file.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    o.buf.lock().unwrap().extend_from_slice(&buf[..n]);
                    o.cond.notify_all();
                }
            })
            .expect("spawn pty-reader");
        PtyCli {
            child,
            master,
            out,
            reader: Some(reader),
        }
    }

    fn type_text(&self, s: &str) {
        let mut f = std::fs::File::from(self.master.try_clone().expect("dup master"));
        f.write_all(s.as_bytes()).expect("write to pty");
    }

    fn resize(&self, rows: u16, cols: u16) {
        let ws = winsize(rows, cols);
        // SAFETY: TIOCSWINSZ with a valid winsize on our master descriptor.
        let r = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        assert_eq!(r, 0, "TIOCSWINSZ: {}", std::io::Error::last_os_error());
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut status = None;
        testbed::wait_until(timeout, || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        });
        status
    }
}

impl Drop for PtyCli {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

fn expect_output(b: &Bed, cli: &PtyCli, needle: &str, from: usize) -> usize {
    cli.out.wait_for(needle, from, TIMEOUT).unwrap_or_else(|| {
        b.daemon.dump_log();
        panic!("no {needle:?} in the terminal output:\n{}", cli.out.text())
    })
}

fn is_shell(m: &ProtoMsg, typ: &str) -> bool {
    m.hdr.proto == PROTO_SHELL && m.hdr.typ == typ
}

#[test]
fn terminal_types_resizes_and_exits_cleanly() {
    let cli = require_mender_cli!();
    let b = bed(cli, |_| {});
    let mut cmd = b.command(&["terminal", b.mgmt.device_id()]);
    cmd.env("TERM", "xterm");
    let mut t = PtyCli::spawn(cmd, 24, 80);

    // mender-cli opens the shell with the terminal's size.
    let new = b
        .mgmt
        .wait_relayed(TIMEOUT, |m| is_shell(m, "new"))
        .unwrap_or_else(|| panic!("no shell `new` relayed; output:\n{}", t.out.text()));
    assert_eq!(
        new.prop("user_id"),
        Some(&Value::Str(testbed::management::USER_ID.into()))
    );
    let w = new.prop("terminal_width").and_then(Value::as_i64);
    let h = new.prop("terminal_height").and_then(Value::as_i64);
    assert_eq!((h, w), (Some(24), Some(80)), "size in `new`: {new:?}");

    // A command and its output (the expansion proves the shell ran it).
    t.type_text("echo hello-$((6*7))\r");
    let mut at = expect_output(&b, &t, "hello-42", 0);

    t.type_text("stty size\r");
    at = expect_output(&b, &t, "24 80", at);

    // Window change → SIGWINCH → mender-cli sends `resize` → the PTY follows.
    t.resize(30, 100);
    let resize = b
        .mgmt
        .wait_relayed(TIMEOUT, |m| is_shell(m, "resize"))
        .expect("mender-cli sent no resize");
    assert_eq!(
        resize.prop("terminal_height").and_then(Value::as_i64),
        Some(30)
    );
    assert_eq!(
        resize.prop("terminal_width").and_then(Value::as_i64),
        Some(100)
    );
    t.type_text("stty size\r");
    at = expect_output(&b, &t, "30 100", at);

    // Output bigger than one message arrives whole and in order.
    // (~110 KB: hundreds of output messages, all in order.)
    t.type_text("seq 1 20000; echo done-$((1+1))\r");
    let end = expect_output(&b, &t, "done-2", at);
    let out = t.out.bytes();
    let want: String = (1..=20000).map(|i| format!("{i}\r\n")).collect();
    assert!(
        out[at..end]
            .windows(want.len())
            .any(|w| w == want.as_bytes()),
        "seq output garbled"
    );

    // `exit` ends the shell; the device says stop; mender-cli exits 0.
    t.type_text("exit\r");
    let status = t.wait_exit(TIMEOUT).unwrap_or_else(|| {
        b.daemon.dump_log();
        panic!("mender-cli did not exit; output:\n{}", t.out.text())
    });
    assert!(
        status.success(),
        "mender-cli exited with {status}; output:\n{}",
        t.out.text()
    );
}

#[test]
fn terminal_operator_gone_stops_the_shell() {
    let cli = require_mender_cli!();
    let b = bed(cli, |_| {});
    let t = PtyCli::spawn(b.command(&["terminal", b.mgmt.device_id()]), 24, 80);
    let new = b
        .mgmt
        .wait_relayed(TIMEOUT, |m| is_shell(m, "new"))
        .expect("no shell `new` relayed");
    let sid = new.hdr.sid.clone();
    t.type_text("echo ready-$((2+3))\r");
    expect_output(&b, &t, "ready-5", 0);

    // The operator vanishes without a word (no stop from mender-cli).
    drop(t);
    let stop = b
        .mgmt
        .wait_sent(TIMEOUT, |m| is_shell(m, "stop") && m.hdr.sid == sid)
        .expect("stand-in sent no `user disconnected` stop");
    assert_eq!(stop.body.as_deref(), Some(&b"user disconnected"[..]));
    assert_eq!(stop.prop("status").and_then(Value::as_i64), Some(2));

    // The device stops the shell and confirms (status 1).
    let conn = b.server.connection(0).expect("device connection");
    let confirmed = testbed::wait_until(TIMEOUT, || {
        conn.frames().iter().any(|f| {
            f.decoded().is_ok_and(|m| {
                is_shell(&m, "stop")
                    && m.hdr.sid == sid
                    && m.prop("status").and_then(Value::as_i64) == Some(1)
            })
        })
    });
    if !confirmed {
        b.daemon.dump_log();
    }
    assert!(confirmed, "device did not confirm the stop");
}

// ---------------------------------------------------------------------------
// port-forward

/// A free local port (bound and released; good enough on a test machine).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind")
        .port()
}

/// Device-side services: a one-page HTTP server and an echo server, each
/// serving every connection on its own thread until the listener is dropped.
struct Services {
    http_port: u16,
    echo_port: u16,
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

const PAGE_LEN: usize = 200_000;

fn serve_http(mut s: TcpStream, page: &[u8]) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        page.len()
    );
    let _ = s.write_all(resp.as_bytes());
    let _ = s.write_all(page);
}

fn serve_echo(mut s: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

impl Services {
    fn start() -> Services {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let page = Arc::new(testbed::random_bytes(PAGE_LEN, 99));
        let http = TcpListener::bind("127.0.0.1:0").expect("bind http");
        let echo = TcpListener::bind("127.0.0.1:0").expect("bind echo");
        let (http_port, echo_port) = (
            http.local_addr().expect("addr").port(),
            echo.local_addr().expect("addr").port(),
        );
        let mut threads = Vec::new();
        for (name, l, is_http) in [("svc-http", http, true), ("svc-echo", echo, false)] {
            let stop = stop.clone();
            let page = page.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(name.into())
                    .spawn(move || {
                        for s in l.incoming() {
                            if stop.load(std::sync::atomic::Ordering::SeqCst) {
                                return;
                            }
                            let Ok(s) = s else { continue };
                            let page = page.clone();
                            let _ = std::thread::Builder::new().name("svc-conn".into()).spawn(
                                move || {
                                    if is_http {
                                        serve_http(s, &page)
                                    } else {
                                        serve_echo(s)
                                    }
                                },
                            );
                        }
                    })
                    .expect("spawn service"),
            );
        }
        Services {
            http_port,
            echo_port,
            stop,
            threads,
        }
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wake the accept loops.
        for p in [self.http_port, self.echo_port] {
            let _ = TcpStream::connect(("127.0.0.1", p));
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A running `mender-cli port-forward`; drop kills and reaps it.
struct PortForward(Child);

impl Bed {
    /// Starts `mender-cli port-forward <device> <mappings…>`, output discarded.
    fn port_forward(&self, mappings: &[&str]) -> PortForward {
        let mut args = vec!["port-forward", self.mgmt.device_id()];
        args.extend_from_slice(mappings);
        let child = self
            .command(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mender-cli port-forward");
        PortForward(child)
    }
}

impl PortForward {
    /// Asserts mender-cli is still forwarding (it exits when it gives up).
    fn assert_running(&mut self) {
        assert!(
            self.0.try_wait().expect("try_wait").is_none(),
            "mender-cli port-forward exited early"
        );
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Connects to a local port mender-cli is about to listen on.
fn connect_when_listening(port: u16) -> TcpStream {
    let mut conn = None;
    let ok = testbed::wait_until(TIMEOUT, || {
        conn = TcpStream::connect(("127.0.0.1", port)).ok();
        conn.is_some()
    });
    assert!(ok, "mender-cli never listened on {port}");
    conn.expect("connected")
}

#[test]
fn port_forward_http_get_and_10_mib_echo() {
    let cli = require_mender_cli!();
    let b = bed(cli, |_| {});
    let svc = Services::start();
    let (l_http, l_echo) = (free_port(), free_port());
    let mut forward = b.port_forward(&[
        &format!("tcp/{l_http}:{}", svc.http_port),
        &format!("{l_echo}:127.0.0.1:{}", svc.echo_port),
    ]);

    // HTTP GET through the forward. (mender-cli keeps the local side open
    // after the device's stop, so read by Content-Length, not to EOF.)
    let mut s = connect_when_listening(l_http);
    s.set_read_timeout(Some(CLI_TIMEOUT)).expect("timeout");
    s.write_all(b"GET / HTTP/1.1\r\nHost: device\r\n\r\n")
        .expect("send request");
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let body_start = loop {
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut buf).expect("read response head");
        assert!(n > 0, "connection closed before the response head");
        got.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&got[..body_start]).into_owned();
    assert!(head.starts_with("HTTP/1.1 200 OK"), "response: {head}");
    assert!(head.contains(&format!("Content-Length: {PAGE_LEN}")));
    while got.len() < body_start + PAGE_LEN {
        let n = s.read(&mut buf).expect("read body");
        assert!(n > 0, "connection closed mid-body");
        got.extend_from_slice(&buf[..n]);
    }
    assert_same(
        &got[body_start..],
        &testbed::random_bytes(PAGE_LEN, 99),
        "HTTP body",
    );
    drop(s);

    // 10 MiB echo: write and read concurrently, bytes identical.
    let data = Arc::new(testbed::random_bytes(10 << 20, 1234));
    let s = connect_when_listening(l_echo);
    s.set_read_timeout(Some(CLI_TIMEOUT)).expect("timeout");
    let mut w = s.try_clone().expect("clone");
    let d = data.clone();
    let writer = std::thread::Builder::new()
        .name("echo-writer".into())
        .spawn(move || w.write_all(&d))
        .expect("spawn writer");
    let mut back = Vec::with_capacity(data.len());
    let mut r = &s;
    while back.len() < data.len() {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => back.extend_from_slice(&buf[..n]),
            Err(e) => {
                b.daemon.dump_log();
                panic!("echo read after {} bytes: {e}", back.len());
            }
        }
    }
    writer.join().expect("writer").expect("write 10 MiB");
    assert_same(&back, &data, "10 MiB echo");
    drop(s);

    forward.assert_running();
}

/// A private OpenSSH server on 127.0.0.1 that lets root in with one
/// throwaway key. It runs in its own mount namespace with a tmpfs on /run,
/// so its privilege-separation directory touches nothing on the host.
struct Sshd {
    child: Child,
    port: u16,
    key: PathBuf,
    _dir: TempDir,
}

impl Sshd {
    /// `None` (with the reason) when sshd, ssh-keygen, scp or a private
    /// mount namespace are unavailable.
    fn start() -> Result<Sshd, String> {
        let sshd = Path::new("/usr/sbin/sshd");
        for tool in ["ssh-keygen", "scp", "unshare"] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !found {
                return Err(format!("{tool} is not installed"));
            }
        }
        if !sshd.exists() {
            return Err("sshd is not installed (openssh-server; ./scripts/deps.sh)".into());
        }
        let dir = TempDir::new("sshd");
        for name in ["host_key", "id"] {
            let ok = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.join(name))
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                return Err("ssh-keygen failed".into());
            }
        }
        std::fs::copy(dir.join("id.pub"), dir.join("authorized_keys")).expect("authorized_keys");
        let port = free_port();
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
                 PermitRootLogin prohibit-password\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
                 PidFile none\nSubsystem sftp internal-sftp\n",
                dir.join("host_key").display(),
                dir.join("authorized_keys").display()
            ),
        )
        .expect("sshd_config");
        let log = std::fs::File::create(dir.join("sshd.log")).expect("sshd log");
        let child = Command::new("unshare")
            .args([
                "-m",
                "sh",
                "-c",
                "mount -t tmpfs tmpfs /run && mkdir -m 755 /run/sshd && exec \"$@\"",
                "sh",
            ])
            .arg(sshd)
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("unshare: {e}"))?;
        let mut me = Sshd {
            child,
            port,
            key: dir.join("id"),
            _dir: dir,
        };
        let up = testbed::wait_until(TIMEOUT, || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
                || me.child.try_wait().ok().flatten().is_some()
        });
        if !up || me.child.try_wait().ok().flatten().is_some() {
            let log = std::fs::read_to_string(me._dir.join("sshd.log")).unwrap_or_default();
            return Err(format!("sshd did not start: {log}"));
        }
        Ok(me)
    }

    /// `scp -O` (the legacy protocol, as mender-cli's test) through `port`.
    fn scp(&self, port: u16, from: &str, to: &str) -> Output {
        Command::new("scp")
            .arg("-O")
            .args(["-o", "StrictHostKeyChecking=no"])
            .args(["-o", "UserKnownHostsFile=/dev/null"])
            .args(["-o", "BatchMode=yes"])
            .args(["-o", "ConnectTimeout=30"])
            .arg("-i")
            .arg(&self.key)
            .args(["-P", &port.to_string(), from, to])
            .stdin(Stdio::null())
            .output()
            .expect("run scp")
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A DNS-style UDP responder: answers each query with its id, QR set, the
/// question echoed and one answer record. Stops when dropped.
struct DnsStub {
    port: u16,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DnsStub {
    fn start() -> DnsStub {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let port = sock.local_addr().expect("addr").port();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::Builder::new()
            .name("dns-stub".into())
            .spawn(move || {
                let mut buf = [0u8; 512];
                while !st.load(std::sync::atomic::Ordering::SeqCst) {
                    let Ok((n, from)) = sock.recv_from(&mut buf) else {
                        continue;
                    };
                    if let Some(reply) = dns_answer(&buf[..n]) {
                        let _ = sock.send_to(&reply, from);
                    }
                }
            })
            .expect("spawn dns-stub");
        DnsStub {
            port,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for DnsStub {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A query for `name` of `qtype` with id `id`.
fn dns_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD, 1 question
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes()); // IN
    q
}

/// The stub's answer to a query (A → 192.0.2.1, MX → 10 mx.<name>).
fn dns_answer(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    let mut end = 12;
    while *query.get(end)? != 0 {
        end += 1 + usize::from(query[end]);
    }
    let qtype = u16::from_be_bytes([*query.get(end + 1)?, *query.get(end + 2)?]);
    let question = &query[12..end + 5];
    let mut r = query[..2].to_vec();
    r.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]); // QR RD RA, 1 q, 1 answer
    r.extend_from_slice(question);
    r.extend_from_slice(&[0xc0, 12]); // the question's name
    r.extend_from_slice(&qtype.to_be_bytes());
    r.extend_from_slice(&[0, 1, 0, 0, 0, 60]); // IN, TTL 60
    match qtype {
        15 => {
            let mut rdata = vec![0, 10, 2, b'm', b'x'];
            rdata.extend_from_slice(&[0xc0, 12]);
            r.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            r.extend_from_slice(&rdata);
        }
        _ => r.extend_from_slice(&[0, 4, 192, 0, 2, 1]),
    }
    Some(r)
}

/// upstream's `dns_request`: a query through `port` until an answer with
/// the same id and at least one record arrives (UDP: resent until then).
fn dns_request(port: u16, id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let query = dns_query(id, name, qtype);
    let mut answer = None;
    let mut buf = [0u8; 512];
    testbed::wait_until(CLI_TIMEOUT, || {
        let _ = sock.send_to(&query, ("127.0.0.1", port));
        match sock.recv(&mut buf) {
            Ok(n) => {
                answer = Some(buf[..n].to_vec());
                true
            }
            Err(_) => false,
        }
    });
    let a = answer.unwrap_or_else(|| panic!("no DNS answer through udp/{port}"));
    assert_eq!(&a[..2], &id.to_be_bytes(), "answer id");
    assert!(a[2] & 0x80 != 0, "not a response");
    assert!(u16::from_be_bytes([a[6], a[7]]) >= 1, "no answer records");
    a
}

/// mender-cli's own `test_portforward`: one `port-forward` with a TCP
/// mapping to the device's sshd and a UDP mapping to a DNS server; A and MX
/// queries answered through the UDP one, a file up and down with `scp -O`
/// through the TCP one, bytes identical.
#[test]
fn test_portforward() {
    let cli = require_mender_cli!();
    let sshd = match Sshd::start() {
        Ok(s) => s,
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
    let dns = DnsStub::start();
    let b = bed(cli, |_| {});
    let (tcp_port, udp_port) = (free_port(), free_port());
    let mut forward = b.port_forward(&[
        &format!("{tcp_port}:{}", sshd.port),
        &format!("udp/{udp_port}:127.0.0.1:{}", dns.port),
    ]);

    let a = dns_request(udp_port, 0x4d31, "mender.io", 1);
    assert_eq!(&a[a.len() - 4..], &[192, 0, 2, 1], "A record");
    dns_request(udp_port, 0x4d32, "mender.io", 15);

    let dir = TempDir::new("scp");
    let src = dir.join("random.bin");
    let data = testbed::random_bytes(1024, 77);
    std::fs::write(&src, &data).expect("write");
    let (up, down) = (dir.join("uploaded.bin"), dir.join("random.bin.download"));
    drop(connect_when_listening(tcp_port));
    let out = sshd.scp(
        tcp_port,
        &src.display().to_string(),
        &format!("root@localhost:{}", up.display()),
    );
    assert!(
        out.status.success(),
        "scp upload: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = sshd.scp(
        tcp_port,
        &format!("root@localhost:{}", up.display()),
        &down.display().to_string(),
    );
    assert!(
        out.status.success(),
        "scp download: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same(
        &std::fs::read(&down).expect("downloaded"),
        &data,
        "scp round trip",
    );
    forward.assert_running();
}

// ---------------------------------------------------------------------------
// The management stand-in itself (no mender-cli needed)

/// One HTTP/1.1 request (the test bed's client); returns (status, header
/// lines, body) — the body read to EOF and de-chunked.
fn http_request(url: &str, method: &str, target: &str, auth: bool) -> (u16, String, Vec<u8>) {
    let headers = if auth {
        vec![("Authorization", format!("Bearer {TOKEN}"))]
    } else {
        Vec::new()
    };
    let r = testbed::http::client_request(url, method, target, &headers, b"", CLI_TIMEOUT)
        .expect("HTTP request");
    let head = r
        .headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    (r.status, head, r.body)
}

#[test]
fn management_standin_status_head_and_error_mapping() {
    // Runs without mender-cli: the stand-in's own REST behaviour.
    let bus = DbusDaemon::start();
    let server = Server::start_plain();
    let mgmt = Management::start(&server);
    let dev = format!(
        "/api/management/v1/deviceconnect/devices/{}",
        mgmt.device_id()
    );

    let (st, _, body) = http_request(mgmt.url(), "GET", &dev, true);
    assert_eq!(st, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v["status"], "disconnected");

    let _auth = AuthService::start(bus.address(), TOKEN, &server.url());
    let mut cfg: serde_json::Value = serde_json::from_str(&default_config()).expect("config");
    cfg["ShellArguments"] = serde_json::json!(["-i"]);
    let daemon = Daemon::spawn(&cfg.to_string(), bus.address(), &[]);
    assert!(mgmt.wait_device(TIMEOUT), "daemon never connected");

    let (st, _, body) = http_request(mgmt.url(), "GET", &dev, true);
    assert_eq!(st, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v["status"], "connected");
    let (st, _, _) = http_request(mgmt.url(), "GET", &dev, false);
    assert_eq!(st, 401, "no token");
    let other = "/api/management/v1/deviceconnect/devices/nope";
    assert_eq!(http_request(mgmt.url(), "GET", other, true).0, 404);

    let dir = TempDir::new("mgmt-head");
    let file = dir.join("f.bin");
    std::fs::write(&file, testbed::random_bytes(10_000, 5)).expect("write");
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("chmod");
    let q = |p: &Path| format!("{dev}/download?path={}", p.display());

    // HEAD: the stat headers, no body, no get_file.
    let (st, head, body) = http_request(mgmt.url(), "HEAD", &q(&file), true);
    assert_eq!(st, 200, "{head}");
    assert!(head.contains("X-MEN-File-Size: 10000"), "{head}");
    assert!(head.contains("X-MEN-File-Mode: 644"), "{head}");
    assert!(body.is_empty());
    assert!(
        !mgmt.sent().iter().any(|m| m.hdr.typ == "get_file"),
        "HEAD sent get_file"
    );

    // GET: the bytes.
    let (st, head, body) = http_request(mgmt.url(), "GET", &q(&file), true);
    assert_eq!(st, 200, "{head}");
    assert!(head.contains("Content-Type: application/octet-stream"));
    assert_same(&body, &testbed::random_bytes(10_000, 5), "GET body");

    // A directory is not a regular file: 400.
    let (st, _, body) = http_request(mgmt.url(), "GET", &q(dir.path()), true);
    assert_eq!(st, 400);
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v["error"], "path is not a regular file");

    // Relative paths never reach the device.
    let (st, _, _) = http_request(mgmt.url(), "GET", &format!("{dev}/download?path=rel"), true);
    assert_eq!(st, 400);

    // Every REST transfer closed its device session.
    let opens = mgmt.sent().iter().filter(|m| m.hdr.typ == "open").count();
    let closes = mgmt.sent().iter().filter(|m| m.hdr.typ == "close").count();
    assert_eq!((opens, closes), (3, 3));
    assert!(mgmt.session_ids().is_empty());
    drop(daemon);
}
