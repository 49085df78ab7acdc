//! The connection thread's decisions, free of I/O: what an inbound message
//! means, when to ping, when the server counts as gone, and what to wait
//! for in `poll` and for how long. The thread loop (`pump.rs`) only moves
//! frames; every rule here is unit-tested with an injected clock.

use std::time::Instant;

use tungstenite::Message;

use super::end::LinkEnd;
use crate::conn::timing::Timing;

/// What to do with one message read off the websocket.
#[derive(Debug)]
pub(super) enum OnRead {
    /// Hand this data frame to the router.
    Deliver(Vec<u8>),
    /// Nothing beyond what the state already noted.
    Nothing,
    /// The server closed the link: answer its close and end.
    Closed(LinkEnd),
}

/// What `poll` should wait for.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct PollPlan {
    /// Events on the websocket's socket.
    pub events: i16,
    /// Milliseconds (0: do not sleep, more is readable already).
    pub timeout_ms: i32,
}

/// The link's keepalive and flow state.
#[derive(Debug)]
pub(super) struct PumpState {
    timing: Timing,
    last_heard: Instant,
    next_ping: Instant,
    write_blocked: bool,
    /// Go round again without sleeping in `poll` (more may be readable, or
    /// queued frames wait for the socket that just drained).
    again: bool,
}

impl PumpState {
    /// A link that came up at `now`.
    pub fn new(timing: Timing, now: Instant) -> PumpState {
        PumpState {
            timing,
            last_heard: now,
            next_ping: now + timing.ping_period,
            write_blocked: false,
            again: true,
        }
    }

    /// A new round of reads starts; reading stops at `WouldBlock` or after
    /// the burst, whichever comes first.
    pub fn start_round(&mut self) {
        self.again = true;
    }

    /// A read found nothing more: the next `poll` may sleep.
    pub fn drained(&mut self) {
        self.again = false;
    }

    /// One message read at `now`. Only the server's pings and pongs prove
    /// it alive (protocol.md §1.6); data frames do not.
    pub fn on_message(&mut self, msg: Message, now: Instant) -> OnRead {
        match msg {
            Message::Binary(b) => OnRead::Deliver(b.into()),
            Message::Text(t) => OnRead::Deliver(t.as_bytes().to_vec()),
            Message::Ping(_) | Message::Pong(_) => {
                self.last_heard = now;
                OnRead::Nothing
            }
            Message::Close(frame) => OnRead::Closed(LinkEnd::ClosedByServer(frame)),
            Message::Frame(_) => OnRead::Nothing,
        }
    }

    /// Whether queued frames may be written (not while the socket is full).
    pub fn may_write(&self) -> bool {
        !self.write_blocked
    }

    /// The last flush left bytes in the socket's way (`true`) or not.
    pub fn flushed(&mut self, blocked: bool) {
        if self.write_blocked && !blocked {
            // The socket took what was pending; frames queued meanwhile
            // were not taken (writes were held), and their producers wait
            // for room without waking anyone: go round again at once.
            self.again = true;
        }
        self.write_blocked = blocked;
    }

    /// The keepalive at `now`: `Ok(true)` when a ping is due (and the next
    /// one is scheduled), an end when the server has been silent too long.
    pub fn keepalive(&mut self, now: Instant) -> Result<bool, LinkEnd> {
        if now >= self.last_heard + self.timing.pong_wait {
            return Err(LinkEnd::Silent(self.timing.pong_wait));
        }
        if now >= self.next_ping {
            self.next_ping = now + self.timing.ping_period;
            return Ok(true);
        }
        Ok(false)
    }

    /// The payload of the device's ping.
    pub fn ping_payload(&self) -> Vec<u8> {
        self.timing.ping_payload()
    }

    /// What to poll for at `now`, sleeping at most until the next ping, the
    /// silence deadline or `also` (the router's timers).
    pub fn poll_plan(&self, now: Instant, also: Option<Instant>) -> PollPlan {
        let mut events = libc::POLLIN;
        if self.write_blocked {
            events |= libc::POLLOUT;
        }
        let until = self.next_ping.min(self.last_heard + self.timing.pong_wait);
        let until = also.map_or(until, |d| until.min(d));
        let timeout_ms = if self.again {
            0
        } else {
            until
                .saturating_duration_since(now)
                .as_millis()
                .clamp(1, i32::MAX as u128) as i32
        };
        PollPlan { events, timeout_ms }
    }

    /// What `poll` reported for the socket.
    pub fn on_poll(&self, revents: i16) -> Result<(), LinkEnd> {
        if revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
            return Err(LinkEnd::SocketError);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn timing() -> Timing {
        Timing {
            pong_wait: Duration::from_secs(60),
            ping_period: Duration::from_secs(54),
            session_idle: Duration::from_secs(60),
        }
    }

    #[test]
    fn pings_every_ping_period_and_not_before() {
        let t0 = Instant::now();
        let mut s = PumpState::new(timing(), t0);
        assert!(!s.keepalive(t0 + Duration::from_secs(53)).expect("alive"));
        // the server's pong keeps the link alive past the first pong wait
        s.on_message(
            Message::Pong(Vec::new().into()),
            t0 + Duration::from_secs(50),
        );
        assert!(s.keepalive(t0 + Duration::from_secs(54)).expect("alive"));
        assert!(!s.keepalive(t0 + Duration::from_secs(55)).expect("alive"));
        assert!(s.keepalive(t0 + Duration::from_secs(108)).expect("alive"));
    }

    #[test]
    fn silence_for_the_pong_wait_ends_the_link_and_data_does_not_count() {
        let t0 = Instant::now();
        let mut s = PumpState::new(timing(), t0);
        let got = s.on_message(
            Message::Binary(vec![1, 2].into()),
            t0 + Duration::from_secs(30),
        );
        assert!(matches!(got, OnRead::Deliver(b) if b == [1, 2]));
        match s.keepalive(t0 + Duration::from_secs(60)) {
            Err(LinkEnd::Silent(d)) => assert_eq!(d, Duration::from_secs(60)),
            other => panic!("expected silence, got {other:?}"),
        }
        let mut s = PumpState::new(timing(), t0);
        s.on_message(
            Message::Ping(Vec::new().into()),
            t0 + Duration::from_secs(30),
        );
        assert!(s.keepalive(t0 + Duration::from_secs(60)).is_ok());
    }

    #[test]
    fn poll_sleeps_until_the_earliest_timer_unless_more_is_readable() {
        let t0 = Instant::now();
        let mut s = PumpState::new(timing(), t0);
        assert_eq!(s.poll_plan(t0, None).timeout_ms, 0);
        s.drained();
        assert_eq!(s.poll_plan(t0, None).timeout_ms, 54_000);
        let router = t0 + Duration::from_millis(1500);
        assert_eq!(s.poll_plan(t0, Some(router)).timeout_ms, 1500);
        // a timer already due still sleeps 1 ms, never busy-loops at 0
        assert_eq!(s.poll_plan(router, Some(router)).timeout_ms, 1);
        s.start_round();
        assert_eq!(s.poll_plan(t0, None).timeout_ms, 0);
    }

    #[test]
    fn a_full_socket_stops_writes_and_waits_for_pollout() {
        let mut s = PumpState::new(timing(), Instant::now());
        assert!(s.may_write());
        assert_eq!(s.poll_plan(Instant::now(), None).events, libc::POLLIN);
        s.flushed(true);
        assert!(!s.may_write());
        assert_eq!(
            s.poll_plan(Instant::now(), None).events,
            libc::POLLIN | libc::POLLOUT
        );
        s.flushed(false);
        assert!(s.may_write());
    }

    #[test]
    fn a_socket_that_drains_its_backlog_takes_queued_frames_without_sleeping() {
        let t0 = Instant::now();
        let mut s = PumpState::new(timing(), t0);
        s.drained();
        s.flushed(true);
        s.drained();
        // frames queued while writes were held: the next round must not sleep
        s.flushed(false);
        assert_eq!(s.poll_plan(t0, None).timeout_ms, 0);
        s.start_round();
        s.drained();
        s.flushed(false);
        assert_eq!(s.poll_plan(t0, None).timeout_ms, 54_000);
    }

    #[test]
    fn a_close_frame_and_socket_errors_end_the_link() {
        let mut s = PumpState::new(timing(), Instant::now());
        let got = s.on_message(Message::Close(None), Instant::now());
        assert!(matches!(got, OnRead::Closed(LinkEnd::ClosedByServer(None))));
        assert!(matches!(
            s.on_poll(libc::POLLERR),
            Err(LinkEnd::SocketError)
        ));
        assert!(s.on_poll(libc::POLLIN | libc::POLLHUP).is_ok());
    }
}
