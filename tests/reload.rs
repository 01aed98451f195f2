//! A configuration reload can give every session a `statement_timeout` or a
//! `lock_timeout` behind pglock's back, after pglock learnt that its session had none. The test changes the whole
//! server's configuration, so nextest runs it alone (`.config/nextest.toml`).

mod common;

use std::time::{Duration, Instant};

use common::{admin, pool};
use pglock::{Error, LockOptions, SessionGuard, SessionLock, TxGuard, TxLock};
use postgres::Client;

/// Sets a setting for the whole server until dropped.
struct ServerSetting(Client, &'static str);

impl ServerSetting {
    fn set(name: &'static str, value: &str) -> ServerSetting {
        let mut admin = admin();
        admin
            .batch_execute(&format!("ALTER SYSTEM SET {name} = '{value}'"))
            .unwrap();
        admin.batch_execute("SELECT pg_reload_conf()").unwrap();
        // New sessions see it once the server reloaded; it has then signalled the old ones,
        // which apply it before their next statement.
        common::wait_until("the server reloaded", Duration::from_secs(10), || {
            let mut fresh = common::admin();
            let now: String = fresh
                .query_one(&format!("SHOW {name}"), &[])
                .unwrap()
                .get(0);
            now == value
        });
        ServerSetting(admin, name)
    }
}

impl Drop for ServerSetting {
    fn drop(&mut self) {
        let _ = self
            .0
            .batch_execute(&format!("ALTER SYSTEM RESET {}", self.1));
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
    let _reloaded = ServerSetting::set("statement_timeout", "200ms");
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

#[test]
fn a_lock_timeout_from_a_reload_does_not_bound_an_unbounded_wait() {
    let key = unique_key!();
    let pool = pool(3);
    let mut session = SessionLock::new(&pool, key.clone()).unwrap();
    let mut tx = TxLock::new(&pool, key.clone()).unwrap();
    // Both learn that their sessions have no timeouts.
    SessionGuard::unlock(session.try_lock().unwrap().unwrap()).unwrap();
    TxGuard::commit(tx.try_lock().unwrap().unwrap()).unwrap();
    let _reloaded = ServerSetting::set("lock_timeout", "200ms");
    assert!(session.try_lock().unwrap().is_some(), "applies the reload");
    assert!(tx.try_lock().unwrap().is_some(), "applies the reload");

    for transaction in [false, true] {
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let holder_pool = pool.clone();
        let holder_key = key.clone();
        let holder = std::thread::spawn(move || {
            let mut holder = SessionLock::new(&holder_pool, holder_key).unwrap();
            let guard = holder.lock().unwrap();
            held_tx.send(()).unwrap();
            // Hold well past the reloaded lock_timeout.
            std::thread::sleep(Duration::from_millis(1000));
            SessionGuard::unlock(guard).unwrap();
        });
        held_rx.recv().unwrap();
        let start = Instant::now();
        // No bound: only the holder's release may end these waits.
        let result = if transaction {
            tx.lock().map(|g| TxGuard::commit(g).unwrap())
        } else {
            session.lock().map(|g| SessionGuard::unlock(g).unwrap())
        };
        assert!(result.is_ok(), "transaction={transaction}: {result:?}");
        assert!(
            start.elapsed() >= Duration::from_millis(500),
            "transaction={transaction}: granted after {:?} while held",
            start.elapsed()
        );
        holder.join().unwrap();
    }
}
