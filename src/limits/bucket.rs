//! Token bucket shared by every file transfer of one direction (transfer.md
//! §3.6): sized so that no 60-second window lets more than the configured
//! bytes-per-minute through, and driven by an injectable clock.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Longest a throttled transfer may keep the server without news (an ack
/// for uploads, a chunk for downloads), summed over the waits since the last
/// one; beyond it the transfer ends with the limit error. Well below the 48 s
/// idle ping and deviceconnect's 60 s file-transfer timeout.
pub const MAX_WAIT: Duration = Duration::from_secs(20);

/// The smallest bucket capacity: one full transfer chunk, so a chunk never
/// has to wait for more tokens than the bucket can hold.
const MIN_CAPACITY: f64 = 4096.0;

/// A monotonic time source.
pub trait Clock: Send + Sync {
    /// Time elapsed since an arbitrary fixed origin; never decreases.
    fn now(&self) -> Duration;
}

/// The real monotonic clock.
#[derive(Debug)]
pub struct SystemClock {
    origin: Instant,
}

impl SystemClock {
    /// A clock whose origin is now.
    pub fn new() -> SystemClock {
        SystemClock {
            origin: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

/// Why the bucket refused bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LimitError {
    /// No tokens left at the start of a transfer.
    Exhausted,
    /// Mid-transfer, the needed pause exceeds the allowed maximum.
    WaitTooLong(Duration),
}

impl fmt::Display for LimitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Both are the upstream text: the user sees the same refusal.
        f.write_str("transmitted bytes limit exhausted")
    }
}

impl std::error::Error for LimitError {}

struct State {
    /// May go negative: reservations made ahead of time are debt that later
    /// refill pays back before the next reservation is granted.
    tokens: f64,
    last: Duration,
}

/// One direction's byte budget.
pub struct Bucket {
    rate: f64,
    capacity: f64,
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
}

impl fmt::Debug for Bucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bucket")
            .field("rate", &self.rate)
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl Bucket {
    /// A bucket for `limit` bytes per minute on the real clock; `None` when
    /// the limit is 0 (unlimited).
    pub fn per_minute(limit: u64) -> Option<Bucket> {
        Bucket::per_minute_with_clock(limit, Arc::new(SystemClock::new()))
    }

    /// Like [`per_minute`](Self::per_minute) with an injected clock.
    ///
    /// Bytes granted in any window of length T are at most C + r·T (each
    /// grant waits until the debt is repaid), so C + 60·r = L keeps every
    /// minute within L. C is at least one chunk when L allows it; a limit
    /// that small cannot pass 4 KiB chunks within `MAX_WAIT` anyway.
    pub fn per_minute_with_clock(limit: u64, clock: Arc<dyn Clock>) -> Option<Bucket> {
        if limit == 0 {
            return None;
        }
        let l = limit as f64;
        let mut capacity = (l / 12.0).max(MIN_CAPACITY);
        if capacity >= l {
            capacity = l / 2.0;
        }
        let rate = (l - capacity) / 60.0;
        let last = clock.now();
        Some(Bucket {
            rate,
            capacity,
            clock,
            state: Mutex::new(State {
                tokens: capacity,
                last,
            }),
        })
    }

    /// Refill rate in bytes per second.
    #[cfg(test)]
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Burst capacity in bytes.
    #[cfg(test)]
    pub fn capacity(&self) -> f64 {
        self.capacity
    }

    fn refilled(&self) -> MutexGuard<'_, State> {
        // Only arithmetic happens under the lock, so a poisoned state is still consistent.
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.clock.now();
        let dt = now.saturating_sub(s.last).as_secs_f64();
        s.tokens = (s.tokens + self.rate * dt).min(self.capacity);
        s.last = now;
        s
    }

    /// A transfer may start only while tokens are left.
    pub fn check_start(&self) -> Result<(), LimitError> {
        if self.refilled().tokens > 0.0 {
            Ok(())
        } else {
            Err(LimitError::Exhausted)
        }
    }

    /// Reserves `n` bytes and returns how long the caller must pause before
    /// sending (or acknowledging) them. A pause longer than `max_wait` is
    /// refused and reserves nothing.
    pub fn reserve(&self, n: u64, max_wait: Duration) -> Result<Duration, LimitError> {
        let mut s = self.refilled();
        let after = s.tokens - n as f64;
        let wait = if after >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-after / self.rate)
        };
        if wait > max_wait {
            return Err(LimitError::WaitTooLong(wait));
        }
        s.tokens = after;
        Ok(wait)
    }

    /// Spends a full minute's budget (the configured limit) as debt: called
    /// when the limit ends a transfer, so new transfers are refused at
    /// start until it is repaid, as the Go daemon's moving average refuses
    /// them for a while after an overrun (Mender's rate test expects the
    /// refusal text a minute later, and a small upload two minutes later
    /// to pass).
    pub fn exhaust(&self) {
        let mut s = self.refilled();
        let limit = self.capacity + 60.0 * self.rate;
        s.tokens = s.tokens.min(-limit);
    }

    /// Tokens currently available (negative = debt).
    #[cfg(test)]
    pub fn available(&self) -> f64 {
        self.refilled().tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A clock the test moves by hand.
    #[derive(Default)]
    struct FakeClock(AtomicU64);

    impl FakeClock {
        fn advance(&self, d: Duration) {
            self.0.fetch_add(d.as_nanos() as u64, Ordering::SeqCst);
        }
        fn set(&self, d: Duration) {
            self.0.store(d.as_nanos() as u64, Ordering::SeqCst);
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> Duration {
            Duration::from_nanos(self.0.load(Ordering::SeqCst))
        }
    }

    fn bucket(limit: u64) -> (Arc<FakeClock>, Bucket) {
        let clock = Arc::new(FakeClock::default());
        let b = Bucket::per_minute_with_clock(limit, clock.clone()).expect("limited");
        (clock, b)
    }

    /// Greedy senders: each grant happens at reservation time + wait; then the
    /// sender reserves again. Returns (grant time, bytes) pairs.
    fn simulate(
        limit: u64,
        chunks: &[u64],
        senders: usize,
        total: Duration,
    ) -> Vec<(Duration, u64)> {
        let (clock, b) = bucket(limit);
        let mut next = vec![Duration::ZERO; senders];
        let mut grants = Vec::new();
        let mut i = 0usize;
        loop {
            // the sender that is ready first goes next (time never runs backwards)
            let (s, &at) = next
                .iter()
                .enumerate()
                .min_by_key(|(_, t)| **t)
                .expect("senders");
            if at > total {
                break;
            }
            clock.set(at);
            let n = chunks[i % chunks.len()];
            i += 1;
            let wait = b.reserve(n, MAX_WAIT).expect("wait within bounds");
            grants.push((at + wait, n));
            next[s] = at + wait;
        }
        grants.sort();
        grants
    }

    fn max_window(grants: &[(Duration, u64)], window: Duration) -> u64 {
        let mut best = 0;
        let mut sum = 0;
        let mut lo = 0;
        for hi in 0..grants.len() {
            sum += grants[hi].1;
            while grants[hi].0 - grants[lo].0 > window {
                sum -= grants[lo].1;
                lo += 1;
            }
            best = best.max(sum);
        }
        best
    }

    #[test]
    fn zero_means_unlimited() {
        assert!(Bucket::per_minute(0).is_none());
    }

    #[test]
    fn sizing_keeps_a_minute_within_the_limit() {
        for limit in [5_000u64, 60_000, 1 << 20, 100 << 20] {
            let (_, b) = bucket(limit);
            let minute = b.capacity() + 60.0 * b.rate();
            assert!(minute <= limit as f64 + 1e-6, "limit {limit}: {minute}");
            assert!(b.rate() > 0.0);
        }
    }

    #[test]
    fn no_sixty_second_window_exceeds_the_limit() {
        for (limit, senders) in [
            (1u64 << 20, 1usize),
            (1 << 20, 3),
            (300_000, 2),
            (10 << 20, 4),
        ] {
            let grants = simulate(
                limit,
                &[4096, 4096, 1000, 4096, 17],
                senders,
                Duration::from_secs(600),
            );
            let worst = max_window(&grants, Duration::from_secs(60));
            assert!(
                worst <= limit,
                "limit {limit} x{senders}: {worst} in a minute"
            );
            // and the bucket is not needlessly stingy: ≥ 90 % of L per minute long-run
            let total: u64 = grants.iter().map(|g| g.1).sum();
            let per_min = total as f64 / 10.0;
            assert!(
                per_min >= 0.9 * limit as f64,
                "limit {limit}: only {per_min}/min"
            );
        }
    }

    #[test]
    fn refuses_at_start_when_empty_and_recovers() {
        let (clock, b) = bucket(60_000);
        assert!(b.check_start().is_ok());
        let cap = b.capacity() as u64;
        assert_eq!(b.reserve(cap, MAX_WAIT), Ok(Duration::ZERO));
        assert_eq!(b.check_start(), Err(LimitError::Exhausted));
        assert_eq!(
            LimitError::Exhausted.to_string(),
            "transmitted bytes limit exhausted"
        );
        clock.advance(Duration::from_millis(100));
        assert!(b.check_start().is_ok());
    }

    #[test]
    fn throttles_mid_transfer_instead_of_refusing() {
        let (clock, b) = bucket(60_000); // C = 5000, r = 916.7 B/s
        assert_eq!(b.reserve(4096, MAX_WAIT), Ok(Duration::ZERO));
        let wait = b.reserve(4096, MAX_WAIT).expect("throttled, not refused");
        let expect = (4096.0 * 2.0 - b.capacity()) / b.rate();
        assert!(
            (wait.as_secs_f64() - expect).abs() < 1e-6,
            "{wait:?} vs {expect}"
        );
        // the next reservation queues behind the debt
        let wait2 = b.reserve(4096, MAX_WAIT).expect("throttled");
        assert!(wait2 > wait);
        clock.advance(wait2);
        assert!(b.available().abs() < 1e-3);
    }

    #[test]
    fn aborts_only_when_one_wait_exceeds_the_maximum() {
        let (_, b) = bucket(6_000); // C = 4096, r = 31.7 B/s
        assert_eq!(b.reserve(4096, MAX_WAIT), Ok(Duration::ZERO));
        let before = b.available();
        match b.reserve(4096, MAX_WAIT) {
            Err(LimitError::WaitTooLong(w)) => assert!(w > MAX_WAIT),
            other => panic!("expected an abort, got {other:?}"),
        }
        assert!(
            b.available() >= before,
            "a refused reservation consumes nothing"
        );
        let w = b.reserve(600, MAX_WAIT).expect("a shorter wait is fine");
        assert!(w > Duration::from_secs(18) && w <= MAX_WAIT, "{w:?}");
    }

    #[test]
    fn an_exhausted_bucket_refuses_new_transfers_until_a_minute_is_repaid() {
        // Mender's rate test: 16 KiB/min, a cut upload, a new one refused a
        // minute later, a small one allowed two minutes later
        let (clock, b) = bucket(16 * 1024);
        b.exhaust();
        clock.advance(Duration::from_secs(60));
        assert_eq!(b.check_start(), Err(LimitError::Exhausted));
        clock.advance(Duration::from_secs(19));
        assert_eq!(b.check_start(), Err(LimitError::Exhausted));
        clock.advance(Duration::from_secs(2));
        assert!(b.check_start().is_ok());
        assert_eq!(b.reserve(128, MAX_WAIT), Ok(Duration::ZERO));
    }

    #[test]
    fn refill_is_capped_at_capacity() {
        let (clock, b) = bucket(1 << 20);
        b.reserve(1000, MAX_WAIT).expect("ok");
        clock.advance(Duration::from_secs(3600));
        assert_eq!(b.available(), b.capacity());
    }
}
