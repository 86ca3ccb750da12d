//! Readiness and liveness, for a service's health endpoints.
//!
//! A [`Readiness`] gathers named [`Check`]s: the database (e.g. `factum_postgres::PostgresStore::
//! readiness_check`: reachable, migrations current), each circuit breaker ([`Readiness::circuit`]:
//! closed), each consumer ([`Readiness::consumer`]: running, and not lagging more than allowed),
//! the relay ([`Readiness::relay`]: the broker takes its publishes) and each inbound consumer
//! ([`Readiness::inbound`]: connected to the bus, and not too many messages behind). A
//! [`Liveness`] gathers the consumers that must not have stopped ([`Liveness::consumer`],
//! [`Liveness::inbound`]): a consumer that stopped on an error will not recover by waiting, so
//! restarting the process is the remedy.
//!
//! Serve each as the body of its endpoint (they serialise to `{"ready": .., "checks": [..]}` and
//! `{"live": .., "checks": [..]}`) with [`http_status`](Readiness::http_status) as the status
//! (200 or 503). With the `axum` feature both are axum responses, so a handler returns them as
//! they are.
//!
//! ```
//! use std::time::Duration;
//! use factum::health::{Liveness, Readiness};
//! use factum::resilience::Resilience;
//! use factum::subscription::SubscriptionStatus;
//! use factum::LogPosition;
//!
//! let database = Resilience::new("postgres");
//! let balances = SubscriptionStatus::starting(LogPosition::START); // subscription.status().borrow()
//!
//! let ready = Readiness::new()
//!     .check("database", true, "reachable, migrations current")
//!     .circuit(&database.health())
//!     .consumer("balances", &balances, Duration::from_secs(30));
//! assert!(ready.is_ready());
//! assert_eq!(ready.http_status(), 200);
//! let live = Liveness::new().consumer("balances", &balances);
//! assert!(live.is_live());
//! let body = serde_json::to_value(&ready).unwrap();
//! assert_eq!(body["checks"][1]["name"], "circuit postgres");
//! ```

use std::time::Duration;

use serde::Serialize;

use crate::ReplicaLag;
use crate::bus::{InboundState, InboundStatus, RelayState, RelayStatus};
use crate::resilience::{CircuitState, Health};
use crate::subscription::{SubscriptionState, SubscriptionStatus};

/// One named health check and what it found.
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
#[non_exhaustive]
pub struct Check {
    /// What was checked, e.g. `database` or `consumer balances`.
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// What was found, for people: why it failed, or the figures it passed with.
    pub detail: String,
}

impl Check {
    /// A check's result.
    pub fn new(name: impl Into<String>, ok: bool, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ok,
            detail: detail.into(),
        }
    }
}

/// Whether the service can take traffic: every check passed.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize)]
pub struct Readiness {
    ready: bool,
    checks: Vec<Check>,
}

impl Readiness {
    /// No checks yet (ready).
    pub fn new() -> Self {
        Self {
            ready: true,
            checks: Vec::new(),
        }
    }

    /// Adds a check.
    #[must_use]
    pub fn with(mut self, check: Check) -> Self {
        self.ready &= check.ok;
        self.checks.push(check);
        self
    }

    /// Adds a check from its parts.
    #[must_use]
    pub fn check(self, name: impl Into<String>, ok: bool, detail: impl Into<String>) -> Self {
        self.with(Check::new(name, ok, detail))
    }

    /// Adds `circuit <dependency>`: passes while the dependency's circuit is closed (open, calls
    /// fail fast; half-open, a trial call decides).
    #[must_use]
    pub fn circuit(self, health: &Health) -> Self {
        let detail = match (health.circuit, health.retry_after) {
            (CircuitState::Closed, _) => "closed".to_owned(),
            (CircuitState::Open, Some(after)) => {
                format!("open: calls fail fast for {} ms more", after.as_millis())
            }
            (CircuitState::Open, None) => "open: calls fail fast".to_owned(),
            (CircuitState::HalfOpen, _) => "half-open: a trial call decides".to_owned(),
        };
        self.check(
            format!("circuit {}", health.dependency),
            health.circuit == CircuitState::Closed,
            detail,
        )
    }

    /// Adds `consumer <name>`: passes while the consumer runs (or stands by for another
    /// instance) without waiting out store failures, at most `max_lag` behind in time.
    #[must_use]
    pub fn consumer(self, name: &str, status: &SubscriptionStatus, max_lag: Duration) -> Self {
        let (running, state) = describe(&status.state);
        let lagging = status.lag > max_lag;
        let ok = running && !matches!(status.state, SubscriptionState::Retrying(_)) && !lagging;
        let mut detail = format!(
            "{state}, {} events and {} ms behind",
            status.lag_events,
            status.lag.as_millis()
        );
        if lagging {
            detail.push_str(&format!(" (more than {} ms)", max_lag.as_millis()));
        }
        self.check(format!("consumer {name}"), ok, detail)
    }

    /// Adds `relay <name>`: passes while the broker takes the relay's publishes (a relay waiting
    /// out a broker outage is not ready: the bus is not connected). Its lag is the subscription's
    /// that runs it: add that with [`consumer`](Self::consumer).
    #[must_use]
    pub fn relay(self, name: &str, status: &RelayStatus) -> Self {
        let (ok, state) = match &status.state {
            RelayState::Running => (true, "publishing".to_owned()),
            RelayState::Retrying(why) => (false, format!("retrying: {why}")),
            RelayState::Failed(why) => (false, format!("failed: {why}")),
        };
        let detail = format!(
            "{state}, {} published, {} duplicates, {} retries",
            status.published, status.duplicates, status.retries
        );
        self.check(format!("relay {name}"), ok, detail)
    }

    /// Adds `inbound <name>`: passes while the inbound consumer runs connected to the bus (not
    /// waiting out a bus or inbox failure) with at most `max_lag_messages` messages waiting for
    /// it at the broker. Messages it parked do not fail it: they are in the dead-letter queue,
    /// which [`InboundStatus::parked`] counts, for an alert of their own.
    #[must_use]
    pub fn inbound(self, name: &str, status: &InboundStatus, max_lag_messages: u64) -> Self {
        let (running, state) = describe_inbound(&status.state);
        let lagging = status.lag_messages > max_lag_messages;
        let ok = running && !matches!(status.state, InboundState::Retrying(_)) && !lagging;
        let mut detail = format!(
            "{state}, {} messages behind, {} handled, {} parked",
            status.lag_messages, status.handled, status.parked
        );
        if lagging {
            detail.push_str(&format!(" (more than {max_lag_messages})"));
        }
        self.check(format!("inbound {name}"), ok, detail)
    }

    /// Adds `replica <name>`: passes while the read replica was last measured caught up, or at
    /// most `max_lag` behind its primary ([`ReplicaLag::is_within`]). Pass a consumer's
    /// [`SubscriptionStatus::replica_lag`] or a reader's own measurement (e.g.
    /// `factum_postgres::PgReader::lag`); `None`, never measured, fails.
    ///
    /// ```
    /// use std::time::Duration;
    /// use factum::health::Readiness;
    /// use factum::ReplicaLag;
    ///
    /// let lag = ReplicaLag::new(Some(Duration::from_secs(3)), 81_920);
    /// let ready = Readiness::new().replica("orders", Some(&lag), Duration::from_secs(1));
    /// assert!(!ready.is_ready());
    /// assert_eq!(ready.checks()[0].detail, "81920 bytes and at most 3000 ms behind (more than 1000 ms)");
    /// ```
    #[must_use]
    pub fn replica(self, name: &str, lag: Option<&ReplicaLag>, max_lag: Duration) -> Self {
        let name = format!("replica {name}");
        let Some(lag) = lag else {
            return self.check(name, false, "lag not measured yet");
        };
        let ok = lag.is_within(max_lag);
        let mut detail = match lag.time {
            _ if lag.is_caught_up() => "caught up".to_owned(),
            Some(time) => format!(
                "{} bytes and at most {} ms behind",
                lag.bytes,
                time.as_millis()
            ),
            None => format!("{} bytes behind, for an unknown time", lag.bytes),
        };
        if !ok {
            detail.push_str(&format!(" (more than {} ms)", max_lag.as_millis()));
        }
        self.check(name, ok, detail)
    }

    /// True when every check passed.
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// The HTTP status to serve it with: 200 when ready, else 503 (Service Unavailable: take
    /// this instance out of the load balancer for now).
    pub fn http_status(&self) -> u16 {
        if self.ready { 200 } else { 503 }
    }

    /// The checks, in the order they were added.
    pub fn checks(&self) -> &[Check] {
        &self.checks
    }
}

/// Whether the service's consumers are still running: the body of `/health/live`. A failed
/// liveness means a restart is needed (a consumer stopped, on request or on an error, and does
/// not resume by itself); waiting out a failure that may pass is alive.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize)]
pub struct Liveness {
    live: bool,
    checks: Vec<Check>,
}

impl Liveness {
    /// No checks yet (live).
    pub fn new() -> Self {
        Self {
            live: true,
            checks: Vec::new(),
        }
    }

    /// Adds a check.
    #[must_use]
    pub fn with(mut self, check: Check) -> Self {
        self.live &= check.ok;
        self.checks.push(check);
        self
    }

    /// Adds `consumer <name>` ([`consumer_live`]).
    #[must_use]
    pub fn consumer(self, name: &str, status: &SubscriptionStatus) -> Self {
        self.with(consumer_live(name, status))
    }

    /// Adds `inbound <name>` ([`inbound_live`]).
    #[must_use]
    pub fn inbound(self, name: &str, status: &InboundStatus) -> Self {
        self.with(inbound_live(name, status))
    }

    /// True when every check passed.
    pub fn is_live(&self) -> bool {
        self.live
    }

    /// The HTTP status to serve it with: 200 when live, else 503 (restart this instance).
    pub fn http_status(&self) -> u16 {
        if self.live { 200 } else { 503 }
    }

    /// The checks, in the order they were added.
    pub fn checks(&self) -> &[Check] {
        &self.checks
    }
}

/// Liveness of an inbound consumer: fails once it stopped (on request or on an error); waiting
/// out a bus or inbox failure is alive.
pub fn inbound_live(name: &str, status: &InboundStatus) -> Check {
    let (running, state) = describe_inbound(&status.state);
    Check::new(format!("inbound {name}"), running, state)
}

/// Liveness of a consumer: fails once it stopped (on request or on an error), since it does not
/// resume by itself. Waiting out a store failure (`Retrying`) is alive.
pub fn consumer_live(name: &str, status: &SubscriptionStatus) -> Check {
    let (running, state) = describe(&status.state);
    Check::new(format!("consumer {name}"), running, state)
}

fn describe(state: &SubscriptionState) -> (bool, String) {
    match state {
        SubscriptionState::Starting => (true, "starting".into()),
        SubscriptionState::CatchingUp => (true, "catching up".into()),
        SubscriptionState::Live => (true, "live".into()),
        SubscriptionState::Standby => (true, "standing by (another instance leads)".into()),
        SubscriptionState::Retrying(why) => (true, format!("retrying: {why}")),
        SubscriptionState::Stopped => (false, "stopped".into()),
        SubscriptionState::Failed(why) => (false, format!("failed: {why}")),
    }
}

fn describe_inbound(state: &InboundState) -> (bool, String) {
    match state {
        InboundState::Starting => (true, "starting".into()),
        InboundState::Running => (true, "running".into()),
        InboundState::Retrying(why) => (true, format!("retrying: {why}")),
        InboundState::Stopped => (false, "stopped".into()),
        InboundState::Failed(why) => (false, format!("failed: {why}")),
    }
}

#[cfg(feature = "axum")]
mod http {
    use axum_core::response::{IntoResponse, Response};
    use http::StatusCode;
    use http::header::{CONTENT_TYPE, HeaderValue};

    use super::{Liveness, Readiness};

    fn json(status: u16, body: Result<String, serde_json::Error>) -> Response {
        let (status, body) = match body {
            Ok(body) => (
                StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                body,
            ),
            Err(error) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{{\"error\":\"health check did not serialise: {error}\"}}"),
            ),
        };
        let mut response = (status, body).into_response();
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        response
    }

    /// `200` or `503` with the checks as JSON (feature `axum`).
    impl IntoResponse for Readiness {
        fn into_response(self) -> Response {
            json(self.http_status(), serde_json::to_string(&self))
        }
    }

    /// `200` or `503` with the checks as JSON (feature `axum`).
    impl IntoResponse for Liveness {
        fn into_response(self) -> Response {
            json(self.http_status(), serde_json::to_string(&self))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LogPosition;
    use crate::resilience::{CircuitBreakerConfig, Resilience};

    fn status(state: SubscriptionState, lag: Duration) -> SubscriptionStatus {
        let mut s = SubscriptionStatus::starting(LogPosition::START);
        s.state = state;
        s.lag = lag;
        s.lag_events = 12;
        s
    }

    #[test]
    fn consumers_are_ready_while_running_and_caught_up() {
        let max = Duration::from_secs(5);
        let live = status(SubscriptionState::Live, Duration::from_secs(1));
        assert!(Readiness::new().consumer("a", &live, max).is_ready());
        let behind = status(SubscriptionState::CatchingUp, Duration::from_secs(9));
        let ready = Readiness::new().consumer("a", &behind, max);
        assert!(!ready.is_ready());
        assert_eq!(
            ready.checks()[0].detail,
            "catching up, 12 events and 9000 ms behind (more than 5000 ms)"
        );
        let retrying = status(
            SubscriptionState::Retrying("db down".into()),
            Duration::ZERO,
        );
        assert!(!Readiness::new().consumer("a", &retrying, max).is_ready());
        assert!(
            consumer_live("a", &retrying).ok,
            "waiting out a failure is alive"
        );
        let failed = status(
            SubscriptionState::Failed("bad event".into()),
            Duration::ZERO,
        );
        let live_check = consumer_live("a", &failed);
        assert!(!live_check.ok);
        assert_eq!(live_check.detail, "failed: bad event");
    }

    fn inbound(state: InboundState, lag_messages: u64) -> InboundStatus {
        InboundStatus {
            state,
            handled: 7,
            duplicates: 0,
            parked: 1,
            redeliveries: 0,
            lag_messages,
            last_recorded_at: None,
        }
    }

    #[test]
    fn inbound_consumers_are_ready_while_connected_and_not_far_behind() {
        let running = inbound(InboundState::Running, 3);
        let ready = Readiness::new().inbound("audit", &running, 100);
        assert!(ready.is_ready());
        assert_eq!(
            ready.checks()[0].detail,
            "running, 3 messages behind, 7 handled, 1 parked"
        );
        let behind = inbound(InboundState::Running, 500);
        assert!(!Readiness::new().inbound("audit", &behind, 100).is_ready());
        let disconnected = inbound(InboundState::Retrying("broker down".into()), 0);
        let ready = Readiness::new().inbound("audit", &disconnected, 100);
        assert!(!ready.is_ready());
        assert_eq!(ready.http_status(), 503);
        let live = Liveness::new().inbound("audit", &disconnected);
        assert!(live.is_live(), "waiting out the broker is alive");
        let failed = inbound(InboundState::Failed("inbox schema".into()), 0);
        let live = Liveness::new()
            .consumer("balances", &status(SubscriptionState::Live, Duration::ZERO))
            .inbound("audit", &failed);
        assert!(!live.is_live());
        assert_eq!(live.http_status(), 503);
        assert_eq!(live.checks()[1].detail, "failed: inbox schema");
        let json = serde_json::to_value(&live).expect("json");
        assert_eq!(json["live"], false);
        assert_eq!(json["checks"][0]["ok"], true);
    }

    #[test]
    fn a_relay_waiting_out_the_broker_is_not_ready() {
        let mut relay = RelayStatus {
            state: RelayState::Running,
            published: 40,
            duplicates: 2,
            skipped: 0,
            retries: 0,
            last_recorded_at: None,
        };
        let ready = Readiness::new().relay("orders.relay", &relay);
        assert!(ready.is_ready());
        assert_eq!(
            ready.checks()[0].detail,
            "publishing, 40 published, 2 duplicates, 0 retries"
        );
        relay.state = RelayState::Retrying("connection refused".into());
        let ready = Readiness::new().relay("orders.relay", &relay);
        assert!(!ready.is_ready());
        assert!(
            ready.checks()[0]
                .detail
                .starts_with("retrying: connection refused")
        );
        relay.state = RelayState::Failed("event 7 holds personal fields".into());
        let ready = Readiness::new().relay("orders.relay", &relay);
        assert!(!ready.is_ready());
        assert!(ready.checks()[0].detail.starts_with("failed: event 7"));
    }

    #[tokio::test]
    async fn an_open_circuit_is_not_ready() {
        let resilience = Resilience::new("db").with_breaker_config(CircuitBreakerConfig {
            consecutive_failures: 1,
            cool_down: Duration::from_secs(60),
            ..CircuitBreakerConfig::default()
        });
        assert!(Readiness::new().circuit(&resilience.health()).is_ready());
        let _ = resilience
            .run(crate::resilience::Operation::Read, || async {
                Err::<(), _>(crate::Error::transient("read", "reset"))
            })
            .await;
        let ready = Readiness::new()
            .check("database", true, "fine")
            .circuit(&resilience.health());
        assert!(!ready.is_ready());
        assert_eq!(ready.checks()[1].name, "circuit db");
        assert!(
            ready.checks()[1].detail.starts_with("open"),
            "{:?}",
            ready.checks()
        );
        let json = serde_json::to_value(&ready).expect("json");
        assert_eq!(json["ready"], false);
        assert_eq!(json["checks"][0]["ok"], true);
    }
}
