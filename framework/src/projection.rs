//! Projections: read models fed by events.

use crate::error::BoxError;
use crate::event::{Envelope, Event};

/// A read model fed by events from the global log.
///
/// `Event` is the set of events the projection handles: usually an enum deriving
/// [`Event`] whose variants are exactly those events (they may come from several aggregates).
/// Subscriptions fetch only those wire names from the store ([`crate::EventFilter::for_event`]).
///
/// `#[derive(Projection)]` writes this impl from `#[projection(name = "...", event = ...)]` and
/// an inherent `apply` method (see the derive's documentation).
pub trait Projection: Send + 'static {
    /// A stable name: the key of the projection's checkpoint.
    const NAME: &'static str;
    /// The events this projection handles.
    type Event: Event;

    /// Applies one event to the read model. An error stops the subscription (or parks the event
    /// in the dead-letter queue when the subscription is configured to).
    fn apply(&mut self, event: &Envelope<Self::Event>) -> Result<(), BoxError>;
}
