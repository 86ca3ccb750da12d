//! Prints the Redis sink's throughput (a `Subscription` on `RedisCheckpoints`, batches of 100,
//! each applied with its checkpoint in one `WATCH`/`MULTI`/`EXEC`) next to a raw redis-rs loop
//! that writes the same commands and a checkpoint in one `MULTI`/`EXEC` per batch of 100 (no
//! `WATCH`, no framework, the events already in memory): the ceiling, measured in the same run
//! against the same server. Medians of 3 runs.
//!
//! `cargo run --release -p factum-bench-redis [-- SCALE]`; SCALE (default 1.0) multiplies the
//! event count (20 000). Uses `REDIS_URL`, else 127.0.0.1:6379, else a `redis-server` it starts.

#![allow(clippy::print_stdout)]

use std::time::Instant;

use factum::subscription::{BatchFailure, BatchHandler, Subscription};
use factum::{
    AppendRequest, EventFilter, EventId, EventStore, InMemoryStore, LogPosition, NewEvent,
    RawValue, RecordedEvent, StreamId,
};
use factum_redis::redis::{self, AsyncCommands as _};
use factum_redis::{RedisCheckpoints, RedisKeyspace, RedisTx};

const RUNS: usize = 3;
const BATCH: usize = 100;

fn payload(i: usize) -> Box<RawValue> {
    // About 300 bytes: an order with three lines.
    RawValue::from_string(format!(
        r#"{{"order_id":"ord-{i:08}","customer":{{"id":"cus-{c:06}","name":"Customer {c}","email":"customer{c}@example.com"}},"lines":[{{"sku":"SKU-{a:05}","qty":2,"price_cents":1999}},{{"sku":"SKU-{b:05}","qty":1,"price_cents":4950}},{{"sku":"SKU-{d:05}","qty":5,"price_cents":299}}],"currency":"EUR","placed_at":"2026-12-01T10:00:00Z"}}"#,
        c = i % 997,
        a = i % 97,
        b = (i * 7) % 89,
        d = (i * 13) % 83
    ))
    .expect("json")
}

/// The commands one event makes: the order document, the customer's total, the customer's feed.
fn commands(pipe: &mut redis::Pipeline, namespace: &str, event: &RecordedEvent) {
    let order: serde_json::Value = serde_json::from_str(event.payload.get()).expect("payload");
    let customer = order["customer"]["id"].as_str().expect("customer");
    let total: i64 = order["lines"]
        .as_array()
        .expect("lines")
        .iter()
        .map(|l| l["qty"].as_i64().unwrap_or(0) * l["price_cents"].as_i64().unwrap_or(0))
        .sum();
    let feed = format!("{namespace}:feed:{customer}");
    pipe.hset(
        format!("{namespace}:order:{}", event.stream_id),
        "document",
        event.payload.get(),
    )
    .hincr(format!("{namespace}:totals"), customer, total)
    .lpush(&feed, event.event_id.to_string())
    .ltrim(&feed, 0, 49);
}

struct Orders;

impl BatchHandler<RedisTx> for Orders {
    async fn handle_batch(
        &mut self,
        tx: &mut RedisTx,
        events: &[RecordedEvent],
    ) -> Result<(), BatchFailure> {
        let namespace = tx.keyspace().namespace().to_owned();
        for event in events {
            commands(tx.pipe(), &namespace, event);
        }
        Ok(())
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let scale: f64 = std::env::args()
        .nth(1)
        .map_or(Ok(1.0), |s| s.parse())
        .map_err(|e| format!("SCALE must be a number: {e}"))?;
    let n = ((20_000.0 * scale) as usize).max(BATCH);
    let url = factum_testkit::redis::shared_url();

    let store = InMemoryStore::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(10) {
        let stream = StreamId::new(format!("order-{}", chunk[0] / 10))?;
        let batch = chunk
            .iter()
            .map(|&i| NewEvent {
                event_id: EventId::new(),
                event_type: "order.placed".into(),
                schema_version: 1,
                payload: payload(i),
                metadata: Default::default(),
            })
            .collect();
        store.append(AppendRequest::new(stream, batch)).await?;
    }
    let events = store
        .read_all(LogPosition::START, usize::MAX, &EventFilter::all())
        .await?;
    println!(
        "{n} events of ~{} bytes, batches of {BATCH}, Redis at {url}",
        events[0].payload.get().len()
    );

    let mut sink = Vec::new();
    let mut raw = Vec::new();
    for run in 0..RUNS {
        // The ceiling: the same commands and a checkpoint, one MULTI/EXEC per batch.
        let namespace = factum_testkit::redis::namespace("bench-raw");
        let client = redis::Client::open(url.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let started = Instant::now();
        for batch in events.chunks(BATCH) {
            let mut pipe = redis::pipe();
            pipe.atomic();
            for event in batch {
                commands(&mut pipe, &namespace, event);
            }
            let last = batch.last().expect("a batch").position;
            pipe.set(
                format!("{namespace}:checkpoint"),
                format!("{}:{}", last.commit, last.global.get()),
            );
            pipe.query_async::<()>(&mut conn).await?;
        }
        let raw_rate = n as f64 / started.elapsed().as_secs_f64();

        // The sink: the consumer loop, reading the log, one unit of work per batch.
        let keyspace =
            RedisKeyspace::connect(&url, &factum_testkit::redis::namespace("bench-sink")).await?;
        let mut subscription = Subscription::with_checkpoints(
            "orders",
            store.clone(),
            RedisCheckpoints::new(&keyspace),
        )
        .batch_size(BATCH);
        let started = Instant::now();
        subscription.catch_up(Orders).await?;
        let sink_rate = n as f64 / started.elapsed().as_secs_f64();
        let totals: usize = keyspace.connection().hlen(keyspace.key("totals")).await?;
        assert_eq!(totals, 997.min(n), "every customer's total written");
        println!(
            "run {run}: sink {sink_rate:>9.0} events/s, raw MULTI/EXEC {raw_rate:>9.0} events/s"
        );
        sink.push(sink_rate);
        raw.push(raw_rate);
    }
    let (sink, raw) = (median(sink), median(raw));
    println!(
        "median: sink {sink:.0} events/s, raw {raw:.0} events/s, ratio {:.2}",
        sink / raw
    );
    Ok(())
}
