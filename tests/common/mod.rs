//! Shared set-up for the integration tests. Every test runs against a real PostgreSQL
//! named by `DATABASE_URL`; `ci/with-postgres` provides a throwaway one.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::time::{Duration, Instant};

use pglock::{Error, LockKey, LostReason};
use postgres::{Client, NoTls};
use r2d2_postgres::PostgresConnectionManager;

pub mod partition;
pub mod proxy;

pub type Pool = r2d2::Pool<PostgresConnectionManager<NoTls>>;

/// Asserts that `err` says the lock was lost because its session ended.
#[track_caller]
pub fn assert_session_ended(err: &Error) {
    assert!(
        matches!(
            err,
            Error::LockLost {
                reason: LostReason::SessionEnded,
                ..
            }
        ),
        "{err:?}"
    );
}

/// The server under test. Fails loudly, saying how to get one, when there is none.
pub fn database_url() -> String {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "\n\nDATABASE_URL is not set: pglock's tests need a real PostgreSQL server.\n\
             Run them through the throwaway-cluster script, which starts one and stops it \
             afterwards:\n\n    ci/with-postgres cargo nextest run --features cli\n\n\
             or set DATABASE_URL to a server you own, e.g.\n\n    \
             DATABASE_URL=postgres://postgres@localhost/postgres cargo nextest run\n\n"
        ),
    }
}

/// The connection settings of `DATABASE_URL`.
pub fn config() -> postgres::Config {
    database_url()
        .parse()
        .expect("DATABASE_URL is not a valid connection string")
}

/// A pool of at most `size` connections.
pub fn pool(size: u32) -> Pool {
    pool_with(size, config())
}

/// A pool of at most `size` connections with `config`, failing fast when exhausted.
pub fn pool_with(size: u32, config: postgres::Config) -> Pool {
    let manager = PostgresConnectionManager::new(config, NoTls);
    r2d2::Pool::builder()
        .max_size(size)
        .min_idle(Some(0))
        .connection_timeout(Duration::from_secs(10))
        .build(manager)
        .expect("connect to DATABASE_URL")
}

/// A direct connection for looking at the server from the outside.
pub fn admin() -> Client {
    Client::connect(&database_url(), NoTls).expect("connect to DATABASE_URL")
}

/// The name of the calling function, e.g. `session::try_lock_contention`.
#[macro_export]
macro_rules! function_name {
    () => {{
        fn f() {}
        fn type_name_of<T>(_: T) -> &'static str {
            std::any::type_name::<T>()
        }
        let name = type_name_of(f);
        &name[..name.len() - 3]
    }};
}

/// A lock key of the calling test's own, so that the suite runs in parallel:
/// `unique_key!()` or, for more keys in one test, `unique_key!("second")`.
#[macro_export]
macro_rules! unique_key {
    () => {
        pglock::LockKey::from_name(&format!("pglock-test/{}", $crate::function_name!()))
    };
    ($suffix:expr) => {
        pglock::LockKey::from_name(&format!(
            "pglock-test/{}/{}",
            $crate::function_name!(),
            $suffix
        ))
    };
}

/// The backend pid of a client.
pub fn backend_pid(client: &mut Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .expect("pg_backend_pid")
        .get(0)
}

/// The rows of `pg_locks` for `key`: (pid, mode, granted).
pub fn locks_on(admin: &mut Client, key: &LockKey) -> Vec<(i32, String, bool)> {
    admin
        .query(
            "SELECT pid, mode, granted FROM pg_locks WHERE locktype = 'advisory' \
             AND classid = $1::bigint::oid AND objid = $2::bigint::oid AND objsubid = $3 \
             ORDER BY pid",
            &[
                &i64::from(key.classid()),
                &i64::from(key.objid()),
                &key.objsubid(),
            ],
        )
        .expect("query pg_locks")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// How many sessions hold `key`.
pub fn holders(admin: &mut Client, key: &LockKey) -> usize {
    locks_on(admin, key).iter().filter(|l| l.2).count()
}

/// How many sessions wait for `key`.
pub fn waiters(admin: &mut Client, key: &LockKey) -> usize {
    locks_on(admin, key).iter().filter(|l| !l.2).count()
}

/// Every advisory lock the backend `pid` holds or waits for.
pub fn advisory_locks_of(admin: &mut Client, pid: i32) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1",
            &[&pid],
        )
        .expect("query pg_locks")
        .get(0)
}

/// The `state` of backend `pid` in `pg_stat_activity` ('idle', 'idle in transaction', ...),
/// or `None` if it is gone.
pub fn backend_state(admin: &mut Client, pid: i32) -> Option<String> {
    admin
        .query_opt("SELECT state FROM pg_stat_activity WHERE pid = $1", &[&pid])
        .expect("query pg_stat_activity")
        .map(|r| r.get(0))
}

/// Polls a condition on the server until it holds, failing the test after `within`.
/// For state only the server can show (a waiter queued in `pg_locks`, a session gone);
/// threads of the test itself synchronise with channels and barriers instead.
pub fn wait_until(what: &str, within: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits until `n` sessions are queued for `key` on the server.
pub fn wait_for_waiters(admin: &mut Client, key: &LockKey, n: usize) {
    wait_until(
        &format!("{n} session(s) wait for {key}"),
        Duration::from_secs(10),
        || waiters(admin, key) == n,
    );
}

/// Starts a thread that makes a lock on `key` (a `TxLock` if `transaction`, else a
/// `SessionLock`) and blocks in `lock()`. Returns its cancel handle, its backend pid, and
/// the channel on which it reports how `lock()` ended (a granted guard is dropped at once).
pub fn spawn_waiter(
    pool: &Pool,
    key: &LockKey,
    options: pglock::LockOptions,
    transaction: bool,
) -> (
    pglock::CancelHandle,
    i32,
    std::sync::mpsc::Receiver<Result<(), pglock::Error>>,
) {
    let (setup_tx, setup_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let (pool, key) = (pool.clone(), key.clone());
    std::thread::spawn(move || {
        let mut conn = pool.get().unwrap();
        let pid = backend_pid(&mut conn);
        // The lock (and its connection) is dropped before the result is sent: a test that
        // checks the pool out next must find the connection back (or gone). r2d2 does not
        // wake a thread already waiting in `get` when a broken connection comes back to a
        // pool whose `min_idle` is below its size, and the test's checkout would time out.
        let result = if transaction {
            let mut lock = pglock::TxLock::from_connection(conn, key, options).unwrap();
            setup_tx.send((lock.cancel_handle(), pid)).unwrap();
            let result = lock.lock().map(|_| ());
            drop(lock);
            result
        } else {
            let mut lock = pglock::SessionLock::from_connection(conn, key, options).unwrap();
            setup_tx.send((lock.cancel_handle(), pid)).unwrap();
            let result = lock.lock().map(|_| ());
            drop(lock);
            result
        };
        done_tx.send(result).unwrap();
    });
    let (handle, pid) = setup_rx.recv().expect("the waiter thread failed to start");
    (handle, pid, done_rx)
}

/// Leaves the pool's next connection inside the transaction that `opened` begins (as
/// other code that returned it so would), and returns its backend pid.
pub fn leave_open(pool: &Pool, opened: &str) -> i32 {
    let mut conn = pool.get().unwrap();
    let pid = backend_pid(&mut conn);
    let _ = conn.batch_execute(opened);
    pid
}

/// Asserts that a lock call on a connection left inside a transaction (`opened`, backend
/// `pid`) was refused: `Error::TransactionLeftOpen`, nothing held, the backend idle.
#[track_caller]
pub fn assert_refused_inside_transaction(
    admin: &mut Client,
    key: &LockKey,
    pid: i32,
    opened: &str,
    refused: Result<(), Error>,
) {
    assert!(
        matches!(refused, Err(Error::TransactionLeftOpen { .. })),
        "{opened}: {refused:?}"
    );
    assert_eq!(holders(admin, key), 0, "{opened}");
    assert_eq!(
        backend_state(admin, pid).as_deref(),
        Some("idle"),
        "{opened}"
    );
}

/// Drops and re-creates a one-column table `name (x int)`, for tests that need their own.
pub fn fresh_table(admin: &mut Client, name: &str) {
    admin
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {name}; CREATE TABLE {name} (x int)"
        ))
        .expect("create the table");
}

/// A table of named counters for read-modify-write races, created once.
pub fn counter(admin: &mut Client, name: &str) {
    admin
        .batch_execute(
            "BEGIN; SELECT pg_advisory_xact_lock(hashtextextended('pglock-test/schema', 0)); \
             CREATE TABLE IF NOT EXISTS pglock_test_counters (name text PRIMARY KEY, n int NOT NULL); \
             COMMIT",
        )
        .expect("create the counters table");
    admin
        .execute(
            "INSERT INTO pglock_test_counters VALUES ($1, 0) \
             ON CONFLICT (name) DO UPDATE SET n = 0",
            &[&name],
        )
        .expect("reset counter");
}

/// Reads and writes back a counter in two statements: without mutual exclusion, concurrent
/// increments get lost.
pub fn increment(conn: &mut Client, name: &str) {
    let n: i32 = conn
        .query_one(
            "SELECT n FROM pglock_test_counters WHERE name = $1",
            &[&name],
        )
        .expect("read counter")
        .get(0);
    std::thread::yield_now();
    conn.execute(
        "UPDATE pglock_test_counters SET n = $2 WHERE name = $1",
        &[&name, &(n + 1)],
    )
    .expect("write counter");
}

/// The value of a counter.
pub fn count(admin: &mut Client, name: &str) -> i32 {
    admin
        .query_one(
            "SELECT n FROM pglock_test_counters WHERE name = $1",
            &[&name],
        )
        .expect("read counter")
        .get(0)
}

/// A pool of one connection whose settings differ from every value pglock sets, so a
/// leaked `SET` shows (as in `tests/hygiene.rs`).
pub fn pool_of_one_with_settings() -> Pool {
    let mut config = config();
    config.options("-c statement_timeout=5s -c lock_timeout=4s");
    pool_with(1, config)
}

/// Checks the only connection of a `pool_of_one_with_settings` out and looks at it: no
/// advisory lock, no transaction, no changed setting, no session marker, no `LISTEN`.
pub fn assert_pool_clean(pool: &Pool, path: &str) {
    let mut conn = pool
        .get()
        .unwrap_or_else(|e| panic!("{path}: checkout: {e}"));
    let messages = conn
        .simple_query(
            "SELECT (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
                     AND pid = pg_backend_pid()), \
                    now() < statement_timestamp(), \
                    current_setting('lock_timeout'), current_setting('statement_timeout'), \
                    COALESCE(current_setting('pglock.session_lock', true), ''), \
                    (SELECT count(*) FROM pg_listening_channels())",
        )
        .unwrap_or_else(|e| panic!("{path}: the connection is not usable: {e:?}"));
    let row = messages
        .iter()
        .find_map(|m| match m {
            postgres::SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .expect("a row");
    assert_eq!(
        row.get(0),
        Some("0"),
        "{path}: the connection holds advisory locks"
    );
    assert_eq!(
        row.get(1),
        Some("f"),
        "{path}: the connection is inside a transaction"
    );
    assert_eq!(row.get(2), Some("4s"), "{path}: lock_timeout changed");
    assert_eq!(row.get(3), Some("5s"), "{path}: statement_timeout changed");
    assert_eq!(
        row.get(4),
        Some(""),
        "{path}: a session lock marker was left"
    );
    assert_eq!(
        row.get(5),
        Some("0"),
        "{path}: the connection still listens"
    );
}

/// Starts this test binary as a child process running the ignored test `child_test`
/// (the way tests kill a real holder process), with `vars` in its environment.
pub fn child(child_test: &str, vars: &[(&str, &str)]) -> std::process::Command {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        child_test,
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("DATABASE_URL", database_url())
    .envs(vars.iter().copied());
    cmd
}
