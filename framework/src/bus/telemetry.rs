//! Relay and inbound consumer status as `metrics` gauges.

use chrono::Utc;
use tokio::sync::watch;

use super::{InboundState, InboundStatus, RelayState, RelayStatus};

fn age_seconds(at: Option<chrono::DateTime<Utc>>) -> f64 {
    at.and_then(|at| (Utc::now() - at).to_std().ok())
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Publishes a relay's `status` as gauges labelled `relay = name`, through the `metrics` facade
/// (whatever recorder the application installed; nothing without one). Its lag in events and
/// seconds behind the log is that of the subscription running it
/// ([`record_metrics`](crate::subscription::record_metrics)).
///
/// | gauge | value |
/// | --- | --- |
/// | `factum_relay_published` | messages the broker stored since start |
/// | `factum_relay_duplicates` | messages the broker dropped as duplicates since start |
/// | `factum_relay_retries` | publish attempts retried since start |
/// | `factum_relay_last_event_age_seconds` | how long ago the last published event was recorded |
/// | `factum_relay_state` | 1 for the current state, 0 for the other, by label `state` (`running`, `retrying`) |
pub fn record_relay_metrics(name: &str, status: &RelayStatus) {
    let name = name.to_owned();
    let gauge = |metric: &'static str, value: f64| {
        metrics::gauge!(metric, "relay" => name.clone()).set(value);
    };
    gauge("factum_relay_published", status.published as f64);
    gauge("factum_relay_duplicates", status.duplicates as f64);
    gauge("factum_relay_retries", status.retries as f64);
    gauge(
        "factum_relay_last_event_age_seconds",
        age_seconds(status.last_recorded_at),
    );
    let current = match status.state {
        RelayState::Running => "running",
        RelayState::Retrying(_) => "retrying",
        RelayState::Failed(_) => "failed",
    };
    for state in ["running", "retrying", "failed"] {
        metrics::gauge!("factum_relay_state", "relay" => name.clone(), "state" => state)
            .set(if state == current { 1.0 } else { 0.0 });
    }
}

/// Publishes an inbound consumer's `status` as gauges labelled `consumer = name`:
///
/// | gauge | value |
/// | --- | --- |
/// | `factum_inbound_handled` | messages whose effect committed since start |
/// | `factum_inbound_duplicates` | messages the inbox dropped (handled before) since start |
/// | `factum_inbound_parked` | messages parked since start |
/// | `factum_inbound_redeliveries` | deliveries that were redeliveries since start |
/// | `factum_inbound_lag_messages` | messages waiting at the broker or not yet acknowledged |
/// | `factum_inbound_last_event_age_seconds` | how long ago the last handled event was recorded by its publisher (end-to-end delay) |
/// | `factum_inbound_state` | 1 for the current state, 0 for the others, by label `state` (`starting`, `running`, `retrying`, `stopped`, `failed`) |
pub fn record_inbound_metrics(name: &str, status: &InboundStatus) {
    let name = name.to_owned();
    let gauge = |metric: &'static str, value: f64| {
        metrics::gauge!(metric, "consumer" => name.clone()).set(value);
    };
    gauge("factum_inbound_handled", status.handled as f64);
    gauge("factum_inbound_duplicates", status.duplicates as f64);
    gauge("factum_inbound_parked", status.parked as f64);
    gauge("factum_inbound_redeliveries", status.redeliveries as f64);
    gauge("factum_inbound_lag_messages", status.lag_messages as f64);
    gauge(
        "factum_inbound_last_event_age_seconds",
        age_seconds(status.last_recorded_at),
    );
    let current = match status.state {
        InboundState::Starting => "starting",
        InboundState::Running => "running",
        InboundState::Retrying(_) => "retrying",
        InboundState::Stopped => "stopped",
        InboundState::Failed(_) => "failed",
    };
    for state in ["starting", "running", "retrying", "stopped", "failed"] {
        metrics::gauge!("factum_inbound_state", "consumer" => name.clone(), "state" => state)
            .set(if state == current { 1.0 } else { 0.0 });
    }
}

/// Records [`record_relay_metrics`] for every update of `status` until the relay is gone.
pub async fn export_relay_metrics(name: impl Into<String>, status: watch::Receiver<RelayStatus>) {
    export(name.into(), status, record_relay_metrics).await;
}

/// Records [`record_inbound_metrics`] for every update of `status` until the consumer is gone:
///
/// ```
/// # use factum::bus::{ConsumerConfig, InMemoryInbox, InProcessBus, InboundConsumer, export_inbound_metrics};
/// # async fn run() {
/// let consumer = InboundConsumer::new(InProcessBus::new(), InMemoryInbox::new(), ConsumerConfig::new("ORDERS", "billing-from-orders"));
/// tokio::spawn(export_inbound_metrics(consumer.name().to_owned(), consumer.status()));
/// # }
/// ```
pub async fn export_inbound_metrics(
    name: impl Into<String>,
    status: watch::Receiver<InboundStatus>,
) {
    export(name.into(), status, record_inbound_metrics).await;
}

/// Records each update of `status` with `record` until its sender is dropped.
async fn export<T: Clone>(name: String, mut status: watch::Receiver<T>, record: fn(&str, &T)) {
    loop {
        let current = status.borrow_and_update().clone();
        record(&name, &current);
        if status.changed().await.is_err() {
            return;
        }
    }
}
