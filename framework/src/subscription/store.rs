//! What a subscription stores besides events: its checkpoint and its parked (dead-letter) events.

use std::future::Future;

use chrono::{DateTime, Utc};

use crate::error::Error;
use crate::event::RecordedEvent;
use crate::ids::{EventId, LogPosition};

/// Keeps each subscription's position in the global log.
pub trait CheckpointStore: Send + Sync {
    /// The last position the subscription `name` finished with, if it ever saved one.
    fn load_checkpoint(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<LogPosition>, Error>> + Send;

    /// Records that `name` has handled everything up to and including `position`.
    fn save_checkpoint(
        &self,
        name: &str,
        position: LogPosition,
    ) -> impl Future<Output = Result<(), Error>> + Send;
}

/// An event a subscription could not handle and set aside, with why.
#[derive(Clone, Debug)]
pub struct ParkedEvent {
    /// The subscription that parked it.
    pub subscription: String,
    /// The event, as stored.
    pub event: RecordedEvent,
    /// The handler's error, rendered with its causes.
    pub error: String,
    /// How many times the handler was tried.
    pub attempts: u32,
    /// When it was parked.
    pub parked_at: DateTime<Utc>,
}

/// The dead-letter queue: events a subscription parked instead of stopping.
///
/// Parked events can be listed, taken back for a retry (after the handler is fixed), or discarded.
pub trait DeadLetterStore: Send + Sync {
    /// Parks an event.
    fn park(&self, parked: ParkedEvent) -> impl Future<Output = Result<(), Error>> + Send;

    /// The events `subscription` has parked, oldest first.
    fn parked(
        &self,
        subscription: &str,
    ) -> impl Future<Output = Result<Vec<ParkedEvent>, Error>> + Send;

    /// Removes a parked event and returns it (to retry it), or `None` if it is not parked.
    fn unpark(
        &self,
        subscription: &str,
        event_id: EventId,
    ) -> impl Future<Output = Result<Option<ParkedEvent>, Error>> + Send;
}
