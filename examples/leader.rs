//! A periodic job that runs on one replica at a time: three replicas (threads here,
//! processes or hosts in production) run `Leader::run`; the leader's session is then
//! killed, and another replica (or the same one, on a fresh session) takes over within
//! milliseconds. Run: `ci/with-postgres cargo run --example leader`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use pglock::r2d2_postgres::{postgres::NoTls, PostgresConnectionManager};
use pglock::{r2d2, Leader, LockKey};

mod common;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = common::database_url("cargo run --example leader");
    let pool = r2d2::Pool::new(PostgresConnectionManager::new(url.parse()?, NoTls))?;
    let key = LockKey::from_name("pglock-example/report-scheduler");
    let stop = Arc::new(AtomicBool::new(false));
    let inside = Arc::new(AtomicUsize::new(0));
    let runs = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();

    let replicas: Vec<_> = (0..3)
        .map(|replica| {
            let (pool, key, stop, inside, runs) = (
                pool.clone(),
                key.clone(),
                Arc::clone(&stop),
                Arc::clone(&inside),
                Arc::clone(&runs),
            );
            thread::spawn(move || -> Result<(), pglock::Error> {
                let leader = Leader::advisory(&pool, key)?;
                leader.run(Duration::from_millis(200), &stop, |leadership| {
                    leadership.check()?; // long jobs check between steps
                                         // (A leader killed mid-job is not interrupted; this job is too short
                                         // to overlap the next leader's, so two at once would be a bug.)
                    assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two leaders");
                    runs.fetch_add(1, Ordering::SeqCst);
                    println!(
                        "{:>6} ms: replica {replica} runs the job",
                        start.elapsed().as_millis()
                    );
                    inside.fetch_sub(1, Ordering::SeqCst);
                    Ok(())
                })
            })
        })
        .collect();

    thread::sleep(Duration::from_millis(700));
    // An administrator (or a failover) ends the leader's session.
    let mut admin = pool.get()?;
    let killed = admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' \
         AND objid = $1::bigint::oid AND classid = $2::bigint::oid AND granted",
        &[&i64::from(key.objid()), &i64::from(key.classid())],
    )?;
    println!(
        "{:>6} ms: the leader's session was terminated ({killed})",
        start.elapsed().as_millis()
    );
    thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::SeqCst);
    for replica in replicas {
        replica.join().expect("a replica panicked")?;
    }
    println!("{} runs.", runs.load(Ordering::SeqCst));
    Ok(())
}
