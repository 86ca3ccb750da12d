//! Subscription checkpoints and the dead-letter queue in PostgreSQL.

use std::future::Future;

use chrono::{DateTime, Utc};
use factum::subscription::{CheckpointStore, DeadLetterStore, ParkedEvent};
use factum::{Error, EventId, GlobalPosition, LogPosition};
use sqlx::Row;

use crate::error::to_error;
use crate::store::{EventRow, PostgresStore};

fn to_i64(v: u64) -> Result<i64, Error> {
    i64::try_from(v)
        .map_err(|_| Error::InvalidArgument(format!("{v} is above PostgreSQL's bigint range")))
}

impl CheckpointStore for PostgresStore {
    fn load_checkpoint(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<LogPosition>, Error>> + Send {
        let sql = format!(
            "SELECT commit_id, global_position FROM {}.subscription_checkpoints WHERE subscription = $1",
            self.schema().quoted()
        );
        async move {
            let row: Option<(i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str()))
                .bind(name)
                .fetch_optional(self.pool())
                .await
                .map_err(|e| to_error(e, "load checkpoint"))?;
            Ok(row.map(|(commit, global)| {
                LogPosition::new(
                    u64::try_from(commit).unwrap_or(0),
                    GlobalPosition::new(u64::try_from(global).unwrap_or(0)),
                )
            }))
        }
    }

    fn save_checkpoint(
        &self,
        name: &str,
        position: LogPosition,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        let sql = format!(
            "INSERT INTO {}.subscription_checkpoints AS c (subscription, commit_id, global_position) \
             VALUES ($1, $2, $3) ON CONFLICT (subscription) DO UPDATE \
             SET commit_id = EXCLUDED.commit_id, global_position = EXCLUDED.global_position, \
                 updated_at = now()",
            self.schema().quoted()
        );
        async move {
            sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
                .bind(name)
                .bind(to_i64(position.commit)?)
                .bind(to_i64(position.global.get())?)
                .execute(self.pool())
                .await
                .map_err(|e| to_error(e, "save checkpoint"))?;
            Ok(())
        }
    }
}

impl DeadLetterStore for PostgresStore {
    fn park(&self, parked: ParkedEvent) -> impl Future<Output = Result<(), Error>> + Send {
        let sql = format!(
            "INSERT INTO {}.dead_letters (subscription, event_id, error, attempts, parked_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (subscription, event_id) DO UPDATE \
             SET error = EXCLUDED.error, attempts = EXCLUDED.attempts, parked_at = EXCLUDED.parked_at",
            self.schema().quoted()
        );
        async move {
            sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
                .bind(&parked.subscription)
                .bind(parked.event.event_id.as_uuid())
                .bind(&parked.error)
                .bind(i32::try_from(parked.attempts).unwrap_or(i32::MAX))
                .bind(parked.parked_at)
                .execute(self.pool())
                .await
                .map_err(|e| to_error(e, "park event"))?;
            Ok(())
        }
    }

    fn parked(
        &self,
        subscription: &str,
    ) -> impl Future<Output = Result<Vec<ParkedEvent>, Error>> + Send {
        let sql = self.parked_sql("d.subscription = $1");
        async move {
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
                .bind(subscription)
                .fetch_all(self.pool())
                .await
                .map_err(|e| to_error(e, "list parked events"))?;
            rows.iter().map(parked_from_row).collect()
        }
    }

    fn unpark(
        &self,
        subscription: &str,
        event_id: EventId,
    ) -> impl Future<Output = Result<Option<ParkedEvent>, Error>> + Send {
        let select = self.parked_sql("d.subscription = $1 AND d.event_id = $2");
        let delete = format!(
            "DELETE FROM {}.dead_letters WHERE subscription = $1 AND event_id = $2",
            self.schema().quoted()
        );
        async move {
            let mut tx = crate::tx::begin(self.pool())
                .await
                .map_err(|e| to_error(e, "unpark event"))?;
            let row = sqlx::query(sqlx::AssertSqlSafe(select.as_str()))
                .bind(subscription)
                .bind(event_id.as_uuid())
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| to_error(e, "unpark event"))?;
            let Some(row) = row else { return Ok(None) };
            let parked = parked_from_row(&row)?;
            sqlx::query(sqlx::AssertSqlSafe(delete.as_str()))
                .bind(subscription)
                .bind(event_id.as_uuid())
                .execute(&mut *tx)
                .await
                .map_err(|e| to_error(e, "unpark event"))?;
            tx.commit().await.map_err(|e| to_error(e, "unpark event"))?;
            Ok(Some(parked))
        }
    }
}

impl PostgresStore {
    fn parked_sql(&self, condition: &str) -> String {
        let s = self.schema().quoted();
        format!(
            "SELECT d.subscription, d.error, d.attempts, d.parked_at, {columns} \
             FROM {s}.dead_letters d JOIN {s}.events e ON e.event_id = d.event_id \
             WHERE {condition} ORDER BY d.parked_at, e.global_position",
            columns = crate::store::EVENT_COLUMNS_E,
        )
    }
}

fn parked_from_row(row: &sqlx::postgres::PgRow) -> Result<ParkedEvent, Error> {
    let read = |e: sqlx::Error| to_error(e, "list parked events");
    let subscription: String = row.try_get("subscription").map_err(read)?;
    let error: String = row.try_get("error").map_err(read)?;
    let attempts: i32 = row.try_get("attempts").map_err(read)?;
    let parked_at: DateTime<Utc> = row.try_get("parked_at").map_err(read)?;
    // d.subscription, d.error, d.attempts, d.parked_at, then the event's columns.
    let event = EventRow::at(row, 4).map_err(read)?.into_recorded()?;
    Ok(ParkedEvent {
        subscription,
        event,
        error,
        attempts: u32::try_from(attempts).unwrap_or(0),
        parked_at,
    })
}
