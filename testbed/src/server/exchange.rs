//! A client that runs on the connection's own thread (see
//! [`ConnHandle::exchange`](super::ConnHandle::exchange)): a round trip
//! costs no thread hand-off, so a bench sees the daemon's share.

use super::conn_loop::is_would_block;
use super::io::Io;
use mender_connect::wire::codec::{self, ProtoMsg};
use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};
use tungstenite::{Bytes, Message, WebSocket};

/// The websocket lent to a closure on the connection's own thread, for a
/// client that waits for each reply (mender-cli's port forward): sending and
/// receiving there costs no thread hand-off per round trip. Messages read
/// here are not recorded (`frames`, `recv*`, subscribers); pings from the
/// device are answered as usual.
pub struct Exchange<'a> {
    pub(super) ws: &'a mut WebSocket<Io>,
    pub(super) socket: &'a TcpStream,
}

/// How long one blocking read or write may wait before the deadline is
/// looked at.
const IO_SLICE: Duration = Duration::from_millis(200);

impl<'a> Exchange<'a> {
    /// Runs `f` with the socket in blocking mode: a reply is waited for in
    /// `read` itself (one syscall, not a read that says EAGAIN, a poll and
    /// a read again), as a plain client's would be. Non-blocking again after.
    pub(super) fn run(
        ws: &'a mut WebSocket<Io>,
        socket: &'a TcpStream,
        f: impl FnOnce(&mut Exchange<'a>),
    ) {
        // a timed-out read or write says WouldBlock: the deadline is
        // looked at and the wait goes on in poll
        let blocking = socket.set_read_timeout(Some(IO_SLICE)).is_ok()
            && socket.set_write_timeout(Some(IO_SLICE)).is_ok()
            && socket.set_nonblocking(false).is_ok();
        f(&mut Exchange { ws, socket });
        if blocking {
            let _ = socket.set_nonblocking(true);
            let _ = socket.set_read_timeout(None);
            let _ = socket.set_write_timeout(None);
        }
    }

    fn wait(&self, events: i16, deadline: Instant) -> Result<(), String> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("timed out".to_string());
        }
        let mut fd = libc::pollfd {
            fd: self.socket.as_raw_fd(),
            events,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the call's duration.
        let r = unsafe { libc::poll(&mut fd, 1, ms) };
        if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return Err(format!("poll: {}", io::Error::last_os_error()));
        }
        Ok(())
    }

    fn flush(&mut self, deadline: Instant) -> Result<(), String> {
        loop {
            match self.ws.flush() {
                Ok(()) => return Ok(()),
                Err(e) if is_would_block(&e) => self.wait(libc::POLLOUT, deadline)?,
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Sends `msg` as a binary message, written out before it returns.
    pub fn send_msg(&mut self, msg: &ProtoMsg, deadline: Instant) -> Result<(), String> {
        self.send_encoded(codec::encode(msg).into(), deadline)
    }

    /// Sends an already encoded message (a bench encodes before its clock
    /// starts), written out before it returns.
    pub fn send_encoded(&mut self, frame: Bytes, deadline: Instant) -> Result<(), String> {
        match self.ws.write(Message::Binary(frame)) {
            Ok(()) => {}
            Err(e) if is_would_block(&e) => {}
            Err(e) => return Err(e.to_string()),
        }
        self.flush(deadline)
    }

    /// Sends a websocket ping and waits for its pong (a data message
    /// arriving first is an error).
    pub fn ping(&mut self, payload: &[u8], deadline: Instant) -> Result<(), String> {
        match self.ws.write(Message::Ping(payload.to_vec().into())) {
            Ok(()) => {}
            Err(e) if is_would_block(&e) => {}
            Err(e) => return Err(e.to_string()),
        }
        self.flush(deadline)?;
        loop {
            match self.ws.read() {
                Ok(Message::Pong(_)) => return Ok(()),
                Ok(Message::Ping(_)) | Ok(Message::Frame(_)) => self.flush(deadline)?,
                Ok(m) => return Err(format!("expected a pong, got {m:?}")),
                Err(e) if is_would_block(&e) => self.wait(libc::POLLIN, deadline)?,
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// The next data message from the device, decoded.
    pub fn recv_msg(&mut self, deadline: Instant) -> Result<ProtoMsg, String> {
        loop {
            let data = match self.ws.read() {
                Ok(Message::Binary(b)) => b.to_vec(),
                Ok(Message::Text(t)) => t.as_bytes().to_vec(),
                Ok(Message::Close(_)) => return Err("closed by the device".to_string()),
                // a ping's pong is queued by tungstenite: send it on
                Ok(_) => {
                    self.flush(deadline)?;
                    continue;
                }
                Err(e) if is_would_block(&e) => {
                    self.wait(libc::POLLIN, deadline)?;
                    continue;
                }
                Err(e) => return Err(e.to_string()),
            };
            return codec::decode(&data).map_err(|e| format!("undecodable message: {e}"));
        }
    }
}
