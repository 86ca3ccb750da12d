//! The operator views of a store (`admin.rs`) against PostgreSQL: migration checksums, stream
//! listing and paging, consumers with lag and lease, dead letters of every consumer, snapshot
//! summaries and purges, checkpoint resets.

use chrono::Utc;
use factum::subscription::{CheckpointStore, DeadLetterStore, Lease, ParkedEvent};
use factum::{
    AppendRequest, EventId, EventStore, GlobalPosition, LogPosition, NewEvent, SnapshotStore,
    StoredSnapshot, StreamId, StreamVersion,
};
use factum_postgres::subscription::PgLease;
use factum_testkit::postgres::TestDatabase;
use futures_util::TryStreamExt;

fn event() -> NewEvent {
    NewEvent {
        event_id: EventId::new(),
        event_type: "test.event".into(),
        schema_version: 1,
        payload: serde_json::value::to_raw_value(&serde_json::json!({ "n": 1 })).expect("json"),
        metadata: Default::default(),
    }
}

fn stream(id: &str) -> StreamId {
    StreamId::new(id).expect("stream id")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_status_reports_applied_and_edited_migrations() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let status = store.migration_status().await.expect("status");
    assert!(status.len() >= 4);
    assert!(
        status
            .iter()
            .all(|m| m.applied_at.is_some() && m.checksum_ok)
    );
    assert_eq!(status[0].version, 1);
    assert_eq!(status[0].description, "events");

    // An applied migration whose recorded checksum differs: edited after it was applied.
    sqlx::query("UPDATE factum._sqlx_migrations SET checksum = '\\x00' WHERE version = 3")
        .execute(db.pool())
        .await
        .expect("tamper");
    let status = store.migration_status().await.expect("status");
    let edited: Vec<i64> = status
        .iter()
        .filter(|m| !m.checksum_ok)
        .map(|m| m.version)
        .collect();
    assert_eq!(edited, [3]);

    let ready = store.readiness_check().await;
    assert!(ready.ok, "{ready:?}");

    // A schema never migrated: every migration pending.
    let other = db.store_with(
        factum_postgres::StoreOptions::default()
            .with_schema(factum_postgres::SchemaName::new("fresh").expect("valid")),
    );
    let pending = other.migration_status().await.expect("status");
    assert!(
        pending
            .iter()
            .all(|m| m.applied_at.is_none() && m.checksum_ok)
    );
    let not_ready = other.readiness_check().await;
    assert!(!not_ready.ok);
    assert!(
        not_ready.detail.contains("run the migrations"),
        "{not_ready:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_consumers_dead_letters_and_snapshots() {
    let db = TestDatabase::create().await;
    let store = db.patient_store();
    for id in ["order-1", "order-2", "order-3", "user-1"] {
        store
            .append(AppendRequest::new(stream(id), vec![event(), event()]))
            .await
            .expect("append");
    }

    // Streams by category, paged.
    let orders = store
        .list_streams(Some("order"), None, 2)
        .await
        .expect("list");
    let ids: Vec<&str> = orders.iter().map(|s| s.stream_id.as_str()).collect();
    assert_eq!(ids, ["order-1", "order-2"]);
    assert_eq!(orders[0].version, StreamVersion::new(2));
    assert_eq!(orders[0].category, "order");
    let next = store
        .list_streams(Some("order"), Some(&orders[1].stream_id), 2)
        .await
        .expect("list");
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].stream_id.as_str(), "order-3");
    assert_eq!(
        store
            .list_streams(None, None, 100)
            .await
            .expect("all")
            .len(),
        4
    );

    // Consumers: lag behind the newest event, parked count, whether a lease is held.
    let events: Vec<_> = store
        .read_all(LogPosition::START, 100, &Default::default())
        .await
        .expect("read");
    assert_eq!(events.len(), 8);
    let third = events[2].position;
    assert_eq!(
        store.event_position(third.global).await.expect("position"),
        Some(third)
    );
    assert_eq!(
        store
            .event_position(GlobalPosition::new(9_999))
            .await
            .expect("position"),
        None
    );
    store.save_checkpoint("running", third).await.expect("save");
    store
        .save_checkpoint("idle", events[7].position)
        .await
        .expect("save");
    store
        .park(ParkedEvent {
            subscription: "running".into(),
            event: events[0].clone(),
            error: "boom".into(),
            attempts: 3,
            parked_at: Utc::now(),
        })
        .await
        .expect("park");
    let lease = PgLease::new(&store);
    let _held = lease
        .try_acquire("running")
        .await
        .expect("lease")
        .expect("free");
    let consumers = store.consumers().await.expect("consumers");
    let names: Vec<&str> = consumers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["idle", "running"]);
    let (idle, running) = (&consumers[0], &consumers[1]);
    assert_eq!((idle.lag_events, idle.parked, idle.leased), (0, 0, false));
    assert_eq!(running.position, third);
    assert_eq!(
        running.lag_events,
        events[7].position.global.get() - third.global.get()
    );
    assert_eq!((running.parked, running.leased), (1, true));

    // Dead letters of every consumer, or of one.
    assert_eq!(store.dead_letters(None).await.expect("all").len(), 1);
    assert!(
        store
            .dead_letters(Some("idle"))
            .await
            .expect("idle")
            .is_empty()
    );
    let parked = store.dead_letters(Some("running")).await.expect("running");
    assert_eq!(parked[0].event.event_id, events[0].event_id);
    assert_eq!(parked[0].error, "boom");

    // Checkpoint reset returns where it was.
    let before = store
        .reset_checkpoint("running", LogPosition::START)
        .await
        .expect("reset");
    assert_eq!(before, Some(third));
    assert_eq!(
        store.load_checkpoint("running").await.expect("load"),
        Some(LogPosition::START)
    );

    // Snapshots per category; purge one category.
    for id in ["order-1", "order-2", "user-1"] {
        store
            .save_snapshot(StoredSnapshot {
                stream_id: stream(id),
                stream_version: StreamVersion::new(1),
                schema_version: 1,
                state: serde_json::value::to_raw_value(&serde_json::json!({ "s": 1 }))
                    .expect("json"),
                taken_at: Utc::now(),
            })
            .await
            .expect("snapshot");
    }
    let summary = store.snapshot_summary().await.expect("summary");
    assert_eq!(summary.len(), 2);
    assert_eq!(
        (
            summary[0].category.as_str(),
            summary[0].count,
            summary[0].events_behind
        ),
        ("order", 2, 2)
    );
    assert!(summary[0].bytes > 0);
    assert_eq!(
        store
            .purge_snapshots(Some("order"), None)
            .await
            .expect("purge"),
        2
    );
    assert_eq!(
        store
            .purge_snapshots(None, Some(Utc::now() - chrono::Duration::hours(1)))
            .await
            .expect("purge nothing older"),
        0
    );
    let left = store.snapshot_summary().await.expect("summary");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].category, "user");
    let read: Vec<_> = store
        .read_stream(&stream("order-1"), StreamVersion::INITIAL)
        .try_collect()
        .await
        .expect("events stay");
    assert_eq!(read.len(), 2);
}
