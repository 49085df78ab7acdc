//! Bodies of the control protocol (protocol.md §2.6): Open, Accept, Error,
//! plus small helpers for other struct-like bodies.
//!
//! Decoding follows Go's struct decoding in vmihailenco/msgpack v5: keys in
//! any order, unknown keys skipped, nil reads as the zero value, and errors
//! whose text matches Go's closely enough to relay to the server.

use super::codec::{DecodeError, Kind, Reader, Value, encode_value};

/// Control message type: handshake request (server → device).
pub const TYPE_OPEN: &str = "open";
/// Control message type: handshake reply.
pub const TYPE_ACCEPT: &str = "accept";
/// Control message type: end the session.
pub const TYPE_CLOSE: &str = "close";
/// Control message type: error report, optionally ending the session.
pub const TYPE_ERROR: &str = "error";
/// Control message type: idle keep-alive request.
pub const TYPE_PING: &str = "ping";
/// Control message type: idle keep-alive reply.
pub const TYPE_PONG: &str = "pong";

/// The only protocol version there is (`ws.ProtocolVersion`).
pub const PROTOCOL_VERSION: i64 = 1;

/// Handshake request: the versions the server speaks.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Open {
    /// Offered protocol versions (Go `[]int`).
    pub versions: Vec<i64>,
}

/// Handshake reply: the chosen version and the enabled protocols.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Accept {
    /// Chosen version (Go `int`, written shortest).
    pub version: i64,
    /// Enabled protocol numbers (Go `[]ProtoType`, each written as `cd`).
    pub protocols: Vec<u16>,
}

/// Control `error` body.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ControlError {
    /// Human-readable error text.
    pub err: String,
    /// Whether the session ends with this error.
    pub close: bool,
    /// HTTP-ish status from newer servers; 0 = absent. The device never sets it.
    pub code: i64,
    /// Protocol of the offending message; 0 = absent.
    pub msgproto: u16,
    /// Type of the offending message; "" = absent.
    pub msgtype: String,
    /// `props.msgid` of the offending message; "" = absent.
    pub msgid: String,
}

/// Writing into a `Vec` cannot fail; see `codec::vec_ok`.
fn vec_ok<T, E>(_: Result<T, E>) {}

/// Writes `entries` as a map in the given order (Go struct field order).
pub fn encode_map(entries: &[(&str, Value)]) -> Vec<u8> {
    let mut out = Vec::new();
    vec_ok(rmp::encode::write_map_len(
        &mut out,
        u32::try_from(entries.len()).unwrap_or(u32::MAX),
    ));
    for (k, v) in entries {
        vec_ok(rmp::encode::write_str(&mut out, k));
        encode_value(v, &mut out);
    }
    out
}

/// Reads a struct-like body: a map with string keys (nil = empty), entries in
/// wire order, duplicates kept. Trailing bytes are ignored.
pub fn decode_map(body: &[u8]) -> Result<Vec<(String, Value)>, DecodeError> {
    let mut r = Reader::new(body);
    let n = r.go_map_len()?.unwrap_or(0);
    let mut entries = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        let key = String::from_utf8_lossy(r.key()?).into_owned();
        entries.push((key, r.any()?));
    }
    Ok(entries)
}

/// Walks a Go struct encoded as a map, handing each key to `field`, which
/// returns false for keys it does not know (they are then skipped).
fn decode_struct<'a>(
    body: &'a [u8],
    mut field: impl FnMut(&[u8], &mut Reader<'a>) -> Result<bool, DecodeError>,
) -> Result<(), DecodeError> {
    let mut r = Reader::new(body);
    // nil decodes to the zero struct in Go. (Go would also accept a struct
    // encoded as an array; no peer does that, so it is rejected here.)
    let n = r.go_map_len()?.unwrap_or(0);
    for _ in 0..n {
        // Go's struct keys go through its string decoder, hence its error text.
        let key = r.go_bytes()?.unwrap_or_default();
        if !field(key, &mut r)? {
            r.skip()?;
        }
    }
    Ok(())
}

impl Open {
    /// Encodes as Go does: `{versions: [int...]}`, ints shortest.
    pub fn encode(&self) -> Vec<u8> {
        let versions = self.versions.iter().map(|&v| Value::Int(v)).collect();
        encode_map(&[("versions", Value::Array(versions))])
    }

    /// Decodes with Go's tolerance (unknown keys skipped, nil = empty).
    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let mut open = Open::default();
        decode_struct(body, |key, r| {
            if key != b"versions" {
                return Ok(false);
            }
            open.versions = read_list(r, Reader::go_int)?;
            Ok(true)
        })?;
        Ok(open)
    }
}

impl Accept {
    /// Encodes as Go does: `{version: int, protocols: [uint16...]}`.
    pub fn encode(&self) -> Vec<u8> {
        let protocols = self.protocols.iter().map(|&p| Value::U16(p)).collect();
        encode_map(&[
            ("version", Value::Int(self.version)),
            ("protocols", Value::Array(protocols)),
        ])
    }

    /// Decodes with Go's tolerance; protocol numbers truncate to 16 bits.
    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let mut accept = Accept::default();
        decode_struct(body, |key, r| {
            match key {
                b"version" => accept.version = r.go_int()?,
                b"protocols" => {
                    accept.protocols = read_list(r, |r| r.go_uint().map(|p| p as u16))?;
                }
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        Ok(accept)
    }
}

impl ControlError {
    /// An error with only the always-present fields set.
    pub fn new(err: impl Into<String>, close: bool) -> Self {
        ControlError {
            err: err.into(),
            close,
            ..ControlError::default()
        }
    }

    /// Encodes in Go field order with Go's `omitempty` omissions.
    pub fn encode(&self) -> Vec<u8> {
        let mut entries = vec![
            ("err", Value::Str(self.err.clone())),
            ("close", Value::Bool(self.close)),
        ];
        if self.code != 0 {
            entries.push(("code", Value::Int(self.code)));
        }
        if self.msgproto != 0 {
            entries.push(("msgproto", Value::U16(self.msgproto)));
        }
        if !self.msgtype.is_empty() {
            entries.push(("msgtype", Value::Str(self.msgtype.clone())));
        }
        if !self.msgid.is_empty() {
            entries.push(("msgid", Value::Str(self.msgid.clone())));
        }
        encode_map(&entries)
    }

    /// Decodes with Go's tolerance; `close` must be a real bool (or nil).
    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let mut e = ControlError::default();
        decode_struct(body, |key, r| {
            match key {
                b"err" => e.err = r.go_string()?,
                b"close" => e.close = r.go_bool()?,
                // The reference's struct has no `code`, so it never fails on
                // one; only take it when it is an integer.
                b"code" if matches!(r.peek_kind()?, Kind::Int | Kind::Nil) => {
                    e.code = r.go_int()?;
                }
                b"msgproto" => e.msgproto = r.go_uint()? as u16,
                b"msgtype" => e.msgtype = r.go_string()?,
                b"msgid" => e.msgid = r.go_string()?,
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        Ok(e)
    }
}

/// Go's slice decoding: an array (nil = empty) of items read by `item`.
fn read_list<'a, T>(
    r: &mut Reader<'a>,
    mut item: impl FnMut(&mut Reader<'a>) -> Result<T, DecodeError>,
) -> Result<Vec<T>, DecodeError> {
    let n = r.go_array_len()?.unwrap_or(0);
    let mut items = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        items.push(item(r)?);
    }
    Ok(items)
}
