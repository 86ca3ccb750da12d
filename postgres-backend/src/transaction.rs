//! [`InTransaction`]: the store seen through a transaction the caller holds.

use std::future::Future;

use factum::{
    AppendRequest, AppendResult, Error, EventFilter, EventStore, EventStream, IdempotencyKey,
    LogPosition, PayloadStream, RecordedEvent, StreamId, StreamVersion,
};
use futures_util::StreamExt;
use sqlx::PgConnection;
use tokio::sync::Mutex;

use crate::error::to_error;
use crate::store::{EventRow, PostgresStore, payload_from_row};

/// A [`PostgresStore`] whose appends and stream reads run in a transaction the caller holds
/// (from [`PostgresStore::in_transaction`]): give it to a [`Repository`](factum::Repository) and a
/// command loads, decides and appends inside that transaction, committing with the caller's own
/// writes (an inbox row, a saga's state) or not at all.
///
/// Appends keep every guarantee of [`EventStore::append`] (see [`PostgresStore::append_in`] for
/// what differs inside a transaction); stream reads see the transaction's own appends. Reads of the
/// global log ([`read_all`](EventStore::read_all), [`head`](EventStore::head),
/// [`position_at`](EventStore::position_at)) are not transactional: they read the committed log
/// through the store's pool, like a subscription does.
///
/// ```no_run
/// # use factum::{Aggregate, Repository};
/// # async fn run<A: Aggregate>(store: factum_postgres::PostgresStore, command: A::Command) -> Result<(), Box<dyn std::error::Error>>
/// # where A::Error: std::error::Error + Send + Sync + 'static {
/// let mut tx = store.pool().begin().await?;
/// sqlx::query("INSERT INTO inbox (message_id) VALUES ($1)").bind("msg-1").execute(&mut *tx).await?;
/// let committed = Repository::<A, _>::new(store.in_transaction(&mut tx)).execute(command).await?;
/// tx.commit().await?;
/// # Ok(()) }
/// ```
pub struct InTransaction<'c> {
    store: PostgresStore,
    conn: Mutex<&'c mut PgConnection>,
}

impl std::fmt::Debug for InTransaction<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InTransaction")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// This store, with appends and stream reads in the caller's transaction `conn` (see
    /// [`InTransaction`]).
    pub fn in_transaction<'c>(&self, conn: &'c mut PgConnection) -> InTransaction<'c> {
        InTransaction {
            store: self.clone(),
            conn: Mutex::new(conn),
        }
    }
}

impl EventStore for InTransaction<'_> {
    async fn append(&self, request: AppendRequest) -> Result<AppendResult, Error> {
        let mut conn = self.conn.lock().await;
        self.store.append_in(&mut conn, request).await
    }

    async fn idempotency_outcome(
        &self,
        key: &IdempotencyKey,
    ) -> Result<Option<AppendResult>, Error> {
        let mut conn = self.conn.lock().await;
        Ok(self
            .store
            .key_record(&mut **conn, key)
            .await?
            .map(|(result, _)| result))
    }

    fn read_stream<'a>(&'a self, stream: &'a StreamId, after: StreamVersion) -> EventStream<'a> {
        // Read whole: the connection is the transaction's and cannot stay borrowed by a stream
        // the caller may hold while appending.
        let rows = async move {
            let mut conn = self.conn.lock().await;
            let rows = sqlx::query(sqlx::AssertSqlSafe(self.store.sql_read_stream()))
                .bind(stream.as_str())
                .bind(i64::try_from(after.get()).unwrap_or(i64::MAX))
                .fetch_all(&mut **conn)
                .await;
            let events: Vec<Result<RecordedEvent, Error>> = match rows {
                Ok(rows) => rows
                    .iter()
                    .map(|row| {
                        EventRow::at(row, 0)
                            .map_err(|e| to_error(e, "read stream"))
                            .and_then(EventRow::into_recorded)
                    })
                    .collect(),
                Err(e) => vec![Err(to_error(e, "read stream"))],
            };
            let mut opened = Vec::with_capacity(events.len());
            for event in events {
                opened.push(match event {
                    Ok(event) => self.store.open(event).await,
                    Err(e) => Err(e),
                });
            }
            futures_util::stream::iter(opened)
        };
        Box::pin(futures_util::stream::once(rows).flatten())
    }

    fn read_stream_payloads<'a>(
        &'a self,
        stream: &'a StreamId,
        after: StreamVersion,
    ) -> PayloadStream<'a> {
        if self.store.decrypts() {
            use futures_util::TryStreamExt as _;
            return Box::pin(
                self.read_stream(stream, after)
                    .map_ok(factum::EventPayload::from),
            );
        }
        let rows = async move {
            let mut conn = self.conn.lock().await;
            let rows = sqlx::query(sqlx::AssertSqlSafe(self.store.sql_read_payloads()))
                .bind(stream.as_str())
                .bind(i64::try_from(after.get()).unwrap_or(i64::MAX))
                .fetch_all(&mut **conn)
                .await;
            let events: Vec<_> = match rows {
                Ok(rows) => rows
                    .iter()
                    .map(|row| payload_from_row(stream, row))
                    .collect(),
                Err(e) => vec![Err(to_error(e, "read stream"))],
            };
            futures_util::stream::iter(events)
        };
        Box::pin(futures_util::stream::once(rows).flatten())
    }

    fn read_all(
        &self,
        after: LogPosition,
        limit: usize,
        filter: &EventFilter,
    ) -> impl Future<Output = Result<Vec<RecordedEvent>, Error>> + Send {
        self.store.read_all(after, limit, filter)
    }

    fn head(&self) -> impl Future<Output = Result<LogPosition, Error>> + Send {
        self.store.head()
    }

    fn position_at(
        &self,
        time: chrono::DateTime<chrono::Utc>,
    ) -> impl Future<Output = Result<LogPosition, Error>> + Send {
        self.store.position_at(time)
    }
}
