//! Configuration: load, merge (fallback then main), default and validate (behavior.md §1.5, §2).
//!
//! The files are decoded with Go `encoding/json` semantics, not serde's: keys match
//! case-insensitively, the later of two spellings wins, `null` leaves scalars and
//! objects alone but resets arrays, and integers must be integral literals in range.
//! To get document order and duplicate keys right, the file is parsed by a small
//! JSON reader (`config/json.rs`) into an order-preserving tree (`serde_json::Value` without
//! `preserve_order` sorts keys and drops duplicates), which is then walked by hand.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
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
    /// `PortForward`: the switch and the target allow-list.
    pub port_forward: PortForwardConfig,
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

/// `PortForward` section.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PortForwardConfig {
    /// `Disable`: default false.
    pub disable: bool,
    /// `AllowedTargets`: `[udp/]HOST:PORT` entries a `new` may reach;
    /// default empty (every target). Not a key of the Go daemon.
    pub allowed_targets: Vec<String>,
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
    /// An entry of `PortForward.AllowedTargets` does not parse.
    AllowedTarget(allow::EntryError),
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
            ConfigError::AllowedTarget(_) => Some(allow::KEY),
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
                crate::sys::errno::go_text(error)
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
                write!(
                    f,
                    "user: lookup username {name}: {}",
                    crate::sys::errno::go_text(error)
                )
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
                crate::sys::errno::go_text(error)
            ),
            ConfigError::NegativeReconnectInterval { value } => write!(
                f,
                "ReconnectIntervalSeconds: must not be negative (got {value})"
            ),
            ConfigError::AllowedTarget(e) => write!(f, "{e}"),
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
    allowed_targets: Option<Vec<String>>,
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
                port_forward: PortForwardConfig::default(),
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
            allowed_targets: None,
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
        c.port_forward.allowed_targets = self.allowed_targets.unwrap_or_default();
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
                "PortForward" => self.decode_port_forward(val, &at),
                _ => decode_toggle(val, &mut c.mender_client, "MenderClientConfig", &at),
            }
        })
    }

    fn decode_port_forward(&mut self, v: &Json, at: &Loc) -> Result<(), DecodeError> {
        const S: &str = "PortForwardConfig";
        walk_object(v, at, "config.PortForwardConfig", |k, val| match canonical(
            k,
            &["Disable", "AllowedTargets"],
        ) {
            Some("Disable") => set_bool(
                val,
                &mut self.cfg.port_forward.disable,
                &at.field(S, "Disable"),
            ),
            Some(_) => set_strings(
                val,
                &mut self.allowed_targets,
                &at.field(S, "AllowedTargets"),
            ),
            None => unknown(at, k),
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

pub(crate) mod allow;
mod json;
#[cfg(test)]
mod tests;
mod validate;

#[cfg(test)]
use json::MAX_DEPTH;
use json::{Json, parse_json};
pub use validate::{check_allowed_targets, validate};
