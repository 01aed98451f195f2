//! pglock against the raw SQL it stands for, in the same run.
//!
//! ```sh
//! ci/with-postgres cargo bench --bench locks
//! ```
//!
//! Each workload runs beside its floor: the same `postgres` crate on its own pooled
//! connection, sending the minimal statements for the same server work. Criterion reports
//! the absolute times; the ratios come from an interleaved A/B run (floor and pglock
//! alternate in blocks, so drift on a busy machine hits both), as the median of the
//! per-block ratios. The report at the end is the table in the README.
//!
//! - W1: uncontended `try_lock` + unlock on random keys.
//! - W2: bounded `lock` (with a `lock_timeout`) + unlock on a free key.
//! - W3: `TxLock::with_lock` with an empty body (begin, lock, commit).
//! - W4: 8 threads on one key, each lock, increment, unlock: hand-offs per second, and
//!   the hand-off latency from release to the next holder's return.
//! - W5: scale: a session already holding 1, 100, 10,000 keys; 1, 10, 100 waiters on one
//!   key; and a full lock table.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use criterion::Criterion;
use pglock::{Error, LockOptions, SessionGuard, SessionLock, TxLock};
use postgres::{Client, NoTls};
use r2d2_postgres::PostgresConnectionManager;

type Pool = r2d2::Pool<PostgresConnectionManager<NoTls>>;
type Conn = r2d2::PooledConnection<PostgresConnectionManager<NoTls>>;

fn pool(size: u32) -> Pool {
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| {
        panic!(
            "DATABASE_URL is not set. Run the benchmarks against a throwaway server:\n\n    \
             ci/with-postgres cargo bench --bench locks\n"
        )
    });
    let manager = PostgresConnectionManager::new(url.parse().expect("DATABASE_URL"), NoTls);
    r2d2::Pool::builder()
        .max_size(size)
        .min_idle(Some(0))
        .build(manager)
        .expect("connect to DATABASE_URL")
}

/// xorshift64*: random keys without a dependency.
struct Rng(u64);

impl Rng {
    fn key(&mut self) -> i64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) as i64
    }
}

/// One workload: the floor and pglock, each a closure doing one operation.
struct Pair<'a> {
    name: &'static str,
    round_trips: u32,
    floor: Box<dyn FnMut() + 'a>,
    pglock: Box<dyn FnMut() + 'a>,
}

/// The result of an interleaved A/B run.
struct Ratio {
    floor: Duration,
    pglock: Duration,
    ratio: f64,
    ratio_p25: f64,
    ratio_p75: f64,
}

/// Alternates blocks of floor and pglock operations (swapping which goes first), and
/// returns the medians of the per-op times and of the per-block ratios.
fn interleaved(pair: &mut Pair<'_>, blocks: usize, per_block: usize) -> Ratio {
    let time = |f: &mut dyn FnMut()| {
        let start = Instant::now();
        for _ in 0..per_block {
            f();
        }
        start.elapsed() / per_block as u32
    };
    // Warm both paths up first.
    time(&mut *pair.floor);
    time(&mut *pair.pglock);
    let (mut floors, mut libs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for block in 0..blocks {
        let (f, l) = if block % 2 == 0 {
            let f = time(&mut *pair.floor);
            (f, time(&mut *pair.pglock))
        } else {
            let l = time(&mut *pair.pglock);
            (time(&mut *pair.floor), l)
        };
        floors.push(f);
        libs.push(l);
        ratios.push(l.as_secs_f64() / f.as_secs_f64());
    }
    floors.sort();
    libs.sort();
    ratios.sort_by(|a, b| a.total_cmp(b));
    Ratio {
        floor: floors[blocks / 2],
        pglock: libs[blocks / 2],
        ratio: ratios[blocks / 2],
        ratio_p25: ratios[blocks / 4],
        ratio_p75: ratios[blocks * 3 / 4],
    }
}

fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

/// One round trip on this machine: the median of empty simple queries.
fn round_trip(conn: &mut Client) -> Duration {
    let mut samples: Vec<Duration> = (0..2000)
        .map(|_| {
            let start = Instant::now();
            conn.simple_query("").unwrap();
            start.elapsed()
        })
        .collect();
    samples.sort();
    samples[samples.len() / 2]
}

fn w1<'a>(floor: &'a mut Conn, lib: &'a mut Option<Conn>) -> Pair<'a> {
    let mut rng_f = Rng(0x9e37_79b9_7f4a_7c15);
    let mut rng_l = Rng(0xdead_beef_cafe_f00d);
    Pair {
        name: "W1 try_lock + unlock, random keys",
        round_trips: 2,
        floor: Box::new(move || {
            let k = rng_f.key();
            floor
                .simple_query(&format!("SELECT pg_try_advisory_lock({k})"))
                .unwrap();
            floor
                .simple_query(&format!("SELECT pg_advisory_unlock({k})"))
                .unwrap();
        }),
        pglock: Box::new(move || {
            let conn = lib.take().unwrap();
            let mut lock =
                SessionLock::from_connection(conn, rng_l.key(), LockOptions::new()).unwrap();
            let guard = lock.try_lock().unwrap().expect("a random key is free");
            SessionGuard::unlock(guard).unwrap();
            *lib = Some(lock.into_connection());
        }),
    }
}

fn w2<'a>(floor: &'a mut Conn, lib: &'a mut SessionLock) -> Pair<'a> {
    let k = lib.key().as_i64().unwrap();
    Pair {
        name: "W2 lock with lock_timeout + unlock",
        round_trips: 2,
        floor: Box::new(move || {
            floor
                .simple_query(&format!(
                    "SET LOCAL lock_timeout = 5000; SELECT pg_advisory_lock({})",
                    k + 1
                ))
                .unwrap();
            floor
                .simple_query(&format!("SELECT pg_advisory_unlock({})", k + 1))
                .unwrap();
        }),
        pglock: Box::new(move || {
            let guard = lib.lock().unwrap();
            SessionGuard::unlock(guard).unwrap();
        }),
    }
}

fn w3<'a>(floor: &'a mut Conn, lib: &'a mut TxLock) -> Pair<'a> {
    let k = lib.key().as_i64().unwrap();
    Pair {
        name: "W3 TxLock::with_lock, empty body",
        round_trips: 2,
        floor: Box::new(move || {
            floor
                .simple_query(&format!("BEGIN; SELECT pg_advisory_xact_lock({})", k + 1))
                .unwrap();
            floor.simple_query("COMMIT").unwrap();
        }),
        pglock: Box::new(move || {
            lib.with_lock(|_| Ok::<_, Error>(())).unwrap();
        }),
    }
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
fn contend(pool: &Pool, threads: usize, total: usize, key: i64, raw: bool) -> Handoffs {
    let released_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let done = Arc::new(AtomicUsize::new(0));
    let counter = Arc::new(AtomicUsize::new(0));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let barrier = Arc::new(Barrier::new(threads + 1));
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
                // The critical section: a non-atomic increment, and the hand-off clock.
                let critical = || {
                    if let Some(t) = released_at.lock().unwrap().take() {
                        latencies.lock().unwrap().push(t.elapsed());
                    }
                    let n = counter.load(Ordering::Relaxed);
                    counter.store(n + 1, Ordering::Relaxed);
                    done.fetch_add(1, Ordering::SeqCst) < total
                };
                let mark_release = || *released_at.lock().unwrap() = Some(Instant::now());
                if raw {
                    let mut conn = pool.get().unwrap();
                    let (lock, unlock) = (
                        format!("SELECT pg_advisory_lock({key})"),
                        format!("SELECT pg_advisory_unlock({key})"),
                    );
                    barrier.wait();
                    loop {
                        conn.simple_query(&lock).unwrap();
                        let more = critical();
                        mark_release();
                        conn.simple_query(&unlock).unwrap();
                        if !more {
                            break;
                        }
                    }
                } else {
                    let mut lock = SessionLock::new(&pool, key).unwrap();
                    barrier.wait();
                    loop {
                        let guard = lock.lock().unwrap();
                        let more = critical();
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
    let pool = pool(120);
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
        "| workload | round trips | floor µs/op | pglock µs/op | pglock / floor (p25-p75) |\n\
         |---|---|---|---|---|"
    )
    .unwrap();
    let mut f = pool.get().unwrap();
    let mut lib_conn = Some(pool.get().unwrap());
    let mut session = SessionLock::with_options(
        &pool,
        Rng(7).key(),
        LockOptions::new().lock_timeout(Duration::from_secs(5)),
    )
    .unwrap();
    let mut tx = TxLock::new(&pool, Rng(8).key()).unwrap();
    for which in 0..3 {
        let mut pair = match which {
            0 => w1(&mut f, &mut lib_conn),
            1 => w2(&mut f, &mut session),
            _ => w3(&mut f, &mut tx),
        };
        let mut group = criterion.benchmark_group(pair.name.split(' ').next().unwrap());
        group.bench_function("floor", |b| b.iter(&mut pair.floor));
        group.bench_function("pglock", |b| b.iter(&mut pair.pglock));
        group.finish();
        let r = interleaved(&mut pair, 40, 200);
        writeln!(
            report,
            "| {} | {} | {} | {} | {:.3} ({:.3}-{:.3}) |",
            pair.name,
            pair.round_trips,
            us(r.floor),
            us(r.pglock),
            r.ratio,
            r.ratio_p25,
            r.ratio_p75
        )
        .unwrap();
    }

    // W4: contention.
    writeln!(
        report,
        "\n| W4: 8 threads, one key | hand-offs/s | hand-off p50 µs | hand-off p99 µs |\n\
         |---|---|---|---|"
    )
    .unwrap();
    let (mut floor_rate, mut lib_rate) = (0.0, 0.0);
    for (name, raw) in [("floor", true), ("pglock", false)] {
        // Run twice and keep the second, so both start from warm connections.
        contend(&pool, 8, 500, Rng(9).key(), raw);
        let h = contend(&pool, 8, 3000, Rng(9).key(), raw);
        if raw {
            floor_rate = h.per_second;
        } else {
            lib_rate = h.per_second;
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
        "\nW4 throughput, pglock / floor: {:.3}. Target: at least 0.9, and a hand-off p50 within \
         two round trips ({} µs).",
        lib_rate / floor_rate,
        us(rt * 2)
    )
    .unwrap();

    // W5a: a session that already holds many keys.
    writeln!(
        report,
        "\n| W5: keys the session already holds | floor µs/op | pglock µs/op | pglock / floor |\n\
         |---|---|---|---|"
    )
    .unwrap();
    for held in [1, 100, 10_000] {
        let mut f = pool.get().unwrap();
        let mut l = pool.get().unwrap();
        // Pair-space keys no workload uses; the lock table has room for both sessions.
        f.batch_execute(&format!(
            "SELECT count(pg_advisory_lock(-777, g)) FROM generate_series(1, {held})"
        ))
        .unwrap();
        l.batch_execute(&format!(
            "SELECT count(pg_advisory_lock(-778, g)) FROM generate_series(1, {held})"
        ))
        .unwrap();
        let mut l = Some(l);
        let r = interleaved(&mut w1(&mut f, &mut l), 20, 100);
        let mut l = l.unwrap();
        f.batch_execute("SELECT pg_advisory_unlock_all()").unwrap();
        l.batch_execute("SELECT pg_advisory_unlock_all()").unwrap();
        writeln!(
            report,
            "| {held} | {} | {} | {:.3} |",
            us(r.floor),
            us(r.pglock),
            r.ratio
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
        let floor = contend(&pool, waiters + 1, 1000, key, true);
        let lib = contend(&pool, waiters + 1, 1000, key, false);
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
