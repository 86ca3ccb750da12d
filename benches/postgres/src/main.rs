//! Prints factum-postgres figures next to baselines measured in the same run against the same
//! (throwaway) database: raw sqlx on a table identical to `events`, and cqrs-es + postgres-es on
//! the same bank workload.
//!
//! `cargo run --release -p factum-bench [-- SCALE]`; SCALE (default 1.0) multiplies the
//! operation counts and stream lengths. Needs `DATABASE_URL` (an admin URL) or a local
//! PostgreSQL installation, like the tests.

#![allow(clippy::print_stdout, clippy::result_large_err)]

mod import;
mod peer;
mod scale;

use std::sync::Arc;
use std::time::Instant;

use bank::{Account, AccountCommand, AccountEvent, Deposited};
use chrono::{DateTime, Utc};
use cqrs_es::persist::PersistedEventStore;
use cqrs_es::{AggregateContext, EventStore as _};
use factum::{
    CommandContext, EventMetadata, EventStore, ExpectedVersion, Metadata, NewEvent, RawValue,
    Repository, StreamId, StreamVersion,
};
use factum_postgres::{PostgresStore, SchemaName};
use factum_testkit::postgres::TestDatabase;
use futures_util::TryStreamExt;
use peer::{PeerAccount, PeerCommand};
use postgres_es::{PostgresCqrs, PostgresEventRepository};
use sqlx::PgPool;
use uuid::Uuid;

/// Deposits per account after its opening: each account's stream stays short, so a command's
/// load is one short read, as in a typical service.
const DEPOSITS_PER_ACCOUNT: usize = 9;

fn deposit(amount: u64) -> NewEvent {
    NewEvent::encode(
        &AccountEvent::Deposited(Deposited { amount }),
        EventMetadata::default(),
    )
    .expect("encode")
}

/// Runs `client(c)` for each of `clients` concurrent clients (each doing `per_client` operations)
/// and returns the operations per second over all of them.
async fn run_clients<F, Fut>(clients: usize, per_client: usize, client: F) -> f64
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients).map(|c| tokio::spawn(client(c))).collect();
    for t in tasks {
        t.await.expect("task");
    }
    (clients * per_client) as f64 / started.elapsed().as_secs_f64()
}

/// Raw single-row inserts, `clients` concurrent clients on their own streams, into `raw.events`:
/// the same migrations as the store's schema, so the same partitioned table and indexes.
async fn raw_inserts(pool: &PgPool, clients: usize, per_client: usize, tag: &str) -> f64 {
    run_clients(clients, per_client, |c| {
        let pool = pool.clone();
        let stream = format!("{tag}-{c}");
        async move {
                for v in 0..per_client {
                    sqlx::query(
                        "INSERT INTO raw.events (stream_id, stream_version, event_id, event_type, \
                         schema_version, payload) VALUES ($1, $2, $3, 'account.deposited', 1, $4::jsonb)",
                    )
                    .bind(&stream)
                    .bind(v as i64 + 1)
                    .bind(Uuid::now_v7())
                    .bind(format!(r#"{{"amount":{}}}"#, v + 1))
                    .execute(&pool)
                    .await
                    .expect("raw insert");
                }
        }
    })
    .await
}

/// The raw ceiling of an uncached command: the bank workload's commands done by hand in raw sqlx,
/// each a read of the account's rows from `raw.events` (the columns a load reads) and a
/// single-row insert of the next version: the same two statements a command needs, without
/// the store's guarantees (no version check, no stream row).
async fn raw_commands(pool: &PgPool, clients: usize, per_client: usize, tag: &str) -> f64 {
    run_clients(clients, per_client, |c| {
        let pool = pool.clone();
        let tag = tag.to_owned();
        async move {
            for (k, amount) in bank_workload(per_client, DEPOSITS_PER_ACCOUNT) {
                let stream = format!("{tag}{c}x{k}");
                let rows: Vec<(i64, String, i32, String, String)> = sqlx::query_as(
                    "SELECT stream_version, event_type, schema_version, payload::text, metadata::text \
                     FROM raw.events WHERE stream_id = $1 AND stream_version > $2 ORDER BY stream_version",
                )
                .bind(&stream)
                .bind(0i64)
                .fetch_all(&pool)
                .await
                .expect("raw read");
                // Decoded as a load decodes them: each payload and metadata parsed.
                let balance: u64 = rows
                    .iter()
                    .map(|(_, _, _, payload, metadata)| {
                        let _: Metadata = serde_json::from_str(metadata).expect("metadata");
                        serde_json::from_str::<serde_json::Value>(payload).expect("payload")["amount"]
                            .as_u64()
                            .unwrap_or(0)
                    })
                    .sum();
                sqlx::query(
                    "INSERT INTO raw.events (stream_id, stream_version, event_id, event_type, \
                     schema_version, payload) VALUES ($1, $2, $3, 'account.deposited', 1, $4::jsonb)",
                )
                .bind(&stream)
                .bind(rows.len() as i64 + 1)
                .bind(Uuid::now_v7())
                .bind(format!(r#"{{"amount":{},"balance":{}}}"#, amount, balance + amount))
                .execute(&pool)
                .await
                .expect("raw insert");
            }
        }
    })
    .await
}

/// Batched reads as the benchmarks use them: the default, or `FACTUM_BENCH_READS_IN_FLIGHT=N`
/// statements in flight.
fn batched_reads() -> factum_postgres::BatchedReads {
    let reads = factum_postgres::BatchedReads::enabled();
    match std::env::var("FACTUM_BENCH_READS_IN_FLIGHT")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(n) => reads.with_max_in_flight(n),
        None => reads,
    }
}

/// Single-event appends with an exact expected version through the store (no load, no decide).
async fn factum_appends(
    store: &PostgresStore,
    clients: usize,
    per_client: usize,
    tag: &str,
) -> f64 {
    run_clients(clients, per_client, |c| {
        let store = store.clone();
        let stream = StreamId::new(format!("{tag}-{c}")).expect("id");
        async move {
            for v in 0..per_client {
                store
                    .append(
                        factum::AppendRequest::new(stream.clone(), vec![deposit(v as u64 + 1)])
                            .expected_version(ExpectedVersion::Exact(StreamVersion::new(v as u64))),
                    )
                    .await
                    .expect("append");
            }
        }
    })
    .await
}

/// The bank workload: each client opens its accounts and deposits into each
/// [`DEPOSITS_PER_ACCOUNT`] times; every command loads, decides and appends.
fn bank_workload(per_client: usize, deposits: usize) -> Vec<(usize, u64)> {
    // (account index, amount): amount 0 stands for Open.
    (0..per_client)
        .map(|i| {
            let k = i / (deposits + 1);
            let step = i % (deposits + 1);
            (k, step as u64)
        })
        .collect()
}

async fn factum_commands(
    repo: &Arc<Repository<Account, PostgresStore>>,
    clients: usize,
    per_client: usize,
    tag: &str,
) -> f64 {
    factum_commands_on(repo, clients, per_client, DEPOSITS_PER_ACCOUNT, tag, false).await
}

/// The same workload with an idempotency key on every command (its command id).
async fn factum_keyed_commands(
    repo: &Arc<Repository<Account, PostgresStore>>,
    clients: usize,
    per_client: usize,
    tag: &str,
) -> f64 {
    factum_commands_on(repo, clients, per_client, DEPOSITS_PER_ACCOUNT, tag, true).await
}

async fn factum_commands_on(
    repo: &Arc<Repository<Account, PostgresStore>>,
    clients: usize,
    per_client: usize,
    deposits: usize,
    tag: &str,
    keyed: bool,
) -> f64 {
    run_clients(clients, per_client, |c| {
        let repo = Arc::clone(repo);
        let tag = tag.to_owned();
        async move {
            for (k, amount) in bank_workload(per_client, deposits) {
                let account = format!("{tag}{c}x{k}");
                let command = if amount == 0 {
                    AccountCommand::Open {
                        account,
                        owner: "Ada".into(),
                    }
                } else {
                    AccountCommand::Deposit { account, amount }
                };
                let context = if keyed {
                    CommandContext::new().idempotent()
                } else {
                    CommandContext::new()
                };
                repo.execute_with(command, &context).await.expect("command");
            }
        }
    })
    .await
}

async fn peer_commands(
    cqrs: &Arc<PostgresCqrs<PeerAccount>>,
    clients: usize,
    per_client: usize,
    tag: &str,
) -> f64 {
    peer_commands_on(cqrs, clients, per_client, DEPOSITS_PER_ACCOUNT, tag).await
}

async fn peer_commands_on(
    cqrs: &Arc<PostgresCqrs<PeerAccount>>,
    clients: usize,
    per_client: usize,
    deposits: usize,
    tag: &str,
) -> f64 {
    run_clients(clients, per_client, |c| {
        let cqrs = Arc::clone(cqrs);
        let tag = tag.to_owned();
        async move {
            for (k, amount) in bank_workload(per_client, deposits) {
                let command = if amount == 0 {
                    PeerCommand::Open {
                        owner: "Ada".into(),
                    }
                } else {
                    PeerCommand::Deposit { amount }
                };
                cqrs.execute(&format!("{tag}{c}x{k}"), command)
                    .await
                    .expect("cqrs-es command");
            }
        }
    })
    .await
}

/// Hot aggregates: `tasks` tasks in two repositories (each with its own pool and cache, as two
/// processes would have) depositing into the same `accounts` accounts, `per_task` deposits each.
/// Returns (commands/s over every command, failed commands / all commands). Checks that every
/// acknowledged deposit, and nothing else, is in the balances.
async fn hot_aggregates(
    url: &str,
    tasks: usize,
    accounts: usize,
    per_task: usize,
    tag: &str,
) -> (f64, f64) {
    let mut repos = Vec::new();
    for _ in 0..2 {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(12)
            .test_before_acquire(false)
            .connect(url)
            .await
            .expect("a repository's pool");
        repos.push(Arc::new(
            Repository::<Account, _>::new(PostgresStore::new(pool)).with_cache(1000),
        ));
    }
    let account = |a: usize| format!("{tag}h{a}");
    for a in 0..accounts {
        repos[0]
            .execute(AccountCommand::Open {
                account: account(a),
                owner: "Ada".into(),
            })
            .await
            .expect("open");
    }
    let failed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let deposited: Arc<Vec<std::sync::atomic::AtomicU64>> =
        Arc::new((0..accounts).map(|_| 0.into()).collect());
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let repo = Arc::clone(&repos[t % 2]);
            let failed = Arc::clone(&failed);
            let deposited = Arc::clone(&deposited);
            let id = account(t % accounts);
            tokio::spawn(async move {
                for _ in 0..per_task {
                    let command = AccountCommand::Deposit {
                        account: id.clone(),
                        amount: 1,
                    };
                    match repo.execute(command).await {
                        Ok(_) => {
                            deposited[t % accounts]
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(e) if e.is_conflict() => {
                            failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(e) => panic!("hot deposit: {e}"),
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.await.expect("task");
    }
    let elapsed = started.elapsed().as_secs_f64();
    for a in 0..accounts {
        let loaded = repos[1].load(&account(a)).await.expect("load");
        assert_eq!(
            loaded.state.balance,
            deposited[a].load(std::sync::atomic::Ordering::Relaxed),
            "account {a}: the balance is the sum of the acknowledged deposits"
        );
    }
    let all = tasks * per_task;
    (
        all as f64 / elapsed,
        failed.load(std::sync::atomic::Ordering::Relaxed) as f64 / all as f64,
    )
}

fn header() {
    println!("| benchmark | factum | baseline | ratio | target | |");
    println!("| --- | ---: | ---: | ---: | ---: | --- |");
}

/// A row without a target: printed for context.
fn info_row(name: &str, ours: f64, baseline: &str, base: f64, unit: &str) {
    println!(
        "| {name} | {ours:.0} {unit} | {baseline}: {base:.0} {unit} | {:.1}x | — | |",
        ours / base
    );
}

fn row(name: &str, ours: f64, baseline: &str, base: f64, unit: &str, target: f64) {
    let ratio = ours / base;
    let (ratio_text, target_text) = if target >= 1.0 {
        (format!("{ratio:.1}x"), format!("{target:.0}x"))
    } else {
        (
            format!("{:.0}%", ratio * 100.0),
            format!("{:.0}%", target * 100.0),
        )
    };
    println!(
        "| {name} | {ours:.0} {unit} | {baseline}: {base:.0} {unit} | {ratio_text} | {target_text} | {} |",
        if ratio >= target { "met" } else { "missed" }
    );
}

/// The columns the store's stream read selects (`EVENT_COLUMNS` in `store.rs`).
const STORE_COLUMNS: &str = "global_position, transaction_id::text::bigint AS commit_id, \
    stream_id, stream_version, event_id, event_type, schema_version, payload::text AS payload, \
    metadata::text AS metadata, correlation_id, causation_id, recorded_at";

/// A row as the store decodes it, for the raw side of (d).
#[allow(dead_code)]
struct RawRow {
    global_position: i64,
    commit_id: i64,
    stream_id: String,
    stream_version: i64,
    event_id: Uuid,
    event_type: String,
    schema_version: i32,
    payload: String,
    metadata: String,
    correlation_id: Option<Uuid>,
    causation_id: Option<Uuid>,
    recorded_at: DateTime<Utc>,
}

impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for RawRow {
    fn from_row(row: &'r sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        // By index, as the store does: a name lookup per column and row slows long reads.
        Ok(Self {
            global_position: row.try_get(0)?,
            commit_id: row.try_get(1)?,
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

/// Raw sqlx streaming of a stream's rows: the store's columns, decoded as the store decodes
/// them (payload checked as JSON, metadata parsed), without the store's types around them.
async fn raw_stream_read(pool: &PgPool, stream: &str) -> usize {
    let sql = format!(
        "SELECT {STORE_COLUMNS} FROM factum.events WHERE stream_id = $1 AND stream_version > $2 \
         ORDER BY stream_version"
    );
    let mut rows = sqlx::query_as::<_, RawRow>(sqlx::AssertSqlSafe(sql.as_str()))
        .bind(stream)
        .bind(0i64)
        .fetch(pool);
    let mut count = 0;
    while let Some(row) = rows.try_next().await.expect("raw read") {
        let payload = RawValue::from_string(row.payload).expect("json");
        // As the store does: empty metadata (`{}`) needs no parser.
        let metadata: Metadata = if row.metadata == "{}" {
            Metadata::new()
        } else {
            serde_json::from_str(&row.metadata).expect("metadata")
        };
        count += usize::from(!payload.get().is_empty() && metadata.is_empty());
    }
    count
}

/// Fills `account-{id}` with `n` deposits by SQL (fast), for the load and memory runs.
async fn fill_by_sql(pool: &PgPool, id: &str, n: usize) {
    let stream = format!("account-{id}");
    sqlx::query(
        "INSERT INTO factum.streams (stream_id, category, version) VALUES ($1, 'account', $2)",
    )
    .bind(&stream)
    .bind(n as i64)
    .execute(pool)
    .await
    .expect("stream row");
    sqlx::query(
        "INSERT INTO factum.events (stream_id, stream_version, event_id, event_type, schema_version, payload) \
         SELECT $1, g, gen_random_uuid(), 'account.deposited', 1, jsonb_build_object('amount', 1) \
         FROM generate_series(1, $2::bigint) g",
    )
    .bind(&stream)
    .bind(n as i64)
    .execute(pool)
    .await
    .expect("fill");
}

/// A deposit's payload as stored, about 300 bytes: the amount the aggregate folds, and the
/// fields a real deposit carries (which decoding skips over). Built in SQL from the row number
/// `g`.
const DEPOSIT_FIELDS_SQL: &str = "'amount', 1, 'currency', 'EUR', 'reference', md5(g::text), \
    'channel', 'mobile', 'description', 'monthly savings', \
    'counterparty', jsonb_build_object('name', 'Corner Shop Ltd', \
        'iban', 'PT50000201231234567890154', 'country', 'PT'), \
    'tags', jsonb_build_array('savings', 'recurring'), 'requested_at', '2026-12-01T10:00:00.000Z'";

/// (d): `account-long` (factum) and `long` (cqrs-es) filled by SQL with `long` deposits of the
/// same realistic payload; then `reps` alternated repetitions of the raw read against
/// `read_stream`, and of factum's load against cqrs-es's; medians, with the range of the ratios.
async fn stream_reads(
    store: &PostgresStore,
    repo: &Arc<Repository<Account, PostgresStore>>,
    pool: &PgPool,
    peer_pool: &sqlx08::PgPool,
    long: usize,
    reps: usize,
) {
    let id = "long";
    let stream = StreamId::new(format!("account-{id}")).expect("id");
    sqlx::query(
        "INSERT INTO factum.streams (stream_id, category, version) VALUES ($1, 'account', $2)",
    )
    .bind(stream.as_str())
    .bind(long as i64)
    .execute(pool)
    .await
    .expect("stream row");
    let fill = format!(
        "INSERT INTO factum.events (stream_id, stream_version, event_id, event_type, schema_version, payload) \
         SELECT $1, g, gen_random_uuid(), 'account.deposited', 1, jsonb_build_object({DEPOSIT_FIELDS_SQL}) \
         FROM generate_series(1, $2::bigint) g"
    );
    sqlx::query(sqlx::AssertSqlSafe(fill.as_str()))
        .bind(stream.as_str())
        .bind(long as i64)
        .execute(pool)
        .await
        .expect("fill");
    let peer_fill = format!(
        "INSERT INTO public.events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         SELECT 'account', $1, g, 'Deposited', '1.0', \
             jsonb_build_object('Deposited', jsonb_build_object({DEPOSIT_FIELDS_SQL})), '{{}}' \
         FROM generate_series(1, $2::bigint) g"
    );
    sqlx::query(sqlx::AssertSqlSafe(peer_fill.as_str()))
        .bind(id)
        .bind(long as i64)
        .execute(pool)
        .await
        .expect("fill cqrs-es");
    for table in ["factum.events", "public.events"] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("VACUUM ANALYZE {table}")))
            .execute(pool)
            .await
            .expect("vacuum");
    }
    let payload_bytes: i32 = sqlx::query_scalar(
        "SELECT length(payload::text) FROM factum.events WHERE stream_id = $1 LIMIT 1",
    )
    .bind(stream.as_str())
    .fetch_one(pool)
    .await
    .expect("payload size");
    let peer_store = PersistedEventStore::<PostgresEventRepository, PeerAccount>::new_event_store(
        PostgresEventRepository::new(peer_pool.clone()),
    );
    let per_sec = |started: Instant| long as f64 / started.elapsed().as_secs_f64();
    // Rates: raw read, read_stream, factum load, cqrs-es load.
    let mut rates: [Vec<f64>; 4] = Default::default();
    let (mut read_ratios, mut load_ratios) = (Vec::new(), Vec::new());
    for rep in 0..reps {
        // Alternate which side goes first.
        let mut read = [0.0; 2];
        for side in [rep % 2, 1 - rep % 2] {
            let started = Instant::now();
            if side == 0 {
                assert_eq!(raw_stream_read(pool, stream.as_str()).await, long);
            } else {
                let count = store
                    .read_stream(&stream, StreamVersion::INITIAL)
                    .try_fold(0usize, |n, e| async move {
                        Ok(n + usize::from(e.stream_version.get() > 0))
                    })
                    .await
                    .expect("read");
                assert_eq!(count, long);
            }
            read[side] = per_sec(started);
        }
        let mut load = [0.0; 2];
        for side in [rep % 2, 1 - rep % 2] {
            let started = Instant::now();
            if side == 0 {
                let loaded = repo.load(id).await.expect("load");
                assert_eq!(loaded.state.balance, long as u64);
            } else {
                let mut context = peer_store.load_aggregate(id).await.expect("cqrs-es load");
                assert_eq!(context.aggregate().balance, long as u64);
            }
            load[side] = per_sec(started);
        }
        for (i, v) in [read[0], read[1], load[0], load[1]].into_iter().enumerate() {
            rates[i].push(v);
        }
        read_ratios.push(read[1] / read[0]);
        load_ratios.push(load[0] / load[1]);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let [raw, ours_read, ours_load, peer_load] = rates.each_mut().map(median);
    let read_ratio = median(&mut read_ratios);
    let load_ratio = median(&mut load_ratios);
    println!(
        "| (d) read a {long}-event stream, {payload_bytes}-byte payloads (median of {reps}) | {ours_read:.0} ev/s | raw sqlx, same columns: {raw:.0} ev/s | {:.0}% ({:.0}%–{:.0}%) | 70% | {} |",
        read_ratio * 100.0,
        read_ratios[0] * 100.0,
        read_ratios[reps - 1] * 100.0,
        if read_ratio >= 0.7 { "met" } else { "missed" }
    );
    println!(
        "| (d) load a {long}-event aggregate, {payload_bytes}-byte payloads (median of {reps}) | {ours_load:.0} ev/s | cqrs-es: {peer_load:.0} ev/s | {load_ratio:.1}x ({:.1}x–{:.1}x) | 3x | {} |",
        load_ratios[0],
        load_ratios[reps - 1],
        if load_ratio >= 3.0 { "met" } else { "missed" }
    );
}

/// CPU time used so far by every PostgreSQL server process on this machine, in microseconds
/// (`utime + stime` of the processes named `postgres`, from `/proc/*/stat`, at 100 ticks/s): the
/// server side's share of a run, when the server runs here.
fn server_cpu_us() -> u64 {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let ticks: u64 = procs
        .flatten()
        .filter_map(|p| std::fs::read_to_string(p.path().join("stat")).ok())
        .filter_map(|stat| {
            // pid (comm) state ppid ... utime stime: fields 14 and 15, counted after the comm.
            let (comm, rest) = stat.split_once(") ")?;
            if !comm.ends_with("(postgres") {
                return None;
            }
            let fields: Vec<&str> = rest.split_whitespace().collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .sum();
    ticks * 10_000
}

/// Runs `f` (`ops` operations) and returns its rate, with the client's and the server's CPU
/// time per operation in microseconds.
async fn with_cpus<F: std::future::Future<Output = f64>>(ops: usize, f: F) -> [f64; 3] {
    let (client, server) = (process_cpu_us(), server_cpu_us());
    let rate = f.await;
    [
        rate,
        (process_cpu_us() - client) as f64 / ops as f64,
        (server_cpu_us() - server) as f64 / ops as f64,
    ]
}

/// CPU time used so far by all of this process's threads, in microseconds (from
/// `/proc/self/task/*/schedstat`): the client side's share of a run.
fn process_cpu_us() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum::<u64>()
        / 1000
}

/// Runs `f` and returns its result with the client CPU it took per operation (µs).
async fn with_cpu<F: std::future::Future<Output = f64>>(ops: usize, f: F) -> (f64, f64) {
    let before = process_cpu_us();
    let rate = f.await;
    (rate, (process_cpu_us() - before) as f64 / ops as f64)
}

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The child process of the memory measurement: loads `account-{id}` (read, decode, evolve)
/// and prints its peak RSS before and after.
async fn rss_child(url: &str, id: &str, n: u64) {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .expect("connect");
    let repo = Repository::<Account, _>::new(PostgresStore::new(pool));
    let before = vm_hwm_kib();
    let loaded = repo.load(id).await.expect("load");
    assert_eq!(loaded.version.get(), n);
    assert_eq!(loaded.state.balance, n);
    println!("rss {before} {}", vm_hwm_kib());
}

/// Peak RSS (KiB) of a child process that loads `account-{id}`.
fn peak_rss_of_load(url: &str, id: &str, n: usize) -> (u64, u64) {
    let output = std::process::Command::new(std::env::current_exe().expect("exe"))
        .args(["rss", url, id, &n.to_string()])
        .output()
        .expect("child");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("rss "))
        .expect("rss line");
    let mut parts = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().expect("number"));
    (parts.next().expect("before"), parts.next().expect("after"))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("rss") {
        let n = args[4].parse().expect("n");
        return rss_child(&args[2], &args[3], n).await;
    }
    // `FACTUM_BENCH_ONLY=scale`: latency at 10M stored events against a near-empty store, in
    // databases of its own (see `scale.rs`).
    if std::env::var("FACTUM_BENCH_ONLY").as_deref() == Ok("scale") {
        return scale::run().await;
    }
    let scale: f64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let n = |base: f64| ((base * scale) as usize).max(1);
    let db = TestDatabase::create().await;
    let pool = db.pool().clone();
    let store = db.store();
    factum_postgres::migrate(&pool, &SchemaName::new("raw").expect("name"))
        .await
        .expect("raw schema");
    // `FACTUM_BENCH_ONLY=import`: bulk import against raw COPY, then 1M imported and verified.
    if std::env::var("FACTUM_BENCH_ONLY").as_deref() == Ok("import") {
        return import::run(&db, &store, scale).await;
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(peer::SCHEMA))
        .execute(&pool)
        .await
        .expect("cqrs-es schema");
    let repo = Arc::new(Repository::<Account, _>::new(store.clone()));
    // The same repository keeping recently used states in memory: a command is then one round
    // trip (the append) instead of a load and an append.
    let cached = Arc::new(Repository::<Account, _>::new(store.clone()).with_cache(100_000));
    // The same database and pool size for the peer, on the sqlx version it is built on.
    let peer_pool = sqlx08::postgres::PgPoolOptions::new()
        .max_connections(24)
        .connect(db.url())
        .await
        .expect("the peer's pool");
    let cqrs = Arc::new(postgres_es::postgres_cqrs::<PeerAccount>(
        peer_pool.clone(),
        Vec::new(),
        (),
    ));

    // `FACTUM_BENCH_PROFILE=commands|appends`: only that workload, 1 client, for a profiler.
    if let Ok(phase) = std::env::var("FACTUM_BENCH_PROFILE") {
        let ops = n(5000.0);
        let (rate, cpu) = match phase.as_str() {
            "appends" => with_cpu(ops, factum_appends(&store, 1, ops, "prof")).await,
            "cached" => with_cpu(ops, factum_commands(&cached, 1, ops, "prof")).await,
            _ => with_cpu(ops, factum_commands(&repo, 1, ops, "prof")).await,
        };
        println!("{phase}: {rate:.0}/s, client CPU {cpu:.0} µs per operation");
        return;
    }

    // `FACTUM_BENCH_ONLY=hot`: 16 tasks in two repositories (own pools and caches) depositing
    // into the same 4 accounts; medians of 3 runs of commands/s and of the failure rate.
    if std::env::var("FACTUM_BENCH_ONLY").as_deref() == Ok("hot") {
        hot_aggregates(db.url(), 4, 2, 10, "warm").await;
        let per = n(100.0);
        let (mut rates, mut failures) = (Vec::new(), Vec::new());
        for run in 0..3 {
            let (rate, failed) = hot_aggregates(db.url(), 16, 4, per, &format!("r{run}")).await;
            println!("run {run}: {rate:.0} cmd/s, {:.1}% failed", failed * 100.0);
            rates.push(rate);
            failures.push(failed);
        }
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        println!(
            "hot aggregates (16 tasks, 2 repositories, 4 accounts, {per} deposits each): median {:.0} cmd/s, {:.1}% failed with a conflict",
            median(rates),
            median(failures) * 100.0
        );
        return;
    }

    // `FACTUM_BENCH_ONLY=group`: group commit off and on, alternated with raw single-row inserts,
    // three runs each at 1 and 16 clients: 1-event appends and uncached commands; medians, each
    // ratio within the same run.
    if std::env::var("FACTUM_BENCH_ONLY").as_deref() == Ok("group") {
        let alone = db.store_with(
            factum_postgres::StoreOptions::default()
                .with_group_commit(factum_postgres::GroupCommit::disabled()),
        );
        let alone_repo = Arc::new(Repository::<Account, _>::new(alone.clone()));
        // `FACTUM_BENCH_GROUP_IN_FLIGHT=N`: statements in flight with group commit on.
        let mut group = factum_postgres::GroupCommit::enabled();
        if let Some(n) = std::env::var("FACTUM_BENCH_GROUP_IN_FLIGHT")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            group = group.with_max_in_flight(n);
        }
        let store =
            db.store_with(factum_postgres::StoreOptions::default().with_group_commit(group));
        let repo = Arc::new(Repository::<Account, _>::new(store.clone()));
        // Group commit and batched reads: both halves of an uncached command batched.
        let both = db.store_with(
            factum_postgres::StoreOptions::default()
                .with_group_commit(group)
                .with_batched_reads(batched_reads()),
        );
        let both_repo = Arc::new(Repository::<Account, _>::new(both.clone()));
        raw_inserts(&pool, 4, 20, "warm").await;
        raw_commands(&pool, 4, 20, "warmr").await;
        factum_appends(&alone, 4, 20, "warma").await;
        factum_appends(&store, 4, 20, "warmg").await;
        factum_commands(&alone_repo, 4, 20, "warma").await;
        factum_commands(&repo, 4, 20, "warmg").await;
        factum_commands(&both_repo, 4, 20, "warmb").await;
        header();
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        peer_commands(&cqrs, 4, 20, "warmp").await;
        const ROWS: [(&str, &str); 7] = [
            ("1-event appends, group commit off", "ev/s"),
            ("1-event appends, group commit on", "ev/s"),
            ("raw commands (raw read + raw insert)", "cmd/s"),
            ("cqrs-es + postgres-es commands", "cmd/s"),
            ("commands, group commit off", "cmd/s"),
            ("commands, group commit on", "cmd/s"),
            ("commands, group commit + batched reads", "cmd/s"),
        ];
        for (clients, base) in [(1, 1000.0), (16, 400.0)] {
            let per = (n(base) / 10).max(1) * 10;
            let mut ratios: [Vec<f64>; ROWS.len()] = Default::default();
            // Each command row also against the raw commands of the same run.
            let mut to_raw_commands: [Vec<f64>; ROWS.len()] = Default::default();
            let mut to_peer: [Vec<f64>; ROWS.len()] = Default::default();
            let mut rates: [Vec<f64>; ROWS.len() + 1] = Default::default();
            for run in 0..3 {
                let t = |what: &str| format!("{what}{clients}r{run}");
                let raw = raw_inserts(&pool, clients, per, &t("raw")).await;
                let figures = [
                    factum_appends(&alone, clients, per, &t("aoff")).await,
                    factum_appends(&store, clients, per, &t("aon")).await,
                    raw_commands(&pool, clients, per, &t("rcmd")).await,
                    peer_commands(&cqrs, clients, per, &t("peer")).await,
                    factum_commands(&alone_repo, clients, per, &t("coff")).await,
                    factum_commands(&repo, clients, per, &t("con")).await,
                    factum_commands(&both_repo, clients, per, &t("cboth")).await,
                ];
                rates[0].push(raw);
                for (i, v) in figures.into_iter().enumerate() {
                    rates[i + 1].push(v);
                    ratios[i].push(v / raw);
                    to_raw_commands[i].push(v / figures[2]);
                    to_peer[i].push(v / figures[3]);
                }
            }
            let raw = median(&mut rates[0]);
            for (i, (what, unit)) in ROWS.into_iter().enumerate() {
                let ours = median(&mut rates[i + 1]);
                let ratio = median(&mut ratios[i]);
                ratios[i].sort_by(f64::total_cmp);
                let against_raw_commands = if i > 3 {
                    format!(
                        "{:.0}% of raw commands, {:.2}x cqrs-es",
                        median(&mut to_raw_commands[i]) * 100.0,
                        median(&mut to_peer[i])
                    )
                } else {
                    String::new()
                };
                println!(
                    "| {clients} client(s), {what} (median of 3) | {ours:.0} {unit} | raw inserts: {raw:.0} /s | {:.0}% ({:.0}%–{:.0}%) | {against_raw_commands} |",
                    ratio * 100.0,
                    ratios[i][0] * 100.0,
                    ratios[i][2] * 100.0
                );
            }
        }
        return;
    }

    // `FACTUM_BENCH_ONLY=where`: where a 16-client operation's time goes: rate, client CPU and
    // server CPU per operation, for raw inserts, 1-event appends, uncached and cached commands;
    // medians of 3 alternated runs. (16 clients on a pool of 24: no client waits for a
    // connection.)
    if std::env::var("FACTUM_BENCH_ONLY").as_deref() == Ok("where") {
        raw_inserts(&pool, 4, 20, "warm").await;
        factum_appends(&store, 4, 20, "warm").await;
        factum_commands(&repo, 4, 20, "warm").await;
        factum_commands(&cached, 4, 20, "warmc").await;
        let grouped = db.store_with(
            factum_postgres::StoreOptions::default()
                .with_group_commit(factum_postgres::GroupCommit::enabled()),
        );
        factum_appends(&grouped, 4, 20, "warmg").await;
        let batched = Arc::new(Repository::<Account, _>::new(
            db.store_with(
                factum_postgres::StoreOptions::default()
                    .with_group_commit(factum_postgres::GroupCommit::enabled())
                    .with_batched_reads(batched_reads()),
            ),
        ));
        factum_commands(&batched, 4, 20, "warmb").await;
        let per = (n(400.0) / 10).max(1) * 10;
        let ops = 16 * per;
        let mut figures: [Vec<[f64; 3]>; 7] = Default::default();
        for run in 0..3 {
            let t = |what: &str| format!("w{what}{run}");
            figures[0].push(with_cpus(ops, raw_inserts(&pool, 16, per, &t("raw"))).await);
            figures[1].push(with_cpus(ops, factum_appends(&store, 16, per, &t("app"))).await);
            figures[2].push(with_cpus(ops, factum_commands(&repo, 16, per, &t("cmd"))).await);
            figures[3].push(with_cpus(ops, factum_commands(&cached, 16, per, &t("cch"))).await);
            figures[4].push(with_cpus(ops, factum_appends(&grouped, 16, per, &t("grp"))).await);
            figures[5].push(with_cpus(ops, raw_commands(&pool, 16, per, &t("rcm"))).await);
            figures[6].push(with_cpus(ops, factum_commands(&batched, 16, per, &t("bat"))).await);
        }
        println!(
            "| 16 clients (median of 3) | ops/s | client CPU per op | server CPU per op | wall time per op and client |"
        );
        println!("| --- | ---: | ---: | ---: | ---: |");
        for (what, runs) in [
            "raw single-row inserts",
            "1-event appends",
            "uncached commands",
            "cached commands",
            "1-event appends, group commit on",
            "raw commands (raw read + raw insert)",
            "uncached commands, group commit + batched reads",
        ]
        .into_iter()
        .zip(&figures)
        {
            let median = |i: usize| {
                let mut v: Vec<f64> = runs.iter().map(|f| f[i]).collect();
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            println!(
                "| {what} | {:.0} | {:.0} µs | {:.0} µs | {:.0} µs |",
                median(0),
                median(1),
                median(2),
                16e6 / median(0)
            );
        }
        return;
    }

    // `FACTUM_BENCH_ONLY=read`: only (d), the stream read and the aggregate load.
    if std::env::var("FACTUM_BENCH_ONLY").as_deref() == Ok("read") {
        header();
        stream_reads(&store, &repo, &pool, &peer_pool, n(100_000.0), 5).await;
        return;
    }

    // `FACTUM_BENCH_ONLY=keys`: only commands with and without idempotency keys, alternated,
    // three runs each at 1 and 16 clients, medians (about half a minute).
    if std::env::var("FACTUM_BENCH_ONLY").as_deref() == Ok("keys") {
        factum_commands(&repo, 4, 20, "warm").await;
        factum_keyed_commands(&repo, 4, 20, "warmk").await;
        header();
        for (clients, base) in [(1, 2000.0), (16, 400.0)] {
            let per = (n(base) / 10).max(1) * 10;
            let (mut plain, mut keyed) = (Vec::new(), Vec::new());
            for run in 0..3 {
                plain
                    .push(factum_commands(&repo, clients, per, &format!("p{clients}r{run}")).await);
                keyed.push(
                    factum_keyed_commands(&repo, clients, per, &format!("k{clients}r{run}")).await,
                );
            }
            let median = |mut v: Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            row(
                &format!("{clients} client(s), commands with idempotency keys (median of 3)"),
                median(keyed),
                "commands without",
                median(plain),
                "cmd/s",
                0.85,
            );
        }
        return;
    }

    // Warm up every path (connections, prepared statements).
    raw_inserts(&pool, 4, 20, "warm").await;
    factum_appends(&store, 4, 20, "warm").await;
    factum_commands(&repo, 4, 20, "warm").await;
    factum_commands(&cached, 4, 20, "warmc").await;
    peer_commands(&cqrs, 4, 20, "warm").await;

    header();
    let per = (n(2000.0) / 10).max(1) * 10;
    let (raw, raw_cpu) = with_cpu(per, raw_inserts(&pool, 1, per, "raw1")).await;
    let (appends, appends_cpu) = with_cpu(per, factum_appends(&store, 1, per, "app1")).await;
    let (commands, commands_cpu) = with_cpu(per, factum_commands(&repo, 1, per, "cmd1")).await;
    let (cached1, cached_cpu) = with_cpu(per, factum_commands(&cached, 1, per, "cch1")).await;
    let keyed1 = factum_keyed_commands(&repo, 1, per, "key1").await;
    let (peer, peer_cpu) = with_cpu(per, peer_commands(&cqrs, 1, per, "peer1")).await;
    let client_cpu = format!(
        "client CPU per operation, 1 client: raw insert {raw_cpu:.0} µs, factum append \
         {appends_cpu:.0} µs, factum command {commands_cpu:.0} µs (cached state \
         {cached_cpu:.0} µs), cqrs-es command {peer_cpu:.0} µs"
    );
    row(
        "(a) 1 client, 1-event appends",
        appends,
        "raw inserts",
        raw,
        "ev/s",
        0.8,
    );
    row(
        "(a) 1 client, commands",
        commands,
        "raw inserts",
        raw,
        "cmd/s",
        0.8,
    );
    row(
        "(a) 1 client, commands, cached states",
        cached1,
        "raw inserts",
        raw,
        "cmd/s",
        0.8,
    );
    info_row("(a) 1 client, commands", commands, "cqrs-es", peer, "cmd/s");
    row(
        "(a) 1 client, commands with idempotency keys",
        keyed1,
        "commands without",
        commands,
        "cmd/s",
        0.85,
    );

    let per = (n(400.0) / 10).max(1) * 10;
    let raw = raw_inserts(&pool, 16, per, "raw16").await;
    let appends = factum_appends(&store, 16, per, "app16").await;
    let commands = factum_commands(&repo, 16, per, "cmd16").await;
    let cached16 = factum_commands(&cached, 16, per, "cch16").await;
    let keyed16 = factum_keyed_commands(&repo, 16, per, "key16").await;
    let peer = peer_commands(&cqrs, 16, per, "peer16").await;
    row(
        "(b) 16 clients, commands with idempotency keys",
        keyed16,
        "commands without",
        commands,
        "cmd/s",
        0.85,
    );
    row(
        "(b) 16 clients, 1-event appends",
        appends,
        "raw inserts",
        raw,
        "ev/s",
        0.6,
    );
    row(
        "(b) 16 clients, commands",
        commands,
        "raw inserts",
        raw,
        "cmd/s",
        0.6,
    );
    row(
        "(b) 16 clients, commands, cached states",
        cached16,
        "raw inserts",
        raw,
        "cmd/s",
        0.6,
    );
    row(
        "(b) 16 clients, commands",
        commands,
        "cqrs-es",
        peer,
        "cmd/s",
        5.0,
    );
    row(
        "(b) 16 clients, commands, cached states",
        cached16,
        "cqrs-es",
        peer,
        "cmd/s",
        5.0,
    );

    // (b') the same 16 clients on long-lived accounts: each client runs all its commands on one
    // account, whose stream grows to `per` events. Not the target's workload (that is (b)): it
    // shows what loading a whole stream per command costs as streams grow.
    let long_per = (n(400.0) / 10).max(1) * 10;
    let long_ours = factum_commands_on(&cached, 16, long_per, long_per, "lcch16", false).await;
    let long_uncached = factum_commands_on(&repo, 16, long_per, long_per, "lcmd16", false).await;
    let long_peer = peer_commands_on(&cqrs, 16, long_per, long_per, "lpeer16").await;
    info_row(
        &format!("(b') 16 clients, one {long_per}-event account each, commands"),
        long_uncached,
        "cqrs-es",
        long_peer,
        "cmd/s",
    );
    info_row(
        &format!("(b') 16 clients, one {long_per}-event account each, commands, cached states"),
        long_ours,
        "cqrs-es",
        long_peer,
        "cmd/s",
    );

    // (c) 100-event batches, each event with its own payload on both sides; batches are built
    // before the clock starts.
    let batches = n(100.0);
    let raw_sql = {
        let mut sql = String::from(
            "INSERT INTO raw.events (stream_id, stream_version, event_id, event_type, schema_version, payload) VALUES ",
        );
        for i in 0..100 {
            if i > 0 {
                sql.push(',');
            }
            sql.push_str(&format!(
                "($1, {}, ${}, 'account.deposited', 1, ${}::jsonb)",
                i + 1,
                2 * i + 2,
                2 * i + 3
            ));
        }
        sql
    };
    let raw_batches: Vec<Vec<(Uuid, String)>> = (0..batches)
        .map(|_| {
            (0..100u64)
                .map(|i| (Uuid::now_v7(), format!(r#"{{"amount":{}}}"#, i + 1)))
                .collect()
        })
        .collect();
    let started = Instant::now();
    for (b, rows) in raw_batches.iter().enumerate() {
        let mut q =
            sqlx::query(sqlx::AssertSqlSafe(raw_sql.as_str())).bind(format!("rawbatch-{b}"));
        for (id, payload) in rows {
            q = q.bind(id).bind(payload);
        }
        q.execute(&pool).await.expect("raw batch");
    }
    let raw = (batches * 100) as f64 / started.elapsed().as_secs_f64();
    let our_batches: Vec<Vec<NewEvent>> = (0..batches)
        .map(|_| (0..100u64).map(|i| deposit(i + 1)).collect())
        .collect();
    let started = Instant::now();
    for (b, events) in our_batches.into_iter().enumerate() {
        let stream = StreamId::new(format!("batch-{b}")).expect("id");
        store
            .append(
                factum::AppendRequest::new(stream.clone(), events)
                    .expected_version(ExpectedVersion::NoStream),
            )
            .await
            .expect("batch");
    }
    let ours = (batches * 100) as f64 / started.elapsed().as_secs_f64();
    row(
        "(c) 100-event batch appends",
        ours,
        "raw multi-row insert",
        raw,
        "ev/s",
        0.8,
    );

    // (d) one long stream with realistic payloads: the store's read against raw streaming of
    // the same rows and columns, decoded the same way; and a whole aggregate load (read, decode,
    // evolve) against cqrs-es.
    stream_reads(&store, &repo, &pool, &peer_pool, n(100_000.0), 5).await;

    // Streaming: the peak RSS of a process loading a 1M-event aggregate vs a 10k-event one.
    let (small, big) = (n(10_000.0), n(1_000_000.0));
    fill_by_sql(&pool, "small", small).await;
    fill_by_sql(&pool, "big", big).await;
    let (small_before, small_peak) = peak_rss_of_load(db.url(), "small", small);
    let (big_before, big_peak) = peak_rss_of_load(db.url(), "big", big);
    println!();
    println!("{client_cpu}");
    println!();
    println!("| load (read, decode, evolve) | peak RSS before | peak RSS after |");
    println!("| --- | ---: | ---: |");
    println!(
        "| {small} events | {:.1} MiB | {:.1} MiB |",
        small_before as f64 / 1024.0,
        small_peak as f64 / 1024.0
    );
    println!(
        "| {big} events | {:.1} MiB | {:.1} MiB |",
        big_before as f64 / 1024.0,
        big_peak as f64 / 1024.0
    );
    println!(
        "\npeak RSS of the {big}-event load is {:+.1} MiB from the {small}-event load's",
        (big_peak as f64 - small_peak as f64) / 1024.0
    );
}
