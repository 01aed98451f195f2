//! libpq's connection settings, as `psql` reads them: a connection string (URL or
//! `key=value`), a service file entry, the `PG*` environment variables, defaults.
//!
//! Precedence is libpq's (PostgreSQL's documentation, "The Connection Service File": "a
//! service file setting overrides the corresponding environment variable, and in turn can
//! be overridden by a value given directly in the connection string"): the connection
//! string, then the service's entry, then the environment, then the defaults. Each
//! setting keeps where it came from, for messages. Pure functions of the text, the
//! variables and the files they name: the caller passes the environment in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::fail::Fail;

/// libpq's keywords that pglock reads, and their environment variables.
pub(crate) const ENV: &[(&str, &str)] = &[
    ("host", "PGHOST"),
    ("hostaddr", "PGHOSTADDR"),
    ("port", "PGPORT"),
    ("dbname", "PGDATABASE"),
    ("user", "PGUSER"),
    ("password", "PGPASSWORD"),
    ("passfile", "PGPASSFILE"),
    ("service", "PGSERVICE"),
    ("options", "PGOPTIONS"),
    ("application_name", "PGAPPNAME"),
    ("connect_timeout", "PGCONNECT_TIMEOUT"),
    ("sslmode", "PGSSLMODE"),
    ("sslrootcert", "PGSSLROOTCERT"),
    ("sslcert", "PGSSLCERT"),
    ("sslkey", "PGSSLKEY"),
    ("target_session_attrs", "PGTARGETSESSIONATTRS"),
    ("channel_binding", "PGCHANNELBINDING"),
    ("load_balance_hosts", "PGLOADBALANCEHOSTS"),
];

/// Where a setting came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum From {
    /// The connection string (`--dsn` or `DATABASE_URL`).
    ConnString,
    /// The service file's entry.
    Service(PathBuf),
    /// An environment variable.
    Env(&'static str),
    /// pglock's default.
    Default,
}

impl std::fmt::Display for From {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            From::ConnString => f.write_str("the connection string"),
            From::Service(path) => write!(f, "the service file {}", path.display()),
            From::Env(var) => f.write_str(var),
            From::Default => f.write_str("the default"),
        }
    }
}

/// The settings: libpq keyword to value, and where each came from.
#[derive(Debug, Default, Clone)]
pub(crate) struct Settings {
    values: BTreeMap<String, (String, From)>,
}

impl Settings {
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(|(v, _)| v.as_str())
    }

    pub(crate) fn source(&self, key: &str) -> Option<&From> {
        self.values.get(key).map(|(_, s)| s)
    }

    /// Sets `key` unless it is set already (an earlier layer wins).
    pub(crate) fn fill(&mut self, key: &str, value: String, from: From) {
        self.values.entry(key.to_owned()).or_insert((value, from));
    }

    pub(crate) fn remove(&mut self, key: &str) -> Option<String> {
        self.values.remove(key).map(|(v, _)| v)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &str, &From)> {
        self.values
            .iter()
            .map(|(k, (v, s))| (k.as_str(), v.as_str(), s))
    }

    /// libpq's layers: `conn_string`, else the service's entry (`service` there or
    /// `PGSERVICE`), else the `PG*` variables, else the defaults (`user` from `USER`).
    pub(crate) fn resolve(
        conn_string: Option<&str>,
        var: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Settings, String> {
        let var = |name: &str| var(name).filter(|v| !v.is_empty());
        let mut settings = Settings::default();
        if let Some(text) = conn_string {
            for (k, v) in parse_conn_string(text)? {
                settings.values.insert(k, (v, From::ConnString));
            }
        }
        let service = settings
            .get("service")
            .map(str::to_owned)
            .or_else(|| var("PGSERVICE"));
        if let Some(service) = service {
            let (path, entry) = find_service(&service, &var)?;
            for (k, v) in entry {
                settings.fill(&k, v, From::Service(path.clone()));
            }
        }
        for (key, env) in ENV {
            if let Some(value) = var(env) {
                settings.fill(key, value, From::Env(env));
            }
        }
        if let Some(user) = var("USER").or_else(|| var("LOGNAME")) {
            settings.fill("user", user, From::Default);
        }
        settings.fill("host", "localhost".to_owned(), From::Default);
        Ok(settings)
    }
}

/// The service files, in libpq's order: `PGSERVICEFILE` (else `~/.pg_service.conf`),
/// then `PGSYSCONFDIR/pg_service.conf` (else Debian's
/// `/etc/postgresql-common/pg_service.conf`). The first file with the service wins.
fn find_service(
    service: &str,
    var: &dyn Fn(&str) -> Option<String>,
) -> Result<(PathBuf, Vec<(String, String)>), String> {
    let user = match var("PGSERVICEFILE") {
        Some(file) => Some(PathBuf::from(file)),
        None => var("HOME").map(|home| Path::new(&home).join(".pg_service.conf")),
    };
    let system =
        Path::new(&var("PGSYSCONFDIR").unwrap_or_else(|| "/etc/postgresql-common".to_owned()))
            .join("pg_service.conf");
    for path in user.into_iter().chain([system]) {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        if let Some(entry) = service_entry(&text, service)
            .map_err(|e| format!("service file {}: {e}", path.display()))?
        {
            return Ok((path, entry));
        }
    }
    Err(format!(
        "definition of service {service:?} not found (looked in PGSERVICEFILE or \
         ~/.pg_service.conf, then PGSYSCONFDIR/pg_service.conf)"
    ))
}

/// The `key=value` lines of `[service]` in a service file (`#` comments, blank lines).
pub(crate) fn service_entry(
    text: &str,
    service: &str,
) -> Result<Option<Vec<(String, String)>>, String> {
    let mut inside = false;
    let mut found = None::<Vec<(String, String)>>;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            if found.is_some() {
                break;
            }
            inside = name == service;
            if inside {
                found = Some(Vec::new());
            }
            continue;
        }
        if !inside {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!("syntax error in line {}", n + 1));
        };
        let key = key.trim();
        if key == "service" {
            return Err(format!("nested service specifications in line {}", n + 1));
        }
        if let Some(entry) = found.as_mut() {
            entry.push((key.to_owned(), value.trim().to_owned()));
        }
    }
    Ok(found)
}

/// A connection string: a `postgres://` / `postgresql://` URL, or `key=value` pairs.
pub(crate) fn parse_conn_string(text: &str) -> Result<Vec<(String, String)>, String> {
    let trimmed = text.trim();
    let lower = trimmed.to_ascii_lowercase();
    for scheme in ["postgresql://", "postgres://"] {
        if lower.starts_with(scheme) {
            return parse_url(&trimmed[scheme.len()..]);
        }
    }
    parse_key_values(trimmed)
}

/// `key=value key = 'quoted \' value'`, as libpq reads it.
fn parse_key_values(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            // Not the key itself: it may be a password pasted on its own.
            return Err(format!("missing \"=\" after key number {}", out.len() + 1));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => {
                        return Err(format!(
                            "unterminated quoted value of key number {}",
                            out.len() + 1
                        ))
                    }
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
}

/// The rest of a URL after its scheme: `[user[:password]@][host[:port][,...]][/dbname]
/// [?key=value&...]`, percent-decoded.
fn parse_url(rest: &str) -> Result<Vec<(String, String)>, String> {
    let (main, query) = match rest.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match main.find('/') {
        Some(i) => (&main[..i], Some(&main[i + 1..])),
        None => (main, None),
    };
    let mut out = Vec::new();
    let hosts = match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.split_once(':') {
                Some((user, password)) => {
                    out.push(("user".to_owned(), decode(user)?));
                    out.push(("password".to_owned(), decode(password)?));
                }
                None if !userinfo.is_empty() => out.push(("user".to_owned(), decode(userinfo)?)),
                None => {}
            }
            &authority[at + 1..]
        }
        None => authority,
    };
    let (mut host_list, mut port_list) = (Vec::new(), Vec::new());
    for spec in hosts.split(',').filter(|s| !s.is_empty()) {
        let (host, port) = if let Some(v6) = spec.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| "unterminated IPv6 address in the URL".to_owned())?;
            (host.to_owned(), after.strip_prefix(':'))
        } else {
            match spec.rsplit_once(':') {
                Some((h, p)) => (decode(h)?, Some(p)),
                None => (decode(spec)?, None),
            }
        };
        host_list.push(host);
        port_list.push(port.unwrap_or("").to_owned());
    }
    if !host_list.is_empty() {
        out.push(("host".to_owned(), host_list.join(",")));
    }
    if port_list.iter().any(|p| !p.is_empty()) {
        out.push(("port".to_owned(), port_list.join(",")));
    }
    if let Some(db) = path.filter(|p| !p.is_empty()) {
        out.push(("dbname".to_owned(), decode(db)?));
    }
    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        if pair.is_empty() {
            continue;
        }
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| "missing \"=\" in a URL parameter".to_owned())?;
        let k = decode(k)?;
        // libpq's aliases of URL parameters.
        let k = match k.as_str() {
            "ssl" if v == "true" => {
                out.push(("sslmode".to_owned(), "require".to_owned()));
                continue;
            }
            _ => k,
        };
        out.retain(|(key, _)| *key != k);
        out.push((k, decode(v)?));
    }
    Ok(out)
}

/// Percent-decoding (`%2F` is `/`), as UTF-8.
fn decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "invalid percent-encoding in the URL".to_owned())?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "a percent-encoded value is not UTF-8".to_owned())
}

/// `value` quoted for a `key=value` string (`'...'` with `\` escapes).
pub(crate) fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// libpq's password file (`passfile`, else `PGPASSFILE`'s, else `~/.pgpass`): `None`
/// when it is missing or not a file; a warning and `None` when group or others may read
/// it, as libpq does.
pub(crate) fn password_file(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() {
        return None;
    }
    if meta.permissions().mode() & 0o077 != 0 {
        eprintln!(
            "pglock: warning: password file {} has group or world access; permissions \
             should be u=rw (0600) or less; not read",
            path.display()
        );
        return None;
    }
    std::fs::read_to_string(path).ok()
}

/// The password of the first line of a `.pgpass` file that matches `host:port:db:user`
/// (`*` matches anything; `\:` and `\\` are a literal `:` and `\`; `#` starts a comment
/// line).
pub(crate) fn pgpass_lookup(text: &str, wanted: [&str; 4]) -> Option<String> {
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let mut fields: Vec<String> = vec![String::new()];
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(next) = chars.next() {
                        fields.last_mut()?.push(next);
                    }
                }
                ':' if fields.len() < 5 => fields.push(String::new()),
                c => fields.last_mut()?.push(c),
            }
        }
        if fields.len() != 5 {
            continue;
        }
        let matches = fields[..4]
            .iter()
            .zip(wanted)
            .all(|(field, want)| field == "*" || field == want);
        if matches {
            return fields.pop();
        }
    }
    None
}

/// A usage failure for a setting that does not parse, naming where it came from.
pub(crate) fn bad_setting(key: &str, from: &From, why: &str) -> Fail {
    Fail::usage(format!("invalid {key} (from {from}): {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn key_values_parse_like_libpq() {
        let kv =
            parse_conn_string("host=db  port = 5433 password='it\\'s x' dbname=a\\ b").unwrap();
        assert_eq!(
            kv,
            [
                ("host".to_owned(), "db".to_owned()),
                ("port".to_owned(), "5433".to_owned()),
                ("password".to_owned(), "it's x".to_owned()),
                ("dbname".to_owned(), "a b".to_owned()),
            ]
        );
        assert!(parse_conn_string("host").is_err());
        assert!(parse_conn_string("password='open").is_err());
    }

    #[test]
    fn urls_parse_like_libpq() {
        let kv: BTreeMap<_, _> = parse_conn_string(
            "postgresql://al%40ice:p%3Aw@h1:5433,[::1],h3:6000/my%20db?sslmode=verify-full&sslrootcert=/x.crt",
        )
        .unwrap()
        .into_iter()
        .collect();
        assert_eq!(kv["user"], "al@ice");
        assert_eq!(kv["password"], "p:w");
        assert_eq!(kv["host"], "h1,::1,h3");
        assert_eq!(kv["port"], "5433,,6000");
        assert_eq!(kv["dbname"], "my db");
        assert_eq!(kv["sslmode"], "verify-full");
        assert_eq!(kv["sslrootcert"], "/x.crt");
        let kv = parse_conn_string("postgres://%2Fvar%2Frun%2Fpostgresql/db").unwrap();
        assert_eq!(kv[0], ("host".to_owned(), "/var/run/postgresql".to_owned()));
    }

    #[test]
    fn the_connection_string_beats_the_service_which_beats_the_environment() {
        let dir = std::env::temp_dir().join(format!("pglock-libpq-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("services");
        std::fs::write(
            &file,
            "# comment\n[other]\nhost=nope\n[jobs]\nhost=svc-host\nport=7000\ndbname=svc-db\n",
        )
        .unwrap();
        let file_s = file.display().to_string();
        let vars = [
            ("PGSERVICEFILE", file_s.as_str()),
            ("PGSERVICE", "jobs"),
            ("PGPORT", "6000"),
            ("PGUSER", "env-user"),
            ("PGHOST", "env-host"),
            ("USER", "os-user"),
        ];
        let s = Settings::resolve(Some("host=cs-host"), &env(&vars)).unwrap();
        assert_eq!(s.get("host"), Some("cs-host"));
        assert_eq!(s.get("port"), Some("7000"));
        assert_eq!(s.source("port"), Some(&From::Service(file.clone())));
        assert_eq!(s.get("dbname"), Some("svc-db"));
        assert_eq!(s.get("user"), Some("env-user"));
        let s = Settings::resolve(None, &env(&[("USER", "os-user")])).unwrap();
        assert_eq!(s.get("user"), Some("os-user"));
        assert_eq!(s.get("host"), Some("localhost"));
        let missing = Settings::resolve(Some("service=absent"), &env(&vars));
        assert!(missing.unwrap_err().contains("\"absent\" not found"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn service_entries_end_at_the_next_section() {
        let text = "[a]\nhost=x\n\n[b]\nhost=y\nport = 1\n[c]\nhost=z\n";
        let b = service_entry(text, "b").unwrap().unwrap();
        assert_eq!(
            b,
            [
                ("host".to_owned(), "y".to_owned()),
                ("port".to_owned(), "1".to_owned())
            ]
        );
        assert_eq!(service_entry(text, "d").unwrap(), None);
        assert!(service_entry("[a]\nnonsense\n", "a").is_err());
    }

    #[test]
    fn pgpass_lines_match_like_libpq() {
        let text = "# comment\n\
                    db.example:5432:app:alice:first\n\
                    *:*:*:bob:b\\:pw\\\\x\n\
                    short:line\n\
                    *:*:*:*:fallback:with:colons\n";
        let find = |w: [&str; 4]| pgpass_lookup(text, w);
        assert_eq!(
            find(["db.example", "5432", "app", "alice"]).as_deref(),
            Some("first")
        );
        assert_eq!(find(["h", "1", "d", "bob"]).as_deref(), Some("b:pw\\x"));
        assert_eq!(
            find(["db.example", "5433", "app", "alice"]).as_deref(),
            Some("fallback:with:colons")
        );
        assert_eq!(pgpass_lookup("h:1:d:u:p", ["h", "1", "d", "v"]), None);
    }

    #[test]
    fn quoted_values_survive_a_round_trip() {
        let v = "it's a \\ test";
        let kv = parse_conn_string(&format!("password={}", quote(v))).unwrap();
        assert_eq!(kv[0].1, v);
    }
}
