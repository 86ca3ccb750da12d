//! The runner of a [`PgProjection`]: one transaction per batch for the events and the checkpoint.

use std::future::Future;
use std::time::Duration;

use factum::subscription::{RETRY_MIN, StartFrom, SubscriptionState, SubscriptionStatus};
use factum::{
    BoxError, Error, EventFilter, EventId, EventStore, GlobalPosition, LogPosition, RecordedEvent,
};
use sqlx::{PgConnection, Postgres, Transaction};
use tokio::sync::watch;

use super::lease::{self, Lease};
use super::{PgProjection, ProjectionTx, Tables};
use crate::error::to_error;
use crate::store::PostgresStore;

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(crate) fn position(commit: i64, global: i64) -> LogPosition {
    LogPosition::new(to_u64(commit), GlobalPosition::new(to_u64(global)))
}

/// SQL the runner needs, built once for the store's schema.
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
                 VALUES ($1, $2, $3, $4, now()) ON CONFLICT (subscription, event_id) DO UPDATE \
                 SET error = EXCLUDED.error, attempts = EXCLUDED.attempts, parked_at = EXCLUDED.parked_at"
            ),
            claim_parked: format!(
                "DELETE FROM {s}.dead_letters WHERE subscription = $1 AND event_id = $2 RETURNING event_id"
            ),
        }
    }
}

/// How a batch transaction ended.
enum Outcome {
    /// Applied and checkpointed.
    Applied,
    /// The checkpoint was not where this runner left it (another writer, or a commit whose
    /// acknowledgement was lost): resume from the stored one.
    Moved(LogPosition),
    /// The handler failed on some event of the batch; the transaction was rolled back.
    Failed(BoxError),
}

/// Runs a [`PgProjection`] over the global log with exactly-once application. See the
/// [module docs](super).
pub struct PgProjectionRunner<P> {
    pub(crate) store: PostgresStore,
    pub(crate) projection: P,
    pub(crate) name: String,
    pub(crate) filter: EventFilter,
    start: StartFrom,
    pub(crate) batch_size: usize,
    idle_min: Duration,
    idle_max: Duration,
    standby_poll: Duration,
    handler_attempts: u32,
    handler_backoff: Duration,
    park: bool,
    pub(crate) tables: Tables,
    pub(crate) sql: Sql,
    pub(crate) status: watch::Sender<SubscriptionStatus>,
    /// The batch after a position, read while the previous batch was applied.
    prefetched: Option<(LogPosition, Vec<RecordedEvent>)>,
}

impl<P> std::fmt::Debug for PgProjectionRunner<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgProjectionRunner")
            .field("name", &self.name)
            .field("filter", &self.filter)
            .field("start", &self.start)
            .field("batch_size", &self.batch_size)
            .field("parks_failures", &self.park)
            .finish_non_exhaustive()
    }
}

impl<P: PgProjection> PgProjectionRunner<P> {
    /// A runner of `projection` over `store`, checkpointed as [`PgProjection::NAME`]. Defaults:
    /// from its checkpoint, batches of 500, idle polling from 10 ms backing off to 1 s, a standby
    /// instance trying the lease every second, 3 handler attempts 100 ms apart, stop on failure.
    ///
    /// An invalid declaration (an empty `NAME`, a table in `TABLES` that is not `name` or
    /// `schema.name` of lowercase ASCII letters, digits and `_`) does not build:
    ///
    /// ```compile_fail
    /// # use factum::{BoxError, Envelope};
    /// # use factum_postgres::projection::{PgProjection, PgProjectionRunner, ProjectionTx};
    /// # #[derive(Debug)] struct Ping;
    /// # impl factum::Event for Ping {
    /// #     fn event_type(&self) -> &'static str { "ping" }
    /// #     fn schema_version(&self) -> u32 { 1 }
    /// #     fn event_types() -> &'static [&'static str] { &["ping"] }
    /// #     fn encode(&self) -> Result<Box<factum::RawValue>, factum::EncodeError> { factum::encode_json(&()) }
    /// #     fn decode(_: &str, _: u32, _: &factum::RawValue) -> Result<Self, factum::DecodeError> { Ok(Ping) }
    /// # }
    /// struct Pings;
    /// impl PgProjection for Pings {
    ///     const NAME: &'static str = "pings";
    ///     const TABLES: &'static [&'static str] = &["Pings; DROP TABLE users"];
    ///     type Event = Ping;
    ///     async fn apply(&mut self, _: &mut ProjectionTx<'_>, _: &Envelope<Ping>) -> Result<(), BoxError> {
    ///         Ok(())
    ///     }
    /// }
    /// // error: invalid PgProjection declaration (reported by `cargo build`, not `cargo check`)
    /// let new = PgProjectionRunner::<Pings>::new;
    /// # let _ = new as fn(_, _) -> _;
    /// ```
    pub fn new(store: PostgresStore, projection: P) -> Self {
        const {
            assert!(
                super::declaration_is_valid(P::NAME, P::TABLES),
                "invalid PgProjection declaration: NAME must not be empty, and each of TABLES must be `name` or `schema.name` of 1 to 50 lowercase ASCII letters, digits or `_`, not starting with a digit"
            );
        }
        let tables = Tables::new(P::TABLES, "").unwrap_or_default();
        let (status, _) = watch::channel(SubscriptionStatus::starting(LogPosition::START));
        Self {
            sql: Sql::new(&store),
            store,
            projection,
            name: P::NAME.to_owned(),
            filter: EventFilter::for_event::<P::Event>(),
            start: StartFrom::Checkpoint,
            batch_size: 500,
            idle_min: Duration::from_millis(10),
            idle_max: Duration::from_secs(1),
            standby_poll: Duration::from_secs(1),
            handler_attempts: 3,
            handler_backoff: Duration::from_millis(100),
            park: false,
            tables,
            status,
            prefetched: None,
        }
    }

    /// Where to start the first time (default: [`StartFrom::Checkpoint`]). `Beginning` and
    /// `After` move the stored checkpoint: the read model should be empty (or a rebuild used).
    #[must_use]
    pub fn start_from(mut self, start: StartFrom) -> Self {
        self.start = start;
        self
    }

    /// Narrows the events read further (default: the projection's event types), e.g. to some
    /// stream categories.
    #[must_use]
    pub fn filter(mut self, filter: EventFilter) -> Self {
        self.filter = filter;
        self
    }

    /// Events per batch, and per transaction (minimum 1).
    #[must_use]
    pub fn batch_size(mut self, size: usize) -> Self {
        self.batch_size = size.max(1);
        self
    }

    /// Polling delay while the log is quiet: starts at `min`, doubles up to `max`, back to `min`
    /// as soon as an event arrives.
    #[must_use]
    pub fn idle_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.idle_min = min;
        self.idle_max = max.max(min);
        self
    }

    /// How often an instance in standby tries to take the lease over.
    #[must_use]
    pub fn standby_poll(mut self, every: Duration) -> Self {
        self.standby_poll = every;
        self
    }

    /// How many times a failing event is applied (minimum 1), and the pause between attempts.
    #[must_use]
    pub fn handler_retries(mut self, attempts: u32, backoff: Duration) -> Self {
        self.handler_attempts = attempts.max(1);
        self.handler_backoff = backoff;
        self
    }

    /// Parks events the projection keeps failing on in the dead-letter table (in the transaction
    /// that moves the checkpoint past them) and goes on, instead of stopping.
    #[must_use]
    pub fn park_failures(mut self) -> Self {
        self.park = true;
        self
    }

    /// The projection's name (its checkpoint's and lease's key).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The projection.
    pub fn projection(&self) -> &P {
        &self.projection
    }

    /// The projection, mutably (e.g. to fix a handler before [`retry_parked`](Self::retry_parked)).
    pub fn projection_mut(&mut self) -> &mut P {
        &mut self.projection
    }

    /// A live view of the runner's state, position, lag and counters.
    pub fn status(&self) -> watch::Receiver<SubscriptionStatus> {
        self.status.subscribe()
    }

    /// Takes the lease (waiting while another instance holds it), applies every event up to the
    /// current end of the log, releases the lease, and returns the position reached.
    pub async fn catch_up(&mut self) -> Result<LogPosition, Error> {
        self.run_until(std::future::pending::<()>(), true).await
    }

    /// Takes the lease (waiting in standby while another instance holds it), catches up, then
    /// follows new events until `shutdown` completes or the projection fails (and failures are
    /// not parked). Losing the lease's connection sends it back to standby.
    pub async fn run(
        &mut self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<LogPosition, Error> {
        self.run_until(shutdown, false).await
    }

    async fn run_until(
        &mut self,
        shutdown: impl Future<Output = ()> + Send,
        stop_when_caught_up: bool,
    ) -> Result<LogPosition, Error> {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut reached = self.status.borrow().position;
        let mut spare = None;
        let key = self.lease_key();
        let mut delay = RETRY_MIN;
        'lease: loop {
            let mut lease = loop {
                let taken = tokio::select! {
                    biased;
                    () = &mut shutdown => break 'lease,
                    taken = lease::try_acquire(self.store.pool(), &key, &mut spare) => taken,
                };
                match taken {
                    Ok(Some(lease)) => break lease,
                    Ok(None) => {}
                    Err(error) => {
                        spare = None;
                        if self.wait_to_retry(error, &mut delay, &mut shutdown).await? {
                            continue;
                        }
                        break 'lease;
                    }
                }
                self.status.send_if_modified(|s| {
                    let changed = s.state != SubscriptionState::Standby;
                    s.state = SubscriptionState::Standby;
                    changed
                });
                tokio::select! {
                    biased;
                    () = &mut shutdown => break 'lease,
                    () = tokio::time::sleep(self.standby_poll) => {}
                }
            };
            let start = tokio::select! {
                biased;
                () = &mut shutdown => break 'lease,
                start = self.initial_position() => start,
            };
            let mut position = match start {
                Ok(position) => position,
                Err(error) => {
                    drop(lease);
                    if self.wait_to_retry(error, &mut delay, &mut shutdown).await? {
                        continue 'lease;
                    }
                    break 'lease;
                }
            };
            let mut idle = self.idle_min;
            loop {
                let work = tokio::select! {
                    biased;
                    () = &mut shutdown => None,
                    step = self.step(&mut position) => Some(step),
                };
                reached = position;
                match work {
                    None => break 'lease,
                    Some(Err(error)) => {
                        // Start over from the stored checkpoint, taking the lease again (its
                        // connection may be gone too; another instance may take over meanwhile).
                        drop(lease);
                        self.prefetched = None;
                        if self.wait_to_retry(error, &mut delay, &mut shutdown).await? {
                            continue 'lease;
                        }
                        break 'lease;
                    }
                    Some(Ok(true)) => {
                        idle = self.idle_min;
                        delay = RETRY_MIN;
                    }
                    Some(Ok(false)) if stop_when_caught_up => {
                        drop(lease);
                        return Ok(position);
                    }
                    Some(Ok(false)) => {
                        delay = RETRY_MIN;
                        tokio::select! {
                            biased;
                            () = &mut shutdown => break 'lease,
                            () = tokio::time::sleep(idle) => {}
                        }
                        idle = (idle * 2).min(self.idle_max);
                        if !Self::still_held(&mut lease).await {
                            tracing::warn!(projection = %self.name, "lost the projection lease; standing by");
                            continue 'lease;
                        }
                    }
                }
            }
        }
        self.status
            .send_modify(|s| s.state = SubscriptionState::Stopped);
        Ok(reached)
    }

    async fn wait_to_retry(
        &self,
        error: Error,
        delay: &mut Duration,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Result<bool, Error> {
        factum::subscription::wait_to_retry(&self.status, &self.name, error, delay, shutdown).await
    }

    async fn still_held(lease: &mut Lease) -> bool {
        lease.is_held().await
    }

    fn lease_key(&self) -> String {
        format!("{}.{}", self.store.schema().as_str(), self.name)
    }

    /// The position to resume from; stores it as the checkpoint when there was none (or the
    /// start mode overrides it), so every batch transaction finds a row to lock.
    async fn initial_position(&mut self) -> Result<LogPosition, Error> {
        let stored = self.store.load_checkpoint_row(&self.name).await?;
        let position = match (self.start, stored) {
            (StartFrom::Beginning, _) => Some(LogPosition::START),
            (StartFrom::After(position), _) => Some(position),
            (StartFrom::Time(time), _) => Some(self.store.position_at(time).await?),
            (StartFrom::Checkpoint | StartFrom::Now, Some(_)) => None,
            (StartFrom::Checkpoint, None) => Some(LogPosition::START),
            (StartFrom::Now, None) => Some(self.head().await?),
        };
        // A later term (after a lost lease) resumes from the checkpoint.
        self.start = StartFrom::Checkpoint;
        let position = match position {
            Some(position) => {
                let mut conn = self.acquire().await?;
                self.save_checkpoint(&mut conn, position).await?;
                position
            }
            None => stored.unwrap_or(LogPosition::START),
        };
        self.status.send_modify(|s| {
            s.position = position;
            s.head = s.head.max(position);
        });
        Ok(position)
    }

    async fn acquire(&self) -> Result<sqlx::pool::PoolConnection<Postgres>, Error> {
        self.store
            .pool()
            .acquire()
            .await
            .map_err(|e| to_error(e, "projection connection"))
    }

    /// The newest settled position of the log (for lag and "start from now").
    pub(crate) async fn head(&self) -> Result<LogPosition, Error> {
        self.store.head().await
    }

    async fn begin(&self) -> Result<Transaction<'static, Postgres>, Error> {
        crate::tx::begin(self.store.pool())
            .await
            .map_err(|e| to_error(e, "begin projection transaction"))
    }

    /// Locks the checkpoint row for the transaction; `Some(stored)` when it is not at `expected`.
    pub(crate) async fn lock_checkpoint(
        &self,
        conn: &mut PgConnection,
        name: &str,
        expected: LogPosition,
    ) -> Result<Option<LogPosition>, Error> {
        let row: Option<(i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(self.sql.lock_checkpoint.as_str()))
            .bind(name)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| to_error(e, "lock projection checkpoint"))?;
        let stored = match row {
            Some((c, g)) => position(c, g),
            None => {
                // Deleted by hand meanwhile: recreate it where this runner stands.
                sqlx::query(sqlx::AssertSqlSafe(self.sql.insert_checkpoint.as_str()))
                    .bind(name)
                    .bind(to_i64(expected.commit))
                    .bind(to_i64(expected.global.get()))
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| to_error(e, "create projection checkpoint"))?;
                expected
            }
        };
        Ok((stored != expected).then_some(stored))
    }

    async fn save_checkpoint(
        &self,
        conn: &mut PgConnection,
        position: LogPosition,
    ) -> Result<(), Error> {
        save_checkpoint_as(&self.sql, conn, &self.name, position).await
    }

    /// Applies one batch. `Ok(true)` when there may be more to read.
    async fn step(&mut self, position: &mut LogPosition) -> Result<bool, Error> {
        let batch = match self.prefetched.take() {
            Some((after, batch)) if after == *position => batch,
            _ => {
                self.store
                    .read_all(*position, self.batch_size, &self.filter)
                    .await?
            }
        };
        if batch.is_empty() {
            // Nothing to lock a checkpoint for: check it did not move (a rebuild swapped its
            // tables in, or an operator rewound it) while this runner had nothing to do.
            if let Some(stored) = self.store.load_checkpoint_row(&self.name).await?
                && stored != *position
            {
                tracing::info!(projection = %self.name, %stored, "the checkpoint moved (a rebuild?); resuming from it");
                *position = stored;
                self.status.send_modify(|s| s.position = stored);
                return Ok(true);
            }
            self.status.send_if_modified(|s| {
                let changed = s.state != SubscriptionState::Live || s.lag_events != 0;
                s.caught_up();
                changed
            });
            return Ok(false);
        }
        let full = batch.len() >= self.batch_size;
        if full && self.status.borrow().state != SubscriptionState::CatchingUp {
            let head = self.head().await?;
            self.status.send_modify(|s| s.set_head(head));
        }
        self.status
            .send_modify(|s| s.state = SubscriptionState::CatchingUp);
        let outcome = if full {
            // Catching up: read the next batch while this one is applied, so reading and
            // writing overlap. (The read is gap-safe on its own; it is used only if this batch
            // commits.)
            let last = batch.last().map_or(*position, |e| e.position);
            let (store, filter, size) = (self.store.clone(), self.filter.clone(), self.batch_size);
            let (outcome, next) = tokio::join!(self.apply_batch(&batch, *position), async move {
                store.read_all(last, size, &filter).await
            });
            let outcome = outcome?;
            if matches!(outcome, Outcome::Applied) {
                // A failed read is simply done again by the next step.
                self.prefetched = next.ok().map(|next| (last, next));
            }
            outcome
        } else {
            self.apply_batch(&batch, *position).await?
        };
        match outcome {
            Outcome::Applied => {
                let last = batch.last().map_or(*position, |e| e.position);
                *position = last;
                let n = batch.len() as u64;
                let recorded_at = batch.last().map(|e| e.recorded_at);
                self.status.send_modify(|s| {
                    s.handled += n;
                    if let Some(at) = recorded_at {
                        s.advance(last, at);
                    }
                });
            }
            Outcome::Moved(stored) => {
                tracing::warn!(projection = %self.name, %stored, "the checkpoint moved under this runner; resuming from it");
                *position = stored;
                self.status.send_modify(|s| s.position = stored);
                return Ok(true);
            }
            Outcome::Failed(error) => {
                tracing::debug!(projection = %self.name, %error, "batch failed; applying its events one by one");
                for event in &batch {
                    if !self.apply_one(event, position).await? {
                        return Ok(true);
                    }
                }
            }
        }
        if !full {
            self.status.send_modify(SubscriptionStatus::caught_up);
        }
        Ok(full)
    }

    async fn apply_batch(
        &mut self,
        batch: &[RecordedEvent],
        from: LogPosition,
    ) -> Result<Outcome, Error> {
        let mut tx = self.begin().await?;
        if let Some(stored) = self.lock_checkpoint(&mut tx, &self.name, from).await? {
            rollback(tx).await;
            return Ok(Outcome::Moved(stored));
        }
        let applied = match batch
            .iter()
            .map(RecordedEvent::decode::<P::Event>)
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(envelopes) => {
                let mut ptx = ProjectionTx::new(&mut tx, &self.tables);
                self.projection.apply_batch(&mut ptx, &envelopes).await
            }
            Err(error) => Err(error.into()),
        };
        if let Err(error) = applied {
            rollback(tx).await;
            return Ok(Outcome::Failed(error));
        }
        let last = batch.last().map_or(from, |e| e.position);
        self.save_checkpoint(&mut tx, last).await?;
        commit(tx).await?;
        Ok(Outcome::Applied)
    }

    /// Applies one event in its own transaction with retries; parks it or fails when it keeps
    /// failing. `Ok(false)` when the checkpoint moved under the runner (`position` is updated).
    async fn apply_one(
        &mut self,
        event: &RecordedEvent,
        position: &mut LogPosition,
    ) -> Result<bool, Error> {
        let mut attempt = 1;
        loop {
            let mut tx = self.begin().await?;
            if let Some(stored) = self.lock_checkpoint(&mut tx, &self.name, *position).await? {
                rollback(tx).await;
                *position = stored;
                return Ok(false);
            }
            match apply_event(&mut self.projection, &self.tables, &mut tx, event).await {
                Ok(()) => {
                    self.save_checkpoint(&mut tx, event.position).await?;
                    commit(tx).await?;
                    self.status.send_modify(|s| s.handled += 1);
                    break;
                }
                Err(error) => {
                    rollback(tx).await;
                    if attempt < self.handler_attempts {
                        tracing::debug!(projection = %self.name, position = %event.position, attempt, %error, "projection failed; retrying");
                        tokio::time::sleep(self.handler_backoff).await;
                        attempt += 1;
                        continue;
                    }
                    if !self.park {
                        return Err(Error::Handler {
                            subscription: self.name.clone(),
                            stream: event.stream_id.clone(),
                            version: event.stream_version,
                            event_type: event.event_type.clone(),
                            event_id: event.event_id,
                            position: event.position,
                            attempts: attempt,
                            source: error,
                        });
                    }
                    tracing::warn!(
                        projection = %self.name,
                        stream = %event.stream_id,
                        version = %event.stream_version,
                        position = %event.position,
                        %error,
                        "parking an event the projection keeps failing on"
                    );
                    let mut tx = self.begin().await?;
                    if let Some(stored) =
                        self.lock_checkpoint(&mut tx, &self.name, *position).await?
                    {
                        rollback(tx).await;
                        *position = stored;
                        return Ok(false);
                    }
                    sqlx::query(sqlx::AssertSqlSafe(self.sql.park.as_str()))
                        .bind(&self.name)
                        .bind(event.event_id.as_uuid())
                        .bind(render(&*error))
                        .bind(i32::try_from(attempt).unwrap_or(i32::MAX))
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| to_error(e, "park event"))?;
                    self.save_checkpoint(&mut tx, event.position).await?;
                    commit(tx).await?;
                    self.status.send_modify(|s| s.parked += 1);
                    break;
                }
            }
        }
        *position = event.position;
        self.status
            .send_modify(|s| s.advance(event.position, event.recorded_at));
        Ok(true)
    }

    /// Applies an event this projection parked (after its handler was fixed), in one transaction
    /// with its removal from the dead-letter table. `Ok(false)` when it is not parked (any more);
    /// an error (the event stays parked) when the projection still fails on it.
    pub async fn retry_parked(&mut self, event_id: EventId) -> Result<bool, Error> {
        let parked = factum::subscription::DeadLetterStore::parked(&self.store, &self.name).await?;
        let Some(parked) = parked.into_iter().find(|p| p.event.event_id == event_id) else {
            return Ok(false);
        };
        let mut tx = self.begin().await?;
        let claimed: Option<uuid::Uuid> = sqlx::query_scalar(sqlx::AssertSqlSafe(self.sql.claim_parked.as_str()))
            .bind(&self.name)
            .bind(event_id.as_uuid())
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| to_error(e, "unpark event"))?;
        if claimed.is_none() {
            rollback(tx).await;
            return Ok(false);
        }
        let event = &parked.event;
        if let Err(source) = apply_event(&mut self.projection, &self.tables, &mut tx, event).await {
            rollback(tx).await;
            return Err(Error::Handler {
                subscription: self.name.clone(),
                stream: event.stream_id.clone(),
                version: event.stream_version,
                event_type: event.event_type.clone(),
                event_id: event.event_id,
                position: event.position,
                attempts: 1,
                source,
            });
        }
        commit(tx).await?;
        self.status.send_modify(|s| {
            s.handled += 1;
            s.parked = s.parked.saturating_sub(1);
        });
        Ok(true)
    }
}

pub(crate) async fn save_checkpoint_as(
    sql: &Sql,
    conn: &mut PgConnection,
    name: &str,
    position: LogPosition,
) -> Result<(), Error> {
    sqlx::query(sqlx::AssertSqlSafe(sql.save_checkpoint.as_str()))
        .bind(name)
        .bind(to_i64(position.commit))
        .bind(to_i64(position.global.get()))
        .execute(conn)
        .await
        .map_err(|e| to_error(e, "save projection checkpoint"))?;
    Ok(())
}

/// Decodes and applies one event; a decode error is the projection's failure on that event.
pub(crate) async fn apply_event<P: PgProjection>(
    projection: &mut P,
    tables: &Tables,
    conn: &mut PgConnection,
    event: &RecordedEvent,
) -> Result<(), BoxError> {
    let envelope = event.decode::<P::Event>()?;
    let mut tx = ProjectionTx::new(conn, tables);
    projection.apply(&mut tx, &envelope).await
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
        .map_err(|e| to_error(e, "commit projection transaction"))
}

fn render(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl PostgresStore {
    /// A subscription's stored checkpoint, read directly.
    pub(crate) async fn load_checkpoint_row(
        &self,
        name: &str,
    ) -> Result<Option<LogPosition>, Error> {
        factum::subscription::CheckpointStore::load_checkpoint(self, name).await
    }
}
