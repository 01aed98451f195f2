//! The README's lease example: one holder at a time for a nightly export, with a fencing
//! token checked in each batch's transaction. Run: `ci/with-postgres cargo run --example lease`.

use std::time::Duration;

use pglock::r2d2_postgres::{postgres::NoTls, PostgresConnectionManager};
use pglock::{r2d2, LeaseLock, LeaseOptions, LeaseTable};

mod common;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = common::database_url("cargo run --example lease");
    let pool = r2d2::Pool::new(PostgresConnectionManager::new(url.parse()?, NoTls))?;
    LeaseTable::default().create(&mut *pool.get()?)?; // once; or its SQL in your migrations

    let options = LeaseOptions::new()
        .lease(Duration::from_secs(10))
        .notify(true);
    let mut lock = LeaseLock::with_options(&pool, "nightly-export", options)?;
    lock.with_lock(|lease| -> Result<(), Box<dyn std::error::Error>> {
        for batch in 0..3 {
            lease.check()?; // stop before anybody else can hold the lease
            let mut conn = pool.get()?;
            let mut tx = conn.transaction()?;
            lease.fence(&mut tx)?; // still ours; a takeover waits for this commit
            tx.execute("SELECT $1::bigint, $2::int", &[&lease.token(), &batch])?;
            tx.commit()?;
        }
        println!("exported under token {}", lease.token());
        Ok(())
    })?;
    Ok(())
}
