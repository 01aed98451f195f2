//! pglock's coordination types against the raw SQL they stand for, in the same run (in
//! the style of `benches/locks.rs`).
//!
//! ```sh
//! taskset -c 0 ci/with-postgres cargo bench -p pglock-benches --bench coordination
//! ```
//!
//! - S1: uncontended `AdvisorySemaphore::try_lock` + unlock (4 permits). Floors: a
//!   prepared `pg_try_advisory_lock($1, $2)` on slot 0 and its unlock (what a caller who
//!   knew a free slot would send; pglock also tries the other slots in the same statement
//!   when the first is busy, and notifies waiters in its unlock).
//! - L1: uncontended `LockSet::try_lock` + unlock of 4 keys. Floors: one prepared
//!   statement trying the 4 keys (not all or nothing) and one unlocking them.
//! - L2: `LockSet::lock` with a `lock_timeout` + unlock of 4 keys. Floors: one prepared
//!   statement setting `lock_timeout` and waiting for the 4 keys, and the unlock.
//! - S2: 8 threads share a semaphore of 2 permits: permits per second, and the hand-off
//!   latency from a release to a waiter's return from `lock()` (waiters wake on NOTIFY).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use criterion::Criterion;
use pglock::{AdvisorySemaphore, LockOptions, LockSet, LockSetGuard, SemaphorePermit};

#[path = "common/mod.rs"]
mod common;

use common::{interleaved, pool, round_trip, us, Conn, Pair, Pool, Rng};

fn s1<'a>(
    floor: &'a mut Conn,
    same: &'a mut Conn,
    lib: &'a mut AdvisorySemaphore,
    base: i32,
) -> Pair<'a> {
    let lock = floor
        .prepare("SELECT pg_try_advisory_lock($1, $2)")
        .unwrap();
    let unlock = floor.prepare("SELECT pg_advisory_unlock($1, $2)").unwrap();
    Pair {
        name: "S1 semaphore try_lock + unlock (4 permits)",
        round_trips: 2,
        floor: Box::new(move || {
            floor.query(&lock, &[&(base + 1), &0_i32]).unwrap();
            floor.query(&unlock, &[&(base + 1), &0_i32]).unwrap();
        }),
        same: Box::new(move || {
            same.simple_query(&format!("SELECT pg_try_advisory_lock({}, 0)", base + 2))
                .unwrap();
            same.simple_query(&format!("SELECT pg_advisory_unlock({}, 0)", base + 2))
                .unwrap();
        }),
        pglock: Box::new(move || {
            let permit = lib.try_lock().unwrap().expect("a free slot");
            SemaphorePermit::unlock(permit).unwrap();
        }),
    }
}

fn four(f: &str) -> String {
    (1..=4)
        .map(|i| format!("{f}(${i})"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn four_literal(f: &str, k: i64) -> String {
    (0..4)
        .map(|i| format!("{f}({})", k + i))
        .collect::<Vec<_>>()
        .join(", ")
}

fn l1<'a>(floor: &'a mut Conn, same: &'a mut Conn, lib: &'a mut LockSet, k: i64) -> Pair<'a> {
    let lock = floor
        .prepare(&format!("SELECT {}", four("pg_try_advisory_lock")))
        .unwrap();
    let unlock = floor
        .prepare(&format!("SELECT {}", four("pg_advisory_unlock")))
        .unwrap();
    let keys: Vec<i64> = (0..4).map(|i| k + 100 + i).collect();
    Pair {
        name: "L1 lock set try_lock + unlock (4 keys)",
        round_trips: 2,
        floor: Box::new(move || {
            let p = [&keys[0], &keys[1], &keys[2], &keys[3]];
            floor.query(&lock, &[p[0], p[1], p[2], p[3]]).unwrap();
            floor.query(&unlock, &[p[0], p[1], p[2], p[3]]).unwrap();
        }),
        same: Box::new(move || {
            same.simple_query(&format!(
                "SELECT {}",
                four_literal("pg_try_advisory_lock", k + 200)
            ))
            .unwrap();
            same.simple_query(&format!(
                "SELECT {}",
                four_literal("pg_advisory_unlock", k + 200)
            ))
            .unwrap();
        }),
        pglock: Box::new(move || {
            let guard = lib.try_lock().unwrap().expect("free keys");
            LockSetGuard::unlock(guard).unwrap();
        }),
    }
}

fn l2<'a>(floor: &'a mut Conn, same: &'a mut Conn, lib: &'a mut LockSet, k: i64) -> Pair<'a> {
    let lock = floor
        .prepare(&format!(
            "SELECT set_config('lock_timeout', '5000', true), {}",
            four("pg_advisory_lock")
        ))
        .unwrap();
    let unlock = floor
        .prepare(&format!("SELECT {}", four("pg_advisory_unlock")))
        .unwrap();
    let keys: Vec<i64> = (0..4).map(|i| k + 300 + i).collect();
    Pair {
        name: "L2 lock set lock with lock_timeout + unlock (4 keys)",
        round_trips: 2,
        floor: Box::new(move || {
            let p = [&keys[0], &keys[1], &keys[2], &keys[3]];
            floor.query(&lock, &[p[0], p[1], p[2], p[3]]).unwrap();
            floor.query(&unlock, &[p[0], p[1], p[2], p[3]]).unwrap();
        }),
        same: Box::new(move || {
            same.simple_query(&format!(
                "SET LOCAL lock_timeout = 5000; SELECT {}",
                four_literal("pg_advisory_lock", k + 400)
            ))
            .unwrap();
            same.simple_query(&format!(
                "SELECT {}",
                four_literal("pg_advisory_unlock", k + 400)
            ))
            .unwrap();
        }),
        pglock: Box::new(move || {
            let guard = lib.lock().unwrap();
            LockSetGuard::unlock(guard).unwrap();
        }),
    }
}

/// S2: `threads` threads share a semaphore of `permits` until `total` permits were
/// handed out; the hand-off latency runs from a release to the next `lock()` return
/// that it made possible (approximated by the latest release).
fn contend(
    pool: &Pool,
    name: &str,
    threads: usize,
    permits: u32,
    total: usize,
) -> (f64, Duration, Duration) {
    let released_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let done = Arc::new(AtomicUsize::new(0));
    let inside = Arc::new(AtomicUsize::new(0));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (pool, name, released_at, done, inside, latencies, barrier) = (
                pool.clone(),
                name.to_owned(),
                Arc::clone(&released_at),
                Arc::clone(&done),
                Arc::clone(&inside),
                Arc::clone(&latencies),
                Arc::clone(&barrier),
            );
            thread::spawn(move || {
                let mut sem = AdvisorySemaphore::new(&pool, &name, permits).unwrap();
                barrier.wait();
                loop {
                    let mut permit = sem.lock().unwrap();
                    if let Some(t) = released_at.lock().unwrap().take() {
                        latencies.lock().unwrap().push(t.elapsed());
                    }
                    let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    assert!(n <= permits as usize, "{n} holders");
                    permit.simple_query("SELECT 1").unwrap();
                    inside.fetch_sub(1, Ordering::SeqCst);
                    let more = done.fetch_add(1, Ordering::SeqCst) < total;
                    *released_at.lock().unwrap() = Some(Instant::now());
                    SemaphorePermit::unlock(permit).unwrap();
                    if !more {
                        break;
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
    let mut latencies = Arc::try_unwrap(latencies).unwrap().into_inner().unwrap();
    latencies.sort();
    (
        done.load(Ordering::SeqCst) as f64 / elapsed.as_secs_f64(),
        latencies[latencies.len() / 2],
        latencies[latencies.len() * 99 / 100],
    )
}

fn main() {
    let mut criterion = Criterion::default()
        .configure_from_args()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let pool = pool(20, "coordination");
    let mut report = String::new();
    let mut probe = pool.get().unwrap();
    let version: String = probe.query_one("SHOW server_version", &[]).unwrap().get(0);
    let rt = round_trip(&mut probe);
    writeln!(
        report,
        "PostgreSQL {version} on loopback; one round trip (empty query) = {} µs median.\n",
        us(rt)
    )
    .unwrap();
    writeln!(
        report,
        "| workload | round trips | prepared floor µs | simple floor µs | pglock µs | \
         pglock / prepared floor (p25-p75) | pglock / simple floor (p25-p75) |\n\
         |---|---|---|---|---|---|---|"
    )
    .unwrap();
    let base = Rng(21).key() as i32;
    let k = Rng(22).key() / 2;
    let mut f = pool.get().unwrap();
    let mut same = pool.get().unwrap();
    let mut sem = AdvisorySemaphore::new(&pool, "pglock-bench/s1", 4).unwrap();
    let mut set = LockSet::new(&pool, (0..4).map(|i| k + i)).unwrap();
    let mut bounded = LockSet::with_options(
        &pool,
        (0..4).map(|i| k + 10 + i),
        LockOptions::new().lock_timeout(Duration::from_secs(5)),
    )
    .unwrap();
    for which in 0..3 {
        let mut pair = match which {
            0 => s1(&mut f, &mut same, &mut sem, base),
            1 => l1(&mut f, &mut same, &mut set, k),
            _ => l2(&mut f, &mut same, &mut bounded, k),
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
    drop((sem, set, bounded, f, same));

    writeln!(
        report,
        "\n| S2: 8 threads, semaphore of 2 permits | permits/s | hand-off p50 µs | hand-off p99 µs |\n\
         |---|---|---|---|"
    )
    .unwrap();
    contend(&pool, "pglock-bench/s2-warm-up", 8, 2, 300);
    let (rate, p50, p99) = contend(&pool, "pglock-bench/s2", 8, 2, 3000);
    writeln!(
        report,
        "| pglock AdvisorySemaphore | {rate:.0} | {} | {} |",
        us(p50),
        us(p99)
    )
    .unwrap();

    criterion.final_summary();
    println!("\n## pglock coordination benchmark report\n\n{report}");
}
