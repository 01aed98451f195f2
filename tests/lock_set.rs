//! `LockSet` against a real server: all or nothing, overlapping sets in opposite orders
//! never deadlock or overlap, a timed-out or cancelled wait holds nothing, bad input is
//! refused, and no path leaves anything on the pooled connection.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    admin, advisory_locks_of, assert_pool_clean, holders, pool, pool_of_one_with_settings,
    wait_for_waiters,
};
use pglock::{Error, LockKey, LockMode, LockOptions, LockSet, LockSetGuard, SessionLock};

#[test]
fn try_lock_takes_all_or_none_in_one_statement() {
    let (a, b, c) = (unique_key!("a"), unique_key!("b"), unique_key!("c"));
    let pool = pool(2);
    let mut admin = admin();
    let mut set = LockSet::new(&pool, [c.clone(), a.clone(), b.clone()]).unwrap();
    let mut sorted = [a.clone(), b.clone(), c.clone()];
    sorted.sort_by_key(|k| (k.objsubid(), k.classid(), k.objid()));
    assert_eq!(set.keys(), &sorted[..], "canonical order");

    let mut other = SessionLock::new(&pool, b.clone()).unwrap();
    let held = other.lock().unwrap();
    assert!(set.try_lock().unwrap().is_none());
    for k in [&a, &b, &c] {
        let expected = usize::from(k == &b);
        assert_eq!(holders(&mut admin, k), expected, "{k} after a busy try");
    }
    drop(held);
    let mut guard = set.try_lock().unwrap().expect("all free");
    assert!(LockSetGuard::is_held(&mut guard).unwrap());
    for k in [&a, &b, &c] {
        assert_eq!(holders(&mut admin, k), 1, "{k}");
    }
    assert!(other.try_lock().unwrap().is_none());
    LockSetGuard::unlock(guard).unwrap();
    for k in [&a, &b, &c] {
        assert_eq!(holders(&mut admin, k), 0, "{k} after unlock");
    }
}

#[test]
fn overlapping_sets_in_opposite_orders_never_deadlock_or_overlap() {
    const ROUNDS: usize = 200;
    let (k1, k2, k3, k4) = (
        unique_key!("1"),
        unique_key!("2"),
        unique_key!("3"),
        unique_key!("4"),
    );
    let pool = pool(2);
    let sets = [
        vec![k1.clone(), k2.clone(), k3.clone()],
        vec![k3.clone(), k2.clone(), k4.clone()],
    ];
    let inside = Arc::new(AtomicBool::new(false));
    let overlaps = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(2));
    let start = Instant::now();
    let handles: Vec<_> = sets
        .into_iter()
        .map(|keys| {
            let (pool, inside, overlaps, barrier) = (
                pool.clone(),
                Arc::clone(&inside),
                Arc::clone(&overlaps),
                Arc::clone(&barrier),
            );
            thread::spawn(move || {
                // Bounded, so a deadlock fails the test instead of hanging it.
                let options = LockOptions::new().lock_timeout(Duration::from_secs(30));
                let mut set = LockSet::with_options(&pool, keys, options).unwrap();
                barrier.wait();
                for _ in 0..ROUNDS {
                    set.with_lock(|_| -> Result<(), Error> {
                        if inside.swap(true, Ordering::SeqCst) {
                            overlaps.fetch_add(1, Ordering::SeqCst);
                        }
                        thread::yield_now();
                        inside.store(false, Ordering::SeqCst);
                        Ok(())
                    })
                    .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    eprintln!("2 threads x {ROUNDS} rounds in {:?}", start.elapsed());
    assert_eq!(overlaps.load(Ordering::SeqCst), 0, "two sets overlapped");
    let mut admin = admin();
    for k in [&k1, &k2, &k3, &k4] {
        assert_eq!(holders(&mut admin, k), 0, "{k}");
    }
}

#[test]
fn a_timed_out_lock_holds_nothing() {
    let (a, b, c) = (unique_key!("a"), unique_key!("b"), unique_key!("c"));
    let pool = pool(2);
    let mut admin = admin();
    // The last key in canonical order is busy: the wait takes the others first.
    let mut keys = vec![a.clone(), b.clone(), c.clone()];
    keys.sort_by_key(|k| (k.objsubid(), k.classid(), k.objid()));
    let busy = keys[2].clone();
    let mut other = SessionLock::new(&pool, busy.clone()).unwrap();
    let _held = other.lock().unwrap();

    let options = LockOptions::new().lock_timeout(Duration::from_millis(200));
    let mut set = LockSet::with_options(&pool, keys.clone(), options).unwrap();
    let start = Instant::now();
    let err = set.lock().unwrap_err();
    let took = start.elapsed();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(took >= Duration::from_millis(200), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(set
        .try_lock_for(Duration::from_millis(50))
        .unwrap()
        .is_none());
    for k in &keys[..2] {
        assert_eq!(holders(&mut admin, k), 0, "{k} held after the timeout");
    }
    assert_eq!(holders(&mut admin, &busy), 1, "only the other holder");
    drop(set);
    let pid = common::backend_pid(&mut pool.get().unwrap());
    assert_eq!(advisory_locks_of(&mut admin, pid), 0);
}

#[test]
fn a_cancelled_wait_holds_nothing() {
    let (a, b) = (unique_key!("a"), unique_key!("b"));
    let pool = pool(2);
    let mut admin = admin();
    let mut keys = vec![a.clone(), b.clone()];
    keys.sort_by_key(|k| (k.objsubid(), k.classid(), k.objid()));
    let mut other = SessionLock::new(&pool, keys[1].clone()).unwrap();
    let _held = other.lock().unwrap();
    let mut set = LockSet::new(&pool, keys.clone()).unwrap();
    let cancel = set.cancel_handle();
    let (tx, rx) = mpsc::channel();
    let waiter = thread::spawn(move || {
        tx.send(set.lock().map(|_| ())).unwrap();
    });
    wait_for_waiters(&mut admin, &keys[1], 1);
    assert_eq!(
        holders(&mut admin, &keys[0]),
        1,
        "the first key is taken while waiting"
    );
    cancel.cancel().unwrap();
    let result = rx.recv_timeout(Duration::from_secs(10)).expect("returned");
    assert!(matches!(result, Err(Error::Cancelled { .. })), "{result:?}");
    waiter.join().unwrap();
    assert_eq!(holders(&mut admin, &keys[0]), 0);
    assert_eq!(common::waiters(&mut admin, &keys[1]), 0);
}

#[test]
fn bad_input_is_an_invalid_argument() {
    let pool = pool(1);
    let a = unique_key!("a");
    let cases: Vec<(Vec<LockKey>, LockOptions, &str)> = vec![
        (vec![], LockOptions::new(), "empty"),
        (vec![a.clone(), a.clone()], LockOptions::new(), "duplicate"),
        (
            vec![LockKey::new(5), LockKey::pair(1, 2), LockKey::new(5)],
            LockOptions::new(),
            "duplicate, apart",
        ),
        (
            (0..=LockSet::MAX_KEYS as i64).map(LockKey::new).collect(),
            LockOptions::new(),
            "too many",
        ),
        (
            vec![a.clone()],
            LockOptions::new().mode(LockMode::Shared),
            "shared",
        ),
        (vec![LockKey::from_name("x\0y")], LockOptions::new(), "NUL"),
    ];
    for (keys, options, what) in cases {
        let err = LockSet::with_options(&pool, keys, options).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { .. }),
            "{what}: {err:?}"
        );
    }
    // Duplicate names are the same key however they are given.
    let name = a.name().unwrap().to_owned();
    let err = LockSet::new(&pool, [name.as_str(), name.as_str()]).unwrap_err();
    assert!(err.to_string().contains("twice"), "{err}");
}

#[test]
fn the_largest_set_locks_and_unlocks() {
    let pool = pool(1);
    let base = unique_key!().classid() as i32;
    let keys: Vec<LockKey> = (0..LockSet::MAX_KEYS as i32)
        .map(|i| LockKey::pair(base, i))
        .collect();
    let mut set = LockSet::new(&pool, keys.clone()).unwrap();
    let guard = set.try_lock().unwrap().expect("free");
    assert_eq!(holders(&mut admin(), &keys[LockSet::MAX_KEYS - 1]), 1);
    LockSetGuard::unlock(guard).unwrap();
    drop(set); // a pool of one
    let options = LockOptions::new().lock_timeout(Duration::from_secs(5));
    let mut set = LockSet::with_options(&pool, keys.clone(), options).unwrap();
    LockSetGuard::unlock(set.lock().unwrap()).unwrap();
    assert_eq!(holders(&mut admin(), &keys[0]), 0);
}

#[test]
fn every_path_leaves_the_pooled_connection_clean() {
    let (a, b) = (unique_key!("a"), unique_key!("b"));
    let keys = [a.clone(), b.clone()];
    let pool = pool_of_one_with_settings();
    let other = common::pool(1);

    let mut set = LockSet::new(&pool, keys.clone()).unwrap();
    LockSetGuard::unlock(set.lock().unwrap()).unwrap();
    drop(set.try_lock().unwrap().expect("free"));
    drop(set);
    assert_pool_clean(&pool, "lock, unlock, try_lock, drop");

    for poll in [false, true] {
        let mut holder = SessionLock::new(&other, b.clone()).unwrap();
        let _held = holder.lock().unwrap();
        let mut options = LockOptions::new().lock_timeout(Duration::from_millis(100));
        if poll {
            options = options.wait_mode(pglock::WaitMode::Poll {
                min_interval: Duration::from_millis(5),
                max_interval: Duration::from_millis(20),
            });
        }
        let mut set = LockSet::with_options(&pool, keys.clone(), options).unwrap();
        assert!(set.try_lock().unwrap().is_none());
        assert!(matches!(set.lock(), Err(Error::Timeout { .. })));
        assert!(set
            .try_lock_for(Duration::from_millis(50))
            .unwrap()
            .is_none());
        drop(set);
        assert_pool_clean(&pool, &format!("busy try and timeouts (poll: {poll})"));
    }

    let mut set = LockSet::new(&pool, keys.clone()).unwrap();
    let result = set.with_lock(|_| -> Result<(), Error> {
        Err(Error::Timeout {
            key: LockKey::new(0),
            waited: Duration::ZERO,
        })
    });
    assert!(result.is_err());
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = set.with_lock(|_| -> Result<(), Error> { panic!("work panicked") });
    }));
    assert!(panicked.is_err());
    drop(set);
    assert_pool_clean(&pool, "with_lock Err and panic");

    let mut set = LockSet::new(&pool, keys.clone()).unwrap();
    let mut guard = set.lock().unwrap();
    guard.batch_execute("BEGIN; SELECT 1/0").unwrap_err();
    LockSetGuard::unlock(guard).unwrap();
    let mut guard = set.lock().unwrap();
    guard
        .batch_execute("BEGIN; SET LOCAL lock_timeout = 1")
        .unwrap();
    let err = LockSetGuard::unlock(guard).unwrap_err();
    assert!(matches!(err, Error::TransactionLeftOpen { .. }), "{err:?}");
    let mut guard = set.lock().unwrap();
    guard
        .batch_execute("SELECT pg_advisory_unlock_all()")
        .unwrap();
    let err = LockSetGuard::unlock(guard).unwrap_err();
    assert!(matches!(err, Error::LockLost { .. }), "{err:?}");
    drop(set);
    assert_pool_clean(&pool, "transactions left open, locks lost");

    let mut set = LockSet::new(&pool, keys.clone()).unwrap();
    std::mem::forget(set.lock().unwrap());
    drop(set.lock().expect("lock again after a leaked guard"));
    std::mem::forget(set.lock().unwrap());
    drop(set);
    assert_pool_clean(&pool, "guards leaked with mem::forget");
}

#[test]
fn a_set_that_deadlocks_part_way_releases_what_it_took() {
    // The set takes its first key, then waits for the second, which another client holds;
    // that client then waits for the set's first key: a deadlock the server breaks. If the
    // set is the one told, its first key must be free afterwards.
    let (a, b) = (unique_key!("a"), unique_key!("b"));
    let mut keys = vec![a, b];
    keys.sort_by_key(|k| (k.objsubid(), k.classid(), k.objid()));
    let (first, second) = (keys[0].clone(), keys[1].clone());
    let pool = pool(3);
    let mut admin = admin();
    let mut other_conn = pool.get().unwrap();
    let other_pid = common::backend_pid(&mut other_conn);
    let k2 = second.as_i64().unwrap();
    other_conn
        .execute("SELECT pg_advisory_lock($1)", &[&k2])
        .unwrap();

    let set_pool = pool.clone();
    let set_keys = keys.clone();
    let set_thread = thread::spawn(move || {
        let mut set = LockSet::new(&set_pool, set_keys).unwrap();
        set.lock().map(drop)
    });
    wait_for_waiters(&mut admin, &second, 1);
    let k1 = first.as_i64().unwrap();
    // The other client now waits for the set's first key.
    let other = thread::spawn(move || {
        // Bounded, so that a set that kept its key fails the test instead of hanging it.
        other_conn
            .batch_execute("SET lock_timeout = '10s'")
            .unwrap();
        let r = other_conn.execute("SELECT pg_advisory_lock($1)", &[&k1]);
        let _ = other_conn.batch_execute("SELECT pg_advisory_unlock_all()");
        r.map(|_| ()).map_err(|e| e.to_string())
    });
    let set_result = set_thread.join().unwrap();
    let other_result = other.join().unwrap();
    match set_result {
        Err(Error::Deadlock { .. }) => {
            assert!(
                other_result.is_ok(),
                "the set kept its first key: {other_result:?}"
            );
        }
        Ok(()) => assert!(other_result.is_err(), "both got through a deadlock"),
        Err(e) => panic!("{e:?}"),
    }
    common::wait_until("no key left held", Duration::from_secs(10), || {
        holders(&mut admin, &first) == 0 && holders(&mut admin, &second) == 0
    });
    let _ = other_pid;
}
