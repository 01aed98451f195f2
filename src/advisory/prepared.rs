//! `SessionLock`'s prepared statements: SQL-level `PREPARE` once per connection (kept in
//! its r2d2 extensions), then `EXECUTE` with the key, the token and the bound as
//! arguments; the same statement unprepared where prepared ones vanish.

use std::collections::HashMap;
use std::sync::OnceLock;

use log::debug;
use r2d2::PooledConnection;

use super::engine::{Manager, Spec};
use super::reply::{simple, Row};
use super::sql::{self, Args};
use crate::wait;
use crate::{LockKey, LockMode};

/// Which prepared session statement.
#[derive(Debug, Clone, Copy)]
pub(super) enum Statement {
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
fn prepared_text(which: Statement, mode: LockMode, key: &LockKey) -> &'static str {
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
            Statement::Try => sql::session_try(mode, &key, Args::Params, "", false),
            Statement::TryLearning => sql::session_try(mode, &key, Args::Params, "", true),
            Statement::Wait => sql::session_wait(mode, &key, Args::Params, "", Some(0)),
            Statement::WaitPlain => sql::session_wait(mode, &key, Args::Params, "", None),
            Statement::Unlock => sql::session_unlock(mode, &key, Args::Params, "", false),
            Statement::UnlockLearning => sql::session_unlock(mode, &key, Args::Params, "", true),
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

impl Prepared {
    /// A name for `text`'s statement, unique to this connection, and remembered as its.
    fn new_name(&mut self, text: &'static str) -> String {
        if self.prefix.is_empty() {
            self.prefix = format!("{:x}", wait::seed());
        }
        let name = format!("pglock_{}_{}", self.prefix, self.next);
        self.next += 1;
        self.names.insert(text, name.clone());
        name
    }
}

/// The parameter types of a prepared session statement, in the order `sql.rs` numbers
/// its placeholders: the key (`$1`, or `$1, $2` for a pair), the token, and a wait's
/// `lock_timeout`.
fn param_types(which: Statement, key: &LockKey) -> &'static str {
    match (key.as_pair().is_some(), which) {
        (false, Statement::Wait) => "bigint, text, text",
        (false, _) => "bigint, text",
        (true, Statement::Wait) => "integer, integer, text, text",
        (true, _) => "integer, integer, text",
    }
}

/// Takes the flag that says pglock's own failed `EXECUTE` aborted a transaction the
/// critical section had left open (healthy until then).
pub(super) fn take_aborted_open_transaction<M: Manager>(conn: &mut PooledConnection<M>) -> bool {
    PooledConnection::extensions_mut(conn)
        .get_mut::<Prepared>()
        .is_some_and(|p| std::mem::take(&mut p.aborted_open_transaction))
}

/// Runs a prepared session statement; the first use on a connection prepares it in the
/// same round trip. Falls back to the same statement unprepared where prepared ones do
/// not work.
pub(super) fn run_prepared<M: Manager>(
    conn: &mut PooledConnection<M>,
    which: Statement,
    spec: &Spec,
    ms: Option<u32>,
) -> Result<Vec<Row>, postgres::Error> {
    let (mode, key, token) = (spec.options.mode, &spec.key, spec.token.as_str());
    let unprepared = || match which {
        Statement::Try => sql::session_try(mode, key, Args::Literals, token, false),
        Statement::TryLearning => sql::session_try(mode, key, Args::Literals, token, true),
        Statement::Wait | Statement::WaitPlain => {
            sql::session_wait(mode, key, Args::Literals, token, ms)
        }
        Statement::Unlock => sql::session_unlock(mode, key, Args::Literals, token, false),
        Statement::UnlockLearning => sql::session_unlock(mode, key, Args::Literals, token, true),
    };
    let text = prepared_text(which, mode, key);
    let mut prepared = PooledConnection::extensions_mut(conn)
        .remove::<Prepared>()
        .unwrap_or_default();
    let execute = format!("EXECUTE {{}}({})", execute_args(spec, ms));
    let (sql, new) = match prepared.names.get(text) {
        _ if prepared.vanished >= 2 => (unprepared(), false),
        Some(name) => (execute.replace("{}", name), false),
        None => {
            let name = prepared.new_name(text);
            let types = param_types(which, key);
            let sql = format!(
                "PREPARE {name}({types}) AS {text}; {}",
                execute.replace("{}", &name)
            );
            (sql, true)
        }
    };
    // A waiting session says what it waits for in pg_stat_activity.query.
    let sql = match which {
        Statement::Wait | Statement::WaitPlain => format!("{}{sql}", sql::wait_comment(key)),
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
        Statement::Wait | Statement::WaitPlain => {
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

/// The arguments of a prepared session statement as literals: the key, the token, then
/// `ms` (digits only, as everything here).
fn execute_args(spec: &Spec, ms: Option<u32>) -> String {
    let mut args = format!("{}, {}", spec.key.sql_args(), sql::literal(&spec.token));
    if let Some(ms) = ms {
        args.push_str(&format!(", '{ms}'"));
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepared_texts_are_made_once_per_statement_mode_and_key_space() {
        let a = prepared_text(Statement::Try, LockMode::Exclusive, &LockKey::new(1));
        let b = prepared_text(Statement::Try, LockMode::Exclusive, &LockKey::new(2));
        assert!(std::ptr::eq(a, b));
        let pair = prepared_text(Statement::Unlock, LockMode::Shared, &LockKey::pair(1, 2));
        assert!(pair.contains("pg_advisory_unlock_shared($1, $2)"), "{pair}");
        let wait = prepared_text(Statement::Wait, LockMode::Exclusive, &LockKey::new(1));
        assert!(
            wait.contains("set_config('lock_timeout', $3, true)"),
            "{wait}"
        );
        let plain = prepared_text(Statement::WaitPlain, LockMode::Exclusive, &LockKey::new(1));
        assert!(!plain.contains("lock_timeout"), "{plain}");
        assert!(plain.contains("pg_advisory_lock($1)"), "{plain}");
    }

    #[test]
    fn parameter_types_follow_the_placeholders_sql_rs_numbers() {
        for (which, key, types) in [
            (Statement::Wait, LockKey::new(1), "bigint, text, text"),
            (Statement::Try, LockKey::new(1), "bigint, text"),
            (
                Statement::Wait,
                LockKey::pair(1, 2),
                "integer, integer, text, text",
            ),
            (
                Statement::UnlockLearning,
                LockKey::pair(1, 2),
                "integer, integer, text",
            ),
        ] {
            let text = prepared_text(which, LockMode::Exclusive, &key);
            let placeholders = (1..=4).filter(|n| text.contains(&format!("${n}"))).count();
            assert_eq!(placeholders, types.split(", ").count(), "{text}");
            assert_eq!(param_types(which, &key), types);
        }
    }
}
