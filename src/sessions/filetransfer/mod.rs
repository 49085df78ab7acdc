//! Protocol 2, file transfer (transfer.md §2): `stat` answered at once,
//! `get_file` / `put_file` run on a named thread per transfer (`ft-<sid8>`),
//! one transfer per session, all paths resolved under the configured limits.

mod download;
mod download_core;
mod error;
mod upload;
mod upload_core;
pub mod wire;

pub use self::error::FtError;

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError, select};

use crate::audit::{self, Event, Outcome};
use crate::config::LimitsConfig;
use crate::conn::outbound::{Outbound, SendError};
use crate::limits::bucket::MAX_WAIT;
use crate::limits::policy::{Denial, Policy};
use crate::sessions::sid8;
use crate::sessions::{Handler, SessionCtx};
use crate::sys::fs::{Stat, fstat};
use crate::threads;
use crate::wire::codec::{self, ProtoHdr, ProtoMsg};

use self::wire::Request;
use crate::wire::types::filetransfer as t;

/// Messages queued for a running transfer (≥ 21 chunks + EOF + slack).
const QUEUE: usize = 64;
/// Largest body accepted for a message of a running transfer.
const MAX_MESSAGE_BODY: usize = 64 * 1024;
/// How often a waiting transfer checks that the websocket is still up.
const POLL: Duration = Duration::from_millis(200);
/// How long a message may wait for room in the outbound queue (as `Outbound::send`).
const SEND_WAIT: Duration = Duration::from_secs(30);
/// How long `close` waits for a transfer thread to clean up.
const CLOSE_WAIT: Duration = Duration::from_millis(500);
/// Part of `MAX_WAIT` kept for queueing and sending the message that ends
/// a throttled wait, so the server hears from the transfer in time even on
/// a busy device, and a limit whose refill needs the whole `MAX_WAIT` for
/// one chunk is refused rather than decided by microseconds.
const SEND_SLACK: Duration = Duration::from_secs(1);

/// Transfer threads only stream through heap buffers.
const STACK: usize = 128 * 1024;

/// State shared by every file-transfer handler of the daemon.
#[derive(Debug)]
pub struct Service {
    policy: Policy,
    uid: libc::uid_t,
    gid: libc::gid_t,
    temp_counter: AtomicU32,
    /// Transfer threads that outlived their session's close (blocked in a
    /// file-system call), joined once they have ended.
    parked: threads::Parked,
}

impl Service {
    /// Resolves the limits once for the daemon's lifetime.
    pub fn new(limits: &LimitsConfig, force_walk: bool) -> Service {
        Service::with_policy(Policy::from_config(limits, force_walk))
    }

    /// A service with an explicit policy.
    pub fn with_policy(policy: Policy) -> Service {
        Service {
            policy,
            uid: crate::sys::user::euid(),
            gid: crate::sys::user::egid(),
            temp_counter: AtomicU32::new(0),
            parked: threads::Parked::new(CLOSE_WAIT),
        }
    }

    /// A handler for one router session.
    pub fn handler(self: &Arc<Self>, ctx: &SessionCtx) -> Box<dyn Handler> {
        Box::new(FileTransfer {
            svc: Arc::clone(self),
            ctx: ctx.clone(),
            active: None,
        })
    }
}

/// The transfer thread's side of the session.
struct Link {
    out: Outbound,
    sid: String,
    rx: Receiver<ProtoMsg>,
    /// Never sent on: the handler drops the sender to cancel.
    cancel: Receiver<()>,
    /// `done` closes when the thread ends (the receiver sees Disconnected).
    _done: Sender<()>,
}

enum Next {
    Msg(ProtoMsg),
    Stop,
}

impl Link {
    /// The next inbound message, or Stop on cancel / connection loss.
    fn next(&self) -> Next {
        // Messages that arrived before a cancel are handled first: a session
        // closed right behind an upload's EOF chunk must still commit it.
        if let Ok(m) = self.rx.try_recv() {
            return Next::Msg(m);
        }
        loop {
            select! {
                recv(self.rx) -> m => return m.map_or(Next::Stop, Next::Msg),
                recv(self.cancel) -> _ => return Next::Stop,
                default(POLL) => if !self.out.is_connected() {
                    return Next::Stop;
                },
            }
        }
    }

    /// Sleeps until `until` unless cancelled or disconnected (then false).
    fn pause_until(&self, until: std::time::Instant) -> bool {
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return true;
            }
            match self.cancel.recv_timeout(left.min(POLL)) {
                Err(RecvTimeoutError::Timeout) if self.out.is_connected() => {}
                _ => return false,
            }
        }
    }

    /// Whether the transfer should keep going.
    fn alive(&self) -> bool {
        !matches!(
            self.cancel.try_recv(),
            Err(crossbeam_channel::TryRecvError::Disconnected)
        ) && self.out.is_connected()
    }

    /// Queues `msg`, waiting for room in the session's lane while the
    /// transfer is alive: a cancel is noticed within `POLL` even when the
    /// uplink is stalled.
    fn send(&self, msg: &ProtoMsg) -> bool {
        let mut frame = codec::encode(msg);
        let give_up = std::time::Instant::now() + SEND_WAIT;
        loop {
            match self.out.offer(frame, POLL) {
                Ok(()) => return true,
                Err((SendError::Full, f))
                    if self.alive() && std::time::Instant::now() < give_up =>
                {
                    frame = f;
                }
                Err((e, _)) => {
                    log::debug!("file transfer {}: not sent: {e}", self.sid);
                    return false;
                }
            }
        }
    }
}

/// The handler's side of a running transfer.
struct Active {
    tx: Sender<ProtoMsg>,
    /// Dropped to cancel.
    cancel: Sender<()>,
    /// Disconnects when the thread has let go of its link (it is ending).
    done: Receiver<()>,
    thread: JoinHandle<()>,
}

impl Active {
    fn running(&self) -> bool {
        !matches!(
            self.done.try_recv(),
            Err(crossbeam_channel::TryRecvError::Disconnected)
        )
    }

    /// Cancels the transfer and joins its thread. The wait is bounded by
    /// `CLOSE_WAIT`: the thread notices the cancel within `POLL` unless a
    /// file-system call blocks it (a hung NFS server, an fsync), and such
    /// a thread must not hold up the session's close; its handle goes to
    /// the service, which joins it once it has ended.
    fn stop(self, svc: &Service, sid: &str) {
        let Active {
            tx,
            cancel,
            done,
            thread,
        } = self;
        drop(cancel);
        drop(tx);
        match done.recv_timeout(CLOSE_WAIT) {
            Err(RecvTimeoutError::Disconnected) => join(thread),
            _ => {
                log::debug!(
                    "file transfer {sid}: the transfer thread is still busy after {CLOSE_WAIT:?}; joined when it ends"
                );
                svc.parked.park(thread);
            }
        }
    }

    /// Joins the thread of a transfer that ended by itself.
    fn reap(self) {
        join(self.thread);
    }
}

/// Joins a transfer thread whose closure has returned (or is returning).
fn join(thread: JoinHandle<()>) {
    if thread.join().is_err() {
        log::error!("file transfer: a transfer thread panicked");
    }
}

/// One session's protocol-2 handler.
struct FileTransfer {
    svc: Arc<Service>,
    ctx: SessionCtx,
    active: Option<Active>,
}

impl FileTransfer {
    fn reply_error(&self, req: &ProtoHdr, msgtype: &str, err: &FtError) {
        self.reply_error_with_code(req, msgtype, err, None);
    }

    fn reply_error_with_code(
        &self,
        req: &ProtoHdr,
        msgtype: &str,
        err: &FtError,
        code: Option<u16>,
    ) {
        log::info!("file transfer {}: {msgtype}: {err}", self.ctx.sid);
        let reply = wire::error_reply_with_code(req, msgtype, &err.to_string(), code);
        if let Err(e) = self.ctx.out.send(&reply) {
            log::debug!("file transfer {}: error not sent: {e}", self.ctx.sid);
        }
    }

    fn busy(&mut self) -> bool {
        match self.active.take() {
            Some(a) if a.running() => {
                self.active = Some(a);
                true
            }
            Some(a) => {
                a.reap();
                false
            }
            None => false,
        }
    }

    /// Cancels the running transfer (if any) and joins its thread, bounded.
    fn stop_active(&mut self) {
        if let Some(a) = self.active.take() {
            a.stop(&self.svc, &self.ctx.sid);
        }
        // a thread parked earlier may have ended since: free its stack now
        self.svc.parked.reap();
    }

    /// Starts `body` on a named thread with a fresh link.
    fn spawn(
        &mut self,
        what: &'static str,
        body: impl FnOnce(Link) + Send + 'static,
    ) -> Result<(), FtError> {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE);
        let (cancel_tx, cancel_rx) = crossbeam_channel::bounded(0);
        let (done_tx, done_rx) = crossbeam_channel::bounded(0);
        let link = Link {
            out: self.ctx.out.clone(),
            sid: self.ctx.sid.clone(),
            rx,
            cancel: cancel_rx,
            _done: done_tx,
        };
        self.svc.parked.reap();
        let name = format!("ft-{}", sid8(&self.ctx.sid));
        let thread = threads::spawn(name, STACK, move || body(link))
            .map_err(|err| FtError::Spawn { what, err })?;
        self.active = Some(Active {
            tx,
            cancel: cancel_tx,
            done: done_rx,
            thread,
        });
        Ok(())
    }

    /// Metadata of any path, as upstream's `os.Stat`: the limits do not
    /// apply (they guard contents, and deviceconnect needs the file type to
    /// answer 400 `path is not a regular file` itself); `get_file` applies them.
    fn stat(&self, msg: &ProtoMsg) {
        let result = Request::decode(msg.body.as_deref()).and_then(|req| {
            let path = req.path()?.to_vec();
            let st = crate::sys::fs::stat(&path).map_err(|err| FtError::Stat {
                path: wire::shown(&path),
                err,
            })?;
            Ok(wire::file_info(&self.ctx.sid, &path, &st))
        });
        match result {
            Ok(info) => {
                if let Err(e) = self.ctx.out.send(&info) {
                    log::debug!("file transfer {}: file_info not sent: {e}", self.ctx.sid);
                }
            }
            Err(e) => self.reply_error(&msg.hdr, t::STAT, &e),
        }
    }

    fn forward_to_transfer(&mut self, msg: ProtoMsg) {
        let typ = msg.hdr.typ.clone();
        if !self.busy() {
            if typ == t::ERROR {
                log::info!(
                    "file transfer {}: error from the server while idle",
                    self.ctx.sid
                );
            } else {
                self.reply_error(&msg.hdr, &typ, &FtError::NotInProgress);
            }
            return;
        }
        let Some(active) = self.active.as_ref() else {
            return;
        };
        // deviceconnect sends 4096-byte chunks; the transfer's queue holds up
        // to QUEUE messages, which must not each be a 16 MiB websocket message
        if msg
            .body
            .as_ref()
            .is_some_and(|b| b.len() > MAX_MESSAGE_BODY)
        {
            let hdr = msg.hdr.clone();
            self.stop_active();
            self.reply_error(&hdr, &typ, &FtError::ChunkTooLarge);
            return;
        }
        match active.tx.try_send(msg) {
            Ok(()) => {}
            Err(TrySendError::Disconnected(m)) => {
                if let Some(a) = self.active.take() {
                    a.reap();
                }
                if typ != t::ERROR {
                    self.reply_error(&m.hdr, &typ, &FtError::NotInProgress);
                }
            }
            Err(TrySendError::Full(m)) => {
                // The peer ignores the window; the transfer cannot stay consistent.
                self.stop_active();
                self.reply_error(&m.hdr, &typ, &FtError::QueueFull);
            }
        }
    }
}

impl Handler for FileTransfer {
    fn handle(&mut self, msg: ProtoMsg) {
        match msg.hdr.typ.as_str() {
            t::STAT => self.stat(&msg),
            t::GET_FILE => {
                if let Err(e) = self.start_download(&msg) {
                    audit_unstarted(DOWNLOAD, &msg, &self.ctx.sid, &e);
                    let code = e.download_code();
                    self.reply_error_with_code(&msg.hdr, t::GET_FILE, &e, code);
                }
            }
            t::PUT_FILE => {
                if let Err(e) = self.start_upload(&msg) {
                    audit_unstarted(UPLOAD, &msg, &self.ctx.sid, &e);
                    self.reply_error(&msg.hdr, t::PUT_FILE, &e);
                }
            }
            t::ACK | t::FILE_CHUNK | t::ERROR => self.forward_to_transfer(msg),
            other => {
                let err = FtError::Unsupported(other.to_string());
                self.reply_error(&msg.hdr, other, &err);
            }
        }
    }

    fn close(&mut self) {
        self.stop_active();
    }
}

impl Drop for FileTransfer {
    /// A handler dropped without `close` still joins its transfer.
    fn drop(&mut self) {
        self.stop_active();
    }
}

/// Audit actions of this protocol.
const DOWNLOAD: &str = "file download";
const UPLOAD: &str = "file upload";

/// The audit line of a transfer of `action` requested by `req`, ended by
/// `result`: a failure whose text names a Limits rule is a refusal.
fn audit_event(
    action: &'static str,
    req: &ProtoHdr,
    sid: &str,
    result: Result<(), &FtError>,
) -> Event {
    let user = req
        .props
        .iter()
        .find(|(k, _)| *k == "user_id")
        .and_then(|(_, v)| v.as_str())
        .unwrap_or_default();
    match result {
        Ok(()) => Event::new(action, user, sid, Outcome::Ok),
        Err(err) => {
            let err = err.to_string();
            match audit::transfer_rule(&err, action == UPLOAD) {
                Some(rule) => Event::refused(action, user, sid, rule, &err),
                None => Event::new(action, user, sid, Outcome::Error).with("err", err),
            }
        }
    }
}

/// The audit line of a `get_file`/`put_file` refused before it started.
fn audit_unstarted(action: &'static str, msg: &ProtoMsg, sid: &str, err: &FtError) {
    let req = Request::decode(msg.body.as_deref()).ok();
    let path = req
        .as_ref()
        .and_then(|r| r.path.as_deref())
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let mut e = audit_event(action, &msg.hdr, sid, Err(err)).with_opt("path", path);
    if let Some(r) = req.filter(|_| action == UPLOAD) {
        e = e
            .with_opt("mode", r.mode.map(|m| format!("{m:o}")))
            .with_opt("uid", r.uid)
            .with_opt("gid", r.gid)
            .with_opt("size", r.size);
    }
    e.emit();
}

impl Service {
    /// Opens `path` for a download and asks the policy about the opened
    /// descriptor; an OS error while opening is returned as such.
    fn check_download(
        &self,
        path: &[u8],
        flags: libc::c_int,
    ) -> Result<(std::os::fd::OwnedFd, Stat), Result<Denial, std::io::Error>> {
        let p = &self.policy;
        let fd = p
            .resolver_for(path)
            .map_err(Ok)?
            .open(path, flags)
            .map_err(Denial::from_path)?;
        let st = fstat(fd.as_fd()).map_err(Err)?;
        p.permit_download(&st).map_err(Ok)?;
        Ok((fd, st))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn handler(sid: &str) -> (FileTransfer, crate::conn::outbound::OutboundRx) {
        let wake = Arc::new(crate::sys::wake::Wake::new().expect("eventfd"));
        let (out, rx) = crate::conn::outbound::queue(wake);
        let ft = FileTransfer {
            svc: Arc::new(Service::with_policy(Policy::disabled())),
            ctx: SessionCtx {
                sid: sid.to_string(),
                out,
            },
            active: None,
        };
        (ft, rx)
    }

    #[test]
    fn close_cancels_and_joins_the_transfer_thread() {
        let (mut ft, _rx) = handler("close-join");
        let (seen_tx, seen_rx) = crossbeam_channel::bounded(1);
        ft.spawn("download", move |link| {
            // ends only on cancel
            let _ = link.cancel.recv();
            let _ = seen_tx.send(std::thread::current().name().map(str::to_string));
        })
        .expect("spawn");
        assert!(ft.busy());
        ft.close();
        assert!(ft.active.is_none());
        assert!(ft.svc.parked.is_empty(), "joined, not parked");
        let name = seen_rx.try_recv().expect("the thread ran to its end");
        assert_eq!(name.as_deref(), Some("ft-close-jo"));
    }

    #[test]
    fn a_thread_blocked_past_the_bound_does_not_hold_up_close_and_is_joined_later() {
        let (mut ft, _rx) = handler("blocked");
        let (release_tx, release_rx) = crossbeam_channel::bounded::<()>(0);
        ft.spawn("upload", move |_link| {
            // a file-system call that ignores the cancel
            let _ = release_rx.recv();
        })
        .expect("spawn");
        let started = Instant::now();
        ft.close();
        let took = started.elapsed();
        assert!(took >= CLOSE_WAIT, "{took:?}");
        assert!(took < CLOSE_WAIT + Duration::from_secs(2), "{took:?}");
        assert_eq!(ft.svc.parked.len(), 1);
        ft.svc.parked.reap();
        assert_eq!(ft.svc.parked.len(), 1, "still running: kept");
        drop(release_tx);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            ft.svc.parked.reap();
            if ft.svc.parked.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "the thread never ended");
            std::thread::yield_now();
        }
    }
}
