//! What a consumer hands its events to: per-event and batch handlers.

use std::future::Future;

use crate::error::BoxError;
use crate::event::RecordedEvent;
use crate::projection::Projection;

/// Handles the events a subscription delivers, one at a time: the simple case of a
/// [`BatchHandler`] (every `EventHandler` is one, for any transaction type).
pub trait EventHandler: Send {
    /// Handles one event. An error is retried, then stops the subscription or parks the event.
    fn handle(
        &mut self,
        event: &RecordedEvent,
    ) -> impl Future<Output = Result<(), BoxError>> + Send;
}

impl<H: EventHandler> EventHandler for &mut H {
    fn handle(
        &mut self,
        event: &RecordedEvent,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        (**self).handle(event)
    }
}

/// Why a [`BatchHandler`] stopped in the middle of a batch.
#[derive(Debug)]
#[non_exhaustive]
pub struct BatchFailure {
    /// How many events at the start of the batch were handled (their effects stand in the
    /// transaction, and the consumer checkpoints after them), or `None` when the handler cannot
    /// tell (the consumer then rolls the whole batch back and hands its events over one at a
    /// time to find the failing one).
    pub handled: Option<usize>,
    /// The handler's error.
    pub source: BoxError,
}

impl BatchFailure {
    /// The handler failed on the event at index `handled`, after handling the ones before it.
    ///
    /// The consumer then commits the first `handled` events' effects with the checkpoint, so the
    /// transaction must still be usable: on PostgreSQL a failed statement aborts it, so report a
    /// SQL error with [`somewhere`](Self::somewhere) (or run each event's writes in a savepoint).
    pub fn at(handled: usize, source: impl Into<BoxError>) -> Self {
        Self {
            handled: Some(handled),
            source: source.into(),
        }
    }

    /// The handler failed somewhere in the batch; the consumer finds where, one event at a time.
    pub fn somewhere(source: impl Into<BoxError>) -> Self {
        Self {
            handled: None,
            source: source.into(),
        }
    }
}

/// Handles a whole batch of events in one unit of work `Tx` (the transaction a
/// [`TransactionalCheckpoint`](super::TransactionalCheckpoint) opens, in which the consumer then
/// moves its checkpoint): e.g. a read model written with a few statements per batch, or broker
/// publishes pipelined and awaited together.
///
/// Every [`EventHandler`] is a `BatchHandler` for any `Tx` (it ignores the transaction and
/// handles the events in turn). Implement this trait to write in the checkpoint's transaction
/// (exactly-once effects) or to handle several events at once.
pub trait BatchHandler<Tx: Send + ?Sized>: Send {
    /// Handles `events` (in log order, at least one) within `tx`. On failure, say how many were
    /// handled before it ([`BatchFailure::at`]) if that is known.
    fn handle_batch(
        &mut self,
        tx: &mut Tx,
        events: &[RecordedEvent],
    ) -> impl Future<Output = Result<(), BatchFailure>> + Send;

    /// Handles one event within `tx`: how the consumer retries an event a batch failed on (each
    /// attempt in a transaction of its own). By default, a batch of one.
    fn handle_one(
        &mut self,
        tx: &mut Tx,
        event: &RecordedEvent,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        async move {
            self.handle_batch(tx, std::slice::from_ref(event))
                .await
                .map_err(|failure| failure.source)
        }
    }
}

impl<H: EventHandler, Tx: Send + ?Sized> BatchHandler<Tx> for H {
    async fn handle_batch(
        &mut self,
        _tx: &mut Tx,
        events: &[RecordedEvent],
    ) -> Result<(), BatchFailure> {
        for (i, event) in events.iter().enumerate() {
            self.handle(event)
                .await
                .map_err(|source| BatchFailure::at(i, source))?;
        }
        Ok(())
    }

    fn handle_one(
        &mut self,
        _tx: &mut Tx,
        event: &RecordedEvent,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        self.handle(event)
    }
}

/// Runs a [`Projection`] as a subscription's handler: decodes each event into the projection's
/// event type (upcasting older versions) and applies it.
///
/// An event that does not decode is a handler failure naming its stream, version, type and
/// position: the subscription stops on it, or parks it when configured to; it is never skipped
/// silently.
#[derive(Debug, Default)]
pub struct Projector<P> {
    projection: P,
}

impl<P: Projection> Projector<P> {
    /// Wraps a projection.
    pub fn new(projection: P) -> Self {
        Self { projection }
    }

    /// The read model.
    pub fn get(&self) -> &P {
        &self.projection
    }

    /// The read model, mutably.
    pub fn get_mut(&mut self) -> &mut P {
        &mut self.projection
    }

    /// Unwraps the read model.
    pub fn into_inner(self) -> P {
        self.projection
    }
}

impl<P: Projection> EventHandler for Projector<P> {
    fn handle(
        &mut self,
        event: &RecordedEvent,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        let result = event
            .decode_all::<P::Event>()
            .map_err(BoxError::from)
            .and_then(|envelopes| {
                envelopes
                    .into_iter()
                    .try_for_each(|envelope| self.projection.apply(&envelope))
            });
        std::future::ready(result)
    }
}
