//! One forwarded connection on its own thread (`pf-<sid8>-<n>`): dial, then
//! a poll loop over the target socket and the inbox's wake fd. Writes to the
//! target and reads from it proceed independently (non-blocking socket), so
//! a target that talks while it is being written to cannot deadlock us.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use super::dial::{self, Net, Sock, Target};
use super::inbox::{Inbox, Item, Next};
use super::{Settings, error_msg, pf_msg};
use crate::audit::{Event, Outcome};
use crate::config::allow::{self, AllowList};
use crate::conn::outbound::Outbound;
use crate::sys::poll::{PollFd, poll, timeout_ms};
use crate::wire::codec::ProtoMsg;
use crate::wire::types::portforward as t;

/// First read size for TCP: what the reference uses, and plenty for
/// interactive traffic, so idle connections stay small.
pub const TCP_CHUNK_MIN: usize = 4096;
/// Largest `forward` body the device sends. deviceconnect accepts 8 MiB
/// per device message (protocol.md §1.6) and relays it unchanged; mender-cli
/// and browsers set no read limit. 64 KiB stays far below both (and below the
/// 1 MiB default payload limit of the message bus deviceconnect relays over),
/// gives 16x the reference's throughput per round trip with one `forward` in
/// flight, and bounds memory: one buffer per connection, and the shared
/// outbound queue (64 frames) holds at most 4 MiB of them. TCP reads start at
/// `TCP_CHUNK_MIN` and double up to this when reads fill the buffer.
pub const CHUNK_MAX: usize = 64 * 1024;
/// UDP read buffer: larger than any UDP payload (65507 over IPv4, 65527 over
/// IPv6), so a datagram is never cut; see `Pump::read_target`.
pub const UDP_BUF: usize = 65535;

/// Who the connection belongs to and how to reach the server.
pub struct ConnCtx {
    /// Router session id.
    pub sid: String,
    /// Client-chosen connection id.
    pub cid: String,
    /// Replies.
    pub out: Outbound,
    /// Shared with the handler; consulted before every send.
    pub inbox: Arc<Inbox>,
    /// Timers.
    pub settings: Settings,
    /// `PortForward.AllowedTargets`.
    pub allow: Arc<AllowList>,
    /// The server's `user_id` of the `new`, for the audit trail.
    pub user_id: String,
}

impl ConnCtx {
    fn send(&self, msg: &ProtoMsg) {
        // After a quiet close (session end, or the id reused for a new
        // connection) nothing may reach the client under this id any more.
        if self.inbox.is_quiet() {
            return;
        }
        if let Err(e) = self.out.send(msg) {
            log::debug!(
                "port forward {}/{}: {} not sent: {e}",
                self.sid,
                self.cid,
                msg.hdr.typ
            );
        }
    }

    fn send_error(&self, err: &str, msgtype: &str) {
        self.send(&error_msg(&self.sid, Some(&self.cid), err, msgtype));
    }

    /// Answers items that reached a connection which is gone.
    fn unknown(&self, items: Vec<Item>) {
        for item in items {
            self.send_error("unknown connection", item.typ());
        }
    }
}

/// The thread body: dial, reply `new`, then pump until stop, EOF, error,
/// timeout or a quiet close.
pub fn run(ctx: ConnCtx, target: Target) {
    let inbox = Arc::clone(&ctx.inbox);
    let started = Instant::now();
    let audit = |outcome| {
        Event::new("port forward open", &ctx.user_id, &ctx.sid, outcome)
            .with("connection_id", &ctx.cid)
            .with("protocol", target.net.name())
            .with("target", format!("{}:{}", target.host, target.port))
    };
    let sock = match dial::dial(&target, &ctx.allow, ctx.settings.dial_timeout) {
        Ok(s) => s,
        Err(e) => {
            log::info!("port forward {}/{}: {e}", ctx.sid, ctx.cid);
            match e {
                dial::DialError::NotAllowed { .. } => audit(Outcome::Refused)
                    .with("rule", allow::KEY)
                    .with("err", &e),
                _ => audit(Outcome::Error).with("err", &e),
            }
            .emit();
            if let Some(left) = inbox.finish() {
                ctx.send_error(&e.to_string(), t::NEW);
                ctx.unknown(left);
            }
            return;
        }
    };
    if inbox.next(false) == Next::Quit {
        return;
    }
    log::info!(
        "port forward {}/{}: connected {} {}",
        ctx.sid,
        ctx.cid,
        target.net.name(),
        sock.endpoints()
    );
    audit(Outcome::Ok).with("peer", sock.endpoints()).emit();
    // The reply goes out before anything read from the target (protocol.md
    // §3.3 SHOULD): this thread sends both, in this order.
    ctx.send(&pf_msg(t::NEW, &ctx.sid, &ctx.cid));
    // Only now may `forward`s be acked before this thread has written them
    // (an ack must not overtake the `new` reply).
    if let Sock::Tcp(s) = &sock {
        inbox.lend(s.try_clone().ok());
    }
    let buf = match target.net {
        Net::Tcp => TCP_CHUNK_MIN,
        Net::Udp => UDP_BUF,
    };
    let mut pump = Pump {
        ctx: &ctx,
        inbox: &inbox,
        sock,
        buf: vec![0; buf],
        writing: None,
        last_activity: Instant::now(),
        forward_sent: None,
        rx_bytes: 0,
        tx_bytes: 0,
        failed: None,
    };
    let end = pump.run();
    inbox.lend(None);
    let (rx, tx) = (pump.rx_bytes + inbox.direct_bytes(), pump.tx_bytes);
    drop(pump.sock);
    let stopped_by = match &end {
        End::Quiet => "session".to_string(),
        End::StopRequested => "operator".to_string(),
        End::Target(why) => why.clone(),
    };
    Event::new("port forward close", &ctx.user_id, &ctx.sid, Outcome::Ok)
        .with("connection_id", &ctx.cid)
        .with("protocol", target.net.name())
        .with("target", format!("{}:{}", target.host, target.port))
        .with("rx_bytes", rx)
        .with("tx_bytes", tx)
        .with("stopped_by", stopped_by)
        .with_duration(started.elapsed())
        .emit();
    match end {
        End::Quiet => {}
        End::StopRequested => {
            if let Some(left) = inbox.finish() {
                ctx.send(&pf_msg(t::STOP, &ctx.sid, &ctx.cid));
                ctx.unknown(left);
            }
        }
        End::Target(why) => {
            log::info!("port forward {}/{}: {why}; stopping", ctx.sid, ctx.cid);
            if let Some(left) = inbox.finish() {
                ctx.send(&pf_msg(t::STOP, &ctx.sid, &ctx.cid));
                ctx.unknown(left);
            }
        }
    }
}

enum End {
    /// Closed quietly by the handler: send nothing.
    Quiet,
    /// The server sent `stop`: echo it.
    StopRequested,
    /// EOF, read error, idle or ack timeout: device-initiated `stop`.
    Target(String),
}

struct Pump<'a> {
    ctx: &'a ConnCtx,
    inbox: &'a Inbox,
    sock: Sock,
    buf: Vec<u8>,
    /// A server `forward` being written: data, how much is done, and
    /// whether it was acked already.
    writing: Option<(Vec<u8>, usize, bool)>,
    /// A write error on data acked already: the connection ends.
    failed: Option<String>,
    last_activity: Instant,
    /// When the `forward` in flight was sent.
    forward_sent: Option<Instant>,
    /// Bytes written to the target (from the operator) and read from it.
    rx_bytes: u64,
    tx_bytes: u64,
}

impl Pump<'_> {
    fn run(&mut self) -> End {
        loop {
            let awaiting_ack = match self.inbox.next(self.writing.is_none()) {
                Next::Quit => return End::Quiet,
                Next::Go { item, awaiting_ack } => {
                    match item {
                        Some(Item::Stop) => return End::StopRequested,
                        Some(Item::Forward(data)) => self.writing = Some((data, 0, false)),
                        Some(Item::Acked(data)) => self.writing = Some((data, 0, true)),
                        None => {}
                    }
                    awaiting_ack
                }
            };
            if !awaiting_ack {
                self.forward_sent = None;
            }
            if self.writing.is_some() && !self.write_target() {
                if let Some(why) = self.failed.take() {
                    return End::Target(why);
                }
                // progress made or done: look at the inbox again first
                continue;
            }
            let now = Instant::now();
            let mut idle_at = self.last_activity + self.ctx.settings.idle_timeout;
            if now >= idle_at {
                // the session thread may have been writing for us
                if let Some(t) = self.inbox.last_direct().filter(|t| *t > self.last_activity) {
                    self.last_activity = t;
                    idle_at = t + self.ctx.settings.idle_timeout;
                }
            }
            if now >= idle_at {
                return End::Target("idle timeout".to_string());
            }
            let mut deadline = idle_at;
            if let Some(sent) = self.forward_sent {
                let ack_at = sent + self.ctx.settings.ack_timeout;
                if now >= ack_at {
                    return End::Target("no ack from the client".to_string());
                }
                deadline = deadline.min(ack_at);
            }
            let mut events = 0;
            if !awaiting_ack {
                events |= libc::POLLIN;
            }
            if self.writing.is_some() {
                events |= libc::POLLOUT;
            }
            // poll reports HUP/ERR even for events 0; a negative fd mutes the
            // socket entirely while there is nothing we may do with it.
            let fd = if events == 0 { -1 } else { self.sock.fd() };
            let timeout = timeout_ms(deadline.saturating_duration_since(now));
            let mut fds = [
                PollFd::new(fd, events),
                PollFd::new(self.inbox.wake_fd().as_raw_fd(), libc::POLLIN),
            ];
            if let Err(e) = poll(&mut fds, timeout) {
                return End::Target(format!("poll failed: {e}"));
            }
            let ready = fds[0].revents();
            if !awaiting_ack
                && ready & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
                && let Some(end) = self.read_target()
            {
                return end;
            }
        }
    }

    /// Tries to finish the current write. Returns true when it would block
    /// (poll for POLLOUT), false when it progressed or completed.
    fn write_target(&mut self) -> bool {
        let Some((data, done, acked)) = self.writing.as_mut() else {
            return false;
        };
        let result = if data.is_empty() {
            // UDP: an empty body is an empty datagram; TCP: nothing to do
            match self.sock {
                Sock::Udp(_) => self.sock.write(data),
                Sock::Tcp(_) => Ok(0),
            }
        } else {
            self.sock.write(&data[*done..])
        };
        match result {
            Ok(n) => {
                *done += n;
                self.rx_bytes += n as u64;
                if matches!(self.sock, Sock::Udp(_)) || *done >= data.len() {
                    let acked = *acked;
                    self.writing = None;
                    self.inbox.written();
                    self.last_activity = Instant::now();
                    if !acked {
                        self.ctx.send(&pf_msg(t::ACK, &self.ctx.sid, &self.ctx.cid));
                    }
                }
                false
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => false,
            Err(e) => {
                // transfer.md §4.3: ack even so, then report; the read side
                // notices a dead target and stops the connection. Data acked
                // already is lost: report it and stop at once.
                let acked = *acked;
                self.writing = None;
                self.inbox.written();
                let net = match self.sock {
                    Sock::Tcp(_) => "tcp",
                    Sock::Udp(_) => "udp",
                };
                let text = format!(
                    "write {net} {}: write: {}",
                    self.sock.endpoints(),
                    crate::sys::errno::go_text(&e)
                );
                log::info!("port forward {}/{}: {text}", self.ctx.sid, self.ctx.cid);
                if !acked {
                    self.ctx.send(&pf_msg(t::ACK, &self.ctx.sid, &self.ctx.cid));
                }
                self.ctx.send_error(&text, t::FORWARD);
                if acked {
                    self.failed = Some(text);
                }
                false
            }
        }
    }

    /// Reads once from the target and forwards what came. `Some` ends the
    /// connection.
    fn read_target(&mut self) -> Option<End> {
        let cap = self.buf.len();
        match self.sock.read(&mut self.buf) {
            Ok(0) if matches!(self.sock, Sock::Tcp(_)) => Some(End::Target("EOF".to_string())),
            Ok(n) if n > cap => {
                // Cannot happen for UDP over IPv4/IPv6 (the buffer exceeds
                // the largest payload); if it ever does, drop the datagram
                // rather than pass on a truncated one.
                let text = format!("datagram of {n} bytes exceeds {cap} bytes; dropped");
                log::warn!("port forward {}/{}: {text}", self.ctx.sid, self.ctx.cid);
                self.ctx.send_error(&text, t::FORWARD);
                None
            }
            Ok(n) => {
                if !self.inbox.start_forward() {
                    return Some(End::Quiet);
                }
                self.last_activity = Instant::now();
                self.forward_sent = Some(self.last_activity);
                self.tx_bytes += n as u64;
                // Hand the buffer itself to the message to save a copy, and
                // take it back once encoded.
                let mut data = std::mem::take(&mut self.buf);
                data.truncate(n);
                let mut msg = pf_msg(t::FORWARD, &self.ctx.sid, &self.ctx.cid).with_body(data);
                self.ctx.send(&msg);
                let mut next = cap;
                if n == cap && cap < CHUNK_MAX && matches!(self.sock, Sock::Tcp(_)) {
                    next = (cap * 2).min(CHUNK_MAX);
                }
                let mut buf = msg.body.take().unwrap_or_default();
                buf.resize(next, 0);
                self.buf = buf;
                None
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                None
            }
            Err(e) => Some(End::Target(format!(
                "read: {}",
                crate::sys::errno::go_text(&e)
            ))),
        }
    }
}
