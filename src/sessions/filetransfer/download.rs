//! `get_file`: stream a file in 4096-byte chunks within the 20-chunk window,
//! throttled by the shared Tx bucket, EOF as a body-less chunk (§2.3).

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::time::Instant;

use crate::wire::codec::{ProtoHdr, ProtoMsg};

use super::download_core::{DownloadCore, Step, Stop};
use super::wire::{self, CHUNK};
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
        if crate::sys::fs::is_type(&st, libc::S_IFREG) {
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

impl Download {
    fn run(mut self, link: &Link) {
        let result = self.stream(link);
        self.audit(link, &result);
        if let Err(Stop::Reply(hdr, msgtype, err)) = result {
            log::info!(
                "file transfer {}: download of {}: {err}",
                link.sid,
                self.path
            );
            link.send(&wire::error_reply(&hdr, &msgtype, &err.to_string()));
        }
    }

    /// One audit line for the whole download.
    fn audit(&self, link: &Link, result: &Result<(), Stop>) {
        let event = match result {
            Ok(()) => audit_event(DOWNLOAD, &self.req, &link.sid, Ok(())),
            Err(Stop::Reply(_, _, err)) => audit_event(DOWNLOAD, &self.req, &link.sid, Err(err)),
            Err(Stop::Quiet) => {
                audit_event(DOWNLOAD, &self.req, &link.sid, Ok(())).with("result", "aborted")
            }
        };
        event
            .with("path", &self.path)
            .with_opt("resolved", crate::audit::fd_path(self.file.as_raw_fd()))
            .with_opt("size", self.file.metadata().ok().map(|m| m.len()))
            .emit();
    }

    /// Moves bytes between the file, the core and the link.
    fn stream(&mut self, link: &Link) -> Result<(), Stop> {
        let svc = Arc::clone(&self.svc);
        let p = &svc.policy;
        let bucket = p.tx();
        let sid = &link.sid;
        let mut core = DownloadCore::new(sid, self.req.clone(), p.max_file_size(), Instant::now());
        let mut buf = vec![0u8; CHUNK];
        loop {
            match core.step() {
                Step::Done => return Ok(()),
                Step::Read => {
                    // a window of sends never blocks on the peer: look for a cancel
                    if !link.alive() {
                        return Err(Stop::Quiet);
                    }
                    let n = match self.fill(&mut buf, link) {
                        Ok(n) => n,
                        Err(None) => return Err(Stop::Quiet),
                        Err(Some(e)) => return Err(core.read_failed(&self.path, e)),
                    };
                    let out = core.read(&buf[..n], Instant::now(), bucket)?;
                    if let Some(until) = out.not_before
                        && !link.pause_until(until)
                    {
                        return Err(Stop::Quiet);
                    }
                    if !link.send(&out.msg) {
                        return Err(Stop::Quiet);
                    }
                    core.sent(Instant::now());
                }
                Step::Receive => match link.next() {
                    Next::Msg(m) => core.message(m)?,
                    Next::Stop => return Err(Stop::Quiet),
                },
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
