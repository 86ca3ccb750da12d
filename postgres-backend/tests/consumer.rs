//! The one consumer runtime on PostgreSQL: a plain `Subscription` with PostgreSQL's checkpoint
//! transactions and lease on two instances (one leads, the other takes over when the leader's
//! connection dies, every event handled once in total), the projection runner's filter narrowing
//! the projection's, and a requested start surviving a failed checkpoint write.

mod projection_support;
mod proxy_support;

use std::time::Duration;

use factum::subscription::{
    BatchFailure, BatchHandler, KnownEvents, StartFrom, Subscription, SubscriptionState,
};
use factum::{EventStore, NewEvent, RecordedEvent, StreamId};
use factum_postgres::projection::PgProjectionRunner;
use factum_postgres::subscription::{PgCheckpoints, PgLease, PgTx};
use factum_postgres::{PostgresStore, StoreOptions};
use factum_testkit::postgres::TestDatabase;
use projection_support::*;
use proxy_support::{Proxy, upstream};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::time::Instant;

/// Appends through today's positional API (one place to change when it becomes a request).
async fn append_to(store: &PostgresStore, stream: &str, events: Vec<NewEvent>) {
    store
        .append(factum::AppendRequest::new(
            StreamId::new(stream).expect("id"),
            events,
        ))
        .await
        .expect("append");
}

/// A store whose every connection (pool and lease) goes through `proxy`.
async fn store_through(db: &TestDatabase, proxy: &Proxy) -> PostgresStore {
    let options: PgConnectOptions = db.url().parse().expect("a PostgreSQL URL");
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_millis(300))
        .connect_with(options.host("127.0.0.1").port(proxy.addr.port()))
        .await
        .expect("connect through the proxy");
    PostgresStore::with_options(
        pool,
        StoreOptions::default()
            .with_retry(factum::resilience::RetryPolicy::no_retry())
            .with_read_settle_timeout(Duration::from_secs(10)),
    )
}

/// A plain handler that records each event in `handled`, in the checkpoint's transaction.
struct Record {
    instance: &'static str,
}

impl BatchHandler<PgTx> for Record {
    async fn handle_batch(
        &mut self,
        tx: &mut PgTx,
        events: &[RecordedEvent],
    ) -> Result<(), BatchFailure> {
        let ids: Vec<uuid::Uuid> = events.iter().map(|e| e.event_id.as_uuid()).collect();
        sqlx::query("INSERT INTO handled (event_id, instance) SELECT unnest($1::uuid[]), $2")
            .bind(ids)
            .bind(self.instance)
            .execute(tx.conn())
            .await
            .map_err(BatchFailure::somewhere)?;
        Ok(())
    }
}

async fn count(db: &TestDatabase, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_one(db.pool())
        .await
        .expect("count")
}

/// Waits (bounded) until `handled` has `n` rows: the table is the shared truth.
async fn handled_reaches(db: &TestDatabase, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows = count(db, "SELECT count(*) FROM handled").await;
        if rows >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{rows} of {n} events handled after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_plain_subscriptions_with_a_lease_one_leads_the_other_takes_over_and_each_event_is_handled_once()
 {
    bounded(120, async {
        let db = TestDatabase::create().await;
        sqlx::query("CREATE TABLE handled (event_id uuid NOT NULL, instance text NOT NULL)")
            .execute(db.pool())
            .await
            .expect("table");
        let direct = patient_store(&db);
        let proxy = Proxy::start(upstream(&db).1).await;
        let through_proxy = store_through(&db, &proxy).await;

        let instance = |store: &PostgresStore| {
            Subscription::with_checkpoints("handled", store.clone(), PgCheckpoints::new(store))
                .lease(PgLease::new(store))
                .batch_size(7)
                .idle_backoff(Duration::from_millis(5), Duration::from_millis(20))
                .standby_poll(Duration::from_millis(20))
        };
        // A, the leader, reaches the database through the proxy; B directly.
        let mut a = instance(&through_proxy);
        let mut a_status = a.status();
        let a_task = tokio::spawn(async move {
            a.run(Record { instance: "a" }, std::future::pending::<()>())
                .await
        });
        wait_for(&mut a_status, "A to lead", |s| {
            s.state == SubscriptionState::Live
        })
        .await;
        let mut b = instance(&direct);
        let mut b_status = b.status();
        let b_task = tokio::spawn(async move {
            b.run(Record { instance: "b" }, std::future::pending::<()>())
                .await
        });
        wait_for(&mut b_status, "B to stand by", |s| {
            s.state == SubscriptionState::Standby
        })
        .await;

        let mut written = 0;
        for round in 0..10 {
            append_to(
                &direct,
                &format!("ledger-{round}"),
                vec![entry(1), entry(2), entry(3)],
            )
            .await;
            written += 3;
        }
        handled_reaches(&db, written).await;
        assert_eq!(
            count(&db, "SELECT count(*) FROM handled WHERE instance = 'b'").await,
            0
        );

        // A's connections die (a network cut): its lease ends with its session, B takes over,
        // while writes go on.
        let writer = tokio::spawn({
            let direct = direct.clone();
            async move {
                for round in 0..20 {
                    append_to(
                        &direct,
                        &format!("ledger-w{round}"),
                        vec![entry(4), entry(5)],
                    )
                    .await;
                    tokio::task::yield_now().await;
                }
                40
            }
        });
        proxy.cut();
        wait_for(&mut b_status, "B to take over", |s| {
            s.state == SubscriptionState::Live
        })
        .await;
        written += writer.await.expect("writer");
        handled_reaches(&db, written).await;

        assert_eq!(count(&db, "SELECT count(*) FROM handled").await, written);
        assert_eq!(
            count(&db, "SELECT count(DISTINCT event_id) FROM handled").await,
            written,
            "every event handled once in total across both instances"
        );
        assert!(count(&db, "SELECT count(*) FROM handled WHERE instance = 'b'").await > 0);
        assert!(
            matches!(
                a_status.borrow().state,
                SubscriptionState::Retrying(_) | SubscriptionState::Standby
            ),
            "A waits for its database, it does not lead: {:?}",
            a_status.borrow()
        );
        for task in [a_task, b_task] {
            task.abort();
            let _ = task.await;
        }
    })
    .await;
}

#[tokio::test]
async fn the_runner_filter_narrows_the_projections_filter() {
    bounded(60, async {
        let db = TestDatabase::create().await;
        let store = patient_store(&db);
        create_tables(db.pool()).await;
        let mut fold = Fold::default();
        append(&store, &mut fold, "ledger-1", 1, 3).await;
        // In the category asked for but of a type the projection does not handle: it must not
        // reach the projection (whose decoding would fail on it).
        append_to(
            &store,
            "ledger-2",
            vec![NewEvent {
                event_type: "ledger.closed".into(),
                ..entry(0)
            }],
        )
        .await;
        // The projection's type, outside the category asked for.
        append_to(&store, "audit-1", vec![entry(100)]).await;

        let mut runner = PgProjectionRunner::new(store.clone(), Ledger::default())
            .filter(factum::EventFilter::all().with_categories(["ledger"]));
        runner
            .catch_up()
            .await
            .expect("only its own events reach the projection");
        assert_eq!(read_model(db.pool()).await, fold.model);
    })
    .await;
}

#[tokio::test]
async fn a_requested_start_survives_a_transient_failure_of_its_checkpoint_write() {
    bounded(60, async {
        let db = TestDatabase::create().await;
        let store = patient_store(&db);
        create_tables(db.pool()).await;
        let mut fold = Fold::default();
        append(&store, &mut fold, "ledger-1", 1, 5).await;
        PgProjectionRunner::new(store.clone(), Ledger::default())
            .catch_up()
            .await
            .expect("first run");
        // The read model is emptied for a replay from the beginning...
        sqlx::raw_sql("TRUNCATE ledger_totals, ledger_streams, ledger_applied")
            .execute(db.pool())
            .await
            .expect("truncate");
        // ...and the first checkpoint write after that fails with a serialisation failure (a
        // transient error). A sequence is not transactional: the trigger fails exactly once.
        sqlx::raw_sql(
            "CREATE SEQUENCE fail_once; \
             CREATE FUNCTION fail_once() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
               IF nextval('fail_once') = 1 THEN \
                 RAISE EXCEPTION 'injected' USING ERRCODE = '40001'; \
               END IF; RETURN NEW; END $$; \
             CREATE TRIGGER fail_once BEFORE INSERT OR UPDATE ON factum.subscription_checkpoints \
               FOR EACH ROW EXECUTE FUNCTION fail_once();",
        )
        .execute(db.pool())
        .await
        .expect("trigger");
        let mut replay = PgProjectionRunner::new(store.clone(), Ledger::default())
            .start_from(StartFrom::Beginning);
        let mut status = replay.status();
        let watcher = tokio::spawn(async move {
            status
                .wait_for(|s| matches!(s.state, SubscriptionState::Retrying(_)))
                .await
                .is_ok()
        });
        replay.catch_up().await.expect("the replay");
        assert!(
            watcher.await.expect("watcher"),
            "the failed write was waited out"
        );
        assert_eq!(
            read_model(db.pool()).await,
            fold.model,
            "the replay from the beginning happened, not a resume from the old checkpoint"
        );
    })
    .await;
}

/// The ledger projection, declaring the events registered in its category: it reads the
/// category whole and decides by type.
#[derive(Default)]
struct StrictLedger(Ledger);

impl factum_postgres::projection::PgProjection for StrictLedger {
    const NAME: &'static str = "ledger";
    const TABLES: &'static [&'static str] = Ledger::TABLES;
    type Event = Entry;

    fn known_events() -> Option<KnownEvents> {
        Some(KnownEvents::new().category("ledger", ["ledger.entry", "ledger.closed"]))
    }

    async fn apply(
        &mut self,
        tx: &mut factum_postgres::projection::ProjectionTx<'_>,
        event: &factum::Envelope<Entry>,
    ) -> Result<(), factum::BoxError> {
        factum_postgres::projection::PgProjection::apply(&mut self.0, tx, event).await
    }
}

/// The stored events of `stream`, in order.
async fn stored(store: &PostgresStore, stream: &str) -> Vec<RecordedEvent> {
    use futures_util::TryStreamExt as _;
    store
        .read_stream(
            &StreamId::new(stream).expect("id"),
            factum::StreamVersion::INITIAL,
        )
        .try_collect()
        .await
        .expect("read")
}

#[tokio::test]
async fn an_event_of_a_type_nothing_registers_stops_the_projection_or_is_parked_never_skipped() {
    bounded(60, async {
        let db = TestDatabase::create().await;
        let store = patient_store(&db);
        create_tables(db.pool()).await;
        let mut fold = Fold::default();
        append(&store, &mut fold, "ledger-1", 1, 3).await;
        append_to(
            &store,
            "ledger-2",
            vec![NewEvent {
                event_type: "ledger.closed".into(),
                ..entry(0)
            }],
        )
        .await;
        // A stored type renamed by hand (as a typo or a rename without an alias would leave it).
        let events = stored(&store, "ledger-1").await;
        sqlx::query("UPDATE factum.events SET event_type = 'ledger.entyr' WHERE event_id = $1")
            .bind(events[1].event_id.as_uuid())
            .execute(db.pool())
            .await
            .expect("rename");

        let mut stopping = PgProjectionRunner::new(store.clone(), StrictLedger::default())
            .handler_retries(1, Duration::ZERO);
        let error = stopping
            .catch_up()
            .await
            .expect_err("stops on the unknown type");
        match &error {
            factum::Error::Handler {
                stream,
                version,
                event_type,
                position,
                ..
            } => {
                assert_eq!(stream.as_str(), "ledger-1");
                assert_eq!(version.get(), 2);
                assert_eq!(event_type, "ledger.entyr");
                assert_eq!(*position, events[1].position);
            }
            other => panic!("expected a handler error, got {other:?}"),
        }
        let text = format!(
            "{error}: {}",
            std::error::Error::source(&error).expect("source")
        );
        assert!(text.contains("no registered event type"), "{text}");
        let model = read_model(db.pool()).await;
        assert_eq!(
            (model.count, model.total),
            (1, 1),
            "only the event before it"
        );
        assert_eq!(
            factum::subscription::CheckpointStore::load_checkpoint(&store, "ledger")
                .await
                .expect("checkpoint"),
            Some(events[0].position),
            "the checkpoint rests just before the unknown event"
        );

        // Parking: it goes to the dead letters, the rest is applied (the known foreign type is
        // passed over).
        let mut parking = PgProjectionRunner::new(store.clone(), StrictLedger::default())
            .handler_retries(1, Duration::ZERO)
            .park_failures();
        parking.catch_up().await.expect("goes on");
        let parked = factum::subscription::DeadLetterStore::parked(&store, "ledger")
            .await
            .expect("parked");
        assert_eq!(parked.len(), 1);
        assert_eq!(parked[0].event.event_type, "ledger.entyr");
        let model = read_model(db.pool()).await;
        assert_eq!((model.count, model.total), (2, 1 + 3));

        // The same through a plain in-process projection subscription over PostgreSQL.
        let mut projector = factum::subscription::Projector::new(StrictTotal::default());
        let error = Subscription::for_projection::<StrictTotal>(store.clone())
            .handler_retries(1, Duration::ZERO)
            .catch_up(&mut projector)
            .await
            .expect_err("stops on the unknown type");
        assert!(error.to_string().contains("ledger.entyr"), "{error}");
        assert_eq!(projector.get().0, 1);
    })
    .await;
}

/// An in-process total of the ledger entries, declaring its category's events.
#[derive(Default)]
struct StrictTotal(i64);

impl factum::Projection for StrictTotal {
    const NAME: &'static str = "strict-total";
    type Event = Entry;

    fn known_events() -> Option<KnownEvents> {
        Some(KnownEvents::new().category("ledger", ["ledger.entry", "ledger.closed"]))
    }

    fn apply(&mut self, event: &factum::Envelope<Entry>) -> Result<(), factum::BoxError> {
        self.0 += event.event.n;
        Ok(())
    }
}

#[tokio::test]
async fn corrupt_metadata_stops_the_runner_naming_the_metadata_after_the_good_events_before_it() {
    bounded(60, async {
        let db = TestDatabase::create().await;
        let store = patient_store(&db);
        create_tables(db.pool()).await;
        let mut fold = Fold::default();
        append(&store, &mut fold, "ledger-1", 1, 5).await;
        let events = stored(&store, "ledger-1").await;
        // A JSON array where the metadata object belongs, in the middle of one page.
        sqlx::query("UPDATE factum.events SET metadata = '[1, 2]'::jsonb WHERE event_id = $1")
            .bind(events[2].event_id.as_uuid())
            .execute(db.pool())
            .await
            .expect("corrupt");

        let mut runner = PgProjectionRunner::new(store.clone(), Ledger::default());
        let error = runner.catch_up().await.expect_err("stops on the corrupt row");
        assert!(
            matches!(&error, factum::Error::Metadata { stream, version, position, .. }
                if stream.as_str() == "ledger-1" && version.get() == 3 && *position == events[2].position),
            "{error:?}"
        );
        let text = error.to_string();
        assert!(text.contains("metadata"), "{text}");
        assert!(!text.contains("decoding or upcasting"), "{text}");
        let model = read_model(db.pool()).await;
        assert_eq!(
            (model.count, model.total),
            (2, 1 + 2),
            "the good events before it were applied"
        );
        assert_eq!(
            factum::subscription::CheckpointStore::load_checkpoint(&store, "ledger")
                .await
                .expect("checkpoint"),
            Some(events[1].position),
            "the checkpoint rests just before the bad event"
        );
    })
    .await;
}
