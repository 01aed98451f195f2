//! The command line.

use std::ffi::OsString;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand};

use crate::fail::Fail;

pub(crate) const EXIT_CODES: &str = "\
Exit codes:
  N        pglock run: the command's own exit code, verbatim
  128+N    pglock run: the command died of signal N (130 for SIGINT, 143 for SIGTERM),
           or pglock got signal N while still waiting for the lock
  1        pglock run, pglock lease acquire: the lock was busy (-n) or still busy after
           -w SECS (change it with -E/--conflict-exit-code)
  75       pglock run: the lock was lost while the command ran (its session was
           terminated or its connection dropped; with --lease, the lease could not be
           renewed in time or the server found it expired); the command's process
           group got SIGTERM, and SIGKILL after --grace SECS
  76       pglock lease heartbeat|release: the token does not hold the lease any more
           (it expired, was released, or was taken over)
  126, 127 pglock run: the command could not be executed, or was not found
  64       usage error: bad option, missing command, bad name, bad connection
           settings (TLS files included), or a lease table that does not exist
  69       the database is unreachable (connection refused, authentication failed), or
           pglock run refused it for an advisory lock: a standby, or a pooler
  70       any other failure of pglock itself";

const CONNECTION: &str = "\
Connection: --dsn (a postgres:// URL or key=value string), else DATABASE_URL, with
libpq's layers under it, as psql reads them: a service's entry (service=, PGSERVICE; in
PGSERVICEFILE or ~/.pg_service.conf, then PGSYSCONFDIR/pg_service.conf), then PGHOST
(default localhost), PGHOSTADDR, PGPORT, PGUSER (default $USER), PGDATABASE, PGPASSWORD,
PGPASSFILE, PGOPTIONS, PGAPPNAME, PGCONNECT_TIMEOUT, PGSSLMODE, PGSSLROOTCERT, PGSSLCERT,
PGSSLKEY, PGTARGETSESSIONATTRS, PGCHANNELBINDING, PGLOADBALANCEHOSTS. The connection
string wins over the service, which wins over the variables. Without a password, it is
looked up in passfile/PGPASSFILE, else ~/.pgpass (one host only; not read if group or
others may read it). TLS: sslmode disable, allow (as prefer), prefer (the default),
require, verify-ca, verify-full; sslrootcert (default ~/.postgresql/root.crt, checked in
every mode when it exists; `system` for the system's trust store, with verify-full);
sslcert and sslkey (default ~/.postgresql/postgresql.crt and .key). With several hosts,
pglock asks for the primary (target_session_attrs=read-write) unless the settings say
otherwise. Passwords are never printed. See docs/cli.md.";

/// The help layout of every subcommand: `Usage:` first, as flock(1) and ripgrep.
const TEMPLATE: &str = "{usage-heading} {usage}\n\n{about-with-newline}\n{all-args}{after-help}";

/// The command line's definition, as parsed, documented (`--help`, `pglock man`) and
/// completed (`pglock completions`): every subcommand gets `Usage:` first.
pub(crate) fn command() -> clap::Command {
    fn usage_first(cmd: clap::Command) -> clap::Command {
        let cmd = cmd.help_template(TEMPLATE);
        let names: Vec<String> = cmd
            .get_subcommands()
            .map(|s| s.get_name().to_owned())
            .collect();
        names
            .into_iter()
            .fold(cmd, |cmd, name| cmd.mut_subcommand(name, usage_first))
    }
    usage_first(<Cli as clap::CommandFactory>::command())
}

/// Distributed locks on PostgreSQL advisory locks, from the shell.
#[derive(Debug, Parser)]
#[command(
    name = "pglock",
    version,
    after_help = "Run 'pglock --help' for the connection settings and exit codes,\n\
                  'pglock COMMAND -h' for a command's options, 'pglock man' for the manual.",
    after_long_help = format!("{CONNECTION}\n\n{EXIT_CODES}"),
    disable_help_subcommand = true
)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) conn: Conn,

    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Where and how to connect.
#[derive(Debug, Clone, Args)]
pub(crate) struct Conn {
    /// Connection string (URL or key=value) [default: DATABASE_URL]
    ///
    /// A postgres:// URL or a key=value string, as libpq takes them; default:
    /// DATABASE_URL. Under it, libpq's service file and PG* variables fill in what it
    /// leaves out (see `pglock --help`)
    #[arg(long, global = true, value_name = "DSN", help_heading = "Connection")]
    pub(crate) dsn: Option<String>,

    /// Give up a connection silent for SECS (0: the system's TCP defaults)
    #[arg(long, global = true, value_name = "SECS", default_value = "30",
          value_parser = parse_network_timeout, hide_short_help = true,
          help_heading = "Connection",
          long_help = "Give up a connection that heard nothing from the other end for SECS \
(TCP keepalives and tcp_user_timeout; on the server's side too for an advisory lock, so \
that it frees the lock of a pglock it stopped hearing from): a shorter network outage is \
ridden out. Raised to 2, at most 86400; 0 keeps the system's TCP defaults (hours)")]
    pub(crate) network_timeout: Duration,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run a command holding a lock, a lease (--lease), or one of N slots (--slots)
    #[command(
        long_about = "Run a command while holding a session advisory lock, like flock(1) but \
across every host that reaches the same database.\n\n\
pglock takes pg_advisory_lock(hashtextextended(NAME, 0)) on its own connection, runs the \
command as a child with stdin, stdout and stderr passed through, and releases the lock when \
the command exits. The child gets PGLOCK_NAME, PGLOCK_KEY (the 64-bit key) and PGLOCK_HELD=1 \
in its environment.\n\n\
The lock is a session lock held by pglock's connection for the command's whole run. \
Transaction-scoped locks (pg_advisory_xact_lock, the library's TxLock) make no sense for a \
child process, which cannot run SQL in pglock's transaction, and are not offered; for the \
same reason pglock cannot work through a transaction-mode pooler (PgBouncer \
pool_mode=transaction): connect directly or in session mode, or use --lease.\n\n\
Before locking, pglock checks its session and refuses (exit 69): a hot standby \
(pg_is_in_recovery(); a lock there excludes nobody on the primary), and a pooler in \
between, seen as a server port (inet_server_port()) that is not the port pglock connected \
to, or as two statements answered by two server sessions (pg_backend_pid()). A NAT or a \
container's published port also changes the port: pass --direct for such a direct \
connection, and for a pooler in session mode (which works, but looks the same). A pooler on the same port as its server, or on a Unix socket, is not \
detected. The session gets idle_session_timeout = 0 (a role's or database's timeout would \
end it, and the lock, while the command runs).\n\n\
NAME is hashed by pglock as UTF-8: in a database whose encoding is not UTF8, SQL's \
hashtextextended(NAME, 0) takes another lock for a name that is not ASCII, and pglock \
warns. A NAME that starts with `-` goes after --name, or as `-- NAME -- COMMAND...`.\n\n\
The command runs in a process group of its own, with everything it starts (unless that \
leaves the group with setsid or setpgid), and pglock always signals the whole group. \
Signals INT, TERM, HUP, QUIT, USR1 and USR2 sent to pglock are forwarded to the group; \
while pglock still waits for the lock they end it with 128+N. When pglock's group owns the \
terminal on stdin, the command's group gets the terminal while it runs (Ctrl-C and Ctrl-\\ \
reach it directly; Ctrl-Z is not supported). When the command exits, whatever it left \
running in its group is killed with SIGKILL before the unlock. The group never outlives \
pglock, even when pglock is killed with SIGKILL (a supervisor process with Linux's \
parent-death signal kills it). If the lock is lost while the command runs (an \
administrator's pg_terminate_backend, a dropped connection), pglock sends the group \
SIGTERM at once, SIGKILL after --grace (or once the command itself ended), and exits with \
75.\n\n\
The session's application_name is \"pglock run NAME HOST:PID\", so the holder shows in \
pg_stat_activity and in `pglock status` (unless application_name or PGAPPNAME sets \
another).\n\n\
--lease SECS holds a lease instead: a row in a table (pglock_leases, or --table \
schema.table; --create-table creates it if missing), taken for SECS and renewed every \
--heartbeat (default a third of the lease). Every statement is stateless, so it works \
through PgBouncer in transaction mode; --notify (LISTEN/NOTIFY wake-ups) is for direct \
connections only. The child gets PGLOCK_TOKEN, the lease's fencing token, instead of \
PGLOCK_KEY. pglock trusts the lease until the lease minus a margin after its last \
successful renewal was sent; at that deadline, or as soon as the server says the lease \
expired or changed hands, the command gets SIGTERM, SIGKILL after --grace, and pglock exits \
with 75. The margin is --grace plus a tenth of the lease, so that the whole sequence ends \
before the lease can expire on the server: --grace must be at most lease - 2 x heartbeat - \
lease/10 (7/30 of the lease with the default heartbeat), else it is a usage error; its \
default with --lease is the most that fits, at most 10 s. After a loss pglock sends no \
release: the lease expires by itself.\n\n\
--slots N makes a semaphore: at most N holders at once. With --lease, a lease semaphore \
(a row per slot). Without, N advisory locks on the pair keys (K, 0) .. (K, N-1), K being \
the upper 32 bits of the name's key (`pglock key NAME --slots N` prints them), taken \
with the library's AdvisorySemaphore (at most 1024 slots): one statement tries every slot, \
and a waiter is woken by the NOTIFY of every release (--poll: polls instead). The child \
gets PGLOCK_SLOT.",
        override_usage = "pglock run [OPTIONS] NAME -- COMMAND [ARGS]...\n       \
                          pglock run [OPTIONS] NAME -c SHELL_COMMAND\n       \
                          pglock run [OPTIONS] -- -NAME -- COMMAND [ARGS]...",
        group(ArgGroup::new("what").required(true).args(["shell", "command"])),
        after_help = "Run 'pglock run --help' for every option, the details and the exit codes.",
        after_long_help = EXIT_CODES
    )]
    Run(RunArgs),

    /// Print a name's lock key, its pg_locks coordinates, and the SQL that takes it
    #[command(
        long_about = "Print a name's lock key, its pg_locks coordinates, and the SQL \
that takes it. Needs no server. The SQL takes the same lock in UTF-8 databases (and for \
ASCII names in any): pglock hashes the name's UTF-8 bytes, the server its own encoding's. \
With --dsn and a name that is not ASCII, pglock asks the server and warns if its encoding \
is not UTF8.\n\n\
With --slots N, also the N keys of `pglock run NAME --slots N` (without --lease): slot i is \
the pair key (K, i), where K is the upper 32 bits of the name's 64-bit key \
((hashtextextended(NAME, 0) >> 32)::int4), that is pg_advisory_lock(K, i), shown in pg_locks \
as classid=K objid=i objsubid=2."
    )]
    Key {
        /// The lock's name
        name: String,
        /// Also print the keys of the N slots of an advisory semaphore
        #[arg(long, value_name = "N", value_parser = parse_slots)]
        slots: Option<u32>,
    },

    /// Hold a lease across separate steps of a pipeline: acquire, heartbeat, release, get
    #[command(
        subcommand,
        long_about = "Hold a lease across separate steps of a pipeline.\n\n\
`pglock lease acquire NAME` takes the lease and exits WITHOUT releasing it, printing its \
fencing token (with --json: {\"name\":...,\"token\":...,\"expires_in_ms\":...}). The lease \
then lives until it expires (--lease SECS after the acquire or the last heartbeat) or is \
released: renew it with `pglock lease heartbeat NAME --token T` more often than its length, \
release it with `pglock lease release NAME --token T`. `pglock lease get NAME` shows the \
row: holder, token, remaining time, payload.\n\n\
Leases live in a table (default pglock_leases; --table schema.table; --create-table \
creates it if missing), so these commands work through PgBouncer in transaction mode.",
        after_long_help = EXIT_CODES
    )]
    Lease(LeaseCommand),

    /// Show who holds and who waits for a lock, or for every advisory lock of the database
    #[command(after_long_help = format!("{CONNECTION}\n\n\
`since` is when a waiter began waiting (pg_locks.waitstart), and for a holder the last \
state change of its session (pg_stat_activity.state_change): exactly when `pglock run` \
got the lock, and a time the lock was already held for any idle session. A role that is \
not a superuser or member of pg_read_all_stats sees other roles' sessions without their \
query, client address, state and holders' since."))]
    Status {
        /// The lock's name; without one, every advisory lock of the database
        name: Option<String>,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },

    /// Print the manual page (roff), of pglock or of one command
    #[command(
        long_about = "Print the manual page in roff, generated from this very \
command line's definition: `pglock man | man -l -`, or install it with \
`pglock man > /usr/local/share/man/man1/pglock.1` (and `pglock man run > \
.../pglock-run.1` for a command's own page)."
    )]
    Man {
        /// A command's own page (run, key, lease, status)
        command: Option<String>,
    },

    /// Print a shell's completion script
    #[command(
        long_about = "Print the completion script of SHELL, generated from this \
command line's definition. Bash: `pglock completions bash > \
/etc/bash_completion.d/pglock` (or `source <(pglock completions bash)`); zsh: into a \
folder of $fpath as _pglock; fish: `pglock completions fish > \
~/.config/fish/completions/pglock.fish`."
    )]
    Completions {
        /// The shell
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// The lock's name (one that starts with `-`: after --name)
    #[arg(
        long_help = "The lock's name (the key is hashtextextended(NAME, 0) in a UTF-8 \
database). One that starts with `-` goes after `--name`, or after `--`: \
`run -n -- -x -- true`"
    )]
    #[arg(
        id = "NAME",
        value_name = "NAME",
        allow_hyphen_values = true,
        required = true
    )]
    pub(crate) name_positional: Option<String>,

    /// The lock's name, for one that starts with `-`
    #[arg(
        long = "name",
        value_name = "NAME",
        conflicts_with = "NAME",
        allow_hyphen_values = true,
        hide_short_help = true
    )]
    pub(crate) name_option: Option<String>,

    /// The name, from either of the two above (set after parsing).
    #[arg(skip)]
    pub(crate) name: String,

    /// The connection is direct, whatever its ports say: skip the check for a pooler
    /// (a NAT or a published port, where the server's port differs; a session-mode pooler)
    #[arg(long, conflicts_with = "lease", hide_short_help = true)]
    pub(crate) direct: bool,

    /// Fail at once (exit 1, or -E) if the lock is busy
    #[arg(short = 'n', long = "nonblock", conflicts_with = "wait")]
    pub(crate) nonblock: bool,

    /// Wait at most SECS (0: one try), then fail
    ///
    /// Wait at most SECS (fractions allowed; 0 = one try), then fail (exit 1, or -E)
    #[arg(short = 'w', long = "wait", visible_alias = "timeout", value_name = "SECS",
          value_parser = parse_secs)]
    pub(crate) wait: Option<Duration>,

    /// Exit code for a busy lock with -n, or one still busy after -w
    #[arg(
        short = 'E',
        long = "conflict-exit-code",
        value_name = "N",
        default_value_t = 1,
        hide_short_help = true
    )]
    pub(crate) conflict_exit_code: u8,

    /// Take a shared lock
    ///
    /// Take a shared lock: any number of shared holders at once, no exclusive one
    #[arg(
        short = 's',
        long = "shared",
        visible_alias = "read",
        conflicts_with = "exclusive"
    )]
    pub(crate) shared: bool,

    /// Take an exclusive lock (the default)
    #[arg(
        short = 'x',
        long = "exclusive",
        visible_alias = "write",
        hide_short_help = true
    )]
    pub(crate) exclusive: bool,

    /// Wait by polling with non-blocking tries (10 ms up to 1 s apart) instead of waiting
    /// on the server: for holders that run CREATE INDEX CONCURRENTLY
    #[arg(long, hide_short_help = true)]
    pub(crate) poll: bool,

    /// After a lost lock, SECS between SIGTERM and SIGKILL [default: 10]
    ///
    /// After the lock is lost, how long the command has between SIGTERM and SIGKILL
    /// [default: 10; with --lease, the most that fits, at most 10]
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub(crate) grace: Option<Duration>,

    /// Hold a lease of SECS instead (works through PgBouncer)
    ///
    /// Hold a lease of SECS (fractions allowed), renewed by a heartbeat, instead of a
    /// session advisory lock: works through PgBouncer in transaction mode
    #[arg(long, value_name = "SECS", value_parser = parse_secs, conflicts_with = "shared",
          help_heading = "Lease")]
    pub(crate) lease: Option<Duration>,

    /// With --lease: renew it every SECS [default: a third of the lease]
    #[arg(long, value_name = "SECS", value_parser = parse_secs, requires = "lease", hide_short_help = true, help_heading = "Lease")]
    pub(crate) heartbeat: Option<Duration>,

    /// A semaphore: at most N holders at once
    ///
    /// A semaphore: at most N holders at once (a lease semaphore with --lease, else an
    /// advisory semaphore of N slot keys; see `pglock key --help`)
    #[arg(long, value_name = "N", value_parser = parse_slots, conflicts_with = "shared")]
    pub(crate) slots: Option<u32>,

    /// With --lease: the lease table, `table` or `schema.table` [default: pglock_leases]
    #[arg(
        long,
        value_name = "TABLE",
        requires = "lease",
        hide_short_help = true,
        help_heading = "Lease"
    )]
    pub(crate) table: Option<String>,

    /// With --lease: create the lease table (and its sequence) if missing
    #[arg(
        long,
        requires = "lease",
        hide_short_help = true,
        help_heading = "Lease"
    )]
    pub(crate) create_table: bool,

    /// With --lease: wake waiters through LISTEN/NOTIFY. Direct connections only, never
    /// through a transaction-mode pooler
    #[arg(
        long,
        requires = "lease",
        hide_short_help = true,
        help_heading = "Lease"
    )]
    pub(crate) notify: bool,

    /// Say how long pglock waited, and who held the lock meanwhile
    #[arg(short = 'v', long)]
    pub(crate) verbose: bool,

    /// Do not say who holds the lock on a conflict
    #[arg(short = 'q', long, conflicts_with = "verbose")]
    pub(crate) quiet: bool,

    /// Run this string with /bin/sh -c instead of a command with arguments
    #[arg(short = 'c', long = "command", value_name = "SHELL_COMMAND")]
    pub(crate) shell: Option<OsString>,

    /// The command and its arguments (after `--`)
    #[arg(value_name = "COMMAND", last = true, num_args = 1..)]
    pub(crate) command: Vec<OsString>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum LeaseCommand {
    /// Take the lease and exit without releasing it; print its token
    Acquire(LeaseAcquireArgs),
    /// Renew the lease held with --token for its length
    Heartbeat(LeaseTokenArgs),
    /// Release the lease held with --token
    Release(LeaseTokenArgs),
    /// Show the lease's row: holder, token, remaining time, payload
    Get(LeaseGetArgs),
}

/// Where the leases live.
#[derive(Debug, Args)]
pub(crate) struct TableArgs {
    /// The lease table, `table` or `schema.table` [default: pglock_leases]
    #[arg(long, value_name = "TABLE")]
    pub(crate) table: Option<String>,

    /// Create the lease table (and its sequence) if missing
    #[arg(long)]
    pub(crate) create_table: bool,
}

#[derive(Debug, Args)]
pub(crate) struct LeaseAcquireArgs {
    /// The lease's name
    pub(crate) name: String,

    /// The lease's length in SECS
    ///
    /// The lease's length: it expires SECS after the acquire or the last heartbeat
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = parse_secs)]
    pub(crate) lease: Duration,

    /// Who holds it, stored in the row [default: pglock lease HOST]
    #[arg(long, value_name = "TEXT")]
    pub(crate) owner: Option<String>,

    /// A payload stored in the row (as bytes)
    #[arg(long, value_name = "TEXT")]
    pub(crate) data: Option<String>,

    /// Wait at most SECS for the lease (fractions allowed) [default: one try]
    #[arg(short = 'w', long = "wait", value_name = "SECS", value_parser = parse_secs)]
    pub(crate) wait: Option<Duration>,

    /// Exit code for a lease still busy
    #[arg(
        short = 'E',
        long = "conflict-exit-code",
        value_name = "N",
        default_value_t = 1
    )]
    pub(crate) conflict_exit_code: u8,

    /// Print JSON: {"name":...,"token":...,"expires_in_ms":...}
    #[arg(long)]
    pub(crate) json: bool,

    #[command(flatten)]
    pub(crate) table: TableArgs,
}

#[derive(Debug, Args)]
pub(crate) struct LeaseTokenArgs {
    /// The lease's name
    pub(crate) name: String,

    /// The fencing token `pglock lease acquire` printed
    #[arg(long, value_name = "TOKEN", allow_negative_numbers = true)]
    pub(crate) token: i64,

    /// Print JSON
    #[arg(long)]
    pub(crate) json: bool,

    #[command(flatten)]
    pub(crate) table: TableArgs,
}

#[derive(Debug, Args)]
pub(crate) struct LeaseGetArgs {
    /// The lease's name
    pub(crate) name: String,

    /// Print JSON
    #[arg(long)]
    pub(crate) json: bool,

    #[command(flatten)]
    pub(crate) table: TableArgs,
}

impl RunArgs {
    /// Fills `name` from the positional NAME, `--name`, or `-- NAME -- COMMAND...` (a
    /// name that starts with `-`, after the `--` that ends the options).
    pub(crate) fn resolved(mut self) -> Result<RunArgs, Fail> {
        let name = match (self.name_positional.take(), self.name_option.take()) {
            (Some(name), _) | (None, Some(name)) => name,
            (None, None) if self.command.len() >= 3 && self.command[1] == "--" => {
                let name = self.command[0]
                    .clone()
                    .into_string()
                    .map_err(|_| Fail::usage("the lock name is not valid UTF-8".to_owned()))?;
                self.command.drain(..2);
                name
            }
            (None, None) => {
                return Err(Fail::usage(
                    "no lock name: give NAME, or --name NAME (or `-- NAME -- COMMAND...`) \
                     for one that starts with `-`",
                ))
            }
        };
        self.name = name;
        Ok(self)
    }
}

/// Parses the command line. `run [OPTIONS] -- -NAME -- COMMAND...` (a name that starts
/// with `-`, after the `--` that ends the options) is read as `--name -NAME -- COMMAND...`
/// when NAME is missing otherwise: NAME is a required argument.
pub(crate) fn parse(argv: &[OsString]) -> Result<Cli, clap::Error> {
    use clap::FromArgMatches;
    let parse = |argv: &[OsString]| {
        command()
            .try_get_matches_from(argv)
            .and_then(|matches| Cli::from_arg_matches(&matches))
    };
    let error = match parse(argv) {
        Ok(cli) => return Ok(cli),
        Err(e) => e,
    };
    if error.kind() != clap::error::ErrorKind::MissingRequiredArgument {
        return Err(error);
    }
    let run = argv.iter().position(|a| a == "run");
    let dashes = run.and_then(|r| argv[r..].iter().position(|a| a == "--").map(|d| r + d));
    match dashes {
        Some(d) if argv.len() > d + 3 && argv[d + 2] == "--" => {
            let mut fixed = argv[..d].to_vec();
            fixed.push("--name".into());
            fixed.push(argv[d + 1].clone());
            fixed.extend_from_slice(&argv[d + 2..]);
            parse(&fixed).map_err(|_| error)
        }
        _ => Err(error),
    }
}

/// A hint for a parse error that has a likely cause: `pglock run NAME cmd` without the
/// `--` before the command.
pub(crate) fn hint(e: &clap::Error, argv: &[OsString]) -> Option<String> {
    use clap::error::{ContextKind, ErrorKind};
    if e.kind() != ErrorKind::UnknownArgument {
        return None;
    }
    let word = e.get(ContextKind::InvalidArg)?.to_string();
    let is_run = argv.iter().skip(1).any(|a| a == "run");
    let has_dashes = argv.iter().any(|a| a == "--");
    if !is_run || has_dashes || word.starts_with('-') {
        return None;
    }
    Some(format!(
        "hint: the command goes after `--`: pglock run NAME -- {word} ... (or -c '{word} ...' \
         for a shell command)"
    ))
}

/// A number of slots: 1 up to i32::MAX (slots are PostgreSQL integers).
fn parse_slots(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(n) if (1..=i32::MAX as u32).contains(&n) => Ok(n),
        _ => Err(format!(
            "not a number of slots from 1 to {}: {s:?}",
            i32::MAX
        )),
    }
}

/// `--network-timeout`: 0 (off), else raised to 2 s, at most a day.
fn parse_network_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_secs(s)?;
    if d > pglock::NetworkTimeout::MAX {
        return Err(format!(
            "at most {} seconds (one day)",
            pglock::NetworkTimeout::MAX.as_secs()
        ));
    }
    Ok(d)
}

/// Seconds with fractions, within PostgreSQL's lock_timeout range.
fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("not a number of seconds: {s:?}"))?;
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("not a number of seconds >= 0: {s:?}"));
    }
    // PostgreSQL's limit for lock_timeout: i32::MAX milliseconds (about 24.8 days).
    if secs * 1000.0 > f64::from(i32::MAX) {
        return Err(format!("at most {} seconds", i32::MAX / 1000));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn try_parse<const N: usize>(argv: [&str; N]) -> Result<Cli, clap::Error> {
        let argv: Vec<OsString> = argv.iter().map(OsString::from).collect();
        parse(&argv)
    }

    #[test]
    fn the_command_line_is_consistent() {
        command().debug_assert();
    }

    /// flock(1)'s `--help` is 24 lines, `Usage:` first: so is every `-h` here (about 25
    /// lines), and `--help` is the complete one.
    #[test]
    fn short_help_is_short_and_starts_with_usage() {
        for path in [
            &[][..],
            &["run"],
            &["lease"],
            &["lease", "acquire"],
            &["status"],
            &["key"],
        ] {
            let mut cmd = command();
            let mut sub = &mut cmd;
            for name in path {
                sub = sub.find_subcommand_mut(name).unwrap();
            }
            let short = sub.render_help().to_string();
            let long = sub.render_long_help().to_string();
            assert!(short.starts_with("Usage: "), "{path:?}:\n{short}");
            assert!(long.starts_with("Usage: "), "{path:?}:\n{long}");
            let lines = short.lines().count();
            assert!(lines <= 28, "{path:?}: {lines} lines:\n{short}");
            assert!(short.lines().all(|l| l.len() <= 110), "{path:?}:\n{short}");
            assert!(long.len() > short.len(), "{path:?}");
        }
    }

    #[test]
    fn seconds_take_fractions_and_refuse_nonsense() {
        assert_eq!(parse_secs("0.25"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_secs("0"), Ok(Duration::ZERO));
        assert!(parse_secs("-1").is_err());
        assert!(parse_secs("NaN").is_err());
        assert!(parse_secs("inf").is_err());
        assert!(parse_secs("1e10").is_err());
        assert!(parse_secs("soon").is_err());
    }

    fn run_args(argv: &[&str]) -> Option<RunArgs> {
        let argv: Vec<OsString> = argv.iter().map(OsString::from).collect();
        match parse(&argv).ok()?.command {
            Command::Run(run) => run.resolved().ok(),
            _ => None,
        }
    }

    #[test]
    fn names_may_start_with_a_hyphen() {
        let run = run_args(&["pglock", "run", "-n", "--", "-x", "--", "true"]).unwrap();
        assert_eq!((run.name.as_str(), run.nonblock), ("-x", true));
        assert_eq!(run.command, ["true"]);
        let run = run_args(&["pglock", "run", "--name", "-x", "-n", "--", "true"]).unwrap();
        assert_eq!((run.name.as_str(), run.nonblock), ("-x", true));
        let run = run_args(&["pglock", "run", "-n", "-weird", "--", "true"]).unwrap();
        assert_eq!(run.name, "-weird");
        let run = run_args(&["pglock", "run", "-x", "plain", "--", "true"]).unwrap();
        assert_eq!((run.name.as_str(), run.exclusive), ("plain", true));
        assert!(run_args(&["pglock", "run", "--name", "a", "b", "--", "true"]).is_none());
        assert!(run_args(&["pglock", "run", "--", "true"]).is_none());
    }

    #[test]
    fn both_command_forms_parse() {
        let cli = try_parse(["pglock", "run", "x", "-w", "1.5", "--", "ls", "-l"]).unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.command, ["ls", "-l"]);
        assert_eq!(run.wait, Some(Duration::from_millis(1500)));
        let cli = try_parse(["pglock", "run", "x", "-c", "echo hi"]).unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.shell.as_deref(), Some("echo hi".as_ref()));
        assert!(try_parse(["pglock", "run", "x"]).is_err());
        // Without `--`, a typo in an option never runs as a command.
        assert!(try_parse(["pglock", "run", "x", "ls"]).is_err());
        assert!(try_parse(["pglock", "run", "x", "--bogus", "--", "ls"]).is_err());
        assert!(try_parse(["pglock", "run", "x", "-c", "a", "--", "b"]).is_err());
        assert!(try_parse(["pglock", "run", "x", "-n", "-w", "1", "--", "b"]).is_err());
    }
}
