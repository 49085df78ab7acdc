//! Command-line parsing with Go `flag` / urfave-cli grammar (behavior.md §1).
//!
//! Deliberately not clap: Go's `flag` accepts one or two dashes for every name
//! (`-config`, `--c`) and never bundles short flags (`-dd` is the flag `dd`),
//! and unit files and scripts rely on those spellings.

use std::path::PathBuf;

use crate::config::{DEFAULT_CONFIG_FILE, DEFAULT_FALLBACK_CONFIG_FILE};

/// Program name used in help texts.
const APP: &str = "mender-connect";

/// What `main` should do after parsing the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Run the daemon with these options.
    Daemon(Options),
    /// Print `stdout` and `stderr` verbatim, then exit with `code`.
    Exit {
        /// Process exit code (0 help/version, 1 usage error, 3 unknown help topic).
        code: i32,
        /// Text for standard output.
        stdout: String,
        /// Text for standard error.
        stderr: String,
    },
}

/// Options for the `daemon` command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Main configuration file (`-c`/`--config`); default `/etc/mender/mender-connect.conf`.
    pub config: PathBuf,
    /// Fallback configuration file (`-b`/`--fallback-config`); default `/var/lib/mender/mender-connect.conf`.
    pub fallback_config: PathBuf,
    /// Info by default, Debug with `--debug`, Trace with `--trace`/`--dd` (trace wins).
    pub level: log::LevelFilter,
}

/// The version line printed by `version`, `-v` and `--version`: `<VERSION>\truntime: rust <rustc>`.
pub fn version_line() -> String {
    let version = option_env!("MENDER_CONNECT_VERSION").unwrap_or(env!("CARGO_PKG_VERSION"));
    format!("{version}\truntime: rust {}", env!("MENDER_CONNECT_RUSTC"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlagId {
    Config,
    Fallback,
    Debug,
    Trace,
    Help,
    Version,
}

struct FlagSpec {
    id: FlagId,
    /// Go names: the first is the main name, the rest are aliases.
    names: &'static [&'static str],
    /// The `FILE` placeholder for string flags; `None` for booleans.
    placeholder: Option<&'static str>,
    usage: &'static str,
    /// urfave's "(default: …)" suffix; empty for help and version.
    default: &'static str,
}

const HELP_FLAG: FlagSpec = FlagSpec {
    id: FlagId::Help,
    names: &["help", "h"],
    placeholder: None,
    usage: "show help",
    default: "",
};

const GLOBAL_FLAGS: &[FlagSpec] = &[
    FlagSpec {
        id: FlagId::Config,
        names: &["config", "c"],
        placeholder: Some("FILE"),
        usage: "Configuration FILE path.",
        default: "\"/etc/mender/mender-connect.conf\"",
    },
    FlagSpec {
        id: FlagId::Fallback,
        names: &["fallback-config", "b"],
        placeholder: Some("FILE"),
        usage: "Fallback configuration FILE path.",
        default: "\"/var/lib/mender/mender-connect.conf\"",
    },
    FlagSpec {
        id: FlagId::Debug,
        names: &["debug", "d"],
        placeholder: None,
        usage: "Set the logging level to debug",
        default: "false",
    },
    FlagSpec {
        id: FlagId::Trace,
        names: &["trace", "dd"],
        placeholder: None,
        usage: "Set the logging level to trace",
        default: "false",
    },
    HELP_FLAG,
    FlagSpec {
        id: FlagId::Version,
        names: &["version", "v"],
        placeholder: None,
        usage: "print the version",
        default: "",
    },
];

/// Commands: names (main first), usage, args usage.
const COMMANDS: &[(&[&str], &str, &str)] = &[
    (
        &["daemon"],
        "Start the client as a background service.",
        "[arguments...]",
    ),
    (
        &["version"],
        "Show the version and runtime information of the binary build",
        "[arguments...]",
    ),
    (
        &["help", "h"],
        "Shows a list of commands or help for one command",
        "[command]",
    ),
];

/// Values collected by one Go `FlagSet.Parse`.
#[derive(Default)]
struct FlagValues {
    config: Option<String>,
    fallback: Option<String>,
    debug: bool,
    trace: bool,
    help: bool,
    version: bool,
}

impl FlagValues {
    fn set_bool(&mut self, id: FlagId, v: bool) {
        match id {
            FlagId::Debug => self.debug = v,
            FlagId::Trace => self.trace = v,
            FlagId::Help => self.help = v,
            FlagId::Version => self.version = v,
            FlagId::Config | FlagId::Fallback => {}
        }
    }
}

/// Go `strconv.ParseBool`.
fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Go `flag.FlagSet.Parse`: returns the values and the remaining (positional) args,
/// or the error text Go would produce. The last occurrence of a flag wins.
fn parse_flags<'a>(
    specs: &[FlagSpec],
    args: &'a [String],
) -> Result<(FlagValues, &'a [String]), String> {
    let mut values = FlagValues::default();
    let mut rest = args;
    while let Some(s) = rest.first() {
        // "-" and anything not starting with '-' is the first positional argument.
        if s.len() < 2 || !s.starts_with('-') {
            break;
        }
        let dashes = if s.starts_with("--") { 2 } else { 1 };
        if s == "--" {
            rest = &rest[1..];
            break;
        }
        let body = &s[dashes..];
        if body.is_empty() || body.starts_with('-') || body.starts_with('=') {
            return Err(format!("bad flag syntax: {s}"));
        }
        rest = &rest[1..];
        let (name, value) = match body.find('=') {
            Some(i) => (&body[..i], Some(&body[i + 1..])),
            None => (body, None),
        };
        let Some(spec) = specs.iter().find(|f| f.names.contains(&name)) else {
            return Err(format!("flag provided but not defined: -{name}"));
        };
        if spec.placeholder.is_none() {
            let v = match value {
                None => true,
                Some(v) => parse_go_bool(v).ok_or_else(|| {
                    format!("invalid boolean value \"{v}\" for -{name}: parse error")
                })?,
            };
            values.set_bool(spec.id, v);
            continue;
        }
        // A string flag takes the next argument verbatim, even if it starts with '-'.
        let value = match value {
            Some(v) => v.to_string(),
            None => match rest.split_first() {
                Some((v, tail)) => {
                    rest = tail;
                    v.clone()
                }
                None => return Err(format!("flag needs an argument: -{name}")),
            },
        };
        match spec.id {
            FlagId::Config => values.config = Some(value),
            _ => values.fallback = Some(value),
        }
    }
    Ok((values, rest))
}

fn exit(code: i32, stdout: String, stderr: String) -> Parsed {
    Parsed::Exit {
        code,
        stdout,
        stderr,
    }
}

/// Parse the command line (without argv\[0\]) the way the Go daemon's urfave-cli app does.
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Parsed {
    let args: Vec<String> = args.into_iter().collect();
    let (global, rest) = match parse_flags(GLOBAL_FLAGS, &args) {
        Ok(v) => v,
        Err(e) => {
            return exit(
                1,
                format!("Incorrect Usage. {e}\n\n{}", app_help()),
                String::new(),
            );
        }
    };
    // urfave checks help before version.
    if global.help {
        return exit(0, app_help(), String::new());
    }
    if global.version {
        return exit(0, format!("{}\n", version_line()), String::new());
    }
    let Some((command, cmd_args)) = rest.split_first() else {
        return exit(0, app_help(), String::new());
    };
    let Some(cmd) = find_command(command) else {
        // urfave's default action is `help <args>`: an unknown command is an unknown topic.
        return no_help_topic(command);
    };
    let (local, cmd_rest) = match parse_flags(&[HELP_FLAG], cmd_args) {
        Ok(v) => v,
        Err(e) => {
            let out = format!("Incorrect Usage: {e}\n\n{}", command_help(cmd));
            return exit(1, out, String::new());
        }
    };
    if local.help {
        return exit(0, command_help(cmd), String::new());
    }
    match cmd.0[0] {
        "daemon" => {
            let level = if global.trace {
                log::LevelFilter::Trace
            } else if global.debug {
                log::LevelFilter::Debug
            } else {
                log::LevelFilter::Info
            };
            Parsed::Daemon(Options {
                config: PathBuf::from(global.config.unwrap_or_else(|| DEFAULT_CONFIG_FILE.into())),
                fallback_config: PathBuf::from(
                    global
                        .fallback
                        .unwrap_or_else(|| DEFAULT_FALLBACK_CONFIG_FILE.into()),
                ),
                level,
            })
        }
        "version" => exit(0, format!("{}\n", version_line()), String::new()),
        _ => match cmd_rest.first() {
            None => exit(0, app_help(), String::new()),
            Some(topic) => match find_command(topic) {
                Some(c) => exit(0, command_help(c), String::new()),
                None => no_help_topic(topic),
            },
        },
    }
}

type Command = (&'static [&'static str], &'static str, &'static str);

fn find_command(name: &str) -> Option<&'static Command> {
    COMMANDS.iter().find(|c| c.0.contains(&name))
}

fn no_help_topic(topic: &str) -> Parsed {
    exit(3, String::new(), format!("No help topic for '{topic}'\n"))
}

/// Go `tabwriter` (padding 2) for one block of "   left<TAB>right" lines.
fn table(rows: &[(String, String)]) -> String {
    let width = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0) + 2;
    rows.iter()
        .map(|(l, r)| format!("   {l:<width$}{r}\n"))
        .collect()
}

/// urfave's flag rendering: `--config FILE, -c FILE`, `--trace, --dd`.
fn flag_rows(specs: &[FlagSpec]) -> Vec<(String, String)> {
    specs
        .iter()
        .map(|f| {
            let names: Vec<String> = f
                .names
                .iter()
                .map(|n| {
                    let dashes = if n.len() == 1 { "-" } else { "--" };
                    match f.placeholder {
                        Some(p) => format!("{dashes}{n} {p}"),
                        None => format!("{dashes}{n}"),
                    }
                })
                .collect();
            let usage = if f.default.is_empty() {
                f.usage.to_string()
            } else {
                format!("{} (default: {})", f.usage, f.default)
            };
            (names.join(", "), usage)
        })
        .collect()
}

fn app_help() -> String {
    let commands: Vec<(String, String)> = COMMANDS
        .iter()
        .map(|c| (c.0.join(", "), c.1.to_string()))
        .collect();
    format!(
        "NAME:\n   {APP} - manage and start the Mender Connect service.\n\n\
         USAGE:\n   {APP} [global options] command [command options] [arguments...]\n\n\
         VERSION:\n   {}\n\n\
         COMMANDS:\n{}\n\
         GLOBAL OPTIONS:\n{}",
        version_line(),
        table(&commands),
        table(&flag_rows(GLOBAL_FLAGS)),
    )
}

fn command_help(cmd: &Command) -> String {
    let name = cmd.0[0];
    format!(
        "NAME:\n   {APP} {name} - {}\n\n\
         USAGE:\n   {APP} {name} [command options] {}\n\n\
         OPTIONS:\n{}",
        cmd.1,
        cmd.2,
        table(&flag_rows(&[HELP_FLAG])),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Parsed {
        parse(args.iter().map(|s| s.to_string()))
    }

    fn daemon(args: &[&str]) -> Options {
        match run(args) {
            Parsed::Daemon(o) => o,
            other => panic!("{args:?} did not start the daemon: {other:?}"),
        }
    }

    fn exit_of(args: &[&str]) -> (i32, String, String) {
        match run(args) {
            Parsed::Exit {
                code,
                stdout,
                stderr,
            } => (code, stdout, stderr),
            other => panic!("{args:?} started the daemon: {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let o = daemon(&["daemon"]);
        assert_eq!(o.config, PathBuf::from("/etc/mender/mender-connect.conf"));
        assert_eq!(
            o.fallback_config,
            PathBuf::from("/var/lib/mender/mender-connect.conf")
        );
        assert_eq!(o.level, log::LevelFilter::Info);
    }

    #[test]
    fn config_spellings() {
        for args in [
            &["-c", "x", "daemon"][..],
            &["--c", "x", "daemon"],
            &["-config", "x", "daemon"],
            &["--config", "x", "daemon"],
            &["-c=x", "daemon"],
            &["--c=x", "daemon"],
            &["-config=x", "daemon"],
            &["--config=x", "daemon"],
        ] {
            assert_eq!(daemon(args).config, PathBuf::from("x"), "{args:?}");
        }
    }

    #[test]
    fn fallback_spellings() {
        for args in [
            &["-b", "y", "daemon"][..],
            &["--b=y", "daemon"],
            &["-fallback-config", "y", "daemon"],
            &["--fallback-config=y", "daemon"],
        ] {
            assert_eq!(daemon(args).fallback_config, PathBuf::from("y"), "{args:?}");
        }
    }

    #[test]
    fn string_flag_takes_next_arg_verbatim() {
        let o = daemon(&["-c", "-d", "daemon"]);
        assert_eq!(o.config, PathBuf::from("-d"));
        assert_eq!(o.level, log::LevelFilter::Info);
        // Everything after the first '=' is the value.
        assert_eq!(daemon(&["-c=a=b", "daemon"]).config, PathBuf::from("a=b"));
        assert_eq!(daemon(&["-c=", "daemon"]).config, PathBuf::from(""));
    }

    #[test]
    fn last_occurrence_wins() {
        let o = daemon(&["-c", "a", "--config", "b", "daemon"]);
        assert_eq!(o.config, PathBuf::from("b"));
    }

    #[test]
    fn debug_and_trace_spellings() {
        for args in [
            &["-d", "daemon"][..],
            &["--d", "daemon"],
            &["-debug", "daemon"],
            &["--debug", "daemon"],
        ] {
            assert_eq!(daemon(args).level, log::LevelFilter::Debug, "{args:?}");
        }
        for args in [
            &["-dd", "daemon"][..],
            &["--dd", "daemon"],
            &["-trace", "daemon"],
            &["--trace", "daemon"],
            &["-d", "--trace", "daemon"],
            &["--trace", "-d", "daemon"],
        ] {
            assert_eq!(daemon(args).level, log::LevelFilter::Trace, "{args:?}");
        }
    }

    #[test]
    fn bool_values() {
        assert_eq!(
            daemon(&["-d=false", "daemon"]).level,
            log::LevelFilter::Info
        );
        assert_eq!(
            daemon(&["--debug=true", "daemon"]).level,
            log::LevelFilter::Debug
        );
        assert_eq!(
            daemon(&["-d", "-d=0", "daemon"]).level,
            log::LevelFilter::Info
        );
        assert_eq!(
            daemon(&["--dd=false", "-d", "daemon"]).level,
            log::LevelFilter::Debug
        );
        assert_eq!(
            daemon(&["--trace=T", "daemon"]).level,
            log::LevelFilter::Trace
        );
        let (code, out, _) = exit_of(&["-d=yes", "daemon"]);
        assert_eq!(code, 1);
        assert!(
            out.starts_with(
                "Incorrect Usage. invalid boolean value \"yes\" for -d: parse error\n\n"
            )
        );
        // A bool flag never consumes the next argument.
        assert_eq!(
            daemon(&["-d", "daemon", "false"]).level,
            log::LevelFilter::Debug
        );
    }

    #[test]
    fn double_dash_ends_flags() {
        let o = daemon(&["-d", "--", "daemon"]);
        assert_eq!(o.level, log::LevelFilter::Debug);
        let (code, _, err) = exit_of(&["--", "-d", "daemon"]);
        assert_eq!((code, err.as_str()), (3, "No help topic for '-d'\n"));
    }

    #[test]
    fn extra_args_after_daemon_ignored() {
        assert_eq!(
            daemon(&["daemon", "extra", "-c"]).level,
            log::LevelFilter::Info
        );
    }

    #[test]
    fn flags_after_command_rejected() {
        let (code, out, err) = exit_of(&["daemon", "-config", "x"]);
        assert_eq!(code, 1);
        assert!(
            out.starts_with("Incorrect Usage: flag provided but not defined: -config\n\n"),
            "{out}"
        );
        assert!(out.contains("mender-connect daemon - Start the client as a background service."));
        assert!(err.is_empty());
        let (code, out, _) = exit_of(&["daemon", "--debug"]);
        assert_eq!(code, 1);
        assert!(out.starts_with("Incorrect Usage: flag provided but not defined: -debug\n\n"));
    }

    #[test]
    fn unknown_global_flag() {
        let (code, out, err) = exit_of(&["-bogus", "daemon"]);
        assert_eq!(code, 1);
        assert!(
            out.starts_with("Incorrect Usage. flag provided but not defined: -bogus\n\nNAME:\n"),
            "{out}"
        );
        assert!(out.contains("GLOBAL OPTIONS:"));
        assert!(err.is_empty());
        let (code, out, _) = exit_of(&["--bogus=1"]);
        assert_eq!(code, 1);
        assert!(out.starts_with("Incorrect Usage. flag provided but not defined: -bogus\n"));
    }

    #[test]
    fn other_usage_errors() {
        let (code, out, _) = exit_of(&["-c"]);
        assert_eq!(code, 1);
        assert!(out.starts_with("Incorrect Usage. flag needs an argument: -c\n\n"));
        let (code, out, _) = exit_of(&["---c", "daemon"]);
        assert_eq!(code, 1);
        assert!(out.starts_with("Incorrect Usage. bad flag syntax: ---c\n\n"));
        let (code, out, _) = exit_of(&["-=x"]);
        assert_eq!(code, 1);
        assert!(out.starts_with("Incorrect Usage. bad flag syntax: -=x\n\n"));
    }

    #[test]
    fn unknown_command_is_unknown_help_topic() {
        assert_eq!(
            exit_of(&["foo"]),
            (3, String::new(), "No help topic for 'foo'\n".to_string())
        );
        assert_eq!(
            exit_of(&["help", "foo"]),
            (3, String::new(), "No help topic for 'foo'\n".to_string())
        );
        assert_eq!(exit_of(&["h", "bar"]).0, 3);
        // A lone "-" is an argument, not a flag.
        assert_eq!(exit_of(&["-"]).2, "No help topic for '-'\n");
    }

    #[test]
    fn help_variants() {
        let (code, app, err) = exit_of(&[]);
        assert_eq!(code, 0);
        assert!(err.is_empty());
        for needle in [
            "NAME:\n   mender-connect - manage and start the Mender Connect service.\n",
            "USAGE:\n",
            "VERSION:\n",
            "COMMANDS:\n   daemon   Start the client as a background service.\n",
            "   help, h  Shows a list of commands or help for one command\n",
            "GLOBAL OPTIONS:\n",
            "--config FILE, -c FILE           Configuration FILE path. (default: \"/etc/mender/mender-connect.conf\")\n",
            "--fallback-config FILE, -b FILE  Fallback configuration FILE path.",
            "--debug, -d                      Set the logging level to debug (default: false)\n",
            "--trace, --dd                    Set the logging level to trace (default: false)\n",
            "--help, -h                       show help\n",
            "--version, -v                    print the version\n",
        ] {
            assert!(app.contains(needle), "missing {needle:?} in\n{app}");
        }
        assert_eq!(exit_of(&["help"]), (0, app.clone(), String::new()));
        assert_eq!(exit_of(&["h"]), (0, app.clone(), String::new()));
        assert_eq!(exit_of(&["-h"]), (0, app.clone(), String::new()));
        assert_eq!(
            exit_of(&["--help", "daemon"]),
            (0, app.clone(), String::new())
        );
        // Help is checked before version.
        assert_eq!(exit_of(&["-v", "-help"]), (0, app, String::new()));

        let (code, out, _) = exit_of(&["help", "daemon"]);
        assert_eq!(code, 0);
        assert!(out.starts_with(
            "NAME:\n   mender-connect daemon - Start the client as a background service.\n\nUSAGE:\n"
        ));
        assert!(out.contains("OPTIONS:\n   --help, -h  show help\n"));
        assert_eq!(exit_of(&["daemon", "-h"]), (0, out.clone(), String::new()));
        assert_eq!(exit_of(&["daemon", "--help"]), (0, out, String::new()));
        assert_eq!(exit_of(&["help", "version"]).0, 0);
        assert_eq!(exit_of(&["help", "h"]).0, 0);
    }

    #[test]
    fn version_output() {
        let line = version_line();
        let (version, runtime) = line.split_once('\t').expect("a TAB");
        assert!(!version.is_empty());
        assert!(runtime.starts_with("runtime: rust "), "{line}");
        assert!(!line.contains('\n'));
        let expected = (0, format!("{line}\n"), String::new());
        for args in [
            &["--version"][..],
            &["-version"],
            &["-v"],
            &["--v"],
            &["version"],
            &["version", "extra"],
            &["-c", "x", "version"],
        ] {
            assert_eq!(exit_of(args), expected, "{args:?}");
        }
    }
}
