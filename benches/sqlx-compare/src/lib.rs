//! pglock beside sqlx's `PgAdvisoryLock`: the benchmark is `benches/sqlx.rs`, run with
//! `taskset -c 0 ci/with-postgres cargo bench -p pglock-sqlx-compare`.
