//! What an operator looks at and acts on: migrations, streams, consumers, dead letters and
//! snapshots of one schema. The operator CLI (`factum-cli`) is built on these; they are plain
//! methods of [`PostgresStore`] so a service can expose the same views (an admin endpoint, say).
//!
//! ```no_run
//! # async fn run(store: factum_postgres::PostgresStore) -> Result<(), factum::Error> {
//! for consumer in store.consumers().await? {
//!     println!("{} at {} ({} behind, {} parked)", consumer.name, consumer.position, consumer.lag_events, consumer.parked);
//! }
//! # Ok(()) }
//! ```

use chrono::{DateTime, Utc};
use factum::health::Check;
use factum::subscription::ParkedEvent;
use factum::{Error, GlobalPosition, LogPosition, StreamId, StreamVersion};
use sqlx::Row;

use crate::error::to_error;
use crate::migrate::MIGRATOR;
use crate::store::PostgresStore;
use crate::subscription::position;

/// One migration of this build, and whether the schema has it.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct MigrationStatus {
    /// Its number (`0003` is 3).
    pub version: i64,
    /// Its description (from the file name).
    pub description: String,
    /// When it was applied; `None` while it is pending.
    pub applied_at: Option<DateTime<Utc>>,
    /// False when the applied script's checksum differs from this build's (an applied migration
    /// was edited), or when it was applied but failed; true for a pending one.
    pub checksum_ok: bool,
}

/// A stream, as the `streams` table knows it.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct StreamSummary {
    /// The stream.
    pub stream_id: StreamId,
    /// Its category (the part before the first `-`).
    pub category: String,
    /// Its version: how many events it holds.
    pub version: StreamVersion,
    /// Archived with [`PostgresStore::archive_stream`].
    pub archived: bool,
}

/// A consumer of the log (a subscription or projection) by its checkpoint.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct ConsumerSummary {
    /// The consumer's name (a rebuild in progress shows as `<name>:rebuild`).
    pub name: String,
    /// Its checkpoint.
    pub position: LogPosition,
    /// When the checkpoint last moved.
    pub updated_at: DateTime<Utc>,
    /// Global positions between the checkpoint and the newest event: an upper bound of the events
    /// it has yet to handle (events of other types and rolled-back positions count too).
    pub lag_events: u64,
    /// Events it parked in the dead-letter table.
    pub parked: u64,
    /// True while an instance holds its lease ([`PgLease`](crate::subscription::PgLease)): it is
    /// running somewhere. Consumers without a lease always show false.
    pub leased: bool,
}

/// The snapshots of one category.
#[derive(Clone, PartialEq, Debug)]
#[non_exhaustive]
pub struct SnapshotSummary {
    /// The category.
    pub category: String,
    /// Streams with a snapshot.
    pub count: u64,
    /// Their stored size in bytes.
    pub bytes: u64,
    /// The oldest snapshot's time.
    pub oldest: Option<DateTime<Utc>>,
    /// The newest snapshot's time.
    pub newest: Option<DateTime<Utc>>,
    /// Events stored after their snapshot, summed over the streams: what loads replay on top.
    pub events_behind: u64,
}

/// A `_sqlx_migrations` row: version, description, installed_on, success, checksum.
type AppliedRow = (i64, String, DateTime<Utc>, bool, Vec<u8>);
/// A snapshot summary row: category, count, bytes, oldest, newest, events behind.
type SnapshotRow = (
    String,
    i64,
    i64,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    i64,
);

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl PostgresStore {
    /// Every migration of this build, oldest first, with its state in the store's schema.
    /// Applied migrations this build does not know are listed too (with `checksum_ok: false`):
    /// the schema is newer than the application.
    pub async fn migration_status(&self) -> Result<Vec<MigrationStatus>, Error> {
        let fail = |e| to_error(e, "migration status");
        let s = self.schema().quoted();
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(format!("{s}._sqlx_migrations"))
            .fetch_one(self.pool())
            .await
            .map_err(fail)?;
        let applied: Vec<AppliedRow> = if exists {
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT version, description, installed_on, success, checksum \
                 FROM {s}._sqlx_migrations ORDER BY version"
            )))
            .fetch_all(self.pool())
            .await
            .map_err(fail)?
        } else {
            Vec::new()
        };
        let mut status: Vec<MigrationStatus> = MIGRATOR
            .iter()
            .filter(|m| m.migration_type.is_up_migration())
            .map(|m| {
                let row = applied.iter().find(|a| a.0 == m.version);
                MigrationStatus {
                    version: m.version,
                    description: m.description.to_string(),
                    applied_at: row.map(|a| a.2),
                    checksum_ok: row.is_none_or(|a| a.3 && a.4 == *m.checksum),
                }
            })
            .collect();
        for (version, description, at, _, _) in applied {
            if !status.iter().any(|m| m.version == version) {
                status.push(MigrationStatus {
                    version,
                    description,
                    applied_at: Some(at),
                    checksum_ok: false,
                });
            }
        }
        status.sort_by_key(|m| m.version);
        Ok(status)
    }

    /// Streams in id order, after `after` (for paging), at most `limit`, of `category` only when
    /// given.
    pub async fn list_streams(
        &self,
        category: Option<&str>,
        after: Option<&StreamId>,
        limit: u32,
    ) -> Result<Vec<StreamSummary>, Error> {
        let rows: Vec<(String, String, i64, bool)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT stream_id, category, version, archived FROM {}.streams \
             WHERE ($1::text IS NULL OR category = $1) AND ($2::text IS NULL OR stream_id > $2) \
             ORDER BY stream_id LIMIT $3",
            self.schema().quoted()
        )))
        .bind(category)
        .bind(after.map(StreamId::as_str))
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await
        .map_err(|e| to_error(e, "list streams"))?;
        rows.into_iter()
            .map(|(id, category, version, archived)| {
                Ok(StreamSummary {
                    stream_id: StreamId::new(id)
                        .map_err(|e| Error::permanent("list streams", e))?,
                    category,
                    version: StreamVersion::new(to_u64(version)),
                    archived,
                })
            })
            .collect()
    }

    /// Every consumer with a checkpoint in the schema, by name, with its lag behind the newest
    /// event, its parked events, and whether an instance holds its lease.
    pub async fn consumers(&self) -> Result<Vec<ConsumerSummary>, Error> {
        let s = self.schema().quoted();
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT c.subscription, c.commit_id, c.global_position, c.updated_at, \
                    (SELECT coalesce(max(global_position), 0) FROM {s}.events) AS newest, \
                    (SELECT count(*) FROM {s}.dead_letters d WHERE d.subscription = c.subscription) AS parked, \
                    EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted \
                        AND l.objsubid = 1 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                        AND ((l.classid::bigint << 32) | l.objid::bigint) \
                            = hashtextextended('factum.lease:' || $1 || '.' || c.subscription, 0)) AS leased \
             FROM {s}.subscription_checkpoints c ORDER BY c.subscription"
        )))
        .bind(self.schema().as_str())
        .fetch_all(self.pool())
        .await
        .map_err(|e| to_error(e, "list consumers"))?;
        rows.iter()
            .map(|row| {
                let get = |e| to_error(e, "list consumers");
                let global: i64 = row.try_get("global_position").map_err(get)?;
                let newest: i64 = row.try_get("newest").map_err(get)?;
                Ok(ConsumerSummary {
                    name: row.try_get("subscription").map_err(get)?,
                    position: position(row.try_get("commit_id").map_err(get)?, global),
                    updated_at: row.try_get("updated_at").map_err(get)?,
                    lag_events: to_u64(newest.saturating_sub(global)),
                    parked: to_u64(row.try_get("parked").map_err(get)?),
                    leased: row.try_get("leased").map_err(get)?,
                })
            })
            .collect()
    }

    /// The parked events of every consumer, or of `subscription` only, oldest first.
    pub async fn dead_letters(
        &self,
        subscription: Option<&str>,
    ) -> Result<Vec<ParkedEvent>, Error> {
        let sql = self.parked_sql("($1::text IS NULL OR d.subscription = $1)");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
            .bind(subscription)
            .fetch_all(self.pool())
            .await
            .map_err(|e| to_error(e, "list parked events"))?;
        rows.iter()
            .map(crate::subscription::parked_from_row)
            .collect()
    }

    /// Snapshots per category: how many, their size, their age, and the events stored after
    /// them.
    pub async fn snapshot_summary(&self) -> Result<Vec<SnapshotSummary>, Error> {
        let rows: Vec<SnapshotRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT st.category, count(*), coalesce(sum(pg_column_size(sn.state)), 0)::bigint, \
                        min(sn.taken_at), max(sn.taken_at), \
                        coalesce(sum(greatest(st.version - sn.stream_version, 0)), 0)::bigint \
                 FROM {s}.snapshots sn JOIN {s}.streams st USING (stream_id) \
                 GROUP BY st.category ORDER BY st.category",
            s = self.schema().quoted()
        )))
        .fetch_all(self.pool())
        .await
        .map_err(|e| to_error(e, "snapshot status"))?;
        Ok(rows
            .into_iter()
            .map(
                |(category, count, bytes, oldest, newest, behind)| SnapshotSummary {
                    category,
                    count: to_u64(count),
                    bytes: to_u64(bytes),
                    oldest,
                    newest,
                    events_behind: to_u64(behind),
                },
            )
            .collect())
    }

    /// Deletes the snapshots of `category` (every snapshot when `None`), taken before `before`
    /// when given, and returns how many. Loads then replay those streams from their first event
    /// and take new snapshots by their policy: purging loses no data.
    pub async fn purge_snapshots(
        &self,
        category: Option<&str>,
        before: Option<DateTime<Utc>>,
    ) -> Result<u64, Error> {
        let s = self.schema().quoted();
        let done = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM {s}.snapshots sn WHERE ($1::timestamptz IS NULL OR sn.taken_at < $1) \
             AND ($2::text IS NULL OR EXISTS (SELECT 1 FROM {s}.streams st \
                  WHERE st.stream_id = sn.stream_id AND st.category = $2))"
        )))
        .bind(before)
        .bind(category)
        .execute(self.pool())
        .await
        .map_err(|e| to_error(e, "purge snapshots"))?;
        Ok(done.rows_affected())
    }

    /// The store's readiness check, named `database`: passes when the database answers and every
    /// migration of this build is applied (see [`health`](Self::health); a restored log that
    /// needs repair fails it too).
    ///
    /// ```no_run
    /// # async fn run(store: factum_postgres::PostgresStore, db: factum::resilience::Resilience) {
    /// let ready = factum::health::Readiness::new()
    ///     .with(store.readiness_check().await)
    ///     .circuit(&db.health());
    /// let status = if ready.is_ready() { 200 } else { 503 };
    /// # let _ = status;
    /// # }
    /// ```
    pub async fn readiness_check(&self) -> Check {
        match self.health().await {
            Ok(h) if h.is_up_to_date() => Check::new(
                "database",
                true,
                format!(
                    "reachable in {} ms, migrations current",
                    h.round_trip.as_millis()
                ),
            ),
            Ok(h) => Check::new(
                "database",
                false,
                format!(
                    "schema `{}` has migration {} of {}: run the migrations (`factum migrate apply`)",
                    h.schema,
                    h.applied_version.unwrap_or(0),
                    h.latest_version
                ),
            ),
            Err(e) => Check::new("database", false, e.to_string()),
        }
    }

    /// The log position of the event at global position `global` (where a consumer stands once
    /// it handled that event), or `None` when no stored event has it.
    pub async fn event_position(
        &self,
        global: GlobalPosition,
    ) -> Result<Option<LogPosition>, Error> {
        let row: Option<(i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT transaction_id::text::bigint, global_position FROM {}.events WHERE global_position = $1",
            self.schema().quoted()
        )))
        .bind(i64::try_from(global.get()).unwrap_or(i64::MAX))
        .fetch_optional(self.pool())
        .await
        .map_err(|e| to_error(e, "look up an event's position"))?;
        Ok(row.map(|(commit, global)| position(commit, global)))
    }

    /// Moves consumer `name`'s checkpoint to `position` (creating it when missing), and returns
    /// where it was. The consumer then handles the events after `position` again (or skips those
    /// before it): stop it first, or it overwrites the checkpoint with its next batch.
    pub async fn reset_checkpoint(
        &self,
        name: &str,
        position: LogPosition,
    ) -> Result<Option<LogPosition>, Error> {
        use factum::subscription::CheckpointStore;
        let before = self.load_checkpoint(name).await?;
        self.save_checkpoint(name, position).await?;
        tracing::info!(schema = %self.schema(), consumer = name, ?before, %position, "checkpoint reset");
        Ok(before)
    }
}
