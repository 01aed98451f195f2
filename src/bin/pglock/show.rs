//! `pglock key` and `pglock status`.

use std::fmt::Write as _;
use std::time::SystemTime;

use pglock::inspect::{self, LockHolder};
use pglock::LockKey;
use serde_json::{json, Value};

use crate::args::Conn;
use crate::conn::{Session, Target};
use crate::fail::{check_name, describe_pg, Fail};
use crate::format::{holder_line, json_string, mode_name, rfc3339, sql_literal};

/// `pglock key NAME`: needs no server. With `--dsn` and a name that is not ASCII, it
/// asks the server for its encoding, and warns unless it is UTF-8.
pub(crate) fn key(name: &str, slots: Option<u32>, conn: &Conn) -> Result<u8, Fail> {
    check_name(name)?;
    if let (Some(_), false) = (&conn.dsn, name.is_ascii()) {
        let encoding = crate::conn::server_encoding(&Target::from_env(conn)?)?;
        if let Some(warning) = crate::conn::encoding_warning(name, &encoding) {
            eprintln!("pglock: warning: {warning}");
        }
    }
    let key = LockKey::from_name(name);
    let k = key.as_i64().unwrap_or_default();
    println!("name: {}", json_string(name));
    println!("key: {k}");
    println!(
        "pg_locks: locktype=advisory classid={} objid={} objsubid={}",
        key.classid(),
        key.objid(),
        key.objsubid()
    );
    println!(
        "sql: SELECT pg_advisory_lock(hashtextextended({}, 0));",
        sql_literal(name)
    );
    println!("sql-by-key: SELECT pg_advisory_lock({k});");
    for slot in 0..slots.unwrap_or(0) {
        let key = crate::acquire::slot_key(name, slot);
        let (a, b) = key.as_pair().unwrap_or_default();
        println!(
            "slot {slot}: key {a},{b} pg_locks: locktype=advisory classid={} objid={} \
             objsubid={} sql: SELECT pg_advisory_lock({a}, {b});",
            key.classid(),
            key.objid(),
            key.objsubid()
        );
    }
    Ok(0)
}

/// `pglock status [NAME] [--json]`.
pub(crate) fn status(conn: &Conn, name: Option<&str>, json: bool) -> Result<u8, Fail> {
    if let Some(name) = name {
        check_name(name)?;
    }
    let key = name.map(LockKey::from_name);
    let target = Target::from_env(conn)?;
    let pool = target.connect("pglock status", Session::Inspect)?;
    let mut conn = pool
        .get()
        .map_err(|e| Fail::unavailable(format!("cannot connect to {}: {e}", target.describe())))?;
    let rows = inspect::holders(&mut *conn, key.as_ref()).map_err(|e| {
        Fail::internal(format!(
            "cannot read pg_locks and pg_stat_activity: {}",
            describe_pg(&e)
        ))
    })?;
    // Group by key, keeping the query's order; a named lock shows even when free.
    let mut groups: Vec<(LockKey, Vec<&LockHolder>)> = Vec::new();
    if let Some(key) = &key {
        groups.push((key.clone(), Vec::new()));
    }
    for row in &rows {
        match groups.iter_mut().find(|(k, _)| *k == row.key) {
            Some((_, list)) => list.push(row),
            None => groups.push((row.key.clone(), vec![row])),
        }
    }
    let now = SystemTime::now();
    if json {
        println!("{}", status_json(&groups, now));
    } else {
        print!("{}", status_text(&groups, now));
    }
    Ok(0)
}

fn status_text(groups: &[(LockKey, Vec<&LockHolder>)], now: SystemTime) -> String {
    let mut out = String::new();
    if groups.is_empty() {
        out.push_str("no advisory locks are held or awaited in this database\n");
    }
    for (key, sessions) in groups {
        let _ = writeln!(out, "lock {key}");
        if sessions.is_empty() {
            out.push_str("  free: no holder, no waiter\n");
        }
        for s in sessions {
            let role = if s.granted { "held by" } else { "awaited by" };
            let _ = writeln!(out, "  {role} {}", holder_line(s, now));
        }
    }
    out
}

fn status_json(groups: &[(LockKey, Vec<&LockHolder>)], now: SystemTime) -> Value {
    let locks: Vec<Value> = groups
        .iter()
        .map(|(key, sessions)| {
            let id = match (key.as_i64(), key.as_pair()) {
                (Some(k), _) => json!(k),
                (None, Some((a, b))) => json!([a, b]),
                (None, None) => Value::Null,
            };
            let list = |granted: bool| -> Vec<Value> {
                sessions
                    .iter()
                    .filter(|s| s.granted == granted)
                    .map(|s| session_json(s, now))
                    .collect()
            };
            json!({
                "name": key.name(),
                "key": id,
                "classid": key.classid(),
                "objid": key.objid(),
                "objsubid": key.objsubid(),
                "holders": list(true),
                "waiters": list(false),
            })
        })
        .collect();
    json!({ "locks": locks })
}

fn session_json(s: &LockHolder, now: SystemTime) -> Value {
    let seconds = s.since.map(|t| {
        let secs = now.duration_since(t).unwrap_or_default().as_secs_f64();
        // Milliseconds, as the text says them.
        (secs * 1000.0).round() / 1000.0
    });
    json!({
        "pid": s.pid,
        "mode": mode_name(s.mode),
        "granted": s.granted,
        "application_name": s.application_name,
        "user": s.user,
        "client_addr": s.client_addr.map(|a| a.to_string()),
        "client_port": s.client_port,
        "since": s.since.map(rfc3339),
        "seconds": seconds,
        "state": s.state,
        "query": s.query,
    })
}

/// `pglock man [COMMAND]`: the manual page, in roff, from the command line's definition.
pub(crate) fn man(command: Option<&str>) -> Result<u8, Fail> {
    let mut cmd = crate::args::command();
    cmd.build();
    let page = match command {
        None => cmd,
        Some(name) => {
            let sub = cmd.find_subcommand(name).cloned().ok_or_else(|| {
                Fail::usage(format!(
                    "no command {name:?}: pglock man takes run, key, lease, status, man or \
                     completions"
                ))
            })?;
            sub.name(format!("pglock-{name}"))
        }
    };
    clap_mangen::Man::new(page)
        .render(&mut std::io::stdout())
        .map_err(|e| Fail::internal(format!("cannot write the manual page: {e}")))?;
    Ok(0)
}
