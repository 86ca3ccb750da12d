//! Process managers: react to events by issuing commands.
//!
//! A [`ProcessManager`] coordinates a workflow that spans aggregates (or services): it reacts to
//! events, keeps whatever state it needs to remember where the workflow stands, and issues
//! commands into an [`Outbox`]. The outbox stamps every command with a [`CommandContext`] built by
//! [`CommandContext::caused_by`] from the event it reacts to, so the correlation id of the
//! workflow flows from the first command, through every event, into the commands issued here and
//! on into the events they produce.
//!
//! Reacting is synchronous and side-effect free: the process manager only *says* which commands
//! to send. Whoever drives it (a subscription, a saga runtime, a test fixture) decides when and how
//! they are executed, retried or compensated.

use crate::error::BoxError;
use crate::event::{Envelope, Event};
use crate::ids::CommandId;
use crate::repository::CommandContext;

/// Reacts to events by issuing commands, keeping its own state between events.
///
/// ```
/// use factum::{BoxError, Envelope, Outbox, ProcessManager};
/// # use factum::{Command, DecodeError, EncodeError, Event, RawValue};
/// # #[derive(Debug)]
/// # enum OrderEvent { Placed { order: String, total: u64 } }
/// # impl Event for OrderEvent {
/// #     fn event_type(&self) -> &'static str { "order.placed" }
/// #     fn schema_version(&self) -> u32 { 1 }
/// #     fn event_types() -> &'static [&'static str] { &["order.placed"] }
/// #     fn encode(&self) -> Result<Box<RawValue>, EncodeError> { unimplemented!() }
/// #     fn decode(stored: &factum::Stored<'_>) -> Result<Self, DecodeError> { let (t, v, _) = (stored.event_type, stored.schema_version, stored.payload);
/// #         Err(DecodeError::unknown(t, v))
/// #     }
/// # }
/// # #[derive(Debug, PartialEq)]
/// # enum PaymentCommand { Charge { order: String, amount: u64 } }
/// # impl Command for PaymentCommand {
/// #     fn command_name(&self) -> &'static str { "Charge" }
/// #     fn aggregate_id(&self) -> String { match self { Self::Charge { order, .. } => order.clone() } }
/// # }
///
/// /// Charges every order once it is placed.
/// #[derive(Default)]
/// struct Checkout {
///     charged: u64,
/// }
///
/// impl ProcessManager for Checkout {
///     const NAME: &'static str = "checkout";
///     type Event = OrderEvent;
///     type Command = PaymentCommand;
///
///     fn react(
///         &mut self,
///         event: &Envelope<OrderEvent>,
///         outbox: &mut Outbox<PaymentCommand>,
///     ) -> Result<(), BoxError> {
///         match &event.event {
///             OrderEvent::Placed { order, total } => {
///                 self.charged += total;
///                 outbox.issue(PaymentCommand::Charge { order: order.clone(), amount: *total });
///             }
///         }
///         Ok(())
///     }
/// }
///
/// let placed = Envelope::new(
///     "order-7".parse().unwrap(),
///     factum::StreamVersion::new(1),
///     OrderEvent::Placed { order: "7".into(), total: 30 },
/// );
/// let mut checkout = Checkout::default();
/// let mut outbox = Outbox::for_event(&placed);
/// checkout.react(&placed, &mut outbox).unwrap();
///
/// let [charge] = &outbox.into_commands()[..] else { panic!("one command expected") };
/// assert_eq!(charge.command, PaymentCommand::Charge { order: "7".into(), amount: 30 });
/// // The command is caused by the event, in the event's workflow.
/// assert_eq!(charge.context.causation_id, Some(placed.event_id.into()));
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a factum process manager",
    label = "this type does not implement `factum::ProcessManager`",
    note = "implement `factum::ProcessManager` for `{Self}`: name it, declare its `Event` and `Command` types, and write `react`"
)]
pub trait ProcessManager: Send + 'static {
    /// A stable name: the key of the process manager's checkpoint and stored state.
    const NAME: &'static str;
    /// The events it reacts to: usually an enum deriving [`Event`] whose variants are exactly
    /// those events (they may come from several aggregates).
    type Event: Event;
    /// The commands it issues.
    type Command: Send + 'static;

    /// Reacts to one event: updates the process manager's state and issues commands into
    /// `outbox`.
    ///
    /// An error stops the subscription feeding it (or parks the event in the dead-letter queue
    /// when the subscription is configured to); commands issued before the error are discarded.
    fn react(
        &mut self,
        event: &Envelope<Self::Event>,
        outbox: &mut Outbox<Self::Command>,
    ) -> Result<(), BoxError>;
}

/// A command issued by a process manager, with the context to execute it in.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct IssuedCommand<C> {
    /// The command.
    pub command: C,
    /// Its id, correlation id (that of the event that caused it), causation id (that event's
    /// id) and metadata. Pass it to [`Repository::execute_with`](crate::Repository::execute_with).
    pub context: CommandContext,
}

impl<C> IssuedCommand<C> {
    /// Adds a metadata entry copied onto every event the command produces.
    pub fn with_metadata<T: serde::Serialize + ?Sized>(
        &mut self,
        key: impl Into<String>,
        value: &T,
    ) -> Result<&mut Self, serde_json::Error> {
        self.context.metadata.insert(key, value)?;
        Ok(self)
    }
}

/// Collects the commands a process manager issues while reacting to one event.
///
/// Every command gets the correlation and causation of the event the outbox was created for, and
/// a [`CommandId`] derived from that event's id and the command's index
/// ([`CommandContext::caused_by_nth`]), used as its idempotency key too: reacting to the same
/// event again (a replay, a redelivery) issues the same commands with the same ids, and executing
/// them again stores nothing twice.
#[derive(Debug)]
pub struct Outbox<C> {
    cause: CommandContext,
    event_id: crate::EventId,
    commands: Vec<IssuedCommand<C>>,
}

impl<C> Outbox<C> {
    /// An empty outbox for the commands issued in reaction to `event`.
    pub fn for_event<E>(event: &Envelope<E>) -> Self {
        Self {
            cause: CommandContext::caused_by(event),
            event_id: event.event_id,
            commands: Vec::new(),
        }
    }

    /// Issues a command caused by the event being reacted to. The returned reference allows adding
    /// metadata to it.
    pub fn issue(&mut self, command: C) -> &mut IssuedCommand<C> {
        let index = u32::try_from(self.commands.len()).unwrap_or(u32::MAX);
        let context = self
            .cause
            .clone()
            .with_command_id(CommandId::derived(self.event_id, index))
            .idempotent();
        self.commands.push(IssuedCommand { command, context });
        let last = self.commands.len() - 1;
        &mut self.commands[last]
    }

    /// The commands issued so far, in order.
    pub fn commands(&self) -> &[IssuedCommand<C>] {
        &self.commands
    }

    /// The number of commands issued so far.
    pub fn len(&self) -> usize {
        self.commands.len()
    }

    /// True when no command was issued.
    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    /// The issued commands, in order.
    pub fn into_commands(self) -> Vec<IssuedCommand<C>> {
        self.commands
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{CorrelationId, StreamVersion};

    #[test]
    fn issued_commands_carry_the_events_correlation_and_causation() {
        let mut event = Envelope::new(
            "order-1".parse().expect("valid stream id"),
            StreamVersion::new(3),
            (),
        );
        let workflow = CorrelationId::new();
        event.metadata.correlation_id = Some(workflow);

        let mut outbox = Outbox::for_event(&event);
        outbox.issue("first");
        outbox
            .issue("second")
            .with_metadata("tenant", "acme")
            .expect("a string serialises");

        let issued = outbox.into_commands();
        assert_eq!(issued.len(), 2);
        for command in &issued {
            assert_eq!(command.context.correlation_id, workflow);
            assert_eq!(command.context.causation_id, Some(event.event_id.into()));
        }
        assert_ne!(issued[0].context.command_id, issued[1].context.command_id);
        assert!(issued[0].context.metadata.is_empty());
        assert_eq!(
            issued[1]
                .context
                .metadata
                .get::<String>("tenant")
                .expect("decodes")
                .as_deref(),
            Some("acme")
        );
    }

    #[test]
    fn reacting_to_the_same_event_again_issues_the_same_command_ids() {
        let event = Envelope::new(
            "order-1".parse().expect("valid stream id"),
            StreamVersion::new(1),
            (),
        );
        let issue_two = || {
            let mut outbox = Outbox::for_event(&event);
            outbox.issue("reserve");
            outbox.issue("charge");
            outbox.into_commands()
        };
        let (first, replay) = (issue_two(), issue_two());
        for (a, b) in first.iter().zip(&replay) {
            assert_eq!(a.context.command_id, b.context.command_id);
            assert_eq!(a.context.idempotency_key, b.context.idempotency_key);
            assert!(a.context.idempotency_key.is_some());
        }
        assert_eq!(
            first[1].context.command_id,
            CommandId::derived(event.event_id, 1)
        );
    }

    #[test]
    fn an_event_without_correlation_starts_its_own_workflow() {
        let event = Envelope::new(
            "order-1".parse().expect("valid stream id"),
            StreamVersion::new(1),
            (),
        );
        let mut outbox = Outbox::for_event(&event);
        let issued = outbox.issue(());
        assert_eq!(
            issued.context.correlation_id.as_uuid(),
            event.event_id.as_uuid()
        );
    }
}
