//! The router's decisions without threads or sockets: the session table, the
//! idle timers of sessions that have no thread, and what to do with each
//! message. The router (`super`) runs the I/O the returned actions name.
//!
//! A session that has only seen control messages costs no thread: its
//! control messages are answered on the connection thread and its idle timer
//! runs from the link's tick. deviceconnect opens every shell with such a
//! handshake and then speaks protocol 1, which bypasses router sessions, so
//! a shell costs one thread, not two. The first message of another protocol
//! starts the session's thread, which then keeps its own timer.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::wire::action::{ControlAction, control_action, control_error_msg};
use crate::wire::codec::{PROTO_CONTROL, ProtoMsg};
use crate::wire::control::ControlError;
use crate::wire::types::control;

/// Router sessions alive at once; the server chooses how many sids it sends.
pub const MAX_SESSIONS: usize = 512;

/// A session thread's inbox, as far as the core needs to know it.
pub trait Mailbox {
    /// Whether queueing `msg` would overfill it (the session is broken).
    fn full_for(&self, msg: &ProtoMsg) -> bool;
}

enum Slot<T> {
    /// Control messages only so far: served on the connection thread.
    Light {
        /// Last message (or creation).
        heard: Instant,
        /// When the idle ping went out, if it did.
        pinged: Option<Instant>,
    },
    /// Has its own thread, which keeps its own timer.
    Thread {
        /// Tells this thread from a later one for the same sid.
        id: usize,
        mailbox: T,
    },
}

/// What to do with one message for a router session.
pub enum Route<'a, T> {
    /// A thread-less session's control message: send `reply`, if any (the
    /// session may have ended with it).
    Reply(Option<ProtoMsg>),
    /// Queue the message for the session's thread.
    Deliver(&'a T),
    /// Start a thread for the session with this message, then report it
    /// with [`Core::started`] under this id.
    Start(usize),
    /// Refuse with this error; `Some` is the session's thread, removed from
    /// the table, to be told to end.
    Refuse(ProtoMsg, Option<T>),
}

/// What a timer of a thread-less session fired.
#[derive(Debug, PartialEq)]
pub enum Fired {
    /// Send this idle ping.
    Ping(ProtoMsg),
    /// The session timed out (removed): send this error.
    Timeout(String, ProtoMsg),
}

/// The control error that ends an idle session, as the reference sends it.
pub(super) fn session_timeout(sid: &str) -> ProtoMsg {
    control_error_msg(sid, &ControlError::new("session timeout", true))
}

/// The session table and its timers.
pub struct Core<T> {
    slots: HashMap<String, Slot<T>>,
    protocols: Vec<u16>,
    idle: Duration,
    next_id: usize,
    /// No thread-less timer fires before this (a lower bound: recomputed
    /// by `tick`, so a session that ended or heard from early only costs
    /// one early tick).
    due: Option<Instant>,
}

impl<T: Mailbox> Core<T> {
    /// An empty table; `protocols` go into handshake replies, `idle` is the
    /// session idle timeout (ping at 4/5, end at 5/5).
    pub fn new(protocols: Vec<u16>, idle: Duration) -> Core<T> {
        Core {
            slots: HashMap::new(),
            protocols,
            idle,
            next_id: 1,
            due: None,
        }
    }

    /// Sessions alive, with or without a thread.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no session is alive.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Sessions that have a thread.
    #[cfg(test)]
    pub fn threads(&self) -> usize {
        self.slots
            .values()
            .filter(|s| matches!(s, Slot::Thread { .. }))
            .count()
    }

    /// The thread of session `sid`, if it has one.
    pub fn mailbox(&self, sid: &str) -> Option<&T> {
        match self.slots.get(sid) {
            Some(Slot::Thread { mailbox, .. }) => Some(mailbox),
            _ => None,
        }
    }

    fn deadline(&self, slot: &Slot<T>) -> Option<Instant> {
        match slot {
            Slot::Light {
                pinged: Some(at), ..
            } => Some(*at + self.idle / 5),
            Slot::Light { heard, .. } => Some(*heard + self.idle * 4 / 5),
            Slot::Thread { .. } => None,
        }
    }

    fn lower_due(&mut self, at: Option<Instant>) {
        self.due = match (self.due, at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    /// Decides what `msg` (any protocol but the shell's) does at `now`.
    pub fn route(&mut self, msg: &ProtoMsg, now: Instant) -> Route<'_, T> {
        let sid = msg.hdr.sid.as_str();
        let control = msg.hdr.proto == PROTO_CONTROL;
        match self.slots.get(sid) {
            Some(Slot::Thread { mailbox, .. }) if mailbox.full_for(msg) => {
                let err = refusal("session inbound queue full", msg);
                let taken = match self.slots.remove(sid) {
                    Some(Slot::Thread { mailbox, .. }) => Some(mailbox),
                    _ => None,
                };
                return Route::Refuse(err, taken);
            }
            Some(Slot::Thread { .. }) => {
                return match self.slots.get(sid) {
                    Some(Slot::Thread { mailbox, .. }) => Route::Deliver(mailbox),
                    _ => Route::Reply(None),
                };
            }
            Some(Slot::Light { .. }) if !control => {
                // the thread takes the session (and its timer) over
                self.slots.remove(sid);
                return Route::Start(self.take_id());
            }
            Some(Slot::Light { .. }) => {}
            None if self.slots.len() >= MAX_SESSIONS => {
                return Route::Refuse(refusal("too many sessions", msg), None);
            }
            None if !control => return Route::Start(self.take_id()),
            None => {}
        }
        let (reply, go_on) = match control_action(msg, &self.protocols) {
            ControlAction::Nothing => (None, true),
            ControlAction::Reply(r) => (Some(r), true),
            ControlAction::ReplyAndEnd(r) => (Some(r), false),
            ControlAction::End => (None, false),
        };
        if go_on {
            let slot = Slot::Light {
                heard: now,
                pinged: None,
            };
            let at = self.deadline(&slot);
            self.slots.insert(sid.to_string(), slot);
            self.lower_due(at);
        } else {
            self.slots.remove(sid);
        }
        Route::Reply(reply)
    }

    fn take_id(&mut self) -> usize {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// The thread for `sid` started by [`Route::Start`] runs.
    pub fn started(&mut self, sid: &str, id: usize, mailbox: T) {
        self.slots
            .insert(sid.to_string(), Slot::Thread { id, mailbox });
    }

    /// Thread `id` of `sid` ends by itself; removes it unless a later
    /// session took the sid meanwhile.
    pub fn ended(&mut self, sid: &str, id: usize) {
        if matches!(self.slots.get(sid), Some(Slot::Thread { id: i, .. }) if *i == id) {
            self.slots.remove(sid);
        }
    }

    /// When [`tick`](Self::tick) next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.due
    }

    /// Fires the timers of thread-less sessions due at `now`.
    pub fn tick(&mut self, now: Instant) -> Vec<Fired> {
        let mut fired = Vec::new();
        let idle = self.idle;
        let mut due: Option<Instant> = None;
        self.slots.retain(|sid, slot| {
            let Slot::Light { heard, pinged } = slot else {
                return true;
            };
            let timeout = || Fired::Timeout(sid.clone(), session_timeout(sid));
            match *pinged {
                // The tick runs on the connection thread: with no link for
                // a while, both the ping and the end were due. A session
                // thread would have ended meanwhile (its ping lost), so end.
                None if now >= *heard + idle => {
                    fired.push(timeout());
                    return false;
                }
                None if now >= *heard + idle * 4 / 5 => {
                    *pinged = Some(now);
                    fired.push(Fired::Ping(ProtoMsg::new(
                        PROTO_CONTROL,
                        control::PING,
                        sid,
                    )));
                }
                Some(at) if now >= at + idle / 5 => {
                    fired.push(timeout());
                    return false;
                }
                _ => {}
            }
            let at = match *pinged {
                Some(at) => at + idle / 5,
                None => *heard + idle * 4 / 5,
            };
            due = Some(due.map_or(at, |d| d.min(at)));
            true
        });
        self.due = due;
        fired
    }

    /// Empties the table (shutdown): the threads, to be told to end.
    pub fn drain(&mut self) -> Vec<T> {
        self.due = None;
        self.slots
            .drain()
            .filter_map(|(_, s)| match s {
                Slot::Thread { mailbox, .. } => Some(mailbox),
                Slot::Light { .. } => None,
            })
            .collect()
    }
}

/// A control error closing the session `msg` was for.
fn refusal(text: &str, msg: &ProtoMsg) -> ProtoMsg {
    let err = ControlError {
        err: text.to_string(),
        close: true,
        msgproto: msg.hdr.proto,
        msgtype: msg.hdr.typ.clone(),
        ..ControlError::default()
    };
    control_error_msg(&msg.hdr.sid, &err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::codec::PROTO_PORTFORWARD;
    use crate::wire::control::{Accept, Open};
    use std::cell::Cell;

    /// A thread's inbox holding `held` messages, full at `limit`.
    struct Fake {
        held: Cell<usize>,
        limit: usize,
    }

    impl Mailbox for Fake {
        fn full_for(&self, _msg: &ProtoMsg) -> bool {
            self.held.get() >= self.limit
        }
    }

    fn fake(limit: usize) -> Fake {
        Fake {
            held: Cell::new(0),
            limit,
        }
    }

    const IDLE: Duration = Duration::from_secs(60);

    fn core() -> Core<Fake> {
        Core::new(vec![2, 3], IDLE)
    }

    fn open(sid: &str) -> ProtoMsg {
        let body = Open { versions: vec![1] };
        ProtoMsg::new(PROTO_CONTROL, "open", sid).with_body(body.encode())
    }

    fn pf(sid: &str) -> ProtoMsg {
        ProtoMsg::new(PROTO_PORTFORWARD, "new", sid)
    }

    fn reply(r: Route<'_, Fake>) -> Option<ProtoMsg> {
        match r {
            Route::Reply(m) => m,
            _ => panic!("expected a reply on the connection thread"),
        }
    }

    fn error_text(m: &ProtoMsg) -> String {
        ControlError::decode(m.body.as_deref().unwrap_or_default())
            .expect("control error")
            .err
    }

    #[test]
    fn a_handshake_is_answered_without_a_thread() {
        let mut c = core();
        let t0 = Instant::now();
        let m = reply(c.route(&open("s1"), t0)).expect("accept");
        assert_eq!((m.hdr.proto, m.hdr.typ.as_str()), (PROTO_CONTROL, "accept"));
        let accept = Accept::decode(m.body.as_deref().unwrap_or_default()).expect("accept body");
        assert_eq!(accept.protocols, vec![2, 3]);
        assert_eq!((c.len(), c.threads()), (1, 0));
        let pong = reply(c.route(&ProtoMsg::new(PROTO_CONTROL, "ping", "s1"), t0));
        assert_eq!(pong.map(|p| p.hdr.typ), Some("pong".to_string()));
        // close ends it, still without a thread
        assert!(reply(c.route(&ProtoMsg::new(PROTO_CONTROL, "close", "s1"), t0)).is_none());
        assert!(c.is_empty());
    }

    #[test]
    fn a_rejected_handshake_ends_the_session() {
        let mut c = core();
        let bad = ProtoMsg::new(PROTO_CONTROL, "open", "s")
            .with_body(Open { versions: vec![2] }.encode());
        let m = reply(c.route(&bad, Instant::now())).expect("error");
        assert_eq!(error_text(&m), "handshake rejected: require version 1");
        assert!(c.is_empty());
    }

    #[test]
    fn an_idle_thread_less_session_is_pinged_at_four_fifths_and_ends_at_five() {
        let mut c = core();
        let t0 = Instant::now();
        reply(c.route(&open("s"), t0));
        assert_eq!(c.next_deadline(), Some(t0 + IDLE * 4 / 5));
        assert!(
            c.tick(t0 + IDLE * 4 / 5 - Duration::from_millis(1))
                .is_empty()
        );
        let ping_at = t0 + IDLE * 4 / 5;
        assert_eq!(
            c.tick(ping_at),
            vec![Fired::Ping(ProtoMsg::new(PROTO_CONTROL, "ping", "s"))]
        );
        assert_eq!(c.next_deadline(), Some(ping_at + IDLE / 5));
        assert!(c.tick(ping_at + IDLE / 10).is_empty());
        let fired = c.tick(ping_at + IDLE / 5);
        let [Fired::Timeout(sid, m)] = fired.as_slice() else {
            panic!("expected a timeout: {fired:?}");
        };
        assert_eq!(sid, "s");
        // the reference's bytes: {err: "session timeout", close: true}
        let body = m.body.as_deref().unwrap_or_default();
        assert_eq!(
            body,
            b"\x82\xa3err\xafsession timeout\xa5close\xc3".as_slice()
        );
        assert_eq!((m.hdr.proto, m.hdr.typ.as_str()), (PROTO_CONTROL, "error"));
        assert!(c.is_empty());
        assert!(c.tick(ping_at + IDLE).is_empty());
        assert_eq!(c.next_deadline(), None);
    }

    #[test]
    fn a_session_whose_whole_idle_time_passed_without_a_tick_just_ends() {
        let mut c = core();
        let t0 = Instant::now();
        reply(c.route(&open("s"), t0));
        let fired = c.tick(t0 + IDLE);
        assert!(
            matches!(fired.as_slice(), [Fired::Timeout(sid, _)] if sid == "s"),
            "{fired:?}"
        );
        assert!(c.is_empty());
    }

    #[test]
    fn any_control_message_rearms_the_idle_timer() {
        let mut c = core();
        let t0 = Instant::now();
        reply(c.route(&open("s"), t0));
        let ping_at = t0 + IDLE * 4 / 5;
        assert_eq!(c.tick(ping_at).len(), 1);
        // the server answers the ping: the session lives on
        let later = ping_at + Duration::from_secs(1);
        reply(c.route(&ProtoMsg::new(PROTO_CONTROL, "pong", "s"), later));
        assert!(c.tick(ping_at + IDLE / 5).is_empty());
        assert_eq!(c.next_deadline(), Some(later + IDLE * 4 / 5));
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn the_first_non_control_message_starts_the_thread_which_takes_the_timer() {
        let mut c = core();
        let t0 = Instant::now();
        reply(c.route(&open("s"), t0));
        let Route::Start(id) = c.route(&pf("s"), t0) else {
            panic!("expected a thread start");
        };
        c.started("s", id, fake(8));
        assert_eq!((c.len(), c.threads()), (1, 1));
        // its control messages now go to the thread, in order with the rest
        assert!(matches!(
            c.route(&ProtoMsg::new(PROTO_CONTROL, "ping", "s"), t0),
            Route::Deliver(_)
        ));
        assert!(matches!(c.route(&pf("s"), t0), Route::Deliver(_)));
        // no timer of the router's fires for it
        assert!(c.tick(t0 + IDLE * 2).is_empty());
        assert_eq!(c.len(), 1);
        // a non-control message for an unknown sid starts a thread at once
        assert!(matches!(c.route(&pf("t"), t0), Route::Start(i) if i != id));
    }

    #[test]
    fn a_thread_that_ended_leaves_the_table_unless_its_sid_was_taken_again() {
        let mut c = core();
        let t0 = Instant::now();
        let Route::Start(old) = c.route(&pf("s"), t0) else {
            panic!("start");
        };
        c.started("s", old, fake(8));
        let Route::Start(new) = c.route(&pf("t"), t0) else {
            panic!("start");
        };
        c.started("s", new, fake(8));
        c.ended("s", old);
        assert_eq!(c.threads(), 1);
        c.ended("s", new);
        assert!(c.is_empty());
    }

    #[test]
    fn a_full_session_queue_ends_the_session_with_an_error() {
        let mut c = core();
        let t0 = Instant::now();
        let Route::Start(id) = c.route(&pf("s"), t0) else {
            panic!("start");
        };
        c.started("s", id, fake(2));
        c.mailbox("s").expect("thread").held.set(2);
        let Route::Refuse(m, Some(_)) = c.route(&pf("s"), t0) else {
            panic!("expected a refusal that ends the thread");
        };
        assert_eq!(error_text(&m), "session inbound queue full");
        let e = ControlError::decode(m.body.as_deref().unwrap_or_default()).expect("err");
        assert!(e.close);
        assert_eq!((e.msgproto, e.msgtype.as_str()), (PROTO_PORTFORWARD, "new"));
        assert!(c.is_empty());
    }

    #[test]
    fn sessions_beyond_the_cap_are_refused_light_or_not() {
        let mut c = core();
        let t0 = Instant::now();
        for i in 0..MAX_SESSIONS {
            reply(c.route(&open(&format!("s{i}")), t0));
        }
        for m in [open("x"), pf("x")] {
            let Route::Refuse(e, None) = c.route(&m, t0) else {
                panic!("expected a refusal");
            };
            assert_eq!(error_text(&e), "too many sessions");
        }
        // a live session still gets its thread
        assert!(matches!(c.route(&pf("s0"), t0), Route::Start(_)));
        assert_eq!(c.len(), MAX_SESSIONS - 1);
    }

    #[test]
    fn drain_hands_back_every_thread_and_forgets_the_rest() {
        let mut c = core();
        let t0 = Instant::now();
        reply(c.route(&open("a"), t0));
        let Route::Start(id) = c.route(&pf("b"), t0) else {
            panic!("start");
        };
        c.started("b", id, fake(1));
        assert_eq!(c.drain().len(), 1);
        assert!(c.is_empty());
        assert_eq!(c.next_deadline(), None);
    }
}
