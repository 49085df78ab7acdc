//! Every environment knob, read once before any thread starts. The knobs
//! exist so tests can shrink timers from minutes to milliseconds; reading
//! them in one place keeps run-time behaviour independent of a changing
//! environment and makes the whole set visible.

use std::time::Duration;

use crate::conn::proxy;
use crate::conn::timing::Timing;
use crate::knobs::Lookup;
use crate::sessions::{menderclient, portforward, shell};

/// The knobs, as read at start.
#[derive(Debug, Clone)]
pub struct Tunables {
    /// Websocket keepalive and router-session idle timers.
    pub timing: Timing,
    /// HTTP(S)_PROXY and NO_PROXY, like Go's `http.ProxyFromEnvironment`.
    pub proxies: proxy::Settings,
    /// Port-forward timers and connection caps.
    pub portforward: portforward::Settings,
    /// Where the mender-client trigger looks for the client, and how long it waits.
    pub menderclient: menderclient::Settings,
    /// The shell health-check ping period.
    pub shell_ping: Duration,
    /// Resolve every path component by hand even where `openat2` works.
    pub force_path_walk: bool,
}

impl Tunables {
    /// Reads the process environment.
    pub fn from_env() -> Tunables {
        Tunables::from_lookup(&|name| std::env::var(name).ok())
    }

    /// Reads the knobs through `get`.
    pub fn from_lookup(get: &Lookup) -> Tunables {
        Tunables {
            timing: Timing::from_lookup(get),
            proxies: proxy::Settings::from_lookup(get),
            portforward: portforward::Settings::from_lookup(get),
            menderclient: menderclient::Settings::from_lookup(get),
            shell_ping: get(shell::PING_ENV)
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|&ms| ms > 0)
                .map_or(shell::PING_INTERVAL, Duration::from_millis),
            force_path_walk: get(crate::limits::policy::FORCE_WALK_ENV).is_some(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(vars: &[(&str, &str)]) -> Tunables {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Tunables::from_lookup(&move |n| vars.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone()))
    }

    #[test]
    fn no_knobs_means_the_reference_defaults() {
        let t = with(&[]);
        assert_eq!(t.timing, Timing::default());
        assert_eq!(t.shell_ping, shell::PING_INTERVAL);
        assert_eq!(t.portforward.ack_timeout, Duration::from_secs(60));
        assert!(!t.force_path_walk);
    }

    #[test]
    fn knobs_apply_and_bad_values_are_ignored() {
        let t = with(&[
            ("MENDER_CONNECT_PONG_WAIT_MS", "1000"),
            ("MENDER_CONNECT_SESSION_IDLE_MS", "zero"),
            ("MENDER_CONNECT_SHELL_PING_MS", "0"),
            ("MENDER_CONNECT_PF_ACK_MS", "250"),
            ("MENDER_CONNECT_FORCE_PATH_WALK", ""),
        ]);
        assert_eq!(t.timing.pong_wait, Duration::from_millis(1000));
        assert_eq!(t.timing.ping_period, Duration::from_millis(900));
        assert_eq!(t.timing.session_idle, Timing::default().session_idle);
        assert_eq!(t.shell_ping, shell::PING_INTERVAL);
        assert_eq!(t.portforward.ack_timeout, Duration::from_millis(250));
        assert!(t.force_path_walk);
    }
}
