//! How a lock waits: mode, bound and wait strategy.

use std::time::Duration;

use crate::{Error, LockKey, Result};

/// PostgreSQL's limit for `lock_timeout`: `INT_MAX` milliseconds (about 24.8 days).
pub(crate) const MAX_TIMEOUT_MS: u64 = i32::MAX as u64;

/// Whether a lock excludes everyone, or only exclusive holders.
///
/// Shared locks are the reader side of a reader-writer lock: any number of sessions hold
/// a key in `Shared` mode at once, and an `Exclusive` holder excludes them all.
/// Within one session, exclusive, shared and transaction locks on the same key never block
/// each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LockMode {
    /// `pg_advisory_lock`: one holder at a time. The default.
    #[default]
    Exclusive,
    /// `pg_advisory_lock_shared`: many shared holders, no exclusive one.
    Shared,
}

impl LockMode {
    /// The suffix of PostgreSQL's function names for this mode.
    pub(crate) fn fn_suffix(self) -> &'static str {
        match self {
            LockMode::Exclusive => "",
            LockMode::Shared => "_shared",
        }
    }

    /// The `mode` column of `pg_locks` for this mode.
    pub(crate) fn pg_locks_mode(self) -> &'static str {
        match self {
            LockMode::Exclusive => "ExclusiveLock",
            LockMode::Shared => "ShareLock",
        }
    }
}

/// How a blocking call waits for a busy lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum WaitMode {
    /// Wait on the server (`pg_advisory_lock`), bounded by `lock_timeout`. The server
    /// wakes the waiter the moment the lock is free, and detects deadlocks. The default.
    #[default]
    Server,
    /// Poll with non-blocking tries (`pg_try_advisory_lock`), sleeping between them with
    /// jittered exponential backoff from `min_interval` up to `max_interval`.
    ///
    /// Between tries the connection is idle, outside any transaction. Use this where a
    /// waiter blocked on the server would deadlock with the holder: a session waiting in
    /// `pg_advisory_lock` holds a virtual transaction, so a holder that runs
    /// `CREATE INDEX CONCURRENTLY` (or anything else that waits for older transactions
    /// to end) waits for the waiter while the waiter waits for it. Migration runners hit
    /// this. The cost is latency: a waiter notices the release only at its next try.
    Poll {
        /// The first sleep between tries. Must be at least 1 ms.
        min_interval: Duration,
        /// The longest sleep between tries. Must be at least `min_interval`.
        max_interval: Duration,
    },
}

impl WaitMode {
    /// Polling from 10 ms up to 1 s: a sensible [`WaitMode::Poll`] for migration runners.
    pub const fn poll() -> Self {
        WaitMode::Poll {
            min_interval: Duration::from_millis(10),
            max_interval: Duration::from_secs(1),
        }
    }
}

/// Options for a [`SessionLock`](crate::SessionLock) or a [`TxLock`](crate::TxLock).
///
/// The defaults: an exclusive lock, blocking calls wait until the lock is free, and the
/// wait happens on the server.
///
/// Setters only record values; they are checked when a lock is made with them, which
/// returns [`Error::InvalidArgument`] for a value PostgreSQL cannot take.
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
/// use pglock::{LockMode, LockOptions, SessionLock, WaitMode};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let pool: r2d2::Pool<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>> = todo!();
/// let options = LockOptions::new()
///     .mode(LockMode::Shared)
///     .lock_timeout(Duration::from_secs(30))
///     .wait_mode(WaitMode::poll());
/// let mut lock = SessionLock::with_options(&pool, "schema", options)?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LockOptions {
    pub(crate) mode: LockMode,
    pub(crate) lock_timeout: Option<Duration>,
    pub(crate) wait_mode: WaitMode,
}

impl LockOptions {
    /// The default options.
    pub fn new() -> Self {
        LockOptions::default()
    }

    /// Exclusive or shared. Defaults to [`LockMode::Exclusive`].
    pub fn mode(mut self, mode: LockMode) -> Self {
        self.mode = mode;
        self
    }

    /// The longest a blocking [`lock`](crate::Locker::lock) call waits before it fails
    /// with [`Error::Timeout`]. Defaults to no bound: `lock` waits until the lock is free.
    ///
    /// The server enforces it through `lock_timeout`, which has millisecond resolution:
    /// a duration with a fraction of a millisecond is rounded up. Zero means "try once":
    /// `lock` fails at once if the lock is held elsewhere (it never means "forever", as
    /// `lock_timeout = 0` does in PostgreSQL). The largest value PostgreSQL accepts is
    /// `i32::MAX` milliseconds (about 24.8 days); a lock made with more fails with
    /// [`Error::InvalidArgument`].
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = Some(timeout);
        self
    }

    /// Removes the bound set by [`lock_timeout`](LockOptions::lock_timeout).
    pub fn no_lock_timeout(mut self) -> Self {
        self.lock_timeout = None;
        self
    }

    /// Where blocking calls wait. Defaults to [`WaitMode::Server`].
    pub fn wait_mode(mut self, wait_mode: WaitMode) -> Self {
        self.wait_mode = wait_mode;
        self
    }

    /// Checks every value against what PostgreSQL accepts.
    pub(crate) fn validate(&self, key: &LockKey) -> Result<()> {
        if let Some(name) = key.name() {
            if name.contains('\0') || key.namespace().is_some_and(|ns| ns.contains('\0')) {
                return Err(invalid(
                    key,
                    "a lock name cannot contain a NUL character (PostgreSQL text cannot)",
                ));
            }
        }
        if let Some(timeout) = self.lock_timeout {
            timeout_ms(key, "lock_timeout", timeout)?;
        }
        if let WaitMode::Poll {
            min_interval,
            max_interval,
        } = self.wait_mode
        {
            if min_interval < Duration::from_millis(1) {
                return Err(invalid(
                    key,
                    format!("poll min_interval of {min_interval:?} is below 1ms"),
                ));
            }
            if max_interval < min_interval {
                return Err(invalid(
                    key,
                    format!(
                        "poll max_interval of {max_interval:?} is below min_interval of \
                         {min_interval:?}"
                    ),
                ));
            }
            timeout_ms(key, "poll max_interval", max_interval)?;
        }
        Ok(())
    }
}

/// A duration as whole milliseconds for `lock_timeout`, rounded up, or an error past
/// PostgreSQL's limit.
pub(crate) fn timeout_ms(key: &LockKey, what: &str, timeout: Duration) -> Result<u32> {
    let ms = timeout.as_nanos().div_ceil(1_000_000);
    if ms > u128::from(MAX_TIMEOUT_MS) {
        return Err(invalid(
            key,
            format!(
                "{what} of {timeout:?} exceeds PostgreSQL's limit of {MAX_TIMEOUT_MS} ms \
                 (about 24.8 days)"
            ),
        ));
    }
    Ok(ms as u32)
}

fn invalid(key: &LockKey, message: impl Into<String>) -> Error {
    Error::InvalidArgument {
        key: key.clone(),
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> LockKey {
        LockKey::new(1)
    }

    #[test]
    fn defaults() {
        let o = LockOptions::new();
        assert_eq!(o.mode, LockMode::Exclusive);
        assert_eq!(o.lock_timeout, None);
        assert_eq!(o.wait_mode, WaitMode::Server);
        assert!(o.validate(&key()).is_ok());
    }

    #[test]
    fn timeouts_round_up_to_whole_milliseconds() {
        assert_eq!(timeout_ms(&key(), "t", Duration::ZERO).unwrap(), 0);
        assert_eq!(timeout_ms(&key(), "t", Duration::from_nanos(1)).unwrap(), 1);
        assert_eq!(
            timeout_ms(&key(), "t", Duration::from_micros(1500)).unwrap(),
            2
        );
        assert_eq!(
            timeout_ms(&key(), "t", Duration::from_millis(MAX_TIMEOUT_MS)).unwrap(),
            i32::MAX as u32
        );
    }

    #[test]
    fn timeouts_past_postgres_limit_are_invalid() {
        for d in [
            Duration::from_millis(MAX_TIMEOUT_MS + 1),
            Duration::from_millis(MAX_TIMEOUT_MS) + Duration::from_nanos(1),
            Duration::MAX,
        ] {
            let e = LockOptions::new()
                .lock_timeout(d)
                .validate(&key())
                .unwrap_err();
            assert!(
                matches!(&e, Error::InvalidArgument { message, .. } if message.contains("lock_timeout")),
                "{e}"
            );
        }
    }

    #[test]
    fn bad_poll_intervals_are_invalid() {
        let bad = [
            (Duration::ZERO, Duration::from_secs(1)),
            (Duration::from_micros(999), Duration::from_secs(1)),
            (Duration::from_secs(2), Duration::from_secs(1)),
            (Duration::from_secs(1), Duration::MAX),
        ];
        for (min_interval, max_interval) in bad {
            let o = LockOptions::new().wait_mode(WaitMode::Poll {
                min_interval,
                max_interval,
            });
            assert!(
                matches!(o.validate(&key()), Err(Error::InvalidArgument { .. })),
                "{min_interval:?}..{max_interval:?}"
            );
        }
        assert!(LockOptions::new()
            .wait_mode(WaitMode::poll())
            .validate(&key())
            .is_ok());
    }

    #[test]
    fn names_with_nul_are_invalid() {
        let e = LockOptions::new()
            .validate(&LockKey::from_name("a\0b"))
            .unwrap_err();
        assert!(e.to_string().contains("NUL"), "{e}");
    }
}
