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
         lease_us bigint NOT NULL CHECK (lease_us > 0), \
         acquired_at timestamptz NOT NULL, \
         renewed_at timestamptz NOT NULL, \
         expires_at timestamptz NOT NULL, \
         data bytea, \
         PRIMARY KEY (name, slot)); "
    )
}

/// Takes slot `$2` of lease `$1` for owner `$3` for `$4` microseconds if it is free (no
/// row, or the row's lease has expired or was released); `$5` is the payload, stored when
/// `$6` is true (else an existing row keeps its payload).
///
/// One row: `(locked, token, holder, remaining_us)`. Locked: the new token and `$4`.
/// Busy: the holder's token, owner and the microseconds until its lease expires. No row:
/// another client created the row at the same moment (try again).
///
/// A busy attempt changes nothing: the `UPDATE` finds no expired row, and the `INSERT`
/// finds that the row exists; neither draws a token.
pub(crate) fn lock(table: &str, sequence: &str) -> String {
    let expires = "pg_catalog.clock_timestamp() + $4 * interval '1 microsecond'";
    format!(
        "WITH cur AS (SELECT owner, token, expires_at FROM {table} WHERE name = $1 AND slot = $2), \
         taken AS (UPDATE {table} AS l SET owner = $3, token = pg_catalog.nextval('{sequence}'), \
         lease_us = $4, acquired_at = pg_catalog.clock_timestamp(), \
         renewed_at = pg_catalog.clock_timestamp(), expires_at = {expires}, \
         data = CASE WHEN $6 THEN $5 ELSE l.data END \
         WHERE l.name = $1 AND l.slot = $2 AND l.expires_at <= pg_catalog.clock_timestamp() \
         RETURNING l.token), \
         created AS (INSERT INTO {table} \
         (name, slot, owner, token, lease_us, acquired_at, renewed_at, expires_at, data) \
         SELECT $1, $2, $3, pg_catalog.nextval('{sequence}'), $4, pg_catalog.clock_timestamp(), \
         pg_catalog.clock_timestamp(), {expires}, $5 WHERE NOT EXISTS (SELECT FROM cur) \
         ON CONFLICT (name, slot) DO NOTHING RETURNING token) \
         SELECT true, token, NULL::text, $4 FROM taken \
         UNION ALL SELECT true, token, NULL::text, $4 FROM created \
         UNION ALL SELECT false, token, owner, {REMAINING_US} FROM cur \
         WHERE NOT EXISTS (SELECT FROM taken)"
    )
}

/// Renews slot `$2` of lease `$1` held with token `$3` for the lease length stored in
/// its row, if it has not expired. Idempotent: safe to retry when a reply is lost. One
/// row if renewed, none if the lease expired or changed hands.
pub(crate) fn renew(table: &str) -> String {
    format!(
        "UPDATE {table} SET renewed_at = pg_catalog.clock_timestamp(), \
         expires_at = pg_catalog.clock_timestamp() + lease_us * interval '1 microsecond' \
         WHERE name = $1 AND slot = $2 AND token = $3 AND expires_at > pg_catalog.clock_timestamp() \
         RETURNING lease_us"
    )
}

/// Releases slot `$2` of lease `$1` held with token `$3`: ends it now (keeping the row and
/// its payload), or deletes the row when `delete`. With `notify`, also notifies
/// [`CHANNEL`] with payload `$4` in the same statement. One row if released, none if the
/// lease had expired or changed hands.
pub(crate) fn unlock(table: &str, delete: bool, notify: bool) -> String {
    let head = if delete {
        format!("DELETE FROM {table}")
    } else {
        format!("UPDATE {table} SET expires_at = pg_catalog.clock_timestamp()")
    };
    let returning = if notify {
        format!("pg_catalog.pg_notify('{CHANNEL}', $4)")
    } else {
        "1".to_owned()
    };
    format!(
        "{head} WHERE name = $1 AND slot = $2 AND token = $3 \
         AND expires_at > pg_catalog.clock_timestamp() RETURNING {returning}"
    )
}

/// The rows of lease `$1` (every slot), without taking it.
pub(crate) fn read(table: &str) -> String {
    format!(
        "SELECT slot, owner, token, lease_us, acquired_at, renewed_at, expires_at, data, \
         expires_at > pg_catalog.clock_timestamp(), GREATEST({REMAINING_US}, 0) \
         FROM {table} WHERE name = $1 ORDER BY slot"
    )
}

/// Inside the caller's transaction: whether slot `$2` of lease `$1` is still held with
/// token `$3`, locking the row `FOR SHARE` until the transaction ends so that no other
/// holder can take the lease over before the transaction's writes commit.
pub(crate) fn fence(table: &str) -> String {
    format!(
        "SELECT token = $3 AND expires_at > pg_catalog.clock_timestamp() FROM {table} \
         WHERE name = $1 AND slot = $2 FOR SHARE"
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
            renew(T),
            unlock(T, false, false),
            unlock(T, true, true),
            read(T),
            fence(T),
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
        assert_eq!(sql.matches("nextval").count(), 2);
        // The update only touches an expired row; the insert only runs when no row exists.
        assert!(sql.contains("l.expires_at <= pg_catalog.clock_timestamp()"));
        assert!(sql.contains("WHERE NOT EXISTS (SELECT FROM cur)"));
        assert!(sql.contains("ON CONFLICT (name, slot) DO NOTHING"));
        assert!(!sql.contains("now()"), "never the transaction's start time");
    }

    #[test]
    fn renew_fence_and_unlock_are_keyed_by_the_token_and_refuse_an_expired_lease() {
        for sql in [renew(T), unlock(T, false, false), unlock(T, true, false)] {
            assert!(sql.contains("token = $3"), "{sql}");
            assert!(
                sql.contains("expires_at > pg_catalog.clock_timestamp()"),
                "{sql}"
            );
        }
        assert!(fence(T).ends_with("FOR SHARE"));
        assert!(unlock(T, true, false).starts_with("DELETE"));
        assert!(unlock(T, false, true).contains("pg_notify('pglock_leases', $4)"));
        assert!(!unlock(T, false, false).contains("pg_notify"));
    }

    #[test]
    fn create_is_idempotent_sql() {
        let sql = create(T, S);
        assert!(sql.starts_with("CREATE SEQUENCE IF NOT EXISTS \"s\".\"leases_token_seq\""));
        assert!(sql.contains("CREATE TABLE IF NOT EXISTS \"s\".\"leases\""));
        assert!(sql.contains("PRIMARY KEY (name, slot)"));
    }
}
