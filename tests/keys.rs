//! Keys against the live server: names hash exactly as `hashtextextended(name, 0)`, and
//! every key shows in `pg_locks` where `LockKey` says it does.

mod common;

use common::{admin, locks_on, pool};
use pglock::{LockKey, SessionLock};

/// Names covering every tail length of the hash, word boundaries, the empty string,
/// multi-byte UTF-8 and a long name.
fn names() -> Vec<String> {
    let mut names: Vec<String> = [
        "",
        "a",
        "nightly-report",
        "schema-migrations",
        "ü",
        "日本語のロック",
        "emoji 🔒 lock",
        "tab\tand\nnewline",
        "quote ' and backslash \\",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for len in 1..=25 {
        names.push("x".repeat(len));
    }
    names.push("long name ".repeat(1000));
    names
}

#[test]
fn names_hash_like_hashtextextended_on_the_server() {
    let mut admin = admin();
    let encoding: String = admin.query_one("SHOW server_encoding", &[]).unwrap().get(0);
    assert_eq!(encoding, "UTF8", "the golden values assume a UTF8 database");
    for name in names() {
        let want: i64 = admin
            .query_one("SELECT hashtextextended($1, 0)", &[&name])
            .unwrap()
            .get(0);
        assert_eq!(
            LockKey::from_name(&name).as_i64(),
            Some(want),
            "hashtextextended({name:?}, 0)"
        );
    }
}

#[test]
fn a_name_takes_the_same_lock_as_plain_sql() {
    let key = unique_key!();
    let name = key.name().unwrap().to_owned();
    let mut admin = admin();
    // Another program takes the lock with plain SQL...
    admin
        .execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", &[&name])
        .unwrap();
    let pool = pool(1);
    let mut lock = SessionLock::new(&pool, key.clone()).unwrap();
    // ...and pglock sees it taken.
    assert!(lock.try_lock().unwrap().is_none());
    admin
        .execute(
            "SELECT pg_advisory_unlock(hashtextextended($1, 0))",
            &[&name],
        )
        .unwrap();
    assert!(lock.try_lock().unwrap().is_some());
}

#[test]
fn keys_show_in_pg_locks_at_their_coordinates() {
    let pool = pool(1);
    let mut admin = admin();
    let keys = [
        LockKey::new(-2),
        LockKey::new(i64::MIN),
        LockKey::new(i64::MAX),
        LockKey::new(4_294_967_297),
        LockKey::pair(-1, -2),
        LockKey::pair(i32::MIN, i32::MAX),
        unique_key!(),
    ];
    for key in keys {
        let mut lock = SessionLock::new(&pool, key.clone()).unwrap();
        let guard = lock.try_lock().unwrap().expect("free");
        let rows = locks_on(&mut admin, &key);
        assert_eq!(rows.len(), 1, "{key}: {rows:?}");
        assert_eq!(rows[0].1, "ExclusiveLock");
        drop(guard);
        assert!(locks_on(&mut admin, &key).is_empty(), "{key} still held");
    }
}

#[test]
fn a_single_key_and_a_pair_are_different_locks() {
    let pool = pool(2);
    let mut single = SessionLock::new(&pool, 7_i64).unwrap();
    let mut pair = SessionLock::new(&pool, (0, 7)).unwrap();
    let _a = single.try_lock().unwrap().expect("free");
    assert!(pair.try_lock().unwrap().is_some(), "(0, 7) is not 7");
}

#[test]
fn namespaced_keys_match_the_documented_sql_and_exclude_only_their_namespace() {
    let mut admin = common::admin();
    for (ns, name) in [
        ("tenant-1", "migrations"),
        ("tenant-2", "migrations"),
        ("", "migrations"),
        ("schema.öäü", "a 'quoted' name"),
        ("ns", ""),
    ] {
        let key = pglock::LockKey::from_name_in(ns, name);
        let server: i64 = admin
            .query_one(
                "SELECT hashtextextended($2, hashtextextended($1, 0))",
                &[&ns, &name],
            )
            .unwrap()
            .get(0);
        assert_eq!(key.as_i64(), Some(server), "{ns:?}/{name:?}");
    }
    // The SQL from the docs takes the same lock; another namespace is a different lock.
    let pool = common::pool(2);
    let ns = format!("{}/{}", function_name!(), std::process::id());
    let mut lock =
        pglock::SessionLock::new(&pool, pglock::LockKey::from_name_in(&ns, "jobs")).unwrap();
    let mut other =
        pglock::SessionLock::new(&pool, pglock::LockKey::from_name_in("elsewhere", "jobs"))
            .unwrap();
    admin
        .query(
            "SELECT pg_advisory_lock(hashtextextended('jobs', hashtextextended($1, 0)))",
            &[&ns],
        )
        .unwrap();
    assert!(
        lock.try_lock().unwrap().is_none(),
        "the documented SQL took another lock"
    );
    assert!(other.try_lock().unwrap().is_some(), "namespaces collided");
    admin
        .batch_execute("SELECT pg_advisory_unlock_all()")
        .unwrap();
    assert!(matches!(
        pglock::SessionLock::new(&pool, pglock::LockKey::from_name_in("a\0b", "x")),
        Err(pglock::Error::InvalidArgument { .. })
    ));
}
