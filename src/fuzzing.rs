//! Entry points for the fuzz targets in `fuzz/`: each takes arbitrary bytes,
//! runs one family of the daemon's parsers on them and panics only when an
//! invariant (round-trip stability) is broken. Not part of the daemon's API.

use std::path::Path;

use crate::conn::codec::{self, ProtoMsg};
use crate::conn::control::{self, Accept, ControlError, Open};
use crate::sessions::filetransfer::wire::{self, Request};
use crate::sessions::portforward::parse_new;

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

/// The configuration file parser, bytes as the file's content.
pub fn config(data: &[u8]) {
    let _ = crate::config::parse(Path::new("fuzz.conf"), data);
}
