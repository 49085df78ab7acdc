//! Entry points for the fuzz targets in `fuzz/`: each takes arbitrary bytes,
//! runs one family of the daemon's parsers on them and panics only when an
//! invariant (round-trip stability) is broken. Not part of the daemon's API.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::conn::reframe::Reframer;
use crate::limits::path::Resolver;
use crate::sessions::filetransfer::wire::{self, Request};
use crate::sessions::portforward::parse_new;
use crate::wire::action;
use crate::wire::codec::{self, ProtoMsg};
use crate::wire::control::{self, Accept, ControlError, Open};
use crate::wire::view::{self, MsgView};

/// Encodes `msg`, decodes the result and checks it encodes to the same bytes.
fn assert_stable(msg: &ProtoMsg) {
    let first = codec::encode(msg);
    let again = match codec::decode(&first) {
        Ok(m) => m,
        Err(e) => panic!("re-decoding our own encoding failed: {e}\n{first:02x?}"),
    };
    // bytes, not structs: a NaN float is not equal to itself
    assert_eq!(first, codec::encode(&again), "encode is not stable");
}

/// ProtoMsg decoder, and encode→decode→encode stability of what it accepts.
pub fn codec(data: &[u8]) {
    if let Ok(msg) = codec::decode(data) {
        assert_stable(&msg);
    }
    if let Some(v) = view::view(data) {
        assert_view_agrees(data, &v);
    }
    if let Ok((v, used)) = codec::decode_value(data) {
        assert!(used <= data.len());
        let mut first = Vec::new();
        codec::encode_value(&v, &mut first);
        let (again, n) = match codec::decode_value(&first) {
            Ok(x) => x,
            Err(e) => panic!("re-decoding our own value failed: {e}\n{first:02x?}"),
        };
        assert_eq!(n, first.len());
        let mut second = Vec::new();
        codec::encode_value(&again, &mut second);
        assert_eq!(first, second, "value encoding is not stable");
    }
}

/// Checks that the borrowed view `v` of `data` says what the full decode
/// says: a message it sees decodes, with the same fields and properties.
pub fn assert_view_agrees(data: &[u8], v: &MsgView<'_>) {
    let msg = match codec::decode(data) {
        Ok(m) => m,
        Err(e) => panic!("the view accepts what the decode refuses ({e}): {data:02x?}"),
    };
    assert_eq!(v.proto, msg.hdr.proto, "proto");
    assert_eq!(v.typ, msg.hdr.typ, "typ");
    assert_eq!(v.sid, msg.hdr.sid, "sid");
    assert_eq!(v.body, msg.body.as_deref(), "body");
    let absent = "\u{0}absent";
    for key in msg.hdr.props.keys().map(String::as_str).chain([absent]) {
        assert_eq!(v.prop_str(key), msg.prop_str(key), "property {key:?}");
    }
}

/// Control bodies (open, accept, error) and the generic struct-body reader.
pub fn control(data: &[u8]) {
    if let Ok(open) = Open::decode(data) {
        assert_eq!(Open::decode(&open.encode()).ok(), Some(open));
    }
    if let Ok(accept) = Accept::decode(data) {
        assert_eq!(Accept::decode(&accept.encode()).ok(), Some(accept));
    }
    if let Ok(err) = ControlError::decode(data) {
        assert_eq!(ControlError::decode(&err.encode()).ok(), Some(err));
    }
    let _ = control::decode_map(data);
    if let Ok(msg) = codec::decode(data) {
        let _ = action::control_action(&msg, &[1, 2, 3, 4]);
    }
}

/// File-transfer request bodies and the props of acks and chunks.
pub fn filetransfer(data: &[u8]) {
    if let Ok(req) = Request::decode(Some(data)) {
        let _ = req.path();
    }
    if let Ok(msg) = codec::decode(data) {
        let _ = wire::offset_of(&msg);
        let _ = Request::decode(msg.body.as_deref());
    }
}

/// Port-forward `new` bodies, with and without a connection id.
pub fn portforward(data: &[u8]) {
    let _ = parse_new(data, true);
    let _ = parse_new(data, false);
}

/// Shell message props: the terminal size and the user id of `new`/`resize`.
pub fn shell(data: &[u8]) {
    if let Ok(msg) = codec::decode(data) {
        let _ = crate::sessions::shell::size_props(&msg);
        let _ = msg.prop_str("user_id");
    }
}

/// The configuration file parser, bytes as the file's content, and the
/// `PortForward.AllowedTargets` entries it yields: an accepted list prints
/// a canonical form that parses back to the same list.
pub fn config(data: &[u8]) {
    let Ok(cfg) = crate::config::parse(Path::new("fuzz.conf"), data) else {
        return;
    };
    let _ = crate::config::check_allowed_targets(&cfg);
    allow_list(&cfg.port_forward.allowed_targets);
}

fn allow_list(entries: &[String]) {
    use crate::config::allow::AllowList;
    use crate::wire::types::portforward::Net;
    let Ok(list) = AllowList::parse(entries) else {
        return;
    };
    let shown = list.to_string();
    let again: Vec<&str> = if shown.is_empty() {
        Vec::new()
    } else {
        shown.split(',').collect()
    };
    match AllowList::parse(&again) {
        Ok(l) => assert_eq!(l, list, "canonical form {shown:?} changed the list"),
        Err(e) => panic!("canonical form {shown:?} does not parse: {e}"),
    }
    // the matcher itself must not panic on what the entries produce
    for e in entries {
        let host = e.rsplit_once(':').map_or(e.as_str(), |(h, _)| h);
        let _ = list.verdict(Net::Tcp, host, 22);
        let _ = list.verdict(Net::Udp, host, 53);
    }
}

/// A chroot with symlinks that point out of it, built once per process
/// under the temp dir; returns the jail's canonical path.
fn jail() -> &'static Path {
    static JAIL: OnceLock<PathBuf> = OnceLock::new();
    JAIL.get_or_init(|| {
        let top = std::env::temp_dir().join(format!("mc-fuzz-chroot-{}", std::process::id()));
        let jail = top.join("jail");
        let outside = top.join("outside");
        let made = (|| -> std::io::Result<()> {
            std::fs::create_dir_all(jail.join("a/b"))?;
            std::fs::create_dir_all(&outside)?;
            std::fs::write(outside.join("secret"), b"x")?;
            std::fs::write(jail.join("a/file"), b"y")?;
            let links: [(&str, &Path); 7] = [
                ("up", Path::new("../outside")),
                ("abs", &outside),
                ("etc", Path::new("/etc")),
                ("self", Path::new(".")),
                ("a/rel", Path::new("../../outside/secret")),
                ("a/b/dotdot", Path::new("../..")),
                ("a/b/loop", Path::new("loop")),
            ];
            for (name, target) in links {
                let at = jail.join(name);
                if std::fs::symlink_metadata(&at).is_err() {
                    std::os::unix::fs::symlink(target, at)?;
                }
            }
            Ok(())
        })();
        if let Err(e) = made {
            panic!("building the fuzz chroot under {}: {e}", top.display());
        }
        std::fs::canonicalize(&jail).unwrap_or(jail)
    })
}

/// Asserts `fd` is the jail or beneath it.
fn assert_inside(fd: &impl AsRawFd, jail: &Path, path: &[u8]) {
    let Ok(real) = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())) else {
        return;
    };
    assert!(
        real.starts_with(jail),
        "{:?} escaped the chroot to {}",
        String::from_utf8_lossy(path),
        real.display()
    );
}

/// Path containment: whatever the path, a resolver with a chroot opens
/// nothing outside it, with openat2 and with the component walk, following
/// symlinks or not. Relative inputs are put under the jail so most reach
/// the resolution rather than the lexical check.
pub fn chroot(data: &[u8]) {
    let jail = jail();
    let mut path = data.to_vec();
    if path.first() != Some(&b'/') {
        let mut p = jail.as_os_str().as_encoded_bytes().to_vec();
        p.push(b'/');
        p.extend_from_slice(data);
        path = p;
    }
    for walk in [false, true] {
        for follow in [false, true] {
            let Ok(r) = Resolver::new(Some(jail), follow) else {
                return;
            };
            let r = r.force_walk(walk);
            if let Ok(fd) = r.open(&path, libc::O_RDONLY | libc::O_NONBLOCK) {
                assert_inside(&fd, jail, &path);
            }
            if let Ok((dir, _leaf)) = r.open_parent(&path) {
                assert_inside(&dir, jail, &path);
            }
        }
    }
}

/// Reads its input in pieces of `step` bytes (a non-blocking socket's
/// `WouldBlock` after each), as the network hands a stream out.
struct Steps<'a> {
    data: &'a [u8],
    step: usize,
    blocked: bool,
}

impl std::io::Read for Steps<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.blocked = !self.blocked;
        if self.blocked {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        let n = self.step.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// A stream read through a reframer.
struct Through<R> {
    rf: Reframer,
    inner: R,
}

impl<R: std::io::Read> std::io::Read for Through<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.rf.read(&mut self.inner, buf)
    }
}

/// Both ends of a websocket stream for tungstenite; what it writes (pongs,
/// close replies) is dropped.
struct ReadOnly<R>(R);

impl<R: std::io::Read> std::io::Read for ReadOnly<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl<R> std::io::Write for ReadOnly<R> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What tungstenite, as the daemon configures it, reads from a server's
/// frame stream: each message or control frame, then the error that ended
/// it. UTF-8 and size errors name the bytes or sizes of the fragment they
/// were found in, so only their kind is kept (the close code is the same).
pub(crate) fn judge(r: impl std::io::Read) -> Vec<String> {
    use tungstenite::protocol::{Role, WebSocket};
    let config = crate::conn::dial::ws_config();
    let mut ws = WebSocket::from_raw_socket(ReadOnly(r), Role::Client, Some(config));
    let mut seen = Vec::new();
    loop {
        match ws.read() {
            Ok(m) => seen.push(format!("{m:?}").chars().take(200).collect()),
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(tungstenite::Error::Utf8(_)) => {
                seen.push("error: UTF-8".to_string());
                return seen;
            }
            Err(tungstenite::Error::Capacity(_)) => {
                seen.push("error: capacity".to_string());
                return seen;
            }
            Err(e) => {
                seen.push(format!("error: {e}"));
                return seen;
            }
        }
    }
}

/// The reframer: tungstenite reads the same from a frame stream split into
/// fragments of 1 to 16 bytes (first input byte, low half), read in steps
/// of 1 to 16 bytes (high half), as from the stream itself.
pub fn reframe(data: &[u8]) {
    let Some((&cfg, frames)) = data.split_first() else {
        return;
    };
    let piece = 1 + usize::from(cfg & 0x0f);
    let step = 1 + usize::from(cfg >> 4);
    let want = judge(Steps {
        data: frames,
        step: usize::MAX,
        blocked: true,
    });
    let inner = Steps {
        data: frames,
        step,
        blocked: true,
    };
    let got = judge(Through {
        rf: Reframer::frames_only(piece),
        inner,
    });
    // A fragment can show an error before the whole frame is in: bad UTF-8
    // or an oversized message (failing fast, as RFC 6455 §8.1 prefers), or
    // any protocol error in a frame the original stream cuts off.
    let early = |e: &String| e == "error: UTF-8" || e == "error: capacity";
    let cut = "error: WebSocket protocol error: Connection reset without closing handshake";
    // After a close the original stream's cut-off frame ends as a normal
    // close, while its first fragment is a frame sent after the close.
    let cut_after_close = |g: &String, w: &String| {
        w == "error: Connection closed normally"
            && g == "error: WebSocket protocol error: Remote sent after having closed"
    };
    match (got.split_last(), want.split_last()) {
        (Some((g, g_rest)), Some((w, w_rest)))
            if g.starts_with("error: ")
                && w.starts_with("error: ")
                && (early(g) || w == cut || cut_after_close(g, w)) =>
        {
            assert_eq!(g_rest, w_rest, "fragments of {piece}, reads of {step}");
        }
        _ => assert_eq!(got, want, "fragments of {piece}, reads of {step}"),
    }
}
