//! What the device does with one inbound control message (protocol.md §2.6):
//! a pure decision, so the router only sends what it returns.

use super::codec::{PROTO_CONTROL, ProtoMsg};
use super::control::{Accept, ControlError, Open, PROTOCOL_VERSION};
use super::types::control as t;

/// What a control message asks the session to do (pure, see `control_action`).
#[derive(Debug, PartialEq)]
pub enum ControlAction {
    /// Nothing to send; the session goes on.
    Nothing,
    /// Send this and go on.
    Reply(ProtoMsg),
    /// Send this, then end the session.
    ReplyAndEnd(ProtoMsg),
    /// End the session without a reply.
    End,
}

/// A control `error` message for session `sid` (no props, protocol.md §2.6).
pub fn control_error_msg(sid: &str, err: &ControlError) -> ProtoMsg {
    ProtoMsg::new(PROTO_CONTROL, t::ERROR, sid).with_body(err.encode())
}

/// What the device does with one inbound control message (protocol.md §2.6).
pub fn control_action(msg: &ProtoMsg, protocols: &[u16]) -> ControlAction {
    let sid = msg.hdr.sid.as_str();
    let typ = msg.hdr.typ.as_str();
    let body = msg.body.as_deref().unwrap_or_default();
    let error = |err: String, close: bool| {
        let e = ControlError {
            err,
            close,
            msgproto: PROTO_CONTROL,
            msgtype: typ.to_string(),
            ..ControlError::default()
        };
        control_error_msg(sid, &e)
    };
    match typ {
        t::OPEN => match Open::decode(body) {
            Ok(open) if open.versions.contains(&PROTOCOL_VERSION) => {
                let accept = Accept {
                    version: PROTOCOL_VERSION,
                    protocols: protocols.to_vec(),
                };
                ControlAction::Reply(
                    ProtoMsg::new(PROTO_CONTROL, t::ACCEPT, sid).with_body(accept.encode()),
                )
            }
            Ok(_) => ControlAction::ReplyAndEnd(error(
                "handshake rejected: require version 1".to_string(),
                true,
            )),
            Err(e) => ControlAction::ReplyAndEnd(error(
                format!("failed to decode handshake request: {e}"),
                true,
            )),
        },
        t::ACCEPT => match Accept::decode(body) {
            Ok(a) if a.version == PROTOCOL_VERSION => ControlAction::Nothing,
            Ok(a) => ControlAction::ReplyAndEnd(error(
                format!(
                    "unsupported protocol version {}: require version 1",
                    a.version
                ),
                true,
            )),
            Err(e) => ControlAction::ReplyAndEnd(error(
                format!("malformed handshake response: {e}"),
                true,
            )),
        },
        t::PING => ControlAction::Reply(ProtoMsg::new(PROTO_CONTROL, t::PONG, sid)),
        t::PONG => ControlAction::Nothing,
        t::CLOSE => ControlAction::End,
        t::ERROR => match ControlError::decode(body) {
            Ok(e) => {
                log::warn!("session {sid}: server reported error: {}", e.err);
                if e.close {
                    ControlAction::End
                } else {
                    ControlAction::Nothing
                }
            }
            Err(e) => {
                log::warn!("session {sid}: undecodable error message: {e}");
                ControlAction::Nothing
            }
        },
        other => ControlAction::Reply(error(
            format!("session: control type message not understood: '{other}'"),
            false,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SID: &str = "3c2e6b0a-9f1d-4e8b-b7a4-5d6c7e8f9000";

    fn control(typ: &str, body: Option<Vec<u8>>) -> ProtoMsg {
        let mut m = ProtoMsg::new(PROTO_CONTROL, typ, SID);
        m.body = body;
        m
    }

    fn error_of(action: &ControlAction) -> (ControlError, bool) {
        let (msg, end) = match action {
            ControlAction::Reply(m) => (m, false),
            ControlAction::ReplyAndEnd(m) => (m, true),
            other => panic!("expected an error reply, got {other:?}"),
        };
        assert_eq!(msg.hdr.typ, "error");
        assert_eq!(msg.hdr.sid, SID);
        assert!(msg.hdr.props.is_empty());
        let body = msg.body.as_deref().unwrap_or_default();
        (ControlError::decode(body).expect("error body"), end)
    }

    #[test]
    fn open_with_version_1_is_accepted_listing_protocols() {
        let open = Open { versions: vec![1] }.encode();
        let a = control_action(&control("open", Some(open)), &[2, 3, 4]);
        let ControlAction::Reply(m) = a else {
            panic!("no reply")
        };
        assert_eq!((m.hdr.typ.as_str(), m.hdr.sid.as_str()), ("accept", SID));
        let acc = Accept::decode(m.body.as_deref().unwrap_or_default()).expect("accept");
        assert_eq!(acc.version, 1);
        assert_eq!(acc.protocols, vec![2, 3, 4]);
    }

    #[test]
    fn open_without_version_1_or_undecodable_ends_the_session() {
        for body in [
            Open { versions: vec![2] }.encode(),
            Open::default().encode(),
        ] {
            let (e, end) = error_of(&control_action(&control("open", Some(body)), &[]));
            assert!(end);
            assert_eq!(e.err, "handshake rejected: require version 1");
            assert!(e.close);
            assert_eq!((e.msgproto, e.msgtype.as_str()), (PROTO_CONTROL, "open"));
        }
        let (e, end) = error_of(&control_action(&control("open", Some(vec![0x01])), &[]));
        assert!(end && e.close);
        assert!(
            e.err.starts_with("failed to decode handshake request: "),
            "{}",
            e.err
        );
    }

    #[test]
    fn accept_with_other_version_is_an_error() {
        let body = Accept {
            version: 2,
            protocols: vec![],
        }
        .encode();
        let (e, end) = error_of(&control_action(&control("accept", Some(body)), &[]));
        assert!(end);
        assert_eq!(e.err, "unsupported protocol version 2: require version 1");
        let ok = Accept {
            version: 1,
            protocols: vec![],
        }
        .encode();
        assert_eq!(
            control_action(&control("accept", Some(ok)), &[]),
            ControlAction::Nothing
        );
        let (e, _) = error_of(&control_action(&control("accept", Some(vec![0xc1])), &[]));
        assert!(
            e.err.starts_with("malformed handshake response: "),
            "{}",
            e.err
        );
    }

    #[test]
    fn ping_pong_close_error_and_unknown() {
        let ControlAction::Reply(p) = control_action(&control("ping", None), &[]) else {
            panic!("no pong")
        };
        assert_eq!(p, ProtoMsg::new(PROTO_CONTROL, "pong", SID));
        assert_eq!(
            control_action(&control("pong", None), &[]),
            ControlAction::Nothing
        );
        assert_eq!(
            control_action(&control("close", None), &[]),
            ControlAction::End
        );
        let closing = ControlError::new("bye", true).encode();
        assert_eq!(
            control_action(&control("error", Some(closing)), &[]),
            ControlAction::End
        );
        let open = ControlError::new("meh", false).encode();
        assert_eq!(
            control_action(&control("error", Some(open)), &[]),
            ControlAction::Nothing
        );
        let (e, end) = error_of(&control_action(&control("bogus", None), &[]));
        assert!(!end && !e.close);
        assert_eq!(
            e.err,
            "session: control type message not understood: 'bogus'"
        );
        assert_eq!(e.msgtype, "bogus");
    }
}
