//! `put_file`: checks on the resolved parent directory, a temp file created
//! `O_EXCL` beside the target, chunks written and acknowledged (throttled by
//! the shared Rx bucket), then fsync, fchown, fchmod and rename, and only
//! then the final ack (§2.4 with the recommended fixes).

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::limits::policy::{Denial, Plan, Wanted};
use crate::sys::fs::{self, Stat, lstat_at, openat};
use crate::wire::codec::{ProtoHdr, ProtoMsg};

use super::upload_core::{Stop, UploadCore};
use super::wire::{self, GO_SETUID, Request};
use super::{FileTransfer, FtError, Link, Next, Service, UPLOAD, audit_event};
use crate::wire::types::filetransfer as t;

/// Temp-name attempts on EEXIST, as upstream.
const TEMP_ATTEMPTS: u32 = 100;

impl Service {
    /// Mode and owner of the upload `req` asks for, per the policy.
    fn plan(&self, req: &Request) -> Result<Plan, FtError> {
        let want = Wanted {
            mode: req.mode.map(|m| m & !GO_SETUID),
            go_setuid: req.mode.is_some_and(|m| m & GO_SETUID != 0),
            uid: req.uid,
            gid: req.gid,
        };
        Ok(self.policy.plan_upload(want, (self.uid, self.gid))?)
    }
}

fn is_dir(st: &Stat) -> bool {
    fs::is_type(st, libc::S_IFDIR)
}

/// Go's `filepath.Base`, `None` when it is not a plain file name.
fn basename(p: &[u8]) -> Option<&[u8]> {
    let mut end = p.len();
    while end > 0 && p[end - 1] == b'/' {
        end -= 1;
    }
    let start = p[..end]
        .iter()
        .rposition(|&b| b == b'/')
        .map_or(0, |i| i + 1);
    let b = &p[start..end];
    (!b.is_empty() && b != b"." && b != b"..").then_some(b)
}

/// A path (part) as error texts and logs show it.
fn lossy(b: &[u8]) -> String {
    wire::shown(b)
}

impl FileTransfer {
    /// Runs every check, creates the temp file and starts the receiving thread.
    pub(super) fn start_upload(&mut self, msg: &ProtoMsg) -> Result<(), FtError> {
        let req = Request::decode(msg.body.as_deref())?;
        let path = req.path()?.to_vec();
        let p = &self.svc.policy;
        p.permit_upload(req.size)?;
        let mut shown = lossy(&path);
        let resolver = p.resolver_for(&path)?;
        let (mut dir, mut leaf) = resolver.open_parent(&path).map_err(|e| {
            match Denial::from_path(e) {
                Ok(denial) => FtError::Denied(denial),
                Err(err) => match err.raw_os_error() {
                    Some(libc::EISDIR) => FtError::TargetIsDir,
                    // Upstream fails here creating the temp file (asserted prefix).
                    Some(libc::ENOENT) | Some(libc::ENOTDIR) => FtError::Create {
                        name: shown.clone(),
                        err,
                    },
                    _ => FtError::CheckLocation {
                        path: shown.clone(),
                        err,
                    },
                },
            }
        })?;
        let check_err = |shown: &str, err: io::Error| FtError::CheckLocation {
            path: shown.to_string(),
            err,
        };
        let mut existing = lstat_at(dir.as_raw_fd(), &leaf).map_err(|e| check_err(&shown, e))?;
        if existing.as_ref().is_some_and(is_dir) {
            let Some(base) = req.src_path.as_deref().and_then(basename) else {
                return Err(FtError::TargetIsDir);
            };
            // O_NOFOLLOW: if the directory was swapped for a link, O_DIRECTORY fails.
            dir = openat(
                dir.as_raw_fd(),
                &leaf,
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            )
            .map_err(|e| check_err(&shown, e))?;
            shown = format!("{shown}/{}", lossy(base));
            leaf = base.to_vec();
            existing = lstat_at(dir.as_raw_fd(), &leaf).map_err(|e| check_err(&shown, e))?;
            if existing.as_ref().is_some_and(is_dir) {
                return Err(FtError::TargetIsDir);
            }
        }
        if let Some(st) = &existing {
            if !fs::is_type(st, libc::S_IFREG) {
                return Err(FtError::TargetIrregular);
            }
            p.permit_replace(st)?;
        }
        let plan = self.svc.plan(&req)?;
        if let Some(rx) = p.rx() {
            rx.check_start().map_err(FtError::Limit)?;
        }
        if self.busy() {
            return Err(FtError::Busy);
        }
        let (file, tmp) = self.create_temp(&dir, &leaf, &shown)?;
        let job = Upload {
            svc: Arc::clone(&self.svc),
            file,
            dir,
            tmp,
            leaf,
            shown,
            req: msg.hdr.clone(),
            plan,
            committed: false,
        };
        self.spawn("upload", move |link| job.run(&link))
    }

    fn create_temp(
        &self,
        dir: &OwnedFd,
        leaf: &[u8],
        shown: &str,
    ) -> Result<(File, Vec<u8>), FtError> {
        let counter = self.svc.temp_counter.fetch_add(1, Ordering::Relaxed);
        let mut last = None;
        for attempt in 0..TEMP_ATTEMPTS {
            let mut name = leaf.to_vec();
            name.extend_from_slice(format!(".{counter:08x}{attempt:02x}").as_bytes());
            let flags = libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW;
            match openat(dir.as_raw_fd(), &name, flags, 0o200) {
                Ok(fd) => return Ok((File::from(fd), name)),
                Err(err) => {
                    let exists = err.raw_os_error() == Some(libc::EEXIST);
                    last = Some(FtError::Create {
                        name: format!("{shown}.{counter:08x}{attempt:02x}"),
                        err,
                    });
                    if !exists {
                        break;
                    }
                }
            }
        }
        Err(last.unwrap_or(FtError::Create {
            name: shown.to_string(),
            err: io::Error::from_raw_os_error(libc::EEXIST),
        }))
    }
}

struct Upload {
    svc: Arc<Service>,
    file: File,
    dir: OwnedFd,
    tmp: Vec<u8>,
    leaf: Vec<u8>,
    shown: String,
    req: ProtoHdr,
    plan: Plan,
    committed: bool,
}

impl Drop for Upload {
    /// Whatever ended the transfer, an uncommitted temp file goes.
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        // (the name has no NUL byte: it is the checked target's plus hex)
        if let Err(e) = fs::unlinkat(self.dir.as_raw_fd(), &self.tmp) {
            log::warn!(
                "file transfer: cannot remove the temp file of {}: {e}",
                self.shown
            );
        }
    }
}

impl Upload {
    fn run(mut self, link: &Link) {
        let result = self.receive(link);
        self.audit(link, &result);
        match result {
            Ok(()) => log::info!("file transfer {}: uploaded {}", link.sid, self.shown),
            Err(Stop::Quiet) => log::info!(
                "file transfer {}: upload of {} aborted",
                link.sid,
                self.shown
            ),
            Err(Stop::Reply(err)) => {
                // Remove the temp before telling the server, so t::ERROR means "nothing left".
                let req = self.req.clone();
                let shown = self.shown.clone();
                drop(self);
                log::info!("file transfer {}: upload of {shown}: {err}", link.sid);
                link.send(&wire::error_reply(&req, t::PUT_FILE, &err.to_string()));
            }
        }
    }

    /// One audit line for the whole upload: the final path, size, mode and
    /// owner, or why it failed.
    fn audit(&self, link: &Link, result: &Result<(), Stop>) {
        let p = &self.svc.policy;
        let event = match result {
            Ok(()) => audit_event(UPLOAD, &self.req, &link.sid, Ok(())),
            Err(Stop::Reply(err)) => {
                let mut e = audit_event(UPLOAD, &self.req, &link.sid, Err(err));
                // both texts are "failed to write file chunk: transmitted bytes limit exhausted"
                let limit_text = matches!(err, FtError::UploadTooLarge | FtError::WriteLimit(_));
                if limit_text && p.rx().is_some() && p.max_file_size() > 0 {
                    // upstream uses one text for both rules
                    e = e.with(
                        "rule",
                        "Limits.FileTransfer.MaxFileSize or Counters.MaxBytesRxPerMinute",
                    );
                } else if limit_text && p.rx().is_some() {
                    e = e.with("rule", "Limits.FileTransfer.Counters.MaxBytesRxPerMinute");
                }
                e
            }
            Err(Stop::Quiet) => {
                audit_event(UPLOAD, &self.req, &link.sid, Ok(())).with("result", "aborted")
            }
        };
        let dir = crate::audit::fd_path(self.dir.as_raw_fd());
        event
            .with("path", &self.shown)
            .with_opt(
                "resolved",
                dir.map(|d| format!("{d}/{}", lossy(&self.leaf))),
            )
            .with_opt("size", self.file.metadata().ok().map(|m| m.len()))
            .with("mode", format!("{:o}", self.plan.mode))
            .with("uid", self.plan.uid)
            .with("gid", self.plan.gid)
            .emit();
    }

    /// Moves bytes between the link, the core and the temp file.
    fn receive(&mut self, link: &Link) -> Result<(), Stop> {
        if !link.send(&UploadCore::first_ack(&link.sid)) {
            return Err(Stop::Quiet);
        }
        let svc = Arc::clone(&self.svc);
        let p = &svc.policy;
        let bucket = p.rx();
        let mut core = UploadCore::new(p.max_file_size(), Instant::now());
        loop {
            let mut msg = match link.next() {
                Next::Msg(m) => m,
                Next::Stop => return Err(Stop::Quiet),
            };
            // take what is queued, up to a batch, before acknowledging
            loop {
                if let Some(data) = core.chunk(msg)? {
                    self.file
                        .write_all(&data)
                        .map_err(|e| Stop::Reply(FtError::WriteChunk(e)))?;
                }
                if core.batch_full() {
                    break;
                }
                match link.rx.try_recv() {
                    Ok(m) => msg = m,
                    Err(_) => break,
                }
            }
            while let Some(until) = core.throttle(Instant::now(), bucket)? {
                if !link.pause_until(until) {
                    return Err(Stop::Quiet);
                }
            }
            let ack = core.end_batch();
            if ack.commit {
                self.commit().map_err(Stop::Reply)?;
            }
            if !link.send(&ack.msg) {
                return Err(Stop::Quiet);
            }
            core.acked(Instant::now());
            if ack.commit {
                return Ok(());
            }
        }
    }

    fn commit(&mut self) -> Result<(), FtError> {
        let tmp_shown = format!("{}{}", self.shown, lossy(&self.tmp[self.leaf.len()..]));
        self.file.sync_all().map_err(|err| FtError::Fsync {
            tmp: tmp_shown.clone(),
            err,
        })?;
        let fd = self.file.as_fd();
        // Owner first: a chown clears setuid, so the mode goes on afterwards.
        fs::fchown(fd, self.plan.uid, self.plan.gid).map_err(|err| FtError::Chown {
            tmp: tmp_shown.clone(),
            err,
        })?;
        fs::fchmod(fd, self.plan.mode as libc::mode_t).map_err(|err| FtError::Chmod {
            tmp: tmp_shown.clone(),
            err,
        })?;
        rename(
            self.dir.as_raw_fd(),
            &self.tmp,
            &self.leaf,
            self.plan.no_replace,
        )
        .map_err(|err| {
            if err.raw_os_error() == Some(libc::EEXIST) {
                FtError::Denied(Denial::Overwrite)
            } else {
                FtError::Rename {
                    tmp: tmp_shown,
                    path: self.shown.clone(),
                    err,
                }
            }
        })?;
        self.committed = true;
        // The rename itself must survive a power cut too.
        match openat(
            self.dir.as_raw_fd(),
            b".",
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        ) {
            Ok(d) => {
                if let Err(e) = File::from(d).sync_all() {
                    log::warn!(
                        "file transfer: fsync of the directory of {}: {e}",
                        self.shown
                    );
                }
            }
            Err(e) => log::warn!(
                "file transfer: cannot open the directory of {}: {e}",
                self.shown
            ),
        }
        Ok(())
    }
}

/// Renames within `dir`; with `no_replace` an existing target is EEXIST,
/// using link+unlink where the filesystem lacks RENAME_NOREPLACE.
fn rename(dir: RawFd, from: &[u8], to: &[u8], no_replace: bool) -> io::Result<()> {
    if !no_replace {
        return fs::renameat(dir, from, to);
    }
    match fs::renameat_noreplace(dir, from, to) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) => {
            // linkat fails with EEXIST instead of replacing
            fs::linkat(dir, from, to)?;
            let _ = fs::unlinkat(dir, from);
            Ok(())
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basename_like_go() {
        assert_eq!(basename(b"/a/b.txt"), Some(&b"b.txt"[..]));
        assert_eq!(basename(b"b/"), Some(&b"b"[..]));
        assert_eq!(basename(b""), None);
        assert_eq!(basename(b"/"), None);
        assert_eq!(basename(b".."), None);
    }
}
