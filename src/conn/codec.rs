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
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated => write!(f, "msgpack: unexpected end of input"),
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

/// Encodes a message exactly as the Go reference does (protocol.md §2.2).
pub fn encode(msg: &ProtoMsg) -> Vec<u8> {
    let _ = msg;
    unimplemented!("codec helper")
}

/// Decodes one message; never panics and never allocates more than the input
/// can justify.
pub fn decode(bytes: &[u8]) -> Result<ProtoMsg, DecodeError> {
    let _ = bytes;
    unimplemented!("codec helper")
}
