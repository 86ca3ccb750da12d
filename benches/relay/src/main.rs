//! Prints the relay's throughput next to a raw async-nats publish loop of the same messages in
//! the same run, and the end-to-end latency from a commit in one service to its effect committed
//! in another, through NATS JetStream, under a steady load.
//!
//! `cargo run --release -p factum-bench-relay [-- SCALE]`; SCALE (default 1.0) multiplies the
//! event counts. Needs `DATABASE_URL` (an admin URL) or a local PostgreSQL installation, and
//! `NATS_URL` or a NATS server with JetStream on 127.0.0.1:4222 (or the installed binary).

#![allow(clippy::print_stdout, clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use factum::bus::{
    Bus, BusMessage, ConsumerConfig, InboundConsumer, InboundOptions, PublicEvents, Relay,
    ServiceName, StreamConfig,
};
use factum::subscription::{BatchFailure, BatchHandler, Subscription};
use factum::{
    AppendRequest, EventFilter, EventId, EventStore, LogPosition, NewEvent, RawValue,
    RecordedEvent, StreamId,
};
use factum_nats::JetStreamBus;
use factum_postgres::PostgresStore;
use factum_postgres::subscription::{PgCheckpoints, PgTx};
use factum_testkit::postgres::TestDatabase;

const RUNS: usize = 3;

fn payload(i: usize) -> Box<RawValue> {
    // About 300 bytes: an order with three lines.
    RawValue::from_string(format!(
        r#"{{"order_id":"ord-{i:08}","customer":{{"id":"cus-{c:06}","name":"Customer {c}","email":"customer{c}@example.com"}},"lines":[{{"sku":"SKU-{a:05}","qty":2,"price_cents":1999}},{{"sku":"SKU-{b:05}","qty":1,"price_cents":4950}},{{"sku":"SKU-{d:05}","qty":5,"price_cents":299}}],"currency":"EUR","placed_at":"2026-12-01T10:00:00Z"}}"#,
        c = i % 9973,
        a = i % 97,
        b = (i * 7) % 89,
        d = (i * 13) % 83
    ))
    .expect("json")
}

fn event(i: usize) -> NewEvent {
    NewEvent {
        event_id: EventId::new(),
        event_type: "order.placed".into(),
        schema_version: 1,
        payload: payload(i),
        metadata: Default::default(),
    }
}

fn unique(prefix: &str) -> ServiceName {
    let id = EventId::new().as_uuid().simple().to_string();
    ServiceName::new(format!("{prefix}{}", &id[id.len() - 8..])).expect("valid")
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

async fn read_all(store: &PostgresStore) -> Vec<RecordedEvent> {
    let mut out = Vec::new();
    let mut after = LogPosition::START;
    loop {
        let page = store
            .read_all(after, 5000, &EventFilter::all())
            .await
            .expect("read");
        let Some(last) = page.last() else { break };
        after = last.position;
        out.extend(page);
    }
    out
}

/// One run of the throughput pair: (relay events/s, raw loop events/s).
async fn throughput(
    bus: &JetStreamBus,
    client: &async_nats::Client,
    n: usize,
) -> (f64, f64, f64, f64) {
    let db = TestDatabase::create().await;
    let store = db.store();
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let events = chunk.iter().map(|&i| event(i)).collect();
        let stream = StreamId::for_aggregate("order", &format!("o{}", chunk[0] / 100)).expect("id");
        store
            .append(AppendRequest::new(stream, events))
            .await
            .expect("append");
    }
    let service = unique("rb");
    bus.ensure_stream(&StreamConfig::for_service(&service).max_age(Duration::from_secs(900)))
        .await
        .expect("stream");
    let routes = PublicEvents::new(service.clone())
        .publish("order", ["order.placed"])
        .expect("routes");
    // What reading the log alone costs (the same subscription, a handler doing nothing).
    let mut read_only =
        Subscription::with_checkpoints("read-only", store.clone(), PgCheckpoints::new(&store))
            .batch_size(500);
    let started = Instant::now();
    read_only.catch_up(Noop).await.expect("read");
    let read_rate = n as f64 / started.elapsed().as_secs_f64();
    // The relay's own cost: the same relay to the in-process bus (no broker).
    let memory = factum::bus::InProcessBus::new();
    memory
        .ensure_stream(&StreamConfig::for_service(&service))
        .await
        .expect("stream");
    let mut in_memory = Relay::new(memory, routes.clone());
    let mut subscription =
        Subscription::with_checkpoints("in-memory", store.clone(), PgCheckpoints::new(&store))
            .filter(in_memory.filter())
            .batch_size(500);
    let started = Instant::now();
    subscription.catch_up(&mut in_memory).await.expect("relay");
    let memory_rate = n as f64 / started.elapsed().as_secs_f64();
    println!("    (relay to the in-process bus: {memory_rate:.0} ev/s)");
    let mut relay = Relay::new(bus.clone(), routes);
    let mut subscription =
        Subscription::with_checkpoints(relay.name(), store.clone(), PgCheckpoints::new(&store))
            .filter(relay.filter())
            .batch_size(500);
    let started = Instant::now();
    subscription.catch_up(&mut relay).await.expect("relay");
    let relay_rate = n as f64 / started.elapsed().as_secs_f64();
    assert_eq!(relay.status().borrow().published, n as u64);

    // The ceiling: the same messages (headers and bodies), published by a raw async-nats loop
    // in batches of 500 whose acknowledgements are awaited, as the relay does.
    let raw = unique("raw");
    bus.ensure_stream(&StreamConfig::for_service(&raw).max_age(Duration::from_secs(900)))
        .await
        .expect("stream");
    let messages: Vec<(String, async_nats::HeaderMap, bytes::Bytes)> = read_all(&store)
        .await
        .into_iter()
        .map(|e| {
            let subject = factum::bus::subject(&raw, "order", &e.event_type).expect("subject");
            let m = BusMessage::new(subject, raw.clone(), e);
            let mut headers = async_nats::HeaderMap::new();
            for (name, value) in m.headers() {
                headers.insert(name, value.as_str());
            }
            (
                m.subject.clone(),
                headers,
                bytes::Bytes::copy_from_slice(m.body()),
            )
        })
        .collect();
    // The bus adapter alone: the same messages through `JetStreamBus::publish`, no log read.
    let adapter = unique("bus");
    bus.ensure_stream(&StreamConfig::for_service(&adapter).max_age(Duration::from_secs(900)))
        .await
        .expect("stream");
    let bus_messages: Vec<BusMessage> = read_all(&store)
        .await
        .into_iter()
        .map(|e| {
            let subject = factum::bus::subject(&adapter, "order", &e.event_type).expect("subject");
            BusMessage::new(subject, adapter.clone(), e)
        })
        .collect();
    let started = Instant::now();
    for batch in bus_messages.chunks(500) {
        bus.publish(batch).await.expect("publish");
    }
    let adapter_rate = n as f64 / started.elapsed().as_secs_f64();
    let js = async_nats::jetstream::new(client.clone());
    let started = Instant::now();
    for batch in messages.chunks(500) {
        let mut acks = Vec::with_capacity(batch.len());
        for (subject, headers, body) in batch {
            acks.push(
                js.publish_with_headers(subject.clone(), headers.clone(), body.clone())
                    .await
                    .expect("publish"),
            );
        }
        for ack in acks {
            ack.await.expect("ack");
        }
    }
    let raw_rate = n as f64 / started.elapsed().as_secs_f64();
    drop(db);
    (relay_rate, raw_rate, read_rate, adapter_rate)
}

struct Noop;

impl factum::subscription::EventHandler for Noop {
    async fn handle(&mut self, _event: &RecordedEvent) -> Result<(), factum::BoxError> {
        Ok(())
    }
}

/// The receiving side's effect: a row per event with the time its transaction ran.
struct Arrivals;

impl BatchHandler<PgTx> for Arrivals {
    async fn handle_batch(
        &mut self,
        tx: &mut PgTx,
        events: &[RecordedEvent],
    ) -> Result<(), BatchFailure> {
        for event in events {
            sqlx::query("INSERT INTO arrivals (event_id, at) VALUES ($1, clock_timestamp())")
                .bind(event.event_id.as_uuid())
                .execute(tx.conn())
                .await
                .map_err(BatchFailure::somewhere)?;
        }
        Ok(())
    }
}

/// One run of the latency measurement: commit-in-A to effect-committed-in-B, in milliseconds,
/// for `rate` events/s during `seconds`.
async fn latency(bus: &JetStreamBus, rate: usize, seconds: usize) -> Vec<f64> {
    let (a_db, b_db) = (TestDatabase::create().await, TestDatabase::create().await);
    let (a, b) = (a_db.store(), b_db.store());
    sqlx::query("CREATE TABLE arrivals (event_id uuid PRIMARY KEY, at timestamptz NOT NULL)")
        .execute(b.pool())
        .await
        .expect("table");
    let service = unique("lat");
    let config = StreamConfig::for_service(&service).max_age(Duration::from_secs(900));
    bus.ensure_stream(&config).await.expect("stream");
    let routes = PublicEvents::new(service.clone())
        .publish("order", ["order.placed"])
        .expect("routes");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let relay_task = tokio::spawn({
        let (a, bus, stopped) = (a.clone(), bus.clone(), stopped.clone());
        async move {
            let relay = Relay::new(bus, routes);
            let mut subscription =
                Subscription::with_checkpoints(relay.name(), a.clone(), PgCheckpoints::new(&a))
                    .filter(relay.filter())
                    .idle_backoff(Duration::from_millis(2), Duration::from_millis(20));
            subscription
                .run(relay, until_stopped(stopped))
                .await
                .expect("relay");
        }
    });
    let mut consumer = InboundConsumer::new(
        bus.clone(),
        factum_postgres::PgInbox::new(&b),
        ConsumerConfig::new(&config.name, "latency"),
    )
    .options(InboundOptions::default().fetch_wait(Duration::from_millis(500)));
    let mut handled = consumer.status();
    let consumer_task = tokio::spawn({
        let stopped = stopped.clone();
        async move {
            consumer
                .run(Arrivals, until_stopped(stopped))
                .await
                .expect("consumer")
        }
    });

    let committed: Arc<Mutex<HashMap<EventId, DateTime<Utc>>>> = Arc::default();
    let total = rate * seconds;
    let every = Duration::from_secs_f64(1.0 / rate as f64);
    let mut tick = tokio::time::interval(every);
    for i in 0..total {
        tick.tick().await;
        let e = event(i);
        let id = e.event_id;
        let stream = StreamId::for_aggregate("order", &format!("o{i}")).expect("id");
        a.append(AppendRequest::new(stream, vec![e]))
            .await
            .expect("append");
        committed.lock().expect("lock").insert(id, Utc::now());
    }
    tokio::time::timeout(
        Duration::from_secs(60),
        handled.wait_for(|s| s.handled >= total as u64),
    )
    .await
    .expect("all arrived")
    .expect("status");
    stop.send(true).expect("stop");
    relay_task.await.expect("relay");
    consumer_task.await.expect("consumer");
    let rows: Vec<(sqlx::types::Uuid, DateTime<Utc>)> =
        sqlx::query_as("SELECT event_id, at FROM arrivals")
            .fetch_all(b.pool())
            .await
            .expect("arrivals");
    let committed = committed.lock().expect("lock");
    let mut out: Vec<f64> = rows
        .into_iter()
        .filter_map(|(id, at)| {
            let sent = committed.get(&EventId::from_uuid(id))?;
            Some((at - *sent).num_microseconds()? as f64 / 1000.0)
        })
        .collect();
    out.sort_by(f64::total_cmp);
    drop((a_db, b_db));
    out
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let scale: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let url = factum_testkit::nats::shared_url();
    let bus = JetStreamBus::connect(&url).await.expect("connect to NATS");
    let client = bus.client().clone();
    let n = (20_000.0 * scale) as usize;
    println!(
        "relay throughput: {n} events of ~300 bytes, PostgreSQL log → JetStream ({url}), {RUNS} runs"
    );
    let mut relay_rates = Vec::new();
    let mut raw_rates = Vec::new();
    let mut ratios = Vec::new();
    for run in 1..=RUNS {
        let (relay, raw, read, adapter) = throughput(&bus, &client, n).await;
        println!(
            "  run {run}: relay {relay:>8.0} ev/s   raw async-nats loop {raw:>8.0} ev/s   ratio {:.2}   (reading the log alone: {read:.0} ev/s; JetStreamBus::publish alone: {adapter:.0} ev/s)",
            relay / raw
        );
        relay_rates.push(relay);
        raw_rates.push(raw);
        ratios.push(relay / raw);
    }
    println!(
        "  median: relay {:.0} ev/s, raw {:.0} ev/s, ratio {:.2} (target >= 0.70)",
        median(relay_rates),
        median(raw_rates),
        median(ratios)
    );

    let rate = 200;
    let seconds = ((10.0 * scale) as usize).max(2);
    println!(
        "end-to-end latency: commit in service A → effect committed in service B, {rate} events/s for {seconds} s, {RUNS} runs"
    );
    let mut p50s = Vec::new();
    let mut p99s = Vec::new();
    for run in 1..=RUNS {
        let latencies = latency(&bus, rate, seconds).await;
        let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
        println!(
            "  run {run}: {} events, p50 {p50:.1} ms, p99 {p99:.1} ms, max {:.1} ms",
            latencies.len(),
            latencies.last().copied().unwrap_or(0.0)
        );
        p50s.push(p50);
        p99s.push(p99);
    }
    println!(
        "  median: p50 {:.1} ms, p99 {:.1} ms (target p99 < 250 ms)",
        median(p50s),
        median(p99s)
    );
}
