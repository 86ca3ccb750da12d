//! Prints factum-postgres figures next to raw sqlx baselines measured in the same run against
//! the same (throwaway) database. `cargo run --release -p factum-bench [-- SCALE]`; SCALE (default
//! 1.0) multiplies the operation counts.

#![allow(clippy::print_stdout, clippy::result_large_err)]

use std::time::{Duration, Instant};

use factum::{EventStore, ExpectedVersion, NewEvent, StreamId, StreamVersion};
use factum_postgres::PostgresStore;
use factum_testkit::postgres::TestDatabase;
use futures_util::TryStreamExt;
use sqlx::PgPool;
use uuid::Uuid;

fn event() -> NewEvent {
    NewEvent {
        event_id: factum::EventId::new(),
        event_type: "account.deposited".into(),
        schema_version: 1,
        payload: serde_json::value::to_raw_value(
            &serde_json::json!({"amount": 100, "note": "bench"}),
        )
        .expect("json"),
        metadata: Default::default(),
    }
}

const PAYLOAD: &str = r#"{"amount": 100, "note": "bench"}"#;

/// The raw baseline: a table shaped like `events`, written with plain INSERTs.
async fn raw_table(pool: &PgPool) {
    sqlx::raw_sql(
        "CREATE SEQUENCE raw_seq; \
         CREATE TABLE raw_events (LIKE factum.events INCLUDING DEFAULTS); \
         ALTER TABLE raw_events ALTER COLUMN global_position SET DEFAULT nextval('raw_seq'); \
         ALTER TABLE raw_events ADD PRIMARY KEY (global_position); \
         CREATE UNIQUE INDEX ON raw_events (stream_id, stream_version); \
         CREATE UNIQUE INDEX ON raw_events (event_id); \
         CREATE INDEX ON raw_events (transaction_id, global_position);",
    )
    .execute(pool)
    .await
    .expect("raw table");
}

async fn raw_insert(pool: &PgPool, stream: &str, version: i64) {
    sqlx::query(
        "INSERT INTO raw_events (stream_id, stream_version, event_id, event_type, schema_version, payload) \
         VALUES ($1, $2, $3, 'account.deposited', 1, $4::jsonb)",
    )
    .bind(stream)
    .bind(version)
    .bind(Uuid::now_v7())
    .bind(PAYLOAD)
    .execute(pool)
    .await
    .expect("raw insert");
}

async fn raw_batch(pool: &PgPool, stream: &str, first: i64, n: i64) {
    let mut sql = String::from(
        "INSERT INTO raw_events (stream_id, stream_version, event_id, event_type, schema_version, payload) VALUES ",
    );
    for i in 0..n {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str(&format!(
            "($1, {}, ${}, 'account.deposited', 1, $2::jsonb)",
            first + i,
            i + 3
        ));
    }
    let mut q = sqlx::query(&sql).bind(stream).bind(PAYLOAD);
    for _ in 0..n {
        q = q.bind(Uuid::now_v7());
    }
    q.execute(pool).await.expect("raw batch");
}

/// Single-event appends with an exact expected version, `clients` concurrent clients, each on its
/// own streams. Returns events per second.
async fn factum_appends(
    store: &PostgresStore,
    clients: usize,
    per_client: usize,
    tag: &str,
) -> f64 {
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let store = store.clone();
            let stream = StreamId::new(format!("{tag}-{c}")).expect("id");
            tokio::spawn(async move {
                for v in 0..per_client {
                    store
                        .append(
                            &stream,
                            ExpectedVersion::Exact(StreamVersion::new(v as u64)),
                            vec![event()],
                        )
                        .await
                        .expect("append");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    (clients * per_client) as f64 / started.elapsed().as_secs_f64()
}

async fn raw_appends(pool: &PgPool, clients: usize, per_client: usize, tag: &str) -> f64 {
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let pool = pool.clone();
            let stream = format!("{tag}-{c}");
            tokio::spawn(async move {
                for v in 0..per_client {
                    raw_insert(&pool, &stream, v as i64 + 1).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    (clients * per_client) as f64 / started.elapsed().as_secs_f64()
}

fn row(name: &str, ours: f64, raw: f64, unit: &str, target: f64) {
    let ratio = ours / raw;
    println!(
        "| {name} | {ours:>10.0} {unit} | {raw:>10.0} {unit} | {:>5.1}% | {:>3.0}% | {} |",
        ratio * 100.0,
        target * 100.0,
        if ratio >= target { "met" } else { "missed" }
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let scale: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let n = |base: f64| ((base * scale) as usize).max(1);
    let db = TestDatabase::create().await;
    let store = db.store();
    raw_table(db.pool()).await;

    println!("| benchmark | factum | raw sqlx | ratio | target | |");
    println!("| --- | --- | --- | --- | --- | --- |");

    // Warm up both paths (connections, plans).
    factum_appends(&store, 4, 20, "warm").await;
    raw_appends(db.pool(), 4, 20, "warm").await;

    let seq = n(2000.0);
    let raw = raw_appends(db.pool(), 1, seq, "raw1").await;
    let ours = factum_appends(&store, 1, seq, "seq").await;
    row("(a) 1 client, 1-event appends", ours, raw, "ev/s", 0.8);

    let per = n(400.0);
    let raw = raw_appends(db.pool(), 16, per, "raw16").await;
    let ours = factum_appends(&store, 16, per, "par").await;
    row("(b) 16 clients, 1-event appends", ours, raw, "ev/s", 0.6);

    let batches = n(100.0);
    let started = Instant::now();
    for b in 0..batches {
        raw_batch(db.pool(), &format!("rawbatch-{b}"), 1, 100).await;
    }
    let raw = (batches * 100) as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    for b in 0..batches {
        let stream = StreamId::new(format!("batch-{b}")).expect("id");
        store
            .append(
                &stream,
                ExpectedVersion::NoStream,
                (0..100).map(|_| event()).collect(),
            )
            .await
            .expect("batch");
    }
    let ours = (batches * 100) as f64 / started.elapsed().as_secs_f64();
    row("(c) 100-event batch appends", ours, raw, "ev/s", 0.8);

    // (d) one long stream, loaded through read_stream vs raw streaming of the same rows.
    let long = n(100_000.0);
    let stream = StreamId::new("long-1").expect("id");
    let mut version = 0u64;
    while (version as usize) < long {
        let size = 1000.min(long - version as usize);
        store
            .append(
                &stream,
                ExpectedVersion::Exact(StreamVersion::new(version)),
                (0..size).map(|_| event()).collect(),
            )
            .await
            .expect("fill");
        version += size as u64;
    }
    let started = Instant::now();
    let mut count = 0usize;
    let mut rows = sqlx::query_as::<_, (i64, String)>(
        "SELECT stream_version, payload::text FROM factum.events WHERE stream_id = $1 ORDER BY stream_version",
    )
    .bind(stream.as_str())
    .fetch(db.pool());
    while let Some((_, payload)) = rows.try_next().await.expect("raw read") {
        count += usize::from(!payload.is_empty());
    }
    let raw_elapsed = started.elapsed();
    let started = Instant::now();
    let mut events = store.read_stream(&stream, StreamVersion::INITIAL);
    let mut ours_count = 0usize;
    while let Some(e) = events.try_next().await.expect("read") {
        ours_count += usize::from(e.stream_version.get() > 0);
    }
    let ours_elapsed = started.elapsed();
    assert_eq!(count, long);
    assert_eq!(ours_count, long);
    let per_sec = |d: Duration| long as f64 / d.as_secs_f64();
    row(
        &format!("(d) load a {long}-event stream"),
        per_sec(ours_elapsed),
        per_sec(raw_elapsed),
        "ev/s",
        0.7,
    );
}
