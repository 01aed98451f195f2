//! One acquire path for every lock kind the command takes: a session advisory lock, an
//! advisory semaphore's permit ([`AdvisorySemaphore`]), a lease, a lease semaphore's
//! slot. Each kind says how to take it within a bound ([`Lockable`]); [`acquire`] makes
//! the first try, says who is in the way, waits what the options allow (cancellable by a
//! signal), and reports a conflict, the same way for all of them.

use std::time::{Duration, Instant};

use pglock::{
    AdvisorySemaphore, CancelHandle, LeaseGuard, LeaseLock, LeaseSemaphore, LockKey,
    SemaphorePermit, SessionGuard, SessionLock,
};

use postgres_openssl::MakeTlsConnector;

use crate::child::{state, ChildState, Shared};
use crate::conn::FirstThenConnect;
use crate::fail::{lock_fail, Fail};
use crate::format;

type M = FirstThenConnect;

/// A lock of some kind, not held yet.
pub(crate) trait Lockable {
    /// What holds it.
    type Held<'a>
    where
        Self: 'a;

    /// Takes it if it is (or becomes) free within `wait`: a zero `wait` makes one try,
    /// `None` waits without a bound. `None` when it stayed busy.
    fn take(&mut self, wait: Option<Duration>) -> pglock::Result<Option<Self::Held<'_>>>;

    /// Cancels a wait in [`take`](Lockable::take) from the signal thread.
    fn cancel_handle(&self) -> CancelHandle;
}

/// Every kind has the same calls (`try_lock_for`, `lock`, `cancel_handle`).
macro_rules! lockable {
    ($($lock:ident => $held:ident),* $(,)?) => {$(
        impl Lockable for $lock<M> {
            type Held<'a> = $held<'a, M>;

            fn take(&mut self, wait: Option<Duration>) -> pglock::Result<Option<$held<'_, M>>> {
                match wait {
                    Some(wait) => self.try_lock_for(wait),
                    None => self.lock().map(Some),
                }
            }

            fn cancel_handle(&self) -> CancelHandle {
                $lock::cancel_handle(self)
            }
        }
    )*};
}

lockable!(
    SessionLock => SessionGuard,
    AdvisorySemaphore => SemaphorePermit,
    LeaseLock => LeaseGuard,
    LeaseSemaphore => LeaseGuard,
);

/// What `run` holds a lock with, whatever its kind: it watches it while the command
/// runs, and releases it after.
pub(crate) trait Watched {
    /// `lock "x" (key 1)`, `"x" slot 2 (key 3,2)`, `lease "x" (token 7)`.
    fn describe(&self, name: &str) -> String;
    /// `PGLOCK_KEY`, `PGLOCK_TOKEN`, `PGLOCK_SLOT`: what the command is told.
    fn env(&self) -> Vec<(&'static str, String)>;
    /// `lock` or `lease`: what is lost.
    fn noun(&self) -> &'static str {
        "lock"
    }
    /// Blocks at most `tick`; once the lock is known lost, why ("the lock ...: its
    /// session ended (...)").
    fn lost(&mut self, tick: Duration) -> Option<String>;
    /// Releases it: the same as dropping it, but reports the error.
    fn unlock(self) -> pglock::Result<()>
    where
        Self: Sized;
    /// Lets go of it after a loss: dropped, by default.
    fn abandon(self)
    where
        Self: Sized,
    {
    }
}

/// How long to wait, and what to say about it.
pub(crate) struct Wanted<'a> {
    /// `lock "x" (key 1)`, `all 2 slots of "x"`, `lease "x"`: what is busy.
    pub(crate) what: String,
    /// `what` is several things (`are busy`).
    pub(crate) plural: bool,
    /// The bound on the whole wait (zero: one try); `None`: no bound.
    pub(crate) limit: Option<Duration>,
    /// Whether a conflict says how long it waited (not after a single try).
    pub(crate) say_waited: bool,
    /// Nothing said on a conflict.
    pub(crate) quiet: bool,
    /// Say who is in the way before waiting.
    pub(crate) verbose: bool,
    /// "held by ...", asked for only when something is said.
    pub(crate) holders: &'a dyn Fn() -> String,
    /// The connector of the lock's connections, for a cancel request.
    pub(crate) tls: MakeTlsConnector,
}

impl Wanted<'_> {
    fn busy(&self, start: Instant) {
        if self.quiet {
            return;
        }
        let waited = if self.say_waited {
            format!(" after waiting {}", format::secs(start.elapsed()))
        } else {
            String::new()
        };
        let verb = if self.plural { "are" } else { "is" };
        eprintln!(
            "pglock: {} {verb} busy{waited}, {}",
            self.what,
            (self.holders)()
        );
    }
}

/// Takes `lock` as `wanted` says and runs `then` with what holds it: `None` when it
/// stayed busy (said, unless quiet). While it waits, a signal cancels the wait (the
/// signal thread ends pglock then).
pub(crate) fn acquire<L: Lockable, R>(
    lock: &mut L,
    wanted: &Wanted<'_>,
    start: Instant,
    shared: &Shared,
    then: impl FnOnce(L::Held<'_>) -> Result<R, Fail>,
) -> Result<Option<R>, Fail> {
    // One try first: the common case, and the moment to say who is in the way.
    if let Some(held) = lock.take(Some(Duration::ZERO)).map_err(lock_fail)? {
        return then(held).map(Some);
    }
    let rest = wanted
        .limit
        .map(|limit| limit.saturating_sub(start.elapsed()));
    if rest == Some(Duration::ZERO) {
        wanted.busy(start);
        return Ok(None);
    }
    if wanted.verbose {
        let bound = rest.map_or(String::new(), |r| format!(" at most {}", format::secs(r)));
        let verb = if wanted.plural { "are" } else { "is" };
        eprintln!(
            "pglock: {} {verb} busy, {}; waiting{bound}",
            wanted.what,
            (wanted.holders)()
        );
    }
    let (handle, tls) = (lock.cancel_handle(), wanted.tls.clone());
    *state(shared) = ChildState::Waiting(Some(Box::new(move || {
        let _ = handle.cancel_with(tls.clone());
    })));
    let taken = lock.take(rest).map_err(lock_fail)?;
    match taken {
        Some(held) => then(held).map(Some),
        None => {
            wanted.busy(start);
            Ok(None)
        }
    }
}

/// The advisory key of slot `slot` of the semaphore `name` (`--slots` without
/// `--lease`): the pair `(K, slot)`, `K` being the upper 32 bits of the name's 64-bit
/// key, as [`AdvisorySemaphore::slot_key`] makes it (without a connection).
pub(crate) fn slot_key(name: &str, slot: u32) -> LockKey {
    let key = LockKey::from_name(name).as_i64().unwrap_or_default();
    LockKey::pair((key >> 32) as i32, slot as i32)
}
