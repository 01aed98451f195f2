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

use std::sync::{Arc, Mutex};

use pglock::{LeaseGuard, LeaseInfo, LeaseLock, LeaseOptions, LeaseSemaphore, LeaseTable};
use serde_json::json;

use crate::acquire::{acquire, Wanted, Watched};
use crate::args::{Conn, LeaseAcquireArgs, LeaseCommand, LeaseGetArgs, LeaseTokenArgs, RunArgs};
use crate::child::ChildState;
use crate::conn::{FirstThenConnect, Pool, Session, Target};
use crate::fail::{check_name, describe_lock_error, lock_fail, Fail, EX_STALE_TOKEN};
use crate::format::{self as show, json_string};

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
pub(crate) fn create_table_if_asked(
    pool: &Pool,
    table: &LeaseTable,
    asked: bool,
) -> Result<(), Fail> {
    if !asked {
        return Ok(());
    }
    let mut conn = pool
        .get()
        .map_err(|e| Fail::unavailable(format!("cannot connect: {e}")))?;
    table.create(&mut conn).map_err(lock_fail)
}

/// The lease options of `run --lease`.
pub(crate) fn options(plan: &Plan, args: &RunArgs) -> LeaseOptions {
    LeaseOptions::new()
        .table(plan.table.clone())
        .lease(plan.lease)
        .heartbeat(plan.heartbeat)
        .safety_margin(plan.margin)
        .notify(args.notify)
}

/// A held lease of `run --lease` (a slot of a lease semaphore with `--slots`).
pub(crate) struct Held<'a> {
    guard: LeaseGuard<'a, FirstThenConnect>,
    semaphore: bool,
}

impl<'a> Held<'a> {
    pub(crate) fn new(guard: LeaseGuard<'a, FirstThenConnect>, semaphore: bool) -> Self {
        Held { guard, semaphore }
    }
}

impl Watched for Held<'_> {
    fn describe(&self, _name: &str) -> String {
        let slot = if self.semaphore {
            format!(", slot {}", self.guard.slot())
        } else {
            String::new()
        };
        format!("{} (token {}{slot})", self.guard.key(), self.guard.token())
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![("PGLOCK_TOKEN", self.guard.token().to_string())];
        if self.semaphore {
            env.push(("PGLOCK_SLOT", self.guard.slot().to_string()));
        }
        env
    }

    fn noun(&self) -> &'static str {
        "lease"
    }

    fn lost(&mut self, tick: Duration) -> Option<String> {
        self.guard.watch().wait_lost(tick).then(|| {
            format!(
                "the lease {}: it could not be renewed before the holder's deadline, or the \
                 server found it expired or taken over",
                self.describe("")
            )
        })
    }

    fn unlock(self) -> pglock::Result<()> {
        self.guard.unlock()
    }

    /// No release: the lease is lost already, and a release could wait behind a row
    /// lock (the very thing that may have stopped the heartbeats). The lease expires on
    /// the server by itself, after at most the margin; the process and its heartbeat
    /// thread end soon.
    fn abandon(self) {
        std::mem::forget(self.guard);
    }
}

/// Who holds the lease (or the slots of a lease semaphore), read through a connection
/// of its own: the lock's own may be busy waiting.
pub(crate) fn holders(
    target: &Target,
    table: &LeaseTable,
    name: &str,
    slots: Option<u32>,
) -> String {
    let options = LeaseOptions::new().table(table.clone());
    let rows = target
        .connect("pglock run (holders)", Session::Lease)
        .ok()
        .map(|pool| match slots {
            Some(n) => LeaseSemaphore::with_options(&pool, name, n, options).and_then(|s| s.read()),
            None => LeaseLock::with_options(&pool, name, options)
                .and_then(|l| l.read())
                .map(|r| r.into_iter().collect()),
        });
    holders_text(rows)
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
            describe_lock_error(&e)
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
) -> Result<(Target, Pool, LeaseTable), Fail> {
    check_name(name)?;
    let table = table(table_args.table.as_deref())?;
    let target = Target::from_env(conn)?;
    let pool = target.connect(&format!("pglock lease {subcommand}"), Session::Lease)?;
    create_table_if_asked(&pool, &table, table_args.create_table)?;
    Ok((target, pool, table))
}

fn acquire_command(conn: &Conn, args: LeaseAcquireArgs) -> Result<u8, Fail> {
    let (target, pool, table) = connect(conn, "acquire", &args.name, &args.table)?;
    let owner = args
        .owner
        .clone()
        .unwrap_or_else(|| format!("pglock lease {}", show::hostname()));
    let mut options = LeaseOptions::new()
        .table(table.clone())
        .lease(args.lease)
        .owner(owner)
        .lock_timeout(args.wait.unwrap_or(Duration::ZERO));
    if let Some(data) = &args.data {
        options = options.data(data.as_bytes());
    }
    let mut lock = LeaseLock::with_options(&pool, &args.name, options).map_err(lock_fail)?;
    let reader = || holders(&target, &table, &args.name, None);
    let wait = args.wait.unwrap_or(Duration::ZERO);
    let wanted = Wanted {
        what: format!("lease {}", json_string(&args.name)),
        plural: false,
        limit: Some(wait),
        say_waited: !wait.is_zero(),
        quiet: false,
        verbose: false,
        holders: &reader,
        tls: target.connector(),
    };
    // No signal thread here: a signal ends the wait the default way.
    let shared = Arc::new(Mutex::new(ChildState::Waiting(None)));
    let token = acquire(&mut lock, &wanted, Instant::now(), &shared, |guard| {
        let token = guard.token();
        // The lease must outlive this process: no release. Its heartbeat thread
        // (started, due only a third of the lease from now) ends with the process.
        std::mem::forget(guard);
        Ok(token)
    })?;
    let Some(token) = token else {
        return Ok(args.conflict_exit_code);
    };
    print_token(&args.name, token, args.lease, args.json);
    Ok(0)
}

/// `{"name":...,"token":...,"expires_in_ms":...}`, or the token alone.
fn print_token(name: &str, token: i64, expires_in: Duration, json: bool) {
    if json {
        let out =
            json!({"name": name, "token": token, "expires_in_ms": expires_in.as_millis() as u64});
        println!("{out}");
    } else {
        println!("{token}");
    }
}

fn token_command(conn: &Conn, args: LeaseTokenArgs, release: bool) -> Result<u8, Fail> {
    let subcommand = if release { "release" } else { "heartbeat" };
    let (_, pool, table) = connect(conn, subcommand, &args.name, &args.table)?;
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
            let out = json!({"name": args.name, "token": args.token, "released": true});
            println!("{out}");
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
    let (_, pool, table) = connect(conn, "get", &args.name, &args.table)?;
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

fn info_json(name: &str, info: Option<&LeaseInfo>) -> serde_json::Value {
    let Some(i) = info else {
        return json!({
            "name": name, "held": false, "owner": null, "token": null, "expires_in_ms": 0,
            "lease_ms": null, "acquired_at": null, "renewed_at": null, "expires_at": null,
            "data": null,
        });
    };
    json!({
        "name": name,
        "held": i.held,
        "owner": i.owner,
        "token": i.token,
        "expires_in_ms": i.remaining.as_millis() as u64,
        "lease_ms": i.lease.as_millis() as u64,
        "acquired_at": show::rfc3339(i.acquired_at),
        "renewed_at": show::rfc3339(i.renewed_at),
        "expires_at": show::rfc3339(i.expires_at),
        "data": i.data.as_deref().map(data_text),
    })
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
