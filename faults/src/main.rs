//! The fault campaign: the failures factum must survive, provoked for real and checked against
//! what was acknowledged.
//!
//! ```text
//! scripts/faults/run [all|app-kill|pg-kill|restore] [--rounds N] [--bulk N]
//! ```
//!
//! * `app-kill`: a writer process appends batches of 5 events (4 concurrent tasks), recording
//!   each acknowledged batch's ids in a file after the append returned; it is killed with
//!   `kill -9` at varied points, `--rounds` times (default 20). Then every acknowledged event must
//!   be stored once, and every stored batch whole.
//! * `pg-kill`: the same writer runs while the PostgreSQL server (postmaster and backends) is
//!   killed with `kill -9` mid-load and restarted, `--rounds` times (default 5); the writer
//!   retries each failed batch with the same event ids until it is settled. Same checks.
//! * `restore`: 1,000 events and two checkpoints, `pg_dump -Fc`, `pg_restore` into a fresh
//!   cluster; the store must refuse the restored log until `repair_after_restore`, then a new
//!   subscription must replay every event in the original order and the restored checkpoint
//!   resume without skipping. `--bulk N` adds N events written by SQL in 10 transactions before
//!   the dump, to time the repair on a large log.
//!
//! Each scenario runs on throwaway clusters of its own (durable settings for the crash
//! scenarios). The figures are printed at the end; the exit code is non-zero when anything was
//! lost, duplicated, torn or out of order.

#![allow(clippy::result_large_err)]

#[path = "../../postgres-backend/tests/throwaway_cluster/mod.rs"]
mod cluster;

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster::{Cluster, Durability};
use factum::subscription::{CheckpointStore, EventHandler, Subscription};
use factum::{
    BoxError, EventFilter, EventId, EventStore, LogPosition, NewEvent, RawValue, RecordedEvent,
    StreamId,
};
use factum_postgres::{PostgresStore, RestoreRepairNeeded, StoreOptions};

type Failure = Box<dyn std::error::Error + Send + Sync>;

/// What one scenario measured.
#[derive(Debug, Default)]
struct Figures {
    scenario: &'static str,
    rounds: u32,
    /// Events whose append was acknowledged (recorded by the writer after it returned).
    acknowledged: u64,
    /// Events stored (including appends in flight at a kill that did commit).
    stored: u64,
    /// Acknowledged events not stored.
    lost: u64,
    /// Events stored more than once (same id, or same batch and index).
    duplicated: u64,
    /// Stored batches with fewer or more than 5 events.
    torn_batches: u64,
    /// Events the gap-safe read of the log missed or returned twice, or returned out of order.
    log_mismatches: u64,
    /// Scenario-specific notes.
    notes: Vec<String>,
}

impl Figures {
    fn ok(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.torn_batches == 0 && self.log_mismatches == 0
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("writer") {
        return writer_main(&args[1..]);
    }
    let mut scenario = "all".to_owned();
    let mut rounds: Option<u32> = None;
    let mut bulk: u64 = 0;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--rounds" => match rest.next().and_then(|n| n.parse().ok()) {
                Some(n) => rounds = Some(n),
                None => return usage("--rounds needs a number"),
            },
            "--bulk" => match rest.next().and_then(|n| n.parse().ok()) {
                Some(n) => bulk = n,
                None => return usage("--bulk needs a number"),
            },
            "all" | "app-kill" | "pg-kill" | "restore" => scenario = arg.clone(),
            "-h" | "--help" => return usage(""),
            other => return usage(&format!("unknown argument {other:?}")),
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let mut results = Vec::new();
    let run = |name: &str| scenario == "all" || scenario == name;
    if run("app-kill") {
        results.push(runtime.block_on(app_kill(rounds.unwrap_or(20))));
    }
    if run("pg-kill") {
        results.push(runtime.block_on(pg_kill(rounds.unwrap_or(5))));
    }
    if run("restore") {
        results.push(runtime.block_on(restore(bulk)));
    }
    report(results)
}

fn usage(problem: &str) -> ExitCode {
    if !problem.is_empty() {
        eprintln!("factum-faults: {problem}");
    }
    eprintln!("usage: scripts/faults/run [all|app-kill|pg-kill|restore] [--rounds N] [--bulk N]");
    ExitCode::from(2)
}

fn report(results: Vec<(&'static str, Result<Figures, Failure>)>) -> ExitCode {
    let mut failed = false;
    println!();
    println!(
        "{:<10} {:>6} {:>13} {:>8} {:>6} {:>11} {:>13} {:>15}",
        "scenario",
        "rounds",
        "acknowledged",
        "stored",
        "lost",
        "duplicated",
        "torn batches",
        "log mismatches"
    );
    for (name, result) in &results {
        match result {
            Ok(f) => {
                println!(
                    "{:<10} {:>6} {:>13} {:>8} {:>6} {:>11} {:>13} {:>15}",
                    f.scenario,
                    f.rounds,
                    f.acknowledged,
                    f.stored,
                    f.lost,
                    f.duplicated,
                    f.torn_batches,
                    f.log_mismatches
                );
                for note in &f.notes {
                    println!("{:<10} {note}", "");
                }
                failed |= !f.ok();
            }
            Err(e) => {
                println!("{name:<10} FAILED TO RUN: {e}");
                failed = true;
            }
        }
    }
    println!();
    if failed {
        println!(
            "RESULT: FAILED (something above was lost, duplicated, torn, out of order, or did not run)"
        );
        ExitCode::FAILURE
    } else {
        println!("RESULT: ok (0 lost, 0 duplicated, every batch whole)");
        ExitCode::SUCCESS
    }
}

// ---------------------------------------------------------------------------------------------
// The writer child process.

/// `writer <url> <ack file> <tag>`: appends batches of 5 from 4 tasks until killed, recording
/// each acknowledged batch (`batch-id id1 .. id5`) as one line, written after the append
/// returned. A failed append is retried with the same event ids until it is settled.
fn writer_main(args: &[String]) -> ExitCode {
    let [url, acks, tag] = args else {
        eprintln!("usage: factum-faults writer <url> <ack file> <tag>");
        return ExitCode::from(2);
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        let store = loop {
            match sqlx::postgres::PgPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(Duration::from_secs(5))
                .connect(url)
                .await
            {
                Ok(pool) => break PostgresStore::new(pool),
                Err(e) => {
                    eprintln!("writer: cannot connect yet: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(acks)
            .expect("open the ack file");
        let file = Arc::new(Mutex::new(file));
        let tasks: Vec<_> = (0..4)
            .map(|task| {
                let (store, file) = (store.clone(), file.clone());
                let stream = StreamId::new(format!("load-{tag}x{task}")).expect("stream id");
                tokio::spawn(async move {
                    loop {
                        let batch_id = uuid::Uuid::now_v7();
                        let events: Vec<NewEvent> =
                            (0..5).map(|i| batch_event(batch_id, i)).collect();
                        let mut line = batch_id.to_string();
                        for e in &events {
                            line.push(' ');
                            line.push_str(&e.event_id.to_string());
                        }
                        line.push('\n');
                        let mut delay = Duration::from_millis(20);
                        loop {
                            match append(&store, &stream, events.clone()).await {
                                Ok(()) => break,
                                Err(e) => {
                                    eprintln!(
                                        "writer: append failed ({}), retrying the same batch: {e}",
                                        e.kind()
                                    );
                                    tokio::time::sleep(delay).await;
                                    delay = (delay * 2).min(Duration::from_secs(1));
                                }
                            }
                        }
                        // One write of the whole line: a kill cannot tear it.
                        let mut file = file.lock().expect("not poisoned");
                        file.write_all(line.as_bytes()).expect("record the ack");
                    }
                })
            })
            .collect();
        for task in tasks {
            let _ = task.await;
        }
    });
    ExitCode::SUCCESS
}

/// One append; a helper so the move to `append(AppendRequest)` is one edit.
async fn append(
    store: &PostgresStore,
    stream: &StreamId,
    events: Vec<NewEvent>,
) -> Result<(), factum::Error> {
    store
        .append(factum::AppendRequest::new(stream.clone(), events))
        .await
        .map(drop)
}

fn batch_event(batch: uuid::Uuid, index: u32) -> NewEvent {
    NewEvent {
        event_id: EventId::new(),
        event_type: "fault.appended".to_owned(),
        schema_version: 1,
        payload: RawValue::from_string(format!("{{\"batch\":\"{batch}\",\"i\":{index}}}"))
            .expect("json"),
        metadata: Default::default(),
    }
}

fn spawn_writer(url: &str, acks: &Path, tag: &str) -> Result<Child, Failure> {
    Ok(Command::new(std::env::current_exe()?)
        .arg("writer")
        .arg(url)
        .arg(acks)
        .arg(tag)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?)
}

/// The acknowledged batches recorded so far: batch id and its 5 event ids (a torn last line,
/// impossible with one write per line, would be ignored).
fn read_acks(path: &Path) -> Vec<(uuid::Uuid, Vec<uuid::Uuid>)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let ids: Vec<uuid::Uuid> = line.split(' ').filter_map(|w| w.parse().ok()).collect();
            (ids.len() == 6).then(|| (ids[0], ids[1..].to_vec()))
        })
        .collect()
}

/// Waits until at least `count` batches are acknowledged, or fails after `within`.
async fn wait_for_acks(
    path: &Path,
    count: usize,
    within: Duration,
    child: &mut Child,
) -> Result<(), Failure> {
    let deadline = Instant::now() + within;
    loop {
        if read_acks(path).len() >= count {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            return Err(format!(
                "the writer exited ({status}) before {count} acknowledged batches"
            )
            .into());
        }
        if Instant::now() > deadline {
            return Err(format!("fewer than {count} acknowledged batches after {within:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn kill9(child: &mut Child) -> Result<(), Failure> {
    // `Child::kill` sends SIGKILL on Unix.
    child.kill()?;
    child.wait()?;
    Ok(())
}

async fn store_on(url: &str) -> Result<PostgresStore, Failure> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(url)
        .await?;
    Ok(PostgresStore::with_options(
        pool,
        StoreOptions::default().with_read_settle_timeout(Duration::from_secs(10)),
    ))
}

/// Checks the stored log against the acknowledged batches.
async fn check(
    store: &PostgresStore,
    acks: &[(uuid::Uuid, Vec<uuid::Uuid>)],
    figures: &mut Figures,
) -> Result<(), Failure> {
    let rows: Vec<(uuid::Uuid, String, i32)> = sqlx::query_as(
        "SELECT event_id, payload->>'batch', (payload->>'i')::int FROM factum.events \
         WHERE event_type = 'fault.appended'",
    )
    .fetch_all(store.pool())
    .await?;
    figures.acknowledged = acks.len() as u64 * 5;
    figures.stored = rows.len() as u64;
    let mut ids = HashSet::new();
    let mut slots = HashSet::new();
    let mut batches: HashMap<String, u32> = HashMap::new();
    for (id, batch, index) in &rows {
        if !ids.insert(*id) || !slots.insert((batch.clone(), *index)) {
            figures.duplicated += 1;
        }
        *batches.entry(batch.clone()).or_default() += 1;
    }
    figures.torn_batches = batches.values().filter(|&&n| n != 5).count() as u64;
    figures.lost = acks
        .iter()
        .flat_map(|(_, ids)| ids)
        .filter(|id| !ids.contains(id))
        .count() as u64;
    // The gap-safe read must return exactly the stored events, once each, in log order.
    let log = read_log(store, LogPosition::START).await?;
    let read: HashSet<uuid::Uuid> = log.iter().map(|e| e.event_id.as_uuid()).collect();
    let ordered = log.windows(2).all(|w| w[0].position < w[1].position);
    figures.log_mismatches = (log.len().abs_diff(read.len())
        + read.symmetric_difference(&ids).count()) as u64
        + u64::from(!ordered);
    Ok(())
}

async fn read_log(
    store: &PostgresStore,
    mut after: LogPosition,
) -> Result<Vec<RecordedEvent>, factum::Error> {
    let mut all = Vec::new();
    loop {
        let page = store.read_all(after, 1000, &EventFilter::all()).await?;
        match page.last() {
            Some(last) => after = last.position,
            None => return Ok(all),
        }
        all.extend(page);
    }
}

fn ack_file(cluster: &Cluster, name: &str) -> PathBuf {
    cluster.dir().join(name)
}

// ---------------------------------------------------------------------------------------------
// Scenarios.

async fn app_kill(rounds: u32) -> (&'static str, Result<Figures, Failure>) {
    ("app-kill", app_kill_inner(rounds).await)
}

async fn app_kill_inner(rounds: u32) -> Result<Figures, Failure> {
    let cluster = Cluster::start(Durability::Durable)?;
    cluster.run_client("createdb", &["app"])?;
    let url = cluster.url("app");
    let store = store_on(&url).await?;
    store.migrate().await?;
    let acks = ack_file(&cluster, "acks");
    for round in 0..rounds {
        let before = read_acks(&acks).len();
        let mut child = spawn_writer(&url, &acks, &format!("a{round}"))?;
        // Varied kill points: from a few batches after the start to a few hundred.
        let extra = 5 + (round as usize * 53) % 200;
        let waited =
            wait_for_acks(&acks, before + extra, Duration::from_secs(120), &mut child).await;
        kill9(&mut child)?;
        waited?;
    }
    let mut figures = Figures {
        scenario: "app-kill",
        rounds,
        ..Figures::default()
    };
    check(&store, &read_acks(&acks), &mut figures).await?;
    figures.notes.push(format!(
        "{} events stored beyond the acknowledged ones (appends in flight at a kill that committed)",
        figures.stored.saturating_sub(figures.acknowledged)
    ));
    Ok(figures)
}

async fn pg_kill(rounds: u32) -> (&'static str, Result<Figures, Failure>) {
    ("pg-kill", pg_kill_inner(rounds).await)
}

async fn pg_kill_inner(rounds: u32) -> Result<Figures, Failure> {
    let cluster = Cluster::start(Durability::Durable)?;
    cluster.run_client("createdb", &["app"])?;
    let url = cluster.url("app");
    {
        let store = store_on(&url).await?;
        store.migrate().await?;
        store.pool().close().await;
    }
    let acks = ack_file(&cluster, "acks");
    let mut child = spawn_writer(&url, &acks, "p")?;
    let mut outage = Duration::ZERO;
    let result: Result<(), Failure> = async {
        wait_for_acks(&acks, 50, Duration::from_secs(120), &mut child).await?;
        for round in 0..rounds as usize {
            let before = read_acks(&acks).len();
            // Mid-load: the writer has appends in flight when the server dies.
            let down = Instant::now();
            cluster.kill9()?;
            cluster.restart()?;
            outage += down.elapsed();
            // The writer recovers by itself, settling its in-flight batches with the same ids.
            wait_for_acks(
                &acks,
                before + 30 + round * 10,
                Duration::from_secs(180),
                &mut child,
            )
            .await?;
        }
        Ok(())
    }
    .await;
    kill9(&mut child)?;
    result?;
    let store = store_on(&url).await?;
    let mut figures = Figures {
        scenario: "pg-kill",
        rounds,
        ..Figures::default()
    };
    check(&store, &read_acks(&acks), &mut figures).await?;
    figures.notes.push(format!(
        "server killed {rounds} times; mean kill-to-accepting-connections {:?}",
        outage / rounds.max(1)
    ));
    Ok(figures)
}

#[derive(Default)]
struct Recorder(Vec<EventId>);

impl EventHandler for Recorder {
    async fn handle(&mut self, event: &RecordedEvent) -> Result<(), BoxError> {
        self.0.push(event.event_id);
        Ok(())
    }
}

async fn restore(bulk: u64) -> (&'static str, Result<Figures, Failure>) {
    ("restore", restore_inner(bulk).await)
}

async fn restore_inner(bulk: u64) -> Result<Figures, Failure> {
    let source = Cluster::start(Durability::Fast)?;
    let target = Cluster::start(Durability::Fast)?;
    source.run_client("createdb", &["app"])?;
    let url = source.url("app");
    let store = store_on(&url).await?;
    store.migrate().await?;
    // A source cluster that has lived longer than the fresh target.
    sqlx::raw_sql(
        "DO $$ BEGIN FOR i IN 1..30000 LOOP PERFORM pg_current_xact_id(); COMMIT; END LOOP; END $$",
    )
    .execute(store.pool())
    .await?;
    let acks = source.dir().join("acks");
    let mut child = spawn_writer(&url, &acks, "r")?;
    let waited = wait_for_acks(&acks, 200, Duration::from_secs(120), &mut child).await;
    kill9(&mut child)?;
    waited?;
    for chunk in 0..10 {
        if bulk == 0 {
            break;
        }
        let n = i64::try_from(bulk / 10).unwrap_or(i64::MAX);
        sqlx::query(
            "WITH s AS (INSERT INTO factum.streams (stream_id, category, version) \
                 SELECT 'bulk-' || $1 || 'x' || g, 'bulk', 1 FROM generate_series(1, $2) g \
                 RETURNING stream_id) \
             INSERT INTO factum.events (stream_id, stream_version, event_id, event_type, \
                 schema_version, payload) \
             SELECT stream_id, 1, gen_random_uuid(), 'bulk.appended', 1, '{}' FROM s",
        )
        .bind(chunk)
        .bind(n)
        .execute(store.pool())
        .await?;
    }
    let old = read_log(&store, LogPosition::START).await?;
    let part = old.len() / 2;
    store
        .save_checkpoint("follower", old[part - 1].position)
        .await?;
    let dump = source.dir().join("app.dump");
    let dump = dump.to_str().ok_or("non-UTF-8 temporary path")?;
    source.run_client("pg_dump", &["-Fc", "-d", "app", "-f", dump])?;
    target.run_client("createdb", &["app"])?;
    target.run_client("pg_restore", &["--no-owner", "-d", "app", dump])?;

    let restored = store_on(&target.url("app")).await?;
    let mut figures = Figures {
        scenario: "restore",
        rounds: 1,
        ..Figures::default()
    };
    // Before the repair: refused, not silent.
    let mut before = Recorder::default();
    let refused = Subscription::new("fresh", restored.clone())
        .catch_up(&mut before)
        .await;
    let refused_loudly = refused
        .as_ref()
        .err()
        .and_then(RestoreRepairNeeded::find)
        .is_some();
    figures.notes.push(format!(
        "before the repair: a fresh subscription saw {} of {} events and {}",
        before.0.len(),
        old.len(),
        if refused_loudly {
            "failed with RestoreRepairNeeded"
        } else {
            "DID NOT FAIL (silent)"
        }
    ));
    if !refused_loudly {
        figures.log_mismatches += 1;
    }
    let started = Instant::now();
    let repair = restored.repair_after_restore().await?;
    figures.notes.push(format!(
        "repair: {} events into {} commits, {} checkpoints moved, in {:?}",
        repair.events_rewritten,
        repair.commits,
        repair.checkpoints_moved,
        started.elapsed()
    ));
    let new_stream = StreamId::new("after-restore")?;
    let mut appended = Vec::new();
    for i in 0..10 {
        let event = batch_event(uuid::Uuid::now_v7(), i);
        appended.push(event.event_id);
        append(&restored, &new_stream, vec![event]).await?;
    }
    let mut expected: Vec<EventId> = old.iter().map(|e| e.event_id).collect();
    expected.extend(&appended);
    let mut replay = Recorder::default();
    Subscription::new("replay", restored.clone())
        .catch_up(&mut replay)
        .await?;
    let mut follower = Recorder::default();
    Subscription::new("follower", restored.clone())
        .catch_up(&mut follower)
        .await?;

    figures.acknowledged = old.len() as u64;
    figures.stored = replay.0.len() as u64 - appended.len() as u64;
    let seen: HashSet<EventId> = replay.0.iter().copied().collect();
    figures.lost = expected.iter().filter(|id| !seen.contains(id)).count() as u64;
    figures.duplicated = (replay.0.len() - seen.len()) as u64;
    figures.log_mismatches +=
        u64::from(replay.0 != expected) + u64::from(follower.0 != expected[part..]);
    figures.notes.push(format!(
        "after: a fresh subscription replayed {} events {} then the 10 new ones; the restored checkpoint resumed with {} events ({})",
        replay.0.len() - appended.len(),
        if replay.0 == expected { "in the original order" } else { "OUT OF ORDER" },
        follower.0.len(),
        if follower.0 == expected[part..] { "none skipped" } else { "SKIPPED OR REPEATED" }
    ));
    Ok(figures)
}
