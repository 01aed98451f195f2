//! pglock beside sqlx's `PgAdvisoryLock`, the async crate's advisory lock, in one run:
//!
//! ```sh
//! taskset -c 0 ci/with-postgres cargo bench -p pglock-sqlx-compare
//! ```
//!
//! - W1: `try_lock` + unlock on random keys.
//! - W2: an unbounded `lock` + unlock (sqlx's lock has no bound).
//! - W4: 8 workers, one key, a read-increment-write of a counter row through the lock's
//!   connection: acquisitions per second and the hand-off latency.
//!
//! sqlx runs on a current-thread tokio runtime per worker; pglock blocks in plain threads.

use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use pglock::r2d2;
use pglock::r2d2_postgres::{postgres::NoTls, PostgresConnectionManager};
use pglock::{SessionGuard, SessionLock};
use sqlx::postgres::{PgAdvisoryLock, PgAdvisoryLockKey, PgConnection};
use sqlx::{Connection, Either};

#[path = "../../common/mod.rs"]
mod common;

type Pool = r2d2::Pool<PostgresConnectionManager<NoTls>>;

fn url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| {
        panic!(
            "DATABASE_URL is not set. Run:\n\n    \
             taskset -c 0 ci/with-postgres cargo bench -p pglock-sqlx-compare\n"
        )
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// µs per operation of `op`, run in blocks of `n`: the median of `rounds` blocks.
fn per_op(rounds: usize, n: usize, mut op: impl FnMut()) -> Vec<f64> {
    (0..rounds)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..n {
                op();
            }
            start.elapsed().as_secs_f64() * 1e6 / n as f64
        })
        .collect()
}

/// Keys no other workload uses.
struct Keys(i64);

impl Keys {
    fn next(&mut self) -> i64 {
        self.0 += 1;
        self.0
    }
}

fn main() {
    let url = url();
    let manager = PostgresConnectionManager::new(url.parse().expect("DATABASE_URL"), NoTls);
    let pool: Pool = r2d2::Pool::builder().max_size(20).build(manager).unwrap();
    let rt = runtime();
    let mut sqlx_conn = rt.block_on(PgConnection::connect(&url)).unwrap();
    let mut pglock = SessionLock::new(&pool, 1_i64).unwrap();
    let (mut sk, mut pk) = (Keys(7_000_000_000), Keys(8_000_000_000));

    // W1 and W2, interleaved in blocks: sqlx, then pglock, 15 times.
    let (mut w1, mut w2) = ([vec![], vec![]], [vec![], vec![]]);
    for round in 0..17 {
        let s1 = per_op(1, 200, || {
            let lock = PgAdvisoryLock::with_key(PgAdvisoryLockKey::BigInt(sk.next()));
            rt.block_on(async {
                match lock.try_acquire(&mut sqlx_conn).await.unwrap() {
                    Either::Left(guard) => {
                        guard.release_now().await.unwrap();
                    }
                    Either::Right(_) => panic!("a fresh key is free"),
                }
            });
        });
        let p1 = per_op(1, 200, || {
            pglock.set_key(pk.next()).unwrap();
            let guard = pglock.try_lock().unwrap().expect("a fresh key is free");
            SessionGuard::unlock(guard).unwrap();
        });
        let s2 = per_op(1, 200, || {
            let lock = PgAdvisoryLock::with_key(PgAdvisoryLockKey::BigInt(sk.next()));
            rt.block_on(async {
                let guard = lock.acquire(&mut sqlx_conn).await.unwrap();
                guard.release_now().await.unwrap();
            });
        });
        let p2 = per_op(1, 200, || {
            pglock.set_key(pk.next()).unwrap();
            SessionGuard::unlock(pglock.lock().unwrap()).unwrap();
        });
        if round >= 2 {
            w1[0].extend(s1);
            w1[1].extend(p1);
            w2[0].extend(s2);
            w2[1].extend(p2);
        }
    }
    let [s1, p1] = w1.map(median);
    let [s2, p2] = w2.map(median);
    println!(
        "\n## pglock {} beside sqlx 0.9\n",
        env!("CARGO_PKG_VERSION")
    );
    println!("| workload | sqlx µs | pglock µs | pglock / sqlx |\n|---|---|---|---|");
    println!(
        "| W1 try_lock + unlock | {s1:.1} | {p1:.1} | {:.3} |",
        p1 / s1
    );
    println!(
        "| W2 lock + unlock (unbounded) | {s2:.1} | {p2:.1} | {:.3} |",
        p2 / s2
    );

    println!(
        "\n| W4: 8 workers, one key, read-increment-write | acquisitions/s | hand-off p50 µs | \
         p99 µs |\n|---|---|---|---|"
    );
    for (name, sqlx) in [("sqlx PgAdvisoryLock", true), ("pglock SessionLock", false)] {
        let runs: Vec<(f64, f64, f64)> = (0..3)
            .map(|i| contend(&pool, &url, 9_000 + i, sqlx))
            .collect();
        let mut runs = runs;
        runs.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (rate, p50, p99) = runs[1];
        println!("| {name} | {rate:.0} | {p50:.1} | {p99:.1} |");
    }
}

/// 8 workers take turns on `key` until 2000 critical sections ran; each reads and writes
/// back a counter row through its lock's connection. Returns (acquisitions/s, p50, p99 of
/// the hand-off from a release to the next holder's return, µs).
fn contend(pool: &Pool, url: &str, key: i64, sqlx: bool) -> (f64, f64, f64) {
    const WORKERS: usize = 8;
    const TOTAL: usize = 2000;
    pool.get()
        .unwrap()
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS pglock_bench_counter (k bigint PRIMARY KEY, n bigint); \
             INSERT INTO pglock_bench_counter VALUES ({key}, 0) \
             ON CONFLICT (k) DO UPDATE SET n = 0"
        ))
        .unwrap();
    let released_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(TOTAL)));
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(WORKERS + 1));
    let handles: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (pool, url) = (pool.clone(), url.to_owned());
            let (released_at, latencies, done, barrier) = (
                Arc::clone(&released_at),
                Arc::clone(&latencies),
                Arc::clone(&done),
                Arc::clone(&barrier),
            );
            thread::spawn(move || {
                let entered = || {
                    if let Some(t) = released_at.lock().unwrap().take() {
                        latencies.lock().unwrap().push(t.elapsed());
                    }
                };
                let more = || done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < TOTAL;
                let mark = || *released_at.lock().unwrap() = Some(Instant::now());
                if sqlx {
                    let rt = runtime();
                    let mut conn = rt.block_on(PgConnection::connect(&url)).unwrap();
                    let lock = PgAdvisoryLock::with_key(PgAdvisoryLockKey::BigInt(key));
                    barrier.wait();
                    rt.block_on(async {
                        loop {
                            let mut guard = lock.acquire(&mut conn).await.unwrap();
                            entered();
                            let c: &mut PgConnection = guard.as_mut();
                            let n: i64 = sqlx::query_scalar(
                                "SELECT n FROM pglock_bench_counter WHERE k = $1",
                            )
                            .bind(key)
                            .fetch_one(&mut *c)
                            .await
                            .unwrap();
                            sqlx::query("UPDATE pglock_bench_counter SET n = $2 WHERE k = $1")
                                .bind(key)
                                .bind(n + 1)
                                .execute(&mut *c)
                                .await
                                .unwrap();
                            let go_on = more();
                            mark();
                            guard.release_now().await.unwrap();
                            if !go_on {
                                break;
                            }
                        }
                    });
                } else {
                    let mut lock = SessionLock::new(&pool, key).unwrap();
                    let (read, write) = {
                        let mut g = lock.lock().unwrap();
                        (
                            g.prepare("SELECT n FROM pglock_bench_counter WHERE k = $1")
                                .unwrap(),
                            g.prepare("UPDATE pglock_bench_counter SET n = $2 WHERE k = $1")
                                .unwrap(),
                        )
                    };
                    barrier.wait();
                    let mut go_on = true;
                    while go_on {
                        let mut guard = lock.lock().unwrap();
                        entered();
                        let n: i64 = guard.query_one(&read, &[&key]).unwrap().get(0);
                        guard.execute(&write, &[&key, &(n + 1)]).unwrap();
                        go_on = more();
                        mark();
                        SessionGuard::unlock(guard).unwrap();
                    }
                }
            })
        })
        .collect();
    let elapsed = common::run_timed(&barrier, handles);
    let sections = done.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        common::counter(pool, key) as usize,
        sections,
        "lost increments: mutual exclusion failed"
    );
    let mut l = Arc::try_unwrap(latencies).unwrap().into_inner().unwrap();
    l.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    (
        sections as f64 / elapsed.as_secs_f64(),
        us(l[l.len() / 2]),
        us(l[l.len() * 99 / 100]),
    )
}
