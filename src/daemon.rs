//! The main loop: authorization state, one connection thread at a time,
//! reconnect back-off, signals (design.md "Connection lifecycle").

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, select};

use crate::config::allow::AllowList;
use crate::config::{Config, ValidatedUser};
use crate::conn::auth::{Auth, AuthError, AuthEvent};
use crate::conn::backoff::{self, Backoff};
use crate::conn::link::{Inbound, Link, LinkEvent, LinkSetup};
use crate::conn::outbound::{self, Outbound};
use crate::conn::timing::Timing;
use crate::conn::url;
use crate::router::Router;
use crate::sdnotify::Notifier;
use crate::sessions::{Registry, ShellRouter};
use crate::sys::wake::Wake;
use crate::tunables::Tunables;

/// While not authorized, ask the auth daemon again this often in case it
/// never signals (behavior.md §3.3 SHOULD).
const UNAUTHORIZED_POLL: Duration = Duration::from_secs(30);
/// Network changes retry at once at most this often: route churn, Wi-Fi
/// scans and IPv6 address refreshes come every few seconds on a busy device
/// and must not turn a fleet's back-off into a connection storm.
const NET_RETRY_MIN_GAP: Duration = Duration::from_secs(10);
/// A dial older than this when the network changes is presumed stuck on the
/// dead path and replaced (younger ones are left to finish).
const DIAL_STUCK: Duration = Duration::from_secs(10);
/// Everything on SIGTERM must be done well within the 2 s systemd expects.
const SHUTDOWN_SESSIONS: Duration = Duration::from_millis(1000);
const SHUTDOWN_LINK: Duration = Duration::from_millis(600);

/// Why the daemon stopped with an error.
#[derive(Debug)]
pub enum DaemonError {
    /// The system bus or the auth subscription failed at start.
    Auth(AuthError),
    /// The system bus went away while running.
    BusLost(String),
    /// A thread or fd could not be created.
    Setup(std::io::Error),
}

impl fmt::Display for DaemonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DaemonError::Auth(e) => write!(f, "{e}"),
            DaemonError::BusLost(e) => write!(f, "lost the system D-Bus: {e}"),
            DaemonError::Setup(e) => write!(f, "daemon setup failed: {e}"),
        }
    }
}

impl std::error::Error for DaemonError {}

/// The router-session protocols this build serves, per the configuration.
pub fn registry(cfg: &Config, tun: &Tunables) -> Registry {
    use crate::sessions::{filetransfer, menderclient, portforward};
    use crate::wire::codec::{PROTO_FILETRANSFER, PROTO_MENDERCLIENT, PROTO_PORTFORWARD};
    let mut r = Registry::new();
    if !cfg.file_transfer.disable {
        let ft = Arc::new(filetransfer::Service::new(&cfg.limits, tun.force_path_walk));
        r.register(PROTO_FILETRANSFER, Box::new(move |ctx| ft.handler(ctx)));
    }
    if !cfg.port_forward.disable {
        // validated at start; should it still fail here, fail closed
        let allow = AllowList::parse(&cfg.port_forward.allowed_targets).unwrap_or_else(|e| {
            log::error!("{e}; port forwarding refuses every target");
            AllowList::deny_all()
        });
        r.register(
            PROTO_PORTFORWARD,
            portforward::factory(tun.portforward, allow),
        );
    }
    if !cfg.mender_client.disable {
        r.register(
            PROTO_MENDERCLIENT,
            menderclient::factory(tun.menderclient.clone()),
        );
    }
    r
}

/// The terminal, unless `Terminal.Disable` (or not built yet).
pub fn shell_router(
    cfg: &Config,
    user: &ValidatedUser,
    out: &Outbound,
    tun: &Tunables,
) -> Option<Arc<dyn ShellRouter>> {
    if cfg.terminal.disable {
        return None;
    }
    match crate::sessions::shell::Shells::new(cfg, user, out.clone(), tun.shell_ping) {
        Ok(shells) => Some(Arc::new(shells)),
        Err(e) => {
            log::error!("remote terminal disabled: {e}");
            None
        }
    }
}

struct Supervisor {
    router: Arc<Router>,
    /// What every link shares (queue, router, timers, proxies, events).
    link_setup: LinkSetup,
    timing: Timing,
    auth: Auth,
    link: Option<Link>,
    link_seq: usize,
    /// The current link completed its upgrade and runs its loop, which
    /// also runs the router's timers; without one the supervisor runs them.
    link_up: bool,
    creds: Option<(String, String)>,
    authorized: bool,
    backoff: Backoff,
    retry_at: Option<Instant>,
    awaiting_refresh: bool,
    /// A `FetchJwtToken` may be sent in this back-off step (one per step,
    /// so a server that keeps refusing cannot cause a storm).
    fetch_allowed: bool,
    /// A `FetchJwtToken` was sent after a 401 and its token has not come.
    fetch_pending: bool,
    /// systemd's notification socket, when started as `Type=notify`.
    notify: Option<Notifier>,
    /// The last `STATUS=` sent, so repeats are not sent again.
    status: String,
    /// When the next `WATCHDOG=1` is due.
    next_watchdog: Option<Instant>,
    /// Why the last link ended, for the status line.
    last_error: Option<String>,
    /// The websocket URL of the current link.
    link_url: String,
    /// When a network change last triggered an immediate retry.
    last_net_retry: Option<Instant>,
}

/// Runs until SIGTERM/SIGINT (Ok) or a fatal error.
pub fn run(cfg: &Config, user: &ValidatedUser) -> Result<(), DaemonError> {
    // Every environment knob (and systemd's) is read before any thread starts.
    let tun = Tunables::from_env();
    let notify = Notifier::from_env();
    let timing = tun.timing;
    let wake = Arc::new(Wake::new().map_err(DaemonError::Setup)?);
    let (out, out_rx) = outbound::queue(wake);
    let shell = shell_router(cfg, user, &out, &tun);
    let router = Arc::new(Router::new(out, registry(cfg, &tun), shell, timing));

    let (sig_tx, sig_rx) = crossbeam_channel::unbounded();
    let signals = crate::signals::install(&[libc::SIGTERM, libc::SIGINT, libc::SIGUSR1], sig_tx)
        .map_err(DaemonError::Setup)?;
    let (auth_tx, auth_rx) = crossbeam_channel::unbounded();
    let auth = Auth::start(auth_tx).map_err(DaemonError::Auth)?;
    let (links_tx, links_rx) = crossbeam_channel::unbounded();
    let base = Duration::from_secs(cfg.reconnect_interval_seconds.max(1) as u64);
    let mut sup = Supervisor {
        link_setup: LinkSetup {
            out: out_rx,
            inbound: Arc::clone(&router) as Arc<dyn Inbound>,
            timing,
            proxies: Arc::new(tun.proxies.clone()),
            events: links_tx,
        },
        router,
        timing,
        auth,
        link: None,
        link_seq: 0,
        link_up: false,
        creds: None,
        authorized: false,
        backoff: Backoff::new(base, backoff::seed()),
        retry_at: None,
        awaiting_refresh: false,
        fetch_allowed: true,
        fetch_pending: false,
        notify,
        status: String::new(),
        next_watchdog: None,
        last_error: None,
        link_url: String::new(),
        last_net_retry: None,
    };
    // one pending "network gained" is as good as many
    let (net_tx, net_rx) = crossbeam_channel::bounded(1);
    let netwatch = match crate::conn::netwatch::start(net_tx) {
        Ok(w) => Some(w),
        Err(e) => {
            log::warn!("cannot watch network changes (rtnetlink): {e}; relying on the back-off");
            None
        }
    };
    // Ready once the configuration is loaded and D-Bus is up; the server may
    // take much longer, and systemd must not hold up the boot for it.
    if let Some(n) = &sup.notify {
        n.send("READY=1\nSTATUS=waiting for authorization");
        sup.status = "waiting for authorization".to_string();
        sup.next_watchdog = n.watchdog_interval().map(|_| Instant::now());
    }
    let result = sup.main_loop(&auth_rx, &links_rx, &sig_rx, &net_rx);
    // every thread the daemon started is joined (or, stuck, given up on)
    sup.auth.stop(SHUTDOWN_LINK);
    if let Some(w) = netwatch {
        w.stop();
    }
    signals.stop();
    result
}

impl Supervisor {
    fn main_loop(
        &mut self,
        auth_rx: &Receiver<AuthEvent>,
        links_rx: &Receiver<LinkEvent>,
        sig_rx: &Receiver<libc::c_int>,
        net_rx: &Receiver<()>,
    ) -> Result<(), DaemonError> {
        loop {
            // checked every round: a busy channel must not starve the pings
            self.watchdog();
            // Sessions without a thread keep their idle timers while the
            // link is down (they time out on time, as threads would).
            let router_due = (!self.link_up)
                .then(|| self.router.next_deadline())
                .flatten();
            let next = [self.retry_at, self.next_watchdog, router_due]
                .into_iter()
                .flatten()
                .min();
            let timeout = next.map_or(Duration::from_secs(3600), |t| {
                t.saturating_duration_since(Instant::now())
            });
            select! {
                recv(sig_rx) -> sig => match sig {
                    Ok(libc::SIGUSR1) => self.dump_status(),
                    Ok(sig) => {
                        log::info!("received signal {sig}; shutting down");
                        self.shutdown();
                        return Ok(());
                    }
                    Err(_) => {}
                },
                recv(auth_rx) -> ev => match ev {
                    Ok(AuthEvent::BusLost(e)) => {
                        self.shutdown();
                        return Err(DaemonError::BusLost(e));
                    }
                    Ok(ev) => self.on_auth(ev),
                    Err(_) => return Err(DaemonError::BusLost("D-Bus thread ended".to_string())),
                },
                recv(links_rx) -> ev => if let Ok(ev) = ev { self.on_link(ev) },
                recv(net_rx) -> ev => if ev.is_ok() { self.on_network_gained() },
                default(timeout) => self.on_timer(),
            }
        }
    }

    fn on_auth(&mut self, ev: AuthEvent) {
        match ev {
            AuthEvent::Token {
                token,
                url,
                requested,
            } => {
                if token.is_empty() || url.is_empty() {
                    if requested && self.awaiting_refresh {
                        // A reconnect found no credentials (Go fails the dial
                        // with them empty and says so in the same words).
                        log::error!(
                            "eventLoop: error reconnecting: no token or server URL from the Mender auth service"
                        );
                    }
                    self.deauthorize();
                    if requested && self.creds.is_none() {
                        self.retry_at = Some(Instant::now() + UNAUTHORIZED_POLL);
                    }
                    return;
                }
                let pair = (token, url);
                let changed = self.creds.as_ref() != Some(&pair);
                let was_authorized = self.authorized;
                self.creds = Some(pair);
                self.authorized = true;
                if changed || !was_authorized {
                    if changed && was_authorized {
                        log::info!("token or server URL changed; reconnecting");
                    }
                    // A token we fetched after a 401 is tried at once but
                    // keeps the back-off: if the server refuses it too, the
                    // next attempt still waits its step.
                    if !std::mem::take(&mut self.fetch_pending) {
                        self.backoff.reset();
                    }
                    self.connect_now();
                } else if (requested && self.awaiting_refresh)
                    || (self.link.is_none() && self.retry_at.is_none())
                {
                    self.connect_now();
                }
            }
            AuthEvent::CallFailed { requested, .. } => {
                if !requested {
                    return;
                }
                if self.authorized && self.awaiting_refresh {
                    // The auth daemon may be restarting; the last token may still work.
                    self.connect_now();
                } else if !self.authorized {
                    self.retry_at = Some(Instant::now() + UNAUTHORIZED_POLL);
                }
            }
            AuthEvent::BusLost(_) => {}
        }
    }

    /// Sends `STATUS=<text>` to systemd (shown by `systemctl status`).
    fn set_status(&mut self, text: String) {
        if let Some(n) = &self.notify
            && text != self.status
        {
            n.send(&crate::sdnotify::status(&text));
            self.status = text;
        }
    }

    /// Pings systemd's watchdog when due, but only while the connection
    /// thread (which also runs the router) proves it is making progress: a
    /// stuck thread stops the pings and systemd restarts the daemon.
    fn watchdog(&mut self) {
        let (Some(due), Some(n)) = (self.next_watchdog, &self.notify) else {
            return;
        };
        let now = Instant::now();
        if now < due {
            return;
        }
        let Some(interval) = n.watchdog_interval() else {
            return;
        };
        if self.link.as_ref().is_none_or(|l| l.is_alive(self.timing)) {
            n.send("WATCHDOG=1");
        } else {
            log::error!("the connection thread is stuck; withholding the systemd watchdog ping");
        }
        self.next_watchdog = Some(now + interval);
    }

    fn deauthorize(&mut self) {
        self.set_status("waiting for authorization".to_string());
        if self.authorized {
            // Go's wording (meta-mender greps it); its sessions are shell sessions.
            let shells = self.router.terminate_shells();
            log::info!("dbusEventLoop terminated {shells} sessions, {shells} shells");
        }
        self.authorized = false;
        self.awaiting_refresh = false;
        self.retry_at = None;
        if let Some(link) = self.take_link() {
            link.stop_and_join(SHUTDOWN_LINK);
        }
    }

    fn connect_now(&mut self) {
        self.awaiting_refresh = false;
        self.retry_at = None;
        if let Some(old) = self.take_link() {
            old.stop_and_join(SHUTDOWN_LINK);
        }
        let Some((token, server_url)) = self.creds.clone() else {
            return;
        };
        let ep = match url::endpoint(&server_url) {
            Ok(ep) => ep,
            Err(e) => {
                self.log_connect_failure(&e.to_string());
                self.last_error = Some(e.to_string());
                self.schedule_retry();
                return;
            }
        };
        self.link_seq += 1;
        self.link_url = ep.url.clone();
        self.set_status(format!("connecting to {}", ep.url));
        match Link::start(self.link_seq, ep, token, &self.link_setup) {
            Ok(link) => self.link = Some(link),
            Err(e) => {
                log::error!("cannot start the connection thread: {e}");
                self.last_error = Some(e.to_string());
                self.schedule_retry();
            }
        }
    }

    /// A failed attempt in Go's two lines (meta-mender greps both).
    fn log_connect_failure(&self, e: &str) {
        let (len, server) = self
            .creds
            .as_ref()
            .map_or((0, ""), |(t, u)| (t.len(), u.as_str()));
        log::error!(
            "connection manager failed to connect to {server}{}: {e}; len(token)={len}",
            url::CONNECT_PATH
        );
        log::error!("eventLoop: error reconnecting: {e}");
    }

    fn schedule_retry(&mut self) {
        let delay = self.backoff.next_delay();
        log::info!("reconnecting in {:.1}s", delay.as_secs_f64());
        self.retry_at = Some(Instant::now() + delay);
        let why = self.last_error.as_deref().unwrap_or("connection closed");
        let text = format!("reconnecting in {} s: {why}", delay.as_secs_f64().round());
        self.set_status(text);
    }

    fn on_link(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::Connected { id } => {
                // a replaced link may still report its late success
                if self.link.as_ref().map(Link::id) != Some(id) {
                    return;
                }
                if let Some((_, url)) = &self.creds {
                    // Go's wording with the URL as D-Bus gave it (meta-mender greps it).
                    log::info!("eventLoop: Connection established with {url}");
                }
                self.link_up = true;
                self.fetch_pending = false;
                self.last_error = None;
                self.set_status(format!("connected to {}", self.link_url));
            }
            LinkEvent::Ended { id, end, lived } => {
                if self.link.as_ref().map(Link::id) != Some(id) {
                    return; // a link we already replaced
                }
                self.link = None;
                self.link_up = false;
                if let Some(l) = lived {
                    self.backoff.connection_lived(l);
                }
                let unauthorized = end.unauthorized();
                let error = end.error_text();
                match (&error, lived) {
                    (Some(e), None) => self.log_connect_failure(e),
                    (Some(e), Some(_)) => log::error!("connection lost: {e}"),
                    (None, _) => {}
                }
                self.last_error = error;
                if unauthorized {
                    log::warn!("the server refused the token (HTTP 401)");
                    if self.authorized && std::mem::take(&mut self.fetch_allowed) {
                        // The renewed token comes as JwtTokenStateChange and
                        // is tried at once; the back-off timer below bounds
                        // the wait for it.
                        log::info!("asking the auth daemon for a new token (FetchJwtToken)");
                        self.fetch_pending = true;
                        self.auth.fetch();
                    }
                }
                if self.authorized {
                    self.schedule_retry();
                }
            }
        }
    }

    /// A link came up, or an address or default route appeared: while
    /// disconnected, retry now with a fresh back-off instead of waiting out
    /// a step of up to a minute.
    fn on_network_gained(&mut self) {
        if !self.authorized {
            return;
        }
        let now = Instant::now();
        if self
            .last_net_retry
            .is_some_and(|t| now.duration_since(t) < NET_RETRY_MIN_GAP)
        {
            return;
        }
        match &self.link {
            None if self.retry_at.is_some() => {}
            // a dial begun before the change may be stuck on the dead path
            Some(l)
                if l.dialing_since()
                    .is_some_and(|t| now.duration_since(t) >= DIAL_STUCK) =>
            {
                if let Some(old) = self.take_link() {
                    old.stop_and_join(SHUTDOWN_LINK);
                }
            }
            _ => return,
        }
        log::info!("network change: retrying the connection now");
        self.last_net_retry = Some(now);
        self.backoff.reset();
        // through the timer path, so the token is re-read first
        self.retry_at = Some(now);
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        if !self.link_up && self.router.next_deadline().is_some_and(|d| now >= d) {
            self.router.tick(now);
        }
        let Some(at) = self.retry_at else { return };
        if Instant::now() < at {
            return;
        }
        self.retry_at = None;
        self.fetch_allowed = true;
        // Re-ask D-Bus before every attempt: the token may have been renewed.
        self.awaiting_refresh = self.authorized;
        self.auth.refresh();
        if !self.authorized {
            self.retry_at = Some(Instant::now() + UNAUTHORIZED_POLL);
        }
    }

    /// Drops the current link from our books: its loop no longer runs the
    /// router's timers, so the supervisor does until the next link is up.
    fn take_link(&mut self) -> Option<Link> {
        self.link_up = false;
        self.link.take()
    }

    fn shutdown(&mut self) {
        if let Some(n) = &self.notify {
            n.send("STOPPING=1\nSTATUS=shutting down");
        }
        self.router.shutdown(SHUTDOWN_SESSIONS);
        if let Some(link) = self.take_link() {
            link.stop_and_join(SHUTDOWN_LINK);
        }
    }

    fn dump_status(&self) {
        let shells = self.router.shell_status();
        let mut text = format!(
            "mender-connect daemon v{}\n status: \n  connected: {}\n  authorized: {}\n  shells: {}/{}\n  router sessions: {}\n  threads: {}",
            crate::cli::version_line(),
            self.link.is_some(),
            self.authorized,
            shells.len(),
            crate::sessions::shell::MAX_SHELLS,
            self.router.session_count(),
            crate::threads::live() + 1
        );
        for line in shells {
            text.push_str("\n   ");
            text.push_str(&line);
        }
        log::info!("{text}");
    }
}
