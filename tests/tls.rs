//! pglock over TLS: a pool of `postgres-openssl` connections (`sslmode=require`, the
//! server's self-signed certificate trusted and checked) takes a `SessionLock` and a
//! `LeaseLock`, and a wait is cancelled through `CancelHandle::cancel_with`, whose cancel
//! request goes over TLS too. `ci/with-postgres` turns TLS on and exports the certificate
//! as `PGLOCK_TLS_CERT`.

mod common;

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::{admin, wait_for_waiters};
use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use pglock::{Error, LeaseLock, LeaseTable, LockOptions, SessionGuard, SessionLock};
use postgres::config::SslMode;
use postgres_openssl::MakeTlsConnector;
use r2d2_postgres::PostgresConnectionManager;

/// A connector that trusts only the test server's certificate, and checks it.
fn connector() -> MakeTlsConnector {
    let cert = std::env::var("PGLOCK_TLS_CERT").unwrap_or_else(|_| {
        panic!(
            "\n\nPGLOCK_TLS_CERT is not set: this test needs a server that accepts TLS, and \
             the certificate to trust.\nRun the tests through ci/with-postgres, which turns \
             TLS on with a self-signed certificate, or set PGLOCK_TLS_CERT to the CA file of \
             the server in DATABASE_URL.\n\n"
        )
    });
    let mut builder = SslConnector::builder(SslMethod::tls()).unwrap();
    builder.set_ca_file(&cert).unwrap();
    builder.set_verify(SslVerifyMode::PEER);
    MakeTlsConnector::new(builder.build())
}

type TlsPool = r2d2::Pool<PostgresConnectionManager<MakeTlsConnector>>;

fn tls_pool(size: u32) -> TlsPool {
    let mut config = common::config();
    config.ssl_mode(SslMode::Require);
    r2d2::Pool::builder()
        .max_size(size)
        .min_idle(Some(0))
        .connection_timeout(Duration::from_secs(10))
        .build(PostgresConnectionManager::new(config, connector()))
        .expect("connect to DATABASE_URL over TLS")
}

fn uses_tls(conn: &mut postgres::Client) -> bool {
    conn.query_one(
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        &[],
    )
    .unwrap()
    .get(0)
}

#[test]
fn session_and_lease_locks_and_a_cancel_over_tls() {
    let key = unique_key!();
    let pool = tls_pool(6);
    let mut admin = admin();

    // A session lock, held on a TLS connection, excludes another.
    let mut lock = SessionLock::new(&pool, key.clone()).unwrap();
    let mut guard = lock.lock().unwrap();
    assert!(
        uses_tls(&mut guard),
        "the lock's connection is not encrypted"
    );
    let mut other = SessionLock::new(&pool, key.clone()).unwrap();
    assert!(other.try_lock().unwrap().is_none());

    // A wait for it, cancelled through a TLS cancel request.
    let (setup_tx, setup_rx) = mpsc::channel();
    let waiter = {
        let (pool, key) = (pool.clone(), key.clone());
        thread::spawn(move || {
            let mut lock = SessionLock::with_options(&pool, key, LockOptions::new()).unwrap();
            setup_tx.send(lock.cancel_handle()).unwrap();
            lock.lock().map(|_| ())
        })
    };
    let cancel = setup_rx.recv().unwrap();
    wait_for_waiters(&mut admin, &key, 1);
    cancel.cancel_with(connector()).unwrap();
    let err = waiter.join().unwrap().unwrap_err();
    assert!(matches!(err, Error::Cancelled { .. }), "{err:?}");
    SessionGuard::unlock(guard).unwrap();
    assert!(
        other.try_lock().unwrap().is_some(),
        "the lock is free again"
    );

    // A lease on the same kind of pool, fenced in a TLS transaction.
    LeaseTable::default().create(&mut admin).unwrap();
    let name = function_name!();
    let mut lease = LeaseLock::new(&pool, name).unwrap();
    let held = lease.lock().unwrap();
    assert!(LeaseLock::new(&pool, name)
        .unwrap()
        .try_lock()
        .unwrap()
        .is_none());
    let mut conn = pool.get().unwrap();
    assert!(uses_tls(&mut conn));
    let mut tx = conn.transaction().unwrap();
    held.fence(&mut tx).unwrap();
    tx.commit().unwrap();
    held.unlock().unwrap();
}
