//! Proof under a network partition: one connection's packets are dropped both ways on
//! loopback (an nftables rule, like a pulled cable; `tests/common/partition.rs`), and
//! [`NetworkTimeout`] bounds what that can stall. Each test prints what it measured
//! (`cargo nextest run --test partition --no-capture`).

mod common;

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::partition::{client_port, Partition};
use common::{admin, config, holders, pool_with, wait_for_waiters, wait_until, Pool};
use pglock::{
    AdvisorySemaphore, Error, LeaseLock, LeaseOptions, LeaseTable, LockOptions, LockSet,
    LostReason, NetworkTimeout, OwnedSessionGuard, SessionGuard, SessionLock, TxLock,
};

/// The bound the tests set.
const BOUND: Duration = Duration::from_secs(4);
/// What noticing may take beyond the bound: one keepalive interval (1 s for 4 s) and a
/// loaded 2-core machine.
const SLACK: Duration = Duration::from_secs(8);
/// The lock bound of the waits that the network cuts: far longer than BOUND + SLACK, so
/// that a call that returns in time was ended by the network bound, not by this.
const LONG: Duration = Duration::from_secs(120);

/// A pool of one connection with the network bound on both ends, and that connection's
/// client port (the pool hands the same connection to the next lock).
fn bounded_pool(bound: Option<NetworkTimeout>) -> (Pool, u16) {
    let mut config = config();
    if let Some(bound) = bound {
        bound.apply(&mut config);
    }
    let pool = pool_with(1, config);
    let port = client_port(&mut pool.get().expect("a connection"));
    (pool, port)
}

fn long_wait() -> LockOptions {
    LockOptions::new().lock_timeout(LONG)
}

fn assert_within(what: &str, took: Duration) {
    eprintln!("{what}: {took:?} (bound {BOUND:?})");
    assert!(
        took < BOUND + SLACK,
        "{what} took {took:?}, beyond the network bound {BOUND:?} + {SLACK:?}"
    );
}

fn assert_connection_error(what: &str, err: &Error) {
    match err {
        Error::Database { source, .. }
        | Error::LockLost {
            source: Some(source),
            ..
        } => {
            assert!(
                source.is_closed() || source.as_db_error().is_none(),
                "{what}: {err:?}"
            );
        }
        other => panic!("{what}: expected a connection error, got {other:?}"),
    }
}

#[test]
fn a_wait_on_a_silent_network_fails_within_the_network_timeout() {
    let key = unique_key!();
    let holder_pool = common::pool(1);
    let mut holder = SessionLock::new(&holder_pool, key.clone()).unwrap();
    let held = holder.lock().unwrap();

    let (pool, port) = bounded_pool(Some(NetworkTimeout::new(BOUND)));
    let waiter = SessionLock::with_options(&pool, key.clone(), long_wait()).unwrap();
    let (tx, rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        let mut waiter = waiter;
        let result = waiter.lock().map(|_| ());
        tx.send(result).unwrap();
    });
    wait_for_waiters(&mut admin(), &key, 1);

    let cut = Partition::cut(port);
    let start = Instant::now();
    let result = rx.recv_timeout(LONG).expect("the wait returned");
    let took = start.elapsed();
    assert_within("a waiting lock() on a cut connection returned", took);
    let err = result.expect_err("the wait cannot have been granted");
    eprintln!("  with {err}");
    assert_connection_error("lock()", &err);
    assert!(err.to_string().contains(&key.to_string()), "{err}");
    handle.join().unwrap();

    // The server ended the cut session too, within the same bound: the holder sees no
    // waiter left.
    wait_until(
        "the server ended the cut waiter's session",
        BOUND + SLACK,
        || common::waiters(&mut admin(), &key) == 0,
    );
    drop(cut);
    SessionGuard::unlock(held).unwrap();

    // The broken connection was not returned to the pool: the next lock works.
    let mut again = SessionLock::new(&pool, key.clone()).unwrap();
    assert!(again.try_lock().unwrap().is_some());
}

#[test]
fn a_try_lock_on_a_silent_network_fails_within_the_network_timeout() {
    let key = unique_key!();
    let (pool, port) = bounded_pool(Some(NetworkTimeout::new(BOUND)));
    // The lock has its connection before the cable is pulled.
    let mut lock = SessionLock::new(&pool, key.clone()).unwrap();
    let cut = Partition::cut(port);
    let start = Instant::now();
    let err = lock.try_lock().map(|_| ()).expect_err("a cut try_lock()");
    assert_within("try_lock() on a cut connection returned", start.elapsed());
    eprintln!("  with {err}");
    assert_connection_error("try_lock()", &err);
    drop(cut);
    assert_eq!(holders(&mut admin(), &key), 0);
}

#[test]
fn a_tx_lock_on_a_silent_network_fails_within_the_network_timeout() {
    let key = unique_key!();
    let (pool, port) = bounded_pool(Some(NetworkTimeout::new(BOUND)));
    let mut lock = TxLock::with_options(&pool, key.clone(), long_wait()).unwrap();
    let cut = Partition::cut(port);
    let start = Instant::now();
    let err = lock.lock().map(|_| ()).expect_err("a cut TxLock::lock()");
    assert_within(
        "TxLock::lock() on a cut connection returned",
        start.elapsed(),
    );
    eprintln!("  with {err}");
    assert_connection_error("TxLock::lock()", &err);
    drop(cut);
    assert_eq!(holders(&mut admin(), &key), 0);
}

#[test]
fn semaphore_and_lock_set_waits_on_a_silent_network_fail_within_the_network_timeout() {
    let key = unique_key!();
    let name = key.name().unwrap().to_owned();
    // Every permit, and one key of the set, held elsewhere.
    let holder_pool = common::pool(2);
    let mut full = AdvisorySemaphore::new(&holder_pool, &name, 1).unwrap();
    let _permit = full.lock().unwrap();
    let set_keys = [unique_key!("a"), unique_key!("b")];
    let mut one = SessionLock::new(&holder_pool, set_keys[1].clone()).unwrap();
    let _held = one.lock().unwrap();

    for what in ["AdvisorySemaphore::lock()", "LockSet::lock()"] {
        let (pool, port) = bounded_pool(Some(NetworkTimeout::new(BOUND)));
        let (tx, rx) = mpsc::channel();
        let waiting = if what.starts_with("Advisory") {
            let mut sem = AdvisorySemaphore::with_options(&pool, &name, 1, long_wait()).unwrap();
            thread::spawn(move || tx.send(sem.lock().map(|_| ())).unwrap())
        } else {
            let mut set = LockSet::with_options(&pool, set_keys.clone(), long_wait()).unwrap();
            thread::spawn(move || tx.send(set.lock().map(|_| ())).unwrap())
        };
        let mut admin = admin();
        wait_until(&format!("{what} waits"), Duration::from_secs(10), || {
            admin
                .query_one(
                    // A lock set waits on the server; a semaphore listens for releases
                    // between tries of its slots.
                    "SELECT count(*) FROM pg_stat_activity WHERE client_port = $1 \
                     AND (wait_event_type = 'Lock' OR query LIKE '%advisory%')",
                    &[&i32::from(port)],
                )
                .unwrap()
                .get::<_, i64>(0)
                == 1
        });
        let cut = Partition::cut(port);
        let start = Instant::now();
        let result = rx.recv_timeout(LONG).expect("the wait returned");
        assert_within(
            &format!("a waiting {what} on a cut connection returned"),
            start.elapsed(),
        );
        let err = result.expect_err("the wait cannot have been granted");
        eprintln!("  with {err}");
        assert_connection_error(what, &err);
        waiting.join().unwrap();
        drop(cut);
    }
}

#[test]
fn a_partitioned_holder_loses_its_lock_to_a_waiter_within_the_network_timeout() {
    let key = unique_key!();
    let (pool, port) = bounded_pool(Some(NetworkTimeout::new(BOUND)));
    let holder = SessionLock::new(&pool, key.clone()).unwrap();
    let mut held = holder.lock_owned().unwrap();
    let waiter_pool = common::pool(1);
    let mut waiter = SessionLock::with_options(&waiter_pool, key.clone(), long_wait()).unwrap();

    let cut = Partition::cut(port);
    let start = Instant::now();
    // The holder's next call on its lock, made while the network is cut.
    let holder_call = thread::spawn(move || {
        let result = OwnedSessionGuard::is_held(&mut held);
        (result, start.elapsed(), held)
    });
    let granted = waiter.lock().expect("the waiter gets the lock");
    assert_within(
        "the waiter got the partitioned holder's lock after",
        start.elapsed(),
    );
    let (result, took, held) = holder_call.join().unwrap();
    assert_within("the partitioned holder's check returned", took);
    assert!(
        !result.expect("is_held on a dead connection answers"),
        "the partitioned holder believes it still holds the lock"
    );
    drop(cut);
    // Its unlock reports the loss, and does not touch the waiter's lock.
    let unlocked = OwnedSessionGuard::unlock(held);
    assert!(
        matches!(
            unlocked,
            Err(Error::LockLost {
                reason: LostReason::SessionEnded,
                ..
            })
        ),
        "{unlocked:?}"
    );
    assert_eq!(holders(&mut admin(), &key), 1);
    drop(granted);
}

#[test]
fn without_a_network_timeout_a_silent_network_stalls_both_ends() {
    // The control: the same cut without NetworkTimeout is noticed by neither end within
    // the bound, so the tests above measure the setting, not something else.
    let key = unique_key!();
    let (pool, port) = bounded_pool(None);
    let holder = SessionLock::new(&pool, key.clone()).unwrap();
    let mut held = holder.lock_owned().unwrap();

    let cut = Partition::cut(port);
    let (tx, rx) = mpsc::channel();
    let holder_call = thread::spawn(move || {
        let result = OwnedSessionGuard::is_held(&mut held);
        tx.send(()).unwrap();
        (result, held)
    });
    let waited = BOUND + SLACK;
    assert!(
        rx.recv_timeout(waited).is_err(),
        "the holder's call on a cut connection returned without a network timeout"
    );
    assert_eq!(
        holders(&mut admin(), &key),
        1,
        "the server freed the lock of a silent client without a network timeout"
    );
    eprintln!("without NetworkTimeout, after {waited:?}: the holder's call still blocks and the server still holds its lock");

    // The cable is plugged back in: TCP retransmits, the call completes and the lock
    // was held all along.
    drop(cut);
    let (result, held) = holder_call.join().unwrap();
    assert!(result.expect("the check after the network came back"));
    OwnedSessionGuard::unlock(held).unwrap();
}

#[test]
fn a_partitioned_lease_holder_unlocks_within_the_network_timeout_and_is_taken_over_after_expiry() {
    let key = unique_key!();
    let name = key.name().unwrap().to_owned();
    LeaseTable::default().create(&mut admin()).unwrap();
    let lease = Duration::from_secs(6);
    let options = LeaseOptions::new().lease(lease);
    let (pool, port) = bounded_pool(Some(NetworkTimeout::new(BOUND)));
    let mut holder = LeaseLock::with_options(&pool, &name, options.clone()).unwrap();
    let held = holder.lock().unwrap();

    let cut = Partition::cut(port);
    let start = Instant::now();
    let other_pool = common::pool(1);
    let mut other = LeaseLock::with_options(&other_pool, &name, options).unwrap();
    // The holder stops trusting its lease by its own deadline, whatever the network does.
    let watch = held.watch();
    assert!(
        watch.wait_lost(lease),
        "the holder still trusts its lease after its length"
    );
    let lost_after = start.elapsed();
    eprintln!(
        "the partitioned lease holder's deadline ran out after {lost_after:?} (lease {lease:?})"
    );
    assert!(
        lost_after <= lease,
        "the holder trusted its lease past its length"
    );

    let unlocking = Instant::now();
    let result = held.unlock();
    assert_within(
        "the partitioned lease holder's unlock returned",
        unlocking.elapsed(),
    );
    assert!(
        matches!(result, Err(Error::LockLost { .. })),
        "a partitioned lease's unlock: {result:?}"
    );
    let taken = other
        .lock()
        .expect("another holder takes the expired lease");
    let took = start.elapsed();
    eprintln!("another holder took the lease over after {took:?}");
    assert!(
        took >= lease,
        "taken over before the lease expired: {took:?}"
    );
    drop(cut);
    drop(taken);
}
