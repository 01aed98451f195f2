//! The SQL of the leases, as plain functions of the (validated, quoted) table and sequence
//! names, so it can be read and tested without a server.
//!
//! Every statement is one statement with no session state, sent with the extended
//! protocol's unnamed statement (`query_typed`): it works through transaction-mode
//! poolers. Names, owners, payloads, tokens and lengths travel as parameters; the only
//! text put into SQL is the table and sequence name that [`LeaseTable`](super::LeaseTable)
//! validated and quoted.
//!
//! Time is the database's only: expiry is computed and compared with `clock_timestamp()`
//! (the time at that moment, not `now()`, which is the start of the transaction), and
//! the client only ever receives durations, never instants to compare with its own clock.

/// The channel a release notifies when [`notify`](super::LeaseOptions::notify) is on; the
/// payload is [`notify_payload`].
pub(crate) const CHANNEL: &str = "pglock_leases";

/// The payload of a release's notification: the table and the name.
pub(crate) fn notify_payload(table: &str, name: &str) -> String {
    format!("{table} {name}")
}

/// Microseconds from now to `expires_at`, as the server sees it (negative once expired).
const REMAINING_US: &str =
    "(pg_catalog.date_part('epoch', expires_at - pg_catalog.clock_timestamp()) * 1000000)::int8";

/// `CREATE ... IF NOT EXISTS` for the sequence and the table.
pub(crate) fn create(table: &str, sequence: &str) -> String {
    format!(
        "CREATE SEQUENCE IF NOT EXISTS {sequence} AS bigint CACHE 1; \
         CREATE TABLE IF NOT EXISTS {table} (\
         name text NOT NULL, \
         slot integer NOT NULL CHECK (slot >= 0), \
         owner text NOT NULL, \
         token bigint NOT NULL, \
         nonce bigint NOT NULL DEFAULT 0, \
         lease_us bigint NOT NULL CHECK (lease_us > 0), \
         acquired_at timestamptz NOT NULL, \
         renewed_at timestamptz NOT NULL, \
         expires_at timestamptz NOT NULL, \
         data bytea, \
         PRIMARY KEY (name, slot)); "
    )
}

/// Takes slot `$2` of lease `$1` for owner `$3` for `$4` microseconds if it is free (its
/// row's lease has expired or was released); `$5` is the payload, stored when `$6` is
/// true (else the row keeps its payload); `$7` is this attempt's nonce, stored so that an
/// attempt whose reply was lost can be undone.
///
/// One row: `(locked, token, holder, remaining_us)`. Locked: the new token and `$4`.
/// Busy: the holder's token, owner and the microseconds until its lease expires. A row of
/// NULLs, or no row: there was no row for the slot yet; this statement (or a concurrent
/// one) created it, expired, and the next attempt can take it.
///
/// - The token is drawn only by the `UPDATE`, under the row's lock, and drawn again if
///   the row changed under it: tokens of one slot strictly increase in the order the
///   slot was taken, also around a concurrent insert (which only ever creates an
///   expired placeholder row).
/// - The row is locked with `SKIP LOCKED`: an attempt never waits for another session's
///   row lock (a contender's attempt, or a holder's fenced transaction); it finds the
///   slot busy.
/// - A busy attempt changes nothing: it locks no row, draws no token, writes no row.
pub(crate) fn lock(table: &str, sequence: &str) -> String {
    let now = "pg_catalog.clock_timestamp()";
    let expired = format!("expires_at <= {now}");
    format!(
        "WITH cur AS (SELECT owner, token, expires_at FROM {table} WHERE name = $1 AND slot = $2), \
         taken AS (UPDATE {table} AS l SET owner = $3, token = pg_catalog.nextval('{sequence}'), \
         nonce = $7, lease_us = $4, acquired_at = {now}, renewed_at = {now}, \
         expires_at = {now} + $4 * interval '1 microsecond', \
         data = CASE WHEN $6 THEN $5 ELSE l.data END \
         WHERE l.name = $1 AND l.slot = $2 AND l.{expired} AND l.nonce <> $7 \
         AND EXISTS (SELECT FROM {table} WHERE name = $1 AND slot = $2 AND {expired} \
         AND nonce <> $7 FOR NO KEY UPDATE SKIP LOCKED) \
         RETURNING l.token), \
         created AS (INSERT INTO {table} \
         (name, slot, owner, token, nonce, lease_us, acquired_at, renewed_at, expires_at) \
         SELECT $1, $2, '', 0, 0, $4, {now}, {now}, {now} WHERE NOT EXISTS (SELECT FROM cur) \
         ON CONFLICT (name, slot) DO NOTHING RETURNING 0) \
         SELECT true, token, NULL::text, $4 FROM taken \
         UNION ALL SELECT NULL, NULL, NULL, NULL FROM created \
         UNION ALL SELECT false, token, owner, {REMAINING_US} FROM cur \
         WHERE NOT EXISTS (SELECT FROM taken)"
    )
}

/// Undoes an attempt with nonce `$3` on slot `$2` of `$1` whose reply never arrived,
/// whether it already ran or has yet to: a lease it took is ended, and a free row is
/// marked with the nonce, which the attempt's statement refuses to take should it run
/// later. A row another holder has is left alone. Waits at most `wait_ms` for a row lock.
pub(crate) fn abandon(table: &str, wait_ms: u32) -> String {
    format!(
        "UPDATE {table} SET nonce = $3, \
         expires_at = LEAST(expires_at, pg_catalog.clock_timestamp()) \
         WHERE name = $1 AND slot = $2 \
         AND (nonce = $3 OR expires_at <= pg_catalog.clock_timestamp()) {}",
        bounded_wait(wait_ms)
    )
}

/// `AND` a `lock_timeout` of `ms` for the rest of this statement's (implicit) transaction,
/// evaluated with the other conditions, before the row is locked: renewals and releases
/// wait at most that long behind another session's row lock (a fenced transaction, a
/// migration), then fail with 55P03; the heartbeat retries until the holder's deadline.
fn bounded_wait(ms: u32) -> String {
    format!("AND pg_catalog.set_config('lock_timeout', '{ms}', true) IS NOT NULL")
}

/// Renews slot `$2` of lease `$1` held with token `$3` (and, unless `$4` is NULL, taken
/// by the attempt with nonce `$4`: see [`HELD_BY`]) for the lease length stored in its
/// row, if it has not expired. Idempotent: safe to retry when a reply is lost. One
/// row if renewed, none if the lease expired or changed hands.
///
/// A row lock held by another session is waited for at most `wait_ms`.
pub(crate) fn renew(table: &str, wait_ms: u32) -> String {
    format!(
        "UPDATE {table} SET renewed_at = pg_catalog.clock_timestamp(), \
         expires_at = pg_catalog.clock_timestamp() + lease_us * interval '1 microsecond' \
         WHERE {HELD_BY} AND expires_at > pg_catalog.clock_timestamp() \
         {} RETURNING lease_us",
        bounded_wait(wait_ms)
    )
}

/// Releases slot `$2` of lease `$1` held with token `$3` (and nonce `$4`, see
/// [`HELD_BY`]): ends it now (keeping the row and its payload), or deletes the row when
/// `delete`. With `notify`, also notifies [`CHANNEL`] with payload `$5` in the same
/// statement. One row if released, none if the
/// lease had expired or changed hands.
///
/// A row lock held by another session is waited for at most `wait_ms`.
pub(crate) fn unlock(table: &str, delete: bool, notify: bool, wait_ms: u32) -> String {
    let head = if delete {
        format!("DELETE FROM {table}")
    } else {
        format!("UPDATE {table} SET expires_at = pg_catalog.clock_timestamp()")
    };
    let returning = if notify {
        format!("pg_catalog.pg_notify('{CHANNEL}', $5)")
    } else {
        "1".to_owned()
    };
    format!(
        "{head} WHERE {HELD_BY} \
         AND expires_at > pg_catalog.clock_timestamp() {} RETURNING {returning}",
        bounded_wait(wait_ms)
    )
}

/// The row of a hold: slot `$2` of lease `$1` with token `$3`, taken by the attempt with
/// nonce `$4` (NULL: any, for the token-only calls). The token alone is not enough: a
/// failover that loses the token sequence's last WAL record (asynchronous replication)
/// makes the new primary hand a token out again, and the old holder would then renew,
/// fence with and release the new holder's lease.
const HELD_BY: &str =
    "name = $1 AND slot = $2 AND token = $3 AND ($4::pg_catalog.int8 IS NULL OR nonce = $4)";

/// The rows of lease `$1` (every slot), without taking it.
pub(crate) fn read(table: &str) -> String {
    format!(
        "SELECT slot, owner, token, lease_us, acquired_at, renewed_at, expires_at, data, \
         expires_at > pg_catalog.clock_timestamp(), GREATEST({REMAINING_US}, 0) \
         FROM {table} WHERE name = $1 ORDER BY slot"
    )
}

/// Inside the caller's transaction: a row if slot `$2` of lease `$1` is still held with
/// token `$3` and nonce `$4` (see [`HELD_BY`]), which is then locked `FOR SHARE` until the transaction ends, so that no
/// other holder can take the lease over before the transaction's writes commit. A stale
/// token finds no row and locks nothing.
pub(crate) fn fence(table: &str) -> String {
    format!(
        "SELECT true FROM {table} WHERE {HELD_BY} \
         AND expires_at > pg_catalog.clock_timestamp() FOR SHARE"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "\"s\".\"leases\"";
    const S: &str = "\"s\".\"leases_token_seq\"";

    #[test]
    fn statements_put_only_the_table_into_sql_text() {
        for sql in [
            lock(T, S),
            renew(T, 250),
            unlock(T, false, false, 250),
            unlock(T, true, true, 250),
            read(T),
            fence(T),
            abandon(T, 250),
        ] {
            assert!(sql.contains(T), "{sql}");
            // Everything else is a parameter.
            assert!(!sql.contains(';'), "one statement: {sql}");
            let without_table = sql.replace(T, "").replace(S, "");
            assert!(!without_table.contains('"'), "{sql}");
        }
    }

    #[test]
    fn lock_draws_a_token_only_when_it_takes_the_lease() {
        let sql = lock(T, S);
        // Only the update draws a token: the insert makes an expired placeholder.
        assert_eq!(sql.matches("nextval").count(), 1);
        assert!(sql.contains("SELECT $1, $2, '', 0, 0, $4,"));
        // The update only touches an expired row it could lock at once.
        assert!(sql.contains("l.expires_at <= pg_catalog.clock_timestamp()"));
        assert!(sql.contains("FOR NO KEY UPDATE SKIP LOCKED"));
        assert!(sql.contains("WHERE NOT EXISTS (SELECT FROM cur)"));
        assert!(sql.contains("ON CONFLICT (name, slot) DO NOTHING"));
        assert!(!sql.contains("now()"), "never the transaction's start time");
    }

    #[test]
    fn renew_fence_and_unlock_are_keyed_by_the_token_and_refuse_an_expired_lease() {
        for sql in [
            renew(T, 250),
            unlock(T, false, false, 250),
            unlock(T, true, false, 250),
        ] {
            assert!(sql.contains(HELD_BY), "{sql}");
            assert!(
                sql.contains("expires_at > pg_catalog.clock_timestamp()"),
                "{sql}"
            );
        }
        assert!(fence(T).ends_with("FOR SHARE"));
        for sql in [renew(T, 250), unlock(T, true, false, 250)] {
            assert!(
                sql.contains("set_config('lock_timeout', '250', true)"),
                "{sql}"
            );
        }
        assert!(abandon(T, 250).contains("nonce = $3"));
        // A lock statement refuses a row marked with its own nonce.
        assert_eq!(lock(T, S).matches("nonce <> $7").count(), 2);
        assert!(unlock(T, true, false, 250).starts_with("DELETE"));
        assert!(unlock(T, false, true, 250).contains("pg_notify('pglock_leases', $5)"));
        assert!(!unlock(T, false, false, 250).contains("pg_notify"));
    }

    #[test]
    fn create_is_idempotent_sql() {
        let sql = create(T, S);
        assert!(sql.starts_with("CREATE SEQUENCE IF NOT EXISTS \"s\".\"leases_token_seq\""));
        assert!(sql.contains("CREATE TABLE IF NOT EXISTS \"s\".\"leases\""));
        assert!(sql.contains("PRIMARY KEY (name, slot)"));
    }
}
