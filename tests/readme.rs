//! The README's first example is `examples/readme.rs`, which CI compiles and runs: this
//! keeps the two the same, so the example a newcomer pastes is one that works.

#[test]
fn the_readme_example_is_the_program_ci_runs() {
    let readme = include_str!("../README.md");
    let start = readme
        .find("```rust,no_run\n")
        .expect("the README's first example")
        + "```rust,no_run\n".len();
    let end = start + readme[start..].find("```").expect("the example's end");
    let example = include_str!("../examples/readme.rs");
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
