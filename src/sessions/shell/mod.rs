//! The remote terminal (proto 1, behavior.md §5.2–5.11): the table of live
//! shells keyed by sid, limits counted from that table, and the non-blocking
//! hand-off of every shell message from the connection thread to the shell's
//! own thread (`session.rs`), which owns the PTY and the process (`pty.rs`)
//! and does what the shell's pure state (`state.rs`: timers, input, output
//! batching, stop) decides. Each thread's handle is kept here and joined
//! once it has finished; `terminate_all` waits at most 900 ms for them.
//!
//! Differences from the reference, all compatible: a shell that exits frees
//! its slot at once (its sid then answers a later `stop` with success for
//! 10 minutes); stops signal the whole terminal session and reply as soon as
//! the shell is reaped; expiry and health checks are per-shell timers (an
//! expired or unanswered shell also sends a device `stop`, status 2); output
//! produced while the link is down is kept (64 KiB per shell, oldest dropped)
//! and sent once `Outbound::is_connected` is true again — a shell holding
//! such output checks that every 200 ms, so `outbound.rs` needed no change.
//! `MENDER_CONNECT_SHELL_PING_MS` shortens the 60 s health-check period for
//! tests; the pong deadline stays 65/60 of it.

mod pty;
mod session;
mod state;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::audit::{Event, Outcome};
use crate::config::{Config, ValidatedUser};
use crate::conn::outbound::Outbound;
use crate::sessions::ShellRouter;
use crate::sys::wake::Wake;
use crate::wire::codec::{PROTO_SHELL, ProtoMsg, Value};
use crate::wire::types::{shell as t, status};

pub use pty::SpawnError;

/// Device-wide shell limit (behavior.md §5.2).
pub const MAX_SHELLS: usize = 16;
/// Health-check ping period (§5.9) unless `PING_ENV` overrides it.
pub const PING_INTERVAL: Duration = Duration::from_secs(60);
/// Overrides the ping period in milliseconds (tests); the pong deadline
/// scales with it (65/60 of the period, 65 s by default).
pub const PING_ENV: &str = "MENDER_CONNECT_SHELL_PING_MS";
/// Input bytes a shell may have queued but not yet written to its PTY.
const INPUT_BUDGET: usize = 256 * 1024;
/// How long a naturally ended shell's sid still answers `stop` with success.
const TOMBSTONE_TTL: Duration = Duration::from_secs(600);
const MAX_TOMBSTONES: usize = 1024;
/// Budget for ending every shell at shutdown or auth loss.
const TERMINATE_ALL_WAIT: Duration = Duration::from_millis(900);

/// The stop flag bits a shell thread checks on every wake-up.
pub(crate) const STOP_REPLY: u8 = 1;
pub(crate) const STOP_QUIET: u8 = 2;

/// Who asked a shell to stop (`Control::by`), for the audit trail.
pub(crate) const BY_OPERATOR: u8 = 0;
pub(crate) const BY_DISCONNECT: u8 = 1;
pub(crate) const BY_SHUTDOWN: u8 = 2;

/// The name of a stop cause in audit lines.
pub(crate) fn by_name(by: u8) -> &'static str {
    match by {
        BY_DISCONNECT => "disconnect",
        BY_SHUTDOWN => "shutdown",
        _ => "operator",
    }
}

/// The lock-free side of a shell, shared with the connection thread.
#[derive(Debug)]
pub(crate) struct Control {
    pub wake: Wake,
    pub stop: AtomicU8,
    /// When a pong arrived that the shell has not seen yet. A mutex held
    /// only for a load or store: ARMv5 has no 64-bit atomics to keep a
    /// timestamp in.
    pub pong_at: Mutex<Option<Instant>>,
    /// Input the shell thread has not taken yet, in order. Empty (and
    /// unallocated) while idle: no channel block is kept per shell.
    pub inbox: Mutex<Vec<u8>>,
    /// Input bytes accepted but not yet written to the PTY (inbox and the
    /// shell's own pending input).
    pub queued: AtomicUsize,
    /// The newest requested window size, not yet applied. Only the last one
    /// matters, so a flood of resizes costs no memory.
    pub resize: Mutex<Option<(u16, u16)>>,
    /// Who requested the stop (`BY_*`), set before the stop bit.
    pub by: AtomicU8,
}

/// Fixed per-daemon shell parameters.
#[derive(Debug)]
pub(crate) struct Settings {
    pub recipe: pty::Recipe,
    pub rows: u16,
    pub cols: u16,
    pub max_per_user: usize,
    pub expire_after: Option<Duration>,
    pub expire_idle: Option<Duration>,
    pub ping: Duration,
    pub pong_wait: Duration,
    /// The account shells run as, for the audit trail.
    pub run_as: String,
}

struct Entry {
    user_id: String,
    ctl: Arc<Control>,
    /// The shell's thread; set right after it started.
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Table {
    live: HashMap<String, Entry>,
    tombs: HashMap<String, Instant>,
    /// Threads of shells that released their slot; joined once finished.
    ended: Vec<JoinHandle<()>>,
    /// Shell threads whose work is not over yet (live or finishing).
    running: usize,
}

impl Table {
    /// Joins the ended threads that have finished; a join of a finished
    /// thread does not wait.
    fn join_finished(&mut self) {
        let mut i = 0;
        while i < self.ended.len() {
            if self.ended[i].is_finished() {
                let _ = self.ended.swap_remove(i).join();
            } else {
                i += 1;
            }
        }
    }
}

pub(crate) struct Inner {
    pub settings: Settings,
    pub out: Outbound,
    table: Mutex<Table>,
    emptied: Condvar,
}

/// The terminal: implements [`ShellRouter`] for the connection thread.
pub struct Shells {
    inner: Arc<Inner>,
}

/// A shell reply: same type and sid, `status`, optional text.
pub(crate) fn reply(typ: &str, sid: &str, status: i64, body: Option<String>) -> ProtoMsg {
    let m = ProtoMsg::new(PROTO_SHELL, typ, sid).with_prop("status", Value::Int(status));
    match body {
        Some(b) => m.with_body(b.into_bytes()),
        None => m,
    }
}

/// The health-check ping: `status` 3 and the pong deadline in seconds.
pub(crate) fn ping_msg(sid: &str, timeout_secs: i64) -> ProtoMsg {
    ProtoMsg::new(PROTO_SHELL, t::PING, sid)
        .with_prop("status", Value::Int(status::CONTROL))
        .with_prop("timeout", Value::Int(timeout_secs))
}

/// One piece of terminal output.
pub(crate) fn output_msg(sid: &str, bytes: Vec<u8>) -> ProtoMsg {
    ProtoMsg::new(PROTO_SHELL, t::SHELL, sid)
        .with_prop("status", Value::Int(status::NORMAL))
        .with_body(bytes)
}

fn nonzero_secs(s: u32) -> Option<Duration> {
    (s > 0).then(|| Duration::from_secs(s.into()))
}

impl Shells {
    /// The terminal for `cfg`, replies going to `out`.
    pub fn new(
        cfg: &Config,
        user: &ValidatedUser,
        out: Outbound,
        ping: Duration,
    ) -> Result<Shells, SpawnError> {
        let root = crate::sys::user::uid() == 0;
        if !root {
            let me = crate::sys::user::euid();
            if me != user.uid {
                log::warn!(
                    "not running as root: shells run as uid {me}, not as User {:?}",
                    user.name
                );
            }
        }
        let me = crate::sys::user::euid();
        let run_as = if root || me == user.uid {
            user.name.clone()
        } else {
            format!("uid {me}")
        };
        let recipe = pty::Recipe::new(&cfg.shell_command, &cfg.shell_arguments, user, root)?;
        let s = &cfg.sessions;
        let (expire_after, expire_idle) = if s.stop_expired {
            (
                nonzero_secs(s.expire_after),
                nonzero_secs(s.expire_after_idle),
            )
        } else {
            (None, None)
        };
        let settings = Settings {
            recipe,
            rows: if cfg.terminal.height > 0 {
                cfg.terminal.height
            } else {
                40
            },
            cols: if cfg.terminal.width > 0 {
                cfg.terminal.width
            } else {
                80
            },
            max_per_user: (s.max_per_user.max(1)) as usize,
            // Idle expiry wins when both are set (§5.8).
            expire_after: if expire_idle.is_some() {
                None
            } else {
                expire_after
            },
            expire_idle,
            ping,
            pong_wait: ping * 65 / 60,
            run_as,
        };
        Ok(Shells {
            inner: Arc::new(Inner {
                settings,
                // one lane for every shell, apart from the router sessions
                out: out.lane(),
                table: Mutex::new(Table::default()),
                emptied: Condvar::new(),
            }),
        })
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // a panicking shell thread must not take the terminal down with it
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replies from the connection thread: never wait on the queue it drains.
    fn try_reply(&self, msg: ProtoMsg) {
        if let Err(e) = self.out.try_send(&msg) {
            log::warn!(
                "shell reply {:?} for session {} dropped: {e}",
                msg.hdr.typ,
                msg.hdr.sid
            );
        }
    }

    /// The shell thread for `sid` is ending: free its slot, remember the sid
    /// if the server may still send `stop` for it.
    pub(crate) fn release(&self, sid: &str, tombstone: bool) {
        let mut t = self.lock();
        t.join_finished();
        if let Some(h) = t.live.remove(sid).and_then(|e| e.thread) {
            // a thread cannot join itself: the next release, spawn or
            // terminate_all does
            t.ended.push(h);
        }
        if tombstone {
            let now = Instant::now();
            t.tombs
                .retain(|_, at| now.duration_since(*at) < TOMBSTONE_TTL);
            if t.tombs.len() >= MAX_TOMBSTONES {
                t.tombs.clear();
            }
            t.tombs.insert(sid.to_string(), now);
        }
        if t.live.is_empty() {
            self.emptied.notify_all();
        }
    }

    /// The shell thread's work is over (it returns right after).
    pub(crate) fn thread_done(&self) {
        let mut t = self.lock();
        t.running = t.running.saturating_sub(1);
        if t.running == 0 {
            self.emptied.notify_all();
        }
    }

    fn spawn(this: &Arc<Inner>, msg: &ProtoMsg) {
        let sid = &msg.hdr.sid;
        let user_id = msg.prop_str("user_id").unwrap_or("").to_string();
        let (rows, cols) = match size_props(msg) {
            Some(rc) => rc,
            None => (this.settings.rows, this.settings.cols),
        };
        let mut t = this.lock();
        t.join_finished();
        let refuse = if t.live.len() >= MAX_SHELLS {
            Some(("too many shells spawned", Some("shells per device cap")))
        } else if t.live.contains_key(sid) {
            Some(("failed to start shell: shell is already running", None))
        } else if t.live.values().filter(|e| e.user_id == user_id).count()
            >= this.settings.max_per_user
        {
            Some((
                "user has too many open sessions",
                Some("Sessions.MaxPerUser"),
            ))
        } else {
            None
        };
        if let Some((text, rule)) = refuse {
            drop(t);
            log::warn!("refusing shell for session {sid}: {text}");
            match rule {
                Some(rule) => Event::refused("shell open", &user_id, sid, rule, text),
                None => Event::new("shell open", &user_id, sid, Outcome::Error).with("err", text),
            }
            .emit();
            this.try_reply(reply(t::NEW, sid, status::ERROR, Some(text.to_string())));
            return;
        }
        let wake = match Wake::new() {
            Ok(w) => w,
            Err(e) => {
                drop(t);
                this.try_reply(reply(
                    t::NEW,
                    sid,
                    status::ERROR,
                    Some(format!(
                        "failed to start shell: {}",
                        crate::sys::errno::go_text(&e)
                    )),
                ));
                return;
            }
        };
        let ctl = Arc::new(Control {
            wake,
            stop: AtomicU8::new(0),
            pong_at: Mutex::new(None),
            inbox: Mutex::new(Vec::new()),
            queued: AtomicUsize::new(0),
            resize: Mutex::new(None),
            by: AtomicU8::new(BY_OPERATOR),
        });
        t.tombs.remove(sid);
        t.live.insert(
            sid.clone(),
            Entry {
                user_id: user_id.clone(),
                ctl: Arc::clone(&ctl),
                thread: None,
            },
        );
        t.running += 1;
        drop(t);
        let who = (sid.clone(), user_id);
        match session::start(Arc::clone(this), who, ctl, rows, cols) {
            Ok(h) => {
                let mut t = this.lock();
                match t.live.get_mut(sid) {
                    Some(e) => e.thread = Some(h),
                    // it already ended (the shell could not start)
                    None => t.ended.push(h),
                }
            }
            Err(e) => {
                this.release(sid, false);
                this.thread_done();
                this.try_reply(reply(
                    t::NEW,
                    sid,
                    status::ERROR,
                    Some(format!("failed to start shell: {e}")),
                ));
            }
        }
    }

    fn input(&self, msg: ProtoMsg) {
        let sid = msg.hdr.sid.clone();
        let body = msg.body.unwrap_or_default();
        let t = self.lock();
        let Some(e) = t.live.get(&sid) else {
            drop(t);
            self.try_reply(reply(
                t::SHELL,
                &sid,
                status::ERROR,
                Some("session not found".into()),
            ));
            return;
        };
        if body.is_empty() {
            return;
        }
        let queued = e.ctl.queued.load(Ordering::Acquire);
        if queued + body.len() > INPUT_BUDGET {
            drop(t);
            self.try_reply(reply(
                t::SHELL,
                &sid,
                status::ERROR,
                Some(format!(
                    "routeMessage: shell command execution error, session_id={sid}: \
                     failed to write the whole message"
                )),
            ));
            return;
        }
        e.ctl.queued.fetch_add(body.len(), Ordering::AcqRel);
        let mut inbox = e.ctl.inbox.lock().unwrap_or_else(|p| p.into_inner());
        if inbox.is_empty() {
            // the message's own buffer will do
            *inbox = body;
        } else {
            inbox.extend_from_slice(&body);
        }
        drop(inbox);
        e.ctl.wake.wake();
    }

    fn resize(&self, msg: &ProtoMsg) {
        let sid = &msg.hdr.sid;
        let Some((rows, cols)) = size_props(msg) else {
            log::debug!("resize for session {sid} without a valid size ignored");
            return;
        };
        let t = self.lock();
        match t.live.get(sid) {
            Some(e) => {
                *e.ctl.resize.lock().unwrap_or_else(|p| p.into_inner()) = Some((rows, cols));
                e.ctl.wake.wake();
            }
            None => log::error!("resize: session not found for id {sid}"),
        }
    }

    fn pong(&self, sid: &str) {
        let t = self.lock();
        match t.live.get(sid) {
            Some(e) => {
                *e.ctl.pong_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now())
            }
            None => log::error!("pong: session not found for id {sid}"),
        }
    }

    fn stop(&self, msg: &ProtoMsg) {
        let sid = &msg.hdr.sid;
        let mut t = self.lock();
        t.join_finished();
        if sid.is_empty() {
            let user = msg.prop_str("user_id").unwrap_or("");
            if user.is_empty() {
                log::warn!("StopShellMessage: sessionId not given and userId empty");
                return;
            }
            let mut n = 0;
            for e in t.live.values().filter(|e| e.user_id == user) {
                e.ctl.by.store(BY_OPERATOR, Ordering::Release);
                e.ctl.stop.fetch_or(STOP_QUIET, Ordering::AcqRel);
                e.ctl.wake.wake();
                n += 1;
            }
            // A reply without sid would make the server drop the link (§1.7).
            log::info!("stopping {n} shells of user {user:?} (no reply: no session id)");
            return;
        }
        if let Some(e) = t.live.get(sid) {
            // deviceconnect's stop when the operator's websocket closed
            let by = if msg.body.as_deref() == Some(b"user disconnected") {
                BY_DISCONNECT
            } else {
                BY_OPERATOR
            };
            e.ctl.by.store(by, Ordering::Release);
            e.ctl.stop.fetch_or(STOP_REPLY, Ordering::AcqRel);
            e.ctl.wake.wake();
            return;
        }
        let known = t.tombs.remove(sid).is_some();
        drop(t);
        if known {
            // It ended by itself; the server's stop only confirms that.
            self.try_reply(reply(t::STOP, sid, status::NORMAL, None));
        } else {
            self.try_reply(reply(
                t::STOP,
                sid,
                status::ERROR,
                Some(format!(
                    "routeMessage: StopShellMessage: session not found for id {sid}"
                )),
            ));
        }
    }
}

/// Both `terminal_height` and `terminal_width` as integers > 0, truncated to
/// 16 bits like the reference; anything else means "no size".
pub(crate) fn size_props(msg: &ProtoMsg) -> Option<(u16, u16)> {
    let get = |k: &str| {
        msg.prop(k)
            .and_then(Value::as_i64)
            .filter(|&v| v > 0)
            .map(|v| v as u16)
            .filter(|&v| v > 0)
    };
    Some((get("terminal_height")?, get("terminal_width")?))
}

impl ShellRouter for Shells {
    fn dispatch(&self, msg: ProtoMsg) {
        let inner = &self.inner;
        if msg.hdr.sid.is_empty() && msg.hdr.typ != t::STOP {
            // the server aborts the link on a shell message without sid (§1.7)
            log::warn!(
                "ignoring shell message {:?} without session id",
                msg.hdr.typ
            );
            return;
        }
        match msg.hdr.typ.as_str() {
            t::NEW => Inner::spawn(inner, &msg),
            t::SHELL => inner.input(msg),
            t::RESIZE => inner.resize(&msg),
            t::STOP => inner.stop(&msg),
            t::PONG => inner.pong(&msg.hdr.sid),
            other => inner.try_reply(reply(
                other,
                &msg.hdr.sid,
                status::ERROR,
                Some(format!("unknown message protocol and type: 1/{other}")),
            )),
        }
    }

    fn status(&self) -> Vec<String> {
        let t = self.inner.lock();
        let mut lines: Vec<String> = t
            .live
            .iter()
            .map(|(sid, e)| format!("id:{sid} user:{}", e.user_id))
            .collect();
        lines.sort();
        lines
    }

    fn terminate_all(&self) -> usize {
        let inner = &self.inner;
        let mut t = inner.lock();
        let n = t.live.len();
        for e in t.live.values() {
            e.ctl.by.store(BY_SHUTDOWN, Ordering::Release);
            e.ctl.stop.fetch_or(STOP_QUIET, Ordering::AcqRel);
            e.ctl.wake.wake();
        }
        // Every shell stops on its own thread, all at once; a shell whose
        // process will not die must not hold up shutdown, so the wait is
        // bounded and such a thread is left to end on its own.
        let deadline = Instant::now() + TERMINATE_ALL_WAIT;
        while !t.live.is_empty() || t.running > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::warn!("{} shells still stopping", t.live.len().max(t.running));
                break;
            }
            t = inner
                .emptied
                .wait_timeout(t, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        if t.running == 0 {
            // every thread's work is over: these joins wait at most for
            // a thread's exit
            for h in t.ended.drain(..) {
                let _ = h.join();
            }
        } else {
            t.join_finished();
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::codec::encode;

    fn vector(name: &str) -> String {
        let all: serde_json::Value =
            serde_json::from_str(include_str!("../../../tests/data/vectors.json"))
                .expect("vectors.json");
        all.as_array()
            .and_then(|a| a.iter().find(|v| v["name"] == name))
            .and_then(|v| v["hex"].as_str())
            .unwrap_or_else(|| panic!("no vector {name}"))
            .to_string()
    }

    use crate::wire::codec::testhex::hex;

    const S1: &str = "8d4f5d62-6c2b-4d5e-9a57-3f1c1b2a7e01";
    const S2: &str = "8d4f5d62-6c2b-4d5e-9a57-3f1c1b2a7e02";
    const S3: &str = "8d4f5d62-6c2b-4d5e-9a57-3f1c1b2a7e03";
    const S4: &str = "8d4f5d62-6c2b-4d5e-9a57-3f1c1b2a7e04";

    #[test]
    fn device_messages_match_the_reference_bytes() {
        let cases = [
            (
                "shell_new_ok_device",
                reply("new", S1, 1, Some("Shell started".into())),
            ),
            (
                "shell_new_error_device",
                reply("new", S4, 2, Some("user has too many open sessions".into())),
            ),
            (
                "shell_data_device",
                output_msg(S1, b"echo hello\r\n".to_vec()),
            ),
            (
                "shell_data_no_session_device",
                reply("shell", S3, 2, Some("session not found".into())),
            ),
            ("shell_ping_device", ping_msg(S1, 65)),
            ("shell_stop_ok_device", reply("stop", S1, 1, None)),
            (
                "shell_stop_unknown_session_device",
                reply(
                    "stop",
                    S3,
                    2,
                    Some(format!(
                        "routeMessage: StopShellMessage: session not found for id {S3}"
                    )),
                ),
            ),
            (
                "shell_stop_device_initiated",
                reply(
                    "stop",
                    S2,
                    2,
                    Some("read /dev/ptmx: input/output error".into()),
                ),
            ),
            (
                "shell_unknown_type_device",
                reply(
                    "foo",
                    S1,
                    2,
                    Some("unknown message protocol and type: 1/foo".into()),
                ),
            ),
        ];
        for (name, msg) in cases {
            assert_eq!(hex(&encode(&msg)), vector(name), "{name}");
        }
    }

    #[test]
    fn size_needs_both_positive_integers() {
        let m = |h: Value, w: Value| {
            ProtoMsg::new(PROTO_SHELL, "new", S1)
                .with_prop("terminal_height", h)
                .with_prop("terminal_width", w)
        };
        assert_eq!(
            size_props(&m(Value::I8(50), Value::U8(200))),
            Some((50, 200))
        );
        assert_eq!(size_props(&m(Value::I8(0), Value::U8(200))), None);
        assert_eq!(size_props(&m(Value::F64(50.0), Value::U8(200))), None);
        assert_eq!(size_props(&m(Value::Str("50".into()), Value::U8(9))), None);
        assert_eq!(
            size_props(&m(Value::I64(65536 + 7), Value::U16(9))),
            Some((7, 9))
        );
        assert_eq!(size_props(&ProtoMsg::new(PROTO_SHELL, "new", S1)), None);
    }

    #[test]
    fn only_finished_threads_are_joined_and_a_stuck_one_is_kept() {
        let (tx, rx) = crossbeam_channel::bounded::<()>(0);
        let stuck = crate::threads::spawn("shell-stuck".into(), 64 * 1024, move || {
            let _ = rx.recv();
        })
        .expect("spawn");
        let done = crate::threads::spawn("shell-done".into(), 64 * 1024, || {}).expect("spawn");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done.is_finished() {
            assert!(Instant::now() < deadline, "thread did not end");
            std::thread::yield_now();
        }
        let mut t = Table::default();
        t.ended.push(stuck);
        t.ended.push(done);
        t.join_finished();
        assert_eq!(t.ended.len(), 1, "the stuck thread is not waited for");
        assert_eq!(t.ended[0].thread().name(), Some("shell-stuck"));
        drop(tx);
        let h = t.ended.pop().expect("stuck handle");
        h.join().expect("ends once released");
    }
}
