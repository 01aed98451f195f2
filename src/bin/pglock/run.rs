//! `pglock run`: lock, run the command as a child, watch both, release.
//!
//! Three things can happen while the command runs, and the main thread waits for all of
//! them at once without sending a single query: it blocks reading the lock's connection
//! (`notifications().timeout_iter`, which only reads the socket) for at most [`TICK`],
//! and checks the child in between.
//!
//! - The command exits: pglock unlocks and exits with the command's code (or 128+N).
//! - The lock's session ends (`pg_terminate_backend`, a server restart, a dropped
//!   connection): the server's FATAL message or the closed socket wakes the read at once.
//!   pglock sends the command SIGTERM, SIGKILL after `--grace`, and exits with 75.
//! - A signal arrives: a thread of its own forwards it to the command's process group.
//!
//! The command runs in a process group of its own, led by pglock's supervisor (see
//! exec.rs): every signal goes to the whole group, and whatever is left of the group
//! when the command exits is killed before the unlock.

use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use pglock::postgres::fallible_iterator::FallibleIterator;
use pglock::{
    inspect, CancelHandle, Error, LockKey, LockMode, LockOptions, OwnedSessionGuard, SessionLock,
    WaitMode,
};
use signal_hook::iterator::exfiltrator::WithOrigin;
use signal_hook::iterator::SignalsInfo;

use crate::args::{Conn, RunArgs};
use crate::conn::{FirstThenConnect, Pool, Session, Target};
use crate::{check_name, exec, lease, show, Fail, EX_LOCK_LOST};

/// The longest the main thread blocks on the connection before it looks at the child:
/// the bound on the time from the command's exit to the unlock. Lock loss wakes it at
/// once, whatever this is.
const TICK: Duration = Duration::from_millis(20);

/// The signals forwarded to the command's process group.
pub(crate) const FORWARDED: [Signal; 6] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// PostgreSQL's limit for `application_name` (NAMEDATALEN - 1 bytes).
const APPLICATION_NAME_MAX: usize = 63;

type Guard = OwnedSessionGuard<FirstThenConnect>;

/// Where the command is, for the signal thread.
#[derive(Debug)]
pub(crate) enum ChildState {
    /// Not started yet: a signal cancels the wait (if any) and ends pglock.
    Waiting(Option<CancelHandle>),
    /// Running, in the process group with this id (the supervisor's pid; its leader is
    /// not reaped yet, so the id cannot be reused).
    Running(Pid),
    /// Reaped: nothing to signal.
    Reaped,
}

pub(crate) type Shared = Arc<Mutex<ChildState>>;

pub(crate) fn state(shared: &Shared) -> MutexGuard<'_, ChildState> {
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

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

    let pool = target.connect(
        &application_name(&args.name, &hostname(), std::process::id()),
        // A lease works through a transaction-mode pooler: no session settings then.
        // An advisory lock needs a primary, and no pooler in between.
        match lease {
            Some(_) => Session::Lease,
            None => Session::Advisory {
                // Slot keys are numbers: no name is hashed by the server.
                name: args.slots.is_none().then_some(args.name.as_str()),
                direct: args.direct,
            },
        },
    )?;
    let start = Instant::now();
    let hold = match &lease {
        Some(plan) => lease::acquire(&pool, plan, &args, start, &shared)?.map(Hold::Lease),
        None => match args.slots {
            Some(slots) => acquire_slot(&pool, &args, slots, start)?
                .map(|(guard, key, slot)| Hold::Advisory(guard, key, Some(slot))),
            None => {
                let key = LockKey::from_name(&args.name);
                acquire(&pool, &key, &args, start, &shared)?
                    .map(|guard| Hold::Advisory(guard, key, None))
            }
        },
    };
    let Some(hold) = hold else {
        return Ok(args.conflict_exit_code);
    };
    if args.verbose {
        eprintln!(
            "pglock: locked {} after waiting {}",
            hold.describe(&args.name),
            show::secs(start.elapsed())
        );
    }
    let what = hold.describe(&args.name);
    let held_since = Instant::now();
    let code = supervise(hold, &args, grace, &shared)?;
    if args.verbose {
        eprintln!(
            "pglock: released {what} after holding it {}",
            show::secs(held_since.elapsed())
        );
    }
    Ok(code)
}

/// `--grace` without `--lease`.
const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// A lock held while the command runs (one per process: its size does not matter).
#[allow(clippy::large_enum_variant)]
enum Hold {
    /// A session advisory lock on `key`: the name's, or a slot's (`Some(slot)`).
    Advisory(Guard, LockKey, Option<u32>),
    /// A lease (or a slot of a lease semaphore).
    Lease(lease::Held),
}

impl Hold {
    fn describe(&self, name: &str) -> String {
        match self {
            Hold::Advisory(_, key, None) => key.to_string(),
            Hold::Advisory(_, key, Some(slot)) => {
                format!(
                    "{} slot {slot} (key {})",
                    show::json_string(name),
                    key_value(key)
                )
            }
            Hold::Lease(held) => held.describe(),
        }
    }
}

/// The advisory key of slot `slot` of the semaphore `name` (`--slots` without `--lease`):
/// the pair `(K, slot)`, where `K` is the upper 32 bits of the name's 64-bit key, that is
/// `((hashtextextended(name, 0) >> 32)::int4, slot)`. Pair keys live in their own part of
/// `pg_locks` (objsubid 2), apart from every 64-bit key. A NUL cannot be in PostgreSQL
/// text, so the slot is not appended to the name.
pub(crate) fn slot_key(name: &str, slot: u32) -> LockKey {
    let key = LockKey::from_name(name).as_i64().unwrap_or_default();
    LockKey::pair((key >> 32) as i32, slot as i32)
}

/// Takes a free slot of an advisory semaphore: one non-blocking try per slot (from a
/// random one), polling with backoff until one is free or the wait ends. The server
/// cannot wait for "any of N keys", so an advisory semaphore always polls.
fn acquire_slot(
    pool: &Pool,
    args: &RunArgs,
    slots: u32,
    start: Instant,
) -> Result<Option<(Guard, LockKey, u32)>, Fail> {
    let limit = if args.nonblock {
        Some(Duration::ZERO)
    } else {
        args.wait
    };
    let first = (std::process::id() ^ start.elapsed().subsec_nanos()) % slots;
    let mut sleep = Duration::from_millis(10);
    let mut said = false;
    loop {
        for i in 0..slots {
            let slot = (first + i) % slots;
            let key = slot_key(&args.name, slot);
            let lock = SessionLock::new(pool, key.clone()).map_err(lock_fail)?;
            if let Some(guard) = lock.try_lock_owned().map_err(lock_fail)? {
                return Ok(Some((guard, key, slot)));
            }
        }
        let rest = limit.map(|limit| limit.saturating_sub(start.elapsed()));
        if rest == Some(Duration::ZERO) {
            if !args.quiet {
                let waited = if args.nonblock || args.wait == Some(Duration::ZERO) {
                    String::new()
                } else {
                    format!(" after waiting {}", show::secs(start.elapsed()))
                };
                eprintln!(
                    "pglock: all {slots} slots of {} are busy{waited}, {}",
                    show::json_string(&args.name),
                    who_holds_slots(pool, &args.name, slots)
                );
            }
            return Ok(None);
        }
        if args.verbose && !said {
            said = true;
            eprintln!(
                "pglock: all {slots} slots of {} are busy, {}; polling",
                show::json_string(&args.name),
                who_holds_slots(pool, &args.name, slots)
            );
        }
        let nap = rest.map_or(sleep, |rest| rest.min(sleep));
        std::thread::sleep(nap);
        sleep = (sleep * 2).min(Duration::from_secs(1));
    }
}

/// "held by slot 0: pid 123 (...); slot 1: ...", from `pg_locks` and `pg_stat_activity`.
fn who_holds_slots(pool: &Pool, name: &str, slots: u32) -> String {
    let holders = pool.get().map_err(|e| e.to_string()).and_then(|mut conn| {
        inspect::holders(&mut *conn, None).map_err(|e| crate::describe_pg(&e))
    });
    match holders {
        Ok(rows) => {
            let held: Vec<String> = (0..slots)
                .flat_map(|slot| {
                    let key = slot_key(name, slot);
                    rows.iter()
                        .filter(move |h| h.granted && h.key == key)
                        .map(move |h| format!("slot {slot}: {}", show::holder_summary(h)))
                })
                .collect();
            if held.is_empty() {
                "but they have no holder any more".to_owned()
            } else {
                format!("held by {}", held.join("; "))
            }
        }
        Err(e) => format!("and their holders could not be listed: {e}"),
    }
}

/// Takes the lock as the options say: `None` when it stayed busy.
fn acquire(
    pool: &Pool,
    key: &LockKey,
    args: &RunArgs,
    start: Instant,
    shared: &Shared,
) -> Result<Option<Guard>, Fail> {
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
    let options = LockOptions::new().mode(mode).wait_mode(wait_mode);
    // One try first: the common case, and the moment to say who is in the way.
    let lock = SessionLock::with_options(pool, key.clone(), options.clone()).map_err(lock_fail)?;
    if let Some(guard) = lock.try_lock_owned().map_err(lock_fail)? {
        return Ok(Some(guard));
    }
    let limit = if args.nonblock {
        Some(Duration::ZERO)
    } else {
        args.wait
    };
    let rest = limit.map(|limit| limit.saturating_sub(start.elapsed()));
    if rest == Some(Duration::ZERO) {
        report_conflict(pool, key, args, start);
        return Ok(None);
    }
    if args.verbose {
        let bound = match rest {
            Some(rest) => format!(" at most {}", show::secs(rest)),
            None => String::new(),
        };
        eprintln!(
            "pglock: {key} is busy, {}; waiting{bound}",
            who_holds(pool, key)
        );
    }
    let options = match rest {
        Some(rest) => options.lock_timeout(rest),
        None => options,
    };
    let lock = SessionLock::with_options(pool, key.clone(), options).map_err(lock_fail)?;
    // A signal during the wait cancels it on the server: a backend busy waiting would
    // not notice that pglock's connection closed until the lock is granted.
    *state(shared) = ChildState::Waiting(Some(lock.cancel_handle()));
    match lock.lock_owned() {
        Ok(guard) => Ok(Some(guard)),
        Err(Error::Timeout { .. }) => {
            report_conflict(pool, key, args, start);
            Ok(None)
        }
        Err(e) => Err(lock_fail(e)),
    }
}

fn report_conflict(pool: &Pool, key: &LockKey, args: &RunArgs, start: Instant) {
    if args.quiet {
        return;
    }
    let waited = if args.nonblock || args.wait == Some(Duration::ZERO) {
        String::new()
    } else {
        format!(" after waiting {}", show::secs(start.elapsed()))
    };
    eprintln!("pglock: {key} is busy{waited}, {}", who_holds(pool, key));
}

/// "held by pid 123 (...)", from `pg_locks` and `pg_stat_activity`.
fn who_holds(pool: &Pool, key: &LockKey) -> String {
    let holders = pool.get().map_err(|e| e.to_string()).and_then(|mut conn| {
        inspect::holders(&mut *conn, Some(key)).map_err(|e| crate::describe_pg(&e))
    });
    match holders {
        Ok(rows) => {
            let held: Vec<String> = rows
                .iter()
                .filter(|h| h.granted)
                .map(show::holder_summary)
                .collect();
            if held.is_empty() {
                "but it has no holder any more".to_owned()
            } else {
                format!("held by {}", held.join("; "))
            }
        }
        Err(e) => format!("and its holders could not be listed: {e}"),
    }
}

pub(crate) fn lock_fail(e: Error) -> Fail {
    let mut msg = crate::describe_lock_error(&e);
    if e.code() == Some(&pglock::postgres::error::SqlState::UNDEFINED_TABLE) {
        msg += " (create the lease table with --create-table, or run \
                LeaseTable::create_sql() in your migrations)";
    }
    match e {
        Error::Pool { .. } => Fail::unavailable(msg),
        Error::InvalidArgument { .. } => Fail::usage(msg),
        _ => Fail::internal(msg),
    }
}

/// Runs the command and watches it and the lock. Returns pglock's exit code.
fn supervise(hold: Hold, args: &RunArgs, grace: Duration, shared: &Shared) -> Result<u8, Fail> {
    let mut command = Command::new(exec::SELF_EXE);
    command
        .arg0("pglock")
        .args(exec::prefix(std::process::id()));
    match &args.shell {
        Some(shell) => command.args([OsString::from("/bin/sh"), "-c".into(), shell.clone()]),
        None => command.args(&args.command),
    };
    command
        .env("PGLOCK_NAME", &args.name)
        .env("PGLOCK_HELD", "1");
    // Inherited from an outer pglock, they would describe its lock, not this one.
    command
        .env_remove("PGLOCK_KEY")
        .env_remove("PGLOCK_TOKEN")
        .env_remove("PGLOCK_SLOT");
    match &hold {
        Hold::Advisory(_, key, slot) => {
            command.env("PGLOCK_KEY", key_value(key));
            if let Some(slot) = slot {
                command.env("PGLOCK_SLOT", slot.to_string());
            }
        }
        Hold::Lease(held) => {
            command.env("PGLOCK_TOKEN", held.guard.token().to_string());
            if args.slots.is_some() {
                command.env("PGLOCK_SLOT", held.guard.slot().to_string());
            }
        }
    }

    // The supervisor leads a new process group, in which it starts the command.
    command.process_group(0);
    let terminal = Terminal::foreground();
    let child = {
        let mut st = state(shared);
        // Spawned from the main thread, which lives as long as pglock: the parent-death
        // signal follows the thread that forked, not the process.
        let child = command.spawn().map_err(|e| {
            Fail::internal(format!(
                "cannot start the command (through {}): {e}",
                exec::SELF_EXE
            ))
        })?;
        *st = ChildState::Running(Pid::from_raw(child.id() as i32));
        child
    };
    let mut child = Supervised { child, terminal };
    child.hand_over_terminal();

    match hold {
        Hold::Advisory(guard, key, _) => supervise_advisory(guard, &key, child, grace, shared),
        Hold::Lease(held) => {
            let what = held.describe();
            let watch = held.guard.watch();
            loop {
                if let Some(status) = reap(&mut child, shared)? {
                    return Ok(finish(status, held.guard.unlock()));
                }
                if watch.wait_lost(TICK) {
                    break;
                }
            }
            let pid = child.child.id();
            let lost_at = Instant::now();
            eprintln!(
                "pglock: lost the lease {what}: it could not be renewed before the holder's \
                 deadline, or the server found it expired or taken over; sending SIGTERM to \
                 the command's process group ({pid}), SIGKILL after {}",
                show::secs(grace)
            );
            let status = terminate(&mut child, shared, grace)?;
            eprintln!(
                "pglock: the command ended ({}) {} after losing the lease",
                describe_status(status),
                show::secs(lost_at.elapsed())
            );
            // No release: the lease is lost already, and a release could wait behind a
            // row lock (the very thing that may have stopped the heartbeats). The lease
            // expires on the server by itself, after at most the margin; the process and
            // its heartbeat thread end now.
            std::mem::forget(held.guard);
            Ok(EX_LOCK_LOST)
        }
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
                crate::describe_lock_error(&e)
            );
            EX_LOCK_LOST
        }
        Err(e) => {
            // The session was ended to free the lock, or the release of a lease could
            // not be sent (it then expires by itself); the command ran under the lock.
            eprintln!("pglock: warning: {}", crate::describe_lock_error(&e));
            exit_code(status)
        }
    }
}

/// Watches an advisory lock's connection while the command runs.
fn supervise_advisory(
    mut guard: Guard,
    key: &LockKey,
    mut child: Supervised,
    grace: Duration,
    shared: &Shared,
) -> Result<u8, Fail> {
    let lost = loop {
        if let Some(status) = reap(&mut child, shared)? {
            return Ok(finish(status, OwnedSessionGuard::unlock(guard)));
        }
        let read = guard.notifications().timeout_iter(TICK).next().map(|_| ());
        match read {
            Ok(()) if !guard.is_closed() => {}
            Ok(()) => break "the connection was closed".to_owned(),
            Err(e) => break crate::describe_pg(&e),
        }
    };

    let pid = child.child.id();
    eprintln!(
        "pglock: lost the lock {key}: its session ended ({lost}); sending SIGTERM to the \
         command's process group ({pid}), SIGKILL after {}",
        show::secs(grace)
    );
    let status = terminate(&mut child, shared, grace)?;
    eprintln!(
        "pglock: the command ended ({}) after losing the lock",
        describe_status(status)
    );
    drop(guard);
    Ok(EX_LOCK_LOST)
}

/// SIGTERM to the command's group, then SIGKILL to the group after `grace` (or as soon
/// as the command itself ended); reaps the supervisor.
fn terminate(child: &mut Supervised, shared: &Shared, grace: Duration) -> Result<ExitStatus, Fail> {
    let group = Pid::from_raw(child.child.id() as i32);
    // Not reaped yet (only this thread reaps), so the group id is still the command's.
    let _ = killpg(group, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    loop {
        if let Some(status) = reap(child, shared)? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = killpg(group, Signal::SIGKILL);
            let status = child
                .child
                .wait()
                .map_err(|e| Fail::internal(format!("cannot wait for the command: {e}")))?;
            child.reaped(shared);
            return Ok(status);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Reaps the supervisor once it exited (with the command's status), after SIGKILL to
/// whatever is left of its process group: the command's own children, still running,
/// would otherwise run on without the lock. Done under the state lock, so that the
/// signal thread never signals a group whose id could be reused.
fn reap(child: &mut Supervised, shared: &Shared) -> Result<Option<ExitStatus>, Fail> {
    let _st = state(shared);
    let group = Pid::from_raw(child.child.id() as i32);
    // WNOWAIT: the exited supervisor stays a zombie, so its pid (the group's id) cannot
    // be reused until it is reaped below.
    let exited = match waitid(
        Id::Pid(group),
        WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
    ) {
        Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) => true,
        Ok(_) => false,
        Err(e) => return Err(Fail::internal(format!("cannot wait for the command: {e}"))),
    };
    if !exited {
        return Ok(None);
    }
    let _ = killpg(group, Signal::SIGKILL);
    drop(_st);
    let status = child
        .child
        .wait()
        .map_err(|e| Fail::internal(format!("cannot wait for the command: {e}")))?;
    child.reaped(shared);
    Ok(Some(status))
}

/// The supervisor, and the terminal it may have been given.
struct Supervised {
    child: Child,
    terminal: Option<Terminal>,
}

impl Supervised {
    /// Makes the command's group the terminal's foreground group, if pglock's was: a
    /// terminal's Ctrl-C and Ctrl-\ then go to the command's group directly, and a
    /// command that reads the terminal is not stopped (SIGTTIN) for being in the
    /// background. A command that already tried to and was stopped is continued.
    fn hand_over_terminal(&mut self) {
        if self.terminal.is_some() {
            let group = Pid::from_raw(self.child.id() as i32);
            if nix::unistd::tcsetpgrp(std::io::stdin(), group).is_ok() {
                let _ = killpg(group, Signal::SIGCONT);
            } else {
                self.terminal = None;
            }
        }
    }

    /// Marks the supervisor reaped, and takes the terminal back.
    fn reaped(&mut self, shared: &Shared) {
        *state(shared) = ChildState::Reaped;
        if let Some(terminal) = self.terminal.take() {
            // pglock is in the background now: SIGTTOU is blocked in this thread, so
            // that the kernel lets it take the terminal back.
            let _ = nix::unistd::tcsetpgrp(std::io::stdin(), terminal.pglock_group);
        }
    }
}

/// pglock's process group, when it was the foreground group of the terminal on stdin.
struct Terminal {
    pglock_group: Pid,
}

impl Terminal {
    fn foreground() -> Option<Terminal> {
        use std::io::IsTerminal;
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        let group = nix::unistd::getpgrp();
        if nix::unistd::tcgetpgrp(&stdin).ok()? != group {
            return None;
        }
        // Taking the terminal back from the background needs SIGTTOU blocked (in this,
        // the main thread, which does it; children start with an empty mask).
        let mut ttou = nix::sys::signal::SigSet::empty();
        ttou.add(Signal::SIGTTOU);
        nix::sys::signal::pthread_sigmask(
            nix::sys::signal::SigmaskHow::SIG_BLOCK,
            Some(&ttou),
            None,
        )
        .ok()?;
        Some(Terminal {
            pglock_group: group,
        })
    }
}

/// The command's exit code, or 128+N for death by signal N.
fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(signal)) => (128 + signal) as u8,
        (None, None) => crate::EX_SOFTWARE,
    }
}

fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => match Signal::try_from(signal) {
            Ok(s) => format!("killed by {s}"),
            Err(_) => format!("killed by signal {signal}"),
        },
        (None, None) => status.to_string(),
    }
}

/// `PGLOCK_KEY`: the 64-bit key, as `pglock key` and the README print it.
fn key_value(key: &LockKey) -> String {
    match (key.as_i64(), key.as_pair()) {
        (Some(k), _) => k.to_string(),
        (None, Some((a, b))) => format!("{a},{b}"),
        (None, None) => String::new(),
    }
}

/// Starts the thread that forwards signals to the command. Signals that were ignored
/// when pglock started (`nohup`, a shell's background job) stay ignored, in pglock and,
/// through `exec`, in the command.
fn forward_signals(shared: &Shared) -> Result<(), Fail> {
    let ignored = ignored_signals();
    let wanted: Vec<i32> = FORWARDED
        .iter()
        .map(|&s| s as i32)
        .filter(|&s| ignored & (1u64 << (s - 1)) == 0)
        .collect();
    let mut signals = SignalsInfo::<WithOrigin>::new(&wanted)
        .map_err(|e| Fail::internal(format!("cannot install signal handlers: {e}")))?;
    let shared = Arc::clone(shared);
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for origin in signals.forever() {
                let signal = origin.signal;
                let st = state(&shared);
                match &*st {
                    ChildState::Waiting(cancel) => {
                        eprintln!(
                            "pglock: {} before the command started; giving up",
                            signal_name(signal)
                        );
                        if let Some(cancel) = cancel {
                            let _ = cancel.cancel();
                        }
                        // The connection closes with the process: the server frees a
                        // lock just granted.
                        std::process::exit(128 + signal);
                    }
                    // Whoever sent it (a terminal's Ctrl-C included, when pglock's group
                    // kept the terminal): the command's group is not pglock's, so the
                    // signal goes to the whole group.
                    ChildState::Running(group) => {
                        if let Ok(s) = Signal::try_from(signal) {
                            let _ = killpg(*group, s);
                        }
                    }
                    ChildState::Reaped => {}
                }
            }
        })
        .map_err(|e| Fail::internal(format!("cannot start the signal thread: {e}")))?;
    Ok(())
}

fn signal_name(signal: i32) -> String {
    Signal::try_from(signal).map_or_else(|_| format!("signal {signal}"), |s| s.to_string())
}

/// The set of ignored signals, from `SigIgn` in `/proc/self/status` (bit N-1 for signal
/// N); empty if it cannot be read.
pub(crate) fn ignored_signals() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| parse_sigign(&status))
        .unwrap_or(0)
}

fn parse_sigign(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("SigIgn:"))?;
    u64::from_str_radix(line["SigIgn:".len()..].trim(), 16).ok()
}

pub(crate) fn hostname() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown-host".to_owned())
}

/// `pglock run NAME HOST:PID`, at most 63 bytes: PostgreSQL's limit, past which the
/// server would cut it. Characters other than printable ASCII show as `?` (what
/// PostgreSQL 15 does to them; 16 and later would escape them instead), so what is set is
/// exactly what `pg_stat_activity` shows. A long NAME is shortened (ending in `...`) so
/// that `HOST:PID` stays; only a very long host name is cut.
pub(crate) fn application_name(name: &str, host: &str, pid: u32) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_graphic() || c == ' ' {
                    c
                } else {
                    '?'
                }
            })
            .collect()
    };
    let (name, host) = (clean(name), clean(host));
    let prefix = "pglock run ";
    let suffix = format!(" {host}:{pid}");
    let room = APPLICATION_NAME_MAX.saturating_sub(prefix.len() + suffix.len());
    let name = if name.len() <= room {
        name
    } else if room > 3 {
        format!("{}...", truncate_at_char_boundary(&name, room - 3))
    } else {
        String::new()
    };
    truncate_at_char_boundary(&format!("{prefix}{name}{suffix}"), APPLICATION_NAME_MAX).to_owned()
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub(crate) fn truncate_at_char_boundary(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn application_names_fit_postgres_limit_and_keep_host_and_pid() {
        assert_eq!(
            application_name("nightly-report", "web-1", 4242),
            "pglock run nightly-report web-1:4242"
        );
        let long = application_name(&"x".repeat(500), "web-1", 4242);
        assert_eq!(long.len(), 63, "{long}");
        assert!(long.ends_with("xxx... web-1:4242"), "{long}");
        let odd = application_name("a'b;\"c\ndé", "h", 1);
        assert_eq!(odd, "pglock run a'b;\"c?d? h:1");
        let huge_host = application_name("n", &"h".repeat(100), 1);
        assert_eq!(huge_host.len(), 63);
    }

    #[test]
    fn truncation_never_splits_a_character() {
        let s = "ééé"; // two bytes each
        assert_eq!(truncate_at_char_boundary(s, 3), "é");
        assert_eq!(truncate_at_char_boundary(s, 4), "éé");
        assert_eq!(truncate_at_char_boundary(s, 100), s);
        assert_eq!(truncate_at_char_boundary("日本", 2), "");
    }

    #[test]
    fn sigign_is_read_from_proc_status() {
        let status = "Name:\tx\nSigBlk:\t0000000000000000\nSigIgn:\t0000000000001001\n";
        // SIGHUP (1) and SIGPIPE (13).
        assert_eq!(parse_sigign(status), Some(0x1001));
        assert_eq!(parse_sigign("Name: x\n"), None);
    }

    #[test]
    fn exit_codes_pass_through() {
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(15)), 143);
        assert_eq!(exit_code(ExitStatus::from_raw(9)), 137);
    }
}
