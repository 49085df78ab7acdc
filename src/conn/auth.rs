//! The token source: `io.mender.Authentication1` on the system D-Bus
//! (behavior.md §3). One thread owns the bus connection; it answers refresh
//! requests and turns `JwtTokenStateChange` signals into events, event-driven
//! (no polling loop).

use std::fmt;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use dbus::blocking::Connection;
use dbus::channel::{BusType, Channel};
use dbus::message::MatchRule;

use crate::sys::poll::{PollFd, poll};
use crate::sys::wake::Wake;

/// Well-known bus name of the Mender auth daemon.
pub const BUS_NAME: &str = "io.mender.AuthenticationManager";
/// Object path of the auth manager.
pub const OBJECT_PATH: &str = "/io/mender/AuthenticationManager";
/// Interface carrying the token method and signal.
pub const INTERFACE: &str = "io.mender.Authentication1";
/// The reference's method-call timeout.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// What the auth thread reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthEvent {
    /// A token/URL pair (either may be empty = not authorized).
    Token {
        /// The device JWT.
        token: String,
        /// The server (usually the auth daemon's local proxy).
        url: String,
        /// `true` when this answers `refresh()`, `false` for a signal.
        requested: bool,
    },
    /// `GetJwtToken` failed (the auth daemon is not running, or timed out).
    CallFailed {
        /// The D-Bus error.
        error: String,
        /// `true` when this answers `refresh()`.
        requested: bool,
    },
    /// The system bus connection broke; no more events will come.
    BusLost(String),
}

/// Why the D-Bus side could not start.
#[derive(Debug)]
pub enum AuthError {
    /// The system bus is unreachable.
    Connect(dbus::Error),
    /// Subscribing to the signal failed.
    Match(dbus::Error),
    /// The thread could not be created.
    Thread(std::io::Error),
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::Connect(e) => write!(
                f,
                "mender-connect dbus failed to connect, error: {}",
                e.message().unwrap_or("unknown error")
            ),
            AuthError::Match(e) => write!(
                f,
                "subscribing to JwtTokenStateChange failed: {}",
                e.message().unwrap_or("unknown error")
            ),
            AuthError::Thread(e) => write!(f, "cannot start the D-Bus thread: {e}"),
        }
    }
}

impl std::error::Error for AuthError {}

/// What the supervisor asks the auth thread for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    /// `GetJwtToken`: the current pair, answered as an event.
    Get,
    /// `FetchJwtToken`: make the auth daemon renew the token; the new one
    /// arrives as a `JwtTokenStateChange` signal.
    Fetch,
    /// End the thread (shutdown).
    Stop,
}

/// Handle on the auth thread.
pub struct Auth {
    requests: Sender<Request>,
    wake: Arc<Wake>,
    join: Option<JoinHandle<()>>,
}

impl Auth {
    /// Connects to the system bus (`DBUS_SYSTEM_BUS_ADDRESS` is honoured by
    /// libdbus), subscribes, and starts the thread, which immediately asks for
    /// the token once. Failing to reach the bus is fatal (exit 1 upstream).
    pub fn start(events: Sender<AuthEvent>) -> Result<Auth, AuthError> {
        let mut channel = Channel::get_private(BusType::System).map_err(AuthError::Connect)?;
        // The fd is needed to poll the bus together with the wake fd.
        channel.set_watch_enabled(true);
        let conn = Connection::from(channel);
        let wake = Arc::new(Wake::new().map_err(AuthError::Thread)?);
        let (requests, req_rx) = crossbeam_channel::unbounded::<Request>();
        let signal_events = events.clone();
        let rule = MatchRule::new_signal(INTERFACE, "JwtTokenStateChange").with_path(OBJECT_PATH);
        conn.add_match(rule, move |(token, url): (String, String), _, _| {
            log::debug!(
                "JwtTokenStateChange: token {} bytes, url {url:?}",
                token.len()
            );
            let _ = signal_events.send(AuthEvent::Token {
                token,
                url,
                requested: false,
            });
            true
        })
        .map_err(AuthError::Match)?;
        // A (re)started auth daemon may not signal; ask it once it owns its name.
        let owner_wake = Arc::clone(&wake);
        let owner_requests = requests.clone();
        let rule = MatchRule::new_signal("org.freedesktop.DBus", "NameOwnerChanged");
        conn.add_match(
            rule,
            move |(name, _old, new): (String, String, String), _, _| {
                if name == BUS_NAME && !new.is_empty() {
                    log::debug!("{BUS_NAME} has a new owner; asking for the token");
                    let _ = owner_requests.send(Request::Get);
                    owner_wake.wake();
                }
                true
            },
        )
        .map_err(AuthError::Match)?;
        let thread_wake = Arc::clone(&wake);
        let _ = requests.send(Request::Get);
        let join = crate::threads::spawn("dbus".to_string(), 128 * 1024, move || {
            serve(&conn, &thread_wake, &req_rx, &events)
        })
        .map_err(AuthError::Thread)?;
        Ok(Auth {
            requests,
            wake,
            join: Some(join),
        })
    }

    /// Asks for a fresh `GetJwtToken`; the answer comes as an event with
    /// `requested: true`.
    pub fn refresh(&self) {
        let _ = self.requests.send(Request::Get);
        self.wake.wake();
    }

    /// Calls `FetchJwtToken` (the server refused the token); the renewed
    /// token comes as a `JwtTokenStateChange` signal.
    pub fn fetch(&self) {
        let _ = self.requests.send(Request::Fetch);
        self.wake.wake();
    }

    /// Ends the thread and waits for it, at most `wait` (a D-Bus call in
    /// flight may take up to its own timeout).
    pub fn stop(&mut self, wait: Duration) {
        let _ = self.requests.send(Request::Stop);
        self.wake.wake();
        if let Some(join) = self.join.take() {
            crate::threads::join_within(join, wait);
        }
    }
}

fn serve(conn: &Connection, wake: &Wake, requests: &Receiver<Request>, events: &Sender<AuthEvent>) {
    let fd = conn.channel().watch().fd;
    loop {
        // Several requests queued meanwhile need only one call of each kind.
        let (mut get, mut fetch) = (false, false);
        while let Ok(r) = requests.try_recv() {
            match r {
                Request::Get => get = true,
                Request::Fetch => fetch = true,
                Request::Stop => return,
            }
        }
        if fetch && let Err(e) = fetch_jwt_token(conn) {
            log::warn!("call to FetchJwtToken on the Mender D-Bus API failed: {e}");
        }
        if get {
            let ev = match get_jwt_token(conn) {
                Ok((token, url)) => AuthEvent::Token {
                    token,
                    url,
                    requested: true,
                },
                Err(e) => {
                    log::warn!("call to GetJwtToken on the Mender D-Bus API failed: {e}");
                    AuthEvent::CallFailed {
                        error: e,
                        requested: true,
                    }
                }
            };
            if events.send(ev).is_err() {
                return;
            }
        }
        loop {
            match conn.process(Duration::ZERO) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    let msg = e.message().unwrap_or("unknown error").to_string();
                    let _ = events.send(AuthEvent::BusLost(msg));
                    return;
                }
            }
        }
        if !requests.is_empty() {
            continue;
        }
        let mut fds = [
            PollFd::new(fd, libc::POLLIN),
            PollFd::new(wake.as_raw_fd(), libc::POLLIN),
        ];
        match poll(&mut fds, -1) {
            Ok(_) => {
                if fds[1].revents() & libc::POLLIN != 0 {
                    wake.drain();
                }
            }
            Err(e) => {
                let _ = events.send(AuthEvent::BusLost(format!("poll: {e}")));
                return;
            }
        }
    }
}

/// The reply (a boolean in mender-auth) is not needed: the outcome is the
/// signal, so it is not read and a differing signature cannot fail the call.
fn fetch_jwt_token(conn: &Connection) -> Result<(), String> {
    let proxy = conn.with_proxy(BUS_NAME, OBJECT_PATH, CALL_TIMEOUT);
    proxy
        .method_call(INTERFACE, "FetchJwtToken", ())
        .map_err(|e: dbus::Error| {
            format!(
                "{}: {}",
                e.name().unwrap_or("error"),
                e.message().unwrap_or("")
            )
        })
}

fn get_jwt_token(conn: &Connection) -> Result<(String, String), String> {
    let proxy = conn.with_proxy(BUS_NAME, OBJECT_PATH, CALL_TIMEOUT);
    proxy
        .method_call(INTERFACE, "GetJwtToken", ())
        .map_err(|e: dbus::Error| {
            format!(
                "{}: {}",
                e.name().unwrap_or("error"),
                e.message().unwrap_or("")
            )
        })
}
