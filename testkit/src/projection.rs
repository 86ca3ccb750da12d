//! The projection fixture: given events, then the read model.

use std::fmt::Debug;

use factum::{Envelope, Projection};

use crate::envelope::{TestEnvelope, TestLog, envelope};
use crate::support::pretty;

/// Feeds envelopes to a [`Projection`] and checks its read model.
///
/// Events are applied as they are given; checks can be interleaved with more events. Envelopes
/// are numbered like a store would number them (see [`envelope`](crate::envelope)).
///
/// ```
/// use factum::{BoxError, Envelope, Projection};
/// use factum_testkit::{ProjectionFixture, envelope};
/// # use factum::{DecodeError, EncodeError, Event, RawValue};
/// # #[derive(Debug)]
/// # struct Deposited(u64);
/// # impl Event for Deposited {
/// #     fn event_type(&self) -> &'static str { "account.deposited" }
/// #     fn schema_version(&self) -> u32 { 1 }
/// #     fn event_types() -> &'static [&'static str] { &["account.deposited"] }
/// #     fn encode(&self) -> Result<Box<RawValue>, EncodeError> { factum::encode_json(&self.0) }
/// #     fn decode(stored: &factum::Stored<'_>) -> Result<Self, DecodeError> { let (_, _, p) = (stored.event_type, stored.schema_version, stored.payload);
/// #         factum::decode_json(p).map(Deposited)
/// #     }
/// # }
///
/// /// The total deposited into all accounts, and the last position seen.
/// #[derive(Debug, Default, PartialEq)]
/// struct Total { cents: u64, position: u64 }
///
/// impl Projection for Total {
///     const NAME: &'static str = "total";
///     type Event = Deposited;
///     fn apply(&mut self, event: &Envelope<Deposited>) -> Result<(), BoxError> {
///         self.cents += event.event.0;
///         self.position = event.position.global.get();
///         Ok(())
///     }
/// }
///
/// ProjectionFixture::new(Total::default())
///     .given_events("account-a1", [Deposited(100), Deposited(20)])
///     .given(envelope("account-b2", Deposited(3)).metadata("tenant", "acme"))
///     .then_read_model_eq(Total { cents: 123, position: 3 })
///     .then_read_model_matches(|total| total.cents > 100);
/// ```
#[derive(Debug)]
pub struct ProjectionFixture<P: Projection> {
    projection: P,
    log: TestLog,
    applied: Vec<String>,
}

impl<P: Projection> ProjectionFixture<P> {
    /// A fixture around `projection` in its starting state.
    pub fn new(projection: P) -> Self {
        Self {
            projection,
            log: TestLog::default(),
            applied: Vec::new(),
        }
    }

    /// Applies one event: an [`envelope`](crate::envelope) being built, or a ready
    /// [`Envelope`].
    ///
    /// # Panics
    /// When the projection returns an error.
    #[must_use]
    #[track_caller]
    pub fn given(mut self, event: impl Into<TestEnvelope<P::Event>>) -> Self {
        let envelope = self.log.place(event.into());
        self.apply(&envelope);
        self
    }

    /// Applies events appended one after another to `stream`.
    ///
    /// # Panics
    /// When `stream` is not a valid stream id, or the projection returns an error.
    #[must_use]
    #[track_caller]
    pub fn given_events(
        mut self,
        stream: &str,
        events: impl IntoIterator<Item = P::Event>,
    ) -> Self {
        for event in events {
            let envelope = self.log.place(envelope(stream, event));
            self.apply(&envelope);
        }
        self
    }

    #[track_caller]
    fn apply(&mut self, envelope: &Envelope<P::Event>) {
        let at = format!(
            "{} at version {} (position {}, {:?})",
            envelope.stream_id,
            envelope.stream_version,
            envelope.position.global,
            factum::Event::event_type(&envelope.event)
        );
        if let Err(error) = self.projection.apply(envelope) {
            panic!(
                "projection `{}` failed to apply the event in stream {at}: {error}",
                P::NAME
            );
        }
        self.applied.push(at);
    }

    /// Runs `check` (usually assertions) on the read model.
    pub fn then_read_model(self, check: impl FnOnce(&P)) -> Self {
        check(&self.projection);
        self
    }

    /// Checks that the read model equals `expected`.
    ///
    /// # Panics
    /// When it differs, showing both sides and the events applied.
    #[track_caller]
    pub fn then_read_model_eq(self, expected: P) -> Self
    where
        P: PartialEq + Debug,
    {
        if self.projection != expected {
            panic!(
                "projection `{}`: the read model differs from the expected one\n  expected:\n{}\n  actual:\n{}\n{}",
                P::NAME,
                pretty(&expected, 4),
                pretty(&self.projection, 4),
                self.applied_listing(),
            );
        }
        self
    }

    /// Checks that the read model satisfies `predicate`.
    ///
    /// # Panics
    /// When it does not, showing the read model and the events applied.
    #[track_caller]
    pub fn then_read_model_matches(self, predicate: impl FnOnce(&P) -> bool) -> Self
    where
        P: Debug,
    {
        if !predicate(&self.projection) {
            panic!(
                "projection `{}`: the read model does not satisfy the predicate\n  actual:\n{}\n{}",
                P::NAME,
                pretty(&self.projection, 4),
                self.applied_listing(),
            );
        }
        self
    }

    /// The read model.
    pub fn read_model(&self) -> &P {
        &self.projection
    }

    /// The read model, ending the test.
    pub fn into_read_model(self) -> P {
        self.projection
    }

    fn applied_listing(&self) -> String {
        let mut out = format!("after {} event(s):", self.applied.len());
        for (i, at) in self.applied.iter().enumerate() {
            out.push_str(&format!("\n  [{i}] {at}"));
        }
        out
    }
}
