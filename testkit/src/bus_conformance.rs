//! The conformance checks every [`Bus`] implementation must pass: what the relay and the inbound
//! consumers rely on (see the trait's docs). The in-process bus and the NATS JetStream bus run
//! the same checks.
//!
//! [`bus_conformance_tests!`](crate::bus_conformance_tests) generates one `#[test]` per check. Its
//! factory returns a bus and a value to keep alive for the check (a server; `()` when there is
//! none). Every check uses streams and subjects of its own, so they may share a broker:
//!
//! ```
//! // In tests/bus.rs of a bus crate:
//! factum_testkit::bus_conformance_tests!(|| async { (factum::bus::InProcessBus::new(), ()) });
//! ```

use std::time::Duration;

use chrono::Utc;
use factum::bus::{Bus, BusConsumer, BusMessage, ConsumerConfig, ServiceName, StreamConfig};
use factum::{
    EventId, EventMetadata, GlobalPosition, LogPosition, Metadata, RawValue, RecordedEvent,
    StreamId, StreamVersion,
};

/// Generates one `#[test]` per bus conformance check, each with a bus from `$factory` (a closure
/// returning a future of `(bus, keep_alive)`).
#[macro_export]
macro_rules! bus_conformance_tests {
    ($factory:expr) => {
        $crate::__bus_conformance_tests!(
            $factory;
            publishes_are_acknowledged_in_order_and_repeats_are_duplicates,
            messages_arrive_with_their_identity_and_metadata,
            a_durable_consumer_resumes_where_it_left_off,
            unacknowledged_messages_are_delivered_again,
            consumers_get_only_the_subjects_they_filter,
            an_existing_stream_is_verified_not_changed,
            publishing_to_a_subject_no_stream_captures_fails,
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __bus_conformance_tests {
    ($factory:expr; $($check:ident),* $(,)?) => {
        mod bus_conformance {
            use super::*;
            $(
                #[test]
                fn $check() {
                    $crate::conformance::runtime().block_on(async {
                        let (bus, _keep_alive) = ($factory)().await;
                        $crate::bus_conformance::$check(bus).await;
                    });
                }
            )*
        }
    };
}

/// A service of its own for one check (unique names, so checks can share a broker).
fn service() -> ServiceName {
    let id = EventId::new().as_uuid().simple().to_string();
    ServiceName::new(format!("t{}", &id[id.len() - 12..])).expect("valid service name")
}

/// A message of `service` for stream `stream`, version `version`.
pub fn message(service: &ServiceName, stream: &str, version: u64) -> BusMessage {
    let mut user = Metadata::new();
    user.insert("tenant", "acme").expect("a string serialises");
    let stream_id = StreamId::new(stream).expect("stream id");
    let event_type = "thing.happened";
    let subject = factum::bus::subject(service, stream_id.category(), event_type).expect("subject");
    BusMessage::new(
        subject,
        service.clone(),
        RecordedEvent {
            event_id: EventId::new(),
            stream_id,
            stream_version: StreamVersion::new(version),
            position: LogPosition::new(version, GlobalPosition::new(version)),
            event_type: event_type.into(),
            schema_version: 1,
            payload: RawValue::from_string(format!(r#"{{"n":{version},"text":"héllo"}}"#))
                .expect("json"),
            metadata: EventMetadata {
                correlation_id: Some(factum::CorrelationId::new()),
                causation_id: None,
                user,
            },
            recorded_at: Utc::now(),
        },
    )
}

async fn stream_for<B: Bus>(bus: &B, service: &ServiceName) -> StreamConfig {
    // Messages expire, so checks on a shared broker leave little behind.
    let config = StreamConfig::for_service(service).max_age(Duration::from_secs(600));
    bus.ensure_stream(&config).await.expect("stream created");
    config
}

/// Fetches until `n` deliveries arrived (or 10 s passed), acknowledging none.
async fn fetch_n<C: BusConsumer>(consumer: &mut C, n: usize) -> Vec<factum::bus::Delivery> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.len() < n && tokio::time::Instant::now() < deadline {
        got.extend(
            consumer
                .fetch(n - got.len(), Duration::from_millis(500))
                .await
                .expect("fetch"),
        );
    }
    got
}

fn versions(deliveries: &[factum::bus::Delivery]) -> Vec<u64> {
    deliveries
        .iter()
        .map(|d| d.decode().expect("decodes").event.stream_version.get())
        .collect()
}

/// Publishing stores messages in order, each acknowledged; publishing them again is
/// acknowledged as duplicates with the original sequence numbers, and stores nothing.
pub async fn publishes_are_acknowledged_in_order_and_repeats_are_duplicates<B: Bus>(bus: B) {
    let service = service();
    let config = stream_for(&bus, &service).await;
    let messages: Vec<BusMessage> = (1..=3).map(|v| message(&service, "thing-1", v)).collect();
    let first = bus.publish(&messages).await.expect("publish");
    assert_eq!(first.len(), 3);
    assert!(first.iter().all(|a| !a.duplicate), "{first:?}");
    assert!(
        first.windows(2).all(|w| w[0].sequence < w[1].sequence),
        "in order: {first:?}"
    );
    let again = bus.publish(&messages).await.expect("publish again");
    assert!(
        again.iter().all(|a| a.duplicate),
        "repeats are duplicates: {again:?}"
    );
    assert_eq!(
        again.iter().map(|a| a.sequence).collect::<Vec<_>>(),
        first.iter().map(|a| a.sequence).collect::<Vec<_>>()
    );
    let mut consumer = bus
        .consumer(&ConsumerConfig::new(&config.name, "dups"))
        .await
        .expect("consumer");
    let got = fetch_n(&mut consumer, 4).await;
    assert_eq!(versions(&got), vec![1, 2, 3], "stored once each");
}

/// A delivered message decodes to what was published: id, service, stream, version, type,
/// schema version, payload, correlation and user metadata.
pub async fn messages_arrive_with_their_identity_and_metadata<B: Bus>(bus: B) {
    let service = service();
    let config = stream_for(&bus, &service).await;
    let sent = message(&service, "thing-7", 4);
    bus.publish(std::slice::from_ref(&sent))
        .await
        .expect("publish");
    let mut consumer = bus
        .consumer(&ConsumerConfig::new(&config.name, "identity"))
        .await
        .expect("consumer");
    let got = fetch_n(&mut consumer, 1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].delivered, 1);
    assert_eq!(got[0].message_id(), Some(sent.message_id().as_str()));
    let received = got[0].decode().expect("decodes");
    let (a, b) = (&sent.event, &received.event);
    assert_eq!(received.subject, sent.subject);
    assert_eq!(received.service, service);
    assert_eq!(
        (a.event_id, &a.stream_id, a.stream_version, a.position),
        (b.event_id, &b.stream_id, b.stream_version, b.position)
    );
    assert_eq!(
        (&a.event_type, a.schema_version, a.payload.get()),
        (&b.event_type, b.schema_version, b.payload.get())
    );
    assert_eq!(a.metadata, b.metadata);
}

/// A durable consumer keeps its position: a new handle with the same durable name gets the
/// messages the first one did not acknowledge, not those it did.
pub async fn a_durable_consumer_resumes_where_it_left_off<B: Bus>(bus: B) {
    let service = service();
    let config = stream_for(&bus, &service).await;
    let messages: Vec<BusMessage> = (1..=5).map(|v| message(&service, "thing-1", v)).collect();
    bus.publish(&messages).await.expect("publish");
    let consumer_config =
        ConsumerConfig::new(&config.name, "resume").ack_wait(Duration::from_secs(30));
    let mut first = bus.consumer(&consumer_config).await.expect("consumer");
    let got = fetch_n(&mut first, 2).await;
    assert_eq!(versions(&got), vec![1, 2]);
    for delivery in got {
        delivery.ack().await.expect("ack");
    }
    drop(first);
    let mut again = bus
        .consumer(&consumer_config)
        .await
        .expect("consumer again");
    let got = fetch_n(&mut again, 3).await;
    assert_eq!(
        versions(&got),
        vec![3, 4, 5],
        "resumes after what was acknowledged"
    );
    for delivery in got {
        delivery.ack().await.expect("ack");
    }
    let info = again.info().await.expect("info");
    assert_eq!((info.pending, info.ack_pending), (0, 0), "{info:?}");
}

/// A message that is negatively acknowledged, or not acknowledged within the ack wait, is
/// delivered again, with its delivery count raised.
pub async fn unacknowledged_messages_are_delivered_again<B: Bus>(bus: B) {
    let service = service();
    let config = stream_for(&bus, &service).await;
    bus.publish(&[
        message(&service, "thing-1", 1),
        message(&service, "thing-1", 2),
    ])
    .await
    .expect("publish");
    let mut consumer = bus
        .consumer(&ConsumerConfig::new(&config.name, "redeliver").ack_wait(Duration::from_secs(1)))
        .await
        .expect("consumer");
    let mut got = fetch_n(&mut consumer, 2).await;
    assert_eq!(versions(&got), vec![1, 2]);
    let second = got.pop().expect("two");
    let first = got.pop().expect("two");
    first.nak(Duration::ZERO).await.expect("nak");
    let again = fetch_n(&mut consumer, 1).await;
    assert_eq!(versions(&again), vec![1], "a nak brings it back");
    assert_eq!(again[0].delivered, 2);
    for delivery in again {
        delivery.ack().await.expect("ack");
    }
    drop(second); // neither acked nor naked: it comes back when the ack wait runs out
    let again = fetch_n(&mut consumer, 1).await;
    assert_eq!(versions(&again), vec![2], "the ack wait brings it back");
    assert_eq!(again[0].delivered, 2);
    for delivery in again {
        delivery.ack().await.expect("ack");
    }
    assert!(
        consumer
            .fetch(10, Duration::from_millis(1500))
            .await
            .expect("fetch")
            .is_empty(),
        "acknowledged messages are not delivered again"
    );
}

/// A consumer with filter subjects gets only the messages whose subject matches.
pub async fn consumers_get_only_the_subjects_they_filter<B: Bus>(bus: B) {
    let service = service();
    let config = stream_for(&bus, &service).await;
    bus.publish(&[
        message(&service, "thing-1", 1),
        message(&service, "other-1", 1),
        message(&service, "thing-2", 1),
    ])
    .await
    .expect("publish");
    let mut consumer = bus
        .consumer(
            &ConsumerConfig::new(&config.name, "filtered")
                .filter_subject(format!("{service}.thing.>")),
        )
        .await
        .expect("consumer");
    let got = fetch_n(&mut consumer, 3).await;
    let streams: Vec<String> = got
        .iter()
        .map(|d| d.decode().expect("decodes").event.stream_id.to_string())
        .collect();
    assert_eq!(streams, vec!["thing-1", "thing-2"]);
}

/// Ensuring a stream that exists with the same configuration succeeds; with another duplicate
/// window it fails naming the difference, and the stream is left as it was.
pub async fn an_existing_stream_is_verified_not_changed<B: Bus>(bus: B) {
    let service = service();
    let config = stream_for(&bus, &service).await;
    bus.ensure_stream(&config)
        .await
        .expect("the same configuration");
    let other = config.clone().duplicate_window(Duration::from_secs(30));
    let err = bus.ensure_stream(&other).await.unwrap_err();
    assert_eq!(err.kind(), factum::ErrorKind::InvalidArgument, "{err}");
    assert!(err.to_string().contains("duplicate window"), "{err}");
    bus.ensure_stream(&config).await.expect("unchanged");
}

/// A publish to a subject no stream captures fails (nothing is silently dropped).
pub async fn publishing_to_a_subject_no_stream_captures_fails<B: Bus>(bus: B) {
    let service = service();
    let err = bus
        .publish(&[message(&service, "thing-1", 1)])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), factum::ErrorKind::Permanent, "{err}");
}
