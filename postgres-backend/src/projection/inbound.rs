//! [`InboundProjection`]: a PostgreSQL projection fed by other services' events.

use factum::subscription::{BatchFailure, BatchHandler};
use factum::{BoxError, Error, RecordedEvent};

use super::runner::PgProjector;
use super::{PgProjection, Tables};
use crate::subscription::PgTx;

/// A [`PgProjection`] as the handler of an [`InboundConsumer`](factum::bus::InboundConsumer)
/// on a [`PgInbox`](crate::PgInbox): each message's event is applied in the inbox's transaction,
/// so the read model rows and the inbox row commit together — a read model of another service's
/// events, each applied exactly once.
///
/// It writes to the projection's tables under their own names (there is no rebuild from the bus:
/// to rebuild, replay the publishing service's relay into a fresh consumer).
///
/// ```no_run
/// # use factum::bus::{ConsumerConfig, InboundConsumer};
/// # use factum_postgres::projection::{InboundProjection, PgProjection};
/// # async fn run<P: PgProjection, B: factum::bus::Bus>(store: factum_postgres::PostgresStore, bus: B, projection: P) -> Result<(), factum::Error> {
/// let mut consumer = InboundConsumer::new(bus, factum_postgres::PgInbox::new(&store),
///     ConsumerConfig::new("ORDERS", "billing-from-orders"));
/// consumer.run(InboundProjection::new(projection)?, std::future::pending()).await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct InboundProjection<P> {
    projection: P,
    tables: Tables,
}

impl<P: PgProjection> InboundProjection<P> {
    /// Wraps `projection`; fails when one of its declared tables is not a valid name.
    pub fn new(projection: P) -> Result<Self, Error> {
        Ok(Self {
            tables: Tables::new(P::TABLES, "")?,
            projection,
        })
    }

    /// The projection.
    pub fn get(&self) -> &P {
        &self.projection
    }

    /// Unwraps the projection.
    pub fn into_inner(self) -> P {
        self.projection
    }
}

impl<P: PgProjection> BatchHandler<PgTx> for InboundProjection<P> {
    async fn handle_batch(
        &mut self,
        tx: &mut PgTx,
        events: &[RecordedEvent],
    ) -> Result<(), BatchFailure> {
        PgProjector::new(&mut self.projection, &self.tables)
            .handle_batch(tx, events)
            .await
    }

    async fn handle_one(&mut self, tx: &mut PgTx, event: &RecordedEvent) -> Result<(), BoxError> {
        PgProjector::new(&mut self.projection, &self.tables)
            .handle_one(tx, event)
            .await
    }
}
