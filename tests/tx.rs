//! `TxLock` semantics against the real server: the lock and the work share one
//! transaction, which commits on success and rolls back otherwise.

mod common;

use std::time::Duration;

use common::{admin, backend_pid, backend_state, holders, pool, pool_with, wait_for_waiters};
use pglock::{Error, LockKey, LockOptions, LostReason, TxGuard, TxLock};
use postgres::Client;

fn rows(admin: &mut Client, name: &str) -> i64 {
    admin
        .query_one(&format!("SELECT count(*) FROM {name}"), &[])
        .unwrap()
        .get(0)
}

/// The values of a one-column table, in order.
fn values(admin: &mut Client, table: &str) -> Vec<i32> {
    admin
        .query(&format!("SELECT x FROM {table} ORDER BY x"), &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
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
    common::assert_session_ended(&TxGuard::commit(guard).unwrap_err());
    assert_eq!(holders(&mut admin, &key), 0);
}

#[test]
fn work_after_an_early_commit_is_never_committed() {
    // The critical section ends the lock's transaction and does more work in a new one:
    // that work ran without the lock, and the commit must not publish it.
    let key = unique_key!();
    let pool = pool(1);
    let mut admin = admin();
    let table = "pglock_test_early_commit";
    common::fresh_table(&mut admin, table);
    let mut lock = TxLock::new(&pool, key.clone()).unwrap();

    let mut guard = lock.lock().unwrap();
    guard
        .batch_execute(&format!("COMMIT; BEGIN; INSERT INTO {table} VALUES (1)"))
        .unwrap();
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
    assert_eq!(rows(&mut admin, table), 0, "unlocked work was committed");

    // The idiomatic `Client::transaction()`, reached through the deref, sends its own
    // BEGIN (ignored inside the lock's transaction) and COMMIT (which ends it).
    let mut guard = lock.lock().unwrap();
    let client: &mut Client = &mut guard;
    let mut inner = client.transaction().unwrap();
    inner
        .batch_execute(&format!("INSERT INTO {table} VALUES (2)"))
        .unwrap();
    inner.commit().unwrap();
    guard
        .batch_execute(&format!("BEGIN; INSERT INTO {table} VALUES (3)"))
        .unwrap();
    assert!(matches!(
        TxGuard::commit(guard),
        Err(Error::LockLost { .. })
    ));
    // What ran inside the lock's transaction (2) was committed by the user's own COMMIT;
    // what ran after it (3) was not.
    assert_eq!(values(&mut admin, table), vec![2]);
    assert_eq!(holders(&mut admin, &key), 0);
    assert!(lock.try_lock().unwrap().is_some(), "usable again");
}

#[test]
fn guard_transaction_opens_a_savepoint_inside_the_lock() {
    let key = unique_key!();
    let pool = pool(1);
    let mut admin = admin();
    let table = "pglock_test_savepoints";
    common::fresh_table(&mut admin, table);
    let mut lock = TxLock::new(&pool, key.clone()).unwrap();

    let mut guard = lock.lock().unwrap();
    let mut kept = guard.transaction().unwrap();
    kept.batch_execute(&format!("INSERT INTO {table} VALUES (1)"))
        .unwrap();
    {
        // A nested savepoint dropped without commit rolls back, and only itself.
        let mut dropped = kept.transaction().unwrap();
        dropped
            .batch_execute(&format!("INSERT INTO {table} VALUES (2)"))
            .unwrap();
    }
    kept.commit().unwrap();
    let mut failed = guard.transaction().unwrap();
    assert!(failed.batch_execute("SELECT 1/0").is_err());
    drop(failed); // rolls back to the savepoint: the transaction is healthy again
    assert!(
        TxGuard::is_held(&mut guard).unwrap(),
        "a savepoint never ends the lock"
    );
    assert_eq!(holders(&mut admin, &key), 1);
    assert_eq!(
        rows(&mut admin, table),
        0,
        "nothing visible before the commit"
    );
    TxGuard::commit(guard).unwrap();
    assert_eq!(values(&mut admin, table), vec![1]);
}

#[test]
fn a_connection_lost_during_commit_is_an_unknown_outcome() {
    // A deferred constraint trigger makes COMMIT run long; the session is terminated
    // while it runs. The client cannot know whether it committed, and must not say
    // "rolled back".
    let key = unique_key!();
    let pool = pool(1);
    let mut admin = admin();
    let table = "pglock_test_slow_commit";
    admin
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (x int);
             CREATE OR REPLACE FUNCTION pglock_test_slow() RETURNS trigger LANGUAGE plpgsql
                 AS $$ BEGIN PERFORM pg_sleep(30); RETURN NULL; END $$;
             CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON {table}
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION pglock_test_slow();"
        ))
        .unwrap();
    let mut lock = TxLock::new(&pool, key.clone()).unwrap();
    let mut guard = lock.lock().unwrap();
    let pid = backend_pid(&mut guard);
    guard
        .batch_execute(&format!("INSERT INTO {table} VALUES (1)"))
        .unwrap();
    let killer = std::thread::spawn(move || {
        let mut admin = common::admin();
        common::wait_until("COMMIT runs", Duration::from_secs(10), || {
            admin
                .query_opt(
                    "SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND state = 'active' \
                     AND query LIKE '%COMMIT'",
                    &[&pid],
                )
                .unwrap()
                .is_some()
        });
        admin
            .execute("SELECT pg_terminate_backend($1)", &[&pid])
            .unwrap();
    });
    let err = TxGuard::commit(guard).unwrap_err();
    killer.join().unwrap();
    assert!(matches!(err, Error::CommitOutcomeUnknown { .. }), "{err:?}");
    assert!(err.to_string().contains("unknown"), "{err}");
    // A terminated backend frees its locks as it exits, a moment after its FATAL.
    common::wait_until(
        "the terminated backend let go",
        Duration::from_secs(10),
        || holders(&mut admin, &key) == 0,
    );
    // The lock takes a fresh connection from its pool and goes on.
    assert!(lock.try_lock().unwrap().is_some());
}

#[test]
fn the_critical_section_sees_the_sessions_settings_on_every_path() {
    // Values a session-level SET (or an r2d2 CustomizeConnection) gave the connection
    // reach the critical section whether the lock was taken by a try, a first (lifting)
    // wait or a later (prepared-fast) wait.
    let key = unique_key!();
    let pool = pool(1);
    {
        let mut conn = pool.get().unwrap();
        conn.batch_execute("SET statement_timeout = '9s'; SET lock_timeout = '4s'")
            .unwrap();
    }
    let options = LockOptions::new().lock_timeout(Duration::from_millis(1500));
    let mut lock = TxLock::with_options(&pool, key, options).unwrap();
    let show = |c: &mut Client, what: &str| -> String {
        c.query_one(&format!("SHOW {what}"), &[]).unwrap().get(0)
    };
    for path in ["try", "first wait", "second wait", "unbounded"] {
        let mut guard = match path {
            "try" => lock.try_lock().unwrap().unwrap(),
            "unbounded" => lock.try_lock_for(Duration::from_secs(3)).unwrap().unwrap(),
            _ => lock.lock().unwrap(),
        };
        assert_eq!(show(&mut guard, "statement_timeout"), "9s", "{path}");
        assert_eq!(show(&mut guard, "lock_timeout"), "4s", "{path}");
        TxGuard::commit(guard).unwrap();
    }
    drop(lock);
    let mut conn = pool.get().unwrap();
    assert_eq!(show(&mut conn, "statement_timeout"), "9s");
    assert_eq!(show(&mut conn, "lock_timeout"), "4s");
}

#[test]
fn a_session_ended_by_idle_in_transaction_timeout_before_commit_is_lost_not_unknown() {
    // The server ends the session while the critical section keeps it idle in the
    // transaction, before COMMIT arrives: nothing was committed, and pglock says so
    // (LockLost), not "outcome unknown".
    let key = unique_key!();
    let mut config = common::config();
    config.options("-c idle_in_transaction_session_timeout=100");
    let pool = pool_with(1, config);
    let mut lock = TxLock::new(&pool, key).unwrap();
    let result = lock.with_lock(|conn| -> Result<(), Error> {
        conn.batch_execute("SELECT 1").unwrap();
        // Idle in the transaction past the server's limit.
        std::thread::sleep(Duration::from_millis(600));
        Ok(())
    });
    common::assert_session_ended(&result.unwrap_err());
}

/// What a `TxLock` on `key` says on a server session that holds `held` (a session lock)
/// and carries `marker`, as another client's `SessionLock` leaves them behind a pooler.
fn tx_lock_beside(held: Option<&str>, marker: &str, key: LockKey) -> [&'static str; 2] {
    let pool = pool(1);
    let mut conn = pool.get().unwrap();
    if let Some(held) = held {
        conn.batch_execute(&format!("SELECT pg_advisory_lock({held})"))
            .unwrap();
    }
    conn.execute(
        "SELECT set_config('pglock.session_lock', $1, false)",
        &[&marker],
    )
    .unwrap();
    let bounded = LockOptions::new().lock_timeout(Duration::from_millis(300));
    let mut lock = TxLock::from_connection(conn, key, bounded).unwrap();
    let said = |taken: Result<bool, Error>| match taken {
        Ok(true) => "granted",
        Ok(false) => "busy",
        Err(Error::SessionShared { .. }) => "refused",
        Err(e) => panic!("{e:?}"),
    };
    let tried = said(lock.try_lock().map(|g| g.is_some()));
    let waited = said(lock.lock().map(|_| true));
    let mut conn = lock.into_connection().unwrap();
    conn.batch_execute(
        "SELECT pg_advisory_unlock_all(), set_config('pglock.session_lock', '', false)",
    )
    .unwrap();
    [tried, waited]
}

#[test]
fn a_transaction_lock_refuses_exactly_the_key_its_server_sessions_marker_names() {
    // (held key as SQL arguments, the held key, another key that must be granted beside it):
    // keys whose text ends with the other's, the two key spaces, negative and extreme keys.
    let cases = [
        ("31337", LockKey::new(31337), LockKey::new(131_337)),
        ("131337", LockKey::new(131_337), LockKey::new(31337)),
        ("-31337", LockKey::new(-31337), LockKey::pair(1, -31337)),
        ("1, -31337", LockKey::pair(1, -31337), LockKey::new(-31337)),
        (
            "11, 31337",
            LockKey::pair(11, 31337),
            LockKey::pair(1, 31337),
        ),
        (
            "4294998633",
            LockKey::new(4_294_998_633),
            LockKey::pair(1, 31337),
        ),
        (
            "-9223372036854775807",
            LockKey::new(i64::MIN + 1),
            LockKey::new(i64::MAX - 1),
        ),
        (
            "-9223372036854775808",
            LockKey::new(i64::MIN),
            LockKey::new(i64::MAX),
        ),
        // The held key's text is a prefix of the other's.
        ("4", LockKey::new(4), LockKey::new(42)),
        ("0, 5", LockKey::pair(0, 5), LockKey::new(5)),
    ];
    for (args, held, other) in cases {
        let marker = format!("pglock:4242:ab@{}", args.replace(' ', ""));
        assert_eq!(
            tx_lock_beside(Some(args), &marker, held.clone()),
            ["refused"; 2],
            "{held} under {marker}"
        );
        assert_eq!(
            tx_lock_beside(Some(args), &marker, other.clone()),
            ["granted"; 2],
            "{other} beside {held} under {marker}"
        );
    }
    // On the safe side: a marker naming no key (an earlier pglock's) refuses every key,
    // and so does one naming a key its session no longer holds.
    let key = LockKey::new(31338);
    assert_eq!(
        tx_lock_beside(Some("31338"), "pglock:4242:ab", key.clone()),
        ["refused"; 2]
    );
    assert_eq!(
        tx_lock_beside(None, "pglock:4242:ab", LockKey::new(31339)),
        ["refused"; 2]
    );
    assert_eq!(
        tx_lock_beside(None, "pglock:4242:ab@31338", key),
        ["refused"; 2]
    );
}

/// A connection can come out of the pool inside a transaction that other code left open.
/// A transaction lock's `BEGIN` would join it, and its commit would commit that work with
/// the lock's. So the lock takes nothing there: the transaction is rolled back and
/// reported, and the next call locks. Healthy or failed, waiting or not.
#[test]
fn a_transaction_lock_refuses_a_connection_that_comes_inside_a_transaction() {
    let key = unique_key!();
    let pool = pool(1);
    let mut admin = admin();
    admin
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS pglock_tx_came_open (who text); \
             DELETE FROM pglock_tx_came_open",
        )
        .unwrap();
    for (opened, wait) in [
        (
            "BEGIN; INSERT INTO pglock_tx_came_open VALUES ('orphan')",
            false,
        ),
        (
            "BEGIN; INSERT INTO pglock_tx_came_open VALUES ('orphan')",
            true,
        ),
        ("BEGIN; SELECT 1/0", false),
    ] {
        let pid = common::leave_open(&pool, opened);
        let mut lock = TxLock::new(&pool, key.clone()).unwrap();
        let refused = if wait {
            lock.try_lock_for(Duration::from_secs(5)).map(|_| ())
        } else {
            lock.try_lock().map(|_| ())
        };
        let what = format!("{opened} (wait: {wait})");
        common::assert_refused_inside_transaction(&mut admin, &key, pid, &what, refused);
        lock.with_lock(|_| Ok::<_, Error>(())).unwrap();
        let orphans: i64 = admin
            .query_one("SELECT count(*) FROM pglock_tx_came_open", &[])
            .unwrap()
            .get(0);
        assert_eq!(orphans, 0, "the orphaned transaction's work was committed");
    }
}
