//! `factum::resilience::Resilient` around a real `PostgresStore`: the database cut away in the
//! middle of a stream of appends by a fault-injecting TCP proxy, and a provoked deadlock.
//!
//! The proxy runs inside the test, between the store's pool and the test's own throwaway
//! database; the machine's PostgreSQL service is never touched.

mod proxy_support;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use factum::resilience::{
    CircuitBreakerConfig, CircuitState, Operation, Resilience, Resilient, RetryBudget, RetryPolicy,
};
use factum::{Error, ErrorKind, EventId, EventStore, ExpectedVersion, NewEvent, StreamId};
use factum_postgres::{GroupCommit, PostgresStore, StoreOptions};
use factum_testkit::postgres::TestDatabase;
use proxy_support::{Proxy, upstream};
use sqlx::postgres::PgPoolOptions;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

#[derive(Debug)]
enum Outcome {
    Acknowledged,
    Failed(ErrorKind),
}

/// One append of the stream of appends: its stream, its batch, what it returned.
type Attempted = (StreamId, Vec<NewEvent>, Outcome);

fn event() -> NewEvent {
    NewEvent {
        event_id: EventId::new(),
        event_type: "account.deposited".into(),
        schema_version: 1,
        payload: serde_json::value::to_raw_value(&serde_json::json!({ "amount": 10 }))
            .expect("serialises"),
        metadata: Default::default(),
    }
}

fn ids(batch: &[NewEvent]) -> Vec<Uuid> {
    batch.iter().map(|e| e.event_id.as_uuid()).collect()
}

/// How many times each event id is stored, read directly (not through the proxy).
async fn copies(db: &TestDatabase) -> HashMap<Uuid, i64> {
    sqlx::query_as::<_, (Uuid, i64)>(
        "SELECT event_id, count(*) FROM factum.events GROUP BY event_id",
    )
    .fetch_all(db.pool())
    .await
    .expect("count events")
    .into_iter()
    .collect()
}

/// Waits (bounded) for a condition the test cannot be notified of.
async fn eventually(what: &str, within: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_survive_the_database_being_cut_away_and_restored() {
    cut_away_and_restored(GroupCommit::disabled()).await;
}

/// The same with group commit on, one statement in flight: the lost answer is that of a shared
/// statement (when several appends were queued), whose every request settles by its own ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_committed_appends_survive_the_database_being_cut_away_and_restored() {
    cut_away_and_restored(GroupCommit::enabled().with_max_in_flight(1)).await;
}

async fn cut_away_and_restored(group_commit: GroupCommit) {
    const WRITERS: usize = 4;
    const APPENDS_PER_WRITER: usize = 25;
    const CUT_AFTER: usize = 30;

    let db = TestDatabase::create().await;
    let (options, upstream) = upstream(&db);
    let proxy = Proxy::start(upstream).await;
    let pool = PgPoolOptions::new()
        .max_connections(WRITERS as u32)
        .acquire_timeout(Duration::from_millis(300))
        // No ping before each use: the armed fault must hit an append, not a ping.
        .test_before_acquire(false)
        .connect_with(options.host("127.0.0.1").port(proxy.addr.port()))
        .await
        .expect("connect through the proxy");
    // The outer layer does the retrying; the store only settles lost connections, briefly.
    let pg = PostgresStore::with_options(
        pool,
        StoreOptions::default()
            .with_max_attempts(1)
            .with_outcome_check_timeout(Duration::from_millis(200))
            .with_group_commit(group_commit),
    );
    let resilience = Resilience::new("postgres")
        .with_policy(
            Operation::Append,
            RetryPolicy::new()
                .with_max_attempts(4)
                .with_initial_delay(Duration::from_millis(20))
                .with_max_delay(Duration::from_millis(100))
                .with_max_elapsed(Some(Duration::from_secs(5))),
        )
        .with_budget(RetryBudget::unlimited())
        .with_breaker_config(CircuitBreakerConfig {
            consecutive_failures: 3,
            cool_down: Duration::from_millis(300),
            ..CircuitBreakerConfig::default()
        });
    let store = Arc::new(Resilient::with_resilience(pg, resilience.clone()));

    let outcomes: Arc<Mutex<Vec<Attempted>>> = Arc::default();
    let acknowledged = Arc::new(std::sync::atomic::AtomicUsize::new(0));

    let writers: Vec<JoinHandle<()>> = (0..WRITERS)
        .map(|w| {
            let (store, outcomes, acknowledged) =
                (store.clone(), outcomes.clone(), acknowledged.clone());
            tokio::spawn(async move {
                for i in 0..APPENDS_PER_WRITER {
                    let stream = StreamId::new(format!("account-{w}x{i}")).expect("valid");
                    let batch = vec![event(), event()];
                    let result = store
                        .append(
                            factum::AppendRequest::new(stream.clone(), batch.clone())
                                .expected_version(ExpectedVersion::NoStream),
                        )
                        .await;
                    let outcome = match result {
                        Ok(appended) => {
                            assert!(!appended.duplicate, "a fresh batch is no re-append");
                            acknowledged.fetch_add(1, Ordering::SeqCst);
                            Outcome::Acknowledged
                        }
                        Err(error) => {
                            // While the circuit is open, wait as told before the next append.
                            if let Error::Unavailable { retry_after, .. } = &error {
                                tokio::time::sleep(*retry_after).await;
                            }
                            Outcome::Failed(error.kind())
                        }
                    };
                    outcomes
                        .lock()
                        .expect("lock")
                        .push((stream, batch, outcome));
                }
            })
        })
        .collect();

    // Mid-stream: the next answer after CUT_AFTER acknowledged appends is lost, and the
    // database stays unreachable until the breaker has opened.
    eventually("appends before the cut", Duration::from_secs(30), || {
        acknowledged.load(Ordering::SeqCst) >= CUT_AFTER
    })
    .await;
    proxy.lose_next_answer();
    eventually("the circuit to open", Duration::from_secs(30), || {
        resilience.is_open()
    })
    .await;
    let while_down = resilience.health();
    assert!(while_down.circuit_open);
    assert_eq!(while_down.dependency, "postgres");
    proxy.restore();

    for writer in writers {
        writer.await.expect("writer task");
    }
    // The writers' last appends went through after the restore: the circuit closed again.
    assert_eq!(resilience.breaker().state(), CircuitState::Closed);

    let outcomes = std::mem::take(&mut *outcomes.lock().expect("lock"));
    assert_eq!(outcomes.len(), WRITERS * APPENDS_PER_WRITER);
    let stored = copies(&db).await;
    let mut failed = Vec::new();
    for (stream, batch, outcome) in outcomes {
        match outcome {
            Outcome::Acknowledged => {
                for id in ids(&batch) {
                    assert_eq!(
                        stored.get(&id),
                        Some(&1),
                        "acknowledged {stream}: stored once"
                    );
                }
            }
            Outcome::Failed(kind) => {
                assert!(
                    matches!(
                        kind,
                        ErrorKind::UnknownOutcome | ErrorKind::Transient | ErrorKind::Unavailable
                    ),
                    "{stream}: unexpected {kind}"
                );
                for id in ids(&batch) {
                    let n = stored.get(&id).copied().unwrap_or(0);
                    if kind == ErrorKind::UnknownOutcome {
                        assert!(n <= 1, "{stream}: {n} copies");
                    } else {
                        // Transient and unavailable promise that nothing was stored.
                        assert_eq!(n, 0, "{stream} failed with {kind} but is stored");
                    }
                }
                failed.push((stream, batch, kind));
            }
        }
    }
    assert!(
        failed
            .iter()
            .any(|(_, _, kind)| *kind == ErrorKind::UnknownOutcome),
        "the append whose answer was lost reports an unknown outcome: {:?}",
        failed.iter().map(|(s, _, k)| (s, k)).collect::<Vec<_>>()
    );

    // Settling: re-append every failed batch unchanged. Each ends stored exactly once, whether
    // or not its first attempt had landed.
    for (stream, batch, _) in &failed {
        store
            .append(
                factum::AppendRequest::new(stream.clone(), batch.clone())
                    .expected_version(ExpectedVersion::NoStream),
            )
            .await
            .expect("re-append after the restore");
    }
    let stored = copies(&db).await;
    assert_eq!(stored.len(), 2 * WRITERS * APPENDS_PER_WRITER);
    assert!(stored.values().all(|&n| n == 1), "no duplicates");
    if group_commit.is_enabled() {
        let shared: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT transaction_id FROM factum.events \
             GROUP BY transaction_id HAVING count(DISTINCT stream_id) > 1) g",
        )
        .fetch_one(db.pool())
        .await
        .expect("shared statements");
        assert!(shared > 0, "no statement carried several appends");
    }
}

/// A deadlock between the store's append and a raw transaction: PostgreSQL aborts the append
/// (40P01), the store reports it as transient, `Resilient` retries it, and it is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_chosen_as_deadlock_victim_is_retried_and_stored_once() {
    let db = TestDatabase::create().await;
    let pg = db.store_with(StoreOptions::default().with_max_attempts(1));
    let store = Arc::new(Resilient::with_resilience(
        pg,
        Resilience::new("postgres").with_policy(
            Operation::Append,
            RetryPolicy::new()
                .with_max_attempts(3)
                .with_initial_delay(Duration::from_millis(10)),
        ),
    ));
    let stream = StreamId::new("account-1").expect("valid");
    store
        .append(
            factum::AppendRequest::new(stream.clone(), vec![event()])
                .expected_version(ExpectedVersion::NoStream),
        )
        .await
        .expect("the stream exists");
    let deadlocks_before = deadlocks(&db).await;

    // T1 stores (without committing) an event with the id the append will use, and will detect
    // deadlocks late, so that PostgreSQL picks the append as the victim.
    let batch = vec![event()];
    let contested = batch[0].event_id.as_uuid();
    let mut t1 = db.pool().begin().await.expect("begin");
    sqlx::query("SET LOCAL deadlock_timeout = '10s'")
        .execute(&mut *t1)
        .await
        .expect("set deadlock_timeout");
    sqlx::query(
        "INSERT INTO factum.events (stream_id, stream_version, event_id, event_type, schema_version, payload)
         VALUES ('other-1', 1, $1, 'other.happened', 1, '{}')",
    )
    .bind(contested)
    .execute(&mut *t1)
    .await
    .expect("raw insert");

    // The append locks the stream's row, then waits for T1's uncommitted event id...
    let append = tokio::spawn({
        let (store, stream) = (store.clone(), stream.clone());
        async move {
            store
                .append(
                    factum::AppendRequest::new(stream.clone(), batch)
                        .expected_version(ExpectedVersion::Exact(factum::StreamVersion::new(1))),
                )
                .await
        }
    });
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                   AND wait_event_type = 'Lock'";
    let deadline = Instant::now() + Duration::from_secs(10);
    while sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(waiting))
        .fetch_one(db.pool())
        .await
        .expect("pg_stat_activity")
        == 0
    {
        assert!(Instant::now() < deadline, "the append never blocked on T1");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // ...while T1 now waits for the stream's row: a cycle. The append's backend detects it first
    // (1 s default deadlock_timeout) and is rolled back; T1's update then goes through.
    sqlx::query("UPDATE factum.streams SET version = version WHERE stream_id = $1")
        .bind(stream.as_str())
        .execute(&mut *t1)
        .await
        .expect("T1 survives the deadlock");
    t1.rollback().await.expect("rollback");

    let appended = append
        .await
        .expect("append task")
        .expect("the retried append succeeds");
    assert!(!appended.duplicate);
    assert_eq!(appended.stream_version.get(), 2);
    // T1's update could only finish because the append's transaction was rolled back, yet the
    // append succeeded: it was retried. The server's statistics confirm the deadlock (they are
    // flushed asynchronously, hence the bounded wait).
    let deadline = Instant::now() + Duration::from_secs(10);
    while deadlocks(&db).await == deadlocks_before {
        assert!(Instant::now() < deadline, "no deadlock was recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stored = copies(&db).await;
    assert_eq!(stored.get(&contested), Some(&1), "stored once");
    assert_eq!(stored.len(), 2);
}

async fn deadlocks(db: &TestDatabase) -> i64 {
    sqlx::query_scalar("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
        .fetch_one(db.pool())
        .await
        .expect("pg_stat_database")
}

/// An event the runner test projects: any `account.deposited` payload.
#[derive(Debug)]
struct Deposit;

impl factum::Event for Deposit {
    fn event_type(&self) -> &'static str {
        "account.deposited"
    }
    fn schema_version(&self) -> u32 {
        1
    }
    fn event_types() -> &'static [&'static str] {
        &["account.deposited"]
    }
    fn encode(&self) -> Result<Box<factum::RawValue>, factum::EncodeError> {
        factum::encode_json(&serde_json::json!({ "amount": 10 }))
    }
    fn decode(stored: &factum::Stored<'_>) -> Result<Self, factum::DecodeError> {
        let (_, _, _) = (stored.event_type, stored.schema_version, stored.payload);
        Ok(Deposit)
    }
}

/// Counts how many times each event was applied.
struct Applied;

impl factum_postgres::projection::PgProjection for Applied {
    const NAME: &'static str = "applied";
    type Event = Deposit;

    async fn apply(
        &mut self,
        tx: &mut factum_postgres::projection::ProjectionTx<'_>,
        event: &factum::Envelope<Deposit>,
    ) -> Result<(), factum::BoxError> {
        sqlx::query(
            "INSERT INTO applied (event_id, times) VALUES ($1, 1) \
             ON CONFLICT (event_id) DO UPDATE SET times = applied.times + 1",
        )
        .bind(event.event_id.as_uuid())
        .execute(tx.conn())
        .await?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_runner_waits_out_a_database_outage_and_applies_every_event_once() {
    use factum::subscription::SubscriptionState;
    use factum_postgres::projection::PgProjectionRunner;

    let db = TestDatabase::create().await;
    sqlx::query("CREATE TABLE applied (event_id uuid PRIMARY KEY, times int NOT NULL)")
        .execute(db.pool())
        .await
        .expect("table");
    let (options, upstream) = upstream(&db);
    let proxy = Proxy::start(upstream).await;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_millis(300))
        .connect_with(options.host("127.0.0.1").port(proxy.addr.port()))
        .await
        .expect("connect through the proxy");
    let through_proxy = PostgresStore::with_options(
        pool,
        StoreOptions::default().with_retry(RetryPolicy::no_retry()),
    );
    // Events are written straight to the database, never through the proxy.
    let direct = db.patient_store();
    let stream = StreamId::new("account-outage").expect("id");
    let mut written = 0;
    let mut write = |n: usize| {
        let direct = direct.clone();
        let stream = stream.clone();
        let from = written;
        written += n;
        async move {
            for _ in 0..n {
                direct
                    .append(factum::AppendRequest::new(stream.clone(), vec![event()]))
                    .await
                    .expect("append");
            }
            from + n
        }
    };

    let mut runner = PgProjectionRunner::new(through_proxy, Applied)
        .batch_size(10)
        .idle_backoff(Duration::from_millis(5), Duration::from_millis(20));
    let mut status = runner.status();
    let task = tokio::spawn(async move { runner.run(std::future::pending::<()>()).await });

    // The log's head can lag behind under other tests' open transactions (the horizon is
    // cluster-wide), so progress is judged by the read model itself.
    let applied = |n: usize| {
        let pool = db.pool().clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let count: i64 = sqlx::query_scalar("SELECT count(*) FROM applied")
                    .fetch_one(&pool)
                    .await
                    .expect("count");
                if count >= n as i64 {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "{count} of {n} events applied after 60 s"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let total = write(40).await;
    applied(total).await;

    proxy.cut();
    let total = total.max(write(40).await);
    status
        .wait_for(|s| matches!(s.state, SubscriptionState::Retrying(_)))
        .await
        .expect("the runner reports that it is retrying, not failed");
    assert!(!task.is_finished(), "the runner must not stop on an outage");

    proxy.restore();
    applied(total).await;

    let times: Vec<(Uuid, i32)> = sqlx::query_as("SELECT event_id, times FROM applied")
        .fetch_all(db.pool())
        .await
        .expect("read model");
    assert_eq!(times.len(), total, "every event applied");
    assert!(
        times.iter().all(|&(_, n)| n == 1),
        "no event applied twice: {:?}",
        times.iter().filter(|&&(_, n)| n != 1).collect::<Vec<_>>()
    );
    task.abort();
}
