//! Lease locks against the raw statements they stand for, in the same run.
//!
//! ```sh
//! taskset -c 0 ci/with-postgres cargo bench -p pglock-benches --bench leases
//! ```
//!
//! - L1: `try_lock` + `unlock` of a free lease, against a careful caller's two raw
//!   statements (an upsert that takes an expired or missing row and draws a token, and a
//!   token-keyed release), prepared, on one connection.
//! - L2: one renewal (`LeaseGuard::renew`, the heartbeat's statement), against the raw
//!   token-keyed `UPDATE`, prepared.
//! - L3: 8 workers on one name, each lock, a read-increment-write of a counter row, unlock:
//!   acquisitions per second and the hand-off latency from release to the next holder's
//!   return, polling and with `notify`.
//!
//! Ratios come from interleaved blocks (floor and pglock alternate, so drift hits both
//! alike), as the median of the per-block ratios.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use pglock::{LeaseLock, LeaseOptions, LeaseTable};
use postgres::types::Type;

#[path = "common/mod.rs"]
mod common;

use common::{pool, us, Pool};

/// Median per-op times of `floor` and `lib`, and the median of per-block ratios.
fn interleaved(
    floor: &mut dyn FnMut(),
    lib: &mut dyn FnMut(),
    rounds: usize,
    per_block: usize,
) -> (Duration, Duration, f64) {
    let time = |f: &mut dyn FnMut()| {
        let start = Instant::now();
        for _ in 0..per_block {
            f();
        }
        start.elapsed() / per_block as u32
    };
    time(floor);
    time(lib);
    let (mut tf, mut tl, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let (a, b) = if round % 2 == 0 {
            let a = time(floor);
            (a, time(lib))
        } else {
            let b = time(lib);
            (time(floor), b)
        };
        tf.push(a);
        tl.push(b);
        ratios.push(b.as_secs_f64() / a.as_secs_f64());
    }
    tf.sort();
    tl.sort();
    ratios.sort_by(|a, b| a.total_cmp(b));
    (tf[rounds / 2], tl[rounds / 2], ratios[rounds / 2])
}

const RAW_LOCK: &str = "INSERT INTO pglock_leases AS l \
     (name, slot, owner, token, lease_us, acquired_at, renewed_at, expires_at) \
     VALUES ($1, 0, $2, nextval('pglock_leases_token_seq'), 30000000, clock_timestamp(), \
     clock_timestamp(), clock_timestamp() + interval '30 s') \
     ON CONFLICT (name, slot) DO UPDATE SET owner = EXCLUDED.owner, token = EXCLUDED.token, \
     acquired_at = EXCLUDED.acquired_at, renewed_at = EXCLUDED.renewed_at, \
     expires_at = EXCLUDED.expires_at WHERE l.expires_at <= clock_timestamp() RETURNING token";
const RAW_UNLOCK: &str = "UPDATE pglock_leases SET expires_at = clock_timestamp() \
     WHERE name = $1 AND slot = 0 AND token = $2 AND expires_at > clock_timestamp()";
const RAW_RENEW: &str = "UPDATE pglock_leases SET renewed_at = clock_timestamp(), \
     expires_at = clock_timestamp() + lease_us * interval '1 microsecond' \
     WHERE name = $1 AND slot = 0 AND token = $2 AND expires_at > clock_timestamp()";

struct Handoffs {
    per_second: f64,
    p50: Duration,
}

fn contend(pool: &Pool, threads: usize, total: usize, name: &str, notify: bool) -> Handoffs {
    let released_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let done = Arc::new(AtomicUsize::new(0));
    let inside = Arc::new(AtomicUsize::new(0));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let barrier = Arc::new(Barrier::new(threads + 1));
    pool.get()
        .unwrap()
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS pglock_bench_lease_counter (n bigint); \
             DELETE FROM pglock_bench_lease_counter; \
             INSERT INTO pglock_bench_lease_counter VALUES (0)",
        )
        .unwrap();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (pool, released_at, done, inside, latencies, barrier, name) = (
                pool.clone(),
                Arc::clone(&released_at),
                Arc::clone(&done),
                Arc::clone(&inside),
                Arc::clone(&latencies),
                Arc::clone(&barrier),
                name.to_owned(),
            );
            thread::spawn(move || {
                let options = LeaseOptions::new()
                    .notify(notify)
                    .poll_interval(Duration::from_millis(1), Duration::from_millis(50));
                let mut lock = LeaseLock::with_options(&pool, &name, options).unwrap();
                let mut conn = pool.get().unwrap();
                let read = conn
                    .prepare("SELECT n FROM pglock_bench_lease_counter")
                    .unwrap();
                let write = conn
                    .prepare("UPDATE pglock_bench_lease_counter SET n = $1")
                    .unwrap();
                barrier.wait();
                loop {
                    let guard = lock.lock().unwrap();
                    if let Some(t) = released_at.lock().unwrap().take() {
                        latencies.lock().unwrap().push(t.elapsed());
                    }
                    assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "overlap");
                    let n: i64 = conn.query_one(&read, &[]).unwrap().get(0);
                    conn.execute(&write, &[&(n + 1)]).unwrap();
                    inside.fetch_sub(1, Ordering::SeqCst);
                    let more = done.fetch_add(1, Ordering::SeqCst) + 1 < total;
                    *released_at.lock().unwrap() = Some(Instant::now());
                    guard.unlock().unwrap();
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
    let sections = done.load(Ordering::SeqCst);
    let n: i64 = pool
        .get()
        .unwrap()
        .query_one("SELECT n FROM pglock_bench_lease_counter", &[])
        .unwrap()
        .get(0);
    assert_eq!(n as usize, sections, "lost increments");
    let mut latencies = Arc::try_unwrap(latencies).unwrap().into_inner().unwrap();
    latencies.sort();
    Handoffs {
        per_second: sections as f64 / elapsed.as_secs_f64(),
        p50: latencies[latencies.len() / 2],
    }
}

fn main() {
    let pool = pool(40, "leases");
    LeaseTable::default()
        .create(&mut pool.get().unwrap())
        .unwrap();
    let mut report = String::new();
    let version: String = pool
        .get()
        .unwrap()
        .query_one("SHOW server_version", &[])
        .unwrap()
        .get(0);
    writeln!(report, "PostgreSQL {version} on loopback.\n").unwrap();
    writeln!(
        report,
        "| workload | raw prepared µs | pglock µs | pglock / raw prepared | raw unnamed µs | \
         pglock / raw unnamed |\n|---|---|---|---|---|---|"
    )
    .unwrap();

    // L1: lock + unlock of a free lease.
    let mut raw = pool.get().unwrap();
    let raw_lock = raw.prepare(RAW_LOCK).unwrap();
    let raw_unlock = raw.prepare(RAW_UNLOCK).unwrap();
    let mut floor = || {
        let token: i64 = raw
            .query_one(&raw_lock, &[&"bench-raw", &"bench"])
            .unwrap()
            .get(0);
        raw.execute(&raw_unlock, &[&"bench-raw", &token]).unwrap();
    };
    let mut lock = LeaseLock::new(&pool, "bench-pglock").unwrap();
    let mut lib = || {
        lock.try_lock().unwrap().unwrap().unlock().unwrap();
    };
    let (f, l, r) = interleaved(&mut floor, &mut lib, 40, 100);
    let mut unnamed = || {
        let token: i64 = raw
            .query_typed(
                RAW_LOCK,
                &[(&"bench-raw", Type::TEXT), (&"bench", Type::TEXT)],
            )
            .unwrap()[0]
            .get(0);
        raw.query_typed(
            RAW_UNLOCK,
            &[(&"bench-raw", Type::TEXT), (&token, Type::INT8)],
        )
        .unwrap();
    };
    let (u, _, ru) = interleaved(&mut unnamed, &mut lib, 40, 100);
    writeln!(
        report,
        "| L1 try_lock + unlock, free lease | {} | {} | {r:.3} | {} | {ru:.3} |",
        us(f),
        us(l),
        us(u)
    )
    .unwrap();

    // L2: one renewal.
    let token: i64 = raw
        .query_one(&raw_lock, &[&"bench-raw-renew", &"bench"])
        .unwrap()
        .get(0);
    let raw_renew = raw.prepare(RAW_RENEW).unwrap();
    let mut floor = || {
        assert_eq!(
            raw.execute(&raw_renew, &[&"bench-raw-renew", &token])
                .unwrap(),
            1
        );
    };
    let mut renewing = LeaseLock::new(&pool, "bench-pglock-renew").unwrap();
    let guard = renewing.try_lock().unwrap().unwrap();
    let mut lib = || guard.renew().unwrap();
    let (f, l, r) = interleaved(&mut floor, &mut lib, 40, 100);
    let mut unnamed = || {
        let n = raw
            .query_typed(
                RAW_RENEW,
                &[(&"bench-raw-renew", Type::TEXT), (&token, Type::INT8)],
            )
            .unwrap()
            .len();
        assert_eq!(n, 0); // an UPDATE without RETURNING returns no rows
    };
    let (u, _, ru) = interleaved(&mut unnamed, &mut lib, 40, 100);
    writeln!(
        report,
        "| L2 renew (the heartbeat's statement) | {} | {} | {r:.3} | {} | {ru:.3} |",
        us(f),
        us(l),
        us(u)
    )
    .unwrap();
    guard.unlock().unwrap();

    // L3: contention.
    writeln!(
        report,
        "\n| L3: 8 workers, one name, read-increment-write | acquisitions/s | hand-off p50 µs |\n\
         |---|---|---|"
    )
    .unwrap();
    for (label, notify) in [("polling (1-50 ms)", false), ("notify", true)] {
        contend(&pool, 8, 200, "bench-contend", notify);
        let h = contend(&pool, 8, 2000, "bench-contend", notify);
        writeln!(report, "| {label} | {:.0} | {} |", h.per_second, us(h.p50)).unwrap();
    }
    println!("\n## pglock lease benchmark report\n\n{report}");
}
