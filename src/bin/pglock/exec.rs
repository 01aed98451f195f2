//! The trampoline between `pglock run` and its command: `pglock __exec PARENT_PID --
//! COMMAND ARGS...`.
//!
//! Linux's parent-death signal (`PR_SET_PDEATHSIG`) is what keeps the command from
//! outliving pglock, even when pglock is killed with SIGKILL. Setting it for a child
//! between `fork` and `exec` would take `unsafe` (`pre_exec`); instead pglock starts
//! itself (`/proc/self/exe`) as the child, which sets the signal on itself with a safe
//! wrapper, checks that its parent is still the pglock that started it (if pglock died
//! before the signal was set, nothing would ever send it), and `exec`s the command in
//! its own place. The signal survives `exec` (except into a set-user-ID program).

use std::ffi::{OsStr, OsString};
use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::sys::signal::Signal;

/// The hidden subcommand.
pub(crate) const SUBCOMMAND: &str = "__exec";

/// The program that starts the trampoline: this very binary. `/proc/self/exe` names it
/// even after it was replaced or deleted on disk (an upgrade during a long run), where
/// `std::env::current_exe()` returns a path that no longer exists.
pub(crate) const SELF_EXE: &str = "/proc/self/exe";

/// The trampoline's command line before the command: `__exec PARENT_PID --`.
pub(crate) fn prefix(parent: u32) -> [OsString; 3] {
    [SUBCOMMAND.into(), parent.to_string().into(), "--".into()]
}

/// Runs the trampoline: `args` is `PARENT_PID -- COMMAND ARGS...`. Never returns.
pub(crate) fn trampoline(args: &[OsString]) -> ! {
    let (parent, command) = match args {
        [parent, dashes, command @ ..] if dashes == "--" && !command.is_empty() => {
            match parent.to_str().and_then(|p| p.parse::<i32>().ok()) {
                Some(parent) => (parent, command),
                None => die("internal: bad trampoline arguments"),
            }
        }
        _ => die("internal: bad trampoline arguments"),
    };
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        die(&format!("cannot set the parent-death signal: {e}"));
    }
    if nix::unistd::getppid().as_raw() != parent {
        // pglock died before the signal was set: nobody holds the lock for us.
        std::process::exit(i32::from(crate::EX_SOFTWARE));
    }
    let program: &OsStr = &command[0];
    let err = Command::new(program).args(&command[1..]).exec();
    eprintln!("pglock: cannot run {}: {err}", program.to_string_lossy());
    // The shell's convention (also env(1), timeout(1)): 127 not found, 126 not runnable.
    std::process::exit(if err.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    })
}

fn die(msg: &str) -> ! {
    eprintln!("pglock: {msg}");
    std::process::exit(i32::from(crate::EX_SOFTWARE))
}
