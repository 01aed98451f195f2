//! `TxLock` semantics against the real server: the lock and the work share one
//! transaction, which commits on success and rolls back otherwise.

mod common;

use std::time::Duration;

use common::{admin, backend_pid, backend_state, holders, pool, pool_with, wait_for_waiters};
use pglock::{Error, LockOptions, LostReason, TxGuard, TxLock};
use postgres::Client;

fn rows(admin: &mut Client, name: &str) -> i64 {
    admin
        .query_one(&format!("SELECT count(*) FROM {name}"), &[])
        .unwrap()
        .get(0)
}

#[test]
fn commit_publishes_the_work_and_frees_the_lock_at_once() {
    let key = unique_key!();
    let pool = pool(1);
    let mut admin = admin();
    common::fresh_table(&mut admin, "pglock_tx_commit");
    let mut lock = TxLock::new(&pool, key.clone()).unwrap();

    let mut guard = lock.lock().unwrap();
    let pid = backend_pid(&mut guard);
    guard
        .execute("INSERT INTO pglock_tx_commit VALUES (1)", &[])
        .unwrap();
    assert_eq!(
        rows(&mut admin, "pglock_tx_commit"),
        0,
        "visible before commit"
    );
    assert_eq!(holders(&mut admin, &key), 1);
    assert_eq!(
        backend_state(&mut admin, pid).as_deref(),
        Some("idle in transaction")
    );
    TxGuard::commit(guard).unwrap();
    assert_eq!(rows(&mut admin, "pglock_tx_commit"), 1);
    assert_eq!(holders(&mut admin, &key), 0);
    assert_eq!(backend_state(&mut admin, pid).as_deref(), Some("idle"));
}

#[test]
fn rollback_and_drop_undo_the_work_and_free_the_lock() {
    let key = unique_key!();
    let pool = pool(1);
    let mut admin = admin();
    common::fresh_table(&mut admin, "pglock_tx_rollback");
    let mut lock = TxLock::new(&pool, key.clone()).unwrap();

    let mut guard = lock.lock().unwrap();
    guard
        .execute("INSERT INTO pglock_tx_rollback VALUES (1)", &[])
        .unwrap();
    TxGuard::rollback(guard).unwrap();
    assert_eq!(holders(&mut admin, &key), 0);

    let mut guard = lock.lock().unwrap();
    guard
        .execute("INSERT INTO pglock_tx_rollback VALUES (2)", &[])
        .unwrap();
    drop(guard);
    assert_eq!(holders(&mut admin, &key), 0);
    assert_eq!(rows(&mut admin, "pglock_tx_rollback"), 0);
}

#[test]
fn with_lock_commits_on_ok_and_rolls_back_on_err_and_panic() {
    let key = unique_key!();
    let pool = pool(1);
    let mut admin = admin();
    common::fresh_table(&mut admin, "pglock_tx_with_lock");
    let mut lock = TxLock::new(&pool, key.clone()).unwrap();

    lock.with_lock(|tx| -> Result<(), Error> {
        tx.execute("INSERT INTO pglock_tx_with_lock VALUES (1)", &[])
            .unwrap();
        Ok(())
    })
    .unwrap();
    assert_eq!(rows(&mut admin, "pglock_tx_with_lock"), 1);

    let err = lock
        .with_lock(|tx| -> Result<(), Box<dyn std::error::Error>> {
            tx.execute("INSERT INTO pglock_tx_with_lock VALUES (2)", &[])?;
            Err("changed my mind".into())
        })
        .unwrap_err();
    assert_eq!(err.to_string(), "changed my mind");
    assert_eq!(rows(&mut admin, "pglock_tx_with_lock"), 1, "Err committed");

    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = lock.with_lock(|tx| -> Result<(), Error> {
            tx.execute("INSERT INTO pglock_tx_with_lock VALUES (3)", &[])
                .unwrap();
            panic!("in the critical section")
        });
    }));
    assert!(panicked.is_err());
    assert_eq!(
        rows(&mut admin, "pglock_tx_with_lock"),
        1,
        "a panic committed"
    );
    assert_eq!(holders(&mut admin, &key), 0);
}

#[test]
fn a_busy_try_leaves_no_transaction_open() {
    let key = unique_key!();
    let pool = pool(2);
    let mut admin = admin();
    let mut a = TxLock::new(&pool, key.clone()).unwrap();
    let mut conn = pool.get().unwrap();
    let b_pid = backend_pid(&mut conn);
    let mut b = TxLock::from_connection(conn, key.clone(), LockOptions::new()).unwrap();
    let _held = a.lock().unwrap();
    assert!(b.try_lock().unwrap().is_none());
    assert_eq!(backend_state(&mut admin, b_pid).as_deref(), Some("idle"));
    assert!(b.try_lock_for(Duration::from_millis(50)).unwrap().is_none());
    assert_eq!(backend_state(&mut admin, b_pid).as_deref(), Some("idle"));
    let poll = LockOptions::new().wait_mode(pglock::WaitMode::poll());
    drop(b);
    let mut conn = pool.get().unwrap();
    let c_pid = backend_pid(&mut conn);
    let mut c = TxLock::from_connection(conn, key.clone(), poll).unwrap();
    assert!(c.try_lock_for(Duration::from_millis(50)).unwrap().is_none());
    assert_eq!(backend_state(&mut admin, c_pid).as_deref(), Some("idle"));
}

#[test]
fn blocked_waiter_wakes_when_the_holder_commits() {
    let key = unique_key!();
    let pool = pool(2);
    let mut admin = admin();
    let mut holder = TxLock::new(&pool, key.clone()).unwrap();
    let guard = holder.lock().unwrap();

    let (_cancel, _pid, done) = common::spawn_waiter(&pool, &key, LockOptions::new(), true);
    wait_for_waiters(&mut admin, &key, 1);
    TxGuard::commit(guard).unwrap();
    done.recv_timeout(Duration::from_secs(10))
        .expect("the waiter was not woken")
        .unwrap();
}

#[test]
fn a_transaction_ended_inside_the_critical_section_is_reported_lost() {
    let key = unique_key!();
    let pool = pool(1);
    let mut admin = admin();
    let mut lock = TxLock::new(&pool, key.clone()).unwrap();

    // SQL that carries its own COMMIT ends the lock's transaction, and the lock with it.
    let mut guard = lock.lock().unwrap();
    guard.batch_execute("COMMIT").unwrap();
    assert_eq!(holders(&mut admin, &key), 0);
    assert!(!TxGuard::is_held(&mut guard).unwrap());
    let err = TxGuard::commit(guard).unwrap_err();
    assert!(
        matches!(
            err,
            Error::LockLost {
                reason: LostReason::TransactionEnded,
                ..
            }
        ),
        "{err:?}"
    );

    // The same when a new transaction was begun after it: the stamp tells them apart.
    let mut guard = lock.lock().unwrap();
    guard.batch_execute("COMMIT; BEGIN").unwrap();
    let err = TxGuard::commit(guard).unwrap_err();
    assert!(matches!(err, Error::LockLost { .. }), "{err:?}");
    assert!(
        lock.try_lock().unwrap().is_some(),
        "the lock is usable again"
    );
}

#[test]
fn a_failed_statement_makes_commit_fail_and_roll_back() {
    let key = unique_key!();
    let pool = pool(1);
    let mut admin = admin();
    let mut lock = TxLock::new(&pool, key.clone()).unwrap();

    let mut guard = lock.lock().unwrap();
    let pid = backend_pid(&mut guard);
    assert!(guard.batch_execute("SELECT 1/0").is_err());
    let err = TxGuard::commit(guard).unwrap_err();
    assert_eq!(
        err.code(),
        Some(&postgres::error::SqlState::IN_FAILED_SQL_TRANSACTION),
        "{err:?}"
    );
    assert_eq!(backend_state(&mut admin, pid).as_deref(), Some("idle"));
    assert_eq!(holders(&mut admin, &key), 0);
}

#[test]
fn the_critical_section_sees_the_configured_timeouts() {
    // The wait lifts statement_timeout and sets lock_timeout; inside the transaction both
    // are back to the connection's configured values, and after it nothing is left set.
    let key = unique_key!();
    let mut config = common::config();
    config.options("-c statement_timeout=7s -c lock_timeout=3s");
    let pool = pool_with(1, config);
    let options = LockOptions::new().lock_timeout(Duration::from_millis(1234));
    let mut lock = TxLock::with_options(&pool, key, options).unwrap();
    let mut guard = lock.lock().unwrap();
    let show = |c: &mut Client, what: &str| -> String {
        c.query_one(&format!("SHOW {what}"), &[]).unwrap().get(0)
    };
    assert_eq!(show(&mut guard, "statement_timeout"), "7s");
    assert_eq!(show(&mut guard, "lock_timeout"), "3s");
    TxGuard::commit(guard).unwrap();
    drop(lock);
    let mut conn = pool.get().unwrap();
    assert_eq!(show(&mut conn, "statement_timeout"), "7s");
    assert_eq!(show(&mut conn, "lock_timeout"), "3s");
}

#[test]
fn a_terminated_session_is_reported_lost() {
    let key = unique_key!();
    let pool = pool(1);
    let mut admin = admin();
    let mut lock = TxLock::new(&pool, key.clone()).unwrap();
    let mut guard = lock.lock().unwrap();
    assert!(TxGuard::is_held(&mut guard).unwrap());
    let pid = backend_pid(&mut guard);
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap();
    common::wait_until("the session is gone", Duration::from_secs(10), || {
        backend_state(&mut admin, pid).is_none()
    });
    assert!(!TxGuard::is_held(&mut guard).unwrap());
    let err = TxGuard::commit(guard).unwrap_err();
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
    assert_eq!(holders(&mut admin, &key), 0);
}
