//! A PostgreSQL projection of another service's events: the sending service's relay publishes
//! them on the in-process bus, the receiving service applies each once in its inbox's
//! transaction (the ledger's unique row per applied event would fail on a second application),
//! parks the one that fails and applies it when retried.

mod projection_support;

use std::time::Duration;

use factum::bus::{
    Bus, ConsumerConfig, InProcessBus, InboundConsumer, InboundOptions, PublicEvents, Relay,
    ServiceName, StreamConfig,
};
use factum::subscription::Subscription;
use factum_postgres::PgInbox;
use factum_postgres::projection::InboundProjection;
use factum_testkit::postgres::TestDatabase;
use projection_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_services_events_reach_a_postgres_projection_once_each() {
    let (sender_db, receiver_db) = (TestDatabase::create().await, TestDatabase::create().await);
    let sender = patient_store(&sender_db);
    let receiver = receiver_db.store();
    create_tables(receiver_db.pool()).await;
    let mut fold = Fold::default();
    append(&sender, &mut fold, "ledger-a", 1, 30).await;
    append(&sender, &mut fold, "ledger-b", 31, 20).await;

    let ledgers = ServiceName::new("ledgers").expect("valid");
    // No duplicate window: the relay's repeat below reaches the inbox.
    let bus = InProcessBus::new();
    bus.ensure_stream(&StreamConfig::for_service(&ledgers).duplicate_window(Duration::ZERO))
        .await
        .expect("stream");
    let mut relay = Relay::new(
        bus.clone(),
        PublicEvents::new(ledgers)
            .publish("ledger", ["ledger.entry"])
            .expect("routes"),
    );
    let relay_name = relay.name();
    let mut subscription =
        Subscription::new(relay_name.clone(), sender.clone()).filter(relay.filter());
    subscription.catch_up(&mut relay).await.expect("relay");
    // And once more from the beginning: every message arrives twice.
    let mut again = Subscription::new(relay_name, sender.clone())
        .filter(relay.filter())
        .start_from(factum::subscription::StartFrom::Beginning);
    again.catch_up(&mut relay).await.expect("relay again");

    let poisoned = Ledger {
        poison: [17].into(),
        ..Ledger::default()
    };
    let mut consumer = InboundConsumer::new(
        bus.clone(),
        PgInbox::new(&receiver),
        ConsumerConfig::new("LEDGERS", "totals-from-ledgers"),
    )
    .options(
        InboundOptions::default()
            .fetch_wait(Duration::from_millis(50))
            .handler_retries(2, Duration::from_millis(1)),
    );
    let mut status = consumer.status();
    let done = async move {
        let _ = status
            .wait_for(|s| s.handled + s.duplicates + s.parked == 100)
            .await;
    };
    bounded(
        60,
        consumer.run(InboundProjection::new(poisoned).expect("tables"), done),
    )
    .await
    .expect("consumer");
    let seen = consumer.status().borrow().clone();
    // The poisoned entry failed twice (once per copy), the other repeats were dropped.
    assert_eq!(
        (seen.handled, seen.parked, seen.duplicates),
        (49, 2, 49),
        "{seen:?}"
    );

    // Fixed: the parked entry is applied, and the read model is the sender's fold.
    let parked = factum::bus::Inbox::parked(consumer.inbox(), "totals-from-ledgers")
        .await
        .expect("parked");
    assert_eq!(
        parked.len(),
        1,
        "one dead letter for the message parked twice"
    );
    assert!(
        parked[0].error.contains("entry 17 is poisoned"),
        "{}",
        parked[0].error
    );
    consumer
        .retry_parked(
            InboundProjection::new(Ledger::default()).expect("tables"),
            parked[0].id,
        )
        .await
        .expect("retried");
    assert_eq!(read_model(receiver_db.pool()).await, fold.model);
}
