//! Subscriptions over the in-memory backend: checkpoints, replay, live following under concurrent
//! writers, filters, and the dead-letter queue.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use factum::subscription::{
    CheckpointStore, DeadLetterStore, EventHandler, StartFrom, Subscription, SubscriptionState,
};
use factum::{
    BoxError, Error, EventFilter, EventId, EventStore, InMemoryStore, LogPosition, NewEvent,
    RawValue, RecordedEvent, StreamId,
};

fn event(event_type: &str) -> NewEvent {
    NewEvent {
        event_id: EventId::new(),
        event_type: event_type.to_owned(),
        schema_version: 1,
        payload: RawValue::from_string("{}".to_owned()).unwrap(),
        metadata: Default::default(),
    }
}

async fn append(store: &InMemoryStore, stream: &str, events: Vec<NewEvent>) -> Vec<EventId> {
    let ids = events.iter().map(|e| e.event_id).collect();
    store
        .append(factum::AppendRequest::new(
            StreamId::new(stream).unwrap(),
            events,
        ))
        .await
        .unwrap();
    ids
}

/// Records every event it sees; fails on the ids in `poison`.
#[derive(Default)]
struct Recorder {
    seen: Vec<RecordedEvent>,
    poison: HashSet<EventId>,
    calls: usize,
    /// Signalled when `seen` reaches `target`.
    done: Option<(usize, tokio::sync::mpsc::UnboundedSender<()>)>,
}

impl EventHandler for Recorder {
    async fn handle(&mut self, event: &RecordedEvent) -> Result<(), BoxError> {
        self.calls += 1;
        if self.poison.contains(&event.event_id) {
            return Err(format!("cannot handle {}", event.event_type).into());
        }
        self.seen.push(event.clone());
        if let Some((target, tx)) = &self.done
            && self.seen.len() == *target
        {
            tx.send(()).unwrap();
        }
        Ok(())
    }
}

fn ids(events: &[RecordedEvent]) -> Vec<EventId> {
    events.iter().map(|e| e.event_id).collect()
}

#[tokio::test]
async fn catch_up_handles_every_event_once_in_log_order_and_checkpoints() {
    let store = InMemoryStore::new();
    let mut expected = append(&store, "a-1", vec![event("a.x"), event("a.y")]).await;
    expected.extend(append(&store, "b-1", vec![event("b.x")]).await);
    expected.extend(append(&store, "a-1", vec![event("a.z")]).await);

    let mut recorder = Recorder::default();
    let mut subscription = Subscription::new("all", store.clone()).batch_size(2);
    let reached = subscription.catch_up(&mut recorder).await.unwrap();
    assert_eq!(ids(&recorder.seen), expected);
    assert_eq!(reached, store.head());
    assert_eq!(store.load_checkpoint("all").await.unwrap(), Some(reached));
    let status = subscription.status().borrow().clone();
    assert_eq!(status.handled, 4);
    assert_eq!(status.position, reached);
}

#[tokio::test]
async fn a_restarted_subscription_resumes_from_its_checkpoint() {
    let store = InMemoryStore::new();
    append(&store, "a-1", vec![event("a.x"), event("a.y")]).await;
    let mut first = Recorder::default();
    Subscription::new("sub", store.clone())
        .catch_up(&mut first)
        .await
        .unwrap();
    assert_eq!(first.seen.len(), 2);

    let later = append(&store, "a-2", vec![event("a.x")]).await;
    let mut second = Recorder::default();
    Subscription::new("sub", store.clone())
        .catch_up(&mut second)
        .await
        .unwrap();
    assert_eq!(ids(&second.seen), later, "only events after the checkpoint");

    // Another name has its own checkpoint; Beginning replays everything.
    let mut replay = Recorder::default();
    Subscription::new("sub", store.clone())
        .start_from(StartFrom::Beginning)
        .catch_up(&mut replay)
        .await
        .unwrap();
    assert_eq!(replay.seen.len(), 3);
}

#[tokio::test]
async fn start_from_now_and_after_a_position() {
    let store = InMemoryStore::new();
    append(&store, "a-1", vec![event("a.x"), event("a.y")]).await;
    let head = store.head();
    let new = append(&store, "a-1", vec![event("a.z")]).await;

    let mut from_now = Recorder::default();
    Subscription::new("now", store.clone())
        .start_from(StartFrom::After(head))
        .catch_up(&mut from_now)
        .await
        .unwrap();
    assert_eq!(ids(&from_now.seen), new);

    let mut now = Recorder::default();
    let position = Subscription::new("fresh", store.clone())
        .start_from(StartFrom::Now)
        .catch_up(&mut now)
        .await
        .unwrap();
    assert!(
        now.seen.is_empty(),
        "Now starts after what is already stored"
    );
    assert_eq!(position, store.head());
}

#[tokio::test]
async fn filters_apply_at_the_source() {
    let store = InMemoryStore::new();
    append(&store, "order-1", vec![event("order.placed")]).await;
    let wanted = append(&store, "invoice-1", vec![event("invoice.sent")]).await;
    append(&store, "order-2", vec![event("order.placed")]).await;
    let mut recorder = Recorder::default();
    Subscription::new("invoices", store.clone())
        .filter(EventFilter::all().with_categories(["invoice"]))
        .catch_up(&mut recorder)
        .await
        .unwrap();
    assert_eq!(ids(&recorder.seen), wanted);
    assert_eq!(
        recorder.calls, 1,
        "other categories never reach the handler"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_live_subscription_sees_every_concurrent_write_exactly_once_in_order() {
    const WRITERS: usize = 8;
    const BATCHES: usize = 40;
    let store = InMemoryStore::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut subscription = Subscription::new("live", store.clone())
        .batch_size(7)
        .idle_backoff(Duration::from_millis(1), Duration::from_millis(5));
    let reader = tokio::spawn(async move {
        let mut recorder = Recorder {
            done: Some((WRITERS * BATCHES * 2, tx)),
            ..Recorder::default()
        };
        subscription
            .run(&mut recorder, async {
                stop_rx.await.ok();
            })
            .await
            .unwrap();
        recorder.seen
    });
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut written = Vec::new();
                for _ in 0..BATCHES {
                    written.extend(
                        append(&store, &format!("w-{w}"), vec![event("w.a"), event("w.b")]).await,
                    );
                    tokio::task::yield_now().await;
                }
                written
            })
        })
        .collect();
    let mut written = HashSet::new();
    for writer in writers {
        written.extend(writer.await.unwrap());
    }
    rx.recv()
        .await
        .expect("the subscription reaches every event");
    stop_tx.send(()).unwrap();
    let seen = reader.await.unwrap();
    assert_eq!(seen.len(), written.len());
    assert_eq!(
        seen.iter().map(|e| e.event_id).collect::<HashSet<_>>(),
        written
    );
    assert!(
        seen.windows(2).all(|w| w[0].position < w[1].position),
        "events arrive in log order"
    );
}

#[tokio::test]
async fn a_failing_handler_stops_the_subscription_before_the_event_and_a_restart_resumes_there() {
    let store = InMemoryStore::new();
    let before = append(&store, "a-1", vec![event("a.ok")]).await;
    let poison = append(&store, "a-1", vec![event("a.poison")]).await;
    let after = append(&store, "a-1", vec![event("a.ok")]).await;

    let mut failing = Recorder {
        poison: poison.iter().copied().collect(),
        ..Recorder::default()
    };
    let mut subscription =
        Subscription::new("strict", store.clone()).handler_retries(3, Duration::ZERO);
    let err = subscription.catch_up(&mut failing).await.unwrap_err();
    match &err {
        Error::Handler {
            subscription,
            stream,
            version,
            event_type,
            attempts,
            ..
        } => {
            assert_eq!(subscription, "strict");
            assert_eq!(stream.as_str(), "a-1");
            assert_eq!(version.get(), 2);
            assert_eq!(event_type, "a.poison");
            assert_eq!(*attempts, 3);
        }
        other => panic!("expected a handler error, got {other:?}"),
    }
    assert!(err.to_string().contains("a.poison"), "{err}");
    assert_eq!(ids(&failing.seen), before, "nothing after the poison event");
    assert_eq!(failing.calls, 1 + 3);
    assert!(matches!(
        subscription.status().borrow().state,
        SubscriptionState::Failed(_)
    ));

    // Fixed handler: resumes at the failed event.
    let mut fixed = Recorder::default();
    Subscription::new("strict", store.clone())
        .catch_up(&mut fixed)
        .await
        .unwrap();
    let mut expected = poison.clone();
    expected.extend(after);
    assert_eq!(ids(&fixed.seen), expected);
}

#[tokio::test]
async fn poison_events_are_parked_and_can_be_retried_after_a_fix() {
    let store = InMemoryStore::new();
    append(&store, "a-1", vec![event("a.ok")]).await;
    let poison = append(&store, "a-1", vec![event("a.poison")]).await;
    append(&store, "a-1", vec![event("a.ok")]).await;

    let mut recorder = Recorder {
        poison: poison.iter().copied().collect(),
        ..Recorder::default()
    };
    let mut subscription = Subscription::new("lenient", store.clone())
        .handler_retries(2, Duration::ZERO)
        .park_failures();
    let reached = subscription.catch_up(&mut recorder).await.unwrap();
    assert_eq!(
        reached,
        store.head(),
        "the subscription went on past the poison event"
    );
    assert_eq!(recorder.seen.len(), 2);
    assert_eq!(subscription.status().borrow().parked, 1);

    let parked = store.parked("lenient").await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].event.event_id, poison[0]);
    assert_eq!(parked[0].attempts, 2);
    assert!(
        parked[0].error.contains("cannot handle a.poison"),
        "{}",
        parked[0].error
    );
    assert!(store.parked("other").await.unwrap().is_empty());

    // After the fix: take it back and hand it to the handler.
    recorder.poison.clear();
    let retried = store
        .unpark("lenient", poison[0])
        .await
        .unwrap()
        .expect("parked");
    recorder.handle(&retried.event).await.unwrap();
    assert_eq!(recorder.seen.len(), 3);
    assert!(store.parked("lenient").await.unwrap().is_empty());
    assert!(store.unpark("lenient", poison[0]).await.unwrap().is_none());
}

#[tokio::test]
async fn run_stops_on_shutdown_and_reports_stopped() {
    let store = InMemoryStore::new();
    append(&store, "a-1", vec![event("a.x")]).await;
    let mut subscription = Subscription::new("stopper", store.clone());
    let mut recorder = Recorder::default();
    let position = subscription
        .run(&mut recorder, std::future::ready(()))
        .await
        .unwrap();
    // Shutdown was already requested: `run` checks it first and handles nothing.
    assert_eq!(position, LogPosition::START);
    assert!(recorder.seen.is_empty());
    assert_eq!(
        subscription.status().borrow().state,
        SubscriptionState::Stopped
    );
}

/// Fails the first `failures` global-log reads with `error`, then reads normally.
#[derive(Clone)]
struct Flaky {
    inner: InMemoryStore,
    failures: Arc<std::sync::atomic::AtomicUsize>,
    permanent: bool,
}

impl EventStore for Flaky {
    async fn append(&self, request: factum::AppendRequest) -> Result<factum::AppendResult, Error> {
        self.inner.append(request).await
    }

    async fn idempotency_outcome(
        &self,
        key: &factum::IdempotencyKey,
    ) -> Result<Option<factum::AppendResult>, Error> {
        self.inner.idempotency_outcome(key).await
    }

    fn read_stream<'a>(
        &'a self,
        stream: &'a StreamId,
        after: factum::StreamVersion,
    ) -> factum::EventStream<'a> {
        self.inner.read_stream(stream, after)
    }

    async fn read_all(
        &self,
        after: LogPosition,
        limit: usize,
        filter: &EventFilter,
    ) -> Result<Vec<RecordedEvent>, Error> {
        use std::sync::atomic::Ordering;
        let failing = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        match (failing, self.permanent) {
            (true, false) => Err(Error::transient("read all", "connection reset")),
            (true, true) => Err(Error::permanent("read all", "permission denied")),
            (false, _) => self.inner.read_all(after, limit, filter).await,
        }
    }
}

impl CheckpointStore for Flaky {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<LogPosition>, Error> {
        self.inner.load_checkpoint(name).await
    }

    async fn save_checkpoint(&self, name: &str, position: LogPosition) -> Result<(), Error> {
        self.inner.save_checkpoint(name, position).await
    }
}

impl DeadLetterStore for Flaky {
    async fn park(&self, parked: factum::subscription::ParkedEvent) -> Result<(), Error> {
        self.inner.park(parked).await
    }

    async fn parked(
        &self,
        subscription: &str,
    ) -> Result<Vec<factum::subscription::ParkedEvent>, Error> {
        self.inner.parked(subscription).await
    }

    async fn unpark(
        &self,
        subscription: &str,
        event_id: EventId,
    ) -> Result<Option<factum::subscription::ParkedEvent>, Error> {
        self.inner.unpark(subscription, event_id).await
    }
}

#[tokio::test]
async fn run_waits_out_transient_store_failures_and_stops_on_permanent_ones() {
    let store = InMemoryStore::new();
    let expected = append(&store, "a-1", vec![event("a.x"), event("a.y")]).await;
    let flaky = Flaky {
        inner: store.clone(),
        failures: Arc::new(2.into()),
        permanent: false,
    };
    let mut subscription = Subscription::new("flaky", flaky.clone());
    let mut status = subscription.status();
    let (tx, mut done) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn({
        async move {
            let mut recorder = Recorder {
                done: Some((2, tx)),
                ..Recorder::default()
            };
            let stop = async {
                let _ = done.recv().await;
            };
            let reached = subscription.run(&mut recorder, stop).await;
            (reached, recorder.seen, subscription)
        }
    });
    status
        .wait_for(|s| matches!(s.state, SubscriptionState::Retrying(_)))
        .await
        .expect("reports that it is retrying");
    let (reached, seen, _) = task.await.expect("task");
    assert_eq!(reached.expect("not failed"), store.head());
    assert_eq!(ids(&seen), expected, "every event once, in order");

    let broken = Flaky {
        inner: store.clone(),
        failures: Arc::new(1.into()),
        permanent: true,
    };
    let mut subscription = Subscription::new("broken", broken);
    let mut recorder = Recorder::default();
    let error = subscription
        .run(&mut recorder, std::future::pending::<()>())
        .await
        .expect_err("a permanent failure stops it");
    assert!(!error.is_transient());
    assert!(matches!(
        subscription.status().borrow().state,
        SubscriptionState::Failed(_)
    ));
}

mod projections {
    use super::*;
    use factum::subscription::Projector;
    use factum::{DecodeError, EncodeError, Envelope, Event, Projection};

    #[derive(Debug, serde::Serialize, serde::Deserialize)]
    struct Deposited {
        amount: u64,
    }

    impl Event for Deposited {
        fn event_type(&self) -> &'static str {
            "account.deposited"
        }
        fn schema_version(&self) -> u32 {
            1
        }
        fn event_types() -> &'static [&'static str] {
            &["account.deposited"]
        }
        fn encode(&self) -> Result<Box<RawValue>, EncodeError> {
            factum::encode_json(self)
        }
        fn decode(stored: &factum::Stored<'_>) -> Result<Self, DecodeError> {
            let (t, v, payload) = (stored.event_type, stored.schema_version, stored.payload);
            match (t, v) {
                ("account.deposited", 1) => factum::decode_json(payload),
                _ => Err(DecodeError::unknown(t, v)),
            }
        }
    }

    #[derive(Default)]
    struct Total(u64);

    impl Projection for Total {
        const NAME: &'static str = "total";
        type Event = Deposited;
        fn apply(&mut self, event: &Envelope<Deposited>) -> Result<(), BoxError> {
            self.0 += event.event.amount;
            Ok(())
        }
    }

    fn deposit(json: &str) -> NewEvent {
        NewEvent {
            payload: RawValue::from_string(json.to_owned()).unwrap(),
            ..event("account.deposited")
        }
    }

    #[tokio::test]
    async fn a_projection_reads_only_its_events_and_checkpoints_under_its_name() {
        let store = InMemoryStore::new();
        append(
            &store,
            "account-1",
            vec![deposit(r#"{"amount":5}"#), event("account.opened")],
        )
        .await;
        append(&store, "account-2", vec![deposit(r#"{"amount":7}"#)]).await;
        let mut projector = Projector::new(Total::default());
        Subscription::for_projection::<Total>(store.clone())
            .catch_up(&mut projector)
            .await
            .unwrap();
        assert_eq!(projector.get().0, 12);
        assert_eq!(
            store.load_checkpoint("total").await.unwrap(),
            Some(store.head())
        );
    }

    /// `Total`, declaring the events registered in its category.
    #[derive(Default)]
    struct StrictTotal(u64);

    impl Projection for StrictTotal {
        const NAME: &'static str = "strict-total";
        type Event = Deposited;
        fn known_events() -> Option<factum::subscription::KnownEvents> {
            Some(
                factum::subscription::KnownEvents::new()
                    .category("account", ["account.deposited", "account.opened"]),
            )
        }
        fn apply(&mut self, event: &Envelope<Deposited>) -> Result<(), BoxError> {
            self.0 += event.event.amount;
            Ok(())
        }
    }

    #[tokio::test]
    async fn an_event_of_a_type_nothing_registers_stops_the_projection_or_is_parked() {
        let store = InMemoryStore::new();
        append(
            &store,
            "account-1",
            vec![deposit(r#"{"amount":5}"#), event("account.opened")],
        )
        .await;
        // A typo in a stored type: a type filter would never read it.
        let typo = append(&store, "account-1", vec![event("account.depositd")]).await;
        append(&store, "account-1", vec![deposit(r#"{"amount":1}"#)]).await;
        let mut projector = Projector::new(StrictTotal::default());
        let err = Subscription::for_projection::<StrictTotal>(store.clone())
            .handler_retries(1, Duration::ZERO)
            .catch_up(&mut projector)
            .await
            .unwrap_err();
        match &err {
            Error::Handler {
                stream,
                version,
                event_type,
                event_id,
                ..
            } => {
                assert_eq!(stream.as_str(), "account-1");
                assert_eq!(version.get(), 3);
                assert_eq!(event_type, "account.depositd");
                assert_eq!(*event_id, typo[0]);
            }
            other => panic!("expected a handler error, got {other:?}"),
        }
        assert_eq!(projector.get().0, 5, "nothing after the unknown event");

        let mut projector = Projector::new(StrictTotal::default());
        Subscription::for_projection::<StrictTotal>(store.clone())
            .handler_retries(1, Duration::ZERO)
            .park_failures()
            .catch_up(&mut projector)
            .await
            .unwrap();
        assert_eq!(
            projector.get().0,
            1,
            "resumed at the unknown event, parked it, went on"
        );
        let parked = store.parked("strict-total").await.unwrap();
        assert_eq!(parked.len(), 1);
        assert!(
            parked[0].error.contains("no registered event type"),
            "{}",
            parked[0].error
        );
    }

    #[tokio::test]
    async fn an_undecodable_event_stops_the_projection_naming_the_event() {
        let store = InMemoryStore::new();
        append(&store, "account-1", vec![deposit(r#"{"amount":5}"#)]).await;
        append(&store, "account-1", vec![deposit(r#"{"amount":"lots"}"#)]).await;
        append(&store, "account-1", vec![deposit(r#"{"amount":1}"#)]).await;
        let mut projector = Projector::new(Total::default());
        let err = Subscription::for_projection::<Total>(store.clone())
            .handler_retries(1, Duration::ZERO)
            .catch_up(&mut projector)
            .await
            .unwrap_err();
        assert_eq!(
            projector.get().0,
            5,
            "nothing after the bad event is applied"
        );
        let text = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(
            text.contains("account-1") && text.contains("version 2"),
            "{text}"
        );
        assert!(text.contains("account.deposited"), "{text}");
    }
}

/// Reads the subscription's status each time it handles an event.
struct StatusProbe {
    status: tokio::sync::watch::Receiver<factum::subscription::SubscriptionStatus>,
    seen: Vec<factum::subscription::SubscriptionStatus>,
}

impl EventHandler for StatusProbe {
    async fn handle(&mut self, _event: &RecordedEvent) -> Result<(), BoxError> {
        self.seen.push(self.status.borrow().clone());
        Ok(())
    }
}

#[tokio::test]
async fn the_status_reports_the_head_and_the_lag_while_behind_and_none_once_caught_up() {
    let store = InMemoryStore::new();
    for _ in 0..5 {
        append(&store, "a-1", vec![event("a.x"), event("a.y")]).await;
    }
    let head = store.head();
    let mut subscription = Subscription::new("lag", store.clone())
        .batch_size(3)
        .track_head(true);
    let mut probe = StatusProbe {
        status: subscription.status(),
        seen: Vec::new(),
    };
    subscription.catch_up(&mut probe).await.unwrap();

    // While behind: the head is known, and the lag in events shrinks batch by batch.
    let first = &probe.seen[0];
    assert_eq!(first.state, SubscriptionState::CatchingUp);
    assert_eq!(first.head, head);
    assert_eq!(first.lag_events, 10);
    let lags: Vec<u64> = probe.seen.iter().step_by(3).map(|s| s.lag_events).collect();
    assert_eq!(lags, [10, 7, 4, 1]);
    assert!(probe.seen[3].last_event_at.is_some());

    // Caught up: no lag, the head is where it stands.
    let done = subscription.status().borrow().clone();
    assert_eq!(done.state, SubscriptionState::Live);
    assert_eq!(done.position, head);
    assert_eq!(done.head, head);
    assert_eq!(done.lag_events, 0);
    assert_eq!(done.lag, Duration::ZERO);
    assert_eq!(done.handled, 10);
}

/// Fails the first `failures` checkpoint saves with a transient error.
#[derive(Clone)]
struct FlakyCheckpoints {
    inner: InMemoryStore,
    failures: Arc<std::sync::atomic::AtomicUsize>,
}

impl EventStore for FlakyCheckpoints {
    async fn append(&self, request: factum::AppendRequest) -> Result<factum::AppendResult, Error> {
        self.inner.append(request).await
    }

    async fn idempotency_outcome(
        &self,
        key: &factum::IdempotencyKey,
    ) -> Result<Option<factum::AppendResult>, Error> {
        self.inner.idempotency_outcome(key).await
    }

    fn read_stream<'a>(
        &'a self,
        stream: &'a StreamId,
        after: factum::StreamVersion,
    ) -> factum::EventStream<'a> {
        self.inner.read_stream(stream, after)
    }

    async fn read_all(
        &self,
        after: LogPosition,
        limit: usize,
        filter: &EventFilter,
    ) -> Result<Vec<RecordedEvent>, Error> {
        self.inner.read_all(after, limit, filter).await
    }
}

impl CheckpointStore for FlakyCheckpoints {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<LogPosition>, Error> {
        self.inner.load_checkpoint(name).await
    }

    async fn save_checkpoint(&self, name: &str, position: LogPosition) -> Result<(), Error> {
        use std::sync::atomic::Ordering;
        let failing = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(Error::transient("save checkpoint", "connection reset"));
        }
        self.inner.save_checkpoint(name, position).await
    }
}

impl DeadLetterStore for FlakyCheckpoints {
    async fn park(&self, parked: factum::subscription::ParkedEvent) -> Result<(), Error> {
        self.inner.park(parked).await
    }

    async fn parked(
        &self,
        subscription: &str,
    ) -> Result<Vec<factum::subscription::ParkedEvent>, Error> {
        self.inner.parked(subscription).await
    }

    async fn unpark(
        &self,
        subscription: &str,
        event_id: EventId,
    ) -> Result<Option<factum::subscription::ParkedEvent>, Error> {
        self.inner.unpark(subscription, event_id).await
    }
}

#[tokio::test]
async fn a_requested_start_survives_a_transient_failure_of_its_checkpoint_write() {
    let store = InMemoryStore::new();
    let all = append(&store, "a-1", vec![event("a.x"), event("a.y")]).await;
    store.save_checkpoint("replay", store.head()).await.unwrap();
    let flaky = FlakyCheckpoints {
        inner: store.clone(),
        failures: Arc::new(1.into()),
    };
    let mut recorder = Recorder::default();
    let mut subscription = Subscription::new("replay", flaky).start_from(StartFrom::Beginning);
    let mut status = subscription.status();
    let watcher = tokio::spawn(async move {
        status
            .wait_for(|s| matches!(s.state, SubscriptionState::Retrying(_)))
            .await
            .is_ok()
    });
    subscription.catch_up(&mut recorder).await.unwrap();
    assert!(watcher.await.unwrap(), "the failed write was waited out");
    assert_eq!(
        ids(&recorder.seen),
        all,
        "the replay from the beginning still happened"
    );
}

/// Signals when it starts an event, then waits to be released before finishing it.
struct Slow {
    started: Option<tokio::sync::oneshot::Sender<()>>,
    release: Option<tokio::sync::oneshot::Receiver<()>>,
    finished: Vec<EventId>,
}

impl EventHandler for Slow {
    async fn handle(&mut self, event: &RecordedEvent) -> Result<(), BoxError> {
        if let Some(started) = self.started.take() {
            started.send(()).unwrap();
        }
        if let Some(release) = self.release.take() {
            release.await.unwrap();
        }
        self.finished.push(event.event_id);
        Ok(())
    }
}

#[tokio::test]
async fn shutdown_takes_effect_between_batches_never_inside_a_handler() {
    let store = InMemoryStore::new();
    let first = append(&store, "a-1", vec![event("a.x")]).await;
    append(&store, "a-1", vec![event("a.y")]).await;
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel();
    let mut handler = Slow {
        started: Some(started_tx),
        release: Some(release_rx),
        finished: Vec::new(),
    };
    // Shutdown is requested while the handler is in the middle of the first event (then the
    // handler may go on).
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        started_rx.await.unwrap();
        stop_tx.send(()).unwrap();
        release_tx.send(()).unwrap();
    });
    let shutdown = async move {
        stop_rx.await.unwrap();
    };
    let mut subscription = Subscription::new("graceful", store.clone()).batch_size(1);
    let reached = subscription.run(&mut handler, shutdown).await.unwrap();
    assert_eq!(
        handler.finished, first,
        "the event in progress was finished, and only it"
    );
    let checkpoint = store.load_checkpoint("graceful").await.unwrap();
    assert_eq!(checkpoint, Some(reached), "and checkpointed");
    assert_eq!(
        subscription.status().borrow().state,
        SubscriptionState::Stopped
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_a_lease_one_instance_leads_and_another_takes_over_when_it_loses_it() {
    use factum::subscription::InMemoryLease;
    let store = InMemoryStore::new();
    let leases = InMemoryLease::new();
    // A, once it lost the lease, stands by a long poll before trying again; B tries often.
    let instance = |standby_poll| {
        Subscription::new("leased", store.clone())
            .lease(leases.clone())
            .idle_backoff(Duration::from_millis(1), Duration::from_millis(5))
            .standby_poll(standby_poll)
    };
    let (a_seen_tx, mut a_seen) = tokio::sync::mpsc::unbounded_channel();
    let (b_seen_tx, mut b_seen) = tokio::sync::mpsc::unbounded_channel();
    struct Forward(tokio::sync::mpsc::UnboundedSender<EventId>);
    impl EventHandler for Forward {
        async fn handle(&mut self, event: &RecordedEvent) -> Result<(), BoxError> {
            self.0.send(event.event_id).map_err(|e| e.to_string())?;
            Ok(())
        }
    }
    let mut a = instance(Duration::from_secs(2));
    let mut a_status = a.status();
    let a_task = tokio::spawn(async move {
        a.run(Forward(a_seen_tx), std::future::pending::<()>())
            .await
    });
    a_status
        .wait_for(|s| s.state == SubscriptionState::Live)
        .await
        .unwrap();
    let mut b = instance(Duration::from_millis(5));
    let mut b_status = b.status();
    let b_task = tokio::spawn(async move {
        b.run(Forward(b_seen_tx), std::future::pending::<()>())
            .await
    });
    b_status
        .wait_for(|s| s.state == SubscriptionState::Standby)
        .await
        .unwrap();

    let first = append(&store, "a-1", vec![event("a.x"), event("a.y")]).await;
    for id in &first {
        assert_eq!(
            a_seen.recv().await.as_ref(),
            Some(id),
            "the leader handles it"
        );
    }
    assert!(b_seen.try_recv().is_err(), "the standby handles nothing");

    // The leader loses its lease (as a lost connection would): it stands by, B takes over.
    assert!(leases.revoke("leased"));
    b_status
        .wait_for(|s| s.state == SubscriptionState::Live)
        .await
        .unwrap();
    let second = append(&store, "a-1", vec![event("a.z")]).await;
    assert_eq!(b_seen.recv().await, Some(second[0]));
    a_status
        .wait_for(|s| s.state == SubscriptionState::Standby)
        .await
        .unwrap();
    assert!(
        a_seen.try_recv().is_err(),
        "the old leader handles nothing more"
    );
    for task in [a_task, b_task] {
        task.abort();
        let _ = task.await;
    }
}

#[tokio::test]
async fn checkpoint_and_dead_letter_stores_work_through_arc_and_dyn() {
    use factum::subscription::{DynCheckpointStore, DynDeadLetterStore};
    let store = InMemoryStore::new();
    let checkpoints: Arc<dyn DynCheckpointStore> = Arc::new(store.clone());
    let position = LogPosition::new(3, factum::GlobalPosition::new(7));
    checkpoints.save_checkpoint("dyn", position).await.unwrap();
    assert_eq!(
        checkpoints.load_checkpoint("dyn").await.unwrap(),
        Some(position)
    );
    let letters: Arc<dyn DynDeadLetterStore> = Arc::new(store.clone());
    assert!(letters.parked("dyn").await.unwrap().is_empty());
    // The resilient wrapper forwards both.
    let resilient = factum::resilience::Resilient::new("memory", store.clone());
    assert_eq!(
        resilient.load_checkpoint("dyn").await.unwrap(),
        Some(position)
    );
    assert!(resilient.parked("dyn").await.unwrap().is_empty());
}
