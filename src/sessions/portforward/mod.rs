//! Port forwarding, protocol 3 (protocol.md §3.3, transfer.md §4).
//!
//! The handler runs on the router session's thread and never blocks: each
//! forwarded connection gets its own thread `pf-<sid8>-<n>` that dials (with
//! a timeout), then moves bytes both ways (see `conn`). Server messages reach
//! a connection through its `Inbox`, in order, so `forward` data sent right
//! after `new` (mender-cli does that) is written once the dial succeeds.
//!
//! Differences from the reference, all invisible to deviceconnect and
//! mender-cli:
//! - dial timeout 10 s; connection caps per session and in total, refused
//!   with `too many port-forward connections`;
//! - reads up to 64 KiB per `forward` (see `conn::CHUNK_MAX`), still one
//!   unacked `forward` per connection; a duplicate or unsolicited `ack` is
//!   ignored (the reference crashes);
//! - a client `forward` is acked once accepted, not once written: written
//!   at once when the socket takes it, or buffered up to 256 KiB per
//!   connection (see `inbox`); a later write error ends the connection with
//!   the error and a `stop`. Once a TCP connection is up, its `forward`s
//!   and `ack`s are handled on the websocket's connection thread itself
//!   while its session has nothing queued (`FastPath`), with non-blocking
//!   calls only; the session thread takes everything else. There the `ack`
//!   goes out before the bytes are written (right after, in the same round),
//!   so the client's next `forward` overlaps the target's write;
//! - UDP datagrams are never truncated: reads use a 65535-byte buffer, larger
//!   than any UDP payload; should the kernel still report a truncated
//!   datagram, it is dropped with an error (`datagram of N bytes exceeds …`)
//!   instead of being forwarded cut. A server `forward` too big for one
//!   datagram (over 65507 bytes on IPv4) fails like any write: `ack`, then an
//!   error `write udp …: write: message too long`;
//! - the idle timeout (600 s) counts traffic in both directions; a `forward`
//!   left unacked for 60 s ends the connection with `stop`;
//! - a `new` reusing a live `connection_id` closes the old socket first;
//! - errors carry `connection_id` in props when there is one (transfer.md
//!   §1.4 SHOULD), otherwise the shape is the reference's `{err, msgtype}`;
//! - `PortForward.AllowedTargets` (see `config::allow`) restricts targets: a `new`
//!   outside it gets `port forward to <host>:<port> is not allowed` and no
//!   socket is opened (the reference has no such key and ignores it).
//!
//! Environment overrides (for tests; positive integers, otherwise ignored):
//! `MENDER_CONNECT_PF_IDLE_MS` (idle timeout), `MENDER_CONNECT_PF_ACK_MS`
//! (ack timeout), `MENDER_CONNECT_PF_DIAL_MS` (dial timeout),
//! `MENDER_CONNECT_PF_MAX_PER_SESSION`, `MENDER_CONNECT_PF_MAX_TOTAL`.

mod conn;
mod dial;
mod inbox;

pub use conn::CHUNK_MAX;
pub use dial::{Net, Target};

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::audit::{Event, Outcome};
use crate::config::allow::AllowList;
use crate::knobs::{Lookup, positive, positive_ms};
use crate::sessions::sid8;
use crate::sessions::{Direct, Factory, Handler, SessionCtx, Taken};
use crate::wire::codec::{self, PROTO_PORTFORWARD, ProtoMsg, Value};
use crate::wire::control::{decode_map, encode_map};
use crate::wire::view::MsgView;

use crate::wire::types::portforward as t;
use conn::ConnCtx;
use inbox::{Ack, Fwd, Inbox, Item, Push};

/// Stack of a connection thread; its buffers live on the heap.
const THREAD_STACK: usize = 128 * 1024;

/// Timers and caps; every default is the documented one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// No data in either direction for this long ends a connection (600 s).
    pub idle_timeout: Duration,
    /// A device `forward` unacked this long ends a connection (60 s).
    pub ack_timeout: Duration,
    /// Name resolution plus connect, overall (10 s).
    pub dial_timeout: Duration,
    /// Live connections per session (128).
    pub max_per_session: usize,
    /// Live connections in the whole daemon (256).
    pub max_total: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            idle_timeout: Duration::from_secs(600),
            ack_timeout: Duration::from_secs(60),
            dial_timeout: Duration::from_secs(10),
            max_per_session: 128,
            max_total: 256,
        }
    }
}

impl Settings {
    /// Defaults with the `MENDER_CONNECT_PF_*` overrides applied.
    pub fn from_lookup(get: &Lookup) -> Settings {
        let mut s = Settings::default();
        let ms = |name| positive_ms(get, name);
        if let Some(d) = ms("MENDER_CONNECT_PF_IDLE_MS") {
            s.idle_timeout = d;
        }
        if let Some(d) = ms("MENDER_CONNECT_PF_ACK_MS") {
            s.ack_timeout = d;
        }
        if let Some(d) = ms("MENDER_CONNECT_PF_DIAL_MS") {
            s.dial_timeout = d;
        }
        if let Some(n) = positive(get, "MENDER_CONNECT_PF_MAX_PER_SESSION") {
            s.max_per_session = usize::try_from(n).unwrap_or(usize::MAX);
        }
        if let Some(n) = positive(get, "MENDER_CONNECT_PF_MAX_TOTAL") {
            s.max_total = usize::try_from(n).unwrap_or(usize::MAX);
        }
        s
    }
}

/// The handler factory; all sessions share one global connection count
/// and the allow-list.
pub fn factory(settings: Settings, allow: AllowList) -> Factory {
    let total = Arc::new(AtomicUsize::new(0));
    let allow = Arc::new(allow);
    Box::new(move |ctx: &SessionCtx| {
        Box::new(PortForward {
            ctx: ctx.clone(),
            settings,
            allow: Arc::clone(&allow),
            total: Arc::clone(&total),
            conns: Arc::new(Conns::default()),
            next_n: 0,
            threads: Vec::new(),
        }) as Box<dyn Handler>
    })
}

/// What goes wrong with a server message; `Display` is the wire text.
#[derive(Debug)]
pub enum PfError {
    /// `forward`/`stop`/`ack` for an id that is not live.
    UnknownConnection,
    /// A `typ` this protocol does not have.
    UnknownMessageType,
    /// `new` without connection_id, remote_host, remote_port or protocol.
    InvalidNew,
    /// `new` with a protocol other than tcp/udp.
    UnknownProtocol(String),
    /// The `new` body is not a msgpack map.
    Decode(String),
    /// A cap on live connections was reached.
    TooMany,
    /// The client queued more than the flow control allows.
    QueueFull,
    /// No thread could be started.
    Thread(std::io::Error),
}

impl fmt::Display for PfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PfError::UnknownConnection => write!(f, "unknown connection"),
            PfError::UnknownMessageType => write!(f, "unknown message type"),
            PfError::InvalidNew => write!(
                f,
                "invalid port-forward message: missing connection_id, remote_port or protocol"
            ),
            PfError::UnknownProtocol(p) => write!(f, "unknown protocol: {p}"),
            PfError::Decode(e) => write!(f, "{e}"),
            PfError::TooMany => write!(f, "too many port-forward connections"),
            PfError::QueueFull => write!(
                f,
                "port-forward flow control violated: too many unacknowledged messages"
            ),
            PfError::Thread(e) => write!(f, "cannot start a port-forward thread: {e}"),
        }
    }
}

impl std::error::Error for PfError {}

/// A reply `{connection_id}` with no body (`new`, `ack`, `stop`, `forward`).
pub(crate) fn pf_msg(typ: &str, sid: &str, cid: &str) -> ProtoMsg {
    ProtoMsg::new(PROTO_PORTFORWARD, typ, sid).with_prop("connection_id", Value::Str(cid.into()))
}

/// An error reply: body `{err, msgtype}`; props only `connection_id`, when known.
pub(crate) fn error_msg(sid: &str, cid: Option<&str>, err: &str, msgtype: &str) -> ProtoMsg {
    let mut msg = ProtoMsg::new(PROTO_PORTFORWARD, t::ERROR, sid).with_body(encode_map(&[
        ("err", Value::Str(err.to_string())),
        ("msgtype", Value::Str(msgtype.to_string())),
    ]));
    if let Some(cid) = cid.filter(|c| !c.is_empty()) {
        msg = msg.with_prop("connection_id", Value::Str(cid.to_string()));
    }
    msg
}

/// Parses a `new` body (transfer.md §4.2 steps 1, 2 and 4, in that order);
/// `has_id` says whether the message carried a non-empty `connection_id`.
pub fn parse_new(body: &[u8], has_id: bool) -> Result<Target, PfError> {
    let fields = decode_map(body).map_err(|e| PfError::Decode(e.to_string()))?;
    let (mut host, mut port, mut proto) = (None, None, None);
    // duplicate keys: the last one wins, as in Go
    for (k, v) in fields {
        match k.as_str() {
            "remote_host" => host = v.as_str().map(str::to_string),
            // any integer, truncated to 16 bits (protocol.md §3.3)
            "remote_port" => port = v.as_i64().map(|p| p as u16),
            "protocol" => proto = v.as_str().map(str::to_string),
            _ => {}
        }
    }
    let (Some(host), Some(port), Some(proto)) = (host, port, proto) else {
        return Err(PfError::InvalidNew);
    };
    if host.is_empty() || port == 0 || proto.is_empty() || !has_id {
        return Err(PfError::InvalidNew);
    }
    let net = match proto.as_str() {
        "tcp" => Net::Tcp,
        "udp" => Net::Udp,
        _ => return Err(PfError::UnknownProtocol(proto)),
    };
    Ok(Target { net, host, port })
}

/// A session's live connections by id, shared by its handler and the
/// connection thread's fast path. Held only to look up or change the map.
#[derive(Default)]
struct Conns(Mutex<HashMap<String, Arc<Inbox>>>);

impl Conns {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Inbox>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, cid: &str) -> Option<Arc<Inbox>> {
        self.lock().get(cid).cloned()
    }

    fn remove(&self, cid: &str) -> Option<Arc<Inbox>> {
        self.lock().remove(cid)
    }
}

/// Client `forward`s and `ack`s handled on the connection thread: an
/// established TCP connection takes the bytes into its early-ack buffer and
/// the `ack` is queued at once; the bytes are written with one non-blocking
/// write once the `ack` went out (`after_write`), so the client's next
/// `forward` is on its way while the target takes this one. An `ack` opens
/// the window. Anything else (a connection not up yet, gone, or over its
/// buffer) goes to the session thread as before.
struct FastPath {
    sid: String,
    out: crate::conn::outbound::Outbound,
    conns: Arc<Conns>,
}

impl Direct for FastPath {
    fn try_handle(&self, msg: &MsgView<'_>) -> Option<Taken> {
        let is_ack = match msg.typ {
            t::FORWARD => false,
            t::ACK => true,
            _ => return None,
        };
        let inbox = self.conns.get(msg.prop_str("connection_id")?)?;
        if is_ack {
            return match inbox.ack() {
                Ack::Released => Some(Taken::Done),
                Ack::Unexpected => {
                    log::debug!(
                        "port forward {}: ack with nothing in flight ignored",
                        self.sid
                    );
                    Some(Taken::Done)
                }
                Ack::Closed => None,
            };
        }
        // the ack must be queued without waiting, and not past a full lane
        if !self.out.has_room() {
            return None;
        }
        // Refused, the bytes come back unwritten (`forward_now`'s contract):
        // the session's thread decodes the frame anew and has them all.
        let body = msg.body.unwrap_or_default();
        let held = match inbox.forward_early(body.to_vec()) {
            Ok(held) => held,
            Err(back) => {
                debug_assert_eq!(back.len(), body.len(), "refused after a write");
                return None;
            }
        };
        if let Err(e) = self.out.push_frame_now(inbox.ack_frame().to_vec()) {
            log::debug!("port forward {}: reply not sent: {e}", self.sid);
        }
        if !held {
            return Some(Taken::Done);
        }
        Some(Taken::AfterWrite(inbox))
    }
}

struct PortForward {
    ctx: SessionCtx,
    settings: Settings,
    allow: Arc<AllowList>,
    total: Arc<AtomicUsize>,
    conns: Arc<Conns>,
    next_n: u64,
    /// Connection threads started and not joined yet.
    threads: Vec<JoinHandle<()>>,
}

impl PortForward {
    fn reply_error(&self, cid: &str, e: &PfError, msgtype: &str) {
        log::info!("port forward {}/{cid}: {msgtype}: {e}", self.ctx.sid);
        let msg = error_msg(&self.ctx.sid, Some(cid), &e.to_string(), msgtype);
        if let Err(e) = self.ctx.out.send(&msg) {
            log::debug!("port forward {}: error reply not sent: {e}", self.ctx.sid);
        }
    }

    fn send(&self, msg: &ProtoMsg) {
        if let Err(e) = self.ctx.out.send(msg) {
            log::debug!("port forward {}: reply not sent: {e}", self.ctx.sid);
        }
    }

    fn new_connection(&mut self, cid: &str, user_id: &str, body: &[u8]) -> Result<(), PfError> {
        let target = parse_new(body, !cid.is_empty())?;
        let old = self.conns.remove(cid);
        if let Some(old) = old {
            // a reused id: the old socket goes, silently (its messages would
            // be mistaken for the new connection's)
            log::info!(
                "port forward {}/{cid}: id reused; closing the old connection",
                self.ctx.sid
            );
            old.close_quietly();
        }
        let live = {
            let mut conns = self.conns.lock();
            conns.retain(|_, ib| !ib.is_closed());
            conns.len()
        };
        let refuse = |rule: &str| {
            Event::refused(
                "port forward open",
                user_id,
                &self.ctx.sid,
                rule,
                &PfError::TooMany.to_string(),
            )
            .with("connection_id", cid)
            .with("protocol", target.net.name())
            .with("target", format!("{}:{}", target.host, target.port))
            .emit();
            PfError::TooMany
        };
        if live >= self.settings.max_per_session {
            return Err(refuse("connections per session cap"));
        }
        let max_total = self.settings.max_total;
        let taken = self
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max_total).then_some(n + 1)
            });
        if taken.is_err() {
            return Err(refuse("connections in total cap"));
        }
        let ack = codec::encode(&pf_msg(t::ACK, &self.ctx.sid, cid));
        let inbox = match Inbox::new(Arc::clone(&self.total)) {
            Ok(ib) => Arc::new(ib.with_ack(ack)),
            Err(e) => {
                self.total.fetch_sub(1, Ordering::AcqRel);
                return Err(PfError::Thread(e));
            }
        };
        self.next_n += 1;
        let ctx = ConnCtx {
            sid: self.ctx.sid.clone(),
            cid: cid.to_string(),
            out: self.ctx.out.clone(),
            settings: self.settings,
            inbox: Arc::clone(&inbox),
            allow: Arc::clone(&self.allow),
            user_id: user_id.to_string(),
        };
        let name = format!("pf-{}-{}", sid8(&self.ctx.sid), self.next_n);
        let handle = match crate::threads::spawn(name, THREAD_STACK, move || conn::run(ctx, target))
        {
            Ok(h) => h,
            Err(e) => {
                inbox.close_quietly();
                return Err(PfError::Thread(e));
            }
        };
        self.conns.lock().insert(cid.to_string(), inbox);
        // the ended ones are joined here, so the list stays short
        let (done, running) = std::mem::take(&mut self.threads)
            .into_iter()
            .partition::<Vec<_>, _>(JoinHandle::is_finished);
        self.threads = running;
        self.threads.push(handle);
        for h in done {
            let _ = h.join();
        }
        Ok(())
    }

    fn forward(&mut self, cid: &str, data: Vec<u8>) {
        let Some(inbox) = self.conns.get(cid) else {
            self.reply_error(cid, &PfError::UnknownConnection, t::FORWARD);
            return;
        };
        match inbox.forward(data) {
            Fwd::AckNow => self.send(&pf_msg(t::ACK, &self.ctx.sid, cid)),
            Fwd::Push(p) => self.pushed(cid, p, t::FORWARD),
        }
    }

    fn queue(&mut self, cid: &str, item: Item) {
        let typ = item.typ();
        let Some(inbox) = self.conns.get(cid) else {
            self.reply_error(cid, &PfError::UnknownConnection, typ);
            return;
        };
        let p = inbox.push(item);
        self.pushed(cid, p, typ);
    }

    fn pushed(&mut self, cid: &str, p: Push, typ: &str) {
        match p {
            Push::Queued => {}
            Push::Closed => {
                self.conns.remove(cid);
                self.reply_error(cid, &PfError::UnknownConnection, typ);
            }
            Push::Full => {
                if let Some(inbox) = self.conns.remove(cid) {
                    inbox.close_quietly();
                }
                self.reply_error(cid, &PfError::QueueFull, typ);
                self.send(&pf_msg(t::STOP, &self.ctx.sid, cid));
            }
        }
    }

    fn ack(&mut self, cid: &str) {
        let Some(inbox) = self.conns.get(cid) else {
            self.reply_error(cid, &PfError::UnknownConnection, t::ACK);
            return;
        };
        match inbox.ack() {
            Ack::Released => {}
            Ack::Unexpected => log::debug!(
                "port forward {}/{cid}: ack with nothing in flight ignored",
                self.ctx.sid
            ),
            Ack::Closed => {
                self.conns.remove(cid);
                self.reply_error(cid, &PfError::UnknownConnection, t::ACK);
            }
        }
    }
}

impl Handler for PortForward {
    fn handle(&mut self, msg: ProtoMsg) {
        let cid = msg
            .prop_str("connection_id")
            .unwrap_or_default()
            .to_string();
        let typ = msg.hdr.typ.as_str();
        match typ {
            t::NEW => {
                let body = msg.body.as_deref().unwrap_or_default();
                let user_id = msg.prop_str("user_id").unwrap_or_default();
                if let Err(e) = self.new_connection(&cid, user_id, body) {
                    // a cap refusal has its own line already
                    if !matches!(e, PfError::TooMany) {
                        Event::new("port forward open", user_id, &self.ctx.sid, Outcome::Error)
                            .with("connection_id", &cid)
                            .with("err", &e)
                            .emit();
                    }
                    self.reply_error(&cid, &e, t::NEW);
                }
            }
            t::FORWARD => self.forward(&cid, msg.body.unwrap_or_default()),
            t::STOP => self.queue(&cid, Item::Stop),
            t::ACK => self.ack(&cid),
            t::ERROR => {
                let text = msg
                    .body
                    .as_deref()
                    .and_then(|b| decode_map(b).ok())
                    .and_then(|m| m.into_iter().find(|(k, _)| k == "err"))
                    .and_then(|(_, v)| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                log::info!(
                    "port forward {}/{cid}: error from the server: {text}",
                    self.ctx.sid
                );
            }
            _ => self.reply_error(&cid, &PfError::UnknownMessageType, typ),
        }
    }

    fn close(&mut self) {
        let conns: Vec<Arc<Inbox>> = self.conns.lock().drain().map(|(_, ib)| ib).collect();
        for inbox in conns {
            inbox.close_quietly();
        }
        // A closed connection's thread ends at once, unless it is still
        // dialing (bounded by the dial timeout): wait for that, no longer.
        let deadline = Instant::now() + self.settings.dial_timeout;
        while let Some(h) = self.threads.pop() {
            while !h.is_finished() && Instant::now() < deadline {
                // JoinHandle has no timed join: look again shortly
                std::thread::park_timeout(Duration::from_millis(5));
            }
            if h.is_finished() {
                let _ = h.join();
            } else {
                log::debug!(
                    "port forward {}: a connection thread outlives its session",
                    self.ctx.sid
                );
            }
        }
    }

    fn direct(&self) -> Option<Arc<dyn Direct>> {
        Some(Arc::new(FastPath {
            sid: self.ctx.sid.clone(),
            out: self.ctx.out.clone(),
            conns: Arc::clone(&self.conns),
        }))
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_body(host: &str, port: Value, proto: &str) -> Vec<u8> {
        encode_map(&[
            ("remote_host", Value::Str(host.into())),
            ("remote_port", port),
            ("protocol", Value::Str(proto.into())),
        ])
    }

    #[test]
    fn new_bodies_parse_like_the_reference() {
        let t = parse_new(&new_body("127.0.0.1", Value::U16(22), "tcp"), true).expect("valid");
        assert_eq!(
            (t.net, t.host.as_str(), t.port),
            (Net::Tcp, "127.0.0.1", 22)
        );
        let t = parse_new(&new_body("h", Value::I8(53), "udp"), true).expect("any int width");
        assert_eq!((t.net, t.port), (Net::Udp, 53));
        for bad in [
            new_body("", Value::U16(22), "tcp"),
            new_body("h", Value::U16(0), "tcp"),
            new_body("h", Value::U16(22), ""),
            encode_map(&[("remote_host", Value::Str("h".into()))]),
        ] {
            assert_eq!(
                parse_new(&bad, true)
                    .map_err(|e| e.to_string())
                    .err()
                    .as_deref(),
                Some(
                    "invalid port-forward message: missing connection_id, remote_port or protocol"
                )
            );
        }
        let e = parse_new(&new_body("h", Value::U16(1), "dummy"), true).expect_err("protocol");
        assert_eq!(e.to_string(), "unknown protocol: dummy");
        assert!(parse_new(b"C", true).is_err());
        let e = parse_new(&new_body("h", Value::U16(1), "dummy"), false).expect_err("no id");
        assert!(matches!(e, PfError::InvalidNew));
    }

    #[test]
    fn errors_have_the_reference_shape() {
        let m = error_msg("s", None, "unknown connection", "forward");
        assert!(m.hdr.props.is_empty());
        let body = decode_map(m.body.as_deref().unwrap_or_default()).expect("map");
        assert_eq!(
            body,
            vec![
                ("err".to_string(), Value::Str("unknown connection".into())),
                ("msgtype".to_string(), Value::Str("forward".into())),
            ]
        );
        let m = error_msg("s", Some("c"), "x", "new");
        assert_eq!(m.prop_str("connection_id"), Some("c"));
    }
}
