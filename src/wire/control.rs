//! Bodies of the control protocol (protocol.md §2.6): Open, Accept, Error,
//! plus small helpers for other struct-like bodies.
//!
//! Decoding follows Go's struct decoding in vmihailenco/msgpack v5: keys in
//! any order, unknown keys skipped, nil reads as the zero value, and errors
//! whose text matches Go's closely enough to relay to the server.

use super::codec::{DecodeError, Kind, Reader, Value, encode_value};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::codec::testhex::{h, hex};

    fn err_text<T: std::fmt::Debug>(r: Result<T, DecodeError>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn bodies_encode_as_go_does() {
        let open = Open { versions: vec![1] };
        assert_eq!(hex(&open.encode()), "81a876657273696f6e739101");
        let accept = Accept {
            version: 1,
            protocols: vec![1, 2, 3, 4],
        };
        assert_eq!(
            hex(&accept.encode()),
            "82a776657273696f6e01a970726f746f636f6c7394cd0001cd0002cd0003cd0004"
        );
        let timeout = ControlError::new("session timeout", true);
        assert_eq!(
            hex(&timeout.encode()),
            "82a3657272af73657373696f6e2074696d656f7574a5636c6f7365c3"
        );
        // `code` sits between close and msgproto, written as a Go int.
        let e = ControlError {
            code: 500,
            msgproto: 2,
            msgid: "m".into(),
            ..ControlError::new("x", false)
        };
        assert_eq!(
            hex(&e.encode()),
            "85a3657272a178a5636c6f7365c2a4636f6465cd01f4a86d736770726f746fcd0002a56d73676964a16d"
        );
        assert_eq!(ControlError::decode(&e.encode()).unwrap(), e);
    }

    #[test]
    fn decoding_is_tolerant_like_go() {
        // Unknown keys (with nested values) skipped, any key order, nil = zero.
        let body = h("83 a1 78 92 81 a1 79 c0 c3 a8 76657273696f6e73 92 02 cc01 a1 7a c0");
        assert_eq!(Open::decode(&body).unwrap().versions, vec![2, 1]);
        assert_eq!(Open::decode(&h("c0")).unwrap(), Open::default());
        assert_eq!(
            Open::decode(&h("81 a8 76657273696f6e73 c0")).unwrap(),
            Open::default()
        );
        let accept = Accept::decode(&h(
            "82 a9 70726f746f636f6c73 93 01 ce00010002 ff a7 76657273696f6e d3 0000000000000001",
        ))
        .unwrap();
        assert_eq!(accept.version, 1);
        assert_eq!(accept.protocols, vec![1, 2, 65535]);
        // `code` of another type is ignored, as the reference (no such field) does.
        let e = ControlError::decode(&h("83 a3 657272 a1 78 a4 636f6465 a1 79 a5 636c6f7365 c3"))
            .unwrap();
        assert_eq!(e, ControlError::new("x", true));
    }

    #[test]
    fn decode_errors_read_like_go() {
        assert_eq!(err_text(Open::decode(&[])), "EOF");
        assert_eq!(
            err_text(Open::decode(&h("01"))),
            "msgpack: invalid code=1 decoding map length"
        );
        assert_eq!(
            err_text(Open::decode(&h("81 a8 76657273696f6e73 a1 31"))),
            "msgpack: invalid code=a1 decoding array length"
        );
        assert_eq!(
            err_text(Open::decode(&h("81 a8 76657273696f6e73 91 a1 31"))),
            "msgpack: invalid code=a1 decoding int64"
        );
        // Go would say "EOF" here; the length check fires before the read.
        assert_eq!(
            err_text(Open::decode(&h("81 a8 76657273696f6e73 92 01"))),
            "msgpack: length 2 exceeds the input"
        );
        assert_eq!(
            err_text(Open::decode(&h("81 a8 766572"))),
            "msgpack: length 8 exceeds the input"
        );
        assert_eq!(
            err_text(Accept::decode(&h("81 a7 76657273696f6e cd 00"))),
            "unexpected EOF"
        );
        assert_eq!(
            err_text(Accept::decode(&h("81 a9 70726f746f636f6c73 91 c3"))),
            "msgpack: invalid code=c3 decoding uint64"
        );
        assert_eq!(
            err_text(ControlError::decode(&h("81 a5 636c6f7365 01"))),
            "msgpack: invalid code=1 decoding bool"
        );
        assert_eq!(
            err_text(ControlError::decode(&h("81 a3 657272 01"))),
            "msgpack: invalid code=1 decoding string/bytes length"
        );
        assert_eq!(
            err_text(ControlError::decode(&h("81 01 01"))),
            "msgpack: invalid code=1 decoding string/bytes length"
        );
        assert!(ControlError::decode(&h("81 a5 636c6f7365 c1")).is_err());
    }

    #[test]
    fn generic_maps_round_trip() {
        let body = encode_map(&[
            ("err", Value::Str("unknown connection".into())),
            ("msgtype", Value::Str("forward".into())),
        ]);
        assert_eq!(
            hex(&body),
            "82a3657272b2756e6b6e6f776e20636f6e6e656374696f6ea76d736774797065a7666f7277617264"
        );
        let entries = decode_map(&body).unwrap();
        assert_eq!(
            entries[0],
            ("err".into(), Value::Str("unknown connection".into()))
        );
        assert_eq!(entries[1].0, "msgtype");
        assert_eq!(decode_map(&h("c0")).unwrap(), vec![]);
        assert_eq!(decode_map(&h("81 01 01")), Err(DecodeError::NonStringKey));
        assert!(decode_map(&h("91 01")).is_err());
        assert!(decode_map(&h("df ffffffff")).is_err());
        assert!(decode_map(&h(&format!("81 a1 61 {}", "91".repeat(10_000)))).is_err());
    }

    #[test]
    fn random_bodies_never_panic() {
        let mut x: u64 = 0x1234_5678_9abc_def1;
        let alphabet = h("80 81 82 91 92 a1 a3 a5 a7 a8 a9 c0 c1 c2 c3 cd ce d3 dc dd de df 01 ff");
        let mut buf = Vec::new();
        for _ in 0..50_000 {
            buf.clear();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 24) as usize;
            let mut y = x;
            for _ in 0..len {
                y = y.rotate_left(7).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                buf.push(if y.is_multiple_of(2) {
                    alphabet[(y >> 8) as usize % alphabet.len()]
                } else {
                    (y >> 16) as u8
                });
            }
            let _ = Open::decode(&buf);
            let _ = Accept::decode(&buf);
            let _ = ControlError::decode(&buf);
            let _ = decode_map(&buf);
        }
    }
}
