//! Deleting a stream: its events, snapshot, keys and dead letters go, a tombstone takes their
//! place in the log at the next version, positions are never reused, readers of the log stay
//! consistent, appends and loads are refused; retention deletes by age; a deletion racing with
//! writers lets no append through once it returned.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use factum::subscription::KnownEvents;
use factum::{
    AppendRequest, CommandError, Error, EventFilter, EventId, EventStore, ExpectedVersion,
    IdempotencyKey, LogPosition, NewEvent, RecordedEvent, Repository, STREAM_DELETED, StreamId,
    StreamVersion,
};
use factum_testkit::conformance::{Counter, Increment};
use factum_testkit::postgres::TestDatabase;

fn event(n: u64) -> NewEvent {
    NewEvent {
        event_id: EventId::new(),
        event_type: "test.event".into(),
        schema_version: 1,
        payload: serde_json::value::to_raw_value(
            &serde_json::json!({ "secret": format!("s3cr3t-{n}") }),
        )
        .expect("json"),
        metadata: Default::default(),
    }
}

fn stream(id: &str) -> StreamId {
    StreamId::new(id).expect("stream id")
}

async fn count(db: &TestDatabase, sql: &'static str, id: &StreamId) -> i64 {
    sqlx::query_scalar(sql)
        .bind(id.as_str())
        .fetch_one(db.pool())
        .await
        .expect("counts")
}

async fn read_log(store: &impl EventStore, after: LogPosition) -> Vec<RecordedEvent> {
    store
        .read_all(after, 10_000, &EventFilter::all())
        .await
        .expect("reads the log")
}

#[tokio::test]
async fn a_deleted_stream_leaves_a_tombstone_and_nothing_else() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let gone = stream("customer-1");
    let kept = stream("customer-2");
    store
        .append(
            AppendRequest::new(gone.clone(), vec![event(1), event(2)])
                .idempotency_key(IdempotencyKey::new("k1").expect("key")),
        )
        .await
        .expect("appends");
    store
        .append(AppendRequest::new(kept.clone(), vec![event(3)]))
        .await
        .expect("appends");
    store
        .append(AppendRequest::new(gone.clone(), vec![event(4)]))
        .await
        .expect("appends");
    let before = read_log(&store, LogPosition::START).await;
    assert_eq!(before.len(), 4);
    // A reader that got this far: it read every event so far.
    let checkpoint = before.last().expect("events").position;
    sqlx::query(
        "INSERT INTO factum.snapshots (stream_id, stream_version, schema_version, state, taken_at) \
         VALUES ($1, 2, 1, '{\"secret\":\"s3cr3t-1\"}', now())",
    )
    .bind(gone.as_str())
    .execute(db.pool())
    .await
    .expect("snapshot");
    sqlx::query(
        "INSERT INTO factum.dead_letters (subscription, event_id, error, attempts, parked_at) \
         VALUES ('mailer', $1, 'boom', 1, now())",
    )
    .bind(before[0].event_id.as_uuid())
    .execute(db.pool())
    .await
    .expect("dead letter");

    let deleted = store
        .delete_stream(&gone)
        .await
        .expect("deletes")
        .expect("the stream exists");
    assert_eq!(deleted.deleted_events, 3);
    assert_eq!(deleted.tombstone_version, StreamVersion::new(4));
    let tombstone_position = deleted.tombstone_position.expect("a tombstone");
    assert!(
        tombstone_position.get() > checkpoint.global.get(),
        "positions only grow"
    );

    // Nothing of the stream is left but its tombstone and its row.
    for sql in [
        "SELECT count(*) FROM factum.events WHERE stream_id = $1 AND event_type <> 'factum.stream_deleted'",
        "SELECT count(*) FROM factum.snapshots WHERE stream_id = $1",
        "SELECT count(*) FROM factum.idempotency_keys WHERE stream_id = $1",
    ] {
        assert_eq!(count(&db, sql, &gone).await, 0, "{sql}");
    }
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM factum.dead_letters")
        .fetch_one(db.pool())
        .await
        .expect("counts");
    assert_eq!(dead, 0);
    let leaked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM factum.events WHERE payload::text LIKE '%s3cr3t-1%' \
         OR payload::text LIKE '%s3cr3t-2%' OR payload::text LIKE '%s3cr3t-4%'",
    )
    .fetch_one(db.pool())
    .await
    .expect("counts");
    assert_eq!(leaked, 0, "no payload of the deleted stream is left");

    // The reader that had seen the events sees the tombstone next, then nothing.
    let next = read_log(&store, checkpoint).await;
    assert_eq!(next.len(), 1);
    assert_eq!(
        (
            next[0].event_type.as_str(),
            next[0].stream_id.as_str(),
            next[0].stream_version
        ),
        (STREAM_DELETED, "customer-1", StreamVersion::new(4))
    );
    assert_eq!(next[0].payload.get(), r#"{"deleted_through": 3}"#);
    // A reader from the start sees the other stream's event and the tombstone, in log order.
    let fresh = read_log(&store, LogPosition::START).await;
    let seen: Vec<(&str, &str)> = fresh
        .iter()
        .map(|e| (e.stream_id.as_str(), e.event_type.as_str()))
        .collect();
    assert_eq!(
        seen,
        [("customer-2", "test.event"), ("customer-1", STREAM_DELETED)]
    );
    // Consumers with known events pass the tombstone over in any category.
    assert!(KnownEvents::new().knows("customer", STREAM_DELETED));

    // Appends are refused, whatever they expect; nothing is stored.
    for expected in [
        ExpectedVersion::Exact(StreamVersion::new(4)),
        ExpectedVersion::Any,
        ExpectedVersion::NoStream,
    ] {
        match store
            .append(AppendRequest::new(gone.clone(), vec![event(9)]).expected_version(expected))
            .await
        {
            Err(Error::StreamDeleted { stream }) => assert_eq!(stream, gone),
            other => panic!("expected StreamDeleted, got {other:?}"),
        }
    }
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM factum.events WHERE stream_id = $1",
            &gone
        )
        .await,
        1
    );
    // A second deletion changes nothing; an unknown stream is None.
    let again = store
        .delete_stream(&gone)
        .await
        .expect("deletes")
        .expect("exists");
    assert_eq!((again.deleted_events, again.tombstone_position), (0, None));
    assert!(
        store
            .delete_stream(&stream("customer-9"))
            .await
            .expect("ok")
            .is_none()
    );
    // Positions are never reused: the next append lands after the tombstone.
    let later = store
        .append(AppendRequest::new(kept.clone(), vec![event(5)]))
        .await
        .expect("appends");
    assert!(later.positions[0] > tombstone_position);
}

#[tokio::test]
async fn loading_or_commanding_a_deleted_aggregate_fails_with_the_deletion_error() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let counters = Repository::<Counter, _>::new(store.clone()).with_cache(10);
    let increment = || Increment {
        id: "c1".into(),
        by: 1,
    };
    counters.execute(increment()).await.expect("first command");
    counters.load("c1").await.expect("cached now");
    store
        .delete_stream(&stream("counter-c1"))
        .await
        .expect("deletes")
        .expect("exists");
    match counters.load("c1").await {
        Err(Error::StreamDeleted { stream }) => assert_eq!(stream.as_str(), "counter-c1"),
        other => panic!("expected StreamDeleted, got {other:?}"),
    }
    match counters.execute(increment()).await {
        Err(CommandError::Failed(Error::StreamDeleted { .. })) => {}
        other => panic!("expected StreamDeleted, got {other:?}"),
    }
}

#[tokio::test]
async fn retention_deletes_the_streams_of_a_category_inactive_since_a_time() {
    let db = TestDatabase::create().await;
    let store = db.store();
    for id in ["order-old", "order-new", "invoice-old"] {
        store
            .append(AppendRequest::new(stream(id), vec![event(1)]))
            .await
            .expect("appends");
    }
    sqlx::query(
        "UPDATE factum.events SET recorded_at = now() - interval '400 days' \
         WHERE stream_id IN ('order-old', 'invoice-old')",
    )
    .execute(db.pool())
    .await
    .expect("ages two streams");
    let cutoff = chrono::Utc::now() - chrono::Duration::days(365);
    let deleted = store
        .delete_streams_inactive_since("order", cutoff)
        .await
        .expect("retention");
    assert_eq!(deleted, [stream("order-old")]);
    // The tombstone is recent: a second run deletes nothing more.
    assert!(
        store
            .delete_streams_inactive_since("order", cutoff)
            .await
            .expect("retention")
            .is_empty()
    );
    for (id, left) in [("order-old", 0), ("order-new", 1), ("invoice-old", 1)] {
        let n = count(
            &db,
            "SELECT count(*) FROM factum.events WHERE stream_id = $1 AND event_type = 'test.event'",
            &stream(id),
        )
        .await;
        assert_eq!(n, left, "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_append_gets_through_once_the_deletion_returned() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let id = stream("ledger-1");
    store
        .append(AppendRequest::new(id.clone(), vec![event(0)]))
        .await
        .expect("creates the stream");
    let deleted_flag = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for _ in 0..4 {
        let (store, id, flag) = (store.clone(), id.clone(), deleted_flag.clone());
        writers.push(tokio::spawn(async move {
            let (mut after, mut refused) = (0u64, 0u64);
            for n in 0..10_000 {
                let seen = flag.load(Ordering::SeqCst);
                match store
                    .append(AppendRequest::new(id.clone(), vec![event(n)]))
                    .await
                {
                    Ok(_) if seen => after += 1,
                    Ok(_) => {}
                    Err(Error::StreamDeleted { .. }) => {
                        refused += 1;
                        if refused >= 5 {
                            break;
                        }
                    }
                    Err(e) if e.is_conflict() => {}
                    Err(e) => panic!("unexpected append error: {e}"),
                }
            }
            (after, refused)
        }));
    }
    let started = std::time::Instant::now();
    while count(
        &db,
        "SELECT count(*) FROM factum.events WHERE stream_id = $1",
        &id,
    )
    .await
        < 50
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "writers made no progress"
        );
        tokio::task::yield_now().await;
    }
    store
        .delete_stream(&id)
        .await
        .expect("deletes")
        .expect("exists");
    deleted_flag.store(true, Ordering::SeqCst);
    let (mut after, mut refused) = (0, 0);
    for writer in writers {
        let (a, r) = writer.await.expect("writer");
        after += a;
        refused += r;
    }
    assert_eq!(
        after, 0,
        "an append started after the deletion returned was stored"
    );
    assert_eq!(refused, 20);
    // Only the tombstone is left, at the stream's last version.
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT event_type, stream_version FROM factum.events WHERE stream_id = $1")
            .bind(id.as_str())
            .fetch_all(db.pool())
            .await
            .expect("rows");
    let version: i64 = count(
        &db,
        "SELECT version FROM factum.streams WHERE stream_id = $1",
        &id,
    )
    .await;
    assert_eq!(rows, [(STREAM_DELETED.to_owned(), version)]);
}
