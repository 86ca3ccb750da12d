//! The **realtime-communication** service: user sessions and per-user notification feeds.
//!
//! Sessions are opened and closed by commands on this service's own store ([`Session`]); the
//! read model — the open sessions and each user's feed — is kept apart from the store, behind the
//! [`RealtimeView`] seam: [`MemoryRealtime`] here (the embedded run). Its two writers are
//! * a projection of the service's own log (`session.opened`, `session.closed`): [`MemorySessions`];
//! * an inbound handler of other services' events ([`RealtimeInput`]: the graph's
//!   `entity.discovered`, content's `document.failed`), which adds a notification to the feed of
//!   each user with an open session subscribed to the entity's topic (or to processing alerts,
//!   for a failed document) and pushes it live to those sessions: [`MemoryFeeds`].
//!
//! Who is told is decided by [`recipients`] and what by [`notification`], whatever holds the
//! view, so a Redis view (`factum-redis`) writes the same feeds.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use factum::bus::ServiceName;
use factum::subscription::EventHandler;
use factum::{Aggregate, BoxError, Command, Error, Event, RecordedEvent};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// This service's name on the bus.
pub const SERVICE: &str = "realtime";

/// The service's name, as a [`ServiceName`].
pub fn service() -> ServiceName {
    ServiceName::new(SERVICE).expect("a valid service name")
}

// ---------------------------------------------------------------------------------------------
// Sessions.

/// What can be asked of a session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Command)]
#[command(id = session)]
pub enum SessionCommand {
    /// A user connects, following `topics` (and processing alerts, when `alerts`).
    Open {
        /// The session's id.
        session: String,
        /// Who.
        user: String,
        /// The topics followed.
        topics: BTreeSet<String>,
        /// Told when a document fails.
        alerts: bool,
    },
    /// The user disconnects.
    Close {
        /// The session's id.
        session: String,
    },
}

/// What happened to a session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Event)]
#[event(prefix = "session")]
pub enum SessionEvent {
    /// `session.opened`
    Opened {
        /// Who.
        user: String,
        /// The topics followed.
        topics: BTreeSet<String>,
        /// Told when a document fails.
        alerts: bool,
    },
    /// `session.closed`
    Closed,
}

/// Why a session refused a command.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// Opened twice.
    #[error("session {0} is already open")]
    AlreadyOpen(String),
    /// Closed while not open.
    #[error("session {0} is not open")]
    NotOpen(String),
}

/// A session.
#[derive(Clone, Debug, Default, PartialEq, Eq, Aggregate)]
#[aggregate(type = "session", command = SessionCommand, event = SessionEvent, error = SessionError)]
pub struct Session {
    /// Open now.
    pub open: bool,
}

impl Session {
    fn decide(&self, command: &SessionCommand) -> Result<Vec<SessionEvent>, SessionError> {
        match command {
            SessionCommand::Open { session, .. } if self.open => {
                Err(SessionError::AlreadyOpen(session.clone()))
            }
            SessionCommand::Open {
                user,
                topics,
                alerts,
                ..
            } => Ok(vec![SessionEvent::Opened {
                user: user.clone(),
                topics: topics.clone(),
                alerts: *alerts,
            }]),
            SessionCommand::Close { session } if !self.open => {
                Err(SessionError::NotOpen(session.clone()))
            }
            SessionCommand::Close { .. } => Ok(vec![SessionEvent::Closed]),
        }
    }

    fn evolve(&mut self, event: &SessionEvent) {
        self.open = matches!(event, SessionEvent::Opened { .. });
    }
}

/// The sessions read model's input: this service's own session events.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Event)]
pub enum SessionsInput {
    /// `session.opened`
    #[event(name = "session.opened")]
    Opened {
        /// Who.
        user: String,
        /// The topics followed.
        topics: BTreeSet<String>,
        /// Told when a document fails.
        alerts: bool,
    },
    /// `session.closed`
    #[event(name = "session.closed")]
    Closed,
}

/// An open session, as the read model keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// Who.
    pub user: String,
    /// The topics followed.
    pub topics: BTreeSet<String>,
    /// Told when a document fails.
    pub alerts: bool,
}

// ---------------------------------------------------------------------------------------------
// Notifications.

/// This service's copy of the contracts it consumes: the graph's new entities and content's
/// failed documents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Event)]
pub enum RealtimeInput {
    /// An entity appeared in a topic for the first time (from the graph).
    #[event(name = "entity.discovered")]
    EntityDiscovered {
        /// The topic.
        topic: String,
        /// The entity.
        entity: String,
        /// The document it appeared in.
        document: String,
    },
    /// A document could not be classified (from content).
    #[event(name = "document.failed")]
    DocumentFailed {
        /// The document.
        document: String,
        /// Why.
        reason: String,
    },
}

/// The subject filter of the consumer of the graph's new entities.
pub const GRAPH_SUBJECT: &str = "graph.topic.entity.discovered";
/// The subject filter of the consumer of content's failed documents.
pub const CONTENT_SUBJECT: &str = "content.job.document.failed";

/// A notification in a user's feed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Notification {
    /// A new entity in a topic the user follows.
    Entity {
        /// The topic.
        topic: String,
        /// The entity.
        entity: String,
        /// The document it appeared in.
        document: String,
    },
    /// A document failed processing.
    Failure {
        /// The document.
        document: String,
        /// Why.
        reason: String,
    },
}

impl std::fmt::Display for Notification {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Notification::Entity {
                topic,
                entity,
                document,
            } => write!(f, "new in {topic}: {entity} (in {document})"),
            Notification::Failure { document, reason } => {
                write!(f, "document {document} failed: {reason}")
            }
        }
    }
}

/// What `input` tells the users it concerns.
pub fn notification(input: &RealtimeInput) -> Notification {
    match input {
        RealtimeInput::EntityDiscovered {
            topic,
            entity,
            document,
        } => Notification::Entity {
            topic: topic.clone(),
            entity: entity.clone(),
            document: document.clone(),
        },
        RealtimeInput::DocumentFailed { document, reason } => Notification::Failure {
            document: document.clone(),
            reason: reason.clone(),
        },
    }
}

/// Who `input` concerns: user → their open sessions that follow it (the entity's topic; alerts,
/// for a failed document).
pub fn recipients(
    sessions: &BTreeMap<String, SessionInfo>,
    input: &RealtimeInput,
) -> BTreeMap<String, Vec<String>> {
    let mut found: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (id, session) in sessions {
        let follows = match input {
            RealtimeInput::EntityDiscovered { topic, .. } => session.topics.contains(topic),
            RealtimeInput::DocumentFailed { .. } => session.alerts,
        };
        if follows {
            found
                .entry(session.user.clone())
                .or_default()
                .push(id.clone());
        }
    }
    found
}

/// A notification pushed live to a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pushed {
    /// The session.
    pub session: String,
    /// Its user.
    pub user: String,
    /// What they are told.
    pub notification: Notification,
}

/// The realtime read model's queries, whatever holds it.
pub trait RealtimeView: Clone + Send + Sync + 'static {
    /// The open sessions, by id.
    fn sessions(&self)
    -> impl Future<Output = Result<BTreeMap<String, SessionInfo>, Error>> + Send;

    /// Every user's feed, oldest first.
    fn feeds(
        &self,
    ) -> impl Future<Output = Result<BTreeMap<String, Vec<Notification>>, Error>> + Send;

    /// Whether the view's store answers: the `view` readiness check.
    fn check(&self) -> impl Future<Output = factum::health::Check> + Send;
}

/// The realtime read model in memory; clones share it. Live pushes go to
/// [`subscribe`](Self::subscribe)rs.
#[derive(Clone, Debug)]
pub struct MemoryRealtime {
    state: Arc<Mutex<ViewState>>,
    pushes: broadcast::Sender<Pushed>,
}

#[derive(Debug, Default)]
struct ViewState {
    sessions: BTreeMap<String, SessionInfo>,
    feeds: BTreeMap<String, Vec<Notification>>,
    /// (user, event id) already in a feed: the in-memory inbox is not transactional, so the
    /// feed is idempotent by event id itself.
    delivered: HashSet<(String, factum::EventId)>,
}

impl Default for MemoryRealtime {
    fn default() -> Self {
        Self {
            state: Arc::default(),
            pushes: broadcast::channel(1024).0,
        }
    }
}

impl MemoryRealtime {
    /// An empty view.
    pub fn new() -> Self {
        Self::default()
    }

    /// The notifications pushed to sessions from now on (at least once each: a handler that is
    /// retried pushes again; the feeds hold each once).
    pub fn subscribe(&self) -> broadcast::Receiver<Pushed> {
        self.pushes.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ViewState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl RealtimeView for MemoryRealtime {
    async fn sessions(&self) -> Result<BTreeMap<String, SessionInfo>, Error> {
        Ok(self.lock().sessions.clone())
    }

    async fn feeds(&self) -> Result<BTreeMap<String, Vec<Notification>>, Error> {
        Ok(self.lock().feeds.clone())
    }

    async fn check(&self) -> factum::health::Check {
        factum::health::Check::new("view", true, "in memory")
    }
}

/// The sessions projection of the in-memory view (a handler of the service's own log).
#[derive(Clone, Debug)]
pub struct MemorySessions(pub MemoryRealtime);

impl EventHandler for MemorySessions {
    async fn handle(&mut self, event: &RecordedEvent) -> Result<(), BoxError> {
        let envelope = event.decode::<SessionsInput>()?;
        let id = envelope.stream_id.aggregate_id().to_owned();
        let mut state = self.0.lock();
        match envelope.event {
            SessionsInput::Opened {
                user,
                topics,
                alerts,
            } => {
                state.sessions.insert(
                    id,
                    SessionInfo {
                        user,
                        topics,
                        alerts,
                    },
                );
            }
            SessionsInput::Closed => {
                state.sessions.remove(&id);
            }
        }
        Ok(())
    }
}

/// The feeds writer of the in-memory view (the handler of the inbound consumers).
#[derive(Clone, Debug)]
pub struct MemoryFeeds(pub MemoryRealtime);

impl EventHandler for MemoryFeeds {
    async fn handle(&mut self, event: &RecordedEvent) -> Result<(), BoxError> {
        let input = event.decode::<RealtimeInput>()?.event;
        let told = notification(&input);
        let mut pushes = Vec::new();
        {
            let mut state = self.0.lock();
            for (user, sessions) in recipients(&state.sessions, &input) {
                if !state.delivered.insert((user.clone(), event.event_id)) {
                    continue;
                }
                state
                    .feeds
                    .entry(user.clone())
                    .or_default()
                    .push(told.clone());
                pushes.extend(sessions.into_iter().map(|session| Pushed {
                    session,
                    user: user.clone(),
                    notification: told.clone(),
                }));
            }
        }
        for pushed in pushes {
            // Nobody listening is fine: the feed has it.
            let _ = self.0.pushes.send(pushed);
        }
        Ok(())
    }
}
