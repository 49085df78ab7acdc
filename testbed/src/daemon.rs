//! Runs the daemon under test (`mender-connect daemon`) against the test bed.

use crate::TempDir;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// Path of the binary under test; only known to integration tests and
/// benches. Cargo sets `CARGO_BIN_EXE_*` at compile time for those targets
/// only, not for this library, so it is found at run time: that variable if
/// cargo passed it, else `mender-connect` next to the `deps/` directory the
/// test or bench executable runs from (examples run from `examples/`: none).
pub fn binary() -> Option<&'static str> {
    static BINARY: OnceLock<Option<String>> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            if let Some(p) = std::env::var_os("CARGO_BIN_EXE_mender-connect") {
                return p.into_string().ok();
            }
            let exe = std::env::current_exe().ok()?;
            let deps = exe.parent()?;
            if deps.file_name()? != "deps" {
                return None;
            }
            let bin = deps.parent()?.join("mender-connect");
            if !bin.is_file() {
                return None;
            }
            bin.into_os_string().into_string().ok()
        })
        .as_deref()
}

/// A running `mender-connect daemon`. Drop sends SIGKILL, reaps it, dumps the
/// log if the test is panicking, and removes the temp files.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    status: Option<ExitStatus>,
    log_file: PathBuf,
    config_file: PathBuf,
    dir: TempDir,
}

/// A valid configuration for the current user: `User` = the effective user's
/// name, `ShellCommand` `/bin/sh`, `ReconnectIntervalSeconds` 1.
pub fn default_config() -> String {
    serde_json::json!({
        "ShellCommand": "/bin/sh",
        "User": current_user(),
        "ReconnectIntervalSeconds": 1,
    })
    .to_string()
}

/// Name of the effective user (getpwuid_r).
pub fn current_user() -> String {
    // SAFETY: getpwuid_r writes into our buffers; pw_name points into buf.
    unsafe {
        let uid = libc::geteuid();
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let r = libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result);
        assert!(r == 0 && !result.is_null(), "no passwd entry for uid {uid}");
        std::ffi::CStr::from_ptr(pwd.pw_name)
            .to_string_lossy()
            .into_owned()
    }
}

impl Daemon {
    /// Spawns the integration test's `mender-connect` binary with debug logs
    /// (`-d`). See [`spawn_with_binary`](Self::spawn_with_binary).
    pub fn spawn(config_json: &str, bus_address: &str, extra_env: &[(&str, &str)]) -> Daemon {
        let bin = binary().expect("the daemon binary is only known to integration tests");
        Self::spawn_with_binary(Path::new(bin), config_json, bus_address, extra_env, true)
    }

    /// Writes `config_json` to a temp file and runs
    /// `<binary> --config <file> --fallback-config <nonexistent> [-d] daemon`
    /// with `DBUS_SYSTEM_BUS_ADDRESS=<bus_address>`, `RUST_LOG` removed and
    /// `extra_env` added; stdout and stderr go to a log file.
    pub fn spawn_with_binary(
        binary: &Path,
        config_json: &str,
        bus_address: &str,
        extra_env: &[(&str, &str)],
        debug: bool,
    ) -> Daemon {
        let dir = TempDir::new("daemon");
        let config_file = dir.join("mender-connect.conf");
        std::fs::write(&config_file, config_json).expect("write config");
        let log_file = dir.join("daemon.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_file)
            .expect("open daemon log");
        let mut cmd = Command::new(binary);
        cmd.arg("--config")
            .arg(&config_file)
            .arg("--fallback-config")
            .arg(dir.join("nonexistent.conf"));
        if debug {
            cmd.arg("-d");
        }
        cmd.arg("daemon")
            .env_remove("RUST_LOG")
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            .env("DBUS_SYSTEM_BUS_ADDRESS", bus_address)
            .envs(extra_env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", binary.display()));
        Daemon {
            child,
            status: None,
            log_file,
            config_file,
            dir,
        }
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Path of the config file it was started with.
    pub fn config_file(&self) -> &Path {
        &self.config_file
    }

    /// Path of the combined stdout/stderr log.
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// Prints the log to stderr (shown by the test harness on failure).
    pub fn dump_log(&self) {
        eprintln!(
            "----- mender-connect log ({}) -----\n{}----- end of log -----",
            self.log_file.display(),
            self.log()
        );
    }

    /// Waits until the log contains `needle`. Returns false on timeout or if
    /// the process exited without logging it.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> bool {
        let mut exited = false;
        crate::wait_until(timeout, || {
            if self.log().contains(needle) {
                return true;
            }
            if exited {
                return true;
            }
            // Check once more after noticing the exit: the last lines may have
            // been written just before it.
            exited = self.try_status().is_some();
            false
        }) && self.log().contains(needle)
    }

    /// Number of occurrences of `needle` in the log so far.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }

    /// Sends a signal (e.g. `libc::SIGTERM`); no-op once it has been reaped.
    pub fn signal(&mut self, sig: libc::c_int) {
        if self.try_status().is_none() {
            // SAFETY: the child is not reaped, so the pid is still ours.
            unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        }
    }

    /// Exit status if it has exited (reaps it).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        crate::wait_until(timeout, || self.try_status().is_some());
        self.status
    }

    /// Kills it with SIGKILL and reaps it.
    pub fn kill(&mut self) -> ExitStatus {
        if let Some(s) = self.status {
            return s;
        }
        let _ = self.child.kill();
        let s = self.child.wait().expect("wait for daemon");
        self.status = Some(s);
        s
    }

    /// The temp dir holding config and log (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            self.dump_log();
        }
    }
}
