//! The one consumer runtime on PostgreSQL: a plain `Subscription` with PostgreSQL's checkpoint
//! transactions and lease on two instances (one leads, the other takes over when the leader's
//! connection dies, every event handled once in total), the projection runner's filter narrowing
//! the projection's, and a requested start surviving a failed checkpoint write.

mod projection_support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use factum::subscription::{
    BatchFailure, BatchHandler, StartFrom, Subscription, SubscriptionState,
};
use factum::{EventStore, ExpectedVersion, NewEvent, RecordedEvent, StreamId};
use factum_postgres::projection::PgProjectionRunner;
use factum_postgres::subscription::{PgCheckpoints, PgLease, PgTx};
use factum_postgres::{PostgresStore, StoreOptions};
use factum_testkit::postgres::TestDatabase;
use projection_support::*;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Appends through today's positional API (one place to change when it becomes a request).
async fn append_to(store: &PostgresStore, stream: &str, events: Vec<NewEvent>) {
    store
        .append(
            &StreamId::new(stream).expect("id"),
            ExpectedVersion::Any,
            events,
        )
        .await
        .expect("append");
}

/// A TCP proxy to the database that the test can cut: every connection dropped, new ones refused.
struct Proxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let up = Arc::new(AtomicBool::new(true));
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn({
            let (up, connections) = (up.clone(), connections.clone());
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        continue; // refused: the client sees the connection closed
                    }
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        continue;
                    };
                    let connection = tokio::spawn(forward(client, server));
                    connections.lock().expect("lock").push(connection);
                }
            }
        });
        Self {
            addr,
            up,
            connections,
            accept,
        }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for connection in self.connections.lock().expect("lock").drain(..) {
            connection.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn forward(client: TcpStream, server: TcpStream) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let answers = async {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = server_read.read(&mut buffer).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            client_write.write_all(&buffer[..n]).await?;
        }
    };
    tokio::select! {
        _ = tokio::io::copy(&mut client_read, &mut server_write) => {}
        _ = answers => {}
    }
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

fn upstream(db: &TestDatabase) -> SocketAddr {
    let options: PgConnectOptions = db.url().parse().expect("a PostgreSQL URL");
    format!("{}:{}", options.get_host(), options.get_port())
        .parse()
        .expect("the test server listens on an IP address")
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
    sqlx::query_scalar(sql)
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
        let proxy = Proxy::start(upstream(&db)).await;
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
