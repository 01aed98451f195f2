//! `statement_timeout` never cuts a wait short, `lock_timeout` bounds it, nothing stays
//! set on the connection, and every bad argument is a typed error.

mod common;

use std::time::{Duration, Instant};

use common::{admin, holders, pool, pool_with};
use pglock::{
    Error, LockKey, LockMode, LockOptions, SessionGuard, SessionLock, TxGuard, TxLock, WaitMode,
};
use postgres::Client;

fn show(conn: &mut Client, setting: &str) -> String {
    conn.query_one(&format!("SHOW {setting}"), &[])
        .unwrap()
        .get(0)
}

/// A role whose own `statement_timeout` is 100 ms, as DBAs set for application roles.
fn role_with_short_statement_timeout(admin: &mut Client) -> postgres::Config {
    admin
        .batch_execute(
            "BEGIN;
             SELECT pg_advisory_xact_lock(hashtextextended('pglock-test/roles', 0));
             DO $$ BEGIN
               CREATE ROLE pglock_short_timeout LOGIN;
             EXCEPTION WHEN duplicate_object THEN NULL;
             END $$;
             ALTER ROLE pglock_short_timeout SET statement_timeout = '100ms';
             ALTER ROLE pglock_short_timeout SET lock_timeout = '50ms';
             COMMIT;",
        )
        .unwrap();
    let mut config = common::config();
    config.user("pglock_short_timeout");
    config
}

#[test]
fn a_role_statement_timeout_does_not_cut_a_wait_short() {
    let key = unique_key!();
    let mut admin = admin();
    let short = role_with_short_statement_timeout(&mut admin);
    let holder_pool = pool(1);
    let mut holder = SessionLock::new(&holder_pool, key.clone()).unwrap();
    let _held = holder.lock().unwrap();

    for scope in ["session", "transaction"] {
        let pool = pool_with(1, short.clone());
        assert_eq!(show(&mut pool.get().unwrap(), "statement_timeout"), "100ms");
        let bound = Duration::from_millis(600);
        let options = LockOptions::new().lock_timeout(bound);
        let start = Instant::now();
        let err = match scope {
            "session" => SessionLock::with_options(&pool, key.clone(), options)
                .unwrap()
                .lock()
                .map(|_| ())
                .unwrap_err(),
            _ => TxLock::with_options(&pool, key.clone(), options)
                .unwrap()
                .lock()
                .map(|_| ())
                .unwrap_err(),
        };
        // Not 57014 after 100 ms (statement_timeout), nor 55P03 after 50 ms (the role's
        // lock_timeout): a timeout after the bound pglock was given.
        assert!(matches!(err, Error::Timeout { .. }), "{scope}: {err:?}");
        assert!(
            start.elapsed() >= bound,
            "{scope}: after {:?}",
            start.elapsed()
        );
        let mut conn = pool.get().unwrap();
        assert_eq!(show(&mut conn, "statement_timeout"), "100ms", "{scope}");
        assert_eq!(show(&mut conn, "lock_timeout"), "50ms", "{scope}");
    }
}

#[test]
fn a_session_statement_timeout_does_not_cut_a_wait_short() {
    let key = unique_key!();
    let pool = pool(2);
    let mut holder = SessionLock::new(&pool, key.clone()).unwrap();
    let _held = holder.lock().unwrap();

    let mut conn = pool.get().unwrap();
    conn.batch_execute("SET statement_timeout = 50; SET lock_timeout = 20")
        .unwrap();
    let options = LockOptions::new().lock_timeout(Duration::from_millis(300));
    let mut lock = SessionLock::from_connection(conn, key.clone(), options).unwrap();
    let start = Instant::now();
    assert!(matches!(lock.lock(), Err(Error::Timeout { .. })));
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert!(lock
        .try_lock_for(Duration::from_millis(200))
        .unwrap()
        .is_none());
    drop(lock);
    // Lock and unlock under the session's short settings, then check they are intact.
    let mut conn = pool.get().unwrap();
    assert_eq!(show(&mut conn, "statement_timeout"), "50ms");
    assert_eq!(show(&mut conn, "lock_timeout"), "20ms");
}

#[test]
fn an_unbounded_wait_ignores_the_roles_lock_timeout() {
    // The role's lock_timeout (50 ms) must not turn lock() into a bounded wait.
    let key = unique_key!();
    let mut admin = admin();
    let short = role_with_short_statement_timeout(&mut admin);
    let holder_pool = pool(1);
    let mut holder = SessionLock::new(&holder_pool, key.clone()).unwrap();
    let held = holder.lock().unwrap();

    let pool = pool_with(1, short);
    let (_cancel, _pid, done) = common::spawn_waiter(&pool, &key, LockOptions::new(), false);
    common::wait_for_waiters(&mut admin, &key, 1);
    // Still queued well past both of the role's timeouts.
    let queued_since = Instant::now();
    common::wait_until(
        "300 ms pass with the waiter queued",
        Duration::from_secs(5),
        || {
            assert_eq!(common::waiters(&mut admin, &key), 1, "the waiter gave up");
            queued_since.elapsed() > Duration::from_millis(300)
        },
    );
    drop(held);
    done.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
}

#[test]
fn timeouts_past_postgres_limit_are_invalid_arguments() {
    let key = unique_key!();
    let pool = pool(1);
    let too_long = Duration::from_millis(i32::MAX as u64 + 1);

    let err = SessionLock::with_options(
        &pool,
        key.clone(),
        LockOptions::new().lock_timeout(too_long),
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument { key: k, .. } if k == &key),
        "{err:?}"
    );
    assert!(err.to_string().contains("2147483647"), "{err}");

    let mut lock = SessionLock::new(&pool, key.clone()).unwrap();
    let err = lock.try_lock_for(too_long).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err:?}");
    let err = lock.try_lock_for(Duration::MAX).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err:?}");
    // The largest valid bound is accepted (and not waited for: the lock is free).
    assert!(lock
        .try_lock_for(Duration::from_millis(i32::MAX as u64))
        .unwrap()
        .is_some());
}

#[test]
fn other_bad_arguments_are_invalid_arguments() {
    let pool = pool(1);
    let cases: Vec<(LockKey, LockOptions)> = vec![
        (LockKey::from_name("nul\0inside"), LockOptions::new()),
        (
            unique_key!("zero poll"),
            LockOptions::new().wait_mode(WaitMode::Poll {
                min_interval: Duration::ZERO,
                max_interval: Duration::from_secs(1),
            }),
        ),
        (
            unique_key!("inverted poll"),
            LockOptions::new().wait_mode(WaitMode::Poll {
                min_interval: Duration::from_secs(2),
                max_interval: Duration::from_secs(1),
            }),
        ),
        (
            unique_key!("shared and too long"),
            LockOptions::new()
                .mode(LockMode::Shared)
                .lock_timeout(Duration::from_secs(30 * 24 * 3600)),
        ),
    ];
    for (key, options) in cases {
        for err in [
            SessionLock::with_options(&pool, key.clone(), options.clone()).unwrap_err(),
            TxLock::with_options(&pool, key.clone(), options.clone()).unwrap_err(),
        ] {
            assert!(
                matches!(&err, Error::InvalidArgument { key: k, .. } if k == &key),
                "{key}: {err:?}"
            );
            assert!(err.to_string().contains("invalid argument"), "{err}");
        }
    }
    // Nothing was taken or left behind by the rejected calls.
    assert_eq!(holders(&mut admin(), &unique_key!("zero poll")), 0);
}

#[test]
fn a_statement_timeout_set_inside_the_critical_section_does_not_cut_the_next_wait_short() {
    // pglock learns the session's timeouts from its own replies and skips lifting them
    // while they are off. A critical section that sets one changes that: the next wait
    // must lift it again, for both kinds of lock.
    let key = unique_key!();
    let pool = pool(3);
    let bound = Duration::from_millis(600);
    let options = LockOptions::new().lock_timeout(bound);
    let mut session = SessionLock::with_options(&pool, key.clone(), options.clone()).unwrap();
    let mut guard = session.lock().unwrap(); // learns: nothing to lift
    guard.batch_execute("SET statement_timeout = 100").unwrap();
    SessionGuard::unlock(guard).unwrap();
    let mut tx = TxLock::with_options(&pool, key.clone(), options).unwrap();
    let mut guard = tx.lock().unwrap();
    // SET (not LOCAL) in a transaction outlives it.
    guard.batch_execute("SET statement_timeout = 100").unwrap();
    TxGuard::commit(guard).unwrap();

    let mut holder = SessionLock::new(&pool, key.clone()).unwrap();
    let _held = holder.lock().unwrap();
    let start = Instant::now();
    let result = session.lock().map(|_| ());
    // Not 57014 after 100 ms: a timeout after the bound pglock was given.
    assert!(matches!(result, Err(Error::Timeout { .. })), "{result:?}");
    assert!(start.elapsed() >= bound, "after {:?}", start.elapsed());
    let start = Instant::now();
    let result = tx.lock().map(|_| ());
    assert!(matches!(result, Err(Error::Timeout { .. })), "{result:?}");
    assert!(start.elapsed() >= bound, "after {:?}", start.elapsed());
}

#[test]
fn a_session_transaction_timeout_does_not_cut_a_wait_short() {
    // PostgreSQL 17's transaction_timeout ends the whole session when a transaction runs
    // too long: a wait must lift it, as it lifts statement_timeout. Servers before 17 do not
    // have the setting, and pglock's statements must not trip over its absence there (the
    // rest of the suite runs on such a server in CI; this test was run on 17.10 as well).
    let key = unique_key!();
    let mut admin = admin();
    let has_it: Option<String> = admin
        .query_one("SELECT current_setting('transaction_timeout', true)", &[])
        .unwrap()
        .get(0);
    let Some(_) = has_it else {
        eprintln!("this server has no transaction_timeout (before PostgreSQL 17)");
        return;
    };
    let pool = pool(3);
    let mut holder = SessionLock::new(&pool, key.clone()).unwrap();
    let _held = holder.lock().unwrap();
    let bound = Duration::from_millis(600);
    for transaction in [false, true] {
        let mut conn = pool.get().unwrap();
        conn.batch_execute("SET transaction_timeout = 200").unwrap();
        let options = LockOptions::new().lock_timeout(bound);
        let start = Instant::now();
        let result = if transaction {
            TxLock::from_connection(conn, key.clone(), options)
                .unwrap()
                .lock()
                .map(|_| ())
        } else {
            SessionLock::from_connection(conn, key.clone(), options)
                .unwrap()
                .lock()
                .map(|_| ())
        };
        assert!(
            matches!(result, Err(Error::Timeout { .. })),
            "transaction {transaction}: {result:?}"
        );
        assert!(start.elapsed() >= bound, "after {:?}", start.elapsed());
    }
}
