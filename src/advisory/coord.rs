//! What [`AdvisorySemaphore`](crate::AdvisorySemaphore) and [`LockSet`](crate::LockSet)
//! share: their connection (replaced from the pool when it died), reading replies, the
//! release that copes with a transaction left open, and ending a session whose state
//! cannot be confirmed.
//!
//! Invariant, as for the locks: while no guard is out, the connection holds no advisory
//! lock taken by these types; every path that cannot confirm it ends the session.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use log::warn;
use postgres::{Client, SimpleQueryMessage};
use r2d2::{ManageConnection, Pool, PooledConnection};

use super::coord_sql::{reply, Reply};
use super::sql;
use crate::cancel::{CancelHandle, CancelState};
use crate::error::{describe, Failure};
use crate::{Error, LockKey, LostReason, Result};

/// One row of a reply, every column as text.
pub(crate) type Row = Vec<Option<String>>;

/// Runs a simple-protocol batch and returns its rows as text.
pub(crate) fn simple(client: &mut Client, sql: &str) -> Result<Vec<Row>, postgres::Error> {
    Ok(client
        .simple_query(sql)?
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.try_get(i).ok().flatten().map(str::to_owned))
                    .collect(),
            ),
            _ => None,
        })
        .collect())
}

/// The last row of a reply (empty if none).
pub(crate) fn last(mut rows: Vec<Row>) -> Row {
    rows.pop().unwrap_or_default()
}

/// Column `i` of a row; `None` for NULL or a missing column.
pub(crate) fn col(row: &Row, i: usize) -> Option<&str> {
    row.get(i).and_then(|c| c.as_deref())
}

/// A boolean as text.
pub(crate) fn truthy(value: Option<&str>) -> bool {
    matches!(value, Some("t" | "true"))
}

/// Classifies an error, also looking at the client (a session ended by the server is
/// first reported as a FATAL error on a client that does not know yet that it is closed).
pub(crate) fn failure_of(client: &Client, e: &postgres::Error) -> Failure {
    if client.is_closed() {
        Failure::Closed
    } else {
        Failure::of(e)
    }
}

/// The connection of a semaphore or lock set, and the pool it came from (none for one
/// made from a connection).
pub(crate) struct Link<M>
where
    M: ManageConnection<Connection = Client>,
{
    pub(crate) conn: Option<PooledConnection<M>>,
    pub(crate) pool: Option<Pool<M>>,
}

impl<M> Link<M>
where
    M: ManageConnection<Connection = Client>,
{
    pub(crate) fn checkout(pool: &Pool<M>, key: &LockKey) -> Result<Link<M>> {
        let conn = pool.get().map_err(|source| Error::Pool {
            key: key.clone(),
            source,
        })?;
        Ok(Link {
            conn: Some(conn),
            pool: Some(pool.clone()),
        })
    }

    /// The live connection: the current one, or a fresh one from the pool when it died
    /// (then `fresh` is true: nothing is held on it, and nothing is listened to).
    pub(crate) fn live(&mut self, key: &LockKey) -> Result<(&mut PooledConnection<M>, bool)> {
        let dead = self.conn.as_ref().is_none_or(|c| c.is_closed());
        let mut fresh = false;
        if let (true, Some(pool)) = (dead, &self.pool) {
            drop(self.conn.take()); // closed: r2d2 discards it
            let conn = pool.get().map_err(|source| Error::Pool {
                key: key.clone(),
                source,
            })?;
            self.conn = Some(conn);
            fresh = true;
        }
        match self.conn.as_mut() {
            Some(conn) => Ok((conn, fresh)),
            None => Err(lost(key, LostReason::SessionEnded, None)),
        }
    }
}

/// The cancellation state of a semaphore or lock set, made on first use.
#[derive(Debug, Default)]
pub(crate) struct Cancel(OnceLock<Arc<CancelState>>);

impl Cancel {
    pub(crate) fn handle(&self, key: &LockKey, client: Option<&Client>) -> CancelHandle {
        self.0
            .get_or_init(|| CancelState::new(key.clone(), client.map(Client::cancel_token)))
            .handle()
    }

    pub(crate) fn state(&self) -> Option<&CancelState> {
        self.0.get().map(|s| &**s)
    }

    pub(crate) fn shared(&self) -> Option<Arc<CancelState>> {
        self.0.get().cloned()
    }

    pub(crate) fn check(&self) -> Result<()> {
        self.state().map_or(Ok(()), CancelState::check)
    }

    /// The connection was replaced: cancel requests go to the new one.
    pub(crate) fn connected(&self, client: &Client) {
        if let Some(state) = self.0.get() {
            state.set_token(client.cancel_token());
        }
    }
}

pub(crate) fn lost(key: &LockKey, reason: LostReason, source: Option<postgres::Error>) -> Error {
    Error::LockLost {
        key: key.clone(),
        reason,
        source,
    }
}

pub(crate) fn database(key: &LockKey, operation: &'static str, source: postgres::Error) -> Error {
    Error::Database {
        key: key.clone(),
        operation,
        source,
    }
}

/// A new lock's marker prefix, `pglock:<pid>:<random>`: what precedes the `@` of every
/// session marker it sets (see `sql.rs`).
pub(crate) fn marker_prefix() -> String {
    format!("pglock:{}:{:x}", std::process::id(), crate::wait::seed())
}

/// The error of a server session that carries another client's marker: a
/// transaction-mode pooler sits in between.
pub(crate) fn shared(key: &LockKey, other: &str) -> Error {
    warn!(
        "lock {key}: its server session carries another client's session lock ({other}): \
         a transaction-mode pooler is in between"
    );
    Error::SessionShared {
        key: key.clone(),
        other: other.to_owned(),
    }
}

/// A lock statement that took nothing: the server session carries another client's
/// marker, or the connection came inside a transaction (rolled back here).
pub(crate) fn refused(client: &mut Client, key: &LockKey, prefix: &str, reply: Reply<'_>) -> Error {
    match reply {
        Reply::Shared(other) => shared(key, other),
        _ => {
            warn!("lock {key}: its connection was inside a transaction before the lock; rolling it back");
            match simple(client, "ROLLBACK") {
                Ok(_) => Error::TransactionLeftOpen { key: key.clone() },
                Err(e) if failure_of(client, &e) == Failure::Closed => {
                    lost(key, LostReason::SessionEnded, Some(e))
                }
                Err(e) => {
                    end_session(client, key, prefix, "its rollback failed");
                    database(key, "rollback", e)
                }
            }
        }
    }
}

pub(crate) fn invalid(key: &LockKey, message: impl Into<String>) -> Error {
    Error::InvalidArgument {
        key: key.clone(),
        message: message.into(),
    }
}

/// The error of a failed lock statement, by SQLSTATE. (Cleaning up is the caller's.)
pub(crate) fn acquire_error(
    client: &Client,
    key: &LockKey,
    cancel: &Cancel,
    e: postgres::Error,
) -> Error {
    let key = key.clone();
    match failure_of(client, &e) {
        Failure::Canceled if cancel.check().is_err() => Error::Cancelled { key },
        // Before the statement (see `clean_after`, which rolled it back).
        Failure::InFailedTransaction => Error::TransactionLeftOpen { key },
        Failure::Deadlock => Error::Deadlock { key, source: e },
        Failure::OutOfSharedMemory => Error::LockTableFull { key, source: e },
        _ => Error::Database {
            key,
            operation: "lock",
            source: e,
        },
    }
}

/// Runs `cleanup` (a statement that releases whatever a failed statement may have taken)
/// after a failed lock statement, unless the session is gone; ends the session if the
/// cleanup fails. Also after a deadlock or a full lock table: a statement that takes
/// several keys may have taken some before it failed, and session locks outlive the error.
pub(crate) fn clean_after(
    client: &mut Client,
    key: &LockKey,
    prefix: &str,
    e: &postgres::Error,
    cleanup: &str,
) {
    match failure_of(client, e) {
        Failure::Closed => {}
        // The connection came inside a failed transaction: nothing ran. End it.
        Failure::InFailedTransaction => {
            warn!("lock {key}: its connection was inside a failed transaction; rolling it back");
            if let Err(e) = simple(client, "ROLLBACK") {
                let why = format!("cannot roll back a failed transaction: {}", describe(&e));
                end_session(client, key, prefix, &why);
            }
        }
        _ => {
            let result = match simple(client, cleanup) {
                Err(e) if failure_of(client, &e) == Failure::Canceled => simple(client, cleanup),
                other => other,
            };
            if let Err(e) = result {
                let why = format!("cannot release what a failed lock took: {}", describe(&e));
                end_session(client, key, prefix, &why);
            }
        }
    }
}

/// Runs a statement that releases what a lock statement may have taken; ends the session
/// if it fails.
pub(crate) fn clean(client: &mut Client, key: &LockKey, prefix: &str, cleanup: &str) -> Result<()> {
    match simple(client, cleanup) {
        Ok(_) => Ok(()),
        Err(e) => {
            end_session(
                client,
                key,
                prefix,
                "cannot release what a failed lock took",
            );
            Err(database(key, "lock cleanup", e))
        }
    }
}

/// Runs a release statement whose row says (every unlock returned true, see
/// [`reply`](super::coord_sql::reply); a transaction was open). A failed transaction the
/// critical section left open is rolled back and the release runs again; a healthy one is
/// rolled back after the release (session locks ignore the rollback), `after_rollback`
/// rides with the `ROLLBACK`, and it is reported as [`Error::TransactionLeftOpen`]. A
/// release that lands on another client's server session is [`Error::SessionShared`]. A
/// release that cannot be confirmed ends the session.
pub(crate) fn release(
    client: &mut Client,
    key: &LockKey,
    prefix: &str,
    unlock: &str,
    after_rollback: &str,
) -> Result<()> {
    let mut retried = false;
    let mut lifted = false;
    loop {
        let sql = if lifted {
            format!("SET LOCAL statement_timeout = 0; {unlock}")
        } else {
            unlock.to_owned()
        };
        let error = match simple(client, &sql) {
            Ok(rows) => {
                let row = last(rows);
                let unlocked = match reply(col(&row, 0)) {
                    Reply::Done(answer) => truthy(answer),
                    // Another client's server session: nothing was touched there, and
                    // ours is out of reach.
                    Reply::Shared(other) => return Err(shared(key, other)),
                    Reply::InTransaction => false,
                };
                if truthy(col(&row, 1)) {
                    warn!(
                        "lock {key}: the critical section left a transaction open; rolling it back"
                    );
                    let rollback = if after_rollback.is_empty() {
                        "ROLLBACK".to_owned()
                    } else {
                        format!("ROLLBACK; {after_rollback}")
                    };
                    if let Err(e) = simple(client, &rollback) {
                        if failure_of(client, &e) == Failure::Closed {
                            return Err(lost(key, LostReason::SessionEnded, Some(e)));
                        }
                        end_session(client, key, prefix, "its rollback failed");
                        return Err(database(key, "rollback", e));
                    }
                    if unlocked {
                        return Err(Error::TransactionLeftOpen { key: key.clone() });
                    }
                }
                if unlocked {
                    return Ok(());
                }
                warn!("lock {key} was lost: an unlock returned false");
                return Err(lost(key, LostReason::NotHeld, None));
            }
            Err(e) => e,
        };
        match failure_of(client, &error) {
            Failure::Closed => {
                warn!(
                    "lock {key} was lost: its session ended ({})",
                    describe(&error)
                );
                return Err(lost(key, LostReason::SessionEnded, Some(error)));
            }
            Failure::InFailedTransaction if !retried => {
                // A failed transaction left open: its work failed with an error the caller
                // saw. End it, then release.
                retried = true;
                if let Err(e) = simple(client, "ROLLBACK") {
                    if failure_of(client, &e) == Failure::Closed {
                        return Err(lost(key, LostReason::SessionEnded, Some(e)));
                    }
                    end_session(client, key, prefix, "its rollback failed");
                    return Err(database(key, "rollback", e));
                }
            }
            Failure::Canceled if !retried => {
                // A statement_timeout the critical section set, or a late cancel request.
                retried = true;
                lifted = true;
            }
            _ => {
                warn!("lock {key}: unlock failed: {}", describe(&error));
                end_session(client, key, prefix, "its unlock failed");
                return Err(database(key, "unlock", error));
            }
        }
    }
}

/// Ends the database session: the server frees every lock it held, and the client reports
/// closed, so r2d2 discards the connection. Where `pg_terminate_backend` is refused, the
/// session is made to time out at once.
pub(crate) fn end_session(client: &mut Client, key: &LockKey, prefix: &str, why: &str) {
    if client.is_closed() {
        return;
    }
    warn!("lock {key}: ending its database session: {why}");
    // Not a server session that carries another client's marker (behind a pooler).
    let refused = match client.simple_query(&sql::terminate(prefix)) {
        Err(e) if failure_of(client, &e) == Failure::Closed => false,
        Err(_) => true,
        Ok(_) => false,
    };
    if refused && !client.is_closed() {
        let _ = client.simple_query(sql::EXPIRE_SESSION);
    }
    // The client sees the closed socket only on its next use.
    let deadline = Instant::now() + Duration::from_secs(2);
    while !client.is_closed() && client.simple_query("").is_ok() {
        if Instant::now() > deadline {
            log::error!(
                "lock {key}: could not end its database session; the connection may return \
                 to the pool in an unknown state"
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
