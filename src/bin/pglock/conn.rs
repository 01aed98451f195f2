//! Where to connect: `--dsn`, else `DATABASE_URL`, else libpq's `PG*` variables; and a
//! pool whose first connection is the one made (and checked) up front.

use std::sync::Mutex;
use std::time::Duration;

use pglock::postgres::{self, Client, Config, NoTls};
use pglock::r2d2::{self, ManageConnection};
use pglock::r2d2_postgres::PostgresConnectionManager;

use crate::Fail;

/// How long a connection attempt may take when the settings do not say
/// (`connect_timeout` in the DSN, `PGCONNECT_TIMEOUT`).
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The connection settings, and where they came from (for messages).
pub(crate) struct Target {
    pub(crate) config: Config,
    pub(crate) source: &'static str,
}

impl Target {
    /// From `--dsn`, else `DATABASE_URL`, else the `PG*` variables.
    pub(crate) fn from_env(dsn: Option<&str>) -> Result<Target, Fail> {
        let (text, source) = match dsn {
            Some(dsn) => (Some(dsn.to_owned()), "--dsn"),
            None => match std::env::var("DATABASE_URL") {
                Ok(url) if !url.is_empty() => (Some(url), "DATABASE_URL"),
                _ => (None, "the PG* environment variables"),
            },
        };
        let mut config = match text {
            Some(text) => text.parse::<Config>().map_err(|e| {
                Fail::usage(format!(
                    "invalid connection string in {source} ({}): {}",
                    redact_dsn(&text),
                    crate::describe_pg(&e)
                ))
            })?,
            None => config_from_pg_env(|name| std::env::var(name).ok())?,
        };
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        }
        Ok(Target { config, source })
    }

    /// `host=... port=... user=... dbname=...`: never the password.
    pub(crate) fn describe(&self) -> String {
        describe(&self.config)
    }

    /// Connects once, now, with `application_name` set: the connection the pool hands
    /// out first. A failure is "unavailable" (69). With `session_settings`, it also sets
    /// `client_connection_check_interval` for the session: never for leases, whose
    /// connection may go through a transaction-mode pooler that would hand the setting
    /// on to other clients.
    pub(crate) fn connect(
        &self,
        application_name: &str,
        session_settings: bool,
    ) -> Result<Pool, Fail> {
        let mut config = self.config.clone();
        config.application_name(application_name);
        let mut client = config.connect(NoTls).map_err(|e| {
            Fail::unavailable(format!(
                "cannot connect to {} (from {}): {}",
                describe(&config),
                self.source,
                crate::describe_pg(&e)
            ))
        })?;
        // Where the server can (PostgreSQL 14 and later, on Linux), have it check every
        // second that pglock is still connected while a statement runs: a pglock killed
        // in the middle of its wait leaves no orphan waiter behind. Elsewhere the
        // setting is refused, and the server notices only when the wait ends.
        if session_settings {
            if let Err(e) = client.batch_execute("SET client_connection_check_interval = 1000") {
                let _ = e; // refused: an older server, or not Linux
            }
        }
        let timeout = config
            .get_connect_timeout()
            .copied()
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let manager = FirstThenConnect {
            first: Mutex::new(Some(client)),
            inner: PostgresConnectionManager::new(config, NoTls),
        };
        Ok(r2d2::Pool::builder()
            .max_size(1)
            .min_idle(Some(0))
            .connection_timeout(timeout.max(Duration::from_secs(1)))
            .build_unchecked(manager))
    }
}

/// The pool of the CLI: one connection at a time.
pub(crate) type Pool = r2d2::Pool<FirstThenConnect>;

/// A connection manager that hands out a connection made beforehand, then connects
/// normally (when that one died).
pub(crate) struct FirstThenConnect {
    first: Mutex<Option<Client>>,
    inner: PostgresConnectionManager<NoTls>,
}

impl std::fmt::Debug for FirstThenConnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FirstThenConnect").finish_non_exhaustive()
    }
}

impl ManageConnection for FirstThenConnect {
    type Connection = Client;
    type Error = postgres::Error;

    fn connect(&self) -> Result<Client, postgres::Error> {
        let first = self.first.lock().ok().and_then(|mut f| f.take());
        match first {
            Some(client) => Ok(client),
            None => self.inner.connect(),
        }
    }

    fn is_valid(&self, conn: &mut Client) -> Result<(), postgres::Error> {
        self.inner.is_valid(conn)
    }

    fn has_broken(&self, conn: &mut Client) -> bool {
        self.inner.has_broken(conn)
    }
}

/// libpq's variables, as far as they apply: `PGHOST` (a comma-separated list; default
/// `localhost`), `PGPORT`, `PGUSER` (default: `USER`, else `LOGNAME`), `PGDATABASE`,
/// `PGPASSWORD`, `PGCONNECT_TIMEOUT`.
pub(crate) fn config_from_pg_env(var: impl Fn(&str) -> Option<String>) -> Result<Config, Fail> {
    let var = |name: &str| var(name).filter(|v| !v.is_empty());
    let mut config = Config::new();
    match var("PGHOST") {
        Some(hosts) => {
            for host in hosts.split(',') {
                config.host(host.trim());
            }
        }
        None => {
            config.host("localhost");
        }
    }
    if let Some(port) = var("PGPORT") {
        let port = port
            .trim()
            .parse::<u16>()
            .map_err(|_| Fail::usage(format!("PGPORT is not a port number: {port:?}")))?;
        config.port(port);
    }
    if let Some(user) = var("PGUSER")
        .or_else(|| var("USER"))
        .or_else(|| var("LOGNAME"))
    {
        config.user(&user);
    }
    if let Some(db) = var("PGDATABASE") {
        config.dbname(&db);
    }
    if let Some(password) = var("PGPASSWORD") {
        config.password(password);
    }
    if let Some(secs) = var("PGCONNECT_TIMEOUT") {
        let secs = secs.trim().parse::<u64>().map_err(|_| {
            Fail::usage(format!(
                "PGCONNECT_TIMEOUT is not a number of seconds: {secs:?}"
            ))
        })?;
        if secs > 0 {
            config.connect_timeout(Duration::from_secs(secs.max(2)));
        }
    }
    Ok(config)
}

/// `host=a,b port=5432 user=u dbname=d`, from the settings: never the password.
pub(crate) fn describe(config: &Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            postgres::config::Host::Tcp(name) => name.clone(),
            postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let ports: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
    let mut out = format!(
        "host={}",
        if hosts.is_empty() {
            "(none)".to_owned()
        } else {
            hosts.join(",")
        }
    );
    if !ports.is_empty() {
        out += &format!(" port={}", ports.join(","));
    }
    if let Some(user) = config.get_user() {
        out += &format!(" user={user}");
    }
    if let Some(db) = config.get_dbname() {
        out += &format!(" dbname={db}");
    }
    out
}

/// The connection string with its password replaced by `***`: the password of a URL's
/// user info and every `password` parameter, in URL or `key=value` form.
pub(crate) fn redact_dsn(dsn: &str) -> String {
    let trimmed = dsn.trim_start();
    if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
        redact_url(dsn)
    } else {
        redact_key_values(dsn)
    }
}

fn redact_url(url: &str) -> String {
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    let (head, rest) = url.split_at(scheme_end);
    // The authority ends at the first '/' or '?'; its user info at its last '@'.
    let auth_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(auth_end);
    let authority = match authority.rfind('@') {
        Some(at) => {
            let (userinfo, hosts) = authority.split_at(at);
            match userinfo.find(':') {
                Some(colon) => format!("{}:***{hosts}", &userinfo[..colon]),
                None => authority.to_owned(),
            }
        }
        None => authority.to_owned(),
    };
    let tail = match tail.find('?') {
        Some(q) => {
            let (path, query) = tail.split_at(q + 1);
            let params: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => p.to_owned(),
                })
                .collect();
            format!("{path}{}", params.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{head}{authority}{tail}")
}

/// `key=value key='quoted \' value'`: every `password` value becomes `***`.
fn redact_key_values(dsn: &str) -> String {
    let chars: Vec<char> = dsn.chars().collect();
    let mut out = String::with_capacity(dsn.len());
    let mut i = 0;
    while i < chars.len() {
        // Whitespace between pairs.
        if chars[i].is_whitespace() {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        // The key.
        let start = i;
        while i < chars.len() && chars[i] != '=' && !chars[i].is_whitespace() {
            i += 1;
        }
        let key: String = chars[start..i].iter().collect();
        out.push_str(&key);
        // Spaces, '=', spaces.
        while i < chars.len() && (chars[i].is_whitespace() || chars[i] == '=') {
            out.push(chars[i]);
            i += 1;
        }
        // The value: quoted with backslash escapes, or up to the next whitespace.
        let vstart = i;
        if i < chars.len() && chars[i] == '\'' {
            i += 1;
            while i < chars.len() && chars[i] != '\'' {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i = (i + 1).min(chars.len());
        } else {
            while i < chars.len() && !chars[i].is_whitespace() {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i = i.min(chars.len());
        }
        if key.eq_ignore_ascii_case("password") {
            out.push_str("***");
        } else {
            out.extend(&chars[vstart..i]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_password() {
        assert_eq!(
            redact_dsn("postgres://alice:s3cret@db.example:5432/app?sslmode=disable"),
            "postgres://alice:***@db.example:5432/app?sslmode=disable"
        );
        assert_eq!(
            redact_dsn("postgresql://alice:p@ss@word@db/app"),
            "postgresql://alice:***@db/app"
        );
        assert_eq!(
            redact_dsn("postgres://db/app?user=a&password=s3cret&x=1"),
            "postgres://db/app?user=a&password=***&x=1"
        );
        assert_eq!(
            redact_dsn("postgres://alice@db/app"),
            "postgres://alice@db/app"
        );
    }

    #[test]
    fn key_values_lose_their_password() {
        assert_eq!(
            redact_dsn("host=db user=alice password=s3cret dbname=app"),
            "host=db user=alice password=*** dbname=app"
        );
        assert_eq!(
            redact_dsn("host=db password = 'it\\'s s3cret' port=1"),
            "host=db password = *** port=1"
        );
        assert_eq!(redact_dsn("password=s3cret"), "password=***");
        assert!(!redact_dsn("host=x password='unterminated s3cret").contains("s3cret"));
    }

    #[test]
    fn descriptions_never_show_the_password() {
        let config: Config = "host=db user=alice password=s3cret dbname=app port=6543"
            .parse()
            .unwrap();
        assert_eq!(describe(&config), "host=db port=6543 user=alice dbname=app");
    }

    #[test]
    fn pg_variables_build_the_config() {
        let env = |name: &str| {
            match name {
                "PGHOST" => Some("h1,h2"),
                "PGPORT" => Some("6000"),
                "PGUSER" => Some("bob"),
                "PGDATABASE" => Some("jobs"),
                "PGPASSWORD" => Some("pw"),
                "PGCONNECT_TIMEOUT" => Some("3"),
                _ => None,
            }
            .map(str::to_owned)
        };
        let config = config_from_pg_env(env).unwrap();
        assert_eq!(
            describe(&config),
            "host=h1,h2 port=6000 user=bob dbname=jobs"
        );
        assert_eq!(config.get_password(), Some(&b"pw"[..]));
        assert_eq!(config.get_connect_timeout(), Some(&Duration::from_secs(3)));

        let defaults = config_from_pg_env(|name| (name == "USER").then(|| "carol".to_owned()));
        assert_eq!(describe(&defaults.unwrap()), "host=localhost user=carol");

        let bad = config_from_pg_env(|name| (name == "PGPORT").then(|| "x".to_owned()));
        assert_eq!(bad.err().map(|f| f.code), Some(crate::EX_USAGE));
    }
}
