//! Advisory locks: PostgreSQL's `pg_advisory_lock` family.
//!
//! One generic lock, [`AdvisoryLock<S, M>`](AdvisoryLock), and its guards are written once
//! over a sealed raw kind [`RawAdvisory`] (as `lock_api` builds `Mutex<R, T>` over
//! `RawMutex`). Its four instances: [`SessionLock`] ([`RawSession`], `session.rs`),
//! [`TxLock`] ([`RawTx`], `tx.rs`), [`AdvisorySemaphore`] ([`RawSlots`],
//! `semaphore.rs`) and [`LockSet`] ([`RawKeySet`], `set.rs`). What differs between them is
//! the raw trait (`raw.rs`); the engine that sends their statements, waits, and cleans up
//! after every failure is `engine.rs`; the SQL lives beside its reply decoders in `sql.rs`
//! (one key) and `coord_sql.rs` (several), replies are read by `reply.rs`, a session
//! lock's prepared statements are `prepared.rs`, and the wait strategies shared with the
//! leases are `crate::wait`.

mod coord_sql;
mod engine;
mod guard;
mod prepared;
mod raw;
mod reply;
mod semaphore;
mod session;
mod set;
mod sql;
mod tx;

use std::fmt;
use std::time::{Duration, Instant};

use postgres::{Client, NoTls};
use r2d2::{ManageConnection, Pool, PooledConnection};
use r2d2_postgres::PostgresConnectionManager;

use self::engine::Core;
pub use self::guard::{AdvisoryGuard, OwnedAdvisoryGuard, TxSavepoint};
use self::raw::sealed::OneKey;
pub use self::raw::RawAdvisory;
pub use self::semaphore::{AdvisorySemaphore, OwnedSemaphorePermit, RawSlots, SemaphorePermit};
pub use self::session::RawSession;
pub use self::set::{LockSet, LockSetGuard, OwnedLockSetGuard, RawKeySet};
pub use self::tx::RawTx;
use crate::locker::{sealed, Locker};
use crate::wait::{Limit, Outcome};
use crate::{CancelHandle, Error, LockKey, LockMode, LockOptions, Result, WaitMode};

/// A session-level advisory lock (`pg_advisory_lock`) on one checked-out connection.
///
/// The lock belongs to the database session: it survives `COMMIT` and `ROLLBACK`, lasts
/// until unlocked or until the session ends, and may span many transactions. That makes it
/// the lock for work that cannot run in one transaction (`CREATE INDEX CONCURRENTLY`,
/// `VACUUM`, calls to other systems).
///
/// It does not work through a transaction-mode pooler such as PgBouncer's
/// `pool_mode = transaction`, where consecutive statements run on different server
/// sessions, and one server session serves many clients. pglock marks the server session
/// while it holds a session lock there; a lock call that finds another client's mark
/// fails with [`Error::SessionShared`] and takes nothing, so two clients never both
/// "hold" one lock through the pooler's shared session. Use [`TxLock`] there.
///
/// The lock keeps a connection checked out of the pool for its whole life and gives it
/// back when dropped. It hands out one [`SessionGuard`] at a time; the guard derefs to the
/// connection, and unlocks when dropped. No connection ever goes back to the pool holding
/// the lock: when an unlock cannot be confirmed, pglock ends the database session, which
/// frees the lock on the server and makes r2d2 discard the connection.
///
/// `M` is the pool's connection manager; it defaults to r2d2_postgres's manager without TLS.
///
/// # Examples
///
/// ```no_run
/// use pglock::r2d2_postgres::{postgres::NoTls, PostgresConnectionManager};
/// use pglock::{r2d2, SessionLock};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let manager = PostgresConnectionManager::new("host=localhost user=postgres".parse()?, NoTls);
/// let pool = r2d2::Pool::new(manager)?;
///
/// let mut lock = SessionLock::new(&pool, "nightly-report")?;
/// if let Some(mut guard) = lock.try_lock()? {
///     // Only one process in the whole cluster gets here at a time.
///     guard.execute("INSERT INTO reports (day) VALUES (current_date)", &[])?;
///     pglock::SessionGuard::unlock(guard)?; // or let it drop
/// } else {
///     println!("another process is running the report");
/// }
/// # Ok(())
/// # }
/// ```
pub type SessionLock<M = PostgresConnectionManager<NoTls>> = AdvisoryLock<RawSession, M>;

/// A transaction-level advisory lock (`pg_advisory_xact_lock`) on one checked-out
/// connection: the lock and the critical section's work share one transaction.
///
/// Taking the lock opens a transaction (`BEGIN` goes in the same round trip as the lock).
/// The [`TxGuard`] derefs to the connection inside that transaction; committing it makes
/// the work visible and frees the lock in the same instant, and rolling it back (or
/// dropping the guard, or a panic) undoes the work and frees the lock. Nobody can see the
/// lock free while the work is uncommitted, and a transaction lock cannot outlive its
/// transaction, so it cannot leak.
///
/// This is the lock to use behind a transaction-mode pooler such as PgBouncer's
/// `pool_mode = transaction`, where session locks break, and the lock migration runners
/// want (see `examples/migrate.rs`). Work that cannot run inside a transaction
/// (`CREATE INDEX CONCURRENTLY`, `VACUUM`) needs a [`SessionLock`].
///
/// Inside the critical section, do not end the transaction yourself: `COMMIT` or
/// `ROLLBACK` in your SQL ends the lock early. For nested work, call
/// [`guard.transaction()`](AdvisoryGuard::transaction), which opens a savepoint instead
/// of a second `BEGIN`. The commit checks in SQL, before `COMMIT`, that the transaction is
/// still the lock's: if it is not, nothing is committed and [`TxGuard::commit`] reports
/// [`Error::LockLost`].
///
/// During the wait, `statement_timeout` is lifted and `lock_timeout` is set to the wait's
/// bound; both are put back to the values they had, in the same round trip, so the
/// critical section sees the session's own settings whichever way the lock was taken.
///
/// # Examples
///
/// ```no_run
/// use pglock::TxLock;
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
/// let mut lock = TxLock::new(&pool, "billing")?;
/// let mut guard = lock.lock()?;
/// guard.execute("UPDATE accounts SET balance = balance - 10 WHERE id = 1", &[])?;
/// guard.execute("UPDATE accounts SET balance = balance + 10 WHERE id = 2", &[])?;
/// pglock::TxGuard::commit(guard)?; // the work and the unlock, at once
/// # Ok(())
/// # }
/// ```
pub type TxLock<M = PostgresConnectionManager<NoTls>> = AdvisoryLock<RawTx, M>;

/// Holds a [`SessionLock`]; unlocks when dropped. See [`AdvisoryGuard`].
pub type SessionGuard<'a, M = PostgresConnectionManager<NoTls>> = AdvisoryGuard<'a, RawSession, M>;

/// Holds a [`TxLock`] inside its transaction; rolls back when dropped. See
/// [`AdvisoryGuard`].
pub type TxGuard<'a, M = PostgresConnectionManager<NoTls>> = AdvisoryGuard<'a, RawTx, M>;

/// A [`SessionGuard`] that owns its lock and connection: `'static` and `Send`.
pub type OwnedSessionGuard<M = PostgresConnectionManager<NoTls>> =
    OwnedAdvisoryGuard<RawSession, M>;

/// A [`TxGuard`] that owns its lock and connection: `'static` and `Send`.
pub type OwnedTxGuard<M = PostgresConnectionManager<NoTls>> = OwnedAdvisoryGuard<RawTx, M>;

/// An advisory lock of kind `S` on one checked-out connection: use it as [`SessionLock`],
/// [`TxLock`], [`AdvisorySemaphore`] or [`LockSet`].
///
/// A lock made from a pool ([`new`](AdvisoryLock::new),
/// [`with_options`](AdvisoryLock::with_options)) keeps the pool: when its connection
/// dies (the session was terminated by an administrator, `idle_session_timeout`, a
/// failover), the next call takes a fresh connection from the pool and goes on. A lock
/// made [`from_connection`](AdvisoryLock::from_connection) has no pool and reports the
/// dead connection instead.
pub struct AdvisoryLock<S: RawAdvisory, M = PostgresConnectionManager<NoTls>>
where
    M: ManageConnection<Connection = Client>,
{
    /// `None` only once the connection was given away (`into_connection`, an owned guard).
    conn: Option<PooledConnection<M>>,
    pool: Option<Pool<M>>,
    core: Core<S>,
}

impl<S: OneKey + RawAdvisory, M> AdvisoryLock<S, M>
where
    M: ManageConnection<Connection = Client>,
{
    /// Makes an exclusive lock on `key`, with a connection checked out of `pool`, and the
    /// default [`LockOptions`]. It does not take the lock.
    ///
    /// `key` is an `i64`, an `(i32, i32)` pair, a name (`&str` or `String`), or a
    /// [`LockKey`].
    ///
    /// # Errors
    ///
    /// [`Error::Pool`] if no connection could be checked out; [`Error::InvalidArgument`]
    /// if the key is a name with a NUL character.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let by_name = pglock::SessionLock::new(&pool, "nightly-report")?;
    /// let by_number = pglock::SessionLock::new(&pool, 42)?;
    /// let by_pair = pglock::TxLock::new(&pool, (7, 1))?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn new(pool: &Pool<M>, key: impl Into<LockKey>) -> Result<Self> {
        Self::with_options(pool, key, LockOptions::new())
    }

    /// Makes a lock on `key` with `options`, with a connection checked out of `pool`. It
    /// does not take the lock.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if an option is out of PostgreSQL's range (checked
    /// before the checkout); [`Error::Pool`] if no connection could be checked out.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use pglock::{LockOptions, SessionLock};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let options = LockOptions::new().lock_timeout(Duration::from_secs(10));
    /// let mut lock = SessionLock::with_options(&pool, "nightly-report", options)?;
    /// let _guard = lock.lock()?; // waits at most 10 s
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_options(
        pool: &Pool<M>,
        key: impl Into<LockKey>,
        options: LockOptions,
    ) -> Result<Self> {
        Self::checked_out(pool, Core::new(key.into(), options, S::default())?)
    }

    /// Makes a lock on `key` that uses a connection the caller already checked out.
    ///
    /// The lock takes the connection over: do not take advisory locks on it by other means
    /// while the lock owns it. Such a lock has no pool to take a new connection from if
    /// this one dies. Hand it over outside any transaction: a lock call on a connection
    /// inside one rolls that transaction back and fails with
    /// [`Error::TransactionLeftOpen`] (a `TxLock` does not join it).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if an option is out of PostgreSQL's range.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use pglock::{LockOptions, SessionLock};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let conn = pool.get()?;
    /// let mut lock = SessionLock::from_connection(conn, 42, LockOptions::new())?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_connection(
        conn: PooledConnection<M>,
        key: impl Into<LockKey>,
        options: LockOptions,
    ) -> Result<Self> {
        let core = Core::new(key.into(), options, S::default())?;
        Ok(Self::on_connection(conn, core))
    }

    /// Points the lock at another key, keeping its connection, options and prepared
    /// statements: the cheapest way to lock many keys in turn. Takes no round trip.
    ///
    /// No guard can be alive here; if one was leaked with `mem::forget`, its lock is
    /// released first.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if the key is a name with a NUL character; the lock then
    /// keeps its old key.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let mut lock = pglock::SessionLock::new(&pool, "job/0")?;
    /// for job in ["job/1", "job/2", "job/3"] {
    ///     lock.set_key(job)?;
    ///     if let Some(_guard) = lock.try_lock()? {
    ///         // ... run the job
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn set_key(&mut self, key: impl Into<LockKey>) -> Result<()> {
        if let Some(conn) = self.conn.as_mut() {
            self.core.release_leaked(conn);
        }
        self.core.set_key(key.into())
    }
}

impl<S: RawAdvisory, M> AdvisoryLock<S, M>
where
    M: ManageConnection<Connection = Client>,
{
    /// A lock of `core` on a connection checked out of `pool`.
    fn checked_out(pool: &Pool<M>, core: Core<S>) -> Result<Self> {
        let conn = core.checkout(pool)?;
        Ok(AdvisoryLock {
            conn: Some(conn),
            pool: Some(pool.clone()),
            core,
        })
    }

    /// A lock of `core` on the caller's connection, with no pool.
    fn on_connection(conn: PooledConnection<M>, core: Core<S>) -> Self {
        AdvisoryLock {
            conn: Some(conn),
            pool: None,
            core,
        }
    }

    /// Takes the lock if it is free. This function does not block.
    ///
    /// Returns `Ok(None)` if the lock is held elsewhere (by another session, or in a
    /// conflicting mode). One round trip (a connection's first one also prepares the
    /// statement, in the same round trip).
    ///
    /// # Errors
    ///
    /// [`Error::Cancelled`] if the lock was cancelled; [`Error::SessionShared`] if a
    /// transaction-mode pooler is in the way of a session lock;
    /// [`Error::TransactionLeftOpen`] if the connection came inside a transaction (now
    /// rolled back; nothing was taken); [`Error::LockTableFull`] if the server's lock table
    /// is full; [`Error::Pool`] if the lock needed a new connection and got none;
    /// [`Error::Database`] for any other failure.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let mut lock = pglock::SessionLock::new(&pool, "nightly-report")?;
    /// match lock.try_lock()? {
    ///     Some(_guard) => println!("running the report"),
    ///     None => println!("someone else is running it"),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    #[must_use = "if unused the lock is released immediately"]
    pub fn try_lock(&mut self) -> Result<Option<AdvisoryGuard<'_, S, M>>> {
        Ok(self.acquire(Limit::Try)?.ok())
    }

    /// Takes the lock, blocking until it is free or the configured
    /// [`lock_timeout`](LockOptions::lock_timeout) passes (by default, no bound).
    ///
    /// With the default [`WaitMode::Server`], the wait is one statement on the server: the
    /// server wakes it the moment the lock is free, and `statement_timeout` cannot cut it
    /// short. A wait is one round trip.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] if the bound passed; [`Error::Cancelled`] if the wait was
    /// cancelled; [`Error::Deadlock`] if the server found this wait in a deadlock;
    /// [`Error::TransactionLeftOpen`] if the connection came inside a transaction (now
    /// rolled back); [`Error::SessionShared`], [`Error::LockTableFull`], [`Error::Pool`] or
    /// [`Error::Database`] for failures of the server or the connection. After any error,
    /// this lock holds nothing.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let mut lock = pglock::SessionLock::new(&pool, "nightly-report")?;
    /// let _guard = lock.lock()?;
    /// // ... the critical section; the lock is released when `_guard` drops.
    /// # Ok(())
    /// # }
    /// ```
    pub fn lock(&mut self) -> Result<AdvisoryGuard<'_, S, M>> {
        let limit = self.core.default_limit();
        let key = self.core.key().clone();
        self.acquire(limit)?.map_err(|waited| {
            crate::metrics::timed_out(Core::<S>::metric_kind(), &key);
            Error::Timeout { key, waited }
        })
    }

    /// Takes the lock, blocking at most `timeout`. A zero `timeout` makes one try.
    ///
    /// Returns `Ok(None)` if the lock was still held elsewhere when `timeout` passed. The
    /// server enforces the bound with `lock_timeout` (millisecond resolution, rounded up).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `timeout` exceeds `i32::MAX` milliseconds; otherwise
    /// as for [`lock`](AdvisoryLock::lock), but never [`Error::Timeout`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let mut lock = pglock::SessionLock::new(&pool, "nightly-report")?;
    /// match lock.try_lock_for(Duration::from_secs(5))? {
    ///     Some(_guard) => println!("locked"),
    ///     None => println!("still busy after 5 s"),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    #[must_use = "if unused the lock is released immediately"]
    pub fn try_lock_for(&mut self, timeout: Duration) -> Result<Option<AdvisoryGuard<'_, S, M>>> {
        let limit = self.core.limit_for(timeout)?;
        Ok(self.acquire(limit)?.ok())
    }

    /// Runs `work` while holding the lock, and releases it on every path: when `work`
    /// returns `Ok` or `Err`, and when it panics (the panic then continues). A [`TxLock`]
    /// commits its transaction when `work` returns `Ok`, and rolls it back otherwise.
    ///
    /// Blocks like [`lock`](AdvisoryLock::lock). `work` gets the guard, which derefs to
    /// the connection. `work`'s error type only needs `From<pglock::Error>`:
    /// `Box<dyn Error>`, `anyhow::Error` and your own enums all fit.
    ///
    /// # Errors
    ///
    /// The error of [`lock`](AdvisoryLock::lock), converted; the error of `work`; or, when
    /// `work` succeeded but the release failed, the release's error: [`Error::LockLost`]
    /// (the result of `work` may have been produced without the lock for part of the
    /// time), [`Error::TransactionLeftOpen`] (a session lock's critical section left a
    /// transaction open, now rolled back), [`Error::CommitOutcomeUnknown`], or the commit's
    /// own failure. If `work` and the release both failed, `work`'s error is returned and
    /// the release's is logged.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let mut lock = pglock::SessionLock::new(&pool, "nightly-report")?;
    /// let rows = lock.with_lock(|conn| -> Result<u64, Box<dyn std::error::Error>> {
    ///     Ok(conn.execute("REFRESH MATERIALIZED VIEW daily_totals", &[])?)
    /// })?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_lock<'a, R, E, F>(&'a mut self, work: F) -> Result<R, E>
    where
        F: FnOnce(&mut AdvisoryGuard<'a, S, M>) -> Result<R, E>,
        E: From<Error>,
    {
        let mut guard = self.lock()?;
        match work(&mut guard) {
            Ok(value) => {
                guard.finish(true)?;
                Ok(value)
            }
            Err(e) => {
                if let Err(release) = guard.finish(false) {
                    log::warn!("the critical section failed, and then: {release}");
                }
                Err(e)
            }
        }
    }

    /// Takes the lock like [`lock`](AdvisoryLock::lock), and returns a guard that owns the
    /// lock and its connection: `'static` and `Send`, to keep in a struct or move to
    /// another thread (compare `lock_api`'s `ArcMutexGuard`).
    ///
    /// # Errors
    ///
    /// As for [`lock`](AdvisoryLock::lock). On an error the lock is dropped, and its
    /// connection goes back to the pool.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let guard = pglock::SessionLock::new(&pool, "leader")?.lock_owned()?;
    /// let worker = std::thread::spawn(move || {
    ///     // ... lead, while `guard` lives here
    ///     pglock::OwnedSessionGuard::unlock(guard)
    /// });
    /// worker.join().expect("worker panicked")?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn lock_owned(mut self) -> Result<OwnedAdvisoryGuard<S, M>> {
        let limit = self.core.default_limit();
        match self.acquire_owned(limit)? {
            Ok(guard) => Ok(guard),
            Err(waited) => {
                crate::metrics::timed_out(Core::<S>::metric_kind(), self.core.key());
                Err(Error::Timeout {
                    key: self.core.key().clone(),
                    waited,
                })
            }
        }
    }

    /// Takes the lock if it is free, like [`try_lock`](AdvisoryLock::try_lock), and
    /// returns a guard that owns the lock and its connection. This function does not
    /// block.
    ///
    /// Returns `Ok(None)` if the lock is held elsewhere; the lock is then dropped and its
    /// connection goes back to the pool.
    ///
    /// # Errors
    ///
    /// As for [`try_lock`](AdvisoryLock::try_lock).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// if let Some(guard) = pglock::SessionLock::new(&pool, "leader")?.try_lock_owned()? {
    ///     // ... store `guard` in the application state while leading
    /// #   drop(guard);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn try_lock_owned(mut self) -> Result<Option<OwnedAdvisoryGuard<S, M>>> {
        Ok(self.acquire_owned(Limit::Try)?.ok())
    }

    /// Gives the connection back, to run more SQL on it or to make a lock on another key
    /// with [`from_connection`](AdvisoryLock::from_connection) without a new checkout
    /// ([`set_key`](AdvisoryLock::set_key) is cheaper still).
    ///
    /// No guard can be alive here; if one was leaked with `mem::forget`, this releases it
    /// first, as dropping the lock would. The connection's prepared statements stay with
    /// it, in its r2d2 extensions.
    ///
    /// # Errors
    ///
    /// If the lock's connection had died, the lock takes a fresh one from its pool first:
    /// [`Error::Pool`] if there was none to be had, [`Error::LockLost`] for a lock made
    /// [`from_connection`](AdvisoryLock::from_connection) whose connection died and was
    /// discarded. (Before 0.2 this returned the connection itself.)
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use pglock::{LockOptions, SessionLock};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let conn = pool.get()?;
    /// let mut lock = SessionLock::from_connection(conn, "a", LockOptions::new())?;
    /// if let Some(guard) = lock.try_lock()? {
    ///     // ... run job "a"
    /// #   drop(guard);
    /// }
    /// let mut conn = lock.into_connection()?;
    /// conn.execute("SELECT 1", &[])?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn into_connection(mut self) -> Result<PooledConnection<M>> {
        let conn = Self::connect(&mut self.conn, &self.pool, &mut self.core, None)?;
        self.core.release_leaked(conn);
        S::leave(&mut self.core, conn);
        let conn = self.conn.take();
        conn.ok_or_else(|| self.core.lost(crate::LostReason::SessionEnded, None))
    }

    /// A handle that cancels this lock's waits from another thread. See [`CancelHandle`].
    pub fn cancel_handle(&self) -> CancelHandle {
        self.core.cancel_handle(self.conn.as_deref())
    }

    /// The lock's key.
    pub fn key(&self) -> &LockKey {
        self.core.key()
    }

    /// Exclusive or shared.
    pub fn mode(&self) -> LockMode {
        self.core.mode()
    }

    /// The bound of [`lock`](AdvisoryLock::lock), if any.
    pub fn lock_timeout(&self) -> Option<Duration> {
        self.core.lock_timeout()
    }

    /// Where blocking calls wait.
    pub fn wait_mode(&self) -> WaitMode {
        self.core.wait_mode()
    }

    /// The lock's live connection: the current one, or a fresh one from the pool when it
    /// died, checked out within `within` when given (else the pool's `connection_timeout`).
    fn connect<'c>(
        conn: &'c mut Option<PooledConnection<M>>,
        pool: &Option<Pool<M>>,
        core: &mut Core<S>,
        within: Option<Duration>,
    ) -> Result<&'c mut PooledConnection<M>> {
        let dead = core.is_dead() || conn.as_mut().is_none_or(|c| c.is_closed());
        if let (true, Some(pool)) = (dead, pool) {
            // Give the dead one back first (a pool of one has no other), closed, so that
            // r2d2 discards it: a client learns of the closed socket on its next use.
            if let Some(mut old) = conn.take() {
                if !old.is_closed() {
                    let _ = old.simple_query("");
                }
            }
            let fresh = core.checkout_within(pool, within)?;
            core.connected(&fresh);
            *conn = Some(fresh);
        }
        match conn {
            Some(conn) => Ok(conn),
            None => Err(core.lost(crate::LostReason::SessionEnded, None)),
        }
    }

    /// Takes the lock within `limit`: the guard, or how long it waited for a busy lock.
    fn acquire(&mut self, limit: Limit) -> Result<Result<AdvisoryGuard<'_, S, M>, Duration>> {
        if let Outcome::Busy { waited } = self.acquire_outcome(limit)? {
            return Ok(Err(waited));
        }
        // The connection that took the lock, as it is: never a replacement.
        match self.conn.as_mut() {
            Some(conn) => Ok(Ok(AdvisoryGuard::new(conn, &mut self.core))),
            None => Err(self.core.lost(crate::LostReason::SessionEnded, None)),
        }
    }

    /// Takes the lock within `limit` on the lock's live connection. A session found dead
    /// by the attempt itself (terminated while idle, cut off the network) held nothing:
    /// with a pool, the attempt is made once more on a fresh connection, within what is
    /// left of `limit` (the checkout too), so that the call never outlasts its bound by
    /// more than the time it took to find the connection dead.
    fn acquire_outcome(&mut self, limit: Limit) -> Result<Outcome> {
        let start = Instant::now();
        let conn = Self::connect(&mut self.conn, &self.pool, &mut self.core, None)?;
        match self.core.acquire(conn, limit) {
            // Not after a cancel (sticky) or a timeout: only a session that was gone.
            Err(e @ Error::Database { .. }) if self.core.is_dead() && self.pool.is_some() => {
                // What is left of the bound, for the checkout and the attempt; a spent
                // bound still gets one try, as a lock found dead before its call would,
                // with a checkout of the least time.
                let (left, checkout) = match limit {
                    Limit::For(_) => match limit.left_after(start.elapsed()) {
                        Some(Limit::For(d)) => (Limit::For(d), Some(d)),
                        _ => (Limit::Try, Some(Duration::ZERO)),
                    },
                    other => (other, None),
                };
                log::debug!("{e}; again on a fresh connection");
                let conn = Self::connect(&mut self.conn, &self.pool, &mut self.core, checkout)?;
                match self.core.acquire(conn, left)? {
                    Outcome::Busy { .. } => Ok(Outcome::Busy {
                        waited: start.elapsed(),
                    }),
                    locked => Ok(locked),
                }
            }
            other => other,
        }
    }

    /// [`acquire`](Self::acquire), for an owned guard.
    fn acquire_owned(
        &mut self,
        limit: Limit,
    ) -> Result<Result<OwnedAdvisoryGuard<S, M>, Duration>> {
        if let Outcome::Busy { waited } = self.acquire_outcome(limit)? {
            return Ok(Err(waited));
        }
        let core = self.core.take();
        match self.conn.take() {
            Some(conn) => Ok(Ok(OwnedAdvisoryGuard::new(conn, core))),
            None => Err(core.lost(crate::LostReason::SessionEnded, None)),
        }
    }
}

impl<S: RawAdvisory, M> Drop for AdvisoryLock<S, M>
where
    M: ManageConnection<Connection = Client>,
{
    fn drop(&mut self) {
        // Only has work if a guard was leaked with `mem::forget`, or the kind set the
        // connection up (a semaphore listens).
        if let Some(conn) = self.conn.as_mut() {
            self.core.release_leaked(conn);
            S::leave(&mut self.core, conn);
        }
    }
}

impl<S: RawAdvisory, M> fmt::Debug for AdvisoryLock<S, M>
where
    M: ManageConnection<Connection = Client>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct(<S as raw::sealed::Raw>::NAME)
            .field("key", self.core.key())
            .field("mode", &self.core.mode())
            .field("lock_timeout", &self.core.lock_timeout())
            .field("wait_mode", &self.core.wait_mode())
            .field("held", &self.core.is_held_flag())
            .finish_non_exhaustive()
    }
}

impl<S: RawAdvisory, M> sealed::Sealed for AdvisoryLock<S, M> where
    M: ManageConnection<Connection = Client>
{
}

impl<S: RawAdvisory, M> Locker for AdvisoryLock<S, M>
where
    M: ManageConnection<Connection = Client>,
{
    type Guard<'a> = AdvisoryGuard<'a, S, M>;

    fn key(&self) -> &LockKey {
        AdvisoryLock::key(self)
    }

    fn mode(&self) -> LockMode {
        AdvisoryLock::mode(self)
    }

    fn try_lock(&mut self) -> Result<Option<Self::Guard<'_>>> {
        AdvisoryLock::try_lock(self)
    }

    fn lock(&mut self) -> Result<Self::Guard<'_>> {
        AdvisoryLock::lock(self)
    }

    fn try_lock_for(&mut self, timeout: Duration) -> Result<Option<Self::Guard<'_>>> {
        AdvisoryLock::try_lock_for(self, timeout)
    }

    fn with_lock<'a, R, E, F>(&'a mut self, work: F) -> Result<R, E>
    where
        F: FnOnce(&mut Self::Guard<'a>) -> Result<R, E>,
        E: From<Error>,
    {
        AdvisoryLock::with_lock(self, work)
    }

    fn cancel_handle(&self) -> CancelHandle {
        AdvisoryLock::cancel_handle(self)
    }
}
