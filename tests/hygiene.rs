//! Pool hygiene: no path returns a connection to the pool holding an advisory lock, an
//! open transaction or a changed setting. Each path runs on a pool of one connection,
//! which is then checked out again and inspected.

mod common;

use std::time::Duration;

use common::{admin, backend_pid, pool, pool_with, wait_for_waiters, Pool};
use pglock::{Error, LockKey, LockOptions, SessionGuard, SessionLock, TxGuard, TxLock};

/// A pool of one connection whose settings differ from every value pglock sets, so a
/// leaked `SET` shows.
fn pool_of_one() -> Pool {
    let mut config = common::config();
    config.options("-c statement_timeout=5s -c lock_timeout=4s");
    pool_with(1, config)
}

/// Checks the pool's only connection out and looks at it.
fn assert_clean(pool: &Pool, path: &str) {
    let mut conn = pool
        .get()
        .unwrap_or_else(|e| panic!("{path}: checkout: {e}"));
    // Simple protocol, as pglock uses: in one Query message, `now()` (the transaction's
    // start) equals `statement_timestamp()` unless a transaction was already open.
    let messages = conn
        .simple_query(
            "SELECT (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
                     AND pid = pg_backend_pid()), \
                    now() < statement_timestamp(), \
                    current_setting('lock_timeout'), current_setting('statement_timeout'), \
                    COALESCE(current_setting('pglock.session_lock', true), '')",
        )
        .unwrap_or_else(|e| panic!("{path}: the connection is not usable: {e:?}"));
    let row = messages
        .iter()
        .find_map(|m| match m {
            postgres::SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .expect("a row");
    let locks: i64 = row.get(0).unwrap().parse().unwrap();
    let in_transaction = row.get(1) == Some("t");
    let (lock_timeout, statement_timeout) = (row.get(2).unwrap(), row.get(3).unwrap());
    assert_eq!(locks, 0, "{path}: the connection holds advisory locks");
    assert!(
        !in_transaction,
        "{path}: the connection is inside a transaction"
    );
    assert_eq!(lock_timeout, "4s", "{path}: lock_timeout changed");
    assert_eq!(statement_timeout, "5s", "{path}: statement_timeout changed");
    // A marker left behind would make the next session lock on this connection fail.
    assert_eq!(
        row.get(4),
        Some(""),
        "{path}: a session lock marker was left"
    );
}

/// Holds `key` on another pool while `f` runs.
fn while_held<R>(key: &LockKey, f: impl FnOnce() -> R) -> R {
    let other = pool(1);
    let mut holder = SessionLock::new(&other, key.clone()).unwrap();
    let _held = holder.lock().unwrap();
    f()
}

/// Runs a blocking `lock()` in a thread and cancels it once it is queued on the server.
fn cancel_a_wait(pool: &Pool, key: &LockKey, transaction: bool) -> Error {
    let (handle, _pid, done) = common::spawn_waiter(pool, key, LockOptions::new(), transaction);
    wait_for_waiters(&mut admin(), key, 1);
    handle.cancel().unwrap();
    done.recv_timeout(Duration::from_secs(10))
        .expect("the cancelled waiter did not return")
        .unwrap_err()
}

fn bounded() -> LockOptions {
    LockOptions::new().lock_timeout(Duration::from_millis(100))
}

#[test]
fn session_lock_paths_leave_the_connection_clean() {
    let pool = pool_of_one();
    let key = unique_key!();

    let mut lock = SessionLock::new(&pool, key.clone()).unwrap();
    SessionGuard::unlock(lock.lock().unwrap()).unwrap();
    drop(lock);
    assert_clean(&pool, "lock and unlock");

    let mut lock = SessionLock::new(&pool, key.clone()).unwrap();
    drop(lock.try_lock().unwrap().expect("free"));
    drop(lock);
    assert_clean(&pool, "try_lock and drop");

    while_held(&key, || {
        let mut lock = SessionLock::with_options(&pool, key.clone(), bounded()).unwrap();
        assert!(lock.try_lock().unwrap().is_none());
        assert!(matches!(lock.lock(), Err(Error::Timeout { .. })));
        assert!(lock
            .try_lock_for(Duration::from_millis(50))
            .unwrap()
            .is_none());
    });
    assert_clean(&pool, "busy try and timeouts");

    let err = while_held(&key, || cancel_a_wait(&pool, &key, false));
    assert!(matches!(err, Error::Cancelled { .. }), "{err:?}");
    assert_clean(&pool, "cancelled wait");

    let mut lock = SessionLock::new(&pool, key.clone()).unwrap();
    let result = lock.with_lock(|_| -> Result<(), Error> {
        Err(Error::InvalidArgument {
            key: key.clone(),
            message: "the work failed".into(),
        })
    });
    assert!(result.is_err());
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = lock.with_lock(|_| -> Result<(), Error> { panic!("work panicked") });
    }));
    assert!(panicked.is_err());
    drop(lock);
    assert_clean(&pool, "with_lock Err and panic");

    let mut lock = SessionLock::new(&pool, key.clone()).unwrap();
    let mut guard = lock.lock().unwrap();
    guard
        .batch_execute("BEGIN; SET LOCAL lock_timeout = 1; SELECT 1/0")
        .unwrap_err();
    drop(guard);
    drop(lock);
    assert_clean(&pool, "failed transaction left open");

    let mut lock = SessionLock::new(&pool, key.clone()).unwrap();
    let mut guard = lock.lock().unwrap();
    guard
        .batch_execute("SELECT pg_advisory_unlock_all()")
        .unwrap();
    assert!(matches!(
        SessionGuard::unlock(guard),
        Err(Error::LockLost { .. })
    ));
    drop(lock);
    assert_clean(&pool, "lock lost before unlock");

    let mut lock = SessionLock::new(&pool, key.clone()).unwrap();
    let mut guard = lock.lock().unwrap();
    let pid = backend_pid(&mut guard);
    admin()
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap();
    assert!(SessionGuard::unlock(guard).is_err());
    drop(lock);
    assert_clean(&pool, "session terminated while held");

    let mut lock = SessionLock::new(&pool, key.clone()).unwrap();
    std::mem::forget(lock.lock().unwrap());
    drop(lock);
    assert_clean(&pool, "guard leaked with mem::forget");

    let mut lock = SessionLock::new(&pool, key.clone()).unwrap();
    std::mem::forget(lock.lock().unwrap());
    drop(lock.into_connection().unwrap());
    assert_clean(&pool, "guard leaked, then into_connection");

    let mut lock = SessionLock::new(&pool, key.clone()).unwrap();
    std::mem::forget(lock.lock().unwrap());
    let guard = lock.lock().expect("lock again after a leaked guard");
    SessionGuard::unlock(guard).unwrap();
    drop(lock);
    assert_clean(&pool, "guard leaked, then locked and unlocked again");
}

#[test]
fn transaction_lock_paths_leave_the_connection_clean() {
    let pool = pool_of_one();
    let key = unique_key!();

    let mut lock = TxLock::new(&pool, key.clone()).unwrap();
    TxGuard::commit(lock.lock().unwrap()).unwrap();
    TxGuard::rollback(lock.lock().unwrap()).unwrap();
    drop(lock.try_lock().unwrap().expect("free"));
    drop(lock);
    assert_clean(&pool, "commit, rollback, drop");

    while_held(&key, || {
        let mut lock = TxLock::with_options(&pool, key.clone(), bounded()).unwrap();
        assert!(lock.try_lock().unwrap().is_none());
        assert!(matches!(lock.lock(), Err(Error::Timeout { .. })));
        assert!(lock
            .try_lock_for(Duration::from_millis(50))
            .unwrap()
            .is_none());
    });
    assert_clean(&pool, "busy try and timeouts");

    let err = while_held(&key, || cancel_a_wait(&pool, &key, true));
    assert!(matches!(err, Error::Cancelled { .. }), "{err:?}");
    assert_clean(&pool, "cancelled wait");

    let mut lock = TxLock::new(&pool, key.clone()).unwrap();
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = lock.with_lock(|_| -> Result<(), Error> { panic!("work panicked") });
    }));
    assert!(panicked.is_err());
    let mut guard = lock.lock().unwrap();
    guard.batch_execute("SELECT 1/0").unwrap_err();
    assert!(TxGuard::commit(guard).is_err());
    let mut guard = lock.lock().unwrap();
    guard.batch_execute("COMMIT").unwrap();
    assert!(matches!(
        TxGuard::commit(guard),
        Err(Error::LockLost { .. })
    ));
    drop(lock);
    assert_clean(&pool, "panic, failed statement, early commit");

    let mut lock = TxLock::new(&pool, key.clone()).unwrap();
    let mut guard = lock.lock().unwrap();
    let pid = backend_pid(&mut guard);
    admin()
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap();
    assert!(TxGuard::commit(guard).is_err());
    drop(lock);
    assert_clean(&pool, "session terminated while held");

    let mut lock = TxLock::new(&pool, key.clone()).unwrap();
    std::mem::forget(lock.lock().unwrap());
    drop(lock);
    assert_clean(&pool, "guard leaked with mem::forget");

    let mut lock = TxLock::new(&pool, key.clone()).unwrap();
    std::mem::forget(lock.lock().unwrap());
    drop(lock.into_connection().unwrap());
    assert_clean(&pool, "guard leaked, then into_connection");

    let mut lock = TxLock::new(&pool, key.clone()).unwrap();
    std::mem::forget(lock.lock().unwrap());
    let guard = lock.lock().expect("lock again after a leaked guard");
    TxGuard::commit(guard).unwrap();
    drop(lock);
    assert_clean(&pool, "guard leaked, then locked and committed again");
}

#[test]
fn prepared_statements_that_vanish_are_prepared_again() {
    // A critical section that deallocates the session's prepared statements (DEALLOCATE
    // ALL; DISCARD ALL also drops the lock itself) takes nothing from pglock's correctness:
    // the unlock falls back to the unprepared statement, and the next calls prepare anew.
    let key = unique_key!();
    let pool = pool_of_one();
    let mut admin = admin();
    let mut lock = SessionLock::new(&pool, key.clone()).unwrap();
    for round in 0..3 {
        let mut guard = lock.lock().unwrap();
        guard.batch_execute("DEALLOCATE ALL").unwrap();
        SessionGuard::unlock(guard).unwrap_or_else(|e| panic!("round {round}: {e:?}"));
        assert_eq!(common::holders(&mut admin, &key), 0, "round {round}");
        assert!(lock.try_lock().unwrap().is_some(), "round {round}");
    }
    // DISCARD ALL ends the lock behind pglock's back: reported, and nothing stays.
    let mut guard = lock.lock().unwrap();
    guard.batch_execute("DISCARD ALL").unwrap();
    let err = SessionGuard::unlock(guard).unwrap_err();
    assert!(matches!(err, Error::LockLost { .. }), "{err:?}");
    assert!(lock.try_lock().unwrap().is_some(), "usable again");
    drop(lock);
    assert_clean(&pool, "after DEALLOCATE ALL and DISCARD ALL");
}
