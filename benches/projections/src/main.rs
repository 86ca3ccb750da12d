//! Prints transactional-projection figures against a raw sqlx baseline measured in the same run
//! against the same (throwaway) database:
//!
//! * `read_all` over a pre-loaded log (about 300-byte payloads) next to a raw sqlx keyset read of
//!   the same rows and columns;
//! * catch-up throughput of a simple transactional projection (balances per account) next to its
//!   ceiling: a raw sqlx loop doing the same keyset read, the same decode and the same set-based
//!   write of each batch in one transaction with a checkpoint update;
//! * commit-to-projection latency (p50/p99) under 16 concurrent writers.
//!
//! `cargo run --release -p factum-bench-projections [-- EVENTS]` (default 1,000,000 events).
//! `FACTUM_BENCH_RUNS=N` (default 3) repeats the read and catch-up measurements and prints
//! medians with the range of the ratios; `FACTUM_BENCH_ONLY=catchup` skips the per-event and
//! latency runs.

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

/// A deposit with a realistic payload (about 300 bytes as stored).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Deposited {
    amount: i64,
    currency: String,
    reference: String,
    channel: String,
    description: String,
    counterparty: Counterparty,
    tags: Vec<String>,
    requested_at: String,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Counterparty {
    name: String,
    iban: String,
    country: String,
}

impl Deposited {
    fn new(amount: i64) -> Self {
        Self {
            amount,
            currency: "EUR".into(),
            reference: "c4ca4238a0b923820dcc509a6f75849b".into(),
            channel: "mobile".into(),
            description: "monthly savings".into(),
            counterparty: Counterparty {
                name: "Corner Shop Ltd".into(),
                iban: "PT50000201231234567890154".into(),
                country: "PT".into(),
            },
            tags: vec!["savings".into(), "recurring".into()],
            requested_at: "2026-12-01T10:00:00.000Z".into(),
        }
    }
}

/// The payload the loader writes, as `jsonb` built in SQL from `g` (same shape as [`Deposited`]).
const PAYLOAD_SQL: &str = "jsonb_build_object('amount', g % 100, 'currency', 'EUR', \
    'reference', md5(g::text), 'channel', 'mobile', 'description', 'monthly savings', \
    'counterparty', jsonb_build_object('name', 'Corner Shop Ltd', \
        'iban', 'PT50000201231234567890154', 'country', 'PT'), \
    'tags', jsonb_build_array('savings', 'recurring'), 'requested_at', '2026-12-01T10:00:00.000Z')";

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
        factum::encode_json(self)
    }
    fn decode(stored: &factum::Stored<'_>) -> Result<Self, DecodeError> {
        let (event_type, version, payload) =
            (stored.event_type, stored.schema_version, stored.payload);
        if (event_type, version) != ("account.deposited", 1) {
            return Err(DecodeError::unknown(event_type, version));
        }
        factum::decode_json(payload)
    }
}

/// Balances per account, written set-based: one statement per batch.
struct Balances {
    /// Recorded-at of the events of the batch in flight (latency run only).
    applied: Option<Arc<Mutex<Vec<DateTime<Utc>>>>>,
}

/// The balance changes of a batch, per account: (accounts, amounts, event counts).
fn sums<'a>(events: impl Iterator<Item = (&'a str, i64)>) -> (Vec<String>, Vec<i64>, Vec<i64>) {
    let mut sums: HashMap<&str, (i64, i64)> = HashMap::new();
    for (account, amount) in events {
        let entry = sums.entry(account).or_default();
        entry.0 += amount;
        entry.1 += 1;
    }
    let (mut accounts, mut amounts, mut counts) = (Vec::new(), Vec::new(), Vec::new());
    for (account, (amount, count)) in sums {
        accounts.push(account.to_owned());
        amounts.push(amount);
        counts.push(count);
    }
    (accounts, amounts, counts)
}

/// The set-based write of a batch's sums into `table`.
async fn write_sums(
    conn: &mut sqlx::PgConnection,
    table: &str,
    (accounts, amounts, counts): (Vec<String>, Vec<i64>, Vec<i64>),
) -> Result<(), sqlx::Error> {
    let sql = format!(
        "INSERT INTO {table} AS b (account, balance, events) \
         SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[]) \
         ON CONFLICT (account) DO UPDATE \
         SET balance = b.balance + EXCLUDED.balance, events = b.events + EXCLUDED.events",
    );
    sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
        .bind(accounts)
        .bind(amounts)
        .bind(counts)
        .execute(conn)
        .await?;
    Ok(())
}

impl Balances {
    async fn write(
        tx: &mut ProjectionTx<'_>,
        events: &[Envelope<Deposited>],
    ) -> Result<(), BoxError> {
        let sums = sums(
            events
                .iter()
                .map(|e| (e.stream_id.aggregate_id(), e.event.amount)),
        );
        let table = tx.table("balances").to_string();
        write_sums(tx.conn(), &table, sums).await?;
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
        let sql = format!(
            "INSERT INTO factum.events (stream_id, stream_version, event_id, event_type, schema_version, payload) \
             SELECT 'account-' || (g % 10000), g / 10000 + 1, gen_random_uuid(), 'account.deposited', 1, \
                    {PAYLOAD_SQL} \
             FROM generate_series($1::bigint, $2::bigint) g",
        );
        sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
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

/// A row of the raw keyset read: the columns `read_all` selects, as plain sqlx types.
#[allow(dead_code)] // Read like the store reads them; not all are used afterwards.
struct RawRow {
    commit_id: i64,
    global_position: i64,
    stream_id: String,
    stream_version: i64,
    event_id: sqlx::types::Uuid,
    event_type: String,
    schema_version: i32,
    payload: String,
    metadata: String,
    correlation_id: Option<sqlx::types::Uuid>,
    causation_id: Option<sqlx::types::Uuid>,
    recorded_at: DateTime<Utc>,
}

impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for RawRow {
    fn from_row(row: &'r sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        // By index, as the store does: a name lookup per column and row slows long reads.
        Ok(Self {
            commit_id: row.try_get(0)?,
            global_position: row.try_get(1)?,
            stream_id: row.try_get(2)?,
            stream_version: row.try_get(3)?,
            event_id: row.try_get(4)?,
            event_type: row.try_get(5)?,
            schema_version: row.try_get(6)?,
            payload: row.try_get(7)?,
            metadata: row.try_get(8)?,
            correlation_id: row.try_get(9)?,
            causation_id: row.try_get(10)?,
            recorded_at: row.try_get(11)?,
        })
    }
}

/// One page of the raw keyset read after `(commit, global)`: the same rows and columns as
/// `read_all`, on the same `(transaction_id, global_position)` index, without the gap-safety
/// horizon. The bound is a scalar subquery, as in the store, so that PostgreSQL plans an index
/// scan even for pages past the statistics' last value (with a plain parameter it sorts the rest
/// of the log per page).
async fn raw_page(
    conn: impl sqlx::PgExecutor<'_>,
    commit: i64,
    global: i64,
    page_size: usize,
) -> Vec<RawRow> {
    sqlx::query_as(
        "SELECT transaction_id::text::bigint AS commit_id, global_position, stream_id, stream_version, event_id, \
                event_type, schema_version, payload::text AS payload, metadata::text AS metadata, \
                correlation_id, causation_id, recorded_at \
         FROM factum.events \
         WHERE (transaction_id, global_position) > ((SELECT $1::bigint::text::xid8), $2) \
           AND event_type = ANY($4::text[]) \
         ORDER BY transaction_id, global_position LIMIT $3",
    )
    .bind(commit)
    .bind(global)
    .bind(i64::try_from(page_size).expect("batch"))
    .bind(vec!["account.deposited".to_owned()])
    .fetch_all(conn)
    .await
    .expect("raw read")
}

/// The read baseline: the raw keyset read of the whole log.
async fn raw_read(pool: &PgPool, page_size: usize) -> (u64, Duration) {
    let started = Instant::now();
    let (mut commit, mut global, mut rows) = (0_i64, 0_i64, 0_u64);
    loop {
        let page = raw_page(pool, commit, global, page_size).await;
        let Some(last) = page.last() else { break };
        (commit, global) = (last.commit_id, last.global_position);
        rows += page.len() as u64;
    }
    (rows, started.elapsed())
}

/// The raw keyset read, then per row the checks `read_all` makes on what it returns: the payload
/// checked as JSON (`RawValue::from_string`) and the stream id validated. Not a baseline: it
/// shows what those checks cost.
async fn raw_read_checked(pool: &PgPool, page_size: usize) -> (u64, Duration) {
    let started = Instant::now();
    let (mut commit, mut global, mut rows) = (0_i64, 0_i64, 0_u64);
    loop {
        let page = raw_page(pool, commit, global, page_size).await;
        let Some(last) = page.last() else { break };
        (commit, global) = (last.commit_id, last.global_position);
        rows += page.len() as u64;
        for row in page {
            let payload = RawValue::from_string(row.payload).expect("json");
            let stream = StreamId::new(row.stream_id).expect("stream id");
            assert!(!payload.get().is_empty() && !stream.as_str().is_empty());
        }
    }
    (rows, started.elapsed())
}

/// The catch-up ceiling: a raw sqlx loop doing, per batch, the same keyset read, the same decode
/// of each payload and the same set-based write, in one transaction with a checkpoint update.
async fn raw_catch_up(pool: &PgPool, page_size: usize) -> (u64, Duration) {
    sqlx::raw_sql(
        "DROP TABLE IF EXISTS raw_checkpoint; \
         CREATE TABLE raw_checkpoint (name text PRIMARY KEY, commit_id bigint NOT NULL, global_position bigint NOT NULL); \
         INSERT INTO raw_checkpoint VALUES ('balances', 0, 0);",
    )
    .execute(pool)
    .await
    .expect("raw checkpoint table");
    let started = Instant::now();
    let (mut commit, mut global, mut rows) = (0_i64, 0_i64, 0_u64);
    loop {
        let page = raw_page(pool, commit, global, page_size).await;
        let Some(last) = page.last() else { break };
        (commit, global) = (last.commit_id, last.global_position);
        let decoded: Vec<(&str, Deposited)> = page
            .iter()
            .map(|r| {
                let account = r.stream_id.split_once('-').expect("category").1;
                (account, serde_json::from_str(&r.payload).expect("decode"))
            })
            .collect();
        let sums = sums(decoded.iter().map(|(a, d)| (*a, d.amount)));
        let mut tx = pool.begin().await.expect("begin");
        write_sums(&mut tx, "balances", sums).await.expect("write");
        sqlx::query(
            "UPDATE raw_checkpoint SET commit_id = $2, global_position = $3 WHERE name = $1",
        )
        .bind("balances")
        .bind(commit)
        .bind(global)
        .execute(&mut *tx)
        .await
        .expect("checkpoint");
        tx.commit().await.expect("commit");
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

    // Warm the cache once, then measure, at each batch size and in each run: the raw read and
    // `read_all`, then the catch-up ceiling and the projection's catch-up.
    let runs: usize = std::env::var("FACTUM_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    raw_read(&pool, BATCH).await;
    let mut rows = Vec::new();
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    for size in [BATCH, BIG_BATCH] {
        // Rates: raw read, read_all, ceiling, catch-up; ratios: read_all / raw, catch-up / ceiling.
        let mut rates: [Vec<f64>; 5] = Default::default();
        let mut ratios: [Vec<f64>; 3] = Default::default();
        for run in 0..runs {
            let (raw_rows, raw_time) = raw_read(&pool, size).await;
            assert_eq!(raw_rows, events);
            let (read_rows, read_time) = factum_read(&store, size).await;
            assert_eq!(read_rows, events);
            let (checked_rows, checked_time) = raw_read_checked(&pool, size).await;
            assert_eq!(checked_rows, events);
            reset_balances(&pool).await;
            let (ceiling_rows, ceiling_time) = raw_catch_up(&pool, size).await;
            assert_eq!(ceiling_rows, events);
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
            let r = [
                rate(raw_rows, raw_time),
                rate(read_rows, read_time),
                rate(ceiling_rows, ceiling_time),
                rate(events, catch_up_time),
                rate(checked_rows, checked_time),
            ];
            println!(
                "pages of {size}, run {run}: raw read {:.0}/s, read_all {:.0}/s ({:.2}), raw read + checks {:.0}/s ({:.2}), ceiling {:.0}/s, catch-up {:.0}/s ({:.2})",
                r[0],
                r[1],
                r[1] / r[0],
                r[4],
                r[4] / r[0],
                r[2],
                r[3],
                r[3] / r[2]
            );
            for (i, v) in r.into_iter().enumerate() {
                rates[i].push(v);
            }
            ratios[0].push(r[1] / r[0]);
            ratios[1].push(r[3] / r[2]);
            ratios[2].push(r[4] / r[0]);
        }
        let m = |i: usize| median(&rates[i]).0;
        let (read_ratio, read_lo, read_hi) = median(&ratios[0]);
        let (catch_ratio, catch_lo, catch_hi) = median(&ratios[1]);
        let (checked_ratio, checked_lo, checked_hi) = median(&ratios[2]);
        rows.push(format!(
            "| raw sqlx keyset read, same rows and columns (pages of {size}) | {events} | {:.0} | 1.00 |",
            m(0)
        ));
        rows.push(format!(
            "| factum `read_all` (gap-safe, pages of {size}) | {events} | {:.0} | {read_ratio:.2} ({read_lo:.2}–{read_hi:.2}) of the raw read |",
            m(1)
        ));
        rows.push(format!(
            "| raw keyset read + the payload's JSON check and the stream id's validation per row (pages of {size}) | {events} | {:.0} | {checked_ratio:.2} ({checked_lo:.2}–{checked_hi:.2}) of the raw read |",
            m(4)
        ));
        rows.push(format!(
            "| catch-up ceiling: raw sqlx read + decode + set-based write + checkpoint, one transaction per batch of {size} | {events} | {:.0} | 1.00 |",
            m(2)
        ));
        rows.push(format!(
            "| transactional projection catch-up, set-based `apply_batch` (batches of {size}) | {events} | {:.0} | {catch_ratio:.2} ({catch_lo:.2}–{catch_hi:.2}) of the ceiling |",
            m(3)
        ));
    }
    let print_rows = |rows: &[String]| {
        println!();
        println!("| measurement (median of {runs} runs) | events | events/s | ratio (range) |");
        println!("|---|---:|---:|---:|");
        for row in rows {
            println!("{row}");
        }
    };
    if std::env::var("FACTUM_BENCH_ONLY").as_deref() == Ok("catchup") {
        print_rows(&rows);
        return;
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
                    let event =
                        NewEvent::encode(&Deposited::new(1), Default::default()).expect("encode");
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

    print_rows(&rows);
    println!(
        "| transactional projection catch-up, one statement per event | {per_event_n} | {:.0} | {:.2} of the raw read |",
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
