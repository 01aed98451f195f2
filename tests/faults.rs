//! Proof under faults: a server restarted under held and waited-on locks, and connections
//! the server (or the pool) refuses. Every test here disrupts the whole server (a restart,
//! all connection slots taken), so `.config/nextest.toml` runs this binary alone.
//!
//! Each test prints what it measured (`cargo nextest run --test faults --no-capture`).

mod common;

use std::net::TcpListener;
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{admin, config, pool, wait_for_waiters, wait_until};
use pglock::{
    Error, LeaseLock, LeaseOptions, LeaseTable, LockOptions, SessionGuard, SessionLock, TxGuard,
    TxLock,
};
use postgres::{Client, NoTls};
use r2d2_postgres::PostgresConnectionManager;

/// The pool's `connection_timeout` in the refused-connection tests.
const POOL_TIMEOUT: Duration = Duration::from_secs(2);
/// What a refused checkout may take beyond the pool's timeout (a loaded 2-core machine).
const SLACK: Duration = Duration::from_secs(8);

fn env(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "\n\n{name} is not set: tests/faults.rs needs the throwaway cluster of \
             ci/with-postgres, which sets it:\n\n    \
             ci/with-postgres cargo nextest run --features cli --test faults\n\n"
        ),
    }
}

/// A pool that gives up after `POOL_TIMEOUT`, made without connecting.
fn refusing_pool(size: u32, config: postgres::Config) -> common::Pool {
    r2d2::Pool::builder()
        .max_size(size)
        .min_idle(Some(0))
        .connection_timeout(POOL_TIMEOUT)
        .build_unchecked(PostgresConnectionManager::new(config, NoTls))
}

/// Asserts that a refused lock is `Error::Pool`, names the lock, and came within the pool's
/// timeout (plus slack). Returns how long it took.
fn assert_refused(what: &str, key: &pglock::LockKey, err: Error, took: Duration) -> Duration {
    eprintln!(
        "{what}: {took:?}: {err} ({:?})",
        std::error::Error::source(&err)
    );
    assert!(matches!(err, Error::Pool { .. }), "{what}: {err:?}");
    assert!(
        err.to_string().contains(&key.to_string()),
        "{what}: the message does not name the lock {key}: {err}"
    );
    assert!(
        took < POOL_TIMEOUT + SLACK,
        "{what}: took {took:?}, beyond the pool's timeout of {POOL_TIMEOUT:?}"
    );
    took
}

/// A session lock, a transaction lock and a lease made on `pool` must each be refused.
fn assert_every_lock_refused(what: &str, pool: &common::Pool, name: &str) {
    let key = pglock::LockKey::from_name(name);
    let start = Instant::now();
    let err = SessionLock::new(pool, key.clone()).expect_err("a session lock without a connection");
    assert_refused(&format!("{what} (SessionLock)"), &key, err, start.elapsed());

    let start = Instant::now();
    let err = TxLock::new(pool, key.clone()).expect_err("a transaction lock without a connection");
    assert_refused(&format!("{what} (TxLock)"), &key, err, start.elapsed());

    // A lease checks a connection out when it is taken.
    let mut lease = LeaseLock::new(pool, name).unwrap();
    let start = Instant::now();
    let err = lease.try_lock().expect_err("a lease without a connection");
    let key = lease.key().clone();
    assert_refused(&format!("{what} (LeaseLock)"), &key, err, start.elapsed());
}

#[test]
fn an_exhausted_pool_is_a_pool_error_within_its_timeout() {
    let pool = refusing_pool(1, config());
    let _held_elsewhere = pool.get().expect("the pool's one connection");
    assert_every_lock_refused("pool exhausted", &pool, function_name!());
}

#[test]
fn an_absent_server_is_a_pool_error_within_its_timeout() {
    // A port nothing listens on: bound, then freed.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user("postgres")
        .dbname("postgres");
    assert_every_lock_refused("server absent", &refusing_pool(2, config), function_name!());
}

#[test]
fn a_wrong_password_is_a_pool_error_within_its_timeout() {
    let role = env("PGLOCK_PW_ROLE");
    let password = env("PGLOCK_PW_PASSWORD");
    // ci/with-postgres makes the role when it has psql; make it here otherwise.
    let mut admin = admin();
    if admin
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
        .unwrap()
        .is_none()
    {
        let sql: String = admin
            .query_one(
                "SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', $1::text, $2::text)",
                &[&role, &password],
            )
            .unwrap()
            .get(0);
        admin.batch_execute(&sql).unwrap();
    }

    // DATABASE_URL connects over TCP to 127.0.0.1, where the password line applies.
    let mut config = config();
    config.user(&role);
    // The right password works: the refusal below is about the password alone.
    let right = refusing_pool(1, config.clone().password(&password).to_owned());
    let mut lock = SessionLock::new(&right, function_name!()).expect("the right password");
    drop(lock.lock().expect("a lock with the right password"));
    drop(lock);

    let wrong = refusing_pool(2, config.password("not-the-password").to_owned());
    assert_every_lock_refused("wrong password", &wrong, function_name!());
}

#[test]
fn max_connections_reached_is_a_pool_error_and_the_pool_recovers() {
    let name = function_name!();
    // Take every connection slot the server has (superusers may use the reserved ones).
    let mut taken = Vec::new();
    let refusal = loop {
        match Client::connect(&common::database_url(), NoTls) {
            Ok(client) => taken.push(client),
            Err(e) => break e,
        }
        assert!(taken.len() < 2000, "the server never refused a connection");
    };
    eprintln!(
        "max_connections: refused after {} connections: {refusal} ({:?})",
        taken.len(),
        refusal.code()
    );
    let pool = refusing_pool(2, config());
    assert_every_lock_refused("max_connections reached", &pool, name);

    // Slots free again: the same pool recovers.
    drop(taken);
    let start = Instant::now();
    let key = unique_key!();
    let mut lock = loop {
        match SessionLock::new(&pool, key.clone()) {
            Ok(lock) => break lock,
            Err(e) => assert!(
                start.elapsed() < Duration::from_secs(30),
                "the pool did not recover: {e}"
            ),
        }
    };
    drop(lock.lock().expect("a lock once slots are free"));
    eprintln!(
        "max_connections: the pool recovered in {:?}",
        start.elapsed()
    );
}

/// What a thread blocked in `lock()` during the restart got, and when.
struct WaiterOutcome {
    result: Result<(), Error>,
    at: Instant,
}

#[test]
fn a_server_restart_is_noticed_by_holders_and_waiters_and_the_pool_recovers() {
    let restart = env("PGLOCK_PG_RESTART");
    let mut admin = admin();
    LeaseTable::default().create(&mut admin).unwrap();
    let pool = pool(8);
    let session_key = unique_key!("session");
    let tx_key = unique_key!("tx");
    let lease_name = function_name!();

    let mut session = SessionLock::new(&pool, session_key.clone()).unwrap();
    let mut session_guard = session.lock().unwrap();
    let mut tx = TxLock::new(&pool, tx_key.clone()).unwrap();
    let mut tx_guard = tx.lock().unwrap();
    // A second transaction lock, whose holder commits without asking first.
    let blind_key = unique_key!("blind");
    let mut blind = TxLock::new(&pool, blind_key.clone()).unwrap();
    let blind_guard = blind.lock().unwrap();
    let lease_length = Duration::from_secs(30);
    let mut lease =
        LeaseLock::with_options(&pool, lease_name, LeaseOptions::new().lease(lease_length))
            .unwrap();
    let lease_guard = lease.lock().unwrap();

    // A waiter on the session lock, bounded at 30 s.
    let (done_tx, done_rx) = mpsc::channel();
    let (waiter_pool, waiter_key) = (pool.clone(), session_key.clone());
    let waiter = thread::spawn(move || {
        let options = LockOptions::new().lock_timeout(Duration::from_secs(30));
        let mut lock = SessionLock::with_options(&waiter_pool, waiter_key, options).unwrap();
        // Granted, the lock must really be held (on the restarted server).
        let result = lock
            .lock()
            .map(|mut guard| SessionGuard::is_held(&mut guard).map(|held| assert!(held)))
            .and_then(|held| held);
        done_tx
            .send(WaiterOutcome {
                result,
                at: Instant::now(),
            })
            .unwrap();
    });
    wait_for_waiters(&mut admin, &session_key, 1);
    drop(admin);

    let start = Instant::now();
    let output = Command::new(&restart)
        .output()
        .expect("run PGLOCK_PG_RESTART");
    let restarted = start.elapsed();
    assert!(
        output.status.success(),
        "the restart failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("restart: pg_ctl restart took {restarted:?}");

    // The waiter: a typed error or the lock, never a hang (its own bound is 30 s) or a panic.
    let outcome = done_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the waiter neither returned nor panicked within 60 s");
    waiter.join().expect("the waiter panicked");
    let waited = outcome.at.saturating_duration_since(start);
    eprintln!(
        "restart: the waiter returned {waited:?} after the restart began: {:?}",
        outcome.result
    );
    match &outcome.result {
        Ok(()) => {}
        Err(e) => {
            assert!(
                !matches!(e, Error::Timeout { .. }),
                "the waiter did not notice the restart: {e}"
            );
            assert!(e.to_string().contains(&session_key.to_string()), "{e}");
        }
    }
    assert!(
        waited < Duration::from_secs(25),
        "the waiter took {waited:?} to notice the restart"
    );

    // The holders report the loss.
    let noticed = Instant::now();
    match SessionGuard::is_held(&mut session_guard) {
        Ok(held) => assert!(!held, "a session lock survived the restart"),
        Err(e) => assert!(matches!(e, Error::LockLost { .. }), "is_held: {e:?}"),
    }
    let err = SessionGuard::unlock(session_guard).expect_err("unlock after the restart");
    assert!(
        matches!(err, Error::LockLost { .. }),
        "session unlock: {err:?}"
    );
    assert!(err.to_string().contains(&session_key.to_string()), "{err}");
    match TxGuard::is_held(&mut tx_guard) {
        Ok(held) => assert!(!held, "a transaction lock survived the restart"),
        Err(e) => assert!(matches!(e, Error::LockLost { .. }), "is_held: {e:?}"),
    }
    let err = TxGuard::commit(tx_guard).expect_err("commit after the restart");
    assert!(matches!(err, Error::LockLost { .. }), "tx commit: {err:?}");
    assert!(err.to_string().contains(&tx_key.to_string()), "{err}");
    // Without asking, the commit meets the closed session with COMMIT on its way: the
    // client cannot tell a session ended before it from one ended during it.
    let err = TxGuard::commit(blind_guard).expect_err("commit after the restart");
    assert!(
        matches!(
            err,
            Error::LockLost { .. } | Error::CommitOutcomeUnknown { .. }
        ),
        "tx commit without is_held: {err:?}"
    );
    assert!(err.to_string().contains(&blind_key.to_string()), "{err}");
    eprintln!("restart: a commit without is_held: {err}");
    eprintln!(
        "restart: both advisory holders reported the loss in {:?}",
        noticed.elapsed()
    );

    // The lease lives in a table: it survives the restart, valid until its deadline.
    assert!(
        lease_guard.is_valid(),
        "the lease guard gave up before its deadline ({:?} after the restart began)",
        start.elapsed()
    );
    let unlocking = Instant::now();
    let unlocked = lease_guard.unlock();
    eprintln!(
        "restart: the lease's unlock returned in {:?}: {unlocked:?}",
        unlocking.elapsed()
    );
    match unlocked {
        Ok(()) => {}
        Err(e) => assert!(matches!(e, Error::LockLost { .. }), "lease unlock: {e:?}"),
    }

    // The pool recovers: fresh locks, and the same lock objects, work again.
    let recovering = Instant::now();
    let mut fresh = SessionLock::new(&pool, unique_key!("fresh")).expect("a fresh connection");
    drop(fresh.lock().expect("a fresh lock after the restart"));
    drop(session.lock().expect("the session lock again"));
    TxGuard::commit(tx.lock().expect("the transaction lock again")).unwrap();
    TxGuard::commit(blind.lock().expect("the other transaction lock again")).unwrap();
    lease
        .try_lock()
        .expect("the lease again")
        .expect("the released lease is free")
        .unlock()
        .unwrap();
    let recovered = recovering.elapsed();
    eprintln!("restart: the pool and the locks recovered in {recovered:?}");
    assert!(recovered < Duration::from_secs(15), "{recovered:?}");

    // PgBouncer reconnects to the restarted server by itself.
    if let Ok(url) = std::env::var("PGBOUNCER_URL") {
        let since = Instant::now();
        wait_until("PgBouncer serves again", Duration::from_secs(30), || {
            thread::sleep(Duration::from_millis(50));
            Client::connect(&url, NoTls)
                .and_then(|mut c| c.simple_query("SELECT 1"))
                .is_ok()
        });
        eprintln!(
            "restart: PgBouncer served again after {:?}",
            since.elapsed()
        );
    }
    // The hot standby streams from the restarted primary again.
    if let Ok(url) = std::env::var("STANDBY_URL") {
        let since = Instant::now();
        wait_until("the standby streams again", Duration::from_secs(60), || {
            thread::sleep(Duration::from_millis(50));
            Client::connect(&url, NoTls)
                .and_then(|mut c| {
                    c.query_opt(
                        "SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming'",
                        &[],
                    )
                })
                .is_ok_and(|row| row.is_some())
        });
        eprintln!(
            "restart: the standby streamed again after {:?}",
            since.elapsed()
        );
    }
}
