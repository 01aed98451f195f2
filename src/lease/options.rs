//! How a lease behaves: its length, heartbeat, holder deadline, owner, payload and waits.

use std::time::Duration;

use crate::lease::LeaseTable;
use crate::{Error, LockKey, Result};

/// The longest lease name, owner and (for [`LeaseOptions::notify`]) notification payload
/// pglock accepts, in bytes. Names are a primary key, and an index entry must fit a page.
pub(crate) const MAX_TEXT_BYTES: usize = 1024;

/// The options of a [`LeaseLock`](crate::LeaseLock) or
/// [`LeaseSemaphore`](crate::LeaseSemaphore).
///
/// A lease is taken for [`lease`](LeaseOptions::lease) (default 30 s) and renewed every
/// [`heartbeat`](LeaseOptions::heartbeat) (default a third of the lease) by a background
/// thread. The holder trusts it until its own deadline: the lease length minus the
/// [`safety_margin`](LeaseOptions::safety_margin) (default a tenth of the lease), counted
/// on the holder's monotonic clock from the moment before the last successful lock or
/// heartbeat statement was sent. The server's `expires_at` is always later than that
/// deadline, so a holder stops trusting a lease before anybody else can take it.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use pglock::LeaseOptions;
///
/// let options = LeaseOptions::new()
///     .lease(Duration::from_secs(10))
///     .heartbeat(Duration::from_secs(2))
///     .lock_timeout(Duration::from_secs(60))
///     .owner("backup-job on db-host-3")
///     .notify(true);
/// # let _ = options;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseOptions {
    pub(crate) table: LeaseTable,
    pub(crate) lease: Duration,
    pub(crate) heartbeat: Option<Duration>,
    pub(crate) safety_margin: Option<Duration>,
    pub(crate) lock_timeout: Option<Duration>,
    pub(crate) owner: Option<String>,
    pub(crate) data: Option<Vec<u8>>,
    pub(crate) notify: bool,
    pub(crate) poll_min: Duration,
    pub(crate) poll_max: Duration,
}

impl Default for LeaseOptions {
    fn default() -> Self {
        LeaseOptions {
            table: LeaseTable::default(),
            lease: Duration::from_secs(30),
            heartbeat: None,
            safety_margin: None,
            lock_timeout: None,
            owner: None,
            data: None,
            notify: false,
            poll_min: Duration::from_millis(10),
            poll_max: Duration::from_millis(250),
        }
    }
}

impl LeaseOptions {
    /// The default options.
    pub fn new() -> Self {
        LeaseOptions::default()
    }

    /// The table that holds the leases. Defaults to [`LeaseTable::default`]
    /// (`pglock_leases`).
    pub fn table(mut self, table: LeaseTable) -> Self {
        self.table = table;
        self
    }

    /// How long a lease lasts unless renewed. Defaults to 30 s.
    ///
    /// The length is stored in the lease's row, and every contender honours the holder's
    /// length, also when two programs are configured differently.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How often the background thread renews a held lease. Defaults to a third of the
    /// lease. It must leave room for a retry before the holder's deadline: at most half of
    /// the lease minus the safety margin.
    pub fn heartbeat(mut self, period: Duration) -> Self {
        self.heartbeat = Some(period);
        self
    }

    /// How long before the lease's length the holder stops trusting it, to cover the
    /// time it takes to stop acting and clock-rate differences. Defaults to a tenth of
    /// the lease.
    pub fn safety_margin(mut self, margin: Duration) -> Self {
        self.safety_margin = Some(margin);
        self
    }

    /// The longest a blocking [`lock`](crate::LeaseLock::lock) call waits before it fails
    /// with [`Error::Timeout`]. Defaults to no bound. Zero means "try once".
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = Some(timeout);
        self
    }

    /// Who holds the lease, as stored in its row and shown to contenders. Defaults to
    /// `host:pid`. At most 1024 bytes, no NUL character.
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = Some(owner.into());
        self
    }

    /// A payload stored in the lease's row when it is taken. Defaults to none: taking a
    /// lease keeps whatever payload its row has.
    pub fn data(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.data = Some(data.into());
        self
    }

    /// Wake waiters through `LISTEN`/`NOTIFY`: a release notifies in its own statement,
    /// and a waiting call listens on its connection, so it takes a released lease within
    /// milliseconds instead of at its next poll. Defaults to off.
    ///
    /// Turn it on in every program that shares the lease (a release only notifies when
    /// its own lock has it on; a waiter without it polls). Waiters always poll too, so a
    /// lost notification only costs time.
    ///
    /// **Direct connections only.** A waiter's `LISTEN` and `UNLISTEN` are separate
    /// statements: behind a transaction-mode pooler they can land on different server
    /// sessions, leaving a `LISTEN` behind on one that other clients then use. Leave it off
    /// through such a pooler (releasing with it on is harmless there; listening is not).
    pub fn notify(mut self, notify: bool) -> Self {
        self.notify = notify;
        self
    }

    /// The bounds of a waiting call's jittered, exponentially growing poll interval.
    /// Defaults to 10 ms and 250 ms. A waiter also wakes exactly when the holder's lease
    /// runs out, whatever the interval.
    pub fn poll_interval(mut self, min: Duration, max: Duration) -> Self {
        self.poll_min = min;
        self.poll_max = max;
        self
    }

    /// The heartbeat period.
    pub(crate) fn heartbeat_period(&self) -> Duration {
        self.heartbeat.unwrap_or(self.lease / 3)
    }

    /// The safety margin.
    pub(crate) fn margin(&self) -> Duration {
        self.safety_margin.unwrap_or(self.lease / 10)
    }

    /// The lease length in whole microseconds (rounded up).
    pub(crate) fn lease_us(&self) -> i64 {
        i64::try_from(self.lease.as_nanos().div_ceil(1000)).unwrap_or(i64::MAX)
    }

    /// Checks every value; `key` names the lease in the error.
    pub(crate) fn validate(&self, key: &LockKey) -> Result<()> {
        let invalid = |message: String| {
            Err(Error::InvalidArgument {
                key: key.clone(),
                message,
            })
        };
        let (lease, period, margin) = (self.lease, self.heartbeat_period(), self.margin());
        if lease < Duration::from_millis(1) {
            return invalid(format!("lease of {lease:?} is below 1ms"));
        }
        // An interval holds about 178 million years; keep far from it.
        if lease > Duration::from_secs(366 * 24 * 3600) {
            return invalid(format!("lease of {lease:?} is longer than a year"));
        }
        if period.is_zero() {
            return invalid("heartbeat period is zero".to_owned());
        }
        if margin >= lease {
            return invalid(format!(
                "safety margin of {margin:?} is not below the lease of {lease:?}"
            ));
        }
        if period > (lease - margin) / 2 {
            return invalid(format!(
                "heartbeat of {period:?} is not well below the lease of {lease:?}: it must be \
                 at most half of the lease minus the safety margin ({margin:?}), so that a \
                 failed heartbeat can be retried before the holder's deadline"
            ));
        }
        if self.poll_min < Duration::from_millis(1) || self.poll_max < self.poll_min {
            return invalid(format!(
                "poll interval of {:?}..{:?}: need 1ms <= min <= max",
                self.poll_min, self.poll_max
            ));
        }
        if let Some(timeout) = self.lock_timeout {
            crate::options::timeout_ms(key, "lock_timeout", timeout)?;
        }
        if let Some(owner) = &self.owner {
            check_text(key, "owner", owner)?;
        }
        Ok(())
    }
}

/// Checks a text that travels as a parameter: PostgreSQL text cannot hold NUL, and names
/// are a primary key.
pub(crate) fn check_text(key: &LockKey, what: &str, text: &str) -> Result<()> {
    let message = if text.is_empty() {
        format!("the lease {what} is empty")
    } else if text.contains('\0') {
        format!("the lease {what} contains a NUL character (PostgreSQL text cannot)")
    } else if text.len() > MAX_TEXT_BYTES {
        format!(
            "the lease {what} is {} bytes long; at most {MAX_TEXT_BYTES} are accepted",
            text.len()
        )
    } else {
        return Ok(());
    };
    Err(Error::InvalidArgument {
        key: key.clone(),
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> LockKey {
        LockKey::lease("\"t\"", "job")
    }

    fn rejected(options: LeaseOptions) -> String {
        match options.validate(&key()) {
            Err(Error::InvalidArgument { message, .. }) => message,
            other => panic!("accepted: {other:?}"),
        }
    }

    #[test]
    fn defaults_are_consistent() {
        let o = LeaseOptions::new();
        assert!(o.validate(&key()).is_ok());
        assert_eq!(o.heartbeat_period(), Duration::from_secs(10));
        assert_eq!(o.margin(), Duration::from_secs(3));
        assert_eq!(o.lease_us(), 30_000_000);
        assert_eq!(
            LeaseOptions::new()
                .lease(Duration::from_nanos(1_000_001))
                .lease_us(),
            1001
        );
    }

    #[test]
    fn bad_durations_are_invalid_arguments() {
        let s = Duration::from_secs;
        assert!(rejected(LeaseOptions::new().lease(Duration::ZERO)).contains("below 1ms"));
        assert!(rejected(LeaseOptions::new().heartbeat(Duration::ZERO)).contains("zero"));
        assert!(rejected(LeaseOptions::new().heartbeat(s(14))).contains("not well below"));
        assert!(LeaseOptions::new()
            .heartbeat(Duration::from_millis(13_500))
            .validate(&key())
            .is_ok());
        assert!(rejected(LeaseOptions::new().safety_margin(s(30))).contains("margin"));
        assert!(rejected(LeaseOptions::new().lease(s(400 * 24 * 3600))).contains("year"));
        assert!(rejected(
            LeaseOptions::new().poll_interval(Duration::from_millis(5), Duration::from_millis(1))
        )
        .contains("poll"));
        assert!(rejected(LeaseOptions::new().lock_timeout(s(30 * 24 * 3600))).contains("limit"));
    }

    #[test]
    fn hostile_text_is_refused() {
        for (owner, why) in [
            ("", "empty"),
            ("a\0b", "NUL"),
            (&"x".repeat(MAX_TEXT_BYTES + 1) as &str, "bytes long"),
        ] {
            assert!(rejected(LeaseOptions::new().owner(owner)).contains(why));
        }
        assert!(LeaseOptions::new()
            .owner("'; DROP TABLE x; --\"")
            .validate(&key())
            .is_ok());
    }
}
