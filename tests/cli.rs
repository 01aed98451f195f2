//! The `pglock` command-line tool (`--features cli`), run as a real process against a
//! real server. Each test uses lock names of its own.
//!
//! Children report to the test through a pipe (their stdout): "ready", their pid. Time
//! bounds are generous: the machine is small and busy.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use common::{admin, wait_until};
use pglock::{LockKey, SessionLock};

const BIN: &str = env!("CARGO_BIN_EXE_pglock");
const LONG: Duration = Duration::from_secs(30);

/// A lock name of the calling test's own.
macro_rules! unique_name {
    () => {
        format!("pglock-cli-test/{}", function_name!())
    };
}

fn pglock() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env("DATABASE_URL", common::database_url());
    cmd
}

fn output(cmd: &mut Command) -> Output {
    cmd.output().expect("run pglock")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A folder of the test's own, emptied.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "pglock-cli-{}-{}",
        test.replace(['/', ':'], "_"),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Starts `pglock ARGS` with its stdout piped to the test.
fn spawn(args: &[&str]) -> (Child, BufReader<ChildStdout>) {
    let mut child = pglock()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pglock");
    let out = BufReader::new(child.stdout.take().unwrap());
    (child, out)
}

/// The next line the child wrote, without its newline.
fn line(out: &mut BufReader<ChildStdout>) -> String {
    let mut s = String::new();
    out.read_line(&mut s).expect("read the child's stdout");
    s.trim_end().to_owned()
}

/// Waits for `child` to exit, at most `within`.
fn wait_exit(child: &mut Child, within: Duration) -> ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("pglock did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn child_stderr(child: &mut Child) -> String {
    let mut s = String::new();
    child.stderr.take().unwrap().read_to_string(&mut s).unwrap();
    s
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// Whether process `pid` is gone (or a zombie nobody reaped yet).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

/// The backend of the `pglock run` with process id `pid`, found by its application_name.
fn backend_of(admin: &mut postgres::Client, pid: u32) -> i32 {
    let mut backend = None;
    wait_until("pglock's session shows in pg_stat_activity", LONG, || {
        backend = admin
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE application_name LIKE $1",
                // Long names are shortened; the host and pid stay.
                &[&format!("pglock run % {}:{pid}", hostname())],
            )
            .unwrap()
            .map(|r| r.get(0));
        backend.is_some()
    });
    backend.unwrap()
}

/// The client and server ports of backend `pid`'s connection.
fn ports_of(admin: &mut postgres::Client, pid: i32) -> (u16, u16) {
    let row = admin
        .query_one(
            "SELECT client_port, inet_server_port() FROM pg_stat_activity WHERE pid = $1",
            &[&pid],
        )
        .unwrap();
    let port = |i| u16::try_from(row.get::<_, i32>(i)).unwrap();
    (port(0), port(1))
}

/// How long after `start` a `pglock run -n` first took the lock `name`: the server freed
/// it (a cut-off run's).
fn freed_after(name: &str, start: Instant) -> Duration {
    let mut freed = None;
    wait_until("the server freed the cut run's lock", LONG, || {
        let out = output(pglock().args(["run", "-n", name, "--", "true"]));
        freed = Some(start.elapsed());
        out.status.code() == Some(0)
    });
    freed.unwrap()
}

/// A lock held by the test itself, on a connection named `holder`.
fn hold() -> (common::Pool, i32) {
    let mut config = common::config();
    config.application_name("test-holder");
    let pool = common::pool_with(1, config);
    let mut conn = pool.get().unwrap();
    let pid = common::backend_pid(&mut conn);
    drop(conn);
    (pool, pid)
}

#[test]
fn two_concurrent_runs_never_overlap() {
    let name = unique_name!();
    let dir = scratch(&name);
    let log = dir.join("log");
    let script = format!(
        "echo enter $$ >> {0}; sleep 0.2; echo exit $$ >> {0}",
        log.display()
    );
    let runs: Vec<Child> = (0..3)
        .map(|_| {
            pglock()
                .args(["run", &name, "-c", &script])
                .spawn()
                .unwrap()
        })
        .collect();
    for mut run in runs {
        assert!(wait_exit(&mut run, LONG).success());
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6, "{text}");
    for pair in lines.chunks(2) {
        let (enter, exit) = (pair[0], pair[1]);
        assert!(enter.starts_with("enter "), "interleaved:\n{text}");
        assert_eq!(
            exit,
            enter.replacen("enter", "exit", 1),
            "interleaved:\n{text}"
        );
    }
}

#[test]
fn a_busy_lock_fails_with_the_conflict_code_and_names_its_holder() {
    let name = unique_name!();
    let (pool, holder_pid) = hold();
    let mut lock = SessionLock::new(&pool, name.as_str()).unwrap();
    let guard = lock.lock().unwrap();

    let out = output(pglock().args(["run", "-n", &name, "--", "true"]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("is busy"), "{err}");
    assert!(err.contains(&format!("held by pid {holder_pid}")), "{err}");
    assert!(err.contains("application_name \"test-holder\""), "{err}");
    assert!(err.contains(" since "), "{err}");

    let out = output(pglock().args(["run", "-n", "-E", "7", &name, "--", "true"]));
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    let out = output(pglock().args(["run", "-q", "-w", "0", &name, "--", "true"]));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out), "", "--quiet");

    let start = Instant::now();
    let out = output(pglock().args(["run", "-w", "0.5", &name, "--", "true"]));
    let waited = start.elapsed();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(waited >= Duration::from_millis(500), "{waited:?}");
    assert!(
        stderr(&out).contains("after waiting 0."),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains(&format!("held by pid {holder_pid}")));

    // --poll waits the same way.
    let out = output(pglock().args(["run", "--poll", "-w", "0.3", &name, "--", "true"]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));

    // Shared holders do not exclude each other.
    drop(guard);
    drop(lock);
    let mut shared = pglock::SessionLock::with_options(
        &pool,
        name.as_str(),
        pglock::LockOptions::new().mode(pglock::LockMode::Shared),
    )
    .unwrap();
    let guard = shared.lock().unwrap();
    let out = output(pglock().args(["run", "-n", "-s", &name, "--", "true"]));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = output(pglock().args(["run", "-n", "-x", &name, "--", "true"]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    drop(guard);

    // Free again: the command runs.
    let out = output(pglock().args(["run", "-n", &name, "--", "true"]));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn a_wait_ends_when_the_holder_releases() {
    let name = unique_name!();
    let (pool, _) = hold();
    let mut lock = SessionLock::new(&pool, name.as_str()).unwrap();
    let guard = lock.lock().unwrap();
    let (mut run, mut out) = spawn(&["run", "-v", "-w", "60", &name, "--", "echo", "ran"]);
    let mut admin = admin();
    common::wait_for_waiters(&mut admin, &LockKey::from_name(&name), 1);
    drop(guard);
    assert_eq!(line(&mut out), "ran");
    assert!(wait_exit(&mut run, LONG).success());
    let err = child_stderr(&mut run);
    assert!(err.contains("is busy, held by pid"), "{err}");
    assert!(err.contains("locked \""), "{err}");
}

#[test]
fn the_commands_exit_code_and_signal_death_pass_through() {
    let name = unique_name!();
    let out = output(pglock().args(["run", &name, "--", "sh", "-c", "exit 42"]));
    assert_eq!(out.status.code(), Some(42));
    let out = output(pglock().args(["run", &name, "-c", "exit 3"]));
    assert_eq!(out.status.code(), Some(3));
    let out = output(pglock().args(["run", &name, "-c", "kill -KILL $$"]));
    assert_eq!(out.status.code(), Some(128 + 9));
    let out = output(pglock().args(["run", &name, "-c", "kill -TERM $$"]));
    assert_eq!(out.status.code(), Some(128 + 15));
    let out = output(pglock().args(["run", &name, "--", "/nonexistent/command"]));
    assert_eq!(out.status.code(), Some(127), "{}", stderr(&out));
    assert!(stderr(&out).contains("cannot run /nonexistent/command"));
    // Options after the name, and the environment.
    let out = output(pglock().args([
        "run",
        &name,
        "-w",
        "10",
        "--",
        "sh",
        "-c",
        "echo $PGLOCK_NAME $PGLOCK_KEY $PGLOCK_HELD",
    ]));
    let key = LockKey::from_name(&name).as_i64().unwrap();
    assert_eq!(stdout(&out), format!("{name} {key} 1\n"));
}

#[test]
fn stdin_and_stdout_pass_through() {
    let name = unique_name!();
    let mut run = pglock()
        .args(["run", &name, "--", "tr", "a-z", "A-Z"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    run.stdin.take().unwrap().write_all(b"hello\n").unwrap();
    let out = run.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(stdout(&out), "HELLO\n");
}

#[test]
fn sigterm_to_pglock_reaches_the_command() {
    let name = unique_name!();
    for (sig, num) in [("TERM", 15), ("INT", 2), ("HUP", 1), ("USR1", 10)] {
        let script = format!(
            "trap 'echo got {sig}; exit {num}' {sig}; echo ready; while :; do sleep 0.01; done"
        );
        let (mut run, mut out) = spawn(&["run", &name, "-c", &script]);
        assert_eq!(line(&mut out), "ready");
        signal(run.id(), sig);
        assert_eq!(line(&mut out), format!("got {sig}"));
        let status = wait_exit(&mut run, LONG);
        assert_eq!(status.code(), Some(num), "the command's own exit code");
    }
}

#[test]
fn a_signal_while_waiting_ends_pglock_and_its_wait() {
    let name = unique_name!();
    let (pool, _) = hold();
    let mut lock = SessionLock::new(&pool, name.as_str()).unwrap();
    let _guard = lock.lock().unwrap();
    let (mut run, _out) = spawn(&["run", &name, "--", "echo", "ran"]);
    let mut admin = admin();
    let key = LockKey::from_name(&name);
    common::wait_for_waiters(&mut admin, &key, 1);
    signal(run.id(), "TERM");
    assert_eq!(wait_exit(&mut run, LONG).code(), Some(128 + 15));
    // The wait was cancelled on the server, not left behind.
    wait_until("the wait is gone", Duration::from_secs(5), || {
        common::waiters(&mut admin, &key) == 0
    });

    // Killed while waiting, pglock cannot cancel: the server finds its connection gone
    // within client_connection_check_interval (1 s, PostgreSQL 14 and later).
    let (mut run, _out) = spawn(&["run", &name, "--", "echo", "ran"]);
    common::wait_for_waiters(&mut admin, &key, 1);
    signal(run.id(), "KILL");
    wait_exit(&mut run, LONG);
    let start = Instant::now();
    wait_until("the orphan wait is gone", LONG, || {
        common::waiters(&mut admin, &key) == 0
    });
    eprintln!(
        "orphan wait gone {:?} after pglock's SIGKILL",
        start.elapsed()
    );
}

#[test]
fn pglock_killed_with_sigkill_takes_its_command_along() {
    let name = unique_name!();
    let (mut run, mut out) = spawn(&["run", &name, "-c", "echo $$; exec sleep 1000"]);
    let pid: u32 = line(&mut out).parse().unwrap();
    assert!(!gone(pid));
    signal(run.id(), "KILL");
    wait_exit(&mut run, LONG);
    let start = Instant::now();
    wait_until("the command is gone", LONG, || gone(pid));
    eprintln!("command gone {:?} after pglock's SIGKILL", start.elapsed());
    // And the lock is free.
    let out = output(pglock().args(["run", "-w", "10", &name, "--", "true"]));
    assert!(out.status.success(), "{}", stderr(&out));
}

/// A pipeline whose two processes write their pids to `pids`, one a line, then run on.
fn pipeline_writing_pids(pids: &Path) -> String {
    format!(
        "sh -c 'echo $$ >> {0}; exec sleep 300' | sh -c 'echo $$ >> {0}; exec cat'",
        pids.display()
    )
}

/// The pids in `file`, once it has `n` of them.
fn wait_for_pids(file: &Path, n: usize) -> Vec<u32> {
    let mut pids = Vec::new();
    wait_until("the pids are written", LONG, || {
        pids = std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        pids.len() >= n
    });
    pids
}

/// Grandchildren too: the command's process group goes with pglock.
#[test]
fn pglock_killed_with_sigkill_takes_the_commands_whole_process_group_along() {
    let name = unique_name!();
    let dir = scratch(&name);
    let pids = dir.join("pids");
    let (mut run, _out) = spawn(&["run", &name, "-c", &pipeline_writing_pids(&pids)]);
    let procs = wait_for_pids(&pids, 2);
    assert!(procs.iter().all(|&p| !gone(p)), "{procs:?}");
    signal(run.id(), "KILL");
    wait_exit(&mut run, LONG);
    let start = Instant::now();
    wait_until("the pipeline is gone", LONG, || {
        procs.iter().all(|&p| gone(p))
    });
    eprintln!("pipeline gone {:?} after pglock's SIGKILL", start.elapsed());
}

#[test]
fn a_lost_lock_stops_the_commands_whole_process_group() {
    let name = unique_name!();
    let dir = scratch(&name);
    let pids = dir.join("pids");
    let (mut run, _out) = spawn(&[
        "run",
        "--grace",
        "5",
        &name,
        "-c",
        &pipeline_writing_pids(&pids),
    ]);
    let procs = wait_for_pids(&pids, 2);
    let mut admin = admin();
    let backend = backend_of(&mut admin, run.id());
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&backend])
        .unwrap();
    assert_eq!(wait_exit(&mut run, LONG).code(), Some(75));
    wait_until("the pipeline is gone", LONG, || {
        procs.iter().all(|&p| gone(p))
    });

    // A forwarded signal reaches the whole group too; and what the command leaves
    // running in its group when it exits is killed before the unlock.
    let _ = std::fs::remove_file(&pids);
    let script = format!(
        "sh -c 'trap \"echo got TERM >> {0}.term; exit 0\" TERM; echo $$ >> {0}; \
         while :; do sleep 0.01; done' & trap : TERM; wait; wait",
        pids.display()
    );
    let (mut run, _out) = spawn(&["run", &name, "-c", &script]);
    wait_for_pids(&pids, 1);
    signal(run.id(), "TERM");
    wait_exit(&mut run, LONG);
    let term = std::fs::read_to_string(format!("{}.term", pids.display())).unwrap_or_default();
    assert_eq!(term, "got TERM\n");

    // The command waits for its job to have written its pid: else, on a loaded machine,
    // the group's kill could come before the job ran at all.
    let _ = std::fs::remove_file(&pids);
    let script = format!(
        "sh -c 'echo $$ >> {0}; exec sleep 300' & until [ -s {0} ]; do sleep 0.01; done; \
         echo left behind",
        pids.display()
    );
    let out = output(pglock().args(["run", &name, "-c", &script]));
    assert!(out.status.success(), "{}", stderr(&out));
    let procs = wait_for_pids(&pids, 1);
    wait_until("the background job is gone", LONG, || gone(procs[0]));
}

#[test]
fn a_terminated_session_terminates_the_command_with_the_lock_lost_code() {
    let name = unique_name!();
    let script = "trap 'echo got TERM; exit 0' TERM; echo ready; while :; do sleep 0.01; done";
    let (mut run, mut out) = spawn(&["run", &name, "-c", script]);
    assert_eq!(line(&mut out), "ready");
    let mut admin = admin();
    let backend = backend_of(&mut admin, run.id());
    let start = Instant::now();
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&backend])
        .unwrap();
    assert_eq!(line(&mut out), "got TERM");
    let latency = start.elapsed();
    let status = wait_exit(&mut run, LONG);
    eprintln!("pg_terminate_backend to the command's SIGTERM trap: {latency:?}");
    assert!(latency < Duration::from_secs(2), "{latency:?}");
    assert_eq!(status.code(), Some(75));
    let err = child_stderr(&mut run);
    assert!(err.contains("lost the lock"), "{err}");
    assert!(err.contains("57P01"), "{err}");
}

/// A network that goes silent under `pglock run` (its connection's packets dropped both
/// ways, nothing closed): `--network-timeout` ends the run with the lock-lost code, and the
/// server frees the lock for the next run, both within the bound.
#[test]
fn a_silent_network_ends_the_run_and_frees_the_lock_within_the_network_timeout() {
    let name = unique_name!();
    let script = "trap 'echo got TERM; exit 0' TERM; echo ready; while :; do sleep 0.01; done";
    let (mut run, mut out) = spawn(&["run", "--network-timeout", "4", &name, "-c", script]);
    assert_eq!(line(&mut out), "ready");
    let mut admin = admin();
    let backend = backend_of(&mut admin, run.id());
    let cut = common::partition::Partition::cut(ports_of(&mut admin, backend));
    let start = Instant::now();
    assert_eq!(line(&mut out), "got TERM");
    let noticed = start.elapsed();
    let status = wait_exit(&mut run, LONG);
    assert_eq!(status.code(), Some(75));
    let err = child_stderr(&mut run);
    assert!(err.contains("lost the lock"), "{err}");
    let freed = freed_after(&name, start);
    drop(cut);
    eprintln!("--network-timeout 4: the command got SIGTERM {noticed:?}, the lock was free {freed:?} after the cut");
    let bound = Duration::from_secs(4 + 8);
    assert!(noticed < bound, "{noticed:?}");
    assert!(freed < bound, "{freed:?}");
}

/// A run whose first session ended while it waited reconnects, and its new session gets
/// the same settings: cut off the network, it is freed by the server within the bound too.
#[test]
fn a_run_that_reconnected_keeps_its_network_timeout_on_the_server() {
    let name = unique_name!();
    let key = LockKey::from_name(&name);
    let (pool, _) = hold();
    let mut lock = SessionLock::new(&pool, name.as_str()).unwrap();
    let guard = lock.lock().unwrap();
    let script = "echo ready; while :; do sleep 0.01; done";
    let (mut run, mut out) = spawn(&["run", "--network-timeout", "4", &name, "-c", script]);
    let mut admin = admin();
    common::wait_for_waiters(&mut admin, &key, 1);
    let first = backend_of(&mut admin, run.id());
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&first])
        .unwrap();
    // pglock waits again, on a new session.
    wait_until("pglock waits again on a new session", LONG, || {
        let waiting = common::locks_on(&mut admin, &key);
        waiting.len() == 2 && waiting.iter().all(|l| l.0 != first)
    });
    drop(guard);
    assert_eq!(line(&mut out), "ready");
    let second = backend_of(&mut admin, run.id());
    assert_ne!(first, second);
    let cut = common::partition::Partition::cut(ports_of(&mut admin, second));
    let start = Instant::now();
    let freed = freed_after(&name, start);
    drop(cut);
    eprintln!("a reconnected run cut off the network: its lock was free {freed:?} after the cut");
    assert!(freed < Duration::from_secs(4 + 8), "{freed:?}");
    assert_eq!(wait_exit(&mut run, LONG).code(), Some(75));
}

#[test]
fn a_command_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let name = unique_name!();
    let (mut run, mut out) = spawn(&[
        "run",
        "--grace",
        "0.5",
        &name,
        "-c",
        "trap '' TERM; echo ready; exec sleep 1000",
    ]);
    assert_eq!(line(&mut out), "ready");
    let mut admin = admin();
    let backend = backend_of(&mut admin, run.id());
    let start = Instant::now();
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&backend])
        .unwrap();
    let status = wait_exit(&mut run, LONG);
    let took = start.elapsed();
    assert_eq!(status.code(), Some(75));
    assert!(took >= Duration::from_millis(500), "{took:?}");
    let err = child_stderr(&mut run);
    assert!(err.contains("killed by SIGKILL"), "{err}");
}

#[test]
fn bad_input_is_a_usage_error_or_unavailable() {
    let usage = |args: &[&str]| {
        let out = output(pglock().args(args));
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
        stderr(&out)
    };
    let err = usage(&["run", "x"]);
    assert!(err.contains("Usage: pglock run"), "{err}");
    let err = usage(&["--network-timeout", "100000", "key", "x"]);
    assert!(err.contains("at most 86400"), "{err}");
    let err = usage(&["run", "x", "--bogus", "--", "true"]);
    assert!(err.contains("--bogus"), "{err}");
    // Without `--`, nothing runs: a typo in an option is never taken for the command.
    usage(&["run", "x", "true"]);
    usage(&["run"]);
    usage(&[]);
    usage(&["frobnicate"]);
    usage(&["run", "-w", "-1", "x", "--", "true"]);
    usage(&["run", "-w", "soon", "x", "--", "true"]);
    usage(&["run", "-E", "300", "x", "--", "true"]);
    usage(&["run", "-n", "-w", "1", "x", "--", "true"]);
    usage(&["run", "-s", "-x", "x", "--", "true"]);
    usage(&["run", "x", "-c", "true", "--", "true"]);
    let err = usage(&["run", "", "--", "true"]);
    assert!(err.contains("the lock name is empty"), "{err}");
    usage(&["key", ""]);

    // A name that is not UTF-8.
    use std::os::unix::ffi::OsStrExt;
    let out = output(
        pglock()
            .arg("run")
            .arg(std::ffi::OsStr::from_bytes(b"\xff\xfe"))
            .args(["--", "true"]),
    );
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));

    // A connection string that does not parse: its password is not shown.
    let out = output(pglock().args([
        "--dsn",
        "host=localhost port=nope password=hunter2",
        "run",
        "x",
        "--",
        "true",
    ]));
    assert_eq!(out.status.code(), Some(64));
    let err = stderr(&out);
    assert!(err.contains("invalid value for option `port`"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
    assert!(err.contains("password=***"), "{err}");

    // A server that is not there: unavailable, password not shown.
    for dsn in [
        "postgres://someone:hunter2@127.0.0.1:1/db",
        "host=127.0.0.1 port=1 user=someone password=hunter2",
    ] {
        let out = output(pglock().args(["--dsn", dsn, "run", "x", "--", "true"]));
        assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains("cannot connect to host=127.0.0.1 port=1"),
            "{err}"
        );
        assert!(err.contains("Connection refused"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let out = output(pglock().args(["--dsn", dsn, "status"]));
        assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    }
    // A wrong password is "unavailable" too.
    let mut url = common::config();
    url.password("certainly-wrong").user("no_such_role_pglock");
    let dsn = format!(
        "host=127.0.0.1 port={} user=no_such_role_pglock password=certainly-wrong dbname=postgres",
        url.get_ports().first().copied().unwrap_or(5432)
    );
    let out = output(pglock().args(["--dsn", &dsn, "run", "x", "--", "true"]));
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    assert!(
        !stderr(&out).contains("certainly-wrong"),
        "{}",
        stderr(&out)
    );
}

/// Malformed URLs never show their password (nor, when they cannot be understood, any of
/// themselves).
#[test]
fn malformed_connection_strings_never_show_the_password() {
    for dsn in [
        "postgres://u:pa/ss@h:x/db",
        "postgres://u:pa?ss@h:x/db",
        "POSTGRES://u:SECRET@h:x/db",
        "postgres:/u:SECRET@h/db",
    ] {
        let out = output(pglock().args(["--dsn", dsn, "run", "x", "--", "true"]));
        let err = stderr(&out);
        assert!(matches!(out.status.code(), Some(64 | 69)), "{dsn}: {err}");
        for secret in ["SECRET", "pa/ss", "pa?ss", "ss@"] {
            assert!(!err.contains(secret), "{dsn}: {err}");
        }
    }
}

#[test]
fn the_pg_variables_are_used_without_a_dsn() {
    let config = common::config();
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(h)) => h.clone(),
        Some(postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string();
    let mut cmd = Command::new(BIN);
    cmd.env_remove("DATABASE_URL")
        .env("PGHOST", &host)
        .env("PGPORT", &port)
        .env("PGUSER", config.get_user().unwrap_or("postgres"))
        .env("PGDATABASE", config.get_dbname().unwrap_or("postgres"));
    if let Some(pw) = config.get_password() {
        cmd.env("PGPASSWORD", String::from_utf8_lossy(pw).into_owned());
    }
    let out = output(cmd.args(["run", &unique_name!(), "--", "echo", "ok"]));
    assert_eq!(stdout(&out), "ok\n", "{}", stderr(&out));
}

#[test]
fn hostile_names_are_just_names() {
    let mut admin = admin();
    let names = [
        "it's; DROP TABLE x; --".to_owned(),
        "back\\slash 'and' \"quotes\"".to_owned(),
        "new\nline\ttab".to_owned(),
        "émoji 🔒 名前".to_owned(),
        format!("long-{}", "é".repeat(5000)),
    ];
    for name in &names {
        // The key is the server's own hash of the name.
        let out = output(pglock().args(["key", name]));
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        let field = |f: &str| -> String {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{f}: ")))
                .unwrap_or_else(|| panic!("no {f} in {text}"))
                .to_owned()
        };
        let server: i64 = admin
            .query_one("SELECT hashtextextended($1, 0)", &[name])
            .unwrap()
            .get(0);
        assert_eq!(field("key"), server.to_string());
        let key = LockKey::new(server);
        assert_eq!(
            field("pg_locks"),
            format!(
                "locktype=advisory classid={} objid={} objsubid=1",
                key.classid(),
                key.objid()
            )
        );
        // The printed SQL takes exactly that lock.
        admin.batch_execute(&field("sql")).unwrap();
        assert_eq!(common::holders(&mut admin, &key), 1, "{name:?}");
        // ... so that pglock run finds it busy, and runs once it is free.
        let out = output(pglock().args(["run", "-n", name, "--", "true"]));
        assert_eq!(out.status.code(), Some(1), "{name:?}: {}", stderr(&out));
        admin
            .execute("SELECT pg_advisory_unlock($1)", &[&server])
            .unwrap();
        admin.batch_execute(&field("sql-by-key")).unwrap();
        assert_eq!(common::holders(&mut admin, &key), 1, "{name:?}");
        admin
            .execute("SELECT pg_advisory_unlock($1)", &[&server])
            .unwrap();
        let out = output(pglock().args(["run", name, "-c", "printf %s \"$PGLOCK_NAME\""]));
        assert!(out.status.success(), "{name:?}: {}", stderr(&out));
        assert_eq!(stdout(&out), *name);
    }
}

#[test]
fn the_holder_names_itself_in_application_name() {
    let name = format!("{}/{}", unique_name!(), "x".repeat(100));
    let (mut run, mut out) = spawn(&["run", &name, "-c", "echo ready; exec sleep 1000"]);
    assert_eq!(line(&mut out), "ready");
    let mut admin = admin();
    let app: String = admin
        .query_one(
            "SELECT application_name FROM pg_stat_activity WHERE application_name LIKE $1",
            &[&format!("pglock run pglock-cli-test/%:{}", run.id())],
        )
        .unwrap()
        .get(0);
    assert_eq!(app.len(), 63, "{app}");
    assert!(
        app.ends_with(&format!("... {}:{}", hostname(), run.id())),
        "{app}"
    );
    signal(run.id(), "TERM");
    wait_exit(&mut run, LONG);
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn key_prints_the_key_its_coordinates_and_the_sql() {
    let out = output(pglock().args(["key", "nightly-report"]));
    assert!(out.status.success());
    assert_eq!(
        stdout(&out),
        "name: \"nightly-report\"\n\
         key: -1761082894366742330\n\
         pg_locks: locktype=advisory classid=3884933232 objid=759228614 objsubid=1\n\
         sql: SELECT pg_advisory_lock(hashtextextended('nightly-report', 0));\n\
         sql-by-key: SELECT pg_advisory_lock(-1761082894366742330);\n"
    );
}

#[test]
fn status_shows_holders_and_waiters_as_text_and_json() {
    let name = unique_name!();
    let key = LockKey::from_name(&name);
    let (mut holder, mut out) = spawn(&["run", &name, "-c", "echo ready; exec sleep 1000"]);
    assert_eq!(line(&mut out), "ready");
    let (mut waiter, _waiter_out) = spawn(&["run", "-s", &name, "--", "true"]);
    let mut admin = admin();
    common::wait_for_waiters(&mut admin, &key, 1);
    let holder_backend = backend_of(&mut admin, holder.id());
    let waiter_backend = backend_of(&mut admin, waiter.id());

    let out = output(pglock().args(["status", &name, "--json"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let locks = json["locks"].as_array().unwrap();
    assert_eq!(locks.len(), 1, "{json}");
    let lock = &locks[0];
    assert_eq!(lock["name"], name.as_str());
    assert_eq!(lock["key"], key.as_i64().unwrap());
    assert_eq!(lock["classid"], key.classid());
    assert_eq!(lock["objid"], key.objid());
    assert_eq!(lock["objsubid"], 1);
    let holders = lock["holders"].as_array().unwrap();
    assert_eq!(holders.len(), 1, "{json}");
    assert_eq!(holders[0]["pid"], holder_backend);
    assert_eq!(holders[0]["granted"], true);
    assert_eq!(holders[0]["mode"], "exclusive");
    let app = holders[0]["application_name"].as_str().unwrap();
    assert!(app.starts_with("pglock run pglock-cli-test/"), "{app}");
    assert!(
        app.ends_with(&format!(" {}:{}", hostname(), holder.id())),
        "{app}"
    );
    assert!(
        holders[0]["since"].as_str().unwrap().ends_with('Z'),
        "{json}"
    );
    assert!(holders[0]["seconds"].as_f64().unwrap() >= 0.0, "{json}");
    let waiters = lock["waiters"].as_array().unwrap();
    assert_eq!(waiters.len(), 1, "{json}");
    assert_eq!(waiters[0]["pid"], waiter_backend);
    assert_eq!(waiters[0]["granted"], false);
    assert_eq!(waiters[0]["mode"], "shared");
    assert!(waiters[0]["since"].is_string(), "{json}");

    let out = output(pglock().args(["status", &name]));
    let text = stdout(&out);
    assert!(text.starts_with(&format!("lock {key}\n")), "{text}");
    assert!(
        text.contains(&format!("  held by pid {holder_backend} (exclusive)")),
        "{text}"
    );
    assert!(
        text.contains(&format!("  awaited by pid {waiter_backend} (shared)")),
        "{text}"
    );

    // Every advisory lock of the database: ours is among them, without a name.
    let out = output(pglock().args(["status", "--json"]));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ours = json["locks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["key"] == key.as_i64().unwrap())
        .unwrap_or_else(|| panic!("{json}"));
    assert_eq!(ours["name"], serde_json::Value::Null);
    assert_eq!(ours["holders"][0]["pid"], holder_backend);

    signal(holder.id(), "TERM");
    wait_exit(&mut holder, LONG);
    assert!(wait_exit(&mut waiter, LONG).success());

    // A free lock shows as free.
    let out = output(pglock().args(["status", &name, "--json"]));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["locks"][0]["holders"], serde_json::json!([]));
    assert_eq!(json["locks"][0]["waiters"], serde_json::json!([]));
    let out = output(pglock().args(["status", &name]));
    assert!(
        stdout(&out).contains("free: no holder, no waiter"),
        "{}",
        stdout(&out)
    );
}

/// The command is started through `/proc/self/exe`, which still names pglock's binary
/// after it was deleted (an upgrade during a long wait), where `current_exe()` would
/// name a path that is gone.
#[test]
fn the_command_starts_even_after_pglocks_binary_was_deleted() {
    let name = unique_name!();
    let dir = scratch(&name);
    let copy = dir.join("pglock-copy");
    std::fs::copy(BIN, &copy).unwrap();
    let (pool, _) = hold();
    let mut lock = SessionLock::new(&pool, name.as_str()).unwrap();
    let guard = lock.lock().unwrap();
    let mut run = Command::new(&copy)
        .env("DATABASE_URL", common::database_url())
        .args(["run", &name, "--", "echo", "ran"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut admin = admin();
    common::wait_for_waiters(&mut admin, &LockKey::from_name(&name), 1);
    std::fs::remove_file(&copy).unwrap();
    assert!(!Path::new(&copy).exists());
    drop(guard);
    let status = wait_exit(&mut run, LONG);
    let mut out = String::new();
    run.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(status.success(), "{}", child_stderr(&mut run));
    assert_eq!(out, "ran\n");
}

#[test]
fn help_documents_the_exit_codes() {
    let out = output(pglock().args(["run", "--help"]));
    assert!(out.status.success());
    let help = stdout(&out);
    for needle in [
        "128+N",
        "75 ",
        "64 ",
        "69 ",
        "70 ",
        "-E/--conflict-exit-code",
        "Transaction-scoped locks",
        "76 ",
        "PGLOCK_TOKEN",
        "lease - 2 x heartbeat - lease/10",
        "--slots",
        "AdvisorySemaphore",
        "--direct",
        "pg_is_in_recovery()",
        "idle_session_timeout = 0",
        "UTF-8",
        "--name",
    ] {
        assert!(help.contains(needle), "{needle:?} not in\n{help}");
    }
    let out = output(pglock().args(["--help"]));
    let help = stdout(&out);
    for needle in [
        "PGPASSWORD",
        "~/.pgpass",
        "PGSERVICE",
        "target_session_attrs",
    ] {
        assert!(help.contains(needle), "{needle:?} not in\n{help}");
    }
}

/// `-h` is short (about 25 lines, like flock(1)'s `--help`) and starts with `Usage:`;
/// `--help` is the complete one; NAME shows as required.
#[test]
fn short_help_is_short_and_usage_comes_first() {
    for args in [
        &["-h"][..],
        &["run", "-h"],
        &["lease", "acquire", "-h"],
        &["status", "-h"],
    ] {
        let out = output(pglock().args(args));
        assert!(out.status.success(), "{args:?}");
        let short = stdout(&out);
        assert!(short.starts_with("Usage: pglock"), "{args:?}:\n{short}");
        assert!(
            short.lines().count() <= 28,
            "{args:?}: {} lines:\n{short}",
            short.lines().count()
        );
        let mut long_args = args.to_vec();
        *long_args.last_mut().unwrap() = "--help";
        let long = stdout(&output(pglock().args(&long_args)));
        assert!(long.starts_with("Usage: pglock"), "{long_args:?}:\n{long}");
        assert!(long.len() > short.len(), "{long_args:?}");
    }
    let run = stdout(&output(pglock().args(["run", "-h"])));
    assert!(run.contains("<NAME>"), "{run}");
    assert!(!run.contains("--network-timeout"), "{run}");
    // --network-timeout's long text is said once, under its own heading.
    let long = stdout(&output(pglock().args(["run", "--help"])));
    assert_eq!(long.matches("tcp_user_timeout").count(), 1, "{long}");
}

/// `pglock run NAME cmd` without `--`: a usage error that says where the command goes.
#[test]
fn a_command_without_dashes_gets_a_hint() {
    let out = output(pglock().args(["run", "x", "echo", "hi"]));
    assert_eq!(out.status.code(), Some(64));
    let err = stderr(&out);
    assert!(err.contains("unexpected argument 'echo'"), "{err}");
    assert!(
        err.contains("hint: the command goes after `--`: pglock run NAME -- echo"),
        "{err}"
    );
}

/// The man page and the completions come from the clap definition.
#[test]
fn man_and_completions_are_printed() {
    let out = output(pglock().arg("man"));
    assert!(out.status.success(), "{}", stderr(&out));
    let page = stdout(&out);
    assert!(
        page.starts_with(".ie") || page.contains(".TH pglock"),
        "{page}"
    );
    assert!(page.contains("completions"), "{page}");
    let out = output(pglock().args(["man", "run"]));
    assert!(stdout(&out).contains(".TH pglock-run"), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("conflict\\-exit\\-code"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        output(pglock().args(["man", "nope"])).status.code(),
        Some(64)
    );
    for shell in ["bash", "zsh", "fish"] {
        let out = output(pglock().args(["completions", shell]));
        assert!(out.status.success(), "{shell}");
        assert!(stdout(&out).contains("conflict-exit-code"), "{shell}");
    }
    assert_eq!(
        output(pglock().args(["completions", "cmd.exe"]))
            .status
            .code(),
        Some(64)
    );
}

/// Before the lease table exists: a usage error (64), said once, that says how to create
/// it.
#[test]
fn a_missing_lease_table_is_a_usage_error_that_says_how_to_create_it() {
    let name = unique_name!();
    for args in [
        &[
            "lease",
            "acquire",
            &name,
            "--table",
            "pglock_cli_missing.nope",
        ][..],
        &[
            "run",
            &name,
            "--lease",
            "3",
            "--table",
            "pglock_cli_missing.nope",
            "--",
            "true",
        ],
    ] {
        let out = output(pglock().args(args));
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("--create-table"), "{err}");
        assert_eq!(
            err.matches("does not exist").count(),
            2,
            "said once (the server's, then ours): {err}"
        );
    }
}

/// The set of signals `pid` ignores, or catches, from `/proc/PID/status` (bit N-1 for N).
fn sig_mask(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap();
    u64::from_str_radix(line.trim(), 16).unwrap()
}

#[test]
fn signals_ignored_at_start_stay_ignored_in_pglock_and_the_command() {
    let name = unique_name!();
    let hup = 1u64 << (1 - 1);
    let term = 1u64 << (15 - 1);
    let mut run = Command::new("nohup")
        .arg(BIN)
        .args(["run", &name, "-c", "echo $$; exec sleep 1000"])
        .env("DATABASE_URL", common::database_url())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(run.stdout.take().unwrap());
    let child: u32 = line(&mut out).parse().unwrap();
    // nohup execs pglock: same pid.
    assert_ne!(
        sig_mask(run.id(), "SigIgn") & hup,
        0,
        "pglock ignores SIGHUP"
    );
    assert_eq!(
        sig_mask(run.id(), "SigCgt") & hup,
        0,
        "pglock does not catch SIGHUP"
    );
    assert_ne!(
        sig_mask(run.id(), "SigCgt") & term,
        0,
        "pglock catches SIGTERM"
    );
    assert_ne!(
        sig_mask(child, "SigIgn") & hup,
        0,
        "the command ignores SIGHUP"
    );
    signal(run.id(), "TERM");
    assert_eq!(wait_exit(&mut run, LONG).code(), Some(128 + 15));
}

// --- Leases and semaphores (`run --lease`, `run --slots`, `pglock lease ...`) ---

/// The PgBouncer in transaction mode that `ci/with-postgres` starts in front of the server.
fn bouncer_url() -> String {
    std::env::var("PGBOUNCER_URL").unwrap_or_else(|_| {
        panic!(
            "PGBOUNCER_URL is not set: these tests need a PgBouncer in pool_mode = \
             transaction; run them through ci/with-postgres, which starts one"
        )
    })
}

/// The lines of a log of "enter ..." and "exit ..." lines: the most that were inside at
/// once, after checking that every exit follows its own enter.
fn max_inside(text: &str) -> usize {
    let (mut inside, mut max) = (Vec::new(), 0);
    for line in text.lines() {
        match line.split_once(' ') {
            Some(("enter", who)) => {
                inside.push(who.to_owned());
                max = max.max(inside.len());
            }
            Some(("exit", who)) => {
                let at = inside.iter().position(|w| w == who);
                assert!(at.is_some(), "exit without enter:\n{text}");
                inside.remove(at.unwrap());
            }
            _ => panic!("bad line {line:?} in\n{text}"),
        }
    }
    assert!(inside.is_empty(), "{text}");
    max
}

/// Four `run --lease` at once, two of them through PgBouncer in transaction mode: never
/// two commands at once, and each run's PGLOCK_TOKEN is larger than the one before.
#[test]
fn lease_runs_never_overlap_also_through_pgbouncer_and_tokens_increase() {
    let name = unique_name!();
    let dir = scratch(&name);
    let log = dir.join("log");
    let script = format!(
        "echo enter $PGLOCK_TOKEN >> {0}; sleep 0.2; echo exit $PGLOCK_TOKEN >> {0}",
        log.display()
    );
    let bouncer = bouncer_url();
    let runs: Vec<Child> = (0..4)
        .map(|i| {
            let mut cmd = pglock();
            if i % 2 == 1 {
                cmd.args(["--dsn", &bouncer]);
            }
            cmd.args([
                "run",
                &name,
                "--lease",
                "5",
                "--create-table",
                "-w",
                "60",
                "-c",
                &script,
            ])
            .spawn()
            .unwrap()
        })
        .collect();
    for mut run in runs {
        assert!(wait_exit(&mut run, LONG).success());
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.lines().count(), 8, "{text}");
    assert_eq!(max_inside(&text), 1, "overlap:\n{text}");
    let tokens: Vec<i64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("enter "))
        .map(|t| t.parse().unwrap())
        .collect();
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");

    // The environment: the token, no advisory key.
    let out = output(pglock().args([
        "run",
        &name,
        "--lease",
        "5",
        "-c",
        "echo $PGLOCK_NAME $PGLOCK_HELD ${PGLOCK_KEY-nokey} ${PGLOCK_SLOT-noslot} $PGLOCK_TOKEN",
    ]));
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let fields: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(
        fields[..4],
        [name.as_str(), "1", "nokey", "noslot"],
        "{text}"
    );
    assert!(fields[4].parse::<i64>().unwrap() > *tokens.last().unwrap());
}

/// `--slots 2`, with advisory slot keys and with a lease semaphore: two holders at once,
/// a third finds every slot busy, and a crowd never has three commands at once.
#[test]
fn slots_admit_at_most_n_holders() {
    let base = unique_name!();
    for mode in [&[][..], &["--lease", "5", "--create-table"][..]] {
        let name = format!("{base}/{}", mode.len());
        let with = |args: &[&str]| -> Vec<String> {
            let mut v: Vec<String> = vec!["run".into(), name.clone(), "--slots".into(), "2".into()];
            v.extend(mode.iter().map(|s| s.to_string()));
            v.extend(args.iter().map(|s| s.to_string()));
            v
        };
        // Two holders that wait for their stdin to close.
        let mut holders: Vec<(Child, BufReader<ChildStdout>)> = (0..2)
            .map(|_| {
                let mut child = pglock()
                    .args(with(&["-c", "echo ready $PGLOCK_SLOT; read x; exit 0"]))
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap();
                let out = BufReader::new(child.stdout.take().unwrap());
                (child, out)
            })
            .collect();
        let mut slots: Vec<String> = holders.iter_mut().map(|(_, out)| line(out)).collect();
        slots.sort();
        assert_eq!(slots, ["ready 0", "ready 1"], "{mode:?}");
        let out = output(pglock().args(with(&["-n", "--", "true"])));
        assert_eq!(out.status.code(), Some(1), "{mode:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("all 2 slots"), "{}", stderr(&out));
        // One leaves: a waiter gets its slot.
        let (mut first, _) = holders.remove(0);
        drop(first.stdin.take());
        assert!(wait_exit(&mut first, LONG).success());
        let out = output(pglock().args(with(&["-w", "30", "--", "true"])));
        assert!(out.status.success(), "{mode:?}: {}", stderr(&out));
        let (mut second, _) = holders.remove(0);
        drop(second.stdin.take());
        assert!(wait_exit(&mut second, LONG).success());

        // A crowd.
        let log = scratch(&name).join("log");
        let script = format!(
            "echo enter $$ >> {0}; sleep 0.2; echo exit $$ >> {0}",
            log.display()
        );
        let runs: Vec<Child> = (0..6)
            .map(|_| {
                pglock()
                    .args(with(&["-w", "60", "-c", &script]))
                    .spawn()
                    .unwrap()
            })
            .collect();
        for mut run in runs {
            assert!(wait_exit(&mut run, LONG).success());
        }
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(text.lines().count(), 12, "{text}");
        let max = max_inside(&text);
        eprintln!("{mode:?}: at most {max} commands at once");
        assert!(max <= 2, "{mode:?}: {max} at once:\n{text}");
    }
}

/// `pglock key NAME --slots N` prints the advisory slot keys, and the SQL it prints takes
/// exactly the lock `run --slots` tries.
#[test]
fn key_slots_prints_the_keys_run_slots_takes() {
    let name = unique_name!();
    let out = output(pglock().args(["key", &name, "--slots", "2"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let mut admin = admin();
    let upper: i32 = admin
        .query_one("SELECT (hashtextextended($1, 0) >> 32)::int4", &[&name])
        .unwrap()
        .get(0);
    for slot in 0..2 {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("slot {slot}: ")))
            .unwrap_or_else(|| panic!("no slot {slot} in {text}"));
        assert!(line.contains(&format!("key {upper},{slot} ")), "{line}");
        assert!(line.contains(&format!("objid={slot} objsubid=2")), "{line}");
        let sql = line.split_once("sql: ").unwrap().1;
        admin.batch_execute(sql).unwrap();
    }
    let out = output(pglock().args(["run", &name, "--slots", "2", "-n", "--", "true"]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    admin
        .execute("SELECT pg_advisory_unlock($1, 1)", &[&upper])
        .unwrap();
    let out = output(pglock().args([
        "run",
        &name,
        "--slots",
        "2",
        "-n",
        "-c",
        "echo $PGLOCK_SLOT $PGLOCK_KEY",
    ]));
    assert_eq!(stdout(&out), format!("1 {upper},1\n"), "{}", stderr(&out));
}

/// Renewals blocked by a row lock held elsewhere: the command gets SIGTERM at the
/// holder's deadline and SIGKILL after --grace, and pglock exits with 75, all before the
/// lease can expire on the server (measured with the server's clock).
#[test]
fn a_lease_that_cannot_be_renewed_stops_the_command_before_it_expires_on_the_server() {
    let name = unique_name!();
    // A command that notes SIGTERM but goes on: only SIGKILL ends it.
    let script = "trap 'echo got TERM' TERM; echo ready; while :; do sleep 0.01; done";
    let (mut run, mut out) = spawn(&[
        "run",
        &name,
        "--lease",
        "6",
        "--grace",
        "1",
        "--create-table",
        "-c",
        script,
    ]);
    assert_eq!(line(&mut out), "ready");
    let mut admin = admin();
    let mut tx = admin.transaction().unwrap();
    // Lock the row: every renewal now waits (at most a heartbeat period) and fails.
    let expires_at: std::time::SystemTime = tx
        .query_one(
            "SELECT expires_at FROM pglock_leases WHERE name = $1 AND slot = 0 FOR UPDATE",
            &[&name],
        )
        .unwrap()
        .get(0);
    let locked = Instant::now();
    let left = |tx: &mut postgres::Transaction<'_>| -> f64 {
        tx.query_one(
            "SELECT extract(epoch FROM $1 - clock_timestamp())::float8",
            &[&expires_at],
        )
        .unwrap()
        .get(0)
    };
    assert_eq!(line(&mut out), "got TERM");
    let at_term = left(&mut tx);
    let status = wait_exit(&mut run, LONG);
    let at_exit = left(&mut tx);
    eprintln!(
        "SIGTERM {at_term:.3} s and pglock's exit {at_exit:.3} s before the server's expiry \
         ({:?} after the row lock)",
        locked.elapsed()
    );
    assert_eq!(status.code(), Some(75), "{}", child_stderr(&mut run));
    assert!(at_term > 1.0, "SIGTERM only {at_term} s before expiry");
    assert!(at_exit > 0.0, "pglock exited {} s after expiry", -at_exit);
    // The row was never renewed meanwhile: the expiry measured against is the real one.
    let now_expires: std::time::SystemTime = tx
        .query_one(
            "SELECT expires_at FROM pglock_leases WHERE name = $1 AND slot = 0",
            &[&name],
        )
        .unwrap()
        .get(0);
    assert_eq!(now_expires, expires_at);
    tx.rollback().unwrap();
    let err = child_stderr(&mut run);
    assert!(err.contains("lost the lease"), "{err}");
    assert!(err.contains("killed by SIGKILL"), "{err}");
}

/// The server says the lease is gone (its row was deleted): the command gets SIGTERM at
/// the next heartbeat, and pglock exits with 75.
#[test]
fn a_lease_deleted_on_the_server_stops_the_command() {
    let name = unique_name!();
    let script = "trap 'echo got TERM; exit 0' TERM; echo ready; while :; do sleep 0.01; done";
    let (mut run, mut out) = spawn(&["run", &name, "--lease", "3", "--create-table", "-c", script]);
    assert_eq!(line(&mut out), "ready");
    let mut admin = admin();
    admin
        .execute("DELETE FROM pglock_leases WHERE name = $1", &[&name])
        .unwrap();
    let start = Instant::now();
    assert_eq!(line(&mut out), "got TERM");
    let took = start.elapsed();
    assert_eq!(wait_exit(&mut run, LONG).code(), Some(75));
    eprintln!("SIGTERM {took:?} after the row was deleted (heartbeat every 1 s)");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

/// `pglock lease acquire` holds a lease past its own exit; `heartbeat` and `release` act
/// by token; a stale token exits with 76; `get` shows the row. Through PgBouncer too, and
/// in a table of one's own.
#[test]
fn lease_commands_hold_a_lease_across_steps_by_token() {
    let name = unique_name!();
    admin()
        .batch_execute("CREATE SCHEMA IF NOT EXISTS pglock_cli")
        .unwrap();
    let table = ["--table", "pglock_cli.leases"];
    let lease = |dsn: &str, args: &[&str]| -> Output {
        output(
            pglock()
                .args(["--dsn", dsn, "lease"])
                .args(args)
                .args(table),
        )
    };
    let direct = common::database_url();
    let bouncer = bouncer_url();
    let json = |out: &Output| -> serde_json::Value {
        assert!(out.status.success(), "{}", stderr(out));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(out)))
    };
    let acquired = json(&lease(
        &bouncer,
        &[
            "acquire",
            &name,
            "--create-table",
            "--lease",
            "30",
            "--owner",
            "deploy 42",
            "--data",
            "v1.2",
            "--json",
        ],
    ));
    assert_eq!(acquired["name"], name.as_str());
    assert_eq!(acquired["expires_in_ms"], 30_000);
    let token = acquired["token"].as_i64().unwrap();
    let t = token.to_string();

    // Still held after pglock exited.
    let out = lease(&direct, &["acquire", &name]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("\"deploy 42\""), "{}", stderr(&out));
    let row = json(&lease(&direct, &["get", &name, "--json"]));
    assert_eq!(row["held"], true);
    assert_eq!(row["token"], token);
    assert_eq!(row["owner"], "deploy 42");
    assert_eq!(row["data"], "v1.2");
    assert_eq!(row["lease_ms"], 30_000);
    let left = row["expires_in_ms"].as_u64().unwrap();
    assert!(left > 0 && left <= 30_000, "{row}");

    let beat = json(&lease(
        &bouncer,
        &["heartbeat", &name, "--token", &t, "--json"],
    ));
    assert_eq!(beat["token"], token);
    assert_eq!(beat["expires_in_ms"], 30_000);
    let stale = (token - 1).to_string();
    for step in ["heartbeat", "release"] {
        let out = lease(&direct, &[step, &name, "--token", &stale]);
        assert_eq!(out.status.code(), Some(76), "{step}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("does not hold the lease"),
            "{}",
            stderr(&out)
        );
    }
    let released = json(&lease(
        &bouncer,
        &["release", &name, "--token", &t, "--json"],
    ));
    assert_eq!(released["released"], true);
    for step in ["heartbeat", "release"] {
        let out = lease(&direct, &[step, &name, "--token", &t]);
        assert_eq!(
            out.status.code(),
            Some(76),
            "{step} after release: {}",
            stderr(&out)
        );
    }
    let row = json(&lease(&direct, &["get", &name, "--json"]));
    assert_eq!(row["held"], false);
    assert_eq!(row["expires_in_ms"], 0);
    let text = stdout(&lease(&direct, &["get", &name]));
    assert!(text.contains("free: last held by \"deploy 42\""), "{text}");

    // Taken again: a larger token (plain output: the token alone). Left to expire, its
    // token goes stale by itself.
    let out = lease(&direct, &["acquire", &name, "--lease", "0.5"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let again: i64 = stdout(&out).trim().parse().unwrap();
    assert!(again > token);
    wait_until("the lease expires", LONG, || {
        json(&lease(&direct, &["get", &name, "--json"]))["held"] == false
    });
    let out = lease(
        &direct,
        &["heartbeat", &name, "--token", &again.to_string()],
    );
    assert_eq!(out.status.code(), Some(76), "{}", stderr(&out));
    // A name never taken.
    let row = json(&lease(
        &direct,
        &["get", &format!("{name}/never"), "--json"],
    ));
    assert_eq!(row["held"], false);
    assert_eq!(row["token"], serde_json::Value::Null);
}

#[test]
fn lease_and_slot_options_that_cannot_work_are_usage_errors() {
    let usage = |args: &[&str]| {
        let out = output(pglock().args(args));
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
        stderr(&out)
    };
    // --grace must end before the lease can expire on the server.
    let err = usage(&["run", "x", "--lease", "3", "--grace", "1", "--", "true"]);
    assert!(
        err.contains("--grace 1.000 s does not fit --lease 3.000 s"),
        "{err}"
    );
    assert!(err.contains("at most"), "{err}");
    usage(&["run", "x", "--lease", "30", "--grace", "7.5", "--", "true"]);
    usage(&[
        "run",
        "x",
        "--lease",
        "3",
        "--heartbeat",
        "1.5",
        "--",
        "true",
    ]);
    usage(&["run", "x", "--lease", "0", "--", "true"]);
    usage(&[
        "run", "x", "--lease", "3", "--table", "bad-name", "--", "true",
    ]);
    usage(&["run", "x", "--table", "t", "--", "true"]);
    usage(&["run", "x", "--notify", "--", "true"]);
    usage(&["run", "x", "--heartbeat", "1", "--", "true"]);
    usage(&["run", "x", "--slots", "0", "--", "true"]);
    usage(&["run", "x", "--slots", "2", "-s", "--", "true"]);
    usage(&["run", "x", "--lease", "3", "-s", "--", "true"]);
    usage(&["lease", "heartbeat", "x"]);
    usage(&["lease", "release", "x", "--token", "soon"]);
    usage(&["lease", "acquire", ""]);
    usage(&["lease", "get", "x", "--table", "a.b.c"]);
}

// --- Sessions an advisory lock cannot trust, and session settings ---

/// The server's host and port, from `DATABASE_URL`.
fn server_host_port() -> (String, u16) {
    let config = common::config();
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(h)) => h.clone(),
        Some(postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_owned(),
    };
    (host, config.get_ports().first().copied().unwrap_or(5432))
}

/// An advisory run through a transaction-mode pooler is refused (69), naming `--lease`;
/// `--direct` skips the check. (`--lease` through it works:
/// `lease_runs_never_overlap_also_through_pgbouncer_and_tokens_increase`.)
#[test]
fn an_advisory_run_through_a_transaction_mode_pooler_is_refused() {
    let name = unique_name!();
    let bouncer = bouncer_url();
    let out = output(pglock().args(["--dsn", &bouncer, "run", &name, "--", "echo", "ran"]));
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    assert_eq!(stdout(&out), "", "the command must not run");
    let err = stderr(&out);
    assert!(err.contains("pooler"), "{err}");
    assert!(err.contains("--lease"), "{err}");
    assert!(err.contains("--direct"), "{err}");
    // Slots are session advisory locks too.
    let out = output(pglock().args([
        "--dsn", &bouncer, "run", "--slots", "2", &name, "--", "echo", "ran",
    ]));
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    // --direct: the user's word against the ports' (a NAT, a published port).
    let out = output(pglock().args([
        "--dsn", &bouncer, "run", "--direct", &name, "--", "echo", "ran",
    ]));
    assert_eq!(stdout(&out), "ran\n", "{}", stderr(&out));
    // A direct connection passes the check.
    let out = output(pglock().args(["run", &name, "--", "echo", "ran"]));
    assert_eq!(stdout(&out), "ran\n", "{}", stderr(&out));
}

/// A role's `idle_session_timeout` does not end pglock's own session while the command
/// runs and pglock sends nothing.
#[test]
fn idle_session_timeout_does_not_end_a_long_run() {
    let name = unique_name!();
    let role = "pglock_cli_idle_session";
    let mut admin = admin();
    admin
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN;
             ALTER ROLE {role} SET idle_session_timeout = '500ms'"
        ))
        .unwrap();
    let version: i32 = admin
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .unwrap()
        .get(0);
    let (host, port) = server_host_port();
    let dsn = format!("host={host} port={port} user={role} dbname=postgres");
    let out = output(pglock().args(["--dsn", &dsn, "run", &name, "--", "sleep", "2"]));
    admin.batch_execute(&format!("DROP ROLE {role}")).unwrap();
    if version < 140000 {
        eprintln!("PostgreSQL before 14 has no idle_session_timeout");
    }
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// pglock hashes UTF-8 bytes; a database in another encoding hashes a non-ASCII name
/// differently. `run` and `key --dsn` say so.
#[test]
fn a_non_ascii_name_in_a_non_utf8_database_is_warned_about() {
    let db = "pglock_cli_latin1";
    let mut admin = admin();
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db}"))
        .unwrap();
    admin
        .batch_execute(&format!(
            "CREATE DATABASE {db} ENCODING 'LATIN1' TEMPLATE template0 \
             LC_COLLATE 'C' LC_CTYPE 'C'"
        ))
        .unwrap();
    let (host, port) = server_host_port();
    let dsn = format!("host={host} port={port} user=postgres dbname={db}");
    let name = format!("{}/café", unique_name!());
    let out = output(pglock().args(["--dsn", &dsn, "run", &name, "--", "true"]));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("encoding is LATIN1"),
        "{}",
        stderr(&out)
    );
    let out = output(pglock().args(["--dsn", &dsn, "key", &name]));
    assert!(
        stderr(&out).contains("encoding is LATIN1"),
        "{}",
        stderr(&out)
    );
    // ASCII names, and UTF-8 databases, are fine.
    let out = output(pglock().args(["--dsn", &dsn, "run", "ascii", "--", "true"]));
    assert_eq!(stderr(&out), "");
    let out = output(pglock().args(["run", &name, "--", "true"]));
    assert_eq!(stderr(&out), "");
    admin.batch_execute(&format!("DROP DATABASE {db}")).unwrap();
}

#[test]
fn a_name_may_start_with_a_hyphen() {
    let name = format!("-{}", unique_name!());
    for args in [
        vec![
            "run",
            "-n",
            "--",
            &name,
            "--",
            "sh",
            "-c",
            "echo $PGLOCK_NAME",
        ],
        vec![
            "run",
            "-n",
            "--name",
            &name,
            "--",
            "sh",
            "-c",
            "echo $PGLOCK_NAME",
        ],
    ] {
        let out = output(pglock().args(&args));
        assert_eq!(
            stdout(&out),
            format!("{name}\n"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}

/// The hot standby that `ci/with-postgres` streams from the test server: its port.
fn standby_port() -> u16 {
    let url = std::env::var("STANDBY_URL").unwrap_or_else(|_| {
        panic!(
            "\n\nSTANDBY_URL is not set: this test needs a hot standby of DATABASE_URL.\n\
             Run the tests through ci/with-postgres, which starts one.\n\n"
        )
    });
    let config: postgres::Config = url.parse().expect("STANDBY_URL");
    config.get_ports().first().copied().unwrap_or(5432)
}

/// An advisory lock on a hot standby excludes nobody on the primary: refused (69).
/// With several hosts, pglock asks for the primary (target_session_attrs=read-write).
#[test]
fn a_standby_is_refused_and_several_hosts_mean_the_primary() {
    let name = unique_name!();
    let standby_port = standby_port();
    let standby_url = format!("postgres://postgres@127.0.0.1:{standby_port}/postgres");
    let out = output(pglock().args(["--dsn", &standby_url, "run", &name, "--", "echo", "ran"]));
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    assert_eq!(stdout(&out), "");
    assert!(stderr(&out).contains("standby"), "{}", stderr(&out));

    let (host, port) = server_host_port();
    let both =
        format!("host=127.0.0.1,{host} port={standby_port},{port} user=postgres dbname=postgres");
    let out = output(pglock().args(["--dsn", &both, "run", &name, "--", "echo", "ran"]));
    assert_eq!(stdout(&out), "ran\n", "{}", stderr(&out));
}

/// On a terminal (a pseudo-terminal from script(1)), the command's group gets the
/// terminal: it reads it without being stopped (SIGTTIN), and Ctrl-C reaches it.
#[test]
fn on_a_terminal_the_command_reads_it_and_gets_ctrl_c() {
    use std::io::Write;
    let name = unique_name!();
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("no script(1): skipped");
        return;
    }
    let inner = "read l; echo got $l; trap 'echo got INT; exit 5' INT; echo ready; \
                 while :; do sleep 0.01; done";
    let cmd = format!(
        "exec {BIN} run '{name}' -- sh -c \"{inner}\"",
        inner = inner.replace('"', "\\\"").replace('$', "\\$")
    );
    let mut run = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("DATABASE_URL", common::database_url())
        .env("SHELL", "/bin/sh")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let out = BufReader::new(run.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in out.lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut stdin = run.stdin.take().unwrap();
    let expect = |want: &str| loop {
        let line = rx
            .recv_timeout(LONG)
            .unwrap_or_else(|_| panic!("no {want:?}"));
        if line.trim_end().ends_with(want) {
            break;
        }
    };
    stdin.write_all(b"hello\n").unwrap();
    expect("got hello");
    expect("ready");
    stdin.write_all(b"\x03").unwrap();
    expect("got INT");
    let status = wait_exit(&mut run, LONG);
    assert_eq!(status.code(), Some(5), "{}", child_stderr(&mut run));
}

/// `PGPASSFILE` (else `~/.pgpass`) is read as libpq reads it, and, like libpq, refused
/// when others may read it. (The test server trusts every login, so the password's use
/// itself is pinned by the unit test `pgpass_lines_match_like_libpq`.)
#[test]
fn a_password_file_others_may_read_is_not_read() {
    use std::os::unix::fs::PermissionsExt;
    let name = unique_name!();
    let dir = scratch(&name);
    let file = dir.join("pgpass");
    std::fs::write(&file, "*:*:*:*:not-used\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = output(
        pglock()
            .env("PGPASSFILE", &file)
            .args(["run", &name, "--", "true"]),
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("group or world access"),
        "{}",
        stderr(&out)
    );
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = output(
        pglock()
            .env("PGPASSFILE", &file)
            .args(["run", &name, "--", "true"]),
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stderr(&out), "");
}
