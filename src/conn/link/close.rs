//! Ending a websocket politely: a close frame with the right code, a short
//! grace for it to leave, then the TCP connection closed.

use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use tungstenite::WebSocket;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;

use crate::conn::dial::Stream;
use crate::sys::poll::poll_one;

/// How long a graceful close may take before the socket is just dropped.
const CLOSE_GRACE: Duration = Duration::from_millis(500);

/// Whether a websocket error only means the non-blocking socket is not ready.
pub(super) fn is_would_block(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io) if io.kind() == io::ErrorKind::WouldBlock)
}

/// Ends the link after `ws.read()` returned the server's close (`error` is
/// `None`) or failed with `error`. Public so the Autobahn conformance client
/// (`examples/wsclient.rs`) ends its links through this very code.
pub fn end_after_read(ws: &mut WebSocket<Stream>, error: Option<&tungstenite::Error>) {
    match error.and_then(failure_code) {
        // RFC 6455 §7.1.7: a failed connection SHOULD get a close frame with
        // the reason first; tungstenite leaves that to us.
        Some(code) => close_with(ws, code),
        None => {
            // tungstenite queued the reply to the server's close
            let _ = ws.flush();
            ws.get_ref().shutdown();
        }
    }
}

/// The close code for a read error that fails the connection (§7.4.1), or
/// `None` when the transport itself is gone.
fn failure_code(e: &tungstenite::Error) -> Option<CloseCode> {
    match e {
        // over MAX_INBOUND_MESSAGE
        tungstenite::Error::Capacity(_) => Some(CloseCode::Size),
        tungstenite::Error::Utf8(_) => Some(CloseCode::Invalid),
        tungstenite::Error::Protocol(_) => Some(CloseCode::Protocol),
        _ => None,
    }
}

pub(super) fn close_gracefully(ws: &mut WebSocket<Stream>) {
    close_with(ws, CloseCode::Normal);
}

/// Sends a close frame with `code`, gives it `CLOSE_GRACE` to leave, then
/// closes the TCP connection.
fn close_with(ws: &mut WebSocket<Stream>, code: CloseCode) {
    let _ = ws.close(Some(CloseFrame {
        code,
        reason: "".into(),
    }));
    let deadline = Instant::now() + CLOSE_GRACE;
    let sock = ws.get_ref().as_raw_fd();
    loop {
        match ws.flush() {
            Ok(()) => break,
            Err(e) if is_would_block(&e) => {}
            Err(_) => break,
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let _ = poll_one(sock, libc::POLLOUT, left.as_millis().max(1) as i32);
    }
    ws.get_ref().shutdown();
}
