//! Stand-in for deviceconnect's management side (protocol.md §1.7, §3.2
//! "What the user sees", transfer.md §2.9), hooked into a [`Server`] so real
//! clients such as `mender-cli` can drive the device through it:
//!
//! - `GET  /api/management/v1/deviceconnect/devices/:id` — device status
//!   (`{"id", "status": "connected"|"disconnected"}`; 404 for other ids);
//! - `GET  …/devices/:id/connect` — the operator's websocket (terminal,
//!   port forward): every message from it gets its `sid` replaced by a
//!   server-generated UUID and `user_id` added, and is re-encoded; device
//!   messages with that `sid` go back unchanged (original bytes). When the
//!   operator's websocket goes away while a terminal is open, the device gets
//!   a shell `stop` {status 2, user_id} `user disconnected`;
//! - `GET|HEAD …/devices/:id/download?path=` and `PUT …/devices/:id/upload`
//!   (multipart) — translated into file-transfer sessions ([`crate::rest_ft`]).
//!
//! Any `Authorization: Bearer <non-empty>` is accepted (the real API gateway
//! checks the JWT; nothing here depends on its claims). The device is the
//! most recent open device connection of the server.
//!
//! Threads: `mgmt-router` (routes device frames to sessions by `sid`), and per
//! operator websocket `mgmt-ws-N` (operator → device); HTTP requests run on
//! the server's connection threads.

use crate::rest_ft;
use crate::server::{Connections, Event, HttpHook, HttpRequest, HttpStream, Server};
use crate::{AuthService, ConnHandle, Daemon, DbusDaemon, TIMEOUT, http};
use crossbeam_channel::{Receiver, Sender};
use mender_connect::wire::codec::{self, PROTO_SHELL, ProtoMsg, Value};
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Prefix of every management device path.
pub const DEVICES_PATH: &str = "/api/management/v1/deviceconnect/devices/";
/// The device id the stand-in answers to.
pub const DEVICE_ID: &str = "0b5a1f0c-6d43-4a57-9c55-2bb4d5e8a3f1";
/// The operator's user id (`user_id` in everything it sends to the device).
pub const USER_ID: &str = "5f1d2c3b-8e9a-4b7c-a6d5-e4f3a2b1c0d9";

/// Where a device message for a session goes.
#[derive(Debug, Clone)]
pub(crate) enum Sink {
    /// An operator websocket: the original bytes, unchanged.
    Ws(ConnHandle),
    /// A REST file transfer waiting for decoded messages.
    Rest(Sender<ProtoMsg>),
}

#[derive(Debug, Default)]
struct State {
    device: Option<ConnHandle>,
    sessions: HashMap<String, Sink>,
    /// Session ids with an open terminal (operator sent `new`, nobody stopped it).
    terminals: HashSet<String>,
    /// Every message the stand-in itself sent to the device, in order.
    sent: Vec<ProtoMsg>,
    /// Every operator message relayed to the device (after rewriting), in order.
    relayed: Vec<ProtoMsg>,
}

/// State shared by the router, the hook and the session threads.
#[derive(Debug)]
pub(crate) struct Shared {
    state: Mutex<State>,
    cond: Condvar,
    conns: Connections,
}

impl Shared {
    /// The current device connection, if it is open.
    pub(crate) fn device(&self) -> Option<ConnHandle> {
        let g = self.state.lock().unwrap();
        g.device.as_ref().filter(|c| c.is_open()).cloned()
    }

    /// Sends a message the stand-in originates to the device (recorded).
    pub(crate) fn send_to_device(&self, msg: &ProtoMsg) -> bool {
        let Some(dev) = self.device() else {
            return false;
        };
        self.state.lock().unwrap().sent.push(msg.clone());
        self.cond.notify_all();
        dev.send_msg(msg);
        true
    }

    /// Routes device messages with `sid` to `sink` until [`unregister`].
    pub(crate) fn register(&self, sid: &str, sink: Sink) {
        self.state
            .lock()
            .unwrap()
            .sessions
            .insert(sid.to_string(), sink);
    }

    /// Forgets a session.
    pub(crate) fn unregister(&self, sid: &str) {
        let mut g = self.state.lock().unwrap();
        g.sessions.remove(sid);
        g.terminals.remove(sid);
    }
}

/// The management stand-in. Drop stops its router: the hook stays on the
/// server and keeps answering HTTP, but device messages are no longer routed.
#[derive(Debug)]
pub struct Management {
    shared: Arc<Shared>,
    url: String,
    stop: Option<Sender<()>>,
    router: Option<JoinHandle<()>>,
}

impl Management {
    /// Hooks the management API into `server` and starts routing.
    pub fn start(server: &Server) -> Management {
        let conns = server.connections();
        let events = server.subscribe();
        // A device that connected before we subscribed.
        let device = (0..conns.count())
            .rev()
            .filter_map(|i| conns.get(i))
            .find(|c| c.is_open());
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                device,
                ..State::default()
            }),
            cond: Condvar::new(),
            conns,
        });
        let (stop_tx, stop_rx) = crossbeam_channel::bounded(0);
        let sh = shared.clone();
        let router = std::thread::Builder::new()
            .name("mgmt-router".into())
            .spawn(move || route(&sh, &events, &stop_rx))
            .expect("spawn mgmt-router");
        let sh = shared.clone();
        server.set_http_hook(Some(HttpHook(Arc::new(move |req, stream| {
            serve(&sh, req, stream)
        }))));
        Management {
            shared,
            url: server.url(),
            stop: Some(stop_tx),
            router: Some(router),
        }
    }

    /// The `--server` URL for mender-cli.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The device id to give mender-cli.
    pub fn device_id(&self) -> &str {
        DEVICE_ID
    }

    /// Whether the stand-in sees an open device connection.
    pub fn device_connected(&self) -> bool {
        self.shared.device().is_some()
    }

    /// Waits until a device connection is open.
    pub fn wait_device(&self, timeout: Duration) -> bool {
        crate::wait_until(timeout, || self.device_connected())
    }

    /// Every message the stand-in itself sent to the device so far.
    pub fn sent(&self) -> Vec<ProtoMsg> {
        self.shared.state.lock().unwrap().sent.clone()
    }

    /// Waits until the stand-in has sent the device a message matching `f`.
    pub fn wait_sent(&self, timeout: Duration, f: impl Fn(&ProtoMsg) -> bool) -> Option<ProtoMsg> {
        let deadline = std::time::Instant::now() + timeout;
        let mut g = self.shared.state.lock().unwrap();
        loop {
            if let Some(m) = g.sent.iter().find(|m| f(m)) {
                return Some(m.clone());
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return None;
            }
            g = self.shared.cond.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    /// Waits until an operator message matching `f` has been relayed to the
    /// device (as rewritten: server `sid`, `user_id` added).
    pub fn wait_relayed(
        &self,
        timeout: Duration,
        f: impl Fn(&ProtoMsg) -> bool,
    ) -> Option<ProtoMsg> {
        let deadline = std::time::Instant::now() + timeout;
        let mut g = self.shared.state.lock().unwrap();
        loop {
            if let Some(m) = g.relayed.iter().find(|m| f(m)) {
                return Some(m.clone());
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return None;
            }
            g = self.shared.cond.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    /// Ids of the sessions currently routed (operator websockets and REST).
    pub fn session_ids(&self) -> Vec<String> {
        let g = self.shared.state.lock().unwrap();
        g.sessions.keys().cloned().collect()
    }
}

impl Drop for Management {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(t) = self.router.take() {
            let _ = t.join();
        }
    }
}

/// A daemon on a private bus, connected to a stand-in server with the
/// management stand-in in front: where tests that act as an operator (REST,
/// operator websocket, mender-cli) start. Fields drop in order: the daemon
/// first, then its peers.
pub struct Managed {
    /// The daemon under test.
    pub daemon: Daemon,
    /// The management stand-in on `server`.
    pub mgmt: Management,
    /// The deviceconnect stand-in the daemon is connected to.
    pub server: Server,
    /// The D-Bus auth stand-in handing out the device token.
    pub auth: AuthService,
    /// The private bus.
    pub bus: DbusDaemon,
}

impl Managed {
    /// Starts everything, the daemon with `config` and device token `token`,
    /// and waits until the device is connected (panics with the daemon's log
    /// after [`TIMEOUT`]).
    pub fn start(config: &str, token: &str) -> Managed {
        let bus = DbusDaemon::start();
        let server = Server::start_plain();
        let mgmt = Management::start(&server);
        let auth = AuthService::start(bus.address(), token, &server.url());
        let daemon = Daemon::spawn(config, bus.address(), &[]);
        if !mgmt.wait_device(TIMEOUT) {
            daemon.dump_log();
            panic!("daemon never connected");
        }
        Managed {
            daemon,
            mgmt,
            server,
            auth,
            bus,
        }
    }
}

/// A random (v4) UUID string, like deviceconnect's session ids.
pub fn uuid() -> String {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("reading /dev/urandom");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

// ---------------------------------------------------------------------------
// Device → sessions

fn route(shared: &Shared, events: &Receiver<Event>, stop: &Receiver<()>) {
    loop {
        crossbeam_channel::select! {
            recv(stop) -> _ => return,
            recv(events) -> ev => match ev {
                Ok(ev) => on_event(shared, ev),
                Err(_) => return,
            },
        }
    }
}

fn on_event(shared: &Shared, ev: Event) {
    match ev {
        Event::Upgrade { conn: Some(i), .. } => {
            if let Some(c) = shared.conns.get(i) {
                shared.state.lock().unwrap().device = Some(c);
            }
        }
        Event::Frame { frame, .. } => {
            // deviceconnect decodes once to route, then relays the original
            // bytes; undecodable frames would abort the device connection
            // there, here they are only dropped.
            let Ok(msg) = codec::decode(&frame.data) else {
                return;
            };
            if msg.hdr.sid.is_empty() {
                return;
            }
            let sink = {
                let mut g = shared.state.lock().unwrap();
                // A device `stop` with status 1 ends the terminal: no
                // "user disconnected" stop is due any more.
                if msg.hdr.proto == PROTO_SHELL
                    && msg.hdr.typ == "stop"
                    && msg.prop("status").and_then(Value::as_i64) == Some(1)
                {
                    g.terminals.remove(&msg.hdr.sid);
                }
                g.sessions.get(&msg.hdr.sid).cloned()
            };
            match sink {
                Some(Sink::Ws(user)) => user.send(&frame.data),
                // A gone receiver unregisters itself (the session's drop).
                Some(Sink::Rest(tx)) => {
                    let _ = tx.send(msg);
                }
                None => {}
            }
        }
        Event::Closed { conn, .. } => {
            let mut g = shared.state.lock().unwrap();
            if g.device.as_ref().is_some_and(|d| d.id() == conn) {
                g.device = None;
                // REST transfers waiting on the device fail at once.
                g.sessions.retain(|_, s| matches!(s, Sink::Ws(_)));
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------
// HTTP

fn serve(shared: &Arc<Shared>, req: HttpRequest, mut stream: HttpStream) {
    let Some(rest) = req.path.strip_prefix(DEVICES_PATH) else {
        let _ = http::respond_error(&mut stream, 404, "not found");
        return;
    };
    let rest = rest.to_string();
    let (id, action) = rest.split_once('/').unwrap_or((rest.as_str(), ""));
    let bearer = req
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| !t.trim().is_empty());
    if !bearer {
        let _ = http::respond_error(&mut stream, 401, "unauthorized");
        return;
    }
    if id != DEVICE_ID {
        let _ = http::respond_error(&mut stream, 404, "device not found");
        return;
    }
    match (req.method.as_str(), action) {
        ("GET", "") => device_status(shared, &mut stream),
        ("GET", "connect") => operator_websocket(shared, stream),
        ("GET" | "HEAD", "download") => rest_ft::download(shared, &req, stream),
        ("PUT", "upload") => rest_ft::upload(shared, &req, stream),
        _ => {
            let _ = http::respond_error(&mut stream, 404, "not found");
        }
    }
}

fn device_status(shared: &Shared, stream: &mut HttpStream) {
    let status = if shared.device().is_some() {
        "connected"
    } else {
        "disconnected"
    };
    let body = serde_json::json!({ "id": DEVICE_ID, "status": status }).to_string();
    let _ = http::respond(
        stream,
        200,
        &[(
            "Content-Type",
            "application/json; charset=utf-8".to_string(),
        )],
        body.as_bytes(),
    );
}

fn operator_websocket(shared: &Arc<Shared>, mut stream: HttpStream) {
    if shared.device().is_none() {
        let _ = http::respond_error(&mut stream, 404, "device not connected");
        return;
    }
    let Some((user, driver)) = stream.into_websocket() else {
        return;
    };
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let sid = uuid();
    shared.register(&sid, Sink::Ws(user.clone()));
    let sh = shared.clone();
    let relay = std::thread::Builder::new()
        .name(format!("mgmt-ws-{n}"))
        .spawn(move || relay_operator(&sh, &user, &sid))
        .expect("spawn mgmt-ws");
    driver.run();
    let _ = relay.join();
}

/// Operator → device until the operator's websocket is gone.
fn relay_operator(shared: &Shared, user: &ConnHandle, sid: &str) {
    loop {
        let Some(frame) = user.recv_frame(Duration::from_secs(3600)) else {
            if user.is_open() {
                continue;
            }
            break;
        };
        let Ok(mut msg) = codec::decode(&frame.data) else {
            // deviceconnect ends the operator's connection on garbage.
            user.close_with(1011, "failed to decode message");
            continue;
        };
        msg.hdr.sid = sid.to_string();
        msg.hdr
            .props
            .insert("user_id".into(), Value::Str(USER_ID.into()));
        {
            let mut g = shared.state.lock().unwrap();
            if msg.hdr.proto == PROTO_SHELL {
                match msg.hdr.typ.as_str() {
                    "new" => {
                        g.terminals.insert(sid.to_string());
                    }
                    "stop" => {
                        g.terminals.remove(sid);
                    }
                    _ => {}
                }
            }
            if let Some(dev) = g.device.as_ref().filter(|d| d.is_open()) {
                // Sent under the lock, so `relayed` order = wire order.
                dev.send_msg(&msg);
                g.relayed.push(msg);
            }
        }
        shared.cond.notify_all();
    }
    let open_terminal = shared.state.lock().unwrap().terminals.contains(sid);
    shared.unregister(sid);
    if open_terminal {
        let stop = ProtoMsg::new(PROTO_SHELL, "stop", sid)
            .with_prop("status", Value::Int(2))
            .with_prop("user_id", Value::Str(USER_ID.into()))
            .with_body(b"user disconnected".to_vec());
        shared.send_to_device(&stop);
    }
}
