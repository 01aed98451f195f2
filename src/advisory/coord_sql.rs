//! The SQL of the coordination types built on session advisory locks
//! ([`AdvisorySemaphore`](crate::AdvisorySemaphore) and [`LockSet`](crate::LockSet)), as
//! plain functions, so that it can be read and tested without a server.
//!
//! As in `sql.rs`: functions are schema-qualified (`pg_catalog.`), and only integers and
//! fixed text are ever put into SQL text (a semaphore's channel name is digits and fixed
//! text too).

use super::sql::{
    literal, marker_is_ours, outside_transaction, IN_TRANSACTION, MARKER, SESSION_MARKER,
    TRANSACTION_WAS_OPEN,
};
use crate::LockKey;

/// What the first column of a coordination statement says. Every statement reads the
/// session marker (`pglock.session_lock`, see `sql.rs`): a semaphore marks the slot it
/// holds (`<prefix>@<base>,<slot>`), a lock set its prefix alone (no `@`: a transaction
/// lock refuses every key on that server session), so that behind a transaction-mode
/// pooler a second client routed to the same server session is refused instead of being
/// granted the same keys.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reply<'a> {
    /// The statement did its work; what it answered (`None` for NULL).
    Done(Option<&'a str>),
    /// The server session carries another client's marker: nothing was touched.
    Shared(&'a str),
    /// A transaction block was open before the statement: nothing was touched.
    InTransaction,
}

/// Reads the first column of a coordination statement.
pub(crate) fn reply(first: Option<&str>) -> Reply<'_> {
    match first {
        Some(IN_TRANSACTION) => Reply::InTransaction,
        Some(value) => match value.strip_prefix('#') {
            Some(other) => Reply::Shared(other),
            None => Reply::Done(Some(value)),
        },
        None => Reply::Done(None),
    }
}

/// Runs `work` (text) when the session's marker is empty or this lock's, else answers
/// `#` and the marker found.
fn if_ours(prefix: &str, work: &str) -> String {
    format!(
        "CASE WHEN {} THEN {work} ELSE '#' || {MARKER} END",
        marker_is_ours(prefix)
    )
}

/// Sets the session marker, as an empty text to append to an answer.
fn set_marker(value: &str) -> String {
    format!(
        "pg_catalog.left(pg_catalog.set_config('{SESSION_MARKER}', {}, false), 0)",
        literal(value)
    )
}

/// Clears this lock's marker after a `ROLLBACK` undid the release's clearing.
pub(crate) fn clear_marker(prefix: &str) -> String {
    format!(
        "SELECT pg_catalog.set_config('{SESSION_MARKER}', '', false) WHERE {}",
        marker_is_ours(prefix)
    )
}

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
/// statement. First column (see [`reply`]): the slot it took (and marked), or '' when all
/// were busy. `CASE` evaluates its conditions in order and stops at the first true one, so
/// at most one slot is taken. Decoded by [`semaphore_slot`].
pub(crate) fn semaphore_try(base: i32, permits: u32, start: u32, prefix: &str) -> String {
    let mut work = String::with_capacity(32 + permits as usize * 160);
    work.push_str("CASE");
    for i in 0..permits {
        let slot = (start % permits + i) % permits;
        work.push_str(&format!(
            " WHEN pg_catalog.pg_try_advisory_lock({base}, {slot}) THEN '{slot}' || {}",
            set_marker(&format!("{prefix}@{base},{slot}"))
        ));
    }
    work.push_str(" ELSE '' END");
    format!("SELECT {}", outside_transaction(&if_ours(prefix, &work)))
}

/// The slot a semaphore try's answer names: `Some(slot)` when it took one, `None` when
/// all were busy; `Err(())` for an answer the statement does not give.
pub(crate) fn semaphore_slot(done: Option<&str>, permits: u32) -> Result<Option<u32>, ()> {
    match done {
        Some("") => Ok(None),
        Some(slot) => match slot.parse::<u32>() {
            Ok(slot) if slot < permits => Ok(Some(slot)),
            _ => Err(()),
        },
        None => Err(()),
    }
}

/// Releases slot `slot`, clears the marker and notifies the waiters, in one statement.
/// Columns: whether it unlocked (see [`reply`]), whether a transaction was open (the
/// critical section left one: the notify then waits for its end, and the caller must
/// notify again after rolling it back, with [`semaphore_after_rollback`]).
pub(crate) fn semaphore_unlock(base: i32, slot: u32, prefix: &str) -> String {
    let work = format!(
        "pg_catalog.pg_advisory_unlock({base}, {slot})::text || {}",
        set_marker("")
    );
    format!(
        "SELECT {}, ({TRANSACTION_WAS_OPEN})::text, pg_catalog.pg_notify('{}', '')",
        if_ours(prefix, &work),
        semaphore_channel(base)
    )
}

/// The notification and the marker's clearing again, after a `ROLLBACK` dropped the
/// unlock's.
pub(crate) fn semaphore_after_rollback(base: i32, prefix: &str) -> String {
    format!(
        "SELECT pg_catalog.pg_notify('{}', ''); {}",
        semaphore_channel(base),
        clear_marker(prefix)
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
///
/// First column (see [`reply`]): `true` (all taken, and the marker set), `false`, NULL.
pub(crate) fn set_try(keys: &[LockKey], prefix: &str) -> String {
    let work = format!(
        "CASE {} WHEN true THEN 'true' || {} WHEN false THEN 'false' END",
        set_try_from(keys),
        set_marker(prefix)
    );
    format!("SELECT {}", outside_transaction(&if_ours(prefix, &work)))
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
/// statement, to send in a batch that lifts the session's timeouts (`sql::guarded`). With `ms > 0` every wait gets the time left
/// of `ms` since the batch began as its `lock_timeout` (at least 1 ms), so the whole
/// wait is bounded by `ms`; with `ms == 0` there is no bound. A wait that runs out fails
/// with 55P03, and keys taken before it stay taken (session locks ignore the rollback):
/// the caller releases them with [`set_release_taken`]. The marker is set first (rolled
/// back with the batch if a wait fails). First column of the last row (see [`reply`]): the
/// marker, the timeouts and `locked` when all were taken ([`set_waited`]).
pub(crate) fn set_wait(keys: &[LockKey], ms: u32, prefix: &str) -> String {
    let timeout = if ms == 0 {
        "'0'".to_owned()
    } else {
        format!(
            "GREATEST(1, {ms} - (EXTRACT(EPOCH FROM pg_catalog.clock_timestamp() \
             - pg_catalog.statement_timestamp()) * 1000)::bigint)::text"
        )
    };
    // `||` runs left to right: each lock_timeout is set just before its wait.
    let waits: Vec<String> = keys
        .iter()
        .map(|k| {
            format!(
                "pg_catalog.set_config('lock_timeout', {timeout}, true) || \
                 pg_catalog.pg_advisory_lock({})::text",
                k.sql_args()
            )
        })
        .collect();
    let work = format!(
        "pg_catalog.set_config('{SESSION_MARKER}', {}, false) || {} || 'locked'",
        literal(prefix),
        waits.join(" || ")
    );
    format!("SELECT {}", outside_transaction(&if_ours(prefix, &work)))
}

/// Whether a set wait's answer says every key was taken.
pub(crate) fn set_waited(done: Option<&str>) -> bool {
    done.is_some_and(|d| d.ends_with("locked"))
}

/// Releases all of `keys` and clears the marker. Columns: whether every unlock returned
/// true (see [`reply`]), whether a transaction was open (the critical section left one).
pub(crate) fn set_unlock(keys: &[LockKey], prefix: &str) -> String {
    let unlocks: Vec<String> = keys
        .iter()
        .map(|k| format!("pg_catalog.pg_advisory_unlock({})", k.sql_args()))
        .collect();
    // An array constructor evaluates every element once, in order: every unlock runs.
    let work = format!(
        "(pg_catalog.array_position(ARRAY[{}], false) IS NULL)::text || {}",
        unlocks.join(", "),
        set_marker("")
    );
    format!(
        "SELECT {}, ({TRANSACTION_WAS_OPEN})::text",
        if_ours(prefix, &work)
    )
}

/// Releases whichever of `keys` this session holds (after a failed wait, when what it
/// took is unknown).
pub(crate) fn set_release_taken(keys: &[LockKey]) -> String {
    format!(
        "SET LOCAL statement_timeout = 0; \
         SELECT CASE objsubid WHEN 1 THEN pg_catalog.pg_advisory_unlock( \
         ((classid::bigint << 32) | objid::bigint)) \
         ELSE pg_catalog.pg_advisory_unlock(classid::int4, objid::int4) END \
         FROM pg_catalog.pg_locks WHERE locktype = 'advisory' \
         {}",
        held_by_this_session(keys)
    )
}

/// The `pg_locks` condition of this session's exclusive, granted locks on any of `keys`.
fn held_by_this_session(keys: &[LockKey]) -> String {
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
        "AND pid = pg_catalog.pg_backend_pid() AND mode = 'ExclusiveLock' AND granted \
         AND ({})",
        conditions.join(" OR ")
    )
}

/// Whether this session holds every one of `keys`.
pub(crate) fn set_is_held(keys: &[LockKey]) -> String {
    format!(
        "SELECT (count(*) = {})::text FROM pg_catalog.pg_locks WHERE locktype = 'advisory' \
         {}",
        keys.len(),
        held_by_this_session(keys)
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

    const P: &str = "pglock:1:ab";

    #[test]
    fn a_semaphore_try_rotates_stops_at_the_first_slot_and_marks_it() {
        let sql = semaphore_try(7, 3, 1, P);
        let (one, two, zero) = (
            sql.find("pg_try_advisory_lock(7, 1) THEN '1'").unwrap(),
            sql.find("pg_try_advisory_lock(7, 2) THEN '2'").unwrap(),
            sql.find("pg_try_advisory_lock(7, 0) THEN '0'").unwrap(),
        );
        assert!(one < two && two < zero, "{sql}");
        assert!(sql.contains("'pglock:1:ab@7,1'"), "{sql}");
        assert!(sql.contains("split_part(COALESCE("), "{sql}");
        assert!(sql.contains("ELSE '' END"), "{sql}");
        assert!(
            sql.starts_with("SELECT CASE WHEN pg_catalog.now() OPERATOR"),
            "{sql}"
        );
        assert!(!sql.contains(';'), "one statement: {sql}");
        let one_slot = semaphore_try(-1, 1, 5, P);
        assert_eq!(
            one_slot.matches("pg_try_advisory_lock").count(),
            1,
            "{one_slot}"
        );
        assert!(
            one_slot.contains("pg_try_advisory_lock(-1, 0) THEN '0'"),
            "{one_slot}"
        );
    }

    #[test]
    fn every_reply_shape_of_a_coordination_statement_is_read() {
        assert_eq!(reply(Some("!")), Reply::InTransaction);
        assert_eq!(
            reply(Some("#pglock:2:cd@1")),
            Reply::Shared("pglock:2:cd@1")
        );
        assert_eq!(reply(Some("#")), Reply::Shared(""));
        assert_eq!(reply(Some("true")), Reply::Done(Some("true")));
        assert_eq!(reply(Some("")), Reply::Done(Some("")));
        assert_eq!(reply(None), Reply::Done(None));
        // A semaphore try: a slot, busy, or an answer it never gives.
        assert_eq!(semaphore_slot(Some("2"), 3), Ok(Some(2)));
        assert_eq!(semaphore_slot(Some(""), 3), Ok(None));
        assert_eq!(semaphore_slot(Some("3"), 3), Err(()));
        assert_eq!(semaphore_slot(Some("-1"), 3), Err(()));
        assert_eq!(semaphore_slot(None, 3), Err(()));
        // A set wait.
        assert!(set_waited(Some("pglock:1:ab500500locked")));
        assert!(!set_waited(Some("pglock:1:ab")));
        assert!(!set_waited(None));
    }

    #[test]
    fn a_semaphore_release_clears_its_marker_and_notifies() {
        let sql = semaphore_unlock(-9, 2, P);
        assert!(
            sql.contains("THEN pg_catalog.pg_advisory_unlock(-9, 2)::text || pg_catalog.left(pg_catalog.set_config('pglock.session_lock', '', false), 0) ELSE '#' ||"),
            "{sql}"
        );
        assert!(
            sql.ends_with("pg_catalog.pg_notify('pglock_semaphore_-9', '')"),
            "{sql}"
        );
        assert!(!sql.contains(';'), "one statement: {sql}");
        let again = semaphore_after_rollback(-9, P);
        assert!(
            again.contains("pg_notify('pglock_semaphore_-9', '')"),
            "{again}"
        );
        assert!(
            again.contains("set_config('pglock.session_lock', '', false) WHERE"),
            "{again}"
        );
        let taken = semaphore_release_taken(-1, 4);
        assert!(
            taken.contains("classid = 4294967295 AND objsubid = 2 AND objid < 4"),
            "{taken}"
        );
    }

    #[test]
    fn a_set_try_releases_what_it_took_when_a_key_is_busy() {
        let keys = [LockKey::new(1), LockKey::pair(2, 3)];
        let sql = set_try(&keys, P);
        assert!(
            sql.contains(
                "CASE (CASE WHEN pg_catalog.pg_try_advisory_lock(1) THEN CASE \
                 pg_catalog.pg_try_advisory_lock(2, 3) WHEN true THEN true WHEN false THEN \
                 CASE WHEN pg_catalog.pg_advisory_unlock(1) THEN false END END ELSE false END) \
                 WHEN true THEN 'true' || pg_catalog.left(pg_catalog.set_config('pglock.session_lock', 'pglock:1:ab', false), 0) \
                 WHEN false THEN 'false' END"
            ),
            "{sql}"
        );
        let one = set_try(&keys[..1], P);
        assert!(
            one.contains("CASE pg_catalog.pg_try_advisory_lock(1) WHEN true"),
            "{one}"
        );
        // Linear in the number of keys.
        let many: Vec<LockKey> = (0..100).map(LockKey::new).collect();
        assert!(set_try(&many, P).len() < 100 * 250 + 1000);
    }

    #[test]
    fn a_set_wait_bounds_each_wait_by_the_time_left() {
        let keys = [LockKey::new(-1), LockKey::new(5)];
        let sql = set_wait(&keys, 250, P);
        assert!(
            sql.starts_with("SELECT CASE WHEN pg_catalog.now()"),
            "{sql}"
        );
        assert!(
            !sql.contains(';'),
            "one statement, for a lifting batch: {sql}"
        );
        assert_eq!(sql.matches("set_config('lock_timeout'").count(), 2, "{sql}");
        assert!(sql.contains("GREATEST(1, 250 - "), "{sql}");
        assert!(
            sql.find("pg_advisory_lock(-1)") < sql.find("pg_advisory_lock(5)"),
            "{sql}"
        );
        assert!(
            sql.contains(
                "THEN pg_catalog.set_config('pglock.session_lock', 'pglock:1:ab', false) || "
            ),
            "{sql}"
        );
        assert!(sql.ends_with("|| 'locked' ELSE '#' || COALESCE(pg_catalog.current_setting('pglock.session_lock', true), '') END END"), "{sql}");
        let unbounded = set_wait(&keys, 0, P);
        assert!(
            unbounded.contains("set_config('lock_timeout', '0', true)"),
            "{unbounded}"
        );
    }

    #[test]
    fn a_set_unlock_runs_every_unlock_once() {
        let keys = [LockKey::new(1), LockKey::pair(2, 3)];
        let sql = set_unlock(&keys, P);
        assert_eq!(sql.matches("pg_advisory_unlock(1)").count(), 1, "{sql}");
        assert_eq!(sql.matches("pg_advisory_unlock(2, 3)").count(), 1, "{sql}");
        let taken = set_release_taken(&keys);
        assert!(
            taken.contains("(classid = 0 AND objid = 1 AND objsubid = 1) OR (classid = 2 AND objid = 3 AND objsubid = 2)"),
            "{taken}"
        );
    }
}
