//! Read replicas: [`PgReader`], the read side of a store, on a streaming replica (or on the
//! primary itself, so the same code runs with or without one).
//!
//! What may read a replica, and what may not:
//! * **Commands stay on the primary**: a command loads a stream and appends with the version it
//!   loaded, checks idempotency keys and saves snapshots; on a replica the load would be stale and
//!   every append would conflict. So [`PgReader`] refuses to append, and answers
//!   [`idempotency_outcome`](EventStore::idempotency_outcome) from the primary: run commands on the
//!   [`PostgresStore`] of the primary.
//! * **Subscriptions read the replica, and write on the primary**: [`read_all`], [`head`] and
//!   [`position_at`] read the replica; checkpoints and dead letters
//!   ([`CheckpointStore`], [`DeadLetterStore`]) go to the primary, and so do the checkpoint
//!   transactions and leases a subscription is given ([`PgCheckpoints`](crate::subscription::PgCheckpoints)
//!   and [`PgLease`](crate::subscription::PgLease) of the primary store).
//! * **Queries read the replica**: [`pool`](PgReader::pool) for read models' own tables,
//!   [`read_stream`](EventStore::read_stream) for histories; they see the replica's state, up to
//!   [`lag`](PgReader::lag) behind.
//!
//! The gap-safe horizon holds on a hot standby: its `pg_current_snapshot()` is built from the
//! transaction ids it has seen in the primary's WAL, and the standby counts as in flight every id
//! below the newest it has seen that it has not seen end, even an id that has written nothing yet.
//! So a reader of the replica never passes a transaction that may still commit on the primary;
//! the book's replica chapter shows the measurement and `tests/replica.rs` the test.
//!
//! [`read_all`]: EventStore::read_all
//! [`head`]: EventStore::head
//! [`position_at`]: EventStore::position_at

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use factum::health::{Check, Readiness};
use factum::subscription::{CheckpointStore, DeadLetterStore, ParkedEvent};
use factum::{
    AppendRequest, AppendResult, Error, EventFilter, EventId, EventStore, EventStream,
    IdempotencyKey, LogPosition, PayloadStream, RecordedEvent, ReplicaLag, StreamId, StreamVersion,
};
use sqlx::PgPool;

use crate::config::{GroupCommit, PoolConfig};
use crate::error::to_error;
use crate::store::PostgresStore;

/// How often, at most, a [`PgReader`] measures its replica's lag while it reads (default).
pub const LAG_INTERVAL: Duration = Duration::from_secs(1);

/// The read side of a [`PostgresStore`]: the global log, streams and queries, read from a
/// streaming replica ([`connect`](Self::connect)) or from the primary itself
/// ([`primary`](Self::primary)). See the [module docs](self) for what may read a replica.
///
/// It is an [`EventStore`] that reads and never appends, and a [`CheckpointStore`] and
/// [`DeadLetterStore`] on the primary, so every consumer takes it where it takes a store:
///
/// ```no_run
/// use factum::subscription::{BatchFailure, BatchHandler, Subscription};
/// use factum::RecordedEvent;
/// use factum_postgres::subscription::{PgCheckpoints, PgLease, PgTx};
/// use factum_postgres::{PgReader, PoolConfig, PostgresStore};
///
/// struct Seen;
/// impl BatchHandler<PgTx> for Seen {
///     async fn handle_batch(&mut self, tx: &mut PgTx, events: &[RecordedEvent]) -> Result<(), BatchFailure> {
///         let ids: Vec<uuid::Uuid> = events.iter().map(|e| e.event_id.as_uuid()).collect();
///         sqlx::query("INSERT INTO seen SELECT unnest($1::uuid[])")
///             .bind(ids)
///             .execute(tx.conn()) // on the primary, with the checkpoint
///             .await
///             .map_err(BatchFailure::somewhere)?;
///         Ok(())
///     }
/// }
///
/// # async fn run() -> Result<(), factum::Error> {
/// let config = PoolConfig::default();
/// let store = PostgresStore::connect_with("postgres://app@primary/shop", &config, Default::default()).await?;
/// let reader = PgReader::connect(&store, "postgres://app@replica/shop", &config).await?;
///
/// // Reads the replica; checkpoints, effects and the lease on the primary.
/// let mut subscription = Subscription::with_checkpoints("seen", reader.clone(), PgCheckpoints::new(&store))
///     .lease(PgLease::new(&store));
/// let status = subscription.status(); // status.borrow().replica_lag: how stale the replica is
/// subscription.run(Seen, std::future::pending::<()>()).await?;
/// # drop(status); Ok(()) }
/// ```
#[derive(Clone)]
pub struct PgReader {
    inner: Arc<Inner>,
}

struct Inner {
    primary: PostgresStore,
    /// A store on the replica's pool, in the primary's schema; `None` reads the primary.
    replica: Option<PostgresStore>,
    lag_interval: Duration,
    lag: Mutex<LagState>,
}

#[derive(Default)]
struct LagState {
    last: Option<ReplicaLag>,
    /// When a measurement last started (one at a time, at most one per interval).
    started: Option<Instant>,
    /// The last moment the replica was seen to have applied everything the primary had written.
    caught_up_at: Option<Instant>,
}

impl std::fmt::Debug for PgReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgReader")
            .field("schema", self.inner.primary.schema())
            .field("replica", &self.is_replica())
            .finish_non_exhaustive()
    }
}

/// What the replica reports about its replay, and the primary about its WAL, in one
/// measurement.
struct Sample {
    primary_lsn: i64,
    primary_clock: DateTime<Utc>,
    primary_started: DateTime<Utc>,
    in_recovery: bool,
    replay_lsn: Option<i64>,
    replay_at: Option<DateTime<Utc>>,
    replica_started: DateTime<Utc>,
}

const PRIMARY_SQL: &str = "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::int8, clock_timestamp(), \
     pg_postmaster_start_time()";
const REPLICA_SQL: &str = "SELECT pg_is_in_recovery(), \
     (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::int8, pg_last_xact_replay_timestamp(), \
     pg_postmaster_start_time()";
const IDENTITY_SQL: &str =
    "SELECT (SELECT system_identifier FROM pg_control_system())::text, current_database()::text";

impl PgReader {
    /// A reader of the primary itself: every read goes to `store`, and there is no lag. For
    /// code that takes a reader, run where there is no replica.
    pub fn primary(store: &PostgresStore) -> Self {
        Self::build(store, None)
    }

    /// A reader of the streaming replica at `url` (a hot standby of `primary`'s cluster, the same
    /// database name), with a pool built from `config`.
    ///
    /// Fails with [`Error::InvalidArgument`] when the server at `url` is not a copy of the
    /// primary's database: another cluster (its system identifier differs) or another database.
    ///
    /// Build it from the store as it will be used: a store given a shredder (feature
    /// `personal`) first, so that reads on the replica decrypt personal fields too.
    pub async fn connect(
        primary: &PostgresStore,
        url: &str,
        config: &PoolConfig,
    ) -> Result<Self, Error> {
        let pool = config.connect(url).await?;
        Self::on_replica(primary, pool).await
    }

    /// A reader of the replica behind `pool`, checked like [`connect`](Self::connect).
    pub async fn on_replica(primary: &PostgresStore, pool: PgPool) -> Result<Self, Error> {
        let ident = |pool: PgPool| async move {
            sqlx::query_as::<_, (String, String)>(IDENTITY_SQL)
                .fetch_one(&pool)
                .await
                .map_err(|e| to_error(e, "identify the replica"))
        };
        let (theirs, ours) = tokio::try_join!(ident(pool.clone()), ident(primary.pool().clone()))?;
        if theirs.0 != ours.0 {
            return Err(Error::InvalidArgument(format!(
                "the replica is not a copy of the primary's cluster (system identifier {} there, {} on the primary): point the replica URL at a standby of the primary",
                theirs.0, ours.0
            )));
        }
        if theirs.1 != ours.1 {
            return Err(Error::InvalidArgument(format!(
                "the replica URL names database `{}`, the primary's is `{}`: a replica reads the same database",
                theirs.1, ours.1
            )));
        }
        Ok(Self::build(primary, Some(pool)))
    }

    fn build(primary: &PostgresStore, replica: Option<PgPool>) -> Self {
        let replica = replica.map(|pool| {
            // Reads only: no group-commit queue.
            let options = primary
                .options()
                .clone()
                .with_group_commit(GroupCommit::disabled());
            #[allow(
                unused_mut,
                reason = "a shredder is carried over with the `personal` feature"
            )]
            let mut store = PostgresStore::with_options(pool, options);
            // Reads on the replica decrypt personal fields as the primary's do.
            #[cfg(feature = "personal")]
            if let Some(shredder) = primary.shredder() {
                store.set_shredder(shredder.clone());
            }
            store
        });
        Self {
            inner: Arc::new(Inner {
                primary: primary.clone(),
                replica,
                lag_interval: LAG_INTERVAL,
                lag: Mutex::default(),
            }),
        }
    }

    /// Measures the replica's lag at most once per `interval` while reading the log (default
    /// [`LAG_INTERVAL`]); each measurement is a round trip to the primary and one to the
    /// replica, overlapping the read. Set it on a new reader, before cloning it.
    #[must_use]
    pub fn with_lag_interval(self, interval: Duration) -> Self {
        let inner = Inner {
            primary: self.inner.primary.clone(),
            replica: self.inner.replica.clone(),
            lag_interval: interval,
            lag: Mutex::default(),
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// The pool reads go to: the replica's, or the primary's for a [`primary`](Self::primary)
    /// reader. For queries of read models; never for writes (a standby refuses them).
    pub fn pool(&self) -> &PgPool {
        self.reads().pool()
    }

    /// The primary's store: where commands, checkpoints and projections write.
    pub fn primary_store(&self) -> &PostgresStore {
        &self.inner.primary
    }

    /// True when reads go to a replica.
    pub fn is_replica(&self) -> bool {
        self.inner.replica.is_some()
    }

    fn reads(&self) -> &PostgresStore {
        self.inner.replica.as_ref().unwrap_or(&self.inner.primary)
    }

    /// Measures how far the replica trails the primary now (zero for a
    /// [`primary`](Self::primary) reader): bytes of WAL between the primary's current position
    /// and the replica's replay position, and an upper bound on how stale its reads are (the
    /// shorter of: since it was last seen caught up; since the primary committed the last
    /// transaction the replica applied).
    ///
    /// Fails with a permanent error when the replica is no longer in recovery and is not the
    /// primary's server (a standby promoted while this primary still runs): reading it would
    /// miss the primary's writes.
    pub async fn lag(&self) -> Result<ReplicaLag, Error> {
        if self.inner.replica.is_none() {
            return Ok(ReplicaLag::new(Some(Duration::ZERO), 0));
        }
        let sent = Instant::now();
        let sample = self.sample().await?;
        let lag = self.judge(&sample, sent)?;
        self.inner
            .lag
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last = Some(lag);
        Ok(lag)
    }

    async fn sample(&self) -> Result<Sample, Error> {
        let replica = self.reads();
        // The primary first: what the replica has applied is compared with what the primary had
        // written before the replica was asked.
        let (primary_lsn, primary_clock, primary_started): (i64, DateTime<Utc>, DateTime<Utc>) =
            sqlx::query_as(PRIMARY_SQL)
                .fetch_one(self.inner.primary.pool())
                .await
                .map_err(|e| to_error(e, "measure the replica lag (primary)"))?;
        let (in_recovery, replay_lsn, replay_at, replica_started): (
            bool,
            Option<i64>,
            Option<DateTime<Utc>>,
            DateTime<Utc>,
        ) = sqlx::query_as(REPLICA_SQL)
            .fetch_one(replica.pool())
            .await
            .map_err(|e| to_error(e, "measure the replica lag (replica)"))?;
        Ok(Sample {
            primary_lsn,
            primary_clock,
            primary_started,
            in_recovery,
            replay_lsn,
            replay_at,
            replica_started,
        })
    }

    fn judge(&self, sample: &Sample, sent: Instant) -> Result<ReplicaLag, Error> {
        let mut state = self.inner.lag.lock().unwrap_or_else(|p| p.into_inner());
        if !sample.in_recovery {
            if sample.replica_started == sample.primary_started {
                // The "replica" is the primary's own server (one server in development).
                state.caught_up_at = Some(sent);
                return Ok(ReplicaLag::new(Some(Duration::ZERO), 0));
            }
            return Err(Error::permanent(
                "read the replica",
                "the replica is not in recovery and is not the primary's server (a promoted standby?): it no longer receives the primary's writes; point the reader at a standby of the current primary",
            ));
        }
        let bytes = sample
            .primary_lsn
            .saturating_sub(sample.replay_lsn.unwrap_or(0))
            .max(0);
        if bytes == 0 {
            state.caught_up_at = Some(sent);
            return Ok(ReplicaLag::new(Some(Duration::ZERO), 0));
        }
        // Both bounds are upper bounds: the primary's clock now is at most its reading plus the
        // time since the request was sent.
        let since_caught_up = state.caught_up_at.map(|at| at.elapsed());
        let since_replayed = sample.replay_at.map(|at| {
            let primary_now = sample.primary_clock
                + chrono::Duration::from_std(sent.elapsed()).unwrap_or_default();
            (primary_now - at).to_std().unwrap_or(Duration::ZERO)
        });
        let time = match (since_caught_up, since_replayed) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Ok(ReplicaLag::new(time, u64::try_from(bytes).unwrap_or(0)))
    }

    /// Measures the lag when the last measurement is older than the interval (and none is
    /// running). A failed measurement is logged (the read decides); a promoted replica fails.
    async fn refresh_lag(&self) -> Result<(), Error> {
        {
            let mut state = self.inner.lag.lock().unwrap_or_else(|p| p.into_inner());
            if state
                .started
                .is_some_and(|at| at.elapsed() < self.inner.lag_interval)
            {
                return Ok(());
            }
            state.started = Some(Instant::now());
        }
        let sent = Instant::now();
        match self.sample().await {
            Ok(sample) => {
                let lag = self.judge(&sample, sent)?;
                self.inner
                    .lag
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .last = Some(lag);
            }
            Err(error) => {
                tracing::debug!(%error, "could not measure the replica lag; keeping the last measurement");
            }
        }
        Ok(())
    }

    /// Waits until the replica has applied everything the primary had committed when this was
    /// called (read-your-writes for a query after a command), at most `timeout`. Returns whether
    /// it got there; `true` at once for a [`primary`](Self::primary) reader.
    pub async fn wait_for_primary(&self, timeout: Duration) -> Result<bool, Error> {
        let Some(replica) = &self.inner.replica else {
            return Ok(true);
        };
        let target: i64 =
            sqlx::query_scalar("SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::int8")
                .fetch_one(self.inner.primary.pool())
                .await
                .map_err(|e| to_error(e, "read the primary's WAL position"))?;
        let started = Instant::now();
        let mut delay = Duration::from_millis(1);
        loop {
            let replayed: Option<i64> =
                sqlx::query_scalar("SELECT (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::int8")
                    .fetch_one(replica.pool())
                    .await
                    .map_err(|e| to_error(e, "read the replica's replay position"))?;
            if replayed.is_some_and(|r| r >= target) {
                return Ok(true);
            }
            if started.elapsed() + delay > timeout {
                return Ok(false);
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(50));
        }
    }

    /// The readiness check `replica`: measures the lag now and passes while it is within
    /// `max_lag` ([`Readiness::replica`]); a [`primary`](Self::primary) reader always passes.
    pub async fn readiness_check(&self, max_lag: Duration) -> Check {
        let readiness = match self.lag().await {
            Ok(lag) => Readiness::new().replica("", Some(&lag), max_lag),
            Err(error) => Readiness::new().check("replica", false, error.to_string()),
        };
        let mut check = readiness.checks()[0].clone();
        check.name = "replica".to_owned();
        check
    }
}

fn refused() -> Error {
    Error::InvalidArgument(
        "a PgReader does not append: commands load and append on the primary, through its PostgresStore (a replica's state is stale, so its version checks would fail)".to_owned(),
    )
}

impl EventStore for PgReader {
    /// Refused: commands run on the primary's [`PostgresStore`].
    async fn append(&self, _request: AppendRequest) -> Result<AppendResult, Error> {
        Err(refused())
    }

    /// Asked of the primary: a replica may not have the key yet.
    fn idempotency_outcome(
        &self,
        key: &IdempotencyKey,
    ) -> impl Future<Output = Result<Option<AppendResult>, Error>> + Send {
        self.inner.primary.idempotency_outcome(key)
    }

    fn read_stream<'a>(&'a self, stream: &'a StreamId, after: StreamVersion) -> EventStream<'a> {
        self.reads().read_stream(stream, after)
    }

    fn read_stream_payloads<'a>(
        &'a self,
        stream: &'a StreamId,
        after: StreamVersion,
    ) -> PayloadStream<'a> {
        self.reads().read_stream_payloads(stream, after)
    }

    async fn read_all(
        &self,
        after: LogPosition,
        limit: usize,
        filter: &EventFilter,
    ) -> Result<Vec<RecordedEvent>, Error> {
        let Some(replica) = &self.inner.replica else {
            return self.inner.primary.read_all(after, limit, filter).await;
        };
        // The replica's own gap-safe read: its snapshot's horizon is safe on a hot standby.
        let (page, lag) = tokio::join!(replica.read_all(after, limit, filter), self.refresh_lag());
        lag?;
        page
    }

    fn head(&self) -> impl Future<Output = Result<LogPosition, Error>> + Send {
        self.reads().head()
    }

    fn position_at(
        &self,
        time: DateTime<Utc>,
    ) -> impl Future<Output = Result<LogPosition, Error>> + Send {
        self.reads().position_at(time)
    }

    fn replica_lag(&self) -> Option<ReplicaLag> {
        self.inner.replica.as_ref()?;
        self.inner
            .lag
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last
    }
}

/// Checkpoints on the primary.
impl CheckpointStore for PgReader {
    fn load_checkpoint(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<LogPosition>, Error>> + Send {
        self.inner.primary.load_checkpoint(name)
    }

    fn save_checkpoint(
        &self,
        name: &str,
        position: LogPosition,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        self.inner.primary.save_checkpoint(name, position)
    }
}

/// Dead letters on the primary.
impl DeadLetterStore for PgReader {
    fn park(&self, parked: ParkedEvent) -> impl Future<Output = Result<(), Error>> + Send {
        self.inner.primary.park(parked)
    }

    fn parked(
        &self,
        subscription: &str,
    ) -> impl Future<Output = Result<Vec<ParkedEvent>, Error>> + Send {
        self.inner.primary.parked(subscription)
    }

    fn unpark(
        &self,
        subscription: &str,
        event_id: EventId,
    ) -> impl Future<Output = Result<Option<ParkedEvent>, Error>> + Send {
        self.inner.primary.unpark(subscription, event_id)
    }
}
