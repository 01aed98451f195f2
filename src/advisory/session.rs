//! Session locks (`pg_advisory_lock`): the raw kind behind [`SessionLock`](crate::SessionLock).
//!
//! One prepared statement per operation (`prepared.rs`); the session marker that detects a
//! transaction-mode pooler rides in every statement (`sql.rs`). A wait is one statement on
//! the server; an unlock that lands on another client's server session says so.

use std::sync::Arc;
use std::time::Instant;

use log::{debug, warn};
use postgres::Client;
use r2d2::{ManageConnection, PooledConnection};

use super::engine::Core;
use super::prepared::{run_prepared, take_aborted_open_transaction, Statement};
use super::raw::sealed::{OneKey, Raw, ServerWait, Unlocks};
use super::reply::{col, last, run_retrying, simple, truthy, Row};
use super::sql::{self, Args};
use crate::error::{describe, Failure};
use crate::wait::{Limit, Outcome};
use crate::{Error, LockKey, LostReason, Result};

/// Session scope (`pg_advisory_lock`): held until unlocked or until the session ends.
/// See [`SessionLock`](crate::SessionLock).
#[derive(Debug, Default, Clone)]
pub struct Session(());

impl super::RawAdvisory for Session {}
impl OneKey for Session {}
impl Unlocks for Session {}

impl Raw for Session {
    const KIND: &'static str = "session";
    const NAME: &'static str = "SessionLock";

    fn token(prefix: &str, key: &LockKey) -> String {
        // Ends with the key: see the session marker in sql.rs.
        format!("{prefix}@{}", sql::tx_marker(key))
    }

    fn try_once<M>(core: &mut Core<Self>, conn: &mut PooledConnection<M>) -> Result<bool>
    where
        M: ManageConnection<Connection = Client>,
    {
        let learn = core.settings.is_none();
        let which = if learn {
            Statement::TryLearning
        } else {
            Statement::Try
        };
        let spec = Arc::clone(&core.spec);
        let row = match run_prepared(conn, which, &spec, None) {
            Ok(rows) => last(rows),
            Err(e) => return Err(core.failed_acquire(conn, e)),
        };
        if learn {
            core.learn(&row, 1);
        }
        if col(&row, 0) == Some(sql::IN_TRANSACTION) {
            return Err(core.refuse_in_transaction(conn));
        }
        if let Some(other) = sql::shared_marker(col(&row, 0)) {
            return Err(core.shared_session(Some(other)));
        }
        Ok(col(&row, 0) != Some(""))
    }

    fn wait<M>(
        core: &mut Core<Self>,
        conn: &mut PooledConnection<M>,
        limit: Limit,
        start: Instant,
    ) -> Result<Outcome>
    where
        M: ManageConnection<Connection = Client>,
    {
        core.wait_on_server(conn, limit, start)
    }

    fn clean_up<M>(
        core: &mut Core<Self>,
        conn: &mut PooledConnection<M>,
        failure: Failure,
    ) -> Result<()>
    where
        M: ManageConnection<Connection = Client>,
    {
        match failure {
            // A deadlock aborts the wait and a full lock table refuses it: neither grants
            // the lock, and scanning pg_locks with a full lock table is slow.
            Failure::Deadlock | Failure::OutOfSharedMemory => Ok(()),
            // The connection came inside a failed transaction: nothing ran. End it.
            Failure::InFailedTransaction => core.end_stray_transaction(conn),
            // The wait may have been granted as it failed. (Its marker was rolled back
            // with the failed statement.)
            _ => core.release_taken(conn),
        }
    }

    fn finish<M>(
        core: &mut Core<Self>,
        conn: &mut PooledConnection<M>,
        used: bool,
        _success: bool,
    ) -> Result<()>
    where
        M: ManageConnection<Connection = Client>,
    {
        let result = core.unlock_session(conn, used);
        // A session unlock's reply tells the settings as the critical section left them.
        if used && result.is_err() {
            core.forget_settings();
        }
        result
    }

    fn is_held(core: &mut Core<Self>, client: &mut Client) -> Result<bool> {
        let sql = sql::is_held(core.mode(), core.key());
        core.ask_held(client, &sql)
    }
}

impl ServerWait for Session {
    fn send_wait<M>(
        core: &mut Core<Self>,
        conn: &mut PooledConnection<M>,
        ms: u32,
    ) -> Result<Vec<Row>, postgres::Error>
    where
        M: ManageConnection<Connection = Client>,
    {
        let spec = Arc::clone(&core.spec);
        let (mode, key, token) = (spec.options.mode, &spec.key, spec.token.as_str());
        // With the settings quiet, one prepared statement (one that leaves lock_timeout
        // alone if it already has the wanted value); else a batch that lifts them.
        match core.settings {
            Some(s) if s.quiet && s.no_lock_timeout && ms == 0 => {
                run_prepared(conn, Statement::WaitPlain, &spec, None)
            }
            Some(s) if s.quiet => run_prepared(conn, Statement::Wait, &spec, Some(ms)),
            _ => {
                let wait = sql::session_wait(mode, key, Args::Lifted, token, Some(ms));
                simple(conn, &format!("{}{wait}", sql::wait_comment(key)))
            }
        }
    }

    fn waited<M>(core: &mut Core<Self>, conn: &mut PooledConnection<M>, row: &Row) -> Result<bool>
    where
        M: ManageConnection<Connection = Client>,
    {
        if col(row, 0) == Some(sql::IN_TRANSACTION) {
            return Err(core.refuse_in_transaction(conn));
        }
        if let Some(other) = sql::shared_marker(col(row, 0)) {
            return Err(core.shared_session(Some(other)));
        }
        Ok(true)
    }
}

impl Core<Session> {
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
            Statement::UnlockLearning
        } else {
            Statement::Unlock
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
}
