//! `Limits.FileTransfer` resolved once at startup (transfer.md §3): names to
//! numeric ids, the Umask parsed, the chroot opened, the rate buckets built,
//! so that a request only compares numbers from `fstat`.

use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::config::LimitsConfig;
use crate::limits::bucket::Bucket;
use crate::limits::path::{PathError, Resolver};

/// Environment knob: resolve paths with the openat walk even where openat2
/// exists (tests of the fallback on current kernels).
pub const FORCE_WALK_ENV: &str = "MENDER_CONNECT_FORCE_PATH_WALK";

/// The effective file-transfer restrictions.
#[derive(Debug)]
pub struct Policy {
    /// `Limits.Enabled`; when false nothing below restricts anything.
    pub enabled: bool,
    /// Where paths may resolve when no chroot is configured.
    resolver: Arc<Resolver>,
    /// The configured `Chroot` ("" = none), to tell "outside" from "broken".
    pub chroot: String,
    /// The chroot's resolver while its directory can be opened. Opened at
    /// startup; tried again per request while missing (it may be created
    /// later, as upstream's own tests do) or once deleted (and maybe made
    /// anew): requests are refused until it opens.
    chroot_root: Mutex<Result<Arc<Resolver>, String>>,
    /// `FollowSymLinks`, for a late open.
    follow_symlinks: bool,
    /// Force the openat walk, for a late open.
    force_walk: bool,
    /// Allowed owners of downloads (`None` = any).
    pub owner_get: Option<Vec<libc::uid_t>>,
    /// Allowed groups of downloads (`None` = any).
    pub group_get: Option<Vec<libc::gid_t>>,
    /// Owner of uploads (`OwnerPut`); `Err` = the name does not exist.
    pub owner_put: Result<Option<libc::uid_t>, String>,
    /// Group of uploads (`GroupPut`); `Err` = the name does not exist.
    pub group_put: Result<Option<libc::gid_t>, String>,
    /// `Umask` parsed as octal; `Err` = not an octal number.
    pub umask: Result<Option<u32>, String>,
    /// Largest file in either direction; 0 = unlimited.
    pub max_file_size: u64,
    /// `AllowOverwrite`.
    pub allow_overwrite: bool,
    /// `AllowSuid`.
    pub allow_suid: bool,
    /// `RegularFilesOnly`.
    pub regular_files_only: bool,
    /// `PreserveMode`.
    pub preserve_mode: bool,
    /// `PreserveOwner`.
    pub preserve_owner: bool,
    /// `PreserveGroup`.
    pub preserve_group: bool,
    /// Download budget (`MaxBytesTxPerMinute`), shared by all sessions.
    pub tx: Option<Bucket>,
    /// Upload budget (`MaxBytesRxPerMinute`), shared by all sessions.
    pub rx: Option<Bucket>,
}

impl Policy {
    /// No restrictions (`Limits.Enabled` false).
    pub fn disabled() -> Policy {
        Policy {
            enabled: false,
            resolver: Arc::new(Resolver::unrestricted()),
            chroot: String::new(),
            chroot_root: Mutex::new(Err(String::new())),
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
        let mut chroot_root = Err(String::new());
        if !ft.chroot.is_empty() {
            chroot_root = open_chroot(&ft.chroot, ft.follow_symlinks, force_walk);
            if let Err(msg) = &chroot_root {
                log::error!("file transfer: {msg}; transfers are refused until it opens");
            }
        }
        let umask = if ft.umask.is_empty() {
            Ok(None)
        } else {
            parse_octal(&ft.umask).map(Some).ok_or_else(|| {
                let msg = format!("invalid Umask {:?}: not an octal number", ft.umask);
                log::error!("file transfer: {msg}; uploads will be refused");
                msg
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
}

impl Policy {
    /// The resolver for `path`, or the reason to refuse it (without the
    /// `access denied: ` prefix) while the chroot cannot be opened.
    pub fn resolver_for(&self, path: &[u8]) -> Result<Arc<Resolver>, String> {
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
        fresh.map_err(|msg| self.broken_chroot_refusal(path, msg))
    }

    fn lock_root(&self) -> std::sync::MutexGuard<'_, Result<Arc<Resolver>, String>> {
        // only a handle is swapped under the lock: still consistent if poisoned
        self.chroot_root.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The refusal of a request while the chroot cannot be opened: a path
    /// that is not even lexically beneath it is "outside chroot" (as
    /// upstream says for it), anything else names the broken chroot.
    fn broken_chroot_refusal(&self, path: &[u8], msg: String) -> String {
        let root = self.chroot.trim_end_matches('/').as_bytes();
        let beneath = path.starts_with(root)
            && (path.len() == root.len() || path.get(root.len()) == Some(&b'/'));
        if beneath {
            msg
        } else {
            PathError::Outside.to_string()
        }
    }
}

/// The resolver for a configured (non-empty) `Chroot`, or why it cannot be
/// opened.
fn open_chroot(chroot: &str, follow: bool, force_walk: bool) -> Result<Arc<Resolver>, String> {
    Resolver::new(Some(Path::new(chroot)), follow)
        .map(|r| Arc::new(r.force_walk(force_walk)))
        .map_err(|e| format!("cannot open the chroot {chroot}: {e}"))
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

fn put_id(name: &str, lookup: fn(&str) -> Option<u32>, key: &str) -> Result<Option<u32>, String> {
    if name.is_empty() {
        return Ok(None);
    }
    lookup(name).map(Some).ok_or_else(|| {
        let msg = format!("{key} {name:?} is unknown");
        log::error!("file transfer: {msg}; uploads will be refused");
        msg
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
        assert!(broken.starts_with("cannot open the chroot"), "{broken}");
        assert_eq!(
            p.resolver_for(b"/etc/passwd").expect_err("outside"),
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
                .starts_with("cannot open the chroot")
        );
        std::fs::create_dir_all(&chroot).expect("mkdir again");
        std::fs::write(chroot.join("x"), b"new").expect("file");
        let r = p.resolver_for(&file).expect("the new directory");
        assert!(r.open(&file, libc::O_RDONLY).is_ok());
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn root_resolves_by_name() {
        assert_eq!(user_id("root"), Some(0));
        assert_eq!(group_id("root"), Some(0));
        assert_eq!(user_id("no-such-user-xyz"), None);
    }
}
