//! Leader election: one leader among replicas, on an advisory lock or a lease.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls};
use r2d2::{ManageConnection, Pool};
use r2d2_postgres::PostgresConnectionManager;

use crate::lease::{LeaseOptions, LeaseWatch, OwnedLeaseGuard};
use crate::{
    Error, LeaseLock, LockKey, LockMode, LockOptions, LostReason, OwnedSessionGuard, Result,
    SessionLock,
};

/// How often the advisory leader's watcher looks at its connection, and so the longest a
/// step-down waits for it.
const WATCH_SLICE: Duration = Duration::from_millis(50);

/// Leader election among replicas: at most one [`Leadership`] at a time for a name.
///
/// Two backends, with the trade-offs of the locks they use:
///
/// - [`Leader::advisory`]: a session advisory lock, held on a connection that a watcher
///   thread reads (without sending queries). A terminated session, a server restart or a
///   closed connection is seen within milliseconds; a network partition only when TCP
///   gives up (see the README on keepalives). Needs a direct connection.
/// - [`Leader::lease`]: a [`LeaseLock`]. Leadership is lost at the holder's own deadline
///   when heartbeats fail, so a paused or partitioned leader stops in time on its own
///   clock; works through transaction-mode poolers; a crashed leader is replaced only
///   when its lease runs out.
///
/// Each campaign uses a fresh lock (so a fresh connection when the last one died).
/// [`run`](Leader::run) campaigns, runs a periodic job while leader, and campaigns again
/// when leadership is lost.
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
/// let leader = pglock::Leader::advisory(&pool, "billing-scheduler")?;
/// if let Some(leadership) = leader.try_campaign()? {
///     while leadership.is_leader() {
///         // one step of leader-only work
///         if leadership.wait_lost(Duration::from_secs(1)) {
///             break;
///         }
///     }
///     leadership.step_down()?;
/// }
/// # Ok(())
/// # }
/// ```
pub struct Leader<M = PostgresConnectionManager<NoTls>>
where
    M: ManageConnection<Connection = Client>,
{
    pool: Pool<M>,
    /// The key (or lease name) of the election.
    key: LockKey,
    backend: Backend,
}

/// How long a campaign waits.
#[derive(Clone, Copy)]
enum Wait {
    /// One try.
    Try,
    /// Up to the options' `lock_timeout`.
    Options,
    /// Up to this long.
    For(Duration),
}

#[derive(Clone)]
enum Backend {
    Advisory { key: LockKey, options: LockOptions },
    Lease { name: String, options: LeaseOptions },
}

impl<M: ManageConnection<Connection = Client>> Leader<M> {
    /// A leader election on a session advisory lock on `key`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a name with a NUL character.
    pub fn advisory(pool: &Pool<M>, key: impl Into<LockKey>) -> Result<Self> {
        Self::advisory_with_options(pool, key, LockOptions::new())
    }

    /// A leader election on a session advisory lock with `options` (its
    /// [`lock_timeout`](LockOptions::lock_timeout) bounds [`campaign`](Leader::campaign);
    /// its wait mode applies).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a shared mode (two leaders), or for invalid options.
    pub fn advisory_with_options(
        pool: &Pool<M>,
        key: impl Into<LockKey>,
        options: LockOptions,
    ) -> Result<Self> {
        let key = key.into();
        if options.mode == LockMode::Shared {
            return Err(Error::InvalidArgument {
                key,
                message: "a leader election needs an exclusive lock".to_owned(),
            });
        }
        options.validate(&key)?;
        Ok(Leader {
            pool: pool.clone(),
            key: key.clone(),
            backend: Backend::Advisory { key, options },
        })
    }

    /// A leader election on a lease named `name`, with `options` (their
    /// [`lock_timeout`](LeaseOptions::lock_timeout) bounds [`campaign`](Leader::campaign)).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a bad name or options (see [`LeaseLock::with_options`]).
    pub fn lease(pool: &Pool<M>, name: &str, options: LeaseOptions) -> Result<Self> {
        // Validate now, with the lock's own checks.
        LeaseLock::with_options(pool, name, options.clone())?;
        Ok(Leader {
            pool: pool.clone(),
            key: LockKey::lease(&options.table.to_string(), name),
            backend: Backend::Lease {
                name: name.to_owned(),
                options,
            },
        })
    }

    /// Becomes leader if nobody is. This function does not block (beyond one statement).
    ///
    /// # Errors
    ///
    /// The errors of the lock's `try_lock_owned` ([`Error::Pool`], [`Error::Database`],
    /// [`Error::SessionShared`]...).
    pub fn try_campaign(&self) -> Result<Option<Leadership<M>>> {
        self.take(Wait::Try)
    }

    /// Becomes leader, waiting while another replica is, up to the options'
    /// `lock_timeout` (default: no bound).
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] if the bound passed; otherwise as for
    /// [`try_campaign`](Leader::try_campaign).
    pub fn campaign(&self) -> Result<Leadership<M>> {
        // A waiting take returns a leadership or an error, never `None`.
        self.take(Wait::Options)?.ok_or_else(|| Error::Timeout {
            key: self.key.clone(),
            waited: Duration::ZERO,
        })
    }

    /// Takes the election's lock, on a fresh lock (and so a fresh connection when the
    /// last one died). A wait that runs out is [`Error::Timeout`].
    fn take(&self, wait: Wait) -> Result<Option<Leadership<M>>> {
        macro_rules! take {
            ($lock:expr, $options:expr, $leadership:path) => {{
                let mut options = $options.clone();
                if let Wait::For(bound) = wait {
                    options = options.lock_timeout(bound);
                }
                let lock = $lock(options)?;
                let guard = match wait {
                    Wait::Try => lock.try_lock_owned()?,
                    Wait::Options | Wait::For(_) => Some(lock.lock_owned()?),
                };
                Ok(guard.map($leadership))
            }};
        }
        match &self.backend {
            Backend::Advisory { key, options } => take!(
                |o| SessionLock::with_options(&self.pool, key.clone(), o),
                options,
                Leadership::advisory
            ),
            Backend::Lease { name, options } => take!(
                |o| LeaseLock::with_options(&self.pool, name, o),
                options,
                Leadership::lease
            ),
        }
    }

    /// Runs `job` every `period` while this replica is leader, until `stop` is set or
    /// `job` fails: campaigns (waiting at most `period` at a time, so `stop` is seen),
    /// runs the job, waits `period` or until leadership is lost, and campaigns again on
    /// a fresh connection after a loss. Steps down when it returns.
    ///
    /// A job starts only while this replica is leader, but leadership can be lost while
    /// it runs, and another replica's job may then start before this one ends: long jobs
    /// should check [`Leadership::is_leader`] or [`Leadership::check`] between steps
    /// (and, on a lease, fence their writes with the token). Between jobs, a loss is
    /// noticed at once (advisory: when the connection reports it; lease: at the holder's
    /// deadline).
    ///
    /// # Errors
    ///
    /// The first error of `job`, or of a campaign that is not "someone else leads"
    /// (a loss is not an error: `run` campaigns again).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::sync::atomic::AtomicBool;
    /// use std::time::Duration;
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let stop = AtomicBool::new(false);
    /// let leader = pglock::Leader::advisory(&pool, "cleanup")?;
    /// leader.run(Duration::from_secs(60), &stop, |leadership| -> Result<(), pglock::Error> {
    ///     leadership.check()?;
    ///     println!("cleaning up, as the leader");
    ///     Ok(())
    /// })?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn run<E, F>(&self, period: Duration, stop: &AtomicBool, mut job: F) -> Result<(), E>
    where
        F: FnMut(&Leadership<M>) -> Result<(), E>,
        E: From<Error>,
    {
        let period = period.max(Duration::from_millis(1));
        while !stop.load(Ordering::SeqCst) {
            let leadership = match self.take(Wait::For(period)) {
                Ok(Some(leadership)) => leadership,
                Ok(None) | Err(Error::Timeout { .. }) => continue,
                Err(e) => return Err(e.into()),
            };
            log::info!("{}: leader", self.key());
            loop {
                if stop.load(Ordering::SeqCst) {
                    leadership.step_down()?;
                    return Ok(());
                }
                if let Err(e) = job(&leadership) {
                    if let Err(release) = leadership.step_down() {
                        log::warn!("{}: step down after a failed job: {release}", self.key());
                    }
                    return Err(e);
                }
                if leadership.wait_lost(period) {
                    log::warn!("{}: leadership lost; campaigning again", self.key());
                    // Releases what is left (a dead session, an expired lease).
                    let _ = leadership.step_down();
                    break;
                }
            }
        }
        Ok(())
    }

    /// The key (or lease name) of the election.
    pub fn key(&self) -> &LockKey {
        &self.key
    }
}

impl<M: ManageConnection<Connection = Client>> fmt::Debug for Leader<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leader")
            .field("key", &self.key())
            .finish_non_exhaustive()
    }
}

/// Loss signal of an advisory leadership, set by its watcher thread.
#[derive(Default)]
struct Lost {
    lost: Mutex<bool>,
    changed: Condvar,
}

impl Lost {
    fn set(&self) {
        *self.lost.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.changed.notify_all();
    }

    fn get(&self) -> bool {
        *self.lost.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait(&self, timeout: Duration) -> bool {
        let lost = self.lost.lock().unwrap_or_else(PoisonError::into_inner);
        let (lost, _) = self
            .changed
            .wait_timeout_while(lost, timeout, |lost| !*lost)
            .unwrap_or_else(PoisonError::into_inner);
        *lost
    }
}

/// Being the leader. Dropping it steps down (best effort); [`step_down`](Leadership::step_down)
/// reports errors.
#[must_use = "if unused, leadership is given up at once"]
pub struct Leadership<M = PostgresConnectionManager<NoTls>>
where
    M: ManageConnection<Connection = Client>,
{
    key: LockKey,
    kind: Kind<M>,
}

enum Kind<M: ManageConnection<Connection = Client>> {
    /// The watcher thread owns the guard while leadership lasts, and hands it back.
    Advisory {
        stop: Arc<AtomicBool>,
        lost: Arc<Lost>,
        watcher: Option<JoinHandle<Option<OwnedSessionGuard<M>>>>,
    },
    Lease {
        guard: Option<OwnedLeaseGuard<M>>,
        watch: LeaseWatch,
    },
}

impl<M: ManageConnection<Connection = Client>> Leadership<M> {
    fn advisory(mut guard: OwnedSessionGuard<M>) -> Self {
        let key = OwnedSessionGuard::key(&guard).clone();
        let stop = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(Lost::default());
        let (stop2, lost2, key2) = (Arc::clone(&stop), Arc::clone(&lost), key.clone());
        let spawned = thread::Builder::new()
            .name("pglock-leader".to_owned())
            .spawn(move || {
                // Reads the connection without sending anything: a terminated session's
                // FATAL message, or the socket closing, ends the wait at once.
                while !stop2.load(Ordering::SeqCst) {
                    let mut notifications = guard.notifications();
                    let next = notifications.timeout_iter(WATCH_SLICE).next();
                    drop(notifications);
                    if next.is_err() || guard.is_closed() {
                        log::warn!("leader {key2}: the session holding leadership ended");
                        lost2.set();
                        return None;
                    }
                }
                Some(guard)
            });
        let watcher = match spawned {
            Ok(handle) => Some(handle),
            Err(e) => {
                // No watcher: report leadership as lost rather than unwatched.
                log::warn!("leader {key}: no watcher thread ({e}); stepping down");
                lost.set();
                None
            }
        };
        Leadership {
            key,
            kind: Kind::Advisory {
                stop,
                lost,
                watcher,
            },
        }
    }

    fn lease(guard: OwnedLeaseGuard<M>) -> Self {
        let watch = guard.watch();
        Leadership {
            key: guard.key().clone(),
            kind: Kind::Lease {
                guard: Some(guard),
                watch,
            },
        }
    }

    /// Whether this replica may still act as leader. Reads local state only.
    pub fn is_leader(&self) -> bool {
        match &self.kind {
            Kind::Advisory { lost, .. } => !lost.get(),
            Kind::Lease { watch, .. } => watch.is_valid(),
        }
    }

    /// `Ok` while leader.
    ///
    /// # Errors
    ///
    /// [`Error::LockLost`] once leadership is lost.
    pub fn check(&self) -> Result<()> {
        if self.is_leader() {
            return Ok(());
        }
        Err(Error::LockLost {
            key: self.key.clone(),
            reason: match self.kind {
                Kind::Advisory { .. } => LostReason::SessionEnded,
                Kind::Lease { .. } => LostReason::LeaseExpired,
            },
            source: None,
        })
    }

    /// Blocks until leadership is lost or `timeout` passes; true if lost.
    pub fn wait_lost(&self, timeout: Duration) -> bool {
        match &self.kind {
            Kind::Advisory { lost, .. } => lost.wait(timeout),
            Kind::Lease { watch, .. } => watch.wait_lost(timeout),
        }
    }

    /// The election's key.
    pub fn key(&self) -> &LockKey {
        &self.key
    }

    /// Gives up leadership: releases the lock.
    ///
    /// # Errors
    ///
    /// [`Error::LockLost`] if leadership had been lost already; the release's errors.
    pub fn step_down(mut self) -> Result<()> {
        self.release()
    }

    fn release(&mut self) -> Result<()> {
        match &mut self.kind {
            Kind::Advisory {
                stop,
                lost,
                watcher,
            } => {
                let Some(watcher) = watcher.take() else {
                    return Ok(());
                };
                stop.store(true, Ordering::SeqCst);
                let start = Instant::now();
                let guard = watcher.join().ok().flatten();
                log::debug!(
                    "leader {}: watcher stopped in {:?}",
                    self.key,
                    start.elapsed()
                );
                match guard {
                    Some(guard) if !lost.get() => OwnedSessionGuard::unlock(guard),
                    Some(guard) => {
                        let _ = OwnedSessionGuard::unlock(guard);
                        Err(self.lost_error(LostReason::SessionEnded))
                    }
                    None => Err(self.lost_error(LostReason::SessionEnded)),
                }
            }
            Kind::Lease { guard, .. } => match guard.take() {
                Some(guard) => guard.unlock(),
                None => Ok(()),
            },
        }
    }

    fn lost_error(&self, reason: LostReason) -> Error {
        Error::LockLost {
            key: self.key.clone(),
            reason,
            source: None,
        }
    }
}

impl<M: ManageConnection<Connection = Client>> Drop for Leadership<M> {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            log::warn!("leader {}: step down on drop: {e}", self.key);
        }
    }
}

impl<M: ManageConnection<Connection = Client>> fmt::Debug for Leadership<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leadership")
            .field("key", &self.key)
            .field("is_leader", &self.is_leader())
            .finish()
    }
}
