//! The outbound queue of encoded frames that every session writes into and
//! only the connection thread drains. Each session writes into its own lane
//! and the connection thread takes one frame per lane in turn, so a session
//! streaming at full speed costs the others at most one frame of latency per
//! busy lane instead of a whole queue.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::sys::wake::Wake;
use crate::wire::codec::{self, ProtoMsg};

/// How many encoded frames may wait for the socket in all lanes together.
/// Small on purpose: a full queue is the back-pressure that stops a fast
/// producer from filling RAM. Busy lanes share it equally, and a lane with
/// nothing queued may always add one frame, so a quiet session never waits
/// behind a busy one (total ≤ 2 × QUEUE_FRAMES + lanes).
pub const QUEUE_FRAMES: usize = 64;

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// No websocket exists right now; the frame was dropped (protocol.md §1.8).
    Disconnected,
    /// The lane stayed over its share for the whole wait.
    Full,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Disconnected => write!(f, "not connected to the server"),
            SendError::Full => write!(f, "outbound queue full"),
        }
    }
}

impl std::error::Error for SendError {}

#[derive(Debug, Default)]
struct Lanes {
    /// Frames per lane; a lane is only present while it holds frames.
    queues: HashMap<u64, VecDeque<Vec<u8>>>,
    /// Non-empty lanes in the order they get their next turn.
    turn: VecDeque<u64>,
    /// Producers blocked in `send_frame`.
    waiting: usize,
    /// The last lane handed out (under the lock: ARMv5 has no 64-bit atomics).
    last_lane: u64,
}

impl Lanes {
    fn len(&self, lane: u64) -> usize {
        self.queues.get(&lane).map_or(0, VecDeque::len)
    }

    /// Whether `lane` may add a frame now: always when it is empty, else
    /// while it holds less than its equal share of `QUEUE_FRAMES`.
    fn has_room(&self, lane: u64) -> bool {
        let held = self.len(lane);
        if held == 0 {
            return true;
        }
        let busy = self.turn.len().max(1);
        held < (QUEUE_FRAMES / busy).max(1)
    }

    fn push(&mut self, lane: u64, frame: Vec<u8>) {
        let q = self.queues.entry(lane).or_default();
        if q.is_empty() {
            self.turn.push_back(lane);
        }
        q.push_back(frame);
    }

    fn pop(&mut self) -> Option<Vec<u8>> {
        let lane = self.turn.pop_front()?;
        let q = self.queues.get_mut(&lane)?;
        let frame = q.pop_front();
        if q.is_empty() {
            self.queues.remove(&lane);
        } else {
            self.turn.push_back(lane);
        }
        frame
    }

    fn clear(&mut self) {
        self.queues.clear();
        self.turn.clear();
    }
}

#[derive(Debug)]
struct Shared {
    lanes: Mutex<Lanes>,
    room: Condvar,
    wake: Arc<Wake>,
    connected: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Lanes> {
        // only queue bookkeeping happens under the lock: still consistent if poisoned
        self.lanes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Producer side of the outbound queue, bound to one lane; cheap to clone
/// (clones share the lane, [`lane`](Self::lane) makes a new one).
#[derive(Clone, Debug)]
pub struct Outbound {
    shared: Arc<Shared>,
    lane: u64,
}

/// Consumer side, held by whichever connection thread is current.
#[derive(Debug, Clone)]
pub struct OutboundRx {
    shared: Arc<Shared>,
    /// Signalled after every push, polled by the connection thread.
    pub wake: Arc<Wake>,
}

/// Creates the queue; the returned producer writes into lane 0.
pub fn queue(wake: Arc<Wake>) -> (Outbound, OutboundRx) {
    let shared = Arc::new(Shared {
        lanes: Mutex::new(Lanes::default()),
        room: Condvar::new(),
        wake: wake.clone(),
        connected: AtomicUsize::new(0),
    });
    (
        Outbound {
            shared: shared.clone(),
            lane: 0,
        },
        OutboundRx { shared, wake },
    )
}

impl Outbound {
    /// A producer on a fresh lane of the same queue (one per session).
    pub fn lane(&self) -> Outbound {
        Outbound {
            shared: Arc::clone(&self.shared),
            lane: {
                let mut g = self.shared.lock();
                g.last_lane += 1;
                g.last_lane
            },
        }
    }

    /// Encodes and queues a message, blocking while the lane is full (but
    /// never longer than `max_wait`, so a dead uplink cannot wedge a session).
    pub fn send(&self, msg: &ProtoMsg) -> Result<(), SendError> {
        self.send_frame(codec::encode(msg), Duration::from_secs(30))
    }

    /// Queues a message only if that is possible without waiting.
    pub fn try_send(&self, msg: &ProtoMsg) -> Result<(), SendError> {
        self.send_frame(codec::encode(msg), Duration::ZERO)
    }

    /// Queues an already encoded frame, waiting at most `max_wait` for room.
    pub fn send_frame(&self, frame: Vec<u8>, max_wait: Duration) -> Result<(), SendError> {
        self.offer(frame, max_wait).map_err(|(e, _)| e)
    }

    /// Like [`send_frame`](Self::send_frame), but hands the frame back when
    /// it was not queued, so the caller can retry without encoding again.
    pub fn offer(&self, frame: Vec<u8>, max_wait: Duration) -> Result<(), (SendError, Vec<u8>)> {
        let sh = &*self.shared;
        let deadline = Instant::now() + max_wait;
        let mut g = sh.lock();
        loop {
            if !self.is_connected() {
                return Err((SendError::Disconnected, frame));
            }
            if g.has_room(self.lane) {
                g.push(self.lane, frame);
                drop(g);
                sh.wake.wake();
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err((SendError::Full, frame));
            }
            g.waiting += 1;
            g = sh
                .room
                .wait_timeout(g, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            g.waiting -= 1;
        }
    }

    /// Whether this lane may add a frame without waiting right now.
    pub fn has_room(&self) -> bool {
        self.shared.lock().has_room(self.lane)
    }

    /// Queues a small reply at once, even over the lane's share: for a
    /// reply that may neither wait nor be lost (an `ack` sent from the
    /// connection thread). Callers check [`has_room`](Self::has_room)
    /// first, so the share is overrun by at most one frame per such check.
    /// Wakes nobody: only for the connection thread itself, which drains
    /// the queue before it next waits (this saves it a syscall per frame).
    pub fn push_frame_now(&self, frame: Vec<u8>) -> Result<(), SendError> {
        let mut g = self.shared.lock();
        if !self.is_connected() {
            return Err(SendError::Disconnected);
        }
        g.push(self.lane, frame);
        Ok(())
    }

    /// Queues a reply that must not wait (the router's, on the connection
    /// thread): over the lane's fair share when the other lanes are busy,
    /// but never past `cap` frames in this lane, so a server that floods
    /// without reading cannot grow the queue without bound.
    pub fn push_within(&self, msg: &ProtoMsg, cap: usize) -> Result<(), SendError> {
        let frame = codec::encode(msg);
        let mut g = self.shared.lock();
        if !self.is_connected() {
            return Err(SendError::Disconnected);
        }
        if g.len(self.lane) >= cap {
            return Err(SendError::Full);
        }
        g.push(self.lane, frame);
        drop(g);
        self.shared.wake.wake();
        Ok(())
    }

    /// Whether a websocket is up (frames sent now have a chance to arrive).
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Acquire) != 0
    }
}

impl OutboundRx {
    /// The next frame to write: lanes take turns, one frame each.
    pub fn pop(&self) -> Option<Vec<u8>> {
        let mut g = self.shared.lock();
        let frame = g.pop();
        if frame.is_some() && g.waiting > 0 {
            self.shared.room.notify_all();
        }
        frame
    }

    /// Frames queued in all lanes.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.shared.lock().queues.values().map(VecDeque::len).sum()
    }

    /// Whether no frame is queued.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.shared.lock().turn.is_empty()
    }

    /// Marks link number `link` (never 0) up or down. A link going down only
    /// counts if it is still the current one, so a slow old link cannot mark a
    /// fresh one down. Going down drops whatever is queued, so that producers
    /// blocked on a full lane return and see the link is gone.
    pub fn set_connected(&self, link: usize, up: bool) {
        let sh = &*self.shared;
        if up {
            sh.connected.store(link, Ordering::Release);
        } else if sh
            .connected
            .compare_exchange(link, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            sh.lock().clear();
            sh.room.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connected() -> (Outbound, OutboundRx) {
        let wake = Arc::new(Wake::new().expect("eventfd"));
        let (tx, rx) = queue(wake);
        rx.set_connected(1, true);
        (tx, rx)
    }

    #[test]
    fn frames_are_dropped_while_disconnected_and_flow_when_connected() {
        let wake = Arc::new(Wake::new().expect("eventfd"));
        let (tx, rx) = queue(wake);
        assert_eq!(
            tx.send_frame(vec![1], Duration::ZERO),
            Err(SendError::Disconnected)
        );
        rx.set_connected(1, true);
        tx.send_frame(vec![2], Duration::ZERO).expect("queued");
        assert_eq!(rx.pop(), Some(vec![2]));
    }

    #[test]
    fn full_queue_times_out_and_going_down_drains_it() {
        let (tx, rx) = connected();
        for i in 0..QUEUE_FRAMES {
            tx.send_frame(vec![i as u8], Duration::ZERO).expect("room");
        }
        assert_eq!(
            tx.send_frame(vec![0], Duration::from_millis(1)),
            Err(SendError::Full)
        );
        rx.set_connected(1, false);
        assert!(rx.is_empty());
    }

    #[test]
    fn push_within_goes_over_the_share_of_busy_lanes_but_not_past_its_cap() {
        let (tx, rx) = connected();
        let lanes: Vec<Outbound> = (0..8).map(|_| tx.lane()).collect();
        for l in &lanes {
            while l.has_room() {
                l.send_frame(vec![0], Duration::ZERO).expect("room");
            }
        }
        let reply = ProtoMsg::new(0xFFFF, "accept", "s");
        let mut held = 0;
        while tx.try_send(&reply).is_ok() {
            held += 1;
        }
        // its share of nine busy lanes
        assert_eq!(held, QUEUE_FRAMES / 9);
        for _ in held..20 {
            tx.push_within(&reply, 20).expect("within the cap");
        }
        assert_eq!(tx.push_within(&reply, 20), Err(SendError::Full));
        rx.set_connected(1, false);
        assert_eq!(tx.push_within(&reply, 20), Err(SendError::Disconnected));
    }

    #[test]
    fn an_old_link_going_down_does_not_disconnect_the_new_one() {
        let (tx, rx) = connected();
        rx.set_connected(2, true);
        rx.set_connected(1, false);
        assert!(tx.is_connected());
        rx.set_connected(2, false);
        assert!(!tx.is_connected());
    }

    #[test]
    fn a_quiet_lane_is_served_next_to_a_full_busy_one() {
        let (busy, rx) = connected();
        let quiet = busy.lane();
        for i in 0..QUEUE_FRAMES {
            busy.send_frame(vec![1, i as u8], Duration::ZERO)
                .expect("room");
        }
        // the busy lane holds the whole queue, yet the quiet one gets in at once
        quiet.send_frame(vec![2, 0], Duration::ZERO).expect("room");
        quiet.send_frame(vec![2, 1], Duration::ZERO).expect("room");
        assert_eq!(rx.pop(), Some(vec![1, 0]));
        assert_eq!(rx.pop(), Some(vec![2, 0]));
        assert_eq!(rx.pop(), Some(vec![1, 1]));
        assert_eq!(rx.pop(), Some(vec![2, 1]));
        assert_eq!(rx.pop(), Some(vec![1, 2]));
        assert_eq!(rx.len(), QUEUE_FRAMES - 3);
    }

    #[test]
    fn a_pushed_reply_gets_in_over_the_share_but_not_while_disconnected() {
        let (tx, rx) = connected();
        let msg = ProtoMsg::new(3, "ack", "s");
        while tx.has_room() {
            tx.send_frame(vec![1], Duration::ZERO).expect("room");
        }
        assert_eq!(tx.try_send(&msg), Err(SendError::Full));
        tx.push_frame_now(codec::encode(&msg))
            .expect("queued over the share");
        assert_eq!(rx.len(), QUEUE_FRAMES + 1);
        rx.set_connected(1, false);
        assert_eq!(
            tx.push_frame_now(codec::encode(&msg)),
            Err(SendError::Disconnected)
        );
    }

    #[test]
    fn busy_lanes_share_the_queue_and_a_blocked_producer_wakes_on_room() {
        let (a, rx) = connected();
        let b = a.lane();
        a.send_frame(vec![1], Duration::ZERO).expect("room");
        b.send_frame(vec![2], Duration::ZERO).expect("room");
        let mut n = 1;
        while a.send_frame(vec![1], Duration::ZERO).is_ok() {
            n += 1;
        }
        assert_eq!(n, QUEUE_FRAMES / 2, "two busy lanes: half each");
        let waiter = std::thread::spawn(move || a.send_frame(vec![1], Duration::from_secs(10)));
        while !waiter.is_finished() {
            rx.pop();
            std::thread::yield_now();
        }
        assert_eq!(waiter.join().expect("joins"), Ok(()));
    }
}
