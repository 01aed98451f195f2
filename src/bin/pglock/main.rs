//! `pglock`: distributed locks on PostgreSQL advisory locks, from the shell.
//!
//! `pglock run NAME -- COMMAND...` runs a command while holding a session advisory lock
//! (or a lease, `--lease`, or one of N slots, `--slots`); `pglock key NAME` prints the key;
//! `pglock status [NAME]` shows holders and waiters; `pglock lease acquire|heartbeat|
//! release|get NAME` holds a lease across separate steps of a pipeline.
//! Built only with the `cli` feature. Linux only (the child's parent-death signal).
#![forbid(unsafe_code)]
#![warn(rust_2018_idioms)]

// Modules depend one way, top to bottom: the commands (run, lease, show) over lock
// acquisition (acquire), child supervision (child, exec), the connection (conn), and
// the leaves: formatting (format) and failures (fail).
mod acquire;
mod args;
mod child;
mod conn;
mod exec;
mod fail;
mod format;
mod lease;
mod libpq;
mod run;
mod show;
mod tls;

use std::ffi::OsString;
use std::process::ExitCode;

use crate::args::Command;
use crate::fail::EX_USAGE;

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    // The trampoline through which `run` starts its child (hidden, see exec.rs).
    if argv.get(1).is_some_and(|a| a == exec::SUBCOMMAND) {
        exec::trampoline(&argv[2..]);
    }
    let cli = match args::parse(&argv) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            if let Some(hint) = args::hint(&e, &argv) {
                eprintln!("{hint}");
            }
            return ExitCode::from(if e.use_stderr() { EX_USAGE } else { 0 });
        }
    };
    let result = match cli.command {
        Command::Run(args) => args.resolved().and_then(|args| run::run(&cli.conn, args)),
        Command::Key { name, slots } => show::key(&name, slots, &cli.conn),
        Command::Lease(command) => lease::command(&cli.conn, command),
        Command::Status { name, json } => show::status(&cli.conn, name.as_deref(), json),
        Command::Man { command } => show::man(command.as_deref()),
        Command::Completions { shell } => {
            let mut cmd = args::command();
            clap_complete::generate(shell, &mut cmd, "pglock", &mut std::io::stdout());
            Ok(0)
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(fail) => {
            eprintln!("pglock: {}", fail.msg);
            if fail.code == EX_USAGE {
                eprintln!("Try 'pglock --help' for more information.");
            }
            ExitCode::from(fail.code)
        }
    }
}

#[cfg(test)]
mod tests {
    /// The modules, bottom-up: each may use only the modules of the layers below it.
    const LAYERS: &[&[(&str, &str)]] = &[
        &[
            ("format", include_str!("format.rs")),
            ("fail", include_str!("fail.rs")),
        ],
        &[
            ("args", include_str!("args.rs")),
            ("libpq", include_str!("libpq.rs")),
        ],
        &[("tls", include_str!("tls.rs"))],
        &[
            ("child", include_str!("child.rs")),
            ("conn", include_str!("conn.rs")),
        ],
        &[
            ("exec", include_str!("exec.rs")),
            ("acquire", include_str!("acquire.rs")),
        ],
        &[
            ("lease", include_str!("lease.rs")),
            ("show", include_str!("show.rs")),
        ],
        &[("run", include_str!("run.rs"))],
    ];

    /// Commands over lock acquisition, child supervision, the connection, formatting and
    /// failures: no module uses one of its own layer or above, so there is no cycle.
    #[test]
    fn modules_depend_one_way() {
        for (level, layer) in LAYERS.iter().enumerate() {
            for (name, source) in layer.iter() {
                assert!(
                    !source.contains("crate::{"),
                    "{name}: name each module it uses"
                );
                for (above, other) in LAYERS[level..].iter().flat_map(|l| l.iter()).enumerate() {
                    let used = [":", ";", ",", "}"]
                        .iter()
                        .any(|end| source.contains(&format!("crate::{}{end}", other.0)));
                    assert!(
                        !used || other.0 == *name && above == 0,
                        "{name} uses {}, which is not below it",
                        other.0
                    );
                }
            }
        }
    }
}
