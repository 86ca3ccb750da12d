//! The process-manager fixture: given past events, when new events, then the commands issued.

use std::fmt::Debug;

use factum::{Envelope, IssuedCommand, Outbox, ProcessManager};

use crate::envelope::{TestEnvelope, TestLog, envelope};
use crate::support::sequence_mismatch;

/// Feeds events to a [`ProcessManager`] and checks the commands it issues.
///
/// `given` events are the past: they bring the process manager to its state, and the commands
/// they issue are dropped. `when` events are the ones under test: the `then_*` checks look at
/// the commands issued by the latest run of `when` events (a `when` after a check starts a new
/// run).
///
/// ```
/// use factum::{BoxError, Envelope, Outbox, ProcessManager};
/// use factum_testkit::ProcessManagerFixture;
/// # use factum::{DecodeError, EncodeError, Event, RawValue};
/// # #[derive(Debug)]
/// # struct Withdrawn(u64);
/// # impl Event for Withdrawn {
/// #     fn event_type(&self) -> &'static str { "account.withdrawn" }
/// #     fn schema_version(&self) -> u32 { 1 }
/// #     fn event_types() -> &'static [&'static str] { &["account.withdrawn"] }
/// #     fn encode(&self) -> Result<Box<RawValue>, EncodeError> { factum::encode_json(&self.0) }
/// #     fn decode(stored: &factum::Stored<'_>) -> Result<Self, DecodeError> { let (_, _, p) = (stored.event_type, stored.schema_version, stored.payload);
/// #         factum::decode_json(p).map(Withdrawn)
/// #     }
/// # }
///
/// #[derive(Debug, PartialEq)]
/// enum Alert { Review { account: String } }
///
/// /// Asks for a review of every third withdrawal of an account.
/// #[derive(Default)]
/// struct Reviews { seen: u32 }
///
/// impl ProcessManager for Reviews {
///     const NAME: &'static str = "reviews";
///     type Event = Withdrawn;
///     type Command = Alert;
///     fn react(&mut self, event: &Envelope<Withdrawn>, outbox: &mut Outbox<Alert>) -> Result<(), BoxError> {
///         self.seen += 1;
///         if self.seen % 3 == 0 {
///             outbox.issue(Alert::Review { account: event.stream_id.aggregate_id().to_owned() });
///         }
///         Ok(())
///     }
/// }
///
/// ProcessManagerFixture::new(Reviews::default())
///     .given_events("account-a1", [Withdrawn(5), Withdrawn(7)])
///     .when_events("account-a1", [Withdrawn(1)])
///     .then_commands([Alert::Review { account: "a1".into() }])
///     .when_events("account-a1", [Withdrawn(2)])
///     .then_no_commands();
/// ```
pub struct ProcessManagerFixture<M: ProcessManager> {
    manager: M,
    log: TestLog,
    issued: Vec<IssuedCommand<M::Command>>,
    phase: Phase,
}

/// Where the fixture is in given → when → then.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Given,
    When,
    Then,
}

impl<M: ProcessManager> std::fmt::Debug for ProcessManagerFixture<M>
where
    M::Command: Debug,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessManagerFixture")
            .field("manager", &M::NAME)
            .field("issued", &self.issued)
            .finish_non_exhaustive()
    }
}

impl<M: ProcessManager> ProcessManagerFixture<M> {
    /// A fixture around `manager` in its starting state.
    pub fn new(manager: M) -> Self {
        Self {
            manager,
            log: TestLog::default(),
            issued: Vec::new(),
            phase: Phase::Given,
        }
    }

    /// Handles a past event; the commands it issues are dropped.
    ///
    /// # Panics
    /// When the process manager returns an error.
    #[must_use]
    #[track_caller]
    pub fn given(mut self, event: impl Into<TestEnvelope<M::Event>>) -> Self {
        let envelope = self.log.place(event.into());
        self.react(&envelope);
        self.issued.clear();
        self.phase = Phase::Given;
        self
    }

    /// Handles past events appended one after another to `stream`.
    ///
    /// # Panics
    /// When `stream` is not a valid stream id, or the process manager returns an error.
    #[must_use]
    #[track_caller]
    pub fn given_events(
        mut self,
        stream: &str,
        events: impl IntoIterator<Item = M::Event>,
    ) -> Self {
        for event in events {
            self = self.given(envelope(stream, event));
        }
        self
    }

    /// Handles an event under test; the `then_*` checks look at the commands it issues. After a
    /// check, the next `when` starts a new run.
    ///
    /// # Panics
    /// When the process manager returns an error.
    #[must_use]
    #[track_caller]
    pub fn when(mut self, event: impl Into<TestEnvelope<M::Event>>) -> Self {
        if self.phase != Phase::When {
            self.issued.clear();
            self.phase = Phase::When;
        }
        let envelope = self.log.place(event.into());
        let issued = self.react(&envelope);
        self.issued.extend(issued);
        self
    }

    /// Handles events under test appended one after another to `stream`.
    ///
    /// # Panics
    /// When `stream` is not a valid stream id, or the process manager returns an error.
    #[must_use]
    #[track_caller]
    pub fn when_events(mut self, stream: &str, events: impl IntoIterator<Item = M::Event>) -> Self {
        for event in events {
            self = self.when(envelope(stream, event));
        }
        self
    }

    #[track_caller]
    fn react(&mut self, envelope: &Envelope<M::Event>) -> Vec<IssuedCommand<M::Command>> {
        let mut outbox = Outbox::for_event(envelope);
        if let Err(error) = self.manager.react(envelope, &mut outbox) {
            panic!(
                "process manager `{}` failed to react to the event in stream {} at version {} ({:?}): {error}",
                M::NAME,
                envelope.stream_id,
                envelope.stream_version,
                factum::Event::event_type(&envelope.event),
            );
        }
        outbox.into_commands()
    }

    #[track_caller]
    fn checked(&mut self) -> &[IssuedCommand<M::Command>] {
        assert!(
            self.phase != Phase::Given,
            "process manager `{}`: no event under test; give it with `.when(...)` or \
             `.when_events(...)` (`given` events are the past, and the commands they issue are dropped)",
            M::NAME
        );
        self.phase = Phase::Then;
        &self.issued
    }

    /// Checks that the `when` events issued exactly `expected`, in order.
    ///
    /// # Panics
    /// When they differ (naming the first differing command and showing both sides), or when no
    /// `when` event was given.
    #[track_caller]
    pub fn then_commands(mut self, expected: impl IntoIterator<Item = M::Command>) -> Self
    where
        M::Command: PartialEq + Debug,
    {
        let expected: Vec<M::Command> = expected.into_iter().collect();
        let actual: Vec<&M::Command> = self.checked().iter().map(|c| &c.command).collect();
        let expected: Vec<&M::Command> = expected.iter().collect();
        if let Some(diff) = sequence_mismatch("command", &expected, &actual) {
            panic!(
                "process manager `{}` issued other commands than expected: {diff}",
                M::NAME
            );
        }
        self
    }

    /// Checks that the `when` events issued no command.
    ///
    /// # Panics
    /// When they issued some, or when no `when` event was given.
    #[track_caller]
    pub fn then_no_commands(self) -> Self
    where
        M::Command: PartialEq + Debug,
    {
        self.then_commands([])
    }

    /// Runs `check` (usually assertions) on the commands the `when` events issued, with their
    /// contexts (correlation and causation ids, metadata).
    ///
    /// # Panics
    /// When no `when` event was given.
    #[track_caller]
    pub fn then_issued(mut self, check: impl FnOnce(&[IssuedCommand<M::Command>])) -> Self {
        check(self.checked());
        self
    }

    /// Runs `check` (usually assertions) on the process manager's state.
    pub fn then_state(self, check: impl FnOnce(&M)) -> Self {
        check(&self.manager);
        self
    }

    /// The process manager.
    pub fn manager(&self) -> &M {
        &self.manager
    }
}
