//! The connection thread's loop: reads, hands frames on, writes queued
//! frames and pings, and sleeps in `poll`. Every decision is `PumpState`'s;
//! this file only moves bytes.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tungstenite::{Message, WebSocket};

use super::close::{end_after_read, is_would_block};
use super::end::LinkEnd;
use super::state::{OnRead, PumpState};
use super::{Inbound, Liveness};
use crate::conn::dial::Stream;
use crate::conn::outbound::OutboundRx;
use crate::conn::timing::Timing;
use crate::sys::poll::{PollFd, poll};

/// Inbound messages handled per round before outbound frames get a turn.
const READ_BURST: usize = 64;

/// Runs [`Inbound::after_write`] once more however the pump returns: work
/// left behind a reply still runs when the reply never went out.
struct LastAfterWrite<'a>(&'a dyn Inbound);

impl Drop for LastAfterWrite<'_> {
    fn drop(&mut self) {
        self.0.after_write();
    }
}

/// Moves frames both ways until the link fails or stop is asked
/// ([`LinkEnd::Stopped`]).
pub(super) fn pump(
    ws: &mut WebSocket<Stream>,
    out: &OutboundRx,
    inbound: &dyn Inbound,
    timing: Timing,
    stop: &AtomicBool,
    live: &Liveness,
) -> LinkEnd {
    let _last = LastAfterWrite(inbound);
    let sock = ws.get_ref().as_raw_fd();
    let wake = out.wake.as_raw_fd();
    let mut state = PumpState::new(timing, Instant::now());
    // whether the last poll saw the wake fd readable (true at first: a
    // wake may have come before this loop started)
    let mut woken = true;
    loop {
        live.beat();
        if stop.load(Ordering::Acquire) {
            return LinkEnd::Stopped;
        }
        // Read until WouldBlock: with TLS, decrypted bytes buffered inside the
        // SSL object do not make the fd readable again. At most READ_BURST
        // messages per round, so a fast sender cannot starve our writes and
        // the keepalive; the state then skips the poll's wait.
        state.start_round();
        for _ in 0..READ_BURST {
            match ws.read() {
                Ok(msg) => match state.on_message(msg, Instant::now()) {
                    OnRead::Deliver(frame) => inbound.frame(frame),
                    OnRead::Nothing => {}
                    OnRead::Closed(end) => {
                        end_after_read(ws, None);
                        return end;
                    }
                },
                Err(e) if is_would_block(&e) => {
                    state.drained();
                    break;
                }
                Err(e) => {
                    end_after_read(ws, Some(&e));
                    return LinkEnd::Read(e);
                }
            }
        }
        let now = Instant::now();
        if inbound.next_deadline().is_some_and(|d| now >= d) {
            inbound.tick(now);
        }
        // Drained whenever poll saw it readable (even while blocked) so it
        // cannot spin poll(); queued frames are picked up once unblocked. A
        // round woken by the socket alone skips the read that would only
        // say EAGAIN (one syscall less per forward).
        if woken {
            out.wake.drain();
        }
        if state.may_write() {
            while let Some(frame) = out.pop() {
                match ws.write(Message::Binary(frame.into())) {
                    Ok(()) => {}
                    // the frame is buffered; the flush below finds the socket
                    // full and we wait for POLLOUT before taking more
                    Err(e) if is_would_block(&e) => break,
                    Err(e) => return LinkEnd::Write(e),
                }
            }
        }
        let now = Instant::now();
        match state.keepalive(now) {
            Ok(true) => match ws.write(Message::Ping(state.ping_payload().into())) {
                Ok(()) => {}
                Err(e) if is_would_block(&e) => {}
                Err(e) => return LinkEnd::Ping(e),
            },
            Ok(false) => {}
            Err(end) => return end,
        }
        match ws.flush() {
            Ok(()) => state.flushed(false),
            Err(e) if is_would_block(&e) => state.flushed(true),
            Err(e) => return LinkEnd::Write(e),
        }
        inbound.after_write();
        let plan = state.poll_plan(now, inbound.next_deadline());
        let mut fds = [
            PollFd::new(sock, plan.events),
            PollFd::new(wake, libc::POLLIN),
        ];
        if let Err(e) = poll(&mut fds, plan.timeout_ms) {
            return LinkEnd::Poll(e);
        }
        if let Err(end) = state.on_poll(fds[0].revents()) {
            return end;
        }
        woken = fds[1].revents() != 0;
    }
}
