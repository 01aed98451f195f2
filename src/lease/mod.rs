//! Lease locks: a row per name (and slot) in a table, renewed by heartbeats.
//!
//! Where an advisory lock lives in a database session, a lease lives in a row: it carries
//! an owner, a payload and a fencing token, it can be read by anyone as a row, it works
//! through any pooler (every statement is one stateless statement), and it expires by
//! itself when its holder stops renewing it. The price is time: a crashed holder's lease
//! is taken over only when it runs out, not at once.
//!
//! - [`LeaseLock`]: one holder at a time.
//! - [`LeaseSemaphore`]: up to N holders, each holding one slot.
//!
//! Both hand out a [`LeaseGuard`] and share [`LeaseOptions`] and [`LeaseTable`].
//!
//! Time is measured by the database only: expiry is stored and compared with the
//! server's `clock_timestamp()`; the holder counts its own deadline on its monotonic
//! clock from before each statement it sends, and never compares clocks with anybody.

mod engine;
mod guard;
mod options;
pub(crate) mod sql;
mod table;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use postgres::{Client, NoTls};
use r2d2::{ManageConnection, Pool};
use r2d2_postgres::PostgresConnectionManager;

pub use engine::LeaseHolder;
pub use guard::{LeaseGuard, LeaseWatch, OwnedLeaseGuard};
pub use options::LeaseOptions;
pub use table::LeaseTable;

use crate::wait::Limit;
use crate::{CancelHandle, Error, LockKey, Result};
use engine::{Shared, Spec};
use guard::Handle;

/// A lease's row, read without taking the lease ([`LeaseLock::read`],
/// [`LeaseSemaphore::read`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LeaseInfo {
    /// The slot (0 for a lease lock).
    pub slot: u32,
    /// The last holder's owner string.
    pub owner: String,
    /// The last acquisition's fencing token.
    pub token: i64,
    /// The last holder's lease length.
    pub lease: Duration,
    /// When it was taken, on the database's clock.
    pub acquired_at: SystemTime,
    /// When it was last renewed, on the database's clock.
    pub renewed_at: SystemTime,
    /// When it expires (or expired, or was released), on the database's clock.
    pub expires_at: SystemTime,
    /// The payload.
    pub data: Option<Vec<u8>>,
    /// Whether it is held now (not expired, not released).
    pub held: bool,
    /// How long it has left, as the server measured it (zero when not held).
    pub remaining: Duration,
}

/// A lease lock: one holder at a time for a name, kept in a table row and renewed by a
/// background heartbeat.
///
/// Use it where advisory locks do not fit: behind a transaction-mode pooler, when the
/// holder needs a fencing token or a payload, when the lock must be visible as a row, or
/// when it should outlive a connection blip (a lease survives a reconnect; an advisory
/// lock does not). See [`LeaseOptions`] for the lease length, heartbeat and the holder's
/// deadline, and [`LeaseTable`] for the table (create it once first).
///
/// The calls mirror the advisory locks': [`try_lock`](LeaseLock::try_lock),
/// [`lock`](LeaseLock::lock), [`try_lock_for`](LeaseLock::try_lock_for),
/// [`with_lock`](LeaseLock::with_lock), [`lock_owned`](LeaseLock::lock_owned). It does not
/// implement [`Locker`](crate::Locker), whose guard dereferences to the session holding
/// the lock: a lease is held by no session, and its guard keeps the lock's connection for
/// the heartbeats.
///
/// A lock uses one connection of its pool, checked out at its first call and kept (with
/// the heartbeats on it while a lease is held) until the lock and its guards are dropped.
///
/// # Examples
///
/// ```no_run
/// use pglock::{LeaseLock, LeaseTable};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let pool: r2d2::Pool<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>> = todo!();
/// LeaseTable::default().create(&mut *pool.get()?)?;
///
/// let mut lock = LeaseLock::new(&pool, "nightly-export")?;
/// if let Some(guard) = lock.try_lock()? {
///     for batch in 0..100 {
///         guard.check()?; // stop before anybody else can hold the lease
///         println!("batch {batch}, token {}", guard.token());
///     }
///     guard.unlock()?;
/// } else {
///     println!("busy: {:?}", lock.busy_with());
/// }
/// # Ok(())
/// # }
/// ```
pub struct LeaseLock<M = PostgresConnectionManager<NoTls>>
where
    M: ManageConnection<Connection = Client>,
{
    handle: Arc<Handle<M>>,
}

impl<M: ManageConnection<Connection = Client>> LeaseLock<M> {
    /// A lease lock on `name` with the default options. Nothing is sent to the server
    /// until the first call.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `name` is empty, longer than 1024 bytes, or contains
    /// a NUL character.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: r2d2::Pool<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>> = todo!();
    /// let lock = pglock::LeaseLock::new(&pool, "report")?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn new(pool: &Pool<M>, name: &str) -> Result<Self> {
        LeaseLock::with_options(pool, name, LeaseOptions::default())
    }

    /// A lease lock on `name` with `options`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a bad name (see [`new`](LeaseLock::new)) or options
    /// (see [`LeaseOptions`]: zero durations, a heartbeat not well below the lease...).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use pglock::{LeaseLock, LeaseOptions};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: r2d2::Pool<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>> = todo!();
    /// let options = LeaseOptions::new().lease(Duration::from_secs(5)).notify(true);
    /// let lock = LeaseLock::with_options(&pool, "report", options)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_options(pool: &Pool<M>, name: &str, options: LeaseOptions) -> Result<Self> {
        Self::with_slots(pool, name, 1, options)
    }

    fn with_slots(pool: &Pool<M>, name: &str, slots: u32, options: LeaseOptions) -> Result<Self> {
        let spec = Spec::new(name, slots, options)?;
        Ok(LeaseLock {
            handle: Arc::new(Handle(Shared::new(pool, spec))),
        })
    }

    fn shared(&self) -> &Arc<Shared<M>> {
        &self.handle.0
    }

    fn take(&self, limit: Limit) -> Result<Option<LeaseGuard<'static, M>>> {
        Ok(self
            .shared()
            .lock(limit)?
            .map(|(id, held)| LeaseGuard::new(Arc::clone(&self.handle), id, held)))
    }

    fn take_bounded(&self) -> Result<LeaseGuard<'static, M>> {
        let start = std::time::Instant::now();
        let limit = Limit::bounded_by(self.shared().spec.options.lock_timeout);
        self.take(limit)?.ok_or_else(|| {
            crate::metrics::timed_out("lease", self.key());
            Error::Timeout {
                key: self.key().clone(),
                waited: start.elapsed(),
            }
        })
    }

    /// Takes the lease if it is free (no row, or its lease ran out or was released). This
    /// function does not block (beyond the one statement).
    ///
    /// Returns `Ok(None)` if another holder has it; [`busy_with`](LeaseLock::busy_with)
    /// then says who, and for how long. A failed attempt writes nothing.
    ///
    /// # Errors
    ///
    /// [`Error::Cancelled`] if the lock was cancelled; [`Error::Pool`] or
    /// [`Error::Database`] if no connection could be had or the statement failed (for
    /// example, the table does not exist).
    pub fn try_lock(&mut self) -> Result<Option<LeaseGuard<'_, M>>> {
        self.take(Limit::Try)
    }

    /// Takes the lease, waiting until it is free or the lock's
    /// [`lock_timeout`](LeaseOptions::lock_timeout) passes.
    ///
    /// A waiter polls with jittered backoff within
    /// [`poll_interval`](LeaseOptions::poll_interval), wakes when the holder's lease runs
    /// out (the server says when), and with [`notify`](LeaseOptions::notify) when the
    /// holder releases it.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] if the bound passed; otherwise as for
    /// [`try_lock`](LeaseLock::try_lock).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: r2d2::Pool<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>> = todo!();
    /// let mut lock = pglock::LeaseLock::new(&pool, "report")?;
    /// let guard = lock.lock()?;
    /// // ... work, checking guard.is_valid() between steps ...
    /// guard.unlock()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn lock(&mut self) -> Result<LeaseGuard<'_, M>> {
        self.take_bounded()
    }

    /// Takes the lease, waiting at most `timeout`. A zero `timeout` makes one try.
    ///
    /// Returns `Ok(None)` if it was still held elsewhere when `timeout` passed.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `timeout` exceeds `i32::MAX` milliseconds; otherwise
    /// as for [`try_lock`](LeaseLock::try_lock).
    pub fn try_lock_for(&mut self, timeout: Duration) -> Result<Option<LeaseGuard<'_, M>>> {
        self.take(Limit::checked(self.key(), timeout)?)
    }

    /// Runs `work` while holding the lease, and releases it on every path (`Ok`, `Err`,
    /// panic). `work` receives the guard, to check [`is_valid`](LeaseGuard::is_valid)
    /// between steps or to [`fence`](LeaseGuard::fence) its writes.
    ///
    /// Blocks like [`lock`](LeaseLock::lock).
    ///
    /// # Errors
    ///
    /// The error of [`lock`](LeaseLock::lock); the error of `work`; or, if `work` succeeded
    /// but the lease was lost before the release ([`Error::LockLost`]) or the release
    /// failed, that error. If `work` failed and the release failed too, `work`'s error is
    /// returned and the release's is logged.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: r2d2::Pool<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>> = todo!();
    /// let mut lock = pglock::LeaseLock::new(&pool, "compaction")?;
    /// lock.with_lock(|lease| -> Result<(), pglock::Error> {
    ///     for step in 0..10 {
    ///         lease.check()?;
    ///         println!("step {step}");
    ///     }
    ///     Ok(())
    /// })?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_lock<R, E, F>(&mut self, work: F) -> Result<R, E>
    where
        F: FnOnce(&LeaseGuard<'_, M>) -> Result<R, E>,
        E: From<Error>,
    {
        let guard = self.take_bounded()?;
        let result = work(&guard);
        let released = guard.unlock();
        match (result, released) {
            (Ok(value), Ok(())) => Ok(value),
            (Ok(_), Err(e)) => Err(e.into()),
            (Err(e), Ok(())) => Err(e),
            (Err(e), Err(release)) => {
                log::warn!(
                    "lease {}: release after a failed section: {release}",
                    self.key()
                );
                Err(e)
            }
        }
    }

    /// Like [`lock`](LeaseLock::lock), but the guard owns the lock: `'static` and `Send`,
    /// for a leader that keeps its lease in a struct or another thread.
    ///
    /// # Errors
    ///
    /// As for [`lock`](LeaseLock::lock).
    pub fn lock_owned(self) -> Result<OwnedLeaseGuard<M>> {
        self.take_bounded()
    }

    /// Like [`try_lock`](LeaseLock::try_lock), but the guard owns the lock.
    ///
    /// # Errors
    ///
    /// As for [`try_lock`](LeaseLock::try_lock).
    pub fn try_lock_owned(self) -> Result<Option<OwnedLeaseGuard<M>>> {
        self.take(Limit::Try)
    }

    /// The lease's row, without taking it: who holds it (or held it last), until when,
    /// its token and payload. `None` if it was never taken (or was deleted).
    ///
    /// # Errors
    ///
    /// [`Error::Pool`] or [`Error::Database`].
    pub fn read(&self) -> Result<Option<LeaseInfo>> {
        Ok(self.shared().read()?.into_iter().find(|i| i.slot == 0))
    }

    /// Who held the lease when the last attempt of this lock found it busy (cleared when
    /// this lock takes it).
    pub fn busy_with(&self) -> Option<LeaseHolder> {
        self.shared().busy_with().clone()
    }

    /// Renews the lease held with `token`, without a guard: for a lease taken by another
    /// process (a guard that was leaked, or `pglock lease acquire`) whose holder kept only
    /// its fencing token. One statement, the one a guard's heartbeat sends; this function
    /// blocks only for it.
    ///
    /// Returns the lease length it was renewed for (the length stored in the row when it
    /// was taken), or `None` if the token does not hold the lease any more: it expired,
    /// was released, or was taken over. An expired lease is never renewed. It touches no
    /// guard of this lock.
    ///
    /// It knows the token alone, where a guard also knows its acquisition: after a
    /// failover that lost the last commits and handed the same token out again (see
    /// [`LeaseGuard::token`]), it renews the new holder's lease.
    ///
    /// # Errors
    ///
    /// [`Error::Pool`] or [`Error::Database`] if the statement could not be sent or
    /// failed (for example, it waited longer than the heartbeat period behind another
    /// session's lock on the row). The lease is then unchanged.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: r2d2::Pool<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>> = todo!();
    /// # let token: i64 = 42;
    /// let lock = pglock::LeaseLock::new(&pool, "deploy")?;
    /// match lock.renew_token(token)? {
    ///     Some(lease) => println!("renewed for {lease:?}"),
    ///     None => println!("token {token} no longer holds the lease"),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn renew_token(&self, token: i64) -> Result<Option<Duration>> {
        self.shared().renew(
            engine::Held {
                slot: 0,
                token,
                nonce: None,
            },
            None,
        )
    }

    /// Releases the lease held with `token`, without a guard (see
    /// [`renew_token`](LeaseLock::renew_token)): the statement a guard's
    /// [`unlock`](LeaseGuard::unlock) sends, keeping the row and its payload. This
    /// function blocks only for that statement.
    ///
    /// Returns true if released, false if the token did not hold the lease any more (it
    /// expired, was released, or was taken over). Like
    /// [`renew_token`](LeaseLock::renew_token), it knows the token alone.
    ///
    /// # Errors
    ///
    /// [`Error::Pool`] or [`Error::Database`] if the release could not be sent or failed;
    /// the lease then runs out by itself.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: r2d2::Pool<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>> = todo!();
    /// # let token: i64 = 42;
    /// let lock = pglock::LeaseLock::new(&pool, "deploy")?;
    /// if !lock.unlock_token(token)? {
    ///     eprintln!("the lease had already expired or changed hands");
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn unlock_token(&self, token: i64) -> Result<bool> {
        Ok(self.shared().release(
            engine::Held {
                slot: 0,
                token,
                nonce: None,
            },
            false,
        )? > 0)
    }

    /// A handle that cancels this lock's waits from another thread.
    pub fn cancel_handle(&self) -> CancelHandle {
        self.shared().cancel.handle()
    }

    /// The lease's key (its name and table).
    pub fn key(&self) -> &LockKey {
        &self.shared().spec.key
    }

    /// The lease's name.
    pub fn name(&self) -> &str {
        &self.shared().spec.name
    }

    /// The owner string this lock writes into the rows it takes.
    pub fn owner(&self) -> &str {
        &self.shared().spec.owner
    }
}

impl<M: ManageConnection<Connection = Client>> fmt::Debug for LeaseLock<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaseLock")
            .field("key", self.key())
            .field("owner", &self.owner())
            .finish_non_exhaustive()
    }
}

/// A lease semaphore: up to `permits` holders of a name at once, each holding one slot
/// (a row per slot), leased and heart-beaten like a [`LeaseLock`].
///
/// Taking a permit tries the slots starting at a random one, one statement each, until
/// one is free. Two programs that disagree on `permits` allow up to the larger number of
/// holders: the slots are `0..permits` of each.
///
/// # Examples
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let pool: r2d2::Pool<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>> = todo!();
/// let mut workers = pglock::LeaseSemaphore::new(&pool, "image-resizers", 4)?;
/// let permit = workers.lock()?;
/// println!("resizing in slot {}", permit.slot());
/// permit.unlock()?;
/// # Ok(())
/// # }
/// ```
pub struct LeaseSemaphore<M = PostgresConnectionManager<NoTls>>
where
    M: ManageConnection<Connection = Client>,
{
    inner: LeaseLock<M>,
}

impl<M: ManageConnection<Connection = Client>> LeaseSemaphore<M> {
    /// A semaphore of `permits` slots on `name`, with the default options.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a bad name or `permits` of zero or above `i32::MAX`.
    pub fn new(pool: &Pool<M>, name: &str, permits: u32) -> Result<Self> {
        Self::with_options(pool, name, permits, LeaseOptions::default())
    }

    /// A semaphore of `permits` slots on `name`, with `options`.
    ///
    /// # Errors
    ///
    /// As for [`new`](LeaseSemaphore::new), and for bad options.
    pub fn with_options(
        pool: &Pool<M>,
        name: &str,
        permits: u32,
        options: LeaseOptions,
    ) -> Result<Self> {
        Ok(LeaseSemaphore {
            inner: LeaseLock::with_slots(pool, name, permits, options)?,
        })
    }

    /// Takes a permit if one is free. This function does not block (beyond one statement
    /// per slot).
    ///
    /// # Errors
    ///
    /// As for [`LeaseLock::try_lock`].
    pub fn try_lock(&mut self) -> Result<Option<LeaseGuard<'_, M>>> {
        self.inner.try_lock()
    }

    /// Takes a permit, waiting until one is free or the
    /// [`lock_timeout`](LeaseOptions::lock_timeout) passes.
    ///
    /// # Errors
    ///
    /// As for [`LeaseLock::lock`].
    pub fn lock(&mut self) -> Result<LeaseGuard<'_, M>> {
        self.inner.lock()
    }

    /// Takes a permit, waiting at most `timeout`.
    ///
    /// # Errors
    ///
    /// As for [`LeaseLock::try_lock_for`].
    pub fn try_lock_for(&mut self, timeout: Duration) -> Result<Option<LeaseGuard<'_, M>>> {
        self.inner.try_lock_for(timeout)
    }

    /// Runs `work` while holding a permit, and releases it on every path.
    ///
    /// # Errors
    ///
    /// As for [`LeaseLock::with_lock`].
    pub fn with_lock<R, E, F>(&mut self, work: F) -> Result<R, E>
    where
        F: FnOnce(&LeaseGuard<'_, M>) -> Result<R, E>,
        E: From<Error>,
    {
        self.inner.with_lock(work)
    }

    /// Like [`lock`](LeaseSemaphore::lock), but the guard owns the semaphore.
    ///
    /// # Errors
    ///
    /// As for [`LeaseLock::lock`].
    pub fn lock_owned(self) -> Result<OwnedLeaseGuard<M>> {
        self.inner.lock_owned()
    }

    /// The rows of every slot that was ever taken.
    ///
    /// # Errors
    ///
    /// [`Error::Pool`] or [`Error::Database`].
    pub fn read(&self) -> Result<Vec<LeaseInfo>> {
        self.inner.shared().read()
    }

    /// Who held the slot that frees first, when the last attempt found every slot busy.
    pub fn busy_with(&self) -> Option<LeaseHolder> {
        self.inner.busy_with()
    }

    /// A handle that cancels this semaphore's waits from another thread.
    pub fn cancel_handle(&self) -> CancelHandle {
        self.inner.cancel_handle()
    }

    /// The number of permits.
    pub fn permits(&self) -> u32 {
        self.inner.shared().spec.slots
    }

    /// The semaphore's key (its name and table).
    pub fn key(&self) -> &LockKey {
        self.inner.key()
    }
}

impl<M: ManageConnection<Connection = Client>> fmt::Debug for LeaseSemaphore<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaseSemaphore")
            .field("key", self.key())
            .field("permits", &self.permits())
            .finish_non_exhaustive()
    }
}
