//! The services example's health endpoints: what each service serves on `/health/ready` and
//! `/health/live`, built from the statuses its relay and consumers publish as they run.
//!
//! `cargo run -p services -- --serve 127.0.0.1:8080` keeps them served after the run:
//! `curl -i 127.0.0.1:8080/health/ready`.

use std::time::Duration;

use axum::Router;
use axum::routing::get;
use factum::bus::{InboundStatus, RelayStatus};
use factum::health::{Liveness, Readiness};
use factum::resilience::Resilience;
use factum::subscription::SubscriptionStatus;
use tokio::sync::watch;

/// What a service's health endpoints look at: the statuses its parts publish
/// (`relay.status()`, `subscription.status()`, `consumer.status()`), cloned into the router.
#[derive(Clone, Default)]
pub struct Probes {
    /// The store's and the bus's resilience layers (clones share their circuit breakers), whose
    /// breakers are read on each request.
    pub circuits: Vec<Resilience>,
    /// The relay and the subscription that runs it.
    pub relay: Option<(
        watch::Receiver<RelayStatus>,
        watch::Receiver<SubscriptionStatus>,
    )>,
    /// The inbound consumers, by name.
    pub inbound: Vec<(String, watch::Receiver<InboundStatus>)>,
    /// Allowed lag before a consumer is not ready: the relay's in time, an inbound consumer's
    /// in messages waiting at the broker.
    pub max_lag: (Duration, u64),
}

impl Probes {
    /// Readiness now: every circuit closed, the relay publishing and caught up, every inbound
    /// consumer connected and not too far behind.
    pub fn readiness(&self) -> Readiness {
        let mut ready = Readiness::new();
        for circuit in &self.circuits {
            ready = ready.circuit(&circuit.health());
        }
        if let Some((relay, subscription)) = &self.relay {
            ready = ready.relay("bank", &relay.borrow()).consumer(
                "relay",
                &subscription.borrow(),
                self.max_lag.0,
            );
        }
        for (name, status) in &self.inbound {
            ready = ready.inbound(name, &status.borrow(), self.max_lag.1);
        }
        ready
    }

    /// Liveness now: no consumer has stopped.
    pub fn liveness(&self) -> Liveness {
        let mut live = Liveness::new();
        if let Some((_, subscription)) = &self.relay {
            live = live.consumer("relay", &subscription.borrow());
        }
        for (name, status) in &self.inbound {
            live = live.inbound(name, &status.borrow());
        }
        live
    }
}

/// `GET /health/ready` (200 or 503) and `GET /health/live` (200 or 503), JSON bodies naming
/// each check and what it found.
pub fn router(probes: Probes) -> Router {
    let live = probes.clone();
    Router::new()
        .route(
            "/health/ready",
            get(move || {
                let probes = probes.clone();
                async move { probes.readiness() }
            }),
        )
        .route(
            "/health/live",
            get(move || {
                let probes = live.clone();
                async move { probes.liveness() }
            }),
        )
}
