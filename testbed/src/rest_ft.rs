//! deviceconnect's REST file transfer (protocol.md §3.2, transfer.md §2.9):
//! each HTTP download/upload becomes one device session with a fresh UUID
//! `sid` — control `open`, then `stat` (+ `get_file` unless HEAD) or
//! `put_file` and chunks, then control `close` — and device replies map to
//! HTTP statuses and `{"error": …}` texts the way deviceconnect does:
//!
//! | device side | download | upload |
//! |---|---|---|
//! | no reply within the deadline | 408 `file transfer timed out` | same |
//! | `open` answered by neither accept nor error | 502 → `internal error` | 502 `file transfer not implemented on device` |
//! | `accept` without protocol 2 | 502 → `internal error` | 502 `file transfer disabled on device` |
//! | control `error` to `open` | 500 → `internal error` | 500 `handshake error from client: …` |
//! | `error` to `stat` | 400 `failed to retrieve file info: error received from device: …` | — |
//! | `file_info` without mode or not regular | 400 `path is not a regular file` | — |
//! | `error` to `get_file` before any data | 500 → `internal error` | — |
//! | `error` once data flowed | body truncated | — |
//! | `error` to `put_file` or during upload | — | 400 device text |
//! | any `error` with a positive `code` (before data) | that status + device text | same |
//! | success | 200 + `X-MEN-File-*` | 201 |
//!
//! (The download endpoint masks 5xx texts as `internal error`.) Response
//! headers of a download go out with the first chunk (or EOF), so a refusal
//! of `get_file` still gets a status. Like deviceconnect, the upload uses
//! only the parts up to the `file` part: mender-cli sends `mode` after the
//! file, so it never reaches the device.

use crate::http::{self, Part};
use crate::management::{Shared, Sink, USER_ID, uuid};
use crate::server::{HttpRequest, HttpStream};
use crossbeam_channel::{Receiver, RecvTimeoutError};
use mender_connect::wire::codec::{PROTO_CONTROL, PROTO_FILETRANSFER, ProtoMsg, Value};
use mender_connect::wire::control::{Accept, ControlError, Open, decode_map, encode_map};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// deviceconnect's deadline for every expected device message.
pub const TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes per upload chunk (`fileTransferBufferSize`).
const CHUNK: usize = 4096;
/// Download: ack after this many chunks (`ackSlidingWindowSend`).
const ACK_EVERY: usize = 10;
/// Upload: chunks allowed beyond the last ack (`ackSlidingWindowRecv`).
const WINDOW: i64 = 20;
/// Go's `os.ModeType`: dir, symlink, named pipe, socket, device, char
/// device, irregular.
const GO_MODE_TYPE: u32 =
    (1 << 31) | (1 << 27) | (1 << 25) | (1 << 24) | (1 << 26) | (1 << 21) | (1 << 19);

/// Why a transfer failed: HTTP status and `error` text.
type Failure = (u16, String);

fn timed_out() -> Failure {
    (408, "file transfer timed out".into())
}

/// One REST transfer's device session.
struct Session<'a> {
    shared: &'a Shared,
    sid: String,
    rx: Receiver<ProtoMsg>,
    timeout: Duration,
}

enum Next {
    Msg(ProtoMsg),
    TimedOut,
    Gone,
}

impl<'a> Session<'a> {
    fn new(shared: &'a Shared) -> Session<'a> {
        let sid = uuid();
        let (tx, rx) = crossbeam_channel::unbounded();
        shared.register(&sid, Sink::Rest(tx));
        Session {
            shared,
            sid,
            rx,
            timeout: TIMEOUT,
        }
    }

    fn next(&self) -> Next {
        self.next_before(Instant::now() + self.timeout)
    }

    /// The next message if it comes before `deadline`.
    fn next_before(&self, deadline: Instant) -> Next {
        match self.rx.recv_deadline(deadline) {
            Ok(m) => Next::Msg(m),
            Err(RecvTimeoutError::Timeout) => Next::TimedOut,
            Err(RecvTimeoutError::Disconnected) => Next::Gone,
        }
    }

    /// A proto-2 message with `user_id` (and `offset` for chunks and acks).
    fn send_ft(&self, typ: &str, body: Option<Vec<u8>>, offset: Option<i64>) -> bool {
        let mut m = ProtoMsg::new(PROTO_FILETRANSFER, typ, self.sid.as_str())
            .with_prop("user_id", Value::Str(USER_ID.into()));
        if let Some(o) = offset {
            m = m.with_prop("offset", Value::I64(o));
        }
        m.body = body;
        self.shared.send_to_device(&m)
    }

    /// Control messages deviceconnect originates carry no props.
    fn send_control(&self, typ: &str, body: Option<Vec<u8>>) -> bool {
        let mut m = ProtoMsg::new(PROTO_CONTROL, typ, self.sid.as_str());
        m.body = body;
        self.shared.send_to_device(&m)
    }

    /// Answers a control ping from the device (with `user_id`, like deviceconnect).
    fn pong(&self) {
        let m = ProtoMsg::new(PROTO_CONTROL, "pong", self.sid.as_str())
            .with_prop("user_id", Value::Str(USER_ID.into()));
        self.shared.send_to_device(&m);
    }

    /// The control handshake; the very next message must answer it.
    fn handshake(&self) -> Result<(), Failure> {
        let open = Open { versions: vec![1] }.encode();
        if !self.send_control("open", Some(open)) {
            return Err((409, "device not connected".into()));
        }
        let msg = match self.next() {
            Next::Msg(m) => m,
            Next::TimedOut => return Err(timed_out()),
            Next::Gone => return Err((500, "device disconnected".into())),
        };
        if msg.hdr.typ == "error" {
            let e =
                ControlError::decode(msg.body.as_deref().unwrap_or_default()).unwrap_or_default();
            return Err((500, format!("handshake error from client: {}", e.err)));
        }
        if msg.hdr.typ != "accept" {
            return Err((502, "file transfer not implemented on device".into()));
        }
        let accept = Accept::decode(msg.body.as_deref().unwrap_or_default())
            .map_err(|_| (500, "failed to unmarshal the request".to_string()))?;
        if !accept.protocols.contains(&PROTO_FILETRANSFER) {
            self.send_control("close", None);
            return Err((502, "file transfer disabled on device".into()));
        }
        Ok(())
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        self.shared.unregister(&self.sid);
    }
}

/// A device `error` as current deviceconnect maps it: a positive `code`
/// becomes that HTTP status with the device's text; otherwise `fallback`
/// decides (400 for stat and upload errors, 500 after `get_file`).
fn device_failure(msg: &ProtoMsg, fallback: impl FnOnce(String) -> Failure) -> Failure {
    let (err, code) = ft_error(msg);
    match code {
        Some(c) if (100..=599).contains(&c) => (c as u16, err),
        _ => fallback(err),
    }
}

/// `{err, code}` of a file-transfer `error`.
fn ft_error(msg: &ProtoMsg) -> (String, Option<i64>) {
    let mut err = String::new();
    let mut code = None;
    for (k, v) in decode_map(msg.body.as_deref().unwrap_or_default()).unwrap_or_default() {
        match (k.as_str(), v) {
            ("err", Value::Str(s)) => err = s,
            ("code", v) => code = v.as_i64().filter(|c| *c > 0),
            _ => {}
        }
    }
    (err, code)
}

#[derive(Debug, Default)]
struct FileInfo {
    path: Option<String>,
    size: Option<i64>,
    uid: Option<u64>,
    gid: Option<u64>,
    mode: Option<u32>,
}

fn file_info(msg: &ProtoMsg) -> FileInfo {
    let mut fi = FileInfo::default();
    for (k, v) in decode_map(msg.body.as_deref().unwrap_or_default()).unwrap_or_default() {
        match k.as_str() {
            "path" => {
                fi.path = match v {
                    Value::Str(s) => Some(s),
                    Value::Bin(b) => Some(String::from_utf8_lossy(&b).into_owned()),
                    _ => None,
                }
            }
            "size" => fi.size = v.as_i64(),
            "uid" => fi.uid = v.as_u64().or_else(|| v.as_i64().map(|n| n as u64)),
            "gid" => fi.gid = v.as_u64().or_else(|| v.as_i64().map(|n| n as u64)),
            "mode" => {
                fi.mode = v
                    .as_u64()
                    .or_else(|| v.as_i64().map(|n| n as u64))
                    .map(|n| n as u32)
            }
            _ => {}
        }
    }
    fi
}

fn download_headers(fi: &FileInfo) -> Vec<(&'static str, String)> {
    let mut h = vec![("Content-Type", "application/octet-stream".to_string())];
    if let Some(p) = &fi.path {
        let base = p.rsplit('/').find(|s| !s.is_empty()).unwrap_or("/");
        h.push((
            "Content-Disposition",
            format!("attachment; filename=\"{base}\""),
        ));
        h.push(("X-MEN-File-Path", p.clone()));
    }
    if let Some(u) = fi.uid {
        h.push(("X-MEN-File-UID", u.to_string()));
    }
    if let Some(g) = fi.gid {
        h.push(("X-MEN-File-GID", g.to_string()));
    }
    if let Some(m) = fi.mode {
        h.push(("X-MEN-File-Mode", format!("{m:o}")));
    }
    if let Some(s) = fi.size {
        h.push(("X-MEN-File-Size", s.to_string()));
    }
    h
}

/// deviceconnect's path validation (absolute, not blank).
fn check_path(path: &str) -> Result<(), Failure> {
    if path.is_empty() {
        return Err((400, "bad request: path: cannot be blank.".into()));
    }
    if !path.starts_with('/') {
        return Err((400, "bad request: path: must be absolute.".into()));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Download

/// `GET|HEAD …/download?path=`.
pub(crate) fn download(shared: &Arc<Shared>, req: &HttpRequest, mut stream: HttpStream) {
    stream.set_timeout(None);
    let path = http::query_param(&req.query, "path").unwrap_or_default();
    if let Err((status, text)) = check_path(&path) {
        let _ = http::respond_error(&mut stream, status, &text);
        return;
    }
    if shared.device().is_none() {
        let _ = http::respond_error(&mut stream, 409, "device not connected");
        return;
    }
    let sess = Session::new(shared);
    let head_only = req.method == "HEAD";
    let result = run_download(&sess, &path, head_only, &mut stream);
    if let Err((status, text)) = result {
        // The download endpoint hides the text of server-side errors.
        let text = if status >= 500 {
            "internal error".to_string()
        } else {
            text
        };
        let _ = http::respond_error(&mut stream, status, &text);
    }
}

/// Ok once the response is complete (or cut after its headers went out).
fn run_download(
    sess: &Session,
    path: &str,
    head_only: bool,
    stream: &mut HttpStream,
) -> Result<(), Failure> {
    sess.handshake()?;
    let result = download_body(sess, path, head_only, stream);
    sess.send_control("close", None);
    result
}

fn download_body(
    sess: &Session,
    path: &str,
    head_only: bool,
    stream: &mut HttpStream,
) -> Result<(), Failure> {
    let path_body = encode_map(&[("path", Value::Str(path.into()))]);
    sess.send_ft("stat", Some(path_body.clone()), None);
    let info = loop {
        match sess.next() {
            Next::Msg(m) if m.hdr.proto == PROTO_CONTROL && m.hdr.typ == "ping" => sess.pong(),
            Next::Msg(m) if m.hdr.proto == PROTO_CONTROL && m.hdr.typ == "pong" => {}
            Next::Msg(m) if m.hdr.typ == "error" => {
                return Err(device_failure(&m, |err| {
                    (
                        400,
                        format!("failed to retrieve file info: error received from device: {err}"),
                    )
                }));
            }
            Next::Msg(m) if m.hdr.typ == "file_info" => break file_info(&m),
            Next::Msg(_) => return Err((500, "unexpected response from device".into())),
            Next::TimedOut => {
                return Err((
                    408,
                    "failed to retrieve file info: file transfer timed out".into(),
                ));
            }
            Next::Gone => return Err((500, "device disconnected".into())),
        }
    };
    match info.mode {
        Some(m) if m & GO_MODE_TYPE == 0 => {}
        _ => return Err((400, "path is not a regular file".into())),
    }
    let headers = download_headers(&info);
    if head_only {
        let _ = http::respond(stream, 200, &headers, b"");
        return Ok(());
    }
    sess.send_ft("get_file", Some(path_body), None);
    let mut sent_headers = false;
    let mut received: i64 = 0;
    let mut chunks = 0usize;
    let io_err = |_| (0u16, String::new());
    loop {
        let m = match sess.next() {
            Next::Msg(m) => m,
            Next::TimedOut if !sent_headers => return Err(timed_out()),
            Next::Gone if !sent_headers => return Err((500, "device disconnected".into())),
            // Headers are out: all deviceconnect can do is stop the body.
            Next::TimedOut | Next::Gone => return Ok(()),
        };
        match (m.hdr.proto, m.hdr.typ.as_str()) {
            (PROTO_CONTROL, "ping") => sess.pong(),
            (PROTO_CONTROL, "pong") => {}
            (_, "error") => {
                if sent_headers {
                    let _ = http::end_chunks(stream);
                    return Ok(());
                }
                return Err(device_failure(&m, |err| (500, err)));
            }
            (_, "file_chunk") => {
                if !sent_headers {
                    http::start_chunked(stream, 200, &headers).map_err(io_err)?;
                    sent_headers = true;
                }
                let Some(body) = m.body.as_ref() else {
                    // A chunk without body is EOF; deviceconnect acks it.
                    sess.send_ft("ack", None, Some(received));
                    let _ = http::end_chunks(stream);
                    return Ok(());
                };
                if m.prop("offset").and_then(Value::as_i64) != Some(received)
                    || !matches!(m.prop("offset"), Some(Value::I64(_)))
                {
                    // "wrong offset received": the body just stops.
                    let _ = http::end_chunks(stream);
                    return Ok(());
                }
                received += body.len() as i64;
                http::write_chunk(stream, body).map_err(io_err)?;
                chunks += 1;
                if chunks >= ACK_EVERY {
                    sess.send_ft("ack", None, Some(received));
                    chunks = 0;
                }
            }
            _ => {
                if sent_headers {
                    let _ = http::end_chunks(stream);
                    return Ok(());
                }
                return Err((500, format!("unexpected message type '{}'", m.hdr.typ)));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Upload

/// What deviceconnect takes from the multipart form.
#[derive(Debug, Default)]
struct UploadForm {
    path: Option<String>,
    uid: Option<u32>,
    gid: Option<u32>,
    mode: Option<u32>,
    src_path: Option<String>,
    file: Option<Vec<u8>>,
}

fn upload_form(parts: Vec<Part>) -> Result<UploadForm, String> {
    let mut f = UploadForm::default();
    for p in parts {
        let text = String::from_utf8_lossy(&p.data).into_owned();
        let int_err = |_| format!("strconv.Atoi: parsing {text:?}: invalid syntax");
        match p.name.as_str() {
            "path" => f.path = Some(text.clone()),
            "uid" => f.uid = Some(text.parse::<i64>().map_err(int_err)? as u32),
            "gid" => f.gid = Some(text.parse::<i64>().map_err(int_err)? as u32),
            "mode" => {
                f.mode =
                    Some(u32::from_str_radix(&text, 8).map_err(|_| {
                        format!("strconv.ParseUint: parsing {text:?}: invalid syntax")
                    })?)
            }
            "file" => {
                f.src_path = Some(p.filename.unwrap_or_default());
                f.file = Some(p.data);
                // deviceconnect streams the file part and reads no further.
                break;
            }
            _ => {}
        }
    }
    Ok(f)
}

/// `PUT …/upload` (multipart: `path`, [`uid`, `gid`, `mode`,] `file`).
pub(crate) fn upload(shared: &Arc<Shared>, req: &HttpRequest, mut stream: HttpStream) {
    stream.set_timeout(Some(TIMEOUT));
    // The whole body first: answering before reading it could reset the
    // connection under the client's feet.
    let body = match http::read_body(req, &mut stream) {
        Ok(b) => b,
        Err(e) => {
            let _ = http::respond_error(&mut stream, 400, &format!("malformed request body: {e}"));
            return;
        }
    };
    stream.set_timeout(None);
    if shared.device().is_none() {
        let _ = http::respond_error(&mut stream, 409, "device not connected");
        return;
    }
    let Some(boundary) = req.header("content-type").and_then(http::boundary) else {
        let _ = http::respond_error(
            &mut stream,
            400,
            "request Content-Type isn't multipart/form-data",
        );
        return;
    };
    let form = match http::parse_multipart(&body, &boundary).and_then(upload_form) {
        Ok(f) => f,
        Err(e) => {
            let _ = http::respond_error(&mut stream, 400, &e);
            return;
        }
    };
    let path = form.path.clone().unwrap_or_default();
    if let Err((status, text)) = check_path(&path) {
        let _ = http::respond_error(&mut stream, status, &text);
        return;
    }
    if form.file.is_none() {
        let _ = http::respond_error(&mut stream, 400, "bad request: file: cannot be blank.");
        return;
    }
    let sess = Session::new(shared);
    let result = match sess.handshake() {
        Ok(()) => {
            let r = run_upload(&sess, &form);
            sess.send_control("close", None);
            r
        }
        Err(e) => Err(e),
    };
    let _ = match result {
        Ok(()) => http::respond(&mut stream, 201, &[], b""),
        Err((status, text)) => http::respond_error(&mut stream, status, &text),
    };
}

fn upload_request(form: &UploadForm) -> Vec<u8> {
    let mut entries = Vec::new();
    if let Some(s) = &form.src_path {
        entries.push(("src_path", Value::Str(s.clone())));
    }
    if let Some(p) = &form.path {
        entries.push(("path", Value::Str(p.clone())));
    }
    if let Some(u) = form.uid {
        entries.push(("uid", Value::U32(u)));
    }
    if let Some(g) = form.gid {
        entries.push(("gid", Value::U32(g)));
    }
    if let Some(m) = form.mode {
        entries.push(("mode", Value::U32(m)));
    }
    encode_map(&entries)
}

/// Inbound during an upload: the new highest ack, or the failure.
fn upload_inbound(sess: &Session, m: ProtoMsg, acked: &mut i64) -> Result<(), Failure> {
    match (m.hdr.proto, m.hdr.typ.as_str()) {
        (PROTO_CONTROL, "ping") => sess.pong(),
        (_, "error") => return Err(device_failure(&m, |err| (400, err))),
        (_, "ack") => {
            if let Some(Value::I64(o)) = m.prop("offset")
                && *o > *acked
            {
                *acked = *o;
            }
        }
        _ => {}
    }
    Ok(())
}

fn run_upload(sess: &Session, form: &UploadForm) -> Result<(), Failure> {
    sess.send_ft("put_file", Some(upload_request(form)), None);
    match sess.next() {
        Next::Msg(m) if m.hdr.typ == "error" => {
            return Err(device_failure(&m, |err| (400, err)));
        }
        Next::Msg(m) if m.hdr.typ == "ack" => {}
        Next::Msg(m) => return Err((500, format!("unexpected message type '{}'", m.hdr.typ))),
        Next::TimedOut => return Err(timed_out()),
        Next::Gone => return Err((500, "device disconnected".into())),
    }
    let data = form.file.as_deref().unwrap_or_default();
    let mut acked: i64 = 0;
    let mut offset: i64 = 0;
    // The deadline runs from the device's last file-transfer message: its
    // control pings keep the session, not the transfer, alive.
    let mut deadline = Instant::now() + sess.timeout;
    let next = |deadline: &mut Instant| {
        let m = sess.next_before(*deadline);
        if matches!(&m, Next::Msg(m) if m.hdr.proto != PROTO_CONTROL) {
            *deadline = Instant::now() + sess.timeout;
        }
        m
    };
    for chunk in data.chunks(CHUNK) {
        sess.send_ft("file_chunk", Some(chunk.to_vec()), Some(offset));
        offset += chunk.len() as i64;
        if offset > acked + CHUNK as i64 * WINDOW {
            // Window full: wait for an ack (or an error).
            while offset > acked + CHUNK as i64 * WINDOW {
                match next(&mut deadline) {
                    Next::Msg(m) => upload_inbound(sess, m, &mut acked)?,
                    Next::TimedOut => return Err(timed_out()),
                    Next::Gone => return Err((500, "device disconnected".into())),
                }
            }
        } else {
            while let Ok(m) = sess.rx.try_recv() {
                upload_inbound(sess, m, &mut acked)?;
            }
        }
    }
    sess.send_ft("file_chunk", None, Some(offset));
    while offset > acked {
        match next(&mut deadline) {
            Next::Msg(m) => upload_inbound(sess, m, &mut acked)?,
            Next::TimedOut => return Err(timed_out()),
            Next::Gone => return Err((500, "device disconnected".into())),
        }
    }
    Ok(())
}
