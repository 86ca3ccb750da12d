//! Sagas: process managers whose instances survive restarts.
//!
//! A [`Saga`] coordinates a workflow across aggregates and services (reserve stock, charge a
//! card, ship; undo what was done when a step fails). Unlike a plain
//! [`ProcessManager`](crate::ProcessManager), which has one in-memory state for all workflows,
//! a saga has **one instance per workflow** (keyed by [`Saga::instance`], e.g. the order id),
//! and each instance's state is **event-sourced**: the changes it records
//! ([`Saga::Change`]) are events in a stream of its own (`"{NAME}-{key}"`), so its history is
//! auditable and replayable, and public changes can be relayed to other services.
//!
//! The [`SagaRuntime`] runs it:
//! * **Inputs**: events of the local log (the runtime is a
//!   [`BatchHandler`](crate::subscription::BatchHandler) for the one consumer runtime,
//!   [`Subscription`](crate::subscription::Subscription)) and events from other services (the
//!   same handler, given to an [`InboundConsumer`](crate::bus::InboundConsumer)). For each, it
//!   loads the instance, calls [`Saga::react`], and stores the changes, the commands decided and
//!   the timeouts scheduled or cancelled **in one unit of work** (with the checkpoint or the
//!   inbox row, on a transactional backend).
//! * **Dispatch**: [`SagaRuntime::tick`] (or [`run`](SagaRuntime::run)) executes the stored
//!   commands on their [`Target`]s with ids derived from what triggered them, and removes them in
//!   the same unit of work as their effect: a crash between deciding and dispatching dispatches
//!   each command once after the restart. A rejected command comes back to the saga as
//!   [`Input::Rejected`], with the typed rejection; a transient failure is retried with backoff
//!   (a [`RetryPolicy`](crate::resilience::RetryPolicy)), and an instance whose command keeps
//!   failing is **parked** until [`retry_parked`](SagaRuntime::retry_parked).
//! * **Timeouts**: [`Decisions::schedule`] stores a timeout with the instance; when the
//!   [`Clock`] passes its deadline, it arrives as [`Input::Timeout`], once, even after a restart
//!   and with several runtime instances.
//!
//! Commands are typed by the aggregate they address: [`Decisions::send::<A>`](Decisions::send)
//! takes an `A::Command`, so a wrong command for a target does not compile.
//!
//! See the book's chapter "Sagas and process managers" for a worked example.

mod clock;
mod runtime;
mod store;

use std::marker::PhantomData;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::aggregate::{Aggregate, Command};
use crate::error::{BoxError, Error};
use crate::event::{Envelope, Event, EventMetadata, NewEvent, RecordedEvent};
use crate::idempotency::derive;
use crate::ids::{CommandId, CorrelationId, EventId, StreamId};
use crate::repository::CommandContext;

pub use clock::{Clock, SystemClock, TestClock};
pub use runtime::{
    Executed, RepositoryTarget, SagaOptions, SagaRuntime, SagaState, SagaStatus, Target, Tick,
    UnitOfWork,
};
pub use store::{
    Decided, InMemorySagaStore, Instance, ParkedInstance, PendingCommand, SagaStore,
    ScheduledTimeout,
};

/// A durable process manager: one instance per workflow, with event-sourced state, typed
/// commands, timeouts and compensation. See the [module docs](self).
///
/// ```
/// use std::time::Duration;
/// use factum::saga::{Decisions, Input, Saga};
/// use factum::{BoxError, Envelope};
/// # use factum::{Aggregate, Command, Event};
/// # #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, Event)]
/// # #[event(name = "order.placed")]
/// # struct Placed { order: String }
/// # #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, Event)]
/// # enum CheckoutChange {
/// #     #[event(name = "checkout.started")] Started,
/// #     #[event(name = "checkout.expired")] Expired,
/// # }
/// # #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, Command)]
/// # enum OrderCommand { Cancel { #[command(id)] order: String } }
/// # #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, Event)]
/// # #[event(name = "order.cancelled")]
/// # struct Cancelled;
/// # #[derive(Debug, thiserror::Error)] #[error("no")] struct No;
/// # #[derive(Default, Aggregate)]
/// # #[aggregate(type = "order", command = OrderCommand, event = Cancelled, error = No)]
/// # struct Order;
/// # impl Order {
/// #     fn decide(&self, _: &OrderCommand) -> Result<Vec<Cancelled>, No> { Ok(vec![Cancelled]) }
/// #     fn evolve(&mut self, _: &Cancelled) {}
/// # }
///
/// /// Cancels an order nobody paid for within 15 minutes.
/// #[derive(Default)]
/// struct Checkout { order: String, expired: bool }
///
/// impl Saga for Checkout {
///     const NAME: &'static str = "checkout";
///     type Event = Placed;
///     type Change = CheckoutChange;
///     type Timeout = ();
///
///     fn instance(event: &Envelope<Placed>) -> Option<String> {
///         Some(event.event.order.clone())
///     }
///
///     fn react(&self, input: Input<'_, Self>, then: &mut Decisions<Self>) -> Result<(), BoxError> {
///         match input {
///             Input::Event(_) => {
///                 then.record(CheckoutChange::Started);
///                 then.schedule("payment", Duration::from_secs(15 * 60), ())?;
///             }
///             Input::Timeout(_) => {
///                 then.record(CheckoutChange::Expired);
///                 then.send::<Order>(OrderCommand::Cancel { order: then.key().to_owned() })?;
///             }
///             Input::Rejected(_) => {}
///         }
///         Ok(())
///     }
///
///     fn evolve(&mut self, change: &CheckoutChange) {
///         if let CheckoutChange::Expired = change { self.expired = true; }
///     }
/// }
/// # let _ = Checkout::default().order;
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a factum saga",
    label = "this type does not implement `factum::saga::Saga`",
    note = "implement `factum::saga::Saga` for `{Self}`: name it, declare its `Event`, `Change` and `Timeout` types, and write `instance`, `react` and `evolve`"
)]
pub trait Saga: Default + Send + Sync + 'static {
    /// A stable name: the category of its instances' streams (`"{NAME}-{key}"`, so no `-`) and
    /// the key of its stored commands and timeouts.
    const NAME: &'static str;
    /// The events it reacts to (local or from other services): usually an enum deriving
    /// [`Event`] whose variants are exactly those events.
    type Event: Event;
    /// What an instance records about itself: its state is rebuilt from these.
    type Change: Event;
    /// What a timeout carries back when it fires (`()` when the name says it all).
    type Timeout: Serialize + DeserializeOwned + Send + Sync + 'static;

    /// The instance an event belongs to (e.g. the order id it is about), or `None` to ignore it.
    fn instance(event: &Envelope<Self::Event>) -> Option<String>;

    /// Reacts to an input: records changes, sends commands, schedules or cancels timeouts, all
    /// into `then`. Deterministic: the time is [`Decisions::now`], not the system's.
    ///
    /// An error is the unit of work's failure: nothing of it is stored, and the input is tried
    /// again (then parked or fatal, as the consumer feeding it is configured).
    ///
    /// Record a change in every reaction that decides something: an input handed over again (a
    /// replay of the log) is recognised by the changes it caused and not reacted to twice.
    /// (Commands sent again would be harmless anyway: they carry their derived id as idempotency
    /// key.)
    fn react(&self, input: Input<'_, Self>, then: &mut Decisions<Self>) -> Result<(), BoxError>;

    /// Applies one recorded change to the state. It must not fail: the change happened.
    fn evolve(&mut self, change: &Self::Change);
}

/// What a saga instance reacts to.
#[derive(Debug)]
pub enum Input<'a, S: Saga> {
    /// An event it declared interest in.
    Event(&'a Envelope<S::Event>),
    /// One of its commands was rejected by its target.
    Rejected(&'a Rejection),
    /// One of its timeouts fired.
    Timeout(&'a Fired<S::Timeout>),
}

/// A command a saga sent that its target rejected: the typed outcome it compensates on.
#[derive(Debug)]
pub struct Rejection {
    command: SentCommand,
    error: BoxError,
}

impl Rejection {
    /// A rejection of `command` with `error` (the target aggregate's `Error`).
    pub fn new(command: SentCommand, error: BoxError) -> Self {
        Self { command, error }
    }

    /// The rejected command.
    pub fn sent(&self) -> &SentCommand {
        &self.command
    }

    /// Whether the rejected command was addressed to aggregate `A`.
    pub fn is_for<A: Aggregate>(&self) -> bool {
        self.command.target == A::TYPE
    }

    /// The rejected command, when it was addressed to `A`.
    pub fn command<A: Aggregate>(&self) -> Option<A::Command>
    where
        A::Command: DeserializeOwned,
    {
        self.command.command::<A>()
    }

    /// `A`'s typed rejection, when the command was addressed to `A`.
    pub fn error<A: Aggregate>(&self) -> Option<&A::Error> {
        if !self.is_for::<A>() {
            return None;
        }
        self.error.downcast_ref::<A::Error>()
    }

    /// The rejection's message.
    pub fn reason(&self) -> String {
        self.error.to_string()
    }
}

/// A timeout that fired.
#[derive(Debug)]
#[non_exhaustive]
pub struct Fired<T> {
    /// The name it was scheduled with.
    pub name: String,
    /// Its id (derived from what scheduled it).
    pub id: Uuid,
    /// When it was due.
    pub due_at: DateTime<Utc>,
    /// What it carries.
    pub timeout: T,
}

impl<T> Fired<T> {
    /// A fired timeout from its parts (for test fixtures and custom runtimes).
    pub fn new(name: impl Into<String>, id: Uuid, due_at: DateTime<Utc>, timeout: T) -> Self {
        Self {
            name: name.into(),
            id,
            due_at,
            timeout,
        }
    }
}

/// A command a saga decided to send: to which aggregate type, the command encoded, and the
/// context it runs in (an id derived from the input that caused it, the workflow's correlation
/// id, that input as causation, the command id as idempotency key).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SentCommand {
    /// The target aggregate type ([`Aggregate::TYPE`]).
    pub target: String,
    /// [`Command::command_name`].
    pub command_name: String,
    /// The id of the aggregate instance addressed.
    pub aggregate_id: String,
    /// The command, as JSON.
    pub payload: Box<RawValue>,
    /// Its context.
    pub context: CommandContext,
}

impl SentCommand {
    /// A command from its stored parts.
    pub fn stored(
        target: String,
        command_name: String,
        aggregate_id: String,
        payload: Box<RawValue>,
        context: CommandContext,
    ) -> Self {
        Self {
            target,
            command_name,
            aggregate_id,
            payload,
            context,
        }
    }

    /// Decodes the command as `A`'s, for a [`Target`] of `A`: an error names the command when it
    /// is addressed to another type or does not decode.
    pub fn decode<A: Aggregate>(&self) -> Result<A::Command, Error>
    where
        A::Command: DeserializeOwned,
    {
        if self.target != A::TYPE {
            return Err(Error::InvalidArgument(format!(
                "command {} {} is addressed to `{}`, not to `{}`",
                self.command_name,
                self.context.command_id,
                self.target,
                A::TYPE
            )));
        }
        serde_json::from_str(self.payload.get()).map_err(|e| {
            Error::permanent(
                "dispatch saga command",
                format!(
                    "stored command {} {} for `{}` does not decode as the aggregate's command type: {e}",
                    self.command_name, self.context.command_id, A::TYPE
                ),
            )
        })
    }

    /// The command, when it is addressed to `A` (and decodes as `A::Command`).
    pub fn command<A: Aggregate>(&self) -> Option<A::Command>
    where
        A::Command: DeserializeOwned,
    {
        if self.target != A::TYPE {
            return None;
        }
        serde_json::from_str(self.payload.get()).ok()
    }
}

/// A timeout a saga scheduled or cancelled.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum TimeoutDecision {
    /// Fire `name` at `due_at` (replacing a pending timeout of the same name).
    Schedule {
        /// Its name within the instance.
        name: String,
        /// Its id (derived from the input that scheduled it).
        id: Uuid,
        /// When it fires.
        due_at: DateTime<Utc>,
        /// What it carries, as JSON.
        payload: Box<RawValue>,
    },
    /// Cancel the pending timeout `name`, if any.
    Cancel {
        /// Its name within the instance.
        name: String,
    },
}

impl TimeoutDecision {
    /// The timeout's name.
    pub fn name(&self) -> &str {
        match self {
            Self::Schedule { name, .. } | Self::Cancel { name } => name,
        }
    }
}

/// What one reaction of a saga instance decided: changes to record, commands to send, timeouts
/// to schedule or cancel. Filled by [`Saga::react`].
pub struct Decisions<S: Saga> {
    key: String,
    now: DateTime<Utc>,
    trigger: Uuid,
    correlation_id: CorrelationId,
    changes: Vec<S::Change>,
    commands: Vec<SentCommand>,
    timeouts: Vec<TimeoutDecision>,
    _saga: PhantomData<fn() -> S>,
}

impl<S: Saga> std::fmt::Debug for Decisions<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decisions")
            .field("saga", &S::NAME)
            .field("key", &self.key)
            .field("changes", &self.changes.len())
            .field("commands", &self.commands)
            .field("timeouts", &self.timeouts)
            .finish_non_exhaustive()
    }
}

impl<S: Saga> Decisions<S> {
    /// Empty decisions for instance `key`, reacting at `now` to the input `trigger` (an event id,
    /// a timeout id, a rejected command's id) in workflow `correlation_id`.
    pub fn new(
        key: impl Into<String>,
        now: DateTime<Utc>,
        trigger: Uuid,
        correlation_id: CorrelationId,
    ) -> Self {
        Self {
            key: key.into(),
            now,
            trigger,
            correlation_id,
            changes: Vec::new(),
            commands: Vec::new(),
            timeouts: Vec::new(),
            _saga: PhantomData,
        }
    }

    /// The instance's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The time of this reaction, from the runtime's [`Clock`].
    pub fn now(&self) -> DateTime<Utc> {
        self.now
    }

    /// The workflow's correlation id.
    pub fn correlation_id(&self) -> CorrelationId {
        self.correlation_id
    }

    /// Records a change of the instance (evolved into its state once stored).
    pub fn record(&mut self, change: S::Change) {
        self.changes.push(change);
    }

    /// Sends `command` to aggregate `A` (a local repository, or another service's, as the
    /// runtime's [`Target`] for `A` says). Its id is derived from the input being reacted to and
    /// the command's index, so reacting again sends the same command. Returns that id.
    ///
    /// Fails only when the command does not serialise.
    pub fn send<A: Aggregate>(&mut self, command: A::Command) -> Result<CommandId, Error>
    where
        A::Command: Serialize,
    {
        let index = u32::try_from(self.commands.len()).unwrap_or(u32::MAX);
        let command_id = CommandId::derived(EventId::from_uuid(self.trigger), index);
        let payload = serde_json::value::to_raw_value(&command).map_err(|e| {
            Error::InvalidArgument(format!(
                "command {} for `{}` does not serialise: {e}",
                command.command_name(),
                A::TYPE
            ))
        })?;
        let context = CommandContext::new()
            .with_command_id(command_id)
            .with_correlation_id(self.correlation_id)
            .idempotent();
        let context = CommandContext {
            causation_id: Some(crate::CausationId::from_uuid(self.trigger)),
            ..context
        };
        self.commands.push(SentCommand {
            target: A::TYPE.to_owned(),
            command_name: command.command_name().to_owned(),
            aggregate_id: command.aggregate_id(),
            payload,
            context,
        });
        Ok(command_id)
    }

    /// Schedules timeout `name` to fire `after` from [`now`](Self::now), carrying `timeout`
    /// (replacing a pending timeout of the same name).
    ///
    /// Fails only when `timeout` does not serialise.
    pub fn schedule(
        &mut self,
        name: impl Into<String>,
        after: Duration,
        timeout: S::Timeout,
    ) -> Result<(), Error> {
        let after = chrono::Duration::from_std(after).unwrap_or(chrono::Duration::MAX);
        let due_at = self.now.checked_add_signed(after).unwrap_or(self.now);
        self.schedule_at(name, due_at, timeout)
    }

    /// Schedules timeout `name` to fire at `due_at`.
    ///
    /// Fails only when `timeout` does not serialise.
    pub fn schedule_at(
        &mut self,
        name: impl Into<String>,
        due_at: DateTime<Utc>,
        timeout: S::Timeout,
    ) -> Result<(), Error> {
        let name = name.into();
        let index = u32::try_from(self.timeouts.len()).unwrap_or(u32::MAX);
        let payload = serde_json::value::to_raw_value(&timeout).map_err(|e| {
            Error::InvalidArgument(format!(
                "timeout {name:?} of saga `{}` does not serialise: {e}",
                S::NAME
            ))
        })?;
        self.timeouts.push(TimeoutDecision::Schedule {
            id: derive(b"saga-timeout", self.trigger, index),
            name,
            due_at,
            payload,
        });
        Ok(())
    }

    /// Cancels the pending timeout `name` (nothing happens if there is none).
    pub fn cancel(&mut self, name: impl Into<String>) {
        self.timeouts
            .push(TimeoutDecision::Cancel { name: name.into() });
    }

    /// The changes recorded so far.
    pub fn changes(&self) -> &[S::Change] {
        &self.changes
    }

    /// The commands sent so far.
    pub fn commands(&self) -> &[SentCommand] {
        &self.commands
    }

    /// The timeouts scheduled or cancelled so far.
    pub fn timeouts(&self) -> &[TimeoutDecision] {
        &self.timeouts
    }

    /// The changes, commands and timeout decisions, taken out (for test fixtures and custom
    /// runtimes).
    pub fn into_parts(self) -> (Vec<S::Change>, Vec<SentCommand>, Vec<TimeoutDecision>) {
        (self.changes, self.commands, self.timeouts)
    }

    /// Whether nothing was decided.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.commands.is_empty() && self.timeouts.is_empty()
    }

    /// The decisions as a [`Decided`] for the store: changes encoded with ids derived from the
    /// trigger, to append to `stream` at `expected`.
    fn into_decided(
        self,
        stream: StreamId,
        expected: crate::StreamVersion,
    ) -> Result<Decided, Error> {
        let metadata = EventMetadata {
            correlation_id: Some(self.correlation_id),
            causation_id: Some(crate::CausationId::from_uuid(self.trigger)),
            user: crate::Metadata::new(),
        };
        let changes = self
            .changes
            .iter()
            .enumerate()
            .map(|(i, change)| {
                let index = u32::try_from(i).unwrap_or(u32::MAX);
                NewEvent::encode(change, metadata.clone())
                    .map(|e| {
                        e.with_event_id(EventId::from_uuid(derive(
                            b"saga-change",
                            self.trigger,
                            index,
                        )))
                    })
                    .map_err(|source| Error::Encode {
                        stream: stream.clone(),
                        what: format!("saga change {:?}", change.event_type()),
                        source,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Decided {
            saga: S::NAME,
            key: self.key,
            stream,
            expected,
            changes,
            commands: self.commands,
            timeouts: self.timeouts,
            correlation_id: self.correlation_id,
            now: self.now,
        })
    }
}

/// The stream of saga `S`'s instance `key`.
pub fn instance_stream<S: Saga>(key: &str) -> Result<StreamId, Error> {
    StreamId::for_aggregate(S::NAME, key)
        .map_err(|e| Error::InvalidArgument(format!("saga `{}` instance {key:?}: {e}", S::NAME)))
}

/// Rebuilds an instance's state from its stored changes.
pub fn fold<S: Saga>(changes: &[RecordedEvent]) -> Result<S, Error> {
    let mut state = S::default();
    for change in changes {
        state.evolve(&change.decode::<S::Change>()?.event);
    }
    Ok(state)
}

/// The trigger id of the reaction to a rejection of command `command` (a name-based UUID of the
/// command's id): the commands and changes of that reaction derive their ids from it.
pub fn rejection_trigger(command: CommandId) -> Uuid {
    derive(b"saga-rejected", command.as_uuid(), 0)
}
