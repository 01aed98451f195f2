//! The trait both lock types implement.

use std::ops::DerefMut;
use std::time::Duration;

use postgres::Client;

use crate::{CancelHandle, Error, LockKey, LockMode, Result};

pub(crate) mod sealed {
    pub trait Sealed {}
}

/// A PostgreSQL advisory lock on one checked-out connection:
/// [`SessionLock`](crate::SessionLock) or [`TxLock`](crate::TxLock).
///
/// The trait lets code take either kind of lock; each type also has the same methods
/// inherently, so calling them needs no import. It is sealed: it cannot be implemented
/// outside this crate, so it can grow.
///
/// A lock hands out one guard at a time (the methods take `&mut self`); the guard
/// dereferences to the lock's [`postgres::Client`], so the critical section runs its SQL on
/// the session that holds the lock.
///
/// # Examples
///
/// ```no_run
/// use pglock::{Error, Locker};
///
/// /// Runs `job` once, under whichever lock the caller chose.
/// fn run_exclusively<L: Locker>(lock: &mut L, job: &str) -> Result<u64, Error> {
///     lock.with_lock(|conn| {
///         let rows = conn.execute("UPDATE jobs SET runs = runs + 1 WHERE name = $1", &[&job]);
///         rows.map_err(|source| Error::Database {
///             key: pglock::LockKey::from_name(job),
///             operation: "job",
///             source,
///         })
///     })
/// }
/// ```
pub trait Locker: sealed::Sealed {
    /// The RAII guard: the lock is held while it lives. It dereferences to the connection.
    type Guard<'a>: DerefMut<Target = Client>
    where
        Self: 'a;

    /// The lock's key.
    fn key(&self) -> &LockKey;

    /// Exclusive or shared.
    fn mode(&self) -> LockMode;

    /// Takes the lock if it is free. This function does not block.
    ///
    /// Returns `Ok(None)` if the lock is held elsewhere: contention is not an error.
    ///
    /// # Errors
    ///
    /// [`Error::Cancelled`] if the lock was cancelled; [`Error::LockTableFull`] or
    /// [`Error::Database`] if the server or the connection failed.
    fn try_lock(&mut self) -> Result<Option<Self::Guard<'_>>>;

    /// Takes the lock, blocking until it is free or the lock's
    /// [`lock_timeout`](crate::LockOptions::lock_timeout) passes.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] if the bound passed; [`Error::Cancelled`] if the wait was
    /// cancelled; [`Error::Deadlock`] if the server found this wait in a deadlock;
    /// [`Error::LockTableFull`] or [`Error::Database`] if the server or the connection
    /// failed.
    fn lock(&mut self) -> Result<Self::Guard<'_>>;

    /// Takes the lock, blocking at most `timeout`. A zero `timeout` makes one try.
    ///
    /// Returns `Ok(None)` if the lock was still held elsewhere when `timeout` passed.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `timeout` exceeds PostgreSQL's `lock_timeout` limit
    /// (`i32::MAX` ms); otherwise as for [`lock`](Locker::lock).
    fn try_lock_for(&mut self, timeout: Duration) -> Result<Option<Self::Guard<'_>>>;

    /// Runs `work` while holding the lock, and releases it on every path: when `work`
    /// returns `Ok` or `Err`, and when it panics (the panic then continues).
    ///
    /// Blocks like [`lock`](Locker::lock). A [`TxLock`](crate::TxLock) commits its
    /// transaction when `work` returns `Ok`, and rolls it back otherwise.
    ///
    /// # Errors
    ///
    /// The error of [`lock`](Locker::lock); the error of `work`; or, if `work` succeeded
    /// but the release failed (the lock was lost, the commit failed), that error. If `work`
    /// failed and the release failed too, `work`'s error is returned and the release's is
    /// logged.
    fn with_lock<'a, R, E, F>(&'a mut self, work: F) -> Result<R, E>
    where
        F: FnOnce(&mut Self::Guard<'a>) -> Result<R, E>,
        E: From<Error>;

    /// A handle that cancels this lock's waits from another thread.
    fn cancel_handle(&self) -> CancelHandle;
}
