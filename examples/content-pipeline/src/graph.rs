//! The **knowledge-graph** service: builds entities and relationships from classified documents.
//!
//! Its inbound consumer receives content-processing's `document.classified` and indexes the
//! document in its topic: a [`Topic`] aggregate of this service's own store records
//! `topic.document_indexed` and, for each entity new to the topic, `topic.entity_discovered`
//! (which its relay publishes as [`GraphPublished`]). The graph read model — entities, the topics
//! they appear in, and co-occurrence edges weighted by the number of documents two entities share
//! — is a projection of this service's log: [`MemoryGraph`] in memory, [`PgGraph`] in PostgreSQL
//! tables of the service's own database, queried with a recursive CTE for shortest paths.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use factum::bus::{PublicEvents, ServiceName};
use factum::subscription::{BatchFailure, BatchHandler, EventHandler};
use factum::{
    Aggregate, BoxError, Command, CommandContext, CommandError, Envelope, Error, Event,
    InMemoryStore, Projection, RecordedEvent, Repository,
};
use factum_postgres::PostgresStore;
use factum_postgres::projection::{PgProjection, ProjectionTx};
use factum_postgres::subscription::PgTx;
use serde::{Deserialize, Serialize};

/// This service's name on the bus.
pub const SERVICE: &str = "graph";

/// The service's name, as a [`ServiceName`].
pub fn service() -> ServiceName {
    ServiceName::new(SERVICE).expect("a valid service name")
}

/// This service's copy of the content contract: the one event it consumes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Event)]
pub enum ContentInput {
    /// A document was classified.
    #[event(name = "document.classified")]
    Classified {
        /// The document's id.
        document: String,
        /// Its title.
        title: String,
        /// Its topic.
        topic: String,
        /// Its entities.
        terms: Vec<String>,
    },
}

/// The subject filter of the consumer of content's classified documents.
pub const CONTENT_SUBJECT: &str = "content.job.document.classified";

// ---------------------------------------------------------------------------------------------
// Topics.

/// What can be asked of a topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Command)]
#[command(id = topic)]
pub enum TopicCommand {
    /// Index a document in the topic (again: a no-op).
    Index {
        /// The topic.
        topic: String,
        /// The document's id.
        document: String,
        /// Its title.
        title: String,
        /// Its entities.
        terms: Vec<String>,
    },
}

/// What happened in a topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Event)]
#[event(prefix = "topic")]
pub enum TopicEvent {
    /// `topic.document_indexed`
    DocumentIndexed {
        /// The document's id.
        document: String,
        /// Its title.
        title: String,
        /// Its entities.
        terms: Vec<String>,
    },
    /// `topic.entity_discovered`: an entity appeared in the topic for the first time.
    EntityDiscovered {
        /// The entity.
        entity: String,
        /// The document it appeared in.
        document: String,
    },
}

/// A topic never refuses a document.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("never")]
pub struct Never;

/// A topic: the documents indexed in it and the entities seen in it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Aggregate)]
#[aggregate(type = "topic", command = TopicCommand, event = TopicEvent, error = Never)]
pub struct Topic {
    /// Documents indexed.
    pub documents: BTreeSet<String>,
    /// Entities seen.
    pub entities: BTreeSet<String>,
}

impl Topic {
    fn decide(&self, command: &TopicCommand) -> Result<Vec<TopicEvent>, Never> {
        let TopicCommand::Index {
            document,
            title,
            terms,
            ..
        } = command;
        if self.documents.contains(document) {
            return Ok(Vec::new());
        }
        let mut events = vec![TopicEvent::DocumentIndexed {
            document: document.clone(),
            title: title.clone(),
            terms: terms.clone(),
        }];
        events.extend(
            terms
                .iter()
                .filter(|t| !self.entities.contains(*t))
                .map(|entity| TopicEvent::EntityDiscovered {
                    entity: entity.clone(),
                    document: document.clone(),
                }),
        );
        Ok(events)
    }

    fn evolve(&mut self, event: &TopicEvent) {
        match event {
            TopicEvent::DocumentIndexed { document, .. } => {
                self.documents.insert(document.clone());
            }
            TopicEvent::EntityDiscovered { entity, .. } => {
                self.entities.insert(entity.clone());
            }
        }
    }
}

/// What the graph publishes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Event)]
#[event(name = "entity.discovered")]
pub struct GraphPublished {
    /// The topic.
    pub topic: String,
    /// The entity new to it.
    pub entity: String,
    /// The document it appeared in.
    pub document: String,
}

/// The relay's routes: discovered entities, mapped to [`GraphPublished`] (category `topic`).
pub fn public_events(service: ServiceName) -> PublicEvents {
    PublicEvents::new(service)
        .map::<TopicEvent, GraphPublished>("topic", |e: &Envelope<TopicEvent>| match &e.event {
            TopicEvent::EntityDiscovered { entity, document } => Some(GraphPublished {
                topic: e.stream_id.aggregate_id().to_owned(),
                entity: entity.clone(),
                document: document.clone(),
            }),
            TopicEvent::DocumentIndexed { .. } => None,
        })
        .expect("valid routes")
}

/// The command a classified document asks of its topic, in a context caused by the message's
/// event (same workflow; a command id derived from the event, used as idempotency key).
fn index_command(event: &RecordedEvent) -> Result<(TopicCommand, CommandContext), Error> {
    let envelope = event.decode::<ContentInput>()?;
    let context = CommandContext::caused_by(&envelope).idempotent();
    let ContentInput::Classified {
        document,
        title,
        topic,
        terms,
    } = envelope.event;
    Ok((
        TopicCommand::Index {
            topic,
            document,
            title,
            terms,
        },
        context,
    ))
}

/// The handler's error: the store's own (so a transient failure is waited out, not parked).
fn failed(error: CommandError<Never>) -> BoxError {
    match error {
        CommandError::Failed(error) => error.into(),
        other => other.into(),
    }
}

/// The inbound handler on the in-memory store: executes each document's index command with an
/// id derived from the message, so a repeat (the in-memory inbox is not transactional) stores
/// nothing twice.
#[derive(Debug)]
pub struct MemoryIndexer {
    topics: Repository<Topic, InMemoryStore>,
}

impl MemoryIndexer {
    /// An indexer writing to `store`.
    pub fn new(store: InMemoryStore) -> Self {
        Self {
            topics: Repository::new(store),
        }
    }
}

impl EventHandler for MemoryIndexer {
    async fn handle(&mut self, event: &RecordedEvent) -> Result<(), BoxError> {
        let (command, context) = index_command(event)?;
        self.topics
            .execute_with(command, &context)
            .await
            .map_err(failed)?;
        Ok(())
    }
}

/// The inbound handler on PostgreSQL: executes each document's index command inside the
/// inbox's transaction, so the topic's events and the inbox row commit together.
#[derive(Clone, Debug)]
pub struct PgIndexer {
    store: PostgresStore,
}

impl PgIndexer {
    /// An indexer writing to `store`.
    pub fn new(store: &PostgresStore) -> Self {
        Self {
            store: store.clone(),
        }
    }
}

impl BatchHandler<PgTx> for PgIndexer {
    async fn handle_batch(
        &mut self,
        tx: &mut PgTx,
        events: &[RecordedEvent],
    ) -> Result<(), BatchFailure> {
        for event in events {
            let (command, context) = index_command(event).map_err(BatchFailure::somewhere)?;
            Repository::<Topic, _>::new(self.store.in_transaction(tx.conn()))
                .execute_with(command, &context)
                .await
                .map_err(|e| BatchFailure::somewhere(failed(e)))?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The graph read model.

/// The graph read model's input: the documents indexed in topics (this service's own log).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Event)]
pub enum GraphInput {
    /// `topic.document_indexed`
    #[event(name = "topic.document_indexed")]
    DocumentIndexed {
        /// The document's id.
        document: String,
        /// Its title.
        title: String,
        /// Its entities.
        terms: Vec<String>,
    },
}

/// An entity of the graph.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EntityNode {
    /// Documents it appears in.
    pub mentions: u32,
    /// Topics it appears in.
    pub topics: BTreeSet<String>,
}

/// A neighbour of an entity: an entity it shares documents with.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Neighbour {
    /// The neighbour.
    pub entity: String,
    /// How many documents they share.
    pub weight: u32,
}

/// The whole graph, for printing and comparing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphSnapshot {
    /// Entity → what is known of it.
    pub entities: BTreeMap<String, EntityNode>,
    /// `(a, b)` with `a < b` → documents they share.
    pub edges: BTreeMap<(String, String), u32>,
}

impl GraphSnapshot {
    /// Applies one indexed document of `topic`.
    fn index(&mut self, topic: &str, terms: &[String]) {
        for term in terms {
            let node = self.entities.entry(term.clone()).or_default();
            node.mentions += 1;
            node.topics.insert(topic.to_owned());
        }
        for (i, a) in terms.iter().enumerate() {
            for b in &terms[i + 1..] {
                let key = if a < b {
                    (a.clone(), b.clone())
                } else {
                    (b.clone(), a.clone())
                };
                *self.edges.entry(key).or_default() += 1;
            }
        }
    }

    /// The neighbours of `entity`, heaviest first, then by name.
    pub fn neighbours(&self, entity: &str) -> Vec<Neighbour> {
        let mut found: Vec<Neighbour> = self
            .edges
            .iter()
            .filter_map(|((a, b), weight)| {
                let other = if a == entity {
                    b
                } else if b == entity {
                    a
                } else {
                    return None;
                };
                Some(Neighbour {
                    entity: other.clone(),
                    weight: *weight,
                })
            })
            .collect();
        found.sort_by(|x, y| {
            y.weight
                .cmp(&x.weight)
                .then_with(|| x.entity.cmp(&y.entity))
        });
        found
    }

    /// A shortest path from `from` to `to` (breadth first; of several, the first in
    /// lexicographic order), at most `max_hops` edges long.
    pub fn shortest_path(&self, from: &str, to: &str, max_hops: usize) -> Option<Vec<String>> {
        if !self.entities.contains_key(from) || !self.entities.contains_key(to) {
            return None;
        }
        let mut adjacent: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for (a, b) in self.edges.keys() {
            adjacent.entry(a).or_default().insert(b);
            adjacent.entry(b).or_default().insert(a);
        }
        let mut parent: BTreeMap<&str, Option<&str>> = BTreeMap::from([(from, None)]);
        let mut queue = VecDeque::from([(from, 0)]);
        while let Some((at, hops)) = queue.pop_front() {
            if at == to {
                let mut path = vec![to.to_owned()];
                let mut step = at;
                while let Some(Some(previous)) = parent.get(step) {
                    path.push((*previous).to_owned());
                    step = previous;
                }
                path.reverse();
                return Some(path);
            }
            if hops == max_hops {
                continue;
            }
            for next in adjacent.get(at).into_iter().flatten() {
                if !parent.contains_key(next) {
                    parent.insert(next, Some(at));
                    queue.push_back((next, hops + 1));
                }
            }
        }
        None
    }
}

/// The longest path [`GraphQueries::shortest_path`] looks for.
pub const MAX_HOPS: usize = 6;

/// The graph's queries, whatever holds it.
pub trait GraphQueries: Clone + Send + Sync + 'static {
    /// The neighbours of `entity`, heaviest first, then by name.
    fn neighbours(
        &self,
        entity: &str,
    ) -> impl Future<Output = Result<Vec<Neighbour>, Error>> + Send;

    /// A shortest path from `from` to `to` of at most [`MAX_HOPS`] edges (of several, the first
    /// in lexicographic order), or `None`.
    fn shortest_path(
        &self,
        from: &str,
        to: &str,
    ) -> impl Future<Output = Result<Option<Vec<String>>, Error>> + Send;

    /// The whole graph.
    fn snapshot(&self) -> impl Future<Output = Result<GraphSnapshot, Error>> + Send;
}

/// The graph in memory: a [`Projection`] of the service's log; clones share it.
#[derive(Clone, Debug, Default)]
pub struct MemoryGraph {
    graph: Arc<Mutex<GraphSnapshot>>,
}

impl MemoryGraph {
    fn lock(&self) -> std::sync::MutexGuard<'_, GraphSnapshot> {
        self.graph.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Projection for MemoryGraph {
    const NAME: &'static str = "graph";
    type Event = GraphInput;

    fn apply(&mut self, event: &Envelope<GraphInput>) -> Result<(), BoxError> {
        let GraphInput::DocumentIndexed { terms, .. } = &event.event;
        self.lock().index(event.stream_id.aggregate_id(), terms);
        Ok(())
    }
}

impl GraphQueries for MemoryGraph {
    async fn neighbours(&self, entity: &str) -> Result<Vec<Neighbour>, Error> {
        Ok(self.lock().neighbours(entity))
    }

    async fn shortest_path(&self, from: &str, to: &str) -> Result<Option<Vec<String>>, Error> {
        Ok(self.lock().shortest_path(from, to, MAX_HOPS))
    }

    async fn snapshot(&self) -> Result<GraphSnapshot, Error> {
        Ok(self.lock().clone())
    }
}

/// The graph in PostgreSQL: tables `graph.entities`, `graph.entity_topics` and `graph.edges`
/// (both directions of each edge, so a path query walks one index) in the service's own
/// database, created by this example's migrations ([`PgGraph::migrate`]), written as a
/// [`PgProjection`] in the projection runner's transaction.
#[derive(Clone, Debug)]
pub struct PgGraph {
    pool: sqlx::PgPool,
}

/// The graph's own migrations (schema `graph`), tracked in the database's `public` schema, apart
/// from factum's.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/graph");

fn sql_error(operation: &'static str) -> impl Fn(sqlx::Error) -> Error {
    move |e| Error::transient(operation, e)
}

impl PgGraph {
    /// The graph in `store`'s database.
    pub fn new(store: &PostgresStore) -> Self {
        Self {
            pool: store.pool().clone(),
        }
    }

    /// Applies the graph's migrations.
    pub async fn migrate(&self) -> Result<(), Error> {
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|e| Error::permanent("migrate the graph tables", e))
    }

    /// Whether every migration of the graph is applied: the `graph migrations` readiness check.
    pub async fn migrations_check(&self) -> factum::health::Check {
        let latest = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
        let applied: Result<Option<i64>, _> =
            sqlx::query_scalar("SELECT max(version) FROM public._sqlx_migrations WHERE success")
                .fetch_one(&self.pool)
                .await;
        match applied {
            Ok(Some(v)) if v == latest => {
                factum::health::Check::new("graph migrations", true, format!("at {v}"))
            }
            Ok(v) => factum::health::Check::new(
                "graph migrations",
                false,
                format!("applied {v:?}, this build has {latest}: run the graph's migrations"),
            ),
            Err(e) => factum::health::Check::new("graph migrations", false, e.to_string()),
        }
    }
}

impl PgProjection for PgGraph {
    const NAME: &'static str = "graph";
    const TABLES: &'static [&'static str] =
        &["graph.entities", "graph.entity_topics", "graph.edges"];
    type Event = GraphInput;

    async fn apply(
        &mut self,
        tx: &mut ProjectionTx<'_>,
        event: &Envelope<GraphInput>,
    ) -> Result<(), BoxError> {
        let GraphInput::DocumentIndexed { terms, .. } = &event.event;
        let topic = event.stream_id.aggregate_id();
        let entities = format!(
            "INSERT INTO {} AS e (entity, mentions) SELECT t, 1 FROM unnest($1::text[]) AS t \
             ON CONFLICT (entity) DO UPDATE SET mentions = e.mentions + 1",
            tx.table("graph.entities")
        );
        sqlx::query(sqlx::AssertSqlSafe(entities))
            .bind(terms)
            .execute(tx.conn())
            .await?;
        let topics = format!(
            "INSERT INTO {} (entity, topic) SELECT t, $2 FROM unnest($1::text[]) AS t \
             ON CONFLICT DO NOTHING",
            tx.table("graph.entity_topics")
        );
        sqlx::query(sqlx::AssertSqlSafe(topics))
            .bind(terms)
            .bind(topic)
            .execute(tx.conn())
            .await?;
        let edges = format!(
            "INSERT INTO {} AS g (source, target, weight) \
             SELECT a, b, 1 FROM unnest($1::text[]) AS a, unnest($1::text[]) AS b WHERE a <> b \
             ON CONFLICT (source, target) DO UPDATE SET weight = g.weight + 1",
            tx.table("graph.edges")
        );
        sqlx::query(sqlx::AssertSqlSafe(edges))
            .bind(terms)
            .execute(tx.conn())
            .await?;
        Ok(())
    }
}

/// Shortest path by a recursive CTE: breadth first from `$1`, never revisiting an entity on the
/// path, at most `$3` edges; the shortest, then the first in (byte-wise) order.
const SHORTEST_PATH: &str = "\
WITH RECURSIVE walk (entity, path, hops) AS (
    SELECT $1::text COLLATE \"C\", ARRAY[$1::text COLLATE \"C\"], 0
    WHERE EXISTS (SELECT 1 FROM graph.entities WHERE entity = $1)
  UNION ALL
    SELECT e.target, w.path || e.target, w.hops + 1
    FROM walk w JOIN graph.edges e ON e.source = w.entity
    WHERE w.hops < $3 AND NOT e.target = ANY (w.path) AND w.entity <> $2
)
SELECT path FROM walk WHERE entity = $2 ORDER BY hops, path LIMIT 1";

impl GraphQueries for PgGraph {
    async fn neighbours(&self, entity: &str) -> Result<Vec<Neighbour>, Error> {
        let rows: Vec<(String, i32)> = sqlx::query_as(
            "SELECT target, weight FROM graph.edges WHERE source = $1 \
             ORDER BY weight DESC, target",
        )
        .bind(entity)
        .fetch_all(&self.pool)
        .await
        .map_err(sql_error("graph neighbours"))?;
        Ok(rows
            .into_iter()
            .map(|(entity, weight)| Neighbour {
                entity,
                weight: weight.try_into().unwrap_or(0),
            })
            .collect())
    }

    async fn shortest_path(&self, from: &str, to: &str) -> Result<Option<Vec<String>>, Error> {
        sqlx::query_scalar(SHORTEST_PATH)
            .bind(from)
            .bind(to)
            .bind(i32::try_from(MAX_HOPS).unwrap_or(i32::MAX))
            .fetch_optional(&self.pool)
            .await
            .map_err(sql_error("graph shortest path"))
    }

    async fn snapshot(&self) -> Result<GraphSnapshot, Error> {
        let mut graph = GraphSnapshot::default();
        let entities: Vec<(String, i32)> =
            sqlx::query_as("SELECT entity, mentions FROM graph.entities")
                .fetch_all(&self.pool)
                .await
                .map_err(sql_error("graph snapshot"))?;
        for (entity, mentions) in entities {
            graph.entities.entry(entity).or_default().mentions = mentions.try_into().unwrap_or(0);
        }
        let topics: Vec<(String, String)> =
            sqlx::query_as("SELECT entity, topic FROM graph.entity_topics")
                .fetch_all(&self.pool)
                .await
                .map_err(sql_error("graph snapshot"))?;
        for (entity, topic) in topics {
            graph
                .entities
                .entry(entity)
                .or_default()
                .topics
                .insert(topic);
        }
        let edges: Vec<(String, String, i32)> =
            sqlx::query_as("SELECT source, target, weight FROM graph.edges WHERE source < target")
                .fetch_all(&self.pool)
                .await
                .map_err(sql_error("graph snapshot"))?;
        for (a, b, weight) in edges {
            graph.edges.insert((a, b), weight.try_into().unwrap_or(0));
        }
        Ok(graph)
    }
}
