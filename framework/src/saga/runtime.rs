//! The saga runtime: reactions in units of work, dispatch of stored commands, durable timeouts.

use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt as _;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use uuid::Uuid;

use crate::aggregate::Aggregate;
use crate::error::{BoxError, CommandError, Error};
use crate::event::RecordedEvent;
use crate::ids::CorrelationId;
use crate::repository::Repository;
use crate::resilience::RetryPolicy;
use crate::store::{BoxFuture, EventFilter, EventStore};
use crate::subscription::{BatchFailure, BatchHandler, Lease, retries_after};

use super::store::{Instance, PendingCommand, SagaStore};
use super::{
    Clock, Decisions, Fired, Input, Rejection, Saga, SentCommand, SystemClock, fold,
    instance_stream, rejection_trigger,
};

/// A consumer's unit of work seen as the saga store's: how the runtime, a
/// [`BatchHandler`] over the store's transaction, also runs inside units of work of another
/// type (the in-memory inbox's, for the in-memory store).
pub trait UnitOfWork<Tx>: Send {
    /// The saga store's unit of work inside this one.
    fn unit(&mut self) -> &mut Tx;
}

impl<T: Send> UnitOfWork<T> for T {
    fn unit(&mut self) -> &mut T {
        self
    }
}

/// The in-memory inbox's unit of work is no transaction: the in-memory saga store writes at once.
impl UnitOfWork<()> for crate::bus::InMemoryInboxTx {
    fn unit(&mut self) -> &mut () {
        // A zero-sized value: leaking it allocates nothing.
        Box::leak(Box::new(()))
    }
}

/// The targets of a runtime, by aggregate type.
type Targets<Tx> = HashMap<&'static str, Arc<dyn Target<Tx>>>;

/// What a [`Target`] did with a command.
#[derive(Debug)]
#[non_exhaustive]
pub enum Executed {
    /// It was executed (or had been, for a repeat).
    Accepted,
    /// The aggregate rejected it, with its typed error (boxed): the saga gets
    /// [`Input::Rejected`].
    Rejected(BoxError),
}

/// Where a saga's commands to one aggregate type go: executed in the runtime's unit of work
/// (`factum_postgres::saga::PgTarget`: in the same PostgreSQL transaction that removes the command
/// from the queue) or through any [`Repository`] ([`RepositoryTarget`]: idempotent by the
/// command's derived id).
pub trait Target<Tx>: Send + Sync {
    /// The aggregate type it executes commands of ([`Aggregate::TYPE`]).
    fn aggregate_type(&self) -> &'static str;

    /// Executes `command` within `tx`. An [`Error`] is a failure to execute (retried with
    /// backoff if it may pass, the instance parked otherwise), not a rejection.
    fn execute<'a>(
        &'a self,
        tx: &'a mut Tx,
        command: &'a SentCommand,
    ) -> BoxFuture<'a, Result<Executed, Error>>;
}

/// A [`Target`] executing commands of `A` through a [`Repository`], outside the runtime's unit of
/// work. Each command carries its derived id as idempotency key, so executing it again (after a
/// crash before its removal from the queue committed) stores nothing twice.
pub struct RepositoryTarget<A: Aggregate, S> {
    repository: Repository<A, S>,
}

impl<A: Aggregate, S: std::fmt::Debug> std::fmt::Debug for RepositoryTarget<A, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepositoryTarget")
            .field("repository", &self.repository)
            .finish()
    }
}

impl<A: Aggregate, S: EventStore> RepositoryTarget<A, S> {
    /// Commands of `A` executed by `repository`.
    pub fn new(repository: Repository<A, S>) -> Self {
        Self { repository }
    }
}

impl<A, S, Tx> Target<Tx> for RepositoryTarget<A, S>
where
    A: Aggregate,
    A::Command: DeserializeOwned,
    S: EventStore + Send + Sync,
    Tx: Send,
{
    fn aggregate_type(&self) -> &'static str {
        A::TYPE
    }

    fn execute<'a>(
        &'a self,
        _tx: &'a mut Tx,
        command: &'a SentCommand,
    ) -> BoxFuture<'a, Result<Executed, Error>> {
        Box::pin(async move {
            let decoded = command.decode::<A>()?;
            Executed::of(
                self.repository
                    .execute_with(decoded, &command.context)
                    .await,
            )
        })
    }
}

impl Executed {
    /// A [`Repository`] execution's result as a target's outcome: accepted, rejected (with the
    /// typed error), or failed.
    pub fn of<A: Aggregate>(
        result: Result<crate::Committed<A>, CommandError<A::Error>>,
    ) -> Result<Self, Error> {
        match result {
            Ok(_) => Ok(Self::Accepted),
            Err(CommandError::Rejected(rejection)) => Ok(Self::Rejected(Box::new(rejection))),
            Err(CommandError::Failed(error)) => Err(error),
        }
    }
}

/// How a [`SagaRuntime`] dispatches and polls.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SagaOptions {
    /// Attempts and backoff of a command that fails to execute (a transient failure); once
    /// spent, its instance is parked. Default: 5 attempts, delays drawn at random up to a bound
    /// that starts at 1 s and doubles to 1 min. Only the attempts and delays are used (a
    /// `max_elapsed` is not: the delays are durable, a retry is due at a stored time).
    pub retry: RetryPolicy,
    /// Commands (or timeouts) taken per round (default 100).
    pub batch_size: usize,
    /// How long [`run`](SagaRuntime::run) waits between rounds when idle, and between tries
    /// for the lease while another instance holds it (default 200 ms).
    pub poll: Duration,
}

impl Default for SagaOptions {
    fn default() -> Self {
        Self {
            retry: RetryPolicy::new()
                .with_max_attempts(5)
                .with_initial_delay(Duration::from_secs(1))
                .with_max_delay(Duration::from_secs(60))
                .with_max_elapsed(None),
            batch_size: 100,
            poll: Duration::from_millis(200),
        }
    }
}

impl SagaOptions {
    /// Sets the retry policy of failing dispatches.
    #[must_use]
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Sets the poll interval.
    #[must_use]
    pub fn poll(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }
}

/// What a saga runtime's dispatch and timer loop is doing.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum SagaState {
    /// Not started.
    Starting,
    /// Dispatching and firing.
    Running,
    /// Another instance holds the lease.
    Standby,
    /// The store failed in a way that may pass; trying again.
    Retrying(String),
    /// Stopped on request.
    Stopped,
    /// Stopped on an error.
    Failed(String),
}

/// A saga runtime's counters, published as it runs ([`SagaRuntime::status`]).
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct SagaStatus {
    /// What its loop is doing.
    pub state: SagaState,
    /// Inputs (events, rejections, timeouts) reacted to.
    pub reacted: u64,
    /// Commands executed and accepted.
    pub dispatched: u64,
    /// Commands rejected (handed back to the saga).
    pub rejected: u64,
    /// Timeouts fired.
    pub fired: u64,
    /// Failed dispatch attempts postponed for a retry.
    pub retries: u64,
    /// Instances parked.
    pub parked: u64,
}

/// What one [`SagaRuntime::tick`] did.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct Tick {
    /// Commands dispatched (accepted or rejected).
    pub dispatched: usize,
    /// Timeouts fired.
    pub fired: usize,
}

/// Runs saga `S` on store `St`: a [`BatchHandler`] for the consumers feeding it (a
/// [`Subscription`](crate::subscription::Subscription) of the local log, an
/// [`InboundConsumer`](crate::bus::InboundConsumer) of other services' events), and the loop
/// that dispatches its commands and fires its timeouts ([`tick`](Self::tick),
/// [`run`](Self::run)). Clones share the targets, the clock and the status.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use factum::saga::{InMemorySagaStore, SagaRuntime, TestClock};
/// # use factum::saga::{Decisions, Input, Saga};
/// # use factum::{BoxError, Envelope, Event, InMemoryStore};
/// # #[derive(Debug, serde::Serialize, serde::Deserialize, Event)] #[event(name = "x.happened")] struct Happened;
/// # #[derive(Debug, serde::Serialize, serde::Deserialize, Event)] #[event(name = "noted.it")] struct Noted;
/// # #[derive(Default)] struct Notes;
/// # impl Saga for Notes {
/// #     const NAME: &'static str = "notes"; type Event = Happened; type Change = Noted; type Timeout = ();
/// #     fn instance(e: &Envelope<Happened>) -> Option<String> { Some(e.stream_id.aggregate_id().to_owned()) }
/// #     fn react(&self, _: Input<'_, Self>, then: &mut Decisions<Self>) -> Result<(), BoxError> { then.record(Noted); Ok(()) }
/// #     fn evolve(&mut self, _: &Noted) {}
/// # }
/// let store = InMemoryStore::new();
/// let runtime = SagaRuntime::<Notes, _>::new(InMemorySagaStore::new(store.clone()))
///     .clock(TestClock::default());
/// // Feed it the local log...
/// let mut subscription = factum::subscription::Subscription::new(runtime.name(), store.clone())
///     .filter(runtime.filter());
/// subscription.catch_up(runtime.clone()).await?;
/// // ...and dispatch what it decided, fire what is due.
/// let done = runtime.tick().await?;
/// assert_eq!(done.dispatched, 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
pub struct SagaRuntime<S: Saga, St: SagaStore> {
    store: St,
    clock: Arc<dyn Clock>,
    targets: Arc<Targets<St::Tx>>,
    options: SagaOptions,
    status: Arc<watch::Sender<SagaStatus>>,
    _saga: PhantomData<fn() -> S>,
}

impl<S: Saga, St: SagaStore + Clone> Clone for SagaRuntime<S, St> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            clock: self.clock.clone(),
            targets: self.targets.clone(),
            options: self.options.clone(),
            status: self.status.clone(),
            _saga: PhantomData,
        }
    }
}

impl<S: Saga, St: SagaStore> std::fmt::Debug for SagaRuntime<S, St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut targets: Vec<_> = self.targets.keys().collect();
        targets.sort();
        f.debug_struct("SagaRuntime")
            .field("saga", &S::NAME)
            .field("clock", &self.clock)
            .field("targets", &targets)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<S: Saga, St: SagaStore> SagaRuntime<S, St> {
    /// A runtime for saga `S` on `store`, with the system clock, no targets yet and the default
    /// options.
    pub fn new(store: St) -> Self {
        Self {
            store,
            clock: Arc::new(SystemClock),
            targets: Arc::default(),
            options: SagaOptions::default(),
            status: Arc::new(
                watch::channel(SagaStatus {
                    state: SagaState::Starting,
                    reacted: 0,
                    dispatched: 0,
                    rejected: 0,
                    fired: 0,
                    retries: 0,
                    parked: 0,
                })
                .0,
            ),
            _saga: PhantomData,
        }
    }

    /// Reads time from `clock` (a [`TestClock`](super::TestClock) in tests).
    #[must_use]
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Sends the commands for `target`'s aggregate type there (replacing an earlier target of
    /// that type). A command for a type with no target parks its instance, naming the type.
    #[must_use]
    pub fn target(mut self, target: impl Target<St::Tx> + 'static) -> Self {
        let target: Arc<dyn Target<St::Tx>> = Arc::new(target);
        let mut targets: HashMap<_, _> = (*self.targets).clone();
        targets.insert(target.aggregate_type(), target);
        self.targets = Arc::new(targets);
        self
    }

    /// Sends the commands for `A` to `repository` (a [`RepositoryTarget`]).
    #[must_use]
    pub fn repository<A, R>(self, repository: Repository<A, R>) -> Self
    where
        A: Aggregate,
        A::Command: DeserializeOwned,
        R: EventStore + Send + Sync + 'static,
    {
        self.target(RepositoryTarget::new(repository))
    }

    /// Replaces the options.
    #[must_use]
    pub fn options(mut self, options: SagaOptions) -> Self {
        self.options = options;
        self
    }

    /// The name of the subscription feeding it from the local log: `"saga.{NAME}"`.
    pub fn name(&self) -> String {
        format!("saga.{}", S::NAME)
    }

    /// The events it reacts to, for the subscription feeding it
    /// ([`Subscription::filter`](crate::subscription::Subscription::filter)).
    pub fn filter(&self) -> EventFilter {
        EventFilter::for_event::<S::Event>()
    }

    /// Its store.
    pub fn store(&self) -> &St {
        &self.store
    }

    /// Its clock's current time.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.clock.now()
    }

    /// A live view of its counters and state.
    pub fn status(&self) -> watch::Receiver<SagaStatus> {
        self.status.subscribe()
    }

    /// The current state of instance `key` (`None` when it recorded nothing yet).
    pub async fn state(&self, key: &str) -> Result<Option<S>, Error> {
        let stream = instance_stream::<S>(key)?;
        let mut tx = self.store.begin().await?;
        let loaded = self.store.load(&mut tx, S::NAME, key, &stream).await;
        self.store.rollback(tx).await;
        let instance = loaded?;
        if instance.changes.is_empty() {
            return Ok(None);
        }
        fold::<S>(&instance.changes).map(Some)
    }

    /// The parked instances, oldest first.
    pub async fn parked(&self) -> Result<Vec<super::ParkedInstance>, Error> {
        self.store.parked(S::NAME).await
    }

    /// Unparks instance `key` (after what made its command fail was fixed): its commands are due
    /// at once with fresh attempts, dispatched by the next [`tick`](Self::tick). Returns whether
    /// it was parked.
    pub async fn retry_parked(&self, key: &str) -> Result<bool, Error> {
        self.store.unpark(S::NAME, key, self.clock.now()).await
    }

    /// The pending timeouts of instance `key`.
    pub async fn timeouts(&self, key: &str) -> Result<Vec<super::ScheduledTimeout>, Error> {
        self.store.timeouts(S::NAME, key).await
    }

    /// The commands of instance `key` waiting for dispatch.
    pub async fn pending(&self, key: &str) -> Result<Vec<PendingCommand>, Error> {
        self.store.commands(S::NAME, key).await
    }

    /// Reacts to a stored event within `tx`: decodes it (an event that does not decode is an
    /// error naming it), finds its instance, loads and locks it, and stores the reaction.
    pub async fn react_to_event(
        &self,
        tx: &mut St::Tx,
        event: &RecordedEvent,
    ) -> Result<(), BoxError> {
        let envelope = event.decode::<S::Event>()?;
        let Some(key) = S::instance(&envelope) else {
            return Ok(());
        };
        let correlation = envelope
            .metadata
            .correlation_id
            .unwrap_or_else(|| CorrelationId::from_uuid(envelope.event_id.as_uuid()));
        let stream = instance_stream::<S>(&key)?;
        let instance = self.store.load(tx, S::NAME, &key, &stream).await?;
        self.react(
            tx,
            instance,
            envelope.event_id.as_uuid(),
            correlation,
            Input::Event(&envelope),
        )
        .await
    }

    /// Reacts to `input` on the loaded `instance` and stores the reaction, unless the instance
    /// already recorded a reaction to `trigger` (an input handed over again).
    async fn react(
        &self,
        tx: &mut St::Tx,
        instance: Instance,
        trigger: Uuid,
        correlation: CorrelationId,
        input: Input<'_, S>,
    ) -> Result<(), BoxError> {
        let cause = crate::CausationId::from_uuid(trigger);
        if instance
            .changes
            .iter()
            .any(|c| c.metadata.causation_id == Some(cause))
        {
            tracing::debug!(saga = S::NAME, key = %instance.key, %trigger, "input already reacted to");
            return Ok(());
        }
        let state = fold::<S>(&instance.changes)?;
        let mut decisions =
            Decisions::<S>::new(&instance.key, self.clock.now(), trigger, correlation);
        state.react(input, &mut decisions)?;
        drop(state);
        if !decisions.is_empty() {
            let decided = decisions.into_decided(instance.stream, instance.version)?;
            self.store.save(tx, decided).await?;
        }
        self.status.send_modify(|s| s.reacted += 1);
        Ok(())
    }

    /// One round of work: dispatches every due command (in each instance's order) and fires
    /// every due timeout, until none is left. Commands and timeouts of other runtime instances
    /// are claimed in units of work, so each is done once.
    pub async fn tick(&self) -> Result<Tick, Error> {
        let mut done = Tick::default();
        loop {
            let dispatched = self.dispatch_due().await?;
            let fired = self.fire_due().await?;
            done.dispatched += dispatched;
            done.fired += fired;
            if dispatched + fired == 0 {
                return Ok(done);
            }
        }
    }

    async fn dispatch_due(&self) -> Result<usize, Error> {
        let due = self
            .store
            .due_commands(S::NAME, self.clock.now(), self.options.batch_size)
            .await?;
        let mut dispatched = 0;
        for pending in due {
            if self.dispatch(pending).await? {
                dispatched += 1;
            }
        }
        Ok(dispatched)
    }

    /// Dispatches one command; whether it was done (accepted or rejected).
    async fn dispatch(&self, pending: PendingCommand) -> Result<bool, Error> {
        let Some(target) = self.targets.get(pending.command.target.as_str()).cloned() else {
            let error = format!(
                "saga `{}` sent command {} to aggregate type `{}`, which has no target: register one with `SagaRuntime::target`, then retry the instance",
                S::NAME,
                pending.command.command_name,
                pending.command.target
            );
            tracing::error!(saga = S::NAME, key = %pending.key, %error, "parking a saga instance");
            self.store.park(&pending, pending.attempts, error).await?;
            self.status.send_modify(|s| s.parked += 1);
            return Ok(false);
        };
        let command_id = pending.command.context.command_id;
        let stream = instance_stream::<S>(&pending.key)?;
        let mut tx = self.store.begin().await?;
        let instance = match self
            .store
            .load(&mut tx, S::NAME, &pending.key, &stream)
            .await
        {
            Ok(instance) => instance,
            Err(error) => {
                self.store.rollback(tx).await;
                return Err(error);
            }
        };
        if instance.parked.is_some() {
            self.store.rollback(tx).await;
            return Ok(false);
        }
        let claimed = match self.store.claim_command(&mut tx, S::NAME, command_id).await {
            Ok(Some(claimed)) => claimed,
            Ok(None) => {
                self.store.rollback(tx).await;
                return Ok(false);
            }
            Err(error) => {
                self.store.rollback(tx).await;
                return Err(error);
            }
        };
        let outcome = target.execute(&mut tx, &claimed.command).await;
        let result: Result<bool, BoxError> = match outcome {
            Ok(Executed::Accepted) => Ok(false),
            Ok(Executed::Rejected(error)) => {
                tracing::info!(saga = S::NAME, key = %claimed.key, command = %claimed.command.command_name, %error, "saga command rejected");
                let rejection = Rejection::new(claimed.command.clone(), error);
                self.react(
                    &mut tx,
                    instance,
                    rejection_trigger(command_id),
                    claimed.command.context.correlation_id,
                    Input::Rejected(&rejection),
                )
                .await
                .map(|()| true)
            }
            Err(error) => Err(Box::new(error)),
        };
        let rejected = match result {
            Ok(rejected) => rejected,
            Err(error) => {
                self.store.rollback(tx).await;
                self.failed(&claimed, error).await?;
                return Ok(false);
            }
        };
        if let Err(error) = self.store.commit(tx).await {
            // Not committed (or unknown): the command is still queued, or done.
            self.failed(&claimed, Box::new(error)).await?;
            return Ok(false);
        }
        self.status.send_modify(|s| {
            if rejected {
                s.rejected += 1;
            } else {
                s.dispatched += 1;
            }
        });
        Ok(true)
    }

    /// A dispatch attempt failed: retry later with backoff while it may pass and attempts are
    /// left, else park the instance.
    async fn failed(&self, command: &PendingCommand, error: BoxError) -> Result<(), Error> {
        let attempts = command.attempts + 1;
        let may_pass = error
            .downcast_ref::<Error>()
            .is_some_and(|e| retries_after(e) || e.is_conflict());
        let rendered = crate::error_chain(&*error);
        let delay = may_pass
            .then(|| self.options.retry.backoff().nth(attempts as usize - 1))
            .flatten();
        match delay {
            Some(delay) => {
                tracing::warn!(saga = S::NAME, key = %command.key, command = %command.command.command_name, attempts, error = %rendered, ?delay, "saga command failed; retrying later");
                let delay = chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
                let due = self
                    .clock
                    .now()
                    .checked_add_signed(delay)
                    .unwrap_or_else(|| self.clock.now());
                self.store
                    .postpone(command, attempts, due, rendered)
                    .await?;
                self.status.send_modify(|s| s.retries += 1);
            }
            None => {
                tracing::error!(saga = S::NAME, key = %command.key, command = %command.command.command_name, attempts, error = %rendered, "saga command keeps failing; parking its instance");
                self.store.park(command, attempts, rendered).await?;
                self.status.send_modify(|s| s.parked += 1);
            }
        }
        Ok(())
    }

    async fn fire_due(&self) -> Result<usize, Error> {
        let due = self
            .store
            .due_timeouts(S::NAME, self.clock.now(), self.options.batch_size)
            .await?;
        let mut fired = 0;
        for timeout in due {
            let stream = instance_stream::<S>(&timeout.key)?;
            let mut tx = self.store.begin().await?;
            // The instance first, then the timeout: the order every unit of work locks them in.
            let instance = match self
                .store
                .load(&mut tx, S::NAME, &timeout.key, &stream)
                .await
            {
                Ok(instance) => instance,
                Err(error) => {
                    self.store.rollback(tx).await;
                    return Err(error);
                }
            };
            let claimed = match self.store.claim_timeout(&mut tx, S::NAME, timeout.id).await {
                Ok(Some(claimed)) => claimed,
                Ok(None) => {
                    self.store.rollback(tx).await;
                    continue;
                }
                Err(error) => {
                    self.store.rollback(tx).await;
                    return Err(error);
                }
            };
            let reacted = async {
                let payload: S::Timeout = serde_json::from_str(claimed.payload.get())?;
                let fired = Fired {
                    name: claimed.name.clone(),
                    id: claimed.id,
                    due_at: claimed.due_at,
                    timeout: payload,
                };
                self.react(
                    &mut tx,
                    instance,
                    claimed.id,
                    claimed.correlation_id,
                    Input::Timeout(&fired),
                )
                .await
            }
            .await;
            if let Err(error) = reacted {
                self.store.rollback(tx).await;
                self.store.release_timeout(&claimed).await?;
                return Err(Error::permanent(
                    "fire saga timeout",
                    format!(
                        "saga `{}` instance {:?} failed to react to its timeout {:?} (due {}): {}",
                        S::NAME,
                        claimed.key,
                        claimed.name,
                        claimed.due_at,
                        crate::error_chain(&*error)
                    ),
                ));
            }
            if let Err(error) = self.store.commit(tx).await {
                if retries_after(&error) {
                    // Not committed (or unknown): still due, or done; the next round knows.
                    tracing::warn!(saga = S::NAME, %error, "committing a fired timeout failed");
                    continue;
                }
                return Err(error);
            }
            tracing::info!(saga = S::NAME, key = %claimed.key, timeout = %claimed.name, "saga timeout fired");
            self.status.send_modify(|s| s.fired += 1);
            fired += 1;
        }
        Ok(fired)
    }

    /// Dispatches and fires ([`tick`](Self::tick)) while holding `lease` (keyed
    /// `"saga.{NAME}.timer"`: of several runtime instances one works, the others stand by), every
    /// [`poll`](SagaOptions::poll) while idle, until `shutdown` completes (between rounds) or a
    /// failure that cannot pass stops it. Store failures that may pass are waited out.
    pub async fn run<L: Lease>(
        &self,
        lease: L,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), Error> {
        let name = format!("saga.{}.timer", S::NAME);
        let mut shutdown = std::pin::pin!(shutdown.fuse());
        let mut wait = crate::subscription::RETRY_MIN;
        'lease: loop {
            let mut guard = loop {
                let taken = tokio::select! {
                    biased;
                    () = &mut shutdown => break 'lease,
                    taken = lease.try_acquire(&name) => taken,
                };
                match taken {
                    Ok(Some(guard)) => break guard,
                    Ok(None) => self.status.send_modify(|s| s.state = SagaState::Standby),
                    Err(error) if retries_after(&error) => {
                        self.status
                            .send_modify(|s| s.state = SagaState::Retrying(error.to_string()));
                    }
                    Err(error) => {
                        self.status
                            .send_modify(|s| s.state = SagaState::Failed(error.to_string()));
                        return Err(error);
                    }
                }
                tokio::select! {
                    biased;
                    () = &mut shutdown => break 'lease,
                    () = tokio::time::sleep(self.options.poll) => {}
                }
            };
            self.status.send_modify(|s| s.state = SagaState::Running);
            loop {
                // Shutdown takes effect between rounds: a round's units of work finish first.
                if (&mut shutdown).now_or_never().is_some() {
                    break 'lease;
                }
                let pause = match self.tick().await {
                    Ok(_) => {
                        wait = crate::subscription::RETRY_MIN;
                        self.status.send_if_modified(|s| {
                            let changed = s.state != SagaState::Running;
                            s.state = SagaState::Running;
                            changed
                        });
                        self.options.poll
                    }
                    Err(error) if retries_after(&error) => {
                        tracing::warn!(saga = S::NAME, %error, retry_in = ?wait, "the saga store failed; retrying");
                        self.status
                            .send_modify(|s| s.state = SagaState::Retrying(error.to_string()));
                        let pause = wait;
                        wait = (wait * 2).min(crate::subscription::RETRY_MAX);
                        pause
                    }
                    Err(error) => {
                        self.status
                            .send_modify(|s| s.state = SagaState::Failed(error.to_string()));
                        return Err(error);
                    }
                };
                tokio::select! {
                    biased;
                    () = &mut shutdown => break 'lease,
                    () = tokio::time::sleep(pause) => {}
                }
                if !lease.is_held(&mut guard).await {
                    tracing::warn!(saga = S::NAME, "lost the saga lease; standing by");
                    drop(guard);
                    self.status.send_modify(|s| s.state = SagaState::Standby);
                    continue 'lease;
                }
            }
        }
        self.status.send_modify(|s| s.state = SagaState::Stopped);
        Ok(())
    }
}

impl<S, St, Tx> BatchHandler<Tx> for SagaRuntime<S, St>
where
    S: Saga,
    St: SagaStore,
    Tx: UnitOfWork<St::Tx>,
{
    async fn handle_batch(
        &mut self,
        tx: &mut Tx,
        events: &[RecordedEvent],
    ) -> Result<(), BatchFailure> {
        for event in events {
            // Somewhere: on PostgreSQL a failed statement aborted the transaction.
            self.react_to_event(tx.unit(), event)
                .await
                .map_err(BatchFailure::somewhere)?;
        }
        Ok(())
    }
}
