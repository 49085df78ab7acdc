//! A peer that is hostile or just slow must not get more than its share:
//! download flow control the client cannot switch off, transfers that end
//! with their session, fair outbound scheduling between sessions, paths
//! taken byte for byte, and rate limits that end in the device's own error
//! instead of the server's time-out (issue 13).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use mender_connect::wire::codec::{
    PROTO_CONTROL, PROTO_FILETRANSFER, PROTO_PORTFORWARD, PROTO_SHELL, ProtoMsg, Value,
};
use mender_connect::wire::control::{Open, decode_map, encode_map};
use testbed::env::Connected;
use testbed::management::DEVICE_ID;
use testbed::{ConnHandle, Management, TIMEOUT, TempDir, default_config};

const CHUNK: usize = 4096;
const USER: &str = "7c1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6";

fn connected(edit: impl FnOnce(&mut serde_json::Value)) -> Connected {
    let mut cfg: serde_json::Value = serde_json::from_str(&default_config()).expect("config");
    // dash refuses the login default `--login`
    cfg["ShellArguments"] = serde_json::json!([]);
    edit(&mut cfg);
    let c = testbed::env::connected(&cfg.to_string(), &[], "token-abuse");
    // streaming tests move hundreds of MiB: do not keep them all
    c.conn.set_keep_frames(false);
    c
}

/// `Limits` enabled with special files allowed (what `/dev/zero` needs).
fn special_files_allowed(c: &mut serde_json::Value) {
    c["Limits"] = serde_json::json!({"Enabled": true, "FileTransfer": {"RegularFilesOnly": false}});
}

/// Session ids whose first 8 characters differ, so `ft-<sid8>` names one thread.
fn new_sid() -> String {
    static N: AtomicUsize = AtomicUsize::new(1);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("{n:08x}-0000-4000-8000-{:012x}", std::process::id())
}

fn thread_names(pid: u32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .map(|s| s.trim_end().to_string())
        .collect()
}

/// The `err` of a file-transfer error body.
fn err_text(m: &ProtoMsg) -> String {
    let map = decode_map(m.body.as_deref().unwrap_or_default()).unwrap_or_default();
    map.iter()
        .find(|(k, _)| k == "err")
        .and_then(|(_, v)| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Reads every device message of one connection on its own thread and hands
/// each to the client of its session, so sessions can run concurrently.
struct Demux {
    conn: ConnHandle,
    routes: Arc<Mutex<HashMap<String, Sender<ProtoMsg>>>>,
    stop: Arc<AtomicBool>,
    join: Option<JoinHandle<()>>,
}

impl Demux {
    fn start(conn: &ConnHandle) -> Demux {
        let routes: Arc<Mutex<HashMap<String, Sender<ProtoMsg>>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (c, r, s) = (conn.clone(), routes.clone(), stop.clone());
        let join = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Some(m) = c.recv_msg(Duration::from_millis(50)) else {
                    if !c.is_open() {
                        return;
                    }
                    continue;
                };
                if m.hdr.proto == PROTO_CONTROL && m.hdr.typ == "ping" {
                    c.send_msg(&ProtoMsg::new(PROTO_CONTROL, "pong", &m.hdr.sid));
                    continue;
                }
                let tx = r.lock().unwrap().get(&m.hdr.sid).cloned();
                if let Some(tx) = tx {
                    let _ = tx.send(m);
                }
            }
        });
        Demux {
            conn: conn.clone(),
            routes,
            stop,
            join: Some(join),
        }
    }

    /// A client on a fresh session, without the control handshake (shells
    /// need none).
    fn raw_session(&self) -> Client {
        let sid = new_sid();
        let (tx, rx) = crossbeam_channel::unbounded();
        self.routes.lock().unwrap().insert(sid.clone(), tx);
        Client {
            sid,
            conn: self.conn.clone(),
            rx,
        }
    }

    /// A client on a fresh session opened like deviceconnect does.
    fn session(&self) -> Client {
        let c = self.raw_session();
        let open = Open { versions: vec![1] }.encode();
        c.send(ProtoMsg::new(PROTO_CONTROL, "open", &c.sid).with_body(open));
        let m = c.must_recv(TIMEOUT);
        assert_eq!(m.hdr.typ, "accept", "{m:?}");
        c
    }
}

impl Drop for Demux {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

struct Client {
    sid: String,
    conn: ConnHandle,
    rx: Receiver<ProtoMsg>,
}

impl Client {
    fn send(&self, m: ProtoMsg) {
        self.conn.send_msg(&m);
    }

    fn ft(&self, typ: &str) -> ProtoMsg {
        ProtoMsg::new(PROTO_FILETRANSFER, typ, &self.sid)
            .with_prop("user_id", Value::Str(USER.into()))
    }

    fn ack(&self, offset: i64) {
        self.send(self.ft("ack").with_prop("offset", Value::I64(offset)));
    }

    fn recv(&self, timeout: Duration) -> Option<ProtoMsg> {
        self.rx.recv_timeout(timeout).ok()
    }

    fn must_recv(&self, timeout: Duration) -> ProtoMsg {
        self.recv(timeout)
            .unwrap_or_else(|| panic!("session {}: nothing within {timeout:?}", self.sid))
    }

    fn close(&self) {
        self.send(ProtoMsg::new(PROTO_CONTROL, "close", &self.sid));
    }

    fn get_file(&self, path: &[u8]) {
        let body = encode_map(&[("path", Value::Bin(path.to_vec()))]);
        self.send(self.ft("get_file").with_body(raw_str_path(body)));
    }

    /// deviceconnect's download (ack every 10th chunk and the EOF).
    fn download(&self, path: &[u8], timeout: Duration) -> Result<Vec<u8>, String> {
        self.get_file(path);
        let mut data = Vec::new();
        let mut chunks = 0;
        loop {
            let m = self
                .recv(timeout)
                .ok_or_else(|| format!("download stalled at {}", data.len()))?;
            if m.hdr.typ == "error" {
                return Err(err_text(&m));
            }
            match (m.hdr.typ.as_str(), m.body) {
                ("file_chunk", Some(b)) => {
                    data.extend_from_slice(&b);
                    chunks += 1;
                    if chunks % 10 == 0 {
                        self.ack(data.len() as i64);
                    }
                }
                ("file_chunk", None) => {
                    self.ack(data.len() as i64);
                    return Ok(data);
                }
                (t, _) => return Err(format!("unexpected {t}")),
            }
        }
    }

    /// deviceconnect's upload (20-chunk window, EOF without body).
    fn upload(&self, path: &[u8], data: &[u8], timeout: Duration) -> Result<(), String> {
        let body = encode_map(&[("path", Value::Bin(path.to_vec()))]);
        self.send(self.ft("put_file").with_body(raw_str_path(body)));
        let mut acked: i64 = -1;
        let take = |m: Option<ProtoMsg>, acked: &mut i64| -> Result<(), String> {
            let m = m.ok_or("upload: no ack in time")?;
            match (m.hdr.typ.as_str(), m.prop("offset")) {
                ("ack", Some(Value::I64(o))) => *acked = (*acked).max(*o),
                ("ack", None) => {}
                ("error", _) => return Err(err_text(&m)),
                (t, _) => return Err(format!("upload: unexpected {t}")),
            }
            Ok(())
        };
        take(self.recv(timeout), &mut acked)?;
        let mut off = 0usize;
        while off < data.len() {
            while off as i64 > acked + 20 * CHUNK as i64 {
                take(self.recv(timeout), &mut acked)?;
            }
            while let Ok(m) = self.rx.try_recv() {
                take(Some(m), &mut acked)?;
            }
            let end = (off + CHUNK).min(data.len());
            let chunk = self
                .ft("file_chunk")
                .with_prop("offset", Value::I64(off as i64));
            self.send(chunk.with_body(data[off..end].to_vec()));
            off = end;
        }
        self.send(
            self.ft("file_chunk")
                .with_prop("offset", Value::I64(off as i64)),
        );
        while acked < data.len() as i64 {
            take(self.recv(timeout), &mut acked)?;
        }
        Ok(())
    }

    /// One `stat`: file_info or the error text.
    fn stat(&self, path: &[u8]) -> Result<ProtoMsg, String> {
        let body = encode_map(&[("path", Value::Bin(path.to_vec()))]);
        self.send(self.ft("stat").with_body(raw_str_path(body)));
        let m = self.must_recv(TIMEOUT);
        match m.hdr.typ.as_str() {
            "file_info" => Ok(m),
            _ => Err(err_text(&m)),
        }
    }
}

/// Turns the bin `path` value written by `encode_map` into a msgpack str
/// holding the same bytes (UTF-8 or not), as Go clients send strings.
fn raw_str_path(mut body: Vec<u8>) -> Vec<u8> {
    let key = b"\xa4path";
    let at = body
        .windows(key.len())
        .position(|w| w == key)
        .expect("path key")
        + key.len();
    let (tag, len, head) = match body[at] {
        0xc4 => (0xc4, body[at + 1] as usize, 2),
        0xc5 => (
            0xc5,
            u16::from_be_bytes([body[at + 1], body[at + 2]]) as usize,
            3,
        ),
        t => panic!("bin tag {t:x}"),
    };
    let _ = tag;
    let bytes = body[at + head..at + head + len].to_vec();
    let mut head_bytes = Vec::new();
    rmp::encode::write_str_len(&mut head_bytes, len as u32).expect("vec");
    body.splice(at..at + head + len, head_bytes.into_iter().chain(bytes));
    body
}

/// Drains `c` for `d`, counting the data bytes of file chunks; stops early
/// at an error (returned).
fn drain_chunks(c: &Client, d: Duration) -> (usize, Option<String>) {
    let until = Instant::now() + d;
    let mut bytes = 0;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match c.recv(left) {
            None => return (bytes, None),
            Some(m) if m.hdr.typ == "error" => return (bytes, Some(err_text(&m))),
            Some(m) => bytes += m.body.map_or(0, |b| b.len()),
        }
    }
}

fn ft_thread_gone(pid: u32, sid: &str, within: Duration) -> bool {
    let name = format!("ft-{}", &sid[..8]);
    testbed::wait_until(within, || !thread_names(pid).contains(&name))
}

/// Three downloads of `file` on their own sessions at once; their durations.
fn three_downloads(dm: &Demux, file: &Path, want: &[u8]) -> Vec<Result<Duration, String>> {
    let clients: Vec<Client> = (0..3).map(|_| dm.session()).collect();
    std::thread::scope(|s| {
        let runs: Vec<_> = clients
            .iter()
            .map(|c| {
                s.spawn(move || {
                    let t = Instant::now();
                    let got = c.download(file.as_os_str().as_bytes(), Duration::from_secs(10))?;
                    c.close();
                    if got != want {
                        return Err(format!("{} bytes, not the file", got.len()));
                    }
                    Ok(t.elapsed())
                })
            })
            .collect();
        runs.into_iter()
            .map(|r| r.join().expect("download thread"))
            .collect()
    })
}

#[test]
fn a_huge_ack_ends_the_download_with_an_error_and_leaves_other_sessions_fast() {
    let c = connected(special_files_allowed);
    let dm = Demux::start(&c.conn);
    let dir = TempDir::new("abuse-ack");
    let file = dir.join("small");
    let want = testbed::random_bytes(128 << 10, 13);
    std::fs::write(&file, &want).expect("write");

    let bad = dm.session();
    bad.get_file(b"/dev/zero");
    let first = bad.must_recv(TIMEOUT);
    assert_eq!(first.hdr.typ, "file_chunk", "{first:?}");
    bad.ack(i64::MAX);
    let t = Instant::now();
    let results = three_downloads(&dm, &file, &want);
    let (after, err) = drain_chunks(&bad, Duration::from_secs(3));
    eprintln!(
        "after the huge ack: {after} bytes streamed, error {err:?} after {:?}; other downloads {results:?}",
        t.elapsed()
    );
    let err = err.expect("the download ends with an error");
    assert!(
        err.starts_with("invalid ack offset 9223372036854775807:"),
        "{err}"
    );
    // at most what the window allowed before the ack was seen
    assert!(after <= 20 * CHUNK, "{after} bytes after the ack");
    assert!(
        ft_thread_gone(c.daemon.pid(), &bad.sid, Duration::from_secs(1)),
        "ft thread still running: {:?}",
        thread_names(c.daemon.pid())
    );
    for r in results {
        let d = r.expect("concurrent download");
        assert!(d < Duration::from_secs(1), "a download took {d:?}");
    }
    // a backwards ack is refused the same way
    let back = dm.session();
    back.get_file(b"/dev/zero");
    let (_, _) = (back.must_recv(TIMEOUT), ());
    back.ack(8192);
    back.ack(4096);
    let (_, err) = drain_chunks(&back, TIMEOUT);
    let err = err.expect("backwards ack refused");
    assert!(err.starts_with("invalid ack offset 4096:"), "{err}");
}

/// Streams `/dev/zero` on `c`, acking like deviceconnect, until `stop`;
/// `progress` follows the bytes received.
fn stream_zero(c: &Client, stop: &AtomicBool, progress: &AtomicUsize) -> usize {
    c.get_file(b"/dev/zero");
    let (mut got, mut chunks) = (0usize, 0usize);
    while !stop.load(Ordering::Relaxed) {
        let Some(m) = c.recv(Duration::from_millis(100)) else {
            continue;
        };
        assert_eq!(m.hdr.typ, "file_chunk", "{}", err_text(&m));
        got += m.body.map_or(0, |b| b.len());
        progress.store(got, Ordering::Relaxed);
        chunks += 1;
        if chunks % 10 == 0 {
            c.ack(got as i64);
        }
    }
    got
}

#[test]
fn close_stops_an_endless_download_within_a_second() {
    let c = connected(special_files_allowed);
    let dm = Demux::start(&c.conn);
    let s = dm.session();
    let stop = AtomicBool::new(false);
    let progress = AtomicUsize::new(0);
    let streamed = std::thread::scope(|sc| {
        let h = sc.spawn(|| stream_zero(&s, &stop, &progress));
        let flowing = testbed::wait_until(TIMEOUT, || progress.load(Ordering::Relaxed) >= 1 << 20);
        stop.store(true, Ordering::Relaxed);
        assert!(flowing, "the download did not stream");
        h.join().expect("streamer")
    });
    assert!(streamed > 20 * CHUNK, "only {streamed} bytes streamed");
    s.close();
    let t = Instant::now();
    assert!(
        ft_thread_gone(c.daemon.pid(), &s.sid, Duration::from_secs(1)),
        "ft thread alive {:?} after close",
        t.elapsed()
    );
    // nothing beyond the last window keeps flowing
    let (late, _) = drain_chunks(&s, Duration::from_secs(1));
    assert!(late <= 20 * CHUNK, "{late} bytes after close");
}

#[test]
fn link_loss_stops_a_running_download_within_a_second() {
    let c = connected(special_files_allowed);
    let dm = Demux::start(&c.conn);
    let s = dm.session();
    s.get_file(b"/dev/zero");
    assert_eq!(s.must_recv(TIMEOUT).hdr.typ, "file_chunk");
    // the transfer waits for an ack with a full window; the link goes away
    c.conn.drop_tcp();
    assert!(
        ft_thread_gone(c.daemon.pid(), &s.sid, Duration::from_secs(1)),
        "ft thread outlived the link: {:?}",
        thread_names(c.daemon.pid())
    );
}

/// Small round trips on other sessions while one session streams at full
/// speed: a stat, a shell keystroke echoed by its terminal and a byte
/// echoed through a port forward. Returns the worst of each kind.
fn round_trips_while_streaming(
    c: &Connected,
    streamer: impl FnOnce(&Demux, &AtomicBool, &AtomicUsize) + Send,
) -> (usize, [Duration; 3]) {
    let dm = Demux::start(&c.conn);
    let stop = AtomicBool::new(false);
    let echo = TcpListener::bind("127.0.0.1:0").expect("bind");
    let echo_addr = echo.local_addr().expect("addr");
    let echo_thread = std::thread::spawn(move || {
        let Ok((mut s, _)) = echo.accept() else {
            return;
        };
        let _ = s.set_read_timeout(Some(TIMEOUT));
        let mut b = [0u8; 64];
        while let Ok(n) = s.read(&mut b) {
            if n == 0 || s.write_all(&b[..n]).is_err() {
                return;
            }
        }
    });
    let stat = dm.session();
    let sh = dm.raw_session();
    let shell = |typ: &str| {
        ProtoMsg::new(PROTO_SHELL, typ, &sh.sid).with_prop("user_id", Value::Str(USER.into()))
    };
    sh.send(shell("new"));
    let m = sh.must_recv(TIMEOUT);
    assert_eq!(m.body.as_deref(), Some(&b"Shell started"[..]), "{m:?}");
    let pf = dm.session();
    let pfm = |typ: &str| {
        ProtoMsg::new(PROTO_PORTFORWARD, typ, &pf.sid)
            .with_prop("connection_id", Value::Str("c1".into()))
            .with_prop("user_id", Value::Str(USER.into()))
    };
    pf.send(pfm("new").with_body(encode_map(&[
        ("remote_host", Value::Str("127.0.0.1".into())),
        ("remote_port", Value::U16(echo_addr.port())),
        ("protocol", Value::Str("tcp".into())),
    ])));
    assert_eq!(pf.must_recv(TIMEOUT).hdr.typ, "new");
    // a quiet shell prompt first
    while sh.recv(Duration::from_millis(300)).is_some() {}

    let mut worst = [Duration::ZERO; 3];
    let progress = AtomicUsize::new(0);
    let streamed = std::thread::scope(|sc| {
        let h = sc.spawn(|| streamer(&dm, &stop, &progress));
        // the stream runs at full speed before the first round trip
        if !testbed::wait_until(TIMEOUT, || progress.load(Ordering::Relaxed) >= 1 << 20) {
            stop.store(true, Ordering::Relaxed);
            panic!("the stream did not start");
        }
        for i in 0..15 {
            let t = Instant::now();
            stat.stat(b"/").expect("stat");
            worst[0] = worst[0].max(t.elapsed());

            let t = Instant::now();
            sh.send(shell("shell").with_body(b"x".to_vec()));
            loop {
                let m = sh.must_recv(TIMEOUT);
                if m.hdr.typ == "shell" && m.body.as_deref().is_some_and(|b| b.contains(&b'x')) {
                    break;
                }
            }
            worst[1] = worst[1].max(t.elapsed());

            let t = Instant::now();
            pf.send(pfm("forward").with_body(vec![b'a' + i as u8]));
            let mut echoed = false;
            let mut acked = false;
            while !(echoed && acked) {
                let m = pf.must_recv(TIMEOUT);
                match m.hdr.typ.as_str() {
                    "ack" => acked = true,
                    "forward" => {
                        echoed = true;
                        pf.send(pfm("ack"));
                    }
                    t => panic!("port forward: {t}"),
                }
            }
            worst[2] = worst[2].max(t.elapsed());
        }
        stop.store(true, Ordering::Relaxed);
        h.join().expect("streamer");
        progress.load(Ordering::Relaxed)
    });
    pf.send(pfm("stop"));
    // the device's echo of the stop: the forwarded socket is closed
    while pf.must_recv(TIMEOUT).hdr.typ != "stop" {}
    sh.send(shell("stop"));
    drop(dm);
    c.conn.drop_tcp();
    let _ = echo_thread.join();
    (streamed, worst)
}

#[test]
fn a_streaming_download_leaves_other_sessions_small_round_trips_under_200ms() {
    let c = connected(special_files_allowed);
    let (streamed, worst) = round_trips_while_streaming(&c, |dm, stop, progress| {
        let s = dm.session();
        stream_zero(&s, stop, progress);
        s.close();
    });
    eprintln!("download streamed {streamed} bytes; worst round trips stat/shell/forward {worst:?}");
    assert!(
        streamed > 1 << 20,
        "the stream did not run: {streamed} bytes"
    );
    for (what, d) in ["stat", "shell", "port forward"].iter().zip(worst) {
        assert!(
            d < Duration::from_millis(200),
            "{what} round trip took {d:?}"
        );
    }
}

#[test]
fn a_flooding_shell_leaves_other_sessions_small_round_trips_under_200ms() {
    let c = connected(|_| {});
    let (streamed, worst) = round_trips_while_streaming(&c, |dm, stop, progress| {
        let s = dm.raw_session();
        let shell = |typ: &str| {
            // another user: Sessions.MaxPerUser is 1 by default
            ProtoMsg::new(PROTO_SHELL, typ, &s.sid).with_prop("user_id", Value::Str("flood".into()))
        };
        s.send(shell("new"));
        let m = s.must_recv(TIMEOUT);
        assert_eq!(m.body.as_deref(), Some(&b"Shell started"[..]), "{m:?}");
        s.send(
            shell("shell")
                .with_body(b"exec yes 0123456789012345678901234567890123456789\n".to_vec()),
        );
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            if let Some(m) = s.recv(Duration::from_millis(100)) {
                n += m.body.map_or(0, |b| b.len());
                progress.store(n, Ordering::Relaxed);
            }
        }
        s.send(shell("stop"));
    });
    eprintln!("shell streamed {streamed} bytes; worst round trips stat/shell/forward {worst:?}");
    assert!(
        streamed > 1 << 20,
        "the flood did not run: {streamed} bytes"
    );
    // the other shell shares the shells' lane with the flood: only the
    // router sessions are held to the bound here
    for (what, d) in [("stat", worst[0]), ("port forward", worst[2])] {
        assert!(
            d < Duration::from_millis(200),
            "{what} round trip took {d:?}"
        );
    }
}

// ------------------------------------------------------------------ paths

/// Uploads and downloads under names that are not UTF-8, with and without a
/// Chroot; the file on disk has exactly the requested bytes.
fn non_utf8_paths_round_trip(chroot: bool) {
    let base = TempDir::new("abuse-path");
    let root = base.join("root");
    std::fs::create_dir_all(&root).expect("mkdir");
    let c = connected(|cfg| {
        if chroot {
            cfg["Limits"] = serde_json::json!({
                "Enabled": true,
                "FileTransfer": {"Chroot": root.display().to_string()},
            });
        }
    });
    let dm = Demux::start(&c.conn);
    let mut up = root.as_os_str().as_bytes().to_vec();
    up.extend_from_slice(b"/\xfa\xfb-upload.bin");
    let data = testbed::random_bytes(3 * CHUNK + 5, 2);
    let s = dm.session();
    s.upload(&up, &data, TIMEOUT).expect("upload");
    s.close();
    let on_disk = PathBuf::from(std::ffi::OsStr::from_bytes(&up));
    assert_eq!(
        std::fs::read(&on_disk).expect("created under its exact bytes"),
        data
    );
    let names: Vec<Vec<u8>> = std::fs::read_dir(&root)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().as_bytes().to_vec())
        .collect();
    assert_eq!(names, vec![b"\xfa\xfb-upload.bin".to_vec()]);

    let mut down = root.as_os_str().as_bytes().to_vec();
    down.extend_from_slice(b"/d\xe9j\xe0-vu\xff");
    let want = testbed::random_bytes(2 * CHUNK, 3);
    std::fs::write(std::ffi::OsStr::from_bytes(&down), &want).expect("write");
    let s = dm.session();
    assert_eq!(s.download(&down, TIMEOUT).expect("download"), want);
    // stat echoes the very bytes
    let info = s.stat(&down).expect("stat");
    let body = info.body.expect("body");
    assert!(
        body.windows(down.len()).any(|w| w == down),
        "file_info path"
    );
    s.close();

    // a missing non-UTF-8 name is shown escaped, not as U+FFFD
    let mut missing = root.as_os_str().as_bytes().to_vec();
    missing.extend_from_slice(b"/gone\xfe");
    let s = dm.session();
    let e = s.download(&missing, TIMEOUT).expect_err("missing");
    assert!(e.contains("gone\\xfe") && !e.contains('\u{fffd}'), "{e}");

    // a NUL byte is refused before anything touches the disk
    let mut nul = root.as_os_str().as_bytes().to_vec();
    nul.extend_from_slice(b"/a\0b");
    let e = s.upload(&nul, b"x", TIMEOUT).expect_err("NUL upload");
    assert_eq!(
        e,
        "invalid request parameters: path: must not contain a NUL byte."
    );
    let e = s.download(&nul, TIMEOUT).expect_err("NUL download");
    assert!(e.ends_with("must not contain a NUL byte."), "{e}");
    s.close();
    assert_eq!(std::fs::read_dir(&root).expect("ls").count(), 2);
}

#[test]
fn non_utf8_paths_are_created_and_read_under_their_exact_bytes() {
    non_utf8_paths_round_trip(false);
}

#[test]
fn non_utf8_paths_keep_their_bytes_inside_a_chroot() {
    non_utf8_paths_round_trip(true);
}

// ------------------------------------------------------------ rate limits

#[test]
fn a_rate_limited_upload_ends_in_the_device_error_not_the_server_timeout() {
    let c = connected(|cfg| {
        cfg["Limits"] = serde_json::json!({
            "Enabled": true,
            "FileTransfer": {"Counters": {"MaxBytesRxPerMinute": 16384}},
        });
    });
    let mgmt = Management::start(&c.server);
    assert!(mgmt.wait_device(TIMEOUT));
    let dir = TempDir::new("abuse-rate");
    let target = dir.join("big.bin");
    let data = testbed::random_bytes(512 << 10, 4);
    let t = Instant::now();
    let (status, body) = rest_upload(&mgmt, &target.display().to_string(), &data);
    let took = t.elapsed();
    eprintln!("rate-limited upload: {status} {body} after {took:?}");
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("\"failed to write file chunk: transmitted bytes limit exhausted\""),
        "{body}"
    );
    assert!(took < Duration::from_secs(25), "{took:?}");
    assert!(!target.exists());
}

/// `PUT …/devices/:id/upload` as deviceconnect's clients send it (multipart
/// `path`, then `file`); the status and the body of the answer.
fn rest_upload(mgmt: &Management, path: &str, data: &[u8]) -> (u16, String) {
    let boundary = "abuse-boundary-7d3c";
    let mut body = Vec::new();
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"path\"\r\n\r\n{path}\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(data);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let addr = mgmt.url().trim_start_matches("http://").to_string();
    let mut s = std::net::TcpStream::connect(&addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    let head = format!(
        "PUT /api/management/v1/deviceconnect/devices/{DEVICE_ID}/upload HTTP/1.1\r\n\
         Host: {addr}\r\nAuthorization: Bearer t\r\n\
         Content-Type: multipart/form-data; boundary={boundary}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("head");
    s.write_all(&body).expect("body");
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).expect("answer");
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (status, body)
}

#[test]
fn a_rate_limited_download_ends_in_the_device_error_before_20s_of_silence() {
    let c = connected(|cfg| {
        cfg["Limits"] = serde_json::json!({
            "Enabled": true,
            "FileTransfer": {"Counters": {"MaxBytesTxPerMinute": 16384}},
        });
    });
    let dm = Demux::start(&c.conn);
    let dir = TempDir::new("abuse-rate-down");
    let file = dir.join("f");
    std::fs::write(&file, testbed::random_bytes(64 << 10, 5)).expect("write");
    let s = dm.session();
    let t = Instant::now();
    // the 4 KiB burst passes; the next chunk would need 20 s of refill
    let e = s
        .download(file.as_os_str().as_bytes(), Duration::from_secs(30))
        .expect_err("throttled out");
    eprintln!("rate-limited download: {e:?} after {:?}", t.elapsed());
    assert_eq!(e, "transmitted bytes limit exhausted");
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
}
