//! Where saga instances, their pending commands and their timeouts are kept: the capability a
//! backend gives the saga runtime.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::error::Error;
use crate::event::{NewEvent, RecordedEvent};
use crate::ids::{CommandId, CorrelationId, StreamId, StreamVersion};
use crate::memory::InMemoryStore;
use crate::store::{AppendRequest, EventStore, ExpectedVersion};

use super::{SentCommand, TimeoutDecision};

/// A saga instance as stored: its changes so far and whether it is parked.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Instance {
    /// Its key.
    pub key: String,
    /// Its stream.
    pub stream: StreamId,
    /// Its recorded changes, in order.
    pub changes: Vec<RecordedEvent>,
    /// Its stream's version.
    pub version: StreamVersion,
    /// Why it is parked, when it is.
    pub parked: Option<String>,
}

impl Instance {
    /// An instance from its stored parts.
    pub fn new(
        key: String,
        stream: StreamId,
        changes: Vec<RecordedEvent>,
        parked: Option<String>,
    ) -> Self {
        let version = changes
            .last()
            .map_or(StreamVersion::INITIAL, |c| c.stream_version);
        Self {
            key,
            stream,
            changes,
            version,
            parked,
        }
    }
}

/// One reaction of a saga instance, to store in one unit of work.
#[derive(Debug)]
#[non_exhaustive]
pub struct Decided {
    /// The saga ([`Saga::NAME`](super::Saga::NAME)).
    pub saga: &'static str,
    /// The instance's key.
    pub key: String,
    /// The instance's stream.
    pub stream: StreamId,
    /// The stream's version the decision was made on (append only there).
    pub expected: StreamVersion,
    /// The changes to append to the stream.
    pub changes: Vec<NewEvent>,
    /// The commands to queue for dispatch, in order.
    pub commands: Vec<SentCommand>,
    /// The timeouts to schedule or cancel, in order.
    pub timeouts: Vec<TimeoutDecision>,
    /// The workflow's correlation id (stored with timeouts, for their reactions).
    pub correlation_id: CorrelationId,
    /// When it was decided, by the runtime's clock: its commands are due from then.
    pub now: DateTime<Utc>,
}

/// A command waiting to be dispatched.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct PendingCommand {
    /// The saga.
    pub saga: String,
    /// The instance.
    pub key: String,
    /// Its place in the instance's queue.
    pub sequence: u64,
    /// The command.
    pub command: SentCommand,
    /// Failed attempts so far.
    pub attempts: u32,
    /// When it is due (later than now after a failed attempt).
    pub due_at: DateTime<Utc>,
    /// The last attempt's error.
    pub last_error: Option<String>,
}

/// A timeout waiting for its deadline.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ScheduledTimeout {
    /// The saga.
    pub saga: String,
    /// The instance.
    pub key: String,
    /// Its name within the instance.
    pub name: String,
    /// Its id.
    pub id: Uuid,
    /// When it fires.
    pub due_at: DateTime<Utc>,
    /// What it carries, as JSON.
    pub payload: Box<RawValue>,
    /// The workflow's correlation id.
    pub correlation_id: CorrelationId,
}

impl ScheduledTimeout {
    /// A timeout from its stored parts.
    pub fn new(
        saga: String,
        key: String,
        name: String,
        id: Uuid,
        due_at: DateTime<Utc>,
        payload: Box<RawValue>,
        correlation_id: CorrelationId,
    ) -> Self {
        Self {
            saga,
            key,
            name,
            id,
            due_at,
            payload,
            correlation_id,
        }
    }
}

impl PendingCommand {
    /// A pending command from its stored parts.
    pub fn new(
        saga: String,
        key: String,
        sequence: u64,
        command: SentCommand,
        attempts: u32,
        due_at: DateTime<Utc>,
        last_error: Option<String>,
    ) -> Self {
        Self {
            saga,
            key,
            sequence,
            command,
            attempts,
            due_at,
            last_error,
        }
    }
}

/// A parked saga instance: a command of it kept failing; its commands wait until it is retried.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ParkedInstance {
    /// The saga.
    pub saga: String,
    /// The instance.
    pub key: String,
    /// Why it was parked.
    pub error: String,
    /// When.
    pub parked_at: DateTime<Utc>,
}

impl ParkedInstance {
    /// A parked instance from its stored parts.
    pub fn new(saga: String, key: String, error: String, parked_at: DateTime<Utc>) -> Self {
        Self {
            saga,
            key,
            error,
            parked_at,
        }
    }
}

/// Storage of saga instances (their change streams), their pending commands and their
/// timeouts, in units of work: what a backend supplies to the [`SagaRuntime`](super::SagaRuntime).
///
/// * [`InMemorySagaStore`]: over an [`InMemoryStore`], in one process (its unit of work is `()`;
///   nothing survives the process).
/// * `factum_postgres::saga::PgSagaStore`: PostgreSQL tables (migration 0006) and the event
///   store, in the transactions of the consumers (`PgTx`): an instance's changes, its commands
///   and its timeouts commit with the checkpoint or the inbox row, or not at all. `load` locks
///   the instance for the transaction, so reactions to one instance never interleave.
pub trait SagaStore: Send + Sync {
    /// The unit of work.
    type Tx: Send;

    /// Opens a unit of work of the runtime's own (a dispatch, a timeout).
    fn begin(&self) -> impl Future<Output = Result<Self::Tx, Error>> + Send;

    /// Commits it.
    fn commit(&self, tx: Self::Tx) -> impl Future<Output = Result<(), Error>> + Send;

    /// Abandons it.
    fn rollback(&self, tx: Self::Tx) -> impl Future<Output = ()> + Send;

    /// Loads (and locks for the unit of work) instance `key` of `saga`, whose stream is `stream`.
    fn load(
        &self,
        tx: &mut Self::Tx,
        saga: &str,
        key: &str,
        stream: &StreamId,
    ) -> impl Future<Output = Result<Instance, Error>> + Send;

    /// Stores a reaction: appends its changes at the expected version (a conflict otherwise),
    /// queues its commands after the instance's others, schedules and cancels its timeouts.
    fn save(
        &self,
        tx: &mut Self::Tx,
        decided: Decided,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// The commands of `saga` due at `now`: of each instance that is not parked, the first of its
    /// queue, if due. At most `limit`.
    fn due_commands(
        &self,
        saga: &str,
        now: DateTime<Utc>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<PendingCommand>, Error>> + Send;

    /// Takes command `command_id` of `saga` out of the queue within the unit of work; `None` when
    /// it is gone (dispatched by another runtime).
    fn claim_command(
        &self,
        tx: &mut Self::Tx,
        saga: &str,
        command_id: CommandId,
    ) -> impl Future<Output = Result<Option<PendingCommand>, Error>> + Send;

    /// Puts `command` back (or keeps it) in its queue after a failed attempt, due again at
    /// `due_at`.
    fn postpone(
        &self,
        command: &PendingCommand,
        attempts: u32,
        due_at: DateTime<Utc>,
        error: String,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Parks `command`'s instance (its queue waits until [`unpark`](Self::unpark)), keeping
    /// `command` at the head of its queue.
    fn park(
        &self,
        command: &PendingCommand,
        attempts: u32,
        error: String,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Unparks instance `key` of `saga`, its commands due at `now` with their attempts reset;
    /// whether it was parked.
    fn unpark(
        &self,
        saga: &str,
        key: &str,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<bool, Error>> + Send;

    /// The parked instances of `saga`, oldest first.
    fn parked(&self, saga: &str)
    -> impl Future<Output = Result<Vec<ParkedInstance>, Error>> + Send;

    /// The timeouts of `saga` due at `now`, earliest first, at most `limit`.
    fn due_timeouts(
        &self,
        saga: &str,
        now: DateTime<Utc>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<ScheduledTimeout>, Error>> + Send;

    /// Takes timeout `id` of `saga` out within the unit of work; `None` when it is gone (fired by
    /// another runtime, or cancelled).
    fn claim_timeout(
        &self,
        tx: &mut Self::Tx,
        saga: &str,
        id: Uuid,
    ) -> impl Future<Output = Result<Option<ScheduledTimeout>, Error>> + Send;

    /// Puts a claimed timeout back after its unit of work failed (where rolling back does not).
    fn release_timeout(
        &self,
        timeout: &ScheduledTimeout,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// The pending timeouts of instance `key` of `saga`.
    fn timeouts(
        &self,
        saga: &str,
        key: &str,
    ) -> impl Future<Output = Result<Vec<ScheduledTimeout>, Error>> + Send;

    /// The pending commands of instance `key` of `saga`, in order.
    fn commands(
        &self,
        saga: &str,
        key: &str,
    ) -> impl Future<Output = Result<Vec<PendingCommand>, Error>> + Send;
}

/// A [`SagaStore`] in memory over an [`InMemoryStore`] (where the instances' changes are
/// appended, so they are in the log like any event); clones share it.
#[derive(Clone, Debug, Default)]
pub struct InMemorySagaStore {
    store: InMemoryStore,
    state: Arc<Mutex<MemoryState>>,
}

#[derive(Debug, Default)]
struct MemoryState {
    /// (saga, key) → queue by sequence.
    queues: HashMap<(String, String), BTreeMap<u64, PendingCommand>>,
    next_sequence: u64,
    /// (saga, key, name) → timeout.
    timeouts: HashMap<(String, String, String), ScheduledTimeout>,
    parked: HashMap<(String, String), ParkedInstance>,
}

impl InMemorySagaStore {
    /// Saga storage whose instances' changes go to `store`.
    pub fn new(store: InMemoryStore) -> Self {
        Self {
            store,
            state: Arc::default(),
        }
    }

    /// The event store the instances' changes are appended to.
    pub fn events(&self) -> &InMemoryStore {
        &self.store
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn insert(&self, command: PendingCommand) {
        self.lock()
            .queues
            .entry((command.saga.clone(), command.key.clone()))
            .or_default()
            .insert(command.sequence, command);
    }
}

impl SagaStore for InMemorySagaStore {
    type Tx = ();

    async fn begin(&self) -> Result<(), Error> {
        Ok(())
    }

    async fn commit(&self, _tx: ()) -> Result<(), Error> {
        Ok(())
    }

    async fn rollback(&self, _tx: ()) {}

    async fn load(
        &self,
        _tx: &mut (),
        saga: &str,
        key: &str,
        stream: &StreamId,
    ) -> Result<Instance, Error> {
        let changes: Vec<RecordedEvent> = self
            .store
            .read_stream(stream, StreamVersion::INITIAL)
            .try_collect()
            .await?;
        let parked = self
            .lock()
            .parked
            .get(&(saga.to_owned(), key.to_owned()))
            .map(|p| p.error.clone());
        Ok(Instance::new(
            key.to_owned(),
            stream.clone(),
            changes,
            parked,
        ))
    }

    async fn save(&self, _tx: &mut (), decided: Decided) -> Result<(), Error> {
        if !decided.changes.is_empty() {
            self.store
                .append(
                    AppendRequest::new(decided.stream.clone(), decided.changes)
                        .expected_version(ExpectedVersion::Exact(decided.expected)),
                )
                .await?;
        }
        let now = decided.now;
        let mut state = self.lock();
        let instance = (decided.saga.to_owned(), decided.key.clone());
        for command in decided.commands {
            state.next_sequence += 1;
            let sequence = state.next_sequence;
            state.queues.entry(instance.clone()).or_default().insert(
                sequence,
                PendingCommand::new(
                    instance.0.clone(),
                    instance.1.clone(),
                    sequence,
                    command,
                    0,
                    now,
                    None,
                ),
            );
        }
        for timeout in decided.timeouts {
            let slot = (
                instance.0.clone(),
                instance.1.clone(),
                timeout.name().to_owned(),
            );
            match timeout {
                TimeoutDecision::Schedule {
                    name,
                    id,
                    due_at,
                    payload,
                } => {
                    state.timeouts.insert(
                        slot,
                        ScheduledTimeout::new(
                            instance.0.clone(),
                            instance.1.clone(),
                            name,
                            id,
                            due_at,
                            payload,
                            decided.correlation_id,
                        ),
                    );
                }
                TimeoutDecision::Cancel { .. } => {
                    state.timeouts.remove(&slot);
                }
            }
        }
        Ok(())
    }

    async fn due_commands(
        &self,
        saga: &str,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<PendingCommand>, Error> {
        let state = self.lock();
        let mut due: Vec<PendingCommand> = state
            .queues
            .iter()
            .filter(|((s, key), _)| {
                s == saga && !state.parked.contains_key(&(s.clone(), key.clone()))
            })
            .filter_map(|(_, queue)| queue.values().next())
            .filter(|c| c.due_at <= now)
            .cloned()
            .collect();
        due.sort_by_key(|c| c.sequence);
        due.truncate(limit);
        Ok(due)
    }

    async fn claim_command(
        &self,
        _tx: &mut (),
        saga: &str,
        command_id: CommandId,
    ) -> Result<Option<PendingCommand>, Error> {
        let mut state = self.lock();
        for ((s, _), queue) in &mut state.queues {
            if s != saga {
                continue;
            }
            let found = queue
                .iter()
                .find(|(_, c)| c.command.context.command_id == command_id)
                .map(|(seq, _)| *seq);
            if let Some(seq) = found {
                return Ok(queue.remove(&seq));
            }
        }
        Ok(None)
    }

    async fn postpone(
        &self,
        command: &PendingCommand,
        attempts: u32,
        due_at: DateTime<Utc>,
        error: String,
    ) -> Result<(), Error> {
        let mut command = command.clone();
        command.attempts = attempts;
        command.due_at = due_at;
        command.last_error = Some(error);
        self.insert(command);
        Ok(())
    }

    async fn park(
        &self,
        command: &PendingCommand,
        attempts: u32,
        error: String,
    ) -> Result<(), Error> {
        let mut parked = command.clone();
        parked.attempts = attempts;
        parked.last_error = Some(error.clone());
        self.insert(parked);
        let instance = (command.saga.clone(), command.key.clone());
        self.lock().parked.insert(
            instance.clone(),
            ParkedInstance::new(instance.0, instance.1, error, Utc::now()),
        );
        Ok(())
    }

    async fn unpark(&self, saga: &str, key: &str, now: DateTime<Utc>) -> Result<bool, Error> {
        let mut state = self.lock();
        let instance = (saga.to_owned(), key.to_owned());
        let was = state.parked.remove(&instance).is_some();
        if let Some(queue) = state.queues.get_mut(&instance) {
            for command in queue.values_mut() {
                command.attempts = 0;
                command.due_at = now;
            }
        }
        Ok(was)
    }

    async fn parked(&self, saga: &str) -> Result<Vec<ParkedInstance>, Error> {
        let mut parked: Vec<_> = self
            .lock()
            .parked
            .values()
            .filter(|p| p.saga == saga)
            .cloned()
            .collect();
        parked.sort_by_key(|p| p.parked_at);
        Ok(parked)
    }

    async fn due_timeouts(
        &self,
        saga: &str,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<ScheduledTimeout>, Error> {
        let mut due: Vec<_> = self
            .lock()
            .timeouts
            .values()
            .filter(|t| t.saga == saga && t.due_at <= now)
            .cloned()
            .collect();
        due.sort_by_key(|t| t.due_at);
        due.truncate(limit);
        Ok(due)
    }

    async fn claim_timeout(
        &self,
        _tx: &mut (),
        saga: &str,
        id: Uuid,
    ) -> Result<Option<ScheduledTimeout>, Error> {
        let mut state = self.lock();
        let slot = state
            .timeouts
            .iter()
            .find(|(_, t)| t.saga == saga && t.id == id)
            .map(|(slot, _)| slot.clone());
        Ok(slot.and_then(|slot| state.timeouts.remove(&slot)))
    }

    async fn release_timeout(&self, timeout: &ScheduledTimeout) -> Result<(), Error> {
        let slot = (
            timeout.saga.clone(),
            timeout.key.clone(),
            timeout.name.clone(),
        );
        self.lock()
            .timeouts
            .entry(slot)
            .or_insert_with(|| timeout.clone());
        Ok(())
    }

    async fn timeouts(&self, saga: &str, key: &str) -> Result<Vec<ScheduledTimeout>, Error> {
        let mut found: Vec<_> = self
            .lock()
            .timeouts
            .values()
            .filter(|t| t.saga == saga && t.key == key)
            .cloned()
            .collect();
        found.sort_by_key(|t| t.due_at);
        Ok(found)
    }

    async fn commands(&self, saga: &str, key: &str) -> Result<Vec<PendingCommand>, Error> {
        Ok(self
            .lock()
            .queues
            .get(&(saga.to_owned(), key.to_owned()))
            .map(|q| q.values().cloned().collect())
            .unwrap_or_default())
    }
}
