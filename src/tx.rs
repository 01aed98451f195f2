//! Transaction-level advisory locks.

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
/// (`CREATE INDEX CONCURRENTLY`, `VACUUM`) needs a [`SessionLock`](crate::SessionLock).
///
/// Inside the critical section, do not end the transaction yourself (`COMMIT` or
/// `ROLLBACK` in your SQL, or [`Client::transaction`], which would send `BEGIN` and
/// `COMMIT` of its own): that ends the lock early. Use savepoints for nested work.
/// [`TxGuard::commit`] detects an early end and reports [`Error::LockLost`].
///
/// During the wait, `statement_timeout` is lifted and `lock_timeout` is set to the wait's
/// bound; both are then put back to their defaults for the rest of the transaction (the
/// values from the server, database, role and connection settings; a session-level `SET`
/// made earlier on the pooled connection does not carry into the lock's transaction).
///
/// # Examples
///
/// ```no_run
/// use pglock::TxLock;
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let pool: r2d2::Pool<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>> = todo!();
/// let mut lock = TxLock::new(&pool, "billing")?;
/// let mut guard = lock.lock()?;
/// guard.execute("UPDATE accounts SET balance = balance - 10 WHERE id = 1", &[])?;
/// guard.execute("UPDATE accounts SET balance = balance + 10 WHERE id = 2", &[])?;
/// pglock::TxGuard::commit(guard)?; // the work and the unlock, at once
/// # Ok(())
/// # }
/// ```
pub struct TxLock<M = PostgresConnectionManager<NoTls>>
where
    M: ManageConnection<Connection = Client>,
{
    conn: PooledConnection<M>,
    core: Core,
}

impl<M> TxLock<M>
where
    M: ManageConnection<Connection = Client>,
{
    /// Makes an exclusive transaction lock on `key`, with a connection checked out of
    /// `pool`, and the default [`LockOptions`]. It does not take the lock.
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
    /// let mut lock = pglock::TxLock::new(&pool, "schema-migrations")?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn new(pool: &Pool<M>, key: impl Into<LockKey>) -> Result<Self> {
        Self::with_options(pool, key, LockOptions::new())
    }

    /// Makes a transaction lock on `key` with `options`, with a connection checked out of
    /// `pool`. It does not take the lock.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if an option is out of PostgreSQL's range (checked
    /// before the checkout); [`Error::Pool`] if no connection could be checked out.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use pglock::{LockOptions, TxLock, WaitMode};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: r2d2::Pool<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>> = todo!();
    /// let options = LockOptions::new().wait_mode(WaitMode::poll());
    /// let mut lock = TxLock::with_options(&pool, "schema-migrations", options)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_options(
        pool: &Pool<M>,
        key: impl Into<LockKey>,
        options: LockOptions,
    ) -> Result<Self> {
        let core = Core::new(Scope::Transaction, key.into(), options)?;
        let conn = core.checkout(pool)?;
        Ok(TxLock { conn, core })
    }

    /// Makes a transaction lock on `key` that uses a connection the caller already checked
    /// out. The connection must not be inside a transaction.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if an option is out of PostgreSQL's range.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: r2d2::Pool<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>> = todo!();
    /// let conn = pool.get()?;
    /// let lock = pglock::TxLock::from_connection(conn, 42, pglock::LockOptions::new())?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_connection(
        conn: PooledConnection<M>,
        key: impl Into<LockKey>,
        options: LockOptions,
    ) -> Result<Self> {
        let core = Core::new(Scope::Transaction, key.into(), options)?;
        Ok(TxLock { conn, core })
    }

    /// Opens a transaction and takes the lock in it if it is free. This function does not
    /// block.
    ///
    /// Returns `Ok(None)` if the lock is held elsewhere; no transaction is left open. One
    /// round trip when the lock is free, two when it is busy (the second ends the
    /// transaction).
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
    /// let mut lock = pglock::TxLock::new(&pool, "billing")?;
    /// if let Some(guard) = lock.try_lock()? {
    ///     pglock::TxGuard::commit(guard)?;
    /// }
    /// # Ok(())
    /// # }
    /// ```
    #[must_use = "if unused the lock is released immediately"]
    pub fn try_lock(&mut self) -> Result<Option<TxGuard<'_, M>>> {
        Ok(self.acquire(Limit::Try)?.ok())
    }

    /// Opens a transaction and takes the lock in it, blocking until the lock is free or the
    /// configured [`lock_timeout`](LockOptions::lock_timeout) passes (by default, no
    /// bound). One round trip with [`WaitMode::Server`].
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] if the bound passed; [`Error::Cancelled`] if the wait was
    /// cancelled; [`Error::Deadlock`] if the server found this wait in a deadlock;
    /// [`Error::LockTableFull`] or [`Error::Database`] for failures of the server or the
    /// connection. After any error, no transaction is open and nothing is held.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: r2d2::Pool<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>> = todo!();
    /// let mut lock = pglock::TxLock::new(&pool, "billing")?;
    /// let mut guard = lock.lock()?;
    /// guard.execute("DELETE FROM sessions WHERE expires < now()", &[])?;
    /// pglock::TxGuard::commit(guard)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn lock(&mut self) -> Result<TxGuard<'_, M>> {
        let limit = self.core.default_limit();
        let key = self.core.key().clone();
        self.acquire(limit)?
            .map_err(|waited| Error::Timeout { key, waited })
    }

    /// Opens a transaction and takes the lock in it, blocking at most `timeout`. A zero
    /// `timeout` makes one try.
    ///
    /// Returns `Ok(None)` if the lock was still held elsewhere when `timeout` passed; no
    /// transaction is left open.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `timeout` exceeds `i32::MAX` milliseconds; otherwise
    /// as for [`lock`](TxLock::lock), but never [`Error::Timeout`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: r2d2::Pool<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>> = todo!();
    /// let mut lock = pglock::TxLock::new(&pool, "billing")?;
    /// if let Some(guard) = lock.try_lock_for(Duration::from_millis(500))? {
    ///     pglock::TxGuard::commit(guard)?;
    /// }
    /// # Ok(())
    /// # }
    /// ```
    #[must_use = "if unused the lock is released immediately"]
    pub fn try_lock_for(&mut self, timeout: Duration) -> Result<Option<TxGuard<'_, M>>> {
        let limit = self.core.limit_for(timeout)?;
        Ok(self.acquire(limit)?.ok())
    }

    /// Runs `work` inside the lock's transaction: commits when `work` returns `Ok`, rolls
    /// back when it returns `Err` or panics (the panic then continues). The lock ends with
    /// the transaction either way.
    ///
    /// Blocks like [`lock`](TxLock::lock). `work`'s error type only needs
    /// `From<pglock::Error>`.
    ///
    /// # Errors
    ///
    /// The error of [`lock`](TxLock::lock), converted; the error of `work` (after the
    /// rollback); or, when `work` succeeded but the commit failed, the commit's error (the
    /// work was then rolled back, or, for [`Error::LockLost`], its transaction was ended
    /// inside `work`). If `work` and the rollback both failed, `work`'s error is returned
    /// and the rollback's is logged.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: r2d2::Pool<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>> = todo!();
    /// let mut lock = pglock::TxLock::new(&pool, "billing")?;
    /// lock.with_lock(|tx| -> Result<(), Box<dyn std::error::Error>> {
    ///     tx.execute("UPDATE accounts SET balance = balance - 10 WHERE id = 1", &[])?;
    ///     tx.execute("UPDATE accounts SET balance = balance + 10 WHERE id = 2", &[])?;
    ///     Ok(())
    /// })?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_lock<'a, R, E, F>(&'a mut self, work: F) -> Result<R, E>
    where
        F: FnOnce(&mut TxGuard<'a, M>) -> Result<R, E>,
        E: From<Error>,
    {
        let mut guard = self.lock()?;
        match work(&mut guard) {
            Ok(value) => {
                TxGuard::commit(guard)?;
                Ok(value)
            }
            Err(e) => {
                if let Err(rollback) = TxGuard::rollback(guard) {
                    warn!("the critical section failed, and then: {rollback}");
                }
                Err(e)
            }
        }
    }

    /// Gives the connection back, to run more SQL on it or to make a lock on another key
    /// with [`from_connection`](TxLock::from_connection) without a new checkout (r2d2 checks
    /// each checked-out connection with a round trip by default).
    ///
    /// No guard can be alive here; if one was leaked with `mem::forget`, this rolls its transaction back
    /// first, as dropping the lock would.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use pglock::{LockOptions, TxLock};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: r2d2::Pool<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>> = todo!();
    /// let mut conn = pool.get()?;
    /// for job in ["a", "b", "c"] {
    ///     let mut lock = TxLock::from_connection(conn, job, LockOptions::new())?;
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

    /// The bound of [`lock`](TxLock::lock), if any.
    pub fn lock_timeout(&self) -> Option<Duration> {
        self.core.lock_timeout()
    }

    /// Where blocking calls wait.
    pub fn wait_mode(&self) -> WaitMode {
        self.core.wait_mode()
    }

    /// Takes the lock within `limit`: the guard, or how long it waited for a busy lock.
    fn acquire(&mut self, limit: Limit) -> Result<Result<TxGuard<'_, M>, Duration>> {
        Ok(match self.core.acquire(&mut self.conn, limit)? {
            Outcome::Locked => Ok(TxGuard {
                lock: self,
                locked_at: Instant::now(),
            }),
            Outcome::Busy { waited } => Err(waited),
        })
    }
}

impl<M> Drop for TxLock<M>
where
    M: ManageConnection<Connection = Client>,
{
    fn drop(&mut self) {
        // Only has work if a guard was leaked with `mem::forget`.
        self.core.release_leaked(&mut self.conn);
    }
}

impl<M> fmt::Debug for TxLock<M>
where
    M: ManageConnection<Connection = Client>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TxLock")
            .field("key", self.core.key())
            .field("mode", &self.core.mode())
            .field("lock_timeout", &self.core.lock_timeout())
            .field("wait_mode", &self.core.wait_mode())
            .field("held", &self.core.is_held_flag())
            .finish_non_exhaustive()
    }
}

impl<M> sealed::Sealed for TxLock<M> where M: ManageConnection<Connection = Client> {}

impl<M> Locker for TxLock<M>
where
    M: ManageConnection<Connection = Client>,
{
    type Guard<'a> = TxGuard<'a, M>;

    fn key(&self) -> &LockKey {
        TxLock::key(self)
    }

    fn mode(&self) -> LockMode {
        TxLock::mode(self)
    }

    fn try_lock(&mut self) -> Result<Option<Self::Guard<'_>>> {
        TxLock::try_lock(self)
    }

    fn lock(&mut self) -> Result<Self::Guard<'_>> {
        TxLock::lock(self)
    }

    fn try_lock_for(&mut self, timeout: Duration) -> Result<Option<Self::Guard<'_>>> {
        TxLock::try_lock_for(self, timeout)
    }

    fn with_lock<'a, R, E, F>(&'a mut self, work: F) -> Result<R, E>
    where
        F: FnOnce(&mut Self::Guard<'a>) -> Result<R, E>,
        E: From<Error>,
    {
        TxLock::with_lock(self, work)
    }

    fn cancel_handle(&self) -> CancelHandle {
        TxLock::cancel_handle(self)
    }
}

/// Holds a [`TxLock`]: an open transaction holding the lock. Rolls back when dropped.
///
/// Derefs to the lock's connection, inside the transaction. End it with
/// [`commit`](TxGuard::commit) or [`rollback`](TxGuard::rollback); its own operations are
/// associated functions so that they never shadow the connection's methods.
///
/// `let _ = lock.lock()?;` rolls back at once; `let _guard = lock.lock()?;` holds the lock
/// to the end of the scope.
#[must_use = "if unused the transaction rolls back and the lock is released immediately"]
pub struct TxGuard<'a, M = PostgresConnectionManager<NoTls>>
where
    M: ManageConnection<Connection = Client>,
{
    lock: &'a mut TxLock<M>,
    locked_at: Instant,
}

impl<M> TxGuard<'_, M>
where
    M: ManageConnection<Connection = Client>,
{
    /// Commits the transaction, which also releases the lock. One round trip.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the commit failed (a serialization failure, a deferred
    /// constraint, a statement in the critical section that failed and left the
    /// transaction aborted); the transaction was then rolled back and the lock released.
    /// [`Error::LockLost`] if the transaction had already been ended inside the critical
    /// section, or the session ended.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: r2d2::Pool<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>> = todo!();
    /// let mut lock = pglock::TxLock::new(&pool, "billing")?;
    /// let mut guard = lock.lock()?;
    /// guard.execute("UPDATE accounts SET frozen = true WHERE id = 1", &[])?;
    /// pglock::TxGuard::commit(guard)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn commit(this: Self) -> Result<()> {
        let mut this = std::mem::ManuallyDrop::new(this);
        let held_for = this.locked_at.elapsed();
        let lock = &mut *this.lock;
        let result = lock.core.commit(&mut lock.conn);
        if result.is_ok() {
            debug!("held {} for {held_for:?}", lock.core.key());
        }
        result
    }

    /// Rolls back the transaction, which also releases the lock. The same as dropping the
    /// guard, but reports the error.
    ///
    /// # Errors
    ///
    /// [`Error::LockLost`] if the session had ended; [`Error::Database`] if the rollback
    /// failed, in which case pglock ended the database session (which rolls back and frees
    /// the lock).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: r2d2::Pool<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>> = todo!();
    /// let mut lock = pglock::TxLock::new(&pool, "billing")?;
    /// let guard = lock.lock()?;
    /// pglock::TxGuard::rollback(guard)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn rollback(this: Self) -> Result<()> {
        let mut this = std::mem::ManuallyDrop::new(this);
        this.release()
    }

    /// Asks the server whether this session still holds the lock. One round trip; a closed
    /// connection answers `Ok(false)`.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the server could not answer; in particular, after a failed
    /// statement the transaction is aborted and answers nothing until it is rolled back.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: r2d2::Pool<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>> = todo!();
    /// let mut lock = pglock::TxLock::new(&pool, "billing")?;
    /// let mut guard = lock.lock()?;
    /// assert!(pglock::TxGuard::is_held(&mut guard)?);
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

    fn release(&mut self) -> Result<()> {
        self.lock.core.rollback(&mut self.lock.conn)
    }
}

impl<M> Deref for TxGuard<'_, M>
where
    M: ManageConnection<Connection = Client>,
{
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.lock.conn
    }
}

impl<M> DerefMut for TxGuard<'_, M>
where
    M: ManageConnection<Connection = Client>,
{
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.lock.conn
    }
}

impl<M> Drop for TxGuard<'_, M>
where
    M: ManageConnection<Connection = Client>,
{
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            warn!("{e}");
        }
    }
}

impl<M> fmt::Debug for TxGuard<'_, M>
where
    M: ManageConnection<Connection = Client>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TxGuard")
            .field("key", self.lock.core.key())
            .field("mode", &self.lock.core.mode())
            .field("held_for", &self.locked_at.elapsed())
            .finish()
    }
}
