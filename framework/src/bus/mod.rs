//! The event bus between services: a trait, the in-process bus, the relay and inbound consumers.
//!
//! Each service owns its data and its event store; services cooperate only through events carried
//! by a broker (NATS JetStream in `factum-nats`, or the [`InProcessBus`] here for examples and
//! tests with no server). The pieces:
//!
//! * [`Bus`]: creates or verifies [streams](StreamConfig) of messages, publishes batches of
//!   [`BusMessage`]s (the broker drops a message whose id it saw within its duplicate window and
//!   says so in the [`PublishAck`]), and hands out durable [consumers](BusConsumer).
//! * [`Relay`]: a [`BatchHandler`](crate::subscription::BatchHandler) for the service's one
//!   consumer runtime, [`Subscription`](crate::subscription::Subscription), that publishes the
//!   events a service declares public ([`PublicEvents`]) with the event id as message id, waits
//!   for every acknowledgement, and only then lets the subscription checkpoint. So it is gap-safe,
//!   checkpointed and leased like every consumer of the log.
//! * [`InboundConsumer`]: the receiving side. It fetches messages from a durable consumer and
//!   hands each event to a handler inside a unit of work of the service's [`Inbox`], which records
//!   the message's event id in the same transaction as the handler's effect: a redelivery, a
//!   re-publish after the broker's duplicate window or a replay of the relay has no effect. It
//!   acknowledges after the commit; a message that does not decode or keeps failing is parked
//!   with its subject, id and error, and can be retried from there.
//!
//! Subjects are `{service}.{category}.{event type}` (see [`subject`]), so a consumer subscribes
//! by interest with wildcards: `orders.>` (everything the orders service publishes),
//! `*.payment.>` (payment events of every service).
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use factum::bus::{Bus, InProcessBus, PublicEvents, Relay, ServiceName, StreamConfig};
//! use factum::subscription::Subscription;
//! use factum::{AppendRequest, EventId, EventStore, InMemoryStore, NewEvent, RawValue, StreamId};
//!
//! let orders = ServiceName::new("orders")?;
//! let bus = InProcessBus::new();
//! bus.ensure_stream(&StreamConfig::for_service(&orders)).await?;
//!
//! // The orders service stores an event...
//! let store = InMemoryStore::new();
//! let placed = NewEvent {
//!     event_id: EventId::new(),
//!     event_type: "order.placed".into(),
//!     schema_version: 1,
//!     payload: RawValue::from_string(r#"{"total":30}"#.into())?,
//!     metadata: Default::default(),
//! };
//! store.append(AppendRequest::new(StreamId::new("order-7")?, vec![placed])).await?;
//!
//! // ...and its relay publishes the public ones.
//! let routes = PublicEvents::new(orders).publish("order", ["order.placed"])?;
//! let mut relay = Relay::new(bus.clone(), routes);
//! let mut subscription = Subscription::new(relay.name(), store.clone()).filter(relay.filter());
//! subscription.catch_up(&mut relay).await?;
//! assert_eq!(relay.status().borrow().published, 1);
//! assert_eq!(bus.stored("ORDERS"), 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

mod inbound;
mod memory;
mod message;
mod relay;
mod telemetry;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::time::Duration;

use crate::error::Error;

pub use inbound::{
    InMemoryInbox, InMemoryInboxTx, InboundConsumer, InboundOptions, InboundState, InboundStatus,
    Inbox, ParkedMessage,
};
pub use memory::{InProcessBus, InProcessConsumer};
pub use message::{BusMessage, MessageDecodeError, headers, subject};
pub use relay::{PublicEvents, Relay, RelayState, RelayStatus};
pub use telemetry::{
    export_inbound_metrics, export_relay_metrics, record_inbound_metrics, record_relay_metrics,
};

/// The name of a service: the owner of an event store, the first token of the subjects it
/// publishes, the prefix of its relay's and consumers' names.
///
/// 1 to 64 characters: lowercase ASCII letters, digits, `-` and `_`, starting with a letter (so it
/// is a NATS subject token, a JetStream stream name part and a PostgreSQL identifier as it is).
///
/// ```
/// use factum::bus::ServiceName;
/// assert_eq!(ServiceName::new("billing")?.as_str(), "billing");
/// assert!(ServiceName::new("Billing").is_err());
/// assert!(ServiceName::new("bill.ing").is_err(), "a dot would split the subject");
/// # Ok::<(), factum::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct ServiceName(String);

impl ServiceName {
    /// The longest service name.
    pub const MAX_LEN: usize = 64;

    /// A service name, validated (see the type's docs).
    pub fn new(name: impl Into<String>) -> Result<Self, Error> {
        let name = name.into();
        let valid = !name.is_empty()
            && name.len() <= Self::MAX_LEN
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
        if valid {
            Ok(Self(name))
        } else {
            Err(Error::InvalidArgument(format!(
                "service name {name:?} is not valid: use 1 to {} lowercase ASCII letters, digits, `-` or `_`, starting with a letter",
                Self::MAX_LEN
            )))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ServiceName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::new(s)
    }
}

/// A stream of messages on the bus (a JetStream stream): which subjects it captures and how long
/// it keeps them. Created, or verified against the broker's, on start-up
/// ([`Bus::ensure_stream`]).
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct StreamConfig {
    /// The stream's name (JetStream: letters, digits, `-`, `_`).
    pub name: String,
    /// The subjects it captures (wildcards allowed).
    pub subjects: Vec<String>,
    /// How long the broker remembers message ids to drop duplicate publishes (JetStream's
    /// default: 2 minutes). The receiving services' inboxes dedupe for longer.
    pub duplicate_window: Duration,
    /// How long messages are kept (`None`: until the limits below or forever).
    pub max_age: Option<Duration>,
    /// At most this many messages are kept, the oldest discarded first (`None`: no limit).
    pub max_messages: Option<u64>,
}

impl StreamConfig {
    /// The stream of everything `service` publishes: named after it in upper case
    /// (`orders` → `ORDERS`), capturing `{service}.>`, a 2-minute duplicate window, kept
    /// until a limit is set.
    pub fn for_service(service: &ServiceName) -> Self {
        Self {
            name: service.as_str().to_ascii_uppercase().replace('-', "_"),
            subjects: vec![format!("{service}.>")],
            duplicate_window: Duration::from_secs(120),
            max_age: None,
            max_messages: None,
        }
    }

    /// A stream called `name` capturing `subjects`, with the defaults of
    /// [`for_service`](Self::for_service).
    pub fn new<S: Into<String>>(
        name: impl Into<String>,
        subjects: impl IntoIterator<Item = S>,
    ) -> Self {
        Self {
            name: name.into(),
            subjects: subjects.into_iter().map(Into::into).collect(),
            duplicate_window: Duration::from_secs(120),
            max_age: None,
            max_messages: None,
        }
    }

    /// Sets the duplicate window.
    #[must_use]
    pub fn duplicate_window(mut self, window: Duration) -> Self {
        self.duplicate_window = window;
        self
    }

    /// Keeps messages for at most `age`.
    #[must_use]
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = Some(age);
        self
    }

    /// Keeps at most `count` messages.
    #[must_use]
    pub fn max_messages(mut self, count: u64) -> Self {
        self.max_messages = Some(count);
        self
    }

    /// What differs between this configuration and `found` (the broker's), as readable
    /// sentences; empty when they agree. [`Bus::ensure_stream`] fails with these rather than
    /// silently changing a stream's retention.
    pub fn differences(&self, found: &StreamConfig) -> Vec<String> {
        let mut out = Vec::new();
        let mut want = self.subjects.clone();
        let mut have = found.subjects.clone();
        want.sort();
        have.sort();
        if want != have {
            out.push(format!("subjects: configured {want:?}, found {have:?}"));
        }
        if self.duplicate_window != found.duplicate_window {
            out.push(format!(
                "duplicate window: configured {:?}, found {:?}",
                self.duplicate_window, found.duplicate_window
            ));
        }
        if self.max_age != found.max_age {
            out.push(format!(
                "max age: configured {:?}, found {:?}",
                self.max_age, found.max_age
            ));
        }
        if self.max_messages != found.max_messages {
            out.push(format!(
                "max messages: configured {:?}, found {:?}",
                self.max_messages, found.max_messages
            ));
        }
        out
    }

    /// The error of a stream found with another configuration.
    pub fn mismatch(&self, found: &StreamConfig) -> Option<Error> {
        let differences = self.differences(found);
        (!differences.is_empty()).then(|| {
            Error::InvalidArgument(format!(
                "stream {:?} exists with another configuration ({}); change the configuration to match, or update the stream with the broker's tools",
                self.name,
                differences.join("; ")
            ))
        })
    }
}

/// A durable consumer of a bus stream: the receiving service's view of the messages it is
/// interested in, remembered by the broker across restarts.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct ConsumerConfig {
    /// The stream it reads.
    pub stream: String,
    /// Its durable name (the broker keeps its position under it).
    pub durable: String,
    /// The subjects it wants (wildcards allowed; empty: all of the stream's).
    pub filter_subjects: Vec<String>,
    /// How long the broker waits for an acknowledgement before delivering a message again.
    pub ack_wait: Duration,
}

impl ConsumerConfig {
    /// Consumer `durable` of `stream`, every subject, a 30-second ack wait.
    pub fn new(stream: impl Into<String>, durable: impl Into<String>) -> Self {
        Self {
            stream: stream.into(),
            durable: durable.into(),
            filter_subjects: Vec::new(),
            ack_wait: Duration::from_secs(30),
        }
    }

    /// Only messages whose subject matches `subject`. The in-process bus takes several;
    /// JetStream (nats-server 2.9) takes one, and `factum-nats` refuses more with
    /// [`Error::InvalidArgument`].
    #[must_use]
    pub fn filter_subject(mut self, subject: impl Into<String>) -> Self {
        self.filter_subjects.push(subject.into());
        self
    }

    /// Sets the ack wait.
    #[must_use]
    pub fn ack_wait(mut self, wait: Duration) -> Self {
        self.ack_wait = wait;
        self
    }
}

/// The broker's answer to one published message.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct PublishAck {
    /// The message's sequence number in its stream (for a duplicate, the original's).
    pub sequence: u64,
    /// The broker already had a message with this id within its duplicate window and stored
    /// nothing.
    pub duplicate: bool,
}

impl PublishAck {
    /// An acknowledgement.
    pub fn new(sequence: u64, duplicate: bool) -> Self {
        Self {
            sequence,
            duplicate,
        }
    }
}

/// What a consumer's broker-side state says (JetStream's consumer info).
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct ConsumerInfo {
    /// Messages in the stream for this consumer that were not delivered yet.
    pub pending: u64,
    /// Messages delivered and not acknowledged yet.
    pub ack_pending: u64,
    /// Messages delivered more than once and not acknowledged yet.
    pub redelivered: u64,
}

impl ConsumerInfo {
    /// Consumer info from its parts.
    pub fn new(pending: u64, ack_pending: u64, redelivered: u64) -> Self {
        Self {
            pending,
            ack_pending,
            redelivered,
        }
    }
}

/// A boxed future, as returned by an [`Acker`].
pub type AckFuture = Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>;

/// How a [`Delivery`] is acknowledged: a bus adapter's part of a delivery.
pub trait Acker: Send + Sync {
    /// The message was handled: the broker will not deliver it again.
    fn ack(self: Box<Self>) -> AckFuture;
    /// The message was not handled: deliver it again after `delay`.
    fn nak(self: Box<Self>, delay: Duration) -> AckFuture;
}

/// One message delivered by a [`BusConsumer`], to acknowledge once handled.
///
/// Dropping a delivery without [`ack`](Self::ack) or [`nak`](Self::nak) leaves it to the
/// broker, which delivers it again after the consumer's ack wait (as after a crash).
#[non_exhaustive]
pub struct Delivery {
    /// The subject it was published on.
    pub subject: String,
    /// Its headers, as received.
    pub headers: Vec<(String, String)>,
    /// Its body, as received.
    pub body: Vec<u8>,
    /// How many times it has been delivered, this time included (1 the first time).
    pub delivered: u64,
    acker: Box<dyn Acker>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("subject", &self.subject)
            .field("headers", &self.headers)
            .field("body_len", &self.body.len())
            .field("delivered", &self.delivered)
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// A delivery from its parts (for bus adapters).
    pub fn new(
        subject: impl Into<String>,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        delivered: u64,
        acker: Box<dyn Acker>,
    ) -> Self {
        Self {
            subject: subject.into(),
            headers,
            body,
            delivered,
            acker,
        }
    }

    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Its message id (`Nats-Msg-Id`), if it has one.
    pub fn message_id(&self) -> Option<&str> {
        self.header(headers::MESSAGE_ID)
    }

    /// Decodes the factum message it carries.
    pub fn decode(&self) -> Result<BusMessage, MessageDecodeError> {
        BusMessage::decode(&self.subject, &self.headers, &self.body)
    }

    /// Acknowledges it: handled, never to be delivered again.
    pub async fn ack(self) -> Result<(), Error> {
        self.acker.ack().await
    }

    /// Asks for it to be delivered again after `delay`.
    pub async fn nak(self, delay: Duration) -> Result<(), Error> {
        self.acker.nak(delay).await
    }
}

/// A durable consumer on the bus: fetches batches of deliveries.
pub trait BusConsumer: Send + Sync {
    /// Up to `max` deliveries, waiting at most `wait` for the first (empty if none came).
    /// Messages not acknowledged within the ack wait are delivered again, first.
    fn fetch(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> impl Future<Output = Result<Vec<Delivery>, Error>> + Send;

    /// The broker's view of this consumer (pending messages, redeliveries).
    fn info(&mut self) -> impl Future<Output = Result<ConsumerInfo, Error>> + Send;
}

/// A message broker that services publish events to and consume them from.
///
/// Implementations: [`InProcessBus`] (one process, no server) and `factum_nats::JetStreamBus`
/// (NATS JetStream). A Kafka or RabbitMQ adapter implements the same trait; nothing else in
/// factum changes. An implementation must:
/// * store a published batch's messages in order, each acknowledged only once stored, and drop
///   (acknowledging as [`duplicate`](PublishAck::duplicate)) a message whose
///   [message id](headers::MESSAGE_ID) it stored within the stream's duplicate window;
/// * deliver every stored message to each durable consumer whose filter matches, at least once,
///   in stream order for first deliveries, again after the ack wait when unacknowledged;
/// * report failures that may pass (broker unreachable, timeouts) as
///   [`ErrorKind::Transient`](crate::ErrorKind::Transient), so relays and consumers wait them
///   out.
pub trait Bus: Send + Sync {
    /// The durable consumers it hands out.
    type Consumer: BusConsumer;

    /// Creates `config`'s stream, or checks an existing one has the same configuration (an
    /// [`ErrorKind::InvalidArgument`](crate::ErrorKind::InvalidArgument) error naming the
    /// differences otherwise: retention is never changed silently).
    fn ensure_stream(
        &self,
        config: &StreamConfig,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Publishes `messages` (pipelined) and waits for every acknowledgement, returned in the
    /// same order. On an error, some of them may have been stored: publishing them again is
    /// safe within the duplicate window.
    fn publish(
        &self,
        messages: &[BusMessage],
    ) -> impl Future<Output = Result<Vec<PublishAck>, Error>> + Send;

    /// The durable consumer `config` (created if it does not exist; the same one, with its
    /// position, if it does).
    fn consumer(
        &self,
        config: &ConsumerConfig,
    ) -> impl Future<Output = Result<Self::Consumer, Error>> + Send;
}

impl<B: Bus> Bus for std::sync::Arc<B> {
    type Consumer = B::Consumer;

    fn ensure_stream(
        &self,
        config: &StreamConfig,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        (**self).ensure_stream(config)
    }

    fn publish(
        &self,
        messages: &[BusMessage],
    ) -> impl Future<Output = Result<Vec<PublishAck>, Error>> + Send {
        (**self).publish(messages)
    }

    fn consumer(
        &self,
        config: &ConsumerConfig,
    ) -> impl Future<Output = Result<Self::Consumer, Error>> + Send {
        (**self).consumer(config)
    }
}

/// Whether `subject` matches the subject pattern `pattern` (NATS wildcards: `*` one token, `>`
/// one or more trailing tokens).
///
/// ```
/// use factum::bus::subject_matches;
/// assert!(subject_matches("orders.>", "orders.order.order.placed"));
/// assert!(subject_matches("*.order.>", "orders.order.order.placed"));
/// assert!(!subject_matches("billing.>", "orders.order.order.placed"));
/// ```
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut want = pattern.split('.');
    let mut have = subject.split('.');
    loop {
        match (want.next(), have.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(w), Some(h)) if w == h => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}
