//! A borrowed look at a `ProtoMsg`: its header strings and body as slices of
//! the frame, read without one allocation. The connection thread's fast path
//! decides on it: a port-forward `forward` needs only its type, session,
//! `connection_id` and body, not the owned strings and property map of a
//! full decode (about 0.1 µs a frame saved, measured; the larger cost was
//! the reader itself, see `Reader::go_bytes`).
//!
//! It covers the plain shapes peers send: each of `hdr`, `body` and the
//! header's fields at most once, strings in valid UTF-8, properties with
//! scalar, string or binary values. For anything else it says `None`, and
//! the message takes the full decode, which alone reports errors. Where it
//! says `Some`, every field equals what [`codec::decode`](super::codec::decode)
//! gives (checked by the tests here and by the codec fuzz target).

use super::codec::{Kind, Reader};

/// A message's header fields and body, borrowed from its bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MsgView<'a> {
    /// Which protocol the message belongs to.
    pub proto: u16,
    /// Protocol-specific message type ("" when absent).
    pub typ: &'a str,
    /// Session id ("" when absent).
    pub sid: &'a str,
    /// The properties map: its entry count and the bytes of its entries,
    /// already checked to be well-formed.
    props: Option<(usize, &'a [u8])>,
    /// The body; `None` when absent or nil.
    pub body: Option<&'a [u8]>,
}

/// Looks at `bytes` as a message; `None` unless it has the plain shape
/// described in the module comment.
pub fn view(bytes: &[u8]) -> Option<MsgView<'_>> {
    let mut r = Reader::new(bytes);
    let n = r.go_map_len().ok()??;
    let mut v = MsgView {
        proto: 0,
        typ: "",
        sid: "",
        props: None,
        body: None,
    };
    let (mut hdr, mut body) = (false, false);
    for _ in 0..n {
        match r.key().ok()? {
            b"hdr" if !std::mem::replace(&mut hdr, true) => header(bytes, &mut r, &mut v)?,
            b"body" if !std::mem::replace(&mut body, true) => v.body = r.go_bytes().ok()?,
            b"hdr" | b"body" => return None,
            _ => r.skip().ok()?,
        }
    }
    Some(v)
}

/// Reads the `hdr` map into `v`; a nil header leaves the defaults, as the
/// full decode does.
fn header<'a>(whole: &'a [u8], r: &mut Reader<'a>, v: &mut MsgView<'a>) -> Option<()> {
    let Some(n) = r.go_map_len().ok()? else {
        return Some(());
    };
    let mut seen = [false; 4];
    for _ in 0..n {
        let key = r.key().ok()?;
        let field = ["proto", "typ", "sid", "props"]
            .iter()
            .position(|f| f.as_bytes() == key);
        if let Some(i) = field
            && std::mem::replace(&mut seen[i], true)
        {
            return None;
        }
        match field {
            // truncated to 16 bits, as the full decode does
            Some(0) => v.proto = r.go_uint().ok()? as u16,
            Some(1) => v.typ = text(r)?,
            Some(2) => v.sid = text(r)?,
            Some(_) => v.props = props(whole, r)?,
            None => r.skip().ok()?,
        }
    }
    Some(())
}

/// A header string: str, bin or nil (""), in valid UTF-8.
fn text<'a>(r: &mut Reader<'a>) -> Option<&'a str> {
    match r.go_bytes().ok()? {
        Some(b) => std::str::from_utf8(b).ok(),
        None => Some(""),
    }
}

/// Checks the `props` map and returns where its entries are (`Some(None)`
/// for nil, which the full decode reads as no properties).
fn props<'a>(whole: &'a [u8], r: &mut Reader<'a>) -> Option<Option<(usize, &'a [u8])>> {
    let Some(n) = r.go_map_len().ok()? else {
        return Some(None);
    };
    let start = whole.len() - r.remaining();
    for _ in 0..n {
        std::str::from_utf8(r.key().ok()?).ok()?;
        match r.peek_kind().ok()? {
            Kind::Str => {
                std::str::from_utf8(r.go_bytes().ok()??).ok()?;
            }
            Kind::Nil | Kind::Bool | Kind::Int | Kind::Float | Kind::Bin => r.skip().ok()?,
            _ => return None,
        }
    }
    let end = whole.len() - r.remaining();
    Some(Some((n, whole.get(start..end)?)))
}

impl<'a> MsgView<'a> {
    /// The property `key` if it is a string, as
    /// [`ProtoMsg::prop_str`](super::codec::ProtoMsg::prop_str) gives it (the
    /// last of repeated keys wins).
    pub fn prop_str(&self, key: &str) -> Option<&'a str> {
        let (n, bytes) = self.props?;
        let mut r = Reader::new(bytes);
        let mut found = None;
        for _ in 0..n {
            let k = r.key().ok()?;
            let is_str = r.peek_kind().ok()? == Kind::Str;
            if k == key.as_bytes() && is_str {
                // checked to be UTF-8 by `view`
                found = r.go_bytes().ok()?.and_then(|s| std::str::from_utf8(s).ok());
            } else {
                if k == key.as_bytes() {
                    found = None;
                }
                r.skip().ok()?;
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::codec::testhex::h;
    use crate::wire::codec::{self, PROTO_PORTFORWARD, ProtoMsg, Value};

    /// What the view says of `bytes`, checked against the full decode.
    fn checked(bytes: &[u8]) -> Option<MsgView<'_>> {
        let v = view(bytes)?;
        crate::fuzzing::assert_view_agrees(bytes, &v);
        Some(v)
    }

    fn forward() -> ProtoMsg {
        ProtoMsg::new(PROTO_PORTFORWARD, "forward", "sid-1")
            .with_prop("connection_id", Value::Str("c1".into()))
            .with_prop("user_id", Value::Str("u".into()))
            .with_body(vec![7; 4096])
    }

    #[test]
    fn a_forward_is_seen_with_its_header_properties_and_body_in_place() {
        let bytes = codec::encode(&forward());
        let v = checked(&bytes).expect("plain shape");
        assert_eq!(
            (v.proto, v.typ, v.sid),
            (PROTO_PORTFORWARD, "forward", "sid-1")
        );
        assert_eq!(v.prop_str("connection_id"), Some("c1"));
        assert_eq!(v.prop_str("missing"), None);
        let body = v.body.expect("body");
        assert_eq!(body, &[7; 4096][..]);
        // borrowed from the frame, not copied
        assert!(bytes.as_ptr_range().contains(&body.as_ptr()));
    }

    #[test]
    fn every_reference_vector_that_it_sees_agrees_with_the_full_decode() {
        let all: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/data/vectors.json"))
                .expect("vectors.json");
        let mut seen = 0;
        for v in all.as_array().expect("a list") {
            let bytes = h(v["hex"].as_str().expect("hex"));
            if checked(&bytes).is_some() {
                seen += 1;
            }
        }
        assert!(seen >= 10, "only {seen} vectors seen");
    }

    #[test]
    fn unusual_shapes_are_left_to_the_full_decode() {
        // nil message, duplicate hdr, duplicate typ, a map-valued property,
        // a header string in invalid UTF-8: the view declines each (the
        // router then decodes it in full, or reports why it cannot)
        for hex in [
            "c0",
            "82 a3686472 80 a3686472 80",
            "81 a3686472 82 a3747970 a161 a3747970 a162",
            "81 a3686472 81 a570726f7073 81 a161 80",
            "81 a3686472 81 a3736964 a2 ff fe",
        ] {
            assert_eq!(view(&h(hex)), None, "{hex}");
        }
    }

    #[test]
    fn nil_and_missing_parts_read_as_the_full_decode_reads_them() {
        for hex in [
            // empty message, nil hdr, nil props, nil body, bin typ
            "80",
            "81 a3686472 c0",
            "81 a3686472 81 a570726f7073 c0",
            "81 a4626f6479 c0",
            "81 a3686472 82 a3747970 c4 01 61 a570726f746f cd 0103",
            // a repeated property: the last wins, a non-string one hides it
            "81 a3686472 81 a570726f7073 82 a163 a178 a163 a179",
            "81 a3686472 81 a570726f7073 82 a163 a178 a163 01",
        ] {
            assert!(checked(&h(hex)).is_some(), "{hex}");
        }
        let hidden = h("81 a3686472 81 a570726f7073 82 a163 a178 a163 01");
        let v = view(&hidden).expect("view");
        assert_eq!(v.prop_str("c"), None);
    }
}
