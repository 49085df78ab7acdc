//! Shared integration-test bed: a private D-Bus, a stand-in Mender auth
//! service, a stand-in deviceconnect server (plain and TLS) and a helper to run
//! the daemon under test.
//!
//! A dev-only workspace crate (`mender-connect-testbed`, never published):
//! the integration tests, benches and examples of `mender-connect` use it as
//! a dev-dependency, so it is compiled once instead of into every test target.
//!
//! Every helper owns what it starts: dropping it stops its threads, kills and
//! reaps its processes and removes its temporary files. Every wait has a
//! deadline; nothing sleeps to synchronise.

pub mod auth;
pub mod bench;
pub mod daemon;
pub mod dbus;
pub mod drive;
pub mod env;
pub mod hosts;
pub mod http;
pub mod management;
pub mod netlab;
pub mod operator;
pub mod relay;
pub mod rest_ft;
pub mod server;
pub mod target;
pub mod tinyproxy;
pub mod tls;

pub use self::auth::AuthService;
pub use self::daemon::{Daemon, default_config};
pub use self::dbus::DbusDaemon;
pub use self::management::{Managed, Management};
pub use self::server::{ConnHandle, Event, Frame, Server};
pub use self::tls::TlsCert;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Default deadline for "this should happen promptly" waits in tests.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// The deviceconnect websocket path (protocol.md §1.2).
pub const CONNECT_PATH: &str = "/api/devices/v1/deviceconnect/connect";

/// A directory under the system temp dir, removed (recursively) on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates a fresh, empty directory named after `tag`, the process id and
    /// a process-wide counter (unique even when tests run in parallel).
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("mc-testbed-{}-{}-{}", tag, std::process::id(), n));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        TempDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `self.path().join(name)`.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Polls `cond` until it returns true or `timeout` passes; returns the last
/// result. For conditions nobody can notify us about (files, processes); the
/// pause between polls is only pacing, never the synchronisation itself.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The next item `recv` yields that satisfies `pred`, skipping the others;
/// `None` once `timeout` has passed with nothing matching, or when `recv`
/// gives `None` (timed out or a closed source). `recv` gets the time left
/// (zero after the deadline, so what is already buffered is still looked at);
/// `pred` may act on what it skips (answer a ping, keep it for later).
pub fn next_matching<T>(
    timeout: Duration,
    mut recv: impl FnMut(Duration) -> Option<T>,
    mut pred: impl FnMut(&T) -> bool,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let item = recv(deadline.saturating_duration_since(Instant::now()))?;
        if pred(&item) {
            return Some(item);
        }
    }
}

/// Waits out a scenario's duration (an outage, a rate window), never a
/// synchronisation.
pub fn hold(d: Duration) {
    let until = Instant::now() + d;
    while Instant::now() < until {
        std::thread::park_timeout(until - Instant::now());
    }
}

/// Whether a process with this id exists (zombies included).
pub fn process_exists(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence/permission.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Hex dump of at most `max` bytes, for failure messages and the demo log.
pub fn hex(bytes: &[u8], max: usize) -> String {
    let mut s: String = bytes
        .iter()
        .take(max)
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ");
    if bytes.len() > max {
        s.push_str(&format!(" … (+{} bytes)", bytes.len() - max));
    }
    s
}

/// Children of `pid` (zombies included).
pub fn children(pid: u32) -> Vec<(i32, char)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(s) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let Some(rest) = s.rsplit(')').next() else {
            continue;
        };
        let mut f = rest.split_ascii_whitespace();
        let state = f.next().and_then(|s| s.chars().next()).unwrap_or('?');
        if f.next().and_then(|s| s.parse::<u32>().ok()) == Some(pid) {
            out.push((p, state));
        }
    }
    out
}

/// Deterministic pseudo-random bytes (xorshift), so a mismatch is real and
/// a run can be repeated.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}
