//! Several session advisory locks on one session, taken all or nothing: the [`RawKeySet`]
//! kind of the advisory engine; the public type is [`LockSet`](crate::LockSet).

use postgres::{Client, NoTls};
use r2d2::{ManageConnection, Pool, PooledConnection};
use r2d2_postgres::PostgresConnectionManager;

use super::coord_sql as sql;
use super::engine::{Core, Manager};
use super::raw::sealed::{Raw, ServerWait, Unlocks};
use super::reply::{col, last, simple, Row};
use super::{AdvisoryGuard, AdvisoryLock, OwnedAdvisoryGuard};
use crate::error::Failure;
use crate::wait::{Limit, Outcome};
use crate::{Error, LockKey, LockMode, LockOptions, Result};

/// The most keys a set may have: see [`LockSet::MAX_KEYS`].
const MAX_KEYS: usize = 256;

/// Several exclusive session advisory locks on one connection, taken all or nothing.
///
/// The keys are sorted into one canonical order, by their `pg_locks` coordinates
/// (`objsubid`, then `classid`, then `objid`: 64-bit keys first, then pairs), whatever
/// order they were given in; so two sets that overlap always take their common keys in
/// the same order and never deadlock each other, in this process or any other. A key
/// given twice (or two names that hash to one key) is an [`Error::InvalidArgument`].
///
/// - [`try_lock`](AdvisoryLock::try_lock) is one statement: it tries the keys in order and,
///   when one is busy, releases the ones it took before answering `None`. It never
///   blocks, and never holds part of the set.
/// - [`lock`](AdvisoryLock::lock) waits on the server for each key in turn, in one statement
///   whose every wait gets the time left of the bound as its `lock_timeout`. While it
///   waits for a later key it holds the earlier ones (that is what makes the order
///   deadlock-free), so it can delay other sessions that need only those. If the bound
///   passes, or the wait fails or is cancelled, it releases whatever it took, and the
///   error leaves nothing held. With [`WaitMode::Poll`](crate::WaitMode::Poll) it polls `try_lock` instead and
///   holds nothing while it waits.
/// - The guard, a [`LockSetGuard`], derefs to the connection like the advisory locks'
///   guards; dropping it releases every key in one statement.
///
/// A `LockSet` is the one advisory engine ([`AdvisoryLock`]) over the [`RawKeySet`] kind, so
/// it has every call and every failure handling a [`SessionLock`](crate::SessionLock) has
/// (owned guards, [`Locker`](crate::Locker), retry on a fresh connection, cancellation).
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
pub type LockSet<M = PostgresConnectionManager<NoTls>> = AdvisoryLock<RawKeySet, M>;

/// Holds every key of a [`LockSet`]; releases them all when dropped. See
/// [`AdvisoryGuard`]; [`keys`](AdvisoryGuard::keys) lists them.
pub type LockSetGuard<'a, M = PostgresConnectionManager<NoTls>> = AdvisoryGuard<'a, RawKeySet, M>;

/// A [`LockSetGuard`] that owns its set and connection: `'static` and `Send`.
pub type OwnedLockSetGuard<M = PostgresConnectionManager<NoTls>> = OwnedAdvisoryGuard<RawKeySet, M>;

/// The keys of a [`LockSet`]: the advisory kind that holds every key of a set, taken in
/// one canonical order. Sealed; see [`RawAdvisory`](crate::RawAdvisory).
#[derive(Debug, Clone)]
pub struct RawKeySet {
    /// In canonical order, without duplicates, never empty.
    keys: Vec<LockKey>,
}

impl LockSet {
    /// The most keys a set may have (256): its try is one statement nested as deep as the
    /// set is long. (The same for every connection manager `M`.)
    pub const MAX_KEYS: usize = MAX_KEYS;
}

impl<M> AdvisoryLock<RawKeySet, M>
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
    /// bounds [`lock`](AdvisoryLock::lock) as a whole, and
    /// [`wait_mode`](LockOptions::wait_mode) chooses waiting on the server or polling. It
    /// takes no lock.
    ///
    /// # Errors
    ///
    /// As for [`new`](LockSet::new); also [`Error::InvalidArgument`] for
    /// an option out of PostgreSQL's range, or for [`LockMode::Shared`] (sets are
    /// exclusive).
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
        let (key, set) = RawKeySet::new(keys.into_iter().map(Into::into).collect(), &options)?;
        Self::checked_out(pool, Core::new(key, options, set)?)
    }

    /// Makes a lock set that uses a connection the caller already checked out (it has no
    /// pool to take a new one from if this one dies). It takes no lock.
    ///
    /// # Errors
    ///
    /// As for [`with_options`](LockSet::with_options).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>> = todo!();
    /// let set = pglock::LockSet::from_connection(pool.get()?, [1_i64, 2], pglock::LockOptions::new())?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_connection<K: Into<LockKey>>(
        conn: PooledConnection<M>,
        keys: impl IntoIterator<Item = K>,
        options: LockOptions,
    ) -> Result<Self> {
        let (key, set) = RawKeySet::new(keys.into_iter().map(Into::into).collect(), &options)?;
        Ok(Self::on_connection(conn, Core::new(key, options, set)?))
    }

    /// The keys, in canonical order.
    pub fn keys(&self) -> &[LockKey] {
        &self.core.raw.keys
    }
}

impl<M> AdvisoryGuard<'_, RawKeySet, M>
where
    M: ManageConnection<Connection = Client>,
{
    /// The keys held, in canonical order.
    pub fn keys(this: &Self) -> &[LockKey] {
        &this.core().raw.keys
    }
}

impl<M> OwnedAdvisoryGuard<RawKeySet, M>
where
    M: ManageConnection<Connection = Client>,
{
    /// The keys held, in canonical order.
    pub fn keys(this: &Self) -> &[LockKey] {
        &this.core().raw.keys
    }
}

impl RawKeySet {
    /// The first key, labelled as the set (what errors name), and the set.
    fn new(mut keys: Vec<LockKey>, options: &LockOptions) -> Result<(LockKey, RawKeySet)> {
        let label = format!("lock set of {} keys", keys.len());
        let invalid = |key: &LockKey, message: String| Error::InvalidArgument {
            key: key.clone(),
            message,
        };
        let Some(first) = keys.first() else {
            let empty = LockKey::new(0).labelled("empty lock set");
            return Err(invalid(&empty, "a lock set needs at least one key".into()));
        };
        let first = first.clone().labelled(&label);
        for key in &keys {
            options.validate(key)?;
        }
        if keys.len() > MAX_KEYS {
            let message = format!("{} keys exceed the limit of {MAX_KEYS}", keys.len());
            return Err(invalid(&first, message));
        }
        if options.mode == LockMode::Shared {
            let message = "lock sets are exclusive; LockMode::Shared is not offered".into();
            return Err(invalid(&first, message));
        }
        keys.sort_by_key(|k| (k.objsubid(), k.classid(), k.objid()));
        if let Some(pair) = keys.windows(2).find(|w| w[0] == w[1]) {
            return Err(invalid(
                &pair[1],
                format!("the key {} is in the set twice", pair[1]),
            ));
        }
        let key = keys[0].clone().labelled(&label);
        Ok((key, RawKeySet { keys }))
    }
}

impl super::RawAdvisory for RawKeySet {}
impl Unlocks for RawKeySet {}

impl Raw for RawKeySet {
    const KIND: &'static str = "lock_set";
    const NAME: &'static str = "LockSet";

    /// The prefix alone (no `@`): a transaction lock refuses every key on a server session
    /// that a set holds.
    fn token(prefix: &str, _: &LockKey) -> String {
        prefix.to_owned()
    }

    fn try_once<M: Manager>(core: &mut Core<Self>, conn: &mut PooledConnection<M>) -> Result<bool> {
        let row = match simple(conn, &sql::set_try(&core.raw.keys, &core.spec.token)) {
            Ok(rows) => last(rows),
            Err(e) => return Err(core.failed_acquire(conn, e)),
        };
        match sql::reply(col(&row, 0)) {
            sql::Reply::Done(Some("true")) => Ok(true),
            sql::Reply::Done(Some("false")) => Ok(false),
            sql::Reply::Done(_) => {
                // An unlock of the try's own returned false: something unlocked behind
                // its back. Release whatever is left.
                Self::clean_up(core, conn, Failure::Other)?;
                Ok(false)
            }
            sql::Reply::Shared(other) => Err(core.shared_session(Some(other))),
            sql::Reply::InTransaction => Err(core.refuse_in_transaction(conn)),
        }
    }

    fn wait<M: Manager>(
        core: &mut Core<Self>,
        conn: &mut PooledConnection<M>,
        limit: Limit,
        start: std::time::Instant,
    ) -> Result<Outcome> {
        core.wait_on_server(conn, limit, start)
    }

    fn clean_up<M: Manager>(
        core: &mut Core<Self>,
        conn: &mut PooledConnection<M>,
        failure: Failure,
    ) -> Result<()> {
        if failure == Failure::InFailedTransaction {
            // The connection came inside a failed transaction: nothing ran. End it.
            return core.end_stray_transaction(conn);
        }
        // Keys taken before the failure stay taken: session locks ignore the rollback.
        let cleanup = sql::set_release_taken(&core.raw.keys);
        core.release_taken_with(conn, &cleanup)
    }

    fn finish<M: Manager>(
        core: &mut Core<Self>,
        conn: &mut PooledConnection<M>,
        _used: bool,
        _success: bool,
    ) -> Result<()> {
        if !std::mem::take(&mut core.held) {
            return Ok(());
        }
        let unlock = sql::set_unlock(&core.raw.keys, &core.spec.token);
        let after_rollback = sql::clear_marker(&core.spec.token);
        core.release_plain(conn, &unlock, &after_rollback)
    }

    fn is_held(core: &mut Core<Self>, client: &mut Client) -> Result<bool> {
        let sql = sql::set_is_held(&core.raw.keys);
        core.ask_held(client, &sql)
    }
}

impl ServerWait for RawKeySet {
    /// Each key in turn, in one batch that lifts the session's timeouts and reads them
    /// first.
    fn send_wait<M: Manager>(
        core: &mut Core<Self>,
        conn: &mut PooledConnection<M>,
        ms: u32,
    ) -> Result<Vec<Row>, postgres::Error> {
        let wait = sql::set_wait(&core.raw.keys, ms, &core.spec.token);
        simple(conn, &super::sql::guarded(&wait))
    }

    fn waited<M: Manager>(
        core: &mut Core<Self>,
        conn: &mut PooledConnection<M>,
        row: &Row,
    ) -> Result<bool> {
        match sql::reply(col(row, 0)) {
            sql::Reply::Done(answer) if sql::set_waited(answer) => Ok(true),
            sql::Reply::Done(_) => {
                // Not the reply the statement gives: release whatever it took.
                Self::clean_up(core, conn, Failure::Other)?;
                Ok(false)
            }
            sql::Reply::Shared(other) => Err(core.shared_session(Some(other))),
            sql::Reply::InTransaction => Err(core.refuse_in_transaction(conn)),
        }
    }
}
