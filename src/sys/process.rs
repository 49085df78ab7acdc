//! Child processes: fork/exec onto a terminal, signals, pidfds, waiting and
//! reaping, and the wait-status text Go prints. The one copy of each for the
//! shell and the mender-client trigger.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// A process id (also the id of its group and session where it leads them).
pub type Pid = libc::pid_t;
/// A raw wait status as `waitpid` reports it.
pub type WaitStatus = libc::c_int;

/// An identity to switch to before exec.
#[derive(Debug, Clone)]
pub struct Creds {
    /// User id.
    pub uid: libc::uid_t,
    /// Primary group id.
    pub gid: libc::gid_t,
    /// Supplementary groups.
    pub groups: Vec<libc::gid_t>,
}

/// Everything a forked child needs, prepared before `fork` so that the child
/// only makes async-signal-safe calls (the daemon is multi-threaded).
#[derive(Debug)]
pub struct Exec {
    /// The program to run.
    pub path: CString,
    /// Its arguments, `argv[0]` first.
    pub argv: Vec<CString>,
    /// Its whole environment.
    pub envp: Vec<CString>,
    /// The directory to start in (`/` if it cannot be entered).
    pub home: CString,
    /// The identity to switch to; `None` keeps the daemon's.
    pub creds: Option<Creds>,
}

/// Why [`spawn_on_tty`] failed.
#[derive(Debug)]
pub enum ExecError {
    /// The error pipe or `fork` failed.
    Fork(io::Error),
    /// The child could not set up its terminal, switch user, or `execve`.
    Exec(io::Error),
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Runs `exec` as the leader of a new session whose controlling terminal and
/// standard streams are `tty`; returns its pid once `execve` succeeded. A
/// child that failed before exec is reaped here.
pub fn spawn_on_tty(exec: &Exec, tty: OwnedFd) -> Result<Pid, ExecError> {
    let mut argv: Vec<*const libc::c_char> = exec.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = exec.envp.iter().map(|a| a.as_ptr()).collect();
    envp.push(std::ptr::null());

    // The child reports a failed exec through this pipe; EOF means success.
    let mut p = [0 as libc::c_int; 2];
    // SAFETY: p has room for two descriptors.
    check(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }).map_err(ExecError::Fork)?;
    // SAFETY: fresh descriptors from pipe2 that nothing else owns.
    let (err_r, err_w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };

    // Block every signal across fork so the child cannot run one of the
    // daemon's handlers before it has reset them.
    // SAFETY: sigset manipulation on local values.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    // SAFETY: fork; the child only calls async-signal-safe functions on data
    // prepared before the fork, and always ends in execve or _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: see above.
        unsafe {
            child(
                exec,
                tty.as_raw_fd(),
                err_w.as_raw_fd(),
                &argv,
                &envp,
                c"/".as_ptr(),
            )
        }
    }
    let fork_err = io::Error::last_os_error();
    // SAFETY: restores this thread's mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    if pid < 0 {
        return Err(ExecError::Fork(fork_err));
    }
    drop(err_w);
    drop(tty);
    let mut errno = [0u8; 4];
    let n = loop {
        match read(err_r.as_raw_fd(), &mut errno) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break 0,
            Ok(n) => break n,
        }
    };
    if n == 4 {
        let pidfd = pidfd_open(pid);
        // the child `_exit`s at once; should it not, it must not linger
        if !wait_exited(pid, pidfd.as_ref(), Duration::from_secs(2)) {
            let _ = kill(pid, libc::SIGKILL);
            wait_exited(pid, pidfd.as_ref(), Duration::from_secs(2));
        }
        let _ = try_reap(pid);
        return Err(ExecError::Exec(io::Error::from_raw_os_error(
            i32::from_ne_bytes(errno),
        )));
    }
    Ok(pid)
}

/// The forked child. Never returns.
///
/// # Safety
/// Only to be called in the child right after `fork`, with pointers into
/// data that outlives it; it makes async-signal-safe calls only.
unsafe fn child(
    exec: &Exec,
    tty: RawFd,
    err_w: RawFd,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    root: *const libc::c_char,
) -> ! {
    // SAFETY: async-signal-safe calls only (see `spawn_on_tty`).
    unsafe {
        // Handlers do not survive exec, but ignored signals (SIGPIPE, set by
        // the Rust runtime) and the mask do: give the shell a clean slate.
        // 1..NSIG; invalid numbers just fail.
        for sig in 1..65 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());

        if libc::setsid() < 0 {
            fail(err_w);
        }
        if libc::ioctl(tty, libc::TIOCSCTTY, 0) < 0 {
            fail(err_w);
        }
        for fd in 0..3 {
            if libc::dup2(tty, fd) < 0 {
                fail(err_w);
            }
        }
        if tty > 2 {
            libc::close(tty);
        }
        // Anything another thread opened without O_CLOEXEC must not leak into
        // the shell; the error pipe stays usable until exec.
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
        if let Some(c) = &exec.creds
            && (libc::setgroups(c.groups.len(), c.groups.as_ptr()) < 0
                || libc::setgid(c.gid) < 0
                || libc::setuid(c.uid) < 0)
        {
            fail(err_w);
        }
        if libc::chdir(exec.home.as_ptr()) < 0 {
            libc::chdir(root);
        }
        libc::execve(exec.path.as_ptr(), argv.as_ptr(), envp.as_ptr());
        fail(err_w)
    }
}

/// Reports errno to the parent and ends the child.
///
/// # Safety
/// Only in the forked child.
unsafe fn fail(err_w: RawFd) -> ! {
    // SAFETY: async-signal-safe calls on a valid descriptor and local buffer.
    unsafe {
        let b = (*libc::__errno_location()).to_ne_bytes();
        libc::write(err_w, b.as_ptr().cast(), 4);
        libc::_exit(127)
    }
}

/// `read(2)` on a descriptor the caller owns.
fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: writes at most buf.len() bytes into buf.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A pidfd for `pid` (readable once it exited), or `None` on kernels
/// before 5.3. Close-on-exec, as the kernel creates them.
pub fn pidfd_open(pid: Pid) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Sends `sig` to process `pid`.
pub fn kill(pid: Pid, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: kill has no memory-safety preconditions.
    check(unsafe { libc::kill(pid, sig) }).map(|_| ())
}

/// Sends `sig` to every process of group `pgid`.
pub fn killpg(pgid: Pid, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: killpg has no memory-safety preconditions.
    check(unsafe { libc::killpg(pgid, sig) }).map(|_| ())
}

/// Whether `pid` still exists (a zombie counts).
pub fn exists(pid: Pid) -> bool {
    kill(pid, 0).is_ok()
}

/// Reaps child `pid` if it exited: `Ok(Some(status))`; `Ok(None)` while it
/// runs; an error (ECHILD) when it is not ours to reap (any more).
pub fn try_reap(pid: Pid) -> io::Result<Option<WaitStatus>> {
    let mut status = 0;
    // SAFETY: waitpid writes into a valid int.
    let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else if rc == pid {
        Ok(Some(status))
    } else {
        Ok(None)
    }
}

/// Whether child `pid` has exited, without reaping it: while it is a zombie
/// its pid cannot be reused, so it and its group can still be signalled.
/// A pid that is not our child counts as exited.
pub fn has_exited(pid: Pid) -> bool {
    // SAFETY: waitid writes into a zeroed siginfo_t we own.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let rc = libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        );
        rc < 0 || info.si_pid() == pid
    }
}

/// Waits up to `limit` for child `pid` to exit, on its pidfd if there is one
/// (no polling); it stays unreaped. Returns whether it exited.
pub fn wait_exited(pid: Pid, pidfd: Option<&OwnedFd>, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if has_exited(pid) {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        match pidfd {
            Some(fd) => {
                let ms = left.as_millis().clamp(1, 60_000) as i32;
                let _ = super::poll::poll_one(fd.as_raw_fd(), libc::POLLIN, ms);
            }
            // Without pidfds (old kernels) there is nothing to wait on.
            None => std::thread::sleep(left.min(Duration::from_millis(10))),
        }
    }
}

/// How a process ended, as Go's `exec.ExitError` prints it.
pub fn status_text(status: WaitStatus) -> String {
    if libc::WIFEXITED(status) {
        format!("exit status {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        let name = super::errno::signal_text(libc::WTERMSIG(status));
        format!("signal: {name}")
    } else {
        format!("wait status {status}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_status_texts_are_gos() {
        assert_eq!(status_text(0), "exit status 0");
        assert_eq!(status_text(3 << 8), "exit status 3");
        assert_eq!(status_text(libc::SIGKILL), "signal: killed");
    }

    #[test]
    fn a_failed_exec_reports_its_errno() {
        let exec = Exec {
            path: c"/nonexistent/shell".into(),
            argv: vec![c"/nonexistent/shell".into()],
            envp: Vec::new(),
            home: c"/".into(),
            creds: None,
        };
        let (_m, tty) = super::super::pty::open_pty().expect("pty");
        match spawn_on_tty(&exec, tty) {
            Err(ExecError::Exec(e)) => assert_eq!(e.raw_os_error(), Some(libc::ENOENT)),
            other => panic!("expected an exec error, got {other:?}"),
        }
    }

    #[test]
    fn a_child_is_seen_exiting_and_reaped_with_its_status() {
        let exec = Exec {
            path: c"/bin/sh".into(),
            argv: vec![c"sh".into(), c"-c".into(), c"exit 7".into()],
            envp: Vec::new(),
            home: c"/".into(),
            creds: None,
        };
        let (_m, tty) = super::super::pty::open_pty().expect("pty");
        let pid = spawn_on_tty(&exec, tty).expect("spawn");
        let fd = pidfd_open(pid);
        assert!(wait_exited(pid, fd.as_ref(), Duration::from_secs(10)));
        assert!(exists(pid), "an unreaped child stays signallable");
        let st = try_reap(pid).expect("reap").expect("status");
        assert_eq!(status_text(st), "exit status 7");
        assert!(try_reap(pid).is_err(), "reaped once only");
    }
}
