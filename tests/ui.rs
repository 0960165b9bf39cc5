//! Compile-time behaviour of `#[idempotent]`: every supported handler shape type-checks as an axum handler, and
//! every misuse is a compile error on the offending token (snapshots in `tests/ui/fail/*.stderr`).
//!
//! Regenerate the snapshots with `TRYBUILD=overwrite cargo test --test ui`, then read them.

#[test]
fn ui() {
    let cases = trybuild::TestCases::new();
    cases.pass("tests/ui/pass/*.rs");
    cases.compile_fail("tests/ui/fail/*.rs");
}
