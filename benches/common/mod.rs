//! What the benchmarks share: the pool, random keys, and the interleaved runs that turn
//! times into ratios against a floor measured in the same run.
#![allow(dead_code)] // each bench uses a different part

use std::time::{Duration, Instant};

use postgres::{Client, NoTls};
use r2d2_postgres::PostgresConnectionManager;

pub type Pool = r2d2::Pool<PostgresConnectionManager<NoTls>>;
pub type Conn = r2d2::PooledConnection<PostgresConnectionManager<NoTls>>;

/// A pool of `size` connections to `DATABASE_URL`; `bench` names the bench in the
/// message when it is not set.
pub fn pool(size: u32, bench: &str) -> Pool {
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| {
        panic!(
            "DATABASE_URL is not set. Run the benchmarks against a throwaway server:\n\n    \
             ci/with-postgres cargo bench -p pglock-benches --bench {bench}\n"
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
pub struct Rng(pub u64);

impl Rng {
    pub fn key(&mut self) -> i64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) as i64
    }
}

/// One workload, three ways, each a closure doing one operation:
/// - `floor`: the minimal raw SQL for the same server work, prepared statements;
/// - `same`: the same minimal SQL over the simple protocol (the floor of earlier reports);
/// - `pglock`: the library.
///
/// `pglock / floor` is the whole cost of using pglock.
pub struct Pair<'a> {
    pub name: &'static str,
    pub round_trips: u32,
    pub floor: Box<dyn FnMut() + 'a>,
    pub same: Box<dyn FnMut() + 'a>,
    pub pglock: Box<dyn FnMut() + 'a>,
}

/// The result of an interleaved run.
pub struct Ratio {
    pub floor: Duration,
    pub same: Duration,
    pub pglock: Duration,
    /// pglock / floor: median, p25, p75 of the per-round ratios.
    pub ratio: [f64; 3],
    /// pglock / the simple-protocol floor.
    pub overhead: [f64; 3],
}

/// Runs blocks of the three contenders in rotating order, and returns the medians of the
/// per-op times and of the per-round ratios, so that drift hits all three alike.
pub fn interleaved(pair: &mut Pair<'_>, rounds: usize, per_block: usize) -> Ratio {
    let time = |f: &mut dyn FnMut()| {
        let start = Instant::now();
        for _ in 0..per_block {
            f();
        }
        start.elapsed() / per_block as u32
    };
    for f in [&mut pair.floor, &mut pair.same, &mut pair.pglock] {
        time(&mut **f); // warm up
    }
    let mut times: [Vec<Duration>; 3] = Default::default();
    let (mut ratios, mut overheads) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let mut t = [Duration::ZERO; 3];
        for i in 0..3 {
            let which = (round + i) % 3;
            let f: &mut dyn FnMut() = match which {
                0 => &mut *pair.floor,
                1 => &mut *pair.same,
                _ => &mut *pair.pglock,
            };
            t[which] = time(f);
        }
        for i in 0..3 {
            times[i].push(t[i]);
        }
        ratios.push(t[2].as_secs_f64() / t[0].as_secs_f64());
        overheads.push(t[2].as_secs_f64() / t[1].as_secs_f64());
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let quartiles = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        [v[v.len() / 2], v[v.len() / 4], v[v.len() * 3 / 4]]
    };
    Ratio {
        floor: median(&mut times[0]),
        same: median(&mut times[1]),
        pglock: median(&mut times[2]),
        ratio: quartiles(&mut ratios),
        overhead: quartiles(&mut overheads),
    }
}

pub fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

/// One round trip on this machine: the median of empty simple queries.
pub fn round_trip(conn: &mut Client) -> Duration {
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

/// Releases the workers waiting on `barrier` (sized for them and the caller) and returns
/// how long they took, from the release until the last one ended.
pub fn run_timed(
    barrier: &std::sync::Barrier,
    workers: Vec<std::thread::JoinHandle<()>>,
) -> Duration {
    barrier.wait();
    let start = Instant::now();
    for worker in workers {
        worker.join().unwrap();
    }
    start.elapsed()
}

/// The value of the contended counter row `key` of `pglock_bench_counter`.
pub fn counter(pool: &Pool, key: i64) -> i64 {
    pool.get()
        .unwrap()
        .query_one("SELECT n FROM pglock_bench_counter WHERE k = $1", &[&key])
        .unwrap()
        .get(0)
}
