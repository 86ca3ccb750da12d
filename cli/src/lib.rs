//! The operator CLI of factum on PostgreSQL, as a binary (`factum`) and as a library.
//!
//! The `factum` binary runs every command that needs no domain types: migrations, streams,
//! consumers and their checkpoints, dead letters (list, show, discard), partitions, snapshots.
//! Rebuilding a projection or retrying its parked events runs the projection's own code, so an
//! application mounts the same commands in a binary of its own, with a [`Registry`] of its
//! projections:
//!
//! ```no_run
//! use factum_cli::Registry;
//! use factum_postgres::projection::PgProjectionRunner;
//! # use factum::{BoxError, Envelope};
//! # use factum_postgres::projection::{PgProjection, ProjectionTx};
//! # #[derive(Debug)] struct Ping;
//! # impl factum::Event for Ping {
//! #     fn event_type(&self) -> &'static str { "ping" }
//! #     fn schema_version(&self) -> u32 { 1 }
//! #     fn event_types() -> &'static [&'static str] { &["ping"] }
//! #     fn encode(&self) -> Result<Box<factum::RawValue>, factum::EncodeError> { unimplemented!() }
//! #     fn decode(_: &factum::Stored<'_>) -> Result<Self, factum::DecodeError> { Ok(Ping) }
//! # }
//! # struct Balances;
//! # impl PgProjection for Balances {
//! #     const NAME: &'static str = "balances";
//! #     const TABLES: &'static [&'static str] = &["balances"];
//! #     type Event = Ping;
//! #     async fn apply(&mut self, _: &mut ProjectionTx<'_>, _: &Envelope<Ping>) -> Result<(), BoxError> { Ok(()) }
//! # }
//!
//! // src/bin/bank-admin.rs: `bank-admin projections rebuild balances` and every `factum` command.
//! fn main() -> std::process::ExitCode {
//!     let registry = Registry::new().projection(|store| PgProjectionRunner::new(store, Balances));
//!     factum_cli::run_main(std::env::args_os(), &registry)
//! }
//! ```
//!
//! Every command takes `--database-url` (or `DATABASE_URL`), `--schema` (the service's
//! schema, default `factum`; or `FACTUM_SCHEMA`) and `--service` (the service that owns the
//! store, refused if the schema is another's; or `FACTUM_SERVICE`); prints a table, or JSON with
//! `--json`; asks
//! before it changes or deletes anything unless `--yes` is given (and refuses without `--yes`
//! when nobody can answer); and reports a failure as one line saying what to do. The book's
//! [CLI reference](https://factum-rs.github.io/factum/reference/cli.html) lists the commands.

mod commands;
mod output;
mod registry;

use std::ffi::OsString;
use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;

use clap::Parser;

pub use registry::Registry;

/// Where a command reads answers and writes its output.
pub struct Io<'a> {
    /// The command's result: a table, or JSON with `--json`.
    pub out: &'a mut (dyn Write + Send),
    /// Questions, progress and errors.
    pub err: &'a mut (dyn Write + Send),
    /// Answers to questions.
    pub input: &'a mut (dyn BufRead + Send),
    /// True when a person is at a terminal: questions are asked (otherwise a destructive command
    /// needs `--yes`) and progress is a bar drawn on the process's standard error (otherwise a
    /// line written to `err` at most once a second, and at the end).
    pub interactive: bool,
}

impl std::fmt::Debug for Io<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Io")
            .field("interactive", &self.interactive)
            .finish_non_exhaustive()
    }
}

/// A command that failed, with what to do about it (one line).
#[derive(Debug)]
pub struct CliError(String);

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CliError {}

impl CliError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

impl From<factum::Error> for CliError {
    fn from(error: factum::Error) -> Self {
        // The framework's messages say what happened and to what; the source chain says why.
        let mut message = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            let text = cause.to_string();
            if !message.contains(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            source = cause.source();
        }
        Self(message.replace('\n', " "))
    }
}

/// Parses `args` (the program name first), runs the command on the terminal's standard streams
/// in a Tokio runtime of its own, and returns the process's exit code: 0 on success, 1 when the
/// command failed (its error printed as one line), 2 for a usage error.
pub fn run_main<I, T>(args: I, registry: &Registry) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(args, registry))
}

/// [`run_main`] inside a Tokio runtime the application already runs.
pub async fn run<I, T>(args: I, registry: &Registry) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    let mut input = std::io::BufReader::new(std::io::stdin());
    let interactive = std::io::stdin().is_terminal() && std::io::stderr().is_terminal();
    let mut io = Io {
        out: &mut out,
        err: &mut err,
        input: &mut input,
        interactive,
    };
    match run_with(args, registry, &mut io).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(error)) => {
            // clap formats help and version requests as "errors" too.
            let _ = error.print();
            if error.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(Failure::Command(error)) => {
            let _ = writeln!(io.err, "error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Why [`run_with`] did not run a command to its end.
#[derive(Debug)]
#[non_exhaustive]
pub enum Failure {
    /// The arguments did not parse (or asked for help or the version): print it.
    Usage(clap::Error),
    /// The command failed.
    Command(CliError),
}

/// Parses `args` (the program name first) and runs the command on `io`.
pub async fn run_with<I, T>(args: I, registry: &Registry, io: &mut Io<'_>) -> Result<(), Failure>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args = commands::Args::try_parse_from(args).map_err(Failure::Usage)?;
    commands::execute(args, registry, io)
        .await
        .map_err(Failure::Command)
}
