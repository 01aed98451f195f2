//! A named counting semaphore on session advisory locks: N slots, each a lock of its own.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::time::{Duration, Instant};

use log::{debug, warn};
use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls};
use r2d2::{ManageConnection, Pool, PooledConnection};
use r2d2_postgres::PostgresConnectionManager;

use super::coord::{self, Cancel, Link};
use super::coord_sql as sql;
use crate::error::Failure;
use crate::wait::{self, Limit, Outcome};
use crate::{CancelHandle, Error, LockKey, LockMode, LockOptions, Result, WaitMode};

/// The most slots a semaphore may have: see [`AdvisorySemaphore::MAX_PERMITS`].
const MAX_PERMITS: u32 = 1024;

/// How often a waiter tries every slot again when no release notified it: the bound on
/// how long a slot freed without a notification (its holder's session died) stays unseen.
const RECHECK: Duration = Duration::from_millis(100);

/// How often a waiter looks at its cancel flag while it waits for a notification.
const CANCEL_SLICE: Duration = Duration::from_millis(20);

/// A named semaphore with `N` permits on session advisory locks: at most `N` sessions in
/// the whole cluster hold a permit at once.
///
/// Slot `i` (for `i` in `0..N`) is the advisory lock on the two-integer key
/// `(base, i)`, where `base` is the high 32 bits of the name's 64-bit key:
///
/// ```sql
/// -- base of the semaphore 'exports': the same in every language
/// SELECT (hashtextextended('exports', 0) >> 32)::int;
/// -- take slot 2 from psql, and give it back (notifying the waiters)
/// SELECT pg_try_advisory_lock((hashtextextended('exports', 0) >> 32)::int, 2);
/// SELECT pg_advisory_unlock((hashtextextended('exports', 0) >> 32)::int, 2),
///        pg_notify('pglock_semaphore_' || (hashtextextended('exports', 0) >> 32)::int, '');
/// ```
///
/// Pair keys live in their own key space on the server, so a slot can never be the lock of
/// a [`LockKey::from_name`] or `i64` key. It can be the lock of a `(i32, i32)` key you
/// choose yourself, and two semaphores whose names share the high 32 bits of their hash
/// share their slots (probability about `n² / 2³³` for `n` names).
///
/// # Holding a permit
///
/// [`try_lock`](AdvisorySemaphore::try_lock) tries every slot in one statement (starting
/// at a random slot, stopping at the first free one) and never blocks. A permit is a
/// [`SemaphorePermit`], which derefs to the semaphore's connection like the advisory
/// locks' guards (the critical section usually has SQL to run, and runs it on the session
/// that holds the slot); it releases the slot when dropped. Like a session lock, a slot is
/// freed by the server when the holder's session ends: a crashed holder's permit comes
/// back by itself.
///
/// # Waiting
///
/// The server cannot wait for "any one of N locks", so a blocking call
/// ([`lock`](AdvisorySemaphore::lock), [`try_lock_for`](AdvisorySemaphore::try_lock_for))
/// waits for a notification instead: every release notifies the channel
/// `pglock_semaphore_<base>` in its unlock statement (`pg_notify`, same round trip), and a
/// waiter `LISTEN`s on it (once per semaphore, on its first wait) and tries all slots
/// again when woken. A slot freed without a notification (its holder's session died, or
/// a script unlocked it without notifying) is found by the next periodic try, at most
/// 100 ms later. The tradeoffs:
///
/// - Every waiter is woken by every release and tries once (one round trip each); only
///   one of them gets the slot. Waiters are not served in order, and a `try_lock` from
///   elsewhere can take a freed slot first.
/// - The semaphore stays subscribed to its channel while it lives (`UNLISTEN` when it is
///   dropped); notifications may queue on the connection while a permit is held, and are
///   discarded.
/// - [`WaitMode::Poll`] polls with jittered backoff instead and never listens.
/// - A notification needs a session that receives it: through a transaction-mode pooler
///   neither session locks nor `LISTEN` work. Connect directly or in session mode. Like
///   [`SessionLock`](crate::SessionLock), the semaphore marks the server session its slot
///   is held on, so a pooler that routes another client there is detected: that client's
///   call fails with [`Error::SessionShared`] and takes nothing (as does a
///   [`TxLock`](crate::TxLock) on the slot's key there), and two clients never both hold
///   one slot.
///
/// [`LockOptions::lock_timeout`] bounds [`lock`](AdvisorySemaphore::lock); it is measured
/// by the client here (there is no single server wait to bound). [`LockMode::Shared`] is
/// refused.
///
/// # Deployments that disagree on `N`
///
/// The permit count is not stored anywhere: each process uses slots `0..N` of its own
/// `N`. If one deployment says 3 and another 5, the first uses slots 0-2 and the second
/// 0-4, so the smaller one's slots are a subset: at most `max(N1, N2)` = 5 holders in
/// total, of which at most 3 run the first deployment. Roll out a change of `N` with that
/// in mind.
///
/// # Examples
///
/// ```no_run
/// use pglock::r2d2_postgres::{postgres::NoTls, PostgresConnectionManager};
/// use pglock::{r2d2, AdvisorySemaphore};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let manager = PostgresConnectionManager::new("host=localhost user=postgres".parse()?, NoTls);
/// let pool = r2d2::Pool::new(manager)?;
///
/// // At most 3 exports run at once, cluster-wide.
/// let mut exports = AdvisorySemaphore::new(&pool, "exports", 3)?;
/// exports.with_lock(|conn| -> Result<(), Box<dyn std::error::Error>> {
///     conn.execute("SELECT pg_sleep(1)", &[])?;
///     Ok(())
/// })?;
/// # Ok(())
/// # }
/// ```
pub struct AdvisorySemaphore<M = PostgresConnectionManager<NoTls>>
where
    M: ManageConnection<Connection = Client>,
{
    link: Link<M>,
    state: State,
}

/// The state of a semaphore, apart from its connection.
#[derive(Debug)]
struct State {
    base: i32,
    permits: u32,
    /// Slot 0's key, labelled with the semaphore's name: what errors name.
    key: LockKey,
    options: LockOptions,
    cancel: Cancel,
    /// The slot a permit holds (or a leaked permit held).
    held: Option<u32>,
    /// The connection listens on the semaphore's channel.
    listening: bool,
    rng: u64,
    /// What precedes the `@` of this semaphore's session markers.
    prefix: String,
}

impl AdvisorySemaphore {
    /// The most slots a semaphore may have (1024): each slot is a lock in the server's
    /// shared lock table, and a try names every slot in one statement. (The same for every
    /// connection manager `M`.)
    pub const MAX_PERMITS: u32 = MAX_PERMITS;
}

impl<M> AdvisorySemaphore<M>
where
    M: ManageConnection<Connection = Client>,
{
    /// Makes a semaphore named `name` with `permits` slots, with a connection checked out
    /// of `pool`, and the default [`LockOptions`]. It takes no permit.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `permits` is 0 or above [`AdvisorySemaphore::MAX_PERMITS`], or `name`
    /// has a NUL character (checked before the checkout); [`Error::Pool`] if no
    /// connection could be checked out.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let mut exports = pglock::AdvisorySemaphore::new(&pool, "exports", 3)?;
    /// assert_eq!(exports.permits(), 3);
    /// # Ok(())
    /// # }
    /// ```
    pub fn new(pool: &Pool<M>, name: &str, permits: u32) -> Result<Self> {
        Self::with_options(pool, name, permits, LockOptions::new())
    }

    /// Makes a semaphore with `options`: [`lock_timeout`](LockOptions::lock_timeout)
    /// bounds [`lock`](AdvisorySemaphore::lock), and
    /// [`wait_mode`](LockOptions::wait_mode) chooses notifications
    /// ([`WaitMode::Server`], the default) or polling. It takes no permit.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] as for [`new`](AdvisorySemaphore::new), for an option
    /// out of PostgreSQL's range, or for [`LockMode::Shared`]; [`Error::Pool`] if no
    /// connection could be checked out.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use pglock::{AdvisorySemaphore, LockOptions};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let options = LockOptions::new().lock_timeout(Duration::from_secs(30));
    /// let mut exports = AdvisorySemaphore::with_options(&pool, "exports", 3, options)?;
    /// let _permit = exports.lock()?; // waits at most 30 s
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_options(
        pool: &Pool<M>,
        name: &str,
        permits: u32,
        options: LockOptions,
    ) -> Result<Self> {
        let state = State::new(name, permits, options)?;
        Ok(AdvisorySemaphore {
            link: Link::checkout(pool, &state.key)?,
            state,
        })
    }

    /// Takes a permit if a slot is free. This function does not block.
    ///
    /// One statement tries every slot, from a random one on, and takes at most one: one
    /// round trip. Returns `Ok(None)` when all `N` slots are held.
    ///
    /// # Errors
    ///
    /// [`Error::Cancelled`] if the semaphore was cancelled; [`Error::LockTableFull`] if
    /// the server's lock table is full; [`Error::Pool`] if the semaphore needed a new
    /// connection and got none; [`Error::Database`] for any other failure. After an
    /// error the semaphore holds nothing.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let mut exports = pglock::AdvisorySemaphore::new(&pool, "exports", 3)?;
    /// match exports.try_lock()? {
    ///     Some(permit) => println!("exporting in slot {}", pglock::SemaphorePermit::slot(&permit)),
    ///     None => println!("3 exports are running already"),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    #[must_use = "if unused the permit is released immediately"]
    pub fn try_lock(&mut self) -> Result<Option<SemaphorePermit<'_, M>>> {
        Ok(self.acquire(Limit::Try)?.ok())
    }

    /// Takes a permit, blocking until a slot is free or the configured
    /// [`lock_timeout`](LockOptions::lock_timeout) passes (by default, no bound). A
    /// release anywhere wakes the waiter at once (see "Waiting" above).
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] if the bound passed; [`Error::Cancelled`] if the wait was
    /// cancelled (it notices within about 20 ms); otherwise as for
    /// [`try_lock`](AdvisorySemaphore::try_lock). After any error, the semaphore holds
    /// nothing.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let mut exports = pglock::AdvisorySemaphore::new(&pool, "exports", 3)?;
    /// let _permit = exports.lock()?;
    /// // ... the work; the slot is released when `_permit` drops.
    /// # Ok(())
    /// # }
    /// ```
    pub fn lock(&mut self) -> Result<SemaphorePermit<'_, M>> {
        let limit = Limit::bounded_by(self.state.options.lock_timeout);
        let key = self.state.key.clone();
        self.acquire(limit)?.map_err(|waited| {
            crate::metrics::timed_out("semaphore", &key);
            Error::Timeout { key, waited }
        })
    }

    /// Takes a permit, blocking at most `timeout`. A zero `timeout` makes one try.
    /// Returns `Ok(None)` if every slot was still held when `timeout` passed.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `timeout` exceeds `i32::MAX` milliseconds; otherwise
    /// as for [`lock`](AdvisorySemaphore::lock), but never [`Error::Timeout`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let mut exports = pglock::AdvisorySemaphore::new(&pool, "exports", 3)?;
    /// if let Some(_permit) = exports.try_lock_for(Duration::from_secs(5))? {
    ///     // ... export
    /// }
    /// # Ok(())
    /// # }
    /// ```
    #[must_use = "if unused the permit is released immediately"]
    pub fn try_lock_for(&mut self, timeout: Duration) -> Result<Option<SemaphorePermit<'_, M>>> {
        let limit = Limit::checked(&self.state.key, timeout)?;
        Ok(self.acquire(limit)?.ok())
    }

    /// Runs `work` while holding a permit, and releases it on every path: when `work`
    /// returns `Ok` or `Err`, and when it panics (the panic then continues). Blocks like
    /// [`lock`](AdvisorySemaphore::lock).
    ///
    /// # Errors
    ///
    /// The error of [`lock`](AdvisorySemaphore::lock), converted; the error of `work`;
    /// or, when `work` succeeded but the release failed, the release's error
    /// ([`Error::LockLost`], [`Error::TransactionLeftOpen`], [`Error::Database`]). If
    /// both failed, `work`'s error is returned and the release's is logged.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let mut exports = pglock::AdvisorySemaphore::new(&pool, "exports", 3)?;
    /// let rows = exports.with_lock(|conn| -> Result<u64, Box<dyn std::error::Error>> {
    ///     Ok(conn.execute("SELECT 1", &[])?)
    /// })?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_lock<'a, R, E, F>(&'a mut self, work: F) -> Result<R, E>
    where
        F: FnOnce(&mut SemaphorePermit<'a, M>) -> Result<R, E>,
        E: From<Error>,
    {
        let mut permit = self.lock()?;
        let result = work(&mut permit);
        let released = permit.release();
        match (result, released) {
            (Ok(value), Ok(())) => Ok(value),
            (Ok(_), Err(e)) => Err(e.into()),
            (Err(e), Ok(())) => Err(e),
            (Err(e), Err(release)) => {
                warn!("the critical section failed, and then: {release}");
                Err(e)
            }
        }
    }

    /// A handle that cancels this semaphore's waits from another thread. See
    /// [`CancelHandle`]; a cancelled semaphore takes no permit again.
    pub fn cancel_handle(&self) -> CancelHandle {
        self.state
            .cancel
            .handle(&self.state.key, self.link.conn.as_deref())
    }

    /// The number of slots.
    pub fn permits(&self) -> u32 {
        self.state.permits
    }

    /// The semaphore's name.
    pub fn name(&self) -> &str {
        self.state.key.name().unwrap_or("")
    }

    /// Slot 0's key, labelled with the semaphore's name: the key its errors name.
    pub fn key(&self) -> &LockKey {
        &self.state.key
    }

    /// The key of slot `slot`: `(base, slot)`, where `base` is
    /// `(hashtextextended(name, 0) >> 32)::int`.
    pub fn slot_key(&self, slot: u32) -> LockKey {
        sql::slot_key(self.state.base, slot)
    }

    /// Takes a permit within `limit`: the permit, or how long it waited.
    fn acquire(&mut self, limit: Limit) -> Result<Result<SemaphorePermit<'_, M>, Duration>> {
        let (conn, fresh) = self.link.live(&self.state.key)?;
        if fresh {
            self.state.connected(conn);
        }
        match self.state.acquire(conn, limit)? {
            Outcome::Busy { waited } => Ok(Err(waited)),
            Outcome::Locked => Ok(Ok(SemaphorePermit {
                conn,
                state: &mut self.state,
                locked_at: Instant::now(),
            })),
        }
    }
}

impl State {
    fn new(name: &str, permits: u32, options: LockOptions) -> Result<State> {
        let base = sql::semaphore_base(name);
        let key = sql::slot_key(base, 0).labelled(name);
        options.validate(&key)?;
        if permits == 0 {
            return Err(coord::invalid(&key, "a semaphore needs at least 1 permit"));
        }
        if permits > MAX_PERMITS {
            return Err(coord::invalid(
                &key,
                format!("{permits} permits exceed the limit of {MAX_PERMITS}"),
            ));
        }
        if options.mode == LockMode::Shared {
            return Err(coord::invalid(
                &key,
                "a semaphore's slots are exclusive; LockMode::Shared makes no sense here",
            ));
        }
        Ok(State {
            base,
            permits,
            key,
            options,
            cancel: Cancel::default(),
            held: None,
            listening: false,
            rng: wait::seed(),
            prefix: coord::marker_prefix(),
        })
    }

    /// A new connection replaced a closed one: nothing is held or listened to on it.
    fn connected(&mut self, client: &Client) {
        self.held = None;
        self.listening = false;
        self.cancel.connected(client);
    }

    fn slot_key(&self, slot: u32) -> LockKey {
        let name = self.key.name().unwrap_or("");
        sql::slot_key(self.base, slot).labelled(name)
    }

    fn acquire(&mut self, conn: &mut Client, limit: Limit) -> Result<Outcome> {
        self.release_leaked(conn);
        self.cancel.check()?;
        let start = Instant::now();
        let mut slot = self.try_once(conn)?;
        if slot.is_none() && limit != Limit::Try {
            match self.options.wait_mode {
                WaitMode::Poll {
                    min_interval,
                    max_interval,
                } => {
                    let cancel = self.cancel.shared();
                    wait::poll(limit, min_interval, max_interval, cancel.as_deref(), || {
                        slot = self.try_once(conn)?;
                        Ok(slot.is_some())
                    })?;
                }
                _ => slot = self.wait_for_notification(conn, limit, start)?,
            }
        }
        let Some(slot) = slot else {
            debug!(
                "semaphore {}: all slots busy; waited {:?}",
                self.key,
                start.elapsed()
            );
            crate::metrics::busy("semaphore", &self.key);
            return Ok(Outcome::Busy {
                waited: start.elapsed(),
            });
        };
        self.held = Some(slot);
        if self.cancel.check().is_err() {
            // Cancelled while the slot was being taken: hand out nothing.
            if let Err(e) = self.release(conn) {
                debug!("semaphore {}: release of an unwanted slot: {e}", self.key);
            }
            crate::metrics::cancelled("semaphore", &self.key);
            return Err(Error::Cancelled {
                key: self.key.clone(),
            });
        }
        debug!(
            "semaphore {}: took slot {slot} after {:?}",
            self.key,
            start.elapsed()
        );
        crate::metrics::locked("semaphore", &self.key, start.elapsed());
        Ok(Outcome::Locked)
    }

    /// One non-blocking try at every slot: the slot taken, if any.
    fn try_once(&mut self, conn: &mut Client) -> Result<Option<u32>> {
        let start = (wait::next_random(&mut self.rng) % u64::from(self.permits)) as u32;
        let cleanup = sql::semaphore_release_taken(self.base, self.permits);
        let statement = sql::semaphore_try(self.base, self.permits, start, &self.prefix);
        let row = match coord::simple(conn, &statement) {
            Ok(rows) => coord::last(rows),
            Err(e) => {
                coord::clean_after(conn, &self.key, &self.prefix, &e, &cleanup);
                return Err(coord::acquire_error(conn, &self.key, &self.cancel, e));
            }
        };
        match sql::reply(coord::col(&row, 0)) {
            sql::Reply::Done(answer) => match sql::semaphore_slot(answer, self.permits) {
                Ok(slot) => Ok(slot),
                Err(()) => {
                    // Not an answer the statement gives: release whatever it took.
                    coord::clean(conn, &self.key, &self.prefix, &cleanup)?;
                    Ok(None)
                }
            },
            refusal => Err(coord::refused(conn, &self.key, &self.prefix, refusal)),
        }
    }

    /// Waits for a release's notification (or the periodic recheck) and tries again,
    /// until a slot is taken or `limit` passes.
    fn wait_for_notification(
        &mut self,
        conn: &mut Client,
        limit: Limit,
        start: Instant,
    ) -> Result<Option<u32>> {
        if !self.listening {
            // Its own round trip: LISTEN takes effect when its transaction commits, so in
            // the try's batch a release between the try and the commit would go unheard.
            if let Err(e) = conn.batch_execute(&sql::semaphore_listen(self.base)) {
                return Err(coord::acquire_error(conn, &self.key, &self.cancel, e));
            }
            self.listening = true;
        }
        loop {
            // Notifications that came before this try are spent by it.
            {
                let mut pending = conn.notifications();
                let mut drained = pending.iter();
                while let Ok(Some(_)) = drained.next() {}
            }
            if let Some(slot) = self.try_once(conn)? {
                return Ok(Some(slot));
            }
            let waited = start.elapsed();
            let recheck = match limit {
                Limit::For(bound) if waited >= bound => return Ok(None),
                Limit::For(bound) => RECHECK.min(bound - waited),
                _ => RECHECK,
            };
            let until = Instant::now() + recheck;
            loop {
                self.cancel.check()?;
                let now = Instant::now();
                if now >= until || conn.is_closed() {
                    break;
                }
                let slice = (until - now).min(CANCEL_SLICE);
                let woken = conn.notifications().timeout_iter(slice).next();
                match woken {
                    Ok(Some(_)) => break,
                    Ok(None) => {}
                    Err(e) => return Err(coord::acquire_error(conn, &self.key, &self.cancel, e)),
                }
            }
        }
    }

    /// Releases the slot held, if any, and notifies the waiters.
    fn release(&mut self, conn: &mut Client) -> Result<()> {
        let Some(slot) = self.held.take() else {
            return Ok(());
        };
        let key = self.slot_key(slot);
        let result = coord::release(
            conn,
            &key,
            &self.prefix,
            &sql::semaphore_unlock(self.base, slot, &self.prefix),
            &sql::semaphore_after_rollback(self.base, &self.prefix),
        );
        if let Err(Error::LockLost { .. }) = &result {
            if conn.is_closed() {
                self.listening = false;
            }
        }
        if result.is_ok() {
            debug!("semaphore {}: released slot {slot}", self.key);
        }
        result
    }

    /// Releases the slot of a permit leaked with `mem::forget`.
    fn release_leaked(&mut self, conn: &mut Client) {
        if self.held.is_some() {
            if let Err(e) = self.release(conn) {
                warn!("{e}");
            }
        }
    }
}

impl<M> Drop for AdvisorySemaphore<M>
where
    M: ManageConnection<Connection = Client>,
{
    fn drop(&mut self) {
        let Some(conn) = self.link.conn.as_mut() else {
            return;
        };
        self.state.release_leaked(conn);
        if self.state.listening && !conn.is_closed() {
            // The connection goes back to the pool: it must not listen any more.
            if let Err(e) = conn.batch_execute(&sql::semaphore_unlisten(self.state.base)) {
                if coord::failure_of(conn, &e) != Failure::Closed {
                    coord::end_session(
                        conn,
                        &self.state.key,
                        &self.state.prefix,
                        "UNLISTEN failed",
                    );
                }
            }
        }
    }
}

impl<M> fmt::Debug for AdvisorySemaphore<M>
where
    M: ManageConnection<Connection = Client>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdvisorySemaphore")
            .field("name", &self.name())
            .field("permits", &self.state.permits)
            .field("base", &self.state.base)
            .field("held", &self.state.held)
            .field("lock_timeout", &self.state.options.lock_timeout)
            .field("wait_mode", &self.state.options.wait_mode)
            .finish_non_exhaustive()
    }
}

/// A permit of an [`AdvisorySemaphore`]: holds one slot; releases it (and wakes the
/// waiters) when dropped.
///
/// Derefs to the semaphore's connection, like the advisory locks' guards, so the critical
/// section runs SQL on the session that holds the slot. Its own operations are associated
/// functions (`SemaphorePermit::unlock(p)`), so they never shadow the connection's
/// methods. `let _ = sem.lock()?;` releases at once; `let _permit = sem.lock()?;` holds
/// the permit to the end of the scope.
///
/// A transaction the critical section leaves open is rolled back at release, so the
/// connection never goes back to the pool inside one; a healthy one is reported as
/// [`Error::TransactionLeftOpen`].
#[must_use = "if unused the permit is released immediately"]
pub struct SemaphorePermit<'a, M = PostgresConnectionManager<NoTls>>
where
    M: ManageConnection<Connection = Client>,
{
    conn: &'a mut PooledConnection<M>,
    state: &'a mut State,
    locked_at: Instant,
}

impl<M> SemaphorePermit<'_, M>
where
    M: ManageConnection<Connection = Client>,
{
    /// The slot this permit holds, in `0..permits`.
    pub fn slot(this: &Self) -> u32 {
        this.state.held.unwrap_or(0)
    }

    /// The key of the slot this permit holds.
    pub fn key(this: &Self) -> LockKey {
        this.state.slot_key(Self::slot(this))
    }

    /// Asks the server whether this session still holds the slot (it is freed when the
    /// session ends). One round trip; a closed connection answers `Ok(false)`.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the server could not answer.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let mut exports = pglock::AdvisorySemaphore::new(&pool, "exports", 3)?;
    /// let mut permit = exports.lock()?;
    /// assert!(pglock::SemaphorePermit::is_held(&mut permit)?);
    /// # Ok(())
    /// # }
    /// ```
    pub fn is_held(this: &mut Self) -> Result<bool> {
        let key = Self::key(this);
        let sql = super::sql::is_held(LockMode::Exclusive, &key);
        match coord::simple(this.conn, &sql) {
            Ok(rows) => Ok(coord::truthy(coord::col(&coord::last(rows), 0))),
            Err(_) if this.conn.is_closed() => Ok(false),
            Err(e) => Err(coord::database(&key, "is_held", e)),
        }
    }

    /// Releases the slot and notifies the waiters. The same as dropping the permit, but
    /// reports the error. One round trip.
    ///
    /// # Errors
    ///
    /// [`Error::LockLost`] if the slot was already gone (the session ended, or the server
    /// said this session did not hold it); [`Error::TransactionLeftOpen`] if the critical
    /// section left a transaction open (rolled back; the slot was released);
    /// [`Error::Database`] if the release failed, after which pglock ended the session,
    /// which frees the slot.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let mut exports = pglock::AdvisorySemaphore::new(&pool, "exports", 3)?;
    /// let permit = exports.lock()?;
    /// pglock::SemaphorePermit::unlock(permit)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn unlock(this: Self) -> Result<()> {
        this.release()
    }

    fn release(self) -> Result<()> {
        let mut this = std::mem::ManuallyDrop::new(self);
        let held_for = this.locked_at.elapsed();
        let SemaphorePermit { conn, state, .. } = &mut *this;
        let result = state.release(conn);
        if result.is_ok() {
            debug!("semaphore {}: held a permit for {held_for:?}", state.key);
            crate::metrics::released("semaphore", &state.key, held_for);
        }
        result
    }
}

impl<M> Deref for SemaphorePermit<'_, M>
where
    M: ManageConnection<Connection = Client>,
{
    type Target = Client;

    fn deref(&self) -> &Client {
        self.conn
    }
}

impl<M> DerefMut for SemaphorePermit<'_, M>
where
    M: ManageConnection<Connection = Client>,
{
    fn deref_mut(&mut self) -> &mut Client {
        self.conn
    }
}

impl<M> Drop for SemaphorePermit<'_, M>
where
    M: ManageConnection<Connection = Client>,
{
    fn drop(&mut self) {
        if let Err(e) = self.state.release(self.conn) {
            warn!("{e}");
        }
    }
}

impl<M> fmt::Debug for SemaphorePermit<'_, M>
where
    M: ManageConnection<Connection = Client>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SemaphorePermit")
            .field("semaphore", &self.state.key)
            .field("slot", &self.state.held)
            .field("held_for", &self.locked_at.elapsed())
            .finish()
    }
}
