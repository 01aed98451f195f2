//! The engine of both advisory lock scopes: the statements they send, how they wait, and
//! how every failure path leaves the connection clean.
//!
//! Invariant: while no guard is out (`held == false`), the connection holds no advisory
//! lock taken by this engine, no transaction opened by it and no session marker set by
//! it. Every path that cannot confirm that ends the database session instead, so the
//! server frees everything and r2d2 discards the connection.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use log::{debug, warn};
use postgres::{Client, SimpleQueryMessage};
use r2d2::{ManageConnection, Pool, PooledConnection};

use super::scope::sealed::Kind;
use super::scope::Scope;
use super::sql::{self, Args};
use crate::cancel::{CancelHandle, CancelState, WaitEnd};
use crate::error::{describe, Failure, LostReason};
use crate::options::{timeout_ms, LockOptions};
use crate::wait::{self, Limit, Outcome};
use crate::{Error, LockKey, LockMode, Result, WaitMode};

/// The least time a retry's checkout is given, even when its call's bound is (nearly)
/// spent: enough to take an idle connection or make one on a nearby server.
const MIN_CHECKOUT: Duration = Duration::from_millis(100);

/// One row of a reply, every column as text (`None` for NULL or a missing column).
type Row = Vec<Option<String>>;

/// What a lock is: its key and options, and the token of its session marker.
#[derive(Debug)]
struct Spec {
    key: LockKey,
    options: LockOptions,
    /// This lock's session marker: letters, digits and `:` only.
    token: String,
}

/// What a lock knows of its session's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Settings {
    /// `statement_timeout` and `transaction_timeout` are off: nothing can cut a wait or
    /// an unlock short.
    quiet: bool,
    /// `lock_timeout` is off: an unbounded wait needs not override it.
    no_lock_timeout: bool,
    /// The server is a hot standby in recovery: a lock there excludes nobody on the
    /// primary, so none is handed out.
    standby: bool,
}

/// The state of one lock, apart from its connection.
#[derive(Debug)]
pub(crate) struct Core<S> {
    spec: Arc<Spec>,
    /// What the session's settings are, so waits and unlocks need not lift or override
    /// them: learnt from the replies of the lock's own statements, forgotten when the
    /// critical section had the connection (a session unlock's reply tells them again).
    settings: Option<Settings>,
    /// Made by the first `cancel_handle()`: until then nobody can cancel, and waits skip
    /// the bookkeeping.
    cancel: OnceLock<Arc<CancelState>>,
    /// A guard is out: the session lock is held, or the lock's transaction is open.
    held: bool,
    /// The session was seen to end (its client may not know yet).
    dead: bool,
    _scope: PhantomData<fn() -> S>,
}

impl<S: Scope> Core<S> {
    pub(crate) fn new(key: LockKey, options: LockOptions) -> Result<Core<S>> {
        Ok(Core {
            spec: Arc::new(Spec::new(key, options)?),
            settings: None,
            cancel: OnceLock::new(),
            held: false,
            dead: false,
            _scope: PhantomData,
        })
    }

    /// The same lock on another key. The caller released anything held first.
    pub(crate) fn set_key(&mut self, key: LockKey) -> Result<()> {
        self.spec = Arc::new(Spec::new(key, self.spec.options.clone())?);
        Ok(())
    }

    /// This core's state moved out, leaving one that holds nothing.
    pub(crate) fn take(&mut self) -> Core<S> {
        let spent = Core {
            spec: Arc::clone(&self.spec),
            settings: None,
            cancel: OnceLock::new(),
            held: false,
            dead: false,
            _scope: PhantomData,
        };
        std::mem::replace(self, spent)
    }

    /// Checks a connection out of `pool` for this lock.
    pub(crate) fn checkout<M>(&self, pool: &Pool<M>) -> Result<PooledConnection<M>>
    where
        M: ManageConnection<Connection = Client>,
    {
        self.checkout_within(pool, None)
    }

    /// A checkout that gives up after `within` when that is sooner than the pool's own
    /// `connection_timeout`.
    pub(crate) fn checkout_within<M>(
        &self,
        pool: &Pool<M>,
        within: Option<Duration>,
    ) -> Result<PooledConnection<M>>
    where
        M: ManageConnection<Connection = Client>,
    {
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
    fn check_cancelled(&self) -> Result<()> {
        self.cancel.get().map_or(Ok(()), |c| c.check())
    }

    fn cancelled(&self) -> Error {
        crate::metrics::cancelled(Self::metric_kind(), &self.spec.key);
        Error::Cancelled {
            key: self.spec.key.clone(),
        }
    }

    /// The `kind` label of this lock's metrics.
    pub(crate) fn metric_kind() -> &'static str {
        match S::KIND {
            Kind::Session => "session",
            Kind::Transaction => "transaction",
        }
    }

    /// The critical section had the connection: it may have changed settings.
    pub(crate) fn forget_settings(&mut self) {
        self.settings = None;
    }

    /// Takes the lock within `limit`. On `Ok(Locked)` a guard must be handed out; on every
    /// other return the connection holds nothing new.
    pub(crate) fn acquire<M>(
        &mut self,
        conn: &mut PooledConnection<M>,
        limit: Limit,
    ) -> Result<Outcome>
    where
        M: ManageConnection<Connection = Client>,
    {
        // Release a leaked guard's lock first, or a session lock would stack a second level
        // on the server that one unlock does not free.
        self.release_leaked(conn);
        self.check_cancelled()?;
        let start = Instant::now();
        let outcome = match (limit, self.spec.options.wait_mode) {
            (Limit::Try, _) => {
                if self.try_once(conn)? {
                    Outcome::Locked
                } else {
                    Outcome::Busy {
                        waited: start.elapsed(),
                    }
                }
            }
            (_, WaitMode::Server) => self.wait_on_server(conn, limit, start)?,
            (
                _,
                WaitMode::Poll {
                    min_interval,
                    max_interval,
                },
            ) => {
                let cancel = self.cancel.get().cloned();
                wait::poll(limit, min_interval, max_interval, cancel.as_deref(), || {
                    self.try_once(conn)
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
                    "locked {} ({:?}, {:?}) after {:?}",
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

    /// One non-blocking try: whether it locked.
    fn try_once<M>(&mut self, conn: &mut PooledConnection<M>) -> Result<bool>
    where
        M: ManageConnection<Connection = Client>,
    {
        let spec = Arc::clone(&self.spec);
        let (mode, key) = (spec.options.mode, &spec.key);
        let learn = self.settings.is_none();
        match S::KIND {
            Kind::Session => {
                let which = if learn {
                    Statement3::TryLearning
                } else {
                    Statement3::Try
                };
                let reply = run_prepared(conn, which, &spec, None);
                let row = match reply {
                    Ok(rows) => last(rows),
                    Err(e) => return Err(self.failed_acquire(conn, e)),
                };
                if learn {
                    self.learn(&row, 1);
                }
                if col(&row, 0) == Some(sql::IN_TRANSACTION) {
                    return Err(self.refuse_in_transaction(conn));
                }
                if let Some(other) = sql::shared_marker(col(&row, 0)) {
                    return Err(self.shared_session(Some(other)));
                }
                Ok(col(&row, 0) != Some(""))
            }
            Kind::Transaction => {
                let row = match simple(conn, &sql::tx_try(mode, key, learn)) {
                    Ok(rows) => last(rows),
                    Err(e) => return Err(self.failed_acquire(conn, e)),
                };
                if learn {
                    self.learn(&row, 1);
                }
                if col(&row, 0) == Some(sql::IN_TRANSACTION) {
                    return Err(self.refuse_in_transaction(conn));
                }
                if truthy(col(&row, 0)) {
                    return Ok(true);
                }
                if col(&row, 0).is_none() {
                    return Err(self.refuse_shared_tx(conn));
                }
                // The try opened a transaction; end it before reporting "busy".
                self.end_transaction(conn, "after a failed try")?;
                Ok(false)
            }
        }
    }

    /// One statement that waits on the server, bounded by `lock_timeout`.
    fn wait_on_server<M>(
        &mut self,
        conn: &mut PooledConnection<M>,
        limit: Limit,
        start: Instant,
    ) -> Result<Outcome>
    where
        M: ManageConnection<Connection = Client>,
    {
        let ms = match limit {
            Limit::For(d) => timeout_ms(&self.spec.key, "timeout", d)?,
            _ => 0,
        };
        let spec = Arc::clone(&self.spec);
        let (mode, key, token) = (spec.options.mode, &spec.key, spec.token.as_str());
        let settings = self.settings;
        let quiet = settings.is_some_and(|s| s.quiet);
        if let Some(cancel) = self.cancel.get() {
            cancel.begin_server_wait()?;
        }
        // With the settings quiet, one prepared statement (a transaction lock: one that
        // leaves lock_timeout alone if it already has the wanted value); else a batch that
        // lifts them.
        let result = match (S::KIND, settings) {
            // lock_timeout already has the wanted value: the wait leaves it alone.
            (Kind::Session, Some(s)) if s.quiet && s.no_lock_timeout && ms == 0 => {
                run_prepared(conn, Statement3::WaitPlain, &spec, None)
            }
            (Kind::Session, Some(s)) if s.quiet => {
                run_prepared(conn, Statement3::Wait, &spec, Some(ms))
            }
            (Kind::Session, _) => {
                let wait = sql::session_wait(mode, key, Args::Lifted, token, Some(ms));
                simple(conn, &format!("{}{wait}", sql::wait_comment(key)))
            }
            (Kind::Transaction, settings) => {
                let how = match settings {
                    Some(s) if s.quiet && s.no_lock_timeout && ms == 0 => sql::TxWait::Plain,
                    Some(s) if s.quiet => sql::TxWait::SetLockTimeout,
                    _ => sql::TxWait::Lift,
                };
                let wait = sql::tx_wait(mode, key, ms, how);
                simple(conn, &format!("{}{wait}", sql::wait_comment(key)))
            }
        };
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
        match result {
            Ok(rows) => {
                if !quiet {
                    // The lifting batch's first row is the settings.
                    let first = rows.first().cloned().unwrap_or_default();
                    self.learn(&first, 0);
                }
                let row = last(rows);
                if col(&row, 0) == Some(sql::IN_TRANSACTION) {
                    return Err(self.refuse_in_transaction(conn));
                }
                if S::KIND == Kind::Session {
                    if let Some(other) = sql::shared_marker(col(&row, 0)) {
                        return Err(self.shared_session(Some(other)));
                    }
                }
                if S::KIND == Kind::Transaction && !truthy(col(&row, 0)) {
                    return Err(self.refuse_shared_tx(conn));
                }
                Ok(Outcome::Locked)
            }
            Err(e) => {
                let failure = self.classify(conn, &e);
                let error = self.failed_acquire(conn, e);
                if end == WaitEnd::CancelledQuietly {
                    // Cancelled, but no request could be sent: the wait ended by itself.
                    return Err(self.cancelled());
                }
                // A wait with no bound set no lock_timeout of its own when the session had
                // none: a lock_timeout that cut it came behind pglock's back (a
                // configuration reload), like a statement_timeout below.
                let stale_lock_timeout =
                    failure == Failure::LockTimeout && ms == 0 && settings.is_some();
                if failure == Failure::LockTimeout && !stale_lock_timeout {
                    return Ok(Outcome::Busy {
                        waited: start.elapsed(),
                    });
                }
                if end == WaitEnd::Normal
                    && (stale_lock_timeout || (failure == Failure::Canceled && quiet))
                {
                    // A timeout the session got behind pglock's back (a configuration
                    // reload) cut a wait that did not lift it: what pglock knew of the
                    // settings is stale. Forget it and wait out the rest, lifted.
                    debug!("lock {}: the session's timeouts changed; lifting them", key);
                    self.forget_settings();
                    let rest = match limit {
                        Limit::For(bound) => match bound.checked_sub(start.elapsed()) {
                            Some(rest) if !rest.is_zero() => Limit::For(rest),
                            _ => {
                                return Ok(Outcome::Busy {
                                    waited: start.elapsed(),
                                })
                            }
                        },
                        other => other,
                    };
                    return self.wait_on_server(conn, rest, start);
                }
                Err(error)
            }
        }
    }

    /// Remembers the settings in `row`, from column `at`: `statement_timeout`,
    /// `transaction_timeout`, `lock_timeout`.
    fn learn(&mut self, row: &Row, at: usize) {
        let (statement, transaction, lock) = (col(row, at), col(row, at + 1), col(row, at + 2));
        let standby = truthy(col(row, at + 3));
        self.settings = statement.map(|statement| Settings {
            quiet: statement == "0" && matches!(transaction, None | Some("0")),
            no_lock_timeout: lock == Some("0"),
            standby,
        });
    }

    /// A transaction lock found its server session holding the key for another client's
    /// session lock (a transaction-mode pooler in between): taking it would be a second
    /// grant. Ends the transaction it began and reports the other client's marker.
    fn refuse_shared_tx<M>(&mut self, conn: &mut PooledConnection<M>) -> Error
    where
        M: ManageConnection<Connection = Client>,
    {
        match simple(conn, &sql::tx_refuse_shared()) {
            Ok(rows) => self.shared_session(col(&last(rows), 0)),
            Err(e) => match self.end_transaction(conn, "after a refused lock") {
                Err(error) => error,
                Ok(()) => self.database("lock", e),
            },
        }
    }

    /// A lock statement found a transaction block open before it (left by whoever last had
    /// the connection) and took nothing: a session lock's marker set inside it would be
    /// undone by its rollback while the lock stayed, and a transaction lock's `BEGIN` would
    /// have joined it and committed its work with the lock's. Rolls it back and reports it.
    fn refuse_in_transaction<M>(&mut self, conn: &mut PooledConnection<M>) -> Error
    where
        M: ManageConnection<Connection = Client>,
    {
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
    fn end_stray_transaction<M>(&mut self, conn: &mut PooledConnection<M>) -> Result<()>
    where
        M: ManageConnection<Connection = Client>,
    {
        take_aborted_open_transaction(conn);
        self.end_transaction(conn, "left open before the lock")
    }

    fn shared_session(&self, other: Option<&str>) -> Error {
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
    /// A wait can be granted just as `lock_timeout`, a cancel or another error ends it.
    /// A transaction lock is undone by ending the transaction; a session lock is looked up
    /// in `pg_locks` and released if it was taken. (Its marker was rolled back with the
    /// failed statement.)
    fn failed_acquire<M>(&mut self, conn: &mut PooledConnection<M>, e: postgres::Error) -> Error
    where
        M: ManageConnection<Connection = Client>,
    {
        let failure = self.classify(conn, &e);
        let cleaned = match (S::KIND, failure) {
            // The session is gone, and everything it held with it.
            (_, Failure::Closed) => Ok(()),
            // The failed batch left its transaction open (aborted): end it.
            (Kind::Transaction, _) => self.end_transaction(conn, "after a failed lock"),
            // A deadlock aborts the wait and a full lock table refuses it: neither grants
            // the lock, and scanning pg_locks with a full lock table is slow.
            (Kind::Session, Failure::Deadlock | Failure::OutOfSharedMemory) => Ok(()),
            // The connection came inside a failed transaction: nothing ran. End it.
            (Kind::Session, Failure::InFailedTransaction) => self.end_stray_transaction(conn),
            (Kind::Session, _) => self.release_taken(conn),
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

    /// Releases the session lock if a failed wait took it after all.
    fn release_taken<M>(&mut self, conn: &mut PooledConnection<M>) -> Result<()>
    where
        M: ManageConnection<Connection = Client>,
    {
        let sql = sql::release_taken(self.spec.options.mode, &self.spec.key);
        match run_retrying(conn, &sql) {
            Ok(rows) => {
                if !rows.is_empty() {
                    debug!(
                        "lock {} was granted as its wait failed; released it",
                        self.spec.key
                    );
                }
                Ok(())
            }
            Err(e) => {
                let why = format!("cannot release what a failed wait took: {}", describe(&e));
                self.end_session(conn, &why);
                Err(self.database("lock cleanup", e))
            }
        }
    }

    /// Ends the current transaction with `ROLLBACK` (and `then`, in the same batch); ends
    /// the session if that fails.
    fn end_transaction_with<M>(
        &mut self,
        conn: &mut PooledConnection<M>,
        then: &str,
        when: &str,
    ) -> Result<()>
    where
        M: ManageConnection<Connection = Client>,
    {
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

    fn end_transaction<M>(&mut self, conn: &mut PooledConnection<M>, when: &str) -> Result<()>
    where
        M: ManageConnection<Connection = Client>,
    {
        self.end_transaction_with(conn, "", when)
    }

    /// Releases the lock however its scope needs: unlock (rolling back a transaction left
    /// open), or roll back the lock's transaction.
    pub(crate) fn release<M>(&mut self, conn: &mut PooledConnection<M>, used: bool) -> Result<()>
    where
        M: ManageConnection<Connection = Client>,
    {
        self.finish(conn, used, false)
    }

    /// Ends a guard: `success` commits a transaction lock (a session lock unlocks either
    /// way).
    pub(crate) fn finish<M>(
        &mut self,
        conn: &mut PooledConnection<M>,
        used: bool,
        success: bool,
    ) -> Result<()>
    where
        M: ManageConnection<Connection = Client>,
    {
        let result = match (S::KIND, success) {
            (Kind::Session, _) => self.unlock_session(conn, used),
            (Kind::Transaction, true) => self.commit(conn, used),
            (Kind::Transaction, false) => self.rollback(conn),
        };
        // A session unlock's reply tells the settings as the critical section left them;
        // nothing else does.
        if used && (S::KIND == Kind::Transaction || result.is_err()) {
            self.forget_settings();
        }
        result
    }

    /// Releases a lock that was taken but must not be handed out. Never fails: a release
    /// that cannot be confirmed ends the session.
    fn release_quietly<M>(&mut self, conn: &mut PooledConnection<M>)
    where
        M: ManageConnection<Connection = Client>,
    {
        if let Err(e) = self.release(conn, false) {
            debug!("lock {}: release of an unwanted lock: {e}", self.spec.key);
        }
    }

    /// Releases the lock of a guard leaked with `mem::forget`, if there is one: before the
    /// next acquisition, and before the connection leaves the lock.
    pub(crate) fn release_leaked<M>(&mut self, conn: &mut PooledConnection<M>)
    where
        M: ManageConnection<Connection = Client>,
    {
        if self.held {
            if let Err(e) = self.release(conn, true) {
                warn!("{e}");
            }
        }
    }

    /// Unlocks a session lock. `used`: the critical section had the connection, so the
    /// unlock lifts the session's timeouts and checks for a transaction left open. A
    /// failed transaction left open is rolled back (the unlock cannot run inside it); so
    /// is a healthy one, but that is an error: its work is lost.
    fn unlock_session<M>(&mut self, conn: &mut PooledConnection<M>, used: bool) -> Result<()>
    where
        M: ManageConnection<Connection = Client>,
    {
        if !self.held {
            return Ok(());
        }
        self.held = false;
        let spec = Arc::clone(&self.spec);
        let (mode, key, token) = (spec.options.mode, &spec.key, spec.token.as_str());
        let quiet = self.settings.is_some_and(|s| s.quiet);
        // The session's timeouts were quiet when the lock was taken: the critical section
        // can only have changed them through the connection (`used`), and then the unlock
        // reads them again. Should a timeout the critical section set cancel the unlock,
        // the retry lifts it.
        let mut lift = !quiet;
        let which = if used {
            Statement3::UnlockLearning
        } else {
            Statement3::Unlock
        };
        let mut retried = false;
        let mut left_open = false;
        loop {
            let reply = if lift {
                simple(
                    conn,
                    &sql::session_unlock(mode, key, Args::Lifted, token, true),
                )
            } else {
                run_prepared(conn, which, &spec, None)
            };
            let error = match reply {
                Ok(rows) => {
                    let first = rows.first().cloned().unwrap_or_default();
                    let row = last(rows);
                    if lift {
                        self.learn(&first, 0);
                    } else if used {
                        self.learn(&row, 2);
                    }
                    let unlocked = self.unlocked(conn, &row);
                    if left_open && unlocked.is_ok() {
                        return Err(Error::TransactionLeftOpen {
                            key: self.spec.key.clone(),
                        });
                    }
                    return unlocked;
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
                    // The critical section left a failed transaction open; its work failed
                    // with an error the caller saw. End it, then unlock. Unless pglock's
                    // own EXECUTE made it fail: then it was healthy, and its work is lost.
                    left_open = take_aborted_open_transaction(conn);
                    retried = true;
                    lift = true;
                    self.end_transaction(conn, "of a failed transaction left open")?;
                }
                Failure::Canceled if !retried => {
                    // A statement_timeout or a late cancel request: again, lifted.
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

    /// Reads the reply of a session unlock.
    fn unlocked<M>(&mut self, conn: &mut PooledConnection<M>, row: &Row) -> Result<()>
    where
        M: ManageConnection<Connection = Client>,
    {
        if let Some(other) = sql::shared_marker(col(row, 0)) {
            // Another client's server session: nothing was touched there, and ours is out
            // of reach.
            return Err(self.shared_session(Some(other)));
        }
        let unlocked = truthy(col(row, 0));
        if truthy(col(row, 1)) {
            // A healthy transaction was left open: the unlock and the marker's clearing
            // ran inside it. Roll it back and clear the marker again, outside it.
            warn!(
                "lock {}: the critical section left a transaction open; rolling it back",
                self.spec.key
            );
            let clear = sql::clear_session_marker(&self.spec.token);
            self.end_transaction_with(conn, &clear, "of a transaction left open")?;
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
            "lock {} was lost: pg_advisory_unlock returned false (the session no longer \
             held it)",
            self.spec.key
        );
        Err(self.lost(LostReason::NotHeld, None))
    }

    /// Commits the lock's transaction, which ends the transaction lock. The check that the
    /// transaction is still the lock's runs in SQL before `COMMIT`.
    fn commit<M>(&mut self, conn: &mut PooledConnection<M>, used: bool) -> Result<()>
    where
        M: ManageConnection<Connection = Client>,
    {
        if !self.held {
            return Ok(());
        }
        self.held = false;
        if conn.is_closed() {
            // Known dead before the commit was sent: nothing was committed.
            return Err(self.lost(LostReason::SessionEnded, None));
        }
        // A critical section that never had the connection cannot have ended the
        // transaction or made it fail: a plain COMMIT then.
        let commit = if used {
            sql::tx_commit(&self.spec.key)
        } else {
            "COMMIT".to_owned()
        };
        let error = match conn.simple_query(&commit) {
            Ok(_) => {
                debug!("committed and unlocked {}", self.spec.key);
                return Ok(());
            }
            Err(e) => e,
        };
        let closed = self.classify(conn, &error) == Failure::Closed;
        if closed
            && error.code() == Some(&postgres::error::SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT)
        {
            // The server ended the session while it sat idle in the transaction, before
            // COMMIT arrived: nothing was committed.
            warn!(
                "lock {} was lost: idle_in_transaction_session_timeout ended its session \
                 before COMMIT; nothing was committed",
                self.spec.key
            );
            return Err(self.lost(LostReason::SessionEnded, Some(error)));
        }
        if closed {
            warn!(
                "lock {}: the connection closed during COMMIT; whether it committed is \
                 unknown ({})",
                self.spec.key,
                describe(&error)
            );
            return Err(Error::CommitOutcomeUnknown {
                key: self.spec.key.clone(),
                source: error,
            });
        }
        // The check or COMMIT failed; either way nothing was committed and a transaction
        // may still be open (the check's, or one the critical section began).
        let ended = error
            .as_db_error()
            .is_some_and(|db| db.message().contains(sql::TX_LOST));
        let rolled_back = self.end_transaction(conn, "after a failed commit");
        if ended {
            warn!(
                "lock {} was lost: its transaction was ended inside the critical section; \
                 what ran after that was rolled back",
                self.spec.key
            );
            return Err(self.lost(LostReason::TransactionEnded, None));
        }
        rolled_back?;
        Err(self.database("commit", error))
    }

    /// Rolls back the lock's transaction, which ends the transaction lock.
    fn rollback<M>(&mut self, conn: &mut PooledConnection<M>) -> Result<()>
    where
        M: ManageConnection<Connection = Client>,
    {
        if !self.held {
            return Ok(());
        }
        self.held = false;
        self.end_transaction(conn, "of the lock's transaction")?;
        debug!("rolled back and unlocked {}", self.spec.key);
        Ok(())
    }

    /// Asks the server whether this session holds the lock.
    pub(crate) fn is_held(&mut self, client: &mut Client) -> Result<bool> {
        let sql = sql::is_held(self.spec.options.mode, &self.spec.key);
        match simple(client, &sql) {
            Ok(rows) => Ok(truthy(col(&last(rows), 0))),
            Err(e) if self.classify(client, &e) == Failure::Closed => Ok(false),
            Err(e) => Err(self.database("is_held", e)),
        }
    }

    /// Classifies an error, and remembers a session seen to end.
    fn classify(&mut self, client: &Client, e: &postgres::Error) -> Failure {
        let failure = failure_of(client, e);
        if failure == Failure::Closed {
            self.dead = true;
        }
        failure
    }

    /// Ends the database session: the server frees every lock it held, and the client
    /// reports closed, so r2d2 discards the connection instead of reusing it. Where
    /// `pg_terminate_backend` is refused, the session is made to time out at once.
    fn end_session(&mut self, client: &mut Client, why: &str) {
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

    fn database(&self, operation: &'static str, source: postgres::Error) -> Error {
        Error::Database {
            key: self.spec.key.clone(),
            operation,
            source,
        }
    }
}

impl Spec {
    fn new(key: LockKey, options: LockOptions) -> Result<Spec> {
        options.validate(&key)?;
        Ok(Spec {
            // Ends with the key: see the session marker in sql.rs.
            token: format!("{}@{}", super::coord::marker_prefix(), sql::tx_marker(&key)),
            key,
            options,
        })
    }

    /// The arguments of a prepared session statement as literals: the key, the token,
    /// then `ms` (digits only, as everything here).
    fn execute_args(&self, ms: Option<u32>) -> String {
        let mut args = format!("{}, {}", self.key.sql_args(), sql::literal(&self.token));
        if let Some(ms) = ms {
            args.push_str(&format!(", '{ms}'"));
        }
        args
    }
}

/// Which prepared session statement.
#[derive(Debug, Clone, Copy)]
enum Statement3 {
    Try,
    /// A try that also reads the session's settings.
    TryLearning,
    Wait,
    Unlock,
    /// An unlock that also reads the session's settings.
    UnlockLearning,
    /// A wait that leaves `lock_timeout` as the session has it (already the wanted value).
    WaitPlain,
}

/// The text of a prepared session statement: one per statement, mode and key space, made
/// once per process.
fn prepared_text(which: Statement3, mode: LockMode, key: &LockKey) -> &'static str {
    static TEXTS: [OnceLock<String>; 24] = [const { OnceLock::new() }; 24];
    let pair = key.as_pair().is_some();
    let i = (which as usize) * 4 + usize::from(mode == LockMode::Shared) * 2 + usize::from(pair);
    TEXTS[i].get_or_init(|| {
        // The key's value does not matter with parameters, only its space.
        let key = if pair {
            LockKey::pair(0, 0)
        } else {
            LockKey::new(0)
        };
        match which {
            Statement3::Try => sql::session_try(mode, &key, Args::Params, "", false),
            Statement3::TryLearning => sql::session_try(mode, &key, Args::Params, "", true),
            Statement3::Wait => sql::session_wait(mode, &key, Args::Params, "", Some(0)),
            Statement3::WaitPlain => sql::session_wait(mode, &key, Args::Params, "", None),
            Statement3::Unlock => sql::session_unlock(mode, &key, Args::Params, "", false),
            Statement3::UnlockLearning => sql::session_unlock(mode, &key, Args::Params, "", true),
        }
    })
}

/// Prepared statements of one connection, kept in its r2d2 extensions so they outlive
/// the lock that prepared them. SQL-level `PREPARE` with names unique to the connection
/// (the protocol-level names of the `postgres` crate, `s0`, `s1`, ..., are the same in
/// every process, so behind a pooler one client could execute another's statement).
#[derive(Default)]
struct Prepared {
    /// Statement text to its name.
    names: HashMap<&'static str, String>,
    /// Makes the names unique to this connection.
    prefix: String,
    /// Statements that vanished (`DEALLOCATE`, `DISCARD ALL`, a pooler): after two,
    /// send the statements unprepared, still one round trip each.
    vanished: u32,
    /// The number in the next statement's name: names are never reused, since a
    /// `PREPARE` whose batch failed may or may not have taken.
    next: u32,
    /// Set when an `EXECUTE` of a vanished statement aborted a healthy transaction that
    /// the critical section had left open (its work is lost: the caller must hear of it).
    aborted_open_transaction: bool,
}

/// Takes the flag that says pglock's own failed `EXECUTE` aborted a transaction the
/// critical section had left open (healthy until then).
fn take_aborted_open_transaction<M>(conn: &mut PooledConnection<M>) -> bool
where
    M: ManageConnection<Connection = Client>,
{
    PooledConnection::extensions_mut(conn)
        .get_mut::<Prepared>()
        .is_some_and(|p| std::mem::take(&mut p.aborted_open_transaction))
}

/// Runs a prepared session statement; the first use on a connection prepares it in the
/// same round trip. Falls back to the same statement unprepared where prepared ones do
/// not work.
fn run_prepared<M>(
    conn: &mut PooledConnection<M>,
    which: Statement3,
    spec: &Spec,
    ms: Option<u32>,
) -> Result<Vec<Row>, postgres::Error>
where
    M: ManageConnection<Connection = Client>,
{
    let (mode, key, token) = (spec.options.mode, &spec.key, spec.token.as_str());
    let unprepared = || match which {
        Statement3::Try => sql::session_try(mode, key, Args::Literals, token, false),
        Statement3::TryLearning => sql::session_try(mode, key, Args::Literals, token, true),
        Statement3::Wait | Statement3::WaitPlain => {
            sql::session_wait(mode, key, Args::Literals, token, ms)
        }
        Statement3::Unlock => sql::session_unlock(mode, key, Args::Literals, token, false),
        Statement3::UnlockLearning => sql::session_unlock(mode, key, Args::Literals, token, true),
    };
    let text = prepared_text(which, mode, key);
    let mut prepared = PooledConnection::extensions_mut(conn)
        .remove::<Prepared>()
        .unwrap_or_default();
    let execute = format!("EXECUTE {{}}({})", spec.execute_args(ms));
    let (sql, new) = match prepared.names.get(text) {
        _ if prepared.vanished >= 2 => (unprepared(), false),
        Some(name) => (execute.replace("{}", name), false),
        None => {
            if prepared.prefix.is_empty() {
                prepared.prefix = format!("{:x}", wait::seed());
            }
            let name = format!("pglock_{}_{}", prepared.prefix, prepared.next);
            prepared.next += 1;
            let types = match (key.as_pair().is_some(), which) {
                (false, Statement3::Wait) => "bigint, text, text",
                (false, _) => "bigint, text",
                (true, Statement3::Wait) => "integer, integer, text, text",
                (true, _) => "integer, integer, text",
            };
            let sql = format!(
                "PREPARE {name}({types}) AS {text}; {}",
                execute.replace("{}", &name)
            );
            prepared.names.insert(text, name);
            (sql, true)
        }
    };
    // A waiting session says what it waits for in pg_stat_activity.query.
    let sql = match which {
        Statement3::Wait | Statement3::WaitPlain => format!("{}{sql}", sql::wait_comment(key)),
        _ => sql,
    };
    let result = simple(conn, &sql);
    if new && result.is_err() {
        // The PREPARE may not have taken (in a failed transaction, say): prepare again
        // next time, under a new name in case it did.
        prepared.names.remove(text);
    }
    let vanished = matches!(&result, Err(e) if !new
        && e.code() == Some(&postgres::error::SqlState::INVALID_SQL_STATEMENT_NAME));
    if vanished {
        debug!("a prepared statement vanished; sending it unprepared");
        prepared.names.clear();
        prepared.prefix.clear(); // new names: some of the old ones may still exist
        prepared.vanished += 1;
    }
    PooledConnection::extensions_mut(conn).insert(prepared);
    if !vanished {
        return result;
    }
    let fallback = match which {
        Statement3::Wait | Statement3::WaitPlain => {
            simple(conn, &format!("{}{}", sql::wait_comment(key), unprepared()))
        }
        _ => simple(conn, &unprepared()),
    };
    if matches!(&fallback, Err(e)
        if e.code() == Some(&postgres::error::SqlState::IN_FAILED_SQL_TRANSACTION))
    {
        // The EXECUTE found no statement (26000) rather than a failed transaction (25P02):
        // the transaction was healthy until that EXECUTE aborted it, so the critical
        // section had left a healthy transaction open, and its work is now lost.
        if let Some(p) = PooledConnection::extensions_mut(conn).get_mut::<Prepared>() {
            p.aborted_open_transaction = true;
        }
    }
    fallback
}

/// Runs a simple-protocol batch and returns its rows as text.
fn simple(client: &mut Client, sql: &str) -> Result<Vec<Row>, postgres::Error> {
    Ok(rows(client.simple_query(sql)?))
}

fn rows(messages: Vec<SimpleQueryMessage>) -> Vec<Row> {
    messages
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.try_get(i).ok().flatten().map(str::to_owned))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// The last row of a reply (empty if none).
fn last(mut rows: Vec<Row>) -> Row {
    rows.pop().unwrap_or_default()
}

/// Column `i` of a row; `None` for NULL or a missing column. Never panics.
fn col(row: &Row, i: usize) -> Option<&str> {
    row.get(i).and_then(|c| c.as_deref())
}

/// A boolean as the simple protocol (`t`) or a text cast (`true`) prints it.
fn truthy(value: Option<&str>) -> bool {
    matches!(value, Some("t" | "true"))
}

/// Classifies an error, also looking at the client: a session ended by the server is
/// first reported as a FATAL error on a client that does not know yet that it is closed.
fn failure_of(client: &Client, e: &postgres::Error) -> Failure {
    if client.is_closed() {
        Failure::Closed
    } else {
        Failure::of(e)
    }
}

/// Runs a cleanup batch; runs it once more if a cancel request cancelled it (a cancel
/// request can arrive after the statement it was meant for).
fn run_retrying(client: &mut Client, sql: &str) -> Result<Vec<Row>, postgres::Error> {
    match simple(client, sql) {
        Err(e) if failure_of(client, &e) == Failure::Canceled => simple(client, sql),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepared_texts_are_made_once_per_statement_mode_and_key_space() {
        let a = prepared_text(Statement3::Try, LockMode::Exclusive, &LockKey::new(1));
        let b = prepared_text(Statement3::Try, LockMode::Exclusive, &LockKey::new(2));
        assert!(std::ptr::eq(a, b));
        let pair = prepared_text(Statement3::Unlock, LockMode::Shared, &LockKey::pair(1, 2));
        assert!(pair.contains("pg_advisory_unlock_shared($1, $2)"), "{pair}");
        let wait = prepared_text(Statement3::Wait, LockMode::Exclusive, &LockKey::new(1));
        assert!(
            wait.contains("set_config('lock_timeout', $3, true)"),
            "{wait}"
        );
        let plain = prepared_text(Statement3::WaitPlain, LockMode::Exclusive, &LockKey::new(1));
        assert!(!plain.contains("lock_timeout"), "{plain}");
        assert!(plain.contains("pg_advisory_lock($1)"), "{plain}");
    }

    #[test]
    fn replies_are_read_without_panicking() {
        let row: Row = vec![Some("t".into()), None];
        assert!(truthy(col(&row, 0)));
        assert_eq!(col(&row, 1), None);
        assert_eq!(col(&row, 7), None);
        assert!(!truthy(Some("false")));
        assert!(last(Vec::new()).is_empty());
    }

    #[test]
    fn tokens_are_safe_literals() {
        let spec = Spec::new(LockKey::new(1), LockOptions::new()).unwrap();
        assert!(spec
            .token
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ":@,-".contains(c)));
        assert!(spec.token.ends_with("@1"), "{}", spec.token);
        let pair = Spec::new(LockKey::pair(-1, 2), LockOptions::new()).unwrap();
        assert!(pair.token.ends_with("@-1,2"), "{}", pair.token);
        let other = Spec::new(LockKey::new(1), LockOptions::new()).unwrap();
        assert_ne!(spec.token, other.token);
    }
}
