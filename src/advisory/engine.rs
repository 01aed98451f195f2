//! The engine of both advisory lock scopes: the statements they send, how they wait, and
//! how every failure path leaves the connection clean.
//!
//! Invariant: while no guard is out (`held == false`), the connection holds no advisory
//! lock taken by this engine, no transaction opened by it and no session marker set by
//! it. Every path that cannot confirm that ends the database session instead, so the
//! server frees everything and r2d2 discards the connection.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use log::{debug, warn};
use postgres::Client;
use r2d2::{ManageConnection, Pool, PooledConnection};

use super::coord_sql::{reply, Reply};
use super::prepared::take_aborted_open_transaction;
use super::raw::sealed::{Raw, ServerWait};
use super::reply::{col, failure_of, last, rows, run_retrying, simple, truthy, Row};
use super::sql;
use crate::cancel::{CancelHandle, CancelState, WaitEnd};
use crate::error::{describe, Failure, LostReason};
use crate::options::{timeout_ms, LockOptions};
use crate::wait::{self, Limit, Outcome};
use crate::{Error, LockKey, LockMode, Result, WaitMode};

/// The least time a retry's checkout is given, even when its call's bound is (nearly)
/// spent: enough to take an idle connection or make one on a nearby server.
const MIN_CHECKOUT: Duration = Duration::from_millis(100);

/// What a lock is: its key and options, and the token of its session marker.
#[derive(Debug)]
pub(crate) struct Spec {
    pub(super) key: LockKey,
    pub(super) options: LockOptions,
    /// This lock's session marker (or, for kinds that mark each hold anew, what precedes
    /// its `@`): letters, digits, `:`, `@`, `,` and `-` only.
    pub(super) token: String,
}

/// What a lock knows of its session's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Settings {
    /// `statement_timeout` and `transaction_timeout` are off: nothing can cut a wait or
    /// an unlock short.
    pub(super) quiet: bool,
    /// `lock_timeout` is off: an unbounded wait needs not override it.
    pub(super) no_lock_timeout: bool,
    /// The server is a hot standby in recovery: a lock there excludes nobody on the
    /// primary, so none is handed out.
    pub(super) standby: bool,
}

/// The connection managers a lock works with: r2d2 managers of `postgres` clients. (An
/// alias of the bound, for the engine's own signatures.)
pub trait Manager: ManageConnection<Connection = Client> {}

impl<M: ManageConnection<Connection = Client>> Manager for M {}

/// What a server wait was, for reading its failure.
#[derive(Debug, Clone, Copy)]
struct ServerWaited {
    limit: Limit,
    start: Instant,
    ms: u32,
    settings: Option<Settings>,
    end: WaitEnd,
}

/// The state of one lock, apart from its connection: what every kind has, and the kind's
/// own state (`raw`).
#[derive(Debug)]
pub struct Core<S> {
    pub(super) spec: Arc<Spec>,
    /// What the session's settings are, so waits and unlocks need not lift or override
    /// them: learnt from the replies of the lock's own statements, forgotten when the
    /// critical section had the connection (a session unlock's reply tells them again).
    pub(super) settings: Option<Settings>,
    /// Made by the first `cancel_handle()`: until then nobody can cancel, and waits skip
    /// the bookkeeping.
    cancel: OnceLock<Arc<CancelState>>,
    /// A guard is out: the session lock is held, or the lock's transaction is open.
    pub(super) held: bool,
    /// The session was seen to end (its client may not know yet).
    dead: bool,
    /// What the kind keeps of its own (a semaphore's slot, a set's keys).
    pub(super) raw: S,
}

impl<S: Raw> Core<S> {
    pub(crate) fn new(key: LockKey, options: LockOptions, raw: S) -> Result<Core<S>> {
        Ok(Core {
            spec: Arc::new(Spec::new::<S>(key, options)?),
            settings: None,
            cancel: OnceLock::new(),
            held: false,
            dead: false,
            raw,
        })
    }

    /// The same lock on another key. The caller released anything held first.
    pub(crate) fn set_key(&mut self, key: LockKey) -> Result<()> {
        self.spec = Arc::new(Spec::new::<S>(key, self.spec.options.clone())?);
        Ok(())
    }

    /// This core's state moved out, leaving one that holds nothing.
    pub(crate) fn take(&mut self) -> Core<S>
    where
        S: Clone,
    {
        let spent = Core {
            spec: Arc::clone(&self.spec),
            settings: None,
            cancel: OnceLock::new(),
            held: false,
            dead: false,
            raw: self.raw.clone(),
        };
        std::mem::replace(self, spent)
    }

    /// Checks a connection out of `pool` for this lock.
    pub(crate) fn checkout<M: Manager>(&self, pool: &Pool<M>) -> Result<PooledConnection<M>> {
        self.checkout_within(pool, None)
    }

    /// A checkout that gives up after `within` when that is sooner than the pool's own
    /// `connection_timeout`.
    pub(crate) fn checkout_within<M: Manager>(
        &self,
        pool: &Pool<M>,
        within: Option<Duration>,
    ) -> Result<PooledConnection<M>> {
        let got = match within {
            Some(d) if d.max(MIN_CHECKOUT) < pool.connection_timeout() => {
                pool.get_timeout(d.max(MIN_CHECKOUT))
            }
            _ => pool.get(),
        };
        got.map_err(|source| Error::Pool {
            key: self.spec.key.clone(),
            source,
        })
    }

    /// A new connection replaces a closed one: nothing is known about its settings, and
    /// cancel requests go to it from now on.
    pub(crate) fn connected(&mut self, client: &Client) {
        self.settings = None;
        self.held = false;
        self.dead = false;
        self.raw.connected();
        if let Some(cancel) = self.cancel.get() {
            cancel.set_token(client.cancel_token());
        }
    }

    pub(crate) fn key(&self) -> &LockKey {
        &self.spec.key
    }

    pub(crate) fn mode(&self) -> LockMode {
        self.spec.options.mode
    }

    pub(crate) fn lock_timeout(&self) -> Option<Duration> {
        self.spec.options.lock_timeout
    }

    pub(crate) fn wait_mode(&self) -> WaitMode {
        self.spec.options.wait_mode
    }

    /// The session was seen to end: the lock needs a new connection.
    pub(crate) fn is_dead(&self) -> bool {
        self.dead
    }

    pub(crate) fn is_held_flag(&self) -> bool {
        self.held
    }

    /// The limit of a blocking `lock()`: the configured `lock_timeout`.
    pub(crate) fn default_limit(&self) -> Limit {
        Limit::bounded_by(self.spec.options.lock_timeout)
    }

    /// The limit of `try_lock_for(timeout)`, checked against PostgreSQL's range.
    pub(crate) fn limit_for(&self, timeout: Duration) -> Result<Limit> {
        Limit::checked(&self.spec.key, timeout)
    }

    /// A handle on this lock's cancellation state, made on first use. No wait can be in
    /// progress here: waits take the lock by `&mut`.
    pub(crate) fn cancel_handle(&self, client: Option<&Client>) -> CancelHandle {
        self.cancel
            .get_or_init(|| {
                CancelState::new(self.spec.key.clone(), client.map(Client::cancel_token))
            })
            .handle()
    }

    /// Fails if the lock was cancelled.
    pub(super) fn check_cancelled(&self) -> Result<()> {
        self.cancel.get().map_or(Ok(()), |c| c.check())
    }

    pub(super) fn cancelled(&self) -> Error {
        crate::metrics::cancelled(Self::metric_kind(), &self.spec.key);
        Error::Cancelled {
            key: self.spec.key.clone(),
        }
    }

    /// The `kind` label of this lock's metrics.
    pub(crate) fn metric_kind() -> &'static str {
        S::KIND
    }

    /// The critical section had the connection: it may have changed settings.
    pub(crate) fn forget_settings(&mut self) {
        self.settings = None;
    }

    /// Takes the lock within `limit`. On `Ok(Locked)` a guard must be handed out; on every
    /// other return the connection holds nothing new.
    pub(crate) fn acquire<M: Manager>(
        &mut self,
        conn: &mut PooledConnection<M>,
        limit: Limit,
    ) -> Result<Outcome> {
        // Release a leaked guard's lock first, or a session lock would stack a second level
        // on the server that one unlock does not free.
        self.release_leaked(conn);
        self.check_cancelled()?;
        let start = Instant::now();
        let outcome = match (limit, self.spec.options.wait_mode) {
            (Limit::Try, _) => {
                if S::try_once(self, conn)? {
                    Outcome::Locked
                } else {
                    Outcome::Busy {
                        waited: start.elapsed(),
                    }
                }
            }
            (_, WaitMode::Server) => S::wait(self, conn, limit, start)?,
            (
                _,
                WaitMode::Poll {
                    min_interval,
                    max_interval,
                },
            ) => {
                let cancel = self.cancel.get().cloned();
                wait::poll(limit, min_interval, max_interval, cancel.as_deref(), || {
                    S::try_once(self, conn)
                })?
            }
        };
        match outcome {
            Outcome::Locked => {
                self.held = true;
                if self.check_cancelled().is_err() {
                    // Cancelled while the lock was being granted: hand out nothing.
                    self.release_quietly(conn);
                    return Err(self.cancelled());
                }
                if self.settings.is_some_and(|s| s.standby) {
                    // Taken on a hot standby, where it excludes nobody on the primary.
                    self.release_quietly(conn);
                    self.settings = None; // ask again next time (a promotion ends recovery)
                    warn!(
                        "lock {}: refused: the server is a read-only standby",
                        self.spec.key
                    );
                    return Err(Error::ReadOnlyStandby {
                        key: self.spec.key.clone(),
                    });
                }
                debug!(
                    "locked {} ({:?}, {}) after {:?}",
                    self.spec.key,
                    self.spec.options.mode,
                    S::KIND,
                    start.elapsed()
                );
                crate::metrics::locked(Self::metric_kind(), &self.spec.key, start.elapsed());
            }
            Outcome::Busy { waited } => {
                crate::metrics::busy(Self::metric_kind(), &self.spec.key);
                debug!(
                    "lock {} is held elsewhere; waited {waited:?}",
                    self.spec.key
                );
            }
        }
        Ok(outcome)
    }

    /// One statement (or batch) that waits on the server, bounded by `lock_timeout`: the
    /// kind's [`send_wait`](ServerWait::send_wait), read by its
    /// [`waited`](ServerWait::waited). A timeout the session got behind pglock's back
    /// (a reload) makes it forget the settings and wait out the rest, lifted.
    pub(super) fn wait_on_server<M: Manager>(
        &mut self,
        conn: &mut PooledConnection<M>,
        limit: Limit,
        start: Instant,
    ) -> Result<Outcome>
    where
        S: ServerWait,
    {
        let ms = match limit {
            Limit::For(d) => timeout_ms(&self.spec.key, "timeout", d)?,
            _ => 0,
        };
        let settings = self.settings;
        let quiet = settings.is_some_and(|s| s.quiet);
        if let Some(cancel) = self.cancel.get() {
            cancel.begin_server_wait()?;
        }
        let result = S::send_wait(self, conn, ms);
        let end = self
            .cancel
            .get()
            .map_or(WaitEnd::Normal, |c| c.end_server_wait());
        if end == WaitEnd::CancelRequestSent {
            // The cancel request may land on a later statement, and the lock may have been
            // granted as it arrived: trust nothing on this session any more.
            self.end_session(conn, "a cancel request was sent to it during the wait");
            return Err(self.cancelled());
        }
        let wait = ServerWaited {
            limit,
            start,
            ms,
            settings,
            end,
        };
        match result {
            Ok(rows) => {
                if !quiet {
                    // The lifting batch's first row is the settings.
                    let first = rows.first().cloned().unwrap_or_default();
                    self.learn(&first, 0);
                }
                if S::waited(self, conn, &last(rows))? {
                    Ok(Outcome::Locked)
                } else {
                    Ok(Outcome::Busy {
                        waited: start.elapsed(),
                    })
                }
            }
            Err(e) => self.server_wait_failed(conn, e, wait),
        }
    }

    /// After a server wait failed: cleaned up, and then busy (its bound ran out), the rest
    /// waited out lifted (a timeout the session got behind pglock's back cut it), or the
    /// error.
    fn server_wait_failed<M: Manager>(
        &mut self,
        conn: &mut PooledConnection<M>,
        e: postgres::Error,
        wait: ServerWaited,
    ) -> Result<Outcome>
    where
        S: ServerWait,
    {
        let ServerWaited {
            limit,
            start,
            ms,
            settings,
            end,
        } = wait;
        let quiet = settings.is_some_and(|s| s.quiet);
        let failure = self.classify(conn, &e);
        let error = self.failed_acquire(conn, e);
        if end == WaitEnd::CancelledQuietly {
            // Cancelled, but no request could be sent: the wait ended by itself.
            return Err(self.cancelled());
        }
        // A wait with no bound set no lock_timeout of its own when the session had none: a
        // lock_timeout that cut it came behind pglock's back (a configuration reload), like
        // a statement_timeout below.
        let stale_lock_timeout = failure == Failure::LockTimeout && ms == 0 && settings.is_some();
        let busy = Outcome::Busy {
            waited: start.elapsed(),
        };
        if failure == Failure::LockTimeout && !stale_lock_timeout {
            return Ok(busy);
        }
        if end != WaitEnd::Normal
            || !(stale_lock_timeout || (failure == Failure::Canceled && quiet))
        {
            return Err(error);
        }
        // A timeout the session got behind pglock's back (a configuration reload) cut a
        // wait that did not lift it: what pglock knew of the settings is stale. Forget it
        // and wait out the rest, lifted.
        debug!(
            "lock {}: the session's timeouts changed; lifting them",
            self.spec.key
        );
        self.forget_settings();
        let rest = match limit {
            Limit::For(bound) => match bound.checked_sub(start.elapsed()) {
                Some(rest) if !rest.is_zero() => Limit::For(rest),
                _ => return Ok(busy),
            },
            other => other,
        };
        self.wait_on_server(conn, rest, start)
    }

    /// Remembers the settings in `row`, from column `at`: `statement_timeout`,
    /// `transaction_timeout`, `lock_timeout`.
    pub(super) fn learn(&mut self, row: &Row, at: usize) {
        let (statement, transaction, lock) = (col(row, at), col(row, at + 1), col(row, at + 2));
        let standby = truthy(col(row, at + 3));
        self.settings = statement.map(|statement| Settings {
            quiet: statement == "0" && matches!(transaction, None | Some("0")),
            no_lock_timeout: lock == Some("0"),
            standby,
        });
    }

    /// A lock statement found a transaction block open before it (left by whoever last had
    /// the connection) and took nothing: a session lock's marker set inside it would be
    /// undone by its rollback while the lock stayed, and a transaction lock's `BEGIN` would
    /// have joined it and committed its work with the lock's. Rolls it back and reports it.
    pub(super) fn refuse_in_transaction<M: Manager>(
        &mut self,
        conn: &mut PooledConnection<M>,
    ) -> Error {
        warn!(
            "lock {}: its connection was inside a transaction before the lock; rolling it back",
            self.spec.key
        );
        match self.end_stray_transaction(conn) {
            Err(error) => error,
            Ok(()) => Error::TransactionLeftOpen {
                key: self.spec.key.clone(),
            },
        }
    }

    /// Rolls back a transaction the connection came with. Whatever pglock's own statements
    /// did to it is settled with it.
    pub(super) fn end_stray_transaction<M: Manager>(
        &mut self,
        conn: &mut PooledConnection<M>,
    ) -> Result<()> {
        take_aborted_open_transaction(conn);
        self.end_transaction(conn, "left open before the lock")
    }

    pub(super) fn shared_session(&self, other: Option<&str>) -> Error {
        warn!(
            "lock {}: its server session carries another client's session lock ({}): \
             a transaction-mode pooler is in between",
            self.spec.key,
            other.unwrap_or("")
        );
        Error::SessionShared {
            key: self.spec.key.clone(),
            other: other.unwrap_or("").to_owned(),
        }
    }

    /// Cleans up after an acquiring statement failed, and turns its error into ours.
    ///
    /// A wait can be granted just as `lock_timeout`, a cancel or another error ends it:
    /// the kind's [`clean_up`](Raw::clean_up) undoes whatever may have been taken.
    pub(super) fn failed_acquire<M: Manager>(
        &mut self,
        conn: &mut PooledConnection<M>,
        e: postgres::Error,
    ) -> Error {
        let failure = self.classify(conn, &e);
        let cleaned = match failure {
            // The session is gone, and everything it held with it.
            Failure::Closed => Ok(()),
            failure => S::clean_up(self, conn, failure),
        };
        if let Err(cleanup) = cleaned {
            debug!(
                "lock {}: cleanup after a failed lock: {cleanup}",
                self.spec.key
            );
        }
        let key = self.spec.key.clone();
        match failure {
            Failure::Canceled if self.check_cancelled().is_err() => Error::Cancelled { key },
            // Before the batch (a batch of pglock's own fails with its first error).
            Failure::InFailedTransaction => {
                warn!("lock {key}: its connection was inside a failed transaction; rolled back");
                Error::TransactionLeftOpen { key }
            }
            Failure::Deadlock => Error::Deadlock { key, source: e },
            Failure::OutOfSharedMemory => Error::LockTableFull { key, source: e },
            _ => Error::Database {
                key,
                operation: "lock",
                source: e,
            },
        }
    }

    /// Ends the current transaction with `ROLLBACK` (and `then`, in the same batch); ends
    /// the session if that fails.
    pub(super) fn end_transaction_with(
        &mut self,
        conn: &mut Client,
        then: &str,
        when: &str,
    ) -> Result<()> {
        let sql = if then.is_empty() {
            "ROLLBACK".to_owned()
        } else {
            format!("ROLLBACK; {then}")
        };
        match run_retrying(conn, &sql) {
            Ok(_) => Ok(()),
            Err(e) if self.classify(conn, &e) == Failure::Closed => {
                Err(self.lost(LostReason::SessionEnded, Some(e)))
            }
            Err(e) => {
                self.end_session(conn, &format!("ROLLBACK {when} failed: {}", describe(&e)));
                Err(self.database("rollback", e))
            }
        }
    }

    /// Ends the current transaction with `ROLLBACK`; ends the session if that fails.
    pub(super) fn end_transaction(&mut self, conn: &mut Client, when: &str) -> Result<()> {
        self.end_transaction_with(conn, "", when)
    }

    /// Releases the lock however its scope needs: unlock (rolling back a transaction left
    /// open), or roll back the lock's transaction.
    pub(crate) fn release<M: Manager>(
        &mut self,
        conn: &mut PooledConnection<M>,
        used: bool,
    ) -> Result<()> {
        self.finish(conn, used, false)
    }

    /// Ends a guard: `success` commits a transaction lock (the other kinds release
    /// either way).
    pub(crate) fn finish<M: Manager>(
        &mut self,
        conn: &mut PooledConnection<M>,
        used: bool,
        success: bool,
    ) -> Result<()> {
        S::finish(self, conn, used, success)
    }

    /// Releases a lock that was taken but must not be handed out. Never fails: a release
    /// that cannot be confirmed ends the session.
    fn release_quietly<M: Manager>(&mut self, conn: &mut PooledConnection<M>) {
        if let Err(e) = self.release(conn, false) {
            debug!("lock {}: release of an unwanted lock: {e}", self.spec.key);
        }
    }

    /// Releases the lock of a guard leaked with `mem::forget`, if there is one: before the
    /// next acquisition, and before the connection leaves the lock.
    pub(crate) fn release_leaked<M: Manager>(&mut self, conn: &mut PooledConnection<M>) {
        if self.held {
            if let Err(e) = self.release(conn, true) {
                warn!("{e}");
            }
        }
    }

    /// Runs `cleanup`, a statement that releases whatever a failed lock statement may have
    /// taken (session locks outlive the statement's rollback); ends the session if it
    /// fails.
    pub(super) fn release_taken_with(&mut self, client: &mut Client, cleanup: &str) -> Result<()> {
        match run_retrying(client, cleanup) {
            Ok(rows) => {
                if !rows.is_empty() {
                    debug!("lock {}: released what a failed lock took", self.spec.key);
                }
                Ok(())
            }
            Err(e) => {
                let why = format!("cannot release what a failed lock took: {}", describe(&e));
                self.end_session(client, &why);
                Err(self.database("lock cleanup", e))
            }
        }
    }

    /// Releases with `unlock`, a statement whose row says whether every unlock returned
    /// true (`#` and a marker: another client's server session, where nothing was
    /// touched) and whether a transaction was open, sent by `send` (lifting the session's
    /// timeouts when asked). A failed transaction the critical section left open is rolled
    /// back and the release runs again (an error, if pglock's own `EXECUTE` made it fail:
    /// it was healthy, and its work is lost); a healthy one is rolled back after the
    /// release (session locks ignore the rollback), with `after_rollback` in the same
    /// batch, and reported as [`Error::TransactionLeftOpen`]. A statement cancelled (a
    /// `statement_timeout` the critical section set, a late cancel request) runs again,
    /// lifted. A release that cannot be confirmed ends the session.
    pub(super) fn release_with<M: Manager>(
        &mut self,
        conn: &mut PooledConnection<M>,
        mut lift: bool,
        after_rollback: &str,
        mut send: impl FnMut(&mut Self, &mut PooledConnection<M>, bool) -> Result<Row, postgres::Error>,
    ) -> Result<()> {
        let mut retried = false;
        let mut left_open = false;
        loop {
            let error = match send(self, conn, lift) {
                Ok(row) => {
                    let released = self.released(conn, &row, after_rollback);
                    if left_open && released.is_ok() {
                        return Err(Error::TransactionLeftOpen {
                            key: self.spec.key.clone(),
                        });
                    }
                    return released;
                }
                Err(e) => e,
            };
            match self.classify(conn, &error) {
                Failure::Closed => {
                    warn!(
                        "lock {} was lost: its session ended ({})",
                        self.spec.key,
                        describe(&error)
                    );
                    return Err(self.lost(LostReason::SessionEnded, Some(error)));
                }
                Failure::InFailedTransaction if !retried => {
                    // A failed transaction left open: its work failed with an error the
                    // caller saw. End it, then release.
                    left_open = take_aborted_open_transaction(conn);
                    retried = true;
                    lift = true;
                    self.end_transaction(conn, "of a failed transaction left open")?;
                }
                Failure::Canceled if !retried => {
                    retried = true;
                    lift = true;
                }
                _ => {
                    warn!(
                        "lock {}: unlock failed: {}",
                        self.spec.key,
                        describe(&error)
                    );
                    self.end_session(conn, "its unlock failed");
                    return Err(self.database("unlock", error));
                }
            }
        }
    }

    /// [`release_with`](Self::release_with) a statement sent as it is, or after
    /// `SET LOCAL statement_timeout = 0` when lifted.
    pub(super) fn release_plain<M: Manager>(
        &mut self,
        conn: &mut PooledConnection<M>,
        unlock: &str,
        after_rollback: &str,
    ) -> Result<()> {
        self.release_with(conn, false, after_rollback, |_, conn, lift| {
            let sql = if lift {
                format!("SET LOCAL statement_timeout = 0; {unlock}")
            } else {
                unlock.to_owned()
            };
            Ok(last(simple(conn, &sql)?))
        })
    }

    /// Reads the row of [`release_with`](Self::release_with)'s statement.
    fn released(&mut self, client: &mut Client, row: &Row, after_rollback: &str) -> Result<()> {
        let unlocked = match reply(col(row, 0)) {
            Reply::Done(answer) => truthy(answer),
            // Another client's server session: nothing was touched there, and ours is out
            // of reach.
            Reply::Shared(other) => return Err(self.shared_session(Some(other))),
            // (Not an answer an unlock gives.)
            Reply::InTransaction => false,
        };
        if truthy(col(row, 1)) {
            warn!(
                "lock {}: the critical section left a transaction open; rolling it back",
                self.spec.key
            );
            self.end_transaction_with(client, after_rollback, "of a transaction left open")?;
            if unlocked {
                return Err(Error::TransactionLeftOpen {
                    key: self.spec.key.clone(),
                });
            }
        }
        if unlocked {
            debug!("unlocked {}", self.spec.key);
            return Ok(());
        }
        warn!(
            "lock {} was lost: an unlock returned false (the session no longer held it)",
            self.spec.key
        );
        Err(self.lost(LostReason::NotHeld, None))
    }

    /// Asks the server whether this session holds the lock.
    pub(crate) fn is_held(&mut self, client: &mut Client) -> Result<bool> {
        S::is_held(self, client)
    }

    /// Runs a statement whose one column says whether the lock is held.
    pub(super) fn ask_held(&mut self, client: &mut Client, sql: &str) -> Result<bool> {
        match simple(client, sql) {
            Ok(rows) => Ok(truthy(col(&last(rows), 0))),
            Err(e) if self.classify(client, &e) == Failure::Closed => Ok(false),
            Err(e) => Err(self.database("is_held", e)),
        }
    }

    /// Classifies an error, and remembers a session seen to end.
    pub(super) fn classify(&mut self, client: &Client, e: &postgres::Error) -> Failure {
        let failure = failure_of(client, e);
        if failure == Failure::Closed {
            self.dead = true;
        }
        failure
    }

    /// Ends the database session: the server frees every lock it held, and the client
    /// reports closed, so r2d2 discards the connection instead of reusing it. Where
    /// `pg_terminate_backend` is refused, the session is made to time out at once.
    pub(super) fn end_session(&mut self, client: &mut Client, why: &str) {
        self.held = false;
        self.settings = None;
        self.dead = true;
        if client.is_closed() {
            return;
        }
        warn!("lock {}: ending its database session: {why}", self.spec.key);
        let terminate = sql::terminate(&self.spec.token);
        let mut refused = None;
        for _ in 0..2 {
            match client.simple_query(&terminate) {
                // The session ended (its FATAL can arrive before the function's row).
                Err(e) if failure_of(client, &e) == Failure::Closed => {
                    refused = None;
                    break;
                }
                Err(e) if failure_of(client, &e) == Failure::Canceled => refused = Some(e),
                Err(e) => {
                    refused = Some(e);
                    break;
                }
                Ok(messages) => {
                    refused = None;
                    if rows(messages).is_empty() {
                        log::error!(
                            "lock {}: not ending the server session: it carries another \
                             client's session lock (a transaction-mode pooler is in between)",
                            self.spec.key
                        );
                        return;
                    }
                    break;
                }
            }
        }
        if let Some(e) = &refused {
            if !client.is_closed() {
                warn!(
                    "lock {}: pg_terminate_backend failed ({}); making the session time out",
                    self.spec.key,
                    describe(e)
                );
                let _ = client.simple_query(sql::EXPIRE_SESSION);
            }
        }
        // The client sees the closed socket only on its next use; make that happen now so
        // that r2d2's `has_broken` check sees it. A session made to time out needs a few
        // milliseconds.
        let deadline = Instant::now() + Duration::from_secs(2);
        while !client.is_closed() && client.simple_query("").is_ok() {
            if refused.is_none() || Instant::now() > deadline {
                log::error!(
                    "lock {}: could not end its database session ({}); the connection may \
                     return to the pool in an unknown state",
                    self.spec.key,
                    refused
                        .as_ref()
                        .map_or_else(|| "no error".to_owned(), describe)
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub(crate) fn lost(&self, reason: LostReason, source: Option<postgres::Error>) -> Error {
        // (The callers that saw the session end mark it dead themselves: `lost` is also
        // used where only the guard's view changed.)
        crate::metrics::lost(Self::metric_kind(), &self.spec.key);
        Error::LockLost {
            key: self.spec.key.clone(),
            reason,
            source,
        }
    }

    pub(super) fn database(&self, operation: &'static str, source: postgres::Error) -> Error {
        Error::Database {
            key: self.spec.key.clone(),
            operation,
            source,
        }
    }
}

impl Spec {
    fn new<S: Raw>(key: LockKey, options: LockOptions) -> Result<Spec> {
        options.validate(&key)?;
        Ok(Spec {
            token: S::token(&marker_prefix(), &key),
            key,
            options,
        })
    }
}

/// A new lock's marker prefix, `pglock:<pid>:<random>`: what precedes the `@` of every
/// session marker it sets (see `sql.rs`).
fn marker_prefix() -> String {
    format!("pglock:{}:{:x}", std::process::id(), wait::seed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::advisory::{RawKeySet, RawSession};

    #[test]
    fn tokens_are_safe_literals() {
        let spec = Spec::new::<RawSession>(LockKey::new(1), LockOptions::new()).unwrap();
        assert!(spec
            .token
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ":@,-".contains(c)));
        assert!(spec.token.ends_with("@1"), "{}", spec.token);
        let pair = Spec::new::<RawSession>(LockKey::pair(-1, 2), LockOptions::new()).unwrap();
        assert!(pair.token.ends_with("@-1,2"), "{}", pair.token);
        let other = Spec::new::<RawSession>(LockKey::new(1), LockOptions::new()).unwrap();
        assert_ne!(spec.token, other.token);
        let set = Spec::new::<RawKeySet>(LockKey::new(1), LockOptions::new()).unwrap();
        assert!(!set.token.contains('@'), "{}", set.token);
    }
}
