//! The command executor: load, decide, append, retry on conflict.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use serde::Serialize;
use serde_json::value::RawValue;
use tracing::Instrument;

use crate::aggregate::{Aggregate, Command, Snapshot};
use crate::error::{CommandError, Error};
use crate::event::{Event, EventMetadata, Metadata, NewEvent};
use crate::idempotency::IdempotencyKey;
use crate::ids::{
    CausationId, CommandId, CorrelationId, EventId, GlobalPosition, LogPosition, StreamId,
    StreamVersion,
};
use crate::store::{
    AppendRequest, AppendResult, DynSnapshotStore, EventPayload, EventStore, ExpectedVersion,
    SnapshotStore, StoredSnapshot,
};

mod cache;
mod turns;

use cache::StateCache;
use turns::Turns;

/// Where a command comes from: its id, the workflow it belongs to, and metadata to stamp on every
/// event it produces.
///
/// Every event a command produces carries the context's correlation id and, as its causation id,
/// the command's id. A process manager reacting to an event builds the context of its next command
/// with [`CommandContext::caused_by`], so the correlation id flows through the whole workflow.
///
/// # A context is one command
/// The command id is the command's identity: the ids of the events it produces are derived from
/// it ([`EventId::derived`]), so executing a context again is a *retry* of the same command, never
/// a second command. Give each command its own context ([`CommandContext::new`], or
/// [`caused_by_nth`](Self::caused_by_nth) for the n-th command a process manager issues for one
/// event). For exactly-once across retries, after an unknown outcome or from several processes,
/// also give the command an idempotency key ([`idempotent`](Self::idempotent),
/// [`with_idempotency_key`](Self::with_idempotency_key)): the [`Repository`] then stores its events
/// once and returns the same [`Committed`] for every execution.
///
/// ```
/// # use factum::{Aggregate, InMemoryStore, Repository, CommandContext, CommandId};
/// # async fn run<A: Aggregate>(repository: Repository<A, InMemoryStore>, command: A::Command) -> Result<(), Box<dyn std::error::Error>>
/// # where A::Command: Clone, A::Error: 'static {
/// // The id a client sent with its request: retrying the request retries the command.
/// let context = CommandContext::new().with_command_id(CommandId::new()).idempotent();
/// let first = repository.execute_with(command.clone(), &context).await?;
/// let again = repository.execute_with(command, &context).await?;
/// assert_eq!(first.positions, again.positions);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct CommandContext {
    /// This command's id; the causation id of the events it produces, and the seed of their ids.
    pub command_id: CommandId,
    /// The workflow this command belongs to.
    pub correlation_id: CorrelationId,
    /// What caused this command (an event, another command), if anything.
    pub causation_id: Option<CausationId>,
    /// Metadata copied onto every event the command produces.
    pub metadata: Metadata,
    /// Stored with the command's events: executing a command with this key again stores nothing
    /// and returns the original outcome.
    pub idempotency_key: Option<IdempotencyKey>,
}

impl Default for CommandContext {
    fn default() -> Self {
        Self::new()
    }
}

impl CommandContext {
    /// A context that starts a new workflow: a fresh command id, and a fresh correlation id.
    pub fn new() -> Self {
        let command_id = CommandId::new();
        Self {
            command_id,
            correlation_id: CorrelationId::from_uuid(command_id.as_uuid()),
            causation_id: None,
            metadata: Metadata::new(),
            idempotency_key: None,
        }
    }

    /// The context of the command a process manager issues in reaction to a stored event: same
    /// correlation id, caused by that event, and a command id derived from the event's id
    /// ([`CommandId::derived`] with index 0), so a replay issues the same command. The same as
    /// `caused_by_nth(event, 0)`.
    pub fn caused_by<E>(event: &crate::Envelope<E>) -> Self {
        Self::caused_by_nth(event, 0)
    }

    /// The context of the `index`-th command (from 0) issued in reaction to one event.
    pub fn caused_by_nth<E>(event: &crate::Envelope<E>, index: u32) -> Self {
        Self {
            command_id: CommandId::derived(event.event_id, index),
            correlation_id: event
                .metadata
                .correlation_id
                .unwrap_or_else(|| CorrelationId::from_uuid(event.event_id.as_uuid())),
            causation_id: Some(event.event_id.into()),
            metadata: Metadata::new(),
            idempotency_key: None,
        }
    }

    /// Sets the command id (e.g. one a client sent with its request, so that retrying the request
    /// retries the same command).
    #[must_use]
    pub fn with_command_id(mut self, command_id: CommandId) -> Self {
        self.command_id = command_id;
        self
    }

    /// Stores the command's events with `key` (e.g. a client's request id or a broker message
    /// id): executing a command with this key again stores nothing and returns the original
    /// [`Committed`].
    #[must_use]
    pub fn with_idempotency_key(mut self, key: IdempotencyKey) -> Self {
        self.idempotency_key = Some(key);
        self
    }

    /// Uses the command id as the idempotency key ([`IdempotencyKey::for_command`]).
    #[must_use]
    pub fn idempotent(self) -> Self {
        let key = IdempotencyKey::for_command(self.command_id);
        self.with_idempotency_key(key)
    }

    /// Sets the correlation id (e.g. from an incoming request's id).
    #[must_use]
    pub fn with_correlation_id(mut self, correlation_id: CorrelationId) -> Self {
        self.correlation_id = correlation_id;
        self
    }

    /// Adds a metadata entry copied onto every event.
    pub fn with_metadata<T: Serialize + ?Sized>(
        mut self,
        key: impl Into<String>,
        value: &T,
    ) -> Result<Self, serde_json::Error> {
        self.metadata.insert(key, value)?;
        Ok(self)
    }

    fn event_metadata(&self) -> EventMetadata {
        EventMetadata {
            correlation_id: Some(self.correlation_id),
            causation_id: Some(self.command_id.into()),
            user: self.metadata.clone(),
        }
    }
}

/// An aggregate's state rebuilt from its stream.
#[derive(Clone, Debug)]
pub struct Loaded<A> {
    /// The aggregate's stream.
    pub stream_id: StreamId,
    /// The state.
    pub state: A,
    /// The stream version the state includes ([`StreamVersion::INITIAL`] for a new aggregate).
    pub version: StreamVersion,
}

/// What a successfully executed command did.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Committed<A: Aggregate> {
    /// The aggregate's stream.
    pub stream_id: StreamId,
    /// The events recorded (empty when the command decided nothing needs to change).
    pub events: Vec<A::Event>,
    /// Their global positions.
    pub positions: Vec<GlobalPosition>,
    /// The stream's version afterwards.
    pub version: StreamVersion,
    /// The state afterwards.
    pub state: A,
    /// How many times the command was decided (1 unless it met concurrency conflicts, or a
    /// cached state turned out to be behind the store).
    pub attempts: u32,
}

/// When the repository takes a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotPolicy {
    every: u64,
}

impl SnapshotPolicy {
    /// A snapshot each time the stream's version crosses a multiple of `events` (minimum 1).
    pub fn every(events: u64) -> Self {
        Self {
            every: events.max(1),
        }
    }

    fn due(self, before: StreamVersion, after: StreamVersion) -> bool {
        before.get() / self.every != after.get() / self.every
    }
}

struct Snapshots<A> {
    store: Arc<dyn DynSnapshotStore>,
    policy: SnapshotPolicy,
    schema_version: u32,
    encode: fn(&A) -> Result<Box<RawValue>, serde_json::Error>,
    decode: fn(&RawValue) -> Result<A, serde_json::Error>,
}

/// Executes commands against one aggregate type: loads the stream (from the latest usable
/// snapshot, then the events after it), decides, and appends with optimistic concurrency.
///
/// Commands on one aggregate through one repository run one at a time, in arrival order (a
/// queue per aggregate with commands in flight; commands on other aggregates run concurrently),
/// so they never race each other: only writers elsewhere (another repository, another process)
/// can make a command meet a concurrency conflict. On a conflict it catches up with the events
/// written meanwhile and decides again, up to
/// [`with_conflict_retries`](Self::with_conflict_retries) times (default 3), then returns the
/// conflict. A rejected command stores nothing. Each command runs in a `factum.command`
/// tracing span with the aggregate type, stream, command name and correlation id (never payloads).
///
/// ```
/// # use factum::{Aggregate, Command, Event, Repository, InMemoryStore};
/// # async fn run<A: Aggregate>(command: A::Command) -> Result<(), Box<dyn std::error::Error>> {
/// let repository = Repository::<A, _>::new(InMemoryStore::new());
/// let committed = repository.execute(command).await?;
/// println!("stream {} is now at version {}", committed.stream_id, committed.version);
/// # Ok(()) }
/// ```
pub struct Repository<A: Aggregate, S> {
    store: S,
    max_conflict_retries: u32,
    snapshots: Option<Snapshots<A>>,
    cache: Option<StateCache<A>>,
    turns: Turns,
    #[cfg(feature = "personal")]
    shredder: Option<crate::personal::Shredder>,
}

impl<A: Aggregate, S: std::fmt::Debug> std::fmt::Debug for Repository<A, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("aggregate", &A::TYPE)
            .field("store", &self.store)
            .field("max_conflict_retries", &self.max_conflict_retries)
            .field("snapshots", &self.snapshots.as_ref().map(|s| s.policy))
            .field("cache", &self.cache.is_some())
            .finish()
    }
}

impl<A: Aggregate, S: EventStore> Repository<A, S> {
    /// A repository over `store`, with 3 conflict retries and no snapshots.
    pub fn new(store: S) -> Self {
        Self {
            store,
            max_conflict_retries: 3,
            snapshots: None,
            cache: None,
            turns: Turns::default(),
            #[cfg(feature = "personal")]
            shredder: None,
        }
    }

    /// Keeps the states of up to about `capacity` recently used aggregates in memory, so a
    /// command on a cached aggregate is one round trip to the store (the append) instead of a
    /// load and an append.
    ///
    /// The store stays the authority, so the cache is safe with other writers (other
    /// repositories, other processes): a cached state is used to decide, and the append's
    /// expected version is the cached version, so a state that another writer made stale meets
    /// a conflict and the command catches up and decides again, as without the cache. A
    /// rejection or an empty decision, which append nothing and so cannot meet a conflict, is
    /// checked against the store before it is returned (one read of the events after the cached
    /// version). Commands on one aggregate take turns (see [`Repository`]), so the next one
    /// decides on the state the previous one left in the cache, and a hot aggregate costs one
    /// round trip per command. A command that fails for any other reason (an unavailable store,
    /// an unknown outcome) drops the aggregate's cached state.
    ///
    /// ```
    /// # use factum::{Aggregate, InMemoryStore, Repository};
    /// # fn build<A: Aggregate + Clone>() {
    /// let repository = Repository::<A, _>::new(InMemoryStore::new()).with_cache(10_000);
    /// # }
    /// ```
    #[must_use]
    pub fn with_cache(mut self, capacity: usize) -> Self
    where
        A: Clone,
    {
        self.cache = Some(StateCache::new(capacity, A::clone));
        self
    }

    /// Tells the state cache (see [`with_cache`](Self::with_cache)) which shredder decrypts this
    /// repository's store, so that cached states holding personal data are dropped when a
    /// subject is forgotten, and reloaded (decrypted again) from the store.
    ///
    /// When the aggregate's event type has personal fields (`#[personal]`), a cached state is
    /// dropped when this process forgets any subject or learns that one was forgotten, and
    /// whenever it is older than the shredder's
    /// [`max_staleness`](crate::personal::ShredderOptions::max_staleness): so a subject that
    /// another process forgot stays readable in this cache for at most twice that bound (the
    /// reload may use a key cached up to that long). Without this call, a cached state keeps
    /// what it decrypted until it is evicted.
    ///
    /// ```
    /// # use factum::{Aggregate, InMemoryStore, Repository};
    /// use factum::personal::{InMemoryKeyStore, Shredder};
    /// # fn build<A: Aggregate + Clone>() {
    /// let shredder = Shredder::new(InMemoryKeyStore::new());
    /// let store = InMemoryStore::new().with_shredder(shredder.clone());
    /// let repository = Repository::<A, _>::new(store).with_cache(10_000).with_shredder(shredder);
    /// # }
    /// ```
    #[cfg(feature = "personal")]
    #[must_use]
    pub fn with_shredder(mut self, shredder: crate::personal::Shredder) -> Self {
        self.shredder = Some(shredder);
        self
    }

    /// The stamp of a state decrypted now: `None` when it cannot hold personal data.
    fn stamp_now(&self) -> cache::Stamp {
        #[cfg(feature = "personal")]
        if let Some(shredder) = &self.shredder
            && <A::Event as Event>::HAS_PERSONAL_DATA
        {
            return Some((shredder.generation(), std::time::Instant::now()));
        }
        None
    }

    /// Whether a cached state with `stamp` may still be used.
    fn still_valid(&self, stamp: cache::Stamp) -> bool {
        #[cfg(feature = "personal")]
        if let (Some(shredder), Some((generation, at))) = (&self.shredder, stamp) {
            return generation == shredder.generation()
                && at.elapsed() <= shredder.options().staleness();
        }
        let _ = stamp;
        true
    }

    /// How many times a command is decided again after a concurrency conflict before the
    /// conflict is returned (0: never).
    #[must_use]
    pub fn with_conflict_retries(mut self, retries: u32) -> Self {
        self.max_conflict_retries = retries;
        self
    }

    /// Takes snapshots into `store` per `policy` and loads from them. Snapshots whose
    /// [`Snapshot::SNAPSHOT_VERSION`] differs from the aggregate's, or that fail to decode, are
    /// ignored and the state is rebuilt from events. A failure to save a snapshot is logged and
    /// does not fail the command (its events are already stored).
    #[must_use]
    pub fn with_snapshots(
        mut self,
        store: impl SnapshotStore + 'static,
        policy: SnapshotPolicy,
    ) -> Self
    where
        A: Snapshot,
    {
        self.snapshots = Some(Snapshots {
            store: Arc::new(store),
            policy,
            schema_version: A::SNAPSHOT_VERSION,
            encode: |state| serde_json::value::to_raw_value(state),
            decode: |raw| serde_json::from_str(raw.get()),
        });
        self
    }

    /// The store this repository writes to.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The stream id of the aggregate instance `id`: `"{A::TYPE}-{id}"`.
    pub fn stream_id(id: &str) -> Result<StreamId, Error> {
        StreamId::for_aggregate(A::TYPE, id).map_err(|e| Error::InvalidArgument(e.to_string()))
    }

    /// Rebuilds the current state of the aggregate instance `id`.
    pub async fn load(&self, id: &str) -> Result<Loaded<A>, Error> {
        let stream_id = Self::stream_id(id)?;
        let mut loaded = self.load_snapshot(stream_id).await?;
        self.catch_up(&mut loaded).await?;
        Ok(loaded)
    }

    /// Rebuilds the state of the aggregate instance `id` as it was at stream version `version`
    /// (after its first `version` events; [`StreamVersion::INITIAL`] gives the default state).
    /// A snapshot is used when it was taken at or before that version.
    ///
    /// Fails with [`Error::InvalidArgument`] when the stream has fewer events than `version`.
    ///
    /// ```
    /// # use factum::{Aggregate, Repository, InMemoryStore, StreamVersion};
    /// # async fn run<A: Aggregate>(repository: Repository<A, InMemoryStore>) -> Result<(), factum::Error> {
    /// let then = repository.load_at("42", StreamVersion::new(3)).await?;
    /// assert_eq!(then.version, StreamVersion::new(3));
    /// # Ok(()) }
    /// ```
    pub async fn load_at(&self, id: &str, version: StreamVersion) -> Result<Loaded<A>, Error> {
        let stream_id = Self::stream_id(id)?;
        let mut loaded = self.load_snapshot(stream_id).await?;
        if loaded.version > version {
            // Taken after the version asked for: useless here.
            loaded = Loaded {
                stream_id: loaded.stream_id,
                state: A::default(),
                version: StreamVersion::INITIAL,
            };
        }
        self.catch_up_while(&mut loaded, |recorded| recorded.stream_version <= version)
            .await?;
        if loaded.version < version {
            return Err(Error::InvalidArgument(format!(
                "stream `{}` has {} events; it has no version {version}",
                loaded.stream_id, loaded.version
            )));
        }
        Ok(loaded)
    }

    /// Rebuilds the state of the aggregate instance `id` as it was at time `at`: from the events
    /// recorded at or before `at` (by the store's clock). Before the first event it is the
    /// default state at [`StreamVersion::INITIAL`]. Snapshots are not used (they do not say when
    /// their last event was recorded).
    ///
    /// ```
    /// # use factum::{Aggregate, Repository, InMemoryStore};
    /// # async fn run<A: Aggregate>(repository: Repository<A, InMemoryStore>) -> Result<(), factum::Error> {
    /// let yesterday = chrono::Utc::now() - chrono::Duration::days(1);
    /// let then = repository.load_as_of("42", yesterday).await?;
    /// println!("version {} as of {yesterday}", then.version);
    /// # Ok(()) }
    /// ```
    pub async fn load_as_of(&self, id: &str, at: DateTime<Utc>) -> Result<Loaded<A>, Error> {
        let mut loaded = Loaded {
            stream_id: Self::stream_id(id)?,
            state: A::default(),
            version: StreamVersion::INITIAL,
        };
        self.catch_up_while(&mut loaded, |recorded| recorded.recorded_at <= at)
            .await?;
        Ok(loaded)
    }

    /// Executes a command that starts a new workflow (fresh correlation id).
    pub async fn execute(
        &self,
        command: A::Command,
    ) -> Result<Committed<A>, CommandError<A::Error>> {
        self.execute_with(command, &CommandContext::new()).await
    }

    /// Executes a command within a context (correlation/causation ids, metadata).
    pub async fn execute_with(
        &self,
        command: A::Command,
        context: &CommandContext,
    ) -> Result<Committed<A>, CommandError<A::Error>> {
        let aggregate_id = command.aggregate_id();
        let span = tracing::info_span!(
            "factum.command",
            aggregate = A::TYPE,
            stream = tracing::field::Empty,
            command = command.command_name(),
            correlation_id = %context.correlation_id,
            attempts = tracing::field::Empty,
        );
        let started = std::time::Instant::now();
        let result = async move {
            let stream_id = Self::stream_id(&aggregate_id)?;
            tracing::Span::current().record("stream", stream_id.as_str());
            // Held until the command is done, retries included.
            let _turn = self.turns.take(&stream_id).await;
            let cached = self
                .cache
                .as_ref()
                .and_then(|cache| cache.take(&stream_id))
                .filter(|(_, stamp)| self.still_valid(*stamp));
            if self.cache.is_some() {
                crate::telemetry::cache_lookup(A::TYPE, cached.is_some());
            }
            // Whether the state may be behind the store without an append having told us so.
            let mut unverified = cached.is_some();
            let (mut loaded, stamp) = match cached {
                Some(cached) => cached,
                None => {
                    let stamp = self.stamp_now();
                    let load_started = std::time::Instant::now();
                    let mut loaded = self.load_snapshot(stream_id).await?;
                    self.catch_up(&mut loaded).await?;
                    crate::telemetry::loaded(A::TYPE, load_started);
                    (loaded, stamp)
                }
            };
            let mut attempts = 1;
            loop {
                let events = match loaded.state.decide(&command) {
                    Ok(events) if !events.is_empty() => events,
                    decided => {
                        if unverified {
                            // Nothing to append means no conflict to reveal a stale state: read
                            // what the store has after the cached version, and decide again if
                            // anything.
                            unverified = false;
                            let before = loaded.version;
                            self.catch_up(&mut loaded).await?;
                            if loaded.version != before {
                                attempts += 1;
                                continue;
                            }
                        }
                        tracing::Span::current().record("attempts", attempts);
                        if let Some(key) = &context.idempotency_key {
                            // A repeat of a command that was stored decides on a state that
                            // includes its own events: the stored outcome is the answer.
                            if let Some(stored) = self.store.idempotency_outcome(key).await? {
                                return self
                                    .repeated(Some(key), &loaded.stream_id, stored, attempts)
                                    .await;
                            }
                        }
                        let events = match decided {
                            Ok(events) => events,
                            Err(rejection) => {
                                if let Some(cache) = &self.cache {
                                    cache.put(loaded, stamp);
                                }
                                return Err(CommandError::Rejected(rejection));
                            }
                        };
                        if let Some(cache) = &self.cache {
                            cache.put(
                                Loaded {
                                    stream_id: loaded.stream_id.clone(),
                                    state: cache.copy(&loaded.state),
                                    version: loaded.version,
                                },
                                stamp,
                            );
                        }
                        return Ok(Committed {
                            stream_id: loaded.stream_id,
                            events,
                            positions: Vec::new(),
                            version: loaded.version,
                            state: loaded.state,
                            attempts,
                        });
                    }
                };
                match self.append(context, loaded, events, attempts, stamp).await {
                    Err(Retry::Conflict(conflict, mut state)) if attempts <= self.max_conflict_retries => {
                        tracing::debug!(error = %conflict, attempts, "conflict; catching up and deciding again");
                        self.catch_up(&mut state).await?;
                        unverified = false;
                        loaded = state;
                        attempts += 1;
                    }
                    Err(Retry::Conflict(conflict, _)) => {
                        tracing::Span::current().record("attempts", attempts);
                        return Err(conflict.into());
                    }
                    Err(Retry::Fail(e)) => return Err(e),
                    Err(Retry::Repeated(stored)) => {
                        tracing::Span::current().record("attempts", attempts);
                        let stream_id = stored.stream.clone();
                        return self
                            .repeated(context.idempotency_key.as_ref(), &stream_id, stored, attempts)
                            .await;
                    }
                    Ok(committed) => {
                        tracing::Span::current().record("attempts", attempts);
                        if let Some(cache) = &self.cache {
                            cache.put(
                                Loaded {
                                    stream_id: committed.stream_id.clone(),
                                    state: cache.copy(&committed.state),
                                    version: committed.version,
                                },
                                stamp,
                            );
                        }
                        return Ok(committed);
                    }
                }
            }
        }
        .instrument(span)
        .await;
        crate::telemetry::command_done(A::TYPE, started, &result);
        result
    }

    /// Appends the decided `events` at `loaded.version` and evolves the state with them.
    async fn append(
        &self,
        context: &CommandContext,
        loaded: Loaded<A>,
        events: Vec<A::Event>,
        attempts: u32,
        stamp: cache::Stamp,
    ) -> Result<Committed<A>, Retry<A>> {
        let Loaded {
            stream_id,
            mut state,
            version,
        } = loaded;
        let metadata = context.event_metadata();
        let batch = events
            .iter()
            .zip(0..)
            .map(|(event, index)| {
                NewEvent::encode(event, metadata.clone())
                    .map(|new| new.with_event_id(EventId::derived(context.command_id, index)))
                    .map_err(|source| Error::Encode {
                        stream: stream_id.clone(),
                        what: format!("event {:?}", crate::Event::event_type(event)),
                        source,
                    })
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Retry::Fail(e.into()))?;
        let expected = if version == StreamVersion::INITIAL {
            ExpectedVersion::NoStream
        } else {
            ExpectedVersion::Exact(version)
        };
        let mut request = AppendRequest::new(stream_id.clone(), batch).expected_version(expected);
        if let Some(key) = &context.idempotency_key {
            request = request.idempotency_key(key.clone());
        }
        let appended = match self.store.append(request).await {
            // Stored before, by this command's key or its derived event ids (also when a store
            // reports a write it settled after a lost connection that did not start where this
            // attempt expected: it cannot be this attempt's).
            Ok(appended) if appended.duplicate || appended.first_version != version => {
                return Err(Retry::Repeated(appended));
            }
            Ok(appended) => appended,
            Err(Error::IdempotencyKeyReused { stored_stream, .. })
                if stored_stream == stream_id =>
            {
                // The key's command ran on this aggregate and decided differently then (it now
                // decides on a state that includes its own events): the stored outcome stands.
                let key = context.idempotency_key.as_ref();
                let stored = match key {
                    Some(key) => self.store.idempotency_outcome(key).await,
                    None => Ok(None),
                };
                return Err(match stored {
                    Ok(Some(stored)) => Retry::Repeated(stored),
                    // Removed by retention between the two calls: nothing to return.
                    Ok(None) => Retry::Fail(
                        Error::transient(
                            "execute",
                            format!(
                                "the idempotency key of a command on stream `{stream_id}` was removed by retention while it was checked"
                            ),
                        )
                        .into(),
                    ),
                    Err(e) => Retry::Fail(e.into()),
                });
            }
            Err(e) if e.is_conflict() => {
                return Err(Retry::Conflict(
                    e,
                    Loaded {
                        stream_id,
                        state,
                        version,
                    },
                ));
            }
            Err(e) => return Err(Retry::Fail(e.into())),
        };
        crate::telemetry::appended(A::TYPE, appended.positions.len());
        for event in &events {
            state.evolve(event);
        }
        let committed = Committed {
            stream_id,
            events,
            positions: appended.positions,
            version: appended.stream_version,
            state,
            attempts,
        };
        self.maybe_snapshot(version, &committed, stamp).await;
        Ok(committed)
    }

    async fn load_snapshot(&self, stream_id: StreamId) -> Result<Loaded<A>, Error> {
        let fresh = |stream_id| Loaded {
            stream_id,
            state: A::default(),
            version: StreamVersion::INITIAL,
        };
        let Some(snapshots) = &self.snapshots else {
            return Ok(fresh(stream_id));
        };
        let Some(snapshot) = snapshots.store.load_snapshot_dyn(&stream_id).await? else {
            return Ok(fresh(stream_id));
        };
        if snapshot.schema_version != snapshots.schema_version {
            tracing::debug!(
                stream = %stream_id,
                stored = snapshot.schema_version,
                current = snapshots.schema_version,
                "ignoring snapshot taken with another snapshot version"
            );
            crate::telemetry::snapshot_loaded(A::TYPE, false);
            return Ok(fresh(stream_id));
        }
        let decoded = (snapshots.decode)(&snapshot.state);
        crate::telemetry::snapshot_loaded(A::TYPE, decoded.is_ok());
        match decoded {
            Ok(state) => Ok(Loaded {
                stream_id,
                state,
                version: snapshot.stream_version,
            }),
            Err(error) => {
                tracing::warn!(stream = %stream_id, %error, "ignoring a snapshot that does not decode");
                Ok(fresh(stream_id))
            }
        }
    }

    /// Applies every event after `loaded.version`.
    async fn catch_up(&self, loaded: &mut Loaded<A>) -> Result<(), Error> {
        self.catch_up_while(loaded, |_| true).await
    }

    /// Applies the events after `loaded.version` up to the first one `keep` refuses.
    async fn catch_up_while(
        &self,
        loaded: &mut Loaded<A>,
        keep: impl Fn(&EventPayload) -> bool,
    ) -> Result<(), Error> {
        let mut events = self
            .store
            .read_stream_payloads(&loaded.stream_id, loaded.version);
        while let Some(stored) = events.try_next().await? {
            if !keep(&stored) {
                break;
            }
            if stored.event_type == crate::event::STREAM_DELETED {
                return Err(Error::StreamDeleted {
                    stream: loaded.stream_id.clone(),
                });
            }
            let decoded = match <A::Event as Event>::decode_all(&stored.stored()) {
                Ok(decoded) => decoded,
                Err(source) => {
                    drop(events);
                    return Err(self.decode_error(&loaded.stream_id, stored, source).await);
                }
            };
            for event in decoded {
                loaded.state.evolve(&event);
            }
            loaded.version = stored.stream_version;
        }
        Ok(())
    }

    /// The error for an event that does not decode, with its global position (read again in
    /// full: the payload read leaves positions out).
    async fn decode_error(
        &self,
        stream: &StreamId,
        stored: EventPayload,
        source: crate::DecodeError,
    ) -> Error {
        let before = StreamVersion::new(stored.stream_version.get().saturating_sub(1));
        let position = match self.store.read_stream(stream, before).try_next().await {
            Ok(Some(recorded)) if recorded.stream_version == stored.stream_version => {
                recorded.position
            }
            _ => LogPosition::START,
        };
        Error::Decode {
            stream: stream.clone(),
            version: stored.stream_version,
            event_type: stored.event_type,
            schema_version: stored.schema_version,
            position,
            source,
        }
    }

    /// The [`Committed`] of a command stored before, rebuilt from the store: its events, as
    /// stored, and the state right after them.
    async fn repeated(
        &self,
        key: Option<&IdempotencyKey>,
        stream_id: &StreamId,
        stored: AppendResult,
        attempts: u32,
    ) -> Result<Committed<A>, CommandError<A::Error>> {
        if let Some(key) = key
            && &stored.stream != stream_id
        {
            return Err(Error::IdempotencyKeyReused {
                key: key.clone(),
                stream: stream_id.clone(),
                stored_stream: stored.stream,
            }
            .into());
        }
        // If the cache holds this aggregate, it holds a later state than the one rebuilt here.
        let mut loaded = Loaded {
            stream_id: stream_id.clone(),
            state: A::default(),
            version: StreamVersion::INITIAL,
        };
        let mut events = Vec::with_capacity(stored.positions.len());
        let mut payloads = self
            .store
            .read_stream_payloads(stream_id, StreamVersion::INITIAL);
        while let Some(payload) = payloads.try_next().await? {
            if payload.stream_version > stored.stream_version {
                break;
            }
            let decoded = match <A::Event as Event>::decode_all(&payload.stored()) {
                Ok(decoded) => decoded,
                Err(source) => {
                    drop(payloads);
                    return Err(self.decode_error(stream_id, payload, source).await.into());
                }
            };
            loaded.version = payload.stream_version;
            for event in decoded {
                loaded.state.evolve(&event);
                if payload.stream_version > stored.first_version {
                    events.push(event);
                }
            }
        }
        tracing::debug!(stream = %stream_id, "command already stored; returning its outcome");
        Ok(Committed {
            stream_id: loaded.stream_id,
            events,
            positions: stored.positions,
            version: stored.stream_version,
            state: loaded.state,
            attempts,
        })
    }

    /// Saves a snapshot when the policy says so, unless the state was decrypted before a subject
    /// was forgotten in this process (`stamp` no longer valid): such a state may hold the
    /// subject's personal data in plaintext, which the forget just erased from the snapshots.
    async fn maybe_snapshot(
        &self,
        before: StreamVersion,
        committed: &Committed<A>,
        stamp: cache::Stamp,
    ) {
        let Some(snapshots) = &self.snapshots else {
            return;
        };
        if !self.still_valid(stamp) {
            tracing::debug!(stream = %committed.stream_id, "no snapshot: a subject was forgotten since the state was read");
            return;
        }
        if !snapshots.policy.due(before, committed.version) {
            return;
        }
        let state = match (snapshots.encode)(&committed.state) {
            Ok(state) => state,
            Err(error) => {
                tracing::warn!(stream = %committed.stream_id, %error, "snapshot could not be serialised");
                return;
            }
        };
        let snapshot = StoredSnapshot {
            stream_id: committed.stream_id.clone(),
            stream_version: committed.version,
            schema_version: snapshots.schema_version,
            state,
            taken_at: Utc::now(),
        };
        let saved = snapshots.store.save_snapshot_dyn(snapshot).await;
        crate::telemetry::snapshot_saved(A::TYPE, saved.is_ok());
        if let Err(error) = saved {
            tracing::warn!(stream = %committed.stream_id, %error, "snapshot could not be saved");
        }
    }
}

enum Retry<A: Aggregate> {
    Conflict(Error, Loaded<A>),
    Fail(CommandError<A::Error>),
    /// The command was stored before: its original outcome.
    Repeated(AppendResult),
}
