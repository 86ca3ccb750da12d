//! The backend conformance suite: one set of checks every factum backend must pass.
//!
//! Each check is a public async function taking a fresh, empty store, so it can be called from
//! any test harness; [`conformance_tests!`](crate::conformance_tests) generates one `#[test]` per
//! check for a store factory:
//!
//! ```
//! // In tests/conformance.rs of a backend crate:
//! factum_testkit::conformance_tests!(|| async { factum::InMemoryStore::new() });
//! ```
//!
//! The factory is called once per check and must return a store that is empty and isolated from
//! other checks (checks run in parallel). A backend that needs a resource to outlive the check (a
//! throwaway database) can return a store that owns it.
//!
//! The checks cover the guarantees of [`EventStore`] and [`SnapshotStore`] and, through a
//! [`Repository`], the executor's behaviour on top of them: atomic batches, expected-version
//! conflicts under real concurrency, idempotent re-append, one total global order, stream reads
//! from a version, source filters, metadata round trips, snapshots, conflict retries, rejected
//! commands storing nothing, correlation/causation flow, and undecodable events.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use factum::{
    Aggregate, AppendRequest, AppendResult, Command, CommandContext, CorrelationId, DecodeError,
    EncodeError, Error, Event, EventFilter, EventId, EventMetadata, EventPayload, EventStore,
    EventStream, ExpectedVersion, IdempotencyKey, LogPosition, Metadata, NewEvent, RawValue,
    RecordedEvent, Repository, Snapshot, SnapshotPolicy, SnapshotStore, StoredSnapshot, StreamId,
    StreamVersion,
};
use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};

/// What a backend under test must be: an event store and a snapshot store that can be shared.
pub trait Backend: EventStore + SnapshotStore + Clone + 'static {}
impl<T: EventStore + SnapshotStore + Clone + 'static> Backend for T {}

/// Generates one `#[test]` per conformance check, each running on a fresh store from `$factory`
/// (an expression evaluating to a closure that returns a future of the store).
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr) => {
        $crate::__conformance_tests!(
            $factory;
            appends_and_reads_a_stream,
            reads_a_stream_after_a_version,
            missing_stream_reads_empty,
            expected_version_is_enforced,
            conflicting_batch_stores_nothing,
            concurrent_writers_exactly_one_wins,
            reappending_stored_ids_is_idempotent,
            partially_stored_batch_is_rejected,
            id_stored_in_another_stream_is_rejected,
            invalid_batches_are_rejected,
            global_log_is_total_and_in_append_order,
            global_log_pages_resume_after_a_position,
            global_log_filters_at_the_source,
            head_is_the_last_readable_position,
            payload_and_metadata_round_trip,
            snapshots_keep_the_latest,
            repository_retries_after_losing_a_race,
            repository_concurrent_commands_all_apply,
            rejected_command_stores_nothing,
            correlation_and_causation_reach_every_event,
            undecodable_event_fails_the_command_and_stores_nothing,
            repository_uses_and_validates_snapshots,
            payload_reads_match_stream_reads,
            position_at_finds_where_a_replay_from_a_time_starts,
            keyed_append_repeat_returns_the_original_outcome,
            keyed_append_reused_for_another_batch_is_rejected,
            concurrent_repeats_of_a_keyed_append_store_one_batch,
            repository_executes_a_command_once_per_idempotency_key,
            repository_concurrent_executions_of_one_command_store_it_once,
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_tests {
    ($factory:expr; $($check:ident),* $(,)?) => {
        $(
            #[test]
            fn $check() {
                $crate::conformance::runtime().block_on(async {
                    let store = ($factory)().await;
                    $crate::conformance::$check(store).await;
                });
            }
        )*
    };
}

/// The runtime each generated check runs on: multi-threaded, so concurrency checks race for real.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("building a tokio runtime for a conformance check")
}

// ---------------------------------------------------------------------------------------------
// A small domain for the checks: counters that go up.

/// A counter: the aggregate the executor checks use.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counter {
    /// The sum of all increments.
    pub value: u64,
    /// How many increments were applied.
    pub increments: u64,
}

/// Adds `by` to counter `id`.
#[derive(Clone, Debug)]
pub struct Increment {
    /// The counter's id.
    pub id: String,
    /// How much to add; 0 is rejected.
    pub by: u64,
}

/// A counter went up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incremented {
    /// By how much.
    pub by: u64,
}

/// Why an increment was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CounterError {
    /// An increment of 0.
    #[error("increments must be positive")]
    ZeroIncrement,
    /// An increment that would take the counter past [`Counter::CAP`].
    #[error("a counter never passes {}", Counter::CAP)]
    AboveCap,
}

impl Counter {
    /// The highest value a counter reaches.
    pub const CAP: u64 = 1_000_000;
}

const INCREMENTED: &str = "counter.incremented";

impl Command for Increment {
    fn command_name(&self) -> &'static str {
        "Increment"
    }
    fn aggregate_id(&self) -> String {
        self.id.clone()
    }
}

impl Event for Incremented {
    fn event_type(&self) -> &'static str {
        INCREMENTED
    }
    fn schema_version(&self) -> u32 {
        1
    }
    fn event_types() -> &'static [&'static str] {
        &[INCREMENTED]
    }
    fn encode(&self) -> Result<Box<RawValue>, EncodeError> {
        factum::encode_json(self)
    }
    fn decode(stored: &factum::Stored<'_>) -> Result<Self, DecodeError> {
        let (event_type, version, payload) =
            (stored.event_type, stored.schema_version, stored.payload);
        match (event_type, version) {
            (INCREMENTED, 1) => factum::decode_json(payload),
            _ => Err(DecodeError::unknown(event_type, version)),
        }
    }
}

impl Aggregate for Counter {
    const TYPE: &'static str = "counter";
    type Command = Increment;
    type Event = Incremented;
    type Error = CounterError;

    fn decide(&self, command: &Increment) -> Result<Vec<Incremented>, CounterError> {
        if command.by == 0 {
            return Err(CounterError::ZeroIncrement);
        }
        if self.value.saturating_add(command.by) > Self::CAP {
            return Err(CounterError::AboveCap);
        }
        Ok(vec![Incremented { by: command.by }])
    }

    fn evolve(&mut self, event: &Incremented) {
        self.value += event.by;
        self.increments += 1;
    }
}

impl Snapshot for Counter {
    const SNAPSHOT_VERSION: u32 = 1;
}

// ---------------------------------------------------------------------------------------------
// Helpers.

fn stream(id: &str) -> StreamId {
    StreamId::new(id).expect("valid stream id")
}

/// A raw event with a JSON payload `{"n": n}`.
fn event(n: u64) -> NewEvent {
    raw_event("test.happened", 1, &format!(r#"{{"n":{n}}}"#))
}

fn raw_event(event_type: &str, version: u32, json: &str) -> NewEvent {
    NewEvent {
        event_id: EventId::new(),
        event_type: event_type.to_owned(),
        schema_version: version,
        payload: RawValue::from_string(json.to_owned()).expect("valid JSON"),
        metadata: EventMetadata::default(),
    }
}

async fn read<S: EventStore>(store: &S, id: &StreamId, after: u64) -> Vec<RecordedEvent> {
    let events: EventStream<'_> = store.read_stream(id, StreamVersion::new(after));
    events.try_collect().await.expect("reading a stream")
}

async fn read_all<S: EventStore>(store: &S, filter: &EventFilter) -> Vec<RecordedEvent> {
    let mut all = Vec::new();
    let mut after = LogPosition::START;
    loop {
        let page = store
            .read_all(after, 100, filter)
            .await
            .expect("reading the global log");
        let Some(last) = page.last() else {
            return all;
        };
        after = last.position;
        all.extend(page);
    }
}

fn payloads(events: &[RecordedEvent]) -> Vec<u64> {
    events.iter().map(payload_n).collect()
}

fn payload_n(event: &RecordedEvent) -> u64 {
    let value: serde_json::Value = serde_json::from_str(event.payload.get()).expect("JSON payload");
    value["n"].as_u64().expect("payload has n")
}

fn versions(events: &[RecordedEvent]) -> Vec<u64> {
    events.iter().map(|e| e.stream_version.get()).collect()
}

async fn append<S: EventStore>(
    store: &S,
    id: &StreamId,
    expected: ExpectedVersion,
    events: Vec<NewEvent>,
) -> AppendResult {
    store
        .append(AppendRequest::new(id.clone(), events).expected_version(expected))
        .await
        .expect("append should succeed")
}

// ---------------------------------------------------------------------------------------------
// Event store checks.

/// Events appended in batches read back in order, numbered 1..n, with ascending positions.
pub async fn appends_and_reads_a_stream<S: Backend>(store: S) {
    let id = stream("order-1");
    let first = append(
        &store,
        &id,
        ExpectedVersion::NoStream,
        vec![event(1), event(2)],
    )
    .await;
    assert_eq!(first.stream_version, StreamVersion::new(2));
    assert_eq!(first.positions.len(), 2);
    assert!(!first.duplicate);
    let second = append(
        &store,
        &id,
        ExpectedVersion::Exact(StreamVersion::new(2)),
        vec![event(3)],
    )
    .await;
    assert_eq!(second.stream_version, StreamVersion::new(3));
    assert!(second.positions[0] > first.positions[1]);

    let events = read(&store, &id, 0).await;
    assert_eq!(versions(&events), [1, 2, 3]);
    assert_eq!(events.iter().map(payload_n).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(events.windows(2).all(|w| w[0].position < w[1].position));
    assert!(events.iter().all(|e| e.stream_id == id));
}

/// Reading after version v returns exactly the events numbered above v.
pub async fn reads_a_stream_after_a_version<S: Backend>(store: S) {
    let id = stream("order-1");
    append(
        &store,
        &id,
        ExpectedVersion::Any,
        (1..=5).map(event).collect(),
    )
    .await;
    assert_eq!(versions(&read(&store, &id, 3).await), [4, 5]);
    assert!(read(&store, &id, 5).await.is_empty());
    assert!(read(&store, &id, 9).await.is_empty());
}

/// A stream that was never written reads as empty, not as an error.
pub async fn missing_stream_reads_empty<S: Backend>(store: S) {
    assert!(read(&store, &stream("order-none"), 0).await.is_empty());
}

/// `NoStream`, `Exact` and `Any` accept and refuse exactly what they promise, and a conflict
/// reports the actual version.
pub async fn expected_version_is_enforced<S: Backend>(store: S) {
    let id = stream("order-1");
    append(&store, &id, ExpectedVersion::NoStream, vec![event(1)]).await;

    let conflict = store
        .append(
            AppendRequest::new(id.clone(), vec![event(2)])
                .expected_version(ExpectedVersion::NoStream),
        )
        .await
        .expect_err("NoStream on an existing stream must conflict");
    assert!(conflict.is_conflict(), "{conflict:?}");
    match conflict {
        Error::Conflict { stream, actual, .. } => {
            assert_eq!(stream, id);
            assert_eq!(actual, StreamVersion::new(1));
        }
        other => panic!("expected Error::Conflict, got {other:?}"),
    }

    let stale = store
        .append(
            AppendRequest::new(id.clone(), vec![event(2)])
                .expected_version(ExpectedVersion::Exact(StreamVersion::new(5))),
        )
        .await
        .expect_err("a wrong exact version must conflict");
    assert!(stale.is_conflict(), "{stale:?}");

    let fresh = stream("order-2");
    let zero = store
        .append(
            AppendRequest::new(fresh.clone(), vec![event(1)])
                .expected_version(ExpectedVersion::Exact(StreamVersion::INITIAL)),
        )
        .await
        .expect("Exact(0) on a new stream behaves like NoStream");
    assert_eq!(zero.stream_version, StreamVersion::new(1));
    let missing = store
        .append(
            AppendRequest::new(stream("order-3").clone(), vec![event(1)])
                .expected_version(ExpectedVersion::Exact(StreamVersion::new(1))),
        )
        .await
        .expect_err("Exact(1) on a missing stream must conflict");
    assert!(missing.is_conflict());

    let any = append(&store, &id, ExpectedVersion::Any, vec![event(2)]).await;
    assert_eq!(any.stream_version, StreamVersion::new(2));
    assert_eq!(versions(&read(&store, &id, 0).await), [1, 2]);
}

/// A batch that conflicts stores none of its events, anywhere.
pub async fn conflicting_batch_stores_nothing<S: Backend>(store: S) {
    let id = stream("order-1");
    append(&store, &id, ExpectedVersion::NoStream, vec![event(1)]).await;
    let before = read_all(&store, &EventFilter::all()).await.len();
    let batch: Vec<NewEvent> = (2..=4).map(event).collect();
    let ids: Vec<EventId> = batch.iter().map(|e| e.event_id).collect();
    let err = store
        .append(AppendRequest::new(id.clone(), batch).expected_version(ExpectedVersion::NoStream))
        .await
        .expect_err("must conflict");
    assert!(err.is_conflict());
    let all = read_all(&store, &EventFilter::all()).await;
    assert_eq!(all.len(), before, "a conflicting batch must store nothing");
    assert!(all.iter().all(|e| !ids.contains(&e.event_id)));
    // The ids were not burnt: the same batch appends fine at the right version.
    let retry: Vec<NewEvent> = ids
        .iter()
        .zip(2..)
        .map(|(id, n)| event(n).with_event_id(*id))
        .collect();
    let ok = append(
        &store,
        &id,
        ExpectedVersion::Exact(StreamVersion::new(1)),
        retry,
    )
    .await;
    assert_eq!(ok.stream_version, StreamVersion::new(4));
    assert!(!ok.duplicate);
}

/// Many writers racing on one stream with the same expected version: exactly one wins, the others
/// get conflicts, and the stream holds the winner's batch only.
pub async fn concurrent_writers_exactly_one_wins<S: Backend>(store: S) {
    const WRITERS: usize = 16;
    let id = stream("order-1");
    append(&store, &id, ExpectedVersion::NoStream, vec![event(0)]).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(WRITERS));
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            let id = id.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                let batch = vec![event(100 + w as u64), event(200 + w as u64)];
                barrier.wait().await;
                store
                    .append(
                        AppendRequest::new(id.clone(), batch)
                            .expected_version(ExpectedVersion::Exact(StreamVersion::new(1))),
                    )
                    .await
            })
        })
        .collect();
    let mut winners = Vec::new();
    for (w, task) in tasks.into_iter().enumerate() {
        match task.await.expect("writer task panicked") {
            Ok(result) => winners.push((w, result)),
            Err(e) => assert!(e.is_conflict(), "losers must get a conflict, got {e:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one writer must win");
    let (w, result) = &winners[0];
    assert_eq!(result.stream_version, StreamVersion::new(3));
    let events = read(&store, &id, 0).await;
    assert_eq!(versions(&events), [1, 2, 3]);
    assert_eq!(payload_n(&events[1]), 100 + *w as u64);
    assert_eq!(payload_n(&events[2]), 200 + *w as u64);
    assert_eq!(read_all(&store, &EventFilter::all()).await.len(), 3);
}

/// Re-appending a batch that is already stored stores nothing, whatever the expected version,
/// and reports the original positions.
pub async fn reappending_stored_ids_is_idempotent<S: Backend>(store: S) {
    let id = stream("order-1");
    let batch = vec![event(1), event(2)];
    let first = append(&store, &id, ExpectedVersion::NoStream, batch.clone()).await;
    for expected in [
        ExpectedVersion::NoStream,
        ExpectedVersion::Any,
        ExpectedVersion::Exact(StreamVersion::INITIAL),
        ExpectedVersion::Exact(StreamVersion::new(2)),
    ] {
        let again = store
            .append(AppendRequest::new(id.clone(), batch.clone()).expected_version(expected))
            .await
            .unwrap_or_else(|e| panic!("re-append with {expected} must succeed, got {e:?}"));
        assert!(again.duplicate, "re-append must be flagged duplicate");
        assert_eq!(again.positions, first.positions);
        assert_eq!(again.stream_version, first.stream_version);
    }
    // A suffix of a stored batch is also an exact re-append of those events.
    let tail = store
        .append(AppendRequest::new(id.clone(), vec![batch[1].clone()]))
        .await
        .expect("re-appending the stored second event");
    assert!(tail.duplicate);
    assert_eq!(tail.positions, vec![first.positions[1]]);
    assert_eq!(read(&store, &id, 0).await.len(), 2);
    assert_eq!(read_all(&store, &EventFilter::all()).await.len(), 2);
}

/// A batch mixing stored and new ids is refused whole.
pub async fn partially_stored_batch_is_rejected<S: Backend>(store: S) {
    let id = stream("order-1");
    let stored = event(1);
    append(&store, &id, ExpectedVersion::NoStream, vec![stored.clone()]).await;
    let fresh = event(2);
    let err = store
        .append(AppendRequest::new(
            id.clone(),
            vec![stored.clone(), fresh.clone()],
        ))
        .await
        .expect_err("a partly stored batch must be refused");
    match &err {
        Error::DuplicateEventId {
            event_id,
            existing_stream,
            ..
        } => {
            assert_eq!(*event_id, stored.event_id);
            assert_eq!(existing_stream, &id);
        }
        other => panic!("expected DuplicateEventId, got {other:?}"),
    }
    let events = read(&store, &id, 0).await;
    assert_eq!(events.len(), 1);
    assert!(events.iter().all(|e| e.event_id != fresh.event_id));
}

/// An id already stored in another stream is refused, and nothing is stored.
pub async fn id_stored_in_another_stream_is_rejected<S: Backend>(store: S) {
    let a = stream("order-a");
    let b = stream("order-b");
    let shared = event(1);
    append(&store, &a, ExpectedVersion::NoStream, vec![shared.clone()]).await;
    let err = store
        .append(AppendRequest::new(b.clone(), vec![shared]))
        .await
        .expect_err("an id stored in another stream must be refused");
    match err {
        Error::DuplicateEventId {
            stream,
            existing_stream,
            ..
        } => {
            assert_eq!(stream, b);
            assert_eq!(existing_stream, a);
        }
        other => panic!("expected DuplicateEventId, got {other:?}"),
    }
    assert!(read(&store, &b, 0).await.is_empty());
}

/// Empty batches and batches repeating an id are invalid arguments; nothing is stored.
pub async fn invalid_batches_are_rejected<S: Backend>(store: S) {
    let id = stream("order-1");
    let empty = store
        .append(AppendRequest::new(id.clone(), Vec::new()))
        .await
        .expect_err("an empty batch is invalid");
    assert!(matches!(empty, Error::InvalidArgument(_)), "{empty:?}");
    let once = event(1);
    let twice = store
        .append(AppendRequest::new(id.clone(), vec![once.clone(), once]))
        .await
        .expect_err("a batch repeating an id is invalid");
    assert!(matches!(twice, Error::InvalidArgument(_)), "{twice:?}");
    assert!(read_all(&store, &EventFilter::all()).await.is_empty());
}

/// The global log holds every event once, in the order the appends returned, across streams.
pub async fn global_log_is_total_and_in_append_order<S: Backend>(store: S) {
    let mut appended = Vec::new();
    for round in 0..5u64 {
        for s in ["order-a", "order-b", "order-c"] {
            let id = stream(s);
            let batch = vec![event(round * 10), event(round * 10 + 1)];
            appended.extend(batch.iter().map(|e| e.event_id));
            append(&store, &id, ExpectedVersion::Any, batch).await;
        }
    }
    let all = read_all(&store, &EventFilter::all()).await;
    assert_eq!(
        all.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        appended,
        "the global log must list events in append order"
    );
    assert!(all.windows(2).all(|w| w[0].position < w[1].position));
    assert!(
        all.windows(2)
            .all(|w| w[0].global_position() < w[1].global_position())
    );
}

/// Reading the log in pages of any size, each after the last position seen, yields each event
/// exactly once.
pub async fn global_log_pages_resume_after_a_position<S: Backend>(store: S) {
    let id = stream("order-1");
    append(
        &store,
        &id,
        ExpectedVersion::Any,
        (1..=10).map(event).collect(),
    )
    .await;
    for page_size in [1, 3, 10, 50] {
        let mut seen = Vec::new();
        let mut after = LogPosition::START;
        loop {
            let page = store
                .read_all(after, page_size, &EventFilter::all())
                .await
                .expect("read_all");
            assert!(page.len() <= page_size);
            let Some(last) = page.last() else { break };
            after = last.position;
            seen.extend(page.iter().map(payload_n));
        }
        assert_eq!(seen, (1..=10).collect::<Vec<_>>(), "page size {page_size}");
    }
}

/// Filters by event type and by category return exactly the matching events, in order.
pub async fn global_log_filters_at_the_source<S: Backend>(store: S) {
    append(
        &store,
        &stream("order-1"),
        ExpectedVersion::Any,
        vec![
            raw_event("order.placed", 1, r#"{"n":1}"#),
            raw_event("order.shipped", 1, r#"{"n":2}"#),
        ],
    )
    .await;
    append(
        &store,
        &stream("invoice-1"),
        ExpectedVersion::Any,
        vec![raw_event("invoice.sent", 1, r#"{"n":3}"#)],
    )
    .await;
    append(
        &store,
        &stream("order-2"),
        ExpectedVersion::Any,
        vec![raw_event("order.placed", 1, r#"{"n":4}"#)],
    )
    .await;

    let by_type = read_all(
        &store,
        &EventFilter::all().with_event_types(["order.placed"]),
    )
    .await;
    assert_eq!(by_type.iter().map(payload_n).collect::<Vec<_>>(), [1, 4]);

    let by_category = read_all(&store, &EventFilter::all().with_categories(["invoice"])).await;
    assert_eq!(by_category.iter().map(payload_n).collect::<Vec<_>>(), [3]);

    let both = read_all(
        &store,
        &EventFilter::all()
            .with_categories(["order"])
            .with_event_types(["order.shipped", "invoice.sent"]),
    )
    .await;
    assert_eq!(both.iter().map(payload_n).collect::<Vec<_>>(), [2]);

    // A filtered page still advances: a page of 1 after the only match returns nothing more.
    let first = store
        .read_all(
            LogPosition::START,
            1,
            &EventFilter::all().with_event_types(["invoice.sent"]),
        )
        .await
        .expect("read_all");
    assert_eq!(first.len(), 1);
    let rest = store
        .read_all(
            first[0].position,
            10,
            &EventFilter::all().with_event_types(["invoice.sent"]),
        )
        .await
        .expect("read_all");
    assert!(rest.is_empty());
}

/// `head` is `START` on an empty log and the position of the last readable event afterwards.
pub async fn head_is_the_last_readable_position<S: Backend>(store: S) {
    assert_eq!(store.head().await.expect("head"), LogPosition::START);
    append(
        &store,
        &stream("order-1"),
        ExpectedVersion::Any,
        vec![event(1), event(2)],
    )
    .await;
    append(
        &store,
        &stream("order-2"),
        ExpectedVersion::Any,
        vec![event(3)],
    )
    .await;
    let last = read_all(&store, &EventFilter::all())
        .await
        .last()
        .map(|e| e.position)
        .expect("events were appended");
    // A gap-safe backend may report an older head while unrelated transactions are in flight
    // (PostgreSQL's horizon is cluster-wide); it must never pass the last event, and must reach it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let head = store.head().await.expect("head");
        assert!(head <= last, "head {head} is past the last event {last}");
        if head == last {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "head stayed at {head}, never reached the last event {last}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Payload, type, schema version, ids and metadata come back exactly as appended.
pub async fn payload_and_metadata_round_trip<S: Backend>(store: S) {
    let id = stream("order-1");
    let mut user = Metadata::new();
    user.insert("tenant", "acme").expect("metadata");
    user.insert("attempt", &3).expect("metadata");
    let correlation = CorrelationId::new();
    let cause = EventId::new();
    let mut new = raw_event(
        "order.placed",
        7,
        r#"{"items":[{"sku":"a-1","qty":2}],"note":"ünïcödé ✓","big":12345678901234}"#,
    );
    new.metadata = EventMetadata {
        correlation_id: Some(correlation),
        causation_id: Some(cause.into()),
        user: user.clone(),
    };
    let before = chrono::Utc::now() - chrono::Duration::seconds(60);
    append(&store, &id, ExpectedVersion::NoStream, vec![new.clone()]).await;
    let stored = read(&store, &id, 0).await.remove(0);
    assert_eq!(stored.event_id, new.event_id);
    assert_eq!(stored.event_type, "order.placed");
    assert_eq!(stored.schema_version, 7);
    let expected: serde_json::Value = serde_json::from_str(new.payload.get()).expect("json");
    let actual: serde_json::Value = serde_json::from_str(stored.payload.get()).expect("json");
    assert_eq!(actual, expected);
    assert_eq!(stored.metadata.correlation_id, Some(correlation));
    assert_eq!(stored.metadata.causation_id, Some(cause.into()));
    assert_eq!(stored.metadata.user, user);
    assert!(stored.recorded_at > before);
    let from_log = read_all(&store, &EventFilter::all()).await.remove(0);
    assert_eq!(from_log.metadata, stored.metadata);
    assert_eq!(from_log.position, stored.position);
}

/// The latest snapshot wins; an older one never replaces a newer one.
pub async fn snapshots_keep_the_latest<S: Backend>(store: S) {
    let id = stream("counter-1");
    assert!(store.load_snapshot(&id).await.expect("load").is_none());
    let snapshot = |version: u64, value: u64| StoredSnapshot {
        stream_id: id.clone(),
        stream_version: StreamVersion::new(version),
        schema_version: 1,
        state: RawValue::from_string(format!(r#"{{"value":{value},"increments":1}}"#))
            .expect("json"),
        taken_at: chrono::Utc::now(),
    };
    store.save_snapshot(snapshot(5, 50)).await.expect("save");
    store.save_snapshot(snapshot(9, 90)).await.expect("save");
    store.save_snapshot(snapshot(7, 70)).await.expect("save");
    let latest = store
        .load_snapshot(&id)
        .await
        .expect("load")
        .expect("a snapshot is stored");
    assert_eq!(latest.stream_version, StreamVersion::new(9));
    assert!(latest.state.get().contains("90"));
    assert!(
        store
            .load_snapshot(&stream("counter-2"))
            .await
            .expect("load")
            .is_none()
    );
}

// ---------------------------------------------------------------------------------------------
// Executor checks.

/// A store that lets another writer win the race: before the first append it forwards, it runs
/// `intruder` (which appends to the same stream through the real store).
#[derive(Clone)]
struct LoseFirstRace<S> {
    inner: S,
    raced: Arc<AtomicBool>,
}

impl<S: EventStore + Clone + 'static> EventStore for LoseFirstRace<S> {
    async fn append(&self, request: AppendRequest) -> Result<AppendResult, Error> {
        if !self.raced.swap(true, Ordering::SeqCst) {
            let winner = Repository::<Counter, _>::new(self.inner.clone());
            winner
                .execute(Increment {
                    id: request.stream.aggregate_id().to_owned(),
                    by: 100,
                })
                .await
                .expect("the intruding command succeeds");
        }
        self.inner.append(request).await
    }

    async fn idempotency_outcome(
        &self,
        key: &IdempotencyKey,
    ) -> Result<Option<AppendResult>, Error> {
        self.inner.idempotency_outcome(key).await
    }

    fn read_stream<'a>(&'a self, stream: &'a StreamId, after: StreamVersion) -> EventStream<'a> {
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

/// Two executors race on one stream with the same expected version: the loser gets a conflict,
/// catches up with the winner's event, decides again and succeeds; the final state has both.
/// With no retries allowed, the loser gets a typed conflict and stores nothing.
pub async fn repository_retries_after_losing_a_race<S: Backend>(store: S) {
    let counters = Repository::<Counter, _>::new(store.clone());
    counters
        .execute(Increment {
            id: "c1".into(),
            by: 1,
        })
        .await
        .expect("first increment");

    let racing = Repository::<Counter, _>::new(LoseFirstRace {
        inner: store.clone(),
        raced: Arc::new(AtomicBool::new(false)),
    });
    let done = racing
        .execute(Increment {
            id: "c1".into(),
            by: 10,
        })
        .await
        .expect("the loser retries and succeeds");
    assert_eq!(done.attempts, 2, "one conflict, then success");
    assert_eq!(done.state.value, 111, "the retry saw the winner's event");
    assert_eq!(done.version, StreamVersion::new(3));
    let loaded = counters.load("c1").await.expect("load");
    assert_eq!(loaded.state.value, 111);
    assert_eq!(loaded.version, StreamVersion::new(3));

    let no_retry = Repository::<Counter, _>::new(LoseFirstRace {
        inner: store.clone(),
        raced: Arc::new(AtomicBool::new(false)),
    })
    .with_conflict_retries(0);
    let err = no_retry
        .execute(Increment {
            id: "c1".into(),
            by: 5,
        })
        .await
        .expect_err("without retries the loser gets the conflict");
    assert!(err.is_conflict(), "{err:?}");
    let loaded = counters.load("c1").await.expect("load");
    assert_eq!(
        loaded.state.value, 211,
        "only the intruder's event was added"
    );
    assert_eq!(loaded.version, StreamVersion::new(4));
}

/// Many tasks execute commands on one aggregate at once: with enough retries every command
/// applies exactly once and versions stay gapless.
pub async fn repository_concurrent_commands_all_apply<S: Backend>(store: S) {
    const TASKS: u64 = 8;
    const EACH: u64 = 5;
    let counters =
        Arc::new(Repository::<Counter, _>::new(store.clone()).with_conflict_retries(100));
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let counters = counters.clone();
            tokio::spawn(async move {
                for i in 0..EACH {
                    counters
                        .execute(Increment {
                            id: "shared".into(),
                            by: t * 100 + i + 1,
                        })
                        .await
                        .expect("command succeeds within the retries");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task panicked");
    }
    let expected: u64 = (0..TASKS)
        .flat_map(|t| (0..EACH).map(move |i| t * 100 + i + 1))
        .sum();
    let loaded = counters.load("shared").await.expect("load");
    assert_eq!(loaded.state.value, expected);
    assert_eq!(loaded.state.increments, TASKS * EACH);
    let id = stream("counter-shared");
    assert_eq!(
        versions(&read(&store, &id, 0).await),
        (1..=TASKS * EACH).collect::<Vec<_>>()
    );
}

/// A command the aggregate rejects returns the typed domain error and stores nothing.
pub async fn rejected_command_stores_nothing<S: Backend>(store: S) {
    let counters = Repository::<Counter, _>::new(store.clone());
    counters
        .execute(Increment {
            id: "c1".into(),
            by: 2,
        })
        .await
        .expect("increment");
    let err = counters
        .execute(Increment {
            id: "c1".into(),
            by: 0,
        })
        .await
        .expect_err("zero is rejected");
    assert_eq!(err.rejection(), Some(&CounterError::ZeroIncrement));
    assert!(!err.is_conflict() && !err.is_transient());
    assert_eq!(read_all(&store, &EventFilter::all()).await.len(), 1);
    let fresh = counters
        .execute(Increment {
            id: "c2".into(),
            by: 0,
        })
        .await
        .expect_err("zero is rejected");
    assert!(fresh.rejection().is_some());
    assert!(
        read(&store, &stream("counter-c2"), 0).await.is_empty(),
        "a rejected first command must not create the stream"
    );
}

/// Every event a command produces carries the context's correlation id, the command id as its
/// causation id, and the context's metadata; a follow-up command caused by one of those events
/// keeps the correlation id and names the event as its cause.
pub async fn correlation_and_causation_reach_every_event<S: Backend>(store: S) {
    let counters = Repository::<Counter, _>::new(store.clone());
    let correlation = CorrelationId::new();
    let context = CommandContext::new()
        .with_correlation_id(correlation)
        .with_metadata("user", "ada")
        .expect("metadata");
    counters
        .execute_with(
            Increment {
                id: "c1".into(),
                by: 1,
            },
            &context,
        )
        .await
        .expect("increment");
    let first = read(&store, &stream("counter-c1"), 0).await.remove(0);
    assert_eq!(first.metadata.correlation_id, Some(correlation));
    assert_eq!(first.metadata.causation_id, Some(context.command_id.into()));
    assert_eq!(
        first.metadata.user.get::<String>("user").expect("decode"),
        Some("ada".to_owned())
    );

    let envelope = first.decode::<Incremented>().expect("decodes");
    let follow_up = CommandContext::caused_by(&envelope);
    assert_eq!(follow_up.correlation_id, correlation);
    assert_eq!(follow_up.causation_id, Some(first.event_id.into()));
    counters
        .execute_with(
            Increment {
                id: "c2".into(),
                by: 1,
            },
            &follow_up,
        )
        .await
        .expect("follow-up");
    let second = read(&store, &stream("counter-c2"), 0).await.remove(0);
    assert_eq!(second.metadata.correlation_id, Some(correlation));
    assert_eq!(
        second.metadata.causation_id,
        Some(follow_up.command_id.into())
    );
}

/// A stored event that does not decode fails the command with an error naming the stream,
/// version, type and schema version, and nothing is appended. An unknown type or version is
/// reported the same way.
pub async fn undecodable_event_fails_the_command_and_stores_nothing<S: Backend>(store: S) {
    let counters = Repository::<Counter, _>::new(store.clone());
    let id = stream("counter-bad");
    append(
        &store,
        &id,
        ExpectedVersion::NoStream,
        vec![
            raw_event(INCREMENTED, 1, r#"{"by":1}"#),
            raw_event(INCREMENTED, 1, r#"{"by":"not a number"}"#),
        ],
    )
    .await;
    let stored = read(&store, &id, 0).await;
    let err = counters
        .execute(Increment {
            id: "bad".into(),
            by: 1,
        })
        .await
        .expect_err("an undecodable event must fail the command");
    match err.failure() {
        Some(Error::Decode {
            stream,
            version,
            event_type,
            schema_version,
            position,
            ..
        }) => {
            assert_eq!(stream, &id);
            assert_eq!(*version, StreamVersion::new(2));
            assert_eq!(event_type, INCREMENTED);
            assert_eq!(*schema_version, 1);
            assert_eq!(
                *position, stored[1].position,
                "the error names the position"
            );
        }
        other => panic!("expected a decode error, got {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("counter-bad") && message.contains("version 2"),
        "{message}"
    );
    assert!(message.contains(INCREMENTED), "{message}");
    assert_eq!(read(&store, &id, 0).await.len(), 2, "nothing was appended");

    let unknown = stream("counter-future");
    append(
        &store,
        &unknown,
        ExpectedVersion::NoStream,
        vec![raw_event(INCREMENTED, 9, r#"{"by":1}"#)],
    )
    .await;
    let err = counters
        .load("future")
        .await
        .expect_err("an unknown schema version must fail the load");
    assert!(
        matches!(
            &err,
            Error::Decode {
                schema_version: 9,
                source: DecodeError::Unknown { .. },
                ..
            }
        ),
        "{err:?}"
    );
}

/// The repository takes snapshots by policy and loads from them; a snapshot with another
/// schema version, or one that does not decode, is ignored and the state rebuilt from events.
pub async fn repository_uses_and_validates_snapshots<S: Backend>(store: S) {
    let counters = Repository::<Counter, _>::new(store.clone())
        .with_snapshots(store.clone(), SnapshotPolicy::every(3));
    for by in 1..=7 {
        counters
            .execute(Increment {
                id: "c1".into(),
                by,
            })
            .await
            .expect("increment");
    }
    let id = stream("counter-c1");
    let snapshot = store
        .load_snapshot(&id)
        .await
        .expect("load")
        .expect("a snapshot was taken");
    assert_eq!(snapshot.stream_version, StreamVersion::new(6));
    assert_eq!(snapshot.schema_version, Counter::SNAPSHOT_VERSION);
    assert_eq!(counters.load("c1").await.expect("load").state.value, 28);

    // A snapshot the repository would trust if it did not check the version: it must not.
    let lie = |schema_version: u32, state: &str| StoredSnapshot {
        stream_id: id.clone(),
        stream_version: StreamVersion::new(7),
        schema_version,
        state: RawValue::from_string(state.to_owned()).expect("json"),
        taken_at: chrono::Utc::now(),
    };
    store
        .save_snapshot(lie(99, r#"{"value":1000,"increments":1}"#))
        .await
        .expect("save");
    let loaded = counters.load("c1").await.expect("load");
    assert_eq!(
        loaded.state.value, 28,
        "a stale snapshot version is ignored"
    );
    assert_eq!(loaded.version, StreamVersion::new(7));

    store
        .save_snapshot(lie(1, r#"{"unexpected":true}"#))
        .await
        .expect("save");
    let loaded = counters.load("c1").await.expect("load");
    assert_eq!(loaded.state.value, 28, "an undecodable snapshot is ignored");

    // A valid snapshot really is used: the loaded state comes from it, not from a replay.
    store
        .save_snapshot(lie(1, r#"{"value":5000,"increments":7}"#))
        .await
        .expect("save");
    let loaded = counters.load("c1").await.expect("load");
    assert_eq!(loaded.state.value, 5000, "the snapshot was not used");
    assert_eq!(loaded.version, StreamVersion::new(7));
}

/// [`EventStore::read_stream_payloads`] returns the same events as `read_stream`, from the same
/// version, with the same type, schema version, payload and recording time.
pub async fn payload_reads_match_stream_reads<S: Backend>(store: S) {
    let id = stream("order-1");
    append(
        &store,
        &id,
        ExpectedVersion::NoStream,
        (1..=5).map(event).collect(),
    )
    .await;
    append(
        &store,
        &stream("order-2"),
        ExpectedVersion::NoStream,
        vec![event(9)],
    )
    .await;
    for after in [0, 2, 5] {
        let full = read(&store, &id, after).await;
        let payloads: Vec<EventPayload> = store
            .read_stream_payloads(&id, StreamVersion::new(after))
            .try_collect()
            .await
            .expect("read payloads");
        assert_eq!(payloads.len(), full.len(), "after version {after}");
        for (payload, recorded) in payloads.iter().zip(&full) {
            assert_eq!(payload.stream_version, recorded.stream_version);
            assert_eq!(payload.event_type, recorded.event_type);
            assert_eq!(payload.schema_version, recorded.schema_version);
            assert_eq!(payload.payload.get(), recorded.payload.get());
            assert_eq!(payload.recorded_at, recorded.recorded_at);
        }
    }
    let missing: Vec<EventPayload> = store
        .read_stream_payloads(&stream("order-404"), StreamVersion::INITIAL)
        .try_collect()
        .await
        .expect("read payloads");
    assert!(missing.is_empty());
}

/// [`EventStore::position_at`] finds where a replay from a time starts: before the first event
/// recorded at or after it, the start when that is the first event, the head when there is none.
pub async fn position_at_finds_where_a_replay_from_a_time_starts<S: Backend>(store: S) {
    let before_any = chrono::Utc::now() - chrono::Duration::seconds(1);
    assert_eq!(
        store.position_at(before_any).await.expect("position"),
        LogPosition::START,
        "an empty log"
    );
    for n in 1..=3 {
        append(
            &store,
            &stream(&format!("order-{n}")),
            ExpectedVersion::NoStream,
            vec![event(n)],
        )
        .await;
    }
    let events = read_all(&store, &EventFilter::all()).await;
    assert_eq!(events.len(), 3);
    let (first, second, third) = (&events[0], &events[1], &events[2]);
    assert!(
        first.recorded_at < second.recorded_at && second.recorded_at < third.recorded_at,
        "separate appends are recorded at increasing times"
    );
    let between =
        |a: &RecordedEvent, b: &RecordedEvent| a.recorded_at + (b.recorded_at - a.recorded_at) / 2;
    let at = |time| {
        let store = store.clone();
        async move { store.position_at(time).await.expect("position") }
    };
    assert_eq!(at(before_any).await, LogPosition::START);
    assert_eq!(at(first.recorded_at).await, LogPosition::START);
    assert_eq!(at(between(first, second)).await, first.position);
    assert_eq!(at(second.recorded_at).await, first.position);
    assert_eq!(at(between(second, third)).await, second.position);
    assert_eq!(
        at(third.recorded_at + chrono::Duration::seconds(1)).await,
        third.position,
        "nothing since: the head"
    );
    let replayed = store
        .read_all(at(between(first, second)).await, 10, &EventFilter::all())
        .await
        .expect("read");
    assert_eq!(replayed.len(), 2);
    assert_eq!(replayed[0].event_id, second.event_id);
}

// ---------------------------------------------------------------------------------------------
// Idempotency keys.

fn key(name: &str) -> IdempotencyKey {
    IdempotencyKey::new(name).expect("valid key")
}

/// A keyed append repeated with the same batch stores nothing and returns the original outcome,
/// also after the stream moved on (and whatever the expected version says now);
/// `idempotency_outcome` returns it too, and `None` for a key never stored.
pub async fn keyed_append_repeat_returns_the_original_outcome<S: Backend>(store: S) {
    let id = stream("keyed-1");
    let batch = vec![event(1), event(2)];
    let request = AppendRequest::new(id.clone(), batch)
        .expected_version(ExpectedVersion::NoStream)
        .idempotency_key(key("k-1"));
    let first = store.append(request.clone()).await.expect("keyed append");
    assert!(!first.duplicate);
    assert_eq!(first.stream, id);
    assert_eq!(first.first_version, StreamVersion::INITIAL);
    assert_eq!(first.stream_version, StreamVersion::new(2));
    append(&store, &id, ExpectedVersion::Any, vec![event(3)]).await;

    let again = store.append(request).await.expect("a repeat succeeds");
    assert!(again.duplicate, "a repeat is reported as one");
    assert_eq!(again.positions, first.positions);
    assert_eq!(again.first_version, first.first_version);
    assert_eq!(again.stream_version, first.stream_version);
    assert_eq!(
        payloads(&read(&store, &id, 0).await),
        vec![1, 2, 3],
        "a repeat stores nothing"
    );
    let outcome = store
        .idempotency_outcome(&key("k-1"))
        .await
        .expect("lookup")
        .expect("the key is stored");
    assert_eq!(outcome.positions, first.positions);
    assert_eq!(outcome.stream, id);
    assert!(
        store
            .idempotency_outcome(&key("never-used"))
            .await
            .expect("lookup")
            .is_none()
    );
}

/// A stored key with another batch (other event ids, or another stream) fails with
/// `IdempotencyKeyReused` and stores nothing; a failed append stores no key.
pub async fn keyed_append_reused_for_another_batch_is_rejected<S: Backend>(store: S) {
    let one = stream("keyed-1");
    let two = stream("keyed-2");
    store
        .append(AppendRequest::new(one.clone(), vec![event(1)]).idempotency_key(key("k")))
        .await
        .expect("keyed append");
    for (target, what) in [(&one, "same stream"), (&two, "other stream")] {
        let err = store
            .append(AppendRequest::new(target.clone(), vec![event(9)]).idempotency_key(key("k")))
            .await
            .expect_err("a reused key must be refused");
        match &err {
            Error::IdempotencyKeyReused {
                key: reused,
                stream,
                stored_stream,
            } => {
                assert_eq!(reused.as_str(), "k");
                assert_eq!(stream, target);
                assert_eq!(stored_stream, &one);
            }
            other => panic!("{what}: expected IdempotencyKeyReused, got {other:?}"),
        }
        assert!(!err.is_transient() && !err.is_conflict());
    }
    assert_eq!(payloads(&read(&store, &one, 0).await), vec![1]);
    assert!(read(&store, &two, 0).await.is_empty());

    // A conflicting keyed append stores neither events nor key: the key stays free.
    let conflicting = AppendRequest::new(one.clone(), vec![event(2)])
        .expected_version(ExpectedVersion::NoStream)
        .idempotency_key(key("free"));
    assert!(
        store
            .append(conflicting)
            .await
            .expect_err("conflict")
            .is_conflict()
    );
    assert!(
        store
            .idempotency_outcome(&key("free"))
            .await
            .expect("lookup")
            .is_none()
    );
    store
        .append(AppendRequest::new(one.clone(), vec![event(2)]).idempotency_key(key("free")))
        .await
        .expect("the key is still free");
}

/// Sixteen concurrent copies of one keyed request (expecting any version, so none is stopped
/// by a conflict) store its batch once; every copy succeeds with the same positions, and exactly
/// one is the original.
pub async fn concurrent_repeats_of_a_keyed_append_store_one_batch<S: Backend>(store: S) {
    let id = stream("keyed-race");
    let request = AppendRequest::new(id.clone(), vec![event(1), event(2), event(3)])
        .idempotency_key(key("race"));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let store = store.clone();
            let request = request.clone();
            tokio::spawn(async move { store.append(request).await })
        })
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.expect("task").expect("every copy succeeds"));
    }
    assert_eq!(results.iter().filter(|r| !r.duplicate).count(), 1);
    assert!(results.iter().all(|r| r.positions == results[0].positions));
    assert_eq!(payloads(&read(&store, &id, 0).await), vec![1, 2, 3]);
}

/// A command with an idempotency key is stored once and every execution returns the same
/// `Committed`: repeated after the stream moved on, repeated when deciding again would now be
/// rejected, and a key reused for another aggregate is a typed error. Without a key, executing
/// the same context again is deduplicated by the derived event ids.
pub async fn repository_executes_a_command_once_per_idempotency_key<S: Backend>(store: S) {
    let counters = Repository::<Counter, _>::new(store.clone());
    let increment = |id: &str, by| Increment { id: id.into(), by };
    let context = CommandContext::new().idempotent();
    let first = counters
        .execute_with(increment("c1", 5), &context)
        .await
        .expect("keyed command");
    counters
        .execute(increment("c1", 1))
        .await
        .expect("another command");
    let again = counters
        .execute_with(increment("c1", 5), &context)
        .await
        .expect("the repeat succeeds");
    assert_eq!(again.positions, first.positions);
    assert_eq!(again.version, first.version);
    assert_eq!(again.events, first.events);
    assert_eq!(
        again.state, first.state,
        "the state right after the command"
    );
    assert_eq!(read(&store, &stream("counter-c1"), 0).await.len(), 2);

    // Deciding again would be rejected now (the counter is at its cap): still the original.
    counters
        .execute(increment("c2", Counter::CAP - 5))
        .await
        .expect("fill up");
    let context = CommandContext::new().idempotent();
    let first = counters
        .execute_with(increment("c2", 5), &context)
        .await
        .expect("up to the cap");
    let again = counters
        .execute_with(increment("c2", 5), &context)
        .await
        .expect("a repeat is not decided again");
    assert_eq!(again.positions, first.positions);
    assert_eq!(again.state.value, Counter::CAP);
    assert_eq!(read(&store, &stream("counter-c2"), 0).await.len(), 2);

    // The same key for a command on another aggregate: refused, nothing stored.
    let err = counters
        .execute_with(increment("c3", 1), &context)
        .await
        .expect_err("a key names one command");
    assert!(
        matches!(err.failure(), Some(Error::IdempotencyKeyReused { .. })),
        "{err:?}"
    );
    assert!(read(&store, &stream("counter-c3"), 0).await.is_empty());

    // No key: the derived event ids make a repeat of the same context a duplicate.
    let context = CommandContext::new();
    let first = counters
        .execute_with(increment("c4", 2), &context)
        .await
        .expect("command");
    let again = counters
        .execute_with(increment("c4", 2), &context)
        .await
        .expect("repeat");
    assert_eq!(again.positions, first.positions);
    let stored = read(&store, &stream("counter-c4"), 0).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].event_id, EventId::derived(context.command_id, 0));
}

/// Eight processes' worth of repositories execute the same keyed command at once: it is stored
/// once and all of them return the same positions.
pub async fn repository_concurrent_executions_of_one_command_store_it_once<S: Backend>(store: S) {
    let context = CommandContext::new().idempotent();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let counters = Repository::<Counter, _>::new(store.clone());
            let context = context.clone();
            tokio::spawn(async move {
                counters
                    .execute_with(
                        Increment {
                            id: "once".into(),
                            by: 3,
                        },
                        &context,
                    )
                    .await
            })
        })
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.expect("task").expect("every execution succeeds"));
    }
    assert!(results.iter().all(|r| r.positions == results[0].positions));
    let stored = read(&store, &stream("counter-once"), 0).await;
    assert_eq!(stored.len(), 1, "stored once");
    assert_eq!(results[0].state.value, 3);
}

// ---------------------------------------------------------------------------------------------
// Whole-log verification (bulk imports, partition maintenance).

/// What [`verify_log`] read.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct LogSummary {
    /// Events in the global log.
    pub events: u64,
    /// Streams with events in it.
    pub streams: u64,
}

/// Reads a whole store back through [`EventStore`] and checks, with the conformance suite's
/// reads, the properties every complete log has, panicking with what broke:
/// * the global log (read in pages of `page` events) lists every event id once, with log
///   positions strictly ascending, and [`EventStore::head`] is its last position;
/// * each stream's events in the log carry versions 1, 2, ... without gaps, in log order;
/// * [`EventStore::read_stream`] of every stream returns exactly the log's events of that
///   stream, in the same order.
///
/// `on_event` sees every event of the log in order (to compare it with what was written). For a
/// log of millions of events it keeps one event id per event in memory (16 bytes each).
///
/// ```
/// # factum_testkit::conformance::runtime().block_on(async {
/// use factum::{AppendRequest, EventStore, InMemoryStore, NewEvent, StreamId};
///
/// let store = InMemoryStore::new();
/// let event = NewEvent {
///     event_id: factum::EventId::new(),
///     event_type: "test.n".into(),
///     schema_version: 1,
///     payload: factum::RawValue::from_string(r#"{"n":1}"#.into()).unwrap(),
///     metadata: Default::default(),
/// };
/// store
///     .append(AppendRequest::new(StreamId::new("order-1").unwrap(), vec![event]))
///     .await
///     .unwrap();
/// let summary = factum_testkit::conformance::verify_log(&store, 1000, |_| {}).await;
/// assert_eq!((summary.events, summary.streams), (1, 1));
/// # });
/// ```
pub async fn verify_log<S: EventStore>(
    store: &S,
    page: usize,
    mut on_event: impl FnMut(&RecordedEvent),
) -> LogSummary {
    use std::collections::{HashMap, HashSet};
    let mut ids: HashSet<EventId> = HashSet::new();
    let mut streams: HashMap<StreamId, Vec<EventId>> = HashMap::new();
    let mut after = LogPosition::START;
    let mut events = 0_u64;
    loop {
        let batch = store
            .read_all(after, page.max(1), &EventFilter::all())
            .await
            .expect("reading the global log");
        let Some(last) = batch.last() else { break };
        let next = last.position;
        for event in &batch {
            assert!(
                event.position > after,
                "the log went back from {after:?} to {:?} at event {}",
                event.position,
                event.event_id
            );
            after = event.position;
            assert!(
                ids.insert(event.event_id),
                "event id {} appears twice in the log (again at {:?}, stream `{}`)",
                event.event_id,
                event.position,
                event.stream_id
            );
            let versions = streams.entry(event.stream_id.clone()).or_default();
            assert_eq!(
                event.stream_version.get(),
                versions.len() as u64 + 1,
                "stream `{}` has a gap or repeat: event {} at version {} after {} events in the log",
                event.stream_id,
                event.event_id,
                event.stream_version,
                versions.len()
            );
            versions.push(event.event_id);
            events += 1;
            on_event(event);
        }
        after = next;
    }
    assert_eq!(
        store.head().await.expect("reading the head"),
        after,
        "the head is not the log's last position"
    );
    for (id, expected) in &streams {
        let read: Vec<RecordedEvent> = store
            .read_stream(id, StreamVersion::INITIAL)
            .try_collect()
            .await
            .expect("reading a stream");
        let got: Vec<EventId> = read.iter().map(|e| e.event_id).collect();
        assert!(
            got == *expected,
            "read_stream of `{id}` returned {} events that differ from its {} in the log",
            got.len(),
            expected.len()
        );
        assert!(
            read.iter()
                .enumerate()
                .all(|(i, e)| e.stream_version.get() == i as u64 + 1),
            "read_stream of `{id}` has versions out of order"
        );
    }
    LogSummary {
        events,
        streams: streams.len() as u64,
    }
}
