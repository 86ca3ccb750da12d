//! The checkout saga across two services, in one process on the in-memory backend and the
//! in-process bus: `cargo run -p checkout`.
//!
//! An order to "nowhere" is placed: the stock is reserved, billing charges the wallet, shipping is
//! refused, and the checkout compensates (stock released, wallet refunded, order cancelled).

#![allow(
    clippy::print_stdout,
    reason = "an example program: its output is the point"
)]

use std::time::Duration;

use checkout::{
    Billing, BillingView, Checkout, Order, OrderCommand, OrderDetails, Shipment, ShopView, Stock,
    Wallet, WalletCommand, billing, billing_public_events, shop, shop_public_events,
};
use factum::bus::{
    Bus, ConsumerConfig, InMemoryInbox, InProcessBus, InboundConsumer, Relay, StreamConfig,
};
use factum::saga::{InMemorySagaStore, SagaRuntime};
use factum::subscription::{NoLease, Projector, Subscription};
use factum::{InMemoryStore, Repository};
use tokio::sync::watch;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bus = InProcessBus::new();
    bus.ensure_stream(&StreamConfig::for_service(&shop()))
        .await?;
    bus.ensure_stream(&StreamConfig::for_service(&billing()))
        .await?;
    let (stop, stopped) = watch::channel(false);
    let signal = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    };

    // The shop: its store, its checkout saga (commands to its own aggregates), its relay, and an
    // inbound consumer of billing's events feeding the same saga.
    let shop_store = InMemoryStore::new();
    let checkout = SagaRuntime::<Checkout, _>::new(InMemorySagaStore::new(shop_store.clone()))
        .repository(Repository::<Stock, _>::new(shop_store.clone()))
        .repository(Repository::<Order, _>::new(shop_store.clone()))
        .repository(Repository::<Shipment, _>::new(shop_store.clone()));
    // Billing: its store, its saga (commands to wallets), its relay and inbound consumer.
    let billing_store = InMemoryStore::new();
    let billing_saga =
        SagaRuntime::<Billing, _>::new(InMemorySagaStore::new(billing_store.clone()))
            .repository(Repository::<Wallet, _>::new(billing_store.clone()));

    // Everything runs concurrently in this task until `stop` (an inbound consumer's future is
    // not `Send`: it is awaited here rather than spawned).
    let (shop_publish, billing_publish) = (
        Relay::new(bus.clone(), shop_public_events(shop())),
        Relay::new(bus.clone(), billing_public_events(billing())),
    );
    let mut shop_relay =
        Subscription::new(shop_publish.name(), shop_store.clone()).filter(shop_publish.filter());
    let mut billing_relay = Subscription::new(billing_publish.name(), billing_store.clone())
        .filter(billing_publish.filter());
    let mut checkout_feed =
        Subscription::new(checkout.name(), shop_store.clone()).filter(checkout.filter());
    let mut checkout_inbound = InboundConsumer::new(
        bus.clone(),
        InMemoryInbox::new(),
        ConsumerConfig::new("BILLING", "shop-checkout"),
    );
    let mut billing_inbound = InboundConsumer::new(
        bus.clone(),
        InMemoryInbox::new(),
        ConsumerConfig::new("SHOP", "billing-payments"),
    );
    let services = async {
        tokio::try_join!(
            async { shop_relay.run(shop_publish, signal()).await.map(|_| ()) },
            async {
                billing_relay
                    .run(billing_publish, signal())
                    .await
                    .map(|_| ())
            },
            async {
                checkout_feed
                    .run(checkout.clone(), signal())
                    .await
                    .map(|_| ())
            },
            async { checkout_inbound.run(checkout.clone(), signal()).await },
            async { checkout.run(NoLease, signal()).await },
            async { billing_inbound.run(billing_saga.clone(), signal()).await },
            async { billing_saga.run(NoLease, signal()).await },
        )
        .map(|_| ())
    };
    let scenario = async {
        Repository::<Wallet, _>::new(billing_store.clone())
            .execute(WalletCommand::Deposit {
                wallet: "ada".into(),
                amount: 100,
            })
            .await?;
        let details = OrderDetails {
            order: "o-1".into(),
            sku: "lamp".into(),
            qty: 2,
            amount: 30,
            wallet: "ada".into(),
            address: "nowhere".into(),
        };
        Repository::<Order, _>::new(shop_store.clone())
            .execute(OrderCommand::Place {
                order: details.order.clone(),
                details,
            })
            .await?;

        // Wait for the compensation to reach both services.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let (shop_view, billing_view) = loop {
            let mut shop_view = Projector::new(ShopView::default());
            Subscription::for_projection::<ShopView>(shop_store.clone())
                .start_from(factum::subscription::StartFrom::Beginning)
                .catch_up(&mut shop_view)
                .await?;
            let mut billing_view = Projector::new(BillingView::default());
            Subscription::for_projection::<BillingView>(billing_store.clone())
                .start_from(factum::subscription::StartFrom::Beginning)
                .catch_up(&mut billing_view)
                .await?;
            let refunded = billing_view
                .get()
                .seen
                .contains_key(&("ada".to_owned(), "wallet.refunded".to_owned()));
            if refunded || tokio::time::Instant::now() > deadline {
                break (shop_view.into_inner(), billing_view.into_inner());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let _ = stop.send(true);
        Ok::<_, Box<dyn std::error::Error>>((shop_view, billing_view))
    };
    let (ran, scenario) = tokio::join!(services, scenario);
    ran?;
    let (shop_view, billing_view) = scenario?;

    println!(
        "checkout: {:?}",
        checkout.state("o-1").await?.map(|c| c.status)
    );
    println!("shop:     {:?}", shop_view);
    println!("billing:  {:?}", billing_view.balances);
    Ok(())
}
