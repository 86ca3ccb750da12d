//! What a subscription stores besides events: its checkpoint and its parked (dead-letter) events.

use std::future::Future;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::error::Error;
use crate::event::RecordedEvent;
use crate::ids::{EventId, LogPosition};
use crate::store::BoxFuture;

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

/// The dyn-compatible twin of [`CheckpointStore`], implemented for every checkpoint store, so a
/// backend can be used as `Arc<dyn DynCheckpointStore>` (which itself implements
/// [`CheckpointStore`]).
pub trait DynCheckpointStore: Send + Sync {
    /// See [`CheckpointStore::load_checkpoint`].
    fn load_checkpoint_dyn<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<LogPosition>, Error>>;

    /// See [`CheckpointStore::save_checkpoint`].
    fn save_checkpoint_dyn<'a>(
        &'a self,
        name: &'a str,
        position: LogPosition,
    ) -> BoxFuture<'a, Result<(), Error>>;
}

impl<T: CheckpointStore> DynCheckpointStore for T {
    fn load_checkpoint_dyn<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<LogPosition>, Error>> {
        Box::pin(self.load_checkpoint(name))
    }

    fn save_checkpoint_dyn<'a>(
        &'a self,
        name: &'a str,
        position: LogPosition,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(self.save_checkpoint(name, position))
    }
}

impl CheckpointStore for dyn DynCheckpointStore {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<LogPosition>, Error> {
        self.load_checkpoint_dyn(name).await
    }

    async fn save_checkpoint(&self, name: &str, position: LogPosition) -> Result<(), Error> {
        self.save_checkpoint_dyn(name, position).await
    }
}

impl<T: CheckpointStore + ?Sized> CheckpointStore for Arc<T> {
    fn load_checkpoint(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<LogPosition>, Error>> + Send {
        (**self).load_checkpoint(name)
    }

    fn save_checkpoint(
        &self,
        name: &str,
        position: LogPosition,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        (**self).save_checkpoint(name, position)
    }
}

/// The dyn-compatible twin of [`DeadLetterStore`], implemented for every dead-letter store, so a
/// backend can be used as `Arc<dyn DynDeadLetterStore>` (which itself implements
/// [`DeadLetterStore`]).
pub trait DynDeadLetterStore: Send + Sync {
    /// See [`DeadLetterStore::park`].
    fn park_dyn(&self, parked: ParkedEvent) -> BoxFuture<'_, Result<(), Error>>;

    /// See [`DeadLetterStore::parked`].
    fn parked_dyn<'a>(
        &'a self,
        subscription: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ParkedEvent>, Error>>;

    /// See [`DeadLetterStore::unpark`].
    fn unpark_dyn<'a>(
        &'a self,
        subscription: &'a str,
        event_id: EventId,
    ) -> BoxFuture<'a, Result<Option<ParkedEvent>, Error>>;
}

impl<T: DeadLetterStore> DynDeadLetterStore for T {
    fn park_dyn(&self, parked: ParkedEvent) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(self.park(parked))
    }

    fn parked_dyn<'a>(
        &'a self,
        subscription: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ParkedEvent>, Error>> {
        Box::pin(self.parked(subscription))
    }

    fn unpark_dyn<'a>(
        &'a self,
        subscription: &'a str,
        event_id: EventId,
    ) -> BoxFuture<'a, Result<Option<ParkedEvent>, Error>> {
        Box::pin(self.unpark(subscription, event_id))
    }
}

impl DeadLetterStore for dyn DynDeadLetterStore {
    fn park(&self, parked: ParkedEvent) -> impl Future<Output = Result<(), Error>> + Send {
        self.park_dyn(parked)
    }

    async fn parked(&self, subscription: &str) -> Result<Vec<ParkedEvent>, Error> {
        self.parked_dyn(subscription).await
    }

    async fn unpark(
        &self,
        subscription: &str,
        event_id: EventId,
    ) -> Result<Option<ParkedEvent>, Error> {
        self.unpark_dyn(subscription, event_id).await
    }
}

impl<T: DeadLetterStore + ?Sized> DeadLetterStore for Arc<T> {
    fn park(&self, parked: ParkedEvent) -> impl Future<Output = Result<(), Error>> + Send {
        (**self).park(parked)
    }

    fn parked(
        &self,
        subscription: &str,
    ) -> impl Future<Output = Result<Vec<ParkedEvent>, Error>> + Send {
        (**self).parked(subscription)
    }

    fn unpark(
        &self,
        subscription: &str,
        event_id: EventId,
    ) -> impl Future<Output = Result<Option<ParkedEvent>, Error>> + Send {
        (**self).unpark(subscription, event_id)
    }
}
