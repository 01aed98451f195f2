//! Least privilege: a role with LOGIN and nothing else (no table, no superuser, no
//! pg_signal_backend) uses `SessionLock` and `TxLock`, in both modes, including the paths
//! where pglock ends its own session (a cancel that reached the server during a wait),
//! which it may: a role can always terminate its own backends.

mod common;

use std::time::Duration;

use common::{admin, backend_pid, backend_state, holders, pool_with, wait_for_waiters};
use pglock::{Error, LockMode, LockOptions, SessionGuard, SessionLock, TxGuard, TxLock};

const ROLE: &str = "pglock_test_login_only";

fn login_only_pool(size: u32) -> common::Pool {
    let mut admin = admin();
    admin
        .batch_execute(&format!(
            "DO $$ BEGIN
                 CREATE ROLE {ROLE} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT;
             EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        ))
        .unwrap();
    let attributes: (bool, bool) = {
        let r = admin
            .query_one(
                "SELECT rolsuper, pg_has_role($1, 'pg_signal_backend', 'MEMBER') \
                 FROM pg_roles WHERE rolname = $1",
                &[&ROLE],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(attributes, (false, false), "the role has more than LOGIN");
    let mut config = common::config();
    config.user(ROLE);
    pool_with(size, config)
}

#[test]
fn a_login_only_role_takes_session_and_transaction_locks() {
    let key = unique_key!();
    let pool = login_only_pool(3);
    let mut admin = admin();
    for mode in [LockMode::Exclusive, LockMode::Shared] {
        let options = LockOptions::new().mode(mode);
        let mut a = SessionLock::with_options(&pool, key.clone(), options.clone()).unwrap();
        let mut guard = a.lock().unwrap();
        assert!(SessionGuard::is_held(&mut guard).unwrap());
        let mut b = TxLock::with_options(&pool, key.clone(), options).unwrap();
        match b.try_lock().unwrap() {
            Some(other) => {
                assert_eq!(mode, LockMode::Shared, "two exclusive holders");
                TxGuard::commit(other).unwrap();
            }
            None => assert_eq!(mode, LockMode::Exclusive, "readers excluded each other"),
        }
        SessionGuard::unlock(guard).unwrap();
        b.with_lock(|tx| -> Result<(), Error> {
            assert!(TxGuard::is_held(tx)?);
            Ok(())
        })
        .unwrap();
        let bounded = b.try_lock_for(Duration::from_millis(50)).unwrap().unwrap();
        TxGuard::rollback(bounded).unwrap();
    }
    assert_eq!(holders(&mut admin, &key), 0);
}

#[test]
fn a_login_only_role_ends_its_own_session_after_a_cancelled_wait() {
    // A cancel request that reached the server during a wait leaves a session pglock
    // cannot trust (the request may land on a later statement): pglock ends it with
    // pg_terminate_backend on its own backend, which a LOGIN-only role may do.
    let pool = login_only_pool(3);
    let mut admin = admin();
    for transaction in [false, true] {
        let key = unique_key!(transaction);
        let mut holder = SessionLock::new(&pool, key.clone()).unwrap();
        let held = holder.lock().unwrap();
        let (cancel, pid, done) =
            common::spawn_waiter(&pool, &key, LockOptions::new(), transaction);
        wait_for_waiters(&mut admin, &key, 1);
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
        // The holder's lock goes on as before on the same role.
        let mut guard = holder.lock().unwrap();
        assert_ne!(backend_pid(&mut guard), pid);
        SessionGuard::unlock(guard).unwrap();
        assert_eq!(holders(&mut admin, &key), 0);
    }
}
