//! The router: decodes inbound frames and hands each message to its session
//! (protocol.md §2.5). Runs on the connection thread, so it never blocks:
//! sessions get messages through unbounded channels whose depth it meters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::conn::link::Inbound;
use crate::conn::outbound::Outbound;
use crate::conn::timing::Timing;
use crate::sessions::{Handler, Registry, SessionCtx, ShellRouter, sid8};
use crate::wire::action::{ControlAction, control_action, control_error_msg};
use crate::wire::codec::{self, PROTO_CONTROL, PROTO_SHELL, ProtoMsg, Value};
use crate::wire::control::ControlError;

/// Messages a session may have waiting before it counts as broken: the
/// protocols' own flow control keeps real peers far below this.
pub const SESSION_QUEUE_LIMIT: usize = 512;
/// Bytes of message bodies a session may have waiting (one message of any
/// size is always accepted), so a stalled session cannot hoard memory.
pub const SESSION_QUEUE_BYTES: usize = 16 << 20;
/// Router sessions alive at once; each is a thread, and the server chooses
/// how many sids it sends.
pub const MAX_SESSIONS: usize = 512;
/// Stack of a router-session thread: it only dispatches.
const SESSION_STACK: usize = 128 * 1024;

enum Inbox {
    Msg(ProtoMsg),
    Shutdown,
}

struct Entry {
    tx: Sender<Inbox>,
    depth: Arc<Depth>,
    id: usize,
}

/// What waits in a session's channel: messages and their body bytes.
#[derive(Default)]
struct Depth {
    msgs: AtomicUsize,
    bytes: AtomicUsize,
}

impl Depth {
    fn add(&self, msg: &ProtoMsg) {
        self.msgs.fetch_add(1, Ordering::AcqRel);
        self.bytes.fetch_add(body_len(msg), Ordering::AcqRel);
    }

    fn take(&self, msg: &ProtoMsg) {
        self.msgs.fetch_sub(1, Ordering::AcqRel);
        self.bytes.fetch_sub(body_len(msg), Ordering::AcqRel);
    }

    fn full_for(&self, msg: &ProtoMsg) -> bool {
        let msgs = self.msgs.load(Ordering::Acquire);
        msgs >= SESSION_QUEUE_LIMIT
            || (msgs > 0
                && self.bytes.load(Ordering::Acquire) + body_len(msg) > SESSION_QUEUE_BYTES)
    }
}

fn body_len(msg: &ProtoMsg) -> usize {
    msg.body.as_ref().map_or(0, Vec::len)
}

/// Routes decoded messages to shell and router sessions.
pub struct Router {
    inner: Arc<Inner>,
}

struct Inner {
    out: Outbound,
    registry: Registry,
    shell: Option<Arc<dyn ShellRouter>>,
    timing: Timing,
    sessions: Mutex<HashMap<String, Entry>>,
    next_id: AtomicUsize,
    live: (Mutex<usize>, Condvar),
}

impl Router {
    /// A router replying through `out`, serving `registry`'s protocols and,
    /// when given, the terminal.
    pub fn new(
        out: Outbound,
        registry: Registry,
        shell: Option<Arc<dyn ShellRouter>>,
        timing: Timing,
    ) -> Router {
        Router {
            inner: Arc::new(Inner {
                out,
                registry,
                shell,
                timing,
                sessions: Mutex::new(HashMap::new()),
                next_id: AtomicUsize::new(1),
                live: (Mutex::new(0), Condvar::new()),
            }),
        }
    }

    /// Protocols listed in the handshake's `accept`, ascending.
    pub fn protocols(&self) -> Vec<u16> {
        self.inner.protocols()
    }

    fn dispatch_decoded(&self, decoded: Result<ProtoMsg, codec::DecodeError>, len: usize) {
        match decoded {
            Ok(msg) => self.dispatch(msg),
            Err(e) => {
                log::warn!("dropping undecodable message ({len} bytes): {e}");
                let err = ControlError {
                    err: format!("failed to decode message: {e}"),
                    close: false,
                    ..ControlError::default()
                };
                self.inner.try_reply(control_error_msg("", &err));
            }
        }
    }

    /// Routes one decoded message.
    pub fn dispatch(&self, msg: ProtoMsg) {
        if msg.hdr.proto == PROTO_SHELL {
            match &self.inner.shell {
                Some(shell) => shell.dispatch(msg),
                None => self.inner.shell_unavailable(&msg),
            }
            return;
        }
        Inner::deliver(&self.inner, msg);
    }

    /// Number of router sessions alive right now.
    pub fn session_count(&self) -> usize {
        self.inner.lock_sessions().len()
    }

    /// Ends every router session and stops every shell; waits for the
    /// session threads up to `wait`.
    pub fn shutdown(&self, wait: Duration) {
        if let Some(shell) = &self.inner.shell {
            let n = shell.terminate_all();
            log::info!("stopped {n} shells");
        }
        let drained: Vec<Entry> = self.inner.lock_sessions().drain().map(|(_, e)| e).collect();
        for e in drained {
            let _ = e.tx.send(Inbox::Shutdown);
        }
        let deadline = Instant::now() + wait;
        let (lock, cv) = &self.inner.live;
        let mut live = lock.lock().unwrap_or_else(|p| p.into_inner());
        while *live > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::warn!("{} sessions still ending at shutdown", *live);
                break;
            }
            live = cv
                .wait_timeout(live, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Live shells, one line each, for the status dump.
    pub fn shell_status(&self) -> Vec<String> {
        self.inner
            .shell
            .as_ref()
            .map_or_else(Vec::new, |s| s.status())
    }

    /// Stops every shell (auth loss); router sessions time out by themselves.
    pub fn terminate_shells(&self) -> usize {
        self.inner.shell.as_ref().map_or(0, |s| s.terminate_all())
    }
}

impl Inbound for Router {
    /// Decodes one websocket data message and routes it. A frame that does
    /// not decode is logged and answered with a control error; it never
    /// costs the connection. A large body keeps the frame's allocation.
    fn frame(&self, frame: Vec<u8>) {
        let len = frame.len();
        self.dispatch_decoded(codec::decode_owned(frame), len);
    }
}

impl Inner {
    fn protocols(&self) -> Vec<u16> {
        let mut p: Vec<u16> = self.registry.protocols().collect();
        if self.shell.is_some() {
            p.push(PROTO_SHELL);
        }
        p.sort_unstable();
        p
    }

    fn lock_sessions(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        // A panicking session thread must not take routing down with it.
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replies from the connection thread: dropping beats blocking on the
    /// queue this very thread drains.
    fn try_reply(&self, msg: ProtoMsg) {
        if let Err(e) = self.out.try_send(&msg) {
            log::warn!("reply to session {:?} dropped: {e}", msg.hdr.sid);
        }
    }

    fn shell_unavailable(&self, msg: &ProtoMsg) {
        if msg.hdr.sid.is_empty() {
            // the server aborts the link on a shell message without sid (§1.7)
            log::warn!(
                "ignoring shell message {:?} without session id",
                msg.hdr.typ
            );
            return;
        }
        let reply = ProtoMsg::new(PROTO_SHELL, &msg.hdr.typ, &msg.hdr.sid)
            .with_prop("status", Value::Int(2))
            .with_body(
                format!("unknown message protocol and type: 1/{}", msg.hdr.typ).into_bytes(),
            );
        self.try_reply(reply);
    }

    fn deliver(this: &Arc<Inner>, msg: ProtoMsg) {
        let mut sessions = this.lock_sessions();
        Inner::deliver_locked(this, &mut sessions, msg);
    }

    fn deliver_locked(this: &Arc<Inner>, sessions: &mut HashMap<String, Entry>, msg: ProtoMsg) {
        let sid = msg.hdr.sid.clone();
        if let Some(e) = sessions.get(&sid) {
            if e.depth.full_for(&msg) {
                log::error!("session {sid}: too many messages unhandled; closing it");
                if let Some(e) = sessions.remove(&sid) {
                    let _ = e.tx.send(Inbox::Shutdown);
                }
                let err = ControlError {
                    err: "session inbound queue full".to_string(),
                    close: true,
                    msgproto: msg.hdr.proto,
                    msgtype: msg.hdr.typ.clone(),
                    ..ControlError::default()
                };
                this.try_reply(control_error_msg(&sid, &err));
                return;
            }
            e.depth.add(&msg);
            // cannot fail: a session leaves the table before its receiver goes
            let _ = e.tx.send(Inbox::Msg(msg));
            return;
        }
        if sessions.len() >= MAX_SESSIONS {
            log::error!("session {sid}: {MAX_SESSIONS} sessions open; refusing another");
            let err = ControlError {
                err: "too many sessions".to_string(),
                close: true,
                msgproto: msg.hdr.proto,
                msgtype: msg.hdr.typ.clone(),
                ..ControlError::default()
            };
            this.try_reply(control_error_msg(&sid, &err));
            return;
        }
        let (tx, rx) = crossbeam_channel::unbounded();
        let depth = Arc::new(Depth::default());
        depth.add(&msg);
        let id = this.next_id.fetch_add(1, Ordering::Relaxed);
        if tx.send(Inbox::Msg(msg)).is_err() {
            return;
        }
        let worker = Arc::clone(this);
        let thread_depth = Arc::clone(&depth);
        let thread_sid = sid.clone();
        *this.live.0.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        let spawned = std::thread::Builder::new()
            .name(format!("sess-{}", sid8(&sid)))
            .stack_size(SESSION_STACK)
            .spawn(move || {
                session_loop(&worker, &thread_sid, id, rx, &thread_depth);
                let (lock, cv) = &worker.live;
                *lock.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
                cv.notify_all();
            });
        match spawned {
            Ok(_) => {
                sessions.insert(sid, Entry { tx, depth, id });
            }
            Err(e) => {
                *this.live.0.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
                log::error!("session {sid}: cannot start a thread: {e}");
                let err = ControlError {
                    err: format!("internal error: {e}"),
                    close: true,
                    ..ControlError::default()
                };
                this.try_reply(control_error_msg(&sid, &err));
            }
        }
    }

    /// Removes session `id` from the table; messages that reached it after it
    /// decided to end go, in order, to a fresh session for the same sid.
    fn end_session(this: &Arc<Inner>, sid: &str, id: usize, rx: &Receiver<Inbox>) {
        let mut sessions = this.lock_sessions();
        if sessions.get(sid).is_some_and(|e| e.id == id) {
            sessions.remove(sid);
        }
        while let Ok(item) = rx.try_recv() {
            if let Inbox::Msg(m) = item {
                Inner::deliver_locked(this, &mut sessions, m);
            }
        }
    }
}

fn session_loop(inner: &Arc<Inner>, sid: &str, id: usize, rx: Receiver<Inbox>, depth: &Depth) {
    let ctx = SessionCtx {
        sid: sid.to_string(),
        // its own lane: a session streaming at full speed must not starve the others
        out: inner.out.lane(),
    };
    let mut handlers: HashMap<u16, Box<dyn Handler>> = HashMap::new();
    let idle = inner.timing.session_idle;
    let mut pinged = false;
    let mut shutdown = false;
    loop {
        let wait = if pinged { idle / 5 } else { idle * 4 / 5 };
        match rx.recv_timeout(wait) {
            Ok(Inbox::Msg(msg)) => {
                depth.take(&msg);
                pinged = false;
                if !handle_message(inner, &ctx, &mut handlers, msg) {
                    break;
                }
            }
            Ok(Inbox::Shutdown) | Err(RecvTimeoutError::Disconnected) => {
                shutdown = true;
                break;
            }
            Err(RecvTimeoutError::Timeout) if !pinged => {
                pinged = true;
                let ping = ProtoMsg::new(PROTO_CONTROL, "ping", sid);
                if ctx.out.send(&ping).is_err() {
                    log::debug!("session {sid}: idle ping not sent (no connection)");
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                log::info!("session {sid}: timed out");
                let err = ControlError {
                    err: "session timeout".to_string(),
                    close: true,
                    ..ControlError::default()
                };
                let _ = ctx.out.send(&control_error_msg(sid, &err));
                break;
            }
        }
    }
    if !shutdown {
        Inner::end_session(inner, sid, id, &rx);
    }
    for (_, mut h) in handlers {
        h.close();
    }
    log::debug!("session {sid}: ended");
}

/// Returns false when the session must end.
fn handle_message(
    inner: &Inner,
    ctx: &SessionCtx,
    handlers: &mut HashMap<u16, Box<dyn Handler>>,
    msg: ProtoMsg,
) -> bool {
    let proto = msg.hdr.proto;
    if proto == PROTO_CONTROL {
        let action = control_action(&msg, &inner.protocols());
        let (reply, go_on) = match action {
            ControlAction::Nothing => (None, true),
            ControlAction::Reply(r) => (Some(r), true),
            ControlAction::ReplyAndEnd(r) => (Some(r), false),
            ControlAction::End => (None, false),
        };
        if let Some(Err(e)) = reply.map(|r| ctx.out.send(&r)) {
            log::debug!("session {}: control reply not sent: {e}", ctx.sid);
        }
        return go_on;
    }
    if let Some(h) = handlers.get_mut(&proto) {
        h.handle(msg);
        return true;
    }
    match inner.registry.create(proto, ctx) {
        Some(mut h) => {
            h.handle(msg);
            handlers.insert(proto, h);
        }
        None => {
            let err = ControlError {
                err: format!("no handler registered for protocol: 0x{proto:04X}"),
                close: false,
                msgproto: proto,
                msgtype: msg.hdr.typ.clone(),
                msgid: msg.prop_str("msgid").unwrap_or_default().to_string(),
                ..ControlError::default()
            };
            let _ = ctx.out.send(&control_error_msg(&ctx.sid, &err));
        }
    }
    true
}
