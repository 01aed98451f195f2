//! Proof under faults: failover. Each test starts a throwaway primary with a streaming
//! standby of its own (`PGLOCK_PG_FAILOVER`, from `ci/with-postgres`), takes locks through a
//! pool whose connection settings name both servers with `target_session_attrs=read-write`,
//! crashes the primary (`pg_ctl stop -m immediate`) and promotes the standby.
//!
//! Advisory locks live in the primary's memory: they end with it, and their holders hear
//! so at their next call. Leases live in a table row, which reaches the standby by
//! asynchronous streaming replication: a row that made it survives on the new primary; one
//! that did not (the last commits before a crash) is gone with its WAL.
//!
//! Each test prints what it measured (`cargo nextest run --test failover --no-capture`).

mod common;

use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use common::wait_until;
use pglock::{
    Error, Leader, LeaseLock, LeaseOptions, LeaseTable, LostReason, SessionGuard, SessionLock,
    TxGuard, TxLock,
};
use postgres::{Client, NoTls};
use r2d2_postgres::PostgresConnectionManager;

/// The bound on anything that must happen "at once" after the failover (a loaded 2-core
/// machine, debug build).
const PROMPTLY: Duration = Duration::from_secs(10);

fn failover_script() -> String {
    match std::env::var("PGLOCK_PG_FAILOVER") {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "\n\nPGLOCK_PG_FAILOVER is not set: tests/failover.rs needs the failover script of \
             ci/with-postgres, which starts a throwaway primary and standby for each test \
             and promotes the standby:\n\n    \
             ci/with-postgres cargo nextest run --features cli --test failover\n\n"
        ),
    }
}

/// A throwaway primary and its streaming standby, stopped and deleted when dropped.
struct Pair {
    script: String,
    dir: String,
    primary: u16,
    standby: u16,
}

impl Pair {
    fn start() -> Pair {
        let script = failover_script();
        let started = Instant::now();
        let output = Command::new(&script)
            .arg("start")
            .output()
            .expect("run PGLOCK_PG_FAILOVER start");
        assert!(
            output.status.success(),
            "PGLOCK_PG_FAILOVER start failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8(output.stdout).unwrap();
        let fields: Vec<&str> = stdout.split_whitespace().collect();
        assert_eq!(
            fields.len(),
            3,
            "PGLOCK_PG_FAILOVER start printed {stdout:?}"
        );
        let pair = Pair {
            script,
            dir: fields[0].to_owned(),
            primary: fields[1].parse().unwrap(),
            standby: fields[2].parse().unwrap(),
        };
        eprintln!(
            "failover: a primary (port {}) and its standby (port {}) started in {:?}",
            pair.primary,
            pair.standby,
            started.elapsed()
        );
        pair
    }

    fn url(port: u16) -> String {
        format!("postgres://postgres@127.0.0.1:{port}/postgres")
    }

    fn connect(port: u16) -> Client {
        Client::connect(&Pair::url(port), NoTls).expect("connect to the pair")
    }

    /// Both servers, primary first: new connections go to whichever accepts writes.
    fn multi_host(&self) -> postgres::Config {
        format!(
            "host=127.0.0.1,127.0.0.1 port={},{} user=postgres dbname=postgres \
             target_session_attrs=read-write connect_timeout=5",
            self.primary, self.standby
        )
        .parse()
        .expect("a multi-host connection string")
    }

    /// Waits until the standby has replayed everything the primary has written so far.
    fn wait_replicated(&self) {
        let lsn: String = Pair::connect(self.primary)
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .unwrap()
            .get(0);
        let mut standby = Pair::connect(self.standby);
        wait_until(
            &format!("the standby replayed the primary's WAL up to {lsn}"),
            Duration::from_secs(30),
            || {
                standby
                    .query_one(
                        "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                        &[&lsn],
                    )
                    .unwrap()
                    .get(0)
            },
        );
    }

    /// Stops streaming: the standby keeps what it has and receives nothing more.
    fn detach_standby(&self) {
        let mut standby = Pair::connect(self.standby);
        standby
            .batch_execute("ALTER SYSTEM SET primary_conninfo = ''")
            .unwrap();
        standby.batch_execute("SELECT pg_reload_conf()").unwrap();
        wait_until(
            "the standby stopped streaming",
            Duration::from_secs(30),
            || {
                standby
                    .query_one("SELECT count(*) FROM pg_stat_wal_receiver", &[])
                    .unwrap()
                    .get::<_, i64>(0)
                    == 0
            },
        );
    }

    /// Crashes the primary (`-m immediate`) and promotes the standby; returns when the new
    /// primary accepts writes.
    fn promote(&self) -> Duration {
        let start = Instant::now();
        let output = Command::new(&self.script)
            .args(["promote", &self.dir])
            .output()
            .expect("run PGLOCK_PG_FAILOVER promote");
        assert!(
            output.status.success(),
            "PGLOCK_PG_FAILOVER promote failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let took = start.elapsed();
        eprintln!("failover: primary stopped (immediate) and standby promoted in {took:?}");
        took
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = Command::new(&self.script)
            .args(["stop", &self.dir])
            .output();
    }
}

/// A pool that gives up on a checkout after `timeout`.
fn pool(config: postgres::Config, size: u32, timeout: Duration) -> common::Pool {
    r2d2::Pool::builder()
        .max_size(size)
        .min_idle(Some(0))
        .connection_timeout(timeout)
        .build_unchecked(PostgresConnectionManager::new(config, NoTls))
}

/// The port of the server a connection is on.
fn server_port(client: &mut Client) -> u16 {
    let port: i32 = client
        .query_one("SELECT inet_server_port()", &[])
        .unwrap()
        .get(0);
    port as u16
}

/// Asserts a lost advisory lock: `is_held` false or `LockLost` (the connection is gone).
fn assert_lost(what: &str, held: Result<bool, Error>) {
    match held {
        Ok(held) => assert!(!held, "{what}: the lock survived the failover"),
        Err(e) => assert!(matches!(e, Error::LockLost { .. }), "{what}: {e:?}"),
    }
}

#[test]
fn advisory_holders_report_loss_and_every_lock_works_on_the_new_primary() {
    let pair = Pair::start();
    LeaseTable::default()
        .create(&mut Pair::connect(pair.primary))
        .unwrap();
    let pool = pool(pair.multi_host(), 8, Duration::from_secs(10));

    let session_key = unique_key!("session");
    let mut session = SessionLock::new(&pool, session_key.clone()).unwrap();
    let mut session_guard = session.lock().unwrap();
    assert_eq!(server_port(&mut session_guard), pair.primary);
    let tx_key = unique_key!("tx");
    let mut tx = TxLock::new(&pool, tx_key.clone()).unwrap();
    let mut tx_guard = tx.lock().unwrap();
    // The leader's watcher thread reads its connection without being asked.
    let leader = Leader::advisory(&pool, unique_key!("leader")).unwrap();
    let leadership = leader.try_campaign().unwrap().expect("nobody else leads");

    let start = Instant::now();
    thread::scope(|s| {
        let (lost_tx, lost_rx) = mpsc::channel();
        let leadership = &leadership;
        s.spawn(move || {
            if leadership.wait_lost(Duration::from_secs(60)) {
                lost_tx.send(Instant::now()).unwrap();
            }
        });
        pair.promote();
        let lost_at = lost_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the leader did not see its loss within 60 s");
        let noticed = lost_at.saturating_duration_since(start);
        eprintln!("failover: the advisory leader saw its loss {noticed:?} after the crash began");
        assert!(noticed < PROMPTLY, "{noticed:?}");
    });
    common::assert_session_ended(&leadership.check().expect_err("check after the failover"));

    // The holders hear it at their next call.
    let asking = Instant::now();
    assert_lost(
        "SessionGuard::is_held",
        SessionGuard::is_held(&mut session_guard),
    );
    let err = SessionGuard::unlock(session_guard).expect_err("unlock after the failover");
    assert!(matches!(err, Error::LockLost { .. }), "unlock: {err:?}");
    assert!(err.to_string().contains(&session_key.to_string()), "{err}");
    assert_lost("TxGuard::is_held", TxGuard::is_held(&mut tx_guard));
    let err = TxGuard::commit(tx_guard).expect_err("commit after the failover");
    assert!(matches!(err, Error::LockLost { .. }), "commit: {err:?}");
    assert!(err.to_string().contains(&tx_key.to_string()), "{err}");
    let asked = asking.elapsed();
    eprintln!("failover: both advisory holders reported the loss in {asked:?}");
    assert!(asked < PROMPTLY, "{asked:?}");

    // The same pool, and the same lock objects, work on the new primary.
    let recovering = Instant::now();
    let mut guard = session.lock().expect("the session lock again");
    assert_eq!(
        server_port(&mut guard),
        pair.standby,
        "not on the new primary"
    );
    SessionGuard::unlock(guard).unwrap();
    let mut guard = tx.lock().expect("the transaction lock again");
    assert_eq!(
        server_port(&mut guard),
        pair.standby,
        "not on the new primary"
    );
    TxGuard::commit(guard).unwrap();
    leader
        .try_campaign()
        .expect("a campaign on the new primary")
        .expect("nobody leads after the failover")
        .step_down()
        .unwrap();
    // A lease, in the table that was replicated.
    let mut lease = LeaseLock::new(&pool, function_name!()).unwrap();
    lease
        .try_lock()
        .expect("a lease on the new primary")
        .expect("a new lease is free")
        .unlock()
        .unwrap();
    let recovered = recovering.elapsed();
    eprintln!("failover: every lock kind worked again on the new primary in {recovered:?}");
    assert!(recovered < PROMPTLY, "{recovered:?}");
}

/// The server's clock, read on `port`.
fn server_now(port: u16) -> SystemTime {
    Pair::connect(port)
        .query_one("SELECT clock_timestamp()", &[])
        .unwrap()
        .get(0)
}

#[test]
fn a_replicated_lease_is_kept_through_the_failover_by_its_heartbeat() {
    let pair = Pair::start();
    LeaseTable::default()
        .create(&mut Pair::connect(pair.primary))
        .unwrap();
    let pool = pool(pair.multi_host(), 8, Duration::from_secs(10));
    // Heartbeats every 2 s; the holder trusts the lease for 5.4 s after each.
    let options = LeaseOptions::new().lease(Duration::from_secs(6));
    let name = function_name!();
    let leader_name = format!("{name}/leader");
    let mut lease = LeaseLock::with_options(&pool, name, options.clone()).unwrap();
    let taken = Instant::now();
    let guard = lease.lock().unwrap();
    let token = guard.token();
    let leader = Leader::lease(&pool, &leader_name, options.clone()).unwrap();
    let leadership = leader.try_campaign().unwrap().expect("nobody else leads");
    pair.wait_replicated();

    pair.promote();
    let promoted = server_now(pair.standby);

    // The background heartbeat renews the row on the new primary, by itself.
    let mut contender = LeaseLock::with_options(&pool, name, options.clone()).unwrap();
    let since = Instant::now();
    wait_until(
        "the heartbeat renewed the lease on the new primary",
        Duration::from_secs(20),
        || {
            let info = contender.read().unwrap().expect("the replicated row");
            assert_eq!(info.token, token, "{info:?}");
            info.renewed_at > promoted
        },
    );
    eprintln!(
        "failover: the lease's heartbeat renewed it on the new primary {:?} after the promotion",
        since.elapsed()
    );
    assert!(guard.is_valid());

    // A contender on the new primary finds it held, by the holder's token.
    assert!(
        contender.try_lock().unwrap().is_none(),
        "a contender took a held lease"
    );
    assert_eq!(contender.busy_with().expect("the holder").token, token);
    let rival = Leader::lease(&pool, &leader_name, options).unwrap();
    assert!(rival.try_campaign().unwrap().is_none(), "two lease leaders");

    // Valid past the deadline of the holder's last renewal on the old primary.
    let past = Duration::from_secs(8).saturating_sub(taken.elapsed());
    assert!(!guard.watch().wait_lost(past), "the lease was lost");
    assert!(!leadership.wait_lost(Duration::ZERO), "leadership was lost");

    guard.unlock().expect("the release on the new primary");
    leadership.step_down().unwrap();
    drop(contender.try_lock().unwrap().expect("released, so free"));
    rival
        .try_campaign()
        .unwrap()
        .expect("stepped down, so free")
        .step_down()
        .unwrap();
}

#[test]
fn a_lease_holder_cut_off_by_the_failover_stops_trusting_it_before_the_row_lets_a_contender_in() {
    let pair = Pair::start();
    LeaseTable::default()
        .create(&mut Pair::connect(pair.primary))
        .unwrap();
    // The holder's pool knows only the old primary: its heartbeats cannot follow.
    let mut primary_only = postgres::Config::new();
    primary_only
        .host("127.0.0.1")
        .port(pair.primary)
        .user("postgres")
        .dbname("postgres");
    let holder_pool = pool(primary_only, 2, Duration::from_secs(2));
    // Heartbeats every second; the holder trusts the lease for 2.7 s after each.
    let options = LeaseOptions::new().lease(Duration::from_secs(3));
    let name = function_name!();
    let mut lease = LeaseLock::with_options(&holder_pool, name, options.clone()).unwrap();
    let guard = lease.lock().unwrap();
    let watch = guard.watch();
    pair.wait_replicated();

    let start = Instant::now();
    pair.promote();
    let pool = pool(pair.multi_host(), 4, Duration::from_secs(10));
    let mut contender = LeaseLock::with_options(
        &pool,
        name,
        options.clone().lock_timeout(Duration::from_secs(30)),
    )
    .unwrap();
    let reader = LeaseLock::new(&pool, name).unwrap();
    let row = reader.read().unwrap().expect("the replicated row");
    assert_eq!(row.token, guard.token(), "{row:?}");

    let (lost_tx, lost_rx) = mpsc::channel();
    let waiter = thread::spawn(move || {
        if watch.wait_lost(Duration::from_secs(30)) {
            lost_tx.send(Instant::now()).unwrap();
        }
    });
    let taken = contender.lock().expect("the contender takes the lease");
    let taken_at = Instant::now();
    // The holder's own clock ran out first: it no longer trusts the lease.
    assert!(
        !guard.is_valid(),
        "a contender took the lease while the cut-off holder still trusted it"
    );
    let now = reader.read().unwrap().expect("the row");
    assert!(
        now.acquired_at >= row.expires_at,
        "taken at {:?}, before the replicated row's expiry {:?}",
        now.acquired_at,
        row.expires_at
    );
    assert!(now.token > row.token, "{now:?} after {row:?}");
    let lost_at = lost_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the holder's watch never reported the loss");
    waiter.join().unwrap();
    eprintln!(
        "failover: the cut-off lease holder stopped trusting it {:?} after the crash began; \
         a contender on the new primary took it {:?} after the crash began, at the expiry in \
         the replicated row",
        lost_at - start,
        taken_at - start
    );
    drop(taken);

    let unlocking = Instant::now();
    let err = guard.unlock().expect_err("the cut-off holder's unlock");
    assert!(
        matches!(
            err,
            Error::LockLost {
                reason: LostReason::LeaseExpired,
                ..
            }
        ),
        "{err:?}"
    );
    eprintln!(
        "failover: its unlock reported the loss in {:?}",
        unlocking.elapsed()
    );
}

#[test]
fn a_lease_whose_row_did_not_replicate_is_taken_on_the_new_primary_while_its_holder_trusts_it() {
    let pair = Pair::start();
    LeaseTable::default()
        .create(&mut Pair::connect(pair.primary))
        .unwrap();
    let pool = pool(pair.multi_host(), 8, Duration::from_secs(10));
    let name = function_name!();
    // One lease taken and released while the standby streams: the table's token sequence
    // has been used and replicated.
    let options = LeaseOptions::new().lease(Duration::from_secs(30));
    let mut first =
        LeaseLock::with_options(&pool, &format!("{name}/before"), options.clone()).unwrap();
    let before = first.lock().unwrap();
    let before_token = before.token();
    before.unlock().unwrap();
    pair.wait_replicated();

    // What asynchronous replication loses in a crash: the commits the standby had not
    // received yet. Here, every commit after the standby stopped streaming.
    pair.detach_standby();
    let mut lease = LeaseLock::with_options(&pool, name, options.clone()).unwrap();
    let guard = lease.lock().unwrap();
    let watch = guard.watch();

    let start = Instant::now();
    pair.promote();
    let mut contender = LeaseLock::with_options(&pool, name, options).unwrap();
    assert!(
        contender.read().unwrap().is_none(),
        "the row reached the detached standby"
    );
    let taken = contender
        .try_lock()
        .unwrap()
        .expect("the row is gone: the lease is free on the new primary");
    assert!(guard.is_valid(), "the old holder's deadline passed already");
    eprintln!(
        "failover: a lease whose row was lost was taken on the new primary {:?} after the \
         crash began, while its old holder still trusted it for {:?}; tokens: {} before the \
         loss, {} old holder, {} new holder",
        start.elapsed(),
        guard.remaining(),
        before_token,
        guard.token(),
        taken.token()
    );

    // The old holder's heartbeat finds its lease taken over on the new primary.
    let lost = watch.wait_lost(Duration::from_secs(30));
    assert!(lost, "the old holder never learned");
    eprintln!(
        "failover: the old holder learned of the loss {:?} after the crash began (at its \
         next heartbeat)",
        start.elapsed()
    );
    let err = guard.unlock().expect_err("the old holder's unlock");
    assert!(matches!(err, Error::LockLost { .. }), "{err:?}");
    taken.unlock().unwrap();
}

#[test]
fn a_lease_holder_whose_token_the_new_primary_hands_out_again_cannot_renew_fence_or_release_it() {
    let pair = Pair::start();
    LeaseTable::default()
        .create(&mut Pair::connect(pair.primary))
        .unwrap();
    // The table and its token sequence reach the standby; nothing after that does.
    pair.wait_replicated();
    pair.detach_standby();
    let pool = pool(pair.multi_host(), 8, Duration::from_secs(10));
    let name = function_name!();
    let options = LeaseOptions::new().lease(Duration::from_secs(30));
    let mut lease = LeaseLock::with_options(&pool, name, options.clone()).unwrap();
    let guard = lease.lock().unwrap();

    pair.promote();
    let mut contender = LeaseLock::with_options(&pool, name, options).unwrap();
    let taken = contender
        .try_lock()
        .unwrap()
        .expect("the row is gone: the lease is free on the new primary");
    eprintln!(
        "failover: the old holder's token {}, the new holder's {}",
        guard.token(),
        taken.token()
    );
    // A sequence logs its values ahead in the WAL (32 at a time): the record of the first
    // value was lost with the crash, so the new primary hands that value out again.
    assert!(
        taken.token() <= guard.token(),
        "the token sequence did not repeat: this test's premise no longer holds"
    );

    // The old holder is not the new one, whatever its token. (Its first statement meets
    // its closed connection; the next one goes to the new primary.)
    let renewed = match guard.renew() {
        Err(Error::Database { source, .. }) if source.is_closed() => guard.renew(),
        other => other,
    };
    let err = renewed.expect_err("the old holder renewed the new holder's lease");
    assert!(matches!(err, Error::LockLost { .. }), "{err:?}");
    let mut conn = pool.get().unwrap();
    let mut tx = conn.transaction().unwrap();
    let err = guard
        .fence(&mut tx)
        .expect_err("the old holder's fence passed");
    assert!(matches!(err, Error::LockLost { .. }), "{err:?}");
    drop(tx);
    let err = guard
        .unlock()
        .expect_err("the old holder's unlock succeeded");
    assert!(matches!(err, Error::LockLost { .. }), "{err:?}");
    let row = LeaseLock::new(&pool, name)
        .unwrap()
        .read()
        .unwrap()
        .unwrap();
    assert!(
        row.held,
        "the old holder released the new holder's lease: {row:?}"
    );

    taken.renew().expect("the new holder renews");
    taken.unlock().expect("the new holder releases");
}
