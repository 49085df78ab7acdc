//! Autobahn (kosoku `fuzzingserver`) echo client built on the daemon's own
//! websocket code: `conn::dial::dial` with `ws_config()`, a non-blocking
//! socket read the way the connection thread reads it, and the connection
//! thread's own ending of a link (`conn::link::end_after_read`). Only the
//! echo is added, because the Autobahn client protocol needs it.
//!
//! ```text
//! kosoku -m fuzzingserver 127.0.0.1:9001 &
//! cargo run --example wsclient -- ws://127.0.0.1:9001 mender-connect
//! ```
//!
//! Messages longer than the daemon's largest outbound frame are echoed as
//! fragments of that size: the daemon's write buffer is capped well below
//! the 16 MiB some cases send (design.md).

use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use mender_connect::testing::{Endpoint, Stream, dial, end_after_read, poll_one, url};
use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::{Bytes, Message, WebSocket};

/// Echoed fragments are at most this long (the daemon's largest frame).
const FRAGMENT: usize = 64 * 1024;
/// A case that makes no progress for this long is abandoned.
const STALL: Duration = Duration::from_secs(60);

fn main() {
    let mut args = std::env::args().skip(1);
    let base = args
        .next()
        .unwrap_or_else(|| "ws://127.0.0.1:9001".to_string());
    let agent = args.next().unwrap_or_else(|| "mender-connect".to_string());
    if let Err(e) = run(&base, &agent) {
        eprintln!("wsclient: {e}");
        std::process::exit(1);
    }
}

fn run(base: &str, agent: &str) -> Result<(), String> {
    let count = {
        let mut ws = open(base, "/getCaseCount")?;
        let text = match ws.read() {
            Ok(Message::Text(t)) => t.to_string(),
            other => return Err(format!("getCaseCount: unexpected {other:?}")),
        };
        let _ = ws.close(None);
        while ws.read().is_ok() {}
        text.trim()
            .parse::<u32>()
            .map_err(|e| format!("getCaseCount: {text:?}: {e}"))?
    };
    eprintln!("wsclient: {count} cases");
    for case in 1..=count {
        let mut ws = open(base, &format!("/runCase?case={case}&agent={agent}"))?;
        match echo(&mut ws) {
            Ok(why) => eprintln!("wsclient: case {case}: {why}"),
            Err(e) => eprintln!("wsclient: case {case}: {e}"),
        }
    }
    let mut ws = open(base, &format!("/updateReports?agent={agent}"))?;
    let _ = ws.close(None);
    while ws.read().is_ok() {}
    Ok(())
}

/// Dials `base` + `path` exactly as the daemon dials deviceconnect.
fn open(base: &str, path: &str) -> Result<WebSocket<Stream>, String> {
    let ep = url::endpoint(base).map_err(|e| e.to_string())?;
    let authority = base
        .split_once("://")
        .map(|(_, rest)| rest.split('/').next().unwrap_or(""))
        .unwrap_or("");
    let scheme = if ep.tls { "wss" } else { "ws" };
    let ep = Endpoint {
        url: format!("{scheme}://{authority}{path}"),
        ..ep
    };
    dial::dial(&ep, "autobahn", &Default::default()).map_err(|e| format!("dial {}: {e}", ep.url))
}

fn would_block(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io) if io.kind() == io::ErrorKind::WouldBlock)
}

/// Runs one case: echoes every message until the link ends, then ends it the
/// way the daemon's connection thread does.
fn echo(ws: &mut WebSocket<Stream>) -> Result<String, String> {
    ws.get_mut()
        .set_nonblocking(true)
        .map_err(|e| e.to_string())?;
    let sock = ws.get_ref().as_raw_fd();
    let mut progress = Instant::now();
    loop {
        let result = ws.read();
        let outcome = match result {
            Ok(Message::Text(t)) => {
                send(ws, Data::Text, Bytes::from(t))?;
                None
            }
            Ok(Message::Binary(b)) => {
                send(ws, Data::Binary, b)?;
                None
            }
            Ok(Message::Ping(_)) | Ok(Message::Pong(_)) | Ok(Message::Frame(_)) => None,
            Err(ref e) if would_block(e) => {
                // pongs and close replies queued by read() go out here
                match ws.flush() {
                    Ok(()) => {}
                    Err(e) if would_block(&e) => {}
                    Err(e) => return Err(format!("flush: {e}")),
                }
                if progress.elapsed() > STALL {
                    return Err("stalled".to_string());
                }
                let _ = poll_one(sock, libc::POLLIN, 1000);
                continue;
            }
            other => Some(other),
        };
        progress = Instant::now();
        if let Some(end) = outcome {
            let text = match &end {
                Ok(m) => format!("{m:?}"),
                Err(e) => e.to_string(),
            };
            end_after_read(ws, end.as_ref().err());
            return Ok(text);
        }
    }
}

/// Writes one message, fragmented past `FRAGMENT`, waiting for the socket
/// whenever tungstenite's (deliberately small) write buffer is full.
fn send(ws: &mut WebSocket<Stream>, kind: Data, payload: Bytes) -> Result<(), String> {
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut at = 0;
    while at < payload.len() || chunks.is_empty() {
        let end = (at + FRAGMENT).min(payload.len());
        chunks.push(payload.slice(at..end));
        at = end;
    }
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.into_iter().enumerate() {
        let op = if i == 0 {
            OpCode::Data(kind)
        } else {
            OpCode::Data(Data::Continue)
        };
        let mut msg = Message::Frame(Frame::message(chunk, op, i == last));
        loop {
            match ws.write(msg) {
                Ok(()) => break,
                Err(e) if would_block(&e) => break, // buffered; flushed below
                Err(tungstenite::Error::WriteBufferFull(m)) => {
                    msg = *m;
                    flush_blocking(ws)?;
                }
                Err(e) => return Err(format!("write: {e}")),
            }
        }
    }
    flush_blocking(ws)
}

fn flush_blocking(ws: &mut WebSocket<Stream>) -> Result<(), String> {
    let sock = ws.get_ref().as_raw_fd();
    let deadline = Instant::now() + STALL;
    loop {
        match ws.flush() {
            Ok(()) => return Ok(()),
            Err(e) if would_block(&e) => {}
            Err(e) => return Err(format!("flush: {e}")),
        }
        if Instant::now() > deadline {
            return Err("flush stalled".to_string());
        }
        let _ = poll_one(sock, libc::POLLOUT, 1000);
    }
}
