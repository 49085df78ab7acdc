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
    super::allow::AllowList::parse(&cfg.port_forward.allowed_targets)
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
    let pwd = crate::sys::passwd::user_by_name(name)
        .map_err(|error| ConfigError::UserLookup {
            name: name.to_string(),
            error,
        })?
        .ok_or_else(|| ConfigError::UnknownUser {
            name: name.to_string(),
        })?;
    Ok(ValidatedUser {
        name: name.to_string(),
        uid: pwd.uid,
        gid: pwd.gid,
        home: pwd.home,
        groups: crate::sys::passwd::group_list(name, pwd.gid),
    })
}
