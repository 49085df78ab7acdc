//! File transfer (protocol 2) end to end against the stand-in server, with
//! the test acting exactly like deviceconnect (transfer.md §2.3/§2.4):
//! round trips, wire format, the escape suite, interrupted uploads, limits.

use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mender_connect::wire::codec::{PROTO_CONTROL, PROTO_FILETRANSFER, ProtoMsg, Value};
use mender_connect::wire::control::{Accept, ControlError, Open, decode_map, encode_map};
use testbed::{
    AuthService, ConnHandle, Daemon, DbusDaemon, Server, TIMEOUT, TempDir, default_config,
};

const CHUNK: usize = 4096;
const USER: &str = "b3f0c9a4-1d2e-4f50-8a61-7c8d9e0f1a2b";

struct Bed {
    // field order = drop order: daemon first, then its peers
    daemon: Daemon,
    conn: ConnHandle,
    _server: Server,
    _auth: AuthService,
    _bus: DbusDaemon,
}

fn bed(edit: impl FnOnce(&mut serde_json::Value), env: &[(&str, &str)]) -> Bed {
    let mut cfg: serde_json::Value = serde_json::from_str(&default_config()).expect("config");
    edit(&mut cfg);
    let c = testbed::env::connected(&cfg.to_string(), env, "token-ft");
    Bed {
        daemon: c.daemon,
        conn: c.conn,
        _server: c.server,
        _auth: c.auth,
        _bus: c.bus,
    }
}

fn limits(ft: serde_json::Value) -> impl FnOnce(&mut serde_json::Value) {
    move |c| c["Limits"] = serde_json::json!({"Enabled": true, "FileTransfer": ft})
}

fn new_sid() -> String {
    static N: AtomicUsize = AtomicUsize::new(1);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("{:08x}-0000-4000-8000-{n:012x}", std::process::id())
}

fn ft(typ: &str, sid: &str) -> ProtoMsg {
    ProtoMsg::new(PROTO_FILETRANSFER, typ, sid).with_prop("user_id", Value::Str(USER.into()))
}

fn path_body(p: &Path) -> Vec<u8> {
    encode_map(&[("path", Value::Str(p.display().to_string()))])
}

/// The `err` of a file-transfer error body.
fn err_text(m: &ProtoMsg) -> String {
    let body = m.body.as_deref().unwrap_or_default();
    let map = decode_map(body).expect("error body");
    map.iter()
        .find(|(k, _)| k == "err")
        .and_then(|(_, v)| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

impl Bed {
    /// Next message of session `sid`, answering idle pings on the way.
    fn recv(&self, sid: &str, timeout: Duration) -> Option<ProtoMsg> {
        self.conn.recv_msg_matching(timeout, |m| {
            if m.hdr.proto == PROTO_CONTROL && m.hdr.typ == "ping" {
                self.conn
                    .send_msg(&ProtoMsg::new(PROTO_CONTROL, "pong", &m.hdr.sid));
                return false;
            }
            m.hdr.sid == sid
        })
    }

    fn must_recv(&self, sid: &str) -> ProtoMsg {
        self.recv(sid, TIMEOUT).unwrap_or_else(|| {
            self.daemon.dump_log();
            panic!("no message for session {sid}")
        })
    }

    /// deviceconnect's handshake: `open`, then the next message must be `accept`.
    fn open(&self) -> (String, Vec<u16>) {
        let sid = new_sid();
        let open = Open { versions: vec![1] };
        self.conn
            .send_msg(&ProtoMsg::new(PROTO_CONTROL, "open", &sid).with_body(open.encode()));
        let m = self.must_recv(&sid);
        assert_eq!(m.hdr.typ, "accept", "{m:?}");
        let acc = Accept::decode(m.body.as_deref().unwrap_or_default()).expect("accept body");
        (sid, acc.protocols)
    }

    fn close(&self, sid: &str) {
        self.conn
            .send_msg(&ProtoMsg::new(PROTO_CONTROL, "close", sid));
    }

    fn stat(&self, p: &Path) -> Result<ProtoMsg, String> {
        let (sid, _) = self.open();
        self.conn
            .send_msg(&ft("stat", &sid).with_body(path_body(p)));
        let m = self.must_recv(&sid);
        self.close(&sid);
        match m.hdr.typ.as_str() {
            "file_info" => Ok(m),
            "error" => Err(err_text(&m)),
            t => panic!("unexpected {t}"),
        }
    }

    /// deviceconnect's download: checks each offset, acks every 10th chunk
    /// and the EOF. Returns the data or the device's error text.
    fn download(&self, p: &Path) -> Result<Vec<u8>, String> {
        let (sid, _) = self.open();
        self.conn
            .send_msg(&ft("get_file", &sid).with_body(path_body(p)));
        let mut data = Vec::new();
        let mut chunks = 0usize;
        let result = loop {
            let m = self.must_recv(&sid);
            match m.hdr.typ.as_str() {
                "file_chunk" => {
                    assert_eq!(
                        m.prop("offset"),
                        Some(&Value::I64(data.len() as i64)),
                        "wrong offset received"
                    );
                    let ack = |n: usize| ft("ack", &sid).with_prop("offset", Value::I64(n as i64));
                    match m.body {
                        None => {
                            self.conn.send_msg(&ack(data.len()));
                            break Ok(data);
                        }
                        Some(b) => {
                            assert!(!b.is_empty() && b.len() <= CHUNK, "chunk of {}", b.len());
                            data.extend_from_slice(&b);
                            chunks += 1;
                            if chunks.is_multiple_of(10) {
                                self.conn.send_msg(&ack(data.len()));
                            }
                        }
                    }
                }
                "error" => break Err(err_text(&m)),
                t => panic!("unexpected {t} during download"),
            }
        };
        self.close(&sid);
        result
    }

    /// deviceconnect's upload: window of 20 chunks beyond the highest ack,
    /// EOF without body, done at the ack ≥ total. `stop_after` = leave the
    /// session hanging after that many bytes (returns the sid as the error).
    fn upload_with(
        &self,
        p: &Path,
        data: &[u8],
        extra: &[(&str, Value)],
        stop_after: Option<usize>,
    ) -> Result<(), String> {
        let (sid, _) = self.open();
        let mut body = vec![("path", Value::Str(p.display().to_string()))];
        body.extend(extra.iter().cloned());
        self.conn
            .send_msg(&ft("put_file", &sid).with_body(encode_map(&body)));
        let first = self.must_recv(&sid);
        match first.hdr.typ.as_str() {
            "ack" => assert_eq!(first.hdr.props.len(), 1, "first ack props: {first:?}"),
            "error" => {
                self.close(&sid);
                return Err(err_text(&first));
            }
            t => panic!("unexpected {t}"),
        }
        let mut acked: i64 = 0;
        let mut off = 0usize;
        let on_msg = |m: ProtoMsg, acked: &mut i64| -> Result<(), String> {
            match m.hdr.typ.as_str() {
                "ack" => {
                    match m.prop("offset") {
                        Some(Value::I64(o)) => *acked = (*acked).max(*o),
                        other => panic!("ack offset {other:?}"),
                    }
                    Ok(())
                }
                "error" => Err(err_text(&m)),
                t => panic!("unexpected {t} during upload"),
            }
        };
        let result = (|| {
            loop {
                if stop_after.is_some_and(|s| off >= s) {
                    return Err(sid.clone());
                }
                // deviceconnect: send while offset ≤ lastAck + 20 chunks
                while off as i64 > acked + 20 * CHUNK as i64 {
                    let m = self.must_recv(&sid);
                    on_msg(m, &mut acked)?;
                }
                while let Some(m) = self.recv(&sid, Duration::ZERO) {
                    on_msg(m, &mut acked)?;
                }
                let chunk = ft("file_chunk", &sid).with_prop("offset", Value::I64(off as i64));
                if off >= data.len() {
                    self.conn.send_msg(&chunk);
                    break;
                }
                let end = (off + CHUNK).min(data.len());
                self.conn
                    .send_msg(&chunk.with_body(data[off..end].to_vec()));
                off = end;
            }
            // the EOF's own ack (an earlier one may already cover an empty file)
            acked = -1;
            while acked < data.len() as i64 {
                let m = self.must_recv(&sid);
                on_msg(m, &mut acked)?;
            }
            Ok(())
        })();
        if stop_after.is_none() {
            self.close(&sid);
        }
        result
    }

    fn upload(&self, p: &Path, data: &[u8]) -> Result<(), String> {
        self.upload_with(p, data, &[], None)
    }

    fn upload_mode(&self, p: &Path, data: &[u8], mode: u32) -> Result<(), String> {
        self.upload_with(p, data, &[("mode", Value::U32(mode))], None)
    }
}

fn pattern(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn expect_err(r: Result<impl std::fmt::Debug, String>, needle: &str, what: &str) {
    match r {
        Err(e) => assert!(e.contains(needle), "{what}: {e:?} lacks {needle:?}"),
        Ok(v) => panic!("{what}: accepted ({v:?}), expected {needle:?}"),
    }
}

#[test]
fn round_trips_are_byte_identical_with_int64_offsets_and_bodyless_eof() {
    let b = bed(|_| {}, &[]);
    let dir = TempDir::new("ft-rt");
    let sizes = [0usize, 1, 4095, 4096, 4097, 10 << 20];
    for (i, &n) in sizes.iter().enumerate() {
        let data = pattern(n, i as u32);
        let up = dir.join(&format!("up-{n}"));
        b.upload(&up, &data)
            .unwrap_or_else(|e| panic!("upload {n}: {e}"));
        let got = std::fs::read(&up).expect("uploaded file");
        assert!(got == data, "upload of {n} bytes differs");
        assert_eq!(std::fs::metadata(&up).expect("meta").mode() & 0o7777, 0o644);
        let src = dir.join(&format!("src-{n}"));
        std::fs::write(&src, &data).expect("write");
        let down = b
            .download(&src)
            .unwrap_or_else(|e| panic!("download {n}: {e}"));
        assert!(down == data, "download of {n} bytes differs");
    }
    // nothing but the expected files: no temp file survived
    let mut want: Vec<String> = sizes
        .iter()
        .flat_map(|n| [format!("src-{n}"), format!("up-{n}")])
        .collect();
    want.sort();
    assert_eq!(names(dir.path()), want);

    // the wire: every offset the device wrote is d3, every EOF chunk has no body key
    let (mut offsets, mut eofs) = (0, 0);
    for f in b.conn.frames() {
        let m = f.decoded().expect("decodes");
        if m.hdr.proto != PROTO_FILETRANSFER {
            continue;
        }
        if let Some(v) = m.prop("offset") {
            assert!(matches!(v, Value::I64(_)), "offset {v:?} in {}", m.hdr.typ);
            offsets += 1;
        }
        if m.hdr.typ == "file_chunk" && m.body.is_none() {
            assert_eq!(f.data[0], 0x81, "EOF chunk carries a body key");
            eofs += 1;
        }
    }
    assert_eq!(eofs, sizes.len());
    assert!(offsets > (10 << 20) / CHUNK, "{offsets}");

    // stat: file_info with Go modes
    let info = b.stat(&dir.join("src-1")).expect("stat");
    assert!(info.hdr.props.is_empty());
    let map = decode_map(info.body.as_deref().expect("body")).expect("map");
    let get = |k: &str| map.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(get("size"), Some(Value::I64(1)));
    assert_eq!(get("mode"), Some(Value::U32(0o644)));
    let dinfo = b.stat(dir.path()).expect("stat dir");
    let dmap = decode_map(dinfo.body.as_deref().expect("body")).expect("map");
    let mode = dmap
        .iter()
        .find(|(n, _)| n == "mode")
        .map(|(_, v)| v.clone());
    assert!(
        matches!(mode, Some(Value::U32(m)) if m & (1 << 31) != 0),
        "{mode:?}"
    );
    expect_err(
        b.stat(&dir.join("missing")),
        "failed to get file info from path",
        "stat missing",
    );
}

#[test]
fn protocol_errors_use_the_upstream_texts() {
    let b = bed(|_| {}, &[]);
    let dir = TempDir::new("ft-proto");
    let (sid, protos) = b.open();
    assert!(protos.contains(&2), "{protos:?}");
    // chunk while idle: error echoing its props
    let stray = ft("file_chunk", &sid).with_prop("offset", Value::I64(0));
    b.conn.send_msg(&stray);
    let e = b.must_recv(&sid);
    assert_eq!(e.hdr.typ, "error");
    assert_eq!(e.hdr.props, stray.hdr.props);
    assert_eq!(err_text(&e), "no file transfer in progress");
    // unknown type
    b.conn.send_msg(&ft("SpecialSauce", &sid));
    let e = b.must_recv(&sid);
    assert_eq!(
        err_text(&e),
        "session: filetransfer message type 'SpecialSauce' not supported"
    );
    // blank path
    b.conn
        .send_msg(&ft("get_file", &sid).with_body(encode_map(&[])));
    assert_eq!(
        err_text(&b.must_recv(&sid)),
        "invalid request parameters: path: cannot be blank."
    );
    // a compact-int ack offset aborts the download
    let f = dir.join("big");
    std::fs::write(&f, pattern(30 * CHUNK, 9)).expect("write");
    b.conn
        .send_msg(&ft("get_file", &sid).with_body(path_body(&f)));
    for _ in 0..20 {
        assert_eq!(b.must_recv(&sid).hdr.typ, "file_chunk");
    }
    b.conn
        .send_msg(&ft("ack", &sid).with_prop("offset", Value::U32(81920)));
    let e = b.must_recv(&sid);
    assert_eq!(err_text(&e), "invalid offset data type: require int64");
    assert_eq!(e.prop("offset"), Some(&Value::U32(81920)));
    // upload: wrong offset
    b.conn
        .send_msg(&ft("put_file", &sid).with_body(path_body(&dir.join("u"))));
    assert_eq!(b.must_recv(&sid).hdr.typ, "ack");
    b.conn.send_msg(
        &ft("file_chunk", &sid)
            .with_prop("offset", Value::I64(1234))
            .with_body(b"x".to_vec()),
    );
    let e = b.must_recv(&sid);
    assert_eq!(err_text(&e), "received unexpected chunk offset");
    assert_eq!(e.prop("user_id"), Some(&Value::Str(USER.into())));
    assert!(testbed::wait_until(TIMEOUT, || names(dir.path()) == ["big"]));
    b.close(&sid);
}

/// The `code` of a file-transfer error body, if any.
fn err_code(m: &ProtoMsg) -> Option<i64> {
    let map = decode_map(m.body.as_deref().unwrap_or_default()).expect("error body");
    map.iter()
        .find(|(k, _)| k == "code")
        .and_then(|(_, v)| v.as_i64())
}

#[test]
fn relative_paths_are_refused_and_only_download_denials_carry_code_403() {
    let dir = TempDir::new("ft-code");
    let secret = dir.join("eleven");
    std::fs::write(&secret, b"0123456789A").expect("write");
    let b = bed(limits(serde_json::json!({"MaxFileSize": 10})), &[]);
    let (sid, _) = b.open();
    let rel = encode_map(&[("path", Value::Str("etc/passwd".into()))]);
    for typ in ["stat", "get_file", "put_file"] {
        b.conn.send_msg(&ft(typ, &sid).with_body(rel.clone()));
        let e = b.must_recv(&sid);
        assert_eq!(e.hdr.typ, "error", "{typ}");
        assert_eq!(
            err_text(&e),
            "invalid request parameters: path: must be absolute",
            "{typ}"
        );
        assert_eq!(err_code(&e), None, "{typ}");
    }
    // stat answers despite the limit; get_file is refused with code 403
    b.conn
        .send_msg(&ft("stat", &sid).with_body(path_body(&secret)));
    assert_eq!(b.must_recv(&sid).hdr.typ, "file_info");
    b.conn
        .send_msg(&ft("get_file", &sid).with_body(path_body(&secret)));
    let e = b.must_recv(&sid);
    assert_eq!(
        err_text(&e),
        "access denied: the file size is over the limit"
    );
    assert_eq!(err_code(&e), Some(403));
    // a missing file is no denial: no code (deviceconnect answers 500)
    b.conn
        .send_msg(&ft("get_file", &sid).with_body(path_body(&dir.join("missing"))));
    let e = b.must_recv(&sid);
    assert!(err_text(&e).ends_with("no such file or directory"), "{e:?}");
    assert_eq!(err_code(&e), None);
    // upload refusals keep no code (upstream asserts 400)
    b.conn
        .send_msg(&ft("put_file", &sid).with_body(path_body(&dir.join("no/such/dir/x"))));
    let e = b.must_recv(&sid);
    assert!(
        err_text(&e).starts_with("failed to create target file: "),
        "{e:?}"
    );
    assert_eq!(err_code(&e), None);
    b.close(&sid);
}

/// Layout: <base>/chroot/{ok.txt, exists.txt, sub/, abs -> <base>/secret,
/// rel -> ../secret, up -> .., fifo, null}, <base>/chroot-x/secret, <base>/secret.
fn escape_layout() -> (TempDir, PathBuf) {
    let base = TempDir::new("ft-esc");
    let root = base.join("chroot");
    std::fs::create_dir_all(root.join("sub")).expect("mkdir");
    std::fs::create_dir_all(base.join("chroot-x")).expect("mkdir");
    std::fs::write(root.join("ok.txt"), b"inside").expect("write");
    std::fs::write(root.join("exists.txt"), b"old").expect("write");
    std::fs::write(base.join("secret"), b"SECRET").expect("write");
    std::fs::write(base.join("chroot-x/secret"), b"SECRET").expect("write");
    symlink(base.join("secret"), root.join("abs")).expect("ln");
    symlink("../secret", root.join("rel")).expect("ln");
    symlink("..", root.join("up")).expect("ln");
    let c = |p: PathBuf| std::ffi::CString::new(p.display().to_string()).expect("cstr");
    // SAFETY: plain syscalls with valid NUL-terminated paths.
    unsafe {
        assert_eq!(libc::mkfifo(c(root.join("fifo")).as_ptr(), 0o644), 0);
        assert_eq!(
            libc::mknod(
                c(root.join("null")).as_ptr(),
                libc::S_IFCHR | 0o666,
                libc::makedev(1, 3)
            ),
            0,
            "mknod needs root"
        );
    }
    (base, root)
}

fn escape_suite(env: &[(&str, &str)]) {
    let (base, root) = escape_layout();
    let b = bed(
        limits(serde_json::json!({
            "Chroot": root.display().to_string(),
            "FollowSymLinks": true,
            "RegularFilesOnly": true,
            "AllowOverwrite": false,
        })),
        env,
    );
    let outside = "the target file path is outside chroot";
    assert_eq!(b.download(&root.join("ok.txt")).expect("inside"), b"inside");
    assert_eq!(
        b.download(&root.join("sub/../ok.txt")).expect("inside"),
        b"inside"
    );
    for (p, what) in [
        (root.join("../secret"), "dot-dot"),
        (root.join("abs"), "absolute symlink"),
        (root.join("rel"), "relative symlink"),
        (root.join("up/secret"), "symlink as intermediate dir"),
        (base.join("chroot-x/secret"), "prefix sibling"),
    ] {
        expect_err(b.download(&p), outside, what);
        // stat answers metadata without the limits, as upstream's os.Stat
        b.stat(&p).unwrap_or_else(|e| panic!("stat {what}: {e}"));
    }
    expect_err(
        b.download(&root.join("fifo")),
        "only regular files are allowed",
        "fifo",
    );
    expect_err(
        b.download(&root.join("null")),
        "only regular files are allowed",
        "device",
    );

    let writes = [
        (root.join("../escaped"), outside, "upload dot-dot"),
        (
            root.join("up/escaped"),
            outside,
            "upload through symlink dir",
        ),
        (
            base.join("chroot-x/escaped"),
            outside,
            "upload prefix sibling",
        ),
        (
            root.join("abs"),
            "cannot overwrite irregular file",
            "upload onto symlink",
        ),
        (
            root.join("exists.txt"),
            "forbidden to overwrite the file",
            "overwrite",
        ),
    ];
    for (p, needle, what) in writes {
        expect_err(b.upload(&p, b"PWNED"), needle, what);
    }
    // the Unix bit is kept under PreserveMode, as upstream keeps it
    b.upload_mode(&root.join("suid"), b"x", 0o4755)
        .expect("unix setuid");
    let m = std::fs::metadata(root.join("suid")).expect("suid").mode();
    assert_eq!(m & 0o7777, 0o4755);
    std::fs::remove_file(root.join("suid")).expect("rm suid");
    expect_err(
        b.upload_mode(&root.join("suid"), b"x", (1 << 23) | 0o755),
        "the set uid mode is forbidden",
        "go setuid",
    );
    // nothing written outside, nothing changed inside
    assert_eq!(names(base.path()), ["chroot", "chroot-x", "secret"]);
    assert_eq!(names(&base.join("chroot-x")), ["secret"]);
    assert_eq!(
        std::fs::read(base.join("secret")).expect("secret"),
        b"SECRET"
    );
    assert_eq!(
        std::fs::read(root.join("exists.txt")).expect("exists"),
        b"old"
    );
    assert_eq!(
        names(&root),
        [
            "abs",
            "exists.txt",
            "fifo",
            "null",
            "ok.txt",
            "rel",
            "sub",
            "up"
        ]
    );
    // a legal upload still works
    b.upload(&root.join("sub/new.txt"), b"fine")
        .expect("legal upload");
    assert_eq!(
        std::fs::read(root.join("sub/new.txt")).expect("new"),
        b"fine"
    );
}

#[test]
fn escape_suite_with_openat2() {
    escape_suite(&[]);
}

#[test]
fn escape_suite_with_the_openat_walk() {
    escape_suite(&[("MENDER_CONNECT_FORCE_PATH_WALK", "1")]);
}

#[test]
fn symlink_swapped_in_after_the_check_never_leaks() {
    let (base, root) = escape_layout();
    let b = bed(
        limits(serde_json::json!({
            "Chroot": root.display().to_string(),
            "FollowSymLinks": true,
            "AllowOverwrite": true,
        })),
        &[],
    );
    std::fs::create_dir_all(base.join("outdir")).expect("mkdir");
    std::fs::create_dir_all(root.join("realdir")).expect("mkdir");
    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicUsize::new(0));
    // the attacker: flips race.txt and racedir between the real thing and a link outside
    let flipper = {
        let (stop, swaps, root, base) = (
            stop.clone(),
            swaps.clone(),
            root.clone(),
            base.path().to_path_buf(),
        );
        std::thread::spawn(move || {
            let (file, dir) = (root.join("race.txt"), root.join("racedir"));
            while !stop.load(Ordering::Relaxed) {
                let tmp = root.join("flip.tmp");
                let _ = std::fs::remove_file(&tmp);
                std::fs::write(&tmp, b"inside").expect("write");
                let _ = std::fs::rename(&tmp, &file);
                let _ = std::fs::remove_file(&tmp);
                symlink(base.join("secret"), &tmp).expect("ln");
                let _ = std::fs::rename(&tmp, &file);
                let _ = std::fs::remove_file(&tmp);
                symlink(base.join("outdir"), &tmp).expect("ln");
                let _ = std::fs::rename(&tmp, &dir);
                let _ = std::fs::remove_file(&tmp);
                symlink("realdir", &tmp).expect("ln");
                let _ = std::fs::rename(&tmp, &dir);
                swaps.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let (mut ok_reads, mut ok_writes) = (0, 0);
    for i in 0..40 {
        match b.download(&root.join("race.txt")) {
            Ok(d) => {
                assert_eq!(d, b"inside", "leaked data through a swapped link");
                ok_reads += 1;
            }
            Err(e) => assert!(
                e.contains("outside chroot") || e.contains("no such file"),
                "{e}"
            ),
        }
        if b.upload(&root.join(format!("racedir/f{i}")), b"data")
            .is_ok()
        {
            ok_writes += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    flipper.join().expect("flipper");
    assert!(swaps.load(Ordering::Relaxed) > 10, "the race barely ran");
    assert!(names(&base.join("outdir")).is_empty(), "an upload escaped");
    assert_eq!(
        std::fs::read(base.join("secret")).expect("secret"),
        b"SECRET"
    );
    eprintln!("race: {ok_reads} reads and {ok_writes} writes went through, all inside");
}

#[test]
fn owner_group_size_and_link_limits() {
    let dir = TempDir::new("ft-own");
    let mine = dir.join("root-owned");
    let alien = dir.join("alien-owner");
    let wrong_group = dir.join("alien-group");
    for p in [&mine, &alien, &wrong_group] {
        std::fs::write(p, b"0123456789").expect("write");
    }
    std::os::unix::fs::chown(&alien, Some(54321), Some(0)).expect("chown");
    std::os::unix::fs::chown(&wrong_group, Some(65534), Some(54321)).expect("chown");
    std::fs::write(dir.join("eleven"), b"0123456789A").expect("write");
    symlink(&mine, dir.join("link")).expect("ln");
    let b = bed(
        limits(serde_json::json!({
            "OwnerGet": ["root", "nobody"],
            "GroupGet": ["root"],
            "MaxFileSize": 10,
            "FollowSymLinks": false,
            "AllowOverwrite": true,
            "Umask": "022",
        })),
        &[],
    );
    assert_eq!(b.download(&mine).expect("root-owned"), b"0123456789");
    expect_err(
        b.download(&alien),
        "access denied: the file owner does not match",
        "owner",
    );
    expect_err(
        b.download(&wrong_group),
        "access denied: the file group does not match",
        "group",
    );
    expect_err(
        b.download(&dir.join("eleven")),
        "the file size is over the limit",
        "size",
    );
    expect_err(
        b.download(&dir.join("link")),
        "forbidden to follow the link",
        "link",
    );
    // exactly MaxFileSize is allowed both ways; one more byte is not
    b.upload_mode(&dir.join("ten"), b"0123456789", 0o600)
        .expect("10 bytes");
    // Umask keeps the upstream meaning: 0777 &^ 022
    let m = std::fs::metadata(dir.join("ten"))
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(m & 0o7777, 0o755);
    assert_eq!(
        b.upload(&dir.join("big"), b"0123456789A"),
        Err("failed to write file chunk: transmitted bytes limit exhausted".to_string()),
        "upload size"
    );
    assert!(!dir.join("big").exists());
    assert_eq!(
        names(dir.path()),
        [
            "alien-group",
            "alien-owner",
            "eleven",
            "link",
            "root-owned",
            "ten"
        ]
    );
}

#[test]
fn interrupted_upload_leaves_neither_target_nor_temp() {
    let b = bed(|_| {}, &[]);
    let dir = TempDir::new("ft-drop");
    let target = dir.join("partial.bin");
    let data = pattern(1 << 20, 3);
    // session close mid-upload removes the temp file
    let r = b.upload_with(&target, &data, &[], Some(40 * CHUNK));
    let sid = r.expect_err("stopped halfway");
    let listing = names(dir.path());
    assert_eq!(listing.len(), 1, "{listing:?}");
    assert!(
        listing[0].starts_with("partial.bin.") && listing[0].len() == "partial.bin.".len() + 10
    );
    b.close(&sid);
    assert!(
        testbed::wait_until(TIMEOUT, || names(dir.path()).is_empty()),
        "temp left after close"
    );
    // connection loss mid-upload removes it too
    let _ = b.upload_with(&target, &data, &[], Some(40 * CHUNK));
    assert_eq!(names(dir.path()).len(), 1);
    b.conn.drop_tcp();
    assert!(
        testbed::wait_until(TIMEOUT, || names(dir.path()).is_empty()),
        "left behind: {:?}",
        names(dir.path())
    );
    assert!(!target.exists());
}

#[test]
fn disable_removes_protocol_2_from_accept() {
    let b = bed(
        |c| c["FileTransfer"] = serde_json::json!({"Disable": true}),
        &[],
    );
    let (sid, protos) = b.open();
    assert!(!protos.contains(&2), "{protos:?}");
    b.conn
        .send_msg(&ft("stat", &sid).with_body(encode_map(&[("path", Value::Str("/".into()))])));
    let m = b.must_recv(&sid);
    assert_eq!(m.hdr.proto, PROTO_CONTROL);
    let e = ControlError::decode(m.body.as_deref().unwrap_or_default()).expect("control error");
    assert_eq!(e.err, "no handler registered for protocol: 0x0002");
}

#[test]
fn download_rate_follows_the_configured_limit() {
    // L = 3 MiB/min: burst C = 256 KiB, then r = (L − C)/60 per second.
    let limit: u64 = 3 << 20;
    let b = bed(
        limits(serde_json::json!({"Counters": {"MaxBytesTxPerMinute": limit}})),
        &[],
    );
    let dir = TempDir::new("ft-rate");
    let burst = (256 << 10) as usize;
    let f = dir.join("f");
    let data = pattern(burst + (300 << 10), 5);
    std::fs::write(&f, &data).expect("write");
    let (sid, _) = b.open();
    b.conn
        .send_msg(&ft("get_file", &sid).with_body(path_body(&f)));
    let (mut got, mut chunks) = (0usize, 0usize);
    let mut t0 = None;
    loop {
        let m = b.must_recv(&sid);
        assert_eq!(m.hdr.typ, "file_chunk", "{}", err_text(&m));
        let Some(body) = m.body else { break };
        got += body.len();
        chunks += 1;
        if got >= burst && t0.is_none() {
            t0 = Some((Instant::now(), got));
        }
        if chunks.is_multiple_of(10) {
            b.conn
                .send_msg(&ft("ack", &sid).with_prop("offset", Value::I64(got as i64)));
        }
    }
    b.conn
        .send_msg(&ft("ack", &sid).with_prop("offset", Value::I64(got as i64)));
    assert_eq!(got, data.len());
    let (t0, at) = t0.expect("passed the burst");
    let rate = (got - at) as f64 / t0.elapsed().as_secs_f64();
    let configured = limit as f64 / 60.0;
    eprintln!("throttled rate {rate:.0} B/s, configured {configured:.0} B/s");
    assert!(
        (rate - configured).abs() <= 0.15 * configured,
        "rate {rate:.0} B/s vs configured {configured:.0} B/s"
    );
}
