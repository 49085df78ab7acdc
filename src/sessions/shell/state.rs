//! The decisions of one shell's thread, without I/O: what to write to the
//! PTY, which output to send and when, the health-check ping and its pong
//! deadline, expiry, and how to stop. The thread (`session.rs`) feeds it
//! events with the current `Instant` and carries out what it returns, so
//! every rule here is tested with plain values and no process.

use std::io;
use std::time::{Duration, Instant};

use super::STOP_REPLY;

/// Largest output body per message: peers accept 8 KiB frames (protocol.md §1.5).
pub(super) const CHUNK: usize = 4096;
/// Output kept while the link is down (oldest bytes dropped beyond this).
pub(super) const BACKLOG_MAX: usize = 64 * 1024;
/// How often a shell holding output checks whether the link is back.
pub(super) const RELINK_POLL: Duration = Duration::from_millis(200);
/// Signal escalation steps for a server stop and for shutdown.
pub(super) const STOP_GRACE: Duration = Duration::from_millis(1000);
pub(super) const QUIET_GRACE: Duration = Duration::from_millis(250);
/// Longest single poll: timers are re-checked at least this often.
const MAX_WAIT: Duration = Duration::from_secs(3600);

/// The per-daemon timer settings a shell runs by.
#[derive(Debug, Clone, Copy)]
pub(super) struct Timers {
    /// Health-check ping period.
    pub ping: Duration,
    /// How long after the start or the last pong the shell is declared dead.
    pub pong_wait: Duration,
    /// Fixed lifetime (`ExpireAfter`), unless idle expiry is set.
    pub expire_after: Option<Duration>,
    /// Lifetime since the last input (`ExpireAfterIdle`).
    pub expire_idle: Option<Duration>,
}

/// What the timers demand at a tick.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Due {
    /// Nothing yet.
    Nothing,
    /// Send a health-check ping announcing this pong deadline in seconds.
    Ping(i64),
    /// No pong in time: end the shell, tell the server "health check failed".
    HealthCheckFailed,
    /// The session lived its time: end the shell, "session expired".
    Expired,
}

/// How the last flush of output ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flush {
    /// Everything was queued.
    Done,
    /// The outbound lane is full: try again at once.
    Full,
    /// No link: keep the output and look again in a while.
    Disconnected,
}

/// How to end the shell on a stop request.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct StopPlan {
    /// The server asked with a sid and gets a `stop` reply.
    pub reply: bool,
    /// Wait between SIGHUP, SIGTERM and SIGKILL.
    pub grace: Duration,
}

/// One shell's state between events.
#[derive(Debug)]
pub(super) struct Core {
    timers: Timers,
    started: Instant,
    last_pong: Option<Instant>,
    last_input: Instant,
    next_ping: Instant,
    /// Input not yet written to the PTY, `written` bytes of it already are.
    pending: Vec<u8>,
    written: usize,
    /// Output not yet queued for the server.
    backlog: Vec<u8>,
    /// Output dropped while the link was down, not yet reported.
    dropped: usize,
    /// Input bytes from the operator and output bytes read from the PTY.
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

impl Core {
    /// A shell that started at `now`.
    pub fn new(timers: Timers, now: Instant) -> Core {
        Core {
            timers,
            started: now,
            last_pong: None,
            last_input: now,
            next_ping: now + timers.ping,
            pending: Vec::new(),
            written: 0,
            backlog: Vec::new(),
            dropped: 0,
            rx_bytes: 0,
            tx_bytes: 0,
        }
    }

    /// When the shell started.
    pub fn started(&self) -> Instant {
        self.started
    }

    // --- input ---

    /// Operator input arrived at `now`: it waits in order behind any input
    /// not yet written.
    pub fn input(&mut self, bytes: Vec<u8>, now: Instant) {
        if bytes.is_empty() {
            return;
        }
        self.last_input = now;
        self.rx_bytes += bytes.len() as u64;
        if self.written == self.pending.len() {
            // nothing pending: the message's own buffer will do
            self.pending = bytes;
            self.written = 0;
        } else {
            self.pending.extend_from_slice(&bytes);
        }
    }

    /// Input to write to the PTY next (empty when there is none).
    pub fn unwritten(&self) -> &[u8] {
        &self.pending[self.written..]
    }

    /// Whether input waits for the PTY to take it (poll for POLLOUT).
    pub fn wants_write(&self) -> bool {
        self.written < self.pending.len()
    }

    /// The PTY took `n` bytes of [`Core::unwritten`].
    pub fn wrote(&mut self, n: usize) {
        self.written = (self.written + n).min(self.pending.len());
        if self.written == self.pending.len() {
            // all written: hold no input memory while idle
            self.pending = Vec::new();
            self.written = 0;
        }
    }

    /// Writing failed: the rest of the input is dropped; returns how many
    /// bytes were lost.
    pub fn write_failed(&mut self) -> usize {
        let lost = self.pending.len() - self.written;
        self.pending = Vec::new();
        self.written = 0;
        lost
    }

    // --- output ---

    /// Whether to read the PTY: a full backlog with a live link is
    /// back-pressure, the output stays in the PTY until the server takes
    /// what there is; without a link the newest output wins.
    pub fn wants_read(&self, connected: bool) -> bool {
        self.backlog.len() < BACKLOG_MAX || !connected
    }

    /// Reads output with `read`, which appends at most one chunk to the
    /// backlog it is given (no read buffer per shell). Returns what `read`
    /// returned (`Ok(0)` is end of file) and whether this read began
    /// dropping old output because the link is down (`connected` false).
    pub fn fill(
        &mut self,
        read: impl FnOnce(&mut Vec<u8>, usize) -> io::Result<usize>,
        connected: bool,
    ) -> (io::Result<usize>, bool) {
        let r = read(&mut self.backlog, CHUNK);
        if self.backlog.is_empty() {
            // nothing read: hold no output memory while idle
            self.backlog = Vec::new();
        }
        self.tx_bytes += *r.as_ref().unwrap_or(&0) as u64;
        (r, self.trim(connected))
    }

    /// Whether enough output piled up to send it before reading more.
    pub fn chunk_ready(&self) -> bool {
        self.backlog.len() >= CHUNK
    }

    /// While the link is down, keep only the newest `BACKLOG_MAX` bytes.
    /// Returns true when this began dropping (for a warning).
    pub fn trim(&mut self, connected: bool) -> bool {
        if self.backlog.len() <= BACKLOG_MAX || connected {
            return false;
        }
        let excess = self.backlog.len() - BACKLOG_MAX;
        let first = self.dropped == 0;
        self.backlog.drain(..excess);
        self.dropped += excess;
        first
    }

    /// The next output message's body (≤ `CHUNK` bytes), if any.
    pub fn chunk(&self) -> Option<&[u8]> {
        let n = self.backlog.len().min(CHUNK);
        (n > 0).then(|| &self.backlog[..n])
    }

    /// The chunk of `n` bytes was queued for the server.
    pub fn sent(&mut self, n: usize) {
        self.backlog.drain(..n.min(self.backlog.len()));
    }

    /// Every byte was queued: releases the backlog's memory and returns the
    /// bytes lost while disconnected since the last report (0 if none).
    pub fn flushed(&mut self) -> usize {
        self.backlog = Vec::new();
        std::mem::take(&mut self.dropped)
    }

    /// Output still held (not delivered if the shell ends now).
    pub fn held(&self) -> usize {
        self.backlog.len()
    }

    // --- timers ---

    /// A pong arrived at `at`.
    pub fn pong(&mut self, at: Instant) {
        self.last_pong = Some(at);
    }

    fn health_deadline(&self) -> Instant {
        self.last_pong.map_or(self.started, |p| p.max(self.started)) + self.timers.pong_wait
    }

    fn expiry(&self) -> Option<Instant> {
        if let Some(idle) = self.timers.expire_idle {
            return Some(self.last_input + idle);
        }
        self.timers.expire_after.map(|after| self.started + after)
    }

    /// The timers at `now`: a missed pong first, then expiry, then a ping
    /// (whose next one is then scheduled a period later).
    pub fn tick(&mut self, now: Instant) -> Due {
        if now >= self.health_deadline() {
            return Due::HealthCheckFailed;
        }
        if self.expiry().is_some_and(|at| now >= at) {
            return Due::Expired;
        }
        if now >= self.next_ping {
            self.next_ping += self.timers.ping;
            if self.next_ping <= now {
                self.next_ping = now + self.timers.ping;
            }
            let secs = self.timers.pong_wait.as_millis().div_ceil(1000).max(1) as i64;
            return Due::Ping(secs);
        }
        Due::Nothing
    }

    /// How long the thread may sleep at `now` after a flush that ended in
    /// `flush`: until the next timer, at once if the lane was full, and no
    /// longer than `RELINK_POLL` while output waits for a link.
    pub fn wait(&self, now: Instant, flush: Flush) -> Duration {
        let mut at = self.next_ping.min(self.health_deadline());
        if let Some(e) = self.expiry() {
            at = at.min(e);
        }
        let wait = at.saturating_duration_since(now).min(MAX_WAIT);
        match flush {
            Flush::Done => wait,
            Flush::Full => Duration::ZERO,
            Flush::Disconnected => wait.min(RELINK_POLL),
        }
    }

    // --- stop ---

    /// A stop with `STOP_*` bits: a server stop (reply wanted) gets the long
    /// grace, a quiet one (shutdown, stop by user) the short one.
    pub fn stop_plan(bits: u8) -> StopPlan {
        let reply = bits & STOP_REPLY != 0;
        StopPlan {
            reply,
            grace: if reply { STOP_GRACE } else { QUIET_GRACE },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::STOP_QUIET;
    use super::*;

    const PING: Duration = Duration::from_secs(60);
    const PONG_WAIT: Duration = Duration::from_secs(65);

    fn timers() -> Timers {
        Timers {
            ping: PING,
            pong_wait: PONG_WAIT,
            expire_after: None,
            expire_idle: None,
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// Feeds `bytes` as if the PTY returned them in one read.
    fn feed(c: &mut Core, bytes: &[u8], connected: bool) -> bool {
        let (r, first_drop) = c.fill(
            |buf, max| {
                let n = bytes.len().min(max);
                buf.extend_from_slice(&bytes[..n]);
                Ok(n)
            },
            connected,
        );
        assert_eq!(r.expect("read"), bytes.len().min(CHUNK));
        first_drop
    }

    #[test]
    fn pings_every_period_and_announces_the_pong_deadline() {
        let t0 = Instant::now();
        let mut c = Core::new(timers(), t0);
        assert_eq!(c.tick(t0 + secs(59)), Due::Nothing);
        assert_eq!(c.tick(t0 + secs(60)), Due::Ping(65));
        assert_eq!(c.tick(t0 + secs(61)), Due::Nothing, "one ping per period");
        c.pong(t0 + secs(61));
        assert_eq!(c.tick(t0 + secs(120)), Due::Ping(65));
    }

    #[test]
    fn a_late_tick_schedules_the_next_ping_a_period_after_it() {
        let t0 = Instant::now();
        let mut c = Core::new(timers(), t0);
        c.pong(t0 + secs(10));
        // the thread slept through two periods (e.g. a stopped VM)
        c.pong(t0 + secs(170));
        assert_eq!(c.tick(t0 + secs(170)), Due::Ping(65));
        assert_eq!(c.tick(t0 + secs(229)), Due::Nothing);
        assert_eq!(c.tick(t0 + secs(230)), Due::Ping(65));
    }

    #[test]
    fn without_a_pong_the_health_check_fails_after_the_pong_wait() {
        let t0 = Instant::now();
        let mut c = Core::new(timers(), t0);
        assert_eq!(c.tick(t0 + secs(60)), Due::Ping(65));
        assert_eq!(c.tick(t0 + secs(64)), Due::Nothing);
        assert_eq!(c.tick(t0 + secs(65)), Due::HealthCheckFailed);
    }

    #[test]
    fn each_pong_moves_the_health_deadline() {
        let t0 = Instant::now();
        let mut c = Core::new(timers(), t0);
        assert_eq!(c.tick(t0 + secs(60)), Due::Ping(65));
        c.pong(t0 + secs(60));
        assert_eq!(
            c.wait(t0 + secs(61), Flush::Done),
            secs(59),
            "next ping first"
        );
        assert_eq!(c.tick(t0 + secs(120)), Due::Ping(65));
        assert_eq!(c.tick(t0 + secs(124)), Due::Nothing);
        assert_eq!(c.tick(t0 + secs(125)), Due::HealthCheckFailed);
    }

    #[test]
    fn a_pong_from_before_the_start_does_not_shorten_the_deadline() {
        let t0 = Instant::now() + secs(100);
        let mut c = Core::new(timers(), t0);
        c.pong(t0 - secs(100));
        assert_eq!(c.tick(t0 + secs(64)), Due::Ping(65));
        assert_eq!(c.tick(t0 + secs(65)), Due::HealthCheckFailed);
    }

    #[test]
    fn expire_after_counts_from_the_start_regardless_of_input() {
        let t0 = Instant::now();
        let mut c = Core::new(
            Timers {
                expire_after: Some(secs(30)),
                ..timers()
            },
            t0,
        );
        c.input(b"ls\n".to_vec(), t0 + secs(29));
        assert_eq!(c.wait(t0 + secs(29), Flush::Done), secs(1));
        assert_eq!(c.tick(t0 + secs(29)), Due::Nothing);
        assert_eq!(c.tick(t0 + secs(30)), Due::Expired);
    }

    #[test]
    fn expire_after_idle_counts_from_the_last_input() {
        let t0 = Instant::now();
        let mut c = Core::new(
            Timers {
                expire_idle: Some(secs(30)),
                ..timers()
            },
            t0,
        );
        c.input(b"ls\n".to_vec(), t0 + secs(20));
        assert_eq!(c.tick(t0 + secs(49)), Due::Nothing);
        assert_eq!(c.tick(t0 + secs(50)), Due::Expired);
        // empty input is no activity
        let mut c = Core::new(
            Timers {
                expire_idle: Some(secs(30)),
                ..timers()
            },
            t0,
        );
        c.input(Vec::new(), t0 + secs(20));
        assert_eq!(c.tick(t0 + secs(30)), Due::Expired);
    }

    #[test]
    fn a_health_failure_wins_over_expiry() {
        let t0 = Instant::now();
        let mut c = Core::new(
            Timers {
                expire_after: Some(secs(65)),
                ..timers()
            },
            t0,
        );
        assert_eq!(c.tick(t0 + secs(65)), Due::HealthCheckFailed);
    }

    #[test]
    fn the_wait_is_zero_when_full_and_short_while_disconnected() {
        let t0 = Instant::now();
        let c = Core::new(timers(), t0);
        assert_eq!(c.wait(t0, Flush::Done), PING);
        assert_eq!(c.wait(t0, Flush::Full), Duration::ZERO);
        assert_eq!(c.wait(t0, Flush::Disconnected), RELINK_POLL);
        assert_eq!(c.wait(t0 + secs(61), Flush::Done), Duration::ZERO);
    }

    #[test]
    fn input_is_written_in_order_and_released_when_done() {
        let t0 = Instant::now();
        let mut c = Core::new(timers(), t0);
        assert!(!c.wants_write());
        c.input(b"abc".to_vec(), t0);
        c.wrote(1);
        c.input(b"def".to_vec(), t0);
        assert_eq!(c.unwritten(), b"bcdef");
        assert!(c.wants_write());
        c.wrote(5);
        assert!(!c.wants_write());
        assert_eq!(c.pending.capacity(), 0, "no input memory held while idle");
        assert_eq!(c.rx_bytes, 6);
    }

    #[test]
    fn a_failed_write_drops_the_rest_and_says_how_much() {
        let t0 = Instant::now();
        let mut c = Core::new(timers(), t0);
        c.input(b"abcdef".to_vec(), t0);
        c.wrote(2);
        assert_eq!(c.write_failed(), 4);
        assert!(!c.wants_write());
        assert_eq!(c.unwritten(), b"");
    }

    #[test]
    fn output_goes_out_in_chunks_and_memory_is_released_after() {
        let t0 = Instant::now();
        let mut c = Core::new(timers(), t0);
        let data: Vec<u8> = (0..CHUNK * 2 + 100).map(|i| i as u8).collect();
        for part in data.chunks(CHUNK) {
            feed(&mut c, part, true);
        }
        assert!(c.chunk_ready());
        let mut out = Vec::new();
        while let Some(ch) = c.chunk() {
            assert!(ch.len() <= CHUNK);
            out.extend_from_slice(ch);
            let n = ch.len();
            c.sent(n);
        }
        assert_eq!(out, data);
        assert_eq!(c.flushed(), 0);
        assert_eq!(c.backlog.capacity(), 0, "no output memory held while idle");
        assert_eq!(c.tx_bytes, data.len() as u64);
    }

    #[test]
    fn a_short_read_keeps_only_what_was_read() {
        let t0 = Instant::now();
        let mut c = Core::new(timers(), t0);
        feed(&mut c, b"hi", true);
        assert_eq!(c.chunk(), Some(&b"hi"[..]));
        assert!(!c.chunk_ready());
        let (r, _) = c.fill(|_, _| Err(io::ErrorKind::WouldBlock.into()), true);
        assert!(r.is_err());
        assert_eq!(c.held(), 2);
    }

    #[test]
    fn a_full_backlog_stops_reading_only_while_connected() {
        let t0 = Instant::now();
        let mut c = Core::new(timers(), t0);
        let block = vec![b'x'; CHUNK];
        for _ in 0..BACKLOG_MAX / CHUNK {
            assert!(c.wants_read(true));
            feed(&mut c, &block, true);
        }
        assert!(!c.wants_read(true), "back-pressure on the PTY");
        assert!(c.wants_read(false));
    }

    #[test]
    fn while_disconnected_the_newest_output_is_kept_and_the_loss_reported_once() {
        let t0 = Instant::now();
        let mut c = Core::new(timers(), t0);
        let mut firsts = 0;
        for i in 0..BACKLOG_MAX / CHUNK + 3 {
            if feed(&mut c, &vec![i as u8; CHUNK], false) {
                firsts += 1;
            }
        }
        assert_eq!(firsts, 1, "one warning when dropping starts");
        assert_eq!(c.held(), BACKLOG_MAX);
        assert_eq!(c.chunk().map(|b| b[0]), Some(3), "oldest chunks dropped");
        while let Some(ch) = c.chunk() {
            let n = ch.len();
            c.sent(n);
        }
        assert_eq!(c.flushed(), 3 * CHUNK);
        assert_eq!(c.flushed(), 0, "reported once");
    }

    #[test]
    fn a_server_stop_gets_a_reply_and_the_long_grace() {
        assert_eq!(
            Core::stop_plan(STOP_REPLY),
            StopPlan {
                reply: true,
                grace: STOP_GRACE
            }
        );
        assert_eq!(
            Core::stop_plan(STOP_QUIET),
            StopPlan {
                reply: false,
                grace: QUIET_GRACE
            }
        );
        assert!(Core::stop_plan(STOP_REPLY | STOP_QUIET).reply);
    }
}
