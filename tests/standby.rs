//! A lock taken on a hot standby would exclude nobody on the primary: pglock refuses it.
//! `ci/with-postgres` starts a standby streaming from the test server (`STANDBY_URL`).

mod common;

use pglock::{Error, LeaseLock, LeaseTable, LockOptions, SessionLock, TxLock, WaitMode};

fn standby_pool() -> common::Pool {
    let url = std::env::var("STANDBY_URL").unwrap_or_else(|_| {
        panic!(
            "\n\nSTANDBY_URL is not set: this test needs a hot standby of DATABASE_URL.\n\
             Run the tests through ci/with-postgres, which starts one.\n\n"
        )
    });
    common::pool_with(2, url.parse().expect("STANDBY_URL"))
}

fn refused<T: std::fmt::Debug>(what: &str, result: Result<T, Error>) {
    match result {
        Err(Error::ReadOnlyStandby { key }) => {
            assert!(!key.to_string().is_empty());
        }
        other => panic!("{what}: expected ReadOnlyStandby, got {other:?}"),
    }
}

#[test]
fn advisory_locks_and_leases_are_refused_on_a_standby_and_hold_nothing() {
    let key = unique_key!();
    let pool = standby_pool();
    let mut session = SessionLock::new(&pool, key.clone()).unwrap();
    refused(
        "SessionLock::try_lock",
        session.try_lock().map(|g| g.is_some()),
    );
    refused("SessionLock::lock", session.lock().map(|_| ()));
    let polling = LockOptions::new().wait_mode(WaitMode::poll());
    let mut polled = SessionLock::with_options(&pool, key.clone(), polling).unwrap();
    refused("SessionLock::lock (poll)", polled.lock().map(|_| ()));
    drop((session, polled));
    let mut tx = TxLock::new(&pool, key.clone()).unwrap();
    refused("TxLock::try_lock", tx.try_lock().map(|g| g.is_some()));
    refused("TxLock::lock", tx.lock().map(|_| ()));
    drop(tx);

    // Nothing is held on the standby.
    let mut conn = pool.get().unwrap();
    let held: i64 = conn
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(held, 0, "a lock was left on the standby");
    drop(conn);

    // Leases cannot be written there: the same typed error.
    LeaseTable::default().create(&mut common::admin()).unwrap();
    let mut conn = pool.get().unwrap();
    common::wait_until(
        "the lease table reached the standby",
        std::time::Duration::from_secs(10),
        || {
            conn.query_one("SELECT to_regclass('pglock_leases') IS NOT NULL", &[])
                .unwrap()
                .get::<_, bool>(0)
        },
    );
    drop(conn);
    let mut lease = LeaseLock::new(&pool, key.name().unwrap()).unwrap();
    refused("LeaseLock::try_lock", lease.try_lock().map(|g| g.is_some()));
}
