//! Domain events, their wire form, and the envelopes they travel in.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::ids::{
    CausationId, CorrelationId, EventId, GlobalPosition, LogPosition, StreamId, StreamVersion,
};

/// A domain event type: a Rust type with a stable wire name and a schema version per event.
///
/// An event type is usually an enum with one variant per kind of event; each variant has a wire
/// name (stored with the event, independent of the Rust identifier so renaming code never orphans
/// stored events) and a schema version. Older versions of an event are decoded as their own types
/// and converted forward (upcast) inside [`decode`](Event::decode).
///
/// `#[derive(Event)]` writes this impl; writing it by hand looks like this:
///
/// ```
/// use factum::{DecodeError, EncodeError, Event};
/// use serde::{Deserialize, Serialize};
/// use serde_json::value::RawValue;
///
/// #[derive(Debug, Serialize, Deserialize)]
/// struct Deposited { amount: u64 }
///
/// #[derive(Debug)]
/// enum AccountEvent { Deposited(Deposited) }
///
/// impl Event for AccountEvent {
///     fn event_type(&self) -> &'static str {
///         match self { AccountEvent::Deposited(_) => "account.deposited" }
///     }
///     fn schema_version(&self) -> u32 { 1 }
///     fn event_types() -> &'static [&'static str] { &["account.deposited"] }
///     fn encode(&self) -> Result<Box<RawValue>, EncodeError> {
///         match self { AccountEvent::Deposited(e) => factum::encode_json(e) }
///     }
///     fn decode(event_type: &str, version: u32, payload: &RawValue) -> Result<Self, DecodeError> {
///         match (event_type, version) {
///             ("account.deposited", 1) => Ok(AccountEvent::Deposited(factum::decode_json(payload)?)),
///             _ => Err(DecodeError::unknown(event_type, version)),
///         }
///     }
/// }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a factum event type",
    label = "this type does not implement `factum::Event`",
    note = "add `#[derive(factum::Event)]` to `{Self}` and give each variant `#[event(name = \"...\")]`"
)]
pub trait Event: Sized + Send + Sync + 'static {
    /// The wire name of this event, e.g. `"account.opened"`.
    fn event_type(&self) -> &'static str;

    /// The schema version this event is written with (the current version of its wire name).
    fn schema_version(&self) -> u32;

    /// Every wire name this type decodes, so readers can filter the log at the source.
    fn event_types() -> &'static [&'static str];

    /// Serialises the event's payload (without name or version: those are stored beside it).
    fn encode(&self) -> Result<Box<RawValue>, EncodeError>;

    /// Decodes a stored payload written with `event_type` at schema `version`, upcasting older
    /// versions to the current type.
    fn decode(event_type: &str, version: u32, payload: &RawValue) -> Result<Self, DecodeError>;
}

/// Serialises a payload to JSON: the helper generated and hand-written [`Event`] impls use.
pub fn encode_json<T: Serialize + ?Sized>(value: &T) -> Result<Box<RawValue>, EncodeError> {
    serde_json::value::to_raw_value(value).map_err(EncodeError)
}

/// Deserialises a JSON payload: the helper generated and hand-written [`Event`] impls use.
pub fn decode_json<T: DeserializeOwned>(payload: &RawValue) -> Result<T, DecodeError> {
    serde_json::from_str(payload.get()).map_err(DecodeError::Payload)
}

/// An event's payload could not be serialised.
#[derive(Debug, thiserror::Error)]
#[error("event payload could not be serialised to JSON")]
pub struct EncodeError(#[source] pub serde_json::Error);

/// Why a stored payload could not be turned into an event.
///
/// Returned by [`Event::decode`]; the framework wraps it in
/// [`Error::Decode`](crate::Error::Decode) with the stream, version and position of the event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// No variant of the event type has this wire name and schema version.
    #[error("no event type is registered for wire name {event_type:?} at schema version {version}")]
    Unknown {
        /// The stored wire name.
        event_type: String,
        /// The stored schema version.
        version: u32,
    },
    /// The payload is not valid JSON for the registered type.
    #[error("the payload does not match the registered type")]
    Payload(#[source] serde_json::Error),
    /// Converting an older version forward failed.
    #[error("upcasting the stored version failed")]
    Upcast(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl DecodeError {
    /// The error for a wire name / version pair no variant handles.
    pub fn unknown(event_type: &str, version: u32) -> Self {
        Self::Unknown {
            event_type: event_type.to_owned(),
            version,
        }
    }
}

/// User-defined metadata carried by every event: a JSON object, typed on the way in and out.
///
/// ```
/// let mut meta = factum::Metadata::new();
/// meta.insert("tenant", "acme").unwrap();
/// assert_eq!(meta.get::<String>("tenant").unwrap().as_deref(), Some("acme"));
/// ```
#[derive(Clone, Default, PartialEq, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Metadata(serde_json::Map<String, serde_json::Value>);

impl Metadata {
    /// Empty metadata.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `key` to `value`, replacing any earlier value.
    pub fn insert<T: Serialize + ?Sized>(
        &mut self,
        key: impl Into<String>,
        value: &T,
    ) -> Result<(), serde_json::Error> {
        self.0.insert(key.into(), serde_json::to_value(value)?);
        Ok(())
    }

    /// Reads `key` as a `T`; `Ok(None)` when absent.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, serde_json::Error> {
        self.0.get(key).map(T::deserialize).transpose()
    }

    /// True when no key is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The underlying JSON object.
    pub fn as_map(&self) -> &serde_json::Map<String, serde_json::Value> {
        &self.0
    }
}

impl From<serde_json::Map<String, serde_json::Value>> for Metadata {
    fn from(map: serde_json::Map<String, serde_json::Value>) -> Self {
        Self(map)
    }
}

/// Tracing ids and user metadata of an event.
#[derive(Clone, Default, PartialEq, Debug, Serialize, Deserialize)]
pub struct EventMetadata {
    /// The business transaction this event belongs to.
    pub correlation_id: Option<CorrelationId>,
    /// The command or event that caused this event.
    pub causation_id: Option<CausationId>,
    /// Application metadata (tenant, user, request id...).
    #[serde(default, skip_serializing_if = "Metadata::is_empty")]
    pub user: Metadata,
}

/// An event ready to be appended: encoded, with its id and metadata.
#[derive(Clone, Debug)]
pub struct NewEvent {
    /// The event's id; appending an id that is already stored is idempotent.
    pub event_id: EventId,
    /// The wire name.
    pub event_type: String,
    /// The schema version the payload is written with.
    pub schema_version: u32,
    /// The JSON payload.
    pub payload: Box<RawValue>,
    /// Tracing ids and user metadata.
    pub metadata: EventMetadata,
}

impl NewEvent {
    /// Encodes a domain event with a fresh event id.
    pub fn encode<E: Event>(event: &E, metadata: EventMetadata) -> Result<Self, EncodeError> {
        Ok(Self {
            event_id: EventId::new(),
            event_type: event.event_type().to_owned(),
            schema_version: event.schema_version(),
            payload: event.encode()?,
            metadata,
        })
    }

    /// Replaces the generated event id, e.g. with one derived from an idempotency key.
    #[must_use]
    pub fn with_event_id(mut self, event_id: EventId) -> Self {
        self.event_id = event_id;
        self
    }
}

/// An event as stored: payload still encoded, plus everything the store recorded about it.
#[derive(Clone, Debug)]
pub struct RecordedEvent {
    /// The event's id.
    pub event_id: EventId,
    /// The stream it belongs to.
    pub stream_id: StreamId,
    /// Its version within the stream (1 for the first event).
    pub stream_version: StreamVersion,
    /// Its place in the global log.
    pub position: LogPosition,
    /// The wire name.
    pub event_type: String,
    /// The schema version the payload was written with.
    pub schema_version: u32,
    /// The JSON payload as stored.
    pub payload: Box<RawValue>,
    /// Tracing ids and user metadata.
    pub metadata: EventMetadata,
    /// When the store recorded it.
    pub recorded_at: DateTime<Utc>,
}

impl RecordedEvent {
    /// Its global position.
    pub fn global_position(&self) -> GlobalPosition {
        self.position.global
    }

    /// Decodes the payload into `E`, upcasting older versions. The error names the stream,
    /// version, wire name and position of the event.
    pub fn decode<E: Event>(&self) -> Result<Envelope<E>, crate::Error> {
        let event =
            E::decode(&self.event_type, self.schema_version, &self.payload).map_err(|source| {
                crate::Error::Decode {
                    stream: self.stream_id.clone(),
                    version: self.stream_version,
                    event_type: self.event_type.clone(),
                    schema_version: self.schema_version,
                    position: self.position,
                    source,
                }
            })?;
        Ok(Envelope {
            event,
            event_id: self.event_id,
            stream_id: self.stream_id.clone(),
            stream_version: self.stream_version,
            position: self.position,
            metadata: self.metadata.clone(),
            recorded_at: self.recorded_at,
        })
    }
}

/// A decoded event with everything the store recorded about it: what projections and process
/// managers receive.
#[derive(Clone, Debug)]
pub struct Envelope<E> {
    /// The event, upcast to its current version.
    pub event: E,
    /// The event's id (use it to make external side effects idempotent).
    pub event_id: EventId,
    /// The stream it belongs to.
    pub stream_id: StreamId,
    /// Its version within the stream.
    pub stream_version: StreamVersion,
    /// Its place in the global log.
    pub position: LogPosition,
    /// Tracing ids and user metadata.
    pub metadata: EventMetadata,
    /// When the store recorded it.
    pub recorded_at: DateTime<Utc>,
}

impl<E> Envelope<E> {
    /// Builds an envelope for an event that has not been stored, e.g. in tests.
    pub fn new(stream_id: StreamId, stream_version: StreamVersion, event: E) -> Self {
        Self {
            event,
            event_id: EventId::new(),
            stream_id,
            stream_version,
            position: LogPosition::new(stream_version.get(), GlobalPosition::new(0)),
            metadata: EventMetadata::default(),
            recorded_at: Utc::now(),
        }
    }
}

impl<E: fmt::Display> fmt::Display for Envelope<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}@{}: {}",
            self.stream_id, self.stream_version, self.event
        )
    }
}
