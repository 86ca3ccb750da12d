//! Typed identities, versions and positions.
//!
//! Every identifier that crosses an API boundary has its own type, so a stream id can never be
//! passed where an event type is expected and a stream version never where a global position is.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The separator between a stream's category and the aggregate id in a [`StreamId`].
pub const CATEGORY_SEPARATOR: char = '-';

/// Identifies one stream of events: `"{category}-{id}"`, e.g. `"account-42"`.
///
/// The category is the aggregate type ([`Aggregate::TYPE`](crate::Aggregate::TYPE)), so two
/// aggregate types can use the same ids without sharing a stream, and subscriptions can filter the
/// global log by category at the source. A category never contains
/// [`CATEGORY_SEPARATOR`]; the id part may. A stream id holds no control characters and is at
/// most [`StreamId::MAX_LEN`] bytes long (as UTF-8), on every backend.
///
/// ```
/// use factum::StreamId;
///
/// let stream = StreamId::for_aggregate("account", "42").unwrap();
/// assert_eq!(stream.as_str(), "account-42");
/// assert_eq!(stream.category(), "account");
/// assert_eq!(stream.aggregate_id(), "42");
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct StreamId(String);

/// Why a string is not a valid [`StreamId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidStreamId {
    /// The stream id, its category or its aggregate id is empty.
    #[error(
        "stream id {0:?} is invalid: it must be `category-id` with a non-empty category and id"
    )]
    Empty(String),
    /// The category contains the separator.
    #[error(
        "aggregate category {0:?} is invalid: it must not contain `-` (the category/id separator)"
    )]
    SeparatorInCategory(String),
    /// The stream id contains a control character (newline, NUL...).
    #[error("stream id {0:?} is invalid: it contains a control character")]
    ControlCharacter(String),
    /// The stream id is longer than [`StreamId::MAX_LEN`] bytes.
    #[error(
        "stream id starting {prefix:?} is invalid: it is {length} bytes long, and stream ids are at most {max} bytes (UTF-8); use a shorter aggregate id (e.g. a hash or a UUID of the long key)",
        max = StreamId::MAX_LEN
    )]
    TooLong {
        /// The first characters of the id (not all of it: it is too long to print).
        prefix: String,
        /// Its length in bytes.
        length: usize,
    },
}

impl StreamId {
    /// The longest stream id accepted, in bytes of UTF-8: 1024.
    ///
    /// Every backend stores the stream id in unique indexes; PostgreSQL's B-tree rejects an index
    /// entry larger than about 2700 bytes (a third of a page), and only after compression, so
    /// without a bound an id works or fails depending on how well it compresses. 1024 bytes leaves
    /// room for the other key columns whatever the content, and is far above any sensible
    /// aggregate id.
    pub const MAX_LEN: usize = 1024;

    /// Builds the stream id of one aggregate instance: `"{category}-{id}"`.
    pub fn for_aggregate(category: &str, id: &str) -> Result<Self, InvalidStreamId> {
        if category.contains(CATEGORY_SEPARATOR) {
            return Err(InvalidStreamId::SeparatorInCategory(category.to_owned()));
        }
        Self::new(format!("{category}{CATEGORY_SEPARATOR}{id}"))
    }

    /// Parses a full stream id such as `"account-42"`.
    ///
    /// Fails for an empty category or id, a control character, or an id longer than
    /// [`StreamId::MAX_LEN`] bytes:
    ///
    /// ```
    /// use factum::{InvalidStreamId, StreamId};
    ///
    /// let longest = format!("account-{}", "x".repeat(StreamId::MAX_LEN - "account-".len()));
    /// assert!(StreamId::new(longest.clone()).is_ok());
    /// let too_long = format!("{longest}x");
    /// assert!(matches!(StreamId::new(too_long), Err(InvalidStreamId::TooLong { .. })));
    /// ```
    pub fn new(value: impl Into<String>) -> Result<Self, InvalidStreamId> {
        let value = value.into();
        if value.len() > Self::MAX_LEN {
            return Err(InvalidStreamId::TooLong {
                prefix: value.chars().take(64).collect(),
                length: value.len(),
            });
        }
        if value.chars().any(char::is_control) {
            return Err(InvalidStreamId::ControlCharacter(value));
        }
        match value.split_once(CATEGORY_SEPARATOR) {
            Some((category, id)) if !category.is_empty() && !id.is_empty() => Ok(Self(value)),
            _ => Err(InvalidStreamId::Empty(value)),
        }
    }

    /// The whole id, e.g. `"account-42"`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The category (aggregate type), e.g. `"account"`.
    pub fn category(&self) -> &str {
        self.split().0
    }

    /// The aggregate id within the category, e.g. `"42"`.
    pub fn aggregate_id(&self) -> &str {
        self.split().1
    }

    fn split(&self) -> (&str, &str) {
        // Validated at construction: the separator is present.
        self.0
            .split_once(CATEGORY_SEPARATOR)
            .unwrap_or((self.0.as_str(), ""))
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamId({:?})", self.0)
    }
}

impl FromStr for StreamId {
    type Err = InvalidStreamId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for StreamId {
    type Error = InvalidStreamId;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl TryFrom<&str> for StreamId {
    type Error = InvalidStreamId;
    fn try_from(value: &str) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl<'de> Deserialize<'de> for StreamId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        Self::new(raw).map_err(serde::de::Error::custom)
    }
}

impl AsRef<str> for StreamId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A new, time-ordered id (UUID v7).
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            /// Wraps an existing UUID (e.g. one read from storage or a message header).
            pub const fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            /// The UUID inside.
            pub const fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl From<Uuid> for $name {
            fn from(uuid: Uuid) -> Self {
                Self(uuid)
            }
        }

        impl From<$name> for Uuid {
            fn from(id: $name) -> Self {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::from_str(s).map(Self)
            }
        }
    };
}

uuid_id!(
    /// The unique id of one event (a UUID v7, so ids sort by creation time).
    ///
    /// Appending an event whose id is already stored does not store it twice: see
    /// [`EventStore::append`](crate::EventStore::append) for the exact rule.
    EventId
);
uuid_id!(
    /// Ties together every command and event of one business transaction, across services.
    ///
    /// Set once where a workflow starts (e.g. from an HTTP request id) and copied into every event
    /// and every follow-up command.
    CorrelationId
);
uuid_id!(
    /// The id of the message (command or event) that directly caused an event or a command.
    CausationId
);
uuid_id!(
    /// The id of one command execution; it becomes the causation id of the events it produces.
    CommandId
);

impl From<EventId> for CausationId {
    fn from(id: EventId) -> Self {
        Self(id.0)
    }
}

impl From<CommandId> for CausationId {
    fn from(id: CommandId) -> Self {
        Self(id.0)
    }
}

/// The version of a stream: the number of events in it.
///
/// An empty (or not yet existing) stream is at [`StreamVersion::INITIAL`] (0); its first event
/// has version 1, and after it the stream is at version 1.
#[derive(
    Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct StreamVersion(u64);

impl StreamVersion {
    /// The version of a stream with no events.
    pub const INITIAL: Self = Self(0);

    /// Wraps a version number.
    pub const fn new(version: u64) -> Self {
        Self(version)
    }

    /// The version number.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The version after this one.
    #[must_use]
    pub const fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

impl fmt::Display for StreamVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// The position of an event in the global log, assigned when it is stored.
///
/// Unique per event and increasing in the order events were *appended*; because concurrent
/// transactions can commit out of order, readers of the global log order events by
/// [`LogPosition`], which also carries the commit.
#[derive(
    Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct GlobalPosition(u64);

impl GlobalPosition {
    /// Wraps a position.
    pub const fn new(position: u64) -> Self {
        Self(position)
    }

    /// The position number.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for GlobalPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// Where an event sits in the global log, in the order readers see it: by commit, then by
/// global position within the commit.
///
/// This is what a subscription checkpoints. On PostgreSQL the commit is the writing
/// transaction's id, which makes the order gap-safe: an event that commits late cannot land
/// behind a checkpoint already taken (see the PostgreSQL backend's docs). On the in-memory
/// backend it is a commit counter.
#[derive(
    Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize,
)]
pub struct LogPosition {
    /// The commit (transaction) that stored the event.
    pub commit: u64,
    /// The event's global position.
    pub global: GlobalPosition,
}

impl LogPosition {
    /// Before the first event: reading after it reads the whole log.
    pub const START: Self = Self {
        commit: 0,
        global: GlobalPosition(0),
    };

    /// A position from its parts.
    pub const fn new(commit: u64, global: GlobalPosition) -> Self {
        Self { commit, global }
    }
}

impl fmt::Display for LogPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.global, self.commit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_are_category_and_id() {
        let id = StreamId::for_aggregate("account", "a-1").unwrap();
        assert_eq!(id.as_str(), "account-a-1");
        assert_eq!(id.category(), "account");
        assert_eq!(id.aggregate_id(), "a-1");
    }

    #[test]
    fn invalid_stream_ids_are_rejected() {
        assert!(matches!(
            StreamId::for_aggregate("bank-account", "1"),
            Err(InvalidStreamId::SeparatorInCategory(_))
        ));
        assert!(matches!(
            StreamId::new("account"),
            Err(InvalidStreamId::Empty(_))
        ));
        assert!(matches!(
            StreamId::new("-1"),
            Err(InvalidStreamId::Empty(_))
        ));
        assert!(matches!(
            StreamId::new("account-"),
            Err(InvalidStreamId::Empty(_))
        ));
        assert!(matches!(
            StreamId::new("a-\n"),
            Err(InvalidStreamId::ControlCharacter(_))
        ));
        assert!(serde_json::from_str::<StreamId>("\"nodash\"").is_err());
    }

    #[test]
    fn stream_ids_are_bounded_in_bytes_not_characters() {
        let fill = |n: usize| format!("a-{}", "x".repeat(n - 2));
        assert!(StreamId::new(fill(StreamId::MAX_LEN)).is_ok());
        let err = StreamId::new(fill(StreamId::MAX_LEN + 1)).unwrap_err();
        assert!(
            matches!(err, InvalidStreamId::TooLong { length, .. } if length == StreamId::MAX_LEN + 1)
        );
        let message = err.to_string();
        assert!(
            message.contains("1025 bytes") && message.contains("at most 1024"),
            "{message}"
        );
        assert!(
            message.len() < 400,
            "the message must not print the whole id: {message}"
        );
        // 'é' is two bytes: 512 of them after "a-" exceed the bound though there are 514 chars.
        let wide = format!("a-{}", "é".repeat(512));
        assert_eq!(wide.chars().count(), 514);
        assert!(matches!(
            StreamId::new(wide),
            Err(InvalidStreamId::TooLong { .. })
        ));
        assert!(StreamId::for_aggregate("a", &"x".repeat(StreamId::MAX_LEN)).is_err());
        let json = serde_json::to_string(&fill(StreamId::MAX_LEN + 1)).unwrap();
        assert!(serde_json::from_str::<StreamId>(&json).is_err());
    }

    #[test]
    fn log_positions_order_by_commit_then_position() {
        let a = LogPosition::new(5, GlobalPosition::new(9));
        let b = LogPosition::new(6, GlobalPosition::new(3));
        assert!(a < b);
        assert!(LogPosition::START < a);
    }

    #[test]
    fn event_ids_are_time_ordered() {
        let first = EventId::new();
        let second = EventId::new();
        assert!(first < second);
        assert_eq!(first.as_uuid().get_version_num(), 7);
    }
}
