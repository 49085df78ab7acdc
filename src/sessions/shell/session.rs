//! One shell's thread (`shell-<sid8>`): starts the process, moves input to the
//! PTY and output to the server, runs the health check and expiry timers and
//! stops the shell — so nothing one shell does can hold up another.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use super::pty::{self, Child};
use super::{Cmd, Control, Inner, STOP_REPLY, output_msg, ping_msg, reply};
use crate::audit::{Event, Outcome};
use crate::conn::outbound::SendError;
use crate::sys::poll::{PollFd, poll, timeout_ms};
use crate::wire::codec::{self, ProtoMsg};

/// Largest output body per message: peers accept 8 KiB frames (protocol.md §1.5).
const CHUNK: usize = 4096;
/// Output kept while the link is down (oldest bytes dropped beyond this).
const BACKLOG_MAX: usize = 64 * 1024;
/// How long one output send may wait for room in the outbound queue before
/// the thread looks at its commands again.
const SEND_WAIT: Duration = Duration::from_millis(50);
/// How often a shell holding output checks whether the link is back.
const RELINK_POLL: Duration = Duration::from_millis(200);
/// Signal escalation steps for a server stop and for shutdown.
const STOP_GRACE: Duration = Duration::from_millis(1000);
const QUIET_GRACE: Duration = Duration::from_millis(250);
const STACK: usize = 128 * 1024;
/// The reference's read-error text, which clients expect in a device `stop`.
const EXIT_TEXT: &str = "read /dev/ptmx: input/output error";

/// Starts the thread for a freshly registered shell; `who` is its sid and
/// the server's `user_id`.
pub(super) fn start(
    inner: Arc<Inner>,
    who: (String, String),
    ctl: Arc<Control>,
    rx: Receiver<Cmd>,
    rows: u16,
    cols: u16,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name(format!("shell-{}", crate::sessions::sid8(&who.0)))
        .stack_size(STACK)
        .spawn(move || run(inner, who, ctl, rx, rows, cols))
        .map(|_| ())
}

fn run(
    inner: Arc<Inner>,
    (sid, user_id): (String, String),
    ctl: Arc<Control>,
    rx: Receiver<Cmd>,
    rows: u16,
    cols: u16,
) {
    let child = match pty::spawn(&inner.settings.recipe, rows, cols) {
        Ok(c) => c,
        Err(e) => {
            log::error!("session {sid}: failed to start shell: {e}");
            Event::new("shell open", &user_id, &sid, Outcome::Error)
                .with("run_as", &inner.settings.run_as)
                .with("err", format!("failed to start shell: {e}"))
                .emit();
            inner.release(&sid, false);
            send(
                &inner,
                reply("new", &sid, 2, Some(format!("failed to start shell: {e}"))),
            );
            return;
        }
    };
    log::info!(
        "mender-connect starting shell command passing process, pid: {}",
        child.pid
    );
    Event::new("shell open", &user_id, &sid, Outcome::Ok)
        .with("run_as", &inner.settings.run_as)
        .with("pid", child.pid)
        .with("rows", rows)
        .with("cols", cols)
        .emit();
    send(&inner, reply("new", &sid, 1, Some("Shell started".into())));
    let now = Instant::now();
    let mut sh = Shell {
        user_id,
        started: now,
        rx_bytes: 0,
        tx_bytes: 0,
        start_ms: inner.now_ms(),
        next_ping: now + inner.settings.ping,
        last_input: now,
        inner,
        sid,
        ctl,
        rx,
        child,
        pending: Vec::new(),
        written: 0,
        backlog: Vec::new(),
        dropped: 0,
    };
    sh.main_loop();
}

/// Sends a reply or notice from the shell's thread (may wait for room).
fn send(inner: &Inner, msg: ProtoMsg) {
    if let Err(e) = inner
        .out
        .send_frame(codec::encode(&msg), Duration::from_secs(4))
    {
        log::debug!(
            "shell message {:?} for session {} not sent: {e}",
            msg.hdr.typ,
            msg.hdr.sid
        );
    }
}

enum Flush {
    Done,
    Full,
    Disconnected,
}

enum Read {
    More,
    Eof,
}

struct Shell {
    inner: Arc<Inner>,
    sid: String,
    /// The server's `user_id` of the `new`, and when the shell started.
    user_id: String,
    started: Instant,
    /// Input bytes from the operator and output bytes read from the PTY.
    rx_bytes: u64,
    tx_bytes: u64,
    ctl: Arc<Control>,
    rx: Receiver<Cmd>,
    child: Child,
    /// Input not yet written to the PTY, `written` bytes of it already are.
    pending: Vec<u8>,
    written: usize,
    /// Output not yet queued for the server.
    backlog: Vec<u8>,
    dropped: usize,
    start_ms: u64,
    next_ping: Instant,
    last_input: Instant,
}

impl Shell {
    fn main_loop(&mut self) {
        loop {
            let stop = self.ctl.stop.swap(0, Ordering::AcqRel);
            if stop != 0 {
                if self.stop(stop) {
                    return;
                }
                continue;
            }
            self.commands();
            if self.written < self.pending.len() {
                self.write_input();
            }
            let flush = self.flush(SEND_WAIT);

            let now = Instant::now();
            if now >= self.health_deadline() {
                log::warn!(
                    "session {}, health check failed, connection with the client lost",
                    self.sid
                );
                self.end_by_timer("health check failed", "health-check");
                log::info!("session {} successfully stopped", self.sid);
                return;
            }
            if self.expiry().is_some_and(|at| now >= at) {
                log::info!("session {} expired; stopping its shell", self.sid);
                self.end_by_timer("session expired", "expiry");
                return;
            }
            if now >= self.next_ping {
                self.ping();
                self.next_ping += self.inner.settings.ping;
                if self.next_ping <= now {
                    self.next_ping = now + self.inner.settings.ping;
                }
            }

            let mut wait = self.next_ping.min(self.health_deadline());
            if let Some(at) = self.expiry() {
                wait = wait.min(at);
            }
            let mut timeout = wait.saturating_duration_since(now);
            match flush {
                Flush::Done => {}
                Flush::Full => timeout = Duration::ZERO,
                Flush::Disconnected => timeout = timeout.min(RELINK_POLL),
            }
            let connected = self.inner.out.is_connected();
            // A full backlog with a live link is back-pressure: leave the
            // output in the PTY until the server takes what we have.
            let read = self.backlog.len() < BACKLOG_MAX || !connected;
            let mut master_ev = 0;
            if read {
                master_ev |= libc::POLLIN;
            }
            if self.written < self.pending.len() {
                master_ev |= libc::POLLOUT;
            }
            // Without a pidfd (old kernels) a negative fd makes poll skip it.
            let pidfd = self.child.pidfd.as_ref().map_or(-1, |p| p.as_raw_fd());
            let mut fds = [
                PollFd::new(self.ctl.wake.as_raw_fd(), libc::POLLIN),
                PollFd::new(self.child.master.as_raw_fd(), master_ev),
                PollFd::new(pidfd, libc::POLLIN),
            ];
            let ms = timeout_ms(timeout.min(Duration::from_secs(3600)));
            let rev = match poll(&mut fds, ms) {
                Ok(_) => fds.map(|f| f.revents()),
                Err(e) => {
                    log::error!("session {}: poll failed: {e}", self.sid);
                    self.end_by_timer("internal error", "error");
                    return;
                }
            };
            if rev[0] != 0 {
                self.ctl.wake.drain();
            }
            let mut exited = rev[2] != 0;
            if rev[1] & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
                && read
                && let Read::Eof = self.read_output(CHUNK * 4)
            {
                exited = true;
            }
            if exited {
                self.natural_exit();
                return;
            }
        }
    }

    fn health_deadline(&self) -> Instant {
        let started = self.inner.epoch + Duration::from_millis(self.start_ms);
        let pong = *self.ctl.pong_at.lock().unwrap_or_else(|p| p.into_inner());
        pong.map_or(started, |p| p.max(started)) + self.inner.settings.pong_wait
    }

    fn expiry(&self) -> Option<Instant> {
        let s = &self.inner.settings;
        if let Some(idle) = s.expire_idle {
            return Some(self.last_input + idle);
        }
        s.expire_after
            .map(|after| self.inner.epoch + Duration::from_millis(self.start_ms) + after)
    }

    fn ping(&self) {
        let secs = self
            .inner
            .settings
            .pong_wait
            .as_millis()
            .div_ceil(1000)
            .max(1) as i64;
        if let Err(e) = self.inner.out.try_send(&ping_msg(&self.sid, secs)) {
            log::debug!("health-check ping for session {} not sent: {e}", self.sid);
        }
    }

    fn commands(&mut self) {
        while let Ok(cmd) = self.rx.try_recv() {
            match cmd {
                Cmd::Input(bytes) => {
                    self.last_input = Instant::now();
                    self.rx_bytes += bytes.len() as u64;
                    if self.written == self.pending.len() {
                        // nothing pending: the message's own buffer will do
                        self.pending = bytes;
                        self.written = 0;
                    } else {
                        self.pending.extend_from_slice(&bytes);
                    }
                }
            }
        }
        let size = self
            .ctl
            .resize
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some((rows, cols)) = size
            && let Err(e) = pty::set_size(self.child.master.as_raw_fd(), rows, cols)
        {
            log::error!("session {}: resize failed: {e}", self.sid);
        }
    }

    /// Writes as much pending input as the PTY takes; the rest waits for POLLOUT.
    fn write_input(&mut self) {
        while self.written < self.pending.len() {
            let rest = &self.pending[self.written..];
            // SAFETY: writes from a valid slice to our own descriptor.
            let n = unsafe {
                libc::write(
                    self.child.master.as_raw_fd(),
                    rest.as_ptr().cast(),
                    rest.len(),
                )
            };
            if n >= 0 {
                self.written += n as usize;
                self.ctl.queued.fetch_sub(n as usize, Ordering::AcqRel);
                continue;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return,
                _ => {
                    let lost = self.pending.len() - self.written;
                    self.ctl.queued.fetch_sub(lost, Ordering::AcqRel);
                    self.pending.clear();
                    self.written = 0;
                    send(
                        &self.inner,
                        reply(
                            "shell",
                            &self.sid,
                            2,
                            Some(format!(
                                "routeMessage: shell command execution error, session_id={}: \
                                 write /dev/ptmx: {}",
                                self.sid,
                                crate::sys::errno::go_text(&e)
                            )),
                        ),
                    );
                    return;
                }
            }
        }
        // all written: hold no input memory while idle
        self.pending = Vec::new();
        self.written = 0;
    }

    /// Reads what the PTY has (up to `limit` bytes) into the backlog.
    fn read_output(&mut self, limit: usize) -> Read {
        let mut total = 0;
        while total < limit {
            // Read straight into the backlog's spare room: no read buffer
            // is kept per shell, and an idle shell holds no output memory.
            self.backlog.reserve(CHUNK);
            let spare = self.backlog.spare_capacity_mut();
            // SAFETY: reads into the backlog's own spare capacity, of the
            // given length.
            let n = unsafe {
                libc::read(
                    self.child.master.as_raw_fd(),
                    spare.as_mut_ptr().cast(),
                    spare.len(),
                )
            };
            if n > 0 {
                let n = n as usize;
                self.tx_bytes += n as u64;
                // SAFETY: the kernel initialised these n bytes of spare room.
                unsafe { self.backlog.set_len(self.backlog.len() + n) };
                total += n;
                self.trim();
                if self.backlog.len() >= CHUNK {
                    // keep output moving instead of piling it up
                    if let Flush::Full = self.flush(SEND_WAIT) {
                        return Read::More;
                    }
                }
                continue;
            }
            if n == 0 {
                return Read::Eof;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Read::More,
                // EIO: the last holder of the terminal closed it
                _ => return Read::Eof,
            }
        }
        Read::More
    }

    /// While the link is down, keep only the newest `BACKLOG_MAX` bytes.
    fn trim(&mut self) {
        if self.backlog.len() > BACKLOG_MAX && !self.inner.out.is_connected() {
            let excess = self.backlog.len() - BACKLOG_MAX;
            if self.dropped == 0 {
                log::warn!(
                    "session {}: not connected; dropping the oldest shell output beyond {} KiB",
                    self.sid,
                    BACKLOG_MAX / 1024
                );
            }
            self.backlog.drain(..excess);
            self.dropped += excess;
        }
    }

    /// Queues the backlog for the server in ≤ 4 KiB messages.
    fn flush(&mut self, wait: Duration) -> Flush {
        while !self.backlog.is_empty() {
            let n = self.backlog.len().min(CHUNK);
            let msg = output_msg(&self.sid, self.backlog[..n].to_vec());
            match self.inner.out.send_frame(codec::encode(&msg), wait) {
                Ok(()) => {
                    self.backlog.drain(..n);
                }
                Err(SendError::Full) => return Flush::Full,
                Err(SendError::Disconnected) => {
                    self.trim();
                    return Flush::Disconnected;
                }
            }
        }
        if self.dropped > 0 {
            log::warn!(
                "session {}: {} bytes of shell output were lost while disconnected",
                self.sid,
                self.dropped
            );
            self.dropped = 0;
        }
        // nothing in flight: hold no memory for it
        self.backlog = Vec::new();
        Flush::Done
    }

    /// A stop was requested (bits of `STOP_*`). Returns false if the shell
    /// could not be ended and keeps running.
    fn stop(&mut self, bits: u8) -> bool {
        let want_reply = bits & STOP_REPLY != 0;
        let grace = if want_reply { STOP_GRACE } else { QUIET_GRACE };
        let by = super::by_name(self.ctl.by.load(Ordering::Acquire));
        match self.child.terminate(grace) {
            Ok(status) => {
                if let Some(st) = status {
                    log::debug!(
                        "session {}: shell ended: {}",
                        self.sid,
                        pty::status_text(st)
                    );
                }
                // before the release: shutdown waits for that, then exits
                self.audit_close(by, status);
                self.inner.release(&self.sid, false);
                self.finish(want_reply, None);
                true
            }
            // SAFETY: kill with signal 0 only probes the pid.
            Err(e) if unsafe { libc::kill(self.child.pid, 0) } == 0 => {
                log::error!("session {}: could not terminate shell: {e}", self.sid);
                if want_reply {
                    send(
                        &self.inner,
                        reply(
                            "stop",
                            &self.sid,
                            2,
                            Some(format!("could not terminate shell: {e}.")),
                        ),
                    );
                }
                false
            }
            Err(_) => {
                self.audit_close(by, None);
                self.inner.release(&self.sid, false);
                self.finish(want_reply, None);
                true
            }
        }
    }

    /// The shell is gone and its slot free: answer any stop that arrived
    /// meanwhile, or send the device's own `stop` with `notice`.
    fn finish(&mut self, mut want_reply: bool, notice: Option<&str>) {
        want_reply |= self.ctl.stop.swap(0, Ordering::AcqRel) & STOP_REPLY != 0;
        if let Some(text) = notice
            && !want_reply
        {
            self.flush(Duration::from_secs(1));
            send(&self.inner, reply("stop", &self.sid, 2, Some(text.into())));
        }
        if want_reply {
            send(&self.inner, reply("stop", &self.sid, 1, None));
        }
        if !self.backlog.is_empty() {
            log::debug!(
                "session {}: {} bytes of output not delivered",
                self.sid,
                self.backlog.len()
            );
        }
    }

    /// The audit line of a shell that ended; `by` says who ended it.
    fn audit_close(&self, by: &str, status: Option<libc::c_int>) {
        Event::new("shell close", &self.user_id, &self.sid, Outcome::Ok)
            .with("pid", self.child.pid)
            .with("stopped_by", by)
            .with_opt("status", status.map(pty::status_text))
            .with("rx_bytes", self.rx_bytes)
            .with("tx_bytes", self.tx_bytes)
            .with_duration(self.started.elapsed())
            .emit();
    }

    /// Expiry or a failed health check (`by`): stop, free the slot, tell the
    /// server `why`.
    fn end_by_timer(&mut self, why: &str, by: &str) {
        let status = match self.child.terminate(STOP_GRACE) {
            Ok(st) => st,
            Err(e) => {
                log::error!("session {}: {e}", self.sid);
                None
            }
        };
        // logged before the slot is freed: shutdown waits only for that
        self.audit_close(by, status);
        self.inner.release(&self.sid, true);
        self.finish(false, Some(why));
    }

    /// The shell exited by itself: forward its last output, hang up what it
    /// left behind, free the slot at once and send the device `stop`.
    fn natural_exit(&mut self) {
        let _ = self.read_output(BACKLOG_MAX);
        let status = if self.child.wait_exit(Duration::from_millis(500)) {
            self.child.hang_up_and_reap()
        } else {
            // EOF but still alive (it closed its terminal): end it.
            self.child.terminate(QUIET_GRACE).ok().flatten()
        };
        match status {
            Some(st) => log::info!(
                "session {}: shell exited: {}",
                self.sid,
                pty::status_text(st)
            ),
            None => log::info!("session {}: shell exited", self.sid),
        }
        // logged before the slot is freed: shutdown waits only for that
        self.audit_close("exit", status);
        self.inner.release(&self.sid, true);
        self.finish(false, Some(EXIT_TEXT));
    }
}
