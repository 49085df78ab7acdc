//! One shell's thread (`shell-<sid8>`): starts the process, moves input to the
//! PTY and output to the server, and carries out what the shell's [`Core`]
//! decides about health checks, expiry and stopping — so nothing one shell
//! does can hold up another. It only moves bytes and polls.

use std::io::{self, Write as _};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::pty::{self, Child};
use super::state::{BACKLOG_MAX, CHUNK, Core, Due, Flush, QUIET_GRACE, STOP_GRACE, Timers};
use super::{Control, Inner, STOP_REPLY, output_msg, ping_msg, reply};
use crate::audit::{Event, Outcome};
use crate::conn::outbound::SendError;
use crate::sys::poll::{PollFd, poll, timeout_ms};
use crate::sys::process::{WaitStatus, status_text};
use crate::wire::codec::{self, ProtoMsg};
use crate::wire::types::{shell as t, status};

/// How long one output send may wait for room in the outbound queue before
/// the thread looks at its commands again.
const SEND_WAIT: Duration = Duration::from_millis(50);
/// The shell thread's stack. Measured high-water mark over a whole shell's
/// life (open, input, resize, output, stop), in /proc/PID/smaps pages of
/// the stack mapping, including glibc's thread block at its top: 8 KiB in
/// a release build, 16 KiB in a debug build. Only touched pages cost RSS,
/// so the reservation keeps 4x headroom over the debug figure for the
/// paths that were not measured (spawn and write errors, expiry scanning
/// /proc): an overflow would abort the whole daemon.
const STACK: usize = 64 * 1024;
/// The reference's read-error text, which clients expect in a device `stop`.
const EXIT_TEXT: &str = "read /dev/ptmx: input/output error";

/// Tells the terminal the thread's work is over when it is, however it ends.
struct Done(Arc<Inner>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.thread_done();
    }
}

/// Starts the thread for a freshly registered shell; `who` is its sid and
/// the server's `user_id`.
pub(super) fn start(
    inner: Arc<Inner>,
    who: (String, String),
    ctl: Arc<Control>,
    rows: u16,
    cols: u16,
) -> io::Result<JoinHandle<()>> {
    let name = format!("shell-{}", crate::sessions::sid8(&who.0));
    crate::threads::spawn(name, STACK, move || {
        // declared first, dropped last: after the shell and its process
        let _done = Done(Arc::clone(&inner));
        run(inner, who, ctl, rows, cols);
    })
}

fn run(
    inner: Arc<Inner>,
    (sid, user_id): (String, String),
    ctl: Arc<Control>,
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
                reply(
                    t::NEW,
                    &sid,
                    status::ERROR,
                    Some(format!("failed to start shell: {e}")),
                ),
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
    send(
        &inner,
        reply(t::NEW, &sid, status::NORMAL, Some("Shell started".into())),
    );
    let s = &inner.settings;
    let timers = Timers {
        ping: s.ping,
        pong_wait: s.pong_wait,
        expire_after: s.expire_after,
        expire_idle: s.expire_idle,
    };
    let mut sh = Shell {
        core: Core::new(timers, Instant::now()),
        user_id,
        inner,
        sid,
        ctl,
        child,
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

enum Read {
    More,
    Eof,
}

struct Shell {
    inner: Arc<Inner>,
    sid: String,
    /// The server's `user_id` of the `new`.
    user_id: String,
    ctl: Arc<Control>,
    child: Child,
    core: Core,
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
            if self.core.wants_write() {
                self.write_input();
            }
            let flush = self.flush(SEND_WAIT);
            // a pong that came during the flush (up to SEND_WAIT) must count
            // before the health check is judged
            self.take_pong();
            let now = Instant::now();
            match self.core.tick(now) {
                Due::Nothing => {}
                Due::Ping(secs) => self.ping(secs),
                Due::HealthCheckFailed => {
                    log::warn!(
                        "session {}, health check failed, connection with the client lost",
                        self.sid
                    );
                    self.end_by_timer("health check failed", "health-check");
                    log::info!("session {} successfully stopped", self.sid);
                    return;
                }
                Due::Expired => {
                    log::info!("session {} expired; stopping its shell", self.sid);
                    self.end_by_timer("session expired", "expiry");
                    return;
                }
            }

            let timeout = self.core.wait(now, flush);
            let read = self.core.wants_read(self.inner.out.is_connected());
            let mut master_ev = 0;
            if read {
                master_ev |= libc::POLLIN;
            }
            if self.core.wants_write() {
                master_ev |= libc::POLLOUT;
            }
            // Without a pidfd (old kernels) a negative fd makes poll skip it.
            let pidfd = self.child.pidfd.as_ref().map_or(-1, |p| p.as_raw_fd());
            let mut fds = [
                PollFd::new(self.ctl.wake.as_raw_fd(), libc::POLLIN),
                PollFd::new(self.child.master.as_raw_fd(), master_ev),
                PollFd::new(pidfd, libc::POLLIN),
            ];
            let rev = match poll(&mut fds, timeout_ms(timeout)) {
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

    fn ping(&self, secs: i64) {
        if let Err(e) = self.inner.out.try_send(&ping_msg(&self.sid, secs)) {
            log::debug!("health-check ping for session {} not sent: {e}", self.sid);
        }
    }

    /// Takes what the connection thread left: input, a pong, a resize.
    fn take_pong(&mut self) {
        let pong = self
            .ctl
            .pong_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(at) = pong {
            self.core.pong(at);
        }
    }

    fn commands(&mut self) {
        let input = std::mem::take(&mut *self.ctl.inbox.lock().unwrap_or_else(|p| p.into_inner()));
        if !input.is_empty() {
            self.core.input(input, Instant::now());
        }
        self.take_pong();
        let size = self
            .ctl
            .resize
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some((rows, cols)) = size
            && let Err(e) = crate::sys::pty::set_winsize(&self.child.master, rows, cols)
        {
            log::error!("session {}: resize failed: {e}", self.sid);
        }
    }

    /// Writes as much pending input as the PTY takes; the rest waits for POLLOUT.
    fn write_input(&mut self) {
        while self.core.wants_write() {
            match (&self.child.master).write(self.core.unwritten()) {
                Ok(n) => {
                    self.core.wrote(n);
                    self.ctl.queued.fetch_sub(n, Ordering::AcqRel);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    let lost = self.core.write_failed();
                    self.ctl.queued.fetch_sub(lost, Ordering::AcqRel);
                    send(
                        &self.inner,
                        reply(
                            t::SHELL,
                            &self.sid,
                            status::ERROR,
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
    }

    /// Reads what the PTY has (up to `limit` bytes) into the backlog.
    fn read_output(&mut self, limit: usize) -> Read {
        let mut total = 0;
        while total < limit {
            // Size each read by what is there, so a short echo costs a
            // short buffer, not a chunk. FIONREAD may not count output still
            // on its way, which a read waits for, and a PTY that hung up
            // reports 0: so read at least a byte, until EAGAIN or EIO.
            let ready = crate::sys::pty::readable(&self.child.master).unwrap_or(CHUNK);
            let connected = self.inner.out.is_connected();
            let master = &self.child.master;
            let (r, dropping) = self.core.fill(
                |buf, max| crate::sys::pty::read_append(master, buf, ready.clamp(1, max)),
                connected,
            );
            if dropping {
                log::warn!(
                    "session {}: not connected; dropping the oldest shell output beyond {} KiB",
                    self.sid,
                    BACKLOG_MAX / 1024
                );
            }
            match r {
                Ok(0) => return Read::Eof,
                Ok(n) => {
                    total += n;
                    // keep output moving instead of piling it up
                    if self.core.chunk_ready() && self.flush(SEND_WAIT) == Flush::Full {
                        return Read::More;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Read::More,
                // EIO: the last holder of the terminal closed it
                Err(_) => return Read::Eof,
            }
        }
        Read::More
    }

    /// Queues the backlog for the server in ≤ 4 KiB messages.
    fn flush(&mut self, wait: Duration) -> Flush {
        while let Some(chunk) = self.core.chunk() {
            let n = chunk.len();
            let msg = output_msg(&self.sid, chunk.to_vec());
            match self.inner.out.send_frame(codec::encode(&msg), wait) {
                Ok(()) => self.core.sent(n),
                Err(SendError::Full) => return Flush::Full,
                Err(SendError::Disconnected) => {
                    if self.core.trim(false) {
                        log::warn!(
                            "session {}: not connected; dropping the oldest shell output beyond {} KiB",
                            self.sid,
                            BACKLOG_MAX / 1024
                        );
                    }
                    return Flush::Disconnected;
                }
            }
        }
        let dropped = self.core.flushed();
        if dropped > 0 {
            log::warn!(
                "session {}: {} bytes of shell output were lost while disconnected",
                self.sid,
                dropped
            );
        }
        Flush::Done
    }

    /// A stop was requested (bits of `STOP_*`). Returns false if the shell
    /// could not be ended and keeps running.
    fn stop(&mut self, bits: u8) -> bool {
        let plan = Core::stop_plan(bits);
        let want_reply = plan.reply;
        let by = super::by_name(self.ctl.by.load(Ordering::Acquire));
        match self.child.terminate(plan.grace) {
            Ok(status) => {
                if let Some(st) = status {
                    log::debug!("session {}: shell ended: {}", self.sid, status_text(st));
                }
                // before the release: shutdown waits for that, then exits
                self.audit_close(by, status);
                self.inner.release(&self.sid, false);
                self.finish(want_reply, None);
                true
            }
            Err(e) if self.child.exists() => {
                log::error!("session {}: could not terminate shell: {e}", self.sid);
                if want_reply {
                    send(
                        &self.inner,
                        reply(
                            t::STOP,
                            &self.sid,
                            status::ERROR,
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
            send(
                &self.inner,
                reply(t::STOP, &self.sid, status::ERROR, Some(text.into())),
            );
        }
        if want_reply {
            send(&self.inner, reply(t::STOP, &self.sid, status::NORMAL, None));
        }
        if self.core.held() > 0 {
            log::debug!(
                "session {}: {} bytes of output not delivered",
                self.sid,
                self.core.held()
            );
        }
    }

    /// The audit line of a shell that ended; `by` says who ended it.
    fn audit_close(&self, by: &str, status: Option<WaitStatus>) {
        Event::new("shell close", &self.user_id, &self.sid, Outcome::Ok)
            .with("pid", self.child.pid)
            .with("stopped_by", by)
            .with_opt("status", status.map(status_text))
            .with("rx_bytes", self.core.rx_bytes)
            .with("tx_bytes", self.core.tx_bytes)
            .with_duration(self.core.started().elapsed())
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
            Some(st) => log::info!("session {}: shell exited: {}", self.sid, status_text(st)),
            None => log::info!("session {}: shell exited", self.sid),
        }
        // logged before the slot is freed: shutdown waits only for that
        self.audit_close("exit", status);
        self.inner.release(&self.sid, true);
        self.finish(false, Some(EXIT_TEXT));
    }
}
