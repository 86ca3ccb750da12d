//! Archived streams accept no appends: every expected-version form, keyed or not, one event or a
//! batch, through the store, a caller's transaction and the repository; an archive racing with
//! writers on a multi-threaded runtime lets no append through once it returned.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use factum::{
    AppendRequest, CommandContext, CommandError, Error, ErrorKind, EventId, EventStore,
    ExpectedVersion, IdempotencyKey, NewEvent, Repository, StreamId, StreamVersion,
};
use factum_postgres::PostgresStore;
use factum_testkit::conformance::{Counter, Increment};
use factum_testkit::postgres::TestDatabase;

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

async fn rows(db: &TestDatabase, id: &StreamId) -> (i64, i64) {
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM factum.events WHERE stream_id = $1")
        .bind(id.as_str())
        .fetch_one(db.pool())
        .await
        .expect("count events");
    let version: i64 =
        sqlx::query_scalar("SELECT version FROM factum.streams WHERE stream_id = $1")
            .bind(id.as_str())
            .fetch_one(db.pool())
            .await
            .expect("stream row");
    (events, version)
}

fn assert_archived(result: Result<factum::AppendResult, Error>, id: &StreamId, what: &str) {
    match result {
        Err(Error::StreamArchived { stream }) => assert_eq!(&stream, id, "{what}"),
        other => panic!("{what}: expected StreamArchived, got {other:?}"),
    }
}

#[tokio::test]
async fn every_append_to_an_archived_stream_is_refused_and_stores_nothing() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let id = stream("order-1");
    let first = event();
    let stored = store
        .append(
            AppendRequest::new(id.clone(), vec![first.clone(), event()])
                .expected_version(ExpectedVersion::NoStream),
        )
        .await
        .expect("appends");
    assert!(store.archive_stream(&id).await.expect("archives"));
    let before = rows(&db, &id).await;
    assert_eq!(before, (2, 2));

    let at = ExpectedVersion::Exact(StreamVersion::new(2));
    for (what, expected) in [
        ("exact", at),
        ("any", ExpectedVersion::Any),
        ("no stream", ExpectedVersion::NoStream),
    ] {
        for batch in [1, 3] {
            let events: Vec<NewEvent> = (0..batch).map(|_| event()).collect();
            let plain = AppendRequest::new(id.clone(), events.clone()).expected_version(expected);
            assert_archived(store.append(plain).await, &id, what);
            let keyed = AppendRequest::new(id.clone(), events)
                .expected_version(expected)
                .idempotency_key(IdempotencyKey::new(format!("k-{what}-{batch}")).expect("key"));
            assert_archived(store.append(keyed).await, &id, what);
        }
    }
    // In a caller's transaction too.
    let mut tx = db.pool().begin().await.expect("begin");
    let result = store
        .append_in(
            &mut tx,
            AppendRequest::new(id.clone(), vec![event()]).expected_version(at),
        )
        .await;
    assert_archived(result, &id, "append_in");
    tx.rollback().await.expect("rollback");

    assert_eq!(rows(&db, &id).await, before, "nothing was stored");
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM factum.idempotency_keys")
        .fetch_one(db.pool())
        .await
        .expect("count keys");
    assert_eq!(keys, 0, "no key was stored");

    // Re-appending what was stored before the archive is still the idempotent repeat.
    let repeat = store
        .append(
            AppendRequest::new(id.clone(), vec![first]).expected_version(ExpectedVersion::NoStream),
        )
        .await
        .expect("a repeat is not a new write");
    assert_eq!(repeat.positions[0], stored.positions[0]);

    // The error is permanent and says what to do.
    let error = store
        .append(AppendRequest::new(id.clone(), vec![event()]))
        .await
        .expect_err("refused");
    assert_eq!(error.kind(), ErrorKind::Permanent);
    assert!(
        error
            .to_string()
            .contains("archived and accepts no more events"),
        "{error}"
    );

    // Other streams are not affected.
    store
        .append(AppendRequest::new(stream("order-2"), vec![event()]))
        .await
        .expect("another stream takes appends");
}

#[tokio::test]
async fn a_command_on_an_archived_aggregate_fails_with_the_archive_error() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let counters = Repository::<Counter, _>::new(store.clone());
    let increment = || Increment {
        id: "c1".into(),
        by: 1,
    };
    counters.execute(increment()).await.expect("first command");
    assert!(
        store
            .archive_stream(&stream("counter-c1"))
            .await
            .expect("archives")
    );
    for context in [CommandContext::new(), CommandContext::new().idempotent()] {
        match counters.execute_with(increment(), &context).await {
            Err(CommandError::Failed(Error::StreamArchived { stream })) => {
                assert_eq!(stream.as_str(), "counter-c1");
            }
            Err(other) => panic!("expected StreamArchived, got {other:?}"),
            Ok(done) => panic!("an archived aggregate took a command: {done:?}"),
        }
    }
    assert_eq!(rows(&db, &stream("counter-c1")).await, (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_append_gets_through_once_the_archive_returned() {
    let db = TestDatabase::create().await;
    let store: PostgresStore = db.store();
    let id = stream("ledger-1");
    store
        .append(AppendRequest::new(id.clone(), vec![event()]))
        .await
        .expect("creates the stream");

    // Writers append without pause, with `Any` and with the version they last saw.
    let archived = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (store, id, archived) = (store.clone(), id.clone(), archived.clone());
        writers.push(tokio::spawn(async move {
            let (mut stored, mut refused, mut after_archive) = (0u64, 0u64, 0u64);
            for _ in 0..10_000 {
                let expected = if w % 2 == 0 {
                    ExpectedVersion::Any
                } else {
                    match store.stream_version(&id).await {
                        Ok(v) => ExpectedVersion::Exact(v),
                        Err(e) => panic!("reads the version: {e}"),
                    }
                };
                let seen_archived = archived.load(Ordering::SeqCst);
                match store
                    .append(
                        AppendRequest::new(id.clone(), vec![event()]).expected_version(expected),
                    )
                    .await
                {
                    Ok(_) if seen_archived => after_archive += 1,
                    Ok(_) => stored += 1,
                    Err(Error::StreamArchived { .. }) => {
                        refused += 1;
                        if refused >= 5 {
                            break;
                        }
                    }
                    Err(e) if e.is_conflict() => {}
                    Err(e) => panic!("unexpected append error: {e}"),
                }
            }
            (stored, refused, after_archive)
        }));
    }
    // Let the writers interleave for a while, then archive under their feet.
    let started = std::time::Instant::now();
    while rows(&db, &id).await.0 < 50 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "writers made no progress"
        );
        tokio::task::yield_now().await;
    }
    assert!(store.archive_stream(&id).await.expect("archives"));
    archived.store(true, Ordering::SeqCst);
    let at_archive = rows(&db, &id).await;

    let mut total = (0, 0, 0);
    for writer in writers {
        let (stored, refused, after) = writer.await.expect("writer");
        total = (total.0 + stored, total.1 + refused, total.2 + after);
    }
    assert_eq!(
        total.2, 0,
        "an append started after the archive returned was stored"
    );
    assert_eq!(total.1, 20, "every writer was refused");
    assert_eq!(
        rows(&db, &id).await,
        at_archive,
        "nothing was stored after the archive"
    );
    assert_eq!(at_archive.0, at_archive.1, "versions and events agree");
    println!(
        "{} appends stored before the archive, {} refused after",
        total.0, total.1
    );
}

/// With group commit on, an append to an archived stream that shares a statement with appends
/// to other streams is refused, and only it: the others commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_refuses_the_archived_stream_and_only_it() {
    let db = TestDatabase::create().await;
    let store = db.store_with(factum_postgres::StoreOptions::default().with_group_commit(
        factum_postgres::GroupCommit::enabled().with_max_in_flight(1),
    ));
    let archived = stream("order-archived");
    store
        .append(AppendRequest::new(archived.clone(), vec![event()]))
        .await
        .expect("appends");
    assert!(store.archive_stream(&archived).await.expect("archives"));
    let before = rows(&db, &archived).await;

    let mut tasks = Vec::new();
    for i in 0..32 {
        let (store, archived) = (store.clone(), archived.clone());
        tasks.push(tokio::spawn(async move {
            let (target, expected) = match i % 4 {
                0 => (archived, ExpectedVersion::Exact(StreamVersion::new(1))),
                1 => (archived, ExpectedVersion::Any),
                _ => (stream(&format!("order-{i}")), ExpectedVersion::NoStream),
            };
            let result = store
                .append(AppendRequest::new(target.clone(), vec![event()]).expected_version(expected))
                .await;
            (target, result)
        }));
    }
    let mut refused = 0;
    for task in tasks {
        let (target, result) = task.await.expect("task");
        if target == archived {
            assert_archived(result, &archived, "grouped");
            refused += 1;
        } else {
            result.expect("the other streams commit");
        }
    }
    assert_eq!(refused, 16);
    assert_eq!(rows(&db, &archived).await, before, "nothing was stored on the archived stream");
}
