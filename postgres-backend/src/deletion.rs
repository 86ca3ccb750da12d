//! Deleting streams where the law requires it, and a retention helper.
//!
//! A deleted stream's events are removed from the log and replaced by one tombstone event
//! ([`factum::STREAM_DELETED`]) at the next version, written in the same transaction, so the log
//! stays consistent for subscribers: positions only grow (the deleted events' positions are never
//! handed out again), a subscriber that read the events sees the tombstone next and can erase what
//! it derived from them, and one that starts later never sees them. The stream's row stays,
//! archived and marked deleted: its id and versions are never reused, and every append to it
//! fails with [`Error::StreamDeleted`].

use chrono::{DateTime, Utc};
use factum::{Error, EventId, GlobalPosition, STREAM_DELETED, StreamId, StreamVersion};

use crate::error::to_error;
use crate::store::PostgresStore;

/// What [`PostgresStore::delete_stream`] did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct DeletedStream {
    /// Events removed (0 when the stream was deleted before).
    pub deleted_events: u64,
    /// The stream version of the tombstone (the last deleted event's version + 1).
    pub tombstone_version: StreamVersion,
    /// The tombstone's place in the global log (`None` when the stream was deleted before).
    pub tombstone_position: Option<GlobalPosition>,
}

impl PostgresStore {
    /// Deletes a stream's events, in one transaction: their rows (in every attached partition),
    /// the stream's snapshot, its idempotency keys and the dead letters that point at its
    /// events; then writes the tombstone ([`factum::STREAM_DELETED`], payload
    /// `{"deleted_through": N}`) at version `N + 1` and marks the stream deleted (and archived).
    /// `Ok(None)` when the stream does not exist; deleting a deleted stream changes nothing.
    ///
    /// Once this returns, appends to the stream fail with [`Error::StreamDeleted`] and
    /// [`Repository`](factum::Repository) loads of it fail the same way. Events of the stream in a
    /// partition detached before (cold storage) are outside the log and not touched: delete them
    /// from that table or its dump too. Read models derived from the events are the projections'
    /// to erase, on the tombstone (or by a rebuild).
    ///
    /// ```no_run
    /// # async fn run(store: factum_postgres::PostgresStore) -> Result<(), factum::Error> {
    /// let stream = factum::StreamId::new("customer-42").expect("a valid id");
    /// if let Some(deleted) = store.delete_stream(&stream).await? {
    ///     println!("{} events deleted", deleted.deleted_events);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn delete_stream(&self, stream: &StreamId) -> Result<Option<DeletedStream>, Error> {
        let s = self.schema().quoted();
        let fail = |e| to_error(e, "delete stream");
        let mut tx = self.pool().begin().await.map_err(fail)?;
        // The row lock orders this with appends (which bump the row first): an append that
        // committed before is deleted with the rest, one waiting behind it is then refused.
        let row: Option<(i64, bool)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT version, deleted_at IS NOT NULL FROM {s}.streams WHERE stream_id = $1 FOR UPDATE"
        )))
        .bind(stream.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(fail)?;
        let Some((version, deleted)) = row else {
            return Ok(None);
        };
        if deleted {
            return Ok(Some(DeletedStream {
                deleted_events: 0,
                tombstone_version: StreamVersion::new(u64::try_from(version).unwrap_or(0)),
                tombstone_position: None,
            }));
        }
        for sql in [
            format!(
                "DELETE FROM {s}.dead_letters WHERE event_id IN \
                 (SELECT event_id FROM {s}.events WHERE stream_id = $1)"
            ),
            format!("DELETE FROM {s}.snapshots WHERE stream_id = $1"),
            format!("DELETE FROM {s}.idempotency_keys WHERE stream_id = $1"),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(stream.as_str())
                .execute(&mut *tx)
                .await
                .map_err(fail)?;
        }
        let deleted_events = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM {s}.events WHERE stream_id = $1"
        )))
        .bind(stream.as_str())
        .execute(&mut *tx)
        .await
        .map_err(fail)?
        .rows_affected();
        let position: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {s}.events (stream_id, stream_version, event_id, event_type, \
             schema_version, payload) \
             VALUES ($1, $2 + 1, $3, $4, 1, jsonb_build_object('deleted_through', $2)) \
             RETURNING global_position"
        )))
        .bind(stream.as_str())
        .bind(version)
        .bind(EventId::new().as_uuid())
        .bind(STREAM_DELETED)
        .fetch_one(&mut *tx)
        .await
        .map_err(fail)?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {s}.streams SET version = version + 1, archived = true, deleted_at = now() \
             WHERE stream_id = $1"
        )))
        .bind(stream.as_str())
        .execute(&mut *tx)
        .await
        .map_err(fail)?;
        tx.commit().await.map_err(fail)?;
        tracing::info!(%stream, deleted_events, "stream deleted");
        Ok(Some(DeletedStream {
            deleted_events,
            tombstone_version: StreamVersion::new(u64::try_from(version + 1).unwrap_or(0)),
            tombstone_position: Some(GlobalPosition::new(u64::try_from(position).unwrap_or(0))),
        }))
    }

    /// Retention: deletes every stream of `category` with no event recorded at or after
    /// `before` (each with [`delete_stream`](Self::delete_stream), one transaction per stream),
    /// and returns them. Run it from a periodic task, e.g. to keep closed orders for ten years.
    pub async fn delete_streams_inactive_since(
        &self,
        category: &str,
        before: DateTime<Utc>,
    ) -> Result<Vec<StreamId>, Error> {
        let s = self.schema().quoted();
        let ids: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT st.stream_id FROM {s}.streams st \
             WHERE st.category = $1 AND st.deleted_at IS NULL AND NOT EXISTS \
             (SELECT 1 FROM {s}.events e WHERE e.stream_id = st.stream_id AND e.recorded_at >= $2) \
             ORDER BY st.stream_id"
        )))
        .bind(category)
        .bind(before)
        .fetch_all(self.pool())
        .await
        .map_err(|e| to_error(e, "find streams to delete"))?;
        let mut deleted = Vec::with_capacity(ids.len());
        for id in ids {
            let stream = StreamId::new(id).map_err(|e| Error::permanent("retention", e))?;
            if self.delete_stream(&stream).await?.is_some() {
                deleted.push(stream);
            }
        }
        Ok(deleted)
    }
}
