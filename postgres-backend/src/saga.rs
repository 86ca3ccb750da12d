//! Sagas on PostgreSQL: [`PgSagaStore`] (instances, queued commands and timeouts in the tables of
//! migration 0006, changes in the event store) and [`PgTarget`] (commands executed in the
//! dispatch's transaction).
//!
//! Everything a saga instance decides commits in the transaction of the consumer that fed it:
//! [`PgCheckpoints`](crate::subscription::PgCheckpoints) for the local log,
//! [`PgInbox`](crate::PgInbox) for other services' events (both hand the runtime a [`PgTx`]).
//!
//! ```no_run
//! use factum::saga::SagaRuntime;
//! use factum::subscription::Subscription;
//! use factum_postgres::saga::PgSagaStore;
//! use factum_postgres::subscription::{PgCheckpoints, PgLease};
//! # async fn run<Checkout: factum::saga::Saga>(store: factum_postgres::PostgresStore) -> Result<(), factum::Error> {
//! let runtime = SagaRuntime::<Checkout, _>::new(PgSagaStore::new(&store));
//! // Reactions commit with the subscription's checkpoint...
//! let mut feed = Subscription::with_checkpoints(runtime.name(), store.clone(), PgCheckpoints::new(&store))
//!     .filter(runtime.filter())
//!     .lease(PgLease::new(&store));
//! // ...and commands and timeouts are dispatched by one instance of several.
//! let (fed, timers) = tokio::join!(
//!     feed.run(runtime.clone(), std::future::pending::<()>()),
//!     runtime.run(PgLease::new(&store), std::future::pending::<()>()),
//! );
//! # fed?; timers?; Ok(()) }
//! ```

use std::future::Future;

use chrono::{DateTime, Utc};
use factum::saga::{
    Decided, Executed, Instance, ParkedInstance, PendingCommand, SagaStore, ScheduledTimeout,
    SentCommand, Target, TimeoutDecision,
};
use factum::{
    Aggregate, AppendRequest, BoxFuture, CausationId, CommandContext, CommandId, CorrelationId,
    Error, EventStore, ExpectedVersion, RawValue, RecordedEvent, Repository, StreamId,
    StreamVersion,
};
use futures_util::TryStreamExt;
use serde::de::DeserializeOwned;
use sqlx::Row;
use sqlx::postgres::PgRow;
use uuid::Uuid;

use crate::error::to_error;
use crate::store::PostgresStore;
use crate::subscription::{PgTx, commit, rollback};

/// PostgreSQL's [`SagaStore`]: instances' changes in the event store (appended with
/// [`PostgresStore::append_in`]), their queued commands, timeouts and parking in the tables of
/// migration 0006, all in the caller's transaction ([`PgTx`]).
#[derive(Clone, Debug)]
pub struct PgSagaStore {
    store: PostgresStore,
    sql: std::sync::Arc<Sql>,
}

#[derive(Debug)]
struct Sql {
    lock: String,
    queue: String,
    schedule: String,
    cancel: String,
    due_commands: String,
    claim_command: String,
    postpone: String,
    park_command: String,
    park_instance: String,
    unpark: String,
    unpark_commands: String,
    parked: String,
    due_timeouts: String,
    claim_timeout: String,
    timeouts: String,
    commands: String,
}

const COMMAND_COLUMNS: &str = "saga, key, sequence, target, command_name, aggregate_id, \
     payload::text AS payload, command_id, correlation_id, causation_id, attempts, due_at, last_error";
const TIMEOUT_COLUMNS: &str =
    "saga, key, name, id, due_at, payload::text AS payload, correlation_id";

impl PgSagaStore {
    /// Saga storage in `store`'s database and schema (created by its migrations).
    pub fn new(store: &PostgresStore) -> Self {
        let s = store.schema().quoted();
        let sql = Sql {
            // DO UPDATE (of nothing) locks the row, new or not, for the transaction.
            lock: format!(
                "INSERT INTO {s}.saga_instances AS i (saga, key) VALUES ($1, $2) \
                 ON CONFLICT (saga, key) DO UPDATE SET saga = i.saga RETURNING parked_error"
            ),
            queue: format!(
                "INSERT INTO {s}.saga_commands (command_id, saga, key, target, command_name, aggregate_id, \
                 payload, correlation_id, causation_id, due_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9, $10) ON CONFLICT (command_id) DO NOTHING"
            ),
            schedule: format!(
                "INSERT INTO {s}.saga_timeouts (saga, key, name, id, due_at, payload, correlation_id) \
                 VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7) ON CONFLICT (saga, key, name) DO UPDATE \
                 SET id = EXCLUDED.id, due_at = EXCLUDED.due_at, payload = EXCLUDED.payload, \
                     correlation_id = EXCLUDED.correlation_id"
            ),
            cancel: format!(
                "DELETE FROM {s}.saga_timeouts WHERE saga = $1 AND key = $2 AND name = $3"
            ),
            due_commands: format!(
                "SELECT {COMMAND_COLUMNS} FROM ( \
                     SELECT DISTINCT ON (c.key) c.* FROM {s}.saga_commands c WHERE c.saga = $1 \
                     ORDER BY c.key, c.sequence) h \
                 WHERE h.due_at <= $2 AND NOT EXISTS ( \
                     SELECT 1 FROM {s}.saga_instances i \
                     WHERE i.saga = h.saga AND i.key = h.key AND i.parked_error IS NOT NULL) \
                 ORDER BY h.sequence LIMIT $3"
            ),
            claim_command: format!(
                "DELETE FROM {s}.saga_commands WHERE saga = $1 AND command_id = $2 RETURNING {COMMAND_COLUMNS}"
            ),
            postpone: format!(
                "UPDATE {s}.saga_commands SET attempts = $3, due_at = $4, last_error = $5 \
                 WHERE saga = $1 AND command_id = $2"
            ),
            park_command: format!(
                "UPDATE {s}.saga_commands SET attempts = $3, last_error = $4 \
                 WHERE saga = $1 AND command_id = $2"
            ),
            park_instance: format!(
                "INSERT INTO {s}.saga_instances (saga, key, parked_error, parked_at) VALUES ($1, $2, $3, now()) \
                 ON CONFLICT (saga, key) DO UPDATE SET parked_error = EXCLUDED.parked_error, parked_at = EXCLUDED.parked_at"
            ),
            unpark: format!(
                "UPDATE {s}.saga_instances SET parked_error = NULL, parked_at = NULL \
                 WHERE saga = $1 AND key = $2 AND parked_error IS NOT NULL"
            ),
            unpark_commands: format!(
                "UPDATE {s}.saga_commands SET attempts = 0, due_at = $3 WHERE saga = $1 AND key = $2"
            ),
            parked: format!(
                "SELECT saga, key, parked_error, parked_at FROM {s}.saga_instances \
                 WHERE saga = $1 AND parked_error IS NOT NULL ORDER BY parked_at, key"
            ),
            due_timeouts: format!(
                "SELECT {TIMEOUT_COLUMNS} FROM {s}.saga_timeouts WHERE saga = $1 AND due_at <= $2 \
                 ORDER BY due_at, key LIMIT $3"
            ),
            claim_timeout: format!(
                "DELETE FROM {s}.saga_timeouts WHERE saga = $1 AND id = $2 RETURNING {TIMEOUT_COLUMNS}"
            ),
            timeouts: format!(
                "SELECT {TIMEOUT_COLUMNS} FROM {s}.saga_timeouts WHERE saga = $1 AND key = $2 ORDER BY due_at, name"
            ),
            commands: format!(
                "SELECT {COMMAND_COLUMNS} FROM {s}.saga_commands WHERE saga = $1 AND key = $2 ORDER BY sequence"
            ),
        };
        Self {
            store: store.clone(),
            sql: std::sync::Arc::new(sql),
        }
    }

    /// The event store the instances' changes are appended to.
    pub fn events(&self) -> &PostgresStore {
        &self.store
    }
}

fn q(sql: &str) -> sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(sqlx::AssertSqlSafe(sql))
}

fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn raw(text: String, what: &str) -> Result<Box<RawValue>, Error> {
    RawValue::from_string(text)
        .map_err(|e| Error::permanent("read saga rows", format!("stored {what} is not JSON: {e}")))
}

fn command_from_row(row: &PgRow) -> Result<PendingCommand, Error> {
    let read = |e| to_error(e, "read saga commands");
    let command_id: Uuid = row.try_get("command_id").map_err(read)?;
    let correlation: Uuid = row.try_get("correlation_id").map_err(read)?;
    let causation: Option<Uuid> = row.try_get("causation_id").map_err(read)?;
    let context = CommandContext::new()
        .with_command_id(CommandId::from_uuid(command_id))
        .with_correlation_id(CorrelationId::from_uuid(correlation))
        .idempotent();
    let context = CommandContext {
        causation_id: causation.map(CausationId::from_uuid),
        ..context
    };
    let command = SentCommand::stored(
        row.try_get("target").map_err(read)?,
        row.try_get("command_name").map_err(read)?,
        row.try_get("aggregate_id").map_err(read)?,
        raw(row.try_get("payload").map_err(read)?, "saga command")?,
        context,
    );
    let sequence: i64 = row.try_get("sequence").map_err(read)?;
    let attempts: i32 = row.try_get("attempts").map_err(read)?;
    Ok(PendingCommand::new(
        row.try_get("saga").map_err(read)?,
        row.try_get("key").map_err(read)?,
        u64::try_from(sequence).unwrap_or(0),
        command,
        u32::try_from(attempts).unwrap_or(0),
        row.try_get("due_at").map_err(read)?,
        row.try_get("last_error").map_err(read)?,
    ))
}

fn timeout_from_row(row: &PgRow) -> Result<ScheduledTimeout, Error> {
    let read = |e| to_error(e, "read saga timeouts");
    let correlation: Uuid = row.try_get("correlation_id").map_err(read)?;
    Ok(ScheduledTimeout::new(
        row.try_get("saga").map_err(read)?,
        row.try_get("key").map_err(read)?,
        row.try_get("name").map_err(read)?,
        row.try_get("id").map_err(read)?,
        row.try_get("due_at").map_err(read)?,
        raw(row.try_get("payload").map_err(read)?, "saga timeout")?,
        CorrelationId::from_uuid(correlation),
    ))
}

impl SagaStore for PgSagaStore {
    type Tx = PgTx;

    async fn begin(&self) -> Result<PgTx, Error> {
        let tx = crate::tx::begin(self.store.pool())
            .await
            .map_err(|e| to_error(e, "begin saga transaction"))?;
        Ok(PgTx::new(tx))
    }

    fn commit(&self, tx: PgTx) -> impl Future<Output = Result<(), Error>> + Send {
        commit(tx.into_inner())
    }

    fn rollback(&self, tx: PgTx) -> impl Future<Output = ()> + Send {
        rollback(tx.into_inner())
    }

    async fn load(
        &self,
        tx: &mut PgTx,
        saga: &str,
        key: &str,
        stream: &StreamId,
    ) -> Result<Instance, Error> {
        let parked: Option<String> = q(&self.sql.lock)
            .bind(saga)
            .bind(key)
            .fetch_one(tx.conn())
            .await
            .map_err(|e| to_error(e, "lock saga instance"))?
            .try_get(0)
            .map_err(|e| to_error(e, "lock saga instance"))?;
        let changes: Vec<RecordedEvent> = self
            .store
            .in_transaction(tx.conn())
            .read_stream(stream, StreamVersion::INITIAL)
            .try_collect()
            .await?;
        Ok(Instance::new(
            key.to_owned(),
            stream.clone(),
            changes,
            parked,
        ))
    }

    async fn save(&self, tx: &mut PgTx, decided: Decided) -> Result<(), Error> {
        if !decided.changes.is_empty() {
            let request = AppendRequest::new(decided.stream.clone(), decided.changes)
                .expected_version(ExpectedVersion::Exact(decided.expected));
            self.store.append_in(tx.conn(), request).await?;
        }
        for command in &decided.commands {
            q(&self.sql.queue)
                .bind(command.context.command_id.as_uuid())
                .bind(decided.saga)
                .bind(&decided.key)
                .bind(&command.target)
                .bind(&command.command_name)
                .bind(&command.aggregate_id)
                .bind(command.payload.get())
                .bind(command.context.correlation_id.as_uuid())
                .bind(command.context.causation_id.map(|c| c.as_uuid()))
                .bind(decided.now)
                .execute(tx.conn())
                .await
                .map_err(|e| to_error(e, "queue saga command"))?;
        }
        for timeout in &decided.timeouts {
            match timeout {
                TimeoutDecision::Schedule {
                    name,
                    id,
                    due_at,
                    payload,
                } => q(&self.sql.schedule)
                    .bind(decided.saga)
                    .bind(&decided.key)
                    .bind(name)
                    .bind(id)
                    .bind(due_at)
                    .bind(payload.get())
                    .bind(decided.correlation_id.as_uuid())
                    .execute(tx.conn())
                    .await
                    .map_err(|e| to_error(e, "schedule saga timeout"))?,
                TimeoutDecision::Cancel { name } => q(&self.sql.cancel)
                    .bind(decided.saga)
                    .bind(&decided.key)
                    .bind(name)
                    .execute(tx.conn())
                    .await
                    .map_err(|e| to_error(e, "cancel saga timeout"))?,
                other => {
                    return Err(Error::InvalidArgument(format!(
                        "unsupported timeout decision {other:?}"
                    )));
                }
            };
        }
        Ok(())
    }

    async fn due_commands(
        &self,
        saga: &str,
        now: DateTime<Utc>,
        n: usize,
    ) -> Result<Vec<PendingCommand>, Error> {
        let rows = q(&self.sql.due_commands)
            .bind(saga)
            .bind(now)
            .bind(limit(n))
            .fetch_all(self.store.pool())
            .await
            .map_err(|e| to_error(e, "read due saga commands"))?;
        rows.iter().map(command_from_row).collect()
    }

    async fn claim_command(
        &self,
        tx: &mut PgTx,
        saga: &str,
        command_id: CommandId,
    ) -> Result<Option<PendingCommand>, Error> {
        let row = q(&self.sql.claim_command)
            .bind(saga)
            .bind(command_id.as_uuid())
            .fetch_optional(tx.conn())
            .await
            .map_err(|e| to_error(e, "claim saga command"))?;
        row.as_ref().map(command_from_row).transpose()
    }

    async fn postpone(
        &self,
        command: &PendingCommand,
        attempts: u32,
        due_at: DateTime<Utc>,
        error: String,
    ) -> Result<(), Error> {
        q(&self.sql.postpone)
            .bind(&command.saga)
            .bind(command.command.context.command_id.as_uuid())
            .bind(i32::try_from(attempts).unwrap_or(i32::MAX))
            .bind(due_at)
            .bind(error)
            .execute(self.store.pool())
            .await
            .map_err(|e| to_error(e, "postpone saga command"))?;
        Ok(())
    }

    async fn park(
        &self,
        command: &PendingCommand,
        attempts: u32,
        error: String,
    ) -> Result<(), Error> {
        let mut tx = self.begin().await?;
        let done = async {
            q(&self.sql.park_command)
                .bind(&command.saga)
                .bind(command.command.context.command_id.as_uuid())
                .bind(i32::try_from(attempts).unwrap_or(i32::MAX))
                .bind(&error)
                .execute(tx.conn())
                .await?;
            q(&self.sql.park_instance)
                .bind(&command.saga)
                .bind(&command.key)
                .bind(&error)
                .execute(tx.conn())
                .await?;
            Ok::<_, sqlx::Error>(())
        }
        .await;
        match done {
            Ok(()) => self.commit(tx).await,
            Err(e) => {
                self.rollback(tx).await;
                Err(to_error(e, "park saga instance"))
            }
        }
    }

    async fn unpark(&self, saga: &str, key: &str, now: DateTime<Utc>) -> Result<bool, Error> {
        let mut tx = self.begin().await?;
        let done = async {
            let unparked = q(&self.sql.unpark)
                .bind(saga)
                .bind(key)
                .execute(tx.conn())
                .await?
                .rows_affected();
            q(&self.sql.unpark_commands)
                .bind(saga)
                .bind(key)
                .bind(now)
                .execute(tx.conn())
                .await?;
            Ok::<_, sqlx::Error>(unparked > 0)
        }
        .await;
        match done {
            Ok(was) => self.commit(tx).await.map(|()| was),
            Err(e) => {
                self.rollback(tx).await;
                Err(to_error(e, "unpark saga instance"))
            }
        }
    }

    async fn parked(&self, saga: &str) -> Result<Vec<ParkedInstance>, Error> {
        let rows = q(&self.sql.parked)
            .bind(saga)
            .fetch_all(self.store.pool())
            .await
            .map_err(|e| to_error(e, "list parked saga instances"))?;
        rows.iter()
            .map(|row| {
                let read = |e| to_error(e, "list parked saga instances");
                Ok(ParkedInstance::new(
                    row.try_get("saga").map_err(read)?,
                    row.try_get("key").map_err(read)?,
                    row.try_get::<Option<String>, _>("parked_error")
                        .map_err(read)?
                        .unwrap_or_default(),
                    row.try_get::<Option<DateTime<Utc>>, _>("parked_at")
                        .map_err(read)?
                        .unwrap_or_else(Utc::now),
                ))
            })
            .collect()
    }

    async fn due_timeouts(
        &self,
        saga: &str,
        now: DateTime<Utc>,
        n: usize,
    ) -> Result<Vec<ScheduledTimeout>, Error> {
        let rows = q(&self.sql.due_timeouts)
            .bind(saga)
            .bind(now)
            .bind(limit(n))
            .fetch_all(self.store.pool())
            .await
            .map_err(|e| to_error(e, "read due saga timeouts"))?;
        rows.iter().map(timeout_from_row).collect()
    }

    async fn claim_timeout(
        &self,
        tx: &mut PgTx,
        saga: &str,
        id: Uuid,
    ) -> Result<Option<ScheduledTimeout>, Error> {
        let row = q(&self.sql.claim_timeout)
            .bind(saga)
            .bind(id)
            .fetch_optional(tx.conn())
            .await
            .map_err(|e| to_error(e, "claim saga timeout"))?;
        row.as_ref().map(timeout_from_row).transpose()
    }

    async fn release_timeout(&self, _timeout: &ScheduledTimeout) -> Result<(), Error> {
        // The rollback of the claiming transaction kept the row.
        Ok(())
    }

    async fn timeouts(&self, saga: &str, key: &str) -> Result<Vec<ScheduledTimeout>, Error> {
        let rows = q(&self.sql.timeouts)
            .bind(saga)
            .bind(key)
            .fetch_all(self.store.pool())
            .await
            .map_err(|e| to_error(e, "read saga timeouts"))?;
        rows.iter().map(timeout_from_row).collect()
    }

    async fn commands(&self, saga: &str, key: &str) -> Result<Vec<PendingCommand>, Error> {
        let rows = q(&self.sql.commands)
            .bind(saga)
            .bind(key)
            .fetch_all(self.store.pool())
            .await
            .map_err(|e| to_error(e, "read saga commands"))?;
        rows.iter().map(command_from_row).collect()
    }
}

/// A [`Target`] executing commands of `A` on this service's store **inside the dispatch's
/// transaction** (through [`PostgresStore::in_transaction`]): the command's events and its removal
/// from the saga's queue commit together, so it is executed exactly once, whatever crashes.
pub struct PgTarget<A> {
    store: PostgresStore,
    _aggregate: std::marker::PhantomData<fn() -> A>,
}

impl<A> std::fmt::Debug for PgTarget<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTarget")
            .field("store", &self.store)
            .finish()
    }
}

impl<A: Aggregate> PgTarget<A> {
    /// Commands of `A`, executed on `store`.
    pub fn new(store: &PostgresStore) -> Self {
        Self {
            store: store.clone(),
            _aggregate: std::marker::PhantomData,
        }
    }
}

impl<A> Target<PgTx> for PgTarget<A>
where
    A: Aggregate,
    A::Command: DeserializeOwned,
{
    fn aggregate_type(&self) -> &'static str {
        A::TYPE
    }

    fn execute<'a>(
        &'a self,
        tx: &'a mut PgTx,
        command: &'a SentCommand,
    ) -> BoxFuture<'a, Result<Executed, Error>> {
        Box::pin(async move {
            let decoded = command.decode::<A>()?;
            let store = self.store.in_transaction(tx.conn());
            let repository = Repository::<A, _>::new(store);
            Executed::of(repository.execute_with(decoded, &command.context).await)
        })
    }
}
