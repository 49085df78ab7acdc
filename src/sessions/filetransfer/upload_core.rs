//! The decisions of an upload, without I/O: which chunk offsets are
//! accepted, when a batch of chunks is acknowledged, how long the Rx bucket
//! holds that ack back, and when the file is committed. The thread in
//! `upload.rs` only writes what this returns to the temp file, commits and
//! sends the acks; time comes in as an `Instant`.

use std::time::Instant;

use crate::limits::bucket::Bucket;
use crate::wire::codec::ProtoMsg;

use super::FtError;
use super::download_core::throttle_budget;
use super::wire::{self, ACK_EVERY, CHUNK, offset_of};
use crate::wire::types::filetransfer as t;

/// How an upload ends early.
#[derive(Debug)]
pub(super) enum Stop {
    /// Tell the server (against the `put_file`).
    Reply(FtError),
    /// End quietly (cancelled, connection gone, server error).
    Quiet,
}

/// The end of a batch: the ack to send, after committing when `commit`.
#[derive(Debug)]
pub(super) struct Ack {
    /// The last chunk's header as an `ack`.
    pub msg: ProtoMsg,
    /// The batch ended with the end of the file: commit before acking,
    /// and the transfer is over once the ack is sent.
    pub commit: bool,
}

/// One upload's flow-control state.
#[derive(Debug)]
pub(super) struct UploadCore {
    /// `MaxFileSize` (0 = unlimited).
    max: u64,
    /// Bytes accepted so far: the offset the next chunk must carry.
    written: u64,
    /// When the server last heard from this transfer (an ack).
    heard: Instant,
    /// Chunks taken in the current batch.
    taken: usize,
    /// Bytes of the current batch not yet reserved in the bucket.
    unreserved: u64,
    eof: bool,
    /// The header of the batch's last chunk, echoed by its ack.
    last: Option<ProtoMsg>,
}

impl UploadCore {
    /// An upload whose first ack (offset 0) goes out at `now`.
    pub fn new(max: u64, now: Instant) -> UploadCore {
        UploadCore {
            max,
            written: 0,
            heard: now,
            taken: 0,
            unreserved: 0,
            eof: false,
            last: None,
        }
    }

    /// The ack that invites the first chunk.
    pub fn first_ack(sid: &str) -> ProtoMsg {
        wire::with_offset(t::ACK, sid, 0)
    }

    /// One message of the current batch: the bytes to append to the file,
    /// `None` at the end of the file (a chunk without body).
    pub fn chunk(&mut self, mut msg: ProtoMsg) -> Result<Option<Vec<u8>>, Stop> {
        match msg.hdr.typ.as_str() {
            t::FILE_CHUNK => {}
            t::ERROR => return Err(Stop::Quiet),
            other => {
                let t = other.to_string();
                return Err(Stop::Reply(FtError::UnexpectedInUpload(t)));
            }
        }
        let Some(Ok(offset)) = offset_of(&msg) else {
            return Err(Stop::Reply(FtError::ChunkOffsetMissing));
        };
        if offset < 0 || offset as u64 != self.written {
            return Err(Stop::Reply(FtError::ChunkOffset));
        }
        let data = msg.body.take().filter(|d| !d.is_empty());
        if let Some(d) = &data {
            let n = d.len() as u64;
            if self.max > 0 && self.written + n > self.max {
                // Upstream's text (asserted by its suite), though it names the rate limit.
                return Err(Stop::Reply(FtError::UploadTooLarge));
            }
            self.written += n;
            self.unreserved += n;
        } else {
            self.eof = true;
        }
        self.taken += 1;
        self.last = Some(msg);
        Ok(data)
    }

    /// Whether the batch is acknowledged now (end of file, or `ACK_EVERY`
    /// chunks) rather than after more queued chunks.
    pub fn batch_full(&self) -> bool {
        self.eof || self.taken >= ACK_EVERY
    }

    /// Reserves the batch's bytes in `bucket`, a chunk at a time like
    /// downloads: `Some(t)` = hold the ack until `t`, then call again;
    /// `None` = the ack may go. Delaying the ack throttles the sender (it
    /// stops at its window). The server hears from an upload only through
    /// acks, so the waits since the last one add up against `MAX_WAIT`:
    /// when the bucket cannot pass the batch within it, the transfer ends
    /// with an error the user sees instead of the server's time-out.
    pub fn throttle(
        &mut self,
        now: Instant,
        bucket: Option<&Bucket>,
    ) -> Result<Option<Instant>, Stop> {
        let Some(b) = bucket else {
            return Ok(None);
        };
        while self.unreserved > 0 {
            let n = self.unreserved.min(CHUNK as u64);
            let wait = b
                .reserve(n, throttle_budget(self.heard, now))
                .map_err(|e| {
                    b.exhaust();
                    Stop::Reply(FtError::WriteLimit(e))
                })?;
            self.unreserved -= n;
            if !wait.is_zero() {
                return Ok(Some(now + wait));
            }
        }
        Ok(None)
    }

    /// Closes the batch: its ack (and whether to commit first).
    pub fn end_batch(&mut self) -> Ack {
        let mut msg = self
            .last
            .take()
            .unwrap_or_else(|| wire::with_offset(t::ACK, "", self.written));
        msg.hdr.typ = t::ACK.to_string();
        msg.body = None;
        self.taken = 0;
        self.unreserved = 0;
        Ack {
            msg,
            commit: self.eof,
        }
    }

    /// The batch's ack was queued at `now`.
    pub fn acked(&mut self, now: Instant) {
        self.heard = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sessions::filetransfer::download_core::tests::slow_bucket;
    use crate::wire::codec::{PROTO_FILETRANSFER, Value};
    use std::time::Duration;

    fn chunk(offset: u64, data: &[u8]) -> ProtoMsg {
        let m = wire::with_offset("file_chunk", "s", offset);
        if data.is_empty() {
            m
        } else {
            m.with_body(data.to_vec())
        }
    }

    fn reply(r: Result<impl std::fmt::Debug, Stop>) -> String {
        match r {
            Err(Stop::Reply(e)) => e.to_string(),
            other => panic!("not a reply: {other:?}"),
        }
    }

    #[test]
    fn in_order_chunks_are_written_and_acked_every_ten() {
        let t = Instant::now();
        let mut c = UploadCore::new(0, t);
        assert_eq!(offset_of(&UploadCore::first_ack("s")), Some(Ok(0)));
        for i in 0..ACK_EVERY as u64 {
            assert!(!c.batch_full());
            let data = c.chunk(chunk(i * 4, b"abcd")).expect("chunk");
            assert_eq!(data.as_deref(), Some(&b"abcd"[..]));
        }
        assert!(c.batch_full());
        assert_eq!(c.throttle(t, None).expect("unthrottled"), None);
        let ack = c.end_batch();
        assert!(!ack.commit);
        assert_eq!(ack.msg.hdr.typ, "ack");
        // the ack echoes the last chunk's header (its offset)
        assert_eq!(offset_of(&ack.msg), Some(Ok(36)));
        assert_eq!(ack.msg.body, None);
        assert!(!c.batch_full());
    }

    #[test]
    fn the_end_of_file_closes_the_batch_and_asks_for_the_commit() {
        let t = Instant::now();
        let mut c = UploadCore::new(0, t);
        c.chunk(chunk(0, b"xy")).expect("data");
        assert!(!c.batch_full());
        assert_eq!(c.chunk(chunk(2, b"")).expect("eof"), None);
        assert!(c.batch_full());
        let ack = c.end_batch();
        assert!(ack.commit);
        assert_eq!(offset_of(&ack.msg), Some(Ok(2)));
        // a body of zero bytes is the end of the file too
        let mut c = UploadCore::new(0, t);
        let empty = wire::with_offset("file_chunk", "s", 0).with_body(Vec::new());
        assert_eq!(c.chunk(empty).expect("eof"), None);
        assert!(c.end_batch().commit);
    }

    #[test]
    fn duplicate_skipped_and_missing_offsets_are_refused() {
        let t = Instant::now();
        let mut c = UploadCore::new(0, t);
        c.chunk(chunk(0, b"abcd")).expect("first");
        let dup = c.chunk(chunk(0, b"abcd"));
        assert_eq!(reply(dup), "received unexpected chunk offset");
        let mut c = UploadCore::new(0, t);
        assert_eq!(
            reply(c.chunk(chunk(4, b"abcd"))),
            "received unexpected chunk offset"
        );
        let neg = chunk(0, b"x").with_prop("offset", Value::I64(-1));
        assert_eq!(reply(c.chunk(neg)), "received unexpected chunk offset");
        let untyped = chunk(0, b"x").with_prop("offset", Value::U8(0));
        assert_eq!(
            reply(c.chunk(untyped)),
            "invalid file chunk message: missing offset property"
        );
        let bare = ProtoMsg::new(PROTO_FILETRANSFER, "file_chunk", "s");
        assert_eq!(
            reply(c.chunk(bare)),
            "invalid file chunk message: missing offset property"
        );
        let ack = wire::with_offset("ack", "s", 0);
        assert_eq!(
            reply(c.chunk(ack)),
            "received unexpected message type 'ack' during file upload"
        );
        let abort = ProtoMsg::new(PROTO_FILETRANSFER, "error", "s");
        assert!(matches!(c.chunk(abort), Err(Stop::Quiet)));
    }

    #[test]
    fn a_file_growing_past_max_file_size_is_refused_with_upstreams_text() {
        let mut c = UploadCore::new(6, Instant::now());
        c.chunk(chunk(0, b"abcd")).expect("within");
        assert_eq!(
            reply(c.chunk(chunk(4, b"abcd"))),
            "failed to write file chunk: transmitted bytes limit exhausted"
        );
    }

    #[test]
    fn a_file_of_exactly_max_file_size_is_accepted() {
        let mut c = UploadCore::new(8, Instant::now());
        c.chunk(chunk(0, b"abcd")).expect("within");
        c.chunk(chunk(4, b"abcd")).expect("exactly the maximum");
    }

    #[test]
    fn the_wait_budget_restarts_at_each_ack() {
        let t = Instant::now();
        let late = t + Duration::from_millis(19_500);
        let data = vec![0u8; CHUNK];
        let batch = |c: &mut UploadCore| {
            for i in 0..4u64 {
                c.chunk(chunk(i * CHUNK as u64, &data)).expect("chunk");
            }
        };
        // nothing acked since `new` 19.5 s ago: a wait for the bucket
        // would pass MAX_WAIT, so the upload ends
        let (_clock, b) = slow_bucket();
        let mut stale = UploadCore::new(0, t);
        batch(&mut stale);
        assert_eq!(
            reply(stale.throttle(late, Some(&b))),
            "failed to write file chunk: transmitted bytes limit exhausted"
        );
        // the same batch right after an ack only waits
        let (_clock, b) = slow_bucket();
        let mut fresh = UploadCore::new(0, t);
        fresh.acked(late);
        batch(&mut fresh);
        assert!(
            fresh
                .throttle(late, Some(&b))
                .expect("within budget")
                .is_some()
        );
    }

    #[test]
    fn the_bucket_holds_the_ack_chunk_by_chunk_and_ends_past_the_budget() {
        let (clock, b) = slow_bucket();
        let t = Instant::now();
        let mut c = UploadCore::new(0, t);
        let data = vec![0u8; CHUNK];
        for i in 0..4u64 {
            c.chunk(chunk(i * CHUNK as u64, &data)).expect("chunk");
        }
        // 10 KiB burst: the first two chunks pass, the third waits
        let until = c.throttle(t, Some(&b)).expect("ok").expect("held");
        assert!(until > t);
        clock.advance(until - t);
        let until2 = c.throttle(until, Some(&b)).expect("ok").expect("held");
        assert!(until2 > until);
        clock.advance(until2 - until);
        assert_eq!(c.throttle(until2, Some(&b)).expect("ok"), None);
        c.end_batch();
        c.acked(until2);
        // a batch whose wait would pass MAX_WAIT since the last ack ends it
        for i in 4..14u64 {
            c.chunk(chunk(i * CHUNK as u64, &data)).expect("chunk");
        }
        let late = until2 + Duration::from_secs(19);
        assert_eq!(
            reply(c.throttle(late, Some(&b))),
            "failed to write file chunk: transmitted bytes limit exhausted"
        );
        assert!(b.check_start().is_err(), "the overrun spends the bucket");
    }
}
