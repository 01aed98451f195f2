//! The first example of the README, as a program: `ci/with-postgres cargo run --example readme`.
use pglock::r2d2_postgres::{postgres::NoTls, PostgresConnectionManager};
use pglock::{r2d2, SessionLock};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL").map_err(|_| {
        "set DATABASE_URL to a PostgreSQL server, e.g. postgres://postgres@localhost/postgres"
    })?;
    let pool = r2d2::Pool::new(PostgresConnectionManager::new(url.parse()?, NoTls))?;

    let mut lock = SessionLock::new(&pool, "nightly-report")?;
    lock.with_lock(|conn| -> Result<(), Box<dyn std::error::Error>> {
        // One process in the whole cluster at a time runs this.
        conn.execute("SELECT pg_sleep(1)", &[])?;
        Ok(())
    })?;
    Ok(())
}
