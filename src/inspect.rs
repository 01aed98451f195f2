//! Who holds and who waits for advisory locks: `pg_locks` joined with
//! `pg_stat_activity`, in the current database.
//!
//! This is what `pglock status` and `pglock run`'s conflict message show, as a library
//! call, so that a program can say who is in its way:
//!
//! ```no_run
//! use pglock::{inspect, LockKey};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let mut client: pglock::postgres::Client = todo!();
//! let key = LockKey::from_name("nightly-report");
//! for h in inspect::holders(&mut client, Some(&key))? {
//!     let role = if h.granted { "holds" } else { "waits for" };
//!     println!("backend {:?} ({:?}) {role} {}", h.pid, h.application_name, h.key);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # What a role sees
//!
//! `pg_locks` shows every session's locks to every role. `pg_stat_activity` hides most
//! columns of other roles' sessions from a role that is not a superuser, not a member
//! of that role and not a member of `pg_read_all_stats`: for those sessions
//! [`query`](LockHolder::query) is `"<insufficient privilege>"`, and
//! [`client_addr`](LockHolder::client_addr), [`client_port`](LockHolder::client_port),
//! [`state`](LockHolder::state) and a holder's [`since`](LockHolder::since) are `None`.
//! [`pid`](LockHolder::pid), [`granted`](LockHolder::granted), [`user`](LockHolder::user),
//! [`application_name`](LockHolder::application_name) and a waiter's `since` stay
//! visible, which is why `pglock run` names itself in `application_name`.

use std::net::IpAddr;
use std::time::SystemTime;

use postgres::GenericClient;

use crate::{LockKey, LockMode};

/// One session's hold on, or wait for, an advisory lock: a row of `pg_locks` with its
/// session's row of `pg_stat_activity`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LockHolder {
    /// The lock. Keys rebuilt from `pg_locks` carry no name.
    pub key: LockKey,
    /// The backend's process id, or `None` for a prepared transaction.
    pub pid: Option<i32>,
    /// `true` for a holder, `false` for a waiter.
    pub granted: bool,
    /// The lock's mode (`pg_locks.mode`: `ExclusiveLock` or `ShareLock`).
    pub mode: LockMode,
    /// The session's `application_name` (`pglock run NAME HOST:PID` for `pglock run`).
    pub application_name: Option<String>,
    /// The session's role.
    pub user: Option<String>,
    /// The client's address, or `None` over a Unix socket (or when hidden, see the
    /// module docs).
    pub client_addr: Option<IpAddr>,
    /// The client's TCP port (`-1` over a Unix socket).
    pub client_port: Option<i32>,
    /// Waiting or holding since when.
    ///
    /// For a waiter, when it began waiting: `pg_locks.waitstart` (PostgreSQL 14 and
    /// later; on older servers, or in the moment before the server fills it in, the
    /// start of the waiting statement, `pg_stat_activity.state_change`).
    ///
    /// For a holder, PostgreSQL does not record when a lock was granted; this is the last
    /// time its session changed state (`pg_stat_activity.state_change`). A session that
    /// is idle has held the lock at least since then, and `pglock run`, which sends
    /// nothing after its lock statement, got it exactly then. For a busy session it is
    /// the start of its current statement, which may itself have taken the lock.
    pub since: Option<SystemTime>,
    /// The session's state (`active`, `idle`, `idle in transaction`, ...).
    pub state: Option<String>,
    /// The session's current or last statement.
    pub query: Option<String>,
}

/// The holders and waiters of `key`, or of every advisory lock in the current database
/// when `key` is `None`: one [`LockHolder`] per session and lock mode.
///
/// Holders come first, then waiters in the order they began waiting; several keys are
/// sorted by their `pg_locks` coordinates. One statement, two round trips (the
/// statement is prepared unnamed).
///
/// # Errors
///
/// The [`postgres::Error`] of the query (a broken connection, an aborted transaction).
///
/// # Examples
///
/// ```no_run
/// use pglock::{inspect, LockKey};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mut client = pglock::postgres::Client::connect(
///     "host=localhost user=postgres",
///     pglock::postgres::NoTls,
/// )?;
/// let key = LockKey::from_name("nightly-report");
/// match inspect::holders(&mut client, Some(&key))?.iter().find(|h| h.granted) {
///     Some(h) => println!("held by backend {:?} ({:?})", h.pid, h.application_name),
///     None => println!("free"),
/// }
/// # Ok(())
/// # }
/// ```
pub fn holders<C: GenericClient>(
    client: &mut C,
    key: Option<&LockKey>,
) -> Result<Vec<LockHolder>, postgres::Error> {
    let rows = client.query(holders_sql(key).as_str(), &[])?;
    // try_get: a column of an unexpected type is an error, never a panic.
    rows.iter()
        .map(|row| {
            let classid: i64 = row.try_get("classid")?;
            let objid: i64 = row.try_get("objid")?;
            let objsubid: i32 = row.try_get("objsubid")?;
            let mode: String = row.try_get("mode")?;
            Ok(LockHolder {
                key: key_at(classid, objid, objsubid),
                pid: row.try_get("pid")?,
                granted: row.try_get("granted")?,
                mode: if mode == LockMode::Shared.pg_locks_mode() {
                    LockMode::Shared
                } else {
                    LockMode::Exclusive
                },
                application_name: row.try_get("application_name")?,
                user: row.try_get("usename")?,
                client_addr: row.try_get("client_addr")?,
                client_port: row.try_get("client_port")?,
                since: row.try_get("since")?,
                state: row.try_get("state")?,
                query: row.try_get("query")?,
            })
        })
        .collect()
}

/// Force-releases a stuck advisory lock: terminates every other session of the current
/// database that holds `key` (`pg_terminate_backend`), and returns the pids it terminated. The server frees a
/// terminated session's locks at once, and the next waiter gets the lock.
///
/// Use it as a last resort, for a holder that is gone but whose session is not (a hung
/// process, a network partition the server has not noticed yet), and know what it does:
///
/// - The holder's session ends mid-work: its open transaction rolls back, but what a
///   session-lock critical section already committed stays, half done. The holder, if
///   still alive, learns it at its next statement ([`Error::LockLost`](crate::Error::LockLost)
///   at unlock); until then it may believe it holds the lock.
/// - Behind a transaction-mode pooler the server session may be another client's at that
///   moment: that client's transaction is killed instead.
/// - Terminating needs superuser, membership in the holder's role, or
///   `pg_signal_backend` (never for a superuser's session); the server refuses with
///   SQLSTATE 42501 otherwise. Waiters are not touched.
///
/// # Errors
///
/// The [`postgres::Error`] of the statement (no privilege, a broken connection).
///
/// # Examples
///
/// ```no_run
/// use pglock::{inspect, LockKey};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let mut client: pglock::postgres::Client = todo!();
/// let key = LockKey::from_name("nightly-report");
/// let ended = inspect::terminate_holders(&mut client, &key)?;
/// eprintln!("terminated backends {ended:?} holding {key}");
/// # Ok(())
/// # }
/// ```
pub fn terminate_holders<C: GenericClient>(
    client: &mut C,
    key: &LockKey,
) -> Result<Vec<i32>, postgres::Error> {
    let rows = client.query(terminate_sql(key).as_str(), &[])?;
    rows.iter().map(|row| row.try_get(0)).collect()
}

/// The statement of [`terminate_holders`]: integers only in its text.
fn terminate_sql(key: &LockKey) -> String {
    // DISTINCT keeps the subquery apart, so the termination only ever sees its rows.
    format!(
        "SELECT pid FROM (SELECT DISTINCT pid FROM pg_catalog.pg_locks \
         WHERE locktype = 'advisory' AND granted \
         AND database = (SELECT oid FROM pg_catalog.pg_database \
         WHERE datname = pg_catalog.current_database()) \
         AND classid = {} AND objid = {} AND objsubid = {} \
         AND pid <> pg_catalog.pg_backend_pid()) h \
         WHERE pg_catalog.pg_terminate_backend(pid)",
        key.classid(),
        key.objid(),
        key.objsubid()
    )
}

/// The key at these `pg_locks` coordinates.
fn key_at(classid: i64, objid: i64, objsubid: i32) -> LockKey {
    let (hi, lo) = (classid as u32, objid as u32);
    if objsubid == 2 {
        LockKey::pair(hi as i32, lo as i32)
    } else {
        LockKey::new(((u64::from(hi) << 32) | u64::from(lo)) as i64)
    }
}

/// The statement of [`holders`]. The key's coordinates are integers formatted here, so
/// inlining them is safe.
pub(crate) fn holders_sql(key: Option<&LockKey>) -> String {
    let filter = match key {
        Some(key) => format!(
            "\n  AND l.classid = {}::oid AND l.objid = {}::oid AND l.objsubid = {}",
            key.classid(),
            key.objid(),
            key.objsubid()
        ),
        None => String::new(),
    };
    // waitstart exists from PostgreSQL 14 on; read through to_jsonb so that the statement
    // also runs on older servers (where it is NULL).
    format!(
        "SELECT l.classid::int8 AS classid, l.objid::int8 AS objid, \
         l.objsubid::int4 AS objsubid, l.pid, l.mode, l.granted,
       a.application_name, a.usename::text AS usename, a.client_addr, a.client_port,
       a.state, a.query,
       CASE WHEN l.granted THEN a.state_change
            ELSE coalesce((to_jsonb(l) ->> 'waitstart')::timestamptz, a.state_change)
       END AS since
FROM pg_locks l
LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory'
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()){filter}
ORDER BY l.classid, l.objid, l.objsubid, l.granted DESC, since NULLS LAST, l.pid"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn termination_is_confined_to_the_keys_holders() {
        let sql = terminate_sql(&LockKey::pair(1, -1));
        assert!(sql.contains("classid = 1 AND objid = 4294967295 AND objsubid = 2"));
        assert!(sql.contains("SELECT DISTINCT pid"));
        assert!(
            sql.contains("datname = pg_catalog.current_database()"),
            "{sql}"
        );
        assert!(sql.ends_with("WHERE pg_catalog.pg_terminate_backend(pid)"));
    }

    #[test]
    fn the_statement_filters_on_the_keys_coordinates() {
        let key = LockKey::from_name("nightly-report");
        let sql = holders_sql(Some(&key));
        assert!(
            sql.contains(
                "AND l.classid = 3884933232::oid AND l.objid = 759228614::oid \
                 AND l.objsubid = 1"
            ),
            "{sql}"
        );
        assert!(sql.contains("l.locktype = 'advisory'"), "{sql}");
        assert!(sql.contains("current_database()"), "{sql}");
        let pair = holders_sql(Some(&LockKey::pair(-1, 7)));
        assert!(
            pair.contains("l.classid = 4294967295::oid AND l.objid = 7::oid AND l.objsubid = 2")
        );
    }

    #[test]
    fn without_a_key_the_statement_lists_every_advisory_lock() {
        let sql = holders_sql(None);
        assert!(!sql.contains("l.classid ="), "{sql}");
        assert!(sql.contains("ORDER BY l.classid, l.objid, l.objsubid, l.granted DESC"));
    }

    #[test]
    fn waiters_since_when_they_began_waiting_holders_since_the_last_state_change() {
        let sql = holders_sql(None);
        assert!(sql.contains(
            "CASE WHEN l.granted THEN a.state_change\n            \
             ELSE coalesce((to_jsonb(l) ->> 'waitstart')::timestamptz, a.state_change)"
        ));
    }

    #[test]
    fn keys_are_rebuilt_from_their_coordinates() {
        for key in [
            LockKey::from_name("nightly-report"),
            LockKey::new(-1),
            LockKey::new(i64::MIN),
            LockKey::new(42),
        ] {
            let back = key_at(key.classid().into(), key.objid().into(), 1);
            assert_eq!(back, key);
        }
        for key in [LockKey::pair(-1, 7), LockKey::pair(i32::MIN, i32::MAX)] {
            let back = key_at(key.classid().into(), key.objid().into(), 2);
            assert_eq!(back, key);
            assert_eq!(back.as_pair(), key.as_pair());
        }
    }
}
