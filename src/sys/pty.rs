//! Pseudo-terminals: opening a pair and setting the window size.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens a PTY pair `(master, slave)`; both close-on-exec, the master
/// non-blocking.
pub fn open_pty() -> io::Result<(OwnedFd, OwnedFd)> {
    // SAFETY: posix_openpt returns a fresh descriptor or -1 (checked).
    let m = check(unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) })?;
    // SAFETY: m is a fresh descriptor nobody else owns.
    let master = unsafe { OwnedFd::from_raw_fd(m) };
    // SAFETY: grantpt/unlockpt take a descriptor we own.
    check(unsafe { libc::grantpt(m) })?;
    check(unsafe { libc::unlockpt(m) })?;
    let mut buf = [0 as libc::c_char; 128];
    // SAFETY: ptsname_r writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::ptsname_r(m, buf.as_mut_ptr(), buf.len()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    // SAFETY: buf holds a NUL-terminated path written by ptsname_r.
    let s = check(unsafe {
        libc::open(
            buf.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: s is a fresh descriptor nobody else owns.
    let slave = unsafe { OwnedFd::from_raw_fd(s) };
    set_nonblocking(master.as_raw_fd())?;
    Ok((master, slave))
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl flag calls on a descriptor the caller owns.
    let flags = check(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    check(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) }).map(|_| ())
}

/// Sets the terminal size (the kernel sends SIGWINCH to the foreground group).
pub fn set_winsize(master: &impl AsRawFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a valid winsize.
    check(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) }).map(|_| ())
}

/// Bytes the terminal has ready to read now (`FIONREAD`); data still on
/// its way from the other end may not be counted yet.
pub fn readable(fd: &impl AsRawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) })?;
    Ok(n.max(0) as usize)
}

/// Reads up to `max` bytes from `fd` onto the end of `buf`, straight into
/// its spare room: no zero-filling and no separate read buffer, so only
/// pages that receive data are touched. `Ok(0)` is end of file.
pub fn read_append(fd: &impl AsRawFd, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
    buf.reserve(max);
    let spare = buf.spare_capacity_mut();
    let want = spare.len().min(max);
    // SAFETY: the kernel writes at most `want` bytes into the spare room.
    let n = unsafe { libc::read(fd.as_raw_fd(), spare.as_mut_ptr().cast(), want) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: the kernel initialised these n ≤ want bytes of spare room.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pty_pair_carries_bytes_and_takes_a_size() {
        use std::io::Write;
        let (m, s) = open_pty().expect("pty");
        set_winsize(&m, 50, 132).expect("size");
        let mut slave = std::fs::File::from(s);
        slave.write_all(b"x").expect("write");
        let r = crate::sys::poll::poll_one(m.as_raw_fd(), libc::POLLIN, 5000).expect("poll");
        assert_ne!(r & libc::POLLIN, 0);
        assert_eq!(readable(&m).expect("fionread"), 1);
        let mut b = b"ab".to_vec();
        assert_eq!(read_append(&m, &mut b, 8).expect("read"), 1);
        assert_eq!(b, b"abx");
        let e = read_append(&m, &mut b, 8).expect_err("nothing more");
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(b, b"abx");
    }
}
