//! Cancelling a blocked wait from another thread, and deadlocks: the waiter gets a typed
//! error and holds nothing.

mod common;

use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    admin, advisory_locks_of, backend_pid, holders, pool, spawn_waiter, wait_for_waiters, waiters,
};
use pglock::{Error, LockOptions, SessionLock, WaitMode};

#[test]
fn cancelling_a_server_wait_returns_cancelled_and_holds_nothing() {
    for transaction in [false, true] {
        let key = unique_key!(transaction);
        let pool = pool(2);
        let mut admin = admin();
        let mut holder = SessionLock::new(&pool, key.clone()).unwrap();
        let _held = holder.lock().unwrap();

        let (cancel, pid, done) = spawn_waiter(&pool, &key, LockOptions::new(), transaction);
        wait_for_waiters(&mut admin, &key, 1);
        cancel.cancel().unwrap();
        let err = done
            .recv_timeout(Duration::from_secs(10))
            .expect("the cancelled waiter did not return")
            .unwrap_err();
        assert!(
            matches!(&err, Error::Cancelled { key: k } if k == &key),
            "{err:?}"
        );
        assert!(cancel.is_cancelled());
        assert_eq!(waiters(&mut admin, &key), 0);
        assert_eq!(holders(&mut admin, &key), 1, "only the holder");
        // A cancel request was sent to the waiter's session, so pglock ended it rather
        // than trust it: it holds nothing and the pool will not reuse it.
        common::wait_until("the waiter's session ends", Duration::from_secs(10), || {
            common::backend_state(&mut admin, pid).is_none()
        });
        assert_eq!(advisory_locks_of(&mut admin, pid), 0);
    }
}

#[test]
fn cancelling_a_poll_wait_wakes_it_without_a_cancel_request() {
    let key = unique_key!();
    let pool = pool(2);
    let mut admin = admin();
    let mut holder = SessionLock::new(&pool, key.clone()).unwrap();
    let _held = holder.lock().unwrap();

    let options = LockOptions::new().wait_mode(WaitMode::Poll {
        min_interval: Duration::from_secs(60),
        max_interval: Duration::from_secs(60),
    });
    let (cancel, pid, done) = spawn_waiter(&pool, &key, options, false);
    // The first try has failed once the waiter's session is idle and not queued.
    common::wait_until("the poller sleeps", Duration::from_secs(10), || {
        common::backend_state(&mut admin, pid).as_deref() == Some("idle")
            && admin
                .query_one(
                    "SELECT query LIKE '%pg_try_advisory_lock%' FROM pg_stat_activity WHERE pid = $1",
                    &[&pid],
                )
                .unwrap()
                .get::<_, bool>(0)
    });
    let start = Instant::now();
    cancel.cancel().unwrap();
    let err = done
        .recv_timeout(Duration::from_secs(10))
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, Error::Cancelled { .. }), "{err:?}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "woke after {:?}",
        start.elapsed()
    );
    // No cancel request was needed: the session is alive, idle and holds nothing.
    assert_eq!(
        common::backend_state(&mut admin, pid).as_deref(),
        Some("idle")
    );
    assert_eq!(advisory_locks_of(&mut admin, pid), 0);
}

#[test]
fn cancellation_is_sticky() {
    let key = unique_key!();
    let pool = pool(1);
    let mut lock = SessionLock::new(&pool, key.clone()).unwrap();
    let handle = lock.cancel_handle();
    assert!(!handle.is_cancelled());
    handle.cancel().unwrap(); // no wait in progress: nothing to send
    assert!(matches!(lock.try_lock(), Err(Error::Cancelled { .. })));
    assert!(matches!(lock.lock(), Err(Error::Cancelled { .. })));
    assert!(matches!(
        lock.try_lock_for(Duration::from_secs(1)),
        Err(Error::Cancelled { .. })
    ));
    assert_eq!(holders(&mut admin(), &key), 0);
}

#[test]
fn cancel_racing_a_release_never_leaves_a_lock_behind() {
    // The holder releases at the instant the waiter is cancelled: the server may grant the
    // lock as the cancel arrives. Whatever the waiter returns must be the truth: a guard
    // that holds the lock, or `Cancelled` with nothing held.
    let key = unique_key!();
    let pool = pool(2);
    let mut admin = admin();
    let mut holder = SessionLock::new(&pool, key.clone()).unwrap();
    let (mut granted, mut cancelled) = (0, 0);
    for round in 0..20 {
        let guard = holder.lock().unwrap();
        let (result_tx, result_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let (handle_tx, handle_rx) = mpsc::channel();
        let waiter_pool = pool.clone();
        let waiter_key = key.clone();
        let waiter = thread::spawn(move || {
            let mut conn = waiter_pool.get().unwrap();
            let pid = backend_pid(&mut conn);
            let mut lock =
                SessionLock::from_connection(conn, waiter_key, LockOptions::new()).unwrap();
            handle_tx.send(lock.cancel_handle()).unwrap();
            match lock.lock() {
                Ok(guard) => {
                    result_tx.send((Ok(()), pid)).unwrap();
                    release_rx.recv().unwrap(); // hold until checked
                    drop(guard);
                }
                Err(e) => result_tx.send((Err(e), pid)).unwrap(),
            };
        });
        let handle = handle_rx.recv().unwrap();
        wait_for_waiters(&mut admin, &key, 1);
        let barrier = Arc::new(Barrier::new(2));
        let canceller_barrier = Arc::clone(&barrier);
        let canceller = thread::spawn(move || {
            canceller_barrier.wait();
            handle.cancel()
        });
        barrier.wait();
        drop(guard);
        canceller.join().unwrap().unwrap();
        let (result, pid) = result_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        match result {
            Ok(()) => {
                granted += 1;
                assert_eq!(
                    common::locks_on(&mut admin, &key),
                    vec![(pid, "ExclusiveLock".to_owned(), true)],
                    "round {round}: a granted guard must hold the lock"
                );
                release_tx.send(()).unwrap();
            }
            Err(Error::Cancelled { .. }) => {
                cancelled += 1;
                assert_eq!(
                    advisory_locks_of(&mut admin, pid),
                    0,
                    "round {round}: a cancelled waiter holds a lock"
                );
            }
            Err(e) => panic!("round {round}: {e:?}"),
        }
        waiter.join().unwrap();
        common::wait_until("the key is free", Duration::from_secs(10), || {
            holders(&mut admin, &key) == 0
        });
    }
    eprintln!("granted {granted}, cancelled {cancelled}");
    // Every round ended in one of the two truthful outcomes, checked against the server
    // (any other ending panicked above). Which one the race picks is the server's choice,
    // so neither count is asserted; both branches are also forced deterministically in
    // `cancelling_a_server_wait_returns_cancelled_and_holds_nothing` (cancel first) and
    // `tests/recovery.rs` (granted after the cancel).
    assert_eq!(granted + cancelled, 20);
}

#[test]
fn a_server_wait_that_deadlocks_with_create_index_concurrently_is_told_so() {
    // The deadlock migration runners meet: the holder builds an index concurrently, which
    // waits for every older snapshot, including that of the session waiting for the lock,
    // which waits for the holder. The server detects it after deadlock_timeout, and the
    // waiter (whose timer started first) gets the error.
    let key = unique_key!();
    let pool = pool(2);
    let mut admin = admin();
    common::fresh_table(&mut admin, "pglock_cic_deadlock");
    let mut holder = SessionLock::new(&pool, key.clone()).unwrap();
    let mut guard = holder.lock().unwrap();

    let (_cancel, pid, done) = spawn_waiter(&pool, &key, LockOptions::new(), false);
    wait_for_waiters(&mut admin, &key, 1);
    guard
        .batch_execute("CREATE INDEX CONCURRENTLY ON pglock_cic_deadlock (x)")
        .expect("the index build goes on once the waiter is aborted");
    let err = done
        .recv_timeout(Duration::from_secs(30))
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(&err, Error::Deadlock { key: k, .. } if k == &key),
        "{err:?}"
    );
    assert_eq!(
        err.code(),
        Some(&postgres::error::SqlState::T_R_DEADLOCK_DETECTED)
    );
    assert_eq!(
        advisory_locks_of(&mut admin, pid),
        0,
        "the loser holds nothing"
    );
    assert_eq!(holders(&mut admin, &key), 1);
}

#[test]
fn a_polling_waiter_lets_create_index_concurrently_finish() {
    let key = unique_key!();
    let pool = pool(2);
    let mut admin = admin();
    common::fresh_table(&mut admin, "pglock_cic_poll");
    let mut holder = SessionLock::new(&pool, key.clone()).unwrap();
    let mut guard = holder.lock().unwrap();

    let options = LockOptions::new().wait_mode(WaitMode::Poll {
        min_interval: Duration::from_millis(5),
        max_interval: Duration::from_millis(50),
    });
    let (_cancel, pid, done) = spawn_waiter(&pool, &key, options, false);
    common::wait_until("the poller has tried once", Duration::from_secs(10), || {
        admin
            .query_opt(
                // The first try PREPAREs its statement (its text names the function);
                // the next ones only EXECUTE it: either shows a try was made.
                "SELECT 1 FROM pg_stat_activity WHERE pid = $1 \
                 AND (query LIKE '%pg_try_advisory_lock%' OR query LIKE '%EXECUTE pglock_%')",
                &[&pid],
            )
            .unwrap()
            .is_some()
    });
    guard
        .batch_execute("CREATE INDEX CONCURRENTLY ON pglock_cic_poll (x)")
        .expect("no deadlock with a polling waiter");
    assert!(done.try_recv().is_err(), "the poller got a held lock");
    drop(guard);
    done.recv_timeout(Duration::from_secs(10))
        .expect("the poller did not get the freed lock")
        .unwrap();
}
