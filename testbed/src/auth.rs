//! Stand-in for the Mender auth daemon's D-Bus API (protocol.md §1.1,
//! behavior.md §3.1), served with the plain `dbus` crate on its own thread.
//!
//! Besides the real interface, the service object exports a private control
//! interface (`io.mender.testbed.Control`) that the owning [`AuthService`]
//! calls to update the token and to stop the thread: the service connection is
//! only ever touched by its own thread, and a method call is what wakes it.

use dbus::Message;
use dbus::blocking::Connection;
use dbus::channel::{MatchingReceiver, Sender};
use dbus::message::MatchRule;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Well-known bus name of the auth daemon.
pub const AUTH_NAME: &str = "io.mender.AuthenticationManager";
/// Object path of the auth API.
pub const AUTH_PATH: &str = "/io/mender/AuthenticationManager";
/// Interface of the auth API.
pub const AUTH_IFACE: &str = "io.mender.Authentication1";
/// Signal emitted on token changes.
pub const SIGNAL: &str = "JwtTokenStateChange";

const CTL_IFACE: &str = "io.mender.testbed.Control";
const CTL_PATH: &str = "/io/mender/testbed";
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct State {
    token: String,
    url: String,
    get_calls: usize,
    fetch_calls: usize,
    fail_get: bool,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    cond: Condvar,
}

/// The stand-in auth service. Drop stops its thread and releases the name.
pub struct AuthService {
    shared: Arc<Shared>,
    ctl: Mutex<Connection>,
    unique_name: String,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for AuthService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthService")
            .field("unique_name", &self.unique_name)
            .field("state", &self.shared.state)
            .finish()
    }
}

impl AuthService {
    /// Connects to the bus at `bus_address`, owns `io.mender.AuthenticationManager`
    /// and serves `GetJwtToken` (returning `(token, server_url)`) and
    /// `FetchJwtToken` (returning `true`). Returns only once the name is owned.
    pub fn start(bus_address: &str, token: &str, server_url: &str) -> AuthService {
        let shared = Arc::new(Shared::default());
        {
            let mut st = shared.state.lock().unwrap();
            st.token = token.to_string();
            st.url = server_url.to_string();
        }
        let (ready_tx, ready_rx) = crossbeam_channel::bounded::<Result<String, String>>(1);
        let addr = bus_address.to_string();
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("auth-service".into())
            .spawn(move || serve(&addr, sh, ready_tx))
            .expect("spawn auth-service thread");
        let unique_name = match ready_rx.recv_timeout(crate::TIMEOUT) {
            Ok(Ok(name)) => name,
            Ok(Err(e)) => panic!("auth service failed to start: {e}"),
            Err(e) => panic!("auth service did not start: {e}"),
        };
        let ctl = Connection::new_address(bus_address).expect("auth control connection");
        AuthService {
            shared,
            ctl: Mutex::new(ctl),
            unique_name,
            thread: Some(thread),
        }
    }

    /// Replaces the pair returned by `GetJwtToken` and emits
    /// `JwtTokenStateChange(token, url)` from the name owner. Returns once the
    /// signal has been handed to the bus.
    pub fn set(&self, token: &str, url: &str) {
        self.control("Set", token, url);
    }

    /// Replaces the pair returned by `GetJwtToken` without a signal
    /// (meta-mender's `MockSetJwtToken`).
    pub fn set_quietly(&self, token: &str, url: &str) {
        self.control("SetQuietly", token, url);
    }

    /// The pair `GetJwtToken` currently returns.
    pub fn current(&self) -> (String, String) {
        let st = self.shared.state.lock().unwrap();
        (st.token.clone(), st.url.clone())
    }

    /// Number of `GetJwtToken` calls served so far.
    pub fn get_calls(&self) -> usize {
        self.shared.state.lock().unwrap().get_calls
    }

    /// Number of `FetchJwtToken` calls served so far.
    pub fn fetch_calls(&self) -> usize {
        self.shared.state.lock().unwrap().fetch_calls
    }

    /// Waits until at least `n` `GetJwtToken` calls have been served.
    pub fn wait_get_calls(&self, n: usize, timeout: Duration) -> bool {
        self.wait(timeout, |st| st.get_calls >= n)
    }

    /// Waits until at least `n` `FetchJwtToken` calls have been served.
    pub fn wait_fetch_calls(&self, n: usize, timeout: Duration) -> bool {
        self.wait(timeout, |st| st.fetch_calls >= n)
    }

    /// When true, `GetJwtToken` answers with a D-Bus error
    /// (`org.freedesktop.DBus.Error.Failed`) instead of the pair.
    pub fn set_fail_get(&self, fail: bool) {
        self.shared.state.lock().unwrap().fail_get = fail;
    }

    /// Unique bus name (`:1.N`) of the service connection.
    pub fn unique_name(&self) -> &str {
        &self.unique_name
    }

    fn wait(&self, timeout: Duration, cond: impl Fn(&State) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.state.lock().unwrap();
        while !cond(&st) {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self.shared.cond.wait_timeout(st, deadline - now).unwrap().0;
        }
        true
    }

    fn control(&self, method: &str, token: &str, url: &str) {
        let ctl = self.ctl.lock().unwrap();
        let proxy = ctl.with_proxy(self.unique_name.as_str(), CTL_PATH, CALL_TIMEOUT);
        let r: Result<(), dbus::Error> = proxy.method_call(CTL_IFACE, method, (token, url));
        r.unwrap_or_else(|e| panic!("auth service control {method}: {e}"));
    }
}

impl Drop for AuthService {
    fn drop(&mut self) {
        if let Ok(ctl) = self.ctl.lock() {
            let proxy = ctl.with_proxy(self.unique_name.as_str(), CTL_PATH, CALL_TIMEOUT);
            // Fails only if the bus is gone, in which case the thread has
            // already seen the disconnect.
            let _: Result<(), dbus::Error> = proxy.method_call(CTL_IFACE, "Quit", ());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    addr: &str,
    shared: Arc<Shared>,
    ready: crossbeam_channel::Sender<Result<String, String>>,
) {
    let conn = match Connection::new_address(addr) {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(format!("connect to {addr}: {e}")));
            return;
        }
    };
    use dbus::blocking::stdintf::org_freedesktop_dbus::RequestNameReply;
    match conn.request_name(AUTH_NAME, false, true, true) {
        Ok(RequestNameReply::PrimaryOwner) | Ok(RequestNameReply::AlreadyOwner) => {}
        Ok(r) => {
            let _ = ready.send(Err(format!("request_name: {r:?}")));
            return;
        }
        Err(e) => {
            let _ = ready.send(Err(format!("request_name: {e}")));
            return;
        }
    }
    let quit = Arc::new(AtomicBool::new(false));

    let sh = shared.clone();
    conn.start_receive(
        MatchRule::new_method_call().with_interface(AUTH_IFACE),
        Box::new(move |msg, c| {
            let _ = c.send(handle_auth(&sh, &msg));
            true
        }),
    );
    let sh = shared;
    let q = quit.clone();
    conn.start_receive(
        MatchRule::new_method_call().with_interface(CTL_IFACE),
        Box::new(move |msg, c| {
            handle_control(&sh, &q, &msg, c);
            true
        }),
    );
    let _ = ready.send(Ok(conn.unique_name().to_string()));
    drop(ready);

    while !quit.load(Ordering::SeqCst) {
        // Woken by any message; Quit arrives as one. An error means the bus
        // went away.
        if conn.process(Duration::from_secs(3600)).is_err() {
            break;
        }
    }
    let _ = conn.release_name(AUTH_NAME);
}

fn handle_auth(shared: &Shared, msg: &Message) -> Message {
    if msg.path().as_deref() != Some(AUTH_PATH) {
        return error(
            msg,
            "org.freedesktop.DBus.Error.UnknownObject",
            "no such object",
        );
    }
    let reply = {
        let mut st = shared.state.lock().unwrap();
        match msg.member().as_deref() {
            Some("GetJwtToken") => {
                st.get_calls += 1;
                if st.fail_get {
                    error(
                        msg,
                        "org.freedesktop.DBus.Error.Failed",
                        "stand-in told to fail",
                    )
                } else {
                    msg.method_return()
                        .append2(st.token.as_str(), st.url.as_str())
                }
            }
            Some("FetchJwtToken") => {
                st.fetch_calls += 1;
                msg.method_return().append1(true)
            }
            _ => error(
                msg,
                "org.freedesktop.DBus.Error.UnknownMethod",
                "no such method",
            ),
        }
    };
    shared.cond.notify_all();
    reply
}

fn handle_control(shared: &Shared, quit: &AtomicBool, msg: &Message, c: &Connection) {
    let member = msg.member().map(|m| m.to_string()).unwrap_or_default();
    match member.as_str() {
        "Set" | "SetQuietly" => {
            let (token, url): (String, String) = match msg.read2() {
                Ok(v) => v,
                Err(e) => {
                    let _ = c.send(error(
                        msg,
                        "org.freedesktop.DBus.Error.InvalidArgs",
                        &e.to_string(),
                    ));
                    return;
                }
            };
            {
                let mut st = shared.state.lock().unwrap();
                st.token = token.clone();
                st.url = url.clone();
            }
            shared.cond.notify_all();
            if member == "SetQuietly" {
                let _ = c.send(msg.method_return());
                c.channel().flush();
                return;
            }
            let sig = Message::new_signal(AUTH_PATH, AUTH_IFACE, SIGNAL)
                .expect("valid signal names")
                .append2(token, url);
            let _ = c.send(sig);
            let _ = c.send(msg.method_return());
        }
        "Quit" => {
            quit.store(true, Ordering::SeqCst);
            let _ = c.send(msg.method_return());
        }
        _ => {
            let _ = c.send(error(
                msg,
                "org.freedesktop.DBus.Error.UnknownMethod",
                "no such method",
            ));
        }
    }
    c.channel().flush();
}

fn error(msg: &Message, name: &str, text: &str) -> Message {
    let text = std::ffi::CString::new(text.replace('\0', " ")).expect("no NUL");
    msg.error(&name.into(), &text)
}
