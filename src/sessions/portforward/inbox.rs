//! What the session thread and one connection's thread share: the queue of
//! server messages not yet handled, the send window, and the closed flags.
//! One mutex guards all of it, so "closed" and "queued" can never disagree
//! (a message is either handled by the connection or answered by the
//! handler with `unknown connection`, never silently lost).
//!
//! Client → device fast path: once connected, a TCP connection lends the
//! inbox a duplicate of its socket. A small `forward` that finds nothing
//! ahead of it is written right away by the caller (the connection thread,
//! or the session thread) with one non-blocking write, and acked at once;
//! otherwise, while the bytes waiting for the target stay within
//! `EARLY_BYTES`, it is queued already acked (a bigger socket buffer, in
//! effect). The websocket's connection thread holds the bytes instead of
//! writing them (`forward_early`) and writes them once the `ack` is out
//! (`flush`). The connection's thread is only woken for what the socket did
//! not take at once.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::sys::wake::Wake;
use crate::wire::types::portforward as t;

/// Server messages queued per connection before the client counts as having
/// broken flow control (transfer.md §4.3 suggests 4: forward + stop + slack).
pub const QUEUE_LIMIT: usize = 8;
/// Bytes of `forward` data queued per connection beyond the first item, or
/// held with the one being written: the client keeps one `forward` in flight
/// (the next waits for the `ack` sent once it is written), so more is a
/// client ignoring flow control, and must not pin up to 8 inbound messages
/// of 16 MiB each, nor a second while one is written.
pub const QUEUE_BYTES: usize = 1 << 20;
/// Bytes of client `forward`s acked before they reached the target: one
/// such bounded buffer per connection, no ack while it is full.
pub const EARLY_BYTES: usize = 256 * 1024;
/// Items acked early that may wait at once (so 4 KiB forwards fill
/// `EARLY_BYTES`); they do not count against `QUEUE_LIMIT`.
pub const EARLY_ITEMS: usize = 64;

/// One server message for the connection's thread, in arrival order.
#[derive(Debug, PartialEq, Eq)]
pub enum Item {
    /// Bytes to write to the target, then ack.
    Forward(Vec<u8>),
    /// Bytes to write to the target, already acked (a write error then ends
    /// the connection with an error and a `stop`).
    Acked(Vec<u8>),
    /// Close the target and echo `stop`.
    Stop,
}

impl Item {
    /// Data bytes it carries.
    pub fn len(&self) -> usize {
        match self {
            Item::Forward(d) | Item::Acked(d) => d.len(),
            Item::Stop => 0,
        }
    }

    /// The message type this item came from (for error replies).
    pub fn typ(&self) -> &'static str {
        match self {
            Item::Forward(_) | Item::Acked(_) => t::FORWARD,
            Item::Stop => t::STOP,
        }
    }
}

/// Result of queueing a server message.
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    /// Queued; the thread was woken.
    Queued,
    /// The connection is gone (answer `unknown connection`).
    Closed,
    /// The queue is full: the client broke flow control.
    Full,
}

/// Result of handing a client `forward` to the connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Fwd {
    /// Written to the target or buffered within `EARLY_BYTES`: ack it now.
    AckNow,
    /// As `Push`: the connection thread acks it once written.
    Push(Push),
}

/// Result of a server `ack`.
#[derive(Debug, PartialEq, Eq)]
pub enum Ack {
    /// A `forward` was in flight; the window is open again.
    Released,
    /// Nothing was in flight (duplicate or unsolicited ack): ignored.
    Unexpected,
    /// The connection is gone.
    Closed,
}

/// What the connection thread should do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// The session ended or the id was reused: drop everything, say nothing.
    Quit,
    /// Go on; maybe with the next queued item.
    Go {
        /// The next item, when one was asked for and is queued.
        item: Option<Item>,
        /// Whether a device `forward` still waits for its ack.
        awaiting_ack: bool,
    },
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Item>,
    closed: bool,
    quiet: bool,
    awaiting_ack: bool,
    /// Bytes of the server `forward` the thread is writing.
    writing: usize,
    /// The thread holds a `forward` it has not finished writing.
    busy: bool,
    /// The target socket, lent once the `new` reply is out (TCP only).
    direct: Option<TcpStream>,
    /// Last direct write, for the connection's idle timer.
    last_direct: Option<Instant>,
    /// Bytes the fast path wrote (the audit line counts them with the thread's).
    direct_bytes: u64,
    /// The queue's head waits for [`Inbox::flush`] rather than the thread.
    held: bool,
}

impl State {
    /// Counts `n` bytes the fast path wrote (for the audit line and, when
    /// any, the connection's idle timer).
    fn wrote_direct(&mut self, n: usize) {
        if n > 0 {
            self.last_direct = Some(Instant::now());
            self.direct_bytes += n as u64;
        }
    }
}

/// Shared between a connection's handler entry and its thread.
#[derive(Debug)]
pub struct Inbox {
    state: Mutex<State>,
    wake: Wake,
    slots: Arc<AtomicUsize>,
    /// The connection's `ack`, encoded once: the connection thread sends it
    /// for every client forward.
    ack: Vec<u8>,
}

impl Inbox {
    /// A fresh inbox holding one of the global `slots` (released on close).
    pub fn new(slots: Arc<AtomicUsize>) -> std::io::Result<Inbox> {
        Ok(Inbox {
            state: Mutex::new(State::default()),
            wake: Wake::new()?,
            slots,
            ack: Vec::new(),
        })
    }

    /// Keeps `frame` as the connection's encoded `ack`.
    pub fn with_ack(mut self, frame: Vec<u8>) -> Inbox {
        self.ack = frame;
        self
    }

    /// The connection's encoded `ack` (empty unless set).
    pub fn ack_frame(&self) -> &[u8] {
        &self.ack
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The fd the connection thread polls to learn about new items.
    pub fn wake_fd(&self) -> &Wake {
        &self.wake
    }

    fn mark_closed(&self, st: &mut State) {
        if !st.closed {
            st.closed = true;
            self.slots.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Handler side: queues a server message.
    pub fn push(&self, item: Item) -> Push {
        let mut st = self.lock();
        if st.closed {
            return Push::Closed;
        }
        if let Err(full) = Self::admit(&st, item.len()) {
            return full;
        }
        st.queue.push_back(item);
        drop(st);
        self.wake.wake();
        Push::Queued
    }

    fn admit(st: &State, len: usize) -> Result<(), Push> {
        let queued: usize = st.queue.iter().map(Item::len).sum();
        let unacked = st
            .queue
            .iter()
            .filter(|i| !matches!(i, Item::Acked(_)))
            .count();
        if unacked >= QUEUE_LIMIT
            || (!st.queue.is_empty() && queued + len > QUEUE_BYTES)
            || (len > 0 && st.writing > 0 && st.writing + queued + len > QUEUE_BYTES)
        {
            return Err(Push::Full);
        }
        Ok(())
    }

    /// Handler side: a client `forward`. Written at once when the socket is
    /// lent, nothing is ahead of it and the socket takes it all; else queued,
    /// acked early while the bytes waiting stay within `EARLY_BYTES`.
    pub fn forward(&self, data: Vec<u8>) -> Fwd {
        match self.forward_now(data) {
            Ok(()) => Fwd::AckNow,
            Err(data) => Fwd::Push(self.push(Item::Forward(data))),
        }
    }

    /// A client `forward` that can be acked at once: once the socket is
    /// lent, written with one non-blocking write when nothing is ahead of
    /// it, the rest (or all of it) queued while the bytes waiting stay
    /// within `EARLY_BYTES`. Otherwise the data comes back untouched (not
    /// one byte of it written), for [`push`](Self::push) (acked by the
    /// thread once written) or an `unknown connection` reply. Never waits:
    /// safe on the connection thread.
    pub fn forward_now(&self, mut data: Vec<u8>) -> Result<(), Vec<u8>> {
        let mut st = self.lock();
        if st.closed || data.len() > EARLY_BYTES {
            return Err(data);
        }
        let Some(sock) = st.direct.as_ref() else {
            return Err(data);
        };
        if st.queue.is_empty() && !st.busy && !data.is_empty() {
            // Non-blocking (the socket's flag is shared with the dup): a
            // full socket costs one EAGAIN, never a wait.
            let mut w = sock;
            match w.write(&data) {
                Ok(n) if n == data.len() => {
                    st.wrote_direct(n);
                    return Ok(());
                }
                Ok(n) => {
                    st.wrote_direct(n);
                    // What is left is queued at once: nothing is queued or
                    // being written, and it is within EARLY_BYTES, so the
                    // checks below would pass anyway. Returning here keeps
                    // `Err` meaning "not one byte written": callers may then
                    // hand the whole message on.
                    data.drain(..n);
                    st.queue.push_back(Item::Acked(data));
                    drop(st);
                    self.wake.wake();
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // the connection's thread meets the error again and reports
                // it the usual way (ack, then error)
                Err(_) => return Err(data),
            }
        }
        let queued: usize = st.queue.iter().map(Item::len).sum();
        let early = st
            .queue
            .iter()
            .filter(|i| matches!(i, Item::Acked(_)))
            .count();
        if early >= EARLY_ITEMS || st.writing + queued + data.len() > EARLY_BYTES {
            return Err(data);
        }
        if Self::admit(&st, data.len()).is_err() {
            return Err(data);
        }
        st.queue.push_back(Item::Acked(data));
        drop(st);
        self.wake.wake();
        Ok(())
    }

    /// A client `forward` to ack at once, for the connection thread: like
    /// [`forward_now`](Self::forward_now), but when the bytes would be
    /// written at once they are held instead (`Ok(true)`), for
    /// [`flush`](Self::flush) to write once the `ack` is out. Held bytes
    /// are queued already acked, so the thread, should it run first, writes
    /// them itself, in order.
    pub fn forward_early(&self, data: Vec<u8>) -> Result<bool, Vec<u8>> {
        let mut st = self.lock();
        if st.closed
            || data.is_empty()
            || data.len() > EARLY_BYTES
            || st.direct.is_none()
            || !st.queue.is_empty()
            || st.busy
        {
            drop(st);
            return self.forward_now(data).map(|()| false);
        }
        st.queue.push_back(Item::Acked(data));
        st.held = true;
        Ok(true)
    }

    /// Writes the bytes [`forward_early`](Self::forward_early) held, with
    /// non-blocking writes; what the socket does not take (or an error) is
    /// left to the connection's thread, which is then woken.
    pub fn flush(&self) {
        let mut guard = self.lock();
        let st = &mut *guard;
        if !std::mem::take(&mut st.held) || st.closed || st.busy {
            // closed: the thread's `finish` has the queue; busy: the
            // thread took the bytes and writes them itself
            return;
        }
        Self::write_held(st);
        let rest = !st.queue.is_empty();
        drop(guard);
        if rest {
            self.wake.wake();
        }
    }

    /// Writes the acked items at the queue's head with non-blocking writes,
    /// as far as the lent socket takes them.
    fn write_held(st: &mut State) {
        st.held = false;
        let mut wrote = 0;
        if let Some(sock) = st.direct.as_ref() {
            let mut w = sock;
            while let Some(Item::Acked(data)) = st.queue.front_mut() {
                match w.write(data) {
                    Ok(n) if n == data.len() => {
                        wrote += n;
                        st.queue.pop_front();
                    }
                    Ok(n) => {
                        wrote += n;
                        data.drain(..n);
                        break;
                    }
                    // a full socket or an error: the thread meets it again
                    // and reports it the usual way
                    Err(_) => break,
                }
            }
        }
        st.wrote_direct(wrote);
    }

    /// Thread side: lends the connected TCP socket to the fast path (`None`
    /// takes it back, before the socket is closed).
    pub fn lend(&self, sock: Option<TcpStream>) {
        self.lock().direct = sock;
    }

    /// Thread side: bytes the fast path wrote to the target.
    pub fn direct_bytes(&self) -> u64 {
        self.lock().direct_bytes
    }

    /// Thread side: when the fast path last wrote to the target.
    pub fn last_direct(&self) -> Option<Instant> {
        self.lock().last_direct
    }

    /// Handler side: a server `ack` arrived.
    pub fn ack(&self) -> Ack {
        let mut st = self.lock();
        if st.closed {
            return Ack::Closed;
        }
        if !st.awaiting_ack {
            return Ack::Unexpected;
        }
        st.awaiting_ack = false;
        drop(st);
        self.wake.wake();
        Ack::Released
    }

    /// Handler side: end the connection without any message to the server
    /// (session end, reused id, broken flow control). Returns what was queued.
    pub fn close_quietly(&self) {
        let mut st = self.lock();
        if st.held && !st.busy {
            // acked bytes still held for the flush: the client was told
            // they arrived, so they get the one write they would have had
            Self::write_held(&mut st);
        }
        st.quiet = true;
        self.mark_closed(&mut st);
        st.queue.clear();
        st.direct = None;
        drop(st);
        self.wake.wake();
    }

    /// Whether the connection was closed without a word to the client.
    pub fn is_quiet(&self) -> bool {
        self.lock().quiet
    }

    /// Whether the connection has ended (either side).
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Thread side: what to do next; pops an item only when `want_item`.
    pub fn next(&self, want_item: bool) -> Next {
        self.wake.drain();
        let mut st = self.lock();
        if st.quiet {
            return Next::Quit;
        }
        let item = if want_item {
            st.queue.pop_front()
        } else {
            None
        };
        if let Some(Item::Forward(data) | Item::Acked(data)) = &item {
            st.writing = data.len();
            st.busy = true;
        }
        Next::Go {
            item,
            awaiting_ack: st.awaiting_ack,
        }
    }

    /// Thread side: the server `forward` taken last is written (called
    /// before its `ack` goes out, so the client's next one finds room).
    pub fn written(&self) {
        let mut st = self.lock();
        st.writing = 0;
        st.busy = false;
    }

    /// Thread side: a `forward` is about to be sent. False when the
    /// connection was closed quietly meanwhile (then send nothing).
    pub fn start_forward(&self) -> bool {
        let mut st = self.lock();
        if st.quiet {
            return false;
        }
        st.awaiting_ack = true;
        true
    }

    /// Thread side: the connection ends. Returns the unhandled items (to be
    /// answered with `unknown connection`), or `None` when it was closed
    /// quietly and nothing at all may be sent.
    pub fn finish(&self) -> Option<Vec<Item>> {
        let mut st = self.lock();
        if st.quiet {
            return None;
        }
        self.mark_closed(&mut st);
        st.direct = None;
        Some(st.queue.drain(..).collect())
    }
}

/// The write of bytes held by [`Inbox::forward_early`], once their `ack`
/// is out.
impl crate::sessions::Deferred for Inbox {
    fn after_write(&self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inbox() -> (Inbox, Arc<AtomicUsize>) {
        let slots = Arc::new(AtomicUsize::new(1));
        (Inbox::new(slots.clone()).expect("eventfd"), slots)
    }

    #[test]
    fn items_come_out_in_order_and_the_queue_is_bounded() {
        let (ib, _) = inbox();
        for i in 0..QUEUE_LIMIT {
            assert_eq!(ib.push(Item::Forward(vec![i as u8])), Push::Queued);
        }
        assert_eq!(ib.push(Item::Stop), Push::Full);
        for i in 0..QUEUE_LIMIT {
            let want = Some(Item::Forward(vec![i as u8]));
            assert_eq!(
                ib.next(true),
                Next::Go {
                    item: want,
                    awaiting_ack: false
                }
            );
        }
    }

    #[test]
    fn a_second_large_forward_while_one_is_written_is_refused() {
        let (ib, _) = inbox();
        let big = || Item::Forward(vec![0; QUEUE_BYTES]);
        assert_eq!(ib.push(big()), Push::Queued);
        assert!(matches!(ib.next(true), Next::Go { item: Some(_), .. }));
        // while it is written, a stop still queues
        assert_eq!(ib.push(Item::Stop), Push::Queued);
        assert_eq!(ib.push(big()), Push::Full);
        ib.written();
        assert_eq!(ib.push(big()), Push::Queued);
    }

    #[test]
    fn only_a_solicited_ack_opens_the_window() {
        let (ib, _) = inbox();
        assert_eq!(ib.ack(), Ack::Unexpected);
        assert!(ib.start_forward());
        assert_eq!(ib.ack(), Ack::Released);
        assert_eq!(ib.ack(), Ack::Unexpected);
    }

    #[test]
    fn finishing_hands_back_queued_items_and_releases_the_slot_once() {
        let (ib, slots) = inbox();
        ib.push(Item::Forward(b"x".to_vec()));
        assert_eq!(ib.finish(), Some(vec![Item::Forward(b"x".to_vec())]));
        assert_eq!(slots.load(Ordering::Acquire), 0);
        assert_eq!(ib.push(Item::Stop), Push::Closed);
        assert_eq!(ib.ack(), Ack::Closed);
        ib.close_quietly();
        assert_eq!(slots.load(Ordering::Acquire), 0);
    }

    fn pair() -> (TcpStream, TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (b, _) = l.accept().expect("accept");
        a.set_nonblocking(true).expect("nonblocking");
        (a, b)
    }

    #[test]
    fn forwards_are_acked_early_only_once_the_socket_is_lent_and_within_the_buffer() {
        let (ib, _) = inbox();
        // not connected yet: queued, acked by the thread once written
        assert_eq!(ib.forward(b"a".to_vec()), Fwd::Push(Push::Queued));
        let (dev, mut target) = pair();
        ib.lend(Some(dev));
        // something is ahead of it: queued, but acked now
        assert_eq!(ib.forward(b"b".to_vec()), Fwd::AckNow);
        assert_eq!(
            ib.next(true),
            Next::Go {
                item: Some(Item::Forward(b"a".to_vec())),
                awaiting_ack: false
            }
        );
        ib.written();
        assert!(matches!(
            ib.next(true),
            Next::Go {
                item: Some(Item::Acked(_)),
                ..
            }
        ));
        ib.written();
        // nothing ahead: written at once by the caller
        assert_eq!(ib.forward(b"c".to_vec()), Fwd::AckNow);
        let mut got = [0u8; 1];
        std::io::Read::read_exact(&mut target, &mut got).expect("read");
        assert_eq!(&got, b"c");
        // the buffer is bounded: once the target stops reading, acks stop
        let chunk = vec![7u8; 4096];
        let mut acked = 0usize;
        while ib.forward(chunk.clone()) == Fwd::AckNow {
            acked += chunk.len();
            assert!(acked < 64 << 20, "acks never stopped");
        }
        assert!(ib.last_direct().is_some());
        ib.lend(None);
        assert_eq!(ib.forward(b"d".to_vec()), Fwd::Push(Push::Queued));
    }

    #[test]
    fn forward_now_gives_the_bytes_back_untouched_unless_it_can_ack_them() {
        let (ib, _) = inbox();
        // not connected yet
        assert_eq!(ib.forward_now(b"a".to_vec()), Err(b"a".to_vec()));
        let (dev, mut target) = pair();
        ib.lend(Some(dev));
        // larger than the early-ack buffer
        let big = vec![1u8; EARLY_BYTES + 1];
        assert_eq!(ib.forward_now(big.clone()), Err(big));
        // written at once
        assert_eq!(ib.forward_now(b"b".to_vec()), Ok(()));
        let mut got = [0u8; 1];
        std::io::Read::read_exact(&mut target, &mut got).expect("read");
        assert_eq!(&got, b"b");
        // a target that reads nothing: never a wait, and once the buffer
        // is full the bytes come back (the thread acks them once written)
        let chunk = vec![7u8; 4096];
        let t0 = Instant::now();
        let back = loop {
            if let Err(d) = ib.forward_now(chunk.clone()) {
                break d;
            }
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(10),
                "never full"
            );
        };
        assert_eq!(back, chunk);
        assert_eq!(ib.push(Item::Stop), Push::Queued);
        // closed: back as well
        ib.close_quietly();
        assert_eq!(ib.forward_now(b"c".to_vec()), Err(b"c".to_vec()));
    }

    /// `n` bytes from `target`, failing after 10 s.
    fn read_within(target: &mut TcpStream, n: usize) -> Vec<u8> {
        target.set_nonblocking(false).expect("blocking");
        target
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .expect("timeout");
        let mut got = vec![0u8; n];
        std::io::Read::read_exact(target, &mut got).expect("read in time");
        got
    }

    /// Bytes readable on `target` right now.
    fn readable(target: &mut TcpStream) -> Vec<u8> {
        target.set_nonblocking(true).expect("nonblocking");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match std::io::Read::read(target, &mut buf) {
                Ok(0) | Err(_) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    }

    #[test]
    fn an_early_forward_reaches_the_target_only_at_the_flush_and_only_once() {
        let (ib, _) = inbox();
        let (dev, mut target) = pair();
        ib.lend(Some(dev));
        assert_eq!(ib.forward_early(b"ab".to_vec()), Ok(true));
        // loopback delivers at once: nothing was written yet
        assert!(readable(&mut target).is_empty());
        // the thread was not woken for it
        assert!(!ib.wake.drain_was_signalled());
        ib.flush();
        ib.flush();
        assert_eq!(read_within(&mut target, 2), b"ab");
        assert!(readable(&mut target).is_empty());
        assert_eq!(ib.direct_bytes(), 2);
        assert_eq!(
            ib.next(true),
            Next::Go {
                item: None,
                awaiting_ack: false
            }
        );
    }

    #[test]
    fn held_bytes_the_thread_takes_first_are_not_written_again_by_the_flush() {
        let (ib, _) = inbox();
        let (dev, mut target) = pair();
        ib.lend(Some(dev));
        assert_eq!(ib.forward_early(b"x".to_vec()), Ok(true));
        // a forward behind held bytes waits behind them
        assert_eq!(ib.forward_early(b"y".to_vec()), Ok(false));
        let Next::Go {
            item: Some(Item::Acked(first)),
            ..
        } = ib.next(true)
        else {
            panic!("the held bytes come first");
        };
        assert_eq!(first, b"x");
        // the thread is writing them: the flush leaves them to it
        ib.flush();
        assert!(readable(&mut target).is_empty());
        ib.written();
        assert_eq!(
            ib.next(true),
            Next::Go {
                item: Some(Item::Acked(b"y".to_vec())),
                awaiting_ack: false
            }
        );
    }

    #[test]
    fn what_a_full_socket_does_not_take_at_the_flush_goes_to_the_woken_thread() {
        let (ib, _) = inbox();
        let (dev, target) = pair();
        ib.lend(Some(dev));
        // fill the socket: the target reads nothing
        let chunk = vec![9u8; 64 * 1024];
        let t0 = Instant::now();
        while let Ok(true) = ib.forward_early(chunk.clone()) {
            ib.flush();
            if ib.wake.drain_was_signalled() {
                break;
            }
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(10),
                "never full"
            );
        }
        // the rest waits, acked, for the thread
        let Next::Go {
            item: Some(Item::Acked(rest)),
            ..
        } = ib.next(true)
        else {
            panic!("the unwritten bytes are queued for the thread");
        };
        assert!(!rest.is_empty() && rest.len() <= chunk.len());
        drop(target);
    }

    #[test]
    fn held_bytes_are_written_once_by_a_quiet_close_and_nothing_after() {
        let (ib, _) = inbox();
        let (dev, mut target) = pair();
        ib.lend(Some(dev));
        assert_eq!(ib.forward_early(b"z".to_vec()), Ok(true));
        // the session ends before the round's flush: the bytes were acked
        ib.close_quietly();
        ib.flush();
        assert_eq!(read_within(&mut target, 1), b"z");
        assert!(readable(&mut target).is_empty());
        assert_eq!(ib.forward_early(b"w".to_vec()), Err(b"w".to_vec()));
        ib.flush();
        assert!(readable(&mut target).is_empty());
    }

    #[test]
    fn a_quiet_close_silences_the_thread() {
        let (ib, _) = inbox();
        ib.close_quietly();
        assert_eq!(ib.next(true), Next::Quit);
        assert!(!ib.start_forward());
        assert_eq!(ib.finish(), None);
    }
}
