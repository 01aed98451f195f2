//! What a session lock and a transaction lock differ in: a sealed marker type, as
//! `lock_api` builds `Mutex<R, T>` over `RawMutex`.

pub(crate) mod sealed {
    /// Which kind of advisory lock. Public in a private module: nameable only here.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Kind {
        Session,
        Transaction,
    }

    pub trait Sealed {
        const KIND: Kind;
    }
}

/// The scope of an advisory lock: [`Session`] or [`Transaction`]. Sealed: the two are all
/// there is.
pub trait Scope: sealed::Sealed + Send + Sync + 'static {}

/// Session scope (`pg_advisory_lock`): held until unlocked or until the session ends.
/// See [`SessionLock`](crate::SessionLock).
#[derive(Debug)]
pub enum Session {}

/// Transaction scope (`pg_advisory_xact_lock`): held until the transaction ends. See
/// [`TxLock`](crate::TxLock).
#[derive(Debug)]
pub enum Transaction {}

impl sealed::Sealed for Session {
    const KIND: sealed::Kind = sealed::Kind::Session;
}

impl sealed::Sealed for Transaction {
    const KIND: sealed::Kind = sealed::Kind::Transaction;
}

impl Scope for Session {}
impl Scope for Transaction {}
