//! A migration runner on `TxLock`: every replica runs it at start-up; whichever comes
//! first applies the pending migrations, the others wait, then find nothing to do.
//!
//! ```sh
//! ci/with-postgres cargo run --example migrate
//! ```
//!
//! The lock, the migrations and the record of them share one transaction: if a migration
//! fails, nothing of it stays and the lock is released; if the runner dies, the server
//! rolls back and frees the lock. It also works behind PgBouncer in transaction mode.

use std::error::Error;
use std::thread;

use pglock::{LockOptions, TxLock};
use r2d2_postgres::{postgres::NoTls, PostgresConnectionManager};

mod common;

type Pool = r2d2::Pool<PostgresConnectionManager<NoTls>>;

/// The migrations, in order. Real runners read them from files.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE pglock_demo_accounts (id bigint PRIMARY KEY, owner text NOT NULL)",
    ),
    (
        2,
        "ALTER TABLE pglock_demo_accounts ADD COLUMN balance numeric NOT NULL DEFAULT 0",
    ),
    (
        3,
        "CREATE INDEX pglock_demo_accounts_owner ON pglock_demo_accounts (owner)",
    ),
];

/// Applies the pending migrations once, whichever replica gets here first.
fn migrate(pool: &Pool, replica: usize) -> Result<usize, Box<dyn Error + Send + Sync>> {
    let options = LockOptions::new().lock_timeout(std::time::Duration::from_secs(60));
    let mut lock = TxLock::with_options(pool, "schema-migrations", options)?;
    lock.with_lock(|tx| -> Result<usize, Box<dyn Error + Send + Sync>> {
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS pglock_demo_migrations (
                 version bigint PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )?;
        let applied: Option<i64> = tx
            .query_one("SELECT max(version) FROM pglock_demo_migrations", &[])?
            .get(0);
        let applied = applied.unwrap_or(0);
        let mut count = 0;
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > applied) {
            println!("replica {replica}: applying migration {version}");
            tx.batch_execute(sql)?;
            tx.execute(
                "INSERT INTO pglock_demo_migrations (version) VALUES ($1)",
                &[version],
            )?;
            count += 1;
        }
        Ok(count)
    })
}

fn main() -> Result<(), Box<dyn Error + Send + Sync>> {
    let url = common::database_url("cargo run --example migrate");
    let manager = PostgresConnectionManager::new(url.parse()?, NoTls);
    let pool = r2d2::Pool::builder().max_size(4).build(manager)?;
    pool.get()?
        .batch_execute("DROP TABLE IF EXISTS pglock_demo_migrations, pglock_demo_accounts")?;

    // Three replicas start at once; in production they are separate processes or hosts.
    let replicas: Vec<_> = (1..=3)
        .map(|replica| {
            let pool = pool.clone();
            thread::spawn(move || migrate(&pool, replica).map(|n| (replica, n)))
        })
        .collect();
    let mut total = 0;
    for handle in replicas {
        let (replica, applied) = handle.join().map_err(|_| "a replica panicked")??;
        if applied == 0 {
            println!("replica {replica}: schema up to date, nothing to do");
        }
        total += applied;
    }
    assert_eq!(
        total,
        MIGRATIONS.len(),
        "each migration must be applied exactly once"
    );
    println!("applied {total} migrations exactly once across 3 replicas");
    pool.get()?
        .batch_execute("DROP TABLE pglock_demo_migrations, pglock_demo_accounts")?;
    Ok(())
}
