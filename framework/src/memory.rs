//! The in-memory backend: the embedded default.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use chrono::{DateTime, Utc};

use crate::error::Error;
use crate::event::{NewEvent, RecordedEvent};
use crate::idempotency::IdempotencyKey;
use crate::ids::{EventId, GlobalPosition, LogPosition, StreamId, StreamVersion};
use crate::store::{
    AppendRequest, AppendResult, EventFilter, EventStore, EventStream, SnapshotStore,
    StoredSnapshot,
};
use crate::subscription::{CheckpointStore, DeadLetterStore, ParkedEvent};

/// A complete event store in memory: examples, unit tests and single-process tools run on it with
/// no database.
///
/// It is a real backend, not a test double: it keeps every guarantee of [`EventStore`] (atomic
/// batches, optimistic concurrency, idempotent re-append, one global order) and passes the same
/// conformance suite as PostgreSQL. Clones share the same data, so it can be handed to many tasks.
/// Nothing survives the process.
///
/// ```
/// # tokio_test_block_on(async {
/// use factum::{AppendRequest, EventStore, ExpectedVersion, InMemoryStore, NewEvent, StreamId, StreamVersion};
/// use futures_util::TryStreamExt;
///
/// let store = InMemoryStore::new();
/// let stream = StreamId::new("account-1").unwrap();
/// let event = NewEvent {
///     event_id: factum::EventId::new(),
///     event_type: "account.opened".into(),
///     schema_version: 1,
///     payload: serde_json::value::to_raw_value(&serde_json::json!({"owner": "Ada"})).unwrap(),
///     metadata: Default::default(),
/// };
/// let request = AppendRequest::new(stream.clone(), vec![event]).expected_version(ExpectedVersion::NoStream);
/// store.append(request).await.unwrap();
/// let events: Vec<_> = store.read_stream(&stream, StreamVersion::INITIAL).try_collect().await.unwrap();
/// assert_eq!(events.len(), 1);
/// # });
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Clone, Default)]
pub struct InMemoryStore {
    inner: Arc<RwLock<Inner>>,
    #[cfg(feature = "personal")]
    shredder: Option<crate::personal::Shredder>,
}

#[derive(Default)]
struct Inner {
    /// The global log, in log order (appends are serialised by the write lock).
    log: Vec<RecordedEvent>,
    /// Each stream's events as indexes into `log`, in version order.
    streams: HashMap<StreamId, Vec<usize>>,
    /// Every stored event id and its index in `log`.
    ids: HashMap<EventId, usize>,
    commits: u64,
    snapshots: HashMap<StreamId, StoredSnapshot>,
    /// Idempotency keys and what their appends stored.
    keys: HashMap<IdempotencyKey, KeyRecord>,
    checkpoints: HashMap<String, LogPosition>,
    dead_letters: Vec<ParkedEvent>,
    /// The streams holding each subject's personal fields.
    #[cfg(feature = "personal")]
    personal: HashMap<crate::personal::SubjectId, HashSet<StreamId>>,
}

/// What an idempotency key was stored with.
struct KeyRecord {
    event_ids: Vec<EventId>,
    result: AppendResult,
    stored_at: DateTime<Utc>,
}

impl std::fmt::Debug for InMemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.read();
        f.debug_struct("InMemoryStore")
            .field("events", &inner.log.len())
            .field("streams", &inner.streams.len())
            .finish()
    }
}

impl InMemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of events stored.
    pub fn len(&self) -> usize {
        self.read().log.len()
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The position of the last stored event ([`LogPosition::START`] when empty).
    pub fn head(&self) -> LogPosition {
        self.read()
            .log
            .last()
            .map_or(LogPosition::START, |e| e.position)
    }

    /// Removes the idempotency keys stored before `before` and returns how many: a request
    /// repeating one of them afterwards is a new write. Nothing else is removed.
    pub fn expire_idempotency_keys(&self, before: DateTime<Utc>) -> usize {
        let mut inner = self.write();
        let count = inner.keys.len();
        inner.keys.retain(|_, record| record.stored_at >= before);
        count - inner.keys.len()
    }

    // A panic while holding the lock cannot leave the data half-written (appends validate first,
    // then push), so a poisoned lock is still consistent.
    /// Stores personal fields encrypted with `shredder`'s keys and decrypts them on every read
    /// (see [`personal`](crate::personal)); [`forget_subject`](Self::forget_subject) forgets.
    /// Clones made afterwards share the shredder; the data is shared with clones made before.
    ///
    /// ```
    /// use factum::InMemoryStore;
    /// use factum::personal::{InMemoryKeyStore, Shredder};
    ///
    /// let store = InMemoryStore::new().with_shredder(Shredder::new(InMemoryKeyStore::new()));
    /// ```
    #[cfg(feature = "personal")]
    #[must_use]
    pub fn with_shredder(mut self, shredder: crate::personal::Shredder) -> Self {
        self.shredder = Some(shredder);
        self
    }

    /// Forgets a data subject: deletes its key through the store's shredder (its personal fields
    /// read as placeholders from now on), deletes the snapshots of every stream holding its
    /// personal fields, and appends a [`SubjectForgotten`](crate::personal::SubjectForgotten)
    /// marker to [`SubjectId::forgotten_stream`](crate::personal::SubjectId::forgotten_stream)
    /// for read models to erase their copies. Safe to repeat (each call appends a marker).
    ///
    /// Fails with [`Error::InvalidArgument`] when the store has no shredder.
    #[cfg(feature = "personal")]
    pub async fn forget_subject(
        &self,
        subject: &crate::personal::SubjectId,
    ) -> Result<crate::personal::ForgetOutcome, Error> {
        let shredder = self.shredder.as_ref().ok_or_else(|| {
            Error::InvalidArgument(
                "this store has no shredder: give it one with `with_shredder`".into(),
            )
        })?;
        let had_key = shredder.forget(subject).await?;
        let (streams, snapshots_deleted) = {
            let mut inner = self.write();
            let streams: Vec<StreamId> = inner
                .personal
                .get(subject)
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default();
            let mut deleted = 0;
            for stream in &streams {
                deleted += u64::from(inner.snapshots.remove(stream).is_some());
            }
            (streams, deleted)
        };
        let marker = crate::personal::SubjectForgotten {
            subject: subject.clone(),
        };
        let event = NewEvent::encode(&marker, crate::event::EventMetadata::default())
            .map_err(|e| Error::permanent("forget a subject", e))?;
        let appended =
            self.append_now(AppendRequest::new(subject.forgotten_stream(), vec![event]))?;
        Ok(crate::personal::ForgetOutcome {
            subject: subject.clone(),
            had_key,
            streams,
            snapshots_deleted,
            marker: appended.positions[0],
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Inner {
    fn version(&self, stream: &StreamId) -> StreamVersion {
        StreamVersion::new(self.streams.get(stream).map_or(0, |s| s.len() as u64))
    }

    /// `Some(result)` when the whole batch is already stored as consecutive events of `stream`;
    /// an error when it is partly stored; `None` when none of it is.
    fn existing(
        &self,
        stream: &StreamId,
        events: &[NewEvent],
    ) -> Result<Option<AppendResult>, Error> {
        let found: Vec<Option<&RecordedEvent>> = events
            .iter()
            .map(|e| self.ids.get(&e.event_id).map(|&i| &self.log[i]))
            .collect();
        if found.iter().all(Option::is_none) {
            return Ok(None);
        }
        let first = found.iter().flatten().next().map(|e| e.stream_version);
        let exact = found.iter().enumerate().all(|(i, e)| {
            e.is_some_and(|e| {
                &e.stream_id == stream
                    && first.map(|f| f.get() + i as u64) == Some(e.stream_version.get())
            })
        });
        if exact {
            let stored: Vec<&RecordedEvent> = found.into_iter().flatten().collect();
            let first = StreamVersion::new(stored[0].stream_version.get() - 1);
            return Ok(Some(
                AppendResult::new(
                    stream.clone(),
                    first,
                    stored.iter().map(|e| e.position.global).collect(),
                )
                .as_duplicate(),
            ));
        }
        let (event, existing) = events
            .iter()
            .zip(&found)
            .find_map(|(e, f)| f.map(|f| (e, f)))
            .expect("at least one event id was found above");
        Err(Error::DuplicateEventId {
            stream: stream.clone(),
            event_id: event.event_id,
            existing_stream: existing.stream_id.clone(),
        })
    }
}

impl Inner {
    /// The rule for a request whose key is stored: the original outcome for the same batch, an
    /// error for another.
    fn repeat(
        &self,
        key: &IdempotencyKey,
        stream: &StreamId,
        events: &[NewEvent],
    ) -> Option<Result<AppendResult, Error>> {
        let record = self.keys.get(key)?;
        let same = &record.result.stream == stream
            && record.event_ids.len() == events.len()
            && record
                .event_ids
                .iter()
                .zip(events)
                .all(|(id, e)| *id == e.event_id);
        Some(if same {
            Ok(record.result.clone().as_duplicate())
        } else {
            Err(Error::IdempotencyKeyReused {
                key: key.clone(),
                stream: stream.clone(),
                stored_stream: record.result.stream.clone(),
            })
        })
    }
}

impl InMemoryStore {
    /// The append, through the shredder when there is one.
    fn append_sealed(
        &self,
        request: AppendRequest,
    ) -> impl Future<Output = Result<AppendResult, Error>> + Send + '_ {
        #[cfg(feature = "personal")]
        if let Some(shredder) = &self.shredder {
            let shredder = shredder.clone();
            return futures_util::future::Either::Left(async move {
                let mut request = request;
                let subjects = shredder.seal(&mut request.events).await?;
                let stream = request.stream.clone();
                let result = self.append_now(request)?;
                if !subjects.is_empty() {
                    let mut inner = self.write();
                    for subject in subjects {
                        inner
                            .personal
                            .entry(subject)
                            .or_default()
                            .insert(stream.clone());
                    }
                }
                Ok(result)
            });
        }
        let result = self.append_now(request);
        #[cfg(feature = "personal")]
        let result = futures_util::future::Either::Right(std::future::ready(result));
        #[cfg(not(feature = "personal"))]
        let result = std::future::ready(result);
        result
    }

    fn append_now(&self, request: AppendRequest) -> Result<AppendResult, Error> {
        (|| {
            let AppendRequest {
                stream,
                expected,
                events,
                idempotency_key,
                ..
            } = request;
            validate_batch(&stream, &events)?;
            let mut inner = self.write();
            if let Some(repeat) = idempotency_key
                .as_ref()
                .and_then(|key| inner.repeat(key, &stream, &events))
            {
                return repeat;
            }
            if let Some(result) = inner.existing(&stream, &events)? {
                return Ok(result);
            }
            let actual = inner.version(&stream);
            if !expected.matches(actual) {
                return Err(Error::Conflict {
                    stream,
                    expected,
                    actual,
                });
            }
            inner.commits += 1;
            let commit = inner.commits;
            let recorded_at = Utc::now();
            let mut version = actual;
            let mut positions = Vec::with_capacity(events.len());
            let event_ids: Vec<EventId> = events.iter().map(|e| e.event_id).collect();
            for event in events {
                version = version.next();
                let index = inner.log.len();
                let global = GlobalPosition::new(index as u64 + 1);
                positions.push(global);
                inner.ids.insert(event.event_id, index);
                inner.streams.entry(stream.clone()).or_default().push(index);
                inner.log.push(RecordedEvent {
                    event_id: event.event_id,
                    stream_id: stream.clone(),
                    stream_version: version,
                    position: LogPosition::new(commit, global),
                    event_type: event.event_type,
                    schema_version: event.schema_version,
                    payload: event.payload,
                    metadata: event.metadata,
                    recorded_at,
                });
            }
            let result = AppendResult::new(stream, actual, positions);
            if let Some(key) = idempotency_key {
                inner.keys.insert(
                    key,
                    KeyRecord {
                        event_ids,
                        result: result.clone(),
                        stored_at: recorded_at,
                    },
                );
            }
            Ok(result)
        })()
    }
}

impl EventStore for InMemoryStore {
    fn append(
        &self,
        request: AppendRequest,
    ) -> impl Future<Output = Result<AppendResult, Error>> + Send {
        self.append_sealed(request)
    }

    fn idempotency_outcome(
        &self,
        key: &IdempotencyKey,
    ) -> impl Future<Output = Result<Option<AppendResult>, Error>> + Send {
        let outcome = self
            .read()
            .keys
            .get(key)
            .map(|record| record.result.clone().as_duplicate());
        std::future::ready(Ok(outcome))
    }

    fn read_stream<'a>(&'a self, stream: &'a StreamId, after: StreamVersion) -> EventStream<'a> {
        let events: Vec<Result<RecordedEvent, Error>> = {
            let inner = self.read();
            inner.streams.get(stream).map_or_else(Vec::new, |indexes| {
                indexes
                    .iter()
                    .skip(usize::try_from(after.get()).unwrap_or(usize::MAX))
                    .map(|&i| Ok(inner.log[i].clone()))
                    .collect()
            })
        };
        #[cfg(feature = "personal")]
        if let Some(shredder) = &self.shredder {
            use futures_util::StreamExt as _;
            return Box::pin(
                futures_util::stream::iter(events).then(move |event| async move {
                    let mut event = event?;
                    shredder.open(&mut event).await?;
                    Ok(event)
                }),
            );
        }
        Box::pin(futures_util::stream::iter(events))
    }

    fn read_all(
        &self,
        after: LogPosition,
        limit: usize,
        filter: &EventFilter,
    ) -> impl Future<Output = Result<Vec<RecordedEvent>, Error>> + Send {
        let events: Vec<RecordedEvent> = {
            let inner = self.read();
            let start = inner.log.partition_point(|e| e.position <= after);
            inner.log[start..]
                .iter()
                .filter(|e| filter.matches(e))
                .take(limit)
                .cloned()
                .collect()
        };
        async move {
            #[cfg(feature = "personal")]
            if let Some(shredder) = &self.shredder {
                let mut events = events;
                for event in &mut events {
                    shredder.open(event).await?;
                }
                return Ok(events);
            }
            Ok(events)
        }
    }

    fn head(&self) -> impl Future<Output = Result<LogPosition, Error>> + Send {
        std::future::ready(Ok(InMemoryStore::head(self)))
    }
}

impl CheckpointStore for InMemoryStore {
    fn load_checkpoint(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<LogPosition>, Error>> + Send {
        std::future::ready(Ok(self.read().checkpoints.get(name).copied()))
    }

    fn save_checkpoint(
        &self,
        name: &str,
        position: LogPosition,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        self.write().checkpoints.insert(name.to_owned(), position);
        std::future::ready(Ok(()))
    }
}

impl DeadLetterStore for InMemoryStore {
    fn park(&self, parked: ParkedEvent) -> impl Future<Output = Result<(), Error>> + Send {
        let mut inner = self.write();
        // Parking an event again (a retried park) replaces its dead letter.
        inner.dead_letters.retain(|p| {
            p.subscription != parked.subscription || p.event.event_id != parked.event.event_id
        });
        inner.dead_letters.push(parked);
        std::future::ready(Ok(()))
    }

    fn parked(
        &self,
        subscription: &str,
    ) -> impl Future<Output = Result<Vec<ParkedEvent>, Error>> + Send {
        let parked = self
            .read()
            .dead_letters
            .iter()
            .filter(|p| p.subscription == subscription)
            .cloned()
            .collect();
        std::future::ready(Ok(parked))
    }

    fn unpark(
        &self,
        subscription: &str,
        event_id: EventId,
    ) -> impl Future<Output = Result<Option<ParkedEvent>, Error>> + Send {
        let mut inner = self.write();
        let found = inner
            .dead_letters
            .iter()
            .position(|p| p.subscription == subscription && p.event.event_id == event_id);
        std::future::ready(Ok(found.map(|i| inner.dead_letters.remove(i))))
    }
}

impl SnapshotStore for InMemoryStore {
    fn save_snapshot(
        &self,
        snapshot: StoredSnapshot,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        let mut inner = self.write();
        let newer_stored = inner
            .snapshots
            .get(&snapshot.stream_id)
            .is_some_and(|s| s.stream_version > snapshot.stream_version);
        if !newer_stored {
            inner.snapshots.insert(snapshot.stream_id.clone(), snapshot);
        }
        std::future::ready(Ok(()))
    }

    fn load_snapshot(
        &self,
        stream: &StreamId,
    ) -> impl Future<Output = Result<Option<StoredSnapshot>, Error>> + Send {
        std::future::ready(Ok(self.read().snapshots.get(stream).cloned()))
    }
}

/// Checks what every backend rejects before touching storage: an empty batch, one that repeats
/// an event id, or one holding personal fields in plaintext (a store encrypts them only when it
/// has a `Shredder`: see [`personal`](crate::personal)).
pub fn validate_batch(stream: &StreamId, events: &[NewEvent]) -> Result<(), Error> {
    if events.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "append to stream `{stream}` has no events (a batch holds at least one)"
        )));
    }
    let mut seen = HashSet::with_capacity(events.len());
    if let Some(dup) = events.iter().find(|e| !seen.insert(e.event_id)) {
        return Err(Error::InvalidArgument(format!(
            "append to stream `{stream}` contains event id {} twice (each event of a batch needs its own id)",
            dup.event_id
        )));
    }
    if let Some(plain) = events
        .iter()
        .find(|e| crate::personal::mentions(&e.payload, crate::personal::PLAINTEXT_KEY))
    {
        return Err(Error::InvalidArgument(format!(
            "event {} ({}) appended to stream `{stream}` holds personal fields in plaintext: give the store a `factum::personal::Shredder` (`with_shredder`, feature `personal`) so they are stored encrypted",
            plain.event_id, plain.event_type
        )));
    }
    Ok(())
}
