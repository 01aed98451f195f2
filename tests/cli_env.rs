//! The `pglock` command connects where `psql` does, with the same settings: libpq's
//! `PG*` variables, password and service files, and TLS (`sslmode`, `sslrootcert`), each
//! pinned by a run against the real server. `ci/with-postgres` provides the server, its
//! TLS certificate (`PGLOCK_TLS_CERT`), a role that needs a password (`PGLOCK_PW_ROLE`)
//! and a hot standby (`STANDBY_URL`).
//!
//! Every run starts from an empty environment (only `PATH`, and `HOME` set to a folder
//! of the test's own), so nothing of the caller's libpq settings leaks in.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::admin;
use pglock::LockKey;

const BIN: &str = env!("CARGO_BIN_EXE_pglock");

/// The server's port, from `DATABASE_URL`.
fn port() -> String {
    common::config()
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string()
}

/// A folder of the test's own, emptied: its `HOME`.
fn home(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pglock-cli-env-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `pglock` with nothing but `PATH` and `HOME` in its environment.
fn bare(home: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home);
    cmd
}

/// `bare` with the server's host, port, user and database in `PG*` variables.
fn pg_env(home: &Path) -> Command {
    let mut cmd = bare(home);
    cmd.env("PGHOST", "127.0.0.1")
        .env("PGPORT", port())
        .env("PGUSER", "postgres")
        .env("PGDATABASE", "postgres");
    cmd
}

fn run(cmd: &mut Command, name: &str) -> Output {
    cmd.args(["run", name, "--", "true"])
        .output()
        .expect("run pglock")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// What the server says about the session that holds `name`'s lock while `pglock run`
/// holds it: (application_name, ssl, database, user).
fn session_of(cmd: &mut Command, name: &str) -> (String, bool, String, String) {
    let mut child = cmd
        .args(["run", name, "-c", "echo ready; read x"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    if line.trim() != "ready" {
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        panic!("pglock did not start the command: {err}");
    }
    let key = LockKey::from_name(name);
    let row = admin()
        .query_one(
            "SELECT a.application_name, s.ssl, a.datname::text, a.usename::text \
             FROM pg_locks l JOIN pg_stat_activity a USING (pid) JOIN pg_stat_ssl s USING (pid) \
             WHERE l.locktype = 'advisory' AND l.granted \
               AND l.classid = $1::int8::oid AND l.objid = $2::int8::oid AND l.objsubid = 1",
            &[&i64::from(key.classid()), &i64::from(key.objid())],
        )
        .unwrap();
    child.stdin.take().unwrap().write_all(b"\n").unwrap();
    assert!(child.wait().unwrap().success());
    (row.get(0), row.get(1), row.get(2), row.get(3))
}

#[test]
fn pghost_pgport_pguser_and_pgdatabase_choose_the_session() {
    let home = home("basic");
    admin()
        .batch_execute(
            "DO $$ BEGIN CREATE ROLE pglock_env_user LOGIN; \
             EXCEPTION WHEN duplicate_object THEN NULL; END $$",
        )
        .unwrap();
    let mut cmd = pg_env(&home);
    cmd.env("PGUSER", "pglock_env_user")
        .env("PGDATABASE", "template1");
    let (_, _, db, user) = session_of(&mut cmd, "cli-env/basic");
    assert_eq!(
        (db.as_str(), user.as_str()),
        ("template1", "pglock_env_user")
    );

    // A wrong PGPORT: unreachable (69), saying where it looked.
    let out = run(pg_env(&home).env("PGPORT", "1"), "cli-env/basic");
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("host=127.0.0.1 port=1"),
        "{}",
        stderr(&out)
    );
    // A PGPORT that is not a port: a usage error naming the variable.
    let out = run(pg_env(&home).env("PGPORT", "x"), "cli-env/basic");
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("PGPORT"), "{}", stderr(&out));
    // The connection string wins over the variables; they fill in what it leaves out.
    let dsn = format!("host=127.0.0.1 port={}", port());
    let out = run(
        pg_env(&home).env("PGPORT", "1").args(["--dsn", &dsn]),
        "cli-env/basic",
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn pgappname_names_the_session_instead_of_pglock() {
    let home = home("appname");
    let (app, ..) = session_of(&mut pg_env(&home), "cli-env/appname");
    assert!(app.starts_with("pglock run cli-env/appname "), "{app}");
    let (app, ..) = session_of(
        pg_env(&home).env("PGAPPNAME", "nightly-cron"),
        "cli-env/appname",
    );
    assert_eq!(app, "nightly-cron");
}

#[test]
fn pgconnect_timeout_must_be_seconds() {
    let home = home("timeout");
    let out = run(
        pg_env(&home).env("PGCONNECT_TIMEOUT", "soon"),
        "cli-env/timeout",
    );
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("PGCONNECT_TIMEOUT"),
        "{}",
        stderr(&out)
    );
    let out = run(
        pg_env(&home).env("PGCONNECT_TIMEOUT", "1"),
        "cli-env/timeout",
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// The role that needs a password, and its password.
fn password_role() -> (String, String) {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!("\n\n{name} is not set: run the tests through ci/with-postgres\n\n")
        })
    };
    (var("PGLOCK_PW_ROLE"), var("PGLOCK_PW_PASSWORD"))
}

#[test]
fn pgpassword_pgpassfile_and_pgpass_give_the_password() {
    let home = home("password");
    let (role, password) = password_role();
    let with_role = || {
        let mut cmd = pg_env(&home);
        cmd.env("PGUSER", &role);
        cmd
    };
    let out = run(&mut with_role(), "cli-env/password");
    assert_eq!(out.status.code(), Some(69), "no password: {}", stderr(&out));
    assert!(!stderr(&out).contains(&password));
    let out = run(with_role().env("PGPASSWORD", &password), "cli-env/password");
    assert_eq!(out.status.code(), Some(0), "PGPASSWORD: {}", stderr(&out));

    use std::os::unix::fs::PermissionsExt;
    let file = home.join("passwords");
    std::fs::write(&file, format!("127.0.0.1:{}:*:{role}:{password}\n", port())).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = run(with_role().env("PGPASSFILE", &file), "cli-env/password");
    assert_eq!(out.status.code(), Some(0), "PGPASSFILE: {}", stderr(&out));
    std::fs::copy(&file, home.join(".pgpass")).unwrap();
    std::fs::set_permissions(home.join(".pgpass"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = run(&mut with_role(), "cli-env/password");
    assert_eq!(out.status.code(), Some(0), "~/.pgpass: {}", stderr(&out));
}

#[test]
fn pgservice_reads_the_service_file_which_beats_the_variables() {
    let home = home("service");
    let (role, password) = password_role();
    let entry = format!(
        "# jobs\n[jobs]\nhost=127.0.0.1\nport={}\nuser={role}\npassword={password}\n\
         dbname=postgres\napplication_name=from-service\n",
        port()
    );
    std::fs::write(home.join("services"), &entry).unwrap();
    // PGSERVICEFILE + PGSERVICE; the service's port beats PGPORT.
    let mut cmd = bare(&home);
    cmd.env("PGSERVICEFILE", home.join("services"))
        .env("PGSERVICE", "jobs")
        .env("PGPORT", "1");
    let (app, _, _, user) = session_of(&mut cmd, "cli-env/service");
    assert_eq!(
        (app.as_str(), user.as_str()),
        ("from-service", role.as_str())
    );
    // ~/.pg_service.conf, named by `service=` in the connection string, which itself
    // wins over the service.
    std::fs::write(home.join(".pg_service.conf"), &entry).unwrap();
    let mut cmd = bare(&home);
    cmd.args(["--dsn", "service=jobs application_name=from-dsn"]);
    let (app, ..) = session_of(&mut cmd, "cli-env/service");
    assert_eq!(app, "from-dsn");
    // PGSYSCONFDIR/pg_service.conf.
    std::fs::remove_file(home.join(".pg_service.conf")).unwrap();
    std::fs::write(home.join("pg_service.conf"), &entry).unwrap();
    let out = run(
        bare(&home)
            .env("PGSYSCONFDIR", &home)
            .env("PGSERVICE", "jobs"),
        "cli-env/service",
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // A service that is nowhere: a usage error.
    let out = run(bare(&home).env("PGSERVICE", "absent"), "cli-env/service");
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("\"absent\" not found"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn pgtargetsessionattrs_chooses_among_several_hosts() {
    let home = home("target");
    let url = std::env::var("STANDBY_URL")
        .unwrap_or_else(|_| panic!("\n\nSTANDBY_URL is not set: run through ci/with-postgres\n\n"));
    let standby: pglock::postgres::Config = url.parse().unwrap();
    let standby_port = standby.get_ports().first().copied().unwrap_or(5432);
    let both = |cmd: &mut Command| {
        cmd.env("PGHOST", "127.0.0.1,127.0.0.1")
            .env("PGPORT", format!("{standby_port},{}", port()));
    };
    // By default, the primary.
    let mut cmd = pg_env(&home);
    both(&mut cmd);
    let out = run(&mut cmd, "cli-env/target");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // PGTARGETSESSIONATTRS=any: the first host, a standby, refused for a lock.
    let mut cmd = pg_env(&home);
    both(&mut cmd);
    let out = run(cmd.env("PGTARGETSESSIONATTRS", "any"), "cli-env/target");
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    assert!(stderr(&out).contains("standby"), "{}", stderr(&out));
}

/// The server's TLS certificate (`ci/with-postgres`'s self-signed one, for 127.0.0.1
/// and localhost).
fn server_cert() -> String {
    std::env::var("PGLOCK_TLS_CERT").unwrap_or_else(|_| {
        panic!("\n\nPGLOCK_TLS_CERT is not set: run the tests through ci/with-postgres\n\n")
    })
}

#[test]
fn pgsslmode_disable_and_require_choose_plain_or_tls() {
    let home = home("sslmode");
    let (_, ssl, ..) = session_of(pg_env(&home).env("PGSSLMODE", "disable"), "cli-env/ssl");
    assert!(!ssl, "sslmode=disable used TLS");
    let (_, ssl, ..) = session_of(pg_env(&home).env("PGSSLMODE", "require"), "cli-env/ssl");
    assert!(ssl, "sslmode=require did not use TLS");
    // The default is prefer: TLS when the server offers it.
    let (_, ssl, ..) = session_of(&mut pg_env(&home), "cli-env/ssl");
    assert!(ssl, "sslmode=prefer did not use TLS");
    // In the connection string too.
    let dsn = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
        port()
    );
    let (_, ssl, ..) = session_of(bare(&home).args(["--dsn", &dsn]), "cli-env/ssl");
    assert!(!ssl);
    let out = run(pg_env(&home).env("PGSSLMODE", "sometimes"), "cli-env/ssl");
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
}

#[test]
fn verify_full_checks_the_servers_certificate() {
    let home = home("verify");
    let cert = server_cert();
    // The right root: connected, over TLS; by PGSSLROOTCERT, by sslrootcert, by the
    // default ~/.postgresql/root.crt, for the IP address and for the name localhost.
    let mut cmd = pg_env(&home);
    cmd.env("PGSSLMODE", "verify-full")
        .env("PGSSLROOTCERT", &cert);
    let (_, ssl, ..) = session_of(&mut cmd, "cli-env/verify");
    assert!(ssl);
    let dsn = format!(
        "host=localhost port={} user=postgres dbname=postgres sslmode=verify-full sslrootcert={cert}",
        port()
    );
    let out = run(bare(&home).args(["--dsn", &dsn]), "cli-env/verify");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    std::fs::create_dir_all(home.join(".postgresql")).unwrap();
    std::fs::copy(&cert, home.join(".postgresql/root.crt")).unwrap();
    let out = run(
        pg_env(&home).env("PGSSLMODE", "verify-ca"),
        "cli-env/verify",
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    std::fs::remove_dir_all(home.join(".postgresql")).unwrap();

    // Another root: refused (69), saying why.
    let other = home.join("other.crt");
    let made = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=127.0.0.1", "-keyout"])
        .arg(home.join("other.key"))
        .arg("-out")
        .arg(&other)
        .output()
        .expect("openssl (ci/with-postgres needs it too)");
    assert!(made.status.success(), "{}", stderr(&made));
    let mut cmd = pg_env(&home);
    cmd.env("PGSSLMODE", "verify-full")
        .env("PGSSLROOTCERT", &other);
    let out = run(&mut cmd, "cli-env/verify");
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("certificate verify failed"), "{err}");
    assert!(err.contains("sslmode=verify-full"), "{err}");
    assert!(err.contains(&other.display().to_string()), "{err}");
    assert_eq!(err.lines().count(), 1, "said once: {err}");

    // verify-full without any root file: a usage error, as libpq's.
    let out = run(
        pg_env(&home).env("PGSSLMODE", "verify-full"),
        "cli-env/verify",
    );
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
}

#[test]
fn pgoptions_and_pghostaddr_reach_the_connection() {
    let home = home("options");
    // PGOPTIONS is sent at startup: a setting the server refuses makes it refuse the
    // session (unreachable, 69, with the server's word).
    let out = run(
        pg_env(&home).env("PGOPTIONS", "-c statement_timeout=nonsense"),
        "cli-env/options",
    );
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("statement_timeout"),
        "{}",
        stderr(&out)
    );
    let out = run(
        pg_env(&home).env("PGOPTIONS", "-c statement_timeout=0"),
        "cli-env/options",
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // PGHOSTADDR: the address connected to, whatever PGHOST's name resolves to.
    let out = run(
        pg_env(&home)
            .env("PGHOST", "pglock-test.invalid")
            .env("PGHOSTADDR", "127.0.0.1"),
        "cli-env/options",
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// A client certificate (PGSSLCERT, PGSSLKEY) is loaded and offered; its key must be
/// private, and a file that is not a certificate is a usage error. (The test server does
/// not ask for client certificates, so their use for authentication is not pinned here.)
#[test]
fn pgsslcert_and_pgsslkey_are_loaded_and_checked() {
    use std::os::unix::fs::PermissionsExt;
    let home = home("client-cert");
    let (cert, key) = (home.join("client.crt"), home.join("client.key"));
    let made = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=postgres", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (ci/with-postgres needs it too)");
    assert!(made.status.success(), "{}", stderr(&made));
    let with_cert = || {
        let mut cmd = pg_env(&home);
        cmd.env("PGSSLMODE", "require")
            .env("PGSSLCERT", &cert)
            .env("PGSSLKEY", &key);
        cmd
    };
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (_, ssl, ..) = session_of(&mut with_cert(), "cli-env/client-cert");
    assert!(ssl);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(&mut with_cert(), "cli-env/client-cert");
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("group or world access"),
        "{}",
        stderr(&out)
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&cert, "not a certificate\n").unwrap();
    let out = run(&mut with_cert(), "cli-env/client-cert");
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot read sslcert"),
        "{}",
        stderr(&out)
    );
}
