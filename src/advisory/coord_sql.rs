//! The SQL of the coordination types built on session advisory locks
//! ([`AdvisorySemaphore`](crate::AdvisorySemaphore) and [`LockSet`](crate::LockSet)), as
//! plain functions, so that it can be read and tested without a server.
//!
//! As in `sql.rs`: functions are schema-qualified (`pg_catalog.`), and only integers and
//! fixed text are ever put into SQL text (a semaphore's channel name is digits and fixed
//! text too).

use super::sql::TRANSACTION_WAS_OPEN;
use crate::LockKey;

/// Lifts `statement_timeout` (and PostgreSQL 17's `transaction_timeout`) for the rest of
/// a simple-protocol batch's implicit transaction, so neither can cut a wait short.
const LIFT: &str = "SET LOCAL statement_timeout = 0; \
     SELECT CASE WHEN pg_catalog.current_setting('transaction_timeout', true) IS NOT NULL \
     THEN pg_catalog.set_config('transaction_timeout', '0', true) END; ";

// ---------------------------------------------------------------------------------------
// Semaphores
// ---------------------------------------------------------------------------------------

/// The first integer of every slot key of the semaphore `name`: the high 32 bits of
/// `hashtextextended(name, 0)`, i.e. `(hashtextextended(name, 0) >> 32)::int` in SQL.
pub(crate) fn semaphore_base(name: &str) -> i32 {
    LockKey::from_name(name).classid() as i32
}

/// The key of slot `slot` of the semaphore whose base is `base`: a pair, so it can never
/// collide with a 64-bit key (a name's, or a plain integer's).
pub(crate) fn slot_key(base: i32, slot: u32) -> LockKey {
    LockKey::pair(base, slot as i32)
}

/// The channel a release notifies and waiters listen on: `pglock_semaphore_<base>`.
pub(crate) fn semaphore_channel(base: i32) -> String {
    format!("pglock_semaphore_{base}")
}

/// `LISTEN` on the semaphore's channel (a quoted identifier: the base may be negative).
pub(crate) fn semaphore_listen(base: i32) -> String {
    format!("LISTEN \"{}\"", semaphore_channel(base))
}

/// `UNLISTEN` the semaphore's channel.
pub(crate) fn semaphore_unlisten(base: i32) -> String {
    format!("UNLISTEN \"{}\"", semaphore_channel(base))
}

/// One non-blocking try at every slot, starting at `start` and wrapping around, in one
/// statement: the first slot it took, or -1 when all were busy. `CASE` evaluates its
/// conditions in order and stops at the first true one, so at most one slot is taken.
pub(crate) fn semaphore_try(base: i32, permits: u32, start: u32) -> String {
    let mut sql = String::with_capacity(32 + permits as usize * 64);
    sql.push_str("SELECT CASE");
    for i in 0..permits {
        let slot = (start % permits + i) % permits;
        sql.push_str(&format!(
            " WHEN pg_catalog.pg_try_advisory_lock({base}, {slot}) THEN {slot}"
        ));
    }
    sql.push_str(" ELSE -1 END");
    sql
}

/// Releases slot `slot` and notifies the waiters, in one statement. Columns: whether it
/// unlocked, whether a transaction was open (the critical section left one: the notify
/// then waits for its end, and the caller must notify again after rolling it back).
pub(crate) fn semaphore_unlock(base: i32, slot: u32) -> String {
    format!(
        "SELECT pg_catalog.pg_advisory_unlock({base}, {slot})::text, ({TRANSACTION_WAS_OPEN})::text, \
         pg_catalog.pg_notify('{}', '')",
        semaphore_channel(base)
    )
}

/// The notification alone, after a `ROLLBACK` dropped the unlock's.
pub(crate) fn semaphore_notify(base: i32) -> String {
    format!(
        "SELECT pg_catalog.pg_notify('{}', '')",
        semaphore_channel(base)
    )
}

/// Releases every slot of the semaphore this session holds (after a failed try, when
/// what it took is unknown), and notifies if it released any.
pub(crate) fn semaphore_release_taken(base: i32, permits: u32) -> String {
    format!(
        "SET LOCAL statement_timeout = 0; \
         SELECT pg_catalog.pg_advisory_unlock({base}, objid::int), \
         pg_catalog.pg_notify('{}', '') \
         FROM pg_catalog.pg_locks WHERE locktype = 'advisory' \
         AND pid = pg_catalog.pg_backend_pid() AND classid = {} AND objsubid = 2 \
         AND objid < {permits} AND granted",
        semaphore_channel(base),
        base as u32
    )
}

// ---------------------------------------------------------------------------------------
// Lock sets
// ---------------------------------------------------------------------------------------

/// One all-or-nothing try at `keys` (already in canonical order), in one statement. It
/// tries them in order; when one is busy it releases the ones it took, innermost first,
/// and answers `false`. `true`: all taken. NULL: an unlock returned false (something
/// unlocked behind its back); the caller cleans up from `pg_locks`.
///
/// `f(j) = CASE WHEN try(k_j) THEN CASE f(j+1) WHEN true THEN true WHEN false THEN
/// CASE WHEN unlock(k_j) THEN false END END ELSE false END`, with `f(n) = try(k_n)`:
/// `CASE` evaluates only what it needs, in order, so nothing is tried after a busy key.
pub(crate) fn set_try(keys: &[LockKey]) -> String {
    let mut sql = String::from("SELECT ");
    sql.push_str(&set_try_from(keys));
    sql.push_str("::text");
    sql
}

fn set_try_from(keys: &[LockKey]) -> String {
    match keys {
        [] => "true".to_owned(),
        [last] => format!("pg_catalog.pg_try_advisory_lock({})", last.sql_args()),
        [first, rest @ ..] => {
            let k = first.sql_args();
            format!(
                "(CASE WHEN pg_catalog.pg_try_advisory_lock({k}) THEN CASE {} WHEN true \
                 THEN true WHEN false THEN CASE WHEN pg_catalog.pg_advisory_unlock({k}) \
                 THEN false END END ELSE false END)",
                set_try_from(rest)
            )
        }
    }
}

/// A blocking wait for all of `keys` (in canonical order), one after the other, in one
/// batch that lifts the session's timeouts. With `ms > 0` every wait gets the time left
/// of `ms` since the batch began as its `lock_timeout` (at least 1 ms), so the whole
/// wait is bounded by `ms`; with `ms == 0` there is no bound. A wait that runs out fails
/// with 55P03, and keys taken before it stay taken (session locks ignore the rollback):
/// the caller releases them with [`set_release_taken`].
pub(crate) fn set_wait(keys: &[LockKey], ms: u32) -> String {
    let timeout = if ms == 0 {
        "'0'".to_owned()
    } else {
        format!(
            "GREATEST(1, {ms} - (EXTRACT(EPOCH FROM pg_catalog.clock_timestamp() \
             - pg_catalog.statement_timestamp()) * 1000)::bigint)::text"
        )
    };
    // The target list runs left to right: each lock_timeout is set just before its wait.
    let waits: Vec<String> = keys
        .iter()
        .map(|k| {
            format!(
                "pg_catalog.set_config('lock_timeout', {timeout}, true), \
                 pg_catalog.pg_advisory_lock({})::text",
                k.sql_args()
            )
        })
        .collect();
    format!("{LIFT}SELECT {}, 'locked'", waits.join(", "))
}

/// Releases all of `keys`. Columns: whether every unlock returned true, whether a
/// transaction was open (the critical section left one), and each unlock's result.
pub(crate) fn set_unlock(keys: &[LockKey]) -> String {
    let unlocks: Vec<String> = keys
        .iter()
        .map(|k| format!("pg_catalog.pg_advisory_unlock({})", k.sql_args()))
        .collect();
    // An array constructor evaluates every element once, in order: every unlock runs.
    format!(
        "SELECT (pg_catalog.array_position(ARRAY[{}], false) IS NULL)::text, ({TRANSACTION_WAS_OPEN})::text",
        unlocks.join(", ")
    )
}

/// Releases whichever of `keys` this session holds (after a failed wait, when what it
/// took is unknown).
pub(crate) fn set_release_taken(keys: &[LockKey]) -> String {
    let conditions: Vec<String> = keys
        .iter()
        .map(|k| {
            format!(
                "(classid = {} AND objid = {} AND objsubid = {})",
                k.classid(),
                k.objid(),
                k.objsubid()
            )
        })
        .collect();
    format!(
        "SET LOCAL statement_timeout = 0; \
         SELECT CASE objsubid WHEN 1 THEN pg_catalog.pg_advisory_unlock( \
         ((classid::bigint << 32) | objid::bigint)) \
         ELSE pg_catalog.pg_advisory_unlock(classid::int4, objid::int4) END \
         FROM pg_catalog.pg_locks WHERE locktype = 'advisory' \
         AND pid = pg_catalog.pg_backend_pid() AND mode = 'ExclusiveLock' AND granted \
         AND ({})",
        conditions.join(" OR ")
    )
}

/// Whether this session holds every one of `keys`.
pub(crate) fn set_is_held(keys: &[LockKey]) -> String {
    let conditions: Vec<String> = keys
        .iter()
        .map(|k| {
            format!(
                "(classid = {} AND objid = {} AND objsubid = {})",
                k.classid(),
                k.objid(),
                k.objsubid()
            )
        })
        .collect();
    format!(
        "SELECT (count(*) = {})::text FROM pg_catalog.pg_locks WHERE locktype = 'advisory' \
         AND pid = pg_catalog.pg_backend_pid() AND mode = 'ExclusiveLock' AND granted \
         AND ({})",
        keys.len(),
        conditions.join(" OR ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn semaphore_slots_are_pairs_under_the_names_high_bits() {
        let name = "pglock-test/semaphore";
        let base = semaphore_base(name);
        let full = LockKey::from_name(name).as_i64().unwrap();
        assert_eq!(base, (full >> 32) as i32);
        let slot = slot_key(base, 3);
        assert_eq!(slot.as_pair(), Some((base, 3)));
        assert_eq!(slot.objsubid(), 2, "never the 64-bit key space of names");
        assert_eq!(semaphore_channel(-5), "pglock_semaphore_-5");
        assert_eq!(semaphore_listen(-5), "LISTEN \"pglock_semaphore_-5\"");
    }

    #[test]
    fn a_semaphore_try_rotates_and_stops_at_the_first_slot() {
        assert_eq!(
            semaphore_try(7, 3, 1),
            "SELECT CASE WHEN pg_catalog.pg_try_advisory_lock(7, 1) THEN 1 \
             WHEN pg_catalog.pg_try_advisory_lock(7, 2) THEN 2 \
             WHEN pg_catalog.pg_try_advisory_lock(7, 0) THEN 0 ELSE -1 END"
        );
        assert_eq!(
            semaphore_try(-1, 1, 5),
            "SELECT CASE WHEN pg_catalog.pg_try_advisory_lock(-1, 0) THEN 0 ELSE -1 END"
        );
    }

    #[test]
    fn a_semaphore_release_notifies() {
        let sql = semaphore_unlock(-9, 2);
        assert!(
            sql.starts_with("SELECT pg_catalog.pg_advisory_unlock(-9, 2)::text, "),
            "{sql}"
        );
        assert!(
            sql.ends_with("pg_catalog.pg_notify('pglock_semaphore_-9', '')"),
            "{sql}"
        );
        assert!(!sql.contains(';'), "one statement: {sql}");
        let taken = semaphore_release_taken(-1, 4);
        assert!(
            taken.contains("classid = 4294967295 AND objsubid = 2 AND objid < 4"),
            "{taken}"
        );
    }

    #[test]
    fn a_set_try_releases_what_it_took_when_a_key_is_busy() {
        let keys = [LockKey::new(1), LockKey::pair(2, 3)];
        assert_eq!(
            set_try(&keys),
            "SELECT (CASE WHEN pg_catalog.pg_try_advisory_lock(1) THEN CASE \
             pg_catalog.pg_try_advisory_lock(2, 3) WHEN true THEN true WHEN false THEN \
             CASE WHEN pg_catalog.pg_advisory_unlock(1) THEN false END END ELSE false END)::text"
        );
        assert_eq!(
            set_try(&keys[..1]),
            "SELECT pg_catalog.pg_try_advisory_lock(1)::text"
        );
        // Linear in the number of keys.
        let many: Vec<LockKey> = (0..100).map(LockKey::new).collect();
        assert!(set_try(&many).len() < 100 * 250);
    }

    #[test]
    fn a_set_wait_bounds_each_wait_by_the_time_left() {
        let keys = [LockKey::new(-1), LockKey::new(5)];
        let sql = set_wait(&keys, 250);
        assert!(
            sql.starts_with("SET LOCAL statement_timeout = 0; "),
            "{sql}"
        );
        assert_eq!(sql.matches("set_config('lock_timeout'").count(), 2, "{sql}");
        assert!(sql.contains("GREATEST(1, 250 - "), "{sql}");
        assert!(
            sql.find("pg_advisory_lock(-1)") < sql.find("pg_advisory_lock(5)"),
            "{sql}"
        );
        let unbounded = set_wait(&keys, 0);
        assert!(
            unbounded.contains("set_config('lock_timeout', '0', true)"),
            "{unbounded}"
        );
    }

    #[test]
    fn a_set_unlock_runs_every_unlock_once() {
        let keys = [LockKey::new(1), LockKey::pair(2, 3)];
        let sql = set_unlock(&keys);
        assert_eq!(sql.matches("pg_advisory_unlock(1)").count(), 1, "{sql}");
        assert_eq!(sql.matches("pg_advisory_unlock(2, 3)").count(), 1, "{sql}");
        let taken = set_release_taken(&keys);
        assert!(
            taken.contains("(classid = 0 AND objid = 1 AND objsubid = 1) OR (classid = 2 AND objid = 3 AND objsubid = 2)"),
            "{taken}"
        );
    }
}
