//! Reconnect back-off: exponential from `ReconnectIntervalSeconds`, doubling to
//! a 60 s cap, with jitter, reset after a healthy connection (design.md).

use std::time::Duration;

/// Longest wait between two attempts.
pub const MAX_DELAY: Duration = Duration::from_secs(60);
/// A connection that lived this long resets the back-off.
pub const HEALTHY_AFTER: Duration = Duration::from_secs(60);

/// Back-off state across consecutive failed or short-lived connections.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    failures: u32,
    rng: XorShift,
}

impl Backoff {
    /// `base` is `ReconnectIntervalSeconds`; `seed` feeds the jitter.
    pub fn new(base: Duration, seed: u64) -> Backoff {
        Backoff {
            base: base.clamp(Duration::from_millis(1), MAX_DELAY),
            failures: 0,
            rng: XorShift::new(seed),
        }
    }

    /// Upper bound of the next wait (the jitter only shortens it).
    pub fn ceiling(&self) -> Duration {
        // The shift is bounded so the multiplication cannot overflow however
        // many times the server is unreachable.
        let factor = 1u32 << self.failures.min(16);
        self.base.saturating_mul(factor).min(MAX_DELAY)
    }

    /// The wait before the next attempt: uniformly in [ceiling/2, ceiling]
    /// ("equal jitter"), so a fleet does not reconnect in lockstep.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let half = ceiling / 2;
        let span = (ceiling - half).as_millis() as u64;
        half + Duration::from_millis(self.rng.next() % (span + 1))
    }

    /// Records how long the last connection lived; a healthy one resets.
    pub fn connection_lived(&mut self, lived: Duration) {
        if lived >= HEALTHY_AFTER {
            self.failures = 0;
        }
    }

    /// Starts over from `base` (after a token change).
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Tiny PRNG for jitter; not for anything secret.
#[derive(Debug)]
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        XorShift(seed | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// A seed from the clock and pid, enough to spread a fleet's retries.
pub fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ ((std::process::id() as u64) << 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_base_to_cap_with_jitter_inside_the_bound() {
        let mut b = Backoff::new(Duration::from_secs(5), 42);
        let ceilings = [5u64, 10, 20, 40, 60, 60, 60];
        for c in ceilings {
            assert_eq!(b.ceiling(), Duration::from_secs(c));
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(c), "{d:?} > {c}s");
            assert!(d >= Duration::from_secs(c) / 2, "{d:?} < {c}/2 s");
        }
    }

    #[test]
    fn never_overflows_and_stays_capped() {
        let mut b = Backoff::new(Duration::from_secs(5), 7);
        for _ in 0..10_000 {
            assert!(b.next_delay() <= MAX_DELAY);
        }
        assert_eq!(b.ceiling(), MAX_DELAY);
    }

    #[test]
    fn healthy_connection_resets_short_one_does_not() {
        let mut b = Backoff::new(Duration::from_secs(1), 1);
        b.next_delay();
        b.next_delay();
        b.connection_lived(Duration::from_secs(59));
        assert_eq!(b.ceiling(), Duration::from_secs(4));
        b.connection_lived(Duration::from_secs(60));
        assert_eq!(b.ceiling(), Duration::from_secs(1));
    }

    #[test]
    fn jitter_varies() {
        let mut b = Backoff::new(Duration::from_secs(60), 99);
        let a: Vec<_> = (0..5).map(|_| b.next_delay()).collect();
        assert!(a.windows(2).any(|w| w[0] != w[1]));
    }
}
