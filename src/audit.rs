//! The on-device audit trail: one journal line per operator action (shell,
//! file transfer, port forward, mender-client trigger) and per refusal by a
//! configured rule, in logrus field form so that
//! `journalctl -u mender-connect | grep audit=true` answers "who did what":
//!
//! `time="…" level=info msg="shell open" audit=true pid=42 result=ok … session_id=… user_id=…`
//!
//! Fields follow logrus' text formatter: sorted by key after `msg`, values
//! quoted only when they need it. Nothing secret is ever a field: no file
//! contents, no keystrokes, no tokens — callers pass metadata only.

use std::fmt;
use std::os::fd::RawFd;
use std::time::Duration;

/// `log` target of audit lines; the logger prints their fields unquoted.
pub const TARGET: &str = "audit";

/// How an action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It happened.
    Ok,
    /// It failed (the line carries `err`).
    Error,
    /// A configured rule or cap refused it (the line carries `rule` and `err`).
    Refused,
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Refused => "refused",
        }
    }
}

/// One audit line: an action, who asked (server `user_id`) in which session,
/// and metadata fields. Build it, then [`Event::emit`] it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    action: &'static str,
    fields: Vec<(&'static str, String)>,
}

impl Event {
    /// `action` is the line's `msg` (`shell open`, `file upload`, …).
    pub fn new(action: &'static str, user_id: &str, sid: &str, outcome: Outcome) -> Event {
        Event {
            action,
            // sorted by key: `set` keeps it so
            fields: vec![
                ("audit", "true".to_string()),
                ("result", outcome.name().to_string()),
                ("session_id", sid.to_string()),
                ("user_id", user_id.to_string()),
            ],
        }
    }

    /// A refusal of `action` by the configured `rule`, with the text sent back.
    pub fn refused(action: &'static str, user_id: &str, sid: &str, rule: &str, err: &str) -> Event {
        Event::new(action, user_id, sid, Outcome::Refused)
            .with("rule", rule)
            .with("err", err)
    }

    /// Adds (or replaces) field `key`.
    pub fn with(self, key: &'static str, value: impl fmt::Display) -> Event {
        self.set(key, value.to_string())
    }

    /// The one non-generic body of `with` (it is called with many types):
    /// keeps the fields sorted by key, as logrus prints them.
    fn set(mut self, key: &'static str, value: String) -> Event {
        match self.fields.binary_search_by(|(k, _)| (*k).cmp(key)) {
            Ok(i) => self.fields[i].1 = value,
            Err(i) => self.fields.insert(i, (key, value)),
        }
        self
    }

    /// Adds `key` when `value` is there.
    pub fn with_opt(self, key: &'static str, value: Option<impl fmt::Display>) -> Event {
        match value {
            Some(v) => self.with(key, v),
            None => self,
        }
    }

    /// Adds `duration` as Go prints a `time.Duration` rounded to milliseconds.
    pub fn with_duration(self, d: Duration) -> Event {
        self.with("duration", go_duration(d))
    }

    /// The value of field `key` (tests).
    #[cfg(test)]
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Writes the line to the journal (info level).
    pub fn emit(self) {
        log::info!(target: TARGET, "{self}");
    }
}

impl fmt::Display for Event {
    /// `msg="…" k=v …`, keys sorted like logrus' text formatter.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "msg={}", crate::logging::quote(self.action))?;
        for (k, v) in &self.fields {
            if needs_quoting(v) {
                write!(f, " {k}={}", crate::logging::quote(v))?;
            } else {
                write!(f, " {k}={v}")?;
            }
        }
        Ok(())
    }
}

/// logrus quotes a value unless every character is in `[A-Za-z0-9-._/@^+]`
/// (and an empty value is quoted, so the field stays visible).
fn needs_quoting(v: &str) -> bool {
    v.is_empty()
        || !v
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._/@^+".contains(c))
}

/// `1.5s`, `250ms`, `2m3.4s`: Go's `Duration.String` after rounding to ms.
pub fn go_duration(d: Duration) -> String {
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    if ms == 0 {
        return "0s".to_string();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, m, s, frac) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if h > 0 || m > 0 {
        out.push_str(&format!("{m}m"));
    }
    out.push_str(&s.to_string());
    if frac > 0 {
        let f = format!("{frac:03}");
        out.push('.');
        out.push_str(f.trim_end_matches('0'));
    }
    out.push('s');
    out
}

/// The path an open descriptor refers to now (`/proc/self/fd`), for the
/// "path as resolved" of file transfers; `None` when the kernel will not say.
pub fn fd_path(fd: RawFd) -> Option<String> {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// The configuration key behind a file-transfer refusal text, `None` when
/// the text is not a refusal by a rule. `upload` picks Put/Rx keys over
/// Get/Tx ones.
pub fn transfer_rule(err: &str, upload: bool) -> Option<&'static str> {
    let pick = |put, get| if upload { put } else { get };
    let rules: [(&str, &'static str); 9] = [
        (
            "the target file path is outside chroot",
            "Limits.FileTransfer.Chroot",
        ),
        (
            "forbidden to follow the link",
            "Limits.FileTransfer.FollowSymLinks",
        ),
        (
            "only regular files are allowed",
            "Limits.FileTransfer.RegularFilesOnly",
        ),
        (
            "the file owner does not match",
            pick(
                "Limits.FileTransfer.OwnerPut",
                "Limits.FileTransfer.OwnerGet",
            ),
        ),
        (
            "the file group does not match",
            pick(
                "Limits.FileTransfer.GroupPut",
                "Limits.FileTransfer.GroupGet",
            ),
        ),
        (
            "the file size is over the limit",
            "Limits.FileTransfer.MaxFileSize",
        ),
        (
            "forbidden to overwrite the file",
            "Limits.FileTransfer.AllowOverwrite",
        ),
        (
            "the set uid mode is forbidden",
            "Limits.FileTransfer.AllowSuid",
        ),
        (
            "transmitted bytes limit exhausted",
            pick(
                "Limits.FileTransfer.Counters.MaxBytesRxPerMinute",
                "Limits.FileTransfer.Counters.MaxBytesTxPerMinute",
            ),
        ),
    ];
    // An upload over MaxFileSize mid-stream reuses the rate-limit text
    // (upstream's); the size check is the rule that fired there.
    if upload && err == "failed to write file chunk: transmitted bytes limit exhausted" {
        return Some("Limits.FileTransfer.MaxFileSize");
    }
    // Exact texts only (after the fixed prefixes the refusals carry): many
    // error texts quote the requested path, and a path must not be able to
    // name a rule.
    let mut reason = err;
    while let Some(rest) = [
        "access denied: ",
        "failed to create target file: ",
        "failed to write file chunk: ",
    ]
    .iter()
    .find_map(|p| reason.strip_prefix(p))
    {
        reason = rest;
    }
    rules
        .iter()
        .find(|(text, _)| reason == *text)
        .map(|(_, rule)| *rule)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_prints_sorted_logrus_fields_after_msg() {
        let e = Event::new("shell open", "u-1", "sid-1", Outcome::Ok)
            .with("pid", 42)
            .with("run_as", "root")
            .with("err", "a \"b\"");
        assert_eq!(
            e.to_string(),
            "msg=\"shell open\" audit=true err=\"a \\\"b\\\"\" pid=42 result=ok \
             run_as=root session_id=sid-1 user_id=u-1"
        );
        assert_eq!(e.get("pid"), Some("42"));
    }

    #[test]
    fn empty_and_spaced_values_are_quoted_plain_ones_not() {
        let e = Event::new("x", "", "s", Outcome::Refused).with("path", "/tmp/a b");
        let s = e.to_string();
        assert!(s.contains(" user_id=\"\""), "{s}");
        assert!(s.contains(" path=\"/tmp/a b\""), "{s}");
        assert!(s.contains(" result=refused"), "{s}");
        let e = Event::new("x", "u", "s", Outcome::Ok).with("target", "10.0.0.1:22");
        assert!(e.to_string().contains(" target=\"10.0.0.1:22\""));
    }

    #[test]
    fn a_newline_in_a_value_cannot_forge_a_line() {
        let e = Event::new("x", "u\ntime=\"0\" audit=true", "s", Outcome::Ok);
        assert!(!e.to_string().contains('\n'));
    }

    #[test]
    fn refusals_carry_rule_and_text() {
        let e = Event::refused("shell open", "u", "s", "Sessions.MaxPerUser", "too many");
        assert_eq!(e.get("rule"), Some("Sessions.MaxPerUser"));
        assert_eq!(e.get("err"), Some("too many"));
        assert_eq!(e.get("result"), Some("refused"));
    }

    #[test]
    fn durations_print_like_go() {
        assert_eq!(go_duration(Duration::ZERO), "0s");
        assert_eq!(go_duration(Duration::from_micros(250_400)), "250ms");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(go_duration(Duration::from_millis(123_450)), "2m3.45s");
        assert_eq!(go_duration(Duration::from_secs(3600)), "1h0m0s");
    }

    #[test]
    fn transfer_refusal_texts_map_to_their_config_keys() {
        let t = |e, up| transfer_rule(e, up);
        assert_eq!(
            t("access denied: the file owner does not match", false),
            Some("Limits.FileTransfer.OwnerGet")
        );
        assert_eq!(
            t("access denied: the file owner does not match", true),
            Some("Limits.FileTransfer.OwnerPut")
        );
        assert_eq!(
            t(
                "access denied: the target file path is outside chroot",
                true
            ),
            Some("Limits.FileTransfer.Chroot")
        );
        assert_eq!(
            t("transmitted bytes limit exhausted", false),
            Some("Limits.FileTransfer.Counters.MaxBytesTxPerMinute")
        );
        assert_eq!(
            t(
                "failed to write file chunk: transmitted bytes limit exhausted",
                true
            ),
            Some("Limits.FileTransfer.MaxFileSize")
        );
        assert_eq!(
            t(
                "failed to open file for reading: open /x: no such file",
                false
            ),
            None
        );
        // a requested path that quotes a rule's text names no rule
        assert_eq!(
            t(
                "failed to open file for reading: open /tmp/the file owner does not match: no such file or directory",
                false
            ),
            None
        );
    }
}
