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
//! let subscription = Subscription::new("counter", store.clone());
//! let position = subscription.catch_up(&mut counter).await?;
//! assert_eq!(counter.0, 2);
//! assert_eq!(position, store.head());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

mod store;
mod telemetry;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;

pub use store::{CheckpointStore, DeadLetterStore, ParkedEvent};
pub use telemetry::{export_metrics, record_metrics};

use crate::error::{BoxError, Error};
use crate::event::RecordedEvent;
use crate::ids::LogPosition;
use crate::projection::Projection;
use crate::store::{BoxFuture, EventFilter, EventStore};

/// Handles the events a subscription delivers.
pub trait EventHandler: Send {
    /// Handles one event. An error is retried, then stops the subscription or parks the event.
    fn handle(
        &mut self,
        event: &RecordedEvent,
    ) -> impl Future<Output = Result<(), BoxError>> + Send;
}

impl<H: EventHandler> EventHandler for &mut H {
    fn handle(
        &mut self,
        event: &RecordedEvent,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        (**self).handle(event)
    }
}

/// Runs a [`Projection`] as a subscription's handler: decodes each event into the projection's
/// event type (upcasting older versions) and applies it.
///
/// An event that does not decode is a handler failure naming its stream, version, type and
/// position: the subscription stops on it, or parks it when configured to; it is never skipped
/// silently.
#[derive(Debug, Default)]
pub struct Projector<P> {
    projection: P,
}

impl<P: Projection> Projector<P> {
    /// Wraps a projection.
    pub fn new(projection: P) -> Self {
        Self { projection }
    }

    /// The read model.
    pub fn get(&self) -> &P {
        &self.projection
    }

    /// The read model, mutably.
    pub fn get_mut(&mut self) -> &mut P {
        &mut self.projection
    }

    /// Unwraps the read model.
    pub fn into_inner(self) -> P {
        self.projection
    }
}

impl<P: Projection> EventHandler for Projector<P> {
    fn handle(
        &mut self,
        event: &RecordedEvent,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        let result = event
            .decode::<P::Event>()
            .map_err(BoxError::from)
            .and_then(|envelope| self.projection.apply(&envelope));
        std::future::ready(result)
    }
}

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

/// What a consumer of the log (a [`Subscription`], a PostgreSQL projection runner) does after a
/// failure: unless it [`retries_after`] it, marks `status` `Failed` and returns the error;
/// otherwise marks it `Retrying`, waits `delay` (or until `shutdown`), doubles `delay` up to
/// [`RETRY_MAX`], and says whether to go on (`false`: shut down).
#[doc(hidden)]
pub async fn wait_to_retry(
    status: &watch::Sender<SubscriptionStatus>,
    consumer: &str,
    error: Error,
    delay: &mut Duration,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<bool, Error> {
    if !retries_after(&error) {
        status.send_modify(|s| s.state = SubscriptionState::Failed(error.to_string()));
        return Err(error);
    }
    tracing::warn!(consumer, %error, retry_in = ?*delay, "the store failed; retrying");
    status.send_modify(|s| s.state = SubscriptionState::Retrying(error.to_string()));
    let go_on = tokio::select! {
        biased;
        () = shutdown.as_mut() => false,
        () = tokio::time::sleep(*delay) => true,
    };
    *delay = (*delay * 2).min(RETRY_MAX);
    Ok(go_on)
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
    /// full batch; for a [`Subscription`], only with [`track_head`](Subscription::track_head)),
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
        }
    }

    /// Records the head of the log and recomputes the lag in events.
    pub fn set_head(&mut self, head: LogPosition) {
        self.head = head.max(self.position);
        self.lag_events = self
            .head
            .global
            .get()
            .saturating_sub(self.position.global.get());
    }

    /// Records that the consumer moved past an event recorded at `recorded_at`.
    pub fn advance(&mut self, position: LogPosition, recorded_at: DateTime<Utc>) {
        self.position = position;
        self.head = self.head.max(position);
        self.lag_events = self.head.global.get().saturating_sub(position.global.get());
        self.last_event_at = Some(recorded_at);
        self.lag = (Utc::now() - recorded_at)
            .to_std()
            .unwrap_or(Duration::ZERO);
    }

    /// Records that the consumer has read everything there is: no lag.
    pub fn caught_up(&mut self) {
        self.state = SubscriptionState::Live;
        self.head = self.head.max(self.position);
        self.lag_events = 0;
        self.lag = Duration::ZERO;
    }
}

type Parker = Arc<dyn Fn(ParkedEvent) -> BoxFuture<'static, Result<(), Error>> + Send + Sync>;

/// A named, checkpointed consumer of the global log. See the [module docs](self).
pub struct Subscription<S> {
    name: String,
    store: S,
    filter: EventFilter,
    start: StartFrom,
    batch_size: usize,
    idle_min: Duration,
    idle_max: Duration,
    handler_attempts: u32,
    handler_backoff: Duration,
    parker: Option<Parker>,
    track_head: bool,
    status: watch::Sender<SubscriptionStatus>,
}

impl<S> std::fmt::Debug for Subscription<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("name", &self.name)
            .field("filter", &self.filter)
            .field("start", &self.start)
            .field("batch_size", &self.batch_size)
            .field("parks_failures", &self.parker.is_some())
            .finish()
    }
}

impl<S: EventStore + CheckpointStore> Subscription<S> {
    /// A subscription called `name` (the key of its checkpoint) over `store`, which also keeps its
    /// checkpoint. Defaults: every event, from its checkpoint, batches of 500, idle polling from
    /// 10 ms backing off to 1 s, 3 handler attempts 100 ms apart, stop on failure.
    pub fn new(name: impl Into<String>, store: S) -> Self {
        let (status, _) = watch::channel(SubscriptionStatus::starting(LogPosition::START));
        Self {
            name: name.into(),
            store,
            filter: EventFilter::all(),
            start: StartFrom::Checkpoint,
            batch_size: 500,
            idle_min: Duration::from_millis(10),
            idle_max: Duration::from_secs(1),
            handler_attempts: 3,
            handler_backoff: Duration::from_millis(100),
            parker: None,
            track_head: false,
            status,
        }
    }

    /// A subscription feeding projection `P`: named [`Projection::NAME`], reading only the wire
    /// names of [`Projection::Event`]. Run it with a [`Projector`].
    pub fn for_projection<P: Projection>(store: S) -> Self {
        Self::new(P::NAME, store).filter(EventFilter::for_event::<P::Event>())
    }

    /// Only events passing `filter` are read (filtered at the source).
    #[must_use]
    pub fn filter(mut self, filter: EventFilter) -> Self {
        self.filter = filter;
        self
    }

    /// Where to start (default: [`StartFrom::Checkpoint`]).
    #[must_use]
    pub fn start_from(mut self, start: StartFrom) -> Self {
        self.start = start;
        self
    }

    /// Events read per batch (minimum 1); the checkpoint is saved after each batch.
    #[must_use]
    pub fn batch_size(mut self, size: usize) -> Self {
        self.batch_size = size.max(1);
        self
    }

    /// Polling delay while the log is quiet: starts at `min`, doubles up to `max`, and drops back
    /// to `min` as soon as an event arrives.
    #[must_use]
    pub fn idle_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.idle_min = min;
        self.idle_max = max.max(min);
        self
    }

    /// How many times a failing event is handed to the handler (minimum 1), and the pause between
    /// attempts.
    #[must_use]
    pub fn handler_retries(mut self, attempts: u32, backoff: Duration) -> Self {
        self.handler_attempts = attempts.max(1);
        self.handler_backoff = backoff;
        self
    }

    /// Parks events the handler keeps failing on in the store's dead-letter queue, and goes on.
    #[must_use]
    pub fn park_failures(mut self) -> Self
    where
        S: DeadLetterStore + Clone + 'static,
    {
        let store = self.store.clone();
        self.parker = Some(Arc::new(move |parked| {
            let store = store.clone();
            Box::pin(async move { store.park(parked).await })
        }));
        self
    }

    /// Looks the head of the log up ([`EventStore::head`]) each time the subscription falls
    /// behind (reads a full batch after being caught up), so [`SubscriptionStatus::head`] and
    /// [`lag_events`](SubscriptionStatus::lag_events) are known while it catches up. Off by
    /// default, because `head` can be a scan of the log on a backend without a direct lookup;
    /// without it the head is only learnt from the events handled, and the lag in time
    /// ([`lag`](SubscriptionStatus::lag)) is reported either way.
    #[must_use]
    pub fn track_head(mut self) -> Self {
        self.track_head = true;
        self
    }

    /// The subscription's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A live view of the subscription's state, position and counters.
    pub fn status(&self) -> watch::Receiver<SubscriptionStatus> {
        self.status.subscribe()
    }

    /// Handles every event up to the current end of the log, then returns the position reached.
    pub async fn catch_up<H: EventHandler>(&self, mut handler: H) -> Result<LogPosition, Error> {
        let mut position = self.initial_position().await?;
        while self.step(&mut handler, &mut position).await? {}
        Ok(position)
    }

    /// Catches up, then follows new events until `shutdown` completes (between events) or the
    /// handler fails and failures are not parked.
    pub async fn run<H: EventHandler>(
        &self,
        mut handler: H,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<LogPosition, Error> {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut delay = RETRY_MIN;
        let mut position = loop {
            let error = tokio::select! {
                biased;
                () = &mut shutdown => return Ok(self.stop()),
                start = self.initial_position() => match start {
                    Ok(position) => break position,
                    Err(error) => error,
                },
            };
            if !self.wait_to_retry(error, &mut delay, &mut shutdown).await? {
                return Ok(self.stop());
            }
        };
        let mut idle = self.idle_min;
        loop {
            let work = tokio::select! {
                biased;
                () = &mut shutdown => None,
                step = self.step(&mut handler, &mut position) => Some(step),
            };
            match work {
                None => break,
                Some(Err(error)) => {
                    if !self.wait_to_retry(error, &mut delay, &mut shutdown).await? {
                        break;
                    }
                }
                Some(Ok(true)) => {
                    idle = self.idle_min;
                    delay = RETRY_MIN;
                }
                Some(Ok(false)) => {
                    delay = RETRY_MIN;
                    tokio::select! {
                        biased;
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(idle) => {}
                    }
                    idle = (idle * 2).min(self.idle_max);
                }
            }
        }
        self.stop();
        Ok(position)
    }

    /// Marks the subscription stopped; the position it reached.
    fn stop(&self) -> LogPosition {
        self.status
            .send_modify(|s| s.state = SubscriptionState::Stopped);
        self.status.borrow().position
    }

    async fn wait_to_retry(
        &self,
        error: Error,
        delay: &mut Duration,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Result<bool, Error> {
        wait_to_retry(&self.status, &self.name, error, delay, shutdown).await
    }

    async fn initial_position(&self) -> Result<LogPosition, Error> {
        let checkpoint = self.store.load_checkpoint(&self.name).await?;
        let position = match (self.start, checkpoint) {
            (StartFrom::Beginning, _) => LogPosition::START,
            (StartFrom::After(position), _) => position,
            (StartFrom::Time(time), _) => self.store.position_at(time).await?,
            (StartFrom::Checkpoint | StartFrom::Now, Some(checkpoint)) => checkpoint,
            (StartFrom::Checkpoint, None) => LogPosition::START,
            (StartFrom::Now, None) => self.store.head().await?,
        };
        self.status.send_modify(|s| {
            s.position = position;
            s.head = position;
        });
        Ok(position)
    }

    /// Handles one batch. `Ok(true)` when it was full (more may be waiting).
    async fn step<H: EventHandler>(
        &self,
        handler: &mut H,
        position: &mut LogPosition,
    ) -> Result<bool, Error> {
        let batch = self
            .store
            .read_all(*position, self.batch_size, &self.filter)
            .await?;
        let full = batch.len() >= self.batch_size;
        if batch.is_empty() {
            self.status.send_if_modified(|s| {
                let changed = s.state != SubscriptionState::Live || s.lag_events != 0;
                s.caught_up();
                changed
            });
            return Ok(false);
        }
        // Falling behind (a full batch after being caught up): look the head up once, so the lag
        // in events is known. Live following (partial batches) never pays for it.
        let behind =
            self.track_head && full && self.status.borrow().state != SubscriptionState::CatchingUp;
        let head = if behind {
            Some(self.store.head().await?)
        } else {
            None
        };
        self.status.send_modify(|s| {
            s.state = SubscriptionState::CatchingUp;
            if let Some(head) = head {
                s.set_head(head);
            }
        });
        for event in &batch {
            match self.handle_with_retries(handler, event).await {
                Ok(()) => self.status.send_modify(|s| s.handled += 1),
                Err((attempts, source)) => match &self.parker {
                    Some(park) => {
                        tracing::warn!(
                            subscription = %self.name,
                            stream = %event.stream_id,
                            version = %event.stream_version,
                            position = %event.position,
                            error = %source,
                            "parking an event the handler keeps failing on"
                        );
                        park(ParkedEvent {
                            subscription: self.name.clone(),
                            event: event.clone(),
                            error: render(&*source),
                            attempts,
                            parked_at: Utc::now(),
                        })
                        .await?;
                        self.status.send_modify(|s| s.parked += 1);
                    }
                    None => {
                        // Keep what was handled before the failing event.
                        self.store.save_checkpoint(&self.name, *position).await?;
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
                        self.status.send_modify(|s| {
                            s.state = SubscriptionState::Failed(error.to_string())
                        });
                        return Err(error);
                    }
                },
            }
            *position = event.position;
            self.status
                .send_modify(|s| s.advance(event.position, event.recorded_at));
        }
        self.store.save_checkpoint(&self.name, *position).await?;
        if !full {
            // A partial batch: this was everything there is.
            self.status.send_modify(SubscriptionStatus::caught_up);
        }
        Ok(full)
    }

    async fn handle_with_retries<H: EventHandler>(
        &self,
        handler: &mut H,
        event: &RecordedEvent,
    ) -> Result<(), (u32, BoxError)> {
        let mut attempt = 1;
        loop {
            match handler.handle(event).await {
                Ok(()) => return Ok(()),
                Err(error) if attempt >= self.handler_attempts => return Err((attempt, error)),
                Err(error) => {
                    tracing::debug!(
                        subscription = %self.name,
                        position = %event.position,
                        attempt,
                        %error,
                        "handler failed; retrying"
                    );
                    tokio::time::sleep(self.handler_backoff).await;
                    attempt += 1;
                }
            }
        }
    }
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
