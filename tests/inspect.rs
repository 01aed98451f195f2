//! Who holds what, and force-releasing a stuck lock.

mod common;

use std::time::Duration;

use common::{admin, pool};
use pglock::{inspect, Error, SessionGuard, SessionLock};

#[test]
fn terminate_holders_frees_a_stuck_lock_and_the_holder_learns_it() {
    let key = unique_key!();
    let pool = pool(2);
    let mut stuck = SessionLock::new(&pool, key.clone()).unwrap();
    let guard = stuck.lock().unwrap();
    let mut admin = admin();
    let holders = inspect::holders(&mut admin, Some(&key)).unwrap();
    assert_eq!(holders.len(), 1);
    assert!(holders[0].granted);

    let ended = inspect::terminate_holders(&mut admin, &key).unwrap();
    assert_eq!(ended, vec![holders[0].pid.unwrap()]);
    let mut waiter = SessionLock::new(&pool, key.clone()).unwrap();
    assert!(
        waiter
            .try_lock_for(Duration::from_secs(10))
            .unwrap()
            .is_some(),
        "the lock was not freed"
    );
    // The old holder hears of it.
    assert!(matches!(
        SessionGuard::unlock(guard),
        Err(Error::LockLost { .. })
    ));
    // Nothing else was touched.
    assert!(
        inspect::terminate_holders(&mut admin, &pglock::LockKey::new(i64::MIN + 7))
            .unwrap()
            .is_empty()
    );
}
