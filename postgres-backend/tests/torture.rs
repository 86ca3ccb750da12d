//! Concurrency torture: 16 writers on 50 shared streams with expected versions and retries,
//! and a gap-safe reader running throughout.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use factum::{
    Error, EventFilter, EventId, EventStore, ExpectedVersion, LogPosition, NewEvent, RecordedEvent,
    StreamId, StreamVersion,
};
use factum_testkit::postgres::TestDatabase;
use futures_util::TryStreamExt;

const WRITERS: u64 = 16;
const STREAMS: u64 = 50;
const APPENDS_PER_WRITER: u64 = 150;

/// xorshift64*: deterministic per writer, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn stream(n: u64) -> StreamId {
    StreamId::new(format!("torture-{n}")).expect("id")
}

fn batch(writer: u64, size: u64) -> Vec<NewEvent> {
    (0..size)
        .map(|_| NewEvent {
            event_id: EventId::new(),
            event_type: "torture.appended".into(),
            schema_version: 1,
            payload: serde_json::value::to_raw_value(&serde_json::json!({ "writer": writer }))
                .expect("json"),
            metadata: Default::default(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_stay_gapless_unique_and_are_all_read_once() {
    tokio::time::timeout(Duration::from_secs(240), run())
        .await
        .expect("the torture test finished in time");
}

async fn run() {
    let db = TestDatabase::create().await;
    // The reader must see the run's events although other tests' transactions elsewhere in the
    // cluster may hold the gap-safe horizon back for a while: it waits for them (never for
    // transactions that begin after its call, so it keeps up with the writers).
    let store = db.patient_store();
    let writing = Arc::new(AtomicBool::new(true));

    let reader = tokio::spawn({
        let store = store.clone();
        let writing = Arc::clone(&writing);
        async move {
            let mut seen: Vec<RecordedEvent> = Vec::new();
            let mut after = LogPosition::START;
            loop {
                let page = store
                    .read_all(after, 200, &EventFilter::all())
                    .await
                    .expect("read all");
                if let Some(last) = page.last() {
                    after = last.position;
                    seen.extend(page);
                } else {
                    tokio::task::yield_now().await;
                }
                if !writing.load(Ordering::Acquire) {
                    return seen;
                }
            }
        }
    });

    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (writer + 1));
            let mut acked: Vec<(StreamId, Vec<EventId>)> = Vec::new();
            let mut conflicts = 0u64;
            for _ in 0..APPENDS_PER_WRITER {
                let id = stream(rng.below(STREAMS));
                let events = batch(writer, 1 + rng.below(3));
                let ids: Vec<EventId> = events.iter().map(|e| e.event_id).collect();
                // A possibly stale guess of the version, as a client's cache would have.
                let mut version = store.stream_version(&id).await.expect("version");
                let mut tries = 0;
                loop {
                    tries += 1;
                    match store
                        .append(
                            factum::AppendRequest::new(id.clone(), events.clone())
                                .expected_version(ExpectedVersion::Exact(version)),
                        )
                        .await
                    {
                        Ok(result) => {
                            assert!(!result.duplicate);
                            assert_eq!(result.positions.len(), ids.len());
                            acked.push((id.clone(), ids.clone()));
                            // Sometimes retry an acknowledged append, as after a lost reply.
                            if rng.below(10) == 0 {
                                let again = store
                                    .append(factum::AppendRequest::new(id.clone(), events.clone()))
                                    .await
                                    .expect("idempotent re-append");
                                assert!(again.duplicate);
                                assert_eq!(again.positions, result.positions);
                            }
                            break;
                        }
                        Err(Error::Conflict { actual, .. }) => {
                            conflicts += 1;
                            assert_ne!(actual, version);
                            // Random give-ups: a client that drops the command.
                            if tries >= 5 || rng.below(8) == 0 {
                                break;
                            }
                            version = actual;
                        }
                        Err(other) => panic!("unexpected append error: {other:?}"),
                    }
                }
            }
            (acked, conflicts)
        }));
    }
    let mut acked = Vec::new();
    let mut conflicts = 0;
    for writer in writers {
        let (a, c) = writer.await.expect("writer");
        acked.extend(a);
        conflicts += c;
    }
    writing.store(false, Ordering::Release);
    let mut seen = reader.await.expect("reader");
    let seen_during_run = seen.len();

    // Drain what the reader had not reached when the writers finished.
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM factum.events")
        .fetch_one(db.pool())
        .await
        .expect("count");
    let total = usize::try_from(total).expect("count");
    while seen.len() < total {
        let after = seen.last().map_or(LogPosition::START, |e| e.position);
        let page = store
            .read_all(after, 500, &EventFilter::all())
            .await
            .expect("read all");
        seen.extend(page);
    }
    eprintln!(
        "torture: {} appends acknowledged, {conflicts} conflicts, {total} events; the reader saw {seen_during_run} while writers ran",
        acked.len()
    );
    assert!(seen_during_run > 0, "the reader ran during the writes");
    assert!(conflicts > 0, "the run should have produced conflicts");
    assert!(
        acked.len() > 1000,
        "only {} appends were acknowledged",
        acked.len()
    );

    // Every stream's versions are gapless 1..n.
    let mut stored_ids = HashSet::new();
    let mut stored = 0;
    for n in 0..STREAMS {
        let events: Vec<RecordedEvent> = store
            .read_stream(&stream(n), StreamVersion::INITIAL)
            .try_collect()
            .await
            .expect("read stream");
        let versions: Vec<u64> = events.iter().map(|e| e.stream_version.get()).collect();
        assert_eq!(
            versions,
            (1..=events.len() as u64).collect::<Vec<_>>(),
            "stream {n} has gaps"
        );
        for e in &events {
            assert!(
                stored_ids.insert(e.event_id),
                "event id {} twice",
                e.event_id
            );
        }
        stored += events.len();
    }
    assert_eq!(stored, total);

    // Every acknowledged append is stored, in its stream, in batch order.
    let by_id: HashMap<EventId, &RecordedEvent> = seen.iter().map(|e| (e.event_id, e)).collect();
    for (id, ids) in &acked {
        let versions: Vec<u64> = ids
            .iter()
            .map(|i| {
                let e = by_id.get(i).expect("an acknowledged event was not read");
                assert_eq!(&e.stream_id, id);
                e.stream_version.get()
            })
            .collect();
        assert!(versions.windows(2).all(|w| w[1] == w[0] + 1));
    }
    assert_eq!(
        acked.iter().map(|(_, ids)| ids.len()).sum::<usize>(),
        total,
        "nothing but acknowledged appends was stored"
    );

    // The reader saw each event exactly once, in (transaction, position) order.
    assert_eq!(seen.len(), total);
    assert_eq!(by_id.len(), total, "the reader saw an event twice");
    assert!(
        seen.windows(2).all(|w| w[0].position < w[1].position),
        "the reader's events are out of log order"
    );
}

/// What a group-commit writer asked for, and what it was told.
enum Sent {
    /// Acknowledged: these ids, in this stream, stored once, in batch order.
    Acked {
        stream: StreamId,
        ids: Vec<EventId>,
        keyed: bool,
    },
    /// Sent with an expected version the stream was known not to have: must store nothing.
    Injected { ids: Vec<EventId> },
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_commit_keeps_each_request_apart_under_conflicts() {
    tokio::time::timeout(Duration::from_secs(240), run_grouped())
        .await
        .expect("the group-commit torture test finished in time");
}

/// 16 writers on 50 shared streams through one store with group commit on: exact versions
/// (often stale), injected conflicts, idempotency keys, `NoStream` and `Any` appends and repeats,
/// all mixed in the same statements. Nothing acknowledged is lost, nothing is stored twice,
/// versions stay gapless, an injected conflict stores nothing, and no statement ever carried two
/// requests for one stream.
async fn run_grouped() {
    use factum::IdempotencyKey;
    use factum_postgres::{GroupCommit, StoreOptions};

    let db = TestDatabase::create().await;
    let store = db.store_with(
        StoreOptions::default()
            .with_read_settle_timeout(factum_testkit::postgres::PATIENT_READ_SETTLE)
            .with_group_commit(GroupCommit::enabled().with_max_batch(16)),
    );
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let mut rng = Rng(0xD1B5_4A32_D192_ED03 ^ (writer + 1));
            let mut sent: Vec<Sent> = Vec::new();
            let (mut conflicts, mut injected) = (0u64, 0u64);
            for a in 0..APPENDS_PER_WRITER {
                let n = rng.below(STREAMS);
                let id = stream(n);
                let events = batch(writer, 1 + rng.below(3));
                let ids: Vec<EventId> = events.iter().map(|e| e.event_id).collect();
                let key = (rng.below(4) == 0)
                    .then(|| IdempotencyKey::new(format!("w{writer}-a{a}")).expect("key"));
                let mut version = store.stream_version(&id).await.expect("version");
                if rng.below(8) == 0 {
                    // An injected conflict: a version the stream cannot have yet.
                    let wrong = StreamVersion::new(version.get() + 1_000);
                    let mut request = factum::AppendRequest::new(id.clone(), events.clone())
                        .expected_version(ExpectedVersion::Exact(wrong));
                    if let Some(key) = &key {
                        request = request.idempotency_key(key.clone());
                    }
                    match store.append(request).await {
                        Err(Error::Conflict { expected, .. }) => {
                            assert_eq!(expected, ExpectedVersion::Exact(wrong));
                            injected += 1;
                            sent.push(Sent::Injected { ids });
                        }
                        other => panic!("an injected conflict was not one: {other:?}"),
                    }
                    continue;
                }
                let any = rng.below(10) == 0;
                let mut tries = 0;
                loop {
                    tries += 1;
                    let expected = if any {
                        ExpectedVersion::Any
                    } else if version == StreamVersion::INITIAL {
                        ExpectedVersion::NoStream
                    } else {
                        ExpectedVersion::Exact(version)
                    };
                    let mut request = factum::AppendRequest::new(id.clone(), events.clone())
                        .expected_version(expected);
                    if let Some(key) = &key {
                        request = request.idempotency_key(key.clone());
                    }
                    match store.append(request.clone()).await {
                        Ok(result) => {
                            assert!(!result.duplicate, "a first append came back as a repeat");
                            assert_eq!(result.stream, id);
                            assert_eq!(result.positions.len(), ids.len());
                            if let ExpectedVersion::Exact(v) = expected {
                                assert_eq!(result.first_version, v);
                            }
                            sent.push(Sent::Acked {
                                stream: id.clone(),
                                ids: ids.clone(),
                                keyed: key.is_some(),
                            });
                            // Sometimes repeat it, as after a lost reply: by key when it has
                            // one, else by its ids.
                            if rng.below(6) == 0 {
                                let again = store.append(request).await.expect("repeat");
                                assert!(again.duplicate);
                                assert_eq!(again.positions, result.positions);
                            }
                            break;
                        }
                        Err(Error::Conflict { actual, .. }) => {
                            conflicts += 1;
                            assert_ne!(actual, version);
                            if tries >= 5 || rng.below(8) == 0 {
                                break;
                            }
                            version = actual;
                        }
                        Err(other) => panic!("unexpected append error: {other:?}"),
                    }
                }
            }
            (sent, conflicts, injected)
        }));
    }
    let mut sent = Vec::new();
    let (mut conflicts, mut injected) = (0, 0);
    for writer in writers {
        let (s, c, i) = writer.await.expect("writer");
        sent.extend(s);
        conflicts += c;
        injected += i;
    }

    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM factum.events")
        .fetch_one(db.pool())
        .await
        .expect("count");
    let total = usize::try_from(total).expect("count");
    // How many statements carried requests for more than one stream: group commit at work.
    let grouped: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT transaction_id FROM factum.events \
         GROUP BY transaction_id HAVING count(DISTINCT stream_id) > 1) g",
    )
    .fetch_one(db.pool())
    .await
    .expect("grouped statements");
    let acked = sent
        .iter()
        .filter(|s| matches!(s, Sent::Acked { .. }))
        .count();
    eprintln!(
        "group torture: {acked} appends acknowledged, {conflicts} conflicts, {injected} injected, {total} events, {grouped} statements with several streams"
    );
    assert!(conflicts > 0, "the run should have produced real conflicts");
    assert!(injected > 0, "the run should have injected conflicts");
    assert!(grouped > 0, "no statement carried several requests");
    assert!(acked > 1000, "only {acked} appends were acknowledged");

    // Every stream's versions are gapless 1..n, and no id is stored twice.
    let mut stored: HashMap<EventId, RecordedEvent> = HashMap::new();
    for n in 0..STREAMS {
        let events: Vec<RecordedEvent> = store
            .read_stream(&stream(n), StreamVersion::INITIAL)
            .try_collect()
            .await
            .expect("read stream");
        let versions: Vec<u64> = events.iter().map(|e| e.stream_version.get()).collect();
        assert_eq!(
            versions,
            (1..=events.len() as u64).collect::<Vec<_>>(),
            "stream {n} has gaps"
        );
        for e in events {
            let id = e.event_id;
            assert!(stored.insert(id, e).is_none(), "event id {id} twice");
        }
    }
    assert_eq!(stored.len(), total);

    // Every acknowledged append is stored once, in its stream, in batch order, within one
    // transaction that holds no other events of that stream (never two requests for one stream
    // in one statement); an injected conflict stored nothing.
    let mut by_tx_stream: HashMap<(u64, StreamId), usize> = HashMap::new();
    for e in stored.values() {
        *by_tx_stream
            .entry((e.position.commit, e.stream_id.clone()))
            .or_default() += 1;
    }
    let mut acked_events = 0;
    let mut keyed = 0;
    for s in &sent {
        match s {
            Sent::Acked {
                stream,
                ids,
                keyed: k,
            } => {
                let events: Vec<&RecordedEvent> = ids
                    .iter()
                    .map(|i| stored.get(i).expect("an acknowledged event is lost"))
                    .collect();
                assert!(events.iter().all(|e| &e.stream_id == stream));
                assert!(
                    events
                        .windows(2)
                        .all(|w| w[1].stream_version.get() == w[0].stream_version.get() + 1)
                );
                let commit = events[0].position.commit;
                assert!(events.iter().all(|e| e.position.commit == commit));
                assert_eq!(
                    by_tx_stream[&(commit, stream.clone())],
                    ids.len(),
                    "a statement carried another request for stream {stream}"
                );
                acked_events += ids.len();
                keyed += usize::from(*k);
            }
            Sent::Injected { ids } => {
                for id in ids {
                    assert!(!stored.contains_key(id), "an injected conflict stored {id}");
                }
            }
        }
    }
    assert_eq!(
        acked_events, total,
        "nothing but acknowledged appends was stored"
    );
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM factum.idempotency_keys")
        .fetch_one(db.pool())
        .await
        .expect("keys");
    assert_eq!(
        usize::try_from(keys).expect("keys"),
        keyed,
        "one key per acknowledged keyed append"
    );

    // The global log holds each event once, in order.
    let mut seen: Vec<RecordedEvent> = Vec::new();
    loop {
        let after = seen.last().map_or(LogPosition::START, |e| e.position);
        let page = store
            .read_all(after, 500, &EventFilter::all())
            .await
            .expect("read all");
        if page.is_empty() {
            break;
        }
        seen.extend(page);
    }
    assert_eq!(seen.len(), total);
    assert!(seen.windows(2).all(|w| w[0].position < w[1].position));
}
