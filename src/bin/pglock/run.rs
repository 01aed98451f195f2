//! `pglock run`: lock, run the command as a child, watch both, release.
//!
//! Three things can happen while the command runs, and the main thread waits for all of
//! them at once without sending a single query ([`Watched::lost`]): for an advisory lock
//! it blocks reading the lock's connection (`notifications().timeout_iter`, which only
//! reads the socket) for at most [`TICK`], for a lease on the guard's watch; and it
//! checks the child in between.
//!
//! - The command exits: pglock unlocks and exits with the command's code (or 128+N).
//! - The lock is lost (`pg_terminate_backend`, a server restart, a dropped connection,
//!   a lease that could not be renewed): pglock sends the command SIGTERM, SIGKILL after
//!   `--grace`, and exits with 75.
//! - A signal arrives: a thread of its own forwards it to the command's process group.
//!
//! The command runs in a process group of its own, led by pglock's supervisor (see
//! exec.rs and child.rs): every signal goes to the whole group, and whatever is left of
//! the group when the command exits is killed before the unlock.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pglock::postgres::fallible_iterator::FallibleIterator;
use pglock::postgres::Client;
use pglock::{
    AdvisorySemaphore, Error, LeaseLock, LeaseSemaphore, LockKey, LockMode, LockOptions,
    SemaphorePermit, SessionGuard, SessionLock, WaitMode,
};
use postgres_openssl::MakeTlsConnector;

use crate::acquire::{acquire, Wanted, Watched};
use crate::args::{Conn, RunArgs};
use crate::child::{
    describe_status, exit_code, forward_signals, reap, terminate, ChildState, Shared, Supervised,
};
use crate::conn::{Pool, Session, Target};
use crate::exec;
use crate::fail::{check_name, describe_lock_error, lock_fail, Fail, EX_LOCK_LOST};
use crate::format::{self, json_string};
use crate::lease;

/// The longest the main thread blocks on the connection before it looks at the child:
/// the bound on the time from the command's exit to the unlock. Lock loss wakes it at
/// once, whatever this is.
const TICK: Duration = Duration::from_millis(20);

/// `--grace` without `--lease`.
const DEFAULT_GRACE: Duration = Duration::from_secs(10);

pub(crate) fn run(conn: &Conn, args: RunArgs) -> Result<u8, Fail> {
    check_name(&args.name)?;
    if args.command.is_empty() && args.shell.is_none() {
        return Err(Fail::usage(
            "no command: give `-- COMMAND [ARGS...]` or `-c 'SHELL COMMAND'`",
        ));
    }
    // Everything about the options is checked before connecting.
    let lease = match args.lease {
        Some(lease) => Some(lease::plan(&args, lease)?),
        None => None,
    };
    let grace = match &lease {
        Some(plan) => plan.grace,
        None => args.grace.unwrap_or(DEFAULT_GRACE),
    };
    let target = Target::from_env(conn)?;
    let shared: Shared = Arc::new(Mutex::new(ChildState::Waiting(None)));
    // Before the wait: a signal during it ends pglock with 128+N.
    forward_signals(&shared)?;
    let app = format::application_name(&args.name, &format::hostname(), std::process::id());
    // A lease works through a transaction-mode pooler: no session settings then. An
    // advisory lock needs a primary, and no pooler in between.
    let session = match lease {
        Some(_) => Session::Lease,
        None => Session::Advisory {
            // Slot keys are numbers: no name is hashed by the server.
            name: args.slots.is_none().then_some(args.name.as_str()),
            direct: args.direct,
        },
    };
    let pool = target.connect(&app, session)?;
    let start = Instant::now();
    let run = Run {
        args: &args,
        tls: target.connector(),
        grace,
        shared: &shared,
        start,
    };
    let held = run.take(&target, &pool, lease.as_ref())?;
    Ok(held.unwrap_or(args.conflict_exit_code))
}

/// The lock options of an advisory lock or semaphore: the mode, and how to wait.
fn advisory_options(args: &RunArgs) -> LockOptions {
    let mode = if args.shared {
        LockMode::Shared
    } else {
        LockMode::Exclusive
    };
    let wait_mode = if args.poll {
        WaitMode::poll()
    } else {
        WaitMode::Server
    };
    LockOptions::new().mode(mode).wait_mode(wait_mode)
}

/// "held by pid 123 (...)" for each of `keys` (with its slot), from `pg_locks` and
/// `pg_stat_activity`, read on a connection of its own: the lock's is busy waiting.
fn who_holds(target: &Target, keys: &[(LockKey, Option<u32>)]) -> String {
    let rows = target
        .connect("pglock run (holders)", Session::Inspect)
        .and_then(|pool| pool.get().map_err(|e| Fail::unavailable(e.to_string())))
        .and_then(|mut conn| {
            pglock::inspect::holders(&mut *conn, None)
                .map_err(|e| Fail::internal(crate::fail::describe_pg(&e)))
        });
    let (it, them) = if keys.len() == 1 {
        ("it", "it has")
    } else {
        ("they", "they have")
    };
    let rows = match rows {
        Ok(rows) => rows,
        Err(e) => return format!("and {it} could not be listed: {}", e.msg),
    };
    let held: Vec<String> = keys
        .iter()
        .flat_map(|(key, slot)| {
            rows.iter()
                .filter(move |h| h.granted && h.key == *key)
                .map(move |h| match slot {
                    Some(slot) => format!("slot {slot}: {}", format::holder_summary(h)),
                    None => format::holder_summary(h),
                })
        })
        .collect();
    if held.is_empty() {
        format!("but {them} no holder any more")
    } else {
        format!("held by {}", held.join("; "))
    }
}

/// Why the session of `key`'s advisory lock is gone, if it is: reads the connection for
/// at most `tick` (the server's FATAL message or a closed socket wakes it at once).
fn session_lost(client: &mut Client, key: &LockKey, tick: Duration) -> Option<String> {
    let read = client.notifications().timeout_iter(tick).next().map(|_| ());
    let why = match read {
        Ok(()) if !client.is_closed() => return None,
        Ok(()) => "the connection was closed".to_owned(),
        Err(e) => crate::fail::describe_pg(&e),
    };
    Some(format!("the lock {key}: its session ended ({why})"))
}

impl Watched for SessionGuard<'_, crate::conn::FirstThenConnect> {
    fn describe(&self, _name: &str) -> String {
        SessionGuard::key(self).to_string()
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![("PGLOCK_KEY", format::key_value(SessionGuard::key(self)))]
    }

    fn lost(&mut self, tick: Duration) -> Option<String> {
        let key = SessionGuard::key(self).clone();
        session_lost(self, &key, tick)
    }

    fn unlock(self) -> pglock::Result<()> {
        SessionGuard::unlock(self)
    }
}

impl Watched for SemaphorePermit<'_, crate::conn::FirstThenConnect> {
    fn describe(&self, name: &str) -> String {
        format!(
            "{} slot {} (key {})",
            json_string(name),
            SemaphorePermit::slot(self),
            format::key_value(&SemaphorePermit::slot_key(self))
        )
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "PGLOCK_KEY",
                format::key_value(&SemaphorePermit::slot_key(self)),
            ),
            ("PGLOCK_SLOT", SemaphorePermit::slot(self).to_string()),
        ]
    }

    fn lost(&mut self, tick: Duration) -> Option<String> {
        let key = SemaphorePermit::slot_key(self);
        session_lost(self, &key, tick)
    }

    fn unlock(self) -> pglock::Result<()> {
        SemaphorePermit::unlock(self)
    }
}

/// One run: its options, and the state the signal thread shares.
struct Run<'a> {
    args: &'a RunArgs,
    tls: MakeTlsConnector,
    grace: Duration,
    shared: &'a Shared,
    start: Instant,
}

impl Run<'_> {
    /// Takes the lock of the kind the options say (on `pool`; who is in the way is read
    /// through `target`), runs the command under it: pglock's exit code, or `None` when
    /// the lock stayed busy.
    fn take(
        &self,
        target: &Target,
        pool: &Pool,
        lease: Option<&lease::Plan>,
    ) -> Result<Option<u8>, Fail> {
        let args = self.args;
        let name = args.name.as_str();
        match (lease, args.slots) {
            (None, None) => {
                let key = LockKey::from_name(name);
                let holders = || who_holds(target, &[(key.clone(), None)]);
                let wanted = self.wanted(key.to_string(), false, &holders);
                let mut lock = SessionLock::with_options(pool, key.clone(), advisory_options(args))
                    .map_err(lock_fail)?;
                acquire(&mut lock, &wanted, self.start, self.shared, |g| {
                    self.supervise(g)
                })
            }
            (None, Some(n)) => {
                let slots: Vec<_> = (0..n)
                    .map(|i| (crate::acquire::slot_key(name, i), Some(i)))
                    .collect();
                let holders = || who_holds(target, &slots);
                let what = format!("all {n} slots of {}", json_string(name));
                let wanted = self.wanted(what, true, &holders);
                let mut sem =
                    AdvisorySemaphore::with_options(pool, name, n, advisory_options(args))
                        .map_err(lock_fail)?;
                acquire(&mut sem, &wanted, self.start, self.shared, |p| {
                    self.supervise(p)
                })
            }
            (Some(plan), None) => {
                lease::create_table_if_asked(pool, &plan.table, args.create_table)?;
                let holders = || lease::holders(target, &plan.table, name, None);
                let what = format!("lease {}", json_string(name));
                let wanted = self.wanted(what, false, &holders);
                let mut lock = LeaseLock::with_options(pool, name, lease::options(plan, args))
                    .map_err(lock_fail)?;
                acquire(&mut lock, &wanted, self.start, self.shared, |guard| {
                    self.supervise(lease::Held::new(guard, false))
                })
            }
            (Some(plan), Some(n)) => {
                lease::create_table_if_asked(pool, &plan.table, args.create_table)?;
                let holders = || lease::holders(target, &plan.table, name, Some(n));
                let what = format!("all {n} slots of lease {}", json_string(name));
                let wanted = self.wanted(what, true, &holders);
                let options = lease::options(plan, args);
                let mut sem =
                    LeaseSemaphore::with_options(pool, name, n, options).map_err(lock_fail)?;
                acquire(&mut sem, &wanted, self.start, self.shared, |guard| {
                    self.supervise(lease::Held::new(guard, true))
                })
            }
        }
    }

    /// How long to wait for `what`, and what to say about it.
    fn wanted<'h>(
        &self,
        what: String,
        plural: bool,
        holders: &'h dyn Fn() -> String,
    ) -> Wanted<'h> {
        let args = self.args;
        Wanted {
            what,
            plural,
            limit: if args.nonblock {
                Some(Duration::ZERO)
            } else {
                args.wait
            },
            say_waited: !(args.nonblock || args.wait == Some(Duration::ZERO)),
            quiet: args.quiet,
            verbose: args.verbose,
            holders,
            tls: self.tls.clone(),
        }
    }

    /// Runs the command while `held` holds the lock, and watches both. Returns pglock's
    /// exit code.
    fn supervise(&self, mut held: impl Watched) -> Result<u8, Fail> {
        let args = self.args;
        let what = held.describe(&args.name);
        if args.verbose {
            eprintln!(
                "pglock: locked {what} after waiting {}",
                format::secs(self.start.elapsed())
            );
        }
        let held_since = Instant::now();
        let mut command = self.command(&held);
        let mut child = Supervised::start(&mut command, self.shared)?;
        let lost = loop {
            if let Some(status) = reap(&mut child, self.shared)? {
                let code = finish(status, held.unlock());
                if args.verbose {
                    eprintln!(
                        "pglock: released {what} after holding it {}",
                        format::secs(held_since.elapsed())
                    );
                }
                return Ok(code);
            }
            if let Some(why) = held.lost(TICK) {
                break why;
            }
        };
        let pid = child.child.id();
        let lost_at = Instant::now();
        eprintln!(
            "pglock: lost {lost}; sending SIGTERM to the command's process group ({pid}), \
             SIGKILL after {}",
            format::secs(self.grace)
        );
        let status = terminate(&mut child, self.shared, self.grace)?;
        eprintln!(
            "pglock: the command ended ({}) {} after losing the {}",
            describe_status(status),
            format::secs(lost_at.elapsed()),
            held.noun()
        );
        held.abandon();
        Ok(EX_LOCK_LOST)
    }

    /// The supervisor's command line (see exec.rs), and the command's environment.
    fn command(&self, held: &impl Watched) -> Command {
        let args = self.args;
        let mut command = Command::new(exec::SELF_EXE);
        command
            .arg0("pglock")
            .args(exec::prefix(std::process::id()));
        match &args.shell {
            Some(shell) => command.args([OsString::from("/bin/sh"), "-c".into(), shell.clone()]),
            None => command.args(&args.command),
        };
        // Inherited from an outer pglock, they would describe its lock, not this one.
        command
            .env_remove("PGLOCK_KEY")
            .env_remove("PGLOCK_TOKEN")
            .env_remove("PGLOCK_SLOT")
            .env("PGLOCK_NAME", &args.name)
            .env("PGLOCK_HELD", "1")
            .envs(held.env());
        command
    }
}

/// pglock's exit code once the command exited by itself: its own, unless the release
/// found the lock lost.
fn finish(status: ExitStatus, unlocked: Result<(), Error>) -> u8 {
    match unlocked {
        Ok(()) => exit_code(status),
        Err(e @ Error::LockLost { .. }) => {
            eprintln!(
                "pglock: the command finished ({}), but {}",
                describe_status(status),
                describe_lock_error(&e)
            );
            EX_LOCK_LOST
        }
        Err(e) => {
            // The session was ended to free the lock, or the release of a lease could
            // not be sent (it then expires by itself); the command ran under the lock.
            eprintln!("pglock: warning: {}", describe_lock_error(&e));
            exit_code(status)
        }
    }
}
