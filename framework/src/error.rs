//! The framework's error type and its classification.

use std::fmt;

use crate::event::{DecodeError, EncodeError};
use crate::ids::{EventId, LogPosition, StreamId, StreamVersion};
use crate::store::ExpectedVersion;

/// A boxed error from a backend driver or a user hook.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong in factum or in a backend.
///
/// Match on [`kind`](Error::kind) (or the `is_*` helpers) to decide what to do; match on the
/// variants for the details.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Another writer appended to the stream first. Nothing was stored: reload the stream and
    /// decide again (the [`Repository`](crate::Repository) does this by itself).
    #[error(
        "concurrency conflict on stream `{stream}`: expected {expected}, but the stream is at version {actual}; nothing was stored, reload and retry"
    )]
    Conflict {
        /// The stream written to.
        stream: StreamId,
        /// What the writer expected.
        expected: ExpectedVersion,
        /// The stream's actual version.
        actual: StreamVersion,
    },

    /// Part of a batch repeats event ids already stored (elsewhere, or only some of them).
    /// Nothing was stored.
    #[error(
        "event id {event_id} is already stored in stream `{existing_stream}`, and the batch appended to `{stream}` is not an exact re-append of it; nothing was stored"
    )]
    DuplicateEventId {
        /// The stream written to.
        stream: StreamId,
        /// The first id that is already stored.
        event_id: EventId,
        /// The stream that holds it.
        existing_stream: StreamId,
    },

    /// The stream is archived (or otherwise closed to writes by its backend): it accepts no more
    /// events. Nothing was stored. Archiving is final; write new events to a new stream.
    #[error(
        "stream `{stream}` is archived and accepts no more events; nothing was stored: write to a new stream"
    )]
    StreamArchived {
        /// The stream written to.
        stream: StreamId,
    },

    /// The stream was deleted: its events are gone and it accepts no more (its id and versions
    /// are never reused). Nothing was stored.
    #[error(
        "stream `{stream}` was deleted: its events are gone and it accepts no more; nothing was stored or loaded"
    )]
    StreamDeleted {
        /// The stream.
        stream: StreamId,
    },

    /// An append's idempotency key is already stored with a different batch (another stream, or
    /// other event ids). Nothing was stored: a key names one write; use a new key for a new one.
    #[error(
        "idempotency key {key} was already used for a different append (stream `{stored_stream}`), not for this batch to `{stream}`; nothing was stored: give each distinct write its own key"
    )]
    IdempotencyKeyReused {
        /// The key.
        key: crate::IdempotencyKey,
        /// The stream this request appends to.
        stream: StreamId,
        /// The stream of the append that stored the key.
        stored_stream: StreamId,
    },

    /// A stored event could not be decoded or upcast into the current event type.
    #[error(
        "stored event in stream `{stream}` at version {version} (type {event_type:?}, schema version {schema_version}, log position {position}) could not be decoded; fix the event type's decoding or upcasting (e.g. register the missing version) and retry"
    )]
    Decode {
        /// The stream holding the event.
        stream: StreamId,
        /// Its version in the stream.
        version: StreamVersion,
        /// Its stored wire name.
        event_type: String,
        /// Its stored schema version.
        schema_version: u32,
        /// Its place in the global log.
        position: LogPosition,
        /// Why decoding failed.
        #[source]
        source: DecodeError,
    },

    /// A stored event's metadata is corrupt (not a JSON object): the row was damaged outside
    /// factum. Its payload and type are not in question.
    #[error(
        "stored event in stream `{stream}` at version {version} (type {event_type:?}, log position {position}) has corrupt metadata: it is not a JSON object; repair the row's metadata (e.g. set it to '{{}}') and restart the consumer, which resumes at this event"
    )]
    Metadata {
        /// The stream holding the event.
        stream: StreamId,
        /// Its version in the stream.
        version: StreamVersion,
        /// Its stored wire name.
        event_type: String,
        /// Its place in the global log.
        position: LogPosition,
        /// Why the metadata did not parse.
        #[source]
        source: serde_json::Error,
    },

    /// An event (or a snapshot) could not be serialised. Nothing was stored.
    #[error("{what} for stream `{stream}` could not be serialised; nothing was stored")]
    Encode {
        /// The stream written to.
        stream: StreamId,
        /// What failed, e.g. `event "account.opened"`.
        what: String,
        /// The serialiser's error.
        #[source]
        source: EncodeError,
    },

    /// A stored snapshot could not be decoded. The repository ignores such snapshots; this is
    /// returned only by explicit snapshot reads.
    #[error("snapshot of stream `{stream}` could not be decoded")]
    Snapshot {
        /// The stream whose snapshot failed.
        stream: StreamId,
        /// The deserialiser's error.
        #[source]
        source: serde_json::Error,
    },

    /// The argument is invalid (an empty batch, a malformed stream id...). Nothing was done;
    /// retrying the same call will not help: fix the argument. Its kind is
    /// [`ErrorKind::InvalidArgument`].
    #[error(
        "invalid argument: {0}; nothing was done, fix the call (retrying it unchanged will not help)"
    )]
    InvalidArgument(String),

    /// The backend failed in a way that may succeed if retried (connection refused, deadlock,
    /// serialization failure, server shutting down). Nothing was stored.
    #[error(
        "{operation} failed with a transient backend error; nothing was stored, retrying may succeed"
    )]
    Transient {
        /// The operation, e.g. `"append"`.
        operation: &'static str,
        /// The backend's error.
        #[source]
        source: BoxError,
    },

    /// The backend failed in a way that retrying will not fix (bad schema, permission denied,
    /// a bug).
    #[error("{operation} failed with a permanent backend error; retrying will not help")]
    Permanent {
        /// The operation, e.g. `"append"`.
        operation: &'static str,
        /// The backend's error.
        #[source]
        source: BoxError,
    },

    /// The connection was lost after the write was sent: it may or may not have been stored.
    /// Re-appending the same events (same event ids) is safe and settles it.
    #[error(
        "{operation} on stream `{stream}` has an unknown outcome (connection lost after the write was sent); re-append the same event ids to settle it"
    )]
    UnknownOutcome {
        /// The operation, e.g. `"append"`.
        operation: &'static str,
        /// The stream written to.
        stream: StreamId,
        /// The backend's error.
        #[source]
        source: BoxError,
    },

    /// A subscription's handler kept failing on an event, and the subscription is not configured
    /// to park failures: it stopped, with its checkpoint just before the event.
    #[error(
        "subscription `{subscription}` stopped: its handler failed {attempts} times on event {event_id} (stream `{stream}` version {version}, type {event_type:?}, log position {position}); fix the handler and restart (it resumes at this event), or let the subscription park failing events"
    )]
    Handler {
        /// The subscription.
        subscription: String,
        /// The event's stream.
        stream: StreamId,
        /// The event's version in its stream.
        version: StreamVersion,
        /// The event's wire name.
        event_type: String,
        /// The event's id.
        event_id: EventId,
        /// The event's place in the global log.
        position: LogPosition,
        /// How many times the handler was tried.
        attempts: u32,
        /// The handler's last error.
        #[source]
        source: BoxError,
    },

    /// The store belongs to another service: it was opened for `expected`, but `location` (a
    /// database and schema) is the store of `owner`. Nothing was done. Each service writes only
    /// its own store: check the URL, the schema and the service name.
    #[error(
        "the store at {location} belongs to service `{owner}`, not to `{expected}` it was opened for; nothing was done: check the database URL, the schema and the service name"
    )]
    WrongService {
        /// The service the store was opened for.
        expected: String,
        /// The service the store belongs to.
        owner: String,
        /// Where the store is (e.g. database and schema).
        location: String,
    },

    /// A dependency is unavailable and calls fail fast (a circuit breaker is open).
    #[error("{dependency} is unavailable; calls fail fast until {retry_after:?} from now")]
    Unavailable {
        /// What is unavailable, e.g. `"postgres"`.
        dependency: &'static str,
        /// How long until the next trial call is let through.
        retry_after: std::time::Duration,
    },
}

/// The class of an [`Error`]: what a caller should do about it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Reload and decide again.
    Conflict,
    /// Retrying may succeed.
    Transient,
    /// The backend failed in a way retrying will not fix (bad schema, permission denied, a bug,
    /// a handler that keeps failing).
    Permanent,
    /// The caller's argument is invalid (an empty batch, a malformed id): fix the call;
    /// retrying it unchanged will not help.
    InvalidArgument,
    /// A stored event or snapshot is unreadable: fix the code or the data.
    BadData,
    /// A write may or may not have happened: re-append the same event ids.
    UnknownOutcome,
    /// A dependency is down and calls fail fast.
    Unavailable,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Conflict => "conflict",
            ErrorKind::Transient => "transient",
            ErrorKind::Permanent => "permanent",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::BadData => "bad data",
            ErrorKind::UnknownOutcome => "unknown outcome",
            ErrorKind::Unavailable => "unavailable",
        })
    }
}

impl Error {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Conflict { .. } => ErrorKind::Conflict,
            Error::Transient { .. } => ErrorKind::Transient,
            Error::UnknownOutcome { .. } => ErrorKind::UnknownOutcome,
            Error::Unavailable { .. } => ErrorKind::Unavailable,
            Error::Decode { .. } | Error::Metadata { .. } | Error::Snapshot { .. } => {
                ErrorKind::BadData
            }
            Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Error::DuplicateEventId { .. }
            | Error::StreamArchived { .. }
            | Error::StreamDeleted { .. }
            | Error::IdempotencyKeyReused { .. }
            | Error::Encode { .. }
            | Error::Handler { .. }
            | Error::WrongService { .. }
            | Error::Permanent { .. } => ErrorKind::Permanent,
        }
    }

    /// True for a concurrency conflict.
    pub fn is_conflict(&self) -> bool {
        self.kind() == ErrorKind::Conflict
    }

    /// True when retrying the same operation may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self.kind(), ErrorKind::Transient | ErrorKind::Unavailable)
    }

    /// A transient backend error.
    pub fn transient(operation: &'static str, source: impl Into<BoxError>) -> Self {
        Error::Transient {
            operation,
            source: source.into(),
        }
    }

    /// A permanent backend error.
    pub fn permanent(operation: &'static str, source: impl Into<BoxError>) -> Self {
        Error::Permanent {
            operation,
            source: source.into(),
        }
    }
}

/// Why executing a command failed: the aggregate rejected it, or the framework could not run it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError<E> {
    /// The aggregate's `decide` rejected the command. Nothing was stored.
    #[error(transparent)]
    Rejected(E),
    /// Loading or storing failed (after the configured conflict retries, for conflicts).
    #[error(transparent)]
    Failed(#[from] Error),
}

impl<E> CommandError<E> {
    /// The domain error, when the command was rejected.
    pub fn rejection(&self) -> Option<&E> {
        match self {
            CommandError::Rejected(e) => Some(e),
            CommandError::Failed(_) => None,
        }
    }

    /// The framework error, when the command could not be run.
    pub fn failure(&self) -> Option<&Error> {
        match self {
            CommandError::Rejected(_) => None,
            CommandError::Failed(e) => Some(e),
        }
    }

    /// True for a concurrency conflict that outlasted the retries.
    pub fn is_conflict(&self) -> bool {
        self.failure().is_some_and(Error::is_conflict)
    }

    /// True when running the command again may succeed.
    pub fn is_transient(&self) -> bool {
        self.failure().is_some_and(Error::is_transient)
    }
}

/// An error with its causes, on one line, `: `-separated: what factum writes into dead letters,
/// statuses and health details, and what a log line or a test failure usually wants.
///
/// ```
/// let error = factum::Error::transient("append", std::io::Error::other("connection refused"));
/// assert_eq!(
///     factum::error_chain(&error),
///     "append failed with a transient backend error; nothing was stored, retrying may succeed: \
///      connection refused"
/// );
/// ```
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invalid_argument_is_classed_as_one() {
        let stream = StreamId::new("account-1").expect("valid");
        let empty = crate::validate_batch(&stream, &[]).expect_err("an empty batch is refused");
        assert!(matches!(empty, Error::InvalidArgument(_)), "{empty:?}");
        assert_eq!(empty.kind(), ErrorKind::InvalidArgument);
        assert_eq!(empty.kind().to_string(), "invalid argument");
        assert!(!empty.is_transient());
        let message = empty.to_string();
        assert!(message.starts_with("invalid argument: "), "{message}");
        assert!(
            message.contains("account-1") && message.contains("no events"),
            "{message}"
        );
        // A permanent failure is the backend's, not the caller's.
        assert_eq!(
            Error::permanent("append", "permission denied").kind(),
            ErrorKind::Permanent
        );
    }
}
