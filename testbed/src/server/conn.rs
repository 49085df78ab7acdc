//! One accepted websocket connection as a test sees it ([`ConnHandle`]):
//! commands to its thread, and what it recorded, waited on with deadlines.

use super::event::{Event, Frame, Subscribers, UpgradeRequest, publish};
use super::exchange::Exchange;
use super::wait_on;
use crossbeam_channel::{Receiver, Sender};
use mender_connect::wire::codec::{self, ProtoMsg};
use std::collections::VecDeque;
use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use tungstenite::Message;

/// What a test asks the connection thread to do.
pub(super) enum Cmd {
    Send(Message),
    Close(u16, String),
    /// Runs on the connection thread with the websocket lent (see
    /// [`ConnHandle::exchange`]).
    Run(Box<dyn FnOnce(&mut Exchange<'_>) + Send>),
}

#[derive(Debug, Default)]
/// What the connection thread recorded.
pub(super) struct ConnState {
    pub(super) unread: VecDeque<Frame>,
    pub(super) frames: Vec<Frame>,
    /// `frames` stops growing (long streaming tests).
    pub(super) forget: bool,
    pub(super) pings: Vec<Vec<u8>>,
    pub(super) pongs: Vec<Vec<u8>>,
    pub(super) close: Option<(u16, String)>,
    pub(super) open: bool,
    pub(super) error: Option<String>,
}

#[derive(Debug)]
/// Shared by every [`ConnHandle`] clone and the connection thread.
pub(super) struct ConnShared {
    pub(super) id: usize,
    pub(super) request: UpgradeRequest,
    pub(super) state: Mutex<ConnState>,
    pub(super) cond: Condvar,
    pub(super) cmd: Sender<Cmd>,
    pub(super) wake: UnixStream,
    pub(super) socket: TcpStream,
    pub(super) answer_pings: Arc<AtomicBool>,
}

/// One accepted websocket connection. Cheap to clone; all clones talk to the
/// same connection thread.
#[derive(Debug, Clone)]
pub struct ConnHandle(pub(super) Arc<ConnShared>);

impl ConnHandle {
    /// 0-based index among the server's accepted connections.
    pub fn id(&self) -> usize {
        self.0.id
    }

    /// The upgrade request.
    pub fn request(&self) -> &UpgradeRequest {
        &self.0.request
    }

    /// Upgrade request headers (names lower-case, wire order).
    pub fn headers(&self) -> &[(String, String)] {
        &self.0.request.headers
    }

    /// One upgrade request header (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.0.request.header(name)
    }

    /// The `Authorization` header of the upgrade request.
    pub fn authorization(&self) -> Option<&str> {
        self.header("authorization")
    }

    fn command(&self, cmd: Cmd) {
        if self.0.cmd.send(cmd).is_ok() {
            let _ = (&self.0.wake).write(&[1]);
        }
    }

    /// Sends a binary message (ignored once the connection is gone).
    pub fn send(&self, bytes: &[u8]) {
        self.command(Cmd::Send(Message::binary(bytes.to_vec())));
    }

    /// Runs `f` on the connection's thread with the websocket lent to it
    /// (see [`Exchange`]) and returns its result; `None` when the
    /// connection is gone. Nothing else happens on the connection meanwhile.
    pub fn exchange<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Exchange<'_>) -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.command(Cmd::Run(Box::new(move |x| {
            let _ = tx.send(f(x));
        })));
        rx.recv().ok()
    }

    /// Sends `codec::encode(msg)` as a binary message.
    pub fn send_msg(&self, msg: &ProtoMsg) {
        self.send(&codec::encode(msg));
    }

    /// Sends a text message.
    pub fn send_text(&self, text: &str) {
        self.command(Cmd::Send(Message::text(text.to_string())));
    }

    /// Sends a ping with this payload.
    pub fn send_ping(&self, payload: &[u8]) {
        self.command(Cmd::Send(Message::Ping(payload.to_vec().into())));
    }

    /// Starts the closing handshake with this code (reason empty); the
    /// connection ends when the device answers or drops the TCP connection.
    pub fn close(&self, code: u16) {
        self.close_with(code, "");
    }

    /// Like [`close`](Self::close) with a reason text.
    pub fn close_with(&self, code: u16, reason: &str) {
        self.command(Cmd::Close(code, reason.to_string()));
    }

    /// Cuts the TCP connection without a close frame.
    pub fn drop_tcp(&self) {
        let _ = self.0.socket.shutdown(Shutdown::Both);
    }

    /// Whether pings from the device are answered on this connection.
    pub fn set_answer_pings(&self, answer: bool) {
        self.0.answer_pings.store(answer, Ordering::SeqCst);
    }

    /// Next data message from the device not yet returned by `recv*`. `None`
    /// on timeout, or at once when the connection is closed and nothing is
    /// left.
    pub fn recv_frame(&self, timeout: Duration) -> Option<Frame> {
        let (mut g, _) = wait_on(&self.0.state, &self.0.cond, timeout, |s| {
            !s.unread.is_empty() || !s.open
        });
        g.unread.pop_front()
    }

    /// Payload of the next data message (see [`recv_frame`](Self::recv_frame)).
    pub fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        self.recv_frame(timeout).map(|f| f.data)
    }

    /// Next data message decoded as a ProtoMsg. Panics (with a hex dump) if
    /// it does not decode.
    pub fn recv_msg(&self, timeout: Duration) -> Option<ProtoMsg> {
        self.recv_frame(timeout).map(|f| {
            f.decoded().unwrap_or_else(|e| {
                panic!(
                    "device sent an undecodable message ({e}): {}",
                    crate::hex(&f.data, 256)
                )
            })
        })
    }

    /// The next data message matching `pred` within `timeout`, skipping the
    /// others (see [`next_matching`](crate::next_matching)).
    pub fn recv_msg_matching(
        &self,
        timeout: Duration,
        pred: impl FnMut(&ProtoMsg) -> bool,
    ) -> Option<ProtoMsg> {
        crate::next_matching(timeout, |left| self.recv_msg(left), pred)
    }

    /// Whether [`frames`](Self::frames) keeps every message from now on
    /// (default true); off for tests that stream without end.
    pub fn set_keep_frames(&self, keep: bool) {
        self.0.state.lock().unwrap().forget = !keep;
    }

    /// Every data message received so far (including ones already returned
    /// by `recv*`).
    pub fn frames(&self) -> Vec<Frame> {
        self.0.state.lock().unwrap().frames.clone()
    }

    /// Payloads of the pings received so far.
    pub fn pings(&self) -> Vec<Vec<u8>> {
        self.0.state.lock().unwrap().pings.clone()
    }

    /// Payloads of the pongs received so far.
    pub fn pongs(&self) -> Vec<Vec<u8>> {
        self.0.state.lock().unwrap().pongs.clone()
    }

    /// Waits until at least `n` pings have been received.
    pub fn wait_pings(&self, n: usize, timeout: Duration) -> bool {
        wait_on(&self.0.state, &self.0.cond, timeout, |s| s.pings.len() >= n).1
    }

    /// Waits until at least `n` pongs have been received.
    pub fn wait_pongs(&self, n: usize, timeout: Duration) -> bool {
        wait_on(&self.0.state, &self.0.cond, timeout, |s| s.pongs.len() >= n).1
    }

    /// The close frame the device sent, if any: (code, reason); code 1005
    /// when the frame carried none.
    pub fn close_frame(&self) -> Option<(u16, String)> {
        self.0.state.lock().unwrap().close.clone()
    }

    /// Why the connection ended, when it ended with an error.
    pub fn error(&self) -> Option<String> {
        self.0.state.lock().unwrap().error.clone()
    }

    /// Whether the connection is still up.
    pub fn is_open(&self) -> bool {
        self.0.state.lock().unwrap().open
    }

    /// Waits until the connection is gone (device closed it, TCP dropped,
    /// or the server cut it).
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        wait_on(&self.0.state, &self.0.cond, timeout, |s| !s.open).1
    }
}

/// Marks a connection closed (waking its waiters) and publishes `Closed`.
pub(super) fn conn_ended(conn: &ConnHandle, error: Option<String>, subs: &Subscribers) {
    {
        let mut g = conn.0.state.lock().unwrap();
        g.open = false;
        g.error = error.clone();
        publish(
            subs,
            Event::Closed {
                conn: conn.id(),
                error,
            },
        );
    }
    conn.0.cond.notify_all();
}

/// The handle of a freshly upgraded connection plus what its event loop
/// needs (command receiver, wake-up socket); switches `socket` to
/// non-blocking. `None` if the socket cannot be set up.
pub(super) fn conn_parts(
    id: usize,
    request: UpgradeRequest,
    socket: &TcpStream,
    answer_pings: Arc<AtomicBool>,
) -> Option<(ConnHandle, Receiver<Cmd>, UnixStream)> {
    let (cmd_tx, cmd_rx) = crossbeam_channel::unbounded();
    let (wake_rx, wake_tx) = UnixStream::pair().expect("socketpair");
    let _ = wake_rx.set_nonblocking(true);
    let _ = wake_tx.set_nonblocking(true);
    let _ = socket.set_read_timeout(None);
    let _ = socket.set_write_timeout(None);
    socket.set_nonblocking(true).ok()?;
    let conn = ConnHandle(Arc::new(ConnShared {
        id,
        request,
        state: Mutex::new(ConnState {
            open: true,
            ..ConnState::default()
        }),
        cond: Condvar::new(),
        cmd: cmd_tx,
        wake: wake_tx,
        socket: socket.try_clone().ok()?,
        answer_pings,
    }));
    Some((conn, cmd_rx, wake_rx))
}
