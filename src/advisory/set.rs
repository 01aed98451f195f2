//! Several session advisory locks on one session, taken all or nothing.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::time::{Duration, Instant};

use log::{debug, warn};
use postgres::{Client, NoTls};
use r2d2::{ManageConnection, Pool, PooledConnection};
use r2d2_postgres::PostgresConnectionManager;

use super::coord::{self, Cancel, Link};
use super::coord_sql as sql;
use crate::cancel::WaitEnd;
use crate::error::Failure;
use crate::options::timeout_ms;
use crate::wait::{self, Limit, Outcome};
use crate::{CancelHandle, Error, LockKey, LockMode, LockOptions, Result, WaitMode};

/// The most keys a set may have: its try is one statement nested as deep as the set is
/// long.
const MAX_KEYS: usize = 256;

/// Several exclusive session advisory locks on one connection, taken all or nothing.
///
/// The keys are sorted into one canonical order, by their `pg_locks` coordinates
/// (`objsubid`, then `classid`, then `objid`: 64-bit keys first, then pairs), whatever
/// order they were given in; so two sets that overlap always take their common keys in
/// the same order and never deadlock each other, in this process or any other. A key
/// given twice (or two names that hash to one key) is an [`Error::InvalidArgument`].
///
/// - [`try_lock`](LockSet::try_lock) is one statement: it tries the keys in order and,
///   when one is busy, releases the ones it took before answering `None`. It never
///   blocks, and never holds part of the set.
/// - [`lock`](LockSet::lock) waits on the server for each key in turn, in one statement
///   whose every wait gets the time left of the bound as its `lock_timeout`. While it
///   waits for a later key it holds the earlier ones (that is what makes the order
///   deadlock-free), so it can delay other sessions that need only those. If the bound
///   passes, or the wait fails or is cancelled, it releases whatever it took, and the
///   error leaves nothing held. With [`WaitMode::Poll`] it polls `try_lock` instead and
///   holds nothing while it waits.
/// - The guard, a [`LockSetGuard`], derefs to the connection like the advisory locks'
///   guards; dropping it releases every key in one statement.
///
/// Session scope only: a set is held by the session until unlocked or until the session
/// ends (a crashed holder frees every key). For transaction scope take several
/// [`TxLock`](crate::TxLock)s' keys yourself in a fixed order inside one transaction; a
/// transaction-scoped set is not offered. Like [`SessionLock`](crate::SessionLock), a set
/// does not work through a transaction-mode pooler, and detects one the same way: it marks
/// the server session it holds its keys on, and a call of another client that lands there
/// fails with [`Error::SessionShared`] and takes nothing (as does a
/// [`TxLock`](crate::TxLock) of any key there). Connect directly or in session mode.
///
/// Errors name the set by its first key in canonical order, labelled
/// `lock set of N keys`.
///
/// # Examples
///
/// ```no_run
/// use pglock::LockSet;
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
/// // Moving money between two accounts: lock both, in whatever order they come.
/// let mut accounts = LockSet::new(&pool, [(1, 42), (1, 7)])?;
/// accounts.with_lock(|conn| -> Result<(), Box<dyn std::error::Error>> {
///     conn.execute("UPDATE accounts SET balance = balance - 10 WHERE id = 42", &[])?;
///     conn.execute("UPDATE accounts SET balance = balance + 10 WHERE id = 7", &[])?;
///     Ok(())
/// })?;
/// # Ok(())
/// # }
/// ```
pub struct LockSet<M = PostgresConnectionManager<NoTls>>
where
    M: ManageConnection<Connection = Client>,
{
    link: Link<M>,
    state: State,
}

#[derive(Debug)]
struct State {
    /// In canonical order, without duplicates, never empty.
    keys: Vec<LockKey>,
    /// The first key, labelled as the set: what errors name.
    key: LockKey,
    options: LockOptions,
    cancel: Cancel,
    /// A guard is out (or was leaked).
    held: bool,
    /// This set's session marker.
    prefix: String,
}

impl LockSet {
    /// The most keys a set may have (256): its try is one statement nested as deep as the
    /// set is long. (The same for every connection manager `M`.)
    pub const MAX_KEYS: usize = MAX_KEYS;
}

impl<M> LockSet<M>
where
    M: ManageConnection<Connection = Client>,
{
    /// Makes a lock set on `keys`, with a connection checked out of `pool`, and the
    /// default [`LockOptions`]. It takes no lock.
    ///
    /// Each key is an `i64`, an `(i32, i32)` pair, a name, or a [`LockKey`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if the set is empty, has more than [`LockSet::MAX_KEYS`]
    /// keys, has a key twice, or has a name with a NUL character (checked before the
    /// checkout); [`Error::Pool`] if no connection could be checked out.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let mut set = pglock::LockSet::new(&pool, ["tenant/7", "tenant/3"])?;
    /// let _both = set.lock()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn new<K: Into<LockKey>>(
        pool: &Pool<M>,
        keys: impl IntoIterator<Item = K>,
    ) -> Result<Self> {
        Self::with_options(pool, keys, LockOptions::new())
    }

    /// Makes a lock set with `options`: [`lock_timeout`](LockOptions::lock_timeout)
    /// bounds [`lock`](LockSet::lock) as a whole, and [`wait_mode`](LockOptions::wait_mode)
    /// chooses waiting on the server or polling. It takes no lock.
    ///
    /// # Errors
    ///
    /// As for [`new`](LockSet::new); also [`Error::InvalidArgument`] for an option out of
    /// PostgreSQL's range, or for [`LockMode::Shared`] (sets are exclusive).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use pglock::{LockOptions, LockSet};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let options = LockOptions::new().lock_timeout(Duration::from_secs(5));
    /// let mut set = LockSet::with_options(&pool, [1_i64, 2, 3], options)?;
    /// let _all = set.lock()?; // all three within 5 s, or none
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_options<K: Into<LockKey>>(
        pool: &Pool<M>,
        keys: impl IntoIterator<Item = K>,
        options: LockOptions,
    ) -> Result<Self> {
        let state = State::new(keys.into_iter().map(Into::into).collect(), options)?;
        Ok(LockSet {
            link: Link::checkout(pool, &state.key)?,
            state,
        })
    }

    /// Takes every key if all are free, or none. This function does not block.
    ///
    /// One statement, one round trip: it tries the keys in canonical order, and when one
    /// is busy it releases the ones it took and returns `Ok(None)`.
    ///
    /// # Errors
    ///
    /// [`Error::Cancelled`] if the set was cancelled; [`Error::LockTableFull`] if the
    /// server's lock table is full; [`Error::Pool`] if a new connection was needed and
    /// none came; [`Error::Database`] for any other failure. After an error the set
    /// holds nothing.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let mut set = pglock::LockSet::new(&pool, ["tenant/7", "tenant/3"])?;
    /// match set.try_lock()? {
    ///     Some(_both) => println!("merging the tenants"),
    ///     None => println!("one of them is busy; nothing was taken"),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    #[must_use = "if unused the locks are released immediately"]
    pub fn try_lock(&mut self) -> Result<Option<LockSetGuard<'_, M>>> {
        Ok(self.acquire(Limit::Try)?.ok())
    }

    /// Takes every key, blocking until all are free or the configured
    /// [`lock_timeout`](LockOptions::lock_timeout) passes (by default, no bound).
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] if the bound passed; [`Error::Cancelled`] if the wait was
    /// cancelled; [`Error::Deadlock`] if the server found the wait in a deadlock (with
    /// locks taken outside any set, in another order); otherwise as for
    /// [`try_lock`](LockSet::try_lock). After any error the set holds none of its keys.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let mut set = pglock::LockSet::new(&pool, [(1, 42), (1, 7)])?;
    /// let _both = set.lock()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn lock(&mut self) -> Result<LockSetGuard<'_, M>> {
        let limit = Limit::bounded_by(self.state.options.lock_timeout);
        let key = self.state.key.clone();
        self.acquire(limit)?.map_err(|waited| {
            crate::metrics::timed_out("lock_set", &key);
            Error::Timeout { key, waited }
        })
    }

    /// Takes every key, blocking at most `timeout` in all. A zero `timeout` makes one
    /// try. Returns `Ok(None)` if not all were free in time; nothing is held then.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `timeout` exceeds `i32::MAX` milliseconds; otherwise
    /// as for [`lock`](LockSet::lock), but never [`Error::Timeout`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let mut set = pglock::LockSet::new(&pool, [1_i64, 2])?;
    /// if let Some(_both) = set.try_lock_for(Duration::from_millis(500))? {
    ///     // ...
    /// }
    /// # Ok(())
    /// # }
    /// ```
    #[must_use = "if unused the locks are released immediately"]
    pub fn try_lock_for(&mut self, timeout: Duration) -> Result<Option<LockSetGuard<'_, M>>> {
        let limit = Limit::checked(&self.state.key, timeout)?;
        Ok(self.acquire(limit)?.ok())
    }

    /// Runs `work` while holding every key, and releases them all on every path: when
    /// `work` returns `Ok` or `Err`, and when it panics. Blocks like
    /// [`lock`](LockSet::lock).
    ///
    /// # Errors
    ///
    /// The error of [`lock`](LockSet::lock), converted; the error of `work`; or, when
    /// `work` succeeded but the release failed, the release's error ([`Error::LockLost`],
    /// [`Error::TransactionLeftOpen`], [`Error::Database`]).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let mut set = pglock::LockSet::new(&pool, ["a", "b"])?;
    /// set.with_lock(|conn| -> Result<(), Box<dyn std::error::Error>> {
    ///     conn.execute("SELECT 1", &[])?;
    ///     Ok(())
    /// })?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_lock<'a, R, E, F>(&'a mut self, work: F) -> Result<R, E>
    where
        F: FnOnce(&mut LockSetGuard<'a, M>) -> Result<R, E>,
        E: From<Error>,
    {
        let mut guard = self.lock()?;
        let result = work(&mut guard);
        let released = guard.release();
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

    /// A handle that cancels this set's waits from another thread. See [`CancelHandle`].
    pub fn cancel_handle(&self) -> CancelHandle {
        self.state
            .cancel
            .handle(&self.state.key, self.link.conn.as_deref())
    }

    /// The keys, in the canonical order they are taken in.
    pub fn keys(&self) -> &[LockKey] {
        &self.state.keys
    }

    /// The set's first key, labelled as the set: the key its errors name.
    pub fn key(&self) -> &LockKey {
        &self.state.key
    }

    fn acquire(&mut self, limit: Limit) -> Result<Result<LockSetGuard<'_, M>, Duration>> {
        let (conn, fresh) = self.link.live(&self.state.key)?;
        if fresh {
            self.state.held = false;
            self.state.cancel.connected(conn);
        }
        match self.state.acquire(conn, limit)? {
            Outcome::Busy { waited } => Ok(Err(waited)),
            Outcome::Locked => Ok(Ok(LockSetGuard {
                conn,
                state: &mut self.state,
                locked_at: Instant::now(),
            })),
        }
    }
}

impl State {
    fn new(mut keys: Vec<LockKey>, options: LockOptions) -> Result<State> {
        let label = format!("lock set of {} keys", keys.len());
        let Some(first) = keys.first() else {
            return Err(coord::invalid(
                &LockKey::new(0).labelled("empty lock set"),
                "a lock set needs at least one key",
            ));
        };
        let first = first.clone();
        for key in &keys {
            options.validate(key)?;
        }
        if keys.len() > MAX_KEYS {
            return Err(coord::invalid(
                &first.labelled(&label),
                format!("{} keys exceed the limit of {MAX_KEYS}", keys.len()),
            ));
        }
        if options.mode == LockMode::Shared {
            return Err(coord::invalid(
                &first.labelled(&label),
                "lock sets are exclusive; LockMode::Shared is not offered",
            ));
        }
        keys.sort_by_key(|k| (k.objsubid(), k.classid(), k.objid()));
        if let Some(pair) = keys.windows(2).find(|w| w[0] == w[1]) {
            return Err(coord::invalid(
                &pair[1],
                format!("the key {} is in the set twice", pair[1]),
            ));
        }
        let key = keys[0].clone().labelled(&label);
        Ok(State {
            keys,
            key,
            options,
            cancel: Cancel::default(),
            held: false,
            prefix: coord::marker_prefix(),
        })
    }

    fn acquire(&mut self, conn: &mut Client, limit: Limit) -> Result<Outcome> {
        self.release_leaked(conn);
        self.cancel.check()?;
        let start = Instant::now();
        let outcome = match (limit, self.options.wait_mode) {
            (Limit::Try, _) => {
                if self.try_once(conn)? {
                    Outcome::Locked
                } else {
                    Outcome::Busy {
                        waited: start.elapsed(),
                    }
                }
            }
            (
                _,
                WaitMode::Poll {
                    min_interval,
                    max_interval,
                },
            ) => {
                let cancel = self.cancel.shared();
                wait::poll(limit, min_interval, max_interval, cancel.as_deref(), || {
                    self.try_once(conn)
                })?
            }
            _ => self.wait_on_server(conn, limit, start)?,
        };
        if outcome == Outcome::Locked {
            self.held = true;
            if self.cancel.check().is_err() {
                if let Err(e) = self.release(conn) {
                    debug!("lock set {}: release of an unwanted set: {e}", self.key);
                }
                crate::metrics::cancelled("lock_set", &self.key);
                return Err(Error::Cancelled {
                    key: self.key.clone(),
                });
            }
            debug!("locked {} after {:?}", self.key, start.elapsed());
            crate::metrics::locked("lock_set", &self.key, start.elapsed());
        } else {
            crate::metrics::busy("lock_set", &self.key);
        }
        Ok(outcome)
    }

    /// One all-or-nothing try: whether it took every key.
    fn try_once(&mut self, conn: &mut Client) -> Result<bool> {
        let row = match coord::simple(conn, &sql::set_try(&self.keys, &self.prefix)) {
            Ok(rows) => coord::last(rows),
            Err(e) => return Err(self.failed(conn, e)),
        };
        match sql::reply(coord::col(&row, 0)) {
            sql::Reply::Done(Some("true")) => Ok(true),
            sql::Reply::Done(Some("false")) => Ok(false),
            sql::Reply::Done(_) => {
                // An unlock of the try's own returned false: something unlocked behind
                // its back. Release whatever is left.
                let cleanup = sql::set_release_taken(&self.keys);
                coord::clean(conn, &self.key, &self.prefix, &cleanup)?;
                Ok(false)
            }
            refusal => Err(coord::refused(conn, &self.key, &self.prefix, refusal)),
        }
    }

    /// Waits on the server for each key in turn, within `limit`.
    fn wait_on_server(
        &mut self,
        conn: &mut Client,
        limit: Limit,
        start: Instant,
    ) -> Result<Outcome> {
        let ms = match limit {
            Limit::For(d) => timeout_ms(&self.key, "timeout", d)?.max(1),
            _ => 0,
        };
        if let Some(cancel) = self.cancel.state() {
            cancel.begin_server_wait()?;
        }
        let result = coord::simple(conn, &sql::set_wait(&self.keys, ms, &self.prefix));
        let end = self
            .cancel
            .state()
            .map_or(WaitEnd::Normal, |c| c.end_server_wait());
        if end == WaitEnd::CancelRequestSent {
            // The cancel request may land on a later statement, and a lock may have been
            // granted as it arrived: trust nothing on this session any more.
            coord::end_session(
                conn,
                &self.key,
                &self.prefix,
                "a cancel request was sent to it during the wait",
            );
            return Err(Error::Cancelled {
                key: self.key.clone(),
            });
        }
        match result {
            Ok(rows) => match sql::reply(coord::col(&coord::last(rows), 0)) {
                sql::Reply::Done(answer) if sql::set_waited(answer) => Ok(Outcome::Locked),
                sql::Reply::Done(_) => {
                    // Not the reply the statement gives: release whatever it took.
                    let cleanup = sql::set_release_taken(&self.keys);
                    coord::clean(conn, &self.key, &self.prefix, &cleanup)?;
                    Ok(Outcome::Busy {
                        waited: start.elapsed(),
                    })
                }
                refusal => Err(coord::refused(conn, &self.key, &self.prefix, refusal)),
            },
            Err(e) => {
                let timed_out = coord::failure_of(conn, &e) == Failure::LockTimeout;
                let error = self.failed(conn, e);
                if end == WaitEnd::CancelledQuietly {
                    return Err(Error::Cancelled {
                        key: self.key.clone(),
                    });
                }
                if timed_out {
                    return Ok(Outcome::Busy {
                        waited: start.elapsed(),
                    });
                }
                Err(error)
            }
        }
    }

    /// Cleans up after a failed lock statement (keys taken before the failure stay taken:
    /// session locks ignore the rollback) and turns its error into ours.
    fn failed(&mut self, conn: &mut Client, e: postgres::Error) -> Error {
        let cleanup = sql::set_release_taken(&self.keys);
        coord::clean_after(conn, &self.key, &self.prefix, &e, &cleanup);
        coord::acquire_error(conn, &self.key, &self.cancel, e)
    }

    fn release(&mut self, conn: &mut Client) -> Result<()> {
        if !self.held {
            return Ok(());
        }
        self.held = false;
        let unlock = sql::set_unlock(&self.keys, &self.prefix);
        let after_rollback = sql::clear_marker(&self.prefix);
        let result = coord::release(conn, &self.key, &self.prefix, &unlock, &after_rollback);
        if result.is_ok() {
            debug!("unlocked {}", self.key);
        }
        result
    }

    fn release_leaked(&mut self, conn: &mut Client) {
        if self.held {
            if let Err(e) = self.release(conn) {
                warn!("{e}");
            }
        }
    }
}

impl<M> Drop for LockSet<M>
where
    M: ManageConnection<Connection = Client>,
{
    fn drop(&mut self) {
        if let Some(conn) = self.link.conn.as_mut() {
            self.state.release_leaked(conn);
        }
    }
}

impl<M> fmt::Debug for LockSet<M>
where
    M: ManageConnection<Connection = Client>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockSet")
            .field("keys", &self.state.keys)
            .field("held", &self.state.held)
            .field("lock_timeout", &self.state.options.lock_timeout)
            .field("wait_mode", &self.state.options.wait_mode)
            .finish_non_exhaustive()
    }
}

/// Holds every key of a [`LockSet`]; releases them all when dropped.
///
/// Derefs to the set's connection, like the advisory locks' guards. Its own operations
/// are associated functions (`LockSetGuard::unlock(g)`). `let _ = set.lock()?;` releases
/// at once; `let _guard = set.lock()?;` holds to the end of the scope. A transaction the
/// critical section leaves open is rolled back at release (a healthy one is reported as
/// [`Error::TransactionLeftOpen`]).
#[must_use = "if unused the locks are released immediately"]
pub struct LockSetGuard<'a, M = PostgresConnectionManager<NoTls>>
where
    M: ManageConnection<Connection = Client>,
{
    conn: &'a mut PooledConnection<M>,
    state: &'a mut State,
    locked_at: Instant,
}

impl<M> LockSetGuard<'_, M>
where
    M: ManageConnection<Connection = Client>,
{
    /// The keys held, in canonical order.
    pub fn keys(this: &Self) -> &[LockKey] {
        &this.state.keys
    }

    /// Asks the server whether this session still holds every key. One round trip; a
    /// closed connection answers `Ok(false)`.
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
    /// let mut set = pglock::LockSet::new(&pool, ["a", "b"])?;
    /// let mut guard = set.lock()?;
    /// assert!(pglock::LockSetGuard::is_held(&mut guard)?);
    /// # Ok(())
    /// # }
    /// ```
    pub fn is_held(this: &mut Self) -> Result<bool> {
        match coord::simple(this.conn, &sql::set_is_held(&this.state.keys)) {
            Ok(rows) => Ok(coord::truthy(coord::col(&coord::last(rows), 0))),
            Err(_) if this.conn.is_closed() => Ok(false),
            Err(e) => Err(coord::database(&this.state.key, "is_held", e)),
        }
    }

    /// Releases every key, in one statement. The same as dropping the guard, but reports
    /// the error.
    ///
    /// # Errors
    ///
    /// [`Error::LockLost`] if a key was already gone (every other key is released all the
    /// same); [`Error::TransactionLeftOpen`] if the critical section left a transaction
    /// open (rolled back; the keys were released); [`Error::Database`] if the release
    /// failed, after which pglock ended the session, which frees every key.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let mut set = pglock::LockSet::new(&pool, ["a", "b"])?;
    /// let guard = set.lock()?;
    /// pglock::LockSetGuard::unlock(guard)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn unlock(this: Self) -> Result<()> {
        this.release()
    }

    fn release(self) -> Result<()> {
        let mut this = std::mem::ManuallyDrop::new(self);
        let held_for = this.locked_at.elapsed();
        let LockSetGuard { conn, state, .. } = &mut *this;
        let result = state.release(conn);
        if result.is_ok() {
            debug!("held {} for {held_for:?}", state.key);
            crate::metrics::released("lock_set", &state.key, held_for);
        }
        result
    }
}

impl<M> Deref for LockSetGuard<'_, M>
where
    M: ManageConnection<Connection = Client>,
{
    type Target = Client;

    fn deref(&self) -> &Client {
        self.conn
    }
}

impl<M> DerefMut for LockSetGuard<'_, M>
where
    M: ManageConnection<Connection = Client>,
{
    fn deref_mut(&mut self) -> &mut Client {
        self.conn
    }
}

impl<M> Drop for LockSetGuard<'_, M>
where
    M: ManageConnection<Connection = Client>,
{
    fn drop(&mut self) {
        if let Err(e) = self.state.release(self.conn) {
            warn!("{e}");
        }
    }
}

impl<M> fmt::Debug for LockSetGuard<'_, M>
where
    M: ManageConnection<Connection = Client>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockSetGuard")
            .field("keys", &self.state.keys)
            .field("held_for", &self.locked_at.elapsed())
            .finish()
    }
}
