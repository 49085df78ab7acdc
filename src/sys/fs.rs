//! File-system calls on descriptors (`openat`, `openat2`, `fstat`, `fchown`,
//! `renameat2`, …): every one opens close-on-exec and reports `io::Error`,
//! so path containment and file transfer above read as plain Rust.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// The kernel's file status (`struct stat`).
pub type Stat = libc::stat;

/// A `stat` of all zeroes, for tests and placeholders.
pub fn zeroed_stat() -> Stat {
    // SAFETY: stat is plain old data: every bit pattern, zero included, is valid.
    unsafe { std::mem::zeroed() }
}

/// Whether `st` is of file type `t` (`libc::S_IFREG`, `S_IFDIR`, …).
pub fn is_type(st: &Stat, t: libc::mode_t) -> bool {
    st.st_mode & libc::S_IFMT == t
}

/// A path for the kernel; a NUL byte inside is EINVAL (no file has that name).
fn cstr(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// 0 → Ok, anything else → the thread's errno.
fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// O_NOCTTY for real opens: a tty opened for a transfer must not become the
/// daemon's controlling terminal (its hangup would SIGHUP us). openat2
/// refuses it (EINVAL) together with O_PATH, which never acquires a tty.
fn noctty(flags: libc::c_int) -> libc::c_int {
    if flags & libc::O_PATH != 0 {
        0
    } else {
        libc::O_NOCTTY
    }
}

/// `fstat` on an open descriptor.
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<Stat> {
    let mut st = zeroed_stat();
    // SAFETY: fd is a valid open descriptor and st a valid out pointer.
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

/// `stat(2)` following symlinks, like Go's `os.Stat`.
pub fn stat(path: &[u8]) -> io::Result<Stat> {
    let c = cstr(path)?;
    let mut st = zeroed_stat();
    // SAFETY: NUL-terminated path and a valid out pointer.
    check(unsafe { libc::stat(c.as_ptr(), &mut st) })?;
    Ok(st)
}

/// `fstatat(AT_SYMLINK_NOFOLLOW)` of `name` in `dir`; `None` when it does
/// not exist (ENOENT), so callers tell "absent" from "cannot look".
pub fn lstat_at(dir: RawFd, name: &[u8]) -> io::Result<Option<Stat>> {
    let c = cstr(name)?;
    let mut st = zeroed_stat();
    // SAFETY: valid NUL-terminated name and out pointer; the kernel checks dir.
    let rc = unsafe { libc::fstatat(dir, c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
    match check(rc) {
        Ok(()) => Ok(Some(st)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `openat` returning an owned descriptor; O_CLOEXEC always, O_NOCTTY for
/// anything but O_PATH.
pub fn openat(
    dir: RawFd,
    name: &[u8],
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    let name = cstr(name)?;
    let flags = flags | libc::O_CLOEXEC | noctty(flags);
    // SAFETY: name is NUL-terminated; the kernel validates dir.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), flags, mode) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by openat and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `struct open_how` of openat2(2).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// `openat2` with `resolve` flags (`RESOLVE_BENEATH`, …); O_CLOEXEC always.
/// ENOSYS on kernels before 5.6: the caller falls back to [`openat`].
pub fn openat2(dir: RawFd, name: &[u8], flags: libc::c_int, resolve: u64) -> io::Result<OwnedFd> {
    let name = cstr(name)?;
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC | noctty(flags)) as u32 as u64,
        mode: 0,
        resolve,
    };
    let mut retries = 0;
    loop {
        // SAFETY: name and how outlive the call; size is how's real size.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir,
                name.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if fd >= 0 {
            // SAFETY: a fresh descriptor from the kernel, owned by nobody else.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
        }
        let e = io::Error::last_os_error();
        // EAGAIN: a concurrent rename raced the ".." check; the kernel asks
        // to retry. Bounded, so a process renaming in a loop cannot spin us.
        retries += 1;
        if e.raw_os_error() != Some(libc::EAGAIN) || retries >= 8 {
            return Err(e);
        }
    }
}

/// `readlinkat`: the target of the link `name` in `dir` (`b""` with an
/// O_PATH descriptor of the link itself).
pub fn readlinkat(dir: RawFd, name: &[u8]) -> io::Result<Vec<u8>> {
    let name = cstr(name)?;
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: buf is writable for buf.len() bytes; name is NUL-terminated.
    let n = unsafe { libc::readlinkat(dir, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// Turns O_NONBLOCK on or off on an open descriptor.
pub fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: F_GETFL on a valid descriptor takes no pointer.
    let fl = unsafe { libc::fcntl(raw, libc::F_GETFL) };
    if fl < 0 {
        return Err(io::Error::last_os_error());
    }
    let want = if on {
        fl | libc::O_NONBLOCK
    } else {
        fl & !libc::O_NONBLOCK
    };
    // SAFETY: F_SETFL on a valid descriptor takes an int.
    check(unsafe { libc::fcntl(raw, libc::F_SETFL, want) })
}

/// `fchown` on an open descriptor.
pub fn fchown(fd: BorrowedFd<'_>, uid: libc::uid_t, gid: libc::gid_t) -> io::Result<()> {
    // SAFETY: a plain syscall on a valid descriptor.
    check(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) })
}

/// `fchmod` on an open descriptor.
pub fn fchmod(fd: BorrowedFd<'_>, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: a plain syscall on a valid descriptor.
    check(unsafe { libc::fchmod(fd.as_raw_fd(), mode) })
}

/// `renameat` within one directory, replacing an existing `to`.
pub fn renameat(dir: RawFd, from: &[u8], to: &[u8]) -> io::Result<()> {
    let (from, to) = (cstr(from)?, cstr(to)?);
    // SAFETY: valid dirfd (checked by the kernel) and NUL-terminated names.
    check(unsafe { libc::renameat(dir, from.as_ptr(), dir, to.as_ptr()) })
}

/// `renameat2(RENAME_NOREPLACE)` within one directory: EEXIST when `to`
/// exists; EINVAL/ENOSYS where the file system or kernel lacks it.
pub fn renameat_noreplace(dir: RawFd, from: &[u8], to: &[u8]) -> io::Result<()> {
    let (from, to) = (cstr(from)?, cstr(to)?);
    // SAFETY: as renameat; the flags argument is RENAME_NOREPLACE.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            dir,
            from.as_ptr(),
            dir,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `linkat` within one directory: EEXIST instead of replacing `to`.
pub fn linkat(dir: RawFd, from: &[u8], to: &[u8]) -> io::Result<()> {
    let (from, to) = (cstr(from)?, cstr(to)?);
    // SAFETY: valid dirfd (checked by the kernel) and NUL-terminated names.
    check(unsafe { libc::linkat(dir, from.as_ptr(), dir, to.as_ptr(), 0) })
}

/// `unlinkat` of a non-directory `name` in `dir`.
pub fn unlinkat(dir: RawFd, name: &[u8]) -> io::Result<()> {
    let name = cstr(name)?;
    // SAFETY: valid dirfd (checked by the kernel) and a NUL-terminated name.
    check(unsafe { libc::unlinkat(dir, name.as_ptr(), 0) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    struct Tmp(std::path::PathBuf);
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tmp(tag: &str) -> (Tmp, OwnedFd) {
        let p = std::env::temp_dir().join(format!("mc-sysfs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("mkdir");
        let fd = openat(
            libc::AT_FDCWD,
            p.as_os_str().as_encoded_bytes(),
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )
        .expect("open dir");
        (Tmp(p), fd)
    }

    #[test]
    fn a_nul_byte_in_a_name_is_einval_not_a_shorter_name() {
        let e = stat(b"/tmp\0/x").expect_err("nul");
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    }

    #[test]
    fn lstat_at_tells_absent_from_present() {
        let (_t, dir) = tmp("lstat");
        let d = dir.as_raw_fd();
        assert!(lstat_at(d, b"x").expect("absent").is_none());
        let f = openat(d, b"x", libc::O_CREAT | libc::O_WRONLY, 0o600).expect("create");
        let st = lstat_at(d, b"x").expect("ok").expect("present");
        assert!(is_type(&st, libc::S_IFREG));
        assert_eq!(st.st_ino, fstat(f.as_fd()).expect("fstat").st_ino);
    }

    #[test]
    fn noreplace_rename_keeps_the_existing_target_and_plain_rename_replaces_it() {
        let (t, dir) = tmp("rename");
        let d = dir.as_raw_fd();
        std::fs::write(t.0.join("a"), b"a").expect("a");
        std::fs::write(t.0.join("b"), b"b").expect("b");
        let e = renameat_noreplace(d, b"a", b"b").expect_err("exists");
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        let e = linkat(d, b"a", b"b").expect_err("exists");
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        renameat(d, b"a", b"b").expect("replace");
        assert_eq!(std::fs::read(t.0.join("b")).expect("read"), b"a");
        unlinkat(d, b"b").expect("unlink");
        assert!(lstat_at(d, b"b").expect("lstat").is_none());
    }

    #[test]
    fn nonblocking_toggles_and_mode_owner_apply() {
        let (_t, dir) = tmp("fl");
        let f =
            openat(dir.as_raw_fd(), b"f", libc::O_CREAT | libc::O_WRONLY, 0o600).expect("create");
        set_nonblocking(f.as_fd(), true).expect("on");
        set_nonblocking(f.as_fd(), false).expect("off");
        fchmod(f.as_fd(), 0o640).expect("chmod");
        let st = fstat(f.as_fd()).expect("fstat");
        assert_eq!(st.st_mode & 0o7777, 0o640);
        fchown(f.as_fd(), st.st_uid, st.st_gid).expect("chown to self");
    }

    #[test]
    fn readlinkat_returns_the_target_bytes() {
        let (t, dir) = tmp("link");
        std::os::unix::fs::symlink("some/where", t.0.join("l")).expect("ln");
        assert_eq!(
            readlinkat(dir.as_raw_fd(), b"l").expect("readlink"),
            b"some/where"
        );
    }
}
