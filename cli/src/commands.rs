//! The commands: arguments (clap) and what each does.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use factum::bus::ServiceName;
use factum::subscription::{DeadLetterStore, ParkedEvent};
use factum::{EventId, EventStore, GlobalPosition, LogPosition, StreamId, StreamVersion};
use factum_postgres::projection::Progress;
use factum_postgres::{PoolConfig, PostgresStore, SchemaName, StoreOptions};
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::output::{Report, duration, opt_time, time};
use crate::{CliError, Io, Registry};

/// Operate a factum event store on PostgreSQL.
#[derive(Parser, Debug)]
#[command(name = "factum", version, about, long_about = None)]
pub(crate) struct Args {
    /// The PostgreSQL URL, e.g. postgres://user@host:5432/db.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,
    /// The schema of the service's store.
    #[arg(long, env = "FACTUM_SCHEMA", global = true, hide_env_values = true, default_value = SchemaName::DEFAULT)]
    schema: String,
    /// The service that owns the store: a schema recorded as another service's is refused, and
    /// `migrate apply` on a new schema records this one as its owner.
    #[arg(long, env = "FACTUM_SERVICE", global = true, hide_env_values = true)]
    service: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Do not ask before changing or deleting anything.
    #[arg(long, short = 'y', global = true)]
    yes: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The schema's migrations.
    #[command(subcommand)]
    Migrate(Migrate),
    /// Streams and their events.
    #[command(subcommand)]
    Streams(Streams),
    /// Consumers of the log (subscriptions and projections) by their checkpoints.
    #[command(subcommand)]
    Subscriptions(Subscriptions),
    /// The projections this binary knows, and their rebuild.
    #[command(subcommand)]
    Projections(Projections),
    /// Events consumers parked after they kept failing on them.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLetters),
    /// Partitions of the events table.
    #[command(subcommand)]
    Partitions(Partitions),
    /// Stored snapshots.
    #[command(subcommand)]
    Snapshots(Snapshots),
    /// Database reachable, migrations current, oldest open write.
    Health,
}

#[derive(Subcommand, Debug)]
enum Migrate {
    /// Creates the schema if needed and applies the pending migrations.
    Apply,
    /// Lists the migrations: applied (when) or pending.
    Status,
    /// Fails when an applied migration differs from this build's (checksums) or is unknown.
    Verify,
}

#[derive(Subcommand, Debug)]
enum Streams {
    /// Lists streams in id order.
    List {
        /// Only this category (the part of the id before the first `-`).
        #[arg(long)]
        category: Option<String>,
        /// Start after this stream id (paging).
        #[arg(long)]
        after: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Shows a stream's events, payload and metadata as JSON.
    Show {
        /// The stream id, e.g. account-42.
        stream: String,
        /// Only events after this version.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// At most this many events.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
}

#[derive(Subcommand, Debug)]
enum Subscriptions {
    /// Lists consumers: position, lag, parked events, whether one runs (holds its lease).
    List,
    /// Moves a consumer's checkpoint (stop the consumer first).
    Reset {
        /// The consumer's name.
        name: String,
        /// Just after the event at this global position.
        #[arg(long, conflicts_with_all = ["to_time", "to_start"])]
        to_position: Option<u64>,
        /// Before the first event recorded at or after this time (RFC 3339).
        #[arg(long, conflicts_with = "to_start")]
        to_time: Option<DateTime<Utc>>,
        /// Before the first event: the consumer handles the whole log again.
        #[arg(long)]
        to_start: bool,
    },
}

#[derive(Subcommand, Debug)]
enum Projections {
    /// Lists the projections this binary knows, with their checkpoints.
    List,
    /// Rebuilds a projection into fresh tables and swaps them in, with progress.
    Rebuild {
        /// The projection's name.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum DeadLetters {
    /// Lists parked events.
    List {
        /// Only those of this consumer.
        #[arg(long)]
        subscription: Option<String>,
    },
    /// Shows a parked event: the error, and the event as JSON.
    Show {
        /// The consumer that parked it.
        subscription: String,
        /// The event id.
        event_id: String,
    },
    /// Applies a parked event again through its projection (after a fix) and removes it.
    Retry {
        /// The projection that parked it.
        subscription: String,
        /// The event id.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        event_id: Option<String>,
        /// Every event the projection parked, oldest first; those that fail again stay parked.
        #[arg(long)]
        all: bool,
    },
    /// Removes a parked event without applying it.
    Discard {
        /// The consumer that parked it.
        subscription: String,
        /// The event id.
        event_id: String,
    },
}

#[derive(Subcommand, Debug)]
enum Partitions {
    /// Lists the partitions of the events table.
    Status,
    /// Creates range partitions ahead of the newest position.
    Create {
        /// Positions per partition.
        #[arg(long, default_value_t = 10_000_000)]
        size: u64,
        /// Positions past the newest one the partitions must cover.
        #[arg(long, default_value_t = 20_000_000)]
        ahead: u64,
    },
    /// Detaches a partition whose events all belong to archived streams.
    Detach {
        /// The partition, e.g. events_p0.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum Snapshots {
    /// Snapshots per category: count, size, age, events stored after them.
    Status,
    /// Deletes snapshots (loads replay from the first event and take new ones).
    Purge {
        /// Only this category.
        #[arg(long)]
        category: Option<String>,
        /// Only those taken before this time (RFC 3339).
        #[arg(long)]
        before: Option<DateTime<Utc>>,
    },
}

pub(crate) async fn execute(
    args: Args,
    registry: &Registry,
    io: &mut Io<'_>,
) -> Result<(), CliError> {
    let schema = SchemaName::new(&args.schema).map_err(CliError::from)?;
    let service = args
        .service
        .as_deref()
        .map(ServiceName::new)
        .transpose()
        .map_err(CliError::from)?;
    let Some(url) = args.database_url.as_deref() else {
        return Err(CliError::new(
            "no database given: pass --database-url or set DATABASE_URL (e.g. postgres://user@host:5432/db)",
        ));
    };
    let store = connect(url, schema, service).await?;
    let mut cx = Context {
        store,
        registry,
        json: args.json,
        yes: args.yes,
    };
    let report = match args.command {
        Command::Migrate(m) => cx.migrate(m, io).await?,
        Command::Health => {
            let (report, up_to_date) = cx.health().await?;
            report.print(io.out, cx.json)?;
            if !up_to_date {
                return Err(CliError::new(format!(
                    "schema `{}` is not up to date: run `factum migrate apply`",
                    cx.store.schema()
                )));
            }
            return Ok(());
        }
        command => {
            cx.require_migrated().await?;
            match command {
                Command::Streams(c) => cx.streams(c).await?,
                Command::Subscriptions(c) => cx.subscriptions(c, io).await?,
                Command::Projections(c) => cx.projections(c, io).await?,
                Command::DeadLetters(c) => cx.dead_letters(c, io).await?,
                Command::Partitions(c) => cx.partitions(c, io).await?,
                Command::Snapshots(c) => cx.snapshots(c, io).await?,
                Command::Migrate(_) | Command::Health => unreachable!("handled above"),
            }
        }
    };
    report.print(io.out, cx.json)
}

async fn connect(
    url: &str,
    schema: SchemaName,
    service: Option<ServiceName>,
) -> Result<PostgresStore, CliError> {
    let config = PoolConfig {
        max_connections: 4,
        acquire_timeout: Duration::from_secs(5),
        application_name: "factum-cli".to_owned(),
        ..PoolConfig::default()
    };
    let mut options = StoreOptions::default().with_schema(schema);
    if let Some(service) = service {
        options = options.for_service(service);
    }
    PostgresStore::connect_with(url, &config, options)
        .await
        .map_err(|e| match e.kind() {
            // Unreachable, refused, timed out: the URL or the server.
            factum::ErrorKind::Transient | factum::ErrorKind::Unavailable => CliError::new(format!(
                "cannot connect to the database: {}; check --database-url / DATABASE_URL and that the server runs",
                CliError::from(e)
            )),
            // A bad URL, a refused login, a log restored without repair: the message says what.
            _ => CliError::from(e),
        })
}

struct Context<'r> {
    store: PostgresStore,
    registry: &'r Registry,
    json: bool,
    yes: bool,
}

fn confirm(io: &mut Io<'_>, yes: bool, what: &str) -> Result<(), CliError> {
    if yes {
        return Ok(());
    }
    if !io.interactive {
        return Err(CliError::new(format!(
            "not confirmed: {what}? Nobody can answer here (no terminal): pass --yes to go ahead"
        )));
    }
    let asked = write!(io.err, "{what}? [y/N] ").and_then(|()| io.err.flush());
    let mut answer = String::new();
    let read = asked.and_then(|()| io.input.read_line(&mut answer));
    read.map_err(|e| CliError::new(format!("cannot ask for confirmation: {e}")))?;
    match answer.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" => Ok(()),
        _ => Err(CliError::new("not confirmed: nothing was changed")),
    }
}

fn event_id_of(text: &str) -> Result<EventId, CliError> {
    text.parse().map_err(|e| {
        CliError::new(format!(
            "`{text}` is not an event id ({e}): give the UUID that `factum dead-letters list` shows"
        ))
    })
}

fn position_json(p: LogPosition) -> Value {
    json!({ "global": p.global.get(), "commit": p.commit })
}

fn parked_json(p: &ParkedEvent) -> Value {
    json!({
        "subscription": p.subscription,
        "event_id": p.event.event_id.to_string(),
        "stream_id": p.event.stream_id.as_str(),
        "stream_version": p.event.stream_version.get(),
        "event_type": p.event.event_type,
        "position": position_json(p.event.position),
        "error": p.error,
        "attempts": p.attempts,
        "parked_at": time(&p.parked_at),
    })
}

fn event_json(e: &factum::RecordedEvent) -> Value {
    let payload: Value = serde_json::from_str(e.payload.get())
        .unwrap_or_else(|_| Value::String(e.payload.get().to_owned()));
    json!({
        "stream_id": e.stream_id.as_str(),
        "stream_version": e.stream_version.get(),
        "position": position_json(e.position),
        "event_id": e.event_id.to_string(),
        "event_type": e.event_type,
        "schema_version": e.schema_version,
        "recorded_at": time(&e.recorded_at),
        "metadata": serde_json::to_value(&e.metadata).unwrap_or(Value::Null),
        "payload": payload,
    })
}

impl Context<'_> {
    async fn require_migrated(&self) -> Result<(), CliError> {
        let health = self.store.health().await?;
        if health.applied_version.is_none() {
            return Err(CliError::new(format!(
                "schema `{s}` holds no factum store: run `factum migrate apply --schema {s}`, or pass the service's --schema",
                s = self.store.schema()
            )));
        }
        Ok(())
    }

    async fn migrate(&mut self, command: Migrate, io: &mut Io<'_>) -> Result<Report, CliError> {
        let status = |list: &[factum_postgres::MigrationStatus]| {
            let rows = list
                .iter()
                .map(|m| {
                    vec![
                        format!("{:04}", m.version),
                        m.description.clone(),
                        opt_time(m.applied_at.as_ref()),
                        if !m.checksum_ok {
                            "CHANGED".to_owned()
                        } else if m.applied_at.is_some() {
                            "applied".to_owned()
                        } else {
                            "pending".to_owned()
                        },
                    ]
                })
                .collect();
            let json = list
                .iter()
                .map(|m| {
                    json!({
                        "version": m.version,
                        "description": m.description,
                        "applied_at": m.applied_at.as_ref().map(time),
                        "checksum_ok": m.checksum_ok,
                    })
                })
                .collect();
            Report {
                headers: vec!["version", "description", "applied at", "state"],
                rows,
                note: None,
                json: Value::Array(json),
            }
        };
        match command {
            Migrate::Apply => {
                let before = self.store.migration_status().await?;
                let pending = before.iter().filter(|m| m.applied_at.is_none()).count();
                if pending > 0 {
                    confirm(
                        io,
                        self.yes,
                        &format!(
                            "apply {pending} migration(s) to schema `{}`",
                            self.store.schema()
                        ),
                    )?;
                }
                self.store.migrate().await?;
                let mut report = status(&self.store.migration_status().await?);
                report.note = Some(format!("{pending} migration(s) applied"));
                Ok(report)
            }
            Migrate::Status => Ok(status(&self.store.migration_status().await?)),
            Migrate::Verify => {
                let list = self.store.migration_status().await?;
                if let Some(bad) = list.iter().find(|m| !m.checksum_ok) {
                    return Err(CliError::new(format!(
                        "migration {:04} ({}) applied to schema `{}` differs from this build or is unknown to it: restore the original migration file (or run a build that has it); never edit an applied migration",
                        bad.version,
                        bad.description,
                        self.store.schema()
                    )));
                }
                let mut report = status(&list);
                report.note = Some("checksums match".to_owned());
                Ok(report)
            }
        }
    }

    /// The report, and whether the schema is up to date.
    async fn health(&self) -> Result<(Report, bool), CliError> {
        let h = self.store.health().await?;
        let oldest = h.oldest_open_write.map(duration);
        let report = Report {
            headers: vec!["check", "value"],
            rows: vec![
                vec!["schema".into(), h.schema.to_string()],
                vec!["round trip".into(), format!("{:?}", h.round_trip)],
                vec![
                    "migrations".into(),
                    format!(
                        "{} of {}{}",
                        h.applied_version.unwrap_or(0),
                        h.latest_version,
                        if h.is_up_to_date() {
                            ""
                        } else {
                            " (run `factum migrate apply`)"
                        }
                    ),
                ],
                vec![
                    "oldest open write".into(),
                    oldest.clone().unwrap_or_else(|| "-".into()),
                ],
            ],
            note: None,
            json: json!({
                "schema": h.schema.as_str(),
                "round_trip_ms": h.round_trip.as_secs_f64() * 1000.0,
                "applied_version": h.applied_version,
                "latest_version": h.latest_version,
                "up_to_date": h.is_up_to_date(),
                "oldest_open_write_seconds": h.oldest_open_write.map(|d| d.as_secs_f64()),
            }),
        };
        Ok((report, h.is_up_to_date()))
    }

    async fn streams(&self, command: Streams) -> Result<Report, CliError> {
        match command {
            Streams::List {
                category,
                after,
                limit,
            } => {
                let after = after
                    .map(|a| StreamId::new(a).map_err(|e| CliError::new(format!("--after: {e}"))))
                    .transpose()?;
                let list = self
                    .store
                    .list_streams(category.as_deref(), after.as_ref(), limit)
                    .await?;
                let note = (list.len() == limit as usize).then(|| {
                    format!(
                        "(first {limit}; next page: --after {})",
                        list.last().map_or("", |s| s.stream_id.as_str())
                    )
                });
                Ok(Report {
                    headers: vec!["stream", "category", "version", "archived"],
                    rows: list
                        .iter()
                        .map(|s| {
                            vec![
                                s.stream_id.to_string(),
                                s.category.clone(),
                                s.version.get().to_string(),
                                if s.archived { "yes" } else { "no" }.into(),
                            ]
                        })
                        .collect(),
                    note,
                    json: Value::Array(
                        list.iter()
                            .map(|s| {
                                json!({
                                    "stream_id": s.stream_id.as_str(),
                                    "category": s.category,
                                    "version": s.version.get(),
                                    "archived": s.archived,
                                })
                            })
                            .collect(),
                    ),
                })
            }
            Streams::Show {
                stream,
                after,
                limit,
            } => {
                let id = StreamId::new(&stream)
                    .map_err(|e| CliError::new(format!("`{stream}`: {e}")))?;
                let mut events = Vec::new();
                let mut read = self.store.read_stream(&id, StreamVersion::new(after));
                while let Some(event) = read.next().await {
                    events.push(event?);
                    if events.len() >= limit {
                        break;
                    }
                }
                drop(read);
                if events.is_empty() && after == 0 {
                    return Err(CliError::new(format!(
                        "stream `{stream}` has no events in schema `{}`: list streams with `factum streams list`",
                        self.store.schema()
                    )));
                }
                let mut text = String::new();
                for e in &events {
                    text.push_str(&format!(
                        "#{} {} v{}  position {}  {}  id {}\n  metadata: {}\n  payload:  {}\n",
                        e.stream_version,
                        e.event_type,
                        e.schema_version,
                        e.position,
                        time(&e.recorded_at),
                        e.event_id,
                        serde_json::to_string(&e.metadata).unwrap_or_default(),
                        compact(e.payload.get()),
                    ));
                }
                text.pop();
                Ok(Report::message(
                    text,
                    Value::Array(events.iter().map(event_json).collect()),
                ))
            }
        }
    }

    async fn subscriptions(
        &self,
        command: Subscriptions,
        io: &mut Io<'_>,
    ) -> Result<Report, CliError> {
        match command {
            Subscriptions::List => self.consumers(None).await,
            Subscriptions::Reset {
                name,
                to_position,
                to_time,
                to_start,
            } => {
                let target = match (to_position, to_time, to_start) {
                    (Some(p), _, _) => self
                        .store
                        .event_position(GlobalPosition::new(p))
                        .await?
                        .ok_or_else(|| {
                            CliError::new(format!(
                                "no event has global position {p}: pick one from `factum streams show`"
                            ))
                        })?,
                    (_, Some(t), _) => self.store.position_at(t).await?,
                    (_, _, true) => LogPosition::START,
                    _ => {
                        return Err(CliError::new(
                            "say where to: --to-position N, --to-time 2026-01-31T00:00:00Z or --to-start",
                        ));
                    }
                };
                let known = self.store.consumers().await?;
                let current = known.iter().find(|c| c.name == name);
                if current.is_some_and(|c| c.leased) {
                    return Err(CliError::new(format!(
                        "consumer `{name}` is running (an instance holds its lease): stop it first, or it overwrites the checkpoint with its next batch"
                    )));
                }
                let from =
                    current.map_or_else(|| "no checkpoint".to_owned(), |c| c.position.to_string());
                confirm(
                    io,
                    self.yes,
                    &format!("move the checkpoint of `{name}` from {from} to {target}"),
                )?;
                let before = self.store.reset_checkpoint(&name, target).await?;
                Ok(Report::message(
                    format!("checkpoint of `{name}` moved from {from} to {target}"),
                    json!({
                        "name": name,
                        "before": before.map(position_json),
                        "after": position_json(target),
                    }),
                ))
            }
        }
    }

    async fn consumers(&self, only: Option<&[&str]>) -> Result<Report, CliError> {
        let mut list = self.store.consumers().await?;
        if let Some(names) = only {
            list.retain(|c| names.contains(&c.name.as_str()));
        }
        let state = |leased: bool| if leased { "running" } else { "not running" };
        let mut rows: Vec<Vec<String>> = list
            .iter()
            .map(|c| {
                vec![
                    c.name.clone(),
                    c.position.to_string(),
                    c.lag_events.to_string(),
                    c.parked.to_string(),
                    state(c.leased).into(),
                    time(&c.updated_at),
                ]
            })
            .collect();
        let mut json: Vec<Value> = list
            .iter()
            .map(|c| {
                json!({
                    "name": c.name,
                    "position": position_json(c.position),
                    "lag_events": c.lag_events,
                    "parked": c.parked,
                    "state": state(c.leased),
                    "updated_at": time(&c.updated_at),
                })
            })
            .collect();
        if let Some(names) = only {
            for name in names {
                if !list.iter().any(|c| c.name == *name) {
                    rows.push(vec![
                        (*name).into(),
                        "-".into(),
                        "-".into(),
                        "0".into(),
                        "never ran".into(),
                        "-".into(),
                    ]);
                    json.push(json!({ "name": name, "position": null, "state": "never ran" }));
                }
            }
        }
        Ok(Report {
            headers: vec![
                "name",
                "position",
                "lag",
                "parked",
                "state",
                "checkpoint moved",
            ],
            rows,
            note: None,
            json: Value::Array(json),
        })
    }

    async fn projections(&self, command: Projections, io: &mut Io<'_>) -> Result<Report, CliError> {
        match command {
            Projections::List => {
                let names = self.registry.names();
                if names.is_empty() {
                    return Err(CliError::new(
                        "this binary knows no projections: run the application's own admin binary (factum_cli::run with a Registry), or use `factum subscriptions list`",
                    ));
                }
                self.consumers(Some(&names)).await
            }
            Projections::Rebuild { name } => {
                let Some(projection) = self.registry.find(&name) else {
                    return Err(self.unknown_projection(&name));
                };
                confirm(
                    io,
                    self.yes,
                    &format!(
                        "rebuild `{name}` from the start of the log into fresh tables ({}) and swap them in",
                        projection.tables().join(", ")
                    ),
                )?;
                let position = if io.interactive {
                    let bar = indicatif::ProgressBar::new(0);
                    bar.set_style(
                        indicatif::ProgressStyle::with_template(
                            "{prefix} [{bar:40}] {pos}/{len} events, {msg}",
                        )
                        .map_err(|e| CliError::new(e.to_string()))?
                        .progress_chars("=> "),
                    );
                    bar.set_prefix(format!("rebuilding {name}"));
                    let mut on_progress = |p: &Progress| {
                        bar.set_length(p.total);
                        bar.set_position(p.done);
                        bar.set_message(rate_eta(p));
                    };
                    let result = projection
                        .rebuild(self.store.clone(), &mut on_progress)
                        .await;
                    bar.finish();
                    result?
                } else {
                    let err = &mut *io.err;
                    let mut last: Option<Instant> = None;
                    let mut on_progress = |p: &Progress| {
                        let now = Instant::now();
                        let finished = p.done >= p.total;
                        if finished || last.is_none_or(|l| now - l >= Duration::from_secs(1)) {
                            last = Some(now);
                            let _ = writeln!(err, "{}", progress_line(&name, p));
                        }
                    };
                    let result = projection
                        .rebuild(self.store.clone(), &mut on_progress)
                        .await;
                    result?
                };
                Ok(Report::message(
                    format!(
                        "rebuilt `{name}` up to position {position}; its checkpoint is there and its dead letters are cleared"
                    ),
                    json!({ "name": name, "position": position_json(position) }),
                ))
            }
        }
    }

    fn unknown_projection(&self, name: &str) -> CliError {
        let known = self.registry.names();
        if known.is_empty() {
            CliError::new(format!(
                "`{name}` is not a projection this binary knows: run it from the application's admin binary, which mounts factum_cli::run with a Registry of its projections"
            ))
        } else {
            CliError::new(format!(
                "`{name}` is not a projection this binary knows (it knows: {})",
                known.join(", ")
            ))
        }
    }

    async fn dead_letters(
        &self,
        command: DeadLetters,
        io: &mut Io<'_>,
    ) -> Result<Report, CliError> {
        match command {
            DeadLetters::List { subscription } => {
                let list = self.store.dead_letters(subscription.as_deref()).await?;
                Ok(Report {
                    headers: vec![
                        "subscription",
                        "event id",
                        "stream",
                        "type",
                        "attempts",
                        "parked at",
                        "error",
                    ],
                    rows: list
                        .iter()
                        .map(|p| {
                            let mut error = p.error.replace('\n', " ");
                            if error.chars().count() > 60 {
                                error = error.chars().take(57).collect::<String>() + "...";
                            }
                            vec![
                                p.subscription.clone(),
                                p.event.event_id.to_string(),
                                format!("{}#{}", p.event.stream_id, p.event.stream_version),
                                p.event.event_type.clone(),
                                p.attempts.to_string(),
                                time(&p.parked_at),
                                error,
                            ]
                        })
                        .collect(),
                    note: None,
                    json: Value::Array(list.iter().map(parked_json).collect()),
                })
            }
            DeadLetters::Show {
                subscription,
                event_id: id,
            } => {
                let parked = self.find_parked(&subscription, &id).await?;
                let mut json = parked_json(&parked);
                json["event"] = event_json(&parked.event);
                Ok(Report::message(
                    format!(
                        "{} parked {} ({}#{}, {}) at {} after {} attempt(s):\n  error:    {}\n  metadata: {}\n  payload:  {}",
                        parked.subscription,
                        parked.event.event_id,
                        parked.event.stream_id,
                        parked.event.stream_version,
                        parked.event.event_type,
                        time(&parked.parked_at),
                        parked.attempts,
                        parked.error,
                        serde_json::to_string(&parked.event.metadata).unwrap_or_default(),
                        compact(parked.event.payload.get()),
                    ),
                    json,
                ))
            }
            DeadLetters::Retry {
                subscription,
                event_id,
                all,
            } => {
                let Some(projection) = self.registry.find(&subscription) else {
                    return Err(self.unknown_projection(&subscription));
                };
                let ids: Vec<String> = match event_id {
                    Some(id) if !all => vec![id],
                    _ => self
                        .store
                        .parked(&subscription)
                        .await?
                        .iter()
                        .map(|p| p.event.event_id.to_string())
                        .collect(),
                };
                if !all {
                    let id = &ids[0];
                    let applied = projection
                        .retry_parked(self.store.clone(), event_id_of(id)?)
                        .await?;
                    if !applied {
                        return Err(CliError::new(format!(
                            "`{subscription}` has no parked event {id}: see `factum dead-letters list --subscription {subscription}`"
                        )));
                    }
                    return Ok(Report::message(
                        format!(
                            "applied {id} through `{subscription}` and removed it from the dead letters"
                        ),
                        json!({ "subscription": subscription, "event_id": id, "applied": true }),
                    ));
                }
                // Every parked event: one failure does not stop the others.
                let mut rows = Vec::new();
                let mut results = Vec::new();
                for id in &ids {
                    let outcome = match projection
                        .retry_parked(self.store.clone(), event_id_of(id)?)
                        .await
                    {
                        Ok(true) => ("applied", String::new()),
                        Ok(false) => ("gone", "no longer parked".to_owned()),
                        Err(e) => ("still failing", CliError::from(e).to_string()),
                    };
                    rows.push(vec![id.clone(), outcome.0.to_owned(), outcome.1.clone()]);
                    results
                        .push(json!({ "event_id": id, "result": outcome.0, "error": outcome.1 }));
                }
                let failing = rows.iter().filter(|r| r[1] == "still failing").count();
                Ok(Report {
                    headers: vec!["event id", "result", "error"],
                    rows,
                    note: Some(format!(
                        "{} applied, {failing} still parked",
                        ids.len() - failing
                    )),
                    json: json!({ "subscription": subscription, "results": results }),
                })
            }
            DeadLetters::Discard {
                subscription,
                event_id: id,
            } => {
                let parked = self.find_parked(&subscription, &id).await?;
                confirm(
                    io,
                    self.yes,
                    &format!(
                        "discard parked event {id} of `{subscription}` ({}#{}) without applying it",
                        parked.event.stream_id, parked.event.stream_version
                    ),
                )?;
                let removed = self
                    .store
                    .unpark(&subscription, parked.event.event_id)
                    .await?;
                Ok(Report::message(
                    format!("discarded {id} from the dead letters of `{subscription}`"),
                    json!({ "subscription": subscription, "event_id": id, "discarded": removed.is_some() }),
                ))
            }
        }
    }

    async fn find_parked(&self, subscription: &str, id: &str) -> Result<ParkedEvent, CliError> {
        let event = event_id_of(id)?;
        self.store
            .parked(subscription)
            .await?
            .into_iter()
            .find(|p| p.event.event_id == event)
            .ok_or_else(|| {
                CliError::new(format!(
                    "`{subscription}` has no parked event {id}: see `factum dead-letters list --subscription {subscription}`"
                ))
            })
    }

    async fn partitions(&self, command: Partitions, io: &mut Io<'_>) -> Result<Report, CliError> {
        let bound = |b: Option<u64>| b.map_or_else(|| "-".to_owned(), |v| v.to_string());
        let report = |list: &[factum_postgres::Partition], note: Option<String>| {
            Report {
            headers: vec!["partition", "from", "to", "kind"],
            rows: list
                .iter()
                .map(|p| {
                    vec![
                        p.name.clone(),
                        bound(p.from),
                        bound(p.to),
                        if p.is_default { "default" } else { "range" }.into(),
                    ]
                })
                .collect(),
            note,
            json: Value::Array(
                list.iter()
                    .map(|p| json!({ "name": p.name, "from": p.from, "to": p.to, "default": p.is_default }))
                    .collect(),
            ),
        }
        };
        match command {
            Partitions::Status => Ok(report(&self.store.partitions().await?, None)),
            Partitions::Create { size, ahead } => {
                let created = self.store.ensure_partitions(size, ahead).await?;
                let note = format!("{} partition(s) created", created.len());
                Ok(report(&created, Some(note)))
            }
            Partitions::Detach { name } => {
                confirm(
                    io,
                    self.yes,
                    &format!(
                        "detach partition `{name}` from the events table (its events leave the log)"
                    ),
                )?;
                self.store.detach_partition(&name).await?;
                Ok(Report::message(
                    format!(
                        "detached `{name}`: the table stays in schema `{}`; dump it, then drop it",
                        self.store.schema()
                    ),
                    json!({ "detached": name }),
                ))
            }
        }
    }

    async fn snapshots(&self, command: Snapshots, io: &mut Io<'_>) -> Result<Report, CliError> {
        match command {
            Snapshots::Status => {
                let list = self.store.snapshot_summary().await?;
                Ok(Report {
                    headers: vec![
                        "category",
                        "snapshots",
                        "bytes",
                        "oldest",
                        "newest",
                        "events after",
                    ],
                    rows: list
                        .iter()
                        .map(|s| {
                            vec![
                                s.category.clone(),
                                s.count.to_string(),
                                s.bytes.to_string(),
                                opt_time(s.oldest.as_ref()),
                                opt_time(s.newest.as_ref()),
                                s.events_behind.to_string(),
                            ]
                        })
                        .collect(),
                    note: None,
                    json: Value::Array(
                        list.iter()
                            .map(|s| {
                                json!({
                                    "category": s.category,
                                    "count": s.count,
                                    "bytes": s.bytes,
                                    "oldest": s.oldest.as_ref().map(time),
                                    "newest": s.newest.as_ref().map(time),
                                    "events_behind": s.events_behind,
                                })
                            })
                            .collect(),
                    ),
                })
            }
            Snapshots::Purge { category, before } => {
                let which = match (&category, &before) {
                    (Some(c), Some(b)) => {
                        format!("the snapshots of category `{c}` taken before {}", time(b))
                    }
                    (Some(c), None) => format!("every snapshot of category `{c}`"),
                    (None, Some(b)) => format!("the snapshots taken before {}", time(b)),
                    (None, None) => "every snapshot".to_owned(),
                };
                confirm(io, self.yes, &format!("delete {which}"))?;
                let purged = self
                    .store
                    .purge_snapshots(category.as_deref(), before)
                    .await?;
                Ok(Report::message(
                    format!(
                        "deleted {purged} snapshot(s); loads replay from the first event until new ones are taken"
                    ),
                    json!({ "purged": purged }),
                ))
            }
        }
    }
}

/// A stored JSON payload on one line, without the spaces `jsonb` output adds.
fn compact(raw: &str) -> String {
    serde_json::from_str::<Value>(raw).map_or_else(|_| raw.to_owned(), |v| v.to_string())
}

fn rate_eta(p: &Progress) -> String {
    format!(
        "{:.0} events/s, ETA {}",
        p.rate,
        p.eta.map_or_else(|| "-".to_owned(), duration)
    )
}

fn progress_line(name: &str, p: &Progress) -> String {
    format!(
        "rebuild {name}: {}/{} events ({:.0}%), {}, elapsed {}",
        p.done,
        p.total,
        p.fraction() * 100.0,
        rate_eta(p),
        duration(p.elapsed)
    )
}
