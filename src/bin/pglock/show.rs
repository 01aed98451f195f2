//! `pglock key` and `pglock status`, and the formatting they share with `run`.

use crate::args::Conn;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pglock::inspect::{self, LockHolder};
use pglock::{LockKey, LockMode};

use crate::conn::{Session, Target};
use crate::{check_name, Fail};

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
        let key = crate::run::slot_key(name, slot);
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
            crate::describe_pg(&e)
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

/// One session, for `status` and `run`'s messages: pid, mode, application_name, client,
/// user, since.
fn holder_line(h: &LockHolder, now: SystemTime) -> String {
    let mut out = match h.pid {
        Some(pid) => format!("pid {pid}"),
        None => "a prepared transaction".to_owned(),
    };
    let _ = write!(out, " ({})", mode_name(h.mode));
    if let Some(app) = h.application_name.as_deref().filter(|a| !a.is_empty()) {
        let _ = write!(out, " application_name {}", json_string(app));
    }
    let _ = write!(out, " client {}", client(h));
    if let Some(user) = &h.user {
        let _ = write!(out, " user {user}");
    }
    match h.since {
        Some(since) => {
            let ago = now.duration_since(since).unwrap_or_default();
            let _ = write!(out, " since {} ({} ago)", rfc3339(since), secs(ago));
        }
        None => out.push_str(" since unknown"),
    }
    out
}

/// [`holder_line`] as of now.
pub(crate) fn holder_summary(h: &LockHolder) -> String {
    holder_line(h, SystemTime::now())
}

fn client(h: &LockHolder) -> String {
    match (h.client_addr, h.client_port) {
        (Some(addr), Some(port)) if port > 0 => format!("{addr}:{port}"),
        (Some(addr), _) => addr.to_string(),
        (None, Some(-1)) => "local socket".to_owned(),
        (None, _) => "unknown".to_owned(),
    }
}

fn mode_name(mode: LockMode) -> &'static str {
    match mode {
        LockMode::Shared => "shared",
        _ => "exclusive",
    }
}

fn status_json(groups: &[(LockKey, Vec<&LockHolder>)], now: SystemTime) -> String {
    let locks: Vec<String> = groups
        .iter()
        .map(|(key, sessions)| {
            let id = match (key.as_i64(), key.as_pair()) {
                (Some(k), _) => k.to_string(),
                (None, Some((a, b))) => format!("[{a},{b}]"),
                (None, None) => "null".to_owned(),
            };
            let list = |granted: bool| -> String {
                let items: Vec<String> = sessions
                    .iter()
                    .filter(|s| s.granted == granted)
                    .map(|s| session_json(s, now))
                    .collect();
                format!("[{}]", items.join(","))
            };
            format!(
                "{{\"name\":{},\"key\":{id},\"classid\":{},\"objid\":{},\"objsubid\":{},\
                 \"holders\":{},\"waiters\":{}}}",
                opt_json(key.name()),
                key.classid(),
                key.objid(),
                key.objsubid(),
                list(true),
                list(false)
            )
        })
        .collect();
    format!("{{\"locks\":[{}]}}", locks.join(","))
}

fn session_json(s: &LockHolder, now: SystemTime) -> String {
    let pid = s.pid.map_or("null".to_owned(), |p| p.to_string());
    let since = s.since.map(rfc3339);
    let ago = s.since.map(|t| {
        format!(
            "{:.3}",
            now.duration_since(t).unwrap_or_default().as_secs_f64()
        )
    });
    format!(
        "{{\"pid\":{pid},\"mode\":\"{}\",\"granted\":{},\"application_name\":{},\"user\":{},\
         \"client_addr\":{},\"client_port\":{},\"since\":{},\"seconds\":{},\"state\":{},\
         \"query\":{}}}",
        mode_name(s.mode),
        s.granted,
        opt_json(s.application_name.as_deref()),
        opt_json(s.user.as_deref()),
        opt_json(s.client_addr.map(|a| a.to_string()).as_deref()),
        s.client_port.map_or("null".to_owned(), |p| p.to_string()),
        opt_json(since.as_deref()),
        ago.unwrap_or_else(|| "null".to_owned()),
        opt_json(s.state.as_deref()),
        opt_json(s.query.as_deref()),
    )
}

fn opt_json(s: Option<&str>) -> String {
    s.map_or("null".to_owned(), json_string)
}

/// A JSON string literal (RFC 8259): quotes, backslashes and control characters escaped.
pub(crate) fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A SQL string literal on one line: single quotes doubled; with an `E` prefix and
/// backslash escapes when the text holds a backslash or a control character, so that
/// it means the same whatever `standard_conforming_strings` says.
fn sql_literal(s: &str) -> String {
    if !s.chars().any(|c| c == '\\' || c.is_control()) {
        return format!("'{}'", s.replace('\'', "''"));
    }
    let mut out = String::from("E'");
    for c in s.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// `1.234 s`.
pub(crate) fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

/// `2026-11-30T22:25:01.123Z`.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(951_782_400_123); // a leap day
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00.123Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_798_761_599);
        assert_eq!(rfc3339(t), "2026-12-31T23:59:59.000Z");
    }

    #[test]
    fn json_strings_escape_what_they_must() {
        assert_eq!(json_string("a\"b\\c\n\u{1}é"), "\"a\\\"b\\\\c\\n\\u0001é\"");
    }

    #[test]
    fn sql_literals_cannot_be_escaped_from() {
        assert_eq!(
            sql_literal("it's; DROP TABLE x; --"),
            "'it''s; DROP TABLE x; --'"
        );
        assert_eq!(sql_literal("a\\'b"), "E'a\\\\''b'");
        assert_eq!(sql_literal("a\nb\u{1}"), "E'a\\nb\\u0001'");
    }
}
