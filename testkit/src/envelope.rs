//! Building envelopes for tests: events with the stream, version, position and metadata a store
//! would have given them.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use factum::{
    CausationId, CorrelationId, Envelope, EventId, EventMetadata, GlobalPosition, LogPosition,
    StreamId, StreamVersion,
};
use serde::Serialize;

/// Starts building an envelope for `event` in `stream`.
///
/// Left unset, the version and global position are assigned by the fixture the envelope is given
/// to (the next version of its stream, the next position of the fixture's log), or by
/// [`TestEnvelope::build`].
///
/// ```
/// use factum::CorrelationId;
/// use factum_testkit::envelope;
///
/// let workflow = CorrelationId::new();
/// let built = envelope("account-a1", "opened")
///     .version(3)
///     .correlation_id(workflow)
///     .metadata("tenant", "acme")
///     .build();
/// assert_eq!(built.stream_id.as_str(), "account-a1");
/// assert_eq!(built.stream_version.get(), 3);
/// assert_eq!(built.metadata.correlation_id, Some(workflow));
/// assert_eq!(built.metadata.user.get::<String>("tenant").unwrap().as_deref(), Some("acme"));
/// ```
///
/// # Panics
/// When `stream` is not a valid [`StreamId`] (e.g. it has no `-` between category and id).
#[track_caller]
pub fn envelope<E>(stream: &str, event: E) -> TestEnvelope<E> {
    TestEnvelope::new(stream_id(stream), event)
}

#[track_caller]
pub(crate) fn stream_id(stream: &str) -> StreamId {
    match StreamId::new(stream) {
        Ok(id) => id,
        Err(e) => panic!("invalid stream id {stream:?} in a test: {e}"),
    }
}

/// An envelope under construction; see [`envelope`].
#[derive(Clone, Debug)]
pub struct TestEnvelope<E> {
    event: E,
    stream_id: StreamId,
    version: Option<StreamVersion>,
    position: Option<GlobalPosition>,
    event_id: Option<EventId>,
    metadata: EventMetadata,
    recorded_at: Option<DateTime<Utc>>,
}

impl<E> TestEnvelope<E> {
    /// An envelope for `event` in `stream`, with nothing else set.
    pub fn new(stream: StreamId, event: E) -> Self {
        Self {
            event,
            stream_id: stream,
            version: None,
            position: None,
            event_id: None,
            metadata: EventMetadata::default(),
            recorded_at: None,
        }
    }

    /// Sets the event's version in its stream (1 for the first event).
    #[must_use]
    pub fn version(mut self, version: u64) -> Self {
        self.version = Some(StreamVersion::new(version));
        self
    }

    /// Sets the event's global position in the log.
    #[must_use]
    pub fn position(mut self, position: u64) -> Self {
        self.position = Some(GlobalPosition::new(position));
        self
    }

    /// Sets the event id (a fresh one otherwise).
    #[must_use]
    pub fn event_id(mut self, event_id: EventId) -> Self {
        self.event_id = Some(event_id);
        self
    }

    /// Sets the correlation id: the workflow the event belongs to.
    #[must_use]
    pub fn correlation_id(mut self, correlation_id: CorrelationId) -> Self {
        self.metadata.correlation_id = Some(correlation_id);
        self
    }

    /// Sets the causation id: the command or event that caused this one.
    #[must_use]
    pub fn causation_id(mut self, causation_id: impl Into<CausationId>) -> Self {
        self.metadata.causation_id = Some(causation_id.into());
        self
    }

    /// Adds a user metadata entry.
    ///
    /// # Panics
    /// When `value` cannot be serialised to JSON.
    #[must_use]
    #[track_caller]
    pub fn metadata<T: Serialize + ?Sized>(mut self, key: &str, value: &T) -> Self {
        if let Err(e) = self.metadata.user.insert(key, value) {
            panic!("metadata {key:?} of a test envelope does not serialise: {e}");
        }
        self
    }

    /// Sets when the store recorded the event (now otherwise).
    #[must_use]
    pub fn recorded_at(mut self, recorded_at: DateTime<Utc>) -> Self {
        self.recorded_at = Some(recorded_at);
        self
    }

    /// The envelope, on its own: version 1 and global position equal to the version unless set.
    pub fn build(self) -> Envelope<E> {
        let version = self.version.unwrap_or(StreamVersion::new(1));
        let position = self.position.unwrap_or(GlobalPosition::new(version.get()));
        self.finish(version, position)
    }

    fn finish(self, version: StreamVersion, position: GlobalPosition) -> Envelope<E> {
        let mut envelope = Envelope::new(self.stream_id, version, self.event);
        envelope.position = LogPosition::new(position.get(), position);
        envelope.metadata = self.metadata;
        if let Some(event_id) = self.event_id {
            envelope.event_id = event_id;
        }
        if let Some(recorded_at) = self.recorded_at {
            envelope.recorded_at = recorded_at;
        }
        envelope
    }
}

impl<E> From<Envelope<E>> for TestEnvelope<E> {
    /// Uses a ready envelope as it is (version, position, ids and metadata included).
    fn from(envelope: Envelope<E>) -> Self {
        Self {
            event: envelope.event,
            stream_id: envelope.stream_id,
            version: Some(envelope.stream_version),
            position: Some(envelope.position.global),
            event_id: Some(envelope.event_id),
            metadata: envelope.metadata,
            recorded_at: Some(envelope.recorded_at),
        }
    }
}

/// Numbers the envelopes given to a fixture as a store would: each stream's versions count up
/// from 1, global positions count up across streams.
#[derive(Debug, Default)]
pub(crate) struct TestLog {
    versions: HashMap<StreamId, StreamVersion>,
    head: u64,
}

impl TestLog {
    pub(crate) fn place<E>(&mut self, given: TestEnvelope<E>) -> Envelope<E> {
        let latest = self.versions.entry(given.stream_id.clone()).or_default();
        let version = given.version.unwrap_or(latest.next());
        *latest = (*latest).max(version);
        let position = given.position.unwrap_or(GlobalPosition::new(self.head + 1));
        self.head = self.head.max(position.get());
        given.finish(version, position)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_numbers_versions_per_stream_and_positions_globally() {
        let mut log = TestLog::default();
        let a1 = log.place(envelope("account-a", 'x'));
        let b1 = log.place(envelope("account-b", 'y'));
        let a2 = log.place(envelope("account-a", 'z'));
        let a9 = log.place(envelope("account-a", 'w').version(9).position(40));
        let a10 = log.place(envelope("account-a", 'v'));
        let versions: Vec<u64> = [&a1, &b1, &a2, &a9, &a10]
            .iter()
            .map(|e| e.stream_version.get())
            .collect();
        let positions: Vec<u64> = [&a1, &b1, &a2, &a9, &a10]
            .iter()
            .map(|e| e.position.global.get())
            .collect();
        assert_eq!(versions, [1, 1, 2, 9, 10]);
        assert_eq!(positions, [1, 2, 3, 40, 41]);
    }

    #[test]
    fn a_ready_envelope_is_kept_as_it_is() {
        let original = envelope("account-a", 1).version(5).position(8).build();
        let mut log = TestLog::default();
        let placed = log.place(TestEnvelope::from(original.clone()));
        assert_eq!(placed.event_id, original.event_id);
        assert_eq!(placed.stream_version, original.stream_version);
        assert_eq!(placed.position, original.position);
    }
}
