//! Every metric factum emits, in one list, and the helpers that emit the repository's.
//!
//! The framework only talks to the [`metrics`] facade: nothing is recorded until the
//! application installs a recorder (e.g. `metrics-exporter-prometheus`). [`METRICS`] names them
//! all, with their type and labels (the book's metrics reference is checked against it by a
//! test); [`describe_metrics`] gives each its help text.
//!
//! ```
//! use factum::telemetry::{METRICS, MetricKind};
//!
//! let commands = METRICS.iter().find(|m| m.name == "factum_commands_total").unwrap();
//! assert_eq!(commands.kind, MetricKind::Counter);
//! assert_eq!(commands.labels, ["aggregate", "outcome"]);
//! ```

use std::time::Instant;

use crate::error::CommandError;
use crate::resilience::telemetry as resilience;

/// What kind of metric a name is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MetricKind {
    /// Only goes up.
    Counter,
    /// A value that is set.
    Gauge,
    /// A distribution of observations.
    Histogram,
}

impl MetricKind {
    /// `counter`, `gauge` or `histogram`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        }
    }
}

/// One metric: its name, kind, label keys (in emission order) and help text.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Metric {
    /// The name, e.g. `factum_commands_total`.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: MetricKind,
    /// The label keys.
    pub labels: &'static [&'static str],
    /// What it measures.
    pub help: &'static str,
}

/// Counter: commands the repository finished, labelled `aggregate` and `outcome`: `executed`
/// (decided and stored, decided nothing, or repeated a stored command), `rejected` (the
/// aggregate said no), `conflicted` (conflict retries exhausted), `failed` (any other error).
pub const COMMANDS_TOTAL: &str = "factum_commands_total";
/// Histogram: seconds a command took, from the call to its answer, labelled `aggregate` and
/// `outcome`.
pub const COMMAND_DURATION_SECONDS: &str = "factum_command_duration_seconds";
/// Counter: conflicts the repository absorbed by catching up and deciding again (or a cached
/// state found behind the store), labelled `aggregate`: a command that succeeded on its third
/// attempt counts two.
pub const COMMAND_RETRIES_TOTAL: &str = "factum_command_retries_total";
/// Counter: appends commands stored, labelled `aggregate` (a repeat stores nothing and is not
/// counted).
pub const APPENDS_TOTAL: &str = "factum_appends_total";
/// Counter: events those appends stored, labelled `aggregate`.
pub const EVENTS_APPENDED_TOTAL: &str = "factum_events_appended_total";
/// Histogram: seconds spent loading an aggregate (snapshot and events) for a command, labelled
/// `aggregate` (not counted when the state came from the cache).
pub const LOAD_DURATION_SECONDS: &str = "factum_aggregate_load_seconds";
/// Counter: state cache lookups of repositories with a cache, labelled `aggregate` and `result`
/// (`hit`, `miss`).
pub const CACHE_LOOKUPS_TOTAL: &str = "factum_cache_lookups_total";
/// Counter: snapshots a load found, labelled `aggregate` and `result` (`used`, `ignored`: of
/// another snapshot version or not decodable).
pub const SNAPSHOT_LOADS_TOTAL: &str = "factum_snapshot_loads_total";
/// Counter: snapshots the repository saved, labelled `aggregate` and `result` (`saved`,
/// `failed`).
pub const SNAPSHOT_SAVES_TOTAL: &str = "factum_snapshot_saves_total";

/// Gauges of a consumer's status (see [`record_metrics`](crate::subscription::record_metrics)).
pub const SUBSCRIPTION_POSITION: &str = "factum_subscription_position";
/// Gauge: events a consumer is behind.
pub const SUBSCRIPTION_LAG_EVENTS: &str = "factum_subscription_lag_events";
/// Gauge: seconds a consumer is behind.
pub const SUBSCRIPTION_LAG_SECONDS: &str = "factum_subscription_lag_seconds";
/// Gauge: events a consumer handled since it started.
pub const SUBSCRIPTION_HANDLED: &str = "factum_subscription_handled";
/// Gauge: events a consumer parked (dead letters) since it started.
pub const SUBSCRIPTION_PARKED: &str = "factum_subscription_parked";
/// Gauge: 1 for a consumer's current state, 0 for the others.
pub const SUBSCRIPTION_STATE: &str = "factum_subscription_state";

const AGGREGATE: &[&str] = &["aggregate"];
const AGGREGATE_OUTCOME: &[&str] = &["aggregate", "outcome"];
const AGGREGATE_RESULT: &[&str] = &["aggregate", "result"];
const SUBSCRIPTION: &[&str] = &["subscription"];

/// Every metric factum emits.
pub const METRICS: &[Metric] = &[
    Metric {
        name: COMMANDS_TOTAL,
        kind: MetricKind::Counter,
        labels: AGGREGATE_OUTCOME,
        help: "Commands finished, by aggregate and outcome (executed, rejected, conflicted, failed).",
    },
    Metric {
        name: COMMAND_DURATION_SECONDS,
        kind: MetricKind::Histogram,
        labels: AGGREGATE_OUTCOME,
        help: "Seconds from a command's call to its answer.",
    },
    Metric {
        name: COMMAND_RETRIES_TOTAL,
        kind: MetricKind::Counter,
        labels: AGGREGATE,
        help: "Conflicts absorbed by catching up and deciding again.",
    },
    Metric {
        name: APPENDS_TOTAL,
        kind: MetricKind::Counter,
        labels: AGGREGATE,
        help: "Appends stored by commands.",
    },
    Metric {
        name: EVENTS_APPENDED_TOTAL,
        kind: MetricKind::Counter,
        labels: AGGREGATE,
        help: "Events stored by commands.",
    },
    Metric {
        name: LOAD_DURATION_SECONDS,
        kind: MetricKind::Histogram,
        labels: AGGREGATE,
        help: "Seconds spent loading an aggregate (snapshot and events) for a command.",
    },
    Metric {
        name: CACHE_LOOKUPS_TOTAL,
        kind: MetricKind::Counter,
        labels: AGGREGATE_RESULT,
        help: "State cache lookups, by result (hit, miss).",
    },
    Metric {
        name: SNAPSHOT_LOADS_TOTAL,
        kind: MetricKind::Counter,
        labels: AGGREGATE_RESULT,
        help: "Snapshots found by loads, by result (used, ignored).",
    },
    Metric {
        name: SNAPSHOT_SAVES_TOTAL,
        kind: MetricKind::Counter,
        labels: AGGREGATE_RESULT,
        help: "Snapshots saved by the repository, by result (saved, failed).",
    },
    Metric {
        name: SUBSCRIPTION_POSITION,
        kind: MetricKind::Gauge,
        labels: SUBSCRIPTION,
        help: "Global position of the last event a consumer handled.",
    },
    Metric {
        name: SUBSCRIPTION_LAG_EVENTS,
        kind: MetricKind::Gauge,
        labels: SUBSCRIPTION,
        help: "Events a consumer is behind the head of the log (an upper bound).",
    },
    Metric {
        name: SUBSCRIPTION_LAG_SECONDS,
        kind: MetricKind::Gauge,
        labels: SUBSCRIPTION,
        help: "Seconds since the last handled event was recorded, while behind.",
    },
    Metric {
        name: SUBSCRIPTION_HANDLED,
        kind: MetricKind::Gauge,
        labels: SUBSCRIPTION,
        help: "Events a consumer handled since it started.",
    },
    Metric {
        name: SUBSCRIPTION_PARKED,
        kind: MetricKind::Gauge,
        labels: SUBSCRIPTION,
        help: "Events a consumer parked in the dead-letter queue since it started.",
    },
    Metric {
        name: SUBSCRIPTION_STATE,
        kind: MetricKind::Gauge,
        labels: &["subscription", "state"],
        help: "1 for a consumer's current state (starting, catching_up, live, standby, retrying, stopped, failed), 0 for the others.",
    },
    // The bus's relay and inbound consumer gauges (crate::bus::record_relay_metrics,
    // record_inbound_metrics).
    Metric {
        name: "factum_relay_published",
        kind: MetricKind::Gauge,
        labels: &["relay"],
        help: "Messages the broker stored since the relay started.",
    },
    Metric {
        name: "factum_relay_duplicates",
        kind: MetricKind::Gauge,
        labels: &["relay"],
        help: "Messages the broker dropped as duplicates since the relay started.",
    },
    Metric {
        name: "factum_relay_retries",
        kind: MetricKind::Gauge,
        labels: &["relay"],
        help: "Publish attempts retried since the relay started.",
    },
    Metric {
        name: "factum_relay_last_event_age_seconds",
        kind: MetricKind::Gauge,
        labels: &["relay"],
        help: "Seconds since the last published event was recorded.",
    },
    Metric {
        name: "factum_relay_state",
        kind: MetricKind::Gauge,
        labels: &["relay", "state"],
        help: "1 for a relay's current state (running, retrying), 0 for the other.",
    },
    Metric {
        name: "factum_inbound_handled",
        kind: MetricKind::Gauge,
        labels: &["consumer"],
        help: "Messages whose effect an inbound consumer committed since it started.",
    },
    Metric {
        name: "factum_inbound_duplicates",
        kind: MetricKind::Gauge,
        labels: &["consumer"],
        help: "Messages the inbox dropped as handled before, since start.",
    },
    Metric {
        name: "factum_inbound_parked",
        kind: MetricKind::Gauge,
        labels: &["consumer"],
        help: "Messages an inbound consumer parked since it started.",
    },
    Metric {
        name: "factum_inbound_redeliveries",
        kind: MetricKind::Gauge,
        labels: &["consumer"],
        help: "Deliveries that were redeliveries, since start.",
    },
    Metric {
        name: "factum_inbound_lag_messages",
        kind: MetricKind::Gauge,
        labels: &["consumer"],
        help: "Messages waiting at the broker or not yet acknowledged.",
    },
    Metric {
        name: "factum_inbound_last_event_age_seconds",
        kind: MetricKind::Gauge,
        labels: &["consumer"],
        help: "Seconds since the last handled event was recorded by its publisher (end-to-end delay).",
    },
    Metric {
        name: "factum_inbound_state",
        kind: MetricKind::Gauge,
        labels: &["consumer", "state"],
        help: "1 for an inbound consumer's current state (starting, running, retrying, stopped, failed), 0 for the others.",
    },
    Metric {
        name: resilience::RETRIES_TOTAL,
        kind: MetricKind::Counter,
        labels: &["operation", "dependency"],
        help: "Retries of failed calls to a dependency, by operation.",
    },
    Metric {
        name: resilience::RETRY_GIVE_UPS_TOTAL,
        kind: MetricKind::Counter,
        labels: &["operation", "dependency", "reason"],
        help: "Calls that stopped retrying and returned their last error, by reason (max_attempts, max_elapsed, budget, circuit_open).",
    },
    Metric {
        name: resilience::CIRCUIT_STATE,
        kind: MetricKind::Gauge,
        labels: &["dependency"],
        help: "Circuit breaker state per dependency: 0 closed, 1 open, 2 half-open.",
    },
    Metric {
        name: resilience::CIRCUIT_TRANSITIONS_TOTAL,
        kind: MetricKind::Counter,
        labels: &["dependency", "from", "to"],
        help: "Circuit breaker state transitions per dependency.",
    },
    Metric {
        name: resilience::CIRCUIT_REJECTED_TOTAL,
        kind: MetricKind::Counter,
        labels: &["dependency"],
        help: "Calls failed fast because the dependency's circuit was open.",
    },
];

/// Registers the help text of every metric in [`METRICS`] with the installed recorder.
///
/// Optional: metrics are emitted whether or not they were described.
///
/// ```
/// // After installing an exporter, e.g. metrics_exporter_prometheus::PrometheusBuilder:
/// factum::telemetry::describe_metrics();
/// ```
pub fn describe_metrics() {
    for metric in METRICS {
        let unit = metric
            .name
            .ends_with("_seconds")
            .then_some(metrics::Unit::Seconds);
        match (metric.kind, unit) {
            (MetricKind::Counter, _) => metrics::describe_counter!(metric.name, metric.help),
            (MetricKind::Gauge, Some(unit)) => {
                metrics::describe_gauge!(metric.name, unit, metric.help);
            }
            (MetricKind::Gauge, None) => metrics::describe_gauge!(metric.name, metric.help),
            (MetricKind::Histogram, _) => {
                metrics::describe_histogram!(metric.name, metrics::Unit::Seconds, metric.help);
            }
        }
    }
}

/// What a command's answer was, as the `outcome` label says it.
pub(crate) fn command_done<A, E>(
    aggregate: &'static str,
    started: Instant,
    result: &Result<crate::repository::Committed<A>, CommandError<E>>,
) where
    A: crate::Aggregate,
{
    let outcome = match result {
        Ok(_) => "executed",
        Err(CommandError::Rejected(_)) => "rejected",
        Err(CommandError::Failed(e)) if e.is_conflict() => "conflicted",
        Err(CommandError::Failed(_)) => "failed",
    };
    metrics::counter!(COMMANDS_TOTAL, "aggregate" => aggregate, "outcome" => outcome).increment(1);
    metrics::histogram!(COMMAND_DURATION_SECONDS, "aggregate" => aggregate, "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
    if let Ok(committed) = result {
        let retries = u64::from(committed.attempts.saturating_sub(1));
        if retries > 0 {
            metrics::counter!(COMMAND_RETRIES_TOTAL, "aggregate" => aggregate).increment(retries);
        }
    }
}

pub(crate) fn appended(aggregate: &'static str, events: usize) {
    metrics::counter!(APPENDS_TOTAL, "aggregate" => aggregate).increment(1);
    metrics::counter!(EVENTS_APPENDED_TOTAL, "aggregate" => aggregate).increment(events as u64);
}

pub(crate) fn loaded(aggregate: &'static str, started: Instant) {
    metrics::histogram!(LOAD_DURATION_SECONDS, "aggregate" => aggregate)
        .record(started.elapsed().as_secs_f64());
}

pub(crate) fn cache_lookup(aggregate: &'static str, hit: bool) {
    let result = if hit { "hit" } else { "miss" };
    metrics::counter!(CACHE_LOOKUPS_TOTAL, "aggregate" => aggregate, "result" => result)
        .increment(1);
}

pub(crate) fn snapshot_loaded(aggregate: &'static str, used: bool) {
    let result = if used { "used" } else { "ignored" };
    metrics::counter!(SNAPSHOT_LOADS_TOTAL, "aggregate" => aggregate, "result" => result)
        .increment(1);
}

pub(crate) fn snapshot_saved(aggregate: &'static str, saved: bool) {
    let result = if saved { "saved" } else { "failed" };
    metrics::counter!(SNAPSHOT_SAVES_TOTAL, "aggregate" => aggregate, "result" => result)
        .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{
        InboundState, InboundStatus, RelayState, RelayStatus, record_inbound_metrics,
        record_relay_metrics,
    };
    use metrics_util::debugging::DebuggingRecorder;

    /// The bus's gauges, which a workload outside the crate cannot emit without a broker: each
    /// listed one is emitted with its labels, and nothing else is.
    #[test]
    fn the_bus_gauges_are_listed() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            record_relay_metrics(
                "out",
                &RelayStatus {
                    state: RelayState::Running,
                    published: 1,
                    duplicates: 0,
                    skipped: 0,
                    retries: 0,
                    last_recorded_at: None,
                },
            );
            record_inbound_metrics(
                "in",
                &InboundStatus {
                    state: InboundState::Running,
                    handled: 1,
                    duplicates: 0,
                    parked: 0,
                    redeliveries: 0,
                    lag_messages: 0,
                    last_recorded_at: None,
                },
            );
        });
        let mut emitted: Vec<(String, Vec<String>)> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, _, _, _)| {
                assert_eq!(key.kind(), metrics_util::MetricKind::Gauge);
                let key = key.key();
                (
                    key.name().to_owned(),
                    key.labels().map(|l| l.key().to_owned()).collect(),
                )
            })
            .collect();
        emitted.sort();
        emitted.dedup();
        let mut listed: Vec<(String, Vec<String>)> = METRICS
            .iter()
            .filter(|m| {
                m.name.starts_with("factum_relay_") || m.name.starts_with("factum_inbound_")
            })
            .map(|m| {
                assert_eq!(m.kind, MetricKind::Gauge, "{}", m.name);
                (
                    m.name.to_owned(),
                    m.labels.iter().map(|l| (*l).to_owned()).collect(),
                )
            })
            .collect();
        listed.sort();
        assert_eq!(emitted, listed);
    }
}
