//! A logical backup (`pg_dump -Fc`) restored into a second, fresh cluster (`pg_restore`): the
//! store refuses to read with [`RestoreRepairNeeded`] instead of showing an empty log, and after
//! [`PostgresStore::repair_after_restore`] a new subscription replays every old event in the
//! original order, then the new ones, and a restored checkpoint resumes without skipping.
//!
//! Both clusters are throwaway ones (`initdb` + `pg_ctl`, see `throwaway_cluster`), so the test
//! needs the PostgreSQL server binaries and client tools, not a running server.

mod throwaway_cluster;

use std::time::Duration;

use factum::subscription::{CheckpointStore, EventHandler, Subscription};
use factum::{
    BoxError, Error, EventFilter, EventId, EventStore, LogPosition, NewEvent, RawValue,
    RecordedEvent, StreamId,
};
use factum_postgres::{PostgresStore, RestoreRepairNeeded, StoreOptions};
use sqlx::{Connection, PgConnection};
use throwaway_cluster::{Cluster, Durability};

/// Every test is bounded in time.
async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(300), f)
        .await
        .expect("the test finished in time")
}

fn event(n: u64) -> NewEvent {
    NewEvent {
        event_id: EventId::new(),
        event_type: "test.happened".to_owned(),
        schema_version: 1,
        payload: RawValue::from_string(format!("{{\"n\":{n}}}")).expect("json"),
        metadata: Default::default(),
    }
}

fn stream(id: &str) -> StreamId {
    StreamId::new(id).expect("stream id")
}

/// One append; a helper so the move to `append(AppendRequest)` is one edit.
async fn append(store: &PostgresStore, stream: &StreamId, events: Vec<NewEvent>) -> Vec<EventId> {
    let ids = events.iter().map(|e| e.event_id).collect();
    store
        .append(factum::AppendRequest::new(stream.clone(), events))
        .await
        .expect("append");
    ids
}

/// The whole global log after `after`, in log order.
async fn read_log(
    store: &PostgresStore,
    mut after: LogPosition,
) -> Result<Vec<RecordedEvent>, Error> {
    let mut all = Vec::new();
    loop {
        let page = store.read_all(after, 300, &EventFilter::all()).await?;
        match page.last() {
            Some(last) => after = last.position,
            None => return Ok(all),
        }
        all.extend(page);
    }
}

fn ids(events: &[RecordedEvent]) -> Vec<EventId> {
    events.iter().map(|e| e.event_id).collect()
}

/// Records the events a subscription hands it.
#[derive(Default)]
struct Recorder(Vec<EventId>);

impl EventHandler for Recorder {
    async fn handle(&mut self, event: &RecordedEvent) -> Result<(), BoxError> {
        self.0.push(event.event_id);
        Ok(())
    }
}

fn assert_restore_error(error: &Error, what: &str) {
    let found = RestoreRepairNeeded::find(error)
        .unwrap_or_else(|| panic!("{what}: expected RestoreRepairNeeded, got {error:?}"));
    assert!(found.newest_stored >= found.next_transaction, "{found:?}");
    assert!(
        !error.is_transient(),
        "{what}: retrying will not help: {error}"
    );
    let message = format!("{error}: {found}");
    assert!(
        message.contains("pg_restore"),
        "{what}: names the cause: {message}"
    );
    assert!(
        message.contains("repair_after_restore"),
        "{what}: names the repair: {message}"
    );
}

async fn connect(url: &str) -> PostgresStore {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(url)
        .await
        .expect("connect");
    PostgresStore::with_options(
        pool,
        StoreOptions::default().with_read_settle_timeout(Duration::from_secs(10)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_logical_restore_is_refused_until_repaired_then_replays_in_the_original_order() {
    bounded(async {
        let source = Cluster::start(Durability::Fast).expect("source cluster");
        let target = Cluster::start(Durability::Fast).expect("target cluster");
        source
            .run_client("createdb", &["app"])
            .expect("create the source database");
        let url = source.url("app");
        let store = connect(&url).await;
        store.migrate().await.expect("migrate");
        // The source cluster has lived longer than the target: its transaction ids run ahead.
        let mut admin = PgConnection::connect(&url).await.expect("admin connection");
        sqlx::raw_sql(
            "DO $$ BEGIN FOR i IN 1..30000 LOOP PERFORM pg_current_xact_id(); COMMIT; END LOOP; END $$",
        )
        .execute(&mut admin)
        .await
        .expect("consume transaction ids");

        // 1,000 events from 8 concurrent writers, in batches of 5...
        let writers: Vec<_> = (0..8)
            .map(|w| {
                let store = store.clone();
                tokio::spawn(async move {
                    for b in 0..25 {
                        let batch = (0..5).map(|i| event(b * 5 + i)).collect();
                        append(&store, &stream(&format!("account-{w}-{}", b % 5)), batch).await;
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.expect("writer");
        }
        // ...and commits out of order: a transaction that started first takes its position
        // last and so sorts before events with lower positions.
        for i in 0..3 {
            let mut late = PgConnection::connect(&url).await.expect("late connection");
            sqlx::raw_sql("BEGIN; SELECT pg_current_xact_id();")
                .execute(&mut late)
                .await
                .expect("begin the late transaction");
            append(&store, &stream(&format!("early-{i}")), vec![event(0), event(1)]).await;
            sqlx::query(
                "INSERT INTO factum.streams (stream_id, category, version) VALUES ($1, 'late', 1)",
            )
            .bind(format!("late-{i}"))
            .execute(&mut late)
            .await
            .expect("late stream");
            sqlx::query(
                "INSERT INTO factum.events (stream_id, stream_version, event_id, event_type, schema_version, payload) \
                 VALUES ($1, 1, $2, 'test.happened', 1, '{}')",
            )
            .bind(format!("late-{i}"))
            .bind(uuid::Uuid::now_v7())
            .execute(&mut late)
            .await
            .expect("late event");
            sqlx::raw_sql("COMMIT").execute(&mut late).await.expect("commit late");
        }
        let old = read_log(&store, LogPosition::START).await.expect("read the source log");
        assert_eq!(old.len(), 1000 + 3 * 3);
        assert!(
            old.windows(2).any(|w| w[1].position.global < w[0].position.global),
            "the log holds out-of-order commits"
        );
        // Checkpoints carried by the dump: one part-way, one at the end.
        store
            .save_checkpoint("follower", old[599].position)
            .await
            .expect("checkpoint");
        store
            .save_checkpoint("done", old.last().expect("events").position)
            .await
            .expect("checkpoint");

        // A real logical backup, restored into a fresh cluster.
        let dump = source.dir().join("app.dump");
        let dump = dump.to_str().expect("utf-8 path");
        source
            .run_client("pg_dump", &["-Fc", "-d", "app", "-f", dump])
            .expect("pg_dump");
        target.run_client("createdb", &["app"]).expect("create the target database");
        target
            .run_client("pg_restore", &["--no-owner", "-d", "app", dump])
            .expect("pg_restore");
        let target_url = target.url("app");

        // Before the repair: the documented error, everywhere, never an empty log.
        let error = PostgresStore::connect(&target_url)
            .await
            .expect_err("connect refuses a restored log");
        assert_restore_error(&error, "connect");
        let restored = connect(&target_url).await;
        assert_restore_error(&restored.migrate().await.expect_err("migrate"), "migrate");
        assert_restore_error(&restored.health().await.expect_err("health"), "health");
        assert_restore_error(&restored.head().await.expect_err("head"), "head");
        assert_restore_error(
            &restored
                .read_all(LogPosition::START, 100, &EventFilter::all())
                .await
                .expect_err("read_all"),
            "read_all",
        );
        let mut fresh = Recorder::default();
        let error = Subscription::new("fresh", restored.clone())
            .catch_up(&mut fresh)
            .await
            .expect_err("a fresh subscription refuses");
        assert_restore_error(&error, "a fresh subscription");
        let error = Subscription::new("follower", restored.clone())
            .catch_up(Recorder::default())
            .await
            .expect_err("the restored checkpoint's subscription refuses");
        assert_restore_error(&error, "a restored subscription");
        assert!(fresh.0.is_empty());
        // An application that appends anyway (appends are not checked): its events must end up
        // after the restored ones.
        let mut appended = append(&restored, &stream("account-new"), vec![event(1)]).await;
        appended.extend(append(&restored, &stream("account-new"), vec![event(2), event(3)]).await);
        // Those events sort below the restored ones and are readable: a read from the start
        // must still refuse, or a new consumer would take them for the whole log.
        let error = restored
            .read_all(LogPosition::START, 100, &EventFilter::all())
            .await
            .expect_err("a read from the start refuses while the log is unrepaired");
        assert_restore_error(&error, "a read from the start after new appends");

        // The repair: once, then a no-op.
        let repair = restored.repair_after_restore().await.expect("repair");
        assert!(repair.repaired, "{repair:?}");
        assert_eq!(repair.events_rewritten, old.len() as u64 + 3, "{repair:?}");
        // The two restored checkpoints, and the one the fresh subscription wrote when it started
        // (every consumer records its start position before it reads).
        assert_eq!(repair.checkpoints_moved, 3, "{repair:?}");
        // One new id per run of increasing positions: at least one per late commit, far fewer
        // than the events.
        assert!(repair.commits > 3 && repair.commits < 200, "{repair:?}");
        let again = restored.repair_after_restore().await.expect("repair again");
        assert!(!again.repaired, "{again:?}");
        restored.health().await.expect("healthy after the repair");
        PostgresStore::connect(&target_url).await.expect("connect after the repair");

        // Live appends after the repair.
        for n in 0..10 {
            appended.extend(append(&restored, &stream(&format!("account-live-{}", n % 3)), vec![event(n)]).await);
        }
        let mut expected = ids(&old);
        expected.extend(&appended);

        // A new subscription replays every old event in the original order, then the new ones.
        let mut replay = Recorder::default();
        let reached = Subscription::new("replay", restored.clone())
            .catch_up(&mut replay)
            .await
            .expect("replay");
        assert_eq!(replay.0, expected, "the original order, then the new events");
        assert_eq!(restored.head().await.expect("head"), reached);
        let log = read_log(&restored, LogPosition::START).await.expect("read");
        assert!(log.windows(2).all(|w| w[0].position < w[1].position));

        // The restored checkpoints resume where they stopped: nothing skipped, nothing repeated.
        let mut follower = Recorder::default();
        Subscription::new("follower", restored.clone())
            .catch_up(&mut follower)
            .await
            .expect("the restored checkpoint resumes");
        assert_eq!(follower.0, expected[600..].to_vec());
        let mut done = Recorder::default();
        Subscription::new("done", restored.clone())
            .catch_up(&mut done)
            .await
            .expect("the restored checkpoint resumes");
        assert_eq!(done.0, appended);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_with_more_commits_than_the_horizon_makes_room_first() {
    bounded(async {
        let cluster = Cluster::start(Durability::Fast).expect("cluster");
        cluster.run_client("createdb", &["app"]).expect("createdb");
        let url = cluster.url("app");
        let store = connect(&url).await;
        store.migrate().await.expect("migrate");
        for b in 0..200 {
            append(
                &store,
                &stream(&format!("account-{}", b % 7)),
                (0..5).map(event).collect(),
            )
            .await;
        }
        // Stored ids far ahead of the counter, each event its own commit and every commit out
        // of order (ids fall as positions rise): 1,000 new ids needed, more than this young
        // cluster has handed out.
        sqlx::raw_sql(
            "UPDATE factum.events SET transaction_id = (50000000 - global_position)::text::xid8",
        )
        .execute(store.pool())
        .await
        .expect("rewrite the ids");
        let next: i64 =
            sqlx::query_scalar("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint")
                .fetch_one(store.pool())
                .await
                .expect("next id");
        assert!(next < 1000, "a young cluster: {next}");
        let error = store
            .read_all(LogPosition::START, 10, &EventFilter::all())
            .await
            .expect_err("refused");
        assert_restore_error(&error, "read_all");
        let before: Vec<uuid::Uuid> = sqlx::query_scalar(
            "SELECT event_id FROM factum.events ORDER BY transaction_id, global_position",
        )
        .fetch_all(store.pool())
        .await
        .expect("the stored order");

        let repair = store.repair_after_restore().await.expect("repair");
        assert_eq!(repair.commits, 1000, "{repair:?}");
        assert!(repair.transaction_ids_consumed > 0, "{repair:?}");
        let after = read_log(&store, LogPosition::START).await.expect("read");
        assert_eq!(
            after
                .iter()
                .map(|e| e.event_id.as_uuid())
                .collect::<Vec<_>>(),
            before,
            "the stored order is kept"
        );
    })
    .await;
}
