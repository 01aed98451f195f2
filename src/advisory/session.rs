//! Session locks (`pg_advisory_lock`): the raw kind behind [`SessionLock`](crate::SessionLock).
//!
//! One prepared statement per operation (`prepared.rs`); the session marker that detects a
//! transaction-mode pooler rides in every statement (`sql.rs`). A wait is one statement on
//! the server; an unlock that lands on another client's server session says so.

use std::sync::Arc;
use std::time::Instant;

use log::debug;
use r2d2::PooledConnection;

use super::engine::{Core, Manager};
use super::prepared::{run_prepared, Statement};
use super::raw::sealed::{OneKey, Raw, ServerWait, Unlocks};
use super::reply::{col, last, run_retrying, simple, Row};
use super::sql::{self, Args};
use crate::error::{describe, Failure};
use crate::wait::{Limit, Outcome};
use crate::Result;

/// Session scope (`pg_advisory_lock`): held until unlocked or until the session ends.
/// See [`SessionLock`](crate::SessionLock).
#[derive(Debug, Default, Clone)]
pub struct RawSession(());

impl super::RawAdvisory for RawSession {}
impl OneKey for RawSession {}
impl Unlocks for RawSession {}

impl Raw for RawSession {
    const KIND: &'static str = "session";
    const NAME: &'static str = "SessionLock";

    fn try_once<M: Manager>(core: &mut Core<Self>, conn: &mut PooledConnection<M>) -> Result<bool> {
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

    fn wait<M: Manager>(
        core: &mut Core<Self>,
        conn: &mut PooledConnection<M>,
        limit: Limit,
        start: Instant,
    ) -> Result<Outcome> {
        core.wait_on_server(conn, limit, start)
    }

    fn clean_up<M: Manager>(
        core: &mut Core<Self>,
        conn: &mut PooledConnection<M>,
        failure: Failure,
    ) -> Result<()> {
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

    fn finish<M: Manager>(
        core: &mut Core<Self>,
        conn: &mut PooledConnection<M>,
        used: bool,
        _success: bool,
    ) -> Result<()> {
        let result = core.unlock_session(conn, used);
        // A session unlock's reply tells the settings as the critical section left them.
        if used && result.is_err() {
            core.forget_settings();
        }
        result
    }
}

impl ServerWait for RawSession {
    fn send_wait<M: Manager>(
        core: &mut Core<Self>,
        conn: &mut PooledConnection<M>,
        ms: u32,
    ) -> Result<Vec<Row>, postgres::Error> {
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

    fn waited<M: Manager>(
        core: &mut Core<Self>,
        conn: &mut PooledConnection<M>,
        row: &Row,
    ) -> Result<bool> {
        if col(row, 0) == Some(sql::IN_TRANSACTION) {
            return Err(core.refuse_in_transaction(conn));
        }
        if let Some(other) = sql::shared_marker(col(row, 0)) {
            return Err(core.shared_session(Some(other)));
        }
        Ok(true)
    }
}

impl Core<RawSession> {
    /// Releases the session lock if a failed wait took it after all.
    fn release_taken<M: Manager>(&mut self, conn: &mut PooledConnection<M>) -> Result<()> {
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
    /// unlock reads the session's settings again. The statement is prepared while the
    /// session's timeouts are known quiet, and a batch that lifts them otherwise; should a
    /// timeout the critical section set cancel it, the retry lifts it.
    fn unlock_session<M: Manager>(
        &mut self,
        conn: &mut PooledConnection<M>,
        used: bool,
    ) -> Result<()> {
        if !std::mem::take(&mut self.held) {
            return Ok(());
        }
        let spec = Arc::clone(&self.spec);
        let (mode, key, token) = (spec.options.mode, &spec.key, spec.token.as_str());
        let which = if used {
            Statement::UnlockLearning
        } else {
            Statement::Unlock
        };
        let lift = !self.settings.is_some_and(|s| s.quiet);
        // A healthy transaction left open undoes the marker's clearing with its rollback.
        let clear = sql::clear_session_marker(token);
        self.release_with(conn, lift, &clear, |core, conn, lift| {
            if lift {
                let lifted = sql::session_unlock(mode, key, Args::Lifted, token, true);
                let rows = simple(conn, &lifted)?;
                core.learn(rows.first().unwrap_or(&Vec::new()), 0);
                Ok(last(rows))
            } else {
                let row = last(run_prepared(conn, which, &spec, None)?);
                if used {
                    core.learn(&row, 2);
                }
                Ok(row)
            }
        })
    }
}
