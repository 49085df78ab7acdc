//! The connection thread's event loop: sends what the test queued, records
//! what the device sent, keeps the server-side keepalive, and sleeps in
//! `poll` on the socket and the wake-up socket.

use super::conn::{Cmd, ConnHandle};
use super::event::{Event, Frame, Subscribers, publish};
use super::exchange::Exchange;
use super::io::Io;
use crossbeam_channel::Receiver;
use std::io::{self, Read};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Error as WsError, Message, WebSocket};

pub(super) fn is_would_block(e: &WsError) -> bool {
    matches!(e, WsError::Io(io) if io.kind() == io::ErrorKind::WouldBlock)
}

/// The connection's event loop; returns the error that ended it (`None` for
/// a clean close).
pub(super) fn run_conn(
    ws: &mut WebSocket<Io>,
    conn: &ConnHandle,
    cmds: &Receiver<Cmd>,
    wake: &UnixStream,
    socket: &TcpStream,
    ping_interval: Option<Duration>,
    subs: &Subscribers,
) -> Option<String> {
    let mut next_ping = ping_interval.map(|i| Instant::now() + i);
    loop {
        // Commands from the test.
        while let Ok(cmd) = cmds.try_recv() {
            let r = match cmd {
                Cmd::Send(m) => ws.write(m),
                Cmd::Run(f) => {
                    Exchange::run(ws, socket, f);
                    Ok(())
                }
                Cmd::Close(code, reason) => ws.close(Some(CloseFrame {
                    code: CloseCode::from(code),
                    reason: reason.into(),
                })),
            };
            match r {
                Ok(()) => {}
                Err(e) if is_would_block(&e) => {}
                // Writing after a close: nothing to do, keep reading.
                Err(WsError::AlreadyClosed) | Err(WsError::Protocol(_)) => {}
                Err(e) => return Some(e.to_string()),
            }
        }
        // Own keepalive.
        if let (Some(at), Some(i)) = (next_ping, ping_interval)
            && Instant::now() >= at
        {
            next_ping = Some(Instant::now() + i);
            if conn.0.answer_pings.load(Ordering::SeqCst) {
                let _ = ws.write(Message::Ping(b"60".to_vec().into()));
            }
        }
        match ws.flush() {
            Ok(()) => {}
            Err(e) if is_would_block(&e) => {}
            Err(WsError::ConnectionClosed) => return None,
            Err(e) => return Some(e.to_string()),
        }
        // Everything the device sent.
        loop {
            match ws.read() {
                Ok(msg) => {
                    let reset = record(conn, msg, subs);
                    if reset {
                        next_ping = ping_interval.map(|i| Instant::now() + i);
                    }
                }
                Err(e) if is_would_block(&e) => break,
                Err(WsError::ConnectionClosed) | Err(WsError::AlreadyClosed) => return None,
                Err(e) => return Some(e.to_string()),
            }
        }
        // Sleep in poll() until the device, a command or the ping timer.
        let want_write = !ws.get_ref().out.is_empty();
        let mut fds = [
            libc::pollfd {
                fd: socket.as_raw_fd(),
                events: libc::POLLIN | if want_write { libc::POLLOUT } else { 0 },
                revents: 0,
            },
            libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let timeout_ms = match next_ping {
            Some(at) => at
                .saturating_duration_since(Instant::now())
                .as_millis()
                .min(i32::MAX as u128) as i32,
            None => -1,
        };
        // SAFETY: fds is a valid array of two pollfd for the call's duration.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
        if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return Some(format!("poll: {}", io::Error::last_os_error()));
        }
        let mut buf = [0u8; 64];
        while matches!((&*wake).read(&mut buf), Ok(n) if n > 0) {}
    }
}

/// Records one message from the device; true if it was a ping or pong.
fn record(conn: &ConnHandle, msg: Message, subs: &Subscribers) -> bool {
    let id = conn.id();
    let mut ctl = false;
    // Published while the state lock is held, so whoever a wait_* wakes up
    // finds the event already in its feed.
    let mut g = conn.0.state.lock().unwrap();
    let ev = {
        match msg {
            Message::Binary(b) => {
                let frame = Frame {
                    text: false,
                    data: b.to_vec(),
                };
                g.unread.push_back(frame.clone());
                if !g.forget {
                    g.frames.push(frame.clone());
                }
                Some(Event::Frame { conn: id, frame })
            }
            Message::Text(t) => {
                let frame = Frame {
                    text: true,
                    data: t.as_bytes().to_vec(),
                };
                g.unread.push_back(frame.clone());
                if !g.forget {
                    g.frames.push(frame.clone());
                }
                Some(Event::Frame { conn: id, frame })
            }
            Message::Ping(p) => {
                ctl = true;
                g.pings.push(p.to_vec());
                Some(Event::Ping {
                    conn: id,
                    payload: p.to_vec(),
                })
            }
            Message::Pong(p) => {
                ctl = true;
                g.pongs.push(p.to_vec());
                Some(Event::Pong {
                    conn: id,
                    payload: p.to_vec(),
                })
            }
            Message::Close(cf) => {
                let (code, reason) = cf
                    .map(|c| (u16::from(c.code), c.reason.to_string()))
                    .unwrap_or((1005, String::new()));
                g.close = Some((code, reason.clone()));
                Some(Event::Close {
                    conn: id,
                    code,
                    reason,
                })
            }
            Message::Frame(_) => None,
        }
    };
    if let Some(ev) = ev {
        publish(subs, ev);
    }
    drop(g);
    conn.0.cond.notify_all();
    ctl
}
