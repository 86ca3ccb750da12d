//! `PgInbox`: each message's effect once, even when two instances receive it at the same time;
//! parked messages kept as received and removed with the retry that commits.

use std::time::Duration;

use factum::bus::{BusMessage, Inbox, ParkedMessage, ServiceName};
use factum::{
    EventId, EventMetadata, GlobalPosition, LogPosition, RawValue, RecordedEvent, StreamId,
    StreamVersion,
};
use factum_postgres::PgInbox;
use factum_testkit::postgres::TestDatabase;

fn message() -> BusMessage {
    BusMessage::new(
        "orders.order.order.placed",
        ServiceName::new("orders").expect("valid"),
        RecordedEvent {
            event_id: EventId::new(),
            stream_id: StreamId::new("order-1").expect("valid"),
            stream_version: StreamVersion::new(1),
            position: LogPosition::new(1, GlobalPosition::new(1)),
            event_type: "order.placed".into(),
            schema_version: 1,
            payload: RawValue::from_string("{}".into()).expect("json"),
            metadata: EventMetadata::default(),
            recorded_at: chrono::Utc::now(),
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_receiving_one_message_apply_it_once() {
    let db = TestDatabase::create().await;
    let inbox = PgInbox::new(&db.store());
    let sent = message();
    let mut first = inbox
        .begin("billing", &sent)
        .await
        .expect("begin")
        .expect("new");
    sqlx::query("CREATE TABLE effects (event_id uuid)")
        .execute(db.pool())
        .await
        .expect("table");
    sqlx::query("INSERT INTO effects VALUES ($1)")
        .bind(sent.event.event_id.as_uuid())
        .execute(first.conn())
        .await
        .expect("effect");
    // The second instance's insert waits for the first transaction...
    let second = tokio::spawn({
        let inbox = inbox.clone();
        let sent = sent.clone();
        async move {
            inbox
                .begin("billing", &sent)
                .await
                .expect("begin")
                .is_some()
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !second.is_finished(),
        "blocked behind the first instance's row"
    );
    inbox.commit(first).await.expect("commit");
    // ...and then finds the row: no second effect.
    assert!(
        !second.await.expect("task"),
        "the second instance sees it handled"
    );
    let effects: i64 = sqlx::query_scalar("SELECT count(*) FROM effects")
        .fetch_one(db.pool())
        .await
        .expect("count");
    assert_eq!(effects, 1);
    assert!(
        inbox
            .contains("billing", sent.event.event_id)
            .await
            .expect("lookup")
    );
    assert!(
        !inbox
            .contains("shipping", sent.event.event_id)
            .await
            .expect("lookup"),
        "per consumer"
    );

    // A rolled-back unit of work records nothing.
    let other = message();
    let tx = inbox
        .begin("billing", &other)
        .await
        .expect("begin")
        .expect("new");
    inbox.rollback(tx).await;
    assert!(
        !inbox
            .contains("billing", other.event.event_id)
            .await
            .expect("lookup")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_messages_are_kept_as_received_and_removed_with_the_retry_that_commits() {
    let db = TestDatabase::create().await;
    let inbox = PgInbox::new(&db.store());
    let sent = message();
    let parked = ParkedMessage::stored(
        0,
        "billing".into(),
        sent.subject.clone(),
        Some(sent.message_id()),
        sent.headers()
            .into_iter()
            .map(|(n, v)| (n.to_owned(), v))
            .collect(),
        sent.body().to_vec(),
        "the handler is broken".into(),
        3,
        chrono::Utc::now(),
    );
    let id = inbox.park(parked.clone()).await.expect("park");
    // Parked again (it came again and failed again): still one dead letter, the latest error.
    let mut again = parked.clone();
    again.error = "still broken".into();
    assert_eq!(inbox.park(again).await.expect("park again"), id);
    let mut other = parked;
    other.message_id = Some(EventId::new().to_string());
    let second = inbox.park(other).await.expect("park another");
    let listed = inbox.parked("billing").await.expect("list");
    assert_eq!(
        listed.iter().map(|p| p.id).collect::<Vec<_>>(),
        vec![id, second],
        "oldest first"
    );
    assert_eq!(
        listed[0]
            .decode()
            .expect("decodes as received")
            .event
            .event_id,
        sent.event.event_id
    );
    assert_eq!(
        (listed[0].attempts, listed[0].error.as_str()),
        (3, "still broken")
    );
    assert!(inbox.parked("shipping").await.expect("list").is_empty());

    // A retry that rolls back leaves it parked; one that commits removes it.
    let mut tx = inbox
        .begin("billing", &sent)
        .await
        .expect("begin")
        .expect("new");
    assert!(inbox.unpark(&mut tx, "billing", id).await.expect("unpark"));
    inbox.rollback(tx).await;
    assert_eq!(inbox.parked("billing").await.expect("list").len(), 2);
    let mut tx = inbox
        .begin("billing", &sent)
        .await
        .expect("begin")
        .expect("new");
    assert!(inbox.unpark(&mut tx, "billing", id).await.expect("unpark"));
    inbox.commit(tx).await.expect("commit");
    assert_eq!(inbox.parked("billing").await.expect("list").len(), 1);
    assert!(inbox.discard("billing", second).await.expect("discard"));
    assert!(
        !inbox
            .discard("billing", second)
            .await
            .expect("discard again")
    );
    assert!(inbox.parked("billing").await.expect("list").is_empty());
    assert_eq!(
        inbox
            .expire(chrono::Utc::now() + chrono::Duration::seconds(1))
            .await
            .expect("expire"),
        1
    );
}
