//! How pglock fails: the exit codes, the [`Fail`] that carries one with its message, and
//! the descriptions of the library's and the driver's errors. Everything else builds on
//! this module; it imports none of pglock's own.

use pglock::postgres::error::SqlState;
use pglock::Error;

/// sysexits' EX_USAGE: the command line, a name, the connection settings, or the lease
/// table's absence.
pub(crate) const EX_USAGE: u8 = 64;
/// sysexits' EX_UNAVAILABLE: the database cannot be reached (or refused for a lock).
pub(crate) const EX_UNAVAILABLE: u8 = 69;
/// sysexits' EX_SOFTWARE: any other failure of pglock itself.
pub(crate) const EX_SOFTWARE: u8 = 70;
/// The lock was lost while the command ran; the command was terminated.
pub(crate) const EX_LOCK_LOST: u8 = 75;
/// `pglock lease heartbeat|release`: the token does not hold the lease any more.
pub(crate) const EX_STALE_TOKEN: u8 = 76;

/// A failure that ends pglock with `code`, after printing `msg` (once, by `main`).
#[derive(Debug)]
pub(crate) struct Fail {
    pub(crate) code: u8,
    pub(crate) msg: String,
}

impl Fail {
    pub(crate) fn usage(msg: impl Into<String>) -> Fail {
        Fail {
            code: EX_USAGE,
            msg: msg.into(),
        }
    }

    pub(crate) fn unavailable(msg: impl Into<String>) -> Fail {
        Fail {
            code: EX_UNAVAILABLE,
            msg: msg.into(),
        }
    }

    pub(crate) fn internal(msg: impl Into<String>) -> Fail {
        Fail {
            code: EX_SOFTWARE,
            msg: msg.into(),
        }
    }
}

/// The message and SQLSTATE of a `postgres::Error` (its `Display` may say only "db
/// error"). Its sources (an I/O error, a TLS error) follow after colons, each once.
pub(crate) fn describe_pg(e: &pglock::postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        ),
        None => {
            let mut out = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                let text = s.to_string();
                if !out.contains(&text) {
                    out += &format!(": {text}");
                }
                source = s.source();
            }
            out
        }
    }
}

/// A `pglock::Error` with its sources, which carry the server's message: each said once
/// (a `postgres::Error`'s own sources are [`describe_pg`]'s to tell).
pub(crate) fn describe_lock_error(e: &Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(pg) = s.downcast_ref::<pglock::postgres::Error>() {
            let mut text = describe_pg(pg);
            // The library's message may carry the SQLSTATE already.
            if let Some(code) = pg.code().map(|c| format!(" (SQLSTATE {})", c.code())) {
                if out.contains(&code) {
                    text = text.replace(&code, "");
                }
            }
            out += &format!(": {text}");
            break;
        }
        let text = s.to_string();
        if !out.contains(&text) {
            out += &format!(": {text}");
        }
        source = s.source();
    }
    out
}

/// What the command says for the library's error, with the exit code it documents: a
/// missing lease table is a usage error (64) that says how to create it, a pool that
/// could not connect is "unavailable" (69), a bad argument a usage error (64).
pub(crate) fn lock_fail(e: Error) -> Fail {
    if e.code() == Some(&SqlState::UNDEFINED_TABLE) {
        return Fail::usage(format!(
            "{}; the lease table does not exist: create it once by adding --create-table \
             (with the same --table, if any), or with the SQL of \
             pglock::LeaseTable::create_sql() in your migrations",
            describe_lock_error(&e)
        ));
    }
    let msg = describe_lock_error(&e);
    match e {
        Error::Pool { .. } => Fail::unavailable(msg),
        Error::InvalidArgument { .. } => Fail::usage(msg),
        _ => Fail::internal(msg),
    }
}

/// A lock name from the command line: not empty (an unset shell variable, most likely).
/// A NUL cannot reach us through `argv`; the library refuses one anyway.
pub(crate) fn check_name(name: &str) -> Result<(), Fail> {
    if name.is_empty() {
        return Err(Fail::usage(
            "the lock name is empty (an unset shell variable?); give a non-empty NAME",
        ));
    }
    if name.contains('\0') {
        return Err(Fail::usage("the lock name contains a NUL character"));
    }
    Ok(())
}
