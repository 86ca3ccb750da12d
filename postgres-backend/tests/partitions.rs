//! Partition maintenance against PostgreSQL: appends, stream reads, idempotent re-appends and
//! conflicts across range partitions created ahead of need, and detaching a partition of
//! archived streams. Partitions are tiny (10 positions) and the sequence starts just below the
//! first partition's end, so a few appends cross several boundaries.

use std::time::Duration;

use factum::{
    Error, EventId, EventStore, ExpectedVersion, NewEvent, RecordedEvent, StreamId, StreamVersion,
};
use factum_testkit::postgres::TestDatabase;
use futures_util::TryStreamExt;

fn event(n: u64) -> NewEvent {
    NewEvent {
        event_id: EventId::new(),
        event_type: "test.event".into(),
        schema_version: 1,
        payload: serde_json::value::to_raw_value(&serde_json::json!({ "n": n })).expect("json"),
        metadata: Default::default(),
    }
}

fn stream(id: &str) -> StreamId {
    StreamId::new(id).expect("stream id")
}

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(120), f)
        .await
        .expect("the test finished in time")
}

const FIRST_END: i64 = 1_000_000_000;

/// The partition each of a stream's events is stored in, by version.
async fn homes(db: &TestDatabase, id: &StreamId) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT tableoid::regclass::text FROM factum.events WHERE stream_id = $1 ORDER BY stream_version",
    )
    .bind(id.as_str())
    .fetch_all(db.pool())
    .await
    .expect("homes")
}

async fn read(store: &factum_postgres::PostgresStore, id: &StreamId) -> Vec<RecordedEvent> {
    store
        .read_stream(id, StreamVersion::INITIAL)
        .try_collect()
        .await
        .expect("read stream")
}

#[tokio::test]
async fn appends_reads_and_reappends_work_across_partitions_created_ahead() {
    bounded(async {
        let db = TestDatabase::create().await;
        let store = db.store();
        // The next position is FIRST_END - 4: four positions left in events_p0.
        sqlx::query("SELECT setval('factum.events_global_position_seq', $1)")
            .bind(FIRST_END - 5)
            .execute(db.pool())
            .await
            .expect("setval");

        let created = store.ensure_partitions(10, 25).await.expect("ensure");
        let names: Vec<&str> = created.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "events_p1000000000",
                "events_p1000000010",
                "events_p1000000020"
            ]
        );
        assert_eq!(created[0].from, Some(FIRST_END as u64));
        assert_eq!(created[2].to, Some(FIRST_END as u64 + 30));
        assert!(
            store
                .ensure_partitions(10, 25)
                .await
                .expect("again")
                .is_empty(),
            "enough headroom: nothing to create"
        );
        let all = store.partitions().await.expect("partitions");
        assert_eq!(all.len(), 5, "{all:?}");
        assert!(all.last().is_some_and(|p| p.is_default));

        // Appends cross two boundaries: 6 events, then 10 more one at a time.
        let id = stream("order-1");
        let first_batch: Vec<NewEvent> = (1..=6).map(event).collect();
        let first = store
            .append(
                factum::AppendRequest::new(id.clone(), first_batch.clone())
                    .expected_version(ExpectedVersion::NoStream),
            )
            .await
            .expect("first batch");
        assert_eq!(first.stream_version.get(), 6);
        for n in 7..=16 {
            store
                .append(
                    factum::AppendRequest::new(id.clone(), vec![event(n)])
                        .expected_version(ExpectedVersion::Exact(StreamVersion::new(n - 1))),
                )
                .await
                .expect("append");
        }
        let homes = homes(&db, &id).await;
        assert_eq!(&homes[..4], ["factum.events_p0"; 4]);
        assert_eq!(&homes[4..14], ["factum.events_p1000000000"; 10]);
        assert_eq!(&homes[14..], ["factum.events_p1000000010"; 2]);
        let in_default: i64 = sqlx::query_scalar("SELECT count(*) FROM factum.events_default")
            .fetch_one(db.pool())
            .await
            .expect("count");
        assert_eq!(in_default, 0, "every position went to a range partition");

        // The stream reads back whole and in order across partitions.
        let events = read(&store, &id).await;
        assert_eq!(
            events
                .iter()
                .map(|e| e.stream_version.get())
                .collect::<Vec<_>>(),
            (1..=16).collect::<Vec<_>>()
        );
        let after = store
            .read_stream(&id, StreamVersion::new(3))
            .try_collect::<Vec<_>>()
            .await
            .expect("read after");
        assert_eq!(after.first().map(|e| e.stream_version.get()), Some(4));

        // The first batch straddles p0 and the next partition, and new events now go to a third:
        // re-appending it is still recognised (by id, across partitions) and stores nothing.
        let again = store
            .append(factum::AppendRequest::new(id.clone(), first_batch.clone()))
            .await
            .expect("idempotent re-append");
        assert!(again.duplicate);
        assert_eq!(again.positions, first.positions);
        // One stored id inside a new batch: rejected, nothing stored.
        let mixed = vec![first_batch[0].clone(), event(99)];
        let error = store
            .append(factum::AppendRequest::new(id.clone(), mixed))
            .await
            .expect_err("partly stored");
        assert!(matches!(error, Error::DuplicateEventId { .. }), "{error:?}");
        // A stale expected version is a conflict, whichever partition the stream's tail is in.
        let error = store
            .append(
                factum::AppendRequest::new(id.clone(), vec![event(100)])
                    .expected_version(ExpectedVersion::Exact(StreamVersion::new(6))),
            )
            .await
            .expect_err("conflict");
        assert!(
            matches!(error, Error::Conflict { actual, .. } if actual.get() == 16),
            "{error:?}"
        );
        assert_eq!(read(&store, &id).await.len(), 16, "nothing more was stored");
    })
    .await;
}

#[tokio::test]
async fn a_partition_of_archived_streams_is_detached_and_the_rest_stays() {
    bounded(async {
        let db = TestDatabase::create().await;
        let store = db.store();
        sqlx::query("SELECT setval('factum.events_global_position_seq', $1)")
            .bind(FIRST_END - 1)
            .execute(db.pool())
            .await
            .expect("setval");
        store.ensure_partitions(10, 25).await.expect("ensure");

        // `old-1` fills events_p1000000000 exactly; `new-1` goes to the next partition.
        let old = stream("old-1");
        store
            .append(
                factum::AppendRequest::new(old.clone(), (1..=10).map(event).collect())
                    .expected_version(ExpectedVersion::NoStream),
            )
            .await
            .expect("old");
        let new = stream("new-1");
        store
            .append(
                factum::AppendRequest::new(new.clone(), vec![event(1)])
                    .expected_version(ExpectedVersion::NoStream),
            )
            .await
            .expect("new");
        assert_eq!(homes(&db, &old).await, ["factum.events_p1000000000"; 10]);

        let refused = store
            .detach_partition("events_p1000000000")
            .await
            .expect_err("old-1 is not archived");
        assert!(refused.to_string().contains("old-1"), "{refused}");
        for name in ["events_default", "events_p1000000010", "no_such_table"] {
            let refused = store.detach_partition(name).await.expect_err(name);
            assert!(matches!(refused, Error::InvalidArgument(_)), "{refused:?}");
        }

        assert!(store.archive_stream(&old).await.expect("archive"));
        assert!(
            !store
                .archive_stream(&stream("ghost-1"))
                .await
                .expect("archive")
        );
        store
            .detach_partition("events_p1000000000")
            .await
            .expect("detach");
        let names: Vec<String> = store
            .partitions()
            .await
            .expect("partitions")
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert!(
            !names.iter().any(|n| n == "events_p1000000000"),
            "{names:?}"
        );
        // The detached table keeps its rows for archival; the log no longer has them.
        let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM factum.events_p1000000000")
            .fetch_one(db.pool())
            .await
            .expect("count");
        assert_eq!(kept, 10);
        assert!(read(&store, &old).await.is_empty());
        assert_eq!(read(&store, &new).await.len(), 1);
        store
            .append(
                factum::AppendRequest::new(new.clone(), vec![event(2)])
                    .expected_version(ExpectedVersion::Exact(StreamVersion::new(1))),
            )
            .await
            .expect("appends go on");
    })
    .await;
}
