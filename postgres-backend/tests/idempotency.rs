//! Idempotent commands on a real PostgreSQL: the answer to a command's append is lost after the
//! server committed it, the caller retries `execute_with` with the same context, and the command
//! is stored exactly once. Also: keyed appends inside a transaction the caller holds, and key
//! retention.

mod proxy_support;

use std::time::Duration;

use factum::resilience::RetryPolicy;
use factum::{AppendRequest, CommandContext, ErrorKind, EventStore, Repository};
use factum_postgres::{PostgresStore, StoreOptions};
use factum_testkit::conformance::{Counter, Increment};
use factum_testkit::postgres::TestDatabase;
use proxy_support::{Proxy, upstream};
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

const COMMANDS: usize = 200;

/// A store whose connections go through a fault proxy, with no retries inside the store: a lost
/// answer reaches the caller as an unknown outcome (or is settled by the store's own look-up).
async fn through_proxy(db: &TestDatabase) -> (Proxy, PostgresStore) {
    let (options, addr) = upstream(db);
    let proxy = Proxy::start(addr).await;
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(2))
        .connect_with(options.host("127.0.0.1").port(proxy.addr.port()))
        .await
        .expect("connect through the proxy");
    let store = PostgresStore::with_options(
        pool,
        StoreOptions::default().with_retry(RetryPolicy::no_retry()),
    );
    (proxy, store)
}

/// A fresh database with an `inbox` table beside the store's.
async fn with_inbox() -> (TestDatabase, PostgresStore) {
    let db = TestDatabase::create().await;
    let store = db.patient_store();
    sqlx::query("CREATE TABLE inbox (message_id text PRIMARY KEY)")
        .execute(db.pool())
        .await
        .expect("inbox table");
    (db, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_retried_after_its_answer_was_lost_is_stored_once() {
    let db = TestDatabase::create().await;
    let (proxy, store) = through_proxy(&db).await;
    let counters = Repository::<Counter, _>::new(store);

    let mut committed_before_retry = 0;
    for n in 0..COMMANDS {
        let context = CommandContext::new().idempotent();
        let key = context
            .idempotency_key
            .clone()
            .expect("idempotent() sets a key");
        let command = || Increment {
            id: format!("c{}", n % 10),
            by: 1,
        };
        // The append carries the key: its answer is the one lost.
        proxy.lose_answer_to(key.as_str().as_bytes());
        let err = counters
            .execute_with(command(), &context)
            .await
            .expect_err("the answer was lost");
        assert_eq!(
            err.failure().map(factum::Error::kind),
            Some(ErrorKind::UnknownOutcome),
            "command {n}: {err:?}"
        );
        let stored: i64 =
            sqlx::query_scalar("SELECT count(*) FROM factum.idempotency_keys WHERE key = $1")
                .bind(key.as_str())
                .fetch_one(db.pool())
                .await
                .expect("count keys");
        committed_before_retry += stored;
        proxy.restore();
        // The caller's retry: the same command with the same context. The pool may still hand
        // out a connection the cut broke, which fails as transient: retry again.
        let mut tries = 0;
        let done = loop {
            tries += 1;
            match counters.execute_with(command(), &context).await {
                Ok(done) => break done,
                Err(e)
                    if tries < 20
                        && (e.is_transient()
                            || e.failure()
                                .is_some_and(|f| f.kind() == ErrorKind::UnknownOutcome)) =>
                {
                    tokio::task::yield_now().await;
                }
                Err(e) => panic!("command {n}: retry failed: {e:?}"),
            }
        };
        let event_id = factum::EventId::derived(context.command_id, 0).as_uuid();
        let position: i64 =
            sqlx::query_scalar("SELECT global_position FROM factum.events WHERE event_id = $1")
                .bind(event_id)
                .fetch_one(db.pool())
                .await
                .expect("the command's event is stored");
        assert_eq!(
            done.positions
                .iter()
                .map(|p| p.get() as i64)
                .collect::<Vec<_>>(),
            vec![position],
            "command {n}: the retry returns where the event is stored"
        );
    }
    assert_eq!(
        proxy.lost(),
        COMMANDS,
        "every command lost its first answer"
    );

    let copies: Vec<(Uuid, i64)> =
        sqlx::query_as("SELECT event_id, count(*) FROM factum.events GROUP BY event_id")
            .fetch_all(db.pool())
            .await
            .expect("count events");
    let duplicated = copies.iter().filter(|(_, n)| *n > 1).count();
    println!(
        "{COMMANDS} commands cut after their append was sent; committed before the retry: \
         {committed_before_retry}; stored: {}; duplicated: {duplicated}",
        copies.len()
    );
    assert_eq!(copies.len(), COMMANDS, "every command stored");
    assert_eq!(duplicated, 0, "no command stored twice");
    let total: i64 = sqlx::query_scalar("SELECT sum(version)::bigint FROM factum.streams")
        .fetch_one(db.pool())
        .await
        .expect("versions");
    assert_eq!(
        total as usize, COMMANDS,
        "every counter applied each command once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_append_commits_with_the_callers_transaction() {
    let (db, store) = with_inbox().await;
    let stream = factum::StreamId::new("order-1").expect("valid");
    let event = || factum::NewEvent {
        event_id: factum::EventId::new(),
        event_type: "order.placed".into(),
        schema_version: 1,
        payload: serde_json::value::to_raw_value(&serde_json::json!({})).expect("json"),
        metadata: Default::default(),
    };
    let key = factum::IdempotencyKey::new("msg-1").expect("key");
    let request = AppendRequest::new(stream.clone(), vec![event()]).idempotency_key(key.clone());

    // Rolled back: neither the inbox row, nor the events, nor the key.
    let mut tx = store.pool().begin().await.expect("begin");
    sqlx::query("INSERT INTO inbox VALUES ('msg-1')")
        .execute(&mut *tx)
        .await
        .expect("inbox row");
    store
        .append_in(&mut tx, request.clone())
        .await
        .expect("append in the transaction");
    tx.rollback().await.expect("rollback");
    assert_eq!(
        store.stream_version(&stream).await.expect("version").get(),
        0
    );
    assert!(
        store
            .idempotency_outcome(&key)
            .await
            .expect("lookup")
            .is_none()
    );

    // Committed: all three, and a repeat in a later transaction stores nothing.
    let mut tx = store.pool().begin().await.expect("begin");
    sqlx::query("INSERT INTO inbox VALUES ('msg-1')")
        .execute(&mut *tx)
        .await
        .expect("inbox row");
    let first = store
        .append_in(&mut tx, request.clone())
        .await
        .expect("append");
    tx.commit().await.expect("commit");
    let mut tx = store.pool().begin().await.expect("begin");
    let again = store
        .append_in(&mut tx, request)
        .await
        .expect("a repeat succeeds");
    tx.commit().await.expect("commit");
    assert!(again.duplicate);
    assert_eq!(again.positions, first.positions);
    assert_eq!(
        store.stream_version(&stream).await.expect("version").get(),
        1
    );
    let inbox: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox")
        .fetch_one(db.pool())
        .await
        .expect("count");
    assert_eq!(inbox, 1);

    // Retention removes the key; the events stay.
    assert_eq!(
        store
            .expire_idempotency_keys(chrono::Utc::now() + chrono::Duration::seconds(1))
            .await
            .expect("expire"),
        1
    );
    assert!(
        store
            .idempotency_outcome(&key)
            .await
            .expect("lookup")
            .is_none()
    );
    assert_eq!(
        store.stream_version(&stream).await.expect("version").get(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_executes_inside_the_callers_transaction() {
    let (_db, store) = with_inbox().await; // the database lives as long as `_db`
    let command = || Increment {
        id: "tx".into(),
        by: 2,
    };
    let context = CommandContext::new().idempotent();
    let stream = factum::StreamId::new("counter-tx").expect("valid");

    // Rolled back with the caller's transaction: nothing stored.
    let mut tx = store.pool().begin().await.expect("begin");
    sqlx::query("INSERT INTO inbox VALUES ('m-1')")
        .execute(&mut *tx)
        .await
        .expect("inbox row");
    let done = Repository::<Counter, _>::new(store.in_transaction(&mut tx))
        .execute_with(command(), &context)
        .await
        .expect("command in the transaction");
    assert_eq!(done.state.value, 2);
    tx.rollback().await.expect("rollback");
    assert_eq!(
        store.stream_version(&stream).await.expect("version").get(),
        0
    );

    // Committed: the inbox row and the events together; the command sees its own transaction's
    // earlier append when it loads.
    let mut tx = store.pool().begin().await.expect("begin");
    sqlx::query("INSERT INTO inbox VALUES ('m-1')")
        .execute(&mut *tx)
        .await
        .expect("inbox row");
    let counters = Repository::<Counter, _>::new(store.in_transaction(&mut tx));
    counters
        .execute_with(command(), &context)
        .await
        .expect("command");
    let second = counters.execute(command()).await.expect("second command");
    assert_eq!(
        second.state.value, 4,
        "loads see the transaction's own events"
    );
    drop(counters);
    tx.commit().await.expect("commit");
    assert_eq!(
        store.stream_version(&stream).await.expect("version").get(),
        2
    );

    // A repeat of the keyed command in another transaction stores nothing.
    let mut tx = store.pool().begin().await.expect("begin");
    let again = Repository::<Counter, _>::new(store.in_transaction(&mut tx))
        .execute_with(command(), &context)
        .await
        .expect("repeat");
    tx.commit().await.expect("commit");
    assert_eq!(again.version.get(), 1);
    assert_eq!(
        store.stream_version(&stream).await.expect("version").get(),
        2
    );
}

/// The review's scenario: a keyed command is stored, and the answer to its retry is lost too. The
/// store settles the lost retry by finding the key; that batch started before the version the
/// retry expected, so it is the earlier call's, and the repository must return the original
/// outcome instead of folding the same events into its state a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_to_a_retried_command_is_not_taken_for_a_new_write() {
    let db = TestDatabase::create().await;
    let (proxy, store) = through_proxy(&db).await;
    let counters = Repository::<Counter, _>::new(store).with_cache(10);
    let context = CommandContext::new().idempotent();
    let key = context.idempotency_key.clone().expect("a key");
    let command = || Increment {
        id: "twice".into(),
        by: 1,
    };
    let first = counters
        .execute_with(command(), &context)
        .await
        .expect("first execution");
    assert_eq!((first.version.get(), first.state.value), (1, 1));

    // The retry's append finds the key and changes nothing; its answer is lost, and the store
    // settles it by looking the key up on a new connection.
    proxy.lose_answer_to_and_stay_up(key.as_str().as_bytes());
    let again = counters
        .execute_with(command(), &context)
        .await
        .expect("the retry settles");
    assert_eq!(proxy.lost(), 1, "the retry's answer was lost");
    assert_eq!(again.positions, first.positions);
    assert_eq!(
        (again.version.get(), again.state.value),
        (1, 1),
        "the same outcome, not the event applied twice"
    );
    // The next command decides on the right state.
    let next = counters.execute(command()).await.expect("next command");
    assert_eq!((next.version.get(), next.state.value), (2, 2));
}
