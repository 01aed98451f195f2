//! Cancelling a blocked wait from another thread.

use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use postgres::tls::MakeTlsConnect;
use postgres::{CancelToken, NoTls, Socket};

use crate::{Error, LockKey, Result};

/// Aborts the waits of one lock from another thread: a Ctrl-C handler, a supervisor, a
/// deadline of your own.
///
/// A cancelled wait fails with [`Error::Cancelled`], and the lock holds nothing afterwards.
/// Cancellation is sticky: once [`cancel`](CancelHandle::cancel) was called, every later
/// attempt to take the lock (blocking or not) fails with `Cancelled` at once; make a new
/// lock to try again. A guard already handed out is not affected: cancelling stops
/// waiting, not holding.
///
/// A wait on the server is aborted with PostgreSQL's cancel request, sent on a new
/// connection. The server may grant the lock just as the cancel arrives, and a cancel
/// request can land on a later statement; so after a cancel request pglock ends that
/// database session (the server frees anything it held, and the pool replaces the
/// connection) instead of trusting the connection again. A wait in
/// [`WaitMode::Poll`](crate::WaitMode::Poll) wakes from its sleep at once and
/// needs no cancel request.
///
/// The handle is cheap to clone and is `Send + Sync`.
///
/// # Examples
///
/// ```no_run
/// use std::thread;
/// use pglock::SessionLock;
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let pool: r2d2::Pool<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>> = todo!();
/// let mut lock = SessionLock::new(&pool, "nightly-report")?;
/// let cancel = lock.cancel_handle();
/// let supervisor = thread::spawn(move || {
///     // ... when it is time to give up:
///     cancel.cancel()
/// });
/// match lock.lock() {
///     Ok(_guard) => println!("locked"),
///     Err(pglock::Error::Cancelled { .. }) => println!("gave up"),
///     Err(e) => return Err(e.into()),
/// }
/// supervisor.join().expect("supervisor panicked")?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct CancelHandle {
    state: Arc<CancelState>,
}

impl fmt::Debug for CancelHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CancelHandle")
            .field("key", &self.state.key)
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

impl CancelHandle {
    /// Cancels the current wait of the lock, if any, and every later one.
    ///
    /// Returns once the cancel request was sent, if one was needed; the waiting thread
    /// then returns [`Error::Cancelled`] as soon as the server acts on it. The cancel
    /// request goes unencrypted (as libpq sent it before PostgreSQL 17); for a server that
    /// requires TLS (`sslmode=require`), use [`cancel_with`](CancelHandle::cancel_with).
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the cancel request could not be sent (the server is
    /// unreachable, or requires TLS). The lock is marked cancelled all the same, so its
    /// next attempt fails at once; the current wait goes on until the lock is granted or
    /// its bound passes, and then the lock is released and the wait fails with
    /// [`Error::Cancelled`].
    pub fn cancel(&self) -> Result<()> {
        self.cancel_with(NoTls)
    }

    /// [`cancel`](CancelHandle::cancel), with the cancel request sent through `tls`, the
    /// same kind of connector the pool's connections use.
    ///
    /// # Errors
    ///
    /// As for [`cancel`](CancelHandle::cancel).
    pub fn cancel_with<T>(&self, tls: T) -> Result<()>
    where
        T: MakeTlsConnect<Socket>,
    {
        let mut flags = self.state.flags();
        flags.cancelled = true;
        self.state.wake.notify_all();
        if !flags.waiting_on_server || flags.request_sent {
            return Ok(());
        }
        // Hold the flags while sending, so the waiter cannot finish its wait and go on
        // to other statements before it knows a cancel request is on its way.
        let Some(token) = self.state.token() else {
            // The lock has no connection to cancel: the wait cannot be on the server.
            return Ok(());
        };
        flags.request_sent = true;
        token
            .cancel_query(tls)
            .map_err(|source| Error::Database {
                key: self.state.key.clone(),
                operation: "cancel",
                source,
            })
            .inspect_err(|_| flags.request_sent = false)
    }

    /// Whether [`cancel`](CancelHandle::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.state.flags().cancelled
    }
}

/// What the waiter and the cancelling threads share.
pub(crate) struct CancelState {
    key: LockKey,
    /// The token of the lock's current connection; replaced when the lock reconnects.
    token: Mutex<Option<CancelToken>>,
    flags: Mutex<Flags>,
    /// Wakes a waiter sleeping between polls.
    wake: Condvar,
}

impl fmt::Debug for CancelState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CancelState")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Flags {
    cancelled: bool,
    waiting_on_server: bool,
    request_sent: bool,
}

/// How a wait on the server ended, as far as cancellation goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitEnd {
    /// No cancel during the wait.
    Normal,
    /// Cancelled during the wait, but no cancel request reached the server.
    CancelledQuietly,
    /// A cancel request was sent to this session during the wait.
    CancelRequestSent,
}

impl CancelState {
    pub(crate) fn new(key: LockKey, token: Option<CancelToken>) -> Arc<Self> {
        Arc::new(CancelState {
            key,
            token: Mutex::new(token),
            flags: Mutex::new(Flags::default()),
            wake: Condvar::new(),
        })
    }

    pub(crate) fn handle(self: &Arc<Self>) -> CancelHandle {
        CancelHandle {
            state: Arc::clone(self),
        }
    }

    /// The lock now runs on another connection.
    pub(crate) fn set_token(&self, token: CancelToken) {
        *self.token.lock().unwrap_or_else(PoisonError::into_inner) = Some(token);
    }

    fn token(&self) -> Option<CancelToken> {
        self.token
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn flags(&self) -> MutexGuard<'_, Flags> {
        // Nothing panics while holding the lock, but never let poisoning become a panic.
        self.flags.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn cancelled_error(&self) -> Error {
        Error::Cancelled {
            key: self.key.clone(),
        }
    }

    /// Fails if the lock was cancelled.
    pub(crate) fn check(&self) -> Result<()> {
        if self.flags().cancelled {
            return Err(self.cancelled_error());
        }
        Ok(())
    }

    /// Marks the start of a wait on the server; fails if already cancelled.
    pub(crate) fn begin_server_wait(&self) -> Result<()> {
        let mut flags = self.flags();
        if flags.cancelled {
            return Err(self.cancelled_error());
        }
        flags.waiting_on_server = true;
        Ok(())
    }

    /// Marks the end of a wait on the server. Blocks while a cancel request is being sent.
    pub(crate) fn end_server_wait(&self) -> WaitEnd {
        let mut flags = self.flags();
        flags.waiting_on_server = false;
        match (flags.cancelled, flags.request_sent) {
            (false, _) => WaitEnd::Normal,
            (true, false) => WaitEnd::CancelledQuietly,
            (true, true) => WaitEnd::CancelRequestSent,
        }
    }

    /// Sleeps for `duration` unless cancelled first; fails if cancelled.
    pub(crate) fn sleep(&self, duration: Duration) -> Result<()> {
        let flags = self.flags();
        let (flags, _) = self
            .wake
            .wait_timeout_while(flags, duration, |f| !f.cancelled)
            .unwrap_or_else(PoisonError::into_inner);
        if flags.cancelled {
            return Err(self.cancelled_error());
        }
        Ok(())
    }
}
