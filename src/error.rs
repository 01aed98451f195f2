//! The one error type of the crate.

use std::time::Duration;

use postgres::error::{DbError, SqlState};

use crate::LockKey;

/// A `Result` whose error is [`pglock::Error`](Error).
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong with a lock. Every variant names the lock's key.
///
/// Contention is not an error: [`try_lock`](crate::Locker::try_lock) and
/// [`try_lock_for`](crate::Locker::try_lock_for) return `Ok(None)` when the lock is held
/// elsewhere. Whatever error a lock operation returns, the lock's connection holds nothing
/// it did not hold before the call (see the crate docs on pool hygiene).
///
/// Errors that come from the server keep the [`postgres::Error`] as their
/// [`source`](std::error::Error::source); [`code`](Error::code) and
/// [`as_db_error`](Error::as_db_error) reach its SQLSTATE and message.
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
/// use pglock::{Error, Locker, SessionLock, LockOptions};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let pool: r2d2::Pool<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>> = todo!();
/// let options = LockOptions::new().lock_timeout(Duration::from_secs(5));
/// let mut lock = SessionLock::with_options(&pool, "nightly-report", options)?;
/// match lock.lock() {
///     Ok(_guard) => println!("running the report"),
///     Err(Error::Timeout { key, waited }) => println!("{key} is busy; gave up after {waited:?}"),
///     Err(e) => return Err(e.into()),
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No connection could be checked out of the pool (the pool's
    /// `connection_timeout` passed, or the server refused new connections).
    #[error("lock {key}: could not check out a connection from the pool")]
    Pool {
        /// The lock's key.
        key: LockKey,
        /// r2d2's error.
        #[source]
        source: r2d2::Error,
    },

    /// The lock stayed held elsewhere for the whole bounded wait.
    #[error("lock {key}: still held elsewhere after waiting {waited:?}")]
    Timeout {
        /// The lock's key.
        key: LockKey,
        /// How long the call waited.
        waited: Duration,
    },

    /// The wait was cancelled through a [`CancelHandle`](crate::CancelHandle).
    #[error("lock {key}: the wait was cancelled")]
    Cancelled {
        /// The lock's key.
        key: LockKey,
    },

    /// The server found a deadlock involving this wait (SQLSTATE `40P01`) and aborted it.
    #[error("lock {key}: deadlock detected while waiting")]
    Deadlock {
        /// The lock's key.
        key: LockKey,
        /// The server's error.
        #[source]
        source: postgres::Error,
    },

    /// The lock is no longer held: its session ended, the server reported at unlock that
    /// this session did not hold it, or (for a [`TxLock`](crate::TxLock)) its transaction
    /// was ended inside the critical section.
    #[error("lock {key}: the lock was lost ({reason})")]
    LockLost {
        /// The lock's key.
        key: LockKey,
        /// Why the lock is known to be gone.
        reason: LostReason,
        /// The error that revealed it, when there was one.
        #[source]
        source: Option<postgres::Error>,
    },

    /// The server's shared lock table is full (SQLSTATE `53200`, "out of shared memory").
    ///
    /// Advisory locks share the table with ordinary locks; its size is about
    /// `max_locks_per_transaction × (max_connections + max_prepared_transactions)`.
    #[error("lock {key}: the server's lock table is full (raise max_locks_per_transaction)")]
    LockTableFull {
        /// The lock's key.
        key: LockKey,
        /// The server's error.
        #[source]
        source: postgres::Error,
    },

    /// A lock found its server session in use by another client: a transaction-mode
    /// pooler (PgBouncer's `pool_mode = transaction`) sits between pglock and PostgreSQL,
    /// where session locks cannot work. A [`SessionLock`](crate::SessionLock) found another
    /// client's session lock marker there; a [`TxLock`](crate::TxLock) found that session
    /// holding its key for another client's session lock (a grant there would be a second
    /// holder). Nothing was taken (or, at unlock, touched) on that session. Use
    /// [`TxLock`](crate::TxLock) or a lease through such a pooler, never `SessionLock`.
    #[error(
        "lock {key}: the server session is in use by another client (its session lock \
         marker is {other:?}): a transaction-mode pooler is in between, where session \
         locks cannot work; use TxLock or a lease through it, or connect directly"
    )]
    SessionShared {
        /// The lock.
        key: LockKey,
        /// The other client's marker on the server session (`pglock:<pid>:<id>@<key>`).
        other: String,
    },

    /// A session lock's critical section left a healthy transaction open: pglock rolled
    /// it back (a connection never goes back to the pool inside a transaction) and
    /// released the lock, but the transaction's work is lost. Commit or roll back
    /// transactions you begin in the critical section.
    ///
    /// Also returned by a lock call, for a connection that came inside a transaction
    /// (healthy or failed) left open by whoever had it before: pglock rolled it back and
    /// took nothing. (A session lock taken there would be marked inside that transaction,
    /// and its rollback would leave the lock held and unmarked; a transaction lock would
    /// join it and commit its work with the lock's.) The next call locks.
    #[error(
        "lock {key}: a transaction was left open on the lock's connection (by the critical \
         section, or by whoever had the connection before the lock); it was rolled back and \
         any work in it is lost"
    )]
    TransactionLeftOpen {
        /// The lock.
        key: LockKey,
    },

    /// The connection broke while a transaction lock's `COMMIT` was on its way: the
    /// transaction may or may not have committed, and the lock is gone either way. Check
    /// the work's effect before retrying it.
    #[error("lock {key}: the connection broke during COMMIT; whether it committed is unknown")]
    CommitOutcomeUnknown {
        /// The lock.
        key: LockKey,
        /// The connection's error.
        #[source]
        source: postgres::Error,
    },

    /// The server is a read-only hot standby (in recovery): an advisory lock taken there
    /// excludes nobody on the primary, and a lease cannot be written. Nothing is held.
    /// Connect to the primary; with several hosts in the connection settings, set
    /// `target_session_attrs=read-write`.
    #[error(
        "lock {key}: the server is a read-only standby, where a lock excludes nobody on \
         the primary; connect to the primary (target_session_attrs=read-write)"
    )]
    ReadOnlyStandby {
        /// The lock.
        key: LockKey,
    },

    /// An argument was out of range or malformed; nothing was sent to the server.
    #[error("lock {key}: invalid argument: {message}")]
    InvalidArgument {
        /// The lock's key.
        key: LockKey,
        /// What was wrong.
        message: String,
    },

    /// Any other error from the server or the connection, during the named operation.
    #[error("lock {key}: {operation} failed{}", code_suffix(source))]
    Database {
        /// The lock's key.
        key: LockKey,
        /// What pglock was doing: `"lock"`, `"unlock"`, `"commit"`, ...
        operation: &'static str,
        /// The error.
        #[source]
        source: postgres::Error,
    },
}

/// Why a lock is known to be lost. See [`Error::LockLost`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LostReason {
    /// The connection closed: the session was terminated (by an administrator,
    /// `idle_session_timeout`, a failover, a network failure...) and the server freed its
    /// locks, or will once it notices.
    SessionEnded,
    /// The unlock function returned `false`: this session no longer held the lock, because
    /// something ran `pg_advisory_unlock_all()` or `DISCARD ALL` on the connection, or a
    /// transaction-mode pooler sent the unlock to another server session.
    NotHeld,
    /// The transaction of a [`TxLock`](crate::TxLock) was committed or rolled back inside the
    /// critical section (for example by SQL that contains `COMMIT`), which ended the lock
    /// early. pglock recognises the lock's transaction by a transaction-local setting, so
    /// a critical section that runs `RESET ALL` is reported this way too (and rolled back).
    TransactionEnded,
    /// A lease ran out: its heartbeats did not renew it before the holder's own deadline
    /// (the holder stopped trusting it), or the server found it expired or taken over by
    /// another holder when renewing, fencing or releasing it.
    LeaseExpired,
}

impl std::fmt::Display for LostReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LostReason::SessionEnded => "its database session ended",
            LostReason::NotHeld => "the server reported this session did not hold it",
            LostReason::TransactionEnded => {
                "its transaction was ended inside the critical section (or its marker was \
                 cleared by RESET ALL)"
            }
            LostReason::LeaseExpired => "the lease expired or was taken over",
        })
    }
}

/// Whether the connection failed because the network went silent: TCP gave up on it
/// (`tcp_user_timeout` or keepalives, see [`NetworkTimeout`](crate::NetworkTimeout)).
pub(crate) fn timed_out(e: &postgres::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::TimedOut;
        }
        source = s.source();
    }
    false
}

fn code_suffix(e: &postgres::Error) -> String {
    match e.code() {
        Some(code) => format!(" (SQLSTATE {})", code.code()),
        None if e.is_closed() => " (connection closed)".to_owned(),
        None if timed_out(e) => " (the connection timed out: the network was silent)".to_owned(),
        None => String::new(),
    }
}

impl Error {
    /// The lock's key.
    pub fn key(&self) -> &LockKey {
        match self {
            Error::Pool { key, .. }
            | Error::Timeout { key, .. }
            | Error::Cancelled { key }
            | Error::Deadlock { key, .. }
            | Error::LockLost { key, .. }
            | Error::LockTableFull { key, .. }
            | Error::InvalidArgument { key, .. }
            | Error::SessionShared { key, .. }
            | Error::TransactionLeftOpen { key }
            | Error::ReadOnlyStandby { key }
            | Error::CommitOutcomeUnknown { key, .. }
            | Error::Database { key, .. } => key,
        }
    }

    /// The underlying [`postgres::Error`], if this error came from the server or the
    /// connection.
    pub fn as_postgres(&self) -> Option<&postgres::Error> {
        match self {
            Error::Deadlock { source, .. }
            | Error::LockTableFull { source, .. }
            | Error::Database { source, .. }
            | Error::CommitOutcomeUnknown { source, .. } => Some(source),
            Error::LockLost { source, .. } => source.as_ref(),
            _ => None,
        }
    }

    /// The SQLSTATE of the server's error, if there was one.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use pglock::postgres::error::SqlState;
    /// # fn check(err: pglock::Error) {
    /// if err.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED) {
    ///     // retry the whole unit of work
    /// }
    /// # }
    /// ```
    pub fn code(&self) -> Option<&SqlState> {
        self.as_postgres().and_then(postgres::Error::code)
    }

    /// The server's error with its message, detail and hint, if there was one.
    pub fn as_db_error(&self) -> Option<&DbError> {
        self.as_postgres().and_then(postgres::Error::as_db_error)
    }
}

/// What a failed statement means for a lock, by SQLSTATE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// `55P03`: `lock_timeout` fired.
    LockTimeout,
    /// `57014`: a cancel request or `statement_timeout`.
    Canceled,
    /// `40P01`.
    Deadlock,
    /// `53200`.
    OutOfSharedMemory,
    /// `25P02`: the connection is inside an aborted transaction.
    InFailedTransaction,
    /// The connection is closed.
    Closed,
    /// Anything else.
    Other,
}

impl Failure {
    pub(crate) fn of(e: &postgres::Error) -> Failure {
        if e.is_closed() {
            return Failure::Closed;
        }
        match e.code() {
            Some(code) => Failure::of_code(code),
            None => Failure::Other,
        }
    }

    fn of_code(code: &SqlState) -> Failure {
        if *code == SqlState::LOCK_NOT_AVAILABLE {
            Failure::LockTimeout
        } else if *code == SqlState::QUERY_CANCELED {
            Failure::Canceled
        } else if *code == SqlState::T_R_DEADLOCK_DETECTED {
            Failure::Deadlock
        } else if *code == SqlState::OUT_OF_MEMORY {
            // 53200 is named OUT_OF_MEMORY in the postgres crate; the server's text is
            // "out of shared memory".
            Failure::OutOfSharedMemory
        } else if *code == SqlState::IN_FAILED_SQL_TRANSACTION {
            Failure::InFailedTransaction
        } else if *code == SqlState::ADMIN_SHUTDOWN
            || *code == SqlState::CRASH_SHUTDOWN
            || *code == SqlState::IDLE_SESSION_TIMEOUT
            || *code == SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT
            || code.code() == "25P04"
        {
            Failure::Closed
        } else {
            Failure::Other
        }
    }
}

/// The message and SQLSTATE of an error, for logs: a bare `postgres::Error` prints only
/// "db error".
pub(crate) fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        ),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_map_to_failures() {
        let cases = [
            ("55P03", Failure::LockTimeout),
            ("57014", Failure::Canceled),
            ("40P01", Failure::Deadlock),
            ("53200", Failure::OutOfSharedMemory),
            ("25P02", Failure::InFailedTransaction),
            ("57P01", Failure::Closed),
            ("57P02", Failure::Closed),
            ("57P05", Failure::Closed),
            ("25P03", Failure::Closed),
            ("25P04", Failure::Closed),
            ("42501", Failure::Other),
        ];
        for (code, want) in cases {
            assert_eq!(Failure::of_code(&SqlState::from_code(code)), want, "{code}");
        }
    }

    #[test]
    fn messages_name_the_key() {
        let key = LockKey::new(7);
        let e = Error::Timeout {
            key: key.clone(),
            waited: Duration::from_millis(250),
        };
        assert_eq!(
            e.to_string(),
            "lock 7 (pg_locks classid=0 objid=7 objsubid=1): still held elsewhere after \
             waiting 250ms"
        );
        let e = Error::Cancelled { key };
        assert!(e.to_string().starts_with("lock 7 "), "{e}");
    }

    #[test]
    fn error_is_send_sync_static() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<Error>();
    }
}
