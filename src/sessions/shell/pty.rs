//! A shell on a fresh pseudo-terminal: PTY allocation, fork/exec with its own
//! session and controlling terminal, credentials, window size, signalling the
//! whole terminal session and reaping (behavior.md §5.3, §5.7).

use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// Everything the child needs, prepared before `fork` so that the child only
/// makes async-signal-safe calls (the daemon is multi-threaded).
#[derive(Debug)]
pub struct Recipe {
    path: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    home: CString,
    /// `(uid, gid, groups)` to switch to; `None` keeps the daemon's identity.
    creds: Option<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)>,
}

/// Why a recipe or a spawn failed; texts follow Go's so the server shows the
/// same errors as with the reference.
#[derive(Debug)]
pub enum SpawnError {
    /// A path, argument or variable contains a NUL byte.
    Nul(String),
    /// `/dev/ptmx` could not be opened or set up.
    Pty(io::Error),
    /// `fork` failed.
    Fork(String, io::Error),
    /// The child could not switch user, or `execve` failed.
    Exec(String, io::Error),
}

impl fmt::Display for SpawnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpawnError::Nul(what) => write!(f, "invalid argument: NUL byte in {what}"),
            SpawnError::Pty(e) => write!(f, "open /dev/ptmx: {}", crate::sys::errno::go_text(e)),
            SpawnError::Fork(p, e) | SpawnError::Exec(p, e) => {
                write!(f, "fork/exec {p}: {}", crate::sys::errno::go_text(e))
            }
        }
    }
}

impl std::error::Error for SpawnError {}

fn cstr(s: &str, what: &str) -> Result<CString, SpawnError> {
    CString::new(s).map_err(|_| SpawnError::Nul(what.to_string()))
}

impl Recipe {
    /// The shell `path` with `args`, for the given account. `switch_user`
    /// is false when the daemon is not root and cannot change identity.
    pub fn new(
        path: &str,
        args: &[String],
        user: &crate::config::ValidatedUser,
        switch_user: bool,
    ) -> Result<Recipe, SpawnError> {
        let mut argv = vec![cstr(path, "ShellCommand")?];
        for a in args {
            argv.push(cstr(a, "ShellArguments")?);
        }
        let home = user.home.to_string_lossy().into_owned();
        let target_uid = if switch_user {
            user.uid
        } else {
            // SAFETY: geteuid has no preconditions.
            unsafe { libc::geteuid() }
        };
        // login(1)'s defaults, so a shell started without `--login` still finds
        // the usual tools (MEN-4505); HOME and TERM exactly as the reference.
        let path_var = if target_uid == 0 {
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        } else {
            "/usr/local/bin:/usr/bin:/bin"
        };
        let envp = vec![
            cstr(&format!("HOME={home}"), "HOME")?,
            cstr("TERM=xterm-256color", "TERM")?,
            cstr(&format!("USER={}", user.name), "USER")?,
            cstr(&format!("LOGNAME={}", user.name), "LOGNAME")?,
            cstr(&format!("SHELL={path}"), "SHELL")?,
            cstr(&format!("PATH={path_var}"), "PATH")?,
        ];
        Ok(Recipe {
            path: cstr(path, "ShellCommand")?,
            argv,
            envp,
            home: cstr(&home, "home directory")?,
            creds: switch_user.then(|| (user.uid, user.gid, user.groups.clone())),
        })
    }

    fn path_text(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }
}

/// A running shell: its pid, the PTY master (non-blocking) and, where the
/// kernel has them, a pidfd that becomes readable when the shell exits.
#[derive(Debug)]
pub struct Child {
    /// Process id; also the id of its session and process group.
    pub pid: libc::pid_t,
    /// PTY master, non-blocking, close-on-exec.
    pub master: OwnedFd,
    /// Readable once the child has exited (Linux ≥ 5.3).
    pub pidfd: Option<OwnedFd>,
    reaped: bool,
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens a PTY pair; both ends close-on-exec, the master non-blocking.
fn open_pty() -> io::Result<(OwnedFd, OwnedFd)> {
    // SAFETY: plain syscalls on descriptors we own; ptsname_r writes into buf.
    unsafe {
        let m = check(libc::posix_openpt(
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        ))?;
        let master = OwnedFd::from_raw_fd(m);
        check(libc::grantpt(m))?;
        check(libc::unlockpt(m))?;
        let mut buf = [0 as libc::c_char; 128];
        let rc = libc::ptsname_r(m, buf.as_mut_ptr(), buf.len());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        let s = check(libc::open(
            buf.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        ))?;
        let slave = OwnedFd::from_raw_fd(s);
        let flags = check(libc::fcntl(m, libc::F_GETFL))?;
        check(libc::fcntl(m, libc::F_SETFL, flags | libc::O_NONBLOCK))?;
        Ok((master, slave))
    }
}

/// Sets the terminal size (the kernel sends SIGWINCH to the foreground group).
pub fn set_size(master: RawFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a valid winsize.
    check(unsafe { libc::ioctl(master, libc::TIOCSWINSZ, &ws) }).map(|_| ())
}

fn pidfd_open(pid: libc::pid_t) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    // pidfds are created close-on-exec by the kernel.
    Some(fd)
}

/// Starts the shell on a new PTY of `rows` × `cols`.
pub fn spawn(r: &Recipe, rows: u16, cols: u16) -> Result<Child, SpawnError> {
    let (master, slave) = open_pty().map_err(SpawnError::Pty)?;
    set_size(master.as_raw_fd(), rows, cols).map_err(SpawnError::Pty)?;
    let mut argv: Vec<*const libc::c_char> = r.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = r.envp.iter().map(|a| a.as_ptr()).collect();
    envp.push(std::ptr::null());
    let root = c"/";

    // The child reports a failed exec through this pipe; EOF means success.
    let mut p = [0 as libc::c_int; 2];
    // SAFETY: p has room for two descriptors.
    check(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) })
        .map_err(|e| SpawnError::Fork(r.path_text(), e))?;
    // SAFETY: fresh descriptors from pipe2.
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
    // SAFETY: fork; the child below only calls async-signal-safe functions on
    // data prepared before the fork, and always ends in execve or _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: see above.
        unsafe {
            child(
                r,
                slave.as_raw_fd(),
                err_w.as_raw_fd(),
                &argv,
                &envp,
                root.as_ptr(),
            )
        }
    }
    let fork_err = io::Error::last_os_error();
    // SAFETY: restores this thread's mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    if pid < 0 {
        return Err(SpawnError::Fork(r.path_text(), fork_err));
    }
    drop(err_w);
    drop(slave);
    let mut child = Child {
        pid,
        master,
        pidfd: pidfd_open(pid),
        reaped: false,
    };
    let mut errno = [0u8; 4];
    let n = loop {
        // SAFETY: reads at most 4 bytes into errno.
        let n = unsafe { libc::read(err_r.as_raw_fd(), errno.as_mut_ptr().cast(), 4) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        break n;
    };
    if n == 4 {
        child.wait(Duration::from_secs(2));
        let code = i32::from_ne_bytes(errno);
        return Err(SpawnError::Exec(
            r.path_text(),
            io::Error::from_raw_os_error(code),
        ));
    }
    Ok(child)
}

/// The forked child. Never returns.
unsafe fn child(
    r: &Recipe,
    slave: RawFd,
    err_w: RawFd,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    root: *const libc::c_char,
) -> ! {
    // SAFETY: async-signal-safe calls only (see `spawn`).
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
        if libc::ioctl(slave, libc::TIOCSCTTY, 0) < 0 {
            fail(err_w);
        }
        for fd in 0..3 {
            if libc::dup2(slave, fd) < 0 {
                fail(err_w);
            }
        }
        if slave > 2 {
            libc::close(slave);
        }
        // Anything another thread opened without O_CLOEXEC must not leak into
        // the shell; the error pipe stays usable until exec.
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
        if let Some((uid, gid, groups)) = &r.creds
            && (libc::setgroups(groups.len(), groups.as_ptr()) < 0
                || libc::setgid(*gid) < 0
                || libc::setuid(*uid) < 0)
        {
            fail(err_w);
        }
        if libc::chdir(r.home.as_ptr()) < 0 {
            libc::chdir(root);
        }
        libc::execve(r.path.as_ptr(), argv.as_ptr(), envp.as_ptr());
        fail(err_w)
    }
}

/// Reports errno to the parent and ends the child.
unsafe fn fail(err_w: RawFd) -> ! {
    // SAFETY: async-signal-safe calls on a valid descriptor and local buffer.
    unsafe {
        let b = (*libc::__errno_location()).to_ne_bytes();
        libc::write(err_w, b.as_ptr().cast(), 4);
        libc::_exit(127)
    }
}

/// How a shell ended, as Go's `exec.ExitError` prints it.
pub fn status_text(status: libc::c_int) -> String {
    if libc::WIFEXITED(status) {
        format!("exit status {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        let name = crate::sys::errno::signal_text(sig);
        format!("signal: {name}")
    } else {
        format!("wait status {status}")
    }
}

/// Sends `sig` to the shell's process group and to every other process of its
/// terminal session: job-control shells put background jobs into their own
/// groups, which `kill(-pid)` alone would miss.
pub fn signal_session(pid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(-pid, sig) };
    for member in session_members(pid) {
        // SAFETY: as above.
        unsafe { libc::kill(member, sig) };
    }
}

/// Processes (other than `sid` itself) whose session id is `sid`.
pub fn session_members(sid: libc::pid_t) -> Vec<libc::pid_t> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for ent in dir.flatten() {
        let name = ent.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<libc::pid_t>().ok()) else {
            continue;
        };
        if pid == sid {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // fields after the command name: state ppid pgrp session ...
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut f = rest.split_ascii_whitespace();
        let state = f.next();
        if state == Some("Z") || state == Some("X") {
            continue;
        }
        if f.nth(2).and_then(|s| s.parse::<libc::pid_t>().ok()) == Some(sid) {
            out.push(pid);
        }
    }
    out
}

impl Child {
    /// Reaps the child if it has exited; returns its wait status.
    pub fn try_reap(&mut self) -> Option<libc::c_int> {
        if self.reaped {
            return None;
        }
        let mut status = 0;
        // SAFETY: waitpid on our own child, status is a valid int.
        let rc = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
        if rc == self.pid {
            self.reaped = true;
            Some(status)
        } else if rc < 0 {
            // ECHILD: someone else reaped it; it is gone either way.
            self.reaped = true;
            None
        } else {
            None
        }
    }

    /// Whether the child has exited, without reaping it: while it is a
    /// zombie its pid cannot be reused, so its session can still be signalled.
    fn has_exited(&self) -> bool {
        if self.reaped {
            return true;
        }
        // SAFETY: waitid writes into a zeroed siginfo_t we own.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let rc = libc::waitid(
                libc::P_PID,
                self.pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            );
            rc < 0 || info.si_pid() == self.pid
        }
    }

    /// Waits up to `limit` for the child to exit (it stays unreaped).
    pub fn wait_exit(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.has_exited() {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match &self.pidfd {
                Some(fd) => {
                    let ms = left.as_millis().clamp(1, 60_000) as i32;
                    let _ = crate::sys::poll::poll_one(fd.as_raw_fd(), libc::POLLIN, ms);
                }
                // Without pidfds (old kernels) there is nothing to wait on.
                None => std::thread::sleep(left.min(Duration::from_millis(10))),
            }
        }
    }

    /// Waits up to `limit` for the child to exit and reaps it.
    pub fn wait(&mut self, limit: Duration) -> Option<libc::c_int> {
        if self.wait_exit(limit) {
            self.try_reap()
        } else {
            None
        }
    }

    /// Ends the shell: SIGHUP (+SIGCONT, so stopped jobs see it) to the whole
    /// terminal session, SIGTERM after `grace`, SIGKILL after `grace` more;
    /// returns as soon as the shell has exited, reaped, with its wait status.
    /// Jobs it left in the session get the signal that ended it.
    pub fn terminate(&mut self, grace: Duration) -> Result<Option<libc::c_int>, String> {
        for sig in [libc::SIGHUP, libc::SIGTERM, libc::SIGKILL] {
            if self.reaped {
                return Ok(None);
            }
            signal_session(self.pid, sig);
            if sig == libc::SIGHUP {
                signal_session(self.pid, libc::SIGCONT);
            }
            let limit = if sig == libc::SIGKILL {
                Duration::from_secs(2)
            } else {
                grace
            };
            if self.wait_exit(limit) {
                if sig != libc::SIGHUP {
                    signal_session(self.pid, sig);
                }
                return Ok(self.try_reap());
            }
        }
        Err(format!(
            "waiting for pid {} timeout. the process will remain as zombie.",
            self.pid
        ))
    }

    /// After the shell exited by itself: the hangup a real terminal gives the
    /// jobs still attached to it, then reap. Returns the wait status.
    pub fn hang_up_and_reap(&mut self) -> Option<libc::c_int> {
        if !self.reaped {
            signal_session(self.pid, libc::SIGHUP);
            signal_session(self.pid, libc::SIGCONT);
        }
        self.try_reap()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if !self.reaped {
            // Never leave a zombie or an orphaned shell behind.
            signal_session(self.pid, libc::SIGKILL);
            self.wait(Duration::from_secs(2));
        }
    }
}
