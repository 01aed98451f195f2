//! The README's example is `examples/readme.rs`, which CI compiles
//! and runs: this keeps them the same, so the example a newcomer pastes is one that works.

/// Asserts that the README's `nth` Rust example is `example`'s program.
fn assert_readme_example(nth: usize, example: &str) {
    let readme = include_str!("../README.md");
    let fence = "```rust,no_run\n";
    let (at, _) = readme
        .match_indices(fence)
        .nth(nth)
        .expect("the README's example");
    let start = at + fence.len();
    let end = start + readme[start..].find("```").expect("the example's end");
    let body = example
        .lines()
        .filter(|l| !l.starts_with("//!"))
        .collect::<Vec<_>>()
        .join("\n");
    let snippet = readme[start..end]
        .lines()
        .filter(|l| !l.starts_with("// Cargo.toml"))
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(snippet.trim(), body.trim());
}

#[test]
fn the_readme_example_is_the_program_ci_runs() {
    assert_readme_example(0, include_str!("../examples/readme.rs"));
}
