//! Tests of `Resilient` over the in-memory store, with faults injected by a wrapper defined here.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::TryStreamExt;

use super::*;
use crate::ids::EventId;
use crate::resilience::{
    CircuitBreakerConfig, CircuitState, RetryBudget, RetryPolicies, RetryPolicy,
};
use crate::{AppendRequest, ExpectedVersion, InMemoryStore, NewEvent};

/// What the next call to the faulty store does.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// Append for real, then report the connection lost: an unknown outcome that did land.
    UnknownAfterAppend,
    /// Report an unknown outcome without appending: one that did not land.
    UnknownWithoutAppend,
    /// Fail transiently without touching the store.
    Transient,
}

/// An in-memory store whose next calls fail as scripted, and that records the event ids of
/// every append attempt.
#[derive(Default)]
struct Faulty {
    store: InMemoryStore,
    faults: Mutex<VecDeque<Fault>>,
    /// The events after which a stream read fails once, transiently.
    read_fails_after: Mutex<Option<usize>>,
    /// While true, every call fails transiently.
    down: Mutex<bool>,
    attempts: Mutex<Vec<Vec<EventId>>>,
}

impl Faulty {
    fn failing(faults: impl IntoIterator<Item = Fault>) -> Self {
        let faulty = Self::default();
        faulty.faults.lock().expect("lock").extend(faults);
        faulty
    }

    fn next_fault(&self) -> Option<Fault> {
        if *self.down.lock().expect("lock") {
            return Some(Fault::Transient);
        }
        self.faults.lock().expect("lock").pop_front()
    }

    fn attempts(&self) -> Vec<Vec<EventId>> {
        self.attempts.lock().expect("lock").clone()
    }
}

fn lost(stream: &StreamId) -> Error {
    Error::UnknownOutcome {
        operation: "append",
        stream: stream.clone(),
        source: "connection reset by peer after COMMIT was sent".into(),
    }
}

impl EventStore for Faulty {
    async fn append(&self, request: AppendRequest) -> Result<AppendResult, Error> {
        self.attempts
            .lock()
            .expect("lock")
            .push(request.events.iter().map(|e| e.event_id).collect());
        let stream = request.stream.clone();
        match self.next_fault() {
            Some(Fault::UnknownAfterAppend) => {
                self.store.append(request).await?;
                Err(lost(&stream))
            }
            Some(Fault::UnknownWithoutAppend) => Err(lost(&stream)),
            Some(Fault::Transient) => Err(Error::transient("append", "connection refused")),
            None => self.store.append(request).await,
        }
    }

    async fn idempotency_outcome(
        &self,
        key: &crate::IdempotencyKey,
    ) -> Result<Option<AppendResult>, Error> {
        self.store.idempotency_outcome(key).await
    }

    fn read_stream<'a>(&'a self, stream: &'a StreamId, after: StreamVersion) -> EventStream<'a> {
        if self.next_fault().is_some() {
            let error = Error::transient("read", "connection refused");
            return Box::pin(futures_util::stream::iter([Err(error)]));
        }
        let inner = self.store.read_stream(stream, after);
        match self.read_fails_after.lock().expect("lock").take() {
            None => inner,
            Some(n) => Box::pin(inner.take(n).chain(futures_util::stream::iter([Err(
                Error::transient("read", "connection reset mid-stream"),
            )]))),
        }
    }

    async fn read_all(
        &self,
        after: LogPosition,
        limit: usize,
        filter: &EventFilter,
    ) -> Result<Vec<RecordedEvent>, Error> {
        if self.next_fault().is_some() {
            return Err(Error::transient("read", "connection refused"));
        }
        self.store.read_all(after, limit, filter).await
    }
}

fn event(n: u32) -> NewEvent {
    NewEvent {
        event_id: EventId::new(),
        event_type: "account.deposited".into(),
        schema_version: 1,
        payload: serde_json::value::to_raw_value(&serde_json::json!({ "n": n }))
            .expect("serialises"),
        metadata: Default::default(),
    }
}

fn stream() -> StreamId {
    StreamId::new("account-1").expect("valid stream id")
}

fn resilient(faulty: Faulty) -> Resilient<Faulty> {
    resilient_opening_after(faulty, 3)
}

fn resilient_opening_after(faulty: Faulty, consecutive_failures: u32) -> Resilient<Faulty> {
    let resilience = Resilience::new("memory")
        .with_policies(RetryPolicies::uniform(
            RetryPolicy::new()
                .with_max_attempts(4)
                .with_max_elapsed(None),
        ))
        .with_budget(RetryBudget::unlimited())
        .with_breaker_config(CircuitBreakerConfig {
            consecutive_failures,
            cool_down: Duration::from_secs(5),
            ..CircuitBreakerConfig::default()
        });
    Resilient::with_resilience(faulty, resilience)
}

async fn stored(store: &Resilient<Faulty>) -> Vec<EventId> {
    store
        .inner()
        .store
        .read_stream(&stream(), StreamVersion::INITIAL)
        .map_ok(|e| e.event_id)
        .try_collect()
        .await
        .expect("reads")
}

#[tokio::test(start_paused = true)]
async fn an_unknown_outcome_is_settled_by_reappending_the_same_ids_once() {
    let store = resilient(Faulty::failing([
        Fault::UnknownAfterAppend,
        Fault::UnknownAfterAppend,
    ]));
    let batch = vec![event(1), event(2), event(3)];
    let ids: Vec<EventId> = batch.iter().map(|e| e.event_id).collect();

    let result = store
        .append(
            AppendRequest::new(stream().clone(), batch).expected_version(ExpectedVersion::NoStream),
        )
        .await
        .expect("the re-append settles it");

    // The first attempt landed; the later ones were recognised as re-appends.
    assert!(result.duplicate);
    assert_eq!(result.stream_version, StreamVersion::new(3));
    let attempts = store.inner().attempts();
    assert_eq!(attempts.len(), 3);
    assert!(
        attempts.iter().all(|a| a == &ids),
        "every attempt carries the same ids"
    );
    assert_eq!(stored(&store).await, ids, "exactly one copy stored");
    assert_eq!(store.inner().store.len(), 3);
}

#[tokio::test(start_paused = true)]
async fn an_unknown_outcome_that_did_not_land_is_appended_by_the_retry() {
    let store = resilient(Faulty::failing([
        Fault::UnknownWithoutAppend,
        Fault::Transient,
    ]));
    let batch = vec![event(1)];
    let ids: Vec<EventId> = batch.iter().map(|e| e.event_id).collect();
    let result = store
        .append(
            AppendRequest::new(stream().clone(), batch).expected_version(ExpectedVersion::NoStream),
        )
        .await
        .expect("appended on the third attempt");
    assert!(!result.duplicate);
    assert_eq!(store.inner().attempts().len(), 3);
    assert_eq!(stored(&store).await, ids);
}

#[tokio::test(start_paused = true)]
async fn an_append_whose_outcome_stays_unknown_says_so() {
    let store = resilient_opening_after(
        Faulty::failing([
            Fault::UnknownAfterAppend,
            Fault::Transient,
            Fault::Transient,
            Fault::Transient,
        ]),
        100,
    );
    let error = store
        .append(
            AppendRequest::new(stream().clone(), vec![event(1)])
                .expected_version(ExpectedVersion::NoStream),
        )
        .await
        .expect_err("never settled");
    assert_eq!(error.kind(), ErrorKind::UnknownOutcome, "{error}");
    let chain = crate::error_chain(&error);
    assert!(
        !chain.contains("nothing was stored"),
        "an unknown outcome must not say nothing was stored: {chain}"
    );
    // It had landed: re-appending the same batch later finds it, once.
    assert_eq!(store.inner().store.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn conflicts_are_not_retried() {
    let store = resilient(Faulty::default());
    store
        .append(
            AppendRequest::new(stream().clone(), vec![event(1)])
                .expected_version(ExpectedVersion::NoStream),
        )
        .await
        .expect("first append");
    let error = store
        .append(
            AppendRequest::new(stream().clone(), vec![event(2)])
                .expected_version(ExpectedVersion::NoStream),
        )
        .await
        .expect_err("conflict");
    assert!(error.is_conflict());
    assert_eq!(store.inner().attempts().len(), 2, "one attempt each");
    assert_eq!(store.resilience().breaker().state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_stream_read_resumes_after_the_last_event_it_returned() {
    let store = resilient(Faulty::default());
    let batch: Vec<NewEvent> = (1..=5).map(event).collect();
    let ids: Vec<EventId> = batch.iter().map(|e| e.event_id).collect();
    store
        .append(
            AppendRequest::new(stream().clone(), batch).expected_version(ExpectedVersion::NoStream),
        )
        .await
        .expect("append");
    *store.inner().read_fails_after.lock().expect("lock") = Some(2);
    store
        .inner()
        .faults
        .lock()
        .expect("lock")
        .push_back(Fault::Transient);

    let read: Vec<EventId> = store
        .read_stream(&stream(), StreamVersion::INITIAL)
        .map_ok(|e| e.event_id)
        .try_collect()
        .await
        .expect("the read recovers");
    assert_eq!(read, ids, "every event once, in order");

    // Payload reads (what aggregate loads use) recover the same way.
    *store.inner().read_fails_after.lock().expect("lock") = Some(2);
    store
        .inner()
        .faults
        .lock()
        .expect("lock")
        .push_back(Fault::Transient);
    let versions: Vec<u64> = store
        .read_stream_payloads(&stream(), StreamVersion::INITIAL)
        .map_ok(|e| e.stream_version.get())
        .try_collect()
        .await
        .expect("the payload read recovers");
    assert_eq!(versions, [1, 2, 3, 4, 5], "every event once, in order");

    // From a later version too.
    let tail: Vec<EventId> = store
        .read_stream(&stream(), StreamVersion::new(3))
        .map_ok(|e| e.event_id)
        .try_collect()
        .await
        .expect("reads");
    assert_eq!(tail, ids[3..]);
}

#[tokio::test(start_paused = true)]
async fn a_stream_read_gives_up_after_its_attempts() {
    let store = resilient_opening_after(Faulty::failing([Fault::Transient; 4]), 100);
    let result: Result<Vec<RecordedEvent>, Error> = store
        .read_stream(&stream(), StreamVersion::INITIAL)
        .try_collect()
        .await;
    assert_eq!(result.expect_err("gives up").kind(), ErrorKind::Transient);
}

#[tokio::test(start_paused = true)]
async fn read_all_is_retried() {
    let store = resilient(Faulty::failing([Fault::Transient, Fault::Transient]));
    let events = store
        .read_all(LogPosition::START, 10, &EventFilter::all())
        .await
        .expect("third attempt");
    assert!(events.is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_breaker_opens_while_the_store_is_down_and_closes_after() {
    let store = resilient(Faulty::default());
    *store.inner().down.lock().expect("lock") = true;

    // 3 failed attempts open the circuit; the 4th is refused without reaching the store.
    let error = store
        .append(AppendRequest::new(stream().clone(), vec![event(1)]))
        .await
        .expect_err("down");
    assert_eq!(error.kind(), ErrorKind::Unavailable, "{error}");
    assert_eq!(store.inner().attempts().len(), 3);
    let health = store.resilience().health();
    assert!(health.circuit_open);

    // While open, calls fail fast and the store sees nothing.
    let error = store
        .read_all(LogPosition::START, 10, &EventFilter::all())
        .await
        .expect_err("fails fast");
    assert!(matches!(
        error,
        Error::Unavailable {
            dependency: "memory",
            ..
        }
    ));

    // The store comes back; after the cool-down the trial call closes the circuit.
    *store.inner().down.lock().expect("lock") = false;
    tokio::time::advance(health.retry_after.expect("open")).await;
    let batch = vec![event(2)];
    let ids: Vec<EventId> = batch.iter().map(|e| e.event_id).collect();
    store
        .append(AppendRequest::new(stream().clone(), batch))
        .await
        .expect("the trial succeeds");
    assert_eq!(store.resilience().breaker().state(), CircuitState::Closed);
    assert_eq!(
        stored(&store).await,
        ids,
        "nothing from the failed attempts"
    );
}

#[tokio::test(start_paused = true)]
async fn snapshots_pass_through() {
    let store = Resilient::new("memory", InMemoryStore::new());
    let snapshot = StoredSnapshot {
        stream_id: stream(),
        stream_version: StreamVersion::new(4),
        schema_version: 1,
        state: serde_json::value::to_raw_value(&serde_json::json!({ "balance": 10 }))
            .expect("serialises"),
        taken_at: chrono::Utc::now(),
    };
    store.save_snapshot(snapshot).await.expect("saves");
    let loaded = store
        .load_snapshot(&stream())
        .await
        .expect("loads")
        .expect("present");
    assert_eq!(loaded.stream_version, StreamVersion::new(4));
}
