//! The book's metrics reference (docs/src/reference/metrics.md) against what the code emits:
//! the table equals `factum::telemetry::METRICS`, and a workload that exercises every metric
//! (commands executed, rejected, conflicted, absorbed conflicts, appends, loads, cache,
//! snapshots, subscription gauges, retries, breaker) emits exactly those names, types and labels.

use std::collections::BTreeMap;
use std::time::Duration;

use factum::resilience::{CircuitBreakerConfig, Operation, Resilience, RetryPolicy};
use factum::subscription::{SubscriptionStatus, record_metrics};
use factum::telemetry::{METRICS, MetricKind};
use factum::{
    Aggregate, Command, CommandError, Error, Event, InMemoryStore, LogPosition, Repository,
    SnapshotPolicy,
};
use metrics_util::MetricKind as RecordedKind;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Counter {
    total: u64,
}

#[derive(Clone, Debug)]
struct Add {
    id: &'static str,
    amount: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Amount {
    amount: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Event)]
#[event(prefix = "counter")]
enum Added {
    Added(Amount),
}

#[derive(Debug, thiserror::Error)]
#[error("zero is not an amount")]
struct Zero;

impl Command for Add {
    fn command_name(&self) -> &'static str {
        "Add"
    }
    fn aggregate_id(&self) -> String {
        self.id.to_owned()
    }
}

impl Aggregate for Counter {
    const TYPE: &'static str = "counter";
    type Command = Add;
    type Event = Added;
    type Error = Zero;

    fn decide(&self, command: &Add) -> Result<Vec<Added>, Zero> {
        if command.amount == 0 {
            return Err(Zero);
        }
        Ok(vec![Added::Added(Amount {
            amount: command.amount,
        })])
    }

    fn evolve(&mut self, event: &Added) {
        let Added::Added(a) = event;
        self.total += a.amount;
    }
}

impl factum::Snapshot for Counter {
    const SNAPSHOT_VERSION: u32 = 1;
}

/// The rows of the book's table: name -> (type, labels).
fn book() -> BTreeMap<String, (String, Vec<String>)> {
    let text = include_str!("../../docs/src/reference/metrics.md");
    text.lines()
        .filter(|l| l.starts_with("| `factum_"))
        .map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let unquote = |s: &str| s.trim_matches('`').to_owned();
            let labels = cells[3].split(',').map(|l| unquote(l.trim())).collect();
            (unquote(cells[1]), (cells[2].to_owned(), labels))
        })
        .collect()
}

fn code() -> BTreeMap<String, (String, Vec<String>)> {
    METRICS
        .iter()
        .map(|m| {
            (
                m.name.to_owned(),
                (
                    m.kind.as_str().to_owned(),
                    m.labels.iter().map(|l| (*l).to_owned()).collect(),
                ),
            )
        })
        .collect()
}

#[test]
fn the_book_lists_exactly_the_metrics_in_code() {
    let (book, code) = (book(), code());
    assert_eq!(
        book.len(),
        METRICS.len(),
        "a metric is listed twice in the book or in METRICS"
    );
    assert_eq!(book, code);
}

#[tokio::test]
async fn the_workload_emits_every_listed_metric_and_nothing_else() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // Thread-local, and a current-thread runtime: only this test's metrics are seen.
    let _guard = metrics::set_default_local_recorder(&recorder);

    let store = InMemoryStore::new();
    let cached = Repository::<Counter, _>::new(store.clone())
        .with_cache(100)
        .with_snapshots(store.clone(), SnapshotPolicy::every(1));
    let plain = Repository::<Counter, _>::new(store.clone());
    let from_snapshots = Repository::<Counter, _>::new(store.clone())
        .with_snapshots(store.clone(), SnapshotPolicy::every(100));
    let stubborn = Repository::<Counter, _>::new(store.clone())
        .with_cache(100)
        .with_conflict_retries(0);

    let add = |id, amount| Add { id, amount };
    cached.execute(add("a", 1)).await.expect("executed"); // cache miss, load, append, snapshot
    cached.execute(add("a", 2)).await.expect("executed"); // cache hit
    from_snapshots.execute(add("a", 3)).await.expect("executed"); // loads from the snapshot
    // The cache is now behind the store: the append conflicts, the repository catches up.
    let absorbed = cached.execute(add("a", 4)).await.expect("executed");
    assert_eq!(absorbed.attempts, 2);
    assert!(matches!(
        plain.execute(add("a", 0)).await,
        Err(CommandError::Rejected(Zero))
    ));
    stubborn.execute(add("b", 1)).await.expect("executed");
    plain.execute(add("b", 1)).await.expect("executed");
    let conflicted = stubborn.execute(add("b", 1)).await;
    assert!(
        matches!(&conflicted, Err(CommandError::Failed(e)) if e.is_conflict()),
        "{conflicted:?}"
    );

    record_metrics("totals", &SubscriptionStatus::starting(LogPosition::START));

    // Retries, a give-up, and a breaker that opens and then refuses.
    let resilience = Resilience::new("test-db")
        .with_policy(
            Operation::Read,
            RetryPolicy::new()
                .with_max_attempts(2)
                .with_initial_delay(Duration::from_millis(1)),
        )
        .with_breaker_config(CircuitBreakerConfig {
            consecutive_failures: 2,
            cool_down: Duration::from_secs(60),
            ..CircuitBreakerConfig::default()
        });
    let failed = resilience
        .run(Operation::Read, || async {
            Err::<(), _>(Error::transient("read", "connection reset"))
        })
        .await;
    assert!(failed.is_err());
    let refused = resilience.run(Operation::Read, || async { Ok(()) }).await;
    assert!(refused.is_err(), "the circuit is open");

    let code = code();
    let mut emitted: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    // One snapshot: taking it drains what was recorded.
    let snapshot = snapshotter.snapshot().into_vec();
    for (key, _, _, value) in &snapshot {
        let (kind, key) = (key.kind(), key.key());
        let name = key.name().to_owned();
        let labels: Vec<String> = key.labels().map(|l| l.key().to_owned()).collect();
        let kind = match kind {
            RecordedKind::Counter => MetricKind::Counter,
            RecordedKind::Gauge => MetricKind::Gauge,
            RecordedKind::Histogram => MetricKind::Histogram,
        };
        assert!(
            !matches!(value, DebugValue::Counter(0)),
            "{name} registered without a count"
        );
        let seen = (kind.as_str().to_owned(), labels);
        match code.get(&name) {
            Some(listed) => assert_eq!(listed, &seen, "{name} is emitted unlike its listing"),
            None => panic!("{name} is emitted but not listed in METRICS or the book"),
        }
        emitted.insert(name, seen);
    }
    // The bus's gauges need a relay or an inbound consumer: `telemetry::tests` covers them.
    let missing: Vec<&String> = code
        .keys()
        .filter(|n| !n.starts_with("factum_relay_") && !n.starts_with("factum_inbound_"))
        .filter(|n| !emitted.contains_key(*n))
        .collect();
    assert!(missing.is_empty(), "the workload never emitted {missing:?}");

    // Spot checks of values: three outcomes, one absorbed conflict.
    let counters: BTreeMap<String, u64> = snapshot
        .into_iter()
        .filter_map(|(key, _, _, value)| match value {
            DebugValue::Counter(n) => {
                let key = key.key();
                let labels: Vec<String> = key
                    .labels()
                    .map(|l| format!("{}={}", l.key(), l.value()))
                    .collect();
                Some((format!("{}{{{}}}", key.name(), labels.join(",")), n))
            }
            _ => None,
        })
        .collect();
    let get = |k: &str| counters.get(k).copied().unwrap_or(0);
    assert_eq!(
        get("factum_commands_total{aggregate=counter,outcome=rejected}"),
        1
    );
    assert_eq!(
        get("factum_commands_total{aggregate=counter,outcome=conflicted}"),
        1
    );
    assert_eq!(
        get("factum_commands_total{aggregate=counter,outcome=executed}"),
        6
    );
    assert_eq!(get("factum_command_retries_total{aggregate=counter}"), 1);
    assert_eq!(get("factum_appends_total{aggregate=counter}"), 6);
    assert_eq!(
        get("factum_cache_lookups_total{aggregate=counter,result=hit}"),
        3
    );
    assert!(get("factum_snapshot_loads_total{aggregate=counter,result=used}") >= 1);
}
