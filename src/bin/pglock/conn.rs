//! Where to connect: `--dsn`, else `DATABASE_URL`, else libpq's `PG*` variables; and a
//! pool whose first connection is the one made (and checked) up front.

use std::sync::Mutex;
use std::time::Duration;

use pglock::postgres::config::TargetSessionAttrs;
use std::path::{Path, PathBuf};

use pglock::postgres::{self, Client, Config};
use pglock::r2d2::{self, ManageConnection};
use pglock::r2d2_postgres::PostgresConnectionManager;
use pglock::NetworkTimeout;
use postgres_openssl::MakeTlsConnector;

use crate::args::Conn;
use crate::fail::{describe_pg, Fail};
use crate::format::{truncate_at_char_boundary, APPLICATION_NAME_MAX};
use crate::libpq::{bad_setting, pgpass_lookup, quote, Settings};
use crate::tls::Tls;

/// How long a connection attempt may take when the settings do not say
/// (`connect_timeout`, `PGCONNECT_TIMEOUT`).
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The connection settings, and where they came from (for messages).
pub(crate) struct Target {
    pub(crate) config: Config,
    pub(crate) source: &'static str,
    /// `--network-timeout`, unless 0.
    network: Option<NetworkTimeout>,
    tls: Tls,
    connector: MakeTlsConnector,
    /// `application_name` from the settings (`PGAPPNAME`): it wins over pglock's own.
    application_name: Option<String>,
}

impl Target {
    /// From `--dsn`, else `DATABASE_URL`, with libpq's layers under it (a service file's
    /// entry, the `PG*` variables, the defaults: see libpq.rs); with `--network-timeout`
    /// set on the client's socket.
    pub(crate) fn from_env(conn: &Conn) -> Result<Target, Fail> {
        let (text, source) = match conn.dsn.as_deref() {
            Some(dsn) => (Some(dsn.to_owned()), "--dsn"),
            None => match std::env::var("DATABASE_URL") {
                Ok(url) if !url.is_empty() => (Some(url), "DATABASE_URL"),
                _ => (None, "the PG* environment variables"),
            },
        };
        let invalid = |why: String| match &text {
            Some(text) => Fail::usage(format!(
                "invalid connection string in {source} ({}): {why}",
                redact_dsn(text)
            )),
            None => Fail::usage(format!("invalid connection settings: {why}")),
        };
        let var = |name: &str| std::env::var(name).ok();
        let mut settings = Settings::resolve(text.as_deref(), &var).map_err(invalid)?;
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let tls = Tls::from_settings(&mut settings, home.as_deref())?;
        let explicit_target_session_attrs = settings.get("target_session_attrs").is_some();
        let application_name = settings.remove("application_name");
        let passfile = settings
            .remove("passfile")
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".pgpass")));
        settings.remove("service");
        let mut config = build_config(&settings).map_err(|e| match e {
            Built::Usage(fail) => fail,
            Built::Whole(why) => invalid(why),
        })?;
        config.ssl_mode(tls.ssl_mode());
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        }
        if config.get_password().is_none() {
            if let Some(password) = passfile.and_then(|file| password_from_file(&config, &file)) {
                config.password(password);
            }
        }
        // With several hosts, one may be a standby, where a lock excludes nobody on the
        // primary (and a lease cannot be written): ask for the primary unless the
        // settings choose otherwise.
        if config.get_hosts().len() > 1 && !explicit_target_session_attrs {
            config.target_session_attrs(TargetSessionAttrs::ReadWrite);
        }
        // The client's half on every connection; the server's half is sent once the
        // session is known to reach the server directly (a pooler refuses startup
        // options), in `connect`.
        let network =
            (!conn.network_timeout.is_zero()).then(|| NetworkTimeout::new(conn.network_timeout));
        if let Some(network) = network {
            network.client_only().apply(&mut config);
        }
        let connector = tls.connector()?;
        Ok(Target {
            config,
            source,
            network,
            tls,
            connector,
            application_name,
        })
    }

    /// The TLS connector of every connection, and of cancel requests.
    pub(crate) fn connector(&self) -> MakeTlsConnector {
        self.connector.clone()
    }

    /// Connects once, now, without a pool.
    fn client(&self, config: &Config) -> Result<Client, Fail> {
        config.connect(self.connector.clone()).map_err(|e| {
            let why = describe_pg(&e);
            let hint = self
                .tls
                .hint(&why)
                .map_or(String::new(), |h| format!(": {h}"));
            Fail::unavailable(format!(
                "cannot connect to {} (from {}): {why}{hint}",
                describe(config),
                self.source,
            ))
        })
    }

    /// `host=... port=... user=... dbname=...`: never the password.
    pub(crate) fn describe(&self) -> String {
        describe(&self.config)
    }

    /// Connects once, now, with `application_name` set: the connection the pool hands
    /// out first. A failure is "unavailable" (69). See [`Session`] for what is checked
    /// and set on the session.
    pub(crate) fn connect(
        &self,
        application_name: &str,
        session: Session<'_>,
    ) -> Result<Pool, Fail> {
        let mut config = self.config.clone();
        config.application_name(self.application_name.as_deref().unwrap_or(
            truncate_at_char_boundary(application_name, APPLICATION_NAME_MAX),
        ));
        let mut client = self.client(&config)?;
        if let Session::Advisory { name, direct } = session {
            check_advisory_session(&mut client, &config, name, direct)?;
        }
        // Settings for an advisory lock's session, made again on every connection the
        // pool makes later (a lock whose session ended reconnects): never for a lease or
        // `status`, which may go through a transaction-mode pooler that would hand session
        // settings on to other clients.
        let mut setup = Vec::new();
        if let Session::Advisory { .. } = session {
            // The server's half of --network-timeout: it ends the session, and frees the
            // lock, of a pglock it stopped hearing from (PostgreSQL 14 and later take the
            // whole batch; older ones refuse it and keep their TCP defaults).
            if let Some(network) = self.network {
                setup.push(network.server_sql());
            }
            // Where the server can (PostgreSQL 14 and later, on Linux), have it check
            // every second that pglock is still connected while a statement runs: a
            // pglock killed in the middle of its wait leaves no orphan waiter behind.
            // Elsewhere the setting is refused, and the server notices only when the
            // wait ends.
            setup.push("SET client_connection_check_interval = 1000".to_owned());
            // A role's or database's idle_session_timeout would end the session, and
            // with it the lock, while the command runs and pglock sends nothing
            // (PostgreSQL 14 and later; older servers refuse the setting, and have no
            // such timeout).
            setup.push("SET idle_session_timeout = 0".to_owned());
        }
        set_up(&mut client, &setup);
        let timeout = config
            .get_connect_timeout()
            .copied()
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let manager = FirstThenConnect {
            first: Mutex::new(Some(client)),
            inner: PostgresConnectionManager::new(config, self.connector.clone()),
            setup,
        };
        Ok(r2d2::Pool::builder()
            .max_size(1)
            .min_idle(Some(0))
            .connection_timeout(timeout.max(Duration::from_secs(1)))
            .build_unchecked(manager))
    }
}

/// What a connection is for, which decides what is checked and set on its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Session<'a> {
    /// A session advisory lock on the key of `name` (`None`: slot keys, no name to
    /// hash on the server). The session must be on a primary and not behind a pooler
    /// (unless `direct`), and gets the server's half of `--network-timeout`,
    /// `client_connection_check_interval = 1000` and `idle_session_timeout = 0`, as does
    /// every later connection of its pool.
    Advisory { name: Option<&'a str>, direct: bool },
    /// A lease: stateless statements that may go through a transaction-mode pooler,
    /// which would hand session settings on to other clients. Nothing is set.
    Lease,
    /// `pglock status`: no checks, nothing set (it may go through a pooler too).
    Inspect,
}

/// What the server says about an advisory lock's session, read in one statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SessionFacts {
    pub(crate) in_recovery: bool,
    /// `inet_server_port()`: the port the server's end of the connection is on; `None`
    /// over a Unix socket.
    pub(crate) server_port: Option<i32>,
    /// `pg_backend_pid()` in two separate statements.
    pub(crate) backend_pids: (i32, i32),
    pub(crate) server_encoding: String,
}

/// Why an advisory lock's session cannot be trusted, if it cannot: a standby, or a
/// pooler in between. `ports` are the ports pglock may have connected to.
pub(crate) fn refuse_session(facts: &SessionFacts, ports: &[u16], direct: bool) -> Option<String> {
    if facts.in_recovery {
        return Some(
            "the server is a standby in recovery (pg_is_in_recovery() is true): an advisory \
             lock there excludes nobody on the primary; connect to the primary (with several \
             hosts, pglock asks for target_session_attrs=read-write unless the connection \
             string sets it)"
                .to_owned(),
        );
    }
    if direct {
        return None;
    }
    let port_differs = facts
        .server_port
        .is_some_and(|p| !ports.iter().any(|&q| i32::from(q) == p));
    let pid_differs = facts.backend_pids.0 != facts.backend_pids.1;
    if !port_differs && !pid_differs {
        return None;
    }
    let why = if pid_differs {
        format!(
            "two statements ran in different server sessions (pg_backend_pid() {} then {})",
            facts.backend_pids.0, facts.backend_pids.1
        )
    } else {
        format!(
            "the server's end of the connection is on port {} (inet_server_port()), not the \
             port pglock connected to ({})",
            facts.server_port.unwrap_or_default(),
            ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(",")
        )
    };
    Some(format!(
        "the connection looks like it goes through a connection pooler: {why}. A session \
         advisory lock through a transaction-mode pooler (PgBouncer pool_mode=transaction) \
         excludes nobody and may be lost or stranded unnoticed; use --lease, which works \
         through poolers, or connect to the server directly. If the connection is direct \
         and only its port is mapped (NAT, a container's published port), or the pooler \
         is in session mode, pass --direct"
    ))
}

/// Reads the [`SessionFacts`] and refuses a standby or a pooler (69); warns when the
/// client's hash of a non-ASCII name may not be the server's.
fn check_advisory_session(
    client: &mut Client,
    config: &Config,
    name: Option<&str>,
    direct: bool,
) -> Result<(), Fail> {
    let fail = |e: postgres::Error| {
        Fail::unavailable(format!(
            "cannot check the session at {}: {}",
            describe(config),
            describe_pg(&e)
        ))
    };
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), inet_server_port(), pg_backend_pid(), \
             current_setting('server_encoding')",
            &[],
        )
        .map_err(fail)?;
    let second: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .map_err(fail)?
        .get(0);
    let facts = SessionFacts {
        in_recovery: row.get(0),
        server_port: row.get(1),
        backend_pids: (row.get(2), second),
        server_encoding: row.get(3),
    };
    let mut ports = config.get_ports().to_vec();
    if ports.is_empty() {
        ports.push(5432);
    }
    if let Some(why) = refuse_session(&facts, &ports, direct) {
        return Err(Fail::unavailable(format!(
            "refusing to lock through {}: {why}",
            describe(config)
        )));
    }
    if let Some(name) = name {
        if let Some(warning) = encoding_warning(name, &facts.server_encoding) {
            eprintln!("pglock: warning: {warning}");
        }
    }
    Ok(())
}

/// pglock hashes a name's UTF-8 bytes; the server's `hashtextextended(NAME, 0)` hashes
/// them in the database's encoding. They agree for ASCII names, and in UTF-8 databases.
pub(crate) fn encoding_warning(name: &str, server_encoding: &str) -> Option<String> {
    if name.is_ascii() || server_encoding.eq_ignore_ascii_case("UTF8") {
        return None;
    }
    Some(format!(
        "the database's encoding is {server_encoding}, not UTF8, and the name is not ASCII: \
         pglock's key hashes the name's UTF-8 bytes, so SQL's hashtextextended(name, 0) \
         in this database takes a different lock; lock by the 64-bit key instead \
         (`pglock key` prints it)"
    ))
}

/// The server's encoding, for `pglock key --dsn`.
pub(crate) fn server_encoding(target: &Target) -> Result<String, Fail> {
    let mut client = target.client(&target.config)?;
    client
        .query_one("SELECT current_setting('server_encoding')", &[])
        .map(|row| row.get(0))
        .map_err(|e| Fail::unavailable(describe_pg(&e)))
}

/// The pool of the CLI: one connection at a time.
pub(crate) type Pool = r2d2::Pool<FirstThenConnect>;

/// A connection manager that hands out a connection made beforehand, then connects
/// normally (when that one died).
pub(crate) struct FirstThenConnect {
    first: Mutex<Option<Client>>,
    inner: PostgresConnectionManager<MakeTlsConnector>,
    /// Sent on every later connection, as on the first.
    setup: Vec<String>,
}

/// Sends each setup statement on its own: a server that refuses one (too old) keeps the
/// others.
fn set_up(client: &mut Client, setup: &[String]) {
    for sql in setup {
        if let Err(e) = client.batch_execute(sql) {
            log::debug!("{sql}: {e}");
        }
    }
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
            None => {
                let mut client = self.inner.connect()?;
                set_up(&mut client, &self.setup);
                Ok(client)
            }
        }
    }

    fn is_valid(&self, conn: &mut Client) -> Result<(), postgres::Error> {
        self.inner.is_valid(conn)
    }

    fn has_broken(&self, conn: &mut Client) -> bool {
        self.inner.has_broken(conn)
    }
}

/// The settings, as the `postgres` crate's `Config` (which parses and checks each of
/// them): a setting from a service file or a variable that does not parse is named with
/// where it came from.
fn build_config(settings: &Settings) -> Result<Config, Built> {
    let mut text = String::new();
    for (key, value, from) in settings.iter() {
        let value = match key {
            // libpq: 0 or nothing waits forever, less than 2 s is 2 s.
            "connect_timeout" => match value.trim().parse::<u64>() {
                Ok(0) => continue,
                Ok(secs) => secs.max(2).to_string(),
                Err(_) => {
                    return Err(Built::Usage(bad_setting(
                        key,
                        from,
                        &format!("not a number of seconds: {value:?}"),
                    )))
                }
            },
            _ => value.to_owned(),
        };
        let pair = format!("{key}={} ", quote(&value));
        if *from != crate::libpq::From::ConnString {
            if let Err(e) = pair.parse::<Config>() {
                return Err(Built::Usage(bad_setting(key, from, &config_error(&e))));
            }
        }
        text += &pair;
    }
    text.parse::<Config>()
        .map_err(|e| Built::Whole(config_error(&e)))
}

/// A `Config` parse error without its "invalid connection string: " (the caller says
/// what was invalid, once).
fn config_error(e: &postgres::Error) -> String {
    let why = describe_pg(e);
    match why.strip_prefix("invalid connection string: ") {
        Some(rest) => rest.to_owned(),
        None => why,
    }
}

/// Why [`build_config`] failed.
enum Built {
    /// One setting, from outside the connection string.
    Usage(Fail),
    /// The whole: the connection string's fault.
    Whole(String),
}

/// The password file, as libpq reads it: ignored when group or others may read it (with
/// a warning), and when the settings name several hosts (a connection has one password
/// here).
fn password_from_file(config: &Config, path: &Path) -> Option<String> {
    let [host] = config.get_hosts() else {
        return None;
    };
    let host = match host {
        postgres::config::Host::Tcp(name) => name.clone(),
        // libpq matches a Unix socket against "localhost".
        postgres::config::Host::Unix(_) => "localhost".to_owned(),
    };
    let port = config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string();
    let user = config.get_user()?;
    let db = config.get_dbname().unwrap_or(user);
    let text = crate::libpq::password_file(path)?;
    pgpass_lookup(&text, [&host, &port, db, user])
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
/// user info and every `password` parameter, in URL or `key=value` form. A string that
/// is neither (as far as this can tell) is not shown at all: any of it could be a
/// password.
pub(crate) fn redact_dsn(dsn: &str) -> String {
    const HIDDEN: &str = "(not shown: not a URL or key=value string)";
    let trimmed = dsn.trim_start();
    let lower = trimmed.to_ascii_lowercase();
    if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
        redact_url(trimmed)
    } else if looks_like_key_values(dsn) {
        redact_key_values(dsn)
    } else {
        HIDDEN.to_owned()
    }
}

/// Whether every word of `dsn` is `key=value` with a plain key (letters, digits, `_`),
/// allowing spaces around `=` and quoted values.
fn looks_like_key_values(dsn: &str) -> bool {
    let redacted = redact_key_values(dsn);
    // Rebuild the pairs from the redacted text: each key must be plain and be followed
    // by '='.
    let chars: Vec<char> = redacted.chars().collect();
    let mut i = 0;
    let mut pairs = 0;
    while i < chars.len() {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        if i == chars.len() {
            break;
        }
        let start = i;
        while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
            i += 1;
        }
        if i == start {
            return false;
        }
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        if i == chars.len() || chars[i] != '=' {
            return false;
        }
        i += 1;
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        // The value.
        if i < chars.len() && chars[i] == '\'' {
            i += 1;
            while i < chars.len() && chars[i] != '\'' {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
        } else {
            while i < chars.len() && !chars[i].is_whitespace() {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
        }
        pairs += 1;
    }
    pairs > 0
}

/// `scheme://user:password@hosts/db?params`. The user info ends at the last `@` of the
/// whole string (a password may hold `/`, `?`, `@`): everything between the first `:`
/// after the scheme and that `@` is the password. Then every `password=` parameter.
fn redact_url(url: &str) -> String {
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    let (head, rest) = url.split_at(scheme_end);
    let (userinfo, tail) = match rest.rfind('@') {
        Some(at) => {
            let (userinfo, hosts) = rest.split_at(at);
            match userinfo.find(':') {
                Some(colon) => (format!("{}:***", &userinfo[..colon]), hosts),
                // No password in the user info; an '@' after a '?' is in a parameter.
                None if userinfo.contains('?') => (String::new(), rest),
                None => (userinfo.to_owned(), hosts),
            }
        }
        None => (String::new(), rest),
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
    format!("{head}{userinfo}{tail}")
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
    fn malformed_urls_lose_their_password_or_are_not_shown() {
        for (dsn, shown) in [
            ("postgres://u:pa/ss@h:x/db", "postgres://u:***@h:x/db"),
            ("postgres://u:pa?ss@h:x/db", "postgres://u:***@h:x/db"),
            ("POSTGRES://u:SECRET@h:x/db", "POSTGRES://u:***@h:x/db"),
            ("PostgreSQL://u:SECRET@h/db", "PostgreSQL://u:***@h/db"),
            ("postgres://u:a@b/c?d@h/db", "postgres://u:***@h/db"),
            (
                "postgres://h/db?password=SECRET@x",
                "postgres://h/db?password=***",
            ),
        ] {
            assert_eq!(redact_dsn(dsn), shown, "{dsn}");
        }
        for dsn in [
            "postgres:/u:SECRET@h/db",
            "postgres:u:SECRET@h/db",
            "postgre://u:SECRET@h/db",
            "u:SECRET@h/db",
            "host=h SECRET",
            "host=h :SECRET=x",
        ] {
            let shown = redact_dsn(dsn);
            assert!(!shown.contains("SECRET"), "{dsn}: {shown}");
            assert!(shown.starts_with("(not shown"), "{dsn}: {shown}");
        }
    }

    #[test]
    fn standbys_and_poolers_are_refused() {
        let direct = SessionFacts {
            in_recovery: false,
            server_port: Some(5432),
            backend_pids: (7, 7),
            server_encoding: "UTF8".into(),
        };
        assert_eq!(refuse_session(&direct, &[5432], false), None);
        assert_eq!(refuse_session(&direct, &[6432, 5432], false), None);
        let socket = SessionFacts {
            server_port: None,
            ..direct.clone()
        };
        assert_eq!(refuse_session(&socket, &[5432], false), None);
        let standby = SessionFacts {
            in_recovery: true,
            ..direct.clone()
        };
        assert!(refuse_session(&standby, &[5432], false)
            .unwrap()
            .contains("standby"));
        assert!(refuse_session(&standby, &[5432], true)
            .unwrap()
            .contains("standby"));
        let bouncer = refuse_session(&direct, &[6432], false).unwrap();
        assert!(
            bouncer.contains("pooler") && bouncer.contains("--lease"),
            "{bouncer}"
        );
        assert_eq!(refuse_session(&direct, &[6432], true), None, "--direct");
        let moved = SessionFacts {
            backend_pids: (7, 8),
            ..direct.clone()
        };
        assert!(refuse_session(&moved, &[5432], false)
            .unwrap()
            .contains("pg_backend_pid"));
    }

    #[test]
    fn only_non_ascii_names_in_other_encodings_are_warned_about() {
        assert_eq!(encoding_warning("café", "UTF8"), None);
        assert_eq!(encoding_warning("cafe", "LATIN1"), None);
        assert!(encoding_warning("café", "LATIN1").is_some());
        assert!(encoding_warning("café", "SQL_ASCII").is_some());
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
}
