//! Signals as bytes in a self-pipe: the handler only writes the signal
//! number (async-signal-safe); a thread reads it back as an event.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};

/// The pipe's write end, for the handler (a static: handlers get no context).
static PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    write_byte(sig as u8);
}

/// Writes one byte into the pipe, keeping errno as it was (it runs inside
/// handlers). A full pipe drops the byte: the reader is far behind anyway.
fn write_byte(b: u8) {
    let fd = PIPE_WRITE.load(Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: write(2) and errno access are async-signal-safe; one byte
        // from a live local.
        unsafe {
            let saved = *libc::__errno_location();
            libc::write(fd, (&b as *const u8).cast(), 1);
            *libc::__errno_location() = saved;
        }
    }
}

/// The read end of the signal pipe.
#[derive(Debug)]
pub struct SignalPipe {
    read: OwnedFd,
}

/// What one read of the pipe gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Got {
    /// This signal arrived.
    Signal(libc::c_int),
    /// [`wake_reader`] was called, or the pipe is gone: stop reading.
    Stop,
}

impl SignalPipe {
    /// Blocks for the next signal (EINTR is retried).
    pub fn next(&self) -> Got {
        let mut b = 0u8;
        loop {
            // SAFETY: reads at most one byte into a live u8.
            let n = unsafe { libc::read(self.read.as_raw_fd(), (&mut b as *mut u8).cast(), 1) };
            match n {
                1 if b != 0 => return Got::Signal(libc::c_int::from(b)),
                n if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
                _ => return Got::Stop,
            }
        }
    }
}

/// Makes a blocked [`SignalPipe::next`] return [`Got::Stop`] (0 is no signal).
pub fn wake_reader() {
    write_byte(0);
}

/// Routes `signals` into a new pipe from now on and unblocks them for this
/// thread and every thread started after; call before starting others.
pub fn route(signals: &[libc::c_int]) -> io::Result<SignalPipe> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are fresh descriptors nobody else owns; the write end
    // stays open for the process's life (the handler may run at any time).
    let read = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // The reader blocks; only the writer must never block inside a handler.
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(read.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(read.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
    }
    PIPE_WRITE.store(fds[1], Ordering::Relaxed);
    // A parent (a test harness, a wrapper script) may hand us these signals
    // blocked, and the mask is inherited across exec: unblock them here,
    // before any other thread exists, so every thread inherits the open mask.
    // SAFETY: sigset operations on a local, initialised set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &sig in signals {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
    for &sig in signals {
        // SAFETY: a zeroed sigaction with a valid handler and SA_RESTART is a
        // well-formed argument; the handler is async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(SignalPipe { read })
}
