//! The runner of a [`PgProjection`]: factum's one consumer loop
//! ([`Subscription`](factum::subscription::Subscription)) with PostgreSQL's checkpoint
//! transactions and lease, and a handler that applies the projection in the transaction.

use std::future::Future;
use std::time::Duration;

use factum::subscription::{
    BatchFailure, BatchHandler, ConsumerOptions, StartFrom, Subscription, SubscriptionStatus,
};
use factum::{BoxError, Error, EventFilter, EventId, EventStore, LogPosition, RecordedEvent};
use sqlx::PgConnection;
use tokio::sync::watch;

use super::{PgProjection, ProjectionTx, Tables};
use crate::error::to_error;
use crate::replica::PgReader;
use crate::store::PostgresStore;
use crate::subscription::{PgCheckpoints, PgLease, PgTx, Sql, commit, rollback};

/// The consumer a runner drives.
pub(crate) type PgConsumer<L = PgLease> = Subscription<PgReader, PgCheckpoints, L>;

/// Runs a [`PgProjection`] over the global log with exactly-once application. See the
/// [module docs](super).
pub struct PgProjectionRunner<P> {
    pub(crate) store: PostgresStore,
    /// Where the log is read: the primary, or a replica ([`read_from`](Self::read_from)).
    pub(crate) reader: PgReader,
    pub(crate) projection: P,
    pub(crate) name: String,
    pub(crate) tables: Tables,
    pub(crate) checkpoints: PgCheckpoints,
    pub(crate) consumer: PgConsumer,
}

impl<P> std::fmt::Debug for PgProjectionRunner<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgProjectionRunner")
            .field("name", &self.name)
            .field("options", self.consumer.consumer_options())
            .finish_non_exhaustive()
    }
}

impl<P: PgProjection> PgProjectionRunner<P> {
    /// A runner of `projection` over `store`, checkpointed and leased as [`PgProjection::NAME`],
    /// reading only the projection's event types, with the
    /// [default consumer options](ConsumerOptions::default).
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
    /// #     fn decode(stored: &factum::Stored<'_>) -> Result<Self, factum::DecodeError> { let (_, _, _) = (stored.event_type, stored.schema_version, stored.payload); Ok(Ping) }
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
        let checkpoints = PgCheckpoints::new(&store);
        let reader = PgReader::primary(&store);
        let consumer = Subscription::with_checkpoints(P::NAME, reader.clone(), checkpoints.clone())
            .lease(PgLease::new(&store))
            .options(Self::projection_options(ConsumerOptions::default()));
        Self {
            store,
            reader,
            projection,
            name: P::NAME.to_owned(),
            tables,
            checkpoints,
            consumer,
        }
    }

    fn with_consumer(mut self, f: impl FnOnce(PgConsumer) -> PgConsumer) -> Self {
        // A placeholder while `f` runs: the consumer is moved through the builder.
        let placeholder =
            Subscription::with_checkpoints("", self.reader.clone(), self.checkpoints.clone())
                .lease(PgLease::new(&self.store));
        let consumer = std::mem::replace(&mut self.consumer, placeholder);
        self.consumer = f(consumer);
        self
    }

    /// Reads the log through `reader` (e.g. a [`PgReader::connect`]ed streaming replica), rebuilds
    /// included; the read model, the checkpoint, dead letters and the lease stay on the runner's
    /// store. Call it before [`status`](Self::status): the consumer is rebuilt around the reader.
    ///
    /// `reader` must read the runner's database (a [`PgReader`] of the same store, or of a store
    /// on the same database and schema).
    #[must_use]
    pub fn read_from(mut self, reader: PgReader) -> Self {
        let options = self.consumer.consumer_options().clone();
        self.consumer =
            Subscription::with_checkpoints(P::NAME, reader.clone(), self.checkpoints.clone())
                .lease(PgLease::new(&self.store))
                .options(options);
        self.reader = reader;
        self
    }

    /// Where the runner reads the log.
    pub fn reader(&self) -> &PgReader {
        &self.reader
    }

    /// Replaces the consumer options (see [`ConsumerOptions`]; the builder methods below are
    /// shortcuts). The projection's event types stay the source filter, narrowed by the
    /// options' filter.
    #[must_use]
    pub fn options(self, options: ConsumerOptions) -> Self {
        let options = Self::projection_options(options);
        self.with_consumer(|c| c.options(options))
    }

    /// `options` narrowed to the projection's event types, with its known events.
    fn projection_options(options: ConsumerOptions) -> ConsumerOptions {
        let options = options.filter(EventFilter::for_event::<P::Event>());
        match P::known_events() {
            Some(known) => options.known_events(known),
            None => options,
        }
    }

    /// Where to start: see [`ConsumerOptions::start_from`]. `Beginning` and `After` move the
    /// stored checkpoint: the read model should be empty (or a rebuild used).
    #[must_use]
    pub fn start_from(self, start: StartFrom) -> Self {
        self.with_consumer(|c| c.start_from(start))
    }

    /// Narrows the events read further (the projection's event types stay the filter), e.g. to
    /// some stream categories: see [`ConsumerOptions::filter`].
    #[must_use]
    pub fn filter(self, filter: EventFilter) -> Self {
        self.with_consumer(|c| c.filter(filter))
    }

    /// Events per batch, and per transaction: see [`ConsumerOptions::batch_size`].
    #[must_use]
    pub fn batch_size(self, size: usize) -> Self {
        self.with_consumer(|c| c.batch_size(size))
    }

    /// Polling while idle: see [`ConsumerOptions::idle_backoff`].
    #[must_use]
    pub fn idle_backoff(self, min: Duration, max: Duration) -> Self {
        self.with_consumer(|c| c.idle_backoff(min, max))
    }

    /// How often an instance in standby tries to take the lease over: see
    /// [`ConsumerOptions::standby_poll`].
    #[must_use]
    pub fn standby_poll(self, every: Duration) -> Self {
        self.with_consumer(|c| c.standby_poll(every))
    }

    /// Handler retries: see [`ConsumerOptions::handler_retries`].
    #[must_use]
    pub fn handler_retries(self, attempts: u32, backoff: Duration) -> Self {
        self.with_consumer(|c| c.handler_retries(attempts, backoff))
    }

    /// Head lookups while behind: see [`ConsumerOptions::track_head`].
    #[must_use]
    pub fn track_head(self, on: bool) -> Self {
        self.with_consumer(|c| c.track_head(on))
    }

    /// Parks events the projection keeps failing on in the dead-letter table (in the transaction
    /// that moves the checkpoint past them) and goes on, instead of stopping.
    #[must_use]
    pub fn park_failures(self) -> Self {
        self.with_consumer(Subscription::park_failures)
    }

    /// The projection's name (its checkpoint's and lease's key).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The options the runner consumes the log with.
    pub fn consumer_options(&self) -> &ConsumerOptions {
        self.consumer.consumer_options()
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
        self.consumer.status()
    }

    /// Takes the lease (waiting while another instance holds it), applies every event up to the
    /// current end of the log, releases the lease, and returns the position reached: see
    /// [`Subscription::catch_up`].
    pub async fn catch_up(&mut self) -> Result<LogPosition, Error> {
        let projector = PgProjector::new(&mut self.projection, &self.tables);
        self.consumer.catch_up(projector).await
    }

    /// Takes the lease (waiting in standby while another instance holds it), catches up, then
    /// follows new events until `shutdown` completes (between batches) or the projection fails
    /// (and failures are not parked): see [`Subscription::run`].
    pub async fn run(
        &mut self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<LogPosition, Error> {
        let projector = PgProjector::new(&mut self.projection, &self.tables);
        self.consumer.run(projector, shutdown).await
    }

    pub(crate) fn sql(&self) -> &Sql {
        self.checkpoints.sql()
    }

    /// The newest settled position of the log.
    pub(crate) async fn head(&self) -> Result<LogPosition, Error> {
        self.reader.head().await
    }

    async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, Error> {
        crate::tx::begin(self.store.pool())
            .await
            .map_err(|e| to_error(e, "begin projection transaction"))
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
        let claimed: Option<uuid::Uuid> =
            sqlx::query_scalar(sqlx::AssertSqlSafe(self.sql().claim_parked.as_str()))
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
        Ok(true)
    }
}

/// A [`PgProjection`] as a batch handler in the consumer's transaction, writing to `tables`.
pub(crate) struct PgProjector<'a, P> {
    projection: &'a mut P,
    tables: &'a Tables,
}

impl<'a, P: PgProjection> PgProjector<'a, P> {
    pub(crate) fn new(projection: &'a mut P, tables: &'a Tables) -> Self {
        Self { projection, tables }
    }
}

impl<P: PgProjection> BatchHandler<PgTx> for PgProjector<'_, P> {
    async fn handle_batch(
        &mut self,
        tx: &mut PgTx,
        events: &[RecordedEvent],
    ) -> Result<(), BatchFailure> {
        // Decode up to the first event that does not: the events before it are applied (and
        // checkpointed), the consumer then deals with that one alone.
        let mut envelopes = Vec::with_capacity(events.len());
        let mut undecodable = None;
        for (i, event) in events.iter().enumerate() {
            match event.decode_all::<P::Event>() {
                Ok(decoded) => envelopes.extend(decoded),
                Err(error) => {
                    undecodable = Some((i, error));
                    break;
                }
            }
        }
        if !envelopes.is_empty() {
            let mut ptx = ProjectionTx::new(tx.conn(), self.tables);
            self.projection
                .apply_batch(&mut ptx, &envelopes)
                .await
                .map_err(BatchFailure::somewhere)?;
        }
        match undecodable {
            Some((i, error)) => Err(BatchFailure::at(i, error)),
            None => Ok(()),
        }
    }

    async fn handle_one(&mut self, tx: &mut PgTx, event: &RecordedEvent) -> Result<(), BoxError> {
        apply_event(self.projection, self.tables, tx.conn(), event).await
    }
}

/// Decodes and applies one event; a decode error is the projection's failure on that event.
pub(crate) async fn apply_event<P: PgProjection>(
    projection: &mut P,
    tables: &Tables,
    conn: &mut PgConnection,
    event: &RecordedEvent,
) -> Result<(), BoxError> {
    let decoded = event.decode_all::<P::Event>()?;
    let mut tx = ProjectionTx::new(conn, tables);
    for envelope in decoded {
        projection.apply(&mut tx, &envelope).await?;
    }
    Ok(())
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
