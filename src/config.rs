//! Configuration: load, merge (fallback then main), default and validate (behavior.md §1.5, §2).
//!
//! The files are decoded with Go `encoding/json` semantics, not serde's: keys match
//! case-insensitively, the later of two spellings wins, `null` leaves scalars and
//! objects alone but resets arrays, and integers must be integral literals in range.
//! To get document order and duplicate keys right, the file is parsed by a small
//! JSON reader below into an order-preserving tree (`serde_json::Value` without
//! `preserve_order` sorts keys and drops duplicates), which is then walked by hand.

use std::ffi::{CStr, CString};
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Default main configuration file (`--config`).
pub const DEFAULT_CONFIG_FILE: &str = "/etc/mender/mender-connect.conf";
/// Default fallback configuration file (`--fallback-config`).
pub const DEFAULT_FALLBACK_CONFIG_FILE: &str = "/var/lib/mender/mender-connect.conf";
/// The list of login shells a `ShellCommand` must appear in.
pub const DEFAULT_SHELLS_FILE: &str = "/etc/shells";
/// Shell used when `ShellCommand` is empty, and the only one accepted without `/etc/shells`.
pub const DEFAULT_SHELL: &str = "/bin/sh";

/// Go struct type names, used verbatim in decode error messages.
const TOP: &str = "MenderShellConfigFromFile";
const DEPRECATED: &str = "MenderShellConfigDeprecated";

/// Complete daemon configuration after merging both files and applying defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `ShellCommand`: absolute path of the shell; default `/bin/sh` when empty.
    pub shell_command: String,
    /// `ShellArguments`: default `["--login"]` only when absent or `null`; `[]` means none.
    pub shell_arguments: Vec<String>,
    /// `User`: passwd user the shell runs as; no default (validation requires it).
    pub user: String,
    /// `Terminal`: PTY size and the shell-protocol switch.
    pub terminal: TerminalConfig,
    /// `Sessions`: expiry and per-user limits.
    pub sessions: SessionsConfig,
    /// `ReconnectIntervalSeconds`: back-off base in seconds; default 5 when 0; negative is invalid.
    pub reconnect_interval_seconds: i64,
    /// `FileTransfer.Disable`: default false.
    pub file_transfer: Toggle,
    /// `PortForward.Disable`: default false.
    pub port_forward: Toggle,
    /// `MenderClient.Disable`: default false.
    pub mender_client: Toggle,
    /// `Limits`: file-transfer restrictions (transfer.md §3).
    pub limits: LimitsConfig,
}

/// `Terminal` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TerminalConfig {
    /// `Terminal.Width`: columns of a new PTY; default 80 when 0.
    pub width: u16,
    /// `Terminal.Height`: rows of a new PTY; default 40 when 0.
    pub height: u16,
    /// `Terminal.Disable`: disables the shell protocol; default false.
    pub disable: bool,
}

/// `Sessions` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionsConfig {
    /// `Sessions.StopExpired`: default true; false forces both expiries to 0.
    pub stop_expired: bool,
    /// `Sessions.ExpireAfter`: seconds after start; default 0 (off).
    pub expire_after: u32,
    /// `Sessions.ExpireAfterIdle`: seconds without input; default 600 when StopExpired and both are 0.
    pub expire_after_idle: u32,
    /// `Sessions.MaxPerUser`: shell sessions per server user; default 1 when 0.
    pub max_per_user: u32,
}

/// A section whose only key is `Disable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Toggle {
    /// `Disable`: default false.
    pub disable: bool,
}

/// `Limits` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsConfig {
    /// `Limits.Enabled`: default false; when false no limit below applies.
    pub enabled: bool,
    /// `Limits.FileTransfer`.
    pub file_transfer: FileTransferLimits,
}

/// `Limits.FileTransfer` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileTransferLimits {
    /// `Chroot`: directory transfers are confined to; default "" (none).
    pub chroot: String,
    /// `FollowSymLinks`: default false.
    pub follow_symlinks: bool,
    /// `AllowOverwrite`: default false.
    pub allow_overwrite: bool,
    /// `OwnerPut`: owner of uploaded files; default "" (not set).
    pub owner_put: String,
    /// `GroupPut`: group of uploaded files; default "" (not set).
    pub group_put: String,
    /// `OwnerGet`: owners whose files may be downloaded; default empty (all).
    pub owner_get: Vec<String>,
    /// `GroupGet`: groups whose files may be downloaded; default empty (all).
    pub group_get: Vec<String>,
    /// `Umask`: octal string; default "" (process umask).
    pub umask: String,
    /// `MaxFileSize`: bytes; default 0 (unlimited).
    pub max_file_size: u64,
    /// `Counters`: transfer rate limits.
    pub counters: Counters,
    /// `AllowSuid`: default false.
    pub allow_suid: bool,
    /// `RegularFilesOnly`: default false.
    pub regular_files_only: bool,
    /// `PreserveMode`: default true when absent; a configured value is honoured.
    pub preserve_mode: bool,
    /// `PreserveOwner`: default true when absent; a configured value is honoured.
    pub preserve_owner: bool,
    /// `PreserveGroup`: default true when absent; a configured value is honoured.
    pub preserve_group: bool,
}

/// `Limits.FileTransfer.Counters` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    /// `MaxBytesTxPerMinute`: default 0 (unlimited).
    pub max_bytes_tx_per_minute: u64,
    /// `MaxBytesRxPerMinute`: default 0 (unlimited).
    pub max_bytes_rx_per_minute: u64,
}

impl Default for Config {
    /// The configuration `load` returns when neither file exists (all defaults applied).
    fn default() -> Self {
        // Same path as loading: the zero state plus defaults, so the two never drift;
        // quiet, because building a default is not an operator-visible event.
        Raw::new().finish(false)
    }
}

/// The user the shell runs as, resolved once during validation (behavior.md §2.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidatedUser {
    /// The passwd user name (`User`).
    pub name: String,
    /// Numeric user id.
    pub uid: libc::uid_t,
    /// Primary group id.
    pub gid: libc::gid_t,
    /// Home directory from passwd.
    pub home: PathBuf,
    /// All groups of the user (`getgrouplist`, includes the primary group).
    pub groups: Vec<libc::gid_t>,
}

/// Why loading or validating the configuration failed.
#[derive(Debug)]
pub enum ConfigError {
    /// The file exists but could not be opened (`op` = "open") or read (`op` = "read").
    Read {
        /// The configuration file.
        file: PathBuf,
        /// Which system call failed, as in Go's `*PathError`.
        op: &'static str,
        /// The underlying error.
        error: io::Error,
    },
    /// The file is not valid JSON; `detail` is Go's scanner text.
    Syntax {
        /// The configuration file.
        file: PathBuf,
        /// e.g. `unexpected end of JSON input`.
        detail: String,
    },
    /// Valid JSON of the wrong type or out of range.
    Decode {
        /// The configuration file.
        file: PathBuf,
        /// Dotted Go field path (`Terminal.Width`); empty for the top-level value.
        key: String,
        /// Go's `json: cannot unmarshal …` text.
        detail: String,
    },
    /// `ShellCommand` is not an absolute path.
    ShellNotAbsolute {
        /// The configured shell.
        shell: String,
    },
    /// `ShellCommand` is missing or has no execute bit.
    ShellNotExecutable {
        /// The configured shell.
        shell: String,
    },
    /// `User` is empty.
    NoUser,
    /// `User` is not in the passwd database.
    UnknownUser {
        /// The configured user.
        name: String,
    },
    /// The passwd lookup itself failed (NSS error).
    UserLookup {
        /// The configured user.
        name: String,
        /// The error returned by `getpwnam_r`.
        error: io::Error,
    },
    /// `ShellCommand` is not a line of the shells file.
    ShellNotListed {
        /// The configured shell.
        shell: String,
        /// The shells file consulted (normally `/etc/shells`).
        shells_file: PathBuf,
    },
    /// The shells file cannot be opened and the shell is not `/bin/sh`.
    ShellsUnreadable {
        /// The configured shell.
        shell: String,
        /// The shells file consulted.
        shells_file: PathBuf,
        /// Why it could not be opened.
        error: io::Error,
    },
    /// `ReconnectIntervalSeconds` is negative.
    NegativeReconnectInterval {
        /// The configured value.
        value: i64,
    },
}

impl ConfigError {
    /// The configuration file the error comes from, when it comes from one.
    pub fn file(&self) -> Option<&Path> {
        match self {
            ConfigError::Read { file, .. }
            | ConfigError::Syntax { file, .. }
            | ConfigError::Decode { file, .. } => Some(file),
            _ => None,
        }
    }

    /// The dotted configuration key the error is about, when there is one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Decode { key, .. } if !key.is_empty() => Some(key),
            ConfigError::ShellNotAbsolute { .. }
            | ConfigError::ShellNotExecutable { .. }
            | ConfigError::ShellNotListed { .. }
            | ConfigError::ShellsUnreadable { .. } => Some("ShellCommand"),
            ConfigError::NoUser
            | ConfigError::UnknownUser { .. }
            | ConfigError::UserLookup { .. } => Some("User"),
            ConfigError::NegativeReconnectInterval { .. } => Some("ReconnectIntervalSeconds"),
            _ => None,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const LOADING: &str = "Error loading configuration from file:";
        match self {
            ConfigError::Read { file, op, error } => write!(
                f,
                "{LOADING} {} ({op} {}: {})",
                file.display(),
                file.display(),
                go_errno_text(error)
            ),
            ConfigError::Syntax { file, detail } => write!(
                f,
                "{LOADING} {} (Error parsing mender configuration file: {detail})",
                file.display()
            ),
            ConfigError::Decode { file, key, detail } if key.is_empty() => {
                write!(f, "{LOADING} {} ({detail})", file.display())
            }
            ConfigError::Decode { file, key, detail } => {
                write!(f, "{LOADING} {} ({key}: {detail})", file.display())
            }
            ConfigError::ShellNotAbsolute { shell } => {
                write!(f, "given shell ({shell}) is not an absolute path")
            }
            ConfigError::ShellNotExecutable { shell } => {
                write!(f, "given shell ({shell}) is not executable")
            }
            ConfigError::NoUser => f.write_str("please provide a user to run the shell as"),
            ConfigError::UnknownUser { name } => write!(f, "user: unknown user {name}"),
            ConfigError::UserLookup { name, error } => {
                write!(f, "user: lookup username {name}: {}", go_errno_text(error))
            }
            ConfigError::ShellNotListed { shell, shells_file } => write!(
                f,
                "ShellCommand {shell} is not present in {}",
                shells_file.display()
            ),
            ConfigError::ShellsUnreadable {
                shell,
                shells_file,
                error,
            } => write!(
                f,
                "ShellCommand {shell} cannot be checked against {0} (open {0}: {1}); \
                 without that file only {DEFAULT_SHELL} is accepted",
                shells_file.display(),
                go_errno_text(error)
            ),
            ConfigError::NegativeReconnectInterval { value } => write!(
                f,
                "ReconnectIntervalSeconds: must not be negative (got {value})"
            ),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConfigError::Read { error, .. }
            | ConfigError::UserLookup { error, .. }
            | ConfigError::ShellsUnreadable { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// Go prints errno texts in lower case without Rust's "(os error N)" suffix.
fn go_errno_text(e: &io::Error) -> String {
    let s = e.to_string();
    let s = match s.rfind(" (os error ") {
        Some(i) if e.raw_os_error().is_some() => s[..i].to_string(),
        _ => s,
    };
    let mut chars = s.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => s,
    }
}

// ---------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------

/// Load the fallback file, then the main file on top of it, then apply the defaults.
///
/// A missing file is skipped; any other problem with a file is an error naming it.
pub fn load(main: &Path, fallback: &Path) -> Result<Config, ConfigError> {
    let mut raw = Raw::new();
    let mut loaded = 0;
    for file in [fallback, main] {
        if load_file(file, &mut raw)? {
            loaded += 1;
        }
    }
    log::debug!("Loaded {loaded} configuration file(s)");
    if loaded == 0 {
        log::info!("No configuration files present. Using defaults");
    }
    let cfg = raw.finish(true);
    log::debug!("Loaded configuration = {cfg:?}");
    Ok(cfg)
}

/// Decode one file onto `raw`; `Ok(false)` when the file does not exist.
fn load_file(file: &Path, raw: &mut Raw) -> Result<bool, ConfigError> {
    // Go stats first and skips only "does not exist"; every other stat problem
    // surfaces through the open/read below, exactly as upstream.
    if let Err(e) = std::fs::metadata(file)
        && e.kind() == io::ErrorKind::NotFound
    {
        log::debug!("Configuration file does not exist: {}", file.display());
        return Ok(false);
    }
    log::debug!("Reading Mender configuration from file {}", file.display());
    let read_err = |op, error| ConfigError::Read {
        file: file.to_path_buf(),
        op,
        error,
    };
    let mut f = File::open(file).map_err(|e| read_err("open", e))?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).map_err(|e| read_err("read", e))?;
    decode_bytes(file, &bytes, raw)?;
    log::info!("Loaded configuration file: {}", file.display());
    Ok(true)
}

/// Parses `bytes` as the content of configuration file `file` (named only in
/// errors) and applies the defaults, as `load` does for a single file. The
/// fuzz targets feed arbitrary bytes through here.
pub fn parse(file: &Path, bytes: &[u8]) -> Result<Config, ConfigError> {
    let mut raw = Raw::new();
    decode_bytes(file, bytes, &mut raw)?;
    Ok(raw.finish(false))
}

/// Decodes one file's bytes onto `raw`.
fn decode_bytes(file: &Path, bytes: &[u8], raw: &mut Raw) -> Result<(), ConfigError> {
    let tree = parse_json(bytes).map_err(|detail| ConfigError::Syntax {
        file: file.to_path_buf(),
        detail,
    })?;
    let decode_err = |e: DecodeError| ConfigError::Decode {
        file: file.to_path_buf(),
        key: e.key,
        detail: e.detail,
    };
    raw.decode(&tree).map_err(decode_err)?;
    // Upstream decodes the file a second time into the deprecated view, so its
    // type errors come after those of the main view and its warnings before
    // the "Loaded" line.
    let mut old = Deprecated::default();
    old.decode(&tree).map_err(decode_err)?;
    old.warn();
    Ok(())
}

/// Configuration being decoded: the zero state plus the "was it set" bits Go keeps
/// implicitly (nil slices) and the ones this project adds (Preserve*).
struct Raw {
    cfg: Config,
    shell_arguments: Option<Vec<String>>,
    owner_get: Option<Vec<String>>,
    group_get: Option<Vec<String>>,
    preserve_mode: Option<bool>,
    preserve_owner: Option<bool>,
    preserve_group: Option<bool>,
}

impl Raw {
    /// Upstream's initial values: all zero except `Sessions.StopExpired = true` (3.0).
    fn new() -> Self {
        Raw {
            cfg: Config {
                shell_command: String::new(),
                shell_arguments: Vec::new(),
                user: String::new(),
                terminal: TerminalConfig {
                    width: 0,
                    height: 0,
                    disable: false,
                },
                sessions: SessionsConfig {
                    stop_expired: true,
                    expire_after: 0,
                    expire_after_idle: 0,
                    max_per_user: 0,
                },
                reconnect_interval_seconds: 0,
                file_transfer: Toggle::default(),
                port_forward: Toggle::default(),
                mender_client: Toggle::default(),
                limits: LimitsConfig {
                    enabled: false,
                    file_transfer: FileTransferLimits {
                        chroot: String::new(),
                        follow_symlinks: false,
                        allow_overwrite: false,
                        owner_put: String::new(),
                        group_put: String::new(),
                        owner_get: Vec::new(),
                        group_get: Vec::new(),
                        umask: String::new(),
                        max_file_size: 0,
                        counters: Counters::default(),
                        allow_suid: false,
                        regular_files_only: false,
                        preserve_mode: true,
                        preserve_owner: true,
                        preserve_group: true,
                    },
                },
            },
            shell_arguments: None,
            owner_get: None,
            group_get: None,
            preserve_mode: None,
            preserve_owner: None,
            preserve_group: None,
        }
    }

    /// Apply the defaults of behavior.md §2.2 in order and produce the final config;
    /// `announce` logs the upstream warnings/info lines about defaulted values.
    fn finish(self, announce: bool) -> Config {
        let mut c = self.cfg;
        if c.shell_command.is_empty() {
            if announce {
                log::warn!("ShellCommand is empty, defaulting to {DEFAULT_SHELL}");
            }
            c.shell_command = DEFAULT_SHELL.to_string();
        }
        c.shell_arguments = match self.shell_arguments {
            Some(args) => args,
            None => {
                if announce {
                    log::warn!("ShellArguments is empty, defaulting to [--login]");
                }
                vec!["--login".to_string()]
            }
        };
        if c.terminal.width == 0 {
            c.terminal.width = 80;
        }
        if c.terminal.height == 0 {
            c.terminal.height = 40;
        }
        let s = &mut c.sessions;
        if !s.stop_expired {
            s.expire_after = 0;
            s.expire_after_idle = 0;
        } else if s.expire_after > 0 && s.expire_after_idle > 0 {
            if announce {
                log::warn!(
                    "Both ExpireAfter and ExpireAfterIdle specified; they are mutually exclusive"
                );
            }
        } else if s.expire_after == 0 && s.expire_after_idle == 0 {
            s.expire_after_idle = 600;
            if announce {
                log::info!("Defaulting ExpireAfterIdle to 10m0s");
            }
        }
        if c.reconnect_interval_seconds == 0 {
            c.reconnect_interval_seconds = 5;
        }
        let ft = &mut c.limits.file_transfer;
        ft.owner_get = self.owner_get.unwrap_or_default();
        ft.group_get = self.group_get.unwrap_or_default();
        ft.preserve_mode = self.preserve_mode.unwrap_or(true);
        ft.preserve_owner = self.preserve_owner.unwrap_or(true);
        ft.preserve_group = self.preserve_group.unwrap_or(true);
        if c.sessions.max_per_user == 0 {
            c.sessions.max_per_user = 1;
        }
        c
    }

    /// Decode one parsed file on top of the current values (Go `json.Unmarshal`).
    fn decode(&mut self, v: &Json) -> Result<(), DecodeError> {
        let top = Loc::top(TOP);
        let go_type = "config.MenderShellConfigFromFile";
        walk_object(v, &top, go_type, |k, val| {
            const NAMES: &[&str] = &[
                "ShellCommand",
                "ShellArguments",
                "User",
                "Terminal",
                "Sessions",
                "Limits",
                "ReconnectIntervalSeconds",
                "FileTransfer",
                "PortForward",
                "MenderClient",
            ];
            let Some(name) = canonical(k, NAMES) else {
                // Deprecated keys are known (handled by the second view), not unknown.
                if canonical(k, Deprecated::NAMES).is_none() {
                    log::debug!("Ignoring unknown configuration key {k}");
                }
                return Ok(());
            };
            let at = top.field(TOP, name);
            let c = &mut self.cfg;
            match name {
                "ShellCommand" => set_string(val, &mut c.shell_command, &at),
                "ShellArguments" => set_strings(val, &mut self.shell_arguments, &at),
                "User" => set_string(val, &mut c.user, &at),
                "Terminal" => decode_terminal(val, &mut c.terminal, &at),
                "Sessions" => decode_sessions(val, &mut c.sessions, &at),
                "Limits" => self.decode_limits(val, &at),
                "ReconnectIntervalSeconds" => set_int(val, &mut c.reconnect_interval_seconds, &at),
                "FileTransfer" => {
                    decode_toggle(val, &mut c.file_transfer, "FileTransferConfig", &at)
                }
                "PortForward" => decode_toggle(val, &mut c.port_forward, "PortForwardConfig", &at),
                _ => decode_toggle(val, &mut c.mender_client, "MenderClientConfig", &at),
            }
        })
    }

    fn decode_limits(&mut self, v: &Json, at: &Loc) -> Result<(), DecodeError> {
        walk_object(v, at, "config.Limits", |k, val| {
            match canonical(k, &["Enabled", "FileTransfer"]) {
                Some("Enabled") => set_bool(
                    val,
                    &mut self.cfg.limits.enabled,
                    &at.field("Limits", "Enabled"),
                ),
                Some(_) => self.decode_ft_limits(val, &at.field("Limits", "FileTransfer")),
                None => unknown(at, k),
            }
        })
    }

    fn decode_ft_limits(&mut self, v: &Json, at: &Loc) -> Result<(), DecodeError> {
        const S: &str = "FileTransferLimits";
        const NAMES: &[&str] = &[
            "Chroot",
            "FollowSymLinks",
            "AllowOverwrite",
            "OwnerPut",
            "GroupPut",
            "OwnerGet",
            "GroupGet",
            "Umask",
            "MaxFileSize",
            "Counters",
            "AllowSuid",
            "RegularFilesOnly",
            "PreserveMode",
            "PreserveOwner",
            "PreserveGroup",
        ];
        walk_object(v, at, "config.FileTransferLimits", |k, val| {
            let Some(name) = canonical(k, NAMES) else {
                return unknown(at, k);
            };
            let f = at.field(S, name);
            let ft = &mut self.cfg.limits.file_transfer;
            match name {
                "Chroot" => set_string(val, &mut ft.chroot, &f),
                "FollowSymLinks" => set_bool(val, &mut ft.follow_symlinks, &f),
                "AllowOverwrite" => set_bool(val, &mut ft.allow_overwrite, &f),
                "OwnerPut" => set_string(val, &mut ft.owner_put, &f),
                "GroupPut" => set_string(val, &mut ft.group_put, &f),
                "OwnerGet" => set_strings(val, &mut self.owner_get, &f),
                "GroupGet" => set_strings(val, &mut self.group_get, &f),
                "Umask" => set_string(val, &mut ft.umask, &f),
                "MaxFileSize" => set_uint(val, &mut ft.max_file_size, &f),
                "Counters" => decode_counters(val, &mut ft.counters, &f),
                "AllowSuid" => set_bool(val, &mut ft.allow_suid, &f),
                "RegularFilesOnly" => set_bool(val, &mut ft.regular_files_only, &f),
                "PreserveMode" => set_opt_bool(val, &mut self.preserve_mode, &f),
                "PreserveOwner" => set_opt_bool(val, &mut self.preserve_owner, &f),
                _ => set_opt_bool(val, &mut self.preserve_group, &f),
            }
        })
    }
}

fn decode_terminal(v: &Json, t: &mut TerminalConfig, at: &Loc) -> Result<(), DecodeError> {
    const S: &str = "TerminalConfig";
    walk_object(v, at, "config.TerminalConfig", |k, val| {
        match canonical(k, &["Width", "Height", "Disable"]) {
            Some("Width") => set_uint(val, &mut t.width, &at.field(S, "Width")),
            Some("Height") => set_uint(val, &mut t.height, &at.field(S, "Height")),
            Some(_) => set_bool(val, &mut t.disable, &at.field(S, "Disable")),
            None => unknown(at, k),
        }
    })
}

fn decode_sessions(v: &Json, s: &mut SessionsConfig, at: &Loc) -> Result<(), DecodeError> {
    const S: &str = "SessionsConfig";
    const NAMES: &[&str] = &[
        "StopExpired",
        "ExpireAfter",
        "ExpireAfterIdle",
        "MaxPerUser",
    ];
    walk_object(v, at, "config.SessionsConfig", |k, val| {
        let Some(name) = canonical(k, NAMES) else {
            return unknown(at, k);
        };
        let f = at.field(S, name);
        match name {
            "StopExpired" => set_bool(val, &mut s.stop_expired, &f),
            "ExpireAfter" => set_uint(val, &mut s.expire_after, &f),
            "ExpireAfterIdle" => set_uint(val, &mut s.expire_after_idle, &f),
            _ => set_uint(val, &mut s.max_per_user, &f),
        }
    })
}

fn decode_counters(v: &Json, c: &mut Counters, at: &Loc) -> Result<(), DecodeError> {
    const S: &str = "RateLimits";
    walk_object(v, at, "config.RateLimits", |k, val| {
        match canonical(k, &["MaxBytesTxPerMinute", "MaxBytesRxPerMinute"]) {
            Some("MaxBytesTxPerMinute") => set_uint(
                val,
                &mut c.max_bytes_tx_per_minute,
                &at.field(S, "MaxBytesTxPerMinute"),
            ),
            Some(_) => set_uint(
                val,
                &mut c.max_bytes_rx_per_minute,
                &at.field(S, "MaxBytesRxPerMinute"),
            ),
            None => unknown(at, k),
        }
    })
}

fn decode_toggle(
    v: &Json,
    t: &mut Toggle,
    go_struct: &'static str,
    at: &Loc,
) -> Result<(), DecodeError> {
    let go_type = format!("config.{go_struct}");
    walk_object(v, at, &go_type, |k, val| match canonical(k, &["Disable"]) {
        Some(_) => set_bool(val, &mut t.disable, &at.field(go_struct, "Disable")),
        None => unknown(at, k),
    })
}

/// The second, deprecated view of a file (behavior.md §2.4): decoded only to warn.
#[derive(Default)]
struct Deprecated {
    server_url: String,
    servers: usize,
    client_protocol: String,
    https: [String; 3],
    skip_verify: bool,
    server_certificate: String,
}

impl Deprecated {
    const NAMES: &'static [&'static str] = &[
        "ServerURL",
        "Servers",
        "ClientProtocol",
        "HttpsClient",
        "SkipVerify",
        "ServerCertificate",
    ];

    fn decode(&mut self, v: &Json) -> Result<(), DecodeError> {
        let top = Loc::top(DEPRECATED);
        walk_object(v, &top, "config.MenderShellConfigDeprecated", |k, val| {
            let Some(name) = canonical(k, Self::NAMES) else {
                return Ok(());
            };
            let at = top.field(DEPRECATED, name);
            match name {
                "ServerURL" => set_string(val, &mut self.server_url, &at),
                "Servers" => self.decode_servers(val, &at),
                "ClientProtocol" => set_string(val, &mut self.client_protocol, &at),
                "HttpsClient" => {
                    // Anonymous Go struct: its name in error messages is empty.
                    let go_type = "struct { Certificate string; Key string; SSLEngine string }";
                    let https = &mut self.https;
                    walk_object(val, &at, go_type, |k, val| {
                        match canonical(k, &["Certificate", "Key", "SSLEngine"]) {
                            Some("Certificate") => {
                                set_string(val, &mut https[0], &at.field("", "Certificate"))
                            }
                            Some("Key") => set_string(val, &mut https[1], &at.field("", "Key")),
                            Some(_) => set_string(val, &mut https[2], &at.field("", "SSLEngine")),
                            None => Ok(()),
                        }
                    })
                }
                "SkipVerify" => set_bool(val, &mut self.skip_verify, &at),
                _ => set_string(val, &mut self.server_certificate, &at),
            }
        })
    }

    fn decode_servers(&mut self, v: &Json, at: &Loc) -> Result<(), DecodeError> {
        const ELEM: &str = "struct { ServerURL string }";
        match v {
            Json::Null => self.servers = 0,
            Json::Array(items) => {
                for item in items {
                    let mut url = String::new();
                    walk_object(item, at, ELEM, |k, val| {
                        match canonical(k, &["ServerURL"]) {
                            Some(_) => set_string(val, &mut url, &at.field("", "ServerURL")),
                            None => Ok(()),
                        }
                    })?;
                }
                self.servers = items.len();
            }
            other => return Err(at.type_error(other.kind(), &format!("[]{ELEM}"))),
        }
        Ok(())
    }

    fn warn(&self) {
        if !self.server_url.is_empty() {
            log::warn!("ServerURL field is deprecated, ignoring.");
        }
        if self.servers > 0 {
            log::warn!("Servers field is deprecated, ignoring.");
        }
        if !self.client_protocol.is_empty() {
            log::warn!("ClientProtocol field is deprecated, ignoring.");
        }
        if self.https.iter().any(|s| !s.is_empty()) {
            log::warn!("HTTPSClient field is deprecated, ignoring.");
        }
        if self.skip_verify {
            log::warn!("SkipVerify field is deprecated, ignoring.");
        }
        if !self.server_certificate.is_empty() {
            log::warn!("ServerCertificate field is deprecated, ignoring.");
        }
    }
}

// ---------------------------------------------------------------------------
// Go encoding/json decoding rules over the parsed tree
// ---------------------------------------------------------------------------

/// A type error: the dotted key and Go's message.
#[derive(Debug)]
struct DecodeError {
    key: String,
    detail: String,
}

/// Where a value sits: the Go struct holding it and the dotted field path from the top.
struct Loc {
    owner: &'static str,
    path: String,
}

impl Loc {
    fn top(owner: &'static str) -> Self {
        Loc {
            owner,
            path: String::new(),
        }
    }

    /// The location of field `name` of the struct `owner` found at `self`.
    fn field(&self, owner: &'static str, name: &str) -> Loc {
        let path = if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path)
        };
        Loc { owner, path }
    }

    /// Go's `UnmarshalTypeError` text for a value of JSON kind `found` at this place.
    fn type_error(&self, found: &str, go_type: &str) -> DecodeError {
        let detail = if self.path.is_empty() {
            format!("json: cannot unmarshal {found} into Go value of type {go_type}")
        } else {
            format!(
                "json: cannot unmarshal {found} into Go struct field {}.{} of type {go_type}",
                self.owner, self.path
            )
        };
        DecodeError {
            key: self.path.clone(),
            detail,
        }
    }
}

/// Go's key matching: ASCII case folding plus the two non-ASCII runes that fold
/// onto ASCII letters (U+017F long s, U+212A Kelvin sign).
fn canonical(key: &str, names: &[&'static str]) -> Option<&'static str> {
    fn fold(c: char) -> char {
        match c {
            '\u{17f}' => 's',
            '\u{212a}' => 'k',
            c => c.to_ascii_lowercase(),
        }
    }
    names
        .iter()
        .copied()
        .find(|n| key.chars().map(fold).eq(n.chars().map(fold)))
}

fn unknown(at: &Loc, key: &str) -> Result<(), DecodeError> {
    if at.path.is_empty() {
        log::debug!("Ignoring unknown configuration key {key}");
    } else {
        log::debug!("Ignoring unknown configuration key {}.{key}", at.path);
    }
    Ok(())
}

/// Visit the members of an object in document order; `null` is a no-op.
fn walk_object(
    v: &Json,
    at: &Loc,
    go_type: &str,
    mut f: impl FnMut(&str, &Json) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    match v {
        Json::Null => Ok(()),
        Json::Object(members) => members.iter().try_for_each(|(k, val)| f(k, val)),
        other => Err(at.type_error(other.kind(), go_type)),
    }
}

fn set_string(v: &Json, dst: &mut String, at: &Loc) -> Result<(), DecodeError> {
    match v {
        Json::Null => Ok(()),
        Json::Str(s) => {
            dst.clone_from(s);
            Ok(())
        }
        other => Err(at.type_error(other.kind(), "string")),
    }
}

fn set_bool(v: &Json, dst: &mut bool, at: &Loc) -> Result<(), DecodeError> {
    match v {
        Json::Null => Ok(()),
        Json::Bool(b) => {
            *dst = *b;
            Ok(())
        }
        other => Err(at.type_error(other.kind(), "bool")),
    }
}

fn set_opt_bool(v: &Json, dst: &mut Option<bool>, at: &Loc) -> Result<(), DecodeError> {
    let mut b = dst.unwrap_or(false);
    set_bool(v, &mut b, at)?;
    if !matches!(v, Json::Null) {
        *dst = Some(b);
    }
    Ok(())
}

/// Unsigned Go integer types: the literal must be plain digits within range.
trait GoUint: TryFrom<u64> + Copy {
    const GO_NAME: &'static str;
}
impl GoUint for u16 {
    const GO_NAME: &'static str = "uint16";
}
impl GoUint for u32 {
    const GO_NAME: &'static str = "uint32";
}
impl GoUint for u64 {
    const GO_NAME: &'static str = "uint64";
}

fn set_uint<T: GoUint>(v: &Json, dst: &mut T, at: &Loc) -> Result<(), DecodeError> {
    match v {
        Json::Null => Ok(()),
        // Go runs strconv.ParseUint(literal, 10, 64): no sign, fraction or exponent.
        Json::Number(lit) => match lit.parse::<u64>().ok().and_then(|n| T::try_from(n).ok()) {
            Some(n) if lit.bytes().all(|b| b.is_ascii_digit()) => {
                *dst = n;
                Ok(())
            }
            _ => Err(at.type_error(&format!("number {lit}"), T::GO_NAME)),
        },
        other => Err(at.type_error(other.kind(), T::GO_NAME)),
    }
}

fn set_int(v: &Json, dst: &mut i64, at: &Loc) -> Result<(), DecodeError> {
    match v {
        Json::Null => Ok(()),
        // Go runs strconv.ParseInt(literal, 10, 64): optional '-', then digits.
        Json::Number(lit) => {
            let digits = lit.strip_prefix('-').unwrap_or(lit);
            match lit.parse::<i64>() {
                Ok(n) if digits.bytes().all(|b| b.is_ascii_digit()) => {
                    *dst = n;
                    Ok(())
                }
                _ => Err(at.type_error(&format!("number {lit}"), "int")),
            }
        }
        other => Err(at.type_error(other.kind(), "int")),
    }
}

/// Go slice decoding: `null` makes it nil (absent); an array replaces the contents,
/// a `null` element keeps what the previous slice had at that index.
fn set_strings(v: &Json, dst: &mut Option<Vec<String>>, at: &Loc) -> Result<(), DecodeError> {
    match v {
        Json::Null => {
            *dst = None;
            Ok(())
        }
        Json::Array(items) => {
            let mut out = dst.take().unwrap_or_default();
            out.resize(items.len(), String::new());
            for (slot, item) in out.iter_mut().zip(items) {
                set_string(item, slot, at)?;
            }
            *dst = Some(out);
            Ok(())
        }
        other => Err(at.type_error(other.kind(), "[]string")),
    }
}

// ---------------------------------------------------------------------------
// A small JSON reader: keeps member order and duplicates, number literals as
// written, and reports syntax errors with Go's scanner texts.
// ---------------------------------------------------------------------------

/// A parsed JSON value; objects keep document order and duplicate keys.
#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    /// The literal as written, validated against the JSON number grammar.
    Number(String),
    Str(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    /// The word Go uses for this kind of value in type errors.
    fn kind(&self) -> &'static str {
        match self {
            Json::Null => "null",
            Json::Bool(_) => "bool",
            Json::Number(_) => "number",
            Json::Str(_) => "string",
            Json::Array(_) => "array",
            Json::Object(_) => "object",
        }
    }
}

/// Nesting bound; Go allows 10000, but recursion that deep could overflow a
/// small thread stack and no configuration nests beyond a handful of levels.
const MAX_DEPTH: usize = 256;

fn parse_json(bytes: &[u8]) -> Result<Json, String> {
    let mut p = JsonParser {
        b: bytes,
        i: 0,
        depth: 0,
    };
    let v = p.value()?;
    p.ws();
    match p.peek() {
        None => Ok(v),
        Some(c) => Err(invalid(c, "after top-level value")),
    }
}

fn eof() -> String {
    "unexpected end of JSON input".to_string()
}

fn invalid(c: u8, context: &str) -> String {
    format!("invalid character {} {context}", quote_char(c))
}

/// Go's `quoteChar`: the byte as a rune, quoted like `strconv.Quote` in single quotes.
fn quote_char(c: u8) -> String {
    match c {
        b'\'' => "'\\''".to_string(),
        b'"' => "'\"'".to_string(),
        _ => {
            let inner = match c {
                0x07 => "\\a".to_string(),
                0x08 => "\\b".to_string(),
                0x0c => "\\f".to_string(),
                b'\n' => "\\n".to_string(),
                b'\r' => "\\r".to_string(),
                b'\t' => "\\t".to_string(),
                0x0b => "\\v".to_string(),
                b'\\' => "\\\\".to_string(),
                0x00..=0x1f | 0x7f => format!("\\x{c:02x}"),
                0x80..=0xa0 | 0xad => format!("\\u{c:04x}"),
                _ => char::from(c).to_string(),
            };
            format!("'{inner}'")
        }
    }
}

struct JsonParser<'a> {
    b: &'a [u8],
    i: usize,
    depth: usize,
}

impl JsonParser<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Result<u8, String> {
        let c = self.peek().ok_or_else(eof)?;
        self.i += 1;
        Ok(c)
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn value(&mut self) -> Result<Json, String> {
        self.ws();
        match self.peek().ok_or_else(eof)? {
            b'{' => self.nested(Self::object),
            b'[' => self.nested(Self::array),
            b'"' => self.string().map(Json::Str),
            b't' => self.literal("true", Json::Bool(true)),
            b'f' => self.literal("false", Json::Bool(false)),
            b'n' => self.literal("null", Json::Null),
            b'-' | b'0'..=b'9' => self.number(),
            c => Err(invalid(c, "looking for beginning of value")),
        }
    }

    fn nested(&mut self, f: fn(&mut Self) -> Result<Json, String>) -> Result<Json, String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err("exceeded max depth".to_string());
        }
        let v = f(self);
        self.depth -= 1;
        v
    }

    fn literal(&mut self, word: &str, v: Json) -> Result<Json, String> {
        self.i += 1;
        for &want in &word.as_bytes()[1..] {
            let c = self.next()?;
            if c != want {
                let ctx = format!("in literal {word} (expecting {})", quote_char(want));
                return Err(invalid(c, &ctx));
            }
        }
        Ok(v)
    }

    fn object(&mut self) -> Result<Json, String> {
        self.i += 1;
        let mut members = Vec::new();
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(Json::Object(members));
        }
        loop {
            self.ws();
            match self.peek().ok_or_else(eof)? {
                b'"' => {}
                c => return Err(invalid(c, "looking for beginning of object key string")),
            }
            let key = self.string()?;
            self.ws();
            match self.next()? {
                b':' => {}
                c => return Err(invalid(c, "after object key")),
            }
            let v = self.value()?;
            members.push((key, v));
            self.ws();
            match self.next()? {
                b',' => {}
                b'}' => return Ok(Json::Object(members)),
                c => return Err(invalid(c, "after object key:value pair")),
            }
        }
    }

    fn array(&mut self) -> Result<Json, String> {
        self.i += 1;
        let mut items = Vec::new();
        self.ws();
        if self.peek() == Some(b']') {
            self.i += 1;
            return Ok(Json::Array(items));
        }
        loop {
            items.push(self.value()?);
            self.ws();
            match self.next()? {
                b',' => {}
                b']' => return Ok(Json::Array(items)),
                c => return Err(invalid(c, "after array element")),
            }
        }
    }

    fn digits(&mut self) {
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.i += 1;
        }
    }

    fn number(&mut self) -> Result<Json, String> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
            match self.peek().ok_or_else(eof)? {
                b'0'..=b'9' => {}
                c => return Err(invalid(c, "in numeric literal")),
            }
        }
        // A leading 0 stands alone; "01" ends the number after the 0.
        if self.peek() == Some(b'0') {
            self.i += 1;
        } else {
            self.digits();
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            match self.peek().ok_or_else(eof)? {
                b'0'..=b'9' => self.digits(),
                c => return Err(invalid(c, "after decimal point in numeric literal")),
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            match self.peek().ok_or_else(eof)? {
                b'0'..=b'9' => self.digits(),
                c => return Err(invalid(c, "in exponent of numeric literal")),
            }
        }
        // Only ASCII bytes were consumed, so this cannot fail.
        let lit = String::from_utf8_lossy(&self.b[start..self.i]).into_owned();
        Ok(Json::Number(lit))
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let mut n = 0;
        for _ in 0..4 {
            let c = self.next()?;
            let d = char::from(c)
                .to_digit(16)
                .ok_or_else(|| invalid(c, "in \\u hexadecimal character escape"))?;
            n = n * 16 + d;
        }
        Ok(n)
    }

    /// A string literal; invalid UTF-8 and lone surrogates become U+FFFD as in Go.
    fn string(&mut self) -> Result<String, String> {
        self.i += 1;
        let mut out: Vec<u8> = Vec::new();
        let push = |out: &mut Vec<u8>, ch: char| {
            let mut buf = [0u8; 4];
            out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
        };
        loop {
            match self.next()? {
                b'"' => break,
                b'\\' => match self.next()? {
                    c @ (b'"' | b'\\' | b'/') => out.push(c),
                    b'b' => out.push(0x08),
                    b'f' => out.push(0x0c),
                    b'n' => out.push(b'\n'),
                    b'r' => out.push(b'\r'),
                    b't' => out.push(b'\t'),
                    b'u' => {
                        let hi = self.hex4()?;
                        let ch = if (0xd800..0xdc00).contains(&hi) {
                            // Combine with a following low surrogate escape, if any;
                            // otherwise leave that escape for the next iteration.
                            match self.low_surrogate() {
                                Some(lo) => {
                                    char::from_u32(0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00))
                                }
                                None => None,
                            }
                        } else {
                            char::from_u32(hi)
                        };
                        push(&mut out, ch.unwrap_or(char::REPLACEMENT_CHARACTER));
                    }
                    c => return Err(invalid(c, "in string escape code")),
                },
                c if c < 0x20 => return Err(invalid(c, "in string literal")),
                c => out.push(c),
            }
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    fn low_surrogate(&mut self) -> Option<u32> {
        let rest = self.b.get(self.i..self.i + 6)?;
        if rest[0] != b'\\' || rest[1] != b'u' {
            return None;
        }
        let hex = std::str::from_utf8(&rest[2..]).ok()?;
        let lo = u32::from_str_radix(hex, 16).ok()?;
        if hex.bytes().all(|b| b.is_ascii_hexdigit()) && (0xdc00..0xe000).contains(&lo) {
            self.i += 6;
            Some(lo)
        } else {
            None
        }
    }
}

// ---------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------

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
    log::debug!("Verified configuration = {cfg:?}");
    Ok(user)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::sync::Once;
    use std::sync::atomic::{AtomicUsize, Ordering};

    // --- log capture: each test thread sees only its own records ---

    thread_local! {
        static LOGS: RefCell<Vec<(log::Level, String)>> = const { RefCell::new(Vec::new()) };
    }

    struct Capture;

    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata) -> bool {
            true
        }
        fn log(&self, r: &log::Record) {
            LOGS.with(|l| l.borrow_mut().push((r.level(), r.args().to_string())));
        }
        fn flush(&self) {}
    }

    static LOGGER: Capture = Capture;
    static INIT: Once = Once::new();

    /// Start capturing; false if another test module installed a logger first.
    fn capture() -> bool {
        INIT.call_once(|| {
            if log::set_logger(&LOGGER).is_ok() {
                log::set_max_level(log::LevelFilter::Trace);
            }
        });
        LOGS.with(|l| l.borrow_mut().clear());
        log::logger() as *const dyn log::Log as *const () == &LOGGER as *const Capture as *const ()
    }

    fn logged(level: log::Level, text: &str) -> bool {
        LOGS.with(|l| l.borrow().iter().any(|(lv, m)| *lv == level && m == text))
    }

    // --- temp dirs ---

    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "mender-connect-config-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            std::fs::create_dir_all(&dir).expect("create temp dir");
            TempDir(dir)
        }

        fn file(&self, name: &str, content: &str) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, content).expect("write temp file");
            p
        }

        fn missing(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }

        fn executable(&self, name: &str, mode: u32) -> PathBuf {
            let p = self.file(name, "#!/bin/sh\n");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
            p
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Load `main` over `fallback` (either may be None = missing file).
    fn load2(fallback: Option<&str>, main: Option<&str>) -> Result<Config, ConfigError> {
        let d = TempDir::new();
        let f = match fallback {
            Some(c) => d.file("fallback.conf", c),
            None => d.missing("fallback.conf"),
        };
        let m = match main {
            Some(c) => d.file("main.conf", c),
            None => d.missing("main.conf"),
        };
        load(&m, &f)
    }

    fn load1(main: &str) -> Config {
        load2(None, Some(main)).unwrap_or_else(|e| panic!("{main}: {e}"))
    }

    fn load_err(main: &str) -> ConfigError {
        match load2(None, Some(main)) {
            Ok(c) => panic!("{main} loaded: {c:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn defaults_with_no_files() {
        let logs = capture();
        let c = load2(None, None).expect("no files is fine");
        assert_eq!(c, Config::default());
        assert_eq!(c.shell_command, "/bin/sh");
        assert_eq!(c.shell_arguments, vec!["--login".to_string()]);
        assert_eq!(c.user, "");
        assert_eq!((c.terminal.width, c.terminal.height), (80, 40));
        assert!(!c.terminal.disable);
        assert!(c.sessions.stop_expired);
        assert_eq!(c.sessions.expire_after, 0);
        assert_eq!(c.sessions.expire_after_idle, 600);
        assert_eq!(c.sessions.max_per_user, 1);
        assert_eq!(c.reconnect_interval_seconds, 5);
        assert!(!c.file_transfer.disable && !c.port_forward.disable && !c.mender_client.disable);
        let ft = &c.limits.file_transfer;
        assert!(!c.limits.enabled);
        assert!(ft.preserve_mode && ft.preserve_owner && ft.preserve_group);
        assert!(ft.owner_get.is_empty() && ft.group_get.is_empty());
        assert_eq!(ft.max_file_size, 0);
        if logs {
            assert!(logged(
                log::Level::Info,
                "No configuration files present. Using defaults"
            ));
            assert!(logged(
                log::Level::Warn,
                "ShellCommand is empty, defaulting to /bin/sh"
            ));
            assert!(logged(
                log::Level::Warn,
                "ShellArguments is empty, defaulting to [--login]"
            ));
            assert!(logged(
                log::Level::Info,
                "Defaulting ExpireAfterIdle to 10m0s"
            ));
        }
    }

    #[test]
    fn full_file_loads_every_key() {
        let c = load1(
            r#"{"ShellCommand":"/bin/bash","ShellArguments":["-i","-l"],"User":"nobody",
            "Terminal":{"Width":100,"Height":30,"Disable":true},
            "Sessions":{"StopExpired":true,"ExpireAfter":10,"ExpireAfterIdle":20,"MaxPerUser":3},
            "ReconnectIntervalSeconds":7,
            "FileTransfer":{"Disable":true},"PortForward":{"Disable":true},"MenderClient":{"Disable":true},
            "Limits":{"Enabled":true,"FileTransfer":{"Chroot":"/data","FollowSymLinks":true,
              "AllowOverwrite":true,"OwnerPut":"o","GroupPut":"g","OwnerGet":["a","b"],"GroupGet":["c"],
              "Umask":"022","MaxFileSize":18446744073709551615,
              "Counters":{"MaxBytesTxPerMinute":1,"MaxBytesRxPerMinute":2},
              "AllowSuid":true,"RegularFilesOnly":true}}}"#,
        );
        assert_eq!(c.shell_command, "/bin/bash");
        assert_eq!(c.shell_arguments, vec!["-i", "-l"]);
        assert_eq!(c.user, "nobody");
        assert_eq!(
            c.terminal,
            TerminalConfig {
                width: 100,
                height: 30,
                disable: true
            }
        );
        assert_eq!(
            c.sessions,
            SessionsConfig {
                stop_expired: true,
                expire_after: 10,
                expire_after_idle: 20,
                max_per_user: 3
            }
        );
        assert_eq!(c.reconnect_interval_seconds, 7);
        assert!(c.file_transfer.disable && c.port_forward.disable && c.mender_client.disable);
        assert!(c.limits.enabled);
        let ft = &c.limits.file_transfer;
        assert_eq!(ft.chroot, "/data");
        assert!(ft.follow_symlinks && ft.allow_overwrite && ft.allow_suid && ft.regular_files_only);
        assert_eq!((ft.owner_put.as_str(), ft.group_put.as_str()), ("o", "g"));
        assert_eq!(ft.owner_get, vec!["a", "b"]);
        assert_eq!(ft.group_get, vec!["c"]);
        assert_eq!(ft.umask, "022");
        assert_eq!(ft.max_file_size, u64::MAX);
        assert_eq!(
            ft.counters,
            Counters {
                max_bytes_tx_per_minute: 1,
                max_bytes_rx_per_minute: 2
            }
        );
        assert!(ft.preserve_mode && ft.preserve_owner && ft.preserve_group);
    }

    #[test]
    fn same_result_as_main_or_fallback() {
        let text = r#"{"User":"root","Terminal":{"Width":120}}"#;
        let a = load2(None, Some(text)).expect("as main");
        let b = load2(Some(text), None).expect("as fallback");
        assert_eq!(a, b);
        assert_eq!(a.terminal.width, 120);
    }

    #[test]
    fn main_overrides_fallback_field_by_field() {
        let c = load2(
            Some(
                r#"{"User":"fb","ShellCommand":"/bin/fb","Terminal":{"Width":100,"Height":10},
                "ShellArguments":["a","b"],"Limits":{"FileTransfer":{"OwnerGet":["x","y"],"Umask":"077"}}}"#,
            ),
            Some(
                r#"{"User":"main","Terminal":{"Height":20},"ShellArguments":["c"],
                "Limits":{"FileTransfer":{"OwnerGet":["z"]}}}"#,
            ),
        )
        .expect("load");
        assert_eq!(c.user, "main");
        assert_eq!(c.shell_command, "/bin/fb");
        assert_eq!((c.terminal.width, c.terminal.height), (100, 20));
        // Arrays are replaced as a whole.
        assert_eq!(c.shell_arguments, vec!["c"]);
        assert_eq!(c.limits.file_transfer.owner_get, vec!["z"]);
        assert_eq!(c.limits.file_transfer.umask, "077");
    }

    #[test]
    fn null_rules() {
        let fb = r#"{"User":"fb","Terminal":{"Width":100},"ShellArguments":["-x"],
            "Sessions":{"StopExpired":false},"Limits":{"FileTransfer":{"GroupGet":["g"]}}}"#;
        // null for scalars, bools and objects keeps the previous value.
        let c = load2(
            Some(fb),
            Some(r#"{"User":null,"Terminal":null,"Sessions":{"StopExpired":null}}"#),
        )
        .expect("load");
        assert_eq!(c.user, "fb");
        assert_eq!(c.terminal.width, 100);
        assert!(!c.sessions.stop_expired);
        assert_eq!(c.shell_arguments, vec!["-x"]);
        // null for arrays resets them to absent (ShellArguments then gets its default).
        let c = load2(
            Some(fb),
            Some(r#"{"ShellArguments":null,"Limits":{"FileTransfer":{"GroupGet":null}}}"#),
        )
        .expect("load");
        assert_eq!(c.shell_arguments, vec!["--login"]);
        assert!(c.limits.file_transfer.group_get.is_empty());
        // Top-level null is accepted and changes nothing.
        let c = load2(Some(fb), Some("null")).expect("load");
        assert_eq!(c.user, "fb");
        // A null array element keeps the previous slice's element at that index (Go).
        let c = load2(
            Some(r#"{"ShellArguments":["a","b"]}"#),
            Some(r#"{"ShellArguments":[null]}"#),
        )
        .expect("load");
        assert_eq!(c.shell_arguments, vec!["a"]);
    }

    #[test]
    fn shell_arguments_empty_vs_absent_vs_null() {
        assert_eq!(
            load1(r#"{"ShellArguments":[]}"#).shell_arguments,
            Vec::<String>::new()
        );
        assert_eq!(
            load1(r#"{"ShellArguments":[""]}"#).shell_arguments,
            vec![""]
        );
        assert_eq!(load1("{}").shell_arguments, vec!["--login"]);
        assert_eq!(
            load1(r#"{"ShellArguments":null}"#).shell_arguments,
            vec!["--login"]
        );
        assert_eq!(
            load1(r#"{"ShellArguments":["--norc","-i"]}"#).shell_arguments,
            vec!["--norc", "-i"]
        );
    }

    #[test]
    fn keys_match_case_insensitively() {
        let c = load1(
            r#"{"shellcommand":"/bin/zsh","USER":"u","terminal":{"WIDTH":100},
            "limits":{"enabled":true,"filetransfer":{"followsymlinks":true,"COUNTERS":{"maxbytestxperminute":9}}},
            "ſessions":{"maxPerUser":4}}"#,
        );
        assert_eq!(c.shell_command, "/bin/zsh");
        assert_eq!(c.user, "u");
        assert_eq!(c.terminal.width, 100);
        assert!(c.limits.enabled && c.limits.file_transfer.follow_symlinks);
        assert_eq!(c.limits.file_transfer.counters.max_bytes_tx_per_minute, 9);
        assert_eq!(c.sessions.max_per_user, 4);
    }

    #[test]
    fn duplicate_keys_last_wins_in_document_order() {
        assert_eq!(load1(r#"{"User":"a","User":"b"}"#).user, "b");
        assert_eq!(
            load1(r#"{"user":"a","USER":"b","User":"c","uSeR":"d"}"#).user,
            "d"
        );
        assert_eq!(load1(r#"{"USER":"z","User":"a"}"#).user, "a");
        // Duplicate objects merge field by field, like two files.
        let c = load1(r#"{"Terminal":{"Width":1},"terminal":{"Height":2}}"#);
        assert_eq!((c.terminal.width, c.terminal.height), (1, 2));
        assert_eq!(
            load1(r#"{"ShellArguments":["a","b"],"shellarguments":["c"]}"#).shell_arguments,
            vec!["c"]
        );
    }

    #[test]
    fn unknown_keys_ignored_with_debug_log() {
        let logs = capture();
        let c = load1(r#"{"Bogus":1,"User":"u","Terminal":{"Colour":"red"},"ServerURL":"x"}"#);
        assert_eq!(c.user, "u");
        if logs {
            assert!(logged(
                log::Level::Debug,
                "Ignoring unknown configuration key Bogus"
            ));
            assert!(logged(
                log::Level::Debug,
                "Ignoring unknown configuration key Terminal.Colour"
            ));
            // Deprecated keys get their warning, not an "unknown" line.
            assert!(!logged(
                log::Level::Debug,
                "Ignoring unknown configuration key ServerURL"
            ));
        }
    }

    #[test]
    fn stop_expired_false_zeroes_expiries() {
        let c =
            load1(r#"{"Sessions":{"StopExpired":false,"ExpireAfter":10,"ExpireAfterIdle":20}}"#);
        assert!(!c.sessions.stop_expired);
        assert_eq!(
            (c.sessions.expire_after, c.sessions.expire_after_idle),
            (0, 0)
        );
    }

    #[test]
    fn expiry_defaults() {
        let c = load1(r#"{"Sessions":{"ExpireAfter":50}}"#);
        assert!(c.sessions.stop_expired);
        assert_eq!(
            (c.sessions.expire_after, c.sessions.expire_after_idle),
            (50, 0)
        );
        let logs = capture();
        let c = load1(r#"{"Sessions":{"ExpireAfter":50,"ExpireAfterIdle":60}}"#);
        assert_eq!(
            (c.sessions.expire_after, c.sessions.expire_after_idle),
            (50, 60)
        );
        if logs {
            assert!(logged(
                log::Level::Warn,
                "Both ExpireAfter and ExpireAfterIdle specified; they are mutually exclusive"
            ));
        }
    }

    #[test]
    fn zero_values_get_defaults_negative_reconnect_kept() {
        let c = load1(
            r#"{"Terminal":{"Width":0,"Height":0},"Sessions":{"MaxPerUser":0},"ReconnectIntervalSeconds":0}"#,
        );
        assert_eq!((c.terminal.width, c.terminal.height), (80, 40));
        assert_eq!(c.sessions.max_per_user, 1);
        assert_eq!(c.reconnect_interval_seconds, 5);
        assert_eq!(
            load1(r#"{"ReconnectIntervalSeconds":-3}"#).reconnect_interval_seconds,
            -3
        );
        assert_eq!(
            load1(r#"{"ReconnectIntervalSeconds":-0}"#).reconnect_interval_seconds,
            5
        );
    }

    #[test]
    fn preserve_flags_honoured() {
        let ft = load1(
            r#"{"Limits":{"FileTransfer":{"PreserveMode":false,"PreserveOwner":false,"PreserveGroup":false}}}"#,
        )
        .limits
        .file_transfer;
        assert!(!ft.preserve_mode && !ft.preserve_owner && !ft.preserve_group);
        let ft =
            load1(r#"{"Limits":{"FileTransfer":{"PreserveOwner":false,"PreserveGroup":null}}}"#)
                .limits
                .file_transfer;
        assert!(ft.preserve_mode && !ft.preserve_owner && ft.preserve_group);
        // A later null does not undo an earlier value.
        let c = load2(
            Some(r#"{"Limits":{"FileTransfer":{"PreserveMode":false}}}"#),
            Some(r#"{"Limits":{"FileTransfer":{"PreserveMode":null}}}"#),
        )
        .expect("load");
        assert!(!c.limits.file_transfer.preserve_mode);
    }

    #[test]
    fn deprecated_keys_warn_but_load() {
        let cases = [
            (
                r#"{"ServerURL":"https://x"}"#,
                "ServerURL field is deprecated, ignoring.",
            ),
            (
                r#"{"Servers":[{"ServerURL":"https://x"}]}"#,
                "Servers field is deprecated, ignoring.",
            ),
            (
                r#"{"ClientProtocol":"https"}"#,
                "ClientProtocol field is deprecated, ignoring.",
            ),
            (
                r#"{"HTTPSClient":{"Certificate":"c"}}"#,
                "HTTPSClient field is deprecated, ignoring.",
            ),
            (
                r#"{"HttpsClient":{"Key":"k"}}"#,
                "HTTPSClient field is deprecated, ignoring.",
            ),
            (
                r#"{"httpsclient":{"SSLEngine":"e"}}"#,
                "HTTPSClient field is deprecated, ignoring.",
            ),
            (
                r#"{"SkipVerify":true}"#,
                "SkipVerify field is deprecated, ignoring.",
            ),
            (
                r#"{"ServerCertificate":"/c.pem"}"#,
                "ServerCertificate field is deprecated, ignoring.",
            ),
        ];
        for (text, warning) in cases {
            let logs = capture();
            load1(text);
            if logs {
                assert!(logged(log::Level::Warn, warning), "{text}");
            }
        }
        // Empty or false values do not warn.
        let logs = capture();
        load1(r#"{"ServerURL":"","Servers":[],"SkipVerify":false,"HttpsClient":{}}"#);
        if logs {
            assert!(!LOGS.with(|l| l.borrow().iter().any(|(_, m)| m.contains("deprecated"))));
        }
    }

    #[test]
    fn deprecated_key_wrong_type_fails() {
        let e = load_err(r#"{"ServerURL":5}"#);
        assert_eq!(e.key(), Some("ServerURL"));
        assert!(
            e.to_string().ends_with(
                "(ServerURL: json: cannot unmarshal number into Go struct field \
                 MenderShellConfigDeprecated.ServerURL of type string)"
            ),
            "{e}"
        );
        assert!(load2(None, Some(r#"{"SkipVerify":"yes"}"#)).is_err());
        assert!(load2(None, Some(r#"{"Servers":{}}"#)).is_err());
    }

    #[test]
    fn type_errors_name_file_and_key() {
        let d = TempDir::new();
        let main = d.file("x.conf", r#"{"Terminal":{"Width":-1}}"#);
        let e = load(&main, &d.missing("none")).expect_err("must fail");
        assert_eq!(e.file(), Some(main.as_path()));
        assert_eq!(e.key(), Some("Terminal.Width"));
        assert_eq!(
            e.to_string(),
            format!(
                "Error loading configuration from file: {} (Terminal.Width: json: cannot unmarshal \
                 number -1 into Go struct field TerminalConfig.Terminal.Width of type uint16)",
                main.display()
            )
        );

        let cases = [
            (
                r#"{"Terminal":{"Height":1.5}}"#,
                "Terminal.Height",
                "number 1.5",
                "TerminalConfig.Terminal.Height of type uint16",
            ),
            (
                r#"{"Terminal":{"Width":70000}}"#,
                "Terminal.Width",
                "number 70000",
                "TerminalConfig.Terminal.Width of type uint16",
            ),
            (
                r#"{"Sessions":{"ExpireAfter":-5}}"#,
                "Sessions.ExpireAfter",
                "number -5",
                "SessionsConfig.Sessions.ExpireAfter of type uint32",
            ),
            (
                r#"{"Sessions":{"MaxPerUser":"3"}}"#,
                "Sessions.MaxPerUser",
                "string",
                "SessionsConfig.Sessions.MaxPerUser of type uint32",
            ),
            (
                r#"{"Sessions":{"ExpireAfter":1e2}}"#,
                "Sessions.ExpireAfter",
                "number 1e2",
                "SessionsConfig.Sessions.ExpireAfter of type uint32",
            ),
            (
                r#"{"ReconnectIntervalSeconds":2.0}"#,
                "ReconnectIntervalSeconds",
                "number 2.0",
                "MenderShellConfigFromFile.ReconnectIntervalSeconds of type int",
            ),
            (
                r#"{"ReconnectIntervalSeconds":9223372036854775808}"#,
                "ReconnectIntervalSeconds",
                "number 9223372036854775808",
                "MenderShellConfigFromFile.ReconnectIntervalSeconds of type int",
            ),
            (
                r#"{"ShellCommand":5}"#,
                "ShellCommand",
                "number",
                "MenderShellConfigFromFile.ShellCommand of type string",
            ),
            (
                r#"{"ShellArguments":"--login"}"#,
                "ShellArguments",
                "string",
                "MenderShellConfigFromFile.ShellArguments of type []string",
            ),
            (
                r#"{"ShellArguments":[1]}"#,
                "ShellArguments",
                "number",
                "MenderShellConfigFromFile.ShellArguments of type string",
            ),
            (
                r#"{"Terminal":{"Disable":1}}"#,
                "Terminal.Disable",
                "number",
                "TerminalConfig.Terminal.Disable of type bool",
            ),
            (
                r#"{"Terminal":{"Disable":"true"}}"#,
                "Terminal.Disable",
                "string",
                "TerminalConfig.Terminal.Disable of type bool",
            ),
            (
                r#"{"Terminal":5}"#,
                "Terminal",
                "number",
                "MenderShellConfigFromFile.Terminal of type config.TerminalConfig",
            ),
            (
                r#"{"Limits":{"FileTransfer":{"Counters":{"MaxBytesRxPerMinute":true}}}}"#,
                "Limits.FileTransfer.Counters.MaxBytesRxPerMinute",
                "bool",
                "RateLimits.Limits.FileTransfer.Counters.MaxBytesRxPerMinute of type uint64",
            ),
            (
                r#"{"Limits":{"FileTransfer":{"PreserveMode":"no"}}}"#,
                "Limits.FileTransfer.PreserveMode",
                "string",
                "FileTransferLimits.Limits.FileTransfer.PreserveMode of type bool",
            ),
            (
                r#"{"MenderClient":[]}"#,
                "MenderClient",
                "array",
                "MenderShellConfigFromFile.MenderClient of type config.MenderClientConfig",
            ),
        ];
        for (text, key, found, rest) in cases {
            let e = load_err(text);
            assert_eq!(e.key(), Some(key), "{text}");
            let want =
                format!("({key}: json: cannot unmarshal {found} into Go struct field {rest})");
            assert!(e.to_string().ends_with(&want), "{text}: {e}\nwant …{want}");
            assert!(
                e.to_string()
                    .starts_with("Error loading configuration from file: /"),
                "{e}"
            );
        }
    }

    #[test]
    fn first_type_error_in_document_order_wins() {
        let e = load_err(r#"{"User":1,"Terminal":{"Width":-1}}"#);
        assert_eq!(e.key(), Some("User"));
        // The main view is checked before the deprecated one.
        let e = load_err(r#"{"ServerURL":1,"User":1}"#);
        assert_eq!(e.key(), Some("User"));
    }

    #[test]
    fn top_level_non_object_fails() {
        for (text, kind) in [
            ("[]", "array"),
            (r#""x""#, "string"),
            ("5", "number"),
            ("true", "bool"),
        ] {
            let e = load_err(text);
            assert!(matches!(e, ConfigError::Decode { .. }), "{text}");
            assert_eq!(e.key(), None);
            assert!(
                e.to_string().ends_with(&format!(
                    "(json: cannot unmarshal {kind} into Go value of type config.MenderShellConfigFromFile)"
                )),
                "{e}"
            );
        }
    }

    #[test]
    fn syntax_errors() {
        let cases = [
            ("", "unexpected end of JSON input"),
            ("   ", "unexpected end of JSON input"),
            (r#"{"User":"x""#, "unexpected end of JSON input"),
            (
                r#"{"User":"x"} x"#,
                "invalid character 'x' after top-level value",
            ),
            ("{}{}", "invalid character '{' after top-level value"),
            (r#"{"User" "x"}"#, "invalid character '\"' after object key"),
            (
                r#"{"User":"x",}"#,
                "invalid character '}' looking for beginning of object key string",
            ),
            (
                "{User:1}",
                "invalid character 'U' looking for beginning of object key string",
            ),
            (
                r#"{"a":1 "b":2}"#,
                "invalid character '\"' after object key:value pair",
            ),
            (
                r#"{"a":[1 2]}"#,
                "invalid character '2' after array element",
            ),
            (
                r#"{"a":tru}"#,
                "invalid character '}' in literal true (expecting 'e')",
            ),
            (
                r#"{"a":nul}"#,
                "invalid character '}' in literal null (expecting 'l')",
            ),
            (r#"{"a":-x}"#, "invalid character 'x' in numeric literal"),
            (
                r#"{"a":1.}"#,
                "invalid character '}' after decimal point in numeric literal",
            ),
            (
                r#"{"a":1e}"#,
                "invalid character '}' in exponent of numeric literal",
            ),
            (
                r#"{"a":01}"#,
                "invalid character '1' after object key:value pair",
            ),
            (
                r#"{"a":"\q"}"#,
                "invalid character 'q' in string escape code",
            ),
            (
                r#"{"a":"\u12x4"}"#,
                "invalid character 'x' in \\u hexadecimal character escape",
            ),
            (
                "{\"a\":\"\t\"}",
                "invalid character '\\t' in string literal",
            ),
            (
                "{'a':1}",
                "invalid character '\\'' looking for beginning of object key string",
            ),
            (
                "\u{feff}{}",
                "invalid character 'ï' looking for beginning of value",
            ),
            (
                r#"{"a":+1}"#,
                "invalid character '+' looking for beginning of value",
            ),
        ];
        for (text, detail) in cases {
            let e = load_err(text);
            assert!(matches!(e, ConfigError::Syntax { .. }), "{text:?}: {e}");
            assert!(
                e.to_string().ends_with(&format!(
                    "(Error parsing mender configuration file: {detail})"
                )),
                "{text:?}: {e}"
            );
        }
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert!(load_err(&deep).to_string().contains("exceeded max depth"));
    }

    #[test]
    fn syntax_error_in_fallback_fails_too() {
        let e = load2(Some("{"), Some(r#"{"User":"x"}"#)).expect_err("must fail");
        assert!(
            e.file().is_some_and(|f| f.ends_with("fallback.conf")),
            "{e}"
        );
    }

    #[test]
    fn strings_unescaped_like_go() {
        let c = load1(r#"{"User":"a\"b\\c\/d\u00e9\ud83d\ude00\ud800x\n"}"#);
        assert_eq!(c.user, "a\"b\\c/d\u{e9}\u{1f600}\u{fffd}x\n");
        // Invalid UTF-8 inside a string is replaced, not an error.
        let d = TempDir::new();
        let p = d.0.join("bin.conf");
        std::fs::write(&p, b"{\"User\":\"a\xffb\"}").expect("write");
        let c = load(&p, &d.missing("none")).expect("load");
        assert_eq!(c.user, "a\u{fffd}b");
    }

    #[test]
    fn unreadable_files_fail() {
        let d = TempDir::new();
        let e = load(&d.0, &d.missing("none")).expect_err("directory");
        assert_eq!(
            e.to_string(),
            format!(
                "Error loading configuration from file: {0} (read {0}: is a directory)",
                d.0.display()
            )
        );
        // Permission checks do not apply to root.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            let p = d.file("secret.conf", "{}");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o000)).expect("chmod");
            let e = load(&p, &d.missing("none")).expect_err("unreadable");
            assert!(
                e.to_string()
                    .ends_with(&format!("(open {}: permission denied)", p.display()))
            );
        }
    }

    // --- validation ---

    /// A config that passes validation with `shells` listing its shell.
    fn valid(d: &TempDir) -> (Config, PathBuf) {
        let shell = d.executable("myshell", 0o755);
        let shells = d.file(
            "shells",
            &format!("# comment\n/bin/sh\n{}\r\n", shell.display()),
        );
        let cfg = Config {
            shell_command: shell.display().to_string(),
            user: "root".to_string(),
            ..Config::default()
        };
        (cfg, shells)
    }

    #[test]
    fn validate_ok_resolves_user() {
        let d = TempDir::new();
        let (cfg, shells) = valid(&d);
        let u = validate(&cfg, &shells).expect("valid");
        assert_eq!(u.name, "root");
        assert_eq!((u.uid, u.gid), (0, 0));
        assert!(u.home.is_absolute());
        assert!(u.groups.contains(&0));
    }

    #[test]
    fn validate_errors_in_order() {
        let d = TempDir::new();
        let (good, shells) = valid(&d);

        let cfg = Config {
            shell_command: "bin/sh".into(),
            user: String::new(),
            ..good.clone()
        };
        let e = validate(&cfg, &shells).expect_err("relative");
        assert_eq!(
            e.to_string(),
            "given shell (bin/sh) is not an absolute path"
        );
        assert_eq!(e.key(), Some("ShellCommand"));

        let noexec = d.executable("noexec", 0o644);
        let cfg = Config {
            shell_command: noexec.display().to_string(),
            user: String::new(),
            ..good.clone()
        };
        let e = validate(&cfg, &shells).expect_err("not executable");
        assert_eq!(
            e.to_string(),
            format!("given shell ({}) is not executable", noexec.display())
        );

        let missing = d.missing("nothere").display().to_string();
        let cfg = Config {
            shell_command: missing.clone(),
            ..good.clone()
        };
        let e = validate(&cfg, &shells).expect_err("missing");
        assert_eq!(
            e.to_string(),
            format!("given shell ({missing}) is not executable")
        );

        // Any one x bit is enough.
        let other_x = d.executable("otherx", 0o601);
        let cfg = Config {
            shell_command: other_x.display().to_string(),
            user: String::new(),
            ..good.clone()
        };
        let e = validate(&cfg, &shells).expect_err("no user");
        assert_eq!(e.to_string(), "please provide a user to run the shell as");
        assert_eq!(e.key(), Some("User"));

        let cfg = Config {
            user: "nosuchuser-mc-test".into(),
            ..good.clone()
        };
        let e = validate(&cfg, &shells).expect_err("unknown user");
        assert_eq!(e.to_string(), "user: unknown user nosuchuser-mc-test");

        let cfg = Config {
            shell_command: other_x.display().to_string(),
            ..good.clone()
        };
        let e = validate(&cfg, &shells).expect_err("not listed");
        assert_eq!(
            e.to_string(),
            format!(
                "ShellCommand {} is not present in {}",
                other_x.display(),
                shells.display()
            )
        );

        let cfg = Config {
            reconnect_interval_seconds: -1,
            ..good.clone()
        };
        let e = validate(&cfg, &shells).expect_err("negative");
        assert_eq!(e.key(), Some("ReconnectIntervalSeconds"));
        assert!(e.to_string().contains("ReconnectIntervalSeconds"), "{e}");
        assert!(validate(&good, &shells).is_ok());
    }

    #[test]
    fn shells_file_lines_match_exactly() {
        let d = TempDir::new();
        let (cfg, _) = valid(&d);
        let shell = cfg.shell_command.clone();
        for (content, ok) in [
            (shell.to_string(), true),
            (format!("{shell}\n"), true),
            (format!("{shell}\r\n"), true),
            (format!(" {shell}\n"), false),
            (format!("{shell} \n"), false),
            (format!("#{shell}\n"), false),
            (format!("{shell}/\n"), false),
        ] {
            let shells = d.file("shells2", &content);
            assert_eq!(validate(&cfg, &shells).is_ok(), ok, "{content:?}");
        }
    }

    #[test]
    fn missing_shells_file_accepts_only_bin_sh() {
        let d = TempDir::new();
        let (cfg, _) = valid(&d);
        let none = d.missing("shells-none");
        let e = validate(&cfg, &none).expect_err("other shell");
        assert!(matches!(e, ConfigError::ShellsUnreadable { .. }));
        assert!(
            e.to_string().contains(&format!(
                "open {}: no such file or directory",
                none.display()
            )),
            "{e}"
        );
        let sh = Config {
            shell_command: "/bin/sh".into(),
            ..cfg
        };
        assert!(validate(&sh, &none).is_ok());
    }
}
