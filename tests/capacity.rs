//! The server's lock table is shared and finite. When it is full, every call gets a typed
//! error at once, never a hang, and leaves nothing behind.
//!
//! Filling the table starves every other session, so `.config/nextest.toml` runs this test
//! binary alone.

mod common;

use std::time::{Duration, Instant};

use common::{admin, pool};
use pglock::{Error, LockOptions, SessionLock, TxLock};

/// Takes session locks on one connection until the server runs out of shared memory for
/// locks; they stay held after the error. Returns how many it took.
fn fill_lock_table(filler: &mut postgres::Client) -> i64 {
    // The pair key space with a first key of our own: no other test uses it.
    let err = filler
        .batch_execute(
            "SELECT count(pg_advisory_lock(-424242, g)) FROM generate_series(1, 10000000) g",
        )
        .expect_err("the lock table never filled up");
    assert_eq!(
        err.code(),
        Some(&postgres::error::SqlState::OUT_OF_MEMORY),
        "{err:?}"
    );
    filler
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
            &[],
        )
        .map(|r| r.get(0))
        .unwrap_or(-1)
}

#[test]
fn a_full_lock_table_is_a_typed_error_never_a_hang() {
    let key = unique_key!();
    let pool = pool(2);
    // Connect first: with the lock table full, even a new session cannot start.
    let bounded = LockOptions::new().lock_timeout(Duration::from_secs(30));
    let mut session = SessionLock::with_options(&pool, key.clone(), bounded.clone()).unwrap();
    let mut tx = TxLock::with_options(&pool, key.clone(), bounded).unwrap();
    let mut filler = admin();
    let taken = fill_lock_table(&mut filler);
    eprintln!("the lock table filled up after {taken} advisory locks");

    let start = Instant::now();
    let errors = [
        session.try_lock().map(|_| ()).unwrap_err(),
        session.lock().map(|_| ()).unwrap_err(),
        tx.try_lock().map(|_| ()).unwrap_err(),
        tx.lock().map(|_| ()).unwrap_err(),
    ];
    // Free the table before asserting, so a failure does not starve the server.
    filler
        .batch_execute("SELECT pg_advisory_unlock_all()")
        .unwrap();
    for err in &errors {
        assert!(
            matches!(err, Error::LockTableFull { key: k, .. } if k == &key),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("max_locks_per_transaction"),
            "{err}"
        );
    }
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );

    // Nothing was left behind, and the locks work again.
    assert!(session.try_lock().unwrap().is_some());
    assert!(tx.try_lock().unwrap().is_some());
}
