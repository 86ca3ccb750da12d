//! Read replicas on a real streaming replica: a throwaway primary and a hot standby made from it
//! with `pg_basebackup -R` (`factum_testkit::postgres::replica`), each test with a pair of its
//! own.
//!
//! * The standby's snapshot holds the gap-safe horizon: a transaction that took a lower position
//!   and commits later on the primary is never passed by a reader of the replica, even while a
//!   later commit is already visible there, and even when that transaction had written nothing
//!   yet.
//! * A subscription reading the replica applies every event written concurrently on the primary
//!   (out-of-order commits included) once, in log order, and shows the replica's lag.
//! * Commands never read the replica: with replay paused, commands on the primary stay
//!   consistent, the reader refuses to append, and the lag shows in status and health.

use std::sync::Arc;
use std::time::Duration;

use factum::health::Readiness;
use factum::subscription::{BatchFailure, BatchHandler, Subscription, SubscriptionStatus};
use factum::{
    AppendRequest, CommandError, Error, EventFilter, EventId, EventStore, ExpectedVersion,
    IdempotencyKey, LogPosition, NewEvent, RecordedEvent, Repository, StreamId, StreamVersion,
};
use factum_postgres::subscription::{PgCheckpoints, PgLease, PgTx};
use factum_postgres::{PgReader, PostgresStore, StoreOptions};
use factum_testkit::conformance::{Counter, Increment};
use factum_testkit::postgres::replica::ReplicatedDatabase;
use futures_util::TryStreamExt;
use tokio::sync::watch;

mod projection_support;

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

/// `pg_current_snapshot()` and its xmin, on a pool's server.
async fn snapshot(pool: &sqlx::PgPool) -> (String, i64) {
    sqlx::query_as(
        "SELECT pg_current_snapshot()::text, pg_snapshot_xmin(pg_current_snapshot())::text::bigint",
    )
    .fetch_one(pool)
    .await
    .expect("snapshot")
}

async fn visible_on(pool: &sqlx::PgPool, id: EventId) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM factum.events WHERE event_id = $1)")
        .bind(id.as_uuid())
        .fetch_one(pool)
        .await
        .expect("look the event up")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_standby_snapshot_holds_back_later_commits_until_an_earlier_transaction_ends() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let db = ReplicatedDatabase::create().await;
        // Reads that do not wait for transactions in flight show the raw horizon.
        let store = PostgresStore::with_options(
            db.primary_pool().clone(),
            StoreOptions::default().with_read_settle_timeout(Duration::ZERO),
        );
        let reader = db.reader(&store).await.expect("reader");
        assert!(reader.is_replica());
        let mut after = LogPosition::START;

        // Twice: A appends first (its rows are in the WAL before B's), or A only took its
        // transaction id and writes after B committed (nothing of A in the WAL yet).
        for (round, a_writes_first) in [(0, true), (1, false)] {
            let mut a = store.pool().begin().await.expect("begin A");
            let a_xid: i64 = sqlx::query_scalar("SELECT pg_current_xact_id()::text::bigint")
                .fetch_one(&mut *a)
                .await
                .expect("A's transaction id");
            let a_request = AppendRequest::new(stream(&format!("a-{round}")), vec![event(1)]);
            let a_id = a_request.events[0].event_id;
            let a_stored = if a_writes_first {
                Some(
                    store
                        .append_in(&mut a, a_request.clone())
                        .await
                        .expect("A appends"),
                )
            } else {
                None
            };

            // B commits, with a higher transaction id (and position, when A wrote first).
            let b_request = AppendRequest::new(stream(&format!("b-{round}")), vec![event(2)])
                .expected_version(ExpectedVersion::NoStream);
            let b_id = b_request.events[0].event_id;
            let b = store.append(b_request).await.expect("append B");
            if let Some(a_stored) = &a_stored {
                assert!(b.positions[0] > a_stored.positions[0]);
            }
            db.wait_for_replay().await;

            // B is on the replica, and the replica's snapshot still counts A as in flight.
            assert!(
                visible_on(db.replica_pool(), b_id).await,
                "B is visible on the replica"
            );
            let (primary_snapshot, primary_xmin) = snapshot(db.primary_pool()).await;
            let (replica_snapshot, replica_xmin) = snapshot(db.replica_pool()).await;
            eprintln!(
                "round {round} (A wrote first: {a_writes_first}): A is xid {a_xid}; primary \
                 pg_current_snapshot() = {primary_snapshot}, replica = {replica_snapshot}"
            );
            assert_eq!(primary_xmin, a_xid, "the primary's horizon is A");
            assert_eq!(replica_xmin, a_xid, "the standby's horizon is A too");

            // So the reader of the replica does not return B (nor A) while A is open.
            let page = reader
                .read_all(after, 10, &EventFilter::all())
                .await
                .expect("read the replica");
            assert!(
                page.is_empty(),
                "round {round}: B read before A ended: {page:?}"
            );
            assert_eq!(reader.head().await.expect("head"), after);

            if !a_writes_first {
                store
                    .append_in(&mut a, a_request)
                    .await
                    .expect("A appends late");
            }
            a.commit().await.expect("commit A");
            db.wait_for_replay().await;

            // Both, A first: a checkpoint after B would have skipped A.
            let page = reader
                .read_all(after, 10, &EventFilter::all())
                .await
                .expect("read the replica");
            let ids: Vec<EventId> = page.iter().map(|e| e.event_id).collect();
            assert_eq!(ids.len(), 2, "round {round}: {page:?}");
            assert_eq!(ids[0], a_id, "round {round}: A sorts first");
            assert_eq!(page[1].global_position(), b.positions[0]);
            after = page[1].position;
        }
    })
    .await
    .expect("the test finished in time");
}

/// Records each event in `seen` (on the primary, in the checkpoint's transaction), in the order
/// handled.
struct Seen;

impl BatchHandler<PgTx> for Seen {
    async fn handle_batch(
        &mut self,
        tx: &mut PgTx,
        events: &[RecordedEvent],
    ) -> Result<(), BatchFailure> {
        for event in events {
            sqlx::query("INSERT INTO seen (event_id, commit_id, global) VALUES ($1, $2, $3)")
                .bind(event.event_id.as_uuid())
                .bind(i64::try_from(event.position.commit).expect("commit"))
                .bind(i64::try_from(event.position.global.get()).expect("global"))
                .execute(tx.conn())
                .await
                .map_err(BatchFailure::somewhere)?;
        }
        Ok(())
    }
}

async fn wait_until(
    status: &mut watch::Receiver<SubscriptionStatus>,
    what: &str,
    done: impl Fn(&SubscriptionStatus) -> bool,
) -> SubscriptionStatus {
    let waited = tokio::time::timeout(Duration::from_secs(60), status.wait_for(|s| done(s)))
        .await
        .map(|r| r.map(|s| s.clone()));
    match waited {
        Ok(Ok(reached)) => reached,
        _ => panic!("{what}: {:?}", status.borrow()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscription_on_the_replica_applies_every_event_once_in_log_order() {
    tokio::time::timeout(Duration::from_secs(180), async {
        let db = ReplicatedDatabase::create().await;
        let store = db.primary_store();
        sqlx::query("CREATE TABLE seen (n bigserial PRIMARY KEY, event_id uuid NOT NULL UNIQUE, \
             commit_id bigint NOT NULL, global bigint NOT NULL)")
            .execute(store.pool())
            .await
            .expect("create seen");
        let reader = db
            .reader(&store)
            .await
            .expect("reader")
            .with_lag_interval(Duration::from_millis(20));

        let mut subscription =
            Subscription::with_checkpoints("seen", reader.clone(), PgCheckpoints::new(&store))
                .lease(PgLease::new(&store))
                .batch_size(17)
                .idle_backoff(Duration::from_millis(1), Duration::from_millis(20));
        let mut status = subscription.status();
        // The largest replica lag the status showed while the writers ran.
        let watcher = {
            let mut status = subscription.status();
            tokio::spawn(async move {
                let (mut bytes, mut time) = (0, Duration::ZERO);
                while status.changed().await.is_ok() {
                    if let Some(lag) = status.borrow().replica_lag {
                        bytes = bytes.max(lag.bytes);
                        time = time.max(lag.time.unwrap_or_default());
                    }
                }
                (bytes, time)
            })
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let consumer = tokio::spawn(async move {
            subscription
                .run(Seen, async {
                    let _ = stopped.await;
                })
                .await
        });

        // Writers on their own streams, counting their commits.
        const WRITERS: u64 = 4;
        const APPENDS: u64 = 40;
        let (committed_tx, committed) = watch::channel(0_u64);
        let committed_tx = Arc::new(committed_tx);
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let (store, committed_tx) = (store.clone(), committed_tx.clone());
            tasks.push(tokio::spawn(async move {
                for n in 0..APPENDS {
                    let events = (0..1 + n % 3).map(event).collect();
                    store
                        .append(AppendRequest::new(stream(&format!("w{w}-{}", n % 5)), events))
                        .await
                        .expect("append");
                    committed_tx.send_modify(|c| *c += 1);
                }
            }));
        }
        // Out of order: a transaction takes its positions, then commits only after several other
        // appends committed (higher positions, already on the replica by then, most likely).
        let late = {
            let store = store.clone();
            let mut committed = committed.clone();
            tokio::spawn(async move {
                for n in 0..8_u64 {
                    let mut tx = store.pool().begin().await.expect("begin");
                    store
                        .append_in(&mut tx, AppendRequest::new(stream(&format!("late-{n}")), vec![event(n), event(n + 1)]))
                        .await
                        .expect("append in a transaction");
                    let seen = *committed.borrow();
                    let target = (seen + 4).min(WRITERS * APPENDS);
                    committed.wait_for(|c| *c >= target).await.expect("writers run");
                    tx.commit().await.expect("commit late");
                }
            })
        };
        for task in tasks {
            task.await.expect("writer");
        }
        late.await.expect("late writer");

        // Everything the primary holds, in log order.
        let expected: Vec<uuid::Uuid> = sqlx::query_scalar(
            "SELECT event_id FROM factum.events ORDER BY transaction_id, global_position",
        )
        .fetch_all(store.pool())
        .await
        .expect("the primary's log");
        assert_eq!(
            expected.len() as u64,
            WRITERS * (APPENDS / 3 * 6 + [0, 1, 3][(APPENDS % 3) as usize]) + 16,
            "every append stored"
        );
        // The last event in log order. (Not `store.head()`: the consumer's own transaction on
        // the primary may hold the horizon below it at that moment.)
        let (last_xid, last_global): (i64, i64) = sqlx::query_as(
            "SELECT transaction_id::text::bigint, global_position FROM factum.events \
             ORDER BY transaction_id DESC, global_position DESC LIMIT 1",
        )
        .fetch_one(store.pool())
        .await
        .expect("the last event");
        let head = LogPosition::new(
            u64::try_from(last_xid).expect("xid"),
            factum::GlobalPosition::new(u64::try_from(last_global).expect("position")),
        );
        let reached = wait_until(&mut status, "the subscription reaches the primary's head", |s| {
            s.position >= head
        })
        .await;
        assert!(reached.replica_lag.is_some(), "the status carries the replica lag: {reached:?}");
        let _ = stop.send(());
        consumer.await.expect("consumer task").expect("consumer ran");
        let (bytes, time) = watcher.await.expect("watcher");
        eprintln!(
            "{} events by {WRITERS} writers and 8 late transactions; largest replica lag seen: \
             {bytes} bytes, at most {} ms",
            expected.len(),
            time.as_millis()
        );

        let seen: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT event_id FROM seen ORDER BY n")
            .fetch_all(store.pool())
            .await
            .expect("seen");
        if seen != expected {
            let rows: Vec<(i64, i64, i64, i64)> = sqlx::query_as(
                "SELECT s.n, s.commit_id, s.global, e.transaction_id::text::bigint FROM seen s \
                 JOIN factum.events e ON e.event_id = s.event_id ORDER BY s.n",
            )
            .fetch_all(store.pool())
            .await
            .expect("seen rows");
            let missing: Vec<(i64, i64)> = sqlx::query_as(
                "SELECT e.transaction_id::text::bigint, e.global_position FROM factum.events e \
                 WHERE NOT EXISTS (SELECT 1 FROM seen s WHERE s.event_id = e.event_id) \
                 ORDER BY 1, 2",
            )
            .fetch_all(store.pool())
            .await
            .expect("missing");
            eprintln!("seen {} of {}; missing (xid, global): {missing:?}", seen.len(), expected.len());
            let first = seen.iter().zip(&expected).position(|(a, b)| a != b).unwrap_or(0);
            let from = first.saturating_sub(5);
            panic!(
                "not in log order from index {first}: seen (n, commit, global, xid) {:?}",
                &rows[from..(first + 10).min(rows.len())]
            );
        }
        // The checkpoint is on the primary, where the reader's consumer wrote it.
        let checkpoint: i64 = sqlx::query_scalar(
            "SELECT global_position FROM factum.subscription_checkpoints WHERE subscription = 'seen'",
        )
        .fetch_one(store.pool())
        .await
        .expect("checkpoint on the primary");
        assert_eq!(u64::try_from(checkpoint).expect("position"), head.global.get());
    })
    .await
    .expect("the test finished in time");
}

/// Counts handled events (a subscription with plain checkpoints, on the primary through the
/// reader).
struct Count(u64);

impl factum::subscription::EventHandler for Count {
    async fn handle(&mut self, _event: &RecordedEvent) -> Result<(), factum::BoxError> {
        self.0 += 1;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commands_stay_on_the_primary_while_the_replica_lags_and_the_lag_shows() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let db = ReplicatedDatabase::create().await;
        let store = db.primary_store();
        let reader: PgReader = db
            .reader(&store)
            .await
            .expect("reader")
            .with_lag_interval(Duration::ZERO);
        let counters = Repository::<Counter, _>::new(store.clone());
        counters
            .execute(Increment {
                id: "c1".into(),
                by: 1,
            })
            .await
            .expect("first command");
        db.wait_for_replay().await;

        let mut subscription = Subscription::new("count", reader.clone());
        let mut count = Count(0);
        subscription.catch_up(&mut count).await.expect("catch up");
        assert_eq!(count.0, 1);
        assert!(
            subscription.status().borrow().replica_lag.is_some(),
            "measured as it read"
        );
        db.wait_for_replay().await;
        let caught_up = reader.lag().await.expect("lag");
        assert!(caught_up.is_caught_up(), "{caught_up:?}");

        db.pause_replay().await;

        // Commands load from the primary: each sees the previous one at once.
        for by in 2..=4 {
            let done = counters
                .execute(Increment {
                    id: "c1".into(),
                    by,
                })
                .await
                .expect("command while the replica lags");
            assert_eq!(done.version, StreamVersion::new(by));
            assert_eq!(done.attempts, 1, "no conflict: the load was current");
        }
        let key = IdempotencyKey::new("payment-7").expect("key");
        let keyed = store
            .append(
                AppendRequest::new(stream("payments-7"), vec![event(7)])
                    .idempotency_key(key.clone()),
            )
            .await
            .expect("keyed append");
        // The replica does not have them...
        let stale: Vec<RecordedEvent> = reader
            .read_stream(&stream("counter-c1"), StreamVersion::new(0))
            .try_collect()
            .await
            .expect("read the replica");
        assert_eq!(stale.len(), 1, "the replica lags");
        let key_on_replica: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM factum.idempotency_keys WHERE key = $1)",
        )
        .bind(key.as_str())
        .fetch_one(reader.pool())
        .await
        .expect("look the key up on the replica");
        assert!(!key_on_replica);
        // ...but what commands ask of the reader is answered by the primary, or refused.
        let outcome = reader.idempotency_outcome(&key).await.expect("outcome");
        assert_eq!(outcome.map(|o| o.positions), Some(keyed.positions));
        match reader
            .append(AppendRequest::new(stream("x-1"), vec![event(0)]))
            .await
        {
            Err(Error::InvalidArgument(why)) => assert!(why.contains("primary"), "{why}"),
            other => panic!("a reader appended: {other:?}"),
        }
        match Repository::<Counter, _>::new(reader.clone())
            .execute(Increment {
                id: "c1".into(),
                by: 5,
            })
            .await
        {
            Err(CommandError::Failed(Error::InvalidArgument(_))) => {}
            other => panic!("a command ran through the reader: {other:?}"),
        }

        // The subscription on the replica sees nothing new, and says the replica lags.
        subscription.catch_up(&mut count).await.expect("catch up");
        assert_eq!(count.0, 1, "nothing applied on the replica yet");
        let lagging = subscription.status().borrow().clone();
        let lag = lagging.replica_lag.expect("lag measured");
        assert!(lag.bytes > 0, "{lag:?}");
        assert!(
            lag.time.is_some(),
            "bounded by the last time it was caught up: {lag:?}"
        );
        assert_eq!(
            lagging.lag_events, 0,
            "the consumer itself is caught up with the replica"
        );
        let ready = Readiness::new().replica("reads", lagging.replica_lag.as_ref(), Duration::ZERO);
        assert!(!ready.is_ready(), "{ready:?}");
        assert!(ready.checks()[0].detail.contains("bytes"), "{ready:?}");
        let check = reader.readiness_check(Duration::ZERO).await;
        assert!(!check.ok, "{check:?}");
        assert!(reader.readiness_check(Duration::from_secs(3600)).await.ok);
        assert!(
            !reader
                .wait_for_primary(Duration::from_millis(50))
                .await
                .expect("wait")
        );

        db.resume_replay().await;
        assert!(
            reader
                .wait_for_primary(Duration::from_secs(60))
                .await
                .expect("wait")
        );
        subscription.catch_up(&mut count).await.expect("catch up");
        assert_eq!(count.0, 5, "three increments and the keyed append");
        assert!(subscription.status().borrow().replica_lag.is_some());
        db.wait_for_replay().await;
        assert!(reader.lag().await.expect("lag").is_caught_up());
        assert!(reader.readiness_check(Duration::from_secs(5)).await.ok);
    })
    .await
    .expect("the test finished in time");
}

#[tokio::test]
async fn a_reader_of_the_primary_reads_it_and_has_no_lag() {
    let db = ReplicatedDatabase::create().await;
    let store = db.primary_store();
    let reader = PgReader::primary(&store);
    assert!(!reader.is_replica());
    store
        .append(AppendRequest::new(stream("p-1"), vec![event(1)]))
        .await
        .expect("append");
    // Read-your-writes: the primary itself.
    let page = reader
        .read_all(LogPosition::START, 10, &EventFilter::all())
        .await
        .expect("read");
    assert_eq!(page.len(), 1);
    assert_eq!(reader.replica_lag(), None);
    assert!(reader.lag().await.expect("lag").is_caught_up());

    // A replica of another cluster is refused.
    let other = factum_testkit::postgres::TestDatabase::create().await;
    match PgReader::on_replica(&store, other.pool().clone()).await {
        Err(Error::InvalidArgument(why)) => assert!(why.contains("system identifier"), "{why}"),
        other => panic!("a foreign server was taken for a replica: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_runner_reads_the_replica_and_writes_the_primary() {
    use factum_postgres::projection::PgProjectionRunner;
    use projection_support::{Fold, Ledger, append, create_tables, read_model};

    tokio::time::timeout(Duration::from_secs(120), async {
        let db = ReplicatedDatabase::create().await;
        let store = db.primary_store();
        create_tables(store.pool()).await;
        let mut fold = Fold::default();
        append(&store, &mut fold, "ledger-1", 1, 5).await;
        append(&store, &mut fold, "ledger-2", 10, 3).await;
        db.wait_for_replay().await;
        db.pause_replay().await;
        let replicated = read_model_of(&fold);
        append(&store, &mut fold, "ledger-1", 20, 4).await;

        let reader = db.reader(&store).await.expect("reader");
        let mut runner =
            PgProjectionRunner::new(store.clone(), Ledger::default()).read_from(reader);
        runner.catch_up().await.expect("catch up");
        // What the replica had, applied on the primary.
        assert_eq!(read_model(store.pool()).await, replicated);
        assert!(
            runner
                .status()
                .borrow()
                .replica_lag
                .is_some_and(|l| l.bytes > 0)
        );

        db.resume_replay().await;
        db.wait_for_replay().await;
        runner.catch_up().await.expect("catch up");
        assert_eq!(read_model(store.pool()).await, fold.model);
    })
    .await
    .expect("the test finished in time");
}

/// A copy of a fold's model.
fn read_model_of(fold: &projection_support::Fold) -> projection_support::Model {
    projection_support::Model {
        total: fold.model.total,
        count: fold.model.count,
        streams: fold.model.streams.clone(),
        applied: fold.model.applied,
    }
}

#[tokio::test]
async fn a_promoted_replica_is_refused_not_read_silently() {
    let db = ReplicatedDatabase::create().await;
    let store = db.primary_store();
    let reader = db
        .reader(&store)
        .await
        .expect("reader")
        .with_lag_interval(Duration::ZERO);
    assert!(reader.lag().await.expect("lag while a standby").bytes < 1 << 20);
    db.promote().await;
    // The old primary still takes writes the promoted server will never see.
    store
        .append(AppendRequest::new(stream("after-failover"), vec![event(1)]))
        .await
        .expect("append on the old primary");
    let error = reader
        .lag()
        .await
        .expect_err("a promoted replica is not a replica");
    assert_eq!(error.kind(), factum::ErrorKind::Permanent, "{error}");
    let why = std::error::Error::source(&error)
        .map(ToString::to_string)
        .unwrap_or_default();
    assert!(why.contains("promoted"), "{error}: {why}");
    let read = reader
        .read_all(LogPosition::START, 10, &EventFilter::all())
        .await;
    assert!(
        read.is_err(),
        "a subscription would stall silently on it: {read:?}"
    );
}
