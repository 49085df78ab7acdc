//! An eventfd that lets session threads wake the connection thread's `poll()`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A level-triggered wake-up flag backed by an eventfd.
#[derive(Debug)]
pub struct Wake {
    fd: OwnedFd,
}

impl Wake {
    /// Creates a non-blocking, close-on-exec eventfd.
    pub fn new() -> io::Result<Wake> {
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a freshly created descriptor that nothing else owns.
        Ok(Wake {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Makes the fd readable until the next `drain`.
    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64. A full counter (EAGAIN) still
        // leaves the fd readable, which is all a wake-up needs.
        unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            );
        }
    }

    /// Clears the readable state.
    pub fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads at most 8 bytes into a valid u64; EAGAIN is fine.
        unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut v as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            );
        }
    }
}

#[cfg(test)]
impl Wake {
    /// Clears the readable state; whether it was set.
    pub fn drain_was_signalled(&self) -> bool {
        let set =
            crate::sys::poll::poll_one(self.as_raw_fd(), libc::POLLIN, 0).is_ok_and(|rev| rev != 0);
        self.drain();
        set
    }
}

impl AsRawFd for Wake {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::poll::{PollFd, poll};

    fn readable(w: &Wake) -> bool {
        let mut fds = [PollFd::new(w.as_raw_fd(), libc::POLLIN)];
        poll(&mut fds, 0).expect("poll");
        fds[0].revents() & libc::POLLIN != 0
    }

    #[test]
    fn wake_makes_fd_readable_and_drain_clears_it() {
        let w = Wake::new().expect("eventfd");
        assert!(!readable(&w));
        w.wake();
        w.wake();
        assert!(readable(&w));
        w.drain();
        assert!(!readable(&w));
    }
}
