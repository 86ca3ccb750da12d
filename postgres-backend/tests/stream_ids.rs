//! Stream ids at the documented maximum length work on PostgreSQL whatever their content, and
//! one byte more is refused by `StreamId::new`, before anything reaches the database.

use std::time::Duration;

use factum::{
    EventFilter, EventId, EventStore, ExpectedVersion, InvalidStreamId, LogPosition, NewEvent,
    RawValue, SnapshotStore, StoredSnapshot, StreamId, StreamVersion,
};
use factum_testkit::postgres::TestDatabase;
use futures_util::TryStreamExt;

/// Every test is bounded in time.
async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(120), f)
        .await
        .expect("the test finished in time")
}

/// `bytes` bytes of UTF-8 that do not compress: pseudo-random two-byte characters
/// (U+0100..U+07FF) after `prefix`, padded with one ASCII letter when the count is odd.
fn incompressible(prefix: &str, bytes: usize) -> String {
    let mut out = String::from(prefix);
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    while out.len() + 2 <= bytes {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let c = char::from_u32(0x100 + (state % 0x700) as u32).expect("a two-byte scalar");
        out.push(c);
    }
    if out.len() < bytes {
        out.push('z');
    }
    assert_eq!(out.len(), bytes);
    out
}

fn event(n: u64) -> NewEvent {
    NewEvent {
        event_id: EventId::new(),
        event_type: "test.happened".to_owned(),
        schema_version: 1,
        payload: RawValue::from_string(format!("{{\"n\":{n}}}")).expect("json"),
        metadata: Default::default(),
    }
}

/// An append helper, so the move to `append(AppendRequest)` is one edit.
async fn append(
    store: &impl EventStore,
    stream: &StreamId,
    expected: ExpectedVersion,
    events: Vec<NewEvent>,
) -> factum::AppendResult {
    store
        .append(factum::AppendRequest::new(stream.clone(), events).expected_version(expected))
        .await
        .expect("append to a maximal stream id")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_longest_stream_id_works_with_incompressible_content() {
    bounded(async {
        let db = TestDatabase::create().await;
        let store = db.patient_store();
        let longest = StreamId::new(incompressible("bulk-", StreamId::MAX_LEN))
            .expect("an id of exactly MAX_LEN bytes is valid");
        assert_eq!(longest.as_str().len(), StreamId::MAX_LEN);

        append(
            &store,
            &longest,
            ExpectedVersion::NoStream,
            vec![event(1), event(2)],
        )
        .await;
        append(
            &store,
            &longest,
            ExpectedVersion::Exact(StreamVersion::new(2)),
            vec![event(3)],
        )
        .await;
        let read: Vec<_> = store
            .read_stream(&longest, StreamVersion::INITIAL)
            .try_collect()
            .await
            .expect("read the stream back");
        assert_eq!(read.len(), 3);
        assert!(read.iter().all(|e| e.stream_id == longest));
        let all = store
            .read_all(
                LogPosition::START,
                10,
                &EventFilter::all().with_categories(["bulk"]),
            )
            .await
            .expect("read the global log");
        assert_eq!(all.len(), 3);

        store
            .save_snapshot(StoredSnapshot {
                stream_id: longest.clone(),
                stream_version: StreamVersion::new(3),
                schema_version: 1,
                state: RawValue::from_string("{}".to_owned()).expect("json"),
                taken_at: chrono::Utc::now(),
            })
            .await
            .expect("save a snapshot of a maximal stream id");
        let snapshot = store
            .load_snapshot(&longest)
            .await
            .expect("load the snapshot");
        assert_eq!(
            snapshot.map(|s| s.stream_version),
            Some(StreamVersion::new(3))
        );

        // Stored uncompressed, the key really is MAX_LEN bytes: the bound above was exercised at
        // its worst case, not on a value PostgreSQL shrank first.
        let stored: i32 = sqlx::query_scalar(
            "SELECT pg_column_size(stream_id) FROM factum.streams WHERE stream_id = $1",
        )
        .bind(longest.as_str())
        .fetch_one(db.pool())
        .await
        .expect("stored size");
        assert!(
            stored >= StreamId::MAX_LEN as i32,
            "stored in {stored} bytes"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_more_is_refused_before_the_database_and_would_fail_in_it_when_larger() {
    bounded(async {
        let too_long = incompressible("bulk-", StreamId::MAX_LEN + 1);
        let err = StreamId::new(too_long.clone()).expect_err("MAX_LEN + 1 bytes is refused");
        assert!(matches!(err, InvalidStreamId::TooLong { length, .. } if length == StreamId::MAX_LEN + 1));
        assert!(err.to_string().contains("at most 1024 bytes"), "{err}");

        // Why the bound exists: without it an incompressible id a few times longer reaches the
        // index and fails there, with a raw index-size error, while a compressible one passes.
        let db = TestDatabase::create().await;
        let insert = |id: String| {
            let pool = db.pool().clone();
            async move {
                sqlx::query("INSERT INTO factum.streams (stream_id, category, version) VALUES ($1, 'bulk', 0)")
                    .bind(id)
                    .execute(&pool)
                    .await
            }
        };
        insert(format!("bulk-{}", "x".repeat(10_000)))
            .await
            .expect("a compressible 10 kB id fits the index");
        let raw = insert(incompressible("bulk-", 4 * StreamId::MAX_LEN))
            .await
            .expect_err("an incompressible 4 kB id does not fit the index");
        assert!(raw.to_string().contains("index row"), "{raw}");
    })
    .await;
}
