//! Path containment on file descriptors (transfer.md §3.2): paths are
//! resolved beneath an open chroot directory with `openat2(RESOLVE_BENEATH)`,
//! or by a component-by-component `openat(O_NOFOLLOW)` walk on kernels
//! without openat2, so `..` and symlinks cannot leave the chroot and nothing
//! checked on a path can be swapped before it is opened.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::sys::errno::go_text;
use crate::sys::fs::{fstat, is_type, openat, openat2, readlinkat};

/// Symlinks followed in one resolution before giving up (the kernel's limit).
const MAX_LINKS: usize = 40;

/// Set once openat2 reported ENOSYS; every later call walks instead.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// Why a path was refused.
#[derive(Debug)]
pub enum PathError {
    /// Not beneath the chroot (lexically, by `..`, or through a symlink).
    Outside,
    /// A symlink (or a non-canonical spelling) where links are forbidden.
    Link,
    /// The operating system's error while resolving or opening.
    Os(io::Error),
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathError::Outside => f.write_str("the target file path is outside chroot"),
            PathError::Link => f.write_str("forbidden to follow the link"),
            PathError::Os(e) => f.write_str(&go_text(e)),
        }
    }
}

impl std::error::Error for PathError {}

struct Root {
    fd: OwnedFd,
    /// The configured spelling and the canonical one, without trailing '/'.
    prefixes: Vec<Vec<u8>>,
}

/// Resolves request paths under the configured containment.
pub struct Resolver {
    root: Option<Root>,
    follow: bool,
    force_walk: bool,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolver")
            .field(
                "chroot",
                &self
                    .root
                    .as_ref()
                    .map(|r| String::from_utf8_lossy(&r.prefixes[0]).into_owned()),
            )
            .field("follow", &self.follow)
            .finish()
    }
}

impl Resolver {
    /// No containment: any path, symlinks followed (limits disabled).
    pub fn unrestricted() -> Resolver {
        Resolver::unconfined(true)
    }

    /// No chroot, following symlinks only when `follow`.
    pub fn unconfined(follow: bool) -> Resolver {
        Resolver {
            root: None,
            follow,
            force_walk: false,
        }
    }

    /// Containment beneath `chroot` (if any), following symlinks only when
    /// `follow`. The chroot is opened now, so later renames of its path do
    /// not move the boundary.
    pub fn new(chroot: Option<&Path>, follow: bool) -> io::Result<Resolver> {
        let root = match chroot {
            None => None,
            Some(dir) => {
                let canonical = std::fs::canonicalize(dir)?;
                let fd = openat(
                    libc::AT_FDCWD,
                    canonical.as_os_str().as_bytes(),
                    libc::O_PATH | libc::O_DIRECTORY,
                    0,
                )?;
                let trim = |p: &[u8]| {
                    let mut v = p.to_vec();
                    while v.last() == Some(&b'/') {
                        v.pop();
                    }
                    v
                };
                let canon = trim(canonical.as_os_str().as_bytes());
                if canon.is_empty() {
                    // Chroot "/" confines nothing; plain resolution keeps "/.." = "/".
                    None
                } else {
                    let mut prefixes = vec![canon];
                    let configured = trim(dir.as_os_str().as_bytes());
                    if configured.starts_with(b"/") && !prefixes.contains(&configured) {
                        prefixes.push(configured);
                    }
                    Some(Root { fd, prefixes })
                }
            }
        };
        Ok(Resolver {
            root,
            follow,
            force_walk: false,
        })
    }

    /// Always use the openat walk (kernels without openat2; tests).
    pub fn force_walk(mut self, on: bool) -> Resolver {
        self.force_walk = on;
        self
    }

    /// Whether a chroot applies.
    #[cfg(test)]
    pub fn has_chroot(&self) -> bool {
        self.root.is_some()
    }

    /// Whether the chroot directory this resolver holds was deleted (a
    /// directory of that name may have been made anew: files put beneath
    /// the old one would be lost with it).
    pub fn root_deleted(&self) -> bool {
        self.root
            .as_ref()
            .is_some_and(|r| fstat(r.fd.as_fd()).is_ok_and(|st| st.st_nlink == 0))
    }

    /// Opens `path` with `flags` (O_CLOEXEC is added) under the containment.
    pub fn open(&self, path: &[u8], flags: libc::c_int) -> Result<OwnedFd, PathError> {
        let rel = self.check(path)?;
        self.open_checked(path, &rel, flags)
    }

    /// Opens the directory that holds `path`'s last component (as an O_PATH
    /// descriptor) and returns it with that component. A path without a
    /// plain last component (`/`, `x/..`, `x/.`) is `EISDIR`.
    pub fn open_parent(&self, path: &[u8]) -> Result<(OwnedFd, Vec<u8>), PathError> {
        self.check(path)?;
        let cut = path.iter().rposition(|&b| b == b'/');
        let (parent, leaf) = match cut {
            Some(0) => (&b"/"[..], &path[1..]),
            Some(i) => (&path[..i], &path[i + 1..]),
            None => (&b"."[..], path),
        };
        if leaf.is_empty() || leaf == b"." || leaf == b".." {
            return Err(PathError::Os(io::Error::from_raw_os_error(libc::EISDIR)));
        }
        let rel = self.check(parent)?;
        let dir = self.open_checked(parent, &rel, libc::O_PATH | libc::O_DIRECTORY)?;
        Ok((dir, leaf.to_vec()))
    }

    /// Lexical checks; returns the path relative to the chroot (or the path
    /// itself without one).
    fn check(&self, path: &[u8]) -> Result<Vec<u8>, PathError> {
        if path.contains(&0) {
            return Err(PathError::Os(io::Error::from_raw_os_error(libc::EINVAL)));
        }
        let rel = match &self.root {
            None => path.to_vec(),
            Some(root) => {
                let mut found = None;
                for p in &root.prefixes {
                    if path == p.as_slice() {
                        found = Some(Vec::new());
                    } else if path.len() > p.len() && path.starts_with(p) && path[p.len()] == b'/' {
                        // `<chroot>//x` is `<chroot>/x`: the rest must not
                        // keep a leading '/', or the walk would start at the
                        // real root (found by the `chroot` fuzz target)
                        let rest = &path[p.len()..];
                        let start = rest.iter().position(|&b| b != b'/').unwrap_or(rest.len());
                        found = Some(rest[start..].to_vec());
                    }
                    if found.is_some() {
                        break;
                    }
                }
                found.ok_or(PathError::Outside)?
            }
        };
        if !self.follow && !canonical_spelling(path) {
            // Upstream refuses any path whose resolution differs from its
            // spelling; lexically that is `.`, `..`, `//` and a trailing '/'.
            return Err(PathError::Link);
        }
        Ok(rel)
    }

    fn open_checked(
        &self,
        path: &[u8],
        rel: &[u8],
        flags: libc::c_int,
    ) -> Result<OwnedFd, PathError> {
        let (dir, rel): (RawFd, &[u8]) = match &self.root {
            Some(root) => (root.fd.as_raw_fd(), if rel.is_empty() { b"." } else { rel }),
            None => (libc::AT_FDCWD, path),
        };
        // No O_NOFOLLOW here: with O_PATH it would open a final symlink
        // itself; RESOLVE_NO_SYMLINKS and the walk refuse links instead.
        if !self.force_walk && !NO_OPENAT2.load(Ordering::Relaxed) {
            let mut resolve = libc::RESOLVE_NO_MAGICLINKS;
            if self.root.is_some() {
                resolve |= libc::RESOLVE_BENEATH;
            }
            if !self.follow {
                resolve |= libc::RESOLVE_NO_SYMLINKS;
            }
            match openat2(dir, rel, flags, resolve) {
                Ok(fd) => return Ok(fd),
                Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                    log::info!("openat2 unavailable; resolving paths component by component");
                    NO_OPENAT2.store(true, Ordering::Relaxed);
                }
                Err(e) => return Err(self.map_err(e)),
            }
        }
        self.walk(dir, rel, flags).map_err(|e| match e {
            PathError::Os(e) => self.map_err(e),
            other => other,
        })
    }

    fn map_err(&self, e: io::Error) -> PathError {
        match e.raw_os_error() {
            Some(libc::EXDEV) if self.root.is_some() => PathError::Outside,
            Some(libc::ELOOP) if !self.follow => PathError::Link,
            _ => PathError::Os(e),
        }
    }

    /// The openat2 fallback: one `openat(O_PATH|O_NOFOLLOW)` per component,
    /// symlinks expanded by hand (only when allowed), `..` tracked on a stack
    /// of directory descriptors so it can never climb above the start.
    fn walk(&self, dir: RawFd, rel: &[u8], flags: libc::c_int) -> Result<OwnedFd, PathError> {
        // Beneath a chroot nothing is absolute: `rel` is relative to it.
        let mut absolute = self.root.is_none() && rel.starts_with(b"/");
        let start = |abs: bool| {
            if abs {
                openat(libc::AT_FDCWD, b"/", libc::O_PATH | libc::O_DIRECTORY, 0)
            } else {
                openat(dir, b".", libc::O_PATH | libc::O_DIRECTORY, 0)
            }
        };
        let mut stack = vec![start(absolute).map_err(PathError::Os)?];
        let mut queue: VecDeque<Vec<u8>> = components(rel);
        let mut links = 0usize;
        let mut retries = 0usize;
        while let Some(name) = queue.pop_front() {
            if name == b".." {
                if stack.len() > 1 {
                    stack.pop();
                } else if self.root.is_some() || !absolute {
                    return Err(PathError::Outside);
                }
                // "/.." is "/" without a chroot.
                continue;
            }
            let cur = stack.last().map_or(libc::AT_FDCWD, |f| f.as_raw_fd());
            let fd =
                openat(cur, &name, libc::O_PATH | libc::O_NOFOLLOW, 0).map_err(PathError::Os)?;
            let st = fstat(fd.as_fd()).map_err(PathError::Os)?;
            if is_type(&st, libc::S_IFLNK) {
                if !self.follow {
                    return Err(PathError::Link);
                }
                links += 1;
                if links > MAX_LINKS {
                    return Err(PathError::Os(io::Error::from_raw_os_error(libc::ELOOP)));
                }
                // Whatever the link says now is resolved by this same walk, so
                // a concurrent swap cannot lead outside.
                let target = readlinkat(fd.as_raw_fd(), b"").map_err(PathError::Os)?;
                if target.starts_with(b"/") {
                    if self.root.is_some() {
                        return Err(PathError::Outside);
                    }
                    stack.truncate(1);
                    stack[0] = start(true).map_err(PathError::Os)?;
                    // from here on ".." at the top stays at "/", as openat2 does
                    absolute = true;
                }
                for c in components(&target).into_iter().rev() {
                    queue.push_front(c);
                }
                continue;
            }
            if queue.is_empty() {
                if flags & libc::O_PATH != 0 {
                    if flags & libc::O_DIRECTORY != 0 && !is_type(&st, libc::S_IFDIR) {
                        return Err(PathError::Os(io::Error::from_raw_os_error(libc::ENOTDIR)));
                    }
                    return Ok(fd);
                }
                match openat(cur, &name, flags | libc::O_NOFOLLOW, 0) {
                    Ok(f) => return Ok(f),
                    // Swapped for a symlink since the O_PATH open: look again.
                    Err(e) if e.raw_os_error() == Some(libc::ELOOP) && retries < 8 => {
                        retries += 1;
                        queue.push_front(name);
                        continue;
                    }
                    Err(e) => return Err(PathError::Os(e)),
                }
            }
            if !is_type(&st, libc::S_IFDIR) {
                return Err(PathError::Os(io::Error::from_raw_os_error(libc::ENOTDIR)));
            }
            stack.push(fd);
        }
        // The path ended on a directory reached through "." / ".." / a link.
        let cur = stack.last().map_or(libc::AT_FDCWD, |f| f.as_raw_fd());
        openat(cur, b".", flags & !libc::O_NOFOLLOW, 0).map_err(PathError::Os)
    }
}

/// Non-empty components other than ".", in order.
fn components(p: &[u8]) -> VecDeque<Vec<u8>> {
    p.split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .map(<[u8]>::to_vec)
        .collect()
}

/// True when `path` has no `.`/`..`/empty components and no trailing '/'
/// (so resolving it cannot change its spelling, symlinks aside).
fn canonical_spelling(path: &[u8]) -> bool {
    if path == b"/" {
        return true;
    }
    let body = path.strip_prefix(b"/").unwrap_or(path);
    !body.is_empty()
        && body
            .split(|&b| b == b'/')
            .all(|c| !c.is_empty() && c != b"." && c != b"..")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::path::PathBuf;

    struct Tmp(PathBuf);
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// base/data/{f, sub/g, rel -> f, up -> ../secret, abs -> <base>/secret, dirlink -> sub, out -> ..}
    /// base/database/x, base/secret
    fn layout(tag: &str) -> Tmp {
        let base = std::env::temp_dir().join(format!("mc-path-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let d = base.join("data");
        std::fs::create_dir_all(d.join("sub")).expect("mkdir");
        std::fs::create_dir_all(base.join("database")).expect("mkdir");
        std::fs::write(d.join("f"), b"f").expect("write");
        std::fs::write(d.join("sub/g"), b"g").expect("write");
        std::fs::write(base.join("secret"), b"s").expect("write");
        std::fs::write(base.join("database/x"), b"x").expect("write");
        symlink("f", d.join("rel")).expect("ln");
        symlink("../secret", d.join("up")).expect("ln");
        symlink(base.join("secret"), d.join("abs")).expect("ln");
        symlink("sub", d.join("dirlink")).expect("ln");
        symlink("..", d.join("out")).expect("ln");
        Tmp(base)
    }

    #[test]
    fn doubled_slashes_after_the_chroot_stay_inside() {
        // Found by fuzz/fuzz_targets/chroot.rs: `<chroot>//etc/passwd` gave
        // the walk an absolute rest, which it began at the real root.
        let t = layout("dslash");
        let chroot = t.0.join("data");
        for walk in [false, true] {
            let r = Resolver::new(Some(&chroot), true)
                .expect("resolver")
                .force_walk(walk);
            let escape = p(&chroot, "/etc/passwd");
            assert!(
                matches!(read(&r, &escape), Err(PathError::Os(ref e)) if e.kind() == io::ErrorKind::NotFound),
                "walk={walk}: {:?}",
                read(&r, &escape).map(|b| String::from_utf8_lossy(&b).into_owned())
            );
            assert!(r.open_parent(&p(&chroot, "//etc/passwd")).is_err());
            assert_eq!(read(&r, &p(&chroot, "///f")).expect("inside"), b"f");
            let (dir, leaf) = r.open_parent(&p(&chroot, "//sub/g")).expect("parent");
            assert_eq!(leaf, b"g");
            let real = std::fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd()));
            assert_eq!(
                real.expect("fd path"),
                std::fs::canonicalize(chroot.join("sub")).expect("c")
            );
        }
    }

    fn p(base: &Path, rest: &str) -> Vec<u8> {
        format!("{}/{rest}", base.display()).into_bytes()
    }

    fn read(r: &Resolver, path: &[u8]) -> Result<Vec<u8>, PathError> {
        use std::io::Read;
        let fd = r.open(path, libc::O_RDONLY)?;
        let mut s = Vec::new();
        std::fs::File::from(fd)
            .read_to_end(&mut s)
            .map_err(PathError::Os)?;
        Ok(s)
    }

    fn both(tag: &str, check: impl Fn(&Path, &dyn Fn(bool) -> Resolver)) {
        let t = layout(tag);
        let base = t.0.clone();
        for walk in [false, true] {
            let chroot = base.join("data");
            check(&base, &|follow| {
                Resolver::new(Some(&chroot), follow)
                    .expect("chroot")
                    .force_walk(walk)
            });
        }
    }

    #[test]
    fn contained_paths_open_and_escapes_are_refused() {
        both("esc", |base, mk| {
            let follow = mk(true);
            assert_eq!(read(&follow, &p(base, "data/f")).expect("f"), b"f");
            assert_eq!(read(&follow, &p(base, "data/rel")).expect("rel"), b"f");
            assert_eq!(
                read(&follow, &p(base, "data/dirlink/g")).expect("dirlink"),
                b"g"
            );
            assert_eq!(
                read(&follow, &p(base, "data/sub/../f")).expect("dotdot inside"),
                b"f"
            );
            for bad in [
                "data/../secret",
                "data/up",
                "data/abs",
                "data/out/secret",
                "database/x",
                "secret",
            ] {
                match read(&follow, &p(base, bad)) {
                    Err(PathError::Outside) => {}
                    other => panic!("{bad}: {other:?}"),
                }
            }
            let strict = mk(false);
            assert_eq!(read(&strict, &p(base, "data/sub/g")).expect("g"), b"g");
            for bad in [
                "data/rel",
                "data/dirlink/g",
                "data/sub/../f",
                "data/./f",
                "data//f",
                "data/up",
            ] {
                match read(&strict, &p(base, bad)) {
                    Err(PathError::Link) => {}
                    other => panic!("{bad}: {other:?}"),
                }
            }
            match read(&strict, &p(base, "data/missing")) {
                Err(PathError::Os(e)) => assert_eq!(e.raw_os_error(), Some(libc::ENOENT)),
                other => panic!("{other:?}"),
            }
        });
    }

    #[test]
    fn parent_is_opened_beneath_the_chroot() {
        both("parent", |base, mk| {
            let r = mk(false);
            let (_, leaf) = r.open_parent(&p(base, "data/sub/new")).expect("parent");
            assert_eq!(leaf, b"new");
            let got = r.open_parent(&p(base, "data/dirlink/new"));
            assert!(matches!(got, Err(PathError::Link)), "{got:?}");
            let f = mk(true);
            assert!(matches!(
                f.open_parent(&p(base, "data/out/new")),
                Err(PathError::Outside)
            ));
            assert!(matches!(
                f.open_parent(&p(base, "data/../new")),
                Err(PathError::Outside)
            ));
            assert!(matches!(
                f.open_parent(&p(base, "datax/new")),
                Err(PathError::Outside)
            ));
            assert!(matches!(
                f.open_parent(&p(base, "data/sub/..")),
                Err(PathError::Os(_))
            ));
        });
    }

    #[test]
    fn unrestricted_resolution_follows_everything() {
        let t = layout("free");
        for walk in [false, true] {
            let r = Resolver::unrestricted().force_walk(walk);
            assert_eq!(read(&r, &p(&t.0, "data/up")).expect("up"), b"s");
            assert_eq!(read(&r, &p(&t.0, "data/../secret")).expect("dotdot"), b"s");
            assert_eq!(read(&r, &p(&t.0, "data/abs")).expect("abs"), b"s");
        }
    }
}
