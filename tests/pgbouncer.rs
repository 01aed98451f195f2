//! Behind a real PgBouncer in `pool_mode = transaction` (started by `ci/with-postgres`),
//! each transaction may run on any server session. `TxLock` keeps the lock and the work in
//! one transaction, so it still excludes; this is the mode to use behind such a pooler.

mod common;

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use common::{count, counter, pool_with};
use pglock::{Error, LockKey, LockOptions, SessionGuard, TxGuard, TxLock};

/// PgBouncer in transaction mode, in front of the test server.
fn pgbouncer_config() -> postgres::Config {
    let url = std::env::var("PGBOUNCER_URL").unwrap_or_else(|_| {
        panic!(
            "\n\nPGBOUNCER_URL is not set: this test needs a PgBouncer in pool_mode = \
             transaction.\nRun the tests through ci/with-postgres, which starts one (and \
             installs Debian's pgbouncer package when run as root), or install pgbouncer \
             and run it in front of DATABASE_URL yourself.\n\n"
        )
    });
    url.parse().expect("PGBOUNCER_URL")
}

/// The increment of `common::increment`, in simple-protocol statements only: named
/// prepared statements do not survive a transaction-mode pooler.
fn increment_simple(conn: &mut postgres::Client, name: &str) {
    let rows = conn
        .simple_query(&format!(
            "SELECT n FROM pglock_test_counters WHERE name = '{name}'"
        ))
        .unwrap();
    let n: i32 = rows
        .iter()
        .find_map(|m| match m {
            postgres::SimpleQueryMessage::Row(r) => r.get(0).map(|v| v.parse().unwrap()),
            _ => None,
        })
        .unwrap();
    std::thread::yield_now();
    conn.simple_query(&format!(
        "UPDATE pglock_test_counters SET n = {} WHERE name = '{name}'",
        n + 1
    ))
    .unwrap();
}

/// A session lock on `key` held through the pooler, on a server session that carries no
/// stale marker of an earlier run (an attempt that lands on one is refused).
fn hold_through_the_pooler(
    pool: &common::Pool,
    key: &pglock::LockKey,
) -> pglock::OwnedSessionGuard {
    (0..20)
        .find_map(|_| {
            let a = pglock::SessionLock::new(pool, key.clone()).unwrap();
            match a.try_lock_owned() {
                Ok(guard) => Some(guard.expect("a free key")),
                Err(Error::SessionShared { .. }) => None,
                Err(e) => panic!("{e:?}"),
            }
        })
        .expect("no server session without a stale marker")
}

/// Ends the server sessions where a session lock on `key` was stranded behind the pooler
/// (its unlock landed on another server session), so that later runs against the same
/// server find server sessions without a stale marker.
fn end_stranded(key: &pglock::LockKey) {
    let mut admin = common::admin();
    for (pid, _, _) in common::locks_on(&mut admin, key) {
        admin
            .execute("SELECT pg_terminate_backend($1)", &[&pid])
            .unwrap();
    }
}

#[test]
fn transaction_locks_exclude_behind_a_transaction_pooler() {
    let name = "pgbouncer-tx-counter";
    let mut admin = common::admin();
    counter(&mut admin, name);
    // Eight clients, but PgBouncer gives them four server sessions between them.
    let pool = pool_with(8, pgbouncer_config());
    let barrier = Arc::new(Barrier::new(8));
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (pool, barrier) = (pool.clone(), Arc::clone(&barrier));
            thread::spawn(move || {
                let mut lock = TxLock::new(&pool, name).unwrap();
                barrier.wait();
                for _ in 0..50 {
                    lock.with_lock(|tx| -> Result<(), Error> {
                        increment_simple(tx, name);
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
    assert_eq!(
        count(&mut admin, name),
        400,
        "lost increments behind PgBouncer"
    );
}

#[test]
fn transaction_lock_checks_work_behind_a_transaction_pooler() {
    let key = unique_key!();
    let pool = pool_with(2, pgbouncer_config());
    let mut a = TxLock::new(&pool, key.clone()).unwrap();
    let mut b = TxLock::with_options(
        &pool,
        key.clone(),
        LockOptions::new().lock_timeout(Duration::from_millis(100)),
    )
    .unwrap();

    let mut guard = a.lock().unwrap();
    assert!(
        TxGuard::is_held(&mut guard).unwrap(),
        "is_held in the lock's transaction"
    );
    assert!(b.try_lock().unwrap().is_none());
    assert!(matches!(b.lock(), Err(Error::Timeout { .. })));
    // The marker check at commit works on whichever server session ran the transaction.
    TxGuard::commit(guard).unwrap();
    TxGuard::commit(b.try_lock().unwrap().expect("free after the commit")).unwrap();

    // A transaction ended inside the critical section is still caught.
    let mut guard = a.lock().unwrap();
    guard.batch_execute("COMMIT").unwrap();
    assert!(matches!(
        TxGuard::commit(guard),
        Err(Error::LockLost { .. })
    ));
}

#[test]
fn session_locks_through_a_transaction_pooler_never_grant_one_lock_twice() {
    // Session locks are re-entrant per server session: behind a transaction-mode pooler,
    // client B can land on the server session where client A holds the key, and its try
    // would succeed. pglock's session marker makes B's call fail instead, naming the
    // cause, so two clients never both believe they hold the lock.
    use pglock::SessionLock;
    use std::sync::atomic::{AtomicUsize, Ordering};

    // Deterministic first: one client holds; others arrive on the pooler's server sessions.
    // Keys of this process only: a lock stranded behind the pooler by an earlier run
    // against the same server stays there.
    let key = unique_key!(std::process::id());
    let pool = pool_with(8, pgbouncer_config());
    // A server session may carry a marker left by an earlier run's holder (its lock is
    // out of reach behind the pooler, by design): that client's attempt is refused too.
    let held = hold_through_the_pooler(&pool, &key);
    let mut shared = 0;
    for _ in 0..8 {
        let mut b = SessionLock::new(&pool, key.clone()).unwrap();
        match b.try_lock() {
            Ok(None) => {}
            Ok(Some(_)) => panic!("a second client got a lock that is held"),
            Err(Error::SessionShared { other, .. }) => {
                assert!(other.starts_with("pglock:"), "{other}");
                shared += 1;
            }
            Err(e) => panic!("{e:?}"),
        };
    }
    assert!(
        shared > 0,
        "no client landed on the holder's server session (pool of 4 server sessions)"
    );
    drop(held); // its unlock may land on another server session: logged, not ours to fix
    end_stranded(&key);

    // Then under load: 8 clients, 4 server sessions, one key.
    let key = unique_key!(format!("load/{}", std::process::id()));
    let inside = Arc::new(AtomicUsize::new(0));
    let entered = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(8));
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (pool, key, inside, entered, barrier) = (
                pool.clone(),
                key.clone(),
                Arc::clone(&inside),
                Arc::clone(&entered),
                Arc::clone(&barrier),
            );
            thread::spawn(move || {
                barrier.wait();
                for _ in 0..25 {
                    let mut lock = SessionLock::new(&pool, key.clone()).unwrap();
                    match lock.try_lock() {
                        Ok(Some(guard)) => {
                            let n = inside.fetch_add(1, Ordering::SeqCst);
                            assert_eq!(n, 0, "two clients held the lock at once");
                            entered.fetch_add(1, Ordering::SeqCst);
                            thread::yield_now();
                            inside.fetch_sub(1, Ordering::SeqCst);
                            // The unlock may land on another server session: lost, or
                            // shared; either way it must say so.
                            match SessionGuard::unlock(guard) {
                                Ok(())
                                | Err(Error::LockLost { .. })
                                | Err(Error::SessionShared { .. }) => {}
                                Err(e) => panic!("{e:?}"),
                            }
                        }
                        Ok(None) | Err(Error::SessionShared { .. }) => {}
                        Err(e) => panic!("{e:?}"),
                    };
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    end_stranded(&key);
    assert!(entered.load(Ordering::SeqCst) >= 1);
}

#[test]
fn a_transaction_lock_is_never_granted_where_another_clients_session_lock_holds_the_key() {
    // Advisory locks are re-entrant per server session, whatever their scope: a TxLock
    // landing on the server session where another client's SessionLock holds the key would
    // be granted. pglock refuses it there (SessionShared) and takes nothing, whichever way
    // it asks; a TxLock on any other key is granted there, also on a key whose text is a
    // suffix of the held key's, or the same number in the other key space.
    let key = unique_key!(std::process::id());
    let k = key.as_i64().unwrap();
    let digits = k.to_string();
    let suffix = LockKey::new(digits[digits.len() - 6..].parse().unwrap());
    let other_space = LockKey::pair(1, k as i32);
    let pool = pool_with(8, pgbouncer_config());
    let held = hold_through_the_pooler(&pool, &key);
    let bound = LockOptions::new().lock_timeout(Duration::from_millis(200));
    let mut shared = 0;
    for round in 0..12 {
        let mut b = TxLock::with_options(&pool, key.clone(), bound.clone()).unwrap();
        let taken = match round % 3 {
            0 => b.try_lock().map(|g| g.is_some()),
            1 => b.lock().map(|_| true),
            _ => b
                .try_lock_for(Duration::from_millis(200))
                .map(|g| g.is_some()),
        };
        match taken {
            Ok(false) | Err(Error::Timeout { .. }) => {}
            Ok(true) => panic!("a transaction lock was granted while a session lock held it"),
            Err(Error::SessionShared { other, .. }) => {
                assert!(other.starts_with("pglock:"), "{other}");
                assert!(other.ends_with(&format!("@{k}")), "{other}");
                shared += 1;
            }
            Err(e) => panic!("{e:?}"),
        };
        for other in [&suffix, &other_space] {
            let mut c = TxLock::with_options(&pool, other.clone(), bound.clone()).unwrap();
            let granted = c.lock().map(|_| ());
            assert!(
                granted.is_ok(),
                "a transaction lock on {other}: {granted:?}"
            );
        }
    }
    assert!(
        shared > 0,
        "no client landed on the holder's server session"
    );
    drop(held);
    end_stranded(&key);
}

#[test]
fn lease_locks_exclude_behind_a_transaction_pooler() {
    use pglock::{LeaseLock, LeaseOptions, LeaseTable};
    let name = &format!("{}/{}", function_name!(), std::process::id());
    let mut admin = common::admin();
    LeaseTable::default().create(&mut admin).unwrap();
    counter(&mut admin, name);
    // 8 clients on 4 server sessions.
    let pool = pool_with(16, pgbouncer_config());
    let barrier = Arc::new(Barrier::new(8));
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (pool, barrier, name) = (pool.clone(), Arc::clone(&barrier), name.clone());
            thread::spawn(move || {
                let options = LeaseOptions::new()
                    .poll_interval(Duration::from_millis(1), Duration::from_millis(20));
                let mut lock = LeaseLock::with_options(&pool, &name, options).unwrap();
                let mut conn = pool.get().unwrap();
                barrier.wait();
                for _ in 0..25 {
                    let guard = lock.lock().unwrap();
                    increment_simple(&mut conn, &name);
                    guard.unlock().unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(count(&mut admin, name), 200);
}

/// A `TxLock` holder behind PgBouncer whose link to the pooler goes silent mid-transaction:
/// its own calls are bounded by `NetworkTimeout::client_only()`, and PgBouncer, given the
/// same bound in `pgbouncer.ini` (`ci/with-postgres` does), ends the client and with it the
/// server session, which rolls back the transaction and frees the lock.
#[test]
fn a_cut_off_tx_lock_holder_behind_pgbouncer_is_freed_by_the_poolers_own_bound() {
    use common::partition::{own_connection_to, Partition};
    use pglock::{NetworkTimeout, SessionLock};
    use std::time::Instant;

    let key = unique_key!();
    let mut config = pgbouncer_config();
    let bouncer_port = config.get_ports()[0];
    NetworkTimeout::new(Duration::from_secs(4))
        .client_only()
        .apply(&mut config);
    let pool = pool_with(1, config);
    let mut lock = TxLock::new(&pool, key.clone()).unwrap();
    let mut cut_at = None;
    let mut cut = None;
    let result = lock.with_lock(|tx| -> Result<(), Error> {
        tx.simple_query("SELECT 1").unwrap();
        cut = Some(Partition::cut(own_connection_to(bouncer_port)));
        cut_at = Some(Instant::now());
        Ok(())
    });
    let cut_at = cut_at.unwrap();
    let noticed = cut_at.elapsed();
    eprintln!("the cut-off holder's with_lock returned after {noticed:?}: {result:?}");
    assert!(
        result.is_err(),
        "a commit through a cut connection succeeded"
    );
    assert!(noticed < Duration::from_secs(4 + 8), "{noticed:?}");

    // A waiter connected directly to the server gets the lock once PgBouncer has ended
    // the silent client and its server session.
    let direct = common::pool(1);
    let mut waiter = SessionLock::with_options(
        &direct,
        key.clone(),
        LockOptions::new().lock_timeout(Duration::from_secs(30)),
    )
    .unwrap();
    let granted = waiter.lock().expect("the lock, freed by PgBouncer");
    let freed = cut_at.elapsed();
    eprintln!("behind PgBouncer, the cut-off TxLock's lock was free {freed:?} after the cut");
    assert!(freed < Duration::from_secs(4 + 8), "{freed:?}");
    drop(granted);
    drop(cut);
}

/// One attempt at a coordination lock through the pooler: runs `body` while holding it and
/// says whether it held it; `SessionShared` when it landed on another client's server
/// session.
type Attempt = fn(&common::Pool, &str, &mut dyn FnMut()) -> pglock::Result<bool>;

fn semaphore_of_one(
    pool: &common::Pool,
    name: &str,
    body: &mut dyn FnMut(),
) -> pglock::Result<bool> {
    let mut semaphore = pglock::AdvisorySemaphore::new(pool, name, 1)?;
    let Some(permit) = semaphore.try_lock()? else {
        return Ok(false);
    };
    body();
    settle(pglock::SemaphorePermit::unlock(permit))
}

fn lock_set(pool: &common::Pool, name: &str, body: &mut dyn FnMut()) -> pglock::Result<bool> {
    let keys = [LockKey::from_name(name), LockKey::pair(7, 7)];
    let mut set = pglock::LockSet::new(pool, keys)?;
    let Some(guard) = set.try_lock()? else {
        return Ok(false);
    };
    body();
    settle(pglock::LockSetGuard::unlock(guard))
}

/// An unlock behind the pooler may land on another server session: it must say so (lost
/// or shared), and the lock was held all the same.
fn settle(unlocked: pglock::Result<()>) -> pglock::Result<bool> {
    match unlocked {
        Ok(()) | Err(Error::LockLost { .. }) | Err(Error::SessionShared { .. }) => Ok(true),
        Err(e) => Err(e),
    }
}

/// The session-lock proof for semaphores and lock sets: one client holds through the
/// pooler while 8 others try (none is granted; those on its server session are refused
/// with `SessionShared`), then 8 threads of 25 tries never hold at once.
fn never_granted_twice(attempt: Attempt, name: &str, stranded: &[LockKey]) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let pool = pool_with(8, pgbouncer_config());
    let mut shared = 0;
    let mut others = || {
        for _ in 0..8 {
            match attempt(&pool, name, &mut || {
                panic!("a second client got a held lock")
            }) {
                Ok(false) => {}
                Err(Error::SessionShared { other, .. }) => {
                    assert!(other.starts_with("pglock:"), "{other}");
                    shared += 1;
                }
                other => panic!("{other:?}"),
            }
        }
    };
    // A server session may carry a marker left by an earlier holder whose unlock landed
    // elsewhere: that attempt is refused too, and the next one tries another session.
    let held = (0..20).any(|_| match attempt(&pool, name, &mut others) {
        Ok(held) => held,
        Err(Error::SessionShared { .. }) => false,
        Err(e) => panic!("{e:?}"),
    });
    assert!(held, "no server session without a stale marker");
    assert!(
        shared > 0,
        "no client landed on the holder's server session"
    );
    stranded.iter().for_each(end_stranded);

    let inside = Arc::new(AtomicUsize::new(0));
    let entered = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(8));
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (pool, name) = (pool.clone(), name.to_owned());
            let (inside, entered, barrier) = (
                Arc::clone(&inside),
                Arc::clone(&entered),
                Arc::clone(&barrier),
            );
            thread::spawn(move || {
                barrier.wait();
                for _ in 0..25 {
                    let mut body = || {
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                        entered.fetch_add(1, Ordering::SeqCst);
                        thread::yield_now();
                        inside.fetch_sub(1, Ordering::SeqCst);
                    };
                    match attempt(&pool, &name, &mut body) {
                        Ok(_) | Err(Error::SessionShared { .. }) => {}
                        Err(e) => panic!("{e:?}"),
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    stranded.iter().for_each(end_stranded);
    assert!(entered.load(Ordering::SeqCst) >= 1);
}

#[test]
fn a_semaphore_through_a_transaction_pooler_never_grants_one_slot_twice() {
    let name = format!("pglock-test/{}/{}", function_name!(), std::process::id());
    let slot = pglock::AdvisorySemaphore::new(&pool_with(1, pgbouncer_config()), &name, 1)
        .unwrap()
        .slot_key(0);
    never_granted_twice(semaphore_of_one, &name, &[slot]);
}

#[test]
fn a_lock_set_through_a_transaction_pooler_is_never_granted_twice() {
    let name = format!("pglock-test/{}/{}", function_name!(), std::process::id());
    never_granted_twice(
        lock_set,
        &name,
        &[LockKey::from_name(&name), LockKey::pair(7, 7)],
    );
}

#[test]
fn a_transaction_lock_is_refused_where_a_semaphore_or_lock_set_holds_the_server_session() {
    // A semaphore marks the slot it holds: a TxLock on that slot's key landing there is
    // refused. A lock set marks its session without a key: every TxLock landing there is.
    let name = format!("pglock-test/{}/{}", function_name!(), std::process::id());
    let pool = pool_with(8, pgbouncer_config());
    let bound = LockOptions::new().lock_timeout(Duration::from_millis(200));
    for attempt in [semaphore_of_one as Attempt, lock_set] {
        let mut shared = 0;
        let key = if std::ptr::fn_addr_eq(attempt, semaphore_of_one as Attempt) {
            pglock::AdvisorySemaphore::new(&pool, &name, 1)
                .unwrap()
                .slot_key(0)
        } else {
            LockKey::pair(7, 7)
        };
        let mut try_tx = || {
            for _ in 0..12 {
                let mut tx = TxLock::with_options(&pool, key.clone(), bound.clone()).unwrap();
                match tx.try_lock().map(|g| g.is_some()) {
                    Ok(false) => {}
                    Ok(true) => panic!("a transaction lock was granted on a held key"),
                    Err(Error::SessionShared { .. }) => shared += 1,
                    Err(e) => panic!("{e:?}"),
                }
            }
        };
        let held = (0..20).any(|_| matches!(attempt(&pool, &name, &mut try_tx), Ok(true)));
        assert!(held && shared > 0, "held {held}, refused {shared}");
        end_stranded(&key);
    }
}
