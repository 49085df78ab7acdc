//! Integer socket options (TCP keepalive on the websocket's socket).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Sets an integer option `name` at `level` on `fd`.
pub fn set_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: setsockopt reads a c_int of the given size from a live value.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads an integer option `name` at `level` from `fd` (tests check what
/// `set_int` did).
#[cfg(test)]
pub fn get_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into a c_int we own.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::os::fd::AsFd;

    #[test]
    fn an_option_set_reads_back() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        set_int(l.as_fd(), libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1).expect("set");
        assert_eq!(
            get_int(l.as_fd(), libc::SOL_SOCKET, libc::SO_KEEPALIVE).expect("get"),
            1
        );
    }
}
