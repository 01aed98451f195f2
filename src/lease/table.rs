//! The lease table: its validated, quoted name and the SQL that creates it.

use std::fmt;

use postgres::Client;

use crate::{Error, LockKey, Result};

/// The longest table name pglock accepts, in bytes: the token sequence is named
/// `<table>_token_seq`, and PostgreSQL truncates identifiers at 63 bytes.
const MAX_TABLE_BYTES: usize = 63 - "_token_seq".len();
/// The longest schema name, in bytes (PostgreSQL's identifier limit).
const MAX_SCHEMA_BYTES: usize = 63;

/// The table that holds the leases of [`LeaseLock`](crate::LeaseLock) and
/// [`LeaseSemaphore`](crate::LeaseSemaphore): one row per name and slot, plus a sequence
/// that hands out fencing tokens.
///
/// The name is `table` or `schema.table`, each part an SQL identifier of ASCII letters,
/// digits and underscores that does not start with a digit (at most 53 bytes for the
/// table, 63 for the schema). pglock always double-quotes it, so case matters: use
/// lower case to reach the same table from SQL without quotes. An unqualified name is
/// looked up through the session's `search_path`.
///
/// Nothing but a name validated this way is ever put into the text of pglock's lease
/// statements; names, owners and payloads travel as parameters.
///
/// The default is `pglock_leases`. Create it once with [`create`](LeaseTable::create), or
/// run the SQL of [`create_sql`](LeaseTable::create_sql) from your own migrations:
///
/// ```sql
/// CREATE SEQUENCE IF NOT EXISTS "pglock_leases_token_seq" AS bigint CACHE 1;
/// CREATE TABLE IF NOT EXISTS "pglock_leases" (
///     name        text        NOT NULL,
///     slot        integer     NOT NULL CHECK (slot >= 0),
///     owner       text        NOT NULL,
///     token       bigint      NOT NULL,
///     nonce       bigint      NOT NULL DEFAULT 0,
///     lease_us    bigint      NOT NULL CHECK (lease_us > 0),
///     acquired_at timestamptz NOT NULL,
///     renewed_at  timestamptz NOT NULL,
///     expires_at  timestamptz NOT NULL,
///     data        bytea,
///     PRIMARY KEY (name, slot)
/// );
/// ```
///
/// A role that uses leases needs `SELECT, INSERT, UPDATE` on the table (`DELETE` too for
/// [`LeaseGuard::unlock_and_delete`](crate::LeaseGuard::unlock_and_delete)) and `USAGE`
/// on the sequence; nothing else.
///
/// # Examples
///
/// ```no_run
/// use pglock::LeaseTable;
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let mut client: postgres::Client = todo!();
/// let table = LeaseTable::new("locks.leases")?;
/// table.create(&mut client)?;
/// assert_eq!(table.to_string(), r#""locks"."leases""#);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct LeaseTable {
    schema: Option<String>,
    table: String,
}

impl LeaseTable {
    /// The default table's name.
    pub const DEFAULT: &'static str = "pglock_leases";

    /// A lease table named `table` or `schema.table`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if the name is not one or two identifiers as described
    /// on [`LeaseTable`]; nothing is sent to the server.
    pub fn new(name: &str) -> Result<Self> {
        let invalid = |why: &str| Error::InvalidArgument {
            key: LockKey::lease(&format!("{name:?}"), ""),
            message: format!("lease table name {name:?}: {why}"),
        };
        let mut parts = name.split('.');
        let (schema, table) = match (parts.next(), parts.next(), parts.next()) {
            (Some(table), None, None) => (None, table),
            (Some(schema), Some(table), None) => (Some(schema), table),
            _ => return Err(invalid("expected `table` or `schema.table`")),
        };
        if let Some(schema) = schema {
            check_identifier(schema, MAX_SCHEMA_BYTES).map_err(|why| invalid(&why))?;
        }
        check_identifier(table, MAX_TABLE_BYTES).map_err(|why| invalid(&why))?;
        Ok(LeaseTable {
            schema: schema.map(str::to_owned),
            table: table.to_owned(),
        })
    }

    /// Creates the table and its token sequence if they do not exist, in one transaction
    /// serialized by an advisory transaction lock (so replicas may all call it at start).
    /// Works through transaction-mode poolers.
    ///
    /// It sends its own `BEGIN` and `COMMIT`, so it takes a [`Client`] outside any
    /// transaction (not a `postgres::Transaction`, whose work it would commit). To create
    /// the table inside your own migration's transaction, run
    /// [`create_sql`](LeaseTable::create_sql) there instead.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the server refused (for example, no `CREATE` privilege on the
    /// schema).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool: r2d2::Pool<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>> = todo!();
    /// pglock::LeaseTable::default().create(&mut *pool.get()?)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn create(&self, client: &mut Client) -> Result<()> {
        let batch = format!(
            "BEGIN; SELECT pg_catalog.pg_advisory_xact_lock({}); {} COMMIT",
            LockKey::from_name(&format!("pglock lease table {self}"))
                .as_i64()
                .unwrap_or_default(),
            self.create_sql()
        );
        client
            .batch_execute(&batch)
            .map_err(|source| Error::Database {
                key: LockKey::lease(&self.to_string(), ""),
                operation: "create the lease table",
                source,
            })
            .inspect_err(|_| {
                // Leave no failed transaction on the connection.
                let _ = client.batch_execute("ROLLBACK");
            })
    }

    /// The SQL that creates the table and its sequence if they do not exist (what
    /// [`create`](LeaseTable::create) runs), for teams that run their own migrations.
    pub fn create_sql(&self) -> String {
        crate::lease::sql::create(&self.to_string(), &self.sequence())
    }

    /// The token sequence's name, quoted.
    pub(crate) fn sequence(&self) -> String {
        let sequence = format!("{}_token_seq", self.table);
        match &self.schema {
            Some(schema) => format!("\"{schema}\".\"{sequence}\""),
            None => format!("\"{sequence}\""),
        }
    }
}

impl Default for LeaseTable {
    /// `pglock_leases`, looked up through the `search_path`.
    fn default() -> Self {
        LeaseTable {
            schema: None,
            table: LeaseTable::DEFAULT.to_owned(),
        }
    }
}

/// The table's name as it appears in SQL, quoted.
impl fmt::Display for LeaseTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(schema) = &self.schema {
            write!(f, "\"{schema}\".")?;
        }
        write!(f, "\"{}\"", self.table)
    }
}

impl fmt::Debug for LeaseTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LeaseTable({self})")
    }
}

fn check_identifier(part: &str, max: usize) -> std::result::Result<(), String> {
    let mut chars = part.chars();
    match chars.next() {
        None => return Err("empty identifier".to_owned()),
        Some(c) if !(c.is_ascii_alphabetic() || c == '_') => {
            return Err(format!(
                "{part:?} must start with an ASCII letter or underscore"
            ))
        }
        Some(_) => {}
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!(
            "{part:?} may hold only ASCII letters, digits and underscores"
        ));
    }
    if part.len() > max {
        return Err(format!("{part:?} is longer than {max} bytes"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated_and_quoted() {
        assert_eq!(LeaseTable::default().to_string(), "\"pglock_leases\"");
        assert_eq!(
            LeaseTable::default().sequence(),
            "\"pglock_leases_token_seq\""
        );
        let t = LeaseTable::new("Ops.Leases_2").unwrap();
        assert_eq!(t.to_string(), "\"Ops\".\"Leases_2\"");
        assert_eq!(t.sequence(), "\"Ops\".\"Leases_2_token_seq\"");
        let longest = "t".repeat(MAX_TABLE_BYTES);
        assert!(LeaseTable::new(&longest).is_ok());
        for bad in [
            "",
            ".",
            "a.",
            ".a",
            "a.b.c",
            "1abc",
            "a-b",
            "a b",
            "x\"; DROP TABLE t; --",
            "t\0",
            "é",
            "a;b",
            &"t".repeat(MAX_TABLE_BYTES + 1),
            &format!("{}.t", "s".repeat(64)),
        ] {
            match LeaseTable::new(bad) {
                Err(Error::InvalidArgument { message, .. }) => {
                    assert!(message.contains("lease table name"), "{message}")
                }
                other => panic!("{bad:?} was accepted: {other:?}"),
            }
        }
    }
}
