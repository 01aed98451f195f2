//! Formatting shared by the commands: durations, timestamps, JSON, SQL literals, a
//! lock holder's line, the session's `application_name`. Pure functions: no I/O, no
//! import of pglock's other modules.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pglock::inspect::LockHolder;
use pglock::{LockKey, LockMode};

/// PostgreSQL's limit for `application_name` (NAMEDATALEN - 1 bytes).
pub(crate) const APPLICATION_NAME_MAX: usize = 63;

/// A JSON string literal (RFC 8259), by serde_json.
pub(crate) fn json_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// One session, for `status` and `run`'s messages: pid, mode, application_name, client,
/// user, since.
pub(crate) fn holder_line(h: &LockHolder, now: SystemTime) -> String {
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

pub(crate) fn client(h: &LockHolder) -> String {
    match (h.client_addr, h.client_port) {
        (Some(addr), Some(port)) if port > 0 => format!("{addr}:{port}"),
        (Some(addr), _) => addr.to_string(),
        (None, Some(-1)) => "local socket".to_owned(),
        (None, _) => "unknown".to_owned(),
    }
}

pub(crate) fn mode_name(mode: LockMode) -> &'static str {
    match mode {
        LockMode::Shared => "shared",
        _ => "exclusive",
    }
}

/// A SQL string literal on one line: single quotes doubled; with an `E` prefix and
/// backslash escapes when the text holds a backslash or a control character, so that
/// it means the same whatever `standard_conforming_strings` says.
pub(crate) fn sql_literal(s: &str) -> String {
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

/// `PGLOCK_KEY`: the 64-bit key, as `pglock key` and the README print it.
pub(crate) fn key_value(key: &LockKey) -> String {
    match (key.as_i64(), key.as_pair()) {
        (Some(k), _) => k.to_string(),
        (None, Some((a, b))) => format!("{a},{b}"),
        (None, None) => String::new(),
    }
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
}
