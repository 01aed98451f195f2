//! The round-trip budget, counted exactly: each public operation's protocol round trips,
//! through a proxy that counts the server's ReadyForQuery messages (every round trip, in
//! the simple or the extended protocol, ends with exactly one). A regression from one
//! round trip to two fails here, without any timing.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::{admin, pool_with};
use pglock::{LockMode, LockOptions, SessionGuard, SessionLock, TxGuard, TxLock, WaitMode};
use postgres::config::Host;

/// A TCP proxy in front of the server that counts ReadyForQuery ('Z') messages.
struct CountingProxy {
    port: u16,
    ready: Arc<AtomicU64>,
}

impl CountingProxy {
    fn start() -> CountingProxy {
        let config = common::config();
        let host = match &config.get_hosts()[0] {
            Host::Tcp(host) => host.clone(),
            #[cfg(unix)]
            Host::Unix(_) => panic!("the round-trip test needs a TCP DATABASE_URL"),
        };
        let upstream = (host, config.get_ports().first().copied().unwrap_or(5432));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let ready = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&ready);
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let server = TcpStream::connect(upstream.clone()).unwrap();
                client.set_nodelay(true).unwrap();
                server.set_nodelay(true).unwrap();
                let (mut c_read, mut s_write) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                thread::spawn(move || {
                    let _ = std::io::copy(&mut c_read, &mut s_write);
                    let _ = s_write.shutdown(Shutdown::Write);
                });
                let counter = Arc::clone(&counter);
                thread::spawn(move || forward_counting(server, client, &counter));
            }
        });
        CountingProxy { port, ready }
    }

    fn pool(&self, size: u32) -> common::Pool {
        // `Config::host` adds a host rather than replacing it: start from a fresh config.
        let server = common::config();
        let mut config = postgres::Config::new();
        config.host("127.0.0.1").port(self.port);
        if let Some(user) = server.get_user() {
            config.user(user);
        }
        if let Some(password) = server.get_password() {
            config.password(password);
        }
        if let Some(dbname) = server.get_dbname() {
            config.dbname(dbname);
        }
        pool_with(size, config)
    }

    /// The round trips `op` makes.
    fn count<R>(&self, op: impl FnOnce() -> R) -> (u64, R) {
        let before = self.ready.load(Ordering::SeqCst);
        let result = op();
        (self.ready.load(Ordering::SeqCst) - before, result)
    }
}

/// Copies the server's messages to the client, counting ReadyForQuery. Counts before
/// forwarding, so a count is complete once the client has read the reply.
fn forward_counting(mut server: TcpStream, mut client: TcpStream, ready: &AtomicU64) {
    let mut header = [0u8; 5];
    loop {
        if server.read_exact(&mut header).is_err() {
            break;
        }
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        let mut body = vec![0u8; len.saturating_sub(4)];
        if server.read_exact(&mut body).is_err() {
            break;
        }
        if header[0] == b'Z' {
            ready.fetch_add(1, Ordering::SeqCst);
        }
        if client
            .write_all(&header)
            .and_then(|_| client.write_all(&body))
            .is_err()
        {
            break;
        }
    }
    let _ = client.shutdown(Shutdown::Write);
}

#[test]
fn session_lock_operations_cost_one_round_trip() {
    let proxy = CountingProxy::start();
    let pool = proxy.pool(1);
    for mode in [LockMode::Exclusive, LockMode::Shared] {
        let key = unique_key!(format!("{mode:?}"));
        let options = LockOptions::new().mode(mode);
        let conn = pool.get().unwrap();
        let (n, lock) = proxy.count(|| SessionLock::from_connection(conn, key.clone(), options));
        let mut lock = lock.unwrap();
        assert_eq!(n, 0, "{mode:?}: making a lock");

        // A connection's first use of each statement prepares it, in the same round trip.
        let (n, guard) = proxy.count(|| lock.try_lock().unwrap().unwrap());
        assert_eq!(n, 1, "{mode:?}: first try_lock: prepare and execute");
        let (n, _) = proxy.count(|| SessionGuard::unlock(guard).unwrap());
        assert_eq!(n, 1, "{mode:?}: first unlock: prepare and execute");
        let (n, guard) = proxy.count(|| lock.lock().unwrap());
        assert_eq!(n, 1, "{mode:?}: first lock: prepare and execute");
        drop(guard);

        let (n, guard) = proxy.count(|| lock.try_lock().unwrap().unwrap());
        assert_eq!(n, 1, "{mode:?}: try_lock");
        let (n, _) = proxy.count(|| SessionGuard::unlock(guard).unwrap());
        assert_eq!(n, 1, "{mode:?}: unlock");

        let (n, guard) = proxy.count(|| lock.lock().unwrap());
        assert_eq!(n, 1, "{mode:?}: lock without a bound");
        let (n, _) = proxy.count(|| drop(guard));
        assert_eq!(n, 1, "{mode:?}: dropping a guard");

        let (n, mut guard) =
            proxy.count(|| lock.try_lock_for(Duration::from_secs(5)).unwrap().unwrap());
        assert_eq!(n, 1, "{mode:?}: try_lock_for");
        let (n, held) = proxy.count(|| SessionGuard::is_held(&mut guard).unwrap());
        assert!(held);
        assert_eq!(n, 1, "{mode:?}: is_held");
        drop(guard);

        let (n, _) = proxy.count(|| lock.with_lock(|_| Ok::<_, pglock::Error>(())).unwrap());
        assert_eq!(n, 2, "{mode:?}: with_lock with an empty body");

        let (n, conn) = proxy.count(|| lock.into_connection().unwrap());
        assert_eq!(n, 0, "{mode:?}: into_connection");
        // The prepared statements stay with the connection, for the next lock on it.
        let mut lock =
            SessionLock::from_connection(conn, unique_key!("again"), LockOptions::new().mode(mode))
                .unwrap();
        let (n, guard) = proxy.count(|| lock.try_lock().unwrap().unwrap());
        assert_eq!(
            n, 1,
            "{mode:?}: try_lock by a new lock on a used connection"
        );
        drop(guard);
        let (n, _) = proxy.count(|| lock.set_key(unique_key!("third")).unwrap());
        assert_eq!(n, 0, "{mode:?}: set_key");
        let (n, guard) = proxy.count(|| lock.lock().unwrap());
        assert_eq!(n, 1, "{mode:?}: lock after set_key");
        drop(guard);
    }

    // A bounded wait is one round trip too, whatever the bound.
    let options = LockOptions::new().lock_timeout(Duration::from_millis(1500));
    let mut lock = SessionLock::with_options(&pool, unique_key!("bounded"), options).unwrap();
    let (n, guard) = proxy.count(|| lock.lock().unwrap());
    assert_eq!(n, 1, "lock with a bound");
    drop(guard);
    let (n, guard) = proxy.count(|| lock.try_lock_for(Duration::from_millis(250)).unwrap());
    assert_eq!(n, 1, "try_lock_for with another bound");
    drop(guard);
    drop(lock);

    let options = LockOptions::new().wait_mode(WaitMode::poll());
    let mut lock = SessionLock::with_options(&pool, unique_key!("poll"), options).unwrap();
    let (n, guard) = proxy.count(|| lock.lock().unwrap());
    assert_eq!(n, 1, "polling lock on a free key");
    drop(guard);
}

#[test]
fn transaction_lock_operations_cost_one_round_trip() {
    let proxy = CountingProxy::start();
    let pool = proxy.pool(1);
    let mut lock = TxLock::new(&pool, unique_key!()).unwrap();

    let (n, guard) = proxy.count(|| lock.lock().unwrap());
    assert_eq!(n, 1, "lock: BEGIN rides with the lock");
    let (n, _) = proxy.count(|| TxGuard::commit(guard).unwrap());
    assert_eq!(n, 1, "commit");

    let (n, mut guard) = proxy.count(|| lock.try_lock().unwrap().unwrap());
    assert_eq!(n, 1, "try_lock");
    let (n, _) = proxy.count(|| TxGuard::is_held(&mut guard).unwrap());
    assert_eq!(n, 1, "is_held");
    let (n, _) = proxy.count(|| TxGuard::rollback(guard).unwrap());
    assert_eq!(n, 1, "rollback");

    let (n, guard) = proxy.count(|| lock.try_lock_for(Duration::from_secs(1)).unwrap().unwrap());
    assert_eq!(n, 1, "try_lock_for");
    let (n, _) = proxy.count(|| drop(guard));
    assert_eq!(n, 1, "dropping a guard");

    let (n, _) = proxy.count(|| lock.with_lock(|_| Ok::<_, pglock::Error>(())).unwrap());
    assert_eq!(n, 2, "with_lock with an empty body");
}

#[test]
fn contention_costs_are_pinned_too() {
    let proxy = CountingProxy::start();
    let pool = proxy.pool(2);
    let key = unique_key!();
    let mut holder = SessionLock::new(&pool, key.clone()).unwrap();
    let _held = holder.lock().unwrap();

    let mut session = SessionLock::new(&pool, key.clone()).unwrap();
    assert!(
        session.try_lock().unwrap().is_none(),
        "warm-up: prepares the try"
    );
    let (n, got) = proxy.count(|| session.try_lock().unwrap().is_none());
    assert!(got);
    assert_eq!(n, 1, "a busy session try_lock");
    // A failed wait checks pg_locks for a lock granted in the race: one more round trip.
    let warm = session.try_lock_for(Duration::from_millis(20)).unwrap();
    assert!(warm.is_none(), "warm-up: prepares the wait");
    drop(warm);
    let (n, got) = proxy.count(|| {
        session
            .try_lock_for(Duration::from_millis(20))
            .unwrap()
            .is_none()
    });
    assert!(got);
    assert_eq!(n, 2, "a session wait that times out");
    drop(session);

    let mut tx = TxLock::new(&pool, key.clone()).unwrap();
    // The try opened a transaction, which a second round trip ends.
    let (n, got) = proxy.count(|| tx.try_lock().unwrap().is_none());
    assert!(got);
    assert_eq!(n, 2, "a busy transaction try_lock");
    let (n, got) = proxy.count(|| {
        tx.try_lock_for(Duration::from_millis(20))
            .unwrap()
            .is_none()
    });
    assert!(got);
    assert_eq!(n, 2, "a transaction wait that times out");
    assert_eq!(common::holders(&mut admin(), &key), 1);
}

#[test]
fn the_proxy_counts_what_it_should() {
    // The instrument itself: one simple query is one round trip, and a parameterised
    // query without a prepared statement is two (prepare, then execute).
    let proxy = CountingProxy::start();
    let pool = proxy.pool(1);
    let mut conn = pool.get().unwrap();
    let (n, _) = proxy.count(|| conn.simple_query("SELECT 1").unwrap());
    assert_eq!(n, 1);
    let (n, _) = proxy.count(|| conn.query("SELECT $1::int", &[&1i32]).unwrap());
    assert_eq!(n, 2);
}
