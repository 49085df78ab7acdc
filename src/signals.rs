//! Signals become messages: the handler only writes the signal number into a
//! self-pipe; a thread turns it into a channel event for the main loop.

use std::io;
use std::sync::atomic::{AtomicI32, Ordering};

use crossbeam_channel::Sender;

static PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = PIPE_WRITE.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = sig as u8;
        // SAFETY: write(2) is async-signal-safe; errno is preserved below.
        unsafe {
            let saved = *libc::__errno_location();
            libc::write(fd, (&b as *const u8).cast(), 1);
            *libc::__errno_location() = saved;
        }
    }
}

/// Routes `signals` to `tx` from now on; call before starting other threads.
pub fn install(signals: &[libc::c_int], tx: Sender<libc::c_int>) -> io::Result<()> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let (read_fd, write_fd) = (fds[0], fds[1]);
    // The reader blocks; only the writer must never block inside a handler.
    // SAFETY: read_fd is a valid descriptor we own.
    unsafe {
        let flags = libc::fcntl(read_fd, libc::F_GETFL);
        libc::fcntl(read_fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
    }
    PIPE_WRITE.store(write_fd, Ordering::Relaxed);
    std::thread::Builder::new()
        .name("signals".to_string())
        .stack_size(64 * 1024)
        .spawn(move || {
            let mut b = 0u8;
            loop {
                // SAFETY: reads one byte into a valid u8.
                let n = unsafe { libc::read(read_fd, (&mut b as *mut u8).cast(), 1) };
                if n == 1 {
                    if tx.send(libc::c_int::from(b)).is_err() {
                        return;
                    }
                } else if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                } else {
                    return;
                }
            }
        })?;
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
    Ok(())
}
