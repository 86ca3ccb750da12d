//! The inbound consumer on the in-process bus with the in-memory inbox: what it parks, what it
//! drops as a duplicate, what it waits out, and retrying a parked message.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use factum::bus::{
    Bus, BusMessage, ConsumerConfig, InMemoryInbox, InProcessBus, InboundConsumer, InboundOptions,
    InboundStatus, Inbox, ServiceName, StreamConfig,
};
use factum::subscription::EventHandler;
use factum::{
    BoxError, EventId, EventMetadata, GlobalPosition, LogPosition, RawValue, RecordedEvent,
    StreamId, StreamVersion,
};
use tokio::sync::watch;

fn orders() -> ServiceName {
    ServiceName::new("orders").expect("valid")
}

fn message(version: u64) -> BusMessage {
    BusMessage::new(
        "orders.order.order.placed",
        orders(),
        RecordedEvent {
            event_id: EventId::new(),
            stream_id: StreamId::new("order-1").expect("valid"),
            stream_version: StreamVersion::new(version),
            position: LogPosition::new(version, GlobalPosition::new(version)),
            event_type: "order.placed".into(),
            schema_version: 1,
            payload: RawValue::from_string(format!(r#"{{"n":{version}}}"#)).expect("json"),
            metadata: EventMetadata::default(),
            recorded_at: chrono::Utc::now(),
        },
    )
}

/// Counts calls per event; fails the first `fail_first` calls with `error`.
#[derive(Clone, Default)]
struct Handler {
    calls: Arc<AtomicU32>,
    fail_first: u32,
    transient: bool,
}

impl EventHandler for Handler {
    async fn handle(&mut self, _event: &RecordedEvent) -> Result<(), BoxError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        if n < self.fail_first {
            return Err(if self.transient {
                factum::Error::transient("read model", "connection refused").into()
            } else {
                "the handler is broken".into()
            });
        }
        Ok(())
    }
}

async fn setup(window: Duration) -> (InProcessBus, InboundConsumer<InProcessBus, InMemoryInbox>) {
    let bus = InProcessBus::new();
    bus.ensure_stream(&StreamConfig::for_service(&orders()).duplicate_window(window))
        .await
        .expect("stream");
    let consumer = InboundConsumer::new(
        bus.clone(),
        InMemoryInbox::new(),
        ConsumerConfig::new("ORDERS", "billing-from-orders").ack_wait(Duration::from_secs(1)),
    )
    .options(
        InboundOptions::default()
            .fetch_wait(Duration::from_millis(50))
            .handler_retries(3, Duration::from_millis(1)),
    );
    (bus, consumer)
}

/// Runs `consumer` with `handler` until its status satisfies `done`.
async fn run_until(
    consumer: &mut InboundConsumer<InProcessBus, InMemoryInbox>,
    handler: Handler,
    done: impl Fn(&InboundStatus) -> bool + Send + Sync + 'static,
) -> InboundStatus {
    let mut status: watch::Receiver<InboundStatus> = consumer.status();
    let stop = async move {
        status.wait_for(|s| done(s)).await.expect("status");
    };
    tokio::time::timeout(Duration::from_secs(20), consumer.run(handler, stop))
        .await
        .expect("reached in time")
        .expect("runs");
    consumer.status().borrow().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_does_not_decode_is_parked_with_its_subject_id_and_error() {
    let (bus, mut consumer) = setup(Duration::from_secs(60)).await;
    let good = message(1);
    let mut headers: Vec<(String, String)> = good
        .headers()
        .into_iter()
        .map(|(n, v)| (n.to_owned(), v))
        .filter(|(n, _)| n != factum::bus::headers::EVENT_TYPE)
        .collect();
    headers.push(("X-Other".into(), "kept".into()));
    bus.publish_raw(&good.subject, headers, b"{}".to_vec())
        .expect("published");
    bus.publish(&[message(2)]).await.expect("published");

    let handler = Handler::default();
    let status = run_until(&mut consumer, handler.clone(), |s| {
        s.handled == 1 && s.parked == 1
    })
    .await;
    assert_eq!(
        handler.calls.load(Ordering::SeqCst),
        1,
        "only the good one reached the handler"
    );
    let parked = consumer
        .inbox()
        .parked("billing-from-orders")
        .await
        .expect("parked");
    assert_eq!(parked.len(), 1, "{status:?}");
    assert_eq!(parked[0].subject, good.subject);
    assert_eq!(parked[0].message_id, Some(good.message_id()));
    assert!(
        parked[0].error.contains("Factum-Event-Type is missing"),
        "{}",
        parked[0].error
    );
    assert!(
        parked[0]
            .headers
            .iter()
            .any(|(n, v)| n == "X-Other" && v == "kept")
    );
    assert_eq!(parked[0].attempts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_message_is_parked_after_its_attempts_and_retried_from_there() {
    let (bus, mut consumer) = setup(Duration::from_secs(60)).await;
    let sent = message(1);
    bus.publish(std::slice::from_ref(&sent))
        .await
        .expect("published");
    let broken = Handler {
        fail_first: u32::MAX,
        ..Handler::default()
    };
    let status = run_until(&mut consumer, broken.clone(), |s| s.parked == 1).await;
    assert_eq!(status.handled, 0);
    assert_eq!(broken.calls.load(Ordering::SeqCst), 3, "three attempts");
    let parked = consumer
        .inbox()
        .parked("billing-from-orders")
        .await
        .expect("parked");
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].attempts, 3);
    assert!(
        parked[0].error.contains("the handler is broken"),
        "{}",
        parked[0].error
    );
    assert!(
        !consumer
            .inbox()
            .contains("billing-from-orders", sent.event.event_id)
    );

    // Still broken: it stays parked and the error says which event.
    let err = consumer
        .retry_parked(broken.clone(), parked[0].id)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains(&sent.event.event_id.to_string()),
        "{err}"
    );
    assert_eq!(
        consumer
            .inbox()
            .parked("billing-from-orders")
            .await
            .expect("parked")
            .len(),
        1
    );

    // Fixed: handled once, recorded in the inbox, gone from the dead letters.
    let fixed = Handler::default();
    consumer
        .retry_parked(fixed.clone(), parked[0].id)
        .await
        .expect("retried");
    assert_eq!(fixed.calls.load(Ordering::SeqCst), 1);
    assert!(
        consumer
            .inbox()
            .contains("billing-from-orders", sent.event.event_id)
    );
    assert!(
        consumer
            .inbox()
            .parked("billing-from-orders")
            .await
            .expect("parked")
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_published_again_after_the_duplicate_window_has_no_effect() {
    // No duplicate window: the bus stores the repeat, the inbox drops it.
    let (bus, mut consumer) = setup(Duration::ZERO).await;
    let sent = message(1);
    let first = bus
        .publish(std::slice::from_ref(&sent))
        .await
        .expect("published");
    let again = bus
        .publish(std::slice::from_ref(&sent))
        .await
        .expect("published again");
    assert!(!first[0].duplicate && !again[0].duplicate, "both stored");
    let handler = Handler::default();
    let status = run_until(&mut consumer, handler.clone(), |s| {
        s.handled + s.duplicates == 2
    })
    .await;
    assert_eq!((status.handled, status.duplicates), (1, 1));
    assert_eq!(
        handler.calls.load(Ordering::SeqCst),
        1,
        "the handler ran once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_failure_that_may_pass_is_waited_out_not_parked() {
    let (bus, mut consumer) = setup(Duration::from_secs(60)).await;
    bus.publish(&[message(1)]).await.expect("published");
    // Fails transiently more often than the attempts allow: still not parked.
    let flaky = Handler {
        fail_first: 5,
        transient: true,
        ..Handler::default()
    };
    let status = run_until(&mut consumer, flaky.clone(), |s| s.handled == 1).await;
    assert_eq!(status.parked, 0, "{status:?}");
    assert_eq!(flaky.calls.load(Ordering::SeqCst), 6);
}
