//! The aggregate fixture and the whole-flow fixture: given events, when a command, then the
//! events, the error, the state, the read models and the commands issued in reaction.

use std::any::Any;
use std::fmt::Debug;
use std::marker::PhantomData;

use factum::{
    Aggregate, Command, CommandContext, CommandError, CorrelationId, Decoded, Envelope, Event,
    EventFilter, EventMetadata, EventStore, InMemoryStore, IssuedCommand, LogPosition, NewEvent,
    Outbox, ProcessManager, Projection, RecordedEvent, Repository, StreamId, StreamVersion,
};

use crate::envelope::stream_id;
use crate::support::{block_on, listing, pretty, sequence_mismatch};

/// Given past events, when a command, then the events it produces, or the error it is rejected
/// with, and the state afterwards.
///
/// The command runs through the real thing: the given events are encoded and appended to the
/// command's stream in an [`InMemoryStore`], and the command is executed by a [`Repository`],
/// which loads (decodes and [`evolve`](Aggregate::evolve)s) the stream,
/// [`decide`](Aggregate::decide)s and appends. So the events' wire format is exercised too, and
/// the recorded events have real versions, positions and metadata
/// ([`Outcome::then_recorded`]).
///
/// ```
/// use bank::{Account, AccountCommand, AccountError, AccountEvent, Deposited, Opened, Withdrawn};
/// use factum_testkit::AggregateFixture;
///
/// let opened = AccountEvent::Opened(Opened { owner: "Ada".into() });
/// let deposited = AccountEvent::Deposited(Deposited { amount: 100 });
///
/// AggregateFixture::<Account>::new()
///     .given([opened.clone(), deposited.clone()])
///     .when(AccountCommand::Withdraw { account: "a1".into(), amount: 30 })
///     .then_events([AccountEvent::Withdrawn(Withdrawn { amount: 30 })])
///     .then_state(|account| assert_eq!(account.balance, 70));
///
/// AggregateFixture::<Account>::new()
///     .given([opened, deposited])
///     .when(AccountCommand::Withdraw { account: "a1".into(), amount: 500 })
///     .then_error(|e| matches!(e, AccountError::InsufficientFunds { .. }));
/// ```
///
/// To check read models and process managers in the same test, use [`FlowFixture`].
pub struct AggregateFixture<A: Aggregate> {
    setup: Setup<A>,
}

impl<A: Aggregate> Default for AggregateFixture<A> {
    fn default() -> Self {
        Self::new()
    }
}

impl<A: Aggregate> Debug for AggregateFixture<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AggregateFixture")
            .field("aggregate", &A::TYPE)
            .finish_non_exhaustive()
    }
}

impl<A: Aggregate> AggregateFixture<A> {
    /// A fixture with no past events: the command meets a new aggregate.
    pub fn new() -> Self {
        Self {
            setup: Setup::default(),
        }
    }

    /// Past events of the aggregate the command targets, oldest first. Calls add up.
    ///
    /// # Panics
    /// When an event cannot be encoded.
    #[must_use]
    #[track_caller]
    pub fn given(mut self, events: impl IntoIterator<Item = A::Event>) -> Self {
        self.setup.given(None, events);
        self
    }

    /// Executes `command` in a new workflow, and returns what happened for checking.
    ///
    /// # Panics
    /// When the command cannot be executed for a reason other than a rejection by the aggregate
    /// (e.g. a given event does not decode).
    #[track_caller]
    pub fn when(self, command: A::Command) -> Outcome<A> {
        self.setup.run(command, CommandContext::new())
    }

    /// Executes `command` within `context` (correlation id, metadata), and returns what happened
    /// for checking.
    ///
    /// # Panics
    /// As [`when`](Self::when).
    #[track_caller]
    pub fn when_with(self, command: A::Command, context: CommandContext) -> Outcome<A> {
        self.setup.run(command, context)
    }
}

/// The whole flow in one test: given events, when a command, then the events it produces, what
/// the projections show and which commands the process managers issue in reaction.
///
/// Everything goes through an [`InMemoryStore`] as in production: the command is executed by a
/// [`Repository`]; projections and process managers read the global log, filtered to the event
/// types they declare and decoded into their own event types. Process managers react to the given
/// events as the past (the commands they issue are dropped) and the command's events as the
/// events under test.
///
/// ```
/// use bank::{Account, AccountCommand, AccountEvent, Deposited, Opened, Withdrawn};
/// use factum::{BoxError, Envelope, Outbox, ProcessManager, Projection};
/// use factum_testkit::FlowFixture;
///
/// /// The balance of every account.
/// #[derive(Debug, Default)]
/// struct Balances(std::collections::BTreeMap<String, u64>);
///
/// impl Projection for Balances {
///     const NAME: &'static str = "balances";
///     type Event = AccountEvent;
///     fn apply(&mut self, e: &Envelope<AccountEvent>) -> Result<(), BoxError> {
///         let balance = self.0.entry(e.stream_id.aggregate_id().to_owned()).or_default();
///         match &e.event {
///             AccountEvent::Deposited(d) => *balance += d.amount,
///             AccountEvent::Withdrawn(w) => *balance -= w.amount,
///             _ => {}
///         }
///         Ok(())
///     }
/// }
///
/// /// Asks for a review of every withdrawal of 1000 cents or more.
/// #[derive(Default)]
/// struct LargeWithdrawals;
///
/// #[derive(Debug, PartialEq)]
/// struct Review { account: String, amount: u64 }
///
/// impl ProcessManager for LargeWithdrawals {
///     const NAME: &'static str = "large-withdrawals";
///     type Event = AccountEvent;
///     type Command = Review;
///     fn react(&mut self, e: &Envelope<AccountEvent>, outbox: &mut Outbox<Review>) -> Result<(), BoxError> {
///         if let AccountEvent::Withdrawn(w) = &e.event {
///             if w.amount >= 1000 {
///                 outbox.issue(Review { account: e.stream_id.aggregate_id().into(), amount: w.amount });
///             }
///         }
///         Ok(())
///     }
/// }
///
/// FlowFixture::<Account>::new()
///     .with_projection(Balances::default())
///     .with_process_manager(LargeWithdrawals)
///     .given([
///         AccountEvent::Opened(Opened { owner: "Ada".into() }),
///         AccountEvent::Deposited(Deposited { amount: 5000 }),
///     ])
///     .when(AccountCommand::Withdraw { account: "a1".into(), amount: 1200 })
///     .then_events([AccountEvent::Withdrawn(Withdrawn { amount: 1200 })])
///     .then_read_model(|balances: &Balances| assert_eq!(balances.0["a1"], 3800))
///     .then_commands::<LargeWithdrawals>([Review { account: "a1".into(), amount: 1200 }])
///     .then_correlation_flows();
/// ```
pub struct FlowFixture<A: Aggregate> {
    setup: Setup<A>,
}

impl<A: Aggregate> Default for FlowFixture<A> {
    fn default() -> Self {
        Self::new()
    }
}

impl<A: Aggregate> Debug for FlowFixture<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowFixture")
            .field("aggregate", &A::TYPE)
            .field(
                "readers",
                &self
                    .setup
                    .readers
                    .iter()
                    .map(|r| r.name())
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl<A: Aggregate> FlowFixture<A> {
    /// A fixture with no past events, no projection and no process manager.
    pub fn new() -> Self {
        Self {
            setup: Setup::default(),
        }
    }

    /// Adds a projection, in its starting state. It sees every event of the log it declares.
    #[must_use]
    pub fn with_projection<P: Projection>(mut self, projection: P) -> Self {
        self.setup.readers.push(Box::new(ProjectionReader {
            projection,
            filter: EventFilter::for_event::<P::Event>(),
        }));
        self
    }

    /// Adds a process manager, in its starting state.
    #[must_use]
    pub fn with_process_manager<M: ProcessManager>(mut self, manager: M) -> Self {
        self.setup.readers.push(Box::new(ManagerReader {
            manager,
            filter: EventFilter::for_event::<M::Event>(),
            issued: Vec::new(),
        }));
        self
    }

    /// Past events of the aggregate the command targets, oldest first. Calls add up.
    ///
    /// # Panics
    /// When an event cannot be encoded.
    #[must_use]
    #[track_caller]
    pub fn given(mut self, events: impl IntoIterator<Item = A::Event>) -> Self {
        self.setup.given(None, events);
        self
    }

    /// Past events of another stream (of any aggregate), oldest first, for the projections and
    /// process managers to see.
    ///
    /// # Panics
    /// When `stream` is not a valid stream id, or an event cannot be encoded.
    #[must_use]
    #[track_caller]
    pub fn given_stream<E: Event>(
        mut self,
        stream: &str,
        events: impl IntoIterator<Item = E>,
    ) -> Self {
        self.setup.given(Some(stream_id(stream)), events);
        self
    }

    /// Executes `command` in a new workflow, feeds the events to the projections and process
    /// managers, and returns what happened for checking.
    ///
    /// # Panics
    /// When the command cannot be executed for a reason other than a rejection by the aggregate,
    /// or a projection or process manager fails.
    #[track_caller]
    pub fn when(self, command: A::Command) -> Outcome<A> {
        self.setup.run(command, CommandContext::new())
    }

    /// Executes `command` within `context`; otherwise as [`when`](Self::when).
    ///
    /// # Panics
    /// As [`when`](Self::when).
    #[track_caller]
    pub fn when_with(self, command: A::Command, context: CommandContext) -> Outcome<A> {
        self.setup.run(command, context)
    }
}

struct Setup<A> {
    store: InMemoryStore,
    /// Batches to append before the command: to the command's stream (`None`) or another one.
    given: Vec<(Option<StreamId>, Vec<NewEvent>)>,
    readers: Vec<Box<dyn Reader>>,
    aggregate: PhantomData<fn() -> A>,
}

impl<A> Default for Setup<A> {
    fn default() -> Self {
        Self {
            store: InMemoryStore::new(),
            given: Vec::new(),
            readers: Vec::new(),
            aggregate: PhantomData,
        }
    }
}

impl<A: Aggregate> Setup<A> {
    #[track_caller]
    fn given<E: Event>(&mut self, stream: Option<StreamId>, events: impl IntoIterator<Item = E>) {
        let batch = events
            .into_iter()
            .map(
                |event| match NewEvent::encode(&event, EventMetadata::default()) {
                    Ok(encoded) => encoded,
                    Err(e) => panic!(
                        "the given event {:?} could not be encoded: {e}",
                        event.event_type()
                    ),
                },
            )
            .collect::<Vec<_>>();
        if !batch.is_empty() {
            self.given.push((stream, batch));
        }
    }

    #[track_caller]
    fn run(mut self, command: A::Command, context: CommandContext) -> Outcome<A> {
        let command_name = command.command_name();
        let aggregate_id = command.aggregate_id();
        let stream = match Repository::<A, InMemoryStore>::stream_id(&aggregate_id) {
            Ok(stream) => stream,
            Err(e) => panic!("`{command_name}` targets an invalid aggregate id: {e}"),
        };
        for (target, batch) in std::mem::take(&mut self.given) {
            let target = target.unwrap_or_else(|| stream.clone());
            if let Err(e) = block_on(
                self.store
                    .append(factum::AppendRequest::new(target.clone(), batch)),
            ) {
                panic!("the given events could not be appended to `{target}`: {e}");
            }
        }
        let before = self.store.head();
        for event in read_log(&self.store, LogPosition::START) {
            for reader in &mut self.readers {
                reader.feed(&event, false);
            }
        }

        let repository = Repository::<A, _>::new(self.store.clone());
        let (result, state, version) = match block_on(repository.execute_with(command, &context)) {
            Ok(committed) => (Ok(committed.events), committed.state, committed.version),
            Err(CommandError::Rejected(error)) => match block_on(repository.load(&aggregate_id)) {
                Ok(loaded) => (Err(error), loaded.state, loaded.version),
                Err(e) => panic!("`{stream}` could not be loaded after `{command_name}`: {e}"),
            },
            Err(e) => panic!("`{command_name}` on `{stream}` could not be executed: {e}"),
        };

        let mut recorded = Vec::new();
        for event in read_log(&self.store, before) {
            if event.stream_id == stream {
                match event.decode_all::<A::Event>() {
                    Ok(decoded) => recorded.extend(decoded),
                    Err(e) => panic!("an event `{command_name}` recorded does not decode: {e}"),
                }
            }
            for reader in &mut self.readers {
                reader.feed(&event, true);
            }
        }

        Outcome {
            command_name,
            stream,
            context,
            result,
            state,
            version,
            recorded,
            readers: self.readers,
            store: self.store,
        }
    }
}

/// The whole log after `after`, in order.
fn read_log(store: &InMemoryStore, mut after: LogPosition) -> Vec<RecordedEvent> {
    const PAGE: usize = 1000;
    let mut events = Vec::new();
    loop {
        let page = match block_on(store.read_all(after, PAGE, &EventFilter::all())) {
            Ok(page) => page,
            Err(e) => panic!("the in-memory log could not be read: {e}"),
        };
        let Some(last) = page.last() else {
            return events;
        };
        after = last.position;
        events.extend(page);
    }
}

/// A projection or a process manager, fed from the log.
trait Reader {
    fn name(&self) -> &'static str;
    /// Handles `event` if the reader declares its type. `under_test`: the event was produced by
    /// the command under test (otherwise it is a given, past event).
    fn feed(&mut self, event: &RecordedEvent, under_test: bool);
    fn as_any(&self) -> &dyn Any;
    /// The correlation ids of the commands issued in reaction to the command under test.
    fn issued_correlations(&self) -> Vec<(&'static str, CorrelationId)>;
}

struct ProjectionReader<P> {
    projection: P,
    filter: EventFilter,
}

impl<P: Projection> Reader for ProjectionReader<P> {
    fn name(&self) -> &'static str {
        P::NAME
    }

    fn feed(&mut self, event: &RecordedEvent, _under_test: bool) {
        if !self.filter.matches(event) {
            return;
        }
        for envelope in decode_for::<P::Event>("projection", P::NAME, event) {
            if let Err(e) = self.projection.apply(&envelope) {
                panic!(
                    "projection `{}` failed to apply event {:?} of `{}` at version {}: {e}",
                    P::NAME,
                    event.event_type,
                    event.stream_id,
                    event.stream_version
                );
            }
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn issued_correlations(&self) -> Vec<(&'static str, CorrelationId)> {
        Vec::new()
    }
}

struct ManagerReader<M: ProcessManager> {
    manager: M,
    filter: EventFilter,
    issued: Vec<IssuedCommand<M::Command>>,
}

impl<M: ProcessManager> Reader for ManagerReader<M> {
    fn name(&self) -> &'static str {
        M::NAME
    }

    fn feed(&mut self, event: &RecordedEvent, under_test: bool) {
        if !self.filter.matches(event) {
            return;
        }
        let envelope = match event.decode::<M::Event>() {
            Ok(envelope) => envelope,
            Err(e) => panic!(
                "process manager `{}` cannot decode an event it declares: {e}",
                M::NAME
            ),
        };
        let mut outbox = Outbox::for_event(&envelope);
        if let Err(e) = self.manager.react(&envelope, &mut outbox) {
            panic!(
                "process manager `{}` failed to react to event {:?} of `{}` at version {}: {e}",
                M::NAME,
                event.event_type,
                event.stream_id,
                event.stream_version
            );
        }
        if under_test {
            self.issued.extend(outbox.into_commands());
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn issued_correlations(&self) -> Vec<(&'static str, CorrelationId)> {
        self.issued
            .iter()
            .map(|c| (M::NAME, c.context.correlation_id))
            .collect()
    }
}

fn decode_for<E: Event>(role: &str, name: &str, event: &RecordedEvent) -> Decoded<Envelope<E>> {
    match event.decode_all::<E>() {
        Ok(envelope) => envelope,
        Err(e) => panic!("{role} `{name}` cannot decode an event it declares: {e}"),
    }
}

/// What a command did, with checks for it: returned by [`AggregateFixture::when`] and
/// [`FlowFixture::when`].
///
/// Every `then_*` check panics with a message describing the difference, and returns the
/// outcome for further checks.
pub struct Outcome<A: Aggregate> {
    command_name: &'static str,
    stream: StreamId,
    context: CommandContext,
    result: Result<Vec<A::Event>, A::Error>,
    state: A,
    version: StreamVersion,
    recorded: Vec<Envelope<A::Event>>,
    readers: Vec<Box<dyn Reader>>,
    store: InMemoryStore,
}

impl<A: Aggregate> Debug for Outcome<A>
where
    A: Debug,
    A::Event: Debug,
    A::Error: Debug,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outcome")
            .field("command", &self.command_name)
            .field("stream", &self.stream)
            .field("result", &self.result)
            .field("state", &self.state)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl<A: Aggregate> Outcome<A> {
    fn what(&self) -> String {
        format!("`{}` on `{}`", self.command_name, self.stream)
    }

    /// Checks that the command succeeded and produced exactly `expected`, in order.
    ///
    /// # Panics
    /// When the command was rejected, or produced other events: the message names the first
    /// differing event and shows both sides.
    #[track_caller]
    pub fn then_events(self, expected: impl IntoIterator<Item = A::Event>) -> Self
    where
        A::Event: PartialEq + Debug,
        A::Error: Debug,
    {
        let expected: Vec<A::Event> = expected.into_iter().collect();
        match &self.result {
            Ok(actual) => {
                if let Some(diff) = sequence_mismatch("event", &expected, actual) {
                    panic!(
                        "{} produced other events than expected: {diff}",
                        self.what()
                    );
                }
            }
            Err(error) => panic!(
                "{} was rejected, but {} expected\n  error:\n{}\n  ({error})\nexpected:\n{}",
                self.what(),
                if expected.is_empty() {
                    "success with no events was".to_owned()
                } else {
                    format!("{} event(s) were", expected.len())
                },
                pretty(error, 4),
                listing(&expected),
            ),
        }
        self
    }

    /// Checks that the command succeeded without producing any event.
    ///
    /// # Panics
    /// When it was rejected, or produced events.
    #[track_caller]
    pub fn then_no_events(self) -> Self
    where
        A::Event: PartialEq + Debug,
        A::Error: Debug,
    {
        self.then_events([])
    }

    /// Checks that the command was rejected with an error `predicate` accepts, typically
    /// `|e| matches!(e, MyError::Variant { .. })`.
    ///
    /// # Panics
    /// When the command succeeded, or `predicate` returns false.
    #[track_caller]
    pub fn then_error(self, predicate: impl FnOnce(&A::Error) -> bool) -> Self
    where
        A::Event: Debug,
        A::Error: Debug,
    {
        match &self.result {
            Ok(events) => self.panic_not_rejected(events),
            Err(error) if !predicate(error) => panic!(
                "{} was rejected, but not with the expected error\n  actual error:\n{}\n  ({error})",
                self.what(),
                pretty(error, 4)
            ),
            Err(_) => {}
        }
        self
    }

    /// Checks that the command was rejected with exactly `expected`.
    ///
    /// # Panics
    /// When the command succeeded, or was rejected with another error.
    #[track_caller]
    pub fn then_error_eq(self, expected: A::Error) -> Self
    where
        A::Event: Debug,
        A::Error: PartialEq + Debug,
    {
        match &self.result {
            Ok(events) => self.panic_not_rejected(events),
            Err(error) if *error != expected => panic!(
                "{} was rejected with another error than expected\n  expected:\n{}\n  actual:\n{}\n  ({error})",
                self.what(),
                pretty(&expected, 4),
                pretty(error, 4)
            ),
            Err(_) => {}
        }
        self
    }

    #[track_caller]
    fn panic_not_rejected(&self, events: &[A::Event]) -> !
    where
        A::Event: Debug,
    {
        panic!(
            "{} was expected to be rejected, but it succeeded with {} event(s):\n{}",
            self.what(),
            events.len(),
            listing(events)
        )
    }

    /// Runs `check` (usually assertions) on the aggregate's state after the command (after a
    /// rejection: the state the command was rejected in).
    pub fn then_state(self, check: impl FnOnce(&A)) -> Self {
        check(&self.state);
        self
    }

    /// Checks that the aggregate's state after the command equals `expected`.
    ///
    /// # Panics
    /// When it differs, showing both sides.
    #[track_caller]
    pub fn then_state_eq(self, expected: A) -> Self
    where
        A: PartialEq + Debug,
    {
        if self.state != expected {
            panic!(
                "after {}, the state differs from the expected one\n  expected:\n{}\n  actual:\n{}",
                self.what(),
                pretty(&expected, 4),
                pretty(&self.state, 4)
            );
        }
        self
    }

    /// Runs `check` on the events as the store recorded them: with their stream versions,
    /// positions, ids and metadata (correlation and causation ids from the command's context).
    pub fn then_recorded(self, check: impl FnOnce(&[Envelope<A::Event>])) -> Self {
        check(&self.recorded);
        self
    }

    /// Runs `check` (usually assertions) on the read model of the projection of type `P`; the
    /// type is usually inferred from the closure's argument: `|balances: &Balances| ...`.
    ///
    /// # Panics
    /// When no projection of type `P` was added ([`FlowFixture::with_projection`]).
    #[track_caller]
    pub fn then_read_model<P: Projection>(self, check: impl FnOnce(&P)) -> Self {
        check(self.read_model::<P>());
        self
    }

    /// Checks that the read model of the projection of type `P` equals `expected`.
    ///
    /// # Panics
    /// When it differs (showing both sides), or no projection of type `P` was added.
    #[track_caller]
    pub fn then_read_model_eq<P: Projection + PartialEq + Debug>(self, expected: P) -> Self {
        let actual = self.read_model::<P>();
        if *actual != expected {
            panic!(
                "after {}, projection `{}` differs from the expected read model\n  expected:\n{}\n  actual:\n{}",
                self.what(),
                P::NAME,
                pretty(&expected, 4),
                pretty(actual, 4)
            );
        }
        self
    }

    /// Checks that the read model of the projection of type `P` satisfies `predicate`.
    ///
    /// # Panics
    /// When it does not (showing the read model), or no projection of type `P` was added.
    #[track_caller]
    pub fn then_read_model_matches<P: Projection + Debug>(
        self,
        predicate: impl FnOnce(&P) -> bool,
    ) -> Self {
        let actual = self.read_model::<P>();
        if !predicate(actual) {
            panic!(
                "after {}, projection `{}` does not satisfy the predicate\n  actual:\n{}",
                self.what(),
                P::NAME,
                pretty(actual, 4)
            );
        }
        self
    }

    /// Checks that the process manager of type `M` issued exactly `expected`, in order, in
    /// reaction to the command's events: `.then_commands::<MyManager>([...])`.
    ///
    /// # Panics
    /// When the commands differ (naming the first differing command and showing both sides), or
    /// no process manager of type `M` was added ([`FlowFixture::with_process_manager`]).
    #[track_caller]
    pub fn then_commands<M>(self, expected: impl IntoIterator<Item = M::Command>) -> Self
    where
        M: ProcessManager,
        M::Command: PartialEq + Debug,
    {
        let expected: Vec<M::Command> = expected.into_iter().collect();
        let expected: Vec<&M::Command> = expected.iter().collect();
        let actual: Vec<&M::Command> = self.issued::<M>().iter().map(|c| &c.command).collect();
        if let Some(diff) = sequence_mismatch("command", &expected, &actual) {
            panic!(
                "after {}, process manager `{}` issued other commands than expected: {diff}",
                self.what(),
                M::NAME
            );
        }
        self
    }

    /// Checks that the process manager of type `M` issued no command in reaction to the
    /// command's events.
    ///
    /// # Panics
    /// When it issued some, or no process manager of type `M` was added.
    #[track_caller]
    pub fn then_no_commands<M>(self) -> Self
    where
        M: ProcessManager,
        M::Command: PartialEq + Debug,
    {
        self.then_commands::<M>([])
    }

    /// Runs `check` on the commands the process manager of type `M` issued in reaction to the
    /// command's events, with their contexts; the type is usually inferred from the closure's
    /// argument.
    ///
    /// # Panics
    /// When no process manager of type `M` was added.
    #[track_caller]
    pub fn then_issued<M: ProcessManager>(
        self,
        check: impl FnOnce(&[IssuedCommand<M::Command>]),
    ) -> Self {
        check(self.issued::<M>());
        self
    }

    /// Checks that the correlation id of the command's context flowed into every event it
    /// recorded and every command the process managers issued in reaction.
    ///
    /// # Panics
    /// Naming the first event or command with another correlation id.
    #[track_caller]
    pub fn then_correlation_flows(self) -> Self {
        let expected = self.context.correlation_id;
        for event in &self.recorded {
            let actual = event.metadata.correlation_id;
            assert!(
                actual == Some(expected),
                "after {}, event {:?} at version {} has correlation id {actual:?}, not the command's {expected:?}",
                self.what(),
                event.event.event_type(),
                event.stream_version,
            );
        }
        for reader in &self.readers {
            for (manager, actual) in reader.issued_correlations() {
                assert!(
                    actual == expected,
                    "after {}, process manager `{manager}` issued a command with correlation id {actual:?}, not the command's {expected:?}",
                    self.what(),
                );
            }
        }
        self
    }

    /// The events the command produced, or the error it was rejected with.
    pub fn result(&self) -> Result<&[A::Event], &A::Error> {
        self.result.as_deref()
    }

    /// The aggregate's state after the command.
    pub fn state(&self) -> &A {
        &self.state
    }

    /// The stream's version after the command.
    pub fn version(&self) -> StreamVersion {
        self.version
    }

    /// The command's stream.
    pub fn stream_id(&self) -> &StreamId {
        &self.stream
    }

    /// The context the command ran in.
    pub fn context(&self) -> &CommandContext {
        &self.context
    }

    /// The events the command recorded, as stored (see [`then_recorded`](Self::then_recorded)).
    pub fn recorded(&self) -> &[Envelope<A::Event>] {
        &self.recorded
    }

    /// The store the scenario ran on, with the given events and the command's.
    pub fn store(&self) -> &InMemoryStore {
        &self.store
    }

    /// The projection of type `P`.
    ///
    /// # Panics
    /// When no projection of type `P` was added.
    #[track_caller]
    pub fn read_model<P: Projection>(&self) -> &P {
        self.find::<ProjectionReader<P>>()
            .map(|r| &r.projection)
            .unwrap_or_else(|| {
                panic!(
                    "no projection `{}` in this fixture: add it with `FlowFixture::with_projection`",
                    P::NAME
                )
            })
    }

    /// The commands the process manager of type `M` issued in reaction to the command's events.
    ///
    /// # Panics
    /// When no process manager of type `M` was added.
    #[track_caller]
    pub fn issued<M: ProcessManager>(&self) -> &[IssuedCommand<M::Command>] {
        &self.manager_reader::<M>().issued
    }

    /// The process manager of type `M`, after the command's events.
    ///
    /// # Panics
    /// When no process manager of type `M` was added.
    #[track_caller]
    pub fn process_manager<M: ProcessManager>(&self) -> &M {
        &self.manager_reader::<M>().manager
    }

    #[track_caller]
    fn manager_reader<M: ProcessManager>(&self) -> &ManagerReader<M> {
        self.find::<ManagerReader<M>>().unwrap_or_else(|| {
            panic!(
                "no process manager `{}` in this fixture: add it with `FlowFixture::with_process_manager`",
                M::NAME
            )
        })
    }

    fn find<R: 'static>(&self) -> Option<&R> {
        self.readers
            .iter()
            .find_map(|reader| reader.as_any().downcast_ref::<R>())
    }
}
