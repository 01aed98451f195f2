//! `pglock`: distributed locks on PostgreSQL advisory locks, from the shell.
//!
//! `pglock run NAME -- COMMAND...` runs a command while holding a session advisory lock
//! (or a lease, `--lease`, or one of N slots, `--slots`); `pglock key NAME` prints the key;
//! `pglock status [NAME]` shows holders and waiters; `pglock lease acquire|heartbeat|
//! release|get NAME` holds a lease across separate steps of a pipeline.
//! Built only with the `cli` feature. Linux only (the child's parent-death signal).
#![forbid(unsafe_code)]
#![warn(rust_2018_idioms)]

mod args;
mod conn;
mod exec;
mod lease;
mod run;
mod show;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;

use crate::args::{Cli, Command};

/// sysexits' EX_USAGE: the command line (or a name, or a connection string) is wrong.
pub(crate) const EX_USAGE: u8 = 64;
/// sysexits' EX_UNAVAILABLE: the database cannot be reached.
pub(crate) const EX_UNAVAILABLE: u8 = 69;
/// sysexits' EX_SOFTWARE: any other failure of pglock itself.
pub(crate) const EX_SOFTWARE: u8 = 70;
/// The lock was lost while the command ran; the command was terminated.
pub(crate) const EX_LOCK_LOST: u8 = 75;
/// `pglock lease heartbeat|release`: the token does not hold the lease any more.
pub(crate) const EX_STALE_TOKEN: u8 = 76;

/// A failure that ends pglock with `code`, after printing `msg`.
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

/// The message and SQLSTATE of a `postgres::Error` (its `Display` may say only "db error").
/// Its sources (an I/O error, a parse error) follow after colons.
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
                if !out.ends_with(&text) {
                    out += &format!(": {text}");
                }
                source = s.source();
            }
            out
        }
    }
}

/// A `pglock::Error` with its sources, which carry the server's message.
pub(crate) fn describe_lock_error(e: &pglock::Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        match s.downcast_ref::<pglock::postgres::Error>() {
            Some(pg) => out += &format!(": {}", describe_pg(pg)),
            None => out += &format!(": {s}"),
        }
        source = s.source();
    }
    out
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

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    // The trampoline through which `run` starts its child (hidden, see exec.rs).
    if argv.get(1).is_some_and(|a| a == exec::SUBCOMMAND) {
        exec::trampoline(&argv[2..]);
    }
    let cli = match Cli::try_parse_from(&argv) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EX_USAGE } else { 0 });
        }
    };
    let result = match cli.command {
        Command::Run(args) => args.resolved().and_then(|args| run::run(&cli.conn, args)),
        Command::Key { name, slots } => show::key(&name, slots, &cli.conn),
        Command::Lease(command) => lease::command(&cli.conn, command),
        Command::Status { name, json } => show::status(&cli.conn, name.as_deref(), json),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(fail) => {
            eprintln!("pglock: {}", fail.msg);
            if fail.code == EX_USAGE {
                eprintln!("Try 'pglock --help' for more information.");
            }
            ExitCode::from(fail.code)
        }
    }
}
