//! Validation of a loaded configuration (behavior.md §2.3) and the user lookup.

use super::*;

/// Validate a loaded configuration (behavior.md §2.3 order) and resolve the user.
///
/// `etc_shells` is normally [`DEFAULT_SHELLS_FILE`]; tests pass their own.
pub fn validate(cfg: &Config, etc_shells: &Path) -> Result<ValidatedUser, ConfigError> {
    let shell = &cfg.shell_command;
    if !Path::new(shell).is_absolute() {
        return Err(ConfigError::ShellNotAbsolute {
            shell: shell.clone(),
        });
    }
    // stat follows symlinks; any x bit counts, and a missing file is "not executable".
    let executable = std::fs::metadata(shell)
        .map(|m| m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false);
    if !executable {
        return Err(ConfigError::ShellNotExecutable {
            shell: shell.clone(),
        });
    }
    if cfg.user.is_empty() {
        return Err(ConfigError::NoUser);
    }
    let user = lookup_user(&cfg.user)?;
    check_shells_file(shell, etc_shells)?;
    if cfg.reconnect_interval_seconds < 0 {
        return Err(ConfigError::NegativeReconnectInterval {
            value: cfg.reconnect_interval_seconds,
        });
    }
    check_allowed_targets(cfg)?;
    log::debug!("Verified configuration = {cfg:?}");
    Ok(user)
}

/// Every `PortForward.AllowedTargets` entry must parse (checked even when
/// port forwarding is disabled, so a typo surfaces before it is enabled).
pub fn check_allowed_targets(cfg: &Config) -> Result<(), ConfigError> {
    crate::sessions::portforward::AllowList::parse(&cfg.port_forward.allowed_targets)
        .map(|_| ())
        .map_err(ConfigError::AllowedTarget)
}

/// The shell must equal a whole line of the shells file (Go `bufio.ScanLines`:
/// split on LF, one trailing CR dropped, no other trimming).
fn check_shells_file(shell: &str, etc_shells: &Path) -> Result<(), ConfigError> {
    let content = match std::fs::read(etc_shells) {
        Ok(c) => c,
        Err(_) if shell == DEFAULT_SHELL => return Ok(()),
        Err(error) => {
            return Err(ConfigError::ShellsUnreadable {
                shell: shell.to_string(),
                shells_file: etc_shells.to_path_buf(),
                error,
            });
        }
    };
    let listed = content
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .any(|line| line == shell.as_bytes());
    if listed {
        return Ok(());
    }
    let err = ConfigError::ShellNotListed {
        shell: shell.to_string(),
        shells_file: etc_shells.to_path_buf(),
    };
    // Upstream logs this once itself before returning it.
    log::error!("{err}");
    Err(err)
}

/// Resolve a user by name in the passwd database, with its full group list.
fn lookup_user(name: &str) -> Result<ValidatedUser, ConfigError> {
    let unknown = || ConfigError::UnknownUser {
        name: name.to_string(),
    };
    // A name with a NUL byte cannot be in passwd.
    let cname = CString::new(name).map_err(|_| unknown())?;
    let mut buf: Vec<libc::c_char> = vec![0; 1024];
    let (uid, gid, home) = loop {
        // SAFETY: passwd is plain old data; zeroed is a valid initial state.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: all pointers are valid for the duration of the call and
        // buf.len() is the real size of buf.
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(ConfigError::UserLookup {
                name: name.to_string(),
                error: io::Error::from_raw_os_error(rc),
            });
        }
        if result.is_null() {
            return Err(unknown());
        }
        let home = if pwd.pw_dir.is_null() {
            PathBuf::new()
        } else {
            // SAFETY: pw_dir points into buf, NUL-terminated by getpwnam_r.
            let dir = unsafe { CStr::from_ptr(pwd.pw_dir) };
            PathBuf::from(std::ffi::OsString::from_vec(dir.to_bytes().to_vec()))
        };
        break (pwd.pw_uid, pwd.pw_gid, home);
    };
    let groups = group_list(&cname, gid);
    Ok(ValidatedUser {
        name: name.to_string(),
        uid,
        gid,
        home,
        groups,
    })
}

/// `getgrouplist`, growing the buffer until it fits; falls back to the primary group.
fn group_list(cname: &CStr, gid: libc::gid_t) -> Vec<libc::gid_t> {
    let mut cap: libc::c_int = 32;
    loop {
        let mut groups: Vec<libc::gid_t> = vec![0; cap as usize];
        let mut n = cap;
        // SAFETY: groups holds `n` entries; cname is NUL-terminated.
        let rc = unsafe { libc::getgrouplist(cname.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
        if rc >= 0 {
            groups.truncate(n.max(0) as usize);
            return groups;
        }
        if cap >= 65536 {
            return vec![gid];
        }
        cap = if n > cap { n } else { cap * 2 };
    }
}
