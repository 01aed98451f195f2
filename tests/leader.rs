//! Leader election on advisory locks and on leases: one leader at a time, prompt loss
//! detection, and a periodic job that moves to another replica when its leader dies.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use common::{admin, pool};
use pglock::{Error, Leader, LeaseOptions, LeaseTable, LockMode, LockOptions};

/// Terminates the backends holding `key` (an advisory key).
fn terminate_holders(key: &pglock::LockKey) -> usize {
    let mut admin = admin();
    let holders: Vec<i32> = common::locks_on(&mut admin, key)
        .into_iter()
        .filter(|l| l.2)
        .map(|l| l.0)
        .collect();
    for pid in &holders {
        admin
            .execute("SELECT pg_terminate_backend($1)", &[pid])
            .unwrap();
    }
    holders.len()
}

#[test]
fn one_advisory_leader_and_a_terminated_session_is_noticed_at_once() {
    let key = unique_key!();
    let pool = pool(4);
    let a = Leader::advisory(&pool, key.clone()).unwrap();
    let b = Leader::advisory(&pool, key.clone()).unwrap();
    let leadership = a.try_campaign().unwrap().expect("nobody leads yet");
    assert!(leadership.is_leader());
    assert!(b.try_campaign().unwrap().is_none(), "two leaders");

    let start = Instant::now();
    assert_eq!(terminate_holders(&key), 1);
    assert!(
        leadership.wait_lost(Duration::from_secs(5)),
        "the loss was not noticed"
    );
    let noticed = start.elapsed();
    eprintln!("leadership loss noticed {noticed:?} after pg_terminate_backend");
    assert!(!leadership.is_leader());
    assert!(matches!(leadership.check(), Err(Error::LockLost { .. })));
    assert!(matches!(
        leadership.step_down(),
        Err(Error::LockLost { .. })
    ));
    let next = b.try_campaign().unwrap().expect("the seat is free again");
    next.step_down().unwrap();
}

#[test]
fn a_lease_leader_stops_at_its_deadline_when_its_lease_cannot_be_renewed() {
    let name = function_name!();
    let mut admin = admin();
    LeaseTable::default().create(&mut admin).unwrap();
    let pool = pool(3);
    let options = LeaseOptions::new()
        .lease(Duration::from_millis(1000))
        .heartbeat(Duration::from_millis(100));
    let a = Leader::lease(&pool, name, options.clone()).unwrap();
    let b = Leader::lease(&pool, name, options).unwrap();
    let leadership = a.try_campaign().unwrap().expect("nobody leads yet");
    assert!(b.try_campaign().unwrap().is_none(), "two leaders");
    // Renewals cannot get the row for longer than the lease.
    let mut blocker = admin.transaction().unwrap();
    blocker
        .execute(
            "SELECT 1 FROM pglock_leases WHERE name = $1 FOR UPDATE",
            &[&name],
        )
        .unwrap();
    let start = Instant::now();
    assert!(leadership.wait_lost(Duration::from_secs(10)));
    eprintln!(
        "lease leader stopped {:?} after renewals were blocked",
        start.elapsed()
    );
    assert!(!leadership.is_leader());
    blocker.rollback().unwrap();
    drop(leadership);
    let next = b
        .try_campaign()
        .unwrap()
        .expect("the expired lease is free");
    next.step_down().unwrap();
}

#[test]
fn run_campaigns_again_on_a_fresh_session_after_the_leader_dies() {
    let key = unique_key!();
    let pool = pool(6);
    let stop = Arc::new(AtomicBool::new(false));
    let inside = Arc::new(AtomicUsize::new(0));
    let (ran_tx, ran_rx) = mpsc::channel::<usize>();
    let replicas: Vec<_> = (0..2)
        .map(|replica| {
            let (pool, key, stop, inside, ran_tx) = (
                pool.clone(),
                key.clone(),
                Arc::clone(&stop),
                Arc::clone(&inside),
                ran_tx.clone(),
            );
            thread::spawn(move || {
                let leader = Leader::advisory(&pool, key).unwrap();
                leader
                    .run(Duration::from_millis(50), &stop, |leadership| {
                        leadership.check()?;
                        // Jobs start only under leadership; a leader killed while its job
                        // runs is not stopped mid-job (that is the job's own check).
                        inside.fetch_add(1, Ordering::SeqCst);
                        let _ = ran_tx.send(replica);
                        inside.fetch_sub(1, Ordering::SeqCst);
                        Ok::<_, Error>(())
                    })
                    .unwrap();
            })
        })
        .collect();
    ran_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("nobody led");
    let mut admin = admin();
    let killed = common::locks_on(&mut admin, &key)
        .into_iter()
        .find(|l| l.2)
        .expect("a leader holds the key")
        .0;
    assert_eq!(terminate_holders(&key), 1);
    // A new leadership on a fresh session (either replica's), and the job runs again.
    common::wait_until("a new leader", Duration::from_secs(10), || {
        common::locks_on(&mut admin, &key)
            .iter()
            .any(|l| l.2 && l.0 != killed)
    });
    while ran_rx.try_recv().is_ok() {}
    ran_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the job did not run under the new leader");
    stop.store(true, Ordering::SeqCst);
    for r in replicas {
        r.join().unwrap();
    }
    assert_eq!(
        common::holders(&mut admin, &key),
        0,
        "a leader did not step down"
    );
}

#[test]
fn a_shared_lock_cannot_elect_a_leader() {
    let pool = pool(1);
    let options = LockOptions::new().mode(LockMode::Shared);
    assert!(matches!(
        Leader::advisory_with_options(&pool, unique_key!(), options),
        Err(Error::InvalidArgument { .. })
    ));
}
