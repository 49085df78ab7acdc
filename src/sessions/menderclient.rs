//! Mender-client triggers, protocol 4 (protocol.md §3.4, behavior.md §6):
//! `check-update` and `send-inventory` run the Mender client binary and
//! answer `{status: 1}` on success or `{status: 2}` with the error text.
//!
//! Commands run one at a time, in order, on the session's own thread
//! `mc-<sid8>`, so the router session never waits for them. Each has a
//! timeout (60 s); on expiry its process group is killed and the reply is
//! `{status: 2}` with `timed out after 60s` (wording ours; the reference has
//! no timeout).
//!
//! Environment overrides (for tests): `MENDER_CONNECT_CLIENT_PATHS`, a
//! `:`-separated list of candidate binaries replacing
//! `/usr/bin/mender-update:/usr/bin/mender`; `MENDER_CONNECT_CLIENT_TIMEOUT_MS`,
//! the timeout in milliseconds.

use std::fmt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Sender, TrySendError};

use crate::audit::{Event, Outcome};
use crate::sessions::sid8;
use crate::sessions::{Factory, Handler, SessionCtx};
use crate::threads;
use crate::wire::codec::{PROTO_MENDERCLIENT, ProtoMsg, Value};
use crate::wire::types::{menderclient as t, status};

/// Candidates in order of preference (Mender 4.x+, then 3.x).
pub const DEFAULT_PATHS: [&str; 2] = ["/usr/bin/mender-update", "/usr/bin/mender"];
/// Requests that may wait behind a running command; more are refused.
const QUEUE_LIMIT: usize = 8;
/// The worker only waits on a child.
const THREAD_STACK: usize = 64 * 1024;
/// How long a stopping daemon waits for a trigger command still running.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(1);

/// Where the client binary may be and how long it may run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Candidate binaries; the first that exists is run.
    pub paths: Vec<PathBuf>,
    /// Longest a command may run before it is killed (60 s).
    pub timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            paths: DEFAULT_PATHS.iter().map(PathBuf::from).collect(),
            timeout: Duration::from_secs(60),
        }
    }
}

impl Settings {
    /// Defaults with `MENDER_CONNECT_CLIENT_PATHS` and
    /// `MENDER_CONNECT_CLIENT_TIMEOUT_MS` applied.
    pub fn from_lookup(get: &crate::knobs::Lookup) -> Settings {
        let mut s = Settings::default();
        if let Some(v) = get("MENDER_CONNECT_CLIENT_PATHS") {
            let paths: Vec<PathBuf> = v
                .split(':')
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
                .collect();
            if !paths.is_empty() {
                s.paths = paths;
            }
        }
        if let Some(v) = get("MENDER_CONNECT_CLIENT_TIMEOUT_MS") {
            match v.parse::<u64>() {
                Ok(ms) if ms > 0 => s.timeout = Duration::from_millis(ms),
                _ => log::warn!("ignoring MENDER_CONNECT_CLIENT_TIMEOUT_MS={v:?}"),
            }
        }
        s
    }
}

/// Why a trigger failed; `Display` is the reply body.
#[derive(Debug)]
pub enum McError {
    /// None of the candidates exists.
    NotFound(Vec<PathBuf>),
    /// The process could not be started.
    Spawn(PathBuf, std::io::Error),
    /// It exited non-zero or was killed by a signal.
    Failed(ExitStatus),
    /// It ran longer than the timeout and was killed.
    TimedOut(Duration),
    /// Waiting for it failed.
    Wait(std::io::Error),
    /// A `typ` other than check-update / send-inventory.
    UnknownType,
    /// Too many requests already waiting.
    Busy,
    /// The worker thread could not be started.
    Thread(std::io::Error),
}

impl fmt::Display for McError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            McError::NotFound(paths) => {
                let list: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
                write!(
                    f,
                    "Cannot find Mender client binary, tried [{}]",
                    list.join(" ")
                )
            }
            McError::Spawn(p, e) => write!(
                f,
                "fork/exec {}: {}",
                p.display(),
                crate::sys::errno::go_text(e)
            ),
            McError::Failed(st) => {
                write!(f, "{}", crate::sys::process::status_text(st.into_raw()))
            }
            McError::TimedOut(d) => write!(f, "timed out after {}s", d.as_secs_f64()),
            McError::Wait(e) => write!(f, "wait: {}", crate::sys::errno::go_text(e)),
            McError::UnknownType => write!(f, "unknown message type"),
            McError::Busy => write!(f, "too many pending mender client requests"),
            McError::Thread(e) => write!(f, "cannot start a thread: {e}"),
        }
    }
}

impl std::error::Error for McError {}

/// The first candidate that exists (stat succeeds; executability is not
/// checked, as in the reference).
pub fn find_binary(paths: &[PathBuf]) -> Result<&Path, McError> {
    paths
        .iter()
        .find(|p| std::fs::metadata(p).is_ok())
        .map(PathBuf::as_path)
        .ok_or_else(|| McError::NotFound(paths.to_vec()))
}

/// Runs `<binary> <typ>` to completion or until `timeout`.
pub fn run_command(settings: &Settings, typ: &str) -> Result<(), McError> {
    let bin = find_binary(&settings.paths)?;
    let mut child = Command::new(bin)
        .arg(typ)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // its own group, so a timeout can kill whatever it started too
        .process_group(0)
        .spawn()
        .map_err(|e| McError::Spawn(bin.to_path_buf(), e))?;
    match wait_timeout(&mut child, settings.timeout) {
        Ok(Some(st)) if st.success() => Ok(()),
        Ok(Some(st)) => Err(McError::Failed(st)),
        Ok(None) => {
            // ESRCH: the group is already gone, which is the aim
            let _ =
                crate::sys::process::killpg(child.id() as crate::sys::process::Pid, libc::SIGKILL);
            let _ = child.kill();
            let _ = child.wait();
            Err(McError::TimedOut(settings.timeout))
        }
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(McError::Wait(e))
        }
    }
}

/// Waits for `child` up to `timeout` on a pidfd (no polling); `None` = still running.
fn wait_timeout(child: &mut Child, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
    use crate::sys::process;
    let pid = child.id() as process::Pid;
    if process::wait_exited(pid, process::pidfd_open(pid).as_ref(), timeout) {
        child.wait().map(Some)
    } else {
        child.try_wait()
    }
}

/// The reply to a trigger: same proto, typ and sid; status 1 or 2.
pub fn reply(sid: &str, typ: &str, result: &Result<(), McError>) -> ProtoMsg {
    let msg = ProtoMsg::new(PROTO_MENDERCLIENT, typ, sid);
    match result {
        Ok(()) => msg.with_prop("status", Value::Int(status::NORMAL)),
        Err(e) => msg
            .with_prop("status", Value::Int(status::ERROR))
            .with_body(e.to_string().into_bytes()),
    }
}

/// The audit line of trigger `typ` asked by `user_id`: how it ended, or the
/// cap that refused it.
pub fn audit(user_id: &str, sid: &str, typ: &str, result: &Result<(), McError>) -> Event {
    const ACTION: &str = "mender-client trigger";
    let e = match result {
        Ok(()) => Event::new(ACTION, user_id, sid, Outcome::Ok).with("status", "exit status 0"),
        Err(e @ McError::Busy) => {
            Event::refused(ACTION, user_id, sid, "pending requests cap", &e.to_string())
        }
        Err(McError::Failed(st)) => Event::new(ACTION, user_id, sid, Outcome::Error)
            .with("status", crate::sys::process::status_text(st.into_raw())),
        Err(e) => Event::new(ACTION, user_id, sid, Outcome::Error).with("err", e),
    };
    e.with("trigger", typ)
}

/// The handler factory.
pub fn factory(settings: Settings) -> Factory {
    let settings = Arc::new(settings);
    let parked = Arc::new(threads::Parked::new(SHUTDOWN_WAIT));
    Box::new(move |ctx: &SessionCtx| {
        Box::new(MenderClient {
            ctx: ctx.clone(),
            settings: Arc::clone(&settings),
            worker: None,
            thread: None,
            closed: Arc::new(AtomicBool::new(false)),
            parked: Arc::clone(&parked),
        }) as Box<dyn Handler>
    })
}

struct MenderClient {
    ctx: SessionCtx,
    settings: Arc<Settings>,
    worker: Option<Sender<(String, String)>>,
    /// The worker thread; joined on close once it has finished.
    thread: Option<JoinHandle<()>>,
    closed: Arc<AtomicBool>,
    /// Workers still running a command when their session closed; joined
    /// once done (at the latest when the daemon stops).
    parked: Arc<threads::Parked>,
}

impl MenderClient {
    fn send(&self, msg: &ProtoMsg) {
        if let Err(e) = self.ctx.out.send(msg) {
            log::debug!("mender client {:?}: reply not sent: {e}", self.ctx.sid);
        }
    }

    fn start_worker(&mut self) -> Result<Sender<(String, String)>, McError> {
        if let Some(tx) = &self.worker {
            return Ok(tx.clone());
        }
        let (tx, rx) = crossbeam_channel::bounded::<(String, String)>(QUEUE_LIMIT);
        let ctx = self.ctx.clone();
        let settings = Arc::clone(&self.settings);
        let closed = Arc::clone(&self.closed);
        let name = format!("mc-{}", sid8(&self.ctx.sid));
        let handle = crate::threads::spawn(name, THREAD_STACK, move || {
            // ends when the handler drops its sender
            for (typ, user_id) in rx {
                // requests still queued when the session ended are dropped
                if closed.load(Ordering::Acquire) {
                    break;
                }
                log::info!("mender client: running {typ}");
                let result = run_command(&settings, &typ);
                match &result {
                    Ok(()) => log::info!("mender client: {typ} done"),
                    Err(e) => log::warn!("mender client: {typ} failed: {e}"),
                }
                audit(&user_id, &ctx.sid, &typ, &result).emit();
                // after the session ended, nobody is there for the reply
                if !closed.load(Ordering::Acquire)
                    && let Err(e) = ctx.out.send(&reply(&ctx.sid, &typ, &result))
                {
                    log::debug!("mender client: reply not sent: {e}");
                }
            }
        })
        .map_err(McError::Thread)?;
        self.thread = Some(handle);
        self.worker = Some(tx.clone());
        Ok(tx)
    }
}

impl Handler for MenderClient {
    fn handle(&mut self, msg: ProtoMsg) {
        let typ = msg.hdr.typ.clone();
        if typ != t::CHECK_UPDATE && typ != t::SEND_INVENTORY {
            self.send(&reply(&self.ctx.sid, &typ, &Err(McError::UnknownType)));
            return;
        }
        let user_id = msg.prop_str("user_id").unwrap_or_default().to_string();
        let queued =
            self.start_worker()
                .and_then(|tx| match tx.try_send((typ.clone(), user_id.clone())) {
                    Ok(()) => Ok(()),
                    Err(TrySendError::Full(_)) => Err(McError::Busy),
                    Err(TrySendError::Disconnected(_)) => Err(McError::Busy),
                });
        if let Err(e) = queued {
            log::warn!("mender client: {typ} refused: {e}");
            let result = Err(e);
            audit(&user_id, &self.ctx.sid, &typ, &result).emit();
            self.send(&reply(&self.ctx.sid, &typ, &result));
        }
    }

    fn close(&mut self) {
        self.closed.store(true, Ordering::Release);
        // without its sender the worker ends after the running command,
        // which the trigger timeout bounds
        self.worker = None;
        // close runs on a thread that serves other sessions: join only a
        // worker that is already done, never wait for a command
        if let Some(h) = self.thread.take() {
            self.parked.park(h);
        }
        self.parked.reap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binaries_give_the_reference_text() {
        let s = Settings::default();
        let missing = Settings {
            paths: vec!["/nonexistent/a".into(), "/nonexistent/b".into()],
            ..s.clone()
        };
        let e = run_command(&missing, "check-update").expect_err("missing");
        assert_eq!(
            e.to_string(),
            "Cannot find Mender client binary, tried [/nonexistent/a /nonexistent/b]"
        );
        assert_eq!(
            McError::NotFound(s.paths).to_string(),
            "Cannot find Mender client binary, tried [/usr/bin/mender-update /usr/bin/mender]"
        );
    }

    #[test]
    fn replies_match_the_vectors() {
        let ok = crate::wire::codec::encode(&reply("", "check-update", &Ok(())));
        assert_eq!(
            crate::wire::codec::testhex::hex(&ok),
            "81a368647283a570726f746fcd0004a3747970ac636865636b2d757064617465a570726f707381a673746174757301"
        );
        let unknown = reply("", "reboot", &Err(McError::UnknownType));
        assert_eq!(unknown.prop("status"), Some(&Value::Int(2)));
        assert_eq!(unknown.body.as_deref(), Some(&b"unknown message type"[..]));
    }

    #[test]
    fn exit_status_and_timeout_texts() {
        let sh = Settings {
            paths: vec!["/bin/false".into()],
            timeout: Duration::from_secs(10),
        };
        let e = run_command(&sh, "check-update").expect_err("false fails");
        assert_eq!(e.to_string(), "exit status 1");
        let slow = Settings {
            paths: vec!["/bin/sleep".into()],
            timeout: Duration::from_millis(100),
        };
        // `sleep send-inventory` fails at once, so use a real long sleep via sh
        let e = run_command(&slow, "5").expect_err("killed");
        assert_eq!(e.to_string(), "timed out after 0.1s");
    }
}
