//! The router: decodes inbound frames and hands each message to its session
//! (protocol.md §2.5). Runs on the connection thread, so it never blocks:
//! sessions get messages through unbounded channels whose depth it meters.

mod core;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::conn::link::Inbound;
use crate::conn::outbound::{Outbound, QUEUE_FRAMES, SendError};
use crate::conn::timing::Timing;
use crate::sessions::{Deferred, Direct, Handler, Registry, SessionCtx, ShellRouter, Taken, sid8};
use crate::wire::action::{ControlAction, control_action, control_error_msg};
use crate::wire::codec::{self, PROTO_CONTROL, PROTO_SHELL, ProtoMsg, Value};
use crate::wire::control::ControlError;
use crate::wire::view::{self, MsgView};

pub use self::core::MAX_SESSIONS;
use self::core::{Core, Fired, Mailbox, Route};
use crate::wire::types::{control, status};

/// Messages a session may have waiting before it counts as broken: the
/// protocols' own flow control keeps real peers far below this.
pub const SESSION_QUEUE_LIMIT: usize = 512;
/// Bytes of message bodies a session may have waiting (one message of any
/// size is always accepted), so a stalled session cannot hoard memory.
pub const SESSION_QUEUE_BYTES: usize = 16 << 20;
/// Stack of a router-session thread: it only dispatches.
const SESSION_STACK: usize = 128 * 1024;

enum Inbox {
    Msg(ProtoMsg),
    Shutdown,
}

/// A session thread as the table holds it.
struct Entry {
    tx: Sender<Inbox>,
    depth: Arc<Depth>,
    direct: Arc<DirectSlots>,
}

/// The [`Direct`] ways of a session's handlers, by protocol: set by its
/// thread, used by the connection thread.
#[derive(Default)]
struct DirectSlots(Mutex<Vec<(u16, Arc<dyn Direct>)>>);

impl DirectSlots {
    fn lock(&self) -> MutexGuard<'_, Vec<(u16, Arc<dyn Direct>)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, proto: u16) -> Option<Arc<dyn Direct>> {
        let slots = self.lock();
        slots
            .iter()
            .find(|(p, _)| *p == proto)
            .map(|(_, d)| Arc::clone(d))
    }
}

impl Mailbox for Entry {
    fn full_for(&self, msg: &ProtoMsg) -> bool {
        self.depth.full_for(msg)
    }
}

/// What waits in a session's channel: messages and their body bytes; how
/// many are not handled yet (waiting or in hand); and when a message was
/// last handled on the connection thread instead (its idle timer counts it).
struct Depth {
    msgs: AtomicUsize,
    bytes: AtomicUsize,
    unhandled: AtomicUsize,
    /// Messages handled on the connection thread.
    touches: AtomicUsize,
    epoch: Instant,
    /// Milliseconds since `epoch`, modulo 2^32 (ARMv5 has no 64-bit
    /// atomics; read with wrapping arithmetic, exact for 24 days).
    touched_ms: AtomicU32,
}

impl Depth {
    fn new() -> Depth {
        Depth {
            msgs: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            unhandled: AtomicUsize::new(0),
            touches: AtomicUsize::new(0),
            epoch: Instant::now(),
            touched_ms: AtomicU32::new(0),
        }
    }

    fn now_ms(&self) -> u32 {
        // truncation intended: see `touched_ms`
        self.epoch.elapsed().as_millis() as u32
    }

    /// A message of the session was handled on the connection thread.
    fn touch(&self) {
        self.touched_ms.store(self.now_ms(), Ordering::Release);
        self.touches.fetch_add(1, Ordering::AcqRel);
    }

    /// How many messages were handled on the connection thread so far, and
    /// when the last one was (to the millisecond).
    fn touched(&self) -> (usize, Instant) {
        let n = self.touches.load(Ordering::Acquire);
        let ago = self
            .now_ms()
            .wrapping_sub(self.touched_ms.load(Ordering::Acquire));
        let now = Instant::now();
        let at = now
            .checked_sub(Duration::from_millis(u64::from(ago)))
            .unwrap_or(now);
        (n, at)
    }

    fn add(&self, msg: &ProtoMsg) {
        self.unhandled.fetch_add(1, Ordering::AcqRel);
        self.msgs.fetch_add(1, Ordering::AcqRel);
        self.bytes.fetch_add(body_len(msg), Ordering::AcqRel);
    }

    /// The session thread is done with a message it took.
    fn handled(&self) {
        self.unhandled.fetch_sub(1, Ordering::AcqRel);
    }

    /// Whether the session thread has nothing queued or in hand, so a
    /// message handled elsewhere now cannot overtake one of its own.
    fn idle(&self) -> bool {
        self.unhandled.load(Ordering::Acquire) == 0
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
    /// Listed in handshake replies, ascending.
    protocols: Vec<u16>,
    core: Mutex<Core<Entry>>,
    /// Session threads started and not joined yet.
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Work direct ways left for after this round's replies.
    after: Mutex<Vec<Arc<dyn Deferred>>>,
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
        let mut protocols: Vec<u16> = registry.protocols().collect();
        if shell.is_some() {
            protocols.push(PROTO_SHELL);
        }
        protocols.sort_unstable();
        let core = Core::new(protocols.clone(), timing.session_idle);
        Router {
            inner: Arc::new(Inner {
                out,
                registry,
                shell,
                timing,
                protocols,
                core: Mutex::new(core),
                threads: Mutex::new(Vec::new()),
                after: Mutex::new(Vec::new()),
            }),
        }
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

    /// Routes one decoded message to its session's thread (the direct ways
    /// are offered frames only, in [`Inbound::frame`]).
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
        self.inner.lock_core().len()
    }

    /// Ends every router session and stops every shell; waits for the
    /// session threads up to `wait`.
    pub fn shutdown(&self, wait: Duration) {
        if let Some(shell) = &self.inner.shell {
            let n = shell.terminate_all();
            log::info!("stopped {n} shells");
        }
        let drained = self.inner.lock_core().drain();
        for e in drained {
            let _ = e.tx.send(Inbox::Shutdown);
        }
        let deadline = Instant::now() + wait;
        let mut threads = std::mem::take(&mut *self.inner.lock_threads());
        loop {
            let (done, running): (Vec<_>, Vec<_>) =
                threads.into_iter().partition(JoinHandle::is_finished);
            for h in done {
                let _ = h.join();
            }
            threads = running;
            if threads.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                log::warn!("{} sessions still ending at shutdown", threads.len());
                break;
            }
            // JoinHandle has no timed join: look again shortly
            std::thread::park_timeout(Duration::from_millis(5));
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
        // The direct ways decide on a borrowed view of the frame; only what
        // they leave pays for the full decode and its allocations.
        if view::view(&frame).is_some_and(|v| v.proto != PROTO_SHELL && self.inner.try_direct(&v)) {
            return;
        }
        let len = frame.len();
        self.dispatch_decoded(codec::decode_owned(frame), len);
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.inner.lock_core().next_deadline()
    }

    /// The direct ways' work that waited for their replies to go out.
    fn after_write(&self) {
        let mut due = {
            let mut after = self.inner.lock_after();
            if after.is_empty() {
                return;
            }
            std::mem::take(&mut *after)
        };
        for d in due.drain(..) {
            d.after_write();
        }
        // keep the allocation for the next round
        let mut after = self.inner.lock_after();
        if after.is_empty() {
            *after = due;
        }
    }

    /// Idle pings and timeouts of sessions without a thread.
    fn tick(&self, now: Instant) {
        let fired = self.inner.lock_core().tick(now);
        for f in fired {
            match f {
                Fired::Ping(ping) => self.inner.try_reply(ping),
                Fired::Timeout(sid, err) => {
                    log::info!("session {sid}: timed out");
                    self.inner.try_reply(err);
                }
            }
        }
    }
}

impl Inner {
    fn lock_core(&self) -> MutexGuard<'_, Core<Entry>> {
        // A panicking session thread must not take routing down with it.
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_threads(&self) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.threads.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replies from the connection thread: dropping beats blocking on the
    /// queue this very thread drains.
    fn try_reply(&self, msg: ProtoMsg) {
        // One reply per inbound message, or per thread-less session per
        // tick: they may go over the lane's share (a burst of handshakes
        // while other sessions stream must not lose its accepts), up to a
        // bound that keeps a flooding server from growing the queue.
        match self.out.push_within(&msg, QUEUE_FRAMES + MAX_SESSIONS) {
            Ok(()) => {}
            // as the session threads' sends: nothing to reply over
            Err(SendError::Disconnected) => {
                log::debug!(
                    "reply to session {:?} not sent (no connection)",
                    msg.hdr.sid
                );
            }
            Err(e) => log::warn!("reply to session {:?} dropped: {e}", msg.hdr.sid),
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
            .with_prop("status", Value::Int(status::ERROR))
            .with_body(
                format!("unknown message protocol and type: 1/{}", msg.hdr.typ).into_bytes(),
            );
        self.try_reply(reply);
    }

    /// Offers `msg` to its session's [`Direct`] way when the session has
    /// nothing queued or in hand; whether it was taken.
    fn try_direct(&self, msg: &MsgView<'_>) -> bool {
        let (direct, depth) = {
            let core = self.lock_core();
            let Some(e) = core.mailbox(msg.sid).filter(|e| e.depth.idle()) else {
                return false;
            };
            let Some(d) = e.direct.get(msg.proto) else {
                return false;
            };
            (d, Arc::clone(&e.depth))
        };
        // Only this thread queues messages for a session in the table (a
        // session's leftovers go to its successor before that is visible
        // here), so it stays idle until the message is handled or refused.
        let Some(taken) = direct.try_handle(msg) else {
            return false;
        };
        depth.touch();
        if let Taken::AfterWrite(rest) = taken {
            self.lock_after().push(rest);
        }
        true
    }

    fn lock_after(&self) -> MutexGuard<'_, Vec<Arc<dyn Deferred>>> {
        self.after.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn deliver(this: &Arc<Inner>, msg: ProtoMsg) {
        let mut core = this.lock_core();
        Inner::deliver_locked(this, &mut core, msg);
    }

    fn deliver_locked(this: &Arc<Inner>, core: &mut Core<Entry>, msg: ProtoMsg) {
        let id = match core.route(&msg, Instant::now()) {
            Route::Reply(reply) => {
                if let Some(r) = reply {
                    this.try_reply(r);
                }
                return;
            }
            Route::Deliver(e) => {
                e.depth.add(&msg);
                // cannot fail: a session leaves the table before its receiver goes
                let _ = e.tx.send(Inbox::Msg(msg));
                return;
            }
            Route::Refuse(err, ended) => {
                let sid = &msg.hdr.sid;
                match ended {
                    Some(e) => {
                        log::error!("session {sid}: too many messages unhandled; closing it");
                        let _ = e.tx.send(Inbox::Shutdown);
                    }
                    None => {
                        log::error!("session {sid}: {MAX_SESSIONS} sessions open; refusing another")
                    }
                }
                this.try_reply(err);
                return;
            }
            Route::Start(id) => id,
        };
        let sid = msg.hdr.sid.clone();
        let (tx, rx) = crossbeam_channel::unbounded();
        let depth = Arc::new(Depth::new());
        depth.add(&msg);
        if tx.send(Inbox::Msg(msg)).is_err() {
            return;
        }
        let direct = Arc::new(DirectSlots::default());
        let session = Session {
            inner: Arc::clone(this),
            sid: sid.clone(),
            id,
            depth: Arc::clone(&depth),
            direct: Arc::clone(&direct),
        };
        let name = format!("sess-{}", sid8(&sid));
        let spawned = crate::threads::spawn(name, SESSION_STACK, move || {
            session_loop(&session, rx);
        });
        match spawned {
            Ok(handle) => {
                core.started(&sid, id, Entry { tx, depth, direct });
                let mut threads = this.lock_threads();
                // the ended ones are joined here, so the list stays short
                let (done, running): (Vec<_>, Vec<_>) = std::mem::take(&mut *threads)
                    .into_iter()
                    .partition(JoinHandle::is_finished);
                *threads = running;
                threads.push(handle);
                drop(threads);
                for h in done {
                    let _ = h.join();
                }
            }
            Err(e) => {
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
        let mut core = this.lock_core();
        core.ended(sid, id);
        while let Ok(item) = rx.try_recv() {
            if let Inbox::Msg(m) = item {
                Inner::deliver_locked(this, &mut core, m);
            }
        }
    }
}

/// What a session thread knows of itself.
struct Session {
    inner: Arc<Inner>,
    sid: String,
    id: usize,
    depth: Arc<Depth>,
    direct: Arc<DirectSlots>,
}

fn session_loop(s: &Session, rx: Receiver<Inbox>) {
    let (inner, sid, id, depth) = (&s.inner, s.sid.as_str(), s.id, &*s.depth);
    let ctx = SessionCtx {
        sid: sid.to_string(),
        // its own lane: a session streaming at full speed must not starve the others
        out: inner.out.lane(),
    };
    let mut handlers: HashMap<u16, Box<dyn Handler>> = HashMap::new();
    let idle = inner.timing.session_idle;
    // the last message, and when the idle ping went out since
    let mut heard = Instant::now();
    let mut pinged: Option<Instant> = None;
    let mut touches = 0;
    let mut shutdown = false;
    loop {
        let due = match pinged {
            Some(at) => at + idle / 5,
            None => heard + idle * 4 / 5,
        };
        match rx.recv_timeout(due.saturating_duration_since(Instant::now())) {
            Ok(Inbox::Msg(msg)) => {
                depth.take(&msg);
                heard = Instant::now();
                pinged = None;
                let go_on = handle_message(inner, &ctx, &mut handlers, &s.direct, msg);
                if !go_on {
                    // Before the session counts as idle: a message arriving
                    // before end_session must wait in the channel (for a
                    // fresh session), not take the connection thread's path
                    // into handlers that are about to close.
                    s.direct.lock().clear();
                    depth.handled();
                    break;
                }
                depth.handled();
            }
            Ok(Inbox::Shutdown) | Err(RecvTimeoutError::Disconnected) => {
                shutdown = true;
                break;
            }
            Err(RecvTimeoutError::Timeout) if depth.touched().0 != touches => {
                // Messages handled on the connection thread count too; they
                // came after the last look (and after a ping sent then).
                let (n, at) = depth.touched();
                touches = n;
                heard = heard.max(at).max(pinged.unwrap_or(heard));
                pinged = None;
            }
            Err(RecvTimeoutError::Timeout) if pinged.is_none() => {
                pinged = Some(Instant::now());
                let ping = ProtoMsg::new(PROTO_CONTROL, control::PING, sid);
                if ctx.out.send(&ping).is_err() {
                    log::debug!("session {sid}: idle ping not sent (no connection)");
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                s.direct.lock().clear();
                log::info!("session {sid}: timed out");
                let _ = ctx.out.send(&core::session_timeout(sid));
                break;
            }
        }
    }
    if !shutdown {
        Inner::end_session(inner, sid, id, &rx);
    }
    s.direct.lock().clear();
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
    direct: &DirectSlots,
    msg: ProtoMsg,
) -> bool {
    let proto = msg.hdr.proto;
    if proto == PROTO_CONTROL {
        let action = control_action(&msg, &inner.protocols);
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
            if let Some(d) = h.direct() {
                direct.lock().push((proto, d));
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::codec::PROTO_PORTFORWARD;

    /// A handler whose direct way records what it did, and when.
    struct Recorder(Arc<Mutex<Vec<&'static str>>>);

    impl Handler for Recorder {
        fn handle(&mut self, _msg: ProtoMsg) {
            self.0.lock().expect("log").push("thread");
        }
        fn close(&mut self) {}
        fn direct(&self) -> Option<Arc<dyn Direct>> {
            Some(Arc::new(Recorder(Arc::clone(&self.0))))
        }
    }

    impl Direct for Recorder {
        fn try_handle(&self, _msg: &MsgView<'_>) -> Option<Taken> {
            self.0.lock().expect("log").push("direct");
            Some(Taken::AfterWrite(Arc::new(Recorder(Arc::clone(&self.0)))))
        }
    }

    impl Deferred for Recorder {
        fn after_write(&self) {
            self.0.lock().expect("log").push("after");
        }
    }

    #[test]
    fn work_a_direct_way_leaves_for_after_the_write_runs_only_then_and_once() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut registry = Registry::new();
        let l = Arc::clone(&log);
        registry.register(
            PROTO_PORTFORWARD,
            Box::new(move |_| Box::new(Recorder(Arc::clone(&l)))),
        );
        let wake = Arc::new(crate::sys::wake::Wake::new().expect("eventfd"));
        let (out, _rx) = crate::conn::outbound::queue(wake);
        let router = Router::new(out, registry, None, Timing::default());
        let frame = || codec::encode(&fwd(4));
        // the first message starts the session thread, which lends the
        // direct way once its handler exists
        router.frame(frame());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            router.frame(frame());
            if log.lock().expect("log").contains(&"direct") {
                break;
            }
            assert!(Instant::now() < deadline, "never handled directly");
            std::thread::yield_now();
        }
        assert!(!log.lock().expect("log").contains(&"after"));
        router.after_write();
        router.after_write();
        let log = log.lock().expect("log");
        assert_eq!(log.iter().filter(|e| **e == "after").count(), 1);
        assert_eq!(log.last(), Some(&"after"));
        drop(log);
        router.shutdown(Duration::from_secs(5));
    }

    fn fwd(len: usize) -> ProtoMsg {
        ProtoMsg::new(PROTO_PORTFORWARD, "forward", "s").with_body(vec![0; len])
    }

    #[test]
    fn a_session_queue_is_full_at_its_message_limit_or_its_byte_bound() {
        let d = Depth::new();
        // one message of any size is always accepted
        assert!(!d.full_for(&fwd(SESSION_QUEUE_BYTES * 2)));
        for _ in 0..SESSION_QUEUE_LIMIT - 1 {
            d.add(&fwd(0));
        }
        assert!(!d.full_for(&fwd(0)));
        d.add(&fwd(0));
        assert!(d.full_for(&fwd(0)));
        d.take(&fwd(0));
        assert!(!d.full_for(&fwd(0)));
        d.add(&fwd(SESSION_QUEUE_BYTES - 1));
        assert!(d.full_for(&fwd(2)));
    }

    #[test]
    fn a_message_handled_on_the_connection_thread_is_counted_with_its_time() {
        let d = Depth::new();
        assert_eq!(d.touched().0, 0);
        let before = Instant::now();
        d.touch();
        let (n, at) = d.touched();
        assert_eq!(n, 1);
        // to the millisecond
        assert!(at + Duration::from_millis(1) >= before && at <= Instant::now());
    }
}
