//! The saga fixture: given past events, when an event, a rejection or the clock advancing, then
//! the changes recorded, the commands sent and the timeouts scheduled or cancelled.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::time::Duration;

use chrono::{DateTime, Utc};
use factum::saga::{
    Clock, Decisions, Fired, Input, Rejection, Saga, SentCommand, TestClock, TimeoutDecision,
};
use factum::{Aggregate, BoxError, CorrelationId, Envelope, Event};
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

use crate::envelope::{TestEnvelope, TestLog, envelope};
use crate::support::sequence_mismatch;

/// Where the fixture's clock starts: 2026-01-01T00:00:00Z.
pub const SAGA_FIXTURE_START: &str = "2026-01-01T00:00:00Z";

/// A pending timeout of the fixture.
#[derive(Clone, Debug)]
struct Pending {
    key: String,
    name: String,
    id: uuid::Uuid,
    due_at: DateTime<Utc>,
    payload: Box<RawValue>,
    correlation: CorrelationId,
}

/// What one `when` decided.
struct Run<S: Saga> {
    changes: Vec<S::Change>,
    sent: Vec<SentCommand>,
    timeouts: Vec<TimeoutDecision>,
}

impl<S: Saga> Default for Run<S> {
    fn default() -> Self {
        Self {
            changes: Vec::new(),
            sent: Vec::new(),
            timeouts: Vec::new(),
        }
    }
}

/// Runs a [`Saga`]'s reactions with a [`TestClock`] and checks what it decides: the changes it
/// records, the commands it sends (typed by their target aggregate, with their ids and
/// correlation) and the timeouts it schedules or cancels. Time passes only when told to
/// ([`when_time_passes`](Self::when_time_passes)), which fires the timeouts that fall due, in
/// order.
///
/// `given` inputs are the past (their decisions stand: state, pending timeouts, sent commands),
/// `when` inputs are under test: the `then_*` checks look at what the latest run of `when`
/// inputs decided.
///
/// ```
/// use std::time::Duration;
/// use checkout::{Checkout, CheckoutChange, CheckoutInput, Order, OrderCommand, Stock, StockCommand, PAYMENT_TIMEOUT};
/// use factum_testkit::SagaFixture;
///
/// let details = checkout::OrderDetails {
///     order: "o-1".into(), sku: "lamp".into(), qty: 2, amount: 30,
///     wallet: "ada".into(), address: "street".into(),
/// };
/// SagaFixture::<Checkout>::new()
///     .given_events("order-o-1", [CheckoutInput::Placed(details.clone())])
///     .given_events("stock-lamp", [CheckoutInput::Reserved { order: "o-1".into() }])
///     .when_time_passes(PAYMENT_TIMEOUT + Duration::from_secs(1))
///     .then_changes([CheckoutChange::TimedOut])
///     .then_sent::<Stock>([StockCommand::Release { sku: "lamp".into(), order: "o-1".into() }])
///     .then_sent::<Order>([OrderCommand::Cancel { order: "o-1".into(), reason: "no payment in time".into() }]);
/// ```
pub struct SagaFixture<S: Saga> {
    clock: TestClock,
    log: TestLog,
    instances: BTreeMap<String, S>,
    pending: Vec<Pending>,
    sent: Vec<(String, SentCommand)>,
    run: Run<S>,
    in_when: bool,
    checked: bool,
}

impl<S: Saga> Debug for SagaFixture<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SagaFixture")
            .field("saga", &S::NAME)
            .field("now", &self.clock.now())
            .field("instances", &self.instances.keys().collect::<Vec<_>>())
            .field("pending_timeouts", &self.pending)
            .finish_non_exhaustive()
    }
}

impl<S: Saga> Default for SagaFixture<S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S: Saga> SagaFixture<S> {
    /// A fixture with no instance yet and its clock at [`SAGA_FIXTURE_START`].
    pub fn new() -> Self {
        Self {
            clock: TestClock::new(SAGA_FIXTURE_START.parse().expect("a valid time")),
            log: TestLog::default(),
            instances: BTreeMap::new(),
            pending: Vec::new(),
            sent: Vec::new(),
            run: Run::default(),
            in_when: false,
            checked: false,
        }
    }

    /// The fixture's clock (what [`Decisions::now`] says).
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// Reacts to a past event.
    ///
    /// # Panics
    /// When the saga fails to react.
    #[must_use]
    #[track_caller]
    pub fn given(mut self, event: impl Into<TestEnvelope<S::Event>>) -> Self {
        self.in_when = false;
        let envelope = self.log.place(event.into());
        self.on_event(&envelope);
        self.run = Run::default();
        self
    }

    /// Reacts to past events appended one after another to `stream`.
    ///
    /// # Panics
    /// When `stream` is not a valid stream id, or the saga fails to react.
    #[must_use]
    #[track_caller]
    pub fn given_events(
        mut self,
        stream: &str,
        events: impl IntoIterator<Item = S::Event>,
    ) -> Self {
        for event in events {
            self = self.given(envelope(stream, event));
        }
        self
    }

    fn start_when(&mut self) {
        if !self.in_when {
            self.run = Run::default();
            self.in_when = true;
            self.checked = false;
        }
    }

    /// Reacts to an event under test.
    ///
    /// # Panics
    /// When the saga fails to react.
    #[must_use]
    #[track_caller]
    pub fn when(mut self, event: impl Into<TestEnvelope<S::Event>>) -> Self {
        self.start_when();
        let envelope = self.log.place(event.into());
        self.on_event(&envelope);
        self
    }

    /// Reacts to events under test appended one after another to `stream`.
    ///
    /// # Panics
    /// When `stream` is not a valid stream id, or the saga fails to react.
    #[must_use]
    #[track_caller]
    pub fn when_events(mut self, stream: &str, events: impl IntoIterator<Item = S::Event>) -> Self {
        for event in events {
            self = self.when(envelope(stream, event));
        }
        self
    }

    /// The target rejected `command` (one the saga sent earlier) with `error`: the saga reacts to
    /// the typed rejection.
    ///
    /// # Panics
    /// When the saga never sent `command` to `A`, or fails to react.
    #[must_use]
    #[track_caller]
    pub fn when_rejected<A: Aggregate>(mut self, command: A::Command, error: A::Error) -> Self
    where
        A::Command: PartialEq + Debug + DeserializeOwned,
    {
        self.start_when();
        let found = self
            .sent
            .iter()
            .rev()
            .find(|(_, sent)| sent.command::<A>().as_ref() == Some(&command))
            .cloned();
        let Some((key, sent)) = found else {
            panic!(
                "saga `{}` never sent {command:?} to `{}`, so it cannot be rejected",
                S::NAME,
                A::TYPE
            );
        };
        let command_id = sent.context.command_id;
        let correlation = sent.context.correlation_id;
        let rejection = Rejection::new(sent, Box::new(error) as BoxError);
        let trigger = factum::saga::rejection_trigger(command_id);
        self.react(&key, trigger, correlation, Input::Rejected(&rejection));
        self
    }

    /// Moves the clock forward by `by`, firing every timeout that falls due, earliest first (a
    /// timeout scheduled by a reaction fires too if it falls due within `by`).
    ///
    /// # Panics
    /// When the saga fails to react, or a timeout's payload does not decode.
    #[must_use]
    #[track_caller]
    pub fn when_time_passes(mut self, by: Duration) -> Self {
        self.start_when();
        let until = self.clock.now() + chrono::Duration::from_std(by).expect("a duration in range");
        loop {
            self.pending.sort_by_key(|p| p.due_at);
            let Some(next) = self.pending.first().filter(|p| p.due_at <= until).cloned() else {
                break;
            };
            self.pending.remove(0);
            self.clock.set(next.due_at.max(self.clock.now()));
            let timeout: S::Timeout = serde_json::from_str(next.payload.get())
                .unwrap_or_else(|e| panic!("timeout {:?} does not decode: {e}", next.name));
            let fired = Fired::new(next.name.clone(), next.id, next.due_at, timeout);
            self.react(&next.key, next.id, next.correlation, Input::Timeout(&fired));
        }
        self.clock.set(until);
        self
    }

    #[track_caller]
    fn on_event(&mut self, envelope: &Envelope<S::Event>) {
        let Some(key) = S::instance(envelope) else {
            return;
        };
        let correlation = envelope
            .metadata
            .correlation_id
            .unwrap_or_else(|| CorrelationId::from_uuid(envelope.event_id.as_uuid()));
        self.react(
            &key,
            envelope.event_id.as_uuid(),
            correlation,
            Input::Event(envelope),
        );
    }

    #[track_caller]
    fn react(
        &mut self,
        key: &str,
        trigger: uuid::Uuid,
        correlation: CorrelationId,
        input: Input<'_, S>,
    ) {
        let described = match &input {
            Input::Event(e) => format!(
                "event {:?} in stream {} at version {}",
                e.event.event_type(),
                e.stream_id,
                e.stream_version
            ),
            Input::Rejected(r) => format!("the rejection of {}", r.sent().command_name),
            Input::Timeout(t) => format!("timeout {:?}", t.name),
        };
        let state = self.instances.entry(key.to_owned()).or_default();
        let mut decisions = Decisions::<S>::new(key, self.clock.now(), trigger, correlation);
        if let Err(error) = state.react(input, &mut decisions) {
            panic!(
                "saga `{}` instance {key:?} failed to react to {described}: {error}",
                S::NAME
            );
        }
        let (changes, sent, timeouts) = decisions.into_parts();
        for change in &changes {
            state.evolve(change);
        }
        for timeout in &timeouts {
            self.pending
                .retain(|p| !(p.key == key && p.name == timeout.name()));
            if let TimeoutDecision::Schedule {
                name,
                id,
                due_at,
                payload,
            } = timeout
            {
                self.pending.push(Pending {
                    key: key.to_owned(),
                    name: name.clone(),
                    id: *id,
                    due_at: *due_at,
                    payload: payload.clone(),
                    correlation,
                });
            }
        }
        self.sent
            .extend(sent.iter().map(|s| (key.to_owned(), s.clone())));
        self.run.changes.extend(changes);
        self.run.sent.extend(sent);
        self.run.timeouts.extend(timeouts);
    }

    #[track_caller]
    fn checked(&mut self) -> &Run<S> {
        assert!(
            self.in_when || self.checked,
            "saga `{}`: nothing under test; give it with `.when(...)`, `.when_rejected(...)` or `.when_time_passes(...)`",
            S::NAME
        );
        self.in_when = false;
        self.checked = true;
        &self.run
    }

    /// Checks that the `when` inputs recorded exactly `expected`, in order.
    ///
    /// # Panics
    /// When they differ, or nothing was under test.
    #[track_caller]
    pub fn then_changes(mut self, expected: impl IntoIterator<Item = S::Change>) -> Self
    where
        S::Change: PartialEq + Debug,
    {
        let expected: Vec<S::Change> = expected.into_iter().collect();
        let actual: Vec<&S::Change> = self.checked().changes.iter().collect();
        let expected: Vec<&S::Change> = expected.iter().collect();
        if let Some(diff) = sequence_mismatch("change", &expected, &actual) {
            panic!(
                "saga `{}` recorded other changes than expected: {diff}",
                S::NAME
            );
        }
        self
    }

    /// Checks that the commands the `when` inputs sent **to `A`** are exactly `expected`, in
    /// order (commands to other aggregates are checked by their own `then_sent`).
    ///
    /// # Panics
    /// When they differ, or nothing was under test.
    #[track_caller]
    pub fn then_sent<A: Aggregate>(mut self, expected: impl IntoIterator<Item = A::Command>) -> Self
    where
        A::Command: PartialEq + Debug + DeserializeOwned,
    {
        let expected: Vec<A::Command> = expected.into_iter().collect();
        let actual: Vec<A::Command> = self
            .checked()
            .sent
            .iter()
            .filter_map(SentCommand::command::<A>)
            .collect();
        let (expected, actual): (Vec<&A::Command>, Vec<&A::Command>) =
            (expected.iter().collect(), actual.iter().collect());
        if let Some(diff) = sequence_mismatch("command", &expected, &actual) {
            panic!(
                "saga `{}` sent other commands to `{}` than expected: {diff}",
                S::NAME,
                A::TYPE
            );
        }
        self
    }

    /// Checks that the `when` inputs sent no command.
    ///
    /// # Panics
    /// When they sent some, or nothing was under test.
    #[track_caller]
    pub fn then_nothing_sent(mut self) -> Self {
        let sent = &self.checked().sent;
        assert!(
            sent.is_empty(),
            "saga `{}` sent commands, none expected: {sent:#?}",
            S::NAME
        );
        self
    }

    /// Runs `check` on the commands the `when` inputs sent, with their contexts (ids,
    /// correlation and causation).
    ///
    /// # Panics
    /// When nothing was under test.
    #[track_caller]
    pub fn then_issued(mut self, check: impl FnOnce(&[SentCommand])) -> Self {
        check(&self.checked().sent);
        self
    }

    /// Checks that the `when` inputs scheduled timeout `name` to fire `after` from now.
    ///
    /// # Panics
    /// When they did not, or nothing was under test.
    #[track_caller]
    pub fn then_scheduled(mut self, name: &str, after: Duration) -> Self {
        let due =
            self.clock.now() + chrono::Duration::from_std(after).expect("a duration in range");
        let timeouts = &self.checked().timeouts;
        let found = timeouts.iter().any(|t| {
            matches!(t, TimeoutDecision::Schedule { name: n, due_at, .. } if n == name && *due_at == due)
        });
        assert!(
            found,
            "saga `{}` did not schedule timeout {name:?} at {due}; its timeout decisions: {timeouts:#?}",
            S::NAME
        );
        self
    }

    /// Checks that the `when` inputs cancelled timeout `name`.
    ///
    /// # Panics
    /// When they did not, or nothing was under test.
    #[track_caller]
    pub fn then_cancelled(mut self, name: &str) -> Self {
        let timeouts = &self.checked().timeouts;
        let found = timeouts
            .iter()
            .any(|t| matches!(t, TimeoutDecision::Cancel { name: n } if n == name));
        assert!(
            found,
            "saga `{}` did not cancel timeout {name:?}; its timeout decisions: {timeouts:#?}",
            S::NAME
        );
        self
    }

    /// Runs `check` on the state of instance `key`.
    ///
    /// # Panics
    /// When there is no such instance.
    #[track_caller]
    pub fn then_state(self, key: &str, check: impl FnOnce(&S)) -> Self {
        let Some(state) = self.instances.get(key) else {
            panic!("saga `{}` has no instance {key:?}", S::NAME);
        };
        check(state);
        self
    }

    /// The names and due times of the pending timeouts of instance `key`.
    pub fn pending_timeouts(&self, key: &str) -> Vec<(String, DateTime<Utc>)> {
        self.pending
            .iter()
            .filter(|p| p.key == key)
            .map(|p| (p.name.clone(), p.due_at))
            .collect()
    }
}
