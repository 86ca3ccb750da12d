//! The flow fixture across services: in-memory services on an in-process bus, each with its
//! relay and its sagas, run end to end while a test drives them.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use factum::bus::{
    Bus, ConsumerConfig, InMemoryInbox, InProcessBus, InboundConsumer, PublicEvents, Relay,
    ServiceName, StreamConfig,
};
use factum::saga::{InMemorySagaStore, Saga, SagaRuntime};
use factum::subscription::{NoLease, Subscription};
use factum::{Error, InMemoryStore};
use tokio::sync::watch;

type Task = Pin<Box<dyn Future<Output = Result<(), Error>>>>;
type Start = Box<dyn FnOnce(watch::Receiver<bool>) -> Task>;

/// Services on one [`InProcessBus`], each with an [`InMemoryStore`] of its own, a [`Relay`] of
/// its public events and any number of sagas, each saga fed by its service's log and, through an
/// [`InMemoryInbox`], by every other service's events: the whole flow of a multi-service
/// workflow in one test, with no server. [`run`](Self::run) runs it all while the test's
/// scenario runs.
///
/// ```
/// use checkout::*;
/// use factum::Repository;
/// use factum_testkit::InProcessServices;
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let services = InProcessServices::new()
///     .service("shop", shop_public_events)
///     .service("billing", billing_public_events)
///     .saga::<Checkout>("shop", |runtime, store| {
///         runtime
///             .repository(Repository::<Stock, _>::new(store.clone()))
///             .repository(Repository::<Order, _>::new(store.clone()))
///             .repository(Repository::<Shipment, _>::new(store.clone()))
///     })
///     .saga::<Billing>("billing", |runtime, store| {
///         runtime.repository(Repository::<Wallet, _>::new(store.clone()))
///     });
/// let (shop, billing) = (services.store("shop"), services.store("billing"));
/// services
///     .run(async {
///         Repository::<Wallet, _>::new(billing.clone())
///             .execute(WalletCommand::Deposit { wallet: "ada".into(), amount: 100 })
///             .await
///             .unwrap();
///         let details = OrderDetails {
///             order: "o-1".into(), sku: "lamp".into(), qty: 2, amount: 30,
///             wallet: "ada".into(), address: "nowhere".into(),
///         };
///         Repository::<Order, _>::new(shop.clone())
///             .execute(OrderCommand::Place { order: "o-1".into(), details })
///             .await
///             .unwrap();
///         // ... wait for the outcome, then check both services' read models.
///     })
///     .await;
/// # });
/// ```
pub struct InProcessServices {
    bus: InProcessBus,
    stores: BTreeMap<String, InMemoryStore>,
    starts: Vec<Start>,
    /// Per saga: its service, its name, and how to start an inbound consumer feeding it.
    sagas: Vec<(String, String, InboundStart)>,
}

type InboundStart = Box<dyn Fn(InProcessBus, String, String, watch::Receiver<bool>) -> Task>;

impl std::fmt::Debug for InProcessServices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessServices")
            .field("services", &self.stores.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Default for InProcessServices {
    fn default() -> Self {
        Self::new()
    }
}

/// Completes once `stop` says so.
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

impl InProcessServices {
    /// No service yet.
    pub fn new() -> Self {
        Self {
            bus: InProcessBus::new(),
            stores: BTreeMap::new(),
            starts: Vec::new(),
            sagas: Vec::new(),
        }
    }

    /// Adds service `name`, publishing what `public` routes (given the service's name).
    ///
    /// # Panics
    /// When `name` is not a valid [`ServiceName`] or is taken.
    #[must_use]
    pub fn service(mut self, name: &str, public: impl FnOnce(ServiceName) -> PublicEvents) -> Self {
        let service = ServiceName::new(name).expect("a valid service name");
        let store = InMemoryStore::new();
        assert!(
            self.stores.insert(name.to_owned(), store.clone()).is_none(),
            "service {name:?} is there already"
        );
        let relay = Relay::new(self.bus.clone(), public(service));
        self.starts.push(Box::new(move |stop| {
            Box::pin(async move {
                let mut feed = Subscription::new(relay.name(), store).filter(relay.filter());
                feed.run(relay, stopped(stop)).await.map(|_| ())
            })
        }));
        self
    }

    /// The event store of service `name`.
    ///
    /// # Panics
    /// When there is no such service.
    pub fn store(&self, name: &str) -> InMemoryStore {
        self.stores
            .get(name)
            .unwrap_or_else(|| panic!("no service {name:?}: add it with `service` first"))
            .clone()
    }

    /// Runs saga `S` in service `service`: `configure` gets its runtime (on the service's store)
    /// and the store, and registers its targets. It is fed by the service's log and by every
    /// other service's events.
    ///
    /// # Panics
    /// When there is no such service.
    #[must_use]
    pub fn saga<S: Saga>(
        mut self,
        service: &str,
        configure: impl FnOnce(
            SagaRuntime<S, InMemorySagaStore>,
            &InMemoryStore,
        ) -> SagaRuntime<S, InMemorySagaStore>,
    ) -> Self {
        let store = self.store(service);
        let runtime = configure(
            SagaRuntime::new(InMemorySagaStore::new(store.clone())),
            &store,
        );
        let (feed_runtime, tick_runtime) = (runtime.clone(), runtime.clone());
        self.starts.push(Box::new(move |stop| {
            Box::pin(async move {
                let mut feed =
                    Subscription::new(feed_runtime.name(), store).filter(feed_runtime.filter());
                feed.run(feed_runtime, stopped(stop)).await.map(|_| ())
            })
        }));
        self.starts.push(Box::new(move |stop| {
            Box::pin(async move { tick_runtime.run(NoLease, stopped(stop)).await })
        }));
        self.sagas.push((
            service.to_owned(),
            S::NAME.to_owned(),
            Box::new(move |bus, stream, durable, stop| {
                let runtime = runtime.clone();
                Box::pin(async move {
                    let mut inbound = InboundConsumer::new(
                        bus,
                        InMemoryInbox::new(),
                        ConsumerConfig::new(stream, durable),
                    );
                    inbound.run(runtime, stopped(stop)).await
                })
            }),
        ));
        self
    }

    /// Runs every service's relay and sagas while `scenario` runs, then stops them and returns
    /// what `scenario` returned.
    ///
    /// # Panics
    /// When a relay, a saga or an inbound consumer stops with an error.
    pub async fn run<T>(self, scenario: impl Future<Output = T>) -> T {
        for name in self.stores.keys() {
            let service = ServiceName::new(name.as_str()).expect("checked when added");
            self.bus
                .ensure_stream(&StreamConfig::for_service(&service))
                .await
                .expect("the in-process bus creates streams");
        }
        let (stop, stopping) = watch::channel(false);
        let mut tasks: Vec<Task> = self
            .starts
            .into_iter()
            .map(|start| start(stopping.clone()))
            .collect();
        for (service, saga, start) in &self.sagas {
            for other in self.stores.keys().filter(|other| *other != service) {
                let stream = StreamConfig::for_service(
                    &ServiceName::new(other.as_str()).expect("checked when added"),
                )
                .name;
                let durable = format!("{service}-{saga}-{other}");
                tasks.push(start(self.bus.clone(), stream, durable, stopping.clone()));
            }
        }
        let services = futures_util::future::try_join_all(tasks);
        let scenario = async {
            let outcome = scenario.await;
            let _ = stop.send(true);
            outcome
        };
        let (ran, outcome) = tokio::join!(services, scenario);
        if let Err(error) = ran {
            panic!("a service's consumer stopped: {error}");
        }
        outcome
    }
}
