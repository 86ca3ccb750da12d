//! The relay: publishes a service's public events to the bus, as a consumer of its log.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use crate::error::{BoxError, Error};
use crate::event::{Envelope, Event, RecordedEvent};
use crate::resilience::{Operation, Resilience};
use crate::store::EventFilter;
use crate::subscription::{BatchFailure, BatchHandler, RETRY_MAX, RETRY_MIN};

use super::{Bus, BusMessage, ServiceName, subject};

type MapFn = dyn Fn(&RecordedEvent) -> Result<Option<Mapped>, BoxError> + Send + Sync;

struct Mapped {
    event_type: &'static str,
    schema_version: u32,
    payload: Box<serde_json::value::RawValue>,
}

#[derive(Clone)]
enum Route {
    /// Published as stored, on this subject.
    AsIs(String),
    /// Decoded and mapped to a public contract type first.
    Map(Arc<MapFn>),
}

/// Which of a service's events are public, and how they look on the bus: the relay publishes
/// these and nothing else.
///
/// An event is public when its stream's category and its wire name are routed here, either as
/// stored ([`publish`](Self::publish)) or mapped to a public contract type first
/// ([`map`](Self::map)), which keeps internal event types free to change while other services
/// depend on the contract.
///
/// ```
/// use factum::bus::{PublicEvents, ServiceName};
/// let routes = PublicEvents::new(ServiceName::new("orders")?)
///     .publish("order", ["order.placed", "order.cancelled"])?;
/// assert!(routes.filter().matches_parts("order", "order.placed"));
/// assert!(!routes.filter().matches_parts("order", "order.internal-note"));
/// # Ok::<(), factum::Error>(())
/// ```
#[derive(Clone)]
pub struct PublicEvents {
    service: ServiceName,
    /// Category → stored wire name → route (looked up by `&str`, with no allocation per event).
    routes: HashMap<String, HashMap<String, Route>>,
}

impl std::fmt::Debug for PublicEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut routes: Vec<(&String, &String)> = self
            .routes
            .iter()
            .flat_map(|(c, types)| types.keys().map(move |t| (c, t)))
            .collect();
        routes.sort();
        f.debug_struct("PublicEvents")
            .field("service", &self.service)
            .field("routes", &routes)
            .finish()
    }
}

impl PublicEvents {
    /// No public events yet, for `service`.
    pub fn new(service: ServiceName) -> Self {
        Self {
            service,
            routes: HashMap::new(),
        }
    }

    /// The service publishing.
    pub fn service(&self) -> &ServiceName {
        &self.service
    }

    /// Publishes the events of these wire names in streams of `category`, as they are stored.
    pub fn publish<S: Into<String>>(
        mut self,
        category: &str,
        event_types: impl IntoIterator<Item = S>,
    ) -> Result<Self, Error> {
        for event_type in event_types {
            let event_type = event_type.into();
            let subject = subject(&self.service, category, &event_type)?;
            self.routes
                .entry(category.to_owned())
                .or_default()
                .insert(event_type, Route::AsIs(subject));
        }
        Ok(self)
    }

    /// Publishes every wire name of `E` (see [`Event::event_types`]) in streams of `category`,
    /// as stored.
    ///
    /// Fails with [`Error::InvalidArgument`] when `E` has personal fields (`#[personal]`): the
    /// relay never publishes personal data ([`map`](Self::map) it to a contract without them).
    pub fn publish_event<E: Event>(self, category: &str) -> Result<Self, Error> {
        refuse_personal::<E>("publish_event")?;
        self.publish(category, E::event_types().iter().copied())
    }

    /// Publishes the events of `E` in streams of `category` as the public contract type `P`:
    /// `to_public` maps each (decoded, upcast) event, or returns `None` to keep it internal. The
    /// message keeps the event's id, stream, version, time and metadata; its type, schema version
    /// and payload are `P`'s.
    ///
    /// A stored event of `E`'s names that does not decode stops the relay with an error naming
    /// it (nothing after it is published), as for any consumer.
    pub fn map<E, P>(
        mut self,
        category: &str,
        to_public: impl Fn(&Envelope<E>) -> Option<P> + Send + Sync + 'static,
    ) -> Result<Self, Error>
    where
        E: Event,
        P: Event,
    {
        refuse_personal::<P>("map")?;
        let map: Arc<MapFn> = Arc::new(move |event: &RecordedEvent| {
            let envelope = event.decode::<E>()?;
            match to_public(&envelope) {
                None => Ok(None),
                Some(public) => Ok(Some(Mapped {
                    event_type: public.event_type(),
                    schema_version: public.schema_version(),
                    payload: public.encode()?,
                })),
            }
        });
        for event_type in E::event_types() {
            subject(&self.service, category, event_type)?;
            self.routes
                .entry(category.to_owned())
                .or_default()
                .insert((*event_type).to_owned(), Route::Map(map.clone()));
        }
        Ok(self)
    }

    /// The filter of the log reads: the routed categories and wire names (applied at the source).
    pub fn filter(&self) -> EventFilter {
        let mut categories: Vec<&str> = self.routes.keys().map(String::as_str).collect();
        let mut types: Vec<&str> = self
            .routes
            .values()
            .flat_map(|types| types.keys().map(String::as_str))
            .collect();
        categories.sort_unstable();
        categories.dedup();
        types.sort_unstable();
        types.dedup();
        EventFilter::all()
            .with_categories(categories)
            .with_event_types(types)
    }

    /// The message for `event`, or `None` when it is not public.
    fn message(&self, event: &RecordedEvent) -> Result<Option<BusMessage>, BoxError> {
        let Some(route) = self
            .routes
            .get(event.stream_id.category())
            .and_then(|types| types.get(&event.event_type))
        else {
            return Ok(None);
        };
        let (subject, event) = match route {
            Route::AsIs(subject) => (subject.clone(), event.clone()),
            Route::Map(map) => match map(event)? {
                None => return Ok(None),
                Some(mapped) => {
                    let subject =
                        subject(&self.service, event.stream_id.category(), mapped.event_type)?;
                    let event = RecordedEvent {
                        event_type: mapped.event_type.to_owned(),
                        schema_version: mapped.schema_version,
                        payload: mapped.payload,
                        ..event.clone()
                    };
                    (subject, event)
                }
            },
        };
        // Personal data never leaves the service: a broker's retention and other services'
        // stores are out of reach of `forget_subject`. A public contract leaves those fields out.
        if [
            crate::personal::PLAINTEXT_KEY,
            crate::personal::ENCRYPTED_KEY,
        ]
        .iter()
        .any(|form| crate::personal::mentions(&event.payload, form))
        {
            return Err(format!(
                "event {} ({}, stream `{}` version {}) holds personal fields: the relay does not publish personal data (the broker and other services keep copies `forget_subject` cannot reach); map it to a public contract without them (`PublicEvents::map`)",
                event.event_id, event.event_type, event.stream_id, event.stream_version
            )
            .into());
        }
        Ok(Some(BusMessage::new(subject, self.service.clone(), event)))
    }
}

/// Personal data is not published: a public type with personal fields is refused up front (and
/// an event holding them at run time, see `Relay::message`).
fn refuse_personal<E: Event>(what: &str) -> Result<(), Error> {
    if E::HAS_PERSONAL_DATA {
        return Err(Error::InvalidArgument(format!(
            "`PublicEvents::{what}`: `{}` has personal fields (`#[personal]`), and the relay never publishes personal data (the broker and other services keep copies `forget_subject` cannot reach): publish a contract without them",
            std::any::type_name::<E>()
        )));
    }
    Ok(())
}

/// What a relay is doing.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum RelayState {
    /// Publishing, or waiting for the next batch.
    Running,
    /// The bus failed in a way that may pass (the broker is down or restarting): it publishes the
    /// batch again with backoff (100 ms doubling to 10 s) until the broker takes it. The message
    /// says why.
    Retrying(String),
    /// Its last batch failed with an error that waiting does not cure: an event it cannot map
    /// or must not publish (personal fields, a subject no stream captures), or a broker refusal.
    /// The subscription running it then parks the event or stops, by its policy; a later batch
    /// published sets it back to [`Running`](Self::Running). The message says what and where.
    Failed(String),
}

/// A relay's health, published as it runs ([`Relay::status`]). Its lag (events and seconds
/// behind the log) is that of the subscription running it.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct RelayStatus {
    /// What it is doing.
    pub state: RelayState,
    /// Messages the broker stored since the relay started.
    pub published: u64,
    /// Messages the broker dropped as duplicates (already published, e.g. before a restart).
    pub duplicates: u64,
    /// Events its read filter let through that it kept internal (a category and wire name not
    /// routed together, or mapped to `None`).
    pub skipped: u64,
    /// Publish attempts that failed and were retried.
    pub retries: u64,
    /// When the last published event was recorded in the log.
    pub last_recorded_at: Option<DateTime<Utc>>,
}

/// The relay: a [`BatchHandler`] for the service's [`Subscription`](crate::subscription::Subscription)
/// that publishes its [`PublicEvents`] to a [`Bus`].
///
/// Per batch, it builds the messages (the event id as message id, subject
/// `{service}.{category}.{event type}`), publishes them pipelined, and waits for every
/// acknowledgement before returning, so the subscription checkpoints only what the broker stored.
/// A crash after a publish and before the checkpoint publishes the batch again: the broker drops
/// the repeats within its duplicate window, and the receiving inboxes drop them after it.
///
/// Publishes run through a [`Resilience`] (retries with backoff and a circuit breaker; the
/// default is `Resilience::new("bus")`). When it gives up on a failure that may pass, the relay
/// waits and tries again, for as long as it takes: a broker restart delays the relay, it never
/// stops it. Any other failure (no stream captures the subject, an event that does not map) is
/// the subscription's handler failure: it stops with the event named.
///
/// Run it with a lease (`PgLease` on PostgreSQL) so one instance per service publishes, and with
/// plain checkpoints ([`Subscription::new`](crate::subscription::Subscription::new)), not a
/// transactional one: its effects are on the broker, not in the database, and a transaction held
/// open while it publishes (or waits out a broker outage) would hold back the gap-safe horizon of
/// every reader of the database cluster.
pub struct Relay<B> {
    bus: B,
    routes: PublicEvents,
    resilience: Resilience,
    status: watch::Sender<RelayStatus>,
}

impl<B> std::fmt::Debug for Relay<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("routes", &self.routes)
            .finish_non_exhaustive()
    }
}

impl<B: Bus> Relay<B> {
    /// A relay publishing `routes` to `bus`.
    pub fn new(bus: B, routes: PublicEvents) -> Self {
        let (status, _) = watch::channel(RelayStatus {
            state: RelayState::Running,
            published: 0,
            duplicates: 0,
            skipped: 0,
            retries: 0,
            last_recorded_at: None,
        });
        Self {
            bus,
            routes,
            resilience: Resilience::new("bus"),
            status,
        }
    }

    /// Publishes through `resilience` (its [`Operation::BrokerPublish`] policy and breaker).
    #[must_use]
    pub fn with_resilience(mut self, resilience: Resilience) -> Self {
        self.resilience = resilience;
        self
    }

    /// The name of the subscription that should run it: `{service}.relay` (the key of its
    /// checkpoint and lease).
    pub fn name(&self) -> String {
        format!("{}.relay", self.routes.service)
    }

    /// The filter its subscription should read with (see [`PublicEvents::filter`]).
    pub fn filter(&self) -> EventFilter {
        self.routes.filter()
    }

    /// A live view of its state and counters.
    pub fn status(&self) -> watch::Receiver<RelayStatus> {
        self.status.subscribe()
    }

    async fn publish(&mut self, messages: &[BusMessage]) -> Result<(), BoxError> {
        if messages.is_empty() {
            return Ok(());
        }
        let mut wait = RETRY_MIN;
        loop {
            let outcome = self
                .resilience
                .run_idempotent(Operation::BrokerPublish, || self.bus.publish(messages))
                .await;
            match outcome {
                Ok(acks) => {
                    let duplicates = acks.iter().filter(|a| a.duplicate).count() as u64;
                    let recorded = messages.last().map(|m| m.event.recorded_at);
                    self.status.send_modify(|s| {
                        s.state = RelayState::Running;
                        s.published += acks.len() as u64 - duplicates;
                        s.duplicates += duplicates;
                        s.last_recorded_at = recorded.or(s.last_recorded_at);
                    });
                    return Ok(());
                }
                Err(error) if waits_out(&error) => {
                    tracing::warn!(relay = %self.name(), %error, ?wait, "publishing failed; trying again");
                    self.status.send_modify(|s| {
                        s.state = RelayState::Retrying(error.to_string());
                        s.retries += 1;
                    });
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(RETRY_MAX);
                }
                Err(error) => return Err(error.into()),
            }
        }
    }
}

impl<B> Relay<B> {
    /// A batch that failed as a whole (the broker refused it): the state says so.
    fn failed(&self, error: BoxError) -> BatchFailure {
        let why = crate::error_chain(&*error);
        self.status
            .send_modify(|s| s.state = RelayState::Failed(why));
        BatchFailure::somewhere(error)
    }

    /// Event `i` of the batch cannot be published: the state names it.
    fn failed_at(&self, i: usize, event: &RecordedEvent, error: BoxError) -> BatchFailure {
        let why = format!(
            "event {} ({}, stream `{}`, position {}): {}",
            event.event_id,
            event.event_type,
            event.stream_id,
            event.position,
            crate::error_chain(&*error)
        );
        self.status
            .send_modify(|s| s.state = RelayState::Failed(why));
        BatchFailure::at(i, error)
    }
}

fn waits_out(error: &Error) -> bool {
    matches!(
        error.kind(),
        crate::ErrorKind::Transient
            | crate::ErrorKind::Unavailable
            | crate::ErrorKind::UnknownOutcome
    )
}

impl<B: Bus, Tx: Send + ?Sized> BatchHandler<Tx> for Relay<B> {
    async fn handle_batch(
        &mut self,
        _tx: &mut Tx,
        events: &[RecordedEvent],
    ) -> Result<(), BatchFailure> {
        let mut messages = Vec::with_capacity(events.len());
        let mut skipped = 0;
        for (i, event) in events.iter().enumerate() {
            match self.routes.message(event) {
                Ok(Some(message)) => messages.push(message),
                Ok(None) => skipped += 1,
                Err(error) => {
                    // Publish what comes before the event that failed, so the checkpoint can
                    // move up to it.
                    self.publish(&messages).await.map_err(|e| self.failed(e))?;
                    return Err(self.failed_at(i, event, error));
                }
            }
        }
        self.publish(&messages).await.map_err(|e| self.failed(e))?;
        if skipped > 0 {
            self.status.send_modify(|s| s.skipped += skipped);
        }
        Ok(())
    }
}

/// A relay lent to a subscription, so it can be run again (and its status kept) afterwards.
impl<B: Bus, Tx: Send + ?Sized> BatchHandler<Tx> for &mut Relay<B> {
    fn handle_batch(
        &mut self,
        tx: &mut Tx,
        events: &[RecordedEvent],
    ) -> impl std::future::Future<Output = Result<(), BatchFailure>> + Send {
        (**self).handle_batch(tx, events)
    }
}
