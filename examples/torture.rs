//! The torture run behind `ci/torture [SECONDS]`: 4 worker processes of 4 threads each
//! take every kind of lock in every way (`SessionLock` exclusive and shared, `TxLock`,
//! `LeaseLock`; `try_lock`, bounded, cancelled from another thread, a panic inside
//! `with_lock`) on a few shared names, while a chaos thread kills random workers with
//! SIGKILL (and restarts them), ends random worker sessions with `pg_terminate_backend`,
//! and cuts random worker connections off the network for 0.5-4 s (an nftables rule that
//! drops their packets both ways, closing nothing; the workers bound a silent network with
//! `NetworkTimeout` of 2 s, so a cut longer than that ends the session on both ends, a
//! shorter one is ridden out). Then it checks that no two critical sections overlapped, that
//! no lock is left held and that no connection leaked, and exits non-zero otherwise.
//!
//! ```sh
//! ci/with-postgres cargo run --example torture -- 60
//! ```
//!
//! How an overlap is told. Every critical section writes marks (`clock_timestamp()`, the
//! server's one clock) into `pglock_torture_marks`: on entering, after each step, and on
//! leaving. An advisory lock's marks go through the guard's own connection, so a mark
//! that was written proves that the session holding the lock was alive then; a session
//! that died (SIGKILL, `pg_terminate_backend`) writes nothing more, and its section ended
//! when it died, after its last mark and before the lock could pass on. A `TxLock`'s
//! marks are in its transaction: they count only if it committed. A lease's marks are
//! written in transactions fenced by its token (`LeaseGuard::fence`), which also advance
//! a per-name token in `pglock_torture_fence` only forwards: a fenced write under a token
//! older than one already written is a fencing failure. A section spans its first to its
//! last mark; two sections on one name overlap when their spans intersect and one of them
//! is exclusive.
//!
//! The worker is this same program, run as `torture --worker INDEX UNTIL_UNIX_MS`.
//!
//! The check is itself checked: with `PGLOCK_TORTURE_CONTROL=1` the advisory sections run
//! without their locks, and the run passes only if it finds overlaps.
//!
//! The network cuts need root (or CAP_NET_ADMIN) and the `nft` command, which
//! `ci/with-postgres` installs when run as root; without them the run fails and says so.
//! `PGLOCK_TORTURE_NO_PARTITIONS=1` runs without the cuts.

use std::io::{BufRead, BufReader};
use std::panic::{self, AssertUnwindSafe};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pglock::r2d2_postgres::postgres::{self, Client, GenericClient, NoTls};
use pglock::r2d2_postgres::PostgresConnectionManager;
// The same pulled cable as the integration tests'.
#[path = "../tests/common/partition.rs"]
#[allow(dead_code)]
mod partition;

use pglock::{
    r2d2, Error, LeaseLock, LeaseOptions, LeaseTable, LockKey, LockMode, LockOptions,
    NetworkTimeout, SessionGuard, SessionLock, TxGuard, TxLock,
};

type Pool = r2d2::Pool<PostgresConnectionManager<NoTls>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

const WORKERS: usize = 4;
const THREADS: usize = 4;
const ADVISORY: [&str; 3] = [
    "pglock-torture/a0",
    "pglock-torture/a1",
    "pglock-torture/a2",
];
const LEASES: [&str; 2] = ["pglock-torture/l0", "pglock-torture/l1"];
/// Workers' sessions carry this `application_name`, followed by the worker's index.
const APP: &str = "pglock-torture-w";
const LEASE: Duration = Duration::from_secs(2);
/// Every wait is bounded, so that workers finish soon after the deadline.
const WAIT: Duration = Duration::from_secs(2);
/// The workers' bound on a silent network.
const NETWORK: Duration = Duration::from_secs(2);
/// Whether this is the control run, whose advisory sections take no lock.
fn control() -> bool {
    std::env::var_os("PGLOCK_TORTURE_CONTROL").is_some_and(|v| v == "1")
}

/// The panic message of a deliberate panic inside `with_lock`.
const PANIC: &str = "torture: a deliberate panic inside with_lock";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("--worker") => worker(&args[1..]),
        _ => orchestrate(args.first().map_or(Ok(60), |s| s.parse()).unwrap_or(60)),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("torture: {e}");
            ExitCode::from(2)
        }
    }
}

fn database_url() -> Result<String, BoxError> {
    std::env::var("DATABASE_URL")
        .map_err(|_| "DATABASE_URL is not set: run ci/torture (or ci/with-postgres)".into())
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// xorshift64*: enough randomness for choosing operations, without a dependency.
struct Rng(u64);

impl Rng {
    fn new(salt: u64) -> Rng {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Rng((nanos
            ^ (u64::from(std::process::id()) << 32)
            ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn millis(&mut self, max: u64) -> Duration {
        Duration::from_millis(self.below(max + 1))
    }
}

// ---------------------------------------------------------------------------------------
// The orchestrator
// ---------------------------------------------------------------------------------------

fn spawn_worker(
    index: usize,
    until: u64,
    report: &mpsc::Sender<String>,
) -> Result<Child, BoxError> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["--worker", &index.to_string(), &until.to_string()])
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let report = report.clone();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = report.send(line);
        }
    });
    Ok(child)
}

fn orchestrate(seconds: u64) -> Result<ExitCode, BoxError> {
    let url = database_url()?;
    let mut admin = Client::connect(&url, NoTls)?;
    LeaseTable::default().create(&mut admin)?;
    admin.batch_execute(
        "DROP TABLE IF EXISTS pglock_torture_marks, pglock_torture_fence;
         CREATE TABLE pglock_torture_marks (section bigint NOT NULL, domain text NOT NULL,
             name text NOT NULL, mode text NOT NULL, mark text NOT NULL,
             t timestamptz NOT NULL, token bigint);
         CREATE TABLE pglock_torture_fence (name text PRIMARY KEY, token bigint NOT NULL);
         DELETE FROM pglock_leases WHERE name LIKE 'pglock-torture/%';",
    )?;
    for name in LEASES {
        admin.execute("INSERT INTO pglock_torture_fence VALUES ($1, 0)", &[&name])?;
    }

    let started = Instant::now();
    let until = unix_ms() + seconds * 1000;
    // Chaos stops a little more than a lease before the end, so that a killed worker's
    // lease has run out by the time the workers have stopped.
    let chaos_until =
        started + Duration::from_secs(seconds).saturating_sub(LEASE + Duration::from_secs(1));
    let (report, reports) = mpsc::channel();
    let mut workers: Vec<Child> = (0..WORKERS)
        .map(|i| spawn_worker(i, until, &report))
        .collect::<Result<_, _>>()?;
    println!(
        "torture: {WORKERS} processes x {THREADS} threads for {seconds} s on {} advisory and {} lease names",
        ADVISORY.len(),
        LEASES.len()
    );

    let partitions = std::env::var_os("PGLOCK_TORTURE_NO_PARTITIONS").is_none_or(|v| v != "1");
    let mut rng = Rng::new(0);
    let (mut kills, mut terminations, mut crashes, mut cuts) = (0u64, 0u64, 0u64, 0u64);
    // Connections cut off the network, and when each is plugged back in.
    let mut cut: Vec<(partition::Partition, Instant)> = Vec::new();
    while Instant::now() < chaos_until {
        cut.retain(|(_, heal_at)| Instant::now() < *heal_at);
        // The chaos's own schedule: a pause of 50-400 ms between faults.
        thread::sleep(Duration::from_millis(50) + rng.millis(350));
        for (i, w) in workers.iter_mut().enumerate() {
            // A worker that ended by itself before the deadline crashed: restart it.
            if let Some(status) = w.try_wait()? {
                eprintln!("torture: worker {i} exited early ({status}); restarting it");
                crashes += 1;
                *w = spawn_worker(i, until, &report)?;
            }
        }
        let fault = rng.below(4);
        if fault == 0 {
            let i = rng.below(WORKERS as u64) as usize;
            workers[i].kill()?; // SIGKILL
            workers[i].wait()?;
            kills += 1;
            workers[i] = spawn_worker(i, until, &report)?;
        } else if fault == 1 && partitions {
            let ports = admin.query_opt(
                "SELECT client_port, inet_server_port() FROM pg_stat_activity \
                 WHERE application_name LIKE $1 AND client_port > 0 ORDER BY random() LIMIT 1",
                &[&format!("{APP}%")],
            )?;
            if let Some(row) = ports {
                let ports = (
                    u16::try_from(row.get::<_, i32>(0))?,
                    u16::try_from(row.get::<_, i32>(1))?,
                );
                let heal_at = Instant::now() + Duration::from_millis(500) + rng.millis(3500);
                cut.push((partition::Partition::cut(ports), heal_at));
                cuts += 1;
            }
        } else {
            let ended = admin.query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name LIKE $1 ORDER BY random() LIMIT 1",
                &[&format!("{APP}%")],
            )?;
            terminations += ended.iter().filter(|r| r.get::<_, bool>(0)).count() as u64;
        }
    }

    drop(cut); // every cable plugged back in

    // The workers stop by themselves at the deadline; give them a generous bound.
    let stop_by = Instant::now() + Duration::from_secs(seconds) + Duration::from_secs(60);
    let mut statuses = Vec::new();
    for (i, w) in workers.iter_mut().enumerate() {
        loop {
            if let Some(status) = w.try_wait()? {
                statuses.push((i, status));
                break;
            }
            if Instant::now() > stop_by {
                eprintln!("torture: worker {i} did not stop; killing it");
                w.kill()?;
                statuses.push((i, w.wait()?));
                crashes += 1;
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
    drop(report);
    let mut totals = Counts::default();
    for line in reports.iter() {
        if let Some(counts) = Counts::parse(&line) {
            totals.add(&counts);
        }
    }
    for (i, status) in &statuses {
        if !status.success() {
            eprintln!("torture: worker {i} failed at the end ({status})");
            crashes += 1;
        }
    }
    let elapsed = started.elapsed();

    // What is left on the server once every worker is gone. A killed worker's session
    // ends when its backend notices the closed socket: wait for that, with a bound.
    let keys: Vec<LockKey> = ADVISORY.iter().map(|n| LockKey::from_name(n)).collect();
    let (classids, objids): (Vec<i64>, Vec<i64>) = keys
        .iter()
        .map(|k| (i64::from(k.classid()), i64::from(k.objid())))
        .unzip();
    let leftovers = |admin: &mut Client| -> Result<(i64, i64, i64), BoxError> {
        let row = admin.query_one(
            "SELECT (SELECT count(*) FROM pg_locks l JOIN unnest($1::bigint[], $2::bigint[]) \
                         AS k(c, o) ON l.classid = k.c::oid AND l.objid = k.o::oid \
                     WHERE l.locktype = 'advisory' AND l.objsubid = 1),
                    (SELECT count(*) FROM pglock_leases WHERE name LIKE 'pglock-torture/%' \
                     AND owner <> '' AND expires_at > clock_timestamp()),
                    (SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE $3)",
            &[&classids, &objids, &format!("{APP}%")],
        )?;
        Ok((row.get(0), row.get(1), row.get(2)))
    };
    let settle_by = Instant::now() + Duration::from_secs(15);
    let (held, leases, connections) = loop {
        let left = leftovers(&mut admin)?;
        if left == (0, 0, 0) || Instant::now() > settle_by {
            break left;
        }
        thread::sleep(Duration::from_millis(50));
    };

    let row = admin.query_one(
        "WITH s AS (SELECT section, domain, name, mode, min(t) AS a, max(t) AS b, \
                    bool_or(mark = 'exit') AS done \
                    FROM pglock_torture_marks GROUP BY section, domain, name, mode)
         SELECT (SELECT count(*) FILTER (WHERE done) FROM s),
                (SELECT count(*) FROM s),
                (SELECT count(*) FROM s x JOIN s y ON x.domain = y.domain AND x.name = y.name \
                 AND x.section < y.section AND (x.mode = 'exclusive' OR y.mode = 'exclusive') \
                 AND x.a < y.b AND y.a < x.b),
                (SELECT count(*) FROM pglock_torture_marks WHERE mark = 'stale')",
        &[],
    )?;
    let (completed, sections, overlaps, stale): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let by_kind = admin.query(
        "SELECT domain || ' ' || mode, count(DISTINCT section) FROM pglock_torture_marks \
         WHERE mark = 'exit' GROUP BY 1 ORDER BY 1",
        &[],
    )?;

    println!("torture: ran {:.1} s; chaos: {kills} workers killed (SIGKILL) and restarted, {terminations} sessions terminated, {cuts} connections cut off the network", elapsed.as_secs_f64());
    for r in &by_kind {
        println!(
            "  completed {:<20} {:>7}",
            r.get::<_, String>(0),
            r.get::<_, i64>(1)
        );
    }
    println!(
        "  outcomes reported by workers that finished: {}",
        totals.summary()
    );
    println!("operations completed:          {completed} (of {sections} sections entered)");
    println!("overlaps:                      {overlaps}");
    println!("stale fenced writes accepted:  {stale}");
    println!("locks left held:               {held} advisory, {leases} unexpired leases");
    println!("connections leaked:            {connections}");
    println!("workers crashed:               {crashes}");
    println!("unexpected errors:             {}", totals.unexpected);
    if control() {
        println!(
            "torture: control run (advisory sections without locks): {overlaps} overlaps found"
        );
        return Ok(if overlaps > 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let ok = completed > 0
        && overlaps == 0
        && stale == 0
        && held == 0
        && leases == 0
        && connections == 0
        && crashes == 0
        && totals.unexpected == 0;
    println!("torture: {}", if ok { "PASSED" } else { "FAILED" });
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

// ---------------------------------------------------------------------------------------
// The worker
// ---------------------------------------------------------------------------------------

/// What a worker's operations came to.
#[derive(Default, Debug, Clone)]
struct Counts {
    ok: u64,
    busy: u64,
    timeout: u64,
    cancelled: u64,
    lost: u64,
    panicked: u64,
    /// Errors a dead session explains: the pool, the connection, a commit cut short.
    connection: u64,
    /// Errors no fault here explains (deadlock, a shared session, a bad argument, ...).
    unexpected: u64,
}

impl Counts {
    const FIELDS: usize = 8;

    fn values(&self) -> [u64; Counts::FIELDS] {
        [
            self.ok,
            self.busy,
            self.timeout,
            self.cancelled,
            self.lost,
            self.panicked,
            self.connection,
            self.unexpected,
        ]
    }

    fn line(&self) -> String {
        let v: Vec<String> = self.values().iter().map(u64::to_string).collect();
        format!("TORTURE-COUNTS {}", v.join(" "))
    }

    fn parse(line: &str) -> Option<Counts> {
        let v: Vec<u64> = line
            .strip_prefix("TORTURE-COUNTS ")?
            .split(' ')
            .map(|s| s.parse().ok())
            .collect::<Option<_>>()?;
        let [ok, busy, timeout, cancelled, lost, panicked, connection, unexpected] =
            <[u64; Counts::FIELDS]>::try_from(v).ok()?;
        Some(Counts {
            ok,
            busy,
            timeout,
            cancelled,
            lost,
            panicked,
            connection,
            unexpected,
        })
    }

    fn add(&mut self, other: &Counts) {
        self.ok += other.ok;
        self.busy += other.busy;
        self.timeout += other.timeout;
        self.cancelled += other.cancelled;
        self.lost += other.lost;
        self.panicked += other.panicked;
        self.connection += other.connection;
        self.unexpected += other.unexpected;
    }

    fn summary(&self) -> String {
        format!(
            "{} ok, {} busy, {} timed out, {} cancelled, {} lost, {} panicked, {} connection errors, {} unexpected",
            self.ok, self.busy, self.timeout, self.cancelled, self.lost, self.panicked, self.connection, self.unexpected
        )
    }

    fn error(&mut self, e: &Failure) {
        match e {
            Failure::Lock(Error::Timeout { .. }) => self.timeout += 1,
            Failure::Lock(Error::Cancelled { .. }) => self.cancelled += 1,
            Failure::Lock(Error::LockLost { .. }) => self.lost += 1,
            Failure::Lock(
                Error::Pool { .. } | Error::Database { .. } | Error::CommitOutcomeUnknown { .. },
            )
            | Failure::Sql
            | Failure::Pool => self.connection += 1,
            Failure::Lock(other) => {
                eprintln!("torture: unexpected error: {other}");
                self.unexpected += 1;
            }
        }
    }
}

/// How a critical section or its lock failed.
#[derive(Debug)]
enum Failure {
    Lock(Error),
    /// A statement of the section failed (its session died).
    Sql,
    /// No connection for a fenced step.
    Pool,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Lock(e)
    }
}

impl From<postgres::Error> for Failure {
    fn from(_: postgres::Error) -> Self {
        Failure::Sql
    }
}

fn worker(args: &[String]) -> Result<ExitCode, BoxError> {
    let index: usize = args.first().ok_or("no index")?.parse()?;
    let until: u64 = args.get(1).ok_or("no deadline")?.parse()?;
    let mut config: postgres::Config = database_url()?.parse()?;
    config.application_name(&format!("{APP}{index}"));
    NetworkTimeout::new(NETWORK).apply(&mut config);
    let pool = r2d2::Pool::builder()
        .max_size(4 * THREADS as u32)
        .min_idle(Some(0))
        .connection_timeout(Duration::from_secs(5))
        .build(PostgresConnectionManager::new(config, NoTls))?;

    // Deliberate panics are part of the mix; any other panic is reported as usual.
    let default_hook = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        if info.payload().downcast_ref::<&str>() != Some(&PANIC) {
            default_hook(info);
        }
    }));

    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let pool = pool.clone();
            thread::spawn(move || {
                let mut rng = Rng::new((index * THREADS + t) as u64 + 1);
                let mut counts = Counts::default();
                let owner = format!("{APP}{index}/{t}/{}", std::process::id());
                while unix_ms() < until {
                    operation(&pool, &mut rng, &owner, &mut counts);
                }
                counts
            })
        })
        .collect();
    let mut totals = Counts::default();
    for t in threads {
        totals.add(&t.join().map_err(|_| "a worker thread panicked")?);
    }
    println!("{}", totals.line());
    Ok(ExitCode::SUCCESS)
}

/// How an operation takes its lock.
#[derive(Clone, Copy)]
enum Take {
    Try,
    Bounded,
    Blocking,
    Cancelled,
    WithLock { panic: bool },
}

fn operation(pool: &Pool, rng: &mut Rng, owner: &str, counts: &mut Counts) {
    let take = match rng.below(10) {
        0..=1 => Take::Try,
        2..=3 => Take::Bounded,
        4..=5 => Take::Blocking,
        6 => Take::Cancelled,
        7..=8 => Take::WithLock { panic: false },
        _ => Take::WithLock { panic: true },
    };
    let section = (rng.next() >> 1) as i64;
    let result = match rng.below(5) {
        0 | 1 => {
            let mode = if rng.below(3) == 0 {
                LockMode::Shared
            } else {
                LockMode::Exclusive
            };
            session(pool, rng, take, mode, section)
        }
        2 | 3 => {
            let mode = if rng.below(4) == 0 {
                LockMode::Shared
            } else {
                LockMode::Exclusive
            };
            transaction(pool, rng, take, mode, section)
        }
        _ => lease(pool, rng, take, owner, section),
    };
    match result {
        Ok(true) => counts.ok += 1,
        Ok(false) => counts.busy += 1,
        Err(Outcome::Failed(e)) => counts.error(&e),
        Err(Outcome::Panicked) => counts.panicked += 1,
    }
}

enum Outcome {
    Failed(Failure),
    Panicked,
}

impl<E: Into<Failure>> From<E> for Outcome {
    fn from(e: E) -> Self {
        Outcome::Failed(e.into())
    }
}

fn mode_name(mode: LockMode) -> &'static str {
    match mode {
        LockMode::Shared => "shared",
        _ => "exclusive",
    }
}

/// Writes one mark of a section.
fn mark(
    conn: &mut impl GenericClient,
    section: i64,
    domain: &str,
    name: &str,
    mode: &str,
    mark: &str,
    token: Option<i64>,
) -> Result<(), postgres::Error> {
    conn.execute(
        "INSERT INTO pglock_torture_marks VALUES ($1, $2, $3, $4, $5, clock_timestamp(), $6)",
        &[&section, &domain, &name, &mode, &mark, &token],
    )?;
    Ok(())
}

/// An advisory lock's critical section: marks through the lock's own connection, with
/// short pauses between them.
fn advisory_section(
    conn: &mut Client,
    pause: [Duration; 2],
    section: i64,
    name: &str,
    mode: LockMode,
    panic: bool,
) -> Result<(), Failure> {
    let mode = mode_name(mode);
    mark(conn, section, "advisory", name, mode, "enter", None)?;
    if panic {
        panic::panic_any(PANIC);
    }
    for p in pause {
        thread::sleep(p);
        mark(conn, section, "advisory", name, mode, "step", None)?;
    }
    mark(conn, section, "advisory", name, mode, "exit", None)?;
    Ok(())
}

/// Runs `f`, turning a deliberate panic into [`Outcome::Panicked`].
fn catching<T>(f: impl FnOnce() -> Result<T, Outcome>) -> Result<T, Outcome> {
    match panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) if payload.downcast_ref::<&str>() == Some(&PANIC) => Err(Outcome::Panicked),
        Err(payload) => panic::resume_unwind(payload),
    }
}

/// Cancels `handle` from another thread after `delay`.
fn cancel_later(handle: pglock::CancelHandle, delay: Duration) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        thread::sleep(delay);
        let _ = handle.cancel();
    })
}

fn options(mode: LockMode) -> LockOptions {
    LockOptions::new().mode(mode).lock_timeout(WAIT)
}

fn session(
    pool: &Pool,
    rng: &mut Rng,
    take: Take,
    mode: LockMode,
    section: i64,
) -> Result<bool, Outcome> {
    let name = ADVISORY[rng.below(ADVISORY.len() as u64) as usize];
    let pause = [rng.millis(5), rng.millis(5)];
    if control() {
        let mut conn = pool.get().map_err(|_| Failure::Pool)?;
        advisory_section(&mut conn, pause, section, name, mode, false)?;
        return Ok(true);
    }
    let mut lock = SessionLock::with_options(pool, name, options(mode))?;
    let guard = match take {
        Take::Try => lock.try_lock()?,
        Take::Bounded => lock.try_lock_for(rng.millis(300))?,
        Take::Blocking => Some(lock.lock()?),
        Take::Cancelled => {
            let canceller = cancel_later(lock.cancel_handle(), rng.millis(50));
            let guard = lock.lock();
            let _ = canceller.join();
            Some(guard?)
        }
        Take::WithLock { panic } => {
            return catching(|| {
                lock.with_lock(|guard| advisory_section(guard, pause, section, name, mode, panic))?;
                Ok(true)
            });
        }
    };
    let Some(mut guard) = guard else {
        return Ok(false);
    };
    advisory_section(&mut guard, pause, section, name, mode, false)?;
    SessionGuard::unlock(guard)?;
    Ok(true)
}

fn transaction(
    pool: &Pool,
    rng: &mut Rng,
    take: Take,
    mode: LockMode,
    section: i64,
) -> Result<bool, Outcome> {
    let name = ADVISORY[rng.below(ADVISORY.len() as u64) as usize];
    let pause = [rng.millis(5), rng.millis(5)];
    if control() {
        let mut conn = pool.get().map_err(|_| Failure::Pool)?;
        advisory_section(&mut conn, pause, section, name, mode, false)?;
        return Ok(true);
    }
    let mut lock = TxLock::with_options(pool, name, options(mode))?;
    let guard = match take {
        Take::Try => lock.try_lock()?,
        Take::Bounded => lock.try_lock_for(rng.millis(300))?,
        Take::Blocking => Some(lock.lock()?),
        Take::Cancelled => {
            let canceller = cancel_later(lock.cancel_handle(), rng.millis(50));
            let guard = lock.lock();
            let _ = canceller.join();
            Some(guard?)
        }
        Take::WithLock { panic } => {
            return catching(|| {
                lock.with_lock(|guard| advisory_section(guard, pause, section, name, mode, panic))?;
                Ok(true)
            });
        }
    };
    let Some(mut guard) = guard else {
        return Ok(false);
    };
    advisory_section(&mut guard, pause, section, name, mode, false)?;
    TxGuard::commit(guard)?;
    Ok(true)
}

/// A lease's critical section: each step is a transaction on another connection, fenced
/// by the lease's token, that also moves the name's stored token forwards.
fn lease_section(
    pool: &Pool,
    lease: &pglock::LeaseGuard<'_>,
    pause: [Duration; 2],
    section: i64,
    name: &str,
    panic: bool,
) -> Result<(), Failure> {
    let token = lease.token();
    let step = |mark_name: &str| -> Result<(), Failure> {
        let mut conn = pool.get().map_err(|_| Failure::Pool)?;
        let mut tx = conn.transaction()?;
        lease.fence(&mut tx)?;
        let moved = tx.execute(
            "UPDATE pglock_torture_fence SET token = $2 WHERE name = $1 AND token <= $2",
            &[&name, &token],
        )?;
        mark(
            &mut tx,
            section,
            "lease",
            name,
            "exclusive",
            mark_name,
            Some(token),
        )?;
        if moved == 0 {
            // The fence let through a token older than one already written.
            mark(
                &mut tx,
                section,
                "lease",
                name,
                "exclusive",
                "stale",
                Some(token),
            )?;
        }
        tx.commit()?;
        Ok(())
    };
    step("enter")?;
    if panic {
        panic::panic_any(PANIC);
    }
    for p in pause {
        thread::sleep(p);
        lease.check()?;
        step("step")?;
    }
    step("exit")
}

fn lease(
    pool: &Pool,
    rng: &mut Rng,
    take: Take,
    owner: &str,
    section: i64,
) -> Result<bool, Outcome> {
    let name = LEASES[rng.below(LEASES.len() as u64) as usize];
    let pause = [rng.millis(5), rng.millis(5)];
    let options = LeaseOptions::new()
        .lease(LEASE)
        .owner(owner)
        .lock_timeout(WAIT)
        .poll_interval(Duration::from_millis(1), Duration::from_millis(20));
    let mut lock = LeaseLock::with_options(pool, name, options)?;
    let guard = match take {
        Take::Try => lock.try_lock()?,
        Take::Bounded => lock.try_lock_for(rng.millis(300))?,
        Take::Blocking => Some(lock.lock()?),
        Take::Cancelled => {
            let canceller = cancel_later(lock.cancel_handle(), rng.millis(50));
            let guard = lock.lock();
            let _ = canceller.join();
            Some(guard?)
        }
        Take::WithLock { panic } => {
            return catching(|| {
                lock.with_lock(|lease| lease_section(pool, lease, pause, section, name, panic))?;
                Ok(true)
            });
        }
    };
    let Some(guard) = guard else {
        return Ok(false);
    };
    lease_section(pool, &guard, pause, section, name, false)?;
    guard.unlock()?;
    Ok(true)
}
