//! pglock's benchmarks beside raw-SQL floors: `locks.rs`, `leases.rs` and `coordination.rs`
//! in this folder, with `common/` shared by them. Run one pinned to a core:
//! `taskset -c 0 ci/with-postgres cargo bench -p pglock-benches --bench locks`
//! (docs/benchmarks.md has the method and the results).
