//! What the checkout tests share: the services' runtimes on PostgreSQL, reading streams and read
//! models, and waiting for a condition with a deadline.

#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use checkout::{
    Billing, BillingView, Checkout, CheckoutChange, Order, OrderCommand, OrderDetails, Shipment,
    ShopView, Stock, Wallet,
};
use factum::saga::{Clock, SagaRuntime};
use factum::subscription::{Projector, StartFrom, Subscription};
use factum::{EventStore, RecordedEvent, Repository, StreamId, StreamVersion};
use factum_postgres::PostgresStore;
use factum_postgres::saga::{PgSagaStore, PgTarget};
use futures_util::TryStreamExt;

/// How long a test waits for a condition before failing.
pub const PATIENCE: Duration = Duration::from_secs(90);

/// Polls `$probe` (an expression yielding `Option<T>`, awaited inside) until it is `Some`, and
/// fails naming `$what` after [`PATIENCE`].
#[macro_export]
macro_rules! eventually {
    ($what:expr, $probe:expr) => {{
        let deadline = tokio::time::Instant::now() + $crate::support::PATIENCE;
        loop {
            if let Some(found) = $probe {
                break found;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "gave up waiting for {}",
                $what
            );
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
    }};
}

/// The shop's checkout saga on `store`: commands to its stock, orders and shipments executed in
/// the dispatch's transaction.
pub fn checkout_runtime(
    store: &PostgresStore,
    clock: impl Clock,
) -> SagaRuntime<Checkout, PgSagaStore> {
    SagaRuntime::new(PgSagaStore::new(store))
        .clock(clock)
        .target(PgTarget::<Stock>::new(store))
        .target(PgTarget::<Order>::new(store))
        .target(PgTarget::<Shipment>::new(store))
}

/// Billing's saga on `store`.
pub fn billing_runtime(store: &PostgresStore) -> SagaRuntime<Billing, PgSagaStore> {
    SagaRuntime::new(PgSagaStore::new(store)).target(PgTarget::<Wallet>::new(store))
}

/// An order of 2 lamps for 30 cents from wallet "ada", shipped to `address`.
pub fn order(id: &str, address: &str) -> OrderDetails {
    OrderDetails {
        order: id.into(),
        sku: "lamp".into(),
        qty: 2,
        amount: 30,
        wallet: "ada".into(),
        address: address.into(),
    }
}

/// Places `details` on the shop's `store`.
pub async fn place(store: &PostgresStore, details: OrderDetails) {
    Repository::<Order, _>::new(store.clone())
        .execute(OrderCommand::Place {
            order: details.order.clone(),
            details,
        })
        .await
        .expect("place the order");
}

/// The events of `stream`.
pub async fn stream(store: &PostgresStore, stream: &str) -> Vec<RecordedEvent> {
    store
        .read_stream(
            &StreamId::new(stream).expect("stream id"),
            StreamVersion::INITIAL,
        )
        .try_collect()
        .await
        .expect("read the stream")
}

/// How many events of `event_type` `stream` holds.
pub async fn count(store: &PostgresStore, name: &str, event_type: &str) -> usize {
    stream(store, name)
        .await
        .iter()
        .filter(|e| e.event_type == event_type)
        .count()
}

/// The changes checkout instance `order` recorded, decoded.
pub async fn checkout_changes(store: &PostgresStore, order: &str) -> Vec<CheckoutChange> {
    stream(store, &format!("checkout-{order}"))
        .await
        .iter()
        .map(|e| {
            e.decode::<CheckoutChange>()
                .expect("a checkout change")
                .event
        })
        .collect()
}

/// The shop's read model, rebuilt from its log.
pub async fn shop_view(store: &PostgresStore) -> ShopView {
    let mut view = Projector::new(ShopView::default());
    Subscription::for_projection::<ShopView>(store.clone())
        .start_from(StartFrom::Beginning)
        .catch_up(&mut view)
        .await
        .expect("read the shop's log");
    view.into_inner()
}

/// Billing's read model, rebuilt from its log.
pub async fn billing_view(store: &PostgresStore) -> BillingView {
    let mut view = Projector::new(BillingView::default());
    Subscription::for_projection::<BillingView>(store.clone())
        .start_from(StartFrom::Beginning)
        .catch_up(&mut view)
        .await
        .expect("read billing's log");
    view.into_inner()
}
