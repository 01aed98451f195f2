//! Transaction locks (`pg_advisory_xact_lock`): the raw kind behind [`TxLock`](crate::TxLock).
//!
//! Simple-protocol batches only, so that `BEGIN` rides with the lock in one round trip and
//! no named prepared statement is needed behind a pooler. The commit checks in SQL that the
//! transaction is still the lock's.

use std::time::Instant;

use log::{debug, warn};
use r2d2::PooledConnection;

use super::engine::{Core, Manager};
use super::raw::sealed::{OneKey, Raw, ServerWait};
use super::reply::{col, last, simple, truthy, Row};
use super::sql;
use crate::error::{describe, Failure};
use crate::wait::{Limit, Outcome};
use crate::{Error, LostReason, Result};

/// Transaction scope (`pg_advisory_xact_lock`): held until the transaction ends. See
/// [`TxLock`](crate::TxLock).
#[derive(Debug, Default, Clone)]
pub struct RawTx(());

impl super::RawAdvisory for RawTx {}
impl OneKey for RawTx {}

impl Raw for RawTx {
    const KIND: &'static str = "transaction";
    const NAME: &'static str = "TxLock";

    fn try_once<M: Manager>(core: &mut Core<Self>, conn: &mut PooledConnection<M>) -> Result<bool> {
        let learn = core.settings.is_none();
        let row = match simple(conn, &sql::tx_try(core.mode(), core.key(), learn)) {
            Ok(rows) => last(rows),
            Err(e) => return Err(core.failed_acquire(conn, e)),
        };
        if learn {
            core.learn(&row, 1);
        }
        if col(&row, 0) == Some(sql::IN_TRANSACTION) {
            return Err(core.refuse_in_transaction(conn));
        }
        if truthy(col(&row, 0)) {
            return Ok(true);
        }
        if col(&row, 0).is_none() {
            return Err(core.refuse_shared_tx(conn));
        }
        // The try opened a transaction; end it before reporting "busy".
        core.end_transaction(conn, "after a failed try")?;
        Ok(false)
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
        _: Failure,
    ) -> Result<()> {
        // The failed batch left its transaction open (aborted): end it.
        core.end_transaction(conn, "after a failed lock")
    }

    fn finish<M: Manager>(
        core: &mut Core<Self>,
        conn: &mut PooledConnection<M>,
        used: bool,
        success: bool,
    ) -> Result<()> {
        let result = if success {
            core.commit(conn, used)
        } else {
            core.rollback(conn)
        };
        if used {
            core.forget_settings();
        }
        result
    }
}

impl ServerWait for RawTx {
    fn send_wait<M: Manager>(
        core: &mut Core<Self>,
        conn: &mut PooledConnection<M>,
        ms: u32,
    ) -> Result<Vec<Row>, postgres::Error> {
        // One that leaves lock_timeout alone if it already has the wanted value, one that
        // sets it, or a batch that lifts the session's timeouts.
        let how = match core.settings {
            Some(s) if s.quiet && s.no_lock_timeout && ms == 0 => sql::TxWait::Plain,
            Some(s) if s.quiet => sql::TxWait::SetLockTimeout,
            _ => sql::TxWait::Lift,
        };
        let wait = sql::tx_wait(core.mode(), core.key(), ms, how);
        simple(conn, &format!("{}{wait}", sql::wait_comment(core.key())))
    }

    fn waited<M: Manager>(
        core: &mut Core<Self>,
        conn: &mut PooledConnection<M>,
        row: &Row,
    ) -> Result<bool> {
        if col(row, 0) == Some(sql::IN_TRANSACTION) {
            return Err(core.refuse_in_transaction(conn));
        }
        if !truthy(col(row, 0)) {
            return Err(core.refuse_shared_tx(conn));
        }
        Ok(true)
    }
}

impl Core<RawTx> {
    /// A transaction lock found its server session holding the key for another client's
    /// session lock (a transaction-mode pooler in between): taking it would be a second
    /// grant. Ends the transaction it began and reports the other client's marker.
    fn refuse_shared_tx<M: Manager>(&mut self, conn: &mut PooledConnection<M>) -> Error {
        match simple(conn, &sql::tx_refuse_shared()) {
            Ok(rows) => self.shared_session(col(&last(rows), 0)),
            Err(e) => match self.end_transaction(conn, "after a refused lock") {
                Err(error) => error,
                Ok(()) => self.database("lock", e),
            },
        }
    }

    /// Commits the lock's transaction, which ends the transaction lock. The check that the
    /// transaction is still the lock's runs in SQL before `COMMIT`.
    fn commit<M: Manager>(&mut self, conn: &mut PooledConnection<M>, used: bool) -> Result<()> {
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
    fn rollback<M: Manager>(&mut self, conn: &mut PooledConnection<M>) -> Result<()> {
        if !self.held {
            return Ok(());
        }
        self.held = false;
        self.end_transaction(conn, "of the lock's transaction")?;
        debug!("rolled back and unlocked {}", self.spec.key);
        Ok(())
    }
}
