//! File-transfer message shapes (protocol.md §3.2): request bodies, the
//! `file_info` reply, error replies that echo the request header, Go's
//! FileMode bit layout and msgpack timestamps.

use crate::wire::codec::{Kind, PROTO_FILETRANSFER, ProtoHdr, ProtoMsg, Reader, Value};
use crate::wire::control::encode_map;

use super::error::FtError;
use crate::wire::types::filetransfer as t;

/// Bytes per `file_chunk` (upstream `FileTransferBufSize`).
pub const CHUNK: usize = 4096;
/// Download window in chunks beyond the last ack (`ACKSlidingWindowRecv`).
pub const WINDOW_CHUNKS: u64 = 20;
/// Upload chunks taken per ack at most (`ACKSlidingWindowSend`).
pub const ACK_EVERY: usize = 10;

/// A decoded `stat` / `get_file` / `put_file` body.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Request {
    /// `path`; `None` when absent or nil.
    pub path: Option<Vec<u8>>,
    /// `src_path` (uploads into a directory).
    pub src_path: Option<Vec<u8>>,
    /// Announced `size`.
    pub size: Option<i64>,
    /// Requested owner.
    pub uid: Option<u32>,
    /// Requested group.
    pub gid: Option<u32>,
    /// Requested mode (permission bits, maybe setuid in either encoding).
    pub mode: Option<u32>,
}

impl Request {
    /// Decodes a body; the error is the full reply text. `path` and
    /// `src_path` keep their bytes exactly as sent (str or bin): Linux paths
    /// are bytes and so are Go strings, so a str that is not UTF-8 still
    /// names one file, never a U+FFFD look-alike.
    pub fn decode(body: Option<&[u8]>) -> Result<Request, FtError> {
        let malformed = FtError::Malformed;
        let mut rd = Reader::new(body.unwrap_or_default());
        let n = rd
            .go_map_len()
            .map_err(|e| malformed(e.to_string()))?
            .unwrap_or(0);
        let mut r = Request::default();
        for _ in 0..n {
            let key = rd.key().map_err(|e| malformed(e.to_string()))?;
            let raw_path = matches!(key, b"path" | b"src_path")
                && matches!(rd.peek_kind(), Ok(Kind::Str | Kind::Bin | Kind::Nil));
            if raw_path {
                let v = rd
                    .go_bytes()
                    .map_err(|e| malformed(e.to_string()))?
                    .map(<[u8]>::to_vec);
                if key == b"path" {
                    r.path = v;
                } else {
                    r.src_path = v;
                }
                continue;
            }
            // Unknown keys and containers (which no field takes) are skipped
            // without building them: a 16 MiB body of nested nils would
            // otherwise become half a GiB of values.
            let string_field = matches!(key, b"path" | b"src_path");
            let known = string_field || matches!(key, b"size" | b"uid" | b"gid" | b"mode");
            if !known || matches!(rd.peek_kind(), Ok(Kind::Array | Kind::Map)) {
                rd.skip().map_err(|e| malformed(e.to_string()))?;
                if known {
                    let kind = if string_field { "string" } else { "integer" };
                    let field = String::from_utf8_lossy(key);
                    return Err(FtError::Malformed(format!(
                        "msgpack: invalid type for {kind} field {field}"
                    )));
                }
                continue;
            }
            let v = rd.any().map_err(|e| malformed(e.to_string()))?;
            match key {
                b"path" => r.path = bytes(&v, "path").map_err(malformed)?,
                b"src_path" => r.src_path = bytes(&v, "src_path").map_err(malformed)?,
                b"size" => r.size = int(&v, "size").map_err(malformed)?.map(|n| n as i64),
                // Go decodes into uint32 by truncation (−1 → 4294967295).
                b"uid" => r.uid = int(&v, "uid").map_err(malformed)?.map(|n| n as u32),
                b"gid" => r.gid = int(&v, "gid").map_err(malformed)?.map(|n| n as u32),
                b"mode" => r.mode = int(&v, "mode").map_err(malformed)?.map(|n| n as u32),
                _ => {}
            }
        }
        if r.src_path.as_deref().is_some_and(|p| p.contains(&0)) {
            return Err(FtError::PathNul("src_path"));
        }
        Ok(r)
    }

    /// The path, unless absent, empty, relative (the daemon never resolves
    /// a request against its own working directory) or holding a NUL byte
    /// (no file can have that name; the kernel would see a shorter one).
    pub fn path(&self) -> Result<&[u8], FtError> {
        match self.path.as_deref() {
            Some(p) if p.contains(&0) => Err(FtError::PathNul("path")),
            Some(p) if p.starts_with(b"/") => Ok(p),
            Some(p) if !p.is_empty() => Err(FtError::PathRelative),
            _ => Err(FtError::PathBlank),
        }
    }
}

/// A path for error texts and logs: UTF-8 as it is, every byte that is not
/// part of valid UTF-8 as `\xNN` and control characters escaped, so the text
/// shows which name was meant and cannot forge log lines.
pub fn shown(path: &[u8]) -> String {
    let mut out = String::with_capacity(path.len());
    for chunk in path.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

fn bytes(v: &Value, field: &str) -> Result<Option<Vec<u8>>, String> {
    match v {
        Value::Nil => Ok(None),
        Value::Str(s) => Ok(Some(s.as_bytes().to_vec())),
        Value::Bin(b) => Ok(Some(b.clone())),
        _ => Err(format!("msgpack: invalid type for string field {field}")),
    }
}

/// Any integer width, as its 64-bit two's complement (nil = absent).
fn int(v: &Value, field: &str) -> Result<Option<u64>, String> {
    match v {
        Value::Nil => Ok(None),
        Value::U64(n) => Ok(Some(*n)),
        _ => v
            .as_i64()
            .map(|n| Some(n as u64))
            .ok_or_else(|| format!("msgpack: invalid type for integer field {field}")),
    }
}

/// HTTP-style status of a download refused by the limits (`code` field).
pub const CODE_FORBIDDEN: u16 = 403;

/// A file-transfer `error` against `req`: its header (sid, props) copied,
/// `typ` = error, body `{err, msgtype}`.
pub fn error_reply(req: &ProtoHdr, msgtype: &str, err: &str) -> ProtoMsg {
    error_reply_with_code(req, msgtype, err, None)
}

/// [`error_reply`] with the additive `code` field (protocol.md §3.2):
/// current deviceconnect answers the HTTP request with that status and the
/// device's text; older servers ignore the field.
pub fn error_reply_with_code(
    req: &ProtoHdr,
    msgtype: &str,
    err: &str,
    code: Option<u16>,
) -> ProtoMsg {
    let mut hdr = req.clone();
    hdr.proto = PROTO_FILETRANSFER;
    hdr.typ = t::ERROR.to_string();
    let mut entries = vec![
        ("err", Value::Str(err.to_string())),
        ("msgtype", Value::Str(msgtype.to_string())),
    ];
    if let Some(c) = code {
        entries.push(("code", Value::Int(i64::from(c))));
    }
    ProtoMsg {
        hdr,
        body: Some(encode_map(&entries)),
    }
}

/// A header-only message with `offset` as int64 (download chunks carry a body).
pub fn with_offset(typ: &str, sid: &str, offset: u64) -> ProtoMsg {
    ProtoMsg::new(PROTO_FILETRANSFER, typ, sid).with_prop("offset", Value::I64(offset as i64))
}

/// The `offset` of an inbound ack/chunk: only int64 counts (upstream type
/// assertion; deviceconnect always sends `d3`). `None` = absent.
pub fn offset_of(msg: &ProtoMsg) -> Option<Result<i64, ()>> {
    match msg.prop("offset")? {
        Value::I64(n) => Some(Ok(*n)),
        _ => Some(Err(())),
    }
}

/// Go `os.FileMode` bits for a Unix `st_mode`.
pub fn go_mode(st_mode: u32) -> u32 {
    let mut m = st_mode & 0o777;
    m |= match st_mode & libc::S_IFMT {
        libc::S_IFDIR => 1 << 31,
        libc::S_IFLNK => 1 << 27,
        libc::S_IFBLK => 1 << 26,
        libc::S_IFCHR => (1 << 26) | (1 << 21),
        libc::S_IFIFO => 1 << 25,
        libc::S_IFSOCK => 1 << 24,
        _ => 0,
    };
    if st_mode & libc::S_ISUID != 0 {
        m |= 1 << 23;
    }
    if st_mode & libc::S_ISGID != 0 {
        m |= 1 << 22;
    }
    if st_mode & libc::S_ISVTX != 0 {
        m |= 1 << 20;
    }
    m
}

/// Go's setuid bit in a FileMode.
pub const GO_SETUID: u32 = 1 << 23;

/// msgpack timestamp (ext −1) in the shortest form Go writes.
pub fn timestamp(secs: i64, nsec: u32) -> Value {
    if secs >= 0 && (secs >> 34) == 0 {
        if nsec == 0 && secs <= i64::from(u32::MAX) {
            return Value::Ext(-1, (secs as u32).to_be_bytes().to_vec());
        }
        let v = (u64::from(nsec) << 34) | secs as u64;
        return Value::Ext(-1, v.to_be_bytes().to_vec());
    }
    let mut d = nsec.to_be_bytes().to_vec();
    d.extend_from_slice(&secs.to_be_bytes());
    Value::Ext(-1, d)
}

/// The `file_info` reply for `stat` (no props; key order as upstream).
// off_t/time_t are i32 on armel (the libc crate has no _FILE_OFFSET_BITS=64)
#[allow(clippy::unnecessary_cast)]
pub fn file_info(sid: &str, path: &[u8], st: &libc::stat) -> ProtoMsg {
    // the path as a str holding exactly the requested bytes, as Go writes
    // a string (Value::Str only holds UTF-8)
    let mut body = Vec::with_capacity(64 + path.len());
    let _ = rmp::encode::write_map_len(&mut body, 6);
    let _ = rmp::encode::write_str(&mut body, "path");
    let _ = rmp::encode::write_str_len(&mut body, u32::try_from(path.len()).unwrap_or(u32::MAX));
    body.extend_from_slice(path);
    let rest = encode_map(&[
        ("size", Value::I64(st.st_size as i64)),
        ("uid", Value::U32(st.st_uid)),
        ("gid", Value::U32(st.st_gid)),
        ("mode", Value::U32(go_mode(st.st_mode))),
        (
            "modtime",
            timestamp(
                st.st_mtime as i64,
                st.st_mtime_nsec.clamp(0, 999_999_999) as u32,
            ),
        ),
    ]);
    // encode_map's own 5-entry header is replaced by the 6-entry one above
    body.extend_from_slice(&rest[1..]);
    ProtoMsg::new(PROTO_FILETRANSFER, t::FILE_INFO, sid).with_body(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::codec::encode_value;
    use crate::wire::control::decode_map;

    #[test]
    fn go_modes_match_observed_values() {
        assert_eq!(go_mode(libc::S_IFREG | 0o644), 420);
        assert_eq!(go_mode(libc::S_IFDIR | 0o755), 0x800001ED);
        assert_eq!(go_mode(libc::S_IFCHR | 0o666), 0x042001B6);
        assert_eq!(go_mode(libc::S_IFDIR | libc::S_ISVTX | 0o777), 0x801001FF);
        assert_eq!(go_mode(libc::S_IFREG | libc::S_ISUID | 0o755), 0x008001ED);
    }

    #[test]
    fn timestamps_use_go_forms() {
        let enc = |v: Value| {
            let mut out = Vec::new();
            encode_value(&v, &mut out);
            out
        };
        assert_eq!(enc(timestamp(1, 0)), [0xd6, 0xff, 0, 0, 0, 1]);
        assert_eq!(enc(timestamp(1, 1))[..2], [0xd7, 0xff]);
        assert_eq!(enc(timestamp(-1, 0))[..3], [0xc7, 12, 0xff]);
    }

    #[test]
    fn requests_decode_any_int_and_nil_as_absent() {
        let body = encode_map(&[
            ("path", Value::Str("/x".into())),
            ("uid", Value::Nil),
            ("gid", Value::Int(-1)),
            ("mode", Value::U32(0o644)),
        ]);
        let r = Request::decode(Some(&body)).expect("decodes");
        assert_eq!(r.path().ok(), Some(&b"/x"[..]));
        assert_eq!((r.uid, r.gid, r.mode), (None, Some(u32::MAX), Some(0o644)));
        let e = Request::decode(Some(b"\xa6foobar"))
            .expect_err("not a map")
            .to_string();
        assert!(e.starts_with("malformed request parameters: "), "{e}");
        let e = Request::decode(None).expect_err("empty");
        assert_eq!(e.to_string(), "malformed request parameters: EOF");
        let blank = Request::decode(Some(&encode_map(&[("path", Value::Nil)]))).expect("nil path");
        assert_eq!(
            blank.path().expect_err("blank").to_string(),
            "invalid request parameters: path: cannot be blank."
        );
        let rel = Request::decode(Some(&encode_map(&[("path", Value::Str("etc/x".into()))])));
        assert_eq!(
            rel.expect("relative path")
                .path()
                .expect_err("relative")
                .to_string(),
            "invalid request parameters: path: must be absolute"
        );
    }

    #[test]
    fn denials_carry_a_code_and_other_errors_none() {
        let req = ProtoMsg::new(PROTO_FILETRANSFER, "get_file", "s").hdr;
        let body = |m: ProtoMsg| decode_map(m.body.as_deref().unwrap_or_default()).expect("map");
        let denied = body(error_reply_with_code(
            &req,
            "get_file",
            "access denied: x",
            Some(403),
        ));
        assert!(
            denied
                .iter()
                .any(|(k, v)| k == "code" && v.as_i64() == Some(403))
        );
        let plain = body(error_reply(&req, "put_file", "x"));
        assert!(plain.iter().all(|(k, _)| k != "code"), "{plain:?}");
    }

    #[test]
    fn paths_keep_their_bytes_whether_str_or_bin() {
        // fixstr holding "/\xfa\xfb" (not UTF-8), then src_path as bin
        let mut body = vec![0x82, 0xa4];
        body.extend_from_slice(b"path");
        body.extend_from_slice(&[0xa3, b'/', 0xfa, 0xfb]);
        body.push(0xa8);
        body.extend_from_slice(b"src_path");
        body.extend_from_slice(&[0xc4, 2, 0xfc, b'x']);
        let r = Request::decode(Some(&body)).expect("decodes");
        assert_eq!(r.path().ok(), Some(&b"/\xfa\xfb"[..]));
        assert_eq!(r.src_path.as_deref(), Some(&b"\xfcx"[..]));
        let e = Request::decode(Some(&encode_map(&[("path", Value::U8(1))])))
            .expect_err("not a string");
        assert_eq!(
            e.to_string(),
            "malformed request parameters: msgpack: invalid type for string field path"
        );
    }

    #[test]
    fn unknown_keys_and_containers_are_skipped_without_building_them() {
        // "x": [nil x 1M] (a built tree would be ~32 MiB of values)
        let mut nils = vec![0xa1, b'x', 0xdd];
        nils.extend_from_slice(&(1u32 << 20).to_be_bytes());
        nils.extend(std::iter::repeat_n(0xc0, 1 << 20));
        let only_unknown = [&[0x81][..], &nils].concat();
        assert_eq!(
            Request::decode(Some(&only_unknown)).ok(),
            Some(Request::default())
        );
        // then "size": [1], which no field takes
        let size_array = [
            &[0x82][..],
            &nils,
            &[0xa4, b's', b'i', b'z', b'e', 0x91, 0x01],
        ]
        .concat();
        assert_eq!(
            Request::decode(Some(&size_array))
                .expect_err("array")
                .to_string(),
            "malformed request parameters: msgpack: invalid type for integer field size"
        );
    }

    #[test]
    fn a_path_with_a_nul_byte_is_refused() {
        let r = Request::decode(Some(&encode_map(&[("path", Value::Str("/a\0b".into()))])))
            .expect("decodes");
        assert_eq!(
            r.path().expect_err("nul").to_string(),
            "invalid request parameters: path: must not contain a NUL byte."
        );
        let e = Request::decode(Some(&encode_map(&[
            ("path", Value::Str("/a".into())),
            ("src_path", Value::Bin(b"x\0".to_vec())),
        ])))
        .expect_err("src_path")
        .to_string();
        assert!(e.contains("src_path: must not contain a NUL byte"), "{e}");
    }

    #[test]
    fn shown_paths_escape_what_is_not_printable_utf8() {
        assert_eq!(shown("/tmp/ä b".as_bytes()), "/tmp/ä b");
        assert_eq!(shown(b"/t/\xfa\xfb-up"), "/t/\\xfa\\xfb-up");
        assert_eq!(shown(b"a\nb\x1b"), "a\\nb\\u{1b}");
    }

    #[test]
    fn file_info_echoes_the_path_bytes_as_a_str() {
        let st = crate::sys::fs::zeroed_stat();
        let m = file_info("s", b"/\xfa", &st);
        let body = m.body.expect("body");
        assert_eq!(
            &body[..8],
            &[0x86, 0xa4, b'p', b'a', b't', b'h', 0xa2, b'/']
        );
        assert_eq!(body[8], 0xfa);
        assert_eq!(&body[9..14], &[0xa4, b's', b'i', b'z', b'e']);
        let utf8 = file_info("s", b"/ok", &st).body.expect("body");
        let plain = encode_map(&[("path", Value::Str("/ok".into()))]);
        assert_eq!(&utf8[1..plain.len()], &plain[1..]);
    }
}
