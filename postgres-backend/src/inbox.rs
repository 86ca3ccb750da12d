//! [`PgInbox`]: the receiving service's inbox and dead-letter queue of inbound messages.

use chrono::{DateTime, Utc};
use factum::Error;
use factum::bus::{BusMessage, Inbox, ParkedMessage};

use crate::error::to_error;
use crate::store::PostgresStore;
use crate::subscription::{PgTx, commit, rollback};

/// PostgreSQL's [`Inbox`]: each inbound message is handled in one transaction that first inserts
/// its event id into the `inbox` table. The handler writes on the same transaction
/// ([`PgTx::conn`]: a read model, or a command through
/// [`PostgresStore::in_transaction`]), so its effect and the inbox row commit together or not at
/// all, and a message whose id the inbox holds has no effect again.
///
/// Two instances receiving the same message at once do not both apply it: the second one's
/// insert waits for the first transaction and then finds the row.
///
/// Parked messages go to `inbox_dead_letters` (in the store's schema), as received; a message
/// parked again (same consumer and message id) keeps one dead letter, with the latest error.
#[derive(Clone, Debug)]
pub struct PgInbox {
    store: PostgresStore,
    sql: std::sync::Arc<Sql>,
}

#[derive(Debug)]
struct Sql {
    record: String,
    park: String,
    parked: String,
    unpark: String,
    expire: String,
}

impl PgInbox {
    /// The inbox in `store`'s schema (created by its migrations).
    pub fn new(store: &PostgresStore) -> Self {
        let schema = store.schema().quoted();
        Self {
            store: store.clone(),
            sql: std::sync::Arc::new(Sql {
                record: format!(
                    "INSERT INTO {schema}.inbox (consumer, event_id, subject) VALUES ($1, $2, $3) \
                     ON CONFLICT DO NOTHING"
                ),
                park: format!(
                    "INSERT INTO {schema}.inbox_dead_letters \
                     (consumer, subject, message_id, headers, body, error, attempts, parked_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                     ON CONFLICT (consumer, message_id) WHERE message_id IS NOT NULL DO UPDATE \
                     SET subject = EXCLUDED.subject, headers = EXCLUDED.headers, body = EXCLUDED.body, \
                         error = EXCLUDED.error, attempts = EXCLUDED.attempts, parked_at = EXCLUDED.parked_at \
                     RETURNING id"
                ),
                parked: format!(
                    "SELECT id, consumer, subject, message_id, headers, body, error, attempts, parked_at \
                     FROM {schema}.inbox_dead_letters WHERE consumer = $1 ORDER BY id"
                ),
                unpark: format!(
                    "DELETE FROM {schema}.inbox_dead_letters WHERE consumer = $1 AND id = $2"
                ),
                expire: format!("DELETE FROM {schema}.inbox WHERE handled_at < $1"),
            }),
        }
    }

    /// Whether `consumer` has handled the event `event_id`.
    pub async fn contains(&self, consumer: &str, event_id: factum::EventId) -> Result<bool, Error> {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT EXISTS (SELECT 1 FROM {}.inbox WHERE consumer = $1 AND event_id = $2)",
            self.store.schema().quoted()
        )))
        .bind(consumer)
        .bind(event_id.as_uuid())
        .fetch_one(self.store.pool())
        .await
        .map_err(|e| to_error(e, "inbox lookup"))
    }

    /// Removes the inbox rows of messages handled before `before`; returns how many.
    ///
    /// A message removed here would have an effect again if it were delivered again: keep rows
    /// for longer than anything can be redelivered or replayed to this service (the bus
    /// stream's retention, and how far back a relay may be rewound).
    pub async fn expire(&self, before: DateTime<Utc>) -> Result<u64, Error> {
        let done = sqlx::query(sqlx::AssertSqlSafe(self.sql.expire.as_str()))
            .bind(before)
            .execute(self.store.pool())
            .await
            .map_err(|e| to_error(e, "expire inbox rows"))?;
        Ok(done.rows_affected())
    }

    async fn delete_parked(
        &self,
        conn: &mut sqlx::PgConnection,
        consumer: &str,
        id: u64,
    ) -> Result<bool, Error> {
        let done = sqlx::query(sqlx::AssertSqlSafe(self.sql.unpark.as_str()))
            .bind(consumer)
            .bind(i64::try_from(id).unwrap_or(i64::MAX))
            .execute(conn)
            .await
            .map_err(|e| to_error(e, "remove parked message"))?;
        Ok(done.rows_affected() > 0)
    }
}

impl Inbox for PgInbox {
    type Tx = PgTx;

    async fn begin(&self, consumer: &str, message: &BusMessage) -> Result<Option<PgTx>, Error> {
        let mut tx = crate::tx::begin(self.store.pool())
            .await
            .map_err(|e| to_error(e, "begin inbox transaction"))?;
        let recorded = sqlx::query(sqlx::AssertSqlSafe(self.sql.record.as_str()))
            .bind(consumer)
            .bind(message.event.event_id.as_uuid())
            .bind(&message.subject)
            .execute(&mut *tx)
            .await;
        match recorded {
            Ok(done) if done.rows_affected() == 1 => Ok(Some(PgTx::new(tx))),
            Ok(_) => {
                rollback(tx).await;
                Ok(None)
            }
            Err(error) => {
                rollback(tx).await;
                Err(to_error(error, "record inbox message"))
            }
        }
    }

    fn commit(&self, tx: PgTx) -> impl Future<Output = Result<(), Error>> + Send {
        commit(tx.into_inner())
    }

    fn rollback(&self, tx: PgTx) -> impl Future<Output = ()> + Send {
        rollback(tx.into_inner())
    }

    async fn park(&self, parked: ParkedMessage) -> Result<u64, Error> {
        let headers: serde_json::Value = parked
            .headers
            .iter()
            .map(|(n, v)| serde_json::json!([n, v]))
            .collect();
        let id: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(self.sql.park.as_str()))
            .bind(&parked.consumer)
            .bind(&parked.subject)
            .bind(&parked.message_id)
            .bind(sqlx::types::Json(headers))
            .bind(&parked.body)
            .bind(&parked.error)
            .bind(i32::try_from(parked.attempts).unwrap_or(i32::MAX))
            .bind(parked.parked_at)
            .fetch_one(self.store.pool())
            .await
            .map_err(|e| to_error(e, "park inbound message"))?;
        Ok(u64::try_from(id).unwrap_or(0))
    }

    async fn parked(&self, consumer: &str) -> Result<Vec<ParkedMessage>, Error> {
        type Row = (
            i64,
            String,
            String,
            Option<String>,
            sqlx::types::Json<Vec<(String, String)>>,
            Vec<u8>,
            String,
            i32,
            DateTime<Utc>,
        );
        let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(self.sql.parked.as_str()))
            .bind(consumer)
            .fetch_all(self.store.pool())
            .await
            .map_err(|e| to_error(e, "list parked messages"))?;
        Ok(rows
            .into_iter()
            .map(
                |(id, consumer, subject, message_id, headers, body, error, attempts, at)| {
                    ParkedMessage::stored(
                        u64::try_from(id).unwrap_or(0),
                        consumer,
                        subject,
                        message_id,
                        headers.0,
                        body,
                        error,
                        u32::try_from(attempts).unwrap_or(0),
                        at,
                    )
                },
            )
            .collect())
    }

    async fn unpark(&self, tx: &mut PgTx, consumer: &str, id: u64) -> Result<bool, Error> {
        self.delete_parked(tx.conn(), consumer, id).await
    }

    async fn discard(&self, consumer: &str, id: u64) -> Result<bool, Error> {
        let mut conn = self
            .store
            .pool()
            .acquire()
            .await
            .map_err(|e| to_error(e, "discard parked message"))?;
        self.delete_parked(&mut conn, consumer, id).await
    }
}
