//! The SQL of the advisory locks, as plain functions of the key, mode and bound, so that it
//! can be read and tested without a server.
//!
//! Every statement names its functions schema-qualified (`pg_catalog.`), so a hostile
//! `search_path` cannot redirect them (most operators are not qualified: a `search_path`
//! that lists a schema before `pg_catalog` could redirect those; the check for a
//! transaction left open is). Nothing but integers, the lock's own marker token
//! (letters, digits, `:`, `@`, `,` and `-`) and fixed text is ever put into SQL text.
//!
//! Two protocols:
//! - `SessionLock` sends one prepared statement per operation (`PREPARE` once per
//!   connection, then `EXECUTE` with the key and the bound as arguments), and a batch that
//!   lifts the session's `statement_timeout` (or PostgreSQL 17's `transaction_timeout`)
//!   with `SET LOCAL` only when one could cut a wait or an unlock short.
//! - `TxLock` always sends simple-protocol batches, so that `BEGIN` rides with the lock in
//!   one round trip and no named prepared statement is needed behind a pooler.
//!
//! Placeholder settings used as markers (never listed in `pg_settings`):
//! - `pglock.session_lock`: set, for the session, to the lock's token while a `SessionLock`
//!   holds a lock on the server session, and cleared at unlock. The token ends with `@` and
//!   the key (`@42`, `@1,-1`), so that a transaction lock can tell from it alone whether the
//!   session lock it finds holds its key. A lock statement that finds
//!   another token there runs on a server session that another client uses: a
//!   transaction-mode pooler sits in between, and the statement takes nothing.
//! - `pglock.tx_lock`: set, for the transaction, to the key of a `TxLock`; the commit checks
//!   it in SQL before `COMMIT`, so a transaction that was ended and replaced inside the
//!   critical section is never committed as if it held the lock.

use crate::{LockKey, LockMode};

/// The session marker's placeholder setting.
pub(crate) const SESSION_MARKER: &str = "pglock.session_lock";
/// The transaction marker's placeholder setting.
pub(crate) const TX_MARKER: &str = "pglock.tx_lock";
/// The text the commit check raises (inside a cast error, SQLSTATE 22P02) when the lock's
/// transaction is gone.
pub(crate) const TX_LOST: &str = "pglock: the lock's transaction ended inside the critical section";

/// The current marker of the server session, '' when none.
pub(crate) const MARKER: &str =
    "COALESCE(pg_catalog.current_setting('pglock.session_lock', true), '')";

/// The session settings a lock's statements depend on: `statement_timeout` and
/// `transaction_timeout` (NULL before PostgreSQL 17), which can cut a wait short, and
/// `lock_timeout`, which a wait must override unless it already has the wanted value;
/// and whether the server is a hot standby (where a lock excludes nobody on the primary).
/// Read once per lock and connection, and again after a critical section used it.
const SETTINGS: &str = "pg_catalog.current_setting('statement_timeout'), \
     pg_catalog.current_setting('transaction_timeout', true), \
     pg_catalog.current_setting('lock_timeout'), pg_catalog.pg_is_in_recovery()";

/// `, SETTINGS` when `learn`.
fn settings(learn: bool) -> String {
    if learn {
        format!(", {SETTINGS}")
    } else {
        String::new()
    }
}

/// Lifts `transaction_timeout` for the rest of the transaction, where the server has it.
const LIFT_TRANSACTION_TIMEOUT: &str =
    "SELECT CASE WHEN pg_catalog.current_setting('transaction_timeout', true) IS NOT NULL \
     THEN pg_catalog.set_config('transaction_timeout', '0', true) END";

/// How a statement receives the key: as parameters (`$1` or `$1, $2`) for a prepared
/// statement, or as literals in a simple-protocol Query, alone or in a batch that first
/// lifts the session's timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Args {
    Params,
    Literals,
    Lifted,
}

/// The key as function arguments.
fn key_args(key: &LockKey, args: Args) -> String {
    match args {
        Args::Literals | Args::Lifted => key.sql_args(),
        Args::Params if key.as_pair().is_some() => "$1, $2".to_owned(),
        Args::Params => "$1".to_owned(),
    }
}

/// The `n`th parameter after the key's own.
fn param(key: &LockKey, n: usize) -> String {
    let first = if key.as_pair().is_some() { 3 } else { 2 };
    format!("${}", first + n)
}

/// The comment a waiting statement starts with, so that `pg_stat_activity.query` of a
/// waiting session says which lock it waits for (integers only: the key as the lock
/// functions take it; `pglock key NAME` or `LockKey::from_name` maps a name to it).
pub(crate) fn wait_comment(key: &LockKey) -> String {
    format!("/* pglock: waits for advisory lock {} */ ", key.sql_args())
}

/// A text literal. Only for the lock's token and numbers, never for user input; quotes are
/// doubled all the same.
pub(crate) fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The token and bound as parameters or literals.
fn token_sql(key: &LockKey, args: Args, token: &str) -> String {
    match args {
        Args::Params => param(key, 0),
        Args::Literals | Args::Lifted => literal(token),
    }
}

/// The first column of a lock statement sent inside a transaction block that was already
/// open: it took nothing. (A session lock's marker would be undone by that transaction's
/// rollback while the lock stayed, unmarked; a transaction lock would join it.)
pub(crate) const IN_TRANSACTION: &str = "!";

/// Whether a transaction block was already open when this simple Query (also one that
/// `EXECUTE`s a prepared statement) arrived: `now()` (the transaction's start) equals
/// `statement_timestamp()` unless it was. (Not so in the extended protocol, whose statement
/// timestamp is taken again at Execute.) `<>`, not `<`: a wall clock stepped back in
/// between makes the start earlier. Qualified, so that no operator on the `search_path` can
/// stand in.
pub(crate) const TRANSACTION_WAS_OPEN: &str =
    "pg_catalog.now() OPERATOR(pg_catalog.<>) pg_catalog.statement_timestamp()";

/// Runs `outcome` unless a transaction block was already open, and then returns
/// [`IN_TRANSACTION`].
pub(crate) fn outside_transaction(outcome: &str) -> String {
    format!("CASE WHEN {TRANSACTION_WAS_OPEN} THEN '{IN_TRANSACTION}' ELSE {outcome} END")
}

/// The first column of a session statement when the server session carries another
/// client's marker: `#` and that marker (`#` alone if it is empty). A token never starts
/// with `#`, and the marker is read a second time only on this path.
fn or_shared() -> String {
    format!("'#' || {MARKER}")
}

/// Session lock, one non-blocking try. Columns: the outcome (the token when locked, ''
/// when busy, `#` and the marker found when the session carries another client's marker,
/// [`IN_TRANSACTION`] when a transaction was open), and with `learn` the settings.
pub(crate) fn session_try(
    mode: LockMode,
    key: &LockKey,
    args: Args,
    token: &str,
    learn: bool,
) -> String {
    let m = mode.fn_suffix();
    let k = key_args(key, args);
    let t = token_sql(key, args, token);
    let learn = settings(learn);
    let shared = or_shared();
    // The marker is read once where the session is ours (a subquery to read it once on
    // every path costs more than a second read on the rare one).
    let outcome = outside_transaction(&format!(
        "COALESCE(CASE WHEN {MARKER} = '' THEN \
         CASE WHEN pg_catalog.pg_try_advisory_lock{m}({k}) \
         THEN pg_catalog.set_config('{SESSION_MARKER}', {t}, false) ELSE '' END END, \
         {shared})"
    ));
    format!("SELECT {outcome}{learn}")
}

/// Session lock, a wait bounded by `lock_timeout`, set for this statement only to `ms`
/// milliseconds, or left as the session has it with `None` (when it already has the
/// wanted value). Column: the outcome (neither starting with `#` nor [`IN_TRANSACTION`]
/// when locked, `#` and the marker found when the session carries another client's
/// marker); a wait that runs out fails with 55P03.
///
/// With parameters, `ms` only says whether the statement sets `lock_timeout`: the value is
/// the parameter after the token.
pub(crate) fn session_wait(
    mode: LockMode,
    key: &LockKey,
    args: Args,
    token: &str,
    ms: Option<u32>,
) -> String {
    let m = mode.fn_suffix();
    let k = key_args(key, args);
    let t = token_sql(key, args, token);
    let lt = ms.map(|ms| match args {
        Args::Params => param(key, 1),
        Args::Literals | Args::Lifted => literal(&ms.to_string()),
    });
    let set_lt = lt.map_or_else(String::new, |lt| {
        format!("pg_catalog.set_config('lock_timeout', {lt}, true) || ")
    });
    let shared = or_shared();
    // `||` runs left to right: the marker (rolled back with the statement if the wait
    // fails), lock_timeout, then the wait.
    let outcome = outside_transaction(&format!(
        "COALESCE(CASE WHEN {MARKER} IN ('', {t}) THEN \
         pg_catalog.set_config('{SESSION_MARKER}', {t}, false) || {set_lt}\
         pg_catalog.pg_advisory_lock{m}({k})::text END, {shared})"
    ));
    let select = format!("SELECT {outcome}");
    match args {
        Args::Params | Args::Literals => select,
        Args::Lifted => guarded(&select),
    }
}

/// Session unlock. Columns: whether it unlocked (`true` or `false`; `#` and the marker
/// found when the session carries another client's marker: nothing was touched), whether
/// a transaction was open (the critical section left one), and with `learn` (after a
/// critical section that used the connection) the settings.
pub(crate) fn session_unlock(
    mode: LockMode,
    key: &LockKey,
    args: Args,
    token: &str,
    learn: bool,
) -> String {
    let m = mode.fn_suffix();
    let k = key_args(key, args);
    let t = token_sql(key, args, token);
    // Whether a transaction was open is asked also after a critical section that never
    // used the connection: it may have come out of the pool (or `from_connection`) inside
    // one.
    let learn = settings(learn);
    let shared = or_shared();
    let select = format!(
        "SELECT COALESCE(CASE WHEN {MARKER} IN ('', {t}) THEN \
         pg_catalog.pg_advisory_unlock{m}({k})::text || \
         pg_catalog.set_config('{SESSION_MARKER}', '', false) END, {shared}), \
         ({TRANSACTION_WAS_OPEN})::text{learn}"
    );
    match args {
        Args::Params | Args::Literals => select,
        Args::Lifted => guarded(&select),
    }
}

/// The other client's marker, when the first column of a session statement says its
/// server session carries one (see [`or_shared`]).
pub(crate) fn shared_marker(outcome: Option<&str>) -> Option<&str> {
    match outcome {
        None => Some(""),
        Some(o) => o.strip_prefix('#'),
    }
}

/// A simple-protocol batch that reads the settings, lifts them for its implicit
/// transaction, and runs `select`. Its first row is the settings, its last `select`'s.
pub(crate) fn guarded(select: &str) -> String {
    format!(
        "SELECT {SETTINGS}; SET LOCAL statement_timeout = 0; {LIFT_TRANSACTION_TIMEOUT}; {select}"
    )
}

/// Clears this lock's session marker after a `ROLLBACK` undid the unlock's clearing.
pub(crate) fn clear_session_marker(token: &str) -> String {
    format!(
        "SELECT pg_catalog.set_config('{SESSION_MARKER}', '', false) \
         WHERE {MARKER} = {}",
        literal(token)
    )
}

/// This session's row for the lock in `pg_locks`, as a `FROM ... WHERE` clause.
fn held_clause(mode: LockMode, key: &LockKey) -> String {
    format!(
        "FROM pg_catalog.pg_locks WHERE locktype = 'advisory' \
         AND pid = pg_catalog.pg_backend_pid() AND classid = {} AND objid = {} \
         AND objsubid = {} AND mode = '{}' AND granted",
        key.classid(),
        key.objid(),
        key.objsubid(),
        mode.pg_locks_mode()
    )
}

/// Whether this session holds the lock.
pub(crate) fn is_held(mode: LockMode, key: &LockKey) -> String {
    format!("SELECT EXISTS (SELECT {})", held_clause(mode, key))
}

/// Session locks: release the lock if a failed wait took it after all.
pub(crate) fn release_taken(mode: LockMode, key: &LockKey) -> String {
    format!(
        "SET LOCAL statement_timeout = 0; SELECT pg_catalog.pg_advisory_unlock{}({}) {}",
        mode.fn_suffix(),
        key.sql_args(),
        held_clause(mode, key)
    )
}

/// The transaction marker's value for `key`: integers and a comma.
pub(crate) fn tx_marker(key: &LockKey) -> String {
    key.sql_args().replace(' ', "")
}

/// Whether a transaction lock may be taken on this server session: it carries no session
/// marker, or one that ends with another key. Behind a pooler another client's session
/// lock may sit on the session, and a second grant of its key would be re-entrant: two
/// clients would both hold it. The marker ends with the key its session lock holds, so the
/// check is one match of the marker's text: nothing to scan, little to plan on every call.
/// It errs on the safe side: a marker without `@` (written by an earlier pglock, whose
/// markers named no key) refuses every key, and a marker left naming a key its session no
/// longer holds (a `pg_advisory_unlock_all()` sent behind pglock's back) refuses that key.
fn tx_free(key: &LockKey) -> String {
    // One read of the marker, one match against a constant pattern (kept in the session's
    // cache of compiled expressions), with the key appended: `marker/key` is refused when
    // the marker is not empty and has no `@`, or when what follows its `@` is the key. (An
    // E'' literal, so that the backslash means the same whatever
    // standard_conforming_strings says.)
    format!(
        "(NOT ({MARKER} || '/{}') ~ E'^[^@]+/|@([^@/]*)/\\\\1$')",
        tx_marker(key)
    )
}

/// Takes a transaction lock with `lock` (a function of `key`) where `key` is free on this
/// server session, and then sets the transaction marker: `true` when taken, `false`
/// (nothing tried) when the server session holds the key for another client's session
/// lock, [`IN_TRANSACTION`] (nothing tried) when the batch's `BEGIN` found a transaction
/// open already and joined it. One expression, so the check is planned and run once.
fn tx_lock_expr(lock: &str, key: &LockKey) -> String {
    outside_transaction(&format!(
        "((CASE WHEN {} THEN {lock}::text || pg_catalog.set_config('{TX_MARKER}', '{}', true) \
         END) IS NOT NULL)::text",
        tx_free(key),
        tx_marker(key)
    ))
}

/// Transaction lock, one non-blocking try: `BEGIN` and the try in one batch. Columns of
/// its row: whether it locked (`true`, `false`; NULL: the server session holds the key for
/// another client's session lock, [`IN_TRANSACTION`]: a transaction was open before the
/// batch; nothing was tried in either), and with `learn` the settings.
pub(crate) fn tx_try(mode: LockMode, key: &LockKey, learn: bool) -> String {
    // The try returns false when busy: the marker is set only when it returns true.
    let outcome = outside_transaction(&format!(
        "(CASE WHEN {} THEN pg_catalog.pg_try_advisory_xact_lock{}({}) \
         AND pg_catalog.set_config('{TX_MARKER}', '{}', true) IS NOT NULL END)::text",
        tx_free(key),
        mode.fn_suffix(),
        key.sql_args(),
        tx_marker(key),
    ));
    format!("BEGIN; SELECT {outcome}{}", settings(learn))
}

/// Reads the session marker, then ends the transaction: after a transaction lock found its
/// server session holding the key for another client's session lock.
pub(crate) fn tx_refuse_shared() -> String {
    format!("SELECT {MARKER}; ROLLBACK")
}

/// How a transaction lock's wait treats the session's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TxWait {
    /// `statement_timeout` and `transaction_timeout` are off, and `lock_timeout` already
    /// has the wanted value: just the wait.
    Plain,
    /// The timeouts are off: `lock_timeout` is set for the wait and put back to the value
    /// it had, in the same statement.
    SetLockTimeout,
    /// Unknown or set: `statement_timeout` and `transaction_timeout` are lifted for the
    /// wait and put back the same way; the first row is the settings.
    Lift,
}

/// Transaction lock, a wait bounded by `ms` (0: none), in a transaction that outlives the
/// batch, so the critical section sees the session's own settings on every path. The
/// last row's first column is the wait's: whether the key was free to wait for on this
/// server session (false: it holds the key for another client's session lock, and
/// nothing was waited for).
pub(crate) fn tx_wait(mode: LockMode, key: &LockKey, ms: u32, how: TxWait) -> String {
    let lock = format!(
        "pg_catalog.pg_advisory_xact_lock{}({})",
        mode.fn_suffix(),
        key.sql_args()
    );
    let lock = tx_lock_expr(&lock, key);
    // The subquery runs first (OFFSET 0 keeps it apart): it saves lock_timeout and sets
    // the wait's; the lock's expression then runs, and the saved value is put back.
    let set_lt = "(SELECT pg_catalog.current_setting('lock_timeout') AS lt, \
         pg_catalog.set_config('lock_timeout', '{ms}', true) OFFSET 0) s"
        .replace("{ms}", &ms.to_string());
    let put_back = "pg_catalog.set_config('lock_timeout', s.lt, true)";
    match how {
        TxWait::Plain => format!("BEGIN; SELECT {lock}"),
        TxWait::SetLockTimeout => format!("BEGIN; SELECT {lock}, {put_back} FROM {set_lt}"),
        TxWait::Lift => format!(
            "BEGIN; SELECT {SETTINGS}, \
             pg_catalog.set_config('pglock.saved_statement_timeout', \
             pg_catalog.current_setting('statement_timeout'), true), \
             pg_catalog.set_config('pglock.saved_transaction_timeout', \
             COALESCE(pg_catalog.current_setting('transaction_timeout', true), ''), true); \
             SET LOCAL statement_timeout = 0; {LIFT_TRANSACTION_TIMEOUT}; \
             SELECT {lock}, {put_back}, \
             pg_catalog.set_config('statement_timeout', \
             pg_catalog.current_setting('pglock.saved_statement_timeout'), true), \
             CASE WHEN pg_catalog.current_setting('pglock.saved_transaction_timeout') <> '' \
             THEN pg_catalog.set_config('transaction_timeout', \
             pg_catalog.current_setting('pglock.saved_transaction_timeout'), true) END \
             FROM {set_lt}"
        ),
    }
}

/// Commits a transaction lock's transaction, after checking in SQL that it is still the
/// lock's: if the critical section ended it (and perhaps began another), the check raises
/// and `COMMIT` never runs. In a failed transaction the check fails too (25P02), so `COMMIT`
/// never silently rolls back.
pub(crate) fn tx_commit(key: &LockKey) -> String {
    format!(
        "SELECT (CASE WHEN pg_catalog.current_setting('{TX_MARKER}', true) = '{}' THEN '0' \
         ELSE {} END)::int; COMMIT",
        tx_marker(key),
        literal(TX_LOST)
    )
}

/// Ends the current transaction, then this backend, unless the session carries another
/// client's session marker (behind a pooler it is not ours to end). The `ROLLBACK` lets it
/// run inside an aborted transaction, where any other statement fails with 25P02.
///
/// A marker is this lock's when what precedes its `@` is `token`'s: a semaphore marks the
/// slot it holds, a session lock its key, after the same per-lock prefix.
pub(crate) fn terminate(token: &str) -> String {
    format!(
        "ROLLBACK; SELECT pg_catalog.pg_terminate_backend(pg_catalog.pg_backend_pid()) \
         WHERE {}",
        marker_is_ours(token_prefix(token))
    )
}

/// What precedes a token's `@`: the same for every marker one lock sets.
pub(crate) fn token_prefix(token: &str) -> &str {
    token.split('@').next().unwrap_or(token)
}

/// Whether the session's marker is empty or one this lock set: what precedes its `@` is
/// `prefix` (letters, digits and `:`).
pub(crate) fn marker_is_ours(prefix: &str) -> String {
    format!(
        "pg_catalog.split_part({MARKER}, '@', 1) IN ('', {})",
        literal(prefix)
    )
}

/// Makes the server end this session by itself within a few milliseconds, for when
/// `pg_terminate_backend` is refused (a hardened server may revoke it): idle timeouts
/// exist since PostgreSQL 9.6 (in a transaction) and 14 (outside one).
pub(crate) const EXPIRE_SESSION: &str = "SET idle_in_transaction_session_timeout = 1; \
     SELECT pg_catalog.set_config('idle_session_timeout', '1', false) \
     WHERE pg_catalog.current_setting('idle_session_timeout', true) IS NOT NULL";

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "pglock:1:ab";

    #[test]
    fn session_statements_take_parameters() {
        let key = LockKey::new(42);
        let sql = session_try(LockMode::Exclusive, &key, Args::Params, TOKEN, false);
        assert!(sql.contains("pg_catalog.pg_try_advisory_lock($1)"), "{sql}");
        assert!(
            sql.contains("set_config('pglock.session_lock', $2, false)"),
            "{sql}"
        );
        assert!(!sql.contains(TOKEN), "{sql}");
        assert!(!sql.contains("statement_timeout"), "{sql}");
        // The marker is read once on the path where the session is ours.
        assert_eq!(
            sql.matches("'pglock.session_lock', true").count(),
            2,
            "{sql}"
        );
        let learning = session_try(LockMode::Exclusive, &key, Args::Params, TOKEN, true);
        assert!(learning.ends_with(SETTINGS), "{learning}");
        let sql = session_wait(
            LockMode::Shared,
            &LockKey::pair(1, 2),
            Args::Params,
            TOKEN,
            Some(0),
        );
        assert!(
            sql.contains("pg_catalog.pg_advisory_lock_shared($1, $2)"),
            "{sql}"
        );
        assert!(
            sql.contains("set_config('pglock.session_lock', $3, false)"),
            "{sql}"
        );
        assert!(
            sql.contains("set_config('lock_timeout', $4, true)"),
            "{sql}"
        );
        // The marker, then lock_timeout, then the wait, in one `||` chain.
        assert!(sql.find("$3, false) ||") < sql.find("'lock_timeout'"));
        assert!(sql.find("'lock_timeout'") < sql.find("pg_advisory_lock_shared"));
        let plain = session_wait(LockMode::Exclusive, &key, Args::Params, TOKEN, None);
        assert!(!plain.contains("lock_timeout"), "{plain}");
        assert!(
            plain.contains("$2, false) || pg_catalog.pg_advisory_lock($1)::text"),
            "{plain}"
        );
        let sql = session_unlock(LockMode::Exclusive, &key, Args::Params, TOKEN, false);
        assert!(
            sql.contains("IN ('', $2) THEN pg_catalog.pg_advisory_unlock($1)::text ||"),
            "{sql}"
        );
        assert!(
            sql.ends_with(
                "(pg_catalog.now() OPERATOR(pg_catalog.<>) pg_catalog.statement_timestamp())::text"
            ),
            "{sql}"
        );
        let used = session_unlock(LockMode::Exclusive, &key, Args::Params, TOKEN, true);
        assert!(
            used.contains(&format!(
                "(pg_catalog.now() OPERATOR(pg_catalog.<>) pg_catalog.statement_timestamp())::text, {SETTINGS}"
            )),
            "{used}"
        );
    }

    #[test]
    fn another_clients_marker_comes_back_after_a_hash() {
        assert_eq!(shared_marker(Some("#pglock:1:ab@5")), Some("pglock:1:ab@5"));
        assert_eq!(shared_marker(Some("#")), Some(""));
        assert_eq!(shared_marker(None), Some(""));
        assert_eq!(shared_marker(Some(TOKEN)), None);
        assert_eq!(shared_marker(Some("")), None);
        assert_eq!(shared_marker(Some("true")), None);
    }

    #[test]
    fn session_batches_lift_the_timeouts_first() {
        let key = LockKey::new(-7);
        let sql = session_wait(LockMode::Exclusive, &key, Args::Lifted, TOKEN, Some(1500));
        assert!(sql.starts_with(&format!(
            "SELECT {SETTINGS}; SET LOCAL statement_timeout = 0; "
        )));
        assert!(
            sql.contains("set_config('lock_timeout', '1500', true)"),
            "{sql}"
        );
        assert!(sql.contains("pg_advisory_lock(-7)"), "{sql}");
        assert!(sql.contains("'pglock:1:ab'"), "{sql}");
        let sql = session_unlock(LockMode::Shared, &key, Args::Lifted, TOKEN, true);
        assert!(sql.contains("SET LOCAL statement_timeout = 0"), "{sql}");
        assert!(sql.contains("pg_advisory_unlock_shared(-7)"), "{sql}");
        let plain = session_unlock(LockMode::Shared, &key, Args::Literals, TOKEN, true);
        assert!(plain.starts_with("SELECT COALESCE"), "{plain}");
        assert!(!plain.contains(';'), "one statement: {plain}");
    }

    #[test]
    fn the_wait_comment_holds_only_integers() {
        assert_eq!(
            wait_comment(&LockKey::pair(1, -1)),
            "/* pglock: waits for advisory lock 1, -1 */ "
        );
        let named = wait_comment(&LockKey::from_name("*/ DROP TABLE x; /*"));
        assert!(!named.contains("DROP"), "{named}");
    }

    #[test]
    fn literals_are_quoted() {
        assert_eq!(literal("a'b"), "'a''b'");
        assert_eq!(tx_marker(&LockKey::pair(1, -1)), "1,-1");
    }

    #[test]
    fn transaction_statements() {
        let key = LockKey::pair(1, -1);
        let free = "(NOT (COALESCE(pg_catalog.current_setting('pglock.session_lock', true), '') \
             || '/1,-1') ~ E'^[^@]+/|@([^@/]*)/\\\\1$')";
        let open = "CASE WHEN pg_catalog.now() OPERATOR(pg_catalog.<>) pg_catalog.statement_timestamp() THEN '!' ELSE";
        assert_eq!(
            tx_try(LockMode::Shared, &key, false),
            format!(
                "BEGIN; SELECT {open} (CASE WHEN {free} THEN \
                 pg_catalog.pg_try_advisory_xact_lock_shared(1, -1) \
                 AND pg_catalog.set_config('pglock.tx_lock', '1,-1', true) IS NOT NULL END)::text \
                 END"
            )
        );
        assert!(tx_try(LockMode::Shared, &key, true).ends_with(SETTINGS));
        let plain = tx_wait(LockMode::Exclusive, &key, 0, TxWait::Plain);
        assert_eq!(
            plain,
            format!(
                "BEGIN; SELECT {open} ((CASE WHEN {free} THEN \
                 pg_catalog.pg_advisory_xact_lock(1, -1)::text \
                 || pg_catalog.set_config('pglock.tx_lock', '1,-1', true) END) IS NOT NULL)::text \
                 END"
            )
        );
        assert_eq!(plain.matches("pglock.session_lock").count(), 1, "{plain}");
        assert!(plain.contains(r"~ E'^[^@]+/|@([^@/]*)/\\1$'"), "{plain}");
        let fast = tx_wait(LockMode::Exclusive, &key, 250, TxWait::SetLockTimeout);
        assert!(
            fast.starts_with(&format!("BEGIN; SELECT {open} ((CASE WHEN {free} THEN ")),
            "{fast}"
        );
        assert!(!fast.contains("SET LOCAL"), "{fast}");
        assert!(
            fast.contains("set_config('lock_timeout', '250', true) OFFSET 0) s"),
            "{fast}"
        );
        assert!(
            fast.contains("set_config('lock_timeout', s.lt, true)"),
            "{fast}"
        );
        let slow = tx_wait(LockMode::Exclusive, &key, 0, TxWait::Lift);
        assert!(slow.contains("SET LOCAL statement_timeout = 0"), "{slow}");
        assert!(slow.contains("pglock.saved_statement_timeout"), "{slow}");
        assert!(
            slow.contains("set_config('lock_timeout', '0', true)"),
            "{slow}"
        );
        let commit = tx_commit(&key);
        assert!(commit.ends_with("::int; COMMIT"), "{commit}");
        assert!(commit.contains("= '1,-1' THEN '0'"), "{commit}");
    }

    #[test]
    fn held_clause_names_the_pg_locks_coordinates() {
        assert!(is_held(LockMode::Exclusive, &LockKey::new(42))
            .contains("classid = 0 AND objid = 42 AND objsubid = 1 AND mode = 'ExclusiveLock'"));
        assert!(is_held(LockMode::Shared, &LockKey::pair(1, -1)).contains(
            "classid = 1 AND objid = 4294967295 AND objsubid = 2 AND mode = 'ShareLock'"
        ));
    }
}
