//! `SessionLock` semantics against the real server: try, blocking and bounded waits,
//! shared and exclusive modes, `with_lock` on every path, lost locks.

mod common;

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{admin, backend_pid, holders, locks_on, pool, wait_for_waiters, waiters};
use pglock::{
    CancelHandle, Error, LockKey, LockMode, LockOptions, Locker, LostReason, SessionGuard,
    SessionLock, TxLock,
};

#[test]
fn try_lock_fails_while_held_elsewhere_and_succeeds_after() {
    let key = unique_key!();
    let pool = pool(2);
    let mut a = SessionLock::new(&pool, key.clone()).unwrap();
    let mut b = SessionLock::new(&pool, key.clone()).unwrap();

    let guard = a.try_lock().unwrap().expect("a: the lock is free");
    assert!(b.try_lock().unwrap().is_none(), "b took a held lock");
    drop(guard);
    let _guard = b.try_lock().unwrap().expect("b: the lock was released");
    assert_eq!(holders(&mut admin(), &key), 1);
}

#[test]
fn guard_runs_sql_on_the_session_that_holds_the_lock() {
    let key = unique_key!();
    let pool = pool(1);
    let mut lock = SessionLock::new(&pool, key.clone()).unwrap();
    let mut guard = lock.lock().unwrap();
    let pid = backend_pid(&mut guard);
    assert_eq!(
        locks_on(&mut admin(), &key),
        vec![(pid, "ExclusiveLock".to_owned(), true)]
    );
    assert_eq!(SessionGuard::key(&guard), &key);
    assert!(SessionGuard::is_held(&mut guard).unwrap());
}

#[test]
fn blocked_waiter_wakes_when_the_holder_unlocks() {
    let key = unique_key!();
    let pool = pool(2);
    let mut admin = admin();
    let mut holder = SessionLock::new(&pool, key.clone()).unwrap();
    let guard = holder.lock().unwrap();

    let (done_tx, done_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let waiter_pool = pool.clone();
    let waiter_key = key.clone();
    let waiter = thread::spawn(move || {
        let mut lock = SessionLock::new(&waiter_pool, waiter_key).unwrap();
        let mut guard = lock.lock().unwrap();
        done_tx.send(backend_pid(&mut guard)).unwrap();
        // Hold until the test has looked at pg_locks.
        release_rx.recv().unwrap();
    });
    wait_for_waiters(&mut admin, &key, 1);
    assert!(done_rx.try_recv().is_err(), "the waiter got a held lock");

    SessionGuard::unlock(guard).unwrap();
    let pid = done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the waiter was not woken");
    assert_eq!(
        locks_on(&mut admin, &key),
        vec![(pid, "ExclusiveLock".to_owned(), true)]
    );
    release_tx.send(()).unwrap();
    waiter.join().unwrap();
}

#[test]
fn bounded_lock_times_out_within_its_window_and_holds_nothing() {
    let key = unique_key!();
    let pool = pool(2);
    let mut admin = admin();
    let mut holder = SessionLock::new(&pool, key.clone()).unwrap();
    let _guard = holder.lock().unwrap();

    let timeout = Duration::from_millis(300);
    let options = LockOptions::new().lock_timeout(timeout);
    let mut waiter = SessionLock::with_options(&pool, key.clone(), options).unwrap();
    let start = Instant::now();
    let err = waiter.lock().unwrap_err();
    let elapsed = start.elapsed();
    match &err {
        Error::Timeout { key: k, waited } => {
            assert_eq!(k, &key);
            assert!(*waited >= timeout, "gave up early: {waited:?}");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(elapsed >= timeout, "returned after {elapsed:?}");
    // Generous: CI runs on a loaded 2-core machine. The point is that it returned.
    assert!(
        elapsed < timeout + Duration::from_secs(5),
        "returned after {elapsed:?}"
    );
    assert_eq!(holders(&mut admin, &key), 1, "only the holder holds it");
    assert_eq!(waiters(&mut admin, &key), 0, "the waiter left the queue");

    let start = Instant::now();
    assert!(waiter.try_lock_for(timeout).unwrap().is_none());
    let elapsed = start.elapsed();
    assert!(
        elapsed >= timeout && elapsed < timeout + Duration::from_secs(5),
        "{elapsed:?}"
    );
}

#[test]
fn bounded_lock_succeeds_when_released_within_the_bound() {
    let key = unique_key!();
    let pool = pool(2);
    let mut admin = admin();
    let mut holder = SessionLock::new(&pool, key.clone()).unwrap();
    let guard = holder.lock().unwrap();

    let (tx, rx) = mpsc::channel();
    let waiter_pool = pool.clone();
    let waiter_key = key.clone();
    let waiter = thread::spawn(move || {
        let mut lock = SessionLock::new(&waiter_pool, waiter_key).unwrap();
        let got = lock
            .try_lock_for(Duration::from_secs(30))
            .unwrap()
            .is_some();
        tx.send(got).unwrap();
    });
    wait_for_waiters(&mut admin, &key, 1);
    drop(guard);
    assert!(
        rx.recv_timeout(Duration::from_secs(10)).unwrap(),
        "the waiter timed out"
    );
    waiter.join().unwrap();
}

#[test]
fn zero_timeout_means_try_not_forever() {
    let key = unique_key!();
    let pool = pool(2);
    let options = LockOptions::new().lock_timeout(Duration::ZERO);
    let mut a = SessionLock::with_options(&pool, key.clone(), options.clone()).unwrap();
    let mut b = SessionLock::with_options(&pool, key.clone(), options).unwrap();

    let _guard = a.lock().expect("a free lock is taken at once");
    let start = Instant::now();
    assert!(matches!(b.lock(), Err(Error::Timeout { .. })));
    assert!(b.try_lock_for(Duration::ZERO).unwrap().is_none());
    // "Try once", not "wait forever": generous, as CI runs on a loaded machine.
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn shared_holders_coexist_and_exclude_an_exclusive_one() {
    let key = unique_key!();
    let pool = pool(3);
    let mut admin = admin();
    let shared = LockOptions::new().mode(LockMode::Shared);
    let mut r1 = SessionLock::with_options(&pool, key.clone(), shared.clone()).unwrap();
    let mut r2 = SessionLock::with_options(&pool, key.clone(), shared).unwrap();
    let mut w = SessionLock::new(&pool, key.clone()).unwrap();
    assert_eq!(r1.mode(), LockMode::Shared);

    let g1 = r1.try_lock().unwrap().expect("first reader");
    let g2 = r2.try_lock().unwrap().expect("second reader alongside");
    assert_eq!(
        locks_on(&mut admin, &key)
            .iter()
            .filter(|l| l.1 == "ShareLock" && l.2)
            .count(),
        2
    );
    assert!(w.try_lock().unwrap().is_none(), "writer beside readers");
    drop(g1);
    assert!(w.try_lock().unwrap().is_none(), "writer beside a reader");
    drop(g2);
    let writer = w.try_lock().unwrap().expect("writer once readers left");
    assert!(r1.try_lock().unwrap().is_none(), "reader beside a writer");
    drop(writer);
    assert!(r1.try_lock().unwrap().is_some());
}

#[test]
fn with_lock_unlocks_after_ok_err_and_panic() {
    let key = unique_key!();
    let pool = pool(1);
    let mut admin = admin();
    let mut lock = SessionLock::new(&pool, key.clone()).unwrap();

    let value = lock
        .with_lock(|conn| -> Result<i32, Error> {
            assert_eq!(holders(&mut common::admin(), &key), 1);
            Ok(conn.query_one("SELECT 41 + 1", &[]).unwrap().get(0))
        })
        .unwrap();
    assert_eq!(value, 42);
    assert_eq!(holders(&mut admin, &key), 0, "held after Ok");

    #[derive(Debug)]
    enum JobError {
        Lock,
        Job(&'static str),
    }
    impl From<Error> for JobError {
        fn from(_: Error) -> Self {
            JobError::Lock
        }
    }
    let err = lock
        .with_lock(|_| -> Result<(), JobError> { Err(JobError::Job("boom")) })
        .unwrap_err();
    assert!(matches!(err, JobError::Job("boom")), "{err:?}");
    assert_eq!(holders(&mut admin, &key), 0, "held after Err");

    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = lock.with_lock(|_| -> Result<(), Error> { panic!("in the critical section") });
    }));
    assert!(panicked.is_err(), "the panic went on");
    assert_eq!(holders(&mut admin, &key), 0, "held after a panic");
    assert!(
        lock.try_lock().unwrap().is_some(),
        "the lock is usable after a panic"
    );
}

#[test]
fn with_lock_reports_a_lock_lost_during_successful_work() {
    let key = unique_key!();
    let pool = pool(1);
    let mut lock = SessionLock::new(&pool, key.clone()).unwrap();
    let err = lock
        .with_lock(|conn| -> Result<(), Error> {
            conn.batch_execute("SELECT pg_advisory_unlock_all()")
                .unwrap();
            Ok(())
        })
        .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::LockLost {
                reason: LostReason::NotHeld,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.key(), &key);
}

#[test]
fn a_terminated_session_is_reported_lost_and_frees_the_lock() {
    let key = unique_key!();
    let pool = pool(2);
    let mut admin = admin();
    let mut holder = SessionLock::new(&pool, key.clone()).unwrap();
    let mut guard = holder.lock().unwrap();
    let pid = backend_pid(&mut guard);

    let (_cancel, _pid, done) = common::spawn_waiter(&pool, &key, LockOptions::new(), false);
    wait_for_waiters(&mut admin, &key, 1);

    // An administrator (or idle_session_timeout, or a failover) ends the holder's session.
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap();
    done.recv_timeout(Duration::from_secs(10))
        .expect("the waiter did not get the freed lock")
        .unwrap();

    assert!(
        !SessionGuard::is_held(&mut guard).unwrap(),
        "is_held after termination"
    );
    common::assert_session_ended(&SessionGuard::unlock(guard).unwrap_err());
}

#[test]
fn a_leaked_guard_is_released_when_its_lock_drops() {
    let key = unique_key!();
    let pool = pool(1);
    let mut lock = SessionLock::new(&pool, key.clone()).unwrap();
    std::mem::forget(lock.lock().unwrap());
    assert_eq!(holders(&mut admin(), &key), 1);
    drop(lock);
    assert_eq!(holders(&mut admin(), &key), 0);
}

/// A connection can come out of the pool inside a transaction that other code left open.
/// A session lock taken inside it would be marked inside it too, and its rollback would
/// leave the lock held and unmarked (behind a pooler, where another client could then be
/// granted it again). So the lock statement takes nothing there: the transaction is rolled
/// back and reported, and the next call locks. Healthy or failed, waiting or not.
#[test]
fn a_lock_refuses_a_connection_that_comes_inside_a_transaction() {
    let key = unique_key!();
    let pool = pool(1);
    let mut admin = admin();
    for (opened, wait) in [
        ("BEGIN; CREATE TEMP TABLE pglock_came_open (x int)", false),
        ("BEGIN; CREATE TEMP TABLE pglock_came_open (x int)", true),
        ("BEGIN; SELECT 1/0", false),
        // pglock's prepared statements gone too: its own EXECUTE finds none.
        (
            "DEALLOCATE ALL; BEGIN; CREATE TEMP TABLE pglock_came_open (x int)",
            false,
        ),
    ] {
        let pid = common::leave_open(&pool, opened);
        let mut lock = SessionLock::new(&pool, key.clone()).unwrap();
        let refused = if wait {
            lock.try_lock_for(Duration::from_secs(5)).map(|_| ())
        } else {
            lock.try_lock().map(|_| ())
        };
        let what = format!("{opened} (wait: {wait})");
        common::assert_refused_inside_transaction(&mut admin, &key, pid, &what, refused);
        let guard = lock.try_lock().unwrap().expect("a free key");
        SessionGuard::unlock(guard).unwrap();
        let mut conn = lock.into_connection().unwrap();
        let gone: bool = conn
            .query_one(
                "SELECT to_regclass('pg_temp.pglock_came_open') IS NULL",
                &[],
            )
            .unwrap()
            .get(0);
        assert!(
            gone,
            "the transaction the connection came with was committed"
        );
    }
    // Nothing of the refusals is left to be misread later: a failed transaction that a
    // critical section leaves is rolled back and the unlock succeeds, as always.
    let mut lock = SessionLock::new(&pool, key.clone()).unwrap();
    let mut guard = lock.try_lock().unwrap().expect("a free key");
    assert!(guard.batch_execute("BEGIN; SELECT 1/0").is_err());
    SessionGuard::unlock(guard).expect("unlock after a failed transaction");
}

/// The check for a transaction left open compares the timestamps with `pg_catalog`'s own
/// operator: one on the `search_path` before `pg_catalog` cannot stand in.
#[test]
fn a_search_path_operator_cannot_turn_the_open_transaction_check_off() {
    let key = unique_key!();
    let mut admin = admin();
    admin
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS pglock_test_hostile; \
             CREATE OR REPLACE FUNCTION pglock_test_hostile.never(timestamptz, timestamptz) \
             RETURNS bool LANGUAGE sql IMMUTABLE AS 'SELECT false'; \
             DROP OPERATOR IF EXISTS pglock_test_hostile.< (timestamptz, timestamptz); \
             DROP OPERATOR IF EXISTS pglock_test_hostile.<> (timestamptz, timestamptz); \
             CREATE OPERATOR pglock_test_hostile.< (LEFTARG = timestamptz, \
             RIGHTARG = timestamptz, FUNCTION = pglock_test_hostile.never); \
             CREATE OPERATOR pglock_test_hostile.<> (LEFTARG = timestamptz, \
             RIGHTARG = timestamptz, FUNCTION = pglock_test_hostile.never)",
        )
        .unwrap();
    let mut config = common::config();
    config.options("-c search_path=pglock_test_hostile,pg_catalog,public");
    let pool = common::pool_with(1, config);
    let opened = "BEGIN; CREATE TEMP TABLE pglock_came_open (x int)";
    let pid = common::leave_open(&pool, opened);
    let mut lock = SessionLock::new(&pool, key.clone()).unwrap();
    let refused = lock.try_lock().map(|_| ());
    common::assert_refused_inside_transaction(&mut admin, &key, pid, opened, refused);
}

#[test]
fn a_transaction_left_open_in_the_critical_section_is_rolled_back_and_reported() {
    let key = unique_key!();
    let pool = pool(1);
    let mut admin = admin();
    let mut lock = SessionLock::new(&pool, key.clone()).unwrap();

    let mut guard = lock.lock().unwrap();
    let pid = backend_pid(&mut guard);
    guard
        .batch_execute("BEGIN; CREATE TEMP TABLE pglock_left_open (x int)")
        .unwrap();
    // Its work is lost, and the caller is told so; the lock is released all the same.
    let err = SessionGuard::unlock(guard).unwrap_err();
    assert!(matches!(err, Error::TransactionLeftOpen { .. }), "{err:?}");
    assert_eq!(
        common::backend_state(&mut admin, pid).as_deref(),
        Some("idle")
    );
    assert_eq!(holders(&mut admin, &key), 0);

    // A failed transaction left open: the unlock rolls it back and still unlocks.
    let mut guard = lock.lock().unwrap();
    guard.batch_execute("BEGIN").unwrap();
    assert!(guard.batch_execute("SELECT 1/0").is_err());
    SessionGuard::unlock(guard).expect("unlock inside a failed transaction");
    assert_eq!(
        common::backend_state(&mut admin, pid).as_deref(),
        Some("idle")
    );
    assert_eq!(holders(&mut admin, &key), 0);
}

#[test]
fn a_transaction_left_open_after_deallocate_all_is_still_reported() {
    // pglock's own statements must not turn a healthy transaction left open into a
    // failed one that it then rolls back without a word: not when the critical section
    // dropped pglock's prepared statements, and not when an earlier unlock could not
    // prepare its statement (inside a failed transaction).
    let key = unique_key!();
    let pool = pool(1);
    let mut admin = admin();
    common::fresh_table(&mut admin, "pglock_left_open_after_deallocate");
    let mut lock = SessionLock::new(&pool, key.clone()).unwrap();

    // The first unlock meets a failed transaction: its PREPARE cannot take.
    lock.with_lock(|conn| -> Result<(), Error> {
        conn.batch_execute("BEGIN").unwrap();
        assert!(conn.batch_execute("SELECT 1/0").is_err());
        Ok(())
    })
    .expect("a failed transaction left open is rolled back; its error was seen");
    // Next, a healthy transaction left open.
    let result = lock.with_lock(|conn| -> Result<(), Error> {
        conn.batch_execute("BEGIN; INSERT INTO pglock_left_open_after_deallocate VALUES (1)")
            .unwrap();
        Ok(())
    });
    assert!(
        matches!(result, Err(Error::TransactionLeftOpen { .. })),
        "{result:?}"
    );
    // Now with pglock's prepared statements dropped inside the critical section.
    lock.with_lock(|_| Ok::<_, Error>(())).unwrap();
    let result = lock.with_lock(|conn| -> Result<(), Error> {
        conn.batch_execute(
            "DEALLOCATE ALL; BEGIN; INSERT INTO pglock_left_open_after_deallocate VALUES (2)",
        )
        .unwrap();
        Ok(())
    });
    assert!(
        matches!(result, Err(Error::TransactionLeftOpen { .. })),
        "{result:?}"
    );
    let rows: i64 = admin
        .query_one(
            "SELECT count(*) FROM pglock_left_open_after_deallocate",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "the work was rolled back (and reported)");
    assert_eq!(holders(&mut admin, &key), 0);
    lock.with_lock(|_| Ok::<_, Error>(())).unwrap();
}

#[test]
fn stacked_raw_locks_are_not_confused_with_the_guard() {
    // Raw advisory locks, on another session and on the lock's own connection (other
    // keys), are independent of pglock's: pglock's unlock releases its own level only.
    let key = unique_key!();
    let other = unique_key!("other");
    let pool = pool(2);
    let mut admin = admin();
    let args = |k: &LockKey| k.as_i64().unwrap();

    // A raw lock on another session excludes pglock, and pglock never releases it.
    let mut raw = pool.get().unwrap();
    raw.execute("SELECT pg_advisory_lock($1)", &[&args(&key)])
        .unwrap();
    let mut lock = SessionLock::new(&pool, key.clone()).unwrap();
    assert!(lock.try_lock().unwrap().is_none());
    raw.execute("SELECT pg_advisory_unlock($1)", &[&args(&key)])
        .unwrap();
    drop(raw);

    // Raw locks taken through the guard on other keys, one of them twice (stacked), stay
    // when pglock unlocks its own.
    let mut guard = lock.try_lock().unwrap().expect("free after the raw unlock");
    let pid = backend_pid(&mut guard);
    for _ in 0..2 {
        guard
            .execute("SELECT pg_advisory_lock($1)", &[&args(&other)])
            .unwrap();
    }
    SessionGuard::unlock(guard).unwrap();
    assert_eq!(holders(&mut admin, &key), 0);
    assert_eq!(
        locks_on(&mut admin, &other),
        vec![(pid, "ExclusiveLock".to_owned(), true)]
    );
    // Two levels: the first raw unlock leaves it held, the second frees it.
    let mut conn = lock.into_connection().unwrap();
    let unlock = |c: &mut postgres::Client| -> bool {
        c.query_one("SELECT pg_advisory_unlock($1)", &[&args(&other)])
            .unwrap()
            .get(0)
    };
    assert!(unlock(&mut conn));
    assert_eq!(holders(&mut admin, &other), 1);
    assert!(unlock(&mut conn));
    assert_eq!(holders(&mut admin, &other), 0);
}

#[test]
fn locks_and_handles_cross_threads() {
    fn assert_send<T: Send>() {}
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send::<SessionLock>();
    assert_send::<TxLock>();
    assert_send::<pglock::SessionGuard<'static>>();
    assert_send::<pglock::TxGuard<'static>>();
    assert_send_sync::<CancelHandle>();
    assert_send_sync::<Error>();

    // A lock made on one thread is used on another.
    let key = unique_key!();
    let pool = pool(1);
    let mut lock = SessionLock::new(&pool, key.clone()).unwrap();
    let held = thread::spawn(move || {
        let mut guard = lock.lock().unwrap();
        SessionGuard::is_held(&mut guard).unwrap()
    })
    .join()
    .unwrap();
    assert!(held);
}

#[test]
fn the_trait_drives_either_kind_of_lock() {
    fn count_under<L: Locker>(lock: &mut L) -> Result<i64, Error> {
        lock.with_lock(|conn| {
            Ok(conn
                .query_one("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()", &[])
                .unwrap()
                .get(0))
        })
    }
    let pool = pool(2);
    let mut session = SessionLock::new(&pool, unique_key!("session")).unwrap();
    let mut tx = TxLock::new(&pool, unique_key!("tx")).unwrap();
    assert_eq!(count_under(&mut session).unwrap(), 1);
    assert_eq!(count_under(&mut tx).unwrap(), 1);
    assert_eq!(Locker::key(&session), &unique_key!("session"));
}

#[test]
fn one_connection_serves_locks_on_many_keys() {
    let pool = pool(1);
    let mut admin = admin();
    let mut conn = pool.get().unwrap();
    let pid = backend_pid(&mut conn);
    for i in 0..5 {
        let key = unique_key!(i);
        let mut lock = SessionLock::from_connection(conn, key.clone(), LockOptions::new()).unwrap();
        let guard = lock.try_lock().unwrap().expect("free");
        assert_eq!(
            locks_on(&mut admin, &key),
            vec![(pid, "ExclusiveLock".to_owned(), true)]
        );
        drop(guard);
        conn = lock.into_connection().unwrap();
        assert_eq!(holders(&mut admin, &key), 0);
    }
}

#[test]
fn a_waiting_session_names_its_lock_in_pg_stat_activity() {
    let key = unique_key!();
    let pool = pool(4);
    let mut admin = admin();
    let mut holder = SessionLock::new(&pool, key.clone()).unwrap();
    let guard = holder.lock().unwrap();
    let expected = format!(
        "/* pglock: waits for advisory lock {} */",
        key.as_i64().unwrap()
    );
    let query_of = |admin: &mut postgres::Client, pid: i32| -> String {
        admin
            .query_one("SELECT query FROM pg_stat_activity WHERE pid = $1", &[&pid])
            .unwrap()
            .get(0)
    };
    // A transaction lock's wait, and a session lock's first wait (a batch).
    for transaction in [true, false] {
        let (_cancel, pid, _done) =
            common::spawn_waiter(&pool, &key, LockOptions::new(), transaction);
        wait_for_waiters(&mut admin, &key, 1);
        let query = query_of(&mut admin, pid);
        assert!(
            query.contains(&expected),
            "transaction={transaction}: {query}"
        );
        admin
            .execute("SELECT pg_terminate_backend($1)", &[&pid])
            .unwrap();
        common::wait_until("the waiter is gone", Duration::from_secs(10), || {
            common::waiters(&mut admin, &key) == 0
        });
    }
    // A session lock's later waits (a prepared statement's EXECUTE).
    let (pid_tx, pid_rx) = mpsc::channel();
    let (waiter_pool, waiter_key) = (pool.clone(), key.clone());
    let waiter = thread::spawn(move || {
        let mut lock = SessionLock::new(&waiter_pool, waiter_key).unwrap();
        assert!(lock.try_lock().unwrap().is_none()); // learns the settings
        pid_tx.send(()).unwrap();
        lock.lock().map(|_| ())
    });
    pid_rx.recv().unwrap();
    wait_for_waiters(&mut admin, &key, 1);
    let pid = common::locks_on(&mut admin, &key)
        .into_iter()
        .find(|l| !l.2)
        .unwrap()
        .0;
    let query = query_of(&mut admin, pid);
    assert!(query.contains(&expected), "prepared wait: {query}");
    assert!(query.contains("EXECUTE"), "{query}");
    SessionGuard::unlock(guard).unwrap();
    waiter.join().unwrap().unwrap();
}
