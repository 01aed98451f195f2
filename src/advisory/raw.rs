//! What differs between the kinds of advisory lock, as `lock_api` builds `Mutex<R, T>`
//! over `RawMutex`: a sealed raw trait whose implementations carry the behaviour that
//! differs (the statements a kind sends, how it waits, how it cleans up and releases).
//! The engine that uses it (`engine.rs`: checkout, settings, tries, polls, waits,
//! cleanup after every failure, ending a session it cannot trust, metrics) and the
//! public lock and guards (`mod.rs`: retry on a fresh connection, owned guards,
//! [`Locker`](crate::Locker); `guard.rs`) are written once, with no branch on the kind.
//!
//! | kind | file | holds | waits on the server |
//! |---|---|---|---|
//! | [`RawSession`](super::RawSession) | `session.rs` | one key, for the session | one statement |
//! | [`RawTx`](super::RawTx) | `tx.rs` | one key, in its transaction | one statement |
//! | [`RawSlots`](super::RawSlots) | `semaphore.rs` | one of N slot keys | notifications, not a statement |
//! | [`RawKeySet`](super::RawKeySet) | `set.rs` | every key of a set | one batch |
//!
//! A new kind is an implementation of [`sealed::Raw`], not a copy of the engine.

/// The kind of an advisory lock: [`RawSession`](crate::RawSession),
/// [`RawTx`](crate::RawTx), [`RawSlots`](crate::RawSlots) (the slots of an
/// [`AdvisorySemaphore`](crate::AdvisorySemaphore)) or [`RawKeySet`](crate::RawKeySet) (the keys
/// of a [`LockSet`](crate::LockSet)). Sealed: these four are all there is.
pub trait RawAdvisory: sealed::Raw {}

pub(crate) mod sealed {
    use std::time::Instant;

    use postgres::Client;
    use r2d2::PooledConnection;

    use crate::advisory::engine::{Core, Manager};
    use crate::advisory::reply::Row;
    use crate::advisory::sql;
    use crate::error::Failure;
    use crate::wait::{Limit, Outcome};
    use crate::{LockKey, Result};

    /// What a kind of advisory lock does differently. Every method gets the engine's
    /// state (`core`, with the kind's own in `core.raw`) and the lock's connection; on
    /// every error return the connection holds nothing the call took.
    pub trait Raw: Sized + Clone + Send + Sync + 'static + std::fmt::Debug {
        /// The `kind` label of its metrics and logs.
        const KIND: &'static str;
        /// The public type's name, for `Debug`.
        const NAME: &'static str;

        /// The session marker a lock of this kind sets (or what precedes the `@` of the
        /// markers it sets), from its per-lock prefix and its key: by default the prefix,
        /// `@` and the key (see the session marker in `sql.rs`).
        fn token(prefix: &str, key: &LockKey) -> String {
            format!("{prefix}@{}", sql::tx_marker(key))
        }

        /// One non-blocking try: whether it locked.
        fn try_once<M: Manager>(
            core: &mut Core<Self>,
            conn: &mut PooledConnection<M>,
        ) -> Result<bool>;

        /// A blocking wait within `limit` (never [`Limit::Try`]), begun at `start`.
        fn wait<M: Manager>(
            core: &mut Core<Self>,
            conn: &mut PooledConnection<M>,
            limit: Limit,
            start: Instant,
        ) -> Result<Outcome>;

        /// Undoes whatever a lock statement that failed with `failure` (never
        /// [`Failure::Closed`]) may have taken.
        fn clean_up<M: Manager>(
            core: &mut Core<Self>,
            conn: &mut PooledConnection<M>,
            failure: Failure,
        ) -> Result<()>;

        /// Ends a hold (`core.held`): releases it, or for a transaction lock commits
        /// (`success`) or rolls back. `used`: the critical section had the connection.
        fn finish<M: Manager>(
            core: &mut Core<Self>,
            conn: &mut PooledConnection<M>,
            used: bool,
            success: bool,
        ) -> Result<()>;

        /// Asks the server whether this session holds what a guard holds: by default the
        /// lock's key, in its mode.
        fn is_held(core: &mut Core<Self>, client: &mut Client) -> Result<bool> {
            let sql = sql::is_held(core.mode(), core.key());
            core.ask_held(client, &sql)
        }

        /// A fresh connection replaced a dead one: nothing is held or set up on it.
        fn connected(&mut self) {}

        /// The connection leaves the lock (back to the pool, or to the caller): undo any
        /// per-connection set-up (a semaphore's `LISTEN`).
        fn leave(core: &mut Core<Self>, client: &mut Client) {
            let _ = (core, client);
        }
    }

    /// Kinds whose blocking wait is one statement (or batch) on the server, bounded by
    /// `lock_timeout`: the engine's `wait_on_server` sends it, lifts the session's
    /// timeouts when needed, and reads it.
    pub(crate) trait ServerWait: Raw {
        /// Sends the wait bounded by `ms` milliseconds (0: no bound). When the session's
        /// settings are not known quiet, a batch whose first row is the settings.
        fn send_wait<M: Manager>(
            core: &mut Core<Self>,
            conn: &mut PooledConnection<M>,
            ms: u32,
        ) -> Result<Vec<Row>, postgres::Error>;

        /// Reads the wait's last row: `true` when it locked, `false` when it took nothing
        /// (cleaned up); an error when it was refused.
        fn waited<M: Manager>(
            core: &mut Core<Self>,
            conn: &mut PooledConnection<M>,
            row: &Row,
        ) -> Result<bool>;
    }

    /// Kinds whose guards `unlock` (all but a transaction lock, which commits or rolls
    /// back).
    pub trait Unlocks: Raw {}

    /// Kinds of one key: made with `new(pool, key)`, and pointed elsewhere with `set_key`.
    pub trait OneKey: Raw + Default {}
}
