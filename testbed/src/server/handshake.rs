//! One TCP connection from accept to hang-up: TLS and websocket handshakes
//! (rejects and wrong paths answered, requests for an [`HttpHook`](super::HttpHook) handed
//! over), then the connection's event loop on this thread.

use super::conn::{conn_ended, conn_parts};
use super::conn_loop::run_conn;
use super::event::{Event, UpgradeRequest, publish};
use super::hook::{HttpRequest, HttpStream, read_head};
use super::io::{FilterState, Inner, Io};
use super::listener::ServerShared;
use super::{HANDSHAKE_TIMEOUT, MAX_MESSAGE_SIZE};
use crate::CONNECT_PATH;
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::protocol::WebSocketConfig;

fn error_response(status: u16, body: Option<String>) -> ErrorResponse {
    let mut b = tungstenite::http::Response::builder().status(status);
    if body.is_some() {
        b = b.header("Content-Type", "application/json; charset=utf-8");
    }
    b.body(body).expect("valid response")
}

/// Ends a connection for good when its thread returns, whatever the path:
/// the socket is shut down (other fds may still refer to it) and forgotten.
struct ConnGuard {
    seq: usize,
    socket: TcpStream,
    shared: Arc<ServerShared>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let _ = self.socket.shutdown(Shutdown::Both);
        let mut g = self.shared.state.lock().unwrap();
        g.sockets.retain(|(seq, _)| *seq != self.seq);
    }
}

// The handshake callback's error type is fixed by tungstenite.
#[allow(clippy::result_large_err)]
pub(super) fn handle_conn(
    seq: usize,
    tcp: TcpStream,
    shared: Arc<ServerShared>,
    tls: Option<Arc<native_tls::TlsAcceptor>>,
) {
    let Ok(guard_socket) = tcp.try_clone() else {
        return;
    };
    let _guard = ConnGuard {
        seq,
        socket: guard_socket,
        shared: shared.clone(),
    };
    let _ = tcp.set_nodelay(true);
    let _ = tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let _ = tcp.set_write_timeout(Some(HANDSHAKE_TIMEOUT));
    let Ok(socket) = tcp.try_clone() else { return };
    let inner = match tls {
        Some(acc) => match acc.accept(tcp) {
            Ok(s) => Inner::Tls(Box::new(s)),
            Err(_) => return,
        },
        None => Inner::Plain(tcp),
    };
    let answer_pings = Arc::new(AtomicBool::new(shared.answer_pings.load(Ordering::SeqCst)));
    let mut io = Io {
        inner,
        pending: Vec::new(),
        out: Vec::new(),
        filtering: false,
        filter: FilterState::Header(Vec::new()),
        answer_pings: answer_pings.clone(),
    };
    let (reject, ping_interval, hook) = {
        let g = shared.state.lock().unwrap();
        (g.reject.clone(), g.ping_interval, g.http_hook.clone())
    };
    // With a hook, peek at the request head: the device's connect path goes
    // on to the websocket handshake below (the head replayed), anything else
    // belongs to the hook.
    if let Some(hook) = hook {
        let Some((head, rest)) = read_head(&mut io) else {
            return;
        };
        match HttpRequest::parse(&head) {
            Some(request) if request.path != CONNECT_PATH => {
                io.pending = rest;
                let stream = HttpStream {
                    io,
                    head,
                    socket,
                    request: request.clone(),
                };
                (hook.0)(request, stream);
                return;
            }
            _ => io.pending = [head, rest].concat(),
        }
    }
    let mut captured: Option<UpgradeRequest> = None;
    let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        let path = req.uri().path().to_string();
        let headers = req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_ascii_lowercase(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let (status, body) = if path != CONNECT_PATH {
            (404, Some("{\"error\":\"not found\"}".to_string()))
        } else if let Some((s, body)) = reject {
            (s, body)
        } else {
            (101, None)
        };
        let request = UpgradeRequest {
            path,
            uri: req.uri().to_string(),
            headers,
            status,
        };
        // Recorded before the response goes out, so attempts are in the
        // order the client saw the answers.
        {
            let mut g = shared.state.lock().unwrap();
            g.attempts.push(request.clone());
            if status != 101 {
                publish(
                    &shared.subscribers,
                    Event::Upgrade {
                        conn: None,
                        request: request.clone(),
                    },
                );
            }
        }
        shared.cond.notify_all();
        captured = Some(request);
        if status == 101 {
            Ok(resp)
        } else {
            Err(error_response(status, body))
        }
    };
    let config = WebSocketConfig::default().max_message_size(Some(MAX_MESSAGE_SIZE));
    // `.ok()` drops the error (which holds the callback) so `captured` is free.
    let result = tungstenite::accept_hdr_with_config(io, callback, Some(config)).ok();
    let Some(request) = captured else { return };

    let Some(mut ws) = result else { return };

    let conn = {
        let mut g = shared.state.lock().unwrap();
        let Some((conn, cmd_rx, wake_rx)) =
            conn_parts(g.conns.len(), request.clone(), &socket, answer_pings)
        else {
            return;
        };
        ws.get_mut().filtering = true;
        g.conns.push(conn.clone());
        publish(
            &shared.subscribers,
            Event::Upgrade {
                conn: Some(conn.id()),
                request,
            },
        );
        (conn, cmd_rx, wake_rx)
    };
    let (conn, cmd_rx, wake_rx) = conn;
    shared.cond.notify_all();

    let error = run_conn(
        &mut ws,
        &conn,
        &cmd_rx,
        &wake_rx,
        &socket,
        ping_interval,
        &shared.subscribers,
    );
    drop(ws);
    conn_ended(&conn, error, &shared.subscribers);
}
