//! Subscriptions: checkpointed consumers of the global log.
//!
//! A [`Subscription`] reads the global log in batches from where it left off, hands each event to
//! an [`EventHandler`], and saves its checkpoint after each batch. It catches up, then follows new
//! events with adaptive polling: straight on while there is work, backing off (up to
//! [`idle_backoff`](Subscription::idle_backoff)'s maximum) while the log is quiet. Because backends
//! only return events that can no longer be preceded by a late commit, a subscription never skips
//! an event.
//!
//! Delivery is **at least once**: after a crash, the events of the batch in progress are handed
//! over again. Handlers receive the event id to make their effects idempotent. (Backends can offer
//! exactly-once projections by storing the read model and the checkpoint in one transaction.)
//!
//! A handler error is retried; if it persists, the subscription either stops with
//! [`Error::Handler`] (the default: nothing after the event is handled, and a restart resumes at
//! it) or, with [`park_failures`](Subscription::park_failures), parks the event in the
//! [`DeadLetterStore`] and goes on.
//!
//! # One runtime
//! `Subscription` is factum's one consumer loop: the PostgreSQL projection runner and its
//! rebuild run on it too. Every consumer takes the same [`ConsumerOptions`]; what a backend does
//! differently is a capability the loop is generic over:
//! * a [`TransactionalCheckpoint`]: where the handler's effects, the checkpoint and parked
//!   events commit together ([`StoreCheckpoints`] for any store; PostgreSQL's `PgCheckpoints`
//!   for exactly-once effects);
//! * a [`Lease`]: which one of several instances works ([`NoLease`], [`InMemoryLease`];
//!   PostgreSQL's `PgLease`);
//! * a [`BatchHandler`]: handlers may take whole batches; an [`EventHandler`] is the per-event
//!   case.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use factum::subscription::{EventHandler, Subscription};
//! use factum::{BoxError, EventStore, ExpectedVersion, InMemoryStore, NewEvent, RecordedEvent, StreamId};
//!
//! struct Count(usize);
//! impl EventHandler for Count {
//!     async fn handle(&mut self, _event: &RecordedEvent) -> Result<(), BoxError> {
//!         self.0 += 1;
//!         Ok(())
//!     }
//! }
//!
//! let store = InMemoryStore::new();
//! # let event = || NewEvent { event_id: factum::EventId::new(), event_type: "x.y".into(), schema_version: 1,
//! #     payload: factum::RawValue::from_string("{}".into()).unwrap(), metadata: Default::default() };
//! store.append(factum::AppendRequest::new(StreamId::new("x-1")?, vec![event(), event()])).await?;
//!
//! let mut counter = Count(0);
//! let mut subscription = Subscription::new("counter", store.clone());
//! let position = subscription.catch_up(&mut counter).await?;
//! assert_eq!(counter.0, 2);
//! assert_eq!(position, store.head());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

mod checkpoint;
mod handler;
mod known;
mod lease;
mod options;
mod store;
mod telemetry;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::FutureExt as _;
use tokio::sync::watch;

pub use checkpoint::{Begun, StoreCheckpoints, TransactionalCheckpoint};
pub use handler::{BatchFailure, BatchHandler, EventHandler, Projector};
pub use known::KnownEvents;
pub use lease::{InMemoryLease, InMemoryLeaseGuard, Lease, NoLease};
pub use options::ConsumerOptions;
pub use store::{
    CheckpointStore, DeadLetterStore, DynCheckpointStore, DynDeadLetterStore, ParkedEvent,
};
pub use telemetry::{export_metrics, record_metrics};

use crate::error::{BoxError, Error};
use crate::event::RecordedEvent;
use crate::ids::LogPosition;
use crate::projection::Projection;
use crate::store::{EventFilter, EventStore};

/// Where a subscription without a checkpoint starts.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum StartFrom {
    /// From its checkpoint if it has one, else from the start of the log (the default).
    Checkpoint,
    /// From the start of the log, ignoring any checkpoint (a replay).
    Beginning,
    /// From the end of the log at start-up: only events stored afterwards, unless it has a
    /// checkpoint.
    Now,
    /// After a given position, ignoring any checkpoint.
    After(LogPosition),
    /// From the first event recorded at or after a time, ignoring any checkpoint (a replay from
    /// a point in time; see [`EventStore::position_at`]).
    Time(DateTime<Utc>),
}

/// What a subscription is doing.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum SubscriptionState {
    /// Not started yet.
    Starting,
    /// Reading full batches: behind the head of the log.
    CatchingUp,
    /// Caught up; polling for new events.
    Live,
    /// Waiting: another instance of the same consumer holds its lease (a PostgreSQL advisory
    /// lock, for instance) and applies the events; this one takes over when that one stops.
    Standby,
    /// Stopped on request.
    Stopped,
    /// Stopped on an error (the message says which event and why).
    Failed(String),
    /// Waiting to try again after the store failed in a way that may pass (a lost connection,
    /// an unavailable database; the message says which). It resumes from the last position it
    /// reached, with backoff from 100 ms doubling up to 10 s; see [`retries_after`].
    Retrying(String),
}

/// The first wait before a subscription or projection runner tries its store again.
pub const RETRY_MIN: Duration = Duration::from_millis(100);
/// The longest wait between two tries.
pub const RETRY_MAX: Duration = Duration::from_secs(10);

/// Whether a consumer of the log waits and tries again after `error` instead of stopping: the
/// store's transient, unavailable and unknown-outcome failures (see [`ErrorKind`]). A handler's
/// error, bad data or any other permanent failure stops it with
/// [`SubscriptionState::Failed`].
///
/// [`ErrorKind`]: crate::ErrorKind
pub fn retries_after(error: &Error) -> bool {
    matches!(
        error.kind(),
        crate::ErrorKind::Transient
            | crate::ErrorKind::Unavailable
            | crate::ErrorKind::UnknownOutcome
    )
}

/// A subscription's health, published as it runs ([`Subscription::status`]).
///
/// Lag is measured two ways: in events (global positions between the subscription's position
/// and the head of the log it last saw) and in time (how long ago the last event it handled was
/// recorded, while it is behind). Both are zero once it is caught up.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct SubscriptionStatus {
    /// What it is doing.
    pub state: SubscriptionState,
    /// The position of the last event it handled (or skipped past).
    pub position: LogPosition,
    /// The head of the log when last looked at: refreshed when the consumer falls behind (a
    /// full batch, with [`track_head`](ConsumerOptions::track_head), the default),
    /// and equal to [`position`](Self::position) once it is caught up.
    pub head: LogPosition,
    /// Roughly how many events it is behind: global positions between `position` and `head`
    /// (an upper bound: filtered-out events and rolled-back positions count too).
    pub lag_events: u64,
    /// How far behind it is in time: now minus when the last handled event was recorded, while
    /// it is behind; zero once it is caught up.
    pub lag: Duration,
    /// When the last handled event was recorded.
    pub last_event_at: Option<DateTime<Utc>>,
    /// How many events it handled since it started.
    pub handled: u64,
    /// How many events it parked since it started.
    pub parked: u64,
    /// How far the replica it reads trails the primary, when its store reads a replica
    /// ([`EventStore::replica_lag`], refreshed after every read): the staleness that `lag` does
    /// not show, since `lag` is measured against what the replica has applied.
    pub replica_lag: Option<crate::ReplicaLag>,
}

impl SubscriptionStatus {
    /// The status of a consumer that has not started yet, at `position`.
    pub fn starting(position: LogPosition) -> Self {
        Self {
            state: SubscriptionState::Starting,
            position,
            head: position,
            lag_events: 0,
            lag: Duration::ZERO,
            last_event_at: None,
            handled: 0,
            parked: 0,
            replica_lag: None,
        }
    }

    fn set_head(&mut self, head: LogPosition) {
        self.head = head.max(self.position);
        self.lag_events = self
            .head
            .global
            .get()
            .saturating_sub(self.position.global.get());
    }

    fn advance(&mut self, position: LogPosition, recorded_at: DateTime<Utc>) {
        self.position = position;
        self.head = self.head.max(position);
        self.lag_events = self.head.global.get().saturating_sub(position.global.get());
        self.last_event_at = Some(recorded_at);
        self.lag = (Utc::now() - recorded_at)
            .to_std()
            .unwrap_or(Duration::ZERO);
    }

    fn caught_up(&mut self) {
        self.state = SubscriptionState::Live;
        self.head = self.head.max(self.position);
        self.lag_events = 0;
        self.lag = Duration::ZERO;
    }
}

/// A named, checkpointed consumer of the global log: **the** consumer loop of factum. See the
/// [module docs](self).
///
/// `S` is where events are read, `C` the [`TransactionalCheckpoint`] (by default
/// [`StoreCheckpoints`] over the store), `L` the [`Lease`] (by default [`NoLease`]). The
/// PostgreSQL projection runner and its rebuild are this loop with PostgreSQL's checkpoint
/// transactions and advisory-lock lease.
pub struct Subscription<S, C = StoreCheckpoints<S>, L = NoLease> {
    name: String,
    store: S,
    checkpoints: C,
    lease: L,
    options: ConsumerOptions,
    status: watch::Sender<SubscriptionStatus>,
}

impl<S, C, L> std::fmt::Debug for Subscription<S, C, L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("name", &self.name)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<S: EventStore + CheckpointStore + DeadLetterStore + Clone> Subscription<S> {
    /// A subscription called `name` (the key of its checkpoint, dead letters and lease) over
    /// `store`, which also keeps its checkpoint and dead letters; the
    /// [default options](ConsumerOptions::default).
    pub fn new(name: impl Into<String>, store: S) -> Self {
        let checkpoints = StoreCheckpoints::new(store.clone());
        Self::with_checkpoints(name, store, checkpoints)
    }

    /// A subscription feeding projection `P`: named [`Projection::NAME`], handling the wire
    /// names of [`Projection::Event`], with [`Projection::known_events`] if it declares them
    /// (then it reads whole categories and stops on, or parks, an event of a type nothing
    /// registers). Run it with a [`Projector`].
    pub fn for_projection<P: Projection>(store: S) -> Self {
        let subscription = Self::new(P::NAME, store).filter(EventFilter::for_event::<P::Event>());
        match P::known_events() {
            Some(known) => {
                let options = subscription.options.clone().known_events(known);
                subscription.options(options)
            }
            None => subscription,
        }
    }
}

impl<S: EventStore, C: TransactionalCheckpoint> Subscription<S, C> {
    /// A subscription called `name` over `store`, moving its checkpoint with `checkpoints` (e.g.
    /// PostgreSQL transactions the handler writes in); the
    /// [default options](ConsumerOptions::default).
    pub fn with_checkpoints(name: impl Into<String>, store: S, checkpoints: C) -> Self {
        let (status, _) = watch::channel(SubscriptionStatus::starting(LogPosition::START));
        Self {
            name: name.into(),
            store,
            checkpoints,
            lease: NoLease,
            options: ConsumerOptions::default(),
            status,
        }
    }
}

impl<S: EventStore, C: TransactionalCheckpoint, L: Lease> Subscription<S, C, L> {
    /// Runs only while holding `lease` (keyed by the subscription's name): of several instances,
    /// one works, the others wait in [`SubscriptionState::Standby`] and take over when it stops
    /// or loses the lease.
    pub fn lease<L2: Lease>(self, lease: L2) -> Subscription<S, C, L2> {
        Subscription {
            name: self.name,
            store: self.store,
            checkpoints: self.checkpoints,
            lease,
            options: self.options,
            status: self.status,
        }
    }

    /// Replaces the options (see [`ConsumerOptions`]; the builder methods below are shortcuts).
    #[must_use]
    pub fn options(mut self, options: ConsumerOptions) -> Self {
        self.options = options;
        self
    }

    /// Narrows the events read (at the source): see [`ConsumerOptions::filter`].
    #[must_use]
    pub fn filter(mut self, filter: EventFilter) -> Self {
        self.options = self.options.filter(filter);
        self
    }

    /// Where to start: see [`ConsumerOptions::start_from`].
    #[must_use]
    pub fn start_from(mut self, start: StartFrom) -> Self {
        self.options = self.options.start_from(start);
        self
    }

    /// Events per batch: see [`ConsumerOptions::batch_size`].
    #[must_use]
    pub fn batch_size(mut self, size: usize) -> Self {
        self.options = self.options.batch_size(size);
        self
    }

    /// Polling while idle: see [`ConsumerOptions::idle_backoff`].
    #[must_use]
    pub fn idle_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.options = self.options.idle_backoff(min, max);
        self
    }

    /// Lease retries in standby: see [`ConsumerOptions::standby_poll`].
    #[must_use]
    pub fn standby_poll(mut self, every: Duration) -> Self {
        self.options = self.options.standby_poll(every);
        self
    }

    /// Handler retries: see [`ConsumerOptions::handler_retries`].
    #[must_use]
    pub fn handler_retries(mut self, attempts: u32, backoff: Duration) -> Self {
        self.options = self.options.handler_retries(attempts, backoff);
        self
    }

    /// Head lookups while behind: see [`ConsumerOptions::track_head`].
    #[must_use]
    pub fn track_head(mut self, on: bool) -> Self {
        self.options = self.options.track_head(on);
        self
    }

    /// Parks failing events: see [`ConsumerOptions::park_failures`].
    #[must_use]
    pub fn park_failures(mut self) -> Self {
        self.options = self.options.park_failures();
        self
    }

    /// The subscription's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The options it runs with.
    pub fn consumer_options(&self) -> &ConsumerOptions {
        &self.options
    }

    /// The store it reads.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Its checkpoint capability.
    pub fn checkpoints(&self) -> &C {
        &self.checkpoints
    }

    /// A live view of the subscription's state, position and counters.
    pub fn status(&self) -> watch::Receiver<SubscriptionStatus> {
        self.status.subscribe()
    }

    /// Takes the lease (waiting in standby while another instance holds it), handles every event
    /// up to the current end of the log, releases the lease, and returns the position reached.
    /// Store failures that may pass are waited out ([`SubscriptionState::Retrying`]), as in
    /// [`run`](Self::run).
    pub async fn catch_up<H: BatchHandler<C::Tx>>(
        &mut self,
        handler: H,
    ) -> Result<LogPosition, Error> {
        self.consume(handler, std::future::pending::<()>(), Until::CaughtUp)
            .await
    }

    /// Like [`catch_up`](Self::catch_up), but returns as soon as the position reached is at or
    /// after `target` (or nothing is left to read).
    pub async fn catch_up_to<H: BatchHandler<C::Tx>>(
        &mut self,
        handler: H,
        target: LogPosition,
    ) -> Result<LogPosition, Error> {
        self.consume(
            handler,
            std::future::pending::<()>(),
            Until::Reached(target),
        )
        .await
    }

    /// Takes the lease (waiting in standby while another instance holds it), catches up, then
    /// follows new events until `shutdown` completes or the handler fails (and failures are not
    /// parked). Shutdown takes effect **between batches**: a batch being handled is finished and
    /// checkpointed first. Store failures that may pass are waited out
    /// ([`SubscriptionState::Retrying`]); losing the lease sends it back to standby.
    pub async fn run<H: BatchHandler<C::Tx>>(
        &mut self,
        handler: H,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<LogPosition, Error> {
        self.consume(handler, shutdown, Until::Shutdown).await
    }

    async fn consume<H: BatchHandler<C::Tx>>(
        &mut self,
        handler: H,
        shutdown: impl Future<Output = ()> + Send,
        until: Until,
    ) -> Result<LogPosition, Error> {
        match self.options.known.clone() {
            Some(known) => {
                let source = known.source_filter(&self.options.filter);
                let handler = known::Screened {
                    inner: handler,
                    wanted: self.options.filter.event_types().map(<[String]>::to_vec),
                    known,
                };
                self.consume_from(handler, shutdown, until, source).await
            }
            None => {
                let source = self.options.filter.clone();
                self.consume_from(handler, shutdown, until, source).await
            }
        }
    }

    async fn consume_from<H: BatchHandler<C::Tx>>(
        &mut self,
        mut handler: H,
        shutdown: impl Future<Output = ()> + Send,
        until: Until,
        source: EventFilter,
    ) -> Result<LogPosition, Error> {
        let mut shutdown = Shutdown::new(shutdown);
        let mut reached = self.status.borrow().position;
        let mut delay = RETRY_MIN;
        'lease: loop {
            let mut guard = loop {
                let taken = tokio::select! {
                    biased;
                    () = shutdown.wait() => break 'lease,
                    taken = self.lease.try_acquire(&self.name) => taken,
                };
                match taken {
                    Ok(Some(guard)) => break guard,
                    Ok(None) => {
                        self.status.send_if_modified(|s| {
                            let changed = s.state != SubscriptionState::Standby;
                            s.state = SubscriptionState::Standby;
                            changed
                        });
                        tokio::select! {
                            biased;
                            () = shutdown.wait() => break 'lease,
                            () = tokio::time::sleep(self.options.standby_poll) => {}
                        }
                    }
                    Err(error) => {
                        if !self.wait_to_retry(error, &mut delay, &mut shutdown).await? {
                            break 'lease;
                        }
                    }
                }
            };
            let start = tokio::select! {
                biased;
                () = shutdown.wait() => break 'lease,
                start = self.start_position() => start,
            };
            let mut position = match start {
                Ok(position) => position,
                Err(error) => {
                    drop(guard);
                    if self.wait_to_retry(error, &mut delay, &mut shutdown).await? {
                        continue 'lease;
                    }
                    break 'lease;
                }
            };
            reached = position;
            let mut idle = self.options.idle_min;
            let mut prefetched: Option<(LogPosition, Vec<RecordedEvent>)> = None;
            // After a page failed on a stored event that cannot be read (bad data), the next
            // reads take one event at a time, so the events before the bad one are handled and
            // checkpointed before the consumer stops on it.
            let mut narrow = 0;
            loop {
                // Shutdown takes effect here, between batches, and while waiting below.
                if shutdown.is_done() {
                    break 'lease;
                }
                let limit = if narrow > 0 {
                    1
                } else {
                    self.options.batch_size
                };
                let batch = match prefetched.take() {
                    Some((after, batch)) if after == position => Ok(batch),
                    _ => tokio::select! {
                        biased;
                        () = shutdown.wait() => break 'lease,
                        batch = self.store.read_all(position, limit, &source) => batch,
                    },
                };
                self.note_replica_lag();
                let step = match batch {
                    Err(error)
                        if error.kind() == crate::ErrorKind::BadData
                            && narrow == 0
                            && self.options.batch_size > 1 =>
                    {
                        tracing::debug!(consumer = %self.name, %error, "a page holds an unreadable event; reading one event at a time up to it");
                        narrow = self.options.batch_size;
                        continue;
                    }
                    Ok(batch) => {
                        narrow = narrow.saturating_sub(1);
                        self.step(
                            &mut handler,
                            &mut position,
                            batch,
                            limit,
                            &source,
                            &mut prefetched,
                        )
                        .await
                    }
                    Err(error) => Err(error),
                };
                reached = position;
                match step {
                    Err(error) => {
                        // Start over from the stored checkpoint, taking the lease again (it may
                        // be gone too; another instance may take over meanwhile).
                        drop(guard);
                        if self.wait_to_retry(error, &mut delay, &mut shutdown).await? {
                            continue 'lease;
                        }
                        break 'lease;
                    }
                    Ok(Step::More) => {
                        idle = self.options.idle_min;
                        delay = RETRY_MIN;
                        if let Until::Reached(target) = until
                            && position >= target
                        {
                            return Ok(position);
                        }
                    }
                    Ok(Step::Idle) => {
                        delay = RETRY_MIN;
                        if !matches!(until, Until::Shutdown) {
                            return Ok(position);
                        }
                        tokio::select! {
                            biased;
                            () = shutdown.wait() => break 'lease,
                            () = tokio::time::sleep(idle) => {}
                        }
                        idle = (idle * 2).min(self.options.idle_max);
                        if !self.lease.is_held(&mut guard).await {
                            // Stand by for one poll before trying again: the others get the
                            // first chance to take over.
                            tracing::warn!(consumer = %self.name, "lost the lease; standing by");
                            drop(guard);
                            self.status
                                .send_modify(|s| s.state = SubscriptionState::Standby);
                            tokio::select! {
                                biased;
                                () = shutdown.wait() => break 'lease,
                                () = tokio::time::sleep(self.options.standby_poll) => {}
                            }
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

    /// Unless it [`retries_after`] `error`, marks the consumer `Failed` and returns the error;
    /// otherwise marks it `Retrying`, waits `delay` (or until shutdown), doubles `delay` up to
    /// [`RETRY_MAX`], and says whether to go on (`false`: shut down).
    async fn wait_to_retry(
        &self,
        error: Error,
        delay: &mut Duration,
        shutdown: &mut Shutdown<impl Future<Output = ()>>,
    ) -> Result<bool, Error> {
        if !retries_after(&error) {
            self.status
                .send_modify(|s| s.state = SubscriptionState::Failed(error.to_string()));
            return Err(error);
        }
        tracing::warn!(consumer = %self.name, %error, retry_in = ?*delay, "the store failed; retrying");
        self.status
            .send_modify(|s| s.state = SubscriptionState::Retrying(error.to_string()));
        let go_on = tokio::select! {
            biased;
            () = shutdown.wait() => false,
            () = tokio::time::sleep(*delay) => true,
        };
        *delay = (*delay * 2).min(RETRY_MAX);
        Ok(go_on)
    }

    /// The position to resume from. When the start mode overrides the checkpoint, or there is
    /// none, the position is stored as the checkpoint first (so every unit of work finds one to
    /// check); only once that is stored does a later start resume from the checkpoint.
    async fn start_position(&mut self) -> Result<LogPosition, Error> {
        let stored = self.checkpoints.load(&self.name).await?;
        let position = match (self.options.start, stored) {
            (StartFrom::Beginning, _) => Some(LogPosition::START),
            (StartFrom::After(position), _) => Some(position),
            (StartFrom::Time(time), _) => Some(self.store.position_at(time).await?),
            (StartFrom::Checkpoint | StartFrom::Now, Some(_)) => None,
            (StartFrom::Checkpoint, None) => Some(LogPosition::START),
            (StartFrom::Now, None) => Some(self.store.head().await?),
        };
        let position = match position {
            Some(position) => {
                self.checkpoints.reset(&self.name, position).await?;
                position
            }
            None => stored.unwrap_or(LogPosition::START),
        };
        // Stored: a later term (after a lost lease or a failure) resumes from the checkpoint.
        self.options.start = StartFrom::Checkpoint;
        self.status.send_modify(|s| {
            s.position = position;
            s.head = s.head.max(position);
        });
        Ok(position)
    }

    /// Handles one batch read after `position`.
    async fn step<H: BatchHandler<C::Tx>>(
        &self,
        handler: &mut H,
        position: &mut LogPosition,
        batch: Vec<RecordedEvent>,
        limit: usize,
        source: &EventFilter,
        prefetched: &mut Option<(LogPosition, Vec<RecordedEvent>)>,
    ) -> Result<Step, Error> {
        if batch.is_empty() {
            // Nothing to do: check the checkpoint did not move meanwhile (a rebuild swapped its
            // tables in, an operator rewound it).
            if let Some(stored) = self.checkpoints.load(&self.name).await?
                && stored != *position
            {
                tracing::info!(consumer = %self.name, %stored, "the checkpoint moved; resuming from it");
                *position = stored;
                self.status.send_modify(|s| s.position = stored);
                return Ok(Step::More);
            }
            self.status.send_if_modified(|s| {
                let changed = s.state != SubscriptionState::Live || s.lag_events != 0;
                s.caught_up();
                changed
            });
            return Ok(Step::Idle);
        }
        let full = batch.len() >= limit;
        // Falling behind (a full batch after being caught up): look the head up once, so the lag
        // in events is known. Live following (partial batches) never pays for it.
        if self.options.track_head
            && full
            && self.status.borrow().state != SubscriptionState::CatchingUp
        {
            let head = self.store.head().await?;
            self.status.send_modify(|s| s.set_head(head));
        }
        self.status
            .send_modify(|s| s.state = SubscriptionState::CatchingUp);
        let outcome = if full {
            // Catching up: read the next batch while this one is handled, so reading and
            // handling overlap. (The read is gap-safe on its own; it is used only if this batch
            // is done.)
            let last = batch.last().map_or(*position, |e| e.position);
            let (outcome, next) = tokio::join!(
                self.handle_batch(handler, &batch, *position),
                self.store.read_all(last, limit, source)
            );
            let outcome = outcome?;
            if let Handled::Done(_) = outcome {
                // A failed read is simply done again by the next step.
                *prefetched = next.ok().map(|next| (last, next));
            }
            outcome
        } else {
            self.handle_batch(handler, &batch, *position).await?
        };
        match outcome {
            Handled::Done(last) => {
                *position = last;
                if !full {
                    // A partial batch: this was everything there is.
                    self.status.send_modify(SubscriptionStatus::caught_up);
                }
                Ok(if full { Step::More } else { Step::Idle })
            }
            Handled::Moved(stored) => {
                tracing::warn!(consumer = %self.name, %stored, "the checkpoint moved under this consumer; resuming from it");
                *position = stored;
                self.status.send_modify(|s| s.position = stored);
                Ok(Step::More)
            }
        }
    }

    /// Handles `events` (read after `from`) in units of work: the whole batch in one, or, after a
    /// failure, the events before the failing one in one, the failing one alone (retried, then
    /// parked or fatal), and the rest again.
    async fn handle_batch<H: BatchHandler<C::Tx>>(
        &self,
        handler: &mut H,
        events: &[RecordedEvent],
        from: LogPosition,
    ) -> Result<Handled, Error> {
        let mut position = from;
        let mut rest = events;
        let mut one_by_one = false;
        while let Some(first) = rest.first() {
            if one_by_one {
                if let Handled::Moved(stored) =
                    self.handle_alone(handler, first, position, None).await?
                {
                    return Ok(Handled::Moved(stored));
                }
                position = first.position;
                rest = &rest[1..];
                continue;
            }
            let mut tx = match self.checkpoints.begin(&self.name, position).await? {
                Begun::Ready(tx) => tx,
                Begun::Moved(stored) => return Ok(Handled::Moved(stored)),
            };
            match handler.handle_batch(&mut tx, rest).await {
                Ok(()) => {
                    let last = &rest[rest.len() - 1];
                    self.checkpoints
                        .commit(tx, &self.name, last.position)
                        .await?;
                    self.advance(rest.len(), last);
                    return Ok(Handled::Done(last.position));
                }
                Err(BatchFailure {
                    handled: Some(k),
                    source,
                }) if k < rest.len() => {
                    if k > 0 {
                        let last = &rest[k - 1];
                        self.checkpoints
                            .commit(tx, &self.name, last.position)
                            .await?;
                        self.advance(k, last);
                        position = last.position;
                    } else {
                        self.checkpoints.rollback(tx).await;
                    }
                    let failing = &rest[k];
                    if let Handled::Moved(stored) = self
                        .handle_alone(handler, failing, position, Some(source))
                        .await?
                    {
                        return Ok(Handled::Moved(stored));
                    }
                    position = failing.position;
                    rest = &rest[k + 1..];
                }
                Err(failure) => {
                    tracing::debug!(consumer = %self.name, error = %failure.source, "batch failed; handling its events one by one");
                    self.checkpoints.rollback(tx).await;
                    one_by_one = true;
                }
            }
        }
        Ok(Handled::Done(position))
    }

    /// Handles one event in a unit of work of its own, with retries (`failed`: the error of an
    /// attempt already made); parks it or fails when it keeps failing.
    async fn handle_alone<H: BatchHandler<C::Tx>>(
        &self,
        handler: &mut H,
        event: &RecordedEvent,
        from: LogPosition,
        failed: Option<BoxError>,
    ) -> Result<Handled, Error> {
        let mut attempts = u32::from(failed.is_some());
        let mut last_error = failed;
        while attempts < self.options.handler_attempts {
            if let Some(error) = &last_error {
                tracing::debug!(consumer = %self.name, position = %event.position, attempts, %error, "handler failed; retrying");
                tokio::time::sleep(self.options.handler_backoff).await;
            }
            attempts += 1;
            let mut tx = match self.checkpoints.begin(&self.name, from).await? {
                Begun::Ready(tx) => tx,
                Begun::Moved(stored) => return Ok(Handled::Moved(stored)),
            };
            match handler.handle_one(&mut tx, event).await {
                Ok(()) => {
                    self.checkpoints
                        .commit(tx, &self.name, event.position)
                        .await?;
                    self.advance(1, event);
                    return Ok(Handled::Done(event.position));
                }
                Err(error) => {
                    self.checkpoints.rollback(tx).await;
                    last_error = Some(error);
                }
            }
        }
        let source = last_error.unwrap_or_else(|| "the handler failed".into());
        if !self.options.park {
            let error = Error::Handler {
                subscription: self.name.clone(),
                stream: event.stream_id.clone(),
                version: event.stream_version,
                event_type: event.event_type.clone(),
                event_id: event.event_id,
                position: event.position,
                attempts,
                source,
            };
            self.status
                .send_modify(|s| s.state = SubscriptionState::Failed(error.to_string()));
            return Err(error);
        }
        tracing::warn!(
            consumer = %self.name,
            stream = %event.stream_id,
            version = %event.stream_version,
            position = %event.position,
            error = %source,
            "parking an event the handler keeps failing on"
        );
        let mut tx = match self.checkpoints.begin(&self.name, from).await? {
            Begun::Ready(tx) => tx,
            Begun::Moved(stored) => return Ok(Handled::Moved(stored)),
        };
        let parked = ParkedEvent {
            subscription: self.name.clone(),
            event: event.clone(),
            error: crate::error_chain(&*source),
            attempts,
            parked_at: Utc::now(),
        };
        if let Err(error) = self.checkpoints.park(&mut tx, parked).await {
            self.checkpoints.rollback(tx).await;
            return Err(error);
        }
        self.checkpoints
            .commit(tx, &self.name, event.position)
            .await?;
        self.status.send_modify(|s| {
            s.parked += 1;
            s.advance(event.position, event.recorded_at);
        });
        Ok(Handled::Done(event.position))
    }

    /// Publishes the store's replica lag, when it changed.
    fn note_replica_lag(&self) {
        let lag = self.store.replica_lag();
        self.status.send_if_modified(|s| {
            let changed = s.replica_lag != lag;
            s.replica_lag = lag;
            changed
        });
    }

    /// Records that `n` events up to `last` were handled and checkpointed.
    fn advance(&self, n: usize, last: &RecordedEvent) {
        self.status.send_modify(|s| {
            s.handled += n as u64;
            s.advance(last.position, last.recorded_at);
        });
    }
}

/// When a consumer's loop returns.
#[derive(Clone, Copy)]
enum Until {
    /// On shutdown (or a fatal error).
    Shutdown,
    /// Once nothing is left to read.
    CaughtUp,
    /// Once at or after a position, or nothing is left to read.
    Reached(LogPosition),
}

/// What a step did.
enum Step {
    /// Handled a full batch, or resumed from a moved checkpoint: there may be more.
    More,
    /// Read everything there is.
    Idle,
}

/// How a batch ended.
enum Handled {
    /// Handled (or parked) up to this position, checkpointed.
    Done(LogPosition),
    /// The checkpoint moved under the consumer: resume from it.
    Moved(LogPosition),
}

/// The shutdown signal, remembered once it fired (a completed future is not polled again).
struct Shutdown<F> {
    future: Pin<Box<F>>,
    done: bool,
}

impl<F: Future<Output = ()>> Shutdown<F> {
    fn new(future: F) -> Self {
        Self {
            future: Box::pin(future),
            done: false,
        }
    }

    /// Whether shutdown was requested, without waiting.
    fn is_done(&mut self) -> bool {
        if !self.done && self.future.as_mut().now_or_never().is_some() {
            self.done = true;
        }
        self.done
    }

    /// Completes when shutdown is requested.
    async fn wait(&mut self) {
        if !self.done {
            self.future.as_mut().await;
            self.done = true;
        }
    }
}
