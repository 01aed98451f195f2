//! Runnable recipes for pglock that need heavier dependencies than the crate's own
//! examples: each is an example of this package, run against a real server with
//! `ci/with-postgres cargo run -p pglock-recipes --example NAME`.
//!
//! - `refinery`: a migration runner on the refinery crate under one session lock.
//! - `metrics`: pglock's `metrics` feature served to Prometheus.
