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
/// use factum::{DecodeError, EncodeError, Event, Stored};
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
///     fn decode(stored: &Stored<'_>) -> Result<Self, DecodeError> {
///         match (stored.event_type, stored.schema_version) {
///             ("account.deposited", 1) => Ok(AccountEvent::Deposited(factum::decode_json(stored.payload)?)),
///             _ => Err(DecodeError::unknown(stored.event_type, stored.schema_version)),
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
    /// Whether some variant has personal fields (`#[personal(subject = ...)]`, see
    /// [`personal`](crate::personal)): aggregates whose states may hold decrypted personal data
    /// are dropped from a repository's state cache when a subject is forgotten.
    /// `#[derive(Event)]` sets it; the default is `false`.
    const HAS_PERSONAL_DATA: bool = false;

    /// The wire name of this event, e.g. `"account.opened"`.
    fn event_type(&self) -> &'static str;

    /// The schema version this event is written with (the current version of its wire name).
    fn schema_version(&self) -> u32;

    /// Every wire name this type decodes, so readers can filter the log at the source.
    fn event_types() -> &'static [&'static str];

    /// Serialises the event's payload (without name or version: those are stored beside it).
    fn encode(&self) -> Result<Box<RawValue>, EncodeError>;

    /// Decodes a stored event (its payload, written with `stored.event_type` at
    /// `stored.schema_version`), upcasting older versions to the current type. Upcasts may read
    /// the rest of the stored envelope: when it was recorded and its metadata.
    fn decode(stored: &Stored<'_>) -> Result<Self, DecodeError>;

    /// Decodes a stored event into the events it stands for today: one, or several where the
    /// type declares that a stored event was split (`#[event(split(...))]`). Every reader in
    /// factum (aggregate loads, subscriptions, projections, rebuilds) decodes through this; the
    /// default is [`decode`](Event::decode) of one event.
    fn decode_all(stored: &Stored<'_>) -> Result<Decoded<Self>, DecodeError> {
        Self::decode(stored).map(Decoded::One)
    }

    /// Every stored `(wire name, schema version)` this type decodes under its current names,
    /// older versions and split events included (not the old names of renamed events): what a
    /// compatibility check expects samples of. `#[derive(Event)]` lists them; the default lists
    /// nothing.
    fn event_versions() -> &'static [(&'static str, u32)] {
        &[]
    }
}

/// A stored event as decoding and upcasting see it: the payload with its wire name and schema
/// version, and the rest of the envelope the store recorded.
///
/// ```
/// use factum::{RawValue, Stored};
///
/// let payload = RawValue::from_string(r#"{"amount":5}"#.into())?;
/// let stored = Stored::new("account.deposited", 1, &payload);
/// assert_eq!((stored.event_type, stored.schema_version), ("account.deposited", 1));
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct Stored<'a> {
    /// The stored wire name.
    pub event_type: &'a str,
    /// The schema version the payload was written with.
    pub schema_version: u32,
    /// The JSON payload as stored.
    pub payload: &'a RawValue,
    /// When the store recorded the event.
    pub recorded_at: DateTime<Utc>,
    /// Its tracing ids and user metadata.
    pub metadata: &'a EventMetadata,
}

static NO_METADATA: std::sync::LazyLock<EventMetadata> =
    std::sync::LazyLock::new(EventMetadata::default);

impl<'a> Stored<'a> {
    /// A stored event recorded now, with no metadata: for tests and for decoding a payload that
    /// did not come from a store. Set the rest with [`recorded_at`](Self::recorded_at) and
    /// [`with_metadata`](Self::with_metadata).
    pub fn new(event_type: &'a str, schema_version: u32, payload: &'a RawValue) -> Self {
        Self {
            event_type,
            schema_version,
            payload,
            recorded_at: Utc::now(),
            metadata: &NO_METADATA,
        }
    }

    /// With the time the store recorded it.
    #[must_use]
    pub fn recorded_at(mut self, recorded_at: DateTime<Utc>) -> Self {
        self.recorded_at = recorded_at;
        self
    }

    /// With its metadata.
    #[must_use]
    pub fn with_metadata(mut self, metadata: &'a EventMetadata) -> Self {
        self.metadata = metadata;
        self
    }
}

/// What one stored event decodes into: one event, or several when it was split.
#[derive(Clone, Debug, PartialEq)]
pub enum Decoded<E> {
    /// The usual case: one stored event is one event.
    One(E),
    /// A stored event that the current code represents as several, in order.
    Split(Vec<E>),
}

impl<E> Decoded<E> {
    /// How many events.
    pub fn len(&self) -> usize {
        match self {
            Self::One(_) => 1,
            Self::Split(events) => events.len(),
        }
    }

    /// True for a split into no events.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies `f` to every event.
    pub fn map<T>(self, mut f: impl FnMut(E) -> T) -> Decoded<T> {
        match self {
            Self::One(e) => Decoded::One(f(e)),
            Self::Split(events) => Decoded::Split(events.into_iter().map(f).collect()),
        }
    }
}

impl<E> IntoIterator for Decoded<E> {
    type Item = E;
    type IntoIter = DecodedIter<E>;

    fn into_iter(self) -> Self::IntoIter {
        match self {
            Self::One(e) => DecodedIter::One(Some(e)),
            Self::Split(events) => DecodedIter::Split(events.into_iter()),
        }
    }
}

/// The iterator over a [`Decoded`].
#[derive(Debug)]
pub enum DecodedIter<E> {
    /// Over one event.
    #[doc(hidden)]
    One(Option<E>),
    /// Over a split.
    #[doc(hidden)]
    Split(std::vec::IntoIter<E>),
}

impl<E> Iterator for DecodedIter<E> {
    type Item = E;

    fn next(&mut self) -> Option<E> {
        match self {
            Self::One(e) => e.take(),
            Self::Split(events) => events.next(),
        }
    }
}

/// A conversion from an older version of an event to the next one that may read the stored
/// envelope (when the event was recorded, its metadata). Every `From` conversion is an
/// `Upcast` that ignores the envelope; implement `Upcast` instead of `From` where the new
/// version needs it:
///
/// ```
/// use chrono::{DateTime, Duration, Utc};
/// use factum::{BoxError, Event, RawValue, Stored, Upcast};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct LentV1 { book: String }
/// #[derive(Debug, PartialEq, Serialize, Deserialize)]
/// struct Lent { book: String, due: DateTime<Utc> }
///
/// impl Upcast<LentV1> for Lent {
///     // v1 had no due date: loans were for 21 days from when they were recorded.
///     fn upcast(v1: LentV1, stored: &Stored<'_>) -> Result<Self, BoxError> {
///         Ok(Lent { book: v1.book, due: stored.recorded_at + Duration::days(21) })
///     }
/// }
///
/// #[derive(Debug, PartialEq, Event)]
/// enum LoanEvent {
///     #[event(name = "loan.lent", version = 2, upcast_from(LentV1 = 1))]
///     Lent(Lent),
/// }
///
/// let payload = RawValue::from_string(r#"{"book":"Dune"}"#.into())?;
/// let recorded_at: DateTime<Utc> = "2026-01-01T10:00:00Z".parse()?;
/// let event = LoanEvent::decode(&Stored::new("loan.lent", 1, &payload).recorded_at(recorded_at))?;
/// let LoanEvent::Lent(lent) = event;
/// assert_eq!(lent.due, "2026-01-22T10:00:00Z".parse::<DateTime<Utc>>()?);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// A split (`#[event(split(...))]`) is an `Upcast<Old> for Vec<Event>` (or a
/// `From<Old> for Vec<Event>`).
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be upcast from `{Old}`",
    label = "no `From<{Old}>` or `Upcast<{Old}>` for `{Self}`",
    note = "write `impl From<{Old}> for {Self}`, or `impl factum::Upcast<{Old}> for {Self}` when the conversion needs the stored envelope (recorded-at, metadata)"
)]
pub trait Upcast<Old>: Sized {
    /// Converts `old`, stored as `stored`, forward. An error stops the reader with
    /// [`DecodeError::Upcast`], naming the event.
    fn upcast(old: Old, stored: &Stored<'_>) -> Result<Self, crate::BoxError>;
}

impl<Old, New: From<Old>> Upcast<Old> for New {
    #[inline]
    fn upcast(old: Old, _: &Stored<'_>) -> Result<Self, crate::BoxError> {
        Ok(New::from(old))
    }
}

/// The wire name of the tombstone a backend writes in place of a deleted stream's events (e.g.
/// `factum_postgres::PostgresStore::delete_stream`): schema version 1, payload
/// `{"deleted_through": N}`, the stream version of the last deleted event; the tombstone itself is
/// at `N + 1`. Subscribers that keep per-stream data subscribe to it to erase theirs; consumers
/// with [known events](crate::subscription::KnownEvents) pass it over in every category, and a
/// [`Repository`](crate::Repository) load of the stream fails with
/// [`Error::StreamDeleted`](crate::Error::StreamDeleted).
pub const STREAM_DELETED: &str = "factum.stream_deleted";

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
    /// The stored event was split into several: [`Event::decode`] returns one event, read it
    /// with [`Event::decode_all`].
    #[error(
        "the stored event {event_type:?} at schema version {version} was split into several events: decode it with `Event::decode_all`"
    )]
    Split {
        /// The stored wire name.
        event_type: String,
        /// The stored schema version.
        version: u32,
    },
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

    /// The stored event as decoding sees it.
    pub fn stored(&self) -> Stored<'_> {
        Stored {
            event_type: &self.event_type,
            schema_version: self.schema_version,
            payload: &self.payload,
            recorded_at: self.recorded_at,
            metadata: &self.metadata,
        }
    }

    /// Decodes the payload into `E`, upcasting older versions. The error names the stream,
    /// version, wire name and position of the event. A stored event that was split into several
    /// is an error here ([`DecodeError::Split`]): read those with
    /// [`decode_all`](Self::decode_all).
    pub fn decode<E: Event>(&self) -> Result<Envelope<E>, crate::Error> {
        let event = E::decode(&self.stored()).map_err(|source| self.decode_error(source))?;
        Ok(self.envelope(event))
    }

    /// Decodes the payload into the events it stands for today (one, or several where it was
    /// split), each in an envelope of this event's id, position and metadata.
    pub fn decode_all<E: Event>(&self) -> Result<Decoded<Envelope<E>>, crate::Error> {
        let events = E::decode_all(&self.stored()).map_err(|source| self.decode_error(source))?;
        Ok(events.map(|event| self.envelope(event)))
    }

    fn decode_error(&self, source: DecodeError) -> crate::Error {
        crate::Error::Decode {
            stream: self.stream_id.clone(),
            version: self.stream_version,
            event_type: self.event_type.clone(),
            schema_version: self.schema_version,
            position: self.position,
            source,
        }
    }

    fn envelope<E>(&self, event: E) -> Envelope<E> {
        Envelope {
            event,
            event_id: self.event_id,
            stream_id: self.stream_id.clone(),
            stream_version: self.stream_version,
            position: self.position,
            metadata: self.metadata.clone(),
            recorded_at: self.recorded_at,
        }
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
