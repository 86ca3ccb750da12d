//! `Resilient<S>`: resilience for any backend, by wrapping it.

use std::pin::Pin;

use futures_core::Stream;
use futures_util::StreamExt;

use crate::error::{Error, ErrorKind};
use crate::event::RecordedEvent;
use crate::idempotency::IdempotencyKey;
use crate::ids::{EventId, LogPosition, StreamId, StreamVersion};
use crate::store::{
    AppendRequest, AppendResult, EventFilter, EventPayload, EventStore, EventStream, PayloadStream,
    SnapshotStore, StoredSnapshot,
};
use crate::subscription::{CheckpointStore, DeadLetterStore, ParkedEvent};

use super::{Operation, Resilience, RetryGate};

/// Wraps any [`EventStore`] / [`SnapshotStore`] with a [`Resilience`]: each call goes through
/// the circuit breaker, and failures are retried by their class under the operation's
/// [`RetryPolicy`](super::RetryPolicy) and the shared [`RetryBudget`](super::RetryBudget).
///
/// Why a wrapper rather than retries inside each backend: the backend classifies its errors
/// once (SQLSTATE → [`ErrorKind`]), and the policy — what to retry, how long, when to stop
/// calling — is written and tested once, here, for every backend. The store's idempotent
/// re-append rule makes this sound for appends: a batch whose outcome is unknown is re-appended
/// *unchanged* (same event ids); if the first attempt had landed, the store answers
/// `duplicate: true` and stores nothing, so a retried append is stored exactly once.
///
/// | call | operation | retried on |
/// | --- | --- | --- |
/// | `append` | [`Append`](Operation::Append) | transient errors and unknown outcomes (same batch) |
/// | `read_stream`, `read_stream_payloads` | [`Read`](Operation::Read) | transient errors: resumes after the last event it returned |
/// | `read_all`, `head`, `idempotency_outcome` | [`Read`](Operation::Read) | transient errors |
/// | `save_snapshot` | [`Snapshot`](Operation::Snapshot) | transient errors and unknown outcomes (saving is idempotent) |
/// | `load_snapshot` | [`Snapshot`](Operation::Snapshot) | transient errors |
/// | `save_checkpoint`, `park` | [`SubscriptionPoll`](Operation::SubscriptionPoll) | transient errors and unknown outcomes (both are idempotent upserts) |
/// | `load_checkpoint`, `parked`, `unpark` | [`SubscriptionPoll`](Operation::SubscriptionPoll) | transient errors |
///
/// ```
/// use factum::resilience::Resilient;
/// use factum::{AppendRequest, EventStore, ExpectedVersion, InMemoryStore, NewEvent, StreamId};
///
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// let store = Resilient::new("memory", InMemoryStore::new());
/// let stream = StreamId::new("account-1").unwrap();
/// let event = NewEvent {
///     event_id: factum::EventId::new(),
///     event_type: "account.opened".into(),
///     schema_version: 1,
///     payload: serde_json::value::to_raw_value(&serde_json::json!({})).unwrap(),
///     metadata: Default::default(),
/// };
/// let request = AppendRequest::new(stream, vec![event]).expected_version(ExpectedVersion::NoStream);
/// let appended = store.append(request).await.unwrap();
/// assert_eq!(appended.stream_version.get(), 1);
/// assert_eq!(store.inner().len(), 1);
/// # });
/// ```
#[derive(Clone, Debug)]
pub struct Resilient<S> {
    inner: S,
    resilience: Resilience,
}

impl<S> Resilient<S> {
    /// Wraps `inner` with the default [`Resilience`] for `dependency` (its name in errors, logs
    /// and metrics, e.g. `"postgres"`).
    pub fn new(dependency: &'static str, inner: S) -> Self {
        Self::with_resilience(inner, Resilience::new(dependency))
    }

    /// Wraps `inner` with a configured [`Resilience`] (a clone of one shared with the other
    /// components that use the same dependency).
    pub fn with_resilience(inner: S, resilience: Resilience) -> Self {
        Self { inner, resilience }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Unwraps the store.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The policies, budget and breaker in use: [`Resilience::health`] and
    /// [`Resilience::is_open`] are the hooks for fallbacks.
    pub fn resilience(&self) -> &Resilience {
        &self.resilience
    }
}

impl<S: EventStore> EventStore for Resilient<S> {
    async fn append(&self, request: AppendRequest) -> Result<AppendResult, Error> {
        self.resilience
            .run_idempotent(Operation::Append, || {
                // The very same batch, ids and key included, on every attempt.
                self.inner.append(request.clone())
            })
            .await
    }

    async fn idempotency_outcome(
        &self,
        key: &IdempotencyKey,
    ) -> Result<Option<AppendResult>, Error> {
        self.resilience
            .run(Operation::Read, || self.inner.idempotency_outcome(key))
            .await
    }

    fn read_stream<'a>(&'a self, stream: &'a StreamId, after: StreamVersion) -> EventStream<'a> {
        Box::pin(futures_util::stream::unfold(
            ReadState::<S, RecordedEvent>::new(self, stream, after),
            ReadState::next,
        ))
    }

    fn read_stream_payloads<'a>(
        &'a self,
        stream: &'a StreamId,
        after: StreamVersion,
    ) -> PayloadStream<'a> {
        Box::pin(futures_util::stream::unfold(
            ReadState::<S, EventPayload>::new(self, stream, after),
            ReadState::next,
        ))
    }

    async fn read_all(
        &self,
        after: LogPosition,
        limit: usize,
        filter: &EventFilter,
    ) -> Result<Vec<RecordedEvent>, Error> {
        self.resilience
            .run(Operation::Read, || {
                self.inner.read_all(after, limit, filter)
            })
            .await
    }

    async fn head(&self) -> Result<LogPosition, Error> {
        self.resilience
            .run(Operation::Read, || self.inner.head())
            .await
    }

    async fn position_at(&self, time: chrono::DateTime<chrono::Utc>) -> Result<LogPosition, Error> {
        self.resilience
            .run(Operation::Read, || self.inner.position_at(time))
            .await
    }

    fn replica_lag(&self) -> Option<crate::ReplicaLag> {
        self.inner.replica_lag()
    }
}

impl<S: SnapshotStore> SnapshotStore for Resilient<S> {
    async fn save_snapshot(&self, snapshot: StoredSnapshot) -> Result<(), Error> {
        self.resilience
            .run_idempotent(Operation::Snapshot, || {
                self.inner.save_snapshot(snapshot.clone())
            })
            .await
    }

    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<StoredSnapshot>, Error> {
        self.resilience
            .run(Operation::Snapshot, || self.inner.load_snapshot(stream))
            .await
    }
}

impl<S: CheckpointStore> CheckpointStore for Resilient<S> {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<LogPosition>, Error> {
        self.resilience
            .run(Operation::SubscriptionPoll, || {
                self.inner.load_checkpoint(name)
            })
            .await
    }

    async fn save_checkpoint(&self, name: &str, position: LogPosition) -> Result<(), Error> {
        self.resilience
            .run_idempotent(Operation::SubscriptionPoll, || {
                self.inner.save_checkpoint(name, position)
            })
            .await
    }
}

impl<S: DeadLetterStore> DeadLetterStore for Resilient<S> {
    async fn park(&self, parked: ParkedEvent) -> Result<(), Error> {
        self.resilience
            .run_idempotent(Operation::SubscriptionPoll, || {
                self.inner.park(parked.clone())
            })
            .await
    }

    async fn parked(&self, subscription: &str) -> Result<Vec<ParkedEvent>, Error> {
        self.resilience
            .run(Operation::SubscriptionPoll, || {
                self.inner.parked(subscription)
            })
            .await
    }

    async fn unpark(
        &self,
        subscription: &str,
        event_id: EventId,
    ) -> Result<Option<ParkedEvent>, Error> {
        // Not idempotent (a lost answer's retry finds nothing parked): only transient errors.
        self.resilience
            .run(Operation::SubscriptionPoll, || {
                self.inner.unpark(subscription, event_id)
            })
            .await
    }
}

/// A stream read that, after a transient error, re-opens the stream after the last event it
/// returned, so the reader sees every event once and in order.
/// What a resumable stream read returns: full events or payloads.
trait StreamItem: Sized + Send {
    /// The item's version in its stream (where a resumed read starts after).
    fn version(&self) -> StreamVersion;

    /// Opens the inner store's read of this kind.
    fn open<'a, S: EventStore>(
        store: &'a S,
        stream: &'a StreamId,
        after: StreamVersion,
    ) -> ItemStream<'a, Self>;
}

type ItemStream<'a, T> = Pin<Box<dyn Stream<Item = Result<T, Error>> + Send + 'a>>;

impl StreamItem for RecordedEvent {
    fn version(&self) -> StreamVersion {
        self.stream_version
    }

    fn open<'a, S: EventStore>(
        store: &'a S,
        stream: &'a StreamId,
        after: StreamVersion,
    ) -> ItemStream<'a, Self> {
        store.read_stream(stream, after)
    }
}

impl StreamItem for EventPayload {
    fn version(&self) -> StreamVersion {
        self.stream_version
    }

    fn open<'a, S: EventStore>(
        store: &'a S,
        stream: &'a StreamId,
        after: StreamVersion,
    ) -> ItemStream<'a, Self> {
        store.read_stream_payloads(stream, after)
    }
}

struct ReadState<'a, S, T> {
    store: &'a Resilient<S>,
    stream: &'a StreamId,
    after: StreamVersion,
    current: Option<ItemStream<'a, T>>,
    /// The retry bookkeeping since the last event returned (progress starts it afresh).
    gate: Option<RetryGate<'a>>,
    backoff: Option<super::FullJitter>,
    started: bool,
    done: bool,
}

impl<'a, S: EventStore, T: StreamItem> ReadState<'a, S, T> {
    fn new(store: &'a Resilient<S>, stream: &'a StreamId, after: StreamVersion) -> Self {
        Self {
            store,
            stream,
            after,
            current: None,
            gate: None,
            backoff: None,
            started: false,
            done: false,
        }
    }

    async fn next(mut self) -> Option<(Result<T, Error>, Self)> {
        let resilience = &self.store.resilience;
        loop {
            if self.done {
                return None;
            }
            let (mut current, permit) = match self.current.take() {
                Some(current) => (current, None),
                None => {
                    if !self.started {
                        self.started = true;
                        resilience.budget.deposit();
                    }
                    let permit = match resilience.breaker.try_acquire() {
                        Ok(permit) => permit,
                        Err(unavailable) => {
                            self.done = true;
                            return Some((Err(unavailable), self));
                        }
                    };
                    (
                        T::open(&self.store.inner, self.stream, self.after),
                        Some(permit),
                    )
                }
            };
            let item = current.next().await;
            let error = item.as_ref().and_then(|r| r.as_ref().err());
            match permit {
                Some(permit) => permit.record_outcome(error),
                None => resilience.breaker.record_outcome(error),
            }
            match item {
                None => {
                    self.done = true;
                    return None;
                }
                Some(Ok(event)) => {
                    self.after = event.version();
                    self.current = Some(current);
                    self.gate = None;
                    self.backoff = None;
                    return Some((Ok(event), self));
                }
                Some(Err(error)) => {
                    drop(current);
                    let delay = if error.kind() == ErrorKind::Transient {
                        let gate = self
                            .gate
                            .get_or_insert_with(|| RetryGate::new(resilience, Operation::Read));
                        let backoff = self.backoff.get_or_insert_with(|| {
                            resilience.policies.get(Operation::Read).backoff()
                        });
                        gate.allow(&error, backoff.next())
                    } else {
                        None
                    };
                    match delay {
                        Some(delay) => tokio::time::sleep(delay).await,
                        None => {
                            self.done = true;
                            return Some((Err(error), self));
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
