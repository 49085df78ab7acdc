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

use crate::limits::path::PathError;
use crate::sys::errno::go_text;
use crate::sys::fs::{self, lstat_at, openat};
use crate::wire::codec::{ProtoHdr, ProtoMsg};

use super::wire::{self, ACK_EVERY, GO_SETUID, Request, offset_of};
use super::{FileTransfer, Link, Next, Service, UPLOAD, audit_event};

/// Temp-name attempts on EEXIST, as upstream.
const TEMP_ATTEMPTS: u32 = 100;

/// Final mode and owner of an upload, decided before anything is written.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    /// Permission bits (setuid only when allowed; never setgid/sticky).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Rename without replacing an existing file.
    pub no_replace: bool,
}

impl Service {
    /// Mode and owner per the limits (transfer.md §2.5 with its errata):
    /// the Unix setuid bit (04000) is kept under PreserveMode as upstream
    /// keeps it; the Go FileMode setuid bit (what mender-cli sends) is
    /// refused unless AllowSuid.
    fn plan(&self, req: &Request) -> Result<Plan, String> {
        let p = &self.policy;
        let requested = req.mode.unwrap_or(0o644);
        if !p.enabled {
            return Ok(Plan {
                mode: requested & 0o777,
                uid: req.uid.unwrap_or(self.uid),
                gid: req.gid.unwrap_or(self.gid),
                no_replace: false,
            });
        }
        let go_suid = requested & GO_SETUID != 0;
        if go_suid && !p.allow_suid {
            return Err("access denied: the set uid mode is forbidden".into());
        }
        let wants_suid = go_suid || requested & 0o4000 != 0;
        let umask = p
            .umask
            .clone()
            .map_err(|m| format!("failed to preserve file mode: {m}"))?;
        let mut mode = if p.preserve_mode {
            requested & 0o777
        } else {
            0o644
        };
        if let Some(u) = umask {
            // Upstream meaning: the Umask replaces the requested bits.
            mode = 0o777 & !u;
        }
        if wants_suid && p.preserve_mode {
            mode |= 0o4000;
        }
        let owner_err = |m: String| format!("failed to preserve file owner/group: {m}");
        let uid = match p.owner_put.clone().map_err(owner_err)? {
            Some(u) => u,
            None if p.preserve_owner => req.uid.unwrap_or(self.uid),
            None => self.uid,
        };
        let gid = match p.group_put.clone().map_err(owner_err)? {
            Some(g) => g,
            None if p.preserve_group => req.gid.unwrap_or(self.gid),
            None => self.gid,
        };
        Ok(Plan {
            mode,
            uid,
            gid,
            no_replace: !p.allow_overwrite,
        })
    }
}

fn is_dir(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
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
    pub(super) fn start_upload(&mut self, msg: &ProtoMsg) -> Result<(), String> {
        let req = Request::decode(msg.body.as_deref())?;
        let path = req.path()?.to_vec();
        let p = &self.svc.policy;
        if p.enabled
            && p.max_file_size > 0
            && req
                .size
                .is_some_and(|s| s > 0 && s as u64 > p.max_file_size)
        {
            return Err("access denied: the file size is over the limit".into());
        }
        let mut shown = lossy(&path);
        let resolver = p
            .resolver_for(&path)
            .map_err(|m| format!("access denied: {m}"))?;
        let (mut dir, mut leaf) = resolver.open_parent(&path).map_err(|e| match e {
            PathError::Os(e) => match e.raw_os_error() {
                Some(libc::EISDIR) => {
                    "conflicting file path: cannot overwrite directory".to_string()
                }
                // Upstream fails here creating the temp file (asserted prefix).
                Some(libc::ENOENT) | Some(libc::ENOTDIR) => format!(
                    "failed to create target file: failed to create file: open {shown}: {}",
                    go_text(&e)
                ),
                _ => format!(
                    "error checking file location: lstat {shown}: {}",
                    go_text(&e)
                ),
            },
            other => format!("access denied: {other}"),
        })?;
        let check_err = |shown: &str, e: io::Error| {
            format!(
                "error checking file location: lstat {shown}: {}",
                go_text(&e)
            )
        };
        let mut existing = lstat_at(dir.as_raw_fd(), &leaf).map_err(|e| check_err(&shown, e))?;
        if existing.as_ref().is_some_and(is_dir) {
            let Some(base) = req.src_path.as_deref().and_then(basename) else {
                return Err("conflicting file path: cannot overwrite directory".into());
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
                return Err("conflicting file path: cannot overwrite directory".into());
            }
        }
        if let Some(st) = &existing {
            if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                return Err("conflicting file path: cannot overwrite irregular file".into());
            }
            if p.enabled {
                if !p.allow_overwrite {
                    return Err("access denied: forbidden to overwrite the file".into());
                }
                if matches!(p.owner_put, Ok(Some(u)) if u != st.st_uid) {
                    return Err("access denied: the file owner does not match".into());
                }
                if matches!(p.group_put, Ok(Some(g)) if g != st.st_gid) {
                    return Err("access denied: the file group does not match".into());
                }
            }
        }
        let plan = self.svc.plan(&req)?;
        if let Some(rx) = &p.rx {
            rx.check_start().map_err(|e| e.to_string())?;
        }
        if self.busy() {
            return Err("another file transfer is in progress".into());
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
    ) -> Result<(File, Vec<u8>), String> {
        let counter = self.svc.temp_counter.fetch_add(1, Ordering::Relaxed);
        let mut last = String::new();
        for attempt in 0..TEMP_ATTEMPTS {
            let mut name = leaf.to_vec();
            name.extend_from_slice(format!(".{counter:08x}{attempt:02x}").as_bytes());
            let flags = libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW;
            match openat(dir.as_raw_fd(), &name, flags, 0o200) {
                Ok(fd) => return Ok((File::from(fd), name)),
                Err(e) => {
                    last = format!("open {shown}.{counter:08x}{attempt:02x}: {}", go_text(&e));
                    if e.raw_os_error() != Some(libc::EEXIST) {
                        break;
                    }
                }
            }
        }
        Err(format!(
            "failed to create target file: failed to create file: {last}"
        ))
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

enum Fail {
    Reply(String),
    Quiet,
}

impl Upload {
    fn run(mut self, link: &Link) {
        let result = self.receive(link);
        self.audit(link, &result);
        match result {
            Ok(()) => log::info!("file transfer {}: uploaded {}", link.sid, self.shown),
            Err(Fail::Quiet) => log::info!(
                "file transfer {}: upload of {} aborted",
                link.sid,
                self.shown
            ),
            Err(Fail::Reply(err)) => {
                // Remove the temp before telling the server, so "error" means "nothing left".
                let req = self.req.clone();
                let shown = self.shown.clone();
                drop(self);
                log::info!("file transfer {}: upload of {shown}: {err}", link.sid);
                link.send(&wire::error_reply(&req, "put_file", &err));
            }
        }
    }

    /// One audit line for the whole upload: the final path, size, mode and
    /// owner, or why it failed.
    fn audit(&self, link: &Link, result: &Result<(), Fail>) {
        let p = &self.svc.policy;
        let event = match result {
            Ok(()) => audit_event(UPLOAD, &self.req, &link.sid, Ok(())),
            Err(Fail::Reply(err)) => {
                let mut e = audit_event(UPLOAD, &self.req, &link.sid, Err(err));
                if err == "failed to write file chunk: transmitted bytes limit exhausted"
                    && p.rx.is_some()
                    && p.max_file_size > 0
                {
                    // upstream uses one text for both rules
                    e = e.with(
                        "rule",
                        "Limits.FileTransfer.MaxFileSize or Counters.MaxBytesRxPerMinute",
                    );
                } else if err.ends_with("transmitted bytes limit exhausted") && p.rx.is_some() {
                    e = e.with("rule", "Limits.FileTransfer.Counters.MaxBytesRxPerMinute");
                }
                e
            }
            Err(Fail::Quiet) => {
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

    fn receive(&mut self, link: &Link) -> Result<(), Fail> {
        if !link.send(&wire::with_offset("ack", &link.sid, 0)) {
            return Err(Fail::Quiet);
        }
        // when the server last heard from this transfer
        let mut heard = Instant::now();
        let svc = Arc::clone(&self.svc);
        let p = &svc.policy;
        let bucket = p.rx.as_ref();
        let max = p.max_file_size;
        let mut written: u64 = 0;
        loop {
            let mut msg = match link.next() {
                Next::Msg(m) => m,
                Next::Stop => return Err(Fail::Quiet),
            };
            let mut taken = 0usize;
            let mut fresh: u64 = 0;
            let mut eof = false;
            let last_hdr = loop {
                match msg.hdr.typ.as_str() {
                    "file_chunk" => {}
                    "error" => return Err(Fail::Quiet),
                    other => {
                        return Err(Fail::Reply(format!(
                            "received unexpected message type '{other}' during file upload"
                        )));
                    }
                }
                let Some(Ok(offset)) = offset_of(&msg) else {
                    return Err(Fail::Reply(
                        "invalid file chunk message: missing offset property".into(),
                    ));
                };
                if offset < 0 || offset as u64 != written {
                    return Err(Fail::Reply("received unexpected chunk offset".into()));
                }
                match msg.body.as_deref() {
                    Some(data) if !data.is_empty() => {
                        let n = data.len() as u64;
                        if max > 0 && written + n > max {
                            // Upstream's text (asserted by its suite), though it names the rate limit.
                            return Err(Fail::Reply(
                                "failed to write file chunk: transmitted bytes limit exhausted"
                                    .into(),
                            ));
                        }
                        self.file.write_all(data).map_err(|e| {
                            Fail::Reply(format!("failed to write file chunk: {}", go_text(&e)))
                        })?;
                        written += n;
                        fresh += n;
                    }
                    _ => eof = true,
                }
                taken += 1;
                if eof || taken >= ACK_EVERY {
                    break msg.hdr;
                }
                match link.rx.try_recv() {
                    Ok(m) => msg = m,
                    Err(_) => break msg.hdr,
                }
            };
            if let Some(b) = bucket
                && fresh > 0
            {
                // Delaying the ack throttles the sender: it stops at its window.
                // Reserved a chunk at a time, like downloads. The server hears
                // from an upload only through acks, so the waits since the
                // last one add up against MAX_WAIT: when the bucket cannot
                // pass the batch within it, the transfer ends with an error
                // the user sees instead of the server's time-out.
                let mut left = fresh;
                while left > 0 {
                    let n = left.min(super::wire::CHUNK as u64);
                    let budget = super::throttle_budget(heard);
                    let wait = b.reserve(n, budget).map_err(|e| {
                        b.exhaust();
                        Fail::Reply(format!("failed to write file chunk: {e}"))
                    })?;
                    if !wait.is_zero() && !link.pause(wait) {
                        return Err(Fail::Quiet);
                    }
                    left -= n;
                }
            }
            if eof {
                self.commit().map_err(Fail::Reply)?;
            }
            let mut ack = ProtoMsg {
                hdr: last_hdr,
                body: None,
            };
            ack.hdr.typ = "ack".to_string();
            if !link.send(&ack) {
                return Err(Fail::Quiet);
            }
            heard = Instant::now();
            if eof {
                return Ok(());
            }
        }
    }

    fn commit(&mut self) -> Result<(), String> {
        let tmp_shown = format!("{}{}", self.shown, lossy(&self.tmp[self.leaf.len()..]));
        self.file.sync_all().map_err(|e| {
            format!(
                "failed to commit uploaded file: fsync {tmp_shown}: {}",
                go_text(&e)
            )
        })?;
        let fd = self.file.as_fd();
        // Owner first: a chown clears setuid, so the mode goes on afterwards.
        fs::fchown(fd, self.plan.uid, self.plan.gid).map_err(|e| {
            format!(
                "failed to set file owner: chown {tmp_shown}: {}",
                go_text(&e)
            )
        })?;
        fs::fchmod(fd, self.plan.mode as libc::mode_t).map_err(|e| {
            format!(
                "failed to set file permissions: chmod {tmp_shown}: {}",
                go_text(&e)
            )
        })?;
        rename(
            self.dir.as_raw_fd(),
            &self.tmp,
            &self.leaf,
            self.plan.no_replace,
        )
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::EEXIST) {
                "access denied: forbidden to overwrite the file".to_string()
            } else {
                format!(
                    "failed to commit uploaded file: rename {tmp_shown} {}: {}",
                    self.shown,
                    go_text(&e)
                )
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
    use crate::config::Config;
    use crate::limits::policy::Policy;

    fn svc(edit: impl FnOnce(&mut crate::config::LimitsConfig)) -> Service {
        let mut cfg = Config::default().limits;
        cfg.enabled = true;
        edit(&mut cfg);
        let mut s = Service::with_policy(Policy::from_config(&cfg, false));
        s.uid = 0;
        s.gid = 0;
        s
    }

    fn req(mode: Option<u32>, uid: Option<u32>) -> Request {
        Request {
            path: Some(b"/x".to_vec()),
            mode,
            uid,
            gid: uid,
            ..Request::default()
        }
    }

    #[test]
    fn limits_off_drops_special_bits_and_keeps_the_request() {
        let s = Service::with_policy(Policy::disabled());
        let p = s.plan(&req(Some(0o4755), Some(12345))).expect("plan");
        assert_eq!((p.mode, p.uid, p.gid), (0o755, 12345, 12345));
        assert_eq!(s.plan(&req(None, None)).expect("plan").mode, 0o644);
    }

    #[test]
    fn unix_setuid_is_kept_and_go_setuid_needs_allow_suid() {
        let s = svc(|_| {});
        // upstream's test_upload_limits_err_preserve_modes: mode=4711 → -rws--x--x
        assert_eq!(s.plan(&req(Some(0o4711), None)).expect("kept").mode, 0o4711);
        assert_eq!(
            s.plan(&req(Some(GO_SETUID | 0o755), None)),
            Err("access denied: the set uid mode is forbidden".into())
        );
        let s = svc(|c| c.file_transfer.preserve_mode = false);
        assert_eq!(s.plan(&req(Some(0o4711), None)).expect("plain").mode, 0o644);
        let s = svc(|c| c.file_transfer.allow_suid = true);
        assert_eq!(
            s.plan(&req(Some(GO_SETUID | 0o755), None))
                .expect("ok")
                .mode,
            0o4755
        );
    }

    #[test]
    fn umask_has_the_upstream_meaning_and_preserve_keys_are_honoured() {
        let s = svc(|c| c.file_transfer.umask = "022".into());
        assert_eq!(s.plan(&req(Some(0o600), None)).expect("ok").mode, 0o755);
        let s = svc(|c| c.file_transfer.umask = "0202".into());
        assert_eq!(s.plan(&req(Some(0), None)).expect("ok").mode, 0o575);
        let s = svc(|c| {
            c.file_transfer.preserve_mode = false;
            c.file_transfer.preserve_owner = false;
        });
        let p = s.plan(&req(Some(0o600), Some(7))).expect("ok");
        assert_eq!((p.mode, p.uid, p.gid), (0o644, 0, 7));
        let s = svc(|c| c.file_transfer.umask = "9x".into());
        assert!(
            s.plan(&req(None, None))
                .expect_err("bad umask")
                .starts_with("failed to preserve file mode")
        );
    }

    #[test]
    fn basename_like_go() {
        assert_eq!(basename(b"/a/b.txt"), Some(&b"b.txt"[..]));
        assert_eq!(basename(b"b/"), Some(&b"b"[..]));
        assert_eq!(basename(b""), None);
        assert_eq!(basename(b"/"), None);
        assert_eq!(basename(b".."), None);
    }
}
