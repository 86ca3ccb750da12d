//! The PostgreSQL backend for [factum](https://docs.rs/factum), on sqlx.
//!
//! ```no_run
//! use factum::{EventStore, ExpectedVersion, NewEvent, StreamId};
//! use factum_postgres::PostgresStore;
//!
//! # async fn run() -> Result<(), factum::Error> {
//! let store = PostgresStore::connect("postgres://postgres@localhost/bank").await?;
//! store.migrate().await?; // creates schema `factum` and applies the embedded migrations
//!
//! let stream = StreamId::new("account-42").unwrap();
//! let opened = NewEvent {
//!     event_id: factum::EventId::new(),
//!     event_type: "account.opened".into(),
//!     schema_version: 1,
//!     payload: serde_json::value::to_raw_value(&serde_json::json!({"owner": "Ada"})).unwrap(),
//!     metadata: Default::default(),
//! };
//! let result = store.append(factum::AppendRequest::new(stream.clone(), vec![opened]).expected_version(ExpectedVersion::NoStream)).await?;
//! assert_eq!(result.stream_version.get(), 1);
//! # Ok(())
//! # }
//! ```
//!
//! [`PostgresStore`] implements [`factum::EventStore`] and [`factum::SnapshotStore`], so it works
//! everywhere the in-memory store does (`Repository`, subscriptions) and passes the same
//! conformance suite.
//!
//! # Schema
//! Every object lives in one schema (default `factum`, see [`SchemaName`]), created by
//! [`migrate`] from the versioned SQL files of the repository's `migrations/` folder, embedded at
//! compile time and checksummed (an edited applied migration is an error, not a silent drift).
//! * `streams(stream_id, category, version, archived, first_position)`: the version authority;
//!   `first_position` bounds the stream's positions from below, so stream reads skip older
//!   partitions.
//! * `events`: JSONB payload and metadata, event id, correlation/causation ids, recorded-at, a
//!   global position from a sequence, and the writing transaction's id (`xid8`). Partitioned by
//!   range of global position, with unique (stream, version) and event-id indexes per partition.
//! * `snapshots(stream_id, stream_version, schema_version, state, taken_at)`.
//!
//! # Appends
//! One statement, one round trip: a CTE bumps the `streams` row only where the version matches
//! (and only when no id of the batch is already stored), and inserts the batch from `unnest`ed
//! arrays. No row back means a conflict or a re-append; the ids are then looked up to apply the
//! idempotent re-append rule of [`factum::EventStore`]. No sequence value is taken by a
//! conflicting append. With [`GroupCommit`] (opt-in), concurrent appends to different streams can
//! share one such statement, each keeping its own checks and outcome; with [`BatchedReads`]
//! (opt-in), concurrent stream reads (aggregate loads) share one read statement.
//!
//! Failures are classified once: a transaction the server rolled back (deadlock, serialization
//! failure, too many connections...) is retried by the store's
//! [`RetryPolicy`](factum::resilience::RetryPolicy) ([`StoreOptions::with_retry`]; by default
//! the framework's policy for appends) and then reported as [`factum::Error::Transient`]; a
//! connection lost while the statement was in flight leaves the outcome unknown, so the append
//! looks the batch's ids up (waiting for the database by the same policy): stored means
//! success, absent means retry, unreachable means [`factum::Error::UnknownOutcome`] (re-append
//! the same events to settle it). Wrapped in [`factum::resilience::Resilient`], give the store
//! [`RetryPolicy::no_retry`](factum::resilience::RetryPolicy::no_retry) so that only the outer
//! layer, with its budget and circuit breaker, retries.
//!
//! # Gap-safe global log
//! Positions come from a sequence, so they are handed out in append order but become visible in
//! commit order: a reader that simply read "after position N" could skip an event whose
//! transaction took a lower position and committed later. [`read_all`](factum::EventStore::read_all)
//! therefore orders by `(transaction id, global position)` — the [`factum::LogPosition`] it
//! returns — and reads only rows written by transactions older than the oldest transaction still
//! in flight (`pg_snapshot_xmin(pg_current_snapshot())`). Everything below that horizon is
//! settled, so nothing can later appear behind a reader's checkpoint.
//!
//! The price: a transaction that writes and stays open stalls every reader of the log until it
//! ends, in any database of the cluster. Keep write transactions short, set
//! `idle_in_transaction_session_timeout` ([`PoolConfig`] sets 60 s on its own connections), and
//! watch [`Health::oldest_open_write`].
//!
//! The horizon holds on a hot standby too, so subscriptions, projections and queries can read a
//! streaming replica through a [`PgReader`] while commands stay on the primary: see the
//! [`replica`] module.
//!
//! The order rests on transaction ids, which belong to the cluster: restored from a logical
//! backup (`pg_dump`) into another cluster, stored ids may lie ahead of the new cluster's
//! counter, which would hide every stored event. The store detects it and refuses to read
//! ([`RestoreRepairNeeded`]) until [`PostgresStore::repair_after_restore`] has run.

// `factum::Error` is the framework's error type, returned as is; its size is the framework's call.
#![allow(clippy::result_large_err)]

mod admin;
mod config;
mod deletion;
mod error;
mod group;
mod import;
mod inbox;
mod maintenance;
mod migrate;
mod personal;
pub mod projection;
mod reads;
pub mod replica;
mod restore;
pub mod saga;
mod schema;
mod service;
mod store;
pub mod subscription;
mod transaction;
mod tx;

pub use admin::{ConsumerSummary, MigrationStatus, SnapshotSummary, StreamSummary};
pub use config::{BatchedReads, GroupCommit, PoolConfig, StoreOptions};
pub use deletion::DeletedStream;
pub use error::RestoreRepairNeeded;
pub use import::{ImportOptions, ImportProgress, ImportReport, ImportedEvent};
pub use inbox::PgInbox;
pub use maintenance::{Partition, StreamReadPlan};
pub use migrate::migrate;
#[cfg(feature = "personal")]
pub use personal::PgKeyStore;
pub use replica::PgReader;
pub use restore::RestoreRepair;
pub use schema::SchemaName;
pub use service::ServiceRole;
pub use store::{Health, PostgresStore};
pub use transaction::InTransaction;

/// The sqlx version this crate is built on, for building pools by hand.
pub use sqlx;

/// The book's PostgreSQL chapter, compiled so it cannot drift from the code.
#[cfg(doctest)]
#[doc = include_str!("../../docs/src/postgres.md")]
mod postgres_chapter {}

/// The book's partitions, archiving and retention chapter, compiled so it cannot drift from the
/// code.
#[cfg(doctest)]
#[doc = include_str!("../../docs/src/partitions.md")]
mod partitions_chapter {}
/// The book's read replicas chapter, compiled so it cannot drift from the code.
#[cfg(doctest)]
#[doc = include_str!("../../docs/src/replicas.md")]
mod replicas_chapter {}

/// The book's backup and restore chapter, compiled so it cannot drift from the code.
#[cfg(doctest)]
#[doc = include_str!("../../docs/src/operations/backup.md")]
mod backup_chapter {}

/// The book's health checks chapter, compiled so it cannot drift from the code.
#[cfg(doctest)]
#[doc = include_str!("../../docs/src/operations/health.md")]
mod health_chapter {}

/// The book's projections chapter, compiled so it cannot drift from the code.
#[cfg(doctest)]
#[doc = include_str!("../../docs/src/projections.md")]
mod projections_chapter {}

/// The book's replay and rebuild chapter, compiled so it cannot drift from the code.
#[cfg(doctest)]
#[doc = include_str!("../../docs/src/replay.md")]
mod replay_chapter {}

/// The book's configuration reference, compiled so its defaults cannot drift from the code.
#[cfg(doctest)]
#[doc = include_str!("../../docs/src/reference/configuration.md")]
mod configuration_chapter {}
