//! A shell on a fresh pseudo-terminal: the recipe prepared once per daemon,
//! starting it with its own session and controlling terminal, signalling the
//! whole terminal session and reaping (behavior.md §5.3, §5.7). The system
//! calls are in `sys::pty` and `sys::process`.

use std::ffi::CString;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::time::Duration;

use crate::sys::process::{self, Creds, Exec, ExecError, Pid, WaitStatus};

/// Everything the child needs, prepared before `fork` so that the child only
/// makes async-signal-safe calls (the daemon is multi-threaded).
#[derive(Debug)]
pub struct Recipe {
    exec: Exec,
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
            crate::sys::user::euid()
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
            exec: Exec {
                path: cstr(path, "ShellCommand")?,
                argv,
                envp,
                home: cstr(&home, "home directory")?,
                creds: switch_user.then(|| Creds {
                    uid: user.uid,
                    gid: user.gid,
                    groups: user.groups.clone(),
                }),
            },
        })
    }

    fn path_text(&self) -> String {
        self.exec.path.to_string_lossy().into_owned()
    }
}

/// A running shell: its pid, the PTY master (non-blocking) and, where the
/// kernel has them, a pidfd that becomes readable when the shell exits.
#[derive(Debug)]
pub struct Child {
    /// Process id; also the id of its session and process group.
    pub pid: Pid,
    /// PTY master, non-blocking, close-on-exec.
    pub master: File,
    /// Readable once the child has exited (Linux ≥ 5.3).
    pub pidfd: Option<OwnedFd>,
    reaped: bool,
}

/// Starts the shell on a new PTY of `rows` × `cols`.
pub fn spawn(r: &Recipe, rows: u16, cols: u16) -> Result<Child, SpawnError> {
    let (master, slave) = crate::sys::pty::open_pty().map_err(SpawnError::Pty)?;
    crate::sys::pty::set_winsize(&master, rows, cols).map_err(SpawnError::Pty)?;
    let pid = process::spawn_on_tty(&r.exec, slave).map_err(|e| match e {
        ExecError::Fork(e) => SpawnError::Fork(r.path_text(), e),
        ExecError::Exec(e) => SpawnError::Exec(r.path_text(), e),
    })?;
    Ok(Child {
        pid,
        master: File::from(master),
        pidfd: process::pidfd_open(pid),
        reaped: false,
    })
}

/// Sends `sig` to the shell's process group and to every other process of its
/// terminal session: job-control shells put background jobs into their own
/// groups, which `kill(-pid)` alone would miss.
pub fn signal_session(pid: Pid, sig: libc::c_int) {
    // ESRCH only means there is nobody left to signal
    let _ = process::killpg(pid, sig);
    for member in session_members(pid) {
        let _ = process::kill(member, sig);
    }
}

/// Processes (other than `sid` itself) whose session id is `sid`.
pub fn session_members(sid: Pid) -> Vec<Pid> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for ent in dir.flatten() {
        let name = ent.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<Pid>().ok()) else {
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
        if f.nth(2).and_then(|s| s.parse::<Pid>().ok()) == Some(sid) {
            out.push(pid);
        }
    }
    out
}

impl Child {
    /// Reaps the child if it has exited; returns its wait status.
    pub fn try_reap(&mut self) -> Option<WaitStatus> {
        if self.reaped {
            return None;
        }
        match process::try_reap(self.pid) {
            Ok(Some(st)) => {
                self.reaped = true;
                Some(st)
            }
            Ok(None) => None,
            // ECHILD: someone else reaped it; it is gone either way.
            Err(_) => {
                self.reaped = true;
                None
            }
        }
    }

    /// Waits up to `limit` for the child to exit (it stays unreaped).
    pub fn wait_exit(&self, limit: Duration) -> bool {
        self.reaped || process::wait_exited(self.pid, self.pidfd.as_ref(), limit)
    }

    /// Whether the process still exists (a zombie counts).
    pub fn exists(&self) -> bool {
        process::exists(self.pid)
    }

    /// Waits up to `limit` for the child to exit and reaps it.
    pub fn wait(&mut self, limit: Duration) -> Option<WaitStatus> {
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
    pub fn terminate(&mut self, grace: Duration) -> Result<Option<WaitStatus>, String> {
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
    pub fn hang_up_and_reap(&mut self) -> Option<WaitStatus> {
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
