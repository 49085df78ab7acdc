//! The listening socket and the [`Server`] a test holds: accepts TCP
//! connections and starts one thread per connection (see `handshake`);
//! what the server recorded, waited on with deadlines.

use super::conn::ConnHandle;
use super::event::{Event, Subscribers, UpgradeRequest};
use super::handshake::handle_conn;
use super::hook::HttpHook;
use super::wait_on;
use crate::CONNECT_PATH;
use crate::tls::TlsCert;
use crossbeam_channel::Receiver;
use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// What the server recorded and how it answers.
#[derive(Debug, Default)]
pub(super) struct ServerState {
    pub(super) attempts: Vec<UpgradeRequest>,
    pub(super) conns: Vec<ConnHandle>,
    pub(super) handed_out: usize,
    pub(super) reject: Option<(u16, Option<String>)>,
    pub(super) ping_interval: Option<Duration>,
    pub(super) http_hook: Option<HttpHook>,
    /// Clones of the live TCP sockets by connection sequence number, so
    /// `stop` can cut them; each thread removes its own when it ends.
    pub(super) sockets: Vec<(usize, TcpStream)>,
    pub(super) threads: Vec<JoinHandle<()>>,
}

/// Shared by the [`Server`], its accept thread and its connection threads.
#[derive(Debug)]
pub(super) struct ServerShared {
    pub(super) state: Mutex<ServerState>,
    pub(super) cond: Condvar,
    pub(super) stopping: AtomicBool,
    pub(super) answer_pings: AtomicBool,
    pub(super) subscribers: Subscribers,
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
