//! The relay on the in-memory store and the in-process bus: only public events leave, internal
//! ones can be mapped to a public contract first, and a broker outage delays it, never stops it.

use std::time::Duration;

use factum::bus::{
    Bus, BusConsumer, ConsumerConfig, InProcessBus, PublicEvents, Relay, RelayState, ServiceName,
    StreamConfig,
};
use factum::health::Readiness;
use factum::subscription::Subscription;
use factum::{
    AppendRequest, Envelope, EventMetadata, EventStore, InMemoryStore, NewEvent, StreamId,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, factum::Event)]
#[event(prefix = "order")]
enum OrderEvent {
    Placed { total: u64, internal_note: String },
    NoteAdded { note: String },
}

/// The contract other services see: no internal fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, factum::Event)]
#[event(name = "order.placed.public", version = 2)]
struct OrderPlaced {
    total: u64,
}

fn orders() -> ServiceName {
    ServiceName::new("orders").expect("valid")
}

async fn append(store: &InMemoryStore, event: &OrderEvent) {
    store
        .append(AppendRequest::new(
            StreamId::new("order-7").expect("valid"),
            vec![NewEvent::encode(event, EventMetadata::default()).expect("encodes")],
        ))
        .await
        .expect("append");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_events_are_mapped_to_the_public_contract_or_kept_inside() {
    let bus = InProcessBus::new();
    bus.ensure_stream(&StreamConfig::for_service(&orders()))
        .await
        .expect("stream");
    let store = InMemoryStore::new();
    append(
        &store,
        &OrderEvent::Placed {
            total: 30,
            internal_note: "call first".into(),
        },
    )
    .await;
    append(
        &store,
        &OrderEvent::NoteAdded {
            note: "fragile".into(),
        },
    )
    .await;

    let routes = PublicEvents::new(orders())
        .map::<OrderEvent, OrderPlaced>("order", |e: &Envelope<OrderEvent>| match &e.event {
            OrderEvent::Placed { total, .. } => Some(OrderPlaced { total: *total }),
            OrderEvent::NoteAdded { .. } => None,
        })
        .expect("routes");
    let mut relay = Relay::new(bus.clone(), routes);
    let mut subscription = Subscription::new(relay.name(), store.clone()).filter(relay.filter());
    subscription.catch_up(&mut relay).await.expect("relay");
    let status = relay.status().borrow().clone();
    assert_eq!((status.published, status.skipped), (1, 1), "{status:?}");

    let mut consumer = bus
        .consumer(&ConsumerConfig::new("ORDERS", "check"))
        .await
        .expect("consumer");
    let got = consumer
        .fetch(10, Duration::from_millis(100))
        .await
        .expect("fetch");
    assert_eq!(got.len(), 1, "the internal note stayed inside");
    let message = got[0].decode().expect("decodes");
    assert_eq!(message.subject, "orders.order.order.placed.public");
    assert_eq!(message.event.event_type, "order.placed.public");
    assert_eq!(message.event.schema_version, 2);
    assert!(
        !message.event.payload.get().contains("call first"),
        "no internal field leaves"
    );
    let public = message
        .event
        .decode::<OrderPlaced>()
        .expect("the contract decodes");
    assert_eq!(public.event, OrderPlaced { total: 30 });
    assert_eq!(message.event.stream_id.as_str(), "order-7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_no_stream_captures_stops_the_relay_naming_the_event() {
    let bus = InProcessBus::new(); // no stream created
    let store = InMemoryStore::new();
    append(&store, &OrderEvent::NoteAdded { note: "x".into() }).await;
    let routes = PublicEvents::new(orders())
        .publish_event::<OrderEvent>("order")
        .expect("routes");
    let mut relay = Relay::new(bus, routes);
    let mut subscription = Subscription::new(relay.name(), store.clone())
        .filter(relay.filter())
        .handler_retries(1, Duration::ZERO);
    let err = subscription.catch_up(&mut relay).await.unwrap_err();
    assert!(err.to_string().contains("orders.relay"), "{err}");
    assert!(
        format!("{err:?}").contains("no stream captures subject"),
        "{err:?}"
    );
    assert_eq!(relay.status().borrow().published, 0);
    let state = relay.status().borrow().state.clone();
    assert!(
        matches!(&state, RelayState::Failed(why) if why.contains("no stream captures subject")),
        "{state:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_holding_personal_fields_is_not_published() {
    let bus = InProcessBus::new();
    bus.ensure_stream(&StreamConfig::for_service(&orders()))
        .await
        .expect("stream");
    let store = InMemoryStore::new();
    // A personal field as a store with a shredder keeps it (its ciphertext), published as
    // stored: the relay refuses, naming the event, rather than send it where a forget cannot
    // reach.
    let stored = NewEvent {
        event_id: factum::EventId::new(),
        event_type: "order.placed".into(),
        schema_version: 1,
        payload: factum::RawValue::from_string(
            r#"{"total":3,"email":{"factum:encrypted":{"subject":"c-1","data":"AAAA"}}}"#.into(),
        )
        .expect("json"),
        metadata: EventMetadata::default(),
    };
    store
        .append(AppendRequest::new(
            StreamId::new("order-7").expect("valid"),
            vec![stored.clone()],
        ))
        .await
        .expect("append");
    let routes = PublicEvents::new(orders())
        .publish("order", ["order.placed"])
        .expect("routes");
    let mut relay = Relay::new(bus.clone(), routes);
    let mut subscription = Subscription::new(relay.name(), store.clone())
        .filter(relay.filter())
        .handler_retries(1, Duration::ZERO);
    let err = subscription.catch_up(&mut relay).await.unwrap_err();
    let text = format!("{err:?}");
    assert!(text.contains("holds personal fields"), "{text}");
    assert!(text.contains(&stored.event_id.to_string()), "{text}");
    assert_eq!(relay.status().borrow().published, 0);
    // Its health says so (a relay that stopped is not ready), naming the event.
    let state = relay.status().borrow().state.clone();
    assert!(
        matches!(&state, RelayState::Failed(why)
            if why.contains(&stored.event_id.to_string()) && why.contains("personal")),
        "{state:?}"
    );
    assert!(
        !Readiness::new()
            .relay("orders", &relay.status().borrow())
            .is_ready()
    );
    let mut consumer = bus
        .consumer(&ConsumerConfig::new("ORDERS", "check"))
        .await
        .expect("consumer");
    assert!(
        consumer
            .fetch(10, Duration::from_millis(50))
            .await
            .expect("fetch")
            .is_empty(),
        "nothing reached the bus"
    );
}
