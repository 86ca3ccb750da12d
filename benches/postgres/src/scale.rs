//! `FACTUM_BENCH_ONLY=scale`: latency at 10M stored events against a near-empty store.
//!
//! Two databases of their own: a near-empty one (200 streams of 20 events) and a large one
//! (`FACTUM_BENCH_SCALE` events, default 10M, as streams of 20 events) loaded by SQL
//! (`INSERT ... SELECT generate_series` in chunks of 1M rows, on two connections), then
//! `VACUUM ANALYZE`d. Then 3 repetitions, alternating which database goes first, each of
//! `FACTUM_BENCH_SCALE_SAMPLES` (default 2000) iterations of: a 1-event append to an existing
//! stream (expected version exact), a 1-event append to a new stream (expected: no stream), and a
//! read of a 20-event stream, one client, each timed alone. Prints p50/p99 of each, medians over
//! the repetitions, and the ratios large / empty taken within each repetition.

use std::time::{Duration, Instant};

use factum::{
    EventId, EventMetadata, EventStore, ExpectedVersion, NewEvent, RawValue, StreamId,
    StreamVersion,
};
use factum_postgres::PostgresStore;
use factum_testkit::postgres::TestDatabase;
use futures_util::TryStreamExt;
use sqlx::PgPool;

use super::DEPOSIT_FIELDS_SQL;

/// Events per loaded stream; the read reads one such stream.
const PER_STREAM: u64 = 20;
/// Streams per load statement: 50k streams of 20 events, 1M rows.
const CHUNK_STREAMS: u64 = 50_000;
/// Streams of the near-empty store: the first half takes the appends, the second the reads.
const SMALL_STREAMS: u64 = 200;

/// A deposit as the loaded rows carry it (about 300 bytes), for the appends.
fn deposit(i: u64) -> NewEvent {
    let payload = format!(
        r#"{{"amount": 1, "currency": "EUR", "reference": "{i:032x}", "channel": "mobile", "description": "monthly savings", "counterparty": {{"name": "Corner Shop Ltd", "iban": "PT50000201231234567890154", "country": "PT"}}, "tags": ["savings", "recurring"], "requested_at": "2026-12-01T10:00:00.000Z"}}"#
    );
    NewEvent {
        event_id: EventId::new(),
        event_type: "account.deposited".to_owned(),
        schema_version: 1,
        payload: RawValue::from_string(payload).expect("json"),
        metadata: EventMetadata::default(),
    }
}

/// Streams `account-{from}..account-{to}` with [`PER_STREAM`] events each, the stream rows with
/// the matching version; each stream's events interleaved with the chunk's other streams (version
/// 1 of every stream, then version 2, ...), so a stream's rows are spread over the log as when
/// many streams are written at once, and its versions rise with the global position.
async fn load_chunk(pool: &PgPool, from: u64, to: u64) {
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query(
        "INSERT INTO factum.streams (stream_id, category, version) \
         SELECT 'account-' || s, 'account', $3 FROM generate_series($1::bigint, $2::bigint - 1) s",
    )
    .bind(from as i64)
    .bind(to as i64)
    .bind(PER_STREAM as i64)
    .execute(&mut *tx)
    .await
    .expect("stream rows");
    let events = format!(
        "INSERT INTO factum.events (stream_id, stream_version, event_id, event_type, schema_version, payload) \
         SELECT 'account-' || s, v, gen_random_uuid(), 'account.deposited', 1, jsonb_build_object({DEPOSIT_FIELDS_SQL}) \
         FROM (SELECT v, s, s * 100 + v AS g \
               FROM generate_series(1, $3::bigint) v, generate_series($1::bigint, $2::bigint - 1) s) r \
         ORDER BY v, s"
    );
    sqlx::query(sqlx::AssertSqlSafe(events.as_str()))
        .bind(from as i64)
        .bind(to as i64)
        .bind(PER_STREAM as i64)
        .execute(&mut *tx)
        .await
        .expect("events");
    tx.commit().await.expect("commit");
}

/// Loads `streams` streams in chunks on two connections at once.
async fn load(pool: &PgPool, streams: u64) {
    let chunks: Vec<(u64, u64)> = (0..streams)
        .step_by(CHUNK_STREAMS as usize)
        .map(|from| (from, (from + CHUNK_STREAMS).min(streams)))
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let (chunks, next) = (&chunks, &next);
    let worker = move || async move {
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(&(from, to)) = chunks.get(i) else {
                break;
            };
            let started = Instant::now();
            load_chunk(pool, from, to).await;
            println!(
                "  loaded streams {from}..{to} ({} events) in {:.1} s",
                (to - from) * PER_STREAM,
                started.elapsed().as_secs_f64()
            );
        }
    };
    futures_util::future::join(worker(), worker()).await;
}

/// A tiny deterministic generator (xorshift), so both stores get the same kind of choices.
struct Picks(u64);

impl Picks {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// One store under test: its streams (the first half take appends, with their versions; the
/// second half are read).
struct Side {
    store: PostgresStore,
    /// Versions of the streams taking appends, `account-0..`.
    versions: Vec<u64>,
    /// Streams that are only read.
    read_from: u64,
    streams: u64,
}

/// p50 and p99 of each kind: [existing-stream append, new-stream append, stream read], in µs.
type Figures = [[f64; 2]; 3];

fn percentiles(mut v: Vec<Duration>) -> [f64; 2] {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)].as_secs_f64() * 1e6;
    [at(0.50), at(0.99)]
}

async fn measure(side: &mut Side, samples: usize, seed: u64, tag: &str) -> Figures {
    let mut picks = Picks(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut times: [Vec<Duration>; 3] = Default::default();
    for i in 0..samples {
        let k = picks.below(side.versions.len() as u64);
        let version = side.versions[k as usize];
        let stream = StreamId::new(format!("account-{k}")).expect("id");
        let request = factum::AppendRequest::new(stream, vec![deposit(i as u64)])
            .expected_version(ExpectedVersion::Exact(StreamVersion::new(version)));
        let started = Instant::now();
        side.store.append(request).await.expect("append");
        times[0].push(started.elapsed());
        side.versions[k as usize] += 1;

        let stream = StreamId::new(format!("account-{tag}n{i}")).expect("id");
        let request = factum::AppendRequest::new(stream, vec![deposit(i as u64)])
            .expected_version(ExpectedVersion::NoStream);
        let started = Instant::now();
        side.store.append(request).await.expect("new-stream append");
        times[1].push(started.elapsed());

        let k = side.read_from + picks.below(side.streams - side.read_from);
        let stream = StreamId::new(format!("account-{k}")).expect("id");
        let started = Instant::now();
        let count = side
            .store
            .read_stream(&stream, StreamVersion::INITIAL)
            .try_fold(0u64, |n, e| async move {
                Ok(n + u64::from(e.stream_version.get() > 0))
            })
            .await
            .expect("read");
        times[2].push(started.elapsed());
        assert_eq!(count, PER_STREAM, "{stream} holds {PER_STREAM} events");
    }
    times.map(percentiles)
}

async fn database_size(pool: &PgPool) -> String {
    sqlx::query_scalar("SELECT pg_size_pretty(pg_database_size(current_database()))")
        .fetch_one(pool)
        .await
        .expect("size")
}

async fn event_count(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM factum.events")
        .fetch_one(pool)
        .await
        .expect("count")
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The `scale` section (see the module documentation).
pub(crate) async fn run() {
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(default)
    };
    let events = env("FACTUM_BENCH_SCALE", 10_000_000);
    let samples = env("FACTUM_BENCH_SCALE_SAMPLES", 2000) as usize;
    let big_streams = (events / PER_STREAM).max(SMALL_STREAMS);
    let empty = TestDatabase::create().await;
    let big = TestDatabase::create().await;
    load(empty.pool(), SMALL_STREAMS).await;
    println!("load average before the load: {}", load_average());
    let started = Instant::now();
    load(big.pool(), big_streams).await;
    let loaded = started.elapsed();
    let started = Instant::now();
    for db in [&empty, &big] {
        for table in ["factum.events", "factum.streams"] {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("VACUUM ANALYZE {table}")))
                .execute(db.pool())
                .await
                .expect("vacuum");
        }
    }
    let vacuumed = started.elapsed();
    let counts = [
        event_count(empty.pool()).await,
        event_count(big.pool()).await,
    ];
    println!(
        "loaded {} events ({} streams) in {:.0} s, VACUUM ANALYZE {:.0} s; databases: {} and {}",
        counts[1],
        big_streams,
        loaded.as_secs_f64(),
        vacuumed.as_secs_f64(),
        database_size(empty.pool()).await,
        database_size(big.pool()).await
    );
    let indexes: String = sqlx::query_scalar(
        "SELECT pg_size_pretty(sum(pg_indexes_size(i.inhrelid))) FROM pg_inherits i \
         WHERE i.inhparent = 'factum.events'::regclass",
    )
    .fetch_one(big.pool())
    .await
    .expect("index size");
    println!("the large store's event indexes: {indexes}");
    let side = |db: &TestDatabase, streams: u64| Side {
        store: db.store(),
        versions: vec![PER_STREAM; (streams / 2) as usize],
        read_from: streams / 2,
        streams,
    };
    let mut sides = [side(&empty, SMALL_STREAMS), side(&big, big_streams)];
    // Warm-up on both (connections, statement caches).
    for (s, side) in sides.iter_mut().enumerate() {
        measure(side, 50, 99 + s as u64, &format!("w{s}")).await;
    }
    let mut runs: [Vec<Figures>; 2] = Default::default();
    let mut ratios: Vec<Figures> = Vec::new();
    for rep in 0..3 {
        let order = if rep % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut figures = [[[0.0; 2]; 3]; 2];
        for s in order {
            figures[s] = measure(&mut sides[s], samples, rep + 1, &format!("r{rep}")).await;
            println!(
                "  rep {rep}, {}: append existing p50/p99 {:.0}/{:.0} µs, new stream {:.0}/{:.0} µs, read 20 {:.0}/{:.0} µs (load average {})",
                ["empty", "large"][s],
                figures[s][0][0],
                figures[s][0][1],
                figures[s][1][0],
                figures[s][1][1],
                figures[s][2][0],
                figures[s][2][1],
                load_average()
            );
        }
        runs[0].push(figures[0]);
        runs[1].push(figures[1]);
        let mut ratio = [[0.0; 2]; 3];
        for (k, row) in ratio.iter_mut().enumerate() {
            for (q, r) in row.iter_mut().enumerate() {
                *r = figures[1][k][q] / figures[0][k][q];
            }
        }
        ratios.push(ratio);
    }
    let median = |v: Vec<f64>| {
        let mut v = v;
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "| 1 client, {samples} samples × 3 reps (medians) | {} events: p50 / p99 | {} events: p50 / p99 | ratio p50 / p99 | target | |",
        counts[0], counts[1]
    );
    println!("| --- | ---: | ---: | ---: | ---: | --- |");
    for (k, what) in [
        "1-event append, existing stream",
        "1-event append, new stream",
        "read a 20-event stream",
    ]
    .into_iter()
    .enumerate()
    {
        let at = |s: usize, q: usize| median(runs[s].iter().map(|f| f[k][q]).collect());
        let ratio = |q: usize| median(ratios.iter().map(|f| f[k][q]).collect());
        let (r50, r99) = (ratio(0), ratio(1));
        let appends = k < 2;
        println!(
            "| {what} | {:.0} / {:.0} µs | {:.0} / {:.0} µs | {r50:.2}x / {r99:.2}x | {} | {} |",
            at(0, 0),
            at(0, 1),
            at(1, 0),
            at(1, 1),
            if appends { "≤ 1.3x" } else { "" },
            match (appends, r50 <= 1.3 && r99 <= 1.3) {
                (false, _) => "",
                (true, true) => "met",
                (true, false) => "missed",
            }
        );
    }
    // Where a stream read's time goes at each size: the store's read statement, planned and run.
    for (db, side) in [&empty, &big].into_iter().zip(&sides) {
        let explain = format!(
            "EXPLAIN (ANALYZE, BUFFERS) SELECT global_position, transaction_id, stream_id, \
                 stream_version, event_id, event_type, schema_version, payload::text, \
                 metadata::text, correlation_id, causation_id, recorded_at \
             FROM factum.events WHERE stream_id = 'account-{}' AND stream_version > 0 \
             ORDER BY stream_version",
            side.streams - 1
        );
        let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(explain.as_str()))
            .fetch_all(db.pool())
            .await
            .expect("explain");
        println!(
            "stream read at {} streams:\n  {}",
            side.streams,
            plan.join("\n  ")
        );
    }
    println!("load average at the end: {}", load_average());
}
