//! Unit tests of configuration loading, merging and validation.

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
    let c = load1(r#"{"Sessions":{"StopExpired":false,"ExpireAfter":10,"ExpireAfterIdle":20}}"#);
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
    let ft = load1(r#"{"Limits":{"FileTransfer":{"PreserveOwner":false,"PreserveGroup":null}}}"#)
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
        let want = format!("({key}: json: cannot unmarshal {found} into Go struct field {rest})");
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
    if crate::sys::user::euid() != 0 {
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

// --- PortForward.AllowedTargets (not a key of the Go daemon) ---

#[test]
fn allowed_targets_load_merge_and_reset_like_go_slices() {
    let c = load1(r#"{"PortForward": {"AllowedTargets": ["127.0.0.1:22", "udp/*:53"]}}"#);
    assert_eq!(
        c.port_forward.allowed_targets,
        vec!["127.0.0.1:22".to_string(), "udp/*:53".to_string()]
    );
    assert!(!c.port_forward.disable);
    assert!(Config::default().port_forward.allowed_targets.is_empty());
    // keys fold case; the main file's list replaces the fallback's
    let c = load2(
        Some(r#"{"PortForward": {"AllowedTargets": ["a:1", "b:2"]}}"#),
        Some(r#"{"portforward": {"allowedtargets": ["c:3"], "disable": true}}"#),
    )
    .expect("loads");
    assert_eq!(c.port_forward.allowed_targets, vec!["c:3".to_string()]);
    assert!(c.port_forward.disable);
    // null resets a slice, absence keeps it
    let c = load2(
        Some(r#"{"PortForward": {"AllowedTargets": ["a:1"]}}"#),
        Some(r#"{"PortForward": {"AllowedTargets": null}}"#),
    )
    .expect("loads");
    assert!(c.port_forward.allowed_targets.is_empty());
    let c = load2(
        Some(r#"{"PortForward": {"AllowedTargets": ["a:1"]}}"#),
        Some(r#"{"PortForward": {"Disable": false}}"#),
    )
    .expect("loads");
    assert_eq!(c.port_forward.allowed_targets, vec!["a:1".to_string()]);
}

#[test]
fn allowed_targets_of_the_wrong_type_name_the_key() {
    let e = load_err(r#"{"PortForward": {"AllowedTargets": "127.0.0.1:22"}}"#);
    assert_eq!(e.key(), Some("PortForward.AllowedTargets"));
    assert!(
        e.to_string().ends_with(
            "(PortForward.AllowedTargets: json: cannot unmarshal string into Go struct field \
             PortForwardConfig.PortForward.AllowedTargets of type []string)"
        ),
        "{e}"
    );
    let e = load_err(r#"{"PortForward": {"AllowedTargets": [22]}}"#);
    assert_eq!(e.key(), Some("PortForward.AllowedTargets"));
}

#[test]
fn a_bad_allowed_target_fails_validation_naming_key_and_entry() {
    let d = TempDir::new();
    let (good, shells) = valid(&d);
    let mut cfg = good.clone();
    cfg.port_forward.allowed_targets = vec!["10.0.0.0/8:22".into(), "10.0.0.1:99999".into()];
    let e = validate(&cfg, &shells).expect_err("bad entry");
    assert_eq!(e.key(), Some("PortForward.AllowedTargets"));
    assert_eq!(
        e.to_string(),
        "PortForward.AllowedTargets: invalid entry \"10.0.0.1:99999\": \
         port must be *, a number from 1 to 65535 or a range LOW-HIGH"
    );
    // checked even while port forwarding is disabled
    cfg.port_forward.disable = true;
    assert!(validate(&cfg, &shells).is_err());
    cfg.port_forward.allowed_targets = vec!["[::1]:22".into(), "*:*".into()];
    assert!(validate(&cfg, &shells).is_ok());
}
