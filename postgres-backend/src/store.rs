//! [`PostgresStore`]: the event and snapshot store on PostgreSQL.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use factum::resilience::{FullJitter, RetryPolicy};
use factum::{
    AppendRequest, AppendResult, BoxError, CATEGORY_SEPARATOR, CausationId, CorrelationId,
    DecodeError, Error, EventFilter, EventId, EventMetadata, EventPayload, EventStore, EventStream,
    ExpectedVersion, GlobalPosition, IdempotencyKey, LogPosition, Metadata, PayloadStream,
    RawValue, RecordedEvent, SnapshotStore, StoredSnapshot, StreamId, StreamVersion,
    validate_batch,
};
use futures_util::StreamExt;
use sqlx::PgPool;
use sqlx::postgres::PgRow;
use uuid::Uuid;

use crate::config::{PoolConfig, StoreOptions};
use crate::error::{Failure, Op, RestoreRepairNeeded, classify, to_error};
use crate::group::{self, Entry, Member, Queue, Reply, Shared, Slot, Waiting};
use crate::migrate::{latest_version, migrate};
use crate::reads::{self, BatchedRead};
use crate::schema::SchemaName;

/// The PostgreSQL event store and snapshot store.
///
/// Cheap to clone (clones share the pool). See the [crate docs](crate) for the schema, the
/// append statement and the gap-safe read of the global log.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
    /// Encrypts and decrypts personal fields (`with_shredder`, in `personal.rs`).
    #[cfg(feature = "personal")]
    shredder: Option<factum::personal::Shredder>,
}

struct Inner {
    pool: PgPool,
    options: StoreOptions,
    sql: Sql,
    /// Set once the schema's owner was checked against `options.service()`.
    service_checked: tokio::sync::OnceCell<()>,
    /// The group-commit queue, when group commit is on.
    group: Option<Arc<Queue<Prepared>>>,
    /// The batched-reads queue, when batched reads are on.
    reads: Option<Arc<Queue<BatchedRead>>>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("schema", &self.inner.options.schema())
            .field("pool_size", &self.inner.pool.size())
            .finish()
    }
}

/// What [`PostgresStore::health`] found.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Health {
    /// How long the check's first round trip took.
    pub round_trip: Duration,
    /// The store's schema.
    pub schema: SchemaName,
    /// The newest migration applied to the schema; `None` when it was never migrated.
    pub applied_version: Option<i64>,
    /// The newest migration this build knows.
    pub latest_version: i64,
    /// The age of the oldest transaction in the cluster that has written something and is still
    /// open. Readers of the global log cannot pass it (gap safety), so this bounds how far
    /// subscribers may lag: alert when it grows.
    pub oldest_open_write: Option<Duration>,
}

impl Health {
    /// True when every migration of this build is applied.
    pub fn is_up_to_date(&self) -> bool {
        self.applied_version == Some(self.latest_version)
    }
}

impl PostgresStore {
    /// A store on `pool`, in the default schema (`factum`).
    pub fn new(pool: PgPool) -> Self {
        Self::with_options(pool, StoreOptions::default())
    }

    /// A store on `pool` with `options` (schema, retries).
    pub fn with_options(pool: PgPool, options: StoreOptions) -> Self {
        let sql = Sql::new(options.schema());
        let group = options.group_commit().is_enabled().then(|| {
            let group = options.group_commit();
            Arc::new(Queue::new(group.max_batch(), group.max_in_flight()))
        });
        let reads = options.batched_reads().is_enabled().then(|| {
            let reads = options.batched_reads();
            Arc::new(Queue::new(reads.max_batch(), reads.max_in_flight()))
        });
        Self {
            inner: Arc::new(Inner {
                pool,
                options,
                sql,
                service_checked: tokio::sync::OnceCell::new(),
                group,
                reads,
            }),
            #[cfg(feature = "personal")]
            shredder: None,
        }
    }

    #[cfg(feature = "personal")]
    pub(crate) fn shredder(&self) -> Option<&factum::personal::Shredder> {
        self.shredder.as_ref()
    }

    #[cfg(feature = "personal")]
    pub(crate) fn set_shredder(&mut self, shredder: factum::personal::Shredder) {
        self.shredder = Some(shredder);
    }

    /// Connects to `url` with the default [`PoolConfig`], in the default schema. Does not run
    /// migrations: call [`migrate`](Self::migrate).
    ///
    /// Fails with [`RestoreRepairNeeded`] (as the source of a permanent error) when the schema's
    /// event log was restored from a logical backup and not repaired yet.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        Self::connect_with(url, &PoolConfig::default(), StoreOptions::default()).await
    }

    /// Connects to `url` with a pool built from `config`.
    pub async fn connect_with(
        url: &str,
        config: &PoolConfig,
        options: StoreOptions,
    ) -> Result<Self, Error> {
        let pool = config.connect(url).await?;
        let store = Self::with_options(pool, options);
        store.check_not_restored_if_migrated("connect").await?;
        store.check_service("connect").await?;
        Ok(store)
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The schema holding the tables.
    pub fn schema(&self) -> &SchemaName {
        self.inner.options.schema()
    }

    pub(crate) fn options(&self) -> &StoreOptions {
        &self.inner.options
    }

    pub(crate) fn service_checked(&self) -> &tokio::sync::OnceCell<()> {
        &self.inner.service_checked
    }

    /// Creates the schema if needed and applies the pending migrations (see [`migrate`]).
    ///
    /// Then fails with [`RestoreRepairNeeded`] (as the source of a permanent error) when the
    /// event log was restored from a logical backup and not repaired yet: the migrations are
    /// applied, but the store must not be used before
    /// [`repair_after_restore`](Self::repair_after_restore).
    pub async fn migrate(&self) -> Result<(), Error> {
        migrate(&self.inner.pool, self.schema()).await?;
        self.claim_service("migrate").await?;
        self.check_not_restored("migrate").await
    }

    /// Fails with [`RestoreRepairNeeded`] when the event log holds a transaction id at or above
    /// the cluster's next one: no committed row can, unless it was written by another cluster
    /// (a logical restore). One look at the newest entry of the log's index.
    pub(crate) async fn check_not_restored(&self, operation: &'static str) -> Result<(), Error> {
        let (newest, next): (Option<Xid8>, Xid8) =
            sqlx::query_as(sqlx::AssertSqlSafe(self.inner.sql.restore_check.as_str()))
                .fetch_one(&self.inner.pool)
                .await
                .map_err(|e| to_error(e, operation))?;
        self.restore_verdict(newest, next)
            .map_err(|e| e.into_error(operation))
    }

    /// The verdict of a restore check from the newest stored transaction id and the cluster's
    /// next one.
    fn restore_verdict(&self, newest: Option<Xid8>, next: Xid8) -> Result<(), RestoreRepairNeeded> {
        match newest {
            Some(newest) if newest.0 >= next.0 => Err(RestoreRepairNeeded {
                schema: self.schema().as_str().to_owned(),
                newest_stored: newest.0,
                next_transaction: next.0,
            }),
            _ => Ok(()),
        }
    }

    /// [`check_not_restored`](Self::check_not_restored), when the schema has an `events` table.
    async fn check_not_restored_if_migrated(&self, operation: &'static str) -> Result<(), Error> {
        let migrated: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(format!("{}.events", self.schema().quoted()))
            .fetch_one(&self.inner.pool)
            .await
            .map_err(|e| to_error(e, operation))?;
        if migrated {
            self.check_not_restored(operation).await
        } else {
            Ok(())
        }
    }

    /// Pings the database and reports the schema's migration state and the oldest open writing
    /// transaction.
    ///
    /// Fails with [`RestoreRepairNeeded`] (as the source of a permanent error) when the event
    /// log was restored from a logical backup and not repaired yet.
    pub async fn health(&self) -> Result<Health, Error> {
        let started = Instant::now();
        let migrated: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(format!("{}._sqlx_migrations", self.schema().quoted()))
            .fetch_one(&self.inner.pool)
            .await
            .map_err(|e| to_error(e, "health check"))?;
        let round_trip = started.elapsed();
        let applied_version = if migrated {
            sqlx::query_scalar(sqlx::AssertSqlSafe(self.inner.sql.applied_version.as_str()))
                .fetch_one(&self.inner.pool)
                .await
                .map_err(|e| to_error(e, "health check"))?
        } else {
            None
        };
        let oldest: Option<f64> = sqlx::query_scalar(
            "SELECT EXTRACT(EPOCH FROM clock_timestamp() - min(xact_start))::float8 \
             FROM pg_stat_activity WHERE backend_xid IS NOT NULL",
        )
        .fetch_one(&self.inner.pool)
        .await
        .map_err(|e| to_error(e, "health check"))?;
        if applied_version.is_some() {
            self.check_not_restored("health check").await?;
            self.check_service("health check").await?;
        }
        Ok(Health {
            round_trip,
            schema: self.schema().clone(),
            applied_version,
            latest_version: latest_version(),
            oldest_open_write: oldest.map(|s| Duration::from_secs_f64(s.max(0.0))),
        })
    }

    /// The current version of a stream (0 when it does not exist).
    pub async fn stream_version(&self, stream: &StreamId) -> Result<StreamVersion, Error> {
        let version: Option<i64> =
            sqlx::query_scalar(sqlx::AssertSqlSafe(self.inner.sql.stream_version.as_str()))
                .bind(stream.as_str())
                .fetch_optional(&self.inner.pool)
                .await
                .map_err(|e| to_error(e, "read stream version"))?;
        Ok(StreamVersion::new(to_u64(version.unwrap_or(0))))
    }

    pub(crate) fn sql_read_stream(&self) -> &str {
        &self.inner.sql.read_stream
    }

    pub(crate) fn sql_read_payloads(&self) -> &str {
        &self.inner.sql.read_payloads
    }

    /// Removes the idempotency keys stored before `before` and returns how many. A request
    /// repeating one of them afterwards is a new write (event ids still protect the batch when
    /// they are the same). Run it on a schedule with a retention longer than any client retries.
    pub async fn expire_idempotency_keys(&self, before: DateTime<Utc>) -> Result<u64, Error> {
        let done = sqlx::query(sqlx::AssertSqlSafe(self.inner.sql.expire_keys.as_str()))
            .bind(before)
            .execute(&self.inner.pool)
            .await
            .map_err(|e| to_error(e, "expire idempotency keys"))?;
        Ok(done.rows_affected())
    }

    /// Appends inside a transaction the caller holds, with the guarantees of
    /// [`EventStore::append`]: the events, their idempotency key and the caller's own writes in
    /// `conn` commit together or not at all (an inbound consumer's inbox row, a saga's state, an
    /// application's table).
    ///
    /// No retries happen here: a failed statement aborts the caller's transaction, so the
    /// caller retries the whole transaction. Details differ from an append on the pool where a
    /// statement failure aborted the transaction: a concurrent append of the same idempotency key
    /// or event ids, or a write that won the stream's version index, fails with
    /// [`Error::Transient`] (retry the transaction; the repeat then finds the key, or meets the
    /// conflict as [`Error::Conflict`]). And the append is not visible to readers of the global
    /// log before the commit.
    ///
    /// ```no_run
    /// # use factum::{AppendRequest, ExpectedVersion, StreamId};
    /// # async fn run(store: factum_postgres::PostgresStore, request: AppendRequest) -> Result<(), Box<dyn std::error::Error>> {
    /// let mut tx = store.pool().begin().await?;
    /// sqlx::query("INSERT INTO inbox (message_id) VALUES ($1)")
    ///     .bind("msg-1")
    ///     .execute(&mut *tx)
    ///     .await?;
    /// store.append_in(&mut tx, request).await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn append_in(
        &self,
        conn: &mut sqlx::PgConnection,
        request: AppendRequest,
    ) -> Result<AppendResult, Error> {
        // Checked on the caller's connection, every time: it may be to another database than
        // the store's pool (one round trip for a store opened for a service).
        self.claim_service_on(&mut *conn, "append").await?;
        let request = self.seal(Some(&mut *conn), request).await?;
        let prepared = Prepared::new(request)?;
        let request = &prepared.request;
        let batch = prepared.batch();
        let failure = match self.try_append(&mut *conn, request, &batch).await {
            Ok(Some(result)) => return Ok(result),
            Ok(None) => None,
            Err(failure) => Some(failure),
        };
        match failure {
            None => match self.resolve(conn, request, &batch).await? {
                Resolved::Done(result) => Ok(result),
                Resolved::Conflict(actual) => Err(Error::Conflict {
                    stream: request.stream.clone(),
                    expected: request.expected,
                    actual,
                }),
                // The stream moved while the statement ran: the transaction's snapshot cannot
                // append now, a new transaction can.
                Resolved::Moved(_) => Err(Error::transient(
                    "append",
                    format!(
                        "stream `{}` moved during the append; retry the transaction",
                        request.stream
                    ),
                )),
            },
            // A unique violation aborted the caller's transaction: nothing more can be asked on
            // it (not even the stream's version), and the whole transaction is to be retried.
            Some(
                Failure::VersionConflict(e)
                | Failure::Transient(e)
                | Failure::DuplicateEventId(e)
                | Failure::KeyTaken(e),
            ) => Err(Error::transient("append", e)),
            Some(Failure::UnknownOutcome(e)) => Err(Error::UnknownOutcome {
                operation: "append",
                stream: request.stream.clone(),
                source: Box::new(e),
            }),
            Some(Failure::Permanent(e)) => Err(Error::permanent("append", e)),
        }
    }

    async fn append_batch(&self, request: AppendRequest) -> Result<AppendResult, Error> {
        self.ensure_service().await?;
        let request = self.seal(None, request).await?;
        let prepared = Arc::new(Prepared::new(request)?);
        let request = &prepared.request;
        let stream = &request.stream;
        let batch = prepared.batch();
        // One schedule for the whole call: every wait (before retrying the statement or looking
        // the batch up again) takes the policy's next delay, so the policy bounds the call.
        let mut retries = Retries::new(self.inner.options.retry());
        loop {
            match self.submit(&prepared).await {
                Tried::Appended(result) => return Ok(result),
                // Zero rows (the version did not match, or the key or some id of the batch is
                // stored), or a concurrent append stored one of the batch's ids or its key
                // first: look again.
                Tried::Unchanged
                | Tried::Failed(Failure::DuplicateEventId(_) | Failure::KeyTaken(_)) => {
                    let mut conn = self.connection("append").await?;
                    match self.resolve(&mut conn, request, &batch).await? {
                        Resolved::Done(result) => return Ok(result),
                        // Versions only grow: a mismatch now is a real conflict. A match means
                        // the stream moved between the statement and the read: try again at
                        // once (the attempt still counts).
                        Resolved::Moved(_) if retries.next().is_some() => {}
                        Resolved::Conflict(actual) | Resolved::Moved(actual) => {
                            return Err(Error::Conflict {
                                stream: stream.clone(),
                                expected: request.expected,
                                actual,
                            });
                        }
                    }
                }
                Tried::Failed(Failure::VersionConflict(_)) => {
                    return Err(Error::Conflict {
                        stream: stream.clone(),
                        expected: request.expected,
                        actual: self.stream_version(stream).await?,
                    });
                }
                Tried::Failed(Failure::Transient(e)) => {
                    let Some(delay) = retries.next() else {
                        return Err(Error::transient("append", e));
                    };
                    tracing::debug!(%stream, retry = retries.count, ?delay, error = %e, "append rolled back; retrying");
                    tokio::time::sleep(delay).await;
                }
                Tried::Failed(Failure::UnknownOutcome(e)) => {
                    if let Some(done) = self
                        .after_unknown(request, &batch, &mut retries, Box::new(e))
                        .await
                    {
                        return done;
                    }
                }
                Tried::Unknown(e) => {
                    if let Some(done) = self.after_unknown(request, &batch, &mut retries, e).await {
                        return done;
                    }
                }
                Tried::Failed(Failure::Permanent(e)) => return Err(Error::permanent("append", e)),
            }
        }
    }

    /// After a statement whose outcome is unknown: the call's result, or `None` to retry (the
    /// batch is not stored, and the policy allows another attempt, after the delay it took).
    async fn after_unknown(
        &self,
        request: &AppendRequest,
        batch: &Batch<'_>,
        retries: &mut Retries,
        e: BoxError,
    ) -> Option<Result<AppendResult, Error>> {
        let stream = &request.stream;
        tracing::warn!(%stream, error = %e, "connection lost during append; checking whether it was stored");
        match self.settle(request, batch, retries).await {
            Some(Existing::Stored(mut result)) => {
                // Stored, by the lost attempt or by an earlier call with the same key or ids (a
                // retried command): only a batch that starts where this request expected the
                // stream to be can be this call's own write. In every other case it stays a
                // repeat, so that a caller never folds the same events into its state twice.
                let own = match request.expected {
                    ExpectedVersion::Exact(v) => v == result.first_version,
                    ExpectedVersion::NoStream => result.first_version == StreamVersion::INITIAL,
                    ExpectedVersion::Any => false,
                };
                if own {
                    result.duplicate = false;
                }
                Some(Ok(result))
            }
            Some(Existing::Elsewhere(error)) => Some(Err(error)),
            // Not stored: retrying is safe; no retry left means nothing happened.
            Some(Existing::NotStored) => match retries.next() {
                Some(delay) => {
                    tokio::time::sleep(delay).await;
                    None
                }
                None => Some(Err(Error::transient("append", e))),
            },
            None => Some(Err(Error::UnknownOutcome {
                operation: "append",
                stream: stream.clone(),
                source: e,
            })),
        }
    }

    /// One attempt at the append statement: through the group-commit queue when it is on, else
    /// alone.
    async fn submit(&self, prepared: &Arc<Prepared>) -> Tried {
        let Some(queue) = &self.inner.group else {
            return self.alone(prepared).await;
        };
        match queue.enter(prepared) {
            Entry::Now(_slot) => self.alone(prepared).await,
            Entry::Queued(reply) => match reply.await {
                Ok(Reply::Done(tried)) => tried,
                Ok(Reply::Lead(mut slot)) => {
                    // The appends woken with the statement that freed the slot run first and
                    // queue again, so the group gathers them too.
                    tokio::task::yield_now().await;
                    let others = queue.gather(&mut slot, prepared);
                    self.lead(prepared, others, slot).await
                }
                Err(_) => Tried::Unknown(group::leader_gone()),
            },
        }
    }

    /// The append statement for one request.
    async fn alone(&self, prepared: &Prepared) -> Tried {
        Tried::of(
            self.try_append(&self.inner.pool, &prepared.request, &prepared.batch())
                .await,
        )
    }

    /// Runs the group statement for `own` and `others`, replies to the others, and returns
    /// `own`'s outcome. A statement the server rolled back (for whatever member's reason: a
    /// deadlock, a unique violation, a payload it refused) stored nothing, so every member then
    /// runs its own statement, concurrently, and gets its own verdict; one whose outcome is
    /// unknown leaves every member's outcome unknown, each settled by its own event ids.
    async fn lead(
        &self,
        own: &Arc<Prepared>,
        others: Vec<Waiting<Prepared>>,
        _slot: Slot<Prepared>,
    ) -> Tried {
        if others.is_empty() {
            return self.alone(own).await;
        }
        let members: Vec<&Prepared> = std::iter::once(&**own)
            .chain(others.iter().map(|w| &*w.member))
            .collect();
        match self.try_group(&members).await {
            Ok(mut results) => {
                for (waiting, result) in others.into_iter().zip(results.drain(1..)) {
                    let tried = result.map_or(Tried::Unchanged, Tried::Appended);
                    let _ = waiting.reply.send(Reply::Done(tried));
                }
                results
                    .pop()
                    .flatten()
                    .map_or(Tried::Unchanged, Tried::Appended)
            }
            Err(Failure::UnknownOutcome(e)) => {
                let e = Arc::new(e);
                for waiting in others {
                    let _ = waiting
                        .reply
                        .send(Reply::Done(Tried::Unknown(Box::new(Shared(Arc::clone(
                            &e,
                        ))))));
                }
                Tried::Unknown(Box::new(Shared(e)))
            }
            Err(failure) => {
                tracing::debug!(members = members.len(), error = ?failure, "group append rolled back; appending each alone");
                let each = futures_util::future::join_all(members.iter().map(|p| self.alone(p)));
                let mut outcomes = each.await.into_iter();
                let own = outcomes.next().unwrap_or(Tried::Unchanged);
                for (waiting, tried) in others.into_iter().zip(outcomes) {
                    let _ = waiting.reply.send(Reply::Done(tried));
                }
                own
            }
        }
    }

    /// One statement appending every member's batch, each with its own expected version, ids
    /// check and idempotency key: the outcome of each, in `members` order (`None`: no row
    /// matched it).
    async fn try_group(&self, members: &[&Prepared]) -> Result<Vec<Option<AppendResult>>, Failure> {
        // Rows are locked in stream order, so that two group statements never wait on each
        // other's rows in opposite orders.
        let mut order: Vec<usize> = (0..members.len()).collect();
        order.sort_by(|&a, &b| members[a].request.stream.cmp(&members[b].request.stream));
        let events: usize = members.iter().map(|p| p.ids.len()).sum();
        let mut streams = Vec::with_capacity(members.len());
        let mut categories = Vec::with_capacity(members.len());
        let mut expected = Vec::with_capacity(members.len());
        let mut counts = Vec::with_capacity(members.len());
        let mut keys = Vec::with_capacity(members.len());
        let mut of_request = Vec::with_capacity(events);
        let mut nth = Vec::with_capacity(events);
        let mut ids = Vec::with_capacity(events);
        let mut types = Vec::with_capacity(events);
        let mut schema_versions = Vec::with_capacity(events);
        let mut payloads = Vec::with_capacity(events);
        let mut metadata = Vec::with_capacity(events);
        let mut correlation_ids = Vec::with_capacity(events);
        let mut causation_ids = Vec::with_capacity(events);
        for (i, &m) in order.iter().enumerate() {
            let p = members[m];
            let request = &p.request;
            streams.push(request.stream.as_str());
            categories.push(request.stream.category());
            expected.push(p.expected_column());
            counts.push(p.ids.len() as i64);
            keys.push(request.idempotency_key.as_ref().map(IdempotencyKey::as_str));
            for (n, event) in request.events.iter().enumerate() {
                of_request.push(i as i64 + 1);
                nth.push(n as i64 + 1);
                ids.push(p.ids[n]);
                types.push(event.event_type.as_str());
                schema_versions.push(p.schema_versions[n]);
                payloads.push(event.payload.get());
                metadata.push(p.metadata[n].as_str());
                correlation_ids.push(event.metadata.correlation_id.map(|c| c.as_uuid()));
                causation_ids.push(event.metadata.causation_id.map(|c| c.as_uuid()));
            }
        }
        let rows: Vec<(i64, String, i64)> =
            sqlx::query_as(sqlx::AssertSqlSafe(self.inner.sql.append_group.as_str()))
                .bind(&streams)
                .bind(&categories)
                .bind(&expected)
                .bind(&counts)
                .bind(&keys)
                .bind(&of_request)
                .bind(&nth)
                .bind(&ids)
                .bind(&types)
                .bind(&schema_versions)
                .bind(&payloads)
                .bind(&metadata)
                .bind(&correlation_ids)
                .bind(&causation_ids)
                .fetch_all(&self.inner.pool)
                .await
                .map_err(|e| classify(e, Op::Write))?;
        let mut by_stream: HashMap<String, Vec<(i64, i64)>> = HashMap::with_capacity(members.len());
        for (position, stream, version) in rows {
            by_stream
                .entry(stream)
                .or_default()
                .push((version, position));
        }
        Ok(members
            .iter()
            .map(|p| {
                let stream = &p.request.stream;
                let mut rows = by_stream.remove(stream.as_str())?;
                rows.sort_unstable();
                let first = StreamVersion::new(to_u64(rows[0].0 - 1));
                Some(AppendResult::new(
                    stream.clone(),
                    first,
                    rows.iter()
                        .map(|&(_, p)| GlobalPosition::new(to_u64(p)))
                        .collect(),
                ))
            })
            .collect())
    }

    /// A stream read in a statement of its own.
    fn read_payloads_alone<'a>(
        &'a self,
        stream: &'a StreamId,
        after: StreamVersion,
    ) -> PayloadStream<'a> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(self.inner.sql.read_payloads.as_str()))
            .bind(stream.as_str())
            .bind(to_i64(after.get()))
            .fetch(&self.inner.pool);
        Box::pin(rows.map(move |row| {
            let row = row.map_err(|e| to_error(e, "read stream"))?;
            payload_from_row(stream, &row)
        }))
    }

    /// A stream read through the batched-reads queue: its rows come from a statement it shares
    /// with the reads queued with it (at most `rows_per_stream` of them; a longer stream goes on
    /// alone from there), or, when that statement failed, from a statement of its own.
    fn batched_read<'a>(
        &'a self,
        queue: &'a Arc<Queue<BatchedRead>>,
        stream: &'a StreamId,
        after: StreamVersion,
    ) -> PayloadStream<'a> {
        let read = async move {
            let own = Arc::new(BatchedRead {
                stream: stream.clone(),
                after,
            });
            let limit = self.inner.options.batched_reads().rows_per_stream();
            let rows = match queue.enter(&own) {
                Entry::Now(slot) => {
                    // Nobody waits: the read's own statement, which costs the server less than
                    // a batch of one.
                    let rows = sqlx::query(sqlx::AssertSqlSafe(
                        self.inner.sql.read_payloads_first.as_str(),
                    ))
                    .bind(stream.as_str())
                    .bind(to_i64(after.get()))
                    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                    .fetch_all(&self.inner.pool)
                    .await;
                    drop(slot);
                    match rows {
                        Ok(rows) => Some(rows),
                        Err(e) => return failed_read(e),
                    }
                }
                Entry::Queued(reply) => match reply.await {
                    Ok(Reply::Done(rows)) => rows,
                    Ok(Reply::Lead(mut slot)) => {
                        // As for group commit: the reads woken with the statement that freed
                        // the slot queue again first, so the batch gathers them too.
                        tokio::task::yield_now().await;
                        let others = queue.gather(&mut slot, &own);
                        self.read_batch(&own, others, slot).await
                    }
                    // The leader was cancelled: read alone.
                    Err(_) => None,
                },
            };
            let Some(rows) = rows else {
                return self.read_payloads_alone(stream, after);
            };
            let rest = match reads::last_version(&rows) {
                Ok(Some(last)) if rows.len() >= limit => self.read_payloads_alone(stream, last),
                Ok(_) => Box::pin(futures_util::stream::empty()),
                Err(e) => failed_read(e),
            };
            let batch =
                futures_util::stream::iter(rows).map(move |row| payload_from_row(stream, &row));
            let events: PayloadStream<'a> = Box::pin(batch.chain(rest));
            events
        };
        Box::pin(futures_util::stream::once(read).flatten())
    }

    /// Runs the batched read statement for `own` and `others`, replies to the others, and
    /// returns `own`'s rows; `None` (to everyone) when the statement failed, so that each read
    /// runs its own statement and meets its own error.
    async fn read_batch(
        &self,
        own: &BatchedRead,
        others: Vec<Waiting<BatchedRead>>,
        slot: Slot<BatchedRead>,
    ) -> Option<Vec<PgRow>> {
        let members: Vec<&BatchedRead> = std::iter::once(own)
            .chain(others.iter().map(|w| &*w.member))
            .collect();
        let streams: Vec<&str> = members.iter().map(|r| r.stream.as_str()).collect();
        let afters: Vec<i64> = members.iter().map(|r| to_i64(r.after.get())).collect();
        let limit = self.inner.options.batched_reads().rows_per_stream();
        let rows = sqlx::query(sqlx::AssertSqlSafe(self.inner.sql.read_batch.as_str()))
            .bind(&streams)
            .bind(&afters)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .bind(streams.len() as i64)
            .fetch_all(&self.inner.pool)
            .await
            .and_then(|rows| reads::split(rows, members.len()));
        drop(slot);
        match rows {
            Ok(each) => {
                let mut each = each.into_iter();
                let own = each.next();
                for (waiting, rows) in others.into_iter().zip(each) {
                    let _ = waiting.reply.send(Reply::Done(Some(rows)));
                }
                own
            }
            Err(e) => {
                tracing::debug!(reads = members.len(), error = %e, "batched read failed; each read runs alone");
                for waiting in others {
                    let _ = waiting.reply.send(Reply::Done(None));
                }
                None
            }
        }
    }

    async fn connection(
        &self,
        operation: &'static str,
    ) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>, Error> {
        self.inner
            .pool
            .acquire()
            .await
            .map_err(|e| to_error(e, operation))
    }

    /// After an append changed nothing: the key's or the ids' earlier outcome, or the stream's
    /// version to judge the conflict by.
    async fn resolve(
        &self,
        conn: &mut sqlx::PgConnection,
        request: &AppendRequest,
        batch: &Batch<'_>,
    ) -> Result<Resolved, Error> {
        match self.existing(conn, request, batch).await? {
            Existing::Stored(result) => return Ok(Resolved::Done(result)),
            Existing::Elsewhere(error) => return Err(error),
            Existing::NotStored => {}
        }
        // An archived (or deleted) stream's row is never bumped: zero rows, and this says why.
        let closed: Option<(bool, bool)> =
            sqlx::query_as(sqlx::AssertSqlSafe(self.inner.sql.stream_archived.as_str()))
                .bind(request.stream.as_str())
                .fetch_optional(&mut *conn)
                .await
                .map_err(|e| to_error(e, "append"))?;
        match closed {
            Some((_, true)) => {
                return Err(Error::StreamDeleted {
                    stream: request.stream.clone(),
                });
            }
            Some((true, false)) => {
                return Err(Error::StreamArchived {
                    stream: request.stream.clone(),
                });
            }
            _ => {}
        }
        let actual = self.stream_version_on(conn, &request.stream).await?;
        Ok(if request.expected.matches(actual) {
            Resolved::Moved(actual)
        } else {
            Resolved::Conflict(actual)
        })
    }

    async fn stream_version_on(
        &self,
        conn: &mut sqlx::PgConnection,
        stream: &StreamId,
    ) -> Result<StreamVersion, Error> {
        let version: Option<i64> =
            sqlx::query_scalar(sqlx::AssertSqlSafe(self.inner.sql.stream_version.as_str()))
                .bind(stream.as_str())
                .fetch_optional(conn)
                .await
                .map_err(|e| to_error(e, "read stream version"))?;
        Ok(StreamVersion::new(to_u64(version.unwrap_or(0))))
    }

    /// One round trip: bump the stream row where the version matches and insert the batch (and
    /// its key). `Ok(None)` when no row matched (conflict, or an already-stored key or id).
    async fn try_append<'c>(
        &self,
        conn: impl sqlx::PgExecutor<'c>,
        request: &AppendRequest,
        batch: &Batch<'_>,
    ) -> Result<Option<AppendResult>, Failure> {
        let stream = &request.stream;
        // A single event (what most commands yield) binds scalars: no arrays to build, send and
        // unnest, which makes the statement measurably cheaper for the server.
        let single = batch.ids.len() == 1;
        let keyed = request.idempotency_key.is_some();
        let sql = &self.inner.sql.append[usize::from(single) + 2 * usize::from(keyed)];
        let query = match request.expected {
            ExpectedVersion::Exact(v) if v != StreamVersion::INITIAL => {
                sqlx::query_as::<_, (i64, i64)>(sqlx::AssertSqlSafe(sql.exact.as_str()))
                    .bind(to_i64(v.get()))
            }
            ExpectedVersion::Exact(_) | ExpectedVersion::NoStream => {
                sqlx::query_as(sqlx::AssertSqlSafe(sql.no_stream.as_str())).bind(stream.category())
            }
            ExpectedVersion::Any => {
                sqlx::query_as(sqlx::AssertSqlSafe(sql.any.as_str())).bind(stream.category())
            }
        };
        let query = query.bind(stream.as_str()).bind(batch.ids.len() as i64);
        let query = if single {
            query
                .bind(batch.ids[0])
                .bind(batch.types[0])
                .bind(batch.schema_versions[0])
                .bind(batch.payloads[0])
                .bind(&batch.metadata[0])
                .bind(batch.correlation_ids[0])
                .bind(batch.causation_ids[0])
        } else {
            query
                .bind(batch.ids)
                .bind(&batch.types)
                .bind(batch.schema_versions)
                .bind(&batch.payloads)
                .bind(batch.metadata)
                .bind(&batch.correlation_ids)
                .bind(&batch.causation_ids)
        };
        let query = match &request.idempotency_key {
            Some(key) => query.bind(key.as_str()),
            None => query,
        };
        let mut rows: Vec<(i64, i64)> = query
            .fetch_all(conn)
            .await
            .map_err(|e| classify(e, Op::Write))?;
        if rows.is_empty() {
            return Ok(None);
        }
        rows.sort_unstable_by_key(|&(_, version)| version);
        let first = StreamVersion::new(to_u64(rows[0].1 - 1));
        Ok(Some(AppendResult::new(
            stream.clone(),
            first,
            rows.iter()
                .map(|&(p, _)| GlobalPosition::new(to_u64(p)))
                .collect(),
        )))
    }

    /// Looks the request's key, then the batch's event ids up, and applies the repeat rules.
    async fn existing(
        &self,
        conn: &mut sqlx::PgConnection,
        request: &AppendRequest,
        batch: &Batch<'_>,
    ) -> Result<Existing, Error> {
        if let Some(key) = &request.idempotency_key
            && let Some((stored, ids)) = self.key_record(&mut *conn, key).await?
        {
            let same = stored.stream == request.stream && ids == batch.ids;
            return Ok(if same {
                Existing::Stored(stored)
            } else {
                Existing::Elsewhere(Error::IdempotencyKeyReused {
                    key: key.clone(),
                    stream: request.stream.clone(),
                    stored_stream: stored.stream,
                })
            });
        }
        let rows: Vec<(Uuid, String, i64, i64)> =
            sqlx::query_as(sqlx::AssertSqlSafe(self.inner.sql.find_ids.as_str()))
                .bind(batch.ids)
                .fetch_all(conn)
                .await
                .map_err(|e| to_error(e, "append"))?;
        Ok(Existing::judge(&request.stream, batch, rows))
    }

    /// What the append that stored `key` recorded, with its event ids.
    pub(crate) async fn key_record<'c>(
        &self,
        conn: impl sqlx::PgExecutor<'c>,
        key: &IdempotencyKey,
    ) -> Result<Option<(AppendResult, Vec<Uuid>)>, Error> {
        let row: Option<KeyRow> =
            sqlx::query_as(sqlx::AssertSqlSafe(self.inner.sql.find_key.as_str()))
                .bind(key.as_str())
                .fetch_optional(conn)
                .await
                .map_err(|e| to_error(e, "look up an idempotency key"))?;
        row.map(|(stream, first, count, positions, ids)| {
            let stream = StreamId::new(stream).map_err(|e| {
                Error::permanent("look up an idempotency key", format!("stored stream id: {e}"))
            })?;
            if positions.len() != usize::try_from(count).unwrap_or(0) {
                return Err(Error::permanent(
                    "look up an idempotency key",
                    format!(
                        "the {count} events stored with idempotency key {key} (stream `{stream}` after version {first}) are no longer all in the store (archived or deleted): the original outcome cannot be returned"
                    ),
                ));
            }
            let positions = positions
                .into_iter()
                .map(|p| GlobalPosition::new(to_u64(p)))
                .collect();
            Ok((
                AppendResult::new(stream, StreamVersion::new(to_u64(first)), positions)
                    .as_duplicate(),
                ids,
            ))
        })
        .transpose()
    }

    /// After a lost connection: looks the key and ids up, waiting for the database between
    /// look-ups by the retry schedule and at most the outcome check timeout. `None` when it could
    /// not be reached in time.
    async fn settle(
        &self,
        request: &AppendRequest,
        batch: &Batch<'_>,
        retries: &mut Retries,
    ) -> Option<Existing> {
        let stream = &request.stream;
        let deadline = Instant::now() + self.inner.options.outcome_check_timeout();
        loop {
            let looked = match self.connection("append").await {
                Ok(mut conn) => self.existing(&mut conn, request, batch).await,
                Err(e) => Err(e),
            };
            match looked {
                Ok(existing) => return Some(existing),
                Err(e) if e.is_transient() => {
                    let delay = retries.next()?;
                    if Instant::now() + delay > deadline {
                        return None;
                    }
                    tracing::debug!(%stream, ?delay, error = %e, "database unreachable; will look the batch up again");
                    tokio::time::sleep(delay).await;
                }
                Err(_) => return None,
            }
        }
    }
}

/// An idempotency key's row with its batch's positions and ids: stream, version before the batch,
/// event count, positions, event ids.
type KeyRow = (String, i64, i32, Vec<i64>, Vec<Uuid>);

/// What an append that changed nothing comes to.
enum Resolved {
    /// Stored before (a repeat): the original outcome.
    Done(AppendResult),
    /// The stream is not at the expected version.
    Conflict(StreamVersion),
    /// The stream is at the expected version now: it moved during the statement.
    Moved(StreamVersion),
}

/// The delays of one call's retries, from its [`RetryPolicy`]: full jitter, at most
/// `max_attempts - 1` of them, none that would end past `max_elapsed`.
struct Retries {
    delays: FullJitter,
    max_elapsed: Option<Duration>,
    started: Instant,
    count: u32,
}

impl Retries {
    fn new(policy: &RetryPolicy) -> Self {
        Self {
            delays: policy.backoff(),
            max_elapsed: policy.max_elapsed(),
            started: Instant::now(),
            count: 0,
        }
    }

    /// The delay before the next retry, or `None` when the policy allows no more.
    fn next(&mut self) -> Option<Duration> {
        let delay = self.delays.next()?;
        if self
            .max_elapsed
            .is_some_and(|max| self.started.elapsed() + delay > max)
        {
            return None;
        }
        self.count += 1;
        Some(delay)
    }
}

/// A stream read that failed with `error`: the stream yields it and ends.
fn failed_read<'a>(error: sqlx::Error) -> PayloadStream<'a> {
    Box::pin(futures_util::stream::once(std::future::ready(Err(
        to_error(error, "read stream"),
    ))))
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// An append request with what its statement binds that takes work to build (checked schema
/// versions, serialised metadata), prepared once per call and shared with a group's leader.
pub(crate) struct Prepared {
    pub(crate) request: AppendRequest,
    ids: Vec<Uuid>,
    schema_versions: Vec<i32>,
    metadata: Vec<String>,
}

impl Member for Prepared {
    type Outcome = Tried;

    fn exclusive_stream(&self) -> Option<&StreamId> {
        Some(&self.request.stream)
    }

    fn key(&self) -> Option<&IdempotencyKey> {
        self.request.idempotency_key.as_ref()
    }
}

impl Prepared {
    pub(crate) fn new(request: AppendRequest) -> Result<Self, Error> {
        let stream = &request.stream;
        validate_batch(stream, &request.events)?;
        let events = &request.events;
        let mut ids = Vec::with_capacity(events.len());
        let mut schema_versions = Vec::with_capacity(events.len());
        let mut metadata = Vec::with_capacity(events.len());
        for event in events {
            let schema_version = i32::try_from(event.schema_version).map_err(|_| {
                Error::InvalidArgument(format!(
                    "event {} for stream `{stream}` has schema version {}, above PostgreSQL's integer range",
                    event.event_id, event.schema_version
                ))
            })?;
            let user = serde_json::to_string(&event.metadata.user).map_err(|e| {
                Error::InvalidArgument(format!(
                    "metadata of event {} for stream `{stream}` cannot be serialised: {e}",
                    event.event_id
                ))
            })?;
            ids.push(event.event_id.as_uuid());
            schema_versions.push(schema_version);
            metadata.push(user);
        }
        Ok(Self {
            request,
            ids,
            schema_versions,
            metadata,
        })
    }

    /// The batch as the column arrays the append statement unnests.
    fn batch(&self) -> Batch<'_> {
        let events = &self.request.events;
        Batch {
            ids: &self.ids,
            types: events.iter().map(|e| e.event_type.as_str()).collect(),
            schema_versions: &self.schema_versions,
            payloads: events.iter().map(|e| e.payload.get()).collect(),
            metadata: &self.metadata,
            correlation_ids: events
                .iter()
                .map(|e| e.metadata.correlation_id.map(|c| c.as_uuid()))
                .collect(),
            causation_ids: events
                .iter()
                .map(|e| e.metadata.causation_id.map(|c| c.as_uuid()))
                .collect(),
        }
    }

    /// The `expected` column of the group statement: -1 any version, 0 no stream, else exact.
    fn expected_column(&self) -> i64 {
        match self.request.expected {
            ExpectedVersion::Any => -1,
            ExpectedVersion::NoStream => 0,
            ExpectedVersion::Exact(v) => to_i64(v.get()),
        }
    }
}

/// A batch as the column arrays the append statement unnests.
struct Batch<'a> {
    ids: &'a [Uuid],
    types: Vec<&'a str>,
    schema_versions: &'a [i32],
    payloads: Vec<&'a str>,
    metadata: &'a [String],
    correlation_ids: Vec<Option<Uuid>>,
    causation_ids: Vec<Option<Uuid>>,
}

/// What one attempt at an append statement came to, for its caller.
pub(crate) enum Tried {
    /// Stored.
    Appended(AppendResult),
    /// No row matched: a conflict, or the key or some id of the batch is stored.
    Unchanged,
    /// The statement failed.
    Failed(Failure),
    /// The statement may or may not have committed (a lost connection, or a group leader that
    /// went away).
    Unknown(BoxError),
}

impl Tried {
    fn of(attempt: Result<Option<AppendResult>, Failure>) -> Self {
        match attempt {
            Ok(Some(result)) => Tried::Appended(result),
            Ok(None) => Tried::Unchanged,
            Err(Failure::UnknownOutcome(e)) => Tried::Unknown(Box::new(e)),
            Err(failure) => Tried::Failed(failure),
        }
    }
}

/// Where a batch's event ids already are.
enum Existing {
    /// None of them is stored.
    NotStored,
    /// All of them, as the same consecutive events of the stream: an idempotent re-append.
    Stored(AppendResult),
    /// Some of them, or in another stream or order.
    Elsewhere(Error),
}

impl Existing {
    /// The re-append rule of [`EventStore`], on rows `(event_id, stream_id, version, position)`.
    fn judge(stream: &StreamId, batch: &Batch<'_>, rows: Vec<(Uuid, String, i64, i64)>) -> Self {
        if rows.is_empty() {
            return Existing::NotStored;
        }
        let found: HashMap<Uuid, (String, i64, i64)> = rows
            .into_iter()
            .map(|(id, s, v, p)| (id, (s, v, p)))
            .collect();
        let first = batch.ids.iter().find_map(|id| found.get(id)).map(|f| f.1);
        let exact = batch.ids.iter().enumerate().all(|(i, id)| {
            found.get(id).is_some_and(|(s, v, _)| {
                s == stream.as_str() && first.map(|f| f + i as i64) == Some(*v)
            })
        });
        if exact {
            let stored: Vec<&(String, i64, i64)> =
                batch.ids.iter().filter_map(|id| found.get(id)).collect();
            let first = StreamVersion::new(to_u64(stored[0].1 - 1));
            return Existing::Stored(
                AppendResult::new(
                    stream.clone(),
                    first,
                    stored
                        .iter()
                        .map(|f| GlobalPosition::new(to_u64(f.2)))
                        .collect(),
                )
                .as_duplicate(),
            );
        }
        let (id, (existing_stream, _, _)) = batch
            .ids
            .iter()
            .find_map(|id| found.get(id).map(|f| (id, f)))
            .expect("rows is not empty, so some id of the batch was found");
        Existing::Elsewhere(Error::DuplicateEventId {
            stream: stream.clone(),
            event_id: EventId::from_uuid(*id),
            existing_stream: StreamId::new(existing_stream.clone())
                .unwrap_or_else(|_| stream.clone()),
        })
    }
}

/// A `xid8` value read in binary (eight big-endian bytes): the server sends the column as it is
/// stored instead of converting it to text and then to `bigint` for every row.
pub(crate) struct Xid8(pub(crate) u64);

impl sqlx::Type<sqlx::Postgres> for Xid8 {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        sqlx::postgres::PgTypeInfo::with_name("xid8")
    }

    fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
        use sqlx::TypeInfo;
        ty.name() == "xid8"
    }
}

impl Xid8 {
    /// The log position of the event written by this transaction at `global`.
    fn at(self, global: i64) -> LogPosition {
        LogPosition::new(self.0, GlobalPosition::new(to_u64(global)))
    }
}

impl<'r> sqlx::Decode<'r, sqlx::Postgres> for Xid8 {
    fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        match value.format() {
            sqlx::postgres::PgValueFormat::Binary => {
                let bytes: [u8; 8] = value.as_bytes()?.try_into()?;
                Ok(Xid8(u64::from_be_bytes(bytes)))
            }
            sqlx::postgres::PgValueFormat::Text => Ok(Xid8(value.as_str()?.parse()?)),
        }
    }
}

/// An `events` row as the read queries select it: the twelve columns of [`EVENT_COLUMNS`] /
/// [`EVENT_COLUMNS_E`], in that order, from some column on.
pub(crate) struct EventRow {
    global_position: i64,
    commit_id: Xid8,
    stream_id: String,
    stream_version: i64,
    event_id: Uuid,
    event_type: String,
    schema_version: i32,
    payload: String,
    metadata: String,
    correlation_id: Option<Uuid>,
    causation_id: Option<Uuid>,
    recorded_at: DateTime<Utc>,
}

impl EventRow {
    /// Decodes the event's columns starting at column `first`, by index (a name lookup per
    /// column and row measurably slows long reads).
    pub(crate) fn at(row: &sqlx::postgres::PgRow, first: usize) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        Ok(Self {
            global_position: row.try_get(first)?,
            commit_id: row.try_get(first + 1)?,
            stream_id: row.try_get(first + 2)?,
            stream_version: row.try_get(first + 3)?,
            event_id: row.try_get(first + 4)?,
            event_type: row.try_get(first + 5)?,
            schema_version: row.try_get(first + 6)?,
            payload: row.try_get(first + 7)?,
            metadata: row.try_get(first + 8)?,
            correlation_id: row.try_get(first + 9)?,
            causation_id: row.try_get(first + 10)?,
            recorded_at: row.try_get(first + 11)?,
        })
    }

    pub(crate) fn into_recorded(self) -> Result<RecordedEvent, Error> {
        let stream_id = StreamId::new(self.stream_id).map_err(|e| Error::permanent("read", e))?;
        let stream_version = StreamVersion::new(to_u64(self.stream_version));
        let position = self.commit_id.at(self.global_position);
        let schema_version = u32::try_from(self.schema_version).unwrap_or(0);
        let bad = |source: serde_json::Error| Error::Decode {
            stream: stream_id.clone(),
            version: stream_version,
            event_type: self.event_type.clone(),
            schema_version,
            position,
            source: DecodeError::Payload(source),
        };
        let payload = RawValue::from_string(self.payload).map_err(bad)?;
        let user = parse_metadata(&self.metadata).map_err(|source| Error::Metadata {
            stream: stream_id.clone(),
            version: stream_version,
            event_type: self.event_type.clone(),
            position,
            source,
        })?;
        Ok(RecordedEvent {
            event_id: EventId::from_uuid(self.event_id),
            stream_id,
            stream_version,
            position,
            event_type: self.event_type,
            schema_version,
            payload,
            metadata: EventMetadata {
                correlation_id: self.correlation_id.map(CorrelationId::from_uuid),
                causation_id: self.causation_id.map(CausationId::from_uuid),
                user,
            },
            recorded_at: self.recorded_at,
        })
    }
}

/// User metadata as stored. Most events carry none: the column's `'{}'` (as PostgreSQL prints
/// an empty `jsonb` object) needs no parser.
fn parse_metadata(text: &str) -> Result<Metadata, serde_json::Error> {
    if text == "{}" {
        Ok(Metadata::new())
    } else {
        serde_json::from_str(text)
    }
}

/// An [`EventPayload`] from a row of the payload query, by column index (the columns of
/// `Sql::read_payloads`).
pub(crate) fn payload_from_row(
    stream: &StreamId,
    row: &sqlx::postgres::PgRow,
) -> Result<EventPayload, Error> {
    use sqlx::Row;
    let column = |e: sqlx::Error| to_error(e, "read stream");
    let stream_version = StreamVersion::new(to_u64(row.try_get(0).map_err(column)?));
    let event_type: String = row.try_get(1).map_err(column)?;
    let schema_version = u32::try_from(row.try_get::<i32, _>(2).map_err(column)?).unwrap_or(0);
    let payload: String = row.try_get(3).map_err(column)?;
    let recorded_at = row.try_get(4).map_err(column)?;
    let metadata: String = row.try_get(5).map_err(column)?;
    let correlation_id: Option<Uuid> = row.try_get(6).map_err(column)?;
    let causation_id: Option<Uuid> = row.try_get(7).map_err(column)?;
    let payload = RawValue::from_string(payload).map_err(|source| Error::Decode {
        stream: stream.clone(),
        version: stream_version,
        event_type: event_type.clone(),
        schema_version,
        position: LogPosition::START,
        source: DecodeError::Payload(source),
    })?;
    let user = parse_metadata(&metadata).map_err(|source| Error::Metadata {
        stream: stream.clone(),
        version: stream_version,
        event_type: event_type.clone(),
        position: LogPosition::START,
        source,
    })?;
    Ok(EventPayload {
        stream_version,
        event_type,
        schema_version,
        payload,
        recorded_at,
        metadata: EventMetadata {
            correlation_id: correlation_id.map(CorrelationId::from_uuid),
            causation_id: causation_id.map(CausationId::from_uuid),
            user,
        },
    })
}

/// A row of the global-log query: the snapshot horizon, and an event unless none qualified.
struct LogRow {
    horizon: i64,
    next_xid: i64,
    event: Option<EventRow>,
}

impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for LogRow {
    fn from_row(row: &'r sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        // horizon, next_xid, then the event's columns (all NULL when no event qualified).
        let event_id: Option<Uuid> = row.try_get(2 + 4)?;
        Ok(LogRow {
            horizon: row.try_get(0)?,
            next_xid: row.try_get(1)?,
            event: event_id.map(|_| EventRow::at(row, 2)).transpose()?,
        })
    }
}

/// The store's SQL, with the schema name quoted in once.
struct Sql {
    /// Appends of several events (arrays) and of one (scalar parameters), without and with an
    /// idempotency key: indexed by `single + 2 * keyed`.
    append: [AppendSql; 4],
    /// Several requests' appends in one statement (see [`Sql::group`]).
    append_group: String,
    /// Several stream reads in one statement (see [`reads::statement`]).
    read_batch: String,
    /// `read_payloads` with at most $3 rows: a batched read that found nobody to share with.
    read_payloads_first: String,
    find_ids: String,
    find_key: String,
    expire_keys: String,
    stream_version: String,
    stream_archived: String,
    read_stream: String,
    read_payloads: String,
    /// Indexed by `has event types + 2 * has categories`.
    read_all: [String; 4],
    save_snapshot: String,
    load_snapshot: String,
    applied_version: String,
    /// The head, with the newest stored transaction id and the cluster's next one (the restore
    /// check).
    head: String,
    /// The newest stored transaction id and the cluster's next one.
    restore_check: String,
    position_at: String,
}

/// The append statement for each kind of expected version.
///
/// $1: the variant's parameter (expected version or category), $2 stream, $3 batch size, $4..$10
/// the batch's columns (scalars or arrays), $11 the idempotency key of a keyed append. The stream
/// row is bumped only when no id of the batch is stored in any partition and the key is not
/// stored (so a repeat stores nothing and the caller can look the key and ids up), and no
/// sequence value is taken when it is not bumped.
struct AppendSql {
    exact: String,
    no_stream: String,
    any: String,
}

impl AppendSql {
    fn new(s: &str, not_stored: &str, insert: &str) -> Self {
        Self {
            exact: format!(
                "WITH bump AS (UPDATE {s}.streams SET version = version + $3 \
                 WHERE stream_id = $2 AND version = $1 AND NOT archived AND {not_stored} \
                 RETURNING version - $3 AS base) {insert}"
            ),
            no_stream: format!(
                "WITH bump AS (INSERT INTO {s}.streams (stream_id, category, version) \
                 SELECT $2::text, $1::text, $3::bigint WHERE {not_stored} \
                 ON CONFLICT (stream_id) DO NOTHING \
                 RETURNING 0::bigint AS base) {insert}"
            ),
            any: format!(
                "WITH bump AS (INSERT INTO {s}.streams AS st (stream_id, category, version) \
                 SELECT $2::text, $1::text, $3::bigint WHERE {not_stored} \
                 ON CONFLICT (stream_id) DO UPDATE SET version = st.version + EXCLUDED.version \
                 WHERE NOT st.archived \
                 RETURNING st.version - $3 AS base) {insert}"
            ),
        }
    }
}

pub(crate) const EVENT_COLUMNS_E: &str = "e.global_position, e.transaction_id AS commit_id, \
    e.stream_id, e.stream_version, e.event_id, e.event_type, e.schema_version, \
    e.payload::text AS payload, e.metadata::text AS metadata, e.correlation_id, e.causation_id, \
    e.recorded_at";

const EVENT_COLUMNS: &str = "global_position, transaction_id AS commit_id, \
    stream_id, stream_version, event_id, event_type, schema_version, payload::text AS payload, \
    metadata::text AS metadata, correlation_id, causation_id, recorded_at";

impl Sql {
    /// The group append: every request keeps the rules of its own statement.
    ///
    /// Requests ($1 streams, $2 categories, $3 expected versions: -1 any, 0 no stream, else
    /// exact; $4 event counts, $5 idempotency keys or NULL) and their events ($6 the request's
    /// ordinal, $7 the event's ordinal in its request, $8..$14 the columns) arrive as arrays, one
    /// stream per request. A request whose key or some id is stored is left out (`ok`); each
    /// other one bumps its stream row by the rule of its expected version, and only a bumped one
    /// inserts its events and its key. Rows come back with their stream id: a request with none
    /// matched nothing (a conflict or a repeat, resolved by its caller as after its own
    /// statement).
    fn group(s: &str) -> String {
        format!(
            "WITH r AS MATERIALIZED ( \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::text[]) \
                     WITH ORDINALITY AS r(stream_id, category, expected, n, key, i)), \
             ev AS MATERIALIZED ( \
                 SELECT * FROM unnest($6::int8[], $7::int8[], $8::uuid[], $9::text[], $10::int4[], \
                     $11::text[], $12::text[], $13::uuid[], $14::uuid[]) WITH ORDINALITY \
                     AS ev(i, n, event_id, event_type, schema_version, payload, metadata, \
                           correlation_id, causation_id, o)), \
             stored AS MATERIALIZED ( \
                 SELECT DISTINCT ev.i FROM ev JOIN {s}.events e ON e.event_id = ev.event_id), \
             ok AS MATERIALIZED ( \
                 SELECT r.* FROM r WHERE NOT EXISTS (SELECT 1 FROM stored WHERE stored.i = r.i) \
                 AND (r.key IS NULL OR NOT EXISTS ( \
                     SELECT 1 FROM {s}.idempotency_keys k WHERE k.key = r.key))), \
             upd AS ( \
                 UPDATE {s}.streams st SET version = st.version + ok.n FROM ok \
                 WHERE ok.expected > 0 AND st.stream_id = ok.stream_id AND st.version = ok.expected \
                     AND NOT st.archived \
                 RETURNING ok.i, st.version - ok.n AS base), \
             ins AS ( \
                 INSERT INTO {s}.streams (stream_id, category, version) \
                 SELECT ok.stream_id, ok.category, ok.n FROM ok WHERE ok.expected = 0 \
                 ON CONFLICT (stream_id) DO NOTHING \
                 RETURNING stream_id, version), \
             anyv AS ( \
                 INSERT INTO {s}.streams AS st (stream_id, category, version) \
                 SELECT ok.stream_id, ok.category, ok.n FROM ok WHERE ok.expected < 0 \
                 ON CONFLICT (stream_id) DO UPDATE SET version = st.version + EXCLUDED.version \
                     WHERE NOT st.archived \
                 RETURNING st.stream_id, st.version), \
             bump AS MATERIALIZED ( \
                 SELECT upd.i, upd.base FROM upd \
                 UNION ALL \
                 SELECT ok.i, x.version - ok.n FROM ( \
                     SELECT * FROM ins UNION ALL SELECT * FROM anyv) x \
                 JOIN ok ON ok.stream_id = x.stream_id), \
             k AS ( \
                 INSERT INTO {s}.idempotency_keys (key, stream_id, first_version, event_count) \
                 SELECT ok.key, ok.stream_id, bump.base, ok.n::int4 \
                 FROM bump JOIN ok ON ok.i = bump.i WHERE ok.key IS NOT NULL) \
             INSERT INTO {s}.events (stream_id, stream_version, event_id, event_type, \
                 schema_version, payload, metadata, correlation_id, causation_id) \
             SELECT ok.stream_id, bump.base + ev.n, ev.event_id, ev.event_type, ev.schema_version, \
                 ev.payload::jsonb, ev.metadata::jsonb, ev.correlation_id, ev.causation_id \
             FROM bump JOIN ok ON ok.i = bump.i JOIN ev ON ev.i = bump.i \
             ORDER BY ev.o \
             RETURNING global_position, stream_id, stream_version"
        )
    }

    fn new(schema: &SchemaName) -> Self {
        let s = schema.quoted();
        // Stream reads skip the partitions below the stream's first position.
        let prune = crate::maintenance::stream_read_pruning(&s, "$1");
        let insert_many = format!(
            "INSERT INTO {s}.events (stream_id, stream_version, event_id, event_type, \
                 schema_version, payload, metadata, correlation_id, causation_id) \
             SELECT $2, bump.base + b.n, b.event_id, b.event_type, b.schema_version, \
                 b.payload::jsonb, b.metadata::jsonb, b.correlation_id, b.causation_id \
             FROM bump CROSS JOIN unnest($4::uuid[], $5::text[], $6::int4[], $7::text[], \
                 $8::text[], $9::uuid[], $10::uuid[]) WITH ORDINALITY \
                 AS b(event_id, event_type, schema_version, payload, metadata, \
                      correlation_id, causation_id, n) \
             ORDER BY b.n \
             RETURNING global_position, stream_version"
        );
        let insert_one = format!(
            "INSERT INTO {s}.events (stream_id, stream_version, event_id, event_type, \
                 schema_version, payload, metadata, correlation_id, causation_id) \
             SELECT $2, bump.base + 1, $4::uuid, $5::text, $6::int4, $7::text::jsonb, \
                 $8::text::jsonb, $9::uuid, $10::uuid \
             FROM bump \
             RETURNING global_position, stream_version"
        );
        // The horizon (oldest transaction in flight) and the next transaction id come back on every
        // row, and alone on one row when no event qualifies, so the caller can tell whether a
        // transaction that began before the read could still add rows below the page's end.
        let read_all = |types: bool, categories: bool| {
            // The lower bound is a scalar subquery: its value is unknown when the statement is
            // planned, so PostgreSQL keeps the ordered index scan. With the value as a constant,
            // a page past the last value of the table's statistics (the recent end of the log,
            // after a burst of writes) is estimated at a few rows, and planned as "fetch all
            // remaining rows, sort, take the first N": measured 65 ms instead of 1 ms per page
            // of 1000 at the end of a 300k-event log, growing with what is left to read.
            let mut conditions = String::from(
                "e.transaction_id < h.xmin \
                 AND (e.transaction_id, e.global_position) > ((SELECT $1::bigint::text::xid8), $2)",
            );
            let mut next = 4;
            if types {
                conditions.push_str(&format!(" AND e.event_type = ANY(${next}::text[])"));
                next += 1;
            }
            if categories {
                conditions.push_str(&format!(
                    " AND split_part(e.stream_id, '{CATEGORY_SEPARATOR}', 1) = ANY(${next}::text[])"
                ));
            }
            format!(
                "WITH s AS MATERIALIZED (SELECT pg_current_snapshot() AS snap), \
                 h AS MATERIALIZED (SELECT pg_snapshot_xmin(snap) AS xmin, \
                     pg_snapshot_xmin(snap)::text::bigint AS horizon, \
                     pg_snapshot_xmax(snap)::text::bigint AS next_xid FROM s) \
                 SELECT h.horizon, h.next_xid, p.* \
                 FROM h LEFT JOIN LATERAL ( \
                     SELECT {EVENT_COLUMNS_E} FROM {s}.events e WHERE {conditions} \
                     ORDER BY e.transaction_id, e.global_position LIMIT $3 \
                 ) p ON true"
            )
        };
        let ids_not_stored = |single: bool| {
            if single {
                format!("NOT EXISTS (SELECT 1 FROM {s}.events WHERE event_id = $4::uuid)")
            } else {
                format!("NOT EXISTS (SELECT 1 FROM {s}.events WHERE event_id = ANY($4::uuid[]))")
            }
        };
        // A keyed append also requires the key to be new, and records it (with the version before
        // the batch and its size, both known from the bump) in the same statement: a
        // data-modifying CTE runs whether or not the query reads it.
        let keyed = |single: bool, insert: &str| {
            AppendSql::new(
                &s,
                &format!(
                    "{} AND NOT EXISTS (SELECT 1 FROM {s}.idempotency_keys WHERE key = $11::text)",
                    ids_not_stored(single)
                ),
                &format!(
                    ", k AS (INSERT INTO {s}.idempotency_keys (key, stream_id, first_version, event_count) \
                         SELECT $11::text, $2::text, bump.base, $3::int4 FROM bump) \
                     {insert}"
                ),
            )
        };
        Self {
            append: [
                AppendSql::new(&s, &ids_not_stored(false), &insert_many),
                AppendSql::new(&s, &ids_not_stored(true), &insert_one),
                keyed(false, &insert_many),
                keyed(true, &insert_one),
            ],
            append_group: Self::group(&s),
            read_batch: reads::statement(&s),
            read_payloads_first: format!(
                "SELECT stream_version, event_type, schema_version, payload::text, recorded_at, \
                 metadata::text, correlation_id, causation_id \
                 FROM {s}.events WHERE stream_id = $1 AND stream_version > $2 {prune} \
                 ORDER BY stream_version LIMIT $3"
            ),
            // The key's batch, as its events are stored (a repeat compares their ids).
            find_key: format!(
                "SELECT k.stream_id, k.first_version, k.event_count, \
                     COALESCE(array_agg(e.global_position ORDER BY e.stream_version) \
                         FILTER (WHERE e.event_id IS NOT NULL), '{{}}'), \
                     COALESCE(array_agg(e.event_id ORDER BY e.stream_version) \
                         FILTER (WHERE e.event_id IS NOT NULL), '{{}}') \
                 FROM {s}.idempotency_keys k LEFT JOIN {s}.events e \
                     ON e.stream_id = k.stream_id AND e.stream_version > k.first_version \
                     AND e.stream_version <= k.first_version + k.event_count \
                 WHERE k.key = $1 GROUP BY k.stream_id, k.first_version, k.event_count"
            ),
            expire_keys: format!("DELETE FROM {s}.idempotency_keys WHERE stored_at < $1"),
            find_ids: format!(
                "SELECT event_id, stream_id, stream_version, global_position \
                 FROM {s}.events WHERE event_id = ANY($1)"
            ),
            stream_version: format!("SELECT version FROM {s}.streams WHERE stream_id = $1"),
            stream_archived: format!(
                "SELECT archived, deleted_at IS NOT NULL FROM {s}.streams WHERE stream_id = $1"
            ),
            read_stream: format!(
                "SELECT {EVENT_COLUMNS} FROM {s}.events \
                 WHERE stream_id = $1 AND stream_version > $2 {prune} ORDER BY stream_version"
            ),
            // Only what folding into state needs, upcasts included (they may read recorded-at
            // and metadata): no event id, no position, no transaction id to convert.
            read_payloads: format!(
                "SELECT stream_version, event_type, schema_version, payload::text, recorded_at, \
                 metadata::text, correlation_id, causation_id \
                 FROM {s}.events WHERE stream_id = $1 AND stream_version > $2 {prune} \
                 ORDER BY stream_version"
            ),
            read_all: [
                read_all(false, false),
                read_all(true, false),
                read_all(false, true),
                read_all(true, true),
            ],
            save_snapshot: format!(
                "INSERT INTO {s}.snapshots AS sn (stream_id, stream_version, schema_version, state, taken_at) \
                 VALUES ($1, $2, $3, $4::jsonb, $5) \
                 ON CONFLICT (stream_id) DO UPDATE SET stream_version = EXCLUDED.stream_version, \
                     schema_version = EXCLUDED.schema_version, state = EXCLUDED.state, \
                     taken_at = EXCLUDED.taken_at \
                 WHERE sn.stream_version <= EXCLUDED.stream_version"
            ),
            load_snapshot: format!(
                "SELECT stream_version, schema_version, state::text, taken_at \
                 FROM {s}.snapshots WHERE stream_id = $1"
            ),
            // The newest settled event (below the oldest transaction in flight), by the log's
            // index read backwards; and the restore check, from the same index, in the same
            // round trip.
            head: format!(
                "WITH h AS MATERIALIZED (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin, \
                     pg_snapshot_xmax(pg_current_snapshot()) AS xmax) \
                 SELECT p.transaction_id, p.global_position, \
                     (SELECT n.transaction_id FROM {s}.events n \
                      ORDER BY n.transaction_id DESC LIMIT 1) AS newest, h.xmax \
                 FROM h LEFT JOIN LATERAL ( \
                     SELECT e.transaction_id, e.global_position FROM {s}.events e \
                     WHERE e.transaction_id < h.xmin \
                     ORDER BY e.transaction_id DESC, e.global_position DESC LIMIT 1 \
                 ) p ON true"
            ),
            restore_check: format!(
                "SELECT (SELECT n.transaction_id FROM {s}.events n \
                         ORDER BY n.transaction_id DESC LIMIT 1) AS newest, \
                     pg_snapshot_xmax(pg_current_snapshot()) AS xmax"
            ),
            // The first settled event recorded at or after $1, in log order (an index scan of the
            // log from its start up to it), and the event before it.
            position_at: format!(
                "SELECT p.transaction_id, p.global_position FROM ( \
                     SELECT e.transaction_id, e.global_position FROM {s}.events e \
                     WHERE e.recorded_at >= $1 \
                       AND e.transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
                     ORDER BY e.transaction_id, e.global_position LIMIT 1 \
                 ) f LEFT JOIN LATERAL ( \
                     SELECT e.transaction_id, e.global_position FROM {s}.events e \
                     WHERE (e.transaction_id, e.global_position) < (f.transaction_id, f.global_position) \
                     ORDER BY e.transaction_id DESC, e.global_position DESC LIMIT 1 \
                 ) p ON true"
            ),
            applied_version: format!("SELECT max(version) FROM {s}._sqlx_migrations WHERE success"),
        }
    }
}

impl EventStore for PostgresStore {
    fn append(
        &self,
        request: AppendRequest,
    ) -> impl Future<Output = Result<AppendResult, Error>> + Send {
        self.append_batch(request)
    }

    async fn idempotency_outcome(
        &self,
        key: &IdempotencyKey,
    ) -> Result<Option<AppendResult>, Error> {
        Ok(self
            .key_record(&self.inner.pool, key)
            .await?
            .map(|(result, _)| result))
    }

    fn read_stream_payloads<'a>(
        &'a self,
        stream: &'a StreamId,
        after: StreamVersion,
    ) -> PayloadStream<'a> {
        if self.decrypts() {
            use futures_util::TryStreamExt as _;
            return Box::pin(self.read_stream(stream, after).map_ok(EventPayload::from));
        }
        if let Some(queue) = &self.inner.reads {
            return self.batched_read(queue, stream, after);
        }
        self.read_payloads_alone(stream, after)
    }

    fn read_stream<'a>(&'a self, stream: &'a StreamId, after: StreamVersion) -> EventStream<'a> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(self.inner.sql.read_stream.as_str()))
            .bind(stream.as_str())
            .bind(to_i64(after.get()))
            .fetch(&self.inner.pool);
        let events = rows.map(|row| {
            row.and_then(|row| EventRow::at(&row, 0))
                .map_err(|e| to_error(e, "read stream"))
                .and_then(EventRow::into_recorded)
        });
        if self.decrypts() {
            return Box::pin(events.then(move |event| async move { self.open(event?).await }));
        }
        Box::pin(events)
    }

    async fn head(&self) -> Result<LogPosition, Error> {
        let (commit, global, newest, next): (Option<Xid8>, Option<i64>, Option<Xid8>, Xid8) =
            sqlx::query_as(sqlx::AssertSqlSafe(self.inner.sql.head.as_str()))
                .fetch_one(&self.inner.pool)
                .await
                .map_err(|e| to_error(e, "read the log head"))?;
        self.restore_verdict(newest, next)
            .map_err(|e| e.into_error("read the log head"))?;
        Ok(match (commit, global) {
            (Some(commit), Some(global)) => commit.at(global),
            _ => LogPosition::START,
        })
    }

    async fn position_at(&self, time: DateTime<Utc>) -> Result<LogPosition, Error> {
        let row: Option<(Option<Xid8>, Option<i64>)> =
            sqlx::query_as(sqlx::AssertSqlSafe(self.inner.sql.position_at.as_str()))
                .bind(time)
                .fetch_optional(&self.inner.pool)
                .await
                .map_err(|e| to_error(e, "find a position by time"))?;
        match row {
            // Nothing recorded since `time`: start at the head.
            None => self.head().await,
            Some((Some(commit), Some(global))) => Ok(commit.at(global)),
            // The first event of the log is the first one since `time`.
            Some(_) => Ok(LogPosition::START),
        }
    }

    fn read_all(
        &self,
        after: LogPosition,
        limit: usize,
        filter: &EventFilter,
    ) -> impl Future<Output = Result<Vec<RecordedEvent>, Error>> + Send {
        let types = filter.event_types().map(<[String]>::to_vec);
        let categories = filter.categories().map(<[String]>::to_vec);
        async move {
            let sql = &self.inner.sql.read_all
                [usize::from(types.is_some()) + 2 * usize::from(categories.is_some())];
            let settle = self.inner.options.read_settle_timeout();
            let started = Instant::now();
            let mut target = None;
            let mut attempt = 0;
            loop {
                let mut query = sqlx::query_as::<_, LogRow>(sqlx::AssertSqlSafe(sql.as_str()))
                    .bind(to_i64(after.commit))
                    .bind(to_i64(after.global.get()))
                    .bind(i64::try_from(limit).unwrap_or(i64::MAX));
                if let Some(types) = &types {
                    query = query.bind(types);
                }
                if let Some(categories) = &categories {
                    query = query.bind(categories);
                }
                let rows = query
                    .fetch_all(&self.inner.pool)
                    .await
                    .map_err(|e| to_error(e, "read all"))?;
                let (horizon, next_xid) = rows.first().map_or((0, 0), |r| (r.horizon, r.next_xid));
                // Every transaction that could have committed before this call has an id below
                // the first statement's next id; once the horizon passes it, the page holds
                // everything committed before the call (read-your-writes), not just what is safe.
                let target = *target.get_or_insert(next_xid);
                let mut events: Vec<EventRow> = rows.into_iter().filter_map(|r| r.event).collect();
                // The lateral subquery returns its rows in log order; the outer query does not
                // promise to keep it, and sorting 1,000 rows there cost about a fifth of a page.
                // Here the rows arrive sorted, which a stable sort checks in one pass.
                events.sort_by_key(|e| (e.commit_id.0, e.global_position));
                attempt += 1;
                let delay = Duration::from_millis(1 << attempt.min(5));
                if events.len() >= limit || horizon >= target || started.elapsed() + delay > settle
                {
                    // An empty page is what a restored log looks like (every stored id above the
                    // horizon): look once at the newest stored id. So is a first page holding
                    // only events appended after an unrepaired restore (they sort below the
                    // restored ones): a read from the start looks too. Other pages with events,
                    // the hot path, pay nothing.
                    if events.is_empty() || after == LogPosition::START {
                        self.check_not_restored("read all").await?;
                    }
                    let events: Result<Vec<_>, _> =
                        events.into_iter().map(EventRow::into_recorded).collect();
                    return self.open_all(events?).await;
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

impl SnapshotStore for PostgresStore {
    async fn save_snapshot(&self, snapshot: StoredSnapshot) -> Result<(), Error> {
        self.ensure_service().await?;
        {
            let schema_version = i32::try_from(snapshot.schema_version).map_err(|_| {
                Error::InvalidArgument(format!(
                    "snapshot schema version {} is above PostgreSQL's integer range",
                    snapshot.schema_version
                ))
            })?;
            sqlx::query(sqlx::AssertSqlSafe(self.inner.sql.save_snapshot.as_str()))
                .bind(snapshot.stream_id.as_str())
                .bind(to_i64(snapshot.stream_version.get()))
                .bind(schema_version)
                .bind(snapshot.state.get())
                .bind(snapshot.taken_at)
                .execute(&self.inner.pool)
                .await
                .map_err(|e| to_error(e, "save snapshot"))?;
            Ok(())
        }
    }

    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<StoredSnapshot>, Error> {
        {
            let row: Option<(i64, i32, String, DateTime<Utc>)> =
                sqlx::query_as(sqlx::AssertSqlSafe(self.inner.sql.load_snapshot.as_str()))
                    .bind(stream.as_str())
                    .fetch_optional(&self.inner.pool)
                    .await
                    .map_err(|e| to_error(e, "load snapshot"))?;
            row.map(|(version, schema_version, state, taken_at)| {
                Ok(StoredSnapshot {
                    stream_id: stream.clone(),
                    stream_version: StreamVersion::new(to_u64(version)),
                    schema_version: u32::try_from(schema_version).unwrap_or(0),
                    state: RawValue::from_string(state).map_err(|source| Error::Snapshot {
                        stream: stream.clone(),
                        source,
                    })?,
                    taken_at,
                })
            })
            .transpose()
        }
    }
}
