//! Time-rolled partitions: the partition size follows the write rate observed over the last
//! window, so a partition holds about one window of events.

use factum::{AppendRequest, EventId, EventStore, NewEvent, StreamId};
use factum_testkit::postgres::TestDatabase;

const FIRST_END: i64 = 1_000_000_000;

fn event() -> NewEvent {
    NewEvent {
        event_id: EventId::new(),
        event_type: "test.event".into(),
        schema_version: 1,
        payload: serde_json::value::to_raw_value(&serde_json::json!({})).expect("json"),
        metadata: Default::default(),
    }
}

/// 1000 events, their recorded-at spread `per_event_secs` apart, ending now; positions start
/// just below the end of the first partition.
async fn history(db: &TestDatabase, per_event_secs: i64) {
    sqlx::query("SELECT setval('factum.events_global_position_seq', $1)")
        .bind(FIRST_END - 2000)
        .execute(db.pool())
        .await
        .expect("setval");
    let store = db.store();
    for s in 0..10 {
        store
            .append(AppendRequest::new(
                StreamId::new(format!("meter-{s}")).expect("id"),
                (0..100).map(|_| event()).collect(),
            ))
            .await
            .expect("appends");
    }
    sqlx::query(
        "UPDATE factum.events SET recorded_at = now() - \
         ((SELECT max(global_position) FROM factum.events) - global_position) * make_interval(secs => $1)",
    )
    .bind(per_event_secs as f64)
    .execute(db.pool())
    .await
    .expect("spreads the history");
}

#[tokio::test]
async fn a_partition_holds_about_one_window_at_the_observed_rate() {
    let db = TestDatabase::create().await;
    // 100 events a day over ten days.
    history(&db, 864).await;
    let store = db.store();
    let week = chrono::Duration::days(7);
    let (created, size) = store
        .ensure_partitions_for_window(week, 2, 10)
        .await
        .expect("ensures partitions");
    // The last 7 days hold 700 events (the first one at exactly 7 days ago included).
    assert!((699..=702).contains(&size), "size {size}");
    // Created from the end of the first partition, covering two windows past the last position.
    let last: i64 = sqlx::query_scalar("SELECT max(global_position) FROM factum.events")
        .fetch_one(db.pool())
        .await
        .expect("max");
    assert_eq!(created[0].from, Some(FIRST_END as u64));
    assert!(created.iter().all(|p| p.to == p.from.map(|f| f + size)));
    let covered = created.last().and_then(|p| p.to).expect("created");
    assert!(covered > last as u64 + 2 * size, "{created:?}");
    // A second call with the same rate has the headroom already.
    let (again, _) = store
        .ensure_partitions_for_window(week, 2, 10)
        .await
        .expect("ensures partitions");
    assert!(again.is_empty(), "{again:?}");
}

#[tokio::test]
async fn a_young_log_is_extrapolated_and_a_tiny_one_gets_the_minimum() {
    let db = TestDatabase::create().await;
    // 1000 events over one day: 7000 a week.
    history(&db, 86).await;
    let store = db.store();
    let (_, size) = store
        .ensure_partitions_for_window(chrono::Duration::days(7), 1, 10)
        .await
        .expect("ensures partitions");
    assert!((6900..=7100).contains(&size), "size {size}");
    // 1000 events recorded at one instant are under 1% of a week of history: the minimum.
    let db = TestDatabase::create().await;
    history(&db, 0).await;
    let (_, size) = db
        .store()
        .ensure_partitions_for_window(chrono::Duration::days(7), 1, 5000)
        .await
        .expect("ensures partitions");
    assert_eq!(size, 5000);
    let refused = db
        .store()
        .ensure_partitions_for_window(chrono::Duration::zero(), 1, 1)
        .await
        .expect_err("a zero window");
    assert_eq!(refused.kind(), factum::ErrorKind::InvalidArgument);
}
