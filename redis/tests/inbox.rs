//! The Redis inbox on a real Redis, fed by the in-process bus: each message applied once, a
//! redelivery after a crash between `EXEC` and the acknowledgement dropped, racing instances,
//! dead letters, retention.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use factum::bus::{
    Bus, BusMessage, ConsumerConfig, InProcessBus, InboundConsumer, InboundOptions, InboundStatus,
    Inbox, ParkedMessage, ServiceName, StreamConfig,
};
use factum::subscription::{BatchFailure, BatchHandler};
use factum::{Error, RecordedEvent};
use factum_redis::redis::AsyncCommands as _;
use factum_redis::{RedisInbox, RedisKeyspace, RedisTx, SinkError};
use support::*;
use tokio::sync::watch;

const CONSUMER: &str = "notifications";

async fn keyspace(label: &str) -> RedisKeyspace {
    RedisKeyspace::connect(
        &factum_testkit::redis::shared_url(),
        &factum_testkit::redis::namespace(label),
    )
    .await
    .expect("connect to Redis")
}

fn service() -> ServiceName {
    ServiceName::new("content").expect("service name")
}

/// The events of the test log as the publishing service puts them on the bus.
fn messages(events: &[RecordedEvent]) -> Vec<BusMessage> {
    events
        .iter()
        .map(|e| BusMessage::new("content.account.credited", service(), e.clone()))
        .collect()
}

async fn bus_with(events: &[RecordedEvent]) -> InProcessBus {
    let bus = InProcessBus::new();
    bus.ensure_stream(&StreamConfig::for_service(&service()))
        .await
        .expect("stream");
    bus.publish(&messages(events)).await.expect("publish");
    bus
}

fn config() -> ConsumerConfig {
    ConsumerConfig::new("CONTENT", CONSUMER).ack_wait(Duration::from_millis(500))
}

fn options() -> InboundOptions {
    InboundOptions::default()
        .fetch_wait(Duration::from_millis(100))
        .handler_retries(2, Duration::from_millis(1))
}

async fn until(
    status: &mut watch::Receiver<InboundStatus>,
    what: &str,
    done: impl Fn(&InboundStatus) -> bool,
) -> InboundStatus {
    let reached = match tokio::time::timeout(LIMIT, status.wait_for(|s| done(s))).await {
        Ok(Ok(status)) => Some(status.clone()),
        _ => None,
    };
    reached.unwrap_or_else(|| panic!("{what}: not reached; last status {:?}", *status.borrow()))
}

/// An inbox that, once it committed `stall_after` messages, signals and never returns from that
/// commit: the message is applied in Redis and not acknowledged when its task is aborted.
struct StallingInbox {
    inner: RedisInbox,
    stall_after: usize,
    committed: AtomicUsize,
    stalled: tokio::sync::Notify,
}

impl Inbox for StallingInbox {
    type Tx = RedisTx;

    async fn begin(&self, consumer: &str, message: &BusMessage) -> Result<Option<RedisTx>, Error> {
        self.inner.begin(consumer, message).await
    }

    async fn commit(&self, tx: RedisTx) -> Result<(), Error> {
        self.inner.commit(tx).await?;
        if self.committed.fetch_add(1, Ordering::SeqCst) + 1 == self.stall_after {
            self.stalled.notify_one();
            std::future::pending::<()>().await;
        }
        Ok(())
    }

    async fn rollback(&self, tx: RedisTx) {
        self.inner.rollback(tx).await;
    }

    async fn park(&self, parked: ParkedMessage) -> Result<u64, Error> {
        self.inner.park(parked).await
    }

    async fn parked(&self, consumer: &str) -> Result<Vec<ParkedMessage>, Error> {
        self.inner.parked(consumer).await
    }

    async fn unpark(&self, tx: &mut RedisTx, consumer: &str, id: u64) -> Result<bool, Error> {
        self.inner.unpark(tx, consumer, id).await
    }

    async fn discard(&self, consumer: &str, id: u64) -> Result<bool, Error> {
        self.inner.discard(consumer, id).await
    }
}

/// Bus → inbound consumer → Redis inbox → read model. The consumer "crashes" (its task is
/// aborted) after `EXEC` of its 9th message and before acknowledging it; a new consumer gets the
/// message again and the inbox drops it: the read model equals the fold of the events, each once.
#[test]
fn a_redelivery_after_a_crash_between_exec_and_ack_has_no_effect() {
    runtime().block_on(async {
        let keyspace = keyspace("inbound").await;
        let store = test_log(40, 4).await;
        let events = all_events(&store).await;
        let bus = bus_with(&events).await;

        let inbox = Arc::new(StallingInbox {
            inner: RedisInbox::new(&keyspace),
            stall_after: 9,
            committed: AtomicUsize::new(0),
            stalled: tokio::sync::Notify::new(),
        });
        let stalled = {
            let inbox = inbox.clone();
            async move { inbox.stalled.notified().await }
        };
        let crashing = tokio::spawn({
            let bus = bus.clone();
            let inbox = ArcInbox(inbox.clone());
            async move {
                InboundConsumer::new(bus, inbox, config())
                    .options(options())
                    .run(Ledger::default(), std::future::pending())
                    .await
            }
        });
        tokio::time::timeout(LIMIT, stalled)
            .await
            .expect("the consumer reached its 9th commit");
        crashing.abort();
        let _ = crashing.await;
        assert_eq!(read_model(&keyspace).await, fold(&events[..9]));

        let redis_inbox = RedisInbox::new(&keyspace);
        let mut consumer =
            InboundConsumer::new(bus.clone(), redis_inbox.clone(), config()).options(options());
        let mut status = consumer.status();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(async move {
            consumer
                .run(Ledger::default(), async {
                    let _ = stopped.await;
                })
                .await
        });
        let done = until(&mut status, "the rest handled", |s| {
            s.handled == 31 && s.duplicates >= 1
        })
        .await;
        let _ = stop.send(());
        running.await.expect("task").expect("consumer");
        assert_eq!(done.parked, 0, "{done:?}");
        assert_eq!(read_model(&keyspace).await, fold(&events));
        for event in &events {
            assert!(
                redis_inbox
                    .contains(CONSUMER, event.event_id)
                    .await
                    .expect("contains")
            );
        }
    });
}

/// Shares an inbox between the test and the consumer.
struct ArcInbox<I>(Arc<I>);

impl<I: Inbox> Inbox for ArcInbox<I> {
    type Tx = I::Tx;

    async fn begin(&self, consumer: &str, message: &BusMessage) -> Result<Option<I::Tx>, Error> {
        self.0.begin(consumer, message).await
    }

    async fn commit(&self, tx: I::Tx) -> Result<(), Error> {
        self.0.commit(tx).await
    }

    async fn rollback(&self, tx: I::Tx) {
        self.0.rollback(tx).await;
    }

    async fn park(&self, parked: ParkedMessage) -> Result<u64, Error> {
        self.0.park(parked).await
    }

    async fn parked(&self, consumer: &str) -> Result<Vec<ParkedMessage>, Error> {
        self.0.parked(consumer).await
    }

    async fn unpark(&self, tx: &mut I::Tx, consumer: &str, id: u64) -> Result<bool, Error> {
        self.0.unpark(tx, consumer, id).await
    }

    async fn discard(&self, consumer: &str, id: u64) -> Result<bool, Error> {
        self.0.discard(consumer, id).await
    }
}

/// A message the inbox holds opens no unit of work; of two units of work racing on one message,
/// the second `EXEC` applies nothing and the next `begin` sees the message handled.
#[test]
fn the_inbox_dedupes_and_settles_races() {
    runtime().block_on(async {
        let keyspace = keyspace("race").await;
        let store = test_log(1, 1).await;
        let events = all_events(&store).await;
        let message = &messages(&events)[0];
        let inbox = RedisInbox::new(&keyspace);

        let mut first = inbox
            .begin(CONSUMER, message)
            .await
            .expect("begin")
            .expect("new message");
        let mut second = inbox
            .begin(CONSUMER, message)
            .await
            .expect("begin")
            .expect("not committed yet: new to this instance too");
        Ledger::apply(&mut first, &events).await.expect("apply");
        Ledger::apply(&mut second, &events).await.expect("apply");
        inbox.commit(first).await.expect("the first commits");
        let error = inbox.commit(second).await.expect_err("the second loses");
        assert!(error.is_transient(), "{error}");
        assert!(matches!(
            std::error::Error::source(&error).and_then(|s| s.downcast_ref::<SinkError>()),
            Some(SinkError::Moved { .. })
        ));
        assert_eq!(read_model(&keyspace).await, fold(&events), "applied once");
        assert!(
            inbox
                .begin(CONSUMER, message)
                .await
                .expect("begin")
                .is_none(),
            "handled: no unit of work"
        );
        assert!(
            inbox
                .contains(CONSUMER, events[0].event_id)
                .await
                .expect("contains")
        );
        assert!(
            !inbox
                .contains("another-consumer", events[0].event_id)
                .await
                .expect("contains"),
            "records are per consumer"
        );
    });
}

/// Fails on every message of one stream until fixed.
struct Refusing {
    refuse: Option<&'static str>,
}

impl BatchHandler<RedisTx> for Refusing {
    async fn handle_batch(
        &mut self,
        tx: &mut RedisTx,
        events: &[RecordedEvent],
    ) -> Result<(), BatchFailure> {
        if let Some(refused) = self.refuse
            && events.iter().any(|e| e.stream_id.as_str() == refused)
        {
            return Err(BatchFailure::somewhere(format!("{refused} is refused")));
        }
        Ledger::apply(tx, events).await
    }
}

/// A message that does not decode, and one whose handler keeps failing, are parked in Redis (one
/// dead letter per message id, however often parked); the failing one retried after the fix is
/// applied, recorded and unparked in one `EXEC`; a dead letter can be discarded.
#[test]
fn messages_are_parked_retried_and_discarded() {
    runtime().block_on(async {
        let keyspace = keyspace("dead").await;
        let store = test_log(6, 3).await;
        let events = all_events(&store).await;
        let bus = bus_with(&events).await;
        bus.publish_raw(
            "content.account.credited",
            vec![("Nats-Msg-Id".into(), "not-a-factum-message".into())],
            b"\xff not json".to_vec(),
        )
        .expect("publish raw");
        let inbox = RedisInbox::new(&keyspace);
        let mut consumer =
            InboundConsumer::new(bus.clone(), inbox.clone(), config()).options(options());
        let mut status = consumer.status();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(async move {
            consumer
                .run(
                    Refusing {
                        refuse: Some("account-1"),
                    },
                    async {
                        let _ = stopped.await;
                    },
                )
                .await
                .map(|()| consumer)
        });
        until(&mut status, "all seen", |s| s.handled + s.parked == 7).await;
        let _ = stop.send(());
        let mut consumer = running.await.expect("task").expect("consumer");

        let refused: Vec<&RecordedEvent> = events
            .iter()
            .filter(|e| e.stream_id.as_str() == "account-1")
            .collect();
        assert_eq!(
            read_model(&keyspace).await,
            fold(
                events
                    .iter()
                    .filter(|e| e.stream_id.as_str() != "account-1")
            )
        );
        let parked = inbox.parked(CONSUMER).await.expect("parked");
        assert_eq!(parked.len(), 1 + refused.len(), "{parked:?}");
        assert!(parked.windows(2).all(|w| w[0].id < w[1].id), "oldest first");
        let (undecodable, parked): (Vec<ParkedMessage>, Vec<ParkedMessage>) = parked
            .into_iter()
            .partition(|p| p.message_id.as_deref() == Some("not-a-factum-message"));
        let undecodable = &undecodable[0];
        assert_eq!(undecodable.body, b"\xff not json");
        assert_eq!(undecodable.attempts, 0);
        assert_eq!(
            parked
                .iter()
                .map(|p| p.message_id.clone())
                .collect::<Vec<_>>(),
            refused
                .iter()
                .map(|e| Some(e.event_id.to_string()))
                .collect::<Vec<_>>()
        );
        assert!(
            parked[0].error.contains("account-1 is refused"),
            "{}",
            parked[0].error
        );
        assert_eq!(parked[0].attempts, 2);

        // Parked again: the same dead letter, the latest error.
        let mut again = parked[0].clone();
        again.error = "refused again".into();
        let id = inbox.park(again).await.expect("park again");
        assert_eq!(id, parked[0].id);
        let now = inbox.parked(CONSUMER).await.expect("parked");
        assert_eq!(now.len(), parked.len() + 1);
        assert_eq!(
            now.iter().find(|p| p.id == id).expect("still parked").error,
            "refused again"
        );

        // Fixed: the refused ones retried.
        for letter in &parked {
            consumer
                .retry_parked(Refusing { refuse: None }, letter.id)
                .await
                .expect("retry");
        }
        assert_eq!(read_model(&keyspace).await.totals, fold(&events).totals);
        for event in &refused {
            assert!(
                inbox
                    .contains(CONSUMER, event.event_id)
                    .await
                    .expect("contains")
            );
        }
        // The undecodable one can only be discarded.
        assert!(
            inbox
                .discard(CONSUMER, undecodable.id)
                .await
                .expect("discard")
        );
        assert!(
            !inbox
                .discard(CONSUMER, undecodable.id)
                .await
                .expect("discard")
        );
        assert!(inbox.parked(CONSUMER).await.expect("parked").is_empty());
    });
}

/// With a retention, inbox records expire in Redis; without, they are kept.
#[test]
fn inbox_records_expire_after_the_retention() {
    runtime().block_on(async {
        let keyspace = keyspace("retention").await;
        let store = test_log(2, 1).await;
        let events = all_events(&store).await;
        let messages = messages(&events);
        let kept = RedisInbox::new(&keyspace);
        let expiring = RedisInbox::new(&keyspace).retain_for(Duration::from_secs(3600));
        for (inbox, message, consumer) in [
            (&kept, &messages[0], "kept"),
            (&expiring, &messages[1], "expiring"),
        ] {
            let tx = inbox
                .begin(consumer, message)
                .await
                .expect("begin")
                .expect("new");
            inbox.commit(tx).await.expect("commit");
        }
        let mut conn = keyspace.connection();
        let ttl: i64 = conn
            .pttl(kept.record_key("kept", events[0].event_id))
            .await
            .expect("pttl");
        assert_eq!(ttl, -1, "kept for ever");
        let ttl: i64 = conn
            .pttl(expiring.record_key("expiring", events[1].event_id))
            .await
            .expect("pttl");
        assert!(ttl > 3_500_000 && ttl <= 3_600_000, "{ttl}");
    });
}
