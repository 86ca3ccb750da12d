//! The three-step checkout across two services, each with its own PostgreSQL database, talking
//! only through a bus: stock reserved (shop), wallet charged (billing), shipping rejected (shop);
//! the checkout compensates and both services end consistent. Once over the in-process bus, once
//! over NATS JetStream.

mod support;

use checkout::{
    CheckoutChange, CheckoutStatus, Wallet, WalletCommand, billing_public_events,
    shop_public_events,
};
use factum::Repository;
use factum::bus::{
    Bus, ConsumerConfig, InProcessBus, InboundConsumer, Relay, ServiceName, StreamConfig,
};
use factum::saga::SystemClock;
use factum::subscription::Subscription;
use factum_postgres::PgInbox;
use factum_postgres::subscription::{PgCheckpoints, PgLease};
use factum_testkit::postgres::TestDatabase;

use support::*;

/// Runs both services on `bus` (their names and consumers suffixed with `tag`, so runs on a
/// shared broker do not meet) until the compensation reached both, then checks both services.
async fn step_three_rejected_compensates_in_both_services<B: Bus + Clone>(bus: B, tag: &str) {
    let shop_name = ServiceName::new(format!("shop{tag}")).expect("name");
    let billing_name = ServiceName::new(format!("billing{tag}")).expect("name");
    let shop_stream = StreamConfig::for_service(&shop_name);
    let billing_stream = StreamConfig::for_service(&billing_name);
    bus.ensure_stream(&shop_stream).await.expect("shop stream");
    bus.ensure_stream(&billing_stream)
        .await
        .expect("billing stream");

    let (shop_db, billing_db) = (TestDatabase::create().await, TestDatabase::create().await);
    let (shop, billing) = (shop_db.patient_store(), billing_db.patient_store());
    let checkout = checkout_runtime(&shop, SystemClock);
    let payments = billing_runtime(&billing);

    // Each service: a relay of its public events, its saga fed by its own log (checkout only)
    // and by the other service's events through its inbox, and its saga's dispatch loop.
    let shop_relay = Relay::new(bus.clone(), shop_public_events(shop_name.clone()));
    let billing_relay = Relay::new(bus.clone(), billing_public_events(billing_name.clone()));
    // Relays on plain checkpoints: their effects are on the broker (see the bus chapter).
    let mut shop_relay_feed =
        Subscription::new(shop_relay.name(), shop.clone()).filter(shop_relay.filter());
    let mut billing_relay_feed =
        Subscription::new(billing_relay.name(), billing.clone()).filter(billing_relay.filter());
    let mut checkout_feed =
        Subscription::with_checkpoints(checkout.name(), shop.clone(), PgCheckpoints::new(&shop))
            .filter(checkout.filter())
            .lease(PgLease::new(&shop));
    let mut checkout_inbound = InboundConsumer::new(
        bus.clone(),
        PgInbox::new(&shop),
        ConsumerConfig::new(&billing_stream.name, format!("shop{tag}-checkout")),
    );
    let mut payments_inbound = InboundConsumer::new(
        bus.clone(),
        PgInbox::new(&billing),
        ConsumerConfig::new(&shop_stream.name, format!("billing{tag}-payments")),
    );
    let never = std::future::pending::<()>;
    let services = async {
        tokio::try_join!(
            async { shop_relay_feed.run(shop_relay, never()).await.map(|_| ()) },
            async {
                billing_relay_feed
                    .run(billing_relay, never())
                    .await
                    .map(|_| ())
            },
            async {
                checkout_feed
                    .run(checkout.clone(), never())
                    .await
                    .map(|_| ())
            },
            checkout_inbound.run(checkout.clone(), never()),
            payments_inbound.run(payments.clone(), never()),
            checkout.run(PgLease::new(&shop), never()),
            payments.run(PgLease::new(&billing), never()),
        )
    };

    let scenario = async {
        Repository::<Wallet, _>::new(billing.clone())
            .execute(WalletCommand::Deposit {
                wallet: "ada".into(),
                amount: 100,
            })
            .await
            .expect("deposit");
        place(&shop, order("o-1", "nowhere")).await;
        eventually!(
            "the refund at billing and the cancellation at the shop",
            (count(&billing, "wallet-ada", "wallet.refunded").await == 1
                && count(&shop, "order-o-1", "order.cancelled").await == 1
                && count(&shop, "stock-lamp", "stock.released").await == 1)
                .then_some(())
        );
    };
    tokio::select! {
        stopped = services => panic!("a service stopped: {stopped:?}"),
        () = scenario => {}
    }

    // Each step happened once, the compensation undid each.
    let shop_view = shop_view(&shop).await;
    assert_eq!(
        shop_view.orders.get("o-1").map(String::as_str),
        Some("cancelled: shipping refused: the carrier does not deliver to \"nowhere\"")
    );
    assert_eq!(
        shop_view.reserved.get("lamp"),
        Some(&0),
        "the stock was released"
    );
    let billing_view = billing_view(&billing).await;
    assert_eq!(
        billing_view.balances.get("ada"),
        Some(&100),
        "refunded in full"
    );
    for event_type in ["wallet.deposited", "wallet.charged", "wallet.refunded"] {
        assert_eq!(
            billing_view
                .seen
                .get(&("ada".to_owned(), event_type.to_owned())),
            Some(&1),
            "{event_type} once"
        );
    }
    assert_eq!(count(&shop, "stock-lamp", "stock.reserved").await, 1);
    assert_eq!(count(&shop, "shipment-o-1", "shipment.shipped").await, 0);
    let state = checkout
        .state("o-1")
        .await
        .expect("state")
        .expect("an instance");
    assert!(
        matches!(&state.status, CheckoutStatus::Compensated(reason) if reason.starts_with("shipping refused")),
        "{state:?}"
    );
    let changes = checkout_changes(&shop, "o-1").await;
    let requested_refunds = changes
        .iter()
        .filter(|c| matches!(c, CheckoutChange::RefundRequested(_)))
        .count();
    assert_eq!(requested_refunds, 1, "{changes:?}");
    assert!(checkout.pending("o-1").await.expect("pending").is_empty());
    assert!(
        checkout.timeouts("o-1").await.expect("timeouts").is_empty(),
        "the payment timeout was cancelled"
    );
    assert!(checkout.parked().await.expect("parked").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_the_in_process_bus_step_three_is_rejected_and_both_services_compensate() {
    step_three_rejected_compensates_in_both_services(InProcessBus::new(), "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_nats_jetstream_step_three_is_rejected_and_both_services_compensate() {
    let bus = factum_nats::JetStreamBus::connect(&factum_testkit::nats::shared_url())
        .await
        .expect("connect to NATS");
    // Fresh service names per run: the shared server keeps earlier runs' streams.
    let id = uuid::Uuid::now_v7().simple().to_string();
    step_three_rejected_compensates_in_both_services(bus, &format!("-{}", &id[24..])).await;
}
