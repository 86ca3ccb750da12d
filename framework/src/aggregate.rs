//! Aggregates and commands: the write side of the domain.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::event::Event;

/// A consistency boundary: state rebuilt from its own stream of events, deciding which events a
/// command produces.
///
/// * [`decide`](Aggregate::decide) is pure and synchronous: it looks at the current state and the
///   command and returns the events to store, or a domain error (then nothing is stored). When a
///   command needs data from elsewhere (a price, an exchange rate), resolve it *before* executing
///   the command and carry it in the command, so aggregates stay deterministic and testable.
/// * [`evolve`](Aggregate::evolve) applies one event to the state. It must not fail: the event has
///   already happened.
///
/// The state starts at [`Default::default`].
///
/// `#[derive(Aggregate)]` writes this impl from `#[aggregate(type = "...", command = ..., event =
/// ..., error = ...)]` and inherent `decide` and `evolve` methods with the same signatures (see
/// the derive's documentation).
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a factum aggregate",
    label = "this type does not implement `factum::Aggregate`",
    note = "implement `factum::Aggregate` for `{Self}` or add `#[derive(factum::Aggregate)]`"
)]
pub trait Aggregate: Default + Send + Sync + 'static {
    /// The aggregate type: the category of its streams (`"account"` → streams `"account-{id}"`).
    /// Must not contain `-`.
    const TYPE: &'static str;

    /// The commands this aggregate handles.
    type Command: Command;
    /// The events it produces and is rebuilt from.
    type Event: Event;
    /// Why a command is rejected.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Decides what a command does: the events to record, or a rejection.
    fn decide(&self, command: &Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// Applies one recorded event to the state.
    fn evolve(&mut self, event: &Self::Event);
}

/// A request to change one aggregate.
///
/// It names itself for tracing and errors, and says which aggregate instance it targets; the
/// executor turns that id into the stream `"{Aggregate::TYPE}-{id}"`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a factum command",
    label = "this type does not implement `factum::Command`",
    note = "add `#[derive(factum::Command)]` to `{Self}` and mark the aggregate id field with `#[command(id)]`"
)]
pub trait Command: Send + Sync {
    /// A short name for traces and errors, e.g. `"Deposit"`.
    fn command_name(&self) -> &'static str;

    /// The id of the aggregate instance this command targets (without the category).
    fn aggregate_id(&self) -> String;
}

/// An aggregate whose state can be stored as a snapshot.
///
/// Opt-in: aggregates need not be `Serialize`. Bump [`SNAPSHOT_VERSION`](Self::SNAPSHOT_VERSION)
/// whenever the state's shape or the meaning of its fields changes; snapshots taken with another
/// version are ignored and the state is rebuilt from events.
pub trait Snapshot: Aggregate + Serialize + DeserializeOwned {
    /// The schema version of the serialised state.
    const SNAPSHOT_VERSION: u32;
}
