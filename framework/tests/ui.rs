//! Compile-fail tests: every diagnostic the derives emit, with the message and the token it
//! points at committed in `tests/ui/*.stderr`. The toolchain is pinned in
//! `rust-toolchain.toml`; regenerate with `TRYBUILD=overwrite cargo test -p factum --test ui`
//! when it changes, and read every changed `.stderr`.

#[test]
fn ui() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/*.rs");
}
