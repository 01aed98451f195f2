//! Session-level advisory locks.

use std::fmt;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::time::{Duration, Instant};

use log::{debug, warn};
use postgres::{Client, NoTls};
use r2d2::{ManageConnection, Pool, PooledConnection};
use r2d2_postgres::PostgresConnectionManager;

use crate::core::{Core, Limit, Outcome, Scope};
use crate::locker::{sealed, Locker};
use crate::{CancelHandle, Error, LockKey, LockMode, LockOptions, Result, WaitMode};

/// A session-level advisory lock (`pg_advisory_lock`) on one checked-out connection.
///
/// The lock belongs to the database session: it survives `COMMIT` and `ROLLBACK`, lasts
/// until unlocked or until the session ends, and may span many transactions. That makes it
/// the lock for work that cannot run in one transaction (`CREATE INDEX CONCURRENTLY`,
/// `VACUUM`, calls to other systems). It does not work through a transaction-mode pooler
/// such as PgBouncer's `pool_mode = transaction`; use [`TxLock`](crate::TxLock) there.
///
/// The `SessionLock` owns a connection checked out of the pool for its whole life and gives
/// it back when dropped. It hands out one [`SessionGuard`] at a time; the guard derefs to
/// the connection, and unlocks when dropped. No connection ever goes back to the pool
/// holding the lock: when an unlock cannot be confirmed, pglock ends the database session,
/// which frees the lock on the server and makes r2d2 discard the connection.
///
/// `M` is the pool's connection manager; it defaults to r2d2_postgres's manager without TLS.
///
/// # Examples
///
/// ```no_run
/// use pglock::SessionLock;
/// use r2d2_postgres::{postgres::NoTls, PostgresConnectionManager};
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
pub struct SessionLock<M = PostgresConnectionManager<NoTls>>
where
    M: ManageConnection<Connection = Client>,
{
    conn: PooledConnection<M>,
    core: Core,
}

impl<M> SessionLock<M>
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
    /// # let pool: r2d2::Pool<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>> = todo!();
    /// let by_name = pglock::SessionLock::new(&pool, "nightly-report")?;
    /// let by_number = pglock::SessionLock::new(&pool, 42)?;
    /// let by_pair = pglock::SessionLock::new(&pool, (7, 1))?;
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
    /// # let pool: r2d2::Pool<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>> = todo!();
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
        let core = Core::new(Scope::Session, key.into(), options)?;
        let conn = core.checkout(pool)?;
        Ok(SessionLock { conn, core })
    }

    /// Makes a lock on `key` that uses a connection the caller already checked out.
    ///
    /// The lock takes the connection over: do not take advisory locks on it by other means
    /// while the lock owns it.
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
    /// # let pool: r2d2::Pool<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>> = todo!();
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
        let core = Core::new(Scope::Session, key.into(), options)?;
        Ok(SessionLock { conn, core })
    }

    /// Takes the lock if it is free. This function does not block.
    ///
    /// Returns `Ok(None)` if the lock is held elsewhere (by another session, or in a
    /// conflicting mode). One round trip.
    ///
    /// # Errors
    ///
    /// [`Error::Cancelled`] if the lock was cancelled; [`Error::LockTableFull`] if the
    /// server's lock table is full; [`Error::Database`] for any other failure.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: r2d2::Pool<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>> = todo!();
    /// let mut lock = pglock::SessionLock::new(&pool, "nightly-report")?;
    /// match lock.try_lock()? {
    ///     Some(_guard) => println!("running the report"),
    ///     None => println!("someone else is running it"),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    #[must_use = "if unused the lock is released immediately"]
    pub fn try_lock(&mut self) -> Result<Option<SessionGuard<'_, M>>> {
        Ok(self.acquire(Limit::Try)?.ok())
    }

    /// Takes the lock, blocking until it is free or the configured
    /// [`lock_timeout`](LockOptions::lock_timeout) passes (by default, no bound).
    ///
    /// With the default [`WaitMode::Server`], the wait is one statement on the server: the
    /// server wakes it the moment the lock is free, and `statement_timeout` is lifted for
    /// it. A bounded wait is one round trip.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] if the bound passed; [`Error::Cancelled`] if the wait was
    /// cancelled; [`Error::Deadlock`] if the server found this wait in a deadlock;
    /// [`Error::LockTableFull`] or [`Error::Database`] for failures of the server or the
    /// connection. After any error, this lock holds nothing.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: r2d2::Pool<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>> = todo!();
    /// let mut lock = pglock::SessionLock::new(&pool, "nightly-report")?;
    /// let _guard = lock.lock()?;
    /// // ... the critical section; the lock is released when `_guard` drops.
    /// # Ok(())
    /// # }
    /// ```
    pub fn lock(&mut self) -> Result<SessionGuard<'_, M>> {
        let limit = self.core.default_limit();
        let key = self.core.key().clone();
        self.acquire(limit)?
            .map_err(|waited| Error::Timeout { key, waited })
    }

    /// Takes the lock, blocking at most `timeout`. A zero `timeout` makes one try.
    ///
    /// Returns `Ok(None)` if the lock was still held elsewhere when `timeout` passed. The
    /// server enforces the bound with `lock_timeout` (millisecond resolution, rounded up).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `timeout` exceeds `i32::MAX` milliseconds; otherwise
    /// as for [`lock`](SessionLock::lock), but never [`Error::Timeout`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: r2d2::Pool<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>> = todo!();
    /// let mut lock = pglock::SessionLock::new(&pool, "nightly-report")?;
    /// match lock.try_lock_for(Duration::from_secs(5))? {
    ///     Some(_guard) => println!("locked"),
    ///     None => println!("still busy after 5 s"),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    #[must_use = "if unused the lock is released immediately"]
    pub fn try_lock_for(&mut self, timeout: Duration) -> Result<Option<SessionGuard<'_, M>>> {
        let limit = self.core.limit_for(timeout)?;
        Ok(self.acquire(limit)?.ok())
    }

    /// Runs `work` while holding the lock, and unlocks on every path: when `work` returns
    /// `Ok` or `Err`, and when it panics (the panic then continues).
    ///
    /// Blocks like [`lock`](SessionLock::lock). `work` gets the guard, which derefs to the
    /// connection, and can check [`SessionGuard::is_held`] during long work. `work`'s error
    /// type only needs `From<pglock::Error>`: `Box<dyn Error>`, `anyhow::Error` and your own
    /// enums all fit.
    ///
    /// # Errors
    ///
    /// The error of [`lock`](SessionLock::lock), converted; the error of `work`; or, when
    /// `work` succeeded but the unlock failed, the unlock's error (for example
    /// [`Error::LockLost`]: the result of `work` may have been produced without the lock for
    /// part of the time). If `work` and the unlock both failed, `work`'s error is returned
    /// and the unlock's is logged.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: r2d2::Pool<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>> = todo!();
    /// let mut lock = pglock::SessionLock::new(&pool, "nightly-report")?;
    /// let rows = lock.with_lock(|conn| -> Result<u64, Box<dyn std::error::Error>> {
    ///     Ok(conn.execute("REFRESH MATERIALIZED VIEW daily_totals", &[])?)
    /// })?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_lock<'a, R, E, F>(&'a mut self, work: F) -> Result<R, E>
    where
        F: FnOnce(&mut SessionGuard<'a, M>) -> Result<R, E>,
        E: From<Error>,
    {
        let mut guard = self.lock()?;
        match work(&mut guard) {
            Ok(value) => {
                SessionGuard::unlock(guard)?;
                Ok(value)
            }
            Err(e) => {
                if let Err(unlock) = SessionGuard::unlock(guard) {
                    warn!("the critical section failed, and then: {unlock}");
                }
                Err(e)
            }
        }
    }

    /// Gives the connection back, to run more SQL on it or to make a lock on another key
    /// with [`from_connection`](SessionLock::from_connection) without a new checkout (r2d2 checks
    /// each checked-out connection with a round trip by default).
    ///
    /// No guard can be alive here; if one was leaked with `mem::forget`, this unlocks it
    /// first, as dropping the lock would.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use pglock::{LockOptions, SessionLock};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: r2d2::Pool<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>> = todo!();
    /// let mut conn = pool.get()?;
    /// for job in ["a", "b", "c"] {
    ///     let mut lock = SessionLock::from_connection(conn, job, LockOptions::new())?;
    ///     if let Some(guard) = lock.try_lock()? {
    ///         // ... run the job
    /// #       drop(guard);
    ///     }
    ///     conn = lock.into_connection();
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn into_connection(self) -> PooledConnection<M> {
        let mut this = ManuallyDrop::new(self);
        let lock = &mut *this;
        lock.core.release_leaked(&mut lock.conn);
        // SAFETY: `this` is never used or dropped again: each field is moved out or
        // dropped exactly once, which is what dropping `self` without `Drop` would do.
        unsafe {
            std::ptr::drop_in_place(&mut this.core);
            std::ptr::read(&this.conn)
        }
    }

    /// A handle that cancels this lock's waits from another thread. See [`CancelHandle`].
    pub fn cancel_handle(&self) -> CancelHandle {
        self.core.cancel_handle(&self.conn)
    }

    /// The lock's key.
    pub fn key(&self) -> &LockKey {
        self.core.key()
    }

    /// Exclusive or shared.
    pub fn mode(&self) -> LockMode {
        self.core.mode()
    }

    /// The bound of [`lock`](SessionLock::lock), if any.
    pub fn lock_timeout(&self) -> Option<Duration> {
        self.core.lock_timeout()
    }

    /// Where blocking calls wait.
    pub fn wait_mode(&self) -> WaitMode {
        self.core.wait_mode()
    }

    /// Takes the lock within `limit`: the guard, or how long it waited for a busy lock.
    fn acquire(&mut self, limit: Limit) -> Result<Result<SessionGuard<'_, M>, Duration>> {
        Ok(match self.core.acquire(&mut self.conn, limit)? {
            Outcome::Locked => Ok(SessionGuard {
                lock: self,
                locked_at: Instant::now(),
                used: false,
            }),
            Outcome::Busy { waited } => Err(waited),
        })
    }
}

impl<M> Drop for SessionLock<M>
where
    M: ManageConnection<Connection = Client>,
{
    fn drop(&mut self) {
        // Only has work if a guard was leaked with `mem::forget`.
        self.core.release_leaked(&mut self.conn);
    }
}

impl<M> fmt::Debug for SessionLock<M>
where
    M: ManageConnection<Connection = Client>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionLock")
            .field("key", self.core.key())
            .field("mode", &self.core.mode())
            .field("lock_timeout", &self.core.lock_timeout())
            .field("wait_mode", &self.core.wait_mode())
            .field("held", &self.core.is_held_flag())
            .finish_non_exhaustive()
    }
}

impl<M> sealed::Sealed for SessionLock<M> where M: ManageConnection<Connection = Client> {}

impl<M> Locker for SessionLock<M>
where
    M: ManageConnection<Connection = Client>,
{
    type Guard<'a> = SessionGuard<'a, M>;

    fn key(&self) -> &LockKey {
        SessionLock::key(self)
    }

    fn mode(&self) -> LockMode {
        SessionLock::mode(self)
    }

    fn try_lock(&mut self) -> Result<Option<Self::Guard<'_>>> {
        SessionLock::try_lock(self)
    }

    fn lock(&mut self) -> Result<Self::Guard<'_>> {
        SessionLock::lock(self)
    }

    fn try_lock_for(&mut self, timeout: Duration) -> Result<Option<Self::Guard<'_>>> {
        SessionLock::try_lock_for(self, timeout)
    }

    fn with_lock<'a, R, E, F>(&'a mut self, work: F) -> Result<R, E>
    where
        F: FnOnce(&mut Self::Guard<'a>) -> Result<R, E>,
        E: From<Error>,
    {
        SessionLock::with_lock(self, work)
    }

    fn cancel_handle(&self) -> CancelHandle {
        SessionLock::cancel_handle(self)
    }
}

/// Holds a [`SessionLock`]; unlocks when dropped.
///
/// Derefs to the lock's connection, so the critical section runs SQL on the session that
/// holds the lock. Its own operations are associated functions (`SessionGuard::unlock(g)`)
/// so that they never shadow the connection's methods.
///
/// `let _ = lock.lock()?;` unlocks at once; `let _guard = lock.lock()?;` holds the lock
/// to the end of the scope.
///
/// Do not end the session's advisory locks by other means in the critical section
/// (`pg_advisory_unlock_all()`, `DISCARD ALL`): the unlock then reports
/// [`Error::LockLost`].
///
/// A transaction the critical section began with raw SQL and left open (on an early
/// return, a panic, or by mistake) is rolled back at unlock, like a dropped
/// [`postgres::Transaction`]: the connection never goes back to the pool inside one. The
/// check rides in the unlock statement, and only when the critical section used the
/// connection.
#[must_use = "if unused the lock is released immediately"]
pub struct SessionGuard<'a, M = PostgresConnectionManager<NoTls>>
where
    M: ManageConnection<Connection = Client>,
{
    lock: &'a mut SessionLock<M>,
    locked_at: Instant,
    /// The critical section had mutable access to the connection, so it may have left a
    /// transaction open.
    used: bool,
}

impl<M> SessionGuard<'_, M>
where
    M: ManageConnection<Connection = Client>,
{
    /// Unlocks. The same as dropping the guard, but reports the error.
    ///
    /// One round trip.
    ///
    /// # Errors
    ///
    /// [`Error::LockLost`] if the lock was already gone: the session ended, or the server
    /// said this session did not hold it. [`Error::Database`] if the unlock failed; pglock
    /// then ended the database session, which frees the lock.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: r2d2::Pool<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>> = todo!();
    /// let mut lock = pglock::SessionLock::new(&pool, "nightly-report")?;
    /// let guard = lock.lock()?;
    /// pglock::SessionGuard::unlock(guard)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn unlock(this: Self) -> Result<()> {
        let mut this = ManuallyDrop::new(this);
        this.release()
    }

    /// Asks the server whether this session still holds the lock: it may have been freed
    /// because the session was terminated (by an administrator, `idle_session_timeout`, a
    /// failover) or the lock was unlocked behind pglock's back.
    ///
    /// One round trip. A closed connection answers `Ok(false)`.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the server could not answer (for example, the critical
    /// section left a failed transaction open).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: r2d2::Pool<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>> = todo!();
    /// # let batches: Vec<String> = vec![];
    /// let mut lock = pglock::SessionLock::new(&pool, "nightly-report")?;
    /// let mut guard = lock.lock()?;
    /// for batch in batches {
    ///     if !pglock::SessionGuard::is_held(&mut guard)? {
    ///         return Err("lost the lock; stopping".into());
    ///     }
    ///     guard.batch_execute(&batch)?;
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn is_held(this: &mut Self) -> Result<bool> {
        this.lock.core.is_held(&mut this.lock.conn)
    }

    /// The lock's key.
    pub fn key(this: &Self) -> &LockKey {
        this.lock.core.key()
    }

    /// Unlocks. If the critical section ran SQL, also rolls back a transaction it left
    /// open; if it did not, none can be open.
    fn release(&mut self) -> Result<()> {
        let held_for = self.locked_at.elapsed();
        let result = self
            .lock
            .core
            .unlock_session(&mut self.lock.conn, self.used);
        if result.is_ok() {
            debug!("held {} for {held_for:?}", self.lock.core.key());
        }
        result
    }
}

impl<M> Deref for SessionGuard<'_, M>
where
    M: ManageConnection<Connection = Client>,
{
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.lock.conn
    }
}

impl<M> DerefMut for SessionGuard<'_, M>
where
    M: ManageConnection<Connection = Client>,
{
    fn deref_mut(&mut self) -> &mut Client {
        // Every query method of `Client` takes `&mut self`: only through here can the
        // critical section open a transaction.
        self.used = true;
        &mut self.lock.conn
    }
}

impl<M> Drop for SessionGuard<'_, M>
where
    M: ManageConnection<Connection = Client>,
{
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            warn!("{e}");
        }
    }
}

impl<M> fmt::Debug for SessionGuard<'_, M>
where
    M: ManageConnection<Connection = Client>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionGuard")
            .field("key", self.lock.core.key())
            .field("mode", &self.lock.core.mode())
            .field("held_for", &self.locked_at.elapsed())
            .finish()
    }
}
