//! Proof under a network partition: a connection's packets are dropped both ways on
//! loopback (an nftables rule, like a pulled cable; `tests/common/partition.rs`), and
//! [`NetworkTimeout`] bounds what that can stall. Each test prints what it measured
//! (`cargo nextest run --test partition --no-capture`).

mod common;

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::partition::{ports, Partition};
use common::proxy::FaultProxy;
use common::{admin, config, holders, pool_with, wait_for_waiters, wait_until, Pool};
use pglock::{
    AdvisorySemaphore, Error, LeaseLock, LeaseOptions, LeaseTable, LockKey, LockOptions, LockSet,
    NetworkTimeout, OwnedSessionGuard, SessionGuard, SessionLock, TxLock,
};
use postgres::{Client, NoTls};

/// The bound the tests set.
const BOUND: Duration = Duration::from_secs(4);
/// What noticing may take beyond the bound: one keepalive probe interval (1 s for 4 s) and
/// a loaded 2-core machine.
const SLACK: Duration = Duration::from_secs(8);
/// The lock bound of waits that the network cuts: far longer than BOUND + SLACK, so that
/// a call that ends in time was ended by the network bound, not by this.
const LONG: Duration = Duration::from_secs(120);

/// A pool of one connection with the network bound on both ends, and that connection's
/// ports (the pool hands the same connection to the next lock).
fn bounded_pool(bound: Option<NetworkTimeout>) -> (Pool, (u16, u16)) {
    let mut config = config();
    if let Some(bound) = bound {
        bound.apply(&mut config);
    }
    let pool = pool_with(1, config);
    let ports = ports(&mut pool.get().expect("a connection"));
    (pool, ports)
}

fn long_wait() -> LockOptions {
    LockOptions::new().lock_timeout(LONG)
}

fn assert_within(what: &str, took: Duration, bound: Duration) {
    eprintln!("{what}: {took:?} (bound {bound:?})");
    assert!(took < bound, "{what} took {took:?}, beyond {bound:?}");
}

/// The server's backend for a connection whose client port is `port`, if any.
fn backend_on(admin: &mut Client, port: u16) -> Option<i32> {
    admin
        .query_opt(
            "SELECT pid FROM pg_stat_activity WHERE client_port = $1",
            &[&i32::from(port)],
        )
        .unwrap()
        .map(|r| r.get(0))
}

/// The backends waiting for `key`, by pid.
fn waiting_pids(admin: &mut Client, key: &LockKey) -> Vec<i32> {
    common::locks_on(admin, key)
        .into_iter()
        .filter(|l| !l.2)
        .map(|l| l.0)
        .collect()
}

#[test]
fn a_wait_cut_off_the_network_goes_on_on_a_fresh_connection_within_its_bound() {
    let key = unique_key!();
    let holder_pool = common::pool(1);
    let mut holder = SessionLock::new(&holder_pool, key.clone()).unwrap();
    let held = holder.lock().unwrap();

    let (pool, cut_ports) = bounded_pool(Some(NetworkTimeout::new(BOUND)));
    let waiter = SessionLock::with_options(&pool, key.clone(), long_wait()).unwrap();
    let (tx, rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        let mut waiter = waiter;
        let result = waiter.lock().map(|_| ());
        tx.send(result).unwrap();
    });
    let mut admin = admin();
    wait_for_waiters(&mut admin, &key, 1);
    let first = waiting_pids(&mut admin, &key);

    let cut = Partition::cut(cut_ports);
    let start = Instant::now();
    // The client gives the cut connection up and waits again on a fresh one; the server
    // ends the cut session.
    wait_until(
        "the waiter waits again on a fresh connection, and the cut session is gone",
        BOUND + SLACK,
        || {
            let now = waiting_pids(&mut admin, &key);
            now.len() == 1 && now != first
        },
    );
    assert_within(
        "a waiting lock() whose connection was cut waits again on a fresh one after",
        start.elapsed(),
        BOUND + SLACK,
    );
    drop(cut);
    assert!(
        rx.try_recv().is_err(),
        "the wait ended although the lock was never free"
    );

    // The lock passes to it once it is free, within the call's bound.
    SessionGuard::unlock(held).unwrap();
    let result = rx.recv_timeout(LONG).expect("the wait returned");
    result.expect("the waiter got the lock on its fresh connection");
    handle.join().unwrap();
}

#[test]
fn a_try_lock_on_a_cut_connection_takes_the_lock_on_a_fresh_one_within_the_network_timeout() {
    let key = unique_key!();
    let (pool, cut_ports) = bounded_pool(Some(NetworkTimeout::new(BOUND)));
    // The lock has its connection before the cable is pulled.
    let mut lock = SessionLock::new(&pool, key.clone()).unwrap();
    let cut = Partition::cut(cut_ports);
    let start = Instant::now();
    let guard = lock.try_lock().expect("try_lock on a fresh connection");
    assert_within(
        "try_lock() on a cut connection returned",
        start.elapsed(),
        BOUND + SLACK,
    );
    assert!(guard.is_some(), "the free lock was not taken");
    drop(cut);
    assert_eq!(holders(&mut admin(), &key), 1);
}

#[test]
fn a_tx_lock_on_a_cut_connection_takes_the_lock_on_a_fresh_one_within_the_network_timeout() {
    let key = unique_key!();
    let (pool, cut_ports) = bounded_pool(Some(NetworkTimeout::new(BOUND)));
    let mut lock = TxLock::with_options(&pool, key.clone(), long_wait()).unwrap();
    let cut = Partition::cut(cut_ports);
    let start = Instant::now();
    let guard = lock.lock().expect("TxLock::lock on a fresh connection");
    assert_within(
        "TxLock::lock() on a cut connection returned",
        start.elapsed(),
        BOUND + SLACK,
    );
    drop(cut);
    assert_eq!(holders(&mut admin(), &key), 1);
    drop(guard);
}

#[test]
fn with_the_server_gone_from_the_network_a_call_fails_within_the_network_and_checkout_bounds() {
    // Every connection to the server (through a proxy port of this test's own) is cut,
    // new ones too: the lock's retry cannot get a connection either.
    let key = unique_key!();
    let proxy = FaultProxy::start();
    let mut config = proxy.config();
    NetworkTimeout::new(BOUND).apply(&mut config);
    let checkout = Duration::from_secs(3);
    let pool = r2d2::Pool::builder()
        .max_size(1)
        .connection_timeout(checkout)
        .build(r2d2_postgres::PostgresConnectionManager::new(config, NoTls))
        .unwrap();
    let mut lock = SessionLock::with_options(&pool, key.clone(), long_wait()).unwrap();
    let cut = Partition::cut_listener(proxy.port());
    for (what, call) in [("try_lock()", true), ("lock() (bounded 120 s)", false)] {
        let start = Instant::now();
        let err = if call {
            lock.try_lock().map(|_| ()).expect_err("a cut try_lock()")
        } else {
            lock.lock().map(|_| ()).expect_err("a cut lock()")
        };
        assert_within(
            &format!("{what} with the server gone returned"),
            start.elapsed(),
            BOUND + checkout + SLACK,
        );
        eprintln!("  with {err}");
        assert!(
            matches!(err, Error::Pool { .. } | Error::Database { .. }),
            "{what}: {err:?}"
        );
        assert!(err.to_string().contains(&key.to_string()), "{err}");
    }
    drop(cut);
    // The network is back: the same lock works again (once r2d2 has a connection).
    wait_until("the same lock works again", LONG, || {
        matches!(lock.try_lock(), Ok(Some(_)))
    });
}

/// A semaphore and a lock set are the same engine as a session lock: a wait whose
/// connection is cut gives it up and waits again on a fresh one, within the network
/// bound, and gets the lock there once it is free.
#[test]
fn semaphore_and_lock_set_waits_cut_off_the_network_go_on_on_a_fresh_connection() {
    let key = unique_key!();
    let name = key.name().unwrap().to_owned();
    let set_keys = [unique_key!("a"), unique_key!("b")];
    for what in ["AdvisorySemaphore::lock()", "LockSet::lock()"] {
        // Every permit, or one key of the set, held elsewhere.
        let holder_pool = common::pool(2);
        let mut full = AdvisorySemaphore::new(&holder_pool, &name, 1).unwrap();
        let mut one = SessionLock::new(&holder_pool, set_keys[1].clone()).unwrap();
        let semaphore = what.starts_with("Advisory");
        let (permit, held) = if semaphore {
            (Some(full.lock().unwrap()), None)
        } else {
            (None, Some(one.lock().unwrap()))
        };
        let (pool, cut_ports) = bounded_pool(Some(NetworkTimeout::new(BOUND)));
        let (tx, rx) = mpsc::channel();
        let waiting = if semaphore {
            let mut sem = AdvisorySemaphore::with_options(&pool, &name, 1, long_wait()).unwrap();
            thread::spawn(move || tx.send(sem.lock().map(|_| ())).unwrap())
        } else {
            let mut set = LockSet::with_options(&pool, set_keys.clone(), long_wait()).unwrap();
            thread::spawn(move || tx.send(set.lock().map(|_| ())).unwrap())
        };
        let mut admin = admin();
        // A lock set waits on the server; a semaphore listens for releases between tries
        // of its slots.
        let waiters = |admin: &mut Client| -> Vec<i32> {
            admin
                .query(
                    "SELECT client_port FROM pg_stat_activity WHERE pid <> pg_backend_pid() \
                     AND (wait_event_type = 'Lock' OR query LIKE '%pg_try_advisory_lock(%') \
                     AND pid NOT IN (SELECT pid FROM pg_locks WHERE granted AND locktype = 'advisory')",
                    &[],
                )
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect()
        };
        wait_until(&format!("{what} waits"), Duration::from_secs(10), || {
            waiters(&mut admin).contains(&i32::from(cut_ports.0))
        });
        let cut = Partition::cut(cut_ports);
        let start = Instant::now();
        wait_until(
            &format!("{what} waits again on a fresh connection"),
            BOUND + SLACK,
            || {
                let now = waiters(&mut admin);
                backend_on(&mut admin, cut_ports.0).is_none() && !now.is_empty()
            },
        );
        assert_within(
            &format!("a waiting {what} whose connection was cut waits again after"),
            start.elapsed(),
            BOUND + SLACK,
        );
        drop(cut);
        assert!(
            rx.try_recv().is_err(),
            "{what} ended although nothing was freed"
        );
        drop((permit, held));
        let result = rx.recv_timeout(LONG).expect("the wait returned");
        result.unwrap_or_else(|e| panic!("{what} on its fresh connection: {e:?}"));
        waiting.join().unwrap();
    }
}

#[test]
fn a_partitioned_holder_loses_its_lock_to_a_waiter_within_the_network_timeout() {
    let key = unique_key!();
    let (pool, cut_ports) = bounded_pool(Some(NetworkTimeout::new(BOUND)));
    let holder = SessionLock::new(&pool, key.clone()).unwrap();
    let mut held = holder.lock_owned().unwrap();
    let waiter_pool = common::pool(1);
    let mut waiter = SessionLock::with_options(&waiter_pool, key.clone(), long_wait()).unwrap();

    let cut = Partition::cut(cut_ports);
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
        BOUND + SLACK,
    );
    let (result, took, held) = holder_call.join().unwrap();
    assert_within(
        "the partitioned holder's check returned",
        took,
        BOUND + SLACK,
    );
    assert!(
        !result.expect("is_held on a dead connection answers"),
        "the partitioned holder believes it still holds the lock"
    );
    drop(cut);
    // Its unlock reports the loss, and does not touch the waiter's lock.
    common::assert_session_ended(&OwnedSessionGuard::unlock(held).unwrap_err());
    assert_eq!(holders(&mut admin(), &key), 1);
    drop(granted);
}

#[test]
fn a_cut_shorter_than_the_bound_is_ridden_out_and_the_lock_kept() {
    // 6 s: probes every second, so a 3 s cut that starts at any moment leaves both ends
    // at most 4 s without a sign of life.
    let bound = NetworkTimeout::new(Duration::from_secs(6));
    let key = unique_key!();
    let (pool, cut_ports) = bounded_pool(Some(bound));
    let mut holder = SessionLock::new(&pool, key.clone()).unwrap();
    let mut held = holder.lock().unwrap();
    let cut = Partition::cut(cut_ports);
    // The scenario: the network is gone for 3 s while the holder is idle.
    thread::sleep(Duration::from_secs(3));
    let mut admin = admin();
    assert_eq!(
        holders(&mut admin, &key),
        1,
        "the server freed the lock during a 3 s cut"
    );
    drop(cut);
    let checked = SessionGuard::is_held(&mut held);
    assert!(
        checked.expect("the check after the cut"),
        "a 3 s cut lost the lock under a 6 s bound"
    );
    assert_eq!(holders(&mut admin, &key), 1);
    SessionGuard::unlock(held).expect("unlock after a ridden-out cut");
}

#[test]
fn a_call_in_flight_rides_out_a_cut_of_under_half_the_bound() {
    // A query sent into the cut is resent by TCP with exponential backoff (on loopback
    // 0.2, 0.6, 1.4, 3.0, 6.2 s after the first send): healed after 4 s, the resend at
    // 6.2 s gets through, before the 10 s bound.
    let key = unique_key!();
    let (pool, cut_ports) = bounded_pool(Some(NetworkTimeout::new(Duration::from_secs(10))));
    let mut holder = SessionLock::new(&pool, key.clone()).unwrap();
    let mut held = holder.lock().unwrap();
    let cut = Partition::cut(cut_ports);
    let healer = thread::spawn(move || {
        // The scenario: the network is gone for 4 s.
        thread::sleep(Duration::from_secs(4));
        drop(cut);
    });
    let start = Instant::now();
    held.simple_query("SELECT 1")
        .expect("a query sent into a 4 s cut under a 10 s bound");
    eprintln!(
        "a query sent into a 4 s cut (10 s bound) completed after {:?}",
        start.elapsed()
    );
    healer.join().unwrap();
    assert!(SessionGuard::is_held(&mut held).unwrap());
    assert_eq!(holders(&mut admin(), &key), 1);
    SessionGuard::unlock(held).unwrap();
}

#[test]
fn a_reader_that_pauses_mid_result_keeps_its_lock_within_the_bound_and_loses_it_beyond() {
    // A critical section that stops reading a large result fills its receive buffer, and
    // the server waits with a closed window: Linux's tcp_user_timeout ends that too, as
    // the docs of NetworkTimeout say. Shorter pauses are fine.
    let bound = NetworkTimeout::new(Duration::from_secs(6));
    for (pause, kept) in [
        (Duration::from_secs(2), true),
        (Duration::from_secs(14), false),
    ] {
        let key = unique_key!(pause.as_secs());
        let (pool, _) = bounded_pool(Some(bound));
        let mut holder = SessionLock::new(&pool, key.clone()).unwrap();
        let mut held = holder.lock().unwrap();
        let read = (|| -> Result<u64, std::io::Error> {
            let mut out = held
                .copy_out(
                    "COPY (SELECT g, repeat('x', 2000) FROM generate_series(1, 20000) g) \
                     TO STDOUT",
                )
                .map_err(std::io::Error::other)?;
            let mut first = [0u8; 1024];
            std::io::Read::read_exact(&mut out, &mut first)?;
            // The scenario: a pause in the middle of the result.
            thread::sleep(pause);
            let mut rest = Vec::new();
            std::io::Read::read_to_end(&mut out, &mut rest)?;
            Ok(bytecount(&first) + bytecount(&rest))
        })();
        eprintln!("a {pause:?} pause mid-result under a 6 s bound: {read:?}");
        if kept {
            assert_eq!(read.expect("the whole result"), 20_000);
            assert!(SessionGuard::is_held(&mut held).unwrap());
            SessionGuard::unlock(held).unwrap();
        } else {
            assert!(read.is_err(), "the read survived a {pause:?} pause");
            assert!(!SessionGuard::is_held(&mut held).unwrap());
            assert_eq!(holders(&mut admin(), &key), 0);
        }
    }
}

fn bytecount(bytes: &[u8]) -> u64 {
    bytes.iter().filter(|&&b| b == b'\n').count() as u64
}

#[test]
fn a_lock_whose_idle_connection_the_network_timeout_ended_locks_again_at_once() {
    let key = unique_key!();
    let (pool, cut_ports) = bounded_pool(Some(NetworkTimeout::new(BOUND)));
    let mut lock = SessionLock::new(&pool, key.clone()).unwrap();
    drop(lock.try_lock().unwrap().expect("free"));
    let mut admin = admin();
    let cut = Partition::cut(cut_ports);
    wait_until(
        "the server ended the cut, idle session",
        BOUND + SLACK,
        || backend_on(&mut admin, cut_ports.0).is_none(),
    );
    // The network is back before the lock is used again; the lock's connection is dead
    // (timed out, or reset by the server's kernel at the client's next probe).
    drop(cut);
    let start = Instant::now();
    let guard = lock
        .try_lock()
        .expect("try_lock after the network came back");
    assert!(guard.is_some(), "the free lock was not taken");
    assert_within(
        "try_lock() on a connection the timeout had ended",
        start.elapsed(),
        Duration::from_secs(5),
    );
}

#[test]
fn without_a_network_timeout_a_silent_network_stalls_both_ends() {
    // The control: the same cut without NetworkTimeout is noticed by neither end within
    // the bound, so the tests above measure the setting, not something else.
    let key = unique_key!();
    let (pool, cut_ports) = bounded_pool(None);
    let holder = SessionLock::new(&pool, key.clone()).unwrap();
    let mut held = holder.lock_owned().unwrap();

    let cut = Partition::cut(cut_ports);
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
    eprintln!(
        "without NetworkTimeout, after {waited:?}: the holder's call still blocks and the \
         server still holds its lock"
    );

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
    let (pool, cut_ports) = bounded_pool(Some(NetworkTimeout::new(BOUND)));
    let mut holder = LeaseLock::with_options(&pool, &name, options.clone()).unwrap();
    let held = holder.lock().unwrap();

    let cut = Partition::cut(cut_ports);
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

    let unlocking = Instant::now();
    let result = held.unlock();
    assert_within(
        "the partitioned lease holder's unlock returned",
        unlocking.elapsed(),
        BOUND + SLACK,
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
