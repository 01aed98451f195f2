//! A named counting semaphore on session advisory locks: N slots, each a lock of its own.
//! The [`RawSlots`] kind of the advisory engine; the public type is
//! [`AdvisorySemaphore`](crate::AdvisorySemaphore).

use std::time::{Duration, Instant};

use log::debug;
use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls};
use r2d2::{ManageConnection, Pool, PooledConnection};
use r2d2_postgres::PostgresConnectionManager;

use super::coord_sql as sql;
use super::engine::{Core, Manager};
use super::raw::sealed::{Raw, Unlocks};
use super::reply::{col, last, simple};
use super::{AdvisoryGuard, AdvisoryLock, OwnedAdvisoryGuard};
use crate::error::Failure;
use crate::wait::{self, Limit, Outcome};
use crate::{Error, LockKey, LockMode, LockOptions, Result};

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
/// An `AdvisorySemaphore` is the one advisory engine ([`AdvisoryLock`]) over the
/// [`RawSlots`] kind, so it has every call a [`SessionLock`](crate::SessionLock) has
/// (`try_lock`, `lock`, `try_lock_for`, `with_lock`, `lock_owned`, `try_lock_owned`,
/// `cancel_handle`, [`Locker`](crate::Locker)), and the same handling of failures: a lost
/// connection is replaced from the pool within the call's bound, a failed call holds
/// nothing, and the connection never goes back to the pool holding a slot.
///
/// [`try_lock`](AdvisoryLock::try_lock) tries every slot in one statement (starting at a
/// random slot, stopping at the first free one) and never blocks. A permit is a
/// [`SemaphorePermit`], which derefs to the semaphore's connection like the advisory
/// locks' guards (the critical section usually has SQL to run, and runs it on the session
/// that holds the slot); it releases the slot when dropped. Like a session lock, a slot is
/// freed by the server when the holder's session ends: a crashed holder's permit comes
/// back by itself.
///
/// # Waiting
///
/// The server cannot wait for "any one of N locks", so a blocking call
/// ([`lock`](AdvisoryLock::lock), [`try_lock_for`](AdvisoryLock::try_lock_for))
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
/// - [`WaitMode::Poll`](crate::WaitMode::Poll) polls with jittered backoff instead and never listens.
/// - A notification needs a session that receives it: through a transaction-mode pooler
///   neither session locks nor `LISTEN` work. Connect directly or in session mode. Like
///   [`SessionLock`](crate::SessionLock), the semaphore marks the server session its slot
///   is held on, so a pooler that routes another client there is detected: that client's
///   call fails with [`Error::SessionShared`] and takes nothing (as does a
///   [`TxLock`](crate::TxLock) on the slot's key there), and two clients never both hold
///   one slot.
///
/// [`LockOptions::lock_timeout`] bounds [`lock`](AdvisoryLock::lock); it is measured
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
pub type AdvisorySemaphore<M = PostgresConnectionManager<NoTls>> = AdvisoryLock<RawSlots, M>;

/// A permit of an [`AdvisorySemaphore`]: holds one slot; releases it (and wakes the
/// waiters) when dropped. See [`AdvisoryGuard`]; [`slot`](AdvisoryGuard::slot) tells
/// which slot.
pub type SemaphorePermit<'a, M = PostgresConnectionManager<NoTls>> = AdvisoryGuard<'a, RawSlots, M>;

/// A [`SemaphorePermit`] that owns its semaphore and connection: `'static` and `Send`.
pub type OwnedSemaphorePermit<M = PostgresConnectionManager<NoTls>> =
    OwnedAdvisoryGuard<RawSlots, M>;

/// The slots of an [`AdvisorySemaphore`]: the advisory kind that holds one of N slot keys
/// and waits for a release's notification. Sealed; see [`RawAdvisory`](crate::RawAdvisory).
#[derive(Debug, Clone)]
pub struct RawSlots {
    base: i32,
    permits: u32,
    /// The slot a permit holds (or a leaked permit held).
    held: Option<u32>,
    /// The connection listens on the semaphore's channel.
    listening: bool,
    rng: u64,
}

impl AdvisorySemaphore {
    /// The most slots a semaphore may have (1024): each slot is a lock in the server's
    /// shared lock table, and a try names every slot in one statement. (The same for every
    /// connection manager `M`.)
    pub const MAX_PERMITS: u32 = MAX_PERMITS;
}

impl<M> AdvisoryLock<RawSlots, M>
where
    M: ManageConnection<Connection = Client>,
{
    /// Makes a semaphore named `name` with `permits` slots, with a connection checked out
    /// of `pool`, and the default [`LockOptions`]. It takes no permit.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `permits` is 0 or above
    /// [`AdvisorySemaphore::MAX_PERMITS`], or `name` has a NUL character (checked before
    /// the checkout); [`Error::Pool`] if no connection could be checked out.
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
    /// bounds [`lock`](AdvisoryLock::lock), and [`wait_mode`](LockOptions::wait_mode)
    /// chooses notifications ([`WaitMode::Server`](crate::WaitMode::Server), the default)
    /// or polling. It takes no permit.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] as for [`new`](AdvisorySemaphore::new), for an
    /// option out of PostgreSQL's range, or for [`LockMode::Shared`]; [`Error::Pool`] if no
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
        let (key, slots) = RawSlots::new(name, permits, &options)?;
        Self::checked_out(pool, Core::new(key, options, slots)?)
    }

    /// Makes a semaphore that uses a connection the caller already checked out (it has no
    /// pool to take a new one from if this one dies). It takes no permit.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] as for
    /// [`with_options`](AdvisorySemaphore::with_options).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let options = pglock::LockOptions::new();
    /// let exports = pglock::AdvisorySemaphore::from_connection(pool.get()?, "exports", 3, options)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_connection(
        conn: PooledConnection<M>,
        name: &str,
        permits: u32,
        options: LockOptions,
    ) -> Result<Self> {
        let (key, slots) = RawSlots::new(name, permits, &options)?;
        Ok(Self::on_connection(conn, Core::new(key, options, slots)?))
    }

    /// The number of slots.
    pub fn permits(&self) -> u32 {
        self.core.raw.permits
    }

    /// The semaphore's name.
    pub fn name(&self) -> &str {
        self.core.key().name().unwrap_or("")
    }

    /// The key of slot `slot`: `(base, slot)`, where `base` is
    /// `(hashtextextended(name, 0) >> 32)::int`. (The semaphore's own
    /// [`key`](AdvisoryLock::key) is slot 0's, labelled with its name: the key its errors
    /// name.)
    pub fn slot_key(&self, slot: u32) -> LockKey {
        sql::slot_key(self.core.raw.base, slot)
    }
}

impl<M> AdvisoryGuard<'_, RawSlots, M>
where
    M: ManageConnection<Connection = Client>,
{
    /// The slot this permit holds, in `0..permits`.
    pub fn slot(this: &Self) -> u32 {
        this.core().raw.held.unwrap_or(0)
    }

    /// The key of the slot this permit holds.
    pub fn slot_key(this: &Self) -> LockKey {
        this.core()
            .raw
            .slot_key(Self::slot(this), this.core().key())
    }
}

impl<M> OwnedAdvisoryGuard<RawSlots, M>
where
    M: ManageConnection<Connection = Client>,
{
    /// The slot this permit holds, in `0..permits`.
    pub fn slot(this: &Self) -> u32 {
        this.core().raw.held.unwrap_or(0)
    }

    /// The key of the slot this permit holds.
    pub fn slot_key(this: &Self) -> LockKey {
        this.core()
            .raw
            .slot_key(Self::slot(this), this.core().key())
    }
}

impl RawSlots {
    /// Slot 0's key labelled with the name (what errors name), and the slots.
    fn new(name: &str, permits: u32, options: &LockOptions) -> Result<(LockKey, RawSlots)> {
        let base = sql::semaphore_base(name);
        let key = sql::slot_key(base, 0).labelled(name);
        let invalid = |message: String| Error::InvalidArgument {
            key: key.clone(),
            message,
        };
        if permits == 0 {
            return Err(invalid("a semaphore needs at least 1 permit".into()));
        }
        if permits > MAX_PERMITS {
            return Err(invalid(format!(
                "{permits} permits exceed the limit of {MAX_PERMITS}"
            )));
        }
        if options.mode == LockMode::Shared {
            return Err(invalid(
                "a semaphore's slots are exclusive; LockMode::Shared makes no sense here".into(),
            ));
        }
        let slots = RawSlots {
            base,
            permits,
            held: None,
            listening: false,
            rng: wait::seed(),
        };
        Ok((key, slots))
    }

    fn slot_key(&self, slot: u32, key: &LockKey) -> LockKey {
        sql::slot_key(self.base, slot).labelled(key.name().unwrap_or(""))
    }

    /// Waits for a release's notification (or the periodic recheck) and tries again,
    /// until a slot is taken or `limit` passes.
    fn wait_for_notification<M: Manager>(
        core: &mut Core<RawSlots>,
        conn: &mut PooledConnection<M>,
        limit: Limit,
        start: Instant,
    ) -> Result<Outcome> {
        if !core.raw.listening {
            // Its own round trip: LISTEN takes effect when its transaction commits, so in
            // the try's batch a release between the try and the commit would go unheard.
            if let Err(e) = conn.batch_execute(&sql::semaphore_listen(core.raw.base)) {
                return Err(core.failed_acquire(conn, e));
            }
            core.raw.listening = true;
        }
        loop {
            // Notifications that came before this try are spent by it.
            {
                let mut pending = conn.notifications();
                let mut drained = pending.iter();
                while let Ok(Some(_)) = drained.next() {}
            }
            if Self::try_once(core, conn)? {
                return Ok(Outcome::Locked);
            }
            let waited = start.elapsed();
            let recheck = match limit {
                Limit::For(bound) if waited >= bound => return Ok(Outcome::Busy { waited }),
                Limit::For(bound) => RECHECK.min(bound - waited),
                _ => RECHECK,
            };
            if let Err(e) = Self::sleep_until_notified(core, conn, recheck) {
                return Err(match e {
                    Wake::Cancelled(e) => e,
                    Wake::Failed(e) => core.failed_acquire(conn, e),
                });
            }
        }
    }

    /// Sleeps for at most `recheck`, until a notification comes or the lock is cancelled.
    fn sleep_until_notified(
        core: &Core<RawSlots>,
        conn: &mut Client,
        recheck: Duration,
    ) -> std::result::Result<(), Wake> {
        let until = Instant::now() + recheck;
        loop {
            core.check_cancelled().map_err(Wake::Cancelled)?;
            let now = Instant::now();
            if now >= until || conn.is_closed() {
                return Ok(());
            }
            let slice = (until - now).min(CANCEL_SLICE);
            match conn.notifications().timeout_iter(slice).next() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) => {}
                Err(e) => return Err(Wake::Failed(e)),
            }
        }
    }
}

/// Why a waiter woke other than by a notification.
enum Wake {
    Cancelled(Error),
    Failed(postgres::Error),
}

impl super::RawAdvisory for RawSlots {}
impl Unlocks for RawSlots {}

impl Raw for RawSlots {
    const KIND: &'static str = "semaphore";
    const NAME: &'static str = "AdvisorySemaphore";

    /// The prefix alone: each try marks the slot it takes (`<prefix>@<base>,<slot>`).
    fn token(prefix: &str, _: &LockKey) -> String {
        prefix.to_owned()
    }

    fn try_once<M: Manager>(core: &mut Core<Self>, conn: &mut PooledConnection<M>) -> Result<bool> {
        let slots = &mut core.raw;
        let start = (wait::next_random(&mut slots.rng) % u64::from(slots.permits)) as u32;
        let statement = sql::semaphore_try(slots.base, slots.permits, start, &core.spec.token);
        let row = match simple(conn, &statement) {
            Ok(rows) => last(rows),
            Err(e) => return Err(core.failed_acquire(conn, e)),
        };
        match sql::reply(col(&row, 0)) {
            sql::Reply::Done(answer) => match sql::semaphore_slot(answer, core.raw.permits) {
                Ok(slot) => {
                    core.raw.held = slot;
                    Ok(slot.is_some())
                }
                Err(()) => {
                    // Not an answer the statement gives: release whatever it took.
                    Self::clean_up(core, conn, Failure::Other)?;
                    Ok(false)
                }
            },
            sql::Reply::Shared(other) => Err(core.shared_session(Some(other))),
            sql::Reply::InTransaction => Err(core.refuse_in_transaction(conn)),
        }
    }

    fn wait<M: Manager>(
        core: &mut Core<Self>,
        conn: &mut PooledConnection<M>,
        limit: Limit,
        start: Instant,
    ) -> Result<Outcome> {
        // The server cannot wait for "any one of N locks": wait for a notification.
        Self::wait_for_notification(core, conn, limit, start)
    }

    fn clean_up<M: Manager>(
        core: &mut Core<Self>,
        conn: &mut PooledConnection<M>,
        failure: Failure,
    ) -> Result<()> {
        core.raw.held = None;
        if failure == Failure::InFailedTransaction {
            // The connection came inside a failed transaction: nothing ran. End it.
            return core.end_stray_transaction(conn);
        }
        let cleanup = sql::semaphore_release_taken(core.raw.base, core.raw.permits);
        core.release_taken_with(conn, &cleanup)
    }

    fn finish<M: Manager>(
        core: &mut Core<Self>,
        conn: &mut PooledConnection<M>,
        _used: bool,
        _success: bool,
    ) -> Result<()> {
        let held = std::mem::take(&mut core.held);
        let (Some(slot), true) = (core.raw.held.take(), held) else {
            return Ok(());
        };
        let unlock = sql::semaphore_unlock(core.raw.base, slot, &core.spec.token);
        let after_rollback = sql::semaphore_after_rollback(core.raw.base, &core.spec.token);
        let result = core.release_plain(conn, &unlock, &after_rollback);
        if result.is_ok() {
            debug!("semaphore {}: released slot {slot}", core.key());
        }
        result
    }

    fn is_held(core: &mut Core<Self>, client: &mut Client) -> Result<bool> {
        let slot = core.raw.held.unwrap_or(0);
        let key = sql::slot_key(core.raw.base, slot);
        core.ask_held(client, &super::sql::is_held(LockMode::Exclusive, &key))
    }

    fn connected(&mut self) {
        self.held = None;
        self.listening = false;
    }

    fn leave(core: &mut Core<Self>, client: &mut Client) {
        if !core.raw.listening || client.is_closed() {
            return;
        }
        // The connection goes back to the pool: it must not listen any more.
        core.raw.listening = false;
        if let Err(e) = client.batch_execute(&sql::semaphore_unlisten(core.raw.base)) {
            if core.classify(client, &e) != Failure::Closed {
                core.end_session(client, "UNLISTEN failed");
            }
        }
    }
}
