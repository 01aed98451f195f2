//! The engine shared by `SessionLock` and `TxLock`: the SQL they send, how they wait, and
//! how every failure path leaves the connection clean.
//!
//! Invariant: while no guard is out (`held == false`), the connection holds no advisory
//! lock taken by this engine and no transaction opened by it. Every path that cannot
//! confirm that ends the database session instead, so the server frees everything and
//! r2d2 discards the connection.

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use log::{debug, warn};
use postgres::{Client, SimpleQueryMessage, SimpleQueryRow};
use r2d2::{ManageConnection, Pool, PooledConnection};

use crate::cancel::{CancelHandle, CancelState, WaitEnd};
use crate::error::{describe, Failure, LostReason};
use crate::options::{timeout_ms, LockOptions};
use crate::{Error, LockKey, LockMode, Result, WaitMode};

/// Session-level or transaction-level advisory locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    Session,
    Transaction,
}

/// How long an acquisition may wait.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Limit {
    /// One non-blocking try.
    Try,
    /// Wait at most this long (never zero: zero is `Try`).
    For(Duration),
    /// Wait until the lock is free.
    Forever,
}

/// The result of an acquisition that did not fail.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Outcome {
    /// Locked.
    Locked,
    /// Still held elsewhere when the limit passed, after waiting this long.
    Busy { waited: Duration },
}

/// A transaction-local setting that marks the lock's transaction: `SHOW` reads it back
/// before `COMMIT`, empty once the transaction has ended (it reverts at the end of the
/// transaction that set it), and fails in an aborted transaction so that `COMMIT` never
/// silently rolls back. It is a placeholder, not listed in `pg_settings`.
const TX_MARKER: &str = "pglock.tx_lock";
/// Reads the marker back, then commits.
const TX_COMMIT: &str = "SHOW pglock.tx_lock; COMMIT";

/// Ends this backend. The `ROLLBACK` first lets it run inside an aborted transaction,
/// where any other statement fails with 25P02 (outside a transaction it only warns).
const TERMINATE: &str =
    "ROLLBACK; SELECT pg_catalog.pg_terminate_backend(pg_catalog.pg_backend_pid())";

/// The statements of one lock. Those of every lock and unlock are built once, when the
/// lock is made; the rest when needed.
#[derive(Debug)]
struct Sql {
    scope: Scope,
    mode: LockMode,
    /// The key as the functions' arguments: `42` or `1, 2`.
    args: String,
    /// Transaction locks: the marker's value (the key); empty for session locks.
    marker: String,
    try_lock: String,
    /// The wait statement for the configured `lock_timeout`, or for no bound.
    wait_default: String,
    /// Session locks: the unlock statement; empty for transaction locks.
    unlock: String,
}

impl Sql {
    fn new(scope: Scope, mode: LockMode, key: &LockKey, default_ms: u32) -> Sql {
        let args = key.sql_args();
        let m = mode.fn_suffix();
        let (marker, try_lock, unlock) = match scope {
            Scope::Session => (
                String::new(),
                format!("SELECT pg_catalog.pg_try_advisory_lock{m}({args})"),
                format!(
                    "SET LOCAL statement_timeout = 0; SELECT pg_catalog.pg_advisory_unlock{m}({args})"
                ),
            ),
            Scope::Transaction => {
                // Integers and commas only: safe inside a quoted literal.
                let marker = args.replace(' ', "");
                let try_lock = format!(
                    "BEGIN; SET LOCAL {TX_MARKER} = '{marker}'; \
                     SELECT pg_catalog.pg_try_advisory_xact_lock{m}({args})"
                );
                (marker, try_lock, String::new())
            }
        };
        let mut sql = Sql {
            scope,
            mode,
            args,
            marker,
            try_lock,
            wait_default: String::new(),
            unlock,
        };
        sql.wait_default = sql.wait(default_ms);
        sql
    }

    /// The wait statement with `lock_timeout` set to `ms` (0: no bound).
    ///
    /// statement_timeout is lifted for the wait (and the unlock), so that a short role- or
    /// session-level setting cannot cancel them. SET LOCAL keeps both changes inside the
    /// batch's own implicit transaction; a transaction lock's batch opens a transaction
    /// that outlives it, so it puts both settings back to their defaults itself.
    fn wait(&self, ms: u32) -> String {
        let (args, m) = (&self.args, self.mode.fn_suffix());
        match self.scope {
            Scope::Session => format!(
                "SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = {ms}; \
                 SELECT pg_catalog.pg_advisory_lock{m}({args})"
            ),
            Scope::Transaction => format!(
                "BEGIN; SET LOCAL {TX_MARKER} = '{}'; \
                 SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = {ms}; \
                 SELECT pg_catalog.pg_advisory_xact_lock{m}({args}); \
                 SET LOCAL lock_timeout TO DEFAULT; SET LOCAL statement_timeout TO DEFAULT",
                self.marker
            ),
        }
    }

    /// Session locks: unlock, and tell whether a transaction is open. In one
    /// simple-protocol Query, now() (the transaction's start) equals statement_timestamp()
    /// unless a transaction was already open before it.
    fn unlock_checked(&self) -> String {
        format!(
            "SET LOCAL statement_timeout = 0; \
             SELECT pg_catalog.pg_advisory_unlock{}({}), \
             pg_catalog.now() < pg_catalog.statement_timestamp()",
            self.mode.fn_suffix(),
            self.args
        )
    }

    /// This session's row for the lock in `pg_locks`, as a `FROM ... WHERE` clause.
    fn held(&self, key: &LockKey) -> String {
        format!(
            "FROM pg_catalog.pg_locks WHERE locktype = 'advisory' \
             AND pid = pg_catalog.pg_backend_pid() AND classid = {} AND objid = {} \
             AND objsubid = {} AND mode = '{}' AND granted",
            key.classid(),
            key.objid(),
            key.objsubid(),
            self.mode.pg_locks_mode()
        )
    }

    /// Session locks: release the lock if a failed wait took it after all.
    fn release_taken(&self, key: &LockKey) -> String {
        format!(
            "SET LOCAL statement_timeout = 0; SELECT pg_catalog.pg_advisory_unlock{}({}) {}",
            self.mode.fn_suffix(),
            self.args,
            self.held(key)
        )
    }

    fn is_held(&self, key: &LockKey) -> String {
        format!("SELECT EXISTS (SELECT {})", self.held(key))
    }
}

/// The state of one lock, apart from its connection.
#[derive(Debug)]
pub(crate) struct Core {
    key: LockKey,
    lock_timeout: Option<Duration>,
    default_ms: u32,
    wait_mode: WaitMode,
    /// Made by the first `cancel_handle()`: until then nobody can cancel, and waits skip
    /// the bookkeeping.
    cancel: OnceLock<Arc<CancelState>>,
    sql: Sql,
    /// A guard is out: the session lock is held, or the lock's transaction is open.
    held: bool,
}

impl Core {
    pub(crate) fn new(scope: Scope, key: LockKey, options: LockOptions) -> Result<Core> {
        options.validate(&key)?;
        let default_ms = match options.lock_timeout {
            Some(t) => timeout_ms(&key, "lock_timeout", t)?,
            None => 0,
        };
        Ok(Core {
            sql: Sql::new(scope, options.mode, &key, default_ms),
            cancel: OnceLock::new(),
            key,
            lock_timeout: options.lock_timeout,
            default_ms,
            wait_mode: options.wait_mode,
            held: false,
        })
    }

    /// Checks a connection out of `pool` for this lock.
    pub(crate) fn checkout<M>(&self, pool: &Pool<M>) -> Result<PooledConnection<M>>
    where
        M: ManageConnection,
    {
        pool.get().map_err(|source| Error::Pool {
            key: self.key.clone(),
            source,
        })
    }

    pub(crate) fn key(&self) -> &LockKey {
        &self.key
    }

    pub(crate) fn mode(&self) -> LockMode {
        self.sql.mode
    }

    pub(crate) fn lock_timeout(&self) -> Option<Duration> {
        self.lock_timeout
    }

    pub(crate) fn wait_mode(&self) -> WaitMode {
        self.wait_mode
    }

    pub(crate) fn is_held_flag(&self) -> bool {
        self.held
    }

    /// A handle on this lock's cancellation state, made on first use. No wait can be in
    /// progress here: waits take the lock by `&mut`.
    pub(crate) fn cancel_handle(&self, client: &Client) -> CancelHandle {
        self.cancel
            .get_or_init(|| CancelState::new(self.key.clone(), client.cancel_token()))
            .handle()
    }

    /// Fails if the lock was cancelled.
    fn check_cancelled(&self) -> Result<()> {
        self.cancel.get().map_or(Ok(()), |c| c.check())
    }

    /// The limit of a blocking `lock()`: the configured `lock_timeout`.
    pub(crate) fn default_limit(&self) -> Limit {
        match self.lock_timeout {
            None => Limit::Forever,
            Some(d) if d.is_zero() => Limit::Try,
            Some(d) => Limit::For(d),
        }
    }

    /// The limit of `try_lock_for(timeout)`, checked against PostgreSQL's range.
    pub(crate) fn limit_for(&self, timeout: Duration) -> Result<Limit> {
        timeout_ms(&self.key, "timeout", timeout)?;
        Ok(if timeout.is_zero() {
            Limit::Try
        } else {
            Limit::For(timeout)
        })
    }

    /// Takes the lock within `limit`. On `Ok(Locked)` a guard must be handed out; on every
    /// other return the connection holds nothing new.
    pub(crate) fn acquire(&mut self, client: &mut Client, limit: Limit) -> Result<Outcome> {
        // Release a leaked guard's lock first, or a session lock would stack a second level
        // on the server that one unlock does not free.
        self.release_leaked(client);
        self.check_cancelled()?;
        let start = Instant::now();
        let outcome = match (limit, self.wait_mode) {
            (Limit::Try, _) => self.try_once(client)?,
            (_, WaitMode::Server) => self.wait_on_server(client, limit, start)?,
            (
                _,
                WaitMode::Poll {
                    min_interval,
                    max_interval,
                },
            ) => self.poll(client, limit, start, min_interval, max_interval)?,
        };
        match outcome {
            Outcome::Locked => {
                self.held = true;
                if self.check_cancelled().is_err() {
                    // Cancelled while the lock was being granted: hand out nothing.
                    self.release_quietly(client);
                    return Err(self.cancelled());
                }
                debug!(
                    "locked {} ({:?}, {:?}) after {:?}",
                    self.key,
                    self.sql.mode,
                    self.sql.scope,
                    start.elapsed()
                );
            }
            Outcome::Busy { waited } => {
                debug!("lock {} is held elsewhere; waited {waited:?}", self.key);
            }
        }
        Ok(outcome)
    }

    fn cancelled(&self) -> Error {
        Error::Cancelled {
            key: self.key.clone(),
        }
    }

    /// One non-blocking try.
    fn try_once(&mut self, client: &mut Client) -> Result<Outcome> {
        let start = Instant::now();
        let row = match query_row(client, &self.sql.try_lock) {
            Ok(row) => row,
            Err(e) => return Err(self.failed_acquire(client, e)),
        };
        if column(row.as_ref(), 0) == Some("t") {
            return Ok(Outcome::Locked);
        }
        if self.sql.scope == Scope::Transaction {
            // The try opened a transaction; end it before reporting "busy".
            self.end_transaction(client, "after a failed try")?;
        }
        Ok(Outcome::Busy {
            waited: start.elapsed(),
        })
    }

    /// One statement that waits on the server, bounded by `lock_timeout`.
    fn wait_on_server(
        &mut self,
        client: &mut Client,
        limit: Limit,
        start: Instant,
    ) -> Result<Outcome> {
        let sql = match limit {
            Limit::For(d) => {
                let ms = timeout_ms(&self.key, "timeout", d)?;
                if ms == self.default_ms {
                    Cow::Borrowed(self.sql.wait_default.as_str())
                } else {
                    Cow::Owned(self.sql.wait(ms))
                }
            }
            _ if self.default_ms == 0 => Cow::Borrowed(self.sql.wait_default.as_str()),
            _ => Cow::Owned(self.sql.wait(0)),
        };
        if let Some(cancel) = self.cancel.get() {
            cancel.begin_server_wait()?;
        }
        let result = query_row(client, &sql);
        let end = self
            .cancel
            .get()
            .map_or(WaitEnd::Normal, |c| c.end_server_wait());
        if end == WaitEnd::CancelRequestSent {
            // The cancel request may land on a later statement, and the lock may have been
            // granted as it arrived: trust nothing on this session any more.
            self.end_session(client, "a cancel request was sent to it during the wait");
            return Err(self.cancelled());
        }
        match result {
            Ok(_) => Ok(Outcome::Locked),
            Err(e) => {
                let failure = failure_of(client, &e);
                let error = self.failed_acquire(client, e);
                if failure == Failure::LockTimeout && end == WaitEnd::Normal {
                    return Ok(Outcome::Busy {
                        waited: start.elapsed(),
                    });
                }
                Err(error)
            }
        }
    }

    /// Non-blocking tries with jittered exponential backoff, outside any transaction.
    fn poll(
        &mut self,
        client: &mut Client,
        limit: Limit,
        start: Instant,
        min_interval: Duration,
        max_interval: Duration,
    ) -> Result<Outcome> {
        let mut backoff = Backoff::new(min_interval, max_interval);
        loop {
            if let Outcome::Locked = self.try_once(client)? {
                return Ok(Outcome::Locked);
            }
            let mut sleep = backoff.next_sleep();
            if let Limit::For(bound) = limit {
                let waited = start.elapsed();
                if waited >= bound {
                    return Ok(Outcome::Busy { waited });
                }
                sleep = sleep.min(bound - waited);
            }
            match self.cancel.get() {
                Some(cancel) => cancel.sleep(sleep)?,
                None => std::thread::sleep(sleep),
            }
        }
    }

    /// Cleans up after an acquiring statement failed, and turns its error into ours.
    ///
    /// A wait can be granted just as `lock_timeout`, a cancel or another error ends it.
    /// A transaction lock is undone by ending the transaction; a session lock is looked up
    /// in `pg_locks` and released if it was taken.
    fn failed_acquire(&mut self, client: &mut Client, e: postgres::Error) -> Error {
        let failure = failure_of(client, &e);
        let cleaned = match (self.sql.scope, failure) {
            // The session is gone, and everything it held with it.
            (_, Failure::Closed) => Ok(()),
            // The failed batch left its transaction open (aborted): end it.
            (Scope::Transaction, _) => self.end_transaction(client, "after a failed lock"),
            // A deadlock aborts the wait and a full lock table refuses it: neither grants
            // the lock, and scanning pg_locks with a full lock table is slow.
            (Scope::Session, Failure::Deadlock | Failure::OutOfSharedMemory) => Ok(()),
            (Scope::Session, _) => self.release_taken(client),
        };
        if let Err(cleanup) = cleaned {
            debug!("lock {}: cleanup after a failed lock: {cleanup}", self.key);
        }
        let key = self.key.clone();
        match failure {
            Failure::Canceled if self.check_cancelled().is_err() => Error::Cancelled { key },
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
    fn release_taken(&mut self, client: &mut Client) -> Result<()> {
        match run_retrying(client, &self.sql.release_taken(&self.key)) {
            Ok(messages) => {
                if messages
                    .iter()
                    .any(|m| matches!(m, SimpleQueryMessage::Row(_)))
                {
                    debug!(
                        "lock {} was granted as its wait failed; released it",
                        self.key
                    );
                }
                Ok(())
            }
            Err(e) => {
                let why = format!("cannot release what a failed wait took: {}", describe(&e));
                self.end_session(client, &why);
                Err(self.database("lock cleanup", e))
            }
        }
    }

    /// Ends the current transaction with `ROLLBACK`; ends the session if that fails.
    fn end_transaction(&mut self, client: &mut Client, when: &str) -> Result<()> {
        match run_retrying(client, "ROLLBACK") {
            Ok(_) => Ok(()),
            Err(e) if failure_of(client, &e) == Failure::Closed => {
                Err(self.lost(LostReason::SessionEnded, Some(e)))
            }
            Err(e) => {
                self.end_session(client, &format!("ROLLBACK {when} failed: {}", describe(&e)));
                Err(self.database("rollback", e))
            }
        }
    }

    /// Releases the lock however its scope needs: unlock (rolling back a transaction left
    /// open), or roll back the lock's transaction.
    fn release(&mut self, client: &mut Client) -> Result<()> {
        match self.sql.scope {
            Scope::Session => self.unlock_session(client, true),
            Scope::Transaction => self.rollback(client),
        }
    }

    /// Releases a lock that was taken but must not be handed out. Never fails: a release
    /// that cannot be confirmed ends the session.
    fn release_quietly(&mut self, client: &mut Client) {
        if let Err(e) = self.release(client) {
            debug!("lock {}: release of an unwanted lock: {e}", self.key);
        }
    }

    /// Releases the lock of a guard leaked with `mem::forget`, if there is one: before the
    /// next acquisition, and before the connection leaves the lock (drop, `into_connection`).
    pub(crate) fn release_leaked(&mut self, client: &mut Client) {
        if self.held {
            if let Err(e) = self.release(client) {
                warn!("{e}");
            }
        }
    }

    /// Unlocks a session lock. A failed transaction the critical section left open is
    /// always rolled back (the unlock cannot run inside it); with `check_transaction`, so
    /// is an open one, for the paths that may leave one behind by accident: an early
    /// return, a panic, a failed `with_lock` body.
    pub(crate) fn unlock_session(
        &mut self,
        client: &mut Client,
        check_transaction: bool,
    ) -> Result<()> {
        debug_assert_eq!(self.sql.scope, Scope::Session);
        if !self.held {
            return Ok(());
        }
        self.held = false;
        let mut retried = false;
        loop {
            let checked;
            let sql = if check_transaction {
                checked = self.sql.unlock_checked();
                &checked
            } else {
                &self.sql.unlock
            };
            let error = match query_row(client, sql) {
                Ok(row) => {
                    let unlocked = column(row.as_ref(), 0) == Some("t");
                    let in_transaction = column(row.as_ref(), 1) == Some("t");
                    if in_transaction {
                        warn!(
                            "lock {}: the critical section left a transaction open; \
                             rolling it back",
                            self.key
                        );
                        self.end_transaction(client, "of a transaction left open")?;
                    }
                    if unlocked {
                        debug!("unlocked {}", self.key);
                        return Ok(());
                    }
                    warn!(
                        "lock {} was lost: pg_advisory_unlock returned false (the session \
                         no longer held it)",
                        self.key
                    );
                    return Err(self.lost(LostReason::NotHeld, None));
                }
                Err(e) => e,
            };
            match failure_of(client, &error) {
                Failure::Closed => {
                    warn!(
                        "lock {} was lost: its session ended ({})",
                        self.key,
                        describe(&error)
                    );
                    return Err(self.lost(LostReason::SessionEnded, Some(error)));
                }
                Failure::InFailedTransaction if !retried => {
                    // The critical section left a failed transaction open: end it, then
                    // unlock.
                    retried = true;
                    self.end_transaction(client, "of a failed transaction left open")?;
                }
                Failure::Canceled if !retried => retried = true,
                _ => {
                    warn!("lock {}: unlock failed: {}", self.key, describe(&error));
                    self.end_session(client, "its unlock failed");
                    return Err(self.database("unlock", error));
                }
            }
        }
    }

    /// Commits the lock's transaction, which ends the transaction lock.
    pub(crate) fn commit(&mut self, client: &mut Client) -> Result<()> {
        debug_assert_eq!(self.sql.scope, Scope::Transaction);
        if !self.held {
            return Ok(());
        }
        self.held = false;
        // SHOW runs first: in a failed transaction it fails (25P02) and COMMIT does not
        // run, instead of COMMIT silently rolling back; and it reads back the marker,
        // which is gone if the critical section ended the lock's transaction.
        match query_row(client, TX_COMMIT) {
            Ok(row) if column(row.as_ref(), 0) == Some(self.sql.marker.as_str()) => {
                debug!("committed and unlocked {}", self.key);
                Ok(())
            }
            Ok(_) => {
                warn!(
                    "lock {} was lost: its transaction was ended inside the critical section",
                    self.key
                );
                Err(self.lost(LostReason::TransactionEnded, None))
            }
            Err(e) if failure_of(client, &e) == Failure::Closed => {
                Err(self.lost(LostReason::SessionEnded, Some(e)))
            }
            Err(e) => {
                // Either SHOW failed and the transaction is still open, or COMMIT failed,
                // which ended it; ROLLBACK is right in the first case and harmless (a
                // warning) in the second.
                let _ = self.end_transaction(client, "after a failed commit");
                Err(self.database("commit", e))
            }
        }
    }

    /// Rolls back the lock's transaction, which ends the transaction lock.
    pub(crate) fn rollback(&mut self, client: &mut Client) -> Result<()> {
        debug_assert_eq!(self.sql.scope, Scope::Transaction);
        if !self.held {
            return Ok(());
        }
        self.held = false;
        self.end_transaction(client, "of the lock's transaction")?;
        debug!("rolled back and unlocked {}", self.key);
        Ok(())
    }

    /// Asks the server whether this session holds the lock.
    pub(crate) fn is_held(&self, client: &mut Client) -> Result<bool> {
        match query_row(client, &self.sql.is_held(&self.key)) {
            Ok(row) => Ok(column(row.as_ref(), 0) == Some("t")),
            Err(e) if failure_of(client, &e) == Failure::Closed => Ok(false),
            Err(e) => Err(self.database("is_held", e)),
        }
    }

    /// Ends the database session: the server frees every lock it held, and the client
    /// reports closed, so r2d2 discards the connection instead of reusing it.
    fn end_session(&mut self, client: &mut Client, why: &str) {
        self.held = false;
        if client.is_closed() {
            return;
        }
        warn!("lock {}: ending its database session: {why}", self.key);
        let mut last = None;
        for _ in 0..2 {
            match client.simple_query(TERMINATE) {
                Err(e) if failure_of(client, &e) == Failure::Canceled => last = Some(e),
                Err(e) => {
                    last = Some(e);
                    break;
                }
                Ok(_) => break,
            }
        }
        // The client sees the closed socket only on its next use; make that happen now so
        // that r2d2's `has_broken` check sees it.
        if !client.is_closed() && client.simple_query("").is_ok() {
            log::error!(
                "lock {}: could not end its database session ({}); the connection may \
                 return to the pool in an unknown state",
                self.key,
                last.as_ref()
                    .map_or_else(|| "no error".to_owned(), describe)
            );
        }
    }

    fn lost(&self, reason: LostReason, source: Option<postgres::Error>) -> Error {
        Error::LockLost {
            key: self.key.clone(),
            reason,
            source,
        }
    }

    fn database(&self, operation: &'static str, source: postgres::Error) -> Error {
        Error::Database {
            key: self.key.clone(),
            operation,
            source,
        }
    }
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
fn run_retrying(
    client: &mut Client,
    sql: &str,
) -> Result<Vec<SimpleQueryMessage>, postgres::Error> {
    match client.simple_query(sql) {
        Err(e) if failure_of(client, &e) == Failure::Canceled => client.simple_query(sql),
        other => other,
    }
}

/// Column `i` of a row as text; `None` for a missing row or column, or NULL. Never panics
/// (`SimpleQueryRow::get` does on a missing column).
fn column(row: Option<&SimpleQueryRow>, i: usize) -> Option<&str> {
    row.and_then(|r| r.try_get(i).ok().flatten())
}

/// Runs a simple-protocol batch and returns its first row.
fn query_row(client: &mut Client, sql: &str) -> Result<Option<SimpleQueryRow>, postgres::Error> {
    Ok(client.simple_query(sql)?.into_iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => Some(row),
        _ => None,
    }))
}

/// Exponential backoff with jitter: each sleep is drawn from [d/2, d], and d doubles
/// from `min` up to `max`.
struct Backoff {
    next: Duration,
    max: Duration,
    rng: u64,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Backoff {
        // Seed from the clock and a stack address: enough to spread waiters apart.
        let local = 0u8;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let seed = u64::from(nanos) ^ (std::ptr::addr_of!(local) as u64).rotate_left(32);
        Backoff {
            next: min,
            max,
            rng: seed | 1,
        }
    }

    fn next_sleep(&mut self) -> Duration {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let unit = (r >> 11) as f64 / (1u64 << 53) as f64;
        let sleep = self.next.mul_f64(0.5 + 0.5 * unit);
        self.next = self.next.saturating_mul(2).min(self.max);
        sleep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_jitter_and_caps() {
        let (min, max) = (Duration::from_millis(10), Duration::from_millis(80));
        let mut b = Backoff::new(min, max);
        let mut ceiling = min;
        for _ in 0..20 {
            let s = b.next_sleep();
            assert!(
                s >= ceiling / 2 && s <= ceiling,
                "{s:?} outside [{:?}, {ceiling:?}]",
                ceiling / 2
            );
            ceiling = (ceiling * 2).min(max);
        }
    }

    #[test]
    fn session_statements() {
        let sql = Sql::new(Scope::Session, LockMode::Exclusive, &LockKey::new(42), 0);
        assert_eq!(sql.try_lock, "SELECT pg_catalog.pg_try_advisory_lock(42)");
        assert_eq!(
            sql.wait_default,
            "SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = 0; \
             SELECT pg_catalog.pg_advisory_lock(42)"
        );
        assert_eq!(
            sql.wait(1500),
            "SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = 1500; \
             SELECT pg_catalog.pg_advisory_lock(42)"
        );
        assert_eq!(
            sql.unlock,
            "SET LOCAL statement_timeout = 0; SELECT pg_catalog.pg_advisory_unlock(42)"
        );
        assert!(sql
            .is_held(&LockKey::new(42))
            .contains("classid = 0 AND objid = 42 AND objsubid = 1 AND mode = 'ExclusiveLock'"));
    }

    #[test]
    fn transaction_statements() {
        let sql = Sql::new(
            Scope::Transaction,
            LockMode::Shared,
            &LockKey::pair(1, -1),
            250,
        );
        assert_eq!(
            sql.try_lock,
            "BEGIN; SET LOCAL pglock.tx_lock = '1,-1'; \
             SELECT pg_catalog.pg_try_advisory_xact_lock_shared(1, -1)"
        );
        assert_eq!(
            sql.wait_default,
            "BEGIN; SET LOCAL pglock.tx_lock = '1,-1'; \
             SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = 250; \
             SELECT pg_catalog.pg_advisory_xact_lock_shared(1, -1); \
             SET LOCAL lock_timeout TO DEFAULT; SET LOCAL statement_timeout TO DEFAULT"
        );
        assert_eq!(TX_COMMIT, format!("SHOW {TX_MARKER}; COMMIT"));
        assert!(sql.is_held(&LockKey::pair(1, -1)).contains(
            "classid = 1 AND objid = 4294967295 AND objsubid = 2 AND mode = 'ShareLock'"
        ));
    }
}
