//! Protocol timers (protocol.md §1.6, §2.5), overridable from the environment
//! so integration tests can exercise timeouts in seconds instead of minutes.

use std::time::Duration;

use crate::knobs::{Lookup, positive_ms};

/// Websocket keepalive and router-session idle timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// No ping or pong from the server for this long means the link is dead (60 s).
    pub pong_wait: Duration,
    /// How often the device pings the server (9/10 of `pong_wait`: 54 s).
    pub ping_period: Duration,
    /// Router session idle timeout (60 s): ping at 4/5, error at 5/5.
    pub session_idle: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            pong_wait: Duration::from_secs(60),
            ping_period: Duration::from_secs(54),
            session_idle: Duration::from_secs(60),
        }
    }
}

impl Timing {
    /// Defaults, with `MENDER_CONNECT_PONG_WAIT_MS` and
    /// `MENDER_CONNECT_SESSION_IDLE_MS` applied when set to a positive number.
    pub fn from_lookup(get: &Lookup) -> Timing {
        let mut t = Timing::default();
        if let Some(ms) = positive_ms(get, "MENDER_CONNECT_PONG_WAIT_MS") {
            t.pong_wait = ms;
            t.ping_period = ms * 9 / 10;
        }
        if let Some(ms) = positive_ms(get, "MENDER_CONNECT_SESSION_IDLE_MS") {
            t.session_idle = ms;
        }
        t
    }

    /// The payload of the device's websocket pings: the pong wait in seconds.
    pub fn ping_payload(&self) -> Vec<u8> {
        self.pong_wait.as_secs().max(1).to_string().into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_reference() {
        let t = Timing::default();
        assert_eq!(t.pong_wait, Duration::from_secs(60));
        assert_eq!(t.ping_period, Duration::from_secs(54));
        assert_eq!(t.ping_payload(), b"60".to_vec());
    }
}
