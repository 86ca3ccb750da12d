//! Known events: reading whole categories at the source and deciding by type in the consumer, so
//! a stored event whose type nothing registers is never hidden by a type filter.

use std::collections::{BTreeMap, BTreeSet};

use crate::aggregate::Aggregate;
use crate::error::BoxError;
use crate::event::{Event, RecordedEvent};
use crate::store::EventFilter;

use super::handler::{BatchFailure, BatchHandler};

/// The wire names registered for each category a consumer reads.
///
/// A consumer with known events ([`ConsumerOptions::known_events`](super::ConsumerOptions::known_events))
/// reads **whole categories** at the source and decides by type itself: an event of a type the
/// consumer handles goes to its handler; one of another registered type is passed over; one whose
/// stored type nothing registers (a typo, a rename without an alias, a newer writer's event)
/// fails like an undecodable event — the consumer stops on it with [`Error::Handler`] naming its
/// stream, version, type and position, or parks it — instead of vanishing behind a filter on
/// event types.
///
/// ```
/// use factum::subscription::KnownEvents;
/// let known = KnownEvents::new().category("account", ["account.opened", "account.deposited"]);
/// assert!(known.knows("account", "account.opened"));
/// assert!(!known.knows("account", "account.opend"));
/// ```
///
/// [`Error::Handler`]: crate::Error::Handler
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KnownEvents {
    categories: BTreeMap<String, BTreeSet<String>>,
}

impl KnownEvents {
    /// Nothing known yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every event of aggregate `A`: category [`Aggregate::TYPE`], the wire names of its
    /// [`Event`](Aggregate::Event) type.
    #[must_use]
    pub fn aggregate<A: Aggregate>(self) -> Self {
        self.category(A::TYPE, <A::Event as Event>::event_types().iter().copied())
    }

    /// The wire names of event type `E`, in `category`.
    #[must_use]
    pub fn events<E: Event>(self, category: &str) -> Self {
        self.category(category, E::event_types().iter().copied())
    }

    /// These wire names, in `category`.
    #[must_use]
    pub fn category<S: Into<String>>(
        mut self,
        category: &str,
        types: impl IntoIterator<Item = S>,
    ) -> Self {
        self.categories
            .entry(category.to_owned())
            .or_default()
            .extend(types.into_iter().map(Into::into));
        self
    }

    /// Whether `event_type` is registered in `category`. The tombstone of a deleted stream
    /// ([`STREAM_DELETED`](crate::STREAM_DELETED)) is known in every category.
    pub fn knows(&self, category: &str, event_type: &str) -> bool {
        event_type == crate::event::STREAM_DELETED
            || self
                .categories
                .get(category)
                .is_some_and(|types| types.contains(event_type))
    }

    /// The filter a consumer reads with: the known categories (within those `filter` keeps), any
    /// type.
    pub(crate) fn source_filter(&self, filter: &EventFilter) -> EventFilter {
        let mut source = EventFilter::all().with_categories(self.categories.keys().cloned());
        if let Some(categories) = filter.categories() {
            source = source.and(EventFilter::all().with_categories(categories.iter().cloned()));
        }
        source
    }

    fn unknown(&self, event: &RecordedEvent) -> BoxError {
        let category = event.stream_id.category();
        let registered: Vec<&str> = self
            .categories
            .get(category)
            .map(|t| t.iter().map(String::as_str).collect())
            .unwrap_or_default();
        format!(
            "no registered event type has wire name {:?} in category `{category}` (registered: {registered:?}); register it (the renamed event's old name as an alias, or the new event in its aggregate's event type) or repair the stored type",
            event.event_type
        )
        .into()
    }
}

/// What a screened consumer does with an event.
enum Screen {
    Deliver,
    PassOver,
    Unknown,
}

/// A handler behind [`KnownEvents`]: gets only the wanted types; unknown types fail.
pub(crate) struct Screened<H> {
    pub(crate) inner: H,
    pub(crate) known: KnownEvents,
    /// The types the handler takes (`None`: every known type).
    pub(crate) wanted: Option<Vec<String>>,
}

impl<H> Screened<H> {
    fn screen(&self, event: &RecordedEvent) -> Screen {
        let wanted = self
            .wanted
            .as_ref()
            .is_none_or(|w| w.contains(&event.event_type));
        let known = self
            .known
            .knows(event.stream_id.category(), &event.event_type);
        match (wanted, known) {
            (true, true) => Screen::Deliver,
            // Handled by this consumer, so registered by it, even if the list forgot it.
            (true, false) if self.wanted.is_some() => Screen::Deliver,
            (false, true) => Screen::PassOver,
            _ => Screen::Unknown,
        }
    }
}

impl<H: BatchHandler<Tx>, Tx: Send + ?Sized> BatchHandler<Tx> for Screened<H> {
    async fn handle_batch(
        &mut self,
        tx: &mut Tx,
        events: &[RecordedEvent],
    ) -> Result<(), BatchFailure> {
        let mut wanted = Vec::new();
        let mut index = Vec::new();
        let mut unknown = None;
        for (i, event) in events.iter().enumerate() {
            match self.screen(event) {
                Screen::Deliver => {
                    wanted.push(event.clone());
                    index.push(i);
                }
                Screen::PassOver => {}
                Screen::Unknown => {
                    unknown = Some(i);
                    break;
                }
            }
        }
        if !wanted.is_empty() {
            self.inner
                .handle_batch(tx, &wanted)
                .await
                .map_err(|failure| BatchFailure {
                    handled: failure.handled.map(|k| index[k]),
                    source: failure.source,
                })?;
        }
        match unknown {
            Some(i) => Err(BatchFailure::at(i, self.known.unknown(&events[i]))),
            None => Ok(()),
        }
    }

    async fn handle_one(&mut self, tx: &mut Tx, event: &RecordedEvent) -> Result<(), BoxError> {
        match self.screen(event) {
            Screen::Deliver => self.inner.handle_one(tx, event).await,
            Screen::PassOver => Ok(()),
            Screen::Unknown => Err(self.known.unknown(event)),
        }
    }
}
