//! `FACTUM_BENCH_ONLY=import`: bulk import through `PostgresStore::import` against a raw `COPY`
//! of the same rows into an identical table, alternated, three runs each (medians, ratios within
//! a run); then 1M events imported into a schema of their own and verified by the conformance
//! reads (`factum_testkit::conformance::verify_log`).

use std::time::Instant;

use chrono::{DateTime, TimeZone, Utc};
use factum::{CorrelationId, EventId, EventMetadata, Metadata, NewEvent, RawValue, StreamId};
use factum_postgres::{ImportOptions, ImportedEvent, PostgresStore, SchemaName, StoreOptions};
use factum_testkit::postgres::TestDatabase;
use futures_util::stream;
use sqlx::PgPool;
use uuid::Uuid;

/// Events per chunk on both sides: one transaction (one `COPY` for the raw side) each.
const CHUNK: usize = 10_000;
/// Streams the events are spread over (interleaved, as a legacy log would have them).
const STREAMS: u64 = 1_000;

/// Event `n` of run `run`: a ~300-byte payload, a tenant in the metadata, a correlation id.
fn legacy(run: u64, n: u64) -> ImportedEvent {
    let s = n % STREAMS;
    let mut payload = format!(
        r#"{{"account":"acc-{s}","amount":{},"currency":"EUR","n":{n},"memo":""#,
        (n * 7919) % 100_000
    );
    let pad = 300usize.saturating_sub(payload.len() + 2);
    payload.push_str(&"m".repeat(pad));
    payload.push_str("\"}");
    let mut user = Metadata::default();
    user.insert("tenant", &format!("t{}", s % 5))
        .expect("metadata");
    ImportedEvent::new(
        StreamId::new(format!("ledger{run}-{s}")).expect("id"),
        NewEvent {
            event_id: EventId::from_uuid(Uuid::from_u128(
                (u128::from(run) << 64) | u128::from(n + 1),
            )),
            event_type: "ledger.posted".into(),
            schema_version: 1,
            payload: RawValue::from_string(payload).expect("json"),
            metadata: EventMetadata {
                correlation_id: Some(CorrelationId::from_uuid(Uuid::from_u128(u128::from(s) + 1))),
                causation_id: None,
                user,
            },
        },
        recorded_at(n),
    )
}

fn recorded_at(n: u64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2018, 1, 1, 0, 0, 0)
        .single()
        .expect("time")
        + chrono::Duration::milliseconds(n as i64 * 250)
}

/// The same rows as COPY text, in chunks, built before the clock starts: what a hand-written
/// loader that already knows every version would send.
fn raw_chunks(run: u64, n: u64) -> Vec<Vec<u8>> {
    let mut chunks = Vec::new();
    let mut data = Vec::new();
    for i in 0..n {
        let e = legacy(run, i);
        let version = i / STREAMS + 1;
        let metadata = serde_json::to_string(&e.event.metadata.user).expect("metadata");
        let escape = |s: &str| s.replace('\\', "\\\\").replace('\t', "\\t");
        data.extend_from_slice(
            format!(
                "{}\t{version}\t{}\t{}\t{}\t{}\t{}\t{}\t\\N\t{}\n",
                e.stream_id,
                e.event.event_id,
                e.event.event_type,
                e.event.schema_version,
                escape(e.event.payload.get()),
                escape(&metadata),
                e.event
                    .metadata
                    .correlation_id
                    .map(|c| c.as_uuid().to_string())
                    .unwrap_or_default(),
                e.recorded_at.format("%Y-%m-%d %H:%M:%S%.6f+00"),
            )
            .as_bytes(),
        );
        if (i + 1) % CHUNK as u64 == 0 || i + 1 == n {
            chunks.push(std::mem::take(&mut data));
        }
    }
    chunks
}

/// Raw `COPY` of `chunks` into `raw.events`, one autocommitted COPY per chunk; events/s.
async fn raw_copy(pool: &PgPool, chunks: Vec<Vec<u8>>, n: u64) -> f64 {
    let mut conn = pool.acquire().await.expect("connection");
    let started = Instant::now();
    for chunk in chunks {
        let mut copy = conn
            .copy_in_raw(
                "COPY raw.events (stream_id, stream_version, event_id, event_type, schema_version, \
                 payload, metadata, correlation_id, causation_id, recorded_at) FROM STDIN",
            )
            .await
            .expect("copy");
        copy.send(chunk).await.expect("send");
        copy.finish().await.expect("finish");
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// `PostgresStore::import` of the same events (built before the clock starts); events/s.
async fn factum_import(store: &PostgresStore, events: Vec<ImportedEvent>) -> f64 {
    let n = events.len() as u64;
    let started = Instant::now();
    let report = store
        .import(
            stream::iter(events.into_iter().map(Ok::<_, factum::BoxError>)),
            &ImportOptions::default().with_chunk_size(CHUNK),
            |_| {},
        )
        .await
        .expect("import");
    let rate = n as f64 / started.elapsed().as_secs_f64();
    assert_eq!(report.imported, n);
    rate
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The import section: throughput against raw COPY, then the verified 1M import.
pub(crate) async fn run(db: &TestDatabase, store: &PostgresStore, scale: f64) {
    let n = ((200_000.0 * scale) as u64).max(CHUNK as u64);
    let pool = db.pool().clone();
    // Warm-up: connections, statements, the tables' first pages.
    raw_copy(&pool, raw_chunks(90, CHUNK as u64), CHUNK as u64).await;
    factum_import(store, (0..CHUNK as u64).map(|i| legacy(91, i)).collect()).await;
    let (mut raw, mut ours, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..3_u64 {
        let chunks = raw_chunks(run * 2, n);
        let events: Vec<ImportedEvent> = (0..n).map(|i| legacy(run * 2 + 1, i)).collect();
        let r = raw_copy(&pool, chunks, n).await;
        let f = factum_import(store, events).await;
        println!(
            "import run {run}: {n} events, factum {f:.0} ev/s, raw COPY {r:.0} ev/s ({:.0}%)",
            f / r * 100.0
        );
        raw.push(r);
        ours.push(f);
        ratios.push(f / r);
    }
    let (r, f, ratio) = (median(&mut raw), median(&mut ours), median(&mut ratios));
    println!(
        "| bulk import, {n} events of ~300 bytes over {STREAMS} streams, chunks of {CHUNK} (median of 3) | {f:.0} ev/s | raw COPY, same rows: {r:.0} ev/s | {:.0}% ({:.0}%–{:.0}%) | 80% | {} |",
        ratio * 100.0,
        ratios[0] * 100.0,
        ratios[2] * 100.0,
        if ratio >= 0.8 { "met" } else { "missed" }
    );

    // 1M events (scaled) into a schema of their own, then read back by the conformance reads and
    // compared with the input, event by event.
    let total = ((1_000_000.0 * scale) as u64).max(1);
    let bulk = db
        .store_with(StoreOptions::default().with_schema(SchemaName::new("bulk").expect("schema")));
    bulk.migrate().await.expect("bulk schema");
    let started = Instant::now();
    let mut last_report = Instant::now();
    let report = bulk
        .import(
            stream::iter((0..total).map(|i| Ok::<_, factum::BoxError>(legacy(7, i)))),
            &ImportOptions::default().with_total(total),
            |p| {
                if last_report.elapsed().as_secs() >= 5 {
                    last_report = Instant::now();
                    println!(
                        "  {:.0}% ({} events, {:.0} ev/s, {:?} left)",
                        p.fraction().unwrap_or(0.0) * 100.0,
                        p.done,
                        p.rate,
                        p.eta.map(|d| d.as_secs())
                    );
                }
            },
        )
        .await
        .expect("1M import");
    let import_secs = started.elapsed().as_secs_f64();
    assert_eq!(report.imported, total);
    let started = Instant::now();
    let mut i = 0_u64;
    let summary = factum_testkit::conformance::verify_log(&bulk, 10_000, |e| {
        let expected = legacy(7, i);
        assert_eq!(e.event_id, expected.event.event_id, "log order at #{i}");
        assert_eq!(e.stream_id, expected.stream_id, "stream of #{i}");
        assert_eq!(e.stream_version.get(), i / STREAMS + 1, "version of #{i}");
        assert_eq!(e.recorded_at, expected.recorded_at, "recorded-at of #{i}");
        assert_eq!(e.metadata, expected.event.metadata, "metadata of #{i}");
        let (a, b): (serde_json::Value, serde_json::Value) = (
            serde_json::from_str(e.payload.get()).expect("json"),
            serde_json::from_str(expected.event.payload.get()).expect("json"),
        );
        assert_eq!(a, b, "payload of #{i}");
        i += 1;
    })
    .await;
    assert_eq!(summary.events, total);
    assert_eq!(summary.streams, STREAMS.min(total));
    for s in [0, STREAMS / 2, STREAMS - 1] {
        let id = StreamId::new(format!("ledger7-{s}")).expect("id");
        let expected = total / STREAMS + u64::from(s < total % STREAMS);
        assert_eq!(
            bulk.stream_version(&id).await.expect("version").get(),
            expected
        );
    }
    println!(
        "1M check: {total} events imported in {import_secs:.1} s ({:.0} ev/s), read back and verified in {:.1} s: {} events in {} streams, every id once, log order = input order, versions 1..n without gaps, read_stream = the log's events of each stream, payloads, metadata and recorded-at as imported",
        total as f64 / import_secs,
        started.elapsed().as_secs_f64(),
        summary.events,
        summary.streams
    );
}
