//! pglock against the raw SQL it stands for, in the same run.
//!
//! ```sh
//! ci/with-postgres cargo bench -p pglock-benches --bench locks
//! ```
//!
//! Each workload runs beside two floors: the fastest raw SQL a careful caller sends (named
//! prepared statements, one round trip per call), and the same minimal statements over
//! the simple protocol. Both use the same `postgres` crate on their own pooled connection.
//! Criterion reports the absolute times; the ratios come from an interleaved run (floors
//! and pglock alternate in blocks, so drift on a busy machine hits all alike), as the
//! median of the per-block ratios. The report at the end is the table in the README.
//!
//! - W1: uncontended `try_lock` + unlock on random keys (one lock, `set_key`); and again
//!   beside the floor's statements sent as SQL `EXECUTE`, as pglock sends its own.
//! - W2: bounded `lock` (with a `lock_timeout`) + unlock on a free key.
//! - W3: `TxLock::with_lock` with an empty body (begin, lock, commit).
//! - W4: 8 threads on one key, each lock, a read-increment-write of a counter row through
//!   the lock's connection, unlock: acquisitions per second, and the hand-off latency from
//!   release to the next holder's return.
//! - W5: scale: a session already holding 1, 100, 10,000 keys; 1, 10, 100 waiters on one
//!   key; and a full lock table.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use criterion::Criterion;
use pglock::{Error, LockOptions, SessionGuard, SessionLock, TxLock};
use postgres::{Client, Statement};

#[path = "common/mod.rs"]
mod common;

use common::{interleaved, pool, round_trip, us, Conn, Pair, Pool, Rng};

/// The prepared floor of W1: `pg_try_advisory_lock($1)` and `pg_advisory_unlock($1)` on
/// keys from `rng`.
fn try_unlock_floor<'a>(floor: &'a mut Conn, mut rng: Rng) -> Box<dyn FnMut() + 'a> {
    let lock = floor.prepare("SELECT pg_try_advisory_lock($1)").unwrap();
    let unlock = floor.prepare("SELECT pg_advisory_unlock($1)").unwrap();
    Box::new(move || {
        let k = rng.key();
        floor.query(&lock, &[&k]).unwrap();
        floor.query(&unlock, &[&k]).unwrap();
    })
}

/// pglock's W1: `set_key`, `try_lock` and unlock on keys from `rng`.
fn try_unlock_pglock<'a>(lib: &'a mut SessionLock, mut rng: Rng) -> Box<dyn FnMut() + 'a> {
    Box::new(move || {
        lib.set_key(rng.key()).unwrap();
        let guard = lib.try_lock().unwrap().expect("a random key is free");
        SessionGuard::unlock(guard).unwrap();
    })
}

fn w1<'a>(floor: &'a mut Conn, same: &'a mut Conn, lib: &'a mut SessionLock) -> Pair<'a> {
    let mut rng_s = Rng(0x1234_5678_9abc_def1);
    Pair {
        name: "W1 try_lock + unlock, random keys",
        round_trips: 2,
        floor: try_unlock_floor(floor, Rng(0x9e37_79b9_7f4a_7c15)),
        same: Box::new(move || {
            let k = rng_s.key();
            same.simple_query(&format!("SELECT pg_try_advisory_lock({k})"))
                .unwrap();
            same.simple_query(&format!("SELECT pg_advisory_unlock({k})"))
                .unwrap();
        }),
        pglock: try_unlock_pglock(lib, Rng(0xdead_beef_cafe_f00d)),
    }
}

fn w2<'a>(floor: &'a mut Conn, same: &'a mut Conn, lib: &'a mut SessionLock) -> Pair<'a> {
    let k = lib.key().as_i64().unwrap();
    // The cheapest bounded wait in one round trip: lock_timeout set for the statement.
    let lock = floor
        .prepare("SELECT set_config('lock_timeout', '5000', true), pg_advisory_lock($1)")
        .unwrap();
    let unlock = floor.prepare("SELECT pg_advisory_unlock($1)").unwrap();
    Pair {
        name: "W2 lock with lock_timeout + unlock",
        round_trips: 2,
        floor: Box::new(move || {
            floor.query(&lock, &[&(k + 1)]).unwrap();
            floor.query(&unlock, &[&(k + 1)]).unwrap();
        }),
        same: Box::new(move || {
            same.simple_query(&format!(
                "SET LOCAL lock_timeout = 5000; SELECT pg_advisory_lock({})",
                k + 2
            ))
            .unwrap();
            same.simple_query(&format!("SELECT pg_advisory_unlock({})", k + 2))
                .unwrap();
        }),
        pglock: Box::new(move || {
            let guard = lib.lock().unwrap();
            SessionGuard::unlock(guard).unwrap();
        }),
    }
}

fn w3<'a>(floor: &'a mut Conn, same: &'a mut Conn, lib: &'a mut TxLock) -> Pair<'a> {
    let k = lib.key().as_i64().unwrap();
    Pair {
        name: "W3 TxLock::with_lock, empty body",
        round_trips: 2,
        // BEGIN cannot ride with a prepared statement in one round trip: the cheapest
        // floor is the same two simple-protocol round trips.
        floor: Box::new(move || {
            floor
                .simple_query(&format!("BEGIN; SELECT pg_advisory_xact_lock({})", k + 1))
                .unwrap();
            floor.simple_query("COMMIT").unwrap();
        }),
        same: Box::new(move || {
            same.simple_query(&format!("BEGIN; SELECT pg_advisory_xact_lock({})", k + 2))
                .unwrap();
            same.simple_query("COMMIT").unwrap();
        }),
        pglock: Box::new(move || {
            lib.with_lock(|_| Ok::<_, Error>(())).unwrap();
        }),
    }
}

/// W1 again, with a third floor in place of the simple-protocol one: the floor's two
/// statements `PREPARE`d in SQL and sent as `EXECUTE`, as pglock sends its own (the
/// `postgres` crate's protocol-level statement names are the same in every process, so
/// behind a pooler they could run another client's statement). It splits pglock's cost
/// into what `EXECUTE` costs and what its checks and client code cost.
fn w1_execute<'a>(floor: &'a mut Conn, same: &'a mut Conn, lib: &'a mut SessionLock) -> Pair<'a> {
    let mut rng_s = Rng(0x0fed_cba9_8765_4321);
    same.batch_execute(
        "PREPARE bench_try(bigint) AS SELECT pg_try_advisory_lock($1); \
         PREPARE bench_unlock(bigint) AS SELECT pg_advisory_unlock($1)",
    )
    .unwrap();
    Pair {
        name: "W1 try_lock + unlock, the floor also as SQL EXECUTE",
        round_trips: 2,
        floor: try_unlock_floor(floor, Rng(0x0123_4567_89ab_cdef)),
        same: Box::new(move || {
            let k = rng_s.key();
            same.simple_query(&format!("EXECUTE bench_try({k})"))
                .unwrap();
            same.simple_query(&format!("EXECUTE bench_unlock({k})"))
                .unwrap();
        }),
        pglock: try_unlock_pglock(lib, Rng(0x5555_aaaa_5555_aaaa)),
    }
}

/// Who takes the lock in a contention run.
#[derive(Clone, Copy, PartialEq)]
enum Contender {
    /// Prepared `SELECT pg_advisory_lock($1)` and `SELECT pg_advisory_unlock($1)`.
    Floor,
    /// `SessionLock`.
    Pglock,
}

/// Statistics of a contention run.
struct Handoffs {
    per_second: f64,
    p50: Duration,
    p99: Duration,
}

/// `threads` threads take turns on one key until `total` critical sections ran. The
/// hand-off latency runs from the moment a holder starts its release to the moment the
/// next holder's lock call returns.
fn contend(pool: &Pool, threads: usize, total: usize, key: i64, who: Contender) -> Handoffs {
    let released_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let done = Arc::new(AtomicUsize::new(0));
    let counter = Arc::new(AtomicUsize::new(0));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let barrier = Arc::new(Barrier::new(threads + 1));
    pool.get()
        .unwrap()
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS pglock_bench_counter (k bigint PRIMARY KEY, n bigint); \
             INSERT INTO pglock_bench_counter VALUES ({key}, 0) ON CONFLICT (k) DO UPDATE SET n = 0"
        ))
        .unwrap();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (pool, released_at, done, counter, latencies, barrier) = (
                pool.clone(),
                Arc::clone(&released_at),
                Arc::clone(&done),
                Arc::clone(&counter),
                Arc::clone(&latencies),
                Arc::clone(&barrier),
            );
            thread::spawn(move || {
                // The critical section: a read-increment-write of the counter row through
                // the lock's connection, a non-atomic increment in memory, and the
                // hand-off clock.
                let critical = |conn: &mut Client, read: &Statement, write: &Statement| {
                    if let Some(t) = released_at.lock().unwrap().take() {
                        latencies.lock().unwrap().push(t.elapsed());
                    }
                    let n: i64 = conn.query_one(read, &[&key]).unwrap().get(0);
                    conn.execute(write, &[&key, &(n + 1)]).unwrap();
                    let n = counter.load(Ordering::Relaxed);
                    counter.store(n + 1, Ordering::Relaxed);
                    done.fetch_add(1, Ordering::SeqCst) < total
                };
                let mark_release = || *released_at.lock().unwrap() = Some(Instant::now());
                let prepare = |conn: &mut Client| {
                    (
                        conn.prepare("SELECT n FROM pglock_bench_counter WHERE k = $1")
                            .unwrap(),
                        conn.prepare("UPDATE pglock_bench_counter SET n = $2 WHERE k = $1")
                            .unwrap(),
                    )
                };
                if who == Contender::Floor {
                    let mut conn = pool.get().unwrap();
                    let lock = conn.prepare("SELECT pg_advisory_lock($1)").unwrap();
                    let unlock = conn.prepare("SELECT pg_advisory_unlock($1)").unwrap();
                    let (read, write) = prepare(&mut conn);
                    barrier.wait();
                    loop {
                        conn.query(&lock, &[&key]).unwrap();
                        let more = critical(&mut conn, &read, &write);
                        mark_release();
                        conn.query(&unlock, &[&key]).unwrap();
                        if !more {
                            break;
                        }
                    }
                } else {
                    let mut lock = SessionLock::new(&pool, key).unwrap();
                    let (read, write) = {
                        let mut guard =
                            lock.try_lock_for(Duration::from_secs(60)).unwrap().unwrap();
                        prepare(&mut guard)
                    };
                    barrier.wait();
                    loop {
                        let mut guard = lock.lock().unwrap();
                        let more = critical(&mut guard, &read, &write);
                        mark_release();
                        SessionGuard::unlock(guard).unwrap();
                        if !more {
                            break;
                        }
                    }
                }
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for h in handles {
        h.join().unwrap();
    }
    let elapsed = start.elapsed();
    let sections = done.load(Ordering::SeqCst);
    assert_eq!(
        counter.load(Ordering::SeqCst),
        sections,
        "mutual exclusion failed"
    );
    let n: i64 = pool
        .get()
        .unwrap()
        .query_one("SELECT n FROM pglock_bench_counter WHERE k = $1", &[&key])
        .unwrap()
        .get(0);
    assert_eq!(n as usize, sections, "lost increments in the database");
    let mut latencies = Arc::try_unwrap(latencies).unwrap().into_inner().unwrap();
    latencies.sort();
    Handoffs {
        per_second: sections as f64 / elapsed.as_secs_f64(),
        p50: latencies[latencies.len() / 2],
        p99: latencies[latencies.len() * 99 / 100],
    }
}

fn main() {
    let mut criterion = Criterion::default()
        .configure_from_args()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let pool = pool(120, "locks");
    let mut report = String::new();

    let mut probe = pool.get().unwrap();
    let version: String = probe.query_one("SHOW server_version", &[]).unwrap().get(0);
    let rt = round_trip(&mut probe);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    writeln!(
        report,
        "PostgreSQL {version} on loopback; {cores} cores ({cpu}); one round trip \
         (empty query) = {} µs median.\n",
        us(rt)
    )
    .unwrap();

    // W1-W3: criterion for absolute times, then the interleaved ratio.
    writeln!(
        report,
        "| workload | round trips | prepared floor µs | simple floor µs | pglock µs | \
         pglock / prepared floor (p25-p75) | pglock / simple floor (p25-p75) |\n\
         |---|---|---|---|---|---|---|"
    )
    .unwrap();
    let mut f = pool.get().unwrap();
    let mut same = pool.get().unwrap();
    let mut lib_w1 = SessionLock::new(&pool, Rng(6).key()).unwrap();
    let mut session = SessionLock::with_options(
        &pool,
        Rng(7).key(),
        LockOptions::new().lock_timeout(Duration::from_secs(5)),
    )
    .unwrap();
    let mut tx = TxLock::new(&pool, Rng(8).key()).unwrap();
    for which in 0..3 {
        let mut pair = match which {
            0 => w1(&mut f, &mut same, &mut lib_w1),
            1 => w2(&mut f, &mut same, &mut session),
            _ => w3(&mut f, &mut same, &mut tx),
        };
        let mut group = criterion.benchmark_group(pair.name.split(' ').next().unwrap());
        group.bench_function("prepared_floor", |b| b.iter(&mut pair.floor));
        group.bench_function("simple_floor", |b| b.iter(&mut pair.same));
        group.bench_function("pglock", |b| b.iter(&mut pair.pglock));
        group.finish();
        let r = interleaved(&mut pair, 60, 150);
        writeln!(
            report,
            "| {} | {} | {} | {} | {} | {:.3} ({:.3}-{:.3}) | {:.3} ({:.3}-{:.3}) |",
            pair.name,
            pair.round_trips,
            us(r.floor),
            us(r.same),
            us(r.pglock),
            r.ratio[0],
            r.ratio[1],
            r.ratio[2],
            r.overhead[0],
            r.overhead[1],
            r.overhead[2]
        )
        .unwrap();
    }

    // W1 split: the floor's statements as SQL EXECUTE, on fresh connections (the
    // PREPAREs stay with them).
    {
        let (mut f, mut same) = (pool.get().unwrap(), pool.get().unwrap());
        let mut lib = SessionLock::new(&pool, Rng(10).key()).unwrap();
        let mut pair = w1_execute(&mut f, &mut same, &mut lib);
        let r = interleaved(&mut pair, 60, 150);
        writeln!(
            report,
            "\nW1 split: prepared floor {} µs; the same two statements as SQL `EXECUTE` {} µs \
             ({:.3} of the prepared floor); pglock {} µs ({:.3} ({:.3}-{:.3}) of the `EXECUTE` \
             floor).",
            us(r.floor),
            us(r.same),
            r.same.as_secs_f64() / r.floor.as_secs_f64(),
            us(r.pglock),
            r.overhead[0],
            r.overhead[1],
            r.overhead[2]
        )
        .unwrap();
    }

    // W4: contention.
    writeln!(
        report,
        "\n| W4: 8 threads, one key, read-increment-write | acquisitions/s | hand-off p50 µs | hand-off p99 µs |\n\
         |---|---|---|---|"
    )
    .unwrap();
    let (mut floor_rate, mut lib_rate) = (0.0, 0.0);
    for (name, who) in [
        ("prepared floor", Contender::Floor),
        ("pglock SessionLock", Contender::Pglock),
    ] {
        // Warm up, then keep the median of three runs.
        contend(&pool, 8, 500, Rng(9).key(), who);
        let mut runs: Vec<Handoffs> = (0..3)
            .map(|_| contend(&pool, 8, 3000, Rng(9).key(), who))
            .collect();
        runs.sort_by(|a, b| a.per_second.total_cmp(&b.per_second));
        let h = runs.swap_remove(1);
        match who {
            Contender::Floor => floor_rate = h.per_second,
            Contender::Pglock => lib_rate = h.per_second,
        }
        writeln!(
            report,
            "| {name} | {:.0} | {} | {} |",
            h.per_second,
            us(h.p50),
            us(h.p99)
        )
        .unwrap();
    }
    writeln!(
        report,
        "\nW4 throughput, pglock / prepared floor: {:.3}.",
        lib_rate / floor_rate
    )
    .unwrap();

    // W5a: a session that already holds many keys.
    writeln!(
        report,
        "\n| W5: keys the session already holds | W1 floor µs | W1 pglock µs | pglock / floor |\n\
         |---|---|---|---|"
    )
    .unwrap();
    for held in [1, 100, 10_000] {
        let mut f = pool.get().unwrap();
        let mut same = pool.get().unwrap();
        let mut l = pool.get().unwrap();
        // Pair-space keys no workload uses; the lock table has room for both sessions.
        f.batch_execute(&format!(
            "SELECT count(pg_advisory_lock(-777, g)) FROM generate_series(1, {held}) g"
        ))
        .unwrap();
        l.batch_execute(&format!(
            "SELECT count(pg_advisory_lock(-778, g)) FROM generate_series(1, {held}) g"
        ))
        .unwrap();
        let mut lock = SessionLock::from_connection(l, Rng(12).key(), LockOptions::new()).unwrap();
        let r = interleaved(&mut w1(&mut f, &mut same, &mut lock), 21, 100);
        let mut l = lock.into_connection().unwrap();
        f.batch_execute("SELECT pg_advisory_unlock_all()").unwrap();
        l.batch_execute("SELECT pg_advisory_unlock_all()").unwrap();
        writeln!(
            report,
            "| {held} | {} | {} | {:.3} |",
            us(r.floor),
            us(r.pglock),
            r.ratio[0]
        )
        .unwrap();
    }

    // W5b: hand-offs as the queue grows.
    writeln!(
        report,
        "\n| W5: waiters on one key | floor p50 / p99 µs | pglock p50 / p99 µs | pglock hand-offs/s |\n\
         |---|---|---|---|"
    )
    .unwrap();
    for waiters in [1, 10, 100] {
        let key = Rng(10 + waiters as u64).key();
        let floor = contend(&pool, waiters + 1, 1000, key, Contender::Floor);
        let lib = contend(&pool, waiters + 1, 1000, key, Contender::Pglock);
        writeln!(
            report,
            "| {waiters} | {} / {} | {} / {} | {:.0} |",
            us(floor.p50),
            us(floor.p99),
            us(lib.p50),
            us(lib.p99),
            lib.per_second
        )
        .unwrap();
    }

    // W5c: the lock table's capacity.
    let mut filler = pool.get().unwrap();
    let mut lock = SessionLock::with_options(
        &pool,
        Rng(11).key(),
        LockOptions::new().lock_timeout(Duration::from_secs(5)),
    )
    .unwrap();
    let err = filler
        .batch_execute(
            "SELECT count(pg_advisory_lock(-999, g)) FROM generate_series(1, 10000000) g",
        )
        .expect_err("the lock table never filled");
    let held: i64 = filler
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
            &[],
        )
        .map(|r| r.get(0))
        .unwrap_or(-1);
    let start = Instant::now();
    let try_err = lock.try_lock().map(|_| ()).unwrap_err();
    let try_time = start.elapsed();
    let start = Instant::now();
    let lock_err = lock.lock().map(|_| ()).unwrap_err();
    let lock_time = start.elapsed();
    filler
        .batch_execute("SELECT pg_advisory_unlock_all()")
        .unwrap();
    writeln!(
        report,
        "\nW5 capacity: one session filled the lock table at {held} advisory locks ({}). \
         Then `try_lock` failed in {} µs and `lock` (5 s bound) in {} µs, both with \
         `{}`.",
        err.as_db_error().map_or("?", |e| e.message()),
        us(try_time),
        us(lock_time),
        match (&try_err, &lock_err) {
            (Error::LockTableFull { .. }, Error::LockTableFull { .. }) => "Error::LockTableFull",
            _ => "an unexpected error",
        }
    )
    .unwrap();

    criterion.final_summary();
    println!("\n## pglock benchmark report\n\n{report}");
}
