//! The backend layer: small traits, one capability each.
//!
//! A backend implements [`EventStore`] (append and read events) and, if it keeps snapshots,
//! [`SnapshotStore`]. The traits use `fn ... -> impl Future + Send` so generic code pays no
//! boxing and callers can rely on `Send` futures; each has a dyn-compatible twin
//! ([`DynEventStore`], [`DynSnapshotStore`]) implemented for every backend, so a backend can also
//! be used as `Arc<dyn DynEventStore>`, which itself implements [`EventStore`]:
//!
//! ```
//! use std::sync::Arc;
//! use factum::{DynEventStore, EventStore, InMemoryStore};
//!
//! fn takes_any_store(_: impl EventStore) {}
//!
//! let store: Arc<dyn DynEventStore> = Arc::new(InMemoryStore::new());
//! takes_any_store(store);
//! ```
//!
//! A backend is correct when `factum-testkit`'s conformance suite passes against it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_core::Stream;
use serde_json::value::RawValue;

use crate::error::Error;
use crate::event::{Event, EventMetadata, NewEvent, RecordedEvent, Stored};
use crate::idempotency::IdempotencyKey;
use crate::ids::{GlobalPosition, LogPosition, StreamId, StreamVersion};

/// A boxed, `Send` future, as the dyn-compatible traits return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A stream of stored events, read lazily (bounded memory however long the stream).
pub type EventStream<'a> = Pin<Box<dyn Stream<Item = Result<RecordedEvent, Error>> + Send + 'a>>;

/// A stream of [`EventPayload`]s, as [`EventStore::read_stream_payloads`] returns them.
pub type PayloadStream<'a> = Pin<Box<dyn Stream<Item = Result<EventPayload, Error>> + Send + 'a>>;

/// A stream's event with only what folding it into state needs: what
/// [`EventStore::read_stream_payloads`] returns, and what a [`Repository`](crate::Repository)
/// loads aggregates from.
#[derive(Clone, Debug)]
pub struct EventPayload {
    /// Its version within the stream.
    pub stream_version: StreamVersion,
    /// The wire name.
    pub event_type: String,
    /// The schema version the payload was written with.
    pub schema_version: u32,
    /// The JSON payload as stored.
    pub payload: Box<RawValue>,
    /// When the store recorded it.
    pub recorded_at: DateTime<Utc>,
    /// Its tracing ids and user metadata (upcasts may read them).
    pub metadata: EventMetadata,
}

impl EventPayload {
    /// The stored event as decoding sees it.
    pub fn stored(&self) -> Stored<'_> {
        Stored::new(&self.event_type, self.schema_version, &self.payload)
            .recorded_at(self.recorded_at)
            .with_metadata(&self.metadata)
    }
}

impl From<RecordedEvent> for EventPayload {
    fn from(event: RecordedEvent) -> Self {
        Self {
            stream_version: event.stream_version,
            event_type: event.event_type,
            schema_version: event.schema_version,
            payload: event.payload,
            recorded_at: event.recorded_at,
            metadata: event.metadata,
        }
    }
}

/// What the writer believes the stream's version to be; the append fails with
/// [`Error::Conflict`] otherwise.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ExpectedVersion {
    /// No check: append whatever the version.
    Any,
    /// The stream must have no events yet.
    NoStream,
    /// The stream must be exactly at this version (`Exact(StreamVersion::INITIAL)` means the
    /// same as `NoStream`).
    Exact(StreamVersion),
}

impl ExpectedVersion {
    /// Whether a stream currently at `actual` satisfies this expectation.
    pub fn matches(self, actual: StreamVersion) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => actual == StreamVersion::INITIAL,
            ExpectedVersion::Exact(v) => actual == v,
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any version"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::Exact(v) => write!(f, "version {v}"),
        }
    }
}

/// One append: a batch of events for one stream, the version the writer expects the stream to be
/// at, and optionally an [`IdempotencyKey`].
///
/// ```
/// use factum::{AppendRequest, ExpectedVersion, IdempotencyKey, StreamId};
///
/// # fn events() -> Vec<factum::NewEvent> { Vec::new() }
/// let request = AppendRequest::new(StreamId::new("account-1").unwrap(), events())
///     .expected_version(ExpectedVersion::NoStream)
///     .idempotency_key(IdempotencyKey::new("request-8f2c").unwrap());
/// assert_eq!(request.expected, ExpectedVersion::NoStream);
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct AppendRequest {
    /// The stream appended to.
    pub stream: StreamId,
    /// What the writer believes the stream's version to be ([`ExpectedVersion::Any`] unless set).
    pub expected: ExpectedVersion,
    /// The batch, stored all or nothing.
    pub events: Vec<NewEvent>,
    /// When set, stored with the batch in the same atomic write: a later request with the same
    /// key stores nothing and returns this append's outcome.
    pub idempotency_key: Option<IdempotencyKey>,
}

impl AppendRequest {
    /// A request to append `events` to `stream`, whatever its version, with no idempotency key.
    pub fn new(stream: StreamId, events: Vec<NewEvent>) -> Self {
        Self {
            stream,
            expected: ExpectedVersion::Any,
            events,
            idempotency_key: None,
        }
    }

    /// Appends only if the stream is at `expected`; otherwise the append fails with
    /// [`Error::Conflict`] and stores nothing.
    #[must_use]
    pub fn expected_version(mut self, expected: ExpectedVersion) -> Self {
        self.expected = expected;
        self
    }

    /// Stores `key` with the batch: repeating a request with this key stores nothing and returns
    /// the original [`AppendResult`] (with `duplicate: true`), even after the stream moved on;
    /// a request with this key and a different batch (another stream, other event ids) fails
    /// with [`Error::IdempotencyKeyReused`].
    #[must_use]
    pub fn idempotency_key(mut self, key: IdempotencyKey) -> Self {
        self.idempotency_key = Some(key);
        self
    }
}

/// The result of a successful append.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct AppendResult {
    /// The stream appended to.
    pub stream: StreamId,
    /// The stream's version before the batch (the batch's first event has the next version).
    pub first_version: StreamVersion,
    /// The stream's version after the append (the version of the batch's last event).
    pub stream_version: StreamVersion,
    /// The global positions of the batch's events, in batch order.
    pub positions: Vec<GlobalPosition>,
    /// True when the batch was already stored (an idempotent repeat, by idempotency key or by
    /// event ids): nothing new was written, and the versions and positions are those of the
    /// original append.
    pub duplicate: bool,
}

impl AppendResult {
    /// The result of appending a batch to `stream` after `first_version`, at `positions`.
    pub fn new(
        stream: StreamId,
        first_version: StreamVersion,
        positions: Vec<GlobalPosition>,
    ) -> Self {
        Self {
            stream,
            first_version,
            stream_version: StreamVersion::new(first_version.get() + positions.len() as u64),
            positions,
            duplicate: false,
        }
    }

    /// The same result, marked as a repeat of an earlier append.
    #[must_use]
    pub fn as_duplicate(mut self) -> Self {
        self.duplicate = true;
        self
    }
}

/// Which events a reader of the global log wants; applied at the source.
///
/// ```
/// use factum::EventFilter;
/// let filter = EventFilter::all().with_categories(["account"]);
/// assert!(filter.matches_parts("account", "account.opened"));
/// assert!(!filter.matches_parts("customer", "customer.registered"));
/// ```
#[derive(Clone, Default, PartialEq, Eq, Debug)]
pub struct EventFilter {
    event_types: Option<Vec<String>>,
    categories: Option<Vec<String>>,
}

impl EventFilter {
    /// Every event.
    pub fn all() -> Self {
        Self::default()
    }

    /// Only the wire names an event type decodes.
    pub fn for_event<E: Event>() -> Self {
        Self::all().with_event_types(E::event_types().iter().copied())
    }

    /// Only these wire names.
    #[must_use]
    pub fn with_event_types<S: Into<String>>(mut self, types: impl IntoIterator<Item = S>) -> Self {
        self.event_types = Some(types.into_iter().map(Into::into).collect());
        self
    }

    /// Only streams of these categories (aggregate types).
    #[must_use]
    pub fn with_categories<S: Into<String>>(
        mut self,
        categories: impl IntoIterator<Item = S>,
    ) -> Self {
        self.categories = Some(categories.into_iter().map(Into::into).collect());
        self
    }

    /// Only events passing both `self` and `other`: each part (wire names, categories) is the
    /// intersection of the two filters' parts.
    ///
    /// ```
    /// use factum::EventFilter;
    /// let projection = EventFilter::all().with_event_types(["account.opened", "order.placed"]);
    /// let narrowed = projection.and(EventFilter::all().with_categories(["account"]));
    /// assert!(narrowed.matches_parts("account", "account.opened"));
    /// assert!(!narrowed.matches_parts("account", "account.closed"), "still only its types");
    /// assert!(!narrowed.matches_parts("order", "order.placed"), "only the categories asked for");
    /// ```
    #[must_use]
    pub fn and(self, other: EventFilter) -> Self {
        fn both(a: Option<Vec<String>>, b: Option<Vec<String>>) -> Option<Vec<String>> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a.into_iter().filter(|x| b.contains(x)).collect()),
                (a, None) => a,
                (None, b) => b,
            }
        }
        Self {
            event_types: both(self.event_types, other.event_types),
            categories: both(self.categories, other.categories),
        }
    }

    /// The wire names this filter keeps, or `None` for all.
    pub fn event_types(&self) -> Option<&[String]> {
        self.event_types.as_deref()
    }

    /// The categories this filter keeps, or `None` for all.
    pub fn categories(&self) -> Option<&[String]> {
        self.categories.as_deref()
    }

    /// Whether an event of this category and wire name passes.
    pub fn matches_parts(&self, category: &str, event_type: &str) -> bool {
        self.event_types
            .as_ref()
            .is_none_or(|t| t.iter().any(|t| t == event_type))
            && self
                .categories
                .as_ref()
                .is_none_or(|c| c.iter().any(|c| c == category))
    }

    /// Whether a stored event passes.
    pub fn matches(&self, event: &RecordedEvent) -> bool {
        self.matches_parts(event.stream_id.category(), &event.event_type)
    }
}

/// Appends events to streams and reads them back: the one capability every backend has.
///
/// # Semantics every backend keeps
/// * **Atomic batches**: an append stores all of its events or none.
/// * **Optimistic concurrency**: an append whose [`ExpectedVersion`] does not match fails with
///   [`Error::Conflict`] and stores nothing.
/// * **Idempotent re-append**: when *every* event id of a batch is already stored, as the same
///   consecutive events of the same stream, the append succeeds with `duplicate: true`, stores
///   nothing and ignores the expected version (so retrying an append whose outcome was unknown is
///   safe). When only some ids are stored, or they belong to another stream or another order, it
///   fails with [`Error::DuplicateEventId`] and stores nothing.
/// * **Idempotency keys**: a request's [`IdempotencyKey`] is stored with its batch in the same
///   atomic write. A request whose key is stored stores nothing: with the same stream and event
///   ids it succeeds with the original outcome (`duplicate: true`), whatever the stream's version
///   now; otherwise it fails with [`Error::IdempotencyKeyReused`]. Concurrent requests with one
///   key store one batch. Keys are kept until the backend's retention call removes them.
/// * **One global order**: every event gets a [`LogPosition`]; [`read_all`](Self::read_all)
///   returns events in that order, and never returns an event while one that will sort before
///   it may still be committed (readers never skip events).
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a factum event store",
    note = "use `factum::InMemoryStore`, `factum_postgres::PostgresStore`, or implement `factum::EventStore`"
)]
pub trait EventStore: Send + Sync {
    /// Appends a batch to one stream atomically.
    fn append(
        &self,
        request: AppendRequest,
    ) -> impl Future<Output = Result<AppendResult, Error>> + Send;

    /// The outcome of the append that stored `key`, or `None` when no stored batch has it (or its
    /// key was removed by retention).
    fn idempotency_outcome(
        &self,
        key: &IdempotencyKey,
    ) -> impl Future<Output = Result<Option<AppendResult>, Error>> + Send;

    /// Reads a stream's events with a version greater than `after`, oldest first.
    /// A stream that does not exist reads as empty.
    fn read_stream<'a>(&'a self, stream: &'a StreamId, after: StreamVersion) -> EventStream<'a>;

    /// Reads the same events as [`read_stream`](Self::read_stream), with only their version,
    /// type, schema version, payload and recording time: what rebuilding an aggregate needs, and
    /// what [`Repository`](crate::Repository) loads from.
    ///
    /// The provided implementation maps [`read_stream`](Self::read_stream); a backend overrides
    /// it when reading fewer columns is cheaper (the PostgreSQL backend does).
    fn read_stream_payloads<'a>(
        &'a self,
        stream: &'a StreamId,
        after: StreamVersion,
    ) -> PayloadStream<'a> {
        use futures_util::TryStreamExt as _;
        Box::pin(self.read_stream(stream, after).map_ok(EventPayload::from))
    }

    /// Reads up to `limit` events of the global log that sort after `after` and pass `filter`.
    fn read_all(
        &self,
        after: LogPosition,
        limit: usize,
        filter: &EventFilter,
    ) -> impl Future<Output = Result<Vec<RecordedEvent>, Error>> + Send;

    /// The position of the last event a reader of the global log can see now
    /// ([`LogPosition::START`] when there is none): where a subscription that starts "now"
    /// begins, and the reference for its lag.
    ///
    /// The provided implementation pages through the whole log; backends override it with a
    /// direct lookup.
    // Spelled out rather than `async fn` so the future is promised `Send`.
    #[allow(clippy::manual_async_fn)]
    fn head(&self) -> impl Future<Output = Result<LogPosition, Error>> + Send {
        async move {
            let mut head = LogPosition::START;
            loop {
                let page = self.read_all(head, 1000, &EventFilter::all()).await?;
                match page.last() {
                    Some(last) => head = last.position,
                    None => return Ok(head),
                }
            }
        }
    }

    /// Where a replay from `time` starts: the position of the last event before the first
    /// event, in log order, recorded at or after `time` ([`LogPosition::START`] when that is the
    /// first event; the [`head`](Self::head) when no event was recorded since `time`). Reading
    /// the log after it returns every event recorded since `time`, and any event recorded
    /// earlier that sorts after the first of them.
    ///
    /// The provided implementation pages through the log from its start; backends override it
    /// with a query.
    #[allow(clippy::manual_async_fn)]
    fn position_at(
        &self,
        time: DateTime<Utc>,
    ) -> impl Future<Output = Result<LogPosition, Error>> + Send {
        async move {
            let mut before = LogPosition::START;
            loop {
                let page = self.read_all(before, 1000, &EventFilter::all()).await?;
                if page.is_empty() {
                    return Ok(before);
                }
                for event in page {
                    if event.recorded_at >= time {
                        return Ok(before);
                    }
                    before = event.position;
                }
            }
        }
    }
    /// How far this store's copy of the log trails the primary, when it reads a replica (as
    /// last measured: no round trip). `None` for a store that reads the primary itself, the
    /// provided implementation. Subscriptions publish it in
    /// [`SubscriptionStatus::replica_lag`](crate::subscription::SubscriptionStatus::replica_lag).
    fn replica_lag(&self) -> Option<ReplicaLag> {
        None
    }
}

/// How far a read replica trails the primary it copies, as last measured by the store that
/// reads it ([`EventStore::replica_lag`]).
///
/// Both figures are what the replica has **applied** (made visible to readers), not merely
/// received: events committed on the primary within `time` may not be readable yet.
///
/// ```
/// use std::time::Duration;
/// use factum::ReplicaLag;
///
/// let lag = ReplicaLag::new(Some(Duration::from_millis(40)), 16_384);
/// assert!(!lag.is_caught_up());
/// assert!(lag.is_within(Duration::from_millis(100)));
/// assert!(ReplicaLag::new(Some(Duration::ZERO), 0).is_caught_up());
/// // Behind, by an unknown time: within no bound.
/// assert!(!ReplicaLag::new(None, 10).is_within(Duration::from_secs(3600)));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct ReplicaLag {
    /// At most this long ago, the replica had applied everything the primary had committed:
    /// an upper bound on how stale a read may be (zero when caught up). `None` when the replica
    /// is behind and nothing tells by how long (it applied nothing since it started).
    pub time: Option<Duration>,
    /// How much of the primary's log it has not applied yet (for PostgreSQL: bytes of WAL
    /// between the primary's current position and the replica's replay position).
    pub bytes: u64,
    /// When this was measured.
    pub measured_at: DateTime<Utc>,
}

impl ReplicaLag {
    /// A lag measured now.
    pub fn new(time: Option<Duration>, bytes: u64) -> Self {
        Self {
            time,
            bytes,
            measured_at: Utc::now(),
        }
    }

    /// True when the replica had applied everything the primary had written.
    pub fn is_caught_up(&self) -> bool {
        self.bytes == 0
    }

    /// True when the replica is caught up or known to be at most `max` behind.
    pub fn is_within(&self, max: Duration) -> bool {
        self.is_caught_up() || self.time.is_some_and(|t| t <= max)
    }
}

/// A stored snapshot of an aggregate's state.
#[derive(Clone, Debug)]
pub struct StoredSnapshot {
    /// The aggregate's stream.
    pub stream_id: StreamId,
    /// The stream version the state includes.
    pub stream_version: StreamVersion,
    /// The aggregate's [`Snapshot::SNAPSHOT_VERSION`](crate::Snapshot::SNAPSHOT_VERSION) when it
    /// was taken.
    pub schema_version: u32,
    /// The serialised state.
    pub state: Box<RawValue>,
    /// When it was taken.
    pub taken_at: DateTime<Utc>,
}

/// Keeps the latest snapshot of each stream.
pub trait SnapshotStore: Send + Sync {
    /// Stores a snapshot, unless one at a higher stream version is already stored.
    fn save_snapshot(
        &self,
        snapshot: StoredSnapshot,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// The latest snapshot of a stream, if any.
    fn load_snapshot(
        &self,
        stream: &StreamId,
    ) -> impl Future<Output = Result<Option<StoredSnapshot>, Error>> + Send;
}

/// The dyn-compatible twin of [`EventStore`], implemented for every event store.
pub trait DynEventStore: Send + Sync {
    /// See [`EventStore::append`].
    fn append_dyn(&self, request: AppendRequest) -> BoxFuture<'_, Result<AppendResult, Error>>;

    /// See [`EventStore::idempotency_outcome`].
    fn idempotency_outcome_dyn<'a>(
        &'a self,
        key: &'a IdempotencyKey,
    ) -> BoxFuture<'a, Result<Option<AppendResult>, Error>>;

    /// See [`EventStore::read_stream`].
    fn read_stream_dyn<'a>(&'a self, stream: &'a StreamId, after: StreamVersion)
    -> EventStream<'a>;

    /// See [`EventStore::read_stream_payloads`].
    fn read_stream_payloads_dyn<'a>(
        &'a self,
        stream: &'a StreamId,
        after: StreamVersion,
    ) -> PayloadStream<'a>;

    /// See [`EventStore::read_all`].
    fn read_all_dyn<'a>(
        &'a self,
        after: LogPosition,
        limit: usize,
        filter: &'a EventFilter,
    ) -> BoxFuture<'a, Result<Vec<RecordedEvent>, Error>>;

    /// See [`EventStore::head`].
    fn head_dyn(&self) -> BoxFuture<'_, Result<LogPosition, Error>>;

    /// See [`EventStore::position_at`].
    fn position_at_dyn(&self, time: DateTime<Utc>) -> BoxFuture<'_, Result<LogPosition, Error>>;

    /// See [`EventStore::replica_lag`].
    fn replica_lag_dyn(&self) -> Option<ReplicaLag>;
}

impl<T: EventStore> DynEventStore for T {
    fn append_dyn(&self, request: AppendRequest) -> BoxFuture<'_, Result<AppendResult, Error>> {
        Box::pin(self.append(request))
    }

    fn idempotency_outcome_dyn<'a>(
        &'a self,
        key: &'a IdempotencyKey,
    ) -> BoxFuture<'a, Result<Option<AppendResult>, Error>> {
        Box::pin(self.idempotency_outcome(key))
    }

    fn read_stream_dyn<'a>(
        &'a self,
        stream: &'a StreamId,
        after: StreamVersion,
    ) -> EventStream<'a> {
        self.read_stream(stream, after)
    }

    fn read_stream_payloads_dyn<'a>(
        &'a self,
        stream: &'a StreamId,
        after: StreamVersion,
    ) -> PayloadStream<'a> {
        self.read_stream_payloads(stream, after)
    }

    fn read_all_dyn<'a>(
        &'a self,
        after: LogPosition,
        limit: usize,
        filter: &'a EventFilter,
    ) -> BoxFuture<'a, Result<Vec<RecordedEvent>, Error>> {
        Box::pin(self.read_all(after, limit, filter))
    }

    fn head_dyn(&self) -> BoxFuture<'_, Result<LogPosition, Error>> {
        Box::pin(self.head())
    }

    fn position_at_dyn(&self, time: DateTime<Utc>) -> BoxFuture<'_, Result<LogPosition, Error>> {
        Box::pin(self.position_at(time))
    }

    fn replica_lag_dyn(&self) -> Option<ReplicaLag> {
        self.replica_lag()
    }
}

impl EventStore for dyn DynEventStore {
    fn append(
        &self,
        request: AppendRequest,
    ) -> impl Future<Output = Result<AppendResult, Error>> + Send {
        self.append_dyn(request)
    }

    // An async fn, so the future may borrow `self` and `key` for different lifetimes.
    async fn idempotency_outcome(
        &self,
        key: &IdempotencyKey,
    ) -> Result<Option<AppendResult>, Error> {
        self.idempotency_outcome_dyn(key).await
    }

    fn read_stream<'a>(&'a self, stream: &'a StreamId, after: StreamVersion) -> EventStream<'a> {
        self.read_stream_dyn(stream, after)
    }

    fn read_stream_payloads<'a>(
        &'a self,
        stream: &'a StreamId,
        after: StreamVersion,
    ) -> PayloadStream<'a> {
        self.read_stream_payloads_dyn(stream, after)
    }

    async fn read_all(
        &self,
        after: LogPosition,
        limit: usize,
        filter: &EventFilter,
    ) -> Result<Vec<RecordedEvent>, Error> {
        self.read_all_dyn(after, limit, filter).await
    }

    fn head(&self) -> impl Future<Output = Result<LogPosition, Error>> + Send {
        self.head_dyn()
    }

    fn position_at(
        &self,
        time: DateTime<Utc>,
    ) -> impl Future<Output = Result<LogPosition, Error>> + Send {
        self.position_at_dyn(time)
    }

    fn replica_lag(&self) -> Option<ReplicaLag> {
        self.replica_lag_dyn()
    }
}

impl<T: EventStore + ?Sized> EventStore for Arc<T> {
    fn append(
        &self,
        request: AppendRequest,
    ) -> impl Future<Output = Result<AppendResult, Error>> + Send {
        (**self).append(request)
    }

    fn idempotency_outcome(
        &self,
        key: &IdempotencyKey,
    ) -> impl Future<Output = Result<Option<AppendResult>, Error>> + Send {
        (**self).idempotency_outcome(key)
    }

    fn read_stream<'a>(&'a self, stream: &'a StreamId, after: StreamVersion) -> EventStream<'a> {
        (**self).read_stream(stream, after)
    }

    fn read_stream_payloads<'a>(
        &'a self,
        stream: &'a StreamId,
        after: StreamVersion,
    ) -> PayloadStream<'a> {
        (**self).read_stream_payloads(stream, after)
    }

    fn read_all(
        &self,
        after: LogPosition,
        limit: usize,
        filter: &EventFilter,
    ) -> impl Future<Output = Result<Vec<RecordedEvent>, Error>> + Send {
        (**self).read_all(after, limit, filter)
    }

    fn head(&self) -> impl Future<Output = Result<LogPosition, Error>> + Send {
        (**self).head()
    }

    fn position_at(
        &self,
        time: DateTime<Utc>,
    ) -> impl Future<Output = Result<LogPosition, Error>> + Send {
        (**self).position_at(time)
    }

    fn replica_lag(&self) -> Option<ReplicaLag> {
        (**self).replica_lag()
    }
}

/// The dyn-compatible twin of [`SnapshotStore`], implemented for every snapshot store.
pub trait DynSnapshotStore: Send + Sync {
    /// See [`SnapshotStore::save_snapshot`].
    fn save_snapshot_dyn(&self, snapshot: StoredSnapshot) -> BoxFuture<'_, Result<(), Error>>;

    /// See [`SnapshotStore::load_snapshot`].
    fn load_snapshot_dyn<'a>(
        &'a self,
        stream: &'a StreamId,
    ) -> BoxFuture<'a, Result<Option<StoredSnapshot>, Error>>;
}

impl<T: SnapshotStore> DynSnapshotStore for T {
    fn save_snapshot_dyn(&self, snapshot: StoredSnapshot) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(self.save_snapshot(snapshot))
    }

    fn load_snapshot_dyn<'a>(
        &'a self,
        stream: &'a StreamId,
    ) -> BoxFuture<'a, Result<Option<StoredSnapshot>, Error>> {
        Box::pin(self.load_snapshot(stream))
    }
}

impl SnapshotStore for dyn DynSnapshotStore {
    fn save_snapshot(
        &self,
        snapshot: StoredSnapshot,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        self.save_snapshot_dyn(snapshot)
    }

    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<StoredSnapshot>, Error> {
        self.load_snapshot_dyn(stream).await
    }
}

impl<T: SnapshotStore + ?Sized> SnapshotStore for Arc<T> {
    fn save_snapshot(
        &self,
        snapshot: StoredSnapshot,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        (**self).save_snapshot(snapshot)
    }

    fn load_snapshot(
        &self,
        stream: &StreamId,
    ) -> impl Future<Output = Result<Option<StoredSnapshot>, Error>> + Send {
        (**self).load_snapshot(stream)
    }
}
