//! Child supervision for `pglock run`: the command's state as the signal thread sees it,
//! the signals forwarded to its process group, its termination (SIGTERM, then SIGKILL
//! after a grace period), its reaping, the terminal handed to it, and its exit code.
//! No SQL here, and no import of pglock's commands.

use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ExitStatus};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use signal_hook::iterator::exfiltrator::WithOrigin;
use signal_hook::iterator::SignalsInfo;

use crate::fail::{Fail, EX_SOFTWARE};

/// The signals forwarded to the command's process group.
pub(crate) const FORWARDED: [Signal; 6] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// Cancels a wait on the server: sends the cancel request (over TLS when the
/// connection uses it).
pub(crate) type Canceller = Box<dyn Fn() + Send>;

/// Where the command is, for the signal thread.
pub(crate) enum ChildState {
    /// Not started yet: a signal cancels the wait (if any) and ends pglock.
    Waiting(Option<Canceller>),
    /// Running, in the process group with this id (the supervisor's pid; its leader is
    /// not reaped yet, so the id cannot be reused).
    Running(Pid),
    /// Reaped: nothing to signal.
    Reaped,
}

pub(crate) type Shared = Arc<Mutex<ChildState>>;

pub(crate) fn state(shared: &Shared) -> MutexGuard<'_, ChildState> {
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// SIGTERM to the command's group, then SIGKILL to the group after `grace` (or as soon
/// as the command itself ended); reaps the supervisor.
pub(crate) fn terminate(
    child: &mut Supervised,
    shared: &Shared,
    grace: Duration,
) -> Result<ExitStatus, Fail> {
    let group = Pid::from_raw(child.child.id() as i32);
    // Not reaped yet (only this thread reaps), so the group id is still the command's.
    let _ = killpg(group, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    loop {
        if let Some(status) = reap(child, shared)? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = killpg(group, Signal::SIGKILL);
            let status = child
                .child
                .wait()
                .map_err(|e| Fail::internal(format!("cannot wait for the command: {e}")))?;
            child.reaped(shared);
            return Ok(status);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Reaps the supervisor once it exited (with the command's status), after SIGKILL to
/// whatever is left of its process group: the command's own children, still running,
/// would otherwise run on without the lock. Done under the state lock, so that the
/// signal thread never signals a group whose id could be reused.
pub(crate) fn reap(child: &mut Supervised, shared: &Shared) -> Result<Option<ExitStatus>, Fail> {
    let _st = state(shared);
    let group = Pid::from_raw(child.child.id() as i32);
    // WNOWAIT: the exited supervisor stays a zombie, so its pid (the group's id) cannot
    // be reused until it is reaped below.
    let exited = match waitid(
        Id::Pid(group),
        WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
    ) {
        Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) => true,
        Ok(_) => false,
        Err(e) => return Err(Fail::internal(format!("cannot wait for the command: {e}"))),
    };
    if !exited {
        return Ok(None);
    }
    let _ = killpg(group, Signal::SIGKILL);
    drop(_st);
    let status = child
        .child
        .wait()
        .map_err(|e| Fail::internal(format!("cannot wait for the command: {e}")))?;
    child.reaped(shared);
    Ok(Some(status))
}

/// The supervisor, and the terminal it may have been given.
pub(crate) struct Supervised {
    pub(crate) child: Child,
    terminal: Option<Terminal>,
}

impl Supervised {
    /// Spawns `command` (the supervisor, which leads a new process group) and marks it
    /// running for the signal thread; hands it the terminal if pglock's group had it.
    /// Called from the main thread, which lives as long as pglock: the parent-death
    /// signal follows the thread that forked, not the process.
    pub(crate) fn start(
        command: &mut std::process::Command,
        shared: &Shared,
    ) -> Result<Supervised, Fail> {
        use std::os::unix::process::CommandExt;
        command.process_group(0);
        let terminal = Terminal::foreground();
        let child = {
            let mut st = state(shared);
            let child = command
                .spawn()
                .map_err(|e| Fail::internal(format!("cannot start the command: {e}")))?;
            *st = ChildState::Running(Pid::from_raw(child.id() as i32));
            child
        };
        let mut child = Supervised { child, terminal };
        child.hand_over_terminal();
        Ok(child)
    }

    /// Makes the command's group the terminal's foreground group, if pglock's was: a
    /// terminal's Ctrl-C and Ctrl-\ then go to the command's group directly, and a
    /// command that reads the terminal is not stopped (SIGTTIN) for being in the
    /// background. A command that already tried to and was stopped is continued.
    fn hand_over_terminal(&mut self) {
        if self.terminal.is_some() {
            let group = Pid::from_raw(self.child.id() as i32);
            if nix::unistd::tcsetpgrp(std::io::stdin(), group).is_ok() {
                let _ = killpg(group, Signal::SIGCONT);
            } else {
                self.terminal = None;
            }
        }
    }

    /// Marks the supervisor reaped, and takes the terminal back.
    fn reaped(&mut self, shared: &Shared) {
        *state(shared) = ChildState::Reaped;
        if let Some(terminal) = self.terminal.take() {
            // pglock is in the background now: SIGTTOU is blocked in this thread, so
            // that the kernel lets it take the terminal back.
            let _ = nix::unistd::tcsetpgrp(std::io::stdin(), terminal.pglock_group);
        }
    }
}

/// pglock's process group, when it was the foreground group of the terminal on stdin.
struct Terminal {
    pglock_group: Pid,
}

impl Terminal {
    fn foreground() -> Option<Terminal> {
        use std::io::IsTerminal;
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        let group = nix::unistd::getpgrp();
        if nix::unistd::tcgetpgrp(&stdin).ok()? != group {
            return None;
        }
        // Taking the terminal back from the background needs SIGTTOU blocked (in this,
        // the main thread, which does it; children start with an empty mask).
        let mut ttou = nix::sys::signal::SigSet::empty();
        ttou.add(Signal::SIGTTOU);
        nix::sys::signal::pthread_sigmask(
            nix::sys::signal::SigmaskHow::SIG_BLOCK,
            Some(&ttou),
            None,
        )
        .ok()?;
        Some(Terminal {
            pglock_group: group,
        })
    }
}

/// The command's exit code, or 128+N for death by signal N.
pub(crate) fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(signal)) => (128 + signal) as u8,
        (None, None) => EX_SOFTWARE,
    }
}

pub(crate) fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => match Signal::try_from(signal) {
            Ok(s) => format!("killed by {s}"),
            Err(_) => format!("killed by signal {signal}"),
        },
        (None, None) => status.to_string(),
    }
}

/// Starts the thread that forwards signals to the command. Signals that were ignored
/// when pglock started (`nohup`, a shell's background job) stay ignored, in pglock and,
/// through `exec`, in the command.
pub(crate) fn forward_signals(shared: &Shared) -> Result<(), Fail> {
    let ignored = ignored_signals();
    let wanted: Vec<i32> = FORWARDED
        .iter()
        .map(|&s| s as i32)
        .filter(|&s| ignored & (1u64 << (s - 1)) == 0)
        .collect();
    let mut signals = SignalsInfo::<WithOrigin>::new(&wanted)
        .map_err(|e| Fail::internal(format!("cannot install signal handlers: {e}")))?;
    let shared = Arc::clone(shared);
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for origin in signals.forever() {
                let signal = origin.signal;
                let st = state(&shared);
                match &*st {
                    ChildState::Waiting(cancel) => {
                        eprintln!(
                            "pglock: {} before the command started; giving up",
                            signal_name(signal)
                        );
                        if let Some(cancel) = cancel {
                            cancel();
                        }
                        // The connection closes with the process: the server frees a
                        // lock just granted.
                        std::process::exit(128 + signal);
                    }
                    // Whoever sent it (a terminal's Ctrl-C included, when pglock's group
                    // kept the terminal): the command's group is not pglock's, so the
                    // signal goes to the whole group.
                    ChildState::Running(group) => {
                        if let Ok(s) = Signal::try_from(signal) {
                            let _ = killpg(*group, s);
                        }
                    }
                    ChildState::Reaped => {}
                }
            }
        })
        .map_err(|e| Fail::internal(format!("cannot start the signal thread: {e}")))?;
    Ok(())
}

fn signal_name(signal: i32) -> String {
    Signal::try_from(signal).map_or_else(|_| format!("signal {signal}"), |s| s.to_string())
}

/// The set of ignored signals, from `SigIgn` in `/proc/self/status` (bit N-1 for signal
/// N); empty if it cannot be read.
pub(crate) fn ignored_signals() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| parse_sigign(&status))
        .unwrap_or(0)
}

fn parse_sigign(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("SigIgn:"))?;
    u64::from_str_radix(line["SigIgn:".len()..].trim(), 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigign_is_read_from_proc_status() {
        let status = "Name:\tx\nSigBlk:\t0000000000000000\nSigIgn:\t0000000000001001\n";
        // SIGHUP (1) and SIGPIPE (13).
        assert_eq!(parse_sigign(status), Some(0x1001));
        assert_eq!(parse_sigign("Name: x\n"), None);
    }

    #[test]
    fn exit_codes_pass_through() {
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(15)), 143);
        assert_eq!(exit_code(ExitStatus::from_raw(9)), 137);
    }
}
