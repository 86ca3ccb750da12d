//! The whole pipeline in one process with no server: each service on an in-memory store of its
//! own, the three talking only through an [`InProcessBus`].
//!
//! [`start`] wires the services and returns their handles ([`Pipeline`]: stores, read models,
//! health) apart from their loops ([`Loops`]: relays, inbound consumers, projections, the
//! processing saga), which [`Loops::run`] runs until shutdown.

use std::collections::BTreeSet;
use std::time::Duration;

use factum::bus::{
    Bus, ConsumerConfig, InMemoryInbox, InProcessBus, InboundConsumer, InboundStatus, Relay,
    StreamConfig,
};
use factum::resilience::Resilience;
use factum::saga::{Clock, InMemorySagaStore, SagaOptions, SagaRuntime};
use factum::subscription::{NoLease, Projector, Subscription, SubscriptionStatus};
use factum::{CommandError, Error, EventFilter, InMemoryStore, Repository};
use tokio::sync::watch;

use crate::content::{self, Document, Job, JobCommand, Processing};
use crate::graph::{self, MemoryGraph, MemoryIndexer};
use crate::http::ServiceHealth;
use crate::observe;
use crate::realtime::{self, MemoryFeeds, MemoryRealtime, MemorySessions, Session, SessionCommand};

/// How fast the loops poll when idle: quick, for a demo and tests.
pub(crate) const IDLE: (Duration, Duration) = (Duration::from_millis(2), Duration::from_millis(50));

/// Ensures each publishing service's stream on `bus`.
pub async fn ensure_streams<B: Bus>(bus: &B) -> Result<(), Error> {
    bus.ensure_stream(&StreamConfig::for_service(&content::service()))
        .await?;
    bus.ensure_stream(&StreamConfig::for_service(&graph::service()))
        .await
}

/// The services' handles.
#[derive(Clone, Debug)]
pub struct Pipeline {
    /// The bus between them.
    pub bus: InProcessBus,
    /// content-processing's store.
    pub content: InMemoryStore,
    /// Its processing saga.
    pub processing: SagaRuntime<Processing, InMemorySagaStore>,
    /// knowledge-graph's store.
    pub graph_store: InMemoryStore,
    /// Its graph read model.
    pub graph: MemoryGraph,
    /// realtime-communication's store.
    pub realtime_store: InMemoryStore,
    /// Its sessions and feeds.
    pub realtime: MemoryRealtime,
    /// Each service's health, in the order content, graph, realtime.
    pub health: [ServiceHealth; 3],
    graph_projection: watch::Receiver<SubscriptionStatus>,
    feeds_from_graph: watch::Receiver<InboundStatus>,
    feeds_from_content: watch::Receiver<InboundStatus>,
}

/// Error of a command the pipeline runs for its caller.
fn command_error<E: std::error::Error + Send + Sync + 'static>(error: CommandError<E>) -> Error {
    match error {
        CommandError::Failed(error) => error,
        other => Error::permanent("command", other),
    }
}

impl Pipeline {
    /// Submits documents to content-processing; a job whose classification fails waits
    /// `requeue_after` before its second attempt.
    pub async fn submit(
        &self,
        documents: &[Document],
        requeue_after: Duration,
    ) -> Result<(), Error> {
        submit(&self.content, documents, requeue_after).await
    }

    /// Opens a session at realtime-communication.
    pub async fn open_session(
        &self,
        session: &str,
        user: &str,
        topics: &[&str],
        alerts: bool,
    ) -> Result<(), Error> {
        open_session(&self.realtime_store, session, user, topics, alerts).await
    }

    /// Whether the pipeline has nothing left to do: every job classified or failed, each
    /// classified document indexed and projected into the graph, and each discovered entity and
    /// failed document handled by realtime-communication.
    pub async fn settled(&self) -> Result<bool, Error> {
        let (done, classified, failed) = observe::jobs_done(&self.content).await?;
        if !done || observe::count(&self.graph_store, "topic.document_indexed").await? != classified
        {
            return Ok(false);
        }
        let head = observe::last_position(&self.graph_store, "topic.document_indexed").await?;
        let discovered = observe::count(&self.graph_store, "topic.entity_discovered").await?;
        let projected = self.graph_projection.borrow().position >= head;
        let from_graph = self.feeds_from_graph.borrow();
        let from_content = self.feeds_from_content.borrow();
        Ok(projected
            && (from_graph.handled + from_graph.duplicates) as usize >= discovered
            && (from_content.handled + from_content.duplicates) as usize >= failed)
    }
}

/// Submits `documents` as jobs on `store`.
pub async fn submit<S: factum::EventStore + Clone>(
    store: &S,
    documents: &[Document],
    requeue_after: Duration,
) -> Result<(), Error> {
    let jobs = Repository::<Job, _>::new(store.clone());
    for document in documents {
        jobs.execute(JobCommand::Submit {
            job: document.id.clone(),
            document: document.clone(),
            requeue_after_ms: requeue_after.as_millis().try_into().unwrap_or(u64::MAX),
        })
        .await
        .map_err(command_error)?;
    }
    Ok(())
}

/// Opens a session on `store`.
pub async fn open_session<S: factum::EventStore + Clone>(
    store: &S,
    session: &str,
    user: &str,
    topics: &[&str],
    alerts: bool,
) -> Result<(), Error> {
    Repository::<Session, _>::new(store.clone())
        .execute(SessionCommand::Open {
            session: session.to_owned(),
            user: user.to_owned(),
            topics: topics
                .iter()
                .map(|t| (*t).to_owned())
                .collect::<BTreeSet<_>>(),
            alerts,
        })
        .await
        .map_err(command_error)?;
    Ok(())
}

/// The services' loops.
pub struct Loops {
    bus: InProcessBus,
    content_relay: (Subscription<InMemoryStore>, Relay<InProcessBus>),
    processing_feed: Subscription<InMemoryStore>,
    processing: SagaRuntime<Processing, InMemorySagaStore>,
    graph_inbound: InboundConsumer<InProcessBus, InMemoryInbox>,
    graph_indexer: MemoryIndexer,
    graph_projection: (Subscription<InMemoryStore>, MemoryGraph),
    graph_relay: (Subscription<InMemoryStore>, Relay<InProcessBus>),
    sessions: (Subscription<InMemoryStore>, MemoryRealtime),
    feeds_from_graph: InboundConsumer<InProcessBus, InMemoryInbox>,
    feeds_from_content: InboundConsumer<InProcessBus, InMemoryInbox>,
}

impl std::fmt::Debug for Loops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loops").finish_non_exhaustive()
    }
}

fn relay_of(
    bus: &InProcessBus,
    store: &InMemoryStore,
    routes: factum::bus::PublicEvents,
) -> (Subscription<InMemoryStore>, Relay<InProcessBus>, Resilience) {
    let resilience = Resilience::new("bus");
    let relay = Relay::new(bus.clone(), routes).with_resilience(resilience.clone());
    let subscription = Subscription::new(relay.name(), store.clone())
        .filter(relay.filter())
        .idle_backoff(IDLE.0, IDLE.1);
    (subscription, relay, resilience)
}

/// Wires the three services on in-memory stores and a new in-process bus, the processing saga
/// on `clock`.
pub async fn start(clock: impl Clock) -> Result<(Pipeline, Loops), Error> {
    let bus = InProcessBus::new();
    ensure_streams(&bus).await?;

    // content-processing.
    let content = InMemoryStore::new();
    let processing = SagaRuntime::<Processing, _>::new(InMemorySagaStore::new(content.clone()))
        .clock(clock)
        .options(SagaOptions::default().poll(Duration::from_millis(10)))
        .repository(Repository::<Job, _>::new(content.clone()));
    let processing_feed = Subscription::new(processing.name(), content.clone())
        .filter(processing.filter())
        .idle_backoff(IDLE.0, IDLE.1);
    let (relay_feed, relay, bus_circuit) =
        relay_of(&bus, &content, content::public_events(content::service()));
    let content_health = ServiceHealth::new(content::SERVICE)
        .probe(|| async { vec![factum::health::Check::new("database", true, "in memory")] })
        .probe(|| async { vec![factum::health::Check::new("bus", true, "in process")] })
        .circuit(&bus_circuit)
        .consumer(relay_feed.name(), relay_feed.status())
        .relay(&relay.name(), relay.status())
        .consumer(processing_feed.name(), processing_feed.status())
        .saga(&processing.name(), processing.status());

    // knowledge-graph.
    let graph_store = InMemoryStore::new();
    let graph_view = MemoryGraph::default();
    let graph_inbound = InboundConsumer::new(
        bus.clone(),
        InMemoryInbox::new(),
        ConsumerConfig::new("CONTENT", "graph-from-content").filter_subject(graph::CONTENT_SUBJECT),
    );
    let graph_projection = Subscription::for_projection::<MemoryGraph>(graph_store.clone())
        .idle_backoff(IDLE.0, IDLE.1);
    let (graph_relay_feed, graph_relay, graph_circuit) =
        relay_of(&bus, &graph_store, graph::public_events(graph::service()));
    let graph_health = ServiceHealth::new(graph::SERVICE)
        .probe(|| async { vec![factum::health::Check::new("database", true, "in memory")] })
        .probe(|| async { vec![factum::health::Check::new("bus", true, "in process")] })
        .circuit(&graph_circuit)
        .inbound(graph_inbound.name(), graph_inbound.status())
        .consumer(graph_projection.name(), graph_projection.status())
        .consumer(graph_relay_feed.name(), graph_relay_feed.status())
        .relay(&graph_relay.name(), graph_relay.status());

    // realtime-communication.
    let realtime_store = InMemoryStore::new();
    let view = MemoryRealtime::new();
    let sessions = Subscription::new("realtime-sessions", realtime_store.clone())
        .filter(EventFilter::for_event::<realtime::SessionsInput>())
        .idle_backoff(IDLE.0, IDLE.1);
    let feeds_from_graph = InboundConsumer::new(
        bus.clone(),
        InMemoryInbox::new(),
        ConsumerConfig::new("GRAPH", "realtime-from-graph").filter_subject(realtime::GRAPH_SUBJECT),
    );
    let feeds_from_content = InboundConsumer::new(
        bus.clone(),
        InMemoryInbox::new(),
        ConsumerConfig::new("CONTENT", "realtime-from-content")
            .filter_subject(realtime::CONTENT_SUBJECT),
    );
    let realtime_health = ServiceHealth::new(realtime::SERVICE)
        .probe(|| async { vec![factum::health::Check::new("database", true, "in memory")] })
        .probe(|| async { vec![factum::health::Check::new("bus", true, "in process")] })
        .consumer(sessions.name(), sessions.status())
        .inbound(feeds_from_graph.name(), feeds_from_graph.status())
        .inbound(feeds_from_content.name(), feeds_from_content.status());

    let pipeline = Pipeline {
        bus: bus.clone(),
        content: content.clone(),
        processing: processing.clone(),
        graph_store: graph_store.clone(),
        graph: graph_view.clone(),
        realtime_store,
        realtime: view.clone(),
        health: [content_health, graph_health, realtime_health],
        graph_projection: graph_projection.status(),
        feeds_from_graph: feeds_from_graph.status(),
        feeds_from_content: feeds_from_content.status(),
    };
    let loops = Loops {
        bus,
        content_relay: (relay_feed, relay),
        processing_feed,
        processing,
        graph_inbound,
        graph_indexer: MemoryIndexer::new(graph_store),
        graph_projection: (graph_projection, graph_view),
        graph_relay: (graph_relay_feed, graph_relay),
        sessions: (sessions, view),
        feeds_from_graph,
        feeds_from_content,
    };
    Ok((pipeline, loops))
}

impl Loops {
    /// The bus.
    pub fn bus(&self) -> &InProcessBus {
        &self.bus
    }

    /// Runs every loop until `shutdown` is true (or one fails: its error is returned). The
    /// inbound consumers' futures are not `Send`, so they all run in the calling task.
    pub async fn run(self, shutdown: watch::Receiver<bool>) -> Result<(), Error> {
        let Loops {
            bus: _,
            content_relay: (mut relay_feed, relay),
            mut processing_feed,
            processing,
            mut graph_inbound,
            graph_indexer,
            graph_projection: (mut projection, graph),
            graph_relay: (mut graph_relay_feed, graph_relay),
            sessions: (mut sessions, view),
            mut feeds_from_graph,
            mut feeds_from_content,
        } = self;
        let stop = || {
            let mut shutdown = shutdown.clone();
            async move {
                let _ = shutdown.wait_for(|s| *s).await;
            }
        };
        tokio::try_join!(
            async { relay_feed.run(relay, stop()).await.map(drop) },
            async {
                processing_feed
                    .run(processing.clone(), stop())
                    .await
                    .map(drop)
            },
            processing.run(NoLease, stop()),
            graph_inbound.run(graph_indexer, stop()),
            async {
                projection
                    .run(Projector::new(graph), stop())
                    .await
                    .map(drop)
            },
            async { graph_relay_feed.run(graph_relay, stop()).await.map(drop) },
            async {
                sessions
                    .run(MemorySessions(view.clone()), stop())
                    .await
                    .map(drop)
            },
            feeds_from_graph.run(MemoryFeeds(view.clone()), stop()),
            feeds_from_content.run(MemoryFeeds(view.clone()), stop()),
        )
        .map(drop)
    }
}
