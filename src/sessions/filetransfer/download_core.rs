//! The decisions of a download, without I/O: which offset goes next, when
//! the 20-chunk window is full, how long the Tx bucket holds a chunk, which
//! acks are valid and when the transfer is done. The thread in
//! `download.rs` only reads the file, sends what this returns and feeds
//! back the server's messages; time comes in as an `Instant`, so tests
//! drive it with byte slices and a hand-moved clock.

use std::io;
use std::time::{Duration, Instant};

use crate::limits::bucket::Bucket;
use crate::limits::policy::Denial;
use crate::wire::codec::{ProtoHdr, ProtoMsg};

use super::FtError;
use super::wire::{self, CHUNK, WINDOW_CHUNKS, offset_of};
use crate::wire::types::filetransfer as t;

/// How a download ends early.
#[derive(Debug)]
pub(super) enum Stop {
    /// Tell the server (against this header, with this msgtype).
    Reply(Box<ProtoHdr>, String, FtError),
    /// End quietly (cancelled, connection gone, server error).
    Quiet,
}

/// What the thread does next.
#[derive(Debug, PartialEq)]
pub(super) enum Step {
    /// Read up to one chunk from the file and pass it to [`DownloadCore::read`].
    Read,
    /// Wait for the server's next message and pass it to [`DownloadCore::message`].
    Receive,
    /// Every byte was sent and acknowledged.
    Done,
}

/// A chunk to queue, and until when the Tx bucket holds it back.
#[derive(Debug)]
pub(super) struct Send {
    /// The `file_chunk` (an empty body is the end of the file).
    pub msg: ProtoMsg,
    /// Pause until then before sending (throttling).
    pub not_before: Option<Instant>,
}

/// One download's flow-control state.
#[derive(Debug)]
pub(super) struct DownloadCore {
    sid: String,
    /// `MaxFileSize` (0 = unlimited): the file may grow while it is read.
    max: u64,
    /// Bytes read and handed out for sending.
    offset: u64,
    /// Bytes the server acknowledged.
    acked: u64,
    eof_sent: bool,
    /// When the server last heard from this transfer.
    heard: Instant,
    /// Errors inside the transfer are reported against the last ack (or
    /// the request), with its type.
    last: (ProtoHdr, String),
}

impl DownloadCore {
    /// A download requested by `req`, starting at `now`.
    pub fn new(sid: &str, req: ProtoHdr, max: u64, now: Instant) -> DownloadCore {
        DownloadCore {
            sid: sid.to_string(),
            max,
            offset: 0,
            acked: 0,
            eof_sent: false,
            heard: now,
            last: (req, t::GET_FILE.to_string()),
        }
    }

    /// Read while the window has room, then wait for acks until the end of
    /// the file is acknowledged.
    pub fn step(&self) -> Step {
        if !self.eof_sent && self.offset < self.acked + WINDOW_CHUNKS * CHUNK as u64 {
            Step::Read
        } else if self.eof_sent && self.acked >= self.offset {
            Step::Done
        } else {
            Step::Receive
        }
    }

    fn reply(&self, err: FtError) -> Stop {
        Stop::Reply(Box::new(self.last.0.clone()), self.last.1.clone(), err)
    }

    /// `data` was read from the file at `now` (empty = end of file): the
    /// chunk to send. Reserves its bytes in `bucket`; a wait the server
    /// would not sit through ends the transfer and spends the bucket.
    pub fn read(
        &mut self,
        data: &[u8],
        now: Instant,
        bucket: Option<&Bucket>,
    ) -> Result<Send, Stop> {
        let head = wire::with_offset(t::FILE_CHUNK, &self.sid, self.offset);
        if data.is_empty() {
            self.eof_sent = true;
            return Ok(Send {
                msg: head,
                not_before: None,
            });
        }
        let n = data.len() as u64;
        if self.max > 0 && self.offset + n > self.max {
            // The file grew past the limit while streaming (§7 #17).
            return Err(self.reply(FtError::Denied(Denial::TooLarge)));
        }
        let mut not_before = None;
        if let Some(b) = bucket {
            // The server hears from a download only through chunks: the
            // throttling since the last one counts, not each wait.
            match b.reserve(n, throttle_budget(self.heard, now)) {
                Ok(wait) if wait.is_zero() => {}
                Ok(wait) => not_before = Some(now + wait),
                Err(e) => {
                    b.exhaust();
                    return Err(self.reply(FtError::Limit(e)));
                }
            }
        }
        self.offset += n;
        Ok(Send {
            msg: head.with_body(data.to_vec()),
            not_before,
        })
    }

    /// The chunk from [`read`](Self::read) was queued at `now`.
    pub fn sent(&mut self, now: Instant) {
        self.heard = now;
    }

    /// Reading the file (shown as `path`) failed.
    pub fn read_failed(&self, path: &str, err: io::Error) -> Stop {
        self.reply(FtError::ReadChunk {
            path: path.to_string(),
            err,
        })
    }

    /// A message from the server: an ack moves the window; anything else
    /// ends the transfer.
    pub fn message(&mut self, msg: ProtoMsg) -> Result<(), Stop> {
        let bad = |msg: ProtoMsg, typ: &str, err| Stop::Reply(Box::new(msg.hdr), typ.into(), err);
        match msg.hdr.typ.as_str() {
            t::ACK => match offset_of(&msg) {
                Some(Ok(o)) => {
                    // Only bytes that were sent can be acknowledged, and
                    // never fewer than before: any other ack would move
                    // the window where the peer cannot have read (a huge
                    // one switches flow control off).
                    match u64::try_from(o) {
                        Ok(o) if o >= self.acked && o <= self.offset => self.acked = o,
                        _ => {
                            let err = FtError::AckOffset {
                                offset: o,
                                sent: self.offset,
                                acked: self.acked,
                            };
                            return Err(bad(msg, t::ACK, err));
                        }
                    }
                    self.last = (msg.hdr, t::ACK.to_string());
                    Ok(())
                }
                Some(Err(())) => Err(bad(msg, t::ACK, FtError::AckOffsetType)),
                None => Err(bad(msg, t::ACK, FtError::AckOffsetBlank)),
            },
            t::ERROR => {
                log::info!(
                    "file transfer {}: the server aborted the download",
                    self.sid
                );
                Err(Stop::Quiet)
            }
            other => {
                let t = other.to_string();
                Err(bad(msg, &t, FtError::UnexpectedInDownload(t.clone())))
            }
        }
    }
}

/// How long a transfer may still wait for the bucket at `now` when the
/// server last heard from it at `heard`.
pub(super) fn throttle_budget(heard: Instant, now: Instant) -> Duration {
    super::MAX_WAIT.saturating_sub(now.saturating_duration_since(heard) + super::SEND_SLACK)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::limits::bucket::Clock;
    use crate::wire::codec::{PROTO_FILETRANSFER, Value};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A bucket clock the test moves by hand.
    #[derive(Default)]
    pub struct HandClock(AtomicU64);

    impl HandClock {
        pub fn advance(&self, d: Duration) {
            self.0.fetch_add(d.as_nanos() as u64, Ordering::SeqCst);
        }
    }

    impl Clock for HandClock {
        fn now(&self) -> Duration {
            Duration::from_nanos(self.0.load(Ordering::SeqCst))
        }
    }

    /// 30 chunks a minute: 10 KiB burst, then ~1.8 KiB/s.
    pub fn slow_bucket() -> (Arc<HandClock>, Bucket) {
        let clock = Arc::new(HandClock::default());
        let b = Bucket::per_minute_with_clock(30 * CHUNK as u64, clock.clone()).expect("limited");
        (clock, b)
    }

    fn core(max: u64, now: Instant) -> DownloadCore {
        let req = ProtoMsg::new(PROTO_FILETRANSFER, "get_file", "s").hdr;
        DownloadCore::new("s", req, max, now)
    }

    fn ack(o: u64) -> ProtoMsg {
        wire::with_offset("ack", "s", o)
    }

    fn offset(m: &ProtoMsg) -> i64 {
        match offset_of(m) {
            Some(Ok(o)) => o,
            other => panic!("no offset: {other:?}"),
        }
    }

    fn reply_text(r: Result<impl std::fmt::Debug, Stop>) -> (String, String) {
        match r {
            Err(Stop::Reply(_, typ, err)) => (typ, err.to_string()),
            other => panic!("not a reply: {other:?}"),
        }
    }

    #[test]
    fn twenty_chunks_fill_the_window_and_an_ack_reopens_it() {
        let t = Instant::now();
        let mut c = core(0, t);
        let data = [7u8; CHUNK];
        for i in 0..WINDOW_CHUNKS {
            assert_eq!(c.step(), Step::Read, "chunk {i}");
            let s = c.read(&data, t, None).expect("chunk");
            assert_eq!(offset(&s.msg), (i * CHUNK as u64) as i64);
            assert_eq!(s.msg.body.as_deref(), Some(&data[..]));
            assert!(s.not_before.is_none());
            c.sent(t);
        }
        assert_eq!(c.step(), Step::Receive);
        c.message(ack(CHUNK as u64)).expect("ack");
        assert_eq!(c.step(), Step::Read);
    }

    #[test]
    fn the_end_of_file_is_an_empty_chunk_and_done_waits_for_the_final_ack() {
        let t = Instant::now();
        let mut c = core(0, t);
        c.read(b"hello", t, None).expect("data");
        let eof = c.read(b"", t, None).expect("eof");
        assert_eq!(offset(&eof.msg), 5);
        assert_eq!(eof.msg.body, None);
        assert_eq!(c.step(), Step::Receive);
        c.message(ack(3)).expect("partial ack");
        assert_eq!(c.step(), Step::Receive);
        c.message(ack(5)).expect("final ack");
        assert_eq!(c.step(), Step::Done);
    }

    #[test]
    fn acks_beyond_what_was_sent_or_behind_the_last_one_are_refused() {
        let t = Instant::now();
        let mut c = core(0, t);
        c.read(&[1; 100], t, None).expect("data");
        assert_eq!(
            reply_text(c.message(ack(101))),
            (
                "ack".into(),
                "invalid ack offset 101: 100 bytes sent, 0 acknowledged".into()
            )
        );
        c.message(ack(50)).expect("ack");
        c.message(ack(50)).expect("a duplicate ack is harmless");
        assert_eq!(
            reply_text(c.message(ack(49))).1,
            "invalid ack offset 49: 100 bytes sent, 50 acknowledged"
        );
        let neg = wire::with_offset("ack", "s", 0).with_prop("offset", Value::I64(-1));
        assert_eq!(
            reply_text(c.message(neg)).1,
            "invalid ack offset -1: 100 bytes sent, 50 acknowledged"
        );
        let typed =
            ProtoMsg::new(PROTO_FILETRANSFER, "ack", "s").with_prop("offset", Value::U32(1));
        assert_eq!(
            reply_text(c.message(typed)).1,
            "invalid offset data type: require int64"
        );
        let blank = ProtoMsg::new(PROTO_FILETRANSFER, "ack", "s");
        assert_eq!(
            reply_text(c.message(blank)).1,
            "ack message: offset property cannot be blank"
        );
        let other = ProtoMsg::new(PROTO_FILETRANSFER, "file_chunk", "s");
        assert_eq!(
            reply_text(c.message(other)),
            (
                "file_chunk".into(),
                "received unexpected message type 'file_chunk'; expected 'ack'".into()
            )
        );
        let abort = ProtoMsg::new(PROTO_FILETRANSFER, "error", "s");
        assert!(matches!(c.message(abort), Err(Stop::Quiet)));
    }

    #[test]
    fn errors_go_against_the_last_ack_or_the_request() {
        let t = Instant::now();
        let mut c = core(150, t);
        c.read(&[1; 100], t, None).expect("data");
        let e = c.read_failed("/f", io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(
            reply_text(Err::<(), _>(e)),
            (
                "get_file".into(),
                "failed to copy file chunk to session: read /f: input/output error".into()
            )
        );
        c.message(ack(100)).expect("ack");
        // the file grew past MaxFileSize while streaming
        assert_eq!(
            reply_text(c.read(&[1; 100], t, None)),
            (
                "ack".into(),
                "access denied: the file size is over the limit".into()
            )
        );
    }

    #[test]
    fn the_bucket_holds_chunks_back_and_ends_the_transfer_past_the_wait_budget() {
        let (_clock, b) = slow_bucket();
        let t = Instant::now();
        let mut c = core(0, t);
        let data = [0u8; CHUNK];
        // the burst passes at once
        assert!(c.read(&data, t, Some(&b)).expect("1").not_before.is_none());
        assert!(c.read(&data, t, Some(&b)).expect("2").not_before.is_none());
        // then each chunk waits for its refill, longer and longer
        let mut last = t;
        let mut held = 0;
        let err = loop {
            match c.read(&data, t, Some(&b)) {
                Ok(s) => {
                    let until = s.not_before.expect("throttled");
                    assert!(until > last);
                    last = until;
                    held += 1;
                }
                Err(e) => break e,
            }
        };
        assert!(held > 3, "{held}");
        // never more than the budget: MAX_WAIT less the slack for sending
        assert!(last <= t + super::super::MAX_WAIT - super::super::SEND_SLACK);
        assert_eq!(
            reply_text(Err::<(), _>(err)).1,
            "transmitted bytes limit exhausted"
        );
        // the overrun spends a minute's budget: new transfers are refused
        assert!(b.check_start().is_err());
    }

    #[test]
    fn the_wait_budget_counts_from_when_the_server_last_heard() {
        let (_clock, b) = slow_bucket();
        let t = Instant::now();
        let mut c = core(0, t);
        let data = [0u8; CHUNK];
        c.read(&data, t, Some(&b)).expect("burst");
        c.read(&data, t, Some(&b)).expect("burst");
        // 19.5 s without news: no wait fits any more
        let late = t + Duration::from_millis(19_500);
        assert!(c.read(&data, late, Some(&b)).is_err());
        // whereas a chunk sent just now restarts the count
        let (_clock2, b2) = slow_bucket();
        let mut c = core(0, t);
        c.read(&data, t, Some(&b2)).expect("burst");
        c.read(&data, t, Some(&b2)).expect("burst");
        c.sent(late);
        let s = c.read(&data, late, Some(&b2)).expect("within budget");
        assert!(s.not_before.is_some());
    }

    #[test]
    fn the_budget_is_max_wait_less_the_slack_and_never_negative() {
        let t = Instant::now();
        assert_eq!(throttle_budget(t, t), Duration::from_secs(19));
        assert_eq!(
            throttle_budget(t, t + Duration::from_secs(4)),
            Duration::from_secs(15)
        );
        assert_eq!(
            throttle_budget(t, t + Duration::from_secs(60)),
            Duration::ZERO
        );
    }
}
