//! Partitions over a store's life: concurrent appends while maintenance rolls partitions over,
//! stream reads that prune the partitions below a stream's first position (shown by EXPLAIN),
//! and a partition detached, moved out of the database (COPY TO, the table dropped), restored
//! (COPY FROM) and re-attached, after which a full replay returns every event.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use factum::{
    AppendRequest, Error, EventFilter, EventId, EventStore, ExpectedVersion, LogPosition, NewEvent,
    RecordedEvent, StreamId, StreamVersion,
};
use factum_postgres::PostgresStore;
use factum_testkit::conformance::verify_log;
use factum_testkit::postgres::TestDatabase;
use futures_util::TryStreamExt;

const FIRST_END: i64 = 1_000_000_000;

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
    tokio::time::timeout(Duration::from_secs(180), f)
        .await
        .expect("the test finished in time")
}

/// Moves the sequence so that the next position is `next`.
async fn next_position(db: &TestDatabase, next: i64) {
    sqlx::query("SELECT setval('factum.events_global_position_seq', $1)")
        .bind(next - 1)
        .execute(db.pool())
        .await
        .expect("setval");
}

async fn read(store: &PostgresStore, id: &StreamId) -> Vec<RecordedEvent> {
    store
        .read_stream(id, StreamVersion::INITIAL)
        .try_collect()
        .await
        .expect("read stream")
}

async fn replay(store: &PostgresStore) -> Vec<EventId> {
    let mut all = Vec::new();
    let mut after = LogPosition::START;
    loop {
        let page = store
            .read_all(after, 250, &EventFilter::all())
            .await
            .expect("read_all");
        let Some(last) = page.last() else {
            return all;
        };
        after = last.position;
        all.extend(page.iter().map(|e| e.event_id));
    }
}

/// Eight writers append (1 to 3 events at a time; six on streams of their own, two racing on a
/// shared one) while maintenance keeps creating partitions of 40 positions a little ahead, and
/// a subscriber reads the log: every acknowledged event is in the log once, in the subscriber's
/// view once, stream versions are gapless, and the events spread over many partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_across_partition_rollovers_lose_and_repeat_nothing() {
    bounded(async {
        let db = TestDatabase::create().await;
        let store = db.store();
        next_position(&db, FIRST_END - 30).await;
        store
            .ensure_partitions(40, 40)
            .await
            .expect("first partitions");
        let writing = Arc::new(AtomicBool::new(true));

        let maintenance = {
            let store = store.clone();
            let writing = writing.clone();
            tokio::spawn(async move {
                let mut created = 0;
                while writing.load(Ordering::SeqCst) {
                    // Lock timeouts under load are fine: the next round catches up, and
                    // positions beyond the last range land in the default partition.
                    match store.ensure_partitions(40, 60).await {
                        Ok(new) => created += new.len(),
                        Err(e) => eprintln!("maintenance round failed: {e:?}"),
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                created
            })
        };
        let subscriber = {
            let store = store.clone();
            let writing = writing.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut after = LogPosition::START;
                loop {
                    let done = !writing.load(Ordering::SeqCst);
                    let page = store
                        .read_all(after, 100, &EventFilter::all())
                        .await
                        .expect("read_all");
                    match page.last() {
                        Some(last) => after = last.position,
                        None if done => return seen,
                        None => tokio::time::sleep(Duration::from_millis(5)).await,
                    }
                    seen.extend(page.into_iter().map(|e| e.event_id));
                }
            })
        };
        let writers: Vec<_> = (0..8_u64)
            .map(|w| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut acknowledged = Vec::new();
                    let id = if w < 6 {
                        stream(&format!("own-{w}"))
                    } else {
                        stream("shared-1")
                    };
                    for round in 0..40_u64 {
                        let batch: Vec<NewEvent> = (0..(1 + (w + round) % 3))
                            .map(|k| event(round * 10 + k))
                            .collect();
                        let ids: Vec<EventId> = batch.iter().map(|e| e.event_id).collect();
                        // `Any` on the shared stream: both writers' batches go in, in some order.
                        store
                            .append(
                                AppendRequest::new(id.clone(), batch)
                                    .expected_version(ExpectedVersion::Any),
                            )
                            .await
                            .expect("append");
                        acknowledged.extend(ids);
                    }
                    acknowledged
                })
            })
            .collect();
        let mut acknowledged = HashSet::new();
        for w in writers {
            acknowledged.extend(w.await.expect("writer"));
        }
        writing.store(false, Ordering::SeqCst);
        let created = maintenance.await.expect("maintenance");
        let seen = subscriber.await.expect("subscriber");

        let mut log = Vec::new();
        let summary = verify_log(&store, 500, |e| log.push(e.event_id)).await;
        assert_eq!(
            summary.events as usize,
            acknowledged.len(),
            "events lost or added"
        );
        assert_eq!(log.iter().copied().collect::<HashSet<_>>(), acknowledged);
        assert_eq!(
            seen, log,
            "the subscriber saw every event once, in log order"
        );
        assert!(
            created >= 3,
            "maintenance rolled over during the writes ({created} created)"
        );
        let homes: i64 = sqlx::query_scalar(
            "SELECT count(DISTINCT tableoid) FROM factum.events WHERE global_position >= $1",
        )
        .bind(FIRST_END)
        .fetch_one(db.pool())
        .await
        .expect("homes");
        assert!(homes >= 4, "the events span several partitions ({homes})");
        let below: i64 =
            sqlx::query_scalar("SELECT count(*) FROM factum.events WHERE global_position < $1")
                .bind(FIRST_END)
                .fetch_one(db.pool())
                .await
                .expect("count");
        assert!(below > 0, "the writes started in the first partition");
    })
    .await;
}

/// A stream read scans only the partitions at or after the stream's first position (and the
/// default one), as EXPLAIN ANALYZE of the store's own statement shows; the others are pruned
/// at run time from the `streams` row's first position.
#[tokio::test]
async fn explain_shows_a_stream_read_touching_only_the_partitions_that_can_hold_it() {
    bounded(async {
        let db = TestDatabase::create().await;
        let store = db.store();
        next_position(&db, FIRST_END).await;
        store.ensure_partitions(10, 45).await.expect("partitions");
        // old-1 fills events_p1000000000, mid-1 events_p1000000010, new-1 starts in
        // events_p1000000020 and spills into events_p1000000030.
        for (id, n) in [("old-1", 10), ("mid-1", 10), ("new-1", 14)] {
            store
                .append(
                    AppendRequest::new(stream(id), (1..=n).map(event).collect())
                        .expected_version(ExpectedVersion::NoStream),
                )
                .await
                .expect("append");
        }
        let plan = store
            .stream_read_plan(&stream("new-1"))
            .await
            .expect("plan");
        assert_eq!(
            plan.scanned,
            [
                "events_p1000000020",
                "events_p1000000030",
                "events_p1000000040",
                "events_default"
            ],
            "{:#}",
            plan.explain
        );
        for pruned in ["events_p0", "events_p1000000000", "events_p1000000010"] {
            assert!(
                plan.pruned.iter().any(|p| p == pruned),
                "{pruned} not pruned: {plan:?}"
            );
        }
        let plan = store
            .stream_read_plan(&stream("old-1"))
            .await
            .expect("plan");
        assert!(
            plan.scanned.iter().any(|p| p == "events_p1000000000"),
            "{plan:?}"
        );
        assert_eq!(plan.pruned, ["events_p0"], "{plan:?}");
        // The pruned read is the read: whole and in order.
        let events = read(&store, &stream("new-1")).await;
        assert_eq!(
            events
                .iter()
                .map(|e| e.stream_version.get())
                .collect::<Vec<_>>(),
            (1..=14).collect::<Vec<_>>()
        );
        // A stream created by an import prunes the same way.
        let imported =
            factum_postgres::ImportedEvent::new(stream("imp-1"), event(1), chrono::Utc::now());
        store
            .import(
                futures_util::stream::iter([Ok::<_, factum::BoxError>(imported)]),
                &factum_postgres::ImportOptions::default(),
                |_| {},
            )
            .await
            .expect("import");
        let plan = store
            .stream_read_plan(&stream("imp-1"))
            .await
            .expect("plan");
        assert!(
            plan.pruned.iter().any(|p| p == "events_p1000000020"),
            "{plan:?}"
        );
        assert_eq!(read(&store, &stream("imp-1")).await.len(), 1);
    })
    .await;
}

/// Detach a partition of archived streams, take it out of the database (COPY TO, DROP TABLE),
/// keep appending and reading; restore it (the book's COPY recipe) and re-attach it: a full
/// replay returns every event again, in the original order.
#[tokio::test]
async fn a_partition_moved_to_cold_storage_and_back_is_replayed_whole() {
    bounded(async {
        let db = TestDatabase::create().await;
        let store = db.store();
        next_position(&db, FIRST_END).await;
        store.ensure_partitions(10, 25).await.expect("partitions");
        let old = stream("old-1");
        let new = stream("new-1");
        store
            .append(
                AppendRequest::new(old.clone(), (1..=10).map(event).collect())
                    .expected_version(ExpectedVersion::NoStream),
            )
            .await
            .expect("old");
        store
            .append(AppendRequest::new(new.clone(), vec![event(1)]))
            .await
            .expect("new");
        let before = replay(&store).await;
        assert_eq!(before.len(), 11);

        store.archive_stream(&old).await.expect("archive");
        store
            .detach_partition("events_p1000000000")
            .await
            .expect("detach");
        // Cold storage: the rows out to a file (here, memory), the table dropped.
        let dump = {
            let mut conn = db.pool().acquire().await.expect("conn");
            let mut out = conn
                .copy_out_raw("COPY factum.events_p1000000000 TO STDOUT")
                .await
                .expect("copy out");
            let mut bytes = Vec::new();
            while let Some(chunk) = out.try_next().await.expect("copy data") {
                bytes.extend_from_slice(&chunk);
            }
            bytes
        };
        sqlx::query("DROP TABLE factum.events_p1000000000")
            .execute(db.pool())
            .await
            .expect("drop");

        // The hot path goes on without it.
        store
            .append(
                AppendRequest::new(new.clone(), vec![event(2)])
                    .expected_version(ExpectedVersion::Exact(StreamVersion::new(1))),
            )
            .await
            .expect("append after the detach");
        assert_eq!(read(&store, &new).await.len(), 2);
        assert!(read(&store, &old).await.is_empty());
        let hot = replay(&store).await;
        assert_eq!(hot.len(), 2);
        let refused = store
            .attach_partition("events_p1000000000")
            .await
            .expect_err("no such table yet");
        assert!(refused.to_string().contains("restore it"), "{refused}");

        // Back from cold storage: the book's recipe for a COPY dump.
        for sql in [
            "CREATE TABLE factum.events_p1000000000 \
             (LIKE factum.events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)",
            "CREATE UNIQUE INDEX events_p1000000000_stream_version_uq \
             ON factum.events_p1000000000 (stream_id, stream_version)",
            "CREATE UNIQUE INDEX events_p1000000000_event_id_uq \
             ON factum.events_p1000000000 (event_id)",
            "ALTER TABLE factum.events_p1000000000 ADD CONSTRAINT events_p1000000000_bounds \
             CHECK (global_position >= 1000000000 AND global_position < 1000000010)",
        ] {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(db.pool())
                .await
                .expect(sql);
        }
        {
            let mut conn = db.pool().acquire().await.expect("conn");
            let mut copy = conn
                .copy_in_raw("COPY factum.events_p1000000000 FROM STDIN")
                .await
                .expect("copy in");
            copy.send(dump).await.expect("send");
            assert_eq!(copy.finish().await.expect("finish"), 10);
        }
        let attached = store
            .attach_partition("events_p1000000000")
            .await
            .expect("attach");
        assert_eq!(
            (attached.from, attached.to),
            (Some(FIRST_END as u64), Some(FIRST_END as u64 + 10))
        );
        let again = store
            .attach_partition("events_p1000000000")
            .await
            .expect_err("attached already");
        assert!(matches!(again, Error::InvalidArgument(_)), "{again:?}");

        // A full replay returns every event: the old ones in their original place.
        let after = replay(&store).await;
        assert_eq!(after.len(), 12);
        assert_eq!(&after[..11], &before[..], "the original order");
        assert_eq!(read(&store, &old).await.len(), 10);
        let summary = verify_log(&store, 5, |_| {}).await;
        assert_eq!((summary.events, summary.streams), (12, 2));
        // The partition can go again, the same way.
        store
            .detach_partition("events_p1000000000")
            .await
            .expect("detach again");
        store
            .attach_partition("events_p1000000000")
            .await
            .expect("attach again");
        assert_eq!(replay(&store).await.len(), 12);
    })
    .await;
}

/// Retention reaches detached partitions only by hand: a detached partition holding a stream
/// deleted since is refused at attach time, naming the stream; once its rows are deleted from the
/// table it attaches, and the deleted stream stays deleted.
#[tokio::test]
async fn a_detached_partition_with_a_stream_deleted_since_is_refused_until_cleaned() {
    bounded(async {
        let db = TestDatabase::create().await;
        let store = db.store();
        next_position(&db, FIRST_END).await;
        store.ensure_partitions(10, 25).await.expect("partitions");
        let gone = stream("gone-1");
        let kept = stream("kept-1");
        store
            .append(AppendRequest::new(gone.clone(), (1..=5).map(event).collect()))
            .await
            .expect("gone");
        store
            .append(AppendRequest::new(kept.clone(), (1..=5).map(event).collect()))
            .await
            .expect("kept");
        store
            .append(AppendRequest::new(stream("tail-1"), vec![event(1)]))
            .await
            .expect("tail");
        store.archive_stream(&gone).await.expect("archive");
        store.archive_stream(&kept).await.expect("archive");
        store.detach_partition("events_p1000000000").await.expect("detach");
        store.delete_stream(&gone).await.expect("delete");

        let refused = store
            .attach_partition("events_p1000000000")
            .await
            .expect_err("holds a deleted stream");
        assert!(
            matches!(&refused, Error::InvalidArgument(m) if m.contains("gone-1") && m.contains("deleted")),
            "{refused:?}"
        );
        sqlx::query("DELETE FROM factum.events_p1000000000 WHERE stream_id = 'gone-1'")
            .execute(db.pool())
            .await
            .expect("clean");
        store.attach_partition("events_p1000000000").await.expect("attach");
        assert_eq!(read(&store, &kept).await.len(), 5);
        let gone_events = read(&store, &gone).await;
        assert_eq!(gone_events.len(), 1, "only the tombstone");
        assert_eq!(gone_events[0].event_type, factum::STREAM_DELETED);
    })
    .await;
}
