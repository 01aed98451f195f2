//! The supervisor between `pglock run` and its command: `pglock __exec PARENT_PID --
//! COMMAND ARGS...`.
//!
//! pglock starts a copy of itself (`/proc/self/exe`) as the leader of a new process
//! group, and that copy starts the command in the same group. Everything the command
//! starts (`sleep 300 | cat`, a forking script) stays in that group unless it leaves it
//! on purpose (`setsid`, `setpgid`), so one `kill(-PGID)` reaches all of it. pglock
//! signals the group, never a single process: forwarded signals, SIGTERM and SIGKILL
//! when the lock is lost, and SIGKILL to whatever is left in the group once the command
//! exits, before the unlock.
//!
//! If pglock itself dies (SIGKILL included), nothing in pglock can act. Linux's
//! parent-death signal (`PR_SET_PDEATHSIG`) is what reacts: the supervisor sets it on
//! itself with a safe wrapper (setting it in the command between `fork` and `exec` would
//! take `unsafe`), to [`PARENT_DEATH`], a signal it catches, and then checks that its
//! parent is still the pglock that started it (if pglock died before the signal was set,
//! nothing would ever send it). On that signal, or on any signal received once its
//! parent changed, it SIGKILLs its whole group (itself included). Otherwise it waits for
//! the command and ends the way the command ended: the same exit code, or death by the
//! same signal, so pglock sees the command's status.

use std::ffi::{OsStr, OsString};
use std::process::Command;
use std::sync::{Arc, Mutex};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::{getpgrp, getppid};
use signal_hook::iterator::Signals;

/// The hidden subcommand.
pub(crate) const SUBCOMMAND: &str = "__exec";

/// The program that starts the supervisor: this very binary. `/proc/self/exe` names it
/// even after it was replaced or deleted on disk (an upgrade during a long run), where
/// `std::env::current_exe()` returns a path that no longer exists.
pub(crate) const SELF_EXE: &str = "/proc/self/exe";

/// The supervisor's parent-death signal: one pglock never sends to the group, so that
/// receiving it means pglock is gone. (The parent is checked on every signal anyway.)
pub(crate) const PARENT_DEATH: Signal = Signal::SIGALRM;

/// The supervisor's command line before the command: `__exec PARENT_PID --`.
pub(crate) fn prefix(parent: u32) -> [OsString; 3] {
    [SUBCOMMAND.into(), parent.to_string().into(), "--".into()]
}

/// Runs the supervisor: `args` is `PARENT_PID -- COMMAND ARGS...`. Never returns.
pub(crate) fn trampoline(args: &[OsString]) -> ! {
    let (parent, command) = match args {
        [parent, dashes, command @ ..] if dashes == "--" && !command.is_empty() => {
            match parent.to_str().and_then(|p| p.parse::<i32>().ok()) {
                Some(parent) => (parent, command),
                None => die("internal: bad supervisor arguments"),
            }
        }
        _ => die("internal: bad supervisor arguments"),
    };
    let mut signals = catch_signals();
    if let Err(e) = nix::sys::prctl::set_pdeathsig(PARENT_DEATH) {
        die(&format!("cannot set the parent-death signal: {e}"));
    }
    if getppid().as_raw() != parent {
        // pglock died before the signal was set: nobody holds the lock for us.
        std::process::exit(i32::from(crate::fail::EX_SOFTWARE));
    }
    // Held while the command is being started, so that pglock's death in the meantime is
    // acted on only once the command exists (and is killed with the group).
    let spawning = Arc::new(Mutex::new(()));
    let guard = spawning.lock().unwrap_or_else(|p| p.into_inner());
    let watcher = Arc::clone(&spawning);
    let started = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for _ in signals.forever() {
                if getppid().as_raw() != parent {
                    let _spawned = watcher.lock().unwrap_or_else(|p| p.into_inner());
                    // pglock is gone, and with it the lock: the whole group goes too.
                    let _ = killpg(getpgrp(), Signal::SIGKILL);
                    std::process::exit(i32::from(crate::fail::EX_SOFTWARE));
                }
            }
        });
    if let Err(e) = started {
        die(&format!("cannot start the signal thread: {e}"));
    }

    let program: &OsStr = &command[0];
    let mut child = match Command::new(program).args(&command[1..]).spawn() {
        Ok(child) => child,
        Err(err) => {
            eprintln!("pglock: cannot run {}: {err}", program.to_string_lossy());
            // The shell's convention (also env(1), timeout(1)): 127 not found, 126 not
            // runnable.
            std::process::exit(if err.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            })
        }
    };
    drop(guard);
    // pglock may have died while the command was being started, before the watcher got
    // the lock: it checks the parent again below only if a signal came; check here too.
    if getppid().as_raw() != parent {
        let _ = killpg(getpgrp(), Signal::SIGKILL);
    }
    let status = match child.wait() {
        Ok(status) => status,
        Err(e) => die(&format!("cannot wait for the command: {e}")),
    };
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => std::process::exit(code),
        (None, Some(signal)) => {
            // Die of the same signal: restore its default action, and raise it.
            let _ = signal_hook::low_level::emulate_default_handler(signal);
            std::process::exit(128 + signal)
        }
        (None, None) => std::process::exit(i32::from(crate::fail::EX_SOFTWARE)),
    }
}

/// Catches the forwarded signals and [`PARENT_DEATH`]. Signals that reach the group
/// (forwarded by pglock) reach the command directly; the supervisor only has to survive
/// them. Signals ignored when pglock started stay ignored (not caught here), so that the
/// command inherits them ignored.
fn catch_signals() -> Signals {
    let ignored = crate::child::ignored_signals();
    let mut caught: Vec<i32> = crate::child::FORWARDED
        .iter()
        .map(|&s| s as i32)
        .filter(|&s| ignored & (1u64 << (s - 1)) == 0)
        .collect();
    caught.push(PARENT_DEATH as i32);
    match Signals::new(&caught) {
        Ok(signals) => signals,
        Err(e) => die(&format!("cannot install signal handlers: {e}")),
    }
}

fn die(msg: &str) -> ! {
    eprintln!("pglock: {msg}");
    std::process::exit(i32::from(crate::fail::EX_SOFTWARE))
}
