//! Stand-in for deviceconnect's device endpoint (protocol.md §1): a websocket
//! server on 127.0.0.1 (plain or TLS) that records what the device sends and
//! lets a test send, ping, close or cut the connection.
//!
//! Threads: one accept thread (`ws-accept`), one per TCP connection
//! (`ws-conn-N`). A connection thread owns its websocket; other threads talk
//! to it through a command channel plus a wake-up socket it polls together
//! with the TCP socket, so nothing blocks or polls on a timer. Recorded state
//! lives behind a mutex + condvar so every `wait_*` / `recv*` blocks with a
//! deadline.

use super::CONNECT_PATH;
use super::tls::TlsCert;
use crossbeam_channel::{Receiver, Sender};
use mender_connect::wire::codec::{self, DecodeError, ProtoMsg};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tungstenite::{Error as WsError, Message, WebSocket};

/// Inbound message limit, like deviceconnect (protocol.md §1.6).
pub const MAX_MESSAGE_SIZE: usize = 8 << 20;
/// Deadline for the TLS and websocket handshakes of one connection.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// One upgrade request as the server saw it (rejected ones included).
#[derive(Debug, Clone)]
pub struct UpgradeRequest {
    /// Request path (without query).
    pub path: String,
    /// Full request target as sent (path and query).
    pub uri: String,
    /// Headers in wire order; names lower-case.
    pub headers: Vec<(String, String)>,
    /// Status the stand-in answered: 101, 404 (wrong path) or the reject status.
    pub status: u16,
}

impl UpgradeRequest {
    /// First value of a header (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One data message received from the device.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// True for a text message (opcode 1), false for binary (opcode 2).
    pub text: bool,
    /// The payload.
    pub data: Vec<u8>,
}

impl Frame {
    /// The payload decoded as a ProtoMsg.
    pub fn decoded(&self) -> Result<ProtoMsg, DecodeError> {
        codec::decode(&self.data)
    }
}

/// What happened on the server, in order, for [`Server::subscribe`].
#[derive(Debug, Clone)]
pub enum Event {
    /// An upgrade request was answered (`status` 101 = connection `conn`).
    Upgrade {
        /// Index of the connection (only meaningful for 101).
        conn: Option<usize>,
        /// The request.
        request: UpgradeRequest,
    },
    /// A data message from the device.
    Frame {
        /// Connection index.
        conn: usize,
        /// The message.
        frame: Frame,
    },
    /// A ping from the device.
    Ping {
        /// Connection index.
        conn: usize,
        /// Its payload.
        payload: Vec<u8>,
    },
    /// A pong from the device.
    Pong {
        /// Connection index.
        conn: usize,
        /// Its payload.
        payload: Vec<u8>,
    },
    /// A close frame from the device.
    Close {
        /// Connection index.
        conn: usize,
        /// Code (1005 when the frame had none) and reason.
        code: u16,
        /// Reason text.
        reason: String,
    },
    /// The connection is gone (TCP closed).
    Closed {
        /// Connection index.
        conn: usize,
        /// Why, when it ended with an error.
        error: Option<String>,
    },
}

type Subscribers = Arc<Mutex<Vec<Sender<Event>>>>;

fn publish(subs: &Subscribers, ev: Event) {
    subs.lock().unwrap().retain(|s| s.send(ev.clone()).is_ok());
}

fn wait_on<'a, T>(
    m: &'a Mutex<T>,
    cond: &Condvar,
    timeout: Duration,
    mut done: impl FnMut(&mut T) -> bool,
) -> (MutexGuard<'a, T>, bool) {
    let deadline = Instant::now() + timeout;
    let mut g = m.lock().unwrap();
    loop {
        if done(&mut g) {
            return (g, true);
        }
        let now = Instant::now();
        if now >= deadline {
            return (g, false);
        }
        g = cond.wait_timeout(g, deadline - now).unwrap().0;
    }
}

// ---------------------------------------------------------------------------
// Server

#[derive(Debug, Default)]
struct ServerState {
    attempts: Vec<UpgradeRequest>,
    conns: Vec<ConnHandle>,
    handed_out: usize,
    reject: Option<(u16, Option<String>)>,
    ping_interval: Option<Duration>,
    http_hook: Option<HttpHook>,
    /// Clones of the live TCP sockets by connection sequence number, so
    /// `stop` can cut them; each thread removes its own when it ends.
    sockets: Vec<(usize, TcpStream)>,
    threads: Vec<JoinHandle<()>>,
}

#[derive(Debug)]
struct ServerShared {
    state: Mutex<ServerState>,
    cond: Condvar,
    stopping: AtomicBool,
    answer_pings: AtomicBool,
    subscribers: Subscribers,
}

/// The stand-in server. Drop = [`Server::stop`].
#[derive(Debug)]
pub struct Server {
    shared: Arc<ServerShared>,
    port: u16,
    tls: bool,
    listener: Option<TcpListener>,
    accept_thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Plain `ws://` server on an ephemeral port of 127.0.0.1.
    pub fn start_plain() -> Server {
        Self::start(0, None)
    }

    /// Plain server on a given port (e.g. the port of a stopped server, to
    /// simulate a restart; the listener uses SO_REUSEADDR).
    pub fn start_plain_on(port: u16) -> Server {
        Self::start(port, None)
    }

    /// TLS `wss://` server presenting `cert` on an ephemeral port.
    pub fn start_tls(cert: &TlsCert) -> Server {
        Self::start(0, Some(cert.acceptor()))
    }

    /// TLS server on a given port.
    pub fn start_tls_on(cert: &TlsCert, port: u16) -> Server {
        Self::start(port, Some(cert.acceptor()))
    }

    fn start(port: u16, tls: Option<native_tls::TlsAcceptor>) -> Server {
        // std sets SO_REUSEADDR on Unix listeners, so rebinding a port whose
        // old connections sit in TIME_WAIT works.
        let listener = TcpListener::bind(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("binding 127.0.0.1:{port}: {e}"));
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(ServerShared {
            state: Mutex::new(ServerState::default()),
            cond: Condvar::new(),
            stopping: AtomicBool::new(false),
            answer_pings: AtomicBool::new(true),
            subscribers: Arc::default(),
        });
        let is_tls = tls.is_some();
        let l = listener.try_clone().expect("clone listener");
        let sh = shared.clone();
        let tls = tls.map(Arc::new);
        let accept_thread = std::thread::Builder::new()
            .name("ws-accept".into())
            .spawn(move || accept_loop(l, sh, tls))
            .expect("spawn ws-accept");
        Server {
            shared,
            port,
            tls: is_tls,
            listener: Some(listener),
            accept_thread: Some(accept_thread),
        }
    }

    /// `http://127.0.0.1:PORT` or `https://localhost:PORT` — what the auth
    /// service hands out as the server URL.
    pub fn url(&self) -> String {
        if self.tls {
            format!("https://localhost:{}", self.port)
        } else {
            format!("http://127.0.0.1:{}", self.port)
        }
    }

    /// The full websocket URL a device dials (`ws[s]://…/deviceconnect/connect`).
    pub fn ws_url(&self) -> String {
        if self.tls {
            format!("wss://localhost:{}{CONNECT_PATH}", self.port)
        } else {
            format!("ws://127.0.0.1:{}{CONNECT_PATH}", self.port)
        }
    }

    /// The listening port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Next accepted (101) connection not yet returned by this method, in
    /// accept order; waits up to `timeout`.
    pub fn wait_connection(&self, timeout: Duration) -> Option<ConnHandle> {
        let (mut g, ok) = wait_on(&self.shared.state, &self.shared.cond, timeout, |s| {
            s.conns.len() > s.handed_out
        });
        if !ok {
            return None;
        }
        let c = g.conns[g.handed_out].clone();
        g.handed_out += 1;
        Some(c)
    }

    /// The `n`-th accepted connection (0-based), if it exists yet.
    pub fn connection(&self, n: usize) -> Option<ConnHandle> {
        self.shared.state.lock().unwrap().conns.get(n).cloned()
    }

    /// Waits until at least `n` connections have been accepted.
    pub fn wait_connection_count(&self, n: usize, timeout: Duration) -> bool {
        wait_on(&self.shared.state, &self.shared.cond, timeout, |s| {
            s.conns.len() >= n
        })
        .1
    }

    /// Number of accepted (101) connections so far.
    pub fn connection_count(&self) -> usize {
        self.shared.state.lock().unwrap().conns.len()
    }

    /// All upgrade requests so far, rejected ones included.
    pub fn attempts(&self) -> Vec<UpgradeRequest> {
        self.shared.state.lock().unwrap().attempts.clone()
    }

    /// Number of upgrade requests so far, rejected ones included.
    pub fn attempt_count(&self) -> usize {
        self.shared.state.lock().unwrap().attempts.len()
    }

    /// Waits until at least `n` upgrade requests have been answered.
    pub fn wait_attempts(&self, n: usize, timeout: Duration) -> bool {
        wait_on(&self.shared.state, &self.shared.cond, timeout, |s| {
            s.attempts.len() >= n
        })
        .1
    }

    /// Answer later upgrade requests with this HTTP status instead of 101
    /// (`None` = accept again).
    pub fn set_reject(&self, status: Option<u16>) {
        self.shared.state.lock().unwrap().reject = status.map(|s| (s, None));
    }

    /// Like [`set_reject`](Self::set_reject) with a JSON body
    /// (e.g. `{"error":"…"}`).
    pub fn set_reject_with_body(&self, status: u16, body: &str) {
        self.shared.state.lock().unwrap().reject = Some((status, Some(body.to_string())));
    }

    /// Whether pings from the device are answered (default true). Applies to
    /// existing connections and is the default for new ones. When false the
    /// server also sends no pings of its own.
    pub fn set_answer_pings(&self, answer: bool) {
        self.shared.answer_pings.store(answer, Ordering::SeqCst);
        for c in self.shared.state.lock().unwrap().conns.iter() {
            c.set_answer_pings(answer);
        }
    }

    /// Server keepalive for connections accepted from now on: a ping with
    /// payload `60` every `interval`, the timer reset by every ping/pong from
    /// the device (deviceconnect's behaviour). Off (`None`) by default.
    pub fn set_ping_interval(&self, interval: Option<Duration>) {
        self.shared.state.lock().unwrap().ping_interval = interval;
    }

    /// Routes every request whose path is not the device connect path to
    /// `hook` (`None` = answer them 404 as before).
    pub fn set_http_hook(&self, hook: Option<HttpHook>) {
        self.shared.state.lock().unwrap().http_hook = hook;
    }

    /// Looks up connections by index without keeping the server alive.
    pub fn connections(&self) -> Connections {
        Connections(Arc::downgrade(&self.shared))
    }

    /// A feed of everything happening from now on (for logging).
    pub fn subscribe(&self) -> Receiver<Event> {
        let (tx, rx) = crossbeam_channel::unbounded();
        self.shared.subscribers.lock().unwrap().push(tx);
        rx
    }

    /// Closes the listener and cuts every connection (no close frame, like a
    /// killed server), joining all threads. When it returns the port is free.
    /// Idempotent.
    pub fn stop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        if let Some(l) = self.listener.take() {
            // Wakes the accept thread's accept() (EINVAL on Linux).
            // SAFETY: plain syscall on a descriptor we own.
            unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
            if let Some(t) = self.accept_thread.take() {
                let _ = t.join();
            }
            drop(l);
        }
        let (sockets, threads) = {
            let mut g = self.shared.state.lock().unwrap();
            (
                std::mem::take(&mut g.sockets),
                std::mem::take(&mut g.threads),
            )
        };
        for (_, s) in &sockets {
            let _ = s.shutdown(Shutdown::Both);
        }
        for t in threads {
            let _ = t.join();
        }
    }
}

/// Weak access to a server's accepted connections (see [`Server::connections`]).
#[derive(Debug, Clone)]
pub struct Connections(std::sync::Weak<ServerShared>);

impl Connections {
    /// The `n`-th accepted connection, while the server exists.
    pub fn get(&self, n: usize) -> Option<ConnHandle> {
        let shared = self.0.upgrade()?;
        let g = shared.state.lock().unwrap();
        g.conns.get(n).cloned()
    }

    /// Number of accepted connections (0 once the server is gone).
    pub fn count(&self) -> usize {
        self.0
            .upgrade()
            .map_or(0, |s| s.state.lock().unwrap().conns.len())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(
    listener: TcpListener,
    shared: Arc<ServerShared>,
    tls: Option<Arc<native_tls::TlsAcceptor>>,
) {
    let mut seq = 0usize;
    loop {
        let res = listener.accept();
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let tcp = match res {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => break,
            Err(_) => continue,
        };
        seq += 1;
        let Ok(clone) = tcp.try_clone() else { continue };
        let sh = shared.clone();
        let tls = tls.clone();
        // Registered before the thread starts, so its guard always finds it.
        let mut g = shared.state.lock().unwrap();
        g.sockets.push((seq, clone));
        let t = std::thread::Builder::new()
            .name(format!("ws-conn-{seq}"))
            .spawn(move || handle_conn(seq, tcp, sh, tls))
            .expect("spawn ws-conn");
        g.threads.retain(|t| !t.is_finished());
        g.threads.push(t);
    }
}

// ---------------------------------------------------------------------------
// The byte stream under tungstenite

enum Inner {
    Plain(TcpStream),
    Tls(Box<native_tls::TlsStream<TcpStream>>),
}

enum FilterState {
    Header(Vec<u8>),
    Payload { remaining: u64, drop: bool },
}

/// Stream under the websocket. Writes go through an unbounded buffer so the
/// connection thread never blocks on write; once `filtering` is on, outgoing
/// pong frames are dropped while `answer_pings` is false (tungstenite answers
/// pings by itself and has no switch for it).
struct Io {
    inner: Inner,
    /// Bytes already read off the socket (a request head peeked for an
    /// [`HttpHook`]) that reads must return first.
    pending: Vec<u8>,
    out: Vec<u8>,
    filtering: bool,
    filter: FilterState,
    answer_pings: Arc<AtomicBool>,
}

impl Io {
    fn drain(&mut self) -> io::Result<()> {
        while !self.out.is_empty() {
            let r = match &mut self.inner {
                Inner::Plain(s) => s.write(&self.out),
                Inner::Tls(s) => s.write(&self.out),
            };
            match r {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn feed(&mut self, mut buf: &[u8]) {
        let answer = self.answer_pings.load(Ordering::SeqCst);
        while !buf.is_empty() {
            match &mut self.filter {
                FilterState::Header(h) => {
                    h.push(buf[0]);
                    buf = &buf[1..];
                    if let Some((hlen, plen)) = frame_header_len(h)
                        && h.len() == hlen
                    {
                        let is_pong = h[0] & 0x0f == 0x0a;
                        let drop = is_pong && !answer;
                        if !drop {
                            self.out.extend_from_slice(h);
                        }
                        self.filter = if plen == 0 {
                            FilterState::Header(Vec::new())
                        } else {
                            FilterState::Payload {
                                remaining: plen,
                                drop,
                            }
                        };
                    }
                }
                FilterState::Payload { remaining, drop } => {
                    let n = (*remaining).min(buf.len() as u64) as usize;
                    if !*drop {
                        self.out.extend_from_slice(&buf[..n]);
                    }
                    *remaining -= n as u64;
                    buf = &buf[n..];
                    if *remaining == 0 {
                        self.filter = FilterState::Header(Vec::new());
                    }
                }
            }
        }
    }
}

/// (header length, payload length) once enough of the header is known.
fn frame_header_len(h: &[u8]) -> Option<(usize, u64)> {
    if h.len() < 2 {
        return None;
    }
    let masked = h[1] & 0x80 != 0;
    let l7 = h[1] & 0x7f;
    let ext = match l7 {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    if h.len() < 2 + ext {
        return None;
    }
    let plen = match l7 {
        126 => u16::from_be_bytes([h[2], h[3]]) as u64,
        127 => u64::from_be_bytes(h[2..10].try_into().unwrap()),
        n => n as u64,
    };
    Some((2 + ext + if masked { 4 } else { 0 }, plen))
}

impl Read for Io {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.pending.is_empty() {
            let n = buf.len().min(self.pending.len());
            buf[..n].copy_from_slice(&self.pending[..n]);
            self.pending.drain(..n);
            return Ok(n);
        }
        match &mut self.inner {
            Inner::Plain(s) => s.read(buf),
            Inner::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Io {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.filtering {
            self.feed(buf);
        } else {
            self.out.extend_from_slice(buf);
        }
        match self.drain() {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
            _ => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.drain()?;
        match &mut self.inner {
            Inner::Plain(s) => s.flush(),
            Inner::Tls(s) => s.flush(),
        }
    }
}

// ---------------------------------------------------------------------------
// Connections

enum Cmd {
    Send(Message),
    Close(u16, String),
    /// Runs on the connection thread with the websocket lent (see
    /// [`ConnHandle::exchange`]).
    Run(Box<dyn FnOnce(&mut Exchange<'_>) + Send>),
}

/// The websocket lent to a closure on the connection's own thread, for a
/// client that waits for each reply (mender-cli's port forward): sending and
/// receiving there costs no thread hand-off per round trip. Messages read
/// here are not recorded (`frames`, `recv*`, subscribers); pings from the
/// device are answered as usual.
pub struct Exchange<'a> {
    ws: &'a mut WebSocket<Io>,
    socket: &'a TcpStream,
}

impl Exchange<'_> {
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
        match self.ws.write(Message::binary(codec::encode(msg))) {
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

#[derive(Debug, Default)]
struct ConnState {
    unread: VecDeque<Frame>,
    frames: Vec<Frame>,
    /// `frames` stops growing (long streaming tests).
    forget: bool,
    pings: Vec<Vec<u8>>,
    pongs: Vec<Vec<u8>>,
    close: Option<(u16, String)>,
    open: bool,
    error: Option<String>,
}

#[derive(Debug)]
struct ConnShared {
    id: usize,
    request: UpgradeRequest,
    state: Mutex<ConnState>,
    cond: Condvar,
    cmd: Sender<Cmd>,
    wake: UnixStream,
    socket: TcpStream,
    answer_pings: Arc<AtomicBool>,
}

/// One accepted websocket connection. Cheap to clone; all clones talk to the
/// same connection thread.
#[derive(Debug, Clone)]
pub struct ConnHandle(Arc<ConnShared>);

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
                    super::hex(&f.data, 256)
                )
            })
        })
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
fn handle_conn(
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

/// Marks a connection closed (waking its waiters) and publishes `Closed`.
fn conn_ended(conn: &ConnHandle, error: Option<String>, subs: &Subscribers) {
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
fn conn_parts(
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

// ---------------------------------------------------------------------------
// Other HTTP requests (the management API stand-in hooks in here)

/// Largest request head [`HttpHook`] requests may have.
const MAX_HEAD: usize = 64 * 1024;

/// Handles every request whose path is not the device connect path, on the
/// connection's own thread (`ws-conn-N`), once set with
/// [`Server::set_http_hook`]. It owns the stream: whatever it does not answer
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
    fn parse(head: &[u8]) -> Option<HttpRequest> {
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
fn read_head(io: &mut Io) -> Option<(Vec<u8>, Vec<u8>)> {
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
    io: Io,
    head: Vec<u8>,
    socket: TcpStream,
    request: HttpRequest,
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

fn is_would_block(e: &WsError) -> bool {
    matches!(e, WsError::Io(io) if io.kind() == io::ErrorKind::WouldBlock)
}

/// The connection's event loop; returns the error that ended it (`None` for
/// a clean close).
fn run_conn(
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
                    f(&mut Exchange { ws, socket });
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
