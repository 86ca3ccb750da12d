//! Subscription checkpoints, the dead-letter queue, and the consumer loop's PostgreSQL
//! capabilities: [`PgCheckpoints`] (checkpoint transactions the handler writes in) and
//! [`PgLease`] (one leader among the instances of a consumer).

use std::future::Future;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use factum::subscription::{
    Begun, CheckpointStore, DeadLetterStore, Lease, ParkedEvent, TransactionalCheckpoint,
};
use factum::{Error, EventId, GlobalPosition, LogPosition};
use sqlx::{Connection, PgConnection, Postgres, Row, Transaction};

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
            self.ensure_service().await?;
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
            self.ensure_service().await?;
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
            let mut parked = Vec::with_capacity(rows.len());
            for row in &rows {
                let mut event = parked_from_row(row)?;
                // Decrypted like every read, so a retry handles what the consumer saw.
                event.event = self.open(event.event).await?;
                parked.push(event);
            }
            Ok(parked)
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
            let mut parked = parked_from_row(&row)?;
            parked.event = self.open(parked.event).await?;
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
    pub(crate) fn parked_sql(&self, condition: &str) -> String {
        let s = self.schema().quoted();
        format!(
            "SELECT d.subscription, d.error, d.attempts, d.parked_at, {columns} \
             FROM {s}.dead_letters d JOIN {s}.events e ON e.event_id = d.event_id \
             WHERE {condition} ORDER BY d.parked_at, e.global_position",
            columns = crate::store::EVENT_COLUMNS_E,
        )
    }
}

pub(crate) fn parked_from_row(row: &sqlx::postgres::PgRow) -> Result<ParkedEvent, Error> {
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

// ---------------------------------------------------------------------------------------------
// The consumer loop's PostgreSQL capabilities: checkpoint transactions and the lease.

/// SQL the checkpoint transactions need, built once for the store's schema.
#[derive(Debug)]
pub(crate) struct Sql {
    pub(crate) lock_checkpoint: String,
    pub(crate) insert_checkpoint: String,
    pub(crate) save_checkpoint: String,
    pub(crate) park: String,
    pub(crate) claim_parked: String,
}

impl Sql {
    pub(crate) fn new(store: &PostgresStore) -> Self {
        let s = store.schema().quoted();
        Self {
            lock_checkpoint: format!(
                "SELECT commit_id, global_position FROM {s}.subscription_checkpoints \
                 WHERE subscription = $1 FOR UPDATE"
            ),
            insert_checkpoint: format!(
                "INSERT INTO {s}.subscription_checkpoints (subscription, commit_id, global_position) \
                 VALUES ($1, $2, $3) ON CONFLICT (subscription) DO NOTHING"
            ),
            save_checkpoint: format!(
                "INSERT INTO {s}.subscription_checkpoints (subscription, commit_id, global_position) \
                 VALUES ($1, $2, $3) ON CONFLICT (subscription) DO UPDATE \
                 SET commit_id = EXCLUDED.commit_id, global_position = EXCLUDED.global_position, \
                     updated_at = now()"
            ),
            park: format!(
                "INSERT INTO {s}.dead_letters (subscription, event_id, error, attempts, parked_at) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (subscription, event_id) DO UPDATE \
                 SET error = EXCLUDED.error, attempts = EXCLUDED.attempts, parked_at = EXCLUDED.parked_at"
            ),
            claim_parked: format!(
                "DELETE FROM {s}.dead_letters WHERE subscription = $1 AND event_id = $2 RETURNING event_id"
            ),
        }
    }
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn position(commit: i64, global: i64) -> LogPosition {
    LogPosition::new(
        u64::try_from(commit).unwrap_or(0),
        GlobalPosition::new(u64::try_from(global).unwrap_or(0)),
    )
}

/// Locks the checkpoint row of `name` for the transaction; `Some(stored)` when it is not at
/// `expected` (a missing row, deleted by hand, is recreated at `expected`).
pub(crate) async fn lock_checkpoint(
    sql: &Sql,
    conn: &mut PgConnection,
    name: &str,
    expected: LogPosition,
) -> Result<Option<LogPosition>, Error> {
    let row: Option<(i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(sql.lock_checkpoint.as_str()))
        .bind(name)
        .fetch_optional(&mut *conn)
        .await
        .map_err(|e| to_error(e, "lock checkpoint"))?;
    let stored = match row {
        Some((c, g)) => position(c, g),
        None => {
            sqlx::query(sqlx::AssertSqlSafe(sql.insert_checkpoint.as_str()))
                .bind(name)
                .bind(clamp_i64(expected.commit))
                .bind(clamp_i64(expected.global.get()))
                .execute(&mut *conn)
                .await
                .map_err(|e| to_error(e, "create checkpoint"))?;
            expected
        }
    };
    Ok((stored != expected).then_some(stored))
}

pub(crate) async fn save_checkpoint_as(
    sql: &Sql,
    conn: &mut PgConnection,
    name: &str,
    position: LogPosition,
) -> Result<(), Error> {
    sqlx::query(sqlx::AssertSqlSafe(sql.save_checkpoint.as_str()))
        .bind(name)
        .bind(clamp_i64(position.commit))
        .bind(clamp_i64(position.global.get()))
        .execute(conn)
        .await
        .map_err(|e| to_error(e, "save checkpoint"))?;
    Ok(())
}

pub(crate) async fn rollback(tx: Transaction<'static, Postgres>) {
    // A failed rollback leaves nothing committed: the connection is discarded by the pool.
    if let Err(error) = tx.rollback().await {
        tracing::debug!(%error, "rollback failed");
    }
}

pub(crate) async fn commit(tx: Transaction<'static, Postgres>) -> Result<(), Error> {
    // A lost acknowledgement is settled by the next batch's checkpoint check.
    tx.commit()
        .await
        .map_err(|e| to_error(e, "commit consumer transaction"))
}

/// PostgreSQL's [`TransactionalCheckpoint`]: each unit of work of a consumer is one transaction
/// that locks the consumer's checkpoint row (checking it is where the consumer left it), in which
/// the handler writes ([`PgTx::conn`]), events are parked, and the checkpoint moves. Either all
/// of it commits or none, so a handler writing on the transaction applies each event **exactly
/// once**, across crashes and several instances.
///
/// ```no_run
/// use factum::subscription::{BatchFailure, BatchHandler, Subscription};
/// use factum::RecordedEvent;
/// use factum_postgres::subscription::{PgCheckpoints, PgLease, PgTx};
///
/// /// Records each event id in `seen(event_id uuid primary key)`, once.
/// struct Seen;
///
/// impl BatchHandler<PgTx> for Seen {
///     async fn handle_batch(&mut self, tx: &mut PgTx, events: &[RecordedEvent]) -> Result<(), BatchFailure> {
///         let ids: Vec<uuid::Uuid> = events.iter().map(|e| e.event_id.as_uuid()).collect();
///         sqlx::query("INSERT INTO seen SELECT unnest($1::uuid[])")
///             .bind(ids)
///             .execute(tx.conn())
///             .await
///             .map_err(BatchFailure::somewhere)?;
///         Ok(())
///     }
/// }
///
/// # async fn run(store: factum_postgres::PostgresStore) -> Result<(), factum::Error> {
/// let mut subscription = Subscription::with_checkpoints("seen", store.clone(), PgCheckpoints::new(&store))
///     .lease(PgLease::new(&store)); // one instance of several works at a time
/// subscription.run(Seen, std::future::pending::<()>()).await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct PgCheckpoints {
    store: PostgresStore,
    sql: Arc<Sql>,
}

impl PgCheckpoints {
    /// Checkpoint transactions on `store`'s database and schema.
    pub fn new(store: &PostgresStore) -> Self {
        Self {
            sql: Arc::new(Sql::new(store)),
            store: store.clone(),
        }
    }

    pub(crate) fn sql(&self) -> &Sql {
        &self.sql
    }
}

/// A consumer's unit of work on PostgreSQL: the transaction [`PgCheckpoints`] opened.
pub struct PgTx {
    tx: Transaction<'static, Postgres>,
}

impl std::fmt::Debug for PgTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTx").finish_non_exhaustive()
    }
}

impl PgTx {
    /// The connection, inside the transaction: write the handler's effects on it.
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    pub(crate) fn new(tx: Transaction<'static, Postgres>) -> Self {
        Self { tx }
    }

    pub(crate) fn into_inner(self) -> Transaction<'static, Postgres> {
        self.tx
    }
}

impl TransactionalCheckpoint for PgCheckpoints {
    type Tx = PgTx;

    fn load(&self, name: &str) -> impl Future<Output = Result<Option<LogPosition>, Error>> + Send {
        self.store.load_checkpoint(name)
    }

    fn reset(
        &self,
        name: &str,
        position: LogPosition,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        self.store.save_checkpoint(name, position)
    }

    async fn begin(&self, name: &str, expected: LogPosition) -> Result<Begun<PgTx>, Error> {
        self.store.ensure_service().await?;
        let mut tx = crate::tx::begin(self.store.pool())
            .await
            .map_err(|e| to_error(e, "begin consumer transaction"))?;
        match lock_checkpoint(&self.sql, &mut tx, name, expected).await {
            Ok(None) => Ok(Begun::Ready(PgTx { tx })),
            Ok(Some(stored)) => {
                rollback(tx).await;
                Ok(Begun::Moved(stored))
            }
            Err(error) => {
                rollback(tx).await;
                Err(error)
            }
        }
    }

    async fn park(&self, tx: &mut PgTx, parked: ParkedEvent) -> Result<(), Error> {
        sqlx::query(sqlx::AssertSqlSafe(self.sql.park.as_str()))
            .bind(&parked.subscription)
            .bind(parked.event.event_id.as_uuid())
            .bind(&parked.error)
            .bind(i32::try_from(parked.attempts).unwrap_or(i32::MAX))
            .bind(parked.parked_at)
            .execute(tx.conn())
            .await
            .map_err(|e| to_error(e, "park event"))?;
        Ok(())
    }

    async fn commit(&self, mut tx: PgTx, name: &str, position: LogPosition) -> Result<(), Error> {
        save_checkpoint_as(&self.sql, tx.conn(), name, position).await?;
        commit(tx.tx).await
    }

    fn rollback(&self, tx: PgTx) -> impl Future<Output = ()> + Send {
        rollback(tx.tx)
    }
}

/// The lease is one bigint advisory lock: a 64-bit hash of the schema and the consumer's name
/// (`hashtextextended`), so consumers of different schemas never share one.
const LEASE_SQL: &str = "SELECT pg_try_advisory_lock(hashtextextended($1, 0))";

/// PostgreSQL's [`Lease`]: a session-level advisory lock with a 64-bit key (a hash of
/// `factum.lease:<schema>.<consumer name>`), held on a connection of its own.
///
/// The connection is opened outside the pool on purpose: a pooled connection dropped by an
/// aborted task goes back to the pool with its session lock still held, while a dedicated
/// connection closes, and the server releases the lock with the session. So the lease ends when
/// its holder's process dies, its task is dropped, or its connection is cut (the holder notices
/// on its next check, [`Lease::is_held`], a ping while idle).
#[derive(Clone, Debug)]
pub struct PgLease {
    store: PostgresStore,
    /// A connection from a try that found the lease taken, reused by the next try.
    spare: Arc<tokio::sync::Mutex<Option<PgConnection>>>,
}

/// A held [`PgLease`]. Dropping it closes its connection, which releases the lock.
#[derive(Debug)]
pub struct PgLeaseGuard {
    conn: PgConnection,
}

impl PgLease {
    /// Leases on `store`'s database, keyed within its schema.
    pub fn new(store: &PostgresStore) -> Self {
        Self {
            store: store.clone(),
            spare: Arc::default(),
        }
    }
}

impl Lease for PgLease {
    type Guard = PgLeaseGuard;

    async fn try_acquire(&self, name: &str) -> Result<Option<PgLeaseGuard>, Error> {
        let key = format!("factum.lease:{}.{name}", self.store.schema().as_str());
        let mut spare = self.spare.lock().await;
        let mut conn = match spare.take() {
            Some(conn) => conn,
            None => PgConnection::connect_with(&self.store.pool().connect_options())
                .await
                .map_err(|e| to_error(e, "connect for the consumer lease"))?,
        };
        // On error the connection may be broken: it is dropped, the next try opens a new one.
        let taken: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(LEASE_SQL))
            .bind(&key)
            .fetch_one(&mut conn)
            .await
            .map_err(|e| to_error(e, "take the consumer lease"))?;
        if taken {
            Ok(Some(PgLeaseGuard { conn }))
        } else {
            *spare = Some(conn);
            Ok(None)
        }
    }

    async fn is_held(&self, guard: &mut PgLeaseGuard) -> bool {
        guard.conn.ping().await.is_ok()
    }
}
