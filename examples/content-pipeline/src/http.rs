//! Each service's health, as a value ([`ServiceHealth::ready`], [`ServiceHealth::live`]) and over
//! HTTP ([`ServiceHealth::router`]: `GET /health/ready`, `GET /health/live`), and the graph's
//! query routes ([`graph_routes`]: `GET /graph/neighbours/{entity}`,
//! `GET /graph/path/{from}/{to}`).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use factum::BoxFuture;
use factum::bus::{InboundStatus, RelayStatus};
use factum::health::{Check, Liveness, Readiness};
use factum::resilience::Resilience;
use factum::saga::{SagaState, SagaStatus};
use factum::subscription::SubscriptionStatus;
use tokio::sync::watch;

use crate::graph::GraphQueries;

/// A check that has to ask something (the database, the broker, the view's store).
type Probe = Arc<dyn Fn() -> BoxFuture<'static, Vec<Check>> + Send + Sync>;

/// What a service's health endpoints look at: its probes (database reachable, migrations
/// current, bus connected), its circuit breakers, and the status of each of its consumers.
/// Clones share everything.
#[derive(Clone, Default)]
pub struct ServiceHealth {
    service: String,
    probes: Vec<Probe>,
    circuits: Vec<Resilience>,
    consumers: Vec<(String, watch::Receiver<SubscriptionStatus>)>,
    inbound: Vec<(String, watch::Receiver<InboundStatus>)>,
    relays: Vec<(String, watch::Receiver<RelayStatus>)>,
    sagas: Vec<(String, watch::Receiver<SagaStatus>)>,
    max_lag: Duration,
    max_waiting: u64,
}

impl std::fmt::Debug for ServiceHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceHealth")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl ServiceHealth {
    /// The health of `service`: ready while every consumer is at most 30 s (or 1000 messages)
    /// behind.
    pub fn new(service: impl Into<String>) -> Self {
        Self {
            service: service.into(),
            max_lag: Duration::from_secs(30),
            max_waiting: 1_000,
            ..Self::default()
        }
    }

    /// The service's name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Adds a probe: an async check run on every readiness request.
    #[must_use]
    pub fn probe<F, Fut>(mut self, probe: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<Check>> + Send + 'static,
    {
        self.probes
            .push(Arc::new(move || Box::pin(probe()) as BoxFuture<'static, _>));
        self
    }

    /// Adds a circuit breaker (`circuit <dependency>`).
    #[must_use]
    pub fn circuit(mut self, resilience: &Resilience) -> Self {
        self.circuits.push(resilience.clone());
        self
    }

    /// Adds a consumer of the service's log (a subscription, a projection runner).
    #[must_use]
    pub fn consumer(mut self, name: &str, status: watch::Receiver<SubscriptionStatus>) -> Self {
        self.consumers.push((name.to_owned(), status));
        self
    }

    /// Adds an inbound consumer of the bus.
    #[must_use]
    pub fn inbound(mut self, name: &str, status: watch::Receiver<InboundStatus>) -> Self {
        self.inbound.push((name.to_owned(), status));
        self
    }

    /// Adds a relay (check `relay`; its subscription is added with [`consumer`](Self::consumer)).
    #[must_use]
    pub fn relay(mut self, name: &str, status: watch::Receiver<RelayStatus>) -> Self {
        self.relays.push((name.to_owned(), status));
        self
    }

    /// Adds a saga runtime's dispatch loop.
    #[must_use]
    pub fn saga(mut self, name: &str, status: watch::Receiver<SagaStatus>) -> Self {
        self.sagas.push((name.to_owned(), status));
        self
    }

    /// Readiness: every probe, circuit, consumer, inbound consumer, relay and saga loop.
    pub async fn ready(&self) -> Readiness {
        let mut ready = Readiness::new();
        for probe in &self.probes {
            for check in probe().await {
                ready = ready.with(check);
            }
        }
        for circuit in &self.circuits {
            ready = ready.circuit(&circuit.health());
        }
        for (name, status) in &self.consumers {
            ready = ready.consumer(name, &status.borrow(), self.max_lag);
        }
        for (name, status) in &self.inbound {
            ready = ready.inbound(name, &status.borrow(), self.max_waiting);
        }
        for (name, status) in &self.relays {
            ready = ready.relay(name, &status.borrow());
        }
        for (name, status) in &self.sagas {
            ready = ready.with(saga_check(name, &status.borrow()));
        }
        ready
    }

    /// Liveness: one check per consumer, inbound consumer and saga loop; fails once one stopped.
    pub fn live(&self) -> Liveness {
        let mut live = Liveness::new();
        for (name, status) in &self.consumers {
            live = live.consumer(name, &status.borrow());
        }
        for (name, status) in &self.inbound {
            live = live.inbound(name, &status.borrow());
        }
        for (name, status) in &self.sagas {
            live = live.with(saga_check(name, &status.borrow()));
        }
        live
    }

    /// `GET /health/ready` and `GET /health/live`: the [`Readiness`] and the [`Liveness`] as
    /// JSON, with 200 or 503 (factum's `axum` feature makes them responses).
    pub fn router(self) -> Router {
        Router::new()
            .route("/health/ready", get(ready))
            .route("/health/live", get(live))
            .with_state(self)
    }
}

/// `saga <name>`: its dispatch loop has not stopped (waiting out a store failure is alive).
fn saga_check(name: &str, status: &SagaStatus) -> Check {
    let (ok, detail) = match &status.state {
        SagaState::Stopped => (false, "stopped".to_owned()),
        SagaState::Failed(why) => (false, format!("failed: {why}")),
        state => (
            true,
            format!(
                "{state:?}: {} dispatched, {} timeouts fired, {} parked",
                status.dispatched, status.fired, status.parked
            ),
        ),
    };
    Check::new(format!("saga {name}"), ok, detail)
}

async fn ready(State(health): State<ServiceHealth>) -> Readiness {
    health.ready().await
}

async fn live(State(health): State<ServiceHealth>) -> Liveness {
    health.live()
}

/// The graph's query routes: `GET /graph/neighbours/{entity}` (a JSON list of
/// `{"entity", "weight"}`) and `GET /graph/path/{from}/{to}` (a JSON list of entities, or 404).
pub fn graph_routes<G: GraphQueries>(graph: G) -> Router {
    Router::new()
        .route("/graph/neighbours/{entity}", get(neighbours::<G>))
        .route("/graph/path/{from}/{to}", get(path::<G>))
        .with_state(graph)
}

async fn neighbours<G: GraphQueries>(
    State(graph): State<G>,
    Path(entity): Path<String>,
) -> Result<Json<Vec<crate::graph::Neighbour>>, (StatusCode, String)> {
    graph
        .neighbours(&entity)
        .await
        .map(Json)
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
}

async fn path<G: GraphQueries>(
    State(graph): State<G>,
    Path((from, to)): Path<(String, String)>,
) -> Result<Json<Vec<String>>, (StatusCode, String)> {
    match graph.shortest_path(&from, &to).await {
        Ok(Some(path)) => Ok(Json(path)),
        Ok(None) => Err((
            StatusCode::NOT_FOUND,
            format!(
                "no path from {from} to {to} within {} hops",
                crate::graph::MAX_HOPS
            ),
        )),
        Err(e) => Err((StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
    }
}

/// Serves `router` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}
