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
