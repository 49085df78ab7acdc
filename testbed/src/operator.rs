//! An operator's websocket to the management stand-in
//! (`…/devices/:id/connect`), speaking the shell protocol as the UI and
//! upstream's `ProtoShell` test helper do. Every call is fallible so that
//! tests can retry a whole sequence while the device is away.

use crate::management::{DEVICES_PATH, Management};
use mender_connect::wire::codec::{self, PROTO_SHELL, ProtoMsg, Value};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use tungstenite::client::IntoClientRequest;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// `status` of a normal shell reply.
pub const STATUS_NORMAL: i64 = 1;
/// `status` of an error shell reply.
pub const STATUS_ERROR: i64 = 2;

/// One operator websocket.
pub struct Operator {
    ws: WebSocket<MaybeTlsStream<TcpStream>>,
}

impl Operator {
    /// Opens the websocket (404 while the device is not connected).
    pub fn connect(mgmt: &Management) -> Result<Operator, String> {
        let url = format!(
            "{}{DEVICES_PATH}{}/connect",
            mgmt.url().replacen("http://", "ws://", 1),
            mgmt.device_id()
        );
        let mut req = url.into_client_request().map_err(|e| e.to_string())?;
        let bearer = "Bearer user-token".parse().map_err(|_| "header")?;
        req.headers_mut().insert("Authorization", bearer);
        let (ws, _) = tungstenite::connect(req).map_err(|e| format!("connect: {e}"))?;
        Ok(Operator { ws })
    }

    /// Sends a shell message of type `typ` (the stand-in sets `sid`).
    pub fn send(&mut self, typ: &str, body: &[u8]) -> Result<(), String> {
        let msg = ProtoMsg::new(PROTO_SHELL, typ, "").with_body(body.to_vec());
        self.ws
            .send(Message::binary(codec::encode(&msg)))
            .map_err(|e| format!("send: {e}"))
    }

    /// The next message before `deadline`.
    pub fn recv(&mut self, deadline: Instant) -> Result<ProtoMsg, String> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("timed out".into());
            }
            if let MaybeTlsStream::Plain(s) = self.ws.get_ref() {
                s.set_read_timeout(Some(left.min(Duration::from_millis(500))))
                    .map_err(|e| e.to_string())?;
            }
            match self.ws.read() {
                Ok(Message::Binary(b)) => {
                    return codec::decode(&b).map_err(|e| format!("decode: {e}"));
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    /// `ProtoShell.startShell` / `stopShell`: sends `typ` and returns the
    /// reply, which must be a shell message of that type.
    pub fn request(&mut self, typ: &str, timeout: Duration) -> Result<ProtoMsg, String> {
        self.send(typ, b"")?;
        let deadline = Instant::now() + timeout;
        let mut failed = None;
        let m = crate::next_matching(
            timeout,
            |_| self.recv(deadline).map_err(|e| failed = Some(e)).ok(),
            // output the shell wrote before the request (a prompt after the
            // last command) may still be on its way
            |m| typ == "shell" || m.hdr.typ != "shell" || status(m) != Some(STATUS_NORMAL),
        )
        .ok_or_else(|| failed.unwrap_or_else(|| "timed out".into()))?;
        if m.hdr.proto != PROTO_SHELL || m.hdr.typ != typ {
            return Err(format!("expected a {typ} reply, got {m:?}"));
        }
        Ok(m)
    }

    /// Shell output (all with status normal) until `done(output so far)`.
    pub fn output_until(
        &mut self,
        timeout: Duration,
        done: impl Fn(&str) -> bool,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            let s = String::from_utf8_lossy(&out).into_owned();
            if done(&s) {
                return Ok(s);
            }
            let m = self
                .recv(deadline)
                .map_err(|e| format!("{e} waiting for output; got {s:?}"))?;
            if m.hdr.typ != "shell" || status(&m) != Some(STATUS_NORMAL) {
                return Err(format!("not normal shell output: {m:?}"));
            }
            out.extend_from_slice(m.body.as_deref().unwrap_or_default());
        }
    }
}

/// The `status` property of a shell message.
pub fn status(m: &ProtoMsg) -> Option<i64> {
    m.prop("status").and_then(Value::as_i64)
}

/// Whether shell output ends with a prompt (`# ` or `$ `).
pub fn prompt(out: &str) -> bool {
    out.ends_with("# ") || out.ends_with("$ ")
}
