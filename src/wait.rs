//! Wait strategies shared by every lock kind: how long a call may wait, and polling with
//! jittered backoff for when the server cannot do the waiting.

use std::time::{Duration, Instant};

use crate::cancel::CancelState;
use crate::options::timeout_ms;
use crate::{LockKey, Result};

/// How long an acquisition may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// One non-blocking try.
    Try,
    /// Wait at most this long (never zero: zero is `Try`).
    For(Duration),
    /// Wait until the lock is free.
    Forever,
}

impl Limit {
    /// The limit of a blocking call bounded by `timeout` (`None`: no bound).
    pub(crate) fn bounded_by(timeout: Option<Duration>) -> Limit {
        match timeout {
            None => Limit::Forever,
            Some(d) if d.is_zero() => Limit::Try,
            Some(d) => Limit::For(d),
        }
    }

    /// What is left of this limit after `elapsed`: `None` when a bounded wait has spent
    /// its bound (a try is always left one try).
    pub(crate) fn left_after(self, elapsed: Duration) -> Option<Limit> {
        match self {
            Limit::For(bound) if elapsed >= bound => None,
            Limit::For(bound) => Some(Limit::For(bound - elapsed)),
            other => Some(other),
        }
    }

    /// The limit of `try_lock_for(timeout)`, checked against PostgreSQL's range.
    pub(crate) fn checked(key: &LockKey, timeout: Duration) -> Result<Limit> {
        timeout_ms(key, "timeout", timeout)?;
        Ok(Limit::bounded_by(Some(timeout)))
    }
}

/// The result of an acquisition that did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Locked.
    Locked,
    /// Still held elsewhere when the limit passed, after waiting this long.
    Busy { waited: Duration },
}

/// Polls `try_once` with jittered exponential backoff until it locks, the limit passes, or
/// the lock is cancelled (which wakes the sleep at once).
pub(crate) fn poll(
    limit: Limit,
    min_interval: Duration,
    max_interval: Duration,
    cancel: Option<&CancelState>,
    mut try_once: impl FnMut() -> Result<bool>,
) -> Result<Outcome> {
    let start = Instant::now();
    let mut backoff = Backoff::new(min_interval, max_interval);
    loop {
        if try_once()? {
            return Ok(Outcome::Locked);
        }
        let waited = start.elapsed();
        let mut sleep = backoff.next_sleep();
        match limit {
            Limit::Try => return Ok(Outcome::Busy { waited }),
            Limit::For(bound) if waited >= bound => return Ok(Outcome::Busy { waited }),
            Limit::For(bound) => sleep = sleep.min(bound - waited),
            Limit::Forever => {}
        }
        match cancel {
            Some(cancel) => cancel.sleep(sleep)?,
            None => std::thread::sleep(sleep),
        }
    }
}

/// Exponential backoff with jitter: each sleep is drawn from [d/2, d], and d doubles
/// from `min` up to `max`.
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
    rng: u64,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            next: min,
            max,
            rng: seed() | 1,
        }
    }

    pub(crate) fn next_sleep(&mut self) -> Duration {
        let unit = (next_random(&mut self.rng) >> 11) as f64 / (1u64 << 53) as f64;
        let sleep = self.next.mul_f64(0.5 + 0.5 * unit);
        self.next = self.next.saturating_mul(2).min(self.max);
        sleep
    }
}

/// A seed from the clock, the process and a counter: enough to spread waiters and tokens
/// apart; nothing here needs to be unpredictable.
pub(crate) fn seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut x = nanos
        ^ u64::from(std::process::id()).rotate_left(32)
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    next_random(&mut x)
}

/// xorshift64*.
pub(crate) fn next_random(state: &mut u64) -> u64 {
    if *state == 0 {
        *state = 0x2545_f491_4f6c_dd1d;
    }
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_gets_what_is_left_of_the_bound() {
        let s = Duration::from_secs;
        assert_eq!(Limit::For(s(10)).left_after(s(4)), Some(Limit::For(s(6))));
        assert_eq!(Limit::For(s(10)).left_after(s(10)), None);
        assert_eq!(Limit::Try.left_after(s(99)), Some(Limit::Try));
        assert_eq!(Limit::Forever.left_after(s(99)), Some(Limit::Forever));
    }

    #[test]
    fn backoff_doubles_within_jitter_and_caps() {
        let (min, max) = (Duration::from_millis(10), Duration::from_millis(80));
        let mut b = Backoff::new(min, max);
        let mut ceiling = min;
        for _ in 0..20 {
            let s = b.next_sleep();
            assert!(
                s >= ceiling / 2 && s <= ceiling,
                "{s:?} outside [{:?}, {ceiling:?}]",
                ceiling / 2
            );
            ceiling = (ceiling * 2).min(max);
        }
    }

    #[test]
    fn limits() {
        assert_eq!(Limit::bounded_by(None), Limit::Forever);
        assert_eq!(Limit::bounded_by(Some(Duration::ZERO)), Limit::Try);
        let key = LockKey::new(1);
        assert_eq!(
            Limit::checked(&key, Duration::from_secs(1)).unwrap(),
            Limit::For(Duration::from_secs(1))
        );
        assert!(Limit::checked(&key, Duration::MAX).is_err());
    }

    #[test]
    fn seeds_differ() {
        assert_ne!(seed(), seed());
    }

    #[test]
    fn poll_stops_at_its_bound() {
        let start = Instant::now();
        let mut tries = 0;
        let outcome = poll(
            Limit::For(Duration::from_millis(30)),
            Duration::from_millis(1),
            Duration::from_millis(5),
            None,
            || {
                tries += 1;
                Ok(false)
            },
        )
        .unwrap();
        assert!(matches!(outcome, Outcome::Busy { .. }));
        assert!(start.elapsed() >= Duration::from_millis(30));
        assert!(tries >= 2, "{tries}");
        let outcome = poll(
            Limit::Try,
            Duration::from_millis(1),
            Duration::from_millis(1),
            None,
            || Ok(true),
        )
        .unwrap();
        assert_eq!(outcome, Outcome::Locked);
    }
}
