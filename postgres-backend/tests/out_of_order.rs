//! Gap safety: a transaction that takes a lower position but commits later is never skipped.
//!
//! Alone in its binary: it holds a writing transaction open on purpose, which stalls every reader
//! of the global log in the cluster until it ends.

use std::time::Duration;

use factum::{EventFilter, EventStore, ExpectedVersion, LogPosition, NewEvent, StreamId};
use factum_postgres::StoreOptions;
use factum_testkit::postgres::TestDatabase;

fn event(n: u64) -> NewEvent {
    NewEvent {
        event_id: factum::EventId::new(),
        event_type: "test.event".into(),
        schema_version: 1,
        payload: serde_json::value::to_raw_value(&serde_json::json!({ "n": n })).expect("json"),
        metadata: Default::default(),
    }
}

#[tokio::test]
async fn a_late_commit_with_a_lower_position_is_not_skipped() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let db = TestDatabase::create().await;
        // Three readers: one that does not wait for transactions in flight (it shows the raw
        // horizon), one with the default wait, which gives up while A is open, and one that waits
        // long enough for any other test's transactions once A has committed. The first two are
        // the ones read while A is open: each of their reads returns only after its wait.
        let impatient =
            db.store_with(StoreOptions::default().with_read_settle_timeout(Duration::ZERO));
        let store = db.store();
        let patient = db.patient_store();

        // A: takes the lower position (and transaction id) and stays open.
        let mut a = db.pool().begin().await.expect("begin A");
        let a_id = factum::EventId::new();
        let a_position: i64 = sqlx::query_scalar(
            "INSERT INTO factum.events (stream_id, stream_version, event_id, event_type, schema_version, payload) \
             VALUES ('order-a', 1, $1, 'test.event', 1, '{\"n\": 1}') RETURNING global_position",
        )
        .bind(a_id.as_uuid())
        .fetch_one(&mut *a)
        .await
        .expect("insert A");

        // B: a whole append, committed first, with a higher position.
        let b = store
            .append(factum::AppendRequest::new(StreamId::new("order-b").expect("id"), vec![event(2)]).expected_version(ExpectedVersion::NoStream))
            .await
            .expect("append B");
        assert!(b.positions[0].get() > u64::try_from(a_position).expect("positive"));

        // While A is open, neither reader returns B (which would let a checkpoint pass A).
        for reader in [&impatient, &store] {
            let page = reader
                .read_all(LogPosition::START, 10, &EventFilter::all())
                .await
                .expect("read all");
            assert!(page.is_empty(), "B was returned before A committed: {page:?}");
        }

        a.commit().await.expect("commit A");

        // After A commits, both come back, A first.
        let page = patient
            .read_all(LogPosition::START, 10, &EventFilter::all())
            .await
            .expect("read all");
        let ids: Vec<_> = page.iter().map(|e| e.event_id).collect();
        assert_eq!(ids.len(), 2, "{page:?}");
        assert_eq!(ids[0], a_id, "A sorts first");
        assert!(page[0].position < page[1].position);
        // Resuming after A returns exactly B.
        let rest = patient
            .read_all(page[0].position, 10, &EventFilter::all())
            .await
            .expect("read all");
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].global_position(), b.positions[0]);
    })
    .await
    .expect("the test finished in time");
}
