//! Prints transactional-projection figures against a raw sqlx baseline measured in the same run
//! against the same (throwaway) database:
//!
//! * catch-up throughput of a simple transactional projection (balances per account) over a
//!   pre-loaded log, next to the raw read rate of the same rows with sqlx;
//! * commit-to-projection latency (p50/p99) under 16 concurrent writers.
//!
//! `cargo run --release -p factum-bench-projections [-- EVENTS]` (default 1,000,000 events).

#![allow(clippy::print_stdout, clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use factum::subscription::StartFrom;
use factum::{
    BoxError, DecodeError, EncodeError, Envelope, EventFilter, EventStore, LogPosition, NewEvent,
    RawValue, StreamId,
};
use factum_postgres::projection::{PgProjection, PgProjectionRunner, ProjectionTx};
use factum_postgres::{PostgresStore, StoreOptions};
use factum_testkit::postgres::TestDatabase;
use sqlx::PgPool;

const BATCH: usize = 1000;
/// The larger batch size the catch-up is also measured with.
const BIG_BATCH: usize = 5000;

#[derive(Debug)]
struct Deposited {
    amount: i64,
}

impl factum::Event for Deposited {
    fn event_type(&self) -> &'static str {
        "account.deposited"
    }
    fn schema_version(&self) -> u32 {
        1
    }
    fn event_types() -> &'static [&'static str] {
        &["account.deposited"]
    }
    fn encode(&self) -> Result<Box<RawValue>, EncodeError> {
        factum::encode_json(&serde_json::json!({ "amount": self.amount }))
    }
    fn decode(stored: &factum::Stored<'_>) -> Result<Self, DecodeError> {
        let (event_type, version, payload) =
            (stored.event_type, stored.schema_version, stored.payload);
        if (event_type, version) != ("account.deposited", 1) {
            return Err(DecodeError::unknown(event_type, version));
        }
        let value: serde_json::Value = factum::decode_json(payload)?;
        Ok(Self {
            amount: value["amount"].as_i64().unwrap_or_default(),
        })
    }
}

/// Balances per account, written set-based: one statement per batch.
struct Balances {
    /// Recorded-at of the events of the batch in flight (latency run only).
    applied: Option<Arc<Mutex<Vec<DateTime<Utc>>>>>,
}

impl Balances {
    async fn write(
        tx: &mut ProjectionTx<'_>,
        events: &[Envelope<Deposited>],
    ) -> Result<(), BoxError> {
        let mut sums: HashMap<&str, (i64, i64)> = HashMap::new();
        for event in events {
            let entry = sums.entry(event.stream_id.aggregate_id()).or_default();
            entry.0 += event.event.amount;
            entry.1 += 1;
        }
        let (mut accounts, mut amounts, mut counts) = (Vec::new(), Vec::new(), Vec::new());
        for (account, (amount, count)) in sums {
            accounts.push(account.to_owned());
            amounts.push(amount);
            counts.push(count);
        }
        let sql = format!(
            "INSERT INTO {t} AS b (account, balance, events) \
             SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[]) \
             ON CONFLICT (account) DO UPDATE \
             SET balance = b.balance + EXCLUDED.balance, events = b.events + EXCLUDED.events",
            t = tx.table("balances"),
        );
        sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
            .bind(accounts)
            .bind(amounts)
            .bind(counts)
            .execute(tx.conn())
            .await?;
        Ok(())
    }
}

impl PgProjection for Balances {
    const NAME: &'static str = "balances";
    const TABLES: &'static [&'static str] = &["balances"];
    type Event = Deposited;

    async fn apply(
        &mut self,
        tx: &mut ProjectionTx<'_>,
        event: &Envelope<Deposited>,
    ) -> Result<(), BoxError> {
        Self::write(tx, std::slice::from_ref(event)).await
    }

    async fn apply_batch(
        &mut self,
        tx: &mut ProjectionTx<'_>,
        events: &[Envelope<Deposited>],
    ) -> Result<(), BoxError> {
        Self::write(tx, events).await?;
        if let Some(applied) = &self.applied {
            let mut applied = applied.lock().unwrap_or_else(|e| e.into_inner());
            applied.extend(events.iter().map(|e| e.recorded_at));
        }
        Ok(())
    }
}

/// The same projection applying event by event (the trait's default `apply_batch`).
struct BalancesPerEvent;

impl PgProjection for BalancesPerEvent {
    const NAME: &'static str = "balances_per_event";
    const TABLES: &'static [&'static str] = &["balances"];
    type Event = Deposited;

    async fn apply(
        &mut self,
        tx: &mut ProjectionTx<'_>,
        event: &Envelope<Deposited>,
    ) -> Result<(), BoxError> {
        let sql = format!(
            "INSERT INTO {t} AS b (account, balance, events) VALUES ($1, $2, 1) \
             ON CONFLICT (account) DO UPDATE SET balance = b.balance + $2, events = b.events + 1",
            t = tx.table("balances"),
        );
        sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
            .bind(event.stream_id.aggregate_id())
            .bind(event.event.amount)
            .execute(tx.conn())
            .await?;
        Ok(())
    }
}

async fn reset_balances(pool: &PgPool) {
    sqlx::raw_sql(
        "DROP TABLE IF EXISTS balances; \
         CREATE TABLE balances (account text PRIMARY KEY, balance bigint NOT NULL, events bigint NOT NULL) WITH (fillfactor = 50);",
    )
    .execute(pool)
    .await
    .expect("balances table");
}

/// Loads `n` events straight into the events table, 100k per transaction.
async fn load(pool: &PgPool, n: i64) {
    let chunk = 100_000;
    let mut first = 0;
    while first < n {
        let last = (first + chunk).min(n) - 1;
        sqlx::query(
            "INSERT INTO factum.events (stream_id, stream_version, event_id, event_type, schema_version, payload) \
             SELECT 'account-' || (g % 10000), g / 10000 + 1, gen_random_uuid(), 'account.deposited', 1, \
                    jsonb_build_object('amount', g % 100) \
             FROM generate_series($1::bigint, $2::bigint) g",
        )
        .bind(first)
        .bind(last)
        .execute(pool)
        .await
        .expect("load events");
        first = last + 1;
    }
    sqlx::query("ANALYZE factum.events")
        .execute(pool)
        .await
        .expect("analyze");
}

/// The baseline: the same rows, same columns, same page size, keyset-paged with plain sqlx (on the
/// same `(transaction_id, global_position)` index, without the gap-safety horizon). The bound is
/// a scalar subquery, as in the store, so that PostgreSQL plans an index scan even for pages past
/// the statistics' last value (with a plain parameter it sorts the rest of the log per page).
async fn raw_read(pool: &PgPool, page_size: usize) -> (u64, Duration) {
    let started = Instant::now();
    let (mut commit, mut global, mut rows) = (0_i64, 0_i64, 0_u64);
    loop {
        #[allow(clippy::type_complexity)]
        let page: Vec<(
            i64,
            i64,
            String,
            i64,
            sqlx::types::Uuid,
            String,
            i32,
            String,
            String,
            DateTime<Utc>,
        )> = sqlx::query_as(
            "SELECT transaction_id::text::bigint AS commit_id, global_position, stream_id, stream_version, event_id, \
                    event_type, schema_version, payload::text, metadata::text, recorded_at \
             FROM factum.events \
             WHERE (transaction_id, global_position) > ((SELECT $1::bigint::text::xid8), $2) \
               AND event_type = ANY($4::text[]) \
             ORDER BY transaction_id, global_position LIMIT $3",
        )
        .bind(commit)
        .bind(global)
        .bind(i64::try_from(page_size).expect("batch"))
        .bind(vec!["account.deposited".to_owned()])
        .fetch_all(pool)
        .await
        .expect("raw read");
        let Some(last) = page.last() else { break };
        (commit, global) = (last.0, last.1);
        rows += page.len() as u64;
    }
    (rows, started.elapsed())
}

/// factum's gap-safe `read_all`, without a projection.
async fn factum_read(store: &PostgresStore, page_size: usize) -> (u64, Duration) {
    let started = Instant::now();
    let filter = EventFilter::for_event::<Deposited>();
    let (mut position, mut rows) = (LogPosition::START, 0_u64);
    loop {
        let page = store
            .read_all(position, page_size, &filter)
            .await
            .expect("read all");
        let Some(last) = page.last() else { break };
        position = last.position;
        rows += page.len() as u64;
    }
    (rows, started.elapsed())
}

fn rate(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

#[tokio::main]
async fn main() {
    let n: i64 = std::env::args()
        .nth(1)
        .map(|a| a.replace('_', "").parse().expect("EVENTS is a number"))
        .unwrap_or(1_000_000);
    let db = TestDatabase::create().await;
    let store =
        db.store_with(StoreOptions::default().with_read_settle_timeout(Duration::from_secs(10)));
    let pool = db.pool().clone();

    println!("loading {n} events...");
    load(&pool, n).await;
    let events = u64::try_from(n).expect("n");

    // Warm the cache once, then measure the baselines and the catch-up, at each batch size.
    raw_read(&pool, BATCH).await;
    let mut rows = Vec::new();
    for size in [BATCH, BIG_BATCH] {
        let (raw_rows, raw_time) = raw_read(&pool, size).await;
        assert_eq!(raw_rows, events);
        let (read_rows, read_time) = factum_read(&store, size).await;
        assert_eq!(read_rows, events);
        reset_balances(&pool).await;
        let mut runner = PgProjectionRunner::new(store.clone(), Balances { applied: None })
            .start_from(StartFrom::Beginning)
            .batch_size(size);
        let started = Instant::now();
        runner.catch_up().await.expect("catch up");
        let catch_up_time = started.elapsed();
        let applied: i64 = sqlx::query_scalar("SELECT sum(events)::bigint FROM balances")
            .fetch_one(&pool)
            .await
            .expect("sum");
        assert_eq!(applied, n, "every event applied once");
        let raw_rate = rate(raw_rows, raw_time);
        rows.push(format!(
            "| raw sqlx keyset read (baseline, pages of {size}) | {raw_rows} | {:.2} s | {raw_rate:.0} | 1.00 |",
            raw_time.as_secs_f64(),
        ));
        rows.push(format!(
            "| factum `read_all` (gap-safe, pages of {size}) | {read_rows} | {:.2} s | {:.0} | {:.2} |",
            read_time.as_secs_f64(),
            rate(read_rows, read_time),
            rate(read_rows, read_time) / raw_rate
        ));
        rows.push(format!(
            "| transactional projection catch-up, set-based `apply_batch` (batches of {size}) | {events} | {:.2} s | {:.0} | {:.2} |",
            catch_up_time.as_secs_f64(),
            rate(events, catch_up_time),
            rate(events, catch_up_time) / raw_rate
        ));
    }
    let raw_rate = {
        let (raw_rows, raw_time) = raw_read(&pool, BATCH).await;
        rate(raw_rows, raw_time)
    };

    // The same projection applying event by event, over the first 100k events.
    let per_event_n = events.min(100_000);
    reset_balances(&pool).await;
    let target = store
        .read_all(
            LogPosition::START,
            usize::try_from(per_event_n).expect("n"),
            &EventFilter::all(),
        )
        .await
        .expect("read")
        .last()
        .map(|e| e.position)
        .expect("events");
    let mut per_event = PgProjectionRunner::new(store.clone(), BalancesPerEvent).batch_size(BATCH);
    let started = Instant::now();
    let mut status = per_event.status();
    let task = tokio::spawn(async move { per_event.run(std::future::pending::<()>()).await });
    status
        .wait_for(|s| s.position >= target)
        .await
        .expect("per-event runner");
    let per_event_time = started.elapsed();
    task.abort();

    // Latency: 16 writers appending single events while the projection follows live.
    reset_balances(&pool).await;
    let applied = Arc::new(Mutex::new(Vec::new()));
    let mut live = PgProjectionRunner::new(
        store.clone(),
        Balances {
            applied: Some(applied.clone()),
        },
    )
    .start_from(StartFrom::Now)
    .batch_size(BATCH)
    .idle_backoff(Duration::from_millis(1), Duration::from_millis(10));
    let mut live_status = live.status();
    let live_task = tokio::spawn(async move { live.run(std::future::pending::<()>()).await });
    live_status
        .wait_for(|s| s.state == factum::subscription::SubscriptionState::Live)
        .await
        .expect("live");
    let writers_n = 16;
    let per_writer = 250;
    let total = writers_n * per_writer;
    // On each committed batch (status update), the events applied so far are visible: their
    // latency is now minus when they were recorded (their append's transaction start).
    let watcher = {
        let applied = applied.clone();
        let mut status = live_status.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            while latencies.len() < total {
                if status.changed().await.is_err() {
                    break;
                }
                let now = Utc::now();
                let drained: Vec<_> = applied
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .drain(..)
                    .collect();
                latencies.extend(
                    drained
                        .into_iter()
                        .map(|at| (now - at).to_std().unwrap_or(Duration::ZERO)),
                );
            }
            latencies
        })
    };
    let write_started = Instant::now();
    let writers: Vec<_> = (0..writers_n)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let stream = StreamId::new(format!("live-{w}")).expect("id");
                for _ in 0..per_writer {
                    let event = NewEvent::encode(&Deposited { amount: 1 }, Default::default())
                        .expect("encode");
                    store
                        .append(factum::AppendRequest::new(stream.clone(), vec![event]))
                        .await
                        .expect("append");
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer");
    }
    let write_time = write_started.elapsed();
    let mut latencies = tokio::time::timeout(Duration::from_secs(60), watcher)
        .await
        .expect("the projection applied every event in time")
        .expect("watcher");
    live_task.abort();
    latencies.sort();

    println!();
    println!("| measurement | events | time | events/s | ratio |");
    println!("|---|---:|---:|---:|---:|");
    for row in &rows {
        println!("{row}");
    }
    println!(
        "| transactional projection catch-up, one statement per event | {per_event_n} | {:.2} s | {:.0} | {:.2} |",
        per_event_time.as_secs_f64(),
        rate(per_event_n, per_event_time),
        rate(per_event_n, per_event_time) / raw_rate
    );
    println!();
    println!(
        "commit-to-projection latency, {writers_n} writers x {per_writer} single-event appends ({:.0} appends/s): \
         p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} samples)",
        rate(total as u64, write_time),
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        latencies.len(),
    );
}
