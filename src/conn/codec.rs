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
        self.go_uint()
            .map(|n| n as i64)
            .map_err(|e| match e {
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

    /// Go's string/[]byte decoding: str or bin, nil as absent.
    pub(crate) fn go_bytes(&mut self) -> Result<Option<&'a [u8]>, DecodeError> {
        match self.peek_kind()? {
            Kind::Nil | Kind::Str | Kind::Bin => match self.head()? {
                Head::Str(s) | Head::Bin(s) => Ok(Some(s)),
                _ => Ok(None),
            },
            _ => Err(self.mismatch("string/bytes length")),
        }
    }

    /// Go's `DecodeString`, with invalid UTF-8 replaced rather than rejected.
    pub(crate) fn go_string(&mut self) -> Result<String, DecodeError> {
        Ok(self
            .go_bytes()?
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .unwrap_or_default())
    }

    /// Go's `DecodeMapLen`: `None` for nil.
    pub(crate) fn go_map_len(&mut self) -> Result<Option<usize>, DecodeError> {
        match self.peek_kind()? {
            Kind::Nil | Kind::Map => match self.head()? {
                Head::Map(n) => Ok(Some(n)),
                _ => Ok(None),
            },
            _ => Err(self.mismatch("map length")),
        }
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
    for _ in 0..n {
        match r.key()? {
            b"hdr" => decode_hdr(&mut r, &mut msg.hdr)?,
            b"body" => {
                msg.body = r.go_bytes().map_err(in_field("body"))?.map(<[u8]>::to_vec);
            }
            _ => r.skip()?,
        }
    }
    // Trailing bytes are ignored, as Go's Unmarshal does.
    Ok(msg)
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
