//! Readiness and liveness, for a service's health endpoints.
//!
//! A [`Readiness`] gathers named [`Check`]s: the database (e.g. `factum_postgres::PostgresStore::
//! readiness_check`: reachable, migrations current), each circuit breaker ([`Readiness::circuit`]:
//! closed), each consumer ([`Readiness::consumer`]: running, and not lagging more than allowed).
//! Serve [`is_ready`](Readiness::is_ready) as the status of `/health/ready` and the value itself
//! (it serialises to `{"ready": .., "checks": [..]}`) as its body; serve [`consumer_live`] of
//! each consumer as `/health/live`: a consumer that stopped on an error will not recover by
//! waiting, so restarting the process is the remedy. The bus's consumers have theirs:
//! [`Readiness::inbound`] and [`inbound_live`] for an inbound consumer, [`Readiness::relay`] for a
//! relay (whose lag and liveness are its subscription's).
//!
//! ```
//! use std::time::Duration;
//! use factum::health::{Readiness, consumer_live};
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
//! assert!(consumer_live("balances", &balances).ok);
//! let body = serde_json::to_value(&ready).unwrap();
//! assert_eq!(body["checks"][1]["name"], "circuit postgres");
//! ```

use std::time::Duration;

use serde::Serialize;

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

    /// Adds `inbound <name>`: passes while the inbound consumer runs (not waiting out a broker or
    /// inbox failure) with at most `max_lag` messages waiting for it at the broker. Its
    /// liveness is [`inbound_live`].
    ///
    /// ```
    /// use factum::bus::{ConsumerConfig, InMemoryInbox, InProcessBus, InboundConsumer};
    /// use factum::health::{Readiness, inbound_live};
    ///
    /// let consumer = InboundConsumer::new(InProcessBus::new(), InMemoryInbox::new(),
    ///     ConsumerConfig::new("ORDERS", "billing-from-orders"));
    /// let status = consumer.status().borrow().clone();
    /// let ready = Readiness::new().inbound(consumer.name(), &status, 1_000);
    /// assert!(ready.is_ready(), "starting counts as running");
    /// assert_eq!(ready.checks()[0].detail, "starting, 0 messages waiting");
    /// assert!(inbound_live(consumer.name(), &status).ok);
    /// ```
    #[must_use]
    pub fn inbound(self, name: &str, status: &InboundStatus, max_lag: u64) -> Self {
        let (running, state) = describe_inbound(&status.state);
        let lagging = status.lag_messages > max_lag;
        let ok = running && !matches!(status.state, InboundState::Retrying(_)) && !lagging;
        let mut detail = format!("{state}, {} messages waiting", status.lag_messages);
        if lagging {
            detail.push_str(&format!(" (more than {max_lag})"));
        }
        if status.parked > 0 {
            detail.push_str(&format!(", {} parked", status.parked));
        }
        self.check(format!("inbound {name}"), ok, detail)
    }

    /// Adds `relay <name>`: passes while the relay's last publish reached the broker (it is not
    /// retrying one: the bus is connected). Its lag and liveness are those of the subscription
    /// running it ([`consumer`](Self::consumer), [`consumer_live`]).
    #[must_use]
    pub fn relay(self, name: &str, status: &RelayStatus) -> Self {
        let (ok, detail) = match &status.state {
            RelayState::Retrying(why) => (false, format!("retrying a publish: {why}")),
            RelayState::Running => (
                true,
                format!(
                    "publishing, {} published, {} duplicates dropped by the broker",
                    status.published, status.duplicates
                ),
            ),
        };
        self.check(format!("relay {name}"), ok, detail)
    }

    /// True when every check passed.
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// The checks, in the order they were added.
    pub fn checks(&self) -> &[Check] {
        &self.checks
    }
}

/// Liveness of a consumer: fails once it stopped (on request or on an error), since it does not
/// resume by itself. Waiting out a store failure (`Retrying`) is alive.
pub fn consumer_live(name: &str, status: &SubscriptionStatus) -> Check {
    let (running, state) = describe(&status.state);
    Check::new(format!("consumer {name}"), running, state)
}

/// Liveness of an inbound consumer: fails once it stopped (on request or on an error); waiting
/// out a broker or inbox failure (`Retrying`) is alive.
pub fn inbound_live(name: &str, status: &InboundStatus) -> Check {
    let (running, state) = describe_inbound(&status.state);
    Check::new(format!("inbound {name}"), running, state)
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
            handled: 3,
            duplicates: 0,
            parked: 1,
            redeliveries: 0,
            lag_messages,
            last_recorded_at: None,
        }
    }

    #[test]
    fn inbound_consumers_are_ready_while_running_within_their_lag() {
        let running = inbound(InboundState::Running, 10);
        let ready = Readiness::new().inbound("feeds", &running, 100);
        assert!(ready.is_ready());
        assert_eq!(ready.checks()[0].name, "inbound feeds");
        assert_eq!(
            ready.checks()[0].detail,
            "running, 10 messages waiting, 1 parked"
        );
        let behind = Readiness::new().inbound("feeds", &inbound(InboundState::Running, 101), 100);
        assert!(!behind.is_ready());
        assert!(behind.checks()[0].detail.contains("(more than 100)"));
        let retrying = inbound(InboundState::Retrying("broker down".into()), 0);
        assert!(!Readiness::new().inbound("feeds", &retrying, 100).is_ready());
        assert!(inbound_live("feeds", &retrying).ok, "waiting out is alive");
        let failed = inbound_live("feeds", &inbound(InboundState::Failed("inbox".into()), 0));
        assert!(!failed.ok);
        assert_eq!(failed.detail, "failed: inbox");
    }

    #[test]
    fn a_relay_retrying_a_publish_is_not_ready() {
        let mut status = RelayStatus {
            state: RelayState::Running,
            published: 4,
            duplicates: 1,
            skipped: 0,
            retries: 0,
            last_recorded_at: None,
        };
        assert!(Readiness::new().relay("content", &status).is_ready());
        status.state = RelayState::Retrying("connection refused".into());
        let ready = Readiness::new().relay("content", &status);
        assert!(!ready.is_ready());
        assert_eq!(
            ready.checks()[0].detail,
            "retrying a publish: connection refused"
        );
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
