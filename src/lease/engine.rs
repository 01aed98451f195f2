//! What every lease shares: the lock's connection, the hold's state, the heartbeat thread,
//! and the statements that take, renew and release a slot.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use postgres::error::SqlState;
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::Type;
use postgres::Client;
use r2d2::{ManageConnection, Pool, PooledConnection};

use crate::cancel::CancelState;
use crate::error::Failure;
use crate::lease::{sql, LeaseInfo, LeaseOptions};
use crate::wait::{Backoff, Limit};
use crate::{Error, LockKey, LostReason, Result};

/// What a lease needs to talk to the server, fixed when it is made.
pub(crate) struct Spec {
    pub(crate) key: LockKey,
    pub(crate) name: String,
    pub(crate) slots: u32,
    pub(crate) options: LeaseOptions,
    pub(crate) owner: String,
    payload: String,
    lock_sql: String,
    renew_sql: String,
    unlock_sql: String,
    delete_sql: String,
    read_sql: String,
    fence_sql: String,
    abandon_sql: String,
}

impl Spec {
    pub(crate) fn new(name: &str, slots: u32, options: LeaseOptions) -> Result<Spec> {
        let table = options.table.to_string();
        let key = LockKey::lease(&table, name);
        super::options::check_text(&key, "name", name)?;
        options.validate(&key)?;
        if slots == 0 {
            return Err(Error::InvalidArgument {
                key,
                message: "a lease semaphore needs at least one slot".to_owned(),
            });
        }
        if slots > i32::MAX as u32 {
            return Err(Error::InvalidArgument {
                key,
                message: format!("{slots} slots is more than {}", i32::MAX),
            });
        }
        let sequence = options.table.sequence();
        let notify = options.notify;
        // Renewals and releases wait at most a heartbeat period (and 5 s) behind another
        // session's row lock.
        let wait_ms = options
            .heartbeat_period()
            .min(Duration::from_secs(5))
            .as_millis()
            .max(1) as u32;
        Ok(Spec {
            owner: options.owner.clone().unwrap_or_else(default_owner),
            payload: sql::notify_payload(&table, name),
            lock_sql: sql::lock(&table, &sequence),
            renew_sql: sql::renew(&table, wait_ms),
            unlock_sql: sql::unlock(&table, false, notify, wait_ms),
            delete_sql: sql::unlock(&table, true, notify, wait_ms),
            read_sql: sql::read(&table),
            fence_sql: sql::fence(&table),
            abandon_sql: sql::abandon(&table, wait_ms),
            key,
            name: name.to_owned(),
            slots,
            options,
        })
    }

    fn db_error(&self, operation: &'static str) -> impl FnOnce(postgres::Error) -> Error + '_ {
        move |source| Error::Database {
            key: self.key.clone(),
            operation,
            source,
        }
    }

    fn lost(&self, source: Option<postgres::Error>) -> Error {
        crate::metrics::lost("lease", &self.key);
        Error::LockLost {
            key: self.key.clone(),
            reason: LostReason::LeaseExpired,
            source,
        }
    }
}

/// `host:pid`, from the kernel's host name where there is one.
fn default_owner() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".to_owned());
    let mut owner = format!("{host}:{}", std::process::id());
    owner.retain(|c| c != '\0');
    owner.truncate(super::options::MAX_TEXT_BYTES);
    owner
}

/// A slot held with a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Held {
    pub(crate) slot: i32,
    pub(crate) token: i64,
    /// The nonce of the attempt that took it, stored in the row: renewals, fences and
    /// releases require it, because a token alone can be handed out twice (a failover
    /// that lost the token sequence's last WAL record). `None` for the token-only calls
    /// ([`renew_token`](super::LeaseLock::renew_token), `unlock_token`).
    pub(crate) nonce: Option<i64>,
}

/// Who held the lease at the last failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHolder {
    /// The holder's owner string.
    pub owner: String,
    /// The holder's fencing token.
    pub token: i64,
    /// The slot it holds.
    pub slot: u32,
    /// How long its lease had left, as the server saw it.
    pub remaining: Duration,
}

/// One held lease, as the guard, its watches and the heartbeat thread see it.
#[derive(Debug)]
struct Hold {
    /// Which hold of this lock this is (a released hold's late heartbeat is ignored).
    id: u64,
    held: Held,
    /// Until when the holder trusts the lease.
    deadline: Instant,
    /// When the next heartbeat is due.
    next_beat: Instant,
    /// Sticky: once the deadline passed or the server said no, the lease is lost.
    lost: bool,
    failures: u32,
    /// When the statement that took it was sent.
    taken: Instant,
}

#[derive(Debug, Default)]
struct State {
    hold: Option<Hold>,
    next_id: u64,
    worker_started: bool,
    shutdown: bool,
}

/// The state shared by the lock, its guard, its watches and its heartbeat thread.
#[derive(Debug, Default)]
pub(crate) struct Status {
    state: Mutex<State>,
    changed: Condvar,
    /// Wakes the heartbeat thread at shutdown. It is never woken to start a hold: idle,
    /// it looks every heartbeat period, which is never later than a new hold's first
    /// heartbeat is due; so taking and releasing a lease costs no thread wake-up.
    beat: Condvar,
}

impl Status {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The hold `id`'s remaining trusted time; zero once lost (and marks it lost when the
    /// deadline has passed).
    pub(crate) fn remaining(&self, id: u64) -> Duration {
        let mut state = self.state();
        match state.hold.as_mut() {
            Some(hold) if hold.id == id => {
                let now = Instant::now();
                if !hold.lost && now >= hold.deadline {
                    hold.lost = true;
                    self.changed.notify_all();
                }
                if hold.lost {
                    Duration::ZERO
                } else {
                    hold.deadline - now
                }
            }
            _ => Duration::ZERO,
        }
    }

    /// Blocks until hold `id` is lost or `timeout` passes; true if lost.
    pub(crate) fn wait_lost(&self, id: u64, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        let mut state = self.state();
        loop {
            let now = Instant::now();
            let deadline = match state.hold.as_mut() {
                Some(hold) if hold.id == id => {
                    if !hold.lost && now >= hold.deadline {
                        hold.lost = true;
                        self.changed.notify_all();
                    }
                    if hold.lost {
                        return true;
                    }
                    hold.deadline
                }
                _ => return true,
            };
            if now >= until {
                return false;
            }
            let wake = deadline.min(until);
            state = self
                .changed
                .wait_timeout(state, wake - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// The lock's state: its spec, pool, connection and status, shared with the heartbeat
/// thread and the guards.
pub(crate) struct Shared<M: ManageConnection<Connection = Client>> {
    pub(crate) spec: Spec,
    pool: Pool<M>,
    /// The lock's one connection: waits, lock and unlock statements, and the heartbeats
    /// while a lease is held (the guard does not hand it out, so no application work can
    /// starve them).
    conn: Mutex<Option<PooledConnection<M>>>,
    pub(crate) status: Arc<Status>,
    pub(crate) cancel: Arc<CancelState>,
    busy: Mutex<Option<LeaseHolder>>,
}

impl<M: ManageConnection<Connection = Client>> Shared<M> {
    pub(crate) fn new(pool: &Pool<M>, spec: Spec) -> Arc<Self> {
        let cancel = CancelState::new(spec.key.clone(), None);
        Arc::new(Shared {
            spec,
            pool: pool.clone(),
            conn: Mutex::new(None),
            status: Arc::new(Status::default()),
            cancel,
            busy: Mutex::new(None),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Option<PooledConnection<M>>> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The lock's connection, checked out (again) when it has none or it closed.
    fn connected<'c>(
        &self,
        slot: &'c mut Option<PooledConnection<M>>,
        timeout: Option<Duration>,
    ) -> Result<&'c mut Client> {
        if slot.as_ref().is_some_and(|c| c.is_closed()) {
            *slot = None;
        }
        if slot.is_none() {
            let conn = match timeout {
                Some(t) => self.pool.get_timeout(t),
                None => self.pool.get(),
            }
            .map_err(|source| Error::Pool {
                key: self.spec.key.clone(),
                source,
            })?;
            self.cancel.set_token(conn.cancel_token());
            *slot = Some(conn);
        }
        Ok(slot.as_mut().expect("just connected"))
    }

    /// Runs `f` on the lock's connection; a connection that failed is replaced next time.
    fn with_conn<T>(
        &self,
        timeout: Option<Duration>,
        f: impl FnOnce(&mut Client) -> std::result::Result<T, postgres::Error>,
        operation: &'static str,
    ) -> Result<T> {
        let mut slot = self.conn();
        let client = self.connected(&mut slot, timeout)?;
        let result = f(client);
        if let Err(e) = &result {
            // Closed, or the server's word that it ended the session (a shutdown, an
            // administrator): the next statement needs a fresh connection.
            if client.is_closed() || Failure::of(e) == Failure::Closed {
                *slot = None;
            }
        }
        result.map_err(self.spec.db_error(operation))
    }

    /// One attempt at slot `slot`: `Ok(Ok(held))` if taken, `Ok(Err(holder))` if busy
    /// (`None`: a concurrent insert won the race; try again soon).
    fn try_slot(
        &self,
        slot: i32,
        rng: &mut u64,
    ) -> Result<std::result::Result<Held, Option<LeaseHolder>>> {
        // The first use of a slot creates its (expired) row; the next statement takes it.
        for _ in 0..3 {
            match self.try_slot_once(slot, rng)? {
                Some(outcome) => return Ok(outcome),
                None => continue,
            }
        }
        Ok(Err(None))
    }

    /// One lock statement: `None` when it only created the slot's row (or raced another
    /// session doing so, or a serialization failure under a stricter default isolation
    /// level made it give up): try again at once.
    fn try_slot_once(
        &self,
        slot: i32,
        rng: &mut u64,
    ) -> Result<Option<std::result::Result<Held, Option<LeaseHolder>>>> {
        let spec = &self.spec;
        let lease_us = spec.options.lease_us();
        let data = spec.options.data.as_deref();
        let replace = data.is_some();
        let nonce = crate::wait::next_random(rng) as i64;
        let rows = self.with_conn(
            None,
            |c| {
                c.query_typed(
                    &spec.lock_sql,
                    &[
                        (&spec.name, Type::TEXT),
                        (&slot, Type::INT4),
                        (&spec.owner, Type::TEXT),
                        (&lease_us, Type::INT8),
                        (&data, Type::BYTEA),
                        (&replace, Type::BOOL),
                        (&nonce, Type::INT8),
                    ],
                )
            },
            "lock",
        );
        let rows = match rows {
            Ok(rows) => rows,
            Err(Error::Database { source, .. })
                if matches!(
                    source.code(),
                    Some(&SqlState::T_R_SERIALIZATION_FAILURE | &SqlState::T_R_DEADLOCK_DETECTED)
                ) =>
            {
                return Ok(None);
            }
            Err(Error::Database { source, .. })
                if source.code() == Some(&SqlState::READ_ONLY_SQL_TRANSACTION) =>
            {
                return Err(Error::ReadOnlyStandby {
                    key: spec.key.clone(),
                });
            }
            Err(e) => {
                if let Error::Database { source, .. } = &e {
                    if source.as_db_error().is_none() {
                        // No reply: the lease may have been taken before the connection
                        // failed. Undo whatever this attempt took, on a fresh connection,
                        // so it is not stranded for a whole lease.
                        self.abandon(slot, nonce);
                    }
                }
                return Err(e);
            }
        };
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let decode = || -> std::result::Result<_, postgres::Error> {
            let Some(locked) = row.try_get::<_, Option<bool>>(0)? else {
                return Ok(None);
            };
            let token: i64 = row.try_get(1)?;
            if locked {
                return Ok(Some(Ok(Held {
                    slot,
                    token,
                    nonce: Some(nonce),
                })));
            }
            let remaining: i64 = row.try_get(3)?;
            Ok(Some(Err(Some(LeaseHolder {
                owner: row.try_get(2)?,
                token,
                slot: slot as u32,
                remaining: Duration::from_micros(remaining.max(0) as u64),
            }))))
        };
        decode().map_err(spec.db_error("lock"))
    }

    /// Best effort: ends the lease an attempt with `nonce` may have taken on `slot`.
    fn abandon(&self, slot: i32, nonce: i64) {
        let spec = &self.spec;
        let result = self.with_conn(
            Some(Duration::from_secs(5)),
            |c| {
                c.query_typed(
                    &spec.abandon_sql,
                    &[
                        (&spec.name, Type::TEXT),
                        (&slot, Type::INT4),
                        (&nonce, Type::INT8),
                    ],
                )
            },
            "undo a lock whose reply was lost",
        );
        match result {
            Ok(_) => log::warn!(
                "lease {}: a lock statement's reply was lost; undid what it took, or will take",
                spec.key
            ),
            Err(e) => log::warn!("lease {}: {e}", spec.key),
        }
    }

    /// One attempt at every slot, starting at a random one. `Ok(Ok(held))` if one was
    /// taken (the hold is then registered and the heartbeat thread told), else the holder
    /// whose lease ends first.
    fn try_once(
        self: &Arc<Self>,
        rng: &mut u64,
    ) -> Result<std::result::Result<(u64, Held), Option<LeaseHolder>>> {
        let slots = self.spec.slots;
        let start = if slots > 1 {
            (crate::wait::next_random(rng) % u64::from(slots)) as u32
        } else {
            0
        };
        let mut first_free: Option<LeaseHolder> = None;
        for i in 0..slots {
            let slot = ((start + i) % slots) as i32;
            let sent = Instant::now();
            match self.try_slot(slot, rng)? {
                Ok(held) => {
                    let id = self.register(held, sent);
                    return Ok(Ok((id, held)));
                }
                Err(holder) => {
                    let sooner = match (&first_free, &holder) {
                        (None, _) => true,
                        (Some(a), Some(b)) => b.remaining < a.remaining,
                        (Some(_), None) => false,
                    };
                    if sooner {
                        first_free = holder;
                    }
                }
            }
        }
        Ok(Err(first_free))
    }

    /// Records a new hold taken with a statement sent at `sent`, and starts or wakes the
    /// heartbeat thread.
    fn register(self: &Arc<Self>, held: Held, sent: Instant) -> u64 {
        let options = &self.spec.options;
        let mut state = self.status.state();
        state.next_id += 1;
        let id = state.next_id;
        state.hold = Some(Hold {
            id,
            held,
            deadline: sent + (options.lease - options.margin()),
            next_beat: sent + options.heartbeat_period(),
            lost: false,
            failures: 0,
            taken: sent,
        });
        if !state.worker_started {
            let shared = Arc::clone(self);
            let spawned = thread::Builder::new()
                .name("pglock-heartbeat".to_owned())
                .spawn(move || shared.heartbeat_loop());
            match spawned {
                Ok(_) => state.worker_started = true,
                // Without a heartbeat the lease simply runs out at its deadline, which
                // the guard reports; try to start the thread again on the next hold.
                Err(e) => log::warn!("lease {}: no heartbeat thread: {e}", self.spec.key),
            }
        }
        id
    }

    /// Takes a slot within `limit`: the hold's id and slot, or `None` if still busy.
    pub(crate) fn lock(self: &Arc<Self>, limit: Limit) -> Result<Option<(u64, Held)>> {
        self.cancel.check()?;
        let start = Instant::now();
        let options = &self.spec.options;
        let mut backoff = Backoff::new(options.poll_min, options.poll_max);
        let mut rng = crate::wait::seed() | 1;
        let mut listening = false;
        let result = loop {
            let holder = match self.try_once(&mut rng) {
                Ok(Ok(hold)) => break Ok(Some(hold)),
                Ok(Err(holder)) => holder,
                Err(e) => break Err(e),
            };
            let waited = start.elapsed();
            // Sleep at most until the holder's lease runs out (the server's measure).
            let mut sleep = backoff.next_sleep();
            if let Some(h) = &holder {
                // (An expired lease still reported busy is being taken, or its row is
                // locked by a fenced transaction: back off as usual.)
                if !h.remaining.is_zero() {
                    sleep = sleep.min(h.remaining + Duration::from_millis(1));
                }
                log::debug!(
                    "lease {}: held by {:?} (token {}, slot {}) for {:?} more",
                    self.spec.key,
                    h.owner,
                    h.token,
                    h.slot,
                    h.remaining
                );
            }
            *self.busy_with() = holder;
            match limit {
                Limit::Try => break Ok(None),
                Limit::For(bound) if waited >= bound => {
                    break Ok(None);
                }
                Limit::For(bound) => sleep = sleep.min(bound - waited),
                Limit::Forever => {}
            }
            if options.notify && !listening {
                // Listen first, then try again: a release between the attempt above and
                // the LISTEN is not missed.
                if let Err(e) = self.with_conn(
                    None,
                    |c| c.batch_execute(&format!("LISTEN {}", sql::CHANNEL)),
                    "listen",
                ) {
                    break Err(e);
                }
                listening = true;
                continue;
            }
            let slept = if listening {
                self.wait_notification(sleep)
            } else {
                self.cancel.sleep(sleep)
            };
            if let Err(e) = slept {
                break Err(e);
            }
        };
        if listening {
            let unlisten = self.with_conn(
                None,
                |c| c.batch_execute(&format!("UNLISTEN {}", sql::CHANNEL)),
                "unlisten",
            );
            if let Err(e) = unlisten {
                // The connection is broken or in an unknown state: drop it, so a LISTEN
                // never goes back to the pool.
                log::warn!("lease {}: {e}", self.spec.key);
                *self.conn() = None;
            }
        }
        match &result {
            Ok(Some(_)) => crate::metrics::locked("lease", &self.spec.key, start.elapsed()),
            Ok(None) => crate::metrics::busy("lease", &self.spec.key),
            Err(Error::Cancelled { .. }) => crate::metrics::cancelled("lease", &self.spec.key),
            Err(_) => {}
        }
        if let Ok(Some((id, held))) = result {
            *self.busy_with() = None;
            if let Err(cancelled) = self.cancel.check() {
                crate::metrics::cancelled("lease", &self.spec.key);
                // Cancelled while the attempt that took it ran: give it back.
                if let Err(e) = self.unlock(id, held, false) {
                    log::warn!("lease {}: release after a cancel: {e}", self.spec.key);
                }
                return Err(cancelled);
            }
        }
        result
    }

    /// Waits up to `timeout` for a release of this lease to be notified, in slices so a
    /// cancel is seen promptly.
    fn wait_notification(&self, timeout: Duration) -> Result<()> {
        let until = Instant::now() + timeout;
        let mut slot = self.conn();
        let result = self.wait_notification_on(&mut slot, until);
        if result.is_err() && slot.as_ref().is_some_and(|c| c.is_closed()) {
            *slot = None;
        }
        result
    }

    fn wait_notification_on(
        &self,
        slot: &mut Option<PooledConnection<M>>,
        until: Instant,
    ) -> Result<()> {
        let client = self.connected(slot, None)?;
        loop {
            self.cancel.check()?;
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            let slice = (until - now).min(Duration::from_millis(50));
            let mut notifications = client.notifications();
            let next = notifications.timeout_iter(slice).next();
            match next {
                Ok(None) => {}
                Ok(Some(n)) if n.channel() == sql::CHANNEL && n.payload() == self.spec.payload => {
                    return Ok(())
                }
                Ok(Some(_)) => {}
                Err(source) => return Err(self.spec.db_error("wait for a release")(source)),
            }
        }
    }

    /// Who held the lease at the last failed attempt.
    pub(crate) fn busy_with(&self) -> MutexGuard<'_, Option<LeaseHolder>> {
        self.busy.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Renews `held`: the lease length it was renewed for, or `None` if the lease expired
    /// or changed hands. `timeout` bounds the wait for a connection (default: the pool's).
    pub(crate) fn renew(&self, held: Held, timeout: Option<Duration>) -> Result<Option<Duration>> {
        let spec = &self.spec;
        let rows = self.with_conn(
            timeout.map(|t| t.max(Duration::from_millis(1))),
            |c| {
                c.query_typed(
                    &spec.renew_sql,
                    &[
                        (&spec.name, Type::TEXT),
                        (&held.slot, Type::INT4),
                        (&held.token, Type::INT8),
                        (&held.nonce, Type::INT8),
                    ],
                )
            },
            "renew",
        )?;
        match rows.first() {
            Some(row) => {
                let lease_us: i64 = row.try_get(0).map_err(spec.db_error("renew"))?;
                Ok(Some(Duration::from_micros(lease_us.max(0) as u64)))
            }
            None => Ok(None),
        }
    }

    /// The heartbeat thread: renews the current hold when due, retries a failed renewal
    /// until the holder's deadline, and marks the hold lost when it cannot.
    fn heartbeat_loop(self: Arc<Self>) {
        let period = self.spec.options.heartbeat_period();
        let mut state = self.status.state();
        loop {
            if state.shutdown {
                return;
            }
            let now = Instant::now();
            let (id, held, deadline) = match state.hold.as_mut() {
                Some(hold) if !hold.lost => {
                    if now >= hold.deadline {
                        hold.lost = true;
                        self.status.changed.notify_all();
                        continue;
                    }
                    if now < hold.next_beat {
                        let wait = hold.next_beat - now;
                        state = self.wait(state, wait);
                        continue;
                    }
                    (hold.id, hold.held, hold.deadline)
                }
                _ => {
                    state = self.wait(state, period);
                    continue;
                }
            };
            drop(state);
            let sent = Instant::now();
            let result = self
                .renew(held, Some(deadline.saturating_duration_since(sent)))
                .map(|renewed| renewed.is_some());
            state = self.status.state();
            let Some(hold) = state.hold.as_mut().filter(|h| h.id == id) else {
                continue; // released meanwhile
            };
            match result {
                Ok(true) => {
                    let options = &self.spec.options;
                    hold.deadline = hold.deadline.max(sent + (options.lease - options.margin()));
                    hold.next_beat = sent + period;
                    hold.failures = 0;
                }
                Ok(false) => {
                    log::warn!(
                        "lease {}: lost: the server found it expired or taken over",
                        self.spec.key
                    );
                    hold.lost = true;
                    self.status.changed.notify_all();
                }
                Err(e) => {
                    hold.failures += 1;
                    let retry = (period / 4)
                        .min(Duration::from_millis(100 << hold.failures.min(6)))
                        .max(Duration::from_millis(1));
                    log::warn!(
                        "lease {}: heartbeat failed ({e}); retrying in {retry:?}, {:?} before \
                         the holder's deadline",
                        self.spec.key,
                        hold.deadline.saturating_duration_since(Instant::now())
                    );
                    hold.next_beat = Instant::now() + retry;
                }
            }
        }
    }

    fn wait<'s>(
        &'s self,
        state: MutexGuard<'s, State>,
        timeout: Duration,
    ) -> MutexGuard<'s, State> {
        self.status
            .beat
            .wait_timeout(state, timeout)
            .unwrap_or_else(PoisonError::into_inner)
            .0
    }

    /// Renews hold `id` now, on the calling thread (the heartbeat's statement).
    pub(crate) fn renew_now(&self, id: u64, held: Held) -> Result<()> {
        let remaining = self.status.remaining(id);
        if remaining.is_zero() {
            return Err(self.spec.lost(None));
        }
        let sent = Instant::now();
        let renewed = self.renew(held, Some(remaining))?.is_some();
        let mut state = self.status.state();
        let Some(hold) = state.hold.as_mut().filter(|h| h.id == id) else {
            return Err(self.spec.lost(None));
        };
        if !renewed {
            hold.lost = true;
            self.status.changed.notify_all();
            return Err(self.spec.lost(None));
        }
        let options = &self.spec.options;
        if !hold.lost {
            hold.deadline = hold.deadline.max(sent + (options.lease - options.margin()));
            hold.next_beat = sent + options.heartbeat_period();
        }
        Ok(())
    }

    /// Ends hold `id`: stops its heartbeats and releases (or deletes) its row.
    pub(crate) fn unlock(&self, id: u64, held: Held, delete: bool) -> Result<()> {
        let was_lost = {
            let mut state = self.status.state();
            let lost = match state.hold.take() {
                Some(hold) if hold.id == id => {
                    crate::metrics::released("lease", &self.spec.key, hold.taken.elapsed());
                    hold.lost || Instant::now() >= hold.deadline
                }
                other => {
                    state.hold = other;
                    true
                }
            };
            self.status.changed.notify_all();
            lost
        };
        let result = self.release(held, delete);
        if was_lost {
            // Lost before the release: that is what the caller must hear, whatever the
            // release did.
            return Err(self.spec.lost(None));
        }
        if result? == 0 {
            return Err(self.spec.lost(None));
        }
        Ok(())
    }

    /// Sends the release (or delete) of `held`, retried where that is safe: the number of
    /// rows released (0 if the lease had expired or changed hands).
    pub(crate) fn release(&self, held: Held, delete: bool) -> Result<usize> {
        let spec = &self.spec;
        let sql = if delete {
            &spec.delete_sql
        } else {
            &spec.unlock_sql
        };
        let run = |c: &mut Client| {
            let params: &[(&(dyn postgres::types::ToSql + Sync), Type)] = &[
                (&spec.name, Type::TEXT),
                (&held.slot, Type::INT4),
                (&held.token, Type::INT8),
                (&held.nonce, Type::INT8),
                (&spec.payload, Type::TEXT),
            ];
            let n = if spec.options.notify { 5 } else { 4 };
            c.query_typed(sql, &params[..n]).map(|rows| rows.len())
        };
        // Releasing is keyed by the token, so it is safe to send again: after a
        // serialization failure (a stricter default isolation level), or on a fresh
        // connection after a broken one. (A row lock held elsewhere for longer than the
        // statement's bounded wait is not retried: the lease then runs out by itself.)
        let mut result = self.with_conn(None, run, "unlock");
        for _ in 0..2 {
            match &result {
                Err(Error::Database { source, .. })
                    if source.as_db_error().is_none()
                        || Failure::of(source) == Failure::Closed
                        || matches!(source.code(), Some(&SqlState::T_R_SERIALIZATION_FAILURE)) =>
                {
                    let again = self.with_conn(None, run, "unlock");
                    result = match (again, result) {
                        (Ok(n), _) if n > 0 => Ok(n),
                        // If the retry found it gone, the first attempt's outcome is
                        // unknown, but nobody holds it with this token any more.
                        (_, first) => first,
                    };
                    if result.is_ok() {
                        break;
                    }
                }
                _ => break,
            }
        }
        log::debug!(
            "lease {}: unlocked slot {} (token {}): {result:?}",
            spec.key,
            held.slot,
            held.token
        );
        result
    }

    /// Checks, inside the caller's transaction, that `held` is still the lease's holder,
    /// and locks its row until that transaction ends.
    pub(crate) fn fence(
        &self,
        id: u64,
        held: Held,
        client: &mut impl postgres::GenericClient,
    ) -> Result<()> {
        if self.status.remaining(id).is_zero() {
            return Err(self.spec.lost(None));
        }
        let spec = &self.spec;
        let row = client
            .query_typed(
                &spec.fence_sql,
                &[
                    (&spec.name, Type::TEXT),
                    (&held.slot, Type::INT4),
                    (&held.token, Type::INT8),
                    (&held.nonce, Type::INT8),
                ],
            )
            .map_err(spec.db_error("fence"))?;
        if row.is_empty() {
            return Err(spec.lost(None));
        }
        Ok(())
    }

    /// The lease's rows (every slot).
    pub(crate) fn read(&self) -> Result<Vec<LeaseInfo>> {
        let spec = &self.spec;
        let rows = self.with_conn(
            None,
            |c| c.query_typed(&spec.read_sql, &[(&spec.name, Type::TEXT)]),
            "read",
        )?;
        rows.iter()
            .map(|row| {
                let lease_us: i64 = row.try_get(3)?;
                let remaining_us: i64 = row.try_get(9)?;
                Ok(LeaseInfo {
                    slot: row.try_get::<_, i32>(0)? as u32,
                    owner: row.try_get(1)?,
                    token: row.try_get(2)?,
                    lease: Duration::from_micros(lease_us.max(0) as u64),
                    acquired_at: row.try_get(4)?,
                    renewed_at: row.try_get(5)?,
                    expires_at: row.try_get(6)?,
                    data: row.try_get(7)?,
                    held: row.try_get(8)?,
                    remaining: Duration::from_micros(remaining_us.max(0) as u64),
                })
            })
            .collect::<std::result::Result<_, postgres::Error>>()
            .map_err(spec.db_error("read"))
    }

    /// Stops the heartbeat thread (the lock and all its guards are gone).
    pub(crate) fn shutdown(&self) {
        self.status.state().shutdown = true;
        self.status.beat.notify_all();
    }
}
