//! Several worker processes race for one lock; each logs its critical sections, and the
//! demo checks at the end that no two overlapped.
//!
//! ```sh
//! ci/with-postgres cargo run --example demo
//! ```
//!
//! Needs `DATABASE_URL` (the `ci/with-postgres` script provides a throwaway server).

use std::error::Error;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use pglock::r2d2_postgres::{postgres::NoTls, PostgresConnectionManager};
use pglock::{r2d2, LockKey, SessionGuard, SessionLock};

mod common;

const WORKERS: usize = 4;
const ROUNDS: usize = 3;
const LOCK_NAME: &str = "pglock-demo";

type Pool = r2d2::Pool<PostgresConnectionManager<NoTls>>;

fn pool(size: u32) -> Result<Pool, Box<dyn Error>> {
    let url = common::database_url("cargo run --example demo");
    let manager = PostgresConnectionManager::new(url.parse()?, NoTls);
    Ok(r2d2::Pool::builder().max_size(size).build(manager)?)
}

fn main() -> ExitCode {
    let result = match std::env::args().nth(1).as_deref() {
        Some("worker") => worker(),
        _ => race(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Starts the workers as separate processes, then checks their log for overlaps.
fn race() -> Result<(), Box<dyn Error>> {
    let pool = pool(1)?;
    let mut conn = pool.get()?;
    conn.batch_execute(
        "DROP TABLE IF EXISTS pglock_demo_log;
         CREATE TABLE pglock_demo_log (
             worker int, round int, pid int,
             started timestamptz, finished timestamptz)",
    )?;
    let key = LockKey::from_name(LOCK_NAME);
    println!("{WORKERS} worker processes race for the lock {key}\n");

    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for id in 0..WORKERS {
        children.push(
            Command::new(&exe)
                .arg("worker")
                .env("PGLOCK_DEMO_WORKER", id.to_string())
                .spawn()?,
        );
    }
    for mut child in children {
        if !child.wait()?.success() {
            return Err("a worker failed".into());
        }
    }

    let sections: i64 = conn
        .query_one("SELECT count(*) FROM pglock_demo_log", &[])?
        .get(0);
    let overlaps: i64 = conn
        .query_one(
            "SELECT count(*) FROM pglock_demo_log a JOIN pglock_demo_log b
               ON (a.worker, a.round) < (b.worker, b.round)
              AND a.started < b.finished AND b.started < a.finished",
            &[],
        )?
        .get(0);
    conn.batch_execute("DROP TABLE pglock_demo_log")?;
    println!("\n{sections} critical sections in {WORKERS} processes; {overlaps} overlapped.");
    if overlaps != 0 || sections != (WORKERS * ROUNDS) as i64 {
        return Err("mutual exclusion failed".into());
    }
    println!("No two workers ever held the lock at the same time.");
    Ok(())
}

/// One worker: takes the lock a few times, and logs each critical section.
fn worker() -> Result<(), Box<dyn Error>> {
    let id: i32 = std::env::var("PGLOCK_DEMO_WORKER")?.parse()?;
    let pool = pool(1)?;
    let mut lock = SessionLock::new(&pool, LOCK_NAME)?;
    for round in 0..ROUNDS as i32 {
        let asked = Instant::now();
        let mut guard = lock.lock()?;
        let waited = asked.elapsed();
        let pid: i32 = guard.query_one("SELECT pg_backend_pid()", &[])?.get(0);
        println!(
            "worker {id} (backend {pid}) holds the lock, round {}, after waiting {:>4} ms",
            round + 1,
            waited.as_millis()
        );
        guard.execute(
            "INSERT INTO pglock_demo_log VALUES ($1, $2, $3, clock_timestamp(), NULL)",
            &[&id, &round, &pid],
        )?;
        std::thread::sleep(Duration::from_millis(100)); // the "work"
        guard.execute(
            "UPDATE pglock_demo_log SET finished = clock_timestamp()
              WHERE worker = $1 AND round = $2",
            &[&id, &round],
        )?;
        SessionGuard::unlock(guard)?;
    }
    Ok(())
}
