//! `get_file`: stream a file in 4096-byte chunks within the 20-chunk window,
//! throttled by the shared Tx bucket, EOF as a body-less chunk (§2.3).

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::time::Instant;

use crate::limits::policy::Denial;
use crate::wire::codec::{ProtoHdr, ProtoMsg};

use super::wire::{self, CHUNK, WINDOW_CHUNKS, offset_of};
use super::{DOWNLOAD, FileTransfer, FtError, Link, Next, Service, audit_event};

impl FileTransfer {
    /// Checks and opens the file, then starts the streaming thread.
    /// Every limit is applied here, before the first chunk; a refusal by
    /// the limits carries `code` 403.
    pub(super) fn start_download(&mut self, msg: &ProtoMsg) -> Result<(), FtError> {
        let req = wire::Request::decode(msg.body.as_deref())?;
        let path = req.path()?.to_vec();
        let shown = wire::shown(&path);
        // O_NONBLOCK: opening a FIFO without a writer must not hang the session.
        let (fd, st) = self
            .svc
            .check_download(&path, libc::O_RDONLY | libc::O_NONBLOCK)
            .map_err(|e| match e {
                Ok(denial) => FtError::Denied(denial),
                Err(err) => FtError::OpenRead {
                    path: shown.clone(),
                    err,
                },
            })?;
        // a disabled policy has no buckets and no size limit (Policy::disabled)
        if let Some(tx) = self.svc.policy.tx() {
            tx.check_start().map_err(FtError::Limit)?;
        }
        if self.busy() {
            return Err(FtError::Busy);
        }
        let regular = st.st_mode & libc::S_IFMT == libc::S_IFREG;
        if regular {
            // Regular files never block; plain reads keep the loop simple.
            let _ = crate::sys::fs::set_nonblocking(fd.as_fd(), false);
        }
        let job = Download {
            svc: Arc::clone(&self.svc),
            file: File::from(fd),
            path: shown,
            req: msg.hdr.clone(),
        };
        self.spawn("download", move |link| job.run(&link))
    }
}

struct Download {
    svc: Arc<Service>,
    file: File,
    path: String,
    req: ProtoHdr,
}

enum Fail {
    /// Tell the server (against this header, with this msgtype).
    Reply(Box<ProtoHdr>, String, FtError),
    /// End quietly (cancelled, connection gone, server error).
    Quiet,
}

impl Download {
    fn run(mut self, link: &Link) {
        let result = self.stream(link);
        self.audit(link, &result);
        if let Err(Fail::Reply(hdr, msgtype, err)) = result {
            log::info!(
                "file transfer {}: download of {}: {err}",
                link.sid,
                self.path
            );
            link.send(&wire::error_reply(&hdr, &msgtype, &err.to_string()));
        }
    }

    /// One audit line for the whole download.
    fn audit(&self, link: &Link, result: &Result<(), Fail>) {
        let event = match result {
            Ok(()) => audit_event(DOWNLOAD, &self.req, &link.sid, Ok(())),
            Err(Fail::Reply(_, _, err)) => audit_event(DOWNLOAD, &self.req, &link.sid, Err(err)),
            Err(Fail::Quiet) => {
                audit_event(DOWNLOAD, &self.req, &link.sid, Ok(())).with("result", "aborted")
            }
        };
        event
            .with("path", &self.path)
            .with_opt("resolved", crate::audit::fd_path(self.file.as_raw_fd()))
            .with_opt("size", self.file.metadata().ok().map(|m| m.len()))
            .emit();
    }

    fn stream(&mut self, link: &Link) -> Result<(), Fail> {
        let svc = Arc::clone(&self.svc);
        let p = &svc.policy;
        let bucket = p.tx();
        let max = p.max_file_size();
        let mut buf = vec![0u8; CHUNK];
        let mut offset: u64 = 0;
        let mut acked: u64 = 0;
        let mut eof_sent = false;
        // when the server last heard from this transfer
        let mut heard = Instant::now();
        // Errors inside the transfer are reported against the last ack (or the request).
        let mut last = (self.req.clone(), "get_file".to_string());
        loop {
            while !eof_sent && offset < acked + WINDOW_CHUNKS * CHUNK as u64 {
                // a window of sends never blocks on the peer: look for a cancel
                if !link.alive() {
                    return Err(Fail::Quiet);
                }
                let n = self.fill(&mut buf, link).map_err(|e| match e {
                    None => Fail::Quiet,
                    Some(err) => Fail::Reply(
                        Box::new(last.0.clone()),
                        last.1.clone(),
                        FtError::ReadChunk {
                            path: self.path.clone(),
                            err,
                        },
                    ),
                })?;
                if n == 0 {
                    if !link.send(&wire::with_offset("file_chunk", &link.sid, offset)) {
                        return Err(Fail::Quiet);
                    }
                    eof_sent = true;
                    break;
                }
                if max > 0 && offset + n as u64 > max {
                    // The file grew past the limit while streaming (§7 #17).
                    let err = FtError::Denied(Denial::TooLarge);
                    return Err(Fail::Reply(Box::new(last.0.clone()), last.1.clone(), err));
                }
                if let Some(b) = bucket {
                    // The server hears from a download only through chunks:
                    // the throttling since the last one counts, not each wait.
                    let budget = super::throttle_budget(heard);
                    match b.reserve(n as u64, budget) {
                        Ok(wait) if wait.is_zero() => {}
                        Ok(wait) => {
                            if !link.pause(wait) {
                                return Err(Fail::Quiet);
                            }
                        }
                        Err(e) => {
                            b.exhaust();
                            return Err(Fail::Reply(
                                Box::new(last.0.clone()),
                                last.1.clone(),
                                FtError::Limit(e),
                            ));
                        }
                    }
                }
                let chunk =
                    wire::with_offset("file_chunk", &link.sid, offset).with_body(buf[..n].to_vec());
                if !link.send(&chunk) {
                    return Err(Fail::Quiet);
                }
                heard = Instant::now();
                offset += n as u64;
            }
            if eof_sent && acked >= offset {
                return Ok(());
            }
            let msg = match link.next() {
                Next::Msg(m) => m,
                Next::Stop => return Err(Fail::Quiet),
            };
            match msg.hdr.typ.as_str() {
                "ack" => match offset_of(&msg) {
                    Some(Ok(o)) => {
                        // Only bytes that were sent can be acknowledged, and
                        // never fewer than before: any other ack would move
                        // the window where the peer cannot have read (a huge
                        // one switches flow control off).
                        let o = match u64::try_from(o) {
                            Ok(o) if o >= acked && o <= offset => o,
                            _ => {
                                let err = FtError::AckOffset {
                                    offset: o,
                                    sent: offset,
                                    acked,
                                };
                                return Err(Fail::Reply(Box::new(msg.hdr), "ack".into(), err));
                            }
                        };
                        acked = o;
                        last = (msg.hdr, "ack".to_string());
                    }
                    Some(Err(())) => {
                        let err = FtError::AckOffsetType;
                        return Err(Fail::Reply(Box::new(msg.hdr), "ack".into(), err));
                    }
                    None => {
                        let err = FtError::AckOffsetBlank;
                        return Err(Fail::Reply(Box::new(msg.hdr), "ack".into(), err));
                    }
                },
                "error" => {
                    log::info!(
                        "file transfer {}: the server aborted the download",
                        link.sid
                    );
                    return Err(Fail::Quiet);
                }
                other => {
                    let err = FtError::UnexpectedInDownload(other.to_string());
                    let t = other.to_string();
                    return Err(Fail::Reply(Box::new(msg.hdr), t, err));
                }
            }
        }
    }

    /// Reads up to one chunk. `Err(None)` = the transfer was cancelled while
    /// a non-regular file had nothing to read.
    fn fill(&mut self, buf: &mut [u8], link: &Link) -> Result<usize, Option<io::Error>> {
        let mut got = 0;
        while got < buf.len() {
            match self.file.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if got > 0 {
                        break;
                    }
                    let _ = crate::sys::poll::poll_one(self.file.as_raw_fd(), libc::POLLIN, 200);
                    if !link.alive() {
                        return Err(None);
                    }
                }
                Err(e) => return Err(Some(e)),
            }
        }
        Ok(got)
    }
}
