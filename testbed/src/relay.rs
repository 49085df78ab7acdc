//! A port-forward relay that does no work: the machine's ceiling for the
//! client→device round trip. It connects to the stand-in server as a device
//! would and answers every binary message with one pre-encoded `ack`, then
//! writes the message's trailing body bytes to the target. No msgpack, no
//! routing, no sessions, no threads but its own: what is left is the
//! websocket and the syscalls, so no daemon should be much faster over the
//! same client on the same machine (within noise one can match it: when
//! the round trip is all wake-ups, less work buys nothing).
//!
//! Every message is taken for a `forward` whose body is its last `body`
//! bytes (msgpack puts ours last): the bench sends whole chunks only, and
//! its sink's pattern check would catch anything else.

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::thread::JoinHandle;

use mender_connect::wire::codec::{self, PROTO_PORTFORWARD, ProtoMsg, Value};
use tungstenite::{Bytes, Message};

use crate::CONNECT_PATH;

/// The relay thread's name (for its CPU time in /proc).
pub const THREAD: &str = "ideal-relay";

/// The relay's thread; it ends when the server closes the connection, or
/// when the relay is dropped (which shuts its socket down first).
pub struct Relay {
    thread: Option<JoinHandle<Result<u64, String>>>,
    socket: TcpStream,
}

/// The `ack` the relay answers every message with, as a daemon would for a
/// `forward` on `sid`/`cid`.
pub fn ack_frame(sid: &str, cid: &str) -> Bytes {
    let msg = ProtoMsg::new(PROTO_PORTFORWARD, "ack", sid)
        .with_prop("connection_id", Value::Str(cid.to_string()));
    codec::encode(&msg).into()
}

impl Relay {
    /// Connects to the stand-in server at `port` and relays every binary
    /// message's last `body` bytes to `target`, answering each with `ack`.
    pub fn start(port: u16, target: SocketAddr, ack: Bytes, body: usize) -> Relay {
        let tcp = TcpStream::connect(("127.0.0.1", port)).expect("the relay connects");
        let socket = tcp.try_clone().expect("clone the relay's socket");
        let thread = std::thread::Builder::new()
            .name(THREAD.into())
            .spawn(move || relay(tcp, port, target, ack, body))
            .expect("spawn the relay");
        Relay {
            thread: Some(thread),
            socket,
        }
    }

    /// Waits for the relay to end (stop the server first); returns the
    /// bytes it wrote to the target.
    pub fn join(mut self) -> Result<u64, String> {
        self.thread
            .take()
            .map_or(Ok(0), |t| t.join().map_err(|_| "relay panicked")?)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // A bench that fails half-way drops the relay while the server
        // still holds the connection open: end the blocked read first.
        if let Some(t) = self.thread.take() {
            let _ = self.socket.shutdown(Shutdown::Both);
            let _ = t.join();
        }
    }
}

fn relay(
    tcp: TcpStream,
    port: u16,
    target: SocketAddr,
    ack: Bytes,
    body: usize,
) -> Result<u64, String> {
    let _ = tcp.set_nodelay(true);
    let url = format!("ws://127.0.0.1:{port}{CONNECT_PATH}");
    let (mut ws, _) =
        tungstenite::client::client(url, tcp).map_err(|e| format!("handshake: {e}"))?;
    let mut out = TcpStream::connect(target).map_err(|e| format!("target: {e}"))?;
    let _ = out.set_nodelay(true);
    let mut wrote = 0u64;
    loop {
        // a ping's pong is queued by tungstenite and sent by the next read
        let data = match ws.read() {
            Ok(Message::Binary(b)) => b,
            Ok(_) => continue,
            Err(_) => return Ok(wrote),
        };
        ws.send(Message::Binary(ack.clone()))
            .map_err(|e| format!("ack: {e}"))?;
        let from = data.len().saturating_sub(body);
        out.write_all(&data[from..])
            .map_err(|e| format!("target write: {e}"))?;
        wrote += (data.len() - from) as u64;
    }
}
