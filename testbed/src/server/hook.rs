//! Requests other than the device connect path, handed to an [`HttpHook`]
//! (the management API stand-in hooks in here), and websockets upgraded from
//! them.

use super::MAX_MESSAGE_SIZE;
use super::conn::{Cmd, ConnHandle, conn_ended, conn_parts};
use super::conn_loop::run_conn;
use super::event::{Subscribers, UpgradeRequest};
use super::io::Io;
use crossbeam_channel::Receiver;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;
use tungstenite::WebSocket;
use tungstenite::protocol::WebSocketConfig;

/// Largest request head [`HttpHook`] requests may have.
const MAX_HEAD: usize = 64 * 1024;

/// Handles every request whose path is not the device connect path, on the
/// connection's own thread (`ws-conn-N`), once set with
/// [`Server::set_http_hook`](super::Server::set_http_hook). It owns the stream: whatever it does not answer
/// goes unanswered.
#[derive(Clone)]
pub struct HttpHook(pub Arc<dyn Fn(HttpRequest, HttpStream) + Send + Sync>);

impl std::fmt::Debug for HttpHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpHook")
    }
}

/// A parsed HTTP request head.
#[derive(Debug, Clone)]
pub struct HttpRequest {
    /// `GET`, `PUT`, …
    pub method: String,
    /// Request target as sent (path and query).
    pub target: String,
    /// Path (without query).
    pub path: String,
    /// Raw query string (without `?`; empty when none).
    pub query: String,
    /// Headers in wire order; names lower-case.
    pub headers: Vec<(String, String)>,
}

impl HttpRequest {
    pub(super) fn parse(head: &[u8]) -> Option<HttpRequest> {
        let text = std::str::from_utf8(head).ok()?;
        let mut lines = text.split("\r\n");
        let mut first = lines.next()?.split(' ');
        let method = first.next()?.to_string();
        let target = first.next()?.to_string();
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p.to_string(), q.to_string()),
            None => (target.clone(), String::new()),
        };
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        Some(HttpRequest {
            method,
            target,
            path,
            query,
            headers,
        })
    }

    /// First value of a header (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads until the end of a request head; returns (head, bytes after it).
pub(super) fn read_head(io: &mut Io) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(i + 4);
            return Some((buf, rest));
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
        match io.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

/// The connection of a request handed to an [`HttpHook`]: reads return the
/// body bytes (after the head), writes go to the client. Blocking, with the
/// handshake deadline on every read and write until changed.
pub struct HttpStream {
    pub(super) io: Io,
    pub(super) head: Vec<u8>,
    pub(super) socket: TcpStream,
    pub(super) request: HttpRequest,
}

impl HttpStream {
    /// Sets the per-read/per-write deadline (`None` = wait forever).
    pub fn set_timeout(&self, t: Option<Duration>) {
        let _ = self.socket.set_read_timeout(t);
        let _ = self.socket.set_write_timeout(t);
    }

    /// Completes a websocket upgrade of this request (101, or an error
    /// answer and `None`). The returned handle works like a device
    /// connection's but belongs to no server list and publishes no events;
    /// the connection lives while [`WsDriver::run`] runs.
    pub fn into_websocket(mut self) -> Option<(ConnHandle, WsDriver)> {
        let rest = std::mem::take(&mut self.io.pending);
        self.io.pending = [std::mem::take(&mut self.head), rest].concat();
        let config = WebSocketConfig::default().max_message_size(Some(MAX_MESSAGE_SIZE));
        let mut ws = tungstenite::accept_with_config(self.io, Some(config)).ok()?;
        let request = UpgradeRequest {
            path: self.request.path.clone(),
            uri: self.request.target.clone(),
            headers: self.request.headers.clone(),
            status: 101,
        };
        let pings = Arc::new(AtomicBool::new(true));
        let (conn, cmds, wake) = conn_parts(0, request, &self.socket, pings)?;
        ws.get_mut().filtering = true;
        Some((
            conn.clone(),
            WsDriver {
                ws,
                conn,
                cmds,
                wake,
                socket: self.socket,
            },
        ))
    }
}

impl Read for HttpStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.io.read(buf)
    }
}

impl Write for HttpStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.io.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.io.flush()
    }
}

/// Runs the event loop of a websocket made by [`HttpStream::into_websocket`].
pub struct WsDriver {
    ws: WebSocket<Io>,
    conn: ConnHandle,
    cmds: Receiver<Cmd>,
    wake: UnixStream,
    socket: TcpStream,
}

impl WsDriver {
    /// Serves the connection on the calling thread until it is gone.
    pub fn run(mut self) {
        let subs = Subscribers::default();
        let error = run_conn(
            &mut self.ws,
            &self.conn,
            &self.cmds,
            &self.wake,
            &self.socket,
            None,
            &subs,
        );
        drop(self.ws);
        conn_ended(&self.conn, error, &subs);
    }
}
