//! `Limits.FileTransfer` resolved once at startup (transfer.md §3): names to
//! numeric ids, the Umask parsed, the chroot opened, the rate buckets built,
//! so that a request only compares numbers from `fstat`. The policy owns its
//! rules: file transfer asks it (`permit_download`, `permit_upload`,
//! `permit_replace`, `plan_upload`) and never reads a setting itself.

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::config::LimitsConfig;
use crate::limits::bucket::Bucket;
use crate::limits::path::{PathError, Resolver};
use crate::sys::fs::{Stat, is_type};

/// Environment knob: resolve paths with the openat walk even where openat2
/// exists (tests of the fallback on current kernels).
pub const FORCE_WALK_ENV: &str = "MENDER_CONNECT_FORCE_PATH_WALK";

/// A problem of the configuration found at startup: logged once then, and
/// afterwards the reason of every refusal it causes (never a crash).
#[derive(Debug, Clone)]
pub enum ConfigIssue {
    /// The configured `Chroot` cannot be opened (yet, or any more).
    Chroot {
        /// The configured path.
        path: String,
        /// Why it cannot be opened.
        err: Arc<io::Error>,
    },
    /// `Umask` is not an octal number.
    Umask(String),
    /// `OwnerPut` / `GroupPut` names no user / group.
    UnknownName {
        /// The configuration key.
        key: &'static str,
        /// The configured name.
        name: String,
    },
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigIssue::Chroot { path, err } => write!(f, "cannot open the chroot {path}: {err}"),
            ConfigIssue::Umask(u) => write!(f, "invalid Umask {u:?}: not an octal number"),
            ConfigIssue::UnknownName { key, name } => write!(f, "{key} {name:?} is unknown"),
        }
    }
}

impl std::error::Error for ConfigIssue {}

/// Why a Limits rule refuses a request; the text follows `access denied: `.
#[derive(Debug, Clone)]
pub enum Denial {
    /// The path resolves outside the chroot.
    Outside,
    /// A symlink while `FollowSymLinks` is off.
    Link,
    /// `RegularFilesOnly`.
    NotRegular,
    /// `OwnerGet` / `OwnerPut`.
    Owner,
    /// `GroupGet` / `GroupPut`.
    Group,
    /// `MaxFileSize`.
    TooLarge,
    /// `AllowOverwrite` off and the target exists.
    Overwrite,
    /// The Go setuid bit without `AllowSuid`.
    Setuid,
    /// The chroot cannot be opened.
    Chroot(ConfigIssue),
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Denial::Outside => "the target file path is outside chroot",
            Denial::Link => "forbidden to follow the link",
            Denial::NotRegular => "only regular files are allowed",
            Denial::Owner => "the file owner does not match",
            Denial::Group => "the file group does not match",
            Denial::TooLarge => "the file size is over the limit",
            Denial::Overwrite => "forbidden to overwrite the file",
            Denial::Setuid => "the set uid mode is forbidden",
            Denial::Chroot(issue) => return issue.fmt(f),
        })
    }
}

impl std::error::Error for Denial {}

impl Denial {
    /// The denial behind a path refusal; the OS error when it is none.
    pub fn from_path(e: PathError) -> Result<Denial, io::Error> {
        match e {
            PathError::Outside => Ok(Denial::Outside),
            PathError::Link => Ok(Denial::Link),
            PathError::Os(e) => Err(e),
        }
    }
}

/// What an upload asks for (from its `put_file`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Wanted {
    /// Unix permission bits, maybe with the Unix setuid bit (04000).
    pub mode: Option<u32>,
    /// Whether the Go FileMode setuid bit was set (what mender-cli sends).
    pub go_setuid: bool,
    /// Requested owner.
    pub uid: Option<u32>,
    /// Requested group.
    pub gid: Option<u32>,
}

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

/// Why no [`Plan`] could be made for an upload.
#[derive(Debug, Clone)]
pub enum PlanError {
    /// A rule forbids what was asked.
    Denied(Denial),
    /// `Umask` is broken.
    Mode(ConfigIssue),
    /// `OwnerPut` / `GroupPut` is broken.
    Owner(ConfigIssue),
}

/// The effective file-transfer restrictions.
#[derive(Debug)]
pub struct Policy {
    /// `Limits.Enabled`; when false nothing below restricts anything.
    enabled: bool,
    /// Where paths may resolve when no chroot is configured.
    resolver: Arc<Resolver>,
    /// The configured `Chroot` ("" = none), to tell "outside" from "broken".
    chroot: String,
    /// The chroot's resolver while its directory can be opened. Opened at
    /// startup; tried again per request while missing (it may be created
    /// later, as upstream's own tests do) or once deleted (and maybe made
    /// anew): requests are refused until it opens.
    chroot_root: Mutex<Result<Arc<Resolver>, ConfigIssue>>,
    /// `FollowSymLinks`, for a late open.
    follow_symlinks: bool,
    /// Force the openat walk, for a late open.
    force_walk: bool,
    /// Allowed owners of downloads (`None` = any).
    owner_get: Option<Vec<libc::uid_t>>,
    /// Allowed groups of downloads (`None` = any).
    group_get: Option<Vec<libc::gid_t>>,
    /// Owner of uploads (`OwnerPut`); `Err` = the name does not exist.
    owner_put: Result<Option<libc::uid_t>, ConfigIssue>,
    /// Group of uploads (`GroupPut`); `Err` = the name does not exist.
    group_put: Result<Option<libc::gid_t>, ConfigIssue>,
    /// `Umask` parsed as octal; `Err` = not an octal number.
    umask: Result<Option<u32>, ConfigIssue>,
    /// Largest file in either direction; 0 = unlimited.
    max_file_size: u64,
    /// `AllowOverwrite`.
    allow_overwrite: bool,
    /// `AllowSuid`.
    allow_suid: bool,
    /// `RegularFilesOnly`.
    regular_files_only: bool,
    /// `PreserveMode`.
    preserve_mode: bool,
    /// `PreserveOwner`.
    preserve_owner: bool,
    /// `PreserveGroup`.
    preserve_group: bool,
    /// Download budget (`MaxBytesTxPerMinute`), shared by all sessions.
    tx: Option<Bucket>,
    /// Upload budget (`MaxBytesRxPerMinute`), shared by all sessions.
    rx: Option<Bucket>,
}

/// Placeholder of `chroot_root` where no chroot is configured (never read).
fn no_chroot() -> ConfigIssue {
    ConfigIssue::Chroot {
        path: String::new(),
        err: Arc::new(io::Error::from_raw_os_error(libc::ENOENT)),
    }
}

impl Policy {
    /// No restrictions (`Limits.Enabled` false).
    pub fn disabled() -> Policy {
        Policy {
            enabled: false,
            resolver: Arc::new(Resolver::unrestricted()),
            chroot: String::new(),
            chroot_root: Mutex::new(Err(no_chroot())),
            follow_symlinks: true,
            force_walk: false,
            owner_get: None,
            group_get: None,
            owner_put: Ok(None),
            group_put: Ok(None),
            umask: Ok(None),
            max_file_size: 0,
            allow_overwrite: true,
            allow_suid: false,
            regular_files_only: false,
            preserve_mode: true,
            preserve_owner: true,
            preserve_group: true,
            tx: None,
            rx: None,
        }
    }

    /// Builds the policy, logging every problem once (they then surface as
    /// refusals, never as a crash).
    pub fn from_config(cfg: &LimitsConfig, force_walk: bool) -> Policy {
        if !cfg.enabled {
            return Policy::disabled();
        }
        let ft = &cfg.file_transfer;
        let resolver = Arc::new(Resolver::unconfined(ft.follow_symlinks).force_walk(force_walk));
        // unused without a chroot (resolver_for takes `resolver` then)
        let mut chroot_root = Err(no_chroot());
        if !ft.chroot.is_empty() {
            chroot_root = open_chroot(&ft.chroot, ft.follow_symlinks, force_walk);
            if let Err(issue) = &chroot_root {
                log::error!("file transfer: {issue}; transfers are refused until it opens");
            }
        }
        let umask = if ft.umask.is_empty() {
            Ok(None)
        } else {
            parse_octal(&ft.umask).map(Some).ok_or_else(|| {
                let issue = ConfigIssue::Umask(ft.umask.clone());
                log::error!("file transfer: {issue}; uploads will be refused");
                issue
            })
        };
        if let Ok(Some(u)) = umask {
            log::info!(
                "file transfer: Umask {:03o} gives uploads mode {:03o} (upstream meaning)",
                u,
                0o777 & !u
            );
        }
        let c = ft.counters;
        Policy {
            enabled: true,
            resolver,
            chroot: ft.chroot.clone(),
            chroot_root: Mutex::new(chroot_root),
            follow_symlinks: ft.follow_symlinks,
            force_walk,
            owner_get: id_list(&ft.owner_get, user_id, "OwnerGet"),
            group_get: id_list(&ft.group_get, group_id, "GroupGet"),
            owner_put: put_id(&ft.owner_put, user_id, "OwnerPut"),
            group_put: put_id(&ft.group_put, group_id, "GroupPut"),
            umask,
            max_file_size: ft.max_file_size,
            allow_overwrite: ft.allow_overwrite,
            allow_suid: ft.allow_suid,
            regular_files_only: ft.regular_files_only,
            preserve_mode: ft.preserve_mode,
            preserve_owner: ft.preserve_owner,
            preserve_group: ft.preserve_group,
            tx: Bucket::per_minute(c.max_bytes_tx_per_minute),
            rx: Bucket::per_minute(c.max_bytes_rx_per_minute),
        }
    }

    /// The download budget (`MaxBytesTxPerMinute`), if limited.
    pub fn tx(&self) -> Option<&Bucket> {
        self.tx.as_ref()
    }

    /// The upload budget (`MaxBytesRxPerMinute`), if limited.
    pub fn rx(&self) -> Option<&Bucket> {
        self.rx.as_ref()
    }

    /// `MaxFileSize` in either direction; 0 = unlimited (and when disabled).
    pub fn max_file_size(&self) -> u64 {
        self.max_file_size
    }

    /// Whether a download of the file behind `st` (fstat of the opened
    /// descriptor) is allowed: type, owner, group and size.
    pub fn permit_download(&self, st: &Stat) -> Result<(), Denial> {
        if !self.enabled {
            return Ok(());
        }
        if self.regular_files_only && !is_type(st, libc::S_IFREG) {
            return Err(Denial::NotRegular);
        }
        if self
            .owner_get
            .as_ref()
            .is_some_and(|ids| !ids.contains(&st.st_uid))
        {
            return Err(Denial::Owner);
        }
        if self
            .group_get
            .as_ref()
            .is_some_and(|ids| !ids.contains(&st.st_gid))
        {
            return Err(Denial::Group);
        }
        // off_t is i32 on armel
        #[allow(clippy::unnecessary_cast)]
        let size = st.st_size as i64;
        if self.max_file_size > 0 && size > 0 && size as u64 > self.max_file_size {
            return Err(Denial::TooLarge);
        }
        Ok(())
    }

    /// Whether an upload announcing `size` bytes may start (`MaxFileSize`).
    pub fn permit_upload(&self, size: Option<i64>) -> Result<(), Denial> {
        let over = size.is_some_and(|s| s > 0 && s as u64 > self.max_file_size);
        if self.enabled && self.max_file_size > 0 && over {
            return Err(Denial::TooLarge);
        }
        Ok(())
    }

    /// Whether an upload may replace the regular file behind `existing`
    /// (`AllowOverwrite`, `OwnerPut`, `GroupPut`).
    pub fn permit_replace(&self, existing: &Stat) -> Result<(), Denial> {
        if !self.enabled {
            return Ok(());
        }
        if !self.allow_overwrite {
            return Err(Denial::Overwrite);
        }
        if matches!(self.owner_put, Ok(Some(u)) if u != existing.st_uid) {
            return Err(Denial::Owner);
        }
        if matches!(self.group_put, Ok(Some(g)) if g != existing.st_gid) {
            return Err(Denial::Group);
        }
        Ok(())
    }

    /// Mode and owner of an upload per the limits (transfer.md §2.5 with its
    /// errata); `daemon` is the daemon's own (uid, gid). The Unix setuid bit
    /// (04000) is kept under PreserveMode as upstream keeps it; the Go
    /// FileMode setuid bit (what mender-cli sends) is refused unless
    /// AllowSuid.
    pub fn plan_upload(&self, want: Wanted, daemon: (u32, u32)) -> Result<Plan, PlanError> {
        let requested = want.mode.unwrap_or(0o644);
        if !self.enabled {
            return Ok(Plan {
                mode: requested & 0o777,
                uid: want.uid.unwrap_or(daemon.0),
                gid: want.gid.unwrap_or(daemon.1),
                no_replace: false,
            });
        }
        if want.go_setuid && !self.allow_suid {
            return Err(PlanError::Denied(Denial::Setuid));
        }
        let wants_suid = want.go_setuid || requested & 0o4000 != 0;
        let umask = self.umask.clone().map_err(PlanError::Mode)?;
        let mut mode = if self.preserve_mode {
            requested & 0o777
        } else {
            0o644
        };
        if let Some(u) = umask {
            // Upstream meaning: the Umask replaces the requested bits.
            mode = 0o777 & !u;
        }
        if wants_suid && self.preserve_mode {
            mode |= 0o4000;
        }
        let uid = match self.owner_put.clone().map_err(PlanError::Owner)? {
            Some(u) => u,
            None if self.preserve_owner => want.uid.unwrap_or(daemon.0),
            None => daemon.0,
        };
        let gid = match self.group_put.clone().map_err(PlanError::Owner)? {
            Some(g) => g,
            None if self.preserve_group => want.gid.unwrap_or(daemon.1),
            None => daemon.1,
        };
        Ok(Plan {
            mode,
            uid,
            gid,
            no_replace: !self.allow_overwrite,
        })
    }
}

impl Policy {
    /// The resolver for `path`, or the denial while the chroot cannot be
    /// opened.
    pub fn resolver_for(&self, path: &[u8]) -> Result<Arc<Resolver>, Denial> {
        if self.chroot.is_empty() {
            return Ok(Arc::clone(&self.resolver));
        }
        let current = self.lock_root().clone();
        if let Ok(r) = &current
            && !r.root_deleted()
        {
            return Ok(Arc::clone(r));
        }
        // opened outside the lock: a slow file system must not hold up others
        let fresh = open_chroot(&self.chroot, self.follow_symlinks, self.force_walk);
        match (&current, &fresh) {
            (Err(_), Ok(_)) => log::info!("file transfer: the chroot {} opens now", self.chroot),
            (Ok(_), Ok(_)) => log::info!(
                "file transfer: the chroot {} was deleted; using the directory now at that path",
                self.chroot
            ),
            (Ok(_), Err(e)) => log::error!("file transfer: the chroot was deleted and {e}"),
            (Err(_), Err(_)) => {}
        }
        *self.lock_root() = fresh.clone();
        fresh.map_err(|issue| self.broken_chroot_refusal(path, issue))
    }

    fn lock_root(&self) -> std::sync::MutexGuard<'_, Result<Arc<Resolver>, ConfigIssue>> {
        // only a handle is swapped under the lock: still consistent if poisoned
        self.chroot_root.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The refusal of a request while the chroot cannot be opened: a path
    /// that is not even lexically beneath it is "outside chroot" (as
    /// upstream says for it), anything else names the broken chroot.
    fn broken_chroot_refusal(&self, path: &[u8], issue: ConfigIssue) -> Denial {
        let root = self.chroot.trim_end_matches('/').as_bytes();
        let beneath = path.starts_with(root)
            && (path.len() == root.len() || path.get(root.len()) == Some(&b'/'));
        if beneath {
            Denial::Chroot(issue)
        } else {
            Denial::Outside
        }
    }
}

/// The resolver for a configured (non-empty) `Chroot`, or why it cannot be
/// opened.
fn open_chroot(chroot: &str, follow: bool, force_walk: bool) -> Result<Arc<Resolver>, ConfigIssue> {
    Resolver::new(Some(Path::new(chroot)), follow)
        .map(|r| Arc::new(r.force_walk(force_walk)))
        .map_err(|e| ConfigIssue::Chroot {
            path: chroot.to_string(),
            err: Arc::new(e),
        })
}

/// Octal digits with an optional leading 0 (no `0o` prefix), as upstream.
fn parse_octal(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return None;
    }
    u32::from_str_radix(s, 8).ok().filter(|v| *v <= 0o7777)
}

fn id_list(names: &[String], lookup: fn(&str) -> Option<u32>, key: &str) -> Option<Vec<u32>> {
    if names.is_empty() {
        return None;
    }
    let ids = names
        .iter()
        .filter_map(|n| {
            let id = lookup(n);
            if id.is_none() {
                log::warn!("file transfer: {key} name {n:?} is unknown and never matches");
            }
            id
        })
        .collect();
    Some(ids)
}

fn put_id(
    name: &str,
    lookup: fn(&str) -> Option<u32>,
    key: &'static str,
) -> Result<Option<u32>, ConfigIssue> {
    if name.is_empty() {
        return Ok(None);
    }
    lookup(name).map(Some).ok_or_else(|| {
        let issue = ConfigIssue::UnknownName {
            key,
            name: name.to_string(),
        };
        log::error!("file transfer: {issue}; uploads will be refused");
        issue
    })
}

/// The uid of a passwd name (`None` also when the lookup fails).
pub fn user_id(name: &str) -> Option<libc::uid_t> {
    crate::sys::passwd::user_by_name(name)
        .ok()
        .flatten()
        .map(|p| p.uid)
}

/// The gid of a group name (`None` also when the lookup fails).
pub fn group_id(name: &str) -> Option<libc::gid_t> {
    crate::sys::passwd::group_by_name(name).ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn umask_is_octal_only() {
        assert_eq!(parse_octal("022"), Some(0o22));
        assert_eq!(parse_octal("0202"), Some(0o202));
        assert_eq!(parse_octal("9x"), None);
        assert_eq!(parse_octal("0o22"), None);
    }

    #[test]
    fn a_missing_chroot_refuses_until_it_appears_and_says_outside_for_paths_beyond_it() {
        let base = std::env::temp_dir().join(format!("mc-late-chroot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let chroot = base.join("ft");
        let mut cfg = crate::config::Config::default().limits;
        cfg.enabled = true;
        cfg.file_transfer.chroot = chroot.display().to_string();
        let p = Policy::from_config(&cfg, false);
        let inside = format!("{}/x", chroot.display()).into_bytes();
        let broken = p.resolver_for(&inside).expect_err("no chroot yet");
        assert!(matches!(broken, Denial::Chroot(_)), "{broken:?}");
        assert!(
            broken.to_string().starts_with(&format!(
                "cannot open the chroot {}: No such file or directory (os error 2)",
                chroot.display()
            )),
            "{broken}"
        );
        assert_eq!(
            p.resolver_for(b"/etc/passwd")
                .expect_err("outside")
                .to_string(),
            "the target file path is outside chroot"
        );
        std::fs::create_dir_all(&chroot).expect("mkdir");
        let r = p.resolver_for(&inside).expect("opens now");
        assert!(r.has_chroot());
        assert!(matches!(
            r.open(b"/etc/passwd", libc::O_PATH),
            Err(PathError::Outside)
        ));
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn a_chroot_deleted_and_made_anew_is_followed_to_the_new_directory() {
        let base = std::env::temp_dir().join(format!("mc-new-chroot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let chroot = base.join("ft");
        std::fs::create_dir_all(&chroot).expect("mkdir");
        let mut cfg = crate::config::Config::default().limits;
        cfg.enabled = true;
        cfg.file_transfer.chroot = chroot.display().to_string();
        let p = Policy::from_config(&cfg, false);
        let file = format!("{}/x", chroot.display()).into_bytes();
        assert!(p.resolver_for(&file).expect("open").has_chroot());
        // rm -rf and mkdir again, as test set-ups and admins do: files put
        // beneath the deleted directory would be lost with it
        std::fs::remove_dir_all(&chroot).expect("rm");
        assert!(
            p.resolver_for(&file)
                .expect_err("gone")
                .to_string()
                .starts_with("cannot open the chroot")
        );
        std::fs::create_dir_all(&chroot).expect("mkdir again");
        std::fs::write(chroot.join("x"), b"new").expect("file");
        let r = p.resolver_for(&file).expect("the new directory");
        assert!(r.open(&file, libc::O_RDONLY).is_ok());
        let _ = std::fs::remove_dir_all(&base);
    }

    /// Go's setuid bit in a FileMode (as file transfer's wire decodes it).
    const GO_SETUID: u32 = 1 << 23;

    fn policy(edit: impl FnOnce(&mut crate::config::LimitsConfig)) -> Policy {
        let mut cfg = crate::config::Config::default().limits;
        cfg.enabled = true;
        edit(&mut cfg);
        Policy::from_config(&cfg, false)
    }

    fn want(mode: Option<u32>, uid: Option<u32>) -> Wanted {
        Wanted {
            mode: mode.map(|m| m & !GO_SETUID),
            go_setuid: mode.is_some_and(|m| m & GO_SETUID != 0),
            uid,
            gid: uid,
        }
    }

    fn file(mode: u32, uid: u32, gid: u32, size: i64) -> Stat {
        let mut st = crate::sys::fs::zeroed_stat();
        st.st_mode = mode;
        st.st_uid = uid;
        st.st_gid = gid;
        st.st_size = size as _;
        st
    }

    #[test]
    fn limits_off_drops_special_bits_and_keeps_the_request() {
        let p = Policy::disabled();
        let plan = p
            .plan_upload(want(Some(0o4755), Some(12345)), (0, 0))
            .expect("plan");
        assert_eq!((plan.mode, plan.uid, plan.gid), (0o755, 12345, 12345));
        let plan = p.plan_upload(want(None, None), (7, 8)).expect("plan");
        assert_eq!((plan.mode, plan.uid, plan.gid), (0o644, 7, 8));
        assert!(!plan.no_replace);
    }

    #[test]
    fn unix_setuid_is_kept_and_go_setuid_needs_allow_suid() {
        let p = policy(|_| {});
        // upstream's test_upload_limits_err_preserve_modes: mode=4711 → -rws--x--x
        let plan = p.plan_upload(want(Some(0o4711), None), (0, 0));
        assert_eq!(plan.expect("kept").mode, 0o4711);
        let refused = p.plan_upload(want(Some(GO_SETUID | 0o755), None), (0, 0));
        assert!(
            matches!(refused, Err(PlanError::Denied(Denial::Setuid))),
            "{refused:?}"
        );
        let p = policy(|c| c.file_transfer.preserve_mode = false);
        let plan = p.plan_upload(want(Some(0o4711), None), (0, 0));
        assert_eq!(plan.expect("plain").mode, 0o644);
        let p = policy(|c| c.file_transfer.allow_suid = true);
        let plan = p.plan_upload(want(Some(GO_SETUID | 0o755), None), (0, 0));
        assert_eq!(plan.expect("ok").mode, 0o4755);
    }

    #[test]
    fn umask_has_the_upstream_meaning_and_preserve_keys_are_honoured() {
        let p = policy(|c| c.file_transfer.umask = "022".into());
        let plan = p.plan_upload(want(Some(0o600), None), (0, 0));
        assert_eq!(plan.expect("ok").mode, 0o755);
        let p = policy(|c| c.file_transfer.umask = "0202".into());
        assert_eq!(
            p.plan_upload(want(Some(0), None), (0, 0)).expect("ok").mode,
            0o575
        );
        let p = policy(|c| {
            c.file_transfer.preserve_mode = false;
            c.file_transfer.preserve_owner = false;
        });
        let plan = p
            .plan_upload(want(Some(0o600), Some(7)), (0, 0))
            .expect("ok");
        assert_eq!((plan.mode, plan.uid, plan.gid), (0o644, 0, 7));
        let p = policy(|c| c.file_transfer.umask = "9x".into());
        let bad = p.plan_upload(want(None, None), (0, 0));
        assert!(
            matches!(&bad, Err(PlanError::Mode(ConfigIssue::Umask(u))) if u == "9x"),
            "{bad:?}"
        );
    }

    #[test]
    fn owner_and_group_put_decide_the_owner_and_guard_replacing() {
        let p = policy(|c| {
            c.file_transfer.owner_put = "root".into();
            c.file_transfer.group_put = "root".into();
            c.file_transfer.allow_overwrite = true;
        });
        let plan = p.plan_upload(want(None, Some(99)), (5, 5)).expect("plan");
        assert_eq!((plan.uid, plan.gid), (0, 0));
        assert!(p.permit_replace(&file(libc::S_IFREG, 0, 0, 1)).is_ok());
        assert!(matches!(
            p.permit_replace(&file(libc::S_IFREG, 1, 0, 1)),
            Err(Denial::Owner)
        ));
        assert!(matches!(
            p.permit_replace(&file(libc::S_IFREG, 0, 1, 1)),
            Err(Denial::Group)
        ));
        let p = policy(|c| c.file_transfer.owner_put = "no-such-user-xyz".into());
        let bad = p.plan_upload(want(None, None), (0, 0));
        assert!(matches!(bad, Err(PlanError::Owner(_))), "{bad:?}");
        let p = policy(|c| c.file_transfer.allow_overwrite = false);
        assert!(matches!(
            p.permit_replace(&file(libc::S_IFREG, 0, 0, 1)),
            Err(Denial::Overwrite)
        ));
        assert!(
            p.plan_upload(want(None, None), (0, 0))
                .expect("plan")
                .no_replace
        );
    }

    #[test]
    fn downloads_are_checked_for_type_owner_group_and_size() {
        let p = policy(|c| {
            c.file_transfer.regular_files_only = true;
            c.file_transfer.owner_get = vec!["root".into()];
            c.file_transfer.group_get = vec!["root".into(), "no-such-group-xyz".into()];
            c.file_transfer.max_file_size = 10;
        });
        assert!(p.permit_download(&file(libc::S_IFREG, 0, 0, 10)).is_ok());
        let refused = |st: Stat| p.permit_download(&st).expect_err("refused").to_string();
        assert_eq!(
            refused(file(libc::S_IFDIR, 0, 0, 1)),
            "only regular files are allowed"
        );
        assert_eq!(
            refused(file(libc::S_IFREG, 1, 0, 1)),
            "the file owner does not match"
        );
        assert_eq!(
            refused(file(libc::S_IFREG, 0, 1, 1)),
            "the file group does not match"
        );
        assert_eq!(
            refused(file(libc::S_IFREG, 0, 0, 11)),
            "the file size is over the limit"
        );
        // limits off: nothing is refused
        let off = Policy::disabled();
        assert!(
            off.permit_download(&file(libc::S_IFDIR, 9, 9, 1 << 40))
                .is_ok()
        );
    }

    #[test]
    fn an_announced_size_over_the_limit_refuses_the_upload() {
        let p = policy(|c| c.file_transfer.max_file_size = 10);
        assert!(p.permit_upload(Some(10)).is_ok());
        assert!(p.permit_upload(None).is_ok());
        assert!(p.permit_upload(Some(-1)).is_ok());
        assert!(matches!(p.permit_upload(Some(11)), Err(Denial::TooLarge)));
        assert!(policy(|_| {}).permit_upload(Some(1 << 40)).is_ok());
        assert!(Policy::disabled().permit_upload(Some(1 << 40)).is_ok());
    }

    #[test]
    fn config_issues_keep_their_log_and_reply_texts() {
        let chroot = ConfigIssue::Chroot {
            path: "/x".into(),
            err: Arc::new(io::Error::from_raw_os_error(libc::ENOENT)),
        };
        assert_eq!(
            chroot.to_string(),
            "cannot open the chroot /x: No such file or directory (os error 2)"
        );
        assert_eq!(
            ConfigIssue::UnknownName {
                key: "GroupPut",
                name: "g".into()
            }
            .to_string(),
            "GroupPut \"g\" is unknown"
        );
        assert_eq!(
            Denial::Chroot(chroot).to_string(),
            "cannot open the chroot /x: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn root_resolves_by_name() {
        assert_eq!(user_id("root"), Some(0));
        assert_eq!(group_id("root"), Some(0));
        assert_eq!(user_id("no-such-user-xyz"), None);
    }
}
