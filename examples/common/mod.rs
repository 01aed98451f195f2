//! What the examples share: where the server is, or a message that says what to set.

/// `DATABASE_URL`; without it, says on stderr what to set for `command` (the example's own
/// `cargo run ...`) and how to get a throwaway server instead, and exits with status 2.
pub fn database_url(command: &str) -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| {
        eprintln!(
            "DATABASE_URL is not set. Point it at a PostgreSQL server (14 or later) you may \
             create tables on:\n\n    \
             DATABASE_URL=postgres://user@localhost/db {command}\n\n\
             or, in a clone of pglock's repository, run it against a throwaway server:\n\n    \
             ci/with-postgres {command}"
        );
        std::process::exit(2)
    })
}
