//! Locks that outlive their session, guards that own their connection, and the paths
//! where pglock must end a session it cannot trust.

mod common;

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::{admin, backend_pid, backend_state, holders, pool, pool_with, wait_for_waiters};
use pglock::{
    Error, LockOptions, OwnedSessionGuard, OwnedTxGuard, SessionGuard, SessionLock, TxLock,
};
use postgres::Client;

fn terminate(admin: &mut Client, pid: i32) {
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap();
    common::wait_until("the session is gone", Duration::from_secs(10), || {
        backend_state(admin, pid).is_none()
    });
}

#[test]
fn a_lock_whose_session_was_terminated_locks_again_on_a_fresh_connection() {
    let key = unique_key!();
    let pool = pool(1);
    let mut admin = admin();
    let mut lock = SessionLock::new(&pool, key.clone()).unwrap();
    let mut guard = lock.lock().unwrap();
    let pid = backend_pid(&mut guard);
    terminate(&mut admin, pid);
    // The guard learns of the loss at unlock...
    let err = SessionGuard::unlock(guard).unwrap_err();
    assert!(matches!(err, Error::LockLost { .. }), "{err:?}");
    // ...and the lock goes on, on a fresh connection from its pool of one.
    let mut guard = lock.lock().expect("a fresh connection from the pool");
    assert_ne!(backend_pid(&mut guard), pid);
    assert_eq!(holders(&mut admin, &key), 1);
    drop(guard);

    // Also when the next lock call is the first to meet the dead session, for both scopes.
    let mut guard = lock.lock().unwrap();
    let pid = backend_pid(&mut guard);
    drop(guard);
    terminate(&mut admin, pid);
    assert!(lock.try_lock().unwrap().is_some());
    drop(lock);
    let mut lock = TxLock::new(&pool, key.clone()).unwrap();
    let mut guard = lock.lock().unwrap();
    let pid = backend_pid(&mut guard);
    pglock::TxGuard::commit(guard).unwrap();
    terminate(&mut admin, pid);
    let mut guard = lock.lock().expect("a fresh connection from the pool");
    assert_ne!(backend_pid(&mut guard), pid);
    pglock::TxGuard::commit(guard).unwrap();
}

#[test]
fn owned_guards_move_across_threads_and_release_on_drop() {
    fn assert_send_static<T: Send + 'static>() {}
    assert_send_static::<OwnedSessionGuard>();
    assert_send_static::<OwnedTxGuard>();

    let key = unique_key!();
    let pool = pool(2);
    let mut admin = admin();
    let mut guard = SessionLock::new(&pool, key.clone())
        .unwrap()
        .lock_owned()
        .unwrap();
    assert!(OwnedSessionGuard::is_held(&mut guard).unwrap());
    let pid = backend_pid(&mut guard);
    let (tx, rx) = mpsc::channel();
    let holder = thread::spawn(move || {
        // Held in another thread, then released by drop.
        tx.send(OwnedSessionGuard::key(&guard).clone()).unwrap();
        drop(guard);
    });
    assert_eq!(rx.recv().unwrap(), key);
    holder.join().unwrap();
    assert_eq!(holders(&mut admin, &key), 0);
    assert_eq!(common::advisory_locks_of(&mut admin, pid), 0);

    // try_lock_owned: None when busy, and the busy lock's connection goes back.
    let mut blocker = SessionLock::new(&pool, key.clone()).unwrap();
    let held = blocker.lock().unwrap();
    assert!(SessionLock::new(&pool, key.clone())
        .unwrap()
        .try_lock_owned()
        .unwrap()
        .is_none());
    SessionGuard::unlock(held).unwrap();
    drop(blocker);

    // A transaction lock's owned guard commits or rolls back.
    let table = "pglock_test_owned_tx";
    common::fresh_table(&mut admin, table);
    let mut guard = TxLock::new(&pool, key.clone())
        .unwrap()
        .lock_owned()
        .unwrap();
    guard
        .batch_execute(&format!("INSERT INTO {table} VALUES (1)"))
        .unwrap();
    OwnedTxGuard::commit(guard).unwrap();
    let n: i64 = admin
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    assert_eq!(holders(&mut admin, &key), 0);
}

#[test]
fn a_session_that_refuses_pg_terminate_backend_is_still_ended() {
    // A hardened server revokes pg_terminate_backend from ordinary roles. When pglock must
    // end its session (here: a cancel request was sent during a wait), it then makes the
    // session time out, so the connection never goes back to the pool alive.
    let mut admin = admin();
    let db = "pglock_test_hardened";
    admin
        .batch_execute(
            "DO $$ BEGIN
                 CREATE ROLE pglock_test_hardened LOGIN;
             EXCEPTION WHEN duplicate_object THEN NULL; END $$",
        )
        .unwrap();
    if let Err(e) = admin.batch_execute(&format!("CREATE DATABASE {db}")) {
        assert_eq!(
            e.code(),
            Some(&postgres::error::SqlState::DUPLICATE_DATABASE),
            "{e}"
        );
    }
    let mut config = common::config();
    config.dbname(db);
    let mut owner = config.connect(postgres::NoTls).unwrap();
    owner
        .batch_execute(
            "REVOKE EXECUTE ON FUNCTION pg_catalog.pg_terminate_backend(integer, bigint) \
             FROM PUBLIC",
        )
        .unwrap();
    config.user("pglock_test_hardened");
    let pool = pool_with(2, config);
    let key = unique_key!();
    let mut holder = SessionLock::new(&pool, key.clone()).unwrap();
    let held = holder.lock().unwrap();
    let (cancel, pid, done) = common::spawn_waiter(&pool, &key, LockOptions::new(), false);
    let mut db_admin = {
        let mut c = common::config();
        c.dbname(db);
        c.connect(postgres::NoTls).unwrap()
    };
    wait_for_waiters(&mut db_admin, &key, 1);
    cancel.cancel().unwrap();
    let err = done
        .recv_timeout(Duration::from_secs(10))
        .expect("the cancelled waiter did not return")
        .unwrap_err();
    assert!(matches!(err, Error::Cancelled { .. }), "{err:?}");
    common::wait_until("the waiter's session ends", Duration::from_secs(10), || {
        backend_state(&mut admin, pid).is_none()
    });
    SessionGuard::unlock(held).unwrap();
}

/// A TLS connector that refuses every connection: a cancel request sent through it never
/// leaves the client.
struct RefusingTls;

impl postgres::tls::MakeTlsConnect<postgres::Socket> for RefusingTls {
    type Stream = postgres::tls::NoTlsStream;
    type TlsConnect = postgres::NoTls;
    type Error = std::io::Error;

    fn make_tls_connect(&mut self, _domain: &str) -> Result<Self::TlsConnect, Self::Error> {
        Err(std::io::Error::other("refused by the test"))
    }
}

#[test]
fn a_cancel_that_could_not_be_sent_releases_the_lock_its_wait_then_took() {
    // The cancel request cannot be sent, so the wait goes on until the server grants the
    // lock. The waiter then holds it for real, finds itself cancelled, releases it, and
    // reports Cancelled: the path where a cancelled call actually took the lock.
    for transaction in [false, true] {
        let key = unique_key!(transaction);
        let pool = pool(2);
        let mut admin = admin();
        let mut holder = SessionLock::new(&pool, key.clone()).unwrap();
        let held = holder.lock().unwrap();
        let (cancel, pid, done) =
            common::spawn_waiter(&pool, &key, LockOptions::new(), transaction);
        wait_for_waiters(&mut admin, &key, 1);
        let err = cancel.cancel_with(RefusingTls).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Database {
                    operation: "cancel",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(cancel.is_cancelled());
        assert!(
            done.recv_timeout(Duration::from_millis(200)).is_err(),
            "the wait cannot end before the lock is free: no request reached the server"
        );
        SessionGuard::unlock(held).unwrap();
        let err = done
            .recv_timeout(Duration::from_secs(10))
            .expect("the waiter did not return")
            .unwrap_err();
        assert!(
            matches!(&err, Error::Cancelled { key: k } if k == &key),
            "{err:?}"
        );
        assert_eq!(
            holders(&mut admin, &key),
            0,
            "the lock the wait took was released"
        );
        assert_eq!(common::advisory_locks_of(&mut admin, pid), 0);
        // The session was trusted (no cancel request can land on it later): it lives on.
        assert!(backend_state(&mut admin, pid).is_some());
    }
}
