//! Subscription status as `metrics` gauges.

use tokio::sync::watch;

use super::{SubscriptionState, SubscriptionStatus};
use crate::telemetry::{
    SUBSCRIPTION_HANDLED, SUBSCRIPTION_LAG_EVENTS, SUBSCRIPTION_LAG_SECONDS, SUBSCRIPTION_PARKED,
    SUBSCRIPTION_POSITION, SUBSCRIPTION_STATE,
};

/// Publishes `status` as gauges labelled `subscription = name`, through the `metrics` facade
/// (whatever recorder the application installed; nothing without one):
///
/// | gauge | value |
/// | --- | --- |
/// | `factum_subscription_position` | the global position of the last event handled |
/// | `factum_subscription_lag_events` | [`SubscriptionStatus::lag_events`] |
/// | `factum_subscription_lag_seconds` | [`SubscriptionStatus::lag`] |
/// | `factum_subscription_handled` | events handled since start |
/// | `factum_subscription_parked` | events parked since start |
/// | `factum_subscription_state` | 1 for the current state, 0 for the others, by label `state` (`starting`, `catching_up`, `live`, `standby`, `retrying`, `stopped`, `failed`) |
pub fn record_metrics(name: &str, status: &SubscriptionStatus) {
    let name = name.to_owned();
    let gauge = |metric: &'static str, value: f64| {
        metrics::gauge!(metric, "subscription" => name.clone()).set(value);
    };
    gauge(SUBSCRIPTION_POSITION, status.position.global.get() as f64);
    gauge(SUBSCRIPTION_LAG_EVENTS, status.lag_events as f64);
    gauge(SUBSCRIPTION_LAG_SECONDS, status.lag.as_secs_f64());
    gauge(SUBSCRIPTION_HANDLED, status.handled as f64);
    gauge(SUBSCRIPTION_PARKED, status.parked as f64);
    let current = state_label(&status.state);
    for state in STATES {
        metrics::gauge!(SUBSCRIPTION_STATE, "subscription" => name.clone(), "state" => state)
            .set(if state == current { 1.0 } else { 0.0 });
    }
}

/// Records [`record_metrics`] for every update of `status` until its sender is dropped (the
/// subscription or runner is gone). Spawn it next to the consumer:
///
/// ```
/// # use factum::subscription::{Subscription, export_metrics};
/// # async fn run(subscription: Subscription<factum::InMemoryStore>) {
/// tokio::spawn(export_metrics("balances", subscription.status()));
/// # }
/// ```
pub async fn export_metrics(
    name: impl Into<String>,
    mut status: watch::Receiver<SubscriptionStatus>,
) {
    let name = name.into();
    loop {
        let current = status.borrow_and_update().clone();
        record_metrics(&name, &current);
        if status.changed().await.is_err() {
            return;
        }
    }
}

const STATES: [&str; 7] = [
    "starting",
    "catching_up",
    "live",
    "standby",
    "retrying",
    "stopped",
    "failed",
];

fn state_label(state: &SubscriptionState) -> &'static str {
    match state {
        SubscriptionState::Starting => "starting",
        SubscriptionState::CatchingUp => "catching_up",
        SubscriptionState::Live => "live",
        SubscriptionState::Standby => "standby",
        SubscriptionState::Retrying(_) => "retrying",
        SubscriptionState::Stopped => "stopped",
        SubscriptionState::Failed(_) => "failed",
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::ids::{GlobalPosition, LogPosition};
    use crate::resilience::telemetry::testing::TestRecorder;

    #[test]
    fn status_becomes_gauges() {
        let recorder = TestRecorder::default();
        let _guard = metrics::set_default_local_recorder(&recorder);
        let mut status = SubscriptionStatus::starting(LogPosition::START);
        status.position = LogPosition::new(7, GlobalPosition::new(42));
        status.lag_events = 5;
        status.lag = Duration::from_millis(1500);
        status.handled = 40;
        status.parked = 2;
        status.state = SubscriptionState::Retrying("connection refused".into());
        record_metrics("balances", &status);
        let get = |key: &str| recorder.get(key);
        assert_eq!(
            get("factum_subscription_position{subscription=balances}"),
            42.0
        );
        assert_eq!(
            get("factum_subscription_lag_events{subscription=balances}"),
            5.0
        );
        assert_eq!(
            get("factum_subscription_lag_seconds{subscription=balances}"),
            1.5
        );
        assert_eq!(
            get("factum_subscription_handled{subscription=balances}"),
            40.0
        );
        assert_eq!(
            get("factum_subscription_parked{subscription=balances}"),
            2.0
        );
        assert_eq!(
            get("factum_subscription_state{subscription=balances,state=retrying}"),
            1.0
        );
        status.state = SubscriptionState::Live;
        record_metrics("balances", &status);
        assert_eq!(
            get("factum_subscription_state{subscription=balances,state=retrying}"),
            0.0
        );
        assert_eq!(
            get("factum_subscription_state{subscription=balances,state=live}"),
            1.0
        );
    }
}
