//! The one `poll(2)`: every thread that waits on more than a channel waits
//! here (the connection thread, shells, port forwards, child processes).

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

/// One descriptor to wait on, and what happened to it.
#[derive(Clone, Copy)]
#[repr(transparent)]
pub struct PollFd(libc::pollfd);

impl PollFd {
    /// Waits for `events` (`libc::POLLIN`, `POLLOUT`, …) on `fd`.
    pub fn new(fd: RawFd, events: i16) -> PollFd {
        PollFd(libc::pollfd {
            fd,
            events,
            revents: 0,
        })
    }

    /// What `poll` reported for this descriptor (0 after a timeout).
    pub fn revents(&self) -> i16 {
        self.0.revents
    }
}

/// Waits until one of `fds` is ready or `timeout_ms` (-1 = forever) passes;
/// returns how many are ready. EINTR counts as a timeout (every `revents` 0).
pub fn poll(fds: &mut [PollFd], timeout_ms: i32) -> io::Result<usize> {
    for f in fds.iter_mut() {
        f.0.revents = 0;
    }
    // SAFETY: PollFd is a transparent pollfd, so fds is a valid array of
    // pollfd of the given length for the duration of the call.
    let rc = unsafe {
        libc::poll(
            fds.as_mut_ptr().cast::<libc::pollfd>(),
            fds.len() as libc::nfds_t,
            timeout_ms,
        )
    };
    if rc < 0 {
        let err = io::Error::last_os_error();
        for f in fds.iter_mut() {
            f.0.revents = 0;
        }
        return match err.kind() {
            io::ErrorKind::Interrupted => Ok(0),
            _ => Err(err),
        };
    }
    Ok(rc as usize)
}

/// Milliseconds for `poll` from a duration: rounded up, so a wait of 0.3 ms
/// does not become a busy loop, and capped at `i32::MAX`.
pub fn timeout_ms(d: Duration) -> i32 {
    let ms = d.as_nanos().div_ceil(1_000_000);
    i32::try_from(ms).unwrap_or(i32::MAX)
}

/// Waits up to `timeout_ms` for `events` on one descriptor; returns its
/// `revents` (0 on timeout or EINTR).
pub fn poll_one(fd: RawFd, events: i16, timeout_ms: i32) -> io::Result<i16> {
    let mut fds = [PollFd::new(fd, events)];
    poll(&mut fds, timeout_ms)?;
    Ok(fds[0].revents())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn poll_reports_readable_only_after_data_arrives() {
        let (a, mut b) = UnixStream::pair().expect("pair");
        assert_eq!(poll_one(a.as_raw_fd(), libc::POLLIN, 0).expect("poll"), 0);
        std::io::Write::write_all(&mut b, b"x").expect("write");
        let r = poll_one(a.as_raw_fd(), libc::POLLIN, 1000).expect("poll");
        assert_ne!(r & libc::POLLIN, 0);
    }

    #[test]
    fn timeout_rounds_up_and_saturates() {
        assert_eq!(timeout_ms(Duration::from_micros(300)), 1);
        assert_eq!(timeout_ms(Duration::ZERO), 0);
        assert_eq!(timeout_ms(Duration::from_secs(u64::MAX)), i32::MAX);
    }
}
