//! A migration runner on the real `refinery` crate, which takes no lock of its own: every
//! replica of a service runs this at start, and exactly one applies each migration.
//!
//! - One session lock spans the whole run, on a direct connection, keyed by database,
//!   schema and migration table (a namespaced name), so two apps sharing a database keep
//!   apart.
//! - It waits by polling (`WaitMode::poll`), which is safe beside `CREATE INDEX
//!   CONCURRENTLY` in a migration: a server-side wait would hold a virtual transaction
//!   that the index build waits for.
//! - While it waits it logs who holds the lock (`pglock::inspect::holders`).
//! - refinery reads the applied migrations after the lock is taken, so a replica that
//!   waited finds nothing left to do.
//!
//! Run: `ci/with-postgres cargo run -p pglock-recipes --example refinery`: three replicas (processes)
//! start at once; the program checks that each migration ran exactly once.

use std::process::Command;
use std::time::{Duration, Instant};

use pglock::r2d2_postgres::{postgres::NoTls, PostgresConnectionManager};
use pglock::{inspect, r2d2, LockKey, LockOptions, SessionLock, WaitMode};

#[path = "../../examples/common/mod.rs"]
mod common;
use refinery::{Migration, Runner};

const TABLE: &str = "pglock_example_refinery_history";

fn migrations() -> Result<Vec<Migration>, refinery::Error> {
    Ok(vec![
        Migration::unapplied(
            "V1__create_items",
            "CREATE TABLE pglock_example_items (id int PRIMARY KEY, name text); \
             INSERT INTO pglock_example_applied VALUES (1, pg_backend_pid());",
        )?,
        Migration::unapplied(
            "V2__seed_items",
            "INSERT INTO pglock_example_items VALUES (1, 'one'), (2, 'two'); \
             INSERT INTO pglock_example_applied VALUES (2, pg_backend_pid());",
        )?,
        Migration::unapplied(
            "V3__slow_index",
            "SELECT pg_sleep(0.5); CREATE INDEX ON pglock_example_items (name); \
             INSERT INTO pglock_example_applied VALUES (3, pg_backend_pid());",
        )?,
    ])
}

fn replica(id: &str) -> Result<(), Box<dyn std::error::Error>> {
    let url = common::database_url("cargo run -p pglock-recipes --example refinery");
    let pool = r2d2::Pool::new(PostgresConnectionManager::new(url.parse()?, NoTls))?;
    let mut admin = pool.get()?;
    let (db, schema): (String, String) = {
        let row = admin.query_one("SELECT current_database(), current_schema()", &[])?;
        (row.get(0), row.get(1))
    };
    let key = LockKey::from_name_in(&format!("{db}/{schema}"), TABLE);
    let options = LockOptions::new()
        .wait_mode(WaitMode::poll())
        .lock_timeout(Duration::from_secs(120));
    let mut lock = SessionLock::with_options(&pool, key.clone(), options)?;
    let start = Instant::now();
    let mut guard = loop {
        if let Some(guard) = lock.try_lock_for(Duration::from_millis(200))? {
            break guard;
        }
        for h in inspect::holders(&mut *admin, Some(&key))?
            .iter()
            .filter(|h| h.granted)
        {
            println!("replica {id}: waiting; held by backend {:?}", h.pid);
        }
        if start.elapsed() > Duration::from_secs(120) {
            return Err("gave up waiting for the migration lock".into());
        }
    };
    // Under the lock: refinery reads what is applied now, then applies the rest.
    let report = Runner::new(&migrations()?)
        .set_migration_table_name(TABLE)
        .run(&mut *guard)?;
    let applied: Vec<String> = report
        .applied_migrations()
        .iter()
        .map(|m| m.to_string())
        .collect();
    println!(
        "replica {id}: applied {applied:?} after waiting {:?}",
        start.elapsed()
    );
    pglock::SessionGuard::unlock(guard)?;
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, id] = &args[..] {
        if flag == "--replica" {
            return replica(id);
        }
    }
    let url = common::database_url("cargo run -p pglock-recipes --example refinery");
    let mut client = pglock::postgres::Client::connect(&url, NoTls)?;
    client.batch_execute(&format!(
        "DROP TABLE IF EXISTS pglock_example_items, {TABLE}, pglock_example_applied; \
         CREATE TABLE pglock_example_applied (version int, pid int)"
    ))?;
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for id in 0..3 {
        children.push(
            Command::new(&exe)
                .args(["--replica", &id.to_string()])
                .spawn()?,
        );
    }
    for mut child in children {
        if !child.wait()?.success() {
            return Err("a replica failed".into());
        }
    }
    let rows = client.query(
        "SELECT version, count(*) FROM pglock_example_applied GROUP BY version ORDER BY version",
        &[],
    )?;
    let counts: Vec<(i32, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    println!("times each migration ran: {counts:?}");
    if counts != [(1, 1), (2, 1), (3, 1)] {
        return Err("a migration ran twice, or not at all".into());
    }
    println!("Three replicas, each migration applied exactly once.");
    Ok(())
}
