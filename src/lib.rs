//! Distributed locks on PostgreSQL, for synchronous Rust: advisory locks, and table
//! leases with heartbeats and fencing tokens.
//!
//! Many processes on many hosts must not run the same critical section at once: a
//! migration runner started by every replica, a cron job scheduled on three servers, a
//! batch step that must run once. pglock takes a PostgreSQL advisory lock on a connection
//! checked out of your [`r2d2`] pool, with blocking calls, RAII guards and closures; it
//! needs no tables and no async runtime. Where advisory locks do not fit (a
//! transaction-mode pooler, a fencing token, a lock that must be a row), a [`LeaseLock`]
//! keeps a lease in a table. On top of both: [`AdvisorySemaphore`], [`LeaseSemaphore`],
//! [`LockSet`], [`Leader`] election, and [`inspect`] for who holds what.
//!
//! ```no_run
//! use pglock::r2d2_postgres::{postgres::NoTls, PostgresConnectionManager};
//! use pglock::{r2d2, SessionLock};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let manager = PostgresConnectionManager::new("host=localhost user=postgres".parse()?, NoTls);
//! let pool = r2d2::Pool::new(manager)?;
//!
//! let mut lock = SessionLock::new(&pool, "nightly-report")?;
//! lock.with_lock(|conn| -> Result<(), Box<dyn std::error::Error>> {
//!     // One process in the whole cluster at a time runs this.
//!     conn.execute("INSERT INTO reports (day) VALUES (current_date)", &[])?;
//!     Ok(())
//! })?;
//! # Ok(())
//! # }
//! ```
//!
//! # Two kinds of lock
//!
//! - [`SessionLock`] (`pg_advisory_lock`): held by the database session until unlocked.
//!   It spans transactions, so it fits work that is not one transaction:
//!   `CREATE INDEX CONCURRENTLY`, long batch jobs, calls to other systems.
//! - [`TxLock`] (`pg_advisory_xact_lock`): taken inside a transaction and released when it
//!   commits or rolls back. The work runs in that transaction: success commits, an error
//!   or a panic rolls back. It works behind transaction-mode poolers (PgBouncer), and is
//!   what migration runners want.
//!
//! Both implement [`Locker`], in [`LockMode::Exclusive`] (the default) or
//! [`LockMode::Shared`] (the reader side of a reader-writer lock), and offer the same
//! calls:
//!
//! | call | blocks | when the lock is busy |
//! |---|---|---|
//! | `try_lock()` | never | `Ok(None)` |
//! | `try_lock_for(d)` | at most `d` | `Ok(None)` after `d` |
//! | `lock()` | up to [`LockOptions::lock_timeout`] (default: no bound) | [`Error::Timeout`] |
//! | `with_lock(f)` | like `lock()` | like `lock()`; runs `f` and releases on every path |
//!
//! The calls at work (every lock kind offers the same ones):
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use pglock::r2d2_postgres::{postgres::NoTls, PostgresConnectionManager};
//! use pglock::{r2d2, Error, LockMode, LockOptions, SessionGuard, SessionLock, TxLock, WaitMode};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let manager = PostgresConnectionManager::new("host=localhost user=app".parse()?, NoTls);
//! let pool = r2d2::Pool::new(manager)?;
//!
//! // Non-blocking: contention is not an error.
//! let mut lock = SessionLock::new(&pool, "nightly-report")?;
//! match lock.try_lock()? {
//!     Some(guard) => SessionGuard::unlock(guard)?, // or let it drop
//!     None => println!("another host is running the report"),
//! }
//!
//! // Bounded: the server enforces it with lock_timeout, in one round trip.
//! let options = LockOptions::new().lock_timeout(Duration::from_secs(30));
//! let mut lock = SessionLock::with_options(&pool, "nightly-report", options)?;
//! match lock.lock() {
//!     Ok(_guard) => { /* ... */ }
//!     Err(Error::Timeout { waited, .. }) => println!("gave up after {waited:?}"),
//!     Err(e) => return Err(e.into()),
//! }
//! if let Some(_guard) = lock.try_lock_for(Duration::from_millis(500))? {
//!     // held until the end of this block; `Ok(None)` when still busy after 500 ms
//! }
//!
//! // Many keys, one lock: no new checkout, prepared statements reused.
//! for job in ["job/1", "job/2"] {
//!     lock.set_key(job)?;
//!     if let Some(_guard) = lock.try_lock()? { /* run the job */ }
//! }
//!
//! // A guard that owns its lock and connection ('static + Send): keep it in a struct,
//! // move it to a thread.
//! let leader = SessionLock::new(&pool, "leader")?.lock_owned()?;
//! # drop(leader);
//!
//! // The lock and the work in one transaction: commit on Ok, roll back on Err or panic.
//! let mut lock = TxLock::new(&pool, "billing")?;
//! lock.with_lock(|tx| -> Result<(), Box<dyn std::error::Error>> {
//!     tx.execute("UPDATE accounts SET balance = balance - 10 WHERE id = 1", &[])?;
//!     let mut step = tx.transaction()?; // a savepoint, never a second BEGIN
//!     step.execute("UPDATE accounts SET balance = balance + 10 WHERE id = 2", &[])?;
//!     step.commit()?;
//!     Ok(())
//! })?;
//!
//! // Readers and writers; migration runners poll instead of waiting on the server.
//! let readers = LockOptions::new().mode(LockMode::Shared);
//! let polling = LockOptions::new().wait_mode(WaitMode::poll());
//! # let _ = (readers, polling);
//!
//! // Give up from another thread (a Ctrl-C handler, a supervisor).
//! let cancel = lock.cancel_handle();
//! std::thread::spawn(move || cancel.cancel());
//! # Ok(())
//! # }
//! ```
//!
//! Both are one generic [`AdvisoryLock<S, M>`](AdvisoryLock) over a sealed raw kind
//! ([`RawAdvisory`]), as are [`AdvisorySemaphore`] and [`LockSet`].
//! [`lock_owned`](AdvisoryLock::lock_owned) returns a guard that owns the lock and its
//! connection (`'static + Send`), for a leader that keeps its lock in a struct or a thread;
//! [`set_key`](AdvisoryLock::set_key) points one lock at another key without a new
//! checkout. A lock made from a pool takes a fresh connection when its session died.
//!
//! # Coordination
//!
//! On the same session advisory locks, and the same engine: [`AdvisorySemaphore`], a named
//! semaphore with N slots (a release wakes waiters through `NOTIFY`), and [`LockSet`],
//! several keys taken all or nothing in one canonical order, so overlapping sets never
//! deadlock. Both have every call above, owned guards, [`Locker`], and a `SessionLock`'s
//! handling of failures (pooler detection, retry on a fresh connection, cleanup).
//!
//! # One vocabulary
//!
//! Every kind of lock says the same things the same way:
//!
//! - **lock / unlock**: `try_lock` never blocks, `try_lock_for(d)` waits at most `d`, `lock`
//!   waits up to the kind's `lock_timeout`, `with_lock(f)` releases on every path,
//!   `lock_owned` / `try_lock_owned` return a `'static` guard; a guard's `unlock` is the
//!   same as dropping it, but reports the error.
//! - **Guard operations**: a guard that derefs to its connection (the advisory guards,
//!   [`SemaphorePermit`], [`LockSetGuard`] and their owned forms) has its own operations
//!   as associated functions (`SessionGuard::unlock(guard)`, `SemaphorePermit::slot(&p)`),
//!   so that they never shadow the connection's methods; the one exception is
//!   [`TxGuard::transaction`](AdvisoryGuard::transaction), which shadows
//!   `Client::transaction` on purpose (a savepoint, never a second `BEGIN`). A guard that
//!   does not deref ([`LeaseGuard`], [`Leadership`]) has methods (`guard.unlock()`).
//! - **Still held?** `is_held` asks the server (one round trip); `is_valid`, `is_leader`
//!   and `check` read local state only (a lease's deadline, a leader's watcher).
//! - **Constructors**: `new(pool, what)`, `with_options(pool, what, options)` and
//!   `from_connection(conn, what, options)`; a [`Leader`] is made with `advisory`,
//!   `advisory_with_options` or `lease`. Accessors have no `get_`: `key()`, `mode()`,
//!   `lock_timeout()`, `permits()`, `keys()`.
//! - **Limits** are associated constants of the type they bound:
//!   [`AdvisorySemaphore::MAX_PERMITS`], [`LockSet::MAX_KEYS`].
//!
//! # Keys
//!
//! A [`LockKey`] is an `i64`, an `(i32, i32)` pair, or a name. A name maps to PostgreSQL's
//! own `hashtextextended(name, 0)`, computed without a round trip, so any other program
//! takes the same lock with `SELECT pg_advisory_lock(hashtextextended('nightly-report', 0))`.
//!
//! # What the locks guarantee, and what they do not
//!
//! - **Advisory.** Only code that takes the same lock is excluded. Nothing stops a
//!   program that does not ask from touching the same rows.
//! - **Session locks stack and survive transactions.** On the server, a session that
//!   takes a lock twice must unlock it twice, and `COMMIT` or `ROLLBACK` does not release
//!   it. pglock hands out one guard at a time per lock, so this only matters to SQL you
//!   write yourself.
//! - **Transaction locks end with the transaction**, at `COMMIT` or `ROLLBACK`, and cannot
//!   be unlocked earlier.
//! - **A dead session frees its locks.** If the holder's process dies or its connection
//!   closes, the server frees the lock as soon as it notices, and the next waiter gets it.
//!   This is what makes advisory locks safe to use: no lease to expire, no stale lock
//!   file.
//! - **A lock can be lost silently.** An administrator's `pg_terminate_backend`,
//!   `idle_session_timeout`, `idle_in_transaction_session_timeout` or a failover ends the
//!   session and frees the lock while the holder still runs. The holder learns it at its
//!   next statement, at unlock ([`Error::LockLost`]), or by asking:
//!   [`SessionGuard::is_held`] and [`TxGuard::is_held`] cost one round trip. Long critical
//!   sections should ask between steps, and should write through the guard's connection,
//!   which fails once the session is gone.
//! - **Network partitions.** If the holder's host is cut off without closing its socket,
//!   the server keeps the lock until it notices the dead connection through TCP
//!   keepalives: by default on Linux, after about two hours; a call waiting on such a
//!   connection blocks until TCP gives up. Build the pool with [`NetworkTimeout`]: it
//!   bounds both ends (keepalives, `tcp_user_timeout`, and the server's
//!   `client_connection_check_interval`, which also frees the lock of a holder killed
//!   mid-statement). Until the bound passes, a partitioned holder and the server disagree
//!   about who holds the lock only if the holder keeps working without talking to the
//!   server; work done through the lock's own connection fails instead.
//! - **Transaction-mode poolers break session locks.** PgBouncer with
//!   `pool_mode = transaction` sends each transaction to any server session, and serves
//!   many clients from one server session. A session lock marks the server session it
//!   holds a lock on; a lock call from another client that lands there fails with
//!   [`Error::SessionShared`] and takes nothing, and an unlock that lands on another
//!   session reports [`Error::LockLost`] or [`Error::SessionShared`]. Use [`TxLock`]
//!   there, or connect directly or in session mode.
//!
//! # Timeouts
//!
//! Bounded waits use the server's `lock_timeout`, set for the lock statement alone
//! (`set_config(..., true)` in the statement itself): one round trip, and nothing is left
//! set on the pooled connection. Where the session has a `statement_timeout` (or
//! PostgreSQL 17's `transaction_timeout`), which pglock learns from the replies of its own
//! statements, the wait and the unlock go in a batch that lifts it with `SET LOCAL`, so it
//! cannot cut a wait short (or cancel an unlock). A zero
//! timeout means "try once", never PostgreSQL's "wait forever". A timeout above
//! PostgreSQL's limit (`i32::MAX` ms) is an [`Error::InvalidArgument`], never clamped.
//!
//! The server may grant a lock just as a timeout or a cancel fires. After such a failure
//! pglock looks in `pg_locks` for this session and releases what was taken (or, for a
//! [`TxLock`], rolls the transaction back), so a failed call never holds anything.
//!
//! # Pool hygiene
//!
//! No path (success, error, timeout, cancel, panic, lost connection, failed unlock)
//! returns a connection to the pool holding an advisory lock, an open transaction, a
//! session lock's marker, or a changed setting. When a release cannot be confirmed,
//! pglock ends the database session (`pg_terminate_backend(pg_backend_pid())`, or, where
//! a hardened server refuses that, idle timeouts of 1 ms): the server frees every lock it
//! held, and r2d2 discards the closed connection. A session lock's prepared statements
//! stay with the connection (in its r2d2 extensions) for the next lock on it. Settings
//! your own SQL changes with a session-level `SET` stay on the connection, as with any
//! pooled connection.
//!
//! # Waiting on the server, or polling
//!
//! By default a blocked call waits on the server, which wakes it the instant the lock is
//! free and detects deadlocks ([`Error::Deadlock`]). A session waiting on the server holds
//! a virtual transaction, though, and a holder that runs `CREATE INDEX CONCURRENTLY` waits
//! for every such transaction to end: holder and waiter deadlock, and after
//! `deadlock_timeout` the server fails one of them (on PostgreSQL 15 the waiter gets
//! [`Error::Deadlock`]; which side is the server's choice). Migration runners should use
//! [`WaitMode::Poll`], which polls with non-blocking tries and jittered backoff, outside
//! any transaction, and lets the index build finish.
//!
//! Pollers are not fair against server waiters: a session queued on the server gets the
//! lock the instant it is freed, before any poller's next try, so a poller beside busy
//! server waiters can starve (measured: one critical section per poller in 3 s against
//! 48 server waiters). Use one wait mode per key. Among pollers alone polling is not FIFO
//! either: whoever tries first after a release wins, and a poller that has waited long
//! tries only every `max_interval` (jittered), so keep `max_interval` short where waits
//! must be fair.
//!
//! # Deadlocks
//!
//! A deadlock the server can see ends with [`Error::Deadlock`] for one of the sessions in
//! it, after `deadlock_timeout` (1 s by default): for example a holder running
//! `CREATE INDEX CONCURRENTLY` while another session waits on the server for the lock.
//! A deadlock that runs through your program is invisible to the server: each lock has its
//! own connection, so if thread A holds lock 1 and waits for lock 2 while thread B holds
//! lock 2 and waits for lock 1, the server sees two idle holders and two waiters, and
//! nothing ends the wait. Take several keys in one fixed order, or bound the waits with
//! [`LockOptions::lock_timeout`].
//!
//! # Cancellation
//!
//! [`CancelHandle`] aborts a lock's waits from another thread (a Ctrl-C handler, a
//! supervisor): the waiter gets [`Error::Cancelled`] and holds nothing.
//!
//! # Who holds a lock
//!
//! [`inspect::holders`] lists the sessions that hold or wait for a key (or for every
//! advisory lock of the database), from `pg_locks` and `pg_stat_activity`.
//!
//! # Errors in a critical section
//!
//! [`Error`] is pglock's own: every variant names the lock that failed. The SQL a
//! critical section runs fails with [`postgres::Error`], which names no lock, so there is
//! no `From<postgres::Error>` for [`Error`]. Give the critical section (and the function
//! that runs it) an error type both convert into: `Box<dyn std::error::Error + Send +
//! Sync>`, `anyhow::Error`, or an enum of your own with a variant for each. `with_lock`
//! only asks that its closure's error type is `From<pglock::Error>`.
//!
//! ```no_run
//! use pglock::SessionGuard;
//!
//! type BoxError = Box<dyn std::error::Error + Send + Sync>;
//!
//! /// The critical section: `?` works on the guard's SQL and on pglock's own calls.
//! fn refresh(guard: &mut SessionGuard<'_>) -> Result<u64, BoxError> {
//!     if !SessionGuard::is_held(guard)? {
//!         return Err("lost the lock".into());
//!     }
//!     Ok(guard.execute("REFRESH MATERIALIZED VIEW daily_totals", &[])?)
//! }
//!
//! fn job(pool: &pglock::r2d2::Pool<pglock::r2d2_postgres::PostgresConnectionManager<pglock::postgres::NoTls>>) -> Result<u64, BoxError> {
//!     let mut lock = pglock::SessionLock::new(pool, "daily-totals")?;
//!     lock.with_lock(refresh)
//! }
//! ```
//!
//! # Metrics
//!
//! With the `metrics` cargo feature, pglock reports through the
//! [`metrics`](https://docs.rs/metrics) facade (install any recorder; the library stays
//! exporter-agnostic). Every series has the labels `kind` (`session`, `transaction`,
//! `lease`, `semaphore`, `lock_set`) and `lock` (the name, `namespace/name` for a
//! namespaced key, or the integer key: keep the set of locks bounded). A [`Leader`]
//! reports through the lock it campaigns with.
//!
//! | metric | type | when |
//! |---|---|---|
//! | `pglock_acquisitions_total` | counter | a lock was taken |
//! | `pglock_wait_seconds` | histogram | from the call to the lock, per acquisition |
//! | `pglock_busy_total` | counter | an attempt found the lock held (a `try_lock` that returned `None`, a bounded wait that ran out) |
//! | `pglock_timeouts_total` | counter | `lock()` failed with [`Error::Timeout`] |
//! | `pglock_cancellations_total` | counter | a wait ended with [`Error::Cancelled`] |
//! | `pglock_losses_total` | counter | a lock was found lost ([`Error::LockLost`]) |
//! | `pglock_hold_seconds` | histogram | from lock to release, per release |
//!
//! `recipes/examples/metrics.rs` in the repository serves them to Prometheus.
//!
//! # Logging
//!
//! Through [`log`]: `debug` on lock and unlock with the key and the time waited or held;
//! `warn` when a release fails or a lock is found lost.
#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]
#![deny(missing_debug_implementations)]
#![forbid(unsafe_code)]

mod advisory;
mod cancel;
mod error;
pub mod inspect;
mod key;
mod leader;
mod lease;
mod locker;
mod metrics;
mod network;
mod options;
mod wait;

pub use crate::advisory::{
    AdvisoryGuard, AdvisoryLock, AdvisorySemaphore, LockSet, LockSetGuard, OwnedAdvisoryGuard,
    OwnedLockSetGuard, OwnedSemaphorePermit, OwnedSessionGuard, OwnedTxGuard, RawAdvisory,
    RawKeySet, RawSession, RawSlots, RawTx, SemaphorePermit, SessionGuard, SessionLock, TxGuard,
    TxLock, TxSavepoint,
};
pub use crate::cancel::CancelHandle;
pub use crate::error::{Error, LostReason, Result};
pub use crate::key::LockKey;
pub use crate::leader::{Leader, Leadership};
pub use crate::lease::{
    LeaseGuard, LeaseHolder, LeaseInfo, LeaseLock, LeaseOptions, LeaseSemaphore, LeaseTable,
    LeaseWatch, OwnedLeaseGuard,
};
pub use crate::locker::Locker;
pub use crate::network::NetworkTimeout;
pub use crate::options::{LockMode, LockOptions, WaitMode};

pub use postgres;
pub use r2d2;
pub use r2d2_postgres;

/// The README's Rust examples, compiled by `cargo test --doc` as a user of pglock alone
/// writes them.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
