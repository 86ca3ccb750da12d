//! Group commit: requests that share a statement keep their own verdicts.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use factum::{
    AppendRequest, AppendResult, Error, EventId, EventStore, ExpectedVersion, IdempotencyKey,
    NewEvent, StreamId, StreamVersion,
};
use factum_postgres::{GroupCommit, PostgresStore, StoreOptions};
use factum_testkit::postgres::TestDatabase;

type Append<'a> = Pin<Box<dyn Future<Output = Result<AppendResult, Error>> + Send + 'a>>;

fn event(payload: &str) -> NewEvent {
    NewEvent {
        event_id: EventId::new(),
        event_type: "group.tested".into(),
        schema_version: 1,
        payload: serde_json::value::RawValue::from_string(payload.to_owned()).expect("json"),
        metadata: Default::default(),
    }
}

fn stream(name: &str) -> StreamId {
    StreamId::new(name).expect("id")
}

/// A store that runs one append statement at a time, so everything sent while one is in flight
/// queues and goes out as one group.
fn one_at_a_time(db: &TestDatabase) -> PostgresStore {
    db.store_with(
        StoreOptions::default().with_group_commit(GroupCommit::enabled().with_max_in_flight(1)),
    )
}

/// Polls `append` once: far enough to queue it behind the statement in flight.
async fn queue(append: &mut Append<'_>) {
    poll_fn(|cx| {
        assert!(
            append.as_mut().poll(cx).is_pending(),
            "the append should wait behind the statement in flight"
        );
        Poll::Ready(())
    })
    .await;
}

/// Holds the `streams` row of `blocker` in a transaction, starts an append to it (which takes
/// the store's only statement slot and waits for the row), and returns both once the server
/// shows the append waiting for the lock.
async fn hold_the_slot(
    db: &TestDatabase,
    store: &PostgresStore,
    blocker: &StreamId,
) -> (
    sqlx::Transaction<'static, sqlx::Postgres>,
    tokio::task::JoinHandle<Result<AppendResult, Error>>,
) {
    store
        .append(AppendRequest::new(blocker.clone(), vec![event("1")]))
        .await
        .expect("blocker stream");
    let mut tx = db.pool().begin().await.expect("tx");
    sqlx::query("SELECT version FROM factum.streams WHERE stream_id = $1 FOR UPDATE")
        .bind(blocker.as_str())
        .fetch_one(&mut *tx)
        .await
        .expect("lock the row");
    let first = tokio::spawn({
        let store = store.clone();
        let request = AppendRequest::new(blocker.clone(), vec![event("2")])
            .expected_version(ExpectedVersion::Exact(StreamVersion::new(1)));
        async move { store.append(request).await }
    });
    // The server is the synchronisation point: wait until it reports the append blocked.
    let waiting = async {
        loop {
            let blocked: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(db.pool())
            .await
            .expect("pg_stat_activity");
            if blocked > 0 {
                return;
            }
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("the first append waits for the row lock");
    (tx, first)
}

async fn commit_of(db: &TestDatabase, stream: &StreamId) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT transaction_id::text FROM factum.events WHERE stream_id = $1 ORDER BY stream_version",
    )
    .bind(stream.as_str())
    .fetch_all(db.pool())
    .await
    .expect("transaction ids")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_appends_share_one_statement_and_keep_their_own_checks() {
    let db = TestDatabase::create().await;
    let store = one_at_a_time(&db);
    let (existing, repeated, keyed) = (
        stream("g-existing"),
        stream("g-repeated"),
        stream("g-keyed"),
    );
    store
        .append(AppendRequest::new(
            existing.clone(),
            vec![event("1"), event("2")],
        ))
        .await
        .expect("existing");
    let stored = event("3");
    store
        .append(AppendRequest::new(repeated.clone(), vec![stored.clone()]))
        .await
        .expect("repeated");
    store
        .append(
            AppendRequest::new(keyed.clone(), vec![event("4")])
                .idempotency_key(IdempotencyKey::new("g-key").expect("key")),
        )
        .await
        .expect("keyed");

    let blocker = stream("g-blocker");
    let (tx, first) = hold_the_slot(&db, &store, &blocker).await;
    let (fresh, any, taken) = (stream("g-fresh"), stream("g-any"), stream("g-taken"));
    let mut queued: Vec<Append<'_>> = vec![
        // A new stream, and one appended to at any version.
        Box::pin(
            store.append(
                AppendRequest::new(fresh.clone(), vec![event("5"), event("6")])
                    .expected_version(ExpectedVersion::NoStream)
                    .idempotency_key(IdempotencyKey::new("g-new-key").expect("key")),
            ),
        ),
        Box::pin(store.append(AppendRequest::new(any.clone(), vec![event("7")]))),
        // A stale version: a conflict for this request only.
        Box::pin(
            store.append(
                AppendRequest::new(existing.clone(), vec![event("8")])
                    .expected_version(ExpectedVersion::Exact(StreamVersion::new(1))),
            ),
        ),
        // `NoStream` on a stream that exists.
        Box::pin(
            store.append(
                AppendRequest::new(keyed.clone(), vec![event("9")])
                    .expected_version(ExpectedVersion::NoStream),
            ),
        ),
        // A repeat by event id, and a repeat by key (with other ids).
        Box::pin(store.append(AppendRequest::new(repeated.clone(), vec![stored]))),
        Box::pin(
            store.append(
                AppendRequest::new(taken.clone(), vec![event("10")])
                    .idempotency_key(IdempotencyKey::new("g-key").expect("key")),
            ),
        ),
    ];
    for append in &mut queued {
        queue(append).await;
    }
    tx.commit().await.expect("release the row");
    let first = first.await.expect("task").expect("the blocked append");
    assert_eq!(first.first_version, StreamVersion::new(1));
    let outcomes = futures_util::future::join_all(queued).await;
    let mut outcomes = outcomes.into_iter();

    let fresh_result = outcomes.next().expect("fresh").expect("a new stream");
    assert_eq!(fresh_result.first_version, StreamVersion::INITIAL);
    assert_eq!(fresh_result.stream_version, StreamVersion::new(2));
    assert!(!fresh_result.duplicate);
    let any_result = outcomes.next().expect("any").expect("any version");
    assert_eq!(any_result.stream_version, StreamVersion::new(1));
    match outcomes.next().expect("stale") {
        Err(Error::Conflict { actual, .. }) => assert_eq!(actual, StreamVersion::new(2)),
        other => panic!("a stale version must conflict: {other:?}"),
    }
    match outcomes.next().expect("no stream") {
        Err(Error::Conflict { actual, .. }) => assert_eq!(actual, StreamVersion::new(1)),
        other => panic!("NoStream on an existing stream must conflict: {other:?}"),
    }
    let repeat = outcomes.next().expect("repeat").expect("a repeat by ids");
    assert!(repeat.duplicate);
    assert_eq!(repeat.stream, repeated);
    match outcomes.next().expect("key") {
        Err(Error::IdempotencyKeyReused { stored_stream, .. }) => assert_eq!(stored_stream, keyed),
        other => panic!("a key stored for another stream: {other:?}"),
    }

    // The two that stored shared one statement; the others stored nothing.
    let fresh_tx = commit_of(&db, &fresh).await;
    assert_eq!(fresh_tx.len(), 2);
    assert_eq!(fresh_tx[0], fresh_tx[1]);
    assert_eq!(commit_of(&db, &any).await, vec![fresh_tx[0].clone()]);
    assert_eq!(
        store.stream_version(&existing).await.expect("v"),
        StreamVersion::new(2)
    );
    assert_eq!(
        store.stream_version(&keyed).await.expect("v"),
        StreamVersion::new(1)
    );
    assert_eq!(
        store.stream_version(&taken).await.expect("v"),
        StreamVersion::INITIAL
    );
    let outcome = store
        .idempotency_outcome(&IdempotencyKey::new("g-new-key").expect("key"))
        .await
        .expect("key lookup")
        .expect("the new key is stored with its batch");
    assert_eq!(outcome.positions, fresh_result.positions);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_the_server_refuses_leaves_each_request_its_own_verdict() {
    let db = TestDatabase::create().await;
    let store = one_at_a_time(&db);
    let blocker = stream("b-blocker");
    let (tx, first) = hold_the_slot(&db, &store, &blocker).await;
    let (good, bad, other) = (stream("b-good"), stream("b-bad"), stream("b-other"));
    let mut queued: Vec<Append<'_>> = vec![
        Box::pin(store.append(AppendRequest::new(good.clone(), vec![event("1")]))),
        // Valid JSON that `jsonb` refuses: the whole statement fails on the server.
        Box::pin(store.append(AppendRequest::new(bad.clone(), vec![event(r#""\u0000""#)]))),
        Box::pin(store.append(AppendRequest::new(other.clone(), vec![event("2")]))),
    ];
    for append in &mut queued {
        queue(append).await;
    }
    tx.commit().await.expect("release the row");
    first.await.expect("task").expect("the blocked append");
    let mut outcomes = futures_util::future::join_all(queued).await.into_iter();
    assert_eq!(
        outcomes.next().expect("good").expect("good").stream_version,
        StreamVersion::new(1)
    );
    match outcomes.next().expect("bad") {
        Err(Error::Permanent { .. }) => {}
        other => panic!("the refused payload fails alone: {other:?}"),
    }
    assert_eq!(
        outcomes
            .next()
            .expect("other")
            .expect("other")
            .stream_version,
        StreamVersion::new(1)
    );
    assert_eq!(
        store.stream_version(&bad).await.expect("v"),
        StreamVersion::INITIAL
    );
    // After the refused group, each ran alone.
    assert_ne!(commit_of(&db, &good).await, commit_of(&db, &other).await);
}
