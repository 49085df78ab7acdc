//! ProtoMsg codec: the msgpack envelope every websocket message carries
//! (protocol.md §2). Encodes byte-identically to Go's vmihailenco/msgpack v5.

use std::collections::BTreeMap;
use std::fmt;

/// Protocol number of the remote terminal.
pub const PROTO_SHELL: u16 = 1;
/// Protocol number of file transfer.
pub const PROTO_FILETRANSFER: u16 = 2;
/// Protocol number of port forwarding.
pub const PROTO_PORTFORWARD: u16 = 3;
/// Protocol number of the mender-client triggers.
pub const PROTO_MENDERCLIENT: u16 = 4;
/// Protocol number of session control.
pub const PROTO_CONTROL: u16 = 0xFFFF;

/// A msgpack value that remembers the wire format it was decoded from, so that
/// echoed values are re-encoded with the same width (protocol.md §2.3.2).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `c0`
    Nil,
    /// `c2` / `c3`
    Bool(bool),
    /// A Go `int`: written in the shortest form (never produced by decoding).
    Int(i64),
    /// Positive or negative fixint and `d0` decode to this; written as `d0`.
    I8(i8),
    /// `d1`
    I16(i16),
    /// `d2`
    I32(i32),
    /// `d3`
    I64(i64),
    /// `cc`
    U8(u8),
    /// `cd`
    U16(u16),
    /// `ce`
    U32(u32),
    /// `cf`
    U64(u64),
    /// `ca`
    F32(f32),
    /// `cb`
    F64(f64),
    /// fixstr / str8 / str16 / str32 (written shortest)
    Str(String),
    /// bin8 / bin16 / bin32 (written shortest)
    Bin(Vec<u8>),
    /// fixarray / array16 / array32
    Array(Vec<Value>),
    /// fixmap / map16 / map32, keys in wire order
    Map(Vec<(Value, Value)>),
    /// fixext / ext8/16/32: (type, data)
    Ext(i8, Vec<u8>),
}

/// Header properties, sorted by key (the order the device writes them in).
pub type Props = BTreeMap<String, Value>;

/// The `hdr` of a ProtoMsg.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProtoHdr {
    /// Which protocol the message belongs to.
    pub proto: u16,
    /// Protocol-specific message type; omitted on the wire when empty.
    pub typ: String,
    /// Session id; omitted on the wire when empty.
    pub sid: String,
    /// Properties; omitted on the wire when empty.
    pub props: Props,
}

/// One websocket message.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProtoMsg {
    /// The header.
    pub hdr: ProtoHdr,
    /// `None` = absent or nil on the wire. `Some(empty)` is only produced by
    /// decoding `c4 00`; encoding omits empty bodies.
    pub body: Option<Vec<u8>>,
}

/// Why a byte string is not a valid ProtoMsg / msgpack document.
#[derive(Debug, Clone, PartialEq)]
pub enum DecodeError {
    /// Input ended inside a value.
    Truncated,
    /// A marker byte that is never valid (`c1`).
    InvalidMarker(u8),
    /// A field had a msgpack type the schema does not allow.
    WrongType {
        /// Which field (e.g. `hdr.proto`).
        field: &'static str,
        /// What was found (e.g. `str`).
        found: &'static str,
    },
    /// A length field claims more elements/bytes than the input holds.
    LengthExceedsInput(u64),
    /// Containers nested deeper than the decoder allows.
    TooDeep,
    /// A map key that is not a string where the schema needs one.
    NonStringKey,
    /// Input ended where a value should start (Go's `io.EOF`, e.g. an empty body).
    Eof,
    /// A value's marker does not fit the Go type being decoded into; the text
    /// mirrors vmihailenco/msgpack so it can be relayed to the server verbatim.
    InvalidCode {
        /// The offending marker byte.
        code: u8,
        /// What Go was decoding (`bool`, `int64`, `map length`, …).
        decoding: &'static str,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Go's texts (io.EOF / io.ErrUnexpectedEOF), because control errors
            // carry this text to the server in place of the reference's.
            DecodeError::Truncated => write!(f, "unexpected EOF"),
            DecodeError::Eof => write!(f, "EOF"),
            DecodeError::InvalidCode { code, decoding } => {
                write!(f, "msgpack: invalid code={code:x} decoding {decoding}")
            }
            DecodeError::InvalidMarker(b) => write!(f, "msgpack: invalid code={b:x}"),
            DecodeError::WrongType { field, found } => {
                write!(f, "msgpack: invalid type {found} for {field}")
            }
            DecodeError::LengthExceedsInput(n) => {
                write!(f, "msgpack: length {n} exceeds the input")
            }
            DecodeError::TooDeep => write!(f, "msgpack: nesting too deep"),
            DecodeError::NonStringKey => write!(f, "msgpack: map key is not a string"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Deepest container nesting `decode_value` accepts; real peers nest at most
/// three levels, and the limit bounds the decoder's recursion.
pub const MAX_DEPTH: usize = 32;

/// Upper bound on capacity reserved up front for a container, so a length
/// field alone never drives a large allocation.
const PREALLOC_LIMIT: usize = 1024;

// ---------------------------------------------------------------------------
// Convenience API
// ---------------------------------------------------------------------------

impl Value {
    /// The string, if this is a `Str` (bin is deliberately not a string here).
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer value of any integer variant, if it fits in an `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::Int(n) | Value::I64(n) => Some(n),
            Value::I8(n) => Some(n.into()),
            Value::I16(n) => Some(n.into()),
            Value::I32(n) => Some(n.into()),
            Value::U8(n) => Some(n.into()),
            Value::U16(n) => Some(n.into()),
            Value::U32(n) => Some(n.into()),
            Value::U64(n) => i64::try_from(n).ok(),
            _ => None,
        }
    }

    /// The integer value of any integer variant, if it is non-negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U64(n) => Some(n),
            _ => self.as_i64().and_then(|n| u64::try_from(n).ok()),
        }
    }
}

impl ProtoMsg {
    /// A message with the given header fields, no props and no body.
    pub fn new(proto: u16, typ: impl Into<String>, sid: impl Into<String>) -> Self {
        ProtoMsg {
            hdr: ProtoHdr {
                proto,
                typ: typ.into(),
                sid: sid.into(),
                props: Props::new(),
            },
            body: None,
        }
    }

    /// The property `key`, whatever its type.
    pub fn prop(&self, key: &str) -> Option<&Value> {
        self.hdr.props.get(key)
    }

    /// The property `key` if it is a string (peers treat other types as absent).
    pub fn prop_str(&self, key: &str) -> Option<&str> {
        self.prop(key).and_then(Value::as_str)
    }

    /// Builder: sets (or replaces) one property.
    pub fn with_prop(mut self, key: impl Into<String>, value: Value) -> Self {
        self.hdr.props.insert(key.into(), value);
        self
    }

    /// Builder: sets the body; an empty body is still omitted by `encode`.
    pub fn with_body(mut self, body: Vec<u8>) -> Self {
        self.body = Some(body);
        self
    }
}

// ---------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------

/// rmp's writers are generic over fallible sinks; writing into a `Vec` cannot
/// fail, so their results carry no information.
fn vec_ok<T, E>(_: Result<T, E>) {}

/// msgpack lengths are 32-bit; anything longer cannot be framed at all, and
/// no websocket message this daemon builds comes near 4 GiB.
fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Writes one value in the width its variant stands for (§2.2 rule 7).
pub fn encode_value(v: &Value, out: &mut Vec<u8>) {
    use rmp::encode as w;
    match v {
        Value::Nil => vec_ok(w::write_nil(out)),
        Value::Bool(b) => vec_ok(w::write_bool(out, *b)),
        // Go's EncodeInt/EncodeUint pick the same shortest form as rmp.
        Value::Int(n) => vec_ok(w::write_sint(out, *n)),
        Value::I8(n) => vec_ok(w::write_i8(out, *n)),
        Value::I16(n) => vec_ok(w::write_i16(out, *n)),
        Value::I32(n) => vec_ok(w::write_i32(out, *n)),
        Value::I64(n) => vec_ok(w::write_i64(out, *n)),
        Value::U8(n) => vec_ok(w::write_u8(out, *n)),
        Value::U16(n) => vec_ok(w::write_u16(out, *n)),
        Value::U32(n) => vec_ok(w::write_u32(out, *n)),
        Value::U64(n) => vec_ok(w::write_u64(out, *n)),
        Value::F32(x) => vec_ok(w::write_f32(out, *x)),
        Value::F64(x) => vec_ok(w::write_f64(out, *x)),
        Value::Str(s) => vec_ok(w::write_str(out, s)),
        Value::Bin(b) => vec_ok(w::write_bin(out, b)),
        Value::Array(items) => {
            vec_ok(w::write_array_len(out, len32(items.len())));
            for item in items {
                encode_value(item, out);
            }
        }
        Value::Map(entries) => {
            vec_ok(w::write_map_len(out, len32(entries.len())));
            for (k, v) in entries {
                encode_value(k, out);
                encode_value(v, out);
            }
        }
        Value::Ext(ty, data) => {
            vec_ok(w::write_ext_meta(out, len32(data.len()), *ty));
            out.extend_from_slice(data);
        }
    }
}

/// Encodes a message exactly as the Go reference does (protocol.md §2.2).
pub fn encode(msg: &ProtoMsg) -> Vec<u8> {
    use rmp::encode as w;
    let hdr = &msg.hdr;
    // An empty body must be absent, not `c4 00`: deviceconnect reads an empty
    // bin as a zero-length chunk rather than end-of-file.
    let body = msg.body.as_deref().filter(|b| !b.is_empty());
    let mut out = Vec::with_capacity(64 + body.map_or(0, <[u8]>::len));

    vec_ok(w::write_map_len(&mut out, 1 + u32::from(body.is_some())));
    vec_ok(w::write_str(&mut out, "hdr"));
    let fields = 1
        + u32::from(!hdr.typ.is_empty())
        + u32::from(!hdr.sid.is_empty())
        + u32::from(!hdr.props.is_empty());
    vec_ok(w::write_map_len(&mut out, fields));
    vec_ok(w::write_str(&mut out, "proto"));
    // Go's ProtoType is a uint16, which is always written fixed-width.
    vec_ok(w::write_u16(&mut out, hdr.proto));
    if !hdr.typ.is_empty() {
        vec_ok(w::write_str(&mut out, "typ"));
        vec_ok(w::write_str(&mut out, &hdr.typ));
    }
    if !hdr.sid.is_empty() {
        vec_ok(w::write_str(&mut out, "sid"));
        vec_ok(w::write_str(&mut out, &hdr.sid));
    }
    if !hdr.props.is_empty() {
        vec_ok(w::write_str(&mut out, "props"));
        vec_ok(w::write_map_len(&mut out, len32(hdr.props.len())));
        for (k, v) in &hdr.props {
            vec_ok(w::write_str(&mut out, k));
            encode_value(v, &mut out);
        }
    }
    if let Some(body) = body {
        vec_ok(w::write_str(&mut out, "body"));
        vec_ok(w::write_bin(&mut out, body));
    }
    out
}

// ---------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------

/// The broad msgpack type of a marker byte, which is all Go's decoders look at
/// when deciding whether a value fits the target type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Nil,
    Bool,
    Int,
    Float,
    Str,
    Bin,
    Array,
    Map,
    Ext,
    Reserved,
}

impl Kind {
    fn of(code: u8) -> Kind {
        use rmp::Marker as M;
        match M::from_u8(code) {
            M::Null => Kind::Nil,
            M::True | M::False => Kind::Bool,
            M::FixPos(_)
            | M::FixNeg(_)
            | M::U8
            | M::U16
            | M::U32
            | M::U64
            | M::I8
            | M::I16
            | M::I32
            | M::I64 => Kind::Int,
            M::F32 | M::F64 => Kind::Float,
            M::FixStr(_) | M::Str8 | M::Str16 | M::Str32 => Kind::Str,
            M::Bin8 | M::Bin16 | M::Bin32 => Kind::Bin,
            M::FixArray(_) | M::Array16 | M::Array32 => Kind::Array,
            M::FixMap(_) | M::Map16 | M::Map32 => Kind::Map,
            M::FixExt1
            | M::FixExt2
            | M::FixExt4
            | M::FixExt8
            | M::FixExt16
            | M::Ext8
            | M::Ext16
            | M::Ext32 => Kind::Ext,
            M::Reserved => Kind::Reserved,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Nil => "nil",
            Kind::Bool => "bool",
            Kind::Int => "int",
            Kind::Float => "float",
            Kind::Str => "str",
            Kind::Bin => "bin",
            Kind::Array => "array",
            Kind::Map => "map",
            Kind::Ext => "ext",
            Kind::Reserved => "reserved",
        }
    }
}

/// One value's marker and fixed-size payload. Containers carry only their
/// element count, already checked against the remaining input.
enum Head<'a> {
    Scalar(Value),
    Str(&'a [u8]),
    Bin(&'a [u8]),
    Array(usize),
    Map(usize),
    Ext(i8, &'a [u8]),
}

/// A cursor over the input; every read is bounds-checked so malformed input
/// yields an error, never a panic.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// The kind of the next value, without consuming it.
    pub(crate) fn peek_kind(&self) -> Result<Kind, DecodeError> {
        self.buf
            .first()
            .map(|&c| Kind::of(c))
            .ok_or(DecodeError::Eof)
    }

    fn peek_code(&self) -> Result<u8, DecodeError> {
        self.buf.first().copied().ok_or(DecodeError::Eof)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.buf.len() {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.array().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.array().map(u64::from_be_bytes)
    }

    /// Payload bytes of a str/bin/ext whose length came from the input.
    fn payload(&mut self, len: u64) -> Result<&'a [u8], DecodeError> {
        match usize::try_from(len) {
            Ok(n) if n <= self.buf.len() => self.take(n),
            _ => Err(DecodeError::LengthExceedsInput(len)),
        }
    }

    /// Validates a container length: every element needs at least
    /// `min_bytes` more input, so absurd lengths fail before any allocation.
    fn count(&self, n: u64, min_bytes: u64) -> Result<usize, DecodeError> {
        let need = n.saturating_mul(min_bytes);
        match usize::try_from(n) {
            Ok(c) if need <= self.buf.len() as u64 => Ok(c),
            _ => Err(DecodeError::LengthExceedsInput(n)),
        }
    }

    fn head(&mut self) -> Result<Head<'a>, DecodeError> {
        use rmp::Marker as M;
        let code = self.peek_code()?;
        self.take(1)?;
        let scalar = |v| Ok(Head::Scalar(v));
        match M::from_u8(code) {
            M::Null => scalar(Value::Nil),
            M::True => scalar(Value::Bool(true)),
            M::False => scalar(Value::Bool(false)),
            // Go decodes both fixint ranges into int8 (§2.3).
            M::FixPos(n) => scalar(Value::I8(n as i8)),
            M::FixNeg(n) => scalar(Value::I8(n)),
            M::U8 => scalar(Value::U8(self.u8()?)),
            M::U16 => scalar(Value::U16(self.u16()?)),
            M::U32 => scalar(Value::U32(self.u32()?)),
            M::U64 => scalar(Value::U64(self.u64()?)),
            M::I8 => scalar(Value::I8(self.u8()? as i8)),
            M::I16 => scalar(Value::I16(self.u16()? as i16)),
            M::I32 => scalar(Value::I32(self.u32()? as i32)),
            M::I64 => scalar(Value::I64(self.u64()? as i64)),
            M::F32 => scalar(Value::F32(f32::from_bits(self.u32()?))),
            M::F64 => scalar(Value::F64(f64::from_bits(self.u64()?))),
            M::FixStr(n) => Ok(Head::Str(self.payload(n.into())?)),
            M::Str8 => {
                let n = self.u8()?;
                Ok(Head::Str(self.payload(n.into())?))
            }
            M::Str16 => {
                let n = self.u16()?;
                Ok(Head::Str(self.payload(n.into())?))
            }
            M::Str32 => {
                let n = self.u32()?;
                Ok(Head::Str(self.payload(n.into())?))
            }
            M::Bin8 => {
                let n = self.u8()?;
                Ok(Head::Bin(self.payload(n.into())?))
            }
            M::Bin16 => {
                let n = self.u16()?;
                Ok(Head::Bin(self.payload(n.into())?))
            }
            M::Bin32 => {
                let n = self.u32()?;
                Ok(Head::Bin(self.payload(n.into())?))
            }
            M::FixArray(n) => Ok(Head::Array(self.count(n.into(), 1)?)),
            M::Array16 => {
                let n = self.u16()?;
                Ok(Head::Array(self.count(n.into(), 1)?))
            }
            M::Array32 => {
                let n = self.u32()?;
                Ok(Head::Array(self.count(n.into(), 1)?))
            }
            M::FixMap(n) => Ok(Head::Map(self.count(n.into(), 2)?)),
            M::Map16 => {
                let n = self.u16()?;
                Ok(Head::Map(self.count(n.into(), 2)?))
            }
            M::Map32 => {
                let n = self.u32()?;
                Ok(Head::Map(self.count(n.into(), 2)?))
            }
            M::FixExt1 => self.ext(1),
            M::FixExt2 => self.ext(2),
            M::FixExt4 => self.ext(4),
            M::FixExt8 => self.ext(8),
            M::FixExt16 => self.ext(16),
            M::Ext8 => {
                let n = self.u8()?;
                self.ext(n.into())
            }
            M::Ext16 => {
                let n = self.u16()?;
                self.ext(n.into())
            }
            M::Ext32 => {
                let n = self.u32()?;
                self.ext(n.into())
            }
            M::Reserved => Err(DecodeError::InvalidMarker(code)),
        }
    }

    fn ext(&mut self, len: u64) -> Result<Head<'a>, DecodeError> {
        let ty = self.u8()? as i8;
        Ok(Head::Ext(ty, self.payload(len)?))
    }

    /// Reads any value, keeping its wire width.
    fn value(&mut self, depth: usize) -> Result<Value, DecodeError> {
        Ok(match self.head()? {
            Head::Scalar(v) => v,
            Head::Str(s) => Value::Str(String::from_utf8_lossy(s).into_owned()),
            Head::Bin(b) => Value::Bin(b.to_vec()),
            Head::Ext(ty, data) => Value::Ext(ty, data.to_vec()),
            Head::Array(n) => {
                if depth >= MAX_DEPTH {
                    return Err(DecodeError::TooDeep);
                }
                let mut items = Vec::with_capacity(n.min(PREALLOC_LIMIT));
                for _ in 0..n {
                    items.push(self.value(depth + 1)?);
                }
                Value::Array(items)
            }
            Head::Map(n) => {
                if depth >= MAX_DEPTH {
                    return Err(DecodeError::TooDeep);
                }
                let mut entries = Vec::with_capacity(n.min(PREALLOC_LIMIT));
                for _ in 0..n {
                    let k = self.value(depth + 1)?;
                    let v = self.value(depth + 1)?;
                    entries.push((k, v));
                }
                Value::Map(entries)
            }
        })
    }

    /// Skips one value of any shape. Iterative (a count of values still to
    /// skip), so unknown keys cost no allocation and no stack however deep.
    pub(crate) fn skip(&mut self) -> Result<(), DecodeError> {
        let mut pending: u64 = 1;
        while pending > 0 {
            pending -= 1;
            match self.head()? {
                Head::Array(n) => pending = pending.saturating_add(n as u64),
                Head::Map(n) => pending = pending.saturating_add(2 * n as u64),
                _ => {}
            }
        }
        Ok(())
    }

    fn mismatch(&self, decoding: &'static str) -> DecodeError {
        match self.peek_code() {
            Ok(code) => DecodeError::InvalidCode { code, decoding },
            Err(e) => e,
        }
    }

    /// Go's `DecodeUint64`: any integer (negative ones sign-extended), nil as 0.
    pub(crate) fn go_uint(&mut self) -> Result<u64, DecodeError> {
        match self.peek_kind()? {
            Kind::Nil | Kind::Int => match self.head()? {
                Head::Scalar(Value::Nil) => Ok(0),
                Head::Scalar(v) => Ok(int_bits(&v)),
                _ => Err(DecodeError::Truncated),
            },
            _ => Err(self.mismatch("uint64")),
        }
    }

    /// Go's `DecodeInt64`: any integer (uint64 wraps), nil as 0.
    pub(crate) fn go_int(&mut self) -> Result<i64, DecodeError> {
        self.go_uint().map(|n| n as i64).map_err(|e| match e {
            DecodeError::InvalidCode { code, .. } => DecodeError::InvalidCode {
                code,
                decoding: "int64",
            },
            e => e,
        })
    }

    /// Go's `DecodeBool`: only real booleans, nil as false.
    pub(crate) fn go_bool(&mut self) -> Result<bool, DecodeError> {
        match self.peek_kind()? {
            Kind::Nil | Kind::Bool => Ok(matches!(self.head()?, Head::Scalar(Value::Bool(true)))),
            _ => Err(self.mismatch("bool")),
        }
    }

    /// Go's string/[]byte decoding: str or bin, nil as absent. Read here
    /// rather than through `head`: it reads every key and string, and the
    /// general `Head` comes back through memory, which costs more than the
    /// parse (a store-forwarding stall per call).
    pub(crate) fn go_bytes(&mut self) -> Result<Option<&'a [u8]>, DecodeError> {
        let code = self.peek_code()?;
        let len = match code {
            0xc0 => {
                self.take(1)?;
                return Ok(None);
            }
            0xa0..=0xbf => self.marker_len(0, code & 0x1f)?,
            0xd9 | 0xc4 => self.marker_len(1, 0)?,
            0xda | 0xc5 => self.marker_len(2, 0)?,
            0xdb | 0xc6 => self.marker_len(4, 0)?,
            _ => return Err(self.mismatch("string/bytes length")),
        };
        self.payload(len).map(Some)
    }

    /// Go's `DecodeString`, with invalid UTF-8 replaced rather than rejected.
    pub(crate) fn go_string(&mut self) -> Result<String, DecodeError> {
        Ok(self
            .go_bytes()?
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .unwrap_or_default())
    }

    /// Go's `DecodeMapLen`: `None` for nil. Read directly, as `go_bytes`.
    pub(crate) fn go_map_len(&mut self) -> Result<Option<usize>, DecodeError> {
        let code = self.peek_code()?;
        let n = match code {
            0xc0 => {
                self.take(1)?;
                return Ok(None);
            }
            0x80..=0x8f => self.marker_len(0, code & 0x0f)?,
            0xde => self.marker_len(2, 0)?,
            0xdf => self.marker_len(4, 0)?,
            _ => return Err(self.mismatch("map length")),
        };
        self.count(n, 2).map(Some)
    }

    /// Consumes a marker and the big-endian length in the `width` bytes
    /// after it (0: the length is `inline`, in the marker itself).
    fn marker_len(&mut self, width: usize, inline: u8) -> Result<u64, DecodeError> {
        self.take(1)?;
        Ok(match width {
            1 => self.u8()?.into(),
            2 => self.u16()?.into(),
            4 => self.u32()?.into(),
            _ => inline.into(),
        })
    }

    /// Go's `DecodeArrayLen`: `None` for nil.
    pub(crate) fn go_array_len(&mut self) -> Result<Option<usize>, DecodeError> {
        match self.peek_kind()? {
            Kind::Nil | Kind::Array => match self.head()? {
                Head::Array(n) => Ok(Some(n)),
                _ => Ok(None),
            },
            _ => Err(self.mismatch("array length")),
        }
    }

    /// A map key that must be a string (str or bin; nil reads as "").
    pub(crate) fn key(&mut self) -> Result<&'a [u8], DecodeError> {
        match self.go_bytes() {
            Ok(k) => Ok(k.unwrap_or_default()),
            Err(DecodeError::InvalidCode { .. }) => Err(DecodeError::NonStringKey),
            Err(e) => Err(e),
        }
    }

    /// Any value, with the nesting limit applied from this point.
    pub(crate) fn any(&mut self) -> Result<Value, DecodeError> {
        self.value(0)
    }
}

/// The two's-complement bits of an integer value, as Go's reflect `SetUint`
/// sees them before truncating to the field width.
fn int_bits(v: &Value) -> u64 {
    match *v {
        Value::U64(n) => n,
        Value::Int(n) | Value::I64(n) => n as u64,
        Value::I8(n) => n as i64 as u64,
        Value::I16(n) => n as i64 as u64,
        Value::I32(n) => n as i64 as u64,
        Value::U8(n) => n.into(),
        Value::U16(n) => n.into(),
        Value::U32(n) => n.into(),
        _ => 0,
    }
}

/// Reports a Go-type mismatch on an envelope field in terms of that field.
fn in_field(field: &'static str) -> impl Fn(DecodeError) -> DecodeError {
    move |e| match e {
        DecodeError::InvalidCode { code, .. } => DecodeError::WrongType {
            field,
            found: Kind::of(code).name(),
        },
        e => e,
    }
}

/// Decodes one value from the start of `bytes`; returns it and the number of
/// bytes it occupied (for nested bodies, which may carry trailing data).
pub fn decode_value(bytes: &[u8]) -> Result<(Value, usize), DecodeError> {
    let mut r = Reader::new(bytes);
    let v = r.any()?;
    Ok((v, bytes.len() - r.remaining()))
}

/// Decodes one message; never panics and never allocates more than the input
/// can justify. Follows Go's decoding into the same struct (§2.3): a repeated
/// key decodes again into what the earlier one left, so the last one wins.
pub fn decode(bytes: &[u8]) -> Result<ProtoMsg, DecodeError> {
    let (mut msg, body) = decode_parts(bytes)?;
    msg.body = body.map(|r| bytes[r].to_vec());
    Ok(msg)
}

/// Like [`decode`], from a message of its own: a body that is most of the
/// message keeps the message's allocation, so a large message is never held
/// twice.
pub fn decode_owned(mut bytes: Vec<u8>) -> Result<ProtoMsg, DecodeError> {
    let (mut msg, body) = decode_parts(&bytes)?;
    msg.body = body.map(|r| {
        if r.len() >= bytes.len() / 2 {
            let len = r.len();
            bytes.copy_within(r, 0);
            bytes.truncate(len);
            std::mem::take(&mut bytes)
        } else {
            bytes[r].to_vec()
        }
    });
    Ok(msg)
}

/// The message without its body, and where in `bytes` the body is.
fn decode_parts(bytes: &[u8]) -> Result<(ProtoMsg, Option<std::ops::Range<usize>>), DecodeError> {
    let mut r = Reader::new(bytes);
    let n = match r.go_map_len().map_err(in_field("message"))? {
        Some(n) => n,
        None => {
            return Err(DecodeError::WrongType {
                field: "message",
                found: "nil",
            });
        }
    };
    let mut msg = ProtoMsg::default();
    let mut body = None;
    for _ in 0..n {
        match r.key()? {
            b"hdr" => decode_hdr(&mut r, &mut msg.hdr)?,
            b"body" => {
                body = r.go_bytes().map_err(in_field("body"))?.map(|b| {
                    // `b` lies within `bytes`
                    let start = b.as_ptr() as usize - bytes.as_ptr() as usize;
                    start..start + b.len()
                });
            }
            _ => r.skip()?,
        }
    }
    // Trailing bytes are ignored, as Go's Unmarshal does.
    Ok((msg, body))
}

fn decode_hdr(r: &mut Reader<'_>, hdr: &mut ProtoHdr) -> Result<(), DecodeError> {
    let Some(n) = r.go_map_len().map_err(in_field("hdr"))? else {
        *hdr = ProtoHdr::default();
        return Ok(());
    };
    for _ in 0..n {
        match r.key()? {
            // Truncation, not range checking: Go's reflect SetUint does this.
            b"proto" => hdr.proto = r.go_uint().map_err(in_field("hdr.proto"))? as u16,
            b"typ" => hdr.typ = r.go_string().map_err(in_field("hdr.typ"))?,
            b"sid" => hdr.sid = r.go_string().map_err(in_field("hdr.sid"))?,
            b"props" => decode_props(r, &mut hdr.props)?,
            _ => r.skip()?,
        }
    }
    Ok(())
}

fn decode_props(r: &mut Reader<'_>, props: &mut Props) -> Result<(), DecodeError> {
    // Go decodes into the existing map (a repeated `props` key merges) and a
    // nil map replaces it.
    let Some(n) = r.go_map_len().map_err(in_field("hdr.props"))? else {
        props.clear();
        return Ok(());
    };
    for _ in 0..n {
        let key = String::from_utf8_lossy(r.key()?).into_owned();
        let value = r.value(1)?;
        props.insert(key, value);
    }
    Ok(())
}

/// Hex helpers shared by the codec and control-body unit tests.
#[cfg(test)]
pub(crate) mod testhex {
    /// Bytes from hex text; whitespace between bytes is ignored.
    pub fn h(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Lowercase hex of `b`.
    pub fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testhex::{h, hex};
    use super::*;

    fn enc(v: &Value) -> String {
        let mut out = Vec::new();
        encode_value(v, &mut out);
        hex(&out)
    }

    /// msgpack str header + bytes, for hand-built inputs.
    fn s(text: &str) -> String {
        let mut out = Vec::new();
        encode_value(&Value::Str(text.into()), &mut out);
        hex(&out)
    }

    /// `{hdr: {<hdr_entries>}}` with `n` hdr entries.
    fn with_hdr(n: u8, entries: &str) -> Vec<u8> {
        h(&format!("81 {} {:02x} {entries}", s("hdr"), 0x80 | n))
    }

    const OPEN: &str = "82a368647283a570726f746fcdffffa3747970a46f70656ea3736964d92433633265366230612d396631642d346538622d623761342d356436633765386639303030a4626f6479c40c81a876657273696f6e739101";
    const SHELL_NEW: &str = "81a368647284a570726f746fcd0001a3747970a36e6577a3736964d92438643466356436322d366332622d346435652d396135372d336631633162326137653031a570726f707383af7465726d696e616c5f686569676874d032ae7465726d696e616c5f7769647468ccc8a7757365725f6964d92462336630633961342d316432652d346635302d386136312d376338643965306631613262";
    const CHECK_UPDATE: &str = "81a368647283a570726f746fcd0004a3747970ac636865636b2d757064617465a570726f707381a673746174757301";

    #[test]
    fn go_int_is_shortest() {
        let cases: &[(i64, &str)] = &[
            (0, "00"),
            (127, "7f"),
            (128, "cc80"),
            (255, "ccff"),
            (256, "cd0100"),
            (65535, "cdffff"),
            (65536, "ce00010000"),
            (4_294_967_296, "cf0000000100000000"),
            (-1, "ff"),
            (-32, "e0"),
            (-33, "d0df"),
            (-128, "d080"),
            (-129, "d1ff7f"),
            (-32769, "d2ffff7fff"),
            (i64::from(i32::MIN) - 1, "d3ffffffff7fffffff"),
        ];
        for &(n, want) in cases {
            assert_eq!(enc(&Value::Int(n)), want, "{n}");
        }
    }

    #[test]
    fn sized_ints_are_fixed_width() {
        assert_eq!(enc(&Value::I8(1)), "d001");
        assert_eq!(enc(&Value::I16(1)), "d10001");
        assert_eq!(enc(&Value::I32(1)), "d200000001");
        assert_eq!(enc(&Value::I64(0)), "d30000000000000000");
        assert_eq!(enc(&Value::U8(1)), "cc01");
        assert_eq!(enc(&Value::U16(1)), "cd0001");
        assert_eq!(enc(&Value::U32(420)), "ce000001a4");
        assert_eq!(enc(&Value::U64(1)), "cf0000000000000001");
        assert_eq!(enc(&Value::F32(1.0)), "ca3f800000");
        assert_eq!(enc(&Value::F64(1.0)), "cb3ff0000000000000");
        assert_eq!(enc(&Value::Nil), "c0");
        assert_eq!(enc(&Value::Bool(true)), "c3");
    }

    #[test]
    fn lengths_use_shortest_headers() {
        assert_eq!(&enc(&Value::Str("a".repeat(31)))[..2], "bf");
        assert_eq!(&enc(&Value::Str("a".repeat(32)))[..4], "d920");
        assert_eq!(&enc(&Value::Str("a".repeat(256)))[..6], "da0100");
        assert_eq!(&enc(&Value::Str("a".repeat(65536)))[..10], "db00010000");
        assert_eq!(enc(&Value::Bin(vec![])), "c400");
        assert_eq!(&enc(&Value::Bin(vec![0; 256]))[..6], "c50100");
        assert_eq!(&enc(&Value::Bin(vec![0; 65536]))[..10], "c600010000");
        assert_eq!(&enc(&Value::Array(vec![Value::Nil; 16]))[..6], "dc0010");
        assert_eq!(enc(&Value::Map(vec![(Value::Nil, Value::Nil)])), "81c0c0");
        assert_eq!(enc(&Value::Ext(-1, vec![0; 4])), "d6ff00000000");
        assert_eq!(enc(&Value::Ext(-1, vec![0; 8])), "d7ff0000000000000000");
        assert_eq!(&enc(&Value::Ext(-1, vec![0; 12]))[..6], "c70cff");
        assert_eq!(&enc(&Value::Ext(5, vec![0; 16]))[..4], "d805");
        assert_eq!(&enc(&Value::Ext(5, vec![0; 3]))[..6], "c70305");
    }

    #[test]
    fn walk_through_vector_encodes() {
        let msg = ProtoMsg::new(PROTO_MENDERCLIENT, "check-update", "")
            .with_prop("status", Value::Int(1));
        assert_eq!(hex(&encode(&msg)), CHECK_UPDATE);
    }

    #[test]
    fn empty_body_is_omitted() {
        let msg = ProtoMsg::new(PROTO_FILETRANSFER, "file_chunk", "s").with_body(vec![]);
        let bytes = encode(&msg);
        assert_eq!(bytes[0], 0x81);
        assert_eq!(decode(&bytes).unwrap().body, None);
        assert_eq!(
            hex(&encode(&ProtoMsg::default())),
            format!("81{}81{}cd0000", s("hdr"), s("proto"))
        );
    }

    #[test]
    fn an_owned_large_body_keeps_the_message_allocation() {
        let big = ProtoMsg::new(PROTO_PORTFORWARD, "forward", "s").with_body(vec![7; 100_000]);
        let bytes = encode(&big);
        let at = bytes.as_ptr();
        let msg = decode_owned(bytes).unwrap();
        assert_eq!(msg, big);
        assert_eq!(msg.body.as_ref().map(|b| b.as_ptr()), Some(at));
        // a small body among large props is copied out, the rest freed
        let props = ProtoMsg::new(PROTO_PORTFORWARD, "forward", "s")
            .with_prop("pad", Value::Str("x".repeat(10_000)))
            .with_body(b"abc".to_vec());
        let msg = decode_owned(encode(&props)).unwrap();
        assert_eq!(msg, props);
        assert_eq!(msg.body.map(|b| b.capacity()), Some(3));
    }

    #[test]
    fn decoding_follows_go() {
        // Keys in any order, unknown keys (with nested values) skipped.
        let unknown = format!("{} 92 81 a1 61 93 c0 c3 d6ff00000000 c70301616263", s("zz"));
        let bytes = h(&format!(
            "83 {} c4 01 41 {unknown} {} 82 {} a1 74 {} cd 0002",
            s("body"),
            s("hdr"),
            s("typ"),
            s("proto")
        ));
        let msg = decode(&bytes).unwrap();
        assert_eq!(msg.hdr.proto, 2);
        assert_eq!(msg.hdr.typ, "t");
        assert_eq!(msg.body.as_deref(), Some(&b"A"[..]));

        // Duplicate keys: last wins; a repeated hdr updates field by field.
        let bytes = h(&format!(
            "83 {} c4 01 41 {} 81 {} 01 {} a1 42",
            s("body"),
            s("hdr"),
            s("proto"),
            s("body")
        ));
        assert_eq!(decode(&bytes).unwrap().body.as_deref(), Some(&b"B"[..]));

        // hdr missing or nil: zero header.
        assert_eq!(decode(&h("80")).unwrap(), ProtoMsg::default());
        assert_eq!(
            decode(&h(&format!("81 {} c0", s("hdr")))).unwrap(),
            ProtoMsg::default()
        );

        // proto: any integer format, truncated to 16 bits.
        for (wire, want) in [
            ("01", 1),
            ("ff", 65535),
            ("cc 05", 5),
            ("ce 00010001", 1),
            ("d3 0000000000000003", 3),
            ("d0 fe", 65534),
            ("c0", 0),
        ] {
            let msg = decode(&with_hdr(1, &format!("{} {wire}", s("proto")))).unwrap();
            assert_eq!(msg.hdr.proto, want, "{wire}");
        }

        // typ/sid as str, bin or nil.
        let bytes = with_hdr(2, &format!("{} c4 02 6869 {} c0", s("typ"), s("sid")));
        let msg = decode(&bytes).unwrap();
        assert_eq!((msg.hdr.typ.as_str(), msg.hdr.sid.as_str()), ("hi", ""));

        // props nil; a later nil clears, a later map merges.
        let p1 = format!("{} 81 {} 01", s("props"), s("a"));
        let p2 = format!("{} 81 {} 02", s("props"), s("b"));
        let msg = decode(&with_hdr(2, &format!("{p1} {p2}"))).unwrap();
        assert_eq!(msg.hdr.props.len(), 2);
        let msg = decode(&with_hdr(2, &format!("{p1} {} c0", s("props")))).unwrap();
        assert!(msg.hdr.props.is_empty());

        // body as str; nil; empty bin.
        let body = |b: &str| decode(&h(&format!("81 {} {b}", s("body")))).unwrap().body;
        assert_eq!(body("a1 78").as_deref(), Some(&b"x"[..]));
        assert_eq!(body("c0"), None);
        assert_eq!(body("c4 00"), Some(vec![]));

        // Trailing bytes ignored.
        assert_eq!(decode(&h("80 c1 ff")).unwrap(), ProtoMsg::default());

        // Invalid UTF-8 is replaced, not rejected.
        let msg = decode(&with_hdr(1, &format!("{} a2 ff41", s("typ")))).unwrap();
        assert_eq!(msg.hdr.typ, "\u{fffd}A");
    }

    #[test]
    fn props_keep_their_wire_width() {
        let msg = decode(&h(SHELL_NEW)).unwrap();
        assert_eq!(msg.prop("terminal_height"), Some(&Value::I8(50)));
        assert_eq!(msg.prop("terminal_width"), Some(&Value::U8(200)));
        assert_eq!(
            msg.prop_str("user_id"),
            Some("b3f0c9a4-1d2e-4f50-8a61-7c8d9e0f1a2b")
        );
        assert_eq!(hex(&encode(&msg)), SHELL_NEW);
        // A fixint comes back as int8 and is echoed as `d0` (§2.3.2).
        let msg = decode(&h(CHECK_UPDATE)).unwrap();
        assert_eq!(msg.prop("status"), Some(&Value::I8(1)));
        assert!(hex(&encode(&msg)).ends_with("d001"));
        assert_eq!(decode_value(&h("e0")).unwrap(), (Value::I8(-32), 1));
    }

    #[test]
    fn value_accessors() {
        assert_eq!(Value::U64(u64::MAX).as_i64(), None);
        assert_eq!(Value::U64(u64::MAX).as_u64(), Some(u64::MAX));
        assert_eq!(Value::I8(-1).as_u64(), None);
        assert_eq!(Value::I8(-1).as_i64(), Some(-1));
        assert_eq!(Value::U32(7).as_i64(), Some(7));
        assert_eq!(Value::Str("x".into()).as_i64(), None);
        assert_eq!(Value::Bin(b"x".to_vec()).as_str(), None);
        assert_eq!(Value::Str("x".into()).as_str(), Some("x"));
    }

    #[test]
    fn malformed_inputs_are_rejected() {
        let deep_arrays = "91".repeat(100_000);
        let deep_maps = "81a0".repeat(100_000);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("reserved c1", h("c1")),
            ("top-level int", h("01")),
            ("top-level array", h("9101")),
            ("top-level nil", h("c0")),
            ("top-level str", h("a161")),
            ("proto str", with_hdr(1, &format!("{} a1 31", s("proto")))),
            (
                "proto float",
                with_hdr(1, &format!("{} ca 3f800000", s("proto"))),
            ),
            (
                "proto double",
                with_hdr(1, &format!("{} cb 3ff0000000000000", s("proto"))),
            ),
            ("proto bool", with_hdr(1, &format!("{} c3", s("proto")))),
            ("typ int", with_hdr(1, &format!("{} 01", s("typ")))),
            ("hdr str", h(&format!("81 {} a1 78", s("hdr")))),
            ("props array", with_hdr(1, &format!("{} 91 01", s("props")))),
            (
                "props int key",
                with_hdr(1, &format!("{} 81 01 01", s("props"))),
            ),
            (
                "props map key",
                with_hdr(1, &format!("{} 81 80 01", s("props"))),
            ),
            ("top int key", h("81 01 01")),
            ("body int", h(&format!("81 {} 01", s("body")))),
            ("body array", h(&format!("81 {} 90", s("body")))),
            ("array32 4GiB", h("dd ffffffff 00")),
            ("map32 4GiB", h("df ffffffff 0000")),
            ("str32 4GiB", h("db ffffffff 61")),
            ("bin32 4GiB", h("c6 ffffffff 61")),
            ("ext32 4GiB", h("c9 ffffffff 01 61")),
            (
                "array32 in props",
                with_hdr(1, &format!("{} 81 a1 61 dd ffffffff 00", s("props"))),
            ),
            ("map32 as hdr", h(&format!("81 {} df ffffffff", s("hdr")))),
            ("str32 as key", h("81 db ffffffff 61")),
            ("bin32 body", h(&format!("81 {} c6 ffffffff 00", s("body")))),
            (
                "unknown key array32",
                h(&format!("81 {} dd ffffffff 00", s("zz"))),
            ),
            ("deep arrays", h(&deep_arrays)),
            ("deep maps", h(&deep_maps)),
            (
                "deep arrays in props",
                with_hdr(1, &format!("{} 81 a1 61 {deep_arrays} 00", s("props"))),
            ),
            (
                "deep arrays under unknown key",
                h(&format!("81 {} {deep_arrays}", s("zz"))),
            ),
        ];
        let start = std::time::Instant::now();
        for (name, bytes) in &cases {
            assert!(decode(bytes).is_err(), "{name}: decode accepted");
        }
        // The ones that are malformed msgpack, not just a malformed message.
        let raw = ["empty", "reserved c1", "deep arrays", "deep maps"];
        for (name, bytes) in &cases {
            if raw.contains(name) || name.ends_with("4GiB") {
                assert!(
                    decode_value(bytes).is_err(),
                    "{name}: decode_value accepted"
                );
            }
        }
        assert_eq!(decode_value(&h(&deep_arrays)), Err(DecodeError::TooDeep));
        assert_eq!(decode(&h("")), Err(DecodeError::Eof));
        assert_eq!(
            decode(&with_hdr(1, &format!("{} a1 31", s("proto")))),
            Err(DecodeError::WrongType {
                field: "hdr.proto",
                found: "str"
            })
        );
        assert_eq!(
            decode(&h("dd ffffffff 00")),
            Err(DecodeError::WrongType {
                field: "message",
                found: "array"
            })
        );
        assert_eq!(
            decode_value(&h("dd ffffffff 00")),
            Err(DecodeError::LengthExceedsInput(0xffff_ffff))
        );
        assert_eq!(
            decode(&with_hdr(1, &format!("{} 81 01 01", s("props")))),
            Err(DecodeError::NonStringKey)
        );
        // Deep nesting under an unknown key is skipped without recursion.
        assert!(decode(&h(&format!("81 {} {deep_arrays} 00", s("zz")))).is_ok());
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn every_truncation_is_rejected() {
        for vector in [OPEN, SHELL_NEW, CHECK_UPDATE] {
            let bytes = h(vector);
            assert!(decode(&bytes).is_ok());
            for len in 0..bytes.len() {
                assert!(decode(&bytes[..len]).is_err(), "prefix {len} of {vector}");
            }
        }
        let body = h("81a876657273696f6e739101");
        for len in 0..body.len() {
            assert!(decode_value(&body[..len]).is_err(), "prefix {len}");
        }
    }

    /// Decoding arbitrary bytes never panics, and whatever decodes re-encodes
    /// to something that decodes to the same thing.
    fn no_panic(bytes: &[u8]) {
        assert_eq!(
            format!("{:?}", decode_owned(bytes.to_vec())),
            format!("{:?}", decode(bytes))
        );
        if let Ok(msg) = decode(bytes) {
            let once = encode(&msg);
            let again = decode(&once).expect("re-decode of encoded message");
            assert_eq!(encode(&again), once);
        }
        if let Ok((v, used)) = decode_value(bytes) {
            assert!(used <= bytes.len());
            let mut once = Vec::new();
            encode_value(&v, &mut once);
            let (again, n) = decode_value(&once).expect("re-decode of encoded value");
            assert_eq!(n, once.len());
            let mut twice = Vec::new();
            encode_value(&again, &mut twice);
            assert_eq!(twice, once);
        }
    }

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        // Biased towards map/str/container markers so inputs get past the
        // first byte often enough to exercise the nested paths.
        let alphabet = h(
            "80 81 82 83 a3 a4 a5 c0 c2 c3 c4 c5 c6 cc cd ce cf d0 d3 d6 d7 d9 dc dd de df 90 91 01 ff 00 ca cb c7 c8 c9",
        );
        let keys: Vec<Vec<u8>> = ["hdr", "body", "proto", "typ", "sid", "props"]
            .iter()
            .map(|k| h(&s(k)))
            .collect();
        let mut buf = Vec::new();
        for _ in 0..200_000 {
            buf.clear();
            let len = (rng.next() % 48) as usize;
            while buf.len() < len {
                let r = rng.next();
                match r % 4 {
                    0 => buf.push(r as u8 >> 2),
                    1 => buf.push(alphabet[(r >> 8) as usize % alphabet.len()]),
                    2 => buf.extend_from_slice(&keys[(r >> 8) as usize % keys.len()]),
                    _ => buf.push((r >> 16) as u8),
                }
            }
            no_panic(&buf);
        }
    }

    #[test]
    fn mutated_vectors_never_panic() {
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        for vector in [OPEN, SHELL_NEW, CHECK_UPDATE] {
            let original = h(vector);
            for _ in 0..20_000 {
                let mut m = original.clone();
                for _ in 0..1 + rng.next() % 4 {
                    let r = rng.next();
                    let at = (r >> 8) as usize % m.len().max(1);
                    match r % 4 {
                        0 if !m.is_empty() => m[at] = (r >> 32) as u8,
                        1 if !m.is_empty() => m[at] ^= 1 << ((r >> 32) % 8),
                        2 => m.insert(at.min(m.len()), (r >> 32) as u8),
                        _ => m.truncate(at),
                    }
                }
                no_panic(&m);
            }
        }
    }
}
