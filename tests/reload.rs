//! A configuration reload can give every session a `statement_timeout` behind pglock's
//! back, after pglock learnt that its session had none. The test changes the whole
//! server's configuration, so nextest runs it alone (`.config/nextest.toml`).

mod common;

use std::time::{Duration, Instant};

use common::{admin, pool};
use pglock::{Error, LockOptions, SessionGuard, SessionLock, TxGuard, TxLock};
use postgres::Client;

/// Sets `statement_timeout` for the whole server until dropped.
struct ServerStatementTimeout(Client);

impl ServerStatementTimeout {
    fn set(value: &str) -> ServerStatementTimeout {
        let mut admin = admin();
        admin
            .batch_execute(&format!("ALTER SYSTEM SET statement_timeout = '{value}'"))
            .unwrap();
        admin.batch_execute("SELECT pg_reload_conf()").unwrap();
        // New sessions see it once the server reloaded; it has then signalled the old ones,
        // which apply it before their next statement.
        common::wait_until("the server reloaded", Duration::from_secs(10), || {
            let mut fresh = common::admin();
            let now: String = fresh
                .query_one("SHOW statement_timeout", &[])
                .unwrap()
                .get(0);
            now == value
        });
        ServerStatementTimeout(admin)
    }
}

impl Drop for ServerStatementTimeout {
    fn drop(&mut self) {
        let _ = self.0.batch_execute("ALTER SYSTEM RESET statement_timeout");
        let _ = self.0.batch_execute("SELECT pg_reload_conf()");
    }
}

#[test]
fn a_statement_timeout_from_a_reload_does_not_cut_a_wait_short() {
    let key = unique_key!();
    let pool = pool(3);
    let bound = Duration::from_millis(1000);
    let options = LockOptions::new().lock_timeout(bound);
    let mut session = SessionLock::with_options(&pool, key.clone(), options.clone()).unwrap();
    let mut tx = TxLock::with_options(&pool, key.clone(), options).unwrap();
    // Both learn that their sessions have no timeouts.
    SessionGuard::unlock(session.try_lock().unwrap().unwrap()).unwrap();
    TxGuard::commit(tx.try_lock().unwrap().unwrap()).unwrap();

    let mut holder = SessionLock::new(&pool, key.clone()).unwrap();
    let _held = holder.lock().unwrap();
    let _reloaded = ServerStatementTimeout::set("200ms");
    // A statement on each session, so that each has applied the reload.
    assert!(session.try_lock().unwrap().is_none());
    assert!(tx.try_lock().unwrap().is_none());

    let start = Instant::now();
    let result = session.lock().map(|_| ());
    // Not 57014 after 200 ms: the bound pglock was given.
    assert!(matches!(result, Err(Error::Timeout { .. })), "{result:?}");
    assert!(start.elapsed() >= bound, "after {:?}", start.elapsed());
    let start = Instant::now();
    let result = tx.lock().map(|_| ());
    assert!(matches!(result, Err(Error::Timeout { .. })), "{result:?}");
    assert!(start.elapsed() >= bound, "after {:?}", start.elapsed());
}
