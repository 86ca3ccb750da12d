//! Each service on a PostgreSQL database of its own, over any [`Bus`] (NATS JetStream with
//! `factum_nats::JetStreamBus` in production, the in-process bus in tests).
//!
//! * content-processing: jobs and the processing saga's instances, commands and timeouts in its
//!   database (`PgSagaStore`, commands executed in the dispatch's transaction with `PgTarget`);
//!   the saga fed by its log with `PgCheckpoints` (its reactions commit with the checkpoint);
//!   the relay on plain checkpoints under the database's lease.
//! * knowledge-graph: an inbound consumer on `PgInbox` whose handler executes the topic command
//!   in the inbox's transaction ([`PgIndexer`]); the graph read model in its own tables
//!   ([`PgGraph`], a `PgProjectionRunner`); its relay.
//! * realtime-communication: sessions in its database; its read model behind the
//!   [`RealtimeView`](crate::realtime::RealtimeView) seam: in Redis with [`RedisRealtimeService`]
//!   (sessions on `RedisCheckpoints`, feeds on `RedisInbox`: each batch and its checkpoint or
//!   inbox record in one `MULTI`/`EXEC`), or in memory with [`RealtimeService`], rebuilt from the
//!   bus at every start (its inbound consumers get durable names of their own per start, so they
//!   read the streams from the beginning, and the sessions are read from the log's beginning).
//!
//! Each service's loops are a future to run ([`ContentService::run`], ...), so a process can run
//! one service (as the crash test does) or all three.

use std::time::Duration;

use factum::bus::{
    Bus, ConsumerConfig, InMemoryInbox, InboundConsumer, PublicEvents, Relay, StreamConfig,
};
use factum::health::Check;
use factum::resilience::Resilience;
use factum::saga::{Clock, SagaOptions, SagaRuntime};
use factum::subscription::{StartFrom, StoreCheckpoints, Subscription, SubscriptionStatus};
use factum::{Error, EventFilter, InMemoryStore};
use factum_postgres::projection::PgProjectionRunner;
use factum_postgres::saga::{PgSagaStore, PgTarget};
use factum_postgres::subscription::{PgCheckpoints, PgLease};
use factum_postgres::{PgInbox, PoolConfig, PostgresStore, StoreOptions};
use tokio::sync::watch;

use crate::content::{self, Job, Processing};
use crate::embedded::IDLE;
use crate::graph::{self, PgGraph, PgIndexer};
use crate::http::ServiceHealth;
use crate::realtime::{self, MemoryFeeds, MemoryRealtime, MemorySessions};
use crate::redis_view::{RedisFeeds, RedisRealtime, RedisSessions};
use factum_redis::{RedisCheckpoints, RedisInbox, RedisKeyspace};

/// A shutdown signal: true once the service should stop.
pub type Shutdown = watch::Receiver<bool>;

fn stop(shutdown: &Shutdown) -> impl Future<Output = ()> + Send + 'static {
    let mut shutdown = shutdown.clone();
    async move {
        let _ = shutdown.wait_for(|s| *s).await;
    }
}

/// The names of the three services' databases on one server.
pub const DATABASES: [&str; 3] = ["pipeline_content", "pipeline_graph", "pipeline_realtime"];

/// Creates (when missing) the three services' databases on the server of `admin_url` and
/// returns their URLs, in the order content, graph, realtime.
pub async fn create_databases(admin_url: &str) -> Result<[String; 3], Error> {
    let admin = sqlx::PgPool::connect(admin_url)
        .await
        .map_err(|e| Error::transient("connect to PostgreSQL", e))?;
    for name in DATABASES {
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(name)
                .fetch_one(&admin)
                .await
                .map_err(|e| Error::transient("look up a database", e))?;
        if !exists {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&admin)
                .await
                .map_err(|e| Error::permanent("create a service database", e))?;
        }
    }
    admin.close().await;
    let base = admin_url
        .rsplit_once('/')
        .map(|(base, _)| base)
        .ok_or_else(|| Error::InvalidArgument(format!("{admin_url} has no database name")))?;
    Ok(DATABASES.map(|name| format!("{base}/{name}")))
}

/// Connects to a service's database, opened for `service`, and applies factum's migrations.
pub async fn connect(url: &str, service: factum::bus::ServiceName) -> Result<PostgresStore, Error> {
    let store = PostgresStore::connect_with(
        url,
        &PoolConfig::default(),
        StoreOptions::default().for_service(service),
    )
    .await?;
    store.migrate().await?;
    Ok(store)
}

/// The `database` check (reachable, factum's migrations current) of `store`.
fn database_probe(store: &PostgresStore) -> impl Fn() -> BoxCheck + Send + Sync + 'static {
    let store = store.clone();
    move || {
        let store = store.clone();
        Box::pin(async move { vec![store.readiness_check().await] })
    }
}

type BoxCheck = factum::BoxFuture<'static, Vec<Check>>;

fn relay_of<B: Bus + Clone>(
    bus: &B,
    store: &PostgresStore,
    routes: PublicEvents,
) -> (
    Subscription<PostgresStore, StoreCheckpoints<PostgresStore>, PgLease>,
    Relay<B>,
    Resilience,
) {
    let resilience = Resilience::new("bus");
    let relay = Relay::new(bus.clone(), routes).with_resilience(resilience.clone());
    // Plain checkpoints: the relay's effects are on the broker (see the bus chapter).
    let subscription = Subscription::new(relay.name(), store.clone())
        .filter(relay.filter())
        .lease(PgLease::new(store))
        .idle_backoff(IDLE.0, IDLE.1);
    (subscription, relay, resilience)
}

/// Ensures the publishing services' streams on `bus`.
pub async fn ensure_streams<B: Bus>(bus: &B) -> Result<(), Error> {
    crate::embedded::ensure_streams(bus).await
}

// ---------------------------------------------------------------------------------------------
// content-processing.

/// content-processing on PostgreSQL: its handles, and its loops ([`run`](Self::run)).
pub struct ContentService<B: Bus> {
    /// Its store.
    pub store: PostgresStore,
    /// Its processing saga.
    pub processing: SagaRuntime<Processing, PgSagaStore>,
    /// Its health.
    pub health: ServiceHealth,
    feed: Subscription<PostgresStore, PgCheckpoints, PgLease>,
    relay: (
        Subscription<PostgresStore, StoreCheckpoints<PostgresStore>, PgLease>,
        Relay<B>,
    ),
}

impl<B: Bus + Clone + 'static> ContentService<B> {
    /// Wires content-processing on `store` and `bus`, its saga on `clock`. `bus_connected`
    /// probes the bus (`bus` check).
    pub fn new(
        store: PostgresStore,
        bus: B,
        clock: impl Clock,
        bus_connected: impl Fn() -> bool + Send + Sync + 'static,
    ) -> Self {
        let processing = SagaRuntime::<Processing, _>::new(PgSagaStore::new(&store))
            .clock(clock)
            .options(SagaOptions::default().poll(Duration::from_millis(20)))
            .target(PgTarget::<Job>::new(&store));
        let feed = Subscription::with_checkpoints(
            processing.name(),
            store.clone(),
            PgCheckpoints::new(&store),
        )
        .filter(processing.filter())
        .lease(PgLease::new(&store))
        .idle_backoff(IDLE.0, IDLE.1);
        let (relay_feed, relay, circuit) =
            relay_of(&bus, &store, content::public_events(content::service()));
        let health = ServiceHealth::new(content::SERVICE)
            .probe(database_probe(&store))
            .probe(bus_probe(bus_connected))
            .circuit(&circuit)
            .consumer(relay_feed.name(), relay_feed.status())
            .relay(&relay.name(), relay.status())
            .consumer(feed.name(), feed.status())
            .saga(&processing.name(), processing.status());
        Self {
            store,
            processing,
            health,
            feed,
            relay: (relay_feed, relay),
        }
    }

    /// Runs its loops until `shutdown` (or a failure that cannot pass).
    pub async fn run(self, shutdown: Shutdown) -> Result<(), Error> {
        let Self {
            store,
            processing,
            mut feed,
            relay: (mut relay_feed, relay),
            ..
        } = self;
        tokio::try_join!(
            async { relay_feed.run(relay, stop(&shutdown)).await.map(drop) },
            async {
                feed.run(processing.clone(), stop(&shutdown))
                    .await
                    .map(drop)
            },
            processing.run(PgLease::new(&store), stop(&shutdown)),
        )
        .map(drop)
    }
}

fn bus_probe(
    connected: impl Fn() -> bool + Send + Sync + 'static,
) -> impl Fn() -> BoxCheck + Send + Sync + 'static {
    let connected = std::sync::Arc::new(connected);
    move || {
        let ok = connected();
        Box::pin(async move {
            vec![Check::new(
                "bus",
                ok,
                if ok {
                    "connected"
                } else {
                    "not connected: retrying"
                },
            )]
        })
    }
}

// ---------------------------------------------------------------------------------------------
// knowledge-graph.

/// knowledge-graph on PostgreSQL: its handles, and its loops ([`run`](Self::run)).
pub struct GraphService<B: Bus> {
    /// Its store.
    pub store: PostgresStore,
    /// Its graph read model (and queries).
    pub graph: PgGraph,
    /// Its health.
    pub health: ServiceHealth,
    inbound: InboundConsumer<B, PgInbox>,
    projection: PgProjectionRunner<PgGraph>,
    relay: (
        Subscription<PostgresStore, StoreCheckpoints<PostgresStore>, PgLease>,
        Relay<B>,
    ),
}

impl<B: Bus + Clone + 'static> GraphService<B> {
    /// Wires knowledge-graph on `store` (applying the graph's migrations) and `bus`.
    pub async fn new(
        store: PostgresStore,
        bus: B,
        bus_connected: impl Fn() -> bool + Send + Sync + 'static,
    ) -> Result<Self, Error> {
        let graph = PgGraph::new(&store);
        graph.migrate().await?;
        let content_stream = StreamConfig::for_service(&content::service()).name;
        let inbound = InboundConsumer::new(
            bus.clone(),
            PgInbox::new(&store),
            // A message left unacknowledged by a crash comes again after 5 s, not JetStream's
            // default 30 s (the inbox drops it if its effect had committed).
            ConsumerConfig::new(content_stream, "graph-from-content")
                .filter_subject(graph::CONTENT_SUBJECT)
                .ack_wait(Duration::from_secs(5)),
        );
        let projection =
            PgProjectionRunner::new(store.clone(), graph.clone()).idle_backoff(IDLE.0, IDLE.1);
        let (relay_feed, relay, circuit) =
            relay_of(&bus, &store, graph::public_events(graph::service()));
        let migrations = graph.clone();
        let health = ServiceHealth::new(graph::SERVICE)
            .probe(database_probe(&store))
            .probe(move || {
                let graph = migrations.clone();
                async move { vec![graph.migrations_check().await] }
            })
            .probe(bus_probe(bus_connected))
            .circuit(&circuit)
            .inbound(inbound.name(), inbound.status())
            .consumer(projection.name(), projection.status())
            .consumer(relay_feed.name(), relay_feed.status())
            .relay(&relay.name(), relay.status());
        Ok(Self {
            store,
            graph,
            health,
            inbound,
            projection,
            relay: (relay_feed, relay),
        })
    }

    /// The graph projection's status.
    pub fn projection_status(&self) -> watch::Receiver<SubscriptionStatus> {
        self.projection.status()
    }

    /// Runs its loops until `shutdown` (or a failure that cannot pass).
    pub async fn run(self, shutdown: Shutdown) -> Result<(), Error> {
        let Self {
            store,
            mut inbound,
            mut projection,
            relay: (mut relay_feed, relay),
            ..
        } = self;
        tokio::try_join!(
            inbound.run(PgIndexer::new(&store), stop(&shutdown)),
            async { projection.run(stop(&shutdown)).await.map(drop) },
            async { relay_feed.run(relay, stop(&shutdown)).await.map(drop) },
        )
        .map(drop)
    }
}

// ---------------------------------------------------------------------------------------------
// realtime-communication.

/// realtime-communication with its sessions on PostgreSQL and its view in memory, rebuilt from
/// the bus at each start (see the module docs).
pub struct RealtimeService<B: Bus> {
    /// Its store.
    pub store: PostgresStore,
    /// Its sessions and feeds.
    pub view: MemoryRealtime,
    /// Its health.
    pub health: ServiceHealth,
    sessions: Subscription<PostgresStore, StoreCheckpoints<InMemoryStore>>,
    from_graph: InboundConsumer<B, InMemoryInbox>,
    from_content: InboundConsumer<B, InMemoryInbox>,
}

impl<B: Bus + Clone + 'static> RealtimeService<B> {
    /// Wires realtime-communication on `store` and `bus`; `start` names this start (its inbound
    /// consumers' durable names end with it, so that they read the streams from the beginning).
    pub fn new(
        store: PostgresStore,
        bus: B,
        start: &str,
        bus_connected: impl Fn() -> bool + Send + Sync + 'static,
    ) -> Self {
        let view = MemoryRealtime::new();
        // The view is in memory: so are the checkpoint and the inbox it goes with.
        let sessions = Subscription::with_checkpoints(
            "realtime-sessions",
            store.clone(),
            StoreCheckpoints::new(InMemoryStore::new()),
        )
        .filter(EventFilter::for_event::<realtime::SessionsInput>())
        .start_from(StartFrom::Beginning)
        .idle_backoff(IDLE.0, IDLE.1);
        let consumer = |stream: &factum::bus::ServiceName, durable: &str, subject: &str| {
            InboundConsumer::new(
                bus.clone(),
                InMemoryInbox::new(),
                ConsumerConfig::new(
                    StreamConfig::for_service(stream).name,
                    format!("{durable}-{start}"),
                )
                .filter_subject(subject),
            )
        };
        let from_graph = consumer(
            &graph::service(),
            "realtime-from-graph",
            realtime::GRAPH_SUBJECT,
        );
        let from_content = consumer(
            &content::service(),
            "realtime-from-content",
            realtime::CONTENT_SUBJECT,
        );
        let health = ServiceHealth::new(realtime::SERVICE)
            .probe(database_probe(&store))
            .probe(bus_probe(bus_connected))
            .probe({
                let view = view.clone();
                move || {
                    let view = view.clone();
                    async move { vec![crate::realtime::RealtimeView::check(&view).await] }
                }
            })
            .consumer(sessions.name(), sessions.status())
            .inbound(from_graph.name(), from_graph.status())
            .inbound(from_content.name(), from_content.status());
        Self {
            store,
            view,
            health,
            sessions,
            from_graph,
            from_content,
        }
    }

    /// The inbound consumers' statuses (from the graph, from content).
    pub fn inbound_status(&self) -> [watch::Receiver<factum::bus::InboundStatus>; 2] {
        [self.from_graph.status(), self.from_content.status()]
    }

    /// Runs its loops until `shutdown` (or a failure that cannot pass).
    pub async fn run(self, shutdown: Shutdown) -> Result<(), Error> {
        let Self {
            view,
            mut sessions,
            mut from_graph,
            mut from_content,
            ..
        } = self;
        tokio::try_join!(
            async {
                sessions
                    .run(MemorySessions(view.clone()), stop(&shutdown))
                    .await
                    .map(drop)
            },
            from_graph.run(MemoryFeeds(view.clone()), stop(&shutdown)),
            from_content.run(MemoryFeeds(view.clone()), stop(&shutdown)),
        )
        .map(drop)
    }
}

/// realtime-communication with its sessions on PostgreSQL and its view in Redis
/// ([`RedisRealtime`]): the sessions projection on `RedisCheckpoints`, the feeds on `RedisInbox`,
/// each batch applied with its checkpoint or inbox record in one `MULTI`/`EXEC`.
pub struct RedisRealtimeService<B: Bus> {
    /// Its store.
    pub store: PostgresStore,
    /// Its sessions and feeds.
    pub view: RedisRealtime,
    /// Its health.
    pub health: ServiceHealth,
    sessions: Subscription<PostgresStore, RedisCheckpoints, PgLease>,
    from_graph: InboundConsumer<B, RedisInbox>,
    from_content: InboundConsumer<B, RedisInbox>,
}

impl<B: Bus + Clone + 'static> RedisRealtimeService<B> {
    /// Wires realtime-communication on `store`, `bus` and the Redis `keyspace`.
    pub fn new(
        store: PostgresStore,
        bus: B,
        keyspace: &RedisKeyspace,
        bus_connected: impl Fn() -> bool + Send + Sync + 'static,
    ) -> Self {
        let view = RedisRealtime::new(keyspace);
        let sessions = Subscription::with_checkpoints(
            "realtime-sessions",
            store.clone(),
            RedisCheckpoints::new(keyspace),
        )
        .filter(EventFilter::for_event::<realtime::SessionsInput>())
        .lease(PgLease::new(&store))
        .idle_backoff(IDLE.0, IDLE.1);
        let consumer = |stream: &factum::bus::ServiceName, durable: &str, subject: &str| {
            InboundConsumer::new(
                bus.clone(),
                RedisInbox::new(keyspace),
                ConsumerConfig::new(StreamConfig::for_service(stream).name, durable)
                    .filter_subject(subject),
            )
        };
        let from_graph = consumer(
            &graph::service(),
            "realtime-from-graph",
            realtime::GRAPH_SUBJECT,
        );
        let from_content = consumer(
            &content::service(),
            "realtime-from-content",
            realtime::CONTENT_SUBJECT,
        );
        let health = ServiceHealth::new(realtime::SERVICE)
            .probe(database_probe(&store))
            .probe(bus_probe(bus_connected))
            .probe({
                let view = view.clone();
                move || {
                    let view = view.clone();
                    async move { vec![crate::realtime::RealtimeView::check(&view).await] }
                }
            })
            .consumer(sessions.name(), sessions.status())
            .inbound(from_graph.name(), from_graph.status())
            .inbound(from_content.name(), from_content.status());
        Self {
            store,
            view,
            health,
            sessions,
            from_graph,
            from_content,
        }
    }

    /// The inbound consumers' statuses (from the graph, from content).
    pub fn inbound_status(&self) -> [watch::Receiver<factum::bus::InboundStatus>; 2] {
        [self.from_graph.status(), self.from_content.status()]
    }

    /// Runs its loops until `shutdown` (or a failure that cannot pass).
    pub async fn run(self, shutdown: Shutdown) -> Result<(), Error> {
        let Self {
            mut sessions,
            mut from_graph,
            mut from_content,
            ..
        } = self;
        tokio::try_join!(
            async { sessions.run(RedisSessions, stop(&shutdown)).await.map(drop) },
            from_graph.run(RedisFeeds, stop(&shutdown)),
            from_content.run(RedisFeeds, stop(&shutdown)),
        )
        .map(drop)
    }
}
