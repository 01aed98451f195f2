//! The guard of a held lease, and a watch on it for other threads.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use postgres::{Client, NoTls};
use r2d2::ManageConnection;
use r2d2_postgres::PostgresConnectionManager;

use crate::lease::engine::{Held, Shared, Status};
use crate::{Error, LockKey, LostReason, Result};

/// Keeps a lease lock's heartbeat thread alive while the lock or any of its guards live.
pub(crate) struct Handle<M: ManageConnection<Connection = Client>>(pub(crate) Arc<Shared<M>>);

impl<M: ManageConnection<Connection = Client>> Drop for Handle<M> {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

/// A held lease (or one slot of a [`LeaseSemaphore`](crate::LeaseSemaphore)). Unlocks
/// when dropped.
///
/// Unlike an advisory guard, it does not dereference to a connection: a lease lives in a
/// table row, not in a session, so the critical section uses any connection it likes, and
/// the lock's own connection is reserved for the heartbeats, which application work then
/// cannot starve.
///
/// While it lives, a background thread renews the lease every
/// [`heartbeat`](crate::LeaseOptions::heartbeat). The holder trusts the lease until its
/// own monotonic deadline (see [`LeaseOptions`](crate::LeaseOptions)):
/// [`is_valid`](LeaseGuard::is_valid), [`remaining`](LeaseGuard::remaining),
/// [`check`](LeaseGuard::check) and [`watch`](LeaseGuard::watch) read it without a round
/// trip, so a long critical section can ask between steps, and stop before anybody else
/// can hold the lease. Once lost, a guard stays lost.
///
/// A guard that is leaked (`std::mem::forget`) is never released: its lock's heartbeat
/// renews the lease for as long as the process lives, as a leaked mutex guard stays
/// locked. Drop guards, or let the process exit (the lease then runs out).
///
/// `LeaseGuard<'static, M>` ([`OwnedLeaseGuard`]) is what
/// [`lock_owned`](crate::LeaseLock::lock_owned) returns: `Send`, no borrow of the lock.
#[must_use = "if unused the lease is released immediately"]
pub struct LeaseGuard<'a, M = PostgresConnectionManager<NoTls>>
where
    M: ManageConnection<Connection = Client>,
{
    handle: Option<Arc<Handle<M>>>,
    id: u64,
    held: Held,
    _lock: PhantomData<&'a mut ()>,
}

/// A lease guard that owns its lock: `'static` and `Send`.
pub type OwnedLeaseGuard<M = PostgresConnectionManager<NoTls>> = LeaseGuard<'static, M>;

impl<M: ManageConnection<Connection = Client>> LeaseGuard<'_, M> {
    pub(crate) fn new(handle: Arc<Handle<M>>, id: u64, held: Held) -> Self {
        LeaseGuard {
            handle: Some(handle),
            id,
            held,
            _lock: PhantomData,
        }
    }

    fn shared(&self) -> &Shared<M> {
        &self.handle.as_ref().expect("a live guard has its handle").0
    }

    /// The fencing token of this acquisition: drawn from the table's sequence when the
    /// lease was taken, fixed for the whole lease, and larger than the token of every
    /// earlier acquisition of any lease in the table. Pass it to the systems you write to,
    /// so that they can refuse a stale holder.
    ///
    /// On one primary, that is. A failover that loses the last commits (asynchronous
    /// replication) can lose the lease's row and the sequence's last WAL record with them:
    /// the new primary then hands the lease, and possibly the same token, to another
    /// holder while this one still trusts it (until its next heartbeat reports the loss:
    /// renewals, [`fence`](LeaseGuard::fence) and the release also check which
    /// acquisition holds the row, not only its token). Synchronous replication closes the
    /// window.
    pub fn token(&self) -> i64 {
        self.held.token
    }

    /// The slot this guard holds: 0 for a [`LeaseLock`](crate::LeaseLock), `0..permits`
    /// for a [`LeaseSemaphore`](crate::LeaseSemaphore).
    pub fn slot(&self) -> u32 {
        self.held.slot as u32
    }

    /// The lease's key (its name and table).
    pub fn key(&self) -> &LockKey {
        &self.shared().spec.key
    }

    /// How long the holder may still trust the lease: zero once it is lost. This function
    /// does not block or touch the network.
    pub fn remaining(&self) -> Duration {
        self.shared().status.remaining(self.id)
    }

    /// Whether the holder may still trust the lease. False once its deadline passed
    /// without a successful heartbeat, or the server reported it expired or taken over.
    pub fn is_valid(&self) -> bool {
        !self.remaining().is_zero()
    }

    /// `Ok` while the lease is valid.
    ///
    /// # Errors
    ///
    /// [`Error::LockLost`] with [`LostReason::LeaseExpired`] once it is not.
    pub fn check(&self) -> Result<()> {
        if self.is_valid() {
            Ok(())
        } else {
            Err(Error::LockLost {
                key: self.key().clone(),
                reason: LostReason::LeaseExpired,
                source: None,
            })
        }
    }

    /// A handle another thread can use to learn when this lease is lost.
    pub fn watch(&self) -> LeaseWatch {
        LeaseWatch {
            status: Arc::clone(&self.shared().status),
            id: self.id,
            key: self.key().clone(),
        }
    }

    /// Fences writes made in the caller's own transaction against a stale holder: checks
    /// in the database that this acquisition still holds the lease (its token, not
    /// expired), and locks the lease's row `FOR SHARE` until the caller's transaction
    /// ends, so no other holder can take the lease over before those writes commit.
    ///
    /// Call it inside a transaction (a [`postgres::Transaction`], or after `BEGIN`), on
    /// the connection that does the writes, before them; outside a transaction the row
    /// lock ends with the statement and fences nothing. While the row lock is held, this
    /// lease's own heartbeat (and any takeover) waits for the transaction to end, so keep
    /// fenced transactions shorter than the heartbeat period, or the holder's deadline
    /// may pass and the guard report the lease lost even though the writes committed
    /// safely.
    ///
    /// # Errors
    ///
    /// [`Error::LockLost`] if the lease is no longer this acquisition's (roll the
    /// transaction back: its writes must not commit); [`Error::Database`] if the
    /// statement failed.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: r2d2::Pool<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>> = todo!();
    /// let mut lock = pglock::LeaseLock::new(&pool, "billing-run")?;
    /// let guard = lock.lock()?;
    /// let mut conn = pool.get()?;
    /// let mut tx = conn.transaction()?;
    /// guard.fence(&mut tx)?;
    /// tx.execute("UPDATE invoices SET sent = true WHERE batch = $1", &[&42_i32])?;
    /// tx.commit()?;
    /// guard.unlock()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn fence(&self, client: &mut impl postgres::GenericClient) -> Result<()> {
        self.shared().fence(self.id, self.held, client)
    }

    /// Renews the lease now, on the calling thread, with the heartbeat's statement (for
    /// example before a step that must not be interrupted). The background heartbeat goes
    /// on as before.
    ///
    /// # Errors
    ///
    /// [`Error::LockLost`] if the lease was already lost or the server found it expired
    /// or taken over (it then stays lost); [`Error::Pool`] or [`Error::Database`] if the
    /// statement could not be sent (the lease is then unchanged, and the heartbeat keeps
    /// trying).
    pub fn renew(&self) -> Result<()> {
        self.shared().renew_now(self.id, self.held)
    }

    /// Releases the lease, keeping its row (and payload) for the next holder: the same as
    /// dropping the guard, but reports the error.
    ///
    /// # Errors
    ///
    /// [`Error::LockLost`] if the lease was lost before (its deadline passed, or the
    /// server found it expired or taken over): the critical section may have overlapped
    /// another holder's. [`Error::Pool`] or [`Error::Database`] if the release could not
    /// be sent (it is retried once on a fresh connection); the lease then runs out by
    /// itself within its length.
    pub fn unlock(mut self) -> Result<()> {
        self.release(false)
    }

    /// Releases the lease and deletes its row (and payload).
    ///
    /// # Errors
    ///
    /// As for [`unlock`](LeaseGuard::unlock).
    pub fn unlock_and_delete(mut self) -> Result<()> {
        self.release(true)
    }

    fn release(&mut self, delete: bool) -> Result<()> {
        match self.handle.take() {
            Some(handle) => handle.0.unlock(self.id, self.held, delete),
            None => Ok(()),
        }
    }
}

impl<M: ManageConnection<Connection = Client>> Drop for LeaseGuard<'_, M> {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            if let Err(e) = handle.0.unlock(self.id, self.held, false) {
                log::warn!("lease {}: release on drop failed: {e}", handle.0.spec.key);
            }
        }
    }
}

impl<M: ManageConnection<Connection = Client>> fmt::Debug for LeaseGuard<'_, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaseGuard")
            .field("key", self.key())
            .field("slot", &self.held.slot)
            .field("token", &self.held.token)
            .field("remaining", &self.remaining())
            .finish()
    }
}

/// Learns, from another thread, when a held lease is lost. Made by
/// [`LeaseGuard::watch`]; cheap to clone; reads local state only.
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let pool: r2d2::Pool<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>> = todo!();
/// let mut lock = pglock::LeaseLock::new(&pool, "exporter")?;
/// let guard = lock.lock()?;
/// let watch = guard.watch();
/// std::thread::spawn(move || {
///     if watch.wait_lost(Duration::from_secs(3600)) {
///         eprintln!("lease lost: stop exporting");
///     }
/// });
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct LeaseWatch {
    status: Arc<Status>,
    id: u64,
    key: LockKey,
}

impl LeaseWatch {
    /// Whether the lease is still valid (false once lost or released).
    pub fn is_valid(&self) -> bool {
        !self.remaining().is_zero()
    }

    /// How long the holder may still trust the lease: zero once lost or released.
    pub fn remaining(&self) -> Duration {
        self.status.remaining(self.id)
    }

    /// Blocks until the lease is lost or released, or `timeout` passes. Returns true if
    /// it was lost or released.
    pub fn wait_lost(&self, timeout: Duration) -> bool {
        self.status.wait_lost(self.id, timeout)
    }

    /// The lease's key.
    pub fn key(&self) -> &LockKey {
        &self.key
    }
}

impl fmt::Debug for LeaseWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaseWatch")
            .field("key", &self.key)
            .field("remaining", &self.remaining())
            .finish()
    }
}
