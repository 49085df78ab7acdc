//! The one bounded queue of encoded frames that every session writes into and
//! only the connection thread drains.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, SendTimeoutError, Sender, TrySendError};

use super::codec::{self, ProtoMsg};
use super::wake::Wake;

/// How many encoded frames may wait for the socket. Small on purpose: a full
/// queue is the back-pressure that stops a fast producer from filling RAM.
pub const QUEUE_FRAMES: usize = 64;

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// No websocket exists right now; the frame was dropped (protocol.md §1.8).
    Disconnected,
    /// The queue stayed full for the whole wait.
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

/// Producer side of the outbound queue; cheap to clone into every session.
#[derive(Clone, Debug)]
pub struct Outbound {
    tx: Sender<Vec<u8>>,
    wake: Arc<Wake>,
    connected: Arc<AtomicUsize>,
}

/// Consumer side, held by whichever connection thread is current.
#[derive(Debug, Clone)]
pub struct OutboundRx {
    /// Encoded frames in send order.
    pub rx: Receiver<Vec<u8>>,
    /// Signalled after every push, polled by the connection thread.
    pub wake: Arc<Wake>,
    connected: Arc<AtomicUsize>,
}

/// Creates the queue.
pub fn queue(wake: Arc<Wake>) -> (Outbound, OutboundRx) {
    let (tx, rx) = crossbeam_channel::bounded(QUEUE_FRAMES);
    let connected = Arc::new(AtomicUsize::new(0));
    (
        Outbound {
            tx,
            wake: wake.clone(),
            connected: connected.clone(),
        },
        OutboundRx {
            rx,
            wake,
            connected,
        },
    )
}

impl Outbound {
    /// Encodes and queues a message, blocking while the queue is full (but
    /// never longer than `max_wait`, so a dead uplink cannot wedge a session).
    pub fn send(&self, msg: &ProtoMsg) -> Result<(), SendError> {
        self.send_frame(codec::encode(msg), Duration::from_secs(30))
    }

    /// Queues a message only if that is possible without waiting.
    pub fn try_send(&self, msg: &ProtoMsg) -> Result<(), SendError> {
        if !self.is_connected() {
            return Err(SendError::Disconnected);
        }
        match self.tx.try_send(codec::encode(msg)) {
            Ok(()) => {
                self.wake.wake();
                Ok(())
            }
            Err(TrySendError::Full(_)) => Err(SendError::Full),
            Err(TrySendError::Disconnected(_)) => Err(SendError::Disconnected),
        }
    }

    /// Queues an already encoded frame.
    pub fn send_frame(&self, frame: Vec<u8>, max_wait: Duration) -> Result<(), SendError> {
        if !self.is_connected() {
            return Err(SendError::Disconnected);
        }
        match self.tx.send_timeout(frame, max_wait) {
            Ok(()) => {
                self.wake.wake();
                Ok(())
            }
            Err(SendTimeoutError::Timeout(_)) => Err(SendError::Full),
            Err(SendTimeoutError::Disconnected(_)) => Err(SendError::Disconnected),
        }
    }

    /// Whether a websocket is up (frames sent now have a chance to arrive).
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire) != 0
    }
}

impl OutboundRx {
    /// Marks link number `link` (never 0) up or down. A link going down only
    /// counts if it is still the current one, so a slow old link cannot mark a
    /// fresh one down. Going down drops whatever is queued, so that producers
    /// blocked on a full queue return and see the link is gone.
    pub fn set_connected(&self, link: usize, up: bool) {
        if up {
            self.connected.store(link, Ordering::Release);
        } else if self
            .connected
            .compare_exchange(link, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            while self.rx.try_recv().is_ok() {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(rx.rx.try_recv().ok(), Some(vec![2]));
    }

    #[test]
    fn full_queue_times_out_and_going_down_drains_it() {
        let wake = Arc::new(Wake::new().expect("eventfd"));
        let (tx, rx) = queue(wake);
        rx.set_connected(1, true);
        for i in 0..QUEUE_FRAMES {
            tx.send_frame(vec![i as u8], Duration::ZERO).expect("room");
        }
        assert_eq!(
            tx.send_frame(vec![0], Duration::from_millis(1)),
            Err(SendError::Full)
        );
        rx.set_connected(1, false);
        assert!(rx.rx.is_empty());
    }

    #[test]
    fn an_old_link_going_down_does_not_disconnect_the_new_one() {
        let wake = Arc::new(Wake::new().expect("eventfd"));
        let (tx, rx) = queue(wake);
        rx.set_connected(1, true);
        rx.set_connected(2, true);
        rx.set_connected(1, false);
        assert!(tx.is_connected());
        rx.set_connected(2, false);
        assert!(!tx.is_connected());
    }
}
