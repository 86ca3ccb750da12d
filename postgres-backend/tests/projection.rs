//! Transactional projections on PostgreSQL: exactly-once application, dead letters, several
//! instances with takeover, crashes mid-batch, and rebuilds while writes continue.

mod projection_support;

use std::collections::HashSet;
use std::time::Duration;

use factum::subscription::{DeadLetterStore, SubscriptionState};
use factum::{Error, EventStore};
use factum_postgres::projection::{PgProjectionRunner, Progress};
use factum_testkit::postgres::TestDatabase;
use projection_support::*;

#[tokio::test]
async fn each_event_is_applied_once_and_a_new_runner_resumes_from_the_checkpoint() {
    bounded(60, async {
        let db = TestDatabase::create().await;
        let store = patient_store(&db);
        create_tables(db.pool()).await;
        let mut fold = Fold::default();
        for s in 0..10 {
            append(&store, &mut fold, &format!("ledger-{s}"), s * 100, 50).await;
        }
        // Events of other types are filtered out at the source.
        store
            .append(
                factum::AppendRequest::new(
                    factum::StreamId::new("other-1").expect("id").clone(),
                    vec![factum::NewEvent {
                        event_type: "other.thing".into(),
                        ..entry(0)
                    }],
                )
                .expected_version(factum::ExpectedVersion::Any),
            )
            .await
            .expect("append");

        let mut runner = PgProjectionRunner::new(store.clone(), Ledger::default()).batch_size(64);
        let status = runner.status();
        let reached = runner.catch_up().await.expect("catch up");
        assert_eq!(read_model(db.pool()).await, fold.model);
        let s = status.borrow().clone();
        assert_eq!(s.handled, 500);
        assert_eq!(s.position, reached);
        assert_eq!(s.lag_events, 0);
        assert_eq!(s.lag, Duration::ZERO);
        assert!(s.last_event_at.is_some());

        // A second runner (a restart) applies only what came later.
        append(&store, &mut fold, "ledger-3", 7000, 5).await;
        let mut restarted = PgProjectionRunner::new(store.clone(), Ledger::default());
        let status = restarted.status();
        restarted.catch_up().await.expect("catch up");
        assert_eq!(status.borrow().handled, 5);
        assert_eq!(read_model(db.pool()).await, fold.model);
    })
    .await;
}

#[tokio::test]
async fn a_poison_event_stops_the_runner_or_is_parked_with_the_checkpoint_and_retried_after_a_fix()
{
    bounded(60, async {
        let db = TestDatabase::create().await;
        let store = patient_store(&db);
        create_tables(db.pool()).await;
        let mut fold = Fold::default();
        append(&store, &mut fold, "ledger-1", 1, 5).await;
        let poison = fold.ids[2];

        // Not parking: stops on it, with everything before it applied (and nothing after).
        let mut stopping = PgProjectionRunner::new(
            store.clone(),
            Ledger {
                poison: [3].into_iter().collect(),
                ..Ledger::default()
            },
        )
        .handler_retries(2, Duration::ZERO);
        let status = stopping.status();
        let error = stopping.catch_up().await.expect_err("stops on the poison");
        match &error {
            Error::Handler {
                event_id, attempts, ..
            } => {
                assert_eq!(*event_id, poison);
                assert_eq!(*attempts, 2);
            }
            other => panic!("expected a handler error, got {other:?}"),
        }
        assert!(matches!(
            status.borrow().state,
            SubscriptionState::Failed(_)
        ));
        let model = read_model(db.pool()).await;
        assert_eq!((model.count, model.total), (2, 1 + 2));

        // Parking: goes on past it; the parked row and the checkpoint moved in one transaction.
        let mut parking = PgProjectionRunner::new(
            store.clone(),
            Ledger {
                poison: [3].into_iter().collect(),
                ..Ledger::default()
            },
        )
        .handler_retries(2, Duration::ZERO)
        .park_failures();
        let status = parking.status();
        parking.catch_up().await.expect("goes on");
        assert_eq!(status.borrow().parked, 1);
        let model = read_model(db.pool()).await;
        assert_eq!((model.count, model.total), (4, 1 + 2 + 4 + 5));
        let parked = store.parked("ledger").await.expect("parked");
        assert_eq!(parked.len(), 1);
        assert_eq!(parked[0].event.event_id, poison);
        assert!(parked[0].error.contains("poisoned"), "{}", parked[0].error);

        // Still broken: the retry fails and the event stays parked.
        assert!(parking.retry_parked(poison).await.is_err());
        assert_eq!(store.parked("ledger").await.expect("parked").len(), 1);
        // Fixed: applied once, and no longer parked.
        parking.projection_mut().poison.clear();
        assert!(parking.retry_parked(poison).await.expect("retry"));
        assert!(!parking.retry_parked(poison).await.expect("retry"));
        assert!(store.parked("ledger").await.expect("parked").is_empty());
        assert_eq!(read_model(db.pool()).await, fold.model);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_apply_events_once_in_total_and_the_standby_takes_over_from_a_dead_leader() {
    bounded(60, async {
        let db = TestDatabase::create().await;
        let store = patient_store(&db);
        create_tables(db.pool()).await;
        let mut fold = Fold::default();

        let instance = || {
            PgProjectionRunner::new(store.clone(), Ledger::default())
                .batch_size(50)
                .idle_backoff(Duration::from_millis(5), Duration::from_millis(20))
                .standby_poll(Duration::from_millis(20))
        };
        let mut leader = instance();
        let mut leader_status = leader.status();
        let leader_task =
            tokio::spawn(async move { leader.run(std::future::pending::<()>()).await });
        wait_for(&mut leader_status, "the leader to go live", |s| {
            s.state == SubscriptionState::Live
        })
        .await;

        let mut standby = instance();
        let mut standby_status = standby.status();
        let standby_task =
            tokio::spawn(async move { standby.run(std::future::pending::<()>()).await });
        wait_for(
            &mut standby_status,
            "the second instance to stand by",
            |s| s.state == SubscriptionState::Standby,
        )
        .await;

        for s in 0..4 {
            append(&store, &mut fold, &format!("ledger-{s}"), s * 100, 50).await;
        }
        wait_for(&mut leader_status, "the leader to apply 200 events", |s| {
            s.handled == 200
        })
        .await;
        assert_eq!(read_model(db.pool()).await, fold.model);
        assert_eq!(standby_status.borrow().handled, 0);
        assert_eq!(standby_status.borrow().state, SubscriptionState::Standby);

        // The leader dies (its task is dropped, closing its lease connection).
        leader_task.abort();
        assert!(leader_task.await.expect_err("aborted").is_cancelled());
        wait_for(&mut standby_status, "the standby to take over", |s| {
            s.state == SubscriptionState::Live
        })
        .await;
        for s in 0..3 {
            append(
                &store,
                &mut fold,
                &format!("ledger-{s}"),
                1000 + s * 100,
                40,
            )
            .await;
        }
        wait_for(
            &mut standby_status,
            "the new leader to apply 120 events",
            |s| s.handled == 120,
        )
        .await;
        assert_eq!(read_model(db.pool()).await, fold.model);
        assert_eq!(leader_status.borrow().handled, 200);
        standby_task.abort();
        let _ = standby_task.await;
    })
    .await;
}

/// A tiny deterministic generator for abort points (no extra dependency).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_killed_repeatedly_mid_batch_ends_equal_to_a_fold_of_the_events() {
    bounded(90, async {
        let db = TestDatabase::create().await;
        let store = patient_store(&db);
        create_tables(db.pool()).await;
        let mut fold = Fold::default();
        for s in 0..100 {
            append(&store, &mut fold, &format!("ledger-{s}"), s * 1000, 100).await;
        }
        assert_eq!(fold.ids.len(), 10_000);

        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut kills = 0;
        let mut finished = false;
        for _ in 0..200 {
            // A fresh runner per "process", killed at a random point of its catch-up.
            let mut runner = PgProjectionRunner::new(store.clone(), Ledger::default())
                .batch_size(250)
                .standby_poll(Duration::from_millis(10));
            let task = tokio::spawn(async move { runner.catch_up().await });
            if kills < 20 {
                // After 20 kills the runner is let finish: how far one gets before its kill
                // depends on the machine (a TLS handshake per new connection in a debug build
                // takes most of the window).
                tokio::time::sleep(Duration::from_millis(20 + rng.below(120))).await;
                task.abort();
            }
            match task.await {
                Ok(result) => {
                    result.expect("catch up");
                    finished = true;
                    break;
                }
                Err(e) => {
                    assert!(e.is_cancelled());
                    kills += 1;
                }
            }
        }
        assert!(finished, "the catch-up never finished");
        assert!(
            kills >= 3,
            "only {kills} kills: the test did not exercise crashes"
        );
        // One more, unkilled, in case the last run finished just as the log grew: nothing to do.
        let mut last = PgProjectionRunner::new(store.clone(), Ledger::default());
        let status = last.status();
        last.catch_up().await.expect("catch up");
        assert_eq!(status.borrow().handled, 0);
        assert_eq!(read_model(db.pool()).await, fold.model);
        eprintln!("killed the runner {kills} times");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_while_writes_continue_swaps_in_a_complete_model_and_reports_progress() {
    bounded(90, async {
        let db = TestDatabase::create().await;
        let store = patient_store(&db);
        create_tables(db.pool()).await;
        let mut fold = Fold::default();
        for s in 0..20 {
            append(&store, &mut fold, &format!("ledger-{s}"), s * 1000, 50).await;
        }
        // A live runner keeps the model up to date before, during and after the rebuild.
        let mut live = PgProjectionRunner::new(store.clone(), Ledger::default())
            .batch_size(100)
            .idle_backoff(Duration::from_millis(5), Duration::from_millis(20));
        let mut live_status = live.status();
        let live_task = tokio::spawn(async move { live.run(std::future::pending::<()>()).await });
        wait_for(&mut live_status, "the live runner to catch up", |s| {
            s.handled == 1000
        })
        .await;
        // Damage the live model (as a buggy projection version would): the rebuild repairs it.
        sqlx::query("UPDATE ledger_totals SET total = -1")
            .execute(db.pool())
            .await
            .expect("damage");

        // Writers go on during the rebuild.
        let writer_store = store.clone();
        let writer = tokio::spawn(async move {
            let mut fold = Fold::default();
            for round in 0..20 {
                append(&writer_store, &mut fold, "ledger-w", round * 10, 10).await;
                tokio::task::yield_now().await;
            }
            fold
        });

        let mut rebuilder =
            PgProjectionRunner::new(store.clone(), Ledger::default()).batch_size(100);
        let mut reports: Vec<Progress> = Vec::new();
        rebuilder
            .rebuild(|p| reports.push(p.clone()))
            .await
            .expect("rebuild");
        let written = writer.await.expect("writer");
        for (i, id) in written.ids.iter().enumerate() {
            let n = i64::try_from(i).expect("n");
            fold.add("ledger-w", u64::try_from(i + 1).expect("v"), n, *id);
        }
        let first = reports.first().expect("a first report");
        let last = reports.last().expect("a last report");
        assert!(first.total >= 1000, "{first:?}");
        assert_eq!(first.done, 0);
        assert!(last.done >= last.total, "{last:?}");
        assert!(reports.windows(2).all(|w| w[0].done <= w[1].done));
        assert!(last.rate > 0.0);

        // The live runner continues on the swapped-in tables with the writes made meanwhile.
        let total = fold.model.count;
        if !model_reaches(&db, total).await {
            live_task.abort();
            panic!(
                "the live model never reached {total} events: {:?}; live runner: {:?}, {:?}",
                read_model(db.pool()).await,
                live_task.await,
                *live_status.borrow(),
            );
        }
        assert_eq!(read_model(db.pool()).await, fold.model);
        let leftovers: Option<String> =
            sqlx::query_scalar("SELECT to_regclass('ledger_totals_old')::text")
                .fetch_one(db.pool())
                .await
                .expect("regclass");
        assert_eq!(leftovers, None, "the old tables are dropped");
        live_task.abort();
        let _ = live_task.await;
    })
    .await;
}

/// Waits (bounded) until the read model has `count` events applied. The swap happens in another
/// runner than the live one, which notices it on its next batch: the tables are the only shared
/// truth, so they are polled.
async fn model_reaches(db: &TestDatabase, count: i64) -> bool {
    for _ in 0..600 {
        if read_model(db.pool()).await.count == count {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn an_interrupted_rebuild_resumes_where_it_stopped() {
    bounded(60, async {
        let db = TestDatabase::create().await;
        let store = patient_store(&db);
        create_tables(db.pool()).await;
        let mut fold = Fold::default();
        for s in 0..10 {
            append(&store, &mut fold, &format!("ledger-{s}"), s * 1000, 100).await;
        }
        // The first rebuild dies after its third batch (the projection fails on that entry).
        let mut failing = PgProjectionRunner::new(
            store.clone(),
            Ledger {
                poison: [2050].into_iter().collect(),
                ..Ledger::default()
            },
        )
        .batch_size(100);
        let mut done = Vec::new();
        failing
            .rebuild(|p| done.push(p.done))
            .await
            .expect_err("the rebuild stops on the failing entry");
        // Two whole batches, then the 50 events before the failing one, each reported as applied.
        assert_eq!(done.last().copied(), Some(250));
        assert_eq!(
            read_model(db.pool()).await,
            Model::default(),
            "the live model is untouched until the swap"
        );

        let mut resumed = PgProjectionRunner::new(store.clone(), Ledger::default()).batch_size(100);
        let mut reports = Vec::new();
        resumed
            .rebuild(|p| reports.push(p.clone()))
            .await
            .expect("rebuild");
        assert_eq!(
            reports[0].done, 250,
            "resumed after the two applied batches and the 50 events before the failing one"
        );
        assert_eq!(reports.last().map(|p| p.done), Some(1000));
        assert_eq!(read_model(db.pool()).await, fold.model);
        let ids: HashSet<_> = fold.ids.iter().collect();
        assert_eq!(ids.len(), 1000);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_the_leaders_lease_connection_dies_exactly_one_instance_leads_again() {
    bounded(60, async {
        let db = TestDatabase::create().await;
        let store = patient_store(&db);
        create_tables(db.pool()).await;
        let mut fold = Fold::default();
        let instance = || {
            PgProjectionRunner::new(store.clone(), Ledger::default())
                .idle_backoff(Duration::from_millis(5), Duration::from_millis(20))
                .standby_poll(Duration::from_millis(20))
        };
        let mut a = instance();
        let mut a_status = a.status();
        let a_task = tokio::spawn(async move { a.run(std::future::pending::<()>()).await });
        wait_for(&mut a_status, "A to lead", |s| {
            s.state == SubscriptionState::Live
        })
        .await;
        let mut b = instance();
        let mut b_status = b.status();
        let b_task = tokio::spawn(async move { b.run(std::future::pending::<()>()).await });
        wait_for(&mut b_status, "B to stand by", |s| {
            s.state == SubscriptionState::Standby
        })
        .await;

        // A's lease connection dies (a network cut, an operator's pg_terminate_backend) while
        // A itself keeps running: A notices on its next poll, B on its next try; either may win
        // the lease, never both.
        let holders = || async {
            sqlx::query_scalar::<_, i32>(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .fetch_all(db.pool())
            .await
            .expect("pg_locks")
        };
        let before = holders().await;
        assert_eq!(before.len(), 1, "one lease holder: {before:?}");
        let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(before[0])
            .fetch_one(db.pool())
            .await
            .expect("terminate");
        assert!(terminated);
        // The lock table is the shared truth here: wait (bounded) for a new holder.
        let mut after = Vec::new();
        for _ in 0..600 {
            after = holders().await;
            if after.len() == 1 && after[0] != before[0] {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            after.len() == 1 && after[0] != before[0],
            "a new single holder: {after:?}"
        );

        append(&store, &mut fold, "ledger-1", 0, 30).await;
        assert!(
            model_reaches(&db, 30).await,
            "the events were applied: {:?}",
            read_model(db.pool()).await
        );
        assert_eq!(read_model(db.pool()).await, fold.model);
        let (a_now, b_now) = (a_status.borrow().clone(), b_status.borrow().clone());
        assert_eq!(a_now.handled + b_now.handled, 30, "applied once in total");
        let live = [&a_now, &b_now]
            .iter()
            .filter(|s| s.state == SubscriptionState::Live)
            .count();
        assert_eq!(live, 1, "one leader: {a_now:?} {b_now:?}");
        assert_eq!(holders().await.len(), 1);
        for task in [a_task, b_task] {
            task.abort();
            let _ = task.await;
        }
    })
    .await;
}

/// A projection that declares no tables.
struct Undeclared;

impl factum_postgres::projection::PgProjection for Undeclared {
    const NAME: &'static str = "undeclared";
    type Event = Entry;

    async fn apply(
        &mut self,
        _tx: &mut factum_postgres::projection::ProjectionTx<'_>,
        _event: &factum::Envelope<Entry>,
    ) -> Result<(), factum::BoxError> {
        Ok(())
    }
}

#[tokio::test]
async fn a_projection_without_declared_tables_cannot_be_rebuilt() {
    bounded(30, async {
        let db = TestDatabase::create().await;
        let mut runner = PgProjectionRunner::new(patient_store(&db), Undeclared);
        let error = runner.rebuild(|_| {}).await.expect_err("refused");
        assert!(matches!(error, Error::InvalidArgument(_)), "{error:?}");
        assert!(error.to_string().contains("TABLES"), "{error}");
    })
    .await;
}

#[tokio::test]
async fn the_status_reports_the_head_and_the_lag_while_behind_and_none_once_caught_up() {
    bounded(30, async {
        let db = TestDatabase::create().await;
        let store = patient_store(&db);
        create_tables(db.pool()).await;
        let mut fold = Fold::default();
        append(&store, &mut fold, "ledger-1", 0, 100).await;

        let mut runner = PgProjectionRunner::new(store.clone(), Ledger::default()).batch_size(10);
        let status = runner.status();
        runner.projection_mut().probe = Some((runner.status(), Vec::new()));
        let reached = runner.catch_up().await.expect("catch up");
        let seen = runner.projection_mut().probe.take().expect("probe").1;

        // Behind: the head (the last event) is known from the first batch on, and the lag in
        // events shrinks batch by batch.
        assert_eq!(seen[0].state, SubscriptionState::CatchingUp);
        assert_eq!(seen[0].head, reached);
        assert_eq!(seen[0].lag_events, 100);
        let lags: Vec<u64> = seen.iter().step_by(10).map(|s| s.lag_events).collect();
        assert_eq!(lags, [100, 90, 80, 70, 60, 50, 40, 30, 20, 10]);
        assert!(seen[10].last_event_at.is_some());

        // Caught up: no lag.
        let done = status.borrow().clone();
        assert_eq!(done.state, SubscriptionState::Live);
        assert_eq!((done.position, done.head), (reached, reached));
        assert_eq!((done.lag_events, done.lag), (0, Duration::ZERO));
        assert_eq!(read_model(db.pool()).await, fold.model);
    })
    .await;
}
