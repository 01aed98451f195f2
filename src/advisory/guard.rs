//! The guards of the advisory locks: borrowed ([`AdvisoryGuard`]) and owned
//! ([`OwnedAdvisoryGuard`]), and the savepoint a transaction lock's critical section
//! nests its work in ([`TxSavepoint`]).

use std::fmt;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::time::Instant;

use log::{debug, warn};
use postgres::{Client, NoTls};
use r2d2::{ManageConnection, PooledConnection};
use r2d2_postgres::PostgresConnectionManager;

use super::engine::Core;
use super::raw::sealed::Unlocks;
use super::{RawAdvisory, RawTx};
use crate::{LockKey, Result};

/// Holds an advisory lock; releases it when dropped: [`SessionGuard`](crate::SessionGuard)
/// unlocks, [`TxGuard`](crate::TxGuard) rolls its transaction back.
///
/// Derefs to the lock's connection, so the critical section runs SQL on the session that
/// holds the lock. Its own operations are associated functions (`SessionGuard::unlock(g)`)
/// so that they never shadow the connection's methods; the one exception is
/// [`TxGuard::transaction`](AdvisoryGuard::transaction), which shadows
/// [`Client::transaction`] on purpose.
///
/// `let _ = lock.lock()?;` releases at once; `let _guard = lock.lock()?;` holds the lock
/// to the end of the scope.
///
/// Do not end the session's advisory locks by other means in the critical section
/// (`pg_advisory_unlock_all()`, `DISCARD ALL`): the unlock then reports
/// [`Error::LockLost`](crate::Error::LockLost).
///
/// A session lock's critical section that begins a transaction with raw SQL and leaves it
/// open has it rolled back at unlock, so the connection never goes back to the pool inside
/// one; a healthy transaction rolled back that way is reported as
/// [`Error::TransactionLeftOpen`](crate::Error::TransactionLeftOpen), since its work is
/// lost.
#[must_use = "if unused the lock is released immediately"]
pub struct AdvisoryGuard<'a, S: RawAdvisory, M = PostgresConnectionManager<NoTls>>
where
    M: ManageConnection<Connection = Client>,
{
    conn: &'a mut PooledConnection<M>,
    core: &'a mut Core<S>,
    locked_at: Instant,
    /// The critical section had mutable access to the connection, so it may have left a
    /// transaction open or changed settings.
    used: bool,
}

impl<'a, S: RawAdvisory, M> AdvisoryGuard<'a, S, M>
where
    M: ManageConnection<Connection = Client>,
{
    pub(crate) fn new(conn: &'a mut PooledConnection<M>, core: &'a mut Core<S>) -> Self {
        AdvisoryGuard {
            conn,
            core,
            locked_at: Instant::now(),
            used: false,
        }
    }

    /// Asks the server whether this session still holds the lock: it may have been freed
    /// because the session was terminated (by an administrator, `idle_session_timeout`, a
    /// failover) or the lock was unlocked behind pglock's back.
    ///
    /// One round trip. A closed connection answers `Ok(false)`.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database) if the server could not answer (for
    /// example, the critical section left a failed transaction open).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
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
        // A statement ran in the lock's transaction: should it have failed, the commit
        // must see that.
        this.used = true;
        this.core.is_held(this.conn)
    }

    /// The lock's key (a semaphore's: slot 0's, labelled with its name; a lock set's: its
    /// first key, labelled as the set).
    pub fn key(this: &Self) -> &LockKey {
        this.core.key()
    }

    pub(super) fn core(&self) -> &Core<S> {
        self.core
    }

    /// Ends the guard: unlocks, commits (`success`) or rolls back.
    pub(crate) fn finish(self, success: bool) -> Result<()> {
        let mut this = ManuallyDrop::new(self);
        let held_for = this.locked_at.elapsed();
        let AdvisoryGuard {
            conn, core, used, ..
        } = &mut *this;
        let result = core.finish(conn, *used, success);
        if result.is_ok() {
            debug!("held {} for {held_for:?}", core.key());
            crate::metrics::released(Core::<S>::metric_kind(), core.key(), held_for);
        }
        result
    }
}

impl<S: Unlocks + RawAdvisory, M> AdvisoryGuard<'_, S, M>
where
    M: ManageConnection<Connection = Client>,
{
    /// Unlocks (a semaphore's permit: releases its slot and wakes the waiters; a lock
    /// set's guard: every key). The same as dropping the guard, but reports the error.
    ///
    /// One round trip.
    ///
    /// # Errors
    ///
    /// [`Error::LockLost`](crate::Error::LockLost) if the lock was already gone: the
    /// session ended, or the server said this session did not hold it.
    /// [`Error::TransactionLeftOpen`](crate::Error::TransactionLeftOpen) if the critical
    /// section left a transaction open (it was rolled back; the lock was released).
    /// [`Error::SessionShared`](crate::Error::SessionShared) if a transaction-mode pooler
    /// sent the unlock to another client's server session.
    /// [`Error::Database`](crate::Error::Database) if the unlock failed; pglock then ended
    /// the database session, which frees the lock.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let mut lock = pglock::SessionLock::new(&pool, "nightly-report")?;
    /// let guard = lock.lock()?;
    /// pglock::SessionGuard::unlock(guard)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn unlock(this: Self) -> Result<()> {
        this.finish(false)
    }
}

impl<M> AdvisoryGuard<'_, RawTx, M>
where
    M: ManageConnection<Connection = Client>,
{
    /// Commits the transaction, which also releases the lock. One round trip.
    ///
    /// Before `COMMIT`, a check in the same round trip makes sure the transaction is still
    /// the lock's: if the critical section ended it (with `COMMIT`, `ROLLBACK`, or
    /// `Client::transaction` reached through the deref) and perhaps began another, nothing
    /// of what ran since is committed.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database) if the commit failed (a serialization
    /// failure, a deferred constraint, a statement in the critical section that failed and
    /// left the transaction aborted); the transaction was then rolled back and the lock
    /// released. [`Error::LockLost`](crate::Error::LockLost) if the transaction had already
    /// been ended inside the critical section (what ran after that was rolled back, unless
    /// it ran outside any transaction), or the session ended before the commit was sent.
    /// [`Error::CommitOutcomeUnknown`](crate::Error::CommitOutcomeUnknown) if the
    /// connection broke while the commit was on its way: it may or may not have committed.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let mut lock = pglock::TxLock::new(&pool, "billing")?;
    /// let mut guard = lock.lock()?;
    /// guard.execute("UPDATE accounts SET frozen = true WHERE id = 1", &[])?;
    /// pglock::TxGuard::commit(guard)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn commit(this: Self) -> Result<()> {
        this.finish(true)
    }

    /// Rolls the transaction back, which also releases the lock. The same as dropping the
    /// guard, but reports the error. One round trip.
    ///
    /// # Errors
    ///
    /// [`Error::LockLost`](crate::Error::LockLost) if the session had ended (the work and
    /// the lock are gone with it); [`Error::Database`](crate::Error::Database) if the
    /// rollback failed, after which pglock ended the session.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let mut lock = pglock::TxLock::new(&pool, "billing")?;
    /// let guard = lock.lock()?;
    /// pglock::TxGuard::rollback(guard)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn rollback(this: Self) -> Result<()> {
        this.finish(false)
    }

    /// Opens a savepoint inside the lock's transaction: the safe form of
    /// [`Client::transaction`], which this method shadows on purpose (that one would send
    /// a second `BEGIN`, which does nothing, and then a `COMMIT` that ends the lock).
    ///
    /// The savepoint rolls back when dropped, unless [committed](TxSavepoint::commit);
    /// rolling it back never releases the lock, which was taken before it.
    ///
    /// # Errors
    ///
    /// The error of `SAVEPOINT`, for example in a failed transaction.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let mut lock = pglock::TxLock::new(&pool, "billing")?;
    /// let mut guard = lock.lock()?;
    /// let mut step = guard.transaction()?;
    /// step.execute("UPDATE accounts SET frozen = true WHERE id = 1", &[])?;
    /// step.commit()?; // releases the savepoint; the lock's transaction goes on
    /// pglock::TxGuard::commit(guard)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn transaction(&mut self) -> std::result::Result<TxSavepoint<'_>, postgres::Error> {
        TxSavepoint::open(self, 1)
    }
}

impl<S: RawAdvisory, M> Deref for AdvisoryGuard<'_, S, M>
where
    M: ManageConnection<Connection = Client>,
{
    type Target = Client;

    fn deref(&self) -> &Client {
        self.conn
    }
}

impl<S: RawAdvisory, M> DerefMut for AdvisoryGuard<'_, S, M>
where
    M: ManageConnection<Connection = Client>,
{
    fn deref_mut(&mut self) -> &mut Client {
        // Every query method of `Client` takes `&mut self`: only through here can the
        // critical section open a transaction or change a setting.
        self.used = true;
        self.conn
    }
}

impl<S: RawAdvisory, M> Drop for AdvisoryGuard<'_, S, M>
where
    M: ManageConnection<Connection = Client>,
{
    fn drop(&mut self) {
        if let Err(e) = self.core.release(self.conn, self.used) {
            warn!("{e}");
        }
    }
}

impl<S: RawAdvisory, M> fmt::Debug for AdvisoryGuard<'_, S, M>
where
    M: ManageConnection<Connection = Client>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdvisoryGuard")
            .field("kind", &S::KIND)
            .field("key", self.core.key())
            .field("mode", &self.core.mode())
            .field("held_for", &self.locked_at.elapsed())
            .finish()
    }
}

/// An advisory lock's guard that owns the lock's connection: `'static` and `Send`, so it
/// can live in a struct or move to another thread. Made by
/// [`lock_owned`](crate::AdvisoryLock::lock_owned) and
/// [`try_lock_owned`](crate::AdvisoryLock::try_lock_owned); releases like
/// [`AdvisoryGuard`] when dropped, and then gives the connection back to the pool.
#[must_use = "if unused the lock is released immediately"]
pub struct OwnedAdvisoryGuard<S: RawAdvisory, M = PostgresConnectionManager<NoTls>>
where
    M: ManageConnection<Connection = Client>,
{
    conn: PooledConnection<M>,
    core: Core<S>,
    locked_at: Instant,
    used: bool,
}

impl<S: RawAdvisory, M> OwnedAdvisoryGuard<S, M>
where
    M: ManageConnection<Connection = Client>,
{
    pub(crate) fn new(conn: PooledConnection<M>, core: Core<S>) -> Self {
        OwnedAdvisoryGuard {
            conn,
            core,
            locked_at: Instant::now(),
            used: false,
        }
    }

    /// Asks the server whether this session still holds the lock. One round trip; a
    /// closed connection answers `Ok(false)`.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database) if the server could not answer.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let mut guard = pglock::SessionLock::new(&pool, "leader")?.lock_owned()?;
    /// assert!(pglock::OwnedSessionGuard::is_held(&mut guard)?);
    /// # Ok(())
    /// # }
    /// ```
    pub fn is_held(this: &mut Self) -> Result<bool> {
        this.used = true;
        this.core.is_held(&mut this.conn)
    }

    /// The lock's key (as [`AdvisoryGuard::key`]).
    pub fn key(this: &Self) -> &LockKey {
        this.core.key()
    }

    pub(super) fn core(&self) -> &Core<S> {
        &self.core
    }

    fn finish(mut self, success: bool) -> Result<()> {
        let held_for = self.locked_at.elapsed();
        let result = self.core.finish(&mut self.conn, self.used, success);
        if result.is_ok() {
            debug!("held {} for {held_for:?}", self.core.key());
            crate::metrics::released(Core::<S>::metric_kind(), self.core.key(), held_for);
        }
        result
    }
}

impl<S: Unlocks + RawAdvisory, M> OwnedAdvisoryGuard<S, M>
where
    M: ManageConnection<Connection = Client>,
{
    /// Unlocks, as [`SessionGuard::unlock`](AdvisoryGuard::unlock) does, and gives the
    /// connection back to the pool.
    ///
    /// # Errors
    ///
    /// As for [`SessionGuard::unlock`](AdvisoryGuard::unlock).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let guard = pglock::SessionLock::new(&pool, "leader")?.lock_owned()?;
    /// pglock::OwnedSessionGuard::unlock(guard)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn unlock(this: Self) -> Result<()> {
        this.finish(false)
    }
}

impl<M> OwnedAdvisoryGuard<RawTx, M>
where
    M: ManageConnection<Connection = Client>,
{
    /// Commits, as [`TxGuard::commit`](AdvisoryGuard::commit) does.
    ///
    /// # Errors
    ///
    /// As for [`TxGuard::commit`](AdvisoryGuard::commit).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let guard = pglock::TxLock::new(&pool, "billing")?.lock_owned()?;
    /// pglock::OwnedTxGuard::commit(guard)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn commit(this: Self) -> Result<()> {
        this.finish(true)
    }

    /// Rolls back, as [`TxGuard::rollback`](AdvisoryGuard::rollback) does.
    ///
    /// # Errors
    ///
    /// As for [`TxGuard::rollback`](AdvisoryGuard::rollback).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let guard = pglock::TxLock::new(&pool, "billing")?.lock_owned()?;
    /// pglock::OwnedTxGuard::rollback(guard)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn rollback(this: Self) -> Result<()> {
        this.finish(false)
    }

    /// Opens a savepoint inside the lock's transaction, as
    /// [`TxGuard::transaction`](AdvisoryGuard::transaction) does.
    ///
    /// # Errors
    ///
    /// The error of `SAVEPOINT`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let mut guard = pglock::TxLock::new(&pool, "billing")?.lock_owned()?;
    /// guard.transaction()?.commit()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn transaction(&mut self) -> std::result::Result<TxSavepoint<'_>, postgres::Error> {
        TxSavepoint::open(self, 1)
    }
}

impl<S: RawAdvisory, M> Deref for OwnedAdvisoryGuard<S, M>
where
    M: ManageConnection<Connection = Client>,
{
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.conn
    }
}

impl<S: RawAdvisory, M> DerefMut for OwnedAdvisoryGuard<S, M>
where
    M: ManageConnection<Connection = Client>,
{
    fn deref_mut(&mut self) -> &mut Client {
        self.used = true;
        &mut self.conn
    }
}

impl<S: RawAdvisory, M> Drop for OwnedAdvisoryGuard<S, M>
where
    M: ManageConnection<Connection = Client>,
{
    fn drop(&mut self) {
        if let Err(e) = self.core.release(&mut self.conn, self.used) {
            warn!("{e}");
        }
        // The connection goes back to the pool now.
        S::leave(&mut self.core, &mut self.conn);
    }
}

impl<S: RawAdvisory, M> fmt::Debug for OwnedAdvisoryGuard<S, M>
where
    M: ManageConnection<Connection = Client>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnedAdvisoryGuard")
            .field("kind", &S::KIND)
            .field("key", self.core.key())
            .field("mode", &self.core.mode())
            .field("held_for", &self.locked_at.elapsed())
            .finish()
    }
}

/// A savepoint inside a transaction lock's transaction, from
/// [`TxGuard::transaction`](AdvisoryGuard::transaction): derefs to the connection, rolls
/// back to the savepoint when dropped unless committed. Nested calls nest savepoints.
#[must_use = "if unused the savepoint rolls back immediately"]
pub struct TxSavepoint<'a> {
    client: &'a mut Client,
    depth: u32,
    done: bool,
}

impl<'a> TxSavepoint<'a> {
    fn open(client: &'a mut Client, depth: u32) -> std::result::Result<Self, postgres::Error> {
        client.batch_execute(&format!("SAVEPOINT pglock_savepoint_{depth}"))?;
        Ok(TxSavepoint {
            client,
            depth,
            done: false,
        })
    }

    /// Keeps the savepoint's work in the lock's transaction (`RELEASE SAVEPOINT`).
    ///
    /// # Errors
    ///
    /// The error of `RELEASE SAVEPOINT`, for example in a failed transaction.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let mut lock = pglock::TxLock::new(&pool, "billing")?;
    /// let mut guard = lock.lock()?;
    /// guard.transaction()?.commit()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn commit(mut self) -> std::result::Result<(), postgres::Error> {
        self.done = true;
        let depth = self.depth;
        self.client
            .batch_execute(&format!("RELEASE SAVEPOINT pglock_savepoint_{depth}"))
    }

    /// Undoes the savepoint's work; the lock's transaction goes on. The same as dropping
    /// it, but reports the error.
    ///
    /// # Errors
    ///
    /// The error of `ROLLBACK TO SAVEPOINT`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let mut lock = pglock::TxLock::new(&pool, "billing")?;
    /// let mut guard = lock.lock()?;
    /// guard.transaction()?.rollback()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn rollback(mut self) -> std::result::Result<(), postgres::Error> {
        self.done = true;
        self.roll_back()
    }

    /// Opens a savepoint nested in this one.
    ///
    /// # Errors
    ///
    /// The error of `SAVEPOINT`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let mut lock = pglock::TxLock::new(&pool, "billing")?;
    /// let mut guard = lock.lock()?;
    /// let mut outer = guard.transaction()?;
    /// outer.transaction()?.commit()?;
    /// outer.commit()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn transaction(&mut self) -> std::result::Result<TxSavepoint<'_>, postgres::Error> {
        TxSavepoint::open(self.client, self.depth + 1)
    }

    fn roll_back(&mut self) -> std::result::Result<(), postgres::Error> {
        let depth = self.depth;
        self.client.batch_execute(&format!(
            "ROLLBACK TO SAVEPOINT pglock_savepoint_{depth}; \
             RELEASE SAVEPOINT pglock_savepoint_{depth}"
        ))
    }
}

impl Deref for TxSavepoint<'_> {
    type Target = Client;

    fn deref(&self) -> &Client {
        self.client
    }
}

impl DerefMut for TxSavepoint<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.client
    }
}

impl Drop for TxSavepoint<'_> {
    fn drop(&mut self) {
        if !self.done {
            if let Err(e) = self.roll_back() {
                warn!("rolling back savepoint {} failed: {e}", self.depth);
            }
        }
    }
}

impl fmt::Debug for TxSavepoint<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TxSavepoint")
            .field("depth", &self.depth)
            .finish_non_exhaustive()
    }
}
