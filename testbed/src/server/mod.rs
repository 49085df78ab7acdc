//! Stand-in for deviceconnect's device endpoint (protocol.md §1): a websocket
//! server on 127.0.0.1 (plain or TLS) that records what the device sends and
//! lets a test send, ping, close or cut the connection.
//!
//! Threads: one accept thread (`ws-accept`), one per TCP connection
//! (`ws-conn-N`). A connection thread owns its websocket; other threads talk
//! to it through a command channel plus a wake-up socket it polls together
//! with the TCP socket, so nothing blocks or polls on a timer. Recorded state
//! lives behind a mutex + condvar so every `wait_*` / `recv*` blocks with a
//! deadline.
//!
//! - `listener`: the listening socket and the [`Server`] a test holds;
//! - `handshake`: one TCP connection from accept to hang-up (TLS and
//!   websocket handshakes, rejects, hand-over to an [`HttpHook`]);
//! - `conn`: one accepted connection as a test sees it ([`ConnHandle`]);
//! - `conn_loop`: the connection thread's event loop (commands out, messages
//!   recorded);
//! - `io`: the byte stream under tungstenite, with its pong filter;
//! - `hook`: requests other than the device's connect path ([`HttpHook`]);
//! - `event`: what a test can observe ([`Event`], [`Frame`], [`UpgradeRequest`]).

mod conn;
mod conn_loop;
mod event;
mod exchange;
mod handshake;
mod hook;
mod io;
mod listener;

pub use conn::ConnHandle;
pub use event::{Event, Frame, UpgradeRequest};
pub use exchange::Exchange;
pub use hook::{HttpHook, HttpRequest, HttpStream, WsDriver};
pub use listener::{Connections, Server};

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Inbound message limit, like deviceconnect (protocol.md §1.6).
pub const MAX_MESSAGE_SIZE: usize = 8 << 20;
/// Deadline for the TLS and websocket handshakes of one connection.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits on `cond` until `done(state)` or `timeout`; returns the guard and
/// whether `done` held.
fn wait_on<'a, T>(
    m: &'a Mutex<T>,
    cond: &Condvar,
    timeout: Duration,
    mut done: impl FnMut(&mut T) -> bool,
) -> (MutexGuard<'a, T>, bool) {
    let deadline = Instant::now() + timeout;
    let mut g = m.lock().unwrap();
    loop {
        if done(&mut g) {
            return (g, true);
        }
        let now = Instant::now();
        if now >= deadline {
            return (g, false);
        }
        g = cond.wait_timeout(g, deadline - now).unwrap().0;
    }
}
