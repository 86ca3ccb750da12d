//! Projections: read models fed by events.

use crate::error::BoxError;
use crate::event::{Envelope, Event};
use crate::subscription::KnownEvents;

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

    /// The events registered in the categories this projection reads, or `None` (the default)
    /// to read only its own event types at the source.
    ///
    /// With `None`, a stored event whose type nothing registers (a typo, a rename without an
    /// alias) is never read, so it cannot be noticed. Declare the aggregates whose events it
    /// reads (`KnownEvents::new().aggregate::<Account>()`) and such an event stops the projection
    /// (or is parked) with an error naming it; events of the other registered types are passed
    /// over.
    fn known_events() -> Option<KnownEvents> {
        None
    }

    /// Applies one event to the read model. An error stops the subscription (or parks the event
    /// in the dead-letter queue when the subscription is configured to).
    fn apply(&mut self, event: &Envelope<Self::Event>) -> Result<(), BoxError>;
}
