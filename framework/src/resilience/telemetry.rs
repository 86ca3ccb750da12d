//! The metric names the resilience layer emits, and the emitting helpers.
//!
//! The library only talks to the [`metrics`] facade: nothing is recorded until the application
//! installs a recorder (a Prometheus exporter, say). Call [`describe_metrics`] once after
//! installing it to give each metric its help text and unit.

use std::time::Duration;

use crate::error::Error;

use super::Operation;
use super::breaker::CircuitState;

/// Counter: retries scheduled, labelled `operation` and `dependency`.
pub const RETRIES_TOTAL: &str = "factum_retries_total";
/// Counter: operations that gave up retrying and returned their last error, labelled
/// `operation`, `dependency` and `reason` (`max_attempts`, `max_elapsed`, `budget`,
/// `circuit_open`).
pub const RETRY_GIVE_UPS_TOTAL: &str = "factum_retry_give_ups_total";
/// Gauge: the circuit breaker's state, labelled `dependency`: 0 closed, 1 open, 2 half-open.
pub const CIRCUIT_STATE: &str = "factum_circuit_state";
/// Counter: circuit breaker transitions, labelled `dependency`, `from` and `to` (`closed`,
/// `open`, `half_open`).
pub const CIRCUIT_TRANSITIONS_TOTAL: &str = "factum_circuit_transitions_total";
/// Counter: calls refused without reaching the dependency because its circuit was open,
/// labelled `dependency`.
pub const CIRCUIT_REJECTED_TOTAL: &str = "factum_circuit_rejected_total";

/// Registers the help text of every metric above with the installed recorder.
///
/// Optional: metrics are emitted whether or not they were described.
///
/// ```
/// // After installing an exporter, e.g. metrics_exporter_prometheus::PrometheusBuilder:
/// factum::resilience::describe_metrics();
/// ```
pub fn describe_metrics() {
    metrics::describe_counter!(
        RETRIES_TOTAL,
        "Retries of failed calls to a dependency, by operation."
    );
    metrics::describe_counter!(
        RETRY_GIVE_UPS_TOTAL,
        "Calls that stopped retrying and returned their last error, by reason."
    );
    metrics::describe_gauge!(
        CIRCUIT_STATE,
        "Circuit breaker state per dependency: 0 closed, 1 open, 2 half-open."
    );
    metrics::describe_counter!(
        CIRCUIT_TRANSITIONS_TOTAL,
        "Circuit breaker state transitions per dependency."
    );
    metrics::describe_counter!(
        CIRCUIT_REJECTED_TOTAL,
        "Calls failed fast because the dependency's circuit was open."
    );
}

pub(crate) fn retry(
    operation: Operation,
    dependency: &'static str,
    retry: u32,
    delay: Duration,
    error: &Error,
) {
    tracing::warn!(
        operation = operation.as_str(),
        dependency,
        retry,
        delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
        error = %error,
        error_kind = %error.kind(),
        "retrying after a failed call"
    );
    metrics::counter!(RETRIES_TOTAL, "operation" => operation.as_str(), "dependency" => dependency)
        .increment(1);
}

pub(crate) fn give_up(
    operation: Operation,
    dependency: &'static str,
    reason: &'static str,
    retries: u32,
    error: &Error,
) {
    tracing::warn!(
        operation = operation.as_str(),
        dependency,
        reason,
        retries,
        error = %error,
        error_kind = %error.kind(),
        "giving up retrying; returning the last error"
    );
    metrics::counter!(
        RETRY_GIVE_UPS_TOTAL,
        "operation" => operation.as_str(),
        "dependency" => dependency,
        "reason" => reason
    )
    .increment(1);
}

pub(crate) fn circuit_state(dependency: &'static str, state: CircuitState) {
    metrics::gauge!(CIRCUIT_STATE, "dependency" => dependency).set(state.gauge_value());
}

pub(crate) fn transition(dependency: &'static str, from: CircuitState, to: CircuitState) {
    match to {
        CircuitState::Open => tracing::warn!(
            dependency,
            from = from.as_str(),
            to = to.as_str(),
            "circuit opened: calls fail fast until the cool-down ends"
        ),
        _ => tracing::info!(
            dependency,
            from = from.as_str(),
            to = to.as_str(),
            "circuit breaker transition"
        ),
    }
    metrics::counter!(
        CIRCUIT_TRANSITIONS_TOTAL,
        "dependency" => dependency,
        "from" => from.as_str(),
        "to" => to.as_str()
    )
    .increment(1);
    circuit_state(dependency, to);
}

pub(crate) fn rejected(dependency: &'static str) {
    tracing::debug!(dependency, "call refused: circuit open");
    metrics::counter!(CIRCUIT_REJECTED_TOTAL, "dependency" => dependency).increment(1);
}

/// A recorder for tests: counts counters and keeps the last gauge values, keyed by
/// `name{label=value,...}` with labels in emission order.
#[cfg(test)]
pub(crate) mod testing {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use metrics::{
        Counter, CounterFn, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, Recorder,
        SharedString, Unit,
    };

    #[derive(Default, Clone)]
    pub(crate) struct TestRecorder {
        values: Arc<Mutex<HashMap<String, f64>>>,
    }

    struct Handle {
        key: String,
        values: Arc<Mutex<HashMap<String, f64>>>,
    }

    impl Handle {
        fn update(&self, f: impl FnOnce(&mut f64)) {
            let mut values = self.values.lock().unwrap_or_else(|e| e.into_inner());
            f(values.entry(self.key.clone()).or_default());
        }
    }

    impl CounterFn for Handle {
        fn increment(&self, value: u64) {
            self.update(|v| *v += value as f64);
        }
        fn absolute(&self, value: u64) {
            self.update(|v| *v = v.max(value as f64));
        }
    }

    impl GaugeFn for Handle {
        fn increment(&self, value: f64) {
            self.update(|v| *v += value);
        }
        fn decrement(&self, value: f64) {
            self.update(|v| *v -= value);
        }
        fn set(&self, value: f64) {
            self.update(|v| *v = value);
        }
    }

    impl TestRecorder {
        fn handle(&self, key: &Key) -> Arc<Handle> {
            let labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            Arc::new(Handle {
                key: format!("{}{{{}}}", key.name(), labels.join(",")),
                values: self.values.clone(),
            })
        }

        /// The value under `name{labels}`, 0 when never emitted.
        pub(crate) fn get(&self, key: &str) -> f64 {
            let values = self.values.lock().unwrap_or_else(|e| e.into_inner());
            values.get(key).copied().unwrap_or(0.0)
        }

        /// The sum of every series of a metric.
        pub(crate) fn total(&self, name: &str) -> f64 {
            let values = self.values.lock().unwrap_or_else(|e| e.into_inner());
            let prefix = format!("{name}{{");
            values
                .iter()
                .filter(|(k, _)| k.starts_with(&prefix))
                .map(|(_, v)| v)
                .sum()
        }
    }

    impl Recorder for TestRecorder {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            Counter::from_arc(self.handle(key))
        }
        fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::from_arc(self.handle(key))
        }
        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }
}
