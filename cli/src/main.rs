//! `factum`: the operator CLI for what needs no domain types (see the crate docs).

fn main() -> std::process::ExitCode {
    factum_cli::run_main(std::env::args_os(), &factum_cli::Registry::new())
}
