//! Leases from the shell: `pglock run --lease` (and `--slots` with it), and `pglock lease
//! acquire|heartbeat|release|get`.
//!
//! Every lease statement is one stateless statement, so all of this works through a
//! transaction-mode pooler (PgBouncer): pglock sets no session state on a lease's
//! connection, and listens (`--notify`) only when asked.
//!
//! # How `run --lease` stops the command before anybody else can hold the lease
//!
//! The guard trusts the lease until its deadline: the lease length minus the safety
//! margin, counted from *before* the last successful lock or renewal statement was sent.
//! The server's `expires_at` is that statement's execution time plus the lease length,
//! so it is always at least the margin after the deadline. At the deadline (or as soon as
//! the server says the lease is gone) pglock sends SIGTERM, waits `--grace`, sends
//! SIGKILL and reaps the command. With a margin of `grace + lease/10`, that whole sequence
//! ends at least `lease/10` (minus the few milliseconds a SIGKILL and a reap take) before
//! the lease can expire on the server.
//!
//! The library needs a heartbeat of at most half of `lease - margin`, so that a failed
//! renewal can be retried before the deadline: `grace <= lease - 2 * heartbeat - lease/10`
//! (7/30 of the lease with the default heartbeat of a third). A larger `--grace` is a
//! usage error; without one, `--grace` is the most that fits, at most 10 s.

use std::time::{Duration, Instant};

use pglock::{
    Error, LeaseInfo, LeaseLock, LeaseOptions, LeaseSemaphore, LeaseTable, OwnedLeaseGuard,
};

use crate::args::{Conn, LeaseAcquireArgs, LeaseCommand, LeaseGetArgs, LeaseTokenArgs, RunArgs};
use crate::conn::{FirstThenConnect, Pool, Session, Target};
use crate::run::{lock_fail, state, ChildState, Shared};
use crate::show::{self, json_string};
use crate::{check_name, Fail, EX_STALE_TOKEN};

/// The longest default `--grace`.
const MAX_DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// What `run --lease` holds the lease with, checked before connecting.
#[derive(Debug)]
pub(crate) struct Plan {
    pub(crate) lease: Duration,
    pub(crate) heartbeat: Duration,
    pub(crate) grace: Duration,
    /// `grace` + [`allowance`]: the guard's safety margin.
    pub(crate) margin: Duration,
    pub(crate) table: LeaseTable,
}

/// What is left between the end of the termination sequence and the server's expiry:
/// the time SIGKILL and the reap take, and clock-rate differences. A tenth of the lease
/// (the library's default safety margin).
pub(crate) fn allowance(lease: Duration) -> Duration {
    lease / 10
}

/// The largest `--grace` that fits `lease` with `heartbeat`, or `None` if even a zero
/// grace does not.
pub(crate) fn max_grace(lease: Duration, heartbeat: Duration) -> Option<Duration> {
    lease.checked_sub(heartbeat * 2 + allowance(lease))
}

pub(crate) fn plan(args: &RunArgs, lease: Duration) -> Result<Plan, Fail> {
    let table = table(args.table.as_deref())?;
    if lease < Duration::from_millis(1) {
        return Err(Fail::usage(format!(
            "--lease {} is below 1 ms",
            show::secs(lease)
        )));
    }
    let heartbeat = args.heartbeat.unwrap_or(lease / 3);
    let Some(room) = max_grace(lease, heartbeat) else {
        return Err(Fail::usage(format!(
            "--heartbeat {} does not fit --lease {}: it must be at most (lease - lease/10) / 2 \
             = {}, so that a failed renewal can be retried before the lease runs out",
            show::secs(heartbeat),
            show::secs(lease),
            show::secs((lease - allowance(lease)) / 2)
        )));
    };
    let grace = match args.grace {
        Some(grace) if grace > room => {
            return Err(Fail::usage(format!(
                "--grace {} does not fit --lease {}: the command must be stopped (SIGTERM, \
                 --grace, SIGKILL) before the lease can expire on the server, so --grace can \
                 be at most lease - 2 * heartbeat - lease/10 = {} (heartbeat {}); give a \
                 longer --lease, a shorter --grace, or a shorter --heartbeat",
                show::secs(grace),
                show::secs(lease),
                show::secs(room),
                show::secs(heartbeat)
            )))
        }
        Some(grace) => grace,
        None => room.min(MAX_DEFAULT_GRACE),
    };
    Ok(Plan {
        lease,
        heartbeat,
        grace,
        margin: grace + allowance(lease),
        table,
    })
}

/// `--table`, or the default.
fn table(name: Option<&str>) -> Result<LeaseTable, Fail> {
    match name {
        Some(name) => LeaseTable::new(name).map_err(lock_fail),
        None => Ok(LeaseTable::default()),
    }
}

/// `--create-table`: `CREATE ... IF NOT EXISTS`, serialized on the server.
fn create_table(pool: &Pool, table: &LeaseTable) -> Result<(), Fail> {
    let mut conn = pool
        .get()
        .map_err(|e| Fail::unavailable(format!("cannot connect: {e}")))?;
    table.create(&mut conn).map_err(lock_fail)
}

/// A held lease of `run --lease`.
pub(crate) struct Held {
    pub(crate) guard: OwnedLeaseGuard<FirstThenConnect>,
    semaphore: bool,
}

impl Held {
    pub(crate) fn describe(&self) -> String {
        let slot = if self.semaphore {
            format!(", slot {}", self.guard.slot())
        } else {
            String::new()
        };
        format!("{} (token {}{slot})", self.guard.key(), self.guard.token())
    }
}

/// A lease lock or semaphore, not yet held.
enum Leased {
    Lock(LeaseLock<FirstThenConnect>),
    Semaphore(LeaseSemaphore<FirstThenConnect>),
}

impl Leased {
    fn new(
        pool: &Pool,
        name: &str,
        slots: Option<u32>,
        options: LeaseOptions,
    ) -> Result<Self, Fail> {
        match slots {
            Some(n) => LeaseSemaphore::with_options(pool, name, n, options).map(Leased::Semaphore),
            None => LeaseLock::with_options(pool, name, options).map(Leased::Lock),
        }
        .map_err(lock_fail)
    }

    fn lock_owned(self) -> pglock::Result<OwnedLeaseGuard<FirstThenConnect>> {
        match self {
            Leased::Lock(lock) => lock.lock_owned(),
            Leased::Semaphore(sem) => sem.lock_owned(),
        }
    }

    fn cancel_handle(&self) -> pglock::CancelHandle {
        match self {
            Leased::Lock(lock) => lock.cancel_handle(),
            Leased::Semaphore(sem) => sem.cancel_handle(),
        }
    }

    fn read(&self) -> pglock::Result<Vec<LeaseInfo>> {
        match self {
            Leased::Lock(lock) => Ok(lock.read()?.into_iter().collect()),
            Leased::Semaphore(sem) => sem.read(),
        }
    }
}

/// Takes the lease of `run --lease` as the options say: `None` when it stayed busy.
pub(crate) fn acquire(
    pool: &Pool,
    plan: &Plan,
    args: &RunArgs,
    start: Instant,
    shared: &Shared,
) -> Result<Option<Held>, Fail> {
    if args.create_table {
        create_table(pool, &plan.table)?;
    }
    let options = LeaseOptions::new()
        .table(plan.table.clone())
        .lease(plan.lease)
        .heartbeat(plan.heartbeat)
        .safety_margin(plan.margin)
        .notify(args.notify);
    let held = |guard| Held {
        guard,
        semaphore: args.slots.is_some(),
    };
    let reader_options = options.clone();
    let busy_text = || {
        let what = match args.slots {
            Some(n) => format!("all {n} slots of lease {}", json_string(&args.name)),
            None => format!("lease {}", json_string(&args.name)),
        };
        let holders = Leased::new(pool, &args.name, args.slots, reader_options.clone())
            .ok()
            .map(|l| l.read());
        (what, holders_text(holders))
    };
    // One try first: the common case, and the moment to say who is in the way.
    let first = Leased::new(
        pool,
        &args.name,
        args.slots,
        options.clone().lock_timeout(Duration::ZERO),
    )?;
    match first.lock_owned() {
        Ok(guard) => return Ok(Some(held(guard))),
        Err(Error::Timeout { .. }) => {}
        Err(e) => return Err(lock_fail(e)),
    }
    let limit = if args.nonblock {
        Some(Duration::ZERO)
    } else {
        args.wait
    };
    let rest = limit.map(|limit| limit.saturating_sub(start.elapsed()));
    let report = || {
        if !args.quiet {
            let waited = if args.nonblock || args.wait == Some(Duration::ZERO) {
                String::new()
            } else {
                format!(" after waiting {}", show::secs(start.elapsed()))
            };
            let (what, holders) = busy_text();
            let verb = if args.slots.is_some() { "are" } else { "is" };
            eprintln!("pglock: {what} {verb} busy{waited}, {holders}");
        }
    };
    if rest == Some(Duration::ZERO) {
        report();
        return Ok(None);
    }
    if args.verbose {
        let bound = match rest {
            Some(rest) => format!(" at most {}", show::secs(rest)),
            None => String::new(),
        };
        let (what, holders) = busy_text();
        eprintln!("pglock: {what} busy, {holders}; waiting{bound}");
    }
    let options = match rest {
        Some(rest) => options.lock_timeout(rest),
        None => options,
    };
    let leased = Leased::new(pool, &args.name, args.slots, options)?;
    *state(shared) = ChildState::Waiting(Some(leased.cancel_handle()));
    match leased.lock_owned() {
        Ok(guard) => Ok(Some(held(guard))),
        Err(Error::Timeout { .. }) => {
            report();
            Ok(None)
        }
        Err(e) => Err(lock_fail(e)),
    }
}

/// "held by OWNER (token T, slot S) for 1.234 s more; ...".
fn holders_text(rows: Option<pglock::Result<Vec<LeaseInfo>>>) -> String {
    match rows {
        Some(Ok(rows)) => {
            let held: Vec<String> = rows
                .iter()
                .filter(|r| r.held)
                .map(|r| {
                    format!(
                        "{} (token {}, slot {}) for {} more",
                        json_string(&r.owner),
                        r.token,
                        r.slot,
                        show::secs(r.remaining)
                    )
                })
                .collect();
            if held.is_empty() {
                "but it has no holder any more".to_owned()
            } else {
                format!("held by {}", held.join("; "))
            }
        }
        Some(Err(e)) => format!(
            "and its holders could not be read: {}",
            crate::describe_lock_error(&e)
        ),
        None => "and its holders could not be read".to_owned(),
    }
}

/// `pglock lease ...`.
pub(crate) fn command(conn: &Conn, command: LeaseCommand) -> Result<u8, Fail> {
    match command {
        LeaseCommand::Acquire(args) => acquire_command(conn, args),
        LeaseCommand::Heartbeat(args) => token_command(conn, args, false),
        LeaseCommand::Release(args) => token_command(conn, args, true),
        LeaseCommand::Get(args) => get_command(conn, args),
    }
}

/// Connects for `pglock lease SUBCOMMAND NAME`, creating the table if asked.
fn connect(
    conn: &Conn,
    subcommand: &str,
    name: &str,
    table_args: &crate::args::TableArgs,
) -> Result<(Pool, LeaseTable), Fail> {
    check_name(name)?;
    let table = table(table_args.table.as_deref())?;
    let target = Target::from_env(conn)?;
    let app =
        crate::run::truncate_at_char_boundary(&format!("pglock lease {subcommand}"), 63).to_owned();
    let pool = target.connect(&app, Session::Lease)?;
    if table_args.create_table {
        create_table(&pool, &table)?;
    }
    Ok((pool, table))
}

fn acquire_command(conn: &Conn, args: LeaseAcquireArgs) -> Result<u8, Fail> {
    let (pool, table) = connect(conn, "acquire", &args.name, &args.table)?;
    let owner = args
        .owner
        .clone()
        .unwrap_or_else(|| format!("pglock lease {}", crate::run::hostname()));
    let mut options = LeaseOptions::new()
        .table(table.clone())
        .lease(args.lease)
        .owner(owner)
        .lock_timeout(args.wait.unwrap_or(Duration::ZERO));
    if let Some(data) = &args.data {
        options = options.data(data.as_bytes());
    }
    let lock = LeaseLock::with_options(&pool, &args.name, options).map_err(lock_fail)?;
    let start = Instant::now();
    let guard = match lock.lock_owned() {
        Ok(guard) => guard,
        Err(Error::Timeout { .. }) => {
            let reader =
                LeaseLock::with_options(&pool, &args.name, LeaseOptions::new().table(table))
                    .map_err(lock_fail)?;
            let waited = match args.wait {
                Some(w) if !w.is_zero() => {
                    format!(" after waiting {}", show::secs(start.elapsed()))
                }
                _ => String::new(),
            };
            eprintln!(
                "pglock: lease {} is busy{waited}, {}",
                json_string(&args.name),
                holders_text(Some(reader.read().map(|r| r.into_iter().collect())))
            );
            return Ok(args.conflict_exit_code);
        }
        Err(e) => return Err(lock_fail(e)),
    };
    let token = guard.token();
    // The lease must outlive this process: no release. Its heartbeat thread (started,
    // due only a third of the lease from now) ends with the process.
    std::mem::forget(guard);
    print_token(&args.name, token, args.lease, args.json);
    Ok(0)
}

/// `{"name":...,"token":...,"expires_in_ms":...}`, or the token alone.
fn print_token(name: &str, token: i64, expires_in: Duration, json: bool) {
    if json {
        println!(
            "{{\"name\":{},\"token\":{token},\"expires_in_ms\":{}}}",
            json_string(name),
            expires_in.as_millis()
        );
    } else {
        println!("{token}");
    }
}

fn token_command(conn: &Conn, args: LeaseTokenArgs, release: bool) -> Result<u8, Fail> {
    let subcommand = if release { "release" } else { "heartbeat" };
    let (pool, table) = connect(conn, subcommand, &args.name, &args.table)?;
    let lock = LeaseLock::with_options(&pool, &args.name, LeaseOptions::new().table(table))
        .map_err(lock_fail)?;
    let stale = || Fail {
        code: EX_STALE_TOKEN,
        msg: format!(
            "token {} does not hold the lease {} any more: it expired, was released, \
                 or was taken over{}",
            args.token,
            json_string(&args.name),
            if release { "" } else { "; it was not renewed" }
        ),
    };
    if release {
        if !lock.unlock_token(args.token).map_err(lock_fail)? {
            return Err(stale());
        }
        if args.json {
            println!(
                "{{\"name\":{},\"token\":{},\"released\":true}}",
                json_string(&args.name),
                args.token
            );
        }
    } else {
        match lock.renew_token(args.token).map_err(lock_fail)? {
            Some(lease) => print_token(&args.name, args.token, lease, args.json),
            None => return Err(stale()),
        }
    }
    Ok(0)
}

fn get_command(conn: &Conn, args: LeaseGetArgs) -> Result<u8, Fail> {
    let (pool, table) = connect(conn, "get", &args.name, &args.table)?;
    let lock = LeaseLock::with_options(&pool, &args.name, LeaseOptions::new().table(table))
        .map_err(lock_fail)?;
    let info = lock.read().map_err(lock_fail)?;
    if args.json {
        println!("{}", info_json(&args.name, info.as_ref()));
    } else {
        print!("{}", info_text(&args.name, info.as_ref()));
    }
    Ok(0)
}

/// A payload as text: itself when it is UTF-8, else PostgreSQL's hex form `\x...`.
fn data_text(data: &[u8]) -> String {
    match std::str::from_utf8(data) {
        Ok(text) => text.to_owned(),
        Err(_) => {
            let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
            format!("\\x{hex}")
        }
    }
}

fn info_json(name: &str, info: Option<&LeaseInfo>) -> String {
    let Some(i) = info else {
        return format!(
            "{{\"name\":{},\"held\":false,\"owner\":null,\"token\":null,\"expires_in_ms\":0,\
             \"lease_ms\":null,\"acquired_at\":null,\"renewed_at\":null,\"expires_at\":null,\
             \"data\":null}}",
            json_string(name)
        );
    };
    format!(
        "{{\"name\":{},\"held\":{},\"owner\":{},\"token\":{},\"expires_in_ms\":{},\
         \"lease_ms\":{},\"acquired_at\":\"{}\",\"renewed_at\":\"{}\",\"expires_at\":\"{}\",\
         \"data\":{}}}",
        json_string(name),
        i.held,
        json_string(&i.owner),
        i.token,
        i.remaining.as_millis(),
        i.lease.as_millis(),
        show::rfc3339(i.acquired_at),
        show::rfc3339(i.renewed_at),
        show::rfc3339(i.expires_at),
        i.data
            .as_deref()
            .map_or("null".to_owned(), |d| json_string(&data_text(d)))
    )
}

fn info_text(name: &str, info: Option<&LeaseInfo>) -> String {
    let mut out = format!("lease {}\n", json_string(name));
    let Some(i) = info else {
        out.push_str("  free: never taken\n");
        return out;
    };
    if i.held {
        out += &format!(
            "  held by {} with token {}, for {} more (until {})\n",
            json_string(&i.owner),
            i.token,
            show::secs(i.remaining),
            show::rfc3339(i.expires_at)
        );
    } else {
        out += &format!(
            "  free: last held by {} with token {}, until {}\n",
            json_string(&i.owner),
            i.token,
            show::rfc3339(i.expires_at)
        );
    }
    out += &format!(
        "  lease {}, acquired {}, renewed {}\n",
        show::secs(i.lease),
        show::rfc3339(i.acquired_at),
        show::rfc3339(i.renewed_at)
    );
    if let Some(data) = &i.data {
        out += &format!("  data {}\n", json_string(&data_text(data)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grace_and_margin_fit_before_the_servers_expiry() {
        let s = Duration::from_secs;
        // The default heartbeat (a third): grace <= 7/30 of the lease.
        assert_eq!(max_grace(s(30), s(10)), Some(s(7)));
        assert_eq!(max_grace(s(3), s(1)), Some(Duration::from_millis(700)));
        assert_eq!(max_grace(s(3), Duration::from_millis(1400)), None);
        // Whatever fits leaves the library's constraint met: heartbeat <= (lease - margin) / 2.
        for (lease, hb) in [(s(30), s(10)), (s(3), s(1)), (s(60), s(5))] {
            let grace = max_grace(lease, hb).unwrap();
            let margin = grace + allowance(lease);
            assert!(hb * 2 <= lease - margin, "{lease:?} {hb:?}");
        }
    }

    #[test]
    fn payloads_show_as_text_or_hex() {
        assert_eq!(data_text(b"v1.2"), "v1.2");
        assert_eq!(data_text(&[0xff, 0x00]), "\\xff00");
    }
}
