//! Lease locks against a real server: exclusion, takeover after a crash or a pause,
//! heartbeats, fencing, waits, payloads, hostile input and the privileges they need.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use common::{admin, count, counter, increment, pool, pool_with};
use pglock::{Error, LeaseLock, LeaseOptions, LeaseSemaphore, LeaseTable, LostReason};
use postgres::Client;

/// The default lease table, created (idempotently, concurrently safe) by every test.
fn table(admin: &mut Client) {
    LeaseTable::default().create(admin).unwrap();
}

fn fast() -> LeaseOptions {
    LeaseOptions::new().poll_interval(Duration::from_millis(1), Duration::from_millis(20))
}

fn row(admin: &mut Client, name: &str) -> (String, i64, String, i64) {
    let r = admin
        .query_one(
            "SELECT owner, token, ctid::text, xmax::text::bigint FROM pglock_leases \
             WHERE name = $1 AND slot = 0",
            &[&name],
        )
        .unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3))
}

fn sequence_value(admin: &mut Client) -> i64 {
    admin
        .query_one("SELECT last_value FROM pglock_leases_token_seq", &[])
        .unwrap()
        .get(0)
}

#[test]
fn try_lock_contention_then_release_hands_over_with_a_larger_token() {
    let name = function_name!();
    let mut admin = admin();
    table(&mut admin);
    let pool = pool(2);
    let mut a =
        LeaseLock::with_options(&pool, name, LeaseOptions::new().owner("holder-a")).unwrap();
    let mut b =
        LeaseLock::with_options(&pool, name, LeaseOptions::new().owner("holder-b")).unwrap();

    let guard = a.try_lock().unwrap().expect("free lease");
    let first = guard.token();
    assert!(b.try_lock().unwrap().is_none(), "two holders");
    let busy = b.busy_with().expect("who holds it");
    assert_eq!((busy.owner.as_str(), busy.token), ("holder-a", first));
    assert!(busy.remaining > Duration::from_secs(20) && busy.remaining <= Duration::from_secs(30));
    let info = b.read().unwrap().expect("row");
    assert!(info.held);
    assert_eq!((info.owner.as_str(), info.token), ("holder-a", first));
    assert_eq!(info.lease, Duration::from_secs(30));

    guard.unlock().unwrap();
    assert!(!b.read().unwrap().unwrap().held, "released");
    let second = b.try_lock().unwrap().expect("released lease");
    assert!(second.token() > first, "tokens increase");
    drop(second);
    assert!(b.busy_with().is_none());
    assert!(!a.read().unwrap().unwrap().held, "drop releases");
}

#[test]
fn a_failed_attempt_writes_nothing_and_draws_no_token() {
    let name = function_name!();
    let mut admin = admin();
    table(&mut admin);
    let pool = pool(2);
    let mut a = LeaseLock::new(&pool, name).unwrap();
    let mut b = LeaseLock::new(&pool, name).unwrap();
    let _guard = a.lock().unwrap();
    let before = row(&mut admin, name);
    let sequence = sequence_value(&mut admin);
    for _ in 0..20 {
        assert!(b.try_lock().unwrap().is_none());
    }
    let after = row(&mut admin, name);
    // Same row version (ctid), no new row lock (xmax unchanged), no token drawn.
    assert_eq!(before, after, "a failed attempt wrote or locked the row");
    // Other tests draw tokens concurrently, so only check that ours did not move it while
    // nobody else could: compare with the token, which is the last one we drew.
    assert!(sequence >= before.1);
}

#[test]
fn threads_never_overlap_and_the_counter_is_exact() {
    let name = function_name!();
    let mut admin = admin();
    table(&mut admin);
    counter(&mut admin, name);
    let pool = pool(16);
    let inside = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let (pool, inside) = (pool.clone(), Arc::clone(&inside));
            // Contenders with different lease lengths and heartbeats never overlap either.
            let lease = Duration::from_millis(500 + 700 * (i % 3));
            thread::spawn(move || {
                let options = fast().lease(lease);
                let mut lock = LeaseLock::with_options(&pool, name, options).unwrap();
                let mut conn = pool.get().unwrap();
                for _ in 0..25 {
                    let guard = lock.lock().unwrap();
                    assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "overlap");
                    increment(&mut conn, name);
                    inside.fetch_sub(1, Ordering::SeqCst);
                    guard.unlock().unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(count(&mut admin, name), 200);
}

#[test]
fn the_holders_lease_length_binds_contenders_configured_shorter() {
    let name = function_name!();
    let mut admin = admin();
    table(&mut admin);
    let pool = pool(2);
    // The holder takes a 3 s lease and never renews it (its heartbeat is 1 s, but the
    // contender's attempts all fall inside the first second).
    let mut long = LeaseLock::with_options(
        &pool,
        name,
        LeaseOptions::new().lease(Duration::from_secs(3)),
    )
    .unwrap();
    let guard = long.lock().unwrap();
    let options = fast()
        .lease(Duration::from_millis(50))
        .heartbeat(Duration::from_millis(10));
    let mut short = LeaseLock::with_options(&pool, name, options).unwrap();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(500) {
        assert!(
            short.try_lock().unwrap().is_none(),
            "took a lease before the holder's ran out"
        );
    }
    assert!(guard.is_valid());
    guard.unlock().unwrap();
}

#[test]
fn heartbeats_keep_the_lease_past_its_length() {
    let name = function_name!();
    let mut admin = admin();
    table(&mut admin);
    let pool = pool(2);
    let options = LeaseOptions::new()
        .lease(Duration::from_millis(600))
        .heartbeat(Duration::from_millis(100));
    let mut holder = LeaseLock::with_options(&pool, name, options).unwrap();
    let mut other = LeaseLock::new(&pool, name).unwrap();
    let guard = holder.lock().unwrap();
    let token = guard.token();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        assert!(
            other.try_lock().unwrap().is_none(),
            "taken over while renewed"
        );
        assert!(guard.is_valid(), "holder stopped trusting a renewed lease");
        thread::sleep(Duration::from_millis(50));
    }
    guard.renew().unwrap();
    assert!(guard.remaining() > Duration::from_millis(400));
    let info = other.read().unwrap().unwrap();
    assert_eq!(info.token, token, "the token is fixed for the whole lease");
    assert!(info.renewed_at > info.acquired_at);
    guard.unlock().unwrap();
}

#[test]
fn the_holder_stops_trusting_the_lease_at_its_deadline_while_a_heartbeat_hangs() {
    // Heartbeats block on a row lock held by another session: none fails, none succeeds.
    let name = function_name!();
    let mut admin = admin();
    table(&mut admin);
    let pool = pool(2);
    let options = LeaseOptions::new()
        .lease(Duration::from_millis(1000))
        .heartbeat(Duration::from_millis(100))
        .safety_margin(Duration::from_millis(200));
    let mut holder = LeaseLock::with_options(&pool, name, options).unwrap();
    let before = Instant::now();
    let guard = holder.lock().unwrap();
    let watch = guard.watch();
    let mut blocker = admin.transaction().unwrap();
    blocker
        .execute(
            "SELECT 1 FROM pglock_leases WHERE name = $1 FOR UPDATE",
            &[&name],
        )
        .unwrap();
    assert!(
        watch.wait_lost(Duration::from_secs(10)),
        "the holder still trusts the lease"
    );
    let noticed = before.elapsed();
    eprintln!("holder stopped trusting the lease {noticed:?} after asking for it");
    // The deadline is lease - margin = 800 ms after the last statement that took or
    // renewed it was sent: never earlier than 800 ms after the lock call began.
    assert!(
        noticed >= Duration::from_millis(800),
        "too early: {noticed:?}"
    );
    assert!(noticed < Duration::from_secs(3), "too late: {noticed:?}");
    assert!(!guard.is_valid());
    assert!(
        matches!(guard.renew(), Err(Error::LockLost { .. })),
        "a lost lease was renewed"
    );
    assert!(matches!(
        guard.check(),
        Err(Error::LockLost {
            reason: LostReason::LeaseExpired,
            ..
        })
    ));
    blocker.rollback().unwrap();
    // Lost is sticky, and the unlock reports it.
    assert!(matches!(
        guard.unlock(),
        Err(Error::LockLost {
            reason: LostReason::LeaseExpired,
            ..
        })
    ));
}

#[test]
fn with_lock_releases_on_error_and_on_panic() {
    let name = function_name!();
    let mut admin = admin();
    table(&mut admin);
    let pool = pool(2);
    let mut lock = LeaseLock::new(&pool, name).unwrap();
    let mut other = LeaseLock::new(&pool, name).unwrap();
    let r: Result<(), Error> = lock.with_lock(|lease| {
        assert!(lease.is_valid());
        Err(Error::InvalidArgument {
            key: lease.key().clone(),
            message: "failed section".into(),
        })
    });
    assert!(r.is_err());
    assert!(
        other.try_lock().unwrap().is_some(),
        "not released after Err"
    );
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _: Result<(), Error> = lock.with_lock(|_| panic!("boom"));
    }));
    assert!(panicked.is_err());
    assert!(
        other.try_lock().unwrap().is_some(),
        "not released after a panic"
    );
    let value = lock
        .with_lock(|lease| Ok::<_, Error>(lease.token()))
        .unwrap();
    assert!(value > 0);
}

#[test]
fn bounded_waits_time_out_holding_nothing_and_cancel_wakes_a_waiter() {
    let name = function_name!();
    let mut admin = admin();
    table(&mut admin);
    let pool = pool(3);
    let mut holder = LeaseLock::new(&pool, name).unwrap();
    let owner = holder.owner().to_owned();
    let _guard = holder.lock().unwrap();

    let mut waiter =
        LeaseLock::with_options(&pool, name, fast().lock_timeout(Duration::from_millis(300)))
            .unwrap();
    let start = Instant::now();
    match waiter.lock() {
        Err(Error::Timeout { waited, key }) => {
            assert!(waited >= Duration::from_millis(300));
            assert!(key.to_string().contains(name));
        }
        other => panic!("expected a timeout: {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(waiter
        .try_lock_for(Duration::from_millis(100))
        .unwrap()
        .is_none());
    assert_eq!(row(&mut admin, name).0, owner, "the waiter took nothing");

    let mut blocked = LeaseLock::new(&pool, name).unwrap();
    let cancel = blocked.cancel_handle();
    let (tx, rx) = mpsc::channel();
    let t = thread::spawn(move || tx.send(blocked.lock().map(|_| ())).unwrap());
    thread::sleep(Duration::from_millis(50)); // let it start waiting; either order is fine
    cancel.cancel().unwrap();
    let result = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("cancel did not wake it");
    assert!(matches!(result, Err(Error::Cancelled { .. })), "{result:?}");
    t.join().unwrap();
}

#[test]
fn notify_wakes_a_waiter_long_before_its_next_poll_and_leaves_no_listen() {
    let name = function_name!();
    let mut admin = admin();
    table(&mut admin);
    let pool = pool(2);
    let options = LeaseOptions::new()
        .notify(true)
        .poll_interval(Duration::from_secs(20), Duration::from_secs(20));
    let mut holder = LeaseLock::with_options(&pool, name, options.clone()).unwrap();
    let guard = holder.lock().unwrap();
    let (done_tx, done_rx) = mpsc::channel();
    let mut config = common::config();
    config.application_name("pglock-test-notify-waiter");
    let waiter_pool = pool_with(1, config);
    let t = thread::spawn(move || {
        let mut waiter = LeaseLock::with_options(&waiter_pool, name, options).unwrap();
        let guard = waiter.lock().unwrap();
        done_tx.send(Instant::now()).unwrap();
        guard.unlock().unwrap();
        drop(waiter);
        waiter_pool
    });
    // The waiter tries, LISTENs and tries again at once, then sleeps up to 20 s: a lock
    // statement that has sat idle for 300 ms is that sleep, with the LISTEN in place.
    common::wait_until(
        "the waiter sleeps listening",
        Duration::from_secs(10),
        || {
            admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                 WHERE application_name = 'pglock-test-notify-waiter' AND state = 'idle' \
                 AND query LIKE 'WITH cur AS%' AND now() - query_start > interval '300 ms'",
                    &[],
                )
                .unwrap()
                .get::<_, i64>(0)
                == 1
        },
    );
    let released = Instant::now();
    guard.unlock().unwrap();
    let locked = done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("never woken");
    let handoff = locked.duration_since(released);
    eprintln!("notified hand-off took {handoff:?}");
    assert!(
        handoff < Duration::from_secs(5),
        "woken by polling, not NOTIFY: {handoff:?}"
    );
    let waiter_pool = t.join().unwrap();
    drop(holder);
    // The connections went back to their pools without a LISTEN.
    for pool in [&pool, &waiter_pool] {
        let mut c = pool.get().unwrap();
        let n = c
            .query("SELECT pg_listening_channels()", &[])
            .unwrap()
            .len();
        assert_eq!(n, 0, "a LISTEN leaked into the pool");
    }
}

#[test]
fn fence_passes_for_the_holder_inside_its_transaction() {
    let name = function_name!();
    let mut admin = admin();
    table(&mut admin);
    let pool = pool(3);
    let mut lock = LeaseLock::new(&pool, name).unwrap();
    let guard = lock.lock().unwrap();
    let mut conn = pool.get().unwrap();
    let mut tx = conn.transaction().unwrap();
    guard.fence(&mut tx).unwrap();
    tx.commit().unwrap();
    guard.unlock().unwrap();
    // A stale holder's fence (a paused holder's) is in the paused-holder test below.
}

#[test]
fn payloads_owners_and_names_are_stored_verbatim_or_refused() {
    let mut admin = admin();
    table(&mut admin);
    let pool = pool(2);
    let hostile = [
        "'; DROP TABLE pglock_leases; --",
        "\"quoted\" $1 $$ \\ ",
        "ünïcödé ✓ 🦀",
        &"long".repeat(256),
    ];
    for (i, text) in hostile.iter().enumerate() {
        let name = format!("{}/{i}/{text}", function_name!());
        let name = &name[..name.len().min(1024)];
        let data: Vec<u8> = (0..=255u8).chain(text.bytes()).collect();
        let options = LeaseOptions::new().owner(*text).data(data.clone());
        let mut lock = LeaseLock::with_options(&pool, name, options).unwrap();
        lock.lock().unwrap().unlock().unwrap();
        let info = lock.read().unwrap().unwrap();
        assert_eq!(info.owner, *text);
        assert_eq!(info.data.as_deref(), Some(&data[..]));
        // Taking it again without a payload keeps the stored one.
        let mut keep = LeaseLock::new(&pool, name).unwrap();
        keep.lock().unwrap().unlock_and_delete().unwrap();
        assert!(keep.read().unwrap().is_none(), "deleted");
    }
    for bad in ["", "nul\0inside", &"x".repeat(1025)] {
        match LeaseLock::new(&pool, bad) {
            Err(Error::InvalidArgument { message, .. }) => assert!(message.contains("name")),
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    assert!(matches!(
        LeaseLock::with_options(&pool, "x", LeaseOptions::new().owner("a\0b")),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(admin
        .query_one("SELECT to_regclass('pglock_leases') IS NOT NULL", &[])
        .unwrap()
        .get::<_, bool>(0));
}

#[test]
fn a_custom_schema_qualified_table_works() {
    let mut admin = admin();
    admin
        .batch_execute("CREATE SCHEMA IF NOT EXISTS \"Pglock_Test\"")
        .unwrap();
    let table = LeaseTable::new("Pglock_Test.Leases").unwrap();
    table.create(&mut admin).unwrap();
    table.create(&mut admin).unwrap(); // idempotent
    let pool = pool(1);
    let mut lock =
        LeaseLock::with_options(&pool, function_name!(), LeaseOptions::new().table(table)).unwrap();
    assert!(lock
        .key()
        .to_string()
        .contains("\"Pglock_Test\".\"Leases\""));
    drop(lock.lock().unwrap());
    let n: i64 = admin
        .query_one(
            "SELECT count(*) FROM \"Pglock_Test\".\"Leases\" WHERE name = $1",
            &[&function_name!()],
        )
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[test]
fn a_missing_table_is_a_database_error_naming_the_lease() {
    let pool = pool(1);
    let table = LeaseTable::new("pglock_no_such_table").unwrap();
    let mut lock =
        LeaseLock::with_options(&pool, function_name!(), LeaseOptions::new().table(table)).unwrap();
    match lock.try_lock() {
        Err(e @ Error::Database { .. }) => {
            assert!(e.to_string().contains("pglock_no_such_table"), "{e}");
            assert_eq!(e.code(), Some(&postgres::error::SqlState::UNDEFINED_TABLE));
        }
        other => panic!("{other:?}"),
    };
}

#[test]
fn exactly_the_documented_privileges_suffice() {
    let mut admin = admin();
    let role = "pglock_lease_user";
    admin
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS pglock_priv; \
             DO $$ BEGIN CREATE ROLE {role} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$; \
             GRANT USAGE ON SCHEMA pglock_priv TO {role};"
        ))
        .unwrap();
    let table = LeaseTable::new("pglock_priv.leases").unwrap();
    table.create(&mut admin).unwrap();
    admin
        .batch_execute(&format!(
            "REVOKE ALL ON pglock_priv.leases, pglock_priv.leases_token_seq FROM {role}; \
             GRANT SELECT, INSERT, UPDATE, DELETE ON pglock_priv.leases TO {role};"
        ))
        .unwrap();
    let mut config = common::config();
    config.user(role);
    let pool = pool_with(1, config);
    let options = LeaseOptions::new().table(table);
    let mut lock = LeaseLock::with_options(&pool, function_name!(), options).unwrap();
    // Without USAGE on the sequence, taking a free lease fails (and writes nothing).
    let err = lock.try_lock().unwrap_err();
    assert_eq!(
        err.code(),
        Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "{err}"
    );
    admin
        .batch_execute(&format!(
            "GRANT USAGE ON SEQUENCE pglock_priv.leases_token_seq TO {role}"
        ))
        .unwrap();
    let guard = lock.lock().unwrap();
    guard.unlock().unwrap();
    lock.read().unwrap().unwrap();
    lock.lock().unwrap().unlock_and_delete().unwrap();
}

#[test]
fn a_semaphore_never_exceeds_its_permits() {
    let name = function_name!();
    let mut admin = admin();
    table(&mut admin);
    let pool = pool(16);
    let inside = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(8));
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (pool, inside, peak, barrier) = (
                pool.clone(),
                Arc::clone(&inside),
                Arc::clone(&peak),
                Arc::clone(&barrier),
            );
            thread::spawn(move || {
                let mut sem = LeaseSemaphore::with_options(&pool, name, 3, fast()).unwrap();
                barrier.wait();
                for _ in 0..10 {
                    let permit = sem.lock().unwrap();
                    assert!(permit.slot() < 3);
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    assert!(now <= 3, "{now} holders of 3 permits");
                    peak.fetch_max(now, Ordering::SeqCst);
                    thread::sleep(Duration::from_millis(5));
                    inside.fetch_sub(1, Ordering::SeqCst);
                    permit.unlock().unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert!(
        peak.load(Ordering::SeqCst) >= 2,
        "permits were never shared"
    );
    let sem = LeaseSemaphore::new(&pool, name, 3).unwrap();
    assert!(sem.read().unwrap().iter().all(|i| !i.held && i.slot < 3));
    assert!(matches!(
        LeaseSemaphore::new(&pool, name, 0),
        Err(Error::InvalidArgument { .. })
    ));
}

// ---- processes: a crashed holder and a paused holder ----

const HELD: &str = "pglock-test: lease held";

fn child(child_test: &str, name: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        child_test,
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("DATABASE_URL", common::database_url())
    .env("PGLOCK_CHILD_LEASE", name)
    .stdout(Stdio::piped())
    .stdin(Stdio::piped());
    cmd
}

/// Reads the child's stdout until a line ends with `marker`; returns the rest of it.
fn read_until(lines: &mut impl Iterator<Item = std::io::Result<String>>, marker: &str) -> String {
    loop {
        let line = lines.next().expect("the child exited").unwrap();
        if let Some(at) = line.find(marker) {
            return line[at + marker.len()..].trim().to_owned();
        }
    }
}

fn expires_at(admin: &mut Client, name: &str) -> SystemTime {
    admin
        .query_one(
            "SELECT expires_at FROM pglock_leases WHERE name = $1 AND slot = 0",
            &[&name],
        )
        .unwrap()
        .get(0)
}

#[test]
fn a_holder_killed_with_sigkill_is_taken_over_after_its_lease_not_before() {
    let name = function_name!();
    let mut admin = admin();
    table(&mut admin);
    let mut holder = child("child_holds_lease", name).spawn().unwrap();
    let mut lines = BufReader::new(holder.stdout.take().unwrap()).lines();
    let token: i64 = read_until(&mut lines, HELD).parse().unwrap();
    holder.kill().unwrap();
    holder.wait().unwrap();
    let expiry = expires_at(&mut admin, name);

    let pool = pool(2);
    let mut waiter = LeaseLock::with_options(&pool, name, fast()).unwrap();
    let reader = LeaseLock::new(&pool, name).unwrap();
    let guard = waiter.lock().unwrap();
    assert!(guard.token() > token, "the token did not increase");
    let info = reader.read().unwrap().unwrap();
    // Both instants are the server's.
    let after = info
        .acquired_at
        .duration_since(expiry)
        .expect("taken over before the crashed holder's lease ran out");
    eprintln!("taken over {after:?} after the crashed holder's lease ran out");
    assert!(after < Duration::from_secs(2), "took {after:?}");
}

#[test]
#[ignore = "run as a child process by the lease crash tests"]
fn child_holds_lease() {
    let name = std::env::var("PGLOCK_CHILD_LEASE").expect("run only as a child process");
    let pool = pool(1);
    let options = LeaseOptions::new()
        .lease(Duration::from_millis(1500))
        .heartbeat(Duration::from_millis(200));
    let mut lock = LeaseLock::with_options(&pool, &name, options).unwrap();
    let guard = lock.lock().unwrap();
    println!("{HELD} {}", guard.token());
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).ok();
}

#[test]
fn a_paused_holder_is_taken_over_and_learns_it_before_acting_and_its_fence_fails() {
    let name = function_name!();
    let mut admin = admin();
    table(&mut admin);
    let mut holder = child("child_pauses", name).spawn().unwrap();
    let pid = holder.id().to_string();
    let mut lines = BufReader::new(holder.stdout.take().unwrap()).lines();
    let old: i64 = read_until(&mut lines, HELD).parse().unwrap();
    let stop = |sig: &str| {
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    };
    stop("-STOP");
    let pool = pool(1);
    let mut contender = LeaseLock::with_options(&pool, name, fast()).unwrap();
    let guard = contender
        .try_lock_for(Duration::from_secs(20))
        .unwrap()
        .expect("the paused holder's lease never ran out");
    assert!(guard.token() > old);
    stop("-CONT");
    // Resumed: now it acts (checks first).
    writeln!(holder.stdin.as_mut().unwrap(), "go").unwrap();
    let report = read_until(&mut lines, "pglock-test: resumed");
    assert_eq!(
        report, "valid=false fence=lost",
        "the resumed holder trusted a lost lease"
    );
    assert!(holder.wait().unwrap().success());
    guard.unlock().unwrap();
}

#[test]
#[ignore = "run as a child process by the paused-holder test"]
fn child_pauses() {
    let name = std::env::var("PGLOCK_CHILD_LEASE").expect("run only as a child process");
    let pool = pool(2);
    let options = LeaseOptions::new()
        .lease(Duration::from_millis(1000))
        .heartbeat(Duration::from_millis(100));
    let mut lock = LeaseLock::with_options(&pool, &name, options).unwrap();
    let guard = lock.lock().unwrap();
    println!("{HELD} {}", guard.token());
    // Wait for the parent's word, which comes after it stopped this process for longer
    // than the lease (heartbeat thread and all) and resumed it.
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    let valid = guard.is_valid();
    let mut conn = pool.get().unwrap();
    let mut tx = conn.transaction().unwrap();
    let fence = match guard.fence(&mut tx) {
        Ok(()) => "held".to_owned(),
        Err(Error::LockLost { .. }) => "lost".to_owned(),
        Err(e) => format!("error {e}"),
    };
    tx.rollback().unwrap();
    println!("pglock-test: resumed valid={valid} fence={fence}");
    let _ = guard.unlock();
}

// ---- faults: lost replies, row locks held elsewhere, stricter isolation ----

#[test]
fn a_heartbeat_whose_reply_is_lost_is_retried_and_the_lease_kept() {
    let name = function_name!();
    let mut admin = admin();
    table(&mut admin);
    let proxy = common::proxy::FaultProxy::start();
    let pool = proxy.pool(2);
    let options = LeaseOptions::new()
        .lease(Duration::from_millis(2000))
        .heartbeat(Duration::from_millis(200));
    let mut lock = LeaseLock::with_options(&pool, name, options).unwrap();
    let guard = lock.lock().unwrap();
    let token = guard.token();
    // The next renewal reaches the server, and its connection dies before the reply.
    proxy.cut_after("renewed_at = pg_catalog.clock_timestamp()");
    let watch = guard.watch();
    assert!(
        !watch.wait_lost(Duration::from_secs(3)),
        "the lease was lost after one lost heartbeat reply"
    );
    assert_eq!(proxy.cuts(), 1, "no heartbeat was cut");
    assert!(guard.is_valid());
    let info = LeaseLock::new(&common::pool(1), name)
        .unwrap()
        .read()
        .unwrap()
        .unwrap();
    assert!(info.held);
    assert_eq!(info.token, token, "the lease changed hands");
    guard.unlock().unwrap();
}

#[test]
fn a_lock_whose_reply_is_lost_is_undone_not_stranded() {
    let name = function_name!();
    let mut admin = admin();
    table(&mut admin);
    // The row exists already, so the first statement takes the lease.
    LeaseLock::new(&common::pool(1), name)
        .unwrap()
        .lock()
        .unwrap()
        .unlock()
        .unwrap();
    let proxy = common::proxy::FaultProxy::start();
    let pool = proxy.pool(2);
    let mut lock = LeaseLock::new(&pool, name).unwrap();
    proxy.cut_after("WITH cur AS");
    let err = lock.try_lock().unwrap_err();
    assert!(matches!(err, Error::Database { .. }), "{err:?}");
    assert_eq!(proxy.cuts(), 1);
    // The attempt took the lease on the server, then pglock undid it.
    let reader = LeaseLock::new(&common::pool(1), name).unwrap();
    let info = reader.read().unwrap().unwrap();
    assert!(
        !info.held,
        "a lease whose reply was lost is stranded: {info:?}"
    );
    assert!(
        lock.try_lock().unwrap().is_some(),
        "the same lock cannot take it again"
    );
}

#[test]
fn waits_renewals_and_releases_never_block_behind_a_row_lock_held_elsewhere() {
    let name = function_name!();
    let mut admin = admin();
    table(&mut admin);
    let pool = pool(3);
    let options = LeaseOptions::new()
        .lease(Duration::from_millis(600))
        .heartbeat(Duration::from_millis(100));
    let mut holder = LeaseLock::with_options(&pool, name, options).unwrap();
    let guard = holder.lock().unwrap();
    // Another session locks the lease's row for longer than the lease (a fenced
    // transaction left open, a migration).
    let mut blocker = admin.transaction().unwrap();
    blocker
        .execute(
            "SELECT 1 FROM pglock_leases WHERE name = $1 FOR SHARE",
            &[&name],
        )
        .unwrap();
    assert!(guard.watch().wait_lost(Duration::from_secs(10)));
    let mut contender = LeaseLock::with_options(&pool, name, fast()).unwrap();
    let start = Instant::now();
    assert!(contender
        .try_lock_for(Duration::from_millis(100))
        .unwrap()
        .is_none());
    let waited = start.elapsed();
    assert!(
        waited < Duration::from_secs(2),
        "try_lock_for(100ms) took {waited:?}"
    );
    let start = Instant::now();
    let released = guard.unlock();
    let took = start.elapsed();
    assert!(
        matches!(released, Err(Error::LockLost { .. })),
        "{released:?}"
    );
    assert!(took < Duration::from_secs(2), "unlock took {took:?}");
    blocker.rollback().unwrap();
    // Once the row is free, the expired lease is taken at once.
    assert!(contender.try_lock().unwrap().is_some());
}

#[test]
fn tokens_increase_even_when_a_slow_first_insert_races_a_delete() {
    // Only the UPDATE draws a token, under the row's lock; the first use of a name only
    // inserts an expired placeholder. A slow insert (a trigger sleeps) races another
    // client that takes the lease, deletes the row, and leaves.
    let mut admin = admin();
    let table = LeaseTable::new("pglock_test_slow_insert").unwrap();
    table.create(&mut admin).unwrap();
    admin
        .batch_execute(
            "CREATE OR REPLACE FUNCTION pglock_test_slow() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN IF NEW.name LIKE '%slow-insert%' AND NEW.owner = '' AND \
             current_setting('application_name') = 'slow' THEN PERFORM pg_sleep(1.5); END IF; \
             RETURN NEW; END $$; \
             DROP TRIGGER IF EXISTS pglock_test_slow ON pglock_test_slow_insert; \
             CREATE TRIGGER pglock_test_slow BEFORE INSERT ON pglock_test_slow_insert \
             FOR EACH ROW EXECUTE FUNCTION pglock_test_slow()",
        )
        .unwrap();
    let name = format!("slow-insert/{}", std::process::id());
    let mut slow_config = common::config();
    slow_config.application_name("slow");
    let slow_pool = pool_with(1, slow_config);
    let options = LeaseOptions::new().table(table.clone());
    let (tx, rx) = mpsc::channel();
    let (x_name, x_options) = (name.clone(), options.clone());
    let x = thread::spawn(move || {
        let mut lock = LeaseLock::with_options(&slow_pool, &x_name, x_options).unwrap();
        tx.send(()).unwrap();
        let guard = lock.try_lock().unwrap();
        guard.map(|g| g.token())
    });
    rx.recv().unwrap();
    common::wait_until("the slow insert runs", Duration::from_secs(10), || {
        admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'slow' \
                 AND state = 'active'",
                &[],
            )
            .unwrap()
            .get::<_, i64>(0)
            == 1
    });
    let pool = pool(1);
    let mut y = LeaseLock::with_options(&pool, &name, options).unwrap();
    let y_guard = y
        .try_lock()
        .unwrap()
        .expect("y takes the lease once the row exists");
    let y_token = y_guard.token();
    y_guard.unlock_and_delete().unwrap();
    let x_token = x.join().unwrap();
    if let Some(x_token) = x_token {
        assert!(
            x_token > y_token,
            "x took token {x_token} after y's {y_token}"
        );
    }
}

#[test]
fn a_stricter_default_isolation_level_does_not_turn_contention_into_errors() {
    let name = function_name!();
    let mut admin = admin();
    table(&mut admin);
    let mut config = common::config();
    config.options("-c default_transaction_isolation=serializable");
    let pool = pool_with(8, config);
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let pool = pool.clone();
            thread::spawn(move || {
                let mut lock = LeaseLock::with_options(&pool, name, fast()).unwrap();
                for _ in 0..20 {
                    lock.lock().unwrap().unlock().unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}
